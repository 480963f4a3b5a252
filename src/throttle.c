/*-------------------------------------------------------------------------
 *
 * throttle.c
 *	  Temporary rate limits (apikey.throttle): a response that slows a key
 *	  down for a while and ends by itself, kept in shared memory only.
 *
 * A throttle is rate_limit requests per minute for one key until a given
 * time, enforced like a rate limit (GCRA, apikey_gcra_take) on top of the
 * key's own, with a bucket of its own that starts full.  The verdict when
 * it is spent is rate_limited with retry_after.
 *
 * At commit, not before.  apikey.throttle() reserves the entry at once (so
 * a full table is an error in the call, never at commit) and records the
 * throttle in a per-transaction list; a transaction callback makes it
 * active when the transaction commits and forgets it on abort (or when
 * its savepoint is rolled back).  PREPARE TRANSACTION is refused.  Shared
 * memory is per server: a throttle is not replicated to standbys, and a
 * restart ends every throttle.
 *
 * Cost on the valid path: one atomic read.  horizon holds the latest end
 * of any throttle ever made active; once the clock has passed it, no table
 * is searched.
 *
 * Locking: throttle_lock protects the table's membership (shared to find
 * an entry, exclusive to add or remove one, or to make one active); an
 * entry's bucket is taken under its spinlock with throttle_lock held at
 * least shared.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "access/xact.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "apikey.h"

/* Throttled keys tracked at once (operator actions: a few at a time). */
#define THROTTLE_MAX_KEYS	1024

/* The token hash is part of the key, as in ratelimit.c. */
typedef struct ThrottleKey
{
	Oid			dboid;
	int64		key_id;
	uint8		hash_prefix[8];
} ThrottleKey;

typedef struct ThrottleEntry
{
	ThrottleKey key;
	slock_t		mutex;
	double		tat;			/* theoretical arrival time, microseconds */
	int32		rate_limit;		/* per minute, while active */
	TimestampTz until;			/* active while now < until; 0 = not yet */
	TimestampTz reserved_until; /* kept (not evicted) until then */
} ThrottleEntry;

/* A throttle made in this transaction, applied at commit. */
typedef struct PendingThrottle
{
	ThrottleKey key;
	int32		rate_limit;
	TimestampTz until;
	SubTransactionId subid;		/* made in this subtransaction */
} PendingThrottle;

static LWLock *throttle_lock = NULL;
static HTAB *throttle_htab = NULL;
static pg_atomic_uint64 *horizon = NULL;	/* latest until made active */
static List *pending = NIL;		/* PendingThrottle *, in TopTransactionContext */
static bool callback_registered = false;

Size
apikey_throttle_shmem_size(void)
{
	return add_size(MAXALIGN(sizeof(pg_atomic_uint64)),
					hash_estimate_size(THROTTLE_MAX_KEYS, sizeof(ThrottleEntry)));
}

/* Called from shmem_startup with AddinShmemInitLock held. */
void
apikey_throttle_shmem_startup(LWLock *lock)
{
	HASHCTL		info;
	bool		found;

	throttle_lock = lock;
	horizon = ShmemInitStruct("apikey throttle horizon", sizeof(pg_atomic_uint64), &found);
	if (!found)
		pg_atomic_init_u64(horizon, 0);
	info.keysize = sizeof(ThrottleKey);
	info.entrysize = sizeof(ThrottleEntry);
	throttle_htab = ShmemInitHash("apikey throttles", THROTTLE_MAX_KEYS, THROTTLE_MAX_KEYS,
								  &info, HASH_ELEM | HASH_BLOBS);
}

static void
throttle_key_init(ThrottleKey *tk, int64 key_id, const uint8 *hash)
{
	memset(tk, 0, sizeof(*tk));
	tk->dboid = MyDatabaseId;
	tk->key_id = key_id;
	memcpy(tk->hash_prefix, hash, sizeof(tk->hash_prefix));
}

/* Make this transaction's throttles active (commit) or forget them. */
static void
throttle_xact_callback(XactEvent event, void *arg)
{
	ListCell   *lc;

	if (pending == NIL)
		return;
	if (event == XACT_EVENT_PRE_PREPARE)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot PREPARE a transaction that throttled an API key"),
				 errdetail("A throttle lives in shared memory and cannot wait for COMMIT PREPARED.")));
	if (event == XACT_EVENT_COMMIT)
	{
		LWLockAcquire(throttle_lock, LW_EXCLUSIVE);
		foreach(lc, pending)
		{
			PendingThrottle *p = lfirst(lc);
			ThrottleEntry *entry = hash_search(throttle_htab, &p->key, HASH_FIND, NULL);

			/* reserved by apikey_throttle_set() until p->until: still there */
			if (entry == NULL)
				continue;
			entry->tat = 0;
			entry->rate_limit = p->rate_limit;
			entry->until = p->until;
			if ((uint64) p->until > pg_atomic_read_u64(horizon))
				pg_atomic_write_u64(horizon, (uint64) p->until);
		}
		LWLockRelease(throttle_lock);
	}
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT)
		pending = NIL;			/* its memory goes with the transaction */
}

