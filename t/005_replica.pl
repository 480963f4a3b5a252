# A streaming hot standby.  Keys verify there, authenticate() and the
# binding helpers work; a revocation on the primary reaches the standby's
# warm key cache through WAL replay; a key with a quota gets
# quota_unavailable (a debit is a write); rate limits are enforced in the
# standby's own shared memory; usage is counted in shared memory and shown
# by apikey.live_usage, never written; the usage writer does not run.  The
# audit chain verifies on the standby (read-only), which also sees a row
# edited on the primary behind the triggers' back.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $primary = apikey_node(
	'primary', q{
apikey.usage_flush_interval = '100ms'
apikey.usage_max_entries = 100
},
	allows_streaming => 1);
apikey_db($primary);
token_table($primary);
$primary->safe_psql(
	'postgres', q{
INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
INSERT INTO tok SELECT 'good', key_id, token FROM apikey.issue(owner => 'acme', scopes => '{orders:read}');
INSERT INTO tok SELECT 'rev', key_id, token FROM apikey.issue(owner => 'acme');
INSERT INTO tok SELECT 'quota', key_id, token FROM apikey.issue(owner => 'acme', quota => 5);
INSERT INTO tok SELECT 'limited', key_id, token FROM apikey.issue(owner => 'acme', rate_limit => 2, rate_window => '1 hour');
INSERT INTO tok SELECT 'standby', key_id, token FROM apikey.issue(owner => 'acme', scopes => '{orders:read}');
});

$primary->backup('bk');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby);

is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 't', 'standby is in recovery');
is($standby->safe_psql('postgres', 'SHOW shared_preload_libraries'), 'apikey',
	'standby preloads apikey too');

# Verification and the binding helpers.
is( $standby->safe_psql(
		'postgres', q{
SELECT valid || ' ' || code || ' ' || (key_id = kid('good')) || ' ' || owner || ' ' || array_to_string(scopes, ',')
  FROM apikey.check(tok('good'), 'orders:read')}),
	'true valid true acme orders:read', 'check() is valid on the standby');
is($standby->safe_psql('postgres', q{SELECT apikey.verify(tok('good'))}), 't', 'verify() too');
is( $standby->safe_psql(
		'postgres', q{
BEGIN;
SELECT apikey.authenticate(tok('good'), 'orders:read') = kid('good');
SELECT apikey.current_key_id() = kid('good'), apikey.current_owner(),
       apikey.has_scope('orders:read'), apikey.has_scope('orders:write');
SELECT apikey.require_scope('orders:read');
COMMIT;
SELECT apikey.current_key_id() IS NULL;
}),
	"t\nt|acme|t|f\n\nt",
	'authenticate(), current_key_id(), current_owner(), has_scope(), require_scope() on the standby');
my ($ret, $out, $err) = $standby->psql('postgres',
	q{SELECT apikey.authenticate(tok('good'), 'orders:write')});
like($err, qr/API key lacks scope "orders:write"/, 'authenticate() refuses a missing scope on the standby');

# Revocation: warm the standby's cache in a session that stays open,
# revoke on the primary, wait for replay: the same session sees revoked.
my $session = $standby->background_psql('postgres');
is($session->query_safe(q{SELECT code FROM apikey.check(tok('rev'))}), 'valid',
	'standby session: key valid (now cached)');
is($session->query_safe(q{SELECT code FROM apikey.check(tok('rev'))}), 'valid',
	'standby session: still valid from the cache');
$primary->safe_psql('postgres', q{SELECT apikey.revoke(kid('rev'))});
$primary->wait_for_catchup($standby);
is($session->query_safe(q{SELECT code FROM apikey.check(tok('rev'))}), 'revoked',
	'standby session: revoked after replay, despite its warm cache');
is($standby->safe_psql('postgres', q{SELECT code FROM apikey.check(tok('rev'))}), 'revoked',
	'a new standby session: revoked');
$session->quit;

# The audit chain, verified on the standby.
$primary->wait_for_catchup($standby);
is($standby->safe_psql('postgres', 'SELECT count(*) FROM apikey.audit_verify()'), '0',
	'the audit chain verifies on the standby');
is( $standby->safe_psql('postgres', 'SELECT seq || row_hash::text FROM apikey.audit_checkpoint()'),
	$primary->safe_psql('postgres', 'SELECT seq || row_hash::text FROM apikey.audit_checkpoint()'),
	'with the same checkpoint as the primary');
