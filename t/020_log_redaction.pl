# Tokens never reach the server log.
#
# Every way PostgreSQL writes statement text or values into the log is
# switched on (log_statement, log_min_duration_statement, the STATEMENT line
# of log_min_error_statement, bind parameters in DETAIL and in error
# CONTEXT, auto_explain's query text and verbose plan, plpgsql RAISE and
# error context, csvlog and jsonlog).  Tokens are then used in SQL text in
# all those places.  Afterwards no token may appear in any log file, and
# the hints that replace them must.  A control with apikey.redact_logs =
# off shows a token does get logged when redaction is off.
#
# pgaudit (Debian's postgresql-15-pgaudit, where installed for the server
# under test) writes its own audit lines with the statement and, with
# pgaudit.log_parameter = on, its parameters: a second server preloads it
# before apikey and no token may reach its log either.
#
# Redaction goes by shape, not by checksum: the checksum is public, so a
# near miss (truncated, one character mistyped or stray, uppercased or wrong
# prefix, glued to other text) gives the real token back.  Near misses of
# real keys are used in statement text, DETAIL, bind parameters and error
# messages; neither they nor any 12 characters in a row of their key's body
# may appear in any log file.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = apikey_node(
	'redact', q{
session_preload_libraries = 'auto_explain'
auto_explain.log_min_duration = 0
auto_explain.log_analyze = on
auto_explain.log_verbose = on
auto_explain.log_nested_statements = on
log_statement = 'all'
log_min_duration_statement = 0
log_min_error_statement = error
log_min_messages = notice
log_error_verbosity = verbose
log_parameter_max_length = -1
log_parameter_max_length_on_error = -1
logging_collector = on
log_destination = 'stderr,csvlog,jsonlog'
log_directory = 'log'
});
apikey_db($node);

# Tokens used below, by name.  Each is used in one kind of place, so a leak
# names the path that leaked it.
my %tok;
sub issue
{
	my ($name, $args) = @_;
	my $row = $node->safe_psql('postgres',
		"SELECT key_id || '|' || token FROM apikey.issue($args)");
	my ($id, $token) = split /\|/, $row;
	$tok{$name} = $token;
	return $id;
}

issue('valid', "'acme'");
issue('valid_live', "'acme', prefix => 'ak_live'");
my $rev_id = issue('revoked', "'acme'");
$node->safe_psql('postgres', "SELECT apikey.revoke($rev_id)");
issue($_, "'acme'") for qw(div_zero prepared bind bind_error notice warning
  exception context internal_query glued plan explain);
my $ctl_id = issue('control', "'acme'");
for my $name (qw(unknown unknown_auth))
{
	$tok{$name} = $node->safe_psql('postgres',
		"SELECT token FROM apikey._new_token('ak')");
}

# A string shaped like a token but with a wrong checksum: hidden too.
my $fake = substr($tok{valid}, 0, -6)
  . (substr($tok{valid}, -6) eq '000000' ? '000001' : '000000');

