-- apikey.issue_many(): one key per owner, all with the same settings,
-- checked once per call; every bad input is an ERROR with its own SQLSTATE
-- that writes nothing.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write'), ('billing:read');

-------------------------------------------------------------------------------
-- Success
-------------------------------------------------------------------------------

-- Every setting given; three owners, one of them twice.
CREATE TEMP TABLE batch AS
SELECT n, key_id, token
  FROM apikey.issue_many(ARRAY['acme', 'globex', 'acme'],
						 scopes => '{orders:read, orders:*, orders:read}',
						 name => 'provisioned',
						 expires_at => '2999-01-01 00:00:00+00',
						 prefix => 'ak_test',
						 metadata => '{"batch": 7}',
						 rate_limit => 100, rate_window => '1 hour',
						 quota => 50, quota_refill => '1 day',
						 allowed_cidrs => '{10.0.0.0/8}') WITH ORDINALITY AS i(key_id, token, n);

-- one row per owner, in the owners' order, each with its own id and token
SELECT count(*) AS keys, count(DISTINCT key_id) AS ids, count(DISTINCT token) AS tokens,
	   bool_and(token ~ '^ak_test_[0-9A-Za-z]{49}$') AS token_shape
  FROM batch;
SELECT b.n, k.owner, k.name, k.prefix, k.hint = 'ak_test_...' || right(b.token, 4) AS hint_ok,
	   k.created_by = current_user AS created_by_me, k.expires_at AT TIME ZONE 'UTC' AS expires_utc,
	   k.metadata, k.rate_limit, k.rate_window, k.quota, k.quota_refill, k.allowed_cidrs
  FROM batch b JOIN apikey.keys k ON k.id = b.key_id ORDER BY b.n;
-- the grants, without duplicates, and a quota row for each key
SELECT b.n, array_agg(s.scope ORDER BY s.scope COLLATE "C") AS scopes
  FROM batch b JOIN apikey.key_scopes s ON s.key_id = b.key_id GROUP BY b.n ORDER BY b.n;
SELECT b.n, q.remaining FROM batch b JOIN apikey.quotas q ON q.key_id = b.key_id ORDER BY b.n;
-- only the SHA-256 of each token is stored
SELECT bool_and(k.hash = apikey.hash(b.token)) AS hashes_match
  FROM batch b JOIN apikey.keys k ON k.id = b.key_id;

-- no row of any apikey table holds the secret part of a token
DO $$
DECLARE
	r record;
	n bigint;
	total bigint := 0;
BEGIN
	FOR r IN SELECT c.relname FROM pg_class c
			  WHERE c.relnamespace = 'apikey'::regnamespace AND c.relkind = 'r' LOOP
		EXECUTE format('SELECT count(*) FROM apikey.%I t, batch b '
					   'WHERE strpos(t::text, substr(b.token, 9, 43)) > 0', r.relname) INTO n;
		total := total + n;
	END LOOP;
	RAISE NOTICE 'rows holding a token: %', total;
END
$$;

-- each token verifies as its own key, with its owner and scopes
SELECT b.n, (v).valid, (v).code, (v).key_id = b.key_id AS key_ok, (v).owner,
	   ARRAY(SELECT s FROM unnest((v).scopes) AS s ORDER BY s COLLATE "C") AS scopes,
	   (v).remaining
  FROM batch b, apikey.check(b.token, 'orders:write', '10.1.2.3') AS v ORDER BY b.n;
SELECT b.n, apikey.verify(b.token, 'orders:read', '10.1.2.3') AS verified,
	   (apikey.check(b.token, 'billing:read', '10.1.2.3')).code AS other_scope,
	   (apikey.check(b.token, 'orders:read', '192.0.2.1')).code AS other_network
  FROM batch b ORDER BY b.n;

-- Defaults: no scopes, no quota; only the keys are written.
SELECT (SELECT count(*) FROM apikey.key_scopes) AS key_scopes_before,
	   (SELECT count(*) FROM apikey.quotas) AS quotas_before \gset
CREATE TEMP TABLE plain AS
SELECT n, key_id, token FROM apikey.issue_many('{initech, umbrella}') WITH ORDINALITY AS i(key_id, token, n);
SELECT p.n, k.owner, k.name, k.prefix, k.expires_at, k.metadata, k.rate_limit, k.rate_window,
	   k.quota, k.allowed_cidrs, (apikey.check(p.token)).code
  FROM plain p JOIN apikey.keys k ON k.id = p.key_id ORDER BY p.n;
SELECT (SELECT count(*) FROM apikey.key_scopes) = :key_scopes_before AS no_grants_written,
	   (SELECT count(*) FROM apikey.quotas) = :quotas_before AS no_quotas_written;

