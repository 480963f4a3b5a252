/*-------------------------------------------------------------------------
 *
 * canary.c
 *	  Canary keys: tokens issued to be planted, never used.  A use answers
 *	  unknown, exactly like a token that matches no key, and is recorded
 *	  where the caller cannot roll it back, for the detector to file as a
 *	  critical finding (rule canary_use, apikey.run_detection()).
 *
 * Where canaries live.  Not in apikey.keys: in apikey.canaries, with an
 * id drawn from the keys' own sequence and a token of the same format and
 * prefix, so a canary looks like any key to whoever holds it.  Because a
 * canary is not a key, the key cache never holds one and verification
 * reaches it only on the unknown path: every token that matches no key
 * (canary or not) costs the same two locks and one probe of the unique
 * index on canaries.hash, with no snapshot: any row version with the hash
 * counts, as keystore.c probes keys, so a hit costs one heap fetch more
 * and no snapshot either.  (A row version that is not, or no longer, a
 * live canary - an aborted issue_canary, a deleted canary - is recorded
 * too; its id matches no canary that the pass can name, and its use of a
 * token only ever handed to a canary's issuer is worth reporting anyway.)
 * The caller gets the verdict of an unknown token: no key field, the same
 * SQLSTATE from authenticate, the same usage row, the same failure-limiter
 * charge.
 *
 * Where a use is recorded.  Not in the caller's transaction (it may be
 * read-only, on a standby, or rolled back): in a small table in shared
 * memory, one slot per (database, canary), which apikey._canary_uses()
 * hands to the detector's pass.  A slot holds a bounded set of variants,
 * one per (client address, scope asked for) with its count: the first
 * CANARY_VARIANTS - 1 distinct ones each get their own; every later one
 * is counted in the slot's last variant, which keeps the latest such
 * address and scope (reported as folded).  So whoever holds one canary
 * can vary the address and scope as they like and fill only that
 * canary's slot: the table overflows only when CANARY_SLOTS distinct
 * canaries are used between two passes.  Then the new canary's use goes
 * to the log and the slots already taken are kept: evicting one would let
 * whoever holds enough canaries erase the record of a chosen earlier one.
 * Before that, once three quarters of the slots hold a database's uses,
 * the worker's pass is brought forward (apikey_canary_pressing(),
 * detector.c) to empty them.
 *
 * A variant's uses are marked reported only when the pass that read them
 * commits (a transaction callback), so a pass that fails or rolls back
 * leaves them for the next one; a variant is freed once all its uses are
 * reported, and a slot once all its variants are.  When the table is
 * full, on a standby (whose worker does not run the detector), and
 * without shared_preload_libraries, a use is written to the server log
 * instead (LOG_SERVER_ONLY: never sent to the client, whatever its
 * client_min_messages).
 *
 * The scope asked for is kept only if it looks like a scope name (at most
 * 200 characters of letters, digits, _ . - : *) and holds nothing shaped
 * like a token: a caller's text is a claim, and evidence never carries a
 * token.  Otherwise the use records that a scope was withheld.
 *
 * A slot remembers which apikey.canaries it was recorded against: canary
 * ids restart when the extension is dropped and created again, and a use
 * of a dropped canary must not be filed as a new one's.  The next pass
 * frees such slots.
 *
 * Locking: canary_lock protects the whole table (exclusive to record, to
 * read for a pass, and to mark uses reported).  Recording a use scans the
 * slots and one slot's variants, a bounded cost the same for every use.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/socket.h>

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/dependency.h"
#include "catalog/index.h"
#include "catalog/pg_class.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/inet.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "apikey.h"
#include "token.h"

/* Distinct canaries used and not yet reported; variants kept per canary */
#define CANARY_SLOTS		128
#define CANARY_PRESSING		(CANARY_SLOTS * 3 / 4)	/* brings the pass forward */
#define CANARY_VARIANTS		8
#define CANARY_FOLDED		(CANARY_VARIANTS - 1)	/* counts all the others */
#define CANARY_SCOPE_MAX	200

