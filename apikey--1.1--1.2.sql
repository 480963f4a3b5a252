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
-------------------------------------------------------------------------------

ALTER TABLE apikey.keys ADD COLUMN budget_key_id bigint REFERENCES apikey.keys (id) ON DELETE SET NULL;
COMMENT ON COLUMN apikey.keys.budget_key_id IS 'Set by rotate() on the old key: the key whose rate limit and quota it draws on during its grace period; NULL = its own';
CREATE INDEX keys_budget_key_id_idx ON apikey.keys (budget_key_id) WHERE budget_key_id IS NOT NULL;

CREATE FUNCTION apikey._rate_state_copy(from_id bigint, from_hash bytea, to_id bigint, to_hash bytea)
RETURNS void
AS 'MODULE_PATHNAME', 'apikey_rate_state_copy'
LANGUAGE C VOLATILE PARALLEL UNSAFE;
COMMENT ON FUNCTION apikey._rate_state_copy(bigint, bytea, bigint, bytea)
	IS 'Internal: start a new key''s rate-limit bucket where another key''s stands (rotate)';
REVOKE ALL ON FUNCTION apikey._rate_state_copy(bigint, bytea, bigint, bytea) FROM PUBLIC;

CREATE OR REPLACE FUNCTION apikey.rotate(key_id bigint, grace interval DEFAULT '1 day')
RETURNS SETOF apikey.new_key
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_old apikey.keys;
	v_new record;
	v_id bigint;
BEGIN
	IF rotate.key_id IS NULL THEN
		RAISE EXCEPTION 'key_id must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF rotate.grace IS NULL OR rotate.grace OPERATOR(pg_catalog.<) '0'::interval THEN
		RAISE EXCEPTION 'grace must be a non-negative interval'
			USING ERRCODE = '22023';
	END IF;
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

	v_new := apikey._new_token(v_old.prefix);
	INSERT INTO apikey.keys (owner, name, prefix, hint, hash, created_by, expires_at, metadata,
							 rotated_from, rate_limit, rate_window, quota, quota_refill, allowed_cidrs)
	VALUES (v_old.owner, v_old.name, v_old.prefix, v_new.hint, v_new.hash, apikey._acting_role(),
			v_old.expires_at, v_old.metadata, v_old.id, v_old.rate_limit, v_old.rate_window,
			v_old.quota, v_old.quota_refill, v_old.allowed_cidrs)
	RETURNING apikey.keys.id INTO v_id;

	INSERT INTO apikey.key_scopes (key_id, scope)
	SELECT v_id, ks.scope FROM apikey.key_scopes ks WHERE ks.key_id OPERATOR(pg_catalog.=) v_old.id;

	-- the rate-limit bucket and the quota move to the new key; the old one
	-- draws on them from now on
	PERFORM apikey._rate_state_copy(b.id, b.hash, v_id, v_new.hash)
	   FROM apikey.keys b
	  WHERE b.id OPERATOR(pg_catalog.=) COALESCE(v_old.budget_key_id, v_old.id);
	IF v_old.quota IS NOT NULL THEN
		INSERT INTO apikey.quotas (key_id, remaining, refilled_at)
		SELECT v_id, q.remaining, q.refilled_at FROM apikey.quotas q
		 WHERE q.key_id OPERATOR(pg_catalog.=) COALESCE(v_old.budget_key_id, v_old.id);
	END IF;
	DELETE FROM apikey.quotas q WHERE q.key_id OPERATOR(pg_catalog.=) v_old.id;

	-- the old key (and keys still in grace from earlier rotations of it)
	-- share the new key's budget, and the old one expires after grace
	UPDATE apikey.keys k
	   SET budget_key_id = v_id,
		   expires_at = CASE WHEN k.id OPERATOR(pg_catalog.=) v_old.id
							 THEN LEAST(COALESCE(k.expires_at, 'infinity'),
										pg_catalog.now() OPERATOR(pg_catalog.+) rotate.grace)
							 ELSE k.expires_at END
	 WHERE k.id OPERATOR(pg_catalog.=) v_old.id OR k.budget_key_id OPERATOR(pg_catalog.=) v_old.id;

	RETURN NEXT ROW(v_id, v_new.token)::apikey.new_key;
END
$$;
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
					allowed_cidrs, budget_key_id
	   OR DELETE OR TRUNCATE ON apikey.keys
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._invalidate();
ALTER TABLE apikey.keys ENABLE ALWAYS TRIGGER keys_invalidate;
ALTER TABLE apikey.key_scopes ENABLE ALWAYS TRIGGER key_scopes_invalidate;
ALTER TABLE apikey.revocations ENABLE ALWAYS TRIGGER revocations_invalidate;
ALTER TABLE apikey.scopes ENABLE ALWAYS TRIGGER scopes_invalidate;

CREATE TRIGGER keys_invalidate_applied
	AFTER UPDATE OF id, owner, hash, expires_at, rate_limit, rate_window, quota, quota_refill,
					allowed_cidrs, budget_key_id
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
-- fails to serialize.  apikey.flush_usage() (and the usage writer, in
-- apikey.database) folds these rows into usage_log and keys.last_used_at;
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
	IS 'Write this database''s pending usage to apikey.usage_log now (in apikey.database: have the usage writer do it, and wait); returns rows written';
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
-- Issuing as fast as a hand-written INSERT (issue 11).  issue() and the
-- argument checks it shares with set_limits() are C now (src/issue.c):
-- the same arguments, errors and privileges, without a query per check,
-- and a key without scopes or quota writes apikey.keys only.
-- issue_many() issues one key per owner with the settings checked once
-- and one INSERT per table for the whole batch.
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
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION apikey.issue_many(owners text[], scopes text[] DEFAULT '{}', name text DEFAULT NULL,
								  expires_at timestamptz DEFAULT NULL, prefix text DEFAULT 'ak',
								  metadata jsonb DEFAULT '{}', rate_limit integer DEFAULT NULL,
								  rate_window interval DEFAULT '1 minute', quota bigint DEFAULT NULL,
								  quota_refill interval DEFAULT NULL, allowed_cidrs cidr[] DEFAULT NULL)
RETURNS SETOF apikey.new_key
AS 'MODULE_PATHNAME', 'apikey_issue_many'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION apikey.issue_many(text[], text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[])
	IS 'Issue one key per element of owners (at most 10000), all with the same settings; the tokens are shown once and never stored';
REVOKE ALL ON FUNCTION apikey.issue_many(text[], text[], text, timestamptz, text, jsonb, integer, interval, bigint, interval, cidr[]) FROM PUBLIC;
