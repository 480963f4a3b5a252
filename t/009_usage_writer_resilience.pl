# The usage writer keeps writing whatever others do to it:
#   - pg_terminate_backend() on it: it writes what it has, exits, and the
#     launcher starts it again within seconds; counts keep being flushed;
#   - the (non-superuser) owner of its database sets, with ALTER DATABASE,
#     every setting that could stop or stall a flush: read-only
#     transactions, SERIALIZABLE, tiny timeouts, exit_on_error, a
#     search_path of its own, session_replication_role = replica.  The
#     writer overrides them on its connection and counts are still flushed.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;
use Time::HiRes qw(time usleep);

my $node = apikey_node(
	'resilience', q{
apikey.usage_flush_interval = '100ms'
});

# The writer's database belongs to an ordinary role; the extension is installed
# by a superuser, as it must be.
$node->safe_psql(
	'postgres', q{
CREATE ROLE app_owner LOGIN;
CREATE DATABASE appdb OWNER app_owner;
GRANT SET ON PARAMETER session_replication_role TO app_owner;
});
$node->safe_psql('appdb', 'CREATE EXTENSION apikey');
token_table($node, 'appdb');
$node->safe_psql(
	'appdb', q{
INSERT INTO tok SELECT 'k', key_id, token FROM apikey.issue(owner => 'acme');
});

my $writer_pid = q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'apikey usage writer'};
my $logged = q{SELECT coalesce(sum(calls), 0) FROM apikey.usage_log};

# Poll a query until it returns $want, for at most $seconds (a writer that
# is gone should fail the test in seconds, not after the default timeout).
sub poll_for
{
	my ($db, $sql, $want, $seconds) = @_;
	my $deadline = time + $seconds;
	my $got;
	while (time < $deadline)
	{
		$got = $node->safe_psql($db, $sql);
		return 1 if $got eq $want;
		usleep(100_000);
	}
	diag "after ${seconds}s: got '$got', want '$want'";
	return 0;
}

ok(poll_for('appdb', "SELECT count(*) FROM ($writer_pid) w", '1', 30), 'usage writer runs');
$node->safe_psql('appdb', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 3)});
ok(poll_for('appdb', $logged, '3', 30), 'counts are flushed');

# 1. pg_terminate_backend().
my $pid = $node->safe_psql('appdb', $writer_pid);
$node->safe_psql('appdb', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 2)});
my $t0 = time;
is($node->safe_psql('appdb', "SELECT pg_terminate_backend($pid)"), 't', 'writer terminated');
ok(poll_for('appdb', "SELECT count(*) FROM ($writer_pid) w WHERE pid <> $pid", '1', 30),
	'a new writer is running');
note sprintf('the writer was back after %.1f s', time - $t0);
cmp_ok(time - $t0, '<', 15, 'within seconds');
$node->safe_psql('appdb', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 4)});
ok(poll_for('appdb', $logged, '9', 30), 'counts before and after are flushed, exactly');
ok($node->log_contains(qr/background worker "apikey usage writer" \(PID $pid\) exited with exit code 1/),
	'it exited with status 1, and the launcher started another');

# 2. The database owner's settings.  Our own sessions override them
#    through PGOPTIONS (client settings win over database settings); the
#    writer must override them itself.
$node->safe_psql(
	'appdb', q{
ALTER DATABASE appdb SET default_transaction_read_only = on;
ALTER DATABASE appdb SET default_transaction_isolation = 'serializable';
ALTER DATABASE appdb SET default_transaction_deferrable = on;
ALTER DATABASE appdb SET statement_timeout = '1ms';
ALTER DATABASE appdb SET lock_timeout = '1ms';
ALTER DATABASE appdb SET idle_in_transaction_session_timeout = '1ms';
ALTER DATABASE appdb SET idle_session_timeout = '1ms';
ALTER DATABASE appdb SET exit_on_error = on;
ALTER DATABASE appdb SET search_path = 'nowhere';
ALTER DATABASE appdb SET session_replication_role = 'replica';
}, extra_params => [ '-U', 'app_owner' ]);
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
 CROSS JOIN unnest(s.setconfig) WHERE d.datname = 'appdb'}),
	'10', 'the owner set 10 settings on the writer\'s database');
$node->restart;

local $ENV{PGOPTIONS} = join ' ',
  map { "-c $_" } qw(default_transaction_read_only=off statement_timeout=0
  idle_in_transaction_session_timeout=0 idle_session_timeout=0 exit_on_error=off
  search_path=public);
is($node->safe_psql('appdb', 'SHOW default_transaction_read_only'), 'off',
	'(our own sessions override them)');
ok(poll_for('appdb', "SELECT count(*) FROM ($writer_pid) w", '1', 30), 'usage writer runs');
$node->safe_psql('appdb', q{SELECT apikey.check(tok('k')) FROM generate_series(1, 5)});
ok(poll_for('appdb', $logged, '14', 30), 'counts are still flushed');
is($node->safe_psql('appdb', 'SELECT flush_errors FROM apikey.stats'), '0', 'without a failed flush');
is($node->safe_psql('appdb', 'SELECT apikey.flush_usage() >= 0'), 't', 'and flush_usage() works');

ok(!$node->log_contains(qr/PANIC|TRAP|cannot execute \w+ in a read-only transaction/),
	'no write refused, no crash');
$node->stop;
done_testing();
