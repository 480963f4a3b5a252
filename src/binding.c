/*-------------------------------------------------------------------------
 *
 * binding.c
 *	  The key bound to the transaction (or session) by apikey.authenticate,
 *	  read by current_key_id(), current_owner(), has_scope() and
 *	  require_scope() from row-level security policies.
 *
 * The binding is the value of the GUC apikey.binding, which only this file
 * can set:
 *
 *	 - Its check hook refuses every value unless authenticate()/logout() is
 *	   the caller (binding_in_progress) or a parallel worker is restoring the
 *	   leader's state.  SET, SET LOCAL, set_config(), ALTER ROLE/DATABASE
 *	   SET, connection options and SET clauses of functions all go through
 *	   the check hook, so none of them can bind, change or clear a key; this
 *	   holds for superusers too.
 *	 - It is PGC_SUSET, so RESET by an ordinary role is refused; it is
 *	   GUC_NO_RESET_ALL, so RESET ALL leaves it alone; DISCARD ALL ends a
 *	   session binding through our ProcessUtility hook.
 *	 - It is GUC_SUPERUSER_ONLY and GUC_NO_SHOW_ALL: ordinary roles cannot
 *	   read it with SHOW or current_setting(), only through the helpers.
 *
 * Using a GUC buys three things at once:
 *	 - a transaction binding is a SET LOCAL, so it ends with the transaction
 *	   (commit or rollback) and a rolled-back savepoint restores whatever
 *	   binding was in force before it, exactly like any other setting;
 *	 - parallel workers receive the leader's GUC state, so the helpers are
 *	   PARALLEL SAFE and policies using them still allow parallel scans;
 *	 - the parsed form lives in the GUC's "extra" and is swapped by the
 *	   assign hook, so a helper call is a pointer read.
 *
 *	 - RESET apikey.binding and SET apikey.binding TO DEFAULT skip check
 *	   hooks, so our ProcessUtility hook refuses them (PostgreSQL 16+ also
 *	   has GUC_NO_RESET).  On 15, set_config('apikey.binding', NULL, ...)
 *	   by a superuser (or a role explicitly granted SET on the parameter)
 *	   can still clear a binding, never forge one.
 *
 * Kinds.  A binding is a transaction binding (written with GUC_ACTION_LOCAL,
 * so it ends with its transaction) or a session binding (GUC_ACTION_SET,
 * authenticate(..., session => true)).  The kind is part of the value, and
 * every later write of a binding - a refresh, an end, a mark - uses the
 * action of its kind: a re-check never turns a transaction binding into a
 * session binding, which behind a transaction-mode pooler the next client
 * would inherit.
 *
 * Forbidding session bindings.  apikey.allow_session_binding (on by default,
 * so existing callers keep working) set off for a role - ALTER ROLE app SET ... = off, for
 * the role a transaction-mode pooler connects as - makes authenticate(...,
 * session => true) raise before the token is even verified.  It is
 * PGC_SUSET, so the restricted role cannot lift it: not with SET, SET
 * LOCAL, set_config(), RESET, ALTER ROLE/DATABASE SET, connection options
 * or a function's SET clause.  It governs new bindings only.
 *
 * Re-checks.  A session binding outlives the transaction that made it, so
 * before the helpers use it in a later transaction it is checked again
 * against the key cache: if the key has been revoked, has expired (by the
 * clock at the check) or is gone, the binding ends (with a WARNING); if its
 * owner or scopes changed, the binding is refreshed.  The check runs at the
 * first ExecutorStart of the transaction and, for statements that reach
 * the helpers without one (DO, CALL, PL/pgSQL simple expressions, COPY FROM
 * defaults and triggers, fast-path calls), at the first helper call.  A
 * binding counts as checked in a transaction only once its check has
 * succeeded: a check that raises (a lock timeout, say) and is caught by a
 * savepoint leaves it unchecked, and the next use checks again.  A
 * transaction binding was verified by authenticate() in its own
 * transaction and is not checked again.
 *
 * Parallel query.  Workers cannot check a binding (loading a key needs a
 * fresh snapshot, refused in parallel mode), and neither can the leader
 * once it is in parallel mode.  So the value also records the transaction
 * (the leader's local transaction id) in which it was last checked, and
 * before the leader starts a plan that may launch workers it writes that
 * mark if it is missing.  Settings cannot change in parallel mode, so the
 * workers see the value the leader checked.  A helper in a worker trusts a
 * binding only if its mark is the leader's current transaction; a helper
 * in parallel mode in the leader only if the leader checked it in this
 * transaction.  Anything else (a parallel index build, say, evaluating a
 * helper through a function wrongly marked IMMUTABLE) raises instead.
 *
 * The value encodes kind, checked-in transaction, key id, token hash, owner
 * and scopes, each string length-prefixed:
 *	 "<t|s>:<lxid>:<key_id>:<sha256 hex>/<len>:<owner>/<len>:<scope>..."
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/parallel.h"
#include "access/xact.h"
#include "executor/executor.h"
#include "lib/stringinfo.h"
#include "nodes/parsenodes.h"
#include "storage/proc.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/timestamp.h"

#include "apikey.h"
#include "compat.h"

/* A binding's kind: which GucAction writes it, so how long it lasts */
#define BINDING_TRANSACTION	't'
#define BINDING_SESSION		's'

