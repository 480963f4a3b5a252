/*-------------------------------------------------------------------------
 *
 * verify.c
 *	  The verification rules: from a presented token to a verdict.
 *
 * The checks run in this order, and the first that fails decides the code:
 *
 *	 address_blocked  the client network asserted by a trusted proxy has
 *					  spent its failure budget (failurelimit.c); nothing
 *					  is parsed, hashed or read
 *	 malformed		  not a well-formed token (length, prefix, charset, CRC),
 *					  nor one of a legacy format in use (legacy.c, which
 *					  may also answer rate_limited: its hash budget)
 *	 unknown		  no key has this token's hash
 *	 revoked		  the key has a row in apikey.revocations
 *	 expired		  expires_at <= the time of the call (clock_timestamp())
 *	 suspended		  the key has a suspension whose until is NULL or later
 *					  than the time of the call
 *	 address_denied	  the key, or its owner (apikey.owners), has
 *					  allowed_cidrs and the client is outside
 *	 scope_denied	  a scope was asked for and the key does not hold it
 *	 quarantined	  the key is quarantined (until as for a suspension) and
 *					  the scope asked for is outside its allowed_scopes
 *	 rate_limited	  the key is throttled (apikey.throttle) and its throttle
 *					  is spent
 *	 rate_limit_unavailable / rate_limited
 *					  the key's rate limit, then its owner's (whose refusal
 *					  gives the key's take back: ownerlimits.c)
 *	 quota_unavailable / quota_exhausted
 *					  the owner's credits, then the key's: both or neither
 *	 valid
 *
 * A malformed token is rejected before any table or cache is read (only
 * the list of legacy formats in use, cached, is consulted).  A legacy key
 * verified by its old hash is upgraded once the verdict is valid.  For
 * malformed and unknown the verdict says nothing about any key.  A canary
 * key's token is unknown like any other (canary.c records the use).
 *
 * Before it looks a key up, every verification accepts the invalidation
 * messages already sent, so a revocation or suspension committed before
 * the call began is seen even inside a transaction that began earlier.
 * The verdict owns its copy of the key (verdict->key_copy), so nothing that
 * runs after the lookup can free it.
 *
 * A quarantined key keeps working for the scopes that both it and the
 * quarantine's allowed_scopes grant: while the quarantine lasts, the
 * verdict (and so a binding) carries only those scopes, so has_scope() and
 * require_scope() enforce it too, also when no scope was asked for.
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

/* Is addr inside any of the networks cidrs[0 .. ncidrs - 1]? */
static bool
address_allowed(inet *const *cidrs, int ncidrs, inet *addr)
{
	int			i;

	if (addr == NULL)
		return false;
	for (i = 0; i < ncidrs; i++)
	{
		if (DatumGetBool(DirectFunctionCall2(network_subeq,
											 InetPGetDatum(addr),
											 InetPGetDatum(cidrs[i]))))
			return true;
	}
	return false;
}

/*
 * Is key suspended at now?  A timed suspension ends by the clock, judged at
 * each call; *retry_after is then the time left (else -1).
 */
bool
apikey_key_suspended(const ApikeyKey *key, TimestampTz now, int64 *retry_after)
{
	if (!key->suspended || key->suspended_until <= now)
		return false;
	*retry_after = TIMESTAMP_IS_NOEND(key->suspended_until) ? -1 :
		key->suspended_until - now;
	return true;
}

/*
 * If key is quarantined at now, narrow its scopes to those that both it and
 * the quarantine grant.  Grants are exact names, prefix:* or *, so two
 * grants either nest or are disjoint: the narrower of each nesting pair is
 * kept.  The scopes array has room for nscopes + nallowed (keystore.c).
 */
void
apikey_key_quarantine_scopes(ApikeyKey *key, TimestampTz now)
{
	char	  **kept;
	int			nkept = 0;
	int			i;

	if (!key->quarantined || key->quarantined_until <= now)
		return;
	kept = palloc(sizeof(char *) * (key->nscopes + key->nallowed + 1));
	for (i = 0; i < key->nallowed; i++)
	{
		const char *a = key->allowed_scopes[i];

		if (apikey_scope_granted(key->scopes, key->nscopes, a, strlen(a)))
			kept[nkept++] = key->allowed_scopes[i];
	}
	for (i = 0; i < key->nscopes; i++)
	{
		const char *g = key->scopes[i];
		int			j;

		if (!apikey_scope_granted(key->allowed_scopes, key->nallowed, g, strlen(g)))
			continue;
		for (j = 0; j < nkept && strcmp(kept[j], g) != 0; j++)
			;
		if (j == nkept)
			kept[nkept++] = key->scopes[i];
	}
	memcpy(key->scopes, kept, sizeof(char *) * nkept);
	key->nscopes = nkept;
	pfree(kept);
}

