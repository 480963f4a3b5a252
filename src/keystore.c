/*-------------------------------------------------------------------------
 *
 * keystore.c
 *	  Read one key's verification record straight from the apikey tables.
 *
 * This is the cache-miss path.  It goes through the unique index on
 * keys.hash and the primary keys of revocations, suspensions, quarantines,
 * key_scopes, key_lineage and owners (the owner's pooled limits) with
 * systable scans: no SPI, no parser, no planner.  A key that draws on
 * another's budget (key_lineage.budget_key_id, set by rotate()) costs one
 * more probe, of keys' primary key.  A suspension or quarantine is loaded
 * with its end (until) and judged at each call (verify.c), so the cache
 * never holds a decision past its end.
 *
 * Finding the tables.  Never by name alone: a schema called "apikey" can be
 * created in advance, renamed and replaced by anyone with CREATE on the
 * database.  The extension's own catalog row gives its namespace OID; the
 * namespace must belong to a superuser; every table must be a member of
 * the extension and every index must belong to its table.  OIDs and
 * attribute numbers are resolved once and again after each invalidation
 * of apikey.keys (DROP/CREATE EXTENSION, DDL, a rename).
 *
 * Invalidation generations.  This file owns apikey.keys' OID, and counts
 * every relcache invalidation of it (and every "invalidate all") in a
 * generation number that the key cache compares: any of them empties the
 * cache.  It counts the invalidations of apikey._cache_signal apart: they
 * announce committed changes of particular keys (invalidation.c), and the
 * cache evicts just those.  The signal view is resolved with the others,
 * before any load, so no signal can go unrecognised while the cache holds
 * anything.
 *
 * Lock, then snapshot.  A load locks every relation it reads before it
 * takes its snapshot: lock acquisition is where invalidation messages
 * arrive, so a change that commits before the snapshot is both seen by the
 * snapshot and already counted, and one that commits after it is counted
 * later.  The load reports the generation current at its snapshot; the
 * cache keeps the record only if the generation has not moved by the time
 * the read is over (a toast fetch, say, can accept invalidations
 * mid-read).  The tables read only for a key that exists (revocations,
 * suspensions, quarantines, scopes, lineage, owners) are locked once a
 * first probe of the hash index has found it, and then the whole load runs
 * as above, every lock held before its snapshot; a token that matches no
 * key costs two locks and one probe of the index that takes no snapshot
 * (any row version with the hash counts).
 *
 * The scans read the tables as the C code, not as the calling role: a role
 * that may call verify() learns the verdict and nothing else.  That is the
 * same trust model as a SECURITY DEFINER function, without paying for one on
 * every call.
 *
 * The snapshot is always a fresh one (GetLatestSnapshot), never the
 * caller's transaction snapshot.  A REPEATABLE READ transaction that began
 * before a revocation must not load the key as unrevoked into the
 * cache, where later transactions would trust it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/parallel.h"
#include "access/xact.h"
#include "access/htup_details.h"
#include "access/relation.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "catalog/dependency.h"
#include "catalog/index.h"
#include "catalog/indexing.h"
#include "catalog/pg_class.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_proc.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "catalog/pg_collation.h"
#include "lib/stringinfo.h"
#include "utils/syscache.h"

#include "apikey.h"

/* OIDs and attribute numbers of the objects we read */
typedef struct KeystoreCatalog
{
	Oid			keys;
	Oid			keys_pkey;
	Oid			keys_hash_key;
	Oid			revocations;
	Oid			revocations_pkey;
	Oid			key_scopes;
	Oid			key_scopes_pkey;
	Oid			suspensions;
	Oid			suspensions_pkey;
	Oid			quarantines;
	Oid			quarantines_pkey;
	Oid			key_lineage;
	Oid			key_lineage_pkey;
	Oid			owners;
	Oid			owners_pkey;
	Oid			signal;			/* apikey._cache_signal */
	AttrNumber	att_id;
	AttrNumber	att_hash;
	AttrNumber	att_owner;
	AttrNumber	att_expires_at;
	AttrNumber	att_rate_limit;
	AttrNumber	att_rate_window;
	AttrNumber	att_quota;
	AttrNumber	att_allowed_cidrs;
	AttrNumber	att_budget_key_id;	/* of key_lineage */
	AttrNumber	att_scope;
	AttrNumber	att_suspended_until;
	AttrNumber	att_quarantined_until;
	AttrNumber	att_allowed_scopes;
	AttrNumber	att_owner_rate_limit;	/* of apikey.owners */
	AttrNumber	att_owner_rate_window;
	AttrNumber	att_owner_quota;
	AttrNumber	att_owner_allowed_cidrs;
	AttrNumber	att_owner_created_at;
} KeystoreCatalog;

