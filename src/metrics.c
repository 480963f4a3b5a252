/*-------------------------------------------------------------------------
 *
 * metrics.c
 *	  apikey.stats as plain rows and columns, for monitoring tools that
 *	  cannot (or should not have to) unpack jsonb.
 *
 * apikey._stats_by_code() is one row per verdict code, in the order of the
 * verdict table (verdict.c), so a code added there shows up here with no
 * SQL change; a code never seen counts 0.  apikey._writer_heartbeat() is
 * when the usage writer last finished a round, written or not (stats.c):
 * the liveness signal last_flush cannot be on a quiet server.
 *
 * Both read the counters stats.c keeps and return NULL counts without
 * shared memory (no preload), as apikey.stats does.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "apikey.h"

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
