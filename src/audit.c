/*-------------------------------------------------------------------------
 *
 * audit.c
 *	  The settings behind apikey's audit trail (apikey.audit_log).
 *
 * The trail itself is SQL (apikey--1.1--1.2.sql): every administrative
 * function appends one chained row in its own transaction, and statement
 * triggers record direct DML on the key tables.  Two settings tell that
 * SQL who acts and where it runs:
 *
 *	 apikey.actor			the application's human identity, stored in
 *							actor_claim.  Anyone may set it, so it is a claim
 *							and never decides anything.
 *	 apikey.audit_context	set only by the SET clause of apikey's own
 *							administrative functions (superuser-only, not
 *							from a file, a role or a database setting).  An
 *							audit row can be appended only while it is set,
 *							and the DML triggers leave alone what such a
 *							function changes: it writes its own row.
 *
 * The usage writes that move keys.last_used_at (usage.c) run with the
 * context "usage", so the DML triggers do not inspect every flush.
 *
 * The row hash is computed here too (apikey._audit_hash): SHA-256 of the
 * fields, each as a 4-byte big-endian length (-1 for NULL) and its bytes:
 * numbers, times and transaction ids as 8 big-endian bytes, text in
 * UTF-8, inet and jsonb in their text form (jsonb's is canonical).  No
 * setting changes these bytes, so a dump restored elsewhere or a standby
 * computes the same hash.
 *
 * Both settings must be defined in C: apikey reserves the "apikey." prefix, which
 * refuses placeholders once the library is loaded.  The SQL reads the
 * context through apikey._audit_context(), a C function, so the library is
 * loaded (and a placeholder set by an ordinary role before that discarded)
 * before the value is trusted.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/transam.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "port/pg_bswap.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inet.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"
#include "utils/xid8.h"

#include "apikey.h"

static char *audit_actor = NULL;
static char *audit_context = NULL;

/*
 * apikey.audit_context may come from SET (a function's SET clause is one)
 * and nowhere else: a setting stored for a role or a database, or in a
 * configuration file, would silence the DML triggers for every session.
 * (PGC_S_TEST is how CREATE FUNCTION checks a SET clause; ALTER ROLE and
 * ALTER DATABASE check theirs the same way, and are refused when the
 * stored value is applied.)
 */
static bool
check_audit_context(char **newval, void **extra, GucSource source)
{
	if (source == PGC_S_DEFAULT || source == PGC_S_DYNAMIC_DEFAULT ||
		source == PGC_S_SESSION || source == PGC_S_OVERRIDE ||
		source == PGC_S_TEST)
		return true;
	GUC_check_errcode(ERRCODE_CANT_CHANGE_RUNTIME_PARAM);
	GUC_check_errdetail("apikey.audit_context is set only by apikey's administrative functions.");
	return false;
}

/* Define the settings; called from _PG_init. */
void
apikey_audit_init(void)
{
	/* apikey.actor */
	DefineCustomStringVariable("apikey.actor",
							   "The person an administrative call is made for, recorded in apikey.audit_log as a claim.",
							   "apikey stores it in actor_claim and never trusts it.",
							   &audit_actor,
							   "",
							   PGC_USERSET, 0,
							   NULL, NULL, NULL);

	/* apikey.audit_context */
	DefineCustomStringVariable("apikey.audit_context",
							   "Internal: the apikey administrative function that is running.",
							   "Set by the SET clause of apikey's administrative functions.",
							   &audit_context,
							   "",
							   PGC_SUSET,
							   GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE | GUC_NO_RESET_ALL |
							   GUC_DISALLOW_IN_FILE | GUC_DISALLOW_IN_AUTO_FILE,
							   check_audit_context, NULL, NULL);
}

/*
 * Mark the usage write that follows as apikey's own bookkeeping, until
 * the caller's AtEOXact_GUC() of the nest level it opened (or an abort)
 * ends it: the DML triggers then skip its UPDATE of keys.last_used_at
 * without comparing every row.
 */
