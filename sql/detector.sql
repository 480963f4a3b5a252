-- The detector: each rule this version implements fires once on crafted
-- usage (and nothing fires for a normal workload next to it), one open
-- finding per rule and subject however many passes run, resolve_finding
-- (what it closed is not reported again; new events are), actions
-- operators opt in to, bad rule configurations and bad input with their
-- SQLSTATEs, and privileges.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

-- Counts earlier suites left in shared memory go to the old table now, and
-- ids of keys here are their own.
SELECT apikey.flush_usage() >= 0 AS flushed;
TRUNCATE apikey.usage_log;
SELECT setval('apikey.keys_id_seq', (extract(epoch FROM clock_timestamp()) * 1000)::bigint) IS NOT NULL AS fresh_ids;
INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');

CREATE FUNCTION regress_try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE q;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

-- The seeded rules: notify only, canary_use critical.
SELECT kind, enabled, threshold, window_, min_calls, action, severity FROM apikey.detection_rules ORDER BY kind;

-- Keys: one per rule to trip, and the steady keys of a normal workload.
CREATE TEMP TABLE k (name text PRIMARY KEY, id bigint, token text);
INSERT INTO k SELECT 'spiky', key_id, token FROM apikey.issue('acme', '{orders:read}');
INSERT INTO k SELECT 'noisy', key_id, token FROM apikey.issue('acme', '{orders:read}');
INSERT INTO k SELECT 'fenced', key_id, token FROM apikey.issue('acme', allowed_cidrs => '{10.0.0.0/8}');
INSERT INTO k SELECT 'sleeper', key_id, token FROM apikey.issue('initech');
INSERT INTO k SELECT 'regular', key_id, token FROM apikey.issue('initech');
INSERT INTO k SELECT 'leaked', key_id, token FROM apikey.issue('hooli');
INSERT INTO k SELECT 'retired', key_id, token FROM apikey.issue('hooli');
INSERT INTO k SELECT 'steady', key_id, token FROM apikey.issue('umbrella');
SELECT apikey.report_leak((SELECT token FROM k WHERE name = 'leaked'), 'ci log') IS NOT NULL AS reported;
SELECT apikey.revoke((SELECT id FROM k WHERE name = 'retired'), 'rotated away');
-- issued long ago (as if)
UPDATE apikey.keys SET created_at = now() - interval '200 days'
 WHERE id IN (SELECT id FROM k WHERE name IN ('sleeper', 'regular'));

-- Crafted usage, as the usage writer would have written it.
CREATE FUNCTION regress_usage(key_name text, ago interval, code text, calls bigint, addr inet DEFAULT NULL)
RETURNS integer LANGUAGE sql AS $$
	WITH i AS (INSERT INTO apikey.usage_log (key_id, bucket, code, client_addr, calls)
			   SELECT k.id, date_trunc('minute', now() - ago), code, addr, calls FROM k WHERE k.name = key_name
			   RETURNING 1)
	SELECT count(*)::integer FROM i;
$$;
-- failure_spike: 30 scope_denied in the last minutes, none before (spiky);
-- as many, but the key always fails that much (noisy: its baseline).
SELECT regress_usage('spiky', '2 minutes', 'scope_denied', 30, '192.0.2.10');
SELECT regress_usage('noisy', '2 minutes', 'scope_denied', 30, '192.0.2.11');
SELECT regress_usage('noisy', '3 days', 'scope_denied', 30 * 1008, '192.0.2.11');
-- allowlist_violation: fenced presented from outside 10.0.0.0/8
SELECT regress_usage('fenced', '1 minute', 'address_denied', 2, '203.0.113.50');
SELECT regress_usage('fenced', '1 minute', 'valid', 40);
-- dormant_use: sleeper's last success 120 days ago, one now; regular's 2
-- days ago
SELECT regress_usage('sleeper', '120 days', 'valid', 3);
SELECT regress_usage('sleeper', '1 minute', 'valid', 1);
SELECT regress_usage('regular', '2 days', 'valid', 50);
SELECT regress_usage('regular', '1 minute', 'valid', 1);
-- revoked_use: the leaked key presented; a key revoked for another reason
-- presented (not this rule)
SELECT regress_usage('leaked', '1 minute', 'revoked', 3, '198.51.100.20');
SELECT regress_usage('retired', '1 minute', 'revoked', 3, '198.51.100.21');
-- the normal workload: steady succeeds every minute for an hour, with the
-- odd scope_denied
SELECT sum(regress_usage('steady', m * interval '1 minute', 'valid', 100)) AS minutes FROM generate_series(1, 60) m;
SELECT regress_usage('steady', '5 minutes', 'scope_denied', 2, '192.0.2.12');

