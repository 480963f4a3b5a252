--
-- security_mapped_addresses: an IPv4-mapped IPv6 address (::ffff:a.b.c.d,
-- as node-postgres reports an IPv4 client) is the IPv4 client a.b.c.d.
-- Before the fix an IPv4 allowlist denied such a client, and its failures
-- were recorded under a second address.
--  - client addresses (asserted or the connection's) are taken in their
--    IPv4 form;
--  - an allowlist entry inside ::ffff:0:0/96 (prefix 96 or longer) is the
--    IPv4 network it maps, so ::ffff:0:0/96 is every IPv4 client;
--  - other IPv6 networks (::/0 included) match IPv6 clients only, and an
--    IPv4-compatible address (::a.b.c.d, deprecated) is not mapped.
-- Usage here is synchronous (contrib_regression is not in apikey.databases).
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

SELECT key_id AS k4, token AS t4 FROM apikey.issue(owner => 'acme', allowed_cidrs => '{203.0.113.0/24}') \gset
SELECT key_id AS km, token AS tm FROM apikey.issue(owner => 'acme', allowed_cidrs => '{::ffff:198.51.100.0/120}') \gset
SELECT key_id AS ka, token AS ta FROM apikey.issue(owner => 'acme', allowed_cidrs => '{::ffff:0:0/96}') \gset
SELECT key_id AS k6, token AS t6 FROM apikey.issue(owner => 'acme', allowed_cidrs => '{::/0}') \gset
SELECT key_id AS kr, token AS tr FROM apikey.issue('acme') \gset
SELECT apikey.revoke(:kr);

-- (this session is a superuser, so it may assert client_addr)
-- a mapped client against an IPv4 allowlist
SELECT a AS client, (apikey.check(:'t4', NULL, a::inet)).code
  FROM unnest('{::ffff:203.0.113.7,::ffff:203.0.114.7,203.0.113.7,::203.0.113.7}'::text[]) a;
-- an IPv4 client against a mapped allowlist
SELECT a AS client, (apikey.check(:'tm', NULL, a::inet)).code
  FROM unnest('{198.51.100.9,::ffff:198.51.100.9,198.51.101.9}'::text[]) a;
-- ::ffff:0:0/96 is every IPv4 client, and no IPv6 one
SELECT a AS client, (apikey.check(:'ta', NULL, a::inet)).code
  FROM unnest('{192.0.2.1,::ffff:192.0.2.1,2001:db8::1}'::text[]) a;
-- ::/0 is every IPv6 client, and no IPv4 one, mapped or not
SELECT a AS client, (apikey.check(:'t6', NULL, a::inet)).code
  FROM unnest('{2001:db8::1,::1,192.0.2.1,::ffff:192.0.2.1}'::text[]) a;
-- the connection's own address (127.0.0.1) against these allowlists
SELECT (apikey.check(:'tm')).code AS mapped_list, (apikey.check(:'ta')).code AS all_ipv4;
BEGIN;
SELECT apikey.authenticate(:'t4', NULL, '::ffff:203.0.113.7') = :k4 AS authenticated;
COMMIT;

-- one client is one address: its failures, mapped or not, are recorded
-- under the IPv4 form, in one row
SELECT apikey.flush_usage() >= 0 AS flushed;
DELETE FROM apikey.usage_log;
SELECT apikey.verify(:'tr', NULL, '::ffff:192.0.2.44'), apikey.verify(:'tr', NULL, '192.0.2.44'),
       apikey.verify(:'tr', NULL, '::ffff:192.0.2.45/128'), apikey.verify(:'tr', NULL, '2001:db8::44');
SELECT apikey.flush_usage() > 0 AS flushed;
SELECT client_addr, family(client_addr), calls FROM apikey.usage_log
 WHERE key_id = :kr ORDER BY client_addr;
