/*-------------------------------------------------------------------------
 *
 * issue.c
 *	  Issuing keys: apikey.issue(), apikey.issue_many(), and the argument
 *	  checks they share with set_limits() (apikey._check_scopes,
 *	  _check_limits, _check_cidrs).
 *
 * Both issuing functions check every argument here, in C, in the order the
 * PL/pgSQL issue() of 1.0 did, so the first bad argument gives the same
 * error (SQLSTATE, message, hint) as before.  Then they generate the tokens
 * and write the rows with real INSERT statements through SPI, planned once
 * per backend and kept: every constraint, foreign key and trigger on the
 * key tables -- the cache invalidation triggers among them -- runs exactly
 * as it does for any other writer.  Nothing here bypasses the executor.
 *
 * Where the time went in the PL/pgSQL version: each check was a query of
 * its own (three PERFORMs, a nested SECURITY DEFINER function, one catalog
 * query per scope), and a key without scopes still ran an INSERT into
 * key_scopes that wrote nothing but fired its statement trigger, which
 * empties every backend's key cache.  Here a key without scopes or quota
 * touches only apikey.keys.
 *
 * What remains is the tables' own cost: on every INSERT statement
 * PostgreSQL re-reads apikey.keys' seven CHECK constraints from their
 * stored node trees and prepares them, and fires the foreign-key triggers
 * (two per key row, one lookup per key_scopes row).
 *
 * Keys and their scope grants are written by one statement (a data-modifying
 * WITH), quota rows by a second one only for keys that have a quota.
 * issue_many() checks the shared settings once per call and writes the
 * whole batch with those same statements, so the per-statement work
 * (executor start, constraint set-up, triggers, the relcache invalidation
 * they send) is paid once per call instead of once per key.
 *
 * Privileges: both are SECURITY DEFINER with search_path pinned (see the
 * install script); their SQL runs as the extension owner, names every
 * object with its schema and spells operators OPERATOR(pg_catalog.x).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_collation.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "apikey.h"
#include "token.h"

/* The owner limit issue() has always enforced (fits in the owner index) */
#define ISSUE_OWNER_MAXLEN	1024

/* Keys one issue_many() call may issue (README: Reference) */
#define APIKEY_ISSUE_MANY_MAX	10000

/* Parameters of the INSERT into apikey.keys, in this order */
enum
{
	KP_OWNER,
	KP_NAME,
	KP_PREFIX,
	KP_HINT,
	KP_HASH,
	KP_CREATED_BY,
	KP_EXPIRES_AT,
	KP_METADATA,
	KP_RATE_LIMIT,
	KP_RATE_WINDOW,
	KP_QUOTA,
	KP_QUOTA_REFILL,
	KP_ALLOWED_CIDRS,
	KP_COUNT
};

/*
 * What every key of one call shares, checked.  values/nulls are the
 * parameters of the INSERT into apikey.keys; insert_keys() fills in the
 * per-key ones (owner, hint, hash) in its own copy.
 */
typedef struct IssueSettings
{
	Datum		values[KP_COUNT];
	char		nulls[KP_COUNT];	/* SPI style: ' ' or 'n' */
	text	   *prefix;
	ArrayType  *scopes;			/* checked, without duplicates; NULL = none */
	bool		has_quota;
	int64		quota;
} IssueSettings;

/* Plans kept for the backend's life (re-planned by the plan cache) */
static SPIPlanPtr scope_exact_plan = NULL;
static SPIPlanPtr scope_prefix_plan = NULL;
static SPIPlanPtr insert_quotas_plan = NULL;

/* a <= an interval of exactly this many months (as SQL compares them) */
static inline bool
interval_le_const(Interval *a, int32 months)
{
	Interval	b = {0};

	b.month = months;
	return DatumGetBool(DirectFunctionCall2(interval_le, IntervalPGetDatum(a),
											IntervalPGetDatum(&b)));
}

/* a > an interval of exactly this many months */
static inline bool
interval_gt_const(Interval *a, int32 months)
{
	return !interval_le_const(a, months);
}

