# The detector's failures-by-network table (src/netwatch.c) is bounded by
# its 4096-network cap, not by the server's free shared memory:
#  - failures from far more distinct networks than the cap leave at most
#    the cap in apikey._network_failures(), and the rest are counted in
#    apikey.stats.failure_networks_unwatched (counted = calls made);
#  - the server can still allocate shared memory afterwards (here: a
#    transaction that creates tables and so takes many locks).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $cap = 4096;
my $calls = 30000;
my $node = apikey_node('netwatch');
apikey_db($node);

# One malformed token from each of $calls distinct /64s (asserted
# addresses: the test's superuser may assert them).
$node->safe_psql(
	'postgres', qq{
SELECT count(*) FROM (
  SELECT apikey.verify('ak_garbage', NULL,
         ('2001:db8:' || to_hex(i >> 16) || ':' || to_hex(i & 65535) || '::1')::inet)
    FROM generate_series(1, $calls) i) s;
});

my $watched = $node->safe_psql('postgres',
	"SELECT count(*) FROM apikey._network_failures(now() - interval '1 hour')");
cmp_ok($watched, '<=', $cap, "at most $cap networks watched ($watched)");
is($node->safe_psql('postgres',
		'SELECT failure_networks_unwatched FROM apikey.stats'),
	$calls - $watched, 'every failure not watched is counted as unwatched');

# Shared memory left for the rest of the server: many locks in one
# transaction (beyond the lock table's initial size).
my ($ret, $stdout, $stderr) = $node->psql(
	'postgres', q{
DO $$
BEGIN
  FOR i IN 1..300 LOOP
    EXECUTE format('CREATE TABLE after_%s (a int)', i);
  END LOOP;
END
$$;
CREATE TABLE after_last (a int);
});
is($ret, 0, 'the server can still create objects');
is($stderr, '', 'no out of shared memory');

$node->stop;
done_testing();
