-- retention: run_retention() rolls usage_log up into hourly and daily
-- rollups with every call counted once, erases failure addresses after
-- apikey.address_retention, deletes by age; the dashboard views answer
-- from rollups plus what is not rolled up yet, 0 not NULL; settings and
-- arguments are checked; only an admin runs it, a monitor reads the views.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

CREATE FUNCTION regress_try(q text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
	EXECUTE q;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE OPERATOR(pg_catalog.||) ': ' OPERATOR(pg_catalog.||) SQLERRM;
END
$$;

-------------------------------------------------------------------------------
-- Settings: defaults, units, and out-of-range values refused (22023).
-------------------------------------------------------------------------------
SHOW apikey.usage_retention;
SHOW apikey.hourly_retention;
SHOW apikey.daily_retention;
SHOW apikey.address_retention;
SHOW apikey.retention_interval;
SELECT * FROM apikey._retention_settings();
SELECT regexp_replace(regress_try($$SET apikey.usage_retention = '10min'$$), ' \(.*\)$', '') AS usage_too_short,
       regexp_replace(regress_try($$SET apikey.hourly_retention = '-1'$$), ' \(.*\)$', '') AS hourly_negative,
       regexp_replace(regress_try($$SET apikey.daily_retention = '12h'$$), ' \(.*\)$', '') AS daily_too_short,
       regress_try($$SET apikey.address_retention = 'forever'$$) AS address_not_a_number,
       regress_try($$SET apikey.retention_interval = '1min'$$) AS interval_is_sighup;
SET apikey.usage_retention = '36h';
SELECT usage_retention FROM apikey._retention_settings();
RESET apikey.usage_retention;
-- arguments
SELECT regress_try($$SELECT apikey.run_retention(0)$$) AS batch_zero,
       regress_try($$SELECT apikey.run_retention(NULL)$$) AS batch_null,
       regress_try($$SELECT apikey.run_retention(1000001)$$) AS batch_huge;

-------------------------------------------------------------------------------
-- Rollups are exact.  Rows are written as the usage writer writes them (an
-- upsert), over ten days, for two keys, tokens of no key, and failures with
-- addresses.  Hours and days are UTC, whatever the session's time zone.
-------------------------------------------------------------------------------
SET TimeZone = 'Asia/Kolkata';
SELECT key_id AS k1 FROM apikey.issue('acme', name => 'one') \gset
SELECT key_id AS k2 FROM apikey.issue('globex', name => 'two') \gset
CREATE TEMP TABLE t0 AS SELECT date_trunc('hour', now(), 'UTC') AS h;
CREATE FUNCTION regress_upsert(k bigint, b timestamptz, c text, a inet, n bigint) RETURNS void
LANGUAGE sql AS $$
	INSERT INTO apikey.usage_log AS u (key_id, bucket, code, client_addr, calls) VALUES (k, b, c, a, n)
	ON CONFLICT ((COALESCE(key_id, 0)), bucket, code, (COALESCE(client_addr, '0.0.0.0/0'::inet)))
	DO UPDATE SET calls = u.calls + excluded.calls
$$;
SELECT count(*) AS upserts FROM (
	SELECT regress_upsert(k, (SELECT h FROM t0) - make_interval(mins => m), c, a, n)
	  FROM (VALUES (:k1::bigint, 'valid', NULL::inet, 5), (:k1, 'address_denied', '192.0.2.7', 2),
				   (:k1, 'address_denied', '192.0.2.8', 1), (:k2, 'valid', NULL, 3),
				   (:k2, 'rate_limited', NULL, 1), (NULL, 'unknown', NULL, 4),
				   (:k2, 'expired', '2001:db8::1', 1)) v(k, c, a, n),
		   generate_series(30, 10 * 24 * 60, 97) m) s;
CREATE TEMP TABLE raw AS
SELECT key_id, bucket, code, client_addr, calls FROM apikey.usage_log;
SELECT count(*) AS raw_rows, sum(calls) AS raw_calls FROM raw;

SELECT rows_rolled_up, calls_rolled_up, addresses_erased > 0 AS erased, usage_deleted > 0 AS deleted, more
  FROM apikey.run_retention();
-- every call in the hourly and in the daily rollup, in its UTC hour and day
SELECT (SELECT sum(calls) FROM apikey.usage_hourly) AS hourly_calls,
       (SELECT sum(calls) FROM apikey.usage_daily) AS daily_calls,
       (SELECT sum(calls) FROM raw) AS raw_calls;
SELECT count(*) AS hourly_rows_that_differ FROM (
	(SELECT key_id, date_trunc('hour', bucket, 'UTC') AS b, code, sum(calls) FROM raw GROUP BY 1, 2, 3
	 EXCEPT SELECT key_id, bucket, code, calls FROM apikey.usage_hourly)
	UNION ALL
	(SELECT key_id, bucket, code, calls FROM apikey.usage_hourly
	 EXCEPT SELECT key_id, date_trunc('hour', bucket, 'UTC'), code, sum(calls) FROM raw GROUP BY 1, 2, 3)) d;
SELECT count(*) AS daily_rows_that_differ FROM (
	(SELECT key_id, date_trunc('day', bucket, 'UTC') AS b, code, sum(calls) FROM raw GROUP BY 1, 2, 3
	 EXCEPT SELECT key_id, bucket, code, calls FROM apikey.usage_daily)
	UNION ALL
	(SELECT key_id, bucket, code, calls FROM apikey.usage_daily
	 EXCEPT SELECT key_id, date_trunc('day', bucket, 'UTC'), code, sum(calls) FROM raw GROUP BY 1, 2, 3)) d;
SELECT bool_and(date_trunc('hour', bucket AT TIME ZONE 'UTC') = bucket AT TIME ZONE 'UTC') AS hours_start_on_the_utc_hour
  FROM apikey.usage_hourly;
SELECT bool_and((bucket AT TIME ZONE 'UTC')::time = '00:00') AS days_start_at_utc_midnight FROM apikey.usage_daily;
-- addresses: rolled up only within address_retention (7 days by default)
-- (the hour that straddles the cutoff is erased whole: early, never late)
SELECT sum(calls) BETWEEN
         (SELECT sum(calls) FROM raw WHERE client_addr IS NOT NULL AND bucket >= now() - '6 days 23 hours'::interval)
         AND (SELECT sum(calls) FROM raw WHERE client_addr IS NOT NULL AND bucket >= now() - '7 days'::interval)
         AS address_calls_of_7_days,
       min(bucket) >= now() - '7 days'::interval AS none_older
  FROM apikey.usage_address_hourly;

-- Older than usage_retention (7 days): rolled-up raw rows deleted; older
-- than address_retention: addresses erased (merged into the row without).
SELECT count(*) FILTER (WHERE bucket < now() - '7 days'::interval) AS raw_rows_older_than_7d,
       count(*) FILTER (WHERE client_addr IS NOT NULL AND bucket < now() - '7 days'::interval) AS addresses_older,
       sum(calls) = sum(rolled_up) AS all_rolled_up
  FROM apikey.usage_log;
SELECT (SELECT sum(calls) FROM apikey.usage_log) = (SELECT sum(calls) FROM raw WHERE bucket >= now() - '7 days'::interval)
       AS kept_calls_are_7_days;

-- Idempotent: a second run changes nothing.
CREATE TEMP TABLE before AS SELECT * FROM apikey.usage_hourly;
SELECT * FROM apikey.run_retention();
SELECT count(*) AS hourly_rows_changed FROM (
	(SELECT * FROM before EXCEPT SELECT * FROM apikey.usage_hourly)
	UNION ALL (SELECT * FROM apikey.usage_hourly EXCEPT SELECT * FROM before)) d;

-- A flush adds to a row already rolled up, and a late flush writes a row
-- into an hour long rolled up: hourly_usage counts both before the next
-- run (rollup + calls - rolled_up), and the next run rolls up exactly them.
SELECT regress_upsert(:k1, (SELECT h FROM t0) - '30 minutes'::interval, 'valid', NULL, 7);
SELECT regress_upsert(:k2, (SELECT h FROM t0) - '3 days 30 minutes'::interval, 'expired', '2001:db8::1', 2);
SELECT sum(calls) AS hourly_usage_calls, (SELECT sum(calls) FROM raw) + 9 AS expected
  FROM apikey.hourly_usage;
SELECT rows_rolled_up, calls_rolled_up FROM apikey.run_retention();
SELECT (SELECT sum(calls) FROM apikey.usage_hourly) AS hourly_calls,
       (SELECT sum(calls) FROM apikey.usage_daily) AS daily_calls,
       (SELECT sum(calls) FROM raw) + 9 AS expected,
       (SELECT sum(calls) FROM apikey.hourly_usage) AS hourly_usage_calls;

-- Bounded batches: more is true until a call finds less than batch_size.
SELECT count(*) AS upserts
  FROM (SELECT regress_upsert(:k1, (SELECT h FROM t0) - make_interval(hours => 1, mins => m), 'unknown', NULL, 1)
          FROM generate_series(1, 5) m) s;
SELECT network, failed_calls, keys FROM apikey.top_failing_networks;
SELECT rows_rolled_up, more FROM apikey.run_retention(2);
SELECT rows_rolled_up, more FROM apikey.run_retention(2);
SELECT rows_rolled_up, more FROM apikey.run_retention(2);
SELECT (SELECT sum(calls) FROM apikey.usage_hourly) = (SELECT sum(calls) FROM raw) + 14 AS still_exact;

-------------------------------------------------------------------------------
-- The network window.  top_failing_networks reads usage_network_window
-- (the address rollups from its start on, per network and key), adds or
-- subtracts the address rollups between that start and its own 24 hours,
-- and adds what is not rolled up yet.  regress_networks is the view
-- without the window (the address rollups of the 24 hours plus the rest):
-- both must give the same rows at every step (rows_that_differ 0), and
-- run_retention() must leave the window equal to the address rollups from
-- its start on (window_off 0).
-------------------------------------------------------------------------------
CREATE TEMP VIEW regress_networks AS
SELECT n.network, sum(n.calls)::bigint AS failed_calls, count(*) AS keys
  FROM (SELECT network(set_masklen(u.client_addr, CASE family(u.client_addr) WHEN 4 THEN 32 ELSE 64 END)) AS network,
               u.key_id, sum(u.calls) AS calls
          FROM (SELECT a.key_id, a.client_addr, a.calls FROM apikey.usage_address_hourly a
                 WHERE a.bucket >= date_trunc('hour', now() - '23 hours'::interval, 'UTC')
                UNION ALL
                SELECT l.key_id, l.client_addr, l.calls - l.rolled_up FROM apikey.usage_log l
                 WHERE l.calls > l.rolled_up AND l.client_addr IS NOT NULL
                   AND l.bucket >= date_trunc('hour', now() - '23 hours'::interval, 'UTC')
                UNION ALL
                SELECT p.key_id, p.client_addr, 1 FROM apikey.usage_pending p
                 WHERE p.client_addr IS NOT NULL AND p.code <> 'valid'
                UNION ALL
                SELECT v.key_id, v.client_addr, v.calls FROM apikey._live_usage() v
                 WHERE v.client_addr IS NOT NULL AND v.code <> 'valid') u
         GROUP BY 1, 2) n
 GROUP BY n.network;
CREATE TEMP VIEW regress_window_check AS
SELECT (SELECT count(*) FROM regress_networks) AS networks,
       (SELECT count(*) FROM ((SELECT * FROM apikey.top_failing_networks EXCEPT ALL SELECT * FROM regress_networks)
                              UNION ALL
                              (SELECT * FROM regress_networks EXCEPT ALL SELECT * FROM apikey.top_failing_networks)) d)
         AS rows_that_differ,
       (SELECT count(*) FROM apikey.usage_network_window) AS window_rows,
       (SELECT count(*) FROM ((SELECT network, key_id, calls::numeric FROM apikey.usage_network_window
                               EXCEPT ALL
                               SELECT network(set_masklen(client_addr, CASE family(client_addr) WHEN 4 THEN 32 ELSE 64 END)),
                                      key_id, sum(calls)
                                 FROM apikey.usage_address_hourly
                                WHERE bucket >= (SELECT since FROM apikey.usage_network_window_since)
                                GROUP BY 1, 2)
                              UNION ALL
                              (SELECT network(set_masklen(client_addr, CASE family(client_addr) WHEN 4 THEN 32 ELSE 64 END)),
                                      key_id, sum(calls)
                                 FROM apikey.usage_address_hourly
                                WHERE bucket >= (SELECT since FROM apikey.usage_network_window_since)
                                GROUP BY 1, 2
                               EXCEPT ALL
                               SELECT network, key_id, calls FROM apikey.usage_network_window)) d) AS window_off;
-- the window starts at the first of the 24 hours
SELECT since = date_trunc('hour', now() - '23 hours'::interval, 'UTC') AS starts_at_the_24_hours
  FROM apikey.usage_network_window_since;
SELECT * FROM regress_window_check;
-- a second key fails from the IPv6 /64 (another address), a third address
-- of 192.0.2.0/24 fails this minute (not rolled up: from usage_log)
SELECT regress_upsert(:k1, (SELECT h FROM t0) - '50 minutes'::interval, 'address_denied', '2001:db8::2', 3),
       regress_upsert(:k2, date_trunc('minute', now()), 'revoked', '192.0.2.9', 2);
SELECT * FROM regress_window_check;
SELECT rows_rolled_up FROM apikey.run_retention();
SELECT * FROM regress_window_check;
SELECT network, failed_calls, keys FROM apikey.top_failing_networks;
-- The state a run two hours ago left: the window starts two hours earlier
-- and holds those hours too; the view subtracts them, the next run drops
-- them from the window.
SELECT count(*) AS address_rollups_of_the_two_hours
  FROM apikey.usage_address_hourly
 WHERE bucket >= (SELECT since - '2 hours'::interval FROM apikey.usage_network_window_since)
   AND bucket < (SELECT since FROM apikey.usage_network_window_since);
UPDATE apikey.usage_network_window_since SET since = since - '2 hours'::interval;
INSERT INTO apikey.usage_network_window AS w (network, key_id, calls)
SELECT network(set_masklen(client_addr, CASE family(client_addr) WHEN 4 THEN 32 ELSE 64 END)), key_id, sum(calls)
  FROM apikey.usage_address_hourly
 WHERE bucket >= (SELECT since FROM apikey.usage_network_window_since)
   AND bucket < (SELECT since + '2 hours'::interval FROM apikey.usage_network_window_since)
 GROUP BY 1, 2
ON CONFLICT (network, key_id) DO UPDATE SET calls = w.calls + excluded.calls;
SELECT * FROM regress_window_check;
SELECT rows_rolled_up FROM apikey.run_retention();
SELECT * FROM regress_window_check;
SELECT since = date_trunc('hour', now() - '23 hours'::interval, 'UTC') AS starts_at_the_24_hours
  FROM apikey.usage_network_window_since;
-- No start (a restored dump has none): the view answers without the
-- window; the next run builds it afresh.
DELETE FROM apikey.usage_network_window_since;
SELECT networks, rows_that_differ FROM regress_window_check;
SELECT rows_rolled_up FROM apikey.run_retention();
SELECT * FROM regress_window_check;

-- Shorter retention: address_retention 1 hour erases the older addresses
-- (raw and rolled up); hourly_retention 2 days deletes older hours;
-- daily_retention 3 days older days.
SET apikey.address_retention = '1h';
-- The window starts at the cutoff (later than the 24 hours); a batch of
-- one deletes one address rollup before it, the view adds the others.
SELECT address_rollups_deleted FROM apikey.run_retention(1);
SELECT since > date_trunc('hour', now() - '23 hours'::interval, 'UTC') AND since <= now() - '1 hour'::interval
       AS starts_at_the_cutoff
  FROM apikey.usage_network_window_since;
SELECT count(*) > 0 AS address_rollups_before_the_start
  FROM apikey.usage_address_hourly
 WHERE bucket >= date_trunc('hour', now() - '23 hours'::interval, 'UTC')
   AND bucket < (SELECT since FROM apikey.usage_network_window_since);
SELECT * FROM regress_window_check;
SET apikey.hourly_retention = '2d';
SET apikey.daily_retention = '3d';
SELECT addresses_erased > 0 AS erased, hourly_deleted > 0 AS hours_gone, daily_deleted > 0 AS days_gone,
       address_rollups_deleted > 0 AS address_rollups_gone, more
  FROM apikey.run_retention();
SELECT count(*) FILTER (WHERE client_addr IS NOT NULL AND bucket < now() - '1 hour'::interval) AS raw_addresses_older,
       (SELECT count(*) FROM apikey.usage_address_hourly WHERE bucket < now() - '1 hour'::interval) AS rolled_addresses_older,
       (SELECT count(*) FROM apikey.usage_hourly WHERE bucket < now() - '2 days'::interval) AS hours_older,
       (SELECT count(*) FROM apikey.usage_daily WHERE bucket < now() - '3 days'::interval) AS days_older,
       sum(calls) = (SELECT sum(calls) FROM raw WHERE bucket >= now() - '7 days'::interval) + 14 + 5 AS raw_calls_kept
  FROM apikey.usage_log;
-- the window starts at the cutoff, so it holds only what the kept address
-- rollups hold (t/033 sees an erased address leave it)
SELECT * FROM regress_window_check;
RESET apikey.address_retention;
RESET apikey.hourly_retention;
RESET apikey.daily_retention;
-- each run left one audit row
SELECT count(*) AS audit_rows, bool_and(details ? 'calls_rolled_up') AS with_counts
  FROM apikey.audit_log WHERE action = 'run_retention';

-------------------------------------------------------------------------------
-- Dashboard views: 0, not NULL.
-------------------------------------------------------------------------------
SELECT key_id = :k1 AS is_k1, owner, key_name, failed_calls, calls, rate_limited_calls
  FROM apikey.top_failing_keys ORDER BY failed_calls DESC, key_id NULLS FIRST;
SELECT count(*) AS cells, count(DISTINCT bucket) AS hours, count(DISTINCT code) AS codes,
       count(*) FILTER (WHERE calls IS NULL) AS null_calls,
       sum(calls) = (SELECT sum(calls) FROM apikey.hourly_usage
                      WHERE bucket >= date_trunc('hour', now() - '23 hours'::interval, 'UTC')) AS sums_match
  FROM apikey.code_usage_24h;
-- (which minutes fall in the last hour depends on the clock: compare;
-- this minute's row, not rolled up, is there for sure)
SELECT regress_upsert(:k1, date_trunc('minute', now()), 'valid', NULL, 2);
SELECT bool_and(x.calls_match) AS calls_match, bool_and(x.valid_plus_failed) AS valid_plus_failed,
       sum(x.nulls) AS nulls, bool_or(x.owner = 'acme') AS acme_seen
  FROM (SELECT o.owner,
               sum(o.calls) = (SELECT sum(l.calls) FROM apikey.usage_log l LEFT JOIN apikey.keys k ON k.id = l.key_id
                                WHERE l.bucket > now() - '1 hour'::interval AND k.owner IS NOT DISTINCT FROM o.owner)
               AS calls_match,
               sum(o.valid_calls + o.failed_calls) = sum(o.calls) AS valid_plus_failed,
               count(*) FILTER (WHERE o.valid_calls IS NULL OR o.failed_calls IS NULL OR o.rate_limited_calls IS NULL) AS nulls
          FROM apikey.owner_usage_last_hour o GROUP BY o.owner) x;
SELECT count(*) FILTER (WHERE valid_calls IS NULL OR failed_calls IS NULL OR rate_limited_calls IS NULL) AS key_usage_nulls
  FROM apikey.key_usage;

-- Rate-limit state, read without taking: 3 a minute, 2 taken, 1 left;
-- 3 taken, none left and a wait.
SELECT key_id AS rl, token AS rl_token FROM apikey.issue('initech', name => 'limited', rate_limit => 3) \gset
SELECT available, retry_after, tracked FROM apikey.rate_limit_state WHERE key_id = :rl;
SELECT (apikey.check(:'rl_token')).code, (apikey.check(:'rl_token')).code;
SELECT available, retry_after, tracked FROM apikey.rate_limit_state WHERE key_id = :rl;
SELECT available, retry_after, tracked FROM apikey.rate_limit_state WHERE key_id = :rl;
SELECT (apikey.check(:'rl_token')).code;
SELECT available, retry_after > '0'::interval AS must_wait FROM apikey.rate_limit_state WHERE key_id = :rl;
-- Quota remaining: 2 of 2, then 0 (not NULL).
SELECT key_id AS q, token AS q_token FROM apikey.issue('initech', name => 'metered', quota => 2) \gset
SELECT remaining FROM apikey.quota_state WHERE key_id = :q;
SELECT (apikey.check(:'q_token')).code, (apikey.check(:'q_token')).code, (apikey.check(:'q_token')).code;
SELECT quota, remaining, next_refill FROM apikey.quota_state WHERE key_id = :q;

-------------------------------------------------------------------------------
-- Privileges: nobody runs retention or reads the rollups by default; an
-- admin (grant_admin) runs it, a monitor (grant_monitor) reads them.
-------------------------------------------------------------------------------
CREATE ROLE regress_ret_nobody;
CREATE ROLE regress_ret_admin;
CREATE ROLE regress_ret_monitor;
SELECT apikey.grant_admin('regress_ret_admin') AS admin, apikey.grant_monitor('regress_ret_monitor') AS monitor;
SET ROLE regress_ret_nobody;
SELECT regress_try('SELECT apikey.run_retention()') AS run,
       regress_try('SELECT * FROM apikey.usage_hourly') AS hourly,
       regress_try('SELECT * FROM apikey.top_failing_keys') AS top_keys,
       regress_try('SELECT * FROM apikey.rate_limit_state') AS rate_state;
RESET ROLE;
SET ROLE regress_ret_monitor;
SELECT regress_try('SELECT apikey.run_retention()') AS run,
       regress_try('SELECT * FROM apikey.usage_hourly, apikey.usage_daily, apikey.usage_address_hourly') AS rollups,
       regress_try('SELECT * FROM apikey.hourly_usage, apikey.owner_usage_last_hour') AS usage_views,
       regress_try('SELECT * FROM apikey.top_failing_keys, apikey.top_failing_networks, apikey.code_usage_24h') AS dashboards,
       regress_try('SELECT * FROM apikey.rate_limit_state, apikey.quota_state') AS limits;
RESET ROLE;
SET ROLE regress_ret_admin;
SELECT more FROM apikey.run_retention();
RESET ROLE;
SELECT actor_role FROM apikey.audit_log WHERE action = 'run_retention' ORDER BY seq DESC LIMIT 1;

RESET TimeZone;
SET client_min_messages = warning;
SELECT apikey.revoke_admin('regress_ret_admin'), apikey.revoke_monitor('regress_ret_monitor');
DROP ROLE regress_ret_nobody;
DROP ROLE regress_ret_admin;
DROP ROLE regress_ret_monitor;
DROP FUNCTION regress_try(text);
DROP FUNCTION regress_upsert(bigint, timestamptz, text, inet, bigint);
DROP EXTENSION apikey CASCADE;
