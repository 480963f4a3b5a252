--
-- security_replica_mode: changes applied with session_replication_role =
-- replica (as logical replication's apply worker does) still reach every
-- key cache.  Before the fix the invalidation triggers were ordinary
-- triggers, which replica mode skips: a replicated revocation left the key
-- valid in every backend that had it cached.
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
SELECT key_id AS k, token AS t FROM apikey.issue(owner => 'acme', scopes => '{orders:read}') \gset
SELECT key_id AS k2, token AS t2 FROM apikey.issue(owner => 'acme', scopes => '{orders:read}') \gset

-- the triggers fire in every mode
SELECT tgname, tgenabled FROM pg_trigger
 WHERE tgrelid IN ('apikey.keys'::regclass, 'apikey.key_scopes'::regclass,
				   'apikey.revocations'::regclass, 'apikey.scopes'::regclass)
   AND NOT tgisinternal ORDER BY tgname;

SELECT code FROM apikey.check(:'t', 'orders:write');   -- cached
SET session_replication_role = replica;
INSERT INTO apikey.key_scopes (key_id, scope) VALUES (:k, 'orders:write');
RESET session_replication_role;
SELECT code FROM apikey.check(:'t', 'orders:write');

SELECT code FROM apikey.check(:'t');                    -- cached
SET session_replication_role = replica;
INSERT INTO apikey.revocations (key_id, revoked_by, reason) VALUES (:k, current_user, 'replicated');
RESET session_replication_role;
SELECT code FROM apikey.check(:'t');

SELECT code FROM apikey.check(:'t2');                   -- cached
SET session_replication_role = replica;
UPDATE apikey.keys SET expires_at = now() - interval '1 second' WHERE id = :k2;
RESET session_replication_role;
SELECT code FROM apikey.check(:'t2');

SET session_replication_role = replica;
TRUNCATE apikey.keys CASCADE;
RESET session_replication_role;
SELECT code FROM apikey.check(:'t2');
