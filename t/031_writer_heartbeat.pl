# The usage writer's heartbeat (apikey.stats.writer_heartbeat) moves on
# every round, including rounds with nothing to write, so a monitor can
# tell a quiet server from a dead writer.  last_flush cannot: it moves only
# when counts were written, and stays NULL on a server with no traffic.
#
# No key is verified here: every round the writer makes is empty.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = apikey_node('heartbeat', "apikey.usage_flush_interval = '100ms'\n");
apikey_db($node);
ok( $node->poll_query_until(
		'postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'apikey usage writer'}),
	'usage writer runs');

# The heartbeat appears without a single call ...
ok( $node->poll_query_until(
		'postgres', q{SELECT writer_heartbeat IS NOT NULL FROM apikey.stats}),
	'writer_heartbeat is set with no traffic');
my $first = $node->safe_psql('postgres',
	q{SELECT writer_heartbeat FROM apikey.stats});

# ... and keeps moving, while last_flush stays NULL and nothing was flushed.
ok( $node->poll_query_until(
		'postgres',
		qq{SELECT writer_heartbeat > '$first'::timestamptz FROM apikey.stats}),
	'writer_heartbeat moves with no traffic');
is( $node->safe_psql(
		'postgres',
		q{SELECT last_flush IS NULL, flushed_calls, flush_errors,
				 now() - writer_heartbeat < interval '10 s'
			FROM apikey.stats}),
	't|0|0|t',
	'no calls: last_flush stays NULL, heartbeat is recent');

$node->stop;
done_testing();
