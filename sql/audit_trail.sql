-- The audit trail: every administrative function appends one row in its
-- own transaction (a test lists them from pg_proc, so a new one without a
-- row fails here), direct DML on the key tables is recorded by statement
-- triggers, rows hold who and what but never a token or hash, and nobody,
-- the owner included, changes or deletes a row except through audit_prune().
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

-- A fresh install has an empty chain.
SELECT count(*) AS rows FROM apikey.audit_log;
SELECT only_row, xact FROM apikey.audit_head;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
CREATE ROLE regress_audit_admin;
GRANT EXECUTE ON FUNCTION
	apikey.issue(text, text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[]),
	apikey.issue_many(text[], text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[]),
	apikey.revoke(bigint, text), apikey.revoke_token(text, text), apikey.rotate(bigint, interval),
	apikey.set_limits(bigint, integer, interval, bigint, interval, cidr[]), apikey.revoke_owner(text, text)
	TO regress_audit_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON apikey.scopes TO regress_audit_admin;
CREATE ROLE regress_audit_granted;

-------------------------------------------------------------------------------
-- One row per administrative call.  The administrative functions are the
-- SECURITY DEFINER, VOLATILE functions of schema apikey that are not
-- internal (_name) or triggers; each must have a call below.
-------------------------------------------------------------------------------
CREATE TEMP TABLE tok (name text PRIMARY KEY, id bigint, token text);
INSERT INTO tok SELECT 'spare', key_id, token FROM apikey.issue('spare');
INSERT INTO tok SELECT 'byhash', key_id, token FROM apikey.issue('leaky');
CREATE TEMP TABLE calls (n serial, fn name, q text);
INSERT INTO calls (fn, q) VALUES
	('issue', $$INSERT INTO tok SELECT 'k', key_id, token FROM apikey.issue('acme', '{orders:read}', 'checkout', metadata => '{"team": "ops"}')$$),
	('issue_many', $$INSERT INTO tok SELECT 'm' || row_number() OVER (), key_id, token FROM apikey.issue_many('{initech,hooli}', '{orders:read}', 'batch')$$),
	('set_limits', $$SELECT apikey.set_limits((SELECT id FROM tok WHERE name = 'k'), 10, '1 minute', 100)$$),
	('set_owner_limits', $$SELECT apikey.set_owner_limits('acme', rate_limit => 1000, quota => 1000, max_keys => 100)$$),
	('suspend', $$SELECT apikey.suspend((SELECT id FROM tok WHERE name = 'k'), 'credential stuffing', '1 hour')$$),
	('resume', $$SELECT apikey.resume((SELECT id FROM tok WHERE name = 'k'), 'false alarm')$$),
	('quarantine', $$SELECT apikey.quarantine((SELECT id FROM tok WHERE name = 'k'), '{orders:read}', 'writes look stolen')$$),
	('release', $$SELECT apikey.release((SELECT id FROM tok WHERE name = 'k'))$$),
	('suspend_owner', $$SELECT apikey.suspend_owner('acme', 'tenant breach')$$),
	('resume_owner', $$SELECT apikey.resume_owner('acme', 'contained')$$),
	('throttle', $$SELECT apikey.throttle((SELECT id FROM tok WHERE name = 'k'), 60, '1 hour')$$),
	('rotate', $$INSERT INTO tok SELECT 'k2', key_id, token FROM apikey.rotate((SELECT id FROM tok WHERE name = 'k'), '1 hour')$$),
	('revoke', $$SELECT apikey.revoke((SELECT id FROM tok WHERE name = 'k'), 'rotated away')$$),
	('revoke_token', $$SELECT apikey.revoke_token((SELECT token FROM tok WHERE name = 'k2'), 'leaked in a ticket')$$),
	('revoke_owner', $$SELECT apikey.revoke_owner('spare', 'tenant gone')$$),
	('audit_prune', $$SELECT apikey.audit_prune('100 years')$$),
	('run_events', $$SELECT apikey.run_events()$$),
	('expire_unused', $$SELECT apikey.expire_unused('100 years')$$),
	('report_leak', $$SELECT apikey.report_leak((SELECT token FROM tok WHERE name = 'spare'), 'support', 'T-1')$$),
	('report_leak_hash', $$SELECT apikey.report_leak_hash(apikey.hash((SELECT token FROM tok WHERE name = 'byhash')), 'partner')$$),
	('report_leaks', $$SELECT apikey.report_leaks(jsonb_build_array(jsonb_build_object('token', (SELECT token FROM tok WHERE name = 'spare'), 'type', 't', 'url', 'https://example.com/1')))$$),
	('revoke_leaked', $$SELECT apikey.revoke_leaked(ARRAY[(SELECT token FROM tok WHERE name = 'spare')])$$),
	('reissue', $$INSERT INTO tok SELECT 'k3', key_id, token FROM apikey.reissue((SELECT id FROM tok WHERE name = 'k'))$$),
	('compute_baselines', $$SELECT apikey.compute_baselines('1 day')$$),
	('grant_admin', $$SELECT apikey.grant_admin('regress_audit_granted')$$),
	('revoke_admin', $$SELECT apikey.revoke_admin('regress_audit_granted')$$),
	('grant_monitor', $$SELECT apikey.grant_monitor('regress_audit_granted')$$),
	('revoke_monitor', $$SELECT apikey.revoke_monitor('regress_audit_granted')$$),
	('grant_reporter', $$SELECT apikey.grant_reporter('regress_audit_granted')$$),
	('revoke_reporter', $$SELECT apikey.revoke_reporter('regress_audit_granted')$$),
	('run_retention', $$SELECT more FROM apikey.run_retention()$$);

