/*-------------------------------------------------------------------------
 *
 * verify.c
 *	  The verification rules: from a presented token to a verdict.
 *
 * The checks run in this order, and the first that fails decides the code:
 *
 *	 malformed		  not a well-formed token (length, prefix, charset, CRC)
 *	 unknown		  no key has this token's hash
 *	 revoked		  the key has a row in apikey.revocations
 *	 expired		  expires_at <= the time of the call (clock_timestamp())
 *	 address_denied	  the key has allowed_cidrs and the client is outside
 *	 scope_denied	  a scope was asked for and the key does not hold it
 *	 rate_limit_unavailable / rate_limited
 *	 quota_unavailable / quota_exhausted
 *	 valid
 *
 * A malformed token is rejected before any table or cache is read.  For
 * malformed and unknown the verdict says nothing about any key.
 *
 * Before it looks a key up, every verification accepts the invalidation
 * messages already sent, so a revocation or suspension committed before
 * the call began is seen even inside a transaction that began earlier.
 * The verdict owns its copy of the key (verdict->key_copy), so nothing that
 * runs after the lookup can free it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/detoast.h"
#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/inet.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "apikey.h"
#include "token.h"

/*
 * Does a key holding these scopes hold want?  A grant matches exactly, or
 * ends in ":*" and covers every scope under that prefix, or is "*".
 */
bool
apikey_scope_granted(char *const *scopes, int nscopes, const char *want,
					 size_t wantlen)
{
	int			i;

	for (i = 0; i < nscopes; i++)
	{
		const char *g = scopes[i];
		size_t		glen = strlen(g);

		if (glen == wantlen && memcmp(g, want, wantlen) == 0)
			return true;
		if (glen == 1 && g[0] == '*')
			return true;
		if (glen >= 2 && g[glen - 2] == ':' && g[glen - 1] == '*' &&
			wantlen > glen - 1 && memcmp(g, want, glen - 1) == 0)
			return true;
	}
	return false;
}

/*
 * May the current role assert the client's address?  Only members of
 * apikey_proxy (and superusers): anyone else holding a stolen token and a
 * SQL connection could otherwise claim an allowed address, or make apikey
 * store one usage counter per address it invents.
 */
static bool
may_assert_address(void)
{
	Oid			proxy = get_role_oid(APIKEY_PROXY_ROLE, true);

	return OidIsValid(proxy) ? has_privs_of_role(GetUserId(), proxy) : superuser();
}

/*
 * The connecting client's address in IPv4 form if mapped (address.c), or
 * NULL (Unix socket): computed once.
 */
static inet *
connection_addr(void)
{
	static bool computed = false;
	static inet *addr = NULL;

	if (!computed)
	{
		LOCAL_FCINFO(fcinfo, 0);
		Datum		d;

		InitFunctionCallInfoData(*fcinfo, NULL, 0, InvalidOid, NULL, NULL);
		d = inet_client_addr(fcinfo);
		if (!fcinfo->isnull)
			addr = apikey_address_normal(DatumGetInetPP(d), TopMemoryContext);
		computed = true;
	}
	return addr;
}

/* Is addr inside any of the key's allowed networks? */
static bool
address_allowed(const ApikeyKey *key, inet *addr)
{
	int			i;

	if (addr == NULL)
		return false;
	for (i = 0; i < key->ncidrs; i++)
	{
		if (DatumGetBool(DirectFunctionCall2(network_subeq,
											 InetPGetDatum(addr),
											 InetPGetDatum(key->cidrs[i]))))
			return true;
	}
	return false;
}

/* Checks on a known key, in order; returns the first code that applies. */
static ApikeyCode
judge(const ApikeyKey *key, text *scope, inet *addr, TimestampTz now,
	  ApikeyVerdict *verdict)
{
	if (key->revoked)
		return APIKEY_REVOKED;
	if (key->has_expiry && key->expires_at <= now)
		return APIKEY_EXPIRED;
	if (key->ncidrs > 0 && !address_allowed(key, addr))
		return APIKEY_ADDRESS_DENIED;
	if (scope != NULL &&
		!apikey_scope_granted(key->scopes, key->nscopes, VARDATA_ANY(scope),
							  VARSIZE_ANY_EXHDR(scope)))
		return APIKEY_SCOPE_DENIED;
	if (key->rate_limit > 0)
	{
		ApikeyCode	code = apikey_ratelimit_take(key, now,
												 &verdict->retry_after,
												 &verdict->remaining);

		verdict->has_retry_after = (code == APIKEY_RATE_LIMITED);
		verdict->has_remaining = (code == APIKEY_VALID);
		if (code != APIKEY_VALID)
			return code;
	}
	if (key->has_quota)
	{
		ApikeyCode	code = apikey_quota_debit(key, &verdict->remaining,
											  &verdict->retry_after);

		verdict->has_remaining = (code == APIKEY_VALID || code == APIKEY_QUOTA_EXHAUSTED);
		verdict->has_retry_after = (code == APIKEY_QUOTA_EXHAUSTED &&
									verdict->retry_after >= 0);
		if (code != APIKEY_VALID)
			return code;
	}
	return APIKEY_VALID;
}

/*
 * Verify token (may be NULL) for scope (may be NULL) from client_addr, count
 * the call, and fill *verdict.  client_addr counts only from a role that may
 * assert it (may_assert_address); otherwise, or when it is NULL, the
 * connection's address is used.  Either is taken in IPv4 form if mapped.  Never raises for bad input: bad input is a
 * verdict.
 */
void
apikey_verify(text *token, text *scope, inet *client_addr, ApikeyVerdict *verdict)
{
	/* the clock, not the transaction's start: a long one must see time pass */
	TimestampTz now = GetCurrentTimestamp();
	size_t		prefix_len;
	inet	   *addr = NULL;

	if (client_addr != NULL && may_assert_address())
		addr = apikey_address_normal(client_addr, CurrentMemoryContext);
	memset(verdict, 0, offsetof(ApikeyVerdict, key_copy));
	verdict->code = APIKEY_MALFORMED;

	if (token != NULL &&
		apikey_token_parse(VARDATA_ANY(token), VARSIZE_ANY_EXHDR(token),
						   &prefix_len) == APIKEY_PARSE_OK)
	{
		uint8		hash[APIKEY_HASH_LEN];

		apikey_sha256(VARDATA_ANY(token), VARSIZE_ANY_EXHDR(token), hash);
		AcceptInvalidationMessages();
		if (!apikey_keycache_lookup(hash, &verdict->key_copy))
			verdict->code = APIKEY_UNKNOWN;
		else
		{
			const ApikeyKey *key = &verdict->key_copy;

			if (addr == NULL && key->ncidrs > 0)
				addr = connection_addr();
			verdict->key = key;
			verdict->code = judge(key, scope, addr, now, verdict);
		}
	}

	if (verdict->code != APIKEY_VALID && addr == NULL)
		addr = connection_addr();
	apikey_usage_count(verdict, addr, now);
}
