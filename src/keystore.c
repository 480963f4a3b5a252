/*-------------------------------------------------------------------------
 *
 * keystore.c
 *	  Read one key's verification record straight from the apikey tables.
 *
 * This is the cache-miss path.  It goes through the unique index on
 * keys.hash and the primary keys of revocations and key_scopes with
 * systable scans: no SPI, no parser, no planner.  Relation and attribute
 * numbers are looked up by name through the syscache, so the code does not
 * depend on column order, and are re-resolved whenever apikey.keys is
 * invalidated (for example by DROP/CREATE EXTENSION).
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
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "apikey.h"

/* OIDs and attribute numbers of the objects we read, by name */
typedef struct KeystoreCatalog
{
	Oid			keys;
	Oid			keys_hash_key;
	Oid			revocations;
	Oid			revocations_pkey;
	Oid			key_scopes;
	Oid			key_scopes_pkey;
	AttrNumber	att_id;
	AttrNumber	att_hash;
	AttrNumber	att_owner;
	AttrNumber	att_expires_at;
	AttrNumber	att_rate_limit;
	AttrNumber	att_rate_window;
	AttrNumber	att_quota;
	AttrNumber	att_allowed_cidrs;
	AttrNumber	att_scope;
} KeystoreCatalog;

static KeystoreCatalog catalog;
static Oid	keys_relid = InvalidOid;	/* apikey.keys, until invalidated */

static void
keystore_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == keys_relid)
	{
		keys_relid = InvalidOid;
		catalog.keys = InvalidOid;
	}
}

static Oid
relation_oid(Oid nsp, const char *relname)
{
	Oid			relid = get_relname_relid(relname, nsp);

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("apikey relation \"apikey.%s\" is missing", relname),
				 errhint("Reinstall the extension with DROP EXTENSION apikey; CREATE EXTENSION apikey.")));
	return relid;
}

static AttrNumber
attribute_number(Oid relid, const char *attname)
{
	AttrNumber	attnum = get_attnum(relid, attname);

	if (attnum == InvalidAttrNumber)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("apikey column \"%s\" of \"%s\" is missing",
						attname, get_rel_name(relid)),
				 errhint("Reinstall the extension with DROP EXTENSION apikey; CREATE EXTENSION apikey.")));
	return attnum;
}

/*
 * The OID of apikey.keys, or InvalidOid when the extension is not installed
 * in this database and missing_ok.  Remembered until apikey.keys (or the
 * whole relcache) is invalidated, which DROP EXTENSION, a rename and any
 * DDL on the table all do.
 */
Oid
apikey_keystore_keys_relid(bool missing_ok)
{
	static bool callback_registered = false;
	Oid			nsp;
	Oid			relid;

	if (OidIsValid(keys_relid))
		return keys_relid;

	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(keystore_relcache_callback, (Datum) 0);
		callback_registered = true;
	}
	nsp = get_namespace_oid("apikey", true);
	relid = OidIsValid(nsp) ? get_relname_relid("keys", nsp) : InvalidOid;
	keys_relid = relid;

	if (!OidIsValid(relid) && !missing_ok)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("extension \"apikey\" is not installed in this database"),
				 errhint("Run CREATE EXTENSION apikey.")));
	return relid;
}

