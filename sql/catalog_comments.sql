--
-- catalog_comments: every object of the extension, and every column of its
-- tables and views, has a COMMENT, so \d+ and \df+ explain themselves.  A
-- new object without one makes this file fail.
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

SELECT count(*) > 40 AS has_members
  FROM pg_depend d
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'apikey');

-- members without a comment (zero rows); PostgreSQL 18 also records the
-- implicit row and array types of tables and views as members, which
-- cannot be commented apart from their relation
SELECT pg_describe_object(d.classid, d.objid, d.objsubid) AS member_without_comment
  FROM pg_depend d JOIN pg_class cat ON cat.oid = d.classid
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'apikey')
   AND obj_description(d.objid, cat.relname) IS NULL
   AND NOT EXISTS (SELECT FROM pg_type t
					WHERE d.classid = 'pg_type'::regclass AND t.oid = d.objid
					  AND (t.typelem <> 0 OR (t.typrelid <> 0 AND
						   (SELECT relkind FROM pg_class WHERE oid = t.typrelid) <> 'c')))
 ORDER BY 1;

-- columns of tables and views without a comment (zero rows)
SELECT c.oid::regclass || '.' || a.attname AS column_without_comment
  FROM pg_class c
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 WHERE c.relnamespace = 'apikey'::regnamespace AND c.relkind IN ('r', 'v')
   AND col_description(c.oid, a.attnum) IS NULL
 ORDER BY 1;
