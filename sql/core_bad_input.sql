-- verify() and check() never raise for bad input: every kind of garbage is
-- the verdict malformed (or unknown for a well-formed stranger), and the
-- caller's transaction carries on.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

INSERT INTO apikey.scopes (name) VALUES ('orders:read');
SELECT key_id AS k1, token AS t1 FROM apikey.issue('acme', '{orders:read}') \gset
BEGIN;
SELECT token AS t_zz FROM apikey.issue('ghost', prefix => 'zz') \gset
ROLLBACK;

CREATE TEMP TABLE inputs (n serial, label text, v text);
INSERT INTO inputs (label, v) VALUES
	('NULL', NULL),
	('empty', ''),
	('one space', ' '),
	('prefix only', 'ak_'),
	('1 MB of a', repeat('a', 1000000)),
	('1 MB of base62 after ak_', 'ak_' || repeat('Ab1', 333333)),
	('token then 1 MB', :'t1' || repeat('a', 1000000)),
	('right shape, zero checksum', 'ak_' || repeat('0', 49)),
	('right shape, all z', 'ak_' || repeat('z', 49)),
	('wrong checksum', left(:'t1', -6) || CASE right(:'t1', 6) WHEN '000000' THEN '000001' ELSE '000000' END),
	('unknown prefix, broken checksum', 'zz' || substr(:'t1', 3)),
	('uppercase prefix', 'AK' || substr(:'t1', 3)),
	('leading space', ' ' || :'t1'),
	('trailing space', :'t1' || ' '),
	('trailing newline', :'t1' || E'\n'),
	('leading tab', E'\t' || :'t1'),
	('CRLF', :'t1' || E'\r\n'),
	('space inside', left(:'t1', 20) || ' ' || substr(:'t1', 22)),
	('dash for separator', 'ak-' || substr(:'t1', 4)),
	('no separator', 'ak' || substr(:'t1', 4)),
	('non-ASCII in body', left(:'t1', 10) || 'ü' || substr(:'t1', 12)),
	('non-ASCII prefix', 'ü' || substr(:'t1', 2)),
	('non-ASCII, right char count', 'ak_' || repeat('ü', 49)),
	('emoji', 'ak_' || repeat('😀', 49)),
	('zero-width space appended', :'t1' || U&'\200B'),
	('fullwidth letters', 'ａｋ_' || substr(:'t1', 4)),
	('control characters', (SELECT string_agg(chr(i), '') FROM generate_series(1, 31) i)),
	('all of Latin-1', (SELECT string_agg(chr(i), '') FROM generate_series(1, 255) i)),
	('token-length control characters', (SELECT string_agg(chr(1 + i % 31), '') FROM generate_series(1, 52) i)),
	('quotes and backslashes', $q$ak_'"\;--$q$ || repeat('\', 44)),
	('SQL injection', $q$' OR '1'='1$q$),
	('percent and underscore', 'ak_' || repeat('%', 49)),
	('url-encoded token', replace(:'t1', '_', '%5F')),
	('base64 of token', encode(convert_to(:'t1', 'UTF8'), 'base64')),
	('Bearer header', 'Bearer ' || :'t1'),
	('token twice', :'t1' || :'t1'),
	('prefix too long', repeat('a', 17) || substr(:'t1', 3)),
	('maximum length garbage', repeat('a', 16) || '_' || repeat('a', 49)),
	('one over maximum length', repeat('a', 17) || '_' || repeat('a', 49)),
	('minimum length garbage', 'a_' || repeat('a', 49)),
	('one under minimum length', 'a_' || repeat('a', 48)),
	('stranger with prefix zz', :'t_zz');

-- All inside one transaction, which must still be usable afterwards.
BEGIN;
CREATE TEMP TABLE marker (x int);
SELECT i.n, i.label, apikey.verify(i.v) AS verify, (apikey.check(i.v)).code AS check,
       apikey.verify(i.v, 'orders:read') AS verify_scope,
       (apikey.check(i.v, 'orders:read', '203.0.113.7')).code AS check_scope_addr
  FROM inputs i ORDER BY i.n;
-- Verdicts of bad input reveal nothing about any key.
SELECT count(*) AS verdicts,
       count(*) FILTER (WHERE (vd).key_id IS NULL AND (vd).owner IS NULL AND (vd).scopes IS NULL
                        AND (vd).expires_at IS NULL AND (vd).remaining IS NULL
                        AND (vd).retry_after IS NULL AND NOT (vd).valid) AS revealing_nothing
  FROM inputs i, LATERAL apikey.check(i.v, 'orders:read') AS vd;
-- Bad scope and address arguments with a good token are no errors either.
SELECT (apikey.check(:'t1', repeat('x', 1000000))).code AS huge_scope,
       (apikey.check(:'t1', '')).code AS empty_scope,
       (apikey.check(:'t1', E'orders:read\n')).code AS scope_newline,
       (apikey.check(:'t1', 'orders:read', NULL)).code AS null_addr,
       (apikey.check(:'t1', 'orders:read', '::1')).code AS v6_addr,
       (apikey.check(:'t1', NULL, '0.0.0.0/0')).code AS network_addr;
-- A following statement in the same transaction works, and it commits.
INSERT INTO marker VALUES (1);
SELECT apikey.verify(:'t1') AS good_token_still_valid;
COMMIT;
SELECT count(*) AS marker_rows FROM marker;

-- Also in separate statements (one statement per call), inside a transaction.
BEGIN;
SELECT apikey.verify(NULL);
SELECT apikey.verify('');
SELECT apikey.verify(repeat('a', 1000000));
SELECT (apikey.check(repeat('a', 1000000))).code;
SELECT (apikey.check(NULL, NULL, NULL)).code;
SELECT apikey.verify(' ' || :'t1' || ' ');
INSERT INTO marker VALUES (2);
SELECT count(*) AS marker_rows FROM marker;
COMMIT;

-- From a toasted, compressed column value (never detoasted when too long).
CREATE TEMP TABLE big (v text);
INSERT INTO big VALUES (repeat('ak_', 400000)), (:'t1' || repeat(' ', 100000));
SELECT (apikey.check(v)).code, apikey.verify(v) FROM big;

-- The good token is unaffected by all of the above.
SELECT (apikey.check(:'t1', 'orders:read')).code AS t1;
