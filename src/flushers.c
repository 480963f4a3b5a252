/*-------------------------------------------------------------------------
 *
 * flushers.c
 *	  Which databases have a usage flusher: a small table of slots in shared
 *	  memory, one per database, that backends, the launcher and the
 *	  flushers (worker.c) share.
 *
 * A slot's life:
 *	 FREE -> WANTED       a backend counting usage in a database without a
 *	                      slot (or the launcher's start-up scan) claims one
 *	                      and sets the launcher's latch;
 *	 WANTED -> STARTING   the launcher registered a flusher for it;
 *	 STARTING -> RUNNING  the flusher connected, found the extension and
 *	                      attached (its pid and latch are set);
 *	 -> UNAVAILABLE       no flusher can run there (no free worker slot, a
 *	                      template database, not in apikey.databases): the
 *	                      launcher tries again later;
 *	 RUNNING -> WANTED    the flusher stopped (pg_terminate_backend): the
 *	                      launcher starts another one;
 *	 -> FREE              the extension or the database is gone.
 * Backends count usage in shared memory only while their database's slot
 * is RUNNING; in every other state they write pending rows (usage.c), which
 * the flusher folds once it runs, so counts stay exact either way.
 *
 * Locking: one spinlock (mutex) protects every slot's fields; a slot's
 * database and state are also kept together in one atomic word, written
 * under the mutex and read without it, so the per-call question "is my
 * database served?" touches no lock and no cache line that anyone writes
 * per call.  Waiters for a flush sleep on the slot's condition variable,
 * which its flusher broadcasts after each flush and when it exits.  The
 * heartbeat is an atomic written by the flusher alone.
 *
 * A slot is claimed with a new generation; a flusher is told its slot and
 * generation, and attaches only if both still match, so a flusher started
 * for a slot that has since been freed and reused exits without harm.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "port/atomics.h"
#include "storage/condition_variable.h"
#include "storage/latch.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "apikey.h"

typedef struct FlusherSlot
{
	pg_atomic_uint64 word;		/* (dboid << 32) | state, for lock-free reads */
	pg_atomic_uint64 heartbeat; /* TimestampTz of its flusher's last round */
	/* the rest under FlushersShared.mutex */
	Oid			dboid;
	ApikeyFlusherState state;
	uint32		generation;		/* bumped at each claim */
	bool		demanded;		/* a backend counted here (not only a scan) */
	bool		warned;			/* "no worker slot" logged for this claim */
	TimestampTz retry_at;		/* the launcher waits until then */
	pid_t		pid;			/* the flusher, 0 = none */
	Latch	   *latch;
	uint64		flush_requested;	/* flush_usage() requests so far */
	uint64		flush_served;	/* requests the last finished flush covered */
	bool		flush_ok;		/* did that flush succeed? */
	int			flush_rows;		/* usage_log rows it wrote */
	ConditionVariable cv;
} FlusherSlot;

typedef struct FlushersShared
{
	slock_t		mutex;
	Latch	   *launcher_latch; /* NULL while no launcher runs */
	int			nslots;
	FlusherSlot slots[FLEXIBLE_ARRAY_MEMBER];
} FlushersShared;

#define SLOT_WORD(db, state)	(((uint64) (db) << 32) | (uint64) (state))

static FlushersShared *flushers = NULL;
static int	my_slot = -1;		/* this backend's database's slot, a hint */

/* One slot per possible background worker: more could never all run. */
static int
num_slots(void)
{
	return Max(max_worker_processes, 1);
}

Size
apikey_flushers_shmem_size(void)
{
	return add_size(offsetof(FlushersShared, slots),
					mul_size(num_slots(), sizeof(FlusherSlot)));
}

