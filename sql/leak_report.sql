-- Reporting leaks: report_leak(), report_leak_hash(), GitHub's payload
-- through report_leaks(), and revoke_leaked() for a reporter role.  Each
-- records an exposure once per key and reference (a resend is the same
-- exposure), applies the prefix's policy (revoke by default; a public
-- prefix only reported; notify records only) and writes its audit row.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

CREATE TEMP TABLE tok (name text PRIMARY KEY, id bigint, token text);
INSERT INTO tok SELECT n, key_id, token FROM unnest(ARRAY['a', 'b', 'c', 'gh_live', 'gh_revoked']) n, LATERAL apikey.issue('acme', name => n) i;
INSERT INTO tok SELECT 'public', key_id, token FROM apikey.issue('acme', prefix => 'pk');
INSERT INTO tok SELECT 'notify', key_id, token FROM apikey.issue('acme', prefix => 'ak_test');
INSERT INTO tok SELECT 'unknown', NULL, token FROM apikey._new_token('ak');
INSERT INTO tok SELECT n, key_id, token
  FROM unnest(ARRAY['sus', 'sus_timed', 'sus_revoked', 'sus_gh', 'sus_rl']) n,
       LATERAL apikey.issue('acme', name => n, prefix => 'ak_live') i;
INSERT INTO tok SELECT 'public2', key_id, token FROM apikey.issue('acme', prefix => 'pk');
SELECT apikey.revoke(id, 'earlier') FROM tok WHERE name = 'gh_revoked';
CREATE FUNCTION t(n text) RETURNS text LANGUAGE sql AS 'SELECT token FROM tok WHERE name = n';
-- A token with its last character changed (so its checksum no longer holds).
CREATE FUNCTION broken(tok text) RETURNS text LANGUAGE sql
    AS $$SELECT left(tok, -1) || CASE right(tok, 1) WHEN 'x' THEN 'y' ELSE 'x' END$$;
CREATE FUNCTION k(n text) RETURNS bigint LANGUAGE sql AS 'SELECT id FROM tok WHERE name = n';

-- Leak policies per prefix: revoke (the default), suspend, notify.
INSERT INTO apikey.prefixes (prefix, public, description) VALUES ('pk', true, 'publishable keys');
INSERT INTO apikey.prefixes (prefix, leak_action) VALUES ('ak_test', 'notify');
INSERT INTO apikey.prefixes (prefix, leak_action) VALUES ('ak_live', 'suspend');
INSERT INTO apikey.prefixes (prefix, leak_action) VALUES ('ak_other', 'delete');
INSERT INTO apikey.prefixes (prefix) VALUES ('AK');
SELECT * FROM apikey.prefixes ORDER BY prefix;

-------------------------------------------------------------------------------
-- report_leak(token, source, reference)
-------------------------------------------------------------------------------
SELECT apikey.report_leak(t('a'), 'support', 'TICKET-1') AS exposure_a \gset
SELECT :exposure_a IS NOT NULL AS recorded, (apikey.check(t('a'))).code,
       (SELECT reason FROM apikey.revocations WHERE key_id = k('a')) AS reason;
-- A resend is the same exposure; another reference of the same key is a new one.
SELECT apikey.report_leak(t('a'), 'support', 'TICKET-1') = :exposure_a AS same_exposure;
SELECT apikey.report_leak(t('a'), 'support', 'TICKET-2') <> :exposure_a AS new_exposure;
SELECT apikey.report_leak(t('b'), 'gitleaks') IS NOT NULL AS without_reference,
       apikey.report_leak(t('b'), 'gitleaks') IS NOT NULL AS resent;
SELECT key_id = k('a') AS a, source, reference, action_taken, reported_by = current_user AS by_me,
       token_hash = apikey.hash(t(CASE WHEN key_id = k('a') THEN 'a' ELSE 'b' END)) AS hash_ok,
       reported_at >= found_at AS times
  FROM apikey.exposures ORDER BY id;
-- A public prefix is only reported; notify records without revoking.
SELECT apikey.report_leak(t('public'), 'support') IS NOT NULL AS public_recorded,
       apikey.report_leak(t('notify'), 'support') IS NOT NULL AS notify_recorded;
