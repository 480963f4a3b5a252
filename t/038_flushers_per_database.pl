# Every database where apikey is installed has its own usage writer (a
# flusher, started by the launcher), so usage is counted in shared memory
# in each of them, with no synchronous write:
#   - two databases count in shared memory at once (apikey.live_usage),
#     nothing reaches apikey.usage_pending (no row, no insert in its
#     statistics), and flush_usage() in each writes exact totals;
#   - DROP EXTENSION in one stops its writer while the other keeps counting;
#   - a database created after start gets a writer when the extension is
#     created; left out of apikey.databases at a reload it loses it (after
#     writing what it counted), and gets it back when let in again;
#     DROP DATABASE ... WITH (FORCE) ends it for good;
#   - without a free background worker slot, a database says so once
#     (WARNING, hint max_worker_processes) and writes pending rows,
#     exactly;
#   - an old postgresql.conf that still sets apikey.database starts, with a
#     WARNING; no FATAL for a missing or dropped database, ever.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;
use Time::HiRes qw(usleep);

my $node = apikey_node(
	'flushers', q{
apikey.database = 'gone_long_ago'
apikey.usage_flush_interval = '1h'
});
ok($node->log_contains(qr/WARNING:  apikey.database is no longer used/),
	'an old apikey.database line: the server starts, with a warning');

my $writers = q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'apikey usage writer'};
my $launcher = q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'apikey usage launcher'};
is($node->safe_psql('postgres', $launcher), '1', 'the launcher runs');

sub writer_in
{
	my ($db, $want) = @_;
	return $node->poll_query_until('postgres',
		"SELECT ($writers AND datname = '$db') = $want");
}

# A database with the extension, a token table and key k.
sub db_with_key
{
	my ($db) = @_;
	apikey_db($node, $db);
	token_table($node, $db);
	$node->safe_psql($db,
		q{INSERT INTO tok SELECT 'k', key_id, token FROM apikey.issue(owner => 'acme')});
	return;
}

my $logged = q{SELECT coalesce(sum(calls), 0) FROM apikey.usage_log};
my $live = q{SELECT coalesce(sum(calls), 0) FROM apikey.live_usage};
my $pending = q{SELECT count(*) FROM apikey.usage_pending};
my $inserts = q{SELECT n_tup_ins FROM pg_stat_user_tables
				 WHERE relid = 'apikey.usage_pending'::regclass};

# 1. Two databases, each with its writer.
db_with_key('one');
db_with_key('two');
ok(writer_in('one', 1), 'database one has its usage writer');
ok(writer_in('two', 1), 'database two has its usage writer');
ok($node->log_contains(qr/apikey usage writer started for database "two"/),
	'the writer logged its start');

# The writers flush once an hour here: every count stays in shared memory
# until flush_usage().
$node->safe_psql('one', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 20)});
$node->safe_psql('two', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 30)});
$node->safe_psql('two', q{SELECT apikey.check('nope') FROM generate_series(1, 4)});
is($node->safe_psql('one', "$live; $pending"), "20\n0",
	'one: 20 calls in shared memory, no pending row');
is($node->safe_psql('two', "$live; $pending"), "34\n0",
	'two: 34 calls in shared memory, no pending row');
is($node->safe_psql('one', 'SELECT apikey.flush_usage() >= 0'), 't', 'flush_usage() in one');
is($node->safe_psql('two', 'SELECT apikey.flush_usage() >= 0'), 't', 'flush_usage() in two');
is($node->safe_psql('one', $logged), '20', 'one: usage_log has exactly 20 calls');
is($node->safe_psql('two', $logged), '34', 'two: usage_log has exactly 34 calls');
is( $node->safe_psql(
		'two', q{SELECT code || '=' || sum(calls) FROM apikey.usage_log GROUP BY code ORDER BY code}),
	"malformed=4\nvalid=30", 'two: per code');
is($node->safe_psql('one', $inserts), '0', 'one: not one synchronous write (usage_pending inserts)');
is($node->safe_psql('two', $inserts), '0', 'two: not one synchronous write');
is( $node->safe_psql(
		'two', q{SELECT writer_heartbeat IS NOT NULL FROM apikey.stats}),
	't', 'each database sees its own writer\'s heartbeat');

