--
-- binding_recheck: a session binding is checked again in each later
-- transaction before the helpers use it, and a check that fails with an
-- error is no check: the next statement checks again.
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
SELECT key_id AS ks, token AS ts FROM apikey.issue(owner => 'stark', scopes => '{orders:read}') \gset

--
-- The first helper call of a transaction checks the binding, whatever the
-- statement: here PL/pgSQL simple expressions, which never pass through
-- ExecutorStart.  A scope granted meanwhile is followed; once the key is
-- revoked the binding ends, and stays ended.
--
SELECT apikey.authenticate(:'ts', session => true) = :ks AS bound_session;
INSERT INTO apikey.key_scopes VALUES (:ks, 'orders:write');
DO $$
BEGIN
	RAISE NOTICE 'writes: %', apikey.has_scope('orders:write');
	PERFORM apikey.require_scope('orders:write');
END
$$;
SELECT apikey.revoke(:ks, 'recheck test');
DO $$
BEGIN
	RAISE NOTICE 'reads: %, owner: %', apikey.has_scope('orders:read'),
		coalesce(apikey.current_owner(), '(none)');
END
$$;
SELECT apikey.current_owner(), apikey.current_key_id() IS NULL AS unbound;
SELECT apikey.require_scope('orders:read');
\echo :SQLSTATE

--
-- A check whose lookup raises, and whose error is caught, has not checked
-- the binding.  A prepared transaction holds apikey.keys locked; with the
-- key cache off the lookup must read the table, and times out.  Whether the
-- error is caught by an EXCEPTION block or by ROLLBACK TO SAVEPOINT, the
-- next statement in the same transaction checks again (and times out
-- again) instead of trusting the binding.
--
SELECT key_id AS kt, token AS tt FROM apikey.issue(owner => 'tony', scopes => '{orders:read}') \gset
SELECT apikey.authenticate(:'tt', session => true) = :kt AS bound_session;
BEGIN;
LOCK TABLE apikey.keys IN ACCESS EXCLUSIVE MODE;
PREPARE TRANSACTION 'regress_binding_recheck_lock';

BEGIN;
SET LOCAL apikey.cache_size = 0;
SET LOCAL lock_timeout = '10ms';
DO $$
BEGIN
	PERFORM count(*) FROM pg_class WHERE apikey.current_owner() IS NOT NULL;
EXCEPTION WHEN lock_not_available THEN
	RAISE NOTICE 'the check failed: %', SQLSTATE;
END
$$;
SELECT apikey.current_owner();
\echo :SQLSTATE
ROLLBACK;

BEGIN;
SET LOCAL apikey.cache_size = 0;
SET LOCAL lock_timeout = '10ms';
SAVEPOINT s;
SELECT apikey.current_owner();
\echo :SQLSTATE
ROLLBACK TO s;
SELECT apikey.current_owner();
\echo :SQLSTATE
ROLLBACK;

-- Once the lock is gone the check succeeds, and the binding is intact.
COMMIT PREPARED 'regress_binding_recheck_lock';
SELECT apikey.current_owner(), apikey.current_key_id() = :kt AS key_ok;
SELECT apikey.logout();