-- address_failures: real calls, from addresses a trusted proxy asserts (the
-- superuser may): 120 unknown tokens from one, 5 from another.
SELECT token AS unknown FROM apikey._new_token('ak') \gset
SELECT count(*) FILTER (WHERE (apikey.check(:'unknown', NULL, '100.64.0.7')).code = 'unknown') AS unknown_calls
  FROM generate_series(1, 120);
SELECT count(*) FILTER (WHERE (apikey.check(:'unknown', NULL, '100.64.0.8')).code = 'unknown') AS unknown_calls
  FROM generate_series(1, 5);

-- One pass: exactly one finding per rule, for the right subject.  (The
-- connection's own address may also have failed often in earlier suites:
-- address_failures is shown for the asserted networks only.)
CREATE VIEW f AS
SELECT x.*, (SELECT name FROM k WHERE k.id = x.key_id) AS key_name
  FROM apikey.findings x
 WHERE x.rule <> 'address_failures' OR x.network <<= '100.64.0.0/10';
SELECT apikey.run_detection() >= 5 AS opened;
SELECT rule, key_name, owner, network, severity, action_taken, resolved_at IS NULL AS open FROM f ORDER BY rule;
SELECT rule, evidence - 'window' - 'first_use' - 'previous_use' - 'issued' - 'exposure_ids' AS evidence FROM f ORDER BY rule;
SELECT (evidence->>'previous_use')::timestamptz < now() - interval '119 days' AS previous_use_long_ago,
       evidence->'exposure_ids' = to_jsonb(apikey._exposure_ids(key_id)) AS names_exposures
  FROM f WHERE rule IN ('dormant_use', 'revoked_use') ORDER BY rule;
-- No token, no hash in any evidence.
SELECT count(*) AS evidence_with_secret FROM apikey.findings x, k
 WHERE strpos(x.evidence::text, substr(k.token, 4, 20)) > 0
    OR strpos(x.evidence::text, encode(apikey.hash(k.token), 'hex')) > 0;

-- More passes: nothing new, still one open finding per rule.
SELECT apikey.run_detection() AS opened_again;
SELECT apikey.run_detection() AS opened_again;
SELECT rule, count(*) AS open_findings FROM f WHERE resolved_at IS NULL GROUP BY rule ORDER BY rule;

-- resolve_finding: a false positive is closed and not reported again for
-- the same events; a new event reopens it.
SELECT apikey.resolve_finding(id, 'false_positive', 'load test from the office')
  FROM f WHERE rule = 'allowlist_violation';
SELECT resolution, resolution_note, resolved_by = current_user AS by_me FROM f WHERE rule = 'allowlist_violation';
SELECT regexp_replace(regress_try($$SELECT apikey.resolve_finding(id, 'mitigated') FROM f WHERE rule = 'allowlist_violation'$$),
                      ' \d+ ', ' N ') AS resolve_again;
SELECT apikey.run_detection() AS opened_after_resolve;
SELECT rule, count(*) FILTER (WHERE resolved_at IS NULL) AS open, count(*) AS total
  FROM f WHERE rule = 'allowlist_violation' GROUP BY rule;
SELECT regress_usage('fenced', '-1 minute', 'address_denied', 1, '203.0.113.50');
SELECT apikey.run_detection() AS opened_after_new_event;
SELECT rule, count(*) FILTER (WHERE resolved_at IS NULL) AS open, count(*) AS total
  FROM f WHERE rule = 'allowlist_violation' GROUP BY rule;

-- Actions are opt-in per rule: failure_spike suspends for an hour.  The
-- finding and the suspension commit together, and the suspension names it.
UPDATE apikey.detection_rules SET action = 'suspend', action_for = '1 hour' WHERE kind = 'failure_spike';
INSERT INTO k SELECT 'stuffed', key_id, token FROM apikey.issue('acme', '{orders:read}');
SELECT regress_usage('stuffed', '1 minute', 'scope_denied', 50, '192.0.2.13');
BEGIN;
SELECT apikey.run_detection() AS opened;
ROLLBACK;
SELECT code AS after_rolled_back_pass FROM apikey.check((SELECT token FROM k WHERE name = 'stuffed'));
SELECT apikey.run_detection() AS opened;
SELECT key_name, action_taken FROM f WHERE rule = 'failure_spike' AND key_name = 'stuffed';
SELECT code, retry_after > '59 minutes' AS retry_in_an_hour
  FROM apikey.check((SELECT token FROM k WHERE name = 'stuffed'));
