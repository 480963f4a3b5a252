/*-------------------------------------------------------------------------
 *
 * hash.c
 *	  SHA-256 of a token: the only form in which apikey stores or compares
 *	  a key.
 *
 * Verification hashes on every call, so the set-up is done once per
 * backend.  Where PostgreSQL is built with OpenSSL 3, the digest is
 * fetched once (EVP_MD_fetch) and one EVP context reused: PostgreSQL's
 * cryptohash passes EVP_sha256() to every EVP_DigestInit_ex(), and OpenSSL
 * 3 then fetches the implementation again on each call, under locks and
 * with allocations, which cost more than hashing a token (about half of
 * apikey.hash()'s time, measured with perf).  Elsewhere PostgreSQL's
 * cryptohash is used, with one context kept for the backend's life,
 * registered with a resource owner of our own so it survives transaction
 * end.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/cryptohash.h"
#include "common/sha2.h"
#include "utils/resowner.h"

#ifdef USE_OPENSSL
#include <openssl/evp.h>
#endif

#include "apikey.h"

StaticAssertDecl(APIKEY_HASH_LEN == PG_SHA256_DIGEST_LENGTH,
				 "a key hash is a SHA-256 digest");

#if defined(USE_OPENSSL) && OPENSSL_VERSION_NUMBER >= 0x30000000L
#define APIKEY_EVP_PREFETCH 1
#endif

#ifdef APIKEY_EVP_PREFETCH

/* out = SHA-256(data), with the digest fetched once */
void
apikey_sha256(const char *data, size_t len, uint8 *out)
{
	static EVP_MD *md = NULL;
	static EVP_MD_CTX *ctx = NULL;
	unsigned int outlen = 0;

	if (md == NULL)
		md = EVP_MD_fetch(NULL, "SHA256", NULL);
	if (ctx == NULL)
		ctx = EVP_MD_CTX_new();
	if (md == NULL || ctx == NULL ||
		EVP_DigestInit_ex2(ctx, md, NULL) != 1 ||
		EVP_DigestUpdate(ctx, data, len) != 1 ||
		EVP_DigestFinal_ex(ctx, out, &outlen) != 1 ||
		outlen != APIKEY_HASH_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute SHA-256 with OpenSSL")));
}

#else							/* !APIKEY_EVP_PREFETCH */

/* The backend's one SHA-256 context, created on first use. */
static pg_cryptohash_ctx *
sha256_context(void)
{
	static pg_cryptohash_ctx *ctx = NULL;
	static ResourceOwner owner = NULL;
	ResourceOwner save = CurrentResourceOwner;

	if (ctx != NULL)
		return ctx;
	if (owner == NULL)
		owner = ResourceOwnerCreate(NULL, "apikey sha256");
	CurrentResourceOwner = owner;
	PG_TRY();
	{
		ctx = pg_cryptohash_create(PG_SHA256);
	}
	PG_FINALLY();
	{
		CurrentResourceOwner = save;
	}
	PG_END_TRY();
	if (ctx == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	return ctx;
}

/* out = SHA-256(data) */
void
apikey_sha256(const char *data, size_t len, uint8 *out)
{
	pg_cryptohash_ctx *ctx = sha256_context();

	if (pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) data, len) < 0 ||
		pg_cryptohash_final(ctx, out, APIKEY_HASH_LEN) < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute SHA-256: %s", pg_cryptohash_error(ctx))));
}

#endif							/* APIKEY_EVP_PREFETCH */

/* SHA-256(data) as a bytea */
bytea *
apikey_sha256_bytea(const char *data, size_t len)
{
	bytea	   *result = palloc(VARHDRSZ + APIKEY_HASH_LEN);

	SET_VARSIZE(result, VARHDRSZ + APIKEY_HASH_LEN);
	apikey_sha256(data, len, (uint8 *) VARDATA(result));
	return result;
}
