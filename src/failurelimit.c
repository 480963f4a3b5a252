/*-------------------------------------------------------------------------
 *
 * failurelimit.c
 *	  The per-network failure limiter: a client network that keeps
 *	  presenting bad tokens is answered address_blocked, before any hash
 *	  lookup, until its budget refills.
 *
 * What is limited.  One GCRA bucket (ratelimit.c's arithmetic) per
 * (database, client network): the /32 of an IPv4 address, the /64 of an
 * IPv6 one.  apikey.failure_limit failures per apikey.failure_window, with
 * a burst of the whole limit.  Only failures take from it - malformed,
 * unknown, revoked, expired, address_denied - and a success never refills
 * or resets it.
 *
 * Whose address.  Only a client_addr asserted by a role trusted to assert
 * it (a member of apikey_proxy, verify.c).  The connection's own address
 * is usually a pooler or an application server: blocking it would lock out
 * every client behind it, so it is never limited.  Networks in
 * apikey.failure_exempt are never limited either.
 *
 * Exactness.  verify.c claims one unit of the budget before it looks the
 * token up (blocked if none is left, with nothing read), and gives the
 * unit back once the verdict turns out not to be a failure.  Claim and
 * give-back are each atomic under the entry's spinlock, so concurrent
 * backends never let more failures through than the budget holds.  A
 * verification that raises between the two keeps its claim, as a failure.
 *
 * Locking: failure_lock protects the table's membership (shared to find
 * an entry, exclusive to add or remove one); an entry's tat is read and
 * written under its spinlock with failure_lock held at least shared.
 *
 * Bounded.  At most apikey.failure_max_networks networks are tracked.
 * When the table is full, networks whose bucket has refilled are dropped;
 * if none has, the new network is not tracked (counted in apikey.stats as
 * failure_networks_untracked): refusing it instead would let whoever fills
 * the table block every new client.  State lives in shared memory only:
 * without the preload the limiter is off, and a restart forgets it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>
#include <sys/socket.h>

#include "miscadmin.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/inet.h"
#include "utils/varlena.h"

#include "apikey.h"
#include "compat.h"

typedef struct FailureEntry
{
	ApikeyNetwork key;
	slock_t		mutex;
	double		tat;			/* theoretical arrival time, microseconds */
} FailureEntry;

/* One network of apikey.failure_exempt, as parsed by its check hook. */
typedef struct ExemptNet
{
	uint8		family;
	uint8		bits;
	uint8		addr[16];
} ExemptNet;

typedef struct ExemptList
{
	int			n;
	ExemptNet	nets[FLEXIBLE_ARRAY_MEMBER];
} ExemptList;

static LWLock *failure_lock = NULL;
static HTAB *failure_htab = NULL;

/* GUCs */
static int	failure_limit = 30;
static int	failure_window = 60;	/* seconds */
static int	failure_max_networks = 10000;
static char *failure_exempt_string = NULL;
static ExemptList *failure_exempt = NULL;

/*
 * Parse apikey.failure_exempt: comma-separated networks (cidr or inet
 * syntax).  The parsed list is the setting's "extra".
 */
static bool
check_failure_exempt(char **newval, void **extra, GucSource source)
{
	char	   *raw = pstrdup(*newval);
	List	   *items;
	ListCell   *lc;
	ExemptList *list;
	Size		size;
	int			n = 0;

	if (!SplitIdentifierString(raw, ',', &items))
	{
		GUC_check_errdetail("List syntax is invalid.");
		pfree(raw);
		list_free(items);
		return false;
	}
	size = offsetof(ExemptList, nets) + sizeof(ExemptNet) * Max(list_length(items), 1);
	list = palloc0(size);
	foreach(lc, items)
	{
		const char *item = (const char *) lfirst(lc);
		ExemptNet  *net = &list->nets[n++];
		int			bits;

		net->family = strchr(item, ':') ? PGSQL_AF_INET6 : PGSQL_AF_INET;
		bits = pg_inet_net_pton(net->family, item, net->addr, -1);
		if (bits < 0 || bits > (net->family == PGSQL_AF_INET ? 32 : 128))
		{
			GUC_check_errdetail("\"%s\" is not a network address.", item);
			pfree(raw);
			list_free(items);
			pfree(list);
			return false;
		}
		net->bits = bits;
	}
	list->n = n;
	*extra = apikey_guc_malloc(size);
	if (*extra != NULL)
		memcpy(*extra, list, size);
	pfree(raw);
	list_free(items);
	pfree(list);
	return *extra != NULL;
}

