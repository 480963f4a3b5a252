--
-- binding: the key bound by apikey.authenticate() and read by the helpers.
-- Lifetime (commit, rollback, savepoints, PREPARE TRANSACTION), last success
-- wins, failures leave the binding alone, session bindings, logout(),
-- DISCARD ALL, RESET ALL, and the errors authenticate() raises.
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write'), ('billing:read');

-- acme reads orders; globex holds everything under orders:
SELECT key_id AS ka, token AS ta FROM apikey.issue(owner => 'acme', scopes => '{orders:read}') \gset
SELECT key_id AS kb, token AS tb FROM apikey.issue(owner => 'globex', scopes => '{orders:*}') \gset
-- to be revoked, expired, deleted (unknown), and one with an address allowlist
SELECT key_id AS kr, token AS tr FROM apikey.issue(owner => 'initech', scopes => '{orders:read}') \gset
SELECT key_id AS ke, token AS te FROM apikey.issue(owner => 'umbrella', expires_at => now() + interval '1 day') \gset
SELECT key_id AS ku, token AS tu FROM apikey.issue(owner => 'hooli') \gset
SELECT key_id AS kc, token AS tc FROM apikey.issue(owner => 'wonka', allowed_cidrs => '{10.0.0.0/8}') \gset
SELECT apikey.revoke(:kr, 'test');
UPDATE apikey.keys SET expires_at = now() - interval '1 hour' WHERE id = :ke;
DELETE FROM apikey.keys WHERE id = :ku;

-- What the helpers see, in one row.
CREATE VIEW bound AS
SELECT apikey.current_owner() AS owner,
       apikey.current_key_id() AS key_id,
       apikey.has_scope('orders:read') AS reads,
       apikey.has_scope('orders:write') AS writes;

--
-- No binding: NULL / false, and require_scope() raises 42501.
--
SELECT owner IS NULL AS no_owner, key_id IS NULL AS no_key, reads, writes FROM bound;
SELECT apikey.has_scope(NULL) AS null_scope;
SELECT apikey.require_scope('orders:read');
\echo :SQLSTATE

--
-- A transaction binding ends at COMMIT.
--
BEGIN;
SELECT apikey.authenticate(:'ta') = :ka AS returns_key_id;
SELECT owner, key_id = :ka AS key_ok, reads, writes FROM bound;
SELECT apikey.require_scope('orders:read');
SELECT apikey.require_scope('orders:write');
\echo :SQLSTATE
ROLLBACK;
SELECT owner, key_id, reads FROM bound;

BEGIN;
SELECT apikey.authenticate(:'ta') = :ka AS returns_key_id;
SELECT owner FROM bound;
COMMIT;
SELECT owner, key_id, reads FROM bound;

-- ... and at ROLLBACK, and a statement outside a transaction block is its
-- own transaction.
BEGIN;
SELECT apikey.authenticate(:'tb') = :kb AS returns_key_id;
SELECT owner, reads, writes FROM bound;
ROLLBACK;
SELECT owner, key_id, reads FROM bound;
SELECT apikey.authenticate(:'ta') = :ka AS returns_key_id;
SELECT owner, key_id, reads FROM bound;

-- The bound key's scopes: exact, prefix:*, and nothing else.
BEGIN;
SELECT apikey.authenticate(:'tb') = :kb AS returns_key_id;
SELECT apikey.has_scope('orders:read') AS orders_read,
       apikey.has_scope('orders:refund') AS orders_refund,
       apikey.has_scope('orders') AS orders_bare,
       apikey.has_scope('billing:read') AS billing_read,
       apikey.has_scope(NULL) AS null_scope;
SELECT apikey.require_scope('billing:read');
\echo :SQLSTATE
COMMIT;

