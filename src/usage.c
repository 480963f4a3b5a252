/*-------------------------------------------------------------------------
 *
 * usage.c
 *	  Count every verification, per (key, minute, code), plus the client
 *	  address for a known key's failures.
 *
 * What a caller makes us store is bounded, whatever it passes:
 *	 - a token that matches no key (malformed, unknown) is counted per code
 *	   and minute, never per address;
 *	 - a key's failures keep their client address for at most
 *	   APIKEY_USAGE_MAX_ADDRS distinct addresses per key and minute; further
 *	   failures of that key are counted with the address NULL;
 *	 - in shared memory, entries for failures may fill at most half of
 *	   apikey.usage_max_entries, so valid calls always have room.
 *
 * With shared memory, in a database whose usage writer runs (worker.c,
 * flushers.c), and in every database on a hot standby, a call is one
 * increment of a counter in shared memory: no write, no WAL, and nothing the caller's ROLLBACK can
 * undo.  Calls without an address are counted in the backend's own slot
 * (no lock, no cache line shared with another backend) and gathered into
 * the shared table before each flush; a call with an address, or one the
 * slot cannot take, goes to the shared table directly.
 * Only the database's usage writer persists these counters, in a top-level
 * transaction of its own; what it wrote comes off the counters when that
 * transaction commits.  apikey.flush_usage() there asks the writer to flush
 * and waits, so the caller's transaction holds nothing.  When the table has
 * no room:
 *	 - entries that nobody will ever flush (every entry on a standby; the
 *	   entries of a database with no writer slot any more: its extension or
 *	   the database was dropped) are evicted oldest first: a rolling window,
 *	   informational, shown by apikey.live_usage;
 *	 - otherwise the count is dropped and the drop counted in apikey.stats.
 *	 Verification never waits for room.
 *
 * Elsewhere (no shared_preload_libraries, or while the database's writer
 * is not running: starting, restarting, or no worker slot for it) a call
 * appends one row to apikey.usage_pending in the caller's transaction, as
 * the extension's owner.  That table has no index and nobody updates its
 * rows, so a verifier never waits for, deadlocks with, or fails to
 * serialize against another session.  apikey.flush_usage() (and the
 * writer, in its database) folds pending rows into usage_log and
 * keys.last_used_at (the writer folds them at each round, so the rows
 * written before it started are folded too); apikey.key_usage adds pending rows in, so totals stay
 * exact before a fold.  In a read-only transaction nothing is written.
 *
 * Every write to usage_log goes through one statement (write_usage) that
 * applies the address bound against what usage_log already holds, and
 * moves last_used_at forward skipping key rows that someone has locked.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/socket.h>

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/lmgr.h"
#include "storage/lwlock.h"
#include "storage/lock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/guc.h"
#include "utils/inet.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "apikey.h"
#include "compat.h"

/* Distinct client addresses recorded per key and minute. */
#define APIKEY_USAGE_MAX_ADDRS	16

/* The code of an address tally entry: one past the verdict codes. */
#define USAGE_TALLY			APIKEY_NUM_CODES

/* Entries for failures (tallies included) may take this much of the table. */
#define FAILURE_SHARE(max)	((max) / 2)

/*
 * The advisory lock that lets one session at a time fold pending rows:
 * keys "apky" "usag" in field4 space 3, which the SQL advisory-lock
 * functions never use (they use 1 and 2), so no application lock collides.
 */
#define FOLD_LOCK_KEY1		0x61706b79	/* "apky" */
#define FOLD_LOCK_KEY2		0x75736167	/* "usag" */
#define FOLD_LOCK_SPACE		3

/* A sweep that freed nothing is not repeated for this long (microseconds). */
#define SWEEP_PAUSE			USECS_PER_SEC

typedef struct UsageKey
{
	Oid			dboid;
	int32		code;			/* verdict code, or USAGE_TALLY */
	int64		key_id;			/* 0 = no key */
	TimestampTz bucket;			/* start of the minute */
	uint8		family;			/* 0 = no address */
	uint8		bits;
	uint8		addr[16];
} UsageKey;

/*
 * A counter.  A tally entry (code USAGE_TALLY, no address) counts instead
 * how many address entries its key has been given this minute.  An address
 * entry that the writer empties stays, at zero, until its minute is over,
 * so that the address keeps its place among its key's few.
 */
typedef struct UsageEntry
{
	UsageKey	key;
	slock_t		mutex;
	int64		calls;
	TimestampTz last_at;		/* latest call counted here */
} UsageEntry;

/* A flushed (or listed) entry: key and the calls seen. */
typedef struct UsageSnap
{
	UsageKey	key;
	int64		calls;
	TimestampTz last_at;
} UsageSnap;

/*
 * The shared usage table.  Locking: lock protects the table's membership
 * and the fields below: shared to find an entry and bump it, exclusive to
 * insert, remove or evict entries, and an exclusive lock alone suffices to
 * read or reset an entry's counters (nobody holds its spinlock without the
 * shared lock).  An entry's counters are bumped under its own spinlock, so
 * many backends can count at once under the shared lock.
 */
typedef struct UsageShared
{
	LWLock	   *lock;
	LWLock	   *gather_lock;	/* held from gathering the slots until the
								 * shared table is read (gather_slots) */
	int			nslots;			/* backend slots (MaxBackends) */
	int			failure_entries;	/* entries not for valid calls */
	TimestampTz swept_at[2];	/* last sweep that could free nothing: [0]
								 * for any entry, [1] for failures */
} UsageShared;

