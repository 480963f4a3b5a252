/*-------------------------------------------------------------------------
 *
 * keycache.c
 *	  Per-backend cache of keys, keyed by token hash, with LRU eviction.
 *
 * A hit costs one hash probe and a copy: no SPI, no planner, no table
 * access.  The cache holds at most apikey.cache_size keys; the least
 * recently used one is evicted to make room.  A token that matches no key
 * is never cached, so spraying random tokens cannot push real keys out.
 *
 * Lifetime.  The cache never hands out a pointer into itself: a lookup
 * fills the caller's own ApikeyKey, whose variable parts are allocated in
 * the caller's memory context.  Whatever runs after the lookup (a usage
 * write, a quota debit, a catalog lookup) may accept invalidation messages
 * and empty the cache without pulling the key out from under the caller.
 *
 * Invalidation.  Statement-level triggers on keys, key_scopes, scopes,
 * revocations, suspensions and quarantines queue a relcache invalidation
 * of apikey.keys, sent when the changing transaction commits.  keystore.c
 * counts those invalidations in a generation number; a lookup that finds
 * the generation moved empties the cache first.  Every verification
 * accepts pending invalidation messages before it looks (verify.c), so a
 * revocation takes effect for every verification that starts after the
 * revoking COMMIT returns, in every backend, and on hot standbys, where
 * the invalidations replay from WAL.
 *
 * A record read by a cache miss is cached only if no invalidation arrived
 * between the loader's snapshot and the end of its read (keystore.c locks
 * every relation before it takes the snapshot); otherwise it serves this
 * one verification and is not kept.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "lib/ilist.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/memutils.h"

#include "apikey.h"
#include "compat.h"

/* One cached key: the hash table's entry. */
typedef struct KeyCacheEntry
{
	uint8		hash[APIKEY_HASH_LEN];	/* hash table key */
	dlist_node	lru;			/* position in keycache_lru */
	ApikeyKey	key;			/* variable parts in keycache_chunks */
} KeyCacheEntry;

/* GUC: apikey.cache_size */
static int	cache_size = 10000;

static HTAB *keycache = NULL;
static MemoryContext keycache_context = NULL;	/* the hash table */
static MemoryContext keycache_chunks = NULL;	/* entries' variable parts */
static dlist_head keycache_lru = DLIST_STATIC_INIT(keycache_lru);
static uint64 keycache_generation = 0;	/* keystore generation of the entries */

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

/* Copy src into dst, with dst's variable parts allocated in cxt. */
static void
key_copy(const ApikeyKey *src, ApikeyKey *dst, MemoryContext cxt)
{
	char	   *base = (char *) src->chunk;
	char	   *nbase = MemoryContextAlloc(cxt, src->chunk_size);
	int			i;

#define REBASE(ptr) ((void *) (nbase + ((char *) (ptr) - base)))
	memcpy(dst, src, sizeof(ApikeyKey));
	memcpy(nbase, base, src->chunk_size);
	dst->chunk = nbase;
	dst->owner = REBASE(src->owner);
	dst->scopes = REBASE(src->scopes);
	dst->cidrs = REBASE(src->cidrs);
	for (i = 0; i < src->nscopes; i++)
		dst->scopes[i] = REBASE(src->scopes[i]);
	for (i = 0; i < src->ncidrs; i++)
		dst->cidrs[i] = REBASE(src->cidrs[i]);
	dst->allowed_scopes = REBASE(src->allowed_scopes);
	for (i = 0; i < src->nallowed; i++)
		dst->allowed_scopes[i] = REBASE(src->allowed_scopes[i]);
#undef REBASE
}

/* Empty the cache; the next entry starts a new one. */
static void
keycache_reset(void)
{
	if (keycache != NULL && hash_get_num_entries(keycache) > 0)
		keycache_stats.invalidations++;
	if (keycache_context != NULL)
	{
		MemoryContextReset(keycache_context);
		MemoryContextReset(keycache_chunks);
	}
	keycache = NULL;
	dlist_init(&keycache_lru);
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
	ctl.entrysize = sizeof(KeyCacheEntry);
	ctl.hash = keycache_hash;
	ctl.match = keycache_match;
	ctl.hcxt = keycache_context;
	keycache = hash_create("apikey key cache", Min(cache_size, 1024) + 1,
						   &ctl, HASH_ELEM | HASH_FUNCTION | HASH_COMPARE | HASH_CONTEXT);
	dlist_init(&keycache_lru);
}

/* Keep a copy of key, read at keystore generation gen, evicting as needed. */
static void
keycache_insert(const ApikeyKey *key, uint64 gen)
{
	KeyCacheEntry *entry;
	bool		found;

	if (gen != keycache_generation)
	{
		keycache_reset();
		keycache_generation = gen;
	}
	if (keycache == NULL)
		keycache_create();

	while (hash_get_num_entries(keycache) >= cache_size)
	{
		KeyCacheEntry *victim = dlist_container(KeyCacheEntry, lru,
												dlist_tail_node(&keycache_lru));

		dlist_delete(&victim->lru);
		pfree(victim->key.chunk);
		hash_search(keycache, victim->hash, HASH_REMOVE, NULL);
		keycache_stats.evictions++;
	}

	entry = hash_search(keycache, key->hash, HASH_ENTER, &found);
	Assert(!found);
	key_copy(key, &entry->key, keycache_chunks);
	dlist_push_head(&keycache_lru, &entry->lru);
}

/*
 * Find the key whose token hashes to hash.  Returns false if there is none;
 * otherwise fills *out with a copy owned by the caller (variable parts in
 * CurrentMemoryContext).
 */
bool
apikey_keycache_lookup(const uint8 *hash, ApikeyKey *out)
{
	uint64		gen;

	if (cache_size > 0 && keycache != NULL)
	{
		KeyCacheEntry *entry;

		if (keycache_generation != apikey_keystore_generation())
			keycache_reset();
		else if ((entry = hash_search(keycache, hash, HASH_FIND, NULL)) != NULL)
		{
			keycache_stats.hits++;
			dlist_move_head(&keycache_lru, &entry->lru);
			key_copy(&entry->key, out, CurrentMemoryContext);
			return true;
		}
	}
	keycache_stats.misses++;

	if (!apikey_keystore_load(hash, out, CurrentMemoryContext, &gen))
		return false;
	/* cache it only if nothing was invalidated since the load's snapshot */
	if (cache_size > 0 && gen == apikey_keystore_generation())
		keycache_insert(out, gen);
	return true;
}

/* Queue an invalidation of every backend's key cache (trigger body). */
void
apikey_keycache_invalidate_all(void)
{
	Oid			relid = apikey_keystore_keys_relid(true);

	if (OidIsValid(relid))
		CacheInvalidateRelcacheByRelid(relid);
}

/* This backend's cache counters and current size. */
void
apikey_keycache_stats(ApikeyCacheStats *stats)
{
	if (keycache != NULL && keycache_generation != apikey_keystore_generation())
		keycache_reset();
	*stats = keycache_stats;
	stats->entries = keycache ? hash_get_num_entries(keycache) : 0;
	stats->capacity = cache_size;
}

/* Define apikey.cache_size. */
void
apikey_keycache_init(void)
{
	DefineCustomIntVariable("apikey.cache_size",
							"Maximum number of keys each backend keeps in its key cache.",
							"0 disables the cache: every verification reads the tables.",
							&cache_size,
							10000, 0, INT_MAX / 2,
							PGC_SUSET, 0,
							NULL, NULL, NULL);
}