/* Called from shmem_startup with AddinShmemInitLock held. */
void
apikey_flushers_shmem_startup(void)
{
	bool		found;
	int			i;

	flushers = ShmemInitStruct("apikey usage flushers",
							   apikey_flushers_shmem_size(), &found);
	if (found)
		return;
	SpinLockInit(&flushers->mutex);
	flushers->launcher_latch = NULL;
	flushers->nslots = num_slots();
	for (i = 0; i < flushers->nslots; i++)
	{
		FlusherSlot *s = &flushers->slots[i];

		memset(s, 0, sizeof(*s));
		pg_atomic_init_u64(&s->word, SLOT_WORD(InvalidOid, FLUSHER_FREE));
		pg_atomic_init_u64(&s->heartbeat, 0);
		s->flush_ok = true;
		ConditionVariableInit(&s->cv);
	}
}

/* Set a slot's state; mutex held. */
static void
set_state(FlusherSlot *s, ApikeyFlusherState state)
{
	s->state = state;
	pg_atomic_write_u64(&s->word, SLOT_WORD(s->dboid, state));
}

/* The slot of db, or -1; mutex held. */
static int
find_slot(Oid db)
{
	int			i;

	for (i = 0; i < flushers->nslots; i++)
		if (flushers->slots[i].state != FLUSHER_FREE &&
			flushers->slots[i].dboid == db)
			return i;
	return -1;
}

/* Claim a free slot for db as WANTED, or -1 when none is free; mutex held. */
static int
claim_slot(Oid db, bool demanded)
{
	int			i;

	for (i = 0; i < flushers->nslots; i++)
	{
		FlusherSlot *s = &flushers->slots[i];

		if (s->state != FLUSHER_FREE)
			continue;
		s->dboid = db;
		s->generation++;
		s->demanded = demanded;
		s->warned = false;
		s->retry_at = 0;
		s->pid = 0;
		s->latch = NULL;
		s->flush_ok = true;
		s->flush_rows = 0;
		s->flush_served = s->flush_requested;
		pg_atomic_write_u64(&s->heartbeat, 0);
		set_state(s, FLUSHER_WANTED);
		return i;
	}
	return -1;
}

/*
 * Does a flusher run for db, so that usage is counted in shared memory?
 * The common answer, yes, costs one atomic read.  Otherwise a slot is
 * claimed for db (if it has none) and the launcher woken: until its
 * flusher runs, the caller writes pending rows.
 */
bool
apikey_flushers_serving(Oid db)
{
	Latch	   *wake = NULL;
	bool		running;
	int			i;

	if (flushers == NULL)
		return false;
	if (my_slot >= 0 &&
		pg_atomic_read_u64(&flushers->slots[my_slot].word) ==
		SLOT_WORD(db, FLUSHER_RUNNING))
		return true;

	SpinLockAcquire(&flushers->mutex);
	i = find_slot(db);
	if (i < 0)
	{
		i = claim_slot(db, true);
		wake = flushers->launcher_latch;
	}
	else if (!flushers->slots[i].demanded)
		flushers->slots[i].demanded = true;
	running = i >= 0 && flushers->slots[i].state == FLUSHER_RUNNING;
	SpinLockRelease(&flushers->mutex);
	if (i >= 0)
		my_slot = i;
	if (wake != NULL)
		SetLatch(wake);
	return running;
}

/*
 * Might a flusher write db's shared counters, now or soon?  False when db
 * has no slot: its counts were left by a flusher that has gone for good
 * (usage.c may evict them to make room).  Reads without the lock.
 */
bool
apikey_flushers_known(Oid db)
{
	int			i;

	if (flushers == NULL)
		return false;
	for (i = 0; i < flushers->nslots; i++)
	{
		uint64		w = pg_atomic_read_u64(&flushers->slots[i].word);

		if ((w & 0xFFFFFFFF) != FLUSHER_FREE && (Oid) (w >> 32) == db)
			return true;
	}
	return false;
}

