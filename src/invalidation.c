/*-------------------------------------------------------------------------
 *
 * invalidation.c
 *	  Targeted invalidation: a committed change to a key evicts that key
 *	  from every backend's cache, and nothing else.
 *
 * Issuing a key invalidates nothing: no cache can hold a key that did not
 * exist, and a token that matches no key is never cached (keycache.c).
 * Changing, revoking, suspending or deleting a key evicts that key, and
 * every key whose budget it is (key_lineage.budget_key_id,
 * ApikeyKey.budget_id), in every backend, before the changing COMMIT
 * returns.
 *
 * The writer.  Row triggers on keys, key_scopes, revocations, suspensions,
 * quarantines and key_lineage (apikey._key_changed(), ENABLE ALWAYS, so
 * logical replication's apply worker and session_replication_role =
 * replica fire them too) collect the ids of the keys the transaction
 * changed.  A key inserted by the same
 * transaction is remembered as new, and scopes granted to it later in the
 * transaction are not a change.  At PRE_COMMIT the transaction queues a
 * relcache invalidation of apikey._cache_signal (transactional: sent at
 * commit, WAL-logged, replayed on standbys); at COMMIT, after
 * ProcArrayEndTransaction and before AtEOXact_Inval sends that
 * invalidation (xact.c's CommitTransaction order), it appends the key ids
 * to a ring in shared memory.  A transaction that changed more than
 * APIKEY_INVAL_MAX_KEYS keys, or that is prepared for two-phase commit
 * (COMMIT PREPARED runs in another backend, without our list), or that
 * runs without the ring (not preloaded) queues a relcache invalidation of
 * apikey.keys instead, which empties every cache as before.  So do
 * TRUNCATE and changes to apikey.scopes (apikey._invalidate()).
 *
 * The reader.  keystore.c counts invalidations of apikey._cache_signal
 * apart from those of apikey.keys.  When the count has moved, the key
 * cache calls apikey_inval_catch_up(), which evicts the keys of every ring
 * entry the backend has not processed yet.  Because a ring entry is
 * written only after its transaction is visible as committed, and before
 * its invalidation is sent:
 *	 - a backend that receives the invalidation finds the entry;
 *	 - a backend that finds the entry and then takes a snapshot sees the
 *	   change, so a record it loads afterwards is current;
 *	 - a record loaded with a snapshot older than the commit was loaded
 *	   before the entry existed, so the entry is still unprocessed and
 *	   evicts it at the next catch-up.  The cache keeps a loaded record only
 *	   if no invalidation at all arrived between its last catch-up and the
 *	   end of the load (keycache.c), so a catch-up run mid-load cannot mark
 *	   as processed an entry newer than the load's snapshot.
 * A transaction's own backend bypasses the cache from its first change to
 * its end (apikey_inval_bypass()): it must see its own uncommitted keys,
 * and must not cache them, as they vanish if it rolls back.
 *
 * Failing closed.  The cache is emptied instead of trusted when entries
 * were overwritten before this backend read them (the ring wrapped), when
 * there is no ring, and on a hot standby: a standby's invalidations come
 * from WAL replay and its ring is empty.  A backend that started during
 * recovery trusts the ring only once it has seen recovery end and has
 * taken every message queued until then (all replayed messages are queued
 * before recovery is marked done).
 *
 * Locking.  ring->lock (one of apikey's LWLocks, from shmem.c) protects head and
 * the slots: writers append under LW_EXCLUSIVE, readers copy the entries
 * they have not seen under LW_SHARED and evict after releasing it.  Nobody
 * holds it while doing anything else, and nothing on a cache hit takes it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type_d.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/rel.h"

#include "apikey.h"

#define APIKEY_INVAL_RING_SIZE	8192	/* key ids kept in shared memory */
#define APIKEY_INVAL_MAX_KEYS	512		/* more in one transaction: empty all */
#define APIKEY_INVAL_MAX_NEW	65536	/* new keys remembered per transaction */

/* One changed key: which database, which key. */
typedef struct InvalSlot
{
	Oid			dbid;
	int64		key_id;
} InvalSlot;

typedef struct InvalRing
{
	LWLock	   *lock;
	uint64		head;			/* entries ever appended */
	InvalSlot	slots[APIKEY_INVAL_RING_SIZE];	/* entry n is slots[n % size] */
} InvalRing;

static InvalRing *ring = NULL;

/* reader state */
static uint64 ring_seen = 0;	/* entries before this one are processed */
static bool primary_confirmed = false;	/* not in recovery, replay drained */
static int64 *catch_up_ids = NULL;	/* scratch, APIKEY_INVAL_RING_SIZE */

