--
-- binding_parallel: the helpers are PARALLEL SAFE, so a policy that uses
-- them keeps parallel scans; the binding reaches the workers with the rest
-- of the leader's settings.  With parallel_leader_participation off, every
-- row of a parallel scan is filtered by a worker: if the workers did not see
-- the binding, the counts below would be 0.
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

SELECT proname, proparallel FROM pg_proc
 WHERE pronamespace = 'apikey'::regnamespace
   AND proname IN ('current_key_id', 'current_owner', 'has_scope', 'require_scope')
 ORDER BY proname;

INSERT INTO apikey.scopes (name) VALUES ('orders:read');
SELECT key_id AS ka, token AS ta FROM apikey.issue(owner => 'acme', scopes => '{orders:read}') \gset
SELECT key_id AS kb, token AS tb FROM apikey.issue(owner => 'globex', scopes => '{orders:read}') \gset
SELECT key_id AS kn, token AS tn FROM apikey.issue(owner => 'acme') \gset

CREATE ROLE regress_parallel_app;
CREATE TABLE par_orders (tenant text NOT NULL, id int NOT NULL, amount int NOT NULL);
-- acme: 1000 rows, globex: 2000 rows
INSERT INTO par_orders
SELECT CASE WHEN g % 3 = 0 THEN 'acme' ELSE 'globex' END, g, g % 100
  FROM generate_series(1, 3000) g;
ANALYZE par_orders;
ALTER TABLE par_orders ENABLE ROW LEVEL SECURITY;
ALTER TABLE par_orders FORCE ROW LEVEL SECURITY;
CREATE POLICY par_orders_read ON par_orders FOR SELECT
	USING (tenant = apikey.current_owner() AND apikey.has_scope('orders:read'));
GRANT SELECT ON par_orders TO regress_parallel_app;

