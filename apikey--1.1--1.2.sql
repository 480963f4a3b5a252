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
-- Reversible responses (issue 12): suspend and resume a key or an owner,
-- quarantine a key to some of its scopes and release it, reissue a key.
-- A row in suspensions or quarantines takes effect at commit in every
-- backend (and on standbys, through WAL): the same cache invalidation as
-- revocations.  A timed one (until) ends by the clock, judged at each call.
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

CREATE TRIGGER suspensions_invalidate
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON apikey.suspensions
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._invalidate();
CREATE TRIGGER quarantines_invalidate
	AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON apikey.quarantines
	FOR EACH STATEMENT EXECUTE FUNCTION apikey._invalidate();
ALTER TABLE apikey.suspensions ENABLE ALWAYS TRIGGER suspensions_invalidate;
ALTER TABLE apikey.quarantines ENABLE ALWAYS TRIGGER quarantines_invalidate;
CREATE TRIGGER suspensions_invalidate_applied
	AFTER INSERT OR UPDATE OR DELETE ON apikey.suspensions
	FOR EACH ROW EXECUTE FUNCTION apikey._invalidate();
CREATE TRIGGER quarantines_invalidate_applied
	AFTER INSERT OR UPDATE OR DELETE ON apikey.quarantines
	FOR EACH ROW EXECUTE FUNCTION apikey._invalidate();
ALTER TABLE apikey.suspensions ENABLE REPLICA TRIGGER suspensions_invalidate_applied;
ALTER TABLE apikey.quarantines ENABLE REPLICA TRIGGER quarantines_invalidate_applied;

-- Arguments every response checks the same way: the key exists (locked
-- against a concurrent response), the reason is given, for_ is positive.
CREATE FUNCTION apikey._response_key(key_id bigint, reason text, for_ interval, what text)
RETURNS apikey.keys
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_key apikey.keys;
BEGIN
	IF _response_key.key_id IS NULL THEN
		RAISE EXCEPTION 'key_id must not be NULL' USING ERRCODE = '22004';
	END IF;
	IF _response_key.reason IS NULL OR _response_key.reason OPERATOR(pg_catalog.!~) '[^[:space:]]' THEN
		RAISE EXCEPTION 'reason must not be empty'
			USING ERRCODE = '22004', HINT = pg_catalog.format('Say why the key is %s, e.g. ''credential stuffing from 203.0.113.7''.', _response_key.what);
	END IF;
	IF _response_key.for_ IS NOT NULL AND _response_key.for_ OPERATOR(pg_catalog.<=) '0'::interval THEN
		RAISE EXCEPTION 'for_ must be a positive interval, got %', _response_key.for_
			USING ERRCODE = '22023', HINT = pg_catalog.format('Pass NULL to keep the key %s until lifted.', _response_key.what);
	END IF;
	SELECT * INTO v_key FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) _response_key.key_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'key % does not exist', _response_key.key_id
			USING ERRCODE = '42704';
	END IF;
	RETURN v_key;
END
$$;
COMMENT ON FUNCTION apikey._response_key(bigint, text, interval, text)
	IS 'Internal: check a response''s arguments and lock the key row (suspend, quarantine)';
REVOKE ALL ON FUNCTION apikey._response_key(bigint, text, interval, text) FROM PUBLIC;

CREATE FUNCTION apikey.suspend(key_id bigint, reason text, for_ interval DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_key apikey.keys;
	v_was boolean;
BEGIN
	v_key := apikey._response_key(suspend.key_id, suspend.reason, suspend.for_, 'suspended');
	v_was := EXISTS (SELECT FROM apikey.suspensions s WHERE s.key_id OPERATOR(pg_catalog.=) v_key.id
						AND (s.until IS NULL OR s.until OPERATOR(pg_catalog.>) pg_catalog.now()));
	INSERT INTO apikey.suspensions AS s (key_id, until, reason, by)
	VALUES (v_key.id, pg_catalog.now() OPERATOR(pg_catalog.+) suspend.for_, suspend.reason,
			apikey._acting_role())
	ON CONFLICT ON CONSTRAINT suspensions_pkey
	DO UPDATE SET since = excluded.since, until = excluded.until, reason = excluded.reason,
				  by = excluded.by, finding_id = NULL;
	RETURN NOT v_was;
END
$$;
COMMENT ON FUNCTION apikey.suspend(bigint, text, interval)
	IS 'Suspend a key: it answers suspended (authenticate raises 28000) from this commit on, for for_ or until resumed; true if it was not suspended (suspending again replaces the suspension)';
REVOKE ALL ON FUNCTION apikey.suspend(bigint, text, interval) FROM PUBLIC;

CREATE FUNCTION apikey.resume(key_id bigint, note text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF resume.key_id IS NULL THEN
		RAISE EXCEPTION 'key_id must not be NULL' USING ERRCODE = '22004';
	END IF;
	PERFORM FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) resume.key_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'key % does not exist', resume.key_id
			USING ERRCODE = '42704';
	END IF;
	IF EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id OPERATOR(pg_catalog.=) resume.key_id) THEN
		RAISE EXCEPTION 'key % is revoked and cannot be resumed', resume.key_id
			USING ERRCODE = '55000', HINT = 'Revocation is permanent: issue a new key with apikey.reissue().';
	END IF;
	DELETE FROM apikey.suspensions s WHERE s.key_id OPERATOR(pg_catalog.=) resume.key_id;
	RETURN FOUND;
