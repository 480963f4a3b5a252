
# Copyright (c) apikey contributors
#
# Behind PgBouncer in transaction pooling mode, two clients take turns on a
# single server connection.  A transaction binding (SET LOCAL semantics)
# ends with the transaction, so neither client ever sees the other's key:
# current_owner() is NULL when each transaction starts, is the client's own
# owner after its own authenticate(), and row-level security shows it only
# its own tenant's rows.  Every transaction reports pg_backend_pid(), to show
# that the server connection really was shared.
#
# The application role has apikey.allow_session_binding = off (ALTER ROLE,
# as the README advises for a role behind a transaction-mode pooler): its
# authenticate(..., session => true) is refused, the other client does not
# inherit anything, and the role cannot lift the setting, neither through
# PgBouncer nor with a connection option on a direct connection.

use strict;
use warnings;

use File::Temp ();
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $pgbouncer_bin = '/usr/sbin/pgbouncer';
plan skip_all => "PgBouncer is not installed ($pgbouncer_bin)"
  unless -x $pgbouncer_bin;

my $node = apikey_node('main');
apikey_db($node);

$node->safe_psql(
	'postgres', q{
	INSERT INTO apikey.scopes (name) VALUES ('orders:read');
	CREATE ROLE regress_pgb_app LOGIN;
	CREATE TABLE orders (tenant text NOT NULL, id int PRIMARY KEY, item text);
	INSERT INTO orders VALUES ('acme', 1, 'anvil'), ('acme', 2, 'rope'),
		('globex', 3, 'laser'), ('globex', 4, 'magnet'), ('globex', 5, 'coil');
	ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
	ALTER TABLE orders FORCE ROW LEVEL SECURITY;
	CREATE POLICY orders_read ON orders FOR SELECT
		USING (tenant = apikey.current_owner() AND apikey.has_scope('orders:read'));
	GRANT SELECT ON orders TO regress_pgb_app;
	ALTER ROLE regress_pgb_app SET apikey.allow_session_binding = off;
});

# One key per client; the tokens go straight into the clients' psql
# variables and are never printed.
my %client;
for my $owner ('acme', 'globex')
{
	my $row = $node->safe_psql('postgres',
		"SELECT key_id || ' ' || token FROM apikey.issue(owner => '$owner', scopes => '{orders:read}')"
	);
	my ($key_id, $token) = split / /, $row;
	$client{$owner} = { key_id => $key_id, token => $token };
}
my %rows = (acme => 2, globex => 3);

# PgBouncer: its own ini, socket directory and log in this test's tmp dir.
my $dir = PostgreSQL::Test::Utils::tempdir_short();
my $port = PostgreSQL::Test::Cluster::get_free_port();
my $node_host = $node->host;
my $node_port = $node->port;
PostgreSQL::Test::Utils::append_to_file("$dir/userlist.txt",
	qq{"regress_pgb_app" ""\n});
PostgreSQL::Test::Utils::append_to_file(
	"$dir/pgbouncer.ini", qq{
[databases]
appdb = host=$node_host port=$node_port dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir = $dir
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = 1
max_client_conn = 20
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
});

my ($bouncer_out, $bouncer_err) = ('', '');
my $bouncer = IPC::Run::start([ $pgbouncer_bin, "$dir/pgbouncer.ini" ],
	'>', \$bouncer_out, '2>', \$bouncer_err);

my $psql = $node->installed_command('psql');
my @connect = (
	$psql, '-XAtq', '-v', 'ON_ERROR_STOP=0', '-h', '127.0.0.1', '-p', $port,
	'-U', 'regress_pgb_app', '-d', 'appdb');

