/*-------------------------------------------------------------------------
 *
 * stats.c
 *	  The live counters behind apikey.stats: verifications per verdict code,
 *	  usage counts dropped, the usage writers' flushes, tokens the log
 *	  redactor hid, networks the failure limiter could not track,
 *	  successes key_networks had no room for, and failures the detector's
 *	  failures-by-network table (netwatch.c) had no room for.  Every counter is for the
 *	  whole server; only the heartbeat, which flushers.c keeps, is this
 *	  database's own writer's.
 *
 * Verification counts are kept per backend, so that counting a call
 * writes a cache line no other backend writes: each backend owns one row
 * of StatsShared.backends (indexed by its proc number, padded to a cache
 * line), adds to it and never resets it; a reader sums every row.  A row
 * outlives its backend (the next backend with that number adds on), so
 * nothing is lost when a backend exits.  A process without a row (none in
 * practice) counts in the shared row instead.
 *
 * Locking: none.  Every counter is an atomic that only grows; the rarely
 * written ones (drops, flushes, redactions, untracked and unwatched
 * failures, network overflow) are shared
 * by all backends.
 *
 * Without shared memory (no preload) there are no counters, and
 * apikey_stats_read() says so.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

#include "apikey.h"
#include "compat.h"

/* One backend's verification counts, alone on its cache line(s). */
typedef union BackendCounts
{
	pg_atomic_uint64 calls[APIKEY_NUM_CODES];
	char		pad[TYPEALIGN(PG_CACHE_LINE_SIZE,
							  sizeof(pg_atomic_uint64) * APIKEY_NUM_CODES)];
} BackendCounts;

typedef struct StatsShared
{
	pg_atomic_uint64 usage_dropped; /* counts lost to a full usage table */
	pg_atomic_uint64 failure_untracked; /* networks the failure limiter had
										 * no room for */
	pg_atomic_uint64 flushes;	/* successful flushes */
	pg_atomic_uint64 flush_errors;	/* failed flushes (counts kept) */
	pg_atomic_uint64 flushed_calls; /* calls written to usage_log */
	pg_atomic_uint64 last_flush;	/* TimestampTz of last success, 0 = never */
	pg_atomic_uint64 tokens_redacted;	/* spans hidden from log lines */
	pg_atomic_uint64 network_overflow;	/* successes key_networks missed */
	pg_atomic_uint64 failure_unwatched; /* failures netwatch had no room
										 * for */
	int			nbackends;		/* rows in backends[] after the shared one */
	BackendCounts backends[FLEXIBLE_ARRAY_MEMBER];	/* [0] is shared */
} StatsShared;

static StatsShared *stats = NULL;
static BackendCounts *my_counts = NULL;

Size
apikey_stats_shmem_size(void)
{
	return add_size(offsetof(StatsShared, backends),
					mul_size(MaxBackends + 1, sizeof(BackendCounts)));
}

/* Called from shmem_startup with AddinShmemInitLock held. */
void
apikey_stats_shmem_startup(void)
{
	bool		found;
	int			i;

	stats = ShmemInitStruct("apikey stats", apikey_stats_shmem_size(), &found);
	if (found)
		return;
	pg_atomic_init_u64(&stats->usage_dropped, 0);
	pg_atomic_init_u64(&stats->failure_untracked, 0);
	pg_atomic_init_u64(&stats->flushes, 0);
	pg_atomic_init_u64(&stats->flush_errors, 0);
	pg_atomic_init_u64(&stats->flushed_calls, 0);
	pg_atomic_init_u64(&stats->last_flush, 0);
	pg_atomic_init_u64(&stats->tokens_redacted, 0);
	pg_atomic_init_u64(&stats->network_overflow, 0);
	pg_atomic_init_u64(&stats->failure_unwatched, 0);
	stats->nbackends = MaxBackends;
	for (i = 0; i <= MaxBackends; i++)
	{
		int			c;

		for (c = 0; c < APIKEY_NUM_CODES; c++)
			pg_atomic_init_u64(&stats->backends[i].calls[c], 0);
	}
}

/* This backend's row, found once. */
static BackendCounts *
my_row(void)
{
	int			n = apikey_my_proc_number();

	if (n < 0 || n >= stats->nbackends)
		return &stats->backends[0];
	return &stats->backends[n + 1];
}

/*
 * Count one verification outcome (no-op without shared memory).  Only this
 * backend adds to its row, so the add stays in this core's cache.
 */
void
apikey_stats_count(ApikeyCode code)
{
	if (stats == NULL)
		return;
	if (my_counts == NULL)
		my_counts = my_row();
	pg_atomic_fetch_add_u64(&my_counts->calls[code], 1);
}

/* Count usage counts lost to a full usage table. */
void
apikey_stats_dropped(uint64 calls)
{
	if (stats != NULL)
		pg_atomic_fetch_add_u64(&stats->usage_dropped, calls);
}

/* Count token-shaped spans the log redactor hid (redact.c). */
void
apikey_stats_redacted(uint64 spans)
{
	if (stats != NULL)
		pg_atomic_fetch_add_u64(&stats->tokens_redacted, spans);
}

/* Count a failure claim on a network the failure limiter had no room for. */
void
apikey_stats_failure_untracked(void)
{
	if (stats != NULL)
		pg_atomic_fetch_add_u64(&stats->failure_untracked, 1);
}

/* Count successes not recorded for key_networks: its table was full. */
void
apikey_stats_network_overflow(uint64 calls)
{
	if (stats != NULL)
		pg_atomic_fetch_add_u64(&stats->network_overflow, calls);
}

/* Count a failure netwatch.c had no room to count against its network. */
void
apikey_stats_failure_unwatched(void)
{
	if (stats != NULL)
		pg_atomic_fetch_add_u64(&stats->failure_unwatched, 1);
}

/* Record the outcome of one flush by the usage writer. */
void
apikey_stats_flushed(uint64 calls, bool ok)
{
	if (stats == NULL)
		return;
	if (ok)
	{
		pg_atomic_fetch_add_u64(&stats->flushes, 1);
		pg_atomic_fetch_add_u64(&stats->flushed_calls, calls);
		pg_atomic_write_u64(&stats->last_flush, (uint64) GetCurrentTimestamp());
	}
	else
		pg_atomic_fetch_add_u64(&stats->flush_errors, 1);
}

/* Read every counter; false without shared memory. */
bool
apikey_stats_read(ApikeyStats *out)
{
	int			i;
	int			c;

	if (stats == NULL)
		return false;
	memset(out, 0, sizeof(*out));
	for (i = 0; i <= stats->nbackends; i++)
		for (c = 0; c < APIKEY_NUM_CODES; c++)
			out->calls[c] += pg_atomic_read_u64(&stats->backends[i].calls[c]);
	out->usage_dropped = pg_atomic_read_u64(&stats->usage_dropped);
	out->failure_untracked = pg_atomic_read_u64(&stats->failure_untracked);
	out->flushes = pg_atomic_read_u64(&stats->flushes);
	out->flush_errors = pg_atomic_read_u64(&stats->flush_errors);
	out->flushed_calls = pg_atomic_read_u64(&stats->flushed_calls);
	out->last_flush = (TimestampTz) pg_atomic_read_u64(&stats->last_flush);
	out->heartbeat = apikey_flushers_heartbeat(MyDatabaseId);
	out->tokens_redacted = pg_atomic_read_u64(&stats->tokens_redacted);
	out->network_overflow = pg_atomic_read_u64(&stats->network_overflow);
	out->failure_unwatched = pg_atomic_read_u64(&stats->failure_unwatched);
	return true;
}
