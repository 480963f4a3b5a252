/*-------------------------------------------------------------------------
 *
 * usage.c
 *	  Count every verification, per (key, minute, code), plus the client
 *	  address for failures.
 *
 * With shared memory, in the database named by apikey.database (and in
 * every database on a hot standby), a call is one increment of a shared
 * counter: no write, no WAL, and nothing the caller's ROLLBACK can undo.
 * The background worker (worker.c) persists the counters into
 * apikey.usage_log.  When the table is full the count is dropped and the
 * drop itself is counted in apikey.stats; verification never waits for
 * room.
 *
 * Elsewhere (no shared_preload_libraries, or another database) the call is
 * written synchronously, in the caller's transaction, with an upsert run as
 * the extension's owner, and a successful call sets keys.last_used_at (at
 * most once a minute per key).  In a read-only transaction nothing is
 * written.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/socket.h>

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inet.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "shmem.h"

typedef struct UsageKey
{
	Oid			dboid;
	int32		code;
	int64		key_id;			/* 0 = no key */
	TimestampTz bucket;			/* start of the minute */
	uint8		family;			/* 0 = no address */
	uint8		bits;
	uint8		addr[16];
} UsageKey;

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

static HTAB *usage_htab = NULL;
static SPIPlanPtr usage_insert_plan = NULL;
static SPIPlanPtr last_used_plan = NULL;

/* calls written by this transaction's flush, subtracted at commit */
static UsageSnap *flush_pending = NULL;
static int	flush_pending_n = 0;
static uint64 flush_pending_calls = 0;
static bool xact_callback_registered = false;

static void usage_xact_callback(XactEvent event, void *arg);

Size
apikey_usage_shmem_size(void)
{
	return hash_estimate_size(apikey_usage_max_entries, sizeof(UsageEntry));
}

/* Called from shmem_startup with AddinShmemInitLock held. */
void
apikey_usage_shmem_startup(void)
{
	HASHCTL		info;

	info.keysize = sizeof(UsageKey);
	info.entrysize = sizeof(UsageEntry);
	usage_htab = ShmemInitHash("apikey usage",
							   apikey_usage_max_entries,
							   apikey_usage_max_entries,
							   &info, HASH_ELEM | HASH_BLOBS);
}

/* Does this backend count in shared memory, or write synchronously? */
static bool
count_in_shmem(void)
{
	static Oid	worker_db = InvalidOid;
	static bool resolved = false;

	if (apikey_shared == NULL || usage_htab == NULL)
		return false;
	if (RecoveryInProgress())
		return true;
	if (!resolved)
	{
		worker_db = get_database_oid(apikey_database, true);
		resolved = true;
	}
	return MyDatabaseId == worker_db;
}

static void
count_shmem(const UsageKey *uk, TimestampTz now)
{
	UsageEntry *entry;

	LWLockAcquire(apikey_shared->usage_lock, LW_SHARED);
	entry = hash_search(usage_htab, uk, HASH_FIND, NULL);
	if (entry == NULL)
	{
		bool		found;

		LWLockRelease(apikey_shared->usage_lock);
		LWLockAcquire(apikey_shared->usage_lock, LW_EXCLUSIVE);
		entry = hash_search(usage_htab, uk, HASH_FIND, NULL);
		if (entry == NULL)
		{
			if (hash_get_num_entries(usage_htab) >= apikey_usage_max_entries)
			{
				LWLockRelease(apikey_shared->usage_lock);
				pg_atomic_fetch_add_u64(&apikey_shared->usage_dropped, 1);
				return;
			}
			entry = hash_search(usage_htab, uk, HASH_ENTER, &found);
			SpinLockInit(&entry->mutex);
			entry->calls = 0;
			entry->last_at = 0;
		}
	}
	SpinLockAcquire(&entry->mutex);
	entry->calls++;
	if (now > entry->last_at)
		entry->last_at = now;
	SpinLockRelease(&entry->mutex);
	LWLockRelease(apikey_shared->usage_lock);
}

typedef struct SyncUsage
{
	const UsageKey *uk;
	inet	   *addr;
} SyncUsage;

