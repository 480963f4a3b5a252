-- Monitoring: apikey.stats counts every verification per verdict code in
-- shared memory (this server runs with shared_preload_libraries = apikey);
-- in this database, which is not in apikey.databases, usage is written
-- synchronously, as rows of apikey.usage_pending that flush_usage() folds
-- into apikey.usage_log; apikey.key_usage sums both per key and minute.
-- The counters are server-wide, so the checks below use deltas.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

-- Rate-limit state is in shared memory by key id and ids restart with the
-- extension: keep this file's ids apart from other files'.
SELECT setval('apikey.keys_id_seq', 6000) > 0 AS ids_moved;

-- The views and their columns.
SELECT attname, format_type(atttypid, atttypmod)
  FROM pg_attribute WHERE attrelid = 'apikey.stats'::regclass AND attnum > 0 ORDER BY attnum;
SELECT attname, format_type(atttypid, atttypmod)
  FROM pg_attribute WHERE attrelid = 'apikey.live_usage'::regclass AND attnum > 0 ORDER BY attnum;
SELECT attname, format_type(atttypid, atttypmod)
  FROM pg_attribute WHERE attrelid = 'apikey.key_usage'::regclass AND attnum > 0 ORDER BY attnum;

-- Shared memory is there, and calls has one counter for every code.
SELECT shared_memory, jsonb_typeof(calls) AS calls_type, rate_limited >= 0 AS rate_limited_ok,
       flushes >= 0 AS flushes_ok, flush_errors >= 0 AS flush_errors_ok,
       entries_pending >= 0 AS pending_ok, entries_dropped >= 0 AS dropped_ok
  FROM apikey.stats;
SELECT array_agg(k ORDER BY k) AS codes FROM apikey.stats, jsonb_object_keys(calls) AS k;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
SELECT key_id AS kv, token AS tv FROM apikey.issue(owner => 'acme', scopes => '{orders:read}') \gset
SELECT key_id AS kr, token AS tr FROM apikey.issue(owner => 'acme') \gset
SELECT key_id AS ke, token AS te FROM apikey.issue(owner => 'acme', expires_at => now() + interval '1 day') \gset
SELECT key_id AS ka, token AS ta FROM apikey.issue(owner => 'acme', allowed_cidrs => '{10.0.0.0/8}') \gset
SELECT key_id AS kl, token AS tl FROM apikey.issue(owner => 'acme', rate_limit => 1, rate_window => '1 hour') \gset
SELECT key_id AS kq, token AS tq FROM apikey.issue(owner => 'acme', quota => 1) \gset
SELECT key_id AS ku, token AS tu FROM apikey.issue(owner => 'gone') \gset
SELECT apikey.revoke(:kr);
UPDATE apikey.keys SET expires_at = now() - interval '1 second' WHERE id = :ke;
DELETE FROM apikey.keys WHERE id = :ku;

SELECT calls AS calls0, rate_limited AS rl0 FROM apikey.stats \gset

-- One or more verifications with each code.
SELECT code FROM apikey.check('not a token');
SELECT code FROM apikey.check(NULL);
SELECT code FROM apikey.check(:'tu');
SELECT code FROM apikey.check(:'tr');
SELECT code FROM apikey.check(:'te');
SELECT code FROM apikey.check(:'ta', NULL, '192.0.2.1');
SELECT code FROM apikey.check(:'tv', 'orders:write');
SELECT code FROM apikey.check(:'tv', 'orders:read');
SELECT apikey.verify(:'tv');
SELECT apikey.authenticate(:'tv') = :kv AS authenticated;
SELECT code FROM apikey.check(:'tl');
SELECT code FROM apikey.check(:'tl');
SELECT apikey.verify(:'tl');
SELECT code FROM apikey.check(:'tq');
SELECT code FROM apikey.check(:'tq');

-- The per-code deltas.
SELECT s.key AS code, s.value::bigint - (:'calls0'::jsonb ->> s.key)::bigint AS delta
  FROM apikey.stats, jsonb_each(calls) AS s ORDER BY s.key;
SELECT rate_limited - :rl0 AS rate_limited_delta,
       rate_limited = (calls ->> 'rate_limited')::bigint AS rate_limited_matches_calls
  FROM apikey.stats;

-- In this database the same calls are pending rows, appended in the
-- caller's transaction: key_usage counts them at once, usage_log not yet.
-- Nothing is in shared memory for this database: live_usage is empty.
SELECT (SELECT count(*) FROM apikey.usage_log) AS usage_log_rows,
       (SELECT sum(calls) FROM apikey.key_usage WHERE key_id = :kv) AS kv_calls,
       (SELECT count(*) FROM apikey.live_usage) AS live_rows;