END
$$;
COMMENT ON FUNCTION apikey.resume(bigint, text)
	IS 'Lift a key''s suspension from this commit on; true if it was suspended.  A revoked key cannot be resumed';
REVOKE ALL ON FUNCTION apikey.resume(bigint, text) FROM PUBLIC;

CREATE FUNCTION apikey.suspend_owner(owner text, reason text, for_ interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n bigint;
BEGIN
	IF suspend_owner.owner IS NULL OR suspend_owner.owner OPERATOR(pg_catalog.=) '' THEN
		RAISE EXCEPTION 'owner must not be empty' USING ERRCODE = '22023';
	END IF;
	IF suspend_owner.reason IS NULL OR suspend_owner.reason OPERATOR(pg_catalog.!~) '[^[:space:]]' THEN
		RAISE EXCEPTION 'reason must not be empty'
			USING ERRCODE = '22004', HINT = 'Say why the owner''s keys are suspended.';
	END IF;
	IF suspend_owner.for_ IS NOT NULL AND suspend_owner.for_ OPERATOR(pg_catalog.<=) '0'::interval THEN
		RAISE EXCEPTION 'for_ must be a positive interval, got %', suspend_owner.for_
			USING ERRCODE = '22023', HINT = 'Pass NULL to keep the keys suspended until resumed.';
	END IF;
	INSERT INTO apikey.suspensions AS s (key_id, until, reason, by)
	SELECT k.id, pg_catalog.now() OPERATOR(pg_catalog.+) suspend_owner.for_, suspend_owner.reason,
		   apikey._acting_role()
	  FROM apikey.keys k
	 WHERE k.owner OPERATOR(pg_catalog.=) suspend_owner.owner
	   AND NOT EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id OPERATOR(pg_catalog.=) k.id)
	 ORDER BY k.id
	ON CONFLICT ON CONSTRAINT suspensions_pkey
	DO UPDATE SET since = excluded.since, until = excluded.until, reason = excluded.reason,
				  by = excluded.by, finding_id = NULL;
	GET DIAGNOSTICS n = ROW_COUNT;
	RETURN n;
END
$$;
COMMENT ON FUNCTION apikey.suspend_owner(text, text, interval)
	IS 'Suspend every unrevoked key of an owner (keys issued later are not); returns how many';
REVOKE ALL ON FUNCTION apikey.suspend_owner(text, text, interval) FROM PUBLIC;