SELECT s.finding_id = f.id AS suspension_names_finding, s.reason ~ '^detector: rule failure_spike' AS reason
  FROM apikey.suspensions s JOIN f ON f.key_id = s.key_id AND f.rule = 'failure_spike';
SELECT action, target_key_id = (SELECT id FROM k WHERE name = 'stuffed') AS the_key
  FROM apikey.audit_log WHERE action IN ('suspend', 'run_detection') ORDER BY seq DESC LIMIT 2;
-- An action that cannot be taken is recorded; the finding stays.
UPDATE apikey.detection_rules SET action = 'quarantine', quarantine_scopes = '{no:such:scope}' WHERE kind = 'failure_spike';
INSERT INTO k SELECT 'stuffed2', key_id, token FROM apikey.issue('acme', '{orders:read}');
SELECT regress_usage('stuffed2', '1 minute', 'scope_denied', 50, '192.0.2.14');
SET client_min_messages = error;	-- its WARNING names the key's id
SELECT apikey.run_detection() AS opened;
RESET client_min_messages;
SELECT key_name, action_taken FROM f WHERE key_name = 'stuffed2';
SELECT code AS stuffed2_still FROM apikey.check((SELECT token FROM k WHERE name = 'stuffed2'), 'orders:read');
UPDATE apikey.detection_rules SET action = 'notify', action_for = NULL, quarantine_scopes = NULL WHERE kind = 'failure_spike';

-- Disabling a rule stops it.
UPDATE apikey.detection_rules SET enabled = false WHERE kind = 'dormant_use';
SELECT apikey.resolve_finding(id, 'accepted') FROM f WHERE rule = 'dormant_use';
SELECT regress_usage('regular', '-1 minute', 'valid', 1);
UPDATE apikey.keys SET created_at = now() - interval '200 days' WHERE id = (SELECT id FROM k WHERE name = 'steady');
DELETE FROM apikey.usage_log WHERE key_id = (SELECT id FROM k WHERE name = 'steady') AND bucket < now() - interval '30 minutes';
SELECT apikey.run_detection() >= 0 AS ran;
SELECT count(*) AS dormant_findings_for_steady FROM f WHERE rule = 'dormant_use' AND key_name = 'steady';
UPDATE apikey.detection_rules SET enabled = true WHERE kind = 'dormant_use';

-- Bad rule configurations, refused with their SQLSTATEs.
SELECT regress_try($$UPDATE apikey.detection_rules SET action = 'delete' WHERE kind = 'dormant_use'$$);
SELECT regress_try($$UPDATE apikey.detection_rules SET action = 'throttle' WHERE kind = 'dormant_use'$$);
SELECT regress_try($$UPDATE apikey.detection_rules SET action = 'quarantine' WHERE kind = 'dormant_use'$$);
SELECT regress_try($$UPDATE apikey.detection_rules SET action = 'suspend' WHERE kind = 'address_failures'$$);
SELECT regress_try($$UPDATE apikey.detection_rules SET action = 'suspend' WHERE kind = 'canary_use'$$);
SELECT regress_try($$UPDATE apikey.detection_rules SET threshold = 0 WHERE kind = 'dormant_use'$$);
SELECT regress_try($$UPDATE apikey.detection_rules SET threshold = NULL WHERE kind = 'dormant_use'$$);
SELECT regress_try($$UPDATE apikey.detection_rules SET window_ = '0' WHERE kind = 'dormant_use'$$);
SELECT regress_try($$UPDATE apikey.detection_rules SET window_ = '8 days' WHERE kind = 'dormant_use'$$);
SELECT regress_try($$UPDATE apikey.detection_rules SET action_for = '-1 hour' WHERE kind = 'dormant_use'$$);
SELECT regress_try($$UPDATE apikey.detection_rules SET severity = 'urgent' WHERE kind = 'dormant_use'$$);
SELECT regress_try($$UPDATE apikey.detection_rules SET min_calls = -1 WHERE kind = 'dormant_use'$$);
SELECT regress_try($$INSERT INTO apikey.detection_rules (kind, threshold, window_, description) VALUES ('made_up', 1, '1 hour', 'x')$$);
SELECT regress_try($$INSERT INTO apikey.detection_rules (kind, threshold, window_, description) VALUES ('Bad Kind; DROP', 1, '1 hour', 'x')$$);
SELECT regress_try($$UPDATE apikey.detection_rules SET action = 'throttle', throttle_rate = 10, action_for = '10 minutes' WHERE kind = 'dormant_use'$$) AS throttle_ok;
-- a restored row of a seeded kind (pg_restore) replaces it
INSERT INTO apikey.detection_rules (kind, enabled, threshold, window_, description)
VALUES ('dormant_use', true, 30, '1 hour', 'as dumped');
SELECT kind, threshold, action, description FROM apikey.detection_rules WHERE kind = 'dormant_use';
SELECT count(*) AS rules FROM apikey.detection_rules;
-- rule edits are audited
SELECT action, details->'rows' AS rows FROM apikey.audit_log WHERE action LIKE 'detection_rules.%' ORDER BY seq;

