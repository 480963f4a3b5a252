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
 * Legacy tokens.  Keys imported from another system (legacy.c) have that
 * system's shape and no checksum.  While a legacy format has keys, legacy.c
 * hands us its token_regex whenever it reads the formats in use, and we
 * compile it there and then, unanchored and between word boundaries (no
 * letter, digit or "_" just before or after), so it finds the token inside
 * SQL text but not inside a longer word.  The hook only runs the compiled
 * expressions: no catalog access, nothing that can raise (it may run in an
 * aborted transaction or while an error is reported).  Each match becomes
 * "..." and its last four characters (just "..." under 16 characters),
 * after apikey's own shapes were hidden.  A match without a capital letter
 * or a digit is left as it is: it is words (a qualified name such as
 * apikey.set_owner_limits has bcrypt-prefixed's shape), not a random
 * secret.  Should the regex engine fail (out of memory, a cancel arriving),
 * the whole text is replaced: better a line without its text than a token
 * in clear.  A backend learns the formats in use when it first verifies a
 * legacy token or analyses a statement (legacy.c): log_statement writes a
 * statement before it is analysed, so the first statement of a session is
 * hidden by apikey's own shapes only.  The pg_stat_statements copy below
 * masks apikey's own shapes only.
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

#include "catalog/pg_collation.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "regex/regex.h"
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

/* A character that continues a word: no legacy token starts or ends next to one. */
#define WORD_CHAR		"[A-Za-z0-9_]"

/* A legacy span this long or longer shows its last four characters. */
#define LEGACY_TAIL_MIN	16

/* What a text the regex engine could not scan is replaced by. */
#define UNSCANNED_TEXT	"[text withheld: apikey could not scan it for tokens]"

/*
 * The token shapes of the legacy formats in use, compiled; replaced whole
 * (a new memory context each time) by apikey_redact_set_legacy_shapes().
 */
typedef struct LegacyShapes
{
	MemoryContext cxt;
	int			n;
	regex_t    *re;
} LegacyShapes;

static LegacyShapes *legacy_shapes = NULL;

/*
 * A token_regex made unanchored, between word boundaries: a leading
 * director and embedded options stay first, a leading "^" and a trailing
 * unescaped "$" go.
 */
static char *
unanchored(const char *re)
{
	const char *p = re;
	size_t		len;
	size_t		bs = 0;
	StringInfoData buf;

	initStringInfo(&buf);
	if (strncmp(p, "***:", 4) == 0)
	{
		appendBinaryStringInfo(&buf, p, 4);
		p += 4;
	}
	if (p[0] == '(' && p[1] == '?' && isalpha((unsigned char) p[2]))
	{
		const char *q = p + 2;

		while (isalpha((unsigned char) *q))
			q++;
		if (*q == ')')
		{
			appendBinaryStringInfo(&buf, p, q + 1 - p);
			p = q + 1;
		}
	}
	if (*p == '^')
		p++;
	len = strlen(p);
	while (bs + 1 < len && p[len - 2 - bs] == '\\')
		bs++;
	if (len > 0 && p[len - 1] == '$' && bs % 2 == 0)
		len--;
	appendStringInfo(&buf, "(?<!" WORD_CHAR ")(?:%.*s)(?!" WORD_CHAR ")", (int) len, p);
	return buf.data;
}

/* Free a set of shapes and everything it holds. */
static void
shapes_free(LegacyShapes *set)
{
	int			i;

	if (set == NULL)
		return;
	for (i = 0; i < set->n; i++)
		pg_regfree(&set->re[i]);
	MemoryContextDelete(set->cxt);
}

/*
 * Compile one format's shape into re; false, with a WARNING, if it does not
 * compile unanchored (its tokens are then hidden by apikey's shapes only).
 */
static bool
shape_compile(const char *name, const char *token_regex, regex_t *re)
{
	char	   *pattern = unanchored(token_regex);
	size_t		len = strlen(pattern);
	pg_wchar   *w = palloc((len + 1) * sizeof(pg_wchar));
	int			wlen = pg_mb2wchar_with_len(pattern, w, len);
	int			rc = pg_regcomp(re, w, wlen, REG_ADVANCED, C_COLLATION_OID);
	char		msg[128];

	if (rc == REG_OKAY)
		return true;
	pg_regerror(rc, re, msg, sizeof(msg));
	ereport(WARNING,
			(errcode(ERRCODE_INVALID_REGULAR_EXPRESSION),
			 errmsg("the log redactor cannot use the token_regex of legacy format \"%s\": %s",
					name, msg),
			 errhint("Anchor it with a leading ^ and a trailing $ only, as the presets are.")));
	return false;
}

/*
 * The token expressions of the legacy formats in use (legacy.c, when it
 * has read them): compile each one's shape now, and let the log hook use
 * the new set from now on.
 */
void
apikey_redact_set_legacy_shapes(char **names, char **token_regexes, int n)
{
	MemoryContext cxt = AllocSetContextCreate(TopMemoryContext, "apikey legacy shapes",
											  ALLOCSET_SMALL_SIZES);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	LegacyShapes *set = palloc0(sizeof(LegacyShapes));
	int			i;

	set->cxt = cxt;
	set->re = palloc0(sizeof(regex_t) * Max(n, 1));
	PG_TRY();
	{
		for (i = 0; i < n; i++)
			if (shape_compile(names[i], token_regexes[i], &set->re[set->n]))
				set->n++;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(old);
		shapes_free(set);
		PG_RE_THROW();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(old);
	shapes_free(legacy_shapes);
	legacy_shapes = set;
}

/*
 * The next non-empty match of shape k in w at or after from: true with
 * [*so, *eo), false if none; *failed if the regex engine failed.
 */
static bool
shape_next(int k, const pg_wchar *w, size_t len, size_t from,
		   size_t *so, size_t *eo, bool *failed)
{
	regmatch_t	m[1];

	while (from <= len)
	{
		int			rc = pg_regexec(&legacy_shapes->re[k], w, len, from, NULL, 1, m, 0);

		if (rc == REG_NOMATCH)
			return false;
		if (rc != REG_OKAY)
		{
			*failed = true;
			return false;
		}
		if (m[0].rm_eo > m[0].rm_so)
		{
			*so = m[0].rm_so;
			*eo = m[0].rm_eo;
			return true;
		}
		from = m[0].rm_so + 1;	/* an empty match hides nothing */
	}
	return false;
}

/*
 * Does the span hold a capital letter or a digit?  A span without either is
 * taken for words, not a token: bcrypt-prefixed's shape is also that of a
 * qualified name (apikey.set_owner_limits), sha256's that of some
 * identifiers, while a secret of 16 random letters and digits (or base64
 * characters) has neither with a chance of about one in a million.
 */
static bool
looks_random(const char *s, size_t len)
{
	size_t		i;

	for (i = 0; i < len; i++)
		if ((s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= '0' && s[i] <= '9'))
			return true;
	return false;
}

/*
 * A copy of s with every span shaped like a token of a legacy format in use
 * (and holding a capital or a digit) replaced by "..." and its last four
 * characters, or NULL if s has none; *failed (and NULL) if the regex engine
 * failed.  Each byte is one regex character (a legacy token is ASCII); a
 * span never ends inside a run of non-ASCII bytes, so no multibyte
 * character is cut.  Overlapping matches of several formats make one span.
 */
static char *
redact_legacy(const char *s, uint64 *spans, bool *failed)
{
	size_t		len = strlen(s);
	int			n = legacy_shapes->n;
	pg_wchar   *w;
	size_t	   *so;
	size_t	   *eo;
	bool	   *found;
	size_t		pos = 0;
	size_t		copied = 0;
	size_t		i;
	int			k;
	StringInfoData buf;
	bool		any = false;

	w = palloc_extended((len + 1) * sizeof(pg_wchar), MCXT_ALLOC_HUGE | MCXT_ALLOC_NO_OOM);
	if (w == NULL)
	{
		*failed = true;
		return NULL;
	}
	so = palloc(sizeof(size_t) * n);
	eo = palloc(sizeof(size_t) * n);
	found = palloc(sizeof(bool) * n);
	for (i = 0; i < len; i++)
		w[i] = (unsigned char) s[i];
	for (k = 0; k < n; k++)
		found[k] = shape_next(k, w, len, 0, &so[k], &eo[k], failed);

	for (;;)
	{
		size_t		start = len;
		size_t		end = 0;
		bool		grew = true;

		if (*failed)
			return NULL;
		for (k = 0; k < n; k++)
			if (found[k] && so[k] < start)
			{
				start = so[k];
				end = eo[k];
			}
		if (start == len)
			break;
		/* the union of the matches that overlap this one */
		while (grew)
		{
			grew = false;
			for (k = 0; k < n; k++)
				if (found[k] && so[k] < end && eo[k] > end)
				{
					end = eo[k];
					grew = true;
				}
		}
		while (start > 0 && IS_HIGHBIT_SET(s[start]) && IS_HIGHBIT_SET(s[start - 1]))
			start--;
		while (end < len && IS_HIGHBIT_SET(s[end]) && IS_HIGHBIT_SET(s[end - 1]))
			end++;
		pos = end;
		for (k = 0; k < n; k++)
			if (found[k] && so[k] < pos)
				found[k] = shape_next(k, w, len, pos, &so[k], &eo[k], failed);
		if (!looks_random(s + start, end - start))
			continue;

		if (!any)
		{
			initStringInfo(&buf);
			any = true;
		}
		appendBinaryStringInfo(&buf, s + copied, start - copied);
		appendStringInfoString(&buf, "...");
		if (end - start >= LEGACY_TAIL_MIN &&
			!IS_HIGHBIT_SET(s[end - 4]) && !IS_HIGHBIT_SET(s[end - 3]) &&
			!IS_HIGHBIT_SET(s[end - 2]) && !IS_HIGHBIT_SET(s[end - 1]))
			appendBinaryStringInfo(&buf, s + end - 4, 4);
		copied = end;
		(*spans)++;
	}
	if (!any)
		return NULL;
	appendStringInfoString(&buf, s + copied);
	return buf.data;
}

/*
 * A copy of s with every span shaped like one of apikey's tokens replaced by
 * "..." and its tail (ak_...x9Qz), or NULL if s has none.
 */
static char *
redact_own_shapes(const char *s, uint64 *spans)
{
	size_t		len;
	size_t		pos = 0;
	ApikeyShape shape;
	StringInfoData buf;
	bool		any = false;

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
		(*spans)++;
	}
	if (!any)
		return NULL;
	appendStringInfoString(&buf, s + pos);
	return buf.data;
}

/*
 * A copy of s with apikey's token shapes, then the legacy formats' in use,
 * hidden; NULL if s has none.
 */
static char *
redact_string(const char *s)
{
	uint64		spans = 0;
	char	   *r;

	if (s == NULL)
		return NULL;
	r = redact_own_shapes(s, &spans);
	if (legacy_shapes != NULL && legacy_shapes->n > 0)
	{
		bool		failed = false;
		char	   *l = redact_legacy(r != NULL ? r : s, &spans, &failed);

		if (failed)
		{
			l = pstrdup(UNSCANNED_TEXT);
			spans++;
		}
		if (l != NULL)
			r = l;
	}
	if (spans > 0)
		apikey_stats_redacted(spans);
	return r;
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