CREATE FUNCTION apikey.resume_owner(owner text, note text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n bigint;
BEGIN
	IF resume_owner.owner IS NULL OR resume_owner.owner OPERATOR(pg_catalog.=) '' THEN
		RAISE EXCEPTION 'owner must not be empty' USING ERRCODE = '22023';
	END IF;
	DELETE FROM apikey.suspensions s
	 USING apikey.keys k
	 WHERE k.id OPERATOR(pg_catalog.=) s.key_id AND k.owner OPERATOR(pg_catalog.=) resume_owner.owner;
	GET DIAGNOSTICS n = ROW_COUNT;
	RETURN n;
END
$$;
COMMENT ON FUNCTION apikey.resume_owner(text, text)
	IS 'Lift the suspension of every key of an owner; returns how many were suspended (revoked keys stay revoked)';
REVOKE ALL ON FUNCTION apikey.resume_owner(text, text) FROM PUBLIC;

CREATE FUNCTION apikey.quarantine(key_id bigint, allowed_scopes text[], reason text,
								  for_ interval DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_key apikey.keys;
	v_allowed text[];
	v_was boolean;
BEGIN
	v_key := apikey._response_key(quarantine.key_id, quarantine.reason, quarantine.for_, 'quarantined');
	IF quarantine.allowed_scopes IS NULL THEN
		RAISE EXCEPTION 'allowed_scopes must not be NULL'
			USING ERRCODE = '22004', HINT = 'Use apikey.suspend() to stop every scope.';
	END IF;
	IF pg_catalog.cardinality(quarantine.allowed_scopes) OPERATOR(pg_catalog.=) 0 THEN
		RAISE EXCEPTION 'allowed_scopes must not be empty'
			USING ERRCODE = '22023', HINT = 'Use apikey.suspend() to stop every scope.';
	END IF;
	v_allowed := apikey._check_scopes(quarantine.allowed_scopes);
	v_was := EXISTS (SELECT FROM apikey.quarantines q WHERE q.key_id OPERATOR(pg_catalog.=) v_key.id
						AND (q.until IS NULL OR q.until OPERATOR(pg_catalog.>) pg_catalog.now()));
	INSERT INTO apikey.quarantines AS q (key_id, allowed_scopes, until, reason, by)
	VALUES (v_key.id, v_allowed, pg_catalog.now() OPERATOR(pg_catalog.+) quarantine.for_,
			quarantine.reason, apikey._acting_role())
	ON CONFLICT ON CONSTRAINT quarantines_pkey
	DO UPDATE SET allowed_scopes = excluded.allowed_scopes, since = excluded.since,
				  until = excluded.until, reason = excluded.reason, by = excluded.by,
				  finding_id = NULL;
	RETURN NOT v_was;
END
$$;
COMMENT ON FUNCTION apikey.quarantine(bigint, text[], text, interval)
	IS 'Quarantine a key from this commit on: scopes outside allowed_scopes answer quarantined (authenticate raises 42501), the rest keep working; for for_ or until released; true if it was not quarantined';
REVOKE ALL ON FUNCTION apikey.quarantine(bigint, text[], text, interval) FROM PUBLIC;

CREATE FUNCTION apikey.release(key_id bigint)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF release.key_id IS NULL THEN
		RAISE EXCEPTION 'key_id must not be NULL' USING ERRCODE = '22004';
	END IF;
	PERFORM FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) release.key_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'key % does not exist', release.key_id
			USING ERRCODE = '42704';
	END IF;
	DELETE FROM apikey.quarantines q WHERE q.key_id OPERATOR(pg_catalog.=) release.key_id;
	RETURN FOUND;
END
$$;
COMMENT ON FUNCTION apikey.release(bigint)
	IS 'Lift a key''s quarantine from this commit on; true if it was quarantined';
REVOKE ALL ON FUNCTION apikey.release(bigint) FROM PUBLIC;

CREATE FUNCTION apikey.reissue(key_id bigint)
RETURNS SETOF apikey.new_key
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	v_old apikey.keys;
	v_new record;
	v_id bigint;
BEGIN
	IF reissue.key_id IS NULL THEN
		RAISE EXCEPTION 'key_id must not be NULL' USING ERRCODE = '22004';
	END IF;
	SELECT * INTO v_old FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) reissue.key_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'key % does not exist', reissue.key_id
			USING ERRCODE = '42704';
	END IF;
	IF NOT EXISTS (SELECT FROM apikey.revocations r WHERE r.key_id OPERATOR(pg_catalog.=) v_old.id)
	   AND NOT EXISTS (SELECT FROM apikey.suspensions s WHERE s.key_id OPERATOR(pg_catalog.=) v_old.id
						  AND (s.until IS NULL OR s.until OPERATOR(pg_catalog.>) pg_catalog.now()))
	   AND NOT EXISTS (SELECT FROM apikey.quarantines q WHERE q.key_id OPERATOR(pg_catalog.=) v_old.id
						  AND (q.until IS NULL OR q.until OPERATOR(pg_catalog.>) pg_catalog.now())) THEN
		RAISE EXCEPTION 'key % is not revoked, suspended or quarantined', v_old.id
			USING ERRCODE = '55000', HINT = 'Use apikey.rotate() to replace a key in good standing.';
	END IF;
	IF v_old.expires_at IS NOT NULL AND v_old.expires_at OPERATOR(pg_catalog.<=) pg_catalog.now() THEN
		RAISE EXCEPTION 'key % has expired and cannot be reissued', v_old.id
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

	-- the new key starts from the old budget (reissuing never refills it)
	PERFORM apikey._rate_state_copy(b.id, b.hash, v_id, v_new.hash)
	   FROM apikey.keys b
	  WHERE b.id OPERATOR(pg_catalog.=) COALESCE(v_old.budget_key_id, v_old.id);
	IF v_old.quota IS NOT NULL THEN
		INSERT INTO apikey.quotas (key_id, remaining, refilled_at)
		SELECT v_id, q.remaining, q.refilled_at FROM apikey.quotas q
		 WHERE q.key_id OPERATOR(pg_catalog.=) COALESCE(v_old.budget_key_id, v_old.id);
	END IF;

	-- no grace: the old key is revoked in the same transaction
	INSERT INTO apikey.revocations (key_id, revoked_by, reason)
	VALUES (v_old.id, apikey._acting_role(), 'reissued as key ' OPERATOR(pg_catalog.||) v_id)
	ON CONFLICT ON CONSTRAINT revocations_pkey DO NOTHING;

	RETURN NEXT ROW(v_id, v_new.token)::apikey.new_key;
