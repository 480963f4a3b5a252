/*-------------------------------------------------------------------------
 *
 * ownerlimits.c
 *	  Limits shared by all keys of one owner (apikey.owners): a rate limit,
 *	  credits, an allowlist and a maximum number of live keys.
 *
 * Without these, a per-key limit is routed around by issuing more keys.
 * An owner without a row in apikey.owners has no pooled limits, and its
 * keys verify exactly as before.
 *
 * Where the owner's limits come from.  keystore.c reads the owner's row
 * with the key (same locks, same snapshot), and the key cache keeps it in
 * the key's record: a verification that hits the cache reads no table for
 * the owner.  Any change to apikey.owners empties every backend's key
 * cache (its statement trigger, as for apikey.scopes), so the change takes
 * effect for every verification that starts after its commit.
 *
 * Order within a verification (verify.c calls these after the key's own
 * checks):
 *	 1. the key's rate-limit take (ratelimit.c);
 *	 2. the owner's take, from the same shared-memory table under key id -1
 *		and the first bytes of SHA-256 of the owner and its row's created_at
 *		(key ids are positive, so an owner's bucket never meets a key's); if the owner refuses, the key's
 *		take is given back: a refused request costs nothing anywhere;
 *	 3. the owner's credit, then the key's (quota.c), both in the caller's
 *		transaction: the owner's row is always locked first, so two
 *		verifications never wait for each other in opposite orders.  If the
 *		key's credit is refused, the owner's is given back while its row is
 *		still locked by this transaction, so nobody sees it spent; a
 *		rollback gives back both.
 * An owner's allowlist is kept after the key's in ApikeyKey.cidrs, and a
 * client must be inside both (verify.c).
 *
 * Credits.  apikey.owner_credits holds what is left, apart from
 * apikey.owners, whose every change empties the key caches.  A debit is a
 * single UPDATE ... WHERE remaining > 0, like a key's (quota.c, which says
 * why it never goes below zero nor spends a credit twice under READ
 * COMMITTED).
 *
 * max_keys.  Issuing a key for an owner with max_keys locks the owner's
 * row (FOR NO KEY UPDATE, in owner order) and then counts its live keys
 * with a snapshot taken after the lock (GetLatestSnapshot, as the foreign
 * key checks do), whatever the isolation level: a concurrent issue for the
 * same owner waits for the lock, then counts the key the first one
 * committed.  Live: not revoked, not expired; a key replaced by a rotation
 * is live until its grace ends (else chained rotations with a long grace
 * would hold any number of valid keys).  A rotation or reissue does not
 * count the key it replaces.  Imports (_import_write) count the same way.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "apikey.h"

/* the key id under which owners' buckets live in ratelimit.c's table */
#define OWNER_BUCKET_ID		INT64CONST(-1)

static SPIPlanPtr debit_plan = NULL;
static SPIPlanPtr status_plan = NULL;
static SPIPlanPtr refund_plan = NULL;

typedef struct OwnerCredit
{
	const char *owner;
	bool		refund;			/* give one back instead of taking it */
	bool		ok;
	int64		remaining;
	bool		has_refill_at;
	TimestampTz refill_at;
} OwnerCredit;

#define OWNER_REFILL_DUE \
	"(o.quota_refill IS NOT NULL AND (c.refilled_at OPERATOR(pg_catalog.+) o.quota_refill) " \
	"OPERATOR(pg_catalog.<=) pg_catalog.now())"

/* The name each ApikeyLimitedBy has in verdict.limited_by, or NULL. */
const char *
apikey_limited_by_name(ApikeyLimitedBy by)
{
	switch (by)
	{
		case APIKEY_LIMITED_BY_KEY:
			return "key";
		case APIKEY_LIMITED_BY_OWNER:
			return "owner";
		default:
			return NULL;
	}
}

/*
 * The verdict's remaining is the smaller of the key's (-1: none) and the
 * owner's, and limited_by names whose it is.
 */
void
apikey_owner_remaining(ApikeyVerdict *verdict, int64 key_remaining,
					   int64 owner_remaining)
{
	verdict->has_remaining = true;
	if (key_remaining >= 0 && key_remaining <= owner_remaining)
	{
		verdict->remaining = key_remaining;
		verdict->limited_by = APIKEY_LIMITED_BY_KEY;
	}
	else
	{
		verdict->remaining = owner_remaining;
		verdict->limited_by = APIKEY_LIMITED_BY_OWNER;
	}
}

/*
 * Take one request from the owner's bucket, after the key's own take (if
 * the key has a rate limit, *verdict holds its remaining).  If the owner
 * refuses, the key's take is given back.
 */
