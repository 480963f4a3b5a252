/*-------------------------------------------------------------------------
 *
 * legacy.c
 *	  Tokens from before apikey: imported keys verified by their old hash,
 *	  and upgraded to apikey's SHA-256 on their first successful use.
 *
 * A token that is not in apikey's format (token.c) reaches this file from
 * verify.c.  The order, and why:
 *
 *	 1. with no format in use it stays malformed (nothing is read);
 *	 2. SHA-256 of the whole token in the key cache: a key imported as
 *		SHA-256 or plaintext, or already upgraded, is found here at the
 *		speed of a native key (no regex runs: only the token itself hashes
 *		to its key's hash);
 *	 2b. else the token must match the token_regex of a format in use, or
 *		it stays malformed;
 *	 3. for each matching format still accepted (accept_until unset or
 *		later), the lookup id (the first capture of lookup_regex; for an
 *		unsalted SHA-512 without one, the digest itself) finds at most one
 *		pending verifier in apikey.legacy_keys;
 *	 4. only then, for the slow algorithms (PBKDF2, bcrypt), one unit of
 *		the global budget apikey.legacy_verify_per_second is taken (a GCRA
 *		bucket in shared memory; per backend without it).  A refusal is the
 *		verdict rate_limited with a retry_after, never a silent valid;
 *	 5. the old algorithm, through PostgreSQL's own code (SHA-512, HMAC for
 *		PBKDF2-HMAC-SHA256) or pgcrypto's crypt() for bcrypt, found by OID
 *		through the pgcrypto extension, never by name alone; the result is
 *		compared in constant time.
 *
 * The failure limiter (failurelimit.c) has already run by then, so a
 * client network spending its failures never reaches step 4.  The lookup
 * id is not secret: someone who knows one can spend the global budget, not
 * learn anything.
 *
 * Upgrade on use: when the verdict is valid, legacyupgrade.c records the
 * upgrade without a lock and the next flush applies it; the key verifies
 * by its old hash until then.  The upgrades applied and deferred are
 * counted here (apikey_legacy_count_upgrades).
 *
 * Locking: the budget and the counters are one struct in shared memory,
 * protected by its spinlock (plain arithmetic under it).
 *
 * A format takes part only once it has keys: until then (a fresh install,
 * the shipped presets) a token outside apikey's format stays malformed and
 * nothing is read.  The list of formats in use is cached per backend and
 * read again after any relcache invalidation of apikey.legacy_formats (or
 * of everything); statement triggers on legacy_formats and on the inserts
 * and deletes of legacy_keys send one (apikey_legacy_formats_changed).  The
 * load locks the table, then reads a fresh snapshot, and the cache is
 * marked valid before the read, so an invalidation arriving during it
 * forces the next call to read again.
 *
 * The log redactor needs the list too (a legacy token has no checksum:
 * only its format's shape finds it), and cannot read it itself: its hook
 * may run while an error is reported or in an aborted transaction.  So
 * each load hands the formats' token_regex to redact.c, which compiles
 * them there and then; and the list is read not only at verification but
 * also when any statement has been analysed (post_parse_analyze_hook), so
 * a session that never verifies a legacy token knows the shapes before
 * its statements fail or are logged.  That read is careful, as it runs
 * under every application's statements: only in a client backend, in a
 * valid transaction that has its snapshot already (reading earlier would
 * fix a REPEATABLE READ snapshot or break SET TRANSACTION), not in
 * SERIALIZABLE (no predicate locks a transaction never asked for), not in
 * parallel mode, not while an extension script runs; it takes its locks
 * conditionally (never waits); and it runs in a subtransaction that is
 * rolled back at once, so it holds no lock afterwards and an error (a
 * damaged install) costs the statement nothing.  Without apikey 1.2 in
 * the database, or after such an error, it is not tried again until a
 * relcache invalidation arrives.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/dependency.h"
#include "catalog/namespace.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "common/cryptohash.h"
#include "common/hmac.h"
#include "common/sha2.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "parser/analyze.h"
#include "parser/parse_func.h"
#include "regex/regex.h"
#include "storage/lmgr.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "apikey.h"

#define LEGACY_MAX_TOKEN	512
#define LEGACY_MAX_ITER		10000000

typedef enum LegacyAlgorithm
{
	ALG_SHA256,					/* sha256-hex, sha256-b64: in keys.hash */
	ALG_PLAINTEXT,				/* hashed at import: in keys.hash */
	ALG_SHA512,
	ALG_PBKDF2,
	ALG_BCRYPT
} LegacyAlgorithm;

