/*-------------------------------------------------------------------------
 *
 * netwatch.c
 *	  Failures per client network, for the detector's address_failures
 *	  rule: tokens that match no key (malformed, unknown) and calls the
 *	  failure limiter blocked (address_blocked), by /32 or /64, per minute,
 *	  over the last hour.
 *
 * usage_log cannot hold this: it counts a token that matches no key
 * without its address, so that whoever presents garbage cannot make it
 * store one row per address.  Here the count is in shared memory, bounded
 * by NETWATCH_MAX_NETWORKS networks of NETWATCH_MINUTES one-minute
 * counters each.  The address is the one verification judged by: the
 * client_addr a trusted proxy asserted, else the connection's (a local
 * socket has none and is not counted).  Counting is not undone by a
 * rollback and works in read-only transactions.
 *
 * A full table (NETWATCH_MAX_NETWORKS entries, checked by count: a shared
 * dynahash allocates past its size until all free shared memory is gone)
 * first forgets networks idle for the whole hour; if none, the failure is
 * not counted but counted as unwatched in apikey.stats
 * (failure_networks_unwatched).  Whoever presents garbage from many
 * networks thus costs at most the table, never the server's shared memory.
 *
 * Locking: netwatch_lock protects the table (exclusive to count, shared to
 * read).  Without shared_preload_libraries nothing is counted and the rule
 * finds nothing.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/socket.h>

#include "miscadmin.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inet.h"
#include "utils/timestamp.h"

#include "apikey.h"

#define NETWATCH_MAX_NETWORKS	4096
#define NETWATCH_MINUTES		60

typedef struct NetwatchEntry
{
	ApikeyNetwork key;
	int64		last_minute;	/* minutes since the epoch of the last count */
	uint32		counts[NETWATCH_MINUTES];	/* by minute % NETWATCH_MINUTES */
	TimestampTz last_at;
} NetwatchEntry;

static LWLock *netwatch_lock = NULL;
static HTAB *netwatch_htab = NULL;

Size
apikey_netwatch_shmem_size(void)
{
	return hash_estimate_size(NETWATCH_MAX_NETWORKS, sizeof(NetwatchEntry));
}

/* Called from shmem_startup with AddinShmemInitLock held. */
void
apikey_netwatch_shmem_startup(LWLock *lock)
{
	HASHCTL		info;

	netwatch_lock = lock;
	info.keysize = sizeof(ApikeyNetwork);
	info.entrysize = sizeof(NetwatchEntry);
	netwatch_htab = ShmemInitHash("apikey failures by network",
								  NETWATCH_MAX_NETWORKS, NETWATCH_MAX_NETWORKS,
								  &info, HASH_ELEM | HASH_BLOBS);
}

/* Clear the minutes between an entry's last count and minute. */
static void
advance(NetwatchEntry *e, int64 minute)
{
	int64		m;

	if (minute - e->last_minute >= NETWATCH_MINUTES)
		memset(e->counts, 0, sizeof(e->counts));
	else
		for (m = e->last_minute + 1; m <= minute; m++)
			e->counts[m % NETWATCH_MINUTES] = 0;
	if (minute > e->last_minute)
		e->last_minute = minute;
}

/* Forget networks with no failure in the last hour. */
static void
evict_idle(int64 minute)
{
	HASH_SEQ_STATUS status;
	NetwatchEntry *e;

	hash_seq_init(&status, netwatch_htab);
	while ((e = hash_seq_search(&status)) != NULL)
	{
		if (minute - e->last_minute >= NETWATCH_MINUTES)
			hash_search(netwatch_htab, &e->key, HASH_REMOVE, NULL);
	}
}

/*
 * Count a verification's failure against its client network, if it is
 * one the address_failures rule watches.  Never raises.
 */
void
apikey_netwatch_count(ApikeyCode code, inet *addr, TimestampTz now)
{
	ApikeyNetwork net;
	NetwatchEntry *e;
	bool		found;
	int64		minute = now / USECS_PER_MINUTE;

	if (netwatch_htab == NULL || addr == NULL ||
		(code != APIKEY_MALFORMED && code != APIKEY_UNKNOWN &&
		 code != APIKEY_ADDRESS_BLOCKED))
		return;
	memset(&net, 0, sizeof(net));
	net.dboid = MyDatabaseId;
	net.family = ip_family(addr);
	memcpy(net.prefix, ip_addr(addr), net.family == PGSQL_AF_INET ? 4 : 8);

	LWLockAcquire(netwatch_lock, LW_EXCLUSIVE);
	e = hash_search(netwatch_htab, &net, HASH_FIND, &found);
	if (e == NULL &&
		hash_get_num_entries(netwatch_htab) >= NETWATCH_MAX_NETWORKS)
		evict_idle(minute);
	if (e == NULL &&
		hash_get_num_entries(netwatch_htab) < NETWATCH_MAX_NETWORKS)
		e = hash_search(netwatch_htab, &net, HASH_ENTER_NULL, &found);
	if (e == NULL)
		apikey_stats_failure_unwatched();
	else
	{
		if (!found)
		{
			memset(e->counts, 0, sizeof(e->counts));
			e->last_minute = minute;
		}
		advance(e, minute);
		if (minute > e->last_minute - NETWATCH_MINUTES)
			e->counts[minute % NETWATCH_MINUTES]++;
		e->last_at = Max(e->last_at, now);
	}
	LWLockRelease(netwatch_lock);
}

/*
 * This database's networks with failures since since (at most an hour
 * back, by whole minutes): network, failures, last failure.
 */
void
apikey_netwatch_list(TimestampTz since, Tuplestorestate *out, TupleDesc desc)
{
	HASH_SEQ_STATUS status;
	NetwatchEntry *e;
	int64		now_minute = GetCurrentTimestamp() / USECS_PER_MINUTE;
	int64		from = since / USECS_PER_MINUTE;

	if (netwatch_htab == NULL)
		return;
	from = Max(from, now_minute - NETWATCH_MINUTES + 1);
	LWLockAcquire(netwatch_lock, LW_SHARED);
	hash_seq_init(&status, netwatch_htab);
	while ((e = hash_seq_search(&status)) != NULL)
	{
		int64		total = 0;
		int64		m;
		Datum		values[3];
		bool		nulls[3] = {false};
		inet	   *net;

		if (e->key.dboid != MyDatabaseId)
			continue;
		for (m = Max(from, e->last_minute - NETWATCH_MINUTES + 1); m <= e->last_minute; m++)
			total += e->counts[m % NETWATCH_MINUTES];
		if (total == 0)
			continue;
		net = palloc0(sizeof(inet));
		ip_family(net) = e->key.family;
		ip_bits(net) = e->key.family == PGSQL_AF_INET ? 32 : 64;
		memcpy(ip_addr(net), e->key.prefix, e->key.family == PGSQL_AF_INET ? 4 : 8);
		SET_INET_VARSIZE(net);
		values[0] = InetPGetDatum(net);
		values[1] = Int64GetDatum(total);
		values[2] = TimestampTzGetDatum(e->last_at);
		tuplestore_putvalues(out, desc, values, nulls);
	}
	LWLockRelease(netwatch_lock);
}
