-- Networks, baselines and the shared_address, new_networks and volume_spike
-- rules (issue 12): addresses aggregate to /24 and /48 (IPv4-mapped IPv6 as
-- IPv4), retention drops old rows and rows of deleted keys, baselines and
-- suggested limits follow crafted usage_log rows, each rule fires on its
-- crafted pattern and not on a steady key, bad input gets 22004/22023, and
-- PUBLIC may call or read none of it.  (Collection in shared memory and the
-- writer's flush: t/036_key_networks.pl.)
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

-- Run a statement; 'ok', or its SQLSTATE and message.
CREATE FUNCTION networks_try(stmt text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	st text; msg text;
BEGIN
	EXECUTE stmt;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
	RETURN st || ': ' || msg;
END
$$;

-------------------------------------------------------------------------------
-- Aggregation: /24 and /48 by default; IPv4-mapped IPv6 counts as IPv4.
-------------------------------------------------------------------------------
SHOW apikey.network_prefix_v4;
SHOW apikey.network_prefix_v6;
SHOW apikey.network_retention;
SELECT a, apikey._network_of(a::inet) AS network
  FROM unnest(ARRAY['192.0.2.77', '192.0.2.0', '198.51.100.255/32', '2001:db8:1234:5678::1',
					'2001:db8:1234:ffff:ffff::', '::ffff:203.0.113.9', '::203.0.113.9']) a;
SELECT apikey._network_of(NULL) IS NULL AS null_in_null_out;

-------------------------------------------------------------------------------
-- Keys, and crafted history.
-------------------------------------------------------------------------------
CREATE TEMP TABLE k (name text PRIMARY KEY, id bigint);
INSERT INTO k SELECT 'steady', key_id FROM apikey.issue('acme');
INSERT INTO k SELECT 'spiky', key_id FROM apikey.issue('acme');
INSERT INTO k SELECT 'fresh', key_id FROM apikey.issue('initech');
INSERT INTO k SELECT 'ramp', key_id FROM apikey.issue('initech', rate_limit => 1000, rate_window => '1 hour');
INSERT INTO k SELECT 'short', key_id FROM apikey.issue('hooli');
INSERT INTO k SELECT 'twice', key_id FROM apikey.issue('hooli');
INSERT INTO k SELECT 'sixth', key_id FROM apikey.issue('hooli');
CREATE FUNCTION kid(n text) RETURNS bigint LANGUAGE sql STABLE AS 'SELECT id FROM k WHERE name = n';
CREATE TEMP VIEW minute AS SELECT date_trunc('minute', now()) AS m;

-- Two hours before the last ten minutes: steady 50/min, spiky 20/min, ramp
-- 1..100 (one minute each); short only 10 minutes, over an hour ago.
INSERT INTO apikey.usage_log (key_id, bucket, code, calls)
SELECT kid('steady'), m - (i || ' minutes')::interval, 'valid', 50 FROM minute, generate_series(11, 130) i
UNION ALL
SELECT kid('spiky'), m - (i || ' minutes')::interval, 'valid', 20 FROM minute, generate_series(11, 130) i
UNION ALL
SELECT kid('ramp'), m - ((10 + i) || ' minutes')::interval, 'valid', i FROM minute, generate_series(1, 100) i
UNION ALL
SELECT kid('short'), m - (i || ' minutes')::interval, 'valid', 5 FROM minute, generate_series(71, 80) i;
-- failures count as calls too: one minute of steady has 40 valid + 10 denied
UPDATE apikey.usage_log SET calls = 40
 WHERE key_id = kid('steady') AND bucket = (SELECT m - '11 minutes'::interval FROM minute);
INSERT INTO apikey.usage_log (key_id, bucket, code, calls)
SELECT kid('steady'), m - '11 minutes'::interval, 'scope_denied', 10 FROM minute;

-------------------------------------------------------------------------------
-- Baselines and suggested limits.
-------------------------------------------------------------------------------
SELECT apikey.compute_baselines();
SELECT k.name, b.data_points, b.p50, b.p90, b.p99, b.max, now() - b.computed_at < '1 minute' AS recent
  FROM apikey.key_baselines b JOIN k ON k.id = b.key_id ORDER BY k.name;
-- idempotent: the same rows again
SELECT apikey.compute_baselines();
SELECT count(*) FROM apikey.key_baselines;
-- the audit trail has one row per call
SELECT action, details FROM apikey.audit_log WHERE action = 'compute_baselines' ORDER BY seq;
-- 2 x p99 or max, per minute scaled to rate_window; none below 60 points
SELECT k.name, s.current_limit, s.suggested_limit, s.data_points
  FROM apikey.suggested_limits s JOIN k ON k.id = s.key_id ORDER BY k.name;
-- a window that sees none of a key's calls drops its baseline (short's)
SELECT apikey.compute_baselines('1 hour');
SELECT k.name FROM apikey.key_baselines b JOIN k ON k.id = b.key_id ORDER BY k.name;
SELECT apikey.compute_baselines();

-------------------------------------------------------------------------------
-- volume_spike: over max(10 x p99, 100) calls a minute for 3 consecutive
-- minutes.  spiky (p99 20, so 200) does 1000 for 3 minutes; steady keeps
-- its 50; short (p99 5, floor 100) does 150 for 2 minutes only, then a
-- break, then 2 more; fresh (no baseline, floor 100) does 150 for 3.
-------------------------------------------------------------------------------
INSERT INTO apikey.usage_log (key_id, bucket, code, calls)
SELECT kid('steady'), m - (i || ' minutes')::interval, 'valid', 50 FROM minute, generate_series(1, 10) i
UNION ALL
SELECT kid('spiky'), m - (i || ' minutes')::interval, 'valid', 1000 FROM minute, generate_series(4, 6) i
UNION ALL
SELECT kid('spiky'), m - (i || ' minutes')::interval, 'rate_limited', 5 FROM minute, generate_series(4, 6) i
UNION ALL
SELECT kid('short'), m - (i || ' minutes')::interval, 'valid', 150 FROM minute, unnest(ARRAY[2, 3, 5, 6]) i
UNION ALL
SELECT kid('fresh'), m - (i || ' minutes')::interval, 'valid', 150 FROM minute, generate_series(1, 3) i;
SELECT k.name, r.owner, r.network, r.evidence->'minutes' AS minutes, r.evidence->'peak_calls' AS peak,
	   r.evidence->'limit' AS lim, r.evidence->'p99' AS p99,
	   (r.evidence->>'since')::timestamptz =
	   (SELECT m - (CASE k.name WHEN 'spiky' THEN 6 ELSE 3 END || ' minutes')::interval FROM minute) AS since_ok
  FROM apikey._rule_volume_spike_eval(10, '10 minutes', 100) r JOIN k ON k.id = r.key_id ORDER BY k.name;
-- a higher floor spares fresh; a window that misses the run finds nothing
SELECT k.name FROM apikey._rule_volume_spike_eval(10, '10 minutes', 200) r JOIN k ON k.id = r.key_id;
SELECT count(*) FROM apikey._rule_volume_spike_eval(10, '3 minutes', 100);

-------------------------------------------------------------------------------
-- key_networks: crafted rows (the writer's are tested by TAP).
-- steady: its office network for 20 days.  spiky: its network for 20 days
-- and one first seen 5 minutes ago.  fresh: a new key, one network from 5
-- minutes ago.  198.51.100.0/24 serves five keys within the hour; it served
-- a sixth two days ago.
-------------------------------------------------------------------------------
INSERT INTO apikey.key_networks (key_id, network, first_seen, last_seen, calls) VALUES
	(kid('steady'), '192.0.2.0/24', now() - '20 days'::interval, now(), 50000),
	(kid('spiky'), '192.0.2.0/24', now() - '20 days'::interval, now() - '10 minutes'::interval, 20000),
	(kid('spiky'), '203.0.113.0/24', now() - '5 minutes'::interval, now(), 3003),
	(kid('fresh'), '2001:db8:5::/48', now() - '5 minutes'::interval, now(), 450);
INSERT INTO apikey.key_networks (key_id, network, first_seen, last_seen, calls)
SELECT kid(n), '198.51.100.0/24', now() - '3 days'::interval, now() - '10 minutes'::interval, 10
  FROM unnest(ARRAY['steady', 'twice', 'ramp', 'short']) n;
INSERT INTO apikey.key_networks (key_id, network, first_seen, last_seen, calls)
SELECT kid('sixth'), '198.51.100.0/24', now() - '3 days'::interval, now() - '2 days'::interval, 10;
INSERT INTO apikey.key_networks (key_id, network, first_seen, last_seen, calls)
SELECT kid('spiky'), '198.51.100.0/24', now() - '1 hour'::interval, now(), 10;

-- key_status shows the network of the latest success
SELECT k.name, s.last_used_network FROM apikey.key_status s JOIN k ON k.id = s.key_id ORDER BY k.name;

-- shared_address: five keys within the hour (sixth was two days ago)
SELECT r.key_id, r.owner, r.network, r.evidence->'keys' AS keys, r.evidence->'owners' AS owners,
	   r.evidence->'calls' AS calls
  FROM apikey._rule_shared_address_eval(5, '1 hour', 0) r;
SELECT count(*) FROM apikey._rule_shared_address_eval(6, '1 hour', 0);
SELECT count(*) FROM apikey._rule_shared_address_eval(5, '1 hour', 51);
SELECT r.network, r.evidence->'keys' AS keys FROM apikey._rule_shared_address_eval(6, '3 days', 0) r;

-- new_networks: spiky's new network fires; steady's old one, and fresh's
-- first (a key without history), do not
SELECT k.name, r.owner, r.network, r.evidence->'calls' AS calls, r.evidence->'known_networks' AS known,
	   r.evidence->'new_networks' AS new
  FROM apikey._rule_new_networks_eval(1, '1 hour', 1) r JOIN k ON k.id = r.key_id ORDER BY k.name;
SELECT count(*) FROM apikey._rule_new_networks_eval(2, '1 hour', 1);
SELECT count(*) FROM apikey._rule_new_networks_eval(1, '1 hour', 5000);
SELECT count(*) FROM apikey._rule_new_networks_eval(1, '1 minute', 1);

-------------------------------------------------------------------------------
-- Retention: unseen for longer than retention, or of a deleted key, goes.
-------------------------------------------------------------------------------
INSERT INTO apikey.key_networks (key_id, network, first_seen, last_seen, calls) VALUES
	(kid('steady'), '10.1.2.0/24', now() - '200 days'::interval, now() - '91 days'::interval, 7),
	(kid('steady'), '10.1.3.0/24', now() - '200 days'::interval, now() - '89 days'::interval, 7),
	(kid('twice') + 1000, '10.1.4.0/24', now() - '1 day'::interval, now(), 7);
SELECT apikey._networks_maintain('90 days');
SELECT network FROM apikey.key_networks WHERE network << '10.0.0.0/8' ORDER BY network;
SELECT apikey._networks_maintain('2 days');
SELECT count(*) FROM apikey.key_networks WHERE network << '10.0.0.0/8';

-------------------------------------------------------------------------------
-- Bad input.
-------------------------------------------------------------------------------
SELECT q, networks_try(q) FROM unnest(ARRAY[
	'SELECT apikey.compute_baselines(NULL)',
	'SELECT apikey.compute_baselines(''0'')',
	'SELECT apikey.compute_baselines(''2 years'')',
	'SELECT apikey._networks_maintain(NULL)',
	'SELECT apikey._networks_maintain(''-1 day'')',
	'SELECT * FROM apikey._rule_shared_address_eval(NULL, ''1 hour'', 0)',
	'SELECT * FROM apikey._rule_shared_address_eval(5, NULL, 0)',
	'SELECT * FROM apikey._rule_new_networks_eval(0, ''1 hour'', 0)',
	'SELECT * FROM apikey._rule_new_networks_eval(1, ''-1 hour'', 0)',
	'SELECT * FROM apikey._rule_volume_spike_eval(10, ''10 minutes'', -1)',
	'SELECT * FROM apikey._rule_volume_spike_eval(-10, ''10 minutes'', 100)',
	'SELECT apikey._network_of(''not an address'')',
	'INSERT INTO apikey.key_networks VALUES (1, ''192.0.2.0/24'', now(), now(), 0)']) q;
-- a rule with no floor (min_calls NULL) runs
SELECT count(*) >= 0 AS ran FROM apikey._rule_volume_spike_eval(10, '10 minutes', NULL);

-------------------------------------------------------------------------------
-- Privileges: PUBLIC may call and read none of it.
-------------------------------------------------------------------------------
CREATE ROLE regress_networks_nobody;
SELECT p.oid::regprocedure AS fn, has_function_privilege('regress_networks_nobody', p.oid, 'EXECUTE') AS may
  FROM pg_proc p
 WHERE p.pronamespace = 'apikey'::regnamespace
   AND p.proname IN ('_network_of', 'compute_baselines', '_compute_baselines', '_networks_maintain',
					 '_rule_args_check', '_rule_shared_address_eval', '_rule_new_networks_eval',
					 '_rule_volume_spike_eval', '_network_overflow')
 ORDER BY 1::text;
SELECT t, has_table_privilege('regress_networks_nobody', t, 'SELECT') AS may
  FROM unnest(ARRAY['apikey.key_networks', 'apikey.key_baselines', 'apikey.suggested_limits']) t;
SET ROLE regress_networks_nobody;
SELECT networks_try('SELECT apikey.compute_baselines()');
SELECT networks_try('SELECT * FROM apikey.key_networks');
RESET ROLE;
-- a monitor reads them
SELECT apikey.grant_monitor('regress_networks_nobody');
SET ROLE regress_networks_nobody;
SELECT count(*) > 0 AS reads FROM apikey.key_networks;
SELECT count(*) > 0 AS reads FROM apikey.suggested_limits;
SELECT network_overflow IS NOT NULL AS counted FROM apikey.stats;
RESET ROLE;
SELECT apikey.revoke_monitor('regress_networks_nobody');
DROP ROLE regress_networks_nobody;
DROP EXTENSION apikey CASCADE;
