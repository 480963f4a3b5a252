-- Rate limits (GCRA in shared memory, per database and key): an idle key may
-- make rate_limit requests at once, then one per rate_window / rate_limit.
-- With rate_window '1 hour' every outcome below is deterministic: the burst
-- is spent in milliseconds and nothing refills within the test.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;


-- authenticate()'s error, with the interval in its hint masked.
CREATE OR REPLACE FUNCTION limits_rate_auth_error(tok text, scope text DEFAULT NULL, addr inet DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	st text; msg text; det text; hnt text;
BEGIN
	PERFORM apikey.authenticate(tok, scope, addr);
	RETURN 'no error, bound key ' || apikey.current_key_id();
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
		det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
	RETURN st || ': ' || msg || ' | ' || det || ' | '
		|| coalesce(regexp_replace(nullif(hnt, ''), ' (after|in) [@0-9-].*$', ' \1 <interval>.'), '(no hint)');
END
$$;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');

-- The settings are stored as given; rate_window defaults to one minute.
SELECT key_id AS k3, token AS t3
  FROM apikey.issue(owner => 'acme', scopes => '{orders:read}', rate_limit => 3, rate_window => '1 hour') \gset
SELECT key_id AS kdef, token AS tdef FROM apikey.issue(owner => 'acme', rate_limit => 10) \gset
SELECT id = :k3 AS is_k3, rate_limit, rate_window FROM apikey.keys WHERE id IN (:k3, :kdef) ORDER BY id;

-- 3 per hour: three calls at once are valid and count the burst down...
SELECT valid, code, remaining, retry_after IS NULL AS no_retry_after FROM apikey.check(:'t3');
SELECT valid, code, remaining, retry_after IS NULL AS no_retry_after FROM apikey.check(:'t3');
SELECT valid, code, remaining, retry_after IS NULL AS no_retry_after FROM apikey.check(:'t3', 'orders:read');
-- ...the fourth is refused, with a retry_after of at most one emission
-- interval (1 hour / 3), and reveals the key like any other known-key verdict.
SELECT valid, code, key_id = :k3 AS same_key, owner,
       coalesce(remaining, 0) = 0 AS nothing_remaining,
       retry_after > '0' AS retry_after_positive,
       retry_after <= '20 minutes' AS retry_within_interval
  FROM apikey.check(:'t3');
SELECT apikey.verify(:'t3') AS verify_refused;
-- authenticate() raises 53400 and binds nothing.
SELECT limits_rate_auth_error(:'t3');
SELECT apikey.current_key_id() IS NULL AS nothing_bound;
-- The hint gives retry_after in whole seconds, rounded up, whatever the
-- session's IntervalStyle: a client turns it into Retry-After with one
-- pattern.  (20 minutes = 1200 s at most; more than 1190 s here.)
CREATE FUNCTION limits_rate_hint(tok text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE hnt text;
BEGIN
	PERFORM apikey.authenticate(tok);
	RETURN NULL;
EXCEPTION WHEN configuration_limit_exceeded THEN
	GET STACKED DIAGNOSTICS hnt = PG_EXCEPTION_HINT;
	RETURN hnt;
END
$$;
SET IntervalStyle = sql_standard;
SELECT h ~ '^Retry after [0-9]+ seconds\.$' AS whole_seconds,
       substring(h from '[0-9]+')::int BETWEEN 1190 AND 1200 AS seconds_left
  FROM limits_rate_hint(:'t3') AS h;
SET IntervalStyle = iso_8601;
SELECT limits_rate_hint(:'t3') ~ '^Retry after [0-9]+ seconds\.$' AS same_form_in_iso_8601;
RESET IntervalStyle;

-- The bucket is in shared memory, not in the backend: a new session of
-- the same database is still refused.
\c
SELECT code, retry_after > '0' AS retry_after_positive FROM apikey.check(:'t3');

-- Checks that come before the rate limit decide first: a scope the key
-- lacks is scope_denied, not rate_limited.
SELECT code FROM apikey.check(:'t3', 'orders:write');

-- Limits are per key: another key of the same owner is not affected.
SELECT key_id AS k3b, token AS t3b FROM apikey.issue(owner => 'acme', rate_limit => 3, rate_window => '1 hour') \gset
SELECT code, remaining FROM apikey.check(:'t3b');

-- A refusal before the rate limit does not spend a request: with a limit
-- of 1 per hour, failed scope checks leave the one request for later.
SELECT key_id AS k1, token AS t1
  FROM apikey.issue(owner => 'acme', scopes => '{orders:read}', rate_limit => 1, rate_window => '1 hour') \gset
SELECT code FROM apikey.check(:'t1', 'orders:write');
SELECT code FROM apikey.check(:'t1', 'orders:write');
SELECT code, remaining FROM apikey.check(:'t1', 'orders:read');
SELECT code, retry_after > '0' AS retry_after_positive, retry_after <= '1 hour' AS retry_within_window
  FROM apikey.check(:'t1', 'orders:read');

-- A revoked key is revoked, whatever its bucket says.
SELECT apikey.revoke(:k1);
SELECT code FROM apikey.check(:'t1');

-- authenticate() with a rate-limited key: valid calls bind and spend the
-- burst, then it raises 53400 with a hint that says when to retry.
SELECT key_id AS k2, token AS t2 FROM apikey.issue(owner => 'beta', rate_limit => 2, rate_window => '1 hour') \gset
BEGIN;
SELECT apikey.authenticate(:'t2') = :k2 AS first_ok;
SELECT apikey.current_owner();
COMMIT;
SELECT apikey.authenticate(:'t2') = :k2 AS second_ok;
SELECT limits_rate_auth_error(:'t2');

-- set_limits() takes effect at once (the key cache is invalidated).
-- Adding a limit to a key that had none:
SELECT key_id AS k4, token AS t4 FROM apikey.issue(owner => 'gamma') \gset
SELECT code, remaining IS NULL AS no_remaining FROM apikey.check(:'t4');
SELECT code, remaining IS NULL AS no_remaining FROM apikey.check(:'t4');
SELECT apikey.set_limits(:k4, rate_limit => 2, rate_window => '1 hour');
SELECT code, remaining FROM apikey.check(:'t4');
SELECT code, remaining FROM apikey.check(:'t4');
SELECT code FROM apikey.check(:'t4');
-- Removing the limit: valid again, no remaining count.
SELECT apikey.set_limits(:k4, rate_limit => NULL);
SELECT code, remaining IS NULL AS no_remaining FROM apikey.check(:'t4');
SELECT code FROM apikey.check(:'t4');

-- Raising the limit of a key that is being refused lets it through at
-- once: 1 request was made this hour, the new limit is 1000 per hour.
SELECT key_id AS k5, token AS t5 FROM apikey.issue(owner => 'delta', rate_limit => 1, rate_window => '1 hour') \gset
SELECT code FROM apikey.check(:'t5');
SELECT code FROM apikey.check(:'t5');
SELECT apikey.set_limits(:k5, rate_limit => 1000, rate_window => '1 hour');
SELECT code FROM apikey.check(:'t5');

-- Other windows: 2 per day, and the default of one minute.
SELECT key_id AS k6, token AS t6 FROM apikey.issue(owner => 'delta', rate_limit => 2, rate_window => '1 day') \gset
-- (One call per row: check() is volatile, so it runs for each row.)
SELECT array_agg(code ORDER BY g) AS codes
  FROM (SELECT g, (apikey.check(:'t6')).code FROM generate_series(1, 3) g) c;
SELECT array_agg(code ORDER BY g) AS codes
  FROM (SELECT g, (apikey.check(:'tdef')).code FROM generate_series(1, 11) g) c;

-- Every call is counted: in this database usage is written synchronously,
-- in the caller's transaction (so the refusals raised inside the helper's
-- exception block rolled back with it), and folded into usage_log by a flush.
SELECT apikey.flush_usage() > 0 AS flushed;
SELECT key_id = :k3 AS is_k3, code, client_addr IS NOT NULL AS has_addr, sum(calls) AS calls
  FROM apikey.usage_log WHERE key_id IN (:k3, :kdef)
 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3;

-- A key id that is issued again (here: the extension is recreated, so ids
-- restart) starts with a full bucket: the old key's requests are not
-- charged to the new key.
SET client_min_messages = warning;
DROP EXTENSION apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
SELECT setval('apikey.keys_id_seq', 4999, true) > 0 AS ids_moved;
SELECT key_id AS r1, token AS rt1 FROM apikey.issue(owner => 'acme', rate_limit => 1, rate_window => '1 hour') \gset
SELECT code FROM apikey.check(:'rt1');
SELECT code FROM apikey.check(:'rt1');
SET client_min_messages = warning;
DROP EXTENSION apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
SELECT setval('apikey.keys_id_seq', 4999, true) > 0 AS ids_moved;
SELECT key_id AS r2, token AS rt2 FROM apikey.issue(owner => 'acme', rate_limit => 1, rate_window => '1 hour') \gset
SELECT :r1 = :r2 AS same_id;
SELECT code FROM apikey.check(:'rt2');

DROP FUNCTION limits_rate_auth_error(text, text, inet);
