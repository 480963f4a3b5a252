-- Least privilege: what an ordinary role and an administrator role may do,
-- and SECURITY DEFINER functions that a hostile search_path cannot subvert.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

CREATE ROLE regress_core_privileges_user;
CREATE ROLE regress_core_privileges_admin;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
SELECT key_id AS k1, token AS t1 FROM apikey.issue('acme', '{orders:read}') \gset
SELECT key_id AS k2, token AS t2 FROM apikey.issue('acme', '{orders:read}', expires_at => now() + interval '1 hour') \gset
UPDATE apikey.keys SET expires_at = now() - interval '1 second' WHERE id = :k2;
BEGIN;
SELECT token AS t_unknown FROM apikey.issue('ghost') \gset
ROLLBACK;

-------------------------------------------------------------------------------
-- The catalog view of privileges for an ordinary role.
-------------------------------------------------------------------------------
-- Functions it may execute: only the verification API.
SELECT p.oid::regprocedure AS executable_function
  FROM pg_proc p WHERE p.pronamespace = 'apikey'::regnamespace
   AND has_function_privilege('regress_core_privileges_user', p.oid, 'EXECUTE')
 ORDER BY p.oid::regprocedure::text COLLATE "C";
-- ... and not these, among others.
SELECT f AS denied_function, has_function_privilege('regress_core_privileges_user', f, 'EXECUTE') AS can_execute
  FROM unnest(ARRAY['apikey.issue(text, text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[])',
                    'apikey.revoke(bigint, text)', 'apikey.revoke_token(text, text)', 'apikey.rotate(bigint, interval)',
                    'apikey.revoke_owner(text, text)',
                    'apikey.set_limits(bigint, integer, interval, bigint, interval, cidr[])',
                    'apikey.flush_usage()', 'apikey._new_token(text)', 'apikey._token_hash(text)',
                    'apikey._check_scopes(text[])', 'apikey._acting_role()', 'apikey._stats()',
                    'apikey._live_usage()']) AS f;
-- Tables, views and sequences: no privilege at all on any of them.
SELECT count(*) >= 10 AS relations_checked,
       count(*) FILTER (WHERE
           has_table_privilege('regress_core_privileges_user', c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')
        OR has_any_column_privilege('regress_core_privileges_user', c.oid, 'SELECT, INSERT, UPDATE, REFERENCES')
        OR (c.relkind = 'S' AND has_sequence_privilege('regress_core_privileges_user', c.oid, 'USAGE, SELECT, UPDATE')))
         AS relations_with_any_privilege
  FROM pg_class c WHERE c.relnamespace = 'apikey'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'S', 'p', 'f');
SELECT has_schema_privilege('regress_core_privileges_user', 'apikey', 'USAGE') AS schema_usage,
       has_schema_privilege('regress_core_privileges_user', 'apikey', 'CREATE') AS schema_create;

-- Every SECURITY DEFINER function pins search_path to pg_catalog, pg_temp.
SELECT count(*) >= 7 AS definer_functions_checked,
       count(*) FILTER (WHERE NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false))
         AS definer_functions_without_pinned_search_path
  FROM pg_proc p WHERE p.pronamespace = 'apikey'::regnamespace AND p.prosecdef;
SELECT p.oid::regprocedure AS unpinned_definer_function, p.proconfig
  FROM pg_proc p WHERE p.pronamespace = 'apikey'::regnamespace AND p.prosecdef
   AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false);
-- The ones this file relies on are among them.
SELECT f AS function, (SELECT p.prosecdef FROM pg_proc p WHERE p.oid = f::regprocedure) AS security_definer
  FROM unnest(ARRAY['apikey.issue(text, text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[])',
                    'apikey.revoke(bigint, text)', 'apikey.revoke_token(text, text)', 'apikey.rotate(bigint, interval)',
                    'apikey.revoke_owner(text, text)',
                    'apikey.set_limits(bigint, integer, interval, bigint, interval, cidr[])']) AS f;
