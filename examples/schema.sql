--
-- The database both example apps (node/, python/) serve, as the README's
-- row-level security section builds it.  Run it once, as a superuser, in a
-- database where apikey is installed:
--
--     psql -d app -v ON_ERROR_STOP=1 -f examples/schema.sql
--
-- It creates the scopes, a multi-tenant orders table that only a bound key
-- can read, and the role the apps connect as.  It issues no key: issue
-- them with apikey.issue() (the apps' tests issue their own).
--

INSERT INTO apikey.scopes (name, description) VALUES
	('orders:read', 'List orders'),
	('orders:write', 'Place orders')
ON CONFLICT (name) DO NOTHING;

CREATE TABLE orders (
	tenant	text NOT NULL,
	id		bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	item	text NOT NULL
);
INSERT INTO orders (tenant, item) VALUES
	('acme', 'anvil'), ('globex', 'laser'), ('acme', 'rocket skates'),
	('globex', 'magnet'), ('globex', 'tesla coil'), ('initech', 'stapler');

-- Without a key bound to its transaction the app role sees no row.
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
ALTER TABLE orders FORCE ROW LEVEL SECURITY;
CREATE POLICY orders_read ON orders FOR SELECT
	USING (tenant = apikey.current_owner() AND apikey.has_scope('orders:read'));

-- The role the apps connect as (directly or through PgBouncer).  It passes
-- the end client's address as client_addr, so it must be a trusted proxy;
-- behind a transaction-mode pooler it must never make a session binding.
CREATE ROLE example_app LOGIN;
GRANT SELECT ON orders TO example_app;
GRANT apikey_proxy TO example_app;
ALTER ROLE example_app SET apikey.allow_session_binding = off;
