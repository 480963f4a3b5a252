/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The usage writer: a background worker that persists the shared usage
 *	  counters into apikey.usage_log every apikey.usage_flush_interval.
 *
 * It connects to the one database named by apikey.database (as pg_cron
 * does with cron.database_name) and only flushes that database's counters;
 * backends in other databases write their usage synchronously instead.  It
 * does not run on a hot standby (start time RecoveryFinished).
 *
 * ALTER DATABASE ... SET, which the database's owner may run, applies to
 * the writer's connection too.  So after connecting it pins what a flush
 * relies on: read-write, READ COMMITTED, search_path pg_catalog, no
 * statement or idle timeouts, no exit on error, session_replication_role
 * origin, no JIT, and a lock_timeout of its own, so that a lock someone
 * holds makes a flush fail and be retried at the next round, never hang.
 *
 * On SIGTERM it waits, up to a few seconds, for client backends to exit
 * (at a clean shutdown they are told to stop at the same moment and may
 * still count a last call), then flushes once more.  It exits with status
 * 1 either way: after pg_terminate_backend() the postmaster starts it again
 * after bgw_restart_time, and at shutdown nothing is restarted.  After a
 * crash the shared counters are gone: at most one interval of calls is
 * lost.
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
#include "storage/latch.h"
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

PGDLLEXPORT void apikey_worker_main(Datum main_arg);

/* Register the worker; called from _PG_init while preloading. */
void
apikey_worker_register(void)
{
	BackgroundWorker worker;

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
 * One flush in its own transaction.  An error is reported and swallowed:
 * the counters stay in shared memory and the next round tries again.
 */
static void
flush_once(void)
{
	MemoryContext oldcxt = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "flushing apikey usage");
	PG_TRY();
	{
		if (OidIsValid(apikey_keystore_keys_relid(true)))
			(void) apikey_usage_flush();
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
	}
	PG_END_TRY();
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * Wait until no client backend is left, or max_ms has passed, or for a
 * second none has left (then this is no shutdown: pg_terminate_backend()).
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
		pg_usleep(10 * 1000L);
	}
	pgstat_clear_backend_activity_snapshot();
}

void
apikey_worker_main(Datum main_arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(apikey_database, NULL, 0);
	pin_settings();
	ereport(LOG,
			(errmsg("apikey usage writer started for database \"%s\"",
					apikey_database)));

	while (!ShutdownRequestPending)
	{
		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 apikey_usage_flush_interval,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		flush_once();
	}

	/* write what is left once clients are gone; status 1: restart me */
	wait_for_client_backends(5000);
	flush_once();
	proc_exit(1);
}
