/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The usage writers: a launcher, and in every database where apikey is
 *	  installed a flusher that persists that database's shared usage
 *	  counters, and folds its pending rows, into apikey.usage_log every
 *	  apikey.usage_flush_interval and whenever apikey.flush_usage() asks.
 *
 * The launcher is a background worker registered at preload.  It connects
 * to no database (it reads only pg_database, a shared catalog) and starts
 * flushers, dynamic background workers, one per database, never two:
 *	 - at start, for every database that accepts connections and is not a
 *	   template (a flusher connected to a template would make CREATE
 *	   DATABASE fail); one that finds no extension exits at once;
 *	 - when CREATE EXTENSION apikey commits, and when a backend counts
 *	   usage in a database without a flusher
 *	   (flushers.c records the request and sets the launcher's latch);
 *	 - again, a second later, for a database whose flusher stopped
 *	   (pg_terminate_backend); the launcher, not the postmaster, restarts
 *	   flushers, after checking that the database still exists, so a
 *	   dropped database never makes a flusher fail to connect in a loop.
 * apikey.databases, when set, lists the only databases that get one; a
 * flusher whose database leaves the list (at a reload) first makes its
 * backends write pending rows, then writes what they counted, and exits.
 * When no background worker slot is free the launcher says so once per
 * database (WARNING, with a hint about max_worker_processes) and tries
 * again every few seconds; meanwhile that database's backends write
 * pending rows, exact but slower.  Nothing runs on a hot standby (start
 * time RecoveryFinished) or while pg_upgrade runs the server.
 *
 * A flusher checks, each round, that the extension it found at start
 * still exists (by its OID, never by name); when it is gone (DROP
 * EXTENSION, or dropped and created again) the flusher frees its slot and
 * exits with status 0, without writing.  Each round ends with
 * periodic_work(), the one place for other per-database periodic tasks.
 *
 * ALTER DATABASE ... SET, which the database's owner may run, applies to
 * the flusher's connection too.  So after connecting it pins what a flush
 * relies on: read-write, READ COMMITTED, search_path pg_catalog, no
 * statement or idle timeouts, no exit on error, session_replication_role
 * origin, and a lock_timeout of its own, so that a lock someone holds makes
 * a flush fail and be retried at the next round, never hang.
 *
 * flush_usage() in a database with a running flusher does not flush
 * itself: it bumps its slot's flush_requested, sets the flusher's latch
 * and sleeps on the slot's condition variable until a flush that began
 * after its request has ended (flushers.c).  Its transaction takes no
 * counts and holds no lock, so rolling it (or a savepoint) back loses
 * nothing and leaving it open stops nobody.
 *
 * On SIGTERM a flusher flushes at once, then waits, up to a few seconds,
 * for its database's client backends to exit (at a clean shutdown they are
 * told to stop at the same moment and may still count a last call), then
 * flushes once more, and exits with status 1.  After a crash the shared
 * counters are gone: at most one interval of calls is lost.
 *
 * Locking: the slots and flush requests are flushers.c's (one spinlock);
 * this file holds no lock of its own.  A flusher's flush is one top-level
 * transaction (usage.c subtracts what it wrote at commit).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/objectaccess.h"
#include "catalog/pg_database.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "executor/executor.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lmgr.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/backend_status.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"

#include "apikey.h"
#include "compat.h"

/* How long a flush waits for a lock before it gives up until next round. */
#define WRITER_LOCK_TIMEOUT		"10s"

/* The launcher's nap between rounds, and its waits before retrying. */
#define LAUNCHER_NAP_MS			1000
#define RESTART_DELAY_MS		1000	/* a flusher that stopped */
#define UNAVAILABLE_RETRY_MS	10000	/* no worker slot, or not allowed */

/* GUCs: apikey.usage_flush_interval, apikey.databases */
static int	usage_flush_interval = 1000;
static char *writer_databases = NULL;

/* this flusher's slot, and the extension it serves */
static int	flusher_slot = -1;
static uint32 flusher_generation = 0;
static Oid	flusher_extension = InvalidOid;
static bool flusher_release = false;	/* free the slot when exiting */

static object_access_hook_type prev_object_access_hook = NULL;
static Oid	created_extension = InvalidOid;	/* by this transaction */

