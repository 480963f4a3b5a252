-- apikey.check() verdict codes and fields, scope matching, and verify()
-- agreeing with check().
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

INSERT INTO apikey.scopes (name) VALUES
	('orders'), ('orders:read'), ('orders:write'), ('orders:refund:create'),
	('ordersx:read'), ('billing:read');

SELECT key_id AS k_read, token AS t_read FROM apikey.issue('acme', '{orders:read}', name => 'read') \gset
SELECT key_id AS k_star, token AS t_star FROM apikey.issue('acme', '{orders:*}', name => 'orders star') \gset
SELECT key_id AS k_all, token AS t_all FROM apikey.issue('globex', '{*}', name => 'all') \gset
SELECT key_id AS k_none, token AS t_none FROM apikey.issue('initech', name => 'no scopes') \gset
SELECT key_id AS k_two, token AS t_two FROM apikey.issue('acme', '{orders:write, billing:read}') \gset
SELECT key_id AS k_rev, token AS t_rev FROM apikey.issue('acme', '{orders:read}',
	expires_at => '2999-01-01 00:00:00+00') \gset
SELECT key_id AS k_exp, token AS t_exp FROM apikey.issue('acme', '{orders:read}',
	expires_at => now() + interval '1 hour') \gset
SELECT key_id AS k_both, token AS t_both FROM apikey.issue('acme', '{orders:read}',
	expires_at => now() + interval '1 hour') \gset

-- A well-formed token that belongs to no key: issued, then rolled back.
BEGIN;
SELECT token AS t_unknown FROM apikey.issue('ghost') \gset
ROLLBACK;

-- revoked, expired (superuser moves expires_at into the past), and both.
SELECT apikey.revoke(:k_rev);
SELECT apikey.revoke(:k_both);
UPDATE apikey.keys SET expires_at = now() - interval '1 second' WHERE id IN (:k_exp, :k_both);

-- Every code, with all verdict fields.  For malformed and unknown nothing
-- about any key is revealed.
CREATE TEMP TABLE cases (n int, label text, token text, scope text);
INSERT INTO cases VALUES
	(1, 'valid, no scope asked', :'t_read', NULL),
	(2, 'valid, exact scope', :'t_read', 'orders:read'),
	(3, 'malformed', left(:'t_read', -1), NULL),
	(4, 'malformed with scope', 'not a token', 'orders:read'),
	(5, 'unknown', :'t_unknown', NULL),
	(6, 'unknown with scope', :'t_unknown', 'orders:read'),
	(7, 'revoked', :'t_rev', NULL),
	(8, 'revoked, wrong scope', :'t_rev', 'billing:read'),
	(9, 'expired', :'t_exp', NULL),
	(10, 'expired, wrong scope', :'t_exp', 'billing:read'),
	(11, 'revoked and expired', :'t_both', NULL),
	(12, 'scope_denied', :'t_read', 'orders:write');
SELECT c.n, c.label, (v).valid, (v).code,
       (v).key_id IS NULL AS key_id_null,
       CASE (v).key_id WHEN :k_read THEN 'k_read' WHEN :k_rev THEN 'k_rev'
                       WHEN :k_exp THEN 'k_exp' WHEN :k_both THEN 'k_both' END AS key,
       (v).owner, (v).scopes,
       (v).expires_at IS NULL AS expires_null,
       (v).remaining IS NULL AS remaining_null, (v).retry_after IS NULL AS retry_after_null
  FROM cases c, LATERAL apikey.check(c.token, c.scope) AS v
 ORDER BY c.n;

-- expires_at in the verdict is the key's expires_at.
SELECT (v).expires_at = k.expires_at AS expires_matches
  FROM apikey.check(:'t_exp') AS v JOIN apikey.keys k ON k.id = (v).key_id;
SELECT (v).expires_at AT TIME ZONE 'UTC' AS revoked_key_expiry FROM apikey.check(:'t_rev') AS v;

-- verify() gives the same valid flag as check() for every case above.
SELECT c.n, apikey.verify(c.token, c.scope) AS verify, (apikey.check(c.token, c.scope)).valid AS check
  FROM cases c ORDER BY c.n;

