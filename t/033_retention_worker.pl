# The usage writer runs apikey.run_retention() every
# apikey.retention_interval: old minute rows are rolled up and deleted,
# failure addresses older than apikey.address_retention erased, without
# anyone calling it.  It finds the function through the extension's schema
# and skips, quietly, a database whose apikey predates it (1.1).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = apikey_node('retention',
	"apikey.usage_flush_interval = '100ms'\napikey.retention_interval = '1s'\n");

# apikey 1.1 has no run_retention(): the writer leaves it alone.
$node->safe_psql('postgres', q{CREATE EXTENSION apikey VERSION '1.1'});
my $log_offset = -s $node->logfile;
sleep(3);
unlike(slurp_file($node->logfile, $log_offset),
	qr/run_retention|ERROR/, 'apikey 1.1: no retention run, no error');

$node->safe_psql('postgres', 'ALTER EXTENSION apikey UPDATE');
token_table($node);
$node->safe_psql(
	'postgres', q{
INSERT INTO tok SELECT 'k', key_id, token FROM apikey.issue('acme');
INSERT INTO apikey.usage_log (key_id, bucket, code, client_addr, calls) VALUES
	(kid('k'), date_trunc('minute', now() - '8 days'::interval), 'valid', NULL, 5),
	(kid('k'), date_trunc('minute', now() - '8 days'::interval), 'address_denied', '192.0.2.7', 2),
	(kid('k'), date_trunc('minute', now() - '2 hours'::interval), 'address_denied', '192.0.2.7', 4);
SELECT apikey.check(tok('k')) FROM generate_series(1, 3);
});

# Within a few intervals: everything but the last two minutes (the
# writer's) rolled up, the 8-day-old rows gone.
ok( $node->poll_query_until(
		'postgres', q{
SELECT (SELECT sum(calls) FROM apikey.usage_hourly) = 11
   AND (SELECT sum(calls) FROM apikey.usage_daily) = 11
   AND (SELECT sum(calls) FROM apikey.usage_log WHERE code = 'valid') = 3
   AND NOT EXISTS (SELECT FROM apikey.usage_log WHERE bucket < now() - '7 days'::interval)}),
	'writer rolled up every call and deleted rows past usage_retention');
is( $node->safe_psql(
		'postgres', q{
SELECT sum(calls), sum(rolled_up), count(*) FILTER (WHERE client_addr IS NOT NULL)
  FROM apikey.usage_log}),
	'7|4|1',
	'recent rows kept and rolled up (not this minute\'s yet), the recent address kept');
is($node->safe_psql('postgres', q{SELECT sum(calls) FROM apikey.hourly_usage}),
	'14', 'hourly_usage counts every call meanwhile');
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(client_addr::text || '=' || calls, ',') FROM apikey.usage_address_hourly}),
	'192.0.2.7/32=4',
	'only the address within address_retention is rolled up');
is( $node->safe_psql(
		'postgres', q{
SELECT (SELECT string_agg(network::text || '=' || key_id || '=' || calls, ',') FROM apikey.usage_network_window)
	   || ' ' || (SELECT string_agg(network::text || '=' || failed_calls || '=' || keys, ',') FROM apikey.top_failing_networks)}),
	'192.0.2.7/32=' . $node->safe_psql('postgres', q{SELECT kid('k')}) . '=4 192.0.2.7/32=4=1',
	'the network window holds the 24 hours\' address rollups; top_failing_networks reads it');
ok( $node->safe_psql(
		'postgres',
		q{SELECT count(*) > 0 FROM apikey.audit_log WHERE action = 'run_retention' AND actor_role IS NOT NULL}
	),
	'the writer\'s runs are audited');

# A backlog bigger than a batch (10,000 rows): one batch per round until
# done, with flushes in between.
$node->safe_psql(
	'postgres', q{
INSERT INTO apikey.usage_log (key_id, bucket, code, calls)
SELECT 1000000 + g, date_trunc('minute', now() - '3 hours'::interval), 'unknown', 1
  FROM generate_series(1, 25000) g;
});
ok( $node->poll_query_until(
		'postgres', q{
SELECT NOT EXISTS (SELECT FROM apikey.usage_log
					WHERE calls > rolled_up AND bucket < now() - '5 minutes'::interval)}),
	'a backlog of 25,000 rows is rolled up');
is( $node->safe_psql(
		'postgres', q{
SELECT (SELECT sum(calls) FROM apikey.usage_hourly WHERE key_id > 1000000),
	   (SELECT count(*) > 0 FROM apikey.audit_log
		 WHERE action = 'run_retention' AND (details->>'more')::boolean)}),
	'25000|t', 'in batches (more = true), every call once');
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');

# address_retention lowered (reload): the recent address goes too.
$node->append_conf('postgresql.conf', "apikey.address_retention = '1h'\n");
$node->reload;
ok( $node->poll_query_until(
		'postgres', q{
SELECT NOT EXISTS (SELECT FROM apikey.usage_log WHERE client_addr IS NOT NULL)
   AND NOT EXISTS (SELECT FROM apikey.usage_address_hourly)
   AND NOT EXISTS (SELECT FROM apikey.usage_network_window)
   AND NOT EXISTS (SELECT FROM apikey.top_failing_networks)}),
	'addresses older than a lowered address_retention are erased, from the network window too');
is( $node->safe_psql(
		'postgres', q{SELECT sum(calls) FROM apikey.hourly_usage WHERE key_id < 1000000}),
	'14', 'erasing addresses changed no count');

$node->stop;
done_testing();
