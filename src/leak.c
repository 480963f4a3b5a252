/*-------------------------------------------------------------------------
 *
 * leak.c
 *	  Find tokens in free text, for leak response: apikey.find_tokens(),
 *	  report_leaks(), revoke_leaked(), leak_guard() and audit_for_token()
 *	  are SQL over apikey._scan_tokens().
 *
 * The log redactor (redact.c) hides everything shaped like a token, valid
 * or not, because hiding too much costs nothing.  Here the opposite holds:
 * each token found is looked up and may get its key revoked, so only
 * checksum-valid tokens count.  A random string passes the CRC-32 once in
 * 2^32 tries; a near miss (one character off) never does, and is no
 * token of ours.
 *
 * The hash is computed here, so SQL never needs the token again: callers
 * join apikey.keys on it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"

#include "apikey.h"
#include "token.h"

/*
 * Every checksum-valid token in s[0..len), left to right, without
 * overlaps, as rows (pos int, len int, prefix text, hint text, hash bytea)
 * of apikey._scan_tokens().  pos counts characters from 1, as strpos()
 * and substr() do.
 */
void
apikey_leak_scan(const char *s, size_t len, Tuplestorestate *out, TupleDesc desc)
{
	size_t		pos = 0;
	int64		chars = 0;		/* characters in s[0..pos) */

	while (pos < len)
	{
		size_t		start;
		size_t		tlen = apikey_token_scan(s + pos, len - pos, &start);
		size_t		plen;
		char		hint[APIKEY_HINT_MAXLEN];
		Datum		values[5];
		bool		nulls[5] = {false, false, false, false, false};

		if (tlen == 0)
			break;
		CHECK_FOR_INTERRUPTS();
		start += pos;
		chars += pg_mbstrlen_with_len(s + pos, start - pos);
		if (apikey_token_parse(s + start, tlen, &plen) != APIKEY_PARSE_OK)
			elog(ERROR, "token scan returned a malformed token");
		apikey_token_hint(s + start, tlen, plen, hint);

		values[0] = Int32GetDatum((int32) (chars + 1));
		values[1] = Int32GetDatum((int32) tlen);
		values[2] = PointerGetDatum(cstring_to_text_with_len(s + start, plen));
		values[3] = CStringGetTextDatum(hint);
		values[4] = PointerGetDatum(apikey_sha256_bytea(s + start, tlen));
		tuplestore_putvalues(out, desc, values, nulls);

		chars += tlen;			/* a token is ASCII */
		pos = start + tlen;
	}
}
