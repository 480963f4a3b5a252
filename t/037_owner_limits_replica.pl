# Limits per owner on a hot standby.  The owner's limits are cached with
# the key; a change to apikey.owners replays as an invalidation that
# empties the standby's key caches, so a session that has the key cached
# sees the new limits right after replay: an owner's allowlist, then its
# rate limit (enforced in the standby's own shared memory, limited_by
# owner), then its quota, which a standby cannot debit (quota_unavailable,
# failing closed).  Nothing is written on the standby.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use ApikeyTest;

my $primary = apikey_node('primary', '', allows_streaming => 1);
apikey_db($primary);
token_table($primary);
$primary->safe_psql(
	'postgres', q{
INSERT INTO tok SELECT n, key_id, token
  FROM unnest('{k1,k2}'::text[]) n, LATERAL apikey.issue(owner => 'acme', name => n);
});

$primary->backup('bk');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby);

my $session = $standby->background_psql('postgres');
my $from = sub {
	my ($key, $addr) = @_;
	return $session->query_safe(
		qq{SELECT code || '/' || coalesce(limited_by, '-') FROM apikey.check(tok('$key'), NULL, '$addr')});
};
is($from->('k1', '192.0.2.1'), 'valid/-', 'standby session: key valid without owner limits (now cached)');
is( $session->query_safe(q{SELECT misses FROM apikey.cache_stats()}),
	'1', 'one table read so far');

$primary->safe_psql('postgres',
	q{SELECT apikey.set_owner_limits('acme', allowed_cidrs => '{10.0.0.0/8}')});
$primary->wait_for_catchup($standby);
is($from->('k1', '192.0.2.1'), 'address_denied/-', 'the owner\'s allowlist applies after replay, despite the warm cache');
is($from->('k1', '10.1.2.3'), 'valid/-', 'and admits its network');

$primary->safe_psql('postgres',
	q{SELECT apikey.set_owner_limits('acme', rate_limit => 2, rate_window => '1 hour')});
$primary->wait_for_catchup($standby);
is( join(' ', map { $from->($_, '192.0.2.1') } qw(k1 k2 k1)),
	'valid/owner valid/owner rate_limited/owner',
	'the owner\'s rate limit is shared by its keys on the standby');

$primary->safe_psql('postgres', q{SELECT apikey.set_owner_limits('acme', quota => 5)});
$primary->wait_for_catchup($standby);
is($from->('k2', '192.0.2.1'), 'quota_unavailable/owner',
	'an owner\'s quota cannot be debited on a standby: refused');

$primary->safe_psql('postgres', q{SELECT apikey.set_owner_limits('acme')});
$primary->wait_for_catchup($standby);
is($from->('k2', '192.0.2.1'), 'valid/-', 'limits lifted: valid again after replay');
$session->quit;

is($primary->safe_psql('postgres', q{SELECT remaining FROM apikey.owner_credits}),
	'', 'the owner\'s credits row went with its quota; nothing was debited');

$standby->stop;
$primary->stop;
done_testing();