/*
 * Backend slots: where calls without an address (every valid call, and
 * the failures of tokens that match no key) are counted first.  Each
 * backend owns the slot of its proc number; it alone adds to its entries'
 * counters (atomics in its own cache lines, no lock), and gather_slots()
 * moves the counts into the shared table before every flush or listing.
 * A slot has two tables, for even and odd minutes; a table restarts on a
 * new minute only once every count in it has been gathered.
 *
 * Locking: a slot's mutex (spinlock) is taken by its owner to claim an
 * entry or restart a table, and by gather_slots() to read keys and take
 * counts; the owner's counting takes no lock.  Gatherers go one at a time
 * (gather_lock, taken before the table's lock), so that a reader of the
 * table never misses counts another gatherer holds in transit.
 */
#define SLOT_ENTRIES	256		/* per table: distinct keys per minute */
#define SLOT_PROBES		8		/* linear probes before giving up */

typedef struct SlotEntry
{
	UsageKey	key;
	uint32		gen;			/* == table's gen: the entry is in use */
	pg_atomic_uint64 calls;		/* added to by the owner, taken by gathering */
	pg_atomic_uint64 last_at;	/* latest call counted here */
} SlotEntry;

typedef struct SlotTable
{
	TimestampTz bucket;			/* the minute it counts */
	uint32		gen;			/* bumped to empty the table */
	SlotEntry	entries[SLOT_ENTRIES];
} SlotTable;

typedef struct BackendSlot
{
	slock_t		mutex;
	SlotTable	tables[2];		/* even and odd minutes */
} BackendSlot;

static BackendSlot *usage_slots = NULL;
static BackendSlot *my_slot = NULL;

static bool slot_table_restart(BackendSlot *slot, SlotTable *t, TimestampTz bucket);

/* GUC: apikey.usage_max_entries (and apikey.database, no longer used) */
static char *usage_database = NULL;
static int	usage_max_entries = 10000;

static UsageShared *usage_shared = NULL;
static HTAB *usage_htab = NULL;
static SPIPlanPtr pending_insert_plan = NULL;
static SPIPlanPtr legacy_insert_plan = NULL;
static SPIPlanPtr legacy_last_used_plan = NULL;

/* calls written by the writer's flush, subtracted at commit */
static UsageSnap *flush_pending = NULL;
static int	flush_pending_n = 0;
static uint64 flush_pending_calls = 0;
static bool xact_callback_registered = false;

static void usage_xact_callback(XactEvent event, void *arg);

/* The settings that size shared memory; only defined when preloading. */
void
apikey_usage_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		return;

	/*
	 * apikey.database named the one database whose usage was counted in
	 * shared memory; now every database's is.  It is still accepted, so an
	 * old postgresql.conf does not stop the server, and said to be unused.
	 */
	DefineCustomStringVariable("apikey.database",
							   "No longer used: every database has its own usage writer.",
							   "See apikey.databases.",
							   &usage_database,
							   "",
							   PGC_POSTMASTER, GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE,
							   NULL, NULL, NULL);
	if (usage_database != NULL && usage_database[0] != '\0')
		ereport(WARNING,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("apikey.database is no longer used"),
				 errdetail("Usage is counted in shared memory and written by a usage writer in every database where apikey is installed."),
				 errhint("Remove apikey.database from postgresql.conf; to limit the writers to some databases, set apikey.databases.")));

	DefineCustomIntVariable("apikey.usage_max_entries",
							"Maximum number of (key, minute, code, address) usage counters in shared memory.",
							"When full, further counts are dropped and counted in apikey.stats.",
							&usage_max_entries,
							10000, 100, INT_MAX / 2,
							PGC_POSTMASTER, 0,
							NULL, NULL, NULL);
}

Size
apikey_usage_shmem_size(void)
{
	Size		size = MAXALIGN(sizeof(UsageShared));

	size = add_size(size, mul_size(MaxBackends, sizeof(BackendSlot)));
	return add_size(size, hash_estimate_size(usage_max_entries, sizeof(UsageEntry)));
}

/* Called from shmem_startup with AddinShmemInitLock held. */
void
apikey_usage_shmem_startup(LWLock *lock, LWLock *gather_lock)
{
	HASHCTL		info;
	bool		found;

	usage_shared = ShmemInitStruct("apikey usage state", sizeof(UsageShared), &found);
	if (!found)
	{
		usage_shared->lock = lock;
		usage_shared->gather_lock = gather_lock;
		usage_shared->nslots = MaxBackends;
		usage_shared->failure_entries = 0;
		usage_shared->swept_at[0] = 0;
		usage_shared->swept_at[1] = 0;
	}
	usage_slots = ShmemInitStruct("apikey usage backend slots",
								  mul_size(MaxBackends, sizeof(BackendSlot)), &found);
	if (!found)
	{
		int			i;

		for (i = 0; i < MaxBackends; i++)
		{
			BackendSlot *slot = &usage_slots[i];
			int			t;

			SpinLockInit(&slot->mutex);
			for (t = 0; t < 2; t++)
			{
				int			e;

				slot->tables[t].bucket = 0;
				slot->tables[t].gen = 1;
				for (e = 0; e < SLOT_ENTRIES; e++)
				{
					slot->tables[t].entries[e].gen = 0;
					pg_atomic_init_u64(&slot->tables[t].entries[e].calls, 0);
					pg_atomic_init_u64(&slot->tables[t].entries[e].last_at, 0);
				}
			}
		}
	}

	info.keysize = sizeof(UsageKey);
	info.entrysize = sizeof(UsageEntry);
	usage_htab = ShmemInitHash("apikey usage",
							   usage_max_entries,
							   usage_max_entries,
							   &info, HASH_ELEM | HASH_BLOBS);
}

