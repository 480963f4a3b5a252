/*-------------------------------------------------------------------------
 *
 * shmem.h
 *	  apikey's shared memory: one struct of counters, two hash tables.
 *
 * Locking protocol
 *	 usage_lock	protects the usage hash table's membership: shared to find
 *				an entry and bump it, exclusive to insert or remove entries.
 *				An entry's counters are bumped under its own spinlock, so
 *				many backends can count at once under the shared lock.
 *	 rate_lock	the same for the rate-limit hash table; an entry's bucket
 *				state is read and updated under its spinlock, which makes
 *				take-a-token atomic across backends.
 *	 The statistics counters are atomics and need no lock.
 *
 *-------------------------------------------------------------------------
 */
#ifndef APIKEY_SHMEM_H
#define APIKEY_SHMEM_H

#include "port/atomics.h"
#include "storage/lwlock.h"

#include "apikey.h"

struct ApikeyShared
{
	LWLock	   *usage_lock;
	LWLock	   *rate_lock;
	pg_atomic_uint64 calls[APIKEY_NUM_CODES];	/* every verification */
	pg_atomic_uint64 usage_dropped; /* counts lost to a full usage table */
	pg_atomic_uint64 flushes;	/* successful flushes */
	pg_atomic_uint64 flush_errors;	/* failed flushes (counts kept) */
	pg_atomic_uint64 flushed_calls; /* calls written to usage_log */
	pg_atomic_uint64 last_flush;	/* TimestampTz of last success, 0 = never */
};

#endif							/* APIKEY_SHMEM_H */
