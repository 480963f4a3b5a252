# Usage counted in shared memory is outside the caller's transaction: calls
# made in a transaction that rolls back, or that an error aborts (including
# authenticate() raising), are still written to apikey.usage_log by the
# usage writer; a call in a transaction that is still open is written
# before it ends.  The quota debit, by contrast, rolls back.
#
# Tokens stay in a table on the server: no token appears in a query text.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = apikey_node('rollback', "apikey.usage_flush_interval = '200ms'\n");
apikey_db($node);
wait_for_writer($node);
token_table($node);
$node->safe_psql(
	'postgres', q{
INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
INSERT INTO tok SELECT 'good', key_id, token FROM apikey.issue(owner => 'acme', scopes => '{orders:read}');
INSERT INTO tok SELECT 'gone', key_id, token FROM apikey.issue(owner => 'acme');
INSERT INTO tok SELECT 'quota', key_id, token FROM apikey.issue(owner => 'acme', quota => 10);
SELECT apikey.revoke(key_id) FROM tok WHERE name = 'gone';
});

# What usage_log holds, per key name and code.
my $usage_query = q{
SELECT coalesce(string_agg(n || ':' || code || ':' || c, ' ' ORDER BY n, code), '')
  FROM (SELECT coalesce(t.name, '-') AS n, u.code, sum(u.calls) AS c
          FROM apikey.usage_log u LEFT JOIN tok t ON t.key_id = u.key_id
         GROUP BY 1, 2) s};

# 1. A transaction that rolls back.
$node->safe_psql(
	'postgres', q{
BEGIN;
SELECT apikey.check(tok('good'));
SELECT apikey.verify(tok('good'));
SELECT apikey.check(tok('good'), 'orders:write');
SELECT apikey.check(tok('gone'));
SELECT apikey.check('garbage');
ROLLBACK;
});

# 2. authenticate() raising aborts the transaction; so does an error after
#    a successful authenticate().
my ($ret, $out, $err) = $node->psql(
	'postgres', q{
BEGIN;
SELECT apikey.authenticate(tok('gone'));
SELECT 1;
ROLLBACK;
}, on_error_stop => 0);
like($err, qr/API key has been revoked/, 'authenticate() raised for the revoked key');
like($err, qr/current transaction is aborted/, 'and aborted the transaction');
($ret, $out, $err) = $node->psql(
	'postgres', q{
BEGIN;
SELECT apikey.authenticate(tok('good'), 'orders:read') IS NOT NULL;
SELECT 1 / 0;
COMMIT;
}, on_error_stop => 0);
like($err, qr/division by zero/, 'a transaction with a valid authenticate() failed later');

# 3. A quota debit rolls back, its usage does not.
$node->safe_psql(
	'postgres', q{
BEGIN;
SELECT apikey.check(tok('quota'));
ROLLBACK;
});
is($node->safe_psql('postgres',
		q{SELECT remaining FROM apikey.quotas WHERE key_id = (SELECT key_id FROM tok WHERE name = 'quota')}),
	'10', 'the quota debit rolled back');

# All of it reaches usage_log, without anyone calling flush_usage().
my $expected = '-:malformed:1 gone:revoked:2 good:scope_denied:1 good:valid:3 quota:valid:1';
ok($node->poll_query_until('postgres', $usage_query, $expected),
	'calls of rolled-back and aborted transactions are in usage_log');

# 4. A call in a transaction that is still open is written while it is open.
my $open = $node->background_psql('postgres');
$open->query_safe('BEGIN');
is($open->query_safe(q{SELECT code FROM apikey.check(tok('good'))}), 'valid', 'call in an open transaction');
ok( $node->poll_query_until(
		'postgres', $usage_query,
		'-:malformed:1 gone:revoked:2 good:scope_denied:1 good:valid:4 quota:valid:1'),
	'written while the calling transaction is still open');
$open->query_safe('ROLLBACK');
$open->quit;

# 5. flush_usage() has the writer flush, in a transaction of its own: the
#    caller's transaction rolling back neither loses nor repeats anything.
$node->safe_psql('postgres',
	q{SELECT apikey.check(tok('good')) FROM generate_series(1, 5)});
$node->safe_psql('postgres', q{
BEGIN;
SELECT apikey.flush_usage();
ROLLBACK;
});
ok( $node->poll_query_until(
		'postgres', $usage_query,
		'-:malformed:1 gone:revoked:2 good:scope_denied:1 good:valid:9 quota:valid:1'),
	'a rolled-back flush loses nothing');
ok($node->poll_query_until('postgres', 'SELECT entries_pending = 0 FROM apikey.stats'),
	'nothing left pending');
$node->safe_psql('postgres', 'SELECT apikey.flush_usage()');
is($node->safe_psql('postgres', $usage_query),
	'-:malformed:1 gone:revoked:2 good:scope_denied:1 good:valid:9 quota:valid:1',
	'and nothing is written twice');
is( $node->safe_psql(
		'postgres', q{
SELECT (calls->>'valid') || ' ' || (calls->>'revoked') || ' ' || (calls->>'scope_denied')
       || ' ' || (calls->>'malformed') || ' ' || flush_errors FROM apikey.stats}),
	'10 2 1 1 0', 'apikey.stats agrees, and no flush failed');

$node->stop;
done_testing();
