--
-- limits_failure: the per-network failure limiter.  A client network
-- asserted by a trusted proxy that spends apikey.failure_limit failures
-- is answered address_blocked (53400 from authenticate, retry_after, no key
-- field, no cache or table read), also for a valid token, while other
-- networks go on.  IPv4 counts per /32, IPv6 per /64.  Successes never
-- refill it; verdicts that are not failures do not spend it; an address
-- nobody trusted asserted, the connection's own address and networks in
-- apikey.failure_exempt are never limited.
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

-- 3 failures per hour (ALTER SYSTEM: the settings are server-wide)
ALTER SYSTEM SET apikey.failure_limit = 3;
ALTER SYSTEM SET apikey.failure_window = '1h';
SELECT pg_reload_conf();
SELECT pg_sleep(1);  -- the reload reaches this backend
SHOW apikey.failure_limit;
SHOW apikey.failure_window;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
SELECT key_id AS k, token AS t FROM apikey.issue('acme', '{orders:read}') \gset
BEGIN;
SELECT token AS t_unknown FROM apikey.issue('ghost') \gset
ROLLBACK;
CREATE ROLE regress_failure_proxy;
GRANT apikey_proxy TO regress_failure_proxy;
CREATE ROLE regress_failure_stranger;

-- Three failures of any kind from 203.0.113.7, then blocked, even with the
-- valid token; nothing about the key is said, and nothing is looked up.
SET ROLE regress_failure_proxy;
SELECT code FROM apikey.check(:'t_unknown', NULL, '203.0.113.7');
SELECT code FROM apikey.check('not a token', NULL, '203.0.113.7');
SELECT code FROM apikey.check(:'t_unknown', 'orders:read', '203.0.113.7');
SELECT valid, code, key_id, owner, scopes, expires_at, remaining,
       retry_after > '19 minutes' AND retry_after <= '20 minutes' AS retry_in_20_minutes
  FROM apikey.check(:'t_unknown', NULL, '203.0.113.7');
