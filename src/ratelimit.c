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
 * server, keyed by (database, budget key id); it is not persisted, so a
 * restart gives every key a full bucket.  A key in a rotation's grace period
 * takes from the new key's bucket (ApikeyKey.budget_id).
 *
 * The GCRA step itself is apikey_gcra_take() (apikey.h), shared with the
 * failure limiter (failurelimit.c).  apikey_ratelimit_list() reads the
 * buckets without taking anything (the rate_limit_state view).
 *
 * Owners' buckets (ownerlimits.c) live in the same table, under key id -1
 * (key ids are positive) and the first bytes of SHA-256 of the owner and its
 * row's created_at (keystore.c): a bucket for an owner never meets a key's.  A request taken from a key's bucket
 * and then refused by its owner's is given back (refund_bucket: TAT - T).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "miscadmin.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/guc.h"
#include "storage/spin.h"
#include "utils/hsearch.h"
#include "utils/timestamp.h"

#include "apikey.h"

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

/*
 * The shared rate-limit table.  Locking: rate_lock protects its
 * membership: shared to find an entry, exclusive to insert or remove one
 * (an exclusive lock alone suffices to read an entry's state).  An entry's
 * bucket state is read and updated under its spinlock, with rate_lock held
 * at least shared, which makes take-a-token atomic across backends.
 */
static LWLock *rate_lock = NULL;
static HTAB *rate_htab = NULL;

/* GUC: apikey.rate_limit_max_keys */
static int	rate_limit_max_keys = 10000;

/* The setting that sizes shared memory; only defined when preloading. */
void
apikey_ratelimit_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		return;

	DefineCustomIntVariable("apikey.rate_limit_max_keys",
							"Maximum number of rate-limited keys tracked at once in shared memory.",
							"When full of active keys, further rate-limited keys fail with rate_limit_unavailable.",
							&rate_limit_max_keys,
							10000, 100, INT_MAX / 2,
							PGC_POSTMASTER, 0,
							NULL, NULL, NULL);
}

Size
apikey_ratelimit_shmem_size(void)
{
	return hash_estimate_size(rate_limit_max_keys, sizeof(RateEntry));
}

