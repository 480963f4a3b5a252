--
-- security_trusted_proxy: client_addr is a claim.  It is honoured only
-- from members of apikey_proxy (and superusers); for anyone else the
-- connection's address decides.  Before the fix anyone holding a stolen
-- token and a SQL connection passed an allowlist by claiming an allowed
-- address, and chose the address every failure was recorded under.
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = 'apikey_proxy';

-- this session connects over loopback (pg_regress listens on 127.0.0.1)
SELECT inet_client_addr() <<= '127.0.0.0/8' AS connected_over_loopback;

SELECT key_id AS k, token AS t FROM apikey.issue(owner => 'acme', allowed_cidrs => '{203.0.113.0/24}') \gset

CREATE ROLE regress_stranger;
CREATE ROLE regress_webapp;
GRANT apikey_proxy TO regress_webapp;

-- a role that is not a proxy: its claim is ignored, the connection decides
SET ROLE regress_stranger;
SELECT code FROM apikey.check(:'t', NULL, '203.0.113.7');
SELECT apikey.verify(:'t', NULL, '203.0.113.7') AS verified;
SELECT apikey.authenticate(:'t', NULL, '203.0.113.7');
RESET ROLE;

-- a member of apikey_proxy passes the end client's address
SET ROLE regress_webapp;
SELECT code FROM apikey.check(:'t', NULL, '203.0.113.7');
SELECT code FROM apikey.check(:'t', NULL, '198.51.100.7');
BEGIN;
SELECT apikey.authenticate(:'t', NULL, '203.0.113.7') = :k AS authenticated;
COMMIT;
RESET ROLE;

-- a SECURITY DEFINER wrapper acts with its owner's rights: owned by a
-- proxy member, it may pass the address for its callers
CREATE FUNCTION webapp_check(tok text, addr inet) RETURNS text
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT code FROM apikey.check(tok, NULL, addr) $$;
ALTER FUNCTION webapp_check(text, inet) OWNER TO regress_webapp;
GRANT EXECUTE ON FUNCTION webapp_check(text, inet) TO regress_stranger;
SET ROLE regress_stranger;
SELECT webapp_check(:'t', '203.0.113.7');
RESET ROLE;

-- membership is checked at each call
REVOKE apikey_proxy FROM regress_webapp;
SET ROLE regress_webapp;
SELECT code FROM apikey.check(:'t', NULL, '203.0.113.7');
RESET ROLE;

-- superusers may assert addresses
SELECT code FROM apikey.check(:'t', NULL, '203.0.113.7');

DROP FUNCTION webapp_check(text, inet);
DROP ROLE regress_stranger;
DROP ROLE regress_webapp;