-- flush_usage() folds them into usage_log and last_used_at.
SELECT apikey.flush_usage() > 0 AS flushed;
SELECT count(*) AS pending_left FROM apikey.usage_pending;

-- A known key's failures keep the client address (the connection's when
-- none was given: loopback here); successes, and tokens that match no key,
-- are counted without one, the latter with no key id.
SELECT key_id = :kv AS is_kv, key_id IS NULL AS no_key, code,
       CASE WHEN client_addr IS NULL THEN 'none'
            WHEN client_addr = '192.0.2.1' THEN '192.0.2.1'
            WHEN client_addr <<= '127.0.0.0/8' OR client_addr = '::1' THEN 'loopback'
            ELSE 'other' END AS addr,
       sum(calls) AS calls
  FROM apikey.usage_log GROUP BY 1, 2, 3, 4 ORDER BY 3, 1, 2, 4;
SELECT bool_and(bucket = date_trunc('minute', bucket)) AS minute_buckets,
       bool_and(bucket > now() - interval '1 hour' AND bucket <= now()) AS recent
  FROM apikey.usage_log;

-- last_used_at is set by successful verifications only.
SELECT id = :kv AS is_kv, last_used_at IS NOT NULL AS used, last_used_at <= now() AS not_in_future
  FROM apikey.keys WHERE id IN (:kv, :ka, :kr) ORDER BY id;

-- Folded once: a second flush has nothing to write.
SELECT apikey.flush_usage() AS rows_flushed;

-- key_usage: per key and minute; a deleted key's calls stay, without owner.
SELECT key_id = :kv AS is_kv, key_id = :kl AS is_kl, owner, sum(calls) AS calls,
       sum(valid_calls) AS valid_calls, sum(failed_calls) AS failed_calls,
       sum(rate_limited_calls) AS rate_limited_calls
  FROM apikey.key_usage WHERE key_id IN (:kv, :kl, :ku) OR key_id IS NULL
 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;
SELECT sum(calls) AS key_usage_total, (SELECT sum(calls) FROM apikey.usage_log) AS usage_log_total
  FROM apikey.key_usage;

-- Verification works in a READ ONLY transaction (PostgREST runs GETs so):
-- it is counted in apikey.stats even though this database cannot write
-- its pending row there.
SELECT calls AS calls1 FROM apikey.stats \gset
BEGIN READ ONLY;
SELECT code FROM apikey.check(:'tv');
SELECT apikey.authenticate(:'tv') = :kv AS authenticated;
SELECT code FROM apikey.check(:'tq');
COMMIT;
SELECT s.key AS code, s.value::bigint - (:'calls1'::jsonb ->> s.key)::bigint AS delta
  FROM apikey.stats, jsonb_each(calls) AS s
 WHERE s.value::bigint <> (:'calls1'::jsonb ->> s.key)::bigint ORDER BY s.key;

-- The monitoring objects belong to the administrator: PUBLIC cannot read
-- them or flush.
CREATE ROLE regress_limits_stats_nobody;
SET ROLE regress_limits_stats_nobody;
SELECT count(*) FROM apikey.stats;
SELECT count(*) FROM apikey.live_usage;
SELECT count(*) FROM apikey.key_usage;
SELECT count(*) FROM apikey.usage_log;
SELECT apikey.flush_usage();
-- but it can verify, and its calls are counted
SELECT code FROM apikey.check(:'tv');
RESET ROLE;
SELECT apikey.flush_usage() AS rows_flushed;
SELECT sum(calls) AS valid_calls_kv FROM apikey.usage_log WHERE key_id = :kv AND code = 'valid';
DROP ROLE regress_limits_stats_nobody;

-- The log redactor counts the token-shaped spans it hides: two tokens in
-- one log line (the statement that logged them holds none).
SELECT tokens_redacted AS redacted_before FROM apikey.stats \gset
DO $$ BEGIN RAISE LOG 'two tokens: % and %', (SELECT token FROM apikey._new_token('ak')), (SELECT token FROM apikey._new_token('ak_live')); END $$;
SELECT tokens_redacted - :redacted_before AS newly_redacted FROM apikey.stats;

-- apikey.stats_by_code: the same counts as stats.calls, one row per code of
-- the verdict table, 0 (not NULL) for codes never seen.
SELECT (SELECT count(*) FROM apikey.stats_by_code) =
	   (SELECT count(*) FROM apikey.stats, jsonb_object_keys(calls)) AS one_row_per_code,
	   (SELECT count(*) FROM apikey.stats_by_code WHERE calls IS NULL) AS null_counts;
SELECT b.code, b.calls = (s.calls ->> b.code)::bigint AS same_as_jsonb
  FROM apikey.stats_by_code b, apikey.stats s ORDER BY b.code;
