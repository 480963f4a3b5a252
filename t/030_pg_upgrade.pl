# pg_upgrade from one major version to another with apikey installed:
# keys, scopes, revocations, quotas, rotations and usage survive, every
# token gets the same verdict afterwards, and new keys can be issued.
#
# Runs when APIKEY_UPGRADE_FROM names the old installation (the directory
# holding bin/, e.g. /usr/lib/postgresql/15) with apikey installed in it;
# the new one is the installation this test runs under.  scripts/test
# matrix runs it from Debian's PostgreSQL 15 to 18.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use File::Temp qw(tempdir);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $from = $ENV{APIKEY_UPGRADE_FROM};
plan skip_all => 'APIKEY_UPGRADE_FROM is not set' unless $from;

my $old = PostgreSQL::Test::Cluster->new('old', install_path => $from);
$old->init;
$old->append_conf('postgresql.conf', "shared_preload_libraries = 'apikey'\n");
$old->start;
my $new = PostgreSQL::Test::Cluster->new('new');
# 18's initdb turns data checksums on by default; pg_upgrade needs the
# old cluster's setting
my ($new_major) = $new->config_data('--version') =~ /(\d+)/;
$new->init(extra => $new_major >= 18 ? ['--no-data-checksums'] : []);
$new->append_conf('postgresql.conf', "shared_preload_libraries = 'apikey'\n");

my $old_version = $old->safe_psql('postgres', 'SHOW server_version_num');
my $new_version = $new->config_data('--version');
note "upgrading from $old_version to $new_version";

apikey_db($old);
token_table($old);
$old->safe_psql(
	'postgres', q{
INSERT INTO apikey.scopes (name, description) VALUES ('orders:read', 'Read orders'), ('orders:write', NULL);
INSERT INTO tok SELECT 'plain', key_id, token FROM apikey.issue(owner => 'acme', scopes => '{orders:read}');
INSERT INTO tok SELECT 'wide', key_id, token FROM apikey.issue(owner => 'globex', scopes => '{orders:*}',
	metadata => '{"plan": "gold"}', expires_at => now() + interval '30 days');
INSERT INTO tok SELECT 'revoked', key_id, token FROM apikey.issue(owner => 'acme');
SELECT apikey.revoke(key_id, 'leaked') FROM tok WHERE name = 'revoked';
INSERT INTO tok SELECT 'quota', key_id, token FROM apikey.issue(owner => 'acme', quota => 10);
INSERT INTO tok SELECT 'cidr', key_id, token FROM apikey.issue(owner => 'acme', allowed_cidrs => '{203.0.113.0/24}');
INSERT INTO tok SELECT 'old', key_id, token FROM apikey.issue(owner => 'initech', quota => 5);
INSERT INTO tok SELECT 'rotated', r.key_id, r.token FROM tok t, apikey.rotate(t.key_id, '1 day') r WHERE t.name = 'old';
INSERT INTO tok SELECT 'unknown', NULL, token FROM apikey._new_token('ak');
SELECT apikey.verify(token) FROM tok WHERE name = 'quota';
SELECT apikey.verify(token) FROM tok WHERE name = 'quota';
SELECT apikey.verify(token) FROM tok WHERE name = 'rotated';
SELECT apikey.flush_usage();
});

# What must survive, as text.
my $state_sql = q{
SELECT string_agg(format('%s|%s|%s|%s|%s', id, owner, hint, expires_at IS NOT NULL, metadata), ';' ORDER BY id) FROM apikey.keys;
SELECT string_agg(format('%s|%s', key_id, scope), ';' ORDER BY key_id, scope) FROM apikey.key_scopes;
SELECT string_agg(format('%s|%s', key_id, reason), ';' ORDER BY key_id) FROM apikey.revocations;
SELECT string_agg(format('%s|%s', key_id, remaining), ';' ORDER BY key_id) FROM apikey.quotas;
SELECT string_agg(format('%s|%s', name, description), ';' ORDER BY name) FROM apikey.scopes;
SELECT coalesce(sum(calls), 0) FROM apikey.usage_log;
SELECT extversion FROM pg_extension WHERE extname = 'apikey';
};
# Verdicts of every token (a check of the quota key spends a credit, so
# it goes last and is compared on its own).
my $verdict_sql = q{
SELECT string_agg(format('%s=%s', name, (apikey.check(token, 'orders:read')).code), ' ' ORDER BY name)
  FROM tok WHERE name <> 'quota';
};
my $verdicts_before = $old->safe_psql('postgres', $verdict_sql);
like($verdicts_before, qr/plain=valid .*revoked=revoked .*unknown=unknown/, 'verdicts before the upgrade');
$old->safe_psql('postgres', 'SELECT apikey.flush_usage()');
my $state_before = $old->safe_psql('postgres', $state_sql);
$old->stop;

# pg_upgrade writes its logs into the current directory on older releases.
my $workdir = tempdir(CLEANUP => 1);
chdir $workdir;
command_ok(
	[
		'pg_upgrade', '--no-sync',
		'-d', $old->data_dir, '-D', $new->data_dir,
		'-b', $old->config_data('--bindir'), '-B', $new->config_data('--bindir'),
		'-s', $new->host, '-p', $old->port, '-P', $new->port
	],
	'pg_upgrade succeeds with apikey installed');

$new->start;
is($new->safe_psql('postgres', $state_sql), $state_before,
	'keys, scopes, revocations, quotas, usage and the extension version survive');
is($new->safe_psql('postgres', $verdict_sql), $verdicts_before, 'every token gets the same verdict');
is( $new->safe_psql('postgres',
		q{SELECT (apikey.check(token)).remaining FROM tok WHERE name = 'quota'}),
	'7', 'the quota goes on from where it was');
is( $new->safe_psql('postgres', q{
SELECT (apikey.check(i.token, 'orders:read')).code FROM apikey.issue(owner => 'acme', scopes => '{orders:read}') i}),
	'valid', 'a key issued after the upgrade verifies');
is( $new->safe_psql('postgres', q{
SELECT max(id) > (SELECT max(key_id) FROM tok) FROM apikey.keys}),
	't', 'key ids continue after the old ones');
is( $new->safe_psql('postgres', q{
BEGIN;
SELECT apikey.authenticate(token, 'orders:read') IS NOT NULL FROM tok WHERE name = 'plain';
SELECT apikey.current_owner();
COMMIT;}),
	"t\nacme", 'authenticate() binds after the upgrade');
$new->stop;

done_testing();