-- Scope matching.
CREATE TEMP TABLE scope_cases (n serial, key text, token text, scope text);
INSERT INTO scope_cases (key, token, scope) VALUES
	('orders:read', :'t_read', 'orders:read'),
	('orders:read', :'t_read', 'orders:write'),
	('orders:read', :'t_read', 'orders'),
	('orders:read', :'t_read', 'orders:*'),
	('orders:read', :'t_read', '*'),
	('orders:read', :'t_read', 'Orders:Read'),
	('orders:read', :'t_read', 'orders:read '),
	('orders:read', :'t_read', 'orders:rea'),
	('orders:read', :'t_read', 'orders:read:x'),
	('orders:read', :'t_read', ''),
	('orders:*', :'t_star', 'orders:read'),
	('orders:*', :'t_star', 'orders:write'),
	('orders:*', :'t_star', 'orders:refund:create'),
	('orders:*', :'t_star', 'orders:*'),
	('orders:*', :'t_star', 'orders'),
	('orders:*', :'t_star', 'orders:'),
	('orders:*', :'t_star', 'ordersx:read'),
	('orders:*', :'t_star', 'order:read'),
	('orders:*', :'t_star', 'billing:read'),
	('orders:*', :'t_star', '*'),
	('*', :'t_all', 'orders:read'),
	('*', :'t_all', 'billing:read'),
	('*', :'t_all', 'orders'),
	('*', :'t_all', 'not:in:catalog'),
	('*', :'t_all', ''),
	('none', :'t_none', 'orders:read'),
	('none', :'t_none', '*'),
	('none', :'t_none', ''),
	('orders:write,billing:read', :'t_two', 'orders:write'),
	('orders:write,billing:read', :'t_two', 'billing:read'),
	('orders:write,billing:read', :'t_two', 'orders:read');
SELECT s.key, '"' || s.scope || '"' AS scope, (apikey.check(s.token, s.scope)).code,
       apikey.verify(s.token, s.scope) AS verify
  FROM scope_cases s ORDER BY s.n;

-- With scope NULL the key's scopes are ignored: any live key is valid.
SELECT (apikey.check(:'t_none')).code AS none_no_arg,
       (apikey.check(:'t_none', NULL)).code AS none_null,
       (apikey.check(:'t_read', NULL)).code AS read_null,
       apikey.verify(:'t_none', NULL) AS verify_null,
       apikey.verify(:'t_star') AS verify_no_arg;

-- The verdict for a valid key lists its scopes, owner and id.
SELECT (v).key_id = :k_two AS key_ok, (v).owner,
       ARRAY(SELECT s FROM unnest((v).scopes) AS s ORDER BY s COLLATE "C") AS scopes
  FROM apikey.check(:'t_two', 'billing:read') AS v;
SELECT (v).key_id = :k_all AS key_ok, (v).owner, (v).scopes FROM apikey.check(:'t_all') AS v;
SELECT (v).key_id = :k_none AS key_ok, (v).owner, (v).scopes FROM apikey.check(:'t_none') AS v;

-- Changes are seen at once: revoke a key, change its scopes, expire it.
SELECT (apikey.check(:'t_star', 'orders:read')).code AS before;
DELETE FROM apikey.key_scopes WHERE key_id = :k_star;
SELECT (apikey.check(:'t_star', 'orders:read')).code AS scopes_removed;
INSERT INTO apikey.key_scopes VALUES (:k_star, 'orders:read');
SELECT (apikey.check(:'t_star', 'orders:read')).code AS scope_added;
UPDATE apikey.keys SET expires_at = now() - interval '1 minute' WHERE id = :k_star;
SELECT (apikey.check(:'t_star', 'orders:read')).code AS expired;
UPDATE apikey.keys SET expires_at = NULL WHERE id = :k_star;
SELECT (apikey.check(:'t_star', 'orders:read')).code AS unexpired;
SELECT apikey.revoke(:k_star);
SELECT (apikey.check(:'t_star', 'orders:read')).code AS revoked;
-- Within one transaction too.
BEGIN;
SELECT (apikey.check(:'t_two')).code AS in_xact_before;
SELECT apikey.revoke(:k_two);
SELECT (apikey.check(:'t_two')).code AS in_xact_after;
ROLLBACK;
SELECT (apikey.check(:'t_two')).code AS after_rollback;
-- A deleted key is unknown.
DELETE FROM apikey.keys WHERE id = :k_two;
SELECT (v).code, (v).key_id IS NULL AS key_id_null, (v).owner IS NULL AS owner_null
  FROM apikey.check(:'t_two') AS v;

-- An expiry a little in the future is still valid.
SELECT key_id AS k_soon, token AS t_soon FROM apikey.issue('acme', expires_at => now() + interval '1 hour') \gset
SELECT (apikey.check(:'t_soon')).code AS soon;
