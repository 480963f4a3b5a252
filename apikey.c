/*-------------------------------------------------------------------------
 *
 * apikey.c
 *	  The front door of the apikey extension: module magic, _PG_init (a
 *	  table of contents), and every SQL-callable function.  The work is
 *	  done by the modules under src/ (see src/apikey.h for the map); each
 *	  defines its own settings.
 *
 * Without shared_preload_libraries the extension still works: keys are
 * issued, verified, cached and bound to transactions as usual, usage is
 * appended to apikey.usage_pending in the caller's transaction (folded into
 * usage_log by apikey.flush_usage()), and a key with a rate limit is
 * refused with rate_limit_unavailable, never allowed unlimited.  Only if
 * log_statement had already logged the statement that loaded the library
 * does that backend refuse to verify tokens (src/redact.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/detoast.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "access/htup_details.h"
#include "commands/trigger.h"
#include "common/cryptohash.h"
#include "common/sha2.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/supportnodes.h"
#include "port/atomics.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "compat.h"
#include "apikey.h"
#include "token.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/*
 * Each module defines its own settings and hooks; those that size shared
 * memory exist only when preloaded.
 */
void
_PG_init(void)
{
	/* every backend */
	apikey_keycache_init();		/* apikey.cache_size */
	apikey_binding_init();		/* apikey.binding and its guards,
								 * apikey.allow_session_binding */
	apikey_redact_init();		/* apikey.redact_logs, log and utility hooks */
	apikey_worker_init();		/* apikey.usage_flush_interval,
								 * apikey.databases */
	apikey_keystore_init();		/* invalidation callbacks */
	apikey_audit_init();		/* apikey.actor, apikey.audit_context */
	apikey_networks_init();		/* apikey.network_prefix_v4, _v6, _retention;
								 * preloaded: _max_entries */
	apikey_canary_init();		/* invalidation callback */
	apikey_detector_init();		/* apikey.detect_interval */
	apikey_events_init();		/* apikey.events_interval, event_retention,
								 * unused_revoke_after */
	apikey_retention_init();	/* apikey.usage_retention, _hourly_, _daily_,
								 * _address_retention, retention_interval */
	apikey_legacy_init();		/* apikey.legacy_verify_per_second */

	/* only while shared_preload_libraries loads */
	apikey_usage_init();		/* apikey.usage_max_entries */
	apikey_ratelimit_init();	/* apikey.rate_limit_max_keys */
	apikey_failurelimit_init(); /* apikey.failure_limit, _window, _exempt,
								 * _max_networks */
	MarkGUCPrefixReserved("apikey");

	if (!process_shared_preload_libraries_in_progress)
		return;
	apikey_shmem_init();
	apikey_worker_register();
}

/* A text argument as quoted in an error message (see verdict.c) */
static inline char *
clip_for_message(text *t)
{
	return apikey_clip_for_message(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
}

/*
 * A token argument, or NULL when it is NULL or too long to be a token.  The
 * length test reads the toast header only, so a megabyte of garbage is
 * never detoasted.
 */
static text *
token_arg(FunctionCallInfo fcinfo, int argno)
{
	if (PG_ARGISNULL(argno))
		return NULL;
	if (toast_raw_datum_size(PG_GETARG_DATUM(argno)) > VARHDRSZ + APIKEY_TOKEN_MAXLEN)
		return NULL;
	return PG_GETARG_TEXT_PP(argno);
}

static inline text *
text_arg_or_null(FunctionCallInfo fcinfo, int argno)
{
	return (PG_NARGS() > argno && !PG_ARGISNULL(argno)) ? PG_GETARG_TEXT_PP(argno) : NULL;
}

static inline inet *
inet_arg_or_null(FunctionCallInfo fcinfo, int argno)
{
	return (PG_NARGS() > argno && !PG_ARGISNULL(argno)) ? PG_GETARG_INET_PP(argno) : NULL;
}

/*
 * apikey.hash(token text) RETURNS bytea
 */
PG_FUNCTION_INFO_V1(apikey_hash);
Datum
apikey_hash(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);

	PG_RETURN_BYTEA_P(apikey_sha256_bytea(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t)));
}

/*
 * apikey._token_hash(token text) RETURNS bytea: the hash of a well-formed
 * token, for revoke_token().  Raises for anything else.
 */
