/*-------------------------------------------------------------------------
 *
 * ratelimit.c
 *	  Per-key rate limits, enforced exactly across all backends in shared
 *	  memory.
 *
 * Algorithm: GCRA, the generic cell rate algorithm (a token bucket stored
 * as one number).  A key with rate_limit N per rate_window W has emission
 * interval T = W / N and burst tolerance tau = (N - 1) * T.  Its state is
 * the theoretical arrival time TAT.  A request at time t is allowed when
 * TAT - t <= tau, and then TAT = max(TAT, t) + T; otherwise it is refused
 * with retry_after = TAT - t - tau.
 *
 * Burst behaviour: an idle key may make N requests at once; after that it
 * gets one request every W / N.  Over any period of length P it is allowed
 * at most N + P / T requests, so never more than 2N in any window W.
 *
 * The take is atomic: the entry's spinlock covers read-test-update, so
 * concurrent backends never both take the last token.  When the key's limit
 * or window changes (set_limits), its bucket starts full again.  State is per
 * server, keyed by (database, key id); it is not persisted, so a restart
 * gives every key a full bucket.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "miscadmin.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/hsearch.h"

#include "shmem.h"

/*
 * The token hash is part of the key, so a key id reused after DROP/CREATE
 * EXTENSION (or a restarted sequence) never inherits another key's bucket.
 */
typedef struct RateKey
{
	Oid			dboid;
	int64		key_id;
	uint8		hash_prefix[8];
} RateKey;

typedef struct RateEntry
{
	RateKey		key;
	slock_t		mutex;
	double		tat;			/* theoretical arrival time, microseconds */
	int32		rate_limit;		/* the limit tat was computed for */
	int64		rate_window;
} RateEntry;

static HTAB *rate_htab = NULL;

Size
apikey_ratelimit_shmem_size(void)
{
	return hash_estimate_size(apikey_rate_limit_max_keys, sizeof(RateEntry));
}

/* Called from shmem_startup with AddinShmemInitLock held. */
void
apikey_ratelimit_shmem_startup(void)
{
	HASHCTL		info;

	info.keysize = sizeof(RateKey);
	info.entrysize = sizeof(RateEntry);
	rate_htab = ShmemInitHash("apikey rate limits",
							  apikey_rate_limit_max_keys,
							  apikey_rate_limit_max_keys,
							  &info, HASH_ELEM | HASH_BLOBS);
}

/* Remove entries whose bucket is full again: they hold no state. */
static void
evict_idle(double now)
{
	HASH_SEQ_STATUS status;
	RateEntry  *entry;

	hash_seq_init(&status, rate_htab);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->tat <= now)
			hash_search(rate_htab, &entry->key, HASH_REMOVE, NULL);
	}
}

/*
 * Take one request from key's bucket at time now.  Returns APIKEY_VALID
 * (with *remaining requests left in the burst), APIKEY_RATE_LIMITED (with
 * *retry_after) or APIKEY_RATE_LIMIT_UNAVAILABLE when shared memory is
 * missing or the table is full of active keys: fail closed.
 */
ApikeyCode
apikey_ratelimit_take(const ApikeyKey *key, TimestampTz now,
					  int64 *retry_after, int64 *remaining)
{
	RateKey		rk;
	RateEntry  *entry;
	double		t = (double) now;
	double		T = (double) key->rate_window / key->rate_limit;
	double		tau = T * (key->rate_limit - 1);
	double		tat;
	bool		allowed;

	if (apikey_shared == NULL || rate_htab == NULL)
		return APIKEY_RATE_LIMIT_UNAVAILABLE;

	memset(&rk, 0, sizeof(rk));
	rk.dboid = MyDatabaseId;
	rk.key_id = key->key_id;
	memcpy(rk.hash_prefix, key->hash, sizeof(rk.hash_prefix));

	LWLockAcquire(apikey_shared->rate_lock, LW_SHARED);
	entry = hash_search(rate_htab, &rk, HASH_FIND, NULL);
	if (entry == NULL)
	{
		bool		found;

		LWLockRelease(apikey_shared->rate_lock);
		LWLockAcquire(apikey_shared->rate_lock, LW_EXCLUSIVE);
		if (hash_get_num_entries(rate_htab) >= apikey_rate_limit_max_keys)
			evict_idle(t);
		if (hash_get_num_entries(rate_htab) >= apikey_rate_limit_max_keys &&
			hash_search(rate_htab, &rk, HASH_FIND, NULL) == NULL)
		{
			LWLockRelease(apikey_shared->rate_lock);
			return APIKEY_RATE_LIMIT_UNAVAILABLE;
		}
		entry = hash_search(rate_htab, &rk, HASH_ENTER, &found);
		if (!found)
		{
			SpinLockInit(&entry->mutex);
			entry->tat = 0;
			entry->rate_limit = key->rate_limit;
			entry->rate_window = key->rate_window;
		}
	}

	SpinLockAcquire(&entry->mutex);
	if (entry->rate_limit != key->rate_limit || entry->rate_window != key->rate_window)
	{
		entry->tat = 0;
		entry->rate_limit = key->rate_limit;
		entry->rate_window = key->rate_window;
	}
	tat = Max(entry->tat, t);
	allowed = (tat - t <= tau);
	if (allowed)
		entry->tat = tat + T;
	SpinLockRelease(&entry->mutex);
	LWLockRelease(apikey_shared->rate_lock);

	if (!allowed)
	{
		*retry_after = (int64) ceil(tat - t - tau);
		return APIKEY_RATE_LIMITED;
	}
	/* requests still allowed right now after this one */
	*remaining = (int64) floor((tau - (tat + T - t)) / T) + 1;
	if (*remaining < 0)
		*remaining = 0;
	return APIKEY_VALID;
}