-- No SECURITY DEFINER function is executable by PUBLIC.
SELECT count(*) AS public_definer_functions
  FROM pg_proc p WHERE p.pronamespace = 'apikey'::regnamespace AND p.prosecdef
   AND has_function_privilege('regress_core_privileges_user', p.oid, 'EXECUTE');

-------------------------------------------------------------------------------
-- An ordinary role in practice.
-------------------------------------------------------------------------------
SET ROLE regress_core_privileges_user;
SELECT apikey.verify(:'t1') AS verify, apikey.verify(:'t1', 'orders:read') AS verify_scope,
       (apikey.check(:'t1', 'orders:write')).code AS check_scope,
       (apikey.check(:'t2')).code AS check_expired,
       (apikey.check(:'t_unknown')).code AS check_unknown,
       apikey.hash(:'t1') = apikey.hash(:'t1') AS hash;
-- Reading any table or view is denied, including the hashes.
SELECT count(*) FROM apikey.keys;
\echo :SQLSTATE
SELECT hash FROM apikey.keys;
\echo :SQLSTATE
SELECT id FROM apikey.keys;
\echo :SQLSTATE
SELECT count(*) FROM apikey.key_scopes;
\echo :SQLSTATE
SELECT count(*) FROM apikey.scopes;
\echo :SQLSTATE
SELECT count(*) FROM apikey.revocations;
\echo :SQLSTATE
SELECT count(*) FROM apikey.quotas;
\echo :SQLSTATE
SELECT count(*) FROM apikey.usage_log;
\echo :SQLSTATE
SELECT count(*) FROM apikey.key_usage;
\echo :SQLSTATE
SELECT count(*) FROM apikey.stats;
\echo :SQLSTATE
SELECT count(*) FROM apikey.live_usage;
\echo :SQLSTATE
-- Writing any table is denied.
INSERT INTO apikey.keys (owner, prefix, hint, hash, created_by)
	VALUES ('mallory', 'ak', 'ak_...xxxx', apikey.hash('x'), current_user);
\echo :SQLSTATE
UPDATE apikey.keys SET expires_at = NULL;
\echo :SQLSTATE
DELETE FROM apikey.keys;
\echo :SQLSTATE
TRUNCATE apikey.keys;
\echo :SQLSTATE
INSERT INTO apikey.key_scopes VALUES (:k1, 'orders:write');
\echo :SQLSTATE
DELETE FROM apikey.key_scopes;
\echo :SQLSTATE
INSERT INTO apikey.scopes VALUES ('admin:all');
\echo :SQLSTATE
DELETE FROM apikey.revocations;
\echo :SQLSTATE
INSERT INTO apikey.revocations (key_id, revoked_by) VALUES (:k1, current_user);
\echo :SQLSTATE
UPDATE apikey.quotas SET remaining = 1000000;
\echo :SQLSTATE
INSERT INTO apikey.usage_log VALUES (NULL, now(), 'valid', NULL, 1);
\echo :SQLSTATE
DELETE FROM apikey.usage_log;
\echo :SQLSTATE
SELECT nextval('apikey.keys_id_seq');
\echo :SQLSTATE
CREATE TABLE apikey.mine (x int);
\echo :SQLSTATE
DROP TABLE apikey.keys;
\echo :SQLSTATE
-- Administration and internal functions are denied.
SELECT * FROM apikey.issue('mallory', '{orders:read}');
\echo :SQLSTATE
SELECT apikey.revoke(:k1);
\echo :SQLSTATE
SELECT apikey.revoke_token(:'t1');
\echo :SQLSTATE
SELECT * FROM apikey.rotate(:k1);
\echo :SQLSTATE
SELECT apikey.set_limits(:k1);
\echo :SQLSTATE
SELECT apikey.revoke_owner('acme');
\echo :SQLSTATE
SELECT apikey.flush_usage();
\echo :SQLSTATE
SELECT * FROM apikey._new_token('ak');
\echo :SQLSTATE
SELECT apikey._token_hash(:'t1');
\echo :SQLSTATE
SELECT apikey._check_scopes('{orders:read}');
\echo :SQLSTATE
SELECT apikey._acting_role();
\echo :SQLSTATE
SELECT * FROM apikey._stats();
\echo :SQLSTATE
SELECT * FROM apikey._live_usage();
\echo :SQLSTATE
RESET ROLE;
-- None of that changed anything.
SELECT count(*) AS keys, (SELECT count(*) FROM apikey.revocations) AS revocations,
       (SELECT count(*) FROM apikey.key_scopes) AS key_scopes
  FROM apikey.keys;
