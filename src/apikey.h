/*-------------------------------------------------------------------------
 *
 * apikey.h
 *	  Declarations shared by the apikey modules.
 *
 * Module map (one file per concern).  A module uses only modules listed
 * below it, so dependencies point one way (scripts/check-deps checks it):
 *
 *	 apikey.c		front door: module magic, _PG_init (a table of contents),
 *					every SQL-callable function
 *	 shmem.c		shared memory set-up only: sizes, locks, start-up calls
 *	 worker.c		the usage launcher and the per-database flushers that
 *					persist usage counters and run the periodic work below;
 *					apikey.usage_flush_interval, apikey.databases
 *	 detector.c		the worker's periodic detection pass;
 *					apikey.detect_interval
 *	 events.c		events you can LISTEN to: the worker's periodic pass, the
 *					C entry to apikey._event(); apikey.events_interval,
 *					apikey.event_retention, apikey.unused_revoke_after
 *	 retention.c	how long usage history is kept, and running
 *					run_retention() from the worker; apikey.usage_retention,
 *					apikey.hourly_retention, apikey.daily_retention,
 *					apikey.address_retention, apikey.retention_interval
 *	 issue.c		issuing keys (issue, issue_many) and the argument checks
 *					they share with set_limits
 *	 binding.c		the key bound to the transaction, for row-level policies;
 *					apikey.allow_session_binding
 *	 verify.c		the verification rules that produce a verdict
 *	 canary.c		canary keys: found on the unknown path, their uses
 *					recorded in shared memory for the detector
 *	 netwatch.c		failures per client network and minute, for the
 *					detector's address_failures rule
 *	 legacy.c		imported keys: verification by their old hash (token
 *					formats in apikey.legacy_formats, read at verification
 *					and at statement analysis, their shapes handed to
 *					redact.c), upgrade on use; apikey.legacy_verify_per_second
 *	 legacyupgrade.c	a legacy key's upgrade to SHA-256: recorded by the
 *					verifier without a lock, applied by the flush
 *	 failurelimit.c	per-network failure limiter in shared memory, before the
 *					hash lookup; apikey.failure_limit, apikey.failure_window,
 *					apikey.failure_exempt, apikey.failure_max_networks
 *	 networks.c		the networks each key succeeds from, for key_networks: a
 *					bounded set in shared memory flushed by the writer;
 *					apikey.network_prefix_v4, _v6, _retention, _max_entries
 *	 usage.c		usage counters: shared memory, or pending rows; usage_log
 *					writes; apikey.usage_max_entries
 *	 ownerlimits.c	limits shared by all keys of an owner (apikey.owners):
 *					its bucket in ratelimit.c's table, its credits, max_keys
 *	 quota.c		per-key quotas debited in the caller's transaction
 *	 ownersql.c		internal SQL run as the tables' owner (usage, quota)
 *	 keycache.c		per-backend LRU cache of keys; hands out copies only;
 *					apikey.cache_size
 *	 invalidation.c	targeted invalidation: which keys a committed change
 *					touched, in a ring in shared memory
 *	 keystore.c		finding apikey's tables through the extension, reading a
 *					key through their indexes (no SPI); owns apikey.keys' OID
 *					and the generation counts of its invalidations and of
 *					apikey._cache_signal's
 *	 throttle.c		temporary rate limits (apikey.throttle) in shared memory,
 *					made active at commit
 *	 ratelimit.c	per-key rate limits enforced in shared memory;
 *					apikey.rate_limit_max_keys
 *	 redact.c		hooks that keep tokens out of the log and
 *					pg_stat_statements (apikey's token shapes, and the legacy
 *					formats' in use as legacy.c hands them over);
 *					apikey.redact_logs
 *	 stats.c		live statistics, counted per backend
 *	 flushers.c		which databases have a usage flusher (slots in shared
 *					memory), flush requests to it, its heartbeat
 *	 support.c		planner support for the row-level helpers
 *	 leak.c			finding checksum-valid tokens in free text (leak response)
 *	 audit.c		the audit trail's settings: apikey.actor, apikey.audit_context
 *	 verdict.c		the verdict codes: name, SQLSTATE, message (one table)
 *	 address.c		client addresses and allowlists: IPv4-mapped IPv6 in IPv4 form
 *	 hash.c			SHA-256
 *	 token.c		token format: base62, CRC-32 checksum, parse, build, scan
 *					(no server calls: fuzzed on its own)
 *	 compat.h		every difference between PostgreSQL releases (15 and later)
 *
 *-------------------------------------------------------------------------
 */
