# With shared_preload_libraries = 'apikey': a usage writer runs in the
# database where the extension is installed, usage counted in shared memory reaches
# apikey.usage_log and keys.last_used_at, apikey.stats and
# apikey.live_usage show the live counters, flush_usage() has the writer
# flush at once, and a full usage table drops counts (and counts the
# drops) without ever blocking verification.
#
# Tokens stay in a table on the server: no token appears in a query text,
# so none reaches this test's log.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = apikey_node('preload');
apikey_db($node);
token_table($node);
$node->safe_psql(
	'postgres', q{
INSERT INTO apikey.scopes (name) VALUES ('orders:read');
INSERT INTO tok SELECT 'live', key_id, token FROM apikey.issue(owner => 'acme', scopes => '{orders:read}');
INSERT INTO tok SELECT 'idle', key_id, token FROM apikey.issue(owner => 'acme');
});

# The worker: one process of that backend type, connected to postgres.
ok( $node->poll_query_until(
		'postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity
		   WHERE backend_type = 'apikey usage writer' AND datname = 'postgres'}),
	'usage writer runs, connected to the database with the extension');
ok($node->log_contains(qr/apikey usage writer started for database "postgres"/),
	'usage writer logged its start');

# The settings.
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(name || '=' || setting || ':' || context, ' ' ORDER BY name)
  FROM pg_settings
 WHERE name IN ('apikey.databases', 'apikey.usage_flush_interval', 'apikey.usage_max_entries',
                'apikey.rate_limit_max_keys', 'apikey.cache_size', 'apikey.redact_logs')}),
	'apikey.cache_size=10000:superuser apikey.databases=:sighup '
	  . 'apikey.rate_limit_max_keys=10000:postmaster apikey.redact_logs=on:superuser '
	  . 'apikey.usage_flush_interval=1000:sighup apikey.usage_max_entries=10000:postmaster',
	'GUCs are defined with their defaults and contexts');
is($node->safe_psql('postgres', 'SHOW apikey.usage_flush_interval'),
	'1s', 'flush interval is shown with its unit');

is($node->safe_psql('postgres', 'SELECT shared_memory FROM apikey.stats'),
	't', 'apikey.stats: shared memory is in use');

# Verifications of one key: 4 valid (one with a client address, which a
# success does not record) and 1 scope_denied.
my $before = $node->safe_psql('postgres', 'SELECT now()');
$node->safe_psql(
	'postgres', q{
SELECT apikey.check(token) FROM tok WHERE name = 'live';
SELECT apikey.verify(token) FROM tok WHERE name = 'live';
SELECT apikey.authenticate(token, 'orders:read') FROM tok WHERE name = 'live';
SELECT apikey.check(token, 'orders:write') FROM tok WHERE name = 'live';
SELECT apikey.check(token, NULL, '192.0.2.7') FROM tok WHERE name = 'live';
});

# The worker writes them within a few flush intervals; no explicit flush.
ok( $node->poll_query_until(
		'postgres',
		q{SELECT coalesce(sum(calls), 0) = 5 FROM apikey.usage_log
		   WHERE key_id = (SELECT key_id FROM tok WHERE name = 'live')}),
	'usage reached usage_log through the worker');
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(code || ':' || coalesce(host(client_addr), '-') || ':' || calls, ' ' ORDER BY code, calls)
  FROM (SELECT code, client_addr, sum(calls) AS calls FROM apikey.usage_log
         WHERE key_id = (SELECT key_id FROM tok WHERE name = 'live') GROUP BY 1, 2) u}),
	'scope_denied:-:1 valid:-:4',
	'per code; the refusal without an address (Unix socket) has none');
ok( $node->poll_query_until(
		'postgres',
		q{SELECT entries_pending = 0 AND flushes > 0 AND flushed_calls >= 5
		         AND flush_errors = 0 AND last_flush IS NOT NULL
		    FROM apikey.stats}),
	'apikey.stats: flushed, nothing pending, no errors');