/* an interval as the text cast shows it (IntervalStyle applies) */
static char *
interval_text(Interval *iv)
{
	return DatumGetCString(DirectFunctionCall1(interval_out, IntervalPGetDatum(iv)));
}

/*
 * An owner must hold something other than white space (as the regular
 * expression [^[:space:]] sees it under the call's collation), and fit the
 * owner index.  elem is its subscript in issue_many()'s array, or 0.
 */
static void
check_owner(text *owner, Oid collation, int elem)
{
	bool		blank = (owner == NULL);
	int			len = owner ? VARSIZE_ANY_EXHDR(owner) : 0;

	if (!blank)
	{
		const char *p = VARDATA_ANY(owner);
		int			i;

		/* a printable ASCII character is no space in any locale */
		for (i = 0; i < len && !(p[i] > ' ' && p[i] < 0x7f); i++)
			;
		if (i == len)
			blank = !DatumGetBool(DirectFunctionCall2Coll(textregexeq,
														  OidIsValid(collation) ? collation : DEFAULT_COLLATION_OID,
														  PointerGetDatum(owner),
														  CStringGetTextDatum("[^[:space:]]")));
	}
	if (blank)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("owner must not be empty"),
				 elem > 0 ? errdetail("owners[%d] is empty or only white space.", elem) : 0,
				 errhint("Pass the tenant, user or application the key acts for.")));
	if (len > ISSUE_OWNER_MAXLEN)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("owner is too long (%d bytes)", len),
				 elem > 0 ? errdetail("owners[%d] is too long.", elem) : 0,
				 errhint("An owner is at most 1024 bytes; use a tenant or user id.")));
}

/* An address allowlist is NULL (anywhere) or a non-empty list without NULLs. */
void
apikey_cidrs_check(ArrayType *cidrs)
{
	if (cidrs == NULL)
		return;
	/* array_position(), which 1.0 used, refuses these */
	if (ARR_NDIM(cidrs) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("searching for elements in multidimensional arrays is not supported")));
	if (array_contains_nulls(cidrs))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("allowed_cidrs must not contain NULL")));
	if (ArrayGetNItems(ARR_NDIM(cidrs), ARR_DIMS(cidrs)) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("allowed_cidrs must not be empty"),
				 errhint("Use NULL to allow every address.")));
}

/*
 * Rate limit and quota settings.  NULL pointers are SQL NULLs; a NULL
 * window is refused (it has a default).
 */
void
apikey_limits_check(const int32 *rate_limit, Interval *rate_window,
					const int64 *quota, Interval *quota_refill)
{
	if (rate_limit != NULL && *rate_limit <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("rate_limit must be positive, got %d", *rate_limit),
				 errhint("Use NULL for no rate limit.")));
	if (rate_window == NULL || interval_le_const(rate_window, 0) ||
		interval_gt_const(rate_window, 12))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("rate_window must be a positive interval of at most 1 year, got %s",
						rate_window ? interval_text(rate_window) : "NULL")));
	if (quota != NULL && *quota < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("quota must not be negative, got " INT64_FORMAT, *quota),
				 errhint("Use NULL for an unlimited quota.")));
	if (quota_refill != NULL &&
		(interval_le_const(quota_refill, 0) || interval_gt_const(quota_refill, 120)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("quota_refill must be a positive interval of at most 10 years, got %s",
						interval_text(quota_refill)),
				 errhint("Use NULL for a quota that is never refilled.")));
	if (quota_refill != NULL && quota == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("quota_refill needs a quota")));
}

/* Does apikey.scopes hold name (exact), or a name starting with it (prefix)? */
static bool
scope_in_catalog(const char *name, int len, bool prefix)
{
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1];
	SPIPlanPtr	plan;
	int			rc;

	if (prefix)
		plan = apikey_prepare_kept(&scope_prefix_plan,
								   "SELECT FROM apikey.scopes c "
								   "WHERE pg_catalog.starts_with(c.name, $1) LIMIT 1",
								   1, argtypes);
	else
		plan = apikey_prepare_kept(&scope_exact_plan,
								   "SELECT FROM apikey.scopes c "
								   "WHERE c.name OPERATOR(pg_catalog.=) $1",
								   1, argtypes);
	values[0] = PointerGetDatum(cstring_to_text_with_len(name, len));
	rc = SPI_execute_plan(plan, values, NULL, true, 1);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "scope lookup failed: %s", SPI_result_code_string(rc));
	return SPI_processed > 0;
}