#ifndef APIKEY_H
#define APIKEY_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "lib/ilist.h"
#include "access/tupdesc.h"
#include "fmgr.h"
#include "utils/array.h"
#include "utils/inet.h"
#include "utils/jsonb.h"
#include "utils/tuplestore.h"

#define APIKEY_HASH_LEN		32	/* SHA-256 */

/* members of this role may pass the end client's address (client_addr) */
#define APIKEY_PROXY_ROLE	"apikey_proxy"

/* Verdict codes.  Their names, SQLSTATEs and messages: verdict.c. */
typedef enum ApikeyCode
{
	APIKEY_VALID = 0,
	APIKEY_MALFORMED,
	APIKEY_UNKNOWN,
	APIKEY_REVOKED,
	APIKEY_EXPIRED,
	APIKEY_ADDRESS_DENIED,
	APIKEY_SCOPE_DENIED,
	APIKEY_RATE_LIMITED,
	APIKEY_RATE_LIMIT_UNAVAILABLE,
	APIKEY_QUOTA_EXHAUSTED,
	APIKEY_QUOTA_UNAVAILABLE,
	APIKEY_SUSPENDED,
	APIKEY_QUARANTINED,
	APIKEY_ADDRESS_BLOCKED
} ApikeyCode;

#define APIKEY_NUM_CODES	(APIKEY_ADDRESS_BLOCKED + 1)

/*
 * Everything verification needs to know about one key.  Variable-length
 * parts (owner, scopes, CIDRs) live in one palloc'd chunk owned by the
 * record, so a copy is one allocation and an eviction a single pfree.
 *
 * A record handed out by the key cache is always the caller's own copy,
 * never a pointer into the cache: anything that accepts invalidation
 * messages (a lock, SQL, a catalog lookup) may empty the cache.
 */
typedef struct ApikeyKey
{
	uint8		hash[APIKEY_HASH_LEN];	/* SHA-256 of the token */
	int64		key_id;
	char	   *owner;
	int			nscopes;
	char	  **scopes;
	bool		has_expiry;
	TimestampTz expires_at;
	bool		revoked;
	/*
	 * The budget the key's rate limit and quota draw on: its own, or during
	 * a rotation's grace period the new key's (key_lineage.budget_key_id), so
	 * that old and new token together never get more than one key's
	 * allowance.  rate_limit, rate_window and has_quota are the budget key's.
	 */
	int64		budget_id;
	uint8		budget_hash_prefix[8];	/* first bytes of the budget key's hash */
	int32		rate_limit;		/* 0 = none */
	int64		rate_window;	/* microseconds */
	bool		has_quota;
	int			ncidrs;
	inet	  **cidrs;
	/*
	 * Reversible responses (apikey.suspensions, apikey.quarantines).  Their
	 * end is judged at each call (verify.c), never at load, so a cached key
	 * is never judged suspended past its until.  DT_NOEND = until lifted.
	 */
	bool		suspended;
	TimestampTz suspended_until;
	bool		quarantined;
	TimestampTz quarantined_until;
	int			nallowed;		/* quarantine's allowed_scopes */
	char	  **allowed_scopes;
	/*
	 * The owner's pooled limits (apikey.owners, ownerlimits.c), loaded with
	 * the key; a change to the owner's row empties every key cache.  The
	 * owner's allowlist follows the key's in cidrs: cidrs[ncidrs ..
	 * ncidrs + owner_ncidrs - 1].
	 */
	bool		has_owner;		/* the owner has a row in apikey.owners */
	int32		owner_rate_limit;	/* 0 = none */
	int64		owner_rate_window;	/* microseconds */
	bool		owner_has_quota;
	int			owner_ncidrs;
	uint8		owner_hash_prefix[8];	/* names the owner's bucket */
	void	   *chunk;			/* owns owner, scopes (room for nscopes +
								 * nallowed pointers), allowed_scopes and
								 * cidrs (the key's and the owner's) */
	Size		chunk_size;
} ApikeyKey;