PGDLLEXPORT void apikey_launcher_main(Datum main_arg);
PGDLLEXPORT void apikey_flusher_main(Datum main_arg);

static void writer_object_access(ObjectAccessType access, Oid classId,
								 Oid objectId, int subId, void *arg);

/* apikey.databases: names, as identifiers (quote mixed case), or empty. */
static bool
check_databases(char **newval, void **extra, GucSource source)
{
	char	   *raw = pstrdup(*newval);
	List	   *names;
	bool		ok = SplitIdentifierString(raw, ',', &names);

	if (!ok)
		GUC_check_errdetail("List syntax is invalid.");
	list_free(names);
	pfree(raw);
	return ok;
}

/* The writers' settings; every backend defines them. */
void
apikey_worker_init(void)
{
	DefineCustomIntVariable("apikey.usage_flush_interval",
							"How often the background worker writes usage counters to apikey.usage_log.",
							NULL,
							&usage_flush_interval,
							1000, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomStringVariable("apikey.databases",
							   "Databases that get a usage writer; empty means every database.",
							   "Elsewhere usage is written synchronously, as pending rows.",
							   &writer_databases,
							   "",
							   PGC_SIGHUP, GUC_LIST_INPUT,
							   check_databases, NULL, NULL);
}

/* May database name have a usage writer, by apikey.databases? */
static bool
database_allowed(const char *name)
{
	char	   *raw;
	List	   *names;
	ListCell   *lc;
	bool		found = false;

	if (writer_databases == NULL || writer_databases[0] == '\0')
		return true;
	raw = pstrdup(writer_databases);
	if (SplitIdentifierString(raw, ',', &names))
	{
		foreach(lc, names)
		{
			if (strcmp((char *) lfirst(lc), name) == 0)
				found = true;
		}
	}
	list_free(names);
	pfree(raw);
	return found;
}

/*
 * Register the launcher, and watch for CREATE EXTENSION apikey; called
 * from _PG_init while preloading.
 */
void
apikey_worker_register(void)
{
	BackgroundWorker worker;

	/*
	 * Not while pg_upgrade runs the server: a flusher's connection to a
	 * database would make pg_upgrade's DROP DATABASE of it fail.
	 */
	if (IsBinaryUpgrade)
		return;

	prev_object_access_hook = object_access_hook;
	object_access_hook = writer_object_access;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "apikey");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "apikey_launcher_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "apikey usage launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "apikey usage launcher");
	RegisterBackgroundWorker(&worker);
}

/*
 * At commit of CREATE EXTENSION apikey, ask for this database's flusher
 * (whether the new extension is apikey is looked up before commit, when
 * the catalogs may still be read).
 */
static void
writer_xact_callback(XactEvent event, void *arg)
{
	if (!OidIsValid(created_extension))
		return;
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
			if (get_extension_oid("apikey", true) != created_extension)
				created_extension = InvalidOid;
			break;
		case XACT_EVENT_COMMIT:
			(void) apikey_flushers_serving(MyDatabaseId);
			created_extension = InvalidOid;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			created_extension = InvalidOid;
			break;
		default:
			break;
	}
}

/* object_access_hook: remember an extension created in this transaction. */
static void
writer_object_access(ObjectAccessType access, Oid classId, Oid objectId,
					 int subId, void *arg)
{
	static bool registered = false;

	if (prev_object_access_hook)
		prev_object_access_hook(access, classId, objectId, subId, arg);
	if (access != OAT_POST_CREATE || classId != ExtensionRelationId)
		return;
	if (!registered)
	{
		RegisterXactCallback(writer_xact_callback, NULL);
		registered = true;
	}
	created_extension = objectId;
}

/*
 * Override the settings the database (or its owner) may have given this
 * connection, where they could stop or stall a flush.
 */
static void
pin_settings(void)
{
	static const char *const settings[][2] = {
		{"default_transaction_read_only", "off"},
		{"default_transaction_isolation", "read committed"},
		{"default_transaction_deferrable", "off"},
		{"search_path", "pg_catalog, pg_temp"},
		{"session_replication_role", "origin"},
		{"statement_timeout", "0"},
		{"lock_timeout", WRITER_LOCK_TIMEOUT},
		{"idle_in_transaction_session_timeout", "0"},
		{"idle_session_timeout", "0"},
		{"transaction_timeout", "0"},	/* PostgreSQL 17 */
		{"exit_on_error", "off"},
		{"jit", "off"},			/* compiling a flush costs more than running it */
	};
	int			i;

	for (i = 0; i < lengthof(settings); i++)
	{
		if (GetConfigOption(settings[i][0], true, false) != NULL)
			SetConfigOption(settings[i][0], settings[i][1], PGC_SUSET, PGC_S_OVERRIDE);
	}
}

