-- Importing keys from another system: import_keys() (per-row results, the
-- good rows kept), import_key() for INSERT ... SELECT, the shipped formats,
-- duplicates, bad input with specific SQLSTATEs, privileges, the audit row,
-- legacy_progress, key_status.format, legacy_retire() and export_keys().
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');

-- The shipped formats are presets, not rows of legacy_formats: it starts
-- empty, and every row it gets is the user's (dumped whole).
SELECT name, token_regex, lookup_regex, algorithm, hash_input FROM apikey.legacy_presets ORDER BY name;
SELECT count(*) AS rows_before_any_import FROM apikey.legacy_formats;
-- Their expressions take the real shapes only: not identifiers, qualified
-- names, or secrets shorter (or a DRF part longer) than the format's.  (A
-- qualified name whose second part has 16 characters or more does have the
-- bcrypt-prefixed shape: its secrets may hold '_' and '-'.)
SELECT t.s, array_agg(p.name ORDER BY p.name) FILTER (WHERE t.s ~ p.token_regex) AS matched_by
  FROM (VALUES ('unkey_3ZKmPq8sT2vW9xY4aB6cD'), ('unkey_3ZKmPq8sT2vW9xY4'), ('unkey_3ZKmPq8sT2vW9xY'),
			   ('usage_log'), ('legacy_upgrade_pending'), ('apikey.keys'), ('apikey.legacy_upgrade_pending'),
			   ('AbCdEf12.s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tXy'), ('AbCdEf1.s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tXy'),
			   ('AbCdEf12.s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tX'), ('AbCdEf12.s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tXyZ'),
			   ('live4f2a.Zr9-kQ2_mW7xP4vL8nT3'), ('live.Zr9-kQ2_mW7xP4v'), ('live.Zr9-kQ2_mW7xP4'),
			   ('liv.Zr9-kQ2_mW7xP4vL8nT3')) t(s), apikey.legacy_presets p
 GROUP BY t.s ORDER BY t.s COLLATE "C";

-- Hashes of the tokens, computed here as the old systems did (a Django
-- pbkdf2_sha256 hash made with Python's hashlib, 1000 iterations; bcrypt
-- through pgcrypto).  No token is ever stored by apikey.
\set drf_token 'AbCdEf12.s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tXy'
\set drf_hash 'pbkdf2_sha256$1000$saltsalt$qjoieJGmlDAL174i3uup9Eq0FgMBmOOzoEFv5CGOR9c='
\set sha_token 'unkey_3ZKmPq8sT2vW9xY4aB6cD'
\set bc_secret 'Zr9-kQ2_mW7xP4vL8nT3'
SELECT crypt(:'bc_secret', gen_salt('bf', 4)) AS bc_hash \gset

-------------------------------------------------------------------------------
-- import_keys(): one result per row, in order; bad rows report their
-- SQLSTATE and the good ones are imported.
-------------------------------------------------------------------------------
SELECT ordinal, key_id IS NOT NULL AS imported, error
  FROM apikey.import_keys('sha256', jsonb_build_array(
	jsonb_build_object('owner', 'acme', 'hash', encode(sha256(convert_to(:'sha_token', 'UTF8')), 'hex'),
					   'name', 'hex import', 'scopes', '["orders:read"]'::jsonb, 'metadata', '{"from": "unkey"}'::jsonb,
					   'created_at', '2020-01-01T00:00:00Z', 'last_used_at', '2024-06-01T00:00:00Z'),
	jsonb_build_object('owner', 'acme', 'hash', encode(sha256('unkey_b64b64b64b64b64b64b64'), 'base64')),
	jsonb_build_object('owner', 'acme', 'plaintext', 'unkey_plainplainplainplain1'),
	jsonb_build_object('owner', 'acme', 'hash', 'not a digest'),
	jsonb_build_object('owner', 'acme', 'hash', encode(sha256(convert_to(:'sha_token', 'UTF8')), 'base64')),
	jsonb_build_object('hash', encode(sha256('unkey_noowner'), 'hex')),
	jsonb_build_object('owner', 'acme', 'plaintext', 'has spaces: not this shape'),
	jsonb_build_object('owner', 'acme', 'plaintext', 'unkey_scopesscopesscopes1', 'scopes', '["nope"]'::jsonb),
	jsonb_build_object('owner', 'acme', 'plaintext', 'unkey_scopesscopesscopes2', 'scopes', 'orders:read'),
	jsonb_build_object('owner', 'acme', 'plaintext', 'unkey_limitslimitslimits1', 'rate_limit', -1),
	jsonb_build_object('owner', 'acme', 'plaintext', 'unkey_limitslimitslimits2', 'rate_limit', 5, 'quota', 100),
	'"not an object"'::jsonb,
	jsonb_build_object('owner', 'acme', 'hash', 'x', 'plaintext', 'unkey_bothbothbothboth1')))
 ORDER BY ordinal;