--
-- A second authenticate in the same transaction replaces the binding.
--
BEGIN;
SELECT apikey.authenticate(:'ta') = :ka AS a;
SELECT apikey.authenticate(:'tb') = :kb AS b;
SELECT owner, key_id = :kb AS key_ok, reads, writes FROM bound;
SELECT apikey.authenticate(:'ta') = :ka AS a_again;
SELECT owner, key_id = :ka AS key_ok, reads, writes FROM bound;
COMMIT;

--
-- A failed authenticate raises; caught by a savepoint it leaves the previous
-- binding as it was.  The scope argument is checked, not just recorded.
--
BEGIN;
SELECT apikey.authenticate(:'ta') = :ka AS a;
SAVEPOINT s;
SELECT apikey.authenticate(:'tr');
\echo :SQLSTATE
ROLLBACK TO s;
SELECT owner, key_id = :ka AS key_ok FROM bound;
SELECT apikey.authenticate(:'tb', 'billing:read');
\echo :SQLSTATE
ROLLBACK TO s;
SELECT owner, key_id = :ka AS key_ok FROM bound;
SELECT apikey.authenticate(:'tb', 'orders:write') = :kb AS b_with_scope;
SELECT owner FROM bound;
COMMIT;

-- The same through a PL/pgSQL exception block.
BEGIN;
SELECT apikey.authenticate(:'ta') = :ka AS a;
DO $$
BEGIN
	PERFORM apikey.authenticate('ak_this_is_not_a_token');
EXCEPTION WHEN invalid_authorization_specification THEN
	RAISE NOTICE 'caught %', SQLSTATE;
END
$$;
SELECT owner, key_id = :ka AS key_ok FROM bound;
COMMIT;

-- Uncaught, the failure aborts the transaction, and its binding goes with it.
BEGIN;
SELECT apikey.authenticate(:'ta') = :ka AS a;
SELECT apikey.authenticate(:'te');
SELECT owner FROM bound;
ROLLBACK;
SELECT owner, key_id FROM bound;

--
-- Savepoints: ROLLBACK TO undoes a binding made inside (bringing back the
-- previous one, if any); RELEASE keeps it.
--
BEGIN;
SAVEPOINT s1;
SELECT apikey.authenticate(:'ta') = :ka AS a;
ROLLBACK TO s1;
SELECT owner, key_id FROM bound;
SELECT apikey.authenticate(:'ta') = :ka AS a;
SAVEPOINT s2;
SELECT apikey.authenticate(:'tb') = :kb AS b;
SELECT owner FROM bound;
ROLLBACK TO s2;
SELECT owner, key_id = :ka AS key_ok FROM bound;
SAVEPOINT s3;
SELECT apikey.authenticate(:'tb') = :kb AS b;
RELEASE s3;
SELECT owner, key_id = :kb AS key_ok FROM bound;
-- nested: the released inner binding is still undone by the outer rollback
SAVEPOINT s4;
SAVEPOINT s5;
SELECT apikey.authenticate(:'ta') = :ka AS a;
RELEASE s5;
SELECT owner FROM bound;
ROLLBACK TO s4;
SELECT owner FROM bound;
COMMIT;
SELECT owner, key_id FROM bound;

-- PREPARE TRANSACTION ends the transaction, and the binding with it.
BEGIN;
SELECT apikey.authenticate(:'ta') = :ka AS a;
PREPARE TRANSACTION 'regress_binding_2pc';
SELECT owner, key_id FROM bound;
COMMIT PREPARED 'regress_binding_2pc';

--
-- Session bindings (session => true): they last across transactions.
--
SELECT apikey.authenticate(:'ta', session => true) = :ka AS a_session;
SELECT owner, key_id = :ka AS key_ok FROM bound;
BEGIN;
SELECT owner FROM bound;
COMMIT;
SELECT owner FROM bound;

-- A transaction binding overrides it for that transaction only, whether the
-- transaction commits or rolls back.
BEGIN;
SELECT apikey.authenticate(:'tb') = :kb AS b;
SELECT owner, writes FROM bound;
COMMIT;
SELECT owner, writes FROM bound;
BEGIN;
SELECT apikey.authenticate(:'tb') = :kb AS b;
ROLLBACK;
SELECT owner FROM bound;