/*
 * A rolled-back savepoint takes its throttles with it; a released one
 * hands them to its parent.
 */
static void
throttle_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						  SubTransactionId parentSubid, void *arg)
{
	ListCell   *lc;

	foreach(lc, pending)
	{
		PendingThrottle *p = lfirst(lc);

		if (p->subid != mySubid)
			continue;
		if (event == SUBXACT_EVENT_ABORT_SUB)
			pending = foreach_delete_current(pending, lc);
		else if (event == SUBXACT_EVENT_COMMIT_SUB)
			p->subid = parentSubid;
	}
}

/* Drop entries that are neither active nor reserved any more. */
static void
evict_ended(TimestampTz now)
{
	HASH_SEQ_STATUS status;
	ThrottleEntry *entry;

	hash_seq_init(&status, throttle_htab);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->until <= now && entry->reserved_until <= now)
			hash_search(throttle_htab, &entry->key, HASH_REMOVE, NULL);
	}
}

/*
 * Throttle key key_id (token hash hash) to rate_limit requests a minute
 * until until, from this transaction's commit on.  Raises here, never at
 * commit: without shared memory, or with the table full of throttles.
 */
void
apikey_throttle_set(int64 key_id, const uint8 *hash, int32 rate_limit, TimestampTz until)
{
	PendingThrottle *p;
	ThrottleEntry *entry;
	TimestampTz now = GetCurrentTimestamp();
	MemoryContext oldcxt;
	bool		found;

	if (throttle_htab == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("API keys cannot be throttled without shared memory"),
				 errhint("Add apikey to shared_preload_libraries and restart, or suspend the key instead.")));
	if (!callback_registered)
	{
		RegisterXactCallback(throttle_xact_callback, NULL);
		RegisterSubXactCallback(throttle_subxact_callback, NULL);
		callback_registered = true;
	}

	p = MemoryContextAlloc(TopTransactionContext, sizeof(PendingThrottle));
	throttle_key_init(&p->key, key_id, hash);
	p->rate_limit = rate_limit;
	p->until = until;
	p->subid = GetCurrentSubTransactionId();

	LWLockAcquire(throttle_lock, LW_EXCLUSIVE);
	if (hash_search(throttle_htab, &p->key, HASH_FIND, NULL) == NULL &&
		hash_get_num_entries(throttle_htab) >= THROTTLE_MAX_KEYS)
		evict_ended(now);
	entry = hash_search(throttle_htab, &p->key, HASH_ENTER_NULL, &found);
	if (entry == NULL)
	{
		LWLockRelease(throttle_lock);
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("too many API keys are throttled at once (at most %d)", THROTTLE_MAX_KEYS),
				 errhint("Suspend the key instead, or wait for other throttles to end.")));
	}
	if (!found)
	{
		SpinLockInit(&entry->mutex);
		entry->tat = 0;
		entry->rate_limit = 0;
		entry->until = 0;
		entry->reserved_until = 0;
	}
	entry->reserved_until = Max(entry->reserved_until, until);
	LWLockRelease(throttle_lock);

	oldcxt = MemoryContextSwitchTo(TopTransactionContext);
	pending = lappend(pending, p);
	MemoryContextSwitchTo(oldcxt);
}

/*
 * Take one request from key's throttle at now, if it has an active one:
 * APIKEY_RATE_LIMITED with *retry_after when it is spent, else
 * APIKEY_VALID.
 */
ApikeyCode
apikey_throttle_take(const ApikeyKey *key, TimestampTz now, int64 *retry_after)
{
	ThrottleKey tk;
	ThrottleEntry *entry;
	double		t = (double) now;
	double		seen = 0;
	double		tau = 0;
	bool		allowed = true;

	if (horizon == NULL || (uint64) now >= pg_atomic_read_u64(horizon))
		return APIKEY_VALID;

	throttle_key_init(&tk, key->key_id, key->hash);
	LWLockAcquire(throttle_lock, LW_SHARED);
	entry = hash_search(throttle_htab, &tk, HASH_FIND, NULL);
	if (entry != NULL)
	{
		SpinLockAcquire(&entry->mutex);
		if (entry->until > now)
		{
			double		T = (double) USECS_PER_MINUTE / entry->rate_limit;

			tau = T * (entry->rate_limit - 1);
			allowed = apikey_gcra_take(&entry->tat, t, T, tau, &seen);
		}
		SpinLockRelease(&entry->mutex);
	}
	LWLockRelease(throttle_lock);

	if (allowed)
		return APIKEY_VALID;
	*retry_after = (int64) ceil(seen - t - tau);
	return APIKEY_RATE_LIMITED;
}