# Statements with literal tokens, run through psql (simple protocol).
sub run
{
	my ($sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', $sql);
	return ($ret, $err);
}

my ($ret, $err);
($ret, $err) = run(
	qq{SELECT apikey.verify('$tok{valid}');
	   SELECT * FROM apikey.check('$tok{valid}', 'orders:read');
	   SELECT apikey.authenticate('$tok{valid}');
	   SELECT apikey.verify('$tok{valid_live}'), '$fake' AS fake;});
is($ret, 0, 'valid token: verify, check, authenticate succeed');

($ret, $err) = run(
	qq{SELECT apikey.verify('$tok{revoked}');
	   SELECT * FROM apikey.check('$tok{revoked}');
	   SELECT apikey.authenticate('$tok{revoked}');});
like($err, qr/API key has been revoked/, 'revoked token: authenticate raises');

($ret, $err) = run(
	qq{SELECT apikey.verify('$tok{unknown}');
	   SELECT * FROM apikey.check('$tok{unknown}');});
is($ret, 0, 'unknown token: verify and check answer');
($ret, $err) = run(qq{SELECT apikey.authenticate('$tok{unknown_auth}');});
like($err, qr/invalid API key/, 'unknown token: authenticate raises');

($ret, $err) = run(qq{SELECT 1/0, '$tok{div_zero}';});
like($err, qr/division by zero/, 'statement failing for another reason');

($ret, $err) = run(
	qq{PREPARE p(text) AS SELECT apikey.verify(\$1);
	   EXECUTE p('$tok{prepared}');});
is($ret, 0, 'PREPARE / EXECUTE with a token');

# Token inside a plan: EXPLAIN VERBOSE output is not logged, but
# auto_explain's verbose plan of the same query is.
($ret, $err) = run(
	qq{EXPLAIN (VERBOSE) SELECT apikey.verify(x) FROM (VALUES ('$tok{explain}')) v(x);
	   SELECT count(*) FROM (VALUES ('$tok{plan}'), ('x')) v(x) WHERE apikey.verify(x);});
is($ret, 0, 'tokens in plans');

($ret, $err) = run(
	qq{DO \$\$ BEGIN RAISE NOTICE 'notice about %', '$tok{notice}'; END \$\$;
	   DO \$\$ BEGIN RAISE WARNING 'warning' USING DETAIL = 'key $tok{warning} leaked',
	                                               HINT = 'revoke $tok{warning}'; END \$\$;});
is($ret, 0, 'RAISE NOTICE and WARNING with tokens');
($ret, $err) = run(
	qq{DO \$\$ BEGIN RAISE EXCEPTION 'bad key %', '$tok{exception}'; END \$\$;});
like($err, qr/bad key/, 'RAISE EXCEPTION with a token');
($ret, $err) = run(
	qq{DO \$\$ BEGIN PERFORM 1/0 FROM (SELECT '$tok{context}'::text) s; END \$\$;});
like($err, qr/division by zero/, 'error inside plpgsql: token in CONTEXT');
($ret, $err) = run(
	qq{DO \$\$ BEGIN EXECUTE 'SELECT ''$tok{internal_query}'' FROM no_such_table'; END \$\$;});
like($err, qr/no_such_table/, 'error in dynamic SQL: token in QUERY');
($ret, $err) = run(qq{SELECT 'x$tok{glued}y';});
is($ret, 0, 'token glued to other text');

# Near misses of real keys, one key per place, so a leak names the place.
my %near;
issue("near_$_", "'acme'") for qw(statement detail bind bind_error error);
$near{$_} = delete $tok{"near_$_"} for qw(statement detail bind bind_error error);

# The near misses of a token, by kind.
sub near_misses
{
	my ($t) = @_;
	my $body = substr($t, -49);
	my $prefix = substr($t, 0, -49);    # "ak_"
	my $other = substr($body, 10, 1) eq 'A' ? 'B' : 'A';
	return (
		truncated => substr($t, 0, -1),
		truncated_short => $prefix . substr($body, 0, 35),
		typo => $prefix . substr($body, 0, 10) . $other . substr($body, 11),
		stray => $prefix . substr($body, 0, 20) . '-' . substr($body, 21),
		uppercase => uc($prefix) . $body,
		wrong_prefix => 'zz_' . $body,
		separator => 'ak-' . $body,
		glued => 'x' . substr($t, 0, -1) . 'y');
}

{
	my %nm = near_misses($near{statement});
	($ret, $err) = run(join("\n",
		map { "SELECT '$nm{$_}' AS $_, apikey.verify('$nm{$_}');" } sort keys %nm));
	is($ret, 0, 'near misses in statement text');

	%nm = near_misses($near{detail});
	($ret, $err) = run(join("\n",
		map { "DO \$\$ BEGIN RAISE WARNING 'near miss' USING DETAIL = 'key $nm{$_}', HINT = 'revoke $nm{$_}'; END \$\$;" }
		  sort keys %nm));
	is($ret, 0, 'near misses in DETAIL and HINT');

	%nm = near_misses($near{error});
	for my $kind (sort keys %nm)
	{
		($ret, $err) = run(qq{SELECT '$nm{$kind}'::int;});
		like($err, qr/invalid input syntax for type integer/,
			"near miss ($kind) in an error message");
	}
}

# Bind parameters (extended protocol), through pgbench -M extended.
my $script = $node->basedir . '/bind.sql';
append_to_file($script, "SELECT apikey.verify(:tok);\n");
my $script_err = $node->basedir . '/bind_error.sql';
append_to_file($script_err, "SELECT apikey.authenticate(:tok);\n");
$node->command_ok(
	[
		'pgbench', '-n', '-M', 'extended', '-t', '1', '-f', $script,
		'-D', "tok=$tok{bind}", '-h', $node->host, '-p', $node->port,
		'postgres'
	],
	'bind parameter: verify');
$node->safe_psql('postgres', "SELECT apikey.revoke_token('$tok{bind_error}')");
my ($stdout, $stderr);
IPC::Run::run(
	[
		'pgbench', '-n', '-M', 'extended', '-t', '1', '-f', $script_err,
		'-D', "tok=$tok{bind_error}", '-h', $node->host, '-p', $node->port,
		'postgres'
	],
	'>', \$stdout, '2>', \$stderr);
like($stderr, qr/API key has been revoked/,
	'bind parameter: authenticate of a revoked key raises')
  or diag $stderr;

# Near misses as bind parameters: logged with the statement, and with an
# error (log_parameter_max_length_on_error).
{
	my %nm = near_misses($near{bind});
	my %nm_err = near_misses($near{bind_error});
	my $script_int = $node->basedir . '/bind_int.sql';
	append_to_file($script_int, "SELECT :tok::int;\n");
	for my $kind (sort keys %nm)
	{
		$node->command_ok(
			[
				'pgbench', '-n', '-M', 'extended', '-t', '1', '-f', $script,
				'-D', "tok=$nm{$kind}", '-h', $node->host, '-p', $node->port,
				'postgres'
			],
			"near miss ($kind) as a bind parameter");
		IPC::Run::run(
			[
				'pgbench', '-n', '-M', 'extended', '-t', '1', '-f', $script_int,
				'-D', "tok=$nm_err{$kind}", '-h', $node->host, '-p', $node->port,
				'postgres'
			],
			'>', \$stdout, '2>', \$stderr);
		like($stderr, qr/invalid input syntax for type integer/,
			"near miss ($kind) as a bind parameter of a failing statement");
	}
}

# Control: with redaction off (superuser only), the token is logged.
($ret, $err) = run(
	qq{SET apikey.redact_logs = off; SELECT apikey.verify('$tok{control}');});
is($ret, 0, 'control statement ran');

# The redactor counted what it hid.
cmp_ok($node->safe_psql('postgres', 'SELECT tokens_redacted FROM apikey.stats'),
	'>', 100, 'apikey.stats counts the tokens the log redactor hid');

# Let the collector write everything out.
$node->stop('fast');

my @files = ($node->logfile, glob($node->data_dir . '/log/*'));
my %kinds = map { (/\.(csv|json|log)$/ ? $1 : 'other') => 1 } @files;
ok($kinds{csv} && $kinds{json}, 'csvlog and jsonlog files exist');
my $log = join("\n", map { slurp_file($_) } @files);
note sprintf('%d log files, %d bytes', scalar(@files), length($log));

for my $name (sort keys %tok)
{
	my $t = $tok{$name};
	my ($prefix) = $t =~ /^(.*)_[0-9A-Za-z]{49}$/;
	my $hint = $prefix . '_...' . substr($t, -4);
	my $count = () = $log =~ /\Q$t\E/g;
	if ($name eq 'control')
	{
		ok($count > 0, 'control: with redact_logs = off the token is logged');
		next;
	}
	is($count, 0, "token '$name' appears nowhere in the logs");
	ok(index($log, $hint) >= 0, "hint of token '$name' is logged instead");
}

# Tokens made by the extension were logged in every format.
for my $fmt (qw(csv json))
{
	# every file of the format: CREATE EXTENSION's plans alone can fill the
	# first one past log_rotation_size
	my $content = join("\n", map { slurp_file($_) } grep { /\.$fmt$/ } @files);
	like($content, qr/ak_\.\.\.[0-9A-Za-z]{4}/, "$fmt log holds hints");
}

is(index($log, $fake), -1,
	'a token-shaped string with a wrong checksum is not logged either');

for my $place (sort keys %near)
{
	my %nm = near_misses($near{$place});
	for my $kind (sort keys %nm)
	{
		my $count = () = $log =~ /\Q$nm{$kind}\E/g;
		is($count, 0, "near miss ($kind) in $place appears nowhere in the logs");
	}
	my $body = substr($near{$place}, -49);
	my @seen = grep { index($log, substr($body, $_, 12)) >= 0 } 0 .. 49 - 12;
	is(scalar(@seen), 0,
		"no 12 characters in a row of the key behind the near misses in $place are logged"
	) or diag "at body offsets @seen";
}

# pgaudit, listed before apikey: its audit lines (statements and their
# parameters) are redacted like every other log line.
SKIP:
{
	my $libdir = $ENV{PG_CONFIG} ? `$ENV{PG_CONFIG} --pkglibdir` : '';
	chomp $libdir;
	skip "pgaudit is not installed for this server ($libdir)", 1
	  unless $libdir ne '' && -e "$libdir/pgaudit.so";

	my $audited = apikey_node(
		'redact_pgaudit', q{
shared_preload_libraries = 'pgaudit,apikey'
pgaudit.log = 'all'
pgaudit.log_parameter = on
pgaudit.log_relation = on
pgaudit.log_catalog = on
pgaudit.log_level = 'log'
log_min_messages = notice
});
	$audited->safe_psql('postgres', 'CREATE EXTENSION pgaudit');
	apikey_db($audited);

	my %atok;
	for my $name (qw(literal bind function leak report stored control))
	{
		$atok{$name} = (split /\|/,
			$audited->safe_psql('postgres',
				"SELECT key_id || '|' || token FROM apikey.issue('acme', name => '$name')"))[1];
	}
	my ($ret, $out, $err) = $audited->psql(
		'postgres', qq{
SELECT apikey.verify('$atok{literal}');
SELECT * FROM apikey.check('$atok{literal}', 'orders:read');
CREATE TABLE notes (body text);
INSERT INTO notes VALUES ('$atok{stored}');
SELECT count(*) FROM notes WHERE body = '$atok{stored}';
DO \$\$ BEGIN PERFORM apikey.verify('$atok{function}'); END \$\$;
SELECT apikey.report_leak('$atok{leak}', 'support', 'T-1');
SELECT apikey.revoke_leaked(ARRAY['$atok{report}']);
});
	is($ret, 0, 'pgaudit: statements with tokens ran');

	my $bind = $audited->basedir . '/bind.sql';
	append_to_file($bind, "SELECT apikey.verify(:tok);\nINSERT INTO notes VALUES (:tok);\n");
	$audited->command_ok(
		[
			'pgbench', '-n', '-M', 'extended', '-t', '1', '-f', $bind,
			'-D', "tok=$atok{bind}", '-h', $audited->host, '-p', $audited->port,
			'postgres'
		],
		'pgaudit: a token as a bind parameter');
	# control: with redaction off, pgaudit does log the token
	$audited->safe_psql('postgres',
		"SET apikey.redact_logs = off; SELECT apikey.verify('$atok{control}')");
	$audited->stop('fast');

	my $alog = slurp_file($audited->logfile);
	like($alog, qr/AUDIT: SESSION,/, 'pgaudit wrote audit lines');
	like($alog, qr/AUDIT: SESSION,.*ak_\.\.\.[0-9A-Za-z]{4}/, 'holding hints in place of tokens');
	unlike($alog, qr/apikey is not the last library/, 'apikey is listed last: no warning');
	like($alog, qr/AUDIT: SESSION,.*\Q$atok{control}\E/,
		'control: with apikey.redact_logs = off, pgaudit logs the token');
	for my $name (grep { $_ ne 'control' } sort keys %atok)
	{
		my $count = () = $alog =~ /\Q$atok{$name}\E/g;
		is($count, 0, "pgaudit: token '$name' appears nowhere in the log");
		my $body = substr($atok{$name}, -49);
		my @seen = grep { index($alog, substr($body, $_, 12)) >= 0 } 0 .. 49 - 12;
		is(scalar(@seen), 0, "pgaudit: no 12 characters in a row of token '$name'");
	}
}

done_testing();