/* One row of apikey.legacy_formats, as cached. */
typedef struct LegacyFormat
{
	char	   *name;
	text	   *token_regex;
	text	   *lookup_regex;	/* NULL = none */
	LegacyAlgorithm algorithm;
	bool		capture;		/* hash_input = capture */
	bool		has_until;
	TimestampTz accept_until;
} LegacyFormat;

/* The budget and the counters (see the header for the lock). */
typedef struct LegacyShared
{
	slock_t		mutex;
	double		tat;			/* GCRA theoretical arrival time, usecs */
	ApikeyLegacyStats stats;
} LegacyShared;

static int	legacy_verify_per_second = 20;
static LegacyShared *legacy_shared = NULL;
static LegacyShared legacy_local;	/* without shared memory */

static MemoryContext formats_cxt = NULL;
static LegacyFormat *formats = NULL;
static int	nformats = 0;
static bool formats_valid = false;
static Oid	formats_relid = InvalidOid;
static bool callback_registered = false;

static SPIPlanPtr formats_plan = NULL;
static SPIPlanPtr lookup_plan = NULL;

/* the read at statement analysis (see the header) */
static post_parse_analyze_hook_type prev_post_parse_analyze_hook = NULL;
static bool refresh_skip = false;	/* until the next relcache invalidation */
static bool refreshing = false;

static void legacy_post_parse_analyze(ParseState *pstate, Query *query,
									  JumbleState *jstate);

/* Defines apikey.legacy_verify_per_second. */
void
apikey_legacy_init(void)
{
	DefineCustomIntVariable("apikey.legacy_verify_per_second",
							"Slow legacy hash verifications (PBKDF2, bcrypt) allowed per second on this server.",
							"Shared by every backend; 0 refuses them all. A refusal is the verdict rate_limited.",
							&legacy_verify_per_second,
							20, 0, 100000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	prev_post_parse_analyze_hook = post_parse_analyze_hook;
	post_parse_analyze_hook = legacy_post_parse_analyze;
}

Size
apikey_legacy_shmem_size(void)
{
	return MAXALIGN(sizeof(LegacyShared));
}

/* Called from shmem_startup with AddinShmemInitLock held. */
void
apikey_legacy_shmem_startup(void)
{
	bool		found;

	legacy_shared = ShmemInitStruct("apikey legacy", sizeof(LegacyShared), &found);
	if (!found)
	{
		memset(legacy_shared, 0, sizeof(LegacyShared));
		SpinLockInit(&legacy_shared->mutex);
	}
}

/* The shared struct, or this backend's own without shared memory. */
static LegacyShared *
shared_state(void)
{
	static bool local_ready = false;

	if (legacy_shared != NULL)
		return legacy_shared;
	if (!local_ready)
	{
		SpinLockInit(&legacy_local.mutex);
		local_ready = true;
	}
	return &legacy_local;
}

/* Add one to a counter of ApikeyLegacyStats. */
#define count_stat(field) \
	do { \
		LegacyShared *s_ = shared_state(); \
		SpinLockAcquire(&s_->mutex); \
		s_->stats.field++; \
		SpinLockRelease(&s_->mutex); \
	} while (0)

/* Count upgrades applied and deferred (legacyupgrade.c). */
void
apikey_legacy_count_upgrades(uint64 upgraded, uint64 deferred)
{
	LegacyShared *s = shared_state();

	SpinLockAcquire(&s->mutex);
	s->stats.upgraded += upgraded;
	s->stats.deferred += deferred;
	SpinLockRelease(&s->mutex);
}

/* Copy the counters (apikey.legacy_stats()); false without shared memory. */
bool
apikey_legacy_stats_read(ApikeyLegacyStats *out)
{
	LegacyShared *s = shared_state();

	SpinLockAcquire(&s->mutex);
	*out = s->stats;
	SpinLockRelease(&s->mutex);
	return legacy_shared != NULL;
}

/*
 * Take one unit of the global budget for a slow hash at now; false with
 * *retry_after when it is spent.  Burst: one second's worth.
 */
static bool
budget_take(TimestampTz now, int64 *retry_after)
{
	LegacyShared *s = shared_state();
	int			rate = legacy_verify_per_second;
	double		T,
				tau,
				seen;
	bool		ok;

	if (rate <= 0)
	{
		*retry_after = USECS_PER_SEC;
		return false;
	}
	T = (double) USECS_PER_SEC / rate;
	tau = T * (rate - 1);
	SpinLockAcquire(&s->mutex);
	ok = apikey_gcra_take(&s->tat, (double) now, T, tau, &seen);
	if (!ok)
		s->stats.refused++;
	SpinLockRelease(&s->mutex);
	if (!ok)
		*retry_after = (int64) (seen - (double) now - tau) + 1;
	return ok;
}

/*
 * Any change to apikey.legacy_formats (or to everything) empties the list;
 * any invalidation at all lets statement analysis try to read it again.
 */
static void
formats_inval(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == formats_relid)
		formats_valid = false;
	refresh_skip = false;
}

