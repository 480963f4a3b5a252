-- audit_verify() finds what was done to the chain behind the triggers'
-- back (here: as superuser, with the guard triggers disabled, each time in
-- a transaction that is rolled back): an edited row (row_hash_mismatch),
-- an inserted or deleted row (prev_hash_mismatch), the newest rows gone
-- (head_mismatch).  Pruning through audit_prune() keeps the chain
-- verifiable from the anchor it records.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

SELECT count(*) FROM generate_series(1, 5) i, LATERAL apikey.issue('acme' || i);
SELECT apikey.revoke(1, 'one'), apikey.revoke(2, 'two');
SELECT max(seq) AS rows FROM apikey.audit_log;
SELECT * FROM apikey.audit_verify();

-- An edited row.
BEGIN;
ALTER TABLE apikey.audit_log DISABLE TRIGGER USER;
UPDATE apikey.audit_log SET actor_claim = 'someone else' WHERE seq = 3;
SELECT * FROM apikey.audit_verify();
ROLLBACK;
-- The same edit with its row_hash recomputed: the next row no longer links.
BEGIN;
ALTER TABLE apikey.audit_log DISABLE TRIGGER USER;
UPDATE apikey.audit_log a SET actor_claim = 'someone else',
       row_hash = apikey._audit_hash(a.prev_hash, a.seq, a.at, a.xact, a.action, a.actor_role, a.session_role,
           a.actor_key_id, 'someone else', a.client_addr, a.application_name, a.target_key_id,
           a.target_owner, a.details)
 WHERE seq = 3;
SELECT * FROM apikey.audit_verify();
ROLLBACK;
-- A deleted row.
BEGIN;
ALTER TABLE apikey.audit_log DISABLE TRIGGER USER;
DELETE FROM apikey.audit_log WHERE seq = 4;
SELECT * FROM apikey.audit_verify();
ROLLBACK;
-- An inserted row: row 5 replaced by a forged one that hashes right and
-- links to row 4; row 6 no longer links to it.
BEGIN;
ALTER TABLE apikey.audit_log DISABLE TRIGGER USER;
DELETE FROM apikey.audit_log WHERE seq = 5;
INSERT INTO apikey.audit_log
SELECT 5, now(), pg_current_xact_id(), 'issue', 'mallory', 'mallory', NULL, NULL, NULL, NULL, 99, 'mallory', '{}',
       p.row_hash, apikey._audit_hash(p.row_hash, 5, now(), pg_current_xact_id(), 'issue', 'mallory', 'mallory',
           NULL, NULL, NULL, NULL, 99, 'mallory', '{}')
  FROM apikey.audit_log p WHERE p.seq = 4;
SELECT * FROM apikey.audit_verify();
ROLLBACK;
-- A row added after the newest, hashing right but not linked.
BEGIN;
ALTER TABLE apikey.audit_log DISABLE TRIGGER USER;
INSERT INTO apikey.audit_log
SELECT 8, now(), pg_current_xact_id(), 'revoke', 'mallory', 'mallory', NULL, NULL, NULL, NULL, 3, 'acme', '{}',
       '\x00', apikey._audit_hash('\x00', 8, now(), pg_current_xact_id(), 'revoke', 'mallory', 'mallory',
           NULL, NULL, NULL, NULL, 3, 'acme', '{}');
SELECT * FROM apikey.audit_verify();
ROLLBACK;
-- The newest row deleted: only the head shows it.
BEGIN;
ALTER TABLE apikey.audit_log DISABLE TRIGGER USER;
DELETE FROM apikey.audit_log WHERE seq = 7;
SELECT * FROM apikey.audit_verify();
SELECT * FROM apikey.audit_verify(1, 6);
ROLLBACK;
SELECT * FROM apikey.audit_verify();

-- A range covers its own rows: an edit of row 2 shows when row 2 is in it.
SELECT count(*) FROM apikey.audit_verify(3, 5);
BEGIN;
ALTER TABLE apikey.audit_log DISABLE TRIGGER USER;
UPDATE apikey.audit_log SET details = '{"x": 1}' WHERE seq = 2;
SELECT * FROM apikey.audit_verify(3, 5);
SELECT * FROM apikey.audit_verify(2, 5);
ROLLBACK;

-- A row that comes with its row_hash (what pg_restore writes) is accepted
-- only if it hashes right.
\set VERBOSITY sqlstate
INSERT INTO apikey.audit_log
SELECT 8, now(), pg_current_xact_id(), 'revoke', 'mallory', 'mallory', NULL, NULL, NULL, NULL, 3, 'acme', '{}',
       '\x00', '\x00';
\set VERBOSITY default

-- Pruning.  Rows older than the interval go, oldest first; the row that
-- records the prune keeps the anchor, so what is left verifies.
SELECT pg_sleep(1.2);
SELECT apikey.revoke(3, 'three');
SELECT apikey.audit_prune('1 second');
SELECT min(seq) AS first, max(seq) AS last, count(*) AS rows FROM apikey.audit_log;
SELECT action, details - 'anchor' AS details, details->>'anchor' ~ '^[0-9a-f]{64}$' AS anchor_is_a_hash
  FROM apikey.audit_log WHERE action = 'audit_prune';
SELECT * FROM apikey.audit_verify();
-- Without the prune's row, the first row left has nothing to link to.
BEGIN;
ALTER TABLE apikey.audit_log DISABLE TRIGGER USER;
DELETE FROM apikey.audit_log WHERE action = 'audit_prune';
SELECT * FROM apikey.audit_verify();
ROLLBACK;
-- Pruning everything leaves the prune's own row, linked to the anchor.
SELECT apikey.audit_prune('1 microsecond');
SELECT seq, action, details->>'pruned_through' AS through FROM apikey.audit_log;
SELECT * FROM apikey.audit_verify();
SELECT count(*) FROM apikey.issue('after the prune');
SELECT * FROM apikey.audit_verify();