/* The uses of one canary from one client address asking for one scope */
typedef struct CanaryVariant
{
	bool		in_use;
	uint32		gen;			/* bumped when the variant is freed */
	bool		has_addr;
	inet_struct addr;
	bool		has_scope;		/* a scope was asked for */
	bool		scope_withheld; /* ... but it did not look like one */
	char		scope[CANARY_SCOPE_MAX + 1];
	int64		calls;
	int64		reported;		/* calls a committed pass has filed */
	TimestampTz first_at;
	TimestampTz last_at;
} CanaryVariant;

/* The uses of one canary in one database */
typedef struct CanarySlot
{
	bool		in_use;			/* some variant is */
	Oid			dboid;
	Oid			relid;			/* apikey.canaries then: ids restart with
								 * the extension, so a use recorded for a
								 * dropped one must not name a new canary */
	int64		canary_id;
	CanaryVariant v[CANARY_VARIANTS];
} CanarySlot;

typedef struct CanaryShared
{
	uint64		unrecorded;		/* uses that found no free slot */
	CanarySlot	slots[CANARY_SLOTS];
} CanaryShared;

/* Uses read by this transaction's pass, marked reported at its commit */
typedef struct CanaryRead
{
	int			slot;
	int			variant;
	uint32		gen;			/* the variant's */
	int64		calls;
	SubTransactionId subid;
} CanaryRead;

static LWLock *canary_lock = NULL;
static CanaryShared *canary_shared = NULL;
static List *reads = NIL;		/* CanaryRead *, in TopTransactionContext */
static bool callbacks_registered = false;

/* apikey.canaries and its hash index, resolved through the extension */
static Oid	canaries_relid = InvalidOid;
static Oid	canaries_hash_key = InvalidOid;
static Oid	resolved_for_keys = InvalidOid;
static AttrNumber att_id = InvalidAttrNumber;
static AttrNumber att_hash = InvalidAttrNumber;

static void
canary_relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == canaries_relid)
		resolved_for_keys = InvalidOid;
}

/* Register the invalidation callback; called from _PG_init. */
void
apikey_canary_init(void)
{
	CacheRegisterRelcacheCallback(canary_relcache_callback, (Datum) 0);
}

Size
apikey_canary_shmem_size(void)
{
	return MAXALIGN(sizeof(CanaryShared));
}

void
apikey_canary_shmem_startup(LWLock *lock)
{
	bool		found;

	canary_lock = lock;
	canary_shared = ShmemInitStruct("apikey canary uses", sizeof(CanaryShared), &found);
	if (!found)
		memset(canary_shared, 0, sizeof(CanaryShared));
}

/*
 * Find apikey.canaries next to apikey.keys (whose schema keystore.c has
 * checked), as a member of the extension.  Missing (an install not yet
 * updated to 1.2) means there are no canaries: the verdict is unknown
 * either way.
 */
static bool
resolve_canaries(void)
{
	Oid			keys = apikey_keystore_keys_relid(true);
	Oid			nsp;
	Oid			relid;
	Oid			index;

	if (!OidIsValid(keys))
		return false;
	if (keys == resolved_for_keys)
		return OidIsValid(canaries_relid);
	nsp = get_rel_namespace(keys);
	relid = get_relname_relid("canaries", nsp);
	index = get_relname_relid("canaries_hash_key", nsp);
	canaries_relid = InvalidOid;
	if (OidIsValid(relid) && OidIsValid(index) &&
		get_rel_relkind(relid) == RELKIND_RELATION &&
		getExtensionOfObject(RelationRelationId, relid) ==
		getExtensionOfObject(RelationRelationId, keys) &&
		IndexGetRelation(index, true) == relid)
	{
		att_id = get_attnum(relid, "id");
		att_hash = get_attnum(relid, "hash");
		if (att_id != InvalidAttrNumber && att_hash != InvalidAttrNumber)
		{
			canaries_relid = relid;
			canaries_hash_key = index;
		}
	}
	resolved_for_keys = keys;
	return OidIsValid(canaries_relid);
}

/* The canary with this hash under snapshot, into *id; false if none. */
static bool
probe(bytea *hash_datum, Snapshot snapshot, int64 *id)
{
	Relation	rel = table_open(canaries_relid, NoLock);
	ScanKeyData skey;
	SysScanDesc scan;
	HeapTuple	tup;
	bool		found = false;

	ScanKeyInit(&skey, att_hash, BTEqualStrategyNumber, F_BYTEAEQ,
				PointerGetDatum(hash_datum));
	scan = systable_beginscan(rel, canaries_hash_key, true, snapshot, 1, &skey);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
	{
		bool		isnull;
		Datum		d = heap_getattr(tup, att_id, RelationGetDescr(rel), &isnull);

		found = !isnull;
		if (found)
			*id = DatumGetInt64(d);
	}
	systable_endscan(scan);
	table_close(rel, NoLock);
	return found;
}

