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
 * Invalidation.  Every verification accepts pending invalidation messages
 * before it looks (verify.c), and the cache then catches up with what they
 * announced (keycache_sync):
 *	 - a relcache invalidation of apikey.keys (TRUNCATE, a change to
 *	   apikey.scopes, a transaction that changed too many keys to name,
 *	   DDL, anything not attributed to keys) empties the cache;
 *	 - one of apikey._cache_signal says that committed transactions named
 *	   the keys they changed in shared memory (invalidation.c): those keys,
 *	   and the keys whose budget they are, are evicted, and nothing else.
 *	   Issuing a key sends nothing at all.
 * keystore.c counts each kind in a generation number.  So a change takes
 * effect for every verification that starts after the changing COMMIT
 * returns, in every backend; on hot standbys, where the invalidations
 * replay from WAL without the key ids, either kind empties the cache.
 * A backend's own transaction reads keys from the tables, not the cache,
 * from its first change of a key table to its end.
 *
 * A record read by a cache miss is cached only if no invalidation of
 * either kind arrived between the catch-up that preceded it and the end of
 * its read (keystore.c locks every relation before it takes the snapshot);
 * otherwise it serves this one verification and is not kept.
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

struct KeyCacheEntry;

/* A cached key's membership in the list of the entries that use a key id. */
typedef struct KeyIdLink
{
	dlist_node	node;			/* in KeyIdEntry.entries */
	struct KeyCacheEntry *entry;
} KeyIdLink;

/* One cached key: the hash table's entry. */
typedef struct KeyCacheEntry
{
	uint8		hash[APIKEY_HASH_LEN];	/* hash table key */
	dlist_node	lru;			/* position in keycache_lru */
	KeyIdLink	by_key;			/* under key.key_id in keycache_ids */
	KeyIdLink	by_budget;		/* under key.budget_id, if another key's */
	ApikeyKey	key;			/* variable parts in keycache_chunks */
} KeyCacheEntry;

/* GUC: apikey.cache_size */
static int	cache_size = 10000;

/*
 * The second index: a key id, and the cached entries that are that key or
 * draw on its budget.  A change to a key evicts them without a scan.  An
 * id whose list is empty may linger (an insert that failed); it is ignored.
 */
typedef struct KeyIdEntry
{
	int64		key_id;			/* hash table key */
	dlist_head	entries;		/* of KeyIdLink */
} KeyIdEntry;

static HTAB *keycache = NULL;
static HTAB *keycache_ids = NULL;	/* KeyIdEntry by key id */
static MemoryContext keycache_context = NULL;	/* the hash table */
static MemoryContext keycache_chunks = NULL;	/* entries' variable parts */
static dlist_head keycache_lru = DLIST_STATIC_INIT(keycache_lru);
static uint64 synced_generation = 0;	/* keystore generations the entries */
static uint64 synced_signal = 0;	/* have caught up with */

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
	for (i = 0; i < src->ncidrs + src->owner_ncidrs; i++)
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
	keycache_ids = NULL;
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
	ctl.keysize = sizeof(int64);
	ctl.entrysize = sizeof(KeyIdEntry);
	ctl.hcxt = keycache_context;
	keycache_ids = hash_create("apikey key cache by key id",
							   Min(cache_size, 1024) + 1,
							   &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	dlist_init(&keycache_lru);
}

/* The second index's entry for key_id, made if missing. */
static KeyIdEntry *
id_entry(int64 key_id)
{
	bool		found;
	KeyIdEntry *ids = hash_search(keycache_ids, &key_id, HASH_ENTER, &found);

	if (!found)
		dlist_init(&ids->entries);
	return ids;
}

/* File entry's link under key_id in the second index. */
static void
id_link(int64 key_id, KeyIdLink *link, KeyCacheEntry *entry)
{
	link->entry = entry;
	dlist_push_head(&id_entry(key_id)->entries, &link->node);
}

/* Take a link out of the second index, and its key id once unused. */
static void
id_unlink(int64 key_id, KeyIdLink *link)
{
	KeyIdEntry *ids;

	dlist_delete(&link->node);
	ids = hash_search(keycache_ids, &key_id, HASH_FIND, NULL);
	if (ids != NULL && dlist_is_empty(&ids->entries))
		hash_search(keycache_ids, &key_id, HASH_REMOVE, NULL);
}

