/*-------------------------------------------------------------------------
 *
 * redact.c
 *	  Keep tokens out of the server log.
 *
 * Redact by shape, not by validity.  The checksum is public, so a near
 * miss (truncated, mistyped, wrong prefix) rebuilds the real token; we hide
 * every span shaped like a token body (rules in token.h), valid or not, and
 * show at most its last four characters, as the stored hint does.
 *
 * The log.  PostgreSQL logs statement text in several places: log_statement,
 * log_min_duration_statement, the STATEMENT line of log_min_error_statement,
 * bind parameters in a DETAIL, auto_explain's query text, and error
 * messages.  Our emit_log_hook sees every report before it is written and
 * replaces each token-shaped span in the message, detail, hint, context and
 * internal query, and in the statement text, by "..." and four characters:
 * a valid token ak_<body> becomes its hint, ak_...x9Qz.
 *
 * Loaded too late.  log_statement writes a statement before running it.
 * Without shared_preload_libraries (or session_preload_libraries) the
 * library, and so this hook, is loaded by the first statement that calls
 * apikey, after that statement was logged: nothing can un-log it.  Such a
 * backend refuses to verify tokens (apikey_redact_require_early_load).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"

#include "apikey.h"
#include "token.h"

static emit_log_hook_type prev_emit_log_hook = NULL;
static char *redacted_query = NULL;

/* log_statement had written the statement that loaded us (see below) */
static bool loaded_after_statement_logged = false;
static char *loaded_with_log_statement = NULL;

/*
 * A copy of s with every token-shaped span replaced by "..." and its tail
 * (ak_...x9Qz), or NULL if s has none.
 */
static char *
redact_string(const char *s)
{
	size_t		len;
	size_t		pos = 0;
	ApikeyShape shape;
	StringInfoData buf;
	bool		any = false;

	if (s == NULL)
		return NULL;
	len = strlen(s);
	if (len < APIKEY_SHAPE_MIN_CHARS)
		return NULL;

	while (apikey_shape_scan(s, len, pos, &shape))
	{
		if (!any)
		{
			initStringInfo(&buf);
			any = true;
		}
		appendBinaryStringInfo(&buf, s + pos, shape.start - pos);
		appendStringInfoString(&buf, "...");
		appendBinaryStringInfo(&buf, s + shape.tail, APIKEY_HINT_TAIL);
		pos = shape.start + shape.len;
	}
	if (!any)
		return NULL;
	appendStringInfoString(&buf, s + pos);
	return buf.data;
}

static void
redact_field(char **field)
{
	char	   *r = redact_string(*field);

	if (r != NULL)
		*field = r;
}

static void
redact_emit_log_hook(ErrorData *edata)
{
	if (apikey_redact_logs)
	{
		char	   *q;

		redact_field(&edata->message);
		redact_field(&edata->detail);
		redact_field(&edata->detail_log);
		redact_field(&edata->hint);
		redact_field(&edata->context);
		redact_field(&edata->internalquery);

		/*
		 * The STATEMENT line is printed from debug_query_string.  Point it
		 * at a redacted copy; it is reset when the next query starts.
		 */
		q = redact_string(debug_query_string);
		if (q != NULL)
		{
			char	   *keep = MemoryContextStrdup(TopMemoryContext, q);

			if (redacted_query != NULL && redacted_query != debug_query_string)
				pfree(redacted_query);
			redacted_query = keep;
			debug_query_string = keep;
		}
	}
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

/*
 * Refuse to verify tokens in a backend that loaded apikey after
 * log_statement had logged the loading statement.
 *
 * The refusal covers the whole backend, not only that statement.  The
 * statement's token is in the log already, and refusing cannot un-log it;
 * what refusing achieves is that the misconfiguration is noticed.  Refusing
 * once would be retried away, and every new connection would then leak one
 * more token in silence.  Refusing every call, until apikey is preloaded
 * and the client reconnects, makes it impossible to miss and caps the leak
 * at one statement per connection.  (A backend that loaded apikey for a
 * statement without a token, e.g. CREATE EXTENSION or LOAD, is refused
 * too: we cannot tell, bind parameters being logged apart from the text.)
 */
void
apikey_redact_require_early_load(void)
{
	if (loaded_after_statement_logged)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("tokens in this session's statements may have been logged before apikey could redact them"),
				 errdetail("apikey was loaded while a statement ran, after log_statement = '%s' had logged it.",
						   loaded_with_log_statement),
				 errhint("Add apikey to shared_preload_libraries, or without a restart run ALTER DATABASE ... SET session_preload_libraries = 'apikey' (or ALTER ROLE), then reconnect.")));
}

/*
 * Were we loaded by a running statement that log_statement has already
 * written?  debug_query_string is set only while a client statement runs
 * (exec_simple_query, and the parse, bind and execute messages); it is
 * NULL when shared_preload_libraries loads us in the postmaster, when
 * session_preload_libraries or local_preload_libraries load us in
 * InitPostgres before the first query, when a parallel worker restores
 * its leader's libraries (before ParallelQueryMain sets it), and in
 * background workers, whose statements log_statement never logs.
 */
static void
note_late_load(void)
{
	if (process_shared_preload_libraries_in_progress ||
		debug_query_string == NULL || log_statement == LOGSTMT_NONE)
		return;
	loaded_after_statement_logged = true;
	loaded_with_log_statement =
		MemoryContextStrdup(TopMemoryContext, GetConfigOption("log_statement", false, false));
}

/* Install the hook; called from _PG_init. */
void
apikey_redact_init(void)
{
	note_late_load();

	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = redact_emit_log_hook;
}