/* Called from shmem_startup with AddinShmemInitLock held. */
void
apikey_ratelimit_shmem_startup(LWLock *lock)
{
	HASHCTL		info;

	rate_lock = lock;

	info.keysize = sizeof(RateKey);
	info.entrysize = sizeof(RateEntry);
	rate_htab = ShmemInitHash("apikey rate limits",
							  rate_limit_max_keys,
							  rate_limit_max_keys,
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

static void
rate_key_init(RateKey *rk, int64 key_id, const uint8 *hash_prefix)
{
	memset(rk, 0, sizeof(*rk));
	rk->dboid = MyDatabaseId;
	rk->key_id = key_id;
	memcpy(rk->hash_prefix, hash_prefix, sizeof(rk->hash_prefix));
}

/*
 * Give key to_id the bucket state of key from_id (rotation: the new key
 * starts where the old one stands, so rotating never refills a bucket).
 * Nothing to do when from_id has no bucket, or without shared memory.  The
 * old bucket is left as it is: if the rotating transaction rolls back, the
 * old key has lost nothing.
 */
void
apikey_ratelimit_copy(int64 from_id, const uint8 *from_hash, int64 to_id,
					  const uint8 *to_hash)
{
	RateKey		from;
	RateKey		to;
	RateEntry  *src;
	RateEntry  *dst;
	bool		found;

	if (rate_lock == NULL || rate_htab == NULL)
		return;
	rate_key_init(&from, from_id, from_hash);
	rate_key_init(&to, to_id, to_hash);

	LWLockAcquire(rate_lock, LW_EXCLUSIVE);
	src = hash_search(rate_htab, &from, HASH_FIND, NULL);
	if (src != NULL &&
		(hash_get_num_entries(rate_htab) < rate_limit_max_keys ||
		 hash_search(rate_htab, &to, HASH_FIND, NULL) != NULL))
	{
		dst = hash_search(rate_htab, &to, HASH_ENTER, &found);
		if (!found)
			SpinLockInit(&dst->mutex);
		SpinLockAcquire(&src->mutex);
		dst->tat = src->tat;
		dst->rate_limit = src->rate_limit;
		dst->rate_window = src->rate_window;
		SpinLockRelease(&src->mutex);
	}
	LWLockRelease(rate_lock);
}

/*
 * Take one request at time now from the bucket (id, hash_prefix), which
 * allows rate_limit requests per rate_window.  Returns APIKEY_VALID (with
 * *remaining requests left in the burst), APIKEY_RATE_LIMITED (with
 * *retry_after) or APIKEY_RATE_LIMIT_UNAVAILABLE when shared memory is
 * missing or the table is full of active buckets: fail closed.
 */
ApikeyCode
apikey_ratelimit_take_bucket(int64 id, const uint8 *hash_prefix,
							 int32 rate_limit, int64 rate_window,
							 TimestampTz now, int64 *retry_after,
							 int64 *remaining)
{
	RateKey		rk;
	RateEntry  *entry;
	double		t = (double) now;
	double		T = (double) rate_window / rate_limit;
	double		tau = T * (rate_limit - 1);
	double		tat;
	bool		allowed;

	if (rate_lock == NULL || rate_htab == NULL)
		return APIKEY_RATE_LIMIT_UNAVAILABLE;

	rate_key_init(&rk, id, hash_prefix);

	LWLockAcquire(rate_lock, LW_SHARED);
	entry = hash_search(rate_htab, &rk, HASH_FIND, NULL);
	if (entry == NULL)
	{
		bool		found;

		LWLockRelease(rate_lock);
		LWLockAcquire(rate_lock, LW_EXCLUSIVE);
		if (hash_get_num_entries(rate_htab) >= rate_limit_max_keys)
			evict_idle(t);
		if (hash_get_num_entries(rate_htab) >= rate_limit_max_keys &&
			hash_search(rate_htab, &rk, HASH_FIND, NULL) == NULL)
		{
			LWLockRelease(rate_lock);
			return APIKEY_RATE_LIMIT_UNAVAILABLE;
		}
		entry = hash_search(rate_htab, &rk, HASH_ENTER, &found);
		if (!found)
		{
			SpinLockInit(&entry->mutex);
			entry->tat = 0;
			entry->rate_limit = rate_limit;
			entry->rate_window = rate_window;
		}
	}

	SpinLockAcquire(&entry->mutex);
	if (entry->rate_limit != rate_limit || entry->rate_window != rate_window)
	{
		entry->tat = 0;
		entry->rate_limit = rate_limit;
		entry->rate_window = rate_window;
	}
	allowed = apikey_gcra_take(&entry->tat, t, T, tau, &tat);
	SpinLockRelease(&entry->mutex);
	LWLockRelease(rate_lock);

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

/* One bucket as apikey_ratelimit_list() reports it. */
typedef struct RateSnap
{
	RateKey		key;
	double		tat;
	int32		rate_limit;
	int64		rate_window;
} RateSnap;

/*
 * This database's buckets, for the rate_limit_state view: key id, hash
 * prefix, limit, window, requests allowed right now, and the wait before
 * the next one when none is (NULL otherwise).  Nothing is taken.  The
 * entries are copied under the locks first, so building rows never holds
 * them.  Without shared memory: no rows.
 */
void
apikey_ratelimit_list(Tuplestorestate *tupstore, TupleDesc tupdesc)
{
	HASH_SEQ_STATUS status;
	RateEntry  *entry;
	RateSnap   *snaps;
	int			n = 0;
	int			cap;
	double		t = (double) GetCurrentTimestamp();
	int			i;

	if (rate_lock == NULL || rate_htab == NULL)
		return;
	LWLockAcquire(rate_lock, LW_SHARED);
	cap = Max(hash_get_num_entries(rate_htab), 1);
	snaps = palloc(sizeof(RateSnap) * cap);
	hash_seq_init(&status, rate_htab);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->key.dboid != MyDatabaseId || n >= cap)
			continue;
		snaps[n].key = entry->key;
		SpinLockAcquire(&entry->mutex);
		snaps[n].tat = entry->tat;
		snaps[n].rate_limit = entry->rate_limit;
		snaps[n].rate_window = entry->rate_window;
		SpinLockRelease(&entry->mutex);
		n++;
	}
	LWLockRelease(rate_lock);

	for (i = 0; i < n; i++)
	{
		Datum		values[6];
		bool		nulls[6] = {false, false, false, false, false, false};
		double		T = (double) snaps[i].rate_window / snaps[i].rate_limit;
		double		tau = T * (snaps[i].rate_limit - 1);
		double		x = Max(snaps[i].tat, t);
		bytea	   *prefix = palloc(VARHDRSZ + sizeof(snaps[i].key.hash_prefix));
		int64		available;

		SET_VARSIZE(prefix, VARHDRSZ + sizeof(snaps[i].key.hash_prefix));
		memcpy(VARDATA(prefix), snaps[i].key.hash_prefix, sizeof(snaps[i].key.hash_prefix));
		/* what apikey_ratelimit_take() would allow, taken one by one */
		if (x - t > tau)
		{
			available = 0;
			values[5] = apikey_interval_datum((int64) ceil(x - t - tau));
		}
		else
		{
			available = (int64) floor((tau - (x - t)) / T) + 1;
			available = Min(Max(available, 0), snaps[i].rate_limit);
			nulls[5] = true;
		}
		values[0] = Int64GetDatum(snaps[i].key.key_id);
		values[1] = PointerGetDatum(prefix);
		values[2] = Int32GetDatum(snaps[i].rate_limit);
		values[3] = apikey_interval_datum(snaps[i].rate_window);
		values[4] = Int64GetDatum(available);
		tuplestore_putvalues(tupstore, tupdesc, values, nulls);
	}
}

/* Take one request from key's bucket (its budget key's) at time now. */
ApikeyCode
apikey_ratelimit_take(const ApikeyKey *key, TimestampTz now,
					  int64 *retry_after, int64 *remaining)
{
	return apikey_ratelimit_take_bucket(key->budget_id, key->budget_hash_prefix,
										key->rate_limit, key->rate_window,
										now, retry_after, remaining);
}

/*
 * Give back the request just taken from the bucket (id, hash_prefix): a
 * request that a later limit refused must cost nothing (ownerlimits.c).
 * Nothing to give back when the bucket is gone or its limits changed
 * since (it then started full again).
 */
void
apikey_ratelimit_refund_bucket(int64 id, const uint8 *hash_prefix,
							   int32 rate_limit, int64 rate_window)
{
	RateKey		rk;
	RateEntry  *entry;

	if (rate_lock == NULL || rate_htab == NULL)
		return;
	rate_key_init(&rk, id, hash_prefix);
	LWLockAcquire(rate_lock, LW_SHARED);
	entry = hash_search(rate_htab, &rk, HASH_FIND, NULL);
	if (entry != NULL)
	{
		SpinLockAcquire(&entry->mutex);
		if (entry->rate_limit == rate_limit && entry->rate_window == rate_window)
			entry->tat -= (double) rate_window / rate_limit;
		SpinLockRelease(&entry->mutex);
	}
	LWLockRelease(rate_lock);
}
