-- audit_verify() finds what was done to the chain behind the triggers'
-- back (here: as superuser, with the guard triggers disabled, each time in
-- a transaction that is rolled back): an edited row (row_hash_mismatch),
-- an inserted or deleted row (prev_hash_mismatch).  The newest rows gone
-- leave no trace in the chain; a checkpoint kept elsewhere shows it.
-- Pruning through audit_prune() keeps the chain verifiable from the
-- anchor it records.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

SELECT count(*) FROM generate_series(1, 5) i, LATERAL apikey.issue('acme' || i);
SELECT apikey.revoke(1, 'one'), apikey.revoke(2, 'two');
SELECT max(seq) AS rows FROM apikey.audit_log;
SELECT * FROM apikey.audit_verify();

-- The row hash is SHA-256 over each field as a 4-byte big-endian length
-- (-1 for NULL) and its bytes: integers, times and xids as 8 big-endian
-- bytes, text in UTF-8, inet and jsonb in their output form.  Recomputed
-- here in SQL.
CREATE FUNCTION f(b bytea) RETURNS bytea LANGUAGE sql AS
$$ SELECT CASE WHEN b IS NULL THEN int4send(-1) ELSE int4send(octet_length(b)) || b END $$;
CREATE FUNCTION u(t text) RETURNS bytea LANGUAGE sql AS $$ SELECT convert_to(t, 'UTF8') $$;
SELECT seq, row_hash = sha256(f(prev_hash) || f(int8send(seq)) || f(timestamptz_send(at)) || f(xid8send(xact))
       || f(u(action)) || f(u(actor_role::text)) || f(u(session_role::text)) || f(int8send(actor_key_id))
       || f(u(actor_claim)) || f(u(CASE WHEN client_addr IS NOT NULL THEN format('%s', client_addr) END))
       || f(u(application_name)) || f(int8send(target_key_id))
       || f(u(target_owner)) || f(u(details::text))) AS same_as_sql,
       seq > 1 OR prev_hash = decode(repeat('00', 32), 'hex') AS first_links_to_zeros
  FROM apikey.audit_log ORDER BY seq LIMIT 3;
DROP FUNCTION f(bytea);
DROP FUNCTION u(text);

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
-- The newest row deleted: the chain cannot tell, a checkpoint taken
-- before can (its seq is gone, or no longer has its row_hash).
SELECT seq AS cp_seq, encode(row_hash, 'hex') AS cp_hash FROM apikey.audit_checkpoint() \gset
BEGIN;
ALTER TABLE apikey.audit_log DISABLE TRIGGER USER;
DELETE FROM apikey.audit_log WHERE seq = 7;
SELECT * FROM apikey.audit_verify();
SELECT count(*) AS checkpoint_still_there FROM apikey.audit_log
 WHERE seq = :cp_seq AND encode(row_hash, 'hex') = :'cp_hash';
ROLLBACK;
SELECT count(*) AS checkpoint_still_there FROM apikey.audit_log
 WHERE seq = :cp_seq AND encode(row_hash, 'hex') = :'cp_hash';
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
SELECT pg_sleep(3.2);
SELECT apikey.revoke(3, 'three');
SELECT apikey.audit_prune('3 seconds');
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