static KeystoreCatalog catalog;
static Oid	keys_relid = InvalidOid;	/* apikey.keys, until invalidated */
static uint64 keys_generation = 1;	/* invalidations of apikey.keys seen */
static uint64 signal_generation = 1;	/* invalidations of _cache_signal seen */

static void
keystore_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == keys_relid)
	{
		keys_generation++;
		keys_relid = InvalidOid;
		catalog.keys = InvalidOid;
	}
	else if (relid == catalog.signal)
		signal_generation++;
}

/* A schema changed (owner, name): find and check everything again. */
static void
keystore_namespace_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	keystore_relcache_callback(arg, InvalidOid);
}

/* Register the invalidation callbacks; called from _PG_init. */
void
apikey_keystore_init(void)
{
	CacheRegisterRelcacheCallback(keystore_relcache_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(NAMESPACEOID, keystore_namespace_callback, (Datum) 0);
}

/* Queue an invalidation of every backend's key cache (trigger body). */
void
apikey_keystore_invalidate_all(void)
{
	Oid			relid = apikey_keystore_keys_relid(true);

	if (OidIsValid(relid))
		CacheInvalidateRelcacheByRelid(relid);
}

/* How many invalidations of apikey.keys this backend has processed. */
uint64
apikey_keystore_generation(void)
{
	return keys_generation;
}

/* How many invalidations of apikey._cache_signal it has processed. */
uint64
apikey_keystore_signal_generation(void)
{
	return signal_generation;
}

static void
report_damaged(const char *what)
{
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("apikey %s is missing or does not belong to the extension", what),
			 errhint("Reinstall the extension with DROP EXTENSION apikey; CREATE EXTENSION apikey.")));
}

/*
 * The schema an extension was installed in, from its catalog row (apikey's,
 * or pgcrypto's for legacy.c).
 */
Oid
apikey_extension_namespace(Oid extoid)
{
	Relation	rel;
	ScanKeyData skey;
	SysScanDesc scan;
	HeapTuple	tup;
	Oid			nsp = InvalidOid;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&skey, Anum_pg_extension_oid, BTEqualStrategyNumber, F_OIDEQ,
				ObjectIdGetDatum(extoid));
	scan = systable_beginscan(rel, ExtensionOidIndexId, true, NULL, 1, &skey);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
		nsp = ((Form_pg_extension) GETSTRUCT(tup))->extnamespace;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return nsp;
}

/*
 * A function of the extension, by name and argument types in the
 * extension's schema, checked to be the extension's own; InvalidOid when
 * the extension (or this version of it) is not installed here.
 */
Oid
apikey_keystore_function(const char *name, int nargs, const Oid *argtypes)
{
	Oid			extoid = get_extension_oid("apikey", true);
	Oid			nsp;
	Oid			fn;

	if (!OidIsValid(extoid))
		return InvalidOid;
	nsp = apikey_extension_namespace(extoid);
	if (!OidIsValid(nsp))
		return InvalidOid;

	fn = GetSysCacheOid3(PROCNAMEARGSNSP, Anum_pg_proc_oid,
						 CStringGetDatum(name),
						 PointerGetDatum(buildoidvector(argtypes, nargs)),
						 ObjectIdGetDatum(nsp));
	if (OidIsValid(fn) && getExtensionOfObject(ProcedureRelationId, fn) != extoid)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("function %s in apikey's schema is not part of the extension", name),
				 errhint("Drop the look-alike function; apikey's own is created by CREATE EXTENSION or ALTER EXTENSION UPDATE.")));
	return fn;
}

/*
 * Refuse a schema that a non-superuser owns: its owner could rename it and
 * put look-alike tables under its name, where apikey's SQL functions would
 * write keys and revocations.
 */