/*
 * Is hash a canary's?  Called for every token that matches no key, so it
 * costs every unknown token the same.
 */
static bool
canary_lookup(const uint8 *hash, int64 *id)
{
	bytea	   *hash_datum = palloc(VARHDRSZ + APIKEY_HASH_LEN);
	bool		found = false;

	SET_VARSIZE(hash_datum, VARHDRSZ + APIKEY_HASH_LEN);
	memcpy(VARDATA(hash_datum), hash, APIKEY_HASH_LEN);
	do
	{
		if (!resolve_canaries())
			return false;
		LockRelationOid(canaries_relid, AccessShareLock);
		LockRelationOid(canaries_hash_key, AccessShareLock);
	} while (!OidIsValid(resolved_for_keys));

	found = probe(hash_datum, SnapshotAny, id);
	pfree(hash_datum);
	return found;
}

/* Keep a scope only if it looks like one and holds no token shape. */
static bool
scope_presentable(const char *s, size_t len)
{
	ApikeyShape shape;

	if (len == 0 || len > CANARY_SCOPE_MAX)
		return false;
	for (size_t i = 0; i < len; i++)
	{
		char		c = s[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			  (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-' ||
			  c == ':' || c == '*'))
			return false;
	}
	return !apikey_shape_scan(s, len, 0, &shape);
}

/* The server log's record of a use that shared memory cannot hold. */
static void
log_use(int64 id, inet *addr, const char *why)
{
	ereport(LOG_SERVER_ONLY,
			(errmsg("apikey canary key %lld was used from %s (%s)",
					(long long) id,
					addr ? DatumGetCString(DirectFunctionCall1(inet_out, InetPGetDatum(addr))) : "a local socket",
					why),
			 errhidestmt(true), errhidecontext(true)));
}

/* An address in fixed form, the bytes past its length zeroed. */
static void
addr_struct(inet *addr, inet_struct *out)
{
	memset(out, 0, sizeof(inet_struct));
	if (addr)
		memcpy(out, VARDATA_ANY(addr), Min(sizeof(inet_struct), VARSIZE_ANY_EXHDR(addr)));
}

/* Free variant j of slot, and the slot with its last variant. */
static void
free_variant(CanarySlot *slot, int j)
{
	slot->v[j].in_use = false;
	slot->v[j].gen++;
	for (int k = 0; k < CANARY_VARIANTS; k++)
		if (slot->v[k].in_use)
			return;
	slot->in_use = false;
}

/*
 * The slot of canary id in this database: the one in use, else a free one
 * claimed; -1 when the table is full.  Caller holds canary_lock.
 */
static int
find_slot(int64 id)
{
	int			free_slot = -1;

	for (int i = 0; i < CANARY_SLOTS; i++)
	{
		CanarySlot *slot = &canary_shared->slots[i];

		if (!slot->in_use)
		{
			if (free_slot < 0)
				free_slot = i;
			continue;
		}
		if (slot->dboid == MyDatabaseId && slot->relid == canaries_relid &&
			slot->canary_id == id)
			return i;
	}
	if (free_slot >= 0)
	{
		CanarySlot *slot = &canary_shared->slots[free_slot];

		slot->in_use = true;
		slot->dboid = MyDatabaseId;
		slot->relid = canaries_relid;
		slot->canary_id = id;
	}
	return free_slot;
}

/*
 * The variant of slot for this address and scope: the one in use, else a
 * free one, else the folded one (which then shows this address and scope,
 * the latest of those it counts).  Caller holds canary_lock.
 */
