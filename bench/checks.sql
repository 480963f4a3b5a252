-- bench/checks.sql: make sure every case measures what it claims before
-- anything is timed.  Run as superuser in the bench database after
-- setup.sql and reference.sql.  Raises (and so stops bench/run) on any
-- mismatch; prints nothing secret.

\set ON_ERROR_STOP 1
SET client_min_messages = warning;
\if :{?nkeys}
\else
\set nkeys 10000
\endif
SELECT set_config('bench.walk_keys', :'nkeys', false);

DO $$
DECLARE
	got text;
	want record;
BEGIN
	IF NOT (SELECT shared_memory FROM apikey.stats) THEN
		RAISE EXCEPTION 'apikey is not using shared memory (shared_preload_libraries?)';
	END IF;
	-- this database's usage writer starts with the extension: give it a moment
	FOR i IN 1 .. 100 LOOP
		EXIT WHEN EXISTS (SELECT FROM pg_stat_activity
						   WHERE backend_type = 'apikey usage writer' AND datname = current_database());
		PERFORM pg_sleep(0.1);
	END LOOP;
	IF NOT EXISTS (SELECT FROM pg_stat_activity
					WHERE backend_type = 'apikey usage writer' AND datname = current_database()) THEN
		RAISE EXCEPTION 'no apikey usage writer in this database: usage would be written synchronously'
			USING HINT = 'Check apikey.databases and max_worker_processes.';
	END IF;
	FOR want IN SELECT * FROM (VALUES ('valid', 'valid'), ('ratelimited', 'valid'),
									  ('unknown', 'unknown'), ('malformed', 'malformed')) v(name, code)
	LOOP
		SELECT (apikey.check(t.token, 'orders:read')).code INTO got
		  FROM bench.tokens t WHERE t.name = want.name;
		IF got IS DISTINCT FROM want.code THEN
			RAISE EXCEPTION 'token "%" verifies as %, expected %', want.name, got, want.code;
		END IF;
	END LOOP;
	-- owner_limited (where setup.sql made it): valid, and limited by its owner
	IF EXISTS (SELECT FROM bench.tokens WHERE name = 'owner_limited') THEN
		SELECT (apikey.check(t.token, 'orders:read')).limited_by INTO got
		  FROM bench.tokens t WHERE t.name = 'owner_limited';
		IF got IS DISTINCT FROM 'owner' THEN
			RAISE EXCEPTION 'token "owner_limited" is limited by %, expected owner', got;
		END IF;
	END IF;
	IF (SELECT count(*) FROM apikey.keys) < 1000 THEN
		RAISE EXCEPTION 'too few keys issued';
	END IF;
	-- the walk: every token verifies with the scope
	IF (SELECT count(*) FILTER (WHERE apikey.verify(w.token, 'orders:read')) FROM bench.walk w)
	   <> current_setting('bench.walk_keys')::bigint
	   OR (SELECT max(id) FROM bench.walk) <> current_setting('bench.walk_keys')::bigint THEN
		RAISE EXCEPTION 'the walk does not cover % keys that verify', current_setting('bench.walk_keys');
	END IF;
	IF NOT (SELECT ref.verify(token, 'orders:read') FROM bench.tokens WHERE name = 'valid') THEN
		RAISE EXCEPTION 'reference rejects the valid key';
	END IF;
	IF NOT (SELECT ref.verify_secdef(token, 'orders:read') FROM bench.tokens WHERE name = 'valid') THEN
		RAISE EXCEPTION 'reference (security definer) rejects the valid key';
	END IF;
	IF (SELECT ref.verify(token, 'orders:read') FROM bench.tokens WHERE name = 'unknown') THEN
		RAISE EXCEPTION 'reference accepts the unknown key';
	END IF;
	IF (SELECT ref.verify(token, 'orders:delete') FROM bench.tokens WHERE name = 'valid') THEN
		RAISE EXCEPTION 'reference ignores scopes';
	END IF;
