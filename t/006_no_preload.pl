# Without shared_preload_libraries: keys are issued, verified and bound as
# usual; usage is appended to apikey.usage_pending in the caller's
# transaction and folded into usage_log by apikey.flush_usage(); there
# is no shared memory (apikey.stats says so) and no usage writer; quotas
# work (they live in a table); a key with a rate limit cannot be enforced
# and is refused with rate_limit_unavailable, never allowed unlimited.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = PostgreSQL::Test::Cluster->new('nopreload');
$node->init;
# Loaded lazily while log_statement logs, apikey refuses to verify
# (t/025_late_load_refused.pl); without logging, lazy loading is harmless.
$node->append_conf('postgresql.conf', 'log_statement = none');
$node->start;

is($node->safe_psql('postgres', 'SHOW shared_preload_libraries'), '', 'apikey is not preloaded');

# Loading the library outside shared_preload_libraries must not fail.
my ($ret, $out, $err) = $node->psql('postgres', 'CREATE EXTENSION apikey');
is($ret, 0, 'CREATE EXTENSION apikey works without the preload') or diag $err;
is($node->safe_psql('postgres', q{SELECT count(*) FROM pg_extension WHERE extname = 'apikey'}),
	'1', 'extension installed');

token_table($node);
$node->safe_psql(
	'postgres', q{
INSERT INTO apikey.scopes (name) VALUES ('orders:read');
INSERT INTO tok SELECT 'good', key_id, token FROM apikey.issue(owner => 'acme', scopes => '{orders:read}');
INSERT INTO tok SELECT 'limited', key_id, token FROM apikey.issue(owner => 'acme', rate_limit => 1000);
INSERT INTO tok SELECT 'quota', key_id, token FROM apikey.issue(owner => 'acme', quota => 2);
INSERT INTO tok SELECT 'rev', key_id, token FROM apikey.issue(owner => 'acme');
SELECT apikey.revoke(key_id) FROM tok WHERE name = 'rev';
});

# Verification and binding work.
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(name || ':' || (apikey.check(token)).code, ' ' ORDER BY name) FROM tok WHERE name IN ('good', 'rev')}),
	'good:valid rev:revoked', 'check() works');
is( $node->safe_psql(
		'postgres', q{
BEGIN;
SELECT apikey.authenticate(tok('good'), 'orders:read') = kid('good');
SELECT apikey.current_owner(), apikey.has_scope('orders:read');
COMMIT;
}),
	"t\nacme|t", 'authenticate() and the helpers work');

# No shared memory, no worker.
is( $node->safe_psql(
		'postgres', q{
SELECT shared_memory || ' ' || (calls IS NULL) || ' ' || (entries_pending IS NULL) || ' ' || (last_flush IS NULL) || ' ' || (tokens_redacted IS NULL)
  FROM apikey.stats}),
	'false true true true true', 'apikey.stats: no shared memory');
is( $node->safe_psql(
		'postgres', q{
SELECT (SELECT writer_heartbeat IS NULL FROM apikey.stats) || ' ' ||
	   (SELECT count(*) || ' ' || count(calls) FROM apikey.stats_by_code)}),
	'true 14 0', 'no heartbeat; stats_by_code: every code, no counts');
is( $node->safe_psql(
		'postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'apikey usage writer'}),
	'0', 'no usage writer');
is($node->safe_psql('postgres', 'SELECT count(*) FROM apikey.live_usage'), '0', 'live_usage is empty');

# Usage is written synchronously, as pending rows: key_usage counts them as
# soon as the call commits, and they roll back with the caller's
# transaction.
my $usage_query = q{
SELECT string_agg(coalesce(t.name, '-') || ':' || u.calls, ' ' ORDER BY t.name)
  FROM (SELECT key_id, sum(calls) AS calls FROM apikey.key_usage GROUP BY 1) u
  LEFT JOIN tok t USING (key_id)};
is($node->safe_psql('postgres', $usage_query), 'good:2 rev:1', 'key_usage has the calls at once');
is($node->safe_psql('postgres', 'SELECT count(*) FROM apikey.usage_log'), '0', 'usage_log not yet');
is( $node->safe_psql(
		'postgres', q{
BEGIN;
SELECT code FROM apikey.check(tok('good'));
SELECT sum(calls) FROM apikey.key_usage WHERE key_id = kid('good');
ROLLBACK;
SELECT sum(calls) FROM apikey.key_usage WHERE key_id = kid('good');
}),
	"valid\n3\n2",
	'written in the caller\'s transaction, and rolled back with it');

# flush_usage() folds them into usage_log and last_used_at.
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(coalesce(t.name, '-') || ':' || u.code || ':' || u.calls, ' ' ORDER BY t.name, u.code)
  FROM (SELECT key_id, code, sum(calls) AS calls FROM apikey.usage_log GROUP BY 1, 2) u
  LEFT JOIN tok t USING (key_id)}),
	'good:valid:2 rev:revoked:1', 'flush_usage() wrote them to usage_log');