ApikeyCode
apikey_owner_rate_take(const ApikeyKey *key, TimestampTz now,
					   ApikeyVerdict *verdict)
{
	int64		retry_after = 0;
	int64		remaining = 0;
	ApikeyCode	code;

	code = apikey_ratelimit_take_bucket(OWNER_BUCKET_ID, key->owner_hash_prefix,
										key->owner_rate_limit,
										key->owner_rate_window, now,
										&retry_after, &remaining);
	if (code != APIKEY_VALID)
	{
		if (key->rate_limit > 0)
			apikey_ratelimit_refund_bucket(key->budget_id, key->budget_hash_prefix,
										   key->rate_limit, key->rate_window);
		verdict->limited_by = APIKEY_LIMITED_BY_OWNER;
		verdict->has_remaining = false;
		verdict->has_retry_after = (code == APIKEY_RATE_LIMITED);
		verdict->retry_after = retry_after;
		return code;
	}
	apikey_owner_remaining(verdict, key->rate_limit > 0 ? verdict->remaining : -1,
						   remaining);
	return APIKEY_VALID;
}

/* Take (or give back) one of the owner's credits; run as the tables' owner. */
static void
credit(void *arg)
{
	OwnerCredit *oc = arg;
	Oid			types[1] = {TEXTOID};
	Datum		values[1];
	bool		isnull;
	int			rc;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	values[0] = CStringGetTextDatum(oc->owner);
	if (oc->refund)
	{
		apikey_prepare_kept(&refund_plan,
				"UPDATE apikey.owner_credits c "
				"SET remaining = c.remaining OPERATOR(pg_catalog.+) 1 "
				"WHERE c.owner OPERATOR(pg_catalog.=) $1",
				1, types);
		rc = SPI_execute_plan(refund_plan, values, NULL, false, 1);
		if (rc != SPI_OK_UPDATE)
			elog(ERROR, "owner credit refund failed: %s", SPI_result_code_string(rc));
		SPI_finish();
		return;
	}
	apikey_prepare_kept(&debit_plan,
			"UPDATE apikey.owner_credits c "
			"SET remaining = (CASE WHEN " OWNER_REFILL_DUE " THEN o.quota ELSE c.remaining END) "
			"                OPERATOR(pg_catalog.-) 1, "
			"    refilled_at = CASE WHEN " OWNER_REFILL_DUE " THEN pg_catalog.now() ELSE c.refilled_at END "
			"FROM apikey.owners o "
			"WHERE o.owner OPERATOR(pg_catalog.=) c.owner AND c.owner OPERATOR(pg_catalog.=) $1 "
			"  AND o.quota IS NOT NULL "
			"  AND (CASE WHEN " OWNER_REFILL_DUE " THEN o.quota ELSE c.remaining END) OPERATOR(pg_catalog.>) 0 "
			"RETURNING c.remaining, c.refilled_at OPERATOR(pg_catalog.+) o.quota_refill",
			1, types);
	apikey_prepare_kept(&status_plan,
			"SELECT c.remaining, c.refilled_at OPERATOR(pg_catalog.+) o.quota_refill "
			"FROM apikey.owner_credits c JOIN apikey.owners o ON o.owner OPERATOR(pg_catalog.=) c.owner "
			"WHERE c.owner OPERATOR(pg_catalog.=) $1",
			1, types);

	rc = SPI_execute_plan(debit_plan, values, NULL, false, 1);
	if (rc != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "owner credit debit failed: %s", SPI_result_code_string(rc));
	oc->ok = (SPI_processed == 1);
	if (!oc->ok)
	{
		/* not read_only: a fresh snapshot sees the debit we waited for */
		rc = SPI_execute_plan(status_plan, values, NULL, false, 1);
		if (rc != SPI_OK_SELECT)
			elog(ERROR, "owner credit lookup failed: %s", SPI_result_code_string(rc));
	}
	oc->remaining = 0;
	oc->has_refill_at = false;
	if (SPI_processed == 1)
	{
		Datum		d;

		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		if (!isnull)
			oc->remaining = DatumGetInt64(d);
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
		if (!isnull)
		{
			oc->has_refill_at = true;
			oc->refill_at = DatumGetTimestampTz(d);
		}
	}
	SPI_finish();
}

/*
 * Take one of the owner's credits, before the key's.  APIKEY_VALID (the
 * verdict's remaining is the owner's), APIKEY_QUOTA_EXHAUSTED (remaining 0,
 * retry_after until the owner's refill if any) or APIKEY_QUOTA_UNAVAILABLE
 * when the transaction cannot write.
 */
ApikeyCode
apikey_owner_quota_debit(const ApikeyKey *key, ApikeyVerdict *verdict)
{
	OwnerCredit oc;

	if (RecoveryInProgress() || XactReadOnly || IsInParallelMode())
	{
		verdict->limited_by = APIKEY_LIMITED_BY_OWNER;
		verdict->has_remaining = false;
		verdict->has_retry_after = false;
		return APIKEY_QUOTA_UNAVAILABLE;
	}
	memset(&oc, 0, sizeof(oc));
	oc.owner = key->owner;
	apikey_run_as_owner(credit, &oc);

	verdict->limited_by = APIKEY_LIMITED_BY_OWNER;
	verdict->has_remaining = true;
	verdict->remaining = oc.remaining;
	verdict->has_retry_after = false;
	if (oc.ok)
		return APIKEY_VALID;
	if (oc.has_refill_at)
	{
		verdict->has_retry_after = true;
		verdict->retry_after = Max(oc.refill_at - GetCurrentTransactionStartTimestamp(), 0);
	}
	return APIKEY_QUOTA_EXHAUSTED;
}

