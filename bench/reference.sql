-- bench/reference.sql: the hand-written key check apikey is compared with.
--
-- This is how an application typically verifies API keys without apikey:
-- the SHA-256 of the presented token (pgcrypto's digest()), one lookup
-- through a unique index on the hash column, then the revocation, expiry
-- and scope checks in PL/pgSQL.  It does strictly less than apikey.verify:
-- no token format/checksum check, no usage counting, no rate limits, no
-- quotas, no address allowlists, no cache invalidation protocol.
--
-- ref.verify is the plain function; ref.verify_secdef is the same body as a
-- SECURITY DEFINER function with a pinned search_path, the usual deployment.
--
-- It lives in its own schema with its own copy of the keys; ref.copy_keys()
-- fills it from apikey.keys (the hashes are the same SHA-256 of the whole
-- token, so the same tokens verify in both).  Needs pgcrypto.

SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pgcrypto;

DROP SCHEMA IF EXISTS ref CASCADE;
CREATE SCHEMA ref;

CREATE TABLE ref.keys (
	id			bigint PRIMARY KEY,
	owner		text NOT NULL,
	hash		bytea NOT NULL UNIQUE,
	scopes		text[] NOT NULL DEFAULT '{}',
	expires_at	timestamptz,
	revoked_at	timestamptz
);

-- true when the token belongs to a live key that holds the scope
-- (No SET search_path clause: it would save and restore a setting on every
-- call and make the reference slower than a careful hand-written check.)
CREATE FUNCTION ref.verify(p_token text, p_scope text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
DECLARE
	k ref.keys;
BEGIN
	SELECT * INTO k FROM ref.keys WHERE hash = public.digest(p_token, 'sha256');
	IF NOT FOUND THEN
		RETURN false;
	END IF;
	IF k.revoked_at IS NOT NULL THEN
		RETURN false;
	END IF;
	IF k.expires_at IS NOT NULL AND k.expires_at <= now() THEN
		RETURN false;
	END IF;
	IF p_scope IS NOT NULL AND NOT p_scope = ANY (k.scopes) THEN
		RETURN false;
	END IF;
	RETURN true;
END
$$;

-- copy every key of apikey.keys (owner, hash, scopes, expiry, revocation)
CREATE FUNCTION ref.copy_keys() RETURNS bigint
LANGUAGE sql
AS $$
	INSERT INTO ref.keys (id, owner, hash, scopes, expires_at, revoked_at)
	SELECT k.id, k.owner, k.hash,
		   coalesce((SELECT array_agg(s.scope ORDER BY s.scope)
					 FROM apikey.key_scopes s WHERE s.key_id = k.id), '{}'),
		   k.expires_at, r.revoked_at
	  FROM apikey.keys k
	  LEFT JOIN apikey.revocations r ON r.key_id = k.id
	ON CONFLICT (id) DO NOTHING;
	ANALYZE ref.keys;
	SELECT count(*) FROM ref.keys;
$$;

-- The same check as it is usually deployed: SECURITY DEFINER, so the
-- application role needs no access to ref.keys, with the pinned search_path
-- the PostgreSQL documentation asks of such functions.
CREATE FUNCTION ref.verify_secdef(p_token text, p_scope text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	k ref.keys;
BEGIN
	SELECT * INTO k FROM ref.keys WHERE hash = public.digest(p_token, 'sha256');
	IF NOT FOUND THEN
		RETURN false;
	END IF;
	IF k.revoked_at IS NOT NULL THEN
		RETURN false;
	END IF;
	IF k.expires_at IS NOT NULL AND k.expires_at <= now() THEN
		RETURN false;
	END IF;
	IF p_scope IS NOT NULL AND NOT p_scope = ANY (k.scopes) THEN
		RETURN false;
	END IF;
	RETURN true;
END
$$;
