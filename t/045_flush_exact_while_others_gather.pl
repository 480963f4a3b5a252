# apikey.flush_usage() writes every call made before it, even while other
# sessions (of another database here) read apikey.live_usage or
# apikey.stats at the same moment.  Both readers and flushers gather the
# counts of every backend slot into the shared table; a count a reader had
# taken out of a slot but not yet put into the table was invisible to a
# flush, so the flush could end without it (and a usage writer leaving its
# database, or the last flush at shutdown, could leave it behind).
#
# Database app verifies 5 times, flushes, and compares usage_log with the
# calls made so far, 300 times, while two sessions in database other read
# live usage as fast as they can.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use ApikeyTest;

my $node = apikey_node('gather', "apikey.usage_flush_interval = '1h'\n");
apikey_db($node, 'app');
apikey_db($node, 'other');
token_table($node, 'app');
$node->safe_psql('app',
	q{INSERT INTO tok SELECT 'k', key_id, token FROM apikey.issue(owner => 'acme')});
$node->poll_query_until('postgres',
	q{SELECT count(*) = 2 FROM pg_stat_activity WHERE backend_type = 'apikey usage writer'})
  or die 'no usage writers';

# Two readers in other, each gathering every slot in a loop for up to 120 s.
my @readers;
for my $view ('apikey.live_usage', 'apikey.stats')
{
	my ($out, $err) = ('', '');
	push @readers,
	  IPC::Run::start(
		[
			'psql', '-XAtq', '-d', $node->connstr('other'), '-c',
			"DO \$\$ BEGIN WHILE clock_timestamp() < now() + interval '120 s' LOOP "
			  . "PERFORM count(*) FROM $view; END LOOP; END \$\$"
		],
		'>', \$out, '2>', \$err);
}
$node->poll_query_until('postgres',
	q{SELECT count(*) = 2 FROM pg_stat_activity WHERE datname = 'other' AND query LIKE 'DO %'})
  or die 'the readers did not start';

# Rounds where usage_log, right after flush_usage(), held fewer calls than
# were made before it.
$node->safe_psql(
	'app', q{
CREATE FUNCTION rounds_short(n int) RETURNS int LANGUAGE plpgsql AS $$
DECLARE
	made bigint := 0;
	logged bigint;
	short int := 0;
BEGIN
	FOR i IN 1 .. n LOOP
		PERFORM apikey.check(tok('k')) FROM generate_series(1, 5);
		made := made + 5;
		PERFORM apikey.flush_usage();
		SELECT coalesce(sum(calls), 0) INTO logged FROM apikey.usage_log;
		IF logged < made THEN
			short := short + 1;
		END IF;
	END LOOP;
	RETURN short;
END $$;
});
is($node->safe_psql('app', 'SELECT rounds_short(300)'),
	'0', 'after every flush_usage(), usage_log holds every call made before it');

$node->safe_psql('app', 'SELECT apikey.flush_usage()');
is($node->safe_psql('app', 'SELECT sum(calls) FROM apikey.usage_log'),
	'1500', 'and 1,500 calls in all, none twice');

$node->safe_psql('postgres',
	q{SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'other' AND query LIKE 'DO %'});
$_->finish for @readers;

done_testing();