-- The first import in a preset copied its row: now the user's to change,
-- retire, and dump.
SELECT f.name, (f.token_regex, f.lookup_regex, f.algorithm, f.hash_input, f.params)
			   IS NOT DISTINCT FROM (p.token_regex, p.lookup_regex, p.algorithm, p.hash_input, p.params) AS as_shipped,
	   f.accept_until
  FROM apikey.legacy_formats f JOIN apikey.legacy_presets p USING (name);
-- A call that fails as a whole leaves no row behind.
SELECT apikey.import_key('drf', 'globex', 'md5$abc$def', lookup => 'AbCdEf12');
SELECT count(*) AS drf_rows FROM apikey.legacy_formats WHERE name = 'drf';

-- What the good rows became: the SHA-256 in keys.hash, no verifier.
SELECT k.name, k.owner, k.prefix, k.hint, k.created_at = '2020-01-01T00:00:00Z' AS created_kept,
       k.last_used_at = '2024-06-01T00:00:00Z' AS last_used_kept, k.metadata, k.rate_limit, k.quota,
       q.remaining AS quota_remaining, l.format, l.lookup, l.verifier IS NULL AS no_verifier,
       k.hash = sha256(convert_to(:'sha_token', 'UTF8')) AS hash_is_sha_token
  FROM apikey.keys k JOIN apikey.legacy_keys l ON l.key_id = k.id
  LEFT JOIN apikey.quotas q ON q.key_id = k.id
 ORDER BY k.id;
SELECT s.scope FROM apikey.key_scopes s JOIN apikey.keys k ON k.id = s.key_id WHERE k.name = 'hex import';

-- A salted format: lookup id required, the hash in its own form.
SELECT ordinal, key_id IS NOT NULL AS imported, error
  FROM apikey.import_keys('drf', jsonb_build_array(
	jsonb_build_object('owner', 'globex', 'lookup', 'AbCdEf12', 'hash', :'drf_hash', 'scopes', '["orders:read"]'::jsonb),
	jsonb_build_object('owner', 'globex', 'hash', :'drf_hash'),
	jsonb_build_object('owner', 'globex', 'lookup', 'AbCdEf12', 'hash', :'drf_hash'),
	jsonb_build_object('owner', 'globex', 'lookup', 'Zz000000', 'hash', 'pbkdf2_sha256$99999999$s$' || repeat('A', 43) || '='),
	jsonb_build_object('owner', 'globex', 'lookup', 'Zz000001', 'hash', 'md5$abc$def'),
	jsonb_build_object('owner', 'globex', 'plaintext', 'QwErTy12.abcdefghijklmnopqrstuvwxyzABCDEF')))
 ORDER BY ordinal;
-- The verifier is stored normalised (iterations, salt, hex digest); a
-- plaintext import takes its lookup id from the token and needs none.
SELECT l.lookup, l.verifier IS NOT NULL AS pending, l.verifier ~ '^1000\$saltsalt\$[0-9a-f]{64}$' AS normalised
  FROM apikey.legacy_keys l WHERE l.format = 'drf' ORDER BY l.key_id;

SELECT ordinal, key_id IS NOT NULL AS imported, error
  FROM apikey.import_keys('bcrypt-prefixed', jsonb_build_array(
	jsonb_build_object('owner', 'initech', 'lookup', 'live4f2a', 'hash', :'bc_hash'),
	jsonb_build_object('owner', 'initech', 'lookup', 'live4f2b', 'hash', '$2b$04$tooshort'),
	-- cost 31: one verification would hold a backend for days, uninterruptibly
	jsonb_build_object('owner', 'initech', 'lookup', 'live4f2c',
					   'hash', '$2b$31$' || repeat('a', 53))))
 ORDER BY ordinal;

