# Crash recovery under load.
#
# pgbench issues keys, revokes random ones and verifies random ones; every
# committed issue, revocation and verification is recorded in a side table
# in the same transaction, so the test knows exactly what committed.  The
# server is then stopped with -m immediate (a crash: shared memory is lost,
# WAL is replayed) three times.  After each restart:
#   - every committed key verifies (valid, or revoked if its revocation
#     committed), and the tables hold exactly the committed keys and
#     revocations;
#   - no key exists without its key_scopes rows (no half-issued key);
#   - the usage written to apikey.usage_log lost only the calls made after
#     the usage writer's last committed flush (about one flush interval's
#     worth), and never counted a call twice.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;
use Time::HiRes qw(time);

my $flush_ms = 100;
my $load_seconds = 3;
my $clients = 4;
my $crashes = 3;

my $node = apikey_node(
	'crash', qq{
apikey.usage_flush_interval = '${flush_ms}ms'
max_connections = 30
# room for a counter per key: the last round checks every committed key
# (10,000 and more on a fast machine) in one statement
apikey.usage_max_entries = 200000
});
apikey_db($node);
$node->safe_psql(
	'postgres', q{
INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
-- What committed, written in the same transaction as the work itself.
CREATE TABLE ledger (key_id bigint PRIMARY KEY, token text NOT NULL,
                     revoked boolean NOT NULL DEFAULT false);
CREATE TABLE calls (id bigserial PRIMARY KEY, ok boolean, ts timestamptz NOT NULL);
INSERT INTO ledger (key_id, token)
SELECT key_id, token FROM generate_series(1, 200) i,
       LATERAL apikey.issue('seed-' || i, '{orders:read, orders:write}');
});

my %scripts = (
	'issue.sql' => q{
INSERT INTO ledger (key_id, token)
SELECT key_id, token FROM apikey.issue('load', '{orders:read, orders:write}', metadata => '{"by": "pgbench"}');
},
	'revoke.sql' => q{
WITH pick AS (SELECT key_id FROM ledger
               WHERE NOT revoked AND key_id >= (SELECT (random() * max(key_id))::bigint FROM ledger)
               ORDER BY key_id LIMIT 1 FOR UPDATE SKIP LOCKED),
     done AS (SELECT key_id, apikey.revoke(key_id, 'load') AS revoked_now FROM pick)
UPDATE ledger l SET revoked = true FROM done WHERE l.key_id = done.key_id;
},
	'verify.sql' => q{
INSERT INTO calls (ok, ts)
SELECT apikey.verify(t.token, 'orders:read'), clock_timestamp()
  FROM (SELECT l.token FROM ledger l
         WHERE l.key_id >= (SELECT (random() * max(key_id))::bigint FROM ledger)
         ORDER BY l.key_id LIMIT 1) t;
},);
my %weights = ('issue.sql' => 2, 'revoke.sql' => 1, 'verify.sql' => 8);
my @script_args;
for my $name (sort keys %scripts)
{
	my $file = $node->basedir . "/$name";
	append_to_file($file, $scripts{$name});
	push @script_args, '-f', "$file\@$weights{$name}";
}

# Loss so far: committed calls minus calls in usage_log.  Measured right
# after a restart, before anything else runs, so shared memory is empty.
sub usage_totals
{
	my ($calls, $usage) = split /\|/,
	  $node->safe_psql('postgres',
		q{SELECT (SELECT count(*) FROM calls), (SELECT coalesce(sum(calls), 0) FROM apikey.usage_log)});
	return ($calls, $usage);
}

my ($calls0, $usage0) = usage_totals();
my $prev_loss = $calls0 - $usage0;
is($prev_loss, 0, 'no usage before the load');

