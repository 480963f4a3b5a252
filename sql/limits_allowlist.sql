-- allowed_cidrs: a key with an allowlist verifies only from an address
-- inside one of its networks.  The address is client_addr when given, else
-- the connection's (inet_client_addr(); pg_regress connects over TCP to
-- localhost here).  Outside, or no address at all: address_denied.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;


INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');

-- The allowlist is stored as given.
SELECT key_id AS a1, token AS ta1
  FROM apikey.issue(owner => 'acme', scopes => '{orders:read}',
                    allowed_cidrs => '{10.0.0.0/8, 192.168.1.0/24, 2001:db8::/32}') \gset
SELECT allowed_cidrs FROM apikey.keys WHERE id = :a1;

-- Inside and outside, IPv4 and IPv6, hosts and networks.  A client that
-- claims a network wider than an allowed one is outside.  An IPv4-mapped
-- IPv6 address is its IPv4 client (security_mapped_addresses).
SELECT a.addr, c.valid, c.code, c.key_id = :a1 AS same_key
  FROM (VALUES (1, '10.1.2.3'::inet), (2, '10.255.255.255'), (3, '192.168.1.77'),
               (4, '2001:db8::1'), (5, '2001:db8:ffff::42'), (6, '10.1.0.0/16'),
               (7, '11.0.0.1'), (8, '9.255.255.255'), (9, '192.168.2.1'), (10, '2001:db9::1'),
               (11, '::ffff:10.1.2.3'), (12, '0.0.0.0/0'), (13, '10.0.0.0/7'), (14, '::/0')) AS a(n, addr),
       LATERAL apikey.check(:'ta1', NULL, a.addr) c
 ORDER BY a.n;

-- verify() and authenticate() take the same argument.
SELECT apikey.verify(:'ta1', NULL, '10.9.9.9') AS inside, apikey.verify(:'ta1', NULL, '172.16.0.1') AS outside;
SELECT apikey.authenticate(:'ta1', 'orders:read', '192.168.1.1') = :a1 AS authenticated;
SELECT apikey.authenticate(:'ta1', 'orders:read', '192.168.3.1');
\set VERBOSITY sqlstate
SELECT apikey.authenticate(:'ta1', 'orders:read', '192.168.3.1');
\set VERBOSITY default
SELECT apikey.current_key_id() IS NULL AS nothing_bound;

-- Without client_addr the connection's address is used: this session comes
-- from the loopback address, which this allowlist does not contain...
SELECT code FROM apikey.check(:'ta1');
SELECT code FROM apikey.check(:'ta1', 'orders:read', NULL);
SELECT apikey.authenticate(:'ta1');
-- ...and this one does.
SELECT key_id AS lo, token AS tlo FROM apikey.issue(owner => 'acme', allowed_cidrs => '{127.0.0.0/8, ::1/128}') \gset
SELECT inet_client_addr() <<= ANY ('{127.0.0.0/8, ::1/128}'::cidr[]) AS connected_over_loopback;
SELECT code FROM apikey.check(:'tlo');
SELECT apikey.authenticate(:'tlo') = :lo AS authenticated_from_connection_address;
-- An explicit client_addr wins over the connection's address.
SELECT code FROM apikey.check(:'tlo', NULL, '203.0.113.5');

-- Keys without an allowlist verify from anywhere.
SELECT key_id AS any, token AS tany FROM apikey.issue(owner => 'acme') \gset
SELECT code FROM apikey.check(:'tany', NULL, '203.0.113.5');
SELECT code FROM apikey.check(:'tany', NULL, '2001:db8::1');

-- Order of the checks: revoked and expired come before the address; the
-- address comes before the scope, the rate limit and the quota, and a
-- refusal there spends neither a request nor a credit.
SELECT key_id AS a2, token AS ta2
  FROM apikey.issue(owner => 'acme', scopes => '{orders:read}', allowed_cidrs => '{10.0.0.0/8}',
                    rate_limit => 1, rate_window => '1 hour', quota => 5) \gset
SELECT code FROM apikey.check(:'ta2', 'orders:write', '11.0.0.1');
SELECT code FROM apikey.check(:'ta2', 'orders:read', '11.0.0.1');
SELECT code FROM apikey.check(:'ta2', NULL, '11.0.0.1');
SELECT remaining AS quota_untouched FROM apikey.quotas WHERE key_id = :a2;
SELECT code, remaining FROM apikey.check(:'ta2', 'orders:read', '10.0.0.1');
SELECT code FROM apikey.check(:'ta2', 'orders:write', '10.0.0.1');
SELECT code FROM apikey.check(:'ta2', 'orders:read', '10.0.0.1');
UPDATE apikey.keys SET expires_at = now() - interval '1 second' WHERE id = :a2;
SELECT code FROM apikey.check(:'ta2', NULL, '11.0.0.1');
SELECT apikey.revoke(:a2);
SELECT code FROM apikey.check(:'ta2', NULL, '11.0.0.1');

-- set_limits() replaces the allowlist at once (the key cache is invalidated).
SELECT key_id AS a3, token AS ta3 FROM apikey.issue(owner => 'acme', allowed_cidrs => '{10.0.0.0/8}') \gset
SELECT code FROM apikey.check(:'ta3', NULL, '172.16.0.1');
SELECT apikey.set_limits(:a3, allowed_cidrs => '{172.16.0.0/12}');
SELECT code FROM apikey.check(:'ta3', NULL, '172.16.0.1');
SELECT code FROM apikey.check(:'ta3', NULL, '10.0.0.1');
SELECT apikey.set_limits(:a3, allowed_cidrs => NULL);
SELECT allowed_cidrs IS NULL AS no_allowlist FROM apikey.keys WHERE id = :a3;
SELECT code FROM apikey.check(:'ta3', NULL, '10.0.0.1');
SELECT code FROM apikey.check(:'ta3', NULL, '198.51.100.7');
-- ...and so does an UPDATE of the column by the administrator.
UPDATE apikey.keys SET allowed_cidrs = '{198.51.100.0/24}' WHERE id = :a3;
SELECT code FROM apikey.check(:'ta3', NULL, '198.51.100.7');
SELECT code FROM apikey.check(:'ta3', NULL, '198.51.101.7');

-- Usage records the refused address; a success is counted without one.
SELECT apikey.flush_usage() > 0 AS flushed;
SELECT code, client_addr, sum(calls) AS calls
  FROM apikey.usage_log WHERE key_id = :a3 GROUP BY code, client_addr ORDER BY code, client_addr;