static void
check_namespace_owner(Oid nsp)
{
	HeapTuple	tup = SearchSysCache1(NAMESPACEOID, ObjectIdGetDatum(nsp));
	Oid			owner;
	char	   *name;

	if (!HeapTupleIsValid(tup))
		report_damaged("schema");
	owner = ((Form_pg_namespace) GETSTRUCT(tup))->nspowner;
	name = pstrdup(NameStr(((Form_pg_namespace) GETSTRUCT(tup))->nspname));
	ReleaseSysCache(tup);
	if (!superuser_arg(owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("schema \"%s\" of extension \"apikey\" is owned by role \"%s\", which is not a superuser",
						name, GetUserNameFromId(owner, false)),
				 errdetail("Its owner could replace the tables apikey relies on."),
				 errhint("Check the schema's contents, then ALTER SCHEMA %s OWNER TO a superuser.",
						 quote_identifier(name))));
}

/* A relation of the extension in nsp, by name, checked to be a member. */
static Oid
member_relation(Oid extoid, Oid nsp, const char *relname, char relkind,
				const char *what)
{
	Oid			relid = get_relname_relid(relname, nsp);

	if (!OidIsValid(relid) || get_rel_relkind(relid) != relkind ||
		getExtensionOfObject(RelationRelationId, relid) != extoid)
		report_damaged(psprintf("%s \"%s\"", what, relname));
	return relid;
}

static Oid
member_table(Oid extoid, Oid nsp, const char *relname)
{
	return member_relation(extoid, nsp, relname, RELKIND_RELATION, "table");
}

/* An index in nsp, by name, checked to be an index of table. */
static Oid
table_index(Oid table, Oid nsp, const char *relname)
{
	Oid			relid = get_relname_relid(relname, nsp);

	if (!OidIsValid(relid) || get_rel_relkind(relid) != RELKIND_INDEX ||
		IndexGetRelation(relid, true) != table)
		report_damaged(psprintf("index \"%s\"", relname));
	return relid;
}

static AttrNumber
attribute_number(Oid relid, const char *attname)
{
	AttrNumber	attnum = get_attnum(relid, attname);

	if (attnum == InvalidAttrNumber)
		report_damaged(psprintf("column \"%s\" of \"%s\"", attname, get_rel_name(relid)));
	return attnum;
}

/*
 * The OID of apikey.keys, or InvalidOid when the extension is not installed
 * in this database and missing_ok.  Found through the extension's own
 * catalog row and remembered until apikey.keys (or the whole relcache) is
 * invalidated, which DROP EXTENSION, a rename and any DDL on it all do.
 */
Oid
apikey_keystore_keys_relid(bool missing_ok)
{
	Oid			extoid;
	Oid			nsp;

	if (OidIsValid(keys_relid))
		return keys_relid;

	extoid = get_extension_oid("apikey", true);
	if (!OidIsValid(extoid))
	{
		if (missing_ok)
			return InvalidOid;
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("extension \"apikey\" is not installed in this database"),
				 errhint("Run CREATE EXTENSION apikey.")));
	}
	nsp = apikey_extension_namespace(extoid);
	if (!OidIsValid(nsp))
		report_damaged("schema");
	check_namespace_owner(nsp);
	keys_relid = member_table(extoid, nsp, "keys");
	return keys_relid;
}

