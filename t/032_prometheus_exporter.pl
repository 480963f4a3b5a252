# monitoring/prometheus-postgres-exporter.yaml, end to end: Debian's
# prometheus-postgres-exporter runs it against a server with apikey, as the
# README's key_monitor role, and /metrics shows the calls made, by code
# and by owner, and a live usage writer.
#
# Skipped when the exporter is not installed (scripts/setup installs it).
use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use HTTP::Tiny;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use ApikeyTest;

my $exporter_bin = '/usr/bin/prometheus-postgres-exporter';
plan skip_all => "prometheus-postgres-exporter is not installed ($exporter_bin)"
  unless -x $exporter_bin;
my $queries = dirname(abs_path(__FILE__)) . '/../monitoring/prometheus-postgres-exporter.yaml';
BAIL_OUT("no queries file at $queries") unless -f $queries;

my $node = apikey_node('exporter', "apikey.usage_flush_interval = '200ms'\n");
apikey_db($node);
token_table($node);

# The README's monitoring role, granted as the README grants it.
$node->safe_psql(
	'postgres', q{
CREATE ROLE key_monitor LOGIN;
SELECT apikey.grant_monitor('key_monitor');
});

# 3 valid calls for acme, 2 for globex, 4 unknown (well-formed tokens of no
# key), 1 malformed.  Tokens stay in table tok.
$node->safe_psql(
	'postgres', q{
INSERT INTO tok SELECT 'acme', key_id, token FROM apikey.issue(owner => 'acme');
INSERT INTO tok SELECT 'globex', key_id, token FROM apikey.issue(owner => 'globex');
INSERT INTO tok SELECT 'nobody', NULL, token FROM apikey._new_token('ak');
SELECT apikey.check(tok('acme')) FROM generate_series(1, 3);
SELECT apikey.check(tok('globex')) FROM generate_series(1, 2);
SELECT apikey.check(tok('nobody')) FROM generate_series(1, 4);
SELECT apikey.check('not a token');
});
is( $node->safe_psql(
		'postgres',
		q{SELECT string_agg(code || '=' || calls, ',' ORDER BY code) FROM apikey.stats_by_code WHERE calls > 0}),
	'malformed=1,unknown=4,valid=5',
	'stats_by_code counts the calls');

# The exporter, on a free port, through the node's socket.
my $port = PostgreSQL::Test::Cluster::get_free_port();
my $host = $node->host;
my $pgport = $node->port;
my $dir = PostgreSQL::Test::Utils::tempdir_short();
local $ENV{DATA_SOURCE_NAME} =
  "host=$host port=$pgport user=key_monitor dbname=postgres sslmode=disable";
my ($out, $err) = ('', '');
my $exporter = IPC::Run::start(
	[
		$exporter_bin, "--extend.query-path=$queries",
		"--web.listen-address=127.0.0.1:$port",
		'--disable-settings-metrics'
	],
	'>', \$out, '2>', \$err);

my $http = HTTP::Tiny->new(timeout => 10);
my $url = "http://127.0.0.1:$port/metrics";

# Scrape until the apikey series are there (the exporter needs a moment to
# listen and connect).
sub scrape
{
	my $body = '';
	foreach my $attempt (1 .. 10 * $PostgreSQL::Test::Utils::timeout_default)
	{
		my $r = $http->get($url);
		if ($r->{success} && $r->{content} =~ /^apikey_calls_total\{/m)
		{
			$body = $r->{content};
			last;
		}
		usleep(100_000);
	}
	return $body;
}
my $body = scrape();
ok($body ne '', 'exporter serves apikey series') or diag "exporter stderr:\n$err";

# One sample: the value of series $name whose labels include %want.
sub sample
{
	my ($name, %want) = @_;
	my @found;
	while ($body =~ /^\Q$name\E(?:\{([^}]*)\})? (\S+)$/mg)
	{
		my ($labels, $value) = ($1 // '', $2);
		my %l = $labels =~ /(\w+)="([^"]*)"/g;
		next if grep { !defined $l{$_} || $l{$_} ne $want{$_} } keys %want;
		push @found, $value;
	}
	return @found == 1 ? $found[0] : undef;
}

is(sample('apikey_calls_total', code => 'valid'), 5, 'calls_total{code="valid"}');
is(sample('apikey_calls_total', code => 'unknown'), 4, 'calls_total{code="unknown"}');
is(sample('apikey_calls_total', code => 'malformed'), 1, 'calls_total{code="malformed"}');
is(sample('apikey_calls_total', code => 'revoked'), 0, 'a code never seen is 0');
my $codes = () = $body =~ /^apikey_calls_total\{/mg;
is( $codes,
	$node->safe_psql('postgres', 'SELECT count(*) FROM apikey.stats_by_code'),
	'one calls_total series per verdict code');
like($body, qr/^# TYPE apikey_calls_total counter$/m, 'calls_total is a counter');

my $age = sample('apikey_writer_heartbeat_age_seconds');
ok(defined $age && $age >= 0 && $age < 10, "writer heartbeat is recent ($age s)");
is(sample('apikey_writer_flush_errors_total'), 0, 'no flush errors');
is(sample('apikey_stats_entries_dropped_total'), 0, 'nothing dropped');
is(sample('apikey_stats_shared_memory'), 1, 'counters live in shared memory');

is(sample('apikey_owner_calls_recent', owner => 'acme'), 3, 'acme: 3 recent calls');
is(sample('apikey_owner_calls_recent', owner => 'globex'), 2, 'globex: 2 recent calls');
is(sample('apikey_owner_calls_recent', owner => '(no key)'), 5,
	'tokens of no key: 5 recent calls');

note join "\n", grep { /^apikey_/ } split /\n/, $body;
# A query of the file that fails sets this (and drops its series).
is(sample('pg_exporter_last_scrape_error'), 0, 'every query of the file ran');

$exporter->kill_kill;
$node->stop;
done_testing();