static LegacyAlgorithm
algorithm_of(const char *name)
{
	if (strcmp(name, "sha512-hex") == 0)
		return ALG_SHA512;
	if (strcmp(name, "pbkdf2-sha256") == 0)
		return ALG_PBKDF2;
	if (strcmp(name, "bcrypt") == 0)
		return ALG_BCRYPT;
	if (strcmp(name, "plaintext") == 0)
		return ALG_PLAINTEXT;
	return ALG_SHA256;
}

/* Read apikey.legacy_formats into the cache; runs as the tables' owner. */
static void
formats_load(void *arg)
{
	MemoryContext old;
	uint64		i;
	int			rc;
	char	  **names;
	char	  **regexes;

	LockRelationOid(formats_relid, AccessShareLock);
	formats_valid = true;
	MemoryContextReset(formats_cxt);
	formats = NULL;
	nformats = 0;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	apikey_prepare_kept(&formats_plan,
						"SELECT f.name, f.token_regex, f.lookup_regex, f.algorithm, "
						"       f.hash_input OPERATOR(pg_catalog.=) 'capture', f.accept_until "
						"  FROM apikey.legacy_formats f "
						" WHERE EXISTS (SELECT FROM apikey.legacy_keys l "
						"                WHERE l.format OPERATOR(pg_catalog.=) f.name) "
						" ORDER BY f.name",
						0, NULL);
	rc = SPI_execute_snapshot(formats_plan, NULL, NULL, GetLatestSnapshot(),
							  InvalidSnapshot, true, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "legacy format lookup failed: %s", SPI_result_code_string(rc));
	names = palloc(sizeof(char *) * Max(SPI_processed, 1));
	regexes = palloc(sizeof(char *) * Max(SPI_processed, 1));
	old = MemoryContextSwitchTo(formats_cxt);
	formats = palloc0(sizeof(LegacyFormat) * Max(SPI_processed, 1));
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		LegacyFormat *f = &formats[nformats++];
		bool		isnull;
		Datum		d;

		f->name = SPI_getvalue(tup, desc, 1);
		f->token_regex = DatumGetTextPCopy(SPI_getbinval(tup, desc, 2, &isnull));
		d = SPI_getbinval(tup, desc, 3, &isnull);
		f->lookup_regex = isnull ? NULL : DatumGetTextPCopy(d);
		f->algorithm = algorithm_of(SPI_getvalue(tup, desc, 4));
		f->capture = DatumGetBool(SPI_getbinval(tup, desc, 5, &isnull));
		d = SPI_getbinval(tup, desc, 6, &isnull);
		f->has_until = !isnull;
		f->accept_until = isnull ? 0 : DatumGetTimestampTz(d);
		names[i] = f->name;
		regexes[i] = text_to_cstring(f->token_regex);
	}
	MemoryContextSwitchTo(old);
	apikey_redact_set_legacy_shapes(names, regexes, nformats);
	SPI_finish();
}

/* The cache's memory and its invalidation callback, once per backend. */
static void
formats_setup(void)
{
	if (callback_registered)
		return;
	formats_cxt = AllocSetContextCreate(CacheMemoryContext, "apikey legacy formats",
										ALLOCSET_SMALL_SIZES);
	CacheRegisterRelcacheCallback(formats_inval, (Datum) 0);
	callback_registered = true;
}

