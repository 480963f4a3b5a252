/*-------------------------------------------------------------------------
 *
 * compat.h
 *	  Differences between PostgreSQL 13 and 17, in one place.
 *
 *-------------------------------------------------------------------------
 */
#ifndef APIKEY_COMPAT_H
#define APIKEY_COMPAT_H

#include "funcapi.h"
#include "utils/guc.h"

/* MarkGUCPrefixReserved() is new in 15; older releases only warn */
#if PG_VERSION_NUM < 150000
#define MarkGUCPrefixReserved(prefix) EmitWarningsOnPlaceholders(prefix)
#endif

/* InitMaterializedSRF() is new in 15 */
#if PG_VERSION_NUM < 150000
static inline void
InitMaterializedSRF(FunctionCallInfo fcinfo, bits32 flags)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext oldcxt;
	TupleDesc	tupdesc;

	if (rsinfo == NULL || !IsA(rsinfo, ReturnSetInfo) ||
		!(rsinfo->allowedModes & SFRM_Materialize))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("materialize mode required, but it is not allowed in this context")));
	oldcxt = MemoryContextSwitchTo(rsinfo->econtext->ecxt_per_query_memory);
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	rsinfo->returnMode = SFRM_Materialize;
	rsinfo->setResult = tuplestore_begin_heap(true, false, work_mem);
	rsinfo->setDesc = CreateTupleDescCopy(tupdesc);
	MemoryContextSwitchTo(oldcxt);
}
#endif

/* timingsafe_bcmp() is in src/port since 15 */
#if PG_VERSION_NUM < 150000
static inline int
timingsafe_bcmp(const void *b1, const void *b2, size_t n)
{
	const unsigned char *p1 = b1;
	const unsigned char *p2 = b2;
	int			ret = 0;

	for (; n > 0; n--)
		ret |= *p1++ ^ *p2++;
	return (ret != 0);
}
#endif

/* Reading backend status entries by position was renamed in 16 */
#if PG_VERSION_NUM >= 160000
#define apikey_local_beentry(i) pgstat_get_local_beentry_by_index(i)
#else
#define apikey_local_beentry(i) pgstat_fetch_stat_local_beentry(i)
#endif

#endif							/* APIKEY_COMPAT_H */