/* Resolve every OID and attribute number, if apikey.keys changed. */
static void
catalog_resolve(void)
{
	Oid			keys = apikey_keystore_keys_relid(false);
	Oid			extoid;
	Oid			nsp;

	if (keys == catalog.keys)
		return;

	extoid = getExtensionOfObject(RelationRelationId, keys);
	nsp = get_rel_namespace(keys);
	catalog.keys = InvalidOid;
	catalog.keys_pkey = table_index(keys, nsp, "keys_pkey");
	catalog.keys_hash_key = table_index(keys, nsp, "keys_hash_key");
	catalog.revocations = member_table(extoid, nsp, "revocations");
	catalog.revocations_pkey = table_index(catalog.revocations, nsp, "revocations_pkey");
	catalog.key_scopes = member_table(extoid, nsp, "key_scopes");
	catalog.key_scopes_pkey = table_index(catalog.key_scopes, nsp, "key_scopes_pkey");
	catalog.suspensions = member_table(extoid, nsp, "suspensions");
	catalog.suspensions_pkey = table_index(catalog.suspensions, nsp, "suspensions_pkey");
	catalog.quarantines = member_table(extoid, nsp, "quarantines");
	catalog.quarantines_pkey = table_index(catalog.quarantines, nsp, "quarantines_pkey");
	catalog.key_lineage = member_table(extoid, nsp, "key_lineage");
	catalog.key_lineage_pkey = table_index(catalog.key_lineage, nsp, "key_lineage_pkey");
	catalog.owners = member_table(extoid, nsp, "owners");
	catalog.owners_pkey = table_index(catalog.owners, nsp, "owners_pkey");
	catalog.signal = member_relation(extoid, nsp, "_cache_signal", RELKIND_VIEW, "view");
	catalog.att_id = attribute_number(keys, "id");
	catalog.att_hash = attribute_number(keys, "hash");
	catalog.att_owner = attribute_number(keys, "owner");
	catalog.att_expires_at = attribute_number(keys, "expires_at");
	catalog.att_rate_limit = attribute_number(keys, "rate_limit");
	catalog.att_rate_window = attribute_number(keys, "rate_window");
	catalog.att_quota = attribute_number(keys, "quota");
	catalog.att_allowed_cidrs = attribute_number(keys, "allowed_cidrs");
	catalog.att_budget_key_id = attribute_number(catalog.key_lineage, "budget_key_id");
	catalog.att_scope = attribute_number(catalog.key_scopes, "scope");
	catalog.att_suspended_until = attribute_number(catalog.suspensions, "until");
	catalog.att_quarantined_until = attribute_number(catalog.quarantines, "until");
	catalog.att_allowed_scopes = attribute_number(catalog.quarantines, "allowed_scopes");
	catalog.att_owner_rate_limit = attribute_number(catalog.owners, "rate_limit");
	catalog.att_owner_rate_window = attribute_number(catalog.owners, "rate_window");
	catalog.att_owner_quota = attribute_number(catalog.owners, "quota");
	catalog.att_owner_allowed_cidrs = attribute_number(catalog.owners, "allowed_cidrs");
	catalog.att_owner_created_at = attribute_number(catalog.owners, "created_at");
	catalog.keys = keys;
}

/* The OID of apikey._cache_signal, whose invalidation names changed keys. */
Oid
apikey_keystore_signal_relid(void)
{
	catalog_resolve();
	return catalog.signal;
}

/* The role that owns apikey.keys: the one internal writes run as. */
Oid
apikey_keystore_owner(void)
{
	Oid			relid = apikey_keystore_keys_relid(false);
	HeapTuple	tup;
	Oid			owner;

	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(tup))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension \"apikey\" is being dropped")));
	owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
	ReleaseSysCache(tup);
	return owner;
}

/* Interval to microseconds, treating a month as 30 days as PostgreSQL does. */
static int64
interval_usecs(const Interval *iv)
{
	return iv->time + (int64) iv->day * USECS_PER_DAY +
		(int64) iv->month * DAYS_PER_MONTH * USECS_PER_DAY;
}

/* A key's rate limit and quota settings, from its keys row. */
static void
read_limits(HeapTuple tup, TupleDesc desc, ApikeyKey *key)
{
	bool		isnull;
	Datum		d;

	d = heap_getattr(tup, catalog.att_rate_limit, desc, &isnull);
	key->rate_limit = isnull ? 0 : DatumGetInt32(d);
	d = heap_getattr(tup, catalog.att_rate_window, desc, &isnull);
	key->rate_window = isnull ? USECS_PER_MINUTE : interval_usecs(DatumGetIntervalP(d));
	(void) heap_getattr(tup, catalog.att_quota, desc, &isnull);
	key->has_quota = !isnull;
	key->budget_id = key->key_id;
	memcpy(key->budget_hash_prefix, key->hash, sizeof(key->budget_hash_prefix));
}

/*
 * Make key draw on the budget of key budget_id (a rotation's new key): its
 * limits, its bucket, its quota row.  If that key is gone, key keeps its own.
 */
static void
read_budget(Relation keys, int64 budget_id, Snapshot snapshot, ApikeyKey *key)
{
	ScanKeyData skey;
	SysScanDesc scan;
	HeapTuple	tup;

	ScanKeyInit(&skey, catalog.att_id, BTEqualStrategyNumber, F_INT8EQ,
				Int64GetDatum(budget_id));
	scan = systable_beginscan(keys, catalog.keys_pkey, true, snapshot, 1, &skey);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		TupleDesc	desc = RelationGetDescr(keys);
		bool		isnull;
		bytea	   *hash;

		hash = DatumGetByteaPP(heap_getattr(tup, catalog.att_hash, desc, &isnull));
		read_limits(tup, desc, key);
		key->budget_id = budget_id;
		memcpy(key->budget_hash_prefix, VARDATA_ANY(hash), sizeof(key->budget_hash_prefix));
	}
	systable_endscan(scan);
}

