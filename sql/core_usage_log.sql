-- Usage accounting where it is synchronous: in a database not in
-- apikey.databases (contrib_regression here) each verification appends one
-- row to apikey.usage_pending in the caller's transaction, and
-- apikey.flush_usage() folds pending rows into apikey.usage_log: one row per
-- key, minute, code and (for a known key's failures) client address.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = 'apikey usage writer' AND datname = current_database()) AS synchronous_here;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
SELECT key_id AS k1, token AS t1 FROM apikey.issue('acme', '{orders:read}') \gset
SELECT key_id AS k2, token AS t2 FROM apikey.issue('acme', '{orders:read}') \gset
SELECT key_id AS k3, token AS t3 FROM apikey.issue('acme', expires_at => now() + interval '1 hour') \gset
UPDATE apikey.keys SET expires_at = now() - interval '1 second' WHERE id = :k3;
BEGIN;
SELECT token AS t_unknown FROM apikey.issue('ghost') \gset
ROLLBACK;
SELECT apikey.revoke(:k2);
SELECT count(*) AS rows_after_setup FROM apikey.usage_log;
SELECT count(*) AS pending_after_setup FROM apikey.usage_pending;

-- Per (key, code), the calls add up, and rows are minute buckets.  A run that
-- straddles a minute boundary may give two rows, never more, so this holds
-- whatever the clock.
CREATE VIEW usage_summary AS
SELECT CASE u.key_id WHEN :k1 THEN 'k1' WHEN :k2 THEN 'k2' WHEN :k3 THEN 'k3'
                     ELSE coalesce(u.key_id::text, 'NULL') END AS key,
       u.code, host(u.client_addr) AS client_addr, sum(u.calls) AS calls,
       count(*) BETWEEN 1 AND 2 AS one_row_per_minute,
       bool_and(u.bucket = date_trunc('minute', u.bucket)) AS minute_buckets,
       bool_and(u.bucket BETWEEN now() - interval '10 minutes' AND now()) AS recent
  FROM apikey.usage_log u
 GROUP BY 1, 2, 3;

-- Five valid calls with verify() and five with check(): ten pending rows,
-- which a flush folds into one usage_log row, calls = 10.
SELECT count(*) FILTER (WHERE apikey.verify(:'t1')) AS valid_verifies FROM generate_series(1, 5);
SELECT count(*) FILTER (WHERE (apikey.check(:'t1', 'orders:read')).valid) AS valid_checks FROM generate_series(1, 5);
SELECT count(*) AS pending_rows, count(*) FILTER (WHERE key_id = :k1 AND code = 'valid') AS k1_valid,
       bool_and(used_at <= now() AND bucket = date_trunc('minute', used_at)) AS used_in_bucket
  FROM apikey.usage_pending;
SELECT count(*) AS usage_log_rows FROM apikey.usage_log;
SELECT apikey.flush_usage() BETWEEN 1 AND 2 AS flushed;
SELECT count(*) AS pending_left FROM apikey.usage_pending;
SELECT * FROM usage_summary ORDER BY key, code;
SELECT max(calls) >= 5 AS aggregated FROM apikey.usage_log WHERE key_id = :k1;

-- Failures of every kind, each with a client address given explicitly.
SELECT apikey.verify(:'t1', 'orders:write', '203.0.113.7') AS scope_denied;
SELECT apikey.verify(:'t1', 'orders:write', '203.0.113.7') AS scope_denied;
SELECT apikey.verify(:'t2', NULL, '203.0.113.7') AS revoked;
SELECT apikey.verify(:'t3', NULL, '203.0.113.7') AS expired;
SELECT apikey.verify(:'t_unknown', NULL, '203.0.113.7') AS unknown;
SELECT apikey.verify('garbage', NULL, '203.0.113.7') AS malformed;
SELECT apikey.verify(NULL, NULL, '203.0.113.7') AS malformed_null;
SELECT (apikey.check('ak_' || repeat('0', 49), NULL, '2001:db8::1')).code AS malformed_v6;
-- A success with an address given is still counted without the address.
SELECT apikey.verify(:'t1', NULL, '203.0.113.7') AS valid;
SELECT apikey.flush_usage() > 0 AS flushed;
-- A known key's failures keep the address; tokens that match no key
-- (malformed, unknown) never do, whatever address is passed.
SELECT * FROM usage_summary ORDER BY key, code, client_addr;

-- Without client_addr a failure records the connection's own address
-- (NULL over a Unix socket).
SELECT apikey.verify(:'t2') AS revoked_from_connection;
SELECT apikey.flush_usage() > 0 AS flushed;
SELECT u.client_addr IS NOT DISTINCT FROM inet_client_addr() AS connection_address
  FROM apikey.usage_log u WHERE u.code = 'revoked'
   AND u.client_addr IS DISTINCT FROM '203.0.113.7';

-- Rows for malformed and unknown tokens never carry a key id or an address.
SELECT u.code, bool_and(u.key_id IS NULL) AS key_id_null, bool_and(u.client_addr IS NULL) AS addr_null
  FROM apikey.usage_log u WHERE u.code IN ('malformed', 'unknown') GROUP BY u.code ORDER BY u.code;
-- Rows for known keys always do; successes never carry an address.
SELECT bool_and(u.key_id IS NOT NULL) AS key_ids_present
  FROM apikey.usage_log u WHERE u.code IN ('valid', 'revoked', 'expired', 'scope_denied');
SELECT count(*) AS valid_rows_with_address FROM apikey.usage_log WHERE code = 'valid' AND client_addr IS NOT NULL;

-- A READ ONLY transaction still gets answers, and nothing is written.
SELECT sum(calls) AS calls_before FROM apikey.usage_log \gset
BEGIN READ ONLY;
SELECT apikey.verify(:'t1') AS valid, (apikey.check(:'t2')).code AS revoked,
       (apikey.check(:'t_unknown', NULL, '203.0.113.7')).code AS unknown,
       (apikey.check('garbage')).code AS malformed;
SELECT count(*) FILTER (WHERE apikey.verify(:'t1')) AS valid_verifies FROM generate_series(1, 3);
COMMIT;
SET default_transaction_read_only = on;
SELECT apikey.verify(:'t1') AS valid_in_read_only_session;
RESET default_transaction_read_only;
SELECT count(*) AS nothing_pending_read_only FROM apikey.usage_pending;

-- A rolled-back transaction takes its pending rows with it.
BEGIN;
SELECT count(*) FILTER (WHERE apikey.verify(:'t1')) AS valid_verifies FROM generate_series(1, 4);
SELECT apikey.verify('garbage') AS malformed;
SELECT count(*) AS counted_inside FROM apikey.usage_pending;
ROLLBACK;
SELECT count(*) AS rolled_back FROM apikey.usage_pending;

-- A rolled-back subtransaction too, while the rest commits.
BEGIN;
SELECT apikey.verify(:'t1') AS kept;
SAVEPOINT s;
SELECT apikey.verify(:'t1') AS undone;
ROLLBACK TO SAVEPOINT s;
SELECT apikey.verify(:'t1') AS kept;
COMMIT;
SELECT count(*) AS two_pending FROM apikey.usage_pending;

-- An error later in the same transaction rolls the rows back as well.
BEGIN;
SELECT apikey.verify(:'t1') AS valid;
SELECT 1 / 0;
COMMIT;
SELECT count(*) AS still_two FROM apikey.usage_pending;

-- A flush in a savepoint that rolls back loses nothing: the pending rows
-- it took are there again, and the next flush writes them once.
BEGIN;
SAVEPOINT s;
SELECT apikey.flush_usage() > 0 AS flushed_in_savepoint;
SELECT count(*) AS pending_in_savepoint FROM apikey.usage_pending;
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT count(*) AS pending_again FROM apikey.usage_pending;
SELECT sum(calls) = :calls_before AS usage_log_unchanged FROM apikey.usage_log;
SELECT apikey.flush_usage() > 0 AS flushed;
SELECT sum(calls) = :calls_before + 2 AS two_more FROM apikey.usage_log;

-- Counting works for a caller that cannot read or write the usage tables.
-- Its client_addr claim is ignored (it is not a member of apikey_proxy).
CREATE ROLE regress_core_usage_log_app;
SET ROLE regress_core_usage_log_app;
SELECT apikey.verify(:'t1') AS valid, apikey.verify(:'t_unknown', NULL, '198.51.100.1') AS unknown;
SELECT count(*) FROM apikey.usage_pending;
SELECT count(*) FROM apikey.usage_log;
RESET ROLE;
SELECT count(*) AS pending_for_app FROM apikey.usage_pending;
SELECT apikey.flush_usage() > 0 AS flushed;
SELECT sum(calls) = :calls_before + 4 AS counted_for_app FROM apikey.usage_log;
SELECT count(*) AS unknown_rows_with_address FROM apikey.usage_log
 WHERE code = 'unknown' AND client_addr IS NOT NULL;

-- Deleting a key leaves its usage rows (no foreign key), revoking does not
-- touch them either.
DELETE FROM apikey.keys WHERE id = :k3;
SELECT count(*) > 0 AS usage_kept_for_deleted_key FROM apikey.usage_log WHERE key_id = :k3;

-- Everything is folded: flush_usage() has nothing left to write.
SELECT apikey.flush_usage() AS flushed_rows;

DROP VIEW usage_summary;
DROP ROLE regress_core_usage_log_app;
