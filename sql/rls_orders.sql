--
-- rls_orders: the README's worked example, as a user would write it.  A
-- multi-tenant orders table that the application role can only reach
-- through an API key bound to the transaction, and the same policies wired
-- to PostgREST through a db-pre-request function.
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

--
-- Set-up, as the database owner.
--
INSERT INTO apikey.scopes (name, description) VALUES
	('orders:read', 'List orders'),
	('orders:write', 'Place orders'),
	('billing:read', 'See invoices');

CREATE TABLE orders (
	tenant	text NOT NULL,
	id		bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	item	text NOT NULL,
	amount	numeric(10,2) NOT NULL
);
INSERT INTO orders (tenant, item, amount) VALUES
	('acme', 'anvil', 120.00),
	('globex', 'laser', 999.99),
	('acme', 'rocket skates', 75.50),
	('globex', 'magnet', 12.00),
	('initech', 'stapler', 8.25);

-- The application role can do nothing without a key.
CREATE ROLE regress_rls_app NOLOGIN;
GRANT SELECT, INSERT ON orders TO regress_rls_app;
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
ALTER TABLE orders FORCE ROW LEVEL SECURITY;
CREATE POLICY orders_read ON orders FOR SELECT
	USING (tenant = apikey.current_owner() AND apikey.has_scope('orders:read'));
CREATE POLICY orders_write ON orders FOR INSERT
	WITH CHECK (tenant = apikey.current_owner() AND apikey.has_scope('orders:write'));

-- One key per tenant and use.
SELECT token AS acme_rw FROM apikey.issue(owner => 'acme', scopes => '{orders:read,orders:write}', name => 'acme shop') \gset
SELECT key_id AS acme_ro_id, token AS acme_ro FROM apikey.issue(owner => 'acme', scopes => '{orders:read}', name => 'acme reports') \gset
SELECT token AS globex_rw FROM apikey.issue(owner => 'globex', scopes => '{orders:*}', name => 'globex shop') \gset
SELECT token AS acme_billing FROM apikey.issue(owner => 'acme', scopes => '{billing:read}', name => 'acme billing') \gset

--
-- Each request: BEGIN; authenticate the key (a bind parameter); work; COMMIT.
--
SET ROLE regress_rls_app;
PREPARE auth(text) AS SELECT apikey.authenticate($1);
PREPARE list_orders AS SELECT tenant, id, item, amount FROM orders ORDER BY id;
PREPARE place_order(text, text, numeric) AS
	INSERT INTO orders (tenant, item, amount) VALUES ($1, $2, $3) RETURNING tenant, id, item, amount;

-- No key: no rows, and no writes.
EXECUTE list_orders;
EXECUTE place_order('acme', 'free lunch', 0);

-- acme's shop key sees acme's orders only, and can place an order for acme
-- but not for globex.
BEGIN;
EXECUTE auth(:'acme_rw');
EXECUTE list_orders;
SELECT count(*) AS all_visible, sum(amount) AS total FROM orders;
EXECUTE place_order('acme', 'bird seed', 3.10);
SAVEPOINT before_globex;
EXECUTE place_order('globex', 'sabotage', 1.00);
ROLLBACK TO before_globex;
COMMIT;

-- The binding ended with the transaction: nothing visible again.
EXECUTE list_orders;

-- acme's read-only key reads (including the new order) but cannot insert.
BEGIN;
EXECUTE auth(:'acme_ro');
EXECUTE list_orders;
EXECUTE place_order('acme', 'more bird seed', 3.10);
ROLLBACK;

-- globex's key sees globex's orders only.
BEGIN;
EXECUTE auth(:'globex_rw');
EXECUTE list_orders;
EXECUTE place_order('globex', 'tesla coil', 250.00);
COMMIT;

-- A key of the right tenant without the orders scopes sees nothing.
BEGIN;
EXECUTE auth(:'acme_billing');
SELECT apikey.current_owner();
EXECUTE list_orders;
ROLLBACK;

-- The app role has no UPDATE or DELETE at all.
BEGIN;
EXECUTE auth(:'acme_rw');
UPDATE orders SET amount = 0;
ROLLBACK;

