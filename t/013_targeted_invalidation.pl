# Targeted invalidation: issuing keys leaves every other backend's key
# cache warm; a change to a key evicts that key (and the keys that draw on
# its budget) in every backend at its COMMIT, and nothing else; scopes
# granted to an existing key take effect at commit.  Where the key ids are
# not known the whole cache is emptied instead (fail closed): on a hot
# standby, for a transaction that changed more keys than it names, and when
# the shared ring of changed keys wrapped before a backend read it.
#
# Before 1.2 every issue() emptied every backend's cache (the statement
# trigger on key_scopes fired for the new key's scopes too).
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $primary = PostgreSQL::Test::Cluster->new('primary');
$primary->init(allows_streaming => 1);
# autovacuum off: VACUUM and ANALYZE of apikey.keys invalidate it, which
# empties every cache (not attributable to keys), and would make the
# counts below depend on timing.
$primary->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'apikey'
autovacuum = off
});
$primary->start;

$primary->safe_psql(
	'postgres', q{
CREATE EXTENSION apikey;
INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
CREATE TABLE tok (name text PRIMARY KEY, key_id bigint, token text);
INSERT INTO tok SELECT 'w' || g, key_id, token
  FROM generate_series(1, 20) g, LATERAL apikey.issue(owner => 'warm', name => 'w' || g, scopes => '{orders:read}');
INSERT INTO tok SELECT n, key_id, token
  FROM unnest('{a,b,rot,other,sa}'::text[]) n, LATERAL apikey.issue(owner => 'acme', name => n, scopes => '{orders:read}');
INSERT INTO tok SELECT 'filler' || g, key_id, NULL
  FROM generate_series(1, 1000) g, LATERAL apikey.issue(owner => 'filler', name => 'filler' || g);
CREATE FUNCTION tok(n text) RETURNS text LANGUAGE sql STABLE AS 'SELECT token FROM tok WHERE name = n';
CREATE FUNCTION kid(n text) RETURNS bigint LANGUAGE sql STABLE AS 'SELECT key_id FROM tok WHERE name = n';
CREATE FUNCTION warm() RETURNS bigint LANGUAGE sql
	AS $$SELECT count(*) FILTER (WHERE apikey.verify(token, 'orders:read')) FROM tok WHERE name ~ '^w[0-9]+$'$$;
});

$primary->backup('bk');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby);

# The verifying session; stats() returns what changed since the last call.
my $v = $primary->background_psql('postgres');
$v->query_safe(q{CREATE TEMP TABLE last AS SELECT * FROM apikey.cache_stats()});
my $stats_sql = q{
WITH s AS (SELECT * FROM apikey.cache_stats()),
     d AS (SELECT s.entries, s.hits - l.hits AS hits, s.misses - l.misses AS misses,
                  s.invalidations - l.invalidations AS emptied FROM s, last l),
     u AS (UPDATE last SET hits = s.hits, misses = s.misses, invalidations = s.invalidations FROM s)
SELECT format('entries=%s hits=%s misses=%s emptied=%s', entries, hits, misses, emptied) FROM d};

is($v->query_safe('SELECT warm()'), '20', 'twenty keys verified (and cached)');
is($v->query_safe($stats_sql), 'entries=20 hits=0 misses=20 emptied=0', 'each one a cache miss');

# 1,000 keys issued with scopes in another session, one transaction each.
$primary->safe_psql(
	'postgres', q{
DO $$
BEGIN
	FOR i IN 1 .. 1000 LOOP
		PERFORM apikey.issue(owner => 'churn' || i, scopes => '{orders:read,orders:write}');
		COMMIT;
	END LOOP;
END
$$});
is($primary->safe_psql('postgres', q{SELECT count(*) FROM apikey.keys WHERE owner LIKE 'churn%'}),
	'1000', '1,000 keys issued meanwhile');
is($v->query_safe('SELECT warm()'), '20', 'the twenty keys still verify');
is($v->query_safe($stats_sql), 'entries=20 hits=20 misses=0 emptied=0',
	'all from the cache: issuing evicted nothing and emptied nothing');

# Revoking a evicts a only; the first verification after the COMMIT refuses it.
is( $v->query_safe(q{SELECT string_agg((apikey.check(tok(n))).code, ' ' ORDER BY n) FROM unnest('{a,b}'::text[]) n}),
	'valid valid', 'a and b valid (now cached)');
$v->query_safe($stats_sql);
$primary->safe_psql('postgres', q{SELECT apikey.revoke(kid('a'), 'leaked')});
is($v->query_safe(q{SELECT code FROM apikey.check(tok('a'))}), 'revoked', 'a is refused at once');
is($v->query_safe(q{SELECT code FROM apikey.check(tok('b'))}), 'valid', 'b still valid');
is($v->query_safe($stats_sql), 'entries=22 hits=1 misses=1 emptied=0',
	'only a was read again; b was a cache hit');

# Scopes granted to an existing key take effect at its commit.
is($v->query_safe(q{SELECT code FROM apikey.check(tok('b'), 'orders:write')}), 'scope_denied',
	'b lacks orders:write (cached)');
$primary->safe_psql('postgres',
	q{INSERT INTO apikey.key_scopes (key_id, scope) VALUES (kid('b'), 'orders:write')});
