/*-------------------------------------------------------------------------
 *
 * detector.c
 *	  The detector's periodic pass in the background worker, every
 *	  apikey.detect_interval.
 *
 * The rules, the findings and the responses are SQL (the "Detector"
 * section of the install script): a pass is apikey._detect(), which
 * apikey.run_detection() also runs on demand.  The worker calls
 * apikey_detector_tick() once per round, after its usage flush, so a pass
 * sees the counts just written; the tick runs a pass when the interval
 * has elapsed since the last one began (the first, one interval after the
 * worker started), in a transaction of its own.  A
 * pass that fails is logged and tried again at the next interval; it
 * never stops the worker or its flushes.
 *
 * The function is found through the extension, never by a name the
 * search_path or a look-alike schema could supply: the schema of
 * apikey.keys (keystore.c has checked it is the extension's, owned by a
 * superuser), then _detect() with no arguments in that schema.  An
 * install not yet updated to a version that has it is skipped quietly.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "parser/parse_func.h"
#include "pgstat.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "apikey.h"

/* GUC: apikey.detect_interval, seconds; 0 = the worker runs no pass */
static int	detect_interval = 60;

/* When this process last began a pass (or, before the first, started) */
static TimestampTz last_pass = 0;

void
apikey_detector_init(void)
{
	DefineCustomIntVariable("apikey.detect_interval",
							"How often the background worker runs a detection pass.",
							"0 turns the periodic pass off; apikey.run_detection() still runs one on demand.",
							&detect_interval,
							60, 0, 7 * 24 * 3600,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);
}

/* "schema"._detect(), or NULL when this install has no such function */
static char *
detect_call(void)
{
	Oid			keys = apikey_keystore_keys_relid(true);
	char	   *nsp;
	Oid			fn;

	if (!OidIsValid(keys))
		return NULL;
	nsp = get_namespace_name(get_rel_namespace(keys));
	if (nsp == NULL)
		return NULL;
	fn = LookupFuncName(list_make2(makeString(nsp), makeString("_detect")),
						0, NULL, true);
	if (!OidIsValid(fn))
		return NULL;
	return psprintf("SELECT %s._detect()", quote_identifier(nsp));
}

/* One pass in its own transaction; an error is logged and swallowed. */
static void
detect_once(void)
{
	MemoryContext oldcxt = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "apikey detection pass");
	PG_TRY();
	{
		char	   *sql = detect_call();

		if (sql != NULL)
		{
			if (SPI_connect() != SPI_OK_CONNECT)
				elog(ERROR, "SPI_connect failed");
			if (SPI_execute(sql, false, 0) != SPI_OK_SELECT)
				elog(ERROR, "apikey detection pass failed");
			SPI_finish();
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
	}
	PG_END_TRY();
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * Called by the background worker once per round: run a pass if
 * apikey.detect_interval has elapsed since the last one began.
 */
void
apikey_detector_tick(void)
{
	TimestampTz now = GetCurrentTimestamp();

	if (detect_interval <= 0 || RecoveryInProgress())
		return;
	/* the first pass one interval after the worker starts, not at once */
	if (last_pass == 0)
		last_pass = now;
	if (!TimestampDifferenceExceeds(last_pass, now, detect_interval * 1000))
		return;
	last_pass = now;
	detect_once();
}
