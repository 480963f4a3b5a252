-- Privilege hardening: search_path hijacks run no attacker code, an
-- unprivileged role can read, write and call nothing beyond the public
-- verification functions, and every SECURITY DEFINER function pins its
-- search_path.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

CREATE ROLE regress_hardening_priv_attacker;
CREATE ROLE regress_hardening_priv_admin;
GRANT EXECUTE ON FUNCTION
	apikey.issue(text, text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[]),
	apikey.revoke(bigint, text), apikey.revoke_token(text, text), apikey.rotate(bigint, interval),
	apikey.set_limits(bigint, integer, interval, bigint, interval, cidr[]),
	apikey.revoke_owner(text, text)
	TO regress_hardening_priv_admin;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');

-- Runs a statement as the calling role and reports SQLSTATE and message.
-- Its own search_path is pinned so the attacker's operators below cannot
-- run inside it.
CREATE FUNCTION regress_hardening_try(q text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
	EXECUTE q;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE OPERATOR(pg_catalog.||) ': ' OPERATOR(pg_catalog.||) SQLERRM;
END
$$;

-------------------------------------------------------------------------------
-- Every SECURITY DEFINER function in schema apikey pins search_path.
-------------------------------------------------------------------------------
SELECT p.oid::regprocedure AS security_definer_function, p.proconfig
  FROM pg_proc p
 WHERE p.pronamespace = 'apikey'::regnamespace AND p.prosecdef
 ORDER BY p.oid::regprocedure::text COLLATE "C";
-- Violations: no search_path entry, or one that searches a schema other
-- than pg_catalog before pg_temp (zero rows).
SELECT p.oid::regprocedure AS violating_function
  FROM pg_proc p
 WHERE p.pronamespace = 'apikey'::regnamespace AND p.prosecdef
   AND NOT EXISTS (SELECT FROM unnest(p.proconfig) AS c
                    WHERE c IN ('search_path=pg_catalog, pg_temp', 'search_path=pg_catalog'));
-- Every plpgsql or SQL function pins it too, SECURITY DEFINER or not.
SELECT p.oid::regprocedure AS unpinned_function
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE p.pronamespace = 'apikey'::regnamespace AND l.lanname IN ('plpgsql', 'sql')
   AND NOT EXISTS (SELECT FROM unnest(p.proconfig) AS c WHERE c LIKE 'search_path=%');

-------------------------------------------------------------------------------
-- search_path hijack.  The attacker puts look-alikes of every function and
-- operator the extension's SQL uses in a schema searched before pg_catalog.
-- Each records that it ran (row in hits, and a NOTICE) and then behaves
-- like the real one, so nothing else changes if it is called.
-------------------------------------------------------------------------------
CREATE SCHEMA regress_hardening_attacker AUTHORIZATION regress_hardening_priv_attacker;
SET ROLE regress_hardening_priv_attacker;
CREATE TABLE regress_hardening_attacker.hits (fn text, ran_as name);
GRANT INSERT, SELECT ON regress_hardening_attacker.hits TO PUBLIC;
GRANT USAGE ON SCHEMA regress_hardening_attacker TO PUBLIC;

CREATE FUNCTION regress_hardening_attacker.hit(fn text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO regress_hardening_attacker.hits VALUES (fn, current_user);
	RAISE NOTICE 'attacker function % ran as %', fn, current_user;
END
$$;

-- Functions: name, argument types, return type, and the real call.
DO $$
DECLARE
	f record;
	n int := 0;
BEGIN
	FOR f IN SELECT * FROM (VALUES
		('now', '', 'timestamptz', 'pg_catalog.now()'),
		('btrim', 'a text', 'text', 'pg_catalog.btrim(a)'),
		('starts_with', 'a text, b text', 'boolean', 'pg_catalog.starts_with(a, b)'),
		('left', 'a text, b integer', 'text', 'pg_catalog.left(a, b)'),
		('jsonb_typeof', 'a jsonb', 'text', 'pg_catalog.jsonb_typeof(a)'),
		('array_position', 'a cidr[], b cidr', 'integer', 'pg_catalog.array_position(a, b)'),
		('array_position', 'a text[], b text', 'integer', 'pg_catalog.array_position(a, b)'),
		('octet_length', 'a bytea', 'integer', 'pg_catalog.octet_length(a)'),
		('unnest', 'a text[]', 'SETOF text', 'pg_catalog.unnest(a)'),
		('unnest', 'a bigint[]', 'SETOF bigint', 'pg_catalog.unnest(a)'),
		('unnest', 'a timestamptz[]', 'SETOF timestamptz', 'pg_catalog.unnest(a)'),
		('unnest', 'a inet[]', 'SETOF inet', 'pg_catalog.unnest(a)'),
		('inet_client_addr', '', 'inet', 'pg_catalog.inet_client_addr()'),
		('network_subeq', 'a inet, b inet', 'boolean', 'pg_catalog.network_subeq(a, b)'),
		('sha256', 'a bytea', 'bytea', 'pg_catalog.sha256(a)'),
		('convert_to', 'a text, b name', 'bytea', 'pg_catalog.convert_to(a, b)'),
		('get_bit', 'a bytea, b bigint', 'integer', 'pg_catalog.get_bit(a, b)'),
		('format', 'a text, b text', 'text', 'pg_catalog.format(a, b)'),
		('lower', 'a text', 'text', 'pg_catalog.lower(a)'),
		('length', 'a text', 'integer', 'pg_catalog.length(a)'),
		('cardinality', 'a text[]', 'integer', 'pg_catalog.cardinality(a)')
	) AS v(name, args, rettype, body) LOOP
		n := n + 1;
		EXECUTE format($f$CREATE FUNCTION regress_hardening_attacker.%I(%s) RETURNS %s
			LANGUAGE plpgsql AS $b$ BEGIN PERFORM regress_hardening_attacker.hit(%L); RETURN %s %s; END $b$ $f$,
			f.name, f.args, f.rettype, f.name || '(' || f.args || ')',
			CASE WHEN f.rettype LIKE 'SETOF%' THEN 'QUERY SELECT' ELSE '' END, f.body);
	END LOOP;
	RAISE NOTICE '% attacker functions created', n;
END
$$;

-- Operators: symbol, left and right types, the real operator's result.
DO $$
DECLARE
	o record;
	n int := 0;
BEGIN
	FOR o IN SELECT * FROM (VALUES
		('=', 'bytea', 'bytea', 'boolean'),
		('=', 'bigint', 'bigint', 'boolean'),
		('=', 'text', 'text', 'boolean'),
		('=', 'name', 'name', 'boolean'),
		('=', 'oid', 'oid', 'boolean'),
		('=', 'integer', 'integer', 'boolean'),
		('=', 'bigint', 'integer', 'boolean'),
		('<>', 'text', 'text', 'boolean'),
		('~', 'text', 'text', 'boolean'),
		('~~', 'text', 'text', 'boolean'),
		('||', 'text[]', 'text', 'text[]'),
		('||', 'text', 'text', 'text'),
		('<', 'timestamptz', 'timestamptz', 'boolean'),
		('<=', 'timestamptz', 'timestamptz', 'boolean'),
		('>', 'timestamptz', 'timestamptz', 'boolean'),
		('+', 'timestamptz', 'interval', 'timestamptz'),
		('-', 'timestamptz', 'timestamptz', 'interval'),
		('<', 'interval', 'interval', 'boolean'),
		('<=', 'interval', 'interval', 'boolean'),
		('>', 'interval', 'interval', 'boolean'),
		('>', 'integer', 'integer', 'boolean'),
		('<=', 'integer', 'integer', 'boolean'),
		('<', 'bigint', 'bigint', 'boolean'),
		('<', 'bigint', 'integer', 'boolean'),
		('>', 'bigint', 'integer', 'boolean'),
		('>=', 'bigint', 'integer', 'boolean'),
		('>=', 'bigint', 'bigint', 'boolean'),
		('+', 'bigint', 'integer', 'bigint'),
		('+', 'bigint', 'bigint', 'bigint'),
		('-', 'bigint', 'integer', 'bigint'),
		('<<=', 'inet', 'inet', 'boolean'),
		('@>', 'text[]', 'text[]', 'boolean')
	) AS v(op, lt, rt, rettype) LOOP
		n := n + 1;
		EXECUTE format($f$CREATE FUNCTION regress_hardening_attacker.op_%s(a %s, b %s) RETURNS %s
			LANGUAGE plpgsql AS $b$ BEGIN PERFORM regress_hardening_attacker.hit(%L);
			RETURN a OPERATOR(pg_catalog.%s) b; END $b$ $f$,
			n, o.lt, o.rt, o.rettype, o.op || '(' || o.lt || ', ' || o.rt || ')', o.op);
		EXECUTE format('CREATE OPERATOR regress_hardening_attacker.%s (LEFTARG = %s, RIGHTARG = %s, FUNCTION = regress_hardening_attacker.op_%s)',
			o.op, o.lt, o.rt, n);
	END LOOP;
	RAISE NOTICE '% attacker operators created', n;
END
$$;

-- Control: an unqualified call does reach the look-alikes, so a hijack
-- inside the extension would be seen.  (From here on, this file's own
-- statements under the hijacked path qualify every operator and function.)
SET search_path = regress_hardening_attacker, pg_catalog;
SELECT now() IS NOT NULL AS control_now, 'a'::text = 'a'::text AS control_eq,
       octet_length('\x00'::bytea) AS control_octet_length;
RESET search_path;
SELECT fn, ran_as FROM regress_hardening_attacker.hits ORDER BY fn COLLATE "C";
TRUNCATE regress_hardening_attacker.hits;
RESET ROLE;

-- Keys to probe with, issued with a clean search_path.
RESET search_path;
SELECT key_id AS k_plain, token AS t_plain FROM apikey.issue('acme', '{orders:read}') \gset
SELECT key_id AS k_quota, token AS t_quota FROM apikey.issue('acme', '{orders:*}', quota => 5,
	quota_refill => '1 hour') \gset
SELECT key_id AS k_cidr, token AS t_cidr FROM apikey.issue('acme', '{*}',
	allowed_cidrs => '{10.0.0.0/8, 127.0.0.0/8, ::1/128}') \gset
SELECT key_id AS k_rate, token AS t_rate FROM apikey.issue('acme', rate_limit => 100) \gset
SELECT key_id AS k_exp, token AS t_exp FROM apikey.issue('acme', expires_at => now() + interval '1 day') \gset
SELECT key_id AS k_rev, token AS t_rev FROM apikey.issue('acme') \gset
SELECT apikey.revoke(:k_rev);
SELECT token AS t_unknown FROM apikey._new_token('ak') \gset

-- The public functions, called by the attacker with the hijacked path.  The
-- attacker is not a member of apikey_proxy, so the client_addr it claims is
-- ignored and its connection's address (loopback, allowed for t_cidr)
-- decides; security_trusted_proxy.sql tests that rule on its own.
SET ROLE regress_hardening_priv_attacker;
SET search_path = regress_hardening_attacker, pg_catalog;
SELECT apikey.verify(:'t_plain') AS plain, apikey.verify(:'t_plain', 'orders:read') AS plain_scope,
       apikey.verify(:'t_plain', 'orders:write') AS plain_wrong_scope,
       apikey.verify(:'t_quota', 'orders:write') AS quota,
       apikey.verify(:'t_cidr', 'x', '10.1.2.3') AS cidr_in,
       apikey.verify(:'t_cidr', 'x', '192.0.2.1') AS cidr_out,
       apikey.verify(:'t_cidr') AS cidr_connection,
       apikey.verify(:'t_exp') AS expiring,
       apikey.verify(:'t_rev') AS revoked,
       apikey.verify(:'t_unknown') AS unknown,
       apikey.verify('ak_garbage') AS malformed;
SELECT (c).valid, (c).code, (c).key_id OPERATOR(pg_catalog.=) :k_quota AS key_ok, (c).owner, (c).scopes, (c).remaining
  FROM apikey.check(:'t_quota', 'orders:read', '192.0.2.1') AS c;
SELECT (apikey.check(:'t_rate')).code AS rate, (apikey.check(:'t_rev')).code AS revoked,
       (apikey.check(:'t_unknown')).code AS unknown;
BEGIN;
SELECT apikey.authenticate(:'t_quota', 'orders:read') OPERATOR(pg_catalog.=) :k_quota AS authenticated;
SELECT apikey.current_key_id() OPERATOR(pg_catalog.=) :k_quota AS bound, apikey.current_owner(),
       apikey.has_scope('orders:read') AS has_read, apikey.has_scope('billing:read') AS has_billing;
SELECT apikey.require_scope('orders:read');
SELECT apikey.logout();
COMMIT;
SELECT apikey.authenticate(:'t_rev');
SELECT apikey.authenticate(:'t_plain', 'orders:write');
SELECT apikey.authenticate(:'t_unknown');
SELECT apikey.authenticate(:'t_cidr', NULL, '192.0.2.1');
SELECT apikey.authenticate(:'t_plain', NULL, NULL, true) OPERATOR(pg_catalog.=) :k_plain AS session_bound;
SELECT apikey.logout();
SELECT pg_catalog.octet_length(apikey.hash(:'t_plain')) AS hash_length;
RESET search_path;
RESET ROLE;

-- The admin functions, called by a role granted EXECUTE, hijacked path.
SET ROLE regress_hardening_priv_admin;
SET search_path = regress_hardening_attacker, pg_catalog;
SELECT key_id AS k_new, token AS t_new FROM apikey.issue(' acme ', '{orders:read, orders:*}', 'n',
	pg_catalog.now() OPERATOR(pg_catalog.+) interval '2 days', 'ak_live', '{"a": 1}', 10, '1 second', 3, '1 day',
	'{10.0.0.0/8}') \gset
SELECT apikey.set_limits(:k_new, 20, '2 seconds', 4, '2 days', '{192.0.2.0/24}');
SELECT apikey.set_limits(:k_new);
SELECT key_id AS k_rot, token AS t_rot FROM apikey.rotate(:k_new, '1 hour') \gset
SELECT apikey.revoke(:k_new, 'probe') AS revoked_now, apikey.revoke(:k_new) AS revoked_again;
SELECT apikey.revoke_token(:'t_rot', 'probe') AS revoked_by_token;
SELECT count(*) AS doomed_issued FROM apikey.issue('doomed') a, apikey.issue('doomed') b;
SELECT apikey.revoke_owner('doomed', 'probe') AS doomed_revoked;
-- Errors raised inside them run no attacker code either.
SELECT apikey.issue('');
SELECT apikey.issue('acme', '{nope}');
SELECT apikey.issue('acme', '{nope:*}');
SELECT apikey.issue('acme', metadata => '[1]');
SELECT apikey.issue('acme', allowed_cidrs => '{NULL}');
SELECT apikey.issue('acme', rate_limit => 0);
SELECT apikey.rotate(:k_new);
SELECT apikey.revoke_token('ak_garbage');
SELECT apikey.revoke_owner('');
RESET search_path;
RESET ROLE;

-- Nothing the attacker planted ran, in any of the calls above.
SELECT count(*) AS attacker_hits FROM regress_hardening_attacker.hits;
-- And the calls did their work.
SELECT (SELECT count(*) FROM apikey.keys WHERE id IN (:k_new, :k_rot)) AS admin_keys,
       (SELECT count(*) FROM apikey.revocations WHERE key_id IN (:k_new, :k_rot)) AS admin_revocations,
       (SELECT owner FROM apikey.keys WHERE id = :k_new) AS owner_kept,
       (SELECT created_by FROM apikey.keys WHERE id = :k_new) AS created_by,
       (SELECT count(*) FROM apikey.usage_pending) > 0 AS usage_written,
       (SELECT remaining FROM apikey.quotas WHERE key_id = :k_quota) AS quota_left;

-------------------------------------------------------------------------------
-- What an unprivileged role may touch.
-------------------------------------------------------------------------------
-- Functions it may execute: exactly the public verification functions.
SELECT p.oid::regprocedure AS function,
       has_function_privilege('regress_hardening_priv_attacker', p.oid, 'EXECUTE') AS attacker_may_execute
  FROM pg_proc p
 WHERE p.pronamespace = 'apikey'::regnamespace
 ORDER BY p.oid::regprocedure::text COLLATE "C";

-- Every other function, called by the attacker, fails with 42501 (the
-- planner support function, whose internal argument SQL cannot produce, is
-- refused before privileges are checked; how, depends on the minor release).
SET ROLE regress_hardening_priv_attacker;
SELECT p.oid::regprocedure AS function,
       regexp_replace(regress_hardening_try(format('SELECT %s(%s)', p.oid::regproc,
           (SELECT string_agg('NULL::' || format_type(t, NULL), ', ' ORDER BY i)
              FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(t, i)))),
           '^(42846|0A000): .*internal$', 'refused: SQL cannot pass a planner argument') AS result
  FROM pg_proc p
 WHERE p.pronamespace = 'apikey'::regnamespace
   AND NOT has_function_privilege(p.oid, 'EXECUTE')
 ORDER BY p.oid::regprocedure::text COLLATE "C";
RESET ROLE;

-- No privilege on any table, view or sequence.
SELECT c.oid::regclass AS relation, c.relkind,
       has_table_privilege('regress_hardening_priv_attacker', c.oid, 'SELECT') AS sel,
       has_table_privilege('regress_hardening_priv_attacker', c.oid, 'INSERT') AS ins,
       has_table_privilege('regress_hardening_priv_attacker', c.oid, 'UPDATE') AS upd,
       has_table_privilege('regress_hardening_priv_attacker', c.oid, 'DELETE') AS del,
       has_table_privilege('regress_hardening_priv_attacker', c.oid, 'TRUNCATE') AS trunc,
       has_table_privilege('regress_hardening_priv_attacker', c.oid, 'REFERENCES') AS refs,
       has_table_privilege('regress_hardening_priv_attacker', c.oid, 'TRIGGER') AS trig,
       has_any_column_privilege('regress_hardening_priv_attacker', c.oid, 'SELECT') AS any_column
  FROM pg_class c
 WHERE c.relnamespace = 'apikey'::regnamespace AND c.relkind IN ('r', 'v', 'S', 'm', 'p', 'f')
 ORDER BY c.relname COLLATE "C";

-- Trying each statement on each table and view: 42501 every time.
SET ROLE regress_hardening_priv_attacker;
SELECT c.oid::regclass AS relation, s.stmt,
       regress_hardening_try(replace(replace(s.sql, '%t', c.oid::regclass::text), '%c',
           (SELECT quote_ident(a.attname) FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum = 1))) AS result
  FROM pg_class c
 CROSS JOIN (VALUES (1, 'SELECT', 'SELECT * FROM %t'),
                    (2, 'INSERT', 'INSERT INTO %t DEFAULT VALUES'),
                    (3, 'UPDATE', 'UPDATE %t SET %c = %c'),
                    (4, 'DELETE', 'DELETE FROM %t'),
                    (5, 'TRUNCATE', 'TRUNCATE %t')) AS s(n, stmt, sql)
 WHERE c.relnamespace = 'apikey'::regnamespace AND c.relkind IN ('r', 'p')
    OR (c.relnamespace = 'apikey'::regnamespace AND c.relkind = 'v' AND s.n = 1)
 ORDER BY c.relname COLLATE "C", s.n;
SELECT regress_hardening_try('SELECT hash FROM apikey.keys') AS select_hash,
       regress_hardening_try('SELECT count(*) FROM apikey.keys') AS count_keys,
       regress_hardening_try($$SELECT nextval('apikey.keys_id_seq')$$) AS nextval,
       regress_hardening_try($$SELECT setval('apikey.keys_id_seq', 1)$$) AS setval,
       regress_hardening_try('SELECT * FROM apikey.keys_id_seq') AS read_sequence;
RESET ROLE;

-- The admin role may call what it was granted, and read no table either.
SET ROLE regress_hardening_priv_admin;
SELECT regress_hardening_try('SELECT hash FROM apikey.keys') AS select_hash,
       regress_hardening_try('SELECT * FROM apikey.usage_log') AS select_usage,
       regress_hardening_try('DELETE FROM apikey.revocations') AS delete_revocations,
       regress_hardening_try('SELECT apikey.flush_usage()') AS flush_usage,
       regress_hardening_try($$SELECT apikey._new_token('ak')$$) AS new_token;
RESET ROLE;

-- Control: one grant and the same probe succeeds, so the probe can fail.
GRANT SELECT ON apikey.revocations TO regress_hardening_priv_attacker;
SET ROLE regress_hardening_priv_attacker;
SELECT regress_hardening_try('SELECT * FROM apikey.revocations') AS after_grant;
RESET ROLE;
REVOKE SELECT ON apikey.revocations FROM regress_hardening_priv_attacker;

-- Clean up.
SET client_min_messages = warning;
DROP SCHEMA regress_hardening_attacker CASCADE;
RESET client_min_messages;
DROP FUNCTION regress_hardening_try(text);
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA apikey FROM regress_hardening_priv_admin;
DROP ROLE regress_hardening_priv_attacker;
DROP ROLE regress_hardening_priv_admin;
