-- Events you can LISTEN to (issue 12 items 5 and 6): apikey.events is
-- written by apikey._event() only, once per change, in the changing
-- transaction (nothing on rollback); the periodic pass run_events() says
-- what time brings once each (running it twice says nothing new); no
-- payload carries a token or a hash; retention; expire_unused() and
-- key_status.last_failed_at; bad input with its SQLSTATE; privileges.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

-- Run a statement; 'ok', or its SQLSTATE and message.
CREATE FUNCTION events_try(stmt text) RETURNS text
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

-- The events after a mark, without what varies between runs.
CREATE TEMP TABLE mark (seq bigint);
INSERT INTO mark VALUES (0);
CREATE FUNCTION new_events() RETURNS TABLE (kind text, key_id bigint, owner text, severity text, payload jsonb)
LANGUAGE sql AS $$
	SELECT e.kind, e.key_id, e.owner, e.severity,
		   e.payload - '{by,since,until,expires_at,refilled_at,hint}'::text[]
	  FROM apikey.events e WHERE e.seq > (SELECT seq FROM mark) ORDER BY e.seq;
$$;
CREATE FUNCTION next_mark() RETURNS void
LANGUAGE sql AS $$ UPDATE mark SET seq = (SELECT coalesce(max(seq), 0) FROM apikey.events) $$;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
CREATE TEMP TABLE tok (name text PRIMARY KEY, id bigint, token text);
INSERT INTO tok SELECT 'a1', key_id, token FROM apikey.issue('acme', '{orders:read}', 'a1');
INSERT INTO tok SELECT 'a2', key_id, token FROM apikey.issue('acme', '{orders:read}', 'a2');
INSERT INTO tok SELECT 'g1', key_id, token FROM apikey.issue('globex', '{orders:read}', 'g1');
SELECT id AS a1, token AS ta1 FROM tok WHERE name = 'a1' \gset
SELECT id AS a2 FROM tok WHERE name = 'a2' \gset
SELECT id AS g1, token AS tg1 FROM tok WHERE name = 'g1' \gset

-- Issuing says nothing.
SELECT count(*) AS events_after_issue FROM apikey.events;

-------------------------------------------------------------------------------
-- Changes to a key: one event each, in the changing transaction.
-------------------------------------------------------------------------------
SELECT apikey.suspend(:a1, 'credential stuffing', '1 hour');
SELECT apikey.resume(:a1, 'false alarm');
SELECT apikey.quarantine(:a1, '{orders:read}', 'writes look stolen');
SELECT apikey.release(:a1);
SELECT apikey.suspend_owner('acme', 'tenant breach');
SELECT apikey.resume_owner('acme', 'contained');
SELECT * FROM new_events();
SELECT next_mark();

-- A rollback says nothing: not in the table, and no NOTIFY (it is sent at
-- commit only; t/034_events_listen.pl listens).
BEGIN;
SELECT apikey.suspend(:a1, 'rolled back') AS suspended;
SELECT count(*) AS events_inside FROM new_events();
ROLLBACK;
SELECT count(*) AS events_after_rollback FROM new_events();

-- Revocations, whatever revokes: revoke, revoke_token, revoke_owner (each
-- key), a leak report (critical), reissue's old key.
INSERT INTO tok SELECT 'r' || i, key_id, token FROM generate_series(1, 4) i, apikey.issue('initech', '{}', 'r' || i);
SELECT apikey.revoke((SELECT id FROM tok WHERE name = 'r1'), 'done');
SELECT apikey.revoke_token((SELECT token FROM tok WHERE name = 'r2'), 'pasted in a ticket');
SELECT apikey.report_leak((SELECT token FROM tok WHERE name = 'r3'), 'support', 'T-1') IS NOT NULL AS reported;
SELECT apikey.revoke_owner('initech', 'tenant gone');
SELECT apikey.suspend(:g1, 'looks stolen');
INSERT INTO tok SELECT 'g2', key_id, token FROM apikey.reissue(:g1);
SELECT kind, key_id = (SELECT id FROM tok t WHERE t.name = 'g1') AS is_g1, owner, severity, payload
  FROM new_events();