/* ---- the launcher ---- */

/* A database, as the launcher sees it in pg_database. */
typedef struct WriterDb
{
	Oid			oid;
	NameData	name;
	bool		eligible;		/* connectable, not a template, allowed */
} WriterDb;

/* Every database, read from pg_database in a transaction of its own. */
static WriterDb *
read_databases(MemoryContext cxt, int *n)
{
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;
	int			cap = 16;
	WriterDb   *dbs = MemoryContextAlloc(cxt, sizeof(WriterDb) * cap);

	*n = 0;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while (HeapTupleIsValid(tup = heap_getnext(scan, ForwardScanDirection)))
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (*n == cap)
		{
			cap *= 2;
			dbs = repalloc(dbs, sizeof(WriterDb) * cap);
		}
		dbs[*n].oid = db->oid;
		dbs[*n].name = db->datname;
		dbs[*n].eligible = db->datallowconn && !db->datistemplate &&
			db->datconnlimit != DATCONNLIMIT_INVALID_DB &&
			database_allowed(NameStr(db->datname));
		(*n)++;
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	return dbs;
}

static WriterDb *
find_database(WriterDb *dbs, int n, Oid oid)
{
	int			i;

	for (i = 0; i < n; i++)
		if (dbs[i].oid == oid)
			return &dbs[i];
	return NULL;
}

/*
 * Does database db still exist, once no DROP DATABASE of it is running?
 * Taking the lock InitPostgres takes waits for such a DROP to end, so a
 * flusher is not started only to fail to connect to a database that is
 * being dropped.
 */
static bool
database_exists(Oid db)
{
	bool		found;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	LockSharedObject(DatabaseRelationId, db, 0, AccessShareLock);
	found = SearchSysCacheExists1(DATABASEOID, ObjectIdGetDatum(db));
	UnlockSharedObject(DatabaseRelationId, db, 0, AccessShareLock);
	CommitTransactionCommand();
	return found;
}

/*
 * Register a flusher for slot i (state WANTED or UNAVAILABLE, generation
 * gen).  Without a free worker slot, a database whose backends asked is
 * marked unavailable (they keep writing pending rows) and the first time
 * the log says why; a database only found by the start-up scan just
 * loses its slot (its first call asks again).
 */
static BackgroundWorkerHandle *
start_flusher(int i, const ApikeyFlusherPeek *peek, const WriterDb *db)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	TimestampTz now = GetCurrentTimestamp();
	bool		warn = false;

	if (!apikey_flushers_move(i, peek->generation, FLUSHER_STARTING, 0, NULL))
		return NULL;
	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "apikey");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "apikey_flusher_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "apikey usage writer");
	snprintf(worker.bgw_type, BGW_MAXLEN, "apikey usage writer");
	worker.bgw_main_arg = Int32GetDatum(i);
	memcpy(worker.bgw_extra, &peek->generation, sizeof(uint32));
	worker.bgw_notify_pid = MyProcPid;
	if (RegisterDynamicBackgroundWorker(&worker, &handle))
		return handle;

	if (!peek->demanded)
	{
		(void) apikey_flushers_move(i, peek->generation, FLUSHER_FREE, 0, NULL);
		return NULL;
	}
	(void) apikey_flushers_move(i, peek->generation, FLUSHER_UNAVAILABLE,
								TimestampTzPlusMilliseconds(now, UNAVAILABLE_RETRY_MS),
								&warn);
	if (warn)
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("no background worker slot for the apikey usage writer of database \"%s\"",
						NameStr(db->name)),
				 errdetail("Until one is free, usage in that database is written synchronously: counts stay exact, concurrent calls with one key are slower."),
				 errhint("Raise max_worker_processes (apikey needs one for its launcher and one per database where it is used) and restart the server.")));
	return NULL;
}

/*
 * One pass over the slots: start the flushers that are wanted, notice those
 * that stopped before attaching, free the slots of dropped databases.
 */