static void
write_sync(void *arg)
{
	SyncUsage  *su = arg;
	Datum		values[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};
	Oid			insert_types[4] = {INT8OID, TIMESTAMPTZOID, TEXTOID, INETOID};
	Oid			update_types[1] = {INT8OID};
	int			rc;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	apikey_prepare_kept(&usage_insert_plan,
						"INSERT INTO apikey.usage_log AS u (key_id, bucket, code, client_addr, calls) "
						"VALUES ($1, $2, $3, $4, 1) "
						"ON CONFLICT ((COALESCE(key_id, 0)), bucket, code, "
						"(COALESCE(client_addr, '0.0.0.0/0'::pg_catalog.inet))) "
						"DO UPDATE SET calls = u.calls OPERATOR(pg_catalog.+) 1",
						4, insert_types);
	values[0] = Int64GetDatum(su->uk->key_id);
	nulls[0] = su->uk->key_id == 0 ? 'n' : ' ';
	values[1] = TimestampTzGetDatum(su->uk->bucket);
	values[2] = CStringGetTextDatum(apikey_code_names[su->uk->code]);
	values[3] = PointerGetDatum(su->addr);
	nulls[3] = su->addr == NULL ? 'n' : ' ';
	rc = SPI_execute_plan(usage_insert_plan, values, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "usage insert failed: %s", SPI_result_code_string(rc));

	/* last_used_at, at most once a minute per key to spare the row */
	if (su->uk->code == APIKEY_VALID)
	{
		apikey_prepare_kept(&last_used_plan,
							"UPDATE apikey.keys SET last_used_at = pg_catalog.now() "
							"WHERE id OPERATOR(pg_catalog.=) $1 AND (last_used_at IS NULL "
							"OR last_used_at OPERATOR(pg_catalog.<) "
							"(pg_catalog.now() OPERATOR(pg_catalog.-) '1 minute'::pg_catalog.interval))",
							1, update_types);
		rc = SPI_execute_plan(last_used_plan, values, NULL, false, 0);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "last_used_at update failed: %s", SPI_result_code_string(rc));
	}
	SPI_finish();
}

/*
 * Count one verification.  addr is the client address to record with a
 * failure (may be NULL); successes are counted without it.
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
	if (verdict->code == APIKEY_VALID)
		addr = NULL;
	if (addr != NULL)
	{
		uk.family = ip_family(addr);
		uk.bits = ip_bits(addr);
		memcpy(uk.addr, ip_addr(addr), ip_addrsize(addr));
	}

	if (count_in_shmem())
		count_shmem(&uk, now);
	else if (!XactReadOnly && !RecoveryInProgress() && !IsInParallelMode() &&
			 OidIsValid(apikey_keystore_keys_relid(true)))
	{
		SyncUsage	su = {&uk, addr};

		apikey_run_as_owner(write_sync, &su);
	}
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

/* Copy this database's entries; returns how many, array in *out. */
static int
usage_snapshot(UsageSnap **out)
{
	HASH_SEQ_STATUS status;
	UsageEntry *entry;
	int			n = 0;
	int			cap;
	UsageSnap  *snaps;

	LWLockAcquire(apikey_shared->usage_lock, LW_SHARED);
	cap = Max(hash_get_num_entries(usage_htab), 1);
	snaps = palloc(sizeof(UsageSnap) * cap);
	hash_seq_init(&status, usage_htab);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->key.dboid != MyDatabaseId || n >= cap)
			continue;
		snaps[n].key = entry->key;
		SpinLockAcquire(&entry->mutex);
		snaps[n].calls = entry->calls;
		snaps[n].last_at = entry->last_at;
		SpinLockRelease(&entry->mutex);
		if (snaps[n].calls > 0)
			n++;
	}
	LWLockRelease(apikey_shared->usage_lock);
	*out = snaps;
	return n;
}

/* Take flushed calls off the counters and drop entries that reach zero. */
static void
usage_subtract(const UsageSnap *snaps, int n)
{
	int			i;

	LWLockAcquire(apikey_shared->usage_lock, LW_EXCLUSIVE);
	for (i = 0; i < n; i++)
	{
		UsageEntry *entry = hash_search(usage_htab, &snaps[i].key, HASH_FIND, NULL);

		if (entry == NULL)
			continue;
		entry->calls -= snaps[i].calls;
		if (entry->calls <= 0)
			hash_search(usage_htab, &snaps[i].key, HASH_REMOVE, NULL);
	}
	LWLockRelease(apikey_shared->usage_lock);
}

/*
 * Write this database's pending counters into apikey.usage_log and bump
 * keys.last_used_at, in the caller's transaction.  What was written comes
 * off the counters when that transaction commits; if it aborts the
 * counters stay for the next attempt, so nothing is lost or counted twice.
 * Returns the number of usage rows written.
 */
