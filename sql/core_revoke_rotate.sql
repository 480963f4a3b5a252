-- revoke(), revoke_token() and rotate().
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write'), ('billing:read');

-------------------------------------------------------------------------------
-- revoke(key_id, reason)
-------------------------------------------------------------------------------
SELECT key_id AS k1, token AS t1 FROM apikey.issue('acme', '{orders:read}') \gset
SELECT apikey.revoke(:k1, 'employee left') AS first_revoke;
SELECT apikey.revoke(:k1, 'again') AS second_revoke;
SELECT apikey.revoke(:k1) AS third_revoke;
SELECT r.key_id = :k1 AS key_ok, r.revoked_by = current_user AS revoked_by_me,
       r.revoked_at BETWEEN now() - interval '1 hour' AND now() AS revoked_recently, r.reason
  FROM apikey.revocations r;
SELECT (apikey.check(:'t1')).code, apikey.verify(:'t1') AS verify;

-- Positional and named forms, and revoked_by is the calling role.
CREATE ROLE regress_core_revoke_rotate_admin;
GRANT EXECUTE ON FUNCTION apikey.revoke(bigint, text), apikey.revoke_token(text, text),
	apikey.rotate(bigint, interval) TO regress_core_revoke_rotate_admin;
SELECT key_id AS k2, token AS t2 FROM apikey.issue('acme') \gset
SET ROLE regress_core_revoke_rotate_admin;
SELECT apikey.revoke(key_id => :k2, reason => 'rotation drill') AS named_revoke;
RESET ROLE;
SELECT r.revoked_by, r.reason FROM apikey.revocations r WHERE r.key_id = :k2;

-- Errors.
SELECT apikey.revoke(-1);
\echo :SQLSTATE
SELECT apikey.revoke(9223372036854775807, 'nope');
\echo :SQLSTATE
SELECT apikey.revoke(NULL);
\echo :SQLSTATE
SELECT apikey.revoke(NULL, 'reason');
\echo :SQLSTATE
SELECT count(*) AS revocations FROM apikey.revocations;

-------------------------------------------------------------------------------
-- revoke_token(token, reason)
-------------------------------------------------------------------------------
SELECT key_id AS k3, token AS t3 FROM apikey.issue('acme', '{orders:read}') \gset
SELECT apikey.revoke_token(:'t3', 'leaked on a forum') AS first_revoke;
SELECT apikey.revoke_token(:'t3') AS second_revoke;
SELECT r.key_id = :k3 AS key_ok, r.reason FROM apikey.revocations r WHERE r.key_id = :k3;
SELECT (apikey.check(:'t3', 'orders:read')).code;

-- A malformed token is 22023, and the token is not repeated in the error.
SELECT key_id AS k4, token AS t4 FROM apikey.issue('acme') \gset
SELECT left(:'t4', 20) || CASE substr(:'t4', 21, 1) WHEN 'A' THEN 'B' ELSE 'A' END || substr(:'t4', 22) AS t4_typo \gset
SELECT apikey.revoke_token(:'t4_typo');
\echo :SQLSTATE
SELECT apikey.revoke_token(left(:'t4', -1));
\echo :SQLSTATE
SELECT apikey.revoke_token('');
\echo :SQLSTATE
SELECT apikey.revoke_token(NULL);
\echo :SQLSTATE
SELECT apikey.revoke_token(repeat('x', 1000000));
\echo :SQLSTATE
-- Nothing of the presented token in message, detail, hint or context.
CREATE TEMP TABLE bad_tokens (label text, t text);
INSERT INTO bad_tokens VALUES ('typo', :'t4_typo'), ('truncated', left(:'t4', -1)),
	('extra char', :'t4' || 'x'), ('checksum only wrong', left(:'t4', -1) || CASE right(:'t4', 1) WHEN '0' THEN '1' ELSE '0' END);
DO $$
DECLARE
	b record;
	msg text; det text; hnt text; ctx text; st text;
BEGIN
	FOR b IN SELECT * FROM bad_tokens LOOP
		BEGIN
			PERFORM apikey.revoke_token(b.t);
			RAISE NOTICE '%: no error', b.label;
		EXCEPTION WHEN OTHERS THEN
			GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
				det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT, ctx = PG_EXCEPTION_CONTEXT;
			RAISE NOTICE '%: sqlstate %, token in error: %, secret in error: %', b.label, st,
				strpos(concat_ws('|', msg, det, hnt, ctx), b.t) > 0,
				strpos(concat_ws('|', msg, det, hnt, ctx), substr(b.t, 4, 20)) > 0;
		END;
	END LOOP;
END
$$;
-- The real key was not touched by those attempts.
SELECT (apikey.check(:'t4')).code AS t4_still;

-- A well-formed token of no key is 42704, again without the token.
BEGIN;
SELECT token AS t_unknown FROM apikey.issue('ghost') \gset
ROLLBACK;
SELECT apikey.revoke_token(:'t_unknown');
\echo :SQLSTATE
SELECT apikey.revoke_token(:'t_unknown', 'reason');
\echo :SQLSTATE

-- Revoking through the admin role records that role.
SET ROLE regress_core_revoke_rotate_admin;
SELECT apikey.revoke_token(:'t4', 'by admin') AS admin_revoke;
RESET ROLE;
SELECT r.revoked_by, r.reason FROM apikey.revocations r WHERE r.key_id = :k4;
SELECT (apikey.check(:'t4')).code AS t4_now;

-------------------------------------------------------------------------------
-- rotate(key_id, grace)
-------------------------------------------------------------------------------
SELECT key_id AS k5, token AS t5 FROM apikey.issue('acme', '{orders:read, billing:read}',
	name => 'billing sync', prefix => 'ak_live', metadata => '{"env": "prod"}',
	rate_limit => 100, rate_window => '10 seconds', quota => 1000, quota_refill => '1 day',
	allowed_cidrs => '{10.0.0.0/8, 192.168.1.0/24}') \gset
