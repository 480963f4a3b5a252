# Dump and restore.
#
# Keys with scopes, limits, an owner's limits and credits, a revocation,
# two rotations (one old key expired, one in its grace period, drawing on
# its successor's quota), and usage are dumped with pg_dump -Fc and
# restored with pg_restore into a fresh database of a new cluster.
# pg_dump prints no warning (no apikey table references itself, so the
# data of the extension's tables has an order).  Afterwards every apikey
# table holds exactly the same rows, every token gets the same verdict
# (valid, revoked, expired) with the same key, owner and scopes, the
# rotations keep their links and shared budget, and a newly issued key
# continues the id sequence after the old maximum.  The audit chain comes
# back row for row and still verifies; restoring the key tables appends
# one row per table (the restore's COPY is a direct change), and new
# administrative calls go on chaining.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

# No usage writer in app (apikey.databases leaves it out): usage there is
# written synchronously (pending rows, folded by flush_usage()), so the
# usage_log rows exist before the dump and verdicts() below, which rolls
# its calls back, leaves no trace.
my $synchronous = "apikey.databases = 'postgres'\n";
my $old = apikey_node('old', $synchronous);

apikey_db($old, 'app');
$old->safe_psql(
	'app', q{
INSERT INTO apikey.scopes (name, description) VALUES
	('orders:read', 'read orders'), ('orders:write', NULL), ('billing:read', 'invoices');
});

my %tok;
my %id;
sub issue
{
	my ($node, $db, $name, $args) = @_;
	my ($id, $token) = split /\|/,
	  $node->safe_psql($db, "SELECT key_id || '|' || token FROM apikey.issue($args)");
	$tok{$name} = $token;
	$id{$name} = $id;
	return $id;
}
issue($old, 'app', 'plain', q{'acme', '{orders:read, orders:write}', 'checkout'});
issue($old, 'app', 'wildcard', q{'acme', '{orders:*, billing:read}', metadata => '{"team": "ops"}'});
issue($old, 'app', 'all', q{'globex', '{*}', prefix => 'gx_live'});
issue($old, 'app', 'limited', q{'globex', '{orders:read}', rate_limit => 100, quota => 50,
	quota_refill => '1 day', allowed_cidrs => '{127.0.0.0/8, ::1/128}'});
issue($old, 'app', 'expiring', q{'initech', expires_at => now() + interval '30 days'});
issue($old, 'app', 'revoked', q{'initech', '{billing:read}'});
issue($old, 'app', 'rotated', q{'initech', '{orders:read}', 'rotated key'});
issue($old, 'app', 'budget', q{'initech', '{orders:read}', 'rotated in grace', quota => 5});
$old->safe_psql('app', "SELECT apikey.revoke($id{revoked}, 'leaked in a ticket')");
# A leak policy and a reported leak (the key is revoked already).
$old->safe_psql('app', qq{
INSERT INTO apikey.prefixes (prefix, public, description) VALUES ('gx_live', false, 'globex live keys');
SELECT apikey.report_leak('$tok{revoked}', 'support', 'TICKET-9');
});
# Limits per owner (1.2): the owner's row and its credits are dumped.
$old->safe_psql('app', q{
SELECT apikey.set_owner_limits('acme', rate_limit => 1000, quota => 100, quota_refill => '1 day',
							   max_keys => 10, metadata => '{"plan": "pro"}');
});
# Rotation with no grace: the old key expires at once.
my ($new_id, $new_token) = split /\|/,
  $old->safe_psql('app',
	"SELECT key_id || '|' || token FROM apikey.rotate($id{rotated}, '0 seconds')");
$tok{rotated_new} = $new_token;
$id{rotated_new} = $new_id;
# Rotation with a grace period: the old key draws on the new key's quota.
($new_id, $new_token) = split /\|/,
  $old->safe_psql('app',
	"SELECT key_id || '|' || token FROM apikey.rotate($id{budget}, '1 day')");
$tok{budget_new} = $new_token;
$id{budget_new} = $new_id;

