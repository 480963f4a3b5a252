/*-------------------------------------------------------------------------
 *
 * gen_corpus.c
 *	  Write the seed corpus for fuzz_token: a few valid tokens, tokens in
 *	  log-like text, near misses and garbage.  Secrets are fixed patterns,
 *	  so the output is reproducible; none of these is a real key.
 *
 *	  usage: gen_corpus DIR
 *
 *-------------------------------------------------------------------------
 */
#include "postgres_fe.h"

#include <stdio.h>
#include <stdlib.h>

#include "token.h"

static const char *dir;

static void
put(const char *name, const char *data, size_t len)
{
	char		path[1024];
	FILE	   *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "wb");
	if (f == NULL || fwrite(data, 1, len, f) != len || fclose(f) != 0)
	{
		perror(path);
		exit(1);
	}
}

static size_t
make_token(const char *prefix, uint8 fill, char *out)
{
	uint8		secret[APIKEY_SECRET_BYTES];
	int			i;

	for (i = 0; i < APIKEY_SECRET_BYTES; i++)
		secret[i] = (uint8) (fill + i * 37);
	if (!apikey_token_build(prefix, strlen(prefix), secret, out, APIKEY_TOKEN_MAXLEN + 1))
	{
		fprintf(stderr, "bad prefix %s\n", prefix);
		exit(1);
	}
	return strlen(out);
}

int
main(int argc, char **argv)
{
	char		tok[APIKEY_TOKEN_MAXLEN + 1];
	char		buf[1024];
	size_t		len;
	int			n;

	if (argc != 2)
	{
		fprintf(stderr, "usage: %s DIR\n", argv[0]);
		return 2;
	}
	dir = argv[1];

	/* valid tokens: default, underscore, shortest and longest prefixes */
	len = make_token("ak", 1, tok);
	put("valid-ak", tok, len);
	len = make_token("ak_live", 2, tok);
	put("valid-ak_live", tok, len);
	len = make_token("a", 3, tok);
	put("valid-short-prefix", tok, len);
	len = make_token("abcdefghij_0123_", 4, tok);
	put("valid-long-prefix", tok, len);

	/* tokens in text, as the log redactor sees them */
	len = make_token("ak", 5, tok);
	n = snprintf(buf, sizeof(buf), "SELECT apikey.verify('%s', 'orders:read');", tok);
	put("text-statement", buf, n);
	n = snprintf(buf, sizeof(buf), "x%s%.*sy", tok, (int) len, tok);
	put("text-glued-twice", buf, n);
	n = snprintf(buf, sizeof(buf), "LOG:  statement: DO $$BEGIN RAISE NOTICE '%%', 'foo_%s'; END$$", tok);
	put("text-underscore-before", buf, n);

	/* near misses */
	len = make_token("ak", 6, tok);
	tok[10] = (tok[10] == 'A') ? 'B' : 'A';
	put("miss-substitution", tok, len);
	len = make_token("ak", 7, tok);
	put("miss-truncated", tok, len - 1);
	len = make_token("ak", 8, tok);
	tok[len] = 'Z';
	put("miss-extra-char", tok, len + 1);
	len = make_token("ak", 9, tok);
	tok[2] = '-';
	put("miss-separator", tok, len);
	len = make_token("ak", 10, tok);
	tok[0] = 'A';
	put("miss-uppercase-prefix", tok, len);
	len = make_token("abcdefghij_0123_", 11, tok);
	n = snprintf(buf, sizeof(buf), "q%s", tok);
	put("miss-prefix-too-long", buf, n);

	/* near misses the redactor hides by shape */
	len = make_token("ak", 12, tok);
	tok[3 + 20] = '#';
	n = snprintf(buf, sizeof(buf), "SELECT apikey.verify('%s');", tok);
	put("miss-stray-byte", buf, n);
	len = make_token("ak", 13, tok);
	n = snprintf(buf, sizeof(buf), "ERROR:  bad key %.*s\nDETAIL:  %.*s",
				 3 + APIKEY_SHAPE_MIN_CHARS, tok, (int) len - 1, tok);
	put("miss-truncated-short", buf, n);
	len = make_token("ak", 14, tok);
	n = snprintf(buf, sizeof(buf), "x%.*s\n%sy", 3 + 16, tok, tok + 3 + 16);
	put("miss-line-break", buf, n);
	put("text-hex-digest", "md5 = 'd41d8cd98f00b204e9800998ecf8427e'", 40);

	/* garbage */
	put("garbage-empty", "", 0);
	put("garbage-underscores", "________________________________________________________", 56);
	memset(buf, 'z', 200);
	buf[20] = '_';
	put("garbage-base62-run", buf, 200);
	for (n = 0; n < 256; n++)
		buf[n] = (char) n;
	put("garbage-bytes", buf, 256);
	return 0;
}