int
apikey_usage_flush(void)
{
	UsageSnap  *snaps;
	int			n;
	int			i;
	Datum	   *key_ids;
	Datum	   *buckets;
	Datum	   *codes;
	Datum	   *addrs;
	Datum	   *calls;
	Datum	   *last_ats;
	bool	   *key_nulls;
	bool	   *addr_nulls;
	int			dims[1];
	int			lbs[1] = {1};
	Datum		values[6];
	Oid			types[6] = {INT8ARRAYOID, TIMESTAMPTZARRAYOID, TEXTARRAYOID,
	INETARRAYOID, INT8ARRAYOID, TIMESTAMPTZARRAYOID};
	uint64		total = 0;
	int			rc;

	if (apikey_shared == NULL || usage_htab == NULL)
		return 0;
	if (flush_pending != NULL)
		return 0;				/* one flush per transaction */
	if (!xact_callback_registered)
	{
		RegisterXactCallback(usage_xact_callback, NULL);
		xact_callback_registered = true;
	}
	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("cannot flush usage during recovery"),
				 errdetail("Usage counted on a standby is shown by apikey.live_usage and is not persisted.")));

	/*
	 * One flush at a time per database, from reading the counters until the
	 * subtraction at commit: otherwise two flushers (the worker and
	 * flush_usage(), say) would both write the same calls.  The lock is a
	 * transaction-level advisory lock in a field4 space (3) that the SQL
	 * advisory-lock functions never use.
	 */
	{
		LOCKTAG		tag;

		SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, 0x61706b79, 0x75736167, 3);
		(void) LockAcquire(&tag, ExclusiveLock, false, false);
	}

	n = usage_snapshot(&snaps);
	if (n == 0)
		return 0;

	key_ids = palloc(sizeof(Datum) * n);
	buckets = palloc(sizeof(Datum) * n);
	codes = palloc(sizeof(Datum) * n);
	addrs = palloc(sizeof(Datum) * n);
	calls = palloc(sizeof(Datum) * n);
	last_ats = palloc(sizeof(Datum) * n);
	key_nulls = palloc(sizeof(bool) * n);
	addr_nulls = palloc(sizeof(bool) * n);
	for (i = 0; i < n; i++)
	{
		inet	   *a = usage_addr(&snaps[i].key);

		key_ids[i] = Int64GetDatum(snaps[i].key.key_id);
		key_nulls[i] = (snaps[i].key.key_id == 0);
		buckets[i] = TimestampTzGetDatum(snaps[i].key.bucket);
		codes[i] = CStringGetTextDatum(apikey_code_names[snaps[i].key.code]);
		addrs[i] = PointerGetDatum(a);
		addr_nulls[i] = (a == NULL);
		calls[i] = Int64GetDatum(snaps[i].calls);
		last_ats[i] = TimestampTzGetDatum(snaps[i].key.code == APIKEY_VALID ?
										  snaps[i].last_at : 0);
		total += snaps[i].calls;
	}
	dims[0] = n;
	values[0] = PointerGetDatum(construct_md_array(key_ids, key_nulls, 1, dims, lbs,
												   INT8OID, 8, true, TYPALIGN_DOUBLE));
	values[1] = PointerGetDatum(construct_array(buckets, n, TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE));
	values[2] = PointerGetDatum(construct_array(codes, n, TEXTOID, -1, false, TYPALIGN_INT));
	values[3] = PointerGetDatum(construct_md_array(addrs, addr_nulls, 1, dims, lbs,
												   INETOID, -1, false, TYPALIGN_INT));
	values[4] = PointerGetDatum(construct_array(calls, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
	values[5] = PointerGetDatum(construct_array(last_ats, n, TIMESTAMPTZOID, 8, true, TYPALIGN_DOUBLE));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	rc = SPI_execute_with_args(
		"INSERT INTO apikey.usage_log AS u (key_id, bucket, code, client_addr, calls) "
		"SELECT k, b, c, a, n FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), "
		"pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5)) AS t(k, b, c, a, n) "
		"ON CONFLICT ((COALESCE(key_id, 0)), bucket, code, "
		"(COALESCE(client_addr, '0.0.0.0/0'::pg_catalog.inet))) "
		"DO UPDATE SET calls = u.calls OPERATOR(pg_catalog.+) excluded.calls",
		5, types, values, NULL, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "usage flush failed: %s", SPI_result_code_string(rc));
	rc = SPI_execute_with_args(
		"UPDATE apikey.keys k SET last_used_at = t.last_at "
		"FROM (SELECT i AS key_id, pg_catalog.max(l) AS last_at "
		"      FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($6)) AS u(i, l) "
		"      WHERE i IS NOT NULL AND l OPERATOR(pg_catalog.>) '2000-01-01' GROUP BY i) t "
		"WHERE k.id OPERATOR(pg_catalog.=) t.key_id "
		"  AND (k.last_used_at IS NULL OR k.last_used_at OPERATOR(pg_catalog.<) t.last_at)",
		6, types, values, NULL, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "last_used_at update failed: %s", SPI_result_code_string(rc));
	SPI_finish();

	/* subtract when, and only if, this transaction commits */
	flush_pending = MemoryContextAlloc(TopMemoryContext, sizeof(UsageSnap) * n);
	memcpy(flush_pending, snaps, sizeof(UsageSnap) * n);
	flush_pending_n = n;
	flush_pending_calls = total;
	return n;
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

/* Number of entries pending in shared memory (all databases). */
uint64
apikey_usage_pending(void)
{
	long		n;

	if (apikey_shared == NULL || usage_htab == NULL)
		return 0;
	LWLockAcquire(apikey_shared->usage_lock, LW_SHARED);
	n = hash_get_num_entries(usage_htab);
	LWLockRelease(apikey_shared->usage_lock);
	return (uint64) n;
}

/* Rows for apikey.live_usage: this database's unflushed counters. */
void
apikey_usage_list(Tuplestorestate *tupstore, TupleDesc tupdesc)
{
	UsageSnap  *snaps;
	int			n;
	int			i;

	if (apikey_shared == NULL || usage_htab == NULL)
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
		values[2] = CStringGetTextDatum(apikey_code_names[snaps[i].key.code]);
		values[3] = PointerGetDatum(a);
		nulls[3] = (a == NULL);
		values[4] = Int64GetDatum(snaps[i].calls);
		tuplestore_putvalues(tupstore, tupdesc, values, nulls);
	}
}
