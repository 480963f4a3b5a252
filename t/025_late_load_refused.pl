# Loaded too late to redact: without shared_preload_libraries, the first
# statement that calls apikey loads the library, and so its log hook, after
# log_statement has written that statement, token included.  Nothing can
# un-log it, so such a backend refuses to verify tokens (55000, with a hint
# that says how to preload), for as long as it lives.
#
# session_preload_libraries = 'apikey' (by ALTER DATABASE, or in the
# configuration file) loads apikey before the first query, without a
# restart: the first statement's token is redacted and verification works.
# With log_statement = none, loading apikey lazily is harmless and works.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = PostgreSQL::Test::Cluster->new('late');
$node->init;
$node->start;

is($node->safe_psql('postgres', 'SHOW shared_preload_libraries'),
	'', 'apikey is not preloaded');
is($node->safe_psql('postgres', 'SHOW log_statement'),
	'all', 'log_statement = all (as PostgreSQL::Test::Cluster sets it)');

apikey_db($node);
apikey_db($node, 'app');

sub issue
{
	my ($db) = @_;
	return $node->safe_psql($db, q{SELECT token FROM apikey.issue('acme')});
}

sub hint_of
{
	my ($t) = @_;
	return substr($t, 0, -49) . '...' . substr($t, -4);
}

my $refusal =
  qr/ERROR:  55000: tokens in this session's statements may have been logged before apikey could redact them/;

#
# 1. Loaded lazily by the statement that verifies: refused.
#
my $lazy = issue('postgres');
my ($ret, $out, $err) = $node->psql('postgres',
	"\\set VERBOSITY verbose\nSELECT apikey.verify('$lazy');");
isnt($ret, 0, 'lazy load: verify() fails');
is($out, '', 'lazy load: no verdict is returned');
like($err, $refusal, 'lazy load: refused with 55000, saying why');
like($err, qr/DETAIL:  apikey was loaded while a statement ran, after log_statement = 'all' had logged it\./,
	'lazy load: DETAIL names log_statement');
like(
	$err,
	qr/HINT:  Add apikey to shared_preload_libraries, or without a restart run ALTER DATABASE \.\.\. SET session_preload_libraries = 'apikey' \(or ALTER ROLE\), then reconnect\./,
	'lazy load: HINT says how to preload it');
ok( $node->log_contains(qr/statement: SELECT apikey\.verify\('\Q$lazy\E'\);/),
	'lazy load: log_statement wrote that token before apikey was loaded (why it refuses)');

#
# 2. The refusal lasts for the backend: later statements, check() and
#    authenticate() too, also after a load by a statement with no token.
#
($ret, $out, $err) = $node->psql(
	'postgres', qq{\\set VERBOSITY verbose
SELECT apikey.current_key_id();
SELECT apikey.verify('$lazy');
SELECT code FROM apikey.check('$lazy');
SELECT apikey.authenticate('$lazy');
SELECT apikey.verify('$lazy');},
	on_error_stop => 0);
my $n = () = $err =~ /$refusal/g;
is($n, 4, 'loaded by a token-free statement: every later verification is refused')
  or diag $err;

# The extended protocol: bind parameters are logged before execution too.
my $script = $node->basedir . '/verify.sql';
append_to_file($script, "SELECT apikey.verify(:tok);\n");
my ($stdout, $stderr);
IPC::Run::run(
	[
		'pgbench', '-n', '-M', 'extended', '-t', '1', '-f', $script,
		'-D', "tok=$lazy", '-h', $node->host, '-p', $node->port, 'postgres'
	],
	'>', \$stdout, '2>', \$stderr);
like($stderr, qr/tokens in this session's statements may have been logged/,
	'lazy load by a bind parameter: refused');

#
# 3. log_statement = none: loading lazily logs nothing, and works.
#
is( $node->safe_psql(
		'postgres', qq{SET log_statement = 'none';
SELECT apikey.verify('$lazy');}),
	't', 'log_statement = none: lazy load verifies');

#
# 4. session_preload_libraries by ALTER DATABASE, no restart.
#
$node->safe_psql('postgres',
	q{ALTER DATABASE app SET session_preload_libraries = 'apikey'});
my $db_tok = issue('app');
is($node->safe_psql('app', "SELECT apikey.verify('$db_tok');"),
	't', 'ALTER DATABASE ... SET session_preload_libraries: verify works');
is( $node->safe_psql(
		'app', "SELECT code FROM apikey.check('$db_tok'); SELECT apikey.authenticate('$db_tok') > 0;"),
	"valid\nt", 'ALTER DATABASE ... SET session_preload_libraries: check and authenticate work');

#
# 5. session_preload_libraries in the configuration file, reloaded.
#
$node->append_conf('postgresql.conf', "session_preload_libraries = 'apikey'");
$node->reload;
my $conf_tok = issue('postgres');
is($node->safe_psql('postgres', "SELECT apikey.verify('$conf_tok');"),
	't', 'session_preload_libraries in postgresql.conf: verify works');

$node->stop;
my $log = slurp_file($node->logfile);
for my $case ([ 'ALTER DATABASE', $db_tok ], [ 'postgresql.conf', $conf_tok ])
{
	my ($how, $t) = @$case;
	is(index($log, $t), -1, "session_preload_libraries ($how): the token is not logged");
	like(
		$log,
		qr/statement: SELECT apikey\.verify\('\Q${\ hint_of($t)}\E'\);/,
		"session_preload_libraries ($how): the first statement is logged with the hint");
}

done_testing();