SELECT (apikey.check(t('public'))).code AS public_key, (apikey.check(t('notify'))).code AS notify_key,
       (SELECT string_agg(action_taken, ',' ORDER BY id) FROM apikey.exposures
         WHERE key_id IN (k('public'), k('notify'))) AS actions;
-- A token that matches no key: NULL, nothing recorded.
SELECT count(*) AS exposures_before FROM apikey.exposures \gset
SELECT apikey.report_leak(t('unknown'), 'support') IS NULL AS no_key;
SELECT count(*) - :exposures_before AS new_exposures FROM apikey.exposures;
-- A key revoked as leaked cannot be rotated back to life.
SELECT apikey.rotate(k('a'));
-- Bad input.
\set VERBOSITY sqlstate
SELECT apikey.report_leak('ak_nope', 'support');
SELECT apikey.report_leak(NULL, 'support');
SELECT apikey.report_leak(t('c'), NULL);
SELECT apikey.report_leak(t('c'), ' ');
SELECT apikey.report_leak(t('c'), repeat('s', 201));
SELECT apikey.report_leak(t('c'), 'support', repeat('r', 2049));
SELECT apikey.report_leak(t('c'), 'support', 'see ' || t('c'));
SELECT apikey.report_leak(t('c'), t('c'));
\set VERBOSITY default
SELECT apikey.report_leak(t('c'), 'support', 'see ' || t('c'));
SELECT (apikey.check(t('c'))).code AS c_untouched;

-------------------------------------------------------------------------------
-- report_leak_hash(hash, source, reference): for scanners that share only
-- the SHA-256.
-------------------------------------------------------------------------------
SELECT apikey.report_leak_hash(decode(encode(apikey.hash(t('c')), 'base64'), 'base64'), 'partner', 'https://example.com/x')
       IS NOT NULL AS recorded,
       (apikey.check(t('c'))).code;
SELECT apikey.report_leak_hash(apikey.hash('not a token'), 'partner') IS NULL AS no_key;
\set VERBOSITY sqlstate
SELECT apikey.report_leak_hash(NULL, 'partner');
SELECT apikey.report_leak_hash('\x00', 'partner');
SELECT apikey.report_leak_hash(apikey.hash(t('c')), '');
\set VERBOSITY default

-------------------------------------------------------------------------------
-- report_leaks(payload): GitHub's secret scanning payload as is, and its
-- feedback array.  Live, already revoked, unknown, malformed entries.
-------------------------------------------------------------------------------
CREATE TEMP TABLE payload AS
SELECT jsonb_build_array(
	jsonb_build_object('token', t('gh_live'), 'type', 'apikey_token', 'url', 'https://github.com/o/r/blob/abc/config.yml', 'source', 'content'),
	jsonb_build_object('token', t('gh_revoked'), 'type', 'apikey_token', 'url', 'https://github.com/o/r/issues/1', 'source', 'issue_comment'),
	jsonb_build_object('token', t('unknown'), 'type', 'apikey_token', 'url', 'https://gist.github.com/x', 'source', 'gist'),
	jsonb_build_object('token', broken(t('gh_live')), 'type', 'apikey_token', 'url', 'https://github.com/o/r/2', 'source', 'content'),
	jsonb_build_object('token', 42, 'type', 'apikey_token'),
	jsonb_build_object('type', 'apikey_token'),
	'"not an object"'::jsonb) AS p;
-- The feedback, with each raw token replaced by its name here.
SELECT f->>'label' AS label, f->>'token_type' AS token_type,
       COALESCE((SELECT name FROM tok WHERE token = f->>'token_raw'),
                CASE WHEN f->>'token_raw' = broken(t('gh_live')) THEN 'broken checksum' END,
                (f->'token_raw')::text) AS token
  FROM payload, jsonb_array_elements(apikey.report_leaks(p)) WITH ORDINALITY AS x(f, i) ORDER BY i;
SELECT (apikey.check(t('gh_live'))).code AS gh_live,
       (SELECT string_agg(source || ' ' || reference || ' ' || action_taken, '; ' ORDER BY id)
          FROM apikey.exposures WHERE key_id IN (k('gh_live'), k('gh_revoked'))) AS exposures;