/*
 * Check scope grants against apikey.scopes, raising for the first bad one;
 * returns them in order without duplicates (an empty array for NULL).
 * "*" grants everything; "prefix:*" needs a scope under that prefix.
 */
ArrayType *
apikey_scopes_checked(ArrayType *scopes)
{
	Datum	   *elems;
	bool	   *enulls;
	int			n;
	int			nout = 0;
	Datum	   *out;

	if (scopes == NULL)
		return construct_empty_array(TEXTOID);
	deconstruct_array(scopes, TEXTOID, -1, false, TYPALIGN_INT, &elems, &enulls, &n);
	out = palloc(sizeof(Datum) * Max(n, 1));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	for (int i = 0; i < n; i++)
	{
		text	   *t = enulls[i] ? NULL : DatumGetTextPP(elems[i]);
		const char *s = t ? VARDATA_ANY(t) : NULL;
		int			len = t ? VARSIZE_ANY_EXHDR(t) : 0;
		bool		dup = false;

		if (t == NULL || len == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("scope names must not be NULL or empty")));
		if (len == 1 && s[0] == '*')
			 /* everything */ ;
		else if (len >= 2 && s[len - 2] == ':' && s[len - 1] == '*')
		{
			/* a pattern: some scope must start with it, up to the "*" */
			if (!scope_in_catalog(s, len - 1, true))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("scope pattern \"%s\" matches no scope in apikey.scopes",
								apikey_clip_for_message(s, len)),
						 errhint("Add a scope under that prefix with INSERT INTO apikey.scopes (name) VALUES (...).")));
		}
		else if (!scope_in_catalog(s, len, false))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("scope \"%s\" does not exist", apikey_clip_for_message(s, len)),
					 errhint("Add it with INSERT INTO apikey.scopes (name) VALUES (...), or fix the name.")));

		for (int j = 0; j < nout && !dup; j++)
		{
			text	   *o = DatumGetTextPP(out[j]);

			dup = VARSIZE_ANY_EXHDR(o) == len && memcmp(VARDATA_ANY(o), s, len) == 0;
		}
		if (!dup)
			out[nout++] = PointerGetDatum(t);
	}
	SPI_finish();

	return construct_array(out, nout, TEXTOID, -1, false, TYPALIGN_INT);
}

/*
 * Check the settings every key of the call shares (arguments 1 to 10 of
 * issue() and issue_many()), in 1.0's order, and fill s.
 */
