-- Limits per owner (apikey.owners): a rate limit, credits, an allowlist
-- and max_keys shared by all keys of one owner.  Rate windows of an hour
-- make every outcome deterministic (nothing refills within the test).
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

-- Run a statement; 'ok', or its SQLSTATE and message.
CREATE FUNCTION owner_try(stmt text) RETURNS text
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
-- An owner without a row: nothing changes (limited_by only names a key's).
-------------------------------------------------------------------------------
SELECT token AS t_solo FROM apikey.issue('solo') \gset
SELECT token AS t_solo_rl FROM apikey.issue('solo', rate_limit => 3, rate_window => '1 hour') \gset
SELECT valid, code, remaining, limited_by FROM apikey.check(:'t_solo');
SELECT valid, code, remaining, limited_by FROM apikey.check(:'t_solo_rl');
-- limited_by is the verdict's last attribute
SELECT attname, attnum FROM pg_attribute
 WHERE attrelid = 'apikey.verdict'::regclass AND attnum > 6 ORDER BY attnum;

-------------------------------------------------------------------------------
-- Rate: three keys of one owner share its 5 per hour; a key's own limit
-- still applies; remaining is the smaller of the two.
-------------------------------------------------------------------------------
SELECT apikey.set_owner_limits('acme', rate_limit => 5, rate_window => '1 hour');
SELECT token AS a1 FROM apikey.issue('acme') \gset
SELECT token AS a2 FROM apikey.issue('acme', rate_limit => 10, rate_window => '1 hour') \gset
SELECT token AS a3 FROM apikey.issue('acme', rate_limit => 2, rate_window => '1 hour') \gset
SELECT 'a1' AS k, code, remaining, limited_by FROM apikey.check(:'a1');
SELECT 'a2' AS k, code, remaining, limited_by FROM apikey.check(:'a2');
SELECT 'a3' AS k, code, remaining, limited_by FROM apikey.check(:'a3');
SELECT 'a3' AS k, code, remaining, limited_by FROM apikey.check(:'a3');
-- the key's own limit refuses first; the owner's pool is not touched
SELECT 'a3' AS k, code, remaining, limited_by, retry_after > '0' AS has_retry FROM apikey.check(:'a3');
SELECT 'a1' AS k, code, remaining, limited_by FROM apikey.check(:'a1');
-- the pool is spent: every key of the owner is refused, by the owner
SELECT 'a2' AS k, code, remaining, limited_by, retry_after > '0' AS has_retry FROM apikey.check(:'a2');
SELECT 'a1' AS k, code, remaining, limited_by FROM apikey.check(:'a1');
-- authenticate() raises the same refusal
SELECT owner_try(format('SELECT apikey.authenticate(%L)', :'a1')) AS authenticate_refused;
-- another owner's keys are not affected
SELECT code, limited_by FROM apikey.check(:'t_solo');

-------------------------------------------------------------------------------
-- Refund: a request the owner refuses costs the key nothing.  b1 may make
-- 3 per hour, its owner 1: after 1 valid and 4 refused calls, raising the
-- owner's limit shows the key's bucket still holds 2.
-------------------------------------------------------------------------------
SELECT apikey.set_owner_limits('beta', rate_limit => 1, rate_window => '1 hour');
SELECT token AS b1 FROM apikey.issue('beta', rate_limit => 3, rate_window => '1 hour') \gset
SELECT code, remaining, limited_by FROM apikey.check(:'b1');
SELECT code, count(*), min(limited_by) AS limited_by FROM (SELECT (apikey.check(:'b1')).* FROM generate_series(1, 4)) c GROUP BY code;
-- the owner's change is seen by the very next verification (the key is cached)
SELECT apikey.set_owner_limits('beta', rate_limit => 10, rate_window => '1 hour');
SELECT code, remaining, limited_by FROM apikey.check(:'b1');
SELECT code, remaining, limited_by FROM apikey.check(:'b1');
SELECT code, remaining, limited_by FROM apikey.check(:'b1');

-------------------------------------------------------------------------------
-- Credits: the owner's 3 shared by two keys; the owner's row first, then
-- the key's; both or neither.
-------------------------------------------------------------------------------
SELECT apikey.set_owner_limits('gamma', quota => 3);
SELECT token AS g1 FROM apikey.issue('gamma') \gset
SELECT key_id AS g2id, token AS g2 FROM apikey.issue('gamma', quota => 1) \gset
SELECT 'g1' AS k, code, remaining, limited_by FROM apikey.check(:'g1');
SELECT 'g2' AS k, code, remaining, limited_by FROM apikey.check(:'g2');
-- g2's own quota refuses: the owner's credit taken for it is given back
SELECT 'g2' AS k, code, remaining, limited_by FROM apikey.check(:'g2');
SELECT remaining AS owner_credits_left FROM apikey.owner_credits WHERE owner = 'gamma';
SELECT 'g1' AS k, code, remaining, limited_by FROM apikey.check(:'g1');
SELECT 'g1' AS k, code, remaining, limited_by, retry_after IS NULL AS no_refill FROM apikey.check(:'g1');
SELECT 'g2' AS k, code, remaining, limited_by FROM apikey.check(:'g2');
SELECT remaining AS owner_credits_left FROM apikey.owner_credits WHERE owner = 'gamma';
SELECT remaining AS g2_credits_left FROM apikey.quotas WHERE key_id = :g2id;

-- A rollback gives back both debits.
SELECT apikey.set_owner_limits('delta', quota => 2, quota_refill => '1 day');
SELECT key_id AS d1id, token AS d1 FROM apikey.issue('delta', quota => 5) \gset
BEGIN;
SELECT code, remaining, limited_by FROM apikey.check(:'d1');
SELECT code, remaining, limited_by FROM apikey.check(:'d1');
SELECT code, remaining, limited_by, retry_after > '23 hours' AS refill_in_a_day FROM apikey.check(:'d1');
ROLLBACK;
SELECT (SELECT remaining FROM apikey.owner_credits WHERE owner = 'delta') AS owner_left,
       (SELECT remaining FROM apikey.quotas WHERE key_id = :d1id) AS key_left;
-- A read-only transaction cannot debit the owner: quota_unavailable.
BEGIN READ ONLY;
SELECT code, remaining, limited_by FROM apikey.check(:'d1');
ROLLBACK;

-------------------------------------------------------------------------------
-- Allowlists intersect: the client must be inside the key's and the owner's.
-------------------------------------------------------------------------------
SELECT apikey.set_owner_limits('eps', allowed_cidrs => '{10.0.0.0/8}');
SELECT token AS e1 FROM apikey.issue('eps', allowed_cidrs => '{10.1.0.0/16, 11.0.0.0/8}') \gset
SELECT token AS e2 FROM apikey.issue('eps') \gset
SELECT k, addr, (apikey.check(t, NULL, addr::inet)).code
  FROM (VALUES ('e1', :'e1', '10.1.2.3'), ('e1', :'e1', '10.2.0.1'), ('e1', :'e1', '11.0.0.1'),
               ('e2', :'e2', '10.2.0.1'), ('e2', :'e2', '11.0.0.1'),
               ('e2', :'e2', '::ffff:10.9.9.9')) AS v(k, t, addr);
-- without an asserted address the connection's is used (none here: denied)
SELECT code FROM apikey.check(:'e2');
-- lifting the owner's allowlist is seen at once
SELECT apikey.set_owner_limits('eps');
SELECT (apikey.check(:'e2', NULL, '11.0.0.1')).code AS after_lift;

-------------------------------------------------------------------------------
-- max_keys: live keys only (not revoked or expired; a key replaced by a
-- rotation is live until its grace ends).
-------------------------------------------------------------------------------
SELECT apikey.set_owner_limits('zeta', max_keys => 2);
SELECT key_id AS z1 FROM apikey.issue('zeta') \gset
SELECT key_id AS z2 FROM apikey.issue('zeta') \gset
SELECT owner_try($$SELECT apikey.issue('zeta')$$) AS third;
SELECT owner_try($$SELECT apikey.issue_many('{other,zeta}')$$) AS many;
SELECT count(*) AS keys_of_other FROM apikey.keys WHERE owner = 'other';
-- the message and its hint, as a user sees them
SELECT apikey.issue('zeta');
-- revoking one makes room; an expired key does not count
SELECT apikey.revoke(:z1);
SELECT key_id AS z3 FROM apikey.issue('zeta', expires_at => now() + interval '1 hour') \gset
UPDATE apikey.keys SET expires_at = now() - interval '1 second' WHERE id = :z3;
SELECT count(*) AS issued FROM apikey.issue('zeta');
SELECT owner, keys, live_keys FROM apikey.owner_status WHERE owner = 'zeta';
-- rotating replaces a key: allowed at the limit (the key replaced does not
-- count)
SELECT count(*) AS rotated FROM apikey.rotate(:z2, '1 hour');
SELECT owner, keys, live_keys FROM apikey.owner_status WHERE owner = 'zeta';
-- below the number it holds, a replacement is refused too
SELECT apikey.set_owner_limits('zeta', max_keys => 1);
SELECT owner_try(format('SELECT apikey.rotate(%s)', (SELECT max(id) FROM apikey.keys WHERE owner = 'zeta'))) AS rotate_over;
SELECT apikey.set_owner_limits('zeta', max_keys => 0);
SELECT owner_try($$SELECT apikey.issue('zeta')$$) AS none_allowed;
-- an owner with a row but no max_keys, and one without a row, issue freely
SELECT count(*) AS issued FROM apikey.issue_many('{acme,acme,acme,nobody}');
-- a key in its grace period is live: chained rotations with a long grace
-- cannot hold more valid keys than max_keys (one rotation at the limit can)
SELECT apikey.set_owner_limits('dave', max_keys => 1);
SELECT key_id AS d1 FROM apikey.issue('dave') \gset
SELECT key_id AS d2 FROM apikey.rotate(:d1, '100 years') \gset
SELECT owner_try(format('SELECT apikey.rotate(%s, %L)', :d2, '100 years')) AS chained_rotation;
SELECT owner_try(format('SELECT apikey.rotate(%s, %L)', :d1, '100 years')) AS rotate_old_again;
SELECT count(*) AS valid_keys FROM apikey.keys k
 WHERE owner = 'dave' AND (expires_at IS NULL OR expires_at > now())
   AND NOT EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id = k.id);