PG_FUNCTION_INFO_V1(apikey_token_hash);
Datum
apikey_token_hash(PG_FUNCTION_ARGS)
{
	text	   *t = token_arg(fcinfo, 0);
	size_t		prefix_len;

	if (t == NULL ||
		apikey_token_parse(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t), &prefix_len) != APIKEY_PARSE_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("token is malformed"),
				 errhint("Pass the whole token as issued, e.g. ak_ followed by 49 letters and digits.")));
	PG_RETURN_BYTEA_P(apikey_sha256_bytea(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t)));
}

/*
 * apikey._new_token(prefix text, OUT token text, OUT hash bytea, OUT hint text)
 */
PG_FUNCTION_INFO_V1(apikey_new_token);
Datum
apikey_new_token(PG_FUNCTION_ARGS)
{
	text	   *prefix = PG_GETARG_TEXT_PP(0);
	size_t		plen = VARSIZE_ANY_EXHDR(prefix);
	uint8		secret[APIKEY_SECRET_BYTES];
	char		token[APIKEY_TOKEN_MAXLEN + 1];
	char		hint[APIKEY_HINT_MAXLEN];
	TupleDesc	tupdesc;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};
	size_t		len;

	if (!apikey_prefix_is_valid(VARDATA_ANY(prefix), plen))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid token prefix \"%s\"", clip_for_message(prefix)),
				 errhint("A prefix is 1 to 16 characters: a lowercase letter, then lowercase letters, digits or underscores.")));
	if (!pg_strong_random(secret, sizeof(secret)))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random bytes for a token")));
	if (!apikey_token_build(VARDATA_ANY(prefix), plen, secret, token, sizeof(token)))
		elog(ERROR, "token build failed for a valid prefix");
	explicit_bzero(secret, sizeof(secret));
	len = strlen(token);
	apikey_token_hint(token, len, plen, hint);

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	values[0] = PointerGetDatum(cstring_to_text_with_len(token, len));
	values[1] = PointerGetDatum(apikey_sha256_bytea(token, len));
	values[2] = CStringGetTextDatum(hint);
	explicit_bzero(token, sizeof(token));
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}

/* A bytea argument that must be a SHA-256 (internal callers only). */
static const uint8 *
hash_arg(FunctionCallInfo fcinfo, int argno)
{
	bytea	   *b;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("a key hash must not be NULL")));
	b = PG_GETARG_BYTEA_PP(argno);

	if (VARSIZE_ANY_EXHDR(b) != APIKEY_HASH_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a key hash is %d bytes, got %d",
						APIKEY_HASH_LEN, (int) VARSIZE_ANY_EXHDR(b))));
	return (const uint8 *) VARDATA_ANY(b);
}

/*
 * apikey._rate_state_copy(from_id bigint, from_hash bytea, to_id bigint,
 *						   to_hash bytea) RETURNS void: rotate()'s new key
 * starts from the old key's rate-limit bucket.
 */
PG_FUNCTION_INFO_V1(apikey_rate_state_copy);
Datum
apikey_rate_state_copy(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0) || PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("key ids must not be NULL")));
	apikey_ratelimit_copy(PG_GETARG_INT64(0), hash_arg(fcinfo, 1),
						  PG_GETARG_INT64(2), hash_arg(fcinfo, 3));
	PG_RETURN_VOID();
}

/*
 * apikey._throttle(key_id bigint, hash bytea, rate_limit integer,
 *					until timestamptz) RETURNS void: throttle() after its
 * checks; active from this transaction's commit.
 */
PG_FUNCTION_INFO_V1(apikey_throttle);
Datum
apikey_throttle(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0) || PG_ARGISNULL(2) || PG_ARGISNULL(3))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("key id, rate limit and end must not be NULL")));
	if (PG_GETARG_INT32(2) <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("rate_limit must be positive")));
	apikey_throttle_set(PG_GETARG_INT64(0), hash_arg(fcinfo, 1), PG_GETARG_INT32(2),
						PG_GETARG_TIMESTAMPTZ(3));
	PG_RETURN_VOID();
}

/*
 * apikey._acting_role() RETURNS name: the role the session acts as (its
 * login role or SET ROLE), ignoring SECURITY DEFINER functions in between.
 */