cmp_ok($standby->safe_psql('postgres', q{SELECT count(*) FROM apikey.audit_log WHERE action = 'revoke'}),
	'>=', 1, 'the revocation above is in it');
# An edit made on the primary with the guard triggers disabled (rolled
# back there afterwards: only the standby's check is of interest).
$primary->safe_psql(
	'postgres', q{
ALTER TABLE apikey.audit_log DISABLE TRIGGER USER;
UPDATE apikey.audit_log SET actor_claim = 'someone else' WHERE seq = 2;
ALTER TABLE apikey.audit_log ENABLE TRIGGER USER;
});
$primary->wait_for_catchup($standby);
is($standby->safe_psql('postgres', 'SELECT seq || problem FROM apikey.audit_verify()'),
	'2row_hash_mismatch', 'the standby finds a row edited on the primary');
$primary->safe_psql(
	'postgres', q{
ALTER TABLE apikey.audit_log DISABLE TRIGGER USER;
UPDATE apikey.audit_log SET actor_claim = NULL WHERE seq = 2;
ALTER TABLE apikey.audit_log ENABLE TRIGGER USER;
});
$primary->wait_for_catchup($standby);
is($standby->safe_psql('postgres', 'SELECT count(*) FROM apikey.audit_verify()'), '0',
	'and verifies again once the edit is undone');

# A quota cannot be debited on a standby.
is( $standby->safe_psql(
		'postgres',
		q{SELECT valid || ' ' || code || ' ' || (remaining IS NULL) FROM apikey.check(tok('quota'))}),
	'false quota_unavailable true', 'a quota key gets quota_unavailable on the standby');
($ret, $out, $err) = $standby->psql('postgres',
	q{\set VERBOSITY verbose
SELECT apikey.authenticate(tok('quota'))});
like($err, qr/ERROR:  25006: API key quota cannot be debited in a read-only transaction/,
	'authenticate() raises 25006 for it');
like($err, qr/DETAIL:  Verdict: quota_unavailable\./, 'with the verdict in DETAIL');
is($primary->safe_psql('postgres', q{SELECT remaining FROM apikey.quotas WHERE key_id = kid('quota')}),
	'5', 'the quota is untouched');

# Rate limits are enforced in the standby's shared memory.
is( $standby->safe_psql(
		'postgres', q{
SELECT string_agg(code, ' ' ORDER BY g)
  FROM (SELECT g, (apikey.check(tok('limited'))).code FROM generate_series(1, 3) g) c}),
	'valid valid rate_limited', 'rate limit enforced on the standby');

# Usage on the standby: counted in shared memory, visible in live_usage and
# key_usage, never written.
$standby->safe_psql(
	'postgres', q{
SELECT apikey.check(tok('standby')) FROM generate_series(1, 5);
SELECT apikey.check(tok('standby'), 'orders:write');
});
is( $standby->safe_psql(
		'postgres', q{
SELECT string_agg(code || ':' || calls, ' ' ORDER BY code)
  FROM (SELECT code, sum(calls) AS calls FROM apikey.live_usage WHERE key_id = kid('standby') GROUP BY code) s}),
	'scope_denied:1 valid:5', 'standby usage shows in apikey.live_usage');
is( $standby->safe_psql(
		'postgres', q{
SELECT sum(calls) || ' ' || sum(valid_calls) || ' ' || sum(failed_calls)
  FROM apikey.key_usage WHERE key_id = kid('standby')}),
	'6 5 1', 'and in apikey.key_usage');
is( $standby->safe_psql(
		'postgres', q{
SELECT shared_memory || ' ' || (entries_pending > 0) || ' ' || flushes || ' ' || (calls->>'valid')::int
  FROM apikey.stats}),
	# valid: good x3 (check, verify, authenticate), rev x2, limited x2, standby x5
	'true true 0 12', 'apikey.stats on the standby: pending, never flushed');
($ret, $out, $err) = $standby->psql('postgres', 'SELECT apikey.flush_usage()');
like($err, qr/cannot flush usage during recovery/, 'flush_usage() says why it cannot run on a standby');

# Nothing was written on either side.
$primary->safe_psql('postgres', 'SELECT apikey.flush_usage()');
$primary->wait_for_catchup($standby);
is($standby->safe_psql('postgres', q{SELECT count(*) FROM apikey.usage_log WHERE key_id = kid('standby')}),
	'0', 'standby usage is not in usage_log on the standby');
