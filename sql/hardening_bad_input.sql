-- Bad input everywhere: every SQL-callable function in schema apikey gets
-- NULLs, empty strings, huge values and wrong types.  Each answers with a
-- documented result or an ERROR with a specific SQLSTATE; never a crash, an
-- internal error, or a partial write.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');

-- Tokens the cases refer to by name (never printed).
CREATE TEMP TABLE tok (name text PRIMARY KEY, id bigint, token text);
INSERT INTO tok SELECT 'valid', key_id, token FROM apikey.issue('acme', '{orders:read}');
INSERT INTO tok SELECT 'revoked', key_id, token FROM apikey.issue('acme');
SELECT apikey.revoke(id) FROM tok WHERE name = 'revoked';
INSERT INTO tok SELECT 'victim', key_id, token FROM apikey.issue('victim');
INSERT INTO tok SELECT 'leaked', key_id, token FROM apikey.issue('acme');
INSERT INTO tok SELECT 'unknown', NULL, token FROM apikey._new_token('ak');

-- Runs q (as a subtransaction) and reports 'ok: <first column>' or
-- '<SQLSTATE>: <message>'; long texts are cut, keeping their length, and
-- timestamps (which depend on now()) are masked.
CREATE FUNCTION regress_hardening_try(q text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	r text;
	res text;
BEGIN
	BEGIN
		EXECUTE q INTO r;
		res := 'ok: ' || coalesce(r, 'NULL');
	EXCEPTION WHEN OTHERS THEN
		res := SQLSTATE || ': ' || SQLERRM;
	END;
	res := regexp_replace(res, '[A-Z][a-z]{2} [A-Z][a-z]{2} +[0-9]+ [0-9:.]+ [0-9]{4}( [A-Z]+)?', '<timestamp>', 'g');
	IF length(res) > 110 THEN
		res := left(res, 80) || '... (' || length(res) || ' chars)';
	END IF;
	RETURN res;
END
$$;

-- Row counts of every apikey table, as one text value.
CREATE FUNCTION regress_hardening_counts() RETURNS text
LANGUAGE sql AS $$
SELECT format('keys=%s key_scopes=%s revocations=%s quotas=%s scopes=%s usage_log=%s suspensions=%s quarantines=%s',
	(SELECT count(*) FROM apikey.keys), (SELECT count(*) FROM apikey.key_scopes),
	(SELECT count(*) FROM apikey.revocations), (SELECT count(*) FROM apikey.quotas),
	(SELECT count(*) FROM apikey.scopes), (SELECT count(*) FROM apikey.usage_log),
	(SELECT count(*) FROM apikey.suspensions), (SELECT count(*) FROM apikey.quarantines))
$$;

-- The cases: function name, label, statement (returning one printable value).
CREATE TEMP TABLE cases (n serial PRIMARY KEY, fn name, label text, q text, result text);
INSERT INTO cases (fn, label, q) VALUES
-- hash(text): STRICT, any text
('hash', 'NULL', $$SELECT apikey.hash(NULL)$$),
('hash', 'empty', $$SELECT encode(apikey.hash(''), 'hex')$$),
('hash', '1 MB', $$SELECT octet_length(apikey.hash(repeat('a', 1048576)))$$),
('hash', 'varchar (implicit cast)', $$SELECT apikey.hash('abc'::varchar) = apikey.hash('abc')$$),
('hash', 'integer (no implicit cast)', $$SELECT apikey.hash(42)$$),
-- verify(text, text, inet)
('verify', 'all NULL', $$SELECT apikey.verify(NULL, NULL, NULL)$$),
('verify', 'empty token', $$SELECT apikey.verify('')$$),
('verify', '1 MB token', $$SELECT apikey.verify(repeat('a', 1048576))$$),
('verify', 'valid, 1 MB scope', $$SELECT apikey.verify((SELECT token FROM tok WHERE name = 'valid'), repeat('x', 1048576))$$),
('verify', 'valid, empty scope', $$SELECT apikey.verify((SELECT token FROM tok WHERE name = 'valid'), '')$$),
('verify', 'valid, NULL scope, NULL addr', $$SELECT apikey.verify((SELECT token FROM tok WHERE name = 'valid'), NULL, NULL)$$),
('verify', 'valid, addr 0.0.0.0/0', $$SELECT apikey.verify((SELECT token FROM tok WHERE name = 'valid'), NULL, '0.0.0.0/0')$$),
('verify', 'valid, cidr (implicit cast)', $$SELECT apikey.verify((SELECT token FROM tok WHERE name = 'valid'), NULL, '10.0.0.0/8'::cidr)$$),
('verify', 'bad inet literal', $$SELECT apikey.verify('x', NULL, 'not an address')$$),
('verify', 'varchar token (implicit cast)', $$SELECT apikey.verify((SELECT token FROM tok WHERE name = 'valid')::varchar)$$),
('verify', 'integer token (no implicit cast)', $$SELECT apikey.verify(42)$$),
-- check(text, text, inet)
('check', 'all NULL', $$SELECT (apikey.check(NULL, NULL, NULL)).code$$),
('check', 'empty token', $$SELECT (apikey.check('')).code$$),
('check', '1 MB token', $$SELECT (apikey.check(repeat('ak_', 349526))).code$$),
('check', 'valid, 1 MB scope', $$SELECT (apikey.check((SELECT token FROM tok WHERE name = 'valid'), repeat('x', 1048576))).code$$),
('check', 'valid, ::/0', $$SELECT (apikey.check((SELECT token FROM tok WHERE name = 'valid'), 'orders:read', '::/0')).code$$),
('check', 'revoked', $$SELECT (apikey.check((SELECT token FROM tok WHERE name = 'revoked'))).code$$),
('check', 'unknown', $$SELECT (apikey.check((SELECT token FROM tok WHERE name = 'unknown'))).code$$),
-- authenticate(text, text, inet, boolean)
('authenticate', 'all NULL', $$SELECT apikey.authenticate(NULL, NULL, NULL, NULL)$$),
('authenticate', 'empty token', $$SELECT apikey.authenticate('')$$),
('authenticate', '1 MB token', $$SELECT apikey.authenticate(repeat('a', 1048576))$$),
('authenticate', 'valid, NULL session', $$SELECT apikey.authenticate((SELECT token FROM tok WHERE name = 'valid'), NULL, NULL, NULL) = (SELECT id FROM tok WHERE name = 'valid')$$),
('authenticate', 'valid, 1 MB scope', $$SELECT apikey.authenticate((SELECT token FROM tok WHERE name = 'valid'), repeat('x', 1048576))$$),
('authenticate', 'valid, empty scope', $$SELECT apikey.authenticate((SELECT token FROM tok WHERE name = 'valid'), '')$$),
('authenticate', 'revoked', $$SELECT apikey.authenticate((SELECT token FROM tok WHERE name = 'revoked'))$$),
('authenticate', 'unknown', $$SELECT apikey.authenticate((SELECT token FROM tok WHERE name = 'unknown'))$$),
('authenticate', 'session as text ''yes''', $$SELECT apikey.authenticate('x', NULL, NULL, 'yes') IS NULL$$),
('authenticate', 'session as integer', $$SELECT apikey.authenticate('x', NULL, NULL, 1)$$),
-- logout(), current_key_id(), current_owner() with nothing bound
('logout', 'nothing bound', $$SELECT apikey.logout()::text$$),
('current_key_id', 'nothing bound', $$SELECT apikey.current_key_id()$$),
('current_owner', 'nothing bound', $$SELECT apikey.current_owner()$$),
-- has_scope(text), require_scope(text)
('has_scope', 'NULL, nothing bound', $$SELECT apikey.has_scope(NULL)$$),
('has_scope', '1 MB, nothing bound', $$SELECT apikey.has_scope(repeat('x', 1048576))$$),
('has_scope', 'NULL, key bound', $$SELECT apikey.authenticate((SELECT token FROM tok WHERE name = 'valid')) IS NOT NULL AND apikey.has_scope(NULL) IS NOT TRUE$$),
('has_scope', 'empty, key bound', $$SELECT apikey.authenticate((SELECT token FROM tok WHERE name = 'valid')) IS NOT NULL AND apikey.has_scope('')$$),
('require_scope', 'NULL, nothing bound', $$SELECT apikey.require_scope(NULL)::text$$),
('require_scope', 'empty, nothing bound', $$SELECT apikey.require_scope('')::text$$),
('require_scope', '1 MB, nothing bound', $$SELECT apikey.require_scope(repeat('x', 1048576))::text$$),
('require_scope', 'NULL, key bound', $$SELECT apikey.authenticate((SELECT token FROM tok WHERE name = 'valid'))::text || apikey.require_scope(NULL)::text$$),
('require_scope', '1 MB, key bound', $$SELECT apikey.authenticate((SELECT token FROM tok WHERE name = 'valid'))::text || apikey.require_scope(repeat('x', 1048576))::text$$),
-- issue(...)
('issue', 'owner NULL', $$SELECT count(*) FROM apikey.issue(NULL)$$),
('issue', 'owner empty', $$SELECT count(*) FROM apikey.issue('')$$),
('issue', 'owner blanks', $$SELECT count(*) FROM apikey.issue(E' \t\n ')$$),
('issue', 'owner 1 MB (compressible)', $$SELECT count(*) FROM apikey.issue(repeat('o', 1048576))$$),
('issue', 'owner 1 MB (incompressible)', $$SELECT count(*) FROM apikey.issue((SELECT string_agg(md5(i::text), '') FROM generate_series(1, 32768) i))$$),
('issue', 'owner integer (no implicit cast)', $$SELECT count(*) FROM apikey.issue(42)$$),
('issue', 'scopes NULL', $$SELECT count(*) FROM apikey.issue('acme', NULL)$$),
('issue', 'scopes {NULL}', $$SELECT count(*) FROM apikey.issue('acme', '{NULL}')$$),
('issue', 'scopes {""}', $$SELECT count(*) FROM apikey.issue('acme', '{""}')$$),
('issue', 'scopes 1 MB name', $$SELECT count(*) FROM apikey.issue('acme', ARRAY[repeat('s', 1048576)])$$),
('issue', 'scopes 10000 duplicates', $$SELECT count(*) FROM apikey.issue('acme', array_fill('orders:read'::text, ARRAY[10000]))$$),
('issue', 'scopes not an array literal', $$SELECT count(*) FROM apikey.issue('acme', 'orders:read')$$),
('issue', 'scopes 2-D array', $$SELECT count(*) FROM apikey.issue('acme', '{{orders:read},{orders:write}}')$$),
('issue', 'name 1 MB', $$SELECT count(*) FROM apikey.issue('acme', name => repeat('n', 1048576))$$),
('issue', 'expires_at in the past', $$SELECT count(*) FROM apikey.issue('acme', expires_at => now() - interval '1 second')$$),
('issue', 'expires_at = now()', $$SELECT count(*) FROM apikey.issue('acme', expires_at => now())$$),
('issue', 'expires_at -infinity', $$SELECT count(*) FROM apikey.issue('acme', expires_at => '-infinity')$$),
('issue', 'expires_at infinity', $$SELECT (apikey.check(token)).code FROM apikey.issue('acme', expires_at => 'infinity')$$),
('issue', 'expires_at garbage', $$SELECT count(*) FROM apikey.issue('acme', expires_at => 'soon')$$),
('issue', 'prefix NULL', $$SELECT count(*) FROM apikey.issue('acme', prefix => NULL)$$),
('issue', 'prefix empty', $$SELECT count(*) FROM apikey.issue('acme', prefix => '')$$),
('issue', 'prefix 17 chars', $$SELECT count(*) FROM apikey.issue('acme', prefix => repeat('a', 17))$$),
('issue', 'prefix 1 MB', $$SELECT count(*) FROM apikey.issue('acme', prefix => repeat('a', 1048576))$$),
('issue', 'prefix uppercase', $$SELECT count(*) FROM apikey.issue('acme', prefix => 'AK')$$),
('issue', 'prefix with dash', $$SELECT count(*) FROM apikey.issue('acme', prefix => 'a-k')$$),
('issue', 'prefix non-ASCII', $$SELECT count(*) FROM apikey.issue('acme', prefix => 'äk')$$),
('issue', 'prefix 16 chars', $$SELECT (apikey.check(token)).code FROM apikey.issue('acme', prefix => 'abcdefghij_0123_')$$),
('issue', 'metadata NULL', $$SELECT count(*) FROM apikey.issue('acme', metadata => NULL)$$),
('issue', 'metadata array', $$SELECT count(*) FROM apikey.issue('acme', metadata => '[]')$$),
('issue', 'metadata JSON null', $$SELECT count(*) FROM apikey.issue('acme', metadata => 'null')$$),
('issue', 'metadata invalid JSON', $$SELECT count(*) FROM apikey.issue('acme', metadata => '{')$$),
('issue', 'metadata 1 MB object', $$SELECT count(*) FROM apikey.issue('acme', metadata => jsonb_build_object('x', repeat('m', 1048576)))$$),
('issue', 'rate_limit 0', $$SELECT count(*) FROM apikey.issue('acme', rate_limit => 0)$$),
('issue', 'rate_limit -1', $$SELECT count(*) FROM apikey.issue('acme', rate_limit => -1)$$),
('issue', 'rate_limit int max', $$SELECT (apikey.check(token)).code FROM apikey.issue('acme', rate_limit => 2147483647)$$),
('issue', 'rate_limit bigint (no implicit cast)', $$SELECT count(*) FROM apikey.issue('acme', rate_limit => 3000000000)$$),
('issue', 'rate_window NULL', $$SELECT count(*) FROM apikey.issue('acme', rate_window => NULL)$$),
('issue', 'rate_window 0', $$SELECT count(*) FROM apikey.issue('acme', rate_window => '0')$$),
('issue', 'rate_window negative', $$SELECT count(*) FROM apikey.issue('acme', rate_window => '-1 second')$$),
('issue', 'rate_window 1 year', $$SELECT (apikey.check(token)).code FROM apikey.issue('acme', rate_limit => 1, rate_window => '1 year')$$),
('issue', 'rate_window 1 year 1 second', $$SELECT count(*) FROM apikey.issue('acme', rate_limit => 1, rate_window => '1 year 1 second')$$),
('issue', 'rate_window 1 microsecond', $$SELECT (apikey.check(token)).code FROM apikey.issue('acme', rate_limit => 1, rate_window => '1 microsecond')$$),
('issue', 'rate_window garbage', $$SELECT count(*) FROM apikey.issue('acme', rate_window => 'often')$$),
('issue', 'quota -1', $$SELECT count(*) FROM apikey.issue('acme', quota => -1)$$),
('issue', 'quota 0', $$SELECT (apikey.check(token)).code FROM apikey.issue('acme', quota => 0)$$),
('issue', 'quota bigint max', $$SELECT (apikey.check(token)).remaining FROM apikey.issue('acme', quota => 9223372036854775807)$$),
('issue', 'quota bigint min', $$SELECT count(*) FROM apikey.issue('acme', quota => -9223372036854775808)$$),
('issue', 'quota_refill 0', $$SELECT count(*) FROM apikey.issue('acme', quota => 1, quota_refill => '0')$$),
('issue', 'quota_refill without quota', $$SELECT count(*) FROM apikey.issue('acme', quota_refill => '1 day')$$),
('issue', 'allowed_cidrs {NULL}', $$SELECT count(*) FROM apikey.issue('acme', allowed_cidrs => '{NULL}')$$),
('issue', 'allowed_cidrs garbage', $$SELECT count(*) FROM apikey.issue('acme', allowed_cidrs => '{10.0.0.0/33}')$$),
('issue', 'allowed_cidrs host bits set', $$SELECT count(*) FROM apikey.issue('acme', allowed_cidrs => '{10.0.0.1/8}')$$),
('issue', 'allowed_cidrs 10000 entries', $$SELECT (apikey.check(token, NULL, '192.0.2.1')).code FROM apikey.issue('acme', allowed_cidrs => (SELECT array_agg(('10.' || i / 256 || '.' || i % 256 || '.0/24')::cidr) FROM generate_series(0, 9999) i))$$),
-- set_limits(...)
('set_limits', 'key_id NULL', $$SELECT apikey.set_limits(NULL)::text$$),
('set_limits', 'key_id 0', $$SELECT apikey.set_limits(0)::text$$),
('set_limits', 'key_id -1', $$SELECT apikey.set_limits(-1)::text$$),
('set_limits', 'key_id bigint max', $$SELECT apikey.set_limits(9223372036854775807)::text$$),
('set_limits', 'key_id bigint min', $$SELECT apikey.set_limits(-9223372036854775808)::text$$),
('set_limits', 'key_id numeric (no implicit cast)', $$SELECT apikey.set_limits(1.5)::text$$),
('set_limits', 'key_id text literal', $$SELECT apikey.set_limits('one')::text$$),
('set_limits', 'rate_limit 0', $$SELECT apikey.set_limits((SELECT id FROM tok WHERE name = 'victim'), 0)::text$$),
('set_limits', 'rate_window NULL', $$SELECT apikey.set_limits((SELECT id FROM tok WHERE name = 'victim'), 5, NULL)::text$$),
('set_limits', 'quota -1', $$SELECT apikey.set_limits((SELECT id FROM tok WHERE name = 'victim'), quota => -1)::text$$),
('set_limits', 'quota_refill without quota', $$SELECT apikey.set_limits((SELECT id FROM tok WHERE name = 'victim'), quota_refill => '1 day')::text$$),
('set_limits', 'allowed_cidrs {NULL}', $$SELECT apikey.set_limits((SELECT id FROM tok WHERE name = 'victim'), allowed_cidrs => '{NULL}')::text$$),
('set_limits', 'all defaults', $$SELECT apikey.set_limits((SELECT id FROM tok WHERE name = 'victim'))::text$$),
-- set_owner_limits(owner, ...) and _owner_admit(owner, replacing)
('set_owner_limits', 'owner NULL', $$SELECT apikey.set_owner_limits(NULL)::text$$),
('set_owner_limits', 'owner 1 MB', $$SELECT apikey.set_owner_limits(repeat('o', 1048577))::text$$),
('set_owner_limits', 'rate_limit 0', $$SELECT apikey.set_owner_limits('acme', 0)::text$$),
('set_owner_limits', 'quota bigint min', $$SELECT apikey.set_owner_limits('acme', quota => -9223372036854775808)::text$$),
('set_owner_limits', 'max_keys int min', $$SELECT apikey.set_owner_limits('acme', max_keys => -2147483648)::text$$),
('set_owner_limits', 'metadata scalar', $$SELECT apikey.set_owner_limits('acme', metadata => '1')::text$$),
('set_owner_limits', 'all defaults', $$SELECT apikey.set_owner_limits('hardening-owner')::text$$),
('_owner_admit', 'owner NULL', $$SELECT apikey._owner_admit(NULL, NULL)::text$$),
('_owner_admit', 'owner without a row', $$SELECT apikey._owner_admit('nobody', 0)::text$$),
('_owner_admit', 'owner 1 MB', $$SELECT apikey._owner_admit(repeat('o', 1048577), -1)::text$$),
-- revoke(bigint, text)
('revoke', 'key_id NULL', $$SELECT apikey.revoke(NULL)$$),
('revoke', 'key_id 0', $$SELECT apikey.revoke(0)$$),
('revoke', 'key_id -1', $$SELECT apikey.revoke(-1)$$),
('revoke', 'key_id bigint max', $$SELECT apikey.revoke(9223372036854775807)$$),
('revoke', 'key_id bigint min', $$SELECT apikey.revoke(-9223372036854775808)$$),
('revoke', 'key_id numeric (no implicit cast)', $$SELECT apikey.revoke(1.5)$$),
('revoke', 'key_id text literal', $$SELECT apikey.revoke('one')$$),
('revoke', 'reason 1 MB', $$SELECT apikey.revoke((SELECT id FROM tok WHERE name = 'revoked'), repeat('r', 1048576))$$),
-- revoke_token(text, text)
('revoke_token', 'NULL', $$SELECT apikey.revoke_token(NULL)$$),
('revoke_token', 'empty', $$SELECT apikey.revoke_token('')$$),
('revoke_token', '1 MB', $$SELECT apikey.revoke_token(repeat('a', 1048576))$$),
('revoke_token', 'unknown', $$SELECT apikey.revoke_token((SELECT token FROM tok WHERE name = 'unknown'))$$),
('revoke_token', 'leaked, 1 MB reason', $$SELECT apikey.revoke_token((SELECT token FROM tok WHERE name = 'leaked'), repeat('r', 1048576))$$),
('revoke_token', 'leaked again', $$SELECT apikey.revoke_token((SELECT token FROM tok WHERE name = 'leaked'))$$),
-- rotate(bigint, interval)
('rotate', 'key_id NULL', $$SELECT count(*) FROM apikey.rotate(NULL)$$),
('rotate', 'key_id 0', $$SELECT count(*) FROM apikey.rotate(0)$$),
('rotate', 'key_id bigint max', $$SELECT count(*) FROM apikey.rotate(9223372036854775807)$$),
('rotate', 'key_id bigint min', $$SELECT count(*) FROM apikey.rotate(-9223372036854775808)$$),
('rotate', 'grace NULL', $$SELECT count(*) FROM apikey.rotate((SELECT id FROM tok WHERE name = 'victim'), NULL)$$),
('rotate', 'grace negative', $$SELECT count(*) FROM apikey.rotate((SELECT id FROM tok WHERE name = 'victim'), '-1 second')$$),
('rotate', 'grace garbage', $$SELECT count(*) FROM apikey.rotate((SELECT id FROM tok WHERE name = 'victim'), 'later')$$),
('rotate', 'revoked key', $$SELECT count(*) FROM apikey.rotate((SELECT id FROM tok WHERE name = 'revoked'))$$),
('rotate', 'grace 0', $$SELECT count(*) FROM apikey.rotate((SELECT id FROM tok WHERE name = 'victim'), '0')$$),
-- revoke_owner(text, text)
('revoke_owner', 'NULL', $$SELECT apikey.revoke_owner(NULL)$$),
('revoke_owner', 'empty', $$SELECT apikey.revoke_owner('')$$),
('revoke_owner', '1 MB', $$SELECT apikey.revoke_owner(repeat('o', 1048577))$$),
('revoke_owner', 'no such owner', $$SELECT apikey.revoke_owner('nobody')$$),
-- flush_usage(), _stats(), _live_usage()
('flush_usage', 'no arguments', $$SELECT apikey.flush_usage() >= 0$$),
('_stats', 'no arguments', $$SELECT (apikey._stats()).shared_memory$$),
('_tokens_redacted', 'no arguments', $$SELECT apikey._tokens_redacted() >= 0$$),
('_failure_networks_untracked', 'no arguments', $$SELECT apikey._failure_networks_untracked() >= 0$$),
('_grant_like_stats', 'NULL', $$SELECT apikey._grant_like_stats(NULL)::text$$),
('_grant_like_stats', 'no such function', $$SELECT apikey._grant_like_stats('apikey.no_such()')::text$$),
('_live_usage', 'no arguments', $$SELECT count(*) FROM apikey._live_usage()$$),
-- internal helpers
('_new_token', 'NULL', $$SELECT apikey._new_token(NULL)$$),
('_new_token', 'empty', $$SELECT apikey._new_token('')$$),
('_new_token', '1 MB', $$SELECT apikey._new_token(repeat('a', 1048576))$$),
('_new_token', 'a', $$SELECT (t).token ~ '^a_[0-9A-Za-z]{49}$' AND (t).hint = 'a_...' || right((t).token, 4) AND octet_length((t).hash) = 32 FROM apikey._new_token('a') t$$),
('_token_hash', 'NULL', $$SELECT apikey._token_hash(NULL)$$),
('_token_hash', 'empty', $$SELECT apikey._token_hash('')$$),
('_token_hash', '1 MB', $$SELECT apikey._token_hash(repeat('a', 1048576))$$),
('_token_hash', 'valid', $$SELECT apikey._token_hash((SELECT token FROM tok WHERE name = 'valid')) = apikey.hash((SELECT token FROM tok WHERE name = 'valid'))$$),
('_rate_state_copy', 'NULL', $$SELECT apikey._rate_state_copy(NULL, NULL, NULL, NULL)::text$$),
('_rate_state_copy', 'short hash', $$SELECT apikey._rate_state_copy(1, '\x00', 2, '\x00')::text$$),
('_rate_state_copy', '1 MB hash', $$SELECT apikey._rate_state_copy(1, decode(repeat('00', 1048576), 'hex'), 2, apikey.hash('x'))::text$$),
('_rate_state_copy', 'no such bucket', $$SELECT apikey._rate_state_copy(-1, apikey.hash('a'), -2, apikey.hash('b'))::text$$),
('_acting_role', 'no arguments', $$SELECT apikey._acting_role() = current_user$$),
('_check_scopes', 'NULL', $$SELECT apikey._check_scopes(NULL)::text$$),
('_check_scopes', 'empty array', $$SELECT apikey._check_scopes('{}')::text$$),
('_check_scopes', '{NULL}', $$SELECT apikey._check_scopes('{NULL}')::text$$),
('_check_scopes', '1 MB name', $$SELECT apikey._check_scopes(ARRAY[repeat('s', 1048576)])::text$$),
('_check_scopes', 'pattern *', $$SELECT apikey._check_scopes('{*, orders:*, *}')::text$$),
('_check_limits', 'all NULL', $$SELECT apikey._check_limits(NULL, NULL, NULL, NULL)::text$$),
('_check_limits', 'extremes that are allowed', $$SELECT apikey._check_limits(2147483647, '1 year', 9223372036854775807, '1 year')::text$$),
('_check_limits', 'window over 1 year', $$SELECT apikey._check_limits(1, '1 year 1 second', NULL, NULL)::text$$),
('_check_limits', 'negative window', $$SELECT apikey._check_limits(1, '-178000000 years', NULL, NULL)::text$$),
('_current_key_id', 'nothing bound', $$SELECT coalesce(apikey._current_key_id()::text, 'null')$$),
('_current_owner', 'nothing bound', $$SELECT coalesce(apikey._current_owner(), 'null')$$),
('_has_scope', 'NULL', $$SELECT apikey._has_scope(NULL)::text$$),
('_has_scope', '1 MB, nothing bound', $$SELECT apikey._has_scope(repeat('x', 1000000))::text$$),
('_helper_support', 'called from SQL', $$SELECT apikey._helper_support(NULL)::text$$),
('cache_stats', 'called (no arguments)', $$SELECT (apikey.cache_stats()).capacity::text$$),
('cache_stats', 'with cache_size 0', $$SELECT set_config('apikey.cache_size', '0', true) || (apikey.cache_stats()).capacity::text$$),
('_clip', 'NULL', $$SELECT coalesce(apikey._clip(NULL), 'null')$$),
('_clip', 'empty', $$SELECT '[' || apikey._clip('') || ']'$$),
('_clip', '1 MB', $$SELECT length(apikey._clip(repeat('x', 1000000)))::text$$),
('_clip', '1 MB multibyte', $$SELECT length(apikey._clip(repeat('é', 1000000)))::text || right(apikey._clip(repeat('é', 1000000)), 4)$$),
('_check_cidrs', 'NULL', $$SELECT apikey._check_cidrs(NULL)::text$$),
('_check_cidrs', 'empty array', $$SELECT apikey._check_cidrs('{}')::text$$),
('_check_cidrs', '{NULL}', $$SELECT apikey._check_cidrs('{NULL}')::text$$),
('_check_cidrs', 'everything', $$SELECT apikey._check_cidrs('{0.0.0.0/0, ::/0}')::text$$),
('_check_cidrs', 'inet with host bits (no implicit cast)', $$SELECT apikey._check_cidrs('{10.0.0.1/8}'::inet[])::text$$),
-- audit trail
('audit_verify', 'NULL range', $$SELECT count(*) FROM apikey.audit_verify(NULL, NULL)$$),
('audit_verify', 'from after to', $$SELECT count(*) FROM apikey.audit_verify(10, 1)$$),
('audit_verify', 'negative, huge', $$SELECT count(*) FROM apikey.audit_verify(-9223372036854775808, 9223372036854775807)$$),
('audit_verify', 'text (no implicit cast)', $$SELECT count(*) FROM apikey.audit_verify('1'::text)$$),
('audit_checkpoint', 'no arguments', $$SELECT seq > 0 FROM apikey.audit_checkpoint()$$),
('audit_prune', 'NULL', $$SELECT apikey.audit_prune(NULL)$$),
('audit_prune', 'zero', $$SELECT apikey.audit_prune('0')$$),
('audit_prune', 'negative', $$SELECT apikey.audit_prune('-1 day')$$),
('audit_prune', 'garbage', $$SELECT apikey.audit_prune('soon')$$),
('audit_prune', '100 years: nothing to remove', $$SELECT apikey.audit_prune('100 years')$$),
('audit_for_token', 'NULL', $$SELECT count(*) FROM apikey.audit_for_token(NULL)$$),
('audit_for_token', 'empty', $$SELECT count(*) FROM apikey.audit_for_token('')$$),
('audit_for_token', '1 MB', $$SELECT count(*) FROM apikey.audit_for_token(repeat('a', 1048576))$$),
('audit_for_token', 'unknown', $$SELECT count(*) FROM apikey.audit_for_token((SELECT token FROM tok WHERE name = 'unknown'))$$),
('audit_for_token', 'valid', $$SELECT count(*) > 0 FROM apikey.audit_for_token((SELECT token FROM tok WHERE name = 'valid'))$$),
('_audit_context', 'outside a function', $$SELECT coalesce(apikey._audit_context(), 'null')$$),
('_audit_hash', 'all NULL', $$SELECT octet_length(apikey._audit_hash(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL))$$),
('_audit_hash', '1 MB details', $$SELECT octet_length(apikey._audit_hash(NULL, 1, now(), '1', 'x', 'r', 'r', 1, repeat('c', 1048576), '::1', 'a', 1, 'o', jsonb_build_object('x', repeat('d', 1048576))))$$),
('_audit', 'outside a function', $$SELECT apikey._audit('forged', NULL, NULL, '{}')::text$$),
('_audit_direct', 'NULL action', $$SELECT apikey._audit_direct(NULL, NULL, '{}')::text$$),
('_audit_lock', 'no arguments', $$SELECT apikey._audit_lock()::text$$),
('_audit_chain', 'called directly', $$SELECT apikey._audit_chain()::text$$),
('_audit_guard', 'called directly', $$SELECT apikey._audit_guard()::text$$),
('_audit_dml', 'called directly', $$SELECT apikey._audit_dml()::text$$),
('_audit_dml_attach', 'NULL', $$SELECT apikey._audit_dml_attach(NULL)::text$$),
('_audit_dml_attach', 'no such table', $$SELECT apikey._audit_dml_attach('no_such_table')::text$$),
('_revoke', 'NULL', $$SELECT apikey._revoke(NULL, NULL)::text$$),
('_revoke', 'no such key', $$SELECT apikey._revoke(-1, NULL)::text$$),
-- leak response
('find_tokens', 'NULL', $$SELECT count(*) FROM apikey.find_tokens(NULL)$$),
('find_tokens', 'empty', $$SELECT count(*) FROM apikey.find_tokens('')$$),
('find_tokens', '1 MB of underscores', $$SELECT count(*) FROM apikey.find_tokens(repeat('_', 1048576))$$),
('find_tokens', '1 MB of base62', $$SELECT count(*) FROM apikey.find_tokens(repeat('a_', 524288))$$),
('find_tokens', 'valid', $$SELECT status FROM apikey.find_tokens('x ' || (SELECT token FROM tok WHERE name = 'valid'))$$),
('_scan_tokens', 'NULL', $$SELECT count(*) FROM apikey._scan_tokens(NULL)$$),
('_scan_tokens', 'valid', $$SELECT hash = apikey.hash((SELECT token FROM tok WHERE name = 'valid')) FROM apikey._scan_tokens((SELECT token FROM tok WHERE name = 'valid'))$$),
('_token_hash_or_null', 'NULL', $$SELECT coalesce(apikey._token_hash_or_null(NULL)::text, 'null')$$),
('_token_hash_or_null', 'token with a tail', $$SELECT coalesce(apikey._token_hash_or_null((SELECT token FROM tok WHERE name = 'valid') || 'x')::text, 'null')$$),
('report_leak', 'all NULL', $$SELECT apikey.report_leak(NULL, NULL, NULL)$$),
('report_leak', '1 MB token', $$SELECT apikey.report_leak(repeat('a', 1048576), 'x')$$),
('report_leak', '1 MB source', $$SELECT apikey.report_leak((SELECT token FROM tok WHERE name = 'valid'), repeat('s', 1048576))$$),
('report_leak', 'unknown', $$SELECT coalesce(apikey.report_leak((SELECT token FROM tok WHERE name = 'unknown'), 'x')::text, 'null')$$),
('report_leak_hash', 'all NULL', $$SELECT apikey.report_leak_hash(NULL, NULL, NULL)$$),
('report_leak_hash', '33 bytes', $$SELECT apikey.report_leak_hash(apikey.hash('x') || '\x00'::bytea, 'x')$$),
('report_leak_hash', 'text (no implicit cast)', $$SELECT apikey.report_leak_hash('abc'::text, 'x')$$),
('report_leaks', 'NULL', $$SELECT apikey.report_leaks(NULL)$$),
('report_leaks', 'object', $$SELECT apikey.report_leaks('{}')$$),
('report_leaks', 'array of junk', $$SELECT apikey.report_leaks('[1, null, "x", [], {"token": null}]')::text$$),
('report_leaks', 'not JSON', $$SELECT apikey.report_leaks('[')$$),
('revoke_leaked', 'NULL', $$SELECT apikey.revoke_leaked(NULL)$$),
('revoke_leaked', '{NULL}', $$SELECT apikey.revoke_leaked('{NULL}')$$),
('revoke_leaked', '1001 tokens', $$SELECT apikey.revoke_leaked(array_fill(''::text, ARRAY[1001]))$$),
('revoke_leaked', '2-D array', $$SELECT apikey.revoke_leaked('{{a},{b}}')$$),
('scanner_rules', 'NULL', $$SELECT apikey.scanner_rules(NULL)$$),
('scanner_rules', 'unknown format', $$SELECT apikey.scanner_rules('yara')$$),
('scanner_rules', 'github', $$SELECT length(apikey.scanner_rules('github')) > 0$$),
('leak_guard', 'called directly', $$SELECT apikey.leak_guard()::text$$),
('_suspend_leaked', 'NULL', $$SELECT apikey._suspend_leaked(NULL, NULL, NULL)$$),
('_report_leak', 'NULL', $$SELECT (apikey._report_leak(NULL, NULL, NULL)).exposure_id$$),
('_report_leak_audited', 'outside a function', $$SELECT apikey._report_leak_audited('x', apikey.hash('x'), 'x', NULL)$$),
('_check_leak_note', 'NULL', $$SELECT apikey._check_leak_note(NULL, NULL, NULL)::text$$),
('_invalidate', 'called directly', $$SELECT apikey._invalidate()::text$$),
('_key_changed', 'called directly', $$SELECT apikey._key_changed()::text$$),
('_scope_deleted', 'called directly', $$SELECT apikey._scope_deleted()::text$$),
-- issue_many(text[], ...the rest as issue()...)
('issue_many', 'owners NULL', $$SELECT count(*) FROM apikey.issue_many(NULL)$$),
('issue_many', 'owners empty', $$SELECT count(*) FROM apikey.issue_many('{}')$$),
('issue_many', 'owners {NULL}', $$SELECT count(*) FROM apikey.issue_many('{NULL}')$$),
('issue_many', 'owners {""}', $$SELECT count(*) FROM apikey.issue_many('{""}')$$),
('issue_many', 'owners 2-D array', $$SELECT count(*) FROM apikey.issue_many('{{a},{b}}')$$),
('issue_many', 'owners 10001', $$SELECT count(*) FROM apikey.issue_many(array_fill('acme'::text, ARRAY[10001]))$$),
('issue_many', 'owner 1 MB', $$SELECT count(*) FROM apikey.issue_many(ARRAY[repeat('o', 1048576)])$$),
('issue_many', 'owners text (no implicit cast)', $$SELECT count(*) FROM apikey.issue_many('acme'::text)$$),
('issue_many', 'scopes {NULL}', $$SELECT count(*) FROM apikey.issue_many('{acme}', '{NULL}')$$),
('issue_many', 'prefix 1 MB', $$SELECT count(*) FROM apikey.issue_many('{acme}', prefix => repeat('a', 1048576))$$),
('issue_many', 'rate_window NULL', $$SELECT count(*) FROM apikey.issue_many('{acme}', rate_window => NULL)$$),
('issue_many', 'metadata 1 MB object', $$SELECT count(*) FROM apikey.issue_many('{acme}', metadata => jsonb_build_object('x', repeat('m', 1048576)))$$),
('issue_many', 'two owners', $$SELECT count(DISTINCT (apikey.check(token)).key_id) FROM apikey.issue_many('{acme,acme}')$$),
-- reversible responses (issue 12)
('suspend', 'NULL', $$SELECT apikey.suspend(NULL, NULL)::text$$),
('suspend', 'no reason', $$SELECT apikey.suspend((SELECT id FROM tok WHERE name = 'valid'), NULL)::text$$),
('suspend', 'no such key', $$SELECT apikey.suspend(-1, 'r')::text$$),
('suspend', 'for_ 0', $$SELECT apikey.suspend((SELECT id FROM tok WHERE name = 'valid'), 'r', '0')::text$$),
('suspend', 'for_ beyond the calendar', $$SELECT apikey.suspend((SELECT id FROM tok WHERE name = 'valid'), 'r', '178000000 years')::text$$),
('suspend', '1 MB reason', $$SELECT apikey.suspend((SELECT id FROM tok WHERE name = 'valid'), repeat('r', 1048576))::text$$),
('resume', 'NULL', $$SELECT apikey.resume(NULL)::text$$),
('resume', 'no such key', $$SELECT apikey.resume(-1)::text$$),
('resume', 'revoked key', $$SELECT apikey.resume((SELECT id FROM tok WHERE name = 'revoked'))::text$$),
('resume', 'suspended key', $$SELECT apikey.resume((SELECT id FROM tok WHERE name = 'valid'), repeat('n', 1048576))::text$$),
('suspend_owner', 'NULL', $$SELECT apikey.suspend_owner(NULL, NULL)::text$$),
('suspend_owner', 'no reason', $$SELECT apikey.suspend_owner('acme', NULL)::text$$),
('suspend_owner', '1 MB owner', $$SELECT apikey.suspend_owner(repeat('o', 1048577), 'r')::text$$),
('suspend_owner', 'for_ negative', $$SELECT apikey.suspend_owner('acme', 'r', '-1 second')::text$$),
('resume_owner', 'NULL', $$SELECT apikey.resume_owner(NULL)::text$$),
('resume_owner', 'no such owner', $$SELECT apikey.resume_owner('nobody')::text$$),
('quarantine', 'NULL', $$SELECT apikey.quarantine(NULL, NULL, NULL)::text$$),
('quarantine', 'NULL scopes', $$SELECT apikey.quarantine((SELECT id FROM tok WHERE name = 'valid'), NULL, 'r')::text$$),
('quarantine', 'empty scopes', $$SELECT apikey.quarantine((SELECT id FROM tok WHERE name = 'valid'), '{}', 'r')::text$$),
('quarantine', '1 MB scope', $$SELECT apikey.quarantine((SELECT id FROM tok WHERE name = 'valid'), ARRAY[repeat('s', 1048576)], 'r')::text$$),
('quarantine', 'for_ 0', $$SELECT apikey.quarantine((SELECT id FROM tok WHERE name = 'valid'), '{orders:read}', 'r', '0')::text$$),
('release', 'NULL', $$SELECT apikey.release(NULL)::text$$),
('release', 'not quarantined', $$SELECT apikey.release((SELECT id FROM tok WHERE name = 'valid'))::text$$),
('reissue', 'NULL', $$SELECT count(*) FROM apikey.reissue(NULL)$$),
('reissue', 'no such key', $$SELECT count(*) FROM apikey.reissue(-1)$$),
('reissue', 'key in good standing', $$SELECT count(*) FROM apikey.reissue((SELECT id FROM tok WHERE name = 'valid'))$$),
('_response_key', 'NULL', $$SELECT (apikey._response_key(NULL, NULL, NULL, NULL)).id::text$$),
('_lock_key', 'NULL', $$SELECT (apikey._lock_key(NULL)).id::text$$),
('_lock_key', 'no such key', $$SELECT (apikey._lock_key(-1)).id::text$$),
('_check_response', 'NULL', $$SELECT apikey._check_response(NULL, NULL, NULL)::text$$),
('_check_response', 'for_ negative', $$SELECT apikey._check_response('r', '-1 day', 'x')::text$$),
('_successor', 'NULL', $$SELECT (apikey._successor(NULL)).key_id::text$$),
('throttle', 'NULL', $$SELECT apikey.throttle(NULL, NULL, NULL)::text$$),
('throttle', 'no such key', $$SELECT apikey.throttle(-1, 1, '1 hour')::text$$),
('throttle', 'rate 0', $$SELECT apikey.throttle((SELECT id FROM tok WHERE name = 'valid'), 0, '1 hour')::text$$),
('throttle', 'for_ NULL', $$SELECT apikey.throttle((SELECT id FROM tok WHERE name = 'valid'), 1, NULL)::text$$),
('throttle', 'for_ beyond the calendar', $$SELECT apikey.throttle((SELECT id FROM tok WHERE name = 'valid'), 1, '178000000 years')::text$$),
('_throttle', 'NULL', $$SELECT apikey._throttle(NULL, NULL, NULL, NULL)::text$$),
('_throttle', 'short hash', $$SELECT apikey._throttle(1, '\x00', 1, now())::text$$),
('_throttle', 'negative rate', $$SELECT apikey._throttle(1, apikey.hash('x'), -1, now())::text$$),
('_exposure_ids', 'NULL', $$SELECT apikey._exposure_ids(NULL)::text$$),
('grant_admin', 'NULL', $$SELECT apikey.grant_admin(NULL)::text$$),
('grant_monitor', 'PUBLIC', $$SELECT apikey.grant_monitor('-')::text$$),
('grant_monitor', 'no such role', $$SELECT apikey.grant_monitor('regress_no_such_role')::text$$),
('grant_reporter', 'NULL', $$SELECT apikey.grant_reporter(NULL)::text$$),
('revoke_admin', 'NULL', $$SELECT apikey.revoke_admin(NULL)::text$$),
('revoke_monitor', 'PUBLIC', $$SELECT apikey.revoke_monitor(0::oid::regrole)::text$$),
('revoke_reporter', 'never granted', $$SELECT apikey.revoke_reporter('pg_monitor')::text$$),
('_grant_kind', 'NULL', $$SELECT apikey._grant_kind(NULL, NULL, NULL)::text$$),
('_apply_grants', 'NULL', $$SELECT apikey._apply_grants(NULL, NULL, NULL)::text$$),
('_regrant', 'nothing recorded', $$SELECT apikey._regrant()::text$$),
('_role_grants_apply', 'called directly', $$SELECT apikey._role_grants_apply()::text$$),
('_stats_by_code', 'no arguments', $$SELECT count(*) > 0 FROM apikey._stats_by_code()$$),
('_writer_heartbeat', 'no arguments', $$SELECT apikey._writer_heartbeat() IS NULL OR apikey._writer_heartbeat() <= clock_timestamp()$$),
('_network_overflow', 'no arguments', $$SELECT apikey._network_overflow() >= 0$$),
('_network_of', 'NULL', $$SELECT apikey._network_of(NULL)::text$$),
('_network_of', 'IPv6 /0', $$SELECT apikey._network_of('::/0')::text$$),
('_network_of', 'IPv4 network', $$SELECT apikey._network_of('10.0.0.0/8')::text$$),
('compute_baselines', 'NULL', $$SELECT apikey.compute_baselines(NULL)::text$$),
('compute_baselines', 'negative window', $$SELECT apikey.compute_baselines('-1 day')::text$$),
('compute_baselines', '1000 years', $$SELECT apikey.compute_baselines('1000 years')::text$$),
('_compute_baselines', 'NULL', $$SELECT apikey._compute_baselines(NULL)::text$$),
('_networks_maintain', 'NULL', $$SELECT apikey._networks_maintain(NULL)::text$$),
('_networks_maintain', 'zero', $$SELECT apikey._networks_maintain('0')::text$$),
('_rule_args_check', 'NULL', $$SELECT apikey._rule_args_check(NULL, NULL, NULL, NULL)::text$$),
('_rule_shared_address_eval', 'NULL', $$SELECT count(*) FROM apikey._rule_shared_address_eval(NULL, NULL, NULL)$$),
('_rule_new_networks_eval', 'huge threshold', $$SELECT count(*) FROM apikey._rule_new_networks_eval(1e30, '1 hour', 0)$$),
('_rule_volume_spike_eval', 'zero window', $$SELECT count(*) FROM apikey._rule_volume_spike_eval(10, '0', 100)$$),
('issue_canary', 'NULL', $$SELECT apikey.issue_canary(NULL)::text$$),
('issue_canary', 'empty owner', $$SELECT apikey.issue_canary('')::text$$),
('issue_canary', 'NULL prefix', $$SELECT apikey.issue_canary('acme', 'x', NULL)::text$$),
('issue_canary', 'bad prefix', $$SELECT (apikey.issue_canary('acme', 'x', 'no way')).key_id > 0$$),
('_canary_uses', 'no arguments', $$SELECT count(*) >= 0 FROM apikey._canary_uses()$$),
('_network', 'NULL', $$SELECT apikey._network(NULL)::text$$),
('_network_failures', 'NULL', $$SELECT count(*) FROM apikey._network_failures(NULL)$$),
('_network', 'IPv6', $$SELECT apikey._network('2001:db8::1')::text$$),
('_detection_rules_check', 'called directly', $$SELECT apikey._detection_rules_check()::text$$),
('_respond', 'NULL', $$SELECT apikey._respond(NULL, NULL, NULL)$$),
('_rule_address_failures', 'NULL rule', $$SELECT count(*) FROM apikey._rule_address_failures(NULL)$$),
('_rule_failure_spike', 'NULL rule', $$SELECT count(*) FROM apikey._rule_failure_spike(NULL)$$),
('_rule_allowlist_violation', 'NULL rule', $$SELECT count(*) FROM apikey._rule_allowlist_violation(NULL)$$),
('_rule_dormant_use', 'NULL rule', $$SELECT count(*) FROM apikey._rule_dormant_use(NULL)$$),
('_rule_revoked_use', 'NULL rule', $$SELECT count(*) FROM apikey._rule_revoked_use(NULL)$$),
('_rule_canary_use', 'NULL rule', $$SELECT count(*) FROM apikey._rule_canary_use(NULL)$$),
('_rule_shared_address', 'NULL rule', $$SELECT count(*) FROM apikey._rule_shared_address(NULL)$$),
('_rule_new_networks', 'NULL rule', $$SELECT count(*) FROM apikey._rule_new_networks(NULL)$$),
('_rule_volume_spike', 'NULL rule', $$SELECT count(*) FROM apikey._rule_volume_spike(NULL)$$),
('_detect', 'no arguments', $$SELECT apikey._detect() >= 0$$),
('run_detection', 'no arguments', $$SELECT apikey.run_detection() >= 0$$),
('resolve_finding', 'NULL', $$SELECT apikey.resolve_finding(NULL, NULL)::text$$),
('resolve_finding', 'NULL resolution', $$SELECT apikey.resolve_finding(1, NULL)::text$$),
('resolve_finding', 'bad resolution', $$SELECT apikey.resolve_finding(1, 'whatever')::text$$),
('resolve_finding', 'no such finding', $$SELECT apikey.resolve_finding(-1, 'false_positive')::text$$),
-- events
('_legacy_hash', 'NULL', $$SELECT apikey._legacy_hash(NULL)::text$$),
('_legacy_hash', '1 MB', $$SELECT apikey._legacy_hash(repeat('a', 1048576))::text$$),
('_inet_or_null', 'NULL', $$SELECT apikey._inet_or_null(NULL)::text$$),
('_inet_or_null', 'not an address', $$SELECT apikey._inet_or_null('not an address')::text$$),
('_inet_or_null', 'host bits set', $$SELECT apikey._inet_or_null('10.0.0.5/24')::text$$),
('_inet_or_null', 'prefix too long', $$SELECT apikey._inet_or_null('10.0.0.5/33')::text$$),
('_erase_finding_addresses', 'NULL', $$SELECT apikey._erase_finding_addresses(NULL, NULL)::text$$),
('_erase_finding_addresses', 'zero batch', $$SELECT apikey._erase_finding_addresses(now(), 0)::text$$),
('_erase_finding_addresses', 'nothing that old', $$SELECT apikey._erase_finding_addresses('-infinity', 10)::text$$),
('_event', 'all NULL', $$SELECT apikey._event(NULL, NULL, NULL, NULL, NULL)$$),
('_event', 'unknown kind', $$SELECT apikey._event('key.exploded', NULL, NULL, 'info', '{}')$$),
('_event', 'NULL severity', $$SELECT apikey._event('key.revoked', NULL, NULL, NULL, '{}')$$),
('_event', 'array payload', $$SELECT apikey._event('key.revoked', NULL, NULL, 'info', '[]')$$),
('_event', '1 MB payload ending in a token', $$SELECT apikey._event('key.revoked', NULL, NULL, 'info', jsonb_build_object('x', repeat('a', 1048576) || ' ' || (SELECT token FROM tok WHERE name = 'valid'))) > 0$$),
('_event', 'the 1 MB payload was kept without the token', $$SELECT CASE WHEN bool_or(length(e.payload::text) > 1048576) THEN 'kept' ELSE 'lost' END || ', ' || count(*) FILTER (WHERE strpos(e.payload::text, t.token) > 0) || ' with the token' FROM apikey.events e, tok t WHERE t.name = 'valid'$$),
('_event', 'NULL payload', $$SELECT apikey._event('key.revoked', NULL, NULL, 'info', NULL) > 0$$),
('_event_key_changed', 'called directly', $$SELECT apikey._event_key_changed()::text$$),
('_event_redact', 'NULL', $$SELECT apikey._event_redact(NULL)::text$$),
('_event_redact', 'token-shaped field name', $$SELECT apikey._event_redact(jsonb_build_object(repeat('f', 64), 1))::text$$),
('_secret_shaped', 'NULL', $$SELECT apikey._secret_shaped(NULL)::text$$),
('_redact_text', 'NULL', $$SELECT apikey._redact_text(NULL)::text$$),
('_redact_text', '1 MB of hex', $$SELECT length(apikey._redact_text(repeat('ab', 524288)))::text$$),
('_redact_reason', 'called directly', $$SELECT apikey._redact_reason()::text$$),
('_event_settings', 'no arguments', $$SELECT (apikey._event_settings()).retention IS NOT NULL$$),
('_expire_unused', 'NULL', $$SELECT apikey._expire_unused(NULL, NULL)::text$$),
('_expire_unused', 'negative', $$SELECT apikey._expire_unused('-1 day', true)::text$$),
('_run_events', 'no arguments', $$SELECT apikey._run_events() >= 0$$),
('run_events', 'no arguments', $$SELECT apikey.run_events() >= 0$$),
('expire_unused', 'NULL', $$SELECT count(*) FROM apikey.expire_unused(NULL)$$),
('expire_unused', 'zero', $$SELECT count(*) FROM apikey.expire_unused('0')$$),
('expire_unused', 'garbage', $$SELECT count(*) FROM apikey.expire_unused('soon')$$),
('expire_unused', '178000000 years', $$SELECT count(*) FROM apikey.expire_unused('178000000 years')$$),
('expire_unused', '100 years: nothing to revoke', $$SELECT count(*) FROM apikey.expire_unused('100 years')$$),
-- retention
('_rate_limit_state', 'no arguments', $$SELECT count(*) >= 0 FROM apikey._rate_limit_state()$$),
('_retention_settings', 'no arguments', $$SELECT usage_retention > '0' FROM apikey._retention_settings()$$),
('run_retention', 'NULL', $$SELECT apikey.run_retention(NULL)::text$$),
('run_retention', 'zero', $$SELECT apikey.run_retention(0)::text$$),
('run_retention', 'negative', $$SELECT apikey.run_retention(-5)::text$$),
('run_retention', 'too large', $$SELECT apikey.run_retention(2000000000)::text$$),
('run_retention', 'garbage', $$SELECT apikey.run_retention('lots')::text$$),
('run_retention', 'one row per step', $$SELECT (apikey.run_retention(1)).more::text$$),
-- legacy keys
('import_keys', 'format NULL', $$SELECT count(*) FROM apikey.import_keys(NULL, '[]')$$),
('import_keys', 'unknown format', $$SELECT count(*) FROM apikey.import_keys('nope', '[]')$$),
('import_keys', 'rows NULL', $$SELECT count(*) FROM apikey.import_keys('sha256', NULL)$$),
('import_keys', 'rows an object', $$SELECT count(*) FROM apikey.import_keys('sha256', '{}')$$),
('import_keys', 'row not an object', $$SELECT error FROM apikey.import_keys('sha256', '[42]')$$),
('import_keys', 'row without hash', $$SELECT error FROM apikey.import_keys('sha256', '[{"owner": "acme"}]')$$),
('import_keys', '1 MB hash', $$SELECT error FROM apikey.import_keys('sha256', jsonb_build_array(jsonb_build_object('owner', 'acme', 'hash', repeat('a', 1048576))))$$),
('import_keys', 'bad timestamp', $$SELECT error FROM apikey.import_keys('sha256', '[{"owner": "acme", "hash": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "expires_at": "soon"}]')$$),
('import_key', 'owner NULL', $$SELECT apikey.import_key('sha256', NULL, plaintext => 'x_abcdefghijklmnopqrstu')$$),
('import_key', 'plaintext of another shape', $$SELECT apikey.import_key('sha256', 'acme', plaintext => 'short')$$),
('import_key', 'hash and plaintext', $$SELECT apikey.import_key('sha256', 'acme', 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=', 'x_abcdefghijklmnopqrstu')$$),
('import_key', 'unknown scope', $$SELECT apikey.import_key('sha256', 'acme', plaintext => 'x_abcdefghijklmnopqrstu', scopes => '{nope}')$$),
('import_key', 'drf without lookup', $$SELECT apikey.import_key('drf', 'acme', 'pbkdf2_sha256$1000$salt$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=')$$),
('legacy_retire', 'NULL', $$SELECT apikey.legacy_retire(NULL, false)$$),
('legacy_retire', 'unknown format', $$SELECT apikey.legacy_retire('nope', false)$$),
('export_keys', 'NULL owner (all)', $$SELECT count(*) >= 0 FROM apikey.export_keys(NULL)$$),
('export_keys', 'unknown owner', $$SELECT count(*) FROM apikey.export_keys('nobody')$$),
('legacy_stats', 'no arguments', $$SELECT verified >= 0 FROM apikey.legacy_stats()$$),
('_import_check', 'NULL row', $$SELECT apikey._import_check(NULL, NULL)$$),
('_import_write', 'no rows', $$SELECT count(*) FROM apikey._import_write(apikey._legacy_format('sha256'), '{}', '{}')$$),
('_legacy_format', 'NULL', $$SELECT apikey._legacy_format(NULL)$$),
('_legacy_formats_changed', 'called directly', $$SELECT apikey._legacy_formats_changed()::text$$),
('_legacy_formats_check', 'called directly', $$SELECT apikey._legacy_formats_check()::text$$),
('_failure_networks_unwatched', 'no arguments', $$SELECT apikey._failure_networks_unwatched() >= 0$$);

-- Run every case in order, each after the previous one.
DO $$
DECLARE
	c record;
BEGIN
	FOR c IN SELECT n, q FROM cases ORDER BY n LOOP
		UPDATE cases SET result = regress_hardening_try(c.q) WHERE n = c.n;
		PERFORM apikey.logout();
	END LOOP;
END
$$;
-- A planner support function takes an argument of type internal, which SQL
-- cannot produce; how the call is refused differs between minor releases
-- (15.18: 0A000; 15.20: 42883).  Either way it never runs.
UPDATE cases SET result = 'refused: SQL cannot pass a planner argument'
 WHERE fn = '_helper_support' AND result ~ '^(42883|42846|0A000): ';
SELECT n, fn, label, result FROM cases ORDER BY n;

-- Every SQL-callable function in schema apikey has at least one case: a new
-- function shows up here until it gets one (zero rows).
SELECT p.oid::regprocedure AS function_without_case
  FROM pg_proc p
 WHERE p.pronamespace = 'apikey'::regnamespace
   AND NOT EXISTS (SELECT FROM cases c WHERE c.fn = p.proname)
 ORDER BY p.oid::regprocedure::text COLLATE "C";

-- No case produced an internal error or an internal message (zero rows).
SELECT n, fn, label, result FROM cases
 WHERE result ~ '^XX' OR result ~* 'cache lookup failed|SPI_|unrecognized|unexpected|TRAP|could not|internal'
 ORDER BY n;

-- The failing calls of the administrative functions again, each a
-- top-level statement of its own: the tables are unchanged afterwards.
SELECT regress_hardening_counts() AS counts_before \gset
\set VERBOSITY sqlstate
SELECT q FROM cases
 WHERE fn IN ('issue', 'issue_many', 'set_limits', 'revoke', 'revoke_token', 'rotate', 'revoke_owner', '_check_scopes', '_check_limits', '_check_cidrs',
              'suspend', 'resume', 'suspend_owner', 'resume_owner', 'quarantine', 'release', 'reissue', '_response_key',
              '_lock_key', 'throttle', '_throttle', 'issue_canary', 'resolve_finding')
   AND result !~ '^ok'
 ORDER BY n \gexec
\set VERBOSITY default
SELECT regress_hardening_counts() = :'counts_before' AS no_partial_write;

-- Edges where more than one answer is right, but some are wrong: each
-- result must match its pattern (every row true).
SELECT label, regress_hardening_try(q) ~ expect AS as_documented
  FROM (VALUES
	(2, 'issue: an empty allowlist is refused or allows no address',
	 $$SELECT (apikey.check(token, NULL, '192.0.2.1')).code FROM apikey.issue('acme', allowed_cidrs => '{}')$$,
	 '^(22023: |ok: address_denied$)'),
	(3, 'set_limits: an empty allowlist is refused or allows no address',
	 $$SELECT (apikey.check(t.token, NULL, '192.0.2.1')).code
	     FROM apikey.issue('acme') t, LATERAL apikey.set_limits(t.key_id, allowed_cidrs => '{}')$$,
	 '^(22023: |ok: address_denied$)'),
	(4, 'rate limit 1 per 178000000 years: refused, or the second call is limited',
	 $$SELECT string_agg((apikey.check(t.token)).code, ',' ORDER BY i)
	     FROM apikey.issue('acme', rate_limit => 1, rate_window => '178000000 years') t, generate_series(1, 2) i$$,
	 '^(22023: |ok: valid,rate_limited$)'),
	(5, 'rate limit 1 per 300000 years: refused, or the second call is limited',
	 $$SELECT string_agg((apikey.check(t.token)).code, ',' ORDER BY i)
	     FROM apikey.issue('acme', rate_limit => 1, rate_window => '300000 years') t, generate_series(1, 3) i$$,
	 '^(22023: |ok: valid,rate_limited,rate_limited$)'),
	(6, 'rate limit 2 per 1000000 years: refused, or the first two calls are valid',
	 $$SELECT string_agg((apikey.check(t.token)).code, ',' ORDER BY i)
	     FROM apikey.issue('acme', rate_limit => 2, rate_window => '1000000 years') t, generate_series(1, 3) i$$,
	 '^(22023: |ok: valid,valid,rate_limited$)'),
	(7, 'quota refilled every 300000 years: refused, or verify() answers',
	 $$SELECT apikey.verify(t.token)::text FROM apikey.issue('acme', quota => 1, quota_refill => '300000 years') t$$,
	 '^(22023: |ok: true$)'),
	(8, 'quota refilled every 178000000 years: refused, or verify() answers',
	 $$SELECT apikey.verify(t.token)::text FROM apikey.issue('acme', quota => 1, quota_refill => '178000000 years') t$$,
	 '^(22023: |ok: true$)'),
	(9, 'quota refill pushed past the timestamp range by set_limits: refused, or verify() answers',
	 $$SELECT apikey.verify(t.token)::text
	     FROM apikey.issue('acme') t, LATERAL apikey.set_limits(t.key_id, quota => 5, quota_refill => '300000 years')$$,
	 '^(22023: |ok: true$)'),
	(10, 'rotate: a grace beyond the timestamp range is refused or accepted, not an internal error',
	 $$SELECT count(*) FROM apikey.rotate((SELECT key_id FROM apikey.issue('acme')), '178000000 years')$$,
	 '^(22023: |22008: |ok: 1$)')
  ) AS e(n, label, q, expect)
 ORDER BY n;

-- Clean up.
DROP FUNCTION regress_hardening_try(text);
DROP FUNCTION regress_hardening_counts();
