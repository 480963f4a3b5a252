--
-- catalog_foreign_keys: the extension's tables keep their integrity with
-- foreign keys that pg_dump can order.  pg_dump restores the data of an
-- extension's configuration tables in foreign-key order and warns
-- ("there are circular foreign-key constraints on this table") about any
-- loop, a table's reference to itself included.  So no table of the
-- extension references itself, and the references among the dumped tables
-- form no cycle.  (t/023_dump_restore.pl runs pg_dump itself.)
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

-- the dumped tables do keep foreign keys (the checks below are not vacuous)
SELECT count(*) >= 5 AS has_foreign_keys
  FROM pg_constraint c
 WHERE c.contype = 'f' AND c.connamespace = 'apikey'::regnamespace;

-- foreign keys from a table of the extension to that same table (zero rows)
SELECT c.conrelid::regclass AS self_referencing_table, c.conname
  FROM pg_constraint c
  JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.conrelid
		AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
 WHERE c.contype = 'f' AND c.conrelid = c.confrelid
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'apikey')
 ORDER BY 1, 2;

-- cycles among the foreign keys of the tables pg_dump dumps with the
-- extension (pg_extension.extconfig), as pg_dump orders them (zero rows)
WITH RECURSIVE config AS (
	SELECT unnest(extconfig) AS rel FROM pg_extension WHERE extname = 'apikey'
), edge AS (
	SELECT DISTINCT c.conrelid AS src, c.confrelid AS dst
	  FROM pg_constraint c
	 WHERE c.contype = 'f'
	   AND c.conrelid IN (SELECT rel FROM config) AND c.confrelid IN (SELECT rel FROM config)
), walk (start, node, path, looped) AS (
	SELECT e.src, e.dst, ARRAY[e.src, e.dst], e.src = e.dst FROM edge e
	UNION ALL
	SELECT w.start, e.dst, w.path || e.dst, e.dst = w.start
	  FROM walk w JOIN edge e ON e.src = w.node
	 WHERE NOT w.looped AND e.dst <> ALL (w.path[2:])
)
SELECT array_to_string(path::regclass[], ' -> ') AS foreign_key_cycle
  FROM walk WHERE looped
 ORDER BY 1;

-- the rotation links are still foreign keys, with the same actions
SELECT c.conrelid::regclass AS tab, a.attname AS col, c.confrelid::regclass AS refs,
	   c.confdeltype AS on_delete
  FROM pg_constraint c
  JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
 WHERE c.contype = 'f' AND c.conrelid = 'apikey.key_lineage'::regclass
 ORDER BY a.attnum;