-- once the old key's grace is over, rotating is possible again
UPDATE apikey.keys SET expires_at = now() - interval '1 second' WHERE id = :d1;
SELECT count(*) AS rotated FROM apikey.rotate(:d2, '100 years');

-------------------------------------------------------------------------------
-- Rotation draws on the same owner pool: it cannot reset an allowance.
-------------------------------------------------------------------------------
SELECT apikey.set_owner_limits('eta', rate_limit => 3, rate_window => '1 hour', quota => 3);
SELECT key_id AS h1id, token AS h1 FROM apikey.issue('eta') \gset
SELECT code, remaining, limited_by FROM apikey.check(:'h1');
SELECT code, remaining, limited_by FROM apikey.check(:'h1');
SELECT token AS h2 FROM apikey.rotate(:h1id, '1 hour') \gset
SELECT code, remaining, limited_by FROM apikey.check(:'h2');
SELECT code, remaining, limited_by FROM apikey.check(:'h2');
SELECT code, remaining, limited_by FROM apikey.check(:'h1');

-------------------------------------------------------------------------------
-- owner_status
-------------------------------------------------------------------------------
SELECT owner, keys, live_keys, remaining, refilled_at IS NOT NULL AS has_credits, last_used_at
  FROM apikey.owner_status ORDER BY owner;

