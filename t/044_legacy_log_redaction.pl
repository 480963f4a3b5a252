# Legacy tokens never reach the server log, and ordinary text still does.
#
# Three formats are in use (sha256, drf and bcrypt-prefixed have keys).
# Their tokens carry no checksum and, but for DRF's 32-character secret,
# no run of 32 letters and digits that apikey's own shapes would hide: the
# redactor must hide them by the shapes of the formats in use.
#
# Each psql run is a new session.  Errors: the failing statement is the
# first one the session analyses (the STATEMENT line and the message itself
# carry the token).  log_statement = 'all': a statement is logged before it
# is analysed, so these sessions run SELECT 1 first (a session learns the
# formats in use at its first analysed statement: see the README).
#
# Ordinary text must not be taken for a token: with these formats in use,
# "table apikey.keys is append-only" and "column usage_log.rolled_up" are
# logged as they are, and so are qualified names that have the
# bcrypt-prefixed shape but no capital letter or digit
# (apikey.set_owner_limits, apikey.legacy_upgrade_pending).
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = apikey_node(
	'legacy_redact', q{
log_statement = 'all'
log_min_error_statement = error
});
apikey_db($node);

my %tok = (
	sha => 'unkey_3ZKmPq8sT2vW9xY4aB6cD',
	drf => 'AbCdEf12.s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tXy',
	bc => 'live4f2a.Zr9-kQ2_mW7xP4vL8nT3');

# Set-up, not logged (log_statement = 'none' for this session): the keys.
# The DRF hash was made with Python's hashlib.
$node->safe_psql(
	'postgres', qq{
SET log_statement = 'none';
CREATE EXTENSION pgcrypto;
SELECT count(key_id) FROM apikey.import_keys('sha256', jsonb_build_array(jsonb_build_object(
	'owner', 'acme', 'hash', encode(sha256(convert_to('$tok{sha}', 'UTF8')), 'hex'))));
SELECT count(key_id) FROM apikey.import_keys('drf', '[{"owner": "globex", "lookup": "AbCdEf12",
	"hash": "pbkdf2_sha256\$1000\$saltsalt\$qjoieJGmlDAL174i3uup9Eq0FgMBmOOzoEFv5CGOR9c="}]');
SELECT count(key_id) FROM apikey.import_keys('bcrypt-prefixed', jsonb_build_array(jsonb_build_object(
	'owner', 'initech', 'lookup', 'live4f2a', 'hash', crypt('Zr9-kQ2_mW7xP4vL8nT3', gen_salt('bf', 4)))));
CREATE TABLE secrets (v text CHECK (v = ''));
});
is( $node->safe_psql(
		'postgres', 'SELECT string_agg(format, \',\' ORDER BY format) FROM apikey.legacy_progress WHERE pending + migrated > 0'),
	'bcrypt-prefixed,drf,sha256', 'three formats have keys');

sub run
{
	my ($sql) = @_;
	my ($ret, $out, $err) = $node->psql('postgres', $sql);
	return ($ret, $err);
}
my ($ret, $err);

# Failing statements, each the first its session analyses (SET is not).
for my $name (sort keys %tok)
{
	($ret, $err) = run(qq{SET log_statement = 'none';
INSERT INTO secrets (v) VALUES ('$tok{$name}');});
	like($err, qr/violates check constraint/, "$name token in a failing INSERT");
}
($ret, $err) = run(qq{SET log_statement = 'none';
SELECT 1/0 AS failing, '$tok{sha}' AS t1, '$tok{bc}' AS t2;});
like($err, qr/division by zero/, 'tokens in a statement failing for another reason');

# log_statement = 'all', and tokens in error messages.
($ret, $err) = run(qq{SELECT 1;
SELECT '$tok{sha}' AS sha, '$tok{drf}' AS drf, '$tok{bc}' AS bc;
SELECT '$tok{sha}'::int;});
like($err, qr/invalid input syntax for type integer/, 'token in an error message');
($ret, $err) = run(qq{SELECT 1;
DO \$\$ BEGIN RAISE EXCEPTION 'key % leaked', '$tok{bc}' USING DETAIL = 'and $tok{drf}'; END \$\$;});
like($err, qr/leaked/, 'tokens in RAISE EXCEPTION and its DETAIL');

# Ordinary text with these formats in use.
($ret, $err) = run(qq{SELECT 1;
DO \$\$ BEGIN RAISE EXCEPTION 'table apikey.keys is append-only'; END \$\$;});
like($err, qr/append-only/, 'an error naming apikey.keys');
($ret, $err) = run(qq{SET log_statement = 'none';
DO \$\$ BEGIN RAISE EXCEPTION 'column usage_log.rolled_up'; END \$\$;});
like($err, qr/rolled_up/, 'an error naming usage_log.rolled_up');
($ret, $err) = run(qq{SELECT 1;
SELECT apikey.set_owner_limits('carol', max_keys => 0);
SELECT apikey.import_key('sha256', 'carol', plaintext => 'unkey_aZ3bY4cX5dW6eV7fU8');});
like($err, qr/set_owner_limits/, 'an error whose hint names apikey.set_owner_limits()');
($ret, $err) = run(qq{SET log_statement = 'none';
DO \$\$ BEGIN RAISE EXCEPTION 'apikey.legacy_upgrade_pending is full'; END \$\$;});
like($err, qr/legacy_upgrade_pending/, 'an error naming apikey.legacy_upgrade_pending');

$node->stop('fast');
my $log = slurp_file($node->logfile);

for my $name (sort keys %tok)
{
	my $count = () = $log =~ /\Q$tok{$name}\E/g;
	is($count, 0, "the $name token appears nowhere in the log");
}
# What replaced them: "..." and the last four characters (DRF's secret is
# already hidden by apikey's own shapes, its prefix left).
like($log, qr/\QINSERT INTO secrets (v) VALUES ('...B6cD')\E/, 'the sha256 token became ...B6cD');
like($log, qr/\QINSERT INTO secrets (v) VALUES ('...8nT3')\E/, 'the bcrypt-prefixed token became ...8nT3');
like($log, qr/\QSTATEMENT:  INSERT INTO secrets (v) VALUES ('AbCdEf12....3tXy')\E/,
	'the DRF token keeps only its prefix and four characters');
like($log, qr/\Qinvalid input syntax for type integer: "...B6cD"\E/, 'the error message is redacted');
like($log, qr/\Qstatement: SELECT '...B6cD' AS sha\E/, 'so is the log_statement line');

like($log, qr/ERROR:  table apikey\.keys is append-only/, '"table apikey.keys is append-only" is logged as it is');
like($log, qr/STATEMENT:  DO .*RAISE EXCEPTION 'table apikey\.keys is append-only'/,
	'also in its statement');
like($log, qr/ERROR:  column usage_log\.rolled_up/, '"column usage_log.rolled_up" is logged as it is');
like($log, qr/HINT:  .*with apikey\.set_owner_limits\(\)\./, 'the hint naming apikey.set_owner_limits() is logged as it is');
like($log, qr/ERROR:  apikey\.legacy_upgrade_pending is full/, 'so is apikey.legacy_upgrade_pending');

done_testing();
