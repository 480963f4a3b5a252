--
-- binding_forgery: apikey.binding can be set only by authenticate() and
-- cleared only by logout() / DISCARD ALL.  Every other way to bind, change,
-- clear or read it is refused, for an unprivileged role, for a role granted
-- SET on the parameter, and for a superuser; and each attempt leaves the
-- binding as it was.  (Connection options are in t/011.)
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
SELECT key_id AS ka, token AS ta FROM apikey.issue(owner => 'acme', scopes => '{orders:read}') \gset
SELECT key_id AS kb, token AS tb FROM apikey.issue(owner => 'globex', scopes => '{orders:*}') \gset
-- what the attacker would like the binding to say: globex's key, all scopes,
-- a session binding checked in the current transaction; well-formed, with
-- the key's real hash, so only the check hook stands in the way
SELECT 's:1:' || id || ':' || encode(hash, 'hex') || '/6:globex/8:orders:*' AS forged
  FROM apikey.keys WHERE id = :kb \gset

CREATE ROLE regress_forgery_attacker;
CREATE ROLE regress_forgery_other;
GRANT regress_forgery_other TO regress_forgery_attacker;
CREATE ROLE regress_forgery_granted;
CREATE SCHEMA regress_forgery_evil AUTHORIZATION regress_forgery_attacker;

-- A multi-tenant table the attacker may read through its key.
CREATE TABLE forgery_orders (tenant text NOT NULL, id int PRIMARY KEY, item text);
INSERT INTO forgery_orders VALUES ('acme', 1, 'anvil'), ('globex', 2, 'laser'), ('globex', 3, 'magnet');
ALTER TABLE forgery_orders ENABLE ROW LEVEL SECURITY;
ALTER TABLE forgery_orders FORCE ROW LEVEL SECURITY;
CREATE POLICY forgery_orders_read ON forgery_orders FOR SELECT
	USING (tenant = apikey.current_owner() AND apikey.has_scope('orders:read'));
GRANT SELECT ON forgery_orders TO PUBLIC;

CREATE VIEW bound AS
SELECT apikey.current_owner() AS owner,
       apikey.current_key_id() = :ka AS is_key_a,
       apikey.has_scope('orders:write') AS writes;
GRANT SELECT ON bound TO PUBLIC;
-- What the caller's row-level policy lets it see (superusers bypass RLS, so
-- this is only shown for the unprivileged roles).
CREATE VIEW visible WITH (security_invoker = true) AS
SELECT string_agg(item, ',' ORDER BY id) AS items FROM forgery_orders;
GRANT SELECT ON visible TO PUBLIC;

-- Run a statement and print only whether it was refused, and its SQLSTATE,
-- so the outcome does not depend on the exact wording of the error.
CREATE FUNCTION try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE stmt;
	RETURN 'accepted';
EXCEPTION WHEN OTHERS THEN
	RETURN 'refused ' || SQLSTATE;
END
$$;
GRANT EXECUTE ON FUNCTION try(text) TO PUBLIC;

--
-- An unprivileged role that holds acme's key and wants to be globex.
--
SET SESSION AUTHORIZATION regress_forgery_attacker;
SELECT apikey.authenticate(:'ta', session => true) = :ka AS a_session;
SELECT * FROM bound, visible;

-- It cannot read the raw binding (42501; the wording changed in 16).
\set VERBOSITY sqlstate
SHOW apikey.binding;
SELECT current_setting('apikey.binding');
SELECT current_setting('apikey.binding', true);
\set VERBOSITY default
SELECT count(*) AS visible_in_pg_settings FROM pg_settings WHERE name = 'apikey.binding';

-- SET, SET LOCAL, set_config(), RESET, SET TO DEFAULT: all refused.
SET apikey.binding = :'forged';
SET apikey.binding = '';
BEGIN;
SET LOCAL apikey.binding = :'forged';
ROLLBACK;
SELECT set_config('apikey.binding', :'forged', false);
SELECT set_config('apikey.binding', :'forged', true);
SELECT set_config('apikey.binding', '', false);
SELECT set_config('apikey.binding', NULL, false);
RESET apikey.binding;
SET apikey.binding TO DEFAULT;
SELECT * FROM bound, visible;

-- RESET ALL leaves it alone.
RESET ALL;
SELECT * FROM bound, visible;

-- Per-role and per-database settings.
ALTER ROLE regress_forgery_attacker SET apikey.binding = :'forged';
ALTER ROLE regress_forgery_attacker IN DATABASE :"DBNAME" SET apikey.binding = :'forged';
ALTER DATABASE :"DBNAME" SET apikey.binding = :'forged';
SELECT * FROM bound, visible;

