# The detector end to end on a preloaded cluster.  An attack (a pgbench
# flood of unknown tokens from one network through a trusted proxy, and
# psql loops) trips each of the nine default rules once:
# address_failures, failure_spike, allowlist_violation, dormant_use,
# revoked_use, canary_use, and the network rules shared_address (one client
# network using five keys), new_networks (a key with history succeeding
# from a network it never used) and volume_spike (a key far above its
# baseline for 3 minutes).  Several passes later there is exactly one open
# finding per rule, each announced by one finding.opened event that a
# LISTENing session hears, and none for a key with a steady normal
# workload, history and baseline (false-positive test).  Then the
# background worker's periodic pass (apikey.detect_interval) files a new
# canary use with nobody calling run_detection(), and uses of many
# canaries bring that pass forward (src/canary.c keeps room for 128).  On a
# standby a canary use is logged.
#
# Tokens stay in a table on the server: no token appears in a script.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

use ApikeyTest;

# the failure limiter on (30 failures, here per hour: with the default
# minute one failure comes back every 2 s, and a slow machine could see the
# flooding network unblocked), the periodic pass off until the last part
my $node = apikey_node(
	'detector', qq{
apikey.failure_limit = 30
apikey.failure_window = '1h'
apikey.detect_interval = 0
}, allows_streaming => 1);
apikey_db($node);
token_table($node);
$node->safe_psql(
	'postgres', q{
INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
INSERT INTO tok SELECT 'steady', key_id, token FROM apikey.issue('umbrella', '{orders:read}');
INSERT INTO tok SELECT 'spiky', key_id, token FROM apikey.issue('acme', '{orders:read}');
INSERT INTO tok SELECT 'fenced', key_id, token FROM apikey.issue('acme', allowed_cidrs => '{10.0.0.0/8}');
INSERT INTO tok SELECT 'sleeper', key_id, token FROM apikey.issue('initech');
INSERT INTO tok SELECT 'leaked', key_id, token FROM apikey.issue('hooli');
INSERT INTO tok SELECT 'canary', key_id, token FROM apikey.issue_canary('acme', 'planted in the wiki');
INSERT INTO tok SELECT 'unknown', NULL, token FROM apikey._new_token('ak');
INSERT INTO tok SELECT 'roaming', key_id, token FROM apikey.issue('globex', '{orders:read}');
INSERT INTO tok SELECT 'burst', key_id, token FROM apikey.issue('globex', '{orders:read}');
INSERT INTO tok SELECT 'pool' || g, key_id, token
  FROM generate_series(1, 5) g, LATERAL apikey.issue('tenant' || g, '{orders:read}');
-- issued 200 days ago and never used since (as if)
UPDATE apikey.keys SET created_at = now() - interval '200 days' WHERE id = kid('sleeper');
SELECT apikey.report_leak(tok('leaked'), 'ci log');
-- History the test cannot wait for, written as the usage writer would
-- have: the steady key made 200 calls a minute, the burst key 5, for 1000
-- minutes two days ago (keys issued 60 days ago), and the baselines learnt
-- from it (p99 200 and 5: volume_spike's limits are 2000 and 100 a minute).
UPDATE apikey.keys SET created_at = now() - interval '60 days'
 WHERE id IN (kid('steady'), kid('roaming'), kid('burst'));
INSERT INTO apikey.usage_log (key_id, bucket, code, calls)
SELECT kid(v.n), date_trunc('minute', now() - interval '2 days') - g * interval '1 minute', 'valid', v.c
  FROM (VALUES ('steady', 200), ('burst', 5)) v(n, c), generate_series(1, 1000) g;
SELECT apikey.compute_baselines();
CREATE ROLE gateway LOGIN;
GRANT apikey_proxy TO gateway;
GRANT SELECT ON tok TO gateway;
GRANT EXECUTE ON FUNCTION tok(text) TO gateway;
});

# The normal workload, before, during and after the attack: the steady key
# succeeds from its own network behind the same proxy.
my $steady_sql = q{
SELECT count(*) FILTER (WHERE (apikey.check(tok('steady'), 'orders:read', '100.64.0.9')).code = 'valid')
  FROM generate_series(1, 200)};
is($node->safe_psql('postgres', $steady_sql, extra_params => [ '-U', 'gateway' ]),
	'200', 'steady key: 200 valid calls');
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(key_id || ':' || p99, ' ' ORDER BY key_id) FROM apikey.key_baselines
 WHERE key_id IN (kid('steady'), kid('burst'))}),
	$node->safe_psql('postgres', q{SELECT kid('steady') || ':200 ' || kid('burst') || ':5'}),
	'baselines: steady 200 a minute, burst 5');