# Wait until PgBouncer accepts connections and reaches the server.
my $up = 0;
foreach my $attempt (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
{
	my ($out, $err) = ('', '');
	IPC::Run::run([ @connect, '-c', 'SELECT 1' ], '>', \$out, '2>', \$err);
	if ($out =~ /^1$/m)
	{
		$up = 1;
		last;
	}
	select(undef, undef, undef, 0.1);
}
ok($up, 'PgBouncer is up')
  or BAIL_OUT("PgBouncer did not start: $bouncer_err "
	  . (-f "$dir/pgbouncer.log" ? slurp_file("$dir/pgbouncer.log") : ''));

# A long-lived psql client of PgBouncer, fed through its stdin.
sub start_client
{
	my ($owner) = @_;
	my $c = {
		owner => $owner,
		stdin => '',
		stdout => '',
		stderr => '',
		n => 0,
		timer => IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default),
	};
	$c->{run} = IPC::Run::start(\@connect, '<', \$c->{stdin}, '>',
		\$c->{stdout}, '2>', \$c->{stderr}, $c->{timer});
	$c->{stdin} .=
	  "\\set tok '$client{$owner}{token}'\n\\set kid $client{$owner}{key_id}\n";
	return $c;
}

# Send SQL to a client without waiting for the result.
sub send_sql
{
	my ($c, $sql) = @_;
	$c->{n}++;
	$c->{stdin} .= "$sql\n\\echo done-$c->{n}\n";
	$c->{run}->pump_nb;
	return;
}

# Wait for the result of the last send_sql.
sub wait_result
{
	my ($c) = @_;
	my $done = "done-$c->{n}";
	$c->{timer}->start($PostgreSQL::Test::Utils::timeout_default);
	$c->{run}->pump until $c->{stdout} =~ /^\Q$done\E$/m;
	my $out = $c->{stdout};
	$out =~ s/^\Q$done\E\n//m;
	$c->{stdout} = '';
	return $out;
}

# Wait until a client's stderr matches $re (psql writes an error to stderr
# before the \echo that ends wait_result, but the pipes are read apart);
# the stderr, or '' after the time-out.
sub wait_stderr
{
	my ($c, $re) = @_;
	$c->{timer}->start($PostgreSQL::Test::Utils::timeout_default);
	eval { $c->{run}->pump until $c->{stderr} =~ $re; };
	return $c->{stderr} =~ $re ? $c->{stderr} : '';
}

# One request: what the transaction sees before and after authenticate().
my $request = q{BEGIN;
SELECT 'start', coalesce(apikey.current_owner(), '-'), pg_backend_pid(), (SELECT count(*) FROM orders);
SELECT 'auth', apikey.authenticate(:'tok') = :kid;
SELECT 'after', apikey.current_owner(), pg_backend_pid(), (SELECT count(*) FROM orders);
COMMIT;};

my %pids;
my ($ok_start, $ok_after, $requests) = (1, 1, 0);

# Check one request's output; remember the server pids it ran on.
sub check_request
{
	my ($c, $out, $label) = @_;
	my $owner = $c->{owner};
	$requests++;
	my ($start) = $out =~ /^start\|(.*)$/m;
	my ($auth) = $out =~ /^auth\|(.*)$/m;
	my ($after) = $out =~ /^after\|(.*)$/m;
	if (!defined $start || !defined $after || !defined $auth)
	{
		diag("$label: unexpected output: $out / $c->{stderr}");
		$ok_start = $ok_after = 0;
		return;
	}
	my ($s_owner, $s_pid, $s_rows) = split /\|/, $start;
	my ($a_owner, $a_pid, $a_rows) = split /\|/, $after;
	$pids{$s_pid} = 1;
	$pids{$a_pid} = 1;
	if ($s_owner ne '-' || $s_rows ne '0')
	{
		diag("$label: transaction started with owner $s_owner and $s_rows rows");
		$ok_start = 0;
	}
	if ($auth ne 't' || $a_owner ne $owner || $a_rows ne $rows{$owner})
	{
		diag("$label: after authenticate: owner $a_owner, $a_rows rows");
		$ok_after = 0;
	}
	return;
}

my $ac = start_client('acme');
my $gc = start_client('globex');

