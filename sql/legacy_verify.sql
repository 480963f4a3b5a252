-- Verifying imported keys: each shipped format verifies; a wrong secret
-- with a right lookup id fails; the first valid use records the upgrade of
-- the stored hash to SHA-256 (never in keys: the caller's transaction
-- locks nothing), the next flush applies it once, and the next use takes
-- the native path; read-only transactions and rollbacks leave the key
-- pending; a retired format stops its pending keys, not upgraded ones.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');

-- The tokens, and the hashes the old systems stored (Django's pbkdf2_sha256
-- made with Python's hashlib at 1000 iterations; bcrypt by pgcrypto).
\set drf_token 'AbCdEf12.s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tXy'
\set drf_wrong 'AbCdEf12.s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tXz'
\set drf_hash 'pbkdf2_sha256$1000$saltsalt$qjoieJGmlDAL174i3uup9Eq0FgMBmOOzoEFv5CGOR9c='
\set bc_token 'live4f2a.Zr9-kQ2_mW7xP4vL8nT3'
\set bc_wrong 'live4f2a.Zr9-kQ2_mW7xP4vL8nT4'
\set sha_token 'unkey_3ZKmPq8sT2vW9xY4aB6cD'
\set sha_b64_token 'unkey_b64b64b64b64b64b64b64'
\set s5_token 's5_abcdefghijklmnopqrstuvwxyz'
SELECT crypt('Zr9-kQ2_mW7xP4vL8nT3', gen_salt('bf', 4)) AS bc_hash \gset
INSERT INTO apikey.legacy_formats (name, token_regex, algorithm)
VALUES ('sha512', '^s5_[A-Za-z0-9]{20,64}$', 'sha512-hex');

-- Before any import no format is in use: a token outside apikey's format is
-- malformed, as always.
SELECT code FROM apikey.check(:'drf_token');

SELECT count(key_id) AS imported FROM (
	SELECT key_id FROM apikey.import_keys('drf', jsonb_build_array(jsonb_build_object(
		'owner', 'globex', 'lookup', 'AbCdEf12', 'hash', :'drf_hash', 'scopes', '["orders:read"]'::jsonb)))
	UNION ALL
	SELECT key_id FROM apikey.import_keys('bcrypt-prefixed', jsonb_build_array(jsonb_build_object(
		'owner', 'initech', 'lookup', 'live4f2a', 'hash', :'bc_hash')))
	UNION ALL
	SELECT key_id FROM apikey.import_keys('sha256', jsonb_build_array(
		jsonb_build_object('owner', 'acme', 'hash', encode(sha256(convert_to(:'sha_token', 'UTF8')), 'hex')),
		jsonb_build_object('owner', 'acme', 'hash', encode(sha256(convert_to(:'sha_b64_token', 'UTF8')), 'base64'))))
	UNION ALL
	SELECT key_id FROM apikey.import_keys('sha512', jsonb_build_array(jsonb_build_object(
		'owner', 'umbrella', 'hash', 'sha512$$' || encode(sha512(convert_to(:'s5_token', 'UTF8')), 'hex'))))) i;

CREATE TEMP TABLE s0 AS SELECT * FROM apikey.legacy_stats();
CREATE VIEW stats_delta AS
SELECT n.verified - o.verified AS verified, n.mismatched - o.mismatched AS mismatched,
       n.refused - o.refused AS refused, n.upgraded - o.upgraded AS upgraded,
       n.upgrades_deferred - o.upgrades_deferred AS deferred
  FROM apikey.legacy_stats() n, s0 o;
CREATE TEMP TABLE h0 AS SELECT l.format, k.hash FROM apikey.keys k JOIN apikey.legacy_keys l ON l.key_id = k.id;

-------------------------------------------------------------------------------
-- Wrong secrets and strangers: unknown (the lookup id is not a secret);
-- shapes no format in use has: malformed.
-------------------------------------------------------------------------------
SELECT code, key_id FROM apikey.check(:'drf_wrong');
SELECT code, key_id FROM apikey.check(:'bc_wrong');
SELECT code FROM apikey.check('ZZZZZZZZ.s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tXy') AS unknown_lookup;
SELECT code FROM apikey.check('unkey_nosuchkeynosuchkey') AS sha256_stranger;
SELECT code FROM apikey.check('s5_nosuchkeynosuchkeyxyz') AS sha512_stranger;
SELECT code FROM apikey.check('not a token at all') AS other_shape;
SELECT code FROM apikey.check(E'AbCdEf12.s3cr3tS3cr3tS3cr3tS3cr3tS3cr3t\u00e9y') AS non_ascii;
SELECT * FROM stats_delta;

-------------------------------------------------------------------------------
-- A read-only transaction: valid, and the key stays pending (counted).
-------------------------------------------------------------------------------
BEGIN READ ONLY;
SELECT valid, code, owner, scopes FROM apikey.check(:'drf_token', 'orders:read');
COMMIT;
SELECT l.verifier IS NOT NULL AS still_pending, k.hash = h0.hash AS hash_unchanged
  FROM apikey.legacy_keys l JOIN apikey.keys k ON k.id = l.key_id JOIN h0 ON h0.format = l.format
 WHERE l.format = 'drf';
SELECT * FROM stats_delta;

-- A rolled-back transaction takes its recorded upgrade with it.
BEGIN;
SELECT valid, code FROM apikey.check(:'drf_token');
SELECT count(*) AS recorded_inside, bool_and(new_hash = sha256(convert_to(:'drf_token', 'UTF8'))) AS sha256_of_token
  FROM apikey.legacy_upgrade_pending;
ROLLBACK;
SELECT apikey.flush_usage() >= 0 AS flushed;
SELECT l.verifier IS NOT NULL AS pending_after_rollback FROM apikey.legacy_keys l WHERE l.format = 'drf';

-------------------------------------------------------------------------------
-- Upgrade on use, at the next flush: the stored hash becomes
-- SHA-256(token), once; the old verifier is gone; the next verification is
-- the native path (no legacy hash computed: verified does not move).
-------------------------------------------------------------------------------
TRUNCATE s0; INSERT INTO s0 SELECT * FROM apikey.legacy_stats();
SELECT valid, code, owner, scopes FROM apikey.check(:'drf_token', 'orders:read');
SELECT valid, code, owner FROM apikey.check(:'bc_token');
SELECT valid, code, owner FROM apikey.check(:'s5_token');
-- recorded, not yet applied: the keys still verify by their old hash
SELECT count(*) AS recorded FROM apikey.legacy_upgrade_pending;
SELECT count(*) AS hashes_unchanged_before_flush
  FROM apikey.keys k JOIN h0 ON h0.hash = k.hash JOIN apikey.legacy_keys l ON l.key_id = k.id
 WHERE l.format IN ('drf', 'bcrypt-prefixed', 'sha512');
-- a flush inside a transaction block applies nothing (the upgrade would
-- hold the key row until that block ends)
BEGIN;
SELECT apikey.flush_usage() >= 0 AS flushed;
SELECT count(*) AS still_recorded_in_block FROM apikey.legacy_upgrade_pending;
COMMIT;
SELECT apikey.flush_usage() >= 0 AS flushed;
SELECT count(*) AS recorded_after_flush FROM apikey.legacy_upgrade_pending;
SELECT * FROM stats_delta;
SELECT l.format, k.hash = sha256(convert_to(CASE l.format WHEN 'drf' THEN :'drf_token' WHEN 'bcrypt-prefixed' THEN :'bc_token'
												ELSE :'s5_token' END, 'UTF8')) AS hash_is_sha256_of_token,
       l.verifier IS NULL AS verifier_deleted, l.upgraded_at IS NOT NULL AS upgraded_at_set
  FROM apikey.legacy_keys l JOIN apikey.keys k ON k.id = l.key_id
 WHERE l.format IN ('drf', 'bcrypt-prefixed', 'sha512') ORDER BY l.format;
CREATE TEMP TABLE h1 AS SELECT k.id, k.hash, l.upgraded_at FROM apikey.keys k JOIN apikey.legacy_keys l ON l.key_id = k.id;

TRUNCATE s0; INSERT INTO s0 SELECT * FROM apikey.legacy_stats();
SELECT valid, code FROM apikey.check(:'drf_token');
SELECT valid, code FROM apikey.check(:'bc_token');
SELECT valid, code FROM apikey.check(:'s5_token');
SELECT apikey.verify(:'drf_token') AS verify;
SELECT * FROM stats_delta;
-- ... and nothing was written again.
SELECT count(*) AS changed_again FROM h1 JOIN apikey.legacy_keys l ON l.key_id = h1.id
  JOIN apikey.keys k ON k.id = l.key_id WHERE k.hash <> h1.hash OR l.upgraded_at <> h1.upgraded_at;
-- A wrong secret is still unknown after the upgrade.
SELECT code FROM apikey.check(:'drf_wrong');

-- Keys imported as SHA-256 (hex or base64) verify on the native path at once.
SELECT valid, code, owner FROM apikey.check(:'sha_token');
SELECT valid, code, owner FROM apikey.check(:'sha_b64_token');

-- authenticate() binds a legacy key like any other.
BEGIN;
SELECT apikey.authenticate(:'bc_token') IS NOT NULL AS authenticated, apikey.current_owner();
COMMIT;

-- The upgrade is apikey's own bookkeeping (legacy_keys.upgraded_at), not an
-- audited change: no audit row, so no audit lock held by the caller.
SELECT count(*) AS audit_rows_of_upgrades FROM apikey.audit_log WHERE action = 'keys.update';
-- ... and only the upgrade: the caller's own change later in the same
-- transaction is audited as ever.
SELECT count(key_id) FROM apikey.import_keys('sha512', jsonb_build_array(jsonb_build_object(
	'owner', 'umbrella', 'hash', encode(sha512('s5_zzzzzzzzzzzzzzzzzzzzzzzzzz'), 'hex'))));
BEGIN;
SELECT code FROM apikey.check('s5_zzzzzzzzzzzzzzzzzzzzzzzzzz');
COMMIT;
SELECT apikey.flush_usage() >= 0 AS flushed;
BEGIN;
SELECT code FROM apikey.check('s5_zzzzzzzzzzzzzzzzzzzzzzzzzz');
UPDATE apikey.keys SET name = 'renamed after its upgrade' WHERE owner = 'umbrella' AND name IS NULL;
COMMIT;
SELECT action, details->'rows' AS rows FROM apikey.audit_log WHERE action = 'keys.update';

-------------------------------------------------------------------------------
-- The rules still apply: a revoked pending key is revoked (not upgraded).
-------------------------------------------------------------------------------
SELECT count(key_id) FROM apikey.import_keys('drf', jsonb_build_array(jsonb_build_object(
	'owner', 'globex', 'lookup', 'QwErTy12', 'hash',
	'pbkdf2_sha256$1000$pepper12$QlLydDX8y4UZsnQIwYSXiG13FOQJu4FBeiwHLuNyUaU=')));
SELECT apikey.revoke(key_id, 'test') FROM apikey.legacy_keys WHERE lookup = 'QwErTy12';
SELECT code FROM apikey.check('QwErTy12.s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tXy') AS revoked_pending;
SELECT apikey.flush_usage() >= 0 AS flushed;
SELECT verifier IS NOT NULL AS not_upgraded FROM apikey.legacy_keys WHERE lookup = 'QwErTy12';

-------------------------------------------------------------------------------
-- Reporting a leaked legacy token: report_leak() finds a pending key by its
-- old hash, and a key imported as SHA-256 by the token's SHA-256, and
-- applies the leak policy (revoke) as for any key; the report neither
-- upgrades the key nor counts a call.  A wrong secret is not a key's, and
-- text of no shape is malformed, as before.
-------------------------------------------------------------------------------
SELECT count(key_id) AS imported FROM apikey.import_keys('bcrypt-prefixed', jsonb_build_array(jsonb_build_object(
	'owner', 'initech', 'lookup', 'leak0001', 'hash', crypt('Lk9-kQ2_mW7xP4vL8nT3', gen_salt('bf', 4)))));
SELECT apikey.flush_usage() >= 0 AS flushed;
SELECT coalesce(sum(calls), 0) AS calls_before FROM apikey.usage_log \gset
SELECT apikey.report_leak('leak0001.Lk9-kQ2_mW7xP4vL8nT3', 'regress') IS NOT NULL AS pending_reported;
SELECT e.source, e.action_taken, l.lookup FROM apikey.exposures e JOIN apikey.legacy_keys l USING (key_id)
 WHERE l.lookup = 'leak0001';
SELECT apikey.flush_usage() >= 0 AS flushed;
SELECT coalesce(sum(calls), 0) - :calls_before AS calls_counted_by_report,
       (SELECT verifier IS NOT NULL FROM apikey.legacy_keys WHERE lookup = 'leak0001') AS still_pending
  FROM apikey.usage_log;
SELECT code FROM apikey.check('leak0001.Lk9-kQ2_mW7xP4vL8nT3') AS pending_after_report;
SELECT apikey.report_leak(:'sha_b64_token', 'regress') IS NOT NULL AS sha256_reported;
SELECT code FROM apikey.check(:'sha_b64_token') AS sha256_after_report;
-- A scanner's batch of more pending bcrypt tokens than the verification
-- budget allows in a second (apikey.legacy_verify_per_second, 20): every
-- one is checked and revoked; a report does not draw on that budget.
SELECT count(key_id) AS imported FROM apikey.import_keys('bcrypt-prefixed', (
	SELECT jsonb_agg(jsonb_build_object('owner', 'initech', 'lookup', 'bulk' || lpad(g::text, 4, '0'),
										'hash', crypt('Bk9-kQ2_mW7xP4vL8nT' || g, gen_salt('bf', 4))))
	  FROM generate_series(10, 39) g));
SELECT jsonb_array_length(apikey.report_leaks((
	SELECT jsonb_agg(jsonb_build_object('token', 'bulk' || lpad(g::text, 4, '0') || '.Bk9-kQ2_mW7xP4vL8nT' || g,
										'type', 'apikey_legacy', 'url', 'https://example.com/leak', 'source', 'content'))
	  FROM generate_series(10, 39) g))) AS feedback_entries;
SELECT count(*) AS batch_revoked FROM apikey.revocations r JOIN apikey.legacy_keys l USING (key_id)
 WHERE l.lookup LIKE 'bulk%';
\set VERBOSITY sqlstate
SELECT apikey.report_leak('leak0001.Lk9-kQ2_mW7xP4vL8nT4', 'regress') AS wrong_secret;
SELECT apikey.report_leak('no shape at all', 'regress') AS no_shape;
\set VERBOSITY default

-------------------------------------------------------------------------------
-- Retiring a format: its pending keys stop verifying; upgraded keys go on.
-------------------------------------------------------------------------------
SELECT count(key_id) FROM apikey.import_keys('bcrypt-prefixed', jsonb_build_array(jsonb_build_object(
	'owner', 'initech', 'lookup', 'live9999', 'hash', crypt('Qq9-kQ2_mW7xP4vL8nT3', gen_salt('bf', 4)))));
SELECT apikey.legacy_retire('bcrypt-prefixed', false);
SELECT code FROM apikey.check('live9999.Qq9-kQ2_mW7xP4vL8nT3') AS pending_after_retire;
-- a retired format's pending key no longer verifies, but it still exists
-- (un-retiring the format would bring it back): a leak report finds it
-- and revokes it
SELECT apikey.report_leak('live9999.Qq9-kQ2_mW7xP4vL8nT3', 'regress') IS NOT NULL AS retired_reported;
SELECT count(*) AS retired_revoked FROM apikey.revocations r JOIN apikey.legacy_keys l USING (key_id)
 WHERE l.lookup = 'live9999';
SELECT code FROM apikey.check(:'bc_token') AS upgraded_after_retire;
SELECT format, pending, migrated FROM apikey.legacy_progress ORDER BY format;