# Usage: a few verifications of each kind.
$old->safe_psql(
	'app', qq{
SELECT apikey.verify('$tok{plain}', 'orders:read') FROM generate_series(1, 3);
SELECT apikey.verify('$tok{wildcard}', 'orders:refund');
SELECT apikey.verify('$tok{limited}', 'orders:read') FROM generate_series(1, 2);
SELECT apikey.verify('$tok{revoked}');
SELECT apikey.verify('$tok{rotated}');
SELECT apikey.verify('$tok{rotated_new}', 'orders:read');
SELECT apikey.verify('ak_not_a_token');
SELECT apikey.flush_usage();
});

# Everything that must survive, as text: whole rows of every table, and the
# verdict of every token.
my $tables_sql = q{
SELECT string_agg(t || ': ' || d, E'\n' ORDER BY t) FROM (
	SELECT 'keys' AS t, md5(string_agg(k::text, '|' ORDER BY k.id)) AS d FROM apikey.keys k
	UNION ALL SELECT 'key_lineage', md5(string_agg(l::text, '|' ORDER BY l.key_id)) FROM apikey.key_lineage l
	UNION ALL SELECT 'key_scopes', md5(string_agg(s::text, '|' ORDER BY s.key_id, s.scope COLLATE "C")) FROM apikey.key_scopes s
	UNION ALL SELECT 'scopes', md5(string_agg(c::text, '|' ORDER BY c.name COLLATE "C")) FROM apikey.scopes c
	UNION ALL SELECT 'revocations', md5(string_agg(r::text, '|' ORDER BY r.key_id)) FROM apikey.revocations r
	UNION ALL SELECT 'quotas', md5(string_agg(q::text, '|' ORDER BY q.key_id)) FROM apikey.quotas q
	UNION ALL SELECT 'usage_log', md5(string_agg(u::text, '|' ORDER BY u.key_id, u.bucket, u.code, u.client_addr)) FROM apikey.usage_log u
	UNION ALL SELECT 'prefixes', md5(string_agg(p::text, '|' ORDER BY p.prefix COLLATE "C")) FROM apikey.prefixes p
	UNION ALL SELECT 'exposures', md5(string_agg(e::text, '|' ORDER BY e.id)) || ' ' || count(*) FROM apikey.exposures e
	UNION ALL SELECT 'owners', md5(string_agg(o::text, '|' ORDER BY o.owner COLLATE "C")) || ' ' || count(*) FROM apikey.owners o
	UNION ALL SELECT 'owner_credits', md5(string_agg(c::text, '|' ORDER BY c.owner COLLATE "C")) || ' ' || count(*) FROM apikey.owner_credits c
	UNION ALL SELECT 'counts', format('keys=%s key_lineage=%s key_scopes=%s scopes=%s revocations=%s quotas=%s usage_log=%s calls=%s',
		(SELECT count(*) FROM apikey.keys), (SELECT count(*) FROM apikey.key_lineage),
		(SELECT count(*) FROM apikey.key_scopes),
		(SELECT count(*) FROM apikey.scopes), (SELECT count(*) FROM apikey.revocations),
		(SELECT count(*) FROM apikey.quotas), (SELECT count(*) FROM apikey.usage_log),
		(SELECT sum(calls) FROM apikey.usage_log))
) x};

sub verdicts
{
	my ($node, $db) = @_;
	my %v;
	for my $name (sort keys %tok)
	{
		# check() debits a quota and counts usage: run it in a transaction
		# that is rolled back, so the comparison leaves no trace.
		$v{$name} = $node->safe_psql(
			$db, qq{
BEGIN;
SELECT v.code || ' ' || coalesce(v.key_id::text, '-') || ' ' || coalesce(v.owner, '-') || ' '
       || coalesce(array_to_string(ARRAY(SELECT s FROM unnest(v.scopes) s ORDER BY s COLLATE "C"), ','), '-')
       || ' ' || coalesce(v.expires_at::text, '-')
  FROM apikey.check('$tok{$name}', NULL, '127.0.0.1') v;
ROLLBACK;});
	}
	return \%v;
}