/* Does this backend count in shared memory, or append pending rows? */
bool
apikey_usage_in_shmem(void)
{
	if (usage_shared == NULL || usage_htab == NULL)
		return false;
	if (RecoveryInProgress())
		return true;
	return apikey_flushers_serving(MyDatabaseId);
}

static inline bool
is_failure(const UsageKey *uk)
{
	return uk->code != APIKEY_VALID;
}

/* Is this bucket at least a whole minute older than ref's? */
static inline bool
bucket_is_stale(TimestampTz bucket, TimestampTz ref)
{
	return bucket < ref - ref % USECS_PER_MINUTE - USECS_PER_MINUTE;
}

/* Would need more entries fit?  Call with usage_lock held. */
static bool
has_room(bool failure, int need)
{
	if (hash_get_num_entries(usage_htab) + need > usage_max_entries)
		return false;
	return !failure ||
		usage_shared->failure_entries + need <= FAILURE_SHARE(usage_max_entries);
}

/* Insert a zeroed entry, or NULL; usage_lock held exclusively. */
static UsageEntry *
enter_entry(const UsageKey *uk)
{
	UsageEntry *entry;
	bool		found;

	entry = hash_search(usage_htab, uk, HASH_ENTER_NULL, &found);
	if (entry != NULL && !found)
	{
		SpinLockInit(&entry->mutex);
		entry->calls = 0;
		entry->last_at = 0;
		if (is_failure(uk))
			usage_shared->failure_entries++;
	}
	return entry;
}

/* Remove an entry (uk may point into it); usage_lock held exclusively. */
static void
remove_entry(const UsageKey *uk)
{
	bool		failure = is_failure(uk);

	if (hash_search(usage_htab, uk, HASH_REMOVE, NULL) != NULL && failure)
		usage_shared->failure_entries--;
}

static int
snap_by_last_at(const void *a, const void *b)
{
	TimestampTz ta = ((const UsageSnap *) a)->last_at;
	TimestampTz tb = ((const UsageSnap *) b)->last_at;

	return (ta > tb) - (ta < tb);
}

/*
 * Make room for need more entries (of failures, if failure), with
 * usage_lock held exclusively.  First whatever holds no count goes: empty
 * entries and tallies of past minutes.  Then, if still short, the oldest
 * sixteenth of the entries nobody will ever flush: every entry during
 * recovery, and otherwise those of databases that no longer have a writer
 * (flushers.c).  Entries a writer will flush are never evicted.
 */
static bool
make_room(bool failure, int need, TimestampTz now, bool recovery)
{
	HASH_SEQ_STATUS status;
	UsageEntry *entry;
	bool		only_failures;
	UsageSnap  *cand;
	int			ncand = 0;
	int			nevict;
	int			i;

	if (has_room(failure, need))
		return true;
	only_failures = failure &&
		usage_shared->failure_entries + need > FAILURE_SHARE(usage_max_entries);
	if (now >= usage_shared->swept_at[only_failures] &&
		now - usage_shared->swept_at[only_failures] < SWEEP_PAUSE)
		return false;

	hash_seq_init(&status, usage_htab);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->key.code == USAGE_TALLY ?
			bucket_is_stale(entry->key.bucket, now) : entry->calls == 0)
			remove_entry(&entry->key);
	}
	if (has_room(failure, need))
		return true;

	cand = palloc(sizeof(UsageSnap) * Max(hash_get_num_entries(usage_htab), 1));
	hash_seq_init(&status, usage_htab);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->key.code == USAGE_TALLY ||
			(!recovery && apikey_flushers_known(entry->key.dboid)) ||
			(only_failures && !is_failure(&entry->key)))
			continue;
		cand[ncand].key = entry->key;
		cand[ncand].calls = entry->calls;
		cand[ncand].last_at = entry->last_at;
		ncand++;
	}
	if (ncand == 0)
	{
		/* nothing to evict: do not scan again for every count */
		usage_shared->swept_at[only_failures] = now;
		if (!only_failures)
			usage_shared->swept_at[1] = now;
		pfree(cand);
		return false;
	}
	qsort(cand, ncand, sizeof(UsageSnap), snap_by_last_at);
	nevict = Min(Max(need, ncand / 16), ncand);
	for (i = 0; i < nevict; i++)
		remove_entry(&cand[i].key);
	pfree(cand);
	return has_room(failure, need);
}

/*
 * Find the entry to count uk in, creating it if there is room; with
 * usage_lock held exclusively.  A failure with an address gets an address
 * entry only while its key has had fewer than APIKEY_USAGE_MAX_ADDRS this
 * minute; otherwise (or without room for one) it is counted without the
 * address.  NULL: no room at all, the count is dropped.
 */