-------------------------------------------------------------------------------
-- Bad input: every argument of set_owner_limits, with its SQLSTATE; a
-- refused call writes nothing.
-------------------------------------------------------------------------------
SELECT md5(string_agg(o::text, ';' ORDER BY owner)) AS owners_before FROM apikey.owners o \gset
SELECT c.label, owner_try('SELECT apikey.set_owner_limits(' || c.args || ')') AS result
  FROM (VALUES (1, 'owner NULL', 'NULL'),
               (2, 'owner empty', $$''$$),
               (3, 'owner blank', $$'   '$$),
               (4, 'owner too long', $$repeat('x', 1025)$$),
               (5, 'rate_limit zero', $$'acme', rate_limit => 0$$),
               (6, 'rate_window zero', $$'acme', rate_limit => 5, rate_window => '0'$$),
               (7, 'rate_window NULL', $$'acme', rate_window => NULL$$),
               (8, 'rate_window over a year', $$'acme', rate_limit => 5, rate_window => '366 days'$$),
               (9, 'quota negative', $$'acme', quota => -1$$),
               (10, 'quota_refill zero', $$'acme', quota => 5, quota_refill => '0'$$),
               (11, 'quota_refill without quota', $$'acme', quota_refill => '1 day'$$),
               (12, 'allowed_cidrs empty', $$'acme', allowed_cidrs => '{}'$$),
               (13, 'allowed_cidrs with NULL', $$'acme', allowed_cidrs => '{10.0.0.0/8,NULL}'$$),
               (14, 'CIDR host bits set', $$'acme', allowed_cidrs => '{10.0.0.1/8}'$$),
               (15, 'max_keys negative', $$'acme', max_keys => -1$$),
               (16, 'metadata not an object', $$'acme', metadata => '[1]'$$)) AS c(n, label, args)
 ORDER BY c.n;
