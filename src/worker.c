/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The usage writer: a background worker that persists the shared usage
 *	  counters, and folds pending rows, into apikey.usage_log every
 *	  apikey.usage_flush_interval and whenever apikey.flush_usage() asks.
 *
 * It connects to the one database named by apikey.database (as pg_cron
 * does with cron.database_name) and only flushes that database's counters;
 * backends in other databases append pending rows instead.  It does not run
 * on a hot standby (start time RecoveryFinished).
 *
 * ALTER DATABASE ... SET, which the database's owner may run, applies to
 * the writer's connection too.  So after connecting it pins what a flush
 * relies on: read-write, READ COMMITTED, search_path pg_catalog, no
 * statement or idle timeouts, no exit on error, session_replication_role
 * origin, and a lock_timeout of its own, so that a lock someone holds makes
 * a flush fail and be retried at the next round, never hang.
 *
 * flush_usage() in that database does not flush itself: it bumps
 * flush_requested, sets the writer's latch and sleeps on flush_cv until a
 * flush that began after its request has ended.  Its transaction takes no
 * counts and holds no lock, so rolling it (or a savepoint) back loses
 * nothing and leaving it open stops nobody.
 *
 * On SIGTERM it flushes at once, then waits, up to a few seconds, for
 * client backends to exit (at a clean shutdown they are told to stop at the
 * same moment and may still count a last call), then flushes once more.
 * It exits with status 1 either way: after pg_terminate_backend() the
 * postmaster starts it again after bgw_restart_time, and at shutdown
 * nothing is restarted.  After a crash the shared counters are gone: at
 * most one interval of calls is lost.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/backend_status.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "apikey.h"
#include "compat.h"

/* How long a flush waits for a lock before it gives up until next round. */
#define WRITER_LOCK_TIMEOUT		"10s"

/*
 * The writer, and flush_usage() requests to it.  Locking: mutex (a
 * spinlock) protects every field but cv; waiters sleep on cv, which the
 * writer broadcasts after each flush and when it exits.
 */
typedef struct WriterShared
{
	slock_t		mutex;
	pid_t		pid;			/* 0 while no writer runs */
	Latch	   *latch;
	uint64		flush_requested;	/* requests made so far */
	uint64		flush_served;	/* requests the last finished flush covered */
	bool		flush_ok;		/* did that flush succeed? */
	int			flush_rows;		/* usage_log rows it wrote */
	ConditionVariable cv;
} WriterShared;

/* GUC: apikey.usage_flush_interval */
static int	usage_flush_interval = 1000;

static WriterShared *writer = NULL;

PGDLLEXPORT void apikey_worker_main(Datum main_arg);

/* The writer's settings; every backend defines them. */
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
}

Size
apikey_worker_shmem_size(void)
{
	return sizeof(WriterShared);
}

/* Called from shmem_startup with AddinShmemInitLock held. */
void
apikey_worker_shmem_startup(void)
{
	bool		found;

	writer = ShmemInitStruct("apikey usage writer", sizeof(WriterShared), &found);
	if (found)
		return;
	SpinLockInit(&writer->mutex);
	writer->pid = 0;
	writer->latch = NULL;
	writer->flush_requested = 0;
	writer->flush_served = 0;
	writer->flush_ok = true;
	writer->flush_rows = 0;
	ConditionVariableInit(&writer->cv);
}

/* Register the worker; called from _PG_init while preloading. */
void
apikey_worker_register(void)
{
	BackgroundWorker worker;

	/*
	 * Not while pg_upgrade runs the server: its connection to
	 * apikey.database would make pg_upgrade's DROP DATABASE of it fail.
	 */
	if (IsBinaryUpgrade)
		return;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "apikey");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "apikey_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "apikey usage writer");
	snprintf(worker.bgw_type, BGW_MAXLEN, "apikey usage writer");
	RegisterBackgroundWorker(&worker);
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

/*
 * One flush in its own transaction: the shared counters, then the pending
 * rows.  An error is reported and swallowed: the counters and rows stay
 * and the next round tries again.  Returns whether it succeeded.
 */