-- Resending the same payload: the same answer, no new exposure.
SELECT count(*) AS exposures_before FROM apikey.exposures \gset
SELECT string_agg(f->>'label', ',' ORDER BY i) AS labels
  FROM payload, jsonb_array_elements(apikey.report_leaks(p)) WITH ORDINALITY AS x(f, i);
SELECT count(*) - :exposures_before AS new_exposures FROM apikey.exposures;
SELECT apikey.report_leaks('[]');
\set VERBOSITY sqlstate
SELECT apikey.report_leaks(NULL);
SELECT apikey.report_leaks('{"token": "x"}');
SELECT apikey.report_leaks((SELECT jsonb_agg(jsonb_build_object('token', 'x')) FROM generate_series(1, 1001)));
\set VERBOSITY default

-------------------------------------------------------------------------------
-- revoke_leaked(tokens): for members of apikey_reporter.  It says how many
-- tokens were well-formed, never whether a key matched.
-------------------------------------------------------------------------------
INSERT INTO tok SELECT n, key_id, token FROM unnest(ARRAY['r1', 'r2']) n, LATERAL apikey.issue('globex', name => n) i;
CREATE ROLE regress_leak_scanner;
CREATE ROLE regress_leak_stranger;
GRANT apikey_reporter TO regress_leak_scanner;
SELECT t('r1') AS r1, t('r2') AS r2, t('unknown') AS unk \gset
SET ROLE regress_leak_scanner;
SELECT apikey.revoke_leaked(ARRAY[:'r1', :'r1', :'unk', 'ak_garbage', NULL, '']) AS well_formed;
SELECT apikey.revoke_leaked(ARRAY[:'unk']) AS unknown_alone, apikey.revoke_leaked('{}') AS none;
SELECT * FROM apikey.exposures;
RESET ROLE;
SELECT (apikey.check(:'r1')).code AS r1, (apikey.check(:'r2')).code AS r2,
       (SELECT source || ' ' || action_taken FROM apikey.exposures WHERE key_id = k('r1')) AS exposure;
SET ROLE regress_leak_stranger;
SELECT apikey.revoke_leaked(ARRAY[:'r2']);
RESET ROLE;
\set VERBOSITY sqlstate
SELECT apikey.revoke_leaked(NULL);
SELECT apikey.revoke_leaked(array_fill('x'::text, ARRAY[1001]));
\set VERBOSITY default
SELECT (apikey.check(:'r2')).code AS r2_untouched;

-------------------------------------------------------------------------------
-- leak_action suspend (prefix ak_live): each way of reporting suspends the
-- key with no end instead of revoking it; the reason names the exposure.
-------------------------------------------------------------------------------
SELECT apikey.report_leak(t('sus'), 'support', 'TICKET-9') AS exposure_sus \gset
SELECT (apikey.check(t('sus'))).code, s.until IS NULL AS no_end,
       s.reason = format('leaked: exposure %s (support)', :exposure_sus) AS reason_names_exposure,
       NOT EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id = k('sus')) AS not_revoked,
       (SELECT action_taken FROM apikey.exposures WHERE id = :exposure_sus) AS action_taken
  FROM apikey.suspensions s WHERE s.key_id = k('sus');
SELECT status FROM apikey.key_status WHERE key_id = k('sus');
-- A resend is the same exposure and changes nothing; another reference
-- finds the key already suspended.
SELECT apikey.report_leak(t('sus'), 'support', 'TICKET-9') = :exposure_sus AS same_exposure;
SELECT apikey.report_leak(t('sus'), 'gitleaks', 'commit abc') AS exposure_sus2 \gset
SELECT action_taken, (SELECT reason FROM apikey.suspensions WHERE key_id = k('sus'))
                     = format('leaked: exposure %s (support)', :exposure_sus) AS first_reason_kept
  FROM apikey.exposures WHERE id = :exposure_sus2;