PG_FUNCTION_INFO_V1(apikey_acting_role);
Datum
apikey_acting_role(PG_FUNCTION_ARGS)
{
	char	   *name = GetUserNameFromId(GetOuterUserId(), false);

	PG_RETURN_DATUM(DirectFunctionCall1(namein, CStringGetDatum(name)));
}

static Datum
scopes_datum(const ApikeyKey *key)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(key->nscopes, 1));
	int			i;

	for (i = 0; i < key->nscopes; i++)
		elems[i] = CStringGetTextDatum(key->scopes[i]);
	return PointerGetDatum(construct_array(elems, key->nscopes, TEXTOID, -1,
										   false, TYPALIGN_INT));
}

/*
 * apikey.check(token text, scope text, client_addr inet) RETURNS apikey.verdict
 */
PG_FUNCTION_INFO_V1(apikey_check);
Datum
apikey_check(PG_FUNCTION_ARGS)
{
	ApikeyVerdict v;
	TupleDesc	tupdesc = (TupleDesc) fcinfo->flinfo->fn_extra;
	Datum		values[9];
	bool		nulls[9];

	apikey_redact_require_early_load();
	apikey_verify(token_arg(fcinfo, 0), text_arg_or_null(fcinfo, 1),
				  inet_arg_or_null(fcinfo, 2), &v);

	if (tupdesc == NULL)
	{
		MemoryContext oldcxt = MemoryContextSwitchTo(fcinfo->flinfo->fn_mcxt);

		if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
			elog(ERROR, "return type must be a row type");
		tupdesc = BlessTupleDesc(CreateTupleDescCopy(tupdesc));
		fcinfo->flinfo->fn_extra = tupdesc;
		MemoryContextSwitchTo(oldcxt);
	}

	memset(nulls, true, sizeof(nulls));
	values[0] = BoolGetDatum(v.code == APIKEY_VALID);
	nulls[0] = false;
	values[1] = CStringGetTextDatum(apikey_verdict_name(v.code));
	nulls[1] = false;
	if (v.key != NULL)
	{
		values[2] = Int64GetDatum(v.key->key_id);
		nulls[2] = false;
		values[3] = CStringGetTextDatum(v.key->owner);
		nulls[3] = false;
		values[4] = scopes_datum(v.key);
		nulls[4] = false;
		if (v.key->has_expiry)
		{
			values[5] = TimestampTzGetDatum(v.key->expires_at);
			nulls[5] = false;
		}
	}
	if (v.has_remaining)
	{
		values[6] = Int64GetDatum(v.remaining);
		nulls[6] = false;
	}
	if (v.has_retry_after)
	{
		values[7] = apikey_interval_datum(v.retry_after);
		nulls[7] = false;
	}
	if (apikey_limited_by_name(v.limited_by) != NULL)
	{
		values[8] = CStringGetTextDatum(apikey_limited_by_name(v.limited_by));
		nulls[8] = false;
	}
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*
 * apikey.verify(token text, scope text, client_addr inet) RETURNS boolean
 */
PG_FUNCTION_INFO_V1(apikey_verify_token);
Datum
apikey_verify_token(PG_FUNCTION_ARGS)
{
	ApikeyVerdict v;

	apikey_redact_require_early_load();
	apikey_verify(token_arg(fcinfo, 0), text_arg_or_null(fcinfo, 1),
				  inet_arg_or_null(fcinfo, 2), &v);
	PG_RETURN_BOOL(v.code == APIKEY_VALID);
}

/*
 * apikey.authenticate(token text, scope text, client_addr inet,
 *					   session boolean) RETURNS bigint
 */
PG_FUNCTION_INFO_V1(apikey_authenticate);
Datum
apikey_authenticate(PG_FUNCTION_ARGS)
{
	ApikeyVerdict v;
	text	   *scope = text_arg_or_null(fcinfo, 1);
	bool		session = !PG_ARGISNULL(3) && PG_GETARG_BOOL(3);

	apikey_redact_require_early_load();
	apikey_binding_check_kind(session);
	apikey_verify(token_arg(fcinfo, 0), scope, inet_arg_or_null(fcinfo, 2), &v);
	if (v.code != APIKEY_VALID)
		apikey_verdict_report(&v, (v.code == APIKEY_SCOPE_DENIED ||
								   v.code == APIKEY_QUARANTINED) ?
							  clip_for_message(scope) : NULL);
	apikey_binding_set(v.key, session);
	PG_RETURN_INT64(v.key->key_id);
}

/*
 * apikey.logout() RETURNS void
 */
PG_FUNCTION_INFO_V1(apikey_logout);
Datum
apikey_logout(PG_FUNCTION_ARGS)
{
	apikey_binding_clear();
	PG_RETURN_VOID();
}

/*
 * apikey.current_key_id() RETURNS bigint
 */
PG_FUNCTION_INFO_V1(apikey_current_key_id);
Datum
apikey_current_key_id(PG_FUNCTION_ARGS)
{
	int64		key_id;

	if (!apikey_binding_get(&key_id, NULL, NULL, NULL))
		PG_RETURN_NULL();
	PG_RETURN_INT64(key_id);
}

/*
 * apikey.current_owner() RETURNS text
 */
PG_FUNCTION_INFO_V1(apikey_current_owner);
Datum
apikey_current_owner(PG_FUNCTION_ARGS)
{
	const char *owner;

	if (!apikey_binding_get(NULL, &owner, NULL, NULL))
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(owner));
}