-- Keys without scopes or quota write apikey.keys only (issue() too): no
-- statement runs on key_scopes, whose statement trigger would empty every
-- backend's key cache at commit.
SELECT apikey.verify(token) FROM plain WHERE n = 1;
SELECT entries AS entries_before, invalidations AS inv_before FROM apikey.cache_stats() \gset
SELECT count(*) FROM apikey.issue_many('{hooli, stark}');
SELECT count(*) FROM apikey.issue('wayne');
SELECT entries = :entries_before AS cache_kept, invalidations = :inv_before AS not_emptied
  FROM apikey.cache_stats();

-- Owners are stored verbatim; an array with another lower bound works too.
CREATE TEMP TABLE verbatim AS
SELECT n, key_id FROM apikey.issue_many('[0:1]={" Acme Corp ",ACME}') WITH ORDINALITY AS i(key_id, token, n);
SELECT v.n, '"' || k.owner || '"' AS owner FROM verbatim v JOIN apikey.keys k ON k.id = v.key_id ORDER BY v.n;

-- The settings are checked once per call, not once per key: 50 keys with
-- two scopes look the catalog up twice.
BEGIN;
SELECT pg_stat_get_xact_numscans('apikey.scopes'::regclass)
	   + pg_stat_get_xact_numscans('apikey.scopes_pkey'::regclass) AS lookups_before \gset
SELECT count(*) AS issued FROM apikey.issue_many(array_fill('many'::text, ARRAY[50]), '{orders:read, billing:read}');
SELECT pg_stat_get_xact_numscans('apikey.scopes'::regclass)
	   + pg_stat_get_xact_numscans('apikey.scopes_pkey'::regclass) - :lookups_before AS catalog_lookups;
ROLLBACK;

-- The documented maximum, 10000 keys, in one call.
BEGIN;
SELECT count(*) AS issued, count(DISTINCT token) AS distinct_tokens
  FROM apikey.issue_many(array_fill('bulk'::text, ARRAY[10000]), '{orders:read}');
ROLLBACK;

-- Same privilege model as issue(): nothing for PUBLIC; a role granted
-- EXECUTE issues keys recorded as created by itself.
CREATE ROLE regress_issue_many_admin;
SELECT has_function_privilege('public', 'apikey.issue_many(text[], text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[])', 'EXECUTE') AS public_may_execute;
SET ROLE regress_issue_many_admin;
SELECT count(*) FROM apikey.issue_many('{acme}');
\echo :SQLSTATE
RESET ROLE;
GRANT EXECUTE ON FUNCTION apikey.issue_many(text[], text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[])
	TO regress_issue_many_admin;
SET ROLE regress_issue_many_admin;
SELECT key_id AS admin_key FROM apikey.issue_many('{acme}', '{orders:read}') \gset
RESET ROLE;
SELECT created_by FROM apikey.keys WHERE id = :admin_key;

-------------------------------------------------------------------------------
-- Bad input: an ERROR with a SQLSTATE, and nothing written.
-------------------------------------------------------------------------------
SELECT (SELECT count(*) FROM apikey.keys) AS keys_before,
	   (SELECT count(*) FROM apikey.key_scopes) AS key_scopes_before,
	   (SELECT count(*) FROM apikey.quotas) AS quotas_before \gset

-- owners
SELECT count(*) FROM apikey.issue_many(NULL);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{NULL}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many(ARRAY['acme', NULL, 'globex']);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('[5:6]={acme,NULL}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many(ARRAY['acme', '']);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many(ARRAY['acme', E' \t\n']);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many(ARRAY['acme', repeat('o', 1025)]);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{{acme},{globex}}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many(array_fill('acme'::text, ARRAY[10001]));
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('acme');
\echo :SQLSTATE

-- the shared settings: the same checks and errors as issue()
SELECT count(*) FROM apikey.issue_many('{acme}', '{nope:read}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{acme}', '{x:*}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{acme}', ARRAY['orders:read', NULL]);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{acme}', prefix => NULL);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{acme}', prefix => 'AK');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{acme}', expires_at => '2000-01-01 00:00:00+00');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{acme}', metadata => '[]');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{acme}', metadata => NULL);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{acme}', rate_limit => 0);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{acme}', rate_window => NULL);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{acme}', quota => -1);
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{acme}', quota_refill => '1 day');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{acme}', allowed_cidrs => '{}');
\echo :SQLSTATE
SELECT count(*) FROM apikey.issue_many('{acme}', allowed_cidrs => '{NULL}');
\echo :SQLSTATE

-- the owners are checked before the settings
SELECT count(*) FROM apikey.issue_many('{""}', '{nope:read}');
\echo :SQLSTATE

SELECT (SELECT count(*) FROM apikey.keys) = :keys_before AS keys_unchanged,
	   (SELECT count(*) FROM apikey.key_scopes) = :key_scopes_before AS key_scopes_unchanged,
	   (SELECT count(*) FROM apikey.quotas) = :quotas_before AS quotas_unchanged;

DROP OWNED BY regress_issue_many_admin;
DROP ROLE regress_issue_many_admin;
