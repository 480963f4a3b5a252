# What a PUBLIC caller can make apikey keep in shared memory is bounded,
# whatever client_addr it passes, and never crowds out valid calls:
#   - tokens that match no key (unknown, malformed) take one counter per code
#     and minute, however many addresses they come from;
#   - a known key's failures keep at most 16 addresses per minute; the
#     rest are counted in one counter without an address, and every call
#     reaches usage_log exactly;
#   - failures may fill at most half of apikey.usage_max_entries: once that
#     half is full, further failures are dropped (and the drops counted),
#     and valid calls are still counted, exactly.
# sql/usage_address_bound.sql holds the same for the synchronous path.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = apikey_node(
	'bounds', q{
apikey.usage_flush_interval = '1h'
apikey.usage_max_entries = 100
});
apikey_db($node);
wait_for_writer($node);
token_table($node);
$node->safe_psql(
	'postgres', q{
INSERT INTO tok SELECT 'gone', key_id, token FROM apikey.issue(owner => 'acme');
INSERT INTO tok SELECT 'deleted', key_id, token FROM apikey.issue(owner => 'acme');
INSERT INTO tok SELECT 'bad' || g, key_id, token
  FROM generate_series(1, 10) g, LATERAL apikey.issue(owner => 'mallory', name => 'bad' || g);
SELECT apikey.revoke(key_id) FROM tok WHERE name = 'gone' OR name LIKE 'bad%';
DELETE FROM apikey.keys WHERE id = (SELECT key_id FROM tok WHERE name = 'deleted');
});

my $stats = q{SELECT entries_pending || ' ' || entries_dropped FROM apikey.stats};

# Not in the last 20 seconds of a minute: a flood, and what is checked
# about its minute after it, must fit in one (calls are counted per minute).
sub minute_guard
{
	$node->safe_psql('postgres',
		q{SELECT pg_sleep(CASE WHEN 60 - extract(second FROM clock_timestamp()) < 20 }
		  . q{THEN 60.5 - extract(second FROM clock_timestamp()) ELSE 0 END)});
	return;
}

# 1. A flood of unknown and malformed tokens, each call from an address of
#    its own, in one statement (one minute): one counter per code.
minute_guard();
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FILTER (WHERE (apikey.check(tok('deleted'), NULL, ('10.0.' || g / 256 || '.' || g % 256)::inet)).code = 'unknown')
       || ' ' ||
       count(*) FILTER (WHERE (apikey.check('ak_garbage', NULL, ('10.1.' || g / 256 || '.' || g % 256)::inet)).code = 'malformed')
  FROM generate_series(1, 1000) g}),
	'1000 1000', '1000 unknown and 1000 malformed tokens from 2000 addresses answered');
is($node->safe_psql('postgres', $stats), '2 0',
	'they take two counters (one per code), nothing dropped');
is($node->safe_psql('postgres', 'SELECT apikey.flush_usage()'), '2', 'flushed as two rows');
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(code || ':' || calls || ':' || (client_addr IS NULL), ' ' ORDER BY code)
  FROM apikey.usage_log}),
	'malformed:1000:true unknown:1000:true',
	'usage_log: every call counted, no address');

# 2. One key's failures from 1000 addresses: 16 address counters, one
#    without an address, and every call in usage_log.
minute_guard();
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FILTER (WHERE NOT apikey.verify(tok('gone'), NULL, ('10.2.' || g / 256 || '.' || g % 256)::inet))
  FROM generate_series(1, 1000) g}),
	'1000', 'a revoked key refused from 1000 addresses');
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FILTER (WHERE client_addr IS NOT NULL) || ' ' || count(*) FILTER (WHERE client_addr IS NULL)
       || ' ' || sum(calls)
  FROM apikey.live_usage WHERE key_id = kid('gone')}),
	'16 1 1000', 'in shared memory: 16 addresses and one counter without');
is($node->safe_psql('postgres', 'SELECT entries_dropped FROM apikey.stats'), '0', 'nothing dropped');
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
is( $node->safe_psql(
		'postgres', q{
SELECT count(DISTINCT client_addr) || ' ' || sum(calls) FILTER (WHERE client_addr IS NULL) || ' ' || sum(calls)
  FROM apikey.usage_log WHERE key_id = kid('gone')}),
	'16 984 1000', 'usage_log: 16 addresses, 984 calls without one, 1000 in all');

# The same key and minute again after the flush: the 16 addresses still
# have their places, a new one does not get in.
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FILTER (WHERE NOT apikey.verify(tok('gone'), NULL, a))
  FROM (SELECT DISTINCT client_addr AS a FROM apikey.usage_log
         WHERE key_id = kid('gone') AND client_addr IS NOT NULL
        UNION ALL SELECT '10.3.0.1') s}),
	'17', 'the 16 recorded addresses and a new one, refused again');
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FILTER (WHERE client_addr IS NOT NULL) || ' ' || count(*) FILTER (WHERE client_addr IS NULL)
  FROM apikey.live_usage WHERE key_id = kid('gone')}),
	'16 1', 'their counters again, the new address counted without');
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');

# 3. The failures' half.  Ten keys failing from 20 addresses each want far
#    more than the 50 entries failures may hold: the rest is dropped, and
#    counted as dropped.
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
my $dropped0 = $node->safe_psql('postgres', 'SELECT entries_dropped FROM apikey.stats');
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FILTER (WHERE NOT apikey.verify(tok('bad' || k), NULL, ('10.4.' || k || '.' || a)::inet))
  FROM generate_series(1, 10) k, generate_series(1, 20) a}),
	'200', '200 refusals of 10 keys from 20 addresses each');
my ($pending, $dropped, $kept) = split / /,
  $node->safe_psql(
	'postgres', q{
SELECT s.entries_pending || ' ' || s.entries_dropped || ' '
       || (SELECT coalesce(sum(calls), 0) FROM apikey.live_usage WHERE code = 'revoked')
  FROM apikey.stats s});
note "failures: $pending counters hold $kept calls, "
  . ($dropped - $dropped0) . ' dropped';
cmp_ok($pending, '<=', 50, 'failures hold at most half of the 100 entries');
cmp_ok($dropped - $dropped0, '>', 0, 'the rest were dropped');
is($kept + $dropped - $dropped0, '200', 'and every refusal is either kept or counted as dropped');

# Valid calls are still counted, exactly: 30 keys, 3 calls each.
$node->safe_psql(
	'postgres', q{
INSERT INTO tok SELECT 'valid' || g, key_id, token
  FROM generate_series(1, 30) g, LATERAL apikey.issue(owner => 'acme', name => 'valid' || g);
});
minute_guard();
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FILTER (WHERE apikey.verify(tok('valid' || k)))
  FROM generate_series(1, 30) k, generate_series(1, 3) n}),
	'90', '90 valid calls of 30 keys with the failures\' half full');
is($node->safe_psql('postgres', 'SELECT entries_dropped FROM apikey.stats'),
	$dropped, 'none of them dropped');
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) || ' ' || sum(calls) FROM apikey.usage_log
 WHERE code = 'valid' AND key_id IN (SELECT key_id FROM tok WHERE name LIKE 'valid%')}),
	'30 90', 'usage_log: 90 valid calls, one row per key');
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FROM apikey.keys k JOIN tok t ON t.key_id = k.id
 WHERE t.name LIKE 'valid%' AND k.last_used_at IS NOT NULL}),
	'30', 'and last_used_at of all 30 keys');

ok(!$node->log_contains(qr/FATAL|PANIC|TRAP|ERROR:/), 'no error in the server log');

$node->stop;
done_testing();
