/*-------------------------------------------------------------------------
 *
 * networks.c
 *	  The networks each key succeeds from, for apikey.key_networks: a
 *	  bounded set in shared memory, filled on the valid path and written
 *	  by the usage writer.
 *
 * What is kept.  For every valid verdict that has a client address (the
 * client_addr asserted by a trusted role, else the connection's), the
 * network it belongs to: its /24 (IPv4) or /48 (IPv6) by default
 * (apikey.network_prefix_v4, apikey.network_prefix_v6), never the address
 * itself: client addresses are personal data.  An IPv4-mapped IPv6 address
 * arrives here in IPv4 form (address.c), so it counts as IPv4.  Per (key,
 * network): calls, first and last call.  Only in a database whose usage is
 * counted in shared memory (apikey_usage_in_shmem()) and never during
 * recovery: nobody would write it.  Without the preload nothing is
 * collected and key_networks stays empty.
 *
 * Cost on the valid path.  A call is counted first in the backend's own
 * slot (as usage.c's backend slots): a small open-addressed table that
 * only its owner adds to, with atomics, taking no lock and writing no
 * cache line another backend writes per call.  Only when the slot has no
 * room for the (key, network) does the call go to the shared table: a
 * shared LWLock and the entry's spinlock, or briefly an exclusive lock to
 * add the entry.  Nothing is allocated per call.
 *
 * Bounded.  The shared table holds at most apikey.network_max_entries
 * (key, network) pairs.  A call that finds it full is not recorded, and
 * counted in apikey.stats (network_overflow); verification never waits
 * for room and never fails for want of it.
 *
 * Flushing.  The usage writer calls apikey_networks_flush() in its flush
 * transaction: it takes the counts of every slot (by atomic exchange) and
 * reads those of the shared table, and upserts them into key_networks in
 * one statement, in a subtransaction: if that fails (a lock held past the
 * writer's lock_timeout, say) it is a WARNING and the usage flush goes on.
 * At commit the shared counts written come off the table; if the upsert or
 * the transaction fails, the slot counts taken go into the shared table
 * (or, without room, into network_overflow), so no call is written twice
 * or, with room, lost.  Like usage, a call is counted whatever its
 * transaction does afterwards (rollback included).  Hourly, in another
 * subtransaction, the writer purges rows past apikey.network_retention and
 * recomputes key_baselines (apikey._networks_maintain).
 *
 * Locking: net_shared->lock protects the shared table's membership (shared
 * to find an entry, exclusive to add or remove one); an entry's counters
 * are read and changed under its spinlock with the lock held shared, or
 * with the lock held exclusively alone (nobody holds a spinlock without
 * the shared lock).  A slot's mutex (spinlock) is taken by its owner to claim
 * an entry for a new key, and by the flush to read keys and take counts;
 * the owner's counting takes no lock.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/socket.h>

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inet.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "apikey.h"
#include "compat.h"

#define SLOT_NETS		256		/* (key, network) pairs per backend slot */
#define SLOT_PROBES		8		/* linear probes before the shared table */

/* Maintenance (retention, baselines) runs at most this often. */
#define MAINTAIN_EVERY	(USECS_PER_SEC * 3600)

typedef struct NetKey
{
	Oid			dboid;
	uint8		family;			/* PGSQL_AF_INET or PGSQL_AF_INET6 */
	uint8		bits;			/* the network's prefix length */
	int64		key_id;
	uint8		addr[16];		/* the network; bits past the prefix zero */
} NetKey;

/* An entry of the shared table. */
typedef struct NetEntry
{
	NetKey		key;
	slock_t		mutex;
	int64		calls;
	TimestampTz first_at;
	TimestampTz last_at;
} NetEntry;

/* An entry of a backend slot; used once its key has been set. */
typedef struct SlotNet
{
	NetKey		key;
	bool		used;
	pg_atomic_uint64 calls;		/* added to by the owner, taken by a flush */
	pg_atomic_uint64 first_at;	/* first call since the count was last 0 */
	pg_atomic_uint64 last_at;
} SlotNet;

typedef struct NetSlot
{
	slock_t		mutex;
	SlotNet		nets[SLOT_NETS];
} NetSlot;