/* Whose limit decided a verdict or its remaining (ownerlimits.c). */
typedef enum ApikeyLimitedBy
{
	APIKEY_LIMITED_BY_NONE = 0,
	APIKEY_LIMITED_BY_KEY,
	APIKEY_LIMITED_BY_OWNER
} ApikeyLimitedBy;

/* The result of one verification. */
typedef struct ApikeyVerdict
{
	ApikeyCode	code;
	const ApikeyKey *key;		/* NULL for malformed and unknown, else
								 * &key_copy */
	bool		has_remaining;
	int64		remaining;
	bool		has_retry_after;
	int64		retry_after;	/* microseconds */
	ApikeyLimitedBy limited_by;	/* whose limit decided (verdict.limited_by) */
	ApikeyKey	key_copy;		/* the verdict's own copy of the key (last:
								 * apikey_verify() clears what precedes it) */
} ApikeyVerdict;

struct LWLock;
struct Latch;
struct TriggerData;

/* hash.c */
extern void apikey_sha256(const char *data, size_t len, uint8 *out);
extern bytea *apikey_sha256_bytea(const char *data, size_t len);

/* verdict.c */
extern const char *apikey_verdict_name(ApikeyCode code);
extern void apikey_verdict_report(const ApikeyVerdict *v, const char *scope);
extern Datum apikey_interval_datum(int64 usecs);
extern char *apikey_clip_for_message(const char *s, int len);

/* stats.c */
typedef struct ApikeyStats
{
	uint64		calls[APIKEY_NUM_CODES];	/* every verification, by code */
	uint64		usage_dropped;	/* usage counts lost to a full table */
	uint64		failure_untracked;	/* failure claims on networks the
									 * failure limiter had no room for */
	uint64		flushes;		/* successful flushes */
	uint64		flush_errors;	/* failed flushes (counts kept) */
	uint64		flushed_calls;	/* calls written to usage_log */
	TimestampTz last_flush;		/* last successful flush, 0 = never */
	TimestampTz heartbeat;		/* this database's writer's last round,
								 * 0 = never */
	uint64		tokens_redacted;	/* spans the log redactor hid */
	uint64		network_overflow;	/* successes key_networks had no room
									 * for */
	uint64		failure_unwatched;	/* failures netwatch.c had no room for */
} ApikeyStats;

extern Size apikey_stats_shmem_size(void);
extern void apikey_stats_shmem_startup(void);
extern void apikey_stats_count(ApikeyCode code);
extern void apikey_stats_dropped(uint64 calls);
extern void apikey_stats_failure_untracked(void);
extern void apikey_stats_flushed(uint64 calls, bool ok);
extern void apikey_stats_redacted(uint64 spans);
extern void apikey_stats_network_overflow(uint64 calls);
extern void apikey_stats_failure_unwatched(void);
extern bool apikey_stats_read(ApikeyStats *out);

/* flushers.c */
typedef enum ApikeyFlusherState
{
	FLUSHER_FREE = 0,			/* slot unused */
	FLUSHER_WANTED,				/* the launcher should start a flusher */
	FLUSHER_STARTING,			/* one is registered, not yet attached */
	FLUSHER_RUNNING,			/* usage is counted in shared memory */
	FLUSHER_UNAVAILABLE			/* none can run now: pending rows */
} ApikeyFlusherState;

typedef struct ApikeyFlusherPeek
{
	Oid			dboid;
	ApikeyFlusherState state;
	uint32		generation;
	bool		demanded;
	TimestampTz retry_at;
} ApikeyFlusherPeek;

extern Size apikey_flushers_shmem_size(void);
extern void apikey_flushers_shmem_startup(void);
extern bool apikey_flushers_serving(Oid db);
extern bool apikey_flushers_known(Oid db);
extern TimestampTz apikey_flushers_heartbeat(Oid db);
extern int	apikey_flushers_request_flush(Oid db);
extern void apikey_flushers_set_launcher(struct Latch *latch);
extern void apikey_flushers_want(Oid db);
extern int	apikey_flushers_nslots(void);
extern void apikey_flushers_peek(int i, ApikeyFlusherPeek *out);
extern bool apikey_flushers_move(int i, uint32 generation, ApikeyFlusherState state,
								 TimestampTz retry_at, bool *first_warning);