static void
launch_round(BackgroundWorkerHandle **handles, uint32 *handle_gens,
			 TimestampTz *orphan_since, MemoryContext cxt)
{
	TimestampTz now = GetCurrentTimestamp();
	WriterDb   *dbs = NULL;
	int			ndbs = 0;
	int			nslots = apikey_flushers_nslots();
	int			i;

	MemoryContextReset(cxt);
	for (i = 0; i < nslots; i++)
	{
		ApikeyFlusherPeek peek;
		WriterDb   *db;
		pid_t		pid;

		apikey_flushers_peek(i, &peek);
		if (handles[i] != NULL &&
			(handle_gens[i] != peek.generation || peek.state != FLUSHER_STARTING))
		{
			pfree(handles[i]);
			handles[i] = NULL;
		}
		/* starting, by an earlier launcher, for too long: start it anew */
		if (peek.state == FLUSHER_STARTING && handles[i] == NULL)
		{
			if (orphan_since[i] == 0)
				orphan_since[i] = now;
			else if (TimestampDifferenceExceeds(orphan_since[i], now, UNAVAILABLE_RETRY_MS))
				(void) apikey_flushers_move(i, peek.generation, FLUSHER_WANTED, 0, NULL);
			continue;
		}
		orphan_since[i] = 0;
		if (peek.state == FLUSHER_STARTING &&
			GetBackgroundWorkerPid(handles[i], &pid) == BGWH_STOPPED)
		{
			/*
			 * It exited before attaching: no extension there (then it freed
			 * the slot), or it failed to connect.  Look again later, not at
			 * once: a failure must not repeat every second.
			 */
			(void) apikey_flushers_move(i, peek.generation, FLUSHER_WANTED,
										TimestampTzPlusMilliseconds(now, UNAVAILABLE_RETRY_MS),
										NULL);
			continue;
		}
		if ((peek.state != FLUSHER_WANTED && peek.state != FLUSHER_UNAVAILABLE) ||
			peek.retry_at > now)
			continue;

		if (dbs == NULL)
			dbs = read_databases(cxt, &ndbs);
		db = find_database(dbs, ndbs, peek.dboid);
		if (db == NULL || !database_exists(peek.dboid))
			(void) apikey_flushers_move(i, peek.generation, FLUSHER_FREE, 0, NULL);
		else if (!db->eligible)
			(void) apikey_flushers_move(i, peek.generation, FLUSHER_UNAVAILABLE,
										TimestampTzPlusMilliseconds(now, UNAVAILABLE_RETRY_MS),
										NULL);
		else
		{
			handles[i] = start_flusher(i, &peek, db);
			handle_gens[i] = peek.generation;
		}
	}
}

/* before_shmem_exit: no launcher any more. */
static void
launcher_gone(int code, Datum arg)
{
	apikey_flushers_set_launcher(NULL);
}

void
apikey_launcher_main(Datum main_arg)
{
	MemoryContext cxt;
	BackgroundWorkerHandle **handles;
	uint32	   *handle_gens;
	TimestampTz *orphan_since;
	WriterDb   *dbs;
	int			ndbs;
	int			i;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	cxt = AllocSetContextCreate(TopMemoryContext, "apikey launcher",
								ALLOCSET_DEFAULT_SIZES);
	handles = MemoryContextAllocZero(TopMemoryContext,
									 sizeof(*handles) * apikey_flushers_nslots());
	handle_gens = MemoryContextAllocZero(TopMemoryContext,
										 sizeof(*handle_gens) * apikey_flushers_nslots());
	orphan_since = MemoryContextAllocZero(TopMemoryContext,
										  sizeof(*orphan_since) * apikey_flushers_nslots());

	before_shmem_exit(launcher_gone, (Datum) 0);
	apikey_flushers_set_launcher(MyLatch);

	/* every database that may have the extension gets a look */
	dbs = read_databases(cxt, &ndbs);
	for (i = 0; i < ndbs; i++)
		if (dbs[i].eligible)
			apikey_flushers_want(dbs[i].oid);

	while (!ShutdownRequestPending)
	{
		launch_round(handles, handle_gens, orphan_since, cxt);
		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 LAUNCHER_NAP_MS,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
	}
	proc_exit(1);
}

/* ---- a flusher ---- */