-- Did the last parallel query launch workers, and how many rows did they
-- return?  (EXPLAIN ANALYZE's numbers, reduced to what does not vary.)
CREATE FUNCTION parallel_run(q text, OUT workers_launched boolean, OUT rows_from_workers bigint)
LANGUAGE plpgsql AS $$
DECLARE
	plan json;
	gather json;
BEGIN
	EXECUTE 'EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF, FORMAT JSON) ' || q INTO plan;
	gather := plan -> 0 -> 'Plan';
	WHILE gather ->> 'Node Type' NOT IN ('Gather', 'Gather Merge') LOOP
		gather := gather -> 'Plans' -> 0;
	END LOOP;
	workers_launched := (gather ->> 'Workers Launched')::int > 0;
	rows_from_workers := (gather ->> 'Actual Rows')::numeric::bigint;	-- 18 prints 1000.00
END
$$;
GRANT EXECUTE ON FUNCTION parallel_run(text) TO regress_parallel_app;

-- A plan as text, in PostgreSQL 18's notation on every release: 15 prints
-- init plans as "InitPlan 1 (returns $0)" read as $0, 17 and later as
-- "InitPlan 1" read as (InitPlan 1).col1, without "Params Evaluated".
CREATE FUNCTION plan_text(q text) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
	line text;
BEGIN
	FOR line IN EXECUTE 'EXPLAIN (COSTS OFF) ' || q LOOP
		CONTINUE WHEN line ~ '^\s*Params Evaluated:';
		line := regexp_replace(line, 'InitPlan (\d+) \(returns \$\d+\)', 'InitPlan \1');
		line := replace(replace(line, '$0', '(InitPlan 1).col1'), '$1', '(InitPlan 2).col1');
		RETURN NEXT line;
	END LOOP;
END
$$;
GRANT EXECUTE ON FUNCTION plan_text(text) TO regress_parallel_app;

-- debug_parallel_query was force_parallel_mode until 16
SELECT CASE WHEN current_setting('server_version_num')::int >= 160000
			THEN 'debug_parallel_query' ELSE 'force_parallel_mode' END AS force_parallel \gset

SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
SET parallel_leader_participation = off;
SET ROLE regress_parallel_app;

-- The helpers are evaluated once, in the leader, as init plans whose
-- values the workers receive; the policy's quals stay inside the parallel
-- scan.
SELECT * FROM plan_text('SELECT tenant, id FROM par_orders');
-- A helper whose argument depends on the row stays a per-row call.
SELECT * FROM plan_text($$SELECT id FROM par_orders
 WHERE apikey.has_scope(CASE WHEN id > 0 THEN 'orders:read' END)$$);

-- A transaction binding: same rows serially and in parallel.
BEGIN;
SELECT apikey.authenticate(:'ta') = :ka AS a;
SET LOCAL max_parallel_workers_per_gather = 0;
SELECT tenant, count(*), sum(amount) FROM par_orders GROUP BY tenant;
SET LOCAL max_parallel_workers_per_gather = 2;
SET LOCAL :force_parallel = on;
SELECT tenant, count(*), sum(amount) FROM par_orders GROUP BY tenant;
SELECT * FROM parallel_run('SELECT tenant, id FROM par_orders');
-- the helpers themselves, evaluated in workers
SELECT * FROM parallel_run($$SELECT id FROM par_orders WHERE apikey.current_owner() = 'acme'
	AND apikey.current_key_id() IS NOT NULL AND apikey.has_scope('orders:read')$$);
-- ... and called per row inside the workers, where the binding arrives
-- with the leader's settings
SELECT * FROM parallel_run($$SELECT id FROM par_orders
	WHERE apikey.has_scope(CASE WHEN id > 0 THEN 'orders:read' END)$$);
SELECT * FROM parallel_run($$SELECT id FROM par_orders
	WHERE apikey.has_scope(CASE WHEN id > 0 THEN 'orders:write' END)$$);
COMMIT;

-- Without a binding the workers see none either.
SET :force_parallel = on;
SELECT count(*) FROM par_orders;
SELECT * FROM parallel_run('SELECT tenant, id FROM par_orders');

-- A session binding reaches the workers, and a transaction binding
-- overrides it there too.
SELECT apikey.authenticate(:'tb', session => true) = :kb AS b_session;
SELECT tenant, count(*), sum(amount) FROM par_orders GROUP BY tenant;
SELECT * FROM parallel_run('SELECT tenant, id FROM par_orders');
-- A session binding is checked again in each transaction; the leader marks
-- it as checked before the workers start, and only then do they trust it.
SELECT * FROM parallel_run($$SELECT id FROM par_orders
	WHERE apikey.has_scope(CASE WHEN id > 0 THEN 'orders:read' END)$$);
BEGIN;
SELECT apikey.authenticate(:'ta') = :ka AS a;
SELECT tenant, count(*), sum(amount) FROM par_orders GROUP BY tenant;
SELECT * FROM parallel_run('SELECT tenant, id FROM par_orders');
-- a binding undone by ROLLBACK TO is undone in the workers too
SAVEPOINT s;
SELECT apikey.authenticate(:'tn') = :kn AS no_scope;
SELECT count(*) FROM par_orders;
ROLLBACK TO s;
SELECT tenant, count(*) FROM par_orders GROUP BY tenant;
COMMIT;
SELECT tenant, count(*) FROM par_orders GROUP BY tenant;
SELECT apikey.logout();
SELECT count(*) FROM par_orders;
SELECT * FROM parallel_run('SELECT tenant, id FROM par_orders');

-- A revoked session binding ends in the leader before any worker starts.
SELECT apikey.authenticate(:'tb', session => true) = :kb AS b_session;
RESET ROLE;
SELECT apikey.revoke(:kb, 'parallel test');
SET ROLE regress_parallel_app;
SELECT * FROM parallel_run($$SELECT id FROM par_orders
	WHERE apikey.has_scope(CASE WHEN id > 0 THEN 'orders:read' END)$$);
SELECT * FROM parallel_run($$SELECT id FROM par_orders
	WHERE apikey.has_scope(CASE WHEN id > 0 THEN 'orders:read' END)$$);

RESET ROLE;
RESET :force_parallel;
RESET parallel_leader_participation;
RESET max_parallel_workers_per_gather;
RESET min_parallel_table_scan_size;
RESET parallel_tuple_cost;
RESET parallel_setup_cost;

-- A parallel index build evaluates index expressions in parallel mode, in
-- the leader and in workers started outside the executor: there a session
-- binding not checked in this transaction cannot be checked, so a helper
-- reached there (through a function wrongly marked IMMUTABLE) raises
-- rather than trust it.  A transaction binding is usable.
CREATE TABLE par_tags (id int NOT NULL);
INSERT INTO par_tags SELECT generate_series(1, 3000);
ALTER TABLE par_tags SET (parallel_workers = 2);
CREATE FUNCTION owner_tag(id int) RETURNS text
	LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
	AS $$ BEGIN RETURN apikey.current_owner() || ':' || id; END $$;
SET max_parallel_maintenance_workers = 2;
SET maintenance_work_mem = '256MB';
SELECT apikey.authenticate(:'ta', session => true) = :ka AS a_session;
\set VERBOSITY terse
CREATE INDEX par_tags_owner ON par_tags (owner_tag(id));
\set VERBOSITY default
BEGIN;
SELECT apikey.authenticate(:'ta') = :ka AS a;
CREATE INDEX par_tags_owner ON par_tags (owner_tag(id));
COMMIT;
SELECT apikey.logout();
RESET maintenance_work_mem;
RESET max_parallel_maintenance_workers;
DROP TABLE par_tags;
DROP FUNCTION owner_tag(int);

DROP FUNCTION parallel_run(text);
DROP FUNCTION plan_text(text);
DROP TABLE par_orders;
DROP ROLE regress_parallel_app;
