-- Bad limit settings: issue() and set_limits() refuse every bad value with
-- a clear error (22023, or 22P02 for text that is not a CIDR) and write
-- nothing.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

-- Run a statement; 'ok', or its SQLSTATE and message.
CREATE OR REPLACE FUNCTION limits_bad_input_try(stmt text) RETURNS text
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

-- Everything the apikey tables hold, to prove a refused call wrote nothing.
CREATE OR REPLACE FUNCTION limits_bad_input_state() RETURNS text
LANGUAGE sql AS $$
	SELECT md5(concat_ws('|',
		(SELECT string_agg(concat_ws(',', id, owner, rate_limit, rate_window, quota,
									 quota_refill, allowed_cidrs), ';' ORDER BY id) FROM apikey.keys),
		(SELECT string_agg(concat_ws(',', key_id, remaining, refilled_at), ';' ORDER BY key_id) FROM apikey.quotas),
		(SELECT string_agg(concat_ws(',', key_id, scope), ';' ORDER BY key_id, scope) FROM apikey.key_scopes),
		(SELECT count(*) FROM apikey.revocations),
		(SELECT last_value FROM apikey.keys_id_seq)))
$$;

-- A key to aim set_limits() at, with every limit set.
SELECT key_id AS k, token AS t
  FROM apikey.issue(owner => 'acme', rate_limit => 5, rate_window => '1 hour', quota => 7,
                    quota_refill => '1 day', allowed_cidrs => '{10.0.0.0/8}') \gset
SELECT limits_bad_input_state() AS before \gset

-- Each bad value, alone, through issue().  (A failed nextval() would
-- show in keys_id_seq, so the state covers it.)
SELECT c.label, limits_bad_input_try('SELECT apikey.issue(owner => ''bad'', ' || c.args || ')') AS result
  FROM (VALUES (1, 'rate_limit zero', 'rate_limit => 0'),
               (2, 'rate_limit negative', 'rate_limit => -1'),
               (3, 'rate_limit most negative', 'rate_limit => -2147483648'),
               (4, 'rate_window zero', 'rate_limit => 5, rate_window => ''0'''),
               (5, 'rate_window negative', 'rate_limit => 5, rate_window => ''-1 minute'''),
               (6, 'rate_window mixed negative', 'rate_limit => 5, rate_window => ''1 day -25 hours'''),
               (7, 'rate_window NULL', 'rate_limit => 5, rate_window => NULL'),
               (8, 'rate_window NULL, no limit', 'rate_window => NULL'),
               (9, 'quota negative', 'quota => -1'),
               (10, 'quota_refill zero', 'quota => 5, quota_refill => ''0'''),
               (11, 'quota_refill negative', 'quota => 5, quota_refill => ''-1 hour'''),
               (12, 'quota_refill without quota', 'quota_refill => ''1 hour'''),
               (13, 'allowed_cidrs with NULL', 'allowed_cidrs => ''{10.0.0.0/8,NULL}'''),
               (14, 'allowed_cidrs only NULL', 'allowed_cidrs => ARRAY[NULL]::cidr[]'),
               (15, 'CIDR mask too long', 'allowed_cidrs => ''{10.0.0.1/33}'''),
               (16, 'CIDR host bits set', 'allowed_cidrs => ''{10.0.0.1/8}'''),
               (17, 'CIDR nonsense', 'allowed_cidrs => ''{nonsense}'''),
               (18, 'CIDR empty string', 'allowed_cidrs => ''{""}'''),
               (19, 'IPv6 mask too long', 'allowed_cidrs => ''{2001:db8::/129}'''),
               (20, 'CIDR list empty', 'allowed_cidrs => ''{}'''),
               (21, 'rate_window over a year', 'rate_limit => 5, rate_window => ''366 days''')) AS c(n, label, args)
 ORDER BY c.n;
SELECT limits_bad_input_state() = :'before' AS nothing_written_by_issue;

-- The same through set_limits(): the key keeps all its limits.
SELECT c.label, limits_bad_input_try('SELECT apikey.set_limits(' || :k || ', ' || c.args || ')') AS result
  FROM (VALUES (1, 'rate_limit zero', 'rate_limit => 0'),
               (2, 'rate_limit negative', 'rate_limit => -1'),
               (3, 'rate_window zero', 'rate_limit => 5, rate_window => ''0'''),
               (4, 'rate_window negative', 'rate_limit => 5, rate_window => ''-1 minute'''),
               (5, 'rate_window NULL', 'rate_limit => 5, rate_window => NULL'),
               (6, 'quota negative', 'quota => -1'),
               (7, 'quota_refill zero', 'quota => 5, quota_refill => ''0'''),
               (8, 'quota_refill negative', 'quota => 5, quota_refill => ''-1 hour'''),
               (9, 'quota_refill without quota', 'quota_refill => ''1 hour'''),
               (10, 'allowed_cidrs with NULL', 'allowed_cidrs => ''{10.0.0.0/8,NULL}'''),
               (11, 'CIDR mask too long', 'allowed_cidrs => ''{10.0.0.1/33}'''),
               (12, 'CIDR nonsense', 'allowed_cidrs => ''{nonsense}'''),
               (13, 'CIDR list empty', 'allowed_cidrs => ''{}'''),
               (14, 'rate_window over a year', 'rate_limit => 5, rate_window => ''1 year 1 day''')) AS c(n, label, args)
 ORDER BY c.n;