static UsageEntry *
find_or_admit(const UsageKey *uk, TimestampTz now, bool recovery)
{
	UsageKey	bare = *uk;
	UsageEntry *entry;

	entry = hash_search(usage_htab, uk, HASH_FIND, NULL);
	if (entry != NULL)
		return entry;

	if (uk->family != 0)
	{
		UsageKey	tk;
		UsageEntry *tally;

		memset(&tk, 0, sizeof(tk));
		tk.dboid = uk->dboid;
		tk.code = USAGE_TALLY;
		tk.key_id = uk->key_id;
		tk.bucket = uk->bucket;
		tally = hash_search(usage_htab, &tk, HASH_FIND, NULL);
		if ((tally == NULL || tally->calls < APIKEY_USAGE_MAX_ADDRS) &&
			make_room(true, tally == NULL ? 2 : 1, now, recovery) &&
			(tally = enter_entry(&tk)) != NULL &&
			(entry = enter_entry(uk)) != NULL)
		{
			tally->calls++;
			return entry;
		}
		bare.family = 0;
		bare.bits = 0;
		memset(bare.addr, 0, sizeof(bare.addr));
		entry = hash_search(usage_htab, &bare, HASH_FIND, NULL);
		if (entry != NULL)
			return entry;
	}
	if (!make_room(is_failure(&bare), 1, now, recovery))
		return NULL;
	return enter_entry(&bare);
}

/*
 * Add calls to uk's entry in the shared table (latest call at last_at).
 * Whose entries could be evicted is decided before taking the lock: no
 * catalog access under it.
 */
static void
add_shmem(const UsageKey *uk, int64 calls, TimestampTz last_at)
{
	UsageEntry *entry;

	LWLockAcquire(usage_shared->lock, LW_SHARED);
	entry = hash_search(usage_htab, uk, HASH_FIND, NULL);
	if (entry == NULL)
	{
		bool		recovery;

		LWLockRelease(usage_shared->lock);
		recovery = RecoveryInProgress();
		LWLockAcquire(usage_shared->lock, LW_EXCLUSIVE);
		entry = find_or_admit(uk, last_at, recovery);
		if (entry == NULL)
		{
			LWLockRelease(usage_shared->lock);
			apikey_stats_dropped(calls);
			return;
		}
	}
	SpinLockAcquire(&entry->mutex);
	entry->calls += calls;
	if (last_at > entry->last_at)
		entry->last_at = last_at;
	SpinLockRelease(&entry->mutex);
	LWLockRelease(usage_shared->lock);
}

/*
 * Count uk in this backend's own slot, without a lock and without writing
 * a cache line another backend writes per call.  False when the slot
 * cannot take it (no slot, a minute whose counts are not yet gathered, a
 * full table): the caller counts in the shared table instead.
 */
static bool
count_in_slot(const UsageKey *uk, TimestampTz now)
{
	SlotTable  *t;
	uint32		h;
	int			i;

	if (my_slot == NULL)
	{
		int			n = apikey_my_proc_number();

		if (n < 0 || n >= usage_shared->nslots)
			return false;
		my_slot = &usage_slots[n];
	}
	t = &my_slot->tables[(uk->bucket / USECS_PER_MINUTE) & 1];
	if (t->bucket != uk->bucket && !slot_table_restart(my_slot, t, uk->bucket))
		return false;

	h = hash_bytes((const unsigned char *) uk, sizeof(UsageKey));
	for (i = 0; i < SLOT_PROBES; i++)
	{
		SlotEntry  *e = &t->entries[(h + i) % SLOT_ENTRIES];

		if (e->gen != t->gen)
		{
			/* a free entry: claim it, under the slot's lock for gatherers */
			SpinLockAcquire(&my_slot->mutex);
			e->key = *uk;
			pg_atomic_write_u64(&e->calls, 0);
			pg_atomic_write_u64(&e->last_at, 0);
			e->gen = t->gen;
			SpinLockRelease(&my_slot->mutex);
		}
		else if (memcmp(&e->key, uk, sizeof(UsageKey)) != 0)
			continue;
		pg_atomic_fetch_add_u64(&e->calls, 1);
		pg_atomic_write_u64(&e->last_at, (uint64) now);
		return true;
	}
	return false;
}

/*
 * Start table t of this backend's slot on a new minute, if the gatherer
 * has taken every count of the minute it holds.
 */
static bool
slot_table_restart(BackendSlot *slot, SlotTable *t, TimestampTz bucket)
{
	int			i;

	if (bucket < t->bucket)
		return false;			/* the clock went back: count it shared */
	for (i = 0; i < SLOT_ENTRIES; i++)
	{
		if (t->entries[i].gen == t->gen &&
			pg_atomic_read_u64(&t->entries[i].calls) != 0)
			return false;
	}
	SpinLockAcquire(&slot->mutex);
	t->gen++;
	t->bucket = bucket;
	SpinLockRelease(&slot->mutex);
	return true;
}

/*
 * Move every backend slot's counts into the shared table.  A count is
 * taken from its slot entry by an atomic exchange, so a call counted
 * meanwhile goes to this gathering or the next, never both or neither.
 * The counts enter the shared table oldest first, so that when it is full
 * the entries make_room() evicts are the oldest of all slots, not whichever
 * a slot's hash order happened to put first.
 *
 * Between taking counts from the slots and adding them to the table they
 * are in this backend's memory only, where nobody else sees them.  So the
 * caller holds gather_lock, from before this until it has read the table:
 * a flush that reads the table while another backend gathers would miss
 * calls made before it began (and a writer's last flush, when it leaves
 * its database or the server shuts down, would leave them behind).
 */