-- revoking again says nothing
SELECT apikey.revoke(:g1, 'again');
SELECT count(*) AS events_after_second_revoke FROM new_events()
 WHERE kind = 'key.revoked' AND key_id = :g1;
SELECT next_mark();

-- A key deleted with its suspension: no key.resumed for a key that is gone.
INSERT INTO tok SELECT 'd', key_id, token FROM apikey.issue('umbrella', '{}', 'd');
SELECT apikey.suspend((SELECT id FROM tok WHERE name = 'd'), 'about to go');
SELECT next_mark();
DELETE FROM apikey.keys WHERE id = (SELECT id FROM tok WHERE name = 'd');
SELECT count(*) AS events_after_delete FROM new_events();
-- Direct DML (what pg_restore does) says nothing; the audit trail has it.
INSERT INTO apikey.revocations (key_id, revoked_by, reason) VALUES (:a2, 'regress', 'by hand');
SELECT count(*) AS events_after_direct_insert FROM new_events();
SELECT action FROM apikey.audit_log ORDER BY seq DESC LIMIT 1;

-------------------------------------------------------------------------------
-- Never a token or a hash: not in any payload written above, and refused
-- by the writer by shape.
-------------------------------------------------------------------------------
SELECT count(*) AS payloads_with_token_or_hash
  FROM apikey.events e, tok t
 WHERE strpos(e.payload::text, t.token) > 0
    OR strpos(e.payload::text, substr(t.token, 4)) > 0
    OR strpos(e.payload::text, encode(apikey.hash(t.token), 'hex')) > 0
    OR strpos(e.payload::text, encode(apikey.hash(t.token), 'base64')) > 0;
SELECT count(*) AS payloads_with_token_shape
  FROM apikey.events e, apikey._scan_tokens(e.payload::text) s;
-- A value shaped like a token or a hash is replaced, never refused (an
-- event rides on a revocation, which must not fail because of it); a field
-- named like one is dropped.
SELECT events_try(format($$SELECT apikey._event('key.revoked', NULL, NULL, 'info', jsonb_build_object('note', %L, 'k', 1)) > 0$$,
					   'see ' || :'ta1'));
SELECT events_try(format($$SELECT apikey._event('key.revoked', NULL, NULL, 'info', jsonb_build_object('h', %L)) > 0$$,
					   encode(apikey.hash(:'ta1'), 'hex')));
SELECT events_try($$SELECT apikey._event('key.revoked', NULL, NULL, 'info', '{"token_hash": 1, "k": 2}') > 0$$);
SELECT events_try($$SELECT apikey._event('key.revoked', NULL, NULL, 'info', '{"nested": {"secret": "x"}}') > 0$$);
SELECT payload FROM apikey.events ORDER BY seq DESC LIMIT 4;
-- A suspend whose reason holds a token suspends the key; the reason is
-- kept with the token's hint in its place.
SELECT events_try(format($$SELECT apikey.suspend(%s, %L)$$, :a1, 'leaked: ' || :'ta1'));
SELECT count(*) AS suspensions_with_token FROM apikey.suspensions WHERE reason LIKE '%' || :'ta1' || '%';
SELECT reason = 'leaked: ' || k.hint AS reason_holds_the_hint
  FROM apikey.suspensions s JOIN apikey.keys k ON k.id = s.key_id WHERE s.key_id = :a1;
SELECT (apikey.check(:'ta1')).code AS suspended_anyway;
SELECT apikey.resume(:a1, 'test over') AS resumed;
-- A key whose name holds a digest (or a field-like "token":) is revoked
-- all the same, and its event carries no digest.
SELECT key_id AS hex_id, token AS hex_tok FROM apikey.issue('mallory',
	name => 'build e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855') \gset
SELECT key_id AS quo_id, token AS quo_tok FROM apikey.issue('mallory', name => 'x token": y') \gset
SELECT apikey.revoke(:hex_id, 'compromised') AS revoked_hex_name,
       apikey.revoke(:quo_id, 'compromised') AS revoked_token_name;
