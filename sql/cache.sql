-- The per-backend key cache: hits, bounded LRU eviction, no caching of
-- unknown tokens, eviction of the key a change alters (and nothing else),
-- and no caching of a transaction's own uncommitted keys.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

INSERT INTO apikey.scopes VALUES ('orders:read');
CREATE TABLE tok AS
SELECT n, (apikey.issue(owner => 'tenant' || n, scopes => '{orders:read}')).*
  FROM generate_series(1, 5) n;
-- a well-formed token that matches no key (its issue was rolled back)
BEGIN;
SELECT token AS unknown FROM apikey.issue(owner => 'gone') \gset
ROLLBACK;

-- A fresh backend: nothing cached yet.
\c
SET apikey.cache_size = 3;
SELECT entries, capacity, hits, misses, evictions FROM apikey.cache_stats();

-- First sight of each key reads the tables; the cache keeps the 3 most
-- recently used ones.
SELECT n, apikey.verify(token) FROM tok ORDER BY n;
SELECT entries, hits, misses, evictions FROM apikey.cache_stats();
-- keys 3, 4, 5 are cached: three hits, which leave 5 the least recently used
SELECT apikey.verify(token) FROM tok WHERE n IN (5, 4, 3) ORDER BY n DESC;
SELECT entries, hits, misses, evictions FROM apikey.cache_stats();
-- key 1 was evicted: a miss, which evicts the least recently used key, 5
SELECT apikey.verify(token) FROM tok WHERE n = 1;
SELECT entries, hits, misses, evictions FROM apikey.cache_stats();
-- 4 is a hit and 5 a miss: LRU, not insertion order (which would have
-- evicted 3 and hit both)
SELECT apikey.verify(token) FROM tok WHERE n = 4;
SELECT apikey.verify(token) FROM tok WHERE n = 5;
SELECT entries, hits, misses, evictions FROM apikey.cache_stats();

-- Unknown tokens are never cached: spraying them evicts nothing.
SELECT count(*) FILTER (WHERE apikey.verify(:'unknown')) AS valid
  FROM generate_series(1, 50);
SELECT entries, hits, misses, evictions FROM apikey.cache_stats();
-- ... and malformed ones never even reach the cache
SELECT apikey.verify('ak_nope');
SELECT entries, hits, misses FROM apikey.cache_stats();

-- A change to a key evicts that key from every backend's cache, and
-- nothing else; the next verification reads the new state.  Keys 1, 4
-- and 5 are cached.
SELECT misses AS m0 FROM apikey.cache_stats() \gset
SELECT apikey.revoke(key_id) FROM tok WHERE n = 5;
SELECT entries, invalidations FROM apikey.cache_stats();
SELECT code FROM apikey.check((SELECT token FROM tok WHERE n = 5));
DELETE FROM apikey.key_scopes WHERE key_id = (SELECT key_id FROM tok WHERE n = 4);
SELECT code FROM apikey.check((SELECT token FROM tok WHERE n = 4), 'orders:read');
UPDATE apikey.keys SET expires_at = now() - interval '1 second'
 WHERE id = (SELECT key_id FROM tok WHERE n = 1);
SELECT code FROM apikey.check((SELECT token FROM tok WHERE n = 1));
-- each change evicted its key only: three reloads, nothing emptied
SELECT entries, misses - :m0 AS reloads, invalidations FROM apikey.cache_stats();
-- and the reloaded verdicts are hits now
SELECT hits AS h0 FROM apikey.cache_stats() \gset
SELECT code FROM apikey.check((SELECT token FROM tok WHERE n = 5));
SELECT entries, hits - :h0 AS hits, misses - :m0 AS reloads FROM apikey.cache_stats();

-- Issuing a key evicts nothing: no cache can hold a key that did not exist.
SELECT apikey.issue(owner => 'newcomer') IS NOT NULL AS issued;
SELECT entries, misses - :m0 AS reloads, invalidations FROM apikey.cache_stats();
-- A key issued in a transaction verifies in it, from the tables (the
-- transaction's own changes are never cached), and is gone after ROLLBACK.
BEGIN;
SELECT token AS rolled_back FROM apikey.issue(owner => 'rolled back', scopes => '{orders:read}') \gset
SELECT code FROM apikey.check(:'rolled_back', 'orders:read');
SELECT code FROM apikey.check(:'rolled_back', 'orders:read');
ROLLBACK;
SELECT code FROM apikey.check(:'rolled_back', 'orders:read');
-- so is a revocation rolled back
BEGIN;
SELECT apikey.revoke(key_id) FROM tok WHERE n = 3;
SELECT code FROM apikey.check((SELECT token FROM tok WHERE n = 3));
ROLLBACK;
SELECT code FROM apikey.check((SELECT token FROM tok WHERE n = 3));

-- A prepared transaction names no keys (COMMIT PREPARED runs elsewhere):
-- its commit empties every cache.
SELECT code FROM apikey.check((SELECT token FROM tok WHERE n = 3));
SELECT invalidations AS inv FROM apikey.cache_stats() \gset
BEGIN;
SET LOCAL apikey.events_notify = off;   -- a NOTIFY cannot be prepared
SELECT apikey.revoke(key_id) FROM tok WHERE n = 3;
PREPARE TRANSACTION 'regress_cache_revoke';
SELECT code FROM apikey.check((SELECT token FROM tok WHERE n = 3));
COMMIT PREPARED 'regress_cache_revoke';
SELECT code FROM apikey.check((SELECT token FROM tok WHERE n = 3));
SELECT invalidations - :inv AS emptied FROM apikey.cache_stats();

-- TRUNCATE empties every cache (statement-level trigger)
SELECT apikey.verify(token) FROM tok WHERE n = 2;
SELECT invalidations AS inv FROM apikey.cache_stats() \gset
TRUNCATE apikey.revocations;
SELECT entries, invalidations - :inv AS emptied FROM apikey.cache_stats();
SELECT code FROM apikey.check((SELECT token FROM tok WHERE n = 5));
-- bumping last_used_at (the usage writer's job) does not empty the cache
SELECT entries > 0 AS warm_before, invalidations AS inv FROM apikey.cache_stats() \gset
UPDATE apikey.keys SET last_used_at = now();
SELECT entries > 0 AS still_warm, invalidations = :inv AS no_invalidation FROM apikey.cache_stats();

-- cache_size = 0 disables the cache: every call reads the tables
SET apikey.cache_size = 0;
SELECT misses AS m0 FROM apikey.cache_stats() \gset
SELECT apikey.verify(token) FROM tok WHERE n = 2;
SELECT apikey.verify(token) FROM tok WHERE n = 2;
SELECT misses - :m0 AS table_reads FROM apikey.cache_stats();
RESET apikey.cache_size;

-- Only superusers may change the cache size.
CREATE ROLE regress_cache_user;
SET ROLE regress_cache_user;
SET apikey.cache_size = 1;
SELECT apikey.cache_stats();
RESET ROLE;
DROP ROLE regress_cache_user;
DROP TABLE tok;
