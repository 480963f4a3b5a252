# The set-up every TAP test here repeats, and nothing else: a cluster with
# apikey preloaded, a database with the extension, and the table of tokens
# the tests keep on the server (so no token appears in a query text, and so
# none reaches a test's log).
#
# Found through the -I t that the Makefile adds to PG_PROVE_FLAGS (prove
# runs in the source directory).
package ApikeyTest;

use strict;
use warnings;

use Exporter 'import';
use PostgreSQL::Test::Cluster;

our @EXPORT = qw(apikey_node apikey_db token_table wait_for_writer);

# A started cluster with apikey preloaded (a usage writer starts in each
# database where the extension is created), and the failure limiter off
# (the tests assert client addresses far past 30 failures a minute; as in
# apikey.conf).
# $conf: more postgresql.conf lines, which win over these (a later line
# wins); %init: parameters of init(), such as allows_streaming.
sub apikey_node
{
	my ($name, $conf, %init) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%init);
	$node->append_conf(
		'postgresql.conf', "shared_preload_libraries = 'apikey'\n"
		  . "apikey.failure_limit = 0\n"
		  . ($conf // ''));
	$node->start;
	return $node;
}

# Database $db (default postgres, which exists; any other is created) with
# the extension installed.
sub apikey_db
{
	my ($node, $db) = @_;
	$db //= 'postgres';
	$node->safe_psql('postgres', "CREATE DATABASE $db") if $db ne 'postgres';
	$node->safe_psql($db, 'CREATE EXTENSION apikey');
	return;
}

# In $db (default postgres): table tok of tokens by name, with tok(name)
# for a token and kid(name) for its key id, to use in SQL.
sub token_table
{
	my ($node, $db) = @_;
	$node->safe_psql(
		$db // 'postgres', q{
CREATE TABLE tok (name text PRIMARY KEY, key_id bigint, token text);
CREATE FUNCTION tok(n text) RETURNS text LANGUAGE sql STABLE AS 'SELECT token FROM tok WHERE name = n';
CREATE FUNCTION kid(n text) RETURNS bigint LANGUAGE sql STABLE AS 'SELECT key_id FROM tok WHERE name = n';
});
	return;
}

# Wait until database $db (default postgres) has its usage writer, running:
# until then calls there are written as pending rows, not counted in shared
# memory.  The writer waits on its latch (wait event type Extension) only
# once it serves the database.
sub wait_for_writer
{
	my ($node, $db) = @_;
	$db //= 'postgres';
	$node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'apikey usage writer' "
		  . "AND datname = '$db' AND wait_event_type = 'Extension'")
	  or die "no usage writer in database $db";
	return;
}

1;