SELECT limits_bad_input_state() = :'before' AS nothing_written_by_set_limits;
-- set_limits() on a key that does not exist.
SELECT limits_bad_input_try('SELECT apikey.set_limits(999999, rate_limit => 1)') AS missing_key;
SELECT limits_bad_input_try('SELECT apikey.set_limits(NULL, rate_limit => 1)') AS null_key;
SELECT limits_bad_input_state() = :'before' AS nothing_written;

-- The messages as a user sees them, with their hints.
SELECT apikey.issue(owner => 'bad', rate_limit => 0);
SELECT apikey.issue(owner => 'bad', rate_limit => 5, rate_window => '0');
SELECT apikey.issue(owner => 'bad', quota => -1);
SELECT apikey.issue(owner => 'bad', quota => 5, quota_refill => '0');
SELECT apikey.issue(owner => 'bad', quota_refill => '1 hour');
SELECT apikey.issue(owner => 'bad', allowed_cidrs => '{10.0.0.0/8,NULL}');
SELECT apikey.issue(owner => 'bad', allowed_cidrs => '{10.0.0.1/33}');
SELECT apikey.set_limits(:k, rate_limit => -1);

-- The key still verifies with its old limits: quota 7, allowlist 10/8.
SELECT code, remaining FROM apikey.check(:'t', NULL, '10.1.1.1');
SELECT code FROM apikey.check(:'t', NULL, '11.1.1.1');

-- The table constraints back the functions up against direct writes.
SELECT c.label, limits_bad_input_try('UPDATE apikey.keys SET ' || c.sets || ' WHERE id = ' || :k) AS result
  FROM (VALUES (1, 'rate_limit zero', 'rate_limit = 0'),
               (2, 'rate_window zero', 'rate_window = ''0'''),
               (3, 'rate_window NULL', 'rate_window = NULL'),
               (4, 'quota negative', 'quota = -1'),
               (5, 'quota_refill zero', 'quota_refill = ''0''')) AS c(n, label, sets)
 ORDER BY c.n;
SELECT limits_bad_input_try('UPDATE apikey.quotas SET remaining = -1 WHERE key_id = ' || :k) AS negative_remaining;

-- Boundary values that are allowed.
SELECT key_id AS b1 FROM apikey.issue(owner => 'edge', rate_limit => 2147483647, rate_window => '1 microsecond',
                                        quota => 0, allowed_cidrs => '{0.0.0.0/0, ::/0}') \gset
SELECT key_id AS b2 FROM apikey.issue(owner => 'edge', rate_limit => 1, rate_window => '1 year',
                                        quota => 9223372036854775807, quota_refill => '1 microsecond') \gset
SELECT id = :b1 AS is_b1, rate_limit, rate_window, quota, quota_refill, allowed_cidrs
  FROM apikey.keys WHERE id IN (:b1, :b2) ORDER BY id;
SELECT key_id = :b1 AS is_b1, remaining FROM apikey.quotas WHERE key_id IN (:b1, :b2) ORDER BY key_id;

-- The bounds are written twice, in the functions' checks (C: issue.c,
-- for their messages) and in the table's CHECK constraints (for direct
-- writes): both must accept and refuse the same values at every edge
-- (the table refused a refill without a quota only from 1.2 on).
-- The table's verdict comes from an UPDATE in a subtransaction that is
-- always rolled back.
CREATE FUNCTION limits_agree(rl int, rw interval, q bigint, qr interval, k bigint, OUT by_function text, OUT by_table text)
LANGUAGE plpgsql AS $$
BEGIN
	by_function := CASE WHEN limits_bad_input_try(format('SELECT apikey._check_limits(%L, %L, %L, %L)', rl, rw, q, qr)) = 'ok'
	                    THEN 'accepts' ELSE 'refuses' END;
	BEGIN
		UPDATE apikey.keys SET rate_limit = rl, rate_window = rw, quota = q, quota_refill = qr WHERE id = k;
		by_table := 'accepts';
		RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'undo';
	EXCEPTION
		WHEN raise_exception THEN NULL;
		WHEN check_violation OR not_null_violation THEN by_table := 'refuses';
	END;