SELECT p.oid::regprocedure AS admin_function_without_call
  FROM pg_proc p
 WHERE p.pronamespace = 'apikey'::regnamespace AND p.prosecdef AND p.provolatile = 'v'
   AND p.proname !~ '^_' AND p.prorettype <> 'trigger'::regtype
   AND NOT EXISTS (SELECT FROM calls c WHERE c.fn = p.proname)
 ORDER BY 1;

-- Each call in its own transaction: one new row, whose
-- action is the function's name.
SET apikey.actor = 'alice@example.com';
SET application_name = 'regress-admin';
CREATE TEMP TABLE rows_per_call (n int, fn name, new_rows bigint, actions text);
DO $$
DECLARE
	c record;
	before bigint;
BEGIN
	FOR c IN SELECT * FROM calls ORDER BY n LOOP
		SELECT COALESCE(max(seq), 0) INTO before FROM apikey.audit_log;
		EXECUTE c.q;
		INSERT INTO rows_per_call
		SELECT c.n, c.fn, count(*), string_agg(action, ',' ORDER BY seq)
		  FROM apikey.audit_log WHERE seq > before;
	END LOOP;
END
$$;
SELECT fn, new_rows, actions, actions = fn AS named_after_function FROM rows_per_call ORDER BY n;
SELECT * FROM apikey.audit_verify();

-- What the rows hold (the prune removed nothing: every row is younger than
-- 100 years).
SELECT seq, action, actor_role = current_user AS by_me, session_role = session_user AS session,
       actor_claim, application_name, target_key_id = (SELECT id FROM tok WHERE name = 'k') AS targets_k,
       target_owner
  FROM apikey.audit_log ORDER BY seq;
SELECT details - 'hint' AS details, details->>'hint' = (SELECT hint FROM apikey.keys WHERE id = target_key_id) AS hint_is_the_keys
  FROM apikey.audit_log WHERE action = 'issue' AND target_owner = 'acme';
-- issue_many: one row for the batch, naming every key, owner and hint.
SELECT details - 'key_ids' - 'hints' AS details,
       details->'key_ids' = (SELECT jsonb_agg(id ORDER BY name) FROM tok WHERE name LIKE 'm_') AS key_ids_are_the_batch,
       details->'hints' = (SELECT jsonb_agg(k.hint ORDER BY t.name) FROM tok t JOIN apikey.keys k ON k.id = t.id
                            WHERE t.name LIKE 'm_') AS hints_are_the_keys,
       target_key_id IS NULL AND target_owner IS NULL AS no_single_target
  FROM apikey.audit_log WHERE action = 'issue_many';
SELECT details - 'new_key_id' - 'new_hint' - 'key_ids' - 'new' AS rotate_details,
       details->'key_ids' = jsonb_build_array((SELECT id FROM tok WHERE name = 'k'), (SELECT id FROM tok WHERE name = 'k2')) AS both_keys
  FROM apikey.audit_log WHERE action = 'rotate';