static void
check_settings(FunctionCallInfo fcinfo, IssueSettings *s)
{
	int32		rate_limit;
	int64		quota;
	Interval   *rate_window;
	Interval   *quota_refill;
	ArrayType  *cidrs;
	Jsonb	   *metadata;

	memset(s->nulls, ' ', sizeof(s->nulls));

	/* prefix (its form is checked last, as _new_token() did) */
	if (PG_ARGISNULL(4))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("prefix must not be NULL"),
				 errhint("Omit it for the default prefix ak.")));
	s->prefix = PG_GETARG_TEXT_PP(4);
	s->values[KP_PREFIX] = PointerGetDatum(s->prefix);

	/* expires_at */
	if (PG_ARGISNULL(3))
		s->nulls[KP_EXPIRES_AT] = 'n';
	else
	{
		TimestampTz expires_at = PG_GETARG_TIMESTAMPTZ(3);

		if (expires_at <= GetCurrentTransactionStartTimestamp())
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("expires_at must be in the future, got %s",
							DatumGetCString(DirectFunctionCall1(timestamptz_out,
																TimestampTzGetDatum(expires_at))))));
		s->values[KP_EXPIRES_AT] = TimestampTzGetDatum(expires_at);
	}

	/* metadata */
	metadata = PG_ARGISNULL(5) ? NULL : PG_GETARG_JSONB_P(5);
	if (metadata == NULL || !JB_ROOT_IS_OBJECT(metadata))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("metadata must be a JSON object")));
	s->values[KP_METADATA] = JsonbPGetDatum(metadata);

	/* allowed_cidrs, then limits */
	cidrs = PG_ARGISNULL(10) ? NULL : PG_GETARG_ARRAYTYPE_P(10);
	apikey_cidrs_check(cidrs);
	rate_limit = PG_ARGISNULL(6) ? 0 : PG_GETARG_INT32(6);
	rate_window = PG_ARGISNULL(7) ? NULL : PG_GETARG_INTERVAL_P(7);
	quota = PG_ARGISNULL(8) ? 0 : PG_GETARG_INT64(8);
	quota_refill = PG_ARGISNULL(9) ? NULL : PG_GETARG_INTERVAL_P(9);
	apikey_limits_check(PG_ARGISNULL(6) ? NULL : &rate_limit, rate_window,
				 PG_ARGISNULL(8) ? NULL : &quota, quota_refill);
	s->values[KP_ALLOWED_CIDRS] = PointerGetDatum(cidrs);
	s->nulls[KP_ALLOWED_CIDRS] = cidrs ? ' ' : 'n';
	s->values[KP_RATE_LIMIT] = Int32GetDatum(rate_limit);
	s->nulls[KP_RATE_LIMIT] = PG_ARGISNULL(6) ? 'n' : ' ';
	s->values[KP_RATE_WINDOW] = IntervalPGetDatum(rate_window);
	s->has_quota = !PG_ARGISNULL(8);
	s->quota = quota;
	s->values[KP_QUOTA] = Int64GetDatum(quota);
	s->nulls[KP_QUOTA] = s->has_quota ? ' ' : 'n';
	s->values[KP_QUOTA_REFILL] = IntervalPGetDatum(quota_refill);
	s->nulls[KP_QUOTA_REFILL] = quota_refill ? ' ' : 'n';

	/* scopes */
	s->scopes = apikey_scopes_checked(PG_ARGISNULL(1) ? NULL : PG_GETARG_ARRAYTYPE_P(1));
	if (ArrayGetNItems(ARR_NDIM(s->scopes), ARR_DIMS(s->scopes)) == 0)
		s->scopes = NULL;

	/* the prefix's form */
	if (!apikey_prefix_is_valid(VARDATA_ANY(s->prefix), VARSIZE_ANY_EXHDR(s->prefix)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid token prefix \"%s\"",
						apikey_clip_for_message(VARDATA_ANY(s->prefix), VARSIZE_ANY_EXHDR(s->prefix))),
				 errhint("A prefix is 1 to 16 characters: a lowercase letter, then lowercase letters, digits or underscores.")));

	/* name, and the role that issues (outside any SECURITY DEFINER) */
	s->values[KP_NAME] = PG_ARGISNULL(2) ? (Datum) 0 : PG_GETARG_DATUM(2);
	s->nulls[KP_NAME] = PG_ARGISNULL(2) ? 'n' : ' ';
	s->values[KP_CREATED_BY] =
		DirectFunctionCall1(namein, CStringGetDatum(GetUserNameFromId(GetOuterUserId(), false)));
}

/* A new key: its token (the secret), hash, hint, and the id it got. */
typedef struct NewKey
{
	char		token[APIKEY_TOKEN_MAXLEN + 1];
	int			token_len;
	uint8		hash[APIKEY_HASH_LEN];
	char		hint[APIKEY_HINT_MAXLEN];
	int64		key_id;
} NewKey;

/*
 * Generate n tokens with the settings' (checked) prefix.  The random bytes
 * are drawn a batch at a time: one call into the random source per batch
 * costs far less than one per key.
 */
