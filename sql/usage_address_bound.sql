-- What a caller can make apikey store is bounded, whatever client_addr it
-- passes.  Here usage is synchronous (contrib_regression is not
-- in apikey.databases): pending rows, folded into usage_log by flush_usage().
--  - tokens that match no key are counted per code and minute, with no
--    address;
--  - a known key's failures keep at most 16 distinct addresses per key and
--    minute in usage_log; further failures are counted with the address
--    NULL;
--  - every call is still counted, exactly once.
-- t/007_usage_bounds.pl holds the same for the shared-memory counters.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

SELECT key_id AS kr, token AS tr FROM apikey.issue('acme') \gset
SELECT key_id AS ks, token AS ts FROM apikey.issue('acme') \gset
SELECT apikey.revoke(:kr);
SELECT apikey.revoke(:ks);
BEGIN;
SELECT token AS tu FROM apikey.issue('ghost') \gset
ROLLBACK;

-- 1000 unknown and 1000 malformed tokens, each from an address of its own,
-- in one statement (so in one minute).
-- (not in the last 15 seconds of a minute: the flood must fit in one)
SELECT pg_sleep(CASE WHEN 60 - extract(second FROM clock_timestamp()) < 15
					 THEN 60.5 - extract(second FROM clock_timestamp()) ELSE 0 END);
SELECT count(*) FILTER (WHERE (apikey.check(:'tu', NULL, ('10.0.' || g / 256 || '.' || g % 256)::inet)).code = 'unknown') AS unknown,
       count(*) FILTER (WHERE (apikey.check('ak_garbage', NULL, ('10.1.' || g / 256 || '.' || g % 256)::inet)).code = 'malformed') AS malformed
  FROM generate_series(1, 1000) g;
SELECT count(*) AS pending_rows, count(client_addr) AS pending_with_address FROM apikey.usage_pending;
-- one row per code, no address
SELECT apikey.flush_usage() AS rows_written;
SELECT code, count(*) AS rows, sum(calls) AS calls, count(client_addr) AS with_address
  FROM apikey.usage_log GROUP BY code ORDER BY code;

-- One revoked key's failures from 1000 addresses, in one statement: 16
-- addresses are kept, the other 984 calls are counted without one.
-- (not in the last 15 seconds of a minute: the flood must fit in one)
SELECT pg_sleep(CASE WHEN 60 - extract(second FROM clock_timestamp()) < 15
					 THEN 60.5 - extract(second FROM clock_timestamp()) ELSE 0 END);
SELECT count(*) FILTER (WHERE NOT apikey.verify(:'tr', NULL, ('10.2.' || g / 256 || '.' || g % 256)::inet)) AS revoked
  FROM generate_series(1, 1000) g;
SELECT apikey.flush_usage() AS rows_written;
SELECT count(DISTINCT client_addr) AS addresses, count(*) FILTER (WHERE client_addr IS NULL) AS rows_without,
       sum(calls) FILTER (WHERE client_addr IS NULL) AS calls_without, sum(calls) AS calls
  FROM apikey.usage_log WHERE key_id = :kr;

-- The bound holds across folds of the same key and minute: an address
-- already recorded keeps its row, a new one only gets in while the key has
-- fewer than 16.  (Pending rows with a fixed minute, as a verification in
-- that minute would have appended them.)
INSERT INTO apikey.usage_pending (key_id, bucket, code, client_addr, used_at)
SELECT :ks, '2030-01-01 00:00+00', 'revoked', ('192.0.2.' || g)::inet, now()
  FROM generate_series(1, 10) g;
SELECT apikey.flush_usage() AS rows_written;
INSERT INTO apikey.usage_pending (key_id, bucket, code, client_addr, used_at)
SELECT :ks, '2030-01-01 00:00+00', 'revoked', ('192.0.2.' || g)::inet, now()
  FROM generate_series(5, 30) g;
SELECT apikey.flush_usage() AS rows_written;
SELECT count(DISTINCT client_addr) AS addresses,
       count(*) FILTER (WHERE client_addr <= '192.0.2.10') AS first_ten,
       sum(calls) FILTER (WHERE client_addr IS NULL) AS calls_without, sum(calls) AS calls
  FROM apikey.usage_log WHERE key_id = :ks;
-- another minute has room again
INSERT INTO apikey.usage_pending (key_id, bucket, code, client_addr, used_at)
SELECT :ks, '2030-01-01 00:01+00', 'revoked', ('192.0.2.' || g)::inet, now()
  FROM generate_series(31, 35) g;
SELECT apikey.flush_usage() AS rows_written;
SELECT bucket, count(DISTINCT client_addr) AS addresses, sum(calls) AS calls
  FROM apikey.usage_log WHERE key_id = :ks GROUP BY bucket ORDER BY bucket;

-- Nothing is left pending, and every call is in usage_log once.
SELECT (SELECT count(*) FROM apikey.usage_pending) AS pending,
       (SELECT sum(calls) FROM apikey.usage_log) AS calls;