/*
 * The parsed binding: one malloc'd block, as GUC "extra" must be.  The GUC
 * machinery keeps an extra for as long as its value is in force or saved on
 * the stack (a savepoint, a SET LOCAL over a session value), and gives it
 * back unchanged when the value is restored; so checked_lxid, the only
 * field ever changed after parsing, belongs to that value.
 */
typedef struct Binding
{
	char		kind;			/* BINDING_TRANSACTION or BINDING_SESSION */
	LocalTransactionId marked_lxid; /* the value says: checked in this
									 * transaction (the leader's, for workers) */
	LocalTransactionId checked_lxid;	/* this backend checked it in this
										 * transaction */
	int64		key_id;
	uint8		hash[APIKEY_HASH_LEN];	/* SHA-256 of the token */
	char	   *owner;
	int			nscopes;
	char	   *scopes[FLEXIBLE_ARRAY_MEMBER];	/* then the strings */
} Binding;


static char *binding_string = NULL;
static Binding *binding_current = NULL;
static bool binding_in_progress = false;
static bool allow_session_binding = true;
static ProcessUtility_hook_type prev_ProcessUtility = NULL;
static ExecutorStart_hook_type prev_ExecutorStart = NULL;

/* Read "<len>:<bytes>" at *p; false if it does not fit. */
static bool
parse_field(const char **p, const char **start, size_t *len)
{
	char	   *end;
	unsigned long n;

	if (**p != '/')
		return false;
	errno = 0;
	n = strtoul(*p + 1, &end, 10);
	if (errno != 0 || end == *p + 1 || *end != ':' || n > strlen(end + 1))
		return false;
	*start = end + 1;
	*len = n;
	*p = end + 1 + n;
	return true;
}

