/*-------------------------------------------------------------------------
 *
 * events.c
 *	  Events you can LISTEN to: the settings of apikey.events, the worker's
 *	  periodic pass, and a C entry point to the one writer.
 *
 * The outbox itself is SQL (apikey--1.1--1.2.sql): apikey._event() appends
 * a row to apikey.events and calls pg_notify('apikey_events', seq) in the
 * writing transaction, so listeners hear of it at commit and never of a
 * rollback.  Changes to a key are announced by row triggers in the
 * changing transaction; what time brings (key.expiring, quota.low,
 * rate_limit.saturated) by apikey._run_events(), which the background
 * worker calls from here every apikey.events_interval.
 *
 * Both functions are found through the extension's own catalog row: its
 * schema's OID, the function by name and argument types in that schema,
 * and then checked to be a member of the extension.  Nothing is looked up
 * by a schema name, which whoever has CREATE on the database could
 * pre-create or replace.
 *
 * Settings:
 *	 apikey.events_interval		how often the worker runs the pass (0 = never)
 *	 apikey.event_retention		events older than this are deleted by the
 *								pass (0 = kept forever)
 *	 apikey.unused_revoke_after	the pass revokes keys unused this long
 *								(0 = off, the default)
 *	 apikey.events_notify		NOTIFY for each event (on); a transaction
 *								that will be PREPAREd turns it off, since
 *								two-phase commit refuses NOTIFY.  Superuser
 *								only (GRANT SET ON PARAMETER to delegate): a
 *								caller whose own transaction writes an event
 *								(a canary's use, say) must not silence it
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "catalog/pg_type.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "apikey.h"

/* GUC: apikey.events_interval, seconds */
static int	events_interval = 60;

/* GUC: apikey.event_retention, seconds */
static int	event_retention = 30 * 86400;

/* GUC: apikey.unused_revoke_after, seconds */
static int	unused_revoke_after = 0;

/* GUC: apikey.events_notify */
static bool events_notify = true;

/* Define the settings; called from _PG_init in every backend. */
void
apikey_events_init(void)
{
	/* apikey.events_interval */
	DefineCustomIntVariable("apikey.events_interval",
							"How often the background worker runs the events pass (apikey.run_events()).",
							"0 turns the worker's pass off; apikey.run_events() still runs it on demand.",
							&events_interval,
							60, 0, 86400,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	/* apikey.event_retention */
	DefineCustomIntVariable("apikey.event_retention",
							"Events older than this are deleted by the events pass.",
							"0 keeps them forever.",
							&event_retention,
							30 * 86400, 0, INT_MAX,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);

	/* apikey.unused_revoke_after */
	DefineCustomIntVariable("apikey.unused_revoke_after",
							"The events pass revokes keys unused for this long (reason unused).",
							"0, the default, turns it off.",
							&unused_revoke_after,
							0, 0, INT_MAX,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);

	/* apikey.events_notify */
	DefineCustomBoolVariable("apikey.events_notify",
							 "Whether apikey._event() sends NOTIFY apikey_events for each event it writes.",
							 "Turn it off (SET LOCAL) in a transaction that will be PREPAREd: two-phase commit refuses NOTIFY.  The events are written either way.",
							 &events_notify,
							 true,
							 PGC_SUSET, 0,
							 NULL, NULL, NULL);
}

/* A number of seconds as an interval (days and time), NULL for 0. */
static Interval *
seconds_interval(int secs)
{
	Interval   *iv;

	if (secs <= 0)
		return NULL;
	iv = palloc0(sizeof(Interval));
	iv->day = secs / 86400;
	iv->time = (int64) (secs % 86400) * USECS_PER_SEC;
	return iv;
}

/* apikey.event_retention as an interval; NULL = keep forever. */
Interval *
apikey_event_retention(void)
{
	return seconds_interval(event_retention);
}

/* apikey.unused_revoke_after as an interval; NULL = off. */
Interval *
apikey_unused_revoke_after(void)
{
	return seconds_interval(unused_revoke_after);
}

/*
 * Append one event through apikey._event() (the only writer), for C
 * callers such as the detector.  The caller is in a read-write transaction
 * with a snapshot, acting as the extension's owner (apikey_run_as_owner()).
 * key_id and owner may be NULL; payload NULL means {}.  Returns the seq.
 */
int64
apikey_event_emit(const char *kind, const int64 *key_id, const char *owner,
				  const char *severity, Jsonb *payload)
{
	static const Oid argtypes[5] = {TEXTOID, INT8OID, TEXTOID, TEXTOID, JSONBOID};
	Oid			fn = apikey_keystore_function("_event", 5, argtypes);
	FmgrInfo	flinfo;
	LOCAL_FCINFO(fcinfo, 5);
	Datum		result;

	if (!OidIsValid(fn))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("apikey._event(text, bigint, text, text, jsonb) does not exist"),
				 errhint("Run ALTER EXTENSION apikey UPDATE.")));
	fmgr_info(fn, &flinfo);
	InitFunctionCallInfoData(*fcinfo, &flinfo, 5, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = CStringGetTextDatum(kind);
	fcinfo->args[0].isnull = false;
	fcinfo->args[1].value = key_id ? Int64GetDatum(*key_id) : (Datum) 0;
	fcinfo->args[1].isnull = key_id == NULL;
	fcinfo->args[2].value = owner ? CStringGetTextDatum(owner) : (Datum) 0;
	fcinfo->args[2].isnull = owner == NULL;
	fcinfo->args[3].value = CStringGetTextDatum(severity);
	fcinfo->args[3].isnull = false;
	fcinfo->args[4].value = JsonbPGetDatum(payload);
	fcinfo->args[4].isnull = payload == NULL;
	result = FunctionCallInvoke(fcinfo);
	if (fcinfo->isnull)
		elog(ERROR, "apikey._event() returned NULL");
	return DatumGetInt64(result);
}

/*
 * Whether the background worker's events pass is due: apikey.events_interval
 * has passed since the last one (the first, at once).  The worker then runs
 * apikey._run_events() in a transaction of its own.
 */
bool
apikey_events_due(void)
{
	static TimestampTz last = 0;
	TimestampTz now = GetCurrentTimestamp();

	if (events_interval <= 0)
		return false;
	if (last != 0 && !TimestampDifferenceExceeds(last, now, events_interval * 1000))
		return false;
	last = now;
	return true;
}