/* writer state: this transaction's changes (in TopTransactionContext) */
static bool xact_wrote_keys = false;	/* bypass the cache until xact end */
static bool xact_changed_all = false;	/* too many to name: empty every cache */
static HTAB *xact_changed = NULL;	/* ids of existing keys changed */
static HTAB *xact_new = NULL;	/* ids of keys inserted */
static int64 *commit_ids = NULL;	/* what COMMIT appends to the ring */
static int	commit_nids = 0;
static bool callback_registered = false;

/* Shared memory the ring needs (0 bytes outside shared_preload_libraries). */
Size
apikey_inval_shmem_size(void)
{
	return MAXALIGN(sizeof(InvalRing));
}

/* Create or attach to the ring; caller holds AddinShmemInitLock. */
void
apikey_inval_shmem_startup(LWLock *lock)
{
	bool		found;

	ring = ShmemInitStruct("apikey invalidation ring", sizeof(InvalRing), &found);
	if (!found)
	{
		ring->lock = lock;
		ring->head = 0;
	}
}

/* Forget the transaction's changes (its memory goes with the transaction). */
static void
xact_reset(void)
{
	xact_wrote_keys = false;
	xact_changed_all = false;
	xact_changed = NULL;
	xact_new = NULL;
	commit_ids = NULL;
	commit_nids = 0;
}

/* A set of key ids in TopTransactionContext. */
static HTAB *
id_set_create(const char *name)
{
	HASHCTL		ctl;

	ctl.keysize = sizeof(int64);
	ctl.entrysize = sizeof(int64);
	ctl.hcxt = TopTransactionContext;
	return hash_create(name, 64, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
}

/* Remember that key_id changed (unless it was issued by this transaction). */
static void
note_changed(int64 key_id, bool insert)
{
	if (insert && xact_new != NULL &&
		hash_search(xact_new, &key_id, HASH_FIND, NULL) != NULL)
		return;
	if (xact_changed_all)
		return;
	if (xact_changed == NULL)
		xact_changed = id_set_create("apikey changed keys");
	(void) hash_search(xact_changed, &key_id, HASH_ENTER, NULL);
	if (hash_get_num_entries(xact_changed) > APIKEY_INVAL_MAX_KEYS)
	{
		xact_changed_all = true;
		hash_destroy(xact_changed);
		xact_changed = NULL;
	}
}

/* Remember that key_id was issued by this transaction. */
static void
note_new(int64 key_id)
{
	if (xact_new == NULL)
		xact_new = id_set_create("apikey new keys");
	if (hash_get_num_entries(xact_new) < APIKEY_INVAL_MAX_NEW)
		(void) hash_search(xact_new, &key_id, HASH_ENTER, NULL);
}

/*
 * PRE_COMMIT: queue the invalidation that will carry this transaction's
 * changes, and set aside the key ids that COMMIT appends to the ring
 * (COMMIT must not allocate or fail).
 */
static void
announce(bool prepare)
{
	Oid			signal;
	HASH_SEQ_STATUS scan;
	int64	   *id;

	if (xact_changed == NULL && !xact_changed_all)
		return;
	if (!OidIsValid(apikey_keystore_keys_relid(true)))
		return;					/* the extension is being dropped */
	if (xact_changed_all || prepare || ring == NULL ||
		!OidIsValid(signal = apikey_keystore_signal_relid()))
	{
		apikey_keystore_invalidate_all();
		return;
	}
	CacheInvalidateRelcacheByRelid(signal);
	commit_ids = MemoryContextAlloc(TopTransactionContext,
									sizeof(int64) * hash_get_num_entries(xact_changed));
	commit_nids = 0;
	hash_seq_init(&scan, xact_changed);
	while ((id = hash_seq_search(&scan)) != NULL)
		commit_ids[commit_nids++] = *id;
}

/*
 * COMMIT: the transaction is visible as committed and its invalidations
 * are not sent yet.  Append its keys to the ring.  No allocation, no error.
 */
static void
publish(void)
{
	int			i;

	if (commit_nids == 0 || ring == NULL)
		return;
	LWLockAcquire(ring->lock, LW_EXCLUSIVE);
	for (i = 0; i < commit_nids; i++)
	{
		InvalSlot  *slot = &ring->slots[ring->head % APIKEY_INVAL_RING_SIZE];

		slot->dbid = MyDatabaseId;
		slot->key_id = commit_ids[i];
		ring->head++;
	}
	LWLockRelease(ring->lock);
}

static void
inval_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
			announce(false);
			break;
		case XACT_EVENT_PRE_PREPARE:
			announce(true);
			break;
		case XACT_EVENT_COMMIT:
			publish();
			xact_reset();
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
			xact_reset();
			break;
		default:
			break;
	}
}

/* The value of the int8 column attname of tup, or false if it is NULL. */
static bool
tuple_key_id(HeapTuple tup, TupleDesc desc, AttrNumber attnum, int64 *key_id)
{
	bool		isnull;
	Datum		d = heap_getattr(tup, attnum, desc, &isnull);

	if (!isnull)
		*key_id = DatumGetInt64(d);
	return !isnull;
}