/* Does the bound key hold the scope in argument 0? */
static bool
bound_key_has_scope(FunctionCallInfo fcinfo)
{
	char	   *const *scopes;
	int			nscopes;
	text	   *want;

	if (PG_ARGISNULL(0) || !apikey_binding_get(NULL, NULL, &scopes, &nscopes))
		return false;
	want = PG_GETARG_TEXT_PP(0);
	return apikey_scope_granted(scopes, nscopes, VARDATA_ANY(want),
								VARSIZE_ANY_EXHDR(want));
}

/*
 * apikey.has_scope(scope text) RETURNS boolean
 */
PG_FUNCTION_INFO_V1(apikey_has_scope);
Datum
apikey_has_scope(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(bound_key_has_scope(fcinfo));
}

/*
 * apikey.require_scope(scope text) RETURNS void
 */
PG_FUNCTION_INFO_V1(apikey_require_scope);
Datum
apikey_require_scope(PG_FUNCTION_ARGS)
{
	if (!bound_key_has_scope(fcinfo))
	{
		const char *scope = PG_ARGISNULL(0) ? "(null)" : clip_for_message(PG_GETARG_TEXT_PP(0));

		if (!apikey_binding_get(NULL, NULL, NULL, NULL))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("scope \"%s\" is required, but no API key is bound", scope),
					 errhint("Call apikey.authenticate(token) first in this transaction.")));
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("API key lacks scope \"%s\"", scope)));
	}
	PG_RETURN_VOID();
}

/*
 * apikey._helper_support(internal): planner support for the helpers, which
 * evaluates them once per statement instead of once per row.
 */
PG_FUNCTION_INFO_V1(apikey_helper_support);
Datum
apikey_helper_support(PG_FUNCTION_ARGS)
{
	Node	   *req = (Node *) PG_GETARG_POINTER(0);

	if (IsA(req, SupportRequestSimplify))
		PG_RETURN_POINTER(apikey_support_simplify((SupportRequestSimplify *) req));
	PG_RETURN_POINTER(NULL);
}

/*
 * apikey._owner_admit(owner text, replacing bigint) RETURNS void: refuse
 * the key that replaces key replacing past the owner's max_keys.
 */
PG_FUNCTION_INFO_V1(apikey_owner_admit_keys);
Datum
apikey_owner_admit_keys(PG_FUNCTION_ARGS)
{
	Datum		owner;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("owner must not be NULL")));
	owner = PointerGetDatum(PG_GETARG_TEXT_PP(0));
	apikey_owner_admit(&owner, 1, PG_ARGISNULL(1) ? 0 : PG_GETARG_INT64(1));
	PG_RETURN_VOID();
}

/*
 * apikey._invalidate(): statement trigger on the key tables.
 */
PG_FUNCTION_INFO_V1(apikey_invalidate);
Datum
apikey_invalidate(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("apikey._invalidate() must be called as a trigger")));
	apikey_keystore_invalidate_all();
	return PointerGetDatum(NULL);
}

/*
 * apikey._key_changed(): AFTER row trigger on keys, key_scopes and
 * revocations; records which keys the transaction changed (invalidation.c).
 */
