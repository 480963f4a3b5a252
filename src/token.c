/*-------------------------------------------------------------------------
 *
 * token.c
 *	  Parse, build and find apikey tokens.
 *
 * A token is <prefix>_<secret><checksum>.  The checksum is the standard
 * CRC-32 (pg_crc.h's TRADITIONAL_CRC32, the one zlib computes) of every
 * character before it, written as six base62 digits.  It lets us reject a
 * typo, a truncated paste or random garbage without touching a table.  It
 * is public, so it is no secret either: the log redactor hides everything
 * shaped like a token (apikey_shape_scan, rules in token.h), and uses the
 * checksum only to show a valid token's stored hint.
 *
 * Nothing in this file allocates memory or raises errors, so the libFuzzer
 * harness (fuzz/fuzz_token.c) can drive it without a server.
 *
 *-------------------------------------------------------------------------
 */
#include "c.h"

#include "utils/pg_crc.h"

#include "token.h"

static const char base62_digits[] =
"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

static inline bool
is_base62(unsigned char c)
{
	return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') ||
		(c >= 'a' && c <= 'z');
}

/* Value of a base62 digit (the caller has checked it is one). */
static inline uint32
base62_value(unsigned char c)
{
	if (c <= '9')
		return c - '0';
	if (c <= 'Z')
		return c - 'A' + 10;
	return c - 'a' + 36;
}

static inline bool
is_prefix_char(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
}

/*
 * Write a big-endian unsigned number as exactly nchars base62 digits,
 * most significant first.  The caller picks nchars large enough for the
 * number (62^nchars > 256^nbytes), so no digit is ever lost.
 *
 * Schoolbook long division, but by 62^5 (which fits in 32 bits) over
 * 32-bit limbs: five digits per pass and four bytes per step, about thirty
 * times fewer divisions than one digit and one byte at a time.
 */
void
apikey_base62_fixed(const uint8 *bytes, size_t nbytes, char *out, size_t nchars)
{
#define BASE62_POW5 916132832U	/* 62^5 */
	uint32		limb[(APIKEY_SECRET_BYTES + 3) / 4];
	size_t		nlimbs = (nbytes + 3) / 4;
	size_t		first = 0;		/* limbs before it are zero */
	size_t		i;

	Assert(nbytes <= APIKEY_SECRET_BYTES);

	/* big-endian bytes into big-endian limbs, the top one padded with zeros */
	memset(limb, 0, sizeof(limb));
	for (i = 0; i < nbytes; i++)
	{
		size_t		pos = nlimbs * 4 - nbytes + i;

		limb[pos / 4] |= (uint32) bytes[i] << (8 * (3 - pos % 4));
	}

	for (i = nchars; i > 0;)
	{
		uint64		rem = 0;
		size_t		j;
		int			d;

		/* limb = limb / 62^5, rem = limb % 62^5 */
		for (j = first; j < nlimbs; j++)
		{
			uint64		cur = (rem << 32) | limb[j];

			limb[j] = (uint32) (cur / BASE62_POW5);
			rem = cur % BASE62_POW5;
		}
		while (first < nlimbs && limb[first] == 0)
			first++;
		for (d = 0; d < 5 && i > 0; d++)
		{
			out[--i] = base62_digits[rem % 62];
			rem /= 62;
		}
	}
#undef BASE62_POW5
}

/* CRC-32 of data, as used for the token checksum. */
uint32
apikey_checksum(const char *data, size_t len)
{
	pg_crc32	crc;

	INIT_TRADITIONAL_CRC32(crc);
	COMP_TRADITIONAL_CRC32(crc, data, len);
	FIN_TRADITIONAL_CRC32(crc);
	return crc;
}

/* Write the six checksum characters for data into out. */
static void
checksum_chars(const char *data, size_t len, char *out)
{
	uint32		crc = apikey_checksum(data, len);
	uint8		be[4];

	be[0] = (uint8) (crc >> 24);
	be[1] = (uint8) (crc >> 16);
	be[2] = (uint8) (crc >> 8);
	be[3] = (uint8) crc;
	apikey_base62_fixed(be, sizeof(be), out, APIKEY_CHECKSUM_CHARS);
}

