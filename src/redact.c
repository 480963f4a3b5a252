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
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "lib/stringinfo.h"
#include "tcop/tcopprot.h"
#include "utils/memutils.h"

#include "apikey.h"
#include "token.h"

static emit_log_hook_type prev_emit_log_hook = NULL;
static char *redacted_query = NULL;

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

/* Install the hook; called from _PG_init. */
void
apikey_redact_init(void)
{
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = redact_emit_log_hook;
}