PG_FUNCTION_INFO_V1(apikey_key_changed);
Datum
apikey_key_changed(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo) || !TRIGGER_FIRED_FOR_ROW(td->tg_event) ||
		!TRIGGER_FIRED_AFTER(td->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("apikey._key_changed() must be called as an AFTER ... FOR EACH ROW trigger")));
	apikey_inval_key_changed(td);
	return PointerGetDatum(NULL);
}

/*
 * apikey._live_usage(): this database's counters not yet in usage_log.
 */
PG_FUNCTION_INFO_V1(apikey_live_usage);
Datum
apikey_live_usage(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	apikey_usage_list(rsinfo->setResult, rsinfo->setDesc);
	return (Datum) 0;
}

/*
 * apikey._canary_uses(): canary uses recorded in shared memory and not yet
 * filed, for the detector's pass (canary.c); they count as filed when the
 * calling transaction commits.
 */
PG_FUNCTION_INFO_V1(apikey_canary_uses_srf);
Datum
apikey_canary_uses_srf(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	apikey_canary_uses(rsinfo->setResult, rsinfo->setDesc);
	return (Datum) 0;
}

/*
 * apikey._network_failures(since timestamptz): failures per client network
 * since then, at most an hour back (netwatch.c; rule address_failures).
 */
PG_FUNCTION_INFO_V1(apikey_network_failures);
Datum
apikey_network_failures(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	if (!PG_ARGISNULL(0))
		apikey_netwatch_list(PG_GETARG_TIMESTAMPTZ(0), rsinfo->setResult, rsinfo->setDesc);
	return (Datum) 0;
}

/*
 * apikey._stats(): the live counters behind the apikey.stats view.
 */
PG_FUNCTION_INFO_V1(apikey_stats);
Datum
apikey_stats(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[9];
	bool		nulls[9];
	StringInfoData buf;
	ApikeyStats st;
	int			i;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	memset(nulls, false, sizeof(nulls));
	/* first: counting what is pending gathers the backends' counts */
	values[6] = Int64GetDatum(apikey_usage_pending());
	values[0] = BoolGetDatum(apikey_stats_read(&st));
	if (!DatumGetBool(values[0]))
	{
		for (i = 1; i < 9; i++)
			nulls[i] = true;
	}
	else
	{
		initStringInfo(&buf);
		appendStringInfoChar(&buf, '{');
		for (i = 0; i < APIKEY_NUM_CODES; i++)
			appendStringInfo(&buf, "%s\"%s\": " UINT64_FORMAT, i ? ", " : "",
							 apikey_verdict_name(i), st.calls[i]);
		appendStringInfoChar(&buf, '}');
		values[1] = DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data));
		values[2] = Int64GetDatum(st.calls[APIKEY_RATE_LIMITED]);
		values[3] = Int64GetDatum(st.flushes);
		values[4] = Int64GetDatum(st.flush_errors);
		values[5] = Int64GetDatum(st.flushed_calls);
		values[7] = Int64GetDatum(st.usage_dropped);
		values[8] = TimestampTzGetDatum(st.last_flush);
		nulls[8] = (st.last_flush == 0);
	}
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}

/*
 * apikey._stats_by_code(): verifications per verdict code since the server
 * started, one row per code of the verdict table.
 */