SELECT action, details - 'exposure_id' - 'exposure_ids' - 'key_ids' AS details FROM apikey.audit_log
 WHERE action IN ('set_limits', 'revoke', 'revoke_token', 'revoke_owner', 'audit_prune', 'report_leak',
                  'report_leak_hash', 'report_leaks', 'revoke_leaked')
 ORDER BY seq;
-- The responses: old and new values (times, which depend on now(), as
-- whether they are an hour on), the keys an owner-wide call touched.
SELECT action, target_key_id = (SELECT id FROM tok WHERE name = 'k') AS targets_k,
       details - 'until' - 'old' - 'key_ids' - 'new_key_id' - 'new_hint' AS details,
       (details->>'until')::timestamptz - at BETWEEN '59 minutes' AND '1 hour' AS until_in_an_hour,
       nullif(details->'old', 'null') - 'since' - 'until' AS old,
       details->'key_ids' = jsonb_build_array((SELECT id FROM tok WHERE name = 'k')) AS key_ids_k,
       details->'key_ids' = jsonb_build_array((SELECT id FROM tok WHERE name = 'k'), (SELECT id FROM tok WHERE name = 'k3')) AS key_ids_k_k3
  FROM apikey.audit_log
 WHERE action IN ('suspend', 'resume', 'quarantine', 'release', 'suspend_owner', 'resume_owner', 'throttle', 'reissue')
 ORDER BY seq;

-- The actor is the session's role, not the function's owner; a bound key
-- is recorded too.  The key bound is a live one issued for this step (the
-- keys above are revoked by now), so authenticate() succeeds; issue()
-- writes its row in C, set_limits() in PL/pgSQL: both record it.
INSERT INTO tok SELECT 'actor', key_id, token FROM apikey.issue('actor');
GRANT SELECT, INSERT ON tok TO regress_audit_admin;
SET ROLE regress_audit_admin;
BEGIN;
SELECT apikey.authenticate((SELECT token FROM tok WHERE name = 'actor')) = (SELECT id FROM tok WHERE name = 'actor')
       AS bound_actor_key;
INSERT INTO tok SELECT 'by_bound', key_id, token FROM apikey.issue('globex');
SELECT apikey.set_limits((SELECT id FROM tok WHERE name = 'by_bound'), 10);
COMMIT;
RESET ROLE;
SELECT action, actor_role, session_role = session_user AS session,
       actor_key_id IS NOT DISTINCT FROM (SELECT id FROM tok WHERE name = 'actor') AS actor_key_is_bound_key
  FROM apikey.audit_log ORDER BY seq DESC LIMIT 2;

-- A call that fails leaves no row; a rolled-back call neither.
SELECT count(*) AS rows_before FROM apikey.audit_log \gset
SELECT apikey.revoke(-1);
SELECT apikey.issue('');
SELECT apikey.suspend(-1, 'no such key');
BEGIN;
SELECT count(*) FROM apikey.issue('rolled back');
ROLLBACK;
SELECT count(*) - :rows_before AS new_rows FROM apikey.audit_log;

-------------------------------------------------------------------------------
-- Direct DML on the key tables, one row per statement.
-------------------------------------------------------------------------------
SELECT max(seq) AS before FROM apikey.audit_log \gset
UPDATE apikey.keys SET name = 'renamed by hand' WHERE id = (SELECT id FROM tok WHERE name = 'k2');
UPDATE apikey.keys SET last_used_at = now();                       -- the usage writer's update: not recorded
UPDATE apikey.quotas SET remaining = remaining;                    -- quota debits: not recorded
INSERT INTO apikey.key_scopes VALUES ((SELECT id FROM tok WHERE name = 'k2'), 'orders:write');
DELETE FROM apikey.revocations WHERE key_id = (SELECT id FROM tok WHERE name = 'k2');
SET ROLE regress_audit_admin;
INSERT INTO apikey.scopes (name) VALUES ('billing:read');
RESET ROLE;
BEGIN;
TRUNCATE apikey.quotas;
ROLLBACK;
SELECT seq - :before AS n, action, actor_role, target_key_id = (SELECT id FROM tok WHERE name = 'k2') AS targets_k2,
       details - 'old' - 'new' AS summary
  FROM apikey.audit_log WHERE seq > :before ORDER BY seq;
