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
 * Both must be defined in C: apikey reserves the "apikey." prefix, which
 * refuses placeholders once the library is loaded.  The SQL reads the
 * context through apikey._audit_context(), a C function, so the library is
 * loaded (and a placeholder set by an ordinary role before that discarded)
 * before the value is trusted.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/guc.h"

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
 * apikey._audit_context() RETURNS text: the administrative function that
 * is running, or NULL outside one.
 */
PG_FUNCTION_INFO_V1(apikey_audit_context);
Datum
apikey_audit_context(PG_FUNCTION_ARGS)
{
	if (audit_context == NULL || audit_context[0] == '\0')
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(audit_context));
}