/* Drop one entry. */
static void
keycache_remove(KeyCacheEntry *entry)
{
	dlist_delete(&entry->lru);
	id_unlink(entry->key.key_id, &entry->by_key);
	if (entry->key.budget_id != entry->key.key_id)
		id_unlink(entry->key.budget_id, &entry->by_budget);
	pfree(entry->key.chunk);
	hash_search(keycache, entry->hash, HASH_REMOVE, NULL);
}

/*
 * Evict every key whose id is in ids, and every key that draws on the
 * budget of one (a rotated key in its grace period), through the second
 * index: the cost does not grow with the cache.
 */
static void
keycache_evict_keys(int64 *ids, int nids)
{
	int			i;

	if (keycache == NULL)
		return;
	for (i = 0; i < nids; i++)
	{
		KeyIdEntry *ide;

		/* look it up again each time: the last removal drops the id */
		while ((ide = hash_search(keycache_ids, &ids[i], HASH_FIND, NULL)) != NULL &&
			   !dlist_is_empty(&ide->entries))
			keycache_remove(dlist_container(KeyIdLink, node,
											dlist_head_node(&ide->entries))->entry);
	}
}

/*
 * Catch up with every invalidation this backend has accepted: empty the
 * cache, or evict the keys that committed changes named (file header).
 */
static void
keycache_sync(void)
{
	if (apikey_inval_leaving_recovery())
		synced_generation = 0;	/* messages so far may have been replayed */

	for (;;)
	{
		uint64		gen = apikey_keystore_generation();
		uint64		signal = apikey_keystore_signal_generation();

		if (gen != synced_generation)
		{
			keycache_reset();
			apikey_inval_forget();
		}
		else if (signal != synced_signal)
		{
			if (!apikey_inval_catch_up(keycache_evict_keys))
			{
				keycache_reset();
				apikey_inval_forget();
			}
		}
		else
			break;
		synced_generation = gen;
		synced_signal = signal;
	}
}

/* Keep a copy of key, evicting the least recently used as needed. */
static void
keycache_insert(const ApikeyKey *key)
{
	KeyCacheEntry *entry;
	ApikeyKey	copy;
	bool		found;

	if (keycache == NULL)
		keycache_create();

	while (hash_get_num_entries(keycache) >= cache_size)
	{
		keycache_remove(dlist_container(KeyCacheEntry, lru,
										dlist_tail_node(&keycache_lru)));
		keycache_stats.evictions++;
	}

	/* allocate everything first: an error must leave no half-made entry */
	(void) id_entry(key->key_id);
	(void) id_entry(key->budget_id);
	key_copy(key, &copy, keycache_chunks);
	entry = hash_search(keycache, key->hash, HASH_ENTER, &found);
	Assert(!found);
	entry->key = copy;
	dlist_push_head(&keycache_lru, &entry->lru);
	id_link(entry->key.key_id, &entry->by_key, entry);
	if (entry->key.budget_id != entry->key.key_id)
		id_link(entry->key.budget_id, &entry->by_budget, entry);
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

	/* this transaction changed keys: it reads them, and caches nothing */
	bool		use_cache = cache_size > 0 && !apikey_inval_bypass();

	if (use_cache)
	{
		KeyCacheEntry *entry;

		keycache_sync();
		if (keycache != NULL &&
			(entry = hash_search(keycache, hash, HASH_FIND, NULL)) != NULL)
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

	/*
	 * Cache it only if no invalidation of either kind arrived since the
	 * catch-up above: the load's snapshot then postdates every change whose
	 * eviction the cache has processed (invalidation.c).
	 */
	if (use_cache && gen == synced_generation &&
		apikey_keystore_generation() == synced_generation &&
		apikey_keystore_signal_generation() == synced_signal)
		keycache_insert(out);
	return true;
}

/* This backend's cache counters and current size. */
void
apikey_keycache_stats(ApikeyCacheStats *stats)
{
	if (!apikey_inval_bypass())
		keycache_sync();
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
