/*-------------------------------------------------------------------------
 *
 * legacyupgrade.c
 *	  The upgrade of a legacy key to SHA-256 after a valid use: recorded by
 *	  the verifier without a lock, applied by the flush.
 *
 * Why in two steps: writing apikey.keys in the verifying caller's
 * transaction took the key's row lock until that transaction ended.
 * revoke() needs the row (the foreign-key check of revocations) while it
 * holds the audit lock, so one client holding a legacy token and keeping
 * its transaction open stopped revocation, every administrative function
 * and further verifications of that key.
 *
 * So a verification never locks anything an administrator locks:
 *	 - record (apikey_legacy_upgrade): after a valid verdict by a legacy
 *	   hash, one row is appended to apikey.legacy_upgrade_pending, as the
 *	   extension's owner: the key, keys.hash and the SHA-256 of the
 *	   verifier that matched, and SHA-256 of the token (never the token).
 *	   The table has no index and no foreign key, and nobody updates its
 *	   rows, so the insert waits for nobody.  On a standby, in a read-only
 *	   transaction or a parallel worker nothing is written (counted as
 *	   deferred); a rollback takes the row with it.  Until the row is
 *	   applied the key keeps verifying by its old hash.
 *	 - apply (apikey_legacy_upgrades_apply): apikey.flush_usage() and the
 *	   usage writer's flush take the committed rows no other folder holds,
 *	   skipping keys whose row someone has locked (they stay for the next
 *	   flush), and set keys.hash to the new hash where the key is still
 *	   pending with the same keys.hash and verifier and is not revoked,
 *	   clearing the verifier.  Rows for keys revoked, upgraded or
 *	   re-imported meanwhile are dropped: a revoked key stays as it was
 *	   revoked.  The first recorded use of a key wins.  It runs in an
 *	   internal subtransaction: an error is a WARNING, never a failed
 *	   flush, and the rows stay for the next one.
 *
 * The apply is marked as apikey's own bookkeeping for the audit triggers
 * (legacy_keys.upgraded_at records it), as the upgrade in the caller's
 * transaction was.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

#include "apikey.h"

static SPIPlanPtr record_plan = NULL;

/* The rows one apply takes, and what it does with them (see the header). */
#define APPLY_SQL \
	"WITH picked AS (SELECT p.ctid AS t, p.key_id, p.old_hash, p.verifier_sha256, " \
	"                       p.new_hash, p.recorded_at " \
	"                  FROM apikey.legacy_upgrade_pending p FOR UPDATE SKIP LOCKED), " \
	"free AS (SELECT k.id FROM apikey.keys k JOIN apikey.legacy_keys l " \
	"                 ON l.key_id OPERATOR(pg_catalog.=) k.id " \
	"          WHERE k.id IN (SELECT key_id FROM picked) " \
	"          FOR NO KEY UPDATE SKIP LOCKED), " \
	"taken AS (DELETE FROM apikey.legacy_upgrade_pending p USING picked " \
	"           WHERE p.ctid OPERATOR(pg_catalog.=) picked.t " \
	"             AND (picked.key_id IN (SELECT id FROM free) " \
	"                  OR NOT EXISTS (SELECT FROM apikey.legacy_keys l " \
	"                                  WHERE l.key_id OPERATOR(pg_catalog.=) picked.key_id)) " \
	"          RETURNING picked.key_id, picked.old_hash, picked.verifier_sha256, " \
	"                    picked.new_hash, picked.recorded_at), " \
	"first AS (SELECT DISTINCT ON (key_id) key_id, old_hash, verifier_sha256, new_hash " \
	"            FROM taken ORDER BY key_id, recorded_at), " \
	"k AS (UPDATE apikey.keys k SET hash = f.new_hash " \
	"        FROM first f, apikey.legacy_keys l " \
	"       WHERE k.id OPERATOR(pg_catalog.=) f.key_id " \
	"         AND k.hash OPERATOR(pg_catalog.=) f.old_hash " \
	"         AND l.key_id OPERATOR(pg_catalog.=) k.id AND l.verifier IS NOT NULL " \
	"         AND pg_catalog.sha256(pg_catalog.convert_to(l.verifier, 'UTF8')) " \
	"             OPERATOR(pg_catalog.=) f.verifier_sha256 " \
	"         AND NOT EXISTS (SELECT FROM apikey.revocations r " \
	"                          WHERE r.key_id OPERATOR(pg_catalog.=) k.id) " \
	"      RETURNING k.id) " \
	"UPDATE apikey.legacy_keys l SET verifier = NULL, upgraded_at = pg_catalog.now() " \
	"  FROM k WHERE l.key_id OPERATOR(pg_catalog.=) k.id"