is($primary->safe_psql('postgres', q{SELECT count(*) FROM apikey.usage_log WHERE key_id = kid('standby')}),
	'0', 'nor on the primary');
is($standby->safe_psql('postgres', q{SELECT last_used_at IS NULL FROM apikey.keys WHERE id = kid('standby')}),
	't', 'last_used_at untouched by standby usage');

# The usage writer runs on the primary only.
ok( $primary->poll_query_until(
		'postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'apikey usage writer' AND datname = 'postgres'}),
	'usage writer runs on the primary');
is( $standby->safe_psql(
		'postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'apikey usage writer'}),
	'0', 'usage writer does not run on the standby');
ok(!$standby->log_contains(qr/apikey usage writer started/), 'and never started there');
ok(!$standby->log_contains(qr/cannot execute \w+ in a read-only transaction|usage flush failed|last_used_at update failed/),
	'no write was attempted on the standby');

# The rolling window.  Another database with 148 keys, and a key for
# postgres; the standby restarts so that its shared memory holds
# nothing else.
apikey_db($primary, 'side');
$primary->safe_psql(
	'side', q{
CREATE TABLE tok AS
SELECT g, key_id, token FROM generate_series(1, 148) g, LATERAL apikey.issue(owner => 'acme', name => 'side' || g);
});
$primary->safe_psql('postgres',
	q{INSERT INTO tok SELECT 'after', key_id, token FROM apikey.issue(owner => 'acme')});
$primary->wait_for_catchup($standby);
$standby->restart;

# 148 distinct keys in a table of 100 entries, one statement each (so each
# is newer than the last).  A full table evicts its oldest sixteenth.
$standby->safe_psql('side',
	join '', map { "SELECT apikey.verify(token) FROM tok WHERE g = $_;\n" } 1 .. 148);
is( $standby->safe_psql(
		'side', q{
SELECT s.entries_pending || ' ' || s.entries_dropped || ' ' || (s.calls->>'valid')
  FROM apikey.stats s}),
	'100 0 148', 'standby: 148 keys counted, the 100 entries full, none dropped');
is( $standby->safe_psql(
		'side', q{
SELECT string_agg(t.g::text, ' ' ORDER BY t.g)
  FROM apikey.live_usage u JOIN tok t USING (key_id) WHERE t.g IN (1, 2, 147, 148)}),
	'147 148', 'the window keeps the newest keys; the oldest made room');
# The keys still counted are the newest ones without a gap: the backend's
# counts entered the shared table oldest first, whatever their hash order.
is( $standby->safe_psql(
		'side', q{
SELECT max(t.g) = 148 AND count(*) = 148 - min(t.g) + 1 AND count(*) >= 90
  FROM apikey.live_usage u JOIN tok t USING (key_id)}),
	't', 'the keys kept are the newest, without a gap');

# Promotion: each database's usage writer starts, and side's writes what
# the standby counted there (what is left of its rolling window), which
# makes room for postgres's counts.
$standby->promote;
ok($standby->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()'), 'standby promoted');
ok( $standby->poll_query_until(
		'postgres',
		q{SELECT count(*) = 2 FROM pg_stat_activity WHERE backend_type = 'apikey usage writer'
		   AND datname IN ('postgres', 'side')}),
	'the usage writers run on the promoted server');
ok($standby->poll_query_until('side', 'SELECT count(*) = 0 FROM apikey.live_usage'),
	'side\'s writer wrote what the standby counted');
is($standby->safe_psql('side', q{SELECT sum(calls) >= 90 FROM apikey.usage_log}), 't',
	'(the newest keys of its window)');
$standby->safe_psql('postgres', q{SELECT apikey.check(tok('after')) FROM generate_series(1, 3)});
$standby->safe_psql('postgres', 'SELECT apikey.flush_usage()');
is( $standby->safe_psql(
		'postgres', q{SELECT coalesce(sum(calls), 0) FROM apikey.usage_log WHERE key_id = kid('after')}),
	'3', 'after promotion, calls in postgres are counted and flushed');
is($standby->safe_psql('postgres', 'SELECT entries_dropped FROM apikey.stats'), '0',
	'none dropped');

$standby->stop;
$primary->stop;
done_testing();
