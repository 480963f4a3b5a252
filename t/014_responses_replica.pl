# Suspensions and quarantines reach a hot standby's warm key cache through
# WAL replay, as revocations do: a standby session that has the key cached
# sees suspended, then (after resume) valid, then quarantined for the
# scopes outside the quarantine, each right after replay.  A timed
# suspension ends by the standby's clock.
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
INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
INSERT INTO tok SELECT 'k', key_id, token FROM apikey.issue(owner => 'acme', scopes => '{orders:read,orders:write}');
});

$primary->backup('bk');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby);

my $codes = q{SELECT string_agg(code, ' ' ORDER BY s)
  FROM unnest(ARRAY['orders:read', 'orders:write']) s, apikey.check(tok('k'), s)};
my $session = $standby->background_psql('postgres');
is($session->query_safe($codes), 'valid valid', 'standby session: key valid (now cached)');

$primary->safe_psql('postgres', q{SELECT apikey.suspend(kid('k'), 'replica test')});
$primary->wait_for_catchup($standby);
is($session->query_safe($codes), 'suspended suspended', 'suspended after replay, despite the warm cache');

$primary->safe_psql('postgres', q{SELECT apikey.resume(kid('k'))});
$primary->wait_for_catchup($standby);
is($session->query_safe($codes), 'valid valid', 'valid again after the resume is replayed');

$primary->safe_psql('postgres',
	q{SELECT apikey.quarantine(kid('k'), '{orders:read}', 'replica test')});
$primary->wait_for_catchup($standby);
is($session->query_safe($codes), 'valid quarantined', 'quarantined to reads after replay');

$primary->safe_psql('postgres',
	q{SELECT apikey.release(kid('k')); SELECT apikey.suspend(kid('k'), 'brief', '2 seconds')});
$primary->wait_for_catchup($standby);
is($session->query_safe($codes), 'suspended suspended', 'a timed suspension replayed');
ok( $standby->poll_query_until('postgres',
		q{SELECT code = 'valid' FROM apikey.check(tok('k'))}),
	'and ended by the clock on the standby');
is($session->query_safe($codes), 'valid valid', 'also in the session that cached it');
$session->quit;

$standby->stop;
$primary->stop;
done_testing();