-- A failure, caught or not, leaves the session binding in place.
SELECT apikey.authenticate(:'tr', session => true);
\echo :SQLSTATE
SELECT owner FROM bound;
BEGIN;
SELECT apikey.authenticate(:'tb') = :kb AS b;
SELECT apikey.authenticate(:'tu');
ROLLBACK;
SELECT owner FROM bound;

-- RESET ALL does not touch the binding (transaction or session).
RESET ALL;
SELECT owner FROM bound;
BEGIN;
SELECT apikey.authenticate(:'tb') = :kb AS b;
RESET ALL;
SELECT owner FROM bound;
COMMIT;
SELECT owner FROM bound;

-- A session binding made in a transaction that rolls back never existed.
SELECT apikey.logout();
BEGIN;
SELECT apikey.authenticate(:'tb', session => true) = :kb AS b_session;
SELECT owner FROM bound;
ROLLBACK;
SELECT owner, key_id FROM bound;
-- ... nor in a savepoint rolled back.
BEGIN;
SAVEPOINT s;
SELECT apikey.authenticate(:'tb', session => true) = :kb AS b_session;
ROLLBACK TO s;
SELECT owner FROM bound;
COMMIT;
SELECT owner FROM bound;
-- In a committed transaction it outlives it, also after a later
-- transaction binding in the same transaction.
BEGIN;
SELECT apikey.authenticate(:'tb', session => true) = :kb AS b_session;
SELECT apikey.authenticate(:'ta') = :ka AS a;
SELECT owner FROM bound;
COMMIT;
SELECT owner, key_id = :kb AS key_ok FROM bound;
-- A new session binding replaces the old one.
SELECT apikey.authenticate(:'ta', session => true) = :ka AS a_session;
SELECT owner FROM bound;

--
-- logout() ends every binding; inside a transaction that rolls back it is
-- undone.
--
BEGIN;
SELECT apikey.logout();
SELECT owner, key_id FROM bound;
ROLLBACK;
SELECT owner FROM bound;
BEGIN;
SAVEPOINT s;
SELECT apikey.logout();
ROLLBACK TO s;
SELECT owner FROM bound;
COMMIT;
-- A transaction binding over a session binding: logout() ends both.
BEGIN;
SELECT apikey.authenticate(:'tb') = :kb AS b;
SELECT apikey.logout();
SELECT owner FROM bound;
COMMIT;
SELECT owner, key_id FROM bound;
-- logout() of a transaction binding alone, and with nothing bound.
BEGIN;
SELECT apikey.authenticate(:'tb') = :kb AS b;
SELECT apikey.logout();
SELECT owner FROM bound;
SELECT apikey.authenticate(:'ta') = :ka AS a;
SELECT owner FROM bound;
COMMIT;
SELECT owner FROM bound;
SELECT apikey.logout();
SELECT owner FROM bound;

--
-- DISCARD ALL ends a session binding; it cannot run in a transaction block,
-- and the other DISCARD forms leave the binding alone.
--
SELECT apikey.authenticate(:'ta', session => true) = :ka AS a_session;
DISCARD PLANS;
DISCARD SEQUENCES;
DISCARD TEMP;
SELECT owner FROM bound;
BEGIN;
DISCARD ALL;
ROLLBACK;
SELECT owner FROM bound;
DISCARD ALL;
SELECT owner, key_id FROM bound;
DISCARD ALL;
SELECT owner FROM bound;

--
-- authenticate() errors: class 28 for a key that cannot be used at all,
-- 42501 for a missing scope; DETAIL names the verdict.
--
SELECT apikey.authenticate('not a token');
\echo :SQLSTATE
SELECT apikey.authenticate(NULL);
\echo :SQLSTATE
SELECT apikey.authenticate(:'tu');
\echo :SQLSTATE
SELECT apikey.authenticate(:'tr');
\echo :SQLSTATE
SELECT apikey.authenticate(:'te');
\echo :SQLSTATE
SELECT apikey.authenticate(:'tc', client_addr => '192.168.1.1');
\echo :SQLSTATE
SELECT apikey.authenticate(:'ta', 'orders:write');
\echo :SQLSTATE
SELECT apikey.authenticate(:'tc', client_addr => '10.1.2.3') = :kc AS allowed_address;
-- no binding was left behind by any of them
SELECT owner, key_id FROM bound;