SELECT (apikey.check(:'t1', 'orders:read')).code AS t1;

-------------------------------------------------------------------------------
-- An administrator role with the grants the README recommends.
-------------------------------------------------------------------------------
GRANT EXECUTE ON FUNCTION
	apikey.issue(text, text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[]),
	apikey.revoke(bigint, text), apikey.revoke_token(text, text),
	apikey.rotate(bigint, interval), apikey.revoke_owner(text, text),
	apikey.set_limits(bigint, integer, interval, bigint, interval, cidr[])
	TO regress_core_privileges_admin;
GRANT SELECT (id, owner, name, prefix, hint, created_at, created_by, expires_at, metadata,
			  last_used_at, rate_limit, rate_window, quota, quota_refill,
			  allowed_cidrs) ON apikey.keys TO regress_core_privileges_admin;
GRANT SELECT ON apikey.key_scopes, apikey.revocations, apikey.quotas, apikey.key_status,
	apikey.key_lineage TO regress_core_privileges_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON apikey.scopes TO regress_core_privileges_admin;

SET ROLE regress_core_privileges_admin;
INSERT INTO apikey.scopes (name) VALUES ('billing:read');
SELECT key_id AS k3, token AS t3 FROM apikey.issue('acme', '{orders:read, billing:read}', name => 'by admin') \gset
SELECT k.owner, k.name, k.created_by, k.hint = 'ak_...' || right(:'t3', 4) AS hint_ok
  FROM apikey.keys k WHERE k.id = :k3;
SELECT scope FROM apikey.key_scopes WHERE key_id = :k3 ORDER BY scope COLLATE "C";
SELECT apikey.set_limits(:k3, quota => 10);
SELECT r_id AS k4, r_token AS t4 FROM apikey.rotate(:k3) AS r(r_id, r_token) \gset
SELECT apikey.revoke(:k3, 'rotated') AS revoked_old;
SELECT apikey.revoke_token(:'t1', 'leaked') AS revoked_t1;
SELECT r.key_id = :k3 AS k3, r.revoked_by FROM apikey.revocations r WHERE r.key_id = :k3;
SELECT (apikey.check(:'t3')).code AS old, (apikey.check(:'t4', 'billing:read')).code AS new,
       (apikey.check(:'t1')).code AS t1;
SELECT s.status, s.revoked_reason, s.scopes FROM apikey.key_status s WHERE s.key_id = :k3;
SELECT key_id AS k_owner FROM apikey.issue('initech') \gset
SELECT apikey.revoke_owner('initech', 'incident') AS revoked_for_owner;
SELECT s.status FROM apikey.key_status s WHERE s.key_id = :k_owner;
-- Still no hashes, and no direct writes.
SELECT hash FROM apikey.keys;
\echo :SQLSTATE
SELECT * FROM apikey.keys;
\echo :SQLSTATE
SELECT count(*) FROM apikey.keys WHERE hash IS NOT NULL;
\echo :SQLSTATE
SELECT count(*) FROM apikey.keys k WHERE k.id = :k4 AND k::text <> '';
\echo :SQLSTATE
INSERT INTO apikey.keys (owner, prefix, hint, hash, created_by)
	VALUES ('mallory', 'ak', 'ak_...xxxx', apikey.hash('x'), current_user);
\echo :SQLSTATE
UPDATE apikey.keys SET expires_at = NULL WHERE id = :k2;
\echo :SQLSTATE
DELETE FROM apikey.revocations;
\echo :SQLSTATE
SELECT * FROM apikey._new_token('ak');
\echo :SQLSTATE
SELECT apikey.flush_usage();
\echo :SQLSTATE
SELECT count(*) FROM apikey.usage_log;
\echo :SQLSTATE
RESET ROLE;

