/*-------------------------------------------------------------------------
 *
 * verdict.c
 *	  What each verdict code is called and how authenticate() reports it:
 *	  one table, indexed by ApikeyCode.
 *
 * check() returns the name; authenticate() raises the SQLSTATE, message
 * and hint of the same row.  A new code is added here and nowhere else in
 * C (the enum in apikey.h, then this table; the designated initialisers
 * keep the two in step).
 *
 * Also here: how any user-supplied value is quoted in an error message.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "apikey.h"

typedef struct VerdictInfo
{
	const char *name;			/* verdict code as SQL sees it */
	int			sqlstate;		/* raised by authenticate() */
	const char *message;		/* errmsg; for scope_denied and quarantined,
								 * %s is the scope */
	const char *hint;			/* errhint or NULL; %s is retry_after where
								 * hint_takes_retry */
	bool		hint_takes_retry;
} VerdictInfo;

#define REJECTED_KEY ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION

static const VerdictInfo verdicts[APIKEY_NUM_CODES] = {
	[APIKEY_VALID] = {"valid", 0, NULL, NULL, false},
	[APIKEY_MALFORMED] = {"malformed", REJECTED_KEY,
		"invalid API key", NULL, false},
	[APIKEY_UNKNOWN] = {"unknown", REJECTED_KEY,
		"invalid API key", NULL, false},
	[APIKEY_REVOKED] = {"revoked", REJECTED_KEY,
		"API key has been revoked", NULL, false},
	[APIKEY_EXPIRED] = {"expired", REJECTED_KEY,
		"API key has expired", NULL, false},
	[APIKEY_ADDRESS_DENIED] = {"address_denied", REJECTED_KEY,
		"API key may not be used from this client address", NULL, false},
	[APIKEY_SCOPE_DENIED] = {"scope_denied", ERRCODE_INSUFFICIENT_PRIVILEGE,
		"API key lacks scope \"%s\"", NULL, false},
	[APIKEY_RATE_LIMITED] = {"rate_limited", ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
		"API key rate limit exceeded", "Retry after %s.", true},
	[APIKEY_RATE_LIMIT_UNAVAILABLE] = {"rate_limit_unavailable",
		ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
		"API key has a rate limit that cannot be enforced",
		"Add apikey to shared_preload_libraries and restart, or raise apikey.rate_limit_max_keys.",
		false},
	[APIKEY_QUOTA_EXHAUSTED] = {"quota_exhausted", ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
		"API key quota exhausted", "The quota is refilled in %s.", true},
	[APIKEY_QUOTA_UNAVAILABLE] = {"quota_unavailable", ERRCODE_READ_ONLY_SQL_TRANSACTION,
		"API key quota cannot be debited in a read-only transaction",
		"Authenticate keys that have a quota in a read-write transaction on the primary.",
		false},
	[APIKEY_SUSPENDED] = {"suspended", REJECTED_KEY,
		"API key is suspended", "The suspension ends in %s.", true},
	[APIKEY_QUARANTINED] = {"quarantined", ERRCODE_INSUFFICIENT_PRIVILEGE,
		"API key is quarantined and may not use scope \"%s\"",
		"The key may still use the scopes its quarantine allows; an administrator lifts it with apikey.release().",
		false},
	[APIKEY_ADDRESS_BLOCKED] = {"address_blocked", ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
		"too many failed API key verifications from this client network",
		"Retry after %s.", true},
};

/* The SQL name of a verdict code. */
const char *
apikey_verdict_name(ApikeyCode code)
{
	Assert(code >= 0 && code < APIKEY_NUM_CODES);
	return verdicts[code].name;
}

/* An interval of usecs microseconds, as SQL sees it. */
Datum
apikey_interval_datum(int64 usecs)
{
	Interval   *iv = palloc0(sizeof(Interval));

	iv->time = usecs;
	return IntervalPGetDatum(iv);
}

/*
 * retry_after for a hint: whole seconds, rounded up, as HTTP's Retry-After
 * wants them.  Not an interval's text, whose form follows the session's
 * IntervalStyle and would make every client parse four formats.
 */
static char *
retry_seconds(int64 usecs)
{
	int64		secs = (usecs + USECS_PER_SEC - 1) / USECS_PER_SEC;

	if (secs < 1)
		secs = 1;
	return psprintf(INT64_FORMAT " %s", secs, secs == 1 ? "second" : "seconds");
}

/*
 * Raise the error authenticate() reports for a rejected verdict.  scope is
 * the scope asked for, already clipped for a message (scope_denied only).
 */
void
apikey_verdict_report(const ApikeyVerdict *v, const char *scope)
{
	const VerdictInfo *info = &verdicts[v->code];
	char	   *retry = NULL;

	if (v->code == APIKEY_VALID)
		return;
	if (v->has_retry_after)
		retry = retry_seconds(v->retry_after);
	ereport(ERROR,
			(errcode(info->sqlstate),
			 (v->code == APIKEY_SCOPE_DENIED || v->code == APIKEY_QUARANTINED) ?
			 errmsg(info->message, scope) : errmsg("%s", info->message),
			 errdetail("Verdict: %s.", info->name),
			 info->hint == NULL ? 0 :
			 !info->hint_takes_retry ? errhint("%s", info->hint) :
			 retry != NULL ? errhint(info->hint, retry) : 0));
}

/*
 * A user-supplied value as quoted in an error message: at most 64
 * characters (cut on a character boundary), so one bad call cannot write a
 * megabyte into the log; apikey._clip() does the same in SQL.
 */
char *
apikey_clip_for_message(const char *s, int len)
{
	int			cut;

	if (pg_mbstrlen_with_len(s, len) <= 64)
		return pnstrdup(s, len);
	cut = pg_mbcharcliplen(s, len, 61);
	return psprintf("%.*s...", cut, s);
}