END
$$;

-- Legacy keys: the pending one verifies by bcrypt (read-only: it stays
-- pending), the upgraded one by SHA-256.
SELECT to_regclass('apikey.legacy_formats') IS NOT NULL AS have_legacy \gset
\if :have_legacy
BEGIN READ ONLY;
SELECT (SELECT apikey.verify(token, 'orders:read') FROM bench.tokens WHERE name = 'legacy_bcrypt')
	   AND (SELECT apikey.verify(token, 'orders:read') FROM bench.tokens WHERE name = 'legacy_upgraded') AS legacy_ok \gset
COMMIT;
SELECT :'legacy_ok'::boolean AND (SELECT count(*) FILTER (WHERE verifier IS NULL) = 1 AND count(*) = 2
						 FROM apikey.legacy_keys WHERE format = 'bcrypt-prefixed') AS legacy_ok \gset
\if :legacy_ok
\else
SELECT 1/0 AS legacy_check_failed;
\endif
\endif

-- The row-level case as the application role: 10 rows with the key bound,
-- none without; the literal twin returns the same 10 rows.
SELECT token AS bench_valid_token FROM bench.tokens WHERE name = 'valid' \gset
SET ROLE bench_app;
BEGIN;
SELECT apikey.authenticate(:'bench_valid_token') IS NOT NULL AS authenticated \gset
SELECT count(*) AS rls_rows, sum(id) AS rls_sum FROM bench.orders \gset
COMMIT;
SELECT count(*) AS unbound_rows FROM bench.orders \gset
SELECT count(*) AS literal_rows, sum(id) AS literal_sum FROM bench.orders_plain WHERE tenant = 'acme' \gset
RESET ROLE;
\unset bench_valid_token
SELECT :rls_rows = 10 AND :unbound_rows = 0 AND :literal_rows = 10 AND :rls_sum = :literal_sum AS rls_ok \gset
\if :rls_ok
\else
\echo 'row-level check failed: rows with key' :rls_rows ', without' :unbound_rows ', literal' :literal_rows
SELECT 1/0 AS row_level_check_failed;
\endif

-- The failure limiter's cases (where apikey_proxy exists and the limit is
-- small enough to spend here): bench_proxy's asserted address is trusted,
-- the valid key stays valid from it, and an address that keeps presenting
-- the unknown token is answered unknown, then address_blocked.  A
-- check-only address: the cases' budgets stay untouched.
SELECT to_regrole('apikey_proxy') IS NOT NULL
	   AND current_setting('apikey.failure_limit', true)::int BETWEEN 1 AND 1000 AS have_limiter \gset
\if :have_limiter
SELECT token AS bench_valid_token FROM bench.tokens WHERE name = 'valid' \gset
SELECT token AS bench_unknown_token FROM bench.tokens WHERE name = 'unknown' \gset
SET ROLE bench_proxy;
SELECT (apikey.check(:'bench_valid_token', 'orders:read', '100.64.0.9')).code AS addr_valid \gset
SELECT count(*) FILTER (WHERE code = 'address_blocked') AS blocked, count(*) FILTER (WHERE code = 'unknown') AS unknown,
	   count(*) AS calls
  FROM (SELECT (apikey.check(:'bench_unknown_token', 'orders:read', '192.0.2.99')).code
		  FROM generate_series(1, current_setting('apikey.failure_limit')::int + 1)) c \gset
RESET ROLE;
\unset bench_valid_token
\unset bench_unknown_token
SELECT :'addr_valid' = 'valid' AND :blocked >= 1 AND :blocked + :unknown = :calls AS limiter_ok \gset
\if :limiter_ok
\else
\echo 'failure limiter check failed: valid key from an asserted address' :addr_valid ', blocked' :blocked ', unknown' :unknown 'of' :calls
SELECT 1/0 AS failure_limiter_check_failed;
\endif
\endif