extern Oid	apikey_flushers_slot_db(int i, uint32 generation);
extern bool apikey_flushers_attach(int i, uint32 generation);
extern void apikey_flushers_detach(int i, uint32 generation, bool release,
								   TimestampTz retry_at);
extern uint64 apikey_flushers_requested(int i);
extern bool apikey_flushers_flush_wanted(int i);
extern void apikey_flushers_served(int i, uint64 requested, bool ok, int rows);

/* support.c */
struct SupportRequestSimplify;
extern Node *apikey_support_simplify(struct SupportRequestSimplify *req);

/* keystore.c */
extern void apikey_keystore_init(void);
extern bool apikey_keystore_load(const uint8 *hash, ApikeyKey *key,
								 MemoryContext chunk_cxt, uint64 *generation);
extern void apikey_keystore_invalidate_all(void);
extern uint64 apikey_keystore_generation(void);
extern uint64 apikey_keystore_signal_generation(void);
extern Oid	apikey_keystore_keys_relid(bool missing_ok);
extern Oid	apikey_keystore_signal_relid(void);
extern Oid	apikey_keystore_owner(void);
extern Oid	apikey_extension_namespace(Oid extoid);
extern Oid	apikey_keystore_function(const char *name, int nargs,
									 const Oid *argtypes);

/* keycache.c */
typedef struct ApikeyCacheStats
{
	int64		entries;
	int64		hits;
	int64		misses;			/* lookups that read the tables */
	int64		evictions;		/* entries pushed out by apikey.cache_size */
	int64		invalidations;	/* times the cache was emptied by a change */
	int			capacity;		/* apikey.cache_size */
} ApikeyCacheStats;

extern void apikey_keycache_init(void);
extern bool apikey_keycache_lookup(const uint8 *hash, ApikeyKey *out);
extern void apikey_keycache_stats(ApikeyCacheStats *stats);

/* invalidation.c */
extern Size apikey_inval_shmem_size(void);
extern void apikey_inval_shmem_startup(struct LWLock *lock);
extern bool apikey_inval_bypass(void);
extern bool apikey_inval_leaving_recovery(void);
extern void apikey_inval_forget(void);
extern bool apikey_inval_catch_up(void (*evict) (int64 *ids, int nids));
extern void apikey_inval_key_changed(struct TriggerData *td);

/* address.c */
extern inet *apikey_address_normal(const inet *addr, MemoryContext cxt);

/* verify.c */
extern void apikey_verify(text *token, text *scope, inet *client_addr,
						  ApikeyVerdict *verdict);
extern bool apikey_scope_granted(char *const *scopes, int nscopes,
								 const char *want, size_t wantlen);
extern bool apikey_key_suspended(const ApikeyKey *key, TimestampTz now,
								 int64 *retry_after);
extern void apikey_key_quarantine_scopes(ApikeyKey *key, TimestampTz now);

/* canary.c */
extern void apikey_canary_init(void);
extern Size apikey_canary_shmem_size(void);
extern void apikey_canary_shmem_startup(struct LWLock *lock);
extern void apikey_canary_check(const uint8 *hash, text *scope, inet *addr,
								TimestampTz now);
extern void apikey_canary_uses(Tuplestorestate *out, TupleDesc desc);
extern bool apikey_canary_pressing(void);

/* netwatch.c */
extern Size apikey_netwatch_shmem_size(void);
extern void apikey_netwatch_shmem_startup(struct LWLock *lock);
extern void apikey_netwatch_count(ApikeyCode code, inet *addr, TimestampTz now);
extern void apikey_netwatch_list(TimestampTz since, Tuplestorestate *out,
								 TupleDesc desc);
/* legacy.c */
typedef struct ApikeyLegacyStats
{
	uint64		verified;		/* legacy hashes that matched */
	uint64		mismatched;		/* a pending key's hash that did not */
	uint64		refused;		/* slow hashes refused by the budget */
	uint64		upgraded;		/* keys upgraded to SHA-256 */
	uint64		deferred;		/* upgrades left for a writable transaction */
} ApikeyLegacyStats;