for my $round (1 .. $crashes)
{
	my ($out, $err) = ('', '');
	my $pgbench = IPC::Run::start(
		[
			'pgbench', '-n', '-c', $clients, '-j', 2, '-T', 300,
			@script_args, '-h', $node->host, '-p', $node->port, 'postgres'
		],
		'>', \$out, '2>', \$err,
		IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default));

	# Let the load run, making sure something committed of each kind.
	my $started = time;
	$node->poll_query_until('postgres',
		q{SELECT (SELECT count(*) FROM ledger WHERE revoked) > 0 AND (SELECT count(*) FROM calls) > 0})
	  or die 'load did not start';
	my $wait = $load_seconds - (time - $started);
	sleep($wait) if $wait > 0;

	$node->stop('immediate');
	$pgbench->finish;
	note "round $round: pgbench exit " . ($? >> 8) . ' after the crash';
	$node->start;

	# 1. Usage: compare before anything else touches the counters.
	my ($calls, $usage) = usage_totals();
	my $loss = ($calls - $usage) - $prev_loss;
	my ($window_calls, $gap_ms, $epoch_usage) = split /\|/,
	  $node->safe_psql(
		'postgres', qq{
WITH last_flush AS (SELECT max(last_used_at) AS t FROM apikey.keys)
SELECT (SELECT count(*) FROM calls, last_flush
         WHERE calls.ts > last_flush.t - interval '@{[ 2 * $flush_ms ]} milliseconds'),
       round(extract(epoch FROM (SELECT max(ts) FROM calls) - (SELECT t FROM last_flush)) * 1000),
       $usage - $usage0});
	note "round $round: $calls committed calls in total, usage_log holds $usage; "
	  . "lost this round: $loss; calls committed since the last persisted flush (less "
	  . "2 intervals of slack): $window_calls; last committed call came ${gap_ms} ms after "
	  . "the last persisted flush (flush interval ${flush_ms} ms)";
	cmp_ok($epoch_usage, '>', 0, "round $round: the usage writer persisted usage during the load");
	cmp_ok($loss, '>=', -$clients,
		"round $round: no call counted twice (at most one in-flight call per client)");
	cmp_ok($loss, '<=', $window_calls + $clients,
		"round $round: only calls after the last committed flush were lost");
	$prev_loss += $loss;
	$usage0 = $usage;

	# 2. Keys and revocations are exactly what committed.
	my $state = $node->safe_psql(
		'postgres', q{
SELECT (SELECT count(*) FROM ledger),
       (SELECT count(*) FROM ledger WHERE revoked),
       (SELECT count(*) FROM apikey.keys k WHERE NOT EXISTS (SELECT FROM ledger l WHERE l.key_id = k.id)),
       (SELECT count(*) FROM ledger l WHERE NOT EXISTS (SELECT FROM apikey.keys k WHERE k.id = l.key_id)),
       (SELECT count(*) FROM ledger l
         WHERE l.revoked <> EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id = l.key_id)),
       (SELECT count(*) FROM apikey.revocations r WHERE NOT EXISTS (SELECT FROM ledger l WHERE l.key_id = r.key_id)),
       (SELECT count(*) FROM apikey.keys k
         WHERE (SELECT count(*) FROM apikey.key_scopes s WHERE s.key_id = k.id) <> 2)
});
	my ($nkeys, $nrevoked, $ghost_keys, $lost_keys, $wrong_rev, $ghost_rev, $half) =
	  split /\|/, $state;
	note "round $round: $nkeys committed keys, $nrevoked committed revocations";
	is($ghost_keys, 0, "round $round: no key exists whose issue did not commit");
	is($lost_keys, 0, "round $round: every committed key exists");
	is($wrong_rev, 0, "round $round: every key is revoked iff its revocation committed");
	is($ghost_rev, 0, "round $round: no revocation of an unknown key");
	is($half, 0, "round $round: no key without its key_scopes rows");

	# 3. Every committed key verifies as it should, through the C path.
	#    These checks are calls too: recorded in the same statement.
	my ($checked, $right) = split /\|/,
	  $node->safe_psql(
		'postgres', q{
WITH v AS MATERIALIZED (
	SELECT l.revoked, (apikey.check(l.token, 'orders:write')).code AS code FROM ledger l),
ins AS (INSERT INTO calls (ok, ts) SELECT code = 'valid', clock_timestamp() FROM v)
SELECT count(*), count(*) FILTER (WHERE code = CASE WHEN revoked THEN 'revoked' ELSE 'valid' END) FROM v
});
	is($right, $checked, "round $round: all $checked committed keys verify as committed");
}

# A clean shutdown after the last round loses nothing more.  (Counts the
# usage table had no room for are dropped by design; none here.)
is($node->safe_psql('postgres', 'SELECT entries_dropped FROM apikey.stats'),
	'0', 'no count dropped for want of room in shared memory');
$node->stop('fast');
$node->start;
my ($calls, $usage) = usage_totals();
is($calls - $usage, $prev_loss, 'a clean shutdown flushes every call');
note "total loss over $crashes crashes: $prev_loss of $calls calls";

$node->stop;
done_testing();