# last_used_at: set for the key that was used, from the time of use;
# untouched for the idle key.
is( $node->safe_psql(
		'postgres', qq{
SELECT string_agg(t.name || ':' || (k.last_used_at IS NOT NULL)::text
                  || ':' || coalesce((k.last_used_at >= '$before')::text, '-'), ' ' ORDER BY t.name)
  FROM tok t JOIN apikey.keys k ON k.id = t.key_id}),
	'idle:false:- live:true:true',
	'last_used_at set by the usage writer for the used key only');

# Counted per code in apikey.stats.
is( $node->safe_psql(
		'postgres',
		q{SELECT (calls->>'valid')::int || ' ' || (calls->>'scope_denied')::int FROM apikey.stats}),
	'4 1',
	'apikey.stats counts calls per code');

# Rate limits are per database: key 1 of one database is not key 1 of
# another.
for my $db ('limits_a', 'limits_b')
{
	apikey_db($node, $db);
	$node->safe_psql(
		$db, q{
CREATE TABLE tok AS SELECT key_id, token FROM apikey.issue(owner => 'acme', rate_limit => 1, rate_window => '1 hour');
});
}
is( $node->safe_psql(
		'limits_a', q{
SELECT key_id || ' ' || (SELECT (apikey.check(token)).code FROM tok) || ' ' || (SELECT (apikey.check(token)).code FROM tok)
  FROM tok}),
	'1 valid rate_limited', 'database limits_a: key 1 used up');
is( $node->safe_psql(
		'limits_b', q{SELECT key_id || ' ' || (SELECT (apikey.check(token)).code FROM tok) FROM tok}),
	'1 valid', 'database limits_b: its key 1 has its own bucket');

# Now hold the writer off (one flush per hour), and make the usage table
# small: 100 entries.
$node->append_conf(
	'postgresql.conf', qq{
apikey.usage_flush_interval = '1h'
apikey.usage_max_entries = 100
apikey.rate_limit_max_keys = 100
});
$node->restart;
wait_for_writer($node);
is($node->safe_psql('postgres', 'SHOW apikey.usage_max_entries'),
	'100', 'usage_max_entries changed by restart');

# Pending counts are visible in live_usage and key_usage before any flush.
$node->safe_psql(
	'postgres', q{
SELECT apikey.check(token) FROM tok, generate_series(1, 4) WHERE name = 'idle';
});
is( $node->safe_psql(
		'postgres', q{
SELECT (SELECT sum(calls) FROM apikey.live_usage
         WHERE key_id = (SELECT key_id FROM tok WHERE name = 'idle') AND code = 'valid')
       || ' ' || (SELECT count(*) FROM apikey.usage_log
                   WHERE key_id = (SELECT key_id FROM tok WHERE name = 'idle'))
       || ' ' || (SELECT sum(valid_calls) FROM apikey.key_usage
                   WHERE key_id = (SELECT key_id FROM tok WHERE name = 'idle'))
       || ' ' || (SELECT entries_pending FROM apikey.stats)}),
	'4 0 4 1',
	'pending calls: in live_usage and key_usage, not yet in usage_log');
is($node->safe_psql('postgres', 'SELECT apikey.flush_usage()'),
	'1', 'flush_usage() writes the one pending entry');
is( $node->safe_psql(
		'postgres', q{
SELECT (SELECT count(*) FROM apikey.live_usage)
       || ' ' || (SELECT sum(calls) FROM apikey.usage_log
                   WHERE key_id = (SELECT key_id FROM tok WHERE name = 'idle'))
       || ' ' || (SELECT sum(valid_calls) FROM apikey.key_usage
                   WHERE key_id = (SELECT key_id FROM tok WHERE name = 'idle'))
       || ' ' || (SELECT entries_pending FROM apikey.stats)
       || ' ' || (SELECT last_used_at IS NOT NULL FROM apikey.keys
                   WHERE id = (SELECT key_id FROM tok WHERE name = 'idle'))}),
	'0 4 4 0 true',
	'after flush_usage(): in usage_log once, live_usage empty, last_used_at set');

