/*-------------------------------------------------------------------------
 *
 * fuzz_token.c
 *	  libFuzzer harness for src/token.c: the token parser, builder, hint
 *	  and free-text scanner, run without a server.
 *
 * Every input is used several ways, and each way checks properties, not
 * only the absence of a crash:
 *
 *	 raw		the input itself is parsed and scanned: whatever parse()
 *				accepts is structurally a token; every match scan() reports
 *				parses OK and lies inside the text.
 *	 reference	apikey_checksum() equals an independent bitwise CRC-32;
 *				apikey_prefix_is_valid() equals an independent check;
 *				apikey_base62_fixed() round-trips through a decoder.
 *	 derived	a prefix and a secret taken from the input are built into a
 *				token; it parses OK with the same prefix, and the secret
 *				decodes back; every 1-byte substitution and every swap of
 *				two different adjacent characters is rejected (CRC-32
 *				detects every burst error up to 32 bits, so this is a
 *				guarantee, not a probability); the hint has the documented
 *				shape and is not itself a token; the token embedded between
 *				two slices of the input is found by scan() at its offset.
 *	 shape		apikey_shape_scan() over the raw input and around the
 *				derived token: every span lies inside the text, starts and
 *				ends on a run of base62 with at most one stray byte inside,
 *				never overlaps the previous one, and is the same when asked
 *				twice; every run of APIKEY_SHAPE_MIN_CHARS base62 and every
 *				valid token's body is covered; the redacted text has no
 *				span that does not contain a hint's tail.  Near misses of
 *				the derived token (truncated, one byte changed to anything,
 *				wrong or uppercased prefix) keep their body covered; with a
 *				stray byte, at least APIKEY_BODY_CHARS - APIKEY_SHAPE_MIN_CHARS
 *				of the other body characters are.
 *
 * Output buffers are malloc'd at exactly the documented size, so
 * AddressSanitizer reports any write past them.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres_fe.h"

#include <stdio.h>
#include <stdlib.h>

#include "token.h"

#define CHECK(cond) \
	do { \
		if (!(cond)) \
		{ \
			fprintf(stderr, "fuzz_token: property violated at %s:%d: %s\n", \
					__FILE__, __LINE__, #cond); \
			abort(); \
		} \
	} while (0)

static const char digits62[] =
"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
static const char prefix_rest[] = "abcdefghijklmnopqrstuvwxyz0123456789_";

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Consume the input front to back; zeros once it runs out. */
typedef struct Reader
{
	const uint8_t *p;
	size_t		left;
} Reader;

static uint8_t
take(Reader *r)
{
	if (r->left == 0)
		return 0;
	r->left--;
	return *r->p++;
}

/* Reference CRC-32 (IEEE 802.3, reflected 0xEDB88320), bit by bit. */
static uint32_t
ref_crc32(const uint8_t *p, size_t len)
{
	uint32_t	crc = 0xFFFFFFFF;
	size_t		i;
	int			b;

	for (i = 0; i < len; i++)
	{
		crc ^= p[i];
		for (b = 0; b < 8; b++)
			crc = (crc >> 1) ^ (0xEDB88320 & (0 - (crc & 1)));
	}
	return crc ^ 0xFFFFFFFF;
}

/* Reference for [a-z][a-z0-9_]{0,15}. */
static bool
ref_prefix_valid(const uint8_t *p, size_t len)
{
	size_t		i;

	if (len < 1 || len > 16 || p[0] < 'a' || p[0] > 'z')
		return false;
	for (i = 1; i < len; i++)
		if (!((p[i] >= 'a' && p[i] <= 'z') || (p[i] >= '0' && p[i] <= '9') || p[i] == '_'))
			return false;
	return true;
}

static int
digit_value(char c)
{
	const char *d = strchr(digits62, c);

	return (c != '\0' && d != NULL) ? (int) (d - digits62) : -1;
}

/*
 * Decode nchars base62 digits into an nbytes big-endian number.  Returns
 * false if a character is not a digit or the value does not fit.
 */
static bool
decode62(const char *s, size_t nchars, uint8_t *out, size_t nbytes)
{
	size_t		i;

	memset(out, 0, nbytes);
	for (i = 0; i < nchars; i++)
	{
		int			v = digit_value(s[i]);
		uint32_t	carry;
		size_t		j;

		if (v < 0)
			return false;
		carry = (uint32_t) v;
		for (j = nbytes; j > 0; j--)
		{
			uint32_t	cur = (uint32_t) out[j - 1] * 62 + carry;

			out[j - 1] = (uint8_t) cur;
			carry = cur >> 8;
		}
		if (carry != 0)
			return false;
	}
	return true;
}

