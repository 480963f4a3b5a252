# Exact usage totals under concurrency: 4 pgbench clients make 2000
# transactions of 4 verifications each (valid, revoked, unknown, malformed;
# refusals from 40 client addresses) while the usage writer flushes every
# 50ms.  Once everything is flushed, usage_log holds exactly 8000 more
# calls, 2000 more per code: no call lost, none written twice.  The revoked
# key's refusals keep at most 16 addresses per minute.  The run is
# made twice: with the usage writer alone, then with another client calling
# apikey.flush_usage() in a loop at the same time.
#
# Tokens stay in a table on the server: no token appears in a script.
use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $clients = 4;
my $per_client = 500;
my $xacts = $clients * $per_client;

my $node = apikey_node(
	'totals', q{
apikey.usage_flush_interval = '50ms'
max_connections = 20
track_functions = 'all'
});
apikey_db($node);
token_table($node);
$node->safe_psql(
	'postgres', q{
INSERT INTO tok SELECT 'good', key_id, token FROM apikey.issue(owner => 'acme');
INSERT INTO tok SELECT 'gone', key_id, token FROM apikey.issue(owner => 'acme');
INSERT INTO tok SELECT 'deleted', key_id, token FROM apikey.issue(owner => 'acme');
SELECT apikey.revoke(key_id) FROM tok WHERE name = 'gone';
DELETE FROM apikey.keys WHERE id = (SELECT key_id FROM tok WHERE name = 'deleted');
});

my $flusher_script = $node->basedir . '/flusher.sql';
append_to_file($flusher_script, "SELECT apikey.flush_usage();\n");

# One pgbench run, then wait until everything is flushed and check the
# totals; $round is 1 or 2, for the cumulative totals.
sub run_and_check
{
	my ($round, $with_flusher) = @_;
	my $what = $with_flusher ? 'writer + concurrent flush_usage()' : 'writer alone';
	my $flusher;

	if ($with_flusher)
	{
		$flusher = IPC::Run::start(
			[
				'pgbench', '-n', '-c', '1', '-T', '600', '-f', $flusher_script,
				'-h', $node->host, '-p', $node->port, 'postgres'
			],
			'>', \my $f_out, '2>', \my $f_err);
	}

	$node->pgbench(
		"-n -c $clients -j 2 -t $per_client",
		0,
		[qr/number of transactions actually processed: $xacts\/$xacts/],
		[qr/^$/],
		"$what: pgbench, 4 verifications per transaction",
		{
			"verify$round.sql" => q{
\set a random(1, 40)
SELECT apikey.check(tok('good'));
SELECT apikey.verify(tok('gone'), NULL, ('192.0.2.' || :a)::inet);
SELECT apikey.check(tok('deleted'), NULL, ('198.51.100.' || :a)::inet);
SELECT apikey.check('ak_garbage', NULL, ('203.0.113.' || :a)::inet);
}
		});

	if ($with_flusher)
	{
		$flusher->kill_kill;
		ok( $node->poll_query_until(
				'postgres', q{
SELECT coalesce(sum(calls), 0) > 0 FROM pg_stat_user_functions
 WHERE schemaname = 'apikey' AND funcname = 'flush_usage'}),
			"$what: the concurrent flusher ran");
		note 'concurrent flush_usage() calls: '
		  . $node->safe_psql('postgres',
			q{SELECT sum(calls) FROM pg_stat_user_functions WHERE funcname = 'flush_usage'});
	}
	note 'flushes: ' . $node->safe_psql('postgres', 'SELECT flushes FROM apikey.stats');

	# Wait for the writer to catch up, then flush whatever is left.
	ok($node->poll_query_until('postgres', 'SELECT entries_pending = 0 FROM apikey.stats'),
		"$what: usage writer caught up");
	$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');

	my $per_code = $round * $xacts;
	my $total = 4 * $per_code;
	is($node->safe_psql('postgres', 'SELECT sum(calls) FROM apikey.usage_log'),
		$total, "$what: usage_log holds exactly $total calls");
	is( $node->safe_psql(
			'postgres', q{
SELECT string_agg(code || ':' || c, ' ' ORDER BY code)
  FROM (SELECT code, sum(calls) AS c FROM apikey.usage_log GROUP BY code) s}),
		"malformed:$per_code revoked:$per_code unknown:$per_code valid:$per_code",
		"$what: exactly one count per verification, per code");
	like( $node->safe_psql(
			'postgres', q{
SELECT (SELECT max(n) FROM (SELECT count(DISTINCT client_addr) AS n FROM apikey.usage_log
                             WHERE code = 'revoked' GROUP BY bucket) s) || ' '
       || count(*) FILTER (WHERE code = 'revoked' AND client_addr IS NULL) || ' '
       || count(*) FILTER (WHERE code <> 'revoked' AND client_addr IS NOT NULL)
  FROM apikey.usage_log}),
		qr/^16 [1-9]\d* 0$/,
		"$what: the revoked key's refusals kept 16 of their 40 addresses a minute, "
		  . "the rest without; no other row has one");
	is( $node->safe_psql(
			'postgres', q{
SELECT (SELECT sum(value::bigint) FROM jsonb_each_text(calls)) || ' ' || flushed_calls || ' ' || entries_dropped
  FROM apikey.stats}),
		"$total $total 0",
		"$what: apikey.stats: every call counted once, flushed once, none dropped");
}

run_and_check(1, 0);
is( $node->safe_psql(
		'postgres',
		q{SELECT last_used_at IS NOT NULL FROM apikey.keys WHERE id = (SELECT key_id FROM tok WHERE name = 'good')}),
	't', 'last_used_at set');
run_and_check(2, 1);

$node->stop;
done_testing();
