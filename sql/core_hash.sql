-- apikey.hash() is plain SHA-256 (pgcrypto's digest() is the oracle), the
-- stored hash is the hash of the whole token, and the plaintext token is
-- stored nowhere.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

-- Known answers for SHA-256.
SELECT apikey.hash('') = '\xe3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'::bytea AS empty_kat,
       apikey.hash('abc') = '\xba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'::bytea AS abc_kat;

-- Against pgcrypto for several strings, including empty, non-ASCII and long ones.
SELECT s.label, apikey.hash(s.v) = digest(s.v, 'sha256') AS same, octet_length(apikey.hash(s.v)) AS bytes
  FROM (VALUES ('empty', ''),
               ('space', ' '),
               ('ascii', 'ak_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLM'),
               ('utf8', 'ak_ü€𝄞'),
               ('newline', E'a\nb'),
               ('one_kb', repeat('x', 1024)),
               ('one_mb', repeat('ab', 500000)),
               ('ten_mb_toasted', repeat(md5('x'), 327680))) AS s(label, v)
 ORDER BY s.label;

-- The same from a toasted, compressed column value.
CREATE TEMP TABLE big (v text);
INSERT INTO big VALUES (repeat('apikey', 200000));
SELECT apikey.hash(v) = digest(v, 'sha256') AS toasted_same FROM big;

-- STRICT: NULL in, NULL out.
SELECT apikey.hash(NULL) IS NULL AS null_hash;

-- Issued keys store exactly apikey.hash(token).
SELECT key_id AS k1, token AS t1 FROM apikey.issue(owner => 'acme') \gset
SELECT key_id AS k2, token AS t2 FROM apikey.issue(owner => 'acme', prefix => 'ak_live', name => 'live') \gset
SELECT k.id = :k1 AS k1, k.hash = apikey.hash(:'t1') AS hash_ok, k.hash = digest(:'t1', 'sha256') AS digest_ok
  FROM apikey.keys k WHERE k.id = :k1;
SELECT k.id = :k2 AS k2, k.hash = apikey.hash(:'t2') AS hash_ok, k.hash = digest(:'t2', 'sha256') AS digest_ok
  FROM apikey.keys k WHERE k.id = :k2;
-- The hash covers the prefix: the secret alone does not hash to it.
SELECT k.hash <> apikey.hash(substr(:'t2', 9)) AS not_body_only
  FROM apikey.keys k WHERE k.id = :k2;

-- Use, revoke and rotate keys so that every table has rows to search.
INSERT INTO apikey.scopes (name, description) VALUES ('orders:read', 'Read orders');
SELECT key_id AS k3, token AS t3 FROM apikey.issue(owner => 'acme', scopes => '{orders:read}',
       metadata => '{"team": "ops"}', quota => 10) \gset
SELECT apikey.verify(:'t1'), apikey.verify(:'t2', 'orders:read'), apikey.verify(:'t3', 'orders:read');
SELECT apikey.revoke(:k2, 'test');
SELECT apikey.revoke_token(:'t3', 'leaked');
SELECT r_id AS k4, r_token AS t4 FROM apikey.rotate(:k1) AS r(r_id, r_token) \gset

-- Neither a token nor its secret part appears in any column of any apikey
-- table (every row is searched as text).  The owner and hint are found, to
-- show that the search itself works.
CREATE TEMP TABLE needles (label text, needle text);
INSERT INTO needles VALUES
	('t1 token', :'t1'), ('t1 secret', substr(:'t1', 4, 43)), ('t1 body', substr(:'t1', 4)),
	('t2 token', :'t2'), ('t2 secret', substr(:'t2', 9, 43)),
	('t3 token', :'t3'), ('t3 secret', substr(:'t3', 4, 43)),
	('t4 token', :'t4'), ('t4 secret', substr(:'t4', 4, 43)),
	('control: owner', 'acme'), ('control: hint', 'ak_...' || right(:'t1', 4)),
	('control: reason', 'leaked');
CREATE TEMP TABLE hits (relname name, label text, n bigint);
DO $$
DECLARE
	r record;
	nd record;
	n bigint;
BEGIN
	FOR r IN SELECT c.relname FROM pg_class c
			  WHERE c.relnamespace = 'apikey'::regnamespace AND c.relkind = 'r'
			  ORDER BY c.relname LOOP
		FOR nd IN SELECT * FROM needles LOOP
			EXECUTE format('SELECT count(*) FROM apikey.%I t WHERE strpos(t::text, $1) > 0', r.relname)
				INTO n USING nd.needle;
			INSERT INTO hits VALUES (r.relname, nd.label, n);
		END LOOP;
	END LOOP;
END
$$;
-- Tables searched:
SELECT DISTINCT relname FROM hits ORDER BY 1;
-- Hits per needle over all tables:
SELECT label, sum(n) AS rows_containing FROM hits GROUP BY label ORDER BY label;
-- Text and jsonb columns one by one as well (row text could escape characters).
DO $$
DECLARE
	r record;
	nd record;
	n bigint;
	total bigint := 0;
	cols int := 0;
BEGIN
	FOR r IN SELECT a.attrelid::regclass AS rel, a.attname
			   FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
			  WHERE c.relnamespace = 'apikey'::regnamespace AND c.relkind = 'r'
				AND a.attnum > 0 AND NOT a.attisdropped
				AND a.atttypid IN ('text'::regtype, 'jsonb'::regtype, 'name'::regtype, 'text[]'::regtype)
			  ORDER BY 1, 2 LOOP
		cols := cols + 1;
		FOR nd IN SELECT * FROM needles WHERE label NOT LIKE 'control%' LOOP
			EXECUTE format('SELECT count(*) FROM %s WHERE strpos(%I::text, $1) > 0', r.rel, r.attname)
				INTO n USING nd.needle;
			total := total + n;
		END LOOP;
	END LOOP;
	RAISE NOTICE 'at least 10 text/jsonb/name columns searched: %, values containing a token or secret: %', cols >= 10, total;
END
$$;