# The audit chain before the dump: every row, hashes included.
my $audit_sql = q{SELECT string_agg(a::text, E'\n' ORDER BY seq) FROM apikey.audit_log a};
my $audit_before = $old->safe_psql('app', $audit_sql);
my $audit_rows = $old->safe_psql('app', 'SELECT count(*) FROM apikey.audit_log');
cmp_ok($audit_rows, '>=', 10, "the chain has $audit_rows rows before the dump");
is($old->safe_psql('app', 'SELECT count(*) FROM apikey.audit_verify()'), '0',
	'and verifies before the dump');

my $tables_before = $old->safe_psql('app', $tables_sql);
my $verdicts_before = verdicts($old, 'app');
my $max_id = $old->safe_psql('app', 'SELECT max(id) FROM apikey.keys');
note "before the dump:\n$tables_before";
note "$_: " . ($verdicts_before->{$_} =~ s/^(\S+).*/$1/r) for sort keys %$verdicts_before;

# The verdicts are the interesting ones.
like($verdicts_before->{plain}, qr/^valid /, 'plain key is valid');
like($verdicts_before->{limited}, qr/^valid /, 'limited key is valid');
like($verdicts_before->{revoked}, qr/^revoked /, 'revoked key is revoked');
like($verdicts_before->{rotated}, qr/^expired /, 'key rotated with no grace has expired');
like($verdicts_before->{rotated_new}, qr/^valid /, 'its successor is valid');
like($verdicts_before->{budget}, qr/^valid /, 'key rotated with a grace period is still valid');

# Dump, and restore into a fresh database of a new cluster.
my $dump = $old->basedir . '/app.dump';
my ($dump_out, $dump_err);
ok( IPC::Run::run(
		[ 'pg_dump', '-Fc', '-f', $dump, '-d', $old->connstr('app') ],
		'>', \$dump_out, '2>', \$dump_err),
	'pg_dump -Fc');
# pg_dump orders the data of an extension's configuration tables by their
# foreign keys and warns about any loop, a table's reference to itself
# included.  The rotation links live in apikey.key_lineage, which
# references apikey.keys: no loop, no warning.
is($dump_err, '', 'pg_dump printed no warning at all');
my @data = grep { /TABLE DATA apikey / }
  split /\n/, (run_command([ 'pg_restore', '-l', $dump ]))[0];
my %pos;
$pos{ (split ' ', $data[$_])[-2] } //= $_ for 0 .. $#data;
ok(defined $pos{keys} && defined $pos{key_lineage} && $pos{keys} < $pos{key_lineage},
	'the dump restores apikey.keys before apikey.key_lineage, which references it');

my $new = apikey_node('new', $synchronous);
$new->safe_psql('postgres', 'CREATE DATABASE restored');
my ($stdout, $stderr);
my $ok = IPC::Run::run(
	[ 'pg_restore', '--exit-on-error', '-d', $new->connstr('restored'), $dump ],
	'>', \$stdout, '2>', \$stderr);
ok($ok, 'pg_restore succeeded');
is($stderr, '', 'pg_restore printed no warning or error');

my $tables_after = $new->safe_psql('restored', $tables_sql);
is($tables_after, $tables_before, 'every apikey table holds exactly the same rows');
is($new->safe_psql('restored', q{SELECT extversion FROM pg_extension WHERE extname = 'apikey'}),
	$old->safe_psql('app', q{SELECT extversion FROM pg_extension WHERE extname = 'apikey'}),
	'same extension version');

# The chain: the same rows, hashes included, then the restore's own rows;
# it verifies.
is( $new->safe_psql('restored',
		"SELECT string_agg(a::text, E'\\n' ORDER BY seq) FROM apikey.audit_log a WHERE seq <= $audit_rows"),
	$audit_before, 'every audit row came back unchanged');
is($new->safe_psql('restored', 'SELECT count(*) FROM apikey.audit_verify()'), '0',
	'the restored chain verifies');