# 2. DROP EXTENSION in one: its writer stops; two keeps counting.
$node->safe_psql('one', 'DROP EXTENSION apikey CASCADE');
ok(writer_in('one', 0), 'DROP EXTENSION in one: its writer is gone');
ok($node->log_contains(qr/apikey usage writer for database "one" stopped: the extension was dropped/),
	'and said why');
$node->safe_psql('two', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 5)});
is($node->safe_psql('two', "$live; $pending"), "5\n0", 'two still counts in shared memory');
$node->safe_psql('two', 'SELECT apikey.flush_usage()');
is($node->safe_psql('two', $logged), '39', 'two: exactly 39 calls');
ok(writer_in('two', 1), 'two\'s writer runs on');

# 3. A database created after start.
db_with_key('three');
ok(writer_in('three', 1), 'a database created after start gets its writer with the extension');
$node->safe_psql('three', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 7)});
is($node->safe_psql('three', "$live; $pending"), "7\n0", 'three counts in shared memory');
$node->safe_psql('three', 'SELECT apikey.flush_usage()');
is($node->safe_psql('three', $logged), '7', 'three: exactly 7 calls');

# The allow-list: three is left out at a reload.  Its writer writes what
# was counted in shared memory, and stops; calls become pending rows.
$node->safe_psql('three', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 3)});
$node->safe_psql('postgres', "ALTER SYSTEM SET apikey.databases = 'one, two'");
$node->reload;
ok(writer_in('three', 0), 'left out of apikey.databases: three\'s writer stops');
ok( $node->log_contains(
		qr/apikey usage writer for database "three" stopped: the database is no longer in apikey.databases/),
	'and says why');
is($node->safe_psql('three', $logged), '10', 'having written the 3 calls it had counted');
$node->safe_psql('three', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 2)});
is($node->safe_psql('three', "$live; $pending"), "0\n2", 'three now writes pending rows');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET apikey.databases');
$node->reload;
ok(writer_in('three', 1), 'back in the list: three gets its writer again');
$node->safe_psql('three', 'SELECT apikey.flush_usage()');
is($node->safe_psql('three', $logged), '12', 'three: exactly 12 calls');

$node->safe_psql('postgres', 'DROP DATABASE three WITH (FORCE)');
sleep 3;
is($node->safe_psql('postgres', "$writers AND datname = 'three'"), '0',
	'DROP DATABASE ... WITH (FORCE): its writer is gone and not restarted');
is($node->safe_psql('postgres', "$writers AND datname IS NULL"), '0', 'nor left unconnected');
ok(writer_in('two', 1), 'two\'s writer runs on');

# 4. No free worker slot.  3 = the logical replication launcher, apikey's
#    launcher and one writer: two gets it (its first call asks for it);
#    one, whose extension comes back, does not.
$node->append_conf('postgresql.conf', "max_worker_processes = 3\n");
$node->restart;
$node->safe_psql('two', q{SELECT apikey.check(tok('k'))});
ok(writer_in('two', 1), 'with one worker slot left, two has its writer');
$node->safe_psql(
	'one', q{
CREATE EXTENSION apikey;
TRUNCATE tok;
INSERT INTO tok SELECT 'k', key_id, token FROM apikey.issue(owner => 'acme');
});
$node->safe_psql('one', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 6)});
ok($node->wait_for_log(qr/WARNING:  no background worker slot for the apikey usage writer of database "one"/),
	'no slot: a WARNING names the database');
ok($node->log_contains(qr/HINT:  Raise max_worker_processes/), 'with a hint about max_worker_processes');
$node->safe_psql('one', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 4)});
is($node->safe_psql('one', "$live; $pending"), "0\n10",
	'one falls back to pending rows: 10 of them, nothing in shared memory');
$node->safe_psql('one', 'SELECT apikey.flush_usage()');
is($node->safe_psql('one', $logged), '10', 'one: exactly 10 calls, folded by flush_usage()');
sleep 11;	# the launcher retries every 10 s
$node->safe_psql('one', q{SELECT apikey.check(tok('k'))});
# (two may have been told so too, if its first call came while the
# start-up scan's writer for postgres, which has no extension, held the slot)
my $warnings = () = slurp_file($node->logfile)
  =~ /no background worker slot for the apikey usage writer of database "one"/g;
is($warnings, 1, 'said once, not at every retry');

ok(!$node->log_contains(qr/FATAL|PANIC|TRAP/), 'no FATAL (missing or dropped database), no crash');
$node->stop;
done_testing();