/* The registered formats, read again if they changed. */
static void
formats_current(void)
{
	formats_setup();
	AcceptInvalidationMessages();
	if (formats_valid)
		return;
	formats_relid = get_relname_relid("legacy_formats",
									  get_rel_namespace(apikey_keystore_keys_relid(false)));
	if (!OidIsValid(formats_relid))
	{
		nformats = 0;			/* before the 1.2 upgrade: no legacy formats */
		return;
	}
	PG_TRY();
	{
		apikey_run_as_owner(formats_load, NULL);
	}
	PG_CATCH();
	{
		formats_valid = false;
		nformats = 0;
		PG_RE_THROW();
	}
	PG_END_TRY();
}

/*
 * Lock legacy_formats and legacy_keys if that needs no wait; false if it
 * would (or, with refresh_skip set, if the 1.2 tables are not there).
 */
static bool
formats_lock_conditionally(void)
{
	Oid			nsp = get_rel_namespace(apikey_keystore_keys_relid(false));
	Oid			keys = get_relname_relid("legacy_keys", nsp);

	formats_relid = get_relname_relid("legacy_formats", nsp);
	if (!OidIsValid(formats_relid) || !OidIsValid(keys))
	{
		refresh_skip = true;
		return false;
	}
	return ConditionalLockRelationOid(formats_relid, AccessShareLock) &&
		ConditionalLockRelationOid(keys, AccessShareLock);
}

/*
 * Read the formats in use from statement analysis, never waiting and never
 * failing the statement (see the header).
 */
static void
formats_refresh_quietly(void)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	ErrorData  *volatile failure = NULL;

	formats_setup();
	if (!OidIsValid(get_extension_oid("apikey", true)))
	{
		refresh_skip = true;
		return;
	}
	BeginInternalSubTransaction(NULL);
	refreshing = true;
	PG_TRY();
	{
		/*
		 * The tables are locked only if free; the read also locks their
		 * indexes, which a REINDEX or ALTER may hold: never wait for those
		 * either (the setting ends with the subtransaction).
		 */
		(void) set_config_option("lock_timeout", "1", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_LOCAL, true, 0, false);
		if (formats_lock_conditionally())
			formats_current();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		failure = CopyErrorData();
		FlushErrorState();
	}
	PG_END_TRY();
	refreshing = false;
	/* nothing was written: rolling back releases the locks at once */
	RollbackAndReleaseCurrentSubTransaction();
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
	if (failure == NULL)
		return;
	/* a cancel or shutdown is the statement's, not ours to swallow */
	if (failure->sqlerrcode == ERRCODE_QUERY_CANCELED ||
		failure->sqlerrcode == ERRCODE_ADMIN_SHUTDOWN)
		ReThrowError(failure);
	/* a lock not free now: read again at the next statement */
	if (failure->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE)
		return;
	refresh_skip = true;
	ereport(LOG,
				(errmsg("apikey could not read the legacy formats in use: %s", failure->message),
				 errdetail("Until it can, this session's log hides apikey's own token shapes only.")));
}

/*
 * After each statement's analysis, read the formats in use if they changed
 * and reading is safe here (see the header).
 */
static void
legacy_post_parse_analyze(ParseState *pstate, Query *query, JumbleState *jstate)
{
	if (prev_post_parse_analyze_hook)
		prev_post_parse_analyze_hook(pstate, query, jstate);
	if (formats_valid || refresh_skip || refreshing ||
		MyBackendType != B_BACKEND || creating_extension ||
		!IsTransactionState() || !FirstSnapshotSet ||
		IsolationIsSerializable() || IsInParallelMode())
		return;
	formats_refresh_quietly();
}

/*
 * Statement trigger on legacy_formats and legacy_keys: every backend reads
 * the formats in use again once this transaction commits.
 */
void
apikey_legacy_formats_changed(void)
{
	Oid			relid = get_relname_relid("legacy_formats",
										  get_rel_namespace(apikey_keystore_keys_relid(false)));

	if (OidIsValid(relid))
		CacheInvalidateRelcacheByRelid(relid);
}

/*
 * Does re match the whole of tok?  With want_capture, *cap and *caplen get its
 * first capture group (false if it has none).
 */
static bool
regex_match(text *re, const char *tok, int len, bool want_capture,
			const char **cap, int *caplen)
{
	regmatch_t	m[2];

	if (!RE_compile_and_execute(re, (char *) tok, len, REG_ADVANCED,
								C_COLLATION_OID, 2, m))
		return false;
	if (!want_capture)
		return true;
	if (m[1].rm_so < 0 || m[1].rm_eo <= m[1].rm_so)
		return false;
	*cap = tok + m[1].rm_so;
	*caplen = (int) (m[1].rm_eo - m[1].rm_so);
	return true;
}

