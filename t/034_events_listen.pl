# Events you can LISTEN to, on a preloaded cluster: a session LISTENing on
# apikey_events is told the seq of a suspension committed in another
# session (and of nothing a rolled-back transaction wrote), and the
# background worker's periodic pass (apikey.events_interval) writes
# key.expiring for a key that expires within 7 days, once, with its NOTIFY.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use ApikeyTest;

my $node = apikey_node('events',
	"apikey.usage_flush_interval = '100ms'\napikey.events_interval = '1s'\n");
apikey_db($node);
token_table($node);

# Every notification the listener has received since it last asked, as
# payloads; waits up to $secs for at least $want of them.
my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN apikey_events');
sub notifications
{
	my ($want, $secs) = @_;
	my @got;
	for (my $i = 0; $i < $secs * 10; $i++)
	{
		my $out = $listener->query_safe('SELECT 1');
		push @got, $out =~ /Asynchronous notification "apikey_events" with payload "(\d+)"/g;
		last if @got >= $want;
		usleep(100_000);
	}
	return @got;
}

$node->safe_psql('postgres',
	q{INSERT INTO tok SELECT 'a', key_id, token FROM apikey.issue('acme')});

# A suspension committed in another session: its event's seq arrives.
$node->safe_psql('postgres', q{SELECT apikey.suspend(kid('a'), 'credential stuffing')});
my $seq = $node->safe_psql('postgres',
	q{SELECT seq FROM apikey.events WHERE kind = 'key.suspended' AND key_id = kid('a')});
like($seq, qr/^\d+$/, 'the suspension wrote one key.suspended event');
is_deeply([ notifications(1, 10) ], [$seq], 'the listener got its seq at commit');

# A rolled-back resume: no row, no notification.
$node->safe_psql('postgres',
	q{BEGIN; SELECT apikey.resume(kid('a'), 'oops'); ROLLBACK;});
is_deeply([ notifications(1, 2) ], [], 'a rolled-back change notifies nobody');
is($node->safe_psql('postgres', q{SELECT count(*) FROM apikey.events WHERE kind = 'key.resumed'}),
	'0', 'and leaves no event');

# The worker's pass: a key expiring in 2 days gets key.expiring (7 days)
# once, without anyone calling run_events().
$node->safe_psql('postgres',
	q{BEGIN;
	  INSERT INTO tok SELECT 'x', key_id, token FROM apikey.issue('acme', expires_at => now() + interval '2 days');
	  UPDATE apikey.keys SET created_at = now() - interval '30 days' WHERE id = kid('x');   -- a long-lived key
	  COMMIT;});
ok( $node->poll_query_until(
		'postgres',
		q{SELECT count(*) = 1 FROM apikey.events WHERE kind = 'key.expiring' AND key_id = kid('x')}),
	'the worker wrote key.expiring');
my $xseq = $node->safe_psql('postgres',
	q{SELECT seq FROM apikey.events WHERE kind = 'key.expiring' AND key_id = kid('x')});
is_deeply([ notifications(1, 10) ], [$xseq], 'the listener got the worker\'s event');
is( $node->safe_psql('postgres',
		q{SELECT payload->>'within', severity FROM apikey.events WHERE seq = } . $xseq),
	'7 days|info', 'its payload says within 7 days');
is($node->safe_psql('postgres', q{SELECT count(*) FROM apikey.audit_log WHERE action = 'run_events'}),
	'0', 'nobody called run_events()');

# Several more passes later, still once.
sleep(3);
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM apikey.events WHERE kind = 'key.expiring'}),
	'1', 'later passes say nothing new');
is_deeply([ notifications(1, 1) ], [], 'and notify nobody');

$listener->quit;
$node->stop;
done_testing();
