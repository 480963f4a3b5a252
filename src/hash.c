/*-------------------------------------------------------------------------
 *
 * hash.c
 *	  SHA-256 of a token: the only form in which apikey stores or compares
 *	  a key.
 *
 * PostgreSQL's cryptohash is used (OpenSSL-backed where built so).
 * Verification hashes on every call, and creating and freeing a context
 * each time cost more than the hashing itself, so one context is kept for
 * the backend's life.  It is registered with a resource owner of our own,
 * not the transaction's, so it survives transaction end.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/cryptohash.h"
#include "common/sha2.h"
#include "utils/resowner.h"

#include "apikey.h"

StaticAssertDecl(APIKEY_HASH_LEN == PG_SHA256_DIGEST_LENGTH,
				 "a key hash is a SHA-256 digest");

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

/* SHA-256(data) as a bytea */
bytea *
apikey_sha256_bytea(const char *data, size_t len)
{
	bytea	   *result = palloc(VARHDRSZ + APIKEY_HASH_LEN);

	SET_VARSIZE(result, VARHDRSZ + APIKEY_HASH_LEN);
	apikey_sha256(data, len, (uint8 *) VARDATA(result));
	return result;
}