/* Checks on a known key, in order; returns the first code that applies. */
static ApikeyCode
judge(ApikeyKey *key, text *scope, inet *addr, TimestampTz now,
	  ApikeyVerdict *verdict)
{
	if (key->revoked)
		return APIKEY_REVOKED;
	if (key->has_expiry && key->expires_at <= now)
		return APIKEY_EXPIRED;
	if (apikey_key_suspended(key, now, &verdict->retry_after))
	{
		verdict->has_retry_after = (verdict->retry_after >= 0);
		return APIKEY_SUSPENDED;
	}
	if (key->ncidrs > 0 && !address_allowed(key->cidrs, key->ncidrs, addr))
		return APIKEY_ADDRESS_DENIED;
	/* the owner's allowlist too: the two intersect (ownerlimits.c) */
	if (key->owner_ncidrs > 0 &&
		!address_allowed(key->cidrs + key->ncidrs, key->owner_ncidrs, addr))
		return APIKEY_ADDRESS_DENIED;
	if (scope != NULL &&
		!apikey_scope_granted(key->scopes, key->nscopes, VARDATA_ANY(scope),
							  VARSIZE_ANY_EXHDR(scope)))
		return APIKEY_SCOPE_DENIED;
	apikey_key_quarantine_scopes(key, now);
	if (scope != NULL &&
		!apikey_scope_granted(key->scopes, key->nscopes, VARDATA_ANY(scope),
							  VARSIZE_ANY_EXHDR(scope)))
		return APIKEY_QUARANTINED;
	if (apikey_throttle_take(key, now, &verdict->retry_after) != APIKEY_VALID)
	{
		verdict->has_retry_after = true;
		return APIKEY_RATE_LIMITED;
	}
	if (key->rate_limit > 0)
	{
		ApikeyCode	code = apikey_ratelimit_take(key, now,
												 &verdict->retry_after,
												 &verdict->remaining);

		verdict->has_retry_after = (code == APIKEY_RATE_LIMITED);
		verdict->has_remaining = (code == APIKEY_VALID);
		verdict->limited_by = APIKEY_LIMITED_BY_KEY;
		if (code != APIKEY_VALID)
			return code;
	}
	/* the owner's pool: its take refunds the key's if refused */
	if (key->owner_rate_limit > 0)
	{
		ApikeyCode	code = apikey_owner_rate_take(key, now, verdict);

		if (code != APIKEY_VALID)
			return code;
	}
	/* the owner's credit first (its row is locked first), then the key's */
	if (key->owner_has_quota)
	{
		ApikeyCode	code = apikey_owner_quota_debit(key, verdict);

		if (code != APIKEY_VALID)
			return code;
	}
	if (key->has_quota)
	{
		int64		owner_left = verdict->remaining;
		ApikeyCode	code = apikey_quota_debit(key, &verdict->remaining,
											  &verdict->retry_after);

		verdict->has_remaining = (code == APIKEY_VALID || code == APIKEY_QUOTA_EXHAUSTED);
		verdict->has_retry_after = (code == APIKEY_QUOTA_EXHAUSTED &&
									verdict->retry_after >= 0);
		verdict->limited_by = APIKEY_LIMITED_BY_KEY;
		if (code != APIKEY_VALID)
		{
			apikey_owner_quota_refund(key);		/* both or neither */
			return code;
		}
		if (key->owner_has_quota)
			apikey_owner_remaining(verdict, verdict->remaining, owner_left);
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
	ApikeyFailureClaim claim;
	bool		found = false;
	ApikeyLegacyMatch legacy = {0};

	if (client_addr != NULL && may_assert_address())
		addr = apikey_address_normal(client_addr, CurrentMemoryContext);
	memset(verdict, 0, offsetof(ApikeyVerdict, key_copy));
	verdict->code = APIKEY_MALFORMED;

	/* only an asserted address is limited: see failurelimit.c */
	if (!apikey_failurelimit_claim(addr, now, &verdict->retry_after, &claim))
	{
		verdict->code = APIKEY_ADDRESS_BLOCKED;
		verdict->has_retry_after = true;
		apikey_netwatch_count(verdict->code, addr, now);
		apikey_usage_count(verdict, addr, now);
		return;
	}

	if (token != NULL &&
		apikey_token_parse(VARDATA_ANY(token), VARSIZE_ANY_EXHDR(token),
						   &prefix_len) == APIKEY_PARSE_OK)
	{
		uint8		hash[APIKEY_HASH_LEN];

		apikey_sha256(VARDATA_ANY(token), VARSIZE_ANY_EXHDR(token), hash);
		AcceptInvalidationMessages();
		found = apikey_keycache_lookup(hash, &verdict->key_copy);
		verdict->code = APIKEY_UNKNOWN;
		/* a canary answers unknown too; its use is recorded (canary.c) */
		if (!found)
			apikey_canary_check(hash, scope, addr ? addr : connection_addr(), now);
	}
	else if (token != NULL)
		found = apikey_legacy_lookup(token, now, false, verdict, &legacy);
	if (found)
	{
		ApikeyKey  *key = &verdict->key_copy;

		if (addr == NULL && key->ncidrs + key->owner_ncidrs > 0)
			addr = connection_addr();
		verdict->key = key;
		verdict->code = judge(key, scope, addr, now, verdict);
		if (verdict->code == APIKEY_VALID)
			apikey_legacy_upgrade(&legacy);
	}

	apikey_failurelimit_settle(&claim, verdict->code);
	if (verdict->code == APIKEY_VALID)
		apikey_networks_count(verdict->key->key_id,
							  addr != NULL ? addr : connection_addr(), now);
	if (verdict->code != APIKEY_VALID && addr == NULL)
		addr = connection_addr();
	apikey_netwatch_count(verdict->code, addr, now);	/* for the detector */
	apikey_usage_count(verdict, addr, now);
}