# The roaming key's usual network, behind the proxy.  new_networks needs a
# key with history (a network first seen before its window): the networks
# the writer recorded for it and for the steady key are backdated 60 days,
# as the test's setup (the writer only ever records now).
is( $node->safe_psql(
		'postgres',
		q{SELECT count(*) FILTER (WHERE (apikey.check(tok('roaming'), 'orders:read', '198.51.100.20')).code = 'valid')
		    FROM generate_series(1, 5)},
		extra_params => [ '-U', 'gateway' ]),
	'5', 'roaming key: 5 valid calls from its usual network');
$node->safe_psql(
	'postgres', q{
SELECT apikey.flush_usage();
UPDATE apikey.key_networks SET first_seen = now() - interval '60 days'
 WHERE key_id IN (kid('steady'), kid('roaming'));
});
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(t.name || ':' || n.network, ' ' ORDER BY t.name)
  FROM apikey.key_networks n JOIN tok t ON t.key_id = n.key_id}),
	'roaming:198.51.100.0/24 steady:100.64.0.0/24',
	'the writer recorded their networks (/24)');

# The attack.  A flood of unknown tokens from one network: the failure
# limiter blocks it after 30; the detector counts both.
$node->pgbench(
	'-n -c 2 -j 2 -t 75 -U gateway',
	0,
	[qr/number of transactions actually processed: 150\/150/],
	[qr/^$/],
	'pgbench: 150 unknown tokens from one network',
	{ 'flood.sql' => q{SELECT apikey.check(tok('unknown'), NULL, '100.64.0.7');} });
is( $node->safe_psql(
		'postgres',
		q{SELECT (apikey.check(tok('unknown'), NULL, '100.64.0.7')).code || ' ' ||
				 (apikey.check(tok('steady'), 'orders:read', '100.64.0.9')).code},
		extra_params => [ '-U', 'gateway' ]),
	'address_blocked valid',
	'the flooding network is blocked, the steady key\'s is not');
# A stolen key tried for a scope it lacks, from outside its allowlist, a
# dormant key woken up, a leaked key tried, and the canary used (in a
# transaction that rolls back).
$node->safe_psql(
	'postgres', q{
SELECT count(*) FROM generate_series(1, 30) WHERE (apikey.check(tok('spiky'), 'orders:write')).code = 'scope_denied';
SELECT count(*) FROM generate_series(1, 3) WHERE (apikey.check(tok('fenced'), NULL, '203.0.113.50')).code = 'address_denied';
SELECT apikey.check(tok('sleeper'));
SELECT count(*) FROM generate_series(1, 3) WHERE (apikey.check(tok('leaked'))).code = 'revoked';
BEGIN;
SELECT apikey.check(tok('canary'), 'orders:write');
ROLLBACK;
-- The burst key's spike, written as the usage writer would have (the
-- test cannot wait 3 minutes): 250 calls a minute, 4 to 2 minutes ago,
-- over its limit of max(10 x 5, 100) = 100.
INSERT INTO apikey.usage_log (key_id, bucket, code, calls)
SELECT kid('burst'), date_trunc('minute', now()) - g * interval '1 minute', 'valid', 250
  FROM generate_series(2, 4) g;
});
# Through the proxy: the roaming key (stolen) succeeds from a network it
# never used, and one client network succeeds with five different keys.
is( $node->safe_psql(
		'postgres', q{
SELECT (apikey.check(tok('roaming'), 'orders:read', '198.18.0.77')).code || ' ' ||
	   (SELECT count(*) FROM generate_series(1, 5) g
		 WHERE (apikey.check(tok('pool' || g), 'orders:read', '192.0.2.66')).code = 'valid')},
		extra_params => [ '-U', 'gateway' ]),
	'valid 5', 'a new network for the roaming key, five keys from one client');
