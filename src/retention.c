/*-------------------------------------------------------------------------
 *
 * retention.c
 *	  How long usage history is kept, and running apikey.run_retention()
 *	  from the usage writer.
 *
 * The work itself is SQL (apikey.run_retention() in the 1.2 script): it
 * adds what each apikey.usage_log row holds beyond its rolled_up count to
 * the hourly and daily rollups, erases failure addresses older than
 * apikey.address_retention, and deletes what is older than each level's
 * retention.  This file owns the settings it reads, so that they are
 * defined (and checked) in every backend that loads apikey:
 *
 *	 apikey.usage_retention		raw minute rows (usage_log)
 *	 apikey.hourly_retention	hourly rollups (usage_hourly)
 *	 apikey.daily_retention		daily rollups (usage_daily)
 *	 apikey.address_retention	failure addresses, raw and rolled up
 *	 apikey.retention_interval	how often the usage writer runs it (0: never)
 *
 * The writer asks apikey_retention_due() once per round; every
 * apikey.retention_interval it calls run_retention() in a transaction of
 * its own, one bounded batch, and while the function says more is left,
 * one more batch per round: flushes go on between batches, so a backlog
 * (the first run after an upgrade) never holds the counters back.  The
 * writer finds the function through the extension (never by a schema name
 * someone could pre-create); a database whose apikey predates it is
 * skipped.
 * Without the preload there is no writer: a scheduler (pg_cron) calls
 * apikey.run_retention() instead.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "postmaster/interrupt.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "apikey.h"

#define SECS_PER_DAY_INT	(24 * 3600)

/* GUCs, in seconds (GUC_UNIT_S: '7d', '36h' and so on are accepted) */
static int	usage_retention = 7 * SECS_PER_DAY_INT;
static int	hourly_retention = 90 * SECS_PER_DAY_INT;
static int	daily_retention = 5 * 366 * SECS_PER_DAY_INT;
static int	address_retention = 7 * SECS_PER_DAY_INT;
static int	retention_interval = 15 * 60;

/* The settings; defined in every backend, so run_retention() reads them. */
void
apikey_retention_init(void)
{
	/* apikey.usage_retention */
	DefineCustomIntVariable("apikey.usage_retention",
							"How long apikey.usage_log keeps its per-minute rows.",
							"Older rows are deleted by apikey.run_retention() once rolled up.",
							&usage_retention,
							7 * SECS_PER_DAY_INT, 3600, INT_MAX,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);
	/* apikey.hourly_retention */
	DefineCustomIntVariable("apikey.hourly_retention",
							"How long apikey.usage_hourly keeps its hourly rollups.",
							NULL,
							&hourly_retention,
							90 * SECS_PER_DAY_INT, 3600, INT_MAX,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);
	/* apikey.daily_retention */
	DefineCustomIntVariable("apikey.daily_retention",
							"How long apikey.usage_daily keeps its daily rollups.",
							NULL,
							&daily_retention,
							5 * 366 * SECS_PER_DAY_INT, SECS_PER_DAY_INT, INT_MAX,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);
	/* apikey.address_retention */
	DefineCustomIntVariable("apikey.address_retention",
							"How long client addresses of failed verifications are kept.",
							"apikey.run_retention() erases older addresses from apikey.usage_log and deletes older rows of apikey.usage_address_hourly; 0 erases them at every run.",
							&address_retention,
							7 * SECS_PER_DAY_INT, 0, INT_MAX,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);
	/* apikey.retention_interval */
	DefineCustomIntVariable("apikey.retention_interval",
							"How often the usage writer runs apikey.run_retention() in its database.",
							"0 turns it off (then schedule apikey.run_retention() yourself).",
							&retention_interval,
							15 * 60, 0, 7 * SECS_PER_DAY_INT,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
}

/*
 * The retention settings in seconds, in the order of
 * apikey._retention_settings(): usage, hourly, daily, address.
 */
void
apikey_retention_settings(int64 *secs)
{
	secs[0] = usage_retention;
	secs[1] = hourly_retention;
	secs[2] = daily_retention;
	secs[3] = address_retention;
}

/*
 * The usage writer's retention, once per round, outside a transaction:
 * every apikey.retention_interval (the first time one interval after it
 * started) one batch of run_retention() in this database, then one batch a
 * round while more is left.  apikey_retention_due() says whether a batch
 * is due; the worker runs it in a transaction of its own and reports with
 * apikey_retention_ran(): a failed batch waits for the next interval.
 */
static TimestampTz retention_last_run = 0;
static bool retention_backlog = false;

bool
apikey_retention_due(void)
{
	TimestampTz now = GetCurrentTimestamp();

	if (retention_last_run == 0)
		retention_last_run = now;
	if (retention_interval <= 0 || ShutdownRequestPending)
		return false;
	if (!retention_backlog &&
		!TimestampDifferenceExceeds(retention_last_run, now, retention_interval * 1000))
		return false;
	if (!retention_backlog)
		retention_last_run = now;
	return true;
}

/* A batch ended: ok unless it failed, more if run_retention() said so. */
void
apikey_retention_ran(bool ok, bool more)
{
	retention_backlog = ok && more;
}