/* The last round of db's flusher, 0 = none (never, or no flusher). */
TimestampTz
apikey_flushers_heartbeat(Oid db)
{
	TimestampTz beat = 0;
	int			i;

	if (flushers == NULL)
		return 0;
	SpinLockAcquire(&flushers->mutex);
	i = find_slot(db);
	if (i >= 0)
		beat = (TimestampTz) pg_atomic_read_u64(&flushers->slots[i].heartbeat);
	SpinLockRelease(&flushers->mutex);
	return beat;
}

/*
 * flush_usage() where a flusher runs: have it flush, and wait for it.
 * Returns the usage rows that flush wrote.
 */
int
apikey_flushers_request_flush(Oid db)
{
	FlusherSlot *s = NULL;
	uint64		mine = 0;
	Latch	   *latch = NULL;
	bool		served = false;
	bool		gone = true;
	bool		ok = true;
	int			rows = 0;
	int			i;

	SpinLockAcquire(&flushers->mutex);
	i = find_slot(db);
	if (i >= 0 && flushers->slots[i].state == FLUSHER_RUNNING)
	{
		s = &flushers->slots[i];
		mine = ++s->flush_requested;
		latch = s->latch;
		gone = false;
	}
	SpinLockRelease(&flushers->mutex);
	if (gone)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the apikey usage writer is not running"),
				 errdetail("The usage of this database is flushed by its usage writer."),
				 errhint("It is restarted within seconds; if not, look for its errors in the server log (and check max_worker_processes).")));
	SetLatch(latch);

	ConditionVariablePrepareToSleep(&s->cv);
	for (;;)
	{
		SpinLockAcquire(&flushers->mutex);
		served = s->flush_served >= mine;
		gone = s->state != FLUSHER_RUNNING || s->dboid != db;
		ok = s->flush_ok;
		rows = s->flush_rows;
		SpinLockRelease(&flushers->mutex);
		if (served || gone)
			break;
		(void) ConditionVariableTimedSleep(&s->cv, 1000, PG_WAIT_EXTENSION);
	}
	ConditionVariableCancelSleep();

	if (!served)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the apikey usage writer stopped before flushing"),
				 errhint("The counts are kept; call apikey.flush_usage() again once the writer is back.")));
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the apikey usage writer could not flush"),
				 errhint("The counts are kept for the next flush; the writer's error is in the server log.")));
	return rows;
}

/* ---- the launcher's side ---- */

/* The launcher is (latch) or is no longer (NULL) running. */
void
apikey_flushers_set_launcher(Latch *latch)
{
	SpinLockAcquire(&flushers->mutex);
	flushers->launcher_latch = latch;
	SpinLockRelease(&flushers->mutex);
}

/* Claim a slot for db found by the launcher's scan, unless it has one. */
void
apikey_flushers_want(Oid db)
{
	SpinLockAcquire(&flushers->mutex);
	if (find_slot(db) < 0)
		(void) claim_slot(db, false);
	SpinLockRelease(&flushers->mutex);
}

int
apikey_flushers_nslots(void)
{
	return flushers->nslots;
}

/* Read slot i for the launcher. */
void
apikey_flushers_peek(int i, ApikeyFlusherPeek *out)
{
	FlusherSlot *s = &flushers->slots[i];

	SpinLockAcquire(&flushers->mutex);
	out->dboid = s->dboid;
	out->state = s->state;
	out->generation = s->generation;
	out->demanded = s->demanded;
	out->retry_at = s->retry_at;
	SpinLockRelease(&flushers->mutex);
}

/*
 * Move slot i, still of this generation, to state (retrying no earlier
 * than retry_at).  Returns false if the slot changed meanwhile.  For
 * UNAVAILABLE, *first_warning says whether nobody warned yet this claim.
 */