-- bcrypt needs pgcrypto: refused up front without it.
DROP EXTENSION pgcrypto;
SELECT * FROM apikey.import_keys('bcrypt-prefixed', '[]');
CREATE EXTENSION pgcrypto;

-------------------------------------------------------------------------------
-- import_key(): one key, for INSERT ... SELECT from a staging table.
-------------------------------------------------------------------------------
CREATE TEMP TABLE staging (owner text, digest text, scopes text[]);
INSERT INTO staging VALUES
	('hooli', encode(sha256('hooli_aaaaaaaaaaaaaaaaaaaa'), 'hex'), '{orders:write}'),
	('hooli', encode(sha256('hooli_bbbbbbbbbbbbbbbbbbbb'), 'hex'), '{}');
CREATE TEMP TABLE imported AS
SELECT apikey.import_key('sha256', s.owner, s.digest, scopes => s.scopes) AS key_id FROM staging s;
SELECT count(*) AS imported, count(DISTINCT key_id) AS distinct_ids FROM imported;
-- A bad row raises (the statement fails as a whole).
SELECT apikey.import_key('sha256', 'hooli', encode(sha256('hooli_aaaaaaaaaaaaaaaaaaaa'), 'hex'));
SELECT apikey.import_key('sha256', 'hooli');
SELECT apikey.import_key('nope', 'hooli', 'x');

-------------------------------------------------------------------------------
-- Registering a format.
-------------------------------------------------------------------------------
-- a salted algorithm without a lookup id: each verification would hash
-- once per key
INSERT INTO apikey.legacy_formats (name, token_regex, algorithm) VALUES ('salty', '^x_[a-z]+$', 'bcrypt');
INSERT INTO apikey.legacy_formats (name, token_regex, algorithm) VALUES ('badre', '^(x', 'sha512-hex');
INSERT INTO apikey.legacy_formats (name, token_regex, algorithm) VALUES ('md5', '^x$', 'md5');
INSERT INTO apikey.legacy_formats (name, token_regex, algorithm) VALUES ('Bad Name', '^x$', 'sha512-hex');
-- unsalted SHA-512 needs no lookup id: the digest is its own
INSERT INTO apikey.legacy_formats (name, token_regex, algorithm)
VALUES ('sha512', '^s5_[A-Za-z0-9]{20,64}$', 'sha512-hex');
SELECT ordinal, key_id IS NOT NULL AS imported, error
  FROM apikey.import_keys('sha512', jsonb_build_array(
	jsonb_build_object('owner', 'umbrella', 'hash', 'sha512$$' || encode(sha512('s5_abcdefghijklmnopqrstuvwxyz'), 'hex')),
	jsonb_build_object('owner', 'umbrella', 'hash', upper(encode(sha512('s5_abcdefghijklmnopqrstuvwxyz'), 'hex')))))
 ORDER BY ordinal;
SELECT lookup = verifier AS digest_is_lookup FROM apikey.legacy_keys WHERE format = 'sha512';

-------------------------------------------------------------------------------
-- The audit trail: one row per call, with counts; never a hash.
-------------------------------------------------------------------------------
SELECT action, target_owner, details FROM apikey.audit_log
 WHERE action IN ('import_keys', 'import_key') ORDER BY seq;
SELECT count(*) AS audit_rows_with_a_hash FROM apikey.audit_log
 WHERE details::text ~ 'saltsalt|[0-9a-f]{64}';

-------------------------------------------------------------------------------
-- Progress, key_status.format, export_keys().
-------------------------------------------------------------------------------
SELECT format, pending, migrated, last_migrated_at IS NOT NULL AS some_migrated, accept_until
  FROM apikey.legacy_progress ORDER BY format;
SELECT format, count(*) FROM apikey.key_status GROUP BY format ORDER BY format;
SELECT count(*) AS native FROM apikey.issue('acme');
SELECT format, count(*) FROM apikey.key_status GROUP BY format ORDER BY format;