/* A legacy key whose old hash matched: what its upgrade needs. */
typedef struct ApikeyLegacyMatch
{
	bool		pending;		/* verified by its legacy hash */
	int64		key_id;
	uint8		old_hash[APIKEY_HASH_LEN];	/* keys.hash until upgraded */
	uint8		verifier_sha256[APIKEY_HASH_LEN];	/* of the verifier that matched */
	uint8		new_hash[APIKEY_HASH_LEN];	/* SHA-256 of the token */
} ApikeyLegacyMatch;

extern void apikey_legacy_init(void);
extern Size apikey_legacy_shmem_size(void);
extern void apikey_legacy_shmem_startup(void);
extern bool apikey_legacy_stats_read(ApikeyLegacyStats *out);
extern void apikey_legacy_formats_changed(void);
extern bool apikey_legacy_lookup(text *token, TimestampTz now, bool reporting,
								 ApikeyVerdict *verdict, ApikeyLegacyMatch *match);
extern bool apikey_legacy_key_hash(text *token, uint8 *hash);
extern void apikey_legacy_count_upgrades(uint64 upgraded, uint64 deferred);

/* legacyupgrade.c */
extern void apikey_legacy_upgrade(ApikeyLegacyMatch *match);
extern int	apikey_legacy_upgrades_apply(void);

/* binding.c */
extern void apikey_binding_init(void);
extern void apikey_binding_check_kind(bool session);
extern void apikey_binding_set(const ApikeyKey *key, bool session);
extern void apikey_binding_clear(void);
extern bool apikey_binding_get(int64 *key_id, const char **owner,
							   char *const **scopes, int *nscopes);

/* shmem.c */
extern void apikey_shmem_init(void);

/* failurelimit.c */
typedef struct ApikeyNetwork
{
	Oid			dboid;
	uint8		family;			/* PGSQL_AF_INET or PGSQL_AF_INET6 */
	uint8		prefix[8];		/* the /32 or /64; the rest zero */
} ApikeyNetwork;

typedef struct ApikeyFailureClaim
{
	bool		held;			/* one unit of net's budget was taken */
	ApikeyNetwork net;
	double		emission;		/* the unit, microseconds */
} ApikeyFailureClaim;

extern void apikey_failurelimit_init(void);
extern Size apikey_failurelimit_shmem_size(void);
extern void apikey_failurelimit_shmem_startup(struct LWLock *lock);
extern bool apikey_failurelimit_claim(inet *addr, TimestampTz now,
									  int64 *retry_after,
									  ApikeyFailureClaim *claim);
extern void apikey_failurelimit_settle(const ApikeyFailureClaim *claim,
									   ApikeyCode code);

/* networks.c */
extern void apikey_networks_init(void);
extern Size apikey_networks_shmem_size(void);
extern void apikey_networks_shmem_startup(struct LWLock *lock);
extern void apikey_networks_count(int64 key_id, const inet *addr, TimestampTz now);
extern int	apikey_networks_flush(void);
extern inet *apikey_network_of(const inet *addr);

/* throttle.c */
extern Size apikey_throttle_shmem_size(void);
extern void apikey_throttle_shmem_startup(struct LWLock *lock);
extern void apikey_throttle_set(int64 key_id, const uint8 *hash, int32 rate_limit,
								TimestampTz until);
extern ApikeyCode apikey_throttle_take(const ApikeyKey *key, TimestampTz now,
									   int64 *retry_after);

/* ratelimit.c */

/*
 * One GCRA step (see ratelimit.c) on a bucket whose theoretical arrival
 * time is *tat: emission interval T, burst tolerance tau, request at t.
 * True, with *tat advanced, when the request conforms.  *seen is the TAT
 * the decision was made on (for retry_after = seen - t - tau).  The caller
 * holds what protects *tat: this is plain arithmetic, safe under a spinlock.
 */
static inline bool
apikey_gcra_take(double *tat, double t, double T, double tau, double *seen)
{
	double		x = Max(*tat, t);

	*seen = x;
	if (x - t > tau)
		return false;
	*tat = x + T;
	return true;
}

extern void apikey_ratelimit_init(void);
extern Size apikey_ratelimit_shmem_size(void);
extern void apikey_ratelimit_shmem_startup(struct LWLock *lock);
extern void apikey_ratelimit_copy(int64 from_id, const uint8 *from_hash,
								  int64 to_id, const uint8 *to_hash);
