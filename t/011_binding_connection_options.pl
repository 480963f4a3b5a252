
# Copyright (c) apikey contributors
#
# apikey.binding cannot be set from outside a session either: not with
# options=-capikey.binding=... in the connection string, not as a raw
# startup-packet parameter, not with ALTER ROLE ... SET, for ordinary roles
# and superusers.  Values that got in before the library was loaded (a
# placeholder set at connection time, by SET, or by ALTER ROLE while apikey
# was not preloaded) are refused when the library loads.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = apikey_node('main');
apikey_db($node);

my $superuser = $node->safe_psql('postgres', 'SELECT current_user');

$node->safe_psql(
	'postgres', q{
	INSERT INTO apikey.scopes (name) VALUES ('orders:read');
	CREATE ROLE regress_conn_user LOGIN;
});
my $key_id = $node->safe_psql('postgres',
	"SELECT key_id FROM apikey.issue(owner => 'acme', scopes => '{orders:read}')");
# a well-formed session binding for that real key, with its real hash: what
# a forger would send
my $hash = $node->safe_psql('postgres',
	"SELECT encode(hash, 'hex') FROM apikey.keys WHERE id = $key_id");
my $forged = "s:1:$key_id:$hash/4:acme/11:orders:read";

my $check_sql =
  "SELECT coalesce(apikey.current_owner(), 'unbound') || ' ' || apikey.has_scope('orders:read')";

# Connect as $user with extra connection-string words; run $check_sql.
sub connect_with
{
	my ($user, $extra) = @_;
	my ($ret, $stdout, $stderr) = $node->psql(
		'postgres', $check_sql,
		connstr => $node->connstr('postgres') . " user=$user $extra",
		extra_params => ['-w'],
		on_error_stop => 0);
	return ($ret, $stdout, $stderr);
}

#
# 1. Preloaded: options in the connection string fail the connection, for
#    an ordinary role (not allowed to set it) and a superuser (only
#    authenticate() may set it).
#
for my $user ('regress_conn_user', $superuser)
{
	my ($ret, $stdout, $stderr) =
	  connect_with($user, "options='-capikey.binding=$forged'");
	isnt($ret, 0, "preloaded, options as $user: connection refused");
	is($stdout, '', "preloaded, options as $user: nothing ran");
	like($stderr, qr/FATAL:.*apikey\.binding/,
		"preloaded, options as $user: FATAL names the parameter");

	# several -c switches, the binding among them
	($ret, $stdout, $stderr) =
	  connect_with($user, "options='-c apikey.binding=$forged -c work_mem=1MB'");
	isnt($ret, 0, "preloaded, options with spaces as $user: connection refused");
}

#
# 2. The same parameter sent directly in the startup packet (as a pooler
#    could forward it), not through options.
#
# The message field of an ErrorResponse body.
sub error_message
{
	my ($body) = @_;
	for my $field (split /\0/, $body)
	{
		return substr($field, 1) if substr($field, 0, 1) eq 'M';
	}
	return '';
}

sub startup_packet_result
{
	my ($user, $value) = @_;
	my $sock = $node->raw_connect();
	my $params = join('', map { "$_\0" } ('user', $user, 'database', 'postgres',
		'apikey.binding', $value)) . "\0";
	my $packet = pack('N N', 8 + length($params), 196608) . $params;
	$sock->send($packet);

	# read messages until ReadyForQuery or ErrorResponse
	my $read = sub {
		my $buf = '';
		while (length($buf) < 5)
		{
			my $chunk;
			$sock->recv($chunk, 5 - length($buf));
			return undef if !defined $chunk || $chunk eq '';
			$buf .= $chunk;
		}
		my ($type, $len) = unpack('a N', $buf);
		my $body = '';
		while (length($body) < $len - 4)
		{
			my $chunk;
			$sock->recv($chunk, $len - 4 - length($body));
			return undef if !defined $chunk || $chunk eq '';
			$body .= $chunk;
		}
		return ($type, $body);
	};
	while (1)
	{
		my ($type, $body) = $read->();
		if (!defined $type)
		{
			$sock->close;
			return 'connection closed';
		}
		if ($type eq 'E')
		{
			$sock->close;
			return 'error: ' . error_message($body);
		}
		last if $type eq 'Z';
	}

	# connected: ask what is bound
	my $q = "$check_sql\0";
	$sock->send('Q' . pack('N', 4 + length($q)) . $q);
	my $result = 'no row';
	while (1)
	{
		my ($type, $body) = $read->();
		last if !defined $type;
		if ($type eq 'D')
		{
			my ($n, $len) = unpack('n N', $body);
			$result = $len == 0xFFFFFFFF ? 'NULL' : substr($body, 6, $len);
		}
		if ($type eq 'E')
		{
			$result = 'error: ' . error_message($body);
		}
		last if $type eq 'Z';
	}
	$sock->send('X' . pack('N', 4));
	$sock->close;
	return "connected: $result";
}

for my $user ('regress_conn_user', $superuser)
{
	my $result = startup_packet_result($user, $forged);
	like($result, qr/^(error: .*apikey\.binding|connected: unbound false)/,
		"preloaded, startup packet parameter as $user: refused or no binding");
	note "startup packet as $user: $result";
}