static void
gather_slots(void)
{
	int			cap = SLOT_ENTRIES * 2;
	UsageSnap  *taken = palloc(sizeof(UsageSnap) * cap);
	int			n = 0;
	int			s;
	int			i;

	Assert(LWLockHeldByMeInMode(usage_shared->gather_lock, LW_EXCLUSIVE));
	for (s = 0; s < usage_shared->nslots; s++)
	{
		BackendSlot *slot = &usage_slots[s];
		int			ti;

		if (n + SLOT_ENTRIES * 2 > cap)
		{
			cap *= 2;
			taken = repalloc(taken, sizeof(UsageSnap) * cap);
		}
		SpinLockAcquire(&slot->mutex);
		for (ti = 0; ti < 2; ti++)
		{
			SlotTable  *t = &slot->tables[ti];

			for (i = 0; i < SLOT_ENTRIES; i++)
			{
				SlotEntry  *e = &t->entries[i];
				uint64		calls;

				if (e->gen != t->gen ||
					pg_atomic_read_u64(&e->calls) == 0)
					continue;
				calls = pg_atomic_exchange_u64(&e->calls, 0);
				taken[n].key = e->key;
				taken[n].calls = (int64) calls;
				taken[n].last_at = (TimestampTz) pg_atomic_read_u64(&e->last_at);
				n++;
			}
		}
		SpinLockRelease(&slot->mutex);
	}
	if (n > 1)
		qsort(taken, n, sizeof(UsageSnap), snap_by_last_at);
	for (i = 0; i < n; i++)
		add_shmem(&taken[i].key, taken[i].calls, taken[i].last_at);
	pfree(taken);
}

/* Rebuild an inet datum from a usage key, or NULL. */
static inet *
usage_addr(const UsageKey *uk)
{
	inet	   *res;

	if (uk->family == 0)
		return NULL;
	res = palloc0(sizeof(inet));
	ip_family(res) = uk->family;
	ip_bits(res) = uk->bits;
	memcpy(ip_addr(res), uk->addr, ip_addrsize(res));
	SET_INET_VARSIZE(res);
	return res;
}

/* apikey.usage_pending, or InvalidOid before the 1.2 update. */
static Oid
pending_relid(void)
{
	Oid			keys = apikey_keystore_keys_relid(true);

	if (!OidIsValid(keys))
		return InvalidOid;
	return get_relname_relid("usage_pending", get_rel_namespace(keys));
}

typedef struct SyncUsage
{
	const UsageKey *uk;
	inet	   *addr;
	TimestampTz now;
} SyncUsage;

/* The key, minute, code and address of one call, as SPI parameters $1-$4. */
static void
sync_usage_params(const SyncUsage *su, Datum *values, char *nulls)
{
	values[0] = Int64GetDatum(su->uk->key_id);
	nulls[0] = su->uk->key_id == 0 ? 'n' : ' ';
	values[1] = TimestampTzGetDatum(su->uk->bucket);
	values[2] = CStringGetTextDatum(apikey_verdict_name(su->uk->code));
	values[3] = PointerGetDatum(su->addr);
	nulls[3] = su->addr == NULL ? 'n' : ' ';
}

/* Append one pending row: an insert into a table without indexes. */
static void
write_pending(void *arg)
{
	SyncUsage  *su = arg;
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};
	Oid			types[5] = {INT8OID, TIMESTAMPTZOID, TEXTOID, INETOID, TIMESTAMPTZOID};
	int			rc;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	apikey_prepare_kept(&pending_insert_plan,
						"INSERT INTO apikey.usage_pending (key_id, bucket, code, client_addr, used_at) "
						"VALUES ($1, $2, $3, $4, $5)",
						5, types);
	sync_usage_params(su, values, nulls);
	values[4] = TimestampTzGetDatum(su->now);
	rc = SPI_execute_plan(pending_insert_plan, values, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "usage insert failed: %s", SPI_result_code_string(rc));
	SPI_finish();
}

/*
 * The synchronous write of the SQL before 1.2, which has no usage_pending:
 * an upsert into usage_log and last_used_at at most once a minute, as
 * those versions did, until ALTER EXTENSION apikey UPDATE.
 */
static void
write_legacy(void *arg)
{
	SyncUsage  *su = arg;
	Datum		values[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};
	Oid			insert_types[4] = {INT8OID, TIMESTAMPTZOID, TEXTOID, INETOID};
	Oid			update_types[1] = {INT8OID};
	int			rc;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	apikey_prepare_kept(&legacy_insert_plan,
						"INSERT INTO apikey.usage_log AS u (key_id, bucket, code, client_addr, calls) "
						"VALUES ($1, $2, $3, $4, 1) "
						"ON CONFLICT ((COALESCE(key_id, 0)), bucket, code, "
						"(COALESCE(client_addr, '0.0.0.0/0'::pg_catalog.inet))) "
						"DO UPDATE SET calls = u.calls OPERATOR(pg_catalog.+) 1",
						4, insert_types);
	sync_usage_params(su, values, nulls);
	rc = SPI_execute_plan(legacy_insert_plan, values, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "usage insert failed: %s", SPI_result_code_string(rc));
	if (su->uk->code == APIKEY_VALID)
	{
		apikey_prepare_kept(&legacy_last_used_plan,
							"UPDATE apikey.keys SET last_used_at = pg_catalog.now() "
							"WHERE id OPERATOR(pg_catalog.=) $1 AND (last_used_at IS NULL "
							"OR last_used_at OPERATOR(pg_catalog.<) "
							"(pg_catalog.now() OPERATOR(pg_catalog.-) '1 minute'::pg_catalog.interval))",
							1, update_types);
		rc = SPI_execute_plan(legacy_last_used_plan, values, NULL, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "last_used_at update failed: %s", SPI_result_code_string(rc));
	}
	SPI_finish();
}