/*
 * One flush in its own transaction: the shared counters, then the pending
 * rows, if the extension this flusher serves still exists (else *gone).
 * An error is reported and swallowed: the counters and rows stay and the
 * next round tries again.  Returns whether it succeeded.
 */
static bool
flush_once(int *rows, bool *gone)
{
	MemoryContext oldcxt = CurrentMemoryContext;
	volatile bool ok = true;

	*rows = 0;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "flushing apikey usage");
	PG_TRY();
	{
		*gone = get_extension_name(flusher_extension) == NULL;
		if (!*gone && OidIsValid(apikey_keystore_keys_relid(true)))
		{
			int			folded;

			*rows = apikey_usage_flush_shared();
			folded = apikey_usage_fold_pending();
			if (folded > 0)
				*rows += folded;
			(void) apikey_legacy_upgrades_apply();	/* legacyupgrade.c */
			(void) apikey_networks_flush();	/* key_networks (networks.c) */
		}
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcxt);
		EmitErrorReport();
		FlushErrorState();
		AbortCurrentTransaction();
		apikey_stats_flushed(0, false);
		*rows = 0;
		ok = false;
	}
	PG_END_TRY();
	pgstat_report_activity(STATE_IDLE, NULL);
	return ok;
}

/*
 * Flush, and tell everyone waiting for a flush requested before this one
 * began how it went.  False when the extension is gone.
 */
static bool
flush_round(void)
{
	uint64		requested = apikey_flushers_requested(flusher_slot);
	int			rows;
	bool		gone = false;
	bool		ok;

	ok = flush_once(&rows, &gone);
	apikey_flushers_served(flusher_slot, requested, ok, rows);
	return !gone;
}

/*
 * Call the extension's function name (nargs arguments of types argtypes,
 * at most one) in a transaction of its own, as the periodic tasks do;
 * on_result, if given, reads its value before the transaction ends.  An
 * error is reported and swallowed, so that a failing task never stops the
 * flushes: returns false.  A function this install does not have yet (not
 * updated) is skipped quietly.
 */
static bool
call_in_transaction(const char *activity, const char *name, int nargs,
					const Oid *argtypes, const Datum *args,
					void (*on_result) (Datum result))
{
	MemoryContext oldcxt = CurrentMemoryContext;
	volatile bool ok = true;

	Assert(nargs <= 1);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
	PG_TRY();
	{
		Oid			fn = apikey_keystore_function(name, nargs, argtypes);

		if (OidIsValid(fn))
		{
			Datum		d = nargs == 0 ? OidFunctionCall0(fn) : OidFunctionCall1(fn, args[0]);

			if (on_result != NULL)
				on_result(d);
		}
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(oldcxt);
		EmitErrorReport();
		FlushErrorState();
		AbortCurrentTransaction();
		ok = false;
	}
	PG_END_TRY();
	pgstat_report_activity(STATE_IDLE, NULL);
	return ok;
}

/* run_retention()'s "more": another batch is left */
static bool retention_more = false;

static void
read_retention_more(Datum row)
{
	bool		isnull;
	Datum		more = GetAttributeByName(DatumGetHeapTupleHeader(row), "more", &isnull);

	retention_more = !isnull && DatumGetBool(more);
}

/*
 * Per-database periodic work, once per round, after the flush (so a pass
 * sees the counts just written), with the extension present; each module
 * says when its task is due, and each task runs in a transaction of its
 * own: the detector's pass (detector.c), the events pass (events.c), a
 * batch of retention (retention.c).
 */
static void
periodic_work(void)
{
	if (apikey_detector_due())
		(void) call_in_transaction("apikey detection pass", "_detect", 0, NULL, NULL, NULL);
	if (apikey_events_due())
		(void) call_in_transaction("apikey events pass", "_run_events", 0, NULL, NULL, NULL);
	if (apikey_retention_due())
	{
		static const Oid argtypes[1] = {INT4OID};
		Datum		batch = Int32GetDatum(10000);
		bool		ok;

		retention_more = false;
		ok = call_in_transaction("apikey retention", "run_retention", 1, argtypes, &batch,
								 read_retention_more);
		apikey_retention_ran(ok, retention_more);
	}
}

