/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  Set up apikey's shared memory; nothing else.
 *
 * Each module owns its shared state and states its locking rule next to
 * it: stats.c (verification counters), usage.c (usage table), ratelimit.c
 * (rate-limit buckets), flushers.c (the usage writers and flush requests),
 * invalidation.c (the ring of changed keys), failurelimit.c (failure
 * buckets per client network), throttle.c (temporary rate limits),
 * networks.c (the networks keys succeed from), canary.c (canary uses
 * waiting for the detector), netwatch.c (failures per client network),
 * legacy.c (the slow legacy hash budget and its counters).
 * This file asks for their space and the LWLocks they use, and calls each
 * one's start-up under AddinShmemInitLock.
 *
 * Shared memory exists only when apikey is in shared_preload_libraries.
 * Without it every module falls back: no live statistics, usage is
 * appended to apikey.usage_pending in the caller's transaction, a key with
 * a rate limit is refused with rate_limit_unavailable (a limit that cannot
 * be enforced never allows), a change to a key empties every backend's
 * key cache instead of evicting just that key, the failure limiter is off,
 * apikey.throttle() refuses, no networks are recorded for key_networks and
 * a canary's use goes to the server log only.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"

#include "apikey.h"

/* apikey's LWLock tranche (wait event "apikey"): one lock per table */
#define LOCK_USAGE		0
#define LOCK_RATE		1
#define LOCK_INVAL		2
#define LOCK_FAILURE	3
#define LOCK_THROTTLE	4
#define LOCK_NETWORKS	5
#define LOCK_CANARY		6
#define LOCK_NETWATCH	7
#define LOCK_USAGE_GATHER	8
#define NUM_LOCKS		9

static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static shmem_request_hook_type prev_shmem_request_hook = NULL;

static void
shmem_request(void)
{
	Size		size = 0;

	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	size = add_size(size, apikey_stats_shmem_size());
	size = add_size(size, apikey_usage_shmem_size());
	size = add_size(size, apikey_ratelimit_shmem_size());
	size = add_size(size, apikey_failurelimit_shmem_size());
	size = add_size(size, apikey_throttle_shmem_size());
	size = add_size(size, apikey_networks_shmem_size());
	size = add_size(size, apikey_canary_shmem_size());
	size = add_size(size, apikey_netwatch_shmem_size());
	size = add_size(size, apikey_flushers_shmem_size());
	size = add_size(size, apikey_inval_shmem_size());
	size = add_size(size, apikey_legacy_shmem_size());
	RequestAddinShmemSpace(size);
	RequestNamedLWLockTranche("apikey", NUM_LOCKS);
}

static void
shmem_startup(void)
{
	LWLockPadded *locks;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	locks = GetNamedLWLockTranche("apikey");
	apikey_stats_shmem_startup();
	apikey_usage_shmem_startup(&locks[LOCK_USAGE].lock,
							   &locks[LOCK_USAGE_GATHER].lock);
	apikey_ratelimit_shmem_startup(&locks[LOCK_RATE].lock);
	apikey_failurelimit_shmem_startup(&locks[LOCK_FAILURE].lock);
	apikey_throttle_shmem_startup(&locks[LOCK_THROTTLE].lock);
	apikey_networks_shmem_startup(&locks[LOCK_NETWORKS].lock);
	apikey_canary_shmem_startup(&locks[LOCK_CANARY].lock);
	apikey_netwatch_shmem_startup(&locks[LOCK_NETWATCH].lock);
	apikey_flushers_shmem_startup();
	apikey_inval_shmem_startup(&locks[LOCK_INVAL].lock);
	apikey_legacy_shmem_startup();
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