static void
new_tokens(const IssueSettings *s, NewKey *keys, int n)
{
#define SECRETS_PER_DRAW 64
	uint8		secrets[SECRETS_PER_DRAW][APIKEY_SECRET_BYTES];
	size_t		plen = VARSIZE_ANY_EXHDR(s->prefix);

	for (int i = 0; i < n; i++)
	{
		NewKey	   *k = &keys[i];
		int			slot = i % SECRETS_PER_DRAW;

		if (slot == 0 &&
			!pg_strong_random(secrets, APIKEY_SECRET_BYTES * Min(n - i, SECRETS_PER_DRAW)))
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("could not generate random bytes for a token")));
		if (!apikey_token_build(VARDATA_ANY(s->prefix), plen, secrets[slot],
								k->token, sizeof(k->token)))
			elog(ERROR, "token build failed for a valid prefix");
		k->token_len = strlen(k->token);
		apikey_token_hint(k->token, k->token_len, plen, k->hint);
		apikey_sha256(k->token, k->token_len, k->hash);
	}
	explicit_bzero(secrets, sizeof(secrets));
#undef SECRETS_PER_DRAW
}

/* A key's position in a batch, by its hash */
typedef struct HashIndex
{
	uint8		hash[APIKEY_HASH_LEN];
	int			index;
} HashIndex;

static Datum
hash_datum(const uint8 *hash)
{
	bytea	   *b = palloc(VARHDRSZ + APIKEY_HASH_LEN);

	SET_VARSIZE(b, VARHDRSZ + APIKEY_HASH_LEN);
	memcpy(VARDATA(b), hash, APIKEY_HASH_LEN);
	return PointerGetDatum(b);
}

/*
 * The statement that writes n keys (and their scope grants, in the same
 * statement through a data-modifying WITH): a VALUES row for one key, the
 * unnested arrays for a batch.  Both return (id, hash).
 */
static SPIPlanPtr
insert_keys_plan(int n, bool with_scopes)
{
	static SPIPlanPtr plans[2][2];
	SPIPlanPtr *plan = &plans[n > 1][with_scopes];
	Oid			argtypes[KP_COUNT + 1] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, BYTEAOID,
		NAMEOID, TIMESTAMPTZOID, JSONBOID, INT4OID, INTERVALOID, INT8OID,
	INTERVALOID, CIDRARRAYOID, TEXTARRAYOID};
	const char *insert;
	char	   *sql;

	if (*plan != NULL)
		return *plan;
	if (n > 1)
	{
		argtypes[KP_OWNER] = TEXTARRAYOID;
		argtypes[KP_HINT] = TEXTARRAYOID;
		argtypes[KP_HASH] = BYTEAARRAYOID;
		insert =
			"INSERT INTO apikey.keys (owner, name, prefix, hint, hash, created_by, expires_at, "
			"    metadata, rate_limit, rate_window, quota, quota_refill, allowed_cidrs) "
			"SELECT u.owner, $2, $3, u.hint, u.hash, $6, $7, $8, $9, $10, $11, $12, $13 "
			"  FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($4), pg_catalog.unnest($5)) "
			"       AS u(owner, hint, hash) "
			"RETURNING id, hash";
	}
	else
		insert =
			"INSERT INTO apikey.keys (owner, name, prefix, hint, hash, created_by, expires_at, "
			"    metadata, rate_limit, rate_window, quota, quota_refill, allowed_cidrs) "
			"VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) "
			"RETURNING id, hash";
	if (with_scopes)
		sql = psprintf("WITH k AS (%s), "
					   "     g AS (INSERT INTO apikey.key_scopes (key_id, scope) "
					   "           SELECT k.id, s.scope FROM k, pg_catalog.unnest($14) AS s(scope)) "
					   "SELECT k.id, k.hash FROM k", insert);
	else
		sql = pstrdup(insert);
	return apikey_prepare_kept(plan, sql, with_scopes ? KP_COUNT + 1 : KP_COUNT, argtypes);
}

/*
 * Write the keys of a batch (and their scope grants) in one statement;
 * sets each key's id.  A key is matched to its returned row by hash.
 */