-- A timed suspension is replaced by one with no end: a leak does not lapse.
SELECT apikey.suspend(k('sus_timed'), 'cool down', '1 hour') AS newly_suspended;
SELECT apikey.report_leak_hash(apikey.hash(t('sus_timed')), 'partner') IS NOT NULL AS recorded;
SELECT (apikey.check(t('sus_timed'))).code, s.until IS NULL AS no_end, e.action_taken
  FROM apikey.suspensions s, apikey.exposures e
 WHERE s.key_id = k('sus_timed') AND e.key_id = k('sus_timed');
-- A revoked key stays revoked, nothing suspended.
SELECT apikey.revoke(k('sus_revoked'), 'earlier');
SELECT apikey.report_leak(t('sus_revoked'), 'support') IS NOT NULL AS recorded;
SELECT e.action_taken, NOT EXISTS (SELECT FROM apikey.suspensions s WHERE s.key_id = k('sus_revoked')) AS not_suspended
  FROM apikey.exposures e WHERE e.key_id = k('sus_revoked');
-- GitHub's payload and revoke_leaked follow the same policy.
SELECT f->>'label' AS label
  FROM jsonb_array_elements(apikey.report_leaks(jsonb_build_array(jsonb_build_object(
       'token', t('sus_gh'), 'type', 'apikey_token', 'url', 'https://github.com/o/r/3', 'source', 'content')))) f;
SELECT t('sus_rl') AS sus_rl \gset
SET ROLE regress_leak_scanner;
SELECT apikey.revoke_leaked(ARRAY[:'sus_rl']) AS well_formed;
RESET ROLE;
SELECT k.name, (apikey.check(k.token)).code, e.source, e.action_taken,
       s.reason = format('leaked: exposure %s (%s)', e.id, e.source) AS reason_names_exposure
  FROM tok k JOIN apikey.exposures e ON e.key_id = k.id JOIN apikey.suspensions s ON s.key_id = k.id
 WHERE k.name IN ('sus_gh', 'sus_rl') ORDER BY k.name;
-- A public prefix is still only reported, whatever its leak_action.
UPDATE apikey.prefixes SET leak_action = 'suspend' WHERE prefix = 'pk';
SELECT apikey.report_leak(t('public2'), 'support') IS NOT NULL AS recorded;
SELECT (apikey.check(t('public2'))).code, e.action_taken
  FROM apikey.exposures e WHERE e.key_id = k('public2');
-- The audit rows say what was done.
SELECT action, details->>'action_taken' AS action_taken, details->>'repeated' AS repeated
  FROM apikey.audit_log WHERE target_key_id IN (k('sus'), k('sus_timed'), k('sus_revoked'))
   AND action LIKE 'report_leak%' ORDER BY seq;

-------------------------------------------------------------------------------
-- Each call wrote its audit row, and the chain holds.
-------------------------------------------------------------------------------
SELECT action, count(*) AS calls, count(target_key_id) AS with_target,
       bool_and(details ? 'key_ids' OR details ? 'matched') AS described
  FROM apikey.audit_log
 WHERE action IN ('report_leak', 'report_leak_hash', 'report_leaks', 'revoke_leaked')
 GROUP BY action ORDER BY action;
SELECT details FROM apikey.audit_log WHERE action = 'revoke_leaked' ORDER BY seq LIMIT 1;
SELECT details - 'exposure_id' AS details FROM apikey.audit_log
 WHERE action = 'report_leak' AND details->>'reference' = 'TICKET-1' ORDER BY seq;
SELECT count(*) AS rows_with_a_token
  FROM apikey.audit_log a, tok WHERE strpos(a::text, tok.token) > 0 OR strpos(a::text, substr(tok.token, 4, 43)) > 0;
SELECT * FROM apikey.audit_verify();

-- The reporter role exists, cannot log in, and may call revoke_leaked only.
SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = 'apikey_reporter';
SELECT p.oid::regprocedure AS reporter_may_execute FROM pg_proc p
 WHERE p.pronamespace = 'apikey'::regnamespace
   AND has_function_privilege('apikey_reporter', p.oid, 'EXECUTE')
   AND NOT has_function_privilege('regress_leak_stranger', p.oid, 'EXECUTE');

DROP ROLE regress_leak_scanner;
DROP ROLE regress_leak_stranger;
DROP FUNCTION t(text);
DROP FUNCTION broken(text);
DROP FUNCTION k(text);