/* Resolve every OID and attribute number, if apikey.keys changed. */
static void
catalog_resolve(void)
{
	Oid			keys = apikey_keystore_keys_relid(false);
	Oid			nsp;

	if (keys == catalog.keys)
		return;

	nsp = get_rel_namespace(keys);
	catalog.keys = InvalidOid;
	catalog.keys_hash_key = relation_oid(nsp, "keys_hash_key");
	catalog.revocations = relation_oid(nsp, "revocations");
	catalog.revocations_pkey = relation_oid(nsp, "revocations_pkey");
	catalog.key_scopes = relation_oid(nsp, "key_scopes");
	catalog.key_scopes_pkey = relation_oid(nsp, "key_scopes_pkey");
	catalog.att_id = attribute_number(keys, "id");
	catalog.att_hash = attribute_number(keys, "hash");
	catalog.att_owner = attribute_number(keys, "owner");
	catalog.att_expires_at = attribute_number(keys, "expires_at");
	catalog.att_rate_limit = attribute_number(keys, "rate_limit");
	catalog.att_rate_window = attribute_number(keys, "rate_window");
	catalog.att_quota = attribute_number(keys, "quota");
	catalog.att_allowed_cidrs = attribute_number(keys, "allowed_cidrs");
	catalog.att_scope = attribute_number(catalog.key_scopes, "scope");
	catalog.keys = keys;
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

/* Is there a revocation for key_id?  (revocations.key_id is attribute 1) */
static bool
revoked(int64 key_id, Snapshot snapshot)
{
	Relation	rel = table_open(catalog.revocations, AccessShareLock);
	ScanKeyData skey;
	SysScanDesc scan;
	bool		found;

	ScanKeyInit(&skey, 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(key_id));
	scan = systable_beginscan(rel, catalog.revocations_pkey, true, snapshot, 1, &skey);
	found = HeapTupleIsValid(systable_getnext(scan));
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return found;
}

/*
 * Look up the key whose token hashes to hash.  Returns false if there is
 * none.  On success fills *key; its variable-length parts are allocated in
 * chunk_cxt as one chunk (key->chunk).  Scratch allocations go to
 * CurrentMemoryContext.
 */
bool
apikey_keystore_load(const uint8 *hash, ApikeyKey *key, MemoryContext chunk_cxt)
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
	List	   *scope_list = NIL;
	ListCell   *lc;
	Size		size;
	char	   *p;
	int			i;

	/* a fresh snapshot cannot be taken in parallel mode */
	if (IsInParallelMode())
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("API keys cannot be verified during a parallel operation"),
				 errhint("Do not call apikey.verify(), check() or authenticate() from a function marked PARALLEL SAFE.")));

	catalog_resolve();
	snapshot = RegisterSnapshot(GetLatestSnapshot());

	hash_datum = palloc(VARHDRSZ + APIKEY_HASH_LEN);
	SET_VARSIZE(hash_datum, VARHDRSZ + APIKEY_HASH_LEN);
	memcpy(VARDATA(hash_datum), hash, APIKEY_HASH_LEN);

	rel = table_open(catalog.keys, AccessShareLock);
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

		d = heap_getattr(tup, catalog.att_rate_limit, desc, &isnull);
		key->rate_limit = isnull ? 0 : DatumGetInt32(d);
		d = heap_getattr(tup, catalog.att_rate_window, desc, &isnull);
		key->rate_window = isnull ? USECS_PER_MINUTE : interval_usecs(DatumGetIntervalP(d));

		(void) heap_getattr(tup, catalog.att_quota, desc, &isnull);
		key->has_quota = !isnull;

		d = heap_getattr(tup, catalog.att_allowed_cidrs, desc, &isnull);
		if (!isnull)
			cidr_array = DatumGetArrayTypePCopy(d);
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);

	if (found)
	{
		Datum	   *cidrs = NULL;
		int			ncidrs = 0;

		key->revoked = revoked(key->key_id, snapshot);

		/* scopes: key_scopes_pkey is (key_id, scope) */
		rel = table_open(catalog.key_scopes, AccessShareLock);
		ScanKeyInit(&skey, 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(key->key_id));
		scan = systable_beginscan(rel, catalog.key_scopes_pkey, true, snapshot, 1, &skey);
		while (HeapTupleIsValid(tup = systable_getnext(scan)))
		{
			d = heap_getattr(tup, catalog.att_scope, RelationGetDescr(rel), &isnull);
			if (!isnull)
				scope_list = lappend(scope_list, TextDatumGetCString(d));
		}
		systable_endscan(scan);
		table_close(rel, AccessShareLock);

		if (cidr_array != NULL)
			deconstruct_array(cidr_array, CIDROID, -1, false, TYPALIGN_INT,
							  &cidrs, NULL, &ncidrs);

		/* pack owner, scopes and CIDRs into one chunk */
		size = MAXALIGN(sizeof(char *) * list_length(scope_list)) +
			MAXALIGN(sizeof(inet *) * ncidrs) + strlen(owner) + 1;
		foreach(lc, scope_list)
			size += strlen((char *) lfirst(lc)) + 1;
		for (i = 0; i < ncidrs; i++)
			size += MAXALIGN(VARSIZE_ANY(DatumGetPointer(cidrs[i])));

		key->chunk = MemoryContextAlloc(chunk_cxt, size);
		key->chunk_size = size;
		p = key->chunk;
		key->scopes = (char **) p;
		p += MAXALIGN(sizeof(char *) * list_length(scope_list));
		key->cidrs = (inet **) p;
		p += MAXALIGN(sizeof(inet *) * ncidrs);
		for (i = 0; i < ncidrs; i++)
		{
			Size		len = VARSIZE_ANY(DatumGetPointer(cidrs[i]));

			memcpy(p, DatumGetPointer(cidrs[i]), len);
			key->cidrs[i] = (inet *) p;
			p += MAXALIGN(len);
		}
		key->ncidrs = ncidrs;
		key->nscopes = 0;
		foreach(lc, scope_list)
		{
			strcpy(p, (char *) lfirst(lc));
			key->scopes[key->nscopes++] = p;
			p += strlen(p) + 1;
		}
		strcpy(p, owner);
		key->owner = p;
	}

	UnregisterSnapshot(snapshot);
	return found;
}
