# Soak: a bounded mixed load, then exact accounting.
#
# pgbench runs several clients for APIKEY_SOAK_SECONDS (default 30) with
# weighted scripts that verify, check and authenticate random keys (some
# revoked), and issue, rotate and revoke keys.  Meanwhile one long-lived
# backend verifies every key again and again with a key cache smaller than
# the number of keys, while revocations keep invalidating it.
#   - pgbench exits 0 and reports 0 failed transactions: every verdict was
#     an expected one (authenticate of a possibly revoked key is wrapped in
#     an exception handler that accepts exactly 28000);
#   - after a clean shutdown, the calls in apikey.usage_log add up exactly
#     to the verify/check/authenticate calls made.  The scripts count their
#     calls with nextval() next to each call, because pgbench's per-script
#     transaction counts can be short of its own total by a few (seen with
#     -j 2); pgbench's counts are checked against the scripts' count within
#     exactly that shortfall;
#   - the long-lived backend's memory (private RSS and memory contexts)
#     stays flat from the end of its first pass to the end of the run.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;
use Time::HiRes qw(time);

my $seconds = $ENV{APIKEY_SOAK_SECONDS} || 30;
my $clients = 4;
my $nkeys = 2000;
my $cache_size = 500;

my $node = apikey_node(
	'soak', qq{
apikey.cache_size = $cache_size
apikey.usage_max_entries = 200000
max_connections = 30
});
apikey_db($node);
$node->safe_psql(
	'postgres', qq{
INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
CREATE SEQUENCE calls_made;
CREATE TABLE tokens (id bigserial PRIMARY KEY, key_id bigint NOT NULL, token text NOT NULL,
                     revoked boolean NOT NULL DEFAULT false);
INSERT INTO tokens (key_id, token)
SELECT key_id, token FROM generate_series(1, $nkeys) i,
       LATERAL apikey.issue('soak-' || i, '{orders:read}');
});

# A random token: the first at or after a random id (ids are never deleted,
# so there always is one).
my $pick = q{SELECT l.token FROM tokens l
         WHERE l.id >= (SELECT (random() * max(id))::bigint FROM tokens)
         ORDER BY l.id LIMIT 1};
my $pick_live = q{SELECT id, key_id FROM tokens
               WHERE NOT revoked AND id >= (SELECT (random() * max(id))::bigint FROM tokens)
               ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED};

# name => [weight, verification calls per transaction, script]
my %scripts = (
	'verify.sql' => [
		6, 1,
		qq{SELECT apikey.verify(t.token, 'orders:read'), nextval('calls_made') FROM ($pick) t;\n}
	],
	'check.sql' => [
		2, 1,
		qq{SELECT (apikey.check(t.token, 'orders:read')).code, nextval('calls_made') FROM ($pick) t;\n}
	],
	'authenticate.sql' => [
		3, 1, qq{DO \$\$
DECLARE
	tok text;
BEGIN
	$pick INTO tok;
	PERFORM nextval('calls_made');
	BEGIN
		PERFORM apikey.authenticate(tok, 'orders:read');
		IF apikey.current_key_id() IS NULL OR NOT apikey.has_scope('orders:read') THEN
			RAISE EXCEPTION 'authenticate() returned but bound nothing';
		END IF;
	EXCEPTION WHEN invalid_authorization_specification THEN
		NULL;	-- a revoked key: the one expected failure
	END;
END
\$\$;
}
	],
	'issue.sql' => [
		1, 0,
		qq{INSERT INTO tokens (key_id, token) SELECT key_id, token FROM apikey.issue('soak', '{orders:read}');\n}
	],
	'rotate.sql' => [
		1, 0, qq{WITH pick AS ($pick_live),
     n AS (SELECT r.key_id, r.token FROM pick, LATERAL apikey.rotate(pick.key_id, '1 hour') r)
INSERT INTO tokens (key_id, token) SELECT key_id, token FROM n;
}
	],
	'revoke.sql' => [
		1, 0, qq{WITH pick AS ($pick_live),
     done AS (SELECT id, apikey.revoke(key_id, 'soak') AS revoked_now FROM pick)
UPDATE tokens t SET revoked = true FROM done WHERE t.id = done.id;
}
	],);
my @script_args;
for my $name (sort keys %scripts)
{
	my $file = $node->basedir . "/$name";
	append_to_file($file, $scripts{$name}[2]);
	push @script_args, '-f', "$file\@$scripts{$name}[0]";
}

# The long-lived backend.
my $bg = $node->background_psql('postgres');
my $pid = $bg->query_safe('SELECT pg_backend_pid()');
my $pass_sql = q{SELECT count(*) || '|' || count(*) FILTER (WHERE ok)
  FROM (SELECT apikey.verify(token) AS ok FROM tokens) s};
my $bg_calls = 0;
sub run_pass
{
	my ($n, $valid) = split /\|/, $bg->query_safe($pass_sql);
	$bg_calls += $n;
	return ($n, $valid);
}
sub memory
{
	my %m;
	open my $fh, '<', "/proc/$pid/status" or die "cannot read /proc/$pid/status: $!";
	while (<$fh>)
	{
		$m{$1} = $2 if /^(VmRSS|RssAnon|RssShmem):\s+(\d+) kB/;
	}
	close $fh;
	$m{contexts} = int(
		$bg->query_safe('SELECT sum(total_bytes) FROM pg_backend_memory_contexts') / 1024);
	return \%m;
}