is($node->safe_psql('postgres', 'SELECT count(*) FROM apikey.usage_pending'), '0', 'none left pending');
is($node->safe_psql('postgres', 'SELECT apikey.flush_usage()'), '0', 'a second flush has nothing to do');
is( $node->safe_psql(
		'postgres',
		q{SELECT string_agg(tok.name || ':' || (last_used_at IS NOT NULL), ' ' ORDER BY tok.name)
		    FROM tok JOIN apikey.keys k ON k.id = tok.key_id WHERE tok.name IN ('good', 'rev')}),
	'good:true rev:false', 'last_used_at set by successful verifications only');

# Retention works without the preload (its settings are defined in every
# backend that loads apikey): the flushed calls are rolled up.
is( $node->safe_psql(
		'postgres', q{
UPDATE apikey.usage_log SET bucket = bucket - interval '5 minutes';  -- the writer's minutes wait
SELECT r.rows_rolled_up IN (2, 3), r.calls_rolled_up FROM apikey.run_retention() r;  -- 3 rows if the calls crossed a minute
SELECT sum(calls) FROM apikey.usage_hourly}),
	"t|3\n3", 'run_retention() rolls up without the preload');

# A rate limit cannot be enforced: refused, never allowed.
is( $node->safe_psql(
		'postgres',
		q{SELECT valid || ' ' || code || ' ' || (key_id = kid('limited')) FROM apikey.check(tok('limited'))}),
	'false rate_limit_unavailable true', 'a rate-limited key gets rate_limit_unavailable');
is($node->safe_psql('postgres', q{SELECT apikey.verify(tok('limited'))}), 'f', 'verify() is false');
($ret, $out, $err) = $node->psql(
	'postgres', q{\set VERBOSITY verbose
SELECT apikey.authenticate(tok('limited'));
SELECT apikey.current_key_id() IS NULL;});
like($err, qr/ERROR:  55000: API key has a rate limit that cannot be enforced/,
	'authenticate() raises 55000 and says why');
like($err, qr/DETAIL:  Verdict: rate_limit_unavailable\./, 'with the verdict in DETAIL');
like($err, qr/HINT:  .*shared_preload_libraries/, 'and a hint to preload apikey');
is( $node->safe_psql(
		'postgres', q{SELECT available || ' ' || tracked FROM apikey.rate_limit_state WHERE key_id = kid('limited')}),
	'0 false', 'rate_limit_state: nothing available without shared memory');
is( $node->safe_psql(
		'postgres',
		q{SELECT sum(failed_calls) FROM apikey.key_usage WHERE key_id = kid('limited')}),
	'2', 'the refusals are counted');
# Once the limit is removed the key works.
$node->safe_psql('postgres', q{SELECT apikey.set_limits(kid('limited'), rate_limit => NULL)});
is($node->safe_psql('postgres', q{SELECT code FROM apikey.check(tok('limited'))}), 'valid',
	'without its rate limit the key is valid');

# Quotas do not need shared memory.
is( $node->safe_psql(
		'postgres', q{
SELECT code || ':' || remaining FROM apikey.check(tok('quota'));
SELECT code || ':' || remaining FROM apikey.check(tok('quota'));
SELECT code || ':' || remaining FROM apikey.check(tok('quota'));}),
	"valid:1\nvalid:0\nquota_exhausted:0", 'quota enforced without shared memory');

# The responses in tables work; the ones in shared memory are off or refuse.
is( $node->safe_psql(
		'postgres', q{
SELECT apikey.suspend(kid('quota'), 'no preload');
SELECT code FROM apikey.check(tok('quota'));
SELECT apikey.resume(kid('quota'));}),
	"t\nsuspended\nt", 'suspend and resume work without shared memory');
($ret, $out, $err) = $node->psql('postgres', q{SELECT apikey.throttle(kid('quota'), 1, '1 hour')});
like($err, qr/API keys cannot be throttled without shared memory/, 'throttle() refuses without shared memory');
is( $node->safe_psql(
		'postgres',
		q{SELECT string_agg(code, ' ') FROM (SELECT (apikey.check('ak_bad', NULL, '203.0.113.1')).code FROM generate_series(1, 40)) c}),
	join(' ', ('malformed') x 40), 'the failure limiter is off');

ok(!$node->log_contains(qr/LOG:  apikey usage writer started/), 'the usage writer never started');
ok(!$node->log_contains(qr/FATAL|PANIC/), 'no session was lost');

$node->stop;
done_testing();
