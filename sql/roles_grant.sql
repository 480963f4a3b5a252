--
-- roles_grant: grant_admin(), grant_monitor() and grant_reporter() give a
-- role a defined set, record it in apikey.role_grants, and _regrant()
-- (which every upgrade script runs last) gives recorded roles the objects
-- an upgrade adds to their set.  Before, grants were run by hand, and the
-- README's monitor role could not read key_status.
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

CREATE ROLE regress_roles_admin;
CREATE ROLE regress_roles_monitor;
CREATE ROLE regress_roles_reporter;
CREATE ROLE regress_roles_nobody;
CREATE ROLE regress_roles_super SUPERUSER;
INSERT INTO apikey.scopes (name) VALUES ('orders:read');
-- A statement's outcome: ok, or its SQLSTATE and message.
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE q;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;

-- Nothing is granted by default.
SELECT has_table_privilege('regress_roles_monitor', 'apikey.key_status', 'SELECT') AS monitor_reads_key_status;

-- Grant: true the first time, false (and nothing changes) the second.
SELECT apikey.grant_admin('regress_roles_admin') AS first, apikey.grant_admin('regress_roles_admin') AS again;
SELECT apikey.grant_monitor('regress_roles_monitor') AS first, apikey.grant_monitor('regress_roles_monitor') AS again;
SELECT apikey.grant_reporter('regress_roles_reporter') AS first, apikey.grant_reporter('regress_roles_reporter') AS again;
SELECT role, kind, granted_by = current_user AS by_me FROM apikey.role_grants ORDER BY kind;

-- The monitor reads every monitoring view, key_status included, and the
-- keys' id, owner and name; not hashes, not the audit trail.
SELECT apikey.issue('acme', '{orders:read}', 'backend') IS NOT NULL AS issued;
SET ROLE regress_roles_monitor;
SELECT owner, status FROM apikey.key_status;
SELECT count(*) AS stats_rows FROM apikey.stats;
SELECT count(*) AS live_usage_rows FROM apikey.live_usage;
SELECT count(*) AS key_usage_rows FROM apikey.key_usage;
SELECT count(*) AS usage_log_rows FROM apikey.usage_log;
SELECT owner, name FROM apikey.keys;
SELECT hash FROM apikey.keys;
SELECT count(*) FROM apikey.audit;
SELECT apikey.issue('acme');
RESET ROLE;

-- The admin runs every administrative function an operator runs, reads
-- the key tables but not hashes, and cannot hand out roles itself.
SET ROLE regress_roles_admin;
SELECT key_id AS admin_key FROM apikey.issue('globex', '{orders:read}') \gset
SELECT apikey.suspend(:admin_key, 'investigating') AS suspended, apikey.resume(:admin_key) AS resumed;
SELECT apikey.throttle(:admin_key, 10, '1 minute') IS NOT NULL AS throttled;
SELECT apikey.revoke(:admin_key, 'done') AS revoked;
SELECT owner, status FROM apikey.key_status ORDER BY owner;
SELECT hash FROM apikey.keys;
SELECT apikey.grant_monitor('regress_roles_nobody');
RESET ROLE;
-- What the admin may not run (the owner's side, or the reporter's):
SELECT p.oid::regprocedure AS admin_may_not_execute
  FROM pg_proc p
 WHERE p.pronamespace = 'apikey'::regnamespace AND p.proname !~ '^_'
   AND NOT has_function_privilege('regress_roles_admin', p.oid, 'EXECUTE')
 ORDER BY p.oid::regprocedure::text COLLATE "C";

-- The reporter is a member of apikey_reporter.
SELECT pg_has_role('regress_roles_reporter', 'apikey_reporter', 'MEMBER') AS reporter_member;

-- Only the extension's owner (a superuser) or a superuser may grant, even
-- given EXECUTE; fail closed.
GRANT EXECUTE ON FUNCTION apikey.grant_admin(regrole) TO regress_roles_nobody;
SET ROLE regress_roles_nobody;
SELECT pg_temp.try($$SELECT apikey.grant_admin('regress_roles_nobody')$$) AS nobody_grants;
RESET ROLE;
REVOKE EXECUTE ON FUNCTION apikey.grant_admin(regrole) FROM regress_roles_nobody;

-- Bad input, each with its SQLSTATE.
SELECT q, pg_temp.try(q) AS result
  FROM (VALUES ($$SELECT apikey.grant_monitor(NULL)$$),
			   ($$SELECT apikey.grant_monitor('-')$$),
			   ($$SELECT apikey.grant_monitor('regress_roles_super')$$),
			   ($$SELECT apikey.grant_monitor('regress_roles_no_such_role')$$),
			   ($$SELECT apikey.revoke_admin(NULL)$$)) v(q);