/* A 32-byte hash as bytea. */
static bytea *
hash_bytea(const uint8 *hash)
{
	bytea	   *b = palloc(VARHDRSZ + APIKEY_HASH_LEN);

	SET_VARSIZE(b, VARHDRSZ + APIKEY_HASH_LEN);
	memcpy(VARDATA(b), hash, APIKEY_HASH_LEN);
	return b;
}

/* The insert of one pending upgrade; runs as the tables' owner. */
static void
record_upgrade(void *arg)
{
	ApikeyLegacyMatch *m = arg;
	Oid			types[4] = {INT8OID, BYTEAOID, BYTEAOID, BYTEAOID};
	Datum		values[4];
	int			rc;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	apikey_prepare_kept(&record_plan,
						"INSERT INTO apikey.legacy_upgrade_pending "
						"       (key_id, old_hash, verifier_sha256, new_hash) "
						"VALUES ($1, $2, $3, $4)",
						4, types);
	values[0] = Int64GetDatum(m->key_id);
	values[1] = PointerGetDatum(hash_bytea(m->old_hash));
	values[2] = PointerGetDatum(hash_bytea(m->verifier_sha256));
	values[3] = PointerGetDatum(hash_bytea(m->new_hash));
	rc = SPI_execute_plan(record_plan, values, NULL, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "legacy key upgrade record failed: %s", SPI_result_code_string(rc));
	SPI_finish();
}

/*
 * After a valid verdict on a pending legacy key: record its upgrade for the
 * next flush, or count it as deferred where this transaction cannot write.
 */
void
apikey_legacy_upgrade(ApikeyLegacyMatch *match)
{
	if (!match->pending)
		return;
	if (RecoveryInProgress() || XactReadOnly || IsInParallelMode())
	{
		apikey_legacy_count_upgrades(0, 1);
		return;
	}
	apikey_run_as_owner(record_upgrade, match);
}

/* The apply's statement; runs as the tables' owner.  *arg: keys upgraded. */
static void
apply_upgrades(void *arg)
{
	int			nest = NewGUCNestLevel();
	int			rc;

	apikey_audit_mark_legacy_upgrade();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	rc = SPI_execute(APPLY_SQL, false, 0);
	if (rc != SPI_OK_UPDATE)
		elog(ERROR, "legacy key upgrade failed: %s", SPI_result_code_string(rc));
	*(uint64 *) arg = SPI_processed;
	SPI_finish();
	AtEOXact_GUC(true, nest);
}

/*
 * Apply the recorded upgrades, in the caller's transaction (a flush's),
 * inside an internal subtransaction: an error (other than a cancel) is
 * reported as a WARNING and the rows stay for the next flush.  Returns the
 * number of keys upgraded.  Nothing to do before the 1.2 update.
 */
int
apikey_legacy_upgrades_apply(void)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	uint64		upgraded = 0;

	if (!OidIsValid(apikey_keystore_keys_relid(true)) ||
		!OidIsValid(get_relname_relid("legacy_upgrade_pending",
									  get_rel_namespace(apikey_keystore_keys_relid(true)))))
		return 0;
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		apikey_run_as_owner(apply_upgrades, &upgraded);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData  *e;

		MemoryContextSwitchTo(cxt);
		e = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		if (e->sqlerrcode == ERRCODE_QUERY_CANCELED ||
			e->sqlerrcode == ERRCODE_ADMIN_SHUTDOWN)
			ReThrowError(e);
		ereport(WARNING,
				(errcode(e->sqlerrcode),
				 errmsg("recorded legacy key upgrades were not applied: %s", e->message),
				 errhint("They stay in apikey.legacy_upgrade_pending; the next apikey.flush_usage() tries again.")));
		FreeErrorData(e);
		upgraded = 0;
	}
	PG_END_TRY();
	apikey_legacy_count_upgrades(upgraded, 0);
	return (int) upgraded;
}