PG_FUNCTION_INFO_V1(apikey_stats_by_code);
Datum
apikey_stats_by_code(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	ApikeyStats st;
	bool		shared;
	int			c;

	InitMaterializedSRF(fcinfo, 0);
	shared = apikey_stats_read(&st);
	for (c = 0; c < APIKEY_NUM_CODES; c++)
	{
		Datum		values[2];
		bool		nulls[2] = {false, !shared};

		values[0] = CStringGetTextDatum(apikey_verdict_name(c));
		values[1] = shared ? Int64GetDatum((int64) st.calls[c]) : (Datum) 0;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * apikey._writer_heartbeat(): when the usage writer last finished a flush
 * round, empty or failed ones included; NULL if it never has, or without
 * shared memory.
 */
PG_FUNCTION_INFO_V1(apikey_writer_heartbeat);
Datum
apikey_writer_heartbeat(PG_FUNCTION_ARGS)
{
	ApikeyStats st;

	if (!apikey_stats_read(&st) || st.heartbeat == 0)
		PG_RETURN_NULL();
	PG_RETURN_TIMESTAMPTZ(st.heartbeat);
}

/*
 * apikey._tokens_redacted(): token-shaped spans the log redactor hid since
 * the server started (the tokens_redacted column of apikey.stats); NULL
 * without shared memory.
 */
PG_FUNCTION_INFO_V1(apikey_tokens_redacted);
Datum
apikey_tokens_redacted(PG_FUNCTION_ARGS)
{
	ApikeyStats st;

	if (!apikey_stats_read(&st))
		PG_RETURN_NULL();
	PG_RETURN_INT64((int64) st.tokens_redacted);
}

/*
 * apikey._failure_networks_untracked(): failure claims on client networks
 * the failure limiter had no room to track, so did not limit, since the
 * server started (a column of apikey.stats); NULL without shared memory.
 */
PG_FUNCTION_INFO_V1(apikey_failure_networks_untracked);
Datum
apikey_failure_networks_untracked(PG_FUNCTION_ARGS)
{
	ApikeyStats st;

	if (!apikey_stats_read(&st))
		PG_RETURN_NULL();
	PG_RETURN_INT64((int64) st.failure_untracked);
}

/*
 * apikey._network_overflow(): successes not recorded in key_networks since
 * the server started, for want of room in shared memory (a column of
 * apikey.stats); NULL without shared memory.
 */
PG_FUNCTION_INFO_V1(apikey_network_overflow);
Datum
apikey_network_overflow(PG_FUNCTION_ARGS)
{
	ApikeyStats st;

	if (!apikey_stats_read(&st))
		PG_RETURN_NULL();
	PG_RETURN_INT64((int64) st.network_overflow);
}

/*
 * apikey._failure_networks_unwatched(): failures the detector's
 * failures-by-network table had no room to count, since the server started
 * (a column of apikey.stats); NULL without shared memory.
 */
PG_FUNCTION_INFO_V1(apikey_failure_networks_unwatched);
Datum
apikey_failure_networks_unwatched(PG_FUNCTION_ARGS)
{
	ApikeyStats st;

	if (!apikey_stats_read(&st))
		PG_RETURN_NULL();
	PG_RETURN_INT64((int64) st.failure_unwatched);
}

/*
 * apikey._network_of(addr): the network key_networks records addr under
 * (apikey.network_prefix_v4 / _v6; IPv4-mapped IPv6 in IPv4 form).
 */
PG_FUNCTION_INFO_V1(apikey_network_of_sql);
Datum
apikey_network_of_sql(PG_FUNCTION_ARGS)
{
	/* not STRICT: a NULL call still checks EXECUTE (no constant folding) */
	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	PG_RETURN_INET_P(apikey_network_of(PG_GETARG_INET_PP(0)));
}

/*
 * apikey.cache_stats(): this backend's key cache.
 */
PG_FUNCTION_INFO_V1(apikey_cache_stats);
Datum
apikey_cache_stats(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	ApikeyCacheStats stats;
	Datum		values[6];
	bool		nulls[6] = {false, false, false, false, false, false};

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	apikey_keycache_stats(&stats);
	values[0] = Int64GetDatum(stats.entries);
	values[1] = Int32GetDatum(stats.capacity);
	values[2] = Int64GetDatum(stats.hits);
	values[3] = Int64GetDatum(stats.misses);
	values[4] = Int64GetDatum(stats.evictions);
	values[5] = Int64GetDatum(stats.invalidations);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}

/*
 * apikey.flush_usage() away from the writer: fold pending rows as owner,
 * and apply recorded legacy upgrades (which never fails the flush) only
 * outside a transaction block: an upgrade locks its key row as an update
 * of keys.hash does, which a revoke() waits for, so it must end with the
 * statement rather than with whatever the caller does next.
 */
static void
fold_as_owner(void *arg)
{
	*(int *) arg = apikey_usage_fold_pending();
	if (!IsTransactionBlock())
		(void) apikey_legacy_upgrades_apply();
}

/*
 * apikey.flush_usage() RETURNS integer
 *
 * Where the usage writer serves, it is asked to flush and waited for, so
 * this transaction holds nothing of the flush; elsewhere the pending rows
 * are folded here, without waiting for another session that is folding.
 */
PG_FUNCTION_INFO_V1(apikey_flush_usage);
Datum
apikey_flush_usage(PG_FUNCTION_ARGS)
{
	int			rows = 0;

	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("cannot flush usage during recovery"),
				 errdetail("Usage counted on a standby is shown by apikey.live_usage and is not persisted."),
				 errhint("Call apikey.flush_usage() on the primary.")));
	if (apikey_usage_in_shmem())
		rows = apikey_flushers_request_flush(MyDatabaseId);
	else
	{
		apikey_run_as_owner(fold_as_owner, &rows);
		if (rows < 0)
		{
			ereport(NOTICE,
					(errmsg("another session is flushing the usage of this database"),
					 errhint("Its rows are written when its transaction commits.")));
			rows = 0;
		}
	}
	PG_RETURN_INT32(rows);
}

