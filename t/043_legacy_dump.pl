# Every state a user can give a legacy format survives pg_dump and restore.
#
# A DRF key is imported and stays pending; the format is then retired, so
# its pending key no longer verifies by its old hash.  A SHA-256 key is
# imported and the sha256 format's token_regex narrowed, as a user may.
# Dumped with pg_dump -Fc and restored into a new database, the retired
# format must still be retired (the pending key refused, as before the
# dump: restoring must not reopen it), the narrowed expression must still
# be narrowed, and apikey.legacy_formats must hold exactly the rows it held.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = apikey_node('dump');
apikey_db($node, 'app');
token_table($node, 'app');

# The DRF hash was made with Python's hashlib (1000 iterations).
$node->safe_psql(
	'app', q{
INSERT INTO tok VALUES ('drf', NULL, 'AbCdEf12.s3cr3tS3cr3tS3cr3tS3cr3tS3cr3tXy'),
					   ('sha', NULL, 'unkey_3ZKmPq8sT2vW9xY4aB6cD');
UPDATE tok SET key_id = i.key_id
  FROM apikey.import_keys('drf', '[{"owner": "globex", "lookup": "AbCdEf12",
		 "hash": "pbkdf2_sha256$1000$saltsalt$qjoieJGmlDAL174i3uup9Eq0FgMBmOOzoEFv5CGOR9c="}]') i
 WHERE tok.name = 'drf';
UPDATE tok SET key_id = i.key_id
  FROM apikey.import_keys('sha256', jsonb_build_array(jsonb_build_object(
		 'owner', 'acme', 'hash', encode(sha256(convert_to(tok('sha'), 'UTF8')), 'hex')))) i
 WHERE tok.name = 'sha';
});
is($node->safe_psql('app', 'SELECT count(key_id) FROM tok'), '2', 'a DRF and a SHA-256 key imported');

# The verdicts, in a read-only transaction (no upgrade is recorded).
my $verdicts_sql = q{
BEGIN READ ONLY;
SELECT (apikey.check(tok('drf'))).code || ' ' || (apikey.check(tok('sha'))).code;
COMMIT;};
is($node->safe_psql('app', $verdicts_sql), 'valid valid', 'both verify before the retirement');

# Retire drf, keeping its pending key; narrow sha256's expression.
$node->safe_psql(
	'app', q{
SELECT apikey.legacy_retire('drf', false);
UPDATE apikey.legacy_formats SET token_regex = '^unkey_[A-Za-z0-9]{16,}$' WHERE name = 'sha256';
});
is($node->safe_psql('app', $verdicts_sql), 'unknown valid',
	'the retired format\'s pending key is refused; the SHA-256 key verifies');

my $formats_sql = q{SELECT string_agg(f::text, E'\n' ORDER BY name) FROM apikey.legacy_formats f};
my $formats_before = $node->safe_psql('app', $formats_sql);
like($formats_before, qr/\(drf,.*,"[^"]+"\)$/m, 'drf has an accept_until before the dump');
like($formats_before, qr/\^unkey_/, 'sha256 has the narrowed token_regex before the dump');

# Dump, and restore into a new database.
my $dump = $node->basedir . '/app.dump';
my ($out, $err);
ok( IPC::Run::run(
		[ 'pg_dump', '-Fc', '-f', $dump, '-d', $node->connstr('app') ],
		'>', \$out, '2>', \$err),
	'pg_dump -Fc');
is($err, '', 'pg_dump printed nothing');
$node->safe_psql('postgres', 'CREATE DATABASE restored');
ok( IPC::Run::run(
		[ 'pg_restore', '--exit-on-error', '-d', $node->connstr('restored'), $dump ],
		'>', \$out, '2>', \$err),
	'pg_restore succeeded');
is($err, '', 'pg_restore printed no warning or error');

is($node->safe_psql('restored', $formats_sql), $formats_before,
	'apikey.legacy_formats holds the same rows after the restore');
is( $node->safe_psql(
		'restored', q{SELECT format || ' ' || pending || ' ' || (accept_until IS NOT NULL)
						FROM apikey.legacy_progress WHERE format = 'drf'}),
	'drf 1 true', 'drf is still retired, its key still pending');
is($node->safe_psql('restored', $verdicts_sql), 'unknown valid',
	'after the restore the retired format\'s pending key is refused as before');

$node->stop;
done_testing();
