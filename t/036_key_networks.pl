# The networks each key succeeds from (issue 12), collected in shared
# memory on the valid path and written to apikey.key_networks by the usage
# writer:
#  - valid calls from asserted addresses appear after apikey.flush_usage(),
#    aggregated to /24 and /48 (IPv4-mapped IPv6 as IPv4), with exact call
#    counts, calls in a rolled-back transaction included; failures are not
#    recorded;
#  - without an asserted address, the connection's address is recorded;
#  - later calls add up, and a network unseen for 30 days is first seen
#    again; key_status shows the latest network;
#  - a failing write to key_networks does not stop the usage flush, and
#    loses nothing;
#  - when apikey.network_max_entries is full, what does not fit is counted
#    in apikey.stats.network_overflow: recorded + overflow = calls made.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = apikey_node('networks',
	"apikey.usage_flush_interval = '200ms'\n"
	  . "apikey.network_max_entries = 100\n"
	  . "listen_addresses = '127.0.0.1'\n");
$node->append_conf('pg_hba.conf', "host all all 127.0.0.1/32 trust\n");
$node->reload;
apikey_db($node);
token_table($node);
$node->safe_psql(
	'postgres', q{
INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
INSERT INTO tok SELECT 'a', key_id, token FROM apikey.issue('acme', '{orders:read}');
INSERT INTO tok SELECT 'b', key_id, token FROM apikey.issue('acme');
INSERT INTO tok SELECT 'c', key_id, token FROM apikey.issue('initech');
INSERT INTO tok SELECT 'd', key_id, token FROM apikey.issue('hooli');
INSERT INTO tok SELECT 'gone', key_id, token FROM apikey.issue('initech');
SELECT apikey.revoke(kid('gone'));
});

# key_networks of key $name: "network:calls" sorted
sub networks_of
{
	my ($name) = @_;
	return $node->safe_psql('postgres',
		"SELECT coalesce(string_agg(network || ':' || calls, ' ' ORDER BY network), '') "
		  . "FROM apikey.key_networks WHERE key_id = kid('$name')");
}

# 1. Asserted addresses (the test's superuser may assert them).
$node->safe_psql(
	'postgres', q{
SELECT apikey.verify(tok('a'), NULL, '192.0.2.10') FROM generate_series(1, 3);
SELECT apikey.verify(tok('a'), NULL, '192.0.2.200') FROM generate_series(1, 2);
SELECT apikey.verify(tok('a'), 'orders:read', '2001:db8:1:2::5') FROM generate_series(1, 4);
SELECT apikey.verify(tok('a'), NULL, '2001:db8:1:ffff::1');
SELECT apikey.verify(tok('a'), NULL, '::ffff:198.51.100.7') FROM generate_series(1, 2);
-- failures are not recorded
SELECT apikey.verify(tok('a'), 'orders:write', '203.0.113.1') FROM generate_series(1, 5);
SELECT apikey.verify(tok('gone'), NULL, '203.0.113.1') FROM generate_series(1, 5);
});
# a rolled-back transaction's calls count
$node->safe_psql(
	'postgres', q{
BEGIN;
SELECT apikey.verify(tok('b'), NULL, '192.0.2.50') FROM generate_series(1, 2);
ROLLBACK;
});
# no asserted address: the connection's (127.0.0.1 over TCP; a Unix
# socket has none, so nothing)
my $tcp = $node->connstr('postgres') . ' host=127.0.0.1';
my ($stdout, $stderr);
$node->psql('postgres', "SELECT apikey.verify(tok('c')) FROM generate_series(1, 7)",
	connstr => $tcp, stdout => \$stdout, stderr => \$stderr, on_error_die => 1);
$node->safe_psql('postgres', "SELECT apikey.verify(tok('c')) FROM generate_series(1, 3)");

$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
is(networks_of('a'), '192.0.2.0/24:5 198.51.100.0/24:2 2001:db8:1::/48:5',
	'valid calls recorded per /24 and /48, mapped IPv6 as IPv4, exact counts, failures not');
is(networks_of('b'), '192.0.2.0/24:2', 'calls of a rolled-back transaction are recorded');
is(networks_of('c'), '127.0.0.0/24:7', 'without client_addr, the connection\'s address (none over a Unix socket)');
is(networks_of('gone'), '', 'a revoked key\'s attempts are not recorded');
is($node->safe_psql('postgres',
		"SELECT bool_and(first_seen <= last_seen AND last_seen <= now()) FROM apikey.key_networks"),
	't', 'first_seen <= last_seen <= now');