/*
 * Count one verification.  addr is the client address to record with a
 * known key's failure (may be NULL); successes and tokens that match no
 * key are counted without it.
 */
void
apikey_usage_count(const ApikeyVerdict *verdict, inet *addr, TimestampTz now)
{
	UsageKey	uk;

	apikey_stats_count(verdict->code);

	memset(&uk, 0, sizeof(uk));
	uk.dboid = MyDatabaseId;
	uk.code = verdict->code;
	uk.key_id = verdict->key ? verdict->key->key_id : 0;
	uk.bucket = now - now % USECS_PER_MINUTE;
	if (verdict->code == APIKEY_VALID || uk.key_id == 0)
		addr = NULL;
	if (addr != NULL)
	{
		uk.family = ip_family(addr);
		uk.bits = ip_bits(addr);
		memcpy(uk.addr, ip_addr(addr), ip_addrsize(addr));
	}

	if (apikey_usage_in_shmem())
	{
		if (addr != NULL || !count_in_slot(&uk, now))
			add_shmem(&uk, 1, now);
	}
	else if (!XactReadOnly && !RecoveryInProgress() && !IsInParallelMode() &&
			 OidIsValid(apikey_keystore_keys_relid(true)))
	{
		SyncUsage	su = {&uk, addr, now};

		apikey_run_as_owner(OidIsValid(pending_relid()) ? write_pending : write_legacy,
							&su);
	}
}

/*
 * The one statement that writes usage.  The CTE src(k, b, c, a, n, l) —
 * key id, minute, code, address, calls, latest valid call (NULL for
 * failures) — comes first, from arrays or from pending rows.  An address
 * new to usage_log for its key and minute is kept only while the key has
 * at most APIKEY_USAGE_MAX_ADDRS there (the busiest first); the others are
 * written with the address NULL.  last_used_at moves forward, skipping key
 * rows locked by someone else (it is informational: never worth a wait).
 */
#define WRITE_USAGE \
	"fresh AS (SELECT d.k, d.b, d.a, " \
	"                 pg_catalog.row_number() OVER (PARTITION BY d.k, d.b ORDER BY d.n DESC, d.a) " \
	"                 OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(DISTINCT l.client_addr) " \
	"                   FROM apikey.usage_log l WHERE l.key_id OPERATOR(pg_catalog.=) d.k " \
	"                    AND l.bucket OPERATOR(pg_catalog.=) d.b) AS pos " \
	"            FROM (SELECT s.k, s.b, s.a, pg_catalog.sum(s.n) AS n FROM src s " \
	"                   WHERE s.k IS NOT NULL AND s.a IS NOT NULL GROUP BY 1, 2, 3) d " \
	"           WHERE NOT EXISTS (SELECT FROM apikey.usage_log l " \
	"                  WHERE l.key_id OPERATOR(pg_catalog.=) d.k AND l.bucket OPERATOR(pg_catalog.=) d.b " \
	"                    AND l.client_addr OPERATOR(pg_catalog.=) d.a)), " \
	"used AS (UPDATE apikey.keys k SET last_used_at = x.l " \
	"           FROM (SELECT kk.id, m.l " \
	"                   FROM (SELECT s.k, pg_catalog.max(s.l) AS l FROM src s " \
	"                          WHERE s.l IS NOT NULL GROUP BY s.k) m " \
	"                   JOIN apikey.keys kk ON kk.id OPERATOR(pg_catalog.=) m.k " \
	"                  WHERE kk.last_used_at IS NULL OR kk.last_used_at OPERATOR(pg_catalog.<) m.l " \
	"                    FOR NO KEY UPDATE OF kk SKIP LOCKED) x " \
	"          WHERE k.id OPERATOR(pg_catalog.=) x.id) " \
	"INSERT INTO apikey.usage_log AS u (key_id, bucket, code, client_addr, calls) " \
	"SELECT r.k, r.b, r.c, r.a, pg_catalog.sum(r.n) " \
	"  FROM (SELECT s.k, s.b, s.c, s.n, " \
	"               CASE WHEN s.k IS NULL OR s.a IS NULL THEN NULL " \
	"                    WHEN EXISTS (SELECT FROM fresh f WHERE f.k OPERATOR(pg_catalog.=) s.k " \
	"                           AND f.b OPERATOR(pg_catalog.=) s.b AND f.a OPERATOR(pg_catalog.=) s.a " \
	"                           AND f.pos OPERATOR(pg_catalog.>) " CppAsString2(APIKEY_USAGE_MAX_ADDRS) ") " \
	"                    THEN NULL ELSE s.a END AS a " \
	"          FROM src s) r " \
	" GROUP BY 1, 2, 3, 4 " \
	"ON CONFLICT ((COALESCE(key_id, 0)), bucket, code, " \
	"(COALESCE(client_addr, '0.0.0.0/0'::pg_catalog.inet))) " \
	"DO UPDATE SET calls = u.calls OPERATOR(pg_catalog.+) excluded.calls"

/* src from six arrays: $1 key ids ... $6 latest valid calls */
#define ARRAY_SOURCE \
	"WITH src AS (SELECT * FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), " \
	"pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5), " \
	"pg_catalog.unnest($6)) AS s(k, b, c, a, n, l)), "

