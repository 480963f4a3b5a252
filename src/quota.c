/*-------------------------------------------------------------------------
 *
 * quota.c
 *	  Per-key quotas (credits), debited inside the caller's transaction.
 *
 * A key with keys.quota set has a row in apikey.quotas holding what is
 * left.  Each otherwise-successful verification takes one credit with a
 * single UPDATE ... WHERE remaining > 0, run as the extension's owner.  The
 * debit is part of the caller's transaction, so it commits or rolls back
 * with the business write it paid for.  Concurrent debits of one key queue
 * on the row lock and re-check remaining > 0 on the newest row version
 * (READ COMMITTED), so the quota never goes below zero and no credit is
 * spent twice; under REPEATABLE READ or SERIALIZABLE a concurrent debit
 * fails with a serialization error instead.
 *
 * With quota_refill set, a debit at least quota_refill after the last
 * refill first resets remaining to quota.
 *
 * A key in a rotation's grace period debits the new key's row
 * (ApikeyKey.budget_id): rotating never doubles an allowance.
 *
 * A debit is a write: in a read-only transaction or on a hot standby it
 * cannot be enforced, and the verification fails with quota_unavailable.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/timestamp.h"

#include "apikey.h"

static SPIPlanPtr debit_plan = NULL;
static SPIPlanPtr status_plan = NULL;

typedef struct QuotaDebit
{
	int64		key_id;
	bool		ok;
	int64		remaining;
	bool		has_refill_at;
	TimestampTz refill_at;
} QuotaDebit;

#define REFILL_DUE \
	"(k.quota_refill IS NOT NULL AND (q.refilled_at OPERATOR(pg_catalog.+) k.quota_refill) " \
	"OPERATOR(pg_catalog.<=) pg_catalog.now())"

static void
debit(void *arg)
{
	QuotaDebit *qd = arg;
	Oid			types[1] = {INT8OID};
	Datum		values[1];
	bool		isnull;
	int			rc;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	apikey_prepare_kept(&debit_plan,
			"UPDATE apikey.quotas q "
			"SET remaining = (CASE WHEN " REFILL_DUE " THEN k.quota ELSE q.remaining END) "
			"                OPERATOR(pg_catalog.-) 1, "
			"    refilled_at = CASE WHEN " REFILL_DUE " THEN pg_catalog.now() ELSE q.refilled_at END "
			"FROM apikey.keys k "
			"WHERE k.id OPERATOR(pg_catalog.=) q.key_id AND q.key_id OPERATOR(pg_catalog.=) $1 "
			"  AND (CASE WHEN " REFILL_DUE " THEN k.quota ELSE q.remaining END) OPERATOR(pg_catalog.>) 0 "
			"RETURNING q.remaining, q.refilled_at OPERATOR(pg_catalog.+) k.quota_refill",
			1, types);
	apikey_prepare_kept(&status_plan,
			"SELECT q.remaining, q.refilled_at OPERATOR(pg_catalog.+) k.quota_refill "
			"FROM apikey.quotas q JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) q.key_id "
			"WHERE q.key_id OPERATOR(pg_catalog.=) $1",
			1, types);

	values[0] = Int64GetDatum(qd->key_id);
	rc = SPI_execute_plan(debit_plan, values, NULL, false, 1);
	if (rc != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "quota debit failed: %s", SPI_result_code_string(rc));
	qd->ok = (SPI_processed == 1);
	if (!qd->ok)
	{
		/* not read_only: a fresh snapshot sees the debit we waited for */
		rc = SPI_execute_plan(status_plan, values, NULL, false, 1);
		if (rc != SPI_OK_SELECT)
			elog(ERROR, "quota lookup failed: %s", SPI_result_code_string(rc));
	}
	qd->remaining = 0;
	qd->has_refill_at = false;
	if (SPI_processed == 1)
	{
		Datum		d;

		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		if (!isnull)
			qd->remaining = DatumGetInt64(d);
		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
		if (!isnull)
		{
			qd->has_refill_at = true;
			qd->refill_at = DatumGetTimestampTz(d);
		}
	}
	SPI_finish();
}

/*
 * Take one credit from key's quota.  Returns APIKEY_VALID with *remaining
 * left, APIKEY_QUOTA_EXHAUSTED with *remaining 0 and *retry_after until the
 * next refill (-1 if none), or APIKEY_QUOTA_UNAVAILABLE when the
 * transaction cannot write.
 */
ApikeyCode
apikey_quota_debit(const ApikeyKey *key, int64 *remaining, int64 *retry_after)
{
	QuotaDebit	qd;

	if (RecoveryInProgress() || XactReadOnly || IsInParallelMode())
		return APIKEY_QUOTA_UNAVAILABLE;

	memset(&qd, 0, sizeof(qd));
	qd.key_id = key->budget_id;
	apikey_run_as_owner(debit, &qd);

	*remaining = qd.remaining;
	*retry_after = -1;
	if (qd.ok)
		return APIKEY_VALID;
	if (qd.has_refill_at)
		*retry_after = Max(qd.refill_at - GetCurrentTransactionStartTimestamp(), 0);
	return APIKEY_QUOTA_EXHAUSTED;
}