/* Smallest nchars with 62^nchars >= 256^nbytes. */
static size_t
chars_needed(size_t nbytes)
{
	/* 62^n >= 2^(8 nbytes) <=> n * log2(62) >= 8 nbytes; log2(62) = 5.954... */
	size_t		n = 0;

	while ((double) n * 5.954196310386876 < 8.0 * (double) nbytes)
		n++;
	return n;
}

/* The properties of any string parse() accepts. */
static void
check_parsed(const char *tok, size_t len, size_t plen)
{
	char	   *hint;
	size_t		hlen;
	size_t		start;
	uint32_t	crc;
	uint8_t		be[4];
	char		sum[APIKEY_CHECKSUM_CHARS];

	CHECK(len >= APIKEY_TOKEN_MINLEN && len <= APIKEY_TOKEN_MAXLEN);
	CHECK(plen == len - APIKEY_BODY_CHARS - 1);
	CHECK(ref_prefix_valid((const uint8_t *) tok, plen));
	CHECK(tok[plen] == '_');
	for (size_t i = plen + 1; i < len; i++)
		CHECK(digit_value(tok[i]) >= 0);

	/* the last six characters are base62 of the CRC-32 of the rest */
	crc = ref_crc32((const uint8_t *) tok, len - APIKEY_CHECKSUM_CHARS);
	be[0] = crc >> 24;
	be[1] = crc >> 16;
	be[2] = crc >> 8;
	be[3] = crc;
	apikey_base62_fixed(be, 4, sum, APIKEY_CHECKSUM_CHARS);
	CHECK(memcmp(sum, tok + len - APIKEY_CHECKSUM_CHARS, APIKEY_CHECKSUM_CHARS) == 0);

	/* hint: "<prefix>_..." and the last four characters, nothing more */
	hint = malloc(APIKEY_HINT_MAXLEN);
	apikey_token_hint(tok, len, plen, hint);
	hlen = strlen(hint);
	CHECK(hlen == plen + 4 + APIKEY_HINT_TAIL);
	CHECK(hlen <= APIKEY_HINT_MAXLEN - 1);
	CHECK(memcmp(hint, tok, plen) == 0);
	CHECK(memcmp(hint + plen, "_...", 4) == 0);
	CHECK(memcmp(hint + plen + 4, tok + len - APIKEY_HINT_TAIL, APIKEY_HINT_TAIL) == 0);
	CHECK(apikey_token_scan(hint, hlen, &start) == 0);
	free(hint);

	/* scanning the token alone finds exactly it */
	CHECK(apikey_token_scan(tok, len, &start) == len && start == 0);
}

/*
 * Scan text the way redact.c does, checking every match.  Returns true if
 * a match covering any of text[want_off, want_off + want_len) was reported:
 * the token itself, or a token it is glued to (the text before it can end
 * in a well-formed token whose checksum ends with the token's first
 * character, a CRC-32 collision the fuzzer's comparison tracing finds; the
 * scan reports that one and resumes after it).  Every match is a
 * well-formed token either way.
 */
static bool
scan_all(const char *text, size_t len, size_t want_off, size_t want_len)
{
	size_t		pos = 0;
	size_t		start;
	size_t		tlen;
	bool		seen = false;

	while ((tlen = apikey_token_scan(text + pos, len - pos, &start)) > 0)
	{
		size_t		plen;
		size_t		at = pos + start;

		CHECK(start + tlen <= len - pos);
		CHECK(apikey_token_parse(text + at, tlen, &plen) == APIKEY_PARSE_OK);
		if (at < want_off + want_len && want_off < at + tlen)
			seen = true;
		pos += start + tlen;
	}
	return seen;
}

static bool
is62(char c)
{
	return digit_value(c) >= 0;
}

/*
 * Every span apikey_shape_scan() reports in text[from..len), checked one by
 * one.  Marks the bytes they cover in covered[] (len bytes, or NULL) and
 * returns the number of spans.
 */
