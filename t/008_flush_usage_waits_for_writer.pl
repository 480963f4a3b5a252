# apikey.flush_usage() where a usage writer runs asks it to flush
# and waits for it; the caller's transaction takes no counts and holds no
# lock.  So:
#   - a flush in a savepoint that rolls back loses nothing (the totals stay
#     exact);
#   - a session that calls flush_usage() and then stays idle in its
#     transaction stops neither the writer's own flushes nor another
#     session's flush_usage();
#   - with no writer (no worker slot), calls are pending rows and
#     flush_usage() folds them itself.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;
use Time::HiRes qw(time usleep);

my $node = apikey_node('flushwait', "apikey.usage_flush_interval = '1h'\n");
apikey_db($node);
token_table($node);
$node->safe_psql(
	'postgres', q{
INSERT INTO tok SELECT 'k', key_id, token FROM apikey.issue(owner => 'acme');
});
ok( $node->poll_query_until(
		'postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'apikey usage writer'}),
	'usage writer runs');

my $logged = q{SELECT coalesce(sum(calls), 0) FROM apikey.usage_log};

# Poll a query until it returns $want, for at most $seconds; a stuck
# writer should fail the test in seconds, not after the default timeout.
sub poll_for
{
	my ($sql, $want, $seconds) = @_;
	my $deadline = time + $seconds;
	my $got;
	while (time < $deadline)
	{
		$got = $node->safe_psql('postgres', $sql);
		return 1 if $got eq $want;
		usleep(100_000);
	}
	diag "after ${seconds}s: got '$got', want '$want'";
	return 0;
}

# 1. A flush in a savepoint that rolls back.  The writer flushes once an
#    hour here, so the 7 calls are in shared memory when it is asked.
$node->safe_psql('postgres', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 7)});
is($node->safe_psql('postgres', q{SELECT sum(calls) FROM apikey.live_usage}),
	'7', '7 calls pending in shared memory');
is( $node->safe_psql(
		'postgres', q{
BEGIN;
SAVEPOINT s;
SELECT apikey.flush_usage();
ROLLBACK TO SAVEPOINT s;
COMMIT;
}),
	'1', 'flush_usage() in a savepoint that then rolls back');
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
is($node->safe_psql('postgres', $logged), '7',
	'the 7 calls are in usage_log, exactly once');
is($node->safe_psql('postgres', 'SELECT count(*) FROM apikey.live_usage'), '0', 'nothing left pending');

# The same with the whole transaction rolled back, and with an error.
$node->safe_psql('postgres', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 5)});
$node->psql(
	'postgres', q{
BEGIN;
SELECT apikey.flush_usage();
SELECT 1 / 0;
COMMIT;
});
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
is($node->safe_psql('postgres', $logged), '12',
	'a flush in a transaction that fails loses nothing either');

# 2. A session that flushed and stays idle in its transaction.  From now on
#    the writer flushes every 100ms.
$node->append_conf('postgresql.conf', "apikey.usage_flush_interval = '100ms'\n");
$node->reload;
my $idle = $node->background_psql('postgres');
$idle->query_safe('BEGIN');
$idle->query_safe('SELECT apikey.flush_usage()');
$node->safe_psql('postgres', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 3)});
ok(poll_for($logged, '15', 20),
	'the writer flushes new calls while that session stays open');
$node->safe_psql('postgres', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 2)});
my ($ret, $out, $err) = $node->psql(
	'postgres', q{SET statement_timeout = '10s'; SELECT apikey.flush_usage() >= 0},
	on_error_stop => 0);
is($out, 't', 'and another session\'s flush_usage() returns') or diag $err;
is($node->safe_psql('postgres', $logged), '17', 'having written the 2 new calls');
$idle->query_safe('COMMIT');
$idle->quit;

# 3. No writer (no background worker slot for one): calls fall back to
#    pending rows in the caller's transaction, and flush_usage() folds them
#    itself, at once: nothing waits for a writer that cannot start.
$node->append_conf('postgresql.conf', "max_worker_processes = 0\n");
$node->restart;
is( $node->safe_psql(
		'postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'apikey usage writer'}),
	'0', 'no usage writer');
$node->safe_psql('postgres', q{SELECT apikey.check(tok('k'))});
is($node->safe_psql('postgres', 'SELECT count(*) FROM apikey.live_usage'), '0',
	'the call is not counted in shared memory');
is($node->safe_psql('postgres', 'SELECT count(*) FROM apikey.usage_pending'), '1',
	'but as a pending row');
($ret, $out, $err) = $node->psql(
	'postgres', q{SET statement_timeout = '10s'; SELECT apikey.flush_usage()});
is($out, '1', 'flush_usage() folds it itself') or diag $err;
is($node->safe_psql('postgres', $logged), '18', 'exactly once');

ok(!$node->log_contains(qr/PANIC|TRAP/), 'no crash');
$node->stop;
done_testing();
