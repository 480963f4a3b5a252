-- bench/setup.sql: data for bench/run (run as superuser in the bench database).
--
-- psql variables: nkeys (the other tenants' keys, default 10000).
-- Tokens are kept in bench.tokens and bench.walk, readable by the superuser
-- only; nothing here prints a token.

\if :{?nkeys}
\else
\set nkeys 10000
\endif

SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE EXTENSION IF NOT EXISTS apikey;
CREATE SCHEMA IF NOT EXISTS bench;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write')
ON CONFLICT DO NOTHING;

CREATE TABLE bench.tokens (name text PRIMARY KEY, token text NOT NULL);
REVOKE ALL ON bench.tokens FROM PUBLIC;

-- The keys the cases use.  "valid" belongs to acme, the tenant the row-level
-- cases read.  "ratelimited" has a limit that is never reached.
INSERT INTO bench.tokens
SELECT 'valid', token FROM apikey.issue(owner => 'acme', name => 'bench valid',
										scopes => '{orders:read,orders:write}');
INSERT INTO bench.tokens
SELECT 'ratelimited', token FROM apikey.issue(owner => 'acme', name => 'bench rate-limited',
											  scopes => '{orders:read}',
											  rate_limit => 2000000000, rate_window => '1 second');
-- owner_limited: a key whose owner has pooled limits (1.2), a rate limit
-- never reached and max_keys; where the installed apikey has them
DO $$
BEGIN
	IF to_regprocedure('apikey.set_owner_limits(text, integer, interval, bigint, interval, cidr[], integer, jsonb)') IS NOT NULL THEN
		PERFORM apikey.set_owner_limits('bench_owner', rate_limit => 2000000000, rate_window => '1 second',
										max_keys => 100);
		INSERT INTO bench.tokens
		SELECT 'owner_limited', token FROM apikey.issue(owner => 'bench_owner', name => 'bench owner-limited',
														scopes => '{orders:read}');
	END IF;
END
$$;
-- unknown: a well-formed token (valid checksum) whose key row is gone
INSERT INTO bench.tokens
SELECT 'unknown', token FROM apikey.issue(owner => 'acme', name => 'bench unknown');
DELETE FROM apikey.keys WHERE name = 'bench unknown';
-- malformed: the valid token with its last checksum character changed, so
-- the whole parse and CRC run before it is rejected (the dearest malformed)
INSERT INTO bench.tokens
SELECT 'malformed', left(token, -1) || CASE WHEN right(token, 1) = 'A' THEN 'B' ELSE 'A' END
  FROM bench.tokens WHERE name = 'valid';

-- The rest of the key population: nkeys keys of 99 other tenants, each
-- with a scope.  Their tokens are kept in bench.walk (id 1..nkeys) for the
-- walk and churn cases.  issue_many() where the installed apikey has it
-- (at most 10000 owners per call), else one issue() per key.
CREATE TABLE bench.walk (id integer PRIMARY KEY, token text NOT NULL);
REVOKE ALL ON bench.walk FROM PUBLIC;
SELECT to_regproc('apikey.issue_many') IS NOT NULL AS have_issue_many \gset
\if :have_issue_many
INSERT INTO bench.walk
SELECT row_number() OVER (), i.token
  FROM generate_series(0, (:nkeys - 1) / 10000) c,
	   LATERAL apikey.issue_many(ARRAY(SELECT 'tenant_' || (g % 99 + 1)
										FROM generate_series(c * 10000 + 1, least(c * 10000 + 10000, :nkeys)) g),
								 scopes => '{orders:read}') i;
\else
INSERT INTO bench.walk
SELECT g, i.token
  FROM generate_series(1, :nkeys) g,
	   LATERAL apikey.issue(owner => 'tenant_' || (g % 99 + 1), scopes => '{orders:read}') i;
\endif

-- Legacy keys (apikey 1.2): two keys imported as bcrypt-prefixed (cost 10,
-- as Rails and Node default to); legacy_upgraded is verified once here, so
-- its hash is SHA-256 and the case measures the path every upgraded key
-- takes; legacy_bcrypt stays pending (the case verifies it read-only).
SELECT to_regclass('apikey.legacy_formats') IS NOT NULL AS have_legacy \gset
\if :have_legacy
INSERT INTO bench.tokens VALUES ('legacy_bcrypt', 'benchbc1.Bq7-kQ2_mW7xP4vL8nT3xYz'),
								('legacy_upgraded', 'benchbc2.Cq7-kQ2_mW7xP4vL8nT3xYz');
SELECT count(key_id) FROM apikey.import_keys('bcrypt-prefixed', (
	SELECT jsonb_agg(jsonb_build_object('owner', 'acme', 'lookup', split_part(token, '.', 1),
										'hash', crypt(split_part(token, '.', 2), gen_salt('bf', 10)),
										'scopes', '["orders:read"]'::jsonb))
	  FROM bench.tokens WHERE name LIKE 'legacy\_%'));
SELECT apikey.verify(token) FROM bench.tokens WHERE name = 'legacy_upgraded';
-- the upgrade is recorded by the verification and applied by a flush
SELECT apikey.flush_usage() >= 0 AS flushed;
\endif

-- Row-level cases: 100 tenants x 10 rows.  bench.orders has the policy,
-- bench.orders_plain is the same data without row-level security.
CREATE TABLE bench.orders (
	id			bigint PRIMARY KEY,
	tenant		text NOT NULL,
	amount		numeric(12,2) NOT NULL,
	created_at	timestamptz NOT NULL
);
INSERT INTO bench.orders
SELECT g, CASE WHEN g % 100 = 0 THEN 'acme' ELSE 'tenant_' || (g % 100) END,
	   (g::bigint * 7919 % 100000) / 100.0, '2024-01-01'::timestamptz + g * interval '1 minute'
  FROM generate_series(1, 1000) g;
CREATE INDEX ON bench.orders (tenant);
CREATE TABLE bench.orders_plain (LIKE bench.orders INCLUDING ALL);
INSERT INTO bench.orders_plain SELECT * FROM bench.orders;
ALTER TABLE bench.orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_read ON bench.orders FOR SELECT
	USING (tenant = apikey.current_owner() AND apikey.has_scope('orders:read'));

DO $$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bench_app') THEN
		CREATE ROLE bench_app LOGIN NOSUPERUSER NOBYPASSRLS;
	END IF;
END
$$;
GRANT USAGE ON SCHEMA bench TO bench_app;
GRANT SELECT ON bench.orders, bench.orders_plain TO bench_app;

-- The failure limiter's cases (1.2): bench_proxy asserts client addresses,
-- as a gateway does, so it is a member of apikey_proxy.
DO $$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bench_proxy') THEN
		CREATE ROLE bench_proxy LOGIN NOSUPERUSER;
	END IF;
	IF to_regrole('apikey_proxy') IS NOT NULL THEN
		GRANT apikey_proxy TO bench_proxy;
	END IF;
END
$$;

VACUUM (ANALYZE) bench.orders;
VACUUM (ANALYZE) bench.orders_plain;
VACUUM (ANALYZE) apikey.keys;
VACUUM (ANALYZE) apikey.key_scopes;
VACUUM (ANALYZE) bench.walk;
