-- apikey.issue(): every argument is stored as given, and every bad argument
-- is an ERROR with its own SQLSTATE that writes nothing.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

INSERT INTO apikey.scopes (name) VALUES
	('orders:read'), ('orders:write'), ('orders:refund:create'), ('billing:read');

-- Defaults: only owner given.
SELECT key_id AS k1, token AS t1 FROM apikey.issue('acme') \gset
SELECT k.owner, k.name, k.prefix, k.created_by = current_user AS created_by_me,
       k.created_at BETWEEN now() - interval '1 hour' AND now() AS created_recently, k.expires_at, k.metadata, l.rotated_from,
       k.last_used_at, k.rate_limit, k.rate_window, k.quota, k.quota_refill, k.allowed_cidrs
  FROM apikey.keys k LEFT JOIN apikey.key_lineage l ON l.key_id = k.id WHERE k.id = :k1;
SELECT count(*) AS scope_rows FROM apikey.key_scopes WHERE key_id = :k1;
SELECT count(*) AS quota_rows FROM apikey.quotas WHERE key_id = :k1;
SELECT (v).valid, (v).code, (v).key_id = :k1 AS key_ok, (v).owner, (v).scopes, (v).expires_at,
       (v).remaining, (v).retry_after
  FROM apikey.check(:'t1') AS v;

-- Every argument, by name.
SELECT key_id AS k2, token AS t2 FROM apikey.issue(
	owner => 'acme',
	scopes => '{orders:read, orders:*, *}',
	name => 'checkout service',
	expires_at => '2999-01-01 00:00:00+00',
	prefix => 'ak_live',
	metadata => '{"team": "payments", "tier": 2}') \gset
SELECT k.owner, k.name, k.prefix, k.hint = 'ak_live_...' || right(:'t2', 4) AS hint_ok,
       k.created_by = current_user AS created_by_me, k.expires_at AT TIME ZONE 'UTC' AS expires_utc,
       k.metadata, l.rotated_from
  FROM apikey.keys k LEFT JOIN apikey.key_lineage l ON l.key_id = k.id WHERE k.id = :k2;
SELECT scope FROM apikey.key_scopes WHERE key_id = :k2 ORDER BY scope COLLATE "C";
SELECT (v).valid, (v).code, (v).key_id = :k2 AS key_ok, (v).owner,
       ARRAY(SELECT s FROM unnest((v).scopes) AS s ORDER BY s COLLATE "C") AS scopes,
       (v).expires_at AT TIME ZONE 'UTC' AS expires_utc
  FROM apikey.check(:'t2', 'billing:read') AS v;

-- Positional arguments in the documented order.
SELECT key_id AS k3, token AS t3 FROM apikey.issue('globex', ARRAY['billing:read'], 'nightly job',
	NULL, 'gx', '{"a": [1, 2]}') \gset
SELECT k.owner, k.name, k.prefix, k.expires_at, k.metadata FROM apikey.keys k WHERE k.id = :k3;
SELECT :'t3' ~ '^gx_[0-9A-Za-z]{49}$' AS gx_shape;

-- Scopes: duplicates collapse, NULL array means none, a pattern is stored as is.
SELECT key_id AS k4 FROM apikey.issue('acme', '{orders:read, orders:read, orders:refund:*}') \gset
SELECT scope FROM apikey.key_scopes WHERE key_id = :k4 ORDER BY scope COLLATE "C";
SELECT key_id AS k5 FROM apikey.issue('acme', NULL) \gset
SELECT count(*) AS scope_rows FROM apikey.key_scopes WHERE key_id = :k5;

-- An infinite expiry is allowed.
SELECT key_id AS k8, token AS t8 FROM apikey.issue('acme', expires_at => 'infinity') \gset
SELECT (v).code, (v).expires_at FROM apikey.check(:'t8') AS v;

-- Owner, name and metadata are stored verbatim (no trimming, no case folding).
SELECT key_id AS k6 FROM apikey.issue(' Acme Corp ', name => '', metadata => '{}') \gset
SELECT '"' || k.owner || '"' AS owner, '"' || k.name || '"' AS name, k.metadata
  FROM apikey.keys k WHERE k.id = :k6;

-- Prefixes at the edges of what is allowed.
SELECT token ~ '^a_[0-9A-Za-z]{49}$' AS one_char FROM apikey.issue('acme', prefix => 'a');
SELECT token ~ '^abcdefghijklmnop_[0-9A-Za-z]{49}$' AS sixteen_chars FROM apikey.issue('acme', prefix => 'abcdefghijklmnop');
SELECT token ~ '^a9_z__[0-9A-Za-z]{49}$' AS digits_underscores FROM apikey.issue('acme', prefix => 'a9_z_');

