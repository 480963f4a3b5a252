/*-------------------------------------------------------------------------
 *
 * shmem.h
 *	  apikey's shared memory: one struct of counters, two hash tables.
 *
 * Locking protocol
 *	 usage_lock	protects the usage hash table's membership and
 *				usage_failure_entries: shared to find an entry and bump it,
 *				exclusive to insert, remove or evict entries.  An entry's
 *				counters are bumped under its own spinlock, so many backends
 *				can count at once under the shared lock.
 *	 rate_lock	the same for the rate-limit hash table; an entry's bucket
 *				state is read and updated under its spinlock, which makes
 *				take-a-token atomic across backends.
 *	 writer_mutex (spinlock) protects the usage writer's fields: who it is,
 *				the flush requests made of it and the outcome of its last
 *				flush.  Waiters sleep on flush_cv, which the writer
 *				broadcasts after each flush and when it exits.
 *	 The statistics counters are atomics and need no lock.
 *
 *-------------------------------------------------------------------------
 */
#ifndef APIKEY_SHMEM_H
#define APIKEY_SHMEM_H

#include "datatype/timestamp.h"
#include "port/atomics.h"
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/spin.h"

#include "apikey.h"

struct ApikeyShared
{
	LWLock	   *usage_lock;
	LWLock	   *rate_lock;
	int			usage_failure_entries;	/* usage entries not for valid calls */
	TimestampTz usage_swept_at[2];	/* last sweep that could free nothing:
									 * [0] for any entry, [1] for failures */
	pg_atomic_uint64 calls[APIKEY_NUM_CODES];	/* every verification */
	pg_atomic_uint64 usage_dropped; /* counts lost to a full usage table */
	pg_atomic_uint64 flushes;	/* successful flushes */
	pg_atomic_uint64 flush_errors;	/* failed flushes (counts kept) */
	pg_atomic_uint64 flushed_calls; /* calls written to usage_log */
	pg_atomic_uint64 last_flush;	/* TimestampTz of last success, 0 = never */

	/* the usage writer, and flush_usage() requests to it */
	slock_t		writer_mutex;
	pid_t		writer_pid;		/* 0 while no writer runs */
	Latch	   *writer_latch;
	uint64		flush_requested;	/* requests made so far */
	uint64		flush_served;	/* requests the last finished flush covered */
	bool		flush_ok;		/* did that flush succeed? */
	int			flush_rows;		/* usage_log rows it wrote */
	ConditionVariable flush_cv;
};

#endif							/* APIKEY_SHMEM_H */