extern ApikeyCode apikey_ratelimit_take(const ApikeyKey *key, TimestampTz now,
										int64 *retry_after, int64 *remaining);
extern void apikey_ratelimit_list(Tuplestorestate *tupstore, TupleDesc tupdesc);
extern ApikeyCode apikey_ratelimit_take_bucket(int64 id, const uint8 *hash_prefix,
											   int32 rate_limit, int64 rate_window,
											   TimestampTz now, int64 *retry_after,
											   int64 *remaining);
extern void apikey_ratelimit_refund_bucket(int64 id, const uint8 *hash_prefix,
										   int32 rate_limit, int64 rate_window);

/* ownerlimits.c */
extern ApikeyCode apikey_owner_rate_take(const ApikeyKey *key, TimestampTz now,
										 ApikeyVerdict *verdict);
extern ApikeyCode apikey_owner_quota_debit(const ApikeyKey *key,
										   ApikeyVerdict *verdict);
extern void apikey_owner_quota_refund(const ApikeyKey *key);
extern void apikey_owner_remaining(ApikeyVerdict *verdict, int64 key_remaining,
								   int64 owner_remaining);
extern const char *apikey_limited_by_name(ApikeyLimitedBy by);
extern void apikey_owner_admit(Datum *owners, int n, int64 replacing);

/* quota.c */
extern ApikeyCode apikey_quota_debit(const ApikeyKey *key, int64 *remaining,
									 int64 *retry_after);

/* usage.c */
extern void apikey_usage_init(void);
extern Size apikey_usage_shmem_size(void);
extern void apikey_usage_shmem_startup(struct LWLock *lock,
									   struct LWLock *gather_lock);
extern void apikey_usage_count(const ApikeyVerdict *verdict, inet *client_addr,
							   TimestampTz now);
extern bool apikey_usage_in_shmem(void);
extern int	apikey_usage_flush_shared(void);
extern int	apikey_usage_fold_pending(void);
extern uint64 apikey_usage_pending(void);
extern void apikey_usage_list(Tuplestorestate *tupstore, TupleDesc tupdesc);

/* ownersql.c */
extern void apikey_run_as_owner(void (*fn) (void *), void *arg);
extern struct _SPI_plan *apikey_prepare_kept(struct _SPI_plan **plan, const char *sql,
											 int nargs, Oid *argtypes);

/* detector.c */
extern void apikey_detector_init(void);
extern bool apikey_detector_due(void);

/* worker.c */
extern void apikey_worker_init(void);
extern void apikey_worker_register(void);

/* events.c */
extern void apikey_events_init(void);
extern Interval *apikey_event_retention(void);
extern Interval *apikey_unused_revoke_after(void);
extern int64 apikey_event_emit(const char *kind, const int64 *key_id, const char *owner,
							   const char *severity, Jsonb *payload);
extern bool apikey_events_due(void);
/* retention.c */
extern void apikey_retention_init(void);
extern void apikey_retention_settings(int64 *secs);
extern bool apikey_retention_due(void);
extern void apikey_retention_ran(bool ok, bool more);

/* audit.c */
extern void apikey_audit_init(void);
extern void apikey_audit_mark_usage_write(void);
extern void apikey_audit_mark_legacy_upgrade(void);
#define APIKEY_AUDIT_FIELDS 14
extern bytea *apikey_audit_row_hash(const NullableDatum *fields);
extern const char *apikey_audit_context_name(void);

/* leak.c */
extern void apikey_leak_scan(const char *s, size_t len, Tuplestorestate *out,
							 TupleDesc desc);

/* issue.c */
extern void apikey_issue_one(FunctionCallInfo fcinfo);
extern void apikey_issue_batch(FunctionCallInfo fcinfo);
extern ArrayType *apikey_scopes_checked(ArrayType *scopes);
extern void apikey_limits_check(const int32 *rate_limit, Interval *rate_window,
								const int64 *quota, Interval *quota_refill);
extern void apikey_cidrs_check(ArrayType *cidrs);

/* redact.c */
extern void apikey_redact_init(void);
extern void apikey_redact_require_early_load(void);
extern void apikey_redact_set_legacy_shapes(char **names, char **token_regexes, int n);

#endif							/* APIKEY_H */