SELECT (apikey.check(:'hex_tok')).code AS hex_name_key, (apikey.check(:'quo_tok')).code AS token_name_key;
SELECT key_id = :hex_id AS hex_key, payload->>'name' AS name, payload->>'redacted' AS redacted
  FROM apikey.events WHERE kind = 'key.revoked' AND key_id IN (:hex_id, :quo_id) ORDER BY seq;
SELECT next_mark();
-- bad kind, severity, payload
SELECT events_try($$SELECT apikey._event('key.exploded', NULL, NULL, 'info', '{}')$$);
SELECT events_try($$SELECT apikey._event(NULL, NULL, NULL, 'info', '{}')$$);
SELECT events_try($$SELECT apikey._event('key.revoked', NULL, NULL, 'panic', '{}')$$);
SELECT events_try($$SELECT apikey._event('key.revoked', NULL, NULL, 'info', '[1]')$$);
-- a valid one from SQL returns its seq, as the lead's finding.opened will
SELECT apikey._event('finding.opened', :a2, 'acme', 'critical', '{"finding_id": 1, "rule": "canary_use"}') AS seq \gset
SELECT :seq = max(seq) AS returns_seq, (SELECT kind FROM apikey.events WHERE seq = :seq) FROM apikey.events;
SELECT next_mark();

-------------------------------------------------------------------------------
-- The periodic pass: key.expiring, quota.low, rate_limit.saturated, once
-- each; a second pass says nothing new.
-------------------------------------------------------------------------------
INSERT INTO tok SELECT 'x3d', key_id, token FROM apikey.issue('hooli', '{}', 'x3d', now() + interval '3 days');
INSERT INTO tok SELECT 'x12h', key_id, token FROM apikey.issue('hooli', '{}', 'x12h', now() + interval '12 hours');
INSERT INTO tok SELECT 'x30d', key_id, token FROM apikey.issue('hooli', '{}', 'x30d', now() + interval '30 days');
-- issued ten days ago (a key issued inside the window is meant to be short-lived)
UPDATE apikey.keys SET created_at = now() - interval '10 days'
 WHERE id IN (SELECT id FROM tok WHERE name IN ('x3d', 'x12h', 'x30d'));
INSERT INTO tok SELECT 'short', key_id, token FROM apikey.issue('hooli', '{}', 'short', now() + interval '1 hour');
SELECT apikey.run_events() AS first_pass;
SELECT * FROM new_events();
SELECT apikey.run_events() AS second_pass;
SELECT next_mark();
-- the 3-day key comes within a day: the 1-day event, once
UPDATE apikey.keys SET expires_at = now() + interval '20 hours' WHERE id = (SELECT id FROM tok WHERE name = 'x3d');
SELECT apikey.run_events() AS pass, apikey.run_events() AS again;
SELECT * FROM new_events();
SELECT next_mark();
-- a rotated key in its grace is expected to expire: nothing
INSERT INTO tok SELECT 'rot', key_id, token FROM apikey.issue('hooli', '{}', 'rot');
SELECT count(*) FROM apikey.rotate((SELECT id FROM tok WHERE name = 'rot'), '1 hour');
SELECT apikey.run_events() AS pass_after_rotate;

-- quota.low at 80, 90 and 100 % used, once each, armed again by a refill
INSERT INTO tok SELECT 'q', key_id, token FROM apikey.issue('quota-co', '{}', 'q', quota => 10);
SELECT id AS q, token AS tq FROM tok WHERE name = 'q' \gset
SELECT count(*) FILTER (WHERE (apikey.check(:'tq')).valid) AS valid FROM generate_series(1, 7);
SELECT apikey.run_events() AS pass_at_70;
SELECT valid FROM apikey.check(:'tq');
SELECT apikey.run_events() AS pass_at_80, apikey.run_events() AS again;
SELECT valid FROM apikey.check(:'tq');
SELECT apikey.run_events() AS pass_at_90;
SELECT valid FROM apikey.check(:'tq');
SELECT apikey.run_events() AS pass_at_100, apikey.run_events() AS again;
SELECT * FROM new_events();
SELECT next_mark();
SELECT apikey.set_limits(:q, quota => 10);        -- a refill
SELECT count(*) FILTER (WHERE (apikey.check(:'tq')).valid) AS valid FROM generate_series(1, 10);
SELECT apikey.run_events() AS pass_after_refill, apikey.run_events() AS again;
SELECT kind, payload->'level' AS level FROM new_events();
SELECT next_mark();

