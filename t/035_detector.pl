# The detector end to end on a preloaded cluster.  An attack (a pgbench
# flood of unknown tokens from one network through a trusted proxy, and
# psql loops) trips each default rule this version implements once:
# address_failures, failure_spike, allowlist_violation, dormant_use,
# revoked_use, canary_use.  Several passes later there is exactly one open
# finding per rule, and none for a key with a steady normal workload
# (false-positive test).  Then the background worker's periodic pass
# (apikey.detect_interval) files a new canary use with nobody calling
# run_detection(), and uses of many canaries bring that pass forward
# (src/canary.c keeps room for 128).  On a standby a canary use is logged.
#
# Tokens stay in a table on the server: no token appears in a script.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use ApikeyTest;

# the failure limiter on (the default 30 a minute), the periodic pass off
# until the last part
my $node = apikey_node(
	'detector', qq{
apikey.failure_limit = 30
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
-- issued 200 days ago and never used since (as if)
UPDATE apikey.keys SET created_at = now() - interval '200 days' WHERE id = kid('sleeper');
SELECT apikey.report_leak(tok('leaked'), 'ci log');
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
});
is($node->safe_psql('postgres', $steady_sql, extra_params => [ '-U', 'gateway' ]),
	'200', 'steady key: 200 more valid calls during the attack');

# Several passes: each rule opens one finding, once.
my $opened = $node->safe_psql('postgres',
	'SELECT apikey.run_detection() + apikey.run_detection() + apikey.run_detection()');
is($opened, '6', 'three passes opened six findings');
my $open_by_rule = q{
SELECT string_agg(rule || '=' || n, ' ' ORDER BY rule) FROM (
	SELECT rule, count(*) AS n FROM apikey.findings WHERE resolved_at IS NULL GROUP BY rule) s};
is( $node->safe_psql('postgres', $open_by_rule),
	'address_failures=1 allowlist_violation=1 canary_use=1 dormant_use=1 failure_spike=1 revoked_use=1',
	'exactly one open finding per rule');
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(f.rule || ':' || coalesce(t.name, host(f.network)), ' ' ORDER BY f.rule)
  FROM apikey.findings f LEFT JOIN tok t ON t.key_id = f.key_id}),
	'address_failures:100.64.0.7 allowlist_violation:fenced canary_use:canary dormant_use:sleeper failure_spike:spiky revoked_use:leaked',
	'each for the right subject');
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
	   (SELECT count(*) FROM apikey.findings WHERE key_id = kid('steady') OR network = '100.64.0.9/32')}),
	'0 0', 'no finding for the steady key or its network');

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
	'address_failures=1 allowlist_violation=1 canary_use=2 dormant_use=1 failure_spike=1 revoked_use=1',
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
