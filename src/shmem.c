/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  Set up apikey's shared memory and keep its live statistics.
 *
 * Shared memory exists only when apikey is in shared_preload_libraries.
 * Without it apikey_shared stays NULL and every module falls back: usage
 * is appended to apikey.usage_pending in the caller's transaction, and a
 * key with a rate limit is refused with rate_limit_unavailable (a limit
 * that cannot be enforced never allows), and a change to a key empties
 * every backend's key cache instead of evicting just that key
 * (invalidation.c keeps its ring here).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

#include "shmem.h"

ApikeyShared *apikey_shared = NULL;

static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static shmem_request_hook_type prev_shmem_request_hook = NULL;

static void
shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(ApikeyShared)) +
						   apikey_usage_shmem_size() +
						   apikey_ratelimit_shmem_size() +
						   apikey_inval_shmem_size());
	RequestNamedLWLockTranche("apikey", 2);
	apikey_inval_shmem_request();
}

static void
shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	apikey_shared = ShmemInitStruct("apikey", sizeof(ApikeyShared), &found);
	if (!found)
	{
		LWLockPadded *locks = GetNamedLWLockTranche("apikey");
		int			i;

		apikey_shared->usage_lock = &locks[0].lock;
		apikey_shared->rate_lock = &locks[1].lock;
		for (i = 0; i < APIKEY_NUM_CODES; i++)
			pg_atomic_init_u64(&apikey_shared->calls[i], 0);
		pg_atomic_init_u64(&apikey_shared->usage_dropped, 0);
		pg_atomic_init_u64(&apikey_shared->flushes, 0);
		pg_atomic_init_u64(&apikey_shared->flush_errors, 0);
		pg_atomic_init_u64(&apikey_shared->flushed_calls, 0);
		pg_atomic_init_u64(&apikey_shared->last_flush, 0);
		apikey_shared->usage_failure_entries = 0;
		apikey_shared->usage_swept_at[0] = 0;
		apikey_shared->usage_swept_at[1] = 0;
		SpinLockInit(&apikey_shared->writer_mutex);
		apikey_shared->writer_pid = 0;
		apikey_shared->writer_latch = NULL;
		apikey_shared->flush_requested = 0;
		apikey_shared->flush_served = 0;
		apikey_shared->flush_ok = true;
		apikey_shared->flush_rows = 0;
		ConditionVariableInit(&apikey_shared->flush_cv);
	}
	apikey_usage_shmem_startup();
	apikey_ratelimit_shmem_startup();
	apikey_inval_shmem_startup();
	LWLockRelease(AddinShmemInitLock);
}

/* Install the hooks; only called while shared_preload_libraries loads. */
void
apikey_shmem_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = shmem_startup;
}

/* Count one verification outcome (no-op without shared memory). */
void
apikey_stats_count(ApikeyCode code)
{
	if (apikey_shared)
		pg_atomic_fetch_add_u64(&apikey_shared->calls[code], 1);
}

/* Record the outcome of one flush by the usage writer. */
void
apikey_stats_flushed(uint64 calls, bool ok)
{
	if (!apikey_shared)
		return;
	if (ok)
	{
		pg_atomic_fetch_add_u64(&apikey_shared->flushes, 1);
		pg_atomic_fetch_add_u64(&apikey_shared->flushed_calls, calls);
		pg_atomic_write_u64(&apikey_shared->last_flush,
							(uint64) GetCurrentTimestamp());
	}
	else
		pg_atomic_fetch_add_u64(&apikey_shared->flush_errors, 1);
}
