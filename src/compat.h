/*-------------------------------------------------------------------------
 *
 * compat.h
 *	  Every difference between the PostgreSQL releases apikey supports (15
 *	  and later; built and tested on 15 and 18), in one place.  No other
 *	  file tests PG_VERSION_NUM.
 *
 *-------------------------------------------------------------------------
 */
#ifndef APIKEY_COMPAT_H
#define APIKEY_COMPAT_H

#include "storage/proc.h"
#include "utils/guc.h"

#if PG_VERSION_NUM < 150000
#error "apikey needs PostgreSQL 15 or later"
#endif

/* Reading backend status entries by position was renamed in 16 */
#if PG_VERSION_NUM >= 160000
#define apikey_local_beentry(i) pgstat_get_local_beentry_by_index(i)
#else
#define apikey_local_beentry(i) pgstat_fetch_stat_local_beentry(i)
#endif

/* GUC "extra" data: malloc() in 15, guc_malloc() (a memory context) since 16 */
#if PG_VERSION_NUM >= 160000
#define apikey_guc_malloc(size) guc_malloc(LOG, (size))
#else
#define apikey_guc_malloc(size) malloc(size)
#endif

/*
 * 16 added GUC_NO_RESET, which also refuses RESET and set_config(NULL)
 * that bypass check hooks; on 15 binding.c's ProcessUtility hook refuses
 * RESET and set_config(NULL) stays a documented superuser-only gap.
 */
#if PG_VERSION_NUM >= 160000
#define APIKEY_GUC_NO_RESET GUC_NO_RESET
#else
#define APIKEY_GUC_NO_RESET 0
#endif

/* A backend's local transaction id: PGPROC's field moved into vxid in 17 */
#if PG_VERSION_NUM >= 170000
#define proc_lxid(proc) ((proc)->vxid.lxid)
#else
#define proc_lxid(proc) ((proc)->lxid)
#endif

/*
 * This backend's index among the server's processes, from 0 (-1 before it
 * has one): 17 replaced the 1-based BackendId by the 0-based ProcNumber.
 */
#if PG_VERSION_NUM >= 170000
#define apikey_my_proc_number() ((int) MyProcNumber)
#else
#include "storage/backendid.h"
#define apikey_my_proc_number() ((int) MyBackendId - 1)
#endif

/* PostgreSQL 15.4 marks a database left half-dropped with this connlimit */
#ifndef DATCONNLIMIT_INVALID_DB
#define DATCONNLIMIT_INVALID_DB -2
#endif

#endif							/* APIKEY_COMPAT_H */
