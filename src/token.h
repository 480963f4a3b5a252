/*-------------------------------------------------------------------------
 *
 * token.h
 *	  The apikey token format: <prefix>_<secret><checksum>.
 *
 * prefix    [a-z][a-z0-9_]{0,15}, chosen at issue ("ak" by default)
 * secret    256 random bits from pg_strong_random(), base62, 43 characters
 * checksum  CRC-32 of everything before it, base62, 6 characters
 *
 * Token shape: what the log redactor hides, whatever its checksum.  The
 * checksum is public, so a near miss (a truncated paste, a typo, a wrong or
 * uppercased prefix, a token glued to other text) that keeps most of the
 * secret lets anyone rebuild the real token offline: redact by shape, not
 * by validity.  A token-shaped span is either
 *
 *	 run	at least APIKEY_SHAPE_MIN_CHARS characters of [A-Za-z0-9] in a
 *			row (a body, whole, truncated or mistyped within base62), or
 *	 split	two runs of [A-Za-z0-9], each shorter than that, joined by one
 *			other byte (one mistyped character, a line break) and together
 *			at least APIKEY_SHAPE_MIN_CHARS characters long.
 *
 * Runs are maximal and taken left to right; a run that qualifies alone is
 * never joined to its neighbour.  The prefix and its "_" are not part of
 * the span: they are not secret and stay readable.  Why 32: a piece of a
 * body shorter than that leaves at least 12 of the 43 secret characters
 * (71 bits) unknown, too many to guess, offline or against the server.
 * With one stray byte, at least 17 body characters stay hidden however the
 * text around it runs (fuzz/ checks this, and that every 32-run is
 * hidden).  The price is that other long base62 strings (an MD5 or SHA
 * digest in hex) are hidden too.  Not covered: a body broken by two or
 * more stray bytes into pieces that are each shorter than 32.
 *
 * A span may show APIKEY_HINT_TAIL characters and no more, as the stored
 * hint does: the last four of the token when the span holds the body of a
 * checksum-valid token (so the hint matches apikey.keys.hint), else its
 * own last four.
 *
 * Everything here is pure computation on bytes: no catalog access, no
 * palloc, no ereport.  That keeps it usable from the libFuzzer harness in
 * fuzz/, which links it without a server.
 *
 *-------------------------------------------------------------------------
 */
#ifndef APIKEY_TOKEN_H
#define APIKEY_TOKEN_H

#include "c.h"

#define APIKEY_PREFIX_MAXLEN	16
#define APIKEY_SECRET_BYTES		32
#define APIKEY_SECRET_CHARS		43	/* ceil(256 / log2(62)) */
#define APIKEY_CHECKSUM_CHARS	6	/* ceil(32 / log2(62)) */
#define APIKEY_BODY_CHARS		(APIKEY_SECRET_CHARS + APIKEY_CHECKSUM_CHARS)
#define APIKEY_TOKEN_MINLEN		(1 + 1 + APIKEY_BODY_CHARS)
#define APIKEY_TOKEN_MAXLEN		(APIKEY_PREFIX_MAXLEN + 1 + APIKEY_BODY_CHARS)
#define APIKEY_HINT_TAIL		4
/* "<prefix>_..." plus the last four characters, NUL-terminated */
#define APIKEY_HINT_MAXLEN		(APIKEY_PREFIX_MAXLEN + 4 + APIKEY_HINT_TAIL + 1)
#define APIKEY_SHAPE_MIN_CHARS	32

/* One token-shaped span found by apikey_shape_scan(). */
typedef struct ApikeyShape
{
	size_t		start;			/* offset of the span in the text */
	size_t		len;			/* its length, >= APIKEY_SHAPE_MIN_CHARS */
	size_t		tail;			/* offset of the APIKEY_HINT_TAIL characters
								 * a hint may show; inside the span */
	bool		valid;			/* the span starts with the body of a
								 * checksum-valid token */
} ApikeyShape;

/* Outcome of parsing a candidate token. */
typedef enum ApikeyParseResult
{
	APIKEY_PARSE_OK = 0,
	APIKEY_PARSE_BAD_LENGTH,
	APIKEY_PARSE_BAD_PREFIX,
	APIKEY_PARSE_BAD_BODY,
	APIKEY_PARSE_BAD_CHECKSUM
} ApikeyParseResult;

extern bool apikey_prefix_is_valid(const char *prefix, size_t len);
extern ApikeyParseResult apikey_token_parse(const char *token, size_t len,
											size_t *prefix_len);
extern bool apikey_token_build(const char *prefix, size_t prefix_len,
							   const uint8 *secret, char *out, size_t outlen);
extern void apikey_token_hint(const char *token, size_t len, size_t prefix_len,
							  char *hint);
extern size_t apikey_token_scan(const char *text, size_t len, size_t *start);
extern bool apikey_shape_scan(const char *text, size_t len, size_t from,
							  ApikeyShape *shape);

/* exposed for the fuzz harness and tests */
extern void apikey_base62_fixed(const uint8 *bytes, size_t nbytes,
								char *out, size_t nchars);
extern uint32 apikey_checksum(const char *data, size_t len);

#endif							/* APIKEY_TOKEN_H */
