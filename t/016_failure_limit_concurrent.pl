# The failure limiter under real concurrency: 8 pgbench clients (4
# threads) hammer one client network with bad tokens at the same time,
# asserted by a trusted proxy role, mixed with valid calls from the same
# network.  Exactly apikey.failure_limit failures are judged (the budget is
# claimed atomically), everything after is address_blocked, valid calls
# neither spend nor refill it, and another network is untouched.
#
# Tokens stay in a table on the server: no token appears in a script.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use ApikeyTest;

my $limit = 100;
my $node = apikey_node('failure', qq{
apikey.failure_limit = $limit
apikey.failure_window = '1h'
});
apikey_db($node);
token_table($node);
$node->safe_psql(
	'postgres', q{
INSERT INTO tok SELECT 'good', key_id, token FROM apikey.issue(owner => 'acme');
CREATE ROLE gateway LOGIN;
GRANT apikey_proxy TO gateway;
GRANT SELECT ON tok TO gateway;
GRANT EXECUTE ON FUNCTION tok(text) TO gateway;
});

my $before = $node->safe_psql('postgres',
	q{SELECT coalesce((calls->>'malformed')::int, 0) + coalesce((calls->>'unknown')::int, 0) FROM apikey.stats});

# 8 clients x 100 transactions x (2 bad tokens + 1 valid) from 203.0.113.9
$node->pgbench(
	'-n -c 8 -j 4 -t 100 -U gateway',
	0,
	[qr/number of transactions actually processed: 800\/800/],
	[qr/^$/],
	'pgbench: 8 clients failing from one network at once',
	{
		'fail.sql' => q{
SELECT apikey.check('ak_garbage', NULL, '203.0.113.9');
SELECT apikey.check(tok('good'), NULL, '203.0.113.9');
SELECT apikey.check(substr(tok('good'), 1, 20) || 'x', NULL, '203.0.113.9');
}
	});

is( $node->safe_psql(
		'postgres',
		q{SELECT coalesce((calls->>'malformed')::int, 0) + coalesce((calls->>'unknown')::int, 0) FROM apikey.stats})
	  - $before,
	$limit,
	'exactly failure_limit failures were judged');
my ($blocked, $valid) = split /\|/,
  $node->safe_psql('postgres',
	q{SELECT (calls->>'address_blocked')::int, (calls->>'valid')::int FROM apikey.stats});
is($blocked + $valid, 2400 - $limit, 'every other call was valid or address_blocked');
cmp_ok($valid, '<=', 800, 'valid calls only before the budget ran out');
is( $node->safe_psql(
		'postgres', q{SET ROLE gateway; SELECT code FROM apikey.check(tok('good'), NULL, '203.0.113.9')}),
	'address_blocked', 'the network stays blocked, valid token or not');
is( $node->safe_psql(
		'postgres', q{SET ROLE gateway; SELECT code FROM apikey.check(tok('good'), NULL, '203.0.113.10')}),
	'valid', 'another network is untouched');
is($node->safe_psql('postgres', q{SELECT code FROM apikey.check(tok('good'))}),
	'valid', "the connection's own address is never limited");

$node->stop;
done_testing();