/*
 * Give back the owner's credit just taken, when the key's own quota refused
 * the request.  This transaction still holds the row's lock, so no one
 * else has seen the credit spent.
 */
void
apikey_owner_quota_refund(const ApikeyKey *key)
{
	OwnerCredit oc;

	if (!key->owner_has_quota)
		return;
	memset(&oc, 0, sizeof(oc));
	oc.owner = key->owner;
	oc.refund = true;
	apikey_run_as_owner(credit, &oc);
}

/*
 * Refuse to issue keys past their owners' max_keys.  owners[0..n-1] are the
 * owners of the keys about to be written (text Datums, repeats allowed);
 * replacing is the key a rotation or reissue replaces (0: none), which does
 * not count.  Locks the row of every owner with max_keys until the end of
 * the transaction (file header).  Runs within the caller's privileges: its
 * callers are SECURITY DEFINER functions.
 */
void
apikey_owner_admit(Datum *owners, int n, int64 replacing)
{
	static SPIPlanPtr lock_plan = NULL;
	static SPIPlanPtr count_plan = NULL;
	Oid			lock_types[1] = {TEXTARRAYOID};
	Oid			count_types[3] = {TEXTARRAYOID, TEXTOID, INT8OID};
	Datum		arr;
	SPITupleTable *locked;
	uint64		nlocked;
	int			rc;
	Datum	   *elems;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	/* construct_array() detoasts in place: never into the caller's array */
	elems = palloc(sizeof(Datum) * n);
	memcpy(elems, owners, sizeof(Datum) * n);
	arr = PointerGetDatum(construct_array(elems, n, TEXTOID, -1, false, TYPALIGN_INT));
	rc = SPI_execute_plan(apikey_prepare_kept(&lock_plan,
			"SELECT o.owner, o.max_keys FROM apikey.owners o "
			"WHERE o.owner OPERATOR(pg_catalog.=) ANY ($1) AND o.max_keys IS NOT NULL "
			"ORDER BY o.owner FOR NO KEY UPDATE OF o",
			1, lock_types), &arr, NULL, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "owner lock failed: %s", SPI_result_code_string(rc));
	locked = SPI_tuptable;
	nlocked = SPI_processed;

	for (uint64 i = 0; i < nlocked; i++)
	{
		bool		isnull;
		Datum		owner = SPI_getbinval(locked->vals[i], locked->tupdesc, 1, &isnull);
		int32		max_keys = DatumGetInt32(SPI_getbinval(locked->vals[i], locked->tupdesc, 2, &isnull));
		Datum		values[3] = {arr, owner, Int64GetDatum(replacing)};
		int64		live;
		int64		adding;

		/*
		 * A snapshot taken after the lock, also under REPEATABLE READ: the
		 * transaction's own would miss the key of an issue we waited for.
		 */
		rc = SPI_execute_snapshot(apikey_prepare_kept(&count_plan,
				"SELECT (SELECT pg_catalog.count(*) FROM apikey.keys k "
				"         WHERE k.owner OPERATOR(pg_catalog.=) $2 AND k.id OPERATOR(pg_catalog.<>) $3 "
				"           AND (k.expires_at IS NULL OR k.expires_at OPERATOR(pg_catalog.>) pg_catalog.now()) "
				"           AND NOT EXISTS (SELECT FROM apikey.revocations r "
				"                            WHERE r.key_id OPERATOR(pg_catalog.=) k.id)), "
				"       (SELECT pg_catalog.count(*) FROM pg_catalog.unnest($1) u(o) "
				"         WHERE u.o OPERATOR(pg_catalog.=) $2)",
				3, count_types), values, NULL, GetLatestSnapshot(), InvalidSnapshot,
								  false, false, 1);
		if (rc != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "live key count failed: %s", SPI_result_code_string(rc));
		live = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		adding = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
		if (live + adding > max_keys)
		{
			text	   *o = DatumGetTextPP(owner);

			ereport(ERROR,
					(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
					 errmsg("owner \"%s\" may hold at most %d live keys",
							apikey_clip_for_message(VARDATA_ANY(o), VARSIZE_ANY_EXHDR(o)),
							max_keys),
					 replacing != 0 ?
					 errdetail("It holds " INT64_FORMAT " live keys besides key " INT64_FORMAT ", which this call replaces.",
							   live, replacing) :
					 errdetail("It holds " INT64_FORMAT " live keys; this call would add " INT64_FORMAT ".",
							   live, adding),
					 errhint("Revoke keys the owner no longer uses with apikey.revoke(), or raise its max_keys with apikey.set_owner_limits().")));
		}
	}
	SPI_finish();
}