-------------------------------------------------------------------------------
-- A hostile search_path: an ordinary role creates look-alikes of functions
-- and operators the extension uses, each raising if it is ever called, and
-- puts them before pg_catalog.
-------------------------------------------------------------------------------
SELECT key_id AS k5, token AS t5 FROM apikey.issue('hooli', '{orders:read}') \gset
SELECT key_id AS k6, token AS t6 FROM apikey.issue('hooli', '{orders:read}', quota => 100) \gset
-- Baseline, with the normal search_path.
SET ROLE regress_core_privileges_user;
SELECT apikey.verify(:'t5') AS t5, apikey.verify(:'t5', 'orders:read') AS t5_scope,
       apikey.verify(:'t5', 'orders:write') AS t5_other_scope, apikey.verify(:'t6') AS t6_quota,
       apikey.verify(:'t_unknown') AS unknown, apikey.verify(:'t2') AS expired,
       apikey.verify(:'t1') AS revoked, apikey.verify('garbage') AS garbage;
SELECT (apikey.check(:'t5', 'orders:write', '203.0.113.7')).code AS t5,
       (apikey.check(:'t6', 'orders:read')).code AS t6_quota, (apikey.check(:'t2')).code AS t2,
       (apikey.check(:'t_unknown')).code AS unknown, (apikey.check(:'t1')).code AS t1,
       (apikey.check(:'t6')).remaining AS t6_remaining;
