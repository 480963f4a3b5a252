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
	IF current_setting('apikey.database') <> current_database() THEN
		RAISE EXCEPTION 'apikey.database is %, not this database: usage would be written synchronously',
			current_setting('apikey.database');
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