static int
shape_all(const char *text, size_t len, size_t from, uint8_t *covered)
{
	size_t		pos = from;
	ApikeyShape sh;
	int			n = 0;

	while (apikey_shape_scan(text, len, pos, &sh))
	{
		ApikeyShape again;
		size_t		end = sh.start + sh.len;
		size_t		stray = 0;
		size_t		i;

		/* inside the input, after the previous span, the tail inside it */
		CHECK(sh.start >= pos && sh.start < len);
		CHECK(sh.len >= APIKEY_SHAPE_MIN_CHARS && end <= len);
		CHECK(sh.tail >= sh.start && sh.tail + APIKEY_HINT_TAIL <= end);

		/* deterministic */
		CHECK(apikey_shape_scan(text, len, pos, &again));
		CHECK(again.start == sh.start && again.len == sh.len &&
			  again.tail == sh.tail && again.valid == sh.valid);

		/* maximal runs of base62, with at most one stray byte inside */
		CHECK(is62(text[sh.start]) && is62(text[end - 1]));
		CHECK(sh.start == pos || !is62(text[sh.start - 1]));
		CHECK(end == len || !is62(text[end]));
		for (i = sh.start; i < end; i++)
			if (!is62(text[i]))
				stray++;
		CHECK(stray <= 1);

		/* valid: a token's body starts the span, and its tail is shown */
		if (sh.valid)
		{
			CHECK(stray == 0 && sh.len >= APIKEY_BODY_CHARS);
			CHECK(sh.start >= 2 && text[sh.start - 1] == '_');
			CHECK(sh.tail == sh.start + APIKEY_BODY_CHARS - APIKEY_HINT_TAIL);
		}
		else
			CHECK(sh.tail == end - APIKEY_HINT_TAIL);

		if (covered)
			memset(covered + sh.start, 1, sh.len);
		pos = end;
		n++;
	}
	return n;
}

/*
 * The shape properties of text: spans checked, long runs and valid tokens
 * covered, and the redacted text (spans replaced by "..." and their tail,
 * as redact.c does) holding no span that does not include such a tail.
 */
static void
check_shapes(const char *text, size_t len)
{
	uint8_t    *covered = calloc(len + 1, 1);
	char	   *out = malloc(len + 1);
	uint8_t    *is_tail = calloc(len + 1, 1);
	size_t		olen = 0;
	size_t		pos = 0;
	size_t		i;
	size_t		start;
	size_t		tlen;
	ApikeyShape sh;

	shape_all(text, len, 0, covered);

	/* every run of APIKEY_SHAPE_MIN_CHARS base62 is covered */
	for (i = 0; i < len;)
	{
		size_t		j = i;

		while (j < len && is62(text[j]))
			j++;
		if (j - i >= APIKEY_SHAPE_MIN_CHARS)
			for (size_t k = i; k < j; k++)
				CHECK(covered[k]);
		i = (j > i) ? j : i + 1;
	}

	/* every valid token's body (secret and checksum) is covered */
	while ((tlen = apikey_token_scan(text + pos, len - pos, &start)) > 0)
	{
		for (i = pos + start + tlen - APIKEY_BODY_CHARS; i < pos + start + tlen; i++)
			CHECK(covered[i]);
		pos += start + tlen;
	}

	/* redact; "..." + tail is never longer than the span it replaces */
	pos = 0;
	while (apikey_shape_scan(text, len, pos, &sh))
	{
		memcpy(out + olen, text + pos, sh.start - pos);
		olen += sh.start - pos;
		memcpy(out + olen, "...", 3);
		olen += 3;
		memcpy(out + olen, text + sh.tail, APIKEY_HINT_TAIL);
		memset(is_tail + olen, 1, APIKEY_HINT_TAIL);
		olen += APIKEY_HINT_TAIL;
		pos = sh.start + sh.len;
	}
	memcpy(out + olen, text + pos, len - pos);
	olen += len - pos;
	CHECK(olen <= len);

	pos = 0;
	while (apikey_shape_scan(out, olen, pos, &sh))
	{
		bool		has_tail = false;

		for (i = sh.start; i < sh.start + sh.len; i++)
			has_tail |= is_tail[i];
		CHECK(has_tail);
		pos = sh.start + sh.len;
	}

	free(covered);
	free(out);
	free(is_tail);
}

/* Bytes of text[from..to) that some span covers, except text[skip]. */
static size_t
count_covered(const char *text, size_t len, size_t from, size_t to, size_t skip)
{
	uint8_t    *covered = calloc(len + 1, 1);
	size_t		n = 0;

	shape_all(text, len, 0, covered);
	for (size_t i = from; i < to; i++)
		n += (i != skip) && covered[i];
	free(covered);
	return n;
}