-- An upgrade adds a monitoring view: the way an upgrade script does it,
-- the object joins the monitor set and _regrant() runs last.  The
-- recorded monitor gets it without anyone granting it by hand.
CREATE VIEW apikey.regress_new_view AS SELECT 1 AS one;
INSERT INTO apikey._grant_sets (kind, privilege, object)
VALUES ('monitor', 'SELECT', 'TABLE apikey.regress_new_view');
SELECT has_table_privilege('regress_roles_monitor', 'apikey.regress_new_view', 'SELECT') AS before_regrant;
SELECT apikey._regrant() AS regranted;
SELECT has_table_privilege('regress_roles_monitor', 'apikey.regress_new_view', 'SELECT') AS after_regrant,
       has_table_privilege('regress_roles_admin', 'apikey.regress_new_view', 'SELECT') AS admin_too;

-- A restore puts the rows back after CREATE EXTENSION (pg_dump leaves out
-- privileges an extension script granted): inserting a row grants its set.
DELETE FROM apikey.role_grants WHERE role = 'regress_roles_monitor'::regrole;
REVOKE SELECT ON apikey.regress_new_view, apikey.key_status FROM regress_roles_monitor;
INSERT INTO apikey.role_grants (role, kind, granted_by) VALUES ('regress_roles_monitor', 'monitor', 'postgres');
SELECT has_table_privilege('regress_roles_monitor', 'apikey.regress_new_view', 'SELECT') AS restored_new_view,
       has_table_privilege('regress_roles_monitor', 'apikey.key_status', 'SELECT') AS restored_key_status;
DELETE FROM apikey._grant_sets WHERE object = 'TABLE apikey.regress_new_view';
DROP VIEW apikey.regress_new_view;

-- Revoke: a privilege another recorded grant of the role lists stays.
SELECT apikey.grant_monitor('regress_roles_admin') AS admin_also_monitor;
SELECT apikey.revoke_monitor('regress_roles_admin') AS revoked, apikey.revoke_monitor('regress_roles_admin') AS again;
SELECT has_table_privilege('regress_roles_admin', 'apikey.key_status', 'SELECT') AS admin_keeps_key_status,
       has_table_privilege('regress_roles_admin', 'apikey.stats', 'SELECT') AS admin_loses_stats;
SELECT apikey.revoke_admin('regress_roles_admin'), apikey.revoke_monitor('regress_roles_monitor'),
       apikey.revoke_reporter('regress_roles_reporter');
SELECT count(*) AS recorded FROM apikey.role_grants;
SELECT pg_has_role('regress_roles_reporter', 'apikey_reporter', 'MEMBER') AS reporter_member;
SET ROLE regress_roles_monitor;
SELECT count(*) FROM apikey.key_status;
RESET ROLE;

-- A recorded role dropped since (DROP OWNED BY first) is skipped with a
-- WARNING, by _regrant() and by a restored row, so neither fails.
CREATE ROLE regress_roles_gone;
SELECT apikey.grant_monitor('regress_roles_gone') AS granted;
DROP OWNED BY regress_roles_gone;
DROP ROLE regress_roles_gone;
\set VERBOSITY terse
SELECT apikey._regrant() AS regranted;
\set VERBOSITY default
DELETE FROM apikey.role_grants WHERE NOT EXISTS (SELECT FROM pg_roles r WHERE r.oid = role);

-- Every call wrote its audit row, naming the role.
SELECT action, details->>'role' AS role, details->>'changed' AS changed
  FROM apikey.audit_log WHERE action ~ '^(grant|revoke)_(admin|monitor|reporter)$' ORDER BY seq;

-- Clean up.
SET client_min_messages = warning;
DROP EXTENSION apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
DROP ROLE regress_roles_admin, regress_roles_monitor, regress_roles_reporter, regress_roles_nobody, regress_roles_super;

-- The rule for upgrade scripts: from 1.2 on, each one's last statement
-- re-applies the recorded grants, so a role granted a set gets what the
-- upgrade adds to it.  Checked on the installed scripts (none listed).
SELECT f AS upgrade_script_not_ending_in_regrant
  FROM pg_ls_dir((SELECT setting FROM pg_config WHERE name = 'SHAREDIR') || '/extension') AS f
 WHERE f ~ '^apikey--[0-9.]+--[0-9.]+\.sql$' AND f <> 'apikey--1.0--1.1.sql'
   AND rtrim(pg_read_file((SELECT setting FROM pg_config WHERE name = 'SHAREDIR') || '/extension/' || f), E'\n')
       NOT LIKE '%SELECT apikey._regrant();'
 ORDER BY 1;
SELECT count(*) >= 1 AS scripts_checked
  FROM pg_ls_dir((SELECT setting FROM pg_config WHERE name = 'SHAREDIR') || '/extension') AS f
 WHERE f ~ '^apikey--[0-9.]+--[0-9.]+\.sql$' AND f <> 'apikey--1.0--1.1.sql';