# 2. More calls add up; key_status shows the latest network.
$node->safe_psql('postgres',
	"SELECT apikey.verify(tok('b'), NULL, '2001:db8:2::1') FROM generate_series(1, 4)");
$node->safe_psql('postgres',
	"SELECT apikey.verify(tok('b'), NULL, '192.0.2.51') FROM generate_series(1, 3)");
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
is(networks_of('b'), '192.0.2.0/24:5 2001:db8:2::/48:4', 'a second flush adds to the counts');
is($node->safe_psql('postgres', "SELECT last_used_network FROM apikey.key_status WHERE key_id = kid('b')"),
	'192.0.2.0/24', 'key_status.last_used_network is the latest');

# 3. A network unseen for 30 days is first seen again; one seen 20 days
#    ago is not.
$node->safe_psql(
	'postgres', q{
UPDATE apikey.key_networks SET first_seen = now() - '60 days'::interval,
	   last_seen = now() - (CASE WHEN network = '198.51.100.0/24' THEN 40 ELSE 20 END || ' days')::interval
 WHERE key_id = kid('a');
SELECT apikey.verify(tok('a'), NULL, '198.51.100.9');
SELECT apikey.verify(tok('a'), NULL, '192.0.2.9');
SELECT apikey.flush_usage();
});
is($node->safe_psql('postgres',
		"SELECT string_agg(network || ':' || calls || ':' || (now() - first_seen < '1 hour'), ' ' ORDER BY network) "
		  . "FROM apikey.key_networks WHERE key_id = kid('a') AND last_seen > now() - '1 hour'::interval"),
	'192.0.2.0/24:6:false 198.51.100.0/24:3:true',
	'a network back after 30 days is first seen again, one back after 20 days is not');

# 4. A failing write to key_networks is a WARNING: usage is flushed all
#    the same, and the networks' counts wait for a flush that succeeds.
my $valid_b = q{SELECT sum(calls) FROM apikey.usage_log WHERE key_id = kid('b') AND code = 'valid'};
my $usage_before = $node->safe_psql('postgres', $valid_b);
$node->safe_psql('postgres',
	'ALTER TABLE apikey.key_networks ADD CONSTRAINT regress_refuse CHECK (calls < 0) NOT VALID');
$node->safe_psql('postgres',
	"SELECT apikey.verify(tok('b'), NULL, '192.0.2.77') FROM generate_series(1, 6)");
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
is($node->safe_psql('postgres', $valid_b), $usage_before + 6, 'usage is flushed while key_networks cannot be written');
like(slurp_file($node->logfile), qr/WARNING:  apikey could not write apikey\.key_networks/,
	'the failure is a WARNING in the log');
is(networks_of('b'), '192.0.2.0/24:5 2001:db8:2::/48:4', 'nothing was written meanwhile');
$node->safe_psql('postgres', 'ALTER TABLE apikey.key_networks DROP CONSTRAINT regress_refuse');
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
is(networks_of('b'), '192.0.2.0/24:11 2001:db8:2::/48:4', 'the kept counts are written by the next flush, exactly');

# 5. Overflow: 600 networks for one key, with room for 100 in shared
#    memory (and at most 256 in the backend's slot).  The writer must not
#    flush in the middle of the statement (a flush makes room), so it
#    flushes only when asked from here on.
$node->safe_psql('postgres', "ALTER SYSTEM SET apikey.usage_flush_interval = '1h'");
$node->reload;
sleep 1;
$node->safe_psql('postgres',
	"SELECT apikey.verify(tok('d'), NULL, ('10.' || g / 256 || '.' || g % 256 || '.1')::inet) FROM generate_series(0, 599) g");
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
my ($rows, $calls, $overflow) = split /\|/, $node->safe_psql('postgres',
	"SELECT count(*), sum(calls), (SELECT network_overflow FROM apikey.stats) "
	  . "FROM apikey.key_networks WHERE key_id = kid('d')");
note("recorded $rows networks ($calls calls), $overflow calls overflowed");
cmp_ok($rows, '>=', 100, 'the shared table filled up');
cmp_ok($rows, '<=', 356, 'and no more than it and a slot hold were recorded');
is($calls + $overflow, 600, 'every call is recorded or counted in network_overflow');
# the table has room again after the flush
$node->safe_psql('postgres', "SELECT apikey.verify(tok('d'), NULL, '10.9.0.1')");
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
is(networks_of('d') =~ /10\.9\.0\.0\/24:1/ ? 1 : 0, 1, 'after a flush there is room again');
is($node->safe_psql('postgres', 'SELECT network_overflow FROM apikey.stats'), $overflow,
	'and nothing more overflowed');

$node->stop;
done_testing();