/*
 * Wait until no client backend of this database is left, or max_ms has
 * passed, or for a second none has left (then this is no shutdown:
 * pg_terminate_backend(), or DROP DATABASE ... WITH (FORCE)).
 * Requests for a flush are served meanwhile.
 */
static void
wait_for_client_backends(int max_ms)
{
	int			waited;
	int			last = -1;
	int			unchanged_ms = 0;

	for (waited = 0; waited < max_ms; waited += 10)
	{
		int			nbackends;
		int			clients = 0;
		int			i;

		pgstat_clear_backend_activity_snapshot();
		nbackends = pgstat_fetch_stat_numbackends();
		for (i = 1; i <= nbackends; i++)
		{
			LocalPgBackendStatus *local = apikey_local_beentry(i);

			if (local != NULL && local->backendStatus.st_backendType == B_BACKEND &&
				local->backendStatus.st_databaseid == MyDatabaseId)
				clients++;
		}
		if (clients == 0)
			break;
		if (clients != last)
			unchanged_ms = 0;
		else if ((unchanged_ms += 10) >= 1000)
			break;
		last = clients;
		if (apikey_flushers_flush_wanted(flusher_slot))
			(void) flush_round();
		pg_usleep(10 * 1000L);
	}
	pgstat_clear_backend_activity_snapshot();
}

/*
 * before_shmem_exit: the slot is freed (the extension is gone) or wanted
 * again, so that the launcher starts another flusher; waiters are woken.
 */
static void
flusher_gone(int code, Datum arg)
{
	apikey_flushers_detach(flusher_slot, flusher_generation, flusher_release,
						   TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													   RESTART_DELAY_MS));
}

/*
 * Connect to the slot's database and find the extension there.  Without
 * it the slot is freed: a database where apikey is not installed has no
 * flusher.
 */
static char *
flusher_connect(void)
{
	Oid			db = apikey_flushers_slot_db(flusher_slot, flusher_generation);
	char	   *name;

	if (!OidIsValid(db))
		proc_exit(0);			/* the slot went to someone else */
	BackgroundWorkerInitializeConnectionByOid(db, InvalidOid, 0);
	pin_settings();

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	flusher_extension = get_extension_oid("apikey", true);
	name = MemoryContextStrdup(TopMemoryContext, get_database_name(MyDatabaseId));
	CommitTransactionCommand();
	if (!OidIsValid(flusher_extension) || !database_allowed(name))
	{
		(void) apikey_flushers_move(flusher_slot, flusher_generation,
									FLUSHER_FREE, 0, NULL);
		proc_exit(0);
	}
	return name;
}

void
apikey_flusher_main(Datum main_arg)
{
	char	   *dbname;
	const char *why = NULL;
	bool		flush_before_leaving = false;

	flusher_slot = DatumGetInt32(main_arg);
	memcpy(&flusher_generation, MyBgworkerEntry->bgw_extra, sizeof(uint32));
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	dbname = flusher_connect();
	if (!apikey_flushers_attach(flusher_slot, flusher_generation))
		proc_exit(0);
	before_shmem_exit(flusher_gone, (Datum) 0);
	ereport(LOG,
			(errmsg("apikey usage writer started for database \"%s\"", dbname)));

	while (!ShutdownRequestPending)
	{
		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 usage_flush_interval,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			if (!database_allowed(dbname))
			{
				why = "the database is no longer in apikey.databases";
				flush_before_leaving = true;
				break;
			}
		}
		if (!flush_round())
		{
			why = "the extension was dropped";
			break;
		}
		periodic_work();
	}

	if (why != NULL)
	{
		/*
		 * Nothing left to serve here: free the slot, no restart.  A database
		 * left out of apikey.databases still has the extension: its backends
		 * are told to write pending rows first, then what they counted in
		 * shared memory is written.
		 */
		if (flush_before_leaving)
		{
			(void) apikey_flushers_move(flusher_slot, flusher_generation,
										FLUSHER_UNAVAILABLE,
										TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
																	UNAVAILABLE_RETRY_MS),
										NULL);
			(void) flush_round();
		}
		ereport(LOG,
				(errmsg("apikey usage writer for database \"%s\" stopped: %s",
						dbname, why)));
		flusher_release = true;
		proc_exit(0);
	}

	/* write what there is now, and again once clients are gone */
	(void) flush_round();
	wait_for_client_backends(5000);
	(void) flush_round();
	proc_exit(1);
}