/* src from every committed pending row no other folder holds, deleted */
#define PENDING_SOURCE \
	"WITH picked AS (SELECT p.ctid AS t FROM apikey.usage_pending p FOR UPDATE SKIP LOCKED), " \
	"taken AS (DELETE FROM apikey.usage_pending p USING picked " \
	"           WHERE p.ctid OPERATOR(pg_catalog.=) picked.t " \
	"          RETURNING p.key_id, p.bucket, p.code, p.client_addr, p.used_at), " \
	"src AS (SELECT t.key_id AS k, t.bucket AS b, t.code AS c, t.client_addr AS a, " \
	"               pg_catalog.count(*) AS n, pg_catalog.max(t.used_at) " \
	"               FILTER (WHERE t.code OPERATOR(pg_catalog.=) 'valid') AS l " \
	"          FROM taken t GROUP BY 1, 2, 3, 4), "

/* Write snaps to usage_log and last_used_at; returns usage_log rows written. */
static int
write_snaps(const UsageSnap *snaps, int n)
{
	Datum	   *key_ids = palloc(sizeof(Datum) * n);
	Datum	   *buckets = palloc(sizeof(Datum) * n);
	Datum	   *codes = palloc(sizeof(Datum) * n);
	Datum	   *addrs = palloc(sizeof(Datum) * n);
	Datum	   *calls = palloc(sizeof(Datum) * n);
	Datum	   *last_ats = palloc(sizeof(Datum) * n);
	bool	   *key_nulls = palloc(sizeof(bool) * n);
	bool	   *addr_nulls = palloc(sizeof(bool) * n);
	bool	   *last_nulls = palloc(sizeof(bool) * n);
	int			dims[1] = {n};
	int			lbs[1] = {1};
	int			save_nestlevel;
	Datum		values[6];
	Oid			types[6] = {INT8ARRAYOID, TIMESTAMPTZARRAYOID, TEXTARRAYOID,
	INETARRAYOID, INT8ARRAYOID, TIMESTAMPTZARRAYOID};
	int			rc;
	int			i;

	for (i = 0; i < n; i++)
	{
		inet	   *a = usage_addr(&snaps[i].key);

		key_ids[i] = Int64GetDatum(snaps[i].key.key_id);
		key_nulls[i] = (snaps[i].key.key_id == 0);
		buckets[i] = TimestampTzGetDatum(snaps[i].key.bucket);
		codes[i] = CStringGetTextDatum(apikey_verdict_name(snaps[i].key.code));
		addrs[i] = PointerGetDatum(a);
		addr_nulls[i] = (a == NULL);
		calls[i] = Int64GetDatum(snaps[i].calls);
		last_ats[i] = TimestampTzGetDatum(snaps[i].last_at);
		last_nulls[i] = (snaps[i].key.code != APIKEY_VALID || snaps[i].key.key_id == 0);
	}
	values[0] = PointerGetDatum(construct_md_array(key_ids, key_nulls, 1, dims, lbs,
												   INT8OID, 8, true, TYPALIGN_DOUBLE));
	values[1] = PointerGetDatum(construct_array(buckets, n, TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE));
	values[2] = PointerGetDatum(construct_array(codes, n, TEXTOID, -1, false, TYPALIGN_INT));
	values[3] = PointerGetDatum(construct_md_array(addrs, addr_nulls, 1, dims, lbs,
												   INETOID, -1, false, TYPALIGN_INT));
	values[4] = PointerGetDatum(construct_array(calls, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
	values[5] = PointerGetDatum(construct_md_array(last_ats, last_nulls, 1, dims, lbs,
												   TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE));

	save_nestlevel = NewGUCNestLevel();
	apikey_audit_mark_usage_write();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	rc = SPI_execute_with_args(ARRAY_SOURCE WRITE_USAGE, 6, types, values, NULL, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "usage flush failed: %s", SPI_result_code_string(rc));
	rc = (int) SPI_processed;
	SPI_finish();
	AtEOXact_GUC(true, save_nestlevel);
	return rc;
}

/* Copy this database's entries that hold counts; returns how many. */
static int
usage_snapshot(UsageSnap **out)
{
	HASH_SEQ_STATUS status;
	UsageEntry *entry;
	int			n = 0;
	int			cap;
	UsageSnap  *snaps;

	LWLockAcquire(usage_shared->gather_lock, LW_EXCLUSIVE);
	gather_slots();
	LWLockAcquire(usage_shared->lock, LW_SHARED);
	cap = Max(hash_get_num_entries(usage_htab), 1);
	snaps = palloc(sizeof(UsageSnap) * cap);
	hash_seq_init(&status, usage_htab);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->key.dboid != MyDatabaseId || entry->key.code == USAGE_TALLY ||
			n >= cap)
			continue;
		snaps[n].key = entry->key;
		SpinLockAcquire(&entry->mutex);
		snaps[n].calls = entry->calls;
		snaps[n].last_at = entry->last_at;
		SpinLockRelease(&entry->mutex);
		if (snaps[n].calls > 0)
			n++;
	}
	LWLockRelease(usage_shared->lock);
	LWLockRelease(usage_shared->gather_lock);
	*out = snaps;
	return n;
}

/*
 * Take flushed calls off the counters.  An entry that reaches zero goes,
 * except an address entry of a minute not yet over, which keeps its
 * address's place among its key's few.
 */