typedef struct NetShared
{
	LWLock	   *lock;
	int			nslots;
} NetShared;

/* Counts read or taken by a flush. */
typedef struct NetSnap
{
	NetKey		key;
	int64		calls;
	TimestampTz first_at;
	TimestampTz last_at;
} NetSnap;

/* GUCs */
static int	network_prefix_v4 = 24;
static int	network_prefix_v6 = 48;
static int	network_retention = 90 * 24 * 3600; /* seconds */
static int	network_max_entries = 10000;

static NetShared *net_shared = NULL;
static NetSlot *net_slots = NULL;
static NetSlot *my_slot = NULL;
static HTAB *net_htab = NULL;

/* the writer's flush in progress: shared counts read, slot counts taken */
static NetSnap *pending_shared = NULL;
static int	pending_shared_n = 0;
static NetSnap *pending_taken = NULL;
static int	pending_taken_n = 0;
static bool xact_callback_registered = false;
static TimestampTz maintained_at = 0;

static void networks_xact_callback(XactEvent event, void *arg);

/* The settings: the prefixes and retention everywhere, the size preloaded. */
void
apikey_networks_init(void)
{
	DefineCustomIntVariable("apikey.network_prefix_v4",
							"Prefix length IPv4 client addresses are aggregated to in apikey.key_networks.",
							NULL,
							&network_prefix_v4,
							24, 8, 32,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("apikey.network_prefix_v6",
							"Prefix length IPv6 client addresses are aggregated to in apikey.key_networks.",
							NULL,
							&network_prefix_v6,
							48, 16, 128,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("apikey.network_retention",
							"How long a network unseen for a key stays in apikey.key_networks.",
							NULL,
							&network_retention,
							90 * 24 * 3600, 3600, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	if (!process_shared_preload_libraries_in_progress)
		return;
	DefineCustomIntVariable("apikey.network_max_entries",
							"Maximum number of (key, network) pairs held in shared memory between flushes.",
							"When full, further successes are not recorded in apikey.key_networks and are counted in apikey.stats.network_overflow.",
							&network_max_entries,
							10000, 100, INT_MAX / 2,
							PGC_POSTMASTER, 0,
							NULL, NULL, NULL);
}

Size
apikey_networks_shmem_size(void)
{
	Size		size = MAXALIGN(sizeof(NetShared));

	size = add_size(size, mul_size(MaxBackends, sizeof(NetSlot)));
	return add_size(size, hash_estimate_size(network_max_entries, sizeof(NetEntry)));
}

/* Called from shmem_startup with AddinShmemInitLock held. */
void
apikey_networks_shmem_startup(LWLock *lock)
{
	HASHCTL		info;
	bool		found;

	net_shared = ShmemInitStruct("apikey networks state", sizeof(NetShared), &found);
	if (!found)
	{
		net_shared->lock = lock;
		net_shared->nslots = MaxBackends;
	}
	net_slots = ShmemInitStruct("apikey networks backend slots",
								mul_size(MaxBackends, sizeof(NetSlot)), &found);
	if (!found)
	{
		int			s;

		for (s = 0; s < MaxBackends; s++)
		{
			int			i;

			SpinLockInit(&net_slots[s].mutex);
			for (i = 0; i < SLOT_NETS; i++)
			{
				net_slots[s].nets[i].used = false;
				pg_atomic_init_u64(&net_slots[s].nets[i].calls, 0);
				pg_atomic_init_u64(&net_slots[s].nets[i].first_at, 0);
				pg_atomic_init_u64(&net_slots[s].nets[i].last_at, 0);
			}
		}
	}
	info.keysize = sizeof(NetKey);
	info.entrysize = sizeof(NetEntry);
	net_htab = ShmemInitHash("apikey networks",
							 network_max_entries, network_max_entries,
							 &info, HASH_ELEM | HASH_BLOBS);
}

/*
 * The network addr belongs to, by the prefix settings: family, prefix
 * length and address bytes with the host part zeroed.  addr is in IPv4
 * form if mapped (address.c).
 */
static void
network_bytes(const inet *addr, uint8 *family, uint8 *bits, uint8 *out)
{
	int			max = ip_family(addr) == PGSQL_AF_INET ? 32 : 128;
	int			b = ip_family(addr) == PGSQL_AF_INET ? network_prefix_v4 : network_prefix_v6;
	int			i;

	b = Min(b, max);
	*family = ip_family(addr);
	*bits = (uint8) b;
	memset(out, 0, 16);
	memcpy(out, ip_addr(addr), max / 8);
	for (i = b / 8; i < max / 8; i++)
		out[i] = (i == b / 8 && b % 8 != 0) ? out[i] & (uint8) (0xFF << (8 - b % 8)) : 0;
}

/* The network of addr as a cidr, in IPv4 form if mapped (apikey._network_of). */
inet *
apikey_network_of(const inet *addr)
{
	inet	   *a = apikey_address_normal(addr, CurrentMemoryContext);
	inet	   *res = palloc0(sizeof(inet));
	uint8		family;
	uint8		bits;
	uint8		bytes[16];

	network_bytes(a, &family, &bits, bytes);
	ip_family(res) = family;
	ip_bits(res) = bits;
	memcpy(ip_addr(res), bytes, ip_addrsize(res));
	SET_INET_VARSIZE(res);
	pfree(a);
	return res;
}

/*
 * Add calls to nk's shared entry; false when the table is full.  The
 * caller counts what could not be added.
 */
static bool
add_shared(const NetKey *nk, int64 calls, TimestampTz first_at, TimestampTz last_at)
{
	NetEntry   *entry;
	bool		found;

	LWLockAcquire(net_shared->lock, LW_SHARED);
	entry = hash_search(net_htab, nk, HASH_FIND, NULL);
	if (entry == NULL)
	{
		LWLockRelease(net_shared->lock);
		LWLockAcquire(net_shared->lock, LW_EXCLUSIVE);
		entry = hash_search(net_htab, nk, HASH_FIND, NULL);
		if (entry == NULL)
		{
			if (hash_get_num_entries(net_htab) >= network_max_entries ||
				(entry = hash_search(net_htab, nk, HASH_ENTER_NULL, &found)) == NULL)
			{
				LWLockRelease(net_shared->lock);
				return false;
			}
			SpinLockInit(&entry->mutex);
			entry->calls = 0;
			entry->first_at = first_at;
			entry->last_at = last_at;
		}
	}
	SpinLockAcquire(&entry->mutex);
	if (entry->calls == 0 || first_at < entry->first_at)
		entry->first_at = first_at;
	if (last_at > entry->last_at)
		entry->last_at = last_at;
	entry->calls += calls;
	SpinLockRelease(&entry->mutex);
	LWLockRelease(net_shared->lock);
	return true;
}

/*
 * Count nk in this backend's slot: the entry already holding it, else the
 * first empty one among SLOT_PROBES.  Only this backend adds to its
 * entries and a flush only takes counts to zero, so an entry it reads at
 * zero stays at zero until it counts there itself.
 */
static bool
count_in_slot(const NetKey *nk, TimestampTz now)
{
	uint32		h;
	SlotNet    *free_net = NULL;
	int			i;

	if (my_slot == NULL)
	{
		int			n = apikey_my_proc_number();

		if (n < 0 || n >= net_shared->nslots)
			return false;
		my_slot = &net_slots[n];
	}
	h = hash_bytes((const unsigned char *) nk, sizeof(NetKey));
	for (i = 0; i < SLOT_PROBES; i++)
	{
		SlotNet    *e = &my_slot->nets[(h + i) % SLOT_NETS];

		if (e->used && memcmp(&e->key, nk, sizeof(NetKey)) == 0)
		{
			if (pg_atomic_fetch_add_u64(&e->calls, 1) == 0)
				pg_atomic_write_u64(&e->first_at, (uint64) now);
			pg_atomic_write_u64(&e->last_at, (uint64) now);
			return true;
		}
		if (free_net == NULL && (!e->used || pg_atomic_read_u64(&e->calls) == 0))
			free_net = e;
	}
	if (free_net == NULL)
		return false;
	/* claim it, under the slot's lock for a flush reading keys */
	SpinLockAcquire(&my_slot->mutex);
	free_net->key = *nk;
	free_net->used = true;
	pg_atomic_write_u64(&free_net->first_at, (uint64) now);
	pg_atomic_write_u64(&free_net->last_at, (uint64) now);
	SpinLockRelease(&my_slot->mutex);
	pg_atomic_fetch_add_u64(&free_net->calls, 1);
	return true;
}

/*
 * Record one valid call of key_id from addr (NULL: no address, nothing to
 * record).  Called by verify.c for every valid verdict.
 */
void
apikey_networks_count(int64 key_id, const inet *addr, TimestampTz now)
{
	NetKey		nk;

	if (net_htab == NULL || addr == NULL || RecoveryInProgress() ||
		!apikey_usage_in_shmem())
		return;
	memset(&nk, 0, sizeof(nk));
	nk.dboid = MyDatabaseId;
	nk.key_id = key_id;
	network_bytes(addr, &nk.family, &nk.bits, nk.addr);
	if (count_in_slot(&nk, now))
		return;
	if (!add_shared(&nk, 1, now, now))
		apikey_stats_network_overflow(1);
}

/* Take this database's counts out of every backend slot. */
static int
take_slots(NetSnap **out)
{
	int			cap = SLOT_NETS;
	int			n = 0;
	NetSnap    *snaps = palloc(sizeof(NetSnap) * cap);
	int			s;
	int			i;

	for (s = 0; s < net_shared->nslots; s++)
	{
		NetSlot    *slot = &net_slots[s];

		if (n + SLOT_NETS > cap)
		{
			cap *= 2;
			snaps = repalloc(snaps, sizeof(NetSnap) * cap);
		}
		SpinLockAcquire(&slot->mutex);
		for (i = 0; i < SLOT_NETS; i++)
		{
			SlotNet    *e = &slot->nets[i];

			if (!e->used || e->key.dboid != MyDatabaseId ||
				pg_atomic_read_u64(&e->calls) == 0)
				continue;
			snaps[n].key = e->key;
			snaps[n].first_at = (TimestampTz) pg_atomic_read_u64(&e->first_at);
			snaps[n].calls = (int64) pg_atomic_exchange_u64(&e->calls, 0);
			snaps[n].last_at = (TimestampTz) pg_atomic_read_u64(&e->last_at);
			n++;
		}
		SpinLockRelease(&slot->mutex);
	}
	*out = snaps;
	return n;
}

/* Copy this database's shared entries that hold counts. */
static int
read_shared(NetSnap **out)
{
	HASH_SEQ_STATUS status;
	NetEntry   *entry;
	int			n = 0;
	int			cap;
	NetSnap    *snaps;

	LWLockAcquire(net_shared->lock, LW_SHARED);
	cap = Max(hash_get_num_entries(net_htab), 1);
	snaps = palloc(sizeof(NetSnap) * cap);
	hash_seq_init(&status, net_htab);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->key.dboid != MyDatabaseId || n >= cap)
			continue;
		snaps[n].key = entry->key;
		SpinLockAcquire(&entry->mutex);
		snaps[n].calls = entry->calls;
		snaps[n].first_at = entry->first_at;
		snaps[n].last_at = entry->last_at;
		SpinLockRelease(&entry->mutex);
		if (snaps[n].calls > 0)
			n++;
	}
	LWLockRelease(net_shared->lock);
	*out = snaps;
	return n;
}

/*
 * The upsert.  A network unseen for that key for 30 days or more is first
 * seen again (first_seen moves to now): the new_networks rule looks for
 * first_seen in its window.  Rows of keys that no longer exist are skipped.
 */
#define UPSERT_NETWORKS \
	"INSERT INTO apikey.key_networks AS n (key_id, network, first_seen, last_seen, calls) " \
	"SELECT s.k, s.net, pg_catalog.min(s.f), pg_catalog.max(s.l), pg_catalog.sum(s.c) " \
	"  FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3), " \
	"                  pg_catalog.unnest($4), pg_catalog.unnest($5)) AS s(k, net, f, l, c) " \
	" WHERE EXISTS (SELECT FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) s.k) " \
	" GROUP BY s.k, s.net " \
	"ON CONFLICT (key_id, network) DO UPDATE SET " \
	"  first_seen = CASE WHEN n.last_seen OPERATOR(pg_catalog.<) (excluded.first_seen " \
	"                         OPERATOR(pg_catalog.-) '30 days'::pg_catalog.interval) " \
	"                    THEN excluded.first_seen " \
	"                    ELSE LEAST(n.first_seen, excluded.first_seen) END, " \
	"  last_seen = GREATEST(n.last_seen, excluded.last_seen), " \
	"  calls = n.calls OPERATOR(pg_catalog.+) excluded.calls"

/* What one flush writes: the slot counts taken, then the shared ones read. */
typedef struct FlushBatch
{
	const NetSnap *a;
	int			na;
	const NetSnap *b;
	int			nb;
	int			rows;			/* out: rows written */
} FlushBatch;

/* Write a batch to key_networks in one statement. */
static void
write_networks(void *arg)
{
	FlushBatch *batch = arg;
	int			n = batch->na + batch->nb;
	Datum	   *ids = palloc(sizeof(Datum) * n);
	Datum	   *nets = palloc(sizeof(Datum) * n);
	Datum	   *firsts = palloc(sizeof(Datum) * n);
	Datum	   *lasts = palloc(sizeof(Datum) * n);
	Datum	   *calls = palloc(sizeof(Datum) * n);
	Datum		values[5];
	Oid			types[5] = {INT8ARRAYOID, CIDRARRAYOID, TIMESTAMPTZARRAYOID,
	TIMESTAMPTZARRAYOID, INT8ARRAYOID};
	int			rc;
	int			i;

	for (i = 0; i < n; i++)
	{
		const NetSnap *s = i < batch->na ? &batch->a[i] : &batch->b[i - batch->na];
		inet	   *net = palloc0(sizeof(inet));

		ip_family(net) = s->key.family;
		ip_bits(net) = s->key.bits;
		memcpy(ip_addr(net), s->key.addr, ip_addrsize(net));
		SET_INET_VARSIZE(net);
		ids[i] = Int64GetDatum(s->key.key_id);
		nets[i] = PointerGetDatum(net);
		firsts[i] = TimestampTzGetDatum(s->first_at);
		lasts[i] = TimestampTzGetDatum(s->last_at);
		calls[i] = Int64GetDatum(s->calls);
	}
	values[0] = PointerGetDatum(construct_array(ids, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
	values[1] = PointerGetDatum(construct_array(nets, n, CIDROID, -1, false, TYPALIGN_INT));
	values[2] = PointerGetDatum(construct_array(firsts, n, TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE));
	values[3] = PointerGetDatum(construct_array(lasts, n, TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE));
	values[4] = PointerGetDatum(construct_array(calls, n, INT8OID, 8, true, TYPALIGN_DOUBLE));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	rc = SPI_execute_with_args(UPSERT_NETWORKS, 5, types, values, NULL, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "key_networks flush failed: %s", SPI_result_code_string(rc));
	batch->rows = (int) SPI_processed;
	SPI_finish();
}

/* Purge and recompute baselines (apikey._networks_maintain). */
static void
run_maintain(void *arg)
{
	Interval   *retention = palloc0(sizeof(Interval));
	Datum		value;
	Oid			type = INTERVALOID;
	int			rc;

	retention->time = (int64) network_retention * USECS_PER_SEC;
	value = IntervalPGetDatum(retention);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	rc = SPI_execute_with_args("SELECT apikey._networks_maintain($1)", 1, &type, &value,
							   NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "key_networks maintenance failed: %s", SPI_result_code_string(rc));
	SPI_finish();
}

/*
 * Run fn(arg) in a subtransaction of the writer's flush: if it fails, the
 * error is reported as a WARNING and undone, and the usage flush around it
 * goes on.  Returns whether it succeeded.
 */
static bool
run_isolated(void (*fn) (void *), void *arg, const char *what)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	volatile bool ok = true;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcxt);
	PG_TRY();
	{
		fn(arg);
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("apikey could not %s: %s", what, edata->message),
				 errhint("It is tried again later; usage is flushed meanwhile.")));
		FreeErrorData(edata);
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(oldcxt);
	CurrentResourceOwner = oldowner;
	return ok;
}