static void
assign_failure_exempt(const char *newval, void *extra)
{
	failure_exempt = (ExemptList *) extra;
}

/* Define the settings; only while shared_preload_libraries loads. */
void
apikey_failurelimit_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		return;

	DefineCustomIntVariable("apikey.failure_limit",
							"Failed verifications a client network may make per apikey.failure_window before it is blocked.",
							"Applies only to a client_addr asserted by a member of apikey_proxy. 0 turns the limiter off.",
							&failure_limit,
							30, 0, INT_MAX / 2,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);
	DefineCustomIntVariable("apikey.failure_window",
							"Window of apikey.failure_limit.",
							NULL,
							&failure_window,
							60, 1, 365 * 24 * 3600,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);
	DefineCustomStringVariable("apikey.failure_exempt",
							   "Client networks the failure limiter never blocks (comma-separated, e.g. 10.0.0.0/8, 2001:db8::/32).",
							   NULL,
							   &failure_exempt_string,
							   "",
							   PGC_SIGHUP, GUC_LIST_INPUT,
							   check_failure_exempt, assign_failure_exempt, NULL);
	DefineCustomIntVariable("apikey.failure_max_networks",
							"Maximum number of client networks the failure limiter tracks at once in shared memory.",
							NULL,
							&failure_max_networks,
							10000, 100, INT_MAX / 2,
							PGC_POSTMASTER, 0,
							NULL, NULL, NULL);
}

Size
apikey_failurelimit_shmem_size(void)
{
	return hash_estimate_size(failure_max_networks, sizeof(FailureEntry));
}

/* Called from shmem_startup with AddinShmemInitLock held. */
void
apikey_failurelimit_shmem_startup(LWLock *lock)
{
	HASHCTL		info;

	failure_lock = lock;
	info.keysize = sizeof(ApikeyNetwork);
	info.entrysize = sizeof(FailureEntry);
	failure_htab = ShmemInitHash("apikey failure limits",
								 failure_max_networks, failure_max_networks,
								 &info, HASH_ELEM | HASH_BLOBS);
}

/* Is addr inside an exempt network? */
static bool
exempt(inet *addr)
{
	int			i;

	for (i = 0; failure_exempt != NULL && i < failure_exempt->n; i++)
	{
		const ExemptNet *net = &failure_exempt->nets[i];
		const uint8 *a = (const uint8 *) ip_addr(addr);
		int			full = net->bits / 8;
		int			rest = net->bits % 8;

		if (net->family != ip_family(addr))
			continue;
		if (memcmp(a, net->addr, full) != 0)
			continue;
		if (rest == 0 || ((a[full] ^ net->addr[full]) & (0xFF << (8 - rest))) == 0)
			return true;
	}
	return false;
}

/* The network addr belongs to: its /32 (IPv4) or /64 (IPv6). */
static void
network_of(inet *addr, ApikeyNetwork *net)
{
	memset(net, 0, sizeof(*net));
	net->dboid = MyDatabaseId;
	net->family = ip_family(addr);
	memcpy(net->prefix, ip_addr(addr), net->family == PGSQL_AF_INET ? 4 : 8);
}