static CanaryVariant *
find_variant(CanarySlot *slot, const inet_struct *a, bool has_addr,
			 bool has_scope, bool presentable, const char *s, size_t slen,
			 TimestampTz now)
{
	CanaryVariant *v = NULL;

	for (int j = 0; j < CANARY_VARIANTS; j++)
	{
		CanaryVariant *c = &slot->v[j];

		if (!c->in_use)
		{
			if (v == NULL && j < CANARY_FOLDED)
				v = c;
			continue;
		}
		if (c->has_addr == has_addr &&
			memcmp(&c->addr, a, sizeof(inet_struct)) == 0 &&
			c->has_scope == has_scope &&
			c->scope_withheld == (has_scope && !presentable) &&
			(!presentable || (strlen(c->scope) == slen && memcmp(c->scope, s, slen) == 0)))
			return c;
	}
	if (v == NULL)
		v = &slot->v[CANARY_FOLDED];
	if (!v->in_use)
	{
		v->in_use = true;
		v->calls = 0;
		v->reported = 0;
		v->first_at = now;
	}
	v->has_addr = has_addr;
	v->addr = *a;
	v->has_scope = has_scope;
	v->scope_withheld = (has_scope && !presentable);
	memset(v->scope, 0, sizeof(v->scope));
	if (presentable)
		memcpy(v->scope, s, slen);
	return v;
}

/* Record one use in shared memory (or the log); never raises for room. */
static void
record_use(int64 id, text *scope, inet *addr, TimestampTz now)
{
	const char *s = scope ? VARDATA_ANY(scope) : NULL;
	size_t		slen = scope ? VARSIZE_ANY_EXHDR(scope) : 0;
	bool		presentable = scope != NULL && scope_presentable(s, slen);
	inet_struct a;
	int			i;

	addr_struct(addr, &a);

	if (canary_shared == NULL)
	{
		log_use(id, addr, "not recorded: apikey is not in shared_preload_libraries");
		return;
	}
	if (RecoveryInProgress())
	{
		log_use(id, addr, "on a standby: file it on the primary");
		return;
	}
	LWLockAcquire(canary_lock, LW_EXCLUSIVE);
	i = find_slot(id);
	if (i >= 0)
	{
		CanaryVariant *v = find_variant(&canary_shared->slots[i], &a,
										addr != NULL, scope != NULL,
										presentable, s, slen, now);

		v->calls++;
		v->last_at = now;
	}
	else
		canary_shared->unrecorded++;
	LWLockRelease(canary_lock);
	if (i < 0)
		log_use(id, addr, "not recorded: too many canaries used since the detector's last pass");
}

/*
 * Do this database's unreported uses fill three quarters of the table?
 * The worker then runs its detection pass early (detector.c), so the
 * table empties before a new canary finds no room.
 */
bool
apikey_canary_pressing(void)
{
	int			n = 0;

	if (canary_shared == NULL)
		return false;
	LWLockAcquire(canary_lock, LW_SHARED);
	for (int i = 0; i < CANARY_SLOTS; i++)
		if (canary_shared->slots[i].in_use &&
			canary_shared->slots[i].dboid == MyDatabaseId)
			n++;
	LWLockRelease(canary_lock);
	return n >= CANARY_PRESSING;
}

/*
 * The hook on verification's unknown path (verify.c): if hash is a
 * canary's, record the use.  The verdict stays unknown.
 */
void
apikey_canary_check(const uint8 *hash, text *scope, inet *addr, TimestampTz now)
{
	int64		id = 0;

	if (canary_lookup(hash, &id))
		record_use(id, scope, addr, now);
}

/* At commit, mark what this transaction's pass read as reported. */
static void
canary_xact_callback(XactEvent event, void *arg)
{
	ListCell   *lc;

	if (event == XACT_EVENT_COMMIT && reads != NIL && canary_shared != NULL)
	{
		LWLockAcquire(canary_lock, LW_EXCLUSIVE);
		foreach(lc, reads)
		{
			CanaryRead *r = lfirst(lc);
			CanarySlot *slot = &canary_shared->slots[r->slot];
			CanaryVariant *v = &slot->v[r->variant];

			if (!v->in_use || v->gen != r->gen)
				continue;
			v->reported = Max(v->reported, r->calls);
			if (v->reported >= v->calls)
				free_variant(slot, r->variant);
		}
		LWLockRelease(canary_lock);
	}
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		event == XACT_EVENT_PREPARE)
		reads = NIL;			/* TopTransactionContext is going */
}