/* Is prefix[0..len) of the form [a-z][a-z0-9_]{0,15}? */
bool
apikey_prefix_is_valid(const char *prefix, size_t len)
{
	size_t		i;

	if (len < 1 || len > APIKEY_PREFIX_MAXLEN)
		return false;
	if (prefix[0] < 'a' || prefix[0] > 'z')
		return false;
	for (i = 1; i < len; i++)
		if (!is_prefix_char((unsigned char) prefix[i]))
			return false;
	return true;
}

/*
 * Check that token[0..len) is a well-formed token.  On success the length
 * of its prefix is stored in *prefix_len.
 *
 * The prefix may itself contain underscores, but the body cannot, so the
 * body is always the last APIKEY_BODY_CHARS characters and the separator is
 * the character just before them.
 */
ApikeyParseResult
apikey_token_parse(const char *token, size_t len, size_t *prefix_len)
{
	size_t		plen;
	size_t		i;
	uint64		written = 0;

	if (len < APIKEY_TOKEN_MINLEN || len > APIKEY_TOKEN_MAXLEN)
		return APIKEY_PARSE_BAD_LENGTH;

	plen = len - APIKEY_BODY_CHARS - 1;
	if (token[plen] != '_' || !apikey_prefix_is_valid(token, plen))
		return APIKEY_PARSE_BAD_PREFIX;

	for (i = plen + 1; i < len; i++)
		if (!is_base62((unsigned char) token[i]))
			return APIKEY_PARSE_BAD_BODY;

	/*
	 * Decode the six checksum digits (cheaper than encoding the CRC) and
	 * compare numbers; 62^6 > 2^32, so a value past 32 bits is simply wrong.
	 */
	for (i = len - APIKEY_CHECKSUM_CHARS; i < len; i++)
		written = written * 62 + base62_value((unsigned char) token[i]);
	if (written != apikey_checksum(token, len - APIKEY_CHECKSUM_CHARS))
		return APIKEY_PARSE_BAD_CHECKSUM;

	*prefix_len = plen;
	return APIKEY_PARSE_OK;
}

/*
 * Build a token from a prefix and APIKEY_SECRET_BYTES of random secret.
 * out must have room for APIKEY_TOKEN_MAXLEN + 1 bytes; the result is
 * NUL-terminated.  Returns false if the prefix is invalid.
 */
bool
apikey_token_build(const char *prefix, size_t prefix_len, const uint8 *secret,
				   char *out, size_t outlen)
{
	size_t		pos;

	if (!apikey_prefix_is_valid(prefix, prefix_len) ||
		outlen < prefix_len + 1 + APIKEY_BODY_CHARS + 1)
		return false;

	memcpy(out, prefix, prefix_len);
	pos = prefix_len;
	out[pos++] = '_';
	apikey_base62_fixed(secret, APIKEY_SECRET_BYTES, out + pos,
						APIKEY_SECRET_CHARS);
	pos += APIKEY_SECRET_CHARS;
	checksum_chars(out, pos, out + pos);
	pos += APIKEY_CHECKSUM_CHARS;
	out[pos] = '\0';
	return true;
}

/*
 * The non-secret display form of a well-formed token: its prefix, "_...",
 * and its last four characters (part of the checksum), e.g. "ak_...x9Qz".
 * hint must have room for APIKEY_HINT_MAXLEN bytes.
 */
void
apikey_token_hint(const char *token, size_t len, size_t prefix_len, char *hint)
{
	memcpy(hint, token, prefix_len);
	memcpy(hint + prefix_len, "_...", 4);
	memcpy(hint + prefix_len + 4, token + len - APIKEY_HINT_TAIL,
		   APIKEY_HINT_TAIL);
	hint[prefix_len + 4 + APIKEY_HINT_TAIL] = '\0';
}

