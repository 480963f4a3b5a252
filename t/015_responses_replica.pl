# Suspensions and quarantines leave the key caches as revocations do.  On
# the primary, suspend_owner() and resume_owner() evict exactly the
# owner's keys from another backend's warm cache at commit (targeted
# invalidation), and nothing else.  On a hot standby, through WAL replay,
# a session that has the key cached sees suspended, then (after resume)
# valid, then quarantined for the scopes outside the quarantine, each
# right after replay.  A timed suspension ends by the standby's clock.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use ApikeyTest;

# autovacuum off: VACUUM and ANALYZE of apikey.keys empty every cache,
# which would make the cache counts below depend on timing (as in t/013).
my $primary = apikey_node('primary', "autovacuum = off\n", allows_streaming => 1);
apikey_db($primary);
token_table($primary);
$primary->safe_psql(
	'postgres', q{
INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
INSERT INTO tok SELECT 'k', key_id, token FROM apikey.issue(owner => 'acme', scopes => '{orders:read,orders:write}');
INSERT INTO tok SELECT n, key_id, token
  FROM unnest('{a2,a3}'::text[]) n, LATERAL apikey.issue(owner => 'acme', name => n);
INSERT INTO tok SELECT n, key_id, token
  FROM unnest('{g1,g2}'::text[]) n, LATERAL apikey.issue(owner => 'globex', name => n);
});

# A verifying session on the primary, all five keys cached; stats() says
# what changed in its cache since the last call.
my $v = $primary->background_psql('postgres');
$v->query_safe(q{CREATE TEMP TABLE last AS SELECT * FROM apikey.cache_stats()});
my $stats_sql = q{
WITH s AS (SELECT * FROM apikey.cache_stats()),
     d AS (SELECT s.hits - l.hits AS hits, s.misses - l.misses AS misses,
                  s.invalidations - l.invalidations AS emptied FROM s, last l),
     u AS (UPDATE last SET hits = s.hits, misses = s.misses, invalidations = s.invalidations FROM s)
SELECT format('hits=%s misses=%s emptied=%s', hits, misses, emptied) FROM d};
my $all = q{SELECT string_agg(n || ':' || (apikey.check(tok(n))).code, ' ' ORDER BY n)
  FROM unnest('{a2,a3,g1,g2,k}'::text[]) n};
is($v->query_safe($all), 'a2:valid a3:valid g1:valid g2:valid k:valid', 'primary: five keys valid');
is($v->query_safe($stats_sql), 'hits=0 misses=5 emptied=0', 'and now cached');

$primary->safe_psql('postgres', q{SELECT apikey.suspend_owner('acme', 'tenant breach')});
is( $v->query_safe($all),
	'a2:suspended a3:suspended g1:valid g2:valid k:suspended',
	'suspend_owner: the owner\'s keys are suspended in another session at once');
is($v->query_safe($stats_sql), 'hits=2 misses=3 emptied=0',
	'only the owner\'s three keys left its cache; the other owner\'s were hits');

$primary->safe_psql('postgres', q{SELECT apikey.resume_owner('acme', 'contained')});
is($v->query_safe($all), 'a2:valid a3:valid g1:valid g2:valid k:valid',
	'resume_owner: valid again at once');
is($v->query_safe($stats_sql), 'hits=2 misses=3 emptied=0', 'again only the owner\'s keys were evicted');
$v->quit;

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
	q{SELECT apikey.release(kid('k')); SELECT apikey.suspend(kid('k'), 'brief', '8 seconds')});
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