/* Put taken slot counts into the shared table (or count them as overflow). */
static void
give_back(const NetSnap *snaps, int n)
{
	int			i;

	for (i = 0; i < n; i++)
	{
		if (!add_shared(&snaps[i].key, snaps[i].calls, snaps[i].first_at, snaps[i].last_at))
			apikey_stats_network_overflow((uint64) snaps[i].calls);
	}
}

/* Forget the flush in progress (its counts are settled). */
static void
clear_pending(void)
{
	if (pending_shared != NULL)
		pfree(pending_shared);
	if (pending_taken != NULL)
		pfree(pending_taken);
	pending_shared = pending_taken = NULL;
	pending_shared_n = pending_taken_n = 0;
}

/*
 * Write this database's recorded networks into apikey.key_networks, and
 * at most hourly purge it and recompute baselines, each in a subtransaction
 * (a failure is a WARNING, never a failed usage flush).  Only the usage
 * writer calls this, in its flush transaction, after the usage flush; a
 * no-op before the 1.2 update (no key_networks) and without shared memory.
 * The shared counts written come off at commit (networks_xact_callback).
 * Returns the rows written.
 */
int
apikey_networks_flush(void)
{
	Oid			keys = apikey_keystore_keys_relid(true);
	FlushBatch	batch = {0};
	NetSnap    *taken;
	NetSnap    *shared;
	TimestampTz now = GetCurrentTimestamp();

	if (net_htab == NULL || pending_shared != NULL || pending_taken != NULL ||
		!OidIsValid(keys) ||
		!OidIsValid(get_relname_relid("key_networks", get_rel_namespace(keys))))
		return 0;
	if (!xact_callback_registered)
	{
		RegisterXactCallback(networks_xact_callback, NULL);
		xact_callback_registered = true;
	}

	batch.nb = read_shared(&shared);
	batch.na = take_slots(&taken);
	batch.a = taken;
	batch.b = shared;
	if (batch.na + batch.nb > 0)
	{
		/* from here on the counts are settled whatever happens */
		pending_shared = MemoryContextAlloc(TopMemoryContext,
											sizeof(NetSnap) * Max(batch.nb, 1));
		memcpy(pending_shared, shared, sizeof(NetSnap) * batch.nb);
		pending_shared_n = batch.nb;
		pending_taken = MemoryContextAlloc(TopMemoryContext,
										   sizeof(NetSnap) * Max(batch.na, 1));
		memcpy(pending_taken, taken, sizeof(NetSnap) * batch.na);
		pending_taken_n = batch.na;
		if (!run_isolated(write_networks, &batch, "write apikey.key_networks"))
		{
			/* nothing was written: the shared counts stay, the taken go back */
			give_back(pending_taken, pending_taken_n);
			clear_pending();
		}
	}
	if (maintained_at == 0 || now - maintained_at >= MAINTAIN_EVERY)
	{
		/* once an hour even if it fails: never a failing statement per flush */
		maintained_at = now;
		(void) run_isolated(run_maintain, NULL,
							"purge apikey.key_networks and compute baselines");
	}
	return batch.rows;
}

/* Take written counts off the shared table; entries at zero go. */
static void
subtract_shared(const NetSnap *snaps, int n)
{
	int			i;

	LWLockAcquire(net_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < n; i++)
	{
		NetEntry   *entry = hash_search(net_htab, &snaps[i].key, HASH_FIND, NULL);

		if (entry == NULL)
			continue;
		entry->calls -= snaps[i].calls;
		if (entry->calls <= 0)
			hash_search(net_htab, &snaps[i].key, HASH_REMOVE, NULL);
	}
	LWLockRelease(net_shared->lock);
}

/*
 * Settle a flush at the end of its transaction: on commit the shared
 * counts written come off; on abort the slot counts taken go back, into
 * the shared table.
 */
static void
networks_xact_callback(XactEvent event, void *arg)
{
	if (pending_shared == NULL && pending_taken == NULL)
		return;
	if (event == XACT_EVENT_COMMIT)
		subtract_shared(pending_shared, pending_shared_n);
	else if (event == XACT_EVENT_ABORT)
		give_back(pending_taken, pending_taken_n);
	else
		return;
	clear_pending();
}