SELECT md5(string_agg(o::text, ';' ORDER BY owner)) = :'owners_before' AS nothing_written FROM apikey.owners o;
SELECT apikey.set_owner_limits(NULL);
SELECT apikey.set_owner_limits('acme', max_keys => -1);
SELECT owner_try($$SELECT apikey._owner_admit(NULL, 1)$$) AS admit_null;
-- the table's constraints back the function up against direct writes
SELECT c.label, owner_try('UPDATE apikey.owners SET ' || c.sets || $$ WHERE owner = 'acme'$$) AS result
  FROM (VALUES (1, 'rate_limit zero', 'rate_limit = 0'),
               (2, 'rate_window zero', $$rate_window = '0'$$),
               (3, 'quota negative', 'quota = -1'),
               (4, 'quota_refill without quota', $$quota = NULL, quota_refill = '1 day'$$),
               (5, 'allowed_cidrs empty', $$allowed_cidrs = '{}'$$),
               (6, 'max_keys negative', 'max_keys = -1'),
               (7, 'owner empty', $$owner = ''$$)) AS c(n, label, sets)
 ORDER BY c.n;
SELECT owner_try($$UPDATE apikey.owner_credits SET remaining = -1 WHERE owner = 'gamma'$$) AS negative_credits;
-- metadata kept when not given, replaced when given
SELECT apikey.set_owner_limits('theta', metadata => '{"plan": "pro"}');
SELECT apikey.set_owner_limits('theta', rate_limit => 9);
SELECT owner, rate_limit, metadata FROM apikey.owners WHERE owner = 'theta';
-- the audit trail records each change with the old and new limits
SELECT action, target_owner, details->'old'->>'rate_limit' AS old_rate, details->'new'->>'rate_limit' AS new_rate
  FROM apikey.audit_log WHERE action = 'set_owner_limits' AND target_owner = 'theta' ORDER BY seq;