/* Parse the GUC string into a Binding allocated with apikey_guc_malloc. */
static Binding *
binding_parse(const char *value)
{
	const char *p = value;
	const char *start;
	size_t		len;
	int			nfields = 0;
	size_t		strbytes = 0;
	char	   *end;
	char		kind;
	unsigned long lxid;
	int64		key_id;
	Binding    *b;
	char	   *dst;
	int			i;

	uint8		hash[APIKEY_HASH_LEN];

	kind = value[0];
	if ((kind != BINDING_TRANSACTION && kind != BINDING_SESSION) || value[1] != ':')
		return NULL;
	errno = 0;
	lxid = strtoul(value + 2, &end, 10);
	if (errno != 0 || end == value + 2 || *end != ':' || lxid > PG_UINT32_MAX)
		return NULL;
	p = end + 1;
	errno = 0;
	key_id = strtoll(p, &end, 10);
	if (errno != 0 || end == p || *end != ':' ||
		strlen(end + 1) < APIKEY_HASH_LEN * 2 ||
		hex_decode(end + 1, APIKEY_HASH_LEN * 2, (char *) hash) != APIKEY_HASH_LEN)
		return NULL;
	end += 1 + APIKEY_HASH_LEN * 2;

	/* first pass: count and validate */
	p = end;
	while (*p != '\0')
	{
		if (!parse_field(&p, &start, &len))
			return NULL;
		nfields++;
		strbytes += len + 1;
	}
	if (nfields < 1)
		return NULL;

	b = apikey_guc_malloc(offsetof(Binding, scopes) +
					   sizeof(char *) * (nfields - 1) + strbytes);
	if (b == NULL)
		return NULL;
	b->kind = kind;
	b->marked_lxid = (LocalTransactionId) lxid;
	b->checked_lxid = (LocalTransactionId) lxid;
	b->key_id = key_id;
	memcpy(b->hash, hash, APIKEY_HASH_LEN);
	b->nscopes = nfields - 1;
	dst = (char *) &b->scopes[b->nscopes];

	/* second pass: copy */
	p = end;
	for (i = 0; i < nfields; i++)
	{
		(void) parse_field(&p, &start, &len);
		memcpy(dst, start, len);
		dst[len] = '\0';
		if (i == 0)
			b->owner = dst;
		else
			b->scopes[i - 1] = dst;
		dst += len + 1;
	}
	return b;
}

static bool
binding_check_hook(char **newval, void **extra, GucSource source)
{
	Binding    *b;

	if (!binding_in_progress && !InitializingParallelWorker &&
		source != PGC_S_DEFAULT)
	{
		GUC_check_errcode(ERRCODE_INSUFFICIENT_PRIVILEGE);
		GUC_check_errmsg("parameter \"apikey.binding\" can only be set by apikey.authenticate()");
		GUC_check_errhint("Call apikey.authenticate(token) to bind a key, apikey.logout() to end the binding.");
		return false;
	}
	if (*newval == NULL || **newval == '\0')
	{
		*extra = NULL;
		return true;
	}
	b = binding_parse(*newval);
	if (b == NULL)
	{
		GUC_check_errmsg("invalid apikey binding");
		return false;
	}
	*extra = b;
	return true;
}

static void
binding_assign_hook(const char *newval, void *extra)
{
	binding_current = (Binding *) extra;
}

/* Set apikey.binding to value, as authenticate()/logout() only may. */
static void
binding_apply(const char *value, GucAction action)
{
	binding_in_progress = true;
	PG_TRY();
	{
		(void) set_config_option("apikey.binding", value, PGC_SUSET,
								 PGC_S_SESSION, action, true, ERROR, false);
	}
	PG_FINALLY();
	{
		binding_in_progress = false;
	}
	PG_END_TRY();
}

/* The action that writes a binding of this kind: the kind never changes. */
static GucAction
binding_action(char kind)
{
	return kind == BINDING_SESSION ? GUC_ACTION_SET : GUC_ACTION_LOCAL;
}

/*
 * Bind a key of the given kind, marked as checked in this transaction.
 * The arguments may point into the current binding: they are read before
 * it is replaced.
 */
static void
binding_write(char kind, int64 key_id, const uint8 *hash, const char *owner,
			  char *const *scopes, int nscopes)
{
	StringInfoData buf;
	char		hex[APIKEY_HASH_LEN * 2 + 1];
	int			i;

	hex[hex_encode((const char *) hash, APIKEY_HASH_LEN, hex)] = '\0';
	initStringInfo(&buf);
	appendStringInfo(&buf, "%c:%u:" INT64_FORMAT ":%s/%zu:%s", kind,
					 proc_lxid(MyProc), key_id, hex, strlen(owner), owner);
	for (i = 0; i < nscopes; i++)
		appendStringInfo(&buf, "/%zu:%s", strlen(scopes[i]), scopes[i]);

	binding_apply(buf.data, binding_action(kind));
	pfree(buf.data);
}

/* Bind key to the current transaction, or to the session. */
void
apikey_binding_set(const ApikeyKey *key, bool session)
{
	binding_write(session ? BINDING_SESSION : BINDING_TRANSACTION,
				  key->key_id, key->hash, key->owner, key->scopes, key->nscopes);
}

