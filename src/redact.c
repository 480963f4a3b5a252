/*-------------------------------------------------------------------------
 *
 * redact.c
 *	  Keep tokens out of the server log and out of pg_stat_statements.
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
 * a valid token ak_<body> becomes its hint, ak_...x9Qz.  Each span hidden is
 * counted (apikey.stats.tokens_redacted), so a leak into the log shows.
 *
 * pg_stat_statements.  It replaces the constants of plannable statements by
 * $1, but stores utility statements (DO, CALL, COPY, EXPLAIN, CREATE TABLE
 * AS, DECLARE, ...) verbatim.  Our ProcessUtility hook hands the next hook
 * a copy of the query string with every token-shaped span overwritten in
 * place, so pstmt->stmt_location and stmt_len still hold.
 *
 * Hook order.  The library loaded last runs its hooks first, so apikey must
 * be listed last in shared_preload_libraries for pg_stat_statements,
 * pgaudit, auto_explain and other log hooks to see redacted text; we warn at
 * server start when it is not.
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
#include "tcop/utility.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/varlena.h"

#include "apikey.h"
#include "token.h"

static emit_log_hook_type prev_emit_log_hook = NULL;
static ProcessUtility_hook_type prev_ProcessUtility = NULL;
static char *redacted_query = NULL;

/* log_statement had written the statement that loaded us (see below) */
/* GUC: apikey.redact_logs */
static bool redact_logs = true;

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
	uint64		spans = 0;

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
		spans++;
	}
	if (!any)
		return NULL;
	apikey_stats_redacted(spans);
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
	if (redact_logs)
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
 * A copy of queryString with every token-shaped span of one statement's
 * text overwritten: "...", then '*', then the span's tail (ak_...***x9Qz);
 * NULL if that text has none.  Same length, so offsets into the string
 * (stmt_location, error positions) still hold.  The statement's text is
 * cut as pg_stat_statements cuts it (location -1: the whole string; length
 * 0: to the end).  Only that is scanned: scanning the whole string for each
 * statement of a long multi-statement query would cost quadratic time.
 */
static char *
mask_statement(const char *queryString, int location, int len)
{
	size_t		start = (location >= 0) ? location : 0;
	size_t		end;
	size_t		pos = start;
	ApikeyShape shape;
	char	   *copy = NULL;

	if (location >= 0 && len > 0)
		end = start + len;
	else
		end = start + strlen(queryString + start);

	while (apikey_shape_scan(queryString, end, pos, &shape))
	{
		char	   *span;

		if (copy == NULL)
			copy = pstrdup(queryString);
		span = copy + shape.start;
		memset(span, '*', shape.len);
		memcpy(span, "...", 3);
		memcpy(span + shape.len - APIKEY_HINT_TAIL, queryString + shape.tail,
			   APIKEY_HINT_TAIL);
		pos = shape.start + shape.len;
	}
	return copy;
}

/*
 * Pass the next hook (pg_stat_statements, when apikey is listed after it)
 * the query string with the statement's tokens masked.
 *
 * Safe because no utility command re-parses queryString to execute it:
 * they run the parse tree in pstmt, and use the string for error positions
 * and for display only.  What we checked in PostgreSQL 15's source:
 *
 * - tcop/utility.c: standard_ProcessUtility and ProcessUtilitySlow put it
 *	 in pstate->p_sourcetext, or pass it on with stmt_location/stmt_len
 *	 (CREATE SCHEMA's subcommands come back through this hook).
 * - commands/functioncmds.c: DO runs codeblock->source_text, which comes
 *	 from the parse tree; CALL runs stmt->funcexpr, analysed already.
 * - commands/copy.c, copyto.c: COPY (query) analyses the raw query taken
 *	 from the parse tree; the string becomes the QueryDesc's sourceText.
 * - commands/explain.c: EXPLAIN rewrites and plans stmt->query; the string
 *	 is sourceText and error positions.
 * - commands/createas.c: CREATE TABLE AS plans stmt->query; the same.
 * - commands/prepare.c: PREPARE keeps a copy as the cached plan's
 *	 query_string (pg_prepared_statements); a replan re-analyses the saved
 *	 raw parse tree, the string serving error positions.
 * - commands/portalcmds.c: DECLARE plans cstmt->query and keeps a copy as
 *	 the cursor's sourceText (pg_cursors).
 * - commands/view.c, parser/parse_utilcmd.c: CREATE VIEW, CREATE TABLE,
 *	 CREATE INDEX and rules analyse parse trees; the string gives positions.
 * - The only raw_parser()/pg_parse_query() calls under commands/ parse text
 *	 that PostgreSQL generates (ALTER TABLE's rebuilt indexes, IMPORT FOREIGN
 *	 SCHEMA, extension scripts), never queryString.
 *
 * So a masked copy changes what is displayed, which is the point, and
 * nothing else.  Hooks chain from the library loaded last: ours must run
 * before pg_stat_statements', so apikey is listed last in
 * shared_preload_libraries (check_listed_last warns otherwise).
 *
 * The copy is not freed: commands may keep pointers to it for as long as
 * the caller's memory context lives, which frees it.
 */
static void
redact_ProcessUtility(PlannedStmt *pstmt, const char *queryString,
					  bool readOnlyTree,
					  ProcessUtilityContext context, ParamListInfo params,
					  QueryEnvironment *queryEnv, DestReceiver *dest,
					  QueryCompletion *qc)
{
	char	   *masked = mask_statement(queryString, pstmt->stmt_location,
										pstmt->stmt_len);

	if (masked != NULL)
		queryString = masked;

	if (prev_ProcessUtility)
		prev_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
							queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
								queryEnv, dest, qc);
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

/*
 * Warn at server start when a library is listed after apikey in
 * shared_preload_libraries: its hooks run before ours and see tokens.
 */
static void
check_listed_last(void)
{
	char	   *rawstring;
	List	   *elemlist;
	const char *last;
	const char *base;

	if (!process_shared_preload_libraries_in_progress || IsUnderPostmaster)
		return;
	rawstring = pstrdup(shared_preload_libraries_string);
	if (!SplitDirectoriesString(rawstring, ',', &elemlist) || elemlist == NIL)
		return;
	last = (const char *) llast(elemlist);
	base = last_dir_separator(last);
	base = base ? base + 1 : last;
	if (strcmp(base, "apikey") == 0 || strcmp(base, "apikey" DLSUFFIX) == 0)
		return;
	ereport(WARNING,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("apikey is not the last library in shared_preload_libraries"),
			 errdetail("Hooks of libraries listed after apikey, such as \"%s\", see statements and log messages before apikey redacts their tokens.",
					   last),
			 errhint("List apikey last in shared_preload_libraries.")));
}

/* Install the hooks; called from _PG_init. */
void
apikey_redact_init(void)
{
	DefineCustomBoolVariable("apikey.redact_logs",
							 "Replace API tokens in server log messages by their non-secret hint.",
							 NULL,
							 &redact_logs,
							 true,
							 PGC_SUSET, 0,
							 NULL, NULL, NULL);

	note_late_load();
	check_listed_last();

	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = redact_emit_log_hook;
	prev_ProcessUtility = ProcessUtility_hook;
	ProcessUtility_hook = redact_ProcessUtility;
}
