-- apikey.find_tokens(text): every checksum-valid token in a text, with its
-- key and that key's status.  Random strings, near misses and tokens with a
-- broken checksum are not found; positions count characters from 1.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

CREATE TEMP TABLE tok (name text PRIMARY KEY, id bigint, token text);
INSERT INTO tok SELECT 'live', key_id, token FROM apikey.issue('acme');
INSERT INTO tok SELECT 'live2', key_id, token FROM apikey.issue('acme', prefix => 'ak_live');
INSERT INTO tok SELECT 'revoked', key_id, token FROM apikey.issue('acme');
INSERT INTO tok SELECT 'expired', key_id, token FROM apikey.issue('acme', expires_at => now() + interval '1 hour');
INSERT INTO tok SELECT 'unknown', NULL, token FROM apikey._new_token('zz');
INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
INSERT INTO tok SELECT n, key_id, token
  FROM unnest(ARRAY['suspended', 'suspended_timed', 'suspension_ended', 'quarantined', 'quarantine_ended',
                    'revoked_suspended']) n,
       LATERAL apikey.issue('acme', name => n, scopes => '{orders:read,orders:write}') i;
SELECT apikey.revoke(id) FROM tok WHERE name = 'revoked';
UPDATE apikey.keys SET expires_at = now() - interval '1 second' WHERE id = (SELECT id FROM tok WHERE name = 'expired');
CREATE FUNCTION t(n text) RETURNS text LANGUAGE sql AS 'SELECT token FROM tok WHERE name = n';
CREATE FUNCTION k(n text) RETURNS bigint LANGUAGE sql AS 'SELECT id FROM tok WHERE name = n';
SELECT apikey.suspend(k('suspended'), 'test'), apikey.suspend(k('suspended_timed'), 'test', '1 hour'),
       apikey.suspend(k('suspension_ended'), 'test', '1 hour'), apikey.suspend(k('revoked_suspended'), 'test'),
       apikey.quarantine(k('quarantined'), '{orders:read}', 'test'),
       apikey.quarantine(k('quarantine_ended'), '{orders:read}', 'test', '1 hour');
SELECT apikey.revoke(k('revoked_suspended'));
-- Responses whose time has passed (moved back, as the clock would).
ALTER TABLE apikey.suspensions DISABLE TRIGGER USER;
ALTER TABLE apikey.quarantines DISABLE TRIGGER USER;
UPDATE apikey.suspensions SET since = now() - interval '2 hours', until = now() - interval '1 hour'
 WHERE key_id = k('suspension_ended');
UPDATE apikey.quarantines SET since = now() - interval '2 hours', until = now() - interval '1 hour'
 WHERE key_id = k('quarantine_ended');
ALTER TABLE apikey.suspensions ENABLE TRIGGER USER;
ALTER TABLE apikey.quarantines ENABLE TRIGGER USER;

-- No token.
SELECT count(*) FROM apikey.find_tokens('');
SELECT count(*) FROM apikey.find_tokens(NULL);
SELECT count(*) FROM apikey.find_tokens('nothing here but ak_ and some_words and a md5: ' || md5('x'));
-- One, in the middle of a sentence.
SELECT pos, len, prefix, hint = (SELECT hint FROM apikey.keys WHERE id = k('live')) AS hint_ok,
       key_id = k('live') AS key_ok, status
  FROM apikey.find_tokens('the key ' || t('live') || ' was pasted here');
-- Many: each status, each prefix, separated in different ways.
SELECT f.pos, f.len, f.prefix, tok.name, f.status
  FROM apikey.find_tokens(t('live') || E'\n' || t('live2') || ',' || t('revoked') || '"' || t('expired')
                          || ' (' || t('unknown') || ')') f
  LEFT JOIN tok ON tok.id = f.key_id OR (f.key_id IS NULL AND tok.name = 'unknown')
 ORDER BY f.pos;
-- Suspended and quarantined keys, judged as verification judges them (an
-- ended suspension or quarantine no longer counts; revoked outranks
-- suspended): find_tokens' status and check()'s code agree.
SELECT tok.name, f.status, (apikey.check(tok.token, 'orders:write')).code AS check_code
  FROM tok, apikey.find_tokens(tok.token) f
 WHERE tok.name IN ('suspended', 'suspended_timed', 'suspension_ended', 'quarantined', 'quarantine_ended',
                    'revoked_suspended')
 ORDER BY tok.name;
-- Edges: the whole text, at the start, at the end, glued to other text.
SELECT (SELECT string_agg(pos || '/' || len, ' ') FROM apikey.find_tokens(t('live'))) AS whole,
       (SELECT string_agg(pos || '/' || len, ' ') FROM apikey.find_tokens(t('live') || ' tail')) AS at_start,
       (SELECT string_agg(pos || '/' || len, ' ') FROM apikey.find_tokens('head ' || t('live'))) AS at_end,
       (SELECT string_agg(pos || '/' || len, ' ') FROM apikey.find_tokens('x' || t('live') || 'y')) AS glued,
       (SELECT string_agg(pos || '/' || len, ' ') FROM apikey.find_tokens(t('live') || t('live'))) AS twice;
-- Positions count characters: multibyte text before the token.
SELECT pos, substr(x, pos, len) = t('live') AS substr_gives_token
  FROM (SELECT 'é€𝄞 ' || t('live') AS x) s, apikey.find_tokens(x);
-- Broken checksums and near misses are no tokens.
SELECT label, (SELECT count(*) FROM apikey.find_tokens(v)) AS found
  FROM (VALUES
    ('last character changed', left(t('live'), -1) || CASE WHEN right(t('live'), 1) = 'A' THEN 'B' ELSE 'A' END),
    ('one character changed', left(t('live'), 10) || CASE WHEN substr(t('live'), 11, 1) = 'A' THEN 'B' ELSE 'A' END || substr(t('live'), 12)),
    ('truncated', left(t('live'), -1)),
    ('uppercase prefix', upper(left(t('live'), 2)) || substr(t('live'), 3)),
    ('dash for underscore', replace(t('live'), 'ak_', 'ak-')),
    ('random base62', 'ak_' || left(translate(encode(decode(md5('a') || md5('b'), 'hex'), 'base64'), '+/=', 'xyz'), 49))
  ) AS v(label, v) ORDER BY label;
-- 1 MB of text with tokens at its start, in the middle and at its end.
SELECT octet_length(x) >= 1048576 AS one_mb, count(*) AS found, string_agg(status, ',' ORDER BY pos) AS statuses,
       max(pos) = length(x) - length(t('live2')) + 1 AS last_pos_ok
  FROM (SELECT t('live') || ' ' || repeat('ak ', 174763) || t('revoked') || ' ' || repeat('_x_', 174763)
               || ' ' || t('live2') AS x) s, apikey.find_tokens(x)
 GROUP BY x;
-- In a join over a table.
CREATE TEMP TABLE tickets (id int, body text);
INSERT INTO tickets VALUES (1, 'no key'), (2, 'key: ' || t('live')), (3, t('revoked') || ' and ' || t('unknown'));
SELECT t.id, f.pos, f.status FROM tickets t, apikey.find_tokens(t.body) f ORDER BY t.id, f.pos;

-- It is an oracle (does this token belong to a key?): the owner's only,
-- until granted.
CREATE ROLE regress_leak_find_user;
SET ROLE regress_leak_find_user;
SELECT * FROM apikey.find_tokens('x');
RESET ROLE;
DROP ROLE regress_leak_find_user;
DROP FUNCTION t(text);
DROP FUNCTION k(text);