SELECT details->'old'->0->>'name' AS old_name, details->'new'->0->>'name' AS new_name,
       details->'new'->0 ? 'hash' AS hash_listed
  FROM apikey.audit_log WHERE action = 'keys.update';
-- Many rows: values of 100 listed, the count exact.
INSERT INTO apikey.scopes (name) SELECT 'bulk:' || i FROM generate_series(1, 150) i;
SELECT action, details->'rows' AS rows, jsonb_array_length(details->'new') AS listed
  FROM apikey.audit_log ORDER BY seq DESC LIMIT 1;
-- Also under session_replication_role = replica.
SET session_replication_role = replica;
DELETE FROM apikey.scopes WHERE name LIKE 'bulk:%';
RESET session_replication_role;
SELECT action, details->'rows' AS rows FROM apikey.audit_log ORDER BY seq DESC LIMIT 1;
SELECT * FROM apikey.audit_verify();

-------------------------------------------------------------------------------
-- Never a token or a hash: every token issued here, its secret, its hash
-- (hex and base64) searched in every row.
-------------------------------------------------------------------------------
SELECT count(*) AS rows_with_a_secret
  FROM apikey.audit_log a, tok t, apikey.keys k
 WHERE k.id = t.id
   AND (strpos(a::text, t.token) > 0 OR strpos(a::text, substr(t.token, 4, 43)) > 0
        OR strpos(a::text, encode(k.hash, 'hex')) > 0 OR strpos(a::text, encode(k.hash, 'base64')) > 0);

-------------------------------------------------------------------------------
-- The chain is append-only, for the owner too.
-------------------------------------------------------------------------------
\set VERBOSITY sqlstate
UPDATE apikey.audit_log SET actor_claim = 'mallory';
DELETE FROM apikey.audit_log;
TRUNCATE apikey.audit_log;
INSERT INTO apikey.audit_log (action, details) VALUES ('forged', '{}');
UPDATE apikey.audit_head SET xact = NULL;
DELETE FROM apikey.audit_head;
INSERT INTO apikey.audit_head VALUES (false, NULL);
TRUNCATE apikey.audit_head;
SELECT apikey._audit('forged', NULL, NULL, '{}');
\set VERBOSITY default
UPDATE apikey.audit_log SET actor_claim = 'mallory';
INSERT INTO apikey.audit_log (action, details) VALUES ('forged', '{}');
-- The setting that marks an administrative call is the superuser's only.
SET ROLE regress_audit_admin;
SET apikey.audit_context = 'revoke';
SELECT set_config('apikey.audit_context', 'revoke', true);
RESET ROLE;
-- No privilege on the chain for anyone but the owner.
SELECT c.relname, has_table_privilege('regress_audit_admin', c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE') AS any_privilege
  FROM pg_class c WHERE c.relnamespace = 'apikey'::regnamespace AND c.relname IN ('audit_log', 'audit_head', 'audit')
 ORDER BY 1;

-------------------------------------------------------------------------------
-- The audit view and audit_for_token().
-------------------------------------------------------------------------------
SELECT a.hashed_token = encode(k.hash, 'base64') AS github_form, length(a.hashed_token) AS len
  FROM apikey.audit a JOIN apikey.keys k ON k.id = a.target_key_id
 WHERE a.action = 'issue' AND a.target_owner = 'acme';
SELECT action FROM apikey.audit_for_token((SELECT token FROM tok WHERE name = 'k2'));
SELECT count(*) AS for_unknown FROM apikey.audit_for_token((SELECT token FROM apikey._new_token('ak')));
SELECT apikey.audit_for_token('ak_not_a_token');
SELECT apikey.audit_for_token(NULL);

-- The checkpoint is the newest row.
SELECT c.seq = a.seq AS same_seq, c.row_hash = a.row_hash AS same_hash, c.at = a.at AS same_time
  FROM apikey.audit_checkpoint() c, (SELECT * FROM apikey.audit_log ORDER BY seq DESC LIMIT 1) a;

-- Clean up.
SET client_min_messages = warning;
DROP EXTENSION apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
DROP TABLE tok;
DROP ROLE regress_audit_admin, regress_audit_granted;