END
$$;
SELECT e.label, a.by_function, a.by_table, a.by_function = a.by_table AS agree
  FROM (VALUES (1, 'rate_limit 0', 0, '1 minute'::interval, NULL::bigint, NULL::interval),
               (2, 'rate_limit 1', 1, '1 minute', NULL, NULL),
               (3, 'rate_window -1 day', NULL, '-1 day', NULL, NULL),
               (4, 'rate_window 0', NULL, '0', NULL, NULL),
               (5, 'rate_window 1 microsecond', NULL, '1 microsecond', NULL, NULL),
               (6, 'rate_window 1 year', NULL, '1 year', NULL, NULL),
               (7, 'rate_window 360 days', NULL, '360 days', NULL, NULL),
               (8, 'rate_window 1 year 1 microsecond', NULL, '1 year 1 microsecond', NULL, NULL),
               (9, 'rate_window 361 days', NULL, '361 days', NULL, NULL),
               (10, 'rate_window 1 year -1 day', NULL, '1 year -1 day', NULL, NULL),
               (11, 'quota -1', NULL, '1 minute', -1, NULL),
               (12, 'quota 0', NULL, '1 minute', 0, NULL),
               (13, 'quota_refill 0', NULL, '1 minute', 5, '0'),
               (14, 'quota_refill 1 microsecond', NULL, '1 minute', 5, '1 microsecond'),
               (15, 'quota_refill 10 years', NULL, '1 minute', 5, '10 years'),
               (16, 'quota_refill 3600 days', NULL, '1 minute', 5, '3600 days'),
               (17, 'quota_refill 10 years 1 microsecond', NULL, '1 minute', 5, '10 years 1 microsecond'),
               (18, 'quota_refill 3601 days', NULL, '1 minute', 5, '3601 days'),
               (19, 'quota_refill without a quota', NULL, '1 minute', NULL, '1 day')) AS e(n, label, rl, rw, q, qr),
       LATERAL limits_agree(e.rl, e.rw, e.q, e.qr, :b1) a
 ORDER BY e.n;
DROP FUNCTION limits_agree(int, interval, bigint, interval, bigint);

-- The same bounds hold for an owner's limits (apikey.owners, checked by
-- set_owner_limits() with the same C checks): function and table agree at
-- every edge, max_keys included.
SELECT apikey.set_owner_limits('agree');
CREATE FUNCTION owner_limits_agree(rl int, rw interval, q bigint, qr interval, mk int,
								   OUT by_function text, OUT by_table text)
LANGUAGE plpgsql AS $$
BEGIN
	by_function := CASE WHEN limits_bad_input_try(format('SELECT apikey.set_owner_limits(''agree'', %L, %L, %L, %L, max_keys => %L)',
														  rl, rw, q, qr, mk)) = 'ok'
	                    THEN 'accepts' ELSE 'refuses' END;
	BEGIN
		UPDATE apikey.owners SET rate_limit = rl, rate_window = rw, quota = q, quota_refill = qr, max_keys = mk
		 WHERE owner = 'agree';
		by_table := 'accepts';
		RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'undo';
	EXCEPTION
		WHEN raise_exception THEN NULL;
		WHEN check_violation OR not_null_violation THEN by_table := 'refuses';
	END;
END
$$;
SELECT e.label, a.by_function, a.by_table, a.by_function = a.by_table AS agree
  FROM (VALUES (1, 'rate_limit 0', 0, '1 minute'::interval, NULL::bigint, NULL::interval, NULL::int),
               (2, 'rate_limit 1', 1, '1 minute', NULL, NULL, NULL),
               (3, 'rate_window 0', NULL, '0', NULL, NULL, NULL),
               (4, 'rate_window 1 microsecond', NULL, '1 microsecond', NULL, NULL, NULL),
               (5, 'rate_window 1 year', NULL, '1 year', NULL, NULL, NULL),
               (6, 'rate_window 1 year 1 microsecond', NULL, '1 year 1 microsecond', NULL, NULL, NULL),
               (7, 'rate_window 361 days', NULL, '361 days', NULL, NULL, NULL),
               (8, 'quota -1', NULL, '1 minute', -1, NULL, NULL),
               (9, 'quota 0', NULL, '1 minute', 0, NULL, NULL),
               (10, 'quota_refill 0', NULL, '1 minute', 5, '0', NULL),
               (11, 'quota_refill 10 years', NULL, '1 minute', 5, '10 years', NULL),
               (12, 'quota_refill 10 years 1 microsecond', NULL, '1 minute', 5, '10 years 1 microsecond', NULL),
               (13, 'quota_refill without a quota', NULL, '1 minute', NULL, '1 day', NULL),
               (14, 'max_keys -1', NULL, '1 minute', NULL, NULL, -1),
               (15, 'max_keys 0', NULL, '1 minute', NULL, NULL, 0),
               (16, 'max_keys int max', NULL, '1 minute', NULL, NULL, 2147483647)) AS e(n, label, rl, rw, q, qr, mk),
       LATERAL owner_limits_agree(e.rl, e.rw, e.q, e.qr, e.mk) a
 ORDER BY e.n;
DROP FUNCTION owner_limits_agree(int, interval, bigint, interval, int);

DROP FUNCTION limits_bad_input_try(text);
DROP FUNCTION limits_bad_input_state();