# (keys first: the tables that reference it are restored after it)
is( $new->safe_psql('restored',
		"SELECT string_agg(action, ',' ORDER BY seq) FROM apikey.audit_log WHERE seq > $audit_rows"),
	'keys.insert,exposures.insert,key_lineage.insert,key_scopes.insert,prefixes.insert,quotas.insert,revocations.insert,scopes.insert',
	'restoring the key tables appended one row per table');

my $verdicts_after = verdicts($new, 'restored');
for my $name (sort keys %tok)
{
	is($verdicts_after->{$name}, $verdicts_before->{$name},
		"token '$name': same verdict, key, owner, scopes and expiry");
}

# The restored key is usable through authenticate() and binds its owner.
is( $new->safe_psql(
		'restored', qq{
BEGIN;
SELECT apikey.authenticate('$tok{wildcard}', 'orders:refund') = $id{wildcard},
       apikey.current_owner(), apikey.has_scope('billing:read'), apikey.has_scope('billing:write');
COMMIT;}),
	't|acme|t|f',
	'authenticate() binds a restored key with its scopes');

# Rotation links and revocation details survived.
is( $new->safe_psql(
		'restored', qq{
SELECT (SELECT rotated_from FROM apikey.key_status WHERE key_id = $id{rotated_new}),
       (SELECT rotated_from FROM apikey.key_lineage WHERE key_id = $id{budget_new}),
       (SELECT budget_key_id FROM apikey.key_lineage WHERE key_id = $id{budget}),
       (SELECT reason FROM apikey.revocations WHERE key_id = $id{revoked})}),
	"$id{rotated}|$id{budget}|$id{budget_new}|leaked in a ticket",
	'rotated_from, budget_key_id and the revocation reason survived');
# The key in its grace period still draws on its successor's quota: its
# call and the successor's take from one row (5, less 1, less 1).
is( $new->safe_psql(
		'restored', qq{
BEGIN;
SELECT remaining FROM apikey.check('$tok{budget}', NULL, '127.0.0.1');
SELECT remaining FROM apikey.check('$tok{budget_new}', NULL, '127.0.0.1');
ROLLBACK;}),
	"4\n3", 'the restored old key shares the new key\'s quota');

# A new key continues the id sequence: no duplicate key.
my ($next_id) = split /\|/,
  $new->safe_psql('restored',
	q{SELECT key_id || '|' || token FROM apikey.issue('newco', '{orders:read}')});
cmp_ok($next_id, '>', $max_id, "a newly issued key gets id $next_id, after the old maximum $max_id");
my ($rot_id) = split /\|/,
  $new->safe_psql('restored',
	"SELECT key_id || '|' || token FROM apikey.rotate($id{plain})");
cmp_ok($rot_id, '>', $next_id, 'rotate() after restore also gets a fresh id');

# Administrative calls after the restore go on chaining.
$new->safe_psql('restored', "SELECT apikey.revoke($id{wildcard}, 'after the restore')");
is( $new->safe_psql('restored',
		q{SELECT action || ' ' || (details->>'reason') FROM apikey.audit_log ORDER BY seq DESC LIMIT 1}),
	'revoke after the restore', 'a revoke after the restore appends its row');
is($new->safe_psql('restored', 'SELECT count(*) FROM apikey.audit_verify()'), '0',
	'and the chain still verifies');

# Usage keeps accumulating on the restored rows.
$new->safe_psql('restored', 'SELECT apikey.flush_usage()');
my ($before_calls) = $new->safe_psql('restored',
	"SELECT sum(calls) FROM apikey.usage_log WHERE key_id = $id{wildcard}");
$new->safe_psql('restored', "SELECT apikey.verify('$tok{wildcard}'); SELECT apikey.flush_usage()");
is( $new->safe_psql(
		'restored', "SELECT sum(calls) FROM apikey.usage_log WHERE key_id = $id{wildcard}"),
	$before_calls + 1,
	'usage of a restored key is added to its restored usage');

$new->stop;
$old->stop;
done_testing();