/*
 * Find the first well-formed token inside text[0..len).  Returns its length
 * and stores its offset in *start, or returns 0 if there is none.
 *
 * A candidate is anchored on an underscore followed by APIKEY_BODY_CHARS
 * base62 characters; every prefix that could end at that underscore is
 * tried, longest first, and only one whose checksum matches is reported.
 * Word boundaries are deliberately not required: a token glued to other
 * text is still a token, and redacting it is the safe side.
 */
size_t
apikey_token_scan(const char *text, size_t len, size_t *start)
{
	size_t		u;

	for (u = 1; u + APIKEY_BODY_CHARS < len; u++)
	{
		size_t		end;
		size_t		i;
		size_t		lo;
		size_t		s;

		if (text[u] != '_')
			continue;

		end = u + 1 + APIKEY_BODY_CHARS;
		for (i = u + 1; i < end; i++)
			if (!is_base62((unsigned char) text[i]))
				break;
		if (i < end)
			continue;

		lo = (u > APIKEY_PREFIX_MAXLEN) ? u - APIKEY_PREFIX_MAXLEN : 0;
		for (s = lo; s < u; s++)
		{
			size_t		plen;

			if (apikey_token_parse(text + s, end - s, &plen) == APIKEY_PARSE_OK)
			{
				*start = s;
				return end - s;
			}
		}
	}
	return 0;
}

/* End of the run of base62 characters that starts at text[pos]. */
static size_t
run_end(const char *text, size_t len, size_t pos)
{
	while (pos < len && is_base62((unsigned char) text[pos]))
		pos++;
	return pos;
}

/*
 * Does the run starting at r0 begin with the body of a checksum-valid
 * token?  Its prefix and "_" come before r0 and may lie before the part of
 * the text being scanned: they are only read.
 */
static bool
run_starts_valid_token(const char *text, size_t len, size_t r0)
{
	size_t		end = r0 + APIKEY_BODY_CHARS;
	size_t		u = r0 - 1;
	size_t		s;

	if (r0 < 2 || end > len || text[u] != '_')
		return false;
	for (s = (u > APIKEY_PREFIX_MAXLEN) ? u - APIKEY_PREFIX_MAXLEN : 0; s < u; s++)
	{
		size_t		plen;

		if (apikey_token_parse(text + s, end - s, &plen) == APIKEY_PARSE_OK)
			return true;
	}
	return false;
}

/*
 * Find the first token-shaped span (see token.h) in text[from..len).
 * Returns false if there is none.  Runs are measured from "from", so a
 * caller that resumes at the end of the previous span never gets an
 * overlapping one.  Linear: every run is measured at most twice.
 */
bool
apikey_shape_scan(const char *text, size_t len, size_t from, ApikeyShape *shape)
{
	size_t		pos = from;

	while (pos < len)
	{
		size_t		r0 = pos;
		size_t		r1;

		if (!is_base62((unsigned char) text[pos]))
		{
			pos++;
			continue;
		}
		r1 = run_end(text, len, r0);

		if (r1 - r0 >= APIKEY_SHAPE_MIN_CHARS)
		{
			shape->start = r0;
			shape->len = r1 - r0;
			shape->valid = run_starts_valid_token(text, len, r0);
			shape->tail = shape->valid ?
				r0 + APIKEY_BODY_CHARS - APIKEY_HINT_TAIL : r1 - APIKEY_HINT_TAIL;
			return true;
		}

		/* one stray byte, then a run that is also too short alone? */
		if (r1 + 1 < len && is_base62((unsigned char) text[r1 + 1]))
		{
			size_t		r2 = run_end(text, len, r1 + 1);

			if (r2 - (r1 + 1) < APIKEY_SHAPE_MIN_CHARS &&
				(r1 - r0) + (r2 - r1 - 1) >= APIKEY_SHAPE_MIN_CHARS)
			{
				shape->start = r0;
				shape->len = r2 - r0;
				shape->valid = false;
				shape->tail = r2 - APIKEY_HINT_TAIL;
				return true;
			}
		}
		pos = r1;
	}
	return false;
}
