/*-------------------------------------------------------------------------
 *
 * address.c
 *	  One client, one address: IPv4-mapped IPv6 addresses in IPv4 form.
 *
 * A dual-stack socket reports an IPv4 client as ::ffff:a.b.c.d (node-postgres
 * passes that form on as the client's address), and to PostgreSQL's inet
 * operators that is an IPv6 address no IPv4 network contains.  So every
 * address apikey compares or records is put in its IPv4 form first:
 *
 *	 - a client address, asserted (client_addr) or the connection's, where
 *	   it enters apikey_verify(); so allowlists, usage and failure rows all
 *	   see one address per client;
 *	 - an allowlist entry, when a key is read (keystore.c): a network inside
 *	   ::ffff:0:0/96 with a prefix of 96 bits or more is the IPv4 network it
 *	   maps (::ffff:0:0/96 itself is 0.0.0.0/0, every IPv4 client).  Other
 *	   IPv6 networks, ::/0 included, contain IPv6 clients only.
 *
 * IPv4-compatible addresses (::a.b.c.d, deprecated by RFC 4291) are not
 * mapped: they are IPv6 addresses.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/socket.h>		/* AF_INET, which PGSQL_AF_INET is */

#include "utils/inet.h"

#include "apikey.h"

/* The first 12 bytes of every IPv4-mapped IPv6 address (RFC 4291 2.5.5.2) */
static const unsigned char mapped_prefix[12] =
{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/*
 * A copy of addr (an inet or cidr) in cxt, in IPv4 form if it is an
 * IPv4-mapped IPv6 address or a network inside ::ffff:0:0/96.
 */
inet *
apikey_address_normal(const inet *addr, MemoryContext cxt)
{
	inet	   *res = MemoryContextAllocZero(cxt, sizeof(inet));

	if (ip_family(addr) == PGSQL_AF_INET6 && ip_bits(addr) >= 96 &&
		memcmp(ip_addr(addr), mapped_prefix, sizeof(mapped_prefix)) == 0)
	{
		ip_family(res) = PGSQL_AF_INET;
		ip_bits(res) = ip_bits(addr) - 96;
		memcpy(ip_addr(res), ip_addr(addr) + sizeof(mapped_prefix), 4);
	}
	else
	{
		ip_family(res) = ip_family(addr);
		ip_bits(res) = ip_bits(addr);
		memcpy(ip_addr(res), ip_addr(addr), ip_addrsize(addr));
	}
	SET_INET_VARSIZE(res);
	return res;
}