/* Lowercase hex of a digest, NUL-terminated in out (2 * len + 1). */
static void
to_hex(const uint8 *d, int len, char *out)
{
	out[hex_encode((const char *) d, len, out)] = '\0';
}

/* SHA-512 of data, in hex. */
static void
sha512_hex(const char *data, int len, char *out)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA512);
	uint8		d[PG_SHA512_DIGEST_LENGTH];

	if (ctx == NULL || pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (const uint8 *) data, len) < 0 ||
		pg_cryptohash_final(ctx, d, sizeof(d)) < 0)
		elog(ERROR, "SHA-512 failed: %s", pg_cryptohash_error(ctx));
	pg_cryptohash_free(ctx);
	to_hex(d, sizeof(d), out);
}

/* HMAC-SHA256(key, a || b) into out. */
static void
hmac_sha256(const char *key, int keylen, const uint8 *a, int alen,
			const uint8 *b, int blen, uint8 *out)
{
	pg_hmac_ctx *ctx = pg_hmac_create(PG_SHA256);

	if (ctx == NULL || pg_hmac_init(ctx, (const uint8 *) key, keylen) < 0 ||
		pg_hmac_update(ctx, a, alen) < 0 ||
		(blen > 0 && pg_hmac_update(ctx, b, blen) < 0) ||
		pg_hmac_final(ctx, out, PG_SHA256_DIGEST_LENGTH) < 0)
		elog(ERROR, "HMAC-SHA256 failed: %s", pg_hmac_error(ctx));
	pg_hmac_free(ctx);
}

/*
 * PBKDF2-HMAC-SHA256 with a 32-byte result (one block), as Django's
 * pbkdf2_sha256 hasher computes it; in hex.
 */
static void
pbkdf2_sha256_hex(const char *pw, int pwlen, const char *salt, int saltlen,
				  int iter, char *out)
{
	static const uint8 block1[4] = {0, 0, 0, 1};
	uint8		u[PG_SHA256_DIGEST_LENGTH];
	uint8		t[PG_SHA256_DIGEST_LENGTH];
	int			i,
				j;

	hmac_sha256(pw, pwlen, (const uint8 *) salt, saltlen, block1, 4, u);
	memcpy(t, u, sizeof(t));
	for (i = 1; i < iter; i++)
	{
		CHECK_FOR_INTERRUPTS();
		hmac_sha256(pw, pwlen, u, sizeof(u), NULL, 0, u);
		for (j = 0; j < (int) sizeof(t); j++)
			t[j] ^= u[j];
	}
	to_hex(t, sizeof(t), out);
}

/*
 * pgcrypto's crypt(text, text), by OID: the function named crypt in the
 * pgcrypto extension's schema that is a member of that extension.
 */
static Oid
pgcrypto_crypt_oid(void)
{
	Oid			ext = get_extension_oid("pgcrypto", true);
	Oid			nsp;
	Oid			argtypes[2] = {TEXTOID, TEXTOID};
	Oid			fn;

	if (!OidIsValid(ext))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("bcrypt legacy keys need the pgcrypto extension"),
				 errhint("Run CREATE EXTENSION pgcrypto in this database.")));
	nsp = apikey_extension_namespace(ext);
	fn = LookupFuncName(list_make2(makeString(get_namespace_name(nsp)),
								   makeString("crypt")),
						2, argtypes, true);
	if (!OidIsValid(fn) || getExtensionOfObject(ProcedureRelationId, fn) != ext)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("pgcrypto's crypt(text, text) was not found in its extension"),
				 errhint("Reinstall pgcrypto: DROP EXTENSION pgcrypto; CREATE EXTENSION pgcrypto.")));
	return fn;
}

/* Constant-time equality of two strings of known lengths. */
static bool
same_secret(const char *a, const char *b)
{
	size_t		la = strlen(a);

	return la == strlen(b) && timingsafe_bcmp(a, b, la) == 0;
}

