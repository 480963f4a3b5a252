/*-------------------------------------------------------------------------
 *
 * token.h
 *	  The apikey token format: <prefix>_<secret><checksum>.
 *
 * prefix    [a-z][a-z0-9_]{0,15}, chosen at issue ("ak" by default)
 * secret    256 random bits from pg_strong_random(), base62, 43 characters
 * checksum  CRC-32 of everything before it, base62, 6 characters
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

/* exposed for the fuzz harness and tests */
extern void apikey_base62_fixed(const uint8 *bytes, size_t nbytes,
								char *out, size_t nchars);
extern uint32 apikey_checksum(const char *data, size_t len);

#endif							/* APIKEY_TOKEN_H */