/*
 * apikey._rate_limit_state(): this database's rate-limit buckets in shared
 * memory, read without taking anything (behind apikey.rate_limit_state).
 */
PG_FUNCTION_INFO_V1(apikey_rate_limit_state);
Datum
apikey_rate_limit_state(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	apikey_ratelimit_list(rsinfo->setResult, rsinfo->setDesc);
	return (Datum) 0;
}

/*
 * apikey._retention_settings(): the retention settings as intervals, read
 * from C so that they are defined (and were checked) in this backend even
 * when apikey is not preloaded.
 */
PG_FUNCTION_INFO_V1(apikey_retention_settings_sql);
Datum
apikey_retention_settings_sql(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, false};
	int64		secs[4];
	int			i;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	apikey_retention_settings(secs);
	for (i = 0; i < 4; i++)
		values[i] = apikey_interval_datum(secs[i] * USECS_PER_SEC);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}

/*
 * apikey.issue(owner text, scopes text[], name text, expires_at timestamptz,
 *				prefix text, metadata jsonb, rate_limit integer,
 *				rate_window interval, quota bigint, quota_refill interval,
 *				allowed_cidrs cidr[]) RETURNS SETOF apikey.new_key (issue.c)
 */
PG_FUNCTION_INFO_V1(apikey_issue);
Datum
apikey_issue(PG_FUNCTION_ARGS)
{
	apikey_issue_one(fcinfo);
	return (Datum) 0;
}

/*
 * apikey.issue_many(owners text[], ...the rest as issue()...) RETURNS SETOF
 * apikey.new_key: one key per owner, in order, all with the same settings.
 */
PG_FUNCTION_INFO_V1(apikey_issue_many);
Datum
apikey_issue_many(PG_FUNCTION_ARGS)
{
	apikey_issue_batch(fcinfo);
	return (Datum) 0;
}

/*
 * apikey._check_scopes(scopes text[]) RETURNS text[]: the checked grants
 * without duplicates (set_limits and earlier callers).
 */
PG_FUNCTION_INFO_V1(apikey_check_scopes);
Datum
apikey_check_scopes(PG_FUNCTION_ARGS)
{
	PG_RETURN_ARRAYTYPE_P(apikey_scopes_checked(PG_ARGISNULL(0) ? NULL : PG_GETARG_ARRAYTYPE_P(0)));
}

/*
 * apikey._check_limits(rate_limit integer, rate_window interval,
 *						quota bigint, quota_refill interval) RETURNS void
 */
PG_FUNCTION_INFO_V1(apikey_check_limits);
Datum
apikey_check_limits(PG_FUNCTION_ARGS)
{
	int32		rate_limit = PG_ARGISNULL(0) ? 0 : PG_GETARG_INT32(0);
	int64		quota = PG_ARGISNULL(2) ? 0 : PG_GETARG_INT64(2);

	apikey_limits_check(PG_ARGISNULL(0) ? NULL : &rate_limit,
						PG_ARGISNULL(1) ? NULL : PG_GETARG_INTERVAL_P(1),
						PG_ARGISNULL(2) ? NULL : &quota,
						PG_ARGISNULL(3) ? NULL : PG_GETARG_INTERVAL_P(3));
	PG_RETURN_VOID();
}

/* apikey._check_cidrs(allowed_cidrs cidr[]) RETURNS void */
PG_FUNCTION_INFO_V1(apikey_check_cidrs);
Datum
apikey_check_cidrs(PG_FUNCTION_ARGS)
{
	apikey_cidrs_check(PG_ARGISNULL(0) ? NULL : PG_GETARG_ARRAYTYPE_P(0));
	PG_RETURN_VOID();
}