/*
 * The key whose budget key_id draws on (key_lineage.budget_key_id, set by
 * rotate() on the old key), or 0 for its own.  Most keys have no lineage
 * row: one probe of key_lineage's primary key says so.
 */
static int64
budget_key(int64 key_id, Snapshot snapshot)
{
	Relation	rel = table_open(catalog.key_lineage, NoLock);
	ScanKeyData skey;
	SysScanDesc scan;
	HeapTuple	tup;
	int64		budget_id = 0;

	/* key_lineage.key_id is attribute 1 */
	ScanKeyInit(&skey, 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(key_id));
	scan = systable_beginscan(rel, catalog.key_lineage_pkey, true, snapshot, 1, &skey);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		bool		isnull;
		Datum		d = heap_getattr(tup, catalog.att_budget_key_id,
									 RelationGetDescr(rel), &isnull);

		if (!isnull)
			budget_id = DatumGetInt64(d);
	}
	systable_endscan(scan);
	table_close(rel, NoLock);
	return budget_id;
}

/*
 * Could a key have this hash?  The probe that lets a token matching no key
 * (unknown: the common failure, and what a guesser sends) take two locks
 * instead of fifteen, and no snapshot: it looks for any version of a row
 * with this hash (SnapshotAny), live, dead or not yet committed.  None
 * means no key has it now, since every key's row is in the index before
 * its insert commits.  One found is only a maybe: the key is then loaded
 * with every relation locked first and a fresh snapshot taken after.
 * Taking that snapshot here cost every unknown token a shared acquisition
 * of ProcArrayLock, which all backends contend for.
 */
static bool
key_exists(bytea *hash_datum)
{
	Relation	rel = table_open(catalog.keys, NoLock);
	ScanKeyData skey;
	SysScanDesc scan;
	bool		found;

	ScanKeyInit(&skey, catalog.att_hash, BTEqualStrategyNumber, F_BYTEAEQ,
				PointerGetDatum(hash_datum));
	scan = systable_beginscan(rel, catalog.keys_hash_key, true, SnapshotAny, 1, &skey);
	found = HeapTupleIsValid(systable_getnext(scan));
	systable_endscan(scan);
	table_close(rel, NoLock);
	return found;
}

/* Is there a revocation for key_id?  (revocations.key_id is attribute 1) */
static bool
revoked(int64 key_id, Snapshot snapshot)
{
	Relation	rel = table_open(catalog.revocations, NoLock);
	ScanKeyData skey;
	SysScanDesc scan;
	bool		found;

	ScanKeyInit(&skey, 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(key_id));
	scan = systable_beginscan(rel, catalog.revocations_pkey, true, snapshot, 1, &skey);
	found = HeapTupleIsValid(systable_getnext(scan));
	systable_endscan(scan);
	table_close(rel, NoLock);
	return found;
}

/*
 * The row for key_id in a table keyed by key_id (attribute 1) through its
 * primary key, or NULL: a copy in CurrentMemoryContext.  *until is its
 * until column (DT_NOEND when NULL).
 */
static HeapTuple
response_row(Oid relid, Oid pkey, AttrNumber att_until, int64 key_id,
			 Snapshot snapshot, TupleDesc *desc, TimestampTz *until)
{
	Relation	rel = table_open(relid, NoLock);
	ScanKeyData skey;
	SysScanDesc scan;
	HeapTuple	tup;

	ScanKeyInit(&skey, 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(key_id));
	scan = systable_beginscan(rel, pkey, true, snapshot, 1, &skey);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		bool		isnull;
		Datum		d = heap_getattr(tup, att_until, RelationGetDescr(rel), &isnull);

		*until = isnull ? DT_NOEND : DatumGetTimestampTz(d);
		tup = heap_copytuple(tup);
		*desc = CreateTupleDescCopy(RelationGetDescr(rel));
	}
	else
		tup = NULL;
	systable_endscan(scan);
	table_close(rel, NoLock);
	return tup;
}

