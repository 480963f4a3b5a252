-- Quotas: a row in apikey.quotas; every otherwise-valid verification takes
-- one credit inside the caller's transaction, so the debit commits or rolls
-- back with it.  Zero left is quota_exhausted; a transaction that cannot
-- write (READ ONLY) gets quota_unavailable.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;


-- authenticate()'s error, with the interval in its hint masked.
CREATE OR REPLACE FUNCTION limits_quota_auth_error(tok text, scope text DEFAULT NULL, addr inet DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	st text; msg text; det text; hnt text;
BEGIN
	PERFORM apikey.authenticate(tok, scope, addr);
	RETURN 'no error, bound key ' || apikey.current_key_id();
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
		det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
	RETURN st || ': ' || msg || ' | ' || det || ' | '
		|| coalesce(regexp_replace(nullif(hnt, ''), ' (after|in) [@0-9-].*$', ' \1 <interval>.'), '(no hint)');
END
$$;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');

-- issue() stores the quota and creates the quotas row, full.
SELECT key_id AS q2, token AS tq2
  FROM apikey.issue(owner => 'acme', scopes => '{orders:read}', quota => 2) \gset
SELECT k.quota, k.quota_refill, q.remaining, q.refilled_at > now() - interval '1 hour' AS refilled_recently
  FROM apikey.keys k JOIN apikey.quotas q ON q.key_id = k.id WHERE k.id = :q2;
-- A key without a quota has no quotas row.
SELECT key_id AS free, token AS tfree FROM apikey.issue(owner => 'acme') \gset
SELECT count(*) AS quota_rows FROM apikey.quotas WHERE key_id = :free;
SELECT code, remaining IS NULL AS no_remaining FROM apikey.check(:'tfree');

-- Each valid verification takes one credit; remaining is what is left
-- after this one.  At zero: quota_exhausted, remaining 0, and no
-- retry_after because this quota is never refilled.
SELECT valid, code, remaining, retry_after IS NULL AS no_retry_after FROM apikey.check(:'tq2');
SELECT valid, code, remaining, retry_after IS NULL AS no_retry_after FROM apikey.check(:'tq2', 'orders:read');
SELECT valid, code, key_id = :q2 AS same_key, remaining, retry_after IS NULL AS no_retry_after
  FROM apikey.check(:'tq2');
SELECT apikey.verify(:'tq2') AS verify_refused;
SELECT limits_quota_auth_error(:'tq2');
-- Never below zero.
SELECT remaining FROM apikey.quotas WHERE key_id = :q2;

-- A quota of 0 is exhausted from the start.
SELECT key_id AS q0, token AS tq0 FROM apikey.issue(owner => 'acme', quota => 0) \gset
SELECT code, remaining FROM apikey.check(:'tq0');

-- The debit rolls back with the caller's transaction...
SELECT key_id AS q5, token AS tq5 FROM apikey.issue(owner => 'acme', scopes => '{orders:read}', quota => 5) \gset
BEGIN;
SELECT code, remaining FROM apikey.check(:'tq5');
SELECT code, remaining FROM apikey.check(:'tq5');
SELECT remaining AS inside_xact FROM apikey.quotas WHERE key_id = :q5;
ROLLBACK;
SELECT remaining AS after_rollback FROM apikey.quotas WHERE key_id = :q5;
-- ...and with a savepoint, and with an error that aborts the transaction.
BEGIN;
SAVEPOINT s;
SELECT code, remaining FROM apikey.check(:'tq5');
ROLLBACK TO SAVEPOINT s;
SELECT remaining AS after_rollback_to_savepoint FROM apikey.quotas WHERE key_id = :q5;
SELECT apikey.authenticate(:'tq5') IS NOT NULL AS authenticated;
SELECT 1 / 0;
COMMIT;
SELECT remaining AS after_failed_xact FROM apikey.quotas WHERE key_id = :q5;
-- A committed debit stays.
SELECT code, remaining FROM apikey.check(:'tq5');
SELECT remaining AS after_commit FROM apikey.quotas WHERE key_id = :q5;

-- A verification that fails before the quota takes nothing.
SELECT code FROM apikey.check(:'tq5', 'orders:write');
SELECT remaining AS after_scope_denied FROM apikey.quotas WHERE key_id = :q5;

-- READ ONLY: a debit is a write, so the quota cannot be enforced and the
-- verification fails closed; nothing is taken.  authenticate() raises 25006.
BEGIN READ ONLY;
SELECT valid, code, remaining IS NULL AS no_remaining FROM apikey.check(:'tq5');
SELECT apikey.verify(:'tq5') AS verify_read_only;
SELECT limits_quota_auth_error(:'tq5');
-- a key without a quota verifies as usual in a read-only transaction
SELECT code FROM apikey.check(:'tfree');
COMMIT;
SET default_transaction_read_only = on;
SELECT code FROM apikey.check(:'tq5');
RESET default_transaction_read_only;
SELECT remaining AS after_read_only FROM apikey.quotas WHERE key_id = :q5;

-- Checks before the quota win: a revoked key is revoked, not exhausted.
SELECT apikey.revoke(:q0);
SELECT code FROM apikey.check(:'tq0');

-- A rate limit is checked before the quota; a refusal there takes no
-- credit.  For a key with both, remaining is the quota's.
SELECT key_id AS qr, token AS tqr FROM apikey.issue(owner => 'acme', rate_limit => 1, rate_window => '1 hour', quota => 10) \gset
SELECT code, remaining FROM apikey.check(:'tqr');
SELECT code, retry_after > '0' AS retry_after_positive FROM apikey.check(:'tqr');
SELECT remaining AS after_rate_limited FROM apikey.quotas WHERE key_id = :qr;

-- Refill: with quota_refill, an exhausted quota says when it refills...
SELECT key_id AS qf, token AS tqf FROM apikey.issue(owner => 'acme', quota => 2, quota_refill => '1 hour') \gset
SELECT code, remaining FROM apikey.check(:'tqf');
SELECT code, remaining FROM apikey.check(:'tqf');
SELECT code, remaining, retry_after > '0' AS retry_after_positive, retry_after <= '1 hour' AS retry_within_refill
  FROM apikey.check(:'tqf');
SELECT limits_quota_auth_error(:'tqf');
-- ...is not refilled before its time...
UPDATE apikey.quotas SET refilled_at = now() - interval '59 minutes' WHERE key_id = :qf;
SELECT code, remaining FROM apikey.check(:'tqf');
-- ...and is refilled to the full quota (minus this call) once the period
-- has passed, which restarts the period.
UPDATE apikey.quotas SET refilled_at = now() - interval '2 hours' WHERE key_id = :qf;
SELECT code, remaining FROM apikey.check(:'tqf');
SELECT remaining, refilled_at > now() - interval '1 hour' AS period_restarted FROM apikey.quotas WHERE key_id = :qf;
SELECT code, remaining FROM apikey.check(:'tqf');
SELECT code, remaining FROM apikey.check(:'tqf');
-- A refill that is due also applies to a quota that is not yet empty.
UPDATE apikey.quotas SET refilled_at = now() - interval '2 hours', remaining = 1 WHERE key_id = :qf;
SELECT code, remaining FROM apikey.check(:'tqf');
-- A refill rolls back with the transaction too.
UPDATE apikey.quotas SET refilled_at = now() - interval '2 hours', remaining = 0 WHERE key_id = :qf;
BEGIN;
SELECT code, remaining FROM apikey.check(:'tqf');
ROLLBACK;
SELECT remaining, refilled_at < now() - interval '1 hour' AS still_due FROM apikey.quotas WHERE key_id = :qf;

-- set_limits() takes effect at once (the key cache is invalidated):
-- a new quota resets what remains...
SELECT apikey.set_limits(:q2, quota => 3);
SELECT remaining FROM apikey.quotas WHERE key_id = :q2;
SELECT code, remaining FROM apikey.check(:'tq2');
-- ...a key that had no quota gets one...
SELECT apikey.set_limits(:free, quota => 1);
SELECT code, remaining FROM apikey.check(:'tfree');
SELECT code, remaining FROM apikey.check(:'tfree');
-- ...and a quota set to NULL is gone, with its row.
SELECT apikey.set_limits(:free, quota => NULL);
SELECT count(*) AS quota_rows FROM apikey.quotas WHERE key_id = :free;
SELECT code, remaining IS NULL AS no_remaining FROM apikey.check(:'tfree');

-- A role with no privilege on the apikey tables can still spend a quota:
-- the debit runs as the extension's owner.  It cannot read the quotas.
CREATE ROLE regress_limits_quota_app;
SET ROLE regress_limits_quota_app;
SELECT code, remaining FROM apikey.check(:'tq2');
SELECT apikey.authenticate(:'tq2') IS NOT NULL AS authenticated;
SELECT remaining FROM apikey.quotas;
RESET ROLE;
SELECT remaining FROM apikey.quotas WHERE key_id = :q2;

-- rotate() carries what remains of the quota over to the new key.
SELECT key_id AS q2r, token AS tq2r FROM apikey.rotate(:q2) \gset
SELECT remaining FROM apikey.quotas WHERE key_id = :q2r;
SELECT code, remaining FROM apikey.check(:'tq2r');

-- Usage of quota verdicts (pending rows in this database, folded by a flush).
SELECT apikey.flush_usage() > 0 AS flushed;
SELECT code, sum(calls) AS calls FROM apikey.usage_log WHERE key_id = :q2 GROUP BY code ORDER BY code;

DROP ROLE regress_limits_quota_app;
DROP FUNCTION limits_quota_auth_error(text, text, inet);
