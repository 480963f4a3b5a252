# Restarts.  A clean (fast) shutdown writes every pending usage count before
# the server stops.  After an immediate shutdown (a crash) every committed
# key, revocation and quota debit is still there, and the usage lost is at
# most what had not been flushed yet: what apikey.live_usage showed just
# before the crash.  Nothing is written twice.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = apikey_node('restart', "apikey.usage_flush_interval = '1h'\n");
apikey_db($node);
wait_for_writer($node);
token_table($node);
$node->safe_psql(
	'postgres', q{
INSERT INTO tok SELECT 'k' || g, key_id, token FROM generate_series(1, 4) g, LATERAL apikey.issue(owner => 'acme', name => 'k' || g);
INSERT INTO tok SELECT 'quota', key_id, token FROM apikey.issue(owner => 'acme', quota => 10);
INSERT INTO tok SELECT 'load', key_id, token FROM apikey.issue(owner => 'acme');
SELECT apikey.revoke(key_id) FROM tok WHERE name = 'k2';
});

# Verdicts of all keys, as one string.
my $verdicts = q{
SELECT string_agg(name || ':' || (apikey.check(token)).code, ' ' ORDER BY name)
  FROM tok WHERE name LIKE 'k_'};
is($node->safe_psql('postgres', $verdicts),
	'k1:valid k2:revoked k3:valid k4:valid', 'verdicts before any restart');
$node->safe_psql('postgres', q{SELECT apikey.check(tok('quota')) FROM generate_series(1, 3)});

# 1. Clean shutdown.  The writer flushes once an hour here, so all of this
#    is still pending when the server is told to stop.
$node->safe_psql('postgres', q{SELECT apikey.check(tok('k1')) FROM generate_series(1, 25)});
is( $node->safe_psql(
		'postgres', q{
SELECT (SELECT sum(calls) FROM apikey.live_usage) || ' '
       || (SELECT count(*) FROM apikey.usage_log)}),
	'32 0', 'before the clean shutdown: 32 calls pending, none written');
$node->stop('fast');

# From now on the writer flushes often.
$node->append_conf('postgresql.conf', "apikey.usage_flush_interval = '100ms'\n");
$node->start;
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(coalesce(t.name, '-') || ':' || u.code || ':' || u.calls, ' ' ORDER BY t.name, u.code)
  FROM (SELECT key_id, code, sum(calls) AS calls FROM apikey.usage_log GROUP BY 1, 2) u
  LEFT JOIN tok t USING (key_id)}),
	'k1:valid:26 k2:revoked:1 k3:valid:1 k4:valid:1 quota:valid:3',
	'the clean shutdown wrote every pending count');
is($node->safe_psql('postgres', $verdicts),
	'k1:valid k2:revoked k3:valid k4:valid', 'verdicts after a clean restart');
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
my $logged_before = $node->safe_psql('postgres', 'SELECT sum(calls) FROM apikey.usage_log');

# 2. Crash.  Committed right before it: a revocation and a key.
$node->safe_psql(
	'postgres', q{
SELECT apikey.revoke(key_id) FROM tok WHERE name = 'k3';
INSERT INTO tok SELECT 'k5', key_id, token FROM apikey.issue(owner => 'acme');
});
# Usage in several batches while the writer flushes; then read what is not
# flushed yet, and crash at once.
my $calls = 0;
for my $batch (1 .. 10)
{
	$node->safe_psql('postgres',
		q{SELECT apikey.check(tok('load')) FROM generate_series(1, 100)});
	$calls += 100;
}
my $pending = $node->safe_psql('postgres',
	q{SELECT coalesce(sum(calls), 0) FROM apikey.live_usage});
$node->stop('immediate');
$node->start;

# Usage: only what was pending at the crash may be lost.
my $logged = $node->safe_psql('postgres',
	q{SELECT coalesce(sum(calls), 0) FROM apikey.usage_log
	   WHERE key_id = (SELECT key_id FROM tok WHERE name = 'load')});
my $lost = $calls - $logged;
note "immediate shutdown: $calls calls made, $logged in usage_log, $lost lost; "
  . "$pending were pending (not yet flushed) just before the crash";
ok($logged <= $calls, 'no call written twice');
ok($lost <= $pending, 'at most the calls pending at the crash were lost');
is($node->safe_psql('postgres',
		q{SELECT sum(calls) FROM apikey.usage_log WHERE key_id <> (SELECT key_id FROM tok WHERE name = 'load')}),
	$logged_before, 'usage written before the crash is intact');

# Committed state survived.
is($node->safe_psql('postgres', $verdicts),
	'k1:valid k2:revoked k3:revoked k4:valid k5:valid',
	'after the crash: committed keys verify, committed revocations hold');
is( $node->safe_psql(
		'postgres',
		q{SELECT remaining FROM apikey.quotas WHERE key_id = (SELECT key_id FROM tok WHERE name = 'quota')}),
	'7', 'committed quota debits survived');

# The writer is back and usage is written again.
ok( $node->poll_query_until(
		'postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'apikey usage writer'}),
	'usage writer restarted');
$node->safe_psql('postgres', q{SELECT apikey.check(tok('k5')) FROM generate_series(1, 3)});
ok( $node->poll_query_until(
		'postgres',
		q{SELECT sum(calls) = 4 FROM apikey.usage_log
		   WHERE key_id = (SELECT key_id FROM tok WHERE name = 'k5') AND code = 'valid'}),
	'usage after the crash is written (1 + 3 calls of k5)');

$node->stop;
done_testing();