/*
 * The owner's pooled limits (apikey.owners) into key, and a copy of the
 * owner's allowlist or NULL.  An owner without a row has none.  Its bucket
 * (ownerlimits.c) is named by SHA-256(owner, created_at): a row made again
 * (or the extension) never inherits an old row's bucket.
 */
static ArrayType *
read_owner(const char *owner, Snapshot snapshot, ApikeyKey *key)
{
	Relation	rel = table_open(catalog.owners, NoLock);
	ScanKeyData skey;
	SysScanDesc scan;
	HeapTuple	tup;
	ArrayType  *cidrs = NULL;

	/* the index's collation: the column's, the database default */
	ScanKeyEntryInitialize(&skey, 0, 1, BTEqualStrategyNumber, InvalidOid,
						   DEFAULT_COLLATION_OID, F_TEXTEQ,
						   CStringGetTextDatum(owner));
	scan = systable_beginscan(rel, catalog.owners_pkey, true, snapshot, 1, &skey);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		TupleDesc	desc = RelationGetDescr(rel);
		bool		isnull;
		Datum		d;

		TimestampTz created_at;
		StringInfoData name;
		uint8		owner_hash[APIKEY_HASH_LEN];

		key->has_owner = true;
		created_at = DatumGetTimestampTz(heap_getattr(tup, catalog.att_owner_created_at,
													  desc, &isnull));
		initStringInfo(&name);
		appendBinaryStringInfo(&name, (char *) &created_at, sizeof(created_at));
		appendStringInfoString(&name, owner);
		apikey_sha256(name.data, name.len, owner_hash);
		memcpy(key->owner_hash_prefix, owner_hash, sizeof(key->owner_hash_prefix));
		d = heap_getattr(tup, catalog.att_owner_rate_limit, desc, &isnull);
		key->owner_rate_limit = isnull ? 0 : DatumGetInt32(d);
		d = heap_getattr(tup, catalog.att_owner_rate_window, desc, &isnull);
		key->owner_rate_window = isnull ? USECS_PER_MINUTE : interval_usecs(DatumGetIntervalP(d));
		(void) heap_getattr(tup, catalog.att_owner_quota, desc, &isnull);
		key->owner_has_quota = !isnull;
		d = heap_getattr(tup, catalog.att_owner_allowed_cidrs, desc, &isnull);
		if (!isnull)
			cidrs = DatumGetArrayTypePCopy(d);
	}
	systable_endscan(scan);
	table_close(rel, NoLock);
	return cidrs;
}

/*
 * Lock what finding a key by its hash reads (apikey.keys and its hash
 * index), until the end of the transaction, and resolve the catalog again
 * if an invalidation arrived while locking.
 */
static void
lock_lookup(void)
{
	do
	{
		catalog_resolve();
		LockRelationOid(catalog.keys, AccessShareLock);
		LockRelationOid(catalog.keys_hash_key, AccessShareLock);
	} while (!OidIsValid(catalog.keys));
}

/*
 * Lock every relation a load reads, until the end of the transaction, and
 * resolve them again if an invalidation arrived while locking.
 */
static void
lock_catalog(void)
{
	do
	{
		catalog_resolve();
		LockRelationOid(catalog.keys, AccessShareLock);
		LockRelationOid(catalog.keys_pkey, AccessShareLock);
		LockRelationOid(catalog.keys_hash_key, AccessShareLock);
		LockRelationOid(catalog.revocations, AccessShareLock);
		LockRelationOid(catalog.revocations_pkey, AccessShareLock);
		LockRelationOid(catalog.key_scopes, AccessShareLock);
		LockRelationOid(catalog.key_scopes_pkey, AccessShareLock);
		LockRelationOid(catalog.suspensions, AccessShareLock);
		LockRelationOid(catalog.suspensions_pkey, AccessShareLock);
		LockRelationOid(catalog.quarantines, AccessShareLock);
		LockRelationOid(catalog.quarantines_pkey, AccessShareLock);
		LockRelationOid(catalog.key_lineage, AccessShareLock);
		LockRelationOid(catalog.key_lineage_pkey, AccessShareLock);
		LockRelationOid(catalog.owners, AccessShareLock);
		LockRelationOid(catalog.owners_pkey, AccessShareLock);
	} while (!OidIsValid(catalog.keys));
}