-- Bad input.
SELECT regress_try($$SELECT apikey.resolve_finding(NULL, 'false_positive')$$);
SELECT regress_try($$SELECT apikey.resolve_finding(-1, 'false_positive')$$);
SELECT regress_try($$SELECT apikey.resolve_finding((SELECT min(id) FROM apikey.findings WHERE resolved_at IS NULL), NULL)$$);
SELECT regress_try($$SELECT apikey.resolve_finding((SELECT min(id) FROM apikey.findings WHERE resolved_at IS NULL), 'oops')$$);
SELECT regexp_replace(regress_try($$SELECT apikey.resolve_finding((SELECT min(id) FROM apikey.findings WHERE resolved_at IS NOT NULL), 'duplicate')$$),
                      ' \d+ ', ' N ') AS resolve_resolved;
SELECT regress_try($$SELECT apikey.resolve_finding((SELECT min(id) FROM apikey.findings WHERE resolved_at IS NULL), 'duplicate', repeat('x', 1001))$$);
SELECT regress_try($$INSERT INTO apikey.findings (rule, severity, evidence, action_taken) VALUES ('x', 'low', '{}', 'notified')$$);

-- Privileges: PUBLIC can call none of it; an admin (grant_admin) runs
-- passes, resolves findings and tunes rules; a monitor reads findings.
CREATE ROLE regress_detector_nobody;
CREATE ROLE regress_detector_admin;
CREATE ROLE regress_detector_monitor;
SELECT apikey.grant_admin('regress_detector_admin'), apikey.grant_monitor('regress_detector_monitor');
SET ROLE regress_detector_nobody;
SELECT regress_try($$SELECT apikey.run_detection()$$) AS run_detection,
       regress_try($$SELECT apikey.resolve_finding(1, 'false_positive')$$) AS resolve_finding,
       regress_try($$SELECT apikey._detect()$$) AS _detect,
       regress_try($$SELECT FROM apikey.findings$$) AS findings,
       regress_try($$SELECT FROM apikey.detection_rules$$) AS rules,
       regress_try($$SELECT FROM apikey._network_failures(now())$$) AS network_failures;
SET ROLE regress_detector_monitor;
SELECT regress_try($$SELECT FROM apikey.findings$$) AS findings,
       regress_try($$SELECT apikey.run_detection()$$) AS run_detection;
SET ROLE regress_detector_admin;
SELECT apikey.run_detection() >= 0 AS ran;
SELECT apikey.resolve_finding(min(id), 'duplicate') FROM apikey.findings WHERE resolved_at IS NULL;
SELECT regress_try($$UPDATE apikey.detection_rules SET threshold = 200 WHERE kind = 'address_failures'$$) AS tune,
       regress_try($$DELETE FROM apikey.detection_rules WHERE kind = 'address_failures'$$) AS delete_rule,
       regress_try($$UPDATE apikey.findings SET resolved_at = NULL$$) AS edit_findings;
RESET ROLE;
SELECT apikey.revoke_admin('regress_detector_admin'), apikey.revoke_monitor('regress_detector_monitor');
DROP ROLE regress_detector_nobody, regress_detector_admin, regress_detector_monitor;

