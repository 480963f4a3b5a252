--
-- security_expiry_at_call: a key's expiry is judged at the time of each
-- call, not at the start of the calling transaction.  Before the fix a key
-- kept verifying for as long as a transaction that began before its
-- expiry stayed open.
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

SELECT key_id AS k, token AS t FROM apikey.issue(owner => 'acme') \gset

BEGIN;
SELECT code FROM apikey.check(:'t');
SELECT pg_sleep(0.05);
-- expires now: after this transaction began, before the next call
UPDATE apikey.keys SET expires_at = clock_timestamp() WHERE id = :k;
SELECT expires_at > now() AS expires_after_transaction_start FROM apikey.keys WHERE id = :k;
SELECT code FROM apikey.check(:'t');
SELECT apikey.verify(:'t') AS verified;
SELECT apikey.authenticate(:'t');
ROLLBACK;

-- in autocommit the same holds, and a key expiring in the future works
UPDATE apikey.keys SET expires_at = clock_timestamp() + interval '1 hour' WHERE id = :k;
SELECT code FROM apikey.check(:'t');
UPDATE apikey.keys SET expires_at = clock_timestamp() WHERE id = :k;
SELECT code FROM apikey.check(:'t');