# Strict alternation: each client's whole transaction, in turn.
for my $i (1 .. 10)
{
	for my $c ($ac, $gc)
	{
		send_sql($c, $request);
		check_request($c, wait_result($c), "round $i, $c->{owner}");
	}
}

# Overlapping: globex's request is queued by PgBouncer while acme's
# transaction holds the only server connection, and runs right after
# acme's COMMIT on that same connection.
for my $i (1 .. 5)
{
	send_sql($ac,
		q{BEGIN;
SELECT 'start', coalesce(apikey.current_owner(), '-'), pg_backend_pid(), (SELECT count(*) FROM orders);
SELECT 'auth', apikey.authenticate(:'tok') = :kid;});
	my $first = wait_result($ac);
	send_sql($gc, $request);
	send_sql($ac,
		q{SELECT 'after', apikey.current_owner(), pg_backend_pid(), (SELECT count(*) FROM orders);
COMMIT;});
	check_request($ac, $first . wait_result($ac), "overlap $i, acme");
	check_request($gc, wait_result($gc), "overlap $i, globex");
}

# Statements outside a transaction block are transactions of their own:
# the binding of one is gone by the next, whoever sends it.
send_sql($ac, q{SELECT 'auth', apikey.authenticate(:'tok') = :kid;});
my $auth_only = wait_result($ac);
send_sql($gc, q{SELECT 'peek', coalesce(apikey.current_owner(), '-');});
my $peek_other = wait_result($gc);
send_sql($ac, q{SELECT 'peek', coalesce(apikey.current_owner(), '-');});
my $peek_self = wait_result($ac);
is($auth_only, "auth|t\n", 'autocommit authenticate succeeded');
is($peek_other, "peek|-\n", 'the other client does not see an autocommit binding');
is($peek_self, "peek|-\n", 'nor does the client that made it, in its next statement');

diag(slurp_file("$dir/pgbouncer.log")) unless $ok_start && $ok_after;
ok($ok_start, "every one of $requests transactions started with no binding and no rows");
ok($ok_after, 'every transaction saw its own owner and rows after authenticate');
is(scalar(keys %pids), 1, 'all transactions ran on one server connection');
is($ac->{stderr} . $gc->{stderr}, '', 'no errors in either client');

# A session binding would be inherited by the next client on this server
# connection: the role may not make one, nor lift the setting.
send_sql($ac, q{SELECT 'session', apikey.authenticate(:'tok', session => true);});
my $session_out = wait_result($ac);
send_sql($gc, q{SELECT 'peek', coalesce(apikey.current_owner(), '-');});
my $session_peek = wait_result($gc);
is($session_out, '', 'session => true returned nothing');
like(wait_stderr($ac, qr/session bindings are not allowed/),
	qr/ERROR:  session bindings are not allowed in this session/,
	'session => true refused for the pooled role');
is($session_peek, "peek|-\n", 'the other client inherits no binding');
$ac->{stderr} = '';
send_sql($ac, q{SET apikey.allow_session_binding = on;
SELECT 'after-set', current_setting('apikey.allow_session_binding');});
is(wait_result($ac), "after-set|off\n", 'SET does not lift it');
like(wait_stderr($ac, qr/permission denied/),
	qr/permission denied to set parameter "apikey.allow_session_binding"/,
	'SET refused');
my ($opt_ret, $opt_out, $opt_err) = $node->psql(
	'postgres', 'SHOW apikey.allow_session_binding',
	connstr => $node->connstr('postgres')
	  . " user=regress_pgb_app options='-capikey.allow_session_binding=on'",
	extra_params => ['-w'],
	on_error_stop => 0);
isnt($opt_ret, 0, 'a connection option cannot lift it: connection refused');
like($opt_err, qr/permission denied to set parameter "apikey.allow_session_binding"/,
	'connection option refused');

for my $c ($ac, $gc)
{
	$c->{stdin} .= "\\q\n";
	$c->{run}->finish;
}

$bouncer->signal('TERM');
$bouncer->finish;

$node->stop;
done_testing();