# Overflow: valid calls of 150 keys (150 distinct counters) into a table of
# 100.  100 are kept, 50 dropped and counted; verification goes on
# answering.
$node->safe_psql(
	'postgres', q{
INSERT INTO tok SELECT 'many' || g, key_id, token
  FROM generate_series(1, 150) g, LATERAL apikey.issue(owner => 'acme', name => 'many' || g);
});
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FILTER (WHERE apikey.verify((SELECT token FROM tok WHERE name = 'many' || g)))
  FROM generate_series(1, 150) g}),
	'150', '150 keys verified, all valid');
is( $node->safe_psql(
		'postgres',
		q{SELECT entries_pending || ' ' || entries_dropped || ' ' || (calls->>'valid') FROM apikey.stats}),
	'100 50 154',
	'usage table full at 100 entries: 50 counts dropped, all calls counted in stats');
is( $node->safe_psql(
		'postgres', q{SELECT code FROM tok, apikey.check(token) WHERE name = 'live'}),
	'valid', 'verification still answers with the usage table full');
is($node->safe_psql('postgres', 'SELECT entries_dropped FROM apikey.stats'),
	'51', 'and its count is dropped too');

# A flush empties the table; new counts are kept again.
is($node->safe_psql('postgres', 'SELECT apikey.flush_usage()'),
	'100', 'flush_usage() writes the 100 kept entries');
is( $node->safe_psql(
		'postgres',
		q{SELECT count(*) || ' ' || sum(calls) FROM apikey.usage_log
		   WHERE key_id IN (SELECT key_id FROM tok WHERE name LIKE 'many%')}),
	'100 100', 'usage_log has the kept calls, one row per key');
$node->safe_psql('postgres', q{SELECT apikey.check(token) FROM tok WHERE name = 'live'});
is( $node->safe_psql(
		'postgres',
		q{SELECT entries_pending || ' ' || entries_dropped FROM apikey.stats}),
	'1 51', 'room again after the flush');

# The rate-limit table is bounded too: with room for 100 keys, 100 keys
# each holding a request of their hour fill it, and a 101st rate-limited
# key is refused with rate_limit_unavailable (never allowed unlimited).
$node->safe_psql(
	'postgres', q{
INSERT INTO tok SELECT 'rl' || g, key_id, token
  FROM generate_series(1, 101) g,
       LATERAL apikey.issue(owner => 'acme', name => 'rl' || g, rate_limit => 1, rate_window => '1 hour');
});
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(code || ':' || n, ' ' ORDER BY code)
  FROM (SELECT c.code, count(*) AS n
          FROM (SELECT g, (SELECT (apikey.check(token)).code FROM tok WHERE name = 'rl' || g) AS code
                  FROM generate_series(1, 101) g) c GROUP BY c.code) s}),
	'rate_limit_unavailable:1 valid:100',
	'rate-limit table full of active keys: the 101st key is refused');
my ($ret, $out, $err) = $node->psql(
	'postgres', q{\set VERBOSITY verbose
SELECT apikey.authenticate(token) FROM tok WHERE name = 'rl101'});
like($err, qr/ERROR:  55000: API key has a rate limit that cannot be enforced/,
	'authenticate() raises 55000 for it');
like($err, qr/HINT:  .*apikey\.rate_limit_max_keys/, 'and the hint names apikey.rate_limit_max_keys');
is( $node->safe_psql(
		'postgres', q{SELECT code FROM tok, apikey.check(token) WHERE name = 'rl1'}),
	'rate_limited', 'the keys already tracked are still limited');

# Nothing went wrong in the server log (except the error raised above).
ok(!$node->log_contains(qr/FATAL|PANIC|TRAP|ERROR:  (?!API key has a rate limit)/),
	'no other errors in the server log');

$node->stop;
done_testing();