static bool
flush_once(int *rows)
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
		if (OidIsValid(apikey_keystore_keys_relid(true)))
		{
			int			folded;

			*rows = apikey_usage_flush_shared();
			folded = apikey_usage_fold_pending();
			if (folded > 0)
				*rows += folded;
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
 * began how it went.
 */
static void
flush_round(void)
{
	uint64		requested;
	int			rows;
	bool		ok;

	SpinLockAcquire(&writer->mutex);
	requested = writer->flush_requested;
	SpinLockRelease(&writer->mutex);

	ok = flush_once(&rows);
	apikey_stats_heartbeat();

	SpinLockAcquire(&writer->mutex);
	if (requested > writer->flush_served)
		writer->flush_served = requested;
	writer->flush_ok = ok;
	writer->flush_rows = rows;
	SpinLockRelease(&writer->mutex);
	ConditionVariableBroadcast(&writer->cv);
}

/* Has flush_usage() asked for a flush not yet served? */
static bool
flush_wanted(void)
{
	bool		wanted;

	SpinLockAcquire(&writer->mutex);
	wanted = writer->flush_requested > writer->flush_served;
	SpinLockRelease(&writer->mutex);
	return wanted;
}

/*
 * Wait until no client backend is left, or max_ms has passed, or for a
 * second none has left (then this is no shutdown: pg_terminate_backend()).
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

			if (local != NULL && local->backendStatus.st_backendType == B_BACKEND)
				clients++;
		}
		if (clients == 0)
			break;
		if (clients != last)
			unchanged_ms = 0;
		else if ((unchanged_ms += 10) >= 1000)
			break;
		last = clients;
		if (flush_wanted())
			flush_round();
		pg_usleep(10 * 1000L);
	}
	pgstat_clear_backend_activity_snapshot();
}

/* before_shmem_exit: no writer any more; wake whoever waits for one. */
static void
writer_gone(int code, Datum arg)
{
	SpinLockAcquire(&writer->mutex);
	writer->pid = 0;
	writer->latch = NULL;
	SpinLockRelease(&writer->mutex);
	ConditionVariableBroadcast(&writer->cv);
}

void
apikey_worker_main(Datum main_arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(apikey_usage_database, NULL, 0);
	pin_settings();

	before_shmem_exit(writer_gone, (Datum) 0);
	SpinLockAcquire(&writer->mutex);
	writer->pid = MyProcPid;
	writer->latch = MyLatch;
	SpinLockRelease(&writer->mutex);
	ereport(LOG,
			(errmsg("apikey usage writer started for database \"%s\"",
					apikey_usage_database)));

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
		}
		flush_round();
		apikey_events_tick();	/* events.c: every apikey.events_interval */

		/* retention and rollups, every apikey.retention_interval */
		apikey_retention_maybe_run();
	}

	/* write what there is now, and again once clients are gone */
	flush_round();
	wait_for_client_backends(5000);
	flush_round();
	proc_exit(1);
}

/*
 * flush_usage() in apikey.database: have the writer flush, and wait for
 * it.  Returns the usage rows that flush wrote.
 */
int
apikey_worker_request_flush(void)
{
	uint64		mine = 0;
	Latch	   *latch = NULL;
	bool		served = false;
	bool		gone = false;
	bool		ok = true;
	int			rows = 0;

	SpinLockAcquire(&writer->mutex);
	if (writer->pid != 0)
	{
		mine = ++writer->flush_requested;
		latch = writer->latch;
	}
	else
		gone = true;
	SpinLockRelease(&writer->mutex);
	if (gone)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the apikey usage writer is not running"),
				 errdetail("Usage of database \"%s\" is flushed by the usage writer only.",
						   apikey_usage_database),
				 errhint("It is restarted within seconds; if not, look for its errors in the server log (and check max_worker_processes).")));
	SetLatch(latch);

	ConditionVariablePrepareToSleep(&writer->cv);
	for (;;)
	{
		SpinLockAcquire(&writer->mutex);
		served = writer->flush_served >= mine;
		gone = writer->pid == 0;
		ok = writer->flush_ok;
		rows = writer->flush_rows;
		SpinLockRelease(&writer->mutex);
		if (served || gone)
			break;
		(void) ConditionVariableTimedSleep(&writer->cv, 1000,
										   PG_WAIT_EXTENSION);
	}
	ConditionVariableCancelSleep();

	if (!served)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the apikey usage writer stopped before flushing"),
				 errhint("The counts are kept; call apikey.flush_usage() again once the writer is back.")));
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the apikey usage writer could not flush"),
				 errhint("The counts are kept for the next flush; the writer's error is in the server log.")));
	return rows;
}