-------------------------------------------------------------------------------
-- Privileges: only administrators set owner limits; monitors read
-- owner_status; an ordinary role nothing.
-------------------------------------------------------------------------------
CREATE ROLE regress_owner_user;
CREATE ROLE regress_owner_admin;
CREATE ROLE regress_owner_monitor;
SELECT apikey.grant_admin('regress_owner_admin') AS granted_admin;
SELECT apikey.grant_monitor('regress_owner_monitor') AS granted_monitor;
SELECT r AS role,
       has_function_privilege(r, 'apikey.set_owner_limits(text, integer, interval, bigint, interval, cidr[], integer, jsonb)', 'EXECUTE') AS set_owner_limits,
       has_function_privilege(r, 'apikey._owner_admit(text, bigint)', 'EXECUTE') AS owner_admit,
       has_table_privilege(r, 'apikey.owners', 'SELECT') AS read_owners,
       has_table_privilege(r, 'apikey.owners', 'INSERT, UPDATE, DELETE') AS write_owners,
       has_table_privilege(r, 'apikey.owner_credits', 'SELECT') AS read_credits,
       has_table_privilege(r, 'apikey.owner_credits', 'INSERT, UPDATE, DELETE') AS write_credits,
       has_table_privilege(r, 'apikey.owner_status', 'SELECT') AS read_status
  FROM unnest(ARRAY['regress_owner_user', 'regress_owner_admin', 'regress_owner_monitor']) AS r;
SET ROLE regress_owner_user;
SELECT owner_try($$SELECT apikey.set_owner_limits('acme', rate_limit => 1000000)$$) AS user_sets;
SELECT owner_try($$SELECT * FROM apikey.owner_status$$) AS user_reads;
RESET ROLE;
SET ROLE regress_owner_admin;
SELECT owner_try($$SELECT apikey.set_owner_limits('iota', max_keys => 5)$$) AS admin_sets;
RESET ROLE;
SELECT owner, max_keys FROM apikey.owners WHERE owner = 'iota';
SELECT apikey.revoke_admin('regress_owner_admin') AS revoked_admin;
SELECT apikey.revoke_monitor('regress_owner_monitor') AS revoked_monitor;
DROP ROLE regress_owner_user;
DROP ROLE regress_owner_admin;
DROP ROLE regress_owner_monitor;

-- No table read per call: the owner's limits are cached with the key, for
-- an owner with a row and one without.
SELECT token AS c1 FROM apikey.issue('kappa') \gset
SELECT apikey.set_owner_limits('kappa', rate_limit => 1000000, rate_window => '1 hour');
SELECT (apikey.check(:'c1')).code AS kappa, (apikey.check(:'t_solo')).code AS solo;
SELECT misses AS misses_before FROM apikey.cache_stats() \gset
SELECT count(*) FILTER (WHERE (apikey.check(:'c1')).valid AND (apikey.check(:'t_solo')).valid) AS both_valid
  FROM generate_series(1, 20);
SELECT misses - :misses_before AS table_reads FROM apikey.cache_stats();

-- issue() called once per row of a query, owners read from a tuple (short
-- varlena headers): the max_keys check must leave issue()'s arguments alone
SELECT apikey.set_owner_limits('lambda', max_keys => 3);
CREATE TEMP TABLE owner_lateral AS
	SELECT o AS owner, i.key_id FROM unnest(ARRAY['lambda', 'mu', 'lambda']) o, LATERAL apikey.issue(owner => o) i;
SELECT owner, count(*) FROM owner_lateral GROUP BY owner ORDER BY owner;
SELECT target_owner, count(*) FROM apikey.audit_log
 WHERE action = 'issue' AND target_owner IN ('lambda', 'mu') GROUP BY target_owner ORDER BY 1;
SELECT owner_try($$SELECT o, i.key_id FROM unnest(ARRAY['lambda', 'lambda']) o, LATERAL apikey.issue(owner => o) i$$) AS past_max;

DROP FUNCTION owner_try(text);