SET ROLE regress_core_revoke_rotate_admin;
SELECT r_id AS k6, r_token AS t6 FROM apikey.rotate(:k5) AS r(r_id, r_token) \gset
RESET ROLE;
SELECT :'t6' ~ '^ak_live_[0-9A-Za-z]{49}$' AS new_shape, :'t6' <> :'t5' AS new_token, :k6 <> :k5 AS new_id;
-- Same owner, name, prefix, metadata, limits and scopes; rotated_from points back.
SELECT n.owner = o.owner AS owner, n.name = o.name AS name, n.prefix = o.prefix AS prefix,
       n.metadata = o.metadata AS metadata, n.rate_limit = o.rate_limit AS rate_limit,
       n.rate_window = o.rate_window AS rate_window, n.quota = o.quota AS quota,
       n.quota_refill = o.quota_refill AS quota_refill, n.allowed_cidrs = o.allowed_cidrs AS allowed_cidrs,
       (SELECT l.rotated_from FROM apikey.key_lineage l WHERE l.key_id = n.id) = o.id AS rotated_from,
       (SELECT l.rotated_from FROM apikey.key_lineage l WHERE l.key_id = o.id) IS NULL AS old_rotated_from_null,
       n.hint = 'ak_live_...' || right(:'t6', 4) AS hint, n.hash = apikey.hash(:'t6') AS hash,
       n.created_by AS new_created_by, n.expires_at IS NULL AS new_expires_null
  FROM apikey.keys n, apikey.keys o WHERE n.id = :k6 AND o.id = :k5;
SELECT ks.scope FROM apikey.key_scopes ks WHERE ks.key_id = :k6 ORDER BY ks.scope COLLATE "C";
SELECT q.remaining FROM apikey.quotas q WHERE q.key_id = :k6;
-- The old key now expires after the default grace of one day and still works.
SELECT o.expires_at > now() + interval '23 hours' AND o.expires_at <= now() + interval '1 day' AS old_expires_in_a_day
  FROM apikey.keys o WHERE o.id = :k5;
-- (both keys have an address allowlist, so pass an allowed client address)
SELECT (apikey.check(:'t5', 'orders:read', '10.1.2.3')).code AS old_key,
       (apikey.check(:'t6', 'orders:read', '10.1.2.3')).code AS new_key;

-- grace => '0': the old key is expired at once, the new one valid.
SELECT key_id AS k7, token AS t7 FROM apikey.issue('acme', '{orders:write}', name => 'w') \gset
SELECT r_id AS k8, r_token AS t8 FROM apikey.rotate(:k7, grace => '0') AS r(r_id, r_token) \gset
SELECT (apikey.check(:'t7', 'orders:write')).code AS old_key,
       (apikey.check(:'t8', 'orders:write')).code AS new_key;
SELECT (v).code, (v).key_id = :k8 AS key_ok, (v).owner, (v).scopes FROM apikey.check(:'t8') AS v;

-- A key with an earlier expiry keeps it; the new key inherits it.
SELECT key_id AS k9, token AS t9 FROM apikey.issue('acme', expires_at => now() + interval '1 hour') \gset
SELECT expires_at AS k9_expiry FROM apikey.keys WHERE id = :k9 \gset
SELECT r_id AS k10, r_token AS t10 FROM apikey.rotate(:k9, '7 days') AS r(r_id, r_token) \gset
SELECT o.expires_at = :'k9_expiry' AS old_expiry_kept, n.expires_at = :'k9_expiry' AS new_inherits
  FROM apikey.keys o, apikey.keys n WHERE o.id = :k9 AND n.id = :k10;

-- A rotated key can be rotated again while in its grace period; the chain is kept.
SELECT r_id AS k11, r_token AS t11 FROM apikey.rotate(:k6) AS r(r_id, r_token) \gset
SELECT (SELECT rotated_from FROM apikey.key_lineage WHERE key_id = :k11) = :k6 AS chain_1,
       (SELECT rotated_from FROM apikey.key_lineage WHERE key_id = :k6) = :k5 AS chain_2;

-- Errors: revoked, expired, negative or NULL grace, missing key.  Nothing is written.
SELECT (SELECT count(*) FROM apikey.keys) AS keys_before \gset
SELECT * FROM apikey.rotate(:k1);
\echo :SQLSTATE
SELECT * FROM apikey.rotate(:k7);
\echo :SQLSTATE
UPDATE apikey.keys SET expires_at = now() - interval '1 second' WHERE id = :k9;
SELECT * FROM apikey.rotate(:k9);
\echo :SQLSTATE
SELECT * FROM apikey.rotate(:k8, '-1 second');
\echo :SQLSTATE
SELECT * FROM apikey.rotate(:k8, NULL);
\echo :SQLSTATE
SELECT * FROM apikey.rotate(-1);
\echo :SQLSTATE
\set VERBOSITY sqlstate
SELECT * FROM apikey.rotate(NULL);
\echo :SQLSTATE
\set VERBOSITY default
SELECT (SELECT count(*) FROM apikey.keys) = :keys_before AS keys_unchanged,
       (SELECT (apikey.check(:'t8')).code) AS k8_still;

-- Revoking the new key does not revive or revoke the old one.
SELECT apikey.revoke(:k8);
SELECT (apikey.check(:'t7')).code AS old_key, (apikey.check(:'t8')).code AS new_key;

DROP OWNED BY regress_core_revoke_rotate_admin;
DROP ROLE regress_core_revoke_rotate_admin;