-- The token is nowhere in the error: not in the message, detail, hint or
-- context.  The token is passed as a variable, as a client passes a bind
-- parameter, so the statement text does not contain it either.
CREATE FUNCTION auth_error(tok text, scope text DEFAULT NULL, addr inet DEFAULT NULL)
RETURNS TABLE (sqlstate text, message text, detail text, hint text, leaks_token boolean)
LANGUAGE plpgsql AS $$
DECLARE
	m text; d text; h text; c text; s text;
BEGIN
	PERFORM apikey.authenticate(tok, scope, addr);
	RAISE EXCEPTION 'authenticate did not fail';
EXCEPTION WHEN invalid_authorization_specification OR insufficient_privilege THEN
	GET STACKED DIAGNOSTICS s = RETURNED_SQLSTATE, m = MESSAGE_TEXT,
		d = PG_EXCEPTION_DETAIL, h = PG_EXCEPTION_HINT, c = PG_EXCEPTION_CONTEXT;
	RETURN QUERY SELECT s, m, d, h,
		-- the whole token, or its secret part (everything after the prefix)
		strpos(concat_ws(' ', m, d, h, c), tok) > 0
		OR strpos(concat_ws(' ', m, d, h, c), substr(tok, 4)) > 0;
END
$$;
SELECT * FROM auth_error(:'tu');
SELECT * FROM auth_error(:'tr');
SELECT * FROM auth_error(:'te');
SELECT * FROM auth_error(:'tc', addr => '192.168.1.1');
SELECT * FROM auth_error(:'ta', 'orders:write');
-- a well-formed token with one character changed (checksum fails)
SELECT * FROM auth_error(left(:'ta', -1) || CASE WHEN right(:'ta', 1) = 'a' THEN 'b' ELSE 'a' END);

-- A session binding is checked again at the start of every later
-- transaction: scope changes follow it, and revocation ends it.
SELECT key_id AS ks, token AS ts FROM apikey.issue(owner => 'stark', scopes => '{orders:read}') \gset
SELECT apikey.authenticate(:'ts', session => true) = :ks AS bound_session;
SELECT apikey.current_owner(), apikey.has_scope('orders:write') AS writes;
INSERT INTO apikey.key_scopes VALUES (:ks, 'orders:write');
SELECT apikey.current_owner(), apikey.has_scope('orders:write') AS writes;
SELECT apikey.revoke(:ks, 'session test');
SELECT apikey.current_owner(), apikey.current_key_id() IS NULL AS unbound;
SELECT apikey.current_owner();

-- The helpers in PL/pgSQL expressions and in statements without FROM.
-- (Those run as "simple expressions", which must not be given init plans:
-- this once crashed the backend.)
CREATE TABLE binding_tok AS SELECT :'ta'::text AS token;
DO $$
DECLARE
	tok text;
	who text;
BEGIN
	SELECT token INTO tok FROM binding_tok;
	PERFORM apikey.authenticate(tok, 'orders:read');
	IF apikey.current_key_id() IS NULL OR NOT apikey.has_scope('orders:read') THEN
		RAISE EXCEPTION 'bound nothing';
	END IF;
	who := apikey.current_owner();
	RAISE NOTICE 'bound to %, writes: %', who, apikey.has_scope('orders:write');
END
$$;
DROP TABLE binding_tok;
EXPLAIN (COSTS OFF) SELECT apikey.current_owner(), apikey.has_scope('orders:read');

DROP FUNCTION auth_error(text, text, inet);
DROP VIEW bound;
