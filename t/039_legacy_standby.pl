# Legacy keys on a hot standby, and the budget of slow legacy hashes.  A
# standby verifies an imported key by its old hash (bcrypt, PBKDF2) without
# writing: the verdict is valid, the key stays pending and the deferred
# upgrade is counted.  The standby's own apikey.legacy_verify_per_second
# budget answers rate_limited once spent, never valid.  After the primary
# upgrades a key, the standby verifies it by SHA-256 without any legacy
# hash.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $primary = apikey_node('primary', undef, allows_streaming => 1);
apikey_db($primary);
token_table($primary);
# bcrypt of cost 4 (fast); the DRF hash was made with Python's hashlib
$primary->safe_psql(
	'postgres', q{
CREATE EXTENSION pgcrypto;
INSERT INTO tok VALUES ('bc', NULL, 'live4f2a.Zr9-kQ2_mW7xP4vL8nT3'),
					   ('drf', NULL, 'AbCdEf12.s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tXy');
UPDATE tok SET key_id = i.key_id
  FROM apikey.import_keys('bcrypt-prefixed', jsonb_build_array(jsonb_build_object(
		 'owner', 'initech', 'lookup', 'live4f2a', 'hash', crypt('Zr9-kQ2_mW7xP4vL8nT3', gen_salt('bf', 4))))) i
 WHERE tok.name = 'bc';
UPDATE tok SET key_id = i.key_id
  FROM apikey.import_keys('drf', '[{"owner": "globex", "lookup": "AbCdEf12",
		 "hash": "pbkdf2_sha256$1000$saltsalt$qjoieJGmlDAL174i3uup9Eq0FgMBmOOzoEFv5CGOR9c="}]') i
 WHERE tok.name = 'drf';
});
is($primary->safe_psql('postgres', 'SELECT count(key_id) FROM tok'), '2', 'two legacy keys imported');

$primary->backup('bk');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bk', has_streaming => 1);
$standby->append_conf('postgresql.conf', "apikey.legacy_verify_per_second = 2\n");
$standby->start;
$primary->wait_for_catchup($standby);
is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 't', 'standby is in recovery');

# Valid by the old hash, nothing written, the upgrade counted as deferred.
is( $standby->safe_psql(
		'postgres', q{
SELECT (apikey.check(tok('drf'))).code || ' ' || (apikey.check(tok('bc'))).code}),
	'valid valid', 'the standby verifies a DRF and a bcrypt key by their old hashes');
is( $standby->safe_psql(
		'postgres', q{
SELECT count(*) FILTER (WHERE verifier IS NOT NULL) || ' ' ||
       (SELECT upgrades_deferred >= 2 AND upgraded = 0 FROM apikey.legacy_stats())
  FROM apikey.legacy_keys}),
	'2 true', 'both keys stay pending; the upgrades are counted as deferred');

# The budget: 2 a second (burst 2).  In one statement, a burst of bcrypt
# verifications: the first two spent it, the rest are rate_limited.
my $burst = $standby->safe_psql(
	'postgres', q{
SELECT string_agg(c.code, ',' ORDER BY g)
  FROM generate_series(1, 6) g, LATERAL apikey.check(tok('bc')) c});
unlike($burst, qr/valid.*valid.*valid/, "at most a burst's worth is valid ($burst)");
like($burst, qr/rate_limited/, 'then rate_limited, never a silent valid');
is( $standby->safe_psql(
		'postgres', q{
SELECT (apikey.check(tok('bc'))).retry_after > '0'::interval AND (SELECT refused > 0 FROM apikey.legacy_stats())}),
	't', 'a refusal says when to retry and is counted');

# The primary records the DRF key's upgrade on its first use and applies it
# at the next flush; the standby then finds it by SHA-256, computing no
# legacy hash at all.
is($primary->safe_psql('postgres', q{SELECT apikey.verify(tok('drf'))}), 't', 'the primary verifies the DRF key');
$primary->safe_psql('postgres', q{SELECT apikey.flush_usage()});
is( $primary->safe_psql(
		'postgres', q{SELECT verifier IS NULL FROM apikey.legacy_keys WHERE key_id = kid('drf')}),
	't', 'and upgrades it at the next flush');
$primary->wait_for_catchup($standby);
is( $standby->safe_psql(
		'postgres', q{
SELECT verified AS v0, refused AS r0 FROM apikey.legacy_stats() \gset
SELECT (apikey.check(tok('drf'))).code || ' ' ||
       (SELECT verified = :v0 AND refused = :r0 FROM apikey.legacy_stats())}),
	'valid true', 'the standby verifies the upgraded key by SHA-256 (no legacy hash)');

$standby->stop;
$primary->stop;
done_testing();