-- Each finding opened was announced as finding.opened in its pass's
-- transaction (a rolled-back pass announced nothing), with the rule's
-- severity mapped to an event's.
WITH n AS (
  SELECT (SELECT count(*) FROM apikey.findings) AS findings,
         (SELECT count(*) FROM apikey.events WHERE kind = 'finding.opened') AS announced,
         (SELECT count(*) FROM apikey.events e JOIN apikey.findings f
             ON f.id = (e.payload->>'finding_id')::bigint AND f.rule = e.payload->>'rule'
                AND f.key_id IS NOT DISTINCT FROM e.key_id
          WHERE e.kind = 'finding.opened') AS naming)
SELECT findings >= 9 AS findings_opened, announced = findings AS each_announced,
       naming = findings AS each_names_its_finding
  FROM n;
SELECT DISTINCT f.severity AS finding_severity, e.severity AS event_severity
  FROM apikey.events e JOIN apikey.findings f ON f.id = (e.payload->>'finding_id')::bigint
 WHERE e.kind = 'finding.opened' ORDER BY 1;

-- Addresses are personal data: once a finding has not been seen for
-- apikey.address_retention, run_retention() drops the addresses from its
-- evidence and widens its network (and its finding.opened event's) to the
-- key_networks prefix (/24, /48).  Two open findings of one rule and key
-- in the same /24 become one (one open finding per subject): the older
-- stays open, the other is resolved as its duplicate, and both are
-- widened; a finding seen within the retention keeps everything.  A second
-- run finds nothing left to do, and an event payload that is not an
-- address is left alone.
SET apikey.address_retention = '1h';
SELECT id AS addr_key FROM apikey.keys ORDER BY id LIMIT 1 \gset
INSERT INTO apikey.findings (rule, key_id, network, severity, evidence, action_taken, last_seen_at, resolved_at, resolution)
VALUES ('allowlist_violation', :addr_key, '192.0.2.7/32', 'medium', '{"calls": 5, "addresses": ["192.0.2.7", "192.0.2.8"]}', 'notified', now() - interval '2 hours', now(), 'mitigated'),
       ('dormant_use', :addr_key, '2001:db8:1:2::/64', 'medium', '{"calls": 1}', 'notified', now() - interval '2 hours', NULL, NULL),
       ('revoked_use', :addr_key, '198.51.100.1/32', 'high', '{"addresses": ["198.51.100.1"]}', 'notified', now() - interval '2 hours', NULL, NULL),
       ('revoked_use', :addr_key, '198.51.100.2/32', 'high', '{"addresses": ["198.51.100.2"]}', 'notified', now() - interval '2 hours', NULL, NULL),
       ('allowlist_violation', :addr_key, '203.0.113.9/32', 'medium', '{"addresses": ["203.0.113.9"]}', 'notified', now() - interval '10 minutes', NULL, NULL);
INSERT INTO apikey.events (at, kind, key_id, severity, payload)
VALUES (now() - interval '2 hours', 'finding.opened', :addr_key, 'warning', '{"network": "192.0.2.7/32", "rule": "regress"}'),
       (now() - interval '10 minutes', 'finding.opened', :addr_key, 'warning', '{"network": "203.0.113.9/32", "rule": "regress"}');
INSERT INTO apikey.events (at, kind, key_id, severity, payload)
VALUES (now() - interval '2 hours', 'finding.opened', :addr_key, 'warning', '{"network": "not an address", "rule": "regress"}'),
       (now() - interval '2 hours', 'finding.opened', :addr_key, 'warning', '{"network": "10.0.0.5/24", "rule": "regress"}');
SELECT addresses_erased, more FROM apikey.run_retention();
SELECT addresses_erased, more FROM apikey.run_retention();
SELECT rule, network, evidence, resolved_at IS NOT NULL AS resolved, resolution
  FROM apikey.findings
 WHERE key_id = :addr_key AND network <<= ANY ('{192.0.2.0/24,2001:db8::/32,198.51.100.0/24,203.0.113.0/24}'::cidr[])
 ORDER BY network;
SELECT payload->>'network' AS event_network FROM apikey.events WHERE payload->>'rule' = 'regress' ORDER BY at, seq;
-- the audit row of resolve_finding names the wider network only
SELECT id AS open_addr FROM apikey.findings WHERE network = '203.0.113.9/32' \gset
SELECT apikey.resolve_finding(:open_addr, 'false_positive');
SELECT details->>'network' AS audited_network FROM apikey.audit_log
 WHERE action = 'resolve_finding' ORDER BY seq DESC LIMIT 1;
RESET apikey.address_retention;

DROP FUNCTION regress_try(text);