/*
 * Refuse a session binding where apikey.allow_session_binding is off: called
 * before the token is verified, so a refused call counts nothing.
 */
void
apikey_binding_check_kind(bool session)
{
	if (session && !allow_session_binding)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("session bindings are not allowed in this session"),
				 errdetail("apikey.allow_session_binding is off (for this role, database or server)."),
				 errhint("Bind the key to the transaction instead: call apikey.authenticate(token) without session => true in each transaction.")));
}

/* End every binding: the transaction's and the session's. */
void
apikey_binding_clear(void)
{
	binding_apply("", GUC_ACTION_SET);
}

/* Do two keys' owners and scopes differ? */
static bool
binding_differs(const Binding *b, const ApikeyKey *key)
{
	int			i;

	if (b->nscopes != key->nscopes || strcmp(b->owner, key->owner) != 0)
		return true;
	for (i = 0; i < b->nscopes; i++)
		if (strcmp(b->scopes[i], key->scopes[i]) != 0)
			return true;
	return false;
}

/*
 * Check the current binding against the key as it is now: end it if the
 * key no longer verifies, refresh it if its owner or scopes changed, and
 * only then - never before the lookup, which may raise - count it as
 * checked in this transaction.  Ending or refreshing writes with the
 * binding's own kind.
 */
static void
binding_recheck(void)
{
	Binding    *b = binding_current;
	ApikeyKey	key;
	bool		found = false;
	const char *why = NULL;
	TimestampTz now = GetCurrentTimestamp();
	int64		retry_after;

	/* a revocation committed since this transaction began counts */
	AcceptInvalidationMessages();
	if (OidIsValid(apikey_keystore_keys_relid(true)))
		found = apikey_keycache_lookup(b->hash, &key);

	if (!found || key.key_id != b->key_id)
		why = "unknown";
	else if (key.revoked)
		why = "revoked";
	else if (key.has_expiry && key.expires_at <= now)
		why = "expired";
	else if (apikey_key_suspended(&key, now, &retry_after))
		why = "suspended";
	else
		apikey_key_quarantine_scopes(&key, now);

	if (why != NULL)
	{
		ereport(WARNING,
				(errcode(ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION),
				 errmsg("the API key bound to this session is no longer valid; the binding has ended"),
				 errdetail("Verdict: %s.", why)));
		binding_apply("", binding_action(b->kind));
	}
	else if (binding_differs(b, &key))
		binding_write(b->kind, key.key_id, key.hash, key.owner, key.scopes,
					  key.nscopes);
	else
		b->checked_lxid = proc_lxid(MyProc);

	if (found)
		pfree(key.chunk);
}

/* Raise: the binding may not be used here, and cannot be checked here. */
static void
binding_unverifiable(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("the API key bound to this session cannot be checked during a parallel operation"),
			 errdetail("A session binding is checked again in each transaction before it is used, and keys cannot be read in parallel mode."),
			 errhint("Bind the key to the transaction with apikey.authenticate(token) before the parallel operation, or run it without parallel workers.")));
}

/*
 * The binding the helpers may use now, or NULL.  One not yet checked in
 * this transaction is checked first (which may end or refresh it).  In
 * parallel mode no check is possible: a worker trusts only a binding its
 * leader marked as checked in the leader's current transaction, the
 * leader only one it checked itself; anything else raises.
 */
static const Binding *
binding_verified(void)
{
	Binding    *b = binding_current;

	if (b == NULL)
		return NULL;
	if (IsParallelWorker())
	{
		PGPROC	   *leader = MyProc->lockGroupLeader;

		if (leader == NULL || b->marked_lxid != proc_lxid(leader))
			binding_unverifiable();
		return b;
	}
	if (b->checked_lxid == proc_lxid(MyProc))
		return b;
	if (IsInParallelMode())
		binding_unverifiable();
	binding_recheck();
	return binding_current;
}