# Warm up: two passes fill the cache, evict, and allocate what a pass needs.
my ($n, $valid) = run_pass();
is($valid, $nkeys, "first pass: all $nkeys keys valid");
run_pass();
my $m0 = memory();
note sprintf('long-lived backend after warm-up: VmRSS %d kB, RssAnon %d kB, RssShmem %d kB, contexts %d kB',
	@$m0{qw(VmRSS RssAnon RssShmem contexts)});

my ($out, $err) = ('', '');
my $started = time;
my $pgbench = IPC::Run::start(
	[
		'pgbench', '-n', '-c', $clients, '-j', 2, '-T', $seconds,
		@script_args, '-h', $node->host, '-p', $node->port, 'postgres'
	],
	'>', \$out, '2>', \$err,
	IPC::Run::timeout($seconds + $PostgreSQL::Test::Utils::timeout_default));

my $passes = 0;
while ($pgbench->pumpable)
{
	run_pass();
	$passes++;
	$pgbench->pump_nb;
}
$pgbench->finish;
my $status = $? >> 8;
my $elapsed = time - $started;
run_pass();
$passes++;
my $m1 = memory();
note sprintf('long-lived backend after %d passes (%d verifications): VmRSS %d kB, RssAnon %d kB, RssShmem %d kB, contexts %d kB',
	$passes + 2, $bg_calls, @$m1{qw(VmRSS RssAnon RssShmem contexts)});
note sprintf('growth: VmRSS %+d kB, RssAnon %+d kB, contexts %+d kB',
	$m1->{VmRSS} - $m0->{VmRSS}, $m1->{RssAnon} - $m0->{RssAnon},
	$m1->{contexts} - $m0->{contexts});

is($status, 0, "pgbench ran ${seconds}s and exited 0") or diag $err;
like($out, qr/number of failed transactions: 0 \(/, 'pgbench reports 0 failed transactions')
  or diag $out;
note "pgbench ran for " . sprintf('%.1f', $elapsed) . " s";

# Calls made: counted next to each call, plus the long-lived backend's.
my $script_calls = $node->safe_psql('postgres',
	q{SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM calls_made});
my $expected = $script_calls + $bg_calls;

# Transactions per script, from pgbench's per-script report.
my %tx;
my $pgbench_calls = 0;
while ($out =~ /SQL script \d+: (\S+)\n - weight: \d+[^\n]*\n - (\d+) transactions/g)
{
	my ($file, $count) = ($1, $2);
	$file =~ s{.*/}{};
	$tx{$file} = $count;
	$pgbench_calls += $count * $scripts{$file}[1];
}
is(scalar(keys %tx), scalar(keys %scripts), 'pgbench reported every script') or diag $out;
note join(', ', map { "$_: $tx{$_}" } sort keys %tx);
cmp_ok($tx{$_}, '>', 0, "$_ ran") for sort keys %scripts;
my ($total_tx) = $out =~ /number of transactions actually processed: (\d+)/;
note "pgbench: $total_tx transactions in total, per-script counts add up to "
  . sum_values(\%tx) . "; verification calls by its count: $pgbench_calls, counted by the scripts: $script_calls";
# pgbench's per-script counts and its total can disagree by a few
# transactions (the per-script counts miss some on 15 and count one more on
# 18); each of those made at most one call.
my $slack = abs($total_tx - sum_values(\%tx));
cmp_ok(abs($script_calls - $pgbench_calls), '<=', $slack,
	"the scripts made the calls pgbench's per-script counts imply, within the $slack transactions its counts disagree on");

my ($dropped, $counted, $revoked, $rotated) = split /\|/,
  $node->safe_psql('postgres',
	q{SELECT (SELECT entries_dropped FROM apikey.stats),
             (SELECT sum(value::bigint) FROM apikey.stats, jsonb_each_text(calls)),
             (SELECT count(*) FROM apikey.revocations),
             (SELECT count(*) FROM apikey.key_lineage WHERE rotated_from IS NOT NULL)});
is($dropped, 0, 'no usage counter was dropped');
is($counted, $expected, "apikey.stats counted exactly the $expected calls made");
note "$revoked keys revoked and $rotated rotated during the run";

# Memory of the long-lived backend stays flat.
cmp_ok($m1->{RssAnon} - $m0->{RssAnon}, '<', 2048,
	'long-lived backend: private RSS grew by less than 2 MB');
cmp_ok($m1->{contexts} - $m0->{contexts}, '<', 512,
	'long-lived backend: memory contexts grew by less than 512 kB');
$bg->quit;

# After a clean shutdown every call is in usage_log, exactly once.
$node->stop('fast');
$node->start;
my $logged = $node->safe_psql('postgres', 'SELECT sum(calls) FROM apikey.usage_log');
is($logged, $expected,
	"usage_log holds exactly the $expected verify/check/authenticate calls made");

my $codes = $node->safe_psql('postgres',
	q{SELECT string_agg(code || '=' || n, ', ' ORDER BY code)
	    FROM (SELECT code, sum(calls) AS n FROM apikey.usage_log GROUP BY code) s});
note "usage by verdict: $codes";
like($codes, qr/^revoked=\d+, valid=\d+$/, 'the only verdicts were valid and revoked');

$node->stop;
sub sum_values
{
	my $h = shift;
	my $t = 0;
	$t += $_ for values %$h;
	return $t;
}

done_testing();
