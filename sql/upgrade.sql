-- Extension upgrades: install 1.0, use it, ALTER EXTENSION UPDATE, and
-- check that data survives and the result equals a fresh install.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey VERSION '1.0';
RESET client_min_messages;

SELECT extversion FROM pg_extension WHERE extname = 'apikey';
-- 1.1's objects are not there yet
SELECT to_regproc('apikey.revoke_owner') IS NULL AS no_revoke_owner,
       to_regclass('apikey.key_status') IS NULL AS no_key_status;

INSERT INTO apikey.scopes VALUES ('orders:read');
SELECT key_id AS k1, token AS t1 FROM apikey.issue(owner => 'acme', scopes => '{orders:read}') \gset
SELECT key_id AS k2, token AS t2 FROM apikey.issue(owner => 'acme') \gset
SELECT key_id AS k3, token AS t3 FROM apikey.issue(owner => 'globex') \gset
SELECT apikey.revoke(:k2, 'before upgrade');

-- the members of the extension before the update
CREATE TEMP TABLE members_10 AS
SELECT pg_describe_object(classid, objid, objsubid) AS member
  FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'apikey');

-- a monitoring role granted what stats needs under 1.0
CREATE ROLE regress_upgrade_monitor;
GRANT SELECT ON apikey.stats TO regress_upgrade_monitor;
GRANT EXECUTE ON FUNCTION apikey._stats() TO regress_upgrade_monitor;

ALTER EXTENSION apikey UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'apikey';

-- it still reads apikey.stats, whose 1.2 columns have a function each
SET ROLE regress_upgrade_monitor;
SELECT shared_memory, tokens_redacted >= 0 AS has_tokens_redacted,
       failure_networks_untracked >= 0 AS has_failure_networks_untracked,
       writer_heartbeat IS NULL OR writer_heartbeat <= clock_timestamp() AS has_writer_heartbeat FROM apikey.stats;
-- and the per-code view added with it
SELECT count(*) > 0 AS reads_stats_by_code FROM apikey.stats_by_code;
RESET ROLE;
DROP OWNED BY regress_upgrade_monitor;
DROP ROLE regress_upgrade_monitor;

-- keys issued under 1.0 behave exactly as before
SELECT code FROM apikey.check(:'t1', 'orders:read');
SELECT code FROM apikey.check(:'t2');
SELECT code FROM apikey.check(:'t3');

-- what 1.1 adds
SELECT key_id = :k2 AS is_k2, status, revoked_reason FROM apikey.key_status WHERE status = 'revoked';
SELECT apikey.revoke_owner('acme', 'tenant compromised');   -- k1 only: k2 already was
SELECT apikey.revoke_owner('acme');                         -- nothing left
SELECT code FROM apikey.check(:'t1');
SELECT code FROM apikey.check(:'t3');
SELECT owner, status, count(*) FROM apikey.key_status GROUP BY 1, 2 ORDER BY 1, 2;
SELECT apikey.revoke_owner('');

-- 1.1 only adds: nothing 1.0 had is gone
SELECT member FROM members_10
EXCEPT
SELECT pg_describe_object(classid, objid, objsubid)
  FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'apikey');

-- an updated install has the same members and privileges as a fresh one
CREATE TEMP TABLE members_upgraded AS
SELECT pg_describe_object(classid, objid, objsubid) AS member
  FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'apikey');
CREATE TEMP TABLE acl_upgraded AS
SELECT p.oid::regprocedure::text AS fn, p.proacl::text AS acl
  FROM pg_proc p WHERE p.pronamespace = 'apikey'::regnamespace;
SET client_min_messages = warning;
DROP EXTENSION apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
SELECT count(*) > 0 AS has_members FROM members_upgraded;
(SELECT member FROM members_upgraded
 EXCEPT
 SELECT pg_describe_object(classid, objid, objsubid)
   FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
    AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'apikey'))
UNION ALL
(SELECT pg_describe_object(classid, objid, objsubid)
   FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
    AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'apikey')
 EXCEPT
 SELECT member FROM members_upgraded);
SELECT a.fn, a.acl AS upgraded, p.proacl::text AS fresh
  FROM acl_upgraded a JOIN pg_proc p ON p.oid::regprocedure::text = a.fn
 WHERE a.acl IS DISTINCT FROM p.proacl::text;

-- 1.1 -> 1.2: keys issued under 1.1 can be suspended, quarantined,
-- reissued and throttled after the update, and apikey.stats gains its
-- failure limiter column.
SET client_min_messages = warning;
DROP EXTENSION apikey CASCADE;
CREATE EXTENSION apikey VERSION '1.1';
RESET client_min_messages;
SELECT to_regproc('apikey.suspend') IS NULL AS no_suspend,
       to_regclass('apikey.suspensions') IS NULL AS no_suspensions;
INSERT INTO apikey.scopes VALUES ('orders:read'), ('orders:write');
SELECT key_id AS k11, token AS t11 FROM apikey.issue(owner => 'acme', scopes => '{orders:read,orders:write}') \gset
SELECT key_id AS k12, token AS t12 FROM apikey.issue(owner => 'acme', scopes => '{orders:read}') \gset
-- a rotation made under 1.1, linked by keys.rotated_from
SELECT key_id AS k13 FROM apikey.issue(owner => 'initech') \gset
SELECT key_id AS k14 FROM apikey.rotate(:k13) \gset
ALTER EXTENSION apikey UPDATE TO '1.2';
SELECT extversion FROM pg_extension WHERE extname = 'apikey';
-- its link moved to apikey.key_lineage; keys no longer references itself
SELECT l.key_id = :k14 AS is_k14, l.rotated_from = :k13 AS from_k13, l.budget_key_id IS NULL AS own_budget
  FROM apikey.key_lineage l;
SELECT rotated_from = :k13 AS status_rotated_from FROM apikey.key_status WHERE key_id = :k14;
SELECT count(*) AS link_columns_in_keys FROM pg_attribute
 WHERE attrelid = 'apikey.keys'::regclass AND attname IN ('rotated_from', 'budget_key_id') AND NOT attisdropped;
SELECT code FROM apikey.check(:'t11', 'orders:write');
SELECT apikey.suspend(:k11, 'after the update');
SELECT code FROM apikey.check(:'t11', 'orders:write');
SELECT apikey.resume(:k11);
SELECT apikey.quarantine(:k11, '{orders:read}', 'after the update');
SELECT code FROM apikey.check(:'t11', 'orders:write');
SELECT code FROM apikey.check(:'t11', 'orders:read');
SELECT key_id = :k11 AS is_k11, status FROM apikey.key_status ORDER BY key_id;
SELECT count(*) AS reissued FROM apikey.reissue(:k11);
SELECT code FROM apikey.check(:'t11', 'orders:read');
SELECT failure_networks_untracked IS NOT NULL AS has_failure_column FROM apikey.stats;
SELECT apikey.throttle(:k12, 1000, '1 second') > now() AS throttled;
-- Grants made after the update are recorded in a table pg_dump keeps, and
-- the monitor set covers key_status.
CREATE ROLE regress_upgrade_monitor;
SELECT apikey.grant_monitor('regress_upgrade_monitor') AS granted;
SELECT has_table_privilege('regress_upgrade_monitor', 'apikey.key_status', 'SELECT') AS monitor_reads_key_status;
SELECT 'apikey.role_grants'::regclass = ANY (extconfig) AS role_grants_dumped FROM pg_extension WHERE extname = 'apikey';
SET client_min_messages = warning;
DROP EXTENSION apikey CASCADE;
RESET client_min_messages;
DROP ROLE regress_upgrade_monitor;
