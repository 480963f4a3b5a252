# Copyright (c) apikey contributors
#
# The example applications in examples/ (an express + node-postgres API and
# a psycopg 3 one) run their own tests against a throwaway cluster, once
# connected directly and once through PgBouncer in transaction mode:
# authenticate + row-level security in one transaction per request, the
# end client's address from X-Forwarded-For through the trusted-proxy role,
# and verdicts mapped to 401, 403 and 429 with Retry-After.  Through
# PgBouncer (1.18 on Debian 12) the apps must not use named prepared
# statements; a pool of two server connections behind four client
# connections makes them share.
#
# The database is examples/schema.sql's; each app's test issues its own
# keys through a superuser connection and keeps the tokens to itself.
#
# Nothing here is optional: missing Node.js modules, psycopg or PgBouncer
# fail the test, with the command that installs them (scripts/setup).

use strict;
use warnings;

use Cwd qw(abs_path);
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $examples = abs_path('examples');
my $pgbouncer_bin = '/usr/sbin/pgbouncer';
my $python = $ENV{APIKEY_PYTHON} // '/usr/bin/python3';

# Everything the apps' tests need, checked before any cluster starts.
my @missing;
push @missing, 'node (Debian: nodejs)'
  unless system('node --version >/dev/null 2>&1') == 0;
push @missing,
  "examples/node/node_modules (npm ci in examples/node; looked in $examples/node)"
  unless -f "$examples/node/node_modules/express/package.json"
  && -f "$examples/node/node_modules/pg/package.json";
push @missing, "psycopg 3 for $python (Debian: python3-psycopg)"
  unless system($python, '-c', 'import psycopg') == 0;
push @missing, "PgBouncer ($pgbouncer_bin)" unless -x $pgbouncer_bin;
if (@missing)
{
	fail('the example apps can run: missing '
		  . join(', ', @missing)
		  . '; run scripts/setup (as root) to install them');
	done_testing();
	exit;
}

my $node = apikey_node('examples');
apikey_db($node);
$node->safe_psql('postgres', slurp_file("$examples/schema.sql"));
my $superuser = $node->safe_psql('postgres', 'SELECT current_user');
my ($host, $port) = ($node->host, $node->port);

# PgBouncer in transaction mode, two server connections at most.
my $dir = PostgreSQL::Test::Utils::tempdir_short();
my $bouncer_port = PostgreSQL::Test::Cluster::get_free_port();
append_to_file("$dir/userlist.txt", qq{"example_app" ""\n});
append_to_file(
	"$dir/pgbouncer.ini", qq{
[databases]
appdb = host=$host port=$port dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir = $dir
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = 2
max_client_conn = 50
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
});
my ($bouncer_out, $bouncer_err) = ('', '');
my $bouncer = IPC::Run::start([ $pgbouncer_bin, "$dir/pgbouncer.ini" ],
	'>', \$bouncer_out, '2>', \$bouncer_err);

# Wait until PgBouncer accepts connections and reaches the server.
my $up = 0;
foreach my $attempt (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
{
	my ($out, $err) = ('', '');
	IPC::Run::run(
		[
			$node->installed_command('psql'), '-XAtq', '-h', '127.0.0.1', '-p',
			$bouncer_port, '-U', 'example_app', '-d', 'appdb', '-c', 'SELECT 1'
		],
		'>', \$out, '2>', \$err);
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

# URLs both node-postgres and libpq read; the cluster listens on a Unix
# socket only, so the direct ones name its directory.
my $admin_url = "postgresql://$superuser@/postgres?host=$host&port=$port";
my %targets = (
	direct => "postgresql://example_app@/postgres?host=$host&port=$port",
	pgbouncer => "postgresql://example_app\@127.0.0.1:$bouncer_port/appdb",);

my %apps = (
	node => { dir => "$examples/node", cmd => [ 'node', '--test', 'test/app.test.js' ] },
	python => {
		dir => "$examples/python",
		cmd => [ $python, '-m', 'unittest', '-v', 'test_app' ]
	},);

# Run one app's test suite against one target; its output on failure.
sub run_app_tests
{
	my ($app, $target) = @_;
	local $ENV{DATABASE_URL} = $targets{$target};
	local $ENV{ADMIN_DATABASE_URL} = $admin_url;
	my $out = '';
	my $ok = eval {
		IPC::Run::run(
			$apps{$app}{cmd}, '<', \undef, '>&', \$out,
			init => sub { chdir $apps{$app}{dir} or die "chdir: $!" },
			IPC::Run::timeout(3 * $PostgreSQL::Test::Utils::timeout_default));
	};
	$out .= "\n$@" if $@;
	ok($ok, "$app example's tests pass, $target") or diag($out);
	return;
}

for my $target ('direct', 'pgbouncer')
{
	run_app_tests($_, $target) for ('node', 'python');
}

# The apps really went through PgBouncer: it logged their logins.
like(slurp_file("$dir/pgbouncer.log"),
	qr/login attempt: db=appdb user=example_app/,
	'the apps connected through PgBouncer');

$bouncer->signal('TERM');
$bouncer->finish;
$node->stop;
done_testing();