/* The key id column of a table apikey._key_changed() fires on. */
static AttrNumber
key_id_attnum(Relation rel, bool *is_keys)
{
	TupleDesc	desc = RelationGetDescr(rel);
	const char *name;
	int			i;

	*is_keys = RelationGetRelid(rel) == apikey_keystore_keys_relid(false);
	name = *is_keys ? "id" : "key_id";
	for (i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (!att->attisdropped && strcmp(NameStr(att->attname), name) == 0 &&
			att->atttypid == INT8OID)
			return att->attnum;
	}
	ereport(ERROR,
			(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
			 errmsg("apikey._key_changed() fired on table \"%s\", which has no bigint column \"%s\"",
					RelationGetRelationName(rel), name),
			 errhint("Use it only in the triggers that apikey creates on its own tables.")));
	return InvalidAttrNumber;	/* keep the compiler quiet */
}

/*
 * The row trigger apikey._key_changed() (AFTER, FOR EACH ROW, on keys and
 * the tables keyed by key_id that verify() reads): records which keys the
 * transaction changed; sends nothing until the transaction commits.
 */
void
apikey_inval_key_changed(TriggerData *td)
{
	TupleDesc	desc;
	AttrNumber	attnum;
	bool		is_keys;
	int64		key_id;

	if (!callback_registered)
	{
		RegisterXactCallback(inval_xact_callback, NULL);
		callback_registered = true;
	}
	xact_wrote_keys = true;

	desc = RelationGetDescr(td->tg_relation);
	attnum = key_id_attnum(td->tg_relation, &is_keys);
	if (TRIGGER_FIRED_BY_INSERT(td->tg_event))
	{
		if (tuple_key_id(td->tg_trigtuple, desc, attnum, &key_id))
		{
			if (is_keys)
				note_new(key_id);
			else
				note_changed(key_id, true);
		}
	}
	else
	{
		/* UPDATE and DELETE: the old row's key; UPDATE: the new row's too */
		if (tuple_key_id(td->tg_trigtuple, desc, attnum, &key_id))
			note_changed(key_id, false);
		if (TRIGGER_FIRED_BY_UPDATE(td->tg_event) &&
			tuple_key_id(td->tg_newtuple, desc, attnum, &key_id))
			note_changed(key_id, false);
	}
}

/*
 * Has this transaction written to the key tables?  Then its backend reads
 * keys from the tables, not the cache, until it ends.
 */
bool
apikey_inval_bypass(void)
{
	return xact_wrote_keys;
}

/*
 * Called before each use of the cache.  Returns true once, when the
 * backend first finds itself out of recovery (at its first lookup on a
 * primary, or after promotion): the messages it has taken so far may have
 * been replayed, so the caller empties the cache and from then on trusts
 * the ring.
 */
bool
apikey_inval_leaving_recovery(void)
{
	if (primary_confirmed || RecoveryInProgress())
		return false;
	/* recovery is over: every replayed message is queued; take them */
	AcceptInvalidationMessages();
	primary_confirmed = true;
	return true;
}

/* The cache was emptied: every ring entry so far is processed. */
void
apikey_inval_forget(void)
{
	if (ring == NULL)
		return;
	LWLockAcquire(ring->lock, LW_SHARED);
	ring_seen = ring->head;
	LWLockRelease(ring->lock);
}

/*
 * Evict the keys of every ring entry of this database not yet processed,
 * by calling evict once with their ids.  Returns false if the cache must
 * be emptied instead: no ring, a standby, or entries lost to the ring
 * wrapping before this backend read them.
 */
bool
apikey_inval_catch_up(void (*evict) (int64 *ids, int nids))
{
	uint64		head;
	uint64		n;
	int			nids = 0;

	if (ring == NULL || !primary_confirmed)
		return false;
	if (catch_up_ids == NULL)
		catch_up_ids = MemoryContextAlloc(TopMemoryContext,
										  sizeof(int64) * APIKEY_INVAL_RING_SIZE);

	LWLockAcquire(ring->lock, LW_SHARED);
	head = ring->head;
	if (head - ring_seen > APIKEY_INVAL_RING_SIZE)
	{
		LWLockRelease(ring->lock);
		ring_seen = head;
		return false;
	}
	for (n = ring_seen; n < head; n++)
	{
		InvalSlot  *slot = &ring->slots[n % APIKEY_INVAL_RING_SIZE];

		if (slot->dbid == MyDatabaseId)
			catch_up_ids[nids++] = slot->key_id;
	}
	LWLockRelease(ring->lock);
	ring_seen = head;

	if (nids > 0)
		evict(catch_up_ids, nids);
	return true;
}
