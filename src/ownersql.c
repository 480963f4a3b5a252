/*-------------------------------------------------------------------------
 *
 * ownersql.c
 *	  Internal SQL that apikey runs on the caller's behalf: synchronous
 *	  usage writes and quota debits.
 *
 * The caller may not touch apikey's tables at all, so this SQL runs as the
 * tables' owner, inside a security-restricted operation (no temp objects,
 * no SET ROLE), with every name schema-qualified and every operator spelled
 * OPERATOR(pg_catalog.x), so nothing on the caller's search_path can take
 * part.  Its plans are prepared once per backend and kept.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"
#include "miscadmin.h"

#include "apikey.h"

/* Run fn(arg) as the owner of the apikey tables, restricted. */
void
apikey_run_as_owner(void (*fn) (void *), void *arg)
{
	Oid			save_userid;
	int			save_sec_context;

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(apikey_keystore_owner(),
						   save_sec_context | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	PG_TRY();
	{
		fn(arg);
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_userid, save_sec_context);
	}
	PG_END_TRY();
}

/*
 * Prepare sql once and keep the plan for the backend's life (*plan caches
 * it).  The plan cache re-plans it by name if the tables are recreated.
 * The plan is generic: these statements are short lookups by key, owner
 * or id on every call of a hot function, and the plan cache would
 * otherwise plan some of them again on every execution (a custom plan
 * looks cheaper than the generic one for an array parameter, say: 6% of
 * an issue() was spent planning the max_keys lock that way).
 * Call between SPI_connect() and SPI_finish().
 */
SPIPlanPtr
apikey_prepare_kept(SPIPlanPtr *plan, const char *sql, int nargs, Oid *argtypes)
{
	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare_cursor(sql, nargs, argtypes, CURSOR_OPT_GENERIC_PLAN);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*plan = p;
	}
	return *plan;
}