/* The input as a candidate token and as free text. */
static void
fuzz_raw(const uint8_t *data, size_t size)
{
	size_t		plen = (size_t) -1;
	ApikeyParseResult r;
	char	   *copy;

	r = apikey_token_parse((const char *) data, size, &plen);
	CHECK(r >= APIKEY_PARSE_OK && r <= APIKEY_PARSE_BAD_CHECKSUM);
	if (r == APIKEY_PARSE_OK)
		check_parsed((const char *) data, size, plen);
	if (size < APIKEY_TOKEN_MINLEN || size > APIKEY_TOKEN_MAXLEN)
		CHECK(r == APIKEY_PARSE_BAD_LENGTH);

	(void) scan_all((const char *) data, size, (size_t) -1, 0);
	check_shapes((const char *) data, size);
	(void) shape_all((const char *) data, size, size ? data[size - 1] % (size + 1) : 0, NULL);

	CHECK(apikey_prefix_is_valid((const char *) data, Min(size, 20)) ==
		  ref_prefix_valid(data, Min(size, 20)));
	CHECK(apikey_checksum((const char *) data, size) == ref_crc32(data, size));

	/* build() with the raw input as prefix: succeeds iff the prefix is valid */
	copy = malloc(APIKEY_TOKEN_MAXLEN + 1);
	{
		uint8_t		secret[APIKEY_SECRET_BYTES] = {0};
		bool		ok = apikey_token_build((const char *) data, Min(size, 20), secret,
											copy, APIKEY_TOKEN_MAXLEN + 1);

		CHECK(ok == ref_prefix_valid(data, Min(size, 20)));
	}
	free(copy);
}

/* base62_fixed round-trips for every width up to the secret's. */
static void
fuzz_base62(Reader *rd)
{
	size_t		nbytes = take(rd) % (APIKEY_SECRET_BYTES + 1);
	uint8_t		in[APIKEY_SECRET_BYTES];
	uint8_t		back[APIKEY_SECRET_BYTES];
	size_t		nchars = chars_needed(nbytes);
	char	   *out;

	for (size_t i = 0; i < nbytes; i++)
		in[i] = take(rd);
	out = malloc(nchars + 1);
	out[nchars] = '\0';
	apikey_base62_fixed(in, nbytes, out, nchars);
	CHECK(out[nchars] == '\0');
	CHECK(decode62(out, nchars, back, nbytes));
	CHECK(memcmp(in, back, nbytes) == 0);
	free(out);
}

/*
 * Near misses of the token text[at..at+len) (prefix plen): the text is
 * changed in place and restored.
 */
static void
check_near_misses(char *text, size_t tlen, size_t at, size_t len, size_t plen,
				  Reader *rd)
{
	size_t		body = at + plen + 1;
	size_t		body_end = at + len;
	size_t		p;
	char		orig;
	ApikeyShape sh;

	/* the valid token: its body starts a valid span, whole */
	CHECK(count_covered(text, tlen, body, body_end, SIZE_MAX) == APIKEY_BODY_CHARS);
	CHECK(apikey_shape_scan(text, tlen, body, &sh) && sh.start == body && sh.valid);

	/* wrong prefix (uppercased first letter): the body is still covered */
	orig = text[at];
	text[at] = (char) (orig - 'a' + 'A');
	CHECK(count_covered(text, tlen, body, body_end, SIZE_MAX) == APIKEY_BODY_CHARS);
	text[at] = orig;

	/* one body byte changed to anything */
	p = body + take(rd) % APIKEY_BODY_CHARS;
	orig = text[p];
	text[p] = (char) take(rd);
	if (text[p] == orig)
		text[p] = '#';
	if (is62(text[p]))
		CHECK(count_covered(text, tlen, body, body_end, SIZE_MAX) == APIKEY_BODY_CHARS);
	else
		CHECK(count_covered(text, tlen, body, body_end, p) >=
			  APIKEY_BODY_CHARS - APIKEY_SHAPE_MIN_CHARS);
	text[p] = orig;

	/* truncated to at least APIKEY_SHAPE_MIN_CHARS of body, then the input */
	{
		size_t		keep = APIKEY_SHAPE_MIN_CHARS +
			take(rd) % (APIKEY_BODY_CHARS - APIKEY_SHAPE_MIN_CHARS);
		size_t		cut = body_end - (body + keep);
		char	   *t = malloc(tlen - cut);

		memcpy(t, text, body + keep);
		memcpy(t + body + keep, text + body_end, tlen - body_end);
		CHECK(count_covered(t, tlen - cut, body, body + keep, SIZE_MAX) == keep);
		free(t);
	}
}