void
apikey_audit_mark_usage_write(void)
{
	(void) set_config_option("apikey.audit_context", "usage", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
}

/*
 * The same for the upgrade of a legacy key's hash on its use (legacy.c):
 * bookkeeping done for whoever presented the token, recorded in
 * legacy_keys.upgraded_at; an audit row would hold the audit head's row
 * lock until the caller's transaction ends.
 */
void
apikey_audit_mark_legacy_upgrade(void)
{
	(void) set_config_option("apikey.audit_context", "legacy_upgrade", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
}

/* One field: its length (-1 for NULL), then its bytes. */
static void
put_field(StringInfo buf, const char *data, int len)
{
	uint32		be = pg_hton32((uint32) len);

	appendBinaryStringInfo(buf, (const char *) &be, sizeof(be));
	if (len > 0)
		appendBinaryStringInfo(buf, data, len);
}

static void
put_uint64(StringInfo buf, uint64 v)
{
	uint64		be = pg_hton64(v);

	put_field(buf, (const char *) &be, sizeof(be));
}

/* Text in the database encoding, hashed as UTF-8. */
static void
put_text(StringInfo buf, const char *s, int len)
{
	char	   *u = (char *) pg_do_encoding_conversion((unsigned char *) s, len,
													   GetDatabaseEncoding(), PG_UTF8);

	put_field(buf, u, (u == s) ? len : (int) strlen(u));
}

/*
 * An audit row's row_hash from its APIKEY_AUDIT_FIELDS fields, in the
 * order of apikey._audit_hash()'s arguments: prev_hash bytea, seq bigint,
 * at timestamptz, xact xid8, action text, actor_role name, session_role
 * name, actor_key_id bigint, actor_claim text, client_addr inet,
 * application_name text, target_key_id bigint, target_owner text,
 * details jsonb.
 */
bytea *
apikey_audit_row_hash(const NullableDatum *f)
{
	StringInfoData buf;
	int			i;

	initStringInfo(&buf);
	for (i = 0; i < APIKEY_AUDIT_FIELDS; i++)
	{
		if (f[i].isnull)
		{
			put_field(&buf, NULL, -1);
			continue;
		}
		switch (i)
		{
			case 0:				/* prev_hash */
				{
					bytea	   *b = DatumGetByteaPP(f[i].value);

					put_field(&buf, VARDATA_ANY(b), VARSIZE_ANY_EXHDR(b));
					break;
				}
			case 1:				/* seq, actor_key_id, target_key_id */
			case 7:
			case 11:
				put_uint64(&buf, (uint64) DatumGetInt64(f[i].value));
				break;
			case 2:				/* at */
				put_uint64(&buf, (uint64) DatumGetTimestampTz(f[i].value));
				break;
			case 3:				/* xact */
				put_uint64(&buf, U64FromFullTransactionId(DatumGetFullTransactionId(f[i].value)));
				break;
			case 5:				/* actor_role, session_role */
			case 6:
				{
					const char *n = NameStr(*DatumGetName(f[i].value));

					put_text(&buf, n, strlen(n));
					break;
				}
			case 9:				/* client_addr */
				{
					char	   *a = DatumGetCString(DirectFunctionCall1(inet_out,
																		f[i].value));

					put_text(&buf, a, strlen(a));
					break;
				}
			case 13:			/* details */
				{
					Jsonb	   *jb = DatumGetJsonbP(f[i].value);
					char	   *j = JsonbToCString(NULL, &jb->root, VARSIZE(jb));

					put_text(&buf, j, strlen(j));
					break;
				}
			default:			/* action, actor_claim, application_name,
								 * target_owner */
				{
					text	   *t = DatumGetTextPP(f[i].value);

					put_text(&buf, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
					break;
				}
		}
	}
	return apikey_sha256_bytea(buf.data, buf.len);
}

/* The administrative function that is running, or NULL outside one. */
const char *
apikey_audit_context_name(void)
{
	if (audit_context == NULL || audit_context[0] == '\0')
		return NULL;
	return audit_context;
}