-- A bad key stops the request before any query runs.
BEGIN;
EXECUTE auth('ak_not_a_real_key');
ROLLBACK;

-- Read-only transactions (PostgREST runs GET requests in one) work too.
BEGIN READ ONLY;
EXECUTE auth(:'acme_ro');
SELECT count(*) AS acme_orders FROM orders;
COMMIT;

-- Revoking a key takes effect at the next request.
RESET ROLE;
SELECT apikey.revoke(:acme_ro_id, 'report tool retired');
SET ROLE regress_rls_app;
BEGIN;
EXECUTE auth(:'acme_ro');
ROLLBACK;

-- Cached generic plans follow the binding: the helpers are evaluated when
-- the query runs, not when it is planned.
SET plan_cache_mode = force_generic_plan;
BEGIN;
EXECUTE auth(:'acme_rw');
EXECUTE list_orders;
COMMIT;
BEGIN;
EXECUTE auth(:'globex_rw');
EXECUTE list_orders;
COMMIT;
EXECUTE list_orders;
RESET plan_cache_mode;

DEALLOCATE ALL;
RESET ROLE;

--
-- PostgREST: db-pre-request = 'api.pre_request'.  PostgREST puts the
-- request's headers (names lower-cased) into request.headers with
-- set_config(..., true), switches to the request role with SET LOCAL ROLE,
-- and calls the pre-request function inside the request's transaction.
--
CREATE SCHEMA api;
CREATE FUNCTION api.pre_request() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	api_key text := current_setting('request.headers', true)::json ->> 'x-api-key';
BEGIN
	-- No header: no key is bound, and the policies show nothing.
	IF api_key IS NOT NULL THEN
		PERFORM apikey.authenticate(api_key);
	END IF;
END
$$;
GRANT USAGE ON SCHEMA api TO regress_rls_app;
GRANT EXECUTE ON FUNCTION api.pre_request() TO regress_rls_app;

-- GET /orders with X-API-Key: acme's shop key
BEGIN READ ONLY;
SET LOCAL ROLE regress_rls_app;
SELECT set_config('request.headers', json_build_object('x-api-key', :'acme_rw', 'accept', '*/*')::text, true) IS NOT NULL AS headers_set;
SELECT api.pre_request();
SELECT tenant, id, item, amount FROM orders ORDER BY id;
COMMIT;

-- POST /orders with globex's key
BEGIN;
SET LOCAL ROLE regress_rls_app;
SELECT set_config('request.headers', json_build_object('x-api-key', :'globex_rw')::text, true) IS NOT NULL AS headers_set;
SELECT api.pre_request();
INSERT INTO orders (tenant, item, amount) VALUES ('globex', 'death ray', 1000000.00) RETURNING tenant, item;
INSERT INTO orders (tenant, item, amount) VALUES ('acme', 'forged', 1.00) RETURNING tenant, item;
ROLLBACK;

-- GET /orders without the header
BEGIN READ ONLY;
SET LOCAL ROLE regress_rls_app;
SELECT set_config('request.headers', '{"accept": "*/*"}', true) IS NOT NULL AS headers_set;
SELECT api.pre_request();
SELECT count(*) AS visible FROM orders;
COMMIT;

-- GET /orders with a bad key: the pre-request function raises 28000, which
-- PostgREST answers with 403 Forbidden.
BEGIN READ ONLY;
SET LOCAL ROLE regress_rls_app;
SELECT set_config('request.headers', '{"x-api-key": "ak_0000000000000000000000000000000000000000000000000"}', true) IS NOT NULL AS headers_set;
SELECT api.pre_request();
\echo :SQLSTATE
ROLLBACK;

-- The next request on the same connection starts with no binding.
BEGIN READ ONLY;
SET LOCAL ROLE regress_rls_app;
SELECT apikey.current_owner() IS NULL AS unbound;
SELECT count(*) AS visible FROM orders;
COMMIT;

-- What the table holds, as its owner sees it (superusers bypass RLS).
SELECT tenant, id, item, amount FROM orders ORDER BY id;

DROP SCHEMA api CASCADE;
DROP TABLE orders;
DROP ROLE regress_rls_app;