-- created_by is the role that called issue(), not the function's owner.
CREATE ROLE regress_core_issue_admin;
GRANT EXECUTE ON FUNCTION apikey.issue(text, text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[])
	TO regress_core_issue_admin;
SET ROLE regress_core_issue_admin;
SELECT key_id AS k7 FROM apikey.issue('acme', '{orders:write}') \gset
RESET ROLE;
SELECT k.created_by FROM apikey.keys k WHERE k.id = :k7;

-------------------------------------------------------------------------------
-- Bad input: an ERROR with a SQLSTATE, and nothing written.
-------------------------------------------------------------------------------
SELECT (SELECT count(*) FROM apikey.keys) AS keys_before,
       (SELECT count(*) FROM apikey.key_scopes) AS key_scopes_before,
       (SELECT count(*) FROM apikey.quotas) AS quotas_before \gset

-- owner
SELECT count(*) FROM apikey.issue(NULL);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('   ');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue(E'\t\n');
\echo :SQLSTATE

-- scopes
SELECT count(*) FROM apikey.issue('acme', '{nope:read}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', '{orders:read, Orders:Read}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', '{x:*}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', '{order:*}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', '{orders:read:*}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', ARRAY['orders:read', NULL]);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', ARRAY['']);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', ARRAY['%']);
\echo :SQLSTATE
-- LIKE wildcards in a pattern are not wildcards
SELECT count(*) FROM apikey.issue('acme', '{%:*}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', '{_rders:*}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', '{*:*}');
\echo :SQLSTATE

-- prefix
SELECT count(*) FROM apikey.issue('acme', prefix => '');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', prefix => 'AK');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', prefix => '1ak');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', prefix => 'abcdefghijklmnopq');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', prefix => 'a-b');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', prefix => '_ak');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', prefix => 'ak ');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', prefix => 'akü');
\echo :SQLSTATE
-- (only the SQLSTATE is shown where the message is not settled)
\set VERBOSITY sqlstate
SELECT count(*) FROM apikey.issue('acme', prefix => NULL);
\echo :SQLSTATE
\set VERBOSITY default

-- expires_at
-- (the message would show now(): only the SQLSTATE is shown)
\set VERBOSITY sqlstate
SELECT count(*) FROM apikey.issue('acme', expires_at => now());
\echo :SQLSTATE
\set VERBOSITY default
SELECT count(*) FROM apikey.issue('acme', expires_at => '2000-01-01 00:00:00+00');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', expires_at => '-infinity');
\echo :SQLSTATE

-- metadata
SELECT count(*) FROM apikey.issue('acme', metadata => NULL);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', metadata => '[]');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', metadata => '"text"');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', metadata => 'null');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue('acme', metadata => '42');
\echo :SQLSTATE

-- A bad argument after good ones still writes nothing.
SELECT count(*) FROM apikey.issue('acme', '{orders:read}', 'n', '2999-01-01', 'ak', '{}', quota => 5, rate_limit => 0);
\echo :SQLSTATE

-- An owner too long to index is either accepted or refused with an error
-- that names the argument, not with the btree's internal complaint.
DO $$
DECLARE
	long_owner text := (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 200) i);
	k bigint;
BEGIN
	BEGIN
		SELECT key_id INTO k FROM apikey.issue(long_owner);
		-- accepted: it must be stored verbatim
		RAISE NOTICE 'long owner handled cleanly: %',
			(SELECT owner = long_owner FROM apikey.keys WHERE id = k);
		DELETE FROM apikey.keys WHERE id = k;
	EXCEPTION WHEN OTHERS THEN
		-- refused: the message must be about the owner
		RAISE NOTICE 'long owner handled cleanly: %',
			SQLERRM ~ 'owner' AND SQLERRM !~ 'index row|btree';
	END;
END
$$;

SELECT (SELECT count(*) FROM apikey.keys) = :keys_before AS keys_unchanged,
       (SELECT count(*) FROM apikey.key_scopes) = :key_scopes_before AS key_scopes_unchanged,
       (SELECT count(*) FROM apikey.quotas) = :quotas_before AS quotas_unchanged;

-- Inside a transaction the failed issue() aborts it, and nothing it did survives.
BEGIN;
SELECT count(*) > 0 AS issued FROM apikey.issue('acme', '{orders:read}');
SELECT count(*) FROM apikey.issue('acme', '{nope}');
ROLLBACK;
SELECT (SELECT count(*) FROM apikey.keys) = :keys_before AS keys_unchanged,
       (SELECT count(*) FROM apikey.key_scopes) = :key_scopes_before AS key_scopes_unchanged;

DROP OWNED BY regress_core_issue_admin;
DROP ROLE regress_core_issue_admin;