-- hash_b64 is what a peer imports (Unkey's form); a pending key has none.
SELECT e.owner, e.scopes, e.hash_b64 = encode(sha256(convert_to(:'sha_token', 'UTF8')), 'base64') AS is_sha_token,
       e.hash_b64 IS NULL AS pending, e.metadata
  FROM apikey.export_keys('acme') e ORDER BY e.key_id LIMIT 2;
SELECT count(*) AS globex_keys, count(hash_b64) AS with_hash FROM apikey.export_keys('globex');
SELECT details FROM apikey.audit_log WHERE action = 'export_keys' ORDER BY seq;

-------------------------------------------------------------------------------
-- legacy_retire(): the format's pending keys stop verifying by their old
-- hash; with revoke_pending they are revoked and their old hashes deleted.
-------------------------------------------------------------------------------
SELECT apikey.legacy_retire('drf', true) AS revoked;
SELECT l.lookup, l.verifier IS NULL AS verifier_gone, ks.status, ks.revoked_reason
  FROM apikey.legacy_keys l JOIN apikey.key_status ks ON ks.key_id = l.key_id
 WHERE l.format = 'drf' ORDER BY l.key_id;
SELECT format, pending, migrated, accept_until IS NOT NULL AS retired FROM apikey.legacy_progress WHERE format = 'drf';
SELECT * FROM apikey.import_keys('drf', '[]');
SELECT apikey.legacy_retire('drf', true) AS revoked_again;

-------------------------------------------------------------------------------
-- Privileges: nothing for PUBLIC; an admin (grant_admin) may import.
-------------------------------------------------------------------------------
CREATE ROLE regress_legacy_user;
CREATE ROLE regress_legacy_admin;
SELECT apikey.grant_admin('regress_legacy_admin');
SET ROLE regress_legacy_user;
SELECT * FROM apikey.import_keys('sha256', '[]');
SELECT apikey.import_key('sha256', 'x', plaintext => 'x_aaaaaaaaaaaaaaaaaaaaaaaa');
SELECT * FROM apikey.export_keys();
SELECT apikey.legacy_retire('sha256', false);
SELECT * FROM apikey.legacy_formats;
SELECT * FROM apikey.legacy_presets;
SELECT * FROM apikey.legacy_keys;
SELECT * FROM apikey.legacy_progress;
RESET ROLE;
SET ROLE regress_legacy_admin;
SELECT ordinal, key_id IS NOT NULL AS imported, error
  FROM apikey.import_keys('sha256', '[{"owner": "admin-made", "plaintext": "adm_abcdefghijklmnopqrstuv"}]');
SELECT count(*) > 0 AS sees_progress FROM apikey.legacy_progress;
SELECT count(*) = 3 AS sees_formats FROM apikey.legacy_formats WHERE name IN ('sha256', 'drf', 'bcrypt-prefixed');
SELECT count(*) AS sees_presets FROM apikey.legacy_presets;
SELECT * FROM apikey.legacy_keys;
RESET ROLE;
SELECT apikey.revoke_admin('regress_legacy_admin');
DROP ROLE regress_legacy_user;
DROP ROLE regress_legacy_admin;

-------------------------------------------------------------------------------
-- Imports count against the owner's max_keys, like issue().
-------------------------------------------------------------------------------
SELECT apikey.set_owner_limits('carol', max_keys => 2);
SELECT count(*) AS issued FROM apikey.issue('carol');
-- one row fits; the rows past the limit get 53400, an expired key fits
SELECT ordinal, key_id IS NOT NULL AS imported, error
  FROM apikey.import_keys('sha256', '[{"owner": "carol", "plaintext": "x_carolaaaaaaaaaaaaaaaaaa"},
                                      {"owner": "carol", "plaintext": "x_carolbbbbbbbbbbbbbbbbbb"},
                                      {"owner": "carol", "plaintext": "x_carolcccccccccccccccccc",
                                       "expires_at": "2000-01-01T00:00:00Z"},
                                      {"owner": "dan", "plaintext": "x_danaaaaaaaaaaaaaaaaaaaa"},
                                      {"owner": "carol", "plaintext": "x_caroldddddddddddddddddd"}]');
-- import_key() raises
SELECT apikey.import_key('sha256', 'carol', plaintext => 'x_careeeeeeeeeeeeeeeeeeeee');
SELECT count(*) AS carol_keys FROM apikey.keys WHERE owner = 'carol';
-- room again after a revocation
SELECT apikey.revoke(min(id)) FROM apikey.keys WHERE owner = 'carol';
SELECT apikey.import_key('sha256', 'carol', plaintext => 'x_careeeeeeeeeeeeeeeeeeeee') IS NOT NULL AS imported;