/* The bound key, if any, checked in this transaction. */
bool
apikey_binding_get(int64 *key_id, const char **owner, char *const **scopes,
				   int *nscopes)
{
	const Binding *b = binding_verified();

	if (b == NULL)
		return false;
	if (key_id)
		*key_id = b->key_id;
	if (owner)
		*owner = b->owner;
	if (scopes)
		*scopes = b->scopes;
	if (nscopes)
		*nscopes = b->nscopes;
	return true;
}

/*
 * Before a query runs, check the binding (so that a revoked session
 * binding ends at the first query of a transaction, helpers or not), and
 * before a plan that may launch workers, make sure the value the workers
 * will receive carries this transaction's mark.
 */
static void
binding_ExecutorStart(QueryDesc *queryDesc, int eflags)
{
	if (binding_current != NULL && !IsInParallelMode() && IsTransactionState())
	{
		const Binding *b = binding_verified();

		if (b != NULL && queryDesc->plannedstmt->parallelModeNeeded &&
			b->marked_lxid != proc_lxid(MyProc))
			binding_write(b->kind, b->key_id, b->hash, b->owner, b->scopes,
						  b->nscopes);
	}

	if (prev_ExecutorStart)
		prev_ExecutorStart(queryDesc, eflags);
	else
		standard_ExecutorStart(queryDesc, eflags);
}

/* Is this statement RESET or SET ... TO DEFAULT of apikey.binding? */
static bool
resets_binding(Node *parsetree)
{
	VariableSetStmt *stmt;

	if (!IsA(parsetree, VariableSetStmt))
		return false;
	stmt = (VariableSetStmt *) parsetree;
	return (stmt->kind == VAR_RESET || stmt->kind == VAR_SET_DEFAULT) &&
		stmt->name != NULL && pg_strcasecmp(stmt->name, "apikey.binding") == 0;
}

/*
 * DISCARD ALL ends a session binding, as it resets every other setting.
 * RESET apikey.binding and SET apikey.binding TO DEFAULT are refused: they
 * would bypass the check hook.
 */
static void
binding_ProcessUtility(PlannedStmt *pstmt, const char *queryString,
					   bool readOnlyTree,
					   ProcessUtilityContext context, ParamListInfo params,
					   QueryEnvironment *queryEnv, DestReceiver *dest,
					   QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;

	if (resets_binding(parsetree))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("parameter \"apikey.binding\" can only be set by apikey.authenticate()"),
				 errhint("Call apikey.logout() to end the binding.")));

	if (prev_ProcessUtility)
		prev_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
							queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
								queryEnv, dest, qc);

	if (IsA(parsetree, DiscardStmt) &&
		((DiscardStmt *) parsetree)->target == DISCARD_ALL &&
		binding_current != NULL)
		apikey_binding_clear();
}

/*
 * Define apikey.binding and apikey.allow_session_binding, and install the
 * hooks that guard the binding.
 */
void
apikey_binding_init(void)
{
	DefineCustomStringVariable("apikey.binding",
							   "The API key bound by apikey.authenticate(); set only by apikey.",
							   NULL,
							   &binding_string,
							   "",
							   PGC_SUSET,
							   GUC_NO_SHOW_ALL | GUC_NO_RESET_ALL | GUC_NOT_IN_SAMPLE |
							   GUC_DISALLOW_IN_FILE | GUC_SUPERUSER_ONLY | APIKEY_GUC_NO_RESET,
							   binding_check_hook,
							   binding_assign_hook,
							   NULL);

	/* apikey.allow_session_binding: superusers only, so a role cannot lift it */
	DefineCustomBoolVariable("apikey.allow_session_binding",
							 "Allows apikey.authenticate(..., session => true).",
							 "Turn off for roles behind a transaction-mode pooler, where the next client would inherit a session binding.",
							 &allow_session_binding,
							 true,
							 PGC_SUSET, 0,
							 NULL, NULL, NULL);

	prev_ProcessUtility = ProcessUtility_hook;
	ProcessUtility_hook = binding_ProcessUtility;
	prev_ExecutorStart = ExecutorStart_hook;
	ExecutorStart_hook = binding_ExecutorStart;
}