/*
 * apikey._audit_hash(prev_hash bytea, seq bigint, at timestamptz,
 * xact xid8, action text, actor_role name, session_role name,
 * actor_key_id bigint, actor_claim text, client_addr inet,
 * application_name text, target_key_id bigint, target_owner text,
 * details jsonb) RETURNS bytea: an audit row's row_hash (audit.c).
 */
PG_FUNCTION_INFO_V1(apikey_audit_hash);
Datum
apikey_audit_hash(PG_FUNCTION_ARGS)
{
	Assert(PG_NARGS() == APIKEY_AUDIT_FIELDS);
	PG_RETURN_BYTEA_P(apikey_audit_row_hash(fcinfo->args));
}

/*
 * apikey._audit_context() RETURNS text: the administrative function that
 * is running, or NULL outside one.
 */
PG_FUNCTION_INFO_V1(apikey_audit_context);
Datum
apikey_audit_context(PG_FUNCTION_ARGS)
{
	const char *name = apikey_audit_context_name();

	if (name == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(name));
}

/*
 * apikey._event_settings(OUT retention interval, OUT unused_revoke_after
 * interval): the events pass's settings (events.c), NULL when 0.
 */
PG_FUNCTION_INFO_V1(apikey_event_settings);
Datum
apikey_event_settings(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Interval   *retention = apikey_event_retention();
	Interval   *unused = apikey_unused_revoke_after();
	Datum		values[2];
	bool		nulls[2];

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	values[0] = PointerGetDatum(retention);
	nulls[0] = retention == NULL;
	values[1] = PointerGetDatum(unused);
	nulls[1] = unused == NULL;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}

/*
 * apikey._scan_tokens(body text) RETURNS TABLE (pos int, len int,
 * prefix text, hint text, hash bytea): every checksum-valid token in body
 * (leak.c).
 */
PG_FUNCTION_INFO_V1(apikey_scan_tokens);
Datum
apikey_scan_tokens(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	text	   *body;

	InitMaterializedSRF(fcinfo, 0);
	if (PG_ARGISNULL(0))
		return (Datum) 0;
	body = PG_GETARG_TEXT_PP(0);
	apikey_leak_scan(VARDATA_ANY(body), VARSIZE_ANY_EXHDR(body),
					 rsinfo->setResult, rsinfo->setDesc);
	return (Datum) 0;
}

/*
 * apikey._legacy_formats_changed(): statement trigger on legacy_formats
 * and legacy_keys; every backend reads the legacy formats in use again.
 */
PG_FUNCTION_INFO_V1(apikey_legacy_formats_changed_trigger);
Datum
apikey_legacy_formats_changed_trigger(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("apikey._legacy_formats_changed() must be called as a trigger")));
	apikey_legacy_formats_changed();
	return PointerGetDatum(NULL);
}

/*
 * apikey._legacy_hash(token): the stored hash of the key a legacy token
 * belongs to, NULL for none (report_leak() of a token from before apikey).
 */
PG_FUNCTION_INFO_V1(apikey_legacy_hash_sql);
Datum
apikey_legacy_hash_sql(PG_FUNCTION_ARGS)
{
	bytea	   *result;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	result = palloc(VARHDRSZ + APIKEY_HASH_LEN);
	SET_VARSIZE(result, VARHDRSZ + APIKEY_HASH_LEN);
	if (!apikey_legacy_key_hash(PG_GETARG_TEXT_PP(0), (uint8 *) VARDATA(result)))
		PG_RETURN_NULL();
	PG_RETURN_BYTEA_P(result);
}

/*
 * apikey.legacy_stats(): legacy verifications and upgrades since the
 * server started (this backend's only, without shared memory).
 */
PG_FUNCTION_INFO_V1(apikey_legacy_stats);
Datum
apikey_legacy_stats(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	ApikeyLegacyStats st;
	Datum		values[6];
	bool		nulls[6] = {0};

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	values[5] = BoolGetDatum(apikey_legacy_stats_read(&st));
	values[0] = Int64GetDatum((int64) st.verified);
	values[1] = Int64GetDatum((int64) st.mismatched);
	values[2] = Int64GetDatum((int64) st.refused);
	values[3] = Int64GetDatum((int64) st.upgraded);
	values[4] = Int64GetDatum((int64) st.deferred);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}
