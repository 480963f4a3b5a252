/*-------------------------------------------------------------------------
 *
 * detector.c
 *	  The detector's periodic pass in the background worker, every
 *	  apikey.detect_interval.
 *
 * The rules, the findings and the responses are SQL (the "Detector"
 * section of the install script): a pass is apikey._detect(), which
 * apikey.run_detection() also runs on demand.  The worker asks
 * apikey_detector_due() once per round, after its usage flush, so a pass
 * sees the counts just written, and runs _detect() in a transaction of its
 * own when the interval has elapsed since the last pass began (the first,
 * one interval after the worker started), or sooner, at most once a
 * second, while canary uses nearly fill their table (canary.c).  A pass that fails is logged and
 * tried again at the next interval; it never stops the worker or its
 * flushes.  The worker finds the function through the extension
 * (apikey_keystore_function()); an install not yet updated to a version
 * that has it is skipped quietly.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlog.h"
#include "miscadmin.h"
#include "utils/guc.h"
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

/*
 * Whether the background worker's detection pass is due:
 * apikey.detect_interval has elapsed since the last one began (the first,
 * one interval after the worker started), or, at most once a second, the
 * canary uses waiting for a pass nearly fill their table (canary.c).  The
 * worker then runs apikey._detect() in a transaction of its own.
 */
bool
apikey_detector_due(void)
{
	TimestampTz now = GetCurrentTimestamp();

	if (detect_interval <= 0 || RecoveryInProgress())
		return false;
	if (last_pass == 0)
		last_pass = now;
	if (!TimestampDifferenceExceeds(last_pass, now, detect_interval * 1000) &&
		!(TimestampDifferenceExceeds(last_pass, now, 1000) &&
		  apikey_canary_pressing()))
		return false;
	last_pass = now;
	return true;
}
