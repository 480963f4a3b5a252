--
-- binding_session_forbidden: apikey.allow_session_binding = off (set for a
-- role by a superuser, as for the role a transaction-mode pooler connects
-- as) refuses authenticate(..., session => true) with 42501 and binds
-- nothing, before the token is verified; transaction bindings still work.
-- The setting is superuser-only, so the restricted role cannot lift it.
-- Other roles keep session bindings (the default is on).
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
DROP ROLE IF EXISTS regress_pooled;
DROP ROLE IF EXISTS regress_direct;
RESET client_min_messages;

SELECT current_user AS su \gset
SELECT key_id AS k, token AS t FROM apikey.issue('acme') \gset
SELECT setting, context, boot_val FROM pg_settings WHERE name = 'apikey.allow_session_binding';

CREATE ROLE regress_pooled LOGIN;
CREATE ROLE regress_direct LOGIN;
ALTER ROLE regress_pooled SET apikey.allow_session_binding = off;
-- only a superuser may set it for a role: not even a role with CREATEROLE
-- (with the ADMIN option on the role, which PostgreSQL 16 and later require
-- to alter it at all)
CREATE ROLE regress_admin CREATEROLE;
GRANT regress_direct TO regress_admin WITH ADMIN OPTION;
SET ROLE regress_admin;
ALTER ROLE regress_direct SET apikey.allow_session_binding = off;
RESET ROLE;
DROP ROLE regress_admin;

-- the restricted role: its session binding is refused, nothing is bound
\c - regress_pooled
SHOW apikey.allow_session_binding;
SELECT apikey.authenticate(:'t', session => true);
\echo :LAST_ERROR_SQLSTATE
SELECT apikey.current_key_id() IS NULL AS nothing_bound;
BEGIN;
SELECT apikey.authenticate(:'t', session => true);
ROLLBACK;
-- a transaction binding works, and ends with its transaction
BEGIN;
SELECT apikey.authenticate(:'t') = :k AS authenticated, apikey.current_owner();
COMMIT;
SELECT apikey.current_key_id() IS NULL AS nothing_bound;
SELECT apikey.authenticate(:'t', session => false) = :k AS session_false_is_a_transaction_binding;

-- ... and it cannot lift the setting itself
SET apikey.allow_session_binding = on;
BEGIN;
SET LOCAL apikey.allow_session_binding = on;
ROLLBACK;
SELECT set_config('apikey.allow_session_binding', 'on', false);
RESET apikey.allow_session_binding;
SET apikey.allow_session_binding TO DEFAULT;
RESET ALL;
ALTER ROLE regress_pooled SET apikey.allow_session_binding = on;
ALTER ROLE regress_pooled RESET apikey.allow_session_binding;
CREATE FUNCTION pg_temp.lift() RETURNS bigint LANGUAGE sql
  SET apikey.allow_session_binding = on
  AS $$ SELECT apikey.authenticate('x', session => true) $$;
SHOW apikey.allow_session_binding;
SELECT apikey.authenticate(:'t', session => true);
SELECT apikey.current_key_id() IS NULL AS nothing_bound;

-- another role keeps session bindings
\c - regress_direct
SHOW apikey.allow_session_binding;
SELECT apikey.authenticate(:'t', session => true) = :k AS session_bound;
SELECT apikey.current_owner() AS next_transaction_sees;
SELECT apikey.logout();

-- a refused call verified nothing: only the valid calls above were counted
\c - :su
SELECT apikey.flush_usage() >= 0 AS flushed;
SELECT code, sum(calls) AS calls FROM apikey.usage_log WHERE key_id = :k GROUP BY code;

-- a superuser may turn it off for itself, and on again
SET apikey.allow_session_binding = off;
SELECT apikey.authenticate(:'t', session => true);
RESET apikey.allow_session_binding;
SELECT apikey.authenticate(:'t', session => true) = :k AS session_bound;
SELECT apikey.logout();

DROP ROLE regress_pooled;
DROP ROLE regress_direct;