/* A pass in a subtransaction that rolls back has filed nothing. */
static void
canary_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						SubTransactionId parentSubid, void *arg)
{
	ListCell   *lc;

	foreach(lc, reads)
	{
		CanaryRead *r = lfirst(lc);

		if (r->subid != mySubid)
			continue;
		if (event == SUBXACT_EVENT_ABORT_SUB)
			reads = foreach_delete_current(reads, lc);
		else if (event == SUBXACT_EVENT_COMMIT_SUB)
			r->subid = parentSubid;
	}
}

/*
 * Every use in this database not yet reported, one row per variant:
 * canary id, client address, scope (NULL when none was asked for or it was
 * withheld), scope_withheld, calls not yet reported, first and last use,
 * folded (the calls are of addresses and scopes beyond those kept one by
 * one; address and scope are the latest of them).
 * They count as reported when this transaction commits (a second pass in
 * the same transaction sees only uses made since the first).
 */
void
apikey_canary_uses(Tuplestorestate *out, TupleDesc desc)
{
	struct
	{
		int64		canary_id;
		bool		folded;
		CanaryVariant v;
	}		   *copy;
	int			n = 0;
	MemoryContext oldcxt;

	if (canary_shared == NULL)
		return;
	if (!callbacks_registered)
	{
		RegisterXactCallback(canary_xact_callback, NULL);
		RegisterSubXactCallback(canary_subxact_callback, NULL);
		callbacks_registered = true;
	}
	if (!resolve_canaries())
		return;
	copy = palloc(sizeof(*copy) * CANARY_SLOTS * CANARY_VARIANTS);
	LWLockAcquire(canary_lock, LW_EXCLUSIVE);
	for (int i = 0; i < CANARY_SLOTS; i++)
	{
		CanarySlot *slot = &canary_shared->slots[i];

		if (!slot->in_use || slot->dboid != MyDatabaseId)
			continue;
		if (slot->relid != canaries_relid)
		{
			/* recorded before the extension was dropped and created again */
			for (int j = 0; j < CANARY_VARIANTS; j++)
				if (slot->v[j].in_use)
					free_variant(slot, j);
			continue;
		}
		for (int j = 0; j < CANARY_VARIANTS; j++)
		{
			CanaryVariant *v = &slot->v[j];
			CanaryRead *r;
			int64		base = v->reported;
			ListCell   *lc;

			if (!v->in_use)
				continue;
			/* an earlier pass of this transaction has read some already */
			foreach(lc, reads)
			{
				CanaryRead *e = lfirst(lc);

				if (e->slot == i && e->variant == j && e->gen == v->gen)
					base = Max(base, e->calls);
			}
			if (v->calls <= base)
				continue;
			copy[n].canary_id = slot->canary_id;
			copy[n].folded = (j == CANARY_FOLDED);
			copy[n].v = *v;
			copy[n++].v.reported = base;
			oldcxt = MemoryContextSwitchTo(TopTransactionContext);
			r = palloc(sizeof(CanaryRead));
			r->slot = i;
			r->variant = j;
			r->gen = v->gen;
			r->calls = v->calls;
			r->subid = GetCurrentSubTransactionId();
			reads = lappend(reads, r);
			MemoryContextSwitchTo(oldcxt);
		}
	}
	LWLockRelease(canary_lock);

	for (int i = 0; i < n; i++)
	{
		CanaryVariant *u = &copy[i].v;
		Datum		values[8];
		bool		nulls[8] = {false};

		values[0] = Int64GetDatum(copy[i].canary_id);
		if (u->has_addr)
		{
			inet	   *a = palloc0(sizeof(inet));

			memcpy(VARDATA(a), &u->addr, sizeof(inet_struct));
			SET_INET_VARSIZE(a);
			values[1] = InetPGetDatum(a);
		}
		else
			nulls[1] = true;
		if (u->has_scope && !u->scope_withheld)
			values[2] = CStringGetTextDatum(u->scope);
		else
			nulls[2] = true;
		values[3] = BoolGetDatum(u->scope_withheld);
		values[4] = Int64GetDatum(u->calls - u->reported);
		values[5] = TimestampTzGetDatum(u->first_at);
		values[6] = TimestampTzGetDatum(u->last_at);
		values[7] = BoolGetDatum(copy[i].folded);
		tuplestore_putvalues(out, desc, values, nulls);
	}
	pfree(copy);
}
