--
-- security_schema: apikey's schema cannot be prepared, or later taken over,
-- by a role that is not a superuser.
--
-- CREATE EXTENSION uses an existing schema named apikey.  Before the fix a
-- role with CREATE on the database could create that schema first, let a
-- superuser install apikey into it, then rename it and put look-alike
-- tables under the old name: the C code, which found its tables by name,
-- bound made-up tokens as any tenant with every scope.
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
DROP SCHEMA IF EXISTS apikey CASCADE;
RESET client_min_messages;

-- the errors come from the install script; where it stood is no matter
\set SHOW_CONTEXT never
CREATE ROLE regress_squatter;
SELECT current_database() AS db \gset
GRANT CREATE ON DATABASE :"db" TO regress_squatter;

-- A schema prepared by a non-superuser is refused.
SET ROLE regress_squatter;
CREATE SCHEMA apikey;
RESET ROLE;
CREATE EXTENSION apikey;
SELECT count(*) AS installed FROM pg_extension WHERE extname = 'apikey';
DROP SCHEMA apikey;

-- So is a superuser's schema that others may create objects in ...
CREATE SCHEMA apikey;
GRANT CREATE ON SCHEMA apikey TO regress_squatter;
CREATE EXTENSION apikey;
REVOKE CREATE ON SCHEMA apikey FROM regress_squatter;

-- ... or one that is not empty.
CREATE TABLE apikey.keys (id bigint);
CREATE EXTENSION apikey;
DROP TABLE apikey.keys;

-- An empty schema of a superuser's is fine.
CREATE EXTENSION apikey;
SELECT count(*) AS installed FROM pg_extension WHERE extname = 'apikey';

INSERT INTO apikey.scopes (name) VALUES ('orders:read');
SELECT key_id AS k, token AS t FROM apikey.issue(owner => 'acme', scopes => '{orders:read}') \gset
SELECT code, owner FROM apikey.check(:'t', 'orders:read');

-- Handing the schema to a non-superuser later stops verification (fail
-- closed) until a superuser owns it again.
ALTER SCHEMA apikey OWNER TO regress_squatter;
SELECT code FROM apikey.check(:'t', 'orders:read');
SELECT apikey.authenticate(:'t');
ALTER SCHEMA apikey OWNER TO CURRENT_USER;
SELECT code FROM apikey.check(:'t', 'orders:read');

SET client_min_messages = warning;
DROP EXTENSION apikey CASCADE;
DROP SCHEMA apikey;
CREATE EXTENSION apikey;
RESET client_min_messages;
SELECT current_database() AS db \gset
REVOKE CREATE ON DATABASE :"db" FROM regress_squatter;
DROP ROLE regress_squatter;