END
$$;
COMMENT ON FUNCTION apikey.reissue(bigint)
	IS 'Replace a revoked, suspended or quarantined key with a new one (same owner, scopes, limits, metadata, remaining quota); the old key is revoked at once, no grace';
REVOKE ALL ON FUNCTION apikey.reissue(bigint) FROM PUBLIC;

CREATE OR REPLACE VIEW apikey.key_status AS
SELECT k.id AS key_id, k.owner, k.name, k.hint, k.created_at, k.created_by, k.expires_at,
	   k.last_used_at, k.rotated_from,
	   CASE WHEN r.key_id IS NOT NULL THEN 'revoked'
			WHEN k.expires_at OPERATOR(pg_catalog.<=) pg_catalog.now() THEN 'expired'
			WHEN s.key_id IS NOT NULL THEN 'suspended'
			WHEN q.key_id IS NOT NULL THEN 'quarantined'
			ELSE 'active' END AS status,
	   r.revoked_at, r.reason AS revoked_reason,
	   ARRAY(SELECT ks.scope FROM apikey.key_scopes ks
			  WHERE ks.key_id OPERATOR(pg_catalog.=) k.id ORDER BY ks.scope) AS scopes
  FROM apikey.keys k
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
-- failures of networks it had no room to track.
-------------------------------------------------------------------------------

DROP VIEW apikey.stats;
DROP FUNCTION apikey._stats();
CREATE FUNCTION apikey._stats(OUT shared_memory boolean, OUT calls jsonb, OUT rate_limited bigint,
							  OUT flushes bigint, OUT flush_errors bigint, OUT flushed_calls bigint,
							  OUT entries_pending bigint, OUT entries_dropped bigint,
							  OUT last_flush timestamptz, OUT failure_networks_untracked bigint)
AS 'MODULE_PATHNAME', 'apikey_stats'
LANGUAGE C VOLATILE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION apikey._stats() IS 'Internal: the live counters behind apikey.stats';
REVOKE ALL ON FUNCTION apikey._stats() FROM PUBLIC;

CREATE VIEW apikey.stats AS SELECT * FROM apikey._stats();
COMMENT ON VIEW apikey.stats IS 'Live counters of this server: calls per verdict code, flushes, pending and dropped entries, networks the failure limiter could not track';
REVOKE ALL ON apikey.stats FROM PUBLIC;
COMMENT ON COLUMN apikey.stats.shared_memory IS 'Whether apikey is preloaded (the other columns are NULL otherwise)';
COMMENT ON COLUMN apikey.stats.calls IS 'Verifications per verdict code since the server started (jsonb)';
COMMENT ON COLUMN apikey.stats.rate_limited IS 'Verifications refused by a rate limit since start';
COMMENT ON COLUMN apikey.stats.flushes IS 'Successful flushes of the usage writer';
COMMENT ON COLUMN apikey.stats.flush_errors IS 'Failed flushes (the counts were kept for the next one)';
COMMENT ON COLUMN apikey.stats.flushed_calls IS 'Verifications written to usage_log';
COMMENT ON COLUMN apikey.stats.entries_pending IS 'Usage counters in shared memory not yet written (all databases)';
COMMENT ON COLUMN apikey.stats.entries_dropped IS 'Counts lost to a full usage table (apikey.usage_max_entries)';
COMMENT ON COLUMN apikey.stats.last_flush IS 'When the writer last flushed; NULL = never';
COMMENT ON COLUMN apikey.stats.failure_networks_untracked IS 'Verifications from a client network the failure limiter had no room to track (apikey.failure_max_networks), so not limited';

-------------------------------------------------------------------------------
-- Throttle (issue 12): a temporary rate limit in shared memory that ends by
-- itself (src/throttle.c).  Active from the caller's commit, on this server
-- only (not replicated; a restart ends it).
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
	SELECT * INTO v_key FROM apikey.keys k WHERE k.id OPERATOR(pg_catalog.=) throttle.key_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'key % does not exist', throttle.key_id
			USING ERRCODE = '42704';
	END IF;
	v_until := pg_catalog.now() OPERATOR(pg_catalog.+) throttle.for_;
	PERFORM apikey._throttle(v_key.id, v_key.hash, throttle.rate_limit, v_until);
	RETURN v_until;
END
$$;
COMMENT ON FUNCTION apikey.throttle(bigint, integer, interval)
	IS 'Limit a key to rate_limit requests a minute (on top of its own limits) from this commit until for_ has passed, on this server; returns the end';
REVOKE ALL ON FUNCTION apikey.throttle(bigint, integer, interval) FROM PUBLIC;
