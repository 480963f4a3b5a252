/*-------------------------------------------------------------------------
 *
 * pg_crc32_table.c
 *	  The lookup table behind pg_crc.h's TRADITIONAL_CRC32 macros, for the
 *	  frontend builds in this directory.
 *
 * The server defines pg_crc32_table in src/backend/utils/hash/pg_crc.c,
 * which is not part of libpgcommon.a, so a build without a server has to
 * bring its own.  Every entry is computed here, at compile time, from the
 * CRC-32 polynomial (reflected 0xEDB88320) bit by bit; fuzz_token.c checks
 * apikey_checksum() against a separate bitwise implementation, so a wrong
 * table would be caught.
 *
 *-------------------------------------------------------------------------
 */
#include "c.h"

#include "utils/pg_crc.h"

#define STEP(c)		(((c) >> 1) ^ (UINT32_C(0xEDB88320) & (UINT32_C(0) - ((c) & 1))))
#define ENTRY(n)	STEP(STEP(STEP(STEP(STEP(STEP(STEP(STEP((uint32) (n)))))))))
#define E4(n)		ENTRY(n), ENTRY((n) + 1), ENTRY((n) + 2), ENTRY((n) + 3)
#define E16(n)		E4(n), E4((n) + 4), E4((n) + 8), E4((n) + 12)
#define E64(n)		E16(n), E16((n) + 16), E16((n) + 32), E16((n) + 48)

const uint32 pg_crc32_table[256] = {
	E64(0), E64(64), E64(128), E64(192)
};