#
# 3. ALTER ROLE / ALTER DATABASE ... SET are refused outright now.
#
{
	my ($ret, $stdout, $stderr) = $node->psql('postgres',
		"ALTER ROLE regress_conn_user SET apikey.binding = '$forged'");
	isnt($ret, 0, 'preloaded, ALTER ROLE SET refused');
	like($stderr, qr/apikey\.binding/, 'preloaded, ALTER ROLE SET: error names the parameter');

	($ret, $stdout, $stderr) = $node->psql('postgres',
		"ALTER DATABASE postgres SET apikey.binding = '$forged'");
	isnt($ret, 0, 'preloaded, ALTER DATABASE SET refused');

	is($node->safe_psql('postgres',
		"SELECT count(*) FROM pg_db_role_setting WHERE array_to_string(setconfig, ',') LIKE '%apikey.binding%'"),
		'0', 'no role or database setting of apikey.binding remains');

	# and a normal login of that role still works, with nothing bound
	($ret, $stdout, $stderr) = connect_with('regress_conn_user', '');
	is($stdout, 'unbound false', 'preloaded, plain login: no binding');
	is($stderr, '', 'preloaded, plain login: no warning');
}

#
# 4. Restarted without shared_preload_libraries: values set before the
#    library loads are placeholders, dropped with a warning when it loads.
#
$node->adjust_conf('postgresql.conf', 'shared_preload_libraries', "''");
$node->restart;

{
	# ALTER ROLE in a backend that has not loaded apikey yet: accepted
	# as a placeholder, as PostgreSQL does for any unknown custom setting.
	$node->safe_psql('postgres',
		"ALTER ROLE regress_conn_user SET apikey.binding = '$forged'");

	my ($ret, $stdout, $stderr) = connect_with('regress_conn_user', '');
	is($ret, 0, 'not preloaded, ALTER ROLE placeholder: connects');
	is($stdout, 'unbound false',
		'not preloaded, ALTER ROLE placeholder: no binding');
	like(
		$stderr,
		qr/apikey\.binding/,
		'not preloaded, ALTER ROLE placeholder: refused with a warning');

	$node->safe_psql('postgres',
		'ALTER ROLE regress_conn_user RESET apikey.binding');

	for my $user ('regress_conn_user', $superuser)
	{
		($ret, $stdout, $stderr) =
		  connect_with($user, "options='-capikey.binding=$forged'");
		is($stdout, 'unbound false',
			"not preloaded, options as $user: no binding");

		# SET and SET LOCAL before the first apikey call of the session
		($ret, $stdout, $stderr) = $node->psql(
			'postgres',
			"SET apikey.binding = '$forged';\n$check_sql",
			connstr => $node->connstr('postgres') . " user=$user",
			on_error_stop => 0);
		is($stdout, 'unbound false',
			"not preloaded, SET before the library loads as $user: no binding");

		($ret, $stdout, $stderr) = $node->psql(
			'postgres',
			"BEGIN;\nSET LOCAL apikey.binding = '$forged';\n$check_sql;\nCOMMIT;",
			connstr => $node->connstr('postgres') . " user=$user",
			on_error_stop => 0);
		is($stdout, 'unbound false',
			"not preloaded, SET LOCAL before the library loads as $user: no binding"
		);
	}
}

#
# 5. A role setting made while apikey was not loaded, then the server is
#    restarted with apikey preloaded: the login warns, and nothing is bound.
#
$node->safe_psql('postgres',
	"ALTER ROLE regress_conn_user SET apikey.binding = '$forged'");
$node->adjust_conf('postgresql.conf', 'shared_preload_libraries', "'apikey'");
$node->restart;

{
	my ($ret, $stdout, $stderr) = connect_with('regress_conn_user', '');
	is($ret, 0, 'preloaded, stale ALTER ROLE setting: connects');
	is($stdout, 'unbound false', 'preloaded, stale ALTER ROLE setting: no binding');
	like(
		$stderr,
		qr/apikey\.binding/,
		'preloaded, stale ALTER ROLE setting: refused with a warning');
	# PostgreSQL 16 and later refuse RESET of this one setting
	# (GUC_NO_RESET), even in ALTER ROLE; RESET ALL removes the stale entry.
	my ($rret, $rout, $rerr) = $node->psql('postgres',
		'ALTER ROLE regress_conn_user RESET apikey.binding');
	if ($node->safe_psql('postgres', 'SHOW server_version_num') >= 160000)
	{
		like($rerr, qr/cannot be reset/, 'preloaded, 16+: RESET of the stale setting is refused');
		$node->safe_psql('postgres', 'ALTER ROLE regress_conn_user RESET ALL');
	}
	else
	{
		is($rret, 0, 'preloaded, 15: RESET removes the stale setting');
	}
	is($node->safe_psql('postgres', q{
SELECT count(*) FROM pg_db_role_setting WHERE setrole = 'regress_conn_user'::regrole}),
		'0', 'preloaded: the stale setting is gone');
}

$node->stop;
done_testing();
