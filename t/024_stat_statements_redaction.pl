# Tokens stay out of pg_stat_statements.
#
# pg_stat_statements replaces the constants of plannable statements by $1,
# but with track_utility = on (its default) it stores utility statements as
# written, and pg_read_all_stats can read them.  apikey's ProcessUtility
# hook passes the next hook a copy of the query string with every
# token-shaped span masked in place.  Each kind of utility statement is run
# with a literal token; afterwards no row of pg_stat_statements holds the
# token or any 8 characters in a row of its body, and every statement still
# did its work (the token was verified, the table created, the plan shown).
#
# Hooks chain from the library loaded last, so apikey is listed last; a
# server that lists it earlier warns at start.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use ApikeyTest;

my $node = PostgreSQL::Test::Cluster->new('pgss');
$node->init;
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'pg_stat_statements,apikey'
pg_stat_statements.track_utility = on
});
$node->start;

apikey_db($node);
$node->safe_psql(
	'postgres', q{
CREATE EXTENSION pg_stat_statements;
CREATE TABLE seen (kind text, ok boolean);
CREATE PROCEDURE record(kind text, token text) LANGUAGE plpgsql
  AS $$ BEGIN INSERT INTO seen VALUES (kind, apikey.verify(token)); END $$;
});

my @kinds = qw(do call copy explain ctas prepare declare multi1 multi2);
my %tok = map {
	$_ => $node->safe_psql('postgres', q{SELECT token FROM apikey.issue('acme')})
} @kinds;

$node->safe_psql('postgres', 'SELECT pg_stat_statements_reset()');

my ($ret, $out, $err) = $node->psql(
	'postgres', qq{
DO \$\$ BEGIN INSERT INTO seen VALUES ('do', apikey.verify('$tok{do}')); END \$\$;
CALL record('call', '$tok{call}');
COPY (SELECT 'copy', apikey.verify('$tok{copy}')) TO STDOUT;
EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT apikey.verify('$tok{explain}');
CREATE TABLE ctas AS SELECT apikey.verify('$tok{ctas}') AS ok;
PREPARE p AS SELECT 'prepare', apikey.verify('$tok{prepare}');
EXECUTE p;
BEGIN;
DECLARE c CURSOR FOR SELECT 'declare', apikey.verify('$tok{declare}');
FETCH c;
COMMIT;
});
is($ret, 0, 'every utility statement ran') or diag $err;

# Two statements in one query string (psql -c sends it as one message):
# each is masked within its own part of the string.
$node->command_ok(
	[
		'psql', '-X', '-d', $node->connstr('postgres'), '-c',
		"DO \$\$ BEGIN INSERT INTO seen VALUES ('multi1', apikey.verify('$tok{multi1}')); END \$\$; "
		  . "DO \$\$ BEGIN INSERT INTO seen VALUES ('multi2', apikey.verify('$tok{multi2}')); END \$\$"
	],
	'two DO blocks in one query string');

# The statements did their work.
is($node->safe_psql('postgres', 'SELECT kind, ok FROM seen ORDER BY kind'),
	"call|t\ndo|t\nmulti1|t\nmulti2|t", 'DO and CALL verified their tokens');
like($out, qr/^copy\tt$/m, 'COPY (query) verified its token');
like($out, qr/Result \(actual rows=1(?:\.00)? loops=1\)/, 'EXPLAIN ANALYZE ran the query');
is($node->safe_psql('postgres', 'SELECT ok FROM ctas'), 't',
	'CREATE TABLE AS stored the verdict');
like($out, qr/^prepare\|t$/m, 'PREPARE / EXECUTE verified its token');
like($out, qr/^declare\|t$/m, 'DECLARE / FETCH verified its token');
is( $node->safe_psql(
		'postgres', q{SELECT sum(calls) FROM apikey.key_usage WHERE valid_calls > 0}),
	scalar(@kinds), 'each token was verified once, as valid');

# pg_stat_statements tracked them, and holds no token.
my $rows = $node->safe_psql('postgres',
	q{SELECT query FROM pg_stat_statements ORDER BY query});
for my $start ('DO', 'CALL', 'COPY', 'EXPLAIN', 'CREATE TABLE ctas', 'DECLARE c')
{
	like($rows, qr/^\Q$start\E/m, "pg_stat_statements tracked $start");
}
note $rows;

for my $kind (@kinds)
{
	my $t = $tok{$kind};
	my $body = substr($t, -49);
	is(index($rows, $t), -1, "$kind: the token is not in pg_stat_statements");
	my @seen = grep { index($rows, substr($body, $_, 8)) >= 0 } 0 .. 49 - 8;
	is(scalar(@seen), 0, "$kind: no 8 characters in a row of its body are")
	  or diag "at body offsets @seen";
}
like(
	$rows,
	qr/apikey\.verify\('ak_\.\.\.\*+\Q${\ substr($tok{do}, -4)}\E'\)/,
	'a masked token keeps its length and shows its hint');

# Listed before another library, apikey warns at server start.
$node->adjust_conf('postgresql.conf', 'shared_preload_libraries',
	"'apikey,pg_stat_statements'");
$node->restart;
ok( $node->log_contains(
		qr/WARNING:  apikey is not the last library in shared_preload_libraries/),
	'apikey listed before pg_stat_statements: warning at start');

$node->stop;
done_testing();