static void
insert_keys(IssueSettings *s, Datum *owners, NewKey *keys, int n)
{
	Datum		values[KP_COUNT + 1];
	char		nulls[KP_COUNT + 1];
	HTAB	   *byhash = NULL;
	int			rc;

	memcpy(values, s->values, sizeof(s->values));
	memcpy(nulls, s->nulls, sizeof(s->nulls));
	nulls[KP_COUNT] = ' ';
	if (n == 1)
	{
		values[KP_OWNER] = owners[0];
		values[KP_HINT] = CStringGetTextDatum(keys[0].hint);
		values[KP_HASH] = hash_datum(keys[0].hash);
	}
	else
	{
		Datum	   *hints = palloc(sizeof(Datum) * n);
		Datum	   *hashes = palloc(sizeof(Datum) * n);

		for (int i = 0; i < n; i++)
		{
			hints[i] = CStringGetTextDatum(keys[i].hint);
			hashes[i] = hash_datum(keys[i].hash);
		}
		values[KP_OWNER] = PointerGetDatum(construct_array(owners, n, TEXTOID, -1, false, TYPALIGN_INT));
		values[KP_HINT] = PointerGetDatum(construct_array(hints, n, TEXTOID, -1, false, TYPALIGN_INT));
		values[KP_HASH] = PointerGetDatum(construct_array(hashes, n, BYTEAOID, -1, false, TYPALIGN_INT));
	}
	values[KP_COUNT] = PointerGetDatum(s->scopes);
	rc = SPI_execute_plan(insert_keys_plan(n, s->scopes != NULL), values, nulls, false, 0);
	if ((rc != SPI_OK_INSERT_RETURNING && rc != SPI_OK_SELECT) || SPI_processed != n)
		elog(ERROR, "key insert failed: %s", SPI_result_code_string(rc));

	for (int r = 0; r < n; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		bool		isnull;
		bytea	   *h = DatumGetByteaPP(SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull));
		int			i = r;

		/* rows come back in input order; should they not, look them up */
		if (memcmp(VARDATA_ANY(h), keys[i].hash, APIKEY_HASH_LEN) != 0)
		{
			HashIndex  *entry;

			if (byhash == NULL)
			{
				HASHCTL		ctl = {0};

				ctl.keysize = APIKEY_HASH_LEN;
				ctl.entrysize = sizeof(HashIndex);
				ctl.hcxt = CurrentMemoryContext;
				byhash = hash_create("apikey issue_many", n, &ctl,
									 HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
				for (int j = 0; j < n; j++)
					((HashIndex *) hash_search(byhash, keys[j].hash, HASH_ENTER, NULL))->index = j;
			}
			entry = hash_search(byhash, VARDATA_ANY(h), HASH_FIND, NULL);
			if (entry == NULL)
				elog(ERROR, "inserted key matches no generated token");
			i = entry->index;
		}
		keys[i].key_id = DatumGetInt64(SPI_getbinval(tup, SPI_tuptable->tupdesc, 1, &isnull));
	}
}

