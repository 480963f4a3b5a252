-- apikey.throttle(): a temporary rate limit in shared memory.  Active from
-- the commit (not before, never after a rollback or a rolled-back
-- savepoint), on top of the key's own limits, rate_limited with
-- retry_after when spent, ended by itself; bad input and privileges.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

-- throttle state is kept by key id and ids restart with the extension:
-- give the keys ids of their own
SELECT setval('apikey.keys_id_seq', (extract(epoch FROM clock_timestamp()) * 1000)::bigint) IS NOT NULL AS fresh_ids;
SELECT key_id AS k, token AS t FROM apikey.issue('acme') \gset
SELECT key_id AS k2, token AS t2 FROM apikey.issue('acme') \gset

-- not before commit, not after a rollback
BEGIN;
SELECT apikey.throttle(:k, 2, '1 hour') > now() AS ends_later;
SELECT count(*) FILTER (WHERE (apikey.check(:'t')).code = 'valid') AS valid_before_commit
  FROM generate_series(1, 5);
ROLLBACK;
SELECT count(*) FILTER (WHERE (apikey.check(:'t')).code = 'valid') AS valid_after_rollback
  FROM generate_series(1, 5);
BEGIN;
SAVEPOINT s;
SELECT apikey.throttle(:k, 2, '1 hour') IS NOT NULL AS throttled;
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT count(*) FILTER (WHERE (apikey.check(:'t')).code = 'valid') AS valid_after_savepoint_rollback
  FROM generate_series(1, 5);

-- committed: 2 a minute, then rate_limited with retry_after; other keys untouched
SELECT apikey.throttle(:k, 2, '1 hour') IS NOT NULL AS throttled;
SELECT n, (apikey.check(:'t')).code FROM generate_series(1, 3) n;
SELECT code, retry_after > '0' AND retry_after <= '30 seconds' AS retry_within_30s FROM apikey.check(:'t');
SELECT code FROM apikey.check(:'t2');
-- a released savepoint keeps its throttle
BEGIN;
SAVEPOINT s;
SELECT apikey.throttle(:k2, 1, '1 hour') IS NOT NULL AS throttled;
RELEASE SAVEPOINT s;
COMMIT;
SELECT n, (apikey.check(:'t2')).code FROM generate_series(1, 2) n;

-- it ends by itself
SELECT key_id AS k3, token AS t3 FROM apikey.issue('acme') \gset
SELECT apikey.throttle(:k3, 1, '2 seconds') IS NOT NULL AS throttled;
SELECT n, (apikey.check(:'t3')).code FROM generate_series(1, 2) n;
SELECT pg_sleep(2.1);
SELECT n, (apikey.check(:'t3')).code FROM generate_series(1, 2) n;

-- PREPARE TRANSACTION cannot carry one
BEGIN;
SELECT apikey.throttle(:k3, 1, '1 hour') IS NOT NULL AS throttled;
PREPARE TRANSACTION 'respond_throttle';
SELECT code FROM apikey.check(:'t3');

-- bad input
CREATE FUNCTION respond_throttle_try(stmt text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE stmt;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;
SELECT replace(stmt, :'k', 'K') AS stmt, respond_throttle_try(stmt) FROM (VALUES
	('SELECT apikey.throttle(NULL, 1, ''1 hour'')'),
	('SELECT apikey.throttle(-1, 1, ''1 hour'')'),
	(format('SELECT apikey.throttle(%s, NULL, ''1 hour'')', :k)),
	(format('SELECT apikey.throttle(%s, 0, ''1 hour'')', :k)),
	(format('SELECT apikey.throttle(%s, -5, ''1 hour'')', :k)),
	(format('SELECT apikey.throttle(%s, 1, NULL)', :k)),
	(format('SELECT apikey.throttle(%s, 1, ''0'')', :k)),
	(format('SELECT apikey.throttle(%s, 1, ''-1 minute'')', :k)),
	('SELECT apikey._throttle(NULL, NULL, NULL, NULL)'),
	('SELECT apikey._throttle(1, ''\x00'', 1, now())'),
	('SELECT apikey._throttle(1, apikey.hash(''x''), 0, now())')
) AS c(stmt);

-- privileges: PUBLIC may call neither
CREATE ROLE regress_throttle_user;
SELECT f, has_function_privilege('regress_throttle_user', f, 'EXECUTE') AS public_can_execute
  FROM unnest(ARRAY['apikey.throttle(bigint, integer, interval)',
                    'apikey._throttle(bigint, bytea, integer, timestamptz)']) f;
DROP ROLE regress_throttle_user;
DROP FUNCTION respond_throttle_try(text);
SET client_min_messages = warning;
DROP EXTENSION apikey CASCADE;
RESET client_min_messages;