/* Drop entries whose bucket is full again: they hold no state. */
static void
evict_idle(double now)
{
	HASH_SEQ_STATUS status;
	FailureEntry *entry;

	hash_seq_init(&status, failure_htab);
	while ((entry = hash_seq_search(&status)) != NULL)
	{
		if (entry->tat <= now)
			hash_search(failure_htab, &entry->key, HASH_REMOVE, NULL);
	}
}

/*
 * The entry of net, created if needed; NULL when the table is full of
 * networks still paying off failures.  Returns with failure_lock held
 * (shared or exclusive) unless NULL.
 */
static FailureEntry *
find_or_enter(const ApikeyNetwork *net, double now)
{
	FailureEntry *entry;
	bool		found;

	LWLockAcquire(failure_lock, LW_SHARED);
	entry = hash_search(failure_htab, net, HASH_FIND, NULL);
	if (entry != NULL)
		return entry;
	LWLockRelease(failure_lock);

	LWLockAcquire(failure_lock, LW_EXCLUSIVE);
	if (hash_search(failure_htab, net, HASH_FIND, NULL) == NULL &&
		hash_get_num_entries(failure_htab) >= failure_max_networks)
	{
		evict_idle(now);
		if (hash_get_num_entries(failure_htab) >= failure_max_networks)
		{
			LWLockRelease(failure_lock);
			return NULL;
		}
	}
	entry = hash_search(failure_htab, net, HASH_ENTER, &found);
	if (!found)
	{
		SpinLockInit(&entry->mutex);
		entry->tat = 0;
	}
	return entry;
}

/*
 * Claim one failure from addr's budget at now, before the token is looked
 * up.  False when the budget is spent: the verdict is address_blocked,
 * *retry_after says when the next failure is allowed.  addr must be an
 * address asserted by a trusted role.  apikey_failurelimit_settle() gives
 * the claim back if the verdict is not a failure.
 */
bool
apikey_failurelimit_claim(inet *addr, TimestampTz now, int64 *retry_after,
						  ApikeyFailureClaim *claim)
{
	FailureEntry *entry;
	double		t = (double) now;
	double		T;
	double		tau;
	double		seen;
	bool		allowed;

	claim->held = false;
	if (failure_htab == NULL || failure_limit <= 0 || addr == NULL || exempt(addr))
		return true;

	T = (double) failure_window * USECS_PER_SEC / failure_limit;
	tau = T * (failure_limit - 1);
	network_of(addr, &claim->net);
	entry = find_or_enter(&claim->net, t);
	if (entry == NULL)
	{
		apikey_stats_failure_untracked();
		return true;
	}
	SpinLockAcquire(&entry->mutex);
	allowed = apikey_gcra_take(&entry->tat, t, T, tau, &seen);
	SpinLockRelease(&entry->mutex);
	LWLockRelease(failure_lock);

	if (!allowed)
	{
		*retry_after = (int64) ceil(seen - t - tau);
		return false;
	}
	claim->held = true;
	claim->emission = T;
	return true;
}

/* Is code one of the failures the limiter counts? */
static bool
is_counted_failure(ApikeyCode code)
{
	return code == APIKEY_MALFORMED || code == APIKEY_UNKNOWN ||
		code == APIKEY_REVOKED || code == APIKEY_EXPIRED ||
		code == APIKEY_ADDRESS_DENIED;
}

/*
 * Settle a claim once the verdict is known: a failure keeps it, anything
 * else gives it back (this call's own unit only, so a success never
 * refills what earlier failures took).
 */
void
apikey_failurelimit_settle(const ApikeyFailureClaim *claim, ApikeyCode code)
{
	FailureEntry *entry;

	if (!claim->held || is_counted_failure(code))
		return;
	LWLockAcquire(failure_lock, LW_SHARED);
	entry = hash_search(failure_htab, &claim->net, HASH_FIND, NULL);
	if (entry != NULL)
	{
		SpinLockAcquire(&entry->mutex);
		entry->tat -= claim->emission;
		SpinLockRelease(&entry->mutex);
	}
	LWLockRelease(failure_lock);
}