/* A token built from fuzzer-chosen prefix and secret, and its near misses. */
static void
fuzz_derived(Reader *rd, const uint8_t *data, size_t size)
{
	char		prefix[APIKEY_PREFIX_MAXLEN];
	size_t		plen = take(rd) % APIKEY_PREFIX_MAXLEN + 1;
	uint8_t		secret[APIKEY_SECRET_BYTES];
	uint8_t		back[APIKEY_SECRET_BYTES];
	char	   *tok;
	char	   *small;
	size_t		len;
	size_t		got;
	size_t		i;

	prefix[0] = 'a' + take(rd) % 26;
	for (i = 1; i < plen; i++)
		prefix[i] = prefix_rest[take(rd) % (sizeof(prefix_rest) - 1)];
	for (i = 0; i < APIKEY_SECRET_BYTES; i++)
		secret[i] = take(rd);

	/* a buffer one byte too small is refused */
	small = malloc(plen + 1 + APIKEY_BODY_CHARS);
	CHECK(!apikey_token_build(prefix, plen, secret, small, plen + 1 + APIKEY_BODY_CHARS));
	free(small);

	/* parse(build(prefix, secret)) == OK, same prefix, same secret */
	tok = malloc(APIKEY_TOKEN_MAXLEN + 1);
	CHECK(apikey_token_build(prefix, plen, secret, tok, APIKEY_TOKEN_MAXLEN + 1));
	len = strlen(tok);
	CHECK(len == plen + 1 + APIKEY_BODY_CHARS);
	got = 0;
	CHECK(apikey_token_parse(tok, len, &got) == APIKEY_PARSE_OK);
	CHECK(got == plen);
	CHECK(memcmp(tok, prefix, plen) == 0);
	CHECK(decode62(tok + plen + 1, APIKEY_SECRET_CHARS, back, sizeof(back)));
	CHECK(memcmp(back, secret, sizeof(secret)) == 0);
	check_parsed(tok, len, got);

	/*
	 * Every 1-byte substitution is rejected: each position gets a
	 * replacement from the input (changed if it happens to be the same).
	 */
	for (i = 0; i < len; i++)
	{
		char		orig = tok[i];
		char		c = (char) take(rd);
		size_t		dummy;

		if (c == orig)
			c = (char) (orig ^ 1);
		tok[i] = c;
		CHECK(apikey_token_parse(tok, len, &dummy) != APIKEY_PARSE_OK);
		/* and a body substitution with another base62 digit fails the CRC */
		if (i > plen)
		{
			char		d = digits62[(digit_value(orig) + 1 + take(rd) % 61) % 62];

			CHECK(d != orig);
			tok[i] = d;
			CHECK(apikey_token_parse(tok, len, &dummy) == APIKEY_PARSE_BAD_CHECKSUM);
		}
		tok[i] = orig;
	}

	/* swapping two different adjacent characters is rejected */
	i = take(rd) % (len - 1);
	if (tok[i] != tok[i + 1])
	{
		char		t = tok[i];
		size_t		dummy;

		tok[i] = tok[i + 1];
		tok[i + 1] = t;
		CHECK(apikey_token_parse(tok, len, &dummy) != APIKEY_PARSE_OK);
		tok[i + 1] = tok[i];
		tok[i] = t;
	}

	/*
	 * Insertions, deletions and truncations change the CRC input's length:
	 * rejecting them is only 1 - 2^-32 likely, so they are exercised (for
	 * ASan) but not asserted.
	 */
	{
		char	   *cut = malloc(len - 1);
		size_t		dummy;

		memcpy(cut, tok, len - 1);
		(void) apikey_token_parse(cut, len - 1, &dummy);
		free(cut);
	}

	/* scan() finds the token between two slices of the input */
	{
		size_t		split = size ? data[0] % (size + 1) : 0;
		size_t		tlen = split + len + (size - split);
		char	   *text = malloc(tlen);

		memcpy(text, data, split);
		memcpy(text + split, tok, len);
		memcpy(text + split + len, data + split, size - split);
		CHECK(scan_all(text, tlen, split, len));
		check_shapes(text, tlen);
		check_near_misses(text, tlen, split, len, plen, rd);
		free(text);
	}

	free(tok);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	Reader		rd = {data, size};

	fuzz_raw(data, size);
	fuzz_base62(&rd);
	rd.p = data;
	rd.left = size;
	fuzz_derived(&rd, data, size);
	return 0;
}