static void
usage_subtract(const UsageSnap *snaps, int n)
{
	TimestampTz now = GetCurrentTimestamp();
	int			i;

	LWLockAcquire(usage_shared->lock, LW_EXCLUSIVE);
	for (i = 0; i < n; i++)
	{
		UsageEntry *entry = hash_search(usage_htab, &snaps[i].key, HASH_FIND, NULL);

		if (entry == NULL)
			continue;
		entry->calls -= snaps[i].calls;
		if (entry->calls <= 0 &&
			(entry->key.family == 0 || bucket_is_stale(entry->key.bucket, now)))
			remove_entry(&snaps[i].key);
	}
	LWLockRelease(usage_shared->lock);
}

/*
 * Write this database's shared counters into apikey.usage_log and bump
 * keys.last_used_at.  Only the usage writer calls this, once per
 * transaction of its own: what was written comes off the counters when
 * that transaction commits; if it aborts the counters stay for the next
 * attempt, so nothing is lost or counted twice.  Returns the number of
 * usage rows written.
 */
int
apikey_usage_flush_shared(void)
{
	UsageSnap  *snaps;
	int			n;
	int			rows;
	uint64		total = 0;
	int			i;

	if (usage_shared == NULL || usage_htab == NULL || flush_pending != NULL)
		return 0;
	if (!xact_callback_registered)
	{
		RegisterXactCallback(usage_xact_callback, NULL);
		xact_callback_registered = true;
	}

	n = usage_snapshot(&snaps);
	if (n == 0)
		return 0;
	for (i = 0; i < n; i++)
		total += snaps[i].calls;
	rows = write_snaps(snaps, n);

	/* subtract when, and only if, this transaction commits */
	flush_pending = MemoryContextAlloc(TopMemoryContext, sizeof(UsageSnap) * n);
	memcpy(flush_pending, snaps, sizeof(UsageSnap) * n);
	flush_pending_n = n;
	flush_pending_calls = total;
	return rows;
}

/*
 * Finish a flush at the end of its transaction: on commit the written calls
 * come off the shared counters; on abort they stay, to be written again.
 */
static void
usage_xact_callback(XactEvent event, void *arg)
{
	if (flush_pending == NULL)
		return;
	if (event == XACT_EVENT_COMMIT)
	{
		usage_subtract(flush_pending, flush_pending_n);
		apikey_stats_flushed(flush_pending_calls, true);
	}
	else if (event != XACT_EVENT_ABORT)
		return;
	pfree(flush_pending);
	flush_pending = NULL;
	flush_pending_n = 0;
}

/*
 * Fold committed rows of apikey.usage_pending into usage_log and
 * last_used_at, in the caller's transaction (as the tables' owner).  It is
 * all MVCC: if that transaction or a subtransaction around this rolls
 * back, the pending rows are there again.  One folder at a time per
 * database, under a transaction-level advisory lock (FOLD_LOCK_*); it is
 * only tried, never waited for, so a folder left idle in its transaction
 * stops nobody.
 * JIT is off for it: compiling the statement costs more than running it.
 * Returns usage rows written, or -1 when another session is folding.
 */
int
apikey_usage_fold_pending(void)
{
	LOCKTAG		tag;
	int			save_nestlevel;
	int			rc;

	if (!OidIsValid(pending_relid()))
		return 0;
	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, FOLD_LOCK_KEY1, FOLD_LOCK_KEY2,
						 FOLD_LOCK_SPACE);
	if (LockAcquire(&tag, ExclusiveLock, false, true) == LOCKACQUIRE_NOT_AVAIL)
		return -1;

	save_nestlevel = NewGUCNestLevel();
	(void) set_config_option("jit", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	apikey_audit_mark_usage_write();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	rc = SPI_execute(PENDING_SOURCE WRITE_USAGE, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "usage fold failed: %s", SPI_result_code_string(rc));
	rc = (int) SPI_processed;
	SPI_finish();
	AtEOXact_GUC(true, save_nestlevel);
	return rc;
}

/* Number of entries in shared memory holding counts (all databases). */
uint64
apikey_usage_pending(void)
{
	HASH_SEQ_STATUS status;
	UsageEntry *entry;
	uint64		n = 0;

	if (usage_shared == NULL || usage_htab == NULL)
		return 0;
	LWLockAcquire(usage_shared->gather_lock, LW_EXCLUSIVE);
	gather_slots();
	LWLockAcquire(usage_shared->lock, LW_SHARED);
	hash_seq_init(&status, usage_htab);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->key.code != USAGE_TALLY && entry->calls > 0)
			n++;
	}
	LWLockRelease(usage_shared->lock);
	LWLockRelease(usage_shared->gather_lock);
	return n;
}

/* Rows for apikey.live_usage: this database's unflushed counters. */
void
apikey_usage_list(Tuplestorestate *tupstore, TupleDesc tupdesc)
{
	UsageSnap  *snaps;
	int			n;
	int			i;

	if (usage_shared == NULL || usage_htab == NULL)
		return;
	n = usage_snapshot(&snaps);
	for (i = 0; i < n; i++)
	{
		Datum		values[5];
		bool		nulls[5] = {false, false, false, false, false};
		inet	   *a = usage_addr(&snaps[i].key);

		values[0] = Int64GetDatum(snaps[i].key.key_id);
		nulls[0] = (snaps[i].key.key_id == 0);
		values[1] = TimestampTzGetDatum(snaps[i].key.bucket);
		values[2] = CStringGetTextDatum(apikey_verdict_name(snaps[i].key.code));
		values[3] = PointerGetDatum(a);
		nulls[3] = (a == NULL);
		values[4] = Int64GetDatum(snaps[i].calls);
		tuplestore_putvalues(tupstore, tupdesc, values, nulls);
	}
}