/*
 * Look up the key whose token hashes to hash.  Returns false if there is
 * none.  On success fills *key; its variable-length parts are allocated in
 * chunk_cxt as one chunk (key->chunk).  *generation is the invalidation
 * generation the record was read at: it is current only while
 * apikey_keystore_generation() still returns it.  Scratch allocations go to
 * CurrentMemoryContext.
 */
bool
apikey_keystore_load(const uint8 *hash, ApikeyKey *key, MemoryContext chunk_cxt,
					 uint64 *generation)
{
	Snapshot	snapshot;
	Relation	rel;
	ScanKeyData skey;
	SysScanDesc scan;
	HeapTuple	tup;
	bytea	   *hash_datum;
	bool		found = false;
	bool		isnull;
	Datum		d;
	char	   *owner = NULL;
	ArrayType  *cidr_array = NULL;
	ArrayType  *owner_cidr_array = NULL;
	Datum	   *allowed = NULL;
	int			nallowed = 0;
	List	   *scope_list = NIL;
	ListCell   *lc;
	Size		size;
	char	   *p;
	int			i;
	int64		budget_id = 0;

	/* a fresh snapshot cannot be taken in parallel mode */
	if (IsInParallelMode())
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("API keys cannot be verified during a parallel operation"),
				 errhint("Do not call apikey.verify(), check() or authenticate() from a function marked PARALLEL SAFE.")));

	hash_datum = palloc(VARHDRSZ + APIKEY_HASH_LEN);
	SET_VARSIZE(hash_datum, VARHDRSZ + APIKEY_HASH_LEN);
	memcpy(VARDATA(hash_datum), hash, APIKEY_HASH_LEN);

	/* lock, then snapshot: see the file header */
	lock_lookup();
	if (!key_exists(hash_datum))
		return false;
	lock_catalog();
	*generation = keys_generation;
	snapshot = RegisterSnapshot(GetLatestSnapshot());

	rel = table_open(catalog.keys, NoLock);
	ScanKeyInit(&skey, catalog.att_hash, BTEqualStrategyNumber, F_BYTEAEQ, PointerGetDatum(hash_datum));
	scan = systable_beginscan(rel, catalog.keys_hash_key, true, snapshot, 1, &skey);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		TupleDesc	desc = RelationGetDescr(rel);

		found = true;
		memset(key, 0, sizeof(*key));
		memcpy(key->hash, hash, APIKEY_HASH_LEN);
		key->key_id = DatumGetInt64(heap_getattr(tup, catalog.att_id, desc, &isnull));
		owner = TextDatumGetCString(heap_getattr(tup, catalog.att_owner, desc, &isnull));

		d = heap_getattr(tup, catalog.att_expires_at, desc, &isnull);
		key->has_expiry = !isnull;
		key->expires_at = isnull ? 0 : DatumGetTimestampTz(d);

		read_limits(tup, desc, key);

		d = heap_getattr(tup, catalog.att_allowed_cidrs, desc, &isnull);
		if (!isnull)
			cidr_array = DatumGetArrayTypePCopy(d);
	}
	systable_endscan(scan);
	if (found)
		budget_id = budget_key(key->key_id, snapshot);
	if (budget_id != 0 && budget_id != key->key_id)
		read_budget(rel, budget_id, snapshot, key);
	table_close(rel, NoLock);

	if (found)
	{
		Datum	   *cidrs = NULL;
		int			ncidrs = 0;
		Datum	   *owner_cidrs = NULL;
		int			owner_ncidrs = 0;
		TupleDesc	tupdesc;

		key->revoked = revoked(key->key_id, snapshot);
		owner_cidr_array = read_owner(owner, snapshot, key);
		tup = response_row(catalog.suspensions, catalog.suspensions_pkey,
						   catalog.att_suspended_until, key->key_id, snapshot,
						   &tupdesc, &key->suspended_until);
		key->suspended = (tup != NULL);
		tup = response_row(catalog.quarantines, catalog.quarantines_pkey,
						   catalog.att_quarantined_until, key->key_id, snapshot,
						   &tupdesc, &key->quarantined_until);
		key->quarantined = (tup != NULL);
		if (key->quarantined)
		{
			d = heap_getattr(tup, catalog.att_allowed_scopes, tupdesc, &isnull);
			if (!isnull)
				deconstruct_array(DatumGetArrayTypePCopy(d), TEXTOID, -1, false,
								  TYPALIGN_INT, &allowed, NULL, &nallowed);
		}

		/* scopes: key_scopes_pkey is (key_id, scope) */
		rel = table_open(catalog.key_scopes, NoLock);
		ScanKeyInit(&skey, 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(key->key_id));
		scan = systable_beginscan(rel, catalog.key_scopes_pkey, true, snapshot, 1, &skey);
		while (HeapTupleIsValid(tup = systable_getnext(scan)))
		{
			d = heap_getattr(tup, catalog.att_scope, RelationGetDescr(rel), &isnull);
			if (!isnull)
				scope_list = lappend(scope_list, TextDatumGetCString(d));
		}
		systable_endscan(scan);
		table_close(rel, NoLock);

		if (cidr_array != NULL)
			deconstruct_array(cidr_array, CIDROID, -1, false, TYPALIGN_INT,
							  &cidrs, NULL, &ncidrs);
		/* the owner's networks follow the key's */
		if (owner_cidr_array != NULL)
		{
			Datum	   *all;

			deconstruct_array(owner_cidr_array, CIDROID, -1, false, TYPALIGN_INT,
							  &owner_cidrs, NULL, &owner_ncidrs);
			all = palloc(sizeof(Datum) * (ncidrs + owner_ncidrs));
			if (ncidrs > 0)
				memcpy(all, cidrs, sizeof(Datum) * ncidrs);
			memcpy(all + ncidrs, owner_cidrs, sizeof(Datum) * owner_ncidrs);
			cidrs = all;
			ncidrs += owner_ncidrs;
		}
		/* mapped networks in IPv4 form, as client addresses are */
		for (i = 0; i < ncidrs; i++)
			cidrs[i] = InetPGetDatum(apikey_address_normal(DatumGetInetPP(cidrs[i]),
														   CurrentMemoryContext));

		/* pack owner, scopes and CIDRs into one chunk */
		size = MAXALIGN(sizeof(char *) * (list_length(scope_list) + nallowed)) +
			MAXALIGN(sizeof(char *) * nallowed) +
			MAXALIGN(sizeof(inet *) * ncidrs) + strlen(owner) + 1;
		foreach(lc, scope_list)
			size += strlen((char *) lfirst(lc)) + 1;
		for (i = 0; i < nallowed; i++)
			size += VARSIZE_ANY_EXHDR(DatumGetPointer(allowed[i])) + 1;
		for (i = 0; i < ncidrs; i++)
			size += MAXALIGN(VARSIZE_ANY(DatumGetPointer(cidrs[i])));

		key->chunk = MemoryContextAlloc(chunk_cxt, size);
		key->chunk_size = size;
		p = key->chunk;
		/* room to narrow the scopes to a quarantine's (verify.c) */
		key->scopes = (char **) p;
		p += MAXALIGN(sizeof(char *) * (list_length(scope_list) + nallowed));
		key->allowed_scopes = (char **) p;
		p += MAXALIGN(sizeof(char *) * nallowed);
		key->cidrs = (inet **) p;
		p += MAXALIGN(sizeof(inet *) * ncidrs);
		for (i = 0; i < ncidrs; i++)
		{
			Size		len = VARSIZE_ANY(DatumGetPointer(cidrs[i]));

			memcpy(p, DatumGetPointer(cidrs[i]), len);
			key->cidrs[i] = (inet *) p;
			p += MAXALIGN(len);
		}
		key->ncidrs = ncidrs - owner_ncidrs;
		key->owner_ncidrs = owner_ncidrs;
		key->nscopes = 0;
		foreach(lc, scope_list)
		{
			strcpy(p, (char *) lfirst(lc));
			key->scopes[key->nscopes++] = p;
			p += strlen(p) + 1;
		}
		key->nallowed = 0;
		for (i = 0; i < nallowed; i++)
		{
			text	   *t = DatumGetTextPP(allowed[i]);
			Size		len = VARSIZE_ANY_EXHDR(t);

			memcpy(p, VARDATA_ANY(t), len);
			p[len] = '\0';
			key->allowed_scopes[key->nallowed++] = p;
			p += len + 1;
		}
		strcpy(p, owner);
		key->owner = p;
	}

	UnregisterSnapshot(snapshot);
	return found;
}