-- SECURITY DEFINER functions of its own: a SET clause is refused when the
-- function is created; set_config() inside it is refused when it runs.
CREATE FUNCTION regress_forgery_evil.become_globex() RETURNS text
	LANGUAGE sql SECURITY DEFINER SET apikey.binding = :'forged'
	AS 'SELECT apikey.current_owner()';
\set VERBOSITY sqlstate
CREATE FUNCTION regress_forgery_evil.keep_binding() RETURNS text
	LANGUAGE sql SECURITY DEFINER SET apikey.binding FROM CURRENT
	AS 'SELECT apikey.current_owner()';
\set VERBOSITY default
CREATE FUNCTION regress_forgery_evil.set_inside(v text) RETURNS text
	LANGUAGE plpgsql SECURITY DEFINER
	AS $$ BEGIN PERFORM set_config('apikey.binding', v, false); RETURN apikey.current_owner(); END $$;
SELECT regress_forgery_evil.set_inside(:'forged');
SELECT regress_forgery_evil.set_inside('');
SELECT * FROM bound, visible;

-- SET ROLE and RESET ROLE change the role, not the binding.
SET ROLE regress_forgery_other;
SELECT current_user, * FROM bound, visible;
RESET ROLE;
SELECT current_user, * FROM bound, visible;

-- Look-alike helpers ahead of apikey on the search_path: an unqualified
-- call in the attacker's own query finds them, but the policy (and view)
-- were bound to apikey's functions when they were created.
CREATE FUNCTION regress_forgery_evil.current_owner() RETURNS text
	LANGUAGE sql AS $$ SELECT 'globex'::text $$;
CREATE FUNCTION regress_forgery_evil.has_scope(text) RETURNS boolean
	LANGUAGE sql AS $$ SELECT true $$;
CREATE FUNCTION regress_forgery_evil.current_key_id() RETURNS bigint
	LANGUAGE sql AS $$ SELECT 0::bigint $$;
SET search_path = regress_forgery_evil, apikey, public;
SELECT current_owner() AS unqualified_call;
SELECT * FROM bound, visible;
SELECT tenant, id, item FROM forgery_orders ORDER BY id;
RESET search_path;

-- Failed attempts inside a transaction binding leave that binding alone too,
-- and the session binding comes back after it.
BEGIN;
SELECT apikey.authenticate(:'ta') = :ka AS a;
SELECT try(format('SET LOCAL apikey.binding = %L', :'forged')) AS set_local;
SELECT try('RESET apikey.binding') AS reset;
SELECT try(format('SELECT set_config(%L, %L, true)', 'apikey.binding', :'forged')) AS set_config_local;
SELECT * FROM bound, visible;
COMMIT;
SELECT * FROM bound, visible;

-- Its own logout() does end its own binding.
SELECT apikey.logout();
SELECT * FROM bound, visible;
-- ... and with nothing bound, every path still fails to bind.
SELECT try(format('SET apikey.binding = %L', :'forged')) AS set;
SELECT try(format('SELECT set_config(%L, %L, false)', 'apikey.binding', :'forged')) AS set_config;
SELECT * FROM bound, visible;
RESET SESSION AUTHORIZATION;

--
-- A role granted SET on the parameter passes the privilege check, and is
-- still refused: only authenticate() and logout() may change the binding.
--
GRANT SET ON PARAMETER apikey.binding TO regress_forgery_granted;
SET SESSION AUTHORIZATION regress_forgery_granted;
SELECT apikey.authenticate(:'ta', session => true) = :ka AS a_session;
SELECT try(format('SET apikey.binding = %L', :'forged')) AS set;
SELECT try(format('SET apikey.binding = %L', '')) AS set_empty;
SELECT try(format('SELECT set_config(%L, %L, false)', 'apikey.binding', :'forged')) AS set_config;
SELECT * FROM bound, visible;
-- (each attempt starts from a fresh session binding)
SELECT try('RESET apikey.binding') AS reset;
SELECT * FROM bound, visible;
SELECT apikey.authenticate(:'ta', session => true) = :ka AS a_session;
SELECT try('SET apikey.binding TO DEFAULT') AS set_default;
SELECT * FROM bound, visible;
SELECT apikey.authenticate(:'ta', session => true) = :ka AS a_session;
-- refused on every release: 42501 on 15 (no privilege), 0A000 on 16+ (GUC_NO_RESET)
SELECT try('SELECT set_config(''apikey.binding'', NULL, false)') IN ('refused 42501', 'refused 0A000') AS set_config_null_refused;
SELECT * FROM bound, visible;
SELECT try(format('ALTER ROLE regress_forgery_granted SET apikey.binding = %L', :'forged')) AS alter_role;
SELECT apikey.logout();
RESET SESSION AUTHORIZATION;
REVOKE SET ON PARAMETER apikey.binding FROM regress_forgery_granted;