-- rate_limit.saturated: refused by its rate limit this hour, once
-- (not in the last 30 seconds of an hour: the pass counts this hour only)
SELECT pg_sleep(CASE WHEN date_trunc('hour', clock_timestamp()) + interval '1 hour' - clock_timestamp() < interval '30 seconds'
					 THEN 31 ELSE 0 END);
INSERT INTO tok SELECT 'rl', key_id, token FROM apikey.issue('ratey', '{}', 'rl', rate_limit => 2);
SELECT id AS rl, token AS trl FROM tok WHERE name = 'rl' \gset
SELECT apikey.run_events() AS pass_before;
SELECT code, count(*) FROM (SELECT (apikey.check(:'trl')).code FROM generate_series(1, 5)) c GROUP BY code ORDER BY code;
SELECT apikey.run_events() AS pass, apikey.run_events() AS again;
SELECT apikey.flush_usage() > 0 AS flushed;
SELECT apikey.run_events() AS after_flush;
SELECT kind, key_id = :rl AS is_rl, severity, payload->'rate_limit' AS rate_limit,
	   payload->'rate_limited_calls' AS refused FROM new_events();
SELECT next_mark();

-------------------------------------------------------------------------------
-- Retention: the pass deletes events older than apikey.event_retention
-- (0 keeps them).
-------------------------------------------------------------------------------
SHOW apikey.event_retention;
UPDATE apikey.events SET at = now() - interval '31 days' WHERE seq <= 3;
SET apikey.event_retention = 0;
SELECT apikey.run_events();
SELECT count(*) AS old_kept FROM apikey.events WHERE seq <= 3;
RESET apikey.event_retention;
SELECT apikey.run_events();
SELECT count(*) AS old_left FROM apikey.events WHERE seq <= 3;
SELECT count(*) > 0 AS newer_kept FROM apikey.events;

-------------------------------------------------------------------------------
-- expire_unused(): revokes keys unused that long (never used: since
-- issued), reason unused, with events and an audit row.
-------------------------------------------------------------------------------
SELECT events_try('SELECT apikey.expire_unused(NULL)');
SELECT events_try($$SELECT apikey.expire_unused('0')$$);
SELECT events_try($$SELECT apikey.expire_unused('-1 day')$$);
INSERT INTO tok SELECT 'old_never', key_id, token FROM apikey.issue('stale', '{}', 'old_never');
INSERT INTO tok SELECT 'old_used', key_id, token FROM apikey.issue('stale', '{}', 'old_used');
INSERT INTO tok SELECT 'old_used_long_ago', key_id, token FROM apikey.issue('stale', '{}', 'old_used_long_ago');
INSERT INTO tok SELECT 'old_pending', key_id, token FROM apikey.issue('stale', '{}', 'old_pending');
UPDATE apikey.keys SET created_at = now() - interval '400 days'
 WHERE id IN (SELECT id FROM tok WHERE name LIKE 'old%');
UPDATE apikey.keys SET last_used_at = now() - interval '10 days' WHERE id = (SELECT id FROM tok WHERE name = 'old_used');
UPDATE apikey.keys SET last_used_at = now() - interval '380 days' WHERE id = (SELECT id FROM tok WHERE name = 'old_used_long_ago');
-- used just now, not flushed yet: live counters keep it
SELECT valid FROM apikey.check((SELECT token FROM tok WHERE name = 'old_pending'));
SELECT t.name FROM apikey.expire_unused() x JOIN tok t ON t.id = x ORDER BY 1;
SELECT t.name, s.status, s.revoked_reason FROM apikey.key_status s JOIN tok t ON t.id = s.key_id
 WHERE t.name LIKE 'old%' ORDER BY 1;