bool
apikey_flushers_move(int i, uint32 generation, ApikeyFlusherState state,
					 TimestampTz retry_at, bool *first_warning)
{
	FlusherSlot *s = &flushers->slots[i];
	bool		same;

	SpinLockAcquire(&flushers->mutex);
	same = s->generation == generation && s->state != FLUSHER_FREE;
	if (same)
	{
		s->retry_at = retry_at;
		if (first_warning != NULL)
		{
			*first_warning = s->demanded && !s->warned;
			if (*first_warning)
				s->warned = true;
		}
		if (state == FLUSHER_FREE)
			s->dboid = InvalidOid;
		set_state(s, state);
	}
	SpinLockRelease(&flushers->mutex);
	if (same)
		ConditionVariableBroadcast(&s->cv);
	return same;
}

/* ---- a flusher's side ---- */

/* The database slot i (of this generation) wants a flusher for, or invalid. */
Oid
apikey_flushers_slot_db(int i, uint32 generation)
{
	Oid			db = InvalidOid;

	if (i < 0 || i >= flushers->nslots)
		return InvalidOid;
	SpinLockAcquire(&flushers->mutex);
	if (flushers->slots[i].generation == generation &&
		flushers->slots[i].state == FLUSHER_STARTING)
		db = flushers->slots[i].dboid;
	SpinLockRelease(&flushers->mutex);
	return db;
}

/* Become slot i's flusher; false if the slot went to someone else. */
bool
apikey_flushers_attach(int i, uint32 generation)
{
	FlusherSlot *s = &flushers->slots[i];
	bool		ok;

	SpinLockAcquire(&flushers->mutex);
	ok = s->generation == generation && s->state == FLUSHER_STARTING &&
		s->dboid == MyDatabaseId;
	if (ok)
	{
		s->pid = MyProcPid;
		s->latch = MyLatch;
		set_state(s, FLUSHER_RUNNING);
	}
	SpinLockRelease(&flushers->mutex);
	return ok;
}

/*
 * Slot i's flusher is leaving: the slot is freed (release: the extension
 * is gone) or wanted again (the launcher starts another flusher after
 * retry_at).  Whoever waits for a flush is woken, and the launcher too.
 */
void
apikey_flushers_detach(int i, uint32 generation, bool release,
					   TimestampTz retry_at)
{
	FlusherSlot *s = &flushers->slots[i];
	Latch	   *wake = NULL;

	SpinLockAcquire(&flushers->mutex);
	if (s->generation == generation && s->pid == MyProcPid)
	{
		s->pid = 0;
		s->latch = NULL;
		s->retry_at = retry_at;
		if (release)
			s->dboid = InvalidOid;
		set_state(s, release ? FLUSHER_FREE : FLUSHER_WANTED);
		wake = flushers->launcher_latch;
	}
	SpinLockRelease(&flushers->mutex);
	ConditionVariableBroadcast(&s->cv);
	if (wake != NULL)
		SetLatch(wake);
}

/* The flush requests made so far to slot i. */
uint64
apikey_flushers_requested(int i)
{
	uint64		requested;

	SpinLockAcquire(&flushers->mutex);
	requested = flushers->slots[i].flush_requested;
	SpinLockRelease(&flushers->mutex);
	return requested;
}

/* Has flush_usage() asked slot i for a flush not yet served? */
bool
apikey_flushers_flush_wanted(int i)
{
	bool		wanted;

	SpinLockAcquire(&flushers->mutex);
	wanted = flushers->slots[i].flush_requested > flushers->slots[i].flush_served;
	SpinLockRelease(&flushers->mutex);
	return wanted;
}

/*
 * A flush of slot i ended (it covered the requests up to requested): tell
 * whoever waits, and beat the heartbeat.
 */
void
apikey_flushers_served(int i, uint64 requested, bool ok, int rows)
{
	FlusherSlot *s = &flushers->slots[i];

	pg_atomic_write_u64(&s->heartbeat, (uint64) GetCurrentTimestamp());
	SpinLockAcquire(&flushers->mutex);
	if (requested > s->flush_served)
		s->flush_served = requested;
	s->flush_ok = ok;
	s->flush_rows = rows;
	SpinLockRelease(&flushers->mutex);
	ConditionVariableBroadcast(&s->cv);
}
