# Calls counted in a backend's own slot (issue 11: no shared cache line
# written per valid call) reach usage_log exactly, without the backend's
# help:
#  - a session that verifies and then sits idle, connection open, sees its
#    calls written by the usage writer within a few flush intervals;
#  - a session that verifies and disconnects loses nothing;
#  - a backend verifying more distinct keys in a minute than its slot
#    holds still counts every call (the overflow goes to the shared table);
#  - apikey.stats counts every verification, summed over the backends.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;
use Time::HiRes qw(usleep);

my $node = apikey_node('slots', "apikey.usage_flush_interval = '100ms'\n");
apikey_db($node);
$node->safe_psql(
	'postgres', q{
CREATE TABLE tok (n int PRIMARY KEY, key_id bigint, token text);
INSERT INTO tok SELECT g, i.key_id, i.token
  FROM generate_series(1, 600) g, LATERAL apikey.issue(owner => 'o' || g) i;
});

# usage_log's valid calls of the keys in $where
sub logged
{
	my ($where) = @_;
	return $node->safe_psql('postgres',
		"SELECT coalesce(sum(u.calls), 0) FROM apikey.usage_log u JOIN tok t ON t.key_id = u.key_id "
		  . "WHERE u.code = 'valid' AND $where");
}

# wait until usage_log shows $want for $where, without flush_usage()
sub wait_logged
{
	my ($where, $want, $what) = @_;
	my $got;
	for (1 .. 100)
	{
		$got = logged($where);
		last if $got == $want;
		usleep(100_000);
	}
	is($got, $want, $what);
}

# 1. verify 500 times, then stay connected and idle
my $idle = $node->background_psql('postgres');
$idle->query_safe(
	"SELECT count(*) FILTER (WHERE apikey.verify((SELECT token FROM tok WHERE n = 1))) FROM generate_series(1, 500)");
wait_logged('t.n = 1', 500,
	'an idle session\'s 500 calls reach usage_log through the writer alone');

# 2. verify 300 times and disconnect
$node->safe_psql('postgres',
	"SELECT count(*) FILTER (WHERE apikey.verify((SELECT token FROM tok WHERE n = 2))) FROM generate_series(1, 300)");
wait_logged('t.n = 2', 300, 'a session that exited lost none of its 300 calls');

# 3. 600 distinct keys, 3 calls each, in one backend: more than a slot holds
my $stats_before = $node->safe_psql('postgres', "SELECT calls->>'valid' FROM apikey.stats");
$node->safe_psql('postgres',
	"SELECT count(*) FILTER (WHERE apikey.verify(t.token)) FROM generate_series(1, 3) g, LATERAL (SELECT token FROM tok WHERE n > 2 AND g > 0) t");
wait_logged('t.n > 2', 3 * 598, 'one backend, 598 keys x 3 calls: every call counted');

is( $node->safe_psql('postgres', "SELECT calls->>'valid' FROM apikey.stats")
	  - $stats_before,
	3 * 598,
	'apikey.stats counts every verification across backends');

# the idle session is still there and its later calls count too
$idle->query_safe(
	"SELECT count(*) FILTER (WHERE apikey.verify((SELECT token FROM tok WHERE n = 1))) FROM generate_series(1, 7)");
wait_logged('t.n = 1', 507, 'the idle session\'s next calls are added');
$idle->quit;

is($node->safe_psql('postgres', 'SELECT entries_dropped FROM apikey.stats'),
	'0', 'nothing dropped');

$node->stop;
done_testing();