/* Does input match the stored verifier under alg? */
static bool
verifier_matches(LegacyAlgorithm alg, const char *input, int len, const char *verifier)
{
	char		hex[PG_SHA512_DIGEST_LENGTH * 2 + 1];

	switch (alg)
	{
		case ALG_SHA512:
			sha512_hex(input, len, hex);
			return same_secret(hex, verifier);
		case ALG_PBKDF2:
			{
				/* "<iterations>$<salt>$<hex>", as import_keys() stores it */
				char	   *end;
				long		iter = strtol(verifier, &end, 10);
				const char *salt = end + 1;
				const char *d;

				if (*end != '$' || iter < 1 || iter > LEGACY_MAX_ITER ||
					(d = strchr(salt, '$')) == NULL)
					return false;
				pbkdf2_sha256_hex(input, len, salt, (int) (d - salt), (int) iter, hex);
				return same_secret(hex, d + 1);
			}
		case ALG_BCRYPT:
			{
				Datum		r;

				r = OidFunctionCall2Coll(pgcrypto_crypt_oid(), C_COLLATION_OID,
										 PointerGetDatum(cstring_to_text_with_len(input, len)),
										 CStringGetTextDatum(verifier));
				return same_secret(text_to_cstring(DatumGetTextPP(r)), verifier);
			}
		default:
			return false;
	}
}

/* What a pending verifier lookup found (run as the tables' owner). */
typedef struct LookupArgs
{
	const char *format;
	const char *lookup;
	int			lookup_len;
	bool		found;
	int64		key_id;
	uint8		hash[APIKEY_HASH_LEN];	/* the key's stored (placeholder) hash */
	char	   *verifier;
} LookupArgs;

static void
lookup_pending(void *arg)
{
	LookupArgs *la = arg;
	MemoryContext cxt = CurrentMemoryContext;
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];
	int			rc;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	apikey_prepare_kept(&lookup_plan,
						"SELECT l.key_id, k.hash, l.verifier "
						"  FROM apikey.legacy_keys l "
						"  JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) l.key_id "
						" WHERE l.format OPERATOR(pg_catalog.=) $1 "
						"   AND l.lookup OPERATOR(pg_catalog.=) $2 "
						"   AND l.verifier IS NOT NULL",
						2, types);
	values[0] = CStringGetTextDatum(la->format);
	values[1] = PointerGetDatum(cstring_to_text_with_len(la->lookup, la->lookup_len));
	rc = SPI_execute_snapshot(lookup_plan, values, NULL, GetLatestSnapshot(),
							  InvalidSnapshot, true, false, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "legacy key lookup failed: %s", SPI_result_code_string(rc));
	la->found = (SPI_processed == 1);
	if (la->found)
	{
		HeapTuple	tup = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		bytea	   *h;

		la->key_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		h = DatumGetByteaPP(SPI_getbinval(tup, desc, 2, &isnull));
		if (VARSIZE_ANY_EXHDR(h) != APIKEY_HASH_LEN)
			elog(ERROR, "apikey.keys.hash of key " INT64_FORMAT " is not 32 bytes", la->key_id);
		memcpy(la->hash, VARDATA_ANY(h), APIKEY_HASH_LEN);
		la->verifier = MemoryContextStrdup(cxt, SPI_getvalue(tup, desc, 3));
	}
	SPI_finish();
}

/* A copy of text t in CurrentMemoryContext (NULL stays NULL). */
static text *
text_copy(const text *t)
{
	text	   *c;

	if (t == NULL)
		return NULL;
	c = palloc(VARSIZE(t));
	memcpy(c, t, VARSIZE(t));
	return c;
}

/*
 * A copy of the list, in CurrentMemoryContext: SQL run while a token is
 * looked up (lookup_pending) may read the list again, at its analysis.
 */
static LegacyFormat *
formats_copy(int *n)
{
	LegacyFormat *c = palloc(sizeof(LegacyFormat) * Max(nformats, 1));
	int			i;

	for (i = 0; i < nformats; i++)
	{
		c[i] = formats[i];
		c[i].name = pstrdup(formats[i].name);
		c[i].token_regex = text_copy(formats[i].token_regex);
		c[i].lookup_regex = text_copy(formats[i].lookup_regex);
	}
	*n = nformats;
	return c;
}

/*
 * Look a token that is not in apikey's format up among the legacy keys.
 * True with verdict->key_copy filled when a key was found (the caller
 * judges it); false with verdict->code set otherwise (malformed when no
 * format matches, unknown, or rate_limited when the budget is spent).
 * *match says what to upgrade should the verdict be valid.
 */