is($node->safe_psql('postgres', $steady_sql, extra_params => [ '-U', 'gateway' ]),
	'200', 'steady key: 200 more valid calls during the attack');

# A session LISTENing on apikey_events, told of every event from here on.
my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN apikey_events');
my $seq_before = $node->safe_psql('postgres', 'SELECT coalesce(max(seq), 0) FROM apikey.events');

# Every notification payload the listener has received since it last
# asked; waits up to $secs for at least $want of them.
sub notifications
{
	my ($want, $secs) = @_;
	my @got;
	for (my $i = 0; $i < $secs * 10; $i++)
	{
		my $out = $listener->query_safe('SELECT 1');
		push @got, $out =~ /Asynchronous notification "apikey_events" with payload "(\d+)"/g;
		last if @got >= $want;
		usleep(100_000);
	}
	return @got;
}

# Several passes: each rule opens one finding, once.
my $opened = $node->safe_psql('postgres',
	'SELECT apikey.run_detection() + apikey.run_detection() + apikey.run_detection()');
is($opened, '9', 'three passes opened nine findings');
my $open_by_rule = q{
SELECT string_agg(rule || '=' || n, ' ' ORDER BY rule) FROM (
	SELECT rule, count(*) AS n FROM apikey.findings WHERE resolved_at IS NULL GROUP BY rule) s};
is( $node->safe_psql('postgres', $open_by_rule),
	'address_failures=1 allowlist_violation=1 canary_use=1 dormant_use=1 failure_spike=1 '
	  . 'new_networks=1 revoked_use=1 shared_address=1 volume_spike=1',
	'exactly one open finding per rule');
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(f.rule || ':' || coalesce(t.name, host(f.network)), ' ' ORDER BY f.rule)
  FROM apikey.findings f LEFT JOIN tok t ON t.key_id = f.key_id}),
	'address_failures:100.64.0.7 allowlist_violation:fenced canary_use:canary dormant_use:sleeper failure_spike:spiky '
	  . 'new_networks:roaming revoked_use:leaked shared_address:192.0.2.0 volume_spike:burst',
	'each for the right subject');
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(rule || ' ' || coalesce(network::text, '-') || ' ' || e, ', ' ORDER BY rule)
  FROM (SELECT rule, network, CASE rule
			WHEN 'shared_address' THEN concat_ws(' ', evidence->'keys', evidence->'owners', evidence->'calls')
			WHEN 'new_networks' THEN concat_ws(' ', evidence->'known_networks', evidence->'calls')
			WHEN 'volume_spike' THEN concat_ws(' ', evidence->'minutes', evidence->'peak_calls', evidence->'limit', evidence->'p99')
		END AS e
		  FROM apikey.findings WHERE rule IN ('shared_address', 'new_networks', 'volume_spike')) s}),
	'new_networks 198.18.0.0/24 1 1, shared_address 192.0.2.0/24 5 5 5, volume_spike - 3 250 100 5',
	'the network rules\' evidence: 1 known network and 1 call from the new one; 5 keys of 5 owners; 3 minutes at 250 over 100');

# One finding.opened event per finding, in the pass's transaction, and the
# listener heard each of them.
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) || ' ' || count(*) FILTER (WHERE n = 1) FROM (
	SELECT (SELECT count(*) FROM apikey.events e
			 WHERE e.kind = 'finding.opened' AND (e.payload->>'finding_id')::bigint = f.id
			   AND e.payload->>'rule' = f.rule) AS n
	  FROM apikey.findings f) s}),
	'9 9', 'each finding has exactly one finding.opened event');
my @events = split /\n/, $node->safe_psql('postgres',
	"SELECT seq FROM apikey.events WHERE seq > $seq_before ORDER BY seq");
is( $node->safe_psql('postgres',
		"SELECT string_agg(DISTINCT kind, ' ') || ' ' || count(*) FROM apikey.events WHERE seq > $seq_before"),
	'finding.opened 9', 'the passes wrote nine events, all finding.opened');
is_deeply([ sort { $a <=> $b } notifications(9, 10) ],
	\@events, 'the LISTENing session got the seq of each at commit');