RESET ROLE;
DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO regress_core_privileges_user', current_database()); END $$;
SET ROLE regress_core_privileges_user;
CREATE SCHEMA regress_core_privileges_evil;
GRANT USAGE ON SCHEMA regress_core_privileges_evil TO PUBLIC;
SET search_path = regress_core_privileges_evil, pg_catalog, public;
CREATE FUNCTION trap(what text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
	RAISE EXCEPTION 'trap % called as %', what, current_user;
END $$;
CREATE FUNCTION now() RETURNS timestamptz LANGUAGE plpgsql AS $$
BEGIN
	PERFORM regress_core_privileges_evil.trap('now()');
	RETURN '2000-01-01';
END $$;
CREATE FUNCTION starts_with(text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT regress_core_privileges_evil.trap('starts_with') $$;
CREATE FUNCTION btrim(text) RETURNS text LANGUAGE sql AS $$ SELECT regress_core_privileges_evil.trap('btrim')::text $$;
CREATE FUNCTION "left"(text, integer) RETURNS text LANGUAGE sql AS $$ SELECT regress_core_privileges_evil.trap('left')::text $$;
CREATE FUNCTION jsonb_typeof(jsonb) RETURNS text LANGUAGE sql AS $$ SELECT regress_core_privileges_evil.trap('jsonb_typeof')::text $$;
CREATE FUNCTION octet_length(bytea) RETURNS integer LANGUAGE sql AS $$ SELECT regress_core_privileges_evil.trap('octet_length')::int $$;
CREATE FUNCTION unnest(text[]) RETURNS SETOF text LANGUAGE sql AS $$ SELECT regress_core_privileges_evil.trap('unnest')::text $$;
CREATE FUNCTION eq_bytea(bytea, bytea) RETURNS boolean LANGUAGE sql AS $$ SELECT regress_core_privileges_evil.trap('= bytea') $$;
CREATE OPERATOR = (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = eq_bytea);
CREATE FUNCTION eq_text(text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT regress_core_privileges_evil.trap('= text') $$;
CREATE OPERATOR = (LEFTARG = text, RIGHTARG = text, FUNCTION = eq_text);
CREATE OPERATOR <> (LEFTARG = text, RIGHTARG = text, FUNCTION = eq_text);
CREATE OPERATOR ~~ (LEFTARG = text, RIGHTARG = text, FUNCTION = eq_text);
CREATE FUNCTION eq_int8(bigint, bigint) RETURNS boolean LANGUAGE sql AS $$ SELECT regress_core_privileges_evil.trap('= bigint') $$;
CREATE OPERATOR = (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = eq_int8);
CREATE FUNCTION le_tstz(timestamptz, timestamptz) RETURNS boolean LANGUAGE sql AS $$ SELECT regress_core_privileges_evil.trap('<= timestamptz') $$;
CREATE OPERATOR <= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = le_tstz);
CREATE FUNCTION lt_interval(interval, interval) RETURNS boolean LANGUAGE sql AS $$ SELECT regress_core_privileges_evil.trap('< interval') $$;
CREATE OPERATOR < (LEFTARG = interval, RIGHTARG = interval, FUNCTION = lt_interval);
CREATE FUNCTION plus_int8(bigint, bigint) RETURNS bigint LANGUAGE sql AS $$ SELECT regress_core_privileges_evil.trap('+ bigint')::int::bigint $$;
CREATE OPERATOR + (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = plus_int8);
CREATE FUNCTION cat_arr(text[], text) RETURNS text[] LANGUAGE sql AS $$ SELECT ARRAY[regress_core_privileges_evil.trap('||')::text] $$;
CREATE OPERATOR || (LEFTARG = text[], RIGHTARG = text, FUNCTION = cat_arr);
-- The traps work (run one on purpose).
SELECT now();
-- Verification under the hostile path: same verdicts as before, no trap sprung.
SELECT apikey.verify(:'t5') AS t5, apikey.verify(:'t5', 'orders:read') AS t5_scope,
       apikey.verify(:'t5', 'orders:write') AS t5_other_scope, apikey.verify(:'t6') AS t6_quota,
       apikey.verify(:'t_unknown') AS unknown, apikey.verify(:'t2') AS expired,
       apikey.verify(:'t1') AS revoked, apikey.verify('garbage') AS garbage;
SELECT (apikey.check(:'t5', 'orders:write', '203.0.113.7')).code AS t5,
       (apikey.check(:'t6', 'orders:read')).code AS t6_quota, (apikey.check(:'t2')).code AS t2,
       (apikey.check(:'t_unknown')).code AS unknown, (apikey.check(:'t1')).code AS t1,
       (apikey.check(:'t6')).remaining AS t6_remaining;
RESET ROLE;

-- The administrator under the same hostile path.
SET ROLE regress_core_privileges_admin;
SET search_path = regress_core_privileges_evil, pg_catalog, public;
SELECT count(*) AS issued FROM apikey.issue('acme', '{orders:*}', expires_at => '2999-01-01', metadata => '{"a": 1}');
SELECT count(*) FROM apikey.issue('acme', '{nomatch:*}');
SELECT count(*) FROM apikey.issue('acme', '{nope}');
SELECT count(*) FROM apikey.issue('   ');
SELECT count(*) FROM apikey.issue('acme', expires_at => '2000-01-01');
SELECT count(*) FROM apikey.issue('acme', metadata => '[]');
SELECT apikey.revoke_token(:'t_unknown');
SELECT r_id IS NOT NULL AS rotated FROM apikey.rotate(:k4, '1 hour') AS r(r_id, r_token);
SELECT apikey.set_limits(:k4, quota => 5);
SELECT apikey.revoke(:k4) AS revoked;
SELECT apikey.revoke_owner('hooli') AS revoked_for_owner;
RESET search_path;
RESET ROLE;
SELECT (apikey.check(:'t4')).code AS t4, (apikey.check(:'t5')).code AS t5;
SELECT k.metadata, k.expires_at AT TIME ZONE 'UTC' AS expires_utc,
       ARRAY(SELECT ks.scope FROM apikey.key_scopes ks WHERE ks.key_id = k.id) AS scopes
  FROM apikey.keys k WHERE k.metadata ? 'a';

SET client_min_messages = warning;
DROP SCHEMA regress_core_privileges_evil CASCADE;
RESET client_min_messages;
DO $$ BEGIN EXECUTE format('REVOKE CREATE ON DATABASE %I FROM regress_core_privileges_user', current_database()); END $$;
DROP OWNED BY regress_core_privileges_user, regress_core_privileges_admin;
DROP ROLE regress_core_privileges_user, regress_core_privileges_admin;
