-- apikey demo: issue a key, verify it, check a scope, revoke it.
\set ON_ERROR_STOP on
\pset footer off
\echo
\echo '== Install the extension and declare the scopes keys may carry'
CREATE EXTENSION apikey;
INSERT INTO apikey.scopes (name, description) VALUES
	('orders:read', 'Read orders'), ('orders:write', 'Create orders');

\echo
\echo '== Issue a key for tenant acme that may read orders (the token is shown once)'
SELECT key_id, token FROM apikey.issue(owner => 'acme', scopes => '{orders:read}', name => 'demo key') \gset
\echo key_id = :key_id
\echo token  = :token
\echo
\echo '== What the database stores: a SHA-256 and a hint, never the token'
SELECT id, owner, name, hint, encode(hash, 'hex') AS sha256 FROM apikey.keys;

\echo
\echo '== Verify it'
SELECT apikey.verify(token => :'token');
\echo
\echo '== Check a scope it holds, and one it does not'
SELECT valid, code, key_id, owner, scopes FROM apikey.check(token => :'token', scope => 'orders:read');
SELECT valid, code, key_id, owner, scopes FROM apikey.check(token => :'token', scope => 'orders:write');
\echo
\echo '== A typo is caught by the checksum without reading any table'
SELECT valid, code FROM apikey.check(token => left(:'token', -1) || 'x');

\echo
\echo '== Bind the key to a transaction, for row-level security policies'
BEGIN;
SELECT apikey.authenticate(token => :'token', scope => 'orders:read') AS bound_key_id;
SELECT apikey.current_owner(), apikey.has_scope('orders:read') AS can_read, apikey.has_scope('orders:write') AS can_write;
COMMIT;

\echo
\echo '== Revoke it: verification now fails'
SELECT apikey.revoke(key_id => :key_id, reason => 'demo');
SELECT valid, code, key_id FROM apikey.check(token => :'token');

\echo
\echo '== Usage, counted per key, minute and verdict'
SELECT pg_sleep(1.5);  -- let the background worker flush
SELECT key_id, code, calls FROM apikey.usage_log ORDER BY key_id, code;