--
-- A superuser is refused too (SET, set_config, ALTER ROLE/DATABASE/SYSTEM,
-- function SET clauses); only reading the binding is allowed to it.
--
SELECT apikey.authenticate(:'ta', session => true) = :ka AS a_session;
SELECT current_setting('apikey.binding') ~ ('^s:[0-9]+:' || :ka || ':[0-9a-f]{64}/4:acme/11:orders:read$') AS superuser_reads;
SET apikey.binding = :'forged';
SELECT set_config('apikey.binding', :'forged', false);
BEGIN;
SELECT set_config('apikey.binding', '', true);
ROLLBACK;
ALTER ROLE regress_forgery_attacker SET apikey.binding = :'forged';
ALTER ROLE regress_forgery_attacker SET apikey.binding = '';
ALTER DATABASE :"DBNAME" SET apikey.binding = :'forged';
ALTER SYSTEM SET apikey.binding = :'forged';
CREATE FUNCTION forgery_definer() RETURNS text
	LANGUAGE sql SECURITY DEFINER SET apikey.binding = :'forged'
	AS 'SELECT apikey.current_owner()';
CREATE FUNCTION forgery_definer() RETURNS text
	LANGUAGE sql SECURITY DEFINER SET apikey.binding FROM CURRENT
	AS 'SELECT apikey.current_owner()';
SELECT count(*) AS role_or_db_settings FROM pg_db_role_setting
 WHERE array_to_string(setconfig, ',') LIKE '%apikey.binding%';
SELECT * FROM bound;
-- Nor can a superuser clear it other than through logout() / DISCARD ALL.
-- (each attempt starts from a fresh session binding)
SELECT try('RESET apikey.binding') AS reset;
SELECT * FROM bound;
SELECT apikey.authenticate(:'ta', session => true) = :ka AS a_session;
SELECT try('SET apikey.binding TO DEFAULT') AS set_default;
SELECT * FROM bound;
SELECT apikey.authenticate(:'ta', session => true) = :ka AS a_session;
-- Known limit on PostgreSQL 15: set_config(..., NULL) resets without any
-- hook apikey can use, so a superuser can clear (never forge) a binding
-- this way.  16+ refuses it with GUC_NO_RESET.  The README says so.
SELECT try('SELECT set_config(''apikey.binding'', NULL, false)') =
	CASE WHEN current_setting('server_version_num')::int >= 160000 THEN 'refused 0A000' ELSE 'accepted' END
	AS set_config_null_as_documented;
SELECT (owner IS NULL) = (current_setting('server_version_num')::int < 160000) AS cleared_only_on_15 FROM bound;
SELECT apikey.logout();
BEGIN;
SELECT apikey.authenticate(:'ta') = :ka AS a;
SELECT try('RESET apikey.binding') AS reset_in_transaction;
SELECT * FROM bound;
COMMIT;
SELECT apikey.logout();

--
-- An owner or scope that contains the binding's separators cannot smuggle
-- in extra scopes: each field is length-prefixed.
--
SELECT key_id AS kx, token AS tx FROM apikey.issue(owner => 'x/8:orders:*', scopes => '{orders:read}') \gset
SELECT key_id AS ky, token AS ty FROM apikey.issue(owner => '12/3:abc') \gset
SELECT key_id AS kz, token AS tz FROM apikey.issue(owner => repeat('é', 500) || ' :/') \gset
BEGIN;
SELECT apikey.authenticate(:'tx') = :kx AS x;
SELECT apikey.current_owner(), apikey.current_key_id() = :kx AS key_ok,
       apikey.has_scope('orders:read') AS reads, apikey.has_scope('orders:write') AS writes;
SELECT apikey.authenticate(:'ty') = :ky AS y;
SELECT apikey.current_owner(), apikey.current_key_id() = :ky AS key_ok,
       apikey.has_scope('abc') AS abc;
SELECT apikey.authenticate(:'tz') = :kz AS z;
SELECT apikey.current_owner() = repeat('é', 500) || ' :/' AS long_owner_ok;
COMMIT;

DROP VIEW bound;
DROP VIEW visible;
DROP TABLE forgery_orders;
DROP FUNCTION try(text);
SET client_min_messages = warning;
DROP SCHEMA regress_forgery_evil CASCADE;
RESET client_min_messages;
DROP ROLE regress_forgery_attacker;
DROP ROLE regress_forgery_other;
DROP ROLE regress_forgery_granted;