$listener->quit;
is( $node->safe_psql(
		'postgres', q{
SELECT (evidence->>'failures')::int >= 150 FROM apikey.findings WHERE rule = 'address_failures'}),
	't', 'address_failures counted the blocked calls too');
is( $node->safe_psql(
		'postgres', q{
SELECT severity || ' ' || (evidence->>'calls') || ' ' || (evidence->'scopes')::text
  FROM apikey.findings WHERE rule = 'canary_use'}),
	'critical 1 ["orders:write"]',
	'the rolled-back canary use is a critical finding naming the scope asked for');

# False-positive test: nothing about the steady key, and more of its
# traffic opens nothing.
is($node->safe_psql('postgres', $steady_sql, extra_params => [ '-U', 'gateway' ]),
	'200', 'steady key: 200 more valid calls');
is( $node->safe_psql(
		'postgres', q{
SELECT apikey.run_detection() || ' ' ||
	   (SELECT count(*) FROM apikey.findings WHERE key_id = kid('steady') OR network >>= '100.64.0.9'::inet)}),
	'0 0', 'no finding for the steady key, its address or its network');

# The worker's periodic pass, nobody calling run_detection(): the canary
# used again, from another network.
$node->append_conf('postgresql.conf', "apikey.detect_interval = '1s'\n");
$node->reload;
$node->safe_psql('postgres', q{SELECT apikey.check(tok('canary'), 'orders:read', '198.51.100.44')},
	extra_params => [ '-U', 'gateway' ]);
ok( $node->poll_query_until(
		'postgres', q{
SELECT count(*) = 1 FROM apikey.findings WHERE rule = 'canary_use' AND network = '198.51.100.44/32'}),
	'the worker\'s pass filed the new canary use');
# several periodic passes later, still one open finding per rule and subject
sleep(3);
is( $node->safe_psql('postgres', $open_by_rule),
	'address_failures=1 allowlist_violation=1 canary_use=2 dormant_use=1 failure_spike=1 '
	  . 'new_networks=1 revoked_use=1 shared_address=1 volume_spike=1',
	'periodic passes open nothing twice');
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FROM apikey.audit_log WHERE action = 'run_detection'}),
	'4', 'the periodic passes are not audit rows (the four on-demand ones are)');
ok(!$node->log_contains(qr/apikey detector: rule \w+ failed/), 'no rule failed');

# Canary uses nearly filling their table bring the worker's pass forward:
# with an hour between passes, 100 canaries used once each (three
# quarters of the 128 slots) are filed within seconds.
$node->append_conf('postgresql.conf', "apikey.detect_interval = '1h'\n");
$node->reload;
$node->safe_psql(
	'postgres', q{
INSERT INTO tok SELECT 'many' || i, c.key_id, c.token
  FROM generate_series(1, 100) i, apikey.issue_canary('acme', 'many ' || i) c;
SELECT count(*) FROM tok WHERE name LIKE 'many%' AND (apikey.check(token)).code = 'unknown';});
ok( $node->poll_query_until(
		'postgres', q{
SELECT count(*) = 100 FROM apikey.findings f JOIN tok t ON t.key_id = f.key_id
 WHERE f.rule = 'canary_use' AND t.name LIKE 'many%'}),
	'uses nearly filling the canary table bring the pass forward');

# On a standby no pass can file a use: it answers unknown all the same,
# and the use goes to the server log (never the token).
$node->backup('b');
my $standby = PostgreSQL::Test::Cluster->new('detector_standby');
$standby->init_from_backup($node, 'b', has_streaming => 1);
$standby->start;
$node->wait_for_catchup($standby);
is($standby->safe_psql('postgres', q{SELECT code FROM apikey.check(tok('canary'), 'orders:read')}),
	'unknown', 'a canary on a standby answers unknown');
my $canary_id = $node->safe_psql('postgres', q{SELECT kid('canary')});
ok( $standby->wait_for_log(qr/apikey canary key $canary_id was used from a local socket \(on a standby/),
	'the standby logged the canary use');
my $canary_tail = substr($node->safe_psql('postgres', q{SELECT substr(tok('canary'), 4, 20)}), 0, 20);
ok(!$standby->log_contains(qr/\Q$canary_tail\E/), 'without the token');

$standby->stop;
$node->stop;
done_testing();