RESET ROLE;
SELECT hits + misses AS lookups FROM apikey.cache_stats() \gset
SET ROLE regress_failure_proxy;
SELECT valid, code, key_id FROM apikey.check(:'t', NULL, '203.0.113.7');
SELECT apikey.verify(:'t', NULL, '203.0.113.7');
RESET ROLE;
SELECT hits + misses = :lookups AS no_lookup_while_blocked FROM apikey.cache_stats();
-- authenticate raises 53400 with a hint saying when to retry
CREATE FUNCTION limits_failure_try(stmt text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	st text; msg text; det text; hint text;
BEGIN
	EXECUTE stmt;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL,
		hint = PG_EXCEPTION_HINT;
	RETURN st || ': ' || msg || ' / ' || det || ' / ' || regexp_replace(hint, 'after .*\.$', 'after <interval>.');
END
$$;
GRANT EXECUTE ON FUNCTION limits_failure_try(text) TO regress_failure_proxy;
SET ROLE regress_failure_proxy;
SELECT limits_failure_try(format('SELECT apikey.authenticate(%L, NULL, %L)', :'t', '203.0.113.7'));
RESET ROLE;

-- the rest of the world goes on: the next address, and the same /32 is not
-- another's /32
SET ROLE regress_failure_proxy;
SELECT code FROM apikey.check(:'t', NULL, '203.0.113.8');
SELECT code FROM apikey.check(:'t_unknown', NULL, '203.0.113.8');
SELECT code FROM apikey.check(:'t', NULL, '203.0.113.8');

-- IPv6: one /64 shares a budget, the next /64 has its own
SELECT code FROM apikey.check(:'t_unknown', NULL, '2001:db8:0:1::1');
SELECT code FROM apikey.check(:'t_unknown', NULL, '2001:db8:0:1::2');
SELECT code FROM apikey.check(:'t_unknown', NULL, '2001:db8:0:1:ffff::3');
SELECT code FROM apikey.check(:'t', NULL, '2001:db8:0:1::4');
SELECT code FROM apikey.check(:'t', NULL, '2001:db8:0:2::1');

-- successes never refill: two failures, many successes, one failure, blocked
SELECT code, count(*) FROM (
	SELECT (apikey.check(:'t_unknown', NULL, '198.51.100.1')).code FROM generate_series(1, 2)
	UNION ALL
	SELECT (apikey.check(:'t', NULL, '198.51.100.1')).code FROM generate_series(1, 10)
	UNION ALL
	SELECT (apikey.check(:'t_unknown', NULL, '198.51.100.1')).code) c
 GROUP BY code ORDER BY code;
SELECT code FROM apikey.check(:'t', NULL, '198.51.100.1');

-- what is not a failure (scope_denied, a valid key) does not spend it
SELECT code, count(*) FROM (
	SELECT (apikey.check(:'t', 'orders:write', '198.51.100.2')).code FROM generate_series(1, 10)) c
 GROUP BY code;
SELECT code FROM apikey.check(:'t', NULL, '198.51.100.2');
RESET ROLE;

-- revoked and expired keys and a denied address are failures too
SELECT key_id AS k_rev, token AS t_rev FROM apikey.issue('acme') \gset
SELECT apikey.revoke(:k_rev);
SELECT key_id AS k_cidr, token AS t_cidr FROM apikey.issue('acme', allowed_cidrs => '{10.0.0.0/8}') \gset
SET ROLE regress_failure_proxy;
SELECT (apikey.check(:'t_rev', NULL, '198.51.100.3')).code
UNION ALL SELECT (apikey.check(:'t_cidr', NULL, '198.51.100.3')).code
UNION ALL SELECT (apikey.check(:'t_rev', NULL, '198.51.100.3')).code
UNION ALL SELECT (apikey.check(:'t', NULL, '198.51.100.3')).code;
RESET ROLE;

-- an address asserted by a role that may not assert one is ignored: the
-- connection's own address decides, and it is never limited
SET ROLE regress_failure_stranger;
SELECT code, count(*) FROM (
	SELECT (apikey.check(:'t_unknown', NULL, '203.0.113.7')).code FROM generate_series(1, 10)) c
 GROUP BY code;
RESET ROLE;
SELECT code, count(*) FROM (SELECT (apikey.check(:'t_unknown')).code FROM generate_series(1, 10)) c
 GROUP BY code;

-- exempt networks are never limited; a bad list is refused
ALTER SYSTEM SET apikey.failure_exempt = '192.0.2.0/24, 2001:db8:ffff::/48';
SELECT pg_reload_conf();
SELECT pg_sleep(1);  -- the reload reaches this backend
SHOW apikey.failure_exempt;
SET ROLE regress_failure_proxy;
SELECT code, count(*) FROM (
	SELECT (apikey.check(:'t_unknown', NULL, '192.0.2.77')).code FROM generate_series(1, 10)
	UNION ALL
	SELECT (apikey.check(:'t_unknown', NULL, '2001:db8:ffff:1::9')).code FROM generate_series(1, 10)) c
 GROUP BY code;
SELECT code FROM apikey.check(:'t_unknown', NULL, '192.0.3.1');
RESET ROLE;
ALTER SYSTEM SET apikey.failure_exempt = '192.0.2.0/24, nonsense';
ALTER SYSTEM SET apikey.failure_limit = -1;
-- (the message's unit display differs between releases: SQLSTATE only)
\set VERBOSITY sqlstate
ALTER SYSTEM SET apikey.failure_window = 0;
\set VERBOSITY default
SET apikey.failure_limit = 5;

-- counted in apikey.stats
SELECT (calls ->> 'address_blocked')::int >= 5 AS blocked_counted, failure_networks_untracked
  FROM apikey.stats;

-- 0 turns the limiter off
ALTER SYSTEM SET apikey.failure_limit = 0;
SELECT pg_reload_conf();
SELECT pg_sleep(1);  -- the reload reaches this backend
SET ROLE regress_failure_proxy;
SELECT code FROM apikey.check(:'t', NULL, '203.0.113.7');
RESET ROLE;

ALTER SYSTEM RESET apikey.failure_limit;
ALTER SYSTEM RESET apikey.failure_window;
ALTER SYSTEM RESET apikey.failure_exempt;
SELECT pg_reload_conf();
SELECT pg_sleep(1);  -- the reload reaches this backend
SET client_min_messages = warning;
DROP EXTENSION apikey CASCADE;
DROP FUNCTION limits_failure_try(text);
DROP ROLE regress_failure_proxy;
DROP ROLE regress_failure_stranger;
RESET client_min_messages;
