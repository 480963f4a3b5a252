# Logical replication: a revocation (or a scope change) published by one
# server and applied by another's apply worker evicts that key from the
# subscriber's warm key caches.  The apply worker runs with
# session_replication_role = replica, which skips ordinary triggers: before
# 1.2 the invalidation triggers were ordinary, and a replicated revocation
# left the key valid in every subscriber backend that had it cached.  The
# apply worker fires row triggers only; the row triggers that record
# changed keys fire always, so the apply worker's commit evicts the keys it
# changed, and no other.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $pub = apikey_node('publisher', '', allows_streaming => 'logical');
my $sub = apikey_node('subscriber');

apikey_db($pub);
token_table($pub);
$pub->safe_psql(
	'postgres', q{
INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
INSERT INTO tok SELECT 'rev', key_id, token FROM apikey.issue(owner => 'acme', scopes => '{orders:read}');
INSERT INTO tok SELECT 'scp', key_id, token FROM apikey.issue(owner => 'acme', scopes => '{orders:read}');
INSERT INTO tok SELECT 'oth', key_id, token FROM apikey.issue(owner => 'acme', scopes => '{orders:read}');
CREATE PUBLICATION keys FOR TABLE apikey.scopes, apikey.keys, apikey.key_scopes, apikey.revocations, tok;
});

my $connstr = $pub->connstr . ' dbname=postgres';
apikey_db($sub);
token_table($sub);
$sub->safe_psql(
	'postgres', qq{
CREATE SUBSCRIPTION keys CONNECTION '$connstr' PUBLICATION keys;
});
$sub->wait_for_subscription_sync($pub, 'keys');

is( $sub->safe_psql('postgres', q{
SELECT (SELECT string_agg(tgname || '=' || tgenabled::text, ' ' ORDER BY tgname) FROM pg_trigger WHERE tgname LIKE 'revocations\_%' AND tgname NOT LIKE '%\_audit\_%' AND tgname NOT LIKE '%\_event') || ' ' ||
       (SELECT string_agg(tgname || '=' || tgenabled::text, ' ' ORDER BY tgname) FROM pg_trigger WHERE tgname LIKE 'key\_scopes\_%' AND tgname NOT LIKE '%\_audit\_%')}),
	'revocations_changed=A revocations_invalidate=A revocations_redact=A key_scopes_changed=A key_scopes_invalidate=A',
	'the invalidation triggers fire in replica mode too');

# Warm a subscriber session's cache.
my $session = $sub->background_psql('postgres');
is($session->query_safe(q{SELECT code FROM apikey.check(tok('rev'))}), 'valid',
	'subscriber: key valid (now cached)');
is($session->query_safe(q{SELECT code FROM apikey.check(tok('scp'), 'orders:write')}), 'scope_denied',
	'subscriber: scope not granted (key cached)');
is($session->query_safe(q{SELECT hits FROM apikey.cache_stats()}), '0', 'no hit yet');
is($session->query_safe(q{SELECT code FROM apikey.check(tok('rev'))}), 'valid',
	'subscriber: still valid, from the cache');
is($session->query_safe(q{SELECT hits FROM apikey.cache_stats()}), '1', 'that was a cache hit');
is($session->query_safe(q{SELECT code FROM apikey.check(tok('oth'))}), 'valid',
	'subscriber: a third key valid (now cached)');

# Revoke and grant on the publisher; the apply worker applies both.
$pub->safe_psql('postgres', q{
SELECT apikey.revoke((SELECT key_id FROM tok WHERE name = 'rev'), 'leaked');
INSERT INTO apikey.key_scopes (key_id, scope) SELECT key_id, 'orders:write' FROM tok WHERE name = 'scp';
});
$pub->wait_for_catchup('keys');

is($session->query_safe(q{SELECT code FROM apikey.check(tok('rev'))}), 'revoked',
	'subscriber session: revoked once applied, despite its warm cache');
is($session->query_safe(q{SELECT code FROM apikey.check(tok('scp'), 'orders:write')}), 'valid',
	'subscriber session: the replicated grant is seen');
is( $session->query_safe(q{
SELECT (SELECT hits FROM apikey.cache_stats()) || ' ' || (SELECT code FROM apikey.check(tok('oth'))) || ' ' ||
       (SELECT hits || ' ' || invalidations FROM apikey.cache_stats())}),
	'1 valid 2 0', 'subscriber session: the untouched key is still cached; nothing was emptied');
$session->quit;

$sub->stop;
$pub->stop;
done_testing();