/* The quota rows of the new keys, one statement. */
static void
insert_quotas(IssueSettings *s, NewKey *keys, int n)
{
	Oid			argtypes[2] = {INT8ARRAYOID, INT8OID};
	Datum		values[2];
	Datum	   *ids = palloc(sizeof(Datum) * n);
	int			rc;

	for (int i = 0; i < n; i++)
		ids[i] = Int64GetDatum(keys[i].key_id);
	values[0] = PointerGetDatum(construct_array(ids, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	values[1] = Int64GetDatum(s->quota);
	rc = SPI_execute_plan(apikey_prepare_kept(&insert_quotas_plan,
											  "INSERT INTO apikey.quotas (key_id, remaining) "
											  "SELECT k.id, $2 FROM pg_catalog.unnest($1) AS k(id)",
											  2, argtypes),
						  values, NULL, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "quota insert failed: %s", SPI_result_code_string(rc));
}

/*
 * The audit row of the call (issue 13), in the caller's transaction: issue()
 * writes one per key (target: the key and its owner), issue_many() one for
 * the batch, listing every key id, owner and hint.  The settings are those
 * checked, as issue()'s PL/pgSQL version recorded them.  The statements
 * are apikey._audit() and _audit_lock() inlined: a call of an SQL function
 * from a kept plan parses and plans its body again every time.  The chain
 * trigger on apikey.audit_log fills in the rest (sequence, time, actor,
 * hashes) and refuses the row outside the audit_context that the
 * function's SET clause gives it.
 */
static void
audit_keys(IssueSettings *s, Datum *owners, NewKey *keys, int n, bool many)
{
	static SPIPlanPtr plans[2];
	Oid			argtypes[13] = {INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTARRAYOID,
		TIMESTAMPTZOID, JSONBOID, INT4OID, INTERVALOID, INT8OID, INTERVALOID, CIDRARRAYOID};
	static const int settings[] = {KP_NAME, KP_PREFIX, -1, -1, KP_EXPIRES_AT, KP_METADATA,
		KP_RATE_LIMIT, KP_RATE_WINDOW, KP_QUOTA, KP_QUOTA_REFILL, KP_ALLOWED_CIDRS};
	Datum		values[13];
	char		nulls[13];
	int			rc;

	for (int a = 2; a < 13; a++)
	{
		int			kp = settings[a - 2];

		values[a] = kp < 0 ? (Datum) 0 : s->values[kp];
		nulls[a] = kp < 0 ? ' ' : s->nulls[kp];
	}
	values[5] = PointerGetDatum(s->scopes ? s->scopes : construct_empty_array(TEXTOID));
	nulls[0] = nulls[1] = ' ';
	if (!many)
	{
		values[0] = Int64GetDatum(keys[0].key_id);
		values[1] = owners[0];
		values[4] = CStringGetTextDatum(keys[0].hint);
	}
	else
	{
		Datum	   *ids = palloc(sizeof(Datum) * n);
		Datum	   *hints = palloc(sizeof(Datum) * n);

		for (int i = 0; i < n; i++)
		{
			ids[i] = Int64GetDatum(keys[i].key_id);
			hints[i] = CStringGetTextDatum(keys[i].hint);
		}
		argtypes[0] = INT8ARRAYOID;
		argtypes[1] = argtypes[4] = TEXTARRAYOID;
		values[0] = PointerGetDatum(construct_array(ids, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
		values[1] = PointerGetDatum(construct_array(owners, n, TEXTOID, -1, false, TYPALIGN_INT));
		values[4] = PointerGetDatum(construct_array(hints, n, TEXTOID, -1, false, TYPALIGN_INT));
	}
#define AUDIT_INSERT \
	"INSERT INTO apikey.audit_log (action, target_key_id, target_owner, details) "
#define AUDIT_SETTINGS \
	"'name', $3, 'prefix', $4, 'scopes', $6, 'expires_at', $7, 'metadata', $8, " \
	"'rate_limit', $9, 'rate_window', $10, 'quota', $11, 'quota_refill', $12, " \
	"'allowed_cidrs', $13"
	rc = SPI_execute_plan(apikey_prepare_kept(&plans[many], many ?
											  AUDIT_INSERT "VALUES ('issue_many', NULL, NULL, "
											  "pg_catalog.jsonb_build_object('key_ids', $1, 'owners', $2, "
											  "'hints', $5, " AUDIT_SETTINGS "))" :
											  AUDIT_INSERT "VALUES ('issue', $1, $2, "
											  "pg_catalog.jsonb_build_object('hint', $5, " AUDIT_SETTINGS "))",
											  13, argtypes),
						  values, nulls, false, 0);
#undef AUDIT_SETTINGS
#undef AUDIT_INSERT
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "audit row insert failed: %s", SPI_result_code_string(rc));
}

/*
 * Write n new keys of the given owners with their scope grants, then their
 * quota rows if they have a quota, then the audit row; sets their ids.
 * Refused past an owner's max_keys (apikey.owners), checked under the
 * owner's row lock.
 * The audit head's row lock comes first, as in every administrative
 * function, so that they all queue on one lock and never deadlock.
 * Nothing runs on a table that gets no row.
 */
static void
write_keys(IssueSettings *s, Datum *owners, NewKey *keys, int n, bool many)
{
	static SPIPlanPtr audit_lock_plan = NULL;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute_plan(apikey_prepare_kept(&audit_lock_plan,
											 "SELECT FROM apikey.audit_head FOR UPDATE", 0, NULL),
						 NULL, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "audit lock failed");
	apikey_owner_admit(owners, n, 0);	/* max_keys: ownerlimits.c */
	insert_keys(s, owners, keys, n);
	if (s->has_quota)
		insert_quotas(s, keys, n);
	audit_keys(s, owners, keys, n, many);
	SPI_finish();
}

/* Return the new keys as SETOF apikey.new_key (key_id, token), in order. */
static void
return_keys(FunctionCallInfo fcinfo, NewKey *keys, int n)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < n; i++)
	{
		Datum		values[2];
		bool		nulls[2] = {false, false};
		text	   *token = cstring_to_text_with_len(keys[i].token, keys[i].token_len);

		values[0] = Int64GetDatum(keys[i].key_id);
		values[1] = PointerGetDatum(token);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		explicit_bzero(VARDATA(token), keys[i].token_len);
		pfree(token);
	}
}

/*
 * apikey.issue(owner text, scopes text[], name text, expires_at timestamptz,
 *				prefix text, metadata jsonb, rate_limit integer,
 *				rate_window interval, quota bigint, quota_refill interval,
 *				allowed_cidrs cidr[]) RETURNS SETOF apikey.new_key
 */
void
apikey_issue_one(FunctionCallInfo fcinfo)
{
	IssueSettings s;
	NewKey		key;
	Datum		owner;

	check_owner(PG_ARGISNULL(0) ? NULL : PG_GETARG_TEXT_PP(0), PG_GET_COLLATION(), 0);
	owner = PG_GETARG_DATUM(0);
	check_settings(fcinfo, &s);
	new_tokens(&s, &key, 1);
	write_keys(&s, &owner, &key, 1, false);
	return_keys(fcinfo, &key, 1);
	explicit_bzero(&key, sizeof(key));
}

/*
 * apikey.issue_many(owners text[], ...the rest as issue()...) RETURNS SETOF
 * apikey.new_key: one key per element of owners, in order, all with the
 * same settings.  The owners are checked first, then the settings once.
 */
void
apikey_issue_batch(FunctionCallInfo fcinfo)
{
	ArrayType  *arr;
	Datum	   *owners;
	bool	   *onulls;
	int			n;
	IssueSettings s;
	NewKey	   *keys;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("owners must not be NULL"),
				 errhint("Pass an array with one owner per key to issue.")));
	arr = PG_GETARG_ARRAYTYPE_P(0);
	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("owners must be a one-dimensional array"),
				 errhint("Pass an array with one owner per key to issue.")));
	n = ArrayGetNItems(ARR_NDIM(arr), ARR_DIMS(arr));
	if (n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("owners must not be empty"),
				 errhint("Pass an array with one owner per key to issue.")));
	if (n > APIKEY_ISSUE_MANY_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("too many owners (%d)", n),
				 errdetail("apikey.issue_many() issues at most %d keys per call.", APIKEY_ISSUE_MANY_MAX),
				 errhint("Split the owners into calls of at most %d.", APIKEY_ISSUE_MANY_MAX)));
	deconstruct_array(arr, TEXTOID, -1, false, TYPALIGN_INT, &owners, &onulls, &n);
	for (int i = 0; i < n; i++)
	{
		int			elem = ARR_LBOUND(arr)[0] + i;

		if (onulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("owners must not contain NULL"),
					 errdetail("owners[%d] is NULL.", elem),
					 errhint("Pass the tenant, user or application each key acts for.")));
		owners[i] = PointerGetDatum(PG_DETOAST_DATUM_PACKED(owners[i]));
		check_owner(DatumGetTextPP(owners[i]), PG_GET_COLLATION(), elem);
	}
	check_settings(fcinfo, &s);

	keys = palloc(sizeof(NewKey) * n);
	new_tokens(&s, keys, n);
	write_keys(&s, owners, keys, n, true);
	return_keys(fcinfo, keys, n);
	explicit_bzero(keys, sizeof(NewKey) * n);
	pfree(keys);
}
