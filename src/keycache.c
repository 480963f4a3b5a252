/*-------------------------------------------------------------------------
 *
 * keycache.c
 *	  Per-backend cache of keys, keyed by token hash, with LRU eviction.
 *
 * A hit costs one hash probe: no SPI, no planner, no table access.  The
 * cache holds at most apikey.cache_size keys; the least recently used one is
 * evicted to make room.  A token that matches no key is never cached, so
 * spraying random tokens cannot push real keys out.
 *
 * Invalidation.  Statement-level triggers on keys, key_scopes, scopes and
 * revocations call apikey._invalidate(), which queues a relcache
 * invalidation of apikey.keys.  It is sent when the changing transaction
 * commits; every backend processes it at its next transaction start (or
 * next command in its own transaction) and our relcache callback empties
 * the cache.  InvalidOid means "all relations" (sinval overflow) and also
 * empties it.  Invalidations are WAL-logged with the commit, so the same
 * holds on a hot standby.  A revocation therefore takes effect in every
 * transaction that starts after the revoking transaction's COMMIT returns.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/memutils.h"

#include "apikey.h"
#include "compat.h"

static HTAB *keycache = NULL;
static MemoryContext keycache_context = NULL;	/* the hash table */
static MemoryContext keycache_chunks = NULL;	/* entries' variable parts */
static dlist_head keycache_lru = DLIST_STATIC_INIT(keycache_lru);
static Oid	keycache_relid = InvalidOid;	/* apikey.keys the entries came from */
static bool keycache_callback_registered = false;

/* this backend's counters, for apikey.cache_stats() */
static ApikeyCacheStats keycache_stats;

/* Constant-time match of two token hashes (the HTAB's key comparison). */
static int
keycache_match(const void *key1, const void *key2, Size keysize)
{
	return timingsafe_bcmp(key1, key2, keysize) != 0;
}

/* The SHA-256 is uniformly distributed: its first bytes are a fine hash. */
static uint32
keycache_hash(const void *key, Size keysize)
{
	uint32		h;

	memcpy(&h, key, sizeof(h));
	return h;
}

/*
 * Empty the cache.  This runs from the relcache callback, possibly in the
 * middle of a miss while its record is being loaded, so it frees only the
 * chunks of entries already in the cache, never keycache_chunks wholesale.
 */
static void
keycache_reset(void)
{
	dlist_mutable_iter iter;

	dlist_foreach_modify(iter, &keycache_lru)
	{
		ApikeyKey  *entry = dlist_container(ApikeyKey, lru, iter.cur);

		pfree(entry->chunk);
	}
	if (keycache_context != NULL)
		MemoryContextReset(keycache_context);
	keycache = NULL;
	dlist_init(&keycache_lru);
	keycache_relid = InvalidOid;
}

static void
keycache_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == keycache_relid)
	{
		if (keycache != NULL)
			keycache_stats.invalidations++;
		keycache_reset();
	}
}

/* Register the invalidation callback; called from _PG_init. */
void
apikey_keycache_init(void)
{
	if (!keycache_callback_registered)
	{
		CacheRegisterRelcacheCallback(keycache_relcache_callback, (Datum) 0);
		keycache_callback_registered = true;
	}
}