SELECT kind, owner, severity, payload->>'reason' AS reason FROM new_events();
SELECT action, details - 'key_ids' AS details, jsonb_array_length(details->'key_ids') AS keys
  FROM apikey.audit_log ORDER BY seq DESC LIMIT 1;
SELECT count(*) AS second_call FROM apikey.expire_unused();
SELECT next_mark();

-- the pass does it when apikey.unused_revoke_after is set (off by default)
SHOW apikey.unused_revoke_after;
INSERT INTO tok SELECT 'old2', key_id, token FROM apikey.issue('stale', '{}', 'old2');
UPDATE apikey.keys SET created_at = now() - interval '40 days' WHERE id = (SELECT id FROM tok WHERE name = 'old2');
SELECT apikey.run_events() AS pass_off;
SET apikey.unused_revoke_after = '30d';
SELECT apikey._event_settings();
SELECT apikey.run_events() AS pass_on;
RESET apikey.unused_revoke_after;
SELECT kind, owner, payload->>'reason' AS reason FROM new_events();
-- (the range's units are printed from PostgreSQL 16 on: left out)
SELECT regexp_replace(events_try($$SET apikey.unused_revoke_after = '-1'$$), ' \(.*\)$', '') AS events_try;
SELECT next_mark();

-------------------------------------------------------------------------------
-- key_status.last_failed_at: the minute of the last failure, once flushed.
-------------------------------------------------------------------------------
INSERT INTO tok SELECT 'f', key_id, token FROM apikey.issue('failing', '{orders:read}', 'f');
INSERT INTO tok SELECT 'ok', key_id, token FROM apikey.issue('failing', '{orders:read}', 'ok');
SELECT code FROM apikey.check((SELECT token FROM tok WHERE name = 'f'), 'orders:write');
SELECT code FROM apikey.check((SELECT token FROM tok WHERE name = 'ok'), 'orders:read');
SELECT apikey.flush_usage() > 0 AS flushed;
SELECT t.name, s.last_failed_at = date_trunc('minute', s.last_failed_at) AS on_a_minute,
	   s.last_failed_at > now() - interval '2 minutes' AS recent
  FROM apikey.key_status s JOIN tok t ON t.id = s.key_id WHERE t.name IN ('f', 'ok') ORDER BY 1;

-------------------------------------------------------------------------------
-- Privileges: PUBLIC reads no events and runs neither function; a monitor
-- reads events; an admin also runs both.
-------------------------------------------------------------------------------
CREATE ROLE regress_events_public;
CREATE ROLE regress_events_monitor;
CREATE ROLE regress_events_admin;
SELECT apikey.grant_monitor('regress_events_monitor');
SELECT apikey.grant_admin('regress_events_admin');
SET ROLE regress_events_public;
SELECT events_try('SELECT count(*) FROM apikey.events');
SELECT events_try('SELECT apikey.run_events()');
SELECT events_try('SELECT apikey.expire_unused()');
SELECT events_try($$SELECT apikey._event('key.revoked', NULL, NULL, 'info', '{}')$$);
SELECT events_try('SELECT apikey._run_events()');
SELECT events_try('SET apikey.events_notify = off');   -- nobody silences an event of theirs
SET ROLE regress_events_monitor;
SELECT events_try('SELECT count(*) FROM apikey.events');
SELECT events_try('SELECT apikey.run_events()');
SET ROLE regress_events_admin;
SELECT events_try('SELECT apikey.run_events()');
SELECT events_try('SELECT apikey.expire_unused()');
SELECT events_try($$SELECT apikey._event('key.revoked', NULL, NULL, 'info', '{}')$$);
RESET ROLE;
SELECT apikey.revoke_admin('regress_events_admin');
SELECT apikey.revoke_monitor('regress_events_monitor');
DROP ROLE regress_events_public, regress_events_monitor, regress_events_admin;
