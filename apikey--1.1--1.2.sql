/* apikey--1.1--1.2.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION apikey UPDATE TO '1.2'" to load this file. \quit

-- 1.2: what the outside attack review found, closed (see the README's
-- security model).  Sections are added below, one per concern.

-------------------------------------------------------------------------------
-- The schema must belong to a superuser (for installs made before 1.2 added
-- the check to CREATE EXTENSION).  The C code refuses to verify otherwise.
-------------------------------------------------------------------------------

DO $$
DECLARE
	nsp pg_catalog.pg_namespace;
BEGIN
	SELECT * INTO nsp FROM pg_catalog.pg_namespace n
	 WHERE n.oid OPERATOR(pg_catalog.=) '@extschema@'::pg_catalog.regnamespace;
	IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid OPERATOR(pg_catalog.=) nsp.nspowner)
	   OR EXISTS (SELECT FROM pg_catalog.aclexplode(nsp.nspacl) a
				   WHERE a.privilege_type OPERATOR(pg_catalog.=) 'CREATE'
					 AND a.grantee OPERATOR(pg_catalog.<>) nsp.nspowner) THEN
		RAISE EXCEPTION 'schema "%" of extension apikey is owned by role "%" or writable by other roles',
			nsp.nspname, nsp.nspowner::pg_catalog.regrole
			USING ERRCODE = '42501',
				  HINT = 'Check its contents, make a superuser its owner and revoke CREATE from other roles, then update again.';
	END IF;
END
$$;

-------------------------------------------------------------------------------
-- Trusted proxies.  client_addr is honoured only from members of
-- apikey_proxy (and superusers); everyone else is judged by the
-- connection's address.  Roles are cluster-wide: create it once.
-------------------------------------------------------------------------------

DO $$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) 'apikey_proxy') THEN
		CREATE ROLE apikey_proxy NOLOGIN;
	END IF;
END
$$;
COMMENT ON ROLE apikey_proxy IS 'Members may pass the end client''s address to apikey.check/verify/authenticate (client_addr)';

-------------------------------------------------------------------------------
-- Rotation shares one budget.  During a rotation's grace period the old key
-- draws on the new key's rate limit and quota, so two live tokens never get
-- twice the allowance.
--
-- The links between the keys of a rotation live in apikey.key_lineage, not
-- in apikey.keys: a foreign key from keys to keys is a loop to pg_dump,
-- which orders the data of an extension's tables by their foreign keys and
-- warns about every dump.  key_lineage references keys three times and
-- nothing references it, so the order is plain.  keys.rotated_from (1.0)
-- moves here; the column goes in "Key lineage" at the end, once nothing
-- reads it.
-------------------------------------------------------------------------------

CREATE TABLE apikey.key_lineage (
	key_id		bigint PRIMARY KEY REFERENCES apikey.keys (id) ON DELETE CASCADE,
	rotated_from bigint REFERENCES apikey.keys (id) ON DELETE SET NULL,
	budget_key_id bigint REFERENCES apikey.keys (id) ON DELETE SET NULL
);
CREATE INDEX key_lineage_rotated_from_idx ON apikey.key_lineage (rotated_from) WHERE rotated_from IS NOT NULL;
CREATE INDEX key_lineage_budget_key_id_idx ON apikey.key_lineage (budget_key_id) WHERE budget_key_id IS NOT NULL;
COMMENT ON TABLE apikey.key_lineage IS 'How rotated keys are linked: one row per key that replaced another (rotate, reissue) or draws on another''s budget; no row = neither';
COMMENT ON COLUMN apikey.key_lineage.key_id IS 'The key';
COMMENT ON COLUMN apikey.key_lineage.rotated_from IS 'The key this one replaced through rotate() or reissue(); NULL = none, or deleted since';
COMMENT ON COLUMN apikey.key_lineage.budget_key_id IS 'Set by rotate() on the old key: the key whose rate limit and quota it draws on during its grace period; NULL = its own';
SELECT pg_catalog.pg_extension_config_dump('apikey.key_lineage', '');
REVOKE ALL ON apikey.key_lineage FROM PUBLIC;

INSERT INTO apikey.key_lineage (key_id, rotated_from)
SELECT k.id, k.rotated_from FROM apikey.keys k WHERE k.rotated_from IS NOT NULL;

CREATE FUNCTION apikey._rate_state_copy(from_id bigint, from_hash bytea, to_id bigint, to_hash bytea)
RETURNS void
AS 'MODULE_PATHNAME', 'apikey_rate_state_copy'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION apikey._rate_state_copy(bigint, bytea, bigint, bytea)
	IS 'Internal: start a new key''s rate-limit bucket where another key''s stands (rotate)';
REVOKE ALL ON FUNCTION apikey._rate_state_copy(bigint, bytea, bigint, bytea) FROM PUBLIC;

-- The key that replaces from_key (rotate, reissue): a new token with the
-- same owner, name, prefix, expiry, metadata, limits and scopes, linked by
-- key_lineage.rotated_from, carrying on from the budget from_key drew on (its
-- rate-limit bucket and remaining quota), so replacing a key never refills
-- its allowance.  The callers decide what becomes of from_key.
CREATE FUNCTION apikey._successor(from_key apikey.keys, OUT key_id bigint, OUT token text, OUT hint text)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_new record;
	v_budget bigint;
BEGIN
	IF from_key.id IS NULL THEN
		RAISE EXCEPTION 'from_key must be a row of apikey.keys' USING ERRCODE = '22004';
	END IF;
	PERFORM apikey._owner_admit(from_key.owner, from_key.id);
	v_new := apikey._new_token(from_key.prefix);
	INSERT INTO apikey.keys (owner, name, prefix, hint, hash, created_by, expires_at, metadata,
							 rate_limit, rate_window, quota, quota_refill, allowed_cidrs)
	VALUES (from_key.owner, from_key.name, from_key.prefix, v_new.hint, v_new.hash, apikey._acting_role(),
			from_key.expires_at, from_key.metadata, from_key.rate_limit, from_key.rate_window,
			from_key.quota, from_key.quota_refill, from_key.allowed_cidrs)
	RETURNING apikey.keys.id INTO _successor.key_id;
	INSERT INTO apikey.key_lineage (key_id, rotated_from) VALUES (_successor.key_id, from_key.id);
	v_budget := COALESCE((SELECT l.budget_key_id FROM apikey.key_lineage l
						   WHERE l.key_id OPERATOR(pg_catalog.=) from_key.id), from_key.id);

	INSERT INTO apikey.key_scopes (key_id, scope)
	SELECT _successor.key_id, ks.scope FROM apikey.key_scopes ks
	 WHERE ks.key_id OPERATOR(pg_catalog.=) from_key.id;

	PERFORM apikey._rate_state_copy(b.id, b.hash, _successor.key_id, v_new.hash)
	   FROM apikey.keys b
	  WHERE b.id OPERATOR(pg_catalog.=) v_budget;
	IF from_key.quota IS NOT NULL THEN
		INSERT INTO apikey.quotas (key_id, remaining, refilled_at)
		SELECT _successor.key_id, q.remaining, q.refilled_at FROM apikey.quotas q
		 WHERE q.key_id OPERATOR(pg_catalog.=) v_budget;
	END IF;
	token := v_new.token;
	hint := v_new.hint;
END
$$;
COMMENT ON FUNCTION apikey._successor(apikey.keys)
	IS 'Internal: issue the key that replaces a key (rotate, reissue), with its settings, scopes and remaining budget, within its owner''s max_keys';
REVOKE ALL ON FUNCTION apikey._successor(apikey.keys) FROM PUBLIC;

-- rotate() itself, which sets key_lineage.budget_key_id and copies the
-- bucket and the quota row, is defined with its audit row in "Audit trail"
-- below.
COMMENT ON FUNCTION apikey.rotate(bigint, interval)
	IS 'Replace a key with a new one that has the same owner, scopes and settings; the old key expires after grace and, until then, shares the new key''s rate limit and quota';

-------------------------------------------------------------------------------
-- Cache invalidation also under logical replication and
-- session_replication_role = replica, which skip ordinary triggers.  The
-- statement triggers fire always; logical replication's apply worker fires
-- no statement triggers at all (only row triggers, and TRUNCATE's), so
-- row triggers that fire only in replica mode cover what it applies.
-------------------------------------------------------------------------------

DROP TRIGGER keys_invalidate ON apikey.keys;
CREATE TRIGGER keys_invalidate
	AFTER UPDATE OF id, owner, hash, expires_at, rate_limit, rate_window, quota, quota_refill,
					allowed_cidrs
	   OR DELETE OR TRUNCATE ON apikey.keys
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._invalidate();
ALTER TABLE apikey.keys ENABLE ALWAYS TRIGGER keys_invalidate;
ALTER TABLE apikey.key_scopes ENABLE ALWAYS TRIGGER key_scopes_invalidate;
ALTER TABLE apikey.revocations ENABLE ALWAYS TRIGGER revocations_invalidate;
ALTER TABLE apikey.scopes ENABLE ALWAYS TRIGGER scopes_invalidate;

CREATE TRIGGER keys_invalidate_applied
	AFTER UPDATE OF id, owner, hash, expires_at, rate_limit, rate_window, quota, quota_refill,
					allowed_cidrs
	   OR DELETE ON apikey.keys
	FOR EACH ROW EXECUTE FUNCTION apikey._invalidate();
CREATE TRIGGER key_scopes_invalidate_applied
	AFTER INSERT OR UPDATE OR DELETE ON apikey.key_scopes
	FOR EACH ROW EXECUTE FUNCTION apikey._invalidate();
CREATE TRIGGER revocations_invalidate_applied
	AFTER INSERT OR UPDATE OR DELETE ON apikey.revocations
	FOR EACH ROW EXECUTE FUNCTION apikey._invalidate();
CREATE TRIGGER scopes_invalidate_applied
	AFTER INSERT OR UPDATE OR DELETE ON apikey.scopes
	FOR EACH ROW EXECUTE FUNCTION apikey._invalidate();
ALTER TABLE apikey.keys ENABLE REPLICA TRIGGER keys_invalidate_applied;
ALTER TABLE apikey.key_scopes ENABLE REPLICA TRIGGER key_scopes_invalidate_applied;
ALTER TABLE apikey.revocations ENABLE REPLICA TRIGGER revocations_invalidate_applied;
ALTER TABLE apikey.scopes ENABLE REPLICA TRIGGER scopes_invalidate_applied;

-------------------------------------------------------------------------------
-- Usage accounting never waits and stays bounded (review findings 8, 9, 14).
-- Away from the usage writer, a verification appends one row here, in its
-- own transaction: no index, no unique key, no row anyone updates, so a
-- verifier never waits for another session, never deadlocks and never
-- fails to serialize.  apikey.flush_usage() (and the database's usage
-- writer) folds these rows into usage_log and keys.last_used_at;
-- key_usage counts them meanwhile.
-------------------------------------------------------------------------------

CREATE TABLE apikey.usage_pending (
	key_id		bigint,
	bucket		timestamptz NOT NULL,
	code		text NOT NULL,
	client_addr	inet,
	used_at		timestamptz NOT NULL
);
COMMENT ON TABLE apikey.usage_pending IS 'One row per verification not yet folded into usage_log (databases the usage writer does not serve); apikey.flush_usage() folds them';
COMMENT ON COLUMN apikey.usage_pending.key_id IS 'The key; NULL for tokens that match no key';
COMMENT ON COLUMN apikey.usage_pending.bucket IS 'Start of the minute';
COMMENT ON COLUMN apikey.usage_pending.code IS 'Verdict code';
COMMENT ON COLUMN apikey.usage_pending.client_addr IS 'Client address of a known key''s failure; NULL otherwise';
COMMENT ON COLUMN apikey.usage_pending.used_at IS 'Time of the verification (for keys.last_used_at)';
SELECT pg_catalog.pg_extension_config_dump('apikey.usage_pending', '');
REVOKE ALL ON apikey.usage_pending FROM PUBLIC;

COMMENT ON FUNCTION apikey.flush_usage()
	IS 'Write this database''s pending usage to apikey.usage_log now (where the database''s usage writer runs: have it do it, and wait); returns rows written';
COMMENT ON COLUMN apikey.keys.last_used_at
	IS 'Last successful verification, written when usage is flushed (by the usage writer, or apikey.flush_usage())';
COMMENT ON COLUMN apikey.usage_log.client_addr
	IS 'Client address of a known key''s failure, for at most 16 addresses per key and minute; NULL for successes, tokens that match no key, and further addresses';

CREATE OR REPLACE VIEW apikey.key_usage AS
SELECT u.key_id, k.owner, k.name AS key_name, u.bucket,
	   pg_catalog.sum(u.calls)::bigint AS calls,
	   (pg_catalog.sum(u.calls) FILTER (WHERE u.code OPERATOR(pg_catalog.=) 'valid'))::bigint AS valid_calls,
	   (pg_catalog.sum(u.calls) FILTER (WHERE u.code OPERATOR(pg_catalog.<>) 'valid'))::bigint AS failed_calls,
	   (pg_catalog.sum(u.calls) FILTER (WHERE u.code OPERATOR(pg_catalog.=) 'rate_limited'))::bigint AS rate_limited_calls
  FROM (SELECT l.key_id, l.bucket, l.code, l.calls FROM apikey.usage_log l
		UNION ALL
		SELECT p.key_id, p.bucket, p.code, 1::pg_catalog.int8 FROM apikey.usage_pending p
		UNION ALL
		SELECT v.key_id, v.bucket, v.code, v.calls FROM apikey._live_usage() v) u
  LEFT JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) u.key_id
 GROUP BY u.key_id, k.owner, k.name, u.bucket;
COMMENT ON VIEW apikey.key_usage IS 'Calls per key and minute: usage_log, plus pending rows and live counters not yet flushed';

-------------------------------------------------------------------------------
-- Every object explains itself: comments for what 1.0 and 1.1 left without
-- one (sql/catalog_comments.sql fails on any object added without one).
-------------------------------------------------------------------------------

COMMENT ON FUNCTION apikey._check_cidrs(cidr[]) IS 'Internal: validate an address allowlist (issue, set_limits)';
COMMENT ON FUNCTION apikey._check_limits(integer, interval, bigint, interval) IS 'Internal: validate rate limit and quota settings (issue, set_limits)';
COMMENT ON FUNCTION apikey._check_scopes(text[]) IS 'Internal: validate scope grants against apikey.scopes; returns them without duplicates';
COMMENT ON FUNCTION apikey._clip(text) IS 'Internal: a value as quoted in an error message, at most 64 characters';
COMMENT ON FUNCTION apikey._live_usage() IS 'Internal: usage counted in shared memory and not yet written (behind apikey.live_usage)';
COMMENT ON FUNCTION apikey._scope_deleted() IS 'Internal: trigger removing the grants of a scope deleted from apikey.scopes';
COMMENT ON FUNCTION apikey._stats() IS 'Internal: the live counters behind apikey.stats';
COMMENT ON SEQUENCE apikey.keys_id_seq IS 'Key ids (apikey.keys.id); dumped with the extension so ids continue after a restore';

COMMENT ON COLUMN apikey.key_scopes.key_id IS 'The key';
COMMENT ON COLUMN apikey.key_scopes.scope IS 'A scope name, a prefix:* pattern or *';
COMMENT ON COLUMN apikey.quotas.key_id IS 'The key whose quota this is (for a rotated key in grace: the new key)';
COMMENT ON COLUMN apikey.quotas.remaining IS 'Successful verifications left until the next refill';
COMMENT ON COLUMN apikey.quotas.refilled_at IS 'When remaining was last reset to the key''s quota';
COMMENT ON COLUMN apikey.revocations.key_id IS 'The revoked key';
COMMENT ON COLUMN apikey.revocations.revoked_at IS 'When it was revoked';
COMMENT ON COLUMN apikey.revocations.revoked_by IS 'Role that revoked it (acting in the session)';
COMMENT ON COLUMN apikey.revocations.reason IS 'Free text, e.g. leaked in a CI log';

COMMENT ON COLUMN apikey.key_status.key_id IS 'Key id';
COMMENT ON COLUMN apikey.key_status.owner IS 'Owner';
COMMENT ON COLUMN apikey.key_status.name IS 'Label for humans';
COMMENT ON COLUMN apikey.key_status.hint IS 'Non-secret display form of the token';
COMMENT ON COLUMN apikey.key_status.created_at IS 'When the key was issued';
COMMENT ON COLUMN apikey.key_status.created_by IS 'Role that issued it';
COMMENT ON COLUMN apikey.key_status.expires_at IS 'When it stops verifying; NULL = never';
COMMENT ON COLUMN apikey.key_status.last_used_at IS 'Last successful verification, as persisted';
COMMENT ON COLUMN apikey.key_status.rotated_from IS 'The key this one replaced';
COMMENT ON COLUMN apikey.key_status.status IS 'active, revoked or expired';
COMMENT ON COLUMN apikey.key_status.revoked_at IS 'When it was revoked';
COMMENT ON COLUMN apikey.key_status.revoked_reason IS 'Why it was revoked';
COMMENT ON COLUMN apikey.key_status.scopes IS 'Scopes granted, sorted';

COMMENT ON COLUMN apikey.key_usage.key_id IS 'The key; NULL for tokens that match no key';
COMMENT ON COLUMN apikey.key_usage.owner IS 'The key''s owner';
COMMENT ON COLUMN apikey.key_usage.key_name IS 'The key''s name';
COMMENT ON COLUMN apikey.key_usage.bucket IS 'Start of the minute';
COMMENT ON COLUMN apikey.key_usage.calls IS 'Verifications, every verdict';
COMMENT ON COLUMN apikey.key_usage.valid_calls IS 'Verifications with verdict valid';
COMMENT ON COLUMN apikey.key_usage.failed_calls IS 'Verifications with any other verdict';
COMMENT ON COLUMN apikey.key_usage.rate_limited_calls IS 'Verifications refused by the rate limit';

COMMENT ON COLUMN apikey.live_usage.key_id IS 'The key; NULL for tokens that match no key';
COMMENT ON COLUMN apikey.live_usage.bucket IS 'Start of the minute';
COMMENT ON COLUMN apikey.live_usage.code IS 'Verdict code';
COMMENT ON COLUMN apikey.live_usage.client_addr IS 'Client address of failures (at most 16 per key and minute); NULL otherwise';
COMMENT ON COLUMN apikey.live_usage.calls IS 'Verifications not yet written to usage_log';

COMMENT ON COLUMN apikey.stats.shared_memory IS 'Whether apikey is preloaded (the other columns are NULL otherwise)';
COMMENT ON COLUMN apikey.stats.calls IS 'Verifications per verdict code since the server started (jsonb)';
COMMENT ON COLUMN apikey.stats.rate_limited IS 'Verifications refused by a rate limit since start';
COMMENT ON COLUMN apikey.stats.flushes IS 'Successful flushes of the usage writer';
COMMENT ON COLUMN apikey.stats.flush_errors IS 'Failed flushes (the counts were kept for the next one)';
COMMENT ON COLUMN apikey.stats.flushed_calls IS 'Verifications written to usage_log';
COMMENT ON COLUMN apikey.stats.entries_pending IS 'Usage counters in shared memory not yet written (all databases)';
COMMENT ON COLUMN apikey.stats.entries_dropped IS 'Counts lost to a full usage table (apikey.usage_max_entries)';
COMMENT ON COLUMN apikey.stats.last_flush IS 'When the writer last flushed; NULL = never';

-------------------------------------------------------------------------------
-- Audit trail.  Every administrative function appends one row to
-- apikey.audit_log in its own transaction; statement triggers record direct
-- DML on the key tables.  Rows are chained: row_hash = SHA-256(prev_hash ||
-- length-prefixed fields), appended one at a time under the row lock of
-- apikey.audit_head, so seq order is commit order and the chain cannot
-- fork.  Triggers refuse to change or delete rows except through
-- apikey.audit_prune(); apikey.audit_verify() finds edited, inserted and
-- deleted rows.  The settings apikey.actor and apikey.audit_context are
-- explained in src/audit.c.
-------------------------------------------------------------------------------

CREATE FUNCTION apikey._audit_context() RETURNS text
AS 'MODULE_PATHNAME', 'apikey_audit_context'
LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._audit_context()
	IS 'Internal: the apikey administrative function that is running (apikey.audit_context), or NULL';
REVOKE ALL ON FUNCTION apikey._audit_context() FROM PUBLIC;

CREATE TABLE apikey.audit_log (
	seq			bigint PRIMARY KEY,
	at			timestamptz NOT NULL,
	xact		xid8 NOT NULL,
	action		text NOT NULL,
	actor_role	name NOT NULL,
	session_role name NOT NULL,
	actor_key_id bigint,
	actor_claim	text,
	client_addr	inet,
	application_name text,
	target_key_id bigint,
	target_owner text,
	details		jsonb NOT NULL,
	prev_hash	bytea NOT NULL,
	row_hash	bytea NOT NULL
);
CREATE INDEX audit_log_target_key_id_idx ON apikey.audit_log (target_key_id);
CREATE INDEX audit_log_at_idx ON apikey.audit_log (at);
COMMENT ON TABLE apikey.audit_log IS 'Who issued, changed or revoked what, and when: one chained row per administrative call or direct change of a key table';
COMMENT ON COLUMN apikey.audit_log.seq IS 'Position in the chain: 1, 2, 3, ... without gaps, in commit order';
COMMENT ON COLUMN apikey.audit_log.at IS 'When the row was appended (clock time)';
COMMENT ON COLUMN apikey.audit_log.xact IS 'The transaction that made the change';
COMMENT ON COLUMN apikey.audit_log.action IS 'The administrative function (issue, revoke, ...), or table.operation for direct DML (keys.update, ...)';
COMMENT ON COLUMN apikey.audit_log.actor_role IS 'The role acting in the session (outside any SECURITY DEFINER function)';
COMMENT ON COLUMN apikey.audit_log.session_role IS 'The role that logged in (session_user)';
COMMENT ON COLUMN apikey.audit_log.actor_key_id IS 'The API key bound to the transaction, if any';
COMMENT ON COLUMN apikey.audit_log.actor_claim IS 'The application''s human identity (setting apikey.actor): a claim, not verified';
COMMENT ON COLUMN apikey.audit_log.client_addr IS 'Address of the connection';
COMMENT ON COLUMN apikey.audit_log.application_name IS 'The session''s application_name';
COMMENT ON COLUMN apikey.audit_log.target_key_id IS 'The key acted on, if one';
COMMENT ON COLUMN apikey.audit_log.target_owner IS 'The owner acted on (its key''s, or revoke_owner''s)';
COMMENT ON COLUMN apikey.audit_log.details IS 'Arguments, old and new values; key_ids lists the keys of a call acting on many; never a token, hash or secret';
COMMENT ON COLUMN apikey.audit_log.prev_hash IS 'row_hash of the row before (seq - 1); 32 zero bytes for seq 1';
COMMENT ON COLUMN apikey.audit_log.row_hash IS 'SHA-256 of prev_hash and the length-prefixed fields of this row';
SELECT pg_catalog.pg_extension_config_dump('apikey.audit_log', '');
REVOKE ALL ON apikey.audit_log FROM PUBLIC;

-- The lock that serializes appends.  The chain's tip is read from
-- audit_log (its newest seq) while the lock is held; the row itself is
-- updated once per appending transaction, not per row, so a transaction
-- that appends many rows does not walk a chain of its own row versions,
-- and under REPEATABLE READ a concurrent appender's commit is a
-- serialization failure rather than a duplicate seq.  Not dumped.
CREATE TABLE apikey.audit_head (
	only_row	boolean PRIMARY KEY DEFAULT true CONSTRAINT audit_head_one_row CHECK (only_row),
	xact		xid8
);
COMMENT ON TABLE apikey.audit_head IS 'One row whose row lock serializes appends to apikey.audit_log, so the chain cannot fork';
COMMENT ON COLUMN apikey.audit_head.only_row IS 'Always true: the table has one row';
COMMENT ON COLUMN apikey.audit_head.xact IS 'The last transaction that appended (NULL before the first)';
INSERT INTO apikey.audit_head (xact) VALUES (NULL);
REVOKE ALL ON apikey.audit_head FROM PUBLIC;

-- The row hash (src/audit.c): SHA-256 of prev_hash and the fields, each as
-- its length and its bytes, in a form no setting changes.
CREATE FUNCTION apikey._audit_hash(prev_hash bytea, seq bigint, at timestamptz, xact xid8, action text,
								   actor_role name, session_role name, actor_key_id bigint,
								   actor_claim text, client_addr inet, application_name text,
								   target_key_id bigint, target_owner text, details jsonb)
RETURNS bytea
AS 'MODULE_PATHNAME', 'apikey_audit_hash'
LANGUAGE C IMMUTABLE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._audit_hash(bytea, bigint, timestamptz, xid8, text, name, name, bigint, text, inet, text, bigint, text, jsonb)
	IS 'Internal: an audit row''s row_hash, SHA-256 of prev_hash and the length-prefixed fields';
REVOKE ALL ON FUNCTION apikey._audit_hash(bytea, bigint, timestamptz, xid8, text, name, name, bigint, text, inet, text, bigint, text, jsonb) FROM PUBLIC;

-- Append: a BEFORE INSERT trigger fills in who, when and the chain, under
-- the head's row lock, which it holds until commit.  A row that comes with
-- its row_hash is pg_restore (or a logical replica) bringing back rows
-- already chained: kept as they are if they hash right.  A new row is
-- accepted only from an administrative function (apikey.audit_context
-- set), so the owner cannot append one by hand.
CREATE FUNCTION apikey._audit_chain() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_xact xid8;
	v_tip_seq bigint;
	v_tip_hash bytea;
BEGIN
	SELECT h.xact INTO v_xact FROM apikey.audit_head h FOR UPDATE;
	IF NEW.row_hash IS NOT NULL THEN
		IF NEW.row_hash IS DISTINCT FROM apikey._audit_hash(NEW.prev_hash, NEW.seq, NEW.at, NEW.xact,
				NEW.action, NEW.actor_role, NEW.session_role, NEW.actor_key_id, NEW.actor_claim,
				NEW.client_addr, NEW.application_name, NEW.target_key_id, NEW.target_owner, NEW.details) THEN
			RAISE EXCEPTION 'audit row % does not match its row_hash', NEW.seq
				USING ERRCODE = '22023',
					  HINT = 'Rows with a row_hash are accepted only as dumped by pg_dump; new rows are written by apikey''s administrative functions.';
		END IF;
		RETURN NEW;
	END IF;
	IF apikey._audit_context() IS NULL THEN
		RAISE EXCEPTION 'rows of apikey.audit_log are written by apikey''s administrative functions only'
			USING ERRCODE = '42501',
				  HINT = 'Call the administrative function (apikey.issue, apikey.revoke, ...); it records itself.';
	END IF;
	IF v_xact IS DISTINCT FROM pg_catalog.pg_current_xact_id() THEN
		UPDATE apikey.audit_head SET xact = pg_catalog.pg_current_xact_id();
	END IF;
	-- the tip, read after the lock was granted (a new snapshot in READ
	-- COMMITTED), so it includes the rows of the transaction that held it
	SELECT a.seq, a.row_hash INTO v_tip_seq, v_tip_hash
	  FROM apikey.audit_log a ORDER BY a.seq DESC LIMIT 1;
	NEW.seq := COALESCE(v_tip_seq, 0) OPERATOR(pg_catalog.+) 1;
	NEW.at := pg_catalog.clock_timestamp();
	NEW.xact := pg_catalog.pg_current_xact_id();
	NEW.actor_role := apikey._acting_role();
	NEW.session_role := SESSION_USER;
	NEW.actor_key_id := apikey.current_key_id();
	NEW.actor_claim := pg_catalog.current_setting('apikey.actor', true);
	IF NEW.actor_claim OPERATOR(pg_catalog.=) '' THEN
		NEW.actor_claim := NULL;
	END IF;
	NEW.client_addr := pg_catalog.inet_client_addr();
	NEW.application_name := pg_catalog.current_setting('application_name');
	IF NEW.application_name OPERATOR(pg_catalog.=) '' THEN
		NEW.application_name := NULL;
	END IF;
	NEW.details := COALESCE(NEW.details, '{}');
	NEW.prev_hash := COALESCE(v_tip_hash, pg_catalog.decode(pg_catalog.repeat('00', 32), 'hex'));
	NEW.row_hash := apikey._audit_hash(NEW.prev_hash, NEW.seq, NEW.at, NEW.xact, NEW.action,
		NEW.actor_role, NEW.session_role, NEW.actor_key_id, NEW.actor_claim, NEW.client_addr,
		NEW.application_name, NEW.target_key_id, NEW.target_owner, NEW.details);
	RETURN NEW;
END
$$;
COMMENT ON FUNCTION apikey._audit_chain()
	IS 'Internal: trigger that chains each new audit row under the head''s row lock, and checks rows brought back by pg_restore';
REVOKE ALL ON FUNCTION apikey._audit_chain() FROM PUBLIC;

-- Rows are never changed; they are deleted only by audit_prune().
CREATE FUNCTION apikey._audit_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF TG_TABLE_NAME OPERATOR(pg_catalog.=) 'audit_head' THEN
		-- only _audit_chain() updates the head (a trigger within a trigger)
		IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' AND pg_catalog.pg_trigger_depth() OPERATOR(pg_catalog.>) 1 THEN
			RETURN NEW;
		END IF;
	ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE'
		  AND apikey._audit_context() OPERATOR(pg_catalog.=) 'audit_prune' THEN
		RETURN OLD;
	END IF;
	RAISE EXCEPTION 'apikey.% is append-only: % refused', TG_TABLE_NAME, TG_OP
		USING ERRCODE = '42501',
			  HINT = 'Remove old audit rows with apikey.audit_prune(older_than).';
END
$$;
COMMENT ON FUNCTION apikey._audit_guard()
	IS 'Internal: trigger refusing UPDATE, DELETE and TRUNCATE of the audit chain, except deletes by apikey.audit_prune()';
REVOKE ALL ON FUNCTION apikey._audit_guard() FROM PUBLIC;

CREATE TRIGGER audit_log_chain BEFORE INSERT ON apikey.audit_log
	FOR EACH ROW EXECUTE FUNCTION apikey._audit_chain();
CREATE TRIGGER audit_log_guard BEFORE UPDATE OR DELETE ON apikey.audit_log
	FOR EACH ROW EXECUTE FUNCTION apikey._audit_guard();
CREATE TRIGGER audit_log_guard_truncate BEFORE TRUNCATE ON apikey.audit_log
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._audit_guard();
CREATE TRIGGER audit_head_guard BEFORE INSERT OR UPDATE OR DELETE ON apikey.audit_head
	FOR EACH ROW EXECUTE FUNCTION apikey._audit_guard();
CREATE TRIGGER audit_head_guard_truncate BEFORE TRUNCATE ON apikey.audit_head
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._audit_guard();
ALTER TABLE apikey.audit_log ENABLE ALWAYS TRIGGER audit_log_chain;
ALTER TABLE apikey.audit_log ENABLE ALWAYS TRIGGER audit_log_guard;
ALTER TABLE apikey.audit_log ENABLE ALWAYS TRIGGER audit_log_guard_truncate;
ALTER TABLE apikey.audit_head ENABLE ALWAYS TRIGGER audit_head_guard;
ALTER TABLE apikey.audit_head ENABLE ALWAYS TRIGGER audit_head_guard_truncate;

-- The row of one administrative call; the function's SET clause names it
-- in apikey.audit_context.  Called last, after the change it records.
CREATE FUNCTION apikey._audit(action text, target_key_id bigint, target_owner text, details jsonb)
RETURNS void
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
	INSERT INTO apikey.audit_log (action, target_key_id, target_owner, details)
	VALUES (action, target_key_id, target_owner, details);
$$;
COMMENT ON FUNCTION apikey._audit(text, bigint, text, jsonb)
	IS 'Internal: append the audit row of an administrative call (only while apikey.audit_context is set)';
REVOKE ALL ON FUNCTION apikey._audit(text, bigint, text, jsonb) FROM PUBLIC;

-- Taken first by every administrative function: all of them then queue on
-- this one lock before any other, so two of them never deadlock.
CREATE FUNCTION apikey._audit_lock() RETURNS void
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT FROM apikey.audit_head FOR UPDATE;
$$;
COMMENT ON FUNCTION apikey._audit_lock()
	IS 'Internal: take the audit head''s row lock (first, in every administrative function)';
REVOKE ALL ON FUNCTION apikey._audit_lock() FROM PUBLIC;

-- Direct DML on the key tables: one row per statement, from transition
-- tables.  What an administrative function changes is left alone (it
-- writes its own row), and so is an UPDATE that changes nothing but
-- keys.last_used_at (the usage writer's).  Quota debits are UPDATEs of
-- apikey.quotas made by every verification: quotas are audited on INSERT,
-- DELETE and TRUNCATE only.  Values are listed for at most 100 rows, key
-- ids for at most 1,000; hashes never.
CREATE FUNCTION apikey._audit_direct(action text, target_key_id bigint, details jsonb) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'direct'
AS $$
	SELECT apikey._audit(action, target_key_id, NULL, details);
$$;
COMMENT ON FUNCTION apikey._audit_direct(text, bigint, jsonb)
	IS 'Internal: append the audit row of a direct change to a key table';
REVOKE ALL ON FUNCTION apikey._audit_direct(text, bigint, jsonb) FROM PUBLIC;

CREATE FUNCTION apikey._audit_dml() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_rows bigint;
	v_old jsonb;
	v_new jsonb;
	v_ids jsonb;
	v_details jsonb;
BEGIN
	IF apikey._audit_context() IS NOT NULL THEN
		RETURN NULL;
	END IF;
	IF TG_OP OPERATOR(pg_catalog.=) 'TRUNCATE' THEN
		PERFORM apikey._audit_direct(TG_TABLE_NAME OPERATOR(pg_catalog.||) '.truncate', NULL, '{}');
		RETURN NULL;
	END IF;
	IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
		IF NOT EXISTS (SELECT pg_catalog.to_jsonb(n) OPERATOR(pg_catalog.-) 'last_used_at' FROM new_rows n
					   EXCEPT ALL
					   SELECT pg_catalog.to_jsonb(o) OPERATOR(pg_catalog.-) 'last_used_at' FROM old_rows o) THEN
			RETURN NULL;
		END IF;
	END IF;

	IF TG_OP OPERATOR(pg_catalog.<>) 'INSERT' THEN
		SELECT pg_catalog.count(*), pg_catalog.jsonb_agg(r.j) FILTER (WHERE r.i OPERATOR(pg_catalog.<=) 100)
		  INTO v_rows, v_old
		  FROM (SELECT pg_catalog.to_jsonb(o) OPERATOR(pg_catalog.-) '{hash,token_hash}'::text[] AS j,
					   pg_catalog.row_number() OVER () AS i FROM old_rows o) r;
		SELECT pg_catalog.jsonb_agg(DISTINCT x.id) INTO v_ids
		  FROM (SELECT COALESCE(pg_catalog.to_jsonb(o) OPERATOR(pg_catalog.->) 'key_id',
								CASE WHEN TG_TABLE_NAME OPERATOR(pg_catalog.=) 'keys'
									 THEN pg_catalog.to_jsonb(o) OPERATOR(pg_catalog.->) 'id' END) AS id
				  FROM old_rows o LIMIT 1000) x
		 WHERE x.id OPERATOR(pg_catalog.<>) 'null';
	END IF;
	IF TG_OP OPERATOR(pg_catalog.<>) 'DELETE' THEN
		SELECT pg_catalog.count(*), pg_catalog.jsonb_agg(r.j) FILTER (WHERE r.i OPERATOR(pg_catalog.<=) 100)
		  INTO v_rows, v_new
		  FROM (SELECT pg_catalog.to_jsonb(n) OPERATOR(pg_catalog.-) '{hash,token_hash}'::text[] AS j,
					   pg_catalog.row_number() OVER () AS i FROM new_rows n) r;
		SELECT pg_catalog.jsonb_agg(DISTINCT x.id) INTO v_ids
		  FROM (SELECT COALESCE(pg_catalog.to_jsonb(n) OPERATOR(pg_catalog.->) 'key_id',
								CASE WHEN TG_TABLE_NAME OPERATOR(pg_catalog.=) 'keys'
									 THEN pg_catalog.to_jsonb(n) OPERATOR(pg_catalog.->) 'id' END) AS id
				  FROM new_rows n LIMIT 1000) x
		 WHERE x.id OPERATOR(pg_catalog.<>) 'null';
	END IF;
	IF v_rows OPERATOR(pg_catalog.=) 0 THEN
		RETURN NULL;			-- a statement that changed no row
	END IF;
	v_details := pg_catalog.jsonb_build_object('rows', v_rows);
	IF v_old IS NOT NULL THEN
		v_details := v_details OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('old', v_old);
	END IF;
	IF v_new IS NOT NULL THEN
		v_details := v_details OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('new', v_new);
	END IF;
	IF v_ids IS NOT NULL THEN
		v_details := v_details OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('key_ids', v_ids);
	END IF;
	PERFORM apikey._audit_direct(
		TG_TABLE_NAME OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.lower(TG_OP),
		CASE WHEN pg_catalog.jsonb_array_length(v_ids) OPERATOR(pg_catalog.=) 1
			 THEN (v_ids OPERATOR(pg_catalog.->>) 0)::pg_catalog.int8 END,
		v_details);
	RETURN NULL;
END
$$;
COMMENT ON FUNCTION apikey._audit_dml()
	IS 'Internal: statement trigger recording direct DML on a key table in apikey.audit_log';
REVOKE ALL ON FUNCTION apikey._audit_dml() FROM PUBLIC;

-- Give a table of the extension the four statement triggers above (no
-- UPDATE trigger where updates are not audited), enabled always.
CREATE FUNCTION apikey._audit_dml_attach(table_name name, audit_updates boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	op text;
BEGIN
	IF table_name IS NULL OR audit_updates IS NULL THEN
		RAISE EXCEPTION 'table_name and audit_updates must not be NULL' USING ERRCODE = '22004';
	END IF;
	FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete', 'truncate'] LOOP
		CONTINUE WHEN op OPERATOR(pg_catalog.=) 'update' AND NOT audit_updates;
		EXECUTE pg_catalog.format('CREATE TRIGGER %I AFTER %s ON apikey.%I %s FOR EACH STATEMENT '
								  'EXECUTE FUNCTION apikey._audit_dml()',
								  table_name OPERATOR(pg_catalog.||) '_audit_' OPERATOR(pg_catalog.||) op,
								  pg_catalog.upper(op), table_name,
								  CASE op WHEN 'insert' THEN 'REFERENCING NEW TABLE AS new_rows'
										  WHEN 'update' THEN 'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows'
										  WHEN 'delete' THEN 'REFERENCING OLD TABLE AS old_rows'
										  ELSE '' END);
		EXECUTE pg_catalog.format('ALTER TABLE apikey.%I ENABLE ALWAYS TRIGGER %I', table_name,
								  table_name OPERATOR(pg_catalog.||) '_audit_' OPERATOR(pg_catalog.||) op);
	END LOOP;
END
$$;
COMMENT ON FUNCTION apikey._audit_dml_attach(name, boolean)
	IS 'Internal: create the audit trail''s statement triggers on a table of the extension (upgrade scripts)';
REVOKE ALL ON FUNCTION apikey._audit_dml_attach(name, boolean) FROM PUBLIC;

SELECT apikey._audit_dml_attach(t, t OPERATOR(pg_catalog.<>) 'quotas')
  FROM pg_catalog.unnest('{keys,key_scopes,revocations,scopes,quotas}'::pg_catalog.name[]) t;

-- The administrative functions, each now writing its audit row.  Their
-- behaviour is otherwise unchanged.

-- revoke() without its audit row, for the functions that revoke on behalf
-- of another call (revoke_token, report_leak, ...).
CREATE FUNCTION apikey._revoke(key_id bigint, reason text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	INSERT INTO apikey.revocations (key_id, revoked_by, reason)
	VALUES (_revoke.key_id, apikey._acting_role(), _revoke.reason)
	ON CONFLICT ON CONSTRAINT revocations_pkey DO NOTHING;
	RETURN FOUND;
END
$$;
COMMENT ON FUNCTION apikey._revoke(bigint, text)
	IS 'Internal: revoke a key; true if this call revoked it (callers write the audit row)';
REVOKE ALL ON FUNCTION apikey._revoke(bigint, text) FROM PUBLIC;

-- issue() writes its audit row in C: see "Issuing as fast as a hand-written
-- INSERT" at the end of this script.

CREATE OR REPLACE FUNCTION apikey.set_limits(key_id bigint, rate_limit integer DEFAULT NULL,
											 rate_window interval DEFAULT '1 minute', quota bigint DEFAULT NULL,
											 quota_refill interval DEFAULT NULL, allowed_cidrs cidr[] DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'set_limits'
AS $$
DECLARE
	v_old apikey.keys;
BEGIN
	IF set_limits.key_id IS NULL THEN
		RAISE EXCEPTION 'key_id must not be NULL' USING ERRCODE = '22004';
	END IF;
	PERFORM apikey._check_limits(set_limits.rate_limit, set_limits.rate_window, set_limits.quota,
								 set_limits.quota_refill);
	PERFORM apikey._check_cidrs(set_limits.allowed_cidrs);
	PERFORM apikey._audit_lock();
	SELECT * INTO v_old FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) set_limits.key_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'key % does not exist', set_limits.key_id
			USING ERRCODE = '42704';
	END IF;
	UPDATE apikey.keys k
	   SET rate_limit = set_limits.rate_limit, rate_window = set_limits.rate_window,
		   quota = set_limits.quota, quota_refill = set_limits.quota_refill,
		   allowed_cidrs = set_limits.allowed_cidrs
	 WHERE k.id OPERATOR(pg_catalog.=) set_limits.key_id;
	IF set_limits.quota IS NULL THEN
		DELETE FROM apikey.quotas q WHERE q.key_id OPERATOR(pg_catalog.=) set_limits.key_id;
	ELSE
		INSERT INTO apikey.quotas AS q (key_id, remaining) VALUES (set_limits.key_id, set_limits.quota)
		ON CONFLICT ON CONSTRAINT quotas_pkey
		DO UPDATE SET remaining = excluded.remaining, refilled_at = pg_catalog.now();
	END IF;
	PERFORM apikey._audit('set_limits', v_old.id, v_old.owner, pg_catalog.jsonb_build_object(
		'old', pg_catalog.jsonb_build_object('rate_limit', v_old.rate_limit, 'rate_window', v_old.rate_window,
			'quota', v_old.quota, 'quota_refill', v_old.quota_refill, 'allowed_cidrs', v_old.allowed_cidrs),
		'new', pg_catalog.jsonb_build_object('rate_limit', set_limits.rate_limit,
			'rate_window', set_limits.rate_window, 'quota', set_limits.quota,
			'quota_refill', set_limits.quota_refill, 'allowed_cidrs', set_limits.allowed_cidrs)));
END
$$;

CREATE OR REPLACE FUNCTION apikey.revoke(key_id bigint, reason text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'revoke'
AS $$
DECLARE
	v_owner text;
	v_revoked boolean;
BEGIN
	IF revoke.key_id IS NULL THEN
		RAISE EXCEPTION 'key_id must not be NULL' USING ERRCODE = '22004';
	END IF;
	PERFORM apikey._audit_lock();
	SELECT k.owner INTO v_owner FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) revoke.key_id;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'key % does not exist', revoke.key_id
			USING ERRCODE = '42704';
	END IF;
	v_revoked := apikey._revoke(revoke.key_id, revoke.reason);
	PERFORM apikey._audit('revoke', revoke.key_id, v_owner,
		pg_catalog.jsonb_build_object('reason', revoke.reason, 'revoked', v_revoked));
	RETURN v_revoked;
END
$$;

CREATE OR REPLACE FUNCTION apikey.revoke_token(token text, reason text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'revoke_token'
AS $$
DECLARE
	v_key record;
	v_hash bytea;
	v_revoked boolean;
BEGIN
	v_hash := apikey._token_hash(revoke_token.token);
	PERFORM apikey._audit_lock();
	SELECT k.id, k.owner INTO v_key FROM apikey.keys k WHERE k.hash OPERATOR(pg_catalog.=) v_hash;
	IF v_key.id IS NULL THEN
		RAISE EXCEPTION 'no key matches this token'
			USING ERRCODE = '42704';
	END IF;
	v_revoked := apikey._revoke(v_key.id, revoke_token.reason);
	PERFORM apikey._audit('revoke_token', v_key.id, v_key.owner,
		pg_catalog.jsonb_build_object('reason', revoke_token.reason, 'revoked', v_revoked));
	RETURN v_revoked;
END
$$;

CREATE OR REPLACE FUNCTION apikey.revoke_owner(owner text, reason text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'revoke_owner'
AS $$
DECLARE
	n bigint;
	v_ids jsonb;
BEGIN
	IF revoke_owner.owner IS NULL OR revoke_owner.owner OPERATOR(pg_catalog.=) '' THEN
		RAISE EXCEPTION 'owner must not be empty'
			USING ERRCODE = '22023';
	END IF;
	PERFORM apikey._audit_lock();
	WITH revoked AS (
		INSERT INTO apikey.revocations (key_id, revoked_by, reason)
		SELECT k.id, apikey._acting_role(), revoke_owner.reason
		  FROM apikey.keys k
		 WHERE k.owner OPERATOR(pg_catalog.=) revoke_owner.owner
		ON CONFLICT ON CONSTRAINT revocations_pkey DO NOTHING
		RETURNING apikey.revocations.key_id)
	SELECT pg_catalog.count(*), COALESCE(pg_catalog.jsonb_agg(r.key_id ORDER BY r.key_id), '[]')
	  INTO n, v_ids FROM revoked r;
	PERFORM apikey._audit('revoke_owner', NULL, revoke_owner.owner,
		pg_catalog.jsonb_build_object('reason', revoke_owner.reason, 'revoked', n, 'key_ids', v_ids));
	RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION apikey.rotate(key_id bigint, grace interval DEFAULT '1 day')
RETURNS SETOF apikey.new_key
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'rotate'
AS $$
DECLARE
	v_old apikey.keys;
	v_new record;
	v_id bigint;
	v_expires timestamptz;
BEGIN
	IF rotate.key_id IS NULL THEN
		RAISE EXCEPTION 'key_id must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF rotate.grace IS NULL OR rotate.grace OPERATOR(pg_catalog.<) '0'::interval THEN
		RAISE EXCEPTION 'grace must be a non-negative interval'
			USING ERRCODE = '22023';
	END IF;
	PERFORM apikey._audit_lock();
	SELECT * INTO v_old FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) rotate.key_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'key % does not exist', rotate.key_id
			USING ERRCODE = '42704';
	END IF;
	IF EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id OPERATOR(pg_catalog.=) v_old.id) THEN
		RAISE EXCEPTION 'key % is revoked and cannot be rotated', v_old.id
			USING ERRCODE = '55000', HINT = 'Issue a new key instead.';
	END IF;
	IF v_old.expires_at IS NOT NULL AND v_old.expires_at OPERATOR(pg_catalog.<=) pg_catalog.now() THEN
		RAISE EXCEPTION 'key % has expired and cannot be rotated', v_old.id
			USING ERRCODE = '55000', HINT = 'Issue a new key instead.';
	END IF;

	-- the rate-limit bucket and the quota move to the new key; the old one
	-- draws on them from now on
	v_new := apikey._successor(v_old);
	v_id := v_new.key_id;
	DELETE FROM apikey.quotas q WHERE q.key_id OPERATOR(pg_catalog.=) v_old.id;

	-- the old key (and keys still in grace from earlier rotations of it)
	-- share the new key's budget, and the old one expires after grace
	UPDATE apikey.key_lineage l
	   SET budget_key_id = v_id
	 WHERE l.budget_key_id OPERATOR(pg_catalog.=) v_old.id;
	INSERT INTO apikey.key_lineage AS l (key_id, budget_key_id) VALUES (v_old.id, v_id)
		ON CONFLICT ON CONSTRAINT key_lineage_pkey DO UPDATE SET budget_key_id = EXCLUDED.budget_key_id;
	UPDATE apikey.keys k
	   SET expires_at = LEAST(COALESCE(k.expires_at, 'infinity'),
							  pg_catalog.now() OPERATOR(pg_catalog.+) rotate.grace)
	 WHERE k.id OPERATOR(pg_catalog.=) v_old.id;

	SELECT k.expires_at INTO v_expires FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) v_old.id;
	PERFORM apikey._audit('rotate', v_old.id, v_old.owner, pg_catalog.jsonb_build_object(
		'new_key_id', v_id, 'new_hint', v_new.hint, 'grace', rotate.grace,
		'old', pg_catalog.jsonb_build_object('expires_at', v_old.expires_at),
		'new', pg_catalog.jsonb_build_object('expires_at', v_expires),
		'key_ids', pg_catalog.jsonb_build_array(v_old.id, v_id)));

	RETURN NEXT ROW(v_id, v_new.token)::apikey.new_key;
END
$$;

-- Pruning: the only way rows leave the chain.  A contiguous run from the
-- oldest row goes; the row that records the prune keeps the row_hash of
-- the last one removed (the anchor), which the first remaining row's
-- prev_hash must match.
CREATE FUNCTION apikey.audit_prune(older_than interval) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'audit_prune'
AS $$
DECLARE
	v_through bigint;
	v_anchor bytea;
	n bigint := 0;
BEGIN
	IF audit_prune.older_than IS NULL OR audit_prune.older_than OPERATOR(pg_catalog.<=) '0'::interval THEN
		RAISE EXCEPTION 'older_than must be a positive interval'
			USING ERRCODE = '22023', HINT = 'Rows appended before now() - older_than are removed, e.g. ''400 days''.';
	END IF;
	PERFORM apikey._audit_lock();
	SELECT pg_catalog.max(a.seq) INTO v_through FROM apikey.audit_log a
	 WHERE a.at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) audit_prune.older_than);
	IF v_through IS NOT NULL THEN
		SELECT a.row_hash INTO v_anchor FROM apikey.audit_log a WHERE a.seq OPERATOR(pg_catalog.=) v_through;
		SELECT pg_catalog.count(*) INTO n FROM apikey.audit_log a WHERE a.seq OPERATOR(pg_catalog.<=) v_through;
	END IF;
	-- the prune's own row first: it stays the tip, so seq goes on
	PERFORM apikey._audit('audit_prune', NULL, NULL, pg_catalog.jsonb_build_object(
		'older_than', audit_prune.older_than, 'pruned_through', v_through,
		'anchor', pg_catalog.encode(v_anchor, 'hex'), 'rows', n));
	IF v_through IS NOT NULL THEN
		DELETE FROM apikey.audit_log a WHERE a.seq OPERATOR(pg_catalog.<=) v_through;
	END IF;
	RETURN n;
END
$$;
COMMENT ON FUNCTION apikey.audit_prune(interval)
	IS 'Remove audit rows older than the interval (the oldest first, contiguously); records the anchor it pruned to; returns rows removed';
REVOKE ALL ON FUNCTION apikey.audit_prune(interval) FROM PUBLIC;

-- Verification reads only, so it runs on a standby too.  Each row must
-- hash to its row_hash (else it was edited), and its prev_hash must be the
-- row_hash of row seq - 1, or of the anchor a prune recorded, or zeros for
-- seq 1 (else a row was inserted or deleted).  The newest rows deleted
-- leave no trace in the chain: only a checkpoint kept elsewhere shows it.
CREATE FUNCTION apikey.audit_verify(from_seq bigint DEFAULT NULL, to_seq bigint DEFAULT NULL)
RETURNS TABLE (seq bigint, problem text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	r apikey.audit_log;
	v_prev_seq bigint;
	v_prev_hash bytea;
	v_expected bytea;
BEGIN
	FOR r IN SELECT * FROM apikey.audit_log a
			  WHERE (audit_verify.from_seq IS NULL OR a.seq OPERATOR(pg_catalog.>=) audit_verify.from_seq)
				AND (audit_verify.to_seq IS NULL OR a.seq OPERATOR(pg_catalog.<=) audit_verify.to_seq)
			  ORDER BY a.seq LOOP
		IF r.row_hash IS DISTINCT FROM apikey._audit_hash(r.prev_hash, r.seq, r.at, r.xact, r.action,
				r.actor_role, r.session_role, r.actor_key_id, r.actor_claim, r.client_addr,
				r.application_name, r.target_key_id, r.target_owner, r.details) THEN
			seq := r.seq;
			problem := 'row_hash_mismatch';
			RETURN NEXT;
		END IF;
		IF v_prev_seq OPERATOR(pg_catalog.=) (r.seq OPERATOR(pg_catalog.-) 1) THEN
			v_expected := v_prev_hash;
		ELSE
			v_expected := NULL;
			SELECT a.row_hash INTO v_expected FROM apikey.audit_log a
			 WHERE a.seq OPERATOR(pg_catalog.=) (r.seq OPERATOR(pg_catalog.-) 1);
			IF NOT FOUND AND r.seq OPERATOR(pg_catalog.=) 1 THEN
				v_expected := pg_catalog.decode(pg_catalog.repeat('00', 32), 'hex');
			ELSIF NOT FOUND THEN
				SELECT pg_catalog.decode(a.details OPERATOR(pg_catalog.->>) 'anchor', 'hex') INTO v_expected
				  FROM apikey.audit_log a
				 WHERE a.action OPERATOR(pg_catalog.=) 'audit_prune'
				   AND (a.details OPERATOR(pg_catalog.->>) 'pruned_through')
					   OPERATOR(pg_catalog.=) (r.seq OPERATOR(pg_catalog.-) 1)::text
				 ORDER BY a.seq DESC LIMIT 1;
			END IF;
		END IF;
		IF r.prev_hash IS DISTINCT FROM v_expected THEN
			seq := r.seq;
			problem := 'prev_hash_mismatch';
			RETURN NEXT;
		END IF;
		v_prev_seq := r.seq;
		v_prev_hash := r.row_hash;
	END LOOP;
END
$$;
COMMENT ON FUNCTION apikey.audit_verify(bigint, bigint)
	IS 'Check the audit chain (read-only, works on a standby): row_hash_mismatch for an edited row, prev_hash_mismatch for an inserted or deleted one';
REVOKE ALL ON FUNCTION apikey.audit_verify(bigint, bigint) FROM PUBLIC;

-- For off-box anchoring: store it elsewhere, compare later.
CREATE FUNCTION apikey.audit_checkpoint(OUT seq bigint, OUT row_hash bytea, OUT at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT a.seq, a.row_hash, a.at FROM apikey.audit_log a ORDER BY a.seq DESC LIMIT 1;
$$;
COMMENT ON FUNCTION apikey.audit_checkpoint()
	IS 'The newest audit row''s seq, row_hash and time: keep them off this server to detect a rewritten or truncated chain later';
REVOKE ALL ON FUNCTION apikey.audit_checkpoint() FROM PUBLIC;

CREATE VIEW apikey.audit AS
SELECT a.seq, a.at, a.xact, a.action, a.actor_role, a.session_role, a.actor_key_id, a.actor_claim,
	   a.client_addr, a.application_name, a.target_key_id, a.target_owner, a.details,
	   pg_catalog.encode(k.hash, 'base64') AS hashed_token, a.prev_hash, a.row_hash
  FROM apikey.audit_log a
  LEFT JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) a.target_key_id;
COMMENT ON VIEW apikey.audit IS 'apikey.audit_log with the target key''s SHA-256 in base64 (GitHub''s hashed_token form); readable by the owner only';
COMMENT ON COLUMN apikey.audit.seq IS 'Position in the chain';
COMMENT ON COLUMN apikey.audit.at IS 'When the row was appended';
COMMENT ON COLUMN apikey.audit.xact IS 'The transaction that made the change';
COMMENT ON COLUMN apikey.audit.action IS 'The administrative function, or table.operation for direct DML';
COMMENT ON COLUMN apikey.audit.actor_role IS 'The role acting in the session';
COMMENT ON COLUMN apikey.audit.session_role IS 'The role that logged in';
COMMENT ON COLUMN apikey.audit.actor_key_id IS 'The API key bound to the transaction, if any';
COMMENT ON COLUMN apikey.audit.actor_claim IS 'apikey.actor: the application''s human identity, a claim';
COMMENT ON COLUMN apikey.audit.client_addr IS 'Address of the connection';
COMMENT ON COLUMN apikey.audit.application_name IS 'The session''s application_name';
COMMENT ON COLUMN apikey.audit.target_key_id IS 'The key acted on, if one';
COMMENT ON COLUMN apikey.audit.target_owner IS 'The owner acted on';
COMMENT ON COLUMN apikey.audit.details IS 'Arguments, old and new values, key_ids';
COMMENT ON COLUMN apikey.audit.hashed_token IS 'The target key''s SHA-256, base64 (as GitHub''s audit log shows hashed tokens)';
COMMENT ON COLUMN apikey.audit.prev_hash IS 'row_hash of the row before';
COMMENT ON COLUMN apikey.audit.row_hash IS 'SHA-256 of prev_hash and this row''s fields';
REVOKE ALL ON apikey.audit FROM PUBLIC;

-- Everything done to the key a token belongs to: rows that target it,
-- rows that list it in key_ids, and owner-wide rows of its owner.
CREATE FUNCTION apikey.audit_for_token(token text) RETURNS SETOF apikey.audit
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT v.*
	  FROM apikey.keys k
	  JOIN apikey.audit v
		ON v.target_key_id OPERATOR(pg_catalog.=) k.id
		OR (v.target_key_id IS NULL AND v.target_owner OPERATOR(pg_catalog.=) k.owner)
		OR (v.details OPERATOR(pg_catalog.->) 'key_ids') OPERATOR(pg_catalog.@>) pg_catalog.to_jsonb(k.id)
	 WHERE k.hash OPERATOR(pg_catalog.=) apikey._token_hash(audit_for_token.token)
	 ORDER BY v.seq;
$$;
COMMENT ON FUNCTION apikey.audit_for_token(text)
	IS 'Every audit row about the key a token belongs to; 22023 for a malformed token, no rows for an unknown one';
REVOKE ALL ON FUNCTION apikey.audit_for_token(text) FROM PUBLIC;

-------------------------------------------------------------------------------
-- Leak response.  Find checksum-valid tokens in free text (src/leak.c),
-- and report leaked ones: each report records an exposure and applies its
-- prefix's leak policy (revoke by default; a public prefix is only
-- reported), in the same transaction as its audit row.  GitHub's secret
-- scanning payload is accepted as is; a reporter role may revoke tokens it
-- holds; a trigger keeps tokens out of application tables; scanner rules
-- let operators look for their customers' keys in their own repositories.
-------------------------------------------------------------------------------

CREATE FUNCTION apikey._scan_tokens(body text, OUT pos integer, OUT len integer, OUT prefix text,
									OUT hint text, OUT hash bytea)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'apikey_scan_tokens'
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION apikey._scan_tokens(text)
	IS 'Internal: every checksum-valid token in a text: position (characters from 1), length, prefix, hint and SHA-256';
REVOKE ALL ON FUNCTION apikey._scan_tokens(text) FROM PUBLIC;

CREATE TABLE apikey.prefixes (
	prefix		text PRIMARY KEY
				CONSTRAINT prefixes_prefix_check CHECK (prefix OPERATOR(pg_catalog.~) '^[a-z][a-z0-9_]{0,15}$'),
	public		boolean NOT NULL DEFAULT false,
	leak_action	text NOT NULL DEFAULT 'revoke'
				CONSTRAINT prefixes_leak_action_check CHECK (leak_action OPERATOR(pg_catalog.=) ANY ('{revoke,suspend,notify}'::text[])),
	description	text
);
COMMENT ON TABLE apikey.prefixes IS 'Leak policy per token prefix; a prefix without a row is private with leak_action revoke';
COMMENT ON COLUMN apikey.prefixes.prefix IS 'Token prefix, e.g. ak_live';
COMMENT ON COLUMN apikey.prefixes.public IS 'Keys meant to be public (e.g. publishable keys): a leak is only reported, never acted on';
COMMENT ON COLUMN apikey.prefixes.leak_action IS 'What a leak report does: revoke (the key, reason leaked) or notify (record only); suspend is refused until keys can be suspended';
COMMENT ON COLUMN apikey.prefixes.description IS 'Free text for humans';
SELECT pg_catalog.pg_extension_config_dump('apikey.prefixes', '');
REVOKE ALL ON apikey.prefixes FROM PUBLIC;

-- Fail closed: a policy that cannot be carried out is refused when it is
-- set, not ignored when a key leaks.
CREATE FUNCTION apikey._prefixes_check() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF NEW.leak_action OPERATOR(pg_catalog.=) 'suspend' THEN
		RAISE EXCEPTION 'leak_action suspend is not available: this version of apikey cannot suspend keys'
			USING ERRCODE = '0A000',
				  HINT = 'Use revoke (the default) or notify.';
	END IF;
	RETURN NEW;
END
$$;
COMMENT ON FUNCTION apikey._prefixes_check()
	IS 'Internal: trigger refusing a leak_action apikey cannot carry out (suspend)';
REVOKE ALL ON FUNCTION apikey._prefixes_check() FROM PUBLIC;
CREATE TRIGGER prefixes_check BEFORE INSERT OR UPDATE ON apikey.prefixes
	FOR EACH ROW EXECUTE FUNCTION apikey._prefixes_check();
ALTER TABLE apikey.prefixes ENABLE ALWAYS TRIGGER prefixes_check;

CREATE TABLE apikey.exposures (
	id			bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
	key_id		bigint NOT NULL REFERENCES apikey.keys (id) ON DELETE CASCADE,
	token_hash	bytea NOT NULL
				CONSTRAINT exposures_token_hash_length CHECK (pg_catalog.octet_length(token_hash) OPERATOR(pg_catalog.=) 32),
	found_at	timestamptz NOT NULL DEFAULT pg_catalog.now(),
	reported_at	timestamptz NOT NULL DEFAULT pg_catalog.now(),
	source		text NOT NULL,
	reference	text,
	action_taken text NOT NULL
				CONSTRAINT exposures_action_taken_check
				CHECK (action_taken OPERATOR(pg_catalog.=) ANY ('{revoked,already_revoked,notified,public_prefix}'::text[])),
	reported_by	name NOT NULL,
	CONSTRAINT exposures_key_reference UNIQUE NULLS NOT DISTINCT (key_id, reference)
);
COMMENT ON TABLE apikey.exposures IS 'Leaks reported for a key: one row per key and reference (scanners resend; a resend is the same exposure)';
COMMENT ON COLUMN apikey.exposures.id IS 'Exposure id, returned by report_leak';
COMMENT ON COLUMN apikey.exposures.key_id IS 'The leaked key';
COMMENT ON COLUMN apikey.exposures.token_hash IS 'SHA-256 of the leaked token (the key''s hash); readable by the owner only';
COMMENT ON COLUMN apikey.exposures.found_at IS 'When the leak was first reported';
COMMENT ON COLUMN apikey.exposures.reported_at IS 'When it was last reported (resends move it)';
COMMENT ON COLUMN apikey.exposures.source IS 'Who found it: github:<source>, db:<schema>.<table>, revoke_leaked, or what the caller passed';
COMMENT ON COLUMN apikey.exposures.reference IS 'Where it was found, e.g. a URL; NULL if not given';
COMMENT ON COLUMN apikey.exposures.action_taken IS 'revoked, already_revoked, notified (leak_action notify) or public_prefix (nothing done)';
COMMENT ON COLUMN apikey.exposures.reported_by IS 'Role acting in the session that first reported it';
COMMENT ON SEQUENCE apikey.exposures_id_seq IS 'Exposure ids (apikey.exposures.id)';
SELECT pg_catalog.pg_extension_config_dump('apikey.exposures', '');
SELECT pg_catalog.pg_extension_config_dump('apikey.exposures_id_seq', '');
REVOKE ALL ON apikey.exposures FROM PUBLIC;
REVOKE ALL ON SEQUENCE apikey.exposures_id_seq FROM PUBLIC;

-- Direct DML on the two new tables is audited like the key tables'.
SELECT apikey._audit_dml_attach('prefixes');
SELECT apikey._audit_dml_attach('exposures');

-- The hash of a text that is exactly one well-formed token, else NULL.
CREATE FUNCTION apikey._token_hash_or_null(token text) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT s.hash FROM apikey._scan_tokens(token) s
	 WHERE s.pos OPERATOR(pg_catalog.=) 1 AND s.len OPERATOR(pg_catalog.=) pg_catalog.length(token);
$$;
COMMENT ON FUNCTION apikey._token_hash_or_null(text)
	IS 'Internal: SHA-256 of a text that is exactly one well-formed token, NULL for anything else';
REVOKE ALL ON FUNCTION apikey._token_hash_or_null(text) FROM PUBLIC;

-- What callers store about a leak is bounded, and never a token.
CREATE FUNCTION apikey._check_leak_note(what text, value text, max_bytes integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF pg_catalog.octet_length(value) OPERATOR(pg_catalog.>) max_bytes THEN
		RAISE EXCEPTION '% is too long (% bytes)', what, pg_catalog.octet_length(value)
			USING ERRCODE = '22001', HINT = pg_catalog.format('A %s is at most %s bytes.', what, max_bytes);
	END IF;
	IF EXISTS (SELECT FROM apikey._scan_tokens(value)) THEN
		RAISE EXCEPTION '% must not contain a token', what
			USING ERRCODE = '22023', HINT = 'Pass where the token was found (a URL, a ticket id), not the token.';
	END IF;
END
$$;
COMMENT ON FUNCTION apikey._check_leak_note(text, text, integer)
	IS 'Internal: refuse a leak source or reference that is too long or holds a token';
REVOKE ALL ON FUNCTION apikey._check_leak_note(text, text, integer) FROM PUBLIC;

-- One leak of the key with this hash: record the exposure (once per key
-- and reference) and apply the prefix's policy.  No audit row: the
-- calling function writes it.  key_id is NULL when no key has the hash.
CREATE FUNCTION apikey._report_leak(hash bytea, source text, reference text,
											   OUT exposure_id bigint, OUT key_id bigint, OUT owner text,
											   OUT action_taken text, OUT repeated boolean)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_prefix text;
	v_policy apikey.prefixes;
BEGIN
	repeated := false;
	SELECT k.id, k.owner, k.prefix INTO key_id, owner, v_prefix
	  FROM apikey.keys k WHERE k.hash OPERATOR(pg_catalog.=) _report_leak.hash;
	IF key_id IS NULL THEN
		RETURN;
	END IF;
	SELECT e.id, e.action_taken INTO exposure_id, action_taken
	  FROM apikey.exposures e
	 WHERE e.key_id OPERATOR(pg_catalog.=) _report_leak.key_id
	   AND e.reference IS NOT DISTINCT FROM _report_leak.reference;
	IF exposure_id IS NOT NULL THEN
		UPDATE apikey.exposures e SET reported_at = pg_catalog.now()
		 WHERE e.id OPERATOR(pg_catalog.=) exposure_id;
		repeated := true;
		RETURN;
	END IF;

	-- the id first, so a suspension's reason can name the exposure
	exposure_id := pg_catalog.nextval('apikey.exposures_id_seq'::pg_catalog.regclass);
	SELECT * INTO v_policy FROM apikey.prefixes p WHERE p.prefix OPERATOR(pg_catalog.=) v_prefix;
	IF v_policy.public THEN
		action_taken := 'public_prefix';
	ELSIF v_policy.leak_action OPERATOR(pg_catalog.=) 'notify' THEN
		action_taken := 'notified';
	ELSIF v_policy.leak_action OPERATOR(pg_catalog.=) 'suspend' THEN
		action_taken := apikey._suspend_leaked(key_id, exposure_id, _report_leak.source);
	ELSE
		-- revoke, the default; anything else fails closed to it
		action_taken := CASE WHEN apikey._revoke(key_id, 'leaked') THEN 'revoked' ELSE 'already_revoked' END;
	END IF;
	INSERT INTO apikey.exposures (id, key_id, token_hash, source, reference, action_taken, reported_by)
	VALUES (exposure_id, key_id, _report_leak.hash, _report_leak.source, _report_leak.reference, action_taken,
			apikey._acting_role());
END
$$;
COMMENT ON FUNCTION apikey._report_leak(bytea, text, text)
	IS 'Internal: record one leak of a key (once per key and reference) and apply its prefix''s leak policy (revoke, suspend, notify)';
REVOKE ALL ON FUNCTION apikey._report_leak(bytea, text, text) FROM PUBLIC;

-- report_leak() and report_leak_hash(): one leak, audited.
CREATE FUNCTION apikey._report_leak_audited(action text, hash bytea, source text, reference text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	r record;
BEGIN
	IF source IS NULL OR source OPERATOR(pg_catalog.!~) '[^[:space:]]' THEN
		RAISE EXCEPTION 'source must not be empty'
			USING ERRCODE = '22023', HINT = 'Say who found the leak, e.g. gitleaks or support.';
	END IF;
	PERFORM apikey._check_leak_note('source', source, 200);
	PERFORM apikey._check_leak_note('reference', reference, 2048);
	PERFORM apikey._audit_lock();
	r := apikey._report_leak(hash, source, reference);
	PERFORM apikey._audit(action, r.key_id, r.owner, pg_catalog.jsonb_build_object(
		'source', source, 'reference', reference, 'matched', r.key_id IS NOT NULL,
		'exposure_id', r.exposure_id, 'action_taken', r.action_taken, 'repeated', r.repeated));
	RETURN r.exposure_id;
END
$$;
COMMENT ON FUNCTION apikey._report_leak_audited(text, bytea, text, text)
	IS 'Internal: report_leak() and report_leak_hash() after their argument checks';
REVOKE ALL ON FUNCTION apikey._report_leak_audited(text, bytea, text, text) FROM PUBLIC;

CREATE FUNCTION apikey.report_leak(token text, source text, reference text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'report_leak'
AS $$
BEGIN
	-- a token in apikey's format, else a legacy token of an imported key,
	-- else malformed (_token_hash raises)
	RETURN apikey._report_leak_audited('report_leak',
		COALESCE(apikey._token_hash_or_null(report_leak.token), apikey._legacy_hash(report_leak.token),
				 apikey._token_hash(report_leak.token)),
		report_leak.source, report_leak.reference);
END
$$;
COMMENT ON FUNCTION apikey.report_leak(text, text, text)
	IS 'Report a leaked token: records the exposure and applies its prefix''s leak policy (revoke by default); returns the exposure id, NULL if no key matches';
REVOKE ALL ON FUNCTION apikey.report_leak(text, text, text) FROM PUBLIC;

CREATE FUNCTION apikey.report_leak_hash(hash bytea, source text, reference text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'report_leak_hash'
AS $$
BEGIN
	IF report_leak_hash.hash IS NULL OR pg_catalog.octet_length(report_leak_hash.hash) OPERATOR(pg_catalog.<>) 32 THEN
		RAISE EXCEPTION 'hash must be the 32-byte SHA-256 of the token'
			USING ERRCODE = '22023', HINT = 'Pass the raw digest, e.g. decode(<hex>, ''hex'') or decode(<base64>, ''base64'').';
	END IF;
	RETURN apikey._report_leak_audited('report_leak_hash', report_leak_hash.hash,
									   report_leak_hash.source, report_leak_hash.reference);
END
$$;
COMMENT ON FUNCTION apikey.report_leak_hash(bytea, text, text)
	IS 'Report a leak known only by the token''s SHA-256; otherwise as report_leak()';
REVOKE ALL ON FUNCTION apikey.report_leak_hash(bytea, text, text) FROM PUBLIC;

-- GitHub's secret scanning partner payload, [{token, type, url, source}],
-- in; its feedback array out.  Signature verification is the HTTP
-- receiver's job.  An entry without a well-formed token is a false
-- positive; so is one matching no key.
CREATE FUNCTION apikey.report_leaks(payload jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'report_leaks'
AS $$
DECLARE
	e jsonb;
	v_hash bytea;
	v_source text;
	v_reference text;
	v_key bigint;
	v_exposure bigint;
	v_feedback jsonb := '[]';
	v_keys jsonb := '[]';
	v_exposures jsonb := '[]';
	v_matched integer := 0;
BEGIN
	IF report_leaks.payload IS NULL OR pg_catalog.jsonb_typeof(report_leaks.payload) OPERATOR(pg_catalog.<>) 'array' THEN
		RAISE EXCEPTION 'payload must be a JSON array'
			USING ERRCODE = '22023', HINT = 'Pass the request body GitHub posted: [{"token": ..., "type": ..., "url": ..., "source": ...}].';
	END IF;
	IF pg_catalog.jsonb_array_length(report_leaks.payload) OPERATOR(pg_catalog.>) 1000 THEN
		RAISE EXCEPTION 'payload has % entries; at most 1000 are accepted per call',
			pg_catalog.jsonb_array_length(report_leaks.payload)
			USING ERRCODE = '54000', HINT = 'Split the payload.';
	END IF;
	PERFORM apikey._audit_lock();
	FOR e IN SELECT x FROM pg_catalog.jsonb_array_elements(report_leaks.payload) x LOOP
		v_hash := NULL;
		IF pg_catalog.jsonb_typeof(e OPERATOR(pg_catalog.->) 'token') OPERATOR(pg_catalog.=) 'string' THEN
			v_hash := COALESCE(apikey._token_hash_or_null(e OPERATOR(pg_catalog.->>) 'token'),
							   apikey._legacy_hash(e OPERATOR(pg_catalog.->>) 'token'));
		END IF;
		v_key := NULL;
		IF v_hash IS NOT NULL THEN
			-- what the payload says about where is kept only if it is
			-- short and holds no token
			v_source := 'github';
			IF pg_catalog.jsonb_typeof(e OPERATOR(pg_catalog.->) 'source') OPERATOR(pg_catalog.=) 'string'
			   AND (e OPERATOR(pg_catalog.->>) 'source') OPERATOR(pg_catalog.~) '^[A-Za-z0-9_.:-]{1,64}$' THEN
				v_source := 'github:' OPERATOR(pg_catalog.||) (e OPERATOR(pg_catalog.->>) 'source');
			END IF;
			v_reference := NULL;
			IF pg_catalog.jsonb_typeof(e OPERATOR(pg_catalog.->) 'url') OPERATOR(pg_catalog.=) 'string'
			   AND pg_catalog.octet_length(e OPERATOR(pg_catalog.->>) 'url') OPERATOR(pg_catalog.<=) 2048
			   AND NOT EXISTS (SELECT FROM apikey._scan_tokens(e OPERATOR(pg_catalog.->>) 'url')) THEN
				v_reference := e OPERATOR(pg_catalog.->>) 'url';
			END IF;
			SELECT l.key_id, l.exposure_id INTO v_key, v_exposure
			  FROM apikey._report_leak(v_hash, v_source, v_reference) l;
		END IF;
		IF v_key IS NOT NULL THEN
			v_matched := v_matched OPERATOR(pg_catalog.+) 1;
			v_keys := v_keys OPERATOR(pg_catalog.||) pg_catalog.to_jsonb(v_key);
			v_exposures := v_exposures OPERATOR(pg_catalog.||) pg_catalog.to_jsonb(v_exposure);
		END IF;
		v_feedback := v_feedback OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object(
			'token_raw', e OPERATOR(pg_catalog.->) 'token',
			'token_type', e OPERATOR(pg_catalog.->) 'type',
			'label', CASE WHEN v_key IS NOT NULL THEN 'true_positive' ELSE 'false_positive' END));
	END LOOP;
	PERFORM apikey._audit('report_leaks', NULL, NULL, pg_catalog.jsonb_build_object(
		'entries', pg_catalog.jsonb_array_length(report_leaks.payload), 'matched', v_matched,
		'key_ids', v_keys, 'exposure_ids', v_exposures));
	RETURN v_feedback;
END
$$;
COMMENT ON FUNCTION apikey.report_leaks(jsonb)
	IS 'Accept GitHub''s secret scanning payload as is (at most 1000 entries): report each matching token as report_leak() does; returns GitHub''s feedback array (true_positive / false_positive)';
REVOKE ALL ON FUNCTION apikey.report_leaks(jsonb) FROM PUBLIC;

-- For scanners and responders that hold tokens: report them as leaked.
-- Members of apikey_reporter may call it.  The answer is how many tokens
-- were well-formed, never whether a key matched.
DO $$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) 'apikey_reporter') THEN
		CREATE ROLE apikey_reporter NOLOGIN;
	END IF;
END
$$;
COMMENT ON ROLE apikey_reporter IS 'Members may call apikey.revoke_leaked() to report tokens found leaked';

CREATE FUNCTION apikey.revoke_leaked(tokens text[]) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'revoke_leaked'
AS $$
DECLARE
	v_hash bytea;
	r record;
	v_well_formed integer := 0;
	v_keys jsonb := '[]';
BEGIN
	IF revoke_leaked.tokens IS NULL THEN
		RAISE EXCEPTION 'tokens must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF pg_catalog.cardinality(revoke_leaked.tokens) OPERATOR(pg_catalog.>) 1000 THEN
		RAISE EXCEPTION '% tokens passed; at most 1000 are accepted per call', pg_catalog.cardinality(revoke_leaked.tokens)
			USING ERRCODE = '54000', HINT = 'Split the list.';
	END IF;
	PERFORM apikey._audit_lock();
	FOR v_hash IN SELECT apikey._token_hash_or_null(t) FROM pg_catalog.unnest(revoke_leaked.tokens) t LOOP
		CONTINUE WHEN v_hash IS NULL;
		v_well_formed := v_well_formed OPERATOR(pg_catalog.+) 1;
		r := apikey._report_leak(v_hash, 'revoke_leaked', NULL);
		IF r.key_id IS NOT NULL AND NOT v_keys OPERATOR(pg_catalog.@>) pg_catalog.to_jsonb(r.key_id) THEN
			v_keys := v_keys OPERATOR(pg_catalog.||) pg_catalog.to_jsonb(r.key_id);
		END IF;
	END LOOP;
	PERFORM apikey._audit('revoke_leaked', NULL, NULL, pg_catalog.jsonb_build_object(
		'tokens', pg_catalog.cardinality(revoke_leaked.tokens), 'well_formed', v_well_formed, 'key_ids', v_keys));
	RETURN v_well_formed;
END
$$;
COMMENT ON FUNCTION apikey.revoke_leaked(text[])
	IS 'Report up to 1000 tokens as leaked (each as report_leak would, source revoke_leaked); returns how many were well-formed, never whether any key matched';
REVOKE ALL ON FUNCTION apikey.revoke_leaked(text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION apikey.revoke_leaked(text[]) TO apikey_reporter;

-- Every checksum-valid token in a text, with its key and that key's state.
-- Owner-only by default: it tells whether a token belongs to a key.
CREATE FUNCTION apikey.find_tokens(body text)
RETURNS TABLE (pos integer, len integer, prefix text, hint text, key_id bigint, status text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT s.pos, s.len, s.prefix, s.hint, k.id,
		   CASE WHEN k.id IS NULL THEN 'unknown'
				WHEN EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id OPERATOR(pg_catalog.=) k.id) THEN 'revoked'
				WHEN k.expires_at OPERATOR(pg_catalog.<=) pg_catalog.now() THEN 'expired'
				ELSE 'live' END
	  FROM apikey._scan_tokens(find_tokens.body) s
	  LEFT JOIN apikey.keys k ON k.hash OPERATOR(pg_catalog.=) s.hash
	 ORDER BY s.pos;
$$;
COMMENT ON FUNCTION apikey.find_tokens(text)
	IS 'Every checksum-valid token in a text: position, length, prefix, hint, its key and status (live, revoked, expired, unknown)';
REVOKE ALL ON FUNCTION apikey.find_tokens(text) FROM PUBLIC;

-- A trigger for application tables that must never hold a token:
--   CREATE TRIGGER comments_leak_guard BEFORE INSERT OR UPDATE ON comments
--	   FOR EACH ROW EXECUTE FUNCTION apikey.leak_guard('body', 'reject');
-- reject raises (the token is never stored), redact replaces each token by
-- its hint, report keeps the row and reports each token as report_leak()
-- would, with source db:<schema>.<table>.  Only checksum-valid tokens
-- count.  EXECUTE is the owner's until granted, because report acts on
-- keys: whoever may create the trigger decides that rows revoke keys.
CREATE FUNCTION apikey.leak_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'leak_guard'
AS $$
DECLARE
	v_column text;
	v_mode text;
	v_value jsonb;
	v_text text;
	v_out text := '';
	v_at integer := 1;
	t record;
	v_key bigint;
	v_keys jsonb := '[]';
	v_source text;
BEGIN
	IF TG_WHEN OPERATOR(pg_catalog.<>) 'BEFORE' OR TG_LEVEL OPERATOR(pg_catalog.<>) 'ROW'
	   OR TG_OP OPERATOR(pg_catalog.=) 'DELETE' OR TG_NARGS OPERATOR(pg_catalog.<>) 2 THEN
		RAISE EXCEPTION 'apikey.leak_guard() must be a BEFORE INSERT OR UPDATE ... FOR EACH ROW trigger with two arguments'
			USING ERRCODE = '39P01',
				  HINT = 'EXECUTE FUNCTION apikey.leak_guard(''column'', ''reject'' | ''redact'' | ''report'').';
	END IF;
	v_column := TG_ARGV[0];
	v_mode := TG_ARGV[1];
	IF v_mode OPERATOR(pg_catalog.<>) ALL ('{reject,redact,report}'::text[]) THEN
		RAISE EXCEPTION 'leak_guard mode must be reject, redact or report, got "%"', apikey._clip(v_mode)
			USING ERRCODE = '22023';
	END IF;
	v_value := pg_catalog.to_jsonb(NEW) OPERATOR(pg_catalog.->) v_column;
	IF v_value IS NULL THEN
		RAISE EXCEPTION 'column "%" of %.% does not exist', apikey._clip(v_column), TG_TABLE_SCHEMA, TG_TABLE_NAME
			USING ERRCODE = '42703', HINT = 'Name the text column leak_guard watches as its first argument.';
	END IF;
	IF pg_catalog.jsonb_typeof(v_value) OPERATOR(pg_catalog.=) 'null' THEN
		RETURN NEW;
	END IF;
	IF pg_catalog.jsonb_typeof(v_value) OPERATOR(pg_catalog.<>) 'string' THEN
		RAISE EXCEPTION 'column "%" of %.% is not text', v_column, TG_TABLE_SCHEMA, TG_TABLE_NAME
			USING ERRCODE = '42804';
	END IF;
	-- an UPDATE that leaves the column alone was checked when it was set
	IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE'
	   AND (pg_catalog.to_jsonb(OLD) OPERATOR(pg_catalog.->) v_column) OPERATOR(pg_catalog.=) v_value THEN
		RETURN NEW;
	END IF;
	v_text := v_value OPERATOR(pg_catalog.->>) 0;

	IF v_mode OPERATOR(pg_catalog.=) 'reject' THEN
		SELECT * INTO t FROM apikey._scan_tokens(v_text) s ORDER BY s.pos LIMIT 1;
		IF FOUND THEN
			RAISE EXCEPTION 'column "%" of %.% holds an API token', v_column, TG_TABLE_SCHEMA, TG_TABLE_NAME
				USING ERRCODE = '23514',
					  DETAIL = pg_catalog.format('Token %s at character %s.', t.hint, t.pos),
					  HINT = 'Remove the token. If it is a real key, revoke it: it has left its owner.';
		END IF;
		RETURN NEW;
	END IF;

	IF v_mode OPERATOR(pg_catalog.=) 'redact' THEN
		FOR t IN SELECT * FROM apikey._scan_tokens(v_text) s ORDER BY s.pos LOOP
			v_out := v_out OPERATOR(pg_catalog.||) pg_catalog.substr(v_text, v_at, t.pos OPERATOR(pg_catalog.-) v_at)
					 OPERATOR(pg_catalog.||) t.hint;
			v_at := t.pos OPERATOR(pg_catalog.+) t.len;
		END LOOP;
		IF v_at OPERATOR(pg_catalog.>) 1 THEN
			NEW := pg_catalog.jsonb_populate_record(NEW, pg_catalog.jsonb_build_object(v_column,
					   v_out OPERATOR(pg_catalog.||) pg_catalog.substr(v_text, v_at)));
		END IF;
		RETURN NEW;
	END IF;

	-- report
	v_source := 'db:' OPERATOR(pg_catalog.||) TG_TABLE_SCHEMA OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) TG_TABLE_NAME;
	FOR t IN SELECT DISTINCT s.hash FROM apikey._scan_tokens(v_text) s LOOP
		IF pg_catalog.jsonb_array_length(v_keys) OPERATOR(pg_catalog.=) 0 THEN
			PERFORM apikey._audit_lock();
		END IF;
		SELECT l.key_id INTO v_key FROM apikey._report_leak(t.hash, v_source, NULL) l;
		IF v_key IS NOT NULL THEN
			v_keys := v_keys OPERATOR(pg_catalog.||) pg_catalog.to_jsonb(v_key);
		END IF;
	END LOOP;
	IF pg_catalog.jsonb_array_length(v_keys) OPERATOR(pg_catalog.>) 0 THEN
		PERFORM apikey._audit('leak_guard', CASE WHEN pg_catalog.jsonb_array_length(v_keys) OPERATOR(pg_catalog.=) 1
												 THEN (v_keys OPERATOR(pg_catalog.->>) 0)::pg_catalog.int8 END,
							  NULL, pg_catalog.jsonb_build_object('source', v_source, 'column', v_column,
																  'key_ids', v_keys));
	END IF;
	RETURN NEW;
END
$$;
COMMENT ON FUNCTION apikey.leak_guard()
	IS 'Trigger for application tables: leak_guard(column, reject | redact | report) keeps API tokens out of a text column';
REVOKE ALL ON FUNCTION apikey.leak_guard() FROM PUBLIC;

-- Rules for secret scanners, for every prefix in use (keys and prefixes):
-- gitleaks (TOML, extending its default rules), trufflehog (custom
-- detectors, YAML) or github (custom pattern fields).  The same regular
-- expression works in PostgreSQL, Go (RE2) and PCRE: a prefix, "_", 49
-- base62 characters, not preceded by a letter, digit or "_" and not
-- followed by a letter or digit.
CREATE FUNCTION apikey.scanner_rules(format text DEFAULT 'gitleaks') RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	p text;
	v_body text;
	v_out text;
BEGIN
	IF scanner_rules.format IS NULL
	   OR scanner_rules.format OPERATOR(pg_catalog.<>) ALL ('{gitleaks,trufflehog,github}'::text[]) THEN
		RAISE EXCEPTION 'format must be gitleaks, trufflehog or github, got %',
			COALESCE('"' OPERATOR(pg_catalog.||) apikey._clip(scanner_rules.format) OPERATOR(pg_catalog.||) '"', 'NULL')
			USING ERRCODE = '22023';
	END IF;
	v_out := CASE scanner_rules.format
		WHEN 'gitleaks' THEN E'# apikey tokens, by prefix: apikey.scanner_rules(''gitleaks'')\n[extend]\nuseDefault = true\n'
		WHEN 'trufflehog' THEN E'# apikey tokens, by prefix: apikey.scanner_rules(''trufflehog'')\ndetectors:\n'
		ELSE E'# apikey tokens: one GitHub secret scanning custom pattern per prefix\n' END;
	FOR p IN SELECT k.prefix FROM apikey.keys k UNION SELECT x.prefix FROM apikey.prefixes x ORDER BY 1 LOOP
		v_body := p OPERATOR(pg_catalog.||) '_[0-9A-Za-z]{49}';
		v_out := v_out OPERATOR(pg_catalog.||) CASE scanner_rules.format
			WHEN 'gitleaks' THEN pg_catalog.format(
				E'\n[[rules]]\nid = "apikey-%s"\ndescription = "apikey key with prefix %s"\n'
				'regex = ''''''(?:^|[^0-9A-Za-z_])(%s)(?:[^0-9A-Za-z]|$)''''''\nsecretGroup = 1\nkeywords = ["%s_"]\n',
				p, p, v_body, p)
			WHEN 'trufflehog' THEN pg_catalog.format(
				E'  - name: apikey_%s\n    keywords:\n      - %s_\n    regex:\n'
				'      token: ''(?:^|[^0-9A-Za-z_])(%s)(?:[^0-9A-Za-z]|$)''\n',
				p, p, v_body)
			ELSE pg_catalog.format(
				E'\nPattern name: apikey %s\nSecret format: %s\nBefore secret: \\A|[^0-9A-Za-z_]\nAfter secret: \\z|[^0-9A-Za-z]\n',
				p, v_body) END;
	END LOOP;
	RETURN v_out;
END
$$;
COMMENT ON FUNCTION apikey.scanner_rules(text)
	IS 'Secret scanner rules (gitleaks, trufflehog or github) matching the tokens of every prefix in use';
REVOKE ALL ON FUNCTION apikey.scanner_rules(text) FROM PUBLIC;

-------------------------------------------------------------------------------
-- apikey.stats counts the token-shaped spans the log redactor hid.  A new
-- column at the end of the view, read through its own function: the roles
-- that may execute apikey._stats() get it too, so their monitoring keeps
-- working after the update.
-------------------------------------------------------------------------------

CREATE FUNCTION apikey._tokens_redacted() RETURNS bigint
AS 'MODULE_PATHNAME', 'apikey_tokens_redacted'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._tokens_redacted()
	IS 'Internal: token-shaped spans the log redactor hid since the server started (behind apikey.stats.tokens_redacted)';
REVOKE ALL ON FUNCTION apikey._tokens_redacted() FROM PUBLIC;

-- Let every role that may execute apikey._stats() execute fn too.
CREATE FUNCTION apikey._grant_like_stats(fn pg_catalog.regprocedure)
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	grantee text;
BEGIN
	IF fn IS NULL THEN
		RAISE EXCEPTION 'fn must not be NULL' USING ERRCODE = '22004';
	END IF;
	FOR grantee IN
		SELECT CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
					ELSE pg_catalog.quote_ident(a.grantee::pg_catalog.regrole::pg_catalog.text) END
		  FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
		 WHERE p.oid OPERATOR(pg_catalog.=) 'apikey._stats()'::pg_catalog.regprocedure
		   AND a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE'
		   AND a.grantee OPERATOR(pg_catalog.<>) p.proowner
	LOOP
		EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %s', fn, grantee);
	END LOOP;
END
$$;
COMMENT ON FUNCTION apikey._grant_like_stats(pg_catalog.regprocedure)
	IS 'Internal: grant EXECUTE on a function behind a new apikey.stats column to the roles that may execute apikey._stats() (upgrade scripts)';
REVOKE ALL ON FUNCTION apikey._grant_like_stats(pg_catalog.regprocedure) FROM PUBLIC;
SELECT apikey._grant_like_stats('apikey._tokens_redacted()');

CREATE OR REPLACE VIEW apikey.stats AS
SELECT s.*, apikey._tokens_redacted() AS tokens_redacted FROM apikey._stats() s;
COMMENT ON COLUMN apikey.stats.tokens_redacted
	IS 'Token-shaped spans hidden from log lines since start (a token in both a message and its statement counts twice)';
-- Targeted cache invalidation (issue 11).  Issuing a key invalidates
-- nothing: no cache can hold a key that did not exist.  Changing, revoking
-- or deleting a key evicts that key (and the keys that draw on its budget)
-- from every backend's cache, and nothing else.  Row triggers collect the
-- ids of the keys a transaction changes; at commit it names them in shared
-- memory and sends a relcache invalidation of the view apikey._cache_signal,
-- which makes every backend evict them (a standby, which replays the
-- invalidation without the names, empties its whole cache).  TRUNCATE and
-- changes to apikey.scopes still empty every cache.  The row triggers fire
-- always, so logical replication's apply worker and
-- session_replication_role = replica are covered by the same triggers.
-------------------------------------------------------------------------------

-- A view: no storage, so nothing but a change to keys (or DDL on it)
-- ever invalidates it; VACUUM and ANALYZE never touch it.
CREATE VIEW apikey._cache_signal AS SELECT NULL::pg_catalog.bool AS unused WHERE false;
COMMENT ON VIEW apikey._cache_signal
	IS 'Internal: always empty; a transaction that changed keys sends a relcache invalidation of this view at commit, and every backend then evicts the keys it named in shared memory';
COMMENT ON COLUMN apikey._cache_signal.unused IS 'Never holds a value (the view is only invalidated, never read)';
REVOKE ALL ON apikey._cache_signal FROM PUBLIC;

CREATE FUNCTION apikey._key_changed() RETURNS trigger
AS 'MODULE_PATHNAME', 'apikey_key_changed'
LANGUAGE C;
COMMENT ON FUNCTION apikey._key_changed()
	IS 'Internal: row trigger recording which keys the transaction changed (keys, key_scopes, revocations); issued keys are not changes';
REVOKE ALL ON FUNCTION apikey._key_changed() FROM PUBLIC;
COMMENT ON FUNCTION apikey._invalidate()
	IS 'Internal: trigger that empties every backend''s key cache at commit (TRUNCATE, changes to apikey.scopes)';

DROP TRIGGER keys_invalidate ON apikey.keys;
DROP TRIGGER key_scopes_invalidate ON apikey.key_scopes;
DROP TRIGGER revocations_invalidate ON apikey.revocations;
DROP TRIGGER keys_invalidate_applied ON apikey.keys;
DROP TRIGGER key_scopes_invalidate_applied ON apikey.key_scopes;
DROP TRIGGER revocations_invalidate_applied ON apikey.revocations;

CREATE TRIGGER keys_changed
	AFTER INSERT
	   OR UPDATE OF id, owner, hash, expires_at, rate_limit, rate_window, quota, quota_refill,
					allowed_cidrs
	   OR DELETE ON apikey.keys
	FOR EACH ROW EXECUTE FUNCTION apikey._key_changed();
CREATE TRIGGER key_scopes_changed
	AFTER INSERT OR UPDATE OR DELETE ON apikey.key_scopes
	FOR EACH ROW EXECUTE FUNCTION apikey._key_changed();
CREATE TRIGGER revocations_changed
	AFTER INSERT OR UPDATE OR DELETE ON apikey.revocations
	FOR EACH ROW EXECUTE FUNCTION apikey._key_changed();
ALTER TABLE apikey.keys ENABLE ALWAYS TRIGGER keys_changed;
ALTER TABLE apikey.key_scopes ENABLE ALWAYS TRIGGER key_scopes_changed;
ALTER TABLE apikey.revocations ENABLE ALWAYS TRIGGER revocations_changed;

CREATE TRIGGER keys_invalidate
	AFTER TRUNCATE ON apikey.keys
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._invalidate();
CREATE TRIGGER key_scopes_invalidate
	AFTER TRUNCATE ON apikey.key_scopes
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._invalidate();
CREATE TRIGGER revocations_invalidate
	AFTER TRUNCATE ON apikey.revocations
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._invalidate();
ALTER TABLE apikey.keys ENABLE ALWAYS TRIGGER keys_invalidate;
ALTER TABLE apikey.key_scopes ENABLE ALWAYS TRIGGER key_scopes_invalidate;
ALTER TABLE apikey.revocations ENABLE ALWAYS TRIGGER revocations_invalidate;

-------------------------------------------------------------------------------
-- Issuing as fast as a hand-written INSERT (issue 11).  issue() and the
-- argument checks it shares with set_limits() are C now (src/issue.c):
-- the same arguments, errors and privileges, without a query per check,
-- and a key without scopes or quota writes apikey.keys only.
-- issue_many() issues one key per owner with the settings checked once
-- and one INSERT per table for the whole batch.  Both write their audit
-- row as the PL/pgSQL issue() above did (issue_many: one row per call).
-------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION apikey._check_scopes(scopes text[]) RETURNS text[]
AS 'MODULE_PATHNAME', 'apikey_check_scopes'
LANGUAGE C STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION apikey._check_limits(rate_limit integer, rate_window interval, quota bigint,
												quota_refill interval) RETURNS void
AS 'MODULE_PATHNAME', 'apikey_check_limits'
LANGUAGE C IMMUTABLE;

CREATE OR REPLACE FUNCTION apikey._check_cidrs(allowed_cidrs cidr[]) RETURNS void
AS 'MODULE_PATHNAME', 'apikey_check_cidrs'
LANGUAGE C IMMUTABLE;

CREATE OR REPLACE FUNCTION apikey.issue(owner text, scopes text[] DEFAULT '{}', name text DEFAULT NULL,
										expires_at timestamptz DEFAULT NULL, prefix text DEFAULT 'ak',
										metadata jsonb DEFAULT '{}', rate_limit integer DEFAULT NULL,
										rate_window interval DEFAULT '1 minute', quota bigint DEFAULT NULL,
										quota_refill interval DEFAULT NULL, allowed_cidrs cidr[] DEFAULT NULL)
RETURNS SETOF apikey.new_key
AS 'MODULE_PATHNAME', 'apikey_issue'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'issue';

CREATE FUNCTION apikey.issue_many(owners text[], scopes text[] DEFAULT '{}', name text DEFAULT NULL,
								  expires_at timestamptz DEFAULT NULL, prefix text DEFAULT 'ak',
								  metadata jsonb DEFAULT '{}', rate_limit integer DEFAULT NULL,
								  rate_window interval DEFAULT '1 minute', quota bigint DEFAULT NULL,
								  quota_refill interval DEFAULT NULL, allowed_cidrs cidr[] DEFAULT NULL)
RETURNS SETOF apikey.new_key
AS 'MODULE_PATHNAME', 'apikey_issue_many'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'issue_many';
COMMENT ON FUNCTION apikey.issue_many(text[], text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[])
	IS 'Issue one key per element of owners (at most 10000), all with the same settings; the tokens are shown once and never stored';
REVOKE ALL ON FUNCTION apikey.issue_many(text[], text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[]) FROM PUBLIC;

-------------------------------------------------------------------------------
-- The table states every bound the functions check (issue 10): a refill
-- without a quota was refused by issue()/set_limits() but accepted by a
-- direct write.  Such a refill never did anything (no quota, nothing to
-- refill), so existing ones are cleared before the constraint is added.
-------------------------------------------------------------------------------
UPDATE apikey.keys SET quota_refill = NULL
 WHERE quota IS NULL AND quota_refill IS NOT NULL;
ALTER TABLE apikey.keys ADD CONSTRAINT keys_quota_refill_needs_quota
	CHECK (quota_refill IS NULL OR quota IS NOT NULL);

-------------------------------------------------------------------------------
-- Reversible responses (issue 12): suspend and resume a key or an owner,
-- quarantine a key to some of its scopes and release it, reissue a key,
-- throttle it for a while.  A row in suspensions or quarantines takes
-- effect at commit in every backend (and on standbys, through WAL): row
-- triggers name the key, and every backend evicts just that key, as for
-- revocations (targeted cache invalidation, above).  A timed one (until)
-- ends by the clock, judged at each call.  Every response is an
-- administrative function: it takes the audit lock first and writes its
-- audit row in its own transaction.
-------------------------------------------------------------------------------

CREATE TABLE apikey.suspensions (
	key_id		bigint PRIMARY KEY REFERENCES apikey.keys (id) ON DELETE CASCADE,
	since		timestamptz NOT NULL DEFAULT pg_catalog.now(),
	until		timestamptz,
	reason		text NOT NULL,
	by			name NOT NULL,
	finding_id	bigint,
	CONSTRAINT suspensions_until_check CHECK (until OPERATOR(pg_catalog.>) since)
);
COMMENT ON TABLE apikey.suspensions IS 'One row per suspended key: verifications answer suspended until the row is deleted (apikey.resume) or its until passes';
COMMENT ON COLUMN apikey.suspensions.key_id IS 'The suspended key';
COMMENT ON COLUMN apikey.suspensions.since IS 'When it was suspended';
COMMENT ON COLUMN apikey.suspensions.until IS 'When the suspension ends by itself; NULL = until resumed';
COMMENT ON COLUMN apikey.suspensions.reason IS 'Why, free text';
COMMENT ON COLUMN apikey.suspensions.by IS 'Role that suspended it (acting in the session)';
COMMENT ON COLUMN apikey.suspensions.finding_id IS 'The detector finding that caused it; NULL when a person did';

CREATE TABLE apikey.quarantines (
	key_id		bigint PRIMARY KEY REFERENCES apikey.keys (id) ON DELETE CASCADE,
	allowed_scopes text[] NOT NULL
				CONSTRAINT quarantines_allowed_scopes_check
				CHECK (pg_catalog.cardinality(allowed_scopes) OPERATOR(pg_catalog.>) 0),
	since		timestamptz NOT NULL DEFAULT pg_catalog.now(),
	until		timestamptz,
	reason		text NOT NULL,
	by			name NOT NULL,
	finding_id	bigint,
	CONSTRAINT quarantines_until_check CHECK (until OPERATOR(pg_catalog.>) since)
);
COMMENT ON TABLE apikey.quarantines IS 'One row per quarantined key: only the scopes in allowed_scopes keep working, others answer quarantined, until apikey.release or until passes';
COMMENT ON COLUMN apikey.quarantines.key_id IS 'The quarantined key';
COMMENT ON COLUMN apikey.quarantines.allowed_scopes IS 'Grants (names, prefix:* or *) the key may still use, within its own scopes';
COMMENT ON COLUMN apikey.quarantines.since IS 'When it was quarantined';
COMMENT ON COLUMN apikey.quarantines.until IS 'When the quarantine ends by itself; NULL = until released';
COMMENT ON COLUMN apikey.quarantines.reason IS 'Why, free text';
COMMENT ON COLUMN apikey.quarantines.by IS 'Role that quarantined it (acting in the session)';
COMMENT ON COLUMN apikey.quarantines.finding_id IS 'The detector finding that caused it; NULL when a person did';

SELECT pg_catalog.pg_extension_config_dump('apikey.suspensions', '');
SELECT pg_catalog.pg_extension_config_dump('apikey.quarantines', '');
REVOKE ALL ON apikey.suspensions, apikey.quarantines FROM PUBLIC;

-- The cache: a row changed evicts its key; TRUNCATE empties every cache.
CREATE TRIGGER suspensions_changed
	AFTER INSERT OR UPDATE OR DELETE ON apikey.suspensions
	FOR EACH ROW EXECUTE FUNCTION apikey._key_changed();
CREATE TRIGGER quarantines_changed
	AFTER INSERT OR UPDATE OR DELETE ON apikey.quarantines
	FOR EACH ROW EXECUTE FUNCTION apikey._key_changed();
CREATE TRIGGER suspensions_invalidate
	AFTER TRUNCATE ON apikey.suspensions
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._invalidate();
CREATE TRIGGER quarantines_invalidate
	AFTER TRUNCATE ON apikey.quarantines
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._invalidate();
ALTER TABLE apikey.suspensions ENABLE ALWAYS TRIGGER suspensions_changed;
ALTER TABLE apikey.quarantines ENABLE ALWAYS TRIGGER quarantines_changed;
ALTER TABLE apikey.suspensions ENABLE ALWAYS TRIGGER suspensions_invalidate;
ALTER TABLE apikey.quarantines ENABLE ALWAYS TRIGGER quarantines_invalidate;
COMMENT ON FUNCTION apikey._key_changed()
	IS 'Internal: row trigger recording which keys the transaction changed (keys, key_scopes, revocations, suspensions, quarantines); issued keys are not changes';

-- The audit trail: direct DML on them is recorded like the key tables'.
SELECT apikey._audit_dml_attach('suspensions');
SELECT apikey._audit_dml_attach('quarantines');

-- The key a response acts on: the audit lock first (every administrative
-- function queues there before any other lock), then the key's row,
-- locked against a concurrent response.
CREATE FUNCTION apikey._lock_key(key_id bigint)
RETURNS apikey.keys
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_key apikey.keys;
BEGIN
	IF _lock_key.key_id IS NULL THEN
		RAISE EXCEPTION 'key_id must not be NULL' USING ERRCODE = '22004';
	END IF;
	PERFORM apikey._audit_lock();
	SELECT * INTO v_key FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) _lock_key.key_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'key % does not exist', _lock_key.key_id
			USING ERRCODE = '42704';
	END IF;
	RETURN v_key;
END
$$;
COMMENT ON FUNCTION apikey._lock_key(bigint)
	IS 'Internal: take the audit lock, then lock and return the key''s row (42704 if there is none)';
REVOKE ALL ON FUNCTION apikey._lock_key(bigint) FROM PUBLIC;

-- The arguments every timed response checks the same way: the reason is
-- given, for_ is positive or NULL.  what: "the key is suspended", ...
CREATE FUNCTION apikey._check_response(reason text, for_ interval, what text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF _check_response.reason IS NULL OR _check_response.reason OPERATOR(pg_catalog.!~) '[^[:space:]]' THEN
		RAISE EXCEPTION 'reason must not be empty'
			USING ERRCODE = '22004', HINT = pg_catalog.format('Say why %s, e.g. ''credential stuffing from 203.0.113.7''.', _check_response.what);
	END IF;
	IF _check_response.for_ IS NOT NULL AND _check_response.for_ OPERATOR(pg_catalog.<=) '0'::interval THEN
		RAISE EXCEPTION 'for_ must be a positive interval, got %', _check_response.for_
			USING ERRCODE = '22023', HINT = 'Pass NULL for a response that lasts until it is lifted.';
	END IF;
END
$$;
COMMENT ON FUNCTION apikey._check_response(text, interval, text)
	IS 'Internal: check a response''s reason and duration (suspend, quarantine, suspend_owner)';
REVOKE ALL ON FUNCTION apikey._check_response(text, interval, text) FROM PUBLIC;

-- suspend() and quarantine(): their arguments checked, then the key locked.
CREATE FUNCTION apikey._response_key(key_id bigint, reason text, for_ interval, what text)
RETURNS apikey.keys
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF _response_key.key_id IS NULL THEN
		RAISE EXCEPTION 'key_id must not be NULL' USING ERRCODE = '22004';
	END IF;
	PERFORM apikey._check_response(_response_key.reason, _response_key.for_, _response_key.what);
	RETURN apikey._lock_key(_response_key.key_id);
END
$$;
COMMENT ON FUNCTION apikey._response_key(bigint, text, interval, text)
	IS 'Internal: check a response''s arguments, take the audit lock and lock the key row (suspend, quarantine)';
REVOKE ALL ON FUNCTION apikey._response_key(bigint, text, interval, text) FROM PUBLIC;

CREATE FUNCTION apikey.suspend(key_id bigint, reason text, for_ interval DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'suspend'
AS $$
DECLARE
	v_key apikey.keys;
	v_old apikey.suspensions;
	v_until timestamptz;
	v_was boolean;
BEGIN
	v_key := apikey._response_key(suspend.key_id, suspend.reason, suspend.for_, 'the key is suspended');
	SELECT * INTO v_old FROM apikey.suspensions s WHERE s.key_id OPERATOR(pg_catalog.=) v_key.id;
	v_was := v_old.key_id IS NOT NULL AND (v_old.until IS NULL OR v_old.until OPERATOR(pg_catalog.>) pg_catalog.now());
	v_until := pg_catalog.now() OPERATOR(pg_catalog.+) suspend.for_;
	INSERT INTO apikey.suspensions AS s (key_id, until, reason, by)
	VALUES (v_key.id, v_until, suspend.reason, apikey._acting_role())
	ON CONFLICT ON CONSTRAINT suspensions_pkey
	DO UPDATE SET since = excluded.since, until = excluded.until, reason = excluded.reason,
				  by = excluded.by, finding_id = NULL;
	PERFORM apikey._audit('suspend', v_key.id, v_key.owner, pg_catalog.jsonb_build_object(
		'reason', suspend.reason, 'for', suspend.for_, 'until', v_until,
		'old', CASE WHEN v_was THEN pg_catalog.jsonb_build_object('since', v_old.since, 'until', v_old.until,
																   'reason', v_old.reason) END));
	RETURN NOT v_was;
END
$$;
COMMENT ON FUNCTION apikey.suspend(bigint, text, interval)
	IS 'Suspend a key: it answers suspended (authenticate raises 28000) from this commit on, for for_ or until resumed; true if it was not suspended (suspending again replaces the suspension)';
REVOKE ALL ON FUNCTION apikey.suspend(bigint, text, interval) FROM PUBLIC;

CREATE FUNCTION apikey.resume(key_id bigint, note text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'resume'
AS $$
DECLARE
	v_key apikey.keys;
	v_old apikey.suspensions;
	v_exposures bigint[];
BEGIN
	v_key := apikey._lock_key(resume.key_id);
	IF EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id OPERATOR(pg_catalog.=) v_key.id) THEN
		RAISE EXCEPTION 'key % is revoked and cannot be resumed', v_key.id
			USING ERRCODE = '55000', HINT = 'Revocation is permanent: issue a new key with apikey.reissue().';
	END IF;
	v_exposures := apikey._exposure_ids(v_key.id);
	IF pg_catalog.cardinality(v_exposures) OPERATOR(pg_catalog.>) 0 THEN
		RAISE EXCEPTION 'key % was reported leaked and cannot be resumed', v_key.id
			USING ERRCODE = '55000',
				  DETAIL = pg_catalog.format('Its exposures in apikey.exposures: %s.', pg_catalog.array_to_string(v_exposures, ', ')),
				  HINT = 'Its token is known to others: replace it with apikey.reissue(), which revokes it and issues a new key.';
	END IF;
	DELETE FROM apikey.suspensions s WHERE s.key_id OPERATOR(pg_catalog.=) v_key.id
	RETURNING s.* INTO v_old;
	PERFORM apikey._audit('resume', v_key.id, v_key.owner, pg_catalog.jsonb_build_object(
		'note', resume.note, 'resumed', v_old.key_id IS NOT NULL,
		'old', CASE WHEN v_old.key_id IS NOT NULL
					THEN pg_catalog.jsonb_build_object('since', v_old.since, 'until', v_old.until,
													   'reason', v_old.reason) END));
	RETURN v_old.key_id IS NOT NULL;
END
$$;
COMMENT ON FUNCTION apikey.resume(bigint, text)
	IS 'Lift a key''s suspension from this commit on; true if it was suspended.  A revoked key or one reported leaked (in apikey.exposures) cannot be resumed (55000): reissue it';
REVOKE ALL ON FUNCTION apikey.resume(bigint, text) FROM PUBLIC;

CREATE FUNCTION apikey.suspend_owner(owner text, reason text, for_ interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'suspend_owner'
AS $$
DECLARE
	n bigint;
	v_ids jsonb;
	v_until timestamptz;
BEGIN
	IF suspend_owner.owner IS NULL OR suspend_owner.owner OPERATOR(pg_catalog.=) '' THEN
		RAISE EXCEPTION 'owner must not be empty' USING ERRCODE = '22023';
	END IF;
	PERFORM apikey._check_response(suspend_owner.reason, suspend_owner.for_, 'the owner''s keys are suspended');
	PERFORM apikey._audit_lock();
	v_until := pg_catalog.now() OPERATOR(pg_catalog.+) suspend_owner.for_;
	WITH suspended AS (
		INSERT INTO apikey.suspensions AS s (key_id, until, reason, by)
		SELECT k.id, v_until, suspend_owner.reason, apikey._acting_role()
		  FROM apikey.keys k
		 WHERE k.owner OPERATOR(pg_catalog.=) suspend_owner.owner
		   AND NOT EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id OPERATOR(pg_catalog.=) k.id)
		 ORDER BY k.id
		ON CONFLICT ON CONSTRAINT suspensions_pkey
		DO UPDATE SET since = excluded.since, until = excluded.until, reason = excluded.reason,
					  by = excluded.by, finding_id = NULL
		RETURNING s.key_id)
	SELECT pg_catalog.count(*), COALESCE(pg_catalog.jsonb_agg(x.key_id ORDER BY x.key_id), '[]')
	  INTO n, v_ids FROM suspended x;
	PERFORM apikey._audit('suspend_owner', NULL, suspend_owner.owner, pg_catalog.jsonb_build_object(
		'reason', suspend_owner.reason, 'for', suspend_owner.for_, 'until', v_until,
		'suspended', n, 'key_ids', v_ids));
	RETURN n;
END
$$;
COMMENT ON FUNCTION apikey.suspend_owner(text, text, interval)
	IS 'Suspend every unrevoked key of an owner (keys issued later are not); returns how many';
REVOKE ALL ON FUNCTION apikey.suspend_owner(text, text, interval) FROM PUBLIC;

CREATE FUNCTION apikey.resume_owner(owner text, note text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'resume_owner'
AS $$
DECLARE
	n bigint;
	v_ids jsonb;
	v_exposed jsonb;
BEGIN
	IF resume_owner.owner IS NULL OR resume_owner.owner OPERATOR(pg_catalog.=) '' THEN
		RAISE EXCEPTION 'owner must not be empty' USING ERRCODE = '22023';
	END IF;
	PERFORM apikey._audit_lock();
	-- an exposed key stays suspended: its token is known to others
	SELECT COALESCE(pg_catalog.jsonb_agg(s.key_id ORDER BY s.key_id), '[]') INTO v_exposed
	  FROM apikey.suspensions s JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) s.key_id
	 WHERE k.owner OPERATOR(pg_catalog.=) resume_owner.owner
	   AND EXISTS (SELECT FROM apikey.exposures e WHERE e.key_id OPERATOR(pg_catalog.=) s.key_id);
	WITH resumed AS (
		DELETE FROM apikey.suspensions s
		 USING apikey.keys k
		 WHERE k.id OPERATOR(pg_catalog.=) s.key_id AND k.owner OPERATOR(pg_catalog.=) resume_owner.owner
		   AND NOT v_exposed OPERATOR(pg_catalog.@>) pg_catalog.to_jsonb(s.key_id)
		RETURNING s.key_id)
	SELECT pg_catalog.count(*), COALESCE(pg_catalog.jsonb_agg(x.key_id ORDER BY x.key_id), '[]')
	  INTO n, v_ids FROM resumed x;
	IF pg_catalog.jsonb_array_length(v_exposed) OPERATOR(pg_catalog.>) 0 THEN
		RAISE NOTICE '% suspended keys of owner "%" were reported leaked and stay suspended: %',
			pg_catalog.jsonb_array_length(v_exposed), resume_owner.owner, v_exposed
			USING HINT = 'Replace each with apikey.reissue(key_id).';
	END IF;
	PERFORM apikey._audit('resume_owner', NULL, resume_owner.owner, pg_catalog.jsonb_build_object(
		'note', resume_owner.note, 'resumed', n, 'key_ids', v_ids,
		'skipped_exposed', pg_catalog.jsonb_array_length(v_exposed), 'exposed_key_ids', v_exposed));
	RETURN n;
END
$$;
COMMENT ON FUNCTION apikey.resume_owner(text, text)
	IS 'Lift the suspension of every key of an owner; returns how many were suspended.  Revoked keys stay revoked; keys reported leaked stay suspended (a NOTICE says how many)';
REVOKE ALL ON FUNCTION apikey.resume_owner(text, text) FROM PUBLIC;

CREATE FUNCTION apikey.quarantine(key_id bigint, allowed_scopes text[], reason text,
								  for_ interval DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'quarantine'
AS $$
DECLARE
	v_key apikey.keys;
	v_allowed text[];
	v_old apikey.quarantines;
	v_until timestamptz;
	v_was boolean;
BEGIN
	v_key := apikey._response_key(quarantine.key_id, quarantine.reason, quarantine.for_, 'the key is quarantined');
	IF quarantine.allowed_scopes IS NULL THEN
		RAISE EXCEPTION 'allowed_scopes must not be NULL'
			USING ERRCODE = '22004', HINT = 'Use apikey.suspend() to stop every scope.';
	END IF;
	IF pg_catalog.cardinality(quarantine.allowed_scopes) OPERATOR(pg_catalog.=) 0 THEN
		RAISE EXCEPTION 'allowed_scopes must not be empty'
			USING ERRCODE = '22023', HINT = 'Use apikey.suspend() to stop every scope.';
	END IF;
	v_allowed := apikey._check_scopes(quarantine.allowed_scopes);
	SELECT * INTO v_old FROM apikey.quarantines q WHERE q.key_id OPERATOR(pg_catalog.=) v_key.id;
	v_was := v_old.key_id IS NOT NULL AND (v_old.until IS NULL OR v_old.until OPERATOR(pg_catalog.>) pg_catalog.now());
	v_until := pg_catalog.now() OPERATOR(pg_catalog.+) quarantine.for_;
	INSERT INTO apikey.quarantines AS q (key_id, allowed_scopes, until, reason, by)
	VALUES (v_key.id, v_allowed, v_until, quarantine.reason, apikey._acting_role())
	ON CONFLICT ON CONSTRAINT quarantines_pkey
	DO UPDATE SET allowed_scopes = excluded.allowed_scopes, since = excluded.since,
				  until = excluded.until, reason = excluded.reason, by = excluded.by,
				  finding_id = NULL;
	PERFORM apikey._audit('quarantine', v_key.id, v_key.owner, pg_catalog.jsonb_build_object(
		'allowed_scopes', v_allowed, 'reason', quarantine.reason, 'for', quarantine.for_, 'until', v_until,
		'old', CASE WHEN v_was THEN pg_catalog.jsonb_build_object('allowed_scopes', v_old.allowed_scopes,
			'since', v_old.since, 'until', v_old.until, 'reason', v_old.reason) END));
	RETURN NOT v_was;
END
$$;
COMMENT ON FUNCTION apikey.quarantine(bigint, text[], text, interval)
	IS 'Quarantine a key from this commit on: scopes outside allowed_scopes answer quarantined (authenticate raises 42501), the rest keep working; for for_ or until released; true if it was not quarantined';
REVOKE ALL ON FUNCTION apikey.quarantine(bigint, text[], text, interval) FROM PUBLIC;

CREATE FUNCTION apikey.release(key_id bigint)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'release'
AS $$
DECLARE
	v_key apikey.keys;
	v_old apikey.quarantines;
BEGIN
	v_key := apikey._lock_key(release.key_id);
	DELETE FROM apikey.quarantines q WHERE q.key_id OPERATOR(pg_catalog.=) v_key.id
	RETURNING q.* INTO v_old;
	PERFORM apikey._audit('release', v_key.id, v_key.owner, pg_catalog.jsonb_build_object(
		'released', v_old.key_id IS NOT NULL,
		'old', CASE WHEN v_old.key_id IS NOT NULL
					THEN pg_catalog.jsonb_build_object('allowed_scopes', v_old.allowed_scopes, 'since', v_old.since,
													   'until', v_old.until, 'reason', v_old.reason) END));
	RETURN v_old.key_id IS NOT NULL;
END
$$;
COMMENT ON FUNCTION apikey.release(bigint)
	IS 'Lift a key''s quarantine from this commit on; true if it was quarantined';
REVOKE ALL ON FUNCTION apikey.release(bigint) FROM PUBLIC;

CREATE FUNCTION apikey.reissue(key_id bigint)
RETURNS SETOF apikey.new_key
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'reissue'
AS $$
DECLARE
	v_old apikey.keys;
	v_new record;
	v_id bigint;
	v_revoked boolean;
	v_exposures bigint[];
BEGIN
	v_old := apikey._lock_key(reissue.key_id);
	v_exposures := apikey._exposure_ids(v_old.id);
	IF pg_catalog.cardinality(v_exposures) OPERATOR(pg_catalog.=) 0
	   AND NOT EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id OPERATOR(pg_catalog.=) v_old.id)
	   AND NOT EXISTS (SELECT FROM apikey.suspensions s WHERE s.key_id OPERATOR(pg_catalog.=) v_old.id
						  AND (s.until IS NULL OR s.until OPERATOR(pg_catalog.>) pg_catalog.now()))
	   AND NOT EXISTS (SELECT FROM apikey.quarantines q WHERE q.key_id OPERATOR(pg_catalog.=) v_old.id
						  AND (q.until IS NULL OR q.until OPERATOR(pg_catalog.>) pg_catalog.now())) THEN
		RAISE EXCEPTION 'key % is not revoked, suspended, quarantined or reported leaked', v_old.id
			USING ERRCODE = '55000', HINT = 'Use apikey.rotate() to replace a key in good standing.';
	END IF;
	IF v_old.expires_at IS NOT NULL AND v_old.expires_at OPERATOR(pg_catalog.<=) pg_catalog.now() THEN
		RAISE EXCEPTION 'key % has expired and cannot be reissued', v_old.id
			USING ERRCODE = '55000', HINT = 'Issue a new key instead.';
	END IF;

	-- the new key starts from the old budget (reissuing never refills it)
	v_new := apikey._successor(v_old);
	v_id := v_new.key_id;

	-- no grace: the old key is revoked in the same transaction
	v_revoked := apikey._revoke(v_old.id, 'reissued as key ' OPERATOR(pg_catalog.||) v_id);
	-- never silently: the row says the old key was exposed, and where
	PERFORM apikey._audit('reissue', v_old.id, v_old.owner, pg_catalog.jsonb_build_object(
		'new_key_id', v_id, 'new_hint', v_new.hint, 'revoked', v_revoked,
		'exposed', pg_catalog.cardinality(v_exposures) OPERATOR(pg_catalog.>) 0,
		'exposure_ids', pg_catalog.to_jsonb(v_exposures),
		'key_ids', pg_catalog.jsonb_build_array(v_old.id, v_id)));

	RETURN NEXT ROW(v_id, v_new.token)::apikey.new_key;
END
$$;
COMMENT ON FUNCTION apikey.reissue(bigint)
	IS 'Replace a revoked, suspended, quarantined or leaked key with a new one (same owner, scopes, limits, metadata, remaining quota); the old key is revoked at once, no grace; the audit row names the old key''s exposures';
REVOKE ALL ON FUNCTION apikey.reissue(bigint) FROM PUBLIC;

CREATE OR REPLACE VIEW apikey.key_status AS
SELECT k.id AS key_id, k.owner, k.name, k.hint, k.created_at, k.created_by, k.expires_at,
	   k.last_used_at, l.rotated_from,
	   CASE WHEN r.key_id IS NOT NULL THEN 'revoked'
			WHEN k.expires_at OPERATOR(pg_catalog.<=) pg_catalog.now() THEN 'expired'
			WHEN s.key_id IS NOT NULL THEN 'suspended'
			WHEN q.key_id IS NOT NULL THEN 'quarantined'
			ELSE 'active' END AS status,
	   r.revoked_at, r.reason AS revoked_reason,
	   ARRAY(SELECT ks.scope FROM apikey.key_scopes ks
			  WHERE ks.key_id OPERATOR(pg_catalog.=) k.id ORDER BY ks.scope) AS scopes
  FROM apikey.keys k
  LEFT JOIN apikey.key_lineage l ON l.key_id OPERATOR(pg_catalog.=) k.id
  LEFT JOIN apikey.revocations r ON r.key_id OPERATOR(pg_catalog.=) k.id
  LEFT JOIN apikey.suspensions s ON s.key_id OPERATOR(pg_catalog.=) k.id
		AND (s.until IS NULL OR s.until OPERATOR(pg_catalog.>) pg_catalog.now())
  LEFT JOIN apikey.quarantines q ON q.key_id OPERATOR(pg_catalog.=) k.id
		AND (q.until IS NULL OR q.until OPERATOR(pg_catalog.>) pg_catalog.now());
COMMENT ON VIEW apikey.key_status IS 'Every key with its status (active, revoked, expired, suspended, quarantined) and scopes; no hashes';
COMMENT ON COLUMN apikey.key_status.status IS 'revoked, expired, suspended, quarantined or active (the first that applies; a timed suspension or quarantine counts until its until)';

-------------------------------------------------------------------------------
-- Failure limiter (issue 12): a client network asserted by a trusted proxy
-- that keeps presenting bad tokens is answered address_blocked, in shared
-- memory, before any lookup (src/failurelimit.c).  apikey.stats counts the
-- failures of networks it had no room to track, in a new last column read
-- through its own function, granted like tokens_redacted's (above).
-------------------------------------------------------------------------------

CREATE FUNCTION apikey._failure_networks_untracked() RETURNS bigint
AS 'MODULE_PATHNAME', 'apikey_failure_networks_untracked'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._failure_networks_untracked()
	IS 'Internal: failures from client networks the failure limiter had no room to track, since the server started (behind apikey.stats.failure_networks_untracked)';
REVOKE ALL ON FUNCTION apikey._failure_networks_untracked() FROM PUBLIC;
SELECT apikey._grant_like_stats('apikey._failure_networks_untracked()');

CREATE OR REPLACE VIEW apikey.stats AS
SELECT s.*, apikey._tokens_redacted() AS tokens_redacted,
	   apikey._failure_networks_untracked() AS failure_networks_untracked
  FROM apikey._stats() s;
COMMENT ON VIEW apikey.stats IS 'Live counters of this server: calls per verdict code, flushes, pending and dropped entries, tokens redacted, networks the failure limiter could not track';
COMMENT ON COLUMN apikey.stats.failure_networks_untracked
	IS 'Verifications from a client network the failure limiter had no room to track (apikey.failure_max_networks), so not limited';

-------------------------------------------------------------------------------
-- Throttle (issue 12): a temporary rate limit in shared memory that ends by
-- itself (src/throttle.c).  Active from the caller's commit, on this server
-- only (not replicated; a restart ends it).  Audited like the other
-- responses.
-------------------------------------------------------------------------------

CREATE FUNCTION apikey._throttle(key_id bigint, hash bytea, rate_limit integer, until timestamptz)
RETURNS void
AS 'MODULE_PATHNAME', 'apikey_throttle'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION apikey._throttle(bigint, bytea, integer, timestamptz)
	IS 'Internal: throttle a key in shared memory from this commit on (throttle)';
REVOKE ALL ON FUNCTION apikey._throttle(bigint, bytea, integer, timestamptz) FROM PUBLIC;

CREATE FUNCTION apikey.throttle(key_id bigint, rate_limit integer, for_ interval)
RETURNS timestamptz
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'throttle'
AS $$
DECLARE
	v_key apikey.keys;
	v_until timestamptz;
BEGIN
	IF throttle.key_id IS NULL THEN
		RAISE EXCEPTION 'key_id must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF throttle.rate_limit IS NULL OR throttle.rate_limit OPERATOR(pg_catalog.<=) 0 THEN
		RAISE EXCEPTION 'rate_limit must be a positive number of requests per minute'
			USING ERRCODE = '22023', HINT = 'Use apikey.suspend() to stop the key.';
	END IF;
	IF throttle.for_ IS NULL OR throttle.for_ OPERATOR(pg_catalog.<=) '0'::interval THEN
		RAISE EXCEPTION 'for_ must be a positive interval'
			USING ERRCODE = '22023', HINT = 'A throttle always ends by itself; use apikey.set_limits() for a lasting rate limit.';
	END IF;
	v_key := apikey._lock_key(throttle.key_id);
	v_until := pg_catalog.now() OPERATOR(pg_catalog.+) throttle.for_;
	PERFORM apikey._throttle(v_key.id, v_key.hash, throttle.rate_limit, v_until);
	PERFORM apikey._audit('throttle', v_key.id, v_key.owner, pg_catalog.jsonb_build_object(
		'rate_limit', throttle.rate_limit, 'for', throttle.for_, 'until', v_until));
	RETURN v_until;
END
$$;
COMMENT ON FUNCTION apikey.throttle(bigint, integer, interval)
	IS 'Limit a key to rate_limit requests a minute (on top of its own limits) from this commit until for_ has passed, on this server; returns the end';
REVOKE ALL ON FUNCTION apikey.throttle(bigint, integer, interval) FROM PUBLIC;

-------------------------------------------------------------------------------
-- Leak policy suspend (issue 13, now that issue 12 can suspend keys): a
-- prefix's leak_action may be suspend.  A leak report of such a key
-- suspends it with no end (reason naming the exposure) instead of revoking
-- it, in the report's transaction, with its audit row; the exposure's
-- action_taken says suspended or already_suspended.  The trigger that
-- refused suspend is gone.
-------------------------------------------------------------------------------

DROP TRIGGER prefixes_check ON apikey.prefixes;
DROP FUNCTION apikey._prefixes_check();
COMMENT ON COLUMN apikey.prefixes.leak_action
	IS 'What a leak report does: revoke (the key, reason leaked), suspend (the key, with no end) or notify (record only)';

ALTER TABLE apikey.exposures DROP CONSTRAINT exposures_action_taken_check;
ALTER TABLE apikey.exposures ADD CONSTRAINT exposures_action_taken_check
	CHECK (action_taken OPERATOR(pg_catalog.=) ANY
		   ('{revoked,already_revoked,suspended,already_suspended,notified,public_prefix}'::text[]));
COMMENT ON COLUMN apikey.exposures.action_taken
	IS 'revoked, already_revoked, suspended, already_suspended (leak_action suspend), notified (leak_action notify) or public_prefix (nothing done)';

-- Suspend a leaked key with no end.  A revoked key stays revoked (that is
-- stronger); a key already suspended with no end keeps its suspension; a
-- timed or ended one is replaced, so the leak never lapses by the clock.
CREATE FUNCTION apikey._suspend_leaked(key_id bigint, exposure_id bigint, source text)
RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id OPERATOR(pg_catalog.=) _suspend_leaked.key_id) THEN
		RETURN 'already_revoked';
	END IF;
	IF EXISTS (SELECT FROM apikey.suspensions s
				WHERE s.key_id OPERATOR(pg_catalog.=) _suspend_leaked.key_id AND s.until IS NULL) THEN
		RETURN 'already_suspended';
	END IF;
	INSERT INTO apikey.suspensions AS s (key_id, until, reason, by)
	VALUES (_suspend_leaked.key_id, NULL,
			pg_catalog.format('leaked: exposure %s (%s)', _suspend_leaked.exposure_id, _suspend_leaked.source),
			apikey._acting_role())
	ON CONFLICT ON CONSTRAINT suspensions_pkey
	DO UPDATE SET since = excluded.since, until = NULL, reason = excluded.reason,
				  by = excluded.by, finding_id = NULL;
	RETURN 'suspended';
END
$$;
COMMENT ON FUNCTION apikey._suspend_leaked(bigint, bigint, text)
	IS 'Internal: suspend a leaked key with no end (leak_action suspend); returns the exposure''s action_taken';
REVOKE ALL ON FUNCTION apikey._suspend_leaked(bigint, bigint, text) FROM PUBLIC;


-------------------------------------------------------------------------------
-- find_tokens() status (issue 13 item 1, now that issue 12 can suspend and
-- quarantine keys): suspended and quarantined join live, revoked, expired
-- and unknown.  Judged as verification judges them (src/verify.c): at the
-- time of the call (clock_timestamp()), a suspension or quarantine counting
-- while its until is NULL or later; the first that applies, in
-- verification's order.
-------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION apikey.find_tokens(body text)
RETURNS TABLE (pos integer, len integer, prefix text, hint text, key_id bigint, status text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
	SELECT s.pos, s.len, s.prefix, s.hint, k.id,
		   CASE WHEN k.id IS NULL THEN 'unknown'
				WHEN EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id OPERATOR(pg_catalog.=) k.id) THEN 'revoked'
				WHEN k.expires_at OPERATOR(pg_catalog.<=) c.now THEN 'expired'
				WHEN EXISTS (SELECT FROM apikey.suspensions x WHERE x.key_id OPERATOR(pg_catalog.=) k.id
							   AND (x.until IS NULL OR x.until OPERATOR(pg_catalog.>) c.now)) THEN 'suspended'
				WHEN EXISTS (SELECT FROM apikey.quarantines q WHERE q.key_id OPERATOR(pg_catalog.=) k.id
							   AND (q.until IS NULL OR q.until OPERATOR(pg_catalog.>) c.now)) THEN 'quarantined'
				ELSE 'live' END
	  FROM apikey._scan_tokens(find_tokens.body) s
	  LEFT JOIN apikey.keys k ON k.hash OPERATOR(pg_catalog.=) s.hash
	  CROSS JOIN LATERAL (SELECT pg_catalog.clock_timestamp() AS now) c
	 ORDER BY s.pos;
$$;
COMMENT ON FUNCTION apikey.find_tokens(text)
	IS 'Every checksum-valid token in a text: position, length, prefix, hint, its key and status (live, revoked, expired, suspended, quarantined, unknown), judged as verification judges it';

-------------------------------------------------------------------------------
-- An exposed key cannot be resumed (issue 12: "a key revoked or exposed
-- cannot be resumed"; issue 13: never reissued silently).  A key with a
-- row in apikey.exposures, whatever its action_taken, is refused by
-- resume() (55000) and skipped by resume_owner() (a NOTICE, and the audit
-- row, say how many); its remedy is reissue(), which now accepts it in any
-- state and names the exposures in its audit row.
-------------------------------------------------------------------------------

CREATE FUNCTION apikey._exposure_ids(key_id bigint)
RETURNS bigint[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT COALESCE(pg_catalog.array_agg(e.id ORDER BY e.id), '{}')
	  FROM apikey.exposures e WHERE e.key_id OPERATOR(pg_catalog.=) _exposure_ids.key_id;
$$;
COMMENT ON FUNCTION apikey._exposure_ids(bigint)
	IS 'Internal: the ids of a key''s exposures (leak reports), oldest first; empty if it never leaked';
REVOKE ALL ON FUNCTION apikey._exposure_ids(bigint) FROM PUBLIC;




-------------------------------------------------------------------------------
-- Roles that survive upgrades (issue 15 item 6).  grant_admin(),
-- grant_monitor() and grant_reporter() give a role a defined set of
-- privileges (apikey._grant_sets) and record it (apikey.role_grants, kept
-- by pg_dump); apikey._regrant() applies every recorded grant again.
--
-- RULE FOR EVERY FUTURE UPGRADE SCRIPT: add each new object an operator,
-- a monitor or a reporter needs to apikey._grant_sets, and end the script
-- with `SELECT apikey._regrant();`, so the roles recorded here get it
-- without anyone re-running grants by hand.
-------------------------------------------------------------------------------

-- What each kind of role is given.  Rows are the extension's own (written
-- by its scripts, not dumped); privilege and object are spelled as GRANT
-- spells them, but privilege MEMBER with object ROLE r is membership in r.
CREATE TABLE apikey._grant_sets (
	kind text NOT NULL CHECK (kind OPERATOR(pg_catalog.=) ANY (ARRAY['admin', 'monitor', 'reporter'])),
	privilege text NOT NULL,
	object text NOT NULL,
	PRIMARY KEY (kind, privilege, object)
);
COMMENT ON TABLE apikey._grant_sets IS 'Internal: the privileges grant_admin(), grant_monitor() and grant_reporter() give; every upgrade script adds its new objects here and calls apikey._regrant()';
COMMENT ON COLUMN apikey._grant_sets.kind IS 'admin, monitor or reporter';
COMMENT ON COLUMN apikey._grant_sets.privilege IS 'As GRANT spells it (EXECUTE, SELECT, SELECT (id, owner), ...), or MEMBER for membership in the role named by object';
COMMENT ON COLUMN apikey._grant_sets.object IS 'As GRANT spells it after ON (FUNCTION apikey.f(integer), TABLE apikey.t), or ROLE r with privilege MEMBER';
REVOKE ALL ON apikey._grant_sets FROM PUBLIC;

INSERT INTO apikey._grant_sets (kind, privilege, object)
SELECT 'admin', 'EXECUTE', 'FUNCTION ' OPERATOR(pg_catalog.||) f
  FROM pg_catalog.unnest(ARRAY[
	'apikey.issue(text, text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[])',
	'apikey.issue_many(text[], text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[])',
	'apikey.revoke(bigint, text)', 'apikey.revoke_token(text, text)', 'apikey.revoke_owner(text, text)',
	'apikey.rotate(bigint, interval)', 'apikey.set_limits(bigint, integer, interval, bigint, interval, cidr[])',
	'apikey.suspend(bigint, text, interval)', 'apikey.resume(bigint, text)',
	'apikey.suspend_owner(text, text, interval)', 'apikey.resume_owner(text, text)',
	'apikey.quarantine(bigint, text[], text, interval)', 'apikey.release(bigint)',
	'apikey.throttle(bigint, integer, interval)', 'apikey.reissue(bigint)',
	'apikey.report_leak(text, text, text)', 'apikey.report_leak_hash(bytea, text, text)',
	'apikey.report_leaks(jsonb)', 'apikey.find_tokens(text)', 'apikey.scanner_rules(text)']) f
UNION ALL
SELECT 'admin', 'SELECT', 'TABLE ' OPERATOR(pg_catalog.||) t
  FROM pg_catalog.unnest(ARRAY['apikey.key_scopes', 'apikey.revocations', 'apikey.quotas', 'apikey.key_status',
							   'apikey.suspensions', 'apikey.quarantines', 'apikey.prefixes',
							   'apikey.key_lineage']) t
UNION ALL
VALUES ('admin', 'SELECT (id, owner, name, prefix, hint, created_at, created_by, expires_at, metadata, '
				 'last_used_at, rate_limit, rate_window, quota, quota_refill, allowed_cidrs)', 'TABLE apikey.keys'),
	   ('admin', 'SELECT (id, key_id, found_at, reported_at, source, reference, action_taken, reported_by)',
		'TABLE apikey.exposures'),
	   ('admin', 'SELECT, INSERT, UPDATE, DELETE', 'TABLE apikey.scopes')
UNION ALL
SELECT 'monitor', 'SELECT', 'TABLE ' OPERATOR(pg_catalog.||) t
  FROM pg_catalog.unnest(ARRAY['apikey.stats', 'apikey.live_usage', 'apikey.key_usage', 'apikey.key_status',
							   'apikey.usage_log']) t
UNION ALL
SELECT 'monitor', 'EXECUTE', 'FUNCTION ' OPERATOR(pg_catalog.||) f
  FROM pg_catalog.unnest(ARRAY['apikey._stats()', 'apikey._tokens_redacted()', 'apikey._failure_networks_untracked()',
							   'apikey._live_usage()', 'apikey.flush_usage()', 'apikey.cache_stats()']) f
UNION ALL
VALUES ('monitor', 'SELECT (id, owner, name)', 'TABLE apikey.keys'),
	   ('reporter', 'MEMBER', 'ROLE apikey_reporter');

-- Who was given what, so _regrant() can give it again.  A regrole is
-- dumped by its name: restore the roles (pg_dumpall --globals-only) first.
CREATE TABLE apikey.role_grants (
	role pg_catalog.regrole NOT NULL,
	kind text NOT NULL CHECK (kind OPERATOR(pg_catalog.=) ANY (ARRAY['admin', 'monitor', 'reporter'])),
	granted_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	granted_by name NOT NULL,
	PRIMARY KEY (role, kind)
);
COMMENT ON TABLE apikey.role_grants IS 'Roles given a set by grant_admin(), grant_monitor() or grant_reporter(); apikey._regrant() (run by every upgrade) gives them the set again';
COMMENT ON COLUMN apikey.role_grants.role IS 'The role (dumped by name)';
COMMENT ON COLUMN apikey.role_grants.kind IS 'admin, monitor or reporter';
COMMENT ON COLUMN apikey.role_grants.granted_at IS 'When it was first granted';
COMMENT ON COLUMN apikey.role_grants.granted_by IS 'The role that granted it (acting in the session)';
REVOKE ALL ON apikey.role_grants FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('apikey.role_grants', '');

-- Grant (or revoke) one kind's set to a role, in GRANT's own words.
CREATE FUNCTION apikey._apply_grants(role pg_catalog.regrole, kind text, grant_ boolean)
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	g apikey._grant_sets;
BEGIN
	-- a recorded role dropped since (DROP OWNED BY, then DROP ROLE): its
	-- OID names nobody, and GRANT would fail the whole upgrade or restore
	IF role IS NOT NULL AND NOT EXISTS (SELECT FROM pg_catalog.pg_roles a WHERE a.oid OPERATOR(pg_catalog.=) role::pg_catalog.oid) THEN
		RAISE WARNING 'a role recorded in apikey.role_grants no longer exists'
			USING DETAIL = pg_catalog.format('Role OID %s, set %s.', role::pg_catalog.oid, kind),
				  HINT = 'Delete its row from apikey.role_grants.';
		RETURN;
	END IF;
	FOR g IN SELECT * FROM apikey._grant_sets s WHERE s.kind OPERATOR(pg_catalog.=) _apply_grants.kind
			  ORDER BY s.object, s.privilege LOOP
		IF g.privilege OPERATOR(pg_catalog.=) 'MEMBER' THEN
			-- as a direct member already (or not), GRANT (REVOKE) would only say so
			CONTINUE WHEN grant_ OPERATOR(pg_catalog.=) EXISTS (
				SELECT FROM pg_catalog.pg_auth_members m
				 WHERE m.member OPERATOR(pg_catalog.=) role::pg_catalog.oid
				   AND m.roleid OPERATOR(pg_catalog.=) pg_catalog.substr(g.object, 6)::pg_catalog.regrole::pg_catalog.oid);
			EXECUTE pg_catalog.format(CASE WHEN grant_ THEN 'GRANT %s TO %s' ELSE 'REVOKE %s FROM %s' END,
									  pg_catalog.substr(g.object, 6), role);
		ELSE
			EXECUTE pg_catalog.format(CASE WHEN grant_ THEN 'GRANT %s ON %s TO %s' ELSE 'REVOKE %s ON %s FROM %s' END,
									  g.privilege, g.object, role);
		END IF;
	END LOOP;
END
$$;
COMMENT ON FUNCTION apikey._apply_grants(pg_catalog.regrole, text, boolean)
	IS 'Internal: grant (true) or revoke (false) the privileges apikey._grant_sets lists for a kind to or from a role';
REVOKE ALL ON FUNCTION apikey._apply_grants(pg_catalog.regrole, text, boolean) FROM PUBLIC;

-- A row of apikey.role_grants grants its set as it is inserted: by
-- _grant_kind(), and by pg_restore, which restores the table's rows after
-- CREATE EXTENSION.  (Privileges granted by an extension script are the
-- extension's initial privileges, which pg_dump leaves out; this trigger
-- is what gives them back after a restore.)
CREATE FUNCTION apikey._role_grants_apply() RETURNS trigger
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM apikey._apply_grants(NEW.role, NEW.kind, true);
	RETURN NULL;
END
$$;
COMMENT ON FUNCTION apikey._role_grants_apply()
	IS 'Internal: trigger granting the set of a row inserted into apikey.role_grants (by grant_*() or by pg_restore)';
REVOKE ALL ON FUNCTION apikey._role_grants_apply() FROM PUBLIC;
CREATE TRIGGER role_grants_apply AFTER INSERT ON apikey.role_grants
	FOR EACH ROW EXECUTE FUNCTION apikey._role_grants_apply();

-- Run at the end of every upgrade script: the recorded roles get every
-- object their kind now lists.  A recorded role that was dropped since is
-- skipped with a WARNING (its row stays until deleted).
CREATE FUNCTION apikey._regrant()
RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	r apikey.role_grants;
	n integer := 0;
BEGIN
	FOR r IN SELECT * FROM apikey.role_grants g ORDER BY g.role::pg_catalog.oid, g.kind LOOP
		PERFORM apikey._apply_grants(r.role, r.kind, true);
		IF EXISTS (SELECT FROM pg_catalog.pg_roles a WHERE a.oid OPERATOR(pg_catalog.=) r.role::pg_catalog.oid) THEN
			n := n OPERATOR(pg_catalog.+) 1;
		END IF;
	END LOOP;
	RETURN n;
END
$$;
COMMENT ON FUNCTION apikey._regrant()
	IS 'Internal: give every role recorded in apikey.role_grants its kind''s set again (every upgrade script calls it last); returns how many recorded grants were applied (a dropped role is skipped with a WARNING)';
REVOKE ALL ON FUNCTION apikey._regrant() FROM PUBLIC;

-- The checks and the record shared by grant_* and revoke_*.  Only the
-- extension's owner (a superuser) and superusers may hand out privileges,
-- whoever was granted EXECUTE; a superuser (who needs nothing) and PUBLIC
-- (everyone) are refused.
CREATE FUNCTION apikey._grant_kind(role pg_catalog.regrole, kind text, grant_ boolean)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_actor name := apikey._acting_role();
	v_rows integer;
BEGIN
	IF NOT pg_catalog.pg_has_role(v_actor,
			(SELECT e.extowner FROM pg_catalog.pg_extension e WHERE e.extname OPERATOR(pg_catalog.=) 'apikey'), 'USAGE') THEN
		RAISE EXCEPTION 'permission denied to % apikey roles', CASE WHEN grant_ THEN 'grant' ELSE 'revoke' END
			USING ERRCODE = '42501', HINT = 'Only the extension''s owner or a superuser may.';
	END IF;
	IF role IS NULL THEN
		RAISE EXCEPTION 'role must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF role::pg_catalog.oid OPERATOR(pg_catalog.=) 0 THEN
		RAISE EXCEPTION 'apikey roles are never granted to PUBLIC' USING ERRCODE = '22023',
			HINT = 'Create a role, grant it, and grant that role to the roles that need it.';
	END IF;
	IF grant_ AND (SELECT a.rolsuper FROM pg_catalog.pg_roles a WHERE a.oid OPERATOR(pg_catalog.=) role::pg_catalog.oid) THEN
		RAISE EXCEPTION 'role "%" is a superuser', role USING ERRCODE = '22023',
			HINT = 'A superuser already holds every privilege: grant a role that is not.';
	END IF;
	IF grant_ THEN
		-- a new row is granted by its trigger; an old one is granted again,
		-- so a repeated call restores whatever was taken away by hand
		INSERT INTO apikey.role_grants AS g (role, kind, granted_by) VALUES (role, kind, v_actor)
		ON CONFLICT DO NOTHING;
		GET DIAGNOSTICS v_rows = ROW_COUNT;
		IF v_rows OPERATOR(pg_catalog.=) 0 THEN
			PERFORM apikey._apply_grants(role, kind, true);
		END IF;
	ELSE
		DELETE FROM apikey.role_grants g
		 WHERE g.role OPERATOR(pg_catalog.=) _grant_kind.role AND g.kind OPERATOR(pg_catalog.=) _grant_kind.kind;
		GET DIAGNOSTICS v_rows = ROW_COUNT;
		PERFORM apikey._apply_grants(role, kind, false);
		-- what another recorded kind of this role also lists stays granted
		PERFORM apikey._apply_grants(g.role, g.kind, true)
		   FROM apikey.role_grants g WHERE g.role OPERATOR(pg_catalog.=) _grant_kind.role;
	END IF;
	PERFORM apikey._audit(CASE WHEN grant_ THEN 'grant_' ELSE 'revoke_' END OPERATOR(pg_catalog.||) kind,
						  NULL, NULL, pg_catalog.jsonb_build_object('role', role::pg_catalog.text, 'changed', v_rows OPERATOR(pg_catalog.>) 0));
	RETURN v_rows OPERATOR(pg_catalog.>) 0;
END
$$;
COMMENT ON FUNCTION apikey._grant_kind(pg_catalog.regrole, text, boolean)
	IS 'Internal: check the caller and the role, grant or revoke a kind''s set, record it and write the audit row';
REVOKE ALL ON FUNCTION apikey._grant_kind(pg_catalog.regrole, text, boolean) FROM PUBLIC;

CREATE FUNCTION apikey.grant_admin(role pg_catalog.regrole)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'grant_admin'
AS $$
	SELECT apikey._audit_lock();
	SELECT apikey._grant_kind(grant_admin.role, 'admin', true);
$$;
COMMENT ON FUNCTION apikey.grant_admin(pg_catalog.regrole)
	IS 'Give a role the administrative functions (issue, revoke, rotate, set_limits, suspend, quarantine, throttle, reissue, leak reports, run_events, expire_unused ...) and the key tables but hashes, and apikey.events, to read; recorded, so upgrades extend it; true if newly recorded';
REVOKE ALL ON FUNCTION apikey.grant_admin(pg_catalog.regrole) FROM PUBLIC;

CREATE FUNCTION apikey.revoke_admin(role pg_catalog.regrole)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'revoke_admin'
AS $$
	SELECT apikey._audit_lock();
	SELECT apikey._grant_kind(revoke_admin.role, 'admin', false);
$$;
COMMENT ON FUNCTION apikey.revoke_admin(pg_catalog.regrole)
	IS 'Take back what grant_admin() gave (privileges another recorded grant of the role lists stay) and delete the record; true if it was recorded';
REVOKE ALL ON FUNCTION apikey.revoke_admin(pg_catalog.regrole) FROM PUBLIC;

CREATE FUNCTION apikey.grant_monitor(role pg_catalog.regrole)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'grant_monitor'
AS $$
	SELECT apikey._audit_lock();
	SELECT apikey._grant_kind(grant_monitor.role, 'monitor', true);
$$;
COMMENT ON FUNCTION apikey.grant_monitor(pg_catalog.regrole)
	IS 'Give a role SELECT on every monitoring view (stats, stats_by_code, live_usage, key_usage, key_status, the dashboard views, usage_log and its rollups), apikey.events and the functions behind them; recorded, so upgrades extend it; true if newly recorded';
REVOKE ALL ON FUNCTION apikey.grant_monitor(pg_catalog.regrole) FROM PUBLIC;

CREATE FUNCTION apikey.revoke_monitor(role pg_catalog.regrole)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'revoke_monitor'
AS $$
	SELECT apikey._audit_lock();
	SELECT apikey._grant_kind(revoke_monitor.role, 'monitor', false);
$$;
COMMENT ON FUNCTION apikey.revoke_monitor(pg_catalog.regrole)
	IS 'Take back what grant_monitor() gave (privileges another recorded grant of the role lists stay) and delete the record; true if it was recorded';
REVOKE ALL ON FUNCTION apikey.revoke_monitor(pg_catalog.regrole) FROM PUBLIC;

CREATE FUNCTION apikey.grant_reporter(role pg_catalog.regrole)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'grant_reporter'
AS $$
	SELECT apikey._audit_lock();
	SELECT apikey._grant_kind(grant_reporter.role, 'reporter', true);
$$;
COMMENT ON FUNCTION apikey.grant_reporter(pg_catalog.regrole)
	IS 'Make a role a member of apikey_reporter (revoke_leaked); recorded; true if newly recorded';
REVOKE ALL ON FUNCTION apikey.grant_reporter(pg_catalog.regrole) FROM PUBLIC;

CREATE FUNCTION apikey.revoke_reporter(role pg_catalog.regrole)
RETURNS boolean
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'revoke_reporter'
AS $$
	SELECT apikey._audit_lock();
	SELECT apikey._grant_kind(revoke_reporter.role, 'reporter', false);
$$;
COMMENT ON FUNCTION apikey.revoke_reporter(pg_catalog.regrole)
	IS 'Take back what grant_reporter() gave (privileges another recorded grant of the role lists stay) and delete the record; true if it was recorded';
REVOKE ALL ON FUNCTION apikey.revoke_reporter(pg_catalog.regrole) FROM PUBLIC;


-------------------------------------------------------------------------------
-- Metrics without jsonb, and a writer heartbeat (issue 15 item 5).
-- apikey.stats_by_code is apikey.stats.calls as rows, one per verdict code
-- of the C verdict table (src/verdict.c), 0 for a code never seen, so an
-- exporter needs no jsonb.  apikey.stats gains writer_heartbeat, which
-- moves on every round of the usage writer, empty and failed ones too
-- (last_flush moves only when something was written, so it cannot tell a
-- quiet server from a dead writer).  Both through C functions
-- (src/metrics.c), granted like apikey._stats(); the new view is granted
-- like apikey.stats.
-------------------------------------------------------------------------------

CREATE FUNCTION apikey._stats_by_code(OUT code text, OUT calls bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'apikey_stats_by_code'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._stats_by_code()
	IS 'Internal: verifications per verdict code since the server started, one row per code (behind apikey.stats_by_code)';
REVOKE ALL ON FUNCTION apikey._stats_by_code() FROM PUBLIC;
SELECT apikey._grant_like_stats('apikey._stats_by_code()');

CREATE VIEW apikey.stats_by_code AS
SELECT s.code, s.calls FROM apikey._stats_by_code() s;
COMMENT ON VIEW apikey.stats_by_code
	IS 'Verifications per verdict code since the server started: apikey.stats.calls as rows, one per code (0 if never seen; NULL without shared memory)';
COMMENT ON COLUMN apikey.stats_by_code.code IS 'Verdict code (every code apikey.check() can return)';
COMMENT ON COLUMN apikey.stats_by_code.calls IS 'Verifications with this verdict since the server started; 0 if none, NULL without shared memory';
REVOKE ALL ON apikey.stats_by_code FROM PUBLIC;
-- Whoever may read apikey.stats may read this too.
DO $$
DECLARE
	grantee text;
BEGIN
	FOR grantee IN
		SELECT CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
					ELSE pg_catalog.quote_ident(a.grantee::pg_catalog.regrole::pg_catalog.text) END
		  FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
		 WHERE c.oid OPERATOR(pg_catalog.=) 'apikey.stats'::pg_catalog.regclass
		   AND a.privilege_type OPERATOR(pg_catalog.=) 'SELECT'
		   AND a.grantee OPERATOR(pg_catalog.<>) c.relowner
	LOOP
		EXECUTE pg_catalog.format('GRANT SELECT ON apikey.stats_by_code TO %s', grantee);
	END LOOP;
END
$$;

CREATE FUNCTION apikey._writer_heartbeat() RETURNS timestamptz
AS 'MODULE_PATHNAME', 'apikey_writer_heartbeat'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._writer_heartbeat()
	IS 'Internal: when the usage writer last finished a round, written, empty or failed (behind apikey.stats.writer_heartbeat)';
REVOKE ALL ON FUNCTION apikey._writer_heartbeat() FROM PUBLIC;
SELECT apikey._grant_like_stats('apikey._writer_heartbeat()');

CREATE OR REPLACE VIEW apikey.stats AS
SELECT s.*, apikey._tokens_redacted() AS tokens_redacted,
	   apikey._failure_networks_untracked() AS failure_networks_untracked,
	   apikey._writer_heartbeat() AS writer_heartbeat
  FROM apikey._stats() s;
COMMENT ON VIEW apikey.stats IS 'Live counters of this server: calls per verdict code, flushes, pending and dropped entries, tokens redacted, networks the failure limiter could not track, the usage writer''s heartbeat';
COMMENT ON COLUMN apikey.stats.writer_heartbeat
	IS 'When the usage writer last finished a round (every apikey.usage_flush_interval), even one with nothing to write or that failed; NULL = never (no writer, or not preloaded).  now() - writer_heartbeat is its liveness';

-- A monitor (grant_monitor()) reads these too.
INSERT INTO apikey._grant_sets (kind, privilege, object) VALUES
	('monitor', 'SELECT', 'TABLE apikey.stats_by_code'),
	('monitor', 'EXECUTE', 'FUNCTION apikey._stats_by_code()'),
	('monitor', 'EXECUTE', 'FUNCTION apikey._writer_heartbeat()');

-------------------------------------------------------------------------------
-- Events you can LISTEN to (issue 12 items 5 and 6).  apikey.events is an
-- outbox: one row per thing that happened to a key, written only by
-- apikey._event(), which also calls pg_notify('apikey_events', seq) in the
-- same transaction, so a LISTENing session is told at commit and never
-- about a rollback.  _event() takes the audit lock first (as every
-- administrative function does), so events are numbered in commit order
-- and "SELECT ... WHERE seq > $last ORDER BY seq" never skips one.
--
-- Changes to a key (key.suspended, key.resumed, key.quarantined,
-- key.released, key.revoked) come from row triggers on suspensions,
-- quarantines and revocations, in the changing transaction, whichever
-- apikey function changed them (not direct DML, such as a restore).  Conditions that arrive with time (key.expiring,
-- quota.low, rate_limit.saturated) come from a periodic pass,
-- apikey._run_events(), which the background worker runs every
-- apikey.events_interval; apikey.event_marks remembers what each has
-- already said, so a pass run twice says nothing new.  The same pass
-- prunes events older than apikey.event_retention and, when
-- apikey.unused_revoke_after is set, revokes keys unused that long.
--
-- Payloads carry ids, hints and reasons, never a token or a hash:
-- _event() refuses one that holds a checksum-valid token, a hex SHA-256
-- or a field named token, hash or secret.
-------------------------------------------------------------------------------

CREATE TABLE apikey.events (
	seq			bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
	at			timestamptz NOT NULL DEFAULT pg_catalog.now(),
	kind		text NOT NULL
				CONSTRAINT events_kind_check
				CHECK (kind OPERATOR(pg_catalog.=) ANY ('{finding.opened,key.suspended,key.resumed,key.quarantined,key.released,key.revoked,key.expiring,quota.low,rate_limit.saturated}'::text[])),
	key_id		bigint,
	owner		text,
	severity	text NOT NULL
				CONSTRAINT events_severity_check
				CHECK (severity OPERATOR(pg_catalog.=) ANY ('{info,warning,critical}'::text[])),
	payload		jsonb NOT NULL DEFAULT '{}'
				CONSTRAINT events_payload_check CHECK (pg_catalog.jsonb_typeof(payload) OPERATOR(pg_catalog.=) 'object')
);
CREATE INDEX events_at_idx ON apikey.events (at);
COMMENT ON TABLE apikey.events IS 'Outbox of what happened to keys; each row is announced by NOTIFY apikey_events (payload: its seq) at commit.  Read new ones with WHERE seq > last ORDER BY seq';
COMMENT ON COLUMN apikey.events.seq IS 'Position, in commit order (writers queue on the audit lock); gaps where a transaction rolled back';
COMMENT ON COLUMN apikey.events.at IS 'When the transaction that wrote it began';
COMMENT ON COLUMN apikey.events.kind IS 'finding.opened, key.suspended, key.resumed, key.quarantined, key.released, key.revoked, key.expiring, quota.low or rate_limit.saturated';
COMMENT ON COLUMN apikey.events.key_id IS 'The key it is about (no foreign key: the event outlives the key)';
COMMENT ON COLUMN apikey.events.owner IS 'That key''s owner';
COMMENT ON COLUMN apikey.events.severity IS 'info, warning or critical';
COMMENT ON COLUMN apikey.events.payload IS 'Details: hint, reason, until, levels ...; never a token or a hash';
COMMENT ON SEQUENCE apikey.events_seq_seq IS 'Event numbers (apikey.events.seq)';
SELECT pg_catalog.pg_extension_config_dump('apikey.events', '');
SELECT pg_catalog.pg_extension_config_dump('apikey.events_seq_seq', '');
REVOKE ALL ON apikey.events FROM PUBLIC;
REVOKE ALL ON SEQUENCE apikey.events_seq_seq FROM PUBLIC;

-- The only writer.  Callable from SQL (triggers, the periodic pass, the
-- detector) and from C (apikey_event_emit() in src/events.c).  It needs a
-- read-write transaction and the owner's rights; it returns the new seq.
-- What may not leave apikey in a payload or a stored reason: a
-- checksum-valid token, a hex SHA-256 (or longer digest), or a field named
-- token, hash or secret.
CREATE FUNCTION apikey._secret_shaped(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT t OPERATOR(pg_catalog.~*) '[0-9a-f]{64}'
		OR t OPERATOR(pg_catalog.~*) '"[^"]*(token|hash|secret)[^"]*":'
		OR EXISTS (SELECT FROM apikey._scan_tokens(t));
$$;
COMMENT ON FUNCTION apikey._secret_shaped(text)
	IS 'Internal: whether a text holds a checksum-valid token, 64 or more hex digits, or a JSON field named like token, hash or secret';
REVOKE ALL ON FUNCTION apikey._secret_shaped(text) FROM PUBLIC;

-- A payload with every such value replaced by "[redacted]" (fields named
-- like token, hash or secret dropped) and "redacted": true added; {} stays
-- {}.  If a field's name itself is shaped like a secret, only
-- {"redacted": true} is left.
CREATE FUNCTION apikey._event_redact(payload jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT CASE
		WHEN NOT apikey._secret_shaped(payload::text) THEN payload
		ELSE COALESCE((
			SELECT CASE WHEN apikey._secret_shaped(pg_catalog.jsonb_object_agg(e.key, e.v)::text)
						THEN '{"redacted": true}'::jsonb
						ELSE pg_catalog.jsonb_object_agg(e.key, e.v)
							 OPERATOR(pg_catalog.||) '{"redacted": true}'::jsonb END
			  FROM (SELECT p.key,
						   CASE WHEN apikey._secret_shaped(p.value::text) THEN '"[redacted]"'::jsonb
								ELSE p.value END AS v
					  FROM pg_catalog.jsonb_each(payload) p
					 WHERE NOT p.key OPERATOR(pg_catalog.~*) '(token|hash|secret)') e),
			'{"redacted": true}'::jsonb) END;
$$;
COMMENT ON FUNCTION apikey._event_redact(jsonb)
	IS 'Internal: an event payload with every value shaped like a token or hash replaced by [redacted] (fields named like token, hash or secret dropped)';
REVOKE ALL ON FUNCTION apikey._event_redact(jsonb) FROM PUBLIC;

CREATE FUNCTION apikey._event(kind text, key_id bigint, owner text, severity text, payload jsonb)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_payload jsonb := COALESCE(_event.payload, '{}');
	v_seq bigint;
BEGIN
	IF _event.kind IS NULL OR NOT _event.kind OPERATOR(pg_catalog.=) ANY
		('{finding.opened,key.suspended,key.resumed,key.quarantined,key.released,key.revoked,key.expiring,quota.low,rate_limit.saturated}'::text[]) THEN
		RAISE EXCEPTION 'unknown event kind "%"', _event.kind
			USING ERRCODE = '22023', HINT = 'The kinds are listed in the CHECK constraint of apikey.events.';
	END IF;
	IF _event.severity IS NULL OR NOT _event.severity OPERATOR(pg_catalog.=) ANY ('{info,warning,critical}'::text[]) THEN
		RAISE EXCEPTION 'event severity must be info, warning or critical, got "%"', _event.severity
			USING ERRCODE = '22023';
	END IF;
	IF pg_catalog.jsonb_typeof(v_payload) OPERATOR(pg_catalog.<>) 'object' THEN
		RAISE EXCEPTION 'event payload must be a JSON object' USING ERRCODE = '22023';
	END IF;
	-- never a token or a hash, by shape: whoever reads events may not
	-- read keys.hash, and LISTEN consumers forward payloads to chat.  A
	-- value shaped like one is replaced, never refused: the event rides on
	-- a revocation or a suspension, which must not fail because of what a
	-- key's name or a reason holds
	v_payload := apikey._event_redact(v_payload);
	PERFORM apikey._audit_lock();
	INSERT INTO apikey.events (kind, key_id, owner, severity, payload)
	VALUES (_event.kind, _event.key_id, _event.owner, _event.severity, v_payload)
	RETURNING apikey.events.seq INTO v_seq;
	-- (a transaction that will be PREPAREd turns it off: 2PC refuses NOTIFY)
	IF COALESCE(pg_catalog.current_setting('apikey.events_notify', true), 'on')::boolean THEN
		PERFORM pg_catalog.pg_notify('apikey_events', v_seq::text);
	END IF;
	RETURN v_seq;
END
$$;
COMMENT ON FUNCTION apikey._event(text, bigint, text, text, jsonb)
	IS 'Internal: the only writer of apikey.events: append one event (a value shaped like a token or hash replaced by [redacted]) and NOTIFY apikey_events with its seq at commit; returns the seq';
REVOKE ALL ON FUNCTION apikey._event(text, bigint, text, text, jsonb) FROM PUBLIC;

-- A key's suspension, quarantine or revocation changed: say so, when an
-- apikey function changed it (apikey.audit_context names one; "usage" is
-- apikey's own bookkeeping, not a change to announce).  Direct DML, which
-- a restore is (pg_restore's COPY), says nothing: the audit trail records
-- it.  A row deleted because its key was deleted says nothing.
CREATE FUNCTION apikey._event_key_changed() RETURNS trigger
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_key record;
	v_row jsonb;
BEGIN
	IF COALESCE(apikey._audit_context(), 'usage') OPERATOR(pg_catalog.=) 'usage' THEN
		RETURN NULL;
	END IF;
	v_row := pg_catalog.to_jsonb(CASE WHEN TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN OLD ELSE NEW END);
	SELECT k.id, k.owner, k.hint, k.name INTO v_key
	  FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) (v_row OPERATOR(pg_catalog.->>) 'key_id')::bigint;
	IF v_key.id IS NULL THEN
		RETURN NULL;
	END IF;
	IF TG_TABLE_NAME OPERATOR(pg_catalog.=) 'revocations' THEN
		PERFORM apikey._event('key.revoked', v_key.id, v_key.owner,
			CASE WHEN v_row OPERATOR(pg_catalog.->>) 'reason' OPERATOR(pg_catalog.=) 'leaked' THEN 'critical' ELSE 'warning' END,
			pg_catalog.jsonb_build_object('hint', v_key.hint, 'name', v_key.name,
										  'reason', v_row OPERATOR(pg_catalog.->) 'reason',
										  'by', v_row OPERATOR(pg_catalog.->) 'revoked_by'));
	ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
		PERFORM apikey._event(CASE TG_TABLE_NAME WHEN 'suspensions' THEN 'key.resumed' ELSE 'key.released' END,
			v_key.id, v_key.owner, 'info',
			pg_catalog.jsonb_build_object('hint', v_key.hint, 'name', v_key.name,
										  'since', v_row OPERATOR(pg_catalog.->) 'since',
										  'reason', v_row OPERATOR(pg_catalog.->) 'reason'));
	ELSE
		PERFORM apikey._event(CASE TG_TABLE_NAME WHEN 'suspensions' THEN 'key.suspended' ELSE 'key.quarantined' END,
			v_key.id, v_key.owner, 'warning',
			pg_catalog.jsonb_build_object('hint', v_key.hint, 'name', v_key.name)
			OPERATOR(pg_catalog.||) (v_row OPERATOR(pg_catalog.-) '{key_id,since}'::text[]));
	END IF;
	RETURN NULL;
END
$$;
COMMENT ON FUNCTION apikey._event_key_changed()
	IS 'Internal: row trigger on revocations, suspensions and quarantines writing key.revoked, key.suspended, key.resumed, key.quarantined and key.released events';
REVOKE ALL ON FUNCTION apikey._event_key_changed() FROM PUBLIC;
CREATE TRIGGER revocations_event AFTER INSERT ON apikey.revocations
	FOR EACH ROW EXECUTE FUNCTION apikey._event_key_changed();
CREATE TRIGGER suspensions_event AFTER INSERT OR UPDATE OR DELETE ON apikey.suspensions
	FOR EACH ROW EXECUTE FUNCTION apikey._event_key_changed();
CREATE TRIGGER quarantines_event AFTER INSERT OR UPDATE OR DELETE ON apikey.quarantines
	FOR EACH ROW EXECUTE FUNCTION apikey._event_key_changed();

-- A reason is free text: an operator pasting "leaked: ak_..." must still
-- revoke or suspend the key, and the token must still not be stored.  So
-- the reason is kept with each token replaced by its hint and each run of
-- 64 or more hex digits (a digest) by [redacted], before the row is
-- written, whichever function (or direct DML) writes it.
CREATE FUNCTION apikey._redact_text(t text) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_out text := '';
	v_at integer := 1;
	x record;
BEGIN
	IF t IS NULL THEN
		RETURN NULL;
	END IF;
	FOR x IN SELECT s.pos, s.len, s.hint FROM apikey._scan_tokens(t) s ORDER BY s.pos LOOP
		v_out := v_out OPERATOR(pg_catalog.||) pg_catalog.substr(t, v_at, x.pos OPERATOR(pg_catalog.-) v_at)
				 OPERATOR(pg_catalog.||) x.hint;
		v_at := x.pos OPERATOR(pg_catalog.+) x.len;
	END LOOP;
	v_out := v_out OPERATOR(pg_catalog.||) pg_catalog.substr(t, v_at);
	RETURN pg_catalog.regexp_replace(v_out, '[0-9A-Fa-f]{64,}', '[redacted]', 'g');
END
$$;
COMMENT ON FUNCTION apikey._redact_text(text)
	IS 'Internal: a free text with each checksum-valid token replaced by its hint and each run of 64 or more hex digits by [redacted]';
REVOKE ALL ON FUNCTION apikey._redact_text(text) FROM PUBLIC;

CREATE FUNCTION apikey._redact_reason() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	NEW.reason := apikey._redact_text(NEW.reason);
	RETURN NEW;
END
$$;
COMMENT ON FUNCTION apikey._redact_reason()
	IS 'Internal: trigger keeping tokens and digests out of the reason of revocations, suspensions and quarantines';
REVOKE ALL ON FUNCTION apikey._redact_reason() FROM PUBLIC;
CREATE TRIGGER revocations_redact BEFORE INSERT OR UPDATE OF reason ON apikey.revocations
	FOR EACH ROW EXECUTE FUNCTION apikey._redact_reason();
CREATE TRIGGER suspensions_redact BEFORE INSERT OR UPDATE OF reason ON apikey.suspensions
	FOR EACH ROW EXECUTE FUNCTION apikey._redact_reason();
CREATE TRIGGER quarantines_redact BEFORE INSERT OR UPDATE OF reason ON apikey.quarantines
	FOR EACH ROW EXECUTE FUNCTION apikey._redact_reason();
ALTER TABLE apikey.revocations ENABLE ALWAYS TRIGGER revocations_redact;
ALTER TABLE apikey.suspensions ENABLE ALWAYS TRIGGER suspensions_redact;
ALTER TABLE apikey.quarantines ENABLE ALWAYS TRIGGER quarantines_redact;

-- What the periodic pass has already said, so it says it once: per kind,
-- key and level, for one arming (the expiry, the quota's last refill, the
-- hour of rate limiting).  A new arming (a later expires_at, a refill, a
-- new hour) is a new row.
CREATE TABLE apikey.event_marks (
	kind		text NOT NULL,
	key_id		bigint NOT NULL REFERENCES apikey.keys (id) ON DELETE CASCADE,
	level		integer NOT NULL,
	armed		timestamptz NOT NULL,
	at			timestamptz NOT NULL DEFAULT pg_catalog.now(),
	PRIMARY KEY (kind, key_id, level, armed)
);
COMMENT ON TABLE apikey.event_marks IS 'What apikey._run_events() has already announced (key.expiring, quota.low, rate_limit.saturated), so each is announced once';
COMMENT ON COLUMN apikey.event_marks.kind IS 'The event kind';
COMMENT ON COLUMN apikey.event_marks.key_id IS 'The key';
COMMENT ON COLUMN apikey.event_marks.level IS 'key.expiring: days before expiry (7, 1); quota.low: percent used (80, 90, 100); rate_limit.saturated: 0';
COMMENT ON COLUMN apikey.event_marks.armed IS 'What the level is relative to: the key''s expires_at, the quota''s refilled_at, or the start of the hour';
COMMENT ON COLUMN apikey.event_marks.at IS 'When it was announced (or passed over for a higher level)';
SELECT pg_catalog.pg_extension_config_dump('apikey.event_marks', '');
REVOKE ALL ON apikey.event_marks FROM PUBLIC;

-- The settings the pass reads, through C (so the library is loaded and a
-- placeholder set before that is not trusted): NULL = off / keep forever.
CREATE FUNCTION apikey._event_settings(OUT retention interval, OUT unused_revoke_after interval)
RETURNS record
AS 'MODULE_PATHNAME', 'apikey_event_settings'
LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._event_settings()
	IS 'Internal: apikey.event_retention and apikey.unused_revoke_after as intervals (NULL when 0: keep forever, off)';
REVOKE ALL ON FUNCTION apikey._event_settings() FROM PUBLIC;

-- Revoke the keys unused for longer than after, with reason unused: last
-- success (keys.last_used_at, or a success not yet flushed) or, never
-- used, creation older than that.  Returns the ids.  The audit row is
-- written when keys were revoked, or always when always_audit.
CREATE FUNCTION apikey._expire_unused(after interval, always_audit boolean)
RETURNS bigint[]
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'expire_unused'
AS $$
DECLARE
	v_cutoff timestamptz;
	v_ids bigint[];
BEGIN
	IF _expire_unused.after IS NULL THEN
		RAISE EXCEPTION 'after must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF _expire_unused.after OPERATOR(pg_catalog.<=) '0'::interval THEN
		RAISE EXCEPTION 'after must be a positive interval, got %', _expire_unused.after
			USING ERRCODE = '22023', HINT = 'Pass how long a key may go unused, e.g. ''365 days''.';
	END IF;
	PERFORM apikey._audit_lock();
	v_cutoff := pg_catalog.now() OPERATOR(pg_catalog.-) _expire_unused.after;
	WITH unused AS (
		SELECT k.id FROM apikey.keys k
		 WHERE COALESCE(k.last_used_at, k.created_at) OPERATOR(pg_catalog.<) v_cutoff
		   AND k.created_at OPERATOR(pg_catalog.<) v_cutoff
		   AND NOT EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id OPERATOR(pg_catalog.=) k.id)
		   AND NOT EXISTS (SELECT FROM apikey.usage_pending p
							WHERE p.key_id OPERATOR(pg_catalog.=) k.id AND p.code OPERATOR(pg_catalog.=) 'valid'
							  AND p.used_at OPERATOR(pg_catalog.>=) v_cutoff)
		   AND NOT EXISTS (SELECT FROM apikey._live_usage() v
							WHERE v.key_id OPERATOR(pg_catalog.=) k.id AND v.code OPERATOR(pg_catalog.=) 'valid')
		 ORDER BY k.id
		   FOR UPDATE OF k),
	revoked AS (
		INSERT INTO apikey.revocations (key_id, revoked_by, reason)
		SELECT u.id, apikey._acting_role(), 'unused' FROM unused u
		ON CONFLICT ON CONSTRAINT revocations_pkey DO NOTHING
		RETURNING apikey.revocations.key_id)
	SELECT COALESCE(pg_catalog.array_agg(r.key_id ORDER BY r.key_id), '{}') INTO v_ids FROM revoked r;
	IF _expire_unused.always_audit OR pg_catalog.cardinality(v_ids) OPERATOR(pg_catalog.>) 0 THEN
		PERFORM apikey._audit('expire_unused', NULL, NULL, pg_catalog.jsonb_build_object(
			'after', _expire_unused.after, 'revoked', pg_catalog.cardinality(v_ids),
			'key_ids', pg_catalog.to_jsonb(v_ids)));
	END IF;
	RETURN v_ids;
END
$$;
COMMENT ON FUNCTION apikey._expire_unused(interval, boolean)
	IS 'Internal: revoke (reason unused) the keys with no success for longer than after (never used: since created); returns their ids; writes the audit row';
REVOKE ALL ON FUNCTION apikey._expire_unused(interval, boolean) FROM PUBLIC;

CREATE FUNCTION apikey.expire_unused(after interval DEFAULT '365 days')
RETURNS SETOF bigint
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'expire_unused'
AS $$
	SELECT pg_catalog.unnest(apikey._expire_unused(expire_unused.after, true));
$$;
COMMENT ON FUNCTION apikey.expire_unused(interval)
	IS 'Revoke, with reason unused, every key with no successful verification for longer than after (a key never used: since it was issued); returns the revoked ids; each gets a key.revoked event';
REVOKE ALL ON FUNCTION apikey.expire_unused(interval) FROM PUBLIC;

-- One periodic pass: what time has brought since the last one, once each.
-- Returns how many events it wrote.
CREATE FUNCTION apikey._run_events()
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_settings record;
	v_hour timestamptz := pg_catalog.date_trunc('hour', pg_catalog.now());
	n bigint := 0;
	r record;
BEGIN
	-- the audit lock first, as every writer of events and revocations
	PERFORM apikey._audit_lock();
	v_settings := apikey._event_settings();

	-- key.expiring: 7 days, then 1 day before expires_at (only the nearer
	-- one when both are due at once); not for a rotated key in its grace,
	-- nor for a key issued inside the window (a short-lived key is meant to
	-- expire: its issuer knows)
	FOR r IN
		WITH due AS (
			SELECT k.id, k.owner, k.hint, k.name, k.expires_at, k.created_at,
				   CASE WHEN k.expires_at OPERATOR(pg_catalog.<=) (pg_catalog.now() OPERATOR(pg_catalog.+) '1 day'::interval)
						THEN 1 ELSE 7 END AS level
			  FROM apikey.keys k
			 WHERE k.expires_at OPERATOR(pg_catalog.>) pg_catalog.now()
			   AND k.expires_at OPERATOR(pg_catalog.<=) (pg_catalog.now() OPERATOR(pg_catalog.+) '7 days'::interval)
			   AND NOT EXISTS (SELECT FROM apikey.key_lineage b WHERE b.key_id OPERATOR(pg_catalog.=) k.id
								  AND b.budget_key_id IS NOT NULL)
			   AND NOT EXISTS (SELECT FROM apikey.revocations x WHERE x.key_id OPERATOR(pg_catalog.=) k.id)),
		marked AS (
			INSERT INTO apikey.event_marks AS m (kind, key_id, level, armed)
			SELECT 'key.expiring', d.id, l.level, d.expires_at
			  FROM due d CROSS JOIN LATERAL (VALUES (7), (1)) l(level)
			 WHERE l.level OPERATOR(pg_catalog.>=) d.level
			ON CONFLICT DO NOTHING
			RETURNING m.key_id, m.level)
		SELECT d.* FROM due d JOIN marked m ON m.key_id OPERATOR(pg_catalog.=) d.id AND m.level OPERATOR(pg_catalog.=) d.level
		 WHERE d.created_at OPERATOR(pg_catalog.<)
			   (d.expires_at OPERATOR(pg_catalog.-) pg_catalog.make_interval(days => d.level))
		 ORDER BY d.id
	LOOP
		PERFORM apikey._event('key.expiring', r.id, r.owner, CASE r.level WHEN 1 THEN 'warning' ELSE 'info' END,
			pg_catalog.jsonb_build_object('hint', r.hint, 'name', r.name, 'expires_at', r.expires_at,
				'within', CASE r.level WHEN 1 THEN '1 day' ELSE '7 days' END));
		n := n OPERATOR(pg_catalog.+) 1;
	END LOOP;

	-- quota.low: 80, 90, 100 % used since the last refill (the highest one
	-- reached; a refill, or a new quota from set_limits, arms them again)
	FOR r IN
		WITH due AS (
			SELECT k.id, k.owner, k.hint, k.name, k.quota, q.remaining, q.refilled_at,
				   ((k.quota OPERATOR(pg_catalog.-) q.remaining) OPERATOR(pg_catalog.*) 100
					OPERATOR(pg_catalog./) k.quota)::integer AS used_percent
			  FROM apikey.keys k JOIN apikey.quotas q ON q.key_id OPERATOR(pg_catalog.=) k.id
			 WHERE k.quota OPERATOR(pg_catalog.>) 0
			   AND NOT (k.quota_refill IS NOT NULL AND q.refilled_at OPERATOR(pg_catalog.+) k.quota_refill
						OPERATOR(pg_catalog.<=) pg_catalog.now())
			   AND NOT EXISTS (SELECT FROM apikey.revocations x WHERE x.key_id OPERATOR(pg_catalog.=) k.id)),
		leveled AS (
			SELECT d.*, CASE WHEN d.used_percent OPERATOR(pg_catalog.>=) 100 THEN 100
							 WHEN d.used_percent OPERATOR(pg_catalog.>=) 90 THEN 90 ELSE 80 END AS level
			  FROM due d WHERE d.used_percent OPERATOR(pg_catalog.>=) 80),
		marked AS (
			INSERT INTO apikey.event_marks AS m (kind, key_id, level, armed)
			SELECT 'quota.low', d.id, l.level, d.refilled_at
			  FROM leveled d CROSS JOIN LATERAL (VALUES (80), (90), (100)) l(level)
			 WHERE l.level OPERATOR(pg_catalog.<=) d.level
			ON CONFLICT DO NOTHING
			RETURNING m.key_id, m.level)
		SELECT d.* FROM leveled d JOIN marked m ON m.key_id OPERATOR(pg_catalog.=) d.id AND m.level OPERATOR(pg_catalog.=) d.level
		 ORDER BY d.id
	LOOP
		PERFORM apikey._event('quota.low', r.id, r.owner,
			CASE r.level WHEN 100 THEN 'critical' WHEN 90 THEN 'warning' ELSE 'info' END,
			pg_catalog.jsonb_build_object('hint', r.hint, 'name', r.name, 'level', r.level, 'quota', r.quota,
										  'remaining', r.remaining, 'refilled_at', r.refilled_at));
		n := n OPERATOR(pg_catalog.+) 1;
	END LOOP;

	-- rate_limit.saturated: a key refused by its rate limit this hour, once
	-- per hour (flushed, pending and live counts)
	FOR r IN
		WITH refused AS (
			SELECT u.key_id, pg_catalog.sum(u.calls)::bigint AS calls
			  FROM (SELECT l.key_id, l.calls FROM apikey.usage_log l
					 WHERE l.bucket OPERATOR(pg_catalog.>=) v_hour AND l.code OPERATOR(pg_catalog.=) 'rate_limited'
					UNION ALL
					SELECT p.key_id, 1 FROM apikey.usage_pending p
					 WHERE p.bucket OPERATOR(pg_catalog.>=) v_hour AND p.code OPERATOR(pg_catalog.=) 'rate_limited'
					UNION ALL
					SELECT v.key_id, v.calls FROM apikey._live_usage() v
					 WHERE v.bucket OPERATOR(pg_catalog.>=) v_hour AND v.code OPERATOR(pg_catalog.=) 'rate_limited') u
			 WHERE u.key_id IS NOT NULL
			 GROUP BY u.key_id),
		due AS (
			SELECT k.id, k.owner, k.hint, k.name, k.rate_limit, k.rate_window, f.calls
			  FROM refused f JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) f.key_id),
		marked AS (
			INSERT INTO apikey.event_marks AS m (kind, key_id, level, armed)
			SELECT 'rate_limit.saturated', d.id, 0, v_hour FROM due d
			ON CONFLICT DO NOTHING
			RETURNING m.key_id)
		SELECT d.* FROM due d JOIN marked m ON m.key_id OPERATOR(pg_catalog.=) d.id
		 ORDER BY d.id
	LOOP
		PERFORM apikey._event('rate_limit.saturated', r.id, r.owner, 'warning',
			pg_catalog.jsonb_build_object('hint', r.hint, 'name', r.name, 'rate_limit', r.rate_limit,
										  'rate_window', r.rate_window, 'rate_limited_calls', r.calls,
										  'since', v_hour));
		n := n OPERATOR(pg_catalog.+) 1;
	END LOOP;

	-- marks no longer needed: expiries passed or moved, quotas refilled,
	-- hours gone
	DELETE FROM apikey.event_marks m
	 WHERE CASE m.kind
			WHEN 'key.expiring' THEN m.armed OPERATOR(pg_catalog.<=) pg_catalog.now()
				OR NOT EXISTS (SELECT FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) m.key_id
								  AND k.expires_at OPERATOR(pg_catalog.=) m.armed)
			WHEN 'quota.low' THEN NOT EXISTS (SELECT FROM apikey.quotas q
											   WHERE q.key_id OPERATOR(pg_catalog.=) m.key_id
												 AND q.refilled_at OPERATOR(pg_catalog.=) m.armed)
			ELSE m.armed OPERATOR(pg_catalog.<) v_hour END;

	IF v_settings.retention IS NOT NULL THEN
		DELETE FROM apikey.events e
		 WHERE e.at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) v_settings.retention);
	END IF;

	IF v_settings.unused_revoke_after IS NOT NULL THEN
		n := n OPERATOR(pg_catalog.+)
			 pg_catalog.cardinality(apikey._expire_unused(v_settings.unused_revoke_after, false));
	END IF;
	RETURN n;
END
$$;
COMMENT ON FUNCTION apikey._run_events()
	IS 'Internal: one periodic pass (the background worker''s): key.expiring, quota.low and rate_limit.saturated events, once each; prune events past apikey.event_retention; expire_unused when apikey.unused_revoke_after is set; returns events written';
REVOKE ALL ON FUNCTION apikey._run_events() FROM PUBLIC;

CREATE FUNCTION apikey.run_events()
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'run_events'
AS $$
DECLARE
	n bigint;
BEGIN
	n := apikey._run_events();
	PERFORM apikey._audit('run_events', NULL, NULL, pg_catalog.jsonb_build_object('events', n));
	RETURN n;
END
$$;
COMMENT ON FUNCTION apikey.run_events()
	IS 'Run the events pass now (the background worker runs it every apikey.events_interval): key.expiring, quota.low, rate_limit.saturated, once each; prunes by apikey.event_retention; returns events written';
REVOKE ALL ON FUNCTION apikey.run_events() FROM PUBLIC;

-- key_status: when the key last failed (issue 12 item 6).
CREATE OR REPLACE VIEW apikey.key_status AS
SELECT k.id AS key_id, k.owner, k.name, k.hint, k.created_at, k.created_by, k.expires_at,
	   k.last_used_at, lin.rotated_from,
	   CASE WHEN r.key_id IS NOT NULL THEN 'revoked'
			WHEN k.expires_at OPERATOR(pg_catalog.<=) pg_catalog.now() THEN 'expired'
			WHEN s.key_id IS NOT NULL THEN 'suspended'
			WHEN q.key_id IS NOT NULL THEN 'quarantined'
			ELSE 'active' END AS status,
	   r.revoked_at, r.reason AS revoked_reason,
	   ARRAY(SELECT ks.scope FROM apikey.key_scopes ks
			  WHERE ks.key_id OPERATOR(pg_catalog.=) k.id ORDER BY ks.scope) AS scopes,
	   (SELECT pg_catalog.max(l.bucket) FROM apikey.usage_log l
		 WHERE l.key_id OPERATOR(pg_catalog.=) k.id AND l.code OPERATOR(pg_catalog.<>) 'valid') AS last_failed_at
  FROM apikey.keys k
  LEFT JOIN apikey.key_lineage lin ON lin.key_id OPERATOR(pg_catalog.=) k.id
  LEFT JOIN apikey.revocations r ON r.key_id OPERATOR(pg_catalog.=) k.id
  LEFT JOIN apikey.suspensions s ON s.key_id OPERATOR(pg_catalog.=) k.id
		AND (s.until IS NULL OR s.until OPERATOR(pg_catalog.>) pg_catalog.now())
  LEFT JOIN apikey.quarantines q ON q.key_id OPERATOR(pg_catalog.=) k.id
		AND (q.until IS NULL OR q.until OPERATOR(pg_catalog.>) pg_catalog.now());
COMMENT ON COLUMN apikey.key_status.last_failed_at
	IS 'Start of the minute of the key''s last failed verification (any code but valid), as written when usage is flushed; NULL = none recorded';

-- Monitors read events; administrators also run the pass and expire_unused.
INSERT INTO apikey._grant_sets (kind, privilege, object) VALUES
	('monitor', 'SELECT', 'TABLE apikey.events'),
	('admin', 'SELECT', 'TABLE apikey.events'),
	('admin', 'EXECUTE', 'FUNCTION apikey.run_events()'),
	('admin', 'EXECUTE', 'FUNCTION apikey.expire_unused(interval)');

-------------------------------------------------------------------------------
-- Retention, rollups and dashboard views (issue 15, item 4).
--
-- usage_log gains an index on time and rolled_up: how many of a row's
-- calls the rollups (usage_hourly, usage_daily, usage_address_hourly)
-- already hold.  apikey.run_retention() adds calls - rolled_up to them and
-- sets rolled_up to calls in one statement, only where the row still holds
-- the calls it read (a flush that added to the row meanwhile is rolled up
-- at the next run): every call is in the rollups exactly once.  So every
-- total is rollup + (calls - rolled_up) of usage_log (+ pending rows + live
-- counters): exact whenever the rollup last ran, and cheap when it ran
-- lately.  Raw rows are deleted after apikey.usage_retention once rolled
-- up; failure addresses are erased (merged into the row without one) after
-- apikey.address_retention.  Hours and days are UTC.  The settings are
-- defined in C (src/retention.c); the usage writer runs this every
-- apikey.retention_interval, and without the preload a scheduler does.
-------------------------------------------------------------------------------

ALTER TABLE apikey.usage_log ADD COLUMN rolled_up bigint NOT NULL DEFAULT 0;
ALTER TABLE apikey.usage_log ADD CONSTRAINT usage_log_rolled_up_check
	CHECK (rolled_up OPERATOR(pg_catalog.>=) 0 AND rolled_up OPERATOR(pg_catalog.<=) calls);
COMMENT ON COLUMN apikey.usage_log.rolled_up
	IS 'Calls of this row already added to the rollups (usage_hourly, usage_daily) by apikey.run_retention(); calls - rolled_up are not yet';
CREATE INDEX usage_log_bucket_idx ON apikey.usage_log (bucket);
COMMENT ON INDEX apikey.usage_log_bucket_idx IS 'Time: the last hour''s minutes (owner_usage_last_hour), retention by age';
-- "Not rolled up yet" is written (calls - rolled_up) > 0 everywhere: the
-- statistics on that expression let the planner estimate it (a comparison
-- of two columns is guessed as a third of the table, and a third of a
-- million rows gets a parallel plan for what are a few hundred), and the
-- partial index has the same predicate, so the queries use it.
CREATE INDEX usage_log_unrolled_idx ON apikey.usage_log (bucket)
	WHERE (calls OPERATOR(pg_catalog.-) rolled_up) OPERATOR(pg_catalog.>) 0;
COMMENT ON INDEX apikey.usage_log_unrolled_idx IS 'Rows with calls not yet rolled up ((calls - rolled_up) > 0): what run_retention() and the rollup-based views read from usage_log';
CREATE STATISTICS apikey.usage_log_unrolled_stat ON ((calls OPERATOR(pg_catalog.-) rolled_up)) FROM apikey.usage_log;
COMMENT ON STATISTICS apikey.usage_log_unrolled_stat IS 'Distribution of calls - rolled_up, so ANALYZE tells the planner how few rows are not rolled up yet';
CREATE INDEX usage_log_address_idx ON apikey.usage_log (bucket)
	WHERE client_addr IS NOT NULL;
COMMENT ON INDEX apikey.usage_log_address_idx IS 'Rows that hold a failure address, for erasing them after apikey.address_retention';

CREATE TABLE apikey.usage_hourly (
	key_id		bigint,
	bucket		timestamptz NOT NULL,
	code		text NOT NULL,
	calls		bigint NOT NULL CONSTRAINT usage_hourly_calls_check CHECK (calls OPERATOR(pg_catalog.>) 0)
);
CREATE UNIQUE INDEX usage_hourly_entry_key ON apikey.usage_hourly ((COALESCE(key_id, 0)), bucket, code);
CREATE INDEX usage_hourly_bucket_idx ON apikey.usage_hourly (bucket);
COMMENT ON TABLE apikey.usage_hourly IS 'Rollup of apikey.usage_log per key, UTC hour and verdict code (no addresses); kept apikey.hourly_retention';
COMMENT ON COLUMN apikey.usage_hourly.key_id IS 'The key; NULL for tokens that match no key';
COMMENT ON COLUMN apikey.usage_hourly.bucket IS 'Start of the hour (UTC)';
COMMENT ON COLUMN apikey.usage_hourly.code IS 'Verdict code';
COMMENT ON COLUMN apikey.usage_hourly.calls IS 'Verifications rolled up so far';
COMMENT ON INDEX apikey.usage_hourly_entry_key IS 'One row per key, hour and code (what run_retention() adds to)';
COMMENT ON INDEX apikey.usage_hourly_bucket_idx IS 'Time: the 24-hour dashboard views and retention by age';

CREATE TABLE apikey.usage_daily (
	key_id		bigint,
	bucket		timestamptz NOT NULL,
	code		text NOT NULL,
	calls		bigint NOT NULL CONSTRAINT usage_daily_calls_check CHECK (calls OPERATOR(pg_catalog.>) 0)
);
CREATE UNIQUE INDEX usage_daily_entry_key ON apikey.usage_daily ((COALESCE(key_id, 0)), bucket, code);
CREATE INDEX usage_daily_bucket_idx ON apikey.usage_daily (bucket);
COMMENT ON TABLE apikey.usage_daily IS 'Rollup of apikey.usage_log per key, UTC day and verdict code (no addresses); kept apikey.daily_retention';
COMMENT ON COLUMN apikey.usage_daily.key_id IS 'The key; NULL for tokens that match no key';
COMMENT ON COLUMN apikey.usage_daily.bucket IS 'Start of the day (UTC)';
COMMENT ON COLUMN apikey.usage_daily.code IS 'Verdict code';
COMMENT ON COLUMN apikey.usage_daily.calls IS 'Verifications rolled up so far';
COMMENT ON INDEX apikey.usage_daily_entry_key IS 'One row per key, day and code (what run_retention() adds to)';
COMMENT ON INDEX apikey.usage_daily_bucket_idx IS 'Time: retention by age, ranges of days';

CREATE TABLE apikey.usage_address_hourly (
	key_id		bigint NOT NULL,
	bucket		timestamptz NOT NULL,
	code		text NOT NULL,
	client_addr	inet NOT NULL,
	calls		bigint NOT NULL CONSTRAINT usage_address_hourly_calls_check CHECK (calls OPERATOR(pg_catalog.>) 0)
);
CREATE UNIQUE INDEX usage_address_hourly_entry_key ON apikey.usage_address_hourly (key_id, bucket, code, client_addr);
CREATE INDEX usage_address_hourly_bucket_idx ON apikey.usage_address_hourly (bucket);
COMMENT ON TABLE apikey.usage_address_hourly IS 'Rollup of failures with a client address per key, UTC hour, code and address; rows go after apikey.address_retention';
COMMENT ON COLUMN apikey.usage_address_hourly.key_id IS 'The key that failed';
COMMENT ON COLUMN apikey.usage_address_hourly.bucket IS 'Start of the hour (UTC)';
COMMENT ON COLUMN apikey.usage_address_hourly.code IS 'Verdict code (a failure)';
COMMENT ON COLUMN apikey.usage_address_hourly.client_addr IS 'Client address (personal data: kept apikey.address_retention)';
COMMENT ON COLUMN apikey.usage_address_hourly.calls IS 'Failed verifications rolled up so far';
COMMENT ON INDEX apikey.usage_address_hourly_entry_key IS 'One row per key, hour, code and address (what run_retention() adds to)';
COMMENT ON INDEX apikey.usage_address_hourly_bucket_idx IS 'Time: top_failing_networks and erasure by age';

-- The network window: the address rollups from one hour on (since), summed
-- per client network (as the failure limiter counts them: /32, /64) and
-- key, so top_failing_networks reads one row per network and key instead
-- of one per address and hour (as many as the raw failures, when addresses
-- change often).  Invariant, kept by run_retention() in the transaction
-- that changes usage_address_hourly (only it does): for every network and
-- key, calls = the sum of usage_address_hourly.calls with bucket >= since;
-- no row where that is 0.  Each run first moves since to the start of the
-- dashboards' 24 hours (or to the address cutoff, if later), subtracting
-- the hours that left; its rollup then adds to the window what it adds to
-- the hours from since on; the address rollups it deletes are older than
-- the cutoff, so never in the window.  The view adds back or subtracts the
-- hours between since and its own 24 hours (none, or the hour that passed
-- since the last run).  Without a since row (new, or restored from a dump:
-- the window is derived and not dumped) the view ignores the window and
-- the next run builds it afresh.
CREATE TABLE apikey.usage_network_window (
	network		cidr NOT NULL,
	key_id		bigint NOT NULL,
	calls		bigint NOT NULL CONSTRAINT usage_network_window_calls_check CHECK (calls OPERATOR(pg_catalog.>) 0),
	CONSTRAINT usage_network_window_pkey PRIMARY KEY (network, key_id)
);
COMMENT ON TABLE apikey.usage_network_window IS 'Failures per client network and key in apikey.usage_address_hourly from usage_network_window_since on, kept by run_retention() (for top_failing_networks); derived, not dumped';
COMMENT ON COLUMN apikey.usage_network_window.network IS 'Client network: the /32 of an IPv4 address, the /64 of an IPv6 one (personal data: kept only while its address rollups are)';
COMMENT ON COLUMN apikey.usage_network_window.key_id IS 'The key that failed';
COMMENT ON COLUMN apikey.usage_network_window.calls IS 'Failed verifications in the address rollups of hours from since on';
COMMENT ON INDEX apikey.usage_network_window_pkey IS 'One row per network and key (what run_retention() adds to and subtracts from)';
CREATE TABLE apikey.usage_network_window_since (
	only_row	boolean PRIMARY KEY DEFAULT true CONSTRAINT usage_network_window_since_one_row CHECK (only_row),
	since		timestamptz NOT NULL
);
COMMENT ON TABLE apikey.usage_network_window_since IS 'Where apikey.usage_network_window starts; no row: the window is not built yet (the next run_retention() builds it)';
COMMENT ON COLUMN apikey.usage_network_window_since.only_row IS 'Always true: the table has at most one row';
COMMENT ON COLUMN apikey.usage_network_window_since.since IS 'The window holds the address rollups with bucket >= since: the start of the 24 hours, or the address cutoff if later, at the last run';

SELECT pg_catalog.pg_extension_config_dump('apikey.usage_hourly', '');
SELECT pg_catalog.pg_extension_config_dump('apikey.usage_daily', '');
SELECT pg_catalog.pg_extension_config_dump('apikey.usage_address_hourly', '');
REVOKE ALL ON apikey.usage_hourly, apikey.usage_daily, apikey.usage_address_hourly,
	apikey.usage_network_window, apikey.usage_network_window_since FROM PUBLIC;

CREATE FUNCTION apikey._retention_settings(OUT usage_retention interval, OUT hourly_retention interval,
										   OUT daily_retention interval, OUT address_retention interval)
RETURNS record
AS 'MODULE_PATHNAME', 'apikey_retention_settings_sql'
LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._retention_settings()
	IS 'Internal: apikey.usage_retention, hourly_retention, daily_retention and address_retention as intervals (read in C, so defined without the preload)';
REVOKE ALL ON FUNCTION apikey._retention_settings() FROM PUBLIC;

-- One bounded batch of each step.  Concurrent runs take turns on a lock of
-- usage_hourly that only run_retention() takes (readers and the usage
-- writer never wait for it), and each statement then sees what the
-- previous run committed.  The audit lock is taken last, just before the
-- audit row: the rollup holds no lock another administrative function
-- takes, so no deadlock, and they need not wait for a long batch.
CREATE FUNCTION apikey.run_retention(batch_size integer DEFAULT 10000,
	OUT rows_rolled_up bigint, OUT calls_rolled_up bigint, OUT addresses_erased bigint,
	OUT usage_deleted bigint, OUT hourly_deleted bigint, OUT daily_deleted bigint,
	OUT address_rollups_deleted bigint, OUT more boolean)
RETURNS record
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'run_retention'
AS $$
DECLARE
	s record;
	v_usage_cutoff timestamptz;
	v_hourly_cutoff timestamptz;
	v_daily_cutoff timestamptz;
	v_address_cutoff timestamptz;
	v_window_since timestamptz;
	v_window_was timestamptz;
BEGIN
	IF run_retention.batch_size IS NULL OR run_retention.batch_size OPERATOR(pg_catalog.<) 1
	   OR run_retention.batch_size OPERATOR(pg_catalog.>) 1000000 THEN
		RAISE EXCEPTION 'batch_size must be between 1 and 1000000'
			USING ERRCODE = '22023',
				  HINT = 'It bounds the rows each step handles in one call; call again while more is true.';
	END IF;
	LOCK TABLE apikey.usage_hourly IN SHARE ROW EXCLUSIVE MODE;
	SELECT * INTO s FROM apikey._retention_settings();
	v_usage_cutoff := pg_catalog.now() OPERATOR(pg_catalog.-) s.usage_retention;
	v_hourly_cutoff := pg_catalog.now() OPERATOR(pg_catalog.-) s.hourly_retention;
	v_daily_cutoff := pg_catalog.now() OPERATOR(pg_catalog.-) s.daily_retention;
	v_address_cutoff := pg_catalog.now() OPERATOR(pg_catalog.-) s.address_retention;

	-- 0. Move the network window (usage_network_window) to this run's
	-- start: the first of the dashboards' 24 hours, or the address cutoff
	-- if later, so the address rollups deleted below are never in it.  The
	-- address rollups of the hours between the old start and the new one
	-- are subtracted (added, should the start move back).  No start yet:
	-- the window is built afresh from the address rollups.
	v_window_since := GREATEST(pg_catalog.date_bin('1 hour'::interval, pg_catalog.now() OPERATOR(pg_catalog.-) '23 hours'::interval,
												   '2000-01-01 00:00:00+00'::timestamptz),
							   v_address_cutoff);
	SELECT w.since INTO v_window_was FROM apikey.usage_network_window_since w;
	IF NOT FOUND THEN
		DELETE FROM apikey.usage_network_window;
		v_window_was := 'infinity';
	END IF;
	IF v_window_was OPERATOR(pg_catalog.<>) v_window_since THEN
		WITH d AS (
			SELECT pg_catalog.network(pg_catalog.set_masklen(a.client_addr,
					   CASE pg_catalog.family(a.client_addr) WHEN 4 THEN 32 ELSE 64 END)) AS network,
				   a.key_id,
				   CASE WHEN v_window_since OPERATOR(pg_catalog.>) v_window_was
						THEN OPERATOR(pg_catalog.-) pg_catalog.sum(a.calls)
						ELSE pg_catalog.sum(a.calls) END::bigint AS calls
			  FROM apikey.usage_address_hourly a
			 WHERE a.bucket OPERATOR(pg_catalog.>=) LEAST(v_window_was, v_window_since)
			   AND a.bucket OPERATOR(pg_catalog.<) GREATEST(v_window_was, v_window_since)
			 GROUP BY 1, 2),
		j AS (
			SELECT d.network, d.key_id, COALESCE(w.calls, 0) OPERATOR(pg_catalog.+) d.calls AS calls,
				   w.key_id IS NOT NULL AS present
			  FROM d LEFT JOIN apikey.usage_network_window w
					 ON w.network OPERATOR(pg_catalog.=) d.network AND w.key_id OPERATOR(pg_catalog.=) d.key_id),
		gone AS (
			DELETE FROM apikey.usage_network_window w USING j
			 WHERE w.network OPERATOR(pg_catalog.=) j.network AND w.key_id OPERATOR(pg_catalog.=) j.key_id
			   AND j.present AND j.calls OPERATOR(pg_catalog.=) 0),
		changed AS (
			UPDATE apikey.usage_network_window w SET calls = j.calls
			  FROM j
			 WHERE w.network OPERATOR(pg_catalog.=) j.network AND w.key_id OPERATOR(pg_catalog.=) j.key_id
			   AND j.present AND j.calls OPERATOR(pg_catalog.<>) 0)
		INSERT INTO apikey.usage_network_window (network, key_id, calls)
		SELECT j.network, j.key_id, j.calls FROM j WHERE NOT j.present;
		INSERT INTO apikey.usage_network_window_since AS w (since) VALUES (v_window_since)
		ON CONFLICT (only_row) DO UPDATE SET since = excluded.since;
	END IF;

	-- 1. Roll up what rows hold beyond rolled_up.  A row a flush changed
	-- since it was read no longer matches (calls, rolled_up) and is left
	-- for the next run: counted once, never twice.  Minutes the writer is
	-- still flushing (this one and the last) are left for later: rows
	-- locked in different orders by a flush and a rollup could deadlock.
	WITH picked AS (
		SELECT l.ctid AS t, l.key_id, l.bucket, l.code, l.client_addr, l.calls, l.rolled_up
		  FROM apikey.usage_log l
		 WHERE (l.calls OPERATOR(pg_catalog.-) l.rolled_up) OPERATOR(pg_catalog.>) 0
		   AND l.bucket OPERATOR(pg_catalog.<) (pg_catalog.date_bin('1 minute'::interval, pg_catalog.now(), '2000-01-01 00:00:00+00'::timestamptz)
												OPERATOR(pg_catalog.-) '1 minute'::interval)
		 ORDER BY l.bucket
		 LIMIT run_retention.batch_size),
	marked AS (
		UPDATE apikey.usage_log l SET rolled_up = l.calls
		  FROM picked p
		 WHERE l.ctid OPERATOR(pg_catalog.=) p.t
		   AND l.calls OPERATOR(pg_catalog.=) p.calls AND l.rolled_up OPERATOR(pg_catalog.=) p.rolled_up
		RETURNING p.key_id, p.bucket, p.code, p.client_addr, p.calls OPERATOR(pg_catalog.-) p.rolled_up AS n),
	hourly AS (
		INSERT INTO apikey.usage_hourly AS h (key_id, bucket, code, calls)
		SELECT m.key_id, pg_catalog.date_bin('1 hour'::interval, m.bucket, '2000-01-01 00:00:00+00'::timestamptz), m.code, pg_catalog.sum(m.n)
		  FROM marked m GROUP BY 1, 2, 3
		ON CONFLICT ((COALESCE(key_id, 0)), bucket, code)
		DO UPDATE SET calls = h.calls OPERATOR(pg_catalog.+) excluded.calls),
	daily AS (
		INSERT INTO apikey.usage_daily AS d (key_id, bucket, code, calls)
		SELECT m.key_id, pg_catalog.date_bin('1 day'::interval, m.bucket, '2000-01-01 00:00:00+00'::timestamptz), m.code, pg_catalog.sum(m.n)
		  FROM marked m GROUP BY 1, 2, 3
		ON CONFLICT ((COALESCE(key_id, 0)), bucket, code)
		DO UPDATE SET calls = d.calls OPERATOR(pg_catalog.+) excluded.calls),
	addressed AS (
		INSERT INTO apikey.usage_address_hourly AS a (key_id, bucket, code, client_addr, calls)
		SELECT m.key_id, pg_catalog.date_bin('1 hour'::interval, m.bucket, '2000-01-01 00:00:00+00'::timestamptz), m.code, m.client_addr, pg_catalog.sum(m.n)
		  FROM marked m
		 WHERE m.key_id IS NOT NULL AND m.client_addr IS NOT NULL
		   AND m.bucket OPERATOR(pg_catalog.>=) v_address_cutoff
		 GROUP BY 1, 2, 3, 4
		ON CONFLICT (key_id, bucket, code, client_addr)
		DO UPDATE SET calls = a.calls OPERATOR(pg_catalog.+) excluded.calls),
	networked AS (
		-- the same failures, of the hours from the window's start on
		INSERT INTO apikey.usage_network_window AS w (network, key_id, calls)
		SELECT pg_catalog.network(pg_catalog.set_masklen(m.client_addr,
				   CASE pg_catalog.family(m.client_addr) WHEN 4 THEN 32 ELSE 64 END)), m.key_id, pg_catalog.sum(m.n)
		  FROM marked m
		 WHERE m.key_id IS NOT NULL AND m.client_addr IS NOT NULL
		   AND pg_catalog.date_bin('1 hour'::interval, m.bucket, '2000-01-01 00:00:00+00'::timestamptz) OPERATOR(pg_catalog.>=) v_window_since
		 GROUP BY 1, 2
		ON CONFLICT (network, key_id)
		DO UPDATE SET calls = w.calls OPERATOR(pg_catalog.+) excluded.calls)
	SELECT pg_catalog.count(*), COALESCE(pg_catalog.sum(m.n), 0)
	  INTO rows_rolled_up, calls_rolled_up FROM marked m;

	-- 2. Erase failure addresses older than address_retention: each such
	-- row is merged into its key's, minute's and code's row without one.
	WITH gone AS (
		DELETE FROM apikey.usage_log l
		 WHERE l.ctid OPERATOR(pg_catalog.=) ANY (ARRAY(
				SELECT o.ctid FROM apikey.usage_log o
				 WHERE o.client_addr IS NOT NULL AND o.bucket OPERATOR(pg_catalog.<) v_address_cutoff
				 ORDER BY o.bucket LIMIT run_retention.batch_size))
		   AND l.client_addr IS NOT NULL AND l.bucket OPERATOR(pg_catalog.<) v_address_cutoff
		RETURNING l.key_id, l.bucket, l.code, l.calls, l.rolled_up),
	merged AS (
		INSERT INTO apikey.usage_log AS u (key_id, bucket, code, client_addr, calls, rolled_up)
		SELECT g.key_id, g.bucket, g.code, NULL, pg_catalog.sum(g.calls), pg_catalog.sum(g.rolled_up)
		  FROM gone g GROUP BY 1, 2, 3
		ON CONFLICT ((COALESCE(key_id, 0)), bucket, code, (COALESCE(client_addr, '0.0.0.0/0'::pg_catalog.inet)))
		DO UPDATE SET calls = u.calls OPERATOR(pg_catalog.+) excluded.calls,
					  rolled_up = u.rolled_up OPERATOR(pg_catalog.+) excluded.rolled_up)
	SELECT pg_catalog.count(*) INTO addresses_erased FROM gone;
	addresses_erased := addresses_erased OPERATOR(pg_catalog.+)
		apikey._erase_finding_addresses(v_address_cutoff, run_retention.batch_size);

	-- 3. Delete by age: address rollups, rolled-up raw rows, rollups.
	DELETE FROM apikey.usage_address_hourly a
	 WHERE a.ctid OPERATOR(pg_catalog.=) ANY (ARRAY(
			SELECT o.ctid FROM apikey.usage_address_hourly o
			 WHERE o.bucket OPERATOR(pg_catalog.<) v_address_cutoff LIMIT run_retention.batch_size))
	   AND a.bucket OPERATOR(pg_catalog.<) v_address_cutoff;
	GET DIAGNOSTICS address_rollups_deleted = ROW_COUNT;
	DELETE FROM apikey.usage_log l
	 WHERE l.ctid OPERATOR(pg_catalog.=) ANY (ARRAY(
			SELECT o.ctid FROM apikey.usage_log o
			 WHERE o.bucket OPERATOR(pg_catalog.<) v_usage_cutoff AND o.calls OPERATOR(pg_catalog.=) o.rolled_up
			 LIMIT run_retention.batch_size))
	   AND l.bucket OPERATOR(pg_catalog.<) v_usage_cutoff AND l.calls OPERATOR(pg_catalog.=) l.rolled_up;
	GET DIAGNOSTICS usage_deleted = ROW_COUNT;
	DELETE FROM apikey.usage_hourly h
	 WHERE h.ctid OPERATOR(pg_catalog.=) ANY (ARRAY(
			SELECT o.ctid FROM apikey.usage_hourly o
			 WHERE o.bucket OPERATOR(pg_catalog.<) v_hourly_cutoff LIMIT run_retention.batch_size))
	   AND h.bucket OPERATOR(pg_catalog.<) v_hourly_cutoff;
	GET DIAGNOSTICS hourly_deleted = ROW_COUNT;
	DELETE FROM apikey.usage_daily d
	 WHERE d.ctid OPERATOR(pg_catalog.=) ANY (ARRAY(
			SELECT o.ctid FROM apikey.usage_daily o
			 WHERE o.bucket OPERATOR(pg_catalog.<) v_daily_cutoff LIMIT run_retention.batch_size))
	   AND d.bucket OPERATOR(pg_catalog.<) v_daily_cutoff;
	GET DIAGNOSTICS daily_deleted = ROW_COUNT;

	more := GREATEST(rows_rolled_up, addresses_erased, address_rollups_deleted, usage_deleted,
								hourly_deleted, daily_deleted) OPERATOR(pg_catalog.>=) run_retention.batch_size;
	PERFORM apikey._audit_lock();
	PERFORM apikey._audit('run_retention', NULL, NULL, pg_catalog.jsonb_build_object(
		'batch_size', run_retention.batch_size, 'rows_rolled_up', rows_rolled_up,
		'calls_rolled_up', calls_rolled_up, 'addresses_erased', addresses_erased,
		'usage_deleted', usage_deleted, 'hourly_deleted', hourly_deleted, 'daily_deleted', daily_deleted,
		'address_rollups_deleted', address_rollups_deleted, 'more', more));
	RETURN;
END
$$;
COMMENT ON FUNCTION apikey.run_retention(integer)
	IS 'Roll usage_log up into usage_hourly/usage_daily/usage_address_hourly and the network window (each call exactly once), erase failure addresses older than apikey.address_retention, delete what is older than each retention setting; at most batch_size rows per step, more = call again; audited';
REVOKE ALL ON FUNCTION apikey.run_retention(integer) FROM PUBLIC;

CREATE OR REPLACE VIEW apikey.key_usage AS
SELECT u.key_id, k.owner, k.name AS key_name, u.bucket,
	   pg_catalog.sum(u.calls)::bigint AS calls,
	   COALESCE(pg_catalog.sum(u.calls) FILTER (WHERE u.code OPERATOR(pg_catalog.=) 'valid'), 0)::bigint AS valid_calls,
	   COALESCE(pg_catalog.sum(u.calls) FILTER (WHERE u.code OPERATOR(pg_catalog.<>) 'valid'), 0)::bigint AS failed_calls,
	   COALESCE(pg_catalog.sum(u.calls) FILTER (WHERE u.code OPERATOR(pg_catalog.=) 'rate_limited'), 0)::bigint AS rate_limited_calls
  FROM (SELECT l.key_id, l.bucket, l.code, l.calls FROM apikey.usage_log l
		UNION ALL
		SELECT p.key_id, p.bucket, p.code, 1::pg_catalog.int8 FROM apikey.usage_pending p
		UNION ALL
		SELECT v.key_id, v.bucket, v.code, v.calls FROM apikey._live_usage() v) u
  LEFT JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) u.key_id
 GROUP BY u.key_id, k.owner, k.name, u.bucket;

CREATE VIEW apikey.hourly_usage AS
SELECT u.key_id, u.bucket, u.code, pg_catalog.sum(u.calls)::bigint AS calls
  FROM (SELECT h.key_id, h.bucket, h.code, h.calls FROM apikey.usage_hourly h
		UNION ALL
		SELECT l.key_id, pg_catalog.date_bin('1 hour'::interval, l.bucket, '2000-01-01 00:00:00+00'::timestamptz), l.code,
			   l.calls OPERATOR(pg_catalog.-) l.rolled_up
		  FROM apikey.usage_log l WHERE (l.calls OPERATOR(pg_catalog.-) l.rolled_up) OPERATOR(pg_catalog.>) 0
		UNION ALL
		SELECT p.key_id, pg_catalog.date_bin('1 hour'::interval, p.bucket, '2000-01-01 00:00:00+00'::timestamptz), p.code, 1::pg_catalog.int8
		  FROM apikey.usage_pending p
		UNION ALL
		SELECT v.key_id, pg_catalog.date_bin('1 hour'::interval, v.bucket, '2000-01-01 00:00:00+00'::timestamptz), v.code, v.calls
		  FROM apikey._live_usage() v) u
 GROUP BY u.key_id, u.bucket, u.code;
COMMENT ON VIEW apikey.hourly_usage IS 'Calls per key, UTC hour and verdict code, exact at any time: the hourly rollups plus what usage_log, pending rows and live counters hold beyond them (as far back as apikey.hourly_retention)';
COMMENT ON COLUMN apikey.hourly_usage.key_id IS 'The key; NULL for tokens that match no key';
COMMENT ON COLUMN apikey.hourly_usage.bucket IS 'Start of the hour (UTC)';
COMMENT ON COLUMN apikey.hourly_usage.code IS 'Verdict code';
COMMENT ON COLUMN apikey.hourly_usage.calls IS 'Verifications';

CREATE VIEW apikey.owner_usage_last_hour AS
SELECT k.owner, u.bucket,
	   pg_catalog.sum(u.calls)::bigint AS calls,
	   COALESCE(pg_catalog.sum(u.calls) FILTER (WHERE u.code OPERATOR(pg_catalog.=) 'valid'), 0)::bigint AS valid_calls,
	   COALESCE(pg_catalog.sum(u.calls) FILTER (WHERE u.code OPERATOR(pg_catalog.<>) 'valid'), 0)::bigint AS failed_calls,
	   COALESCE(pg_catalog.sum(u.calls) FILTER (WHERE u.code OPERATOR(pg_catalog.=) 'rate_limited'), 0)::bigint AS rate_limited_calls
  FROM (SELECT l.key_id, l.bucket, l.code, l.calls FROM apikey.usage_log l
		UNION ALL
		SELECT p.key_id, p.bucket, p.code, 1::pg_catalog.int8 FROM apikey.usage_pending p
		UNION ALL
		SELECT v.key_id, v.bucket, v.code, v.calls FROM apikey._live_usage() v) u
  LEFT JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) u.key_id
 WHERE u.bucket OPERATOR(pg_catalog.>) (pg_catalog.now() OPERATOR(pg_catalog.-) '1 hour'::interval)
 GROUP BY k.owner, u.bucket;
COMMENT ON VIEW apikey.owner_usage_last_hour IS 'Calls per owner and minute over the last hour (usage_log, pending rows and live counters); 0, not NULL, where there were none of a kind';
COMMENT ON COLUMN apikey.owner_usage_last_hour.owner IS 'The keys'' owner; NULL for tokens that match no key';
COMMENT ON COLUMN apikey.owner_usage_last_hour.bucket IS 'Start of the minute';
COMMENT ON COLUMN apikey.owner_usage_last_hour.calls IS 'Verifications, every verdict';
COMMENT ON COLUMN apikey.owner_usage_last_hour.valid_calls IS 'Verifications with verdict valid';
COMMENT ON COLUMN apikey.owner_usage_last_hour.failed_calls IS 'Verifications with any other verdict';
COMMENT ON COLUMN apikey.owner_usage_last_hour.rate_limited_calls IS 'Verifications refused by the rate limit';

CREATE VIEW apikey.top_failing_keys AS
SELECT u.key_id, k.owner, k.name AS key_name,
	   COALESCE(pg_catalog.sum(u.calls) FILTER (WHERE u.code OPERATOR(pg_catalog.<>) 'valid'), 0)::bigint AS failed_calls,
	   pg_catalog.sum(u.calls)::bigint AS calls,
	   COALESCE(pg_catalog.sum(u.calls) FILTER (WHERE u.code OPERATOR(pg_catalog.=) 'rate_limited'), 0)::bigint AS rate_limited_calls
  FROM apikey.hourly_usage u
  LEFT JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) u.key_id
 WHERE u.bucket OPERATOR(pg_catalog.>=) pg_catalog.date_bin('1 hour'::interval, pg_catalog.now() OPERATOR(pg_catalog.-) '23 hours'::interval, '2000-01-01 00:00:00+00'::timestamptz)
 GROUP BY u.key_id, k.owner, k.name
HAVING pg_catalog.sum(u.calls) FILTER (WHERE u.code OPERATOR(pg_catalog.<>) 'valid') OPERATOR(pg_catalog.>) 0
 ORDER BY failed_calls DESC, u.key_id;
COMMENT ON VIEW apikey.top_failing_keys IS 'Keys by failed verifications over the last 24 hours (this hour and the 23 before, UTC), most first; from the hourly rollups plus what is not rolled up yet';
COMMENT ON COLUMN apikey.top_failing_keys.key_id IS 'The key; NULL for tokens that match no key';
COMMENT ON COLUMN apikey.top_failing_keys.owner IS 'The key''s owner';
COMMENT ON COLUMN apikey.top_failing_keys.key_name IS 'The key''s name';
COMMENT ON COLUMN apikey.top_failing_keys.failed_calls IS 'Verifications with a verdict other than valid';
COMMENT ON COLUMN apikey.top_failing_keys.calls IS 'Verifications, every verdict';
COMMENT ON COLUMN apikey.top_failing_keys.rate_limited_calls IS 'Verifications refused by the rate limit';

-- The window's networks and keys (usage_network_window: the address
-- rollups from its start on), plus or minus the address rollups between
-- its start and this query's 24 hours, plus what is not rolled up yet.
CREATE VIEW apikey.top_failing_networks AS
SELECT n.network, pg_catalog.sum(n.calls)::bigint AS failed_calls, pg_catalog.count(*) AS keys
  FROM (SELECT COALESCE(w.network, d.network) AS network,
			   COALESCE(w.calls, 0) OPERATOR(pg_catalog.+) COALESCE(d.calls, 0) AS calls
		  FROM (SELECT x.network, x.key_id, x.calls FROM apikey.usage_network_window x
				 WHERE EXISTS (SELECT FROM apikey.usage_network_window_since)) w
		  FULL JOIN (SELECT pg_catalog.network(pg_catalog.set_masklen(u.client_addr,
							CASE pg_catalog.family(u.client_addr) WHEN 4 THEN 32 ELSE 64 END)) AS network,
						u.key_id, pg_catalog.sum(u.calls)::bigint AS calls
				  FROM (SELECT a.key_id, a.client_addr, a.calls FROM apikey.usage_address_hourly a
						 WHERE a.bucket OPERATOR(pg_catalog.>=) pg_catalog.date_bin('1 hour'::interval, pg_catalog.now() OPERATOR(pg_catalog.-) '23 hours'::interval, '2000-01-01 00:00:00+00'::timestamptz)
						   AND a.bucket OPERATOR(pg_catalog.<) COALESCE((SELECT s.since FROM apikey.usage_network_window_since s), 'infinity'::timestamptz)
						UNION ALL
						SELECT a.key_id, a.client_addr, OPERATOR(pg_catalog.-) a.calls FROM apikey.usage_address_hourly a
						 WHERE a.bucket OPERATOR(pg_catalog.>=) COALESCE((SELECT s.since FROM apikey.usage_network_window_since s), 'infinity'::timestamptz)
						   AND a.bucket OPERATOR(pg_catalog.<) pg_catalog.date_bin('1 hour'::interval, pg_catalog.now() OPERATOR(pg_catalog.-) '23 hours'::interval, '2000-01-01 00:00:00+00'::timestamptz)
						UNION ALL
						SELECT l.key_id, l.client_addr, l.calls OPERATOR(pg_catalog.-) l.rolled_up
						  FROM apikey.usage_log l
						 WHERE (l.calls OPERATOR(pg_catalog.-) l.rolled_up) OPERATOR(pg_catalog.>) 0 AND l.client_addr IS NOT NULL
						   AND l.bucket OPERATOR(pg_catalog.>=) pg_catalog.date_bin('1 hour'::interval, pg_catalog.now() OPERATOR(pg_catalog.-) '23 hours'::interval, '2000-01-01 00:00:00+00'::timestamptz)
						UNION ALL
						SELECT p.key_id, p.client_addr, 1::pg_catalog.int8 FROM apikey.usage_pending p
						 WHERE p.client_addr IS NOT NULL AND p.code OPERATOR(pg_catalog.<>) 'valid'
						UNION ALL
						SELECT v.key_id, v.client_addr, v.calls FROM apikey._live_usage() v
						 WHERE v.client_addr IS NOT NULL AND v.code OPERATOR(pg_catalog.<>) 'valid') u
				 GROUP BY 1, 2) d
			ON d.network OPERATOR(pg_catalog.=) w.network AND d.key_id OPERATOR(pg_catalog.=) w.key_id) n
 WHERE n.calls OPERATOR(pg_catalog.>) 0
 GROUP BY n.network
 ORDER BY failed_calls DESC, n.network;
COMMENT ON VIEW apikey.top_failing_networks IS 'Client networks (the /32 of an IPv4 address, the /64 of an IPv6 one, as the failure limiter counts them) by failed verifications of known keys over the last 24 hours, most first; only as far back as apikey.address_retention; from usage_network_window and the address rollups plus what is not rolled up yet';
COMMENT ON COLUMN apikey.top_failing_networks.network IS 'Client network';
COMMENT ON COLUMN apikey.top_failing_networks.failed_calls IS 'Failed verifications from it (addresses are kept for at most 16 per key and minute)';
COMMENT ON COLUMN apikey.top_failing_networks.keys IS 'Distinct keys that failed from it';

-- one row per verdict code: say so, so plans over it stay small
ALTER FUNCTION apikey._stats_by_code() ROWS 14;

CREATE VIEW apikey.code_usage_24h AS
SELECT h.bucket, c.code, COALESCE(pg_catalog.sum(u.calls), 0)::bigint AS calls
  FROM (SELECT pg_catalog.date_bin('1 hour'::interval, pg_catalog.now(), '2000-01-01 00:00:00+00'::timestamptz)
			   OPERATOR(pg_catalog.-) pg_catalog.make_interval(hours => g) AS bucket
		  FROM pg_catalog.generate_series(0, 23) g) h
 CROSS JOIN (SELECT s.code FROM apikey._stats_by_code() s) c
  LEFT JOIN (SELECT x.bucket, x.code, x.calls FROM apikey.hourly_usage x
			  WHERE x.bucket OPERATOR(pg_catalog.>=) pg_catalog.date_bin('1 hour'::interval, pg_catalog.now() OPERATOR(pg_catalog.-) '23 hours'::interval, '2000-01-01 00:00:00+00'::timestamptz)) u
		 ON u.bucket OPERATOR(pg_catalog.=) h.bucket AND u.code OPERATOR(pg_catalog.=) c.code
 GROUP BY h.bucket, c.code;
COMMENT ON VIEW apikey.code_usage_24h IS 'Verifications per UTC hour and verdict code over the last 24 hours: every hour and every code, 0 where there were none';
COMMENT ON COLUMN apikey.code_usage_24h.bucket IS 'Start of the hour (UTC)';
COMMENT ON COLUMN apikey.code_usage_24h.code IS 'Verdict code (every code apikey.check() can return)';
COMMENT ON COLUMN apikey.code_usage_24h.calls IS 'Verifications with this verdict in the hour; 0 if none';

CREATE FUNCTION apikey._rate_limit_state(OUT key_id bigint, OUT hash_prefix bytea, OUT rate_limit integer,
										 OUT rate_window interval, OUT available bigint, OUT retry_after interval)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'apikey_rate_limit_state'
LANGUAGE C VOLATILE PARALLEL RESTRICTED ROWS 100;
COMMENT ON FUNCTION apikey._rate_limit_state()
	IS 'Internal: this database''s rate-limit buckets in shared memory, read without taking anything (behind apikey.rate_limit_state)';
REVOKE ALL ON FUNCTION apikey._rate_limit_state() FROM PUBLIC;

CREATE VIEW apikey.rate_limit_state AS
SELECT k.id AS key_id, k.owner, k.name AS key_name, k.rate_limit, k.rate_window,
	   CASE WHEN NOT st.shared_memory THEN 0
			ELSE COALESCE(s.available, k.rate_limit::pg_catalog.int8) END AS available,
	   COALESCE(s.retry_after, '0'::interval) AS retry_after,
	   s.key_id IS NOT NULL AS tracked
  FROM apikey.keys k
 CROSS JOIN (SELECT x.shared_memory FROM apikey._stats() x) st
  LEFT JOIN apikey._rate_limit_state() s
		 ON s.key_id OPERATOR(pg_catalog.=) k.id
		AND s.hash_prefix OPERATOR(pg_catalog.=) pg_catalog.substr(k.hash, 1, 8)
		AND s.rate_limit OPERATOR(pg_catalog.=) k.rate_limit AND s.rate_window OPERATOR(pg_catalog.=) k.rate_window
 WHERE k.rate_limit IS NOT NULL;
COMMENT ON VIEW apikey.rate_limit_state IS 'Each rate-limited key''s bucket now, from shared memory (nothing is taken): requests allowed at once, wait before the next when none is.  A key in a rotation''s grace period draws on its successor''s bucket; temporary throttles are not shown';
COMMENT ON COLUMN apikey.rate_limit_state.key_id IS 'The key';
COMMENT ON COLUMN apikey.rate_limit_state.owner IS 'The key''s owner';
COMMENT ON COLUMN apikey.rate_limit_state.key_name IS 'The key''s name';
COMMENT ON COLUMN apikey.rate_limit_state.rate_limit IS 'Requests allowed per rate_window';
COMMENT ON COLUMN apikey.rate_limit_state.rate_window IS 'The rate limit''s window';
COMMENT ON COLUMN apikey.rate_limit_state.available IS 'Requests allowed right now (rate_limit when the bucket is full or untracked; 0 without shared memory, where rate-limited keys are refused)';
COMMENT ON COLUMN apikey.rate_limit_state.retry_after IS 'Wait before the next request is allowed; 0 when one is allowed now';
COMMENT ON COLUMN apikey.rate_limit_state.tracked IS 'Whether shared memory holds a bucket for the key (none: full)';

CREATE VIEW apikey.quota_state AS
SELECT k.id AS key_id, k.owner, k.name AS key_name, k.quota, k.quota_refill,
	   COALESCE(CASE WHEN k.quota_refill IS NOT NULL
						  AND q.refilled_at OPERATOR(pg_catalog.+) k.quota_refill OPERATOR(pg_catalog.<=) pg_catalog.now()
					 THEN k.quota ELSE q.remaining END, 0) AS remaining,
	   q.refilled_at,
	   q.refilled_at OPERATOR(pg_catalog.+) k.quota_refill AS next_refill
  FROM apikey.keys k
  LEFT JOIN apikey.quotas q ON q.key_id OPERATOR(pg_catalog.=) k.id
 WHERE k.quota IS NOT NULL;
COMMENT ON VIEW apikey.quota_state IS 'Each key with a quota: what is left now (a refill that is due counts as done, as the next debit does it)';
COMMENT ON COLUMN apikey.quota_state.key_id IS 'The key';
COMMENT ON COLUMN apikey.quota_state.owner IS 'The key''s owner';
COMMENT ON COLUMN apikey.quota_state.key_name IS 'The key''s name';
COMMENT ON COLUMN apikey.quota_state.quota IS 'Successful verifications allowed per refill period';
COMMENT ON COLUMN apikey.quota_state.quota_refill IS 'Refill period; NULL = never refilled';
COMMENT ON COLUMN apikey.quota_state.remaining IS 'Successful verifications left now; 0, not NULL, when none';
COMMENT ON COLUMN apikey.quota_state.refilled_at IS 'When remaining was last reset to quota';
COMMENT ON COLUMN apikey.quota_state.next_refill IS 'When the next refill is due; NULL = never';

REVOKE ALL ON apikey.hourly_usage, apikey.owner_usage_last_hour, apikey.top_failing_keys,
	apikey.top_failing_networks, apikey.code_usage_24h, apikey.rate_limit_state, apikey.quota_state FROM PUBLIC;

-- A monitor reads the dashboards and the rollups; an admin runs retention.
INSERT INTO apikey._grant_sets (kind, privilege, object)
SELECT 'monitor', 'SELECT', 'TABLE ' OPERATOR(pg_catalog.||) t
  FROM pg_catalog.unnest(ARRAY['apikey.usage_hourly', 'apikey.usage_daily', 'apikey.usage_address_hourly',
							   'apikey.usage_network_window', 'apikey.usage_network_window_since',
							   'apikey.hourly_usage', 'apikey.owner_usage_last_hour', 'apikey.top_failing_keys',
							   'apikey.top_failing_networks', 'apikey.code_usage_24h', 'apikey.rate_limit_state',
							   'apikey.quota_state']) t
UNION ALL
VALUES ('monitor', 'EXECUTE', 'FUNCTION apikey._rate_limit_state()'),
	   ('admin', 'EXECUTE', 'FUNCTION apikey.run_retention(integer)');

-------------------------------------------------------------------------------
-- Limits per owner (issue 14, items 7-10): a rate limit, a quota (credits),
-- an allowlist and a maximum number of live keys shared by all keys of one
-- owner.  An owner without a row in apikey.owners has no pooled limits.
-- The owner's row is loaded with each key into the key cache, so a change
-- to it empties every backend's cache (as a change to apikey.scopes does);
-- its credits live apart, in apikey.owner_credits, which is written on
-- every debit and so must not invalidate anything.
-------------------------------------------------------------------------------

CREATE TABLE apikey.owners (
	owner		text PRIMARY KEY
				CONSTRAINT owners_owner_check CHECK (owner OPERATOR(pg_catalog.<>) ''
													 AND pg_catalog.octet_length(owner) OPERATOR(pg_catalog.<=) 1024),
	rate_limit	integer CONSTRAINT owners_rate_limit_check CHECK (rate_limit OPERATOR(pg_catalog.>) 0),
	rate_window	interval NOT NULL DEFAULT '1 minute'
				CONSTRAINT owners_rate_window_check CHECK (rate_window OPERATOR(pg_catalog.>) '0'::interval
														   AND rate_window OPERATOR(pg_catalog.<=) '1 year'::interval),
	quota		bigint CONSTRAINT owners_quota_check CHECK (quota OPERATOR(pg_catalog.>=) 0),
	quota_refill interval CONSTRAINT owners_quota_refill_check CHECK (quota_refill OPERATOR(pg_catalog.>) '0'::interval
																	  AND quota_refill OPERATOR(pg_catalog.<=) '10 years'::interval),
	allowed_cidrs cidr[] CONSTRAINT owners_allowed_cidrs_check
				CHECK (pg_catalog.cardinality(allowed_cidrs) OPERATOR(pg_catalog.>) 0),
	max_keys	integer CONSTRAINT owners_max_keys_check CHECK (max_keys OPERATOR(pg_catalog.>=) 0),
	metadata	jsonb NOT NULL DEFAULT '{}',
	created_at	timestamptz NOT NULL DEFAULT pg_catalog.now(),
	updated_at	timestamptz NOT NULL DEFAULT pg_catalog.now(),
	CONSTRAINT owners_quota_refill_needs_quota CHECK (quota_refill IS NULL OR quota IS NOT NULL)
);
COMMENT ON TABLE apikey.owners IS 'Limits shared by all keys of one owner (set with apikey.set_owner_limits()); an owner without a row has none';
COMMENT ON COLUMN apikey.owners.owner IS 'The owner, as in apikey.keys.owner';
COMMENT ON COLUMN apikey.owners.rate_limit IS 'Requests per rate_window for all the owner''s keys together; NULL = none';
COMMENT ON COLUMN apikey.owners.rate_window IS 'Window of rate_limit';
COMMENT ON COLUMN apikey.owners.quota IS 'Credits for all the owner''s keys together (left: apikey.owner_credits); NULL = none';
COMMENT ON COLUMN apikey.owners.quota_refill IS 'Interval after which the owner''s credits are reset to quota; NULL = never';
COMMENT ON COLUMN apikey.owners.allowed_cidrs IS 'Networks every key of the owner may be used from (intersected with the key''s own); NULL = any';
COMMENT ON COLUMN apikey.owners.max_keys IS 'Most live keys (not revoked, expired or replaced by a rotation) the owner may hold; NULL = no limit';
COMMENT ON COLUMN apikey.owners.metadata IS 'Free-form data about the owner';
COMMENT ON COLUMN apikey.owners.created_at IS 'When the owner''s row was made';
COMMENT ON COLUMN apikey.owners.updated_at IS 'When set_owner_limits() last changed it';
REVOKE ALL ON apikey.owners FROM PUBLIC;

CREATE TABLE apikey.owner_credits (
	owner		text PRIMARY KEY REFERENCES apikey.owners (owner) ON DELETE CASCADE ON UPDATE CASCADE,
	remaining	bigint NOT NULL CONSTRAINT owner_credits_remaining_check CHECK (remaining OPERATOR(pg_catalog.>=) 0),
	refilled_at	timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE apikey.owner_credits IS 'Credits left to each owner that has a quota; debited inside the verifying transaction, before the key''s own';
COMMENT ON COLUMN apikey.owner_credits.owner IS 'The owner';
COMMENT ON COLUMN apikey.owner_credits.remaining IS 'Credits left until the next refill';
COMMENT ON COLUMN apikey.owner_credits.refilled_at IS 'When the credits were last reset to the quota';
REVOKE ALL ON apikey.owner_credits FROM PUBLIC;

-- A change to an owner's limits empties every backend's key cache: the
-- cached keys carry their owner's limits.
CREATE TRIGGER owners_invalidate
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON apikey.owners
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._invalidate();
ALTER TABLE apikey.owners ENABLE ALWAYS TRIGGER owners_invalidate;
CREATE TRIGGER owners_invalidate_applied
	AFTER INSERT OR UPDATE OR DELETE ON apikey.owners
	FOR EACH ROW EXECUTE FUNCTION apikey._invalidate();
ALTER TABLE apikey.owners ENABLE REPLICA TRIGGER owners_invalidate_applied;

SELECT pg_catalog.pg_extension_config_dump('apikey.owners', '');
SELECT pg_catalog.pg_extension_config_dump('apikey.owner_credits', '');

-- Refuse a new live key past the owner's max_keys (issue.c calls the same
-- C code directly).  replacing is the key a rotation or reissue replaces:
-- it does not count, so replacing a key never takes an owner past its limit.
CREATE FUNCTION apikey._owner_admit(owner text, replacing bigint) RETURNS void
AS 'MODULE_PATHNAME', 'apikey_owner_admit_keys'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION apikey._owner_admit(text, bigint)
	IS 'Internal: lock the owner''s row and refuse one more live key past its max_keys (rotate, reissue)';
REVOKE ALL ON FUNCTION apikey._owner_admit(text, bigint) FROM PUBLIC;

CREATE FUNCTION apikey.set_owner_limits(owner text, rate_limit integer DEFAULT NULL,
										rate_window interval DEFAULT '1 minute', quota bigint DEFAULT NULL,
										quota_refill interval DEFAULT NULL, allowed_cidrs cidr[] DEFAULT NULL,
										max_keys integer DEFAULT NULL, metadata jsonb DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'set_owner_limits'
AS $$
DECLARE
	v_old apikey.owners;
BEGIN
	IF set_owner_limits.owner IS NULL THEN
		RAISE EXCEPTION 'owner must not be NULL' USING ERRCODE = '22004',
			HINT = 'Pass the owner whose keys share these limits, as in apikey.keys.owner.';
	END IF;
	IF pg_catalog.btrim(set_owner_limits.owner) OPERATOR(pg_catalog.=) '' THEN
		RAISE EXCEPTION 'owner must not be empty' USING ERRCODE = '22023',
			HINT = 'Pass the owner whose keys share these limits, as in apikey.keys.owner.';
	END IF;
	IF pg_catalog.octet_length(set_owner_limits.owner) OPERATOR(pg_catalog.>) 1024 THEN
		RAISE EXCEPTION 'owner is too long (% bytes)', pg_catalog.octet_length(set_owner_limits.owner)
			USING ERRCODE = '22001', HINT = 'An owner is at most 1024 bytes; use a tenant or user id.';
	END IF;
	PERFORM apikey._check_limits(set_owner_limits.rate_limit, set_owner_limits.rate_window,
								 set_owner_limits.quota, set_owner_limits.quota_refill);
	PERFORM apikey._check_cidrs(set_owner_limits.allowed_cidrs);
	IF set_owner_limits.max_keys OPERATOR(pg_catalog.<) 0 THEN
		RAISE EXCEPTION 'max_keys must not be negative, got %', set_owner_limits.max_keys
			USING ERRCODE = '22023', HINT = 'Use NULL for no limit on the number of keys, 0 to refuse new keys.';
	END IF;
	IF set_owner_limits.metadata IS NOT NULL
	   AND pg_catalog.jsonb_typeof(set_owner_limits.metadata) OPERATOR(pg_catalog.<>) 'object' THEN
		RAISE EXCEPTION 'metadata must be a JSON object, got %', pg_catalog.jsonb_typeof(set_owner_limits.metadata)
			USING ERRCODE = '22023', HINT = 'Pass NULL to keep the owner''s metadata.';
	END IF;
	PERFORM apikey._audit_lock();
	SELECT * INTO v_old FROM apikey.owners o
	 WHERE o.owner OPERATOR(pg_catalog.=) set_owner_limits.owner FOR UPDATE;
	INSERT INTO apikey.owners AS o (owner, rate_limit, rate_window, quota, quota_refill, allowed_cidrs,
									max_keys, metadata)
	VALUES (set_owner_limits.owner, set_owner_limits.rate_limit, set_owner_limits.rate_window,
			set_owner_limits.quota, set_owner_limits.quota_refill, set_owner_limits.allowed_cidrs,
			set_owner_limits.max_keys, COALESCE(set_owner_limits.metadata, '{}'))
	ON CONFLICT ON CONSTRAINT owners_pkey
	DO UPDATE SET rate_limit = excluded.rate_limit, rate_window = excluded.rate_window,
				  quota = excluded.quota, quota_refill = excluded.quota_refill,
				  allowed_cidrs = excluded.allowed_cidrs, max_keys = excluded.max_keys,
				  metadata = COALESCE(set_owner_limits.metadata, o.metadata),
				  updated_at = pg_catalog.now();
	-- credits start full when the quota is set or changed, and only then
	IF set_owner_limits.quota IS NULL THEN
		DELETE FROM apikey.owner_credits c WHERE c.owner OPERATOR(pg_catalog.=) set_owner_limits.owner;
	ELSIF v_old.quota IS DISTINCT FROM set_owner_limits.quota THEN
		INSERT INTO apikey.owner_credits AS c (owner, remaining)
		VALUES (set_owner_limits.owner, set_owner_limits.quota)
		ON CONFLICT ON CONSTRAINT owner_credits_pkey
		DO UPDATE SET remaining = excluded.remaining, refilled_at = pg_catalog.now();
	END IF;
	PERFORM apikey._audit('set_owner_limits', NULL, set_owner_limits.owner, pg_catalog.jsonb_build_object(
		'old', CASE WHEN v_old.owner IS NULL THEN NULL ELSE pg_catalog.jsonb_build_object(
			'rate_limit', v_old.rate_limit, 'rate_window', v_old.rate_window, 'quota', v_old.quota,
			'quota_refill', v_old.quota_refill, 'allowed_cidrs', v_old.allowed_cidrs,
			'max_keys', v_old.max_keys) END,
		'new', pg_catalog.jsonb_build_object('rate_limit', set_owner_limits.rate_limit,
			'rate_window', set_owner_limits.rate_window, 'quota', set_owner_limits.quota,
			'quota_refill', set_owner_limits.quota_refill, 'allowed_cidrs', set_owner_limits.allowed_cidrs,
			'max_keys', set_owner_limits.max_keys)));
END
$$;
COMMENT ON FUNCTION apikey.set_owner_limits(text, integer, interval, bigint, interval, cidr[], integer, jsonb)
	IS 'Set the limits all keys of an owner share (rate limit, quota, allowlist, max_keys), replacing the previous ones; the credits start full when the quota changes; takes effect for every verification after the commit';
REVOKE ALL ON FUNCTION apikey.set_owner_limits(text, integer, interval, bigint, interval, cidr[], integer, jsonb) FROM PUBLIC;

-- Which limit decided: appended last, so callers that read the verdict by
-- position or by name keep working.
ALTER TYPE apikey.verdict ADD ATTRIBUTE limited_by text;
COMMENT ON COLUMN apikey.verdict.limited_by IS 'Whose limit decided the verdict or its remaining: key or owner; NULL when no limit applied';

CREATE VIEW apikey.owner_status AS
SELECT o.owner,
	   (SELECT pg_catalog.count(*) FROM apikey.keys k WHERE k.owner OPERATOR(pg_catalog.=) o.owner) AS keys,
	   (SELECT pg_catalog.count(*) FROM apikey.keys k
		 WHERE k.owner OPERATOR(pg_catalog.=) o.owner
		   AND (k.expires_at IS NULL OR k.expires_at OPERATOR(pg_catalog.>) pg_catalog.now())
		   AND NOT EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id OPERATOR(pg_catalog.=) k.id)) AS live_keys,
	   CASE WHEN o.quota_refill IS NOT NULL
				 AND c.refilled_at OPERATOR(pg_catalog.+) o.quota_refill OPERATOR(pg_catalog.<=) pg_catalog.now()
			THEN o.quota ELSE c.remaining END AS remaining,
	   c.refilled_at,
	   (SELECT pg_catalog.max(k.last_used_at) FROM apikey.keys k
		 WHERE k.owner OPERATOR(pg_catalog.=) o.owner) AS last_used_at
  FROM apikey.owners o
  LEFT JOIN apikey.owner_credits c ON c.owner OPERATOR(pg_catalog.=) o.owner;
COMMENT ON VIEW apikey.owner_status IS 'Each owner with limits: its keys, live keys and credits left';
COMMENT ON COLUMN apikey.owner_status.owner IS 'The owner';
COMMENT ON COLUMN apikey.owner_status.keys IS 'Keys of the owner, in any state';
COMMENT ON COLUMN apikey.owner_status.live_keys IS 'Keys counted against max_keys: not revoked, not expired (a key replaced by a rotation counts until its grace ends)';
COMMENT ON COLUMN apikey.owner_status.remaining IS 'Credits left to the owner (its quota if a refill is due); NULL without a quota';
COMMENT ON COLUMN apikey.owner_status.refilled_at IS 'When the owner''s credits were last reset; NULL without a quota';
COMMENT ON COLUMN apikey.owner_status.last_used_at IS 'Latest last_used_at of the owner''s keys, as persisted';
REVOKE ALL ON apikey.owner_status FROM PUBLIC;

INSERT INTO apikey._grant_sets (kind, privilege, object) VALUES
	('admin', 'EXECUTE', 'FUNCTION apikey.set_owner_limits(text, integer, interval, bigint, interval, cidr[], integer, jsonb)'),
	('admin', 'SELECT', 'TABLE apikey.owners'),
	('admin', 'SELECT', 'TABLE apikey.owner_credits'),
	('admin', 'SELECT', 'TABLE apikey.owner_status'),
	('monitor', 'SELECT', 'TABLE apikey.owner_status');

-------------------------------------------------------------------------------
-- Networks, baselines and three detection rules (issue 12, items 4 and 6).
-- The networks each key succeeds from, aggregated to /24 (IPv4) and /48
-- (IPv6) and kept apikey.network_retention (90 days): collected in shared
-- memory on the valid path (src/networks.c) and written by the usage
-- writer, so a call counts even if its transaction rolls back.  Per-key
-- baselines of calls per minute, recomputed hourly by the writer, and the
-- rate limits they suggest.  The evaluators of the shared_address,
-- new_networks and volume_spike rules take their parameters as arguments;
-- the _rule_<kind>(apikey.detection_rules) wrappers the detector calls are
-- at the end of this section.

CREATE TABLE apikey.key_networks (
	key_id		bigint NOT NULL,
	network		cidr NOT NULL,
	first_seen	timestamptz NOT NULL,
	last_seen	timestamptz NOT NULL,
	calls		bigint NOT NULL CONSTRAINT key_networks_calls_check CHECK (calls OPERATOR(pg_catalog.>) 0),
	CONSTRAINT key_networks_pkey PRIMARY KEY (key_id, network)
);
CREATE INDEX key_networks_last_seen_idx ON apikey.key_networks (last_seen);
CREATE INDEX key_networks_network_idx ON apikey.key_networks (network);
COMMENT ON TABLE apikey.key_networks
	IS 'Networks each key has succeeded from (client addresses aggregated by apikey.network_prefix_v4/_v6, never stored whole), written by the usage writer, purged after apikey.network_retention unseen';
COMMENT ON COLUMN apikey.key_networks.key_id IS 'The key (rows of deleted keys are purged hourly)';
COMMENT ON COLUMN apikey.key_networks.network IS 'Client network: the asserted client_addr of a trusted role, else the connection''s, aggregated to /24 or /48 (IPv4-mapped IPv6 as IPv4)';
COMMENT ON COLUMN apikey.key_networks.first_seen IS 'First success from this network; a network unseen for 30 days is first seen again when it returns';
COMMENT ON COLUMN apikey.key_networks.last_seen IS 'Latest success from this network';
COMMENT ON COLUMN apikey.key_networks.calls IS 'Successes from this network (rolled-back ones included)';
REVOKE ALL ON apikey.key_networks FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('apikey.key_networks', '');

CREATE FUNCTION apikey._network_of(addr inet) RETURNS cidr
AS 'MODULE_PATHNAME', 'apikey_network_of_sql'
LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._network_of(inet)
	IS 'Internal: the network key_networks records addr under (apikey.network_prefix_v4/_v6; IPv4-mapped IPv6 as IPv4)';
REVOKE ALL ON FUNCTION apikey._network_of(inet) FROM PUBLIC;

CREATE TABLE apikey.key_baselines (
	key_id		bigint NOT NULL CONSTRAINT key_baselines_pkey PRIMARY KEY,
	computed_at	timestamptz NOT NULL,
	data_points	integer NOT NULL,
	p50			bigint NOT NULL,
	p90			bigint NOT NULL,
	p99			bigint NOT NULL,
	max			bigint NOT NULL
);
COMMENT ON TABLE apikey.key_baselines
	IS 'Each key''s calls per minute (every verdict) over the last 7 days of usage_log, minutes with calls only; recomputed hourly by the usage writer and by compute_baselines()';
COMMENT ON COLUMN apikey.key_baselines.key_id IS 'The key';
COMMENT ON COLUMN apikey.key_baselines.computed_at IS 'When it was computed';
COMMENT ON COLUMN apikey.key_baselines.data_points IS 'Minutes with at least one call in the window';
COMMENT ON COLUMN apikey.key_baselines.p50 IS 'Median calls per minute';
COMMENT ON COLUMN apikey.key_baselines.p90 IS '90th percentile of calls per minute';
COMMENT ON COLUMN apikey.key_baselines.p99 IS '99th percentile of calls per minute (volume_spike compares with it)';
COMMENT ON COLUMN apikey.key_baselines.max IS 'Busiest minute';
REVOKE ALL ON apikey.key_baselines FROM PUBLIC;

-- Percentiles are percentile_disc: calls some minute really saw.  The
-- minute in progress is left out.  Keys without calls in the window lose
-- their row.
CREATE FUNCTION apikey._compute_baselines(window_ interval) RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_rows integer;
BEGIN
	IF window_ IS NULL OR window_ OPERATOR(pg_catalog.<=) '0'::interval THEN
		RAISE EXCEPTION 'window_ must be a positive interval, not %', coalesce(window_::text, 'NULL')
			USING ERRCODE = CASE WHEN window_ IS NULL THEN '22004' ELSE '22023' END,
				  HINT = 'The usage writer uses ''7 days''.';
	END IF;
	WITH per_minute AS (
		SELECT l.key_id, l.bucket, pg_catalog.sum(l.calls)::bigint AS c
		  FROM apikey.usage_log l
		 WHERE l.key_id IS NOT NULL
		   AND l.bucket OPERATOR(pg_catalog.>=) (pg_catalog.now() OPERATOR(pg_catalog.-) _compute_baselines.window_)
		   AND l.bucket OPERATOR(pg_catalog.<) pg_catalog.date_trunc('minute', pg_catalog.now())
		 GROUP BY l.key_id, l.bucket),
	b AS (
		SELECT m.key_id, pg_catalog.count(*)::integer AS n,
			   pg_catalog.percentile_disc(0.5) WITHIN GROUP (ORDER BY m.c) AS p50,
			   pg_catalog.percentile_disc(0.9) WITHIN GROUP (ORDER BY m.c) AS p90,
			   pg_catalog.percentile_disc(0.99) WITHIN GROUP (ORDER BY m.c) AS p99,
			   pg_catalog.max(m.c) AS mx
		  FROM per_minute m
		  JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) m.key_id
		 GROUP BY m.key_id),
	gone AS (
		DELETE FROM apikey.key_baselines kb
		 WHERE NOT EXISTS (SELECT FROM b WHERE b.key_id OPERATOR(pg_catalog.=) kb.key_id))
	INSERT INTO apikey.key_baselines AS kb (key_id, computed_at, data_points, p50, p90, p99, max)
	SELECT b.key_id, pg_catalog.now(), b.n, b.p50, b.p90, b.p99, b.mx FROM b
	ON CONFLICT ON CONSTRAINT key_baselines_pkey DO UPDATE
	   SET computed_at = excluded.computed_at, data_points = excluded.data_points,
		   p50 = excluded.p50, p90 = excluded.p90, p99 = excluded.p99, max = excluded.max;
	GET DIAGNOSTICS v_rows = ROW_COUNT;
	RETURN v_rows;
END
$$;
COMMENT ON FUNCTION apikey._compute_baselines(interval)
	IS 'Internal: recompute key_baselines over window_ of usage_log (no audit row: the usage writer runs it hourly); returns keys with a baseline';
REVOKE ALL ON FUNCTION apikey._compute_baselines(interval) FROM PUBLIC;

CREATE FUNCTION apikey.compute_baselines(window_ interval DEFAULT '7 days')
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'compute_baselines'
AS $$
DECLARE
	v_rows integer;
BEGIN
	IF compute_baselines.window_ IS NULL THEN
		RAISE EXCEPTION 'window_ must not be NULL' USING ERRCODE = '22004',
			HINT = 'Pass how much usage_log to learn from, e.g. ''7 days''.';
	END IF;
	IF compute_baselines.window_ OPERATOR(pg_catalog.<) '1 hour'::interval
	   OR compute_baselines.window_ OPERATOR(pg_catalog.>) '1 year'::interval THEN
		RAISE EXCEPTION 'window_ must be between 1 hour and 1 year, not %', compute_baselines.window_
			USING ERRCODE = '22023', HINT = 'The usage writer uses ''7 days''.';
	END IF;
	PERFORM apikey._audit_lock();
	v_rows := apikey._compute_baselines(compute_baselines.window_);
	PERFORM apikey._audit('compute_baselines', NULL, NULL,
						  pg_catalog.jsonb_build_object('window', compute_baselines.window_, 'keys', v_rows));
	RETURN v_rows;
END
$$;
COMMENT ON FUNCTION apikey.compute_baselines(interval)
	IS 'Recompute apikey.key_baselines now from window_ of usage_log (the usage writer does it hourly over 7 days); idempotent; returns keys with a baseline';
REVOKE ALL ON FUNCTION apikey.compute_baselines(interval) FROM PUBLIC;

-- Hourly, from the usage writer (src/networks.c): retention, then
-- baselines.  Rows of keys that no longer exist go too.
CREATE FUNCTION apikey._networks_maintain(retention interval) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_purged bigint;
BEGIN
	IF retention IS NULL THEN
		RAISE EXCEPTION 'retention must not be NULL' USING ERRCODE = '22004',
			HINT = 'Pass apikey.network_retention, e.g. ''90 days''.';
	END IF;
	IF retention OPERATOR(pg_catalog.<=) '0'::interval THEN
		RAISE EXCEPTION 'retention must be a positive interval, not %', retention
			USING ERRCODE = '22023', HINT = 'Pass apikey.network_retention, e.g. ''90 days''.';
	END IF;
	DELETE FROM apikey.key_networks n
	 WHERE n.last_seen OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) retention)
		OR NOT EXISTS (SELECT FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) n.key_id);
	GET DIAGNOSTICS v_purged = ROW_COUNT;
	PERFORM apikey._compute_baselines('7 days');
	RETURN v_purged;
END
$$;
COMMENT ON FUNCTION apikey._networks_maintain(interval)
	IS 'Internal: the usage writer''s hourly upkeep: drop key_networks rows unseen for retention (or of deleted keys), recompute key_baselines; returns rows dropped';
REVOKE ALL ON FUNCTION apikey._networks_maintain(interval) FROM PUBLIC;

-- Suggested rate limit: the larger of twice the p99 and the busiest minute
-- (so no minute of the key's own history would have been limited), scaled
-- from a minute to the key's rate_window, rounded up.  NULL while the key
-- has fewer than 60 minutes with calls: too little to go on.
CREATE VIEW apikey.suggested_limits AS
SELECT b.key_id, k.rate_limit AS current_limit,
	   CASE WHEN b.data_points OPERATOR(pg_catalog.>=) 60
			THEN pg_catalog.ceil(GREATEST(2 OPERATOR(pg_catalog.*) b.p99, b.max, 1)::numeric
								 OPERATOR(pg_catalog.*) pg_catalog.date_part('epoch', k.rate_window)::numeric
								 OPERATOR(pg_catalog./) 60)::bigint END AS suggested_limit,
	   b.data_points
  FROM apikey.key_baselines b
  JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) b.key_id;
COMMENT ON VIEW apikey.suggested_limits
	IS 'A rate limit for each key with a baseline: ceil(max(2 x p99, max) calls per minute, scaled to its rate_window); NULL below 60 data points';
COMMENT ON COLUMN apikey.suggested_limits.key_id IS 'The key';
COMMENT ON COLUMN apikey.suggested_limits.current_limit IS 'Its rate_limit per rate_window now; NULL = none';
COMMENT ON COLUMN apikey.suggested_limits.suggested_limit IS 'Calls per rate_window: ceil(greatest(2 * p99, max) * rate_window / 1 minute); NULL with fewer than 60 data points';
COMMENT ON COLUMN apikey.suggested_limits.data_points IS 'Minutes with calls the baseline was computed from';
REVOKE ALL ON apikey.suggested_limits FROM PUBLIC;

-- The rules' parameters, checked alike: a rule never runs on nonsense.
CREATE FUNCTION apikey._rule_args_check(rule text, threshold numeric, window_ interval, min_calls bigint)
RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF threshold IS NULL OR window_ IS NULL THEN
		RAISE EXCEPTION 'rule %: threshold and window_ must not be NULL', rule USING ERRCODE = '22004',
			HINT = 'Set them in the rule''s row of apikey.detection_rules.';
	END IF;
	IF threshold OPERATOR(pg_catalog.<=) 0 THEN
		RAISE EXCEPTION 'rule %: threshold must be positive, not %', rule, threshold USING ERRCODE = '22023',
			HINT = 'Set a positive threshold in the rule''s row of apikey.detection_rules.';
	END IF;
	IF window_ OPERATOR(pg_catalog.<=) '0'::interval THEN
		RAISE EXCEPTION 'rule %: window_ must be a positive interval, not %', rule, window_ USING ERRCODE = '22023',
			HINT = 'Set a positive window_ in the rule''s row of apikey.detection_rules.';
	END IF;
	IF min_calls OPERATOR(pg_catalog.<) 0 THEN
		RAISE EXCEPTION 'rule %: min_calls must not be negative, not %', rule, min_calls USING ERRCODE = '22023',
			HINT = 'Set min_calls to 0 or more (NULL = no floor).';
	END IF;
END
$$;
COMMENT ON FUNCTION apikey._rule_args_check(text, numeric, interval, bigint)
	IS 'Internal: raise 22004/22023 for a detection rule''s NULL or out-of-range threshold, window_ or min_calls';
REVOKE ALL ON FUNCTION apikey._rule_args_check(text, numeric, interval, bigint) FROM PUBLIC;

-- shared_address: one network that at least threshold distinct keys
-- succeeded from within window_, with at least min_calls successes among
-- them.  The subject is the network (key_id NULL; owner only if every key
-- has the same).
CREATE FUNCTION apikey._rule_shared_address_eval(threshold numeric, window_ interval, min_calls bigint)
RETURNS TABLE (key_id bigint, owner text, network cidr, evidence jsonb)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM apikey._rule_args_check('shared_address', threshold, window_, min_calls);
	RETURN QUERY
	SELECT NULL::bigint,
		   CASE WHEN pg_catalog.count(DISTINCT k.owner) OPERATOR(pg_catalog.=) 1 THEN pg_catalog.min(k.owner) END,
		   n.network,
		   pg_catalog.jsonb_build_object(
			   'keys', pg_catalog.count(*), 'owners', pg_catalog.count(DISTINCT k.owner),
			   'key_ids', (pg_catalog.array_agg(n.key_id ORDER BY n.calls DESC, n.key_id))[1:20],
			   'calls', pg_catalog.sum(n.calls), 'window', window_)
	  FROM apikey.key_networks n
	  JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) n.key_id
	 WHERE n.last_seen OPERATOR(pg_catalog.>=) (pg_catalog.now() OPERATOR(pg_catalog.-) window_)
	 GROUP BY n.network
	HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>=) threshold
	   AND pg_catalog.sum(n.calls) OPERATOR(pg_catalog.>=) coalesce(min_calls, 0);
END
$$;
COMMENT ON FUNCTION apikey._rule_shared_address_eval(numeric, interval, bigint)
	IS 'Rule shared_address: networks that threshold or more distinct keys succeeded from within window_ (with min_calls successes among them)';
REVOKE ALL ON FUNCTION apikey._rule_shared_address_eval(numeric, interval, bigint) FROM PUBLIC;

-- new_networks: a key with history (a network first seen before the
-- window) succeeding, within window_, from threshold or more networks first
-- seen in it: never seen, or unseen for 30 days (key_networks.first_seen).
-- One row per new network with at least min_calls successes.
CREATE FUNCTION apikey._rule_new_networks_eval(threshold numeric, window_ interval, min_calls bigint)
RETURNS TABLE (key_id bigint, owner text, network cidr, evidence jsonb)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM apikey._rule_args_check('new_networks', threshold, window_, min_calls);
	RETURN QUERY
	WITH fresh AS (
		SELECT n.key_id, n.network, n.first_seen, n.calls,
			   pg_catalog.count(*) OVER (PARTITION BY n.key_id) AS new_networks
		  FROM apikey.key_networks n
		 WHERE n.first_seen OPERATOR(pg_catalog.>=) (pg_catalog.now() OPERATOR(pg_catalog.-) window_)
		   AND n.calls OPERATOR(pg_catalog.>=) coalesce(min_calls, 0))
	SELECT f.key_id, k.owner, f.network,
		   pg_catalog.jsonb_build_object(
			   'first_seen', f.first_seen, 'calls', f.calls, 'new_networks', f.new_networks,
			   'known_networks', h.known, 'window', window_)
	  FROM fresh f
	  JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) f.key_id
	  CROSS JOIN LATERAL (
		SELECT pg_catalog.count(*) AS known FROM apikey.key_networks o
		 WHERE o.key_id OPERATOR(pg_catalog.=) f.key_id
		   AND o.first_seen OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) window_)) h
	 WHERE h.known OPERATOR(pg_catalog.>) 0
	   AND f.new_networks OPERATOR(pg_catalog.>=) threshold;
END
$$;
COMMENT ON FUNCTION apikey._rule_new_networks_eval(numeric, interval, bigint)
	IS 'Rule new_networks: successes of a key with history from threshold or more networks first seen (or unseen for 30 days) within window_, each with min_calls successes';
REVOKE ALL ON FUNCTION apikey._rule_new_networks_eval(numeric, interval, bigint) FROM PUBLIC;

-- volume_spike: a key whose calls per minute (every verdict, from
-- key_usage, so unflushed counts too) exceeded max(threshold x its p99,
-- min_calls) for 3 consecutive minutes within window_.  A key without a
-- baseline has p99 0: only the floor applies.  One row per key: its latest
-- run.
CREATE FUNCTION apikey._rule_volume_spike_eval(threshold numeric, window_ interval, min_calls bigint)
RETURNS TABLE (key_id bigint, owner text, network cidr, evidence jsonb)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM apikey._rule_args_check('volume_spike', threshold, window_, min_calls);
	RETURN QUERY
	WITH m AS (
		SELECT u.key_id, u.bucket, u.calls, coalesce(b.p99, 0) AS p99,
			   GREATEST(threshold OPERATOR(pg_catalog.*) coalesce(b.p99, 0), coalesce(min_calls, 0)) AS lim
		  FROM apikey.key_usage u
		  LEFT JOIN apikey.key_baselines b ON b.key_id OPERATOR(pg_catalog.=) u.key_id
		 WHERE u.key_id IS NOT NULL
		   AND u.bucket OPERATOR(pg_catalog.>=) (pg_catalog.now() OPERATOR(pg_catalog.-) window_)),
	hot AS (
		SELECT m.*, m.bucket OPERATOR(pg_catalog.-)
					('1 minute'::interval OPERATOR(pg_catalog.*)
					 pg_catalog.row_number() OVER (PARTITION BY m.key_id ORDER BY m.bucket)::double precision) AS grp
		  FROM m WHERE m.calls OPERATOR(pg_catalog.>) m.lim),
	runs AS (
		SELECT h.key_id, pg_catalog.count(*) AS minutes, pg_catalog.min(h.bucket) AS since,
			   pg_catalog.max(h.bucket) AS until, pg_catalog.max(h.calls) AS peak,
			   pg_catalog.min(h.lim) AS lim, pg_catalog.min(h.p99) AS p99
		  FROM hot h GROUP BY h.key_id, h.grp
		HAVING pg_catalog.count(*) OPERATOR(pg_catalog.>=) 3)
	SELECT DISTINCT ON (r.key_id) r.key_id, k.owner, NULL::cidr,
		   pg_catalog.jsonb_build_object(
			   'since', r.since, 'until', r.until, 'minutes', r.minutes, 'peak_calls', r.peak,
			   'limit', r.lim, 'p99', r.p99, 'window', window_)
	  FROM runs r
	  JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) r.key_id
	 ORDER BY r.key_id, r.until DESC;
END
$$;
COMMENT ON FUNCTION apikey._rule_volume_spike_eval(numeric, interval, bigint)
	IS 'Rule volume_spike: keys over max(threshold x p99, min_calls) calls per minute for 3 consecutive minutes within window_ (defaults 10, 100)';
REVOKE ALL ON FUNCTION apikey._rule_volume_spike_eval(numeric, interval, bigint) FROM PUBLIC;

-- key_status gains the network of the latest success.
CREATE OR REPLACE VIEW apikey.key_status AS
SELECT k.id AS key_id, k.owner, k.name, k.hint, k.created_at, k.created_by, k.expires_at,
	   k.last_used_at, lin.rotated_from,
	   CASE WHEN r.key_id IS NOT NULL THEN 'revoked'
			WHEN k.expires_at OPERATOR(pg_catalog.<=) pg_catalog.now() THEN 'expired'
			WHEN s.key_id IS NOT NULL THEN 'suspended'
			WHEN q.key_id IS NOT NULL THEN 'quarantined'
			ELSE 'active' END AS status,
	   r.revoked_at, r.reason AS revoked_reason,
	   ARRAY(SELECT ks.scope FROM apikey.key_scopes ks
			  WHERE ks.key_id OPERATOR(pg_catalog.=) k.id ORDER BY ks.scope) AS scopes,
	   (SELECT pg_catalog.max(l.bucket) FROM apikey.usage_log l
		 WHERE l.key_id OPERATOR(pg_catalog.=) k.id AND l.code OPERATOR(pg_catalog.<>) 'valid') AS last_failed_at,
	   (SELECT n.network FROM apikey.key_networks n
		 WHERE n.key_id OPERATOR(pg_catalog.=) k.id
		 ORDER BY n.last_seen DESC, n.calls DESC LIMIT 1) AS last_used_network
  FROM apikey.keys k
  LEFT JOIN apikey.key_lineage lin ON lin.key_id OPERATOR(pg_catalog.=) k.id
  LEFT JOIN apikey.revocations r ON r.key_id OPERATOR(pg_catalog.=) k.id
  LEFT JOIN apikey.suspensions s ON s.key_id OPERATOR(pg_catalog.=) k.id
		AND (s.until IS NULL OR s.until OPERATOR(pg_catalog.>) pg_catalog.now())
  LEFT JOIN apikey.quarantines q ON q.key_id OPERATOR(pg_catalog.=) k.id
		AND (q.until IS NULL OR q.until OPERATOR(pg_catalog.>) pg_catalog.now());
COMMENT ON COLUMN apikey.key_status.last_used_network
	IS 'Network of the latest success recorded in key_networks (as flushed); NULL if none';

-- apikey.stats gains the successes key_networks had no room for.
CREATE FUNCTION apikey._network_overflow() RETURNS bigint
AS 'MODULE_PATHNAME', 'apikey_network_overflow'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._network_overflow()
	IS 'Internal: successes not recorded in key_networks since start, shared memory being full (behind apikey.stats.network_overflow)';
REVOKE ALL ON FUNCTION apikey._network_overflow() FROM PUBLIC;
SELECT apikey._grant_like_stats('apikey._network_overflow()');

CREATE OR REPLACE VIEW apikey.stats AS
SELECT s.*, apikey._tokens_redacted() AS tokens_redacted,
	   apikey._failure_networks_untracked() AS failure_networks_untracked,
	   apikey._writer_heartbeat() AS writer_heartbeat,
	   apikey._network_overflow() AS network_overflow
  FROM apikey._stats() s;
COMMENT ON COLUMN apikey.stats.network_overflow
	IS 'Successes not recorded in key_networks since the server started: apikey.network_max_entries was full (raise it, or flush more often)';

INSERT INTO apikey._grant_sets (kind, privilege, object) VALUES
	('admin', 'EXECUTE', 'FUNCTION apikey.compute_baselines(interval)'),
	('monitor', 'SELECT', 'TABLE apikey.key_networks'),
	('monitor', 'SELECT', 'TABLE apikey.key_baselines'),
	('monitor', 'SELECT', 'TABLE apikey.suggested_limits'),
	('monitor', 'EXECUTE', 'FUNCTION apikey._network_overflow()');


-------------------------------------------------------------------------------
-- Detector (issue 12, items 3 and 4): canary keys, detection rules,
-- findings, and a pass that runs the rules (src/canary.c, src/detector.c).
--
-- THE RULE INTERFACE.  A row of apikey.detection_rules names a kind k;
-- its rule is the function
--
--	   apikey._rule_<k>(r apikey.detection_rules)
--	   RETURNS TABLE (key_id bigint, owner text, network cidr,
--					  evidence jsonb, last_at timestamptz)
--
-- in the extension's schema, one row per subject that breaks the rule
-- now: a key (key_id, owner), a client network (network), or both.  A pass
-- (apikey._detect(): the worker every apikey.detect_interval, or
-- apikey.run_detection() on demand) calls the function of every enabled
-- rule, found as a regprocedure in the extension's schema (kinds are
-- lower-case identifiers, checked), and for each row:
--	 - if the subject has an open finding of this rule, replaces its
--	   evidence with the new one and moves last_seen_at (no new finding,
--	   no new action: one open finding per rule and subject);
--	 - else, if a finding of this rule and subject was resolved at or after
--	   last_at (the newest event the evidence counts), skips it: what the
--	   operator resolved is not reported again;
--	 - else opens a finding with the rule's severity and takes the rule's
--	   action on key_id (notify: nothing; throttle, quarantine, suspend:
--	   apikey.throttle(), quarantine(), suspend(), audited as theirs), in
--	   the pass's transaction.  An action that fails is recorded in
--	   action_taken ('failed: SQLSTATE') with a WARNING; the finding stays.
-- A rule whose function does not exist is skipped (DEBUG1), so a rule can
-- be seeded before its function ships.  A rule that raises is skipped
-- with a WARNING; the other rules still run.  Evidence holds counts,
-- addresses, scope names and times: never a token or a hash.  A rule
-- function is STABLE SQL (or VOLATILE if it consumes something, as
-- canary_use does), owned by the extension, REVOKEd from PUBLIC.
-------------------------------------------------------------------------------

-- A client network as the failure limiter counts them: /32 or /64.
CREATE FUNCTION apikey._network(addr inet) RETURNS cidr
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT pg_catalog.network(pg_catalog.set_masklen(_network.addr,
		CASE pg_catalog.family(_network.addr) WHEN 4 THEN 32 ELSE 64 END));
$$;
COMMENT ON FUNCTION apikey._network(inet)
	IS 'Internal: the client network an address belongs to, /32 (IPv4) or /64 (IPv6), as the failure limiter counts them';
REVOKE ALL ON FUNCTION apikey._network(inet) FROM PUBLIC;

CREATE TABLE apikey.detection_rules (
	kind		text PRIMARY KEY
				CONSTRAINT detection_rules_kind_check
				CHECK (kind OPERATOR(pg_catalog.~) '^[a-z][a-z0-9_]{0,40}$'),
	enabled		boolean NOT NULL DEFAULT true,
	threshold	numeric NOT NULL CONSTRAINT detection_rules_threshold_check
				CHECK (threshold OPERATOR(pg_catalog.>) 0),
	window_		interval NOT NULL CONSTRAINT detection_rules_window_check
				CHECK (window_ OPERATOR(pg_catalog.>) '0'::interval
					   AND window_ OPERATOR(pg_catalog.<=) '7 days'::interval),
	min_calls	bigint NOT NULL DEFAULT 0 CONSTRAINT detection_rules_min_calls_check
				CHECK (min_calls OPERATOR(pg_catalog.>=) 0),
	action		text NOT NULL DEFAULT 'notify' CONSTRAINT detection_rules_action_check
				CHECK (action OPERATOR(pg_catalog.=) ANY ('{notify,throttle,quarantine,suspend}'::text[])),
	action_for	interval CONSTRAINT detection_rules_action_for_check
				CHECK (action_for OPERATOR(pg_catalog.>) '0'::interval),
	severity	text NOT NULL DEFAULT 'medium' CONSTRAINT detection_rules_severity_check
				CHECK (severity OPERATOR(pg_catalog.=) ANY ('{info,low,medium,high,critical}'::text[])),
	throttle_rate integer CONSTRAINT detection_rules_throttle_rate_check
				CHECK (throttle_rate OPERATOR(pg_catalog.>) 0),
	quarantine_scopes text[],
	description	text NOT NULL,
	CONSTRAINT detection_rules_throttle_check
		CHECK (action OPERATOR(pg_catalog.<>) 'throttle' OR (throttle_rate IS NOT NULL AND action_for IS NOT NULL)),
	CONSTRAINT detection_rules_quarantine_check
		CHECK (action OPERATOR(pg_catalog.<>) 'quarantine'
			   OR COALESCE(pg_catalog.cardinality(quarantine_scopes), 0) OPERATOR(pg_catalog.>) 0),
	CONSTRAINT detection_rules_subject_check
		CHECK (action OPERATOR(pg_catalog.=) 'notify'
			   OR kind OPERATOR(pg_catalog.<>) ALL ('{address_failures,shared_address,canary_use}'::text[]))
);
COMMENT ON TABLE apikey.detection_rules IS 'The detector''s rules: one row per kind, evaluated by apikey._rule_<kind>() at every pass; operators tune thresholds and opt in to actions here';
COMMENT ON COLUMN apikey.detection_rules.kind IS 'Rule kind; its function is apikey._rule_<kind>(apikey.detection_rules)';
COMMENT ON COLUMN apikey.detection_rules.enabled IS 'false = not evaluated';
COMMENT ON COLUMN apikey.detection_rules.threshold IS 'What trips the rule; its unit depends on the kind (see description)';
COMMENT ON COLUMN apikey.detection_rules.window_ IS 'How far back a pass looks';
COMMENT ON COLUMN apikey.detection_rules.min_calls IS 'Calls below which a statistical rule stays quiet (0 = no minimum)';
COMMENT ON COLUMN apikey.detection_rules.action IS 'notify (a finding only), throttle, quarantine or suspend the key, when a finding opens';
COMMENT ON COLUMN apikey.detection_rules.action_for IS 'How long the action lasts; NULL = until lifted (required for throttle)';
COMMENT ON COLUMN apikey.detection_rules.severity IS 'info, low, medium, high or critical; copied to each finding';
COMMENT ON COLUMN apikey.detection_rules.throttle_rate IS 'Requests per minute for action throttle';
COMMENT ON COLUMN apikey.detection_rules.quarantine_scopes IS 'allowed_scopes for action quarantine';
COMMENT ON COLUMN apikey.detection_rules.description IS 'What the rule detects and what its threshold, window_ and min_calls mean';

INSERT INTO apikey.detection_rules (kind, threshold, window_, min_calls, severity, description) VALUES
	('address_failures', 100, '10 minutes', 0, 'medium',
	 'One client network (/32, /64) presented at least threshold tokens that match no key (malformed, unknown) or was blocked (address_blocked) within window_ (at most 1 hour)'),
	('failure_spike', 10, '10 minutes', 20, 'medium',
	 'One key failed (revoked, expired, scope_denied, address_denied) at least min_calls times within window_, and at least threshold times its own rate over the 7 days before (taken as at least 1 per window_)'),
	('allowlist_violation', 1, '1 hour', 0, 'high',
	 'A key with allowed_cidrs was presented from outside them (address_denied) at least threshold times within window_ from one client network'),
	('shared_address', 5, '10 minutes', 0, 'medium',
	 'One client network used at least threshold different keys within window_'),
	('new_networks', 1, '1 hour', 0, 'low',
	 'A key succeeded from networks it had not used for 30 days'),
	('volume_spike', 10, '10 minutes', 100, 'medium',
	 'A key''s calls a minute stayed above max(threshold x its p99, min_calls) for 3 consecutive minutes within window_'),
	('dormant_use', 90, '1 hour', 0, 'medium',
	 'A key succeeded within window_ after threshold days without a success (or since it was issued)'),
	('revoked_use', 1, '1 hour', 0, 'high',
	 'A key revoked as leaked (reason leak..., or reported in apikey.exposures) was presented at least threshold times within window_'),
	('canary_use', 1, '1 hour', 0, 'critical',
	 'A canary key (apikey.issue_canary) was presented: every use opens or extends a finding per canary and client network; threshold and window_ are not used');

-- A new kind must come with its function; a row pg_restore brings back
-- for a kind the extension seeded replaces the seeded row.
CREATE FUNCTION apikey._detection_rules_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_nsp name;
BEGIN
	IF TG_OP OPERATOR(pg_catalog.=) 'INSERT'
	   AND EXISTS (SELECT FROM apikey.detection_rules d WHERE d.kind OPERATOR(pg_catalog.=) NEW.kind) THEN
		UPDATE apikey.detection_rules d
		   SET enabled = NEW.enabled, threshold = NEW.threshold, window_ = NEW.window_,
			   min_calls = NEW.min_calls, action = NEW.action, action_for = NEW.action_for,
			   severity = NEW.severity, throttle_rate = NEW.throttle_rate,
			   quarantine_scopes = NEW.quarantine_scopes, description = NEW.description
		 WHERE d.kind OPERATOR(pg_catalog.=) NEW.kind;
		RETURN NULL;
	END IF;
	SELECT n.nspname INTO v_nsp FROM pg_catalog.pg_extension e
	  JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace
	 WHERE e.extname OPERATOR(pg_catalog.=) 'apikey';
	IF NEW.kind OPERATOR(pg_catalog.~) '^[a-z][a-z0-9_]{0,40}$'
	   AND pg_catalog.to_regprocedure(pg_catalog.format('%I.%I(%I.detection_rules)', v_nsp,
			'_rule_' OPERATOR(pg_catalog.||) NEW.kind, v_nsp)) IS NULL THEN
		RAISE EXCEPTION 'no rule function for detection rule kind "%"', NEW.kind
			USING ERRCODE = '42883',
				  HINT = pg_catalog.format('Create %I._rule_%s(%I.detection_rules) first (see the rule interface in the README), or use one of the seeded kinds.',
										   v_nsp, NEW.kind, v_nsp);
	END IF;
	RETURN NEW;
END
$$;
COMMENT ON FUNCTION apikey._detection_rules_check()
	IS 'Internal: trigger refusing a detection rule kind without its apikey._rule_<kind>() function (42883), and turning a restored row of a seeded kind into an update';
REVOKE ALL ON FUNCTION apikey._detection_rules_check() FROM PUBLIC;
CREATE TRIGGER detection_rules_check BEFORE INSERT OR UPDATE OF kind ON apikey.detection_rules
	FOR EACH ROW EXECUTE FUNCTION apikey._detection_rules_check();
ALTER TABLE apikey.detection_rules ENABLE ALWAYS TRIGGER detection_rules_check;
SELECT pg_catalog.pg_extension_config_dump('apikey.detection_rules', '');
REVOKE ALL ON apikey.detection_rules FROM PUBLIC;
SELECT apikey._audit_dml_attach('detection_rules');

CREATE TABLE apikey.findings (
	id			bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	at			timestamptz NOT NULL DEFAULT pg_catalog.now(),
	rule		text NOT NULL,
	key_id		bigint,
	owner		text,
	network		cidr,
	severity	text NOT NULL CONSTRAINT findings_severity_check
				CHECK (severity OPERATOR(pg_catalog.=) ANY ('{info,low,medium,high,critical}'::text[])),
	evidence	jsonb NOT NULL,
	action_taken text NOT NULL,
	last_seen_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
	resolved_at	timestamptz,
	resolved_by	name,
	resolution	text CONSTRAINT findings_resolution_check
				CHECK (resolution OPERATOR(pg_catalog.=) ANY ('{false_positive,mitigated,accepted,duplicate}'::text[])),
	resolution_note text,
	CONSTRAINT findings_subject_check CHECK (key_id IS NOT NULL OR network IS NOT NULL),
	CONSTRAINT findings_resolved_check
		CHECK ((resolved_at IS NULL) OPERATOR(pg_catalog.=) (resolution IS NULL))
);
-- One open finding per rule and subject.
CREATE UNIQUE INDEX findings_open_subject ON apikey.findings
	(rule, (COALESCE(key_id, 0)), (COALESCE(network, '0.0.0.0/0'::cidr))) WHERE resolved_at IS NULL;
CREATE INDEX findings_key_id_idx ON apikey.findings (key_id);
COMMENT ON TABLE apikey.findings IS 'What the detector found: one row per rule and subject (key, client network) while open; never a token or hash';
COMMENT ON COLUMN apikey.findings.id IS 'Finding id, for resolve_finding()';
COMMENT ON COLUMN apikey.findings.at IS 'When the pass that opened it began';
COMMENT ON COLUMN apikey.findings.rule IS 'The detection rule (apikey.detection_rules.kind)';
COMMENT ON COLUMN apikey.findings.key_id IS 'The key (or canary) concerned; NULL when the subject is a network only';
COMMENT ON COLUMN apikey.findings.owner IS 'The key''s owner, when it was found';
COMMENT ON COLUMN apikey.findings.network IS 'The client network concerned (/32 or /64, widened to the key_networks prefix once not seen for apikey.address_retention); NULL when the subject is a key only';
COMMENT ON COLUMN apikey.findings.severity IS 'The rule''s severity when it opened';
COMMENT ON COLUMN apikey.findings.evidence IS 'What the rule saw (counts, addresses, scope names, times); replaced by each pass while open; addresses dropped once not seen for apikey.address_retention';
COMMENT ON COLUMN apikey.findings.action_taken IS 'notified, throttled, quarantined, suspended, or failed: SQLSTATE';
COMMENT ON COLUMN apikey.findings.last_seen_at IS 'The last pass that still saw it';
COMMENT ON COLUMN apikey.findings.resolved_at IS 'When resolve_finding() closed it; NULL = open';
COMMENT ON COLUMN apikey.findings.resolved_by IS 'Role that resolved it (acting in the session)';
COMMENT ON COLUMN apikey.findings.resolution IS 'false_positive, mitigated, accepted or duplicate';
COMMENT ON COLUMN apikey.findings.resolution_note IS 'Free text given to resolve_finding()';
SELECT pg_catalog.pg_extension_config_dump('apikey.findings', '');
SELECT pg_catalog.pg_extension_config_dump('apikey.findings_id_seq', '');
COMMENT ON SEQUENCE apikey.findings_id_seq IS 'Finding ids';
REVOKE ALL ON apikey.findings FROM PUBLIC;

-- Canary keys: never in apikey.keys (so never valid, never cached), ids
-- from the keys' sequence, tokens of the same format (src/canary.c).
CREATE TABLE apikey.canaries (
	id			bigint PRIMARY KEY DEFAULT pg_catalog.nextval('apikey.keys_id_seq'::pg_catalog.regclass),
	owner		text NOT NULL CONSTRAINT canaries_owner_check CHECK (owner OPERATOR(pg_catalog.<>) ''),
	name		text,
	prefix		text NOT NULL,
	hint		text NOT NULL,
	hash		bytea NOT NULL CONSTRAINT canaries_hash_length
				CHECK (pg_catalog.octet_length(hash) OPERATOR(pg_catalog.=) 32),
	created_at	timestamptz NOT NULL DEFAULT pg_catalog.now(),
	created_by	name NOT NULL,
	CONSTRAINT canaries_hash_key UNIQUE (hash)
);
COMMENT ON TABLE apikey.canaries IS 'Canary keys: tokens planted to be found; every use answers unknown and opens a critical finding (rule canary_use).  Not in apikey.keys nor key_status';
COMMENT ON COLUMN apikey.canaries.id IS 'Canary id, from the keys'' id sequence (findings.key_id)';
COMMENT ON COLUMN apikey.canaries.owner IS 'The owner the canary pretends to belong to';
COMMENT ON COLUMN apikey.canaries.name IS 'Where it was planted, for humans';
COMMENT ON COLUMN apikey.canaries.prefix IS 'Token prefix';
COMMENT ON COLUMN apikey.canaries.hint IS 'Non-secret display form: prefix and the last four characters';
COMMENT ON COLUMN apikey.canaries.hash IS 'SHA-256 of the token; readable by the extension owner only';
COMMENT ON COLUMN apikey.canaries.created_at IS 'When it was issued';
COMMENT ON COLUMN apikey.canaries.created_by IS 'Role that issued it (acting in the session)';
SELECT pg_catalog.pg_extension_config_dump('apikey.canaries', '');
REVOKE ALL ON apikey.canaries FROM PUBLIC;
SELECT apikey._audit_dml_attach('canaries');

CREATE FUNCTION apikey.issue_canary(owner text, name text DEFAULT NULL, prefix text DEFAULT 'ak')
RETURNS SETOF apikey.new_key
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'issue_canary'
AS $$
DECLARE
	v_new record;
	v_id bigint;
BEGIN
	IF issue_canary.owner IS NULL OR issue_canary.owner OPERATOR(pg_catalog.=) '' THEN
		RAISE EXCEPTION 'owner must not be empty'
			USING ERRCODE = '22004', HINT = 'Give the owner the canary should appear to belong to.';
	END IF;
	IF pg_catalog.octet_length(issue_canary.owner) OPERATOR(pg_catalog.>) 1024 THEN
		RAISE EXCEPTION 'owner must be at most 1024 bytes' USING ERRCODE = '22023';
	END IF;
	IF issue_canary.prefix IS NULL THEN
		RAISE EXCEPTION 'prefix must not be NULL'
			USING ERRCODE = '22023', HINT = 'Omit it for the default prefix ak.';
	END IF;
	PERFORM apikey._audit_lock();
	v_new := apikey._new_token(issue_canary.prefix);
	INSERT INTO apikey.canaries (owner, name, prefix, hint, hash, created_by)
	VALUES (issue_canary.owner, issue_canary.name, issue_canary.prefix, v_new.hint, v_new.hash,
			apikey._acting_role())
	RETURNING id INTO v_id;
	PERFORM apikey._audit('issue_canary', v_id, issue_canary.owner, pg_catalog.jsonb_build_object(
		'name', issue_canary.name, 'hint', v_new.hint));
	RETURN NEXT ROW(v_id, v_new.token)::apikey.new_key;
END
$$;
COMMENT ON FUNCTION apikey.issue_canary(text, text, text)
	IS 'Issue a canary key: a token like any other (shown this once) that no call ever accepts; every use answers unknown and opens a critical finding (rule canary_use) with the client address and the scope asked for';
REVOKE ALL ON FUNCTION apikey.issue_canary(text, text, text) FROM PUBLIC;

CREATE FUNCTION apikey._canary_uses(OUT canary_id bigint, OUT client_addr inet, OUT scope text,
									OUT scope_withheld boolean, OUT calls bigint,
									OUT first_at timestamptz, OUT last_at timestamptz,
									OUT folded boolean)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'apikey_canary_uses_srf'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION apikey._canary_uses()
	IS 'Internal: canary uses recorded in shared memory and not yet filed, one row per canary, client address and scope (folded: uses of addresses and scopes beyond the first seven of the canary, shown with the latest of them); they count as filed when the calling transaction commits (rule canary_use)';
REVOKE ALL ON FUNCTION apikey._canary_uses() FROM PUBLIC;

-- The rules over failures, allowlists, dormancy, leaks and canaries.
-- shared_address, new_networks and volume_spike are seeded above; their
-- functions are defined at the end of this script, after the section that
-- defines key_networks and key_baselines.

-- usage_log counts a token that matches no key without its address, so
-- this rule reads failures per network from shared memory (src/netwatch.c).
CREATE FUNCTION apikey._network_failures(since timestamptz, OUT network cidr, OUT failures bigint,
										 OUT last_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'apikey_network_failures'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._network_failures(timestamptz)
	IS 'Internal: per client network (/32, /64), tokens matching no key and blocked calls since then, at most an hour back (rule address_failures)';
REVOKE ALL ON FUNCTION apikey._network_failures(timestamptz) FROM PUBLIC;

CREATE FUNCTION apikey._rule_address_failures(r apikey.detection_rules)
RETURNS TABLE (key_id bigint, owner text, network cidr, evidence jsonb, last_at timestamptz)
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT NULL::bigint, NULL::text, f.network,
		   pg_catalog.jsonb_build_object('failures', f.failures, 'codes', '{malformed,unknown,address_blocked}'::text[],
										 'threshold', r.threshold,
										 'window', LEAST(r.window_, '1 hour'::interval)),
		   f.last_at
	  FROM apikey._network_failures(pg_catalog.now() OPERATOR(pg_catalog.-) r.window_) f
	 WHERE f.failures OPERATOR(pg_catalog.>=) r.threshold;
$$;
COMMENT ON FUNCTION apikey._rule_address_failures(apikey.detection_rules)
	IS 'Internal: detection rule address_failures (a client network presenting tokens that match no key)';
REVOKE ALL ON FUNCTION apikey._rule_address_failures(apikey.detection_rules) FROM PUBLIC;

CREATE FUNCTION apikey._rule_failure_spike(r apikey.detection_rules)
RETURNS TABLE (key_id bigint, owner text, network cidr, evidence jsonb, last_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
	WITH w AS (
		SELECT l.key_id, l.code, pg_catalog.sum(l.calls) AS calls, pg_catalog.max(l.bucket) AS last_at
		  FROM apikey.usage_log l
		 WHERE l.bucket OPERATOR(pg_catalog.>=) (pg_catalog.now() OPERATOR(pg_catalog.-) r.window_)
		   AND l.key_id IS NOT NULL
		   AND l.code OPERATOR(pg_catalog.=) ANY ('{revoked,expired,scope_denied,address_denied}'::text[])
		 GROUP BY 1, 2),
	k AS (
		SELECT w.key_id, pg_catalog.sum(w.calls) AS calls, pg_catalog.jsonb_object_agg(w.code, w.calls) AS by_code,
			   pg_catalog.max(w.last_at) AS last_at
		  FROM w GROUP BY 1)
	SELECT k.key_id, ks.owner, NULL::cidr,
		   pg_catalog.jsonb_build_object('failures', k.calls, 'by_code', k.by_code,
										 'baseline_per_window', pg_catalog.round(b.per_window, 2),
										 'factor', r.threshold, 'min_calls', r.min_calls, 'window', r.window_),
		   k.last_at
	  FROM k
	  JOIN apikey.keys ks ON ks.id OPERATOR(pg_catalog.=) k.key_id
	 CROSS JOIN LATERAL (
		SELECT COALESCE(pg_catalog.sum(l.calls), 0)
			   OPERATOR(pg_catalog.*) pg_catalog.date_part('epoch', r.window_)::numeric
			   OPERATOR(pg_catalog./) pg_catalog.date_part('epoch', '7 days'::interval)::numeric AS per_window
		  FROM apikey.usage_log l
		 WHERE l.key_id OPERATOR(pg_catalog.=) k.key_id
		   AND l.bucket OPERATOR(pg_catalog.>=) (pg_catalog.now() OPERATOR(pg_catalog.-) '7 days'::interval OPERATOR(pg_catalog.-) r.window_)
		   AND l.bucket OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) r.window_)
		   AND l.code OPERATOR(pg_catalog.=) ANY ('{revoked,expired,scope_denied,address_denied}'::text[])) b
	 WHERE k.calls OPERATOR(pg_catalog.>=) r.min_calls
	   AND k.calls OPERATOR(pg_catalog.>=) (r.threshold OPERATOR(pg_catalog.*) GREATEST(b.per_window, 1));
$$;
COMMENT ON FUNCTION apikey._rule_failure_spike(apikey.detection_rules)
	IS 'Internal: detection rule failure_spike (a key failing far above its own 7-day rate)';
REVOKE ALL ON FUNCTION apikey._rule_failure_spike(apikey.detection_rules) FROM PUBLIC;

CREATE FUNCTION apikey._rule_allowlist_violation(r apikey.detection_rules)
RETURNS TABLE (key_id bigint, owner text, network cidr, evidence jsonb, last_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT v.key_id, k.owner, v.network,
		   pg_catalog.jsonb_build_object('calls', v.calls,
										 'addresses', pg_catalog.to_jsonb(v.addresses[1:20]),
										 'allowed_cidrs', pg_catalog.to_jsonb(k.allowed_cidrs),
										 'threshold', r.threshold, 'window', r.window_),
		   v.last_at
	  FROM (SELECT l.key_id, apikey._network(l.client_addr) AS network, pg_catalog.sum(l.calls) AS calls,
				   pg_catalog.array_agg(DISTINCT pg_catalog.host(l.client_addr)) AS addresses,
				   pg_catalog.max(l.bucket) AS last_at
			  FROM apikey.usage_log l
			 WHERE l.bucket OPERATOR(pg_catalog.>=) (pg_catalog.now() OPERATOR(pg_catalog.-) r.window_)
			   AND l.code OPERATOR(pg_catalog.=) 'address_denied'
			   AND l.key_id IS NOT NULL AND l.client_addr IS NOT NULL
			 GROUP BY 1, 2) v
	  JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) v.key_id
	 WHERE v.calls OPERATOR(pg_catalog.>=) r.threshold;
$$;
COMMENT ON FUNCTION apikey._rule_allowlist_violation(apikey.detection_rules)
	IS 'Internal: detection rule allowlist_violation (a key presented from outside its allowed_cidrs)';
REVOKE ALL ON FUNCTION apikey._rule_allowlist_violation(apikey.detection_rules) FROM PUBLIC;

CREATE FUNCTION apikey._rule_dormant_use(r apikey.detection_rules)
RETURNS TABLE (key_id bigint, owner text, network cidr, evidence jsonb, last_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
	WITH u AS (
		SELECT l.key_id, pg_catalog.sum(l.calls) AS calls, pg_catalog.min(l.bucket) AS first_at,
			   pg_catalog.max(l.bucket) AS last_at
		  FROM apikey.usage_log l
		 WHERE l.bucket OPERATOR(pg_catalog.>=) (pg_catalog.now() OPERATOR(pg_catalog.-) r.window_)
		   AND l.code OPERATOR(pg_catalog.=) 'valid' AND l.key_id IS NOT NULL
		 GROUP BY 1)
	SELECT u.key_id, k.owner, NULL::cidr,
		   pg_catalog.jsonb_build_object('calls', u.calls, 'first_use', u.first_at,
										 'previous_use', p.prev, 'issued', k.created_at,
										 'dormant_days', r.threshold),
		   u.last_at
	  FROM u
	  JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) u.key_id
	 CROSS JOIN LATERAL (
		SELECT pg_catalog.max(l.bucket) AS prev FROM apikey.usage_log l
		 WHERE l.key_id OPERATOR(pg_catalog.=) u.key_id AND l.code OPERATOR(pg_catalog.=) 'valid'
		   AND l.bucket OPERATOR(pg_catalog.<) u.first_at) p
	 WHERE COALESCE(p.prev, k.created_at) OPERATOR(pg_catalog.<)
		   (u.first_at OPERATOR(pg_catalog.-) (r.threshold::float8 OPERATOR(pg_catalog.*) '1 day'::interval));
$$;
COMMENT ON FUNCTION apikey._rule_dormant_use(apikey.detection_rules)
	IS 'Internal: detection rule dormant_use (a success after threshold days without one)';
REVOKE ALL ON FUNCTION apikey._rule_dormant_use(apikey.detection_rules) FROM PUBLIC;

CREATE FUNCTION apikey._rule_revoked_use(r apikey.detection_rules)
RETURNS TABLE (key_id bigint, owner text, network cidr, evidence jsonb, last_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT k.id, k.owner, NULL::cidr,
		   pg_catalog.jsonb_build_object('calls', v.calls, 'by_code', v.by_code,
										 'addresses', pg_catalog.to_jsonb(v.addresses[1:20]),
										 'exposure_ids', pg_catalog.to_jsonb(apikey._exposure_ids(k.id)),
										 'threshold', r.threshold, 'window', r.window_),
		   v.last_at
	  FROM (SELECT l.key_id, pg_catalog.sum(l.calls) AS calls,
				   pg_catalog.jsonb_object_agg(l.code, l.calls) AS by_code,
				   pg_catalog.array_agg(DISTINCT pg_catalog.host(l.client_addr))
					   FILTER (WHERE l.client_addr IS NOT NULL) AS addresses,
				   pg_catalog.max(l.bucket) AS last_at
			  FROM (SELECT l.key_id, l.code, l.client_addr, pg_catalog.sum(l.calls) AS calls,
						   pg_catalog.max(l.bucket) AS bucket
					  FROM apikey.usage_log l
					 WHERE l.bucket OPERATOR(pg_catalog.>=) (pg_catalog.now() OPERATOR(pg_catalog.-) r.window_)
					   AND l.code OPERATOR(pg_catalog.=) ANY ('{revoked,suspended}'::text[])
					   AND l.key_id IS NOT NULL
					 GROUP BY 1, 2, 3) l
			 GROUP BY 1) v
	  JOIN apikey.keys k ON k.id OPERATOR(pg_catalog.=) v.key_id
	 WHERE v.calls OPERATOR(pg_catalog.>=) r.threshold
	   AND (EXISTS (SELECT FROM apikey.exposures e WHERE e.key_id OPERATOR(pg_catalog.=) k.id)
			OR EXISTS (SELECT FROM apikey.revocations x WHERE x.key_id OPERATOR(pg_catalog.=) k.id
						  AND x.reason OPERATOR(pg_catalog.~~*) 'leak%'));
$$;
COMMENT ON FUNCTION apikey._rule_revoked_use(apikey.detection_rules)
	IS 'Internal: detection rule revoked_use (a key revoked or suspended as leaked being presented)';
REVOKE ALL ON FUNCTION apikey._rule_revoked_use(apikey.detection_rules) FROM PUBLIC;

-- Consumes the canary uses it reads (at the pass's commit), so its
-- last_at is the pass's clock: every use read is new.  The evidence of an
-- open finding is carried forward and added to.
CREATE FUNCTION apikey._rule_canary_use(r apikey.detection_rules)
RETURNS TABLE (key_id bigint, owner text, network cidr, evidence jsonb, last_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
	-- only as the canary_use rule: reading the uses consumes them
	IF r.kind IS DISTINCT FROM 'canary_use' THEN
		RETURN;
	END IF;
	RETURN QUERY
		WITH g AS (
			SELECT u.canary_id, apikey._network(u.client_addr) AS network, pg_catalog.sum(u.calls) AS calls,
				   pg_catalog.min(u.first_at) AS first_at, pg_catalog.max(u.last_at) AS last_at,
				   pg_catalog.array_agg(DISTINCT pg_catalog.host(u.client_addr))
					   FILTER (WHERE u.client_addr IS NOT NULL) AS addresses,
				   pg_catalog.array_agg(DISTINCT u.scope) FILTER (WHERE u.scope IS NOT NULL) AS scopes,
				   COALESCE(pg_catalog.sum(u.calls) FILTER (WHERE u.scope IS NULL AND NOT u.scope_withheld), 0) AS no_scope,
				   COALESCE(pg_catalog.sum(u.calls) FILTER (WHERE u.scope_withheld), 0) AS withheld,
				   COALESCE(pg_catalog.sum(u.calls) FILTER (WHERE u.folded), 0) AS folded
			  FROM apikey._canary_uses() u
			 GROUP BY 1, 2)
		SELECT g.canary_id, c.owner, g.network,
			   pg_catalog.jsonb_build_object(
				'canary', c.name, 'hint', c.hint, 'verdict', 'unknown',
				'calls', COALESCE((f.evidence OPERATOR(pg_catalog.->>) 'calls')::pg_catalog.int8, 0) OPERATOR(pg_catalog.+) g.calls,
				'addresses', (SELECT pg_catalog.jsonb_agg(a.a ORDER BY a.a) FROM
								(SELECT pg_catalog.jsonb_array_elements_text(COALESCE(f.evidence OPERATOR(pg_catalog.->) 'addresses', '[]')) AS a
								 UNION SELECT pg_catalog.unnest(g.addresses) LIMIT 20) a),
				'scopes', (SELECT pg_catalog.jsonb_agg(s.s ORDER BY s.s) FROM
								(SELECT pg_catalog.jsonb_array_elements_text(COALESCE(f.evidence OPERATOR(pg_catalog.->) 'scopes', '[]')) AS s
								 UNION SELECT pg_catalog.unnest(g.scopes) LIMIT 20) s),
				'calls_without_scope', COALESCE((f.evidence OPERATOR(pg_catalog.->>) 'calls_without_scope')::pg_catalog.int8, 0)
									   OPERATOR(pg_catalog.+) g.no_scope,
				'calls_scope_withheld', COALESCE((f.evidence OPERATOR(pg_catalog.->>) 'calls_scope_withheld')::pg_catalog.int8, 0)
										OPERATOR(pg_catalog.+) g.withheld,
				'calls_other_variants', COALESCE((f.evidence OPERATOR(pg_catalog.->>) 'calls_other_variants')::pg_catalog.int8, 0)
										OPERATOR(pg_catalog.+) g.folded,
				'first_at', LEAST((f.evidence OPERATOR(pg_catalog.->>) 'first_at')::pg_catalog.timestamptz, g.first_at),
				'last_at', g.last_at),
			   pg_catalog.clock_timestamp()
		  FROM g
		  LEFT JOIN apikey.canaries c ON c.id OPERATOR(pg_catalog.=) g.canary_id
		  LEFT JOIN apikey.findings f ON f.rule OPERATOR(pg_catalog.=) r.kind AND f.resolved_at IS NULL
				AND f.key_id OPERATOR(pg_catalog.=) g.canary_id
				AND COALESCE(f.network, '0.0.0.0/0'::cidr) OPERATOR(pg_catalog.=) COALESCE(g.network, '0.0.0.0/0'::cidr);
END
$$;
COMMENT ON FUNCTION apikey._rule_canary_use(apikey.detection_rules)
	IS 'Internal: detection rule canary_use (a canary key presented); consumes the uses it reads when the pass commits';
REVOKE ALL ON FUNCTION apikey._rule_canary_use(apikey.detection_rules) FROM PUBLIC;

-- The action a rule takes when one of its findings opens.
CREATE FUNCTION apikey._respond(r apikey.detection_rules, finding_id bigint, key_id bigint)
RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_reason text := pg_catalog.format('detector: rule %s, finding %s', r.kind, _respond.finding_id);
BEGIN
	IF r.action OPERATOR(pg_catalog.=) 'notify' OR _respond.key_id IS NULL THEN
		RETURN 'notified';
	END IF;
	BEGIN
		IF r.action OPERATOR(pg_catalog.=) 'suspend' THEN
			PERFORM apikey.suspend(_respond.key_id, v_reason, r.action_for);
			UPDATE apikey.suspensions s SET finding_id = _respond.finding_id
			 WHERE s.key_id OPERATOR(pg_catalog.=) _respond.key_id;
			RETURN 'suspended';
		ELSIF r.action OPERATOR(pg_catalog.=) 'quarantine' THEN
			PERFORM apikey.quarantine(_respond.key_id, r.quarantine_scopes, v_reason, r.action_for);
			UPDATE apikey.quarantines q SET finding_id = _respond.finding_id
			 WHERE q.key_id OPERATOR(pg_catalog.=) _respond.key_id;
			RETURN 'quarantined';
		ELSE
			PERFORM apikey.throttle(_respond.key_id, r.throttle_rate, r.action_for);
			RETURN 'throttled';
		END IF;
	EXCEPTION WHEN OTHERS THEN
		RAISE WARNING 'apikey detector: rule % could not % key %: %', r.kind, r.action, _respond.key_id, SQLERRM;
		RETURN 'failed: ' OPERATOR(pg_catalog.||) SQLSTATE;
	END;
END
$$;
COMMENT ON FUNCTION apikey._respond(apikey.detection_rules, bigint, bigint)
	IS 'Internal: take a detection rule''s action on the key of a finding that just opened; returns action_taken';
REVOKE ALL ON FUNCTION apikey._respond(apikey.detection_rules, bigint, bigint) FROM PUBLIC;

-- One pass: every enabled rule, one at a time (the lock on the rules
-- serializes passes and holds rule edits until the pass commits).
CREATE FUNCTION apikey._detect()
RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	r apikey.detection_rules;
	f record;
	v_action text;
	v_nsp name;
	v_fn pg_catalog.regprocedure;
	v_open bigint;
	v_id bigint;
	v_opened integer := 0;
BEGIN
	-- the rules first, then the audit lock, before any finding's row:
	-- direct DML on the rules takes them in that order too (its audit
	-- trigger runs after the change), and resolve_finding, the responses
	-- and _event() (finding.opened) take the audit lock before rows
	LOCK TABLE apikey.detection_rules IN SHARE ROW EXCLUSIVE MODE;
	PERFORM apikey._audit_lock();
	SELECT n.nspname INTO v_nsp FROM pg_catalog.pg_extension e
	  JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace
	 WHERE e.extname OPERATOR(pg_catalog.=) 'apikey';
	FOR r IN SELECT * FROM apikey.detection_rules d WHERE d.enabled ORDER BY d.kind LOOP
		v_fn := pg_catalog.to_regprocedure(pg_catalog.format('%I.%I(%I.detection_rules)', v_nsp,
					'_rule_' OPERATOR(pg_catalog.||) r.kind, v_nsp));
		IF v_fn IS NULL THEN
			RAISE DEBUG 'apikey detector: rule % has no function yet, skipped', r.kind;
			CONTINUE;
		END IF;
		BEGIN
			FOR f IN EXECUTE pg_catalog.format(
				'SELECT x.key_id, x.owner, x.network, x.evidence, x.last_at FROM %s($1) x',
				v_fn::pg_catalog.oid::pg_catalog.regproc) USING r
			LOOP
				SELECT x.id INTO v_open FROM apikey.findings x
				 WHERE x.rule OPERATOR(pg_catalog.=) r.kind AND x.resolved_at IS NULL
				   AND COALESCE(x.key_id, 0) OPERATOR(pg_catalog.=) COALESCE(f.key_id, 0)
				   AND COALESCE(x.network, '0.0.0.0/0'::cidr) OPERATOR(pg_catalog.=) COALESCE(f.network, '0.0.0.0/0'::cidr);
				IF FOUND THEN
					UPDATE apikey.findings x SET evidence = f.evidence, last_seen_at = pg_catalog.now()
					 WHERE x.id OPERATOR(pg_catalog.=) v_open;
					CONTINUE;
				END IF;
				CONTINUE WHEN EXISTS (
					SELECT FROM apikey.findings x
					 WHERE x.rule OPERATOR(pg_catalog.=) r.kind
					   AND COALESCE(x.key_id, 0) OPERATOR(pg_catalog.=) COALESCE(f.key_id, 0)
					   AND COALESCE(x.network, '0.0.0.0/0'::cidr) OPERATOR(pg_catalog.=) COALESCE(f.network, '0.0.0.0/0'::cidr)
					   AND x.resolved_at OPERATOR(pg_catalog.>=) f.last_at);
				INSERT INTO apikey.findings (rule, key_id, owner, network, severity, evidence, action_taken)
				VALUES (r.kind, f.key_id, f.owner, f.network, r.severity, f.evidence, 'notified')
				RETURNING id INTO v_id;
				UPDATE apikey.findings x SET action_taken = apikey._respond(r, v_id, f.key_id)
				 WHERE x.id OPERATOR(pg_catalog.=) v_id
				RETURNING x.action_taken INTO v_action;
				-- announced in the same transaction: events take info,
				-- warning or critical
				PERFORM apikey._event('finding.opened', f.key_id, f.owner,
					CASE r.severity WHEN 'critical' THEN 'critical'
									WHEN 'info' THEN 'info' WHEN 'low' THEN 'info'
									ELSE 'warning' END,
					pg_catalog.jsonb_build_object('finding_id', v_id, 'rule', r.kind,
						'severity', r.severity, 'network', f.network,
						'action_taken', v_action));
				v_opened := v_opened OPERATOR(pg_catalog.+) 1;
			END LOOP;
		EXCEPTION WHEN OTHERS THEN
			RAISE WARNING 'apikey detector: rule % failed: %', r.kind, SQLERRM
				USING HINT = 'Fix or disable the rule (UPDATE apikey.detection_rules SET enabled = false WHERE kind = ...).';
		END;
	END LOOP;
	RETURN v_opened;
END
$$;
COMMENT ON FUNCTION apikey._detect()
	IS 'Internal: one detection pass over every enabled rule (the background worker''s, and run_detection()''s); returns the findings opened';
REVOKE ALL ON FUNCTION apikey._detect() FROM PUBLIC;

CREATE FUNCTION apikey.run_detection()
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'run_detection'
AS $$
DECLARE
	v_opened integer;
BEGIN
	IF pg_catalog.pg_is_in_recovery() THEN
		RAISE EXCEPTION 'cannot run detection during recovery'
			USING ERRCODE = '25006', HINT = 'Run apikey.run_detection() on the primary.';
	END IF;
	-- the counts made so far, into usage_log first (before any lock: the
	-- usage writer takes its own)
	PERFORM apikey.flush_usage();
	v_opened := apikey._detect();
	PERFORM apikey._audit('run_detection', NULL, NULL, pg_catalog.jsonb_build_object('opened', v_opened));
	RETURN v_opened;
END
$$;
COMMENT ON FUNCTION apikey.run_detection()
	IS 'Flush usage, then run one detection pass now (the background worker runs one every apikey.detect_interval); returns the findings opened';
REVOKE ALL ON FUNCTION apikey.run_detection() FROM PUBLIC;

CREATE FUNCTION apikey.resolve_finding(id bigint, resolution text, note text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'resolve_finding'
AS $$
DECLARE
	v_f apikey.findings;
BEGIN
	IF resolve_finding.id IS NULL THEN
		RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF resolve_finding.resolution IS NULL
	   OR resolve_finding.resolution OPERATOR(pg_catalog.<>) ALL ('{false_positive,mitigated,accepted,duplicate}'::text[]) THEN
		RAISE EXCEPTION 'resolution must be false_positive, mitigated, accepted or duplicate, got %',
						COALESCE(apikey._clip(resolve_finding.resolution), 'NULL')
			USING ERRCODE = CASE WHEN resolve_finding.resolution IS NULL THEN '22004' ELSE '22023' END;
	END IF;
	IF pg_catalog.octet_length(resolve_finding.note) OPERATOR(pg_catalog.>) 1000 THEN
		RAISE EXCEPTION 'note must be at most 1000 bytes' USING ERRCODE = '22023';
	END IF;
	PERFORM apikey._audit_lock();
	SELECT * INTO v_f FROM apikey.findings x WHERE x.id OPERATOR(pg_catalog.=) resolve_finding.id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'finding % does not exist', resolve_finding.id USING ERRCODE = '42704';
	END IF;
	IF v_f.resolved_at IS NOT NULL THEN
		RAISE EXCEPTION 'finding % is already resolved (%)', v_f.id, v_f.resolution
			USING ERRCODE = '55000';
	END IF;
	UPDATE apikey.findings x
	   SET resolved_at = pg_catalog.now(), resolved_by = apikey._acting_role(),
		   resolution = resolve_finding.resolution, resolution_note = resolve_finding.note
	 WHERE x.id OPERATOR(pg_catalog.=) v_f.id;
	PERFORM apikey._audit('resolve_finding', v_f.key_id, v_f.owner, pg_catalog.jsonb_build_object(
		'finding_id', v_f.id, 'rule', v_f.rule, 'network', apikey._network_of(v_f.network),
		'resolution', resolve_finding.resolution, 'note', resolve_finding.note));
END
$$;
COMMENT ON FUNCTION apikey.resolve_finding(bigint, text, text)
	IS 'Close an open finding (false_positive, mitigated, accepted, duplicate); the events it covered are not reported again.  Any action it took stays: lift it with resume(), release()';
REVOKE ALL ON FUNCTION apikey.resolve_finding(bigint, text, text) FROM PUBLIC;

-- Client addresses in findings and their events are personal data like the
-- failure addresses of usage_log: once a finding has not been seen for
-- apikey.address_retention, run_retention() drops the addresses from its
-- evidence and widens its network (and the network of its finding.opened
-- event) to what key_networks records (apikey.network_prefix_v4/_v6).  Open
-- findings of one rule and key that would then share a network (one open
-- finding per rule and subject) are one finding: the oldest stays open, the
-- others are resolved as duplicates of it.  Returns how many findings and
-- events it changed; a row that needs nothing is never picked.
-- An address or network in text, as inet; NULL for anything else (a
-- payload is only as good as whoever wrote it).
CREATE FUNCTION apikey._inet_or_null(value text) RETURNS inet
LANGUAGE plpgsql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	RETURN value::pg_catalog.inet;
EXCEPTION WHEN invalid_text_representation OR invalid_binary_representation OR data_exception THEN
	RETURN NULL;
END
$$;
COMMENT ON FUNCTION apikey._inet_or_null(text)
	IS 'Internal: text as inet, NULL when it is not an address or network';
REVOKE ALL ON FUNCTION apikey._inet_or_null(text) FROM PUBLIC;

CREATE FUNCTION apikey._erase_finding_addresses(cutoff timestamptz, batch_size integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_findings bigint;
	v_events bigint;
BEGIN
	IF cutoff IS NULL OR batch_size IS NULL OR batch_size OPERATOR(pg_catalog.<) 1 THEN
		RAISE EXCEPTION 'cutoff must not be NULL and batch_size must be positive' USING ERRCODE = '22023';
	END IF;
	-- open findings that would share a wider network: all but one resolved
	-- (the one already that wide, else the oldest)
	WITH grp AS (
		SELECT f.id, f.network OPERATOR(pg_catalog.=) apikey._network_of(f.network) AS wide_already,
			   pg_catalog.first_value(f.id) OVER (
				   PARTITION BY f.rule, COALESCE(f.key_id, 0), apikey._network_of(f.network)
				   ORDER BY f.network OPERATOR(pg_catalog.=) apikey._network_of(f.network) DESC, f.id) AS keep
		  FROM apikey.findings f
		 WHERE f.resolved_at IS NULL AND f.network IS NOT NULL
		   AND (f.network OPERATOR(pg_catalog.=) apikey._network_of(f.network)
				OR f.last_seen_at OPERATOR(pg_catalog.<) cutoff))
	UPDATE apikey.findings f
	   SET resolved_at = pg_catalog.now(), resolved_by = apikey._acting_role(), resolution = 'duplicate',
		   resolution_note = pg_catalog.format('apikey.address_retention: the same network as finding %s once widened', g.keep)
	  FROM grp g
	 WHERE f.id OPERATOR(pg_catalog.=) g.id AND g.id OPERATOR(pg_catalog.<>) g.keep AND NOT g.wide_already;

	WITH picked AS (
		SELECT f.id
		  FROM apikey.findings f
		 WHERE f.last_seen_at OPERATOR(pg_catalog.<) cutoff
		   AND (f.evidence OPERATOR(pg_catalog.?) 'addresses'
				OR f.network OPERATOR(pg_catalog.<>) apikey._network_of(f.network))
		 ORDER BY f.id
		 LIMIT batch_size
		   FOR UPDATE)
	UPDATE apikey.findings f
	   SET evidence = CASE WHEN f.evidence OPERATOR(pg_catalog.?) 'addresses'
						   THEN (f.evidence OPERATOR(pg_catalog.-) 'addresses')
								OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('addresses_erased',
									pg_catalog.jsonb_array_length(CASE pg_catalog.jsonb_typeof(f.evidence OPERATOR(pg_catalog.->) 'addresses')
																	   WHEN 'array' THEN f.evidence OPERATOR(pg_catalog.->) 'addresses'
																	   ELSE '[]' END))
						   ELSE f.evidence END,
		   network = apikey._network_of(f.network)
	  FROM picked p
	 WHERE f.id OPERATOR(pg_catalog.=) p.id;
	GET DIAGNOSTICS v_findings = ROW_COUNT;

	-- events: only a network written as the detector writes it (cidr text)
	-- is widened; anything else in a payload is left as it is
	UPDATE apikey.events e
	   SET payload = pg_catalog.jsonb_set(e.payload, '{network}',
					pg_catalog.to_jsonb(apikey._network_of(apikey._inet_or_null(e.payload OPERATOR(pg_catalog.->>) 'network'))::text))
	 WHERE e.seq OPERATOR(pg_catalog.=) ANY (ARRAY(
			SELECT x.seq FROM apikey.events x
			 WHERE x.kind OPERATOR(pg_catalog.=) 'finding.opened' AND x.at OPERATOR(pg_catalog.<) cutoff
			   AND pg_catalog.jsonb_typeof(x.payload OPERATOR(pg_catalog.->) 'network') OPERATOR(pg_catalog.=) 'string'
			   AND apikey._inet_or_null(x.payload OPERATOR(pg_catalog.->>) 'network')
				   OPERATOR(pg_catalog.<>) apikey._network_of(apikey._inet_or_null(x.payload OPERATOR(pg_catalog.->>) 'network'))::pg_catalog.inet
			 ORDER BY x.seq LIMIT batch_size));
	GET DIAGNOSTICS v_events = ROW_COUNT;
	RETURN v_findings OPERATOR(pg_catalog.+) v_events;
END
$$;
COMMENT ON FUNCTION apikey._erase_finding_addresses(timestamptz, integer)
	IS 'Internal (run_retention): drop client addresses from findings not seen since cutoff and widen their networks, and those of their finding.opened events, to the key_networks prefix; at most batch_size of each';
REVOKE ALL ON FUNCTION apikey._erase_finding_addresses(timestamptz, integer) FROM PUBLIC;

-- An operator (grant_admin()) runs the detector and tunes its rules; a
-- monitor (grant_monitor()) reads the findings.
INSERT INTO apikey._grant_sets (kind, privilege, object) VALUES
	('admin', 'EXECUTE', 'FUNCTION apikey.issue_canary(text, text, text)'),
	('admin', 'EXECUTE', 'FUNCTION apikey.run_detection()'),
	('admin', 'EXECUTE', 'FUNCTION apikey.resolve_finding(bigint, text, text)'),
	('admin', 'SELECT', 'TABLE apikey.findings'),
	('admin', 'SELECT', 'TABLE apikey.detection_rules'),
	('admin', 'UPDATE (enabled, threshold, window_, min_calls, action, action_for, severity, throttle_rate, quarantine_scopes)',
	 'TABLE apikey.detection_rules'),
	('admin', 'SELECT (id, owner, name, prefix, hint, created_at, created_by)', 'TABLE apikey.canaries'),
	('monitor', 'SELECT', 'TABLE apikey.findings');

-------------------------------------------------------------------------------
-- The network rules in the detector (issue 12, item 4): shared_address,
-- new_networks and volume_spike, whose evaluators come with key_networks
-- and key_baselines, as the detector's rule interface wants them: the row's
-- parameters in, and last_at, the newest event the evidence counts (a
-- finding resolved after it is not reported again).
-------------------------------------------------------------------------------

CREATE FUNCTION apikey._rule_shared_address(r apikey.detection_rules)
RETURNS TABLE (key_id bigint, owner text, network cidr, evidence jsonb, last_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT e.key_id, e.owner, e.network, e.evidence,
		   (SELECT pg_catalog.max(n.last_seen) FROM apikey.key_networks n
			 WHERE n.network OPERATOR(pg_catalog.=) e.network)
	  FROM apikey._rule_shared_address_eval(r.threshold, r.window_, r.min_calls) e;
$$;
COMMENT ON FUNCTION apikey._rule_shared_address(apikey.detection_rules)
	IS 'Internal: rule shared_address with its row''s parameters (the detector''s rule interface)';
REVOKE ALL ON FUNCTION apikey._rule_shared_address(apikey.detection_rules) FROM PUBLIC;

CREATE FUNCTION apikey._rule_new_networks(r apikey.detection_rules)
RETURNS TABLE (key_id bigint, owner text, network cidr, evidence jsonb, last_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT e.key_id, e.owner, e.network, e.evidence, n.last_seen
	  FROM apikey._rule_new_networks_eval(r.threshold, r.window_, r.min_calls) e
	  JOIN apikey.key_networks n
		ON n.key_id OPERATOR(pg_catalog.=) e.key_id AND n.network OPERATOR(pg_catalog.=) e.network;
$$;
COMMENT ON FUNCTION apikey._rule_new_networks(apikey.detection_rules)
	IS 'Internal: rule new_networks with its row''s parameters (the detector''s rule interface)';
REVOKE ALL ON FUNCTION apikey._rule_new_networks(apikey.detection_rules) FROM PUBLIC;

CREATE FUNCTION apikey._rule_volume_spike(r apikey.detection_rules)
RETURNS TABLE (key_id bigint, owner text, network cidr, evidence jsonb, last_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
	SELECT e.key_id, e.owner, e.network, e.evidence,
		   (e.evidence OPERATOR(pg_catalog.->>) 'until')::timestamptz OPERATOR(pg_catalog.+) '1 minute'::interval
	  FROM apikey._rule_volume_spike_eval(r.threshold, r.window_, r.min_calls) e;
$$;
COMMENT ON FUNCTION apikey._rule_volume_spike(apikey.detection_rules)
	IS 'Internal: rule volume_spike with its row''s parameters (the detector''s rule interface)';
REVOKE ALL ON FUNCTION apikey._rule_volume_spike(apikey.detection_rules) FROM PUBLIC;

-------------------------------------------------------------------------------
-- Migrating existing keys (issue 14, items 1-6): keys imported from another
-- system keep verifying by their old hash until their first successful use,
-- which upgrades them to SHA-256 (src/legacy.c).  apikey.legacy_formats
-- says which token shapes are accepted and how they were hashed;
-- apikey.legacy_keys holds each imported key's format, lookup id and
-- pending verifier (never a token).  import_keys()/import_key() bring keys
-- in, legacy_progress shows how far the upgrade went, legacy_retire() ends
-- a format, export_keys() is the way out.
--
-- The shipped formats are data of the extension (apikey.legacy_presets),
-- not rows of legacy_formats: legacy_formats holds only rows that belong
-- to the user (the first import in a preset copies its row there), and is
-- dumped whole.  So everything a user changes in a format (its retirement,
-- a narrower expression) comes back after pg_dump and restore; a preset
-- row left out of the dump would come back as shipped, and a retired
-- format's pending keys would verify again.
-------------------------------------------------------------------------------

CREATE TABLE apikey.legacy_formats (
	name		text PRIMARY KEY
				CONSTRAINT legacy_formats_name_check CHECK (name OPERATOR(pg_catalog.~) '^[a-z][a-z0-9_-]{0,31}$'),
	token_regex	text NOT NULL,
	lookup_regex text,
	algorithm	text NOT NULL
				CONSTRAINT legacy_formats_algorithm_check
				CHECK (algorithm OPERATOR(pg_catalog.=) ANY ('{sha256-hex,sha256-b64,sha512-hex,pbkdf2-sha256,bcrypt,plaintext}'::text[])),
	hash_input	text NOT NULL DEFAULT 'token'
				CONSTRAINT legacy_formats_hash_input_check
				CHECK (hash_input OPERATOR(pg_catalog.=) ANY ('{token,capture}'::text[])),
	params		jsonb NOT NULL DEFAULT '{}',
	accept_until timestamptz,
	CONSTRAINT legacy_formats_salted_lookup
		CHECK (lookup_regex IS NOT NULL OR algorithm OPERATOR(pg_catalog.<>) ALL ('{pbkdf2-sha256,bcrypt}'::text[]))
);
COMMENT ON TABLE apikey.legacy_formats IS 'Token formats of keys imported from another system, and how their old hashes are verified (a format takes part in verification once it has keys)';
COMMENT ON COLUMN apikey.legacy_formats.name IS 'Format name, given to import_keys(); the first import in a preset (apikey.legacy_presets) adds its row';
COMMENT ON COLUMN apikey.legacy_formats.token_regex IS 'Regular expression (anchored, ASCII) a presented token must match to be verified as this format; with hash_input capture, its first group is what was hashed; while the format has keys, the log redactor hides its matches (unanchored, between word boundaries)';
COMMENT ON COLUMN apikey.legacy_formats.lookup_regex IS 'Regular expression whose first group is the key''s lookup id (e.g. DRF''s prefix); required for salted algorithms';
COMMENT ON COLUMN apikey.legacy_formats.algorithm IS 'How the old system hashed: sha256-hex, sha256-b64 (whole token; verified at native speed), sha512-hex, pbkdf2-sha256 (Django), bcrypt (through pgcrypto), plaintext (hashed at import)';
COMMENT ON COLUMN apikey.legacy_formats.hash_input IS 'token: the whole token was hashed; capture: the first group of token_regex was';
COMMENT ON COLUMN apikey.legacy_formats.params IS 'Free-form notes about the format';
COMMENT ON COLUMN apikey.legacy_formats.accept_until IS 'Pending keys of this format verify by their old hash until then; NULL = no end (legacy_retire() sets it)';
REVOKE ALL ON apikey.legacy_formats FROM PUBLIC;
-- every row is the user's (presets are copied in by their first import)
SELECT pg_catalog.pg_extension_config_dump('apikey.legacy_formats', '');

-- A regular expression is checked when it is stored, not at verification.
CREATE FUNCTION apikey._legacy_formats_check() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM '' OPERATOR(pg_catalog.~) NEW.token_regex;
	PERFORM '' OPERATOR(pg_catalog.~) NEW.lookup_regex;
	RETURN NEW;
END
$$;
COMMENT ON FUNCTION apikey._legacy_formats_check()
	IS 'Internal: refuse a legacy format whose regular expressions do not compile';
REVOKE ALL ON FUNCTION apikey._legacy_formats_check() FROM PUBLIC;
CREATE TRIGGER legacy_formats_check BEFORE INSERT OR UPDATE ON apikey.legacy_formats
	FOR EACH ROW EXECUTE FUNCTION apikey._legacy_formats_check();
ALTER TABLE apikey.legacy_formats ENABLE ALWAYS TRIGGER legacy_formats_check;

-- The shipped formats.  Each token_regex is the real shape, no broader
-- (8 and 32 characters for DRF; secrets of 16 or more, lookup ids of 4 or
-- more).  Bounded repetitions ({8}, {16,}) cost the regex engine about
-- 2 us a token and 85 ms on 1 MB of tokens (+: 0.4 us and 17 ms), the
-- same as + on text without tokens (3 ms a MB).
CREATE VIEW apikey.legacy_presets AS
SELECT p.name, p.token_regex, p.lookup_regex, p.algorithm, p.hash_input, p.params::jsonb
  FROM (VALUES
	('sha256', '^[A-Za-z][A-Za-z0-9]*_[A-Za-z0-9]{16,}$', NULL, 'sha256-hex', 'token',
	 '{"note": "whole-token SHA-256, hex or base64 (Unkey''s import format); tokens <prefix>_<secret>, a secret of 16 or more letters and digits"}'),
	('drf', '^[A-Za-z0-9]{8}\.[A-Za-z0-9]{32}$', '^([A-Za-z0-9]{8})\.', 'pbkdf2-sha256', 'token',
	 '{"note": "Django REST Framework API Key: <prefix>.<secret>, 8 and 32 letters and digits, hashed with Django''s pbkdf2_sha256"}'),
	('bcrypt-prefixed', '^[A-Za-z0-9]{4,}\.([A-Za-z0-9_-]{16,})$', '^([A-Za-z0-9]{4,})\.', 'bcrypt', 'capture',
	 '{"note": "<lookup id>.<secret>, at least 4 and 16 characters, bcrypt of the secret (Rails has_secure_password, Node bcrypt)"}'))
	p(name, token_regex, lookup_regex, algorithm, hash_input, params);
COMMENT ON VIEW apikey.legacy_presets IS 'The shipped legacy formats: import_keys() or import_key() in one of these names copies its row into apikey.legacy_formats (unless a row of that name is there), where it is the user''s to change and is dumped';
COMMENT ON COLUMN apikey.legacy_presets.name IS 'Preset name, given to import_keys()';
COMMENT ON COLUMN apikey.legacy_presets.token_regex IS 'As apikey.legacy_formats.token_regex';
COMMENT ON COLUMN apikey.legacy_presets.lookup_regex IS 'As apikey.legacy_formats.lookup_regex';
COMMENT ON COLUMN apikey.legacy_presets.algorithm IS 'As apikey.legacy_formats.algorithm';
COMMENT ON COLUMN apikey.legacy_presets.hash_input IS 'As apikey.legacy_formats.hash_input';
COMMENT ON COLUMN apikey.legacy_presets.params IS 'What the preset is for';
REVOKE ALL ON apikey.legacy_presets FROM PUBLIC;

CREATE TABLE apikey.legacy_keys (
	key_id		bigint PRIMARY KEY REFERENCES apikey.keys (id) ON DELETE CASCADE,
	format		text NOT NULL REFERENCES apikey.legacy_formats (name) ON UPDATE CASCADE,
	lookup		text,
	verifier	text,
	imported_at	timestamptz NOT NULL DEFAULT pg_catalog.now(),
	upgraded_at	timestamptz,
	CONSTRAINT legacy_keys_lookup_key UNIQUE (format, lookup)
);
COMMENT ON TABLE apikey.legacy_keys IS 'Imported keys: their format, lookup id and old verifier until upgraded; readable by the extension owner only';
COMMENT ON COLUMN apikey.legacy_keys.key_id IS 'The key (apikey.keys.id)';
COMMENT ON COLUMN apikey.legacy_keys.format IS 'Its legacy format';
COMMENT ON COLUMN apikey.legacy_keys.lookup IS 'Lookup id from the token (not secret); for unsalted SHA-512 without one, the digest';
COMMENT ON COLUMN apikey.legacy_keys.verifier IS 'The old hash, normalised; NULL once the key verifies by SHA-256 (upgraded, imported as SHA-256 or plaintext, or retired)';
COMMENT ON COLUMN apikey.legacy_keys.imported_at IS 'When it was imported';
COMMENT ON COLUMN apikey.legacy_keys.upgraded_at IS 'When keys.hash became SHA-256 of the token (at import for SHA-256 and plaintext imports); NULL = pending or retired';
REVOKE ALL ON apikey.legacy_keys FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('apikey.legacy_keys', '');

-- report_leak() of a token from before apikey: the stored hash of the key
-- it belongs to (src/legacy.c), found as a verification would find it.
CREATE FUNCTION apikey._legacy_hash(token text) RETURNS bytea
AS 'MODULE_PATHNAME', 'apikey_legacy_hash_sql'
LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION apikey._legacy_hash(text)
	IS 'Internal: keys.hash of the imported key a legacy token belongs to (by its old hash while pending, in a retired format too, without the verification budget), NULL for none';
REVOKE ALL ON FUNCTION apikey._legacy_hash(text) FROM PUBLIC;

CREATE FUNCTION apikey._legacy_formats_changed() RETURNS trigger
AS 'MODULE_PATHNAME', 'apikey_legacy_formats_changed_trigger'
LANGUAGE C;
COMMENT ON FUNCTION apikey._legacy_formats_changed()
	IS 'Internal: statement trigger making every backend read the legacy formats in use again';
REVOKE ALL ON FUNCTION apikey._legacy_formats_changed() FROM PUBLIC;
CREATE TRIGGER legacy_formats_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON apikey.legacy_formats
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._legacy_formats_changed();
CREATE TRIGGER legacy_keys_changed AFTER INSERT OR DELETE OR TRUNCATE ON apikey.legacy_keys
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._legacy_formats_changed();
ALTER TABLE apikey.legacy_formats ENABLE ALWAYS TRIGGER legacy_formats_changed;
ALTER TABLE apikey.legacy_keys ENABLE ALWAYS TRIGGER legacy_keys_changed;

-- One row of import_keys(), checked and normalised (nothing written yet);
-- raises with a specific SQLSTATE.  Runs as the extension owner (called by
-- the SECURITY DEFINER functions).
CREATE FUNCTION apikey._import_check(f apikey.legacy_formats, r jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $import$
DECLARE
	v_hash bytea;
	v_plain text := r OPERATOR(pg_catalog.->>) 'plaintext';
	v_given text := r OPERATOR(pg_catalog.->>) 'hash';
	v_lookup text := r OPERATOR(pg_catalog.->>) 'lookup';
	v_verifier text;
	v_m text[];
	v_scopes text[];
	v_quota bigint;
	v_rate_limit integer;
	v_rate_window interval;
	v_refill interval;
	v_cidrs cidr[];
BEGIN
	IF pg_catalog.jsonb_typeof(r) IS DISTINCT FROM 'object' THEN
		RAISE EXCEPTION 'each row must be a JSON object' USING ERRCODE = '22023';
	END IF;
	IF (v_plain IS NULL) OPERATOR(pg_catalog.=) (v_given IS NULL) THEN
		RAISE EXCEPTION 'a row carries either hash or plaintext'
			USING ERRCODE = '22023', HINT = 'Give "hash" (the old hash) or "plaintext" (hashed at once, never stored).';
	END IF;
	IF COALESCE(r OPERATOR(pg_catalog.->>) 'owner', '') OPERATOR(pg_catalog.=) '' THEN
		RAISE EXCEPTION 'owner must not be NULL or empty' USING ERRCODE = '22004';
	END IF;

	IF v_plain IS NOT NULL THEN
		IF NOT v_plain OPERATOR(pg_catalog.~) f.token_regex THEN
			RAISE EXCEPTION 'plaintext does not match the token_regex of format "%"', f.name
				USING ERRCODE = '22023', HINT = 'Only tokens of the format''s shape are verified as legacy tokens.';
		END IF;
		v_hash := pg_catalog.sha256(pg_catalog.convert_to(v_plain, 'UTF8'));
		IF f.lookup_regex IS NOT NULL THEN
			v_lookup := (pg_catalog.regexp_match(v_plain, f.lookup_regex))[1];
		END IF;
	ELSIF f.algorithm OPERATOR(pg_catalog.=) ANY ('{sha256-hex,sha256-b64}'::text[]) THEN
		-- (lengths apart: a bounded repetition costs PostgreSQL's regex engine
		-- milliseconds per row)
		IF pg_catalog.length(v_given) OPERATOR(pg_catalog.=) 64 AND v_given OPERATOR(pg_catalog.~) '^[0-9A-Fa-f]+$' THEN
			v_hash := pg_catalog.decode(v_given, 'hex');
		ELSIF pg_catalog.length(v_given) OPERATOR(pg_catalog.=) 44 AND v_given OPERATOR(pg_catalog.~) '^[A-Za-z0-9+/]+=$' THEN
			v_hash := pg_catalog.decode(v_given, 'base64');
		ELSE
			RAISE EXCEPTION 'hash is not a SHA-256 digest in hex or base64'
				USING ERRCODE = '22023', HINT = 'Give 64 hex digits or 44 base64 characters.';
		END IF;
	ELSIF f.algorithm OPERATOR(pg_catalog.=) 'plaintext' THEN
		RAISE EXCEPTION 'format "%" takes plaintext rows only', f.name USING ERRCODE = '22023';
	ELSE
		IF f.algorithm OPERATOR(pg_catalog.=) 'sha512-hex' THEN
			v_m := pg_catalog.regexp_match(v_given, '^(?:sha512\$\$)?([0-9A-Fa-f]+)$');
			IF pg_catalog.length(v_m[1]) OPERATOR(pg_catalog.=) 128 THEN
				v_verifier := pg_catalog.lower(v_m[1]);
			END IF;
			IF f.lookup_regex IS NULL THEN
				v_lookup := v_verifier;
			END IF;
		ELSIF f.algorithm OPERATOR(pg_catalog.=) 'pbkdf2-sha256' THEN
			v_m := pg_catalog.regexp_match(v_given, '^pbkdf2_sha256\$([0-9]+)\$([^$]+)\$([A-Za-z0-9+/]+=)$');
			IF v_m IS NOT NULL AND pg_catalog.length(v_m[1]) OPERATOR(pg_catalog.<=) 8
			   AND pg_catalog.length(v_m[2]) OPERATOR(pg_catalog.<=) 255 AND pg_catalog.length(v_m[3]) OPERATOR(pg_catalog.=) 44
			   AND v_m[1]::integer OPERATOR(pg_catalog.>=) 1
			   AND v_m[1]::integer OPERATOR(pg_catalog.<=) 10000000 THEN
				v_verifier := v_m[1] OPERATOR(pg_catalog.||) '$' OPERATOR(pg_catalog.||) v_m[2]
					OPERATOR(pg_catalog.||) '$' OPERATOR(pg_catalog.||)
					pg_catalog.encode(pg_catalog.decode(v_m[3], 'base64'), 'hex');
			END IF;
		ELSE
			-- cost at most 16: pgcrypto's bcrypt cannot be interrupted, and
			-- cost 31 would hold a backend for days on one verification
			IF pg_catalog.length(v_given) OPERATOR(pg_catalog.=) 60
			   AND v_given OPERATOR(pg_catalog.~) '^\$2[abxy]\$[0-9][0-9]\$[./A-Za-z0-9]+$'
			   AND pg_catalog.substr(v_given, 5, 2)::integer OPERATOR(pg_catalog.<=) 16 THEN
				v_verifier := v_given;
			END IF;
		END IF;
		IF v_verifier IS NULL THEN
			RAISE EXCEPTION 'hash is not a % hash', f.algorithm
				USING ERRCODE = '22023',
					  HINT = CASE f.algorithm WHEN 'sha512-hex' THEN 'Give 128 hex digits, optionally after sha512$$.'
							 WHEN 'pbkdf2-sha256' THEN 'Give Django''s form pbkdf2_sha256$<iterations>$<salt>$<base64>, at most 10,000,000 iterations.'
							 ELSE 'Give a bcrypt hash: $2b$<cost, at most 16>$<53 characters>.' END;
		END IF;
		-- a placeholder no token hashes to, until the first use upgrades it
		v_hash := pg_catalog.sha256(pg_catalog.convert_to(
			pg_catalog.gen_random_uuid()::text OPERATOR(pg_catalog.||) pg_catalog.gen_random_uuid()::text, 'UTF8'));
	END IF;
	IF v_lookup IS NULL AND v_verifier IS NOT NULL THEN
		RAISE EXCEPTION 'a % key needs a lookup id', f.algorithm
			USING ERRCODE = '22023',
				  HINT = 'Give "lookup" (e.g. the DRF prefix): without one each verification would hash once per key.';
	END IF;

	-- (each check only when the row has the field: 100k rows in seconds)
	IF r OPERATOR(pg_catalog.?) 'scopes' THEN
		v_scopes := apikey._check_scopes(ARRAY(SELECT pg_catalog.jsonb_array_elements_text(r OPERATOR(pg_catalog.->) 'scopes')));
	END IF;
	v_rate_window := '1 minute';
	IF r OPERATOR(pg_catalog.?|) '{rate_limit,rate_window,quota,quota_refill}'::text[] THEN
		v_rate_limit := (r OPERATOR(pg_catalog.->>) 'rate_limit')::integer;
		v_rate_window := COALESCE((r OPERATOR(pg_catalog.->>) 'rate_window')::interval, '1 minute');
		v_quota := (r OPERATOR(pg_catalog.->>) 'quota')::bigint;
		v_refill := (r OPERATOR(pg_catalog.->>) 'quota_refill')::interval;
		PERFORM apikey._check_limits(v_rate_limit, v_rate_window, v_quota, v_refill);
	END IF;
	IF r OPERATOR(pg_catalog.?) 'allowed_cidrs' THEN
		v_cidrs := ARRAY(SELECT pg_catalog.jsonb_array_elements_text(r OPERATOR(pg_catalog.->) 'allowed_cidrs'))::cidr[];
		IF pg_catalog.cardinality(v_cidrs) OPERATOR(pg_catalog.=) 0 THEN
			v_cidrs := NULL;
		END IF;
	END IF;

	RETURN pg_catalog.jsonb_build_object(
		'owner', r OPERATOR(pg_catalog.->>) 'owner', 'name', r OPERATOR(pg_catalog.->>) 'name',
		-- a lookup id only where the format has one (a DRF prefix): for an
		-- unsalted format the "lookup" is the token's digest, never shown
		'hint', COALESCE(CASE WHEN f.lookup_regex IS NOT NULL THEN v_lookup END OPERATOR(pg_catalog.||) '...',
						 f.name OPERATOR(pg_catalog.||) '...')
				OPERATOR(pg_catalog.||) COALESCE(pg_catalog.right(v_plain, 4), ''),
		'hash', pg_catalog.encode(v_hash, 'hex'), 'lookup', v_lookup, 'verifier', v_verifier,
		'created_at', COALESCE((r OPERATOR(pg_catalog.->>) 'created_at')::timestamptz, pg_catalog.now()),
		'expires_at', (r OPERATOR(pg_catalog.->>) 'expires_at')::timestamptz,
		'metadata', COALESCE(r OPERATOR(pg_catalog.->) 'metadata', '{}'),
		'last_used_at', (r OPERATOR(pg_catalog.->>) 'last_used_at')::timestamptz,
		'rate_limit', v_rate_limit, 'rate_window', v_rate_window, 'quota', v_quota, 'quota_refill', v_refill,
		'allowed_cidrs', pg_catalog.to_jsonb(v_cidrs), 'scopes', COALESCE(pg_catalog.to_jsonb(v_scopes), '[]'));
END
$import$;
COMMENT ON FUNCTION apikey._import_check(apikey.legacy_formats, jsonb)
	IS 'Internal: check and normalise one row of import_keys(); raises on a bad row';
REVOKE ALL ON FUNCTION apikey._import_check(apikey.legacy_formats, jsonb) FROM PUBLIC;

-- Write the checked rows of one call in a few statements (a statement per
-- row would cost a relcache invalidation each).  A row whose hash or lookup
-- id is taken, by a key or by an earlier row, gets 23505 instead; a row
-- that would take its owner past max_keys (live keys and earlier live
-- rows; the owner's row locked first, in owner order, as issue() does)
-- gets 53400.
CREATE FUNCTION apikey._import_write(f apikey.legacy_formats, checked jsonb[], ords integer[])
RETURNS TABLE (ordinal integer, key_id bigint, error text)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	-- ids are drawn first, so each row knows its key without a join
	v_seq regclass := pg_catalog.pg_get_serial_sequence('apikey.keys', 'id')::regclass;
	v_owners text[] := ARRAY(SELECT DISTINCT e OPERATOR(pg_catalog.->>) 'owner' FROM pg_catalog.unnest(checked) e);
BEGIN
	PERFORM FROM apikey.owners o
	 WHERE o.owner OPERATOR(pg_catalog.=) ANY (v_owners) AND o.max_keys IS NOT NULL
	 ORDER BY o.owner FOR NO KEY UPDATE OF o;
	RETURN QUERY
	WITH src AS (
		SELECT u.ord, u.e, pg_catalog.decode(u.e OPERATOR(pg_catalog.->>) 'hash', 'hex') AS hash,
			   u.e OPERATOR(pg_catalog.->>) 'lookup' AS lookup
		  FROM ROWS FROM (pg_catalog.unnest(checked), pg_catalog.unnest(ords)) u(e, ord)),
	judged AS (
		SELECT s.*,
			   CASE WHEN pg_catalog.row_number() OVER (PARTITION BY s.hash ORDER BY s.ord) OPERATOR(pg_catalog.>) 1
						 OR EXISTS (SELECT FROM apikey.keys k WHERE k.hash OPERATOR(pg_catalog.=) s.hash)
					THEN '23505: a key with this hash already exists'
					WHEN s.lookup IS NOT NULL
						 AND (pg_catalog.row_number() OVER (PARTITION BY s.lookup ORDER BY s.ord) OPERATOR(pg_catalog.>) 1
							  OR EXISTS (SELECT FROM apikey.legacy_keys l WHERE l.format OPERATOR(pg_catalog.=) f.name
											AND l.lookup OPERATOR(pg_catalog.=) s.lookup))
					THEN CASE WHEN f.lookup_regex IS NULL THEN '23505: a key with this hash already exists'
							  ELSE '23505: the lookup id is already used by a key of format "'
								   OPERATOR(pg_catalog.||) f.name OPERATOR(pg_catalog.||) '"' END
			   END AS error,
			   s.e OPERATOR(pg_catalog.->>) 'owner' AS owner,
			   COALESCE((s.e OPERATOR(pg_catalog.->>) 'expires_at')::timestamptz OPERATOR(pg_catalog.>) pg_catalog.now(),
						true) AS live
		  FROM src s),
	capped AS (
		SELECT o.owner, o.max_keys,
			   (SELECT pg_catalog.count(*) FROM apikey.keys k
				 WHERE k.owner OPERATOR(pg_catalog.=) o.owner
				   AND (k.expires_at IS NULL OR k.expires_at OPERATOR(pg_catalog.>) pg_catalog.now())
				   AND NOT EXISTS (SELECT FROM apikey.revocations r
									WHERE r.key_id OPERATOR(pg_catalog.=) k.id)) AS held
		  FROM apikey.owners o
		 WHERE o.owner OPERATOR(pg_catalog.=) ANY (v_owners) AND o.max_keys IS NOT NULL),
	admitted AS (
		SELECT j.ord, j.e, j.hash, j.lookup,
			   CASE WHEN j.error IS NOT NULL THEN j.error
					WHEN c.max_keys IS NOT NULL AND j.live
						 AND c.held OPERATOR(pg_catalog.+) pg_catalog.count(*) FILTER (WHERE j.error IS NULL AND j.live)
							 OVER (PARTITION BY j.owner ORDER BY j.ord) OPERATOR(pg_catalog.>) c.max_keys
					THEN '53400: owner "' OPERATOR(pg_catalog.||) j.owner OPERATOR(pg_catalog.||) '" may hold at most '
						 OPERATOR(pg_catalog.||) c.max_keys OPERATOR(pg_catalog.||) ' live keys'
			   END AS error
		  FROM judged j LEFT JOIN capped c ON c.owner OPERATOR(pg_catalog.=) j.owner),
	m AS (SELECT j.*, pg_catalog.nextval(v_seq) AS id FROM admitted j WHERE j.error IS NULL ORDER BY j.ord),
	ins AS (
		INSERT INTO apikey.keys (id, owner, name, prefix, hint, hash, created_at, created_by, expires_at, metadata,
								 last_used_at, rate_limit, rate_window, quota, quota_refill, allowed_cidrs)
		SELECT j.id, j.e OPERATOR(pg_catalog.->>) 'owner', j.e OPERATOR(pg_catalog.->>) 'name', f.name,
			   j.e OPERATOR(pg_catalog.->>) 'hint', j.hash,
			   (j.e OPERATOR(pg_catalog.->>) 'created_at')::timestamptz, apikey._acting_role(),
			   (j.e OPERATOR(pg_catalog.->>) 'expires_at')::timestamptz, j.e OPERATOR(pg_catalog.->) 'metadata',
			   (j.e OPERATOR(pg_catalog.->>) 'last_used_at')::timestamptz,
			   (j.e OPERATOR(pg_catalog.->>) 'rate_limit')::integer,
			   (j.e OPERATOR(pg_catalog.->>) 'rate_window')::interval,
			   (j.e OPERATOR(pg_catalog.->>) 'quota')::bigint,
			   (j.e OPERATOR(pg_catalog.->>) 'quota_refill')::interval,
			   (SELECT pg_catalog.array_agg(c::cidr)
				  FROM pg_catalog.jsonb_array_elements_text(NULLIF(j.e OPERATOR(pg_catalog.->) 'allowed_cidrs', 'null')) c)
		  FROM m j ORDER BY j.ord),
	sc AS (INSERT INTO apikey.key_scopes (key_id, scope)
		   SELECT m.id, x FROM m, pg_catalog.jsonb_array_elements_text(m.e OPERATOR(pg_catalog.->) 'scopes') x),
	qu AS (INSERT INTO apikey.quotas (key_id, remaining)
		   SELECT m.id, (m.e OPERATOR(pg_catalog.->>) 'quota')::bigint FROM m
			WHERE m.e OPERATOR(pg_catalog.->>) 'quota' IS NOT NULL),
	lk AS (INSERT INTO apikey.legacy_keys (key_id, format, lookup, verifier, upgraded_at)
		   SELECT m.id, f.name, m.lookup, m.e OPERATOR(pg_catalog.->>) 'verifier',
				  CASE WHEN m.e OPERATOR(pg_catalog.->>) 'verifier' IS NULL THEN pg_catalog.now() END
			 FROM m)
	SELECT j.ord, m.id, j.error FROM admitted j LEFT JOIN m ON m.ord OPERATOR(pg_catalog.=) j.ord ORDER BY j.ord;
END
$$;
COMMENT ON FUNCTION apikey._import_write(apikey.legacy_formats, jsonb[], integer[])
	IS 'Internal: write the checked rows of an import in a few statements; a duplicate hash or lookup id gets 23505, a row past its owner''s max_keys 53400';
REVOKE ALL ON FUNCTION apikey._import_write(apikey.legacy_formats, jsonb[], integer[]) FROM PUBLIC;

-- The format a call imports in, or a clear error.  A preset without a row
-- gets its row first, in the caller's transaction: from then on it is the
-- user's (changed, retired and dumped like any other).  Two first imports
-- at once: the second waits for the first's row (READ COMMITTED reads it;
-- REPEATABLE READ raises 40001, as ON CONFLICT does there).
CREATE FUNCTION apikey._legacy_format(format text) RETURNS apikey.legacy_formats
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	f apikey.legacy_formats;
BEGIN
	IF format IS NULL THEN
		RAISE EXCEPTION 'format must not be NULL' USING ERRCODE = '22004';
	END IF;
	SELECT * INTO f FROM apikey.legacy_formats l WHERE l.name OPERATOR(pg_catalog.=) _legacy_format.format;
	IF NOT FOUND THEN
		INSERT INTO apikey.legacy_formats (name, token_regex, lookup_regex, algorithm, hash_input, params)
		SELECT p.name, p.token_regex, p.lookup_regex, p.algorithm, p.hash_input, p.params
		  FROM apikey.legacy_presets p WHERE p.name OPERATOR(pg_catalog.=) _legacy_format.format
		ON CONFLICT (name) DO NOTHING;
		SELECT * INTO f FROM apikey.legacy_formats l WHERE l.name OPERATOR(pg_catalog.=) _legacy_format.format;
	END IF;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'legacy format "%" does not exist', format USING ERRCODE = '42704',
			HINT = 'See apikey.legacy_presets and apikey.legacy_formats; register a format with INSERT INTO apikey.legacy_formats.';
	END IF;
	IF f.algorithm OPERATOR(pg_catalog.=) ANY ('{pbkdf2-sha256,bcrypt}'::text[]) AND f.lookup_regex IS NULL THEN
		RAISE EXCEPTION 'legacy format "%" has a salted algorithm and no lookup_regex', format
			USING ERRCODE = '55000', HINT = 'Set lookup_regex: without a lookup id each verification would hash once per key.';
	END IF;
	IF f.algorithm OPERATOR(pg_catalog.=) 'bcrypt' AND NOT EXISTS
	   (SELECT FROM pg_catalog.pg_extension e WHERE e.extname OPERATOR(pg_catalog.=) 'pgcrypto') THEN
		RAISE EXCEPTION 'bcrypt legacy keys need the pgcrypto extension'
			USING ERRCODE = '0A000', HINT = 'Run CREATE EXTENSION pgcrypto in this database.';
	END IF;
	IF f.accept_until IS NOT NULL AND f.accept_until OPERATOR(pg_catalog.<=) pg_catalog.now() THEN
		RAISE EXCEPTION 'legacy format "%" is retired', format USING ERRCODE = '55000',
			HINT = 'Issue new keys with apikey.issue().';
	END IF;
	RETURN f;
END
$$;
COMMENT ON FUNCTION apikey._legacy_format(text)
	IS 'Internal: the legacy format an import uses (a preset''s row added at its first use), refused if unknown, retired, salted without a lookup id, or bcrypt without pgcrypto';
REVOKE ALL ON FUNCTION apikey._legacy_format(text) FROM PUBLIC;

CREATE FUNCTION apikey.import_keys(format text, rows jsonb)
RETURNS TABLE (ordinal integer, key_id bigint, error text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'import_keys'
AS $$
DECLARE
	f apikey.legacy_formats;
	v_row jsonb;
	v_ord integer;
	v_checked jsonb[] := '{}';
	v_ords integer[] := '{}';
	v_err_ords integer[] := '{}';
	v_errs text[] := '{}';
	w_ords integer[];
	w_ids bigint[];
	w_errs text[];
	v_ok bigint;
BEGIN
	f := apikey._legacy_format(import_keys.format);
	IF pg_catalog.jsonb_typeof(import_keys.rows) IS DISTINCT FROM 'array' THEN
		RAISE EXCEPTION 'rows must be a JSON array of objects' USING ERRCODE = '22023';
	END IF;
	PERFORM apikey._audit_lock();
	-- All rows in one subtransaction; only if one is bad, one per row.
	BEGIN
		SELECT pg_catalog.array_agg(apikey._import_check(f, e.v) ORDER BY e.n), pg_catalog.array_agg(e.n::integer ORDER BY e.n)
		  INTO v_checked, v_ords
		  FROM pg_catalog.jsonb_array_elements(import_keys.rows) WITH ORDINALITY e(v, n);
	EXCEPTION WHEN OTHERS THEN
		v_checked := '{}';
		v_ords := '{}';
		FOR v_row, v_ord IN SELECT e.v, e.n FROM pg_catalog.jsonb_array_elements(import_keys.rows) WITH ORDINALITY e(v, n) LOOP
			BEGIN
				v_checked := pg_catalog.array_append(v_checked, apikey._import_check(f, v_row));
				v_ords := pg_catalog.array_append(v_ords, v_ord);
			EXCEPTION WHEN OTHERS THEN
				v_err_ords := pg_catalog.array_append(v_err_ords, v_ord);
				v_errs := pg_catalog.array_append(v_errs, SQLSTATE OPERATOR(pg_catalog.||) ': ' OPERATOR(pg_catalog.||) SQLERRM);
			END;
		END LOOP;
	END;
	v_checked := COALESCE(v_checked, '{}');
	v_ords := COALESCE(v_ords, '{}');
	SELECT COALESCE(pg_catalog.array_agg(w.ordinal), '{}'), COALESCE(pg_catalog.array_agg(w.key_id), '{}'),
		   COALESCE(pg_catalog.array_agg(w.error), '{}')
	  INTO w_ords, w_ids, w_errs
	  FROM apikey._import_write(f, v_checked, v_ords) w;
	RETURN QUERY
	SELECT u.o, u.k, u.e
	  FROM ROWS FROM (pg_catalog.unnest(w_ords OPERATOR(pg_catalog.||) v_err_ords),
					  pg_catalog.unnest(w_ids),
					  pg_catalog.unnest(w_errs OPERATOR(pg_catalog.||) v_errs)) u(o, k, e)
	 ORDER BY u.o;
	v_ok := (SELECT pg_catalog.count(x) FROM pg_catalog.unnest(w_ids) x);
	PERFORM apikey._audit('import_keys', NULL, NULL, pg_catalog.jsonb_build_object(
		'format', f.name, 'imported', v_ok,
		'failed', pg_catalog.cardinality(w_ids) OPERATOR(pg_catalog.-) v_ok OPERATOR(pg_catalog.+) pg_catalog.cardinality(v_errs)));
END
$$;
COMMENT ON FUNCTION apikey.import_keys(text, jsonb)
	IS 'Import keys from another system: one result row per input row (key_id, or error with its SQLSTATE); the good rows are kept';
REVOKE ALL ON FUNCTION apikey.import_keys(text, jsonb) FROM PUBLIC;

CREATE FUNCTION apikey.import_key(format text, owner text, hash text DEFAULT NULL, plaintext text DEFAULT NULL,
								  lookup text DEFAULT NULL, scopes text[] DEFAULT '{}', name text DEFAULT NULL,
								  expires_at timestamptz DEFAULT NULL, metadata jsonb DEFAULT '{}',
								  rate_limit integer DEFAULT NULL, rate_window interval DEFAULT '1 minute',
								  quota bigint DEFAULT NULL, quota_refill interval DEFAULT NULL,
								  allowed_cidrs cidr[] DEFAULT NULL, created_at timestamptz DEFAULT NULL,
								  last_used_at timestamptz DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'import_key'
AS $$
DECLARE
	f apikey.legacy_formats;
	v_id bigint;
	v_error text;
BEGIN
	f := apikey._legacy_format(import_key.format);
	PERFORM apikey._audit_lock();
	SELECT w.key_id, w.error INTO v_id, v_error FROM apikey._import_write(f, ARRAY[apikey._import_check(f, pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
		'owner', import_key.owner, 'hash', import_key.hash, 'plaintext', import_key.plaintext,
		'lookup', import_key.lookup, 'scopes', pg_catalog.to_jsonb(import_key.scopes), 'name', import_key.name,
		'expires_at', import_key.expires_at, 'metadata', import_key.metadata,
		'rate_limit', import_key.rate_limit, 'rate_window', import_key.rate_window,
		'quota', import_key.quota, 'quota_refill', import_key.quota_refill,
		'allowed_cidrs', pg_catalog.to_jsonb(import_key.allowed_cidrs),
		'created_at', import_key.created_at, 'last_used_at', import_key.last_used_at)))], ARRAY[1]) w;
	IF v_error IS NOT NULL THEN
		RAISE EXCEPTION '%', pg_catalog.substr(v_error, 8) USING ERRCODE = pg_catalog.left(v_error, 5),
			HINT = CASE WHEN v_error LIKE '53400%' THEN 'Revoke keys the owner no longer uses with apikey.revoke(), or raise its max_keys with apikey.set_owner_limits().'
					    ELSE 'Each key is imported once; a duplicate row is refused.' END;
	END IF;
	PERFORM apikey._audit('import_key', v_id, import_key.owner,
		pg_catalog.jsonb_build_object('format', f.name, 'imported', 1));
	RETURN v_id;
END
$$;
COMMENT ON FUNCTION apikey.import_key(text, text, text, text, text, text[], text, timestamptz, jsonb, integer, interval,
									  bigint, interval, cidr[], timestamptz, timestamptz)
	IS 'Import one key from another system (for INSERT ... SELECT from a staging table); raises on a bad row';
REVOKE ALL ON FUNCTION apikey.import_key(text, text, text, text, text, text[], text, timestamptz, jsonb, integer,
										 interval, bigint, interval, cidr[], timestamptz, timestamptz) FROM PUBLIC;

CREATE VIEW apikey.legacy_progress AS
SELECT f.name AS format,
	   pg_catalog.count(l.key_id) FILTER (WHERE l.verifier IS NOT NULL) AS pending,
	   pg_catalog.count(l.key_id) FILTER (WHERE l.upgraded_at IS NOT NULL) AS migrated,
	   pg_catalog.max(l.upgraded_at) AS last_migrated_at,
	   f.accept_until
  FROM apikey.legacy_formats f
  LEFT JOIN apikey.legacy_keys l ON l.format OPERATOR(pg_catalog.=) f.name
 GROUP BY f.name, f.accept_until;
COMMENT ON VIEW apikey.legacy_progress IS 'Per legacy format: keys still verified by their old hash, keys verifying by SHA-256 (upgraded on use, or imported as SHA-256 or plaintext)';
COMMENT ON COLUMN apikey.legacy_progress.format IS 'Legacy format';
COMMENT ON COLUMN apikey.legacy_progress.pending IS 'Keys whose old hash is still stored (not used since the import)';
COMMENT ON COLUMN apikey.legacy_progress.migrated IS 'Keys that verify by SHA-256 of their token';
COMMENT ON COLUMN apikey.legacy_progress.last_migrated_at IS 'Latest upgrade (or import of a SHA-256/plaintext key)';
COMMENT ON COLUMN apikey.legacy_progress.accept_until IS 'When pending keys stop verifying (legacy_retire()); NULL = no end';
REVOKE ALL ON apikey.legacy_progress FROM PUBLIC;

CREATE FUNCTION apikey.legacy_retire(format text, revoke_pending boolean) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'legacy_retire'
AS $$
DECLARE
	v_revoked bigint := 0;
	v_id bigint;
BEGIN
	IF format IS NULL OR revoke_pending IS NULL THEN
		RAISE EXCEPTION 'format and revoke_pending must not be NULL' USING ERRCODE = '22004';
	END IF;
	PERFORM apikey._audit_lock();
	UPDATE apikey.legacy_formats f SET accept_until = pg_catalog.now()
	 WHERE f.name OPERATOR(pg_catalog.=) legacy_retire.format
	   AND (f.accept_until IS NULL OR f.accept_until OPERATOR(pg_catalog.>) pg_catalog.now());
	IF NOT EXISTS (SELECT FROM apikey.legacy_formats f WHERE f.name OPERATOR(pg_catalog.=) legacy_retire.format) THEN
		RAISE EXCEPTION 'legacy format "%" does not exist', format USING ERRCODE = '42704',
			HINT = CASE WHEN EXISTS (SELECT FROM apikey.legacy_presets p WHERE p.name OPERATOR(pg_catalog.=) legacy_retire.format)
						THEN 'A preset gets its row in apikey.legacy_formats at its first import: before that it has no keys to retire.'
						ELSE 'See apikey.legacy_formats.' END;
	END IF;
	IF revoke_pending THEN
		FOR v_id IN SELECT l.key_id FROM apikey.legacy_keys l
					 WHERE l.format OPERATOR(pg_catalog.=) legacy_retire.format AND l.verifier IS NOT NULL
					 ORDER BY l.key_id FOR UPDATE LOOP
			IF apikey._revoke(v_id, 'legacy format ' OPERATOR(pg_catalog.||) format OPERATOR(pg_catalog.||) ' retired') THEN
				v_revoked := v_revoked OPERATOR(pg_catalog.+) 1;
			END IF;
		END LOOP;
		UPDATE apikey.legacy_keys l SET verifier = NULL
		 WHERE l.format OPERATOR(pg_catalog.=) legacy_retire.format AND l.verifier IS NOT NULL;
	END IF;
	PERFORM apikey._audit('legacy_retire', NULL, NULL, pg_catalog.jsonb_build_object(
		'format', format, 'revoke_pending', revoke_pending, 'revoked', v_revoked));
	RETURN v_revoked;
END
$$;
COMMENT ON FUNCTION apikey.legacy_retire(text, boolean)
	IS 'Stop verifying a legacy format''s pending keys by their old hash (upgraded keys keep working); with revoke_pending, revoke them and delete their old hashes; returns the keys revoked';
REVOKE ALL ON FUNCTION apikey.legacy_retire(text, boolean) FROM PUBLIC;

CREATE FUNCTION apikey.export_keys(for_owner text DEFAULT NULL)
RETURNS TABLE (key_id bigint, owner text, hash_b64 text, scopes text[], expires_at timestamptz, metadata jsonb)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET apikey.audit_context = 'export_keys'
AS $$
DECLARE
	v_rows bigint;
BEGIN
	PERFORM apikey._audit_lock();
	RETURN QUERY
	SELECT k.id, k.owner,
		   CASE WHEN l.verifier IS NULL THEN pg_catalog.encode(k.hash, 'base64') END,
		   ARRAY(SELECT ks.scope FROM apikey.key_scopes ks
				  WHERE ks.key_id OPERATOR(pg_catalog.=) k.id ORDER BY ks.scope),
		   k.expires_at, k.metadata
	  FROM apikey.keys k
	  LEFT JOIN apikey.legacy_keys l ON l.key_id OPERATOR(pg_catalog.=) k.id
	 WHERE (export_keys.for_owner IS NULL OR k.owner OPERATOR(pg_catalog.=) export_keys.for_owner)
	   AND NOT EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id OPERATOR(pg_catalog.=) k.id)
	 ORDER BY k.id;
	GET DIAGNOSTICS v_rows = ROW_COUNT;
	PERFORM apikey._audit('export_keys', NULL, export_keys.for_owner,
		pg_catalog.jsonb_build_object('owner', export_keys.for_owner, 'keys', v_rows));
END
$$;
COMMENT ON FUNCTION apikey.export_keys(text)
	IS 'The way out: every unrevoked key (of for_owner, or all) with the SHA-256 of its token in base64, as other systems import it; NULL hash_b64 for a legacy key not yet upgraded';
REVOKE ALL ON FUNCTION apikey.export_keys(text) FROM PUBLIC;

CREATE FUNCTION apikey.legacy_stats(OUT verified bigint, OUT mismatched bigint, OUT refused bigint,
									OUT upgraded bigint, OUT upgrades_deferred bigint, OUT shared boolean)
AS 'MODULE_PATHNAME', 'apikey_legacy_stats'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION apikey.legacy_stats()
	IS 'Legacy verifications since the server started: old hashes that matched, that did not, refused by apikey.legacy_verify_per_second, upgrades done and deferred (read-only, standby); shared false = this backend only (not preloaded)';
REVOKE ALL ON FUNCTION apikey.legacy_stats() FROM PUBLIC;

-- key_status gains the format a key was imported in (last column).
CREATE OR REPLACE VIEW apikey.key_status AS
SELECT k.id AS key_id, k.owner, k.name, k.hint, k.created_at, k.created_by, k.expires_at,
	   k.last_used_at, lin.rotated_from,
	   CASE WHEN r.key_id IS NOT NULL THEN 'revoked'
			WHEN k.expires_at OPERATOR(pg_catalog.<=) pg_catalog.now() THEN 'expired'
			WHEN s.key_id IS NOT NULL THEN 'suspended'
			WHEN q.key_id IS NOT NULL THEN 'quarantined'
			ELSE 'active' END AS status,
	   r.revoked_at, r.reason AS revoked_reason,
	   ARRAY(SELECT ks.scope FROM apikey.key_scopes ks
			  WHERE ks.key_id OPERATOR(pg_catalog.=) k.id ORDER BY ks.scope) AS scopes,
	   (SELECT pg_catalog.max(u.bucket) FROM apikey.usage_log u
		 WHERE u.key_id OPERATOR(pg_catalog.=) k.id AND u.code OPERATOR(pg_catalog.<>) 'valid') AS last_failed_at,
	   (SELECT n.network FROM apikey.key_networks n
		 WHERE n.key_id OPERATOR(pg_catalog.=) k.id
		 ORDER BY n.last_seen DESC, n.calls DESC LIMIT 1) AS last_used_network,
	   COALESCE(l.format, 'apikey') AS format
  FROM apikey.keys k
  LEFT JOIN apikey.revocations r ON r.key_id OPERATOR(pg_catalog.=) k.id
  LEFT JOIN apikey.suspensions s ON s.key_id OPERATOR(pg_catalog.=) k.id
		AND (s.until IS NULL OR s.until OPERATOR(pg_catalog.>) pg_catalog.now())
  LEFT JOIN apikey.quarantines q ON q.key_id OPERATOR(pg_catalog.=) k.id
		AND (q.until IS NULL OR q.until OPERATOR(pg_catalog.>) pg_catalog.now())
  LEFT JOIN apikey.legacy_keys l ON l.key_id OPERATOR(pg_catalog.=) k.id
  LEFT JOIN apikey.key_lineage lin ON lin.key_id OPERATOR(pg_catalog.=) k.id;
COMMENT ON COLUMN apikey.key_status.format
	IS 'apikey for a key issued here, else the legacy format it was imported in (its tokens carry no checksum: secret scanners cannot find them; reissue or rotate)';

INSERT INTO apikey._grant_sets (kind, privilege, object) VALUES
	('admin', 'EXECUTE', 'FUNCTION apikey.import_keys(text, jsonb)'),
	('admin', 'EXECUTE', 'FUNCTION apikey.import_key(text, text, text, text, text, text[], text, timestamptz, jsonb, integer, interval, bigint, interval, cidr[], timestamptz, timestamptz)'),
	('admin', 'EXECUTE', 'FUNCTION apikey.legacy_retire(text, boolean)'),
	('admin', 'EXECUTE', 'FUNCTION apikey.export_keys(text)'),
	('admin', 'SELECT, INSERT, UPDATE, DELETE', 'TABLE apikey.legacy_formats'),
	('admin', 'SELECT', 'TABLE apikey.legacy_presets'),
	('admin', 'SELECT', 'TABLE apikey.legacy_progress'),
	('admin', 'EXECUTE', 'FUNCTION apikey.legacy_stats()'),
	('monitor', 'SELECT', 'TABLE apikey.legacy_progress'),
	('monitor', 'EXECUTE', 'FUNCTION apikey.legacy_stats()');

-------------------------------------------------------------------------------
-- Key lineage (issue 15): apikey.keys no longer references itself.  Its
-- rotation links (rotated_from, budget_key_id) live in apikey.key_lineage,
-- created with "Rotation shares one budget" above, so pg_dump finds no
-- loop among the foreign keys of the tables it dumps and prints no
-- warning.  Here: the cache and audit triggers key_lineage needs now that
-- their functions exist, and the old column, now that nothing reads it.
-------------------------------------------------------------------------------

-- The cache: a key whose budget changes is evicted (and with it every key
-- drawing on it, keycache.c); TRUNCATE empties every cache.  A change of
-- rotated_from alone changes nothing verify() reads.
CREATE TRIGGER key_lineage_changed
	AFTER INSERT OR UPDATE OF key_id, budget_key_id OR DELETE ON apikey.key_lineage
	FOR EACH ROW EXECUTE FUNCTION apikey._key_changed();
CREATE TRIGGER key_lineage_invalidate
	AFTER TRUNCATE ON apikey.key_lineage
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._invalidate();
ALTER TABLE apikey.key_lineage ENABLE ALWAYS TRIGGER key_lineage_changed;
ALTER TABLE apikey.key_lineage ENABLE ALWAYS TRIGGER key_lineage_invalidate;
COMMENT ON FUNCTION apikey._key_changed()
	IS 'Internal: row trigger recording which keys the transaction changed (keys, key_scopes, revocations, suspensions, quarantines, key_lineage); issued keys are not changes';

-- Direct DML on it is recorded like the other key tables'.
SELECT apikey._audit_dml_attach('key_lineage');

-- Copied to key_lineage above; key_status reads it from there.
ALTER TABLE apikey.keys DROP COLUMN rotated_from;

-- Legacy upgrades never lock apikey.keys in the verifying transaction
-- (src/legacyupgrade.c).  A valid use of a pending legacy key only appends
-- a row here, as the extension's owner: no index, no foreign key (its
-- check would lock the key row), nobody updates the rows, so the verifier
-- holds nothing an administrator, the detector or another verifier needs.
-- apikey.flush_usage() and the usage writer apply the rows in their own
-- transaction, skipping key rows someone holds and keys revoked meanwhile.
CREATE TABLE apikey.legacy_upgrade_pending (
	key_id		bigint NOT NULL,
	old_hash	bytea NOT NULL,
	verifier_sha256 bytea NOT NULL,
	new_hash	bytea NOT NULL,
	recorded_at	timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE apikey.legacy_upgrade_pending IS 'Upgrades of legacy keys to SHA-256 recorded by a valid use and not yet applied; apikey.flush_usage() and the usage writer apply them (never the token, only its SHA-256)';
COMMENT ON COLUMN apikey.legacy_upgrade_pending.key_id IS 'The key (apikey.keys.id; no foreign key, whose check would lock the key row)';
COMMENT ON COLUMN apikey.legacy_upgrade_pending.old_hash IS 'keys.hash when the key was verified; the upgrade applies only if it is unchanged';
COMMENT ON COLUMN apikey.legacy_upgrade_pending.verifier_sha256 IS 'SHA-256 of the legacy verifier that matched; the upgrade applies only if it is still the pending one';
COMMENT ON COLUMN apikey.legacy_upgrade_pending.new_hash IS 'SHA-256 of the token, the key''s hash once applied';
COMMENT ON COLUMN apikey.legacy_upgrade_pending.recorded_at IS 'When the use was verified';
SELECT pg_catalog.pg_extension_config_dump('apikey.legacy_upgrade_pending', '');
REVOKE ALL ON apikey.legacy_upgrade_pending FROM PUBLIC;

-------------------------------------------------------------------------------
-- Failures by network stay bounded (src/netwatch.c): the detector's table
-- of failures per client network holds at most 4096 networks; a failure
-- from a network past that is counted here instead of in shared memory.
-------------------------------------------------------------------------------

CREATE FUNCTION apikey._failure_networks_unwatched() RETURNS bigint
AS 'MODULE_PATHNAME', 'apikey_failure_networks_unwatched'
LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._failure_networks_unwatched()
	IS 'Internal: failures from client networks the address_failures rule had no room to count, since the server started (behind apikey.stats.failure_networks_unwatched)';
REVOKE ALL ON FUNCTION apikey._failure_networks_unwatched() FROM PUBLIC;
SELECT apikey._grant_like_stats('apikey._failure_networks_unwatched()');

CREATE OR REPLACE VIEW apikey.stats AS
SELECT s.*, apikey._tokens_redacted() AS tokens_redacted,
	   apikey._failure_networks_untracked() AS failure_networks_untracked,
	   apikey._writer_heartbeat() AS writer_heartbeat,
	   apikey._network_overflow() AS network_overflow,
	   apikey._failure_networks_unwatched() AS failure_networks_unwatched
  FROM apikey._stats() s;
COMMENT ON COLUMN apikey.stats.failure_networks_unwatched
	IS 'Failures (malformed, unknown, address_blocked) not counted for the address_failures rule since the server started: 4096 networks had failures in the last hour';

INSERT INTO apikey._grant_sets (kind, privilege, object) VALUES
	('monitor', 'EXECUTE', 'FUNCTION apikey._failure_networks_unwatched()');

-- Like every later upgrade script: last, re-apply the recorded grants.
SELECT apikey._regrant();