is($v->query_safe(q{SELECT code FROM apikey.check(tok('b'), 'orders:write')}), 'valid',
	'the grant is seen at once');

# Rotation: the old key draws on the new key's budget, so a change to the
# new key evicts the old one too.
$primary->safe_psql('postgres',
	q{INSERT INTO tok SELECT 'rot_new', key_id, token FROM apikey.rotate(kid('rot'), '1 day')});
is( $v->query_safe(q{SELECT string_agg((apikey.check(tok(n))).code, ' ' ORDER BY n) FROM unnest('{other,rot,rot_new}'::text[]) n}),
	'valid valid valid', 'old and new token and another key valid (now cached)');
$v->query_safe($stats_sql);
$primary->safe_psql('postgres', q{SELECT apikey.set_limits(kid('rot_new'), quota => 0)});
is( $v->query_safe(q{SELECT string_agg((apikey.check(tok(n))).code, ' ' ORDER BY n) FROM unnest('{other,rot,rot_new}'::text[]) n}),
	'valid quota_exhausted quota_exhausted',
	'a quota set on the new key binds the old key at once');
is($v->query_safe($stats_sql), 'entries=25 hits=1 misses=2 emptied=0',
	'the new key and the old one were read again, the other key was a hit');

# The link itself lives in apikey.key_lineage: a change to it evicts the
# key it is about, at its COMMIT, and nothing else.
$primary->safe_psql('postgres',
	q{UPDATE apikey.key_lineage SET budget_key_id = NULL WHERE key_id = kid('rot')});
is( $v->query_safe(q{SELECT string_agg((apikey.check(tok(n))).code, ' ' ORDER BY n) FROM unnest('{other,rot,rot_new}'::text[]) n}),
	'valid valid quota_exhausted',
	'the old key unlinked by hand draws on its own budget at once');
is($v->query_safe($stats_sql), 'entries=25 hits=2 misses=1 emptied=0',
	'only the old key was read again');

# A transaction that changes more keys than it names empties every cache.
$primary->safe_psql('postgres',
	q{UPDATE apikey.keys SET expires_at = now() + interval '1 year' WHERE owner LIKE 'churn%'});
is($v->query_safe('SELECT warm()'), '20', 'the twenty keys verify');
is($v->query_safe($stats_sql), 'entries=20 hits=0 misses=20 emptied=1',
	'1,000 keys changed in one transaction: the cache was emptied');

# The ring of changed keys: 5,000 entries since this backend last looked
# are evicted one by one; 10,000 overflow it, and the cache is emptied.
my $batches = sub {
	my ($n) = @_;
	$primary->safe_psql('postgres', join '', map {
		my $lo = ($_ % 2) * 500;
		"UPDATE apikey.keys SET expires_at = now() + interval '2 years' WHERE owner LIKE 'filler%' AND id % 1000 >= $lo AND id % 1000 < $lo + 500;\n"
	} 1 .. $n);
};
$batches->(10);
is($v->query_safe('SELECT warm()'), '20', 'after 10 transactions of 500 keys');
is($v->query_safe($stats_sql), 'entries=20 hits=20 misses=0 emptied=0',
	'5,000 ring entries: nothing emptied, no warm key evicted');
$batches->(20);
is($v->query_safe('SELECT warm()'), '20', 'after 20 more');
is($v->query_safe($stats_sql), 'entries=20 hits=0 misses=20 emptied=1',
	'10,000 ring entries overflowed the ring: the cache was emptied');

# A hot standby replays the invalidation without the key ids.
$primary->wait_for_catchup($standby);
my $s = $standby->background_psql('postgres');
# (a standby cannot create a table: absolute counters of a new session)
my $standby_stats = q{SELECT format('entries=%s hits=%s misses=%s emptied=%s', entries, hits, misses, invalidations) FROM apikey.cache_stats()};
is($s->query_safe('SELECT warm()'), '20', 'standby: the twenty keys verify');
is($s->query_safe(q{SELECT code FROM apikey.check(tok('sa'))}), 'valid', 'standby: sa valid');
is($s->query_safe($standby_stats), 'entries=21 hits=0 misses=21 emptied=0', 'standby: all cached');
$primary->safe_psql(
	'postgres', q{
DO $$
BEGIN
	FOR i IN 1 .. 100 LOOP
		PERFORM apikey.issue(owner => 'standby churn' || i, scopes => '{orders:read}');
		COMMIT;
	END LOOP;
END
$$});
$primary->wait_for_catchup($standby);
is($s->query_safe('SELECT warm()'), '20', 'standby: after 100 keys issued on the primary');
is($s->query_safe($standby_stats), 'entries=21 hits=20 misses=21 emptied=0',
	'standby: issuing emptied nothing there either');
$primary->safe_psql('postgres', q{SELECT apikey.revoke(kid('sa'))});
$primary->wait_for_catchup($standby);
is($s->query_safe(q{SELECT code FROM apikey.check(tok('sa'))}), 'revoked', 'standby: sa revoked after replay');
is($s->query_safe($standby_stats), 'entries=1 hits=20 misses=22 emptied=1',
	'standby: without key ids, the whole cache was emptied');
$s->quit;

$v->quit;
$standby->stop;
$primary->stop;
done_testing();
