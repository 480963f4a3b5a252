--
-- security_key_lifetime: check() and authenticate() keep using the key they
-- looked up even when the key cache is emptied before they finish.
--
-- The synchronous usage write (this database is not in apikey.databases) runs
-- SQL after the lookup; its command-counter increment processes this
-- transaction's pending invalidations, and the relcache callback empties
-- the cache.  Before the fix the caller then read the freed entry: on an
-- assert-enabled server, which overwrites freed memory, the backend
-- crashed at once; on a production build it read whatever was left there
-- (with thousands of cached keys, freed blocks can go back to the system).
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');

-- Thousands of cached keys, so that emptying the cache frees whole blocks.
CREATE TEMP TABLE filler AS
SELECT i.key_id, i.token
  FROM generate_series(1, 3000) g,
	   LATERAL apikey.issue(owner => 'filler' || g, scopes => '{orders:read}') i;
SELECT count(*) FILTER (WHERE apikey.verify(token)) AS filler_valid FROM filler;

SELECT key_id AS k, token AS t FROM apikey.issue(owner => 'acme', scopes => '{orders:read,orders:write}') \gset
SELECT apikey.verify(:'t') AS cached;

-- A row trigger that queues an invalidation of every key cache.  The row is
-- skipped (the trigger returns NULL); the invalidation stays queued until
-- the next command-counter increment.
CREATE TABLE poke (x int);
CREATE TRIGGER poke_invalidates BEFORE INSERT ON poke
	FOR EACH ROW EXECUTE FUNCTION apikey._invalidate();

-- The insert in the WITH queues the invalidation (the trigger skips the
-- row); nothing processes it before the next command-counter increment.
-- check() runs after it in the same statement: it finds the key in the
-- cache, then its usage write increments the command counter, which
-- empties the cache.
SELECT hits AS hits_before, invalidations AS inv_before FROM apikey.cache_stats() \gset
WITH p AS (INSERT INTO poke VALUES (1) RETURNING x)
SELECT (v).code, (v).key_id = :k AS same_key, (v).owner, (v).scopes
  FROM (SELECT apikey.check(:'t') AS v FROM (SELECT count(*) FROM p) c OFFSET 0) s;
-- the key came from the cache, and the cache was emptied during the call
SELECT hits = :hits_before + 1 AS was_a_hit, invalidations = :inv_before + 1 AS emptied
  FROM apikey.cache_stats();

-- authenticate() binds what it looked up, after the same reset
SELECT count(*) FILTER (WHERE apikey.verify(token)) AS filler_valid_again FROM filler;
SELECT apikey.verify(:'t') AS cached_again;
SELECT hits AS hits_before, invalidations AS inv_before FROM apikey.cache_stats() \gset
BEGIN;
WITH p AS (INSERT INTO poke VALUES (1) RETURNING x)
SELECT a = :k AS authenticated
  FROM (SELECT apikey.authenticate(:'t') AS a FROM (SELECT count(*) FROM p) c OFFSET 0) s;
SELECT hits = :hits_before + 1 AS was_a_hit, invalidations = :inv_before + 1 AS emptied
  FROM apikey.cache_stats();
SELECT apikey.current_key_id() = :k AS bound, apikey.current_owner(), apikey.has_scope('orders:write');
COMMIT;

-- the same with a key that has a quota (its debit also runs SQL)
SELECT key_id AS kq, token AS tq FROM apikey.issue(owner => 'globex', scopes => '{orders:read}', quota => 10) \gset
SELECT apikey.verify(:'tq') AS cached;
SELECT hits AS hits_before FROM apikey.cache_stats() \gset
WITH p AS (INSERT INTO poke VALUES (1) RETURNING x)
SELECT (v).code, (v).key_id = :kq AS same_key, (v).owner, (v).scopes, (v).remaining
  FROM (SELECT apikey.check(:'tq') AS v FROM (SELECT count(*) FROM p) c OFFSET 0) s;
SELECT hits = :hits_before + 1 AS was_a_hit FROM apikey.cache_stats();

DROP TABLE poke;