static void
keycache_create(void)
{
	HASHCTL		ctl;

	if (keycache_context == NULL)
	{
		keycache_context = AllocSetContextCreate(CacheMemoryContext,
												 "apikey key cache",
												 ALLOCSET_DEFAULT_SIZES);
		keycache_chunks = AllocSetContextCreate(CacheMemoryContext,
												"apikey key cache entries",
												ALLOCSET_DEFAULT_SIZES);
	}
	ctl.keysize = APIKEY_HASH_LEN;
	ctl.entrysize = sizeof(ApikeyKey);
	ctl.hash = keycache_hash;
	ctl.match = keycache_match;
	ctl.hcxt = keycache_context;
	keycache = hash_create("apikey key cache", Min(apikey_cache_size, 1024) + 1,
						   &ctl, HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
	dlist_init(&keycache_lru);
}

/*
 * The key whose token hashes to hash, or NULL if there is none.  The result
 * stays valid until the next call or the next invalidation; callers copy
 * what they keep.
 */
const ApikeyKey *
apikey_keycache_lookup(const uint8 *hash)
{
	ApikeyKey  *entry;
	ApikeyKey	loaded;
	bool		found;

	if (apikey_cache_size > 0)
	{
		if (keycache == NULL)
			keycache_create();
		entry = hash_search(keycache, hash, HASH_FIND, NULL);
		if (entry != NULL)
		{
			keycache_stats.hits++;
			dlist_move_head(&keycache_lru, &entry->lru);
			return entry;
		}
	}
	keycache_stats.misses++;

	/* Miss: read the tables.  The chunk is allocated where it will live. */
	if (apikey_cache_size <= 0)
	{
		ApikeyKey  *tmp = palloc(sizeof(ApikeyKey));

		return apikey_keystore_load(hash, tmp, CurrentMemoryContext) ? tmp : NULL;
	}

	if (keycache_relid == InvalidOid)
		keycache_relid = apikey_keystore_keys_relid(false);

	found = apikey_keystore_load(hash, &loaded, keycache_chunks);
	if (!found)
		return NULL;

	/* an invalidation may have arrived while we read: start afresh */
	if (keycache == NULL)
	{
		keycache_create();
		keycache_relid = apikey_keystore_keys_relid(false);
	}

	while (hash_get_num_entries(keycache) >= apikey_cache_size)
	{
		ApikeyKey  *victim = dlist_container(ApikeyKey, lru,
											 dlist_tail_node(&keycache_lru));

		dlist_delete(&victim->lru);
		pfree(victim->chunk);
		hash_search(keycache, victim->hash, HASH_REMOVE, NULL);
		keycache_stats.evictions++;
	}

	entry = hash_search(keycache, hash, HASH_ENTER, &found);
	Assert(!found);
	memcpy(entry, &loaded, sizeof(ApikeyKey));
	dlist_push_head(&keycache_lru, &entry->lru);
	return entry;
}

/* Queue an invalidation of every backend's key cache (trigger body). */
void
apikey_keycache_invalidate_all(void)
{
	Oid			relid = apikey_keystore_keys_relid(true);

	if (OidIsValid(relid))
		CacheInvalidateRelcacheByRelid(relid);
}

/*
 * A copy of key in CurrentMemoryContext, independent of the cache.  Used
 * before anything that may accept invalidation messages (and so empty the
 * cache) while the caller still needs the key.
 */
ApikeyKey *
apikey_key_copy(const ApikeyKey *key)
{
	ApikeyKey  *copy = palloc(sizeof(ApikeyKey));
	char	   *base = (char *) key->chunk;
	char	   *nbase = palloc(key->chunk_size);
	int			i;

#define REBASE(ptr) ((void *) (nbase + ((char *) (ptr) - base)))
	memcpy(copy, key, sizeof(ApikeyKey));
	memcpy(nbase, base, key->chunk_size);
	copy->chunk = nbase;
	copy->owner = REBASE(key->owner);
	copy->scopes = REBASE(key->scopes);
	copy->cidrs = REBASE(key->cidrs);
	for (i = 0; i < key->nscopes; i++)
		copy->scopes[i] = REBASE(key->scopes[i]);
	for (i = 0; i < key->ncidrs; i++)
		copy->cidrs[i] = REBASE(key->cidrs[i]);
#undef REBASE
	return copy;
}

/* This backend's cache counters and current size. */
void
apikey_keycache_stats(ApikeyCacheStats *stats)
{
	*stats = keycache_stats;
	stats->entries = keycache ? hash_get_num_entries(keycache) : 0;
}