bool
apikey_legacy_lookup(text *token, TimestampTz now, bool reporting,
					 ApikeyVerdict *verdict, ApikeyLegacyMatch *match)
{
	const char *tok = VARDATA_ANY(token);
	int			len = VARSIZE_ANY_EXHDR(token);
	bool		any = false;
	LegacyFormat *fs;
	int			n;
	int			i;

	memset(match, 0, sizeof(*match));
	verdict->code = APIKEY_MALFORMED;
	/* ASCII only: regex offsets are then byte offsets */
	if (len == 0 || len > LEGACY_MAX_TOKEN)
		return false;
	for (i = 0; i < len; i++)
		if (IS_HIGHBIT_SET(tok[i]) || tok[i] == '\0')
			return false;
	formats_current();
	if (nformats == 0)
		return false;
	fs = formats_copy(&n);

	/*
	 * An imported SHA-256, a plaintext import or an upgraded key: looked up
	 * before any regex runs (PostgreSQL's regex engine costs more than the
	 * lookup).  Only the token itself hashes to a key's hash, so a hit needs
	 * no shape check.
	 */
	apikey_sha256(tok, len, match->new_hash);
	AcceptInvalidationMessages();
	if (apikey_keycache_lookup(match->new_hash, &verdict->key_copy))
		return true;
	for (i = 0; i < n && !any; i++)
		any = regex_match(fs[i].token_regex, tok, len, false, NULL, NULL);
	if (!any)
		return false;
	verdict->code = APIKEY_UNKNOWN;

	for (i = 0; i < n; i++)
	{
		LegacyFormat f = fs[i];
		LookupArgs	la;
		const char *input = tok;
		int			inlen = len;
		char		digest[PG_SHA512_DIGEST_LENGTH * 2 + 1];

		if (f.algorithm == ALG_SHA256 || f.algorithm == ALG_PLAINTEXT ||
			(f.has_until && f.accept_until <= now && !reporting))
			continue;
		if (!regex_match(f.token_regex, tok, len, f.capture, &input, &inlen))
			continue;
		memset(&la, 0, sizeof(la));
		la.format = f.name;
		if (f.lookup_regex != NULL)
		{
			if (!regex_match(f.lookup_regex, tok, len, true, &la.lookup, &la.lookup_len))
				continue;
		}
		else if (f.algorithm == ALG_SHA512)
		{
			/* unsalted: the digest is its own lookup id */
			sha512_hex(input, inlen, digest);
			la.lookup = digest;
			la.lookup_len = strlen(digest);
		}
		else
			continue;			/* salted without a lookup id: refused */
		apikey_run_as_owner(lookup_pending, &la);
		if (!la.found)
			continue;
		if ((f.algorithm == ALG_PBKDF2 || f.algorithm == ALG_BCRYPT) && !reporting &&
			!budget_take(now, &verdict->retry_after))
		{
			verdict->code = APIKEY_RATE_LIMITED;
			verdict->has_retry_after = true;
			return false;
		}
		if (!verifier_matches(f.algorithm, input, inlen, la.verifier))
		{
			if (!reporting)
				count_stat(mismatched);
			return false;		/* unknown: the lookup id is not secret */
		}
		if (!reporting)
			count_stat(verified);
		AcceptInvalidationMessages();
		if (!apikey_keycache_lookup(la.hash, &verdict->key_copy))
			return false;		/* deleted meanwhile */
		match->pending = true;
		match->key_id = la.key_id;
		memcpy(match->old_hash, la.hash, APIKEY_HASH_LEN);
		apikey_sha256(la.verifier, strlen(la.verifier), match->verifier_sha256);
		return true;
	}
	return false;
}

/*
 * The stored hash of the key a legacy token belongs to, for report_leak():
 * the lookup of a verification, without judging the key, counting a call or
 * recording an upgrade.  A report is an administrator's (or a scanner's, by
 * a granted role) and names a key to stop: it also finds the keys of a
 * retired format (which verify again if the format is un-retired), and
 * does not draw on apikey.legacy_verify_per_second, which bounds what
 * unauthenticated callers can make the server hash (a report hashes at
 * most once per token, for a lookup id that names a pending key).  False
 * when the token belongs to no key.
 */
bool
apikey_legacy_key_hash(text *token, uint8 *hash)
{
	ApikeyVerdict verdict;
	ApikeyLegacyMatch match;

	memset(&verdict, 0, sizeof(verdict));
	if (!apikey_legacy_lookup(token, GetCurrentTimestamp(), true, &verdict, &match))
		return false;
	memcpy(hash, verdict.key_copy.hash, APIKEY_HASH_LEN);
	return true;
}
