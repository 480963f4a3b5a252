-- Reversible responses (issue 12): suspend/resume, quarantine/release,
-- suspend_owner/resume_owner, reissue.  The verdict codes suspended and
-- quarantined with their SQLSTATEs from authenticate(), timed responses
-- ending by the clock, bindings following them, key_status, bad input of
-- every function with its SQLSTATE, and privileges (PUBLIC may call none).
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

-- Run a statement; 'ok', or its SQLSTATE, message and hint.
CREATE FUNCTION respond_try(stmt text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	st text; msg text; hint text;
BEGIN
	EXECUTE stmt;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT;
	RETURN st || ': ' || msg || CASE WHEN hint <> '' THEN ' (hint: ' || hint || ')' ELSE '' END;
END
$$;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write'), ('billing:read');
SELECT key_id AS k1, token AS t1 FROM apikey.issue('acme', '{orders:read, orders:write}') \gset
SELECT key_id AS k2, token AS t2 FROM apikey.issue('acme', '{orders:*, billing:read}', quota => 10) \gset
SELECT key_id AS k3, token AS t3 FROM apikey.issue('globex', '{*}') \gset
SELECT key_id AS k4, token AS t4 FROM apikey.issue('acme', '{orders:read}') \gset

-------------------------------------------------------------------------------
-- suspend / resume
-------------------------------------------------------------------------------
SELECT code FROM apikey.check(:'t1');                       -- cached as valid
SELECT apikey.suspend(:k1, 'credential stuffing') AS newly_suspended;
SELECT apikey.suspend(:k1, 'still stuffing') AS newly_suspended;   -- replaces it
SELECT valid, code, key_id = :k1 AS same_key, retry_after FROM apikey.check(:'t1');
SELECT valid, code FROM apikey.check(:'t1', 'orders:read');
SELECT apikey.verify(:'t1');
SELECT respond_try(format('SELECT apikey.authenticate(%L)', :'t1'));
SELECT reason, until IS NULL AS indefinite, by = current_user AS by_me, finding_id
  FROM apikey.suspensions WHERE key_id = :k1;
SELECT key_id = :k1 AS k1, status FROM apikey.key_status WHERE key_id = :k1;
-- other keys of the owner are untouched
SELECT code FROM apikey.check(:'t4');
SELECT apikey.resume(:k1, 'false alarm') AS was_suspended;
SELECT apikey.resume(:k1) AS was_suspended;
SELECT valid, code FROM apikey.check(:'t1');
SELECT status FROM apikey.key_status WHERE key_id = :k1;

-- A rolled-back suspension never took effect.
BEGIN;
SELECT apikey.suspend(:k1, 'oops') AS newly_suspended;
ROLLBACK;
SELECT code FROM apikey.check(:'t1');

-- Timed: retry_after says how long; authenticate's hint too.  Once its
-- until has passed the key verifies again, although the record cached in
-- this backend still holds the suspension row: until is judged at the call.
SELECT apikey.suspend(:k1, 'cool down', '1 hour') AS newly_suspended;
SELECT code, retry_after > '59 minutes' AND retry_after <= '1 hour' AS about_an_hour
  FROM apikey.check(:'t1');
SELECT regexp_replace(respond_try(format('SELECT apikey.authenticate(%L)', :'t1')),
                      'ends in .*\.\)$', 'ends in <interval>.)');
SELECT status FROM apikey.key_status WHERE key_id = :k1;
SELECT apikey.suspend(:k1, 'a blink', '2 seconds') AS newly_suspended;
SELECT code FROM apikey.check(:'t1');                        -- cached now
SELECT pg_sleep(2.1);
SELECT code, retry_after FROM apikey.check(:'t1');           -- ended by the clock
SELECT status FROM apikey.key_status WHERE key_id = :k1;
SELECT apikey.suspend(:k1, 'again') AS newly_suspended;      -- an ended one does not count
SELECT apikey.resume(:k1);

-- A session binding ends at the next transaction after a suspension.
SELECT apikey.authenticate(:'t4', session => true) = :k4 AS bound;
SELECT apikey.suspend(:k4, 'bound session') AS newly_suspended;
SELECT apikey.current_key_id() IS NULL AS binding_ended;
SELECT apikey.resume(:k4);

-------------------------------------------------------------------------------
-- quarantine / release
-------------------------------------------------------------------------------
SELECT apikey.quarantine(:k2, '{orders:read}', 'writes look stolen') AS newly_quarantined;
SELECT n, (v).valid, (v).code, (v).scopes
  FROM (VALUES (1, 'orders:read'), (2, 'orders:write'), (3, 'billing:read'), (4, NULL),
               (5, 'unknown:scope')) AS c(n, scope),
       LATERAL apikey.check(:'t2', c.scope) v ORDER BY n;
SELECT respond_try(format('SELECT apikey.authenticate(%L, %L)', :'t2', 'orders:write'));
-- bound without a scope, the key holds only what the quarantine allows
BEGIN;
SELECT apikey.authenticate(:'t2') = :k2 AS bound;
SELECT apikey.has_scope('orders:read') AS reads, apikey.has_scope('orders:write') AS writes,
       apikey.has_scope('billing:read') AS billing;
SELECT respond_try('SELECT apikey.require_scope(''orders:write'')');
COMMIT;
-- a quarantine wider than the key grants nothing more
SELECT apikey.quarantine(:k4, '{*}', 'watch it') AS newly_quarantined;
SELECT (v).code, (v).scopes FROM apikey.check(:'t4') v;
SELECT (v).code FROM apikey.check(:'t4', 'orders:write') v;
SELECT apikey.release(:k4);
-- a pattern narrows a wider grant
SELECT apikey.quarantine(:k3, '{orders:*}', 'read orders only') AS newly_quarantined;
SELECT (v).code, (v).scopes FROM apikey.check(:'t3', 'orders:write') v;
SELECT (v).code FROM apikey.check(:'t3', 'billing:read') v;
SELECT apikey.quarantine(:k3, '{billing:read}', 'billing only now') AS newly_quarantined;
SELECT allowed_scopes, reason FROM apikey.quarantines WHERE key_id = :k3;
SELECT (v).code FROM apikey.check(:'t3', 'orders:write') v;
SELECT (v).code FROM apikey.check(:'t3', 'billing:read') v;
SELECT key_id = :k2 AS k2, status FROM apikey.key_status WHERE key_id IN (:k2, :k3) ORDER BY key_id;
-- a suspension outranks a quarantine
SELECT apikey.suspend(:k3, 'and stop') AS newly_suspended;
SELECT (v).code FROM apikey.check(:'t3', 'billing:read') v;
SELECT status FROM apikey.key_status WHERE key_id = :k3;
SELECT apikey.resume(:k3);
-- release, and release again
SELECT apikey.release(:k3) AS was_quarantined;
SELECT apikey.release(:k3) AS was_quarantined;
SELECT (v).code FROM apikey.check(:'t3', 'orders:write') v;
-- a timed quarantine ends by the clock
SELECT apikey.quarantine(:k3, '{billing:read}', 'a blink', '2 seconds') AS newly_quarantined;
SELECT (v).code FROM apikey.check(:'t3', 'orders:write') v;
SELECT pg_sleep(2.1);
SELECT (v).code FROM apikey.check(:'t3', 'orders:write') v;

-------------------------------------------------------------------------------
-- suspend_owner / resume_owner
-------------------------------------------------------------------------------
SELECT apikey.revoke(:k4, 'gone');
SELECT apikey.suspend_owner('acme', 'tenant breach');        -- k1, k2 (k4 is revoked)
SELECT code FROM apikey.check(:'t1');
SELECT code FROM apikey.check(:'t2', 'orders:read');
SELECT code FROM apikey.check(:'t3');                          -- globex untouched
SELECT owner, status, count(*) FROM apikey.key_status GROUP BY 1, 2 ORDER BY 1, 2;
SELECT apikey.suspend_owner('nobody', 'no keys');
SELECT apikey.resume_owner('acme', 'contained');
SELECT apikey.resume_owner('acme');
SELECT code FROM apikey.check(:'t1');
SELECT code FROM apikey.check(:'t4');                          -- still revoked
SELECT respond_try(format('SELECT apikey.resume(%s)', :k4));

-------------------------------------------------------------------------------
-- reissue
-------------------------------------------------------------------------------
SELECT respond_try(format('SELECT apikey.reissue(%s)', :k1));   -- in good standing
SELECT apikey.suspend(:k2, 'leaked in CI log');
SELECT code, remaining FROM apikey.check(:'t2', 'orders:read');  -- suspended: nothing spent
SELECT remaining AS k2_remaining FROM apikey.quotas WHERE key_id = :k2 \gset
SELECT key_id AS k5, token AS t5 FROM apikey.reissue(:k2) \gset
SELECT code FROM apikey.check(:'t2');                             -- old key revoked at once
-- the new key goes on from the old key's remaining quota
SELECT code, remaining = :k2_remaining - 1 AS quota_carried_over FROM apikey.check(:'t5', 'billing:read');
SELECT k.owner, s.rotated_from = :k2 AS from_k2, k.quota, k.metadata, s.scopes
  FROM apikey.keys k JOIN apikey.key_status s ON s.key_id = k.id WHERE k.id = :k5;
SELECT revoked_reason = 'reissued as key ' || :k5 AS reason_names_new_key
  FROM apikey.key_status WHERE key_id = :k2;
SELECT key_id IS NOT NULL AS reissued_revoked_key FROM apikey.reissue(:k4);
-- an expired key is not reissued
SELECT key_id AS k6 FROM apikey.issue('acme', expires_at => now() + interval '1 hour') \gset
SELECT apikey.suspend(:k6, 'x');
UPDATE apikey.keys SET expires_at = now() - interval '1 second' WHERE id = :k6;
SELECT respond_try(format('SELECT apikey.reissue(%s)', :k6));

-------------------------------------------------------------------------------
-- An exposed key (a row in apikey.exposures, whatever its action_taken)
-- cannot be resumed, and resume_owner skips it; reissue is its remedy, and
-- its audit row says the old key was exposed.
-------------------------------------------------------------------------------
INSERT INTO apikey.prefixes (prefix, leak_action) VALUES ('ak_live', 'suspend'), ('ak_test', 'notify');
INSERT INTO apikey.prefixes (prefix, public) VALUES ('pk', true);
SELECT key_id AS k7, token AS t7 FROM apikey.issue('initech', '{orders:read}', prefix => 'ak_live') \gset
SELECT key_id AS k8, token AS t8 FROM apikey.issue('initech', '{orders:read}', prefix => 'pk') \gset
SELECT key_id AS k9, token AS t9 FROM apikey.issue('initech', '{orders:read}') \gset
SELECT key_id AS k10, token AS t10 FROM apikey.issue('initech', '{orders:read}', prefix => 'ak_test') \gset
-- k7 suspended by its leak policy; k8 leaked under a public prefix (nothing
-- done), then suspended by hand.
SELECT apikey.report_leak(:'t7', 'support', 'TICKET-7') AS exposure7 \gset
SELECT apikey.report_leak(:'t8', 'support', 'TICKET-8') AS exposure8 \gset
SELECT apikey.suspend(:k8, 'abuse') AS newly_suspended;
SELECT key_id = :k7 AS k7, action_taken FROM apikey.exposures WHERE key_id IN (:k7, :k8) ORDER BY id;
SELECT respond_try(format('SELECT apikey.resume(%s, ''fixed'')', :k7));
SELECT respond_try(format('SELECT apikey.resume(%s)', :k8));
SELECT apikey.resume(:k7);
SELECT code FROM apikey.check(:'t7') UNION ALL SELECT code FROM apikey.check(:'t8');
-- resume_owner lifts k9's suspension only, and says what it skipped.
SELECT apikey.suspend_owner('initech', 'tenant breach');
SELECT apikey.resume_owner('initech', 'contained') AS resumed;
SELECT key_id = :k7 AS k7, key_id = :k8 AS k8, key_id = :k9 AS k9, status
  FROM apikey.key_status WHERE owner = 'initech' ORDER BY key_id;
SELECT details->'resumed' AS resumed, details->'key_ids' = jsonb_build_array(:k9, :k10) AS resumed_k9_k10,
       details->'skipped_exposed' AS skipped,
       details->'exposed_key_ids' = jsonb_build_array(:k7, :k8) AS skipped_k7_k8
  FROM apikey.audit_log WHERE action = 'resume_owner' ORDER BY seq DESC LIMIT 1;
-- reissue: allowed for an exposed key, suspended or live (leak_action
-- notify), and the audit row names the exposures; a reissue of a key that
-- never leaked says exposed false.
SELECT key_id AS k11 FROM apikey.reissue(:k8) \gset
SELECT apikey.report_leak(:'t10', 'support', 'TICKET-10') AS exposure10 \gset
SELECT code FROM apikey.check(:'t10');
SELECT key_id IS NOT NULL AS reissued_live_exposed_key FROM apikey.reissue(:k10);
SELECT target_key_id = :k8 AS k8, details->'exposed' AS exposed,
       details->'exposure_ids' = jsonb_build_array(:exposure8) AS names_exposure8,
       details->'exposure_ids' = jsonb_build_array(:exposure10) AS names_exposure10
  FROM apikey.audit_log WHERE action = 'reissue' AND target_key_id IN (:k8, :k10) ORDER BY seq;
SELECT details->'exposed' AS exposed, details->'exposure_ids' AS exposure_ids
  FROM apikey.audit_log WHERE action = 'reissue' AND target_key_id = :k2;
SELECT code FROM apikey.check(:'t8') UNION ALL SELECT code FROM apikey.check(:'t10');

-------------------------------------------------------------------------------
-- Bad input: every function, a specific SQLSTATE, nothing written.
-------------------------------------------------------------------------------
SELECT (SELECT count(*) FROM apikey.suspensions) AS susp, (SELECT count(*) FROM apikey.quarantines) AS quar,
       (SELECT count(*) FROM apikey.keys) AS keys \gset before_
SELECT stmt, respond_try(stmt) FROM (VALUES
	('SELECT apikey.suspend(NULL, ''r'')'),
	('SELECT apikey.suspend(999999, ''r'')'),
	(format('SELECT apikey.suspend(%s, NULL)', :k1)),
	(format('SELECT apikey.suspend(%s, ''  '')', :k1)),
	(format('SELECT apikey.suspend(%s, ''r'', ''0'')', :k1)),
	(format('SELECT apikey.suspend(%s, ''r'', ''-1 hour'')', :k1)),
	('SELECT apikey.resume(NULL)'),
	('SELECT apikey.resume(999999)'),
	('SELECT apikey.suspend_owner(NULL, ''r'')'),
	('SELECT apikey.suspend_owner('''', ''r'')'),
	('SELECT apikey.suspend_owner(''acme'', NULL)'),
	('SELECT apikey.suspend_owner(''acme'', ''r'', ''0'')'),
	('SELECT apikey.suspend_owner(''acme'', ''r'', ''-1 day'')'),
	('SELECT apikey.resume_owner(NULL)'),
	('SELECT apikey.resume_owner('''')'),
	('SELECT apikey.quarantine(NULL, ''{orders:read}'', ''r'')'),
	('SELECT apikey.quarantine(999999, ''{orders:read}'', ''r'')'),
	(format('SELECT apikey.quarantine(%s, NULL, ''r'')', :k1)),
	(format('SELECT apikey.quarantine(%s, ''{}'', ''r'')', :k1)),
	(format('SELECT apikey.quarantine(%s, ''{NULL}'', ''r'')', :k1)),
	(format('SELECT apikey.quarantine(%s, ''{no:such}'', ''r'')', :k1)),
	(format('SELECT apikey.quarantine(%s, ''{orders:read}'', NULL)', :k1)),
	(format('SELECT apikey.quarantine(%s, ''{orders:read}'', ''r'', ''0'')', :k1)),
	(format('SELECT apikey.quarantine(%s, ''{orders:read}'', ''r'', ''-5 minutes'')', :k1)),
	('SELECT apikey.release(NULL)'),
	('SELECT apikey.release(999999)'),
	('SELECT apikey.reissue(NULL)'),
	('SELECT apikey.reissue(999999)')
) AS t(stmt);
SELECT (SELECT count(*) FROM apikey.suspensions) = :before_susp AS no_suspension_written,
       (SELECT count(*) FROM apikey.quarantines) = :before_quar AS no_quarantine_written,
       (SELECT count(*) FROM apikey.keys) = :before_keys AS no_key_written;

-------------------------------------------------------------------------------
-- Privileges: PUBLIC may call none of the responses nor read their tables;
-- an administrator role granted them may.
-------------------------------------------------------------------------------
CREATE ROLE regress_respond_user;
CREATE ROLE regress_respond_admin;
SELECT f AS function, has_function_privilege('regress_respond_user', f, 'EXECUTE') AS public_can_execute
  FROM unnest(ARRAY['apikey.suspend(bigint, text, interval)', 'apikey.resume(bigint, text)',
                    'apikey.suspend_owner(text, text, interval)', 'apikey.resume_owner(text, text)',
                    'apikey.quarantine(bigint, text[], text, interval)', 'apikey.release(bigint)',
                    'apikey.reissue(bigint)', 'apikey._response_key(bigint, text, interval, text)']) AS f;
SELECT t AS relation, has_table_privilege('regress_respond_user', t, 'SELECT, INSERT, UPDATE, DELETE') AS public_has_any
  FROM unnest(ARRAY['apikey.suspensions', 'apikey.quarantines']) AS t;
SET ROLE regress_respond_user;
SELECT respond_try(format('SELECT apikey.suspend(%s, ''r'')', :k1));
SELECT respond_try('DELETE FROM apikey.suspensions');
RESET ROLE;
GRANT EXECUTE ON FUNCTION apikey.suspend(bigint, text, interval), apikey.resume(bigint, text)
	TO regress_respond_admin;
SET ROLE regress_respond_admin;
SELECT apikey.suspend(:k1, 'by the admin role') AS newly_suspended;
RESET ROLE;
SELECT by = 'regress_respond_admin' AS recorded_acting_role FROM apikey.suspensions WHERE key_id = :k1;
SET ROLE regress_respond_admin;
SELECT apikey.resume(:k1) AS was_suspended;
RESET ROLE;

-- every verdict code is counted in apikey.stats
SELECT (calls ? 'suspended') AS counts_suspended, (calls ? 'quarantined') AS counts_quarantined
  FROM apikey.stats;

SET client_min_messages = warning;
DROP EXTENSION apikey CASCADE;
DROP ROLE regress_respond_user;
DROP ROLE regress_respond_admin;
DROP FUNCTION respond_try(text);
RESET client_min_messages;
