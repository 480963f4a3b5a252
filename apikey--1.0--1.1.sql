/* apikey--1.0--1.1.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION apikey UPDATE TO '1.1'" to load this file. \quit

-- Incident response: revoke every live key of one owner at once.
CREATE FUNCTION apikey.revoke_owner(owner text, reason text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	n bigint;
BEGIN
	IF revoke_owner.owner IS NULL OR revoke_owner.owner OPERATOR(pg_catalog.=) '' THEN
		RAISE EXCEPTION 'owner must not be empty'
			USING ERRCODE = '22023';
	END IF;
	INSERT INTO apikey.revocations (key_id, revoked_by, reason)
	SELECT k.id, apikey._acting_role(), revoke_owner.reason
	  FROM apikey.keys k
	 WHERE k.owner OPERATOR(pg_catalog.=) revoke_owner.owner
	ON CONFLICT ON CONSTRAINT revocations_pkey DO NOTHING;
	GET DIAGNOSTICS n = ROW_COUNT;
	RETURN n;
END
$$;
COMMENT ON FUNCTION apikey.revoke_owner(text, text)
	IS 'Revoke every key of an owner; returns how many were revoked by this call';
REVOKE ALL ON FUNCTION apikey.revoke_owner(text, text) FROM PUBLIC;

-- One row per key with its state, for administrators (no hash).
CREATE VIEW apikey.key_status AS
SELECT k.id AS key_id, k.owner, k.name, k.hint, k.created_at, k.created_by, k.expires_at,
	   k.last_used_at, k.rotated_from,
	   CASE WHEN r.key_id IS NOT NULL THEN 'revoked'
			WHEN k.expires_at OPERATOR(pg_catalog.<=) pg_catalog.now() THEN 'expired'
			ELSE 'active' END AS status,
	   r.revoked_at, r.reason AS revoked_reason,
	   ARRAY(SELECT s.scope FROM apikey.key_scopes s
			  WHERE s.key_id OPERATOR(pg_catalog.=) k.id ORDER BY s.scope) AS scopes
  FROM apikey.keys k
  LEFT JOIN apikey.revocations r ON r.key_id OPERATOR(pg_catalog.=) k.id;
COMMENT ON VIEW apikey.key_status IS 'Every key with its status (active, revoked, expired) and scopes; no hashes';
REVOKE ALL ON apikey.key_status FROM PUBLIC;

-- This backend's key cache, to see it work (and size apikey.cache_size).
CREATE FUNCTION apikey.cache_stats(OUT entries bigint, OUT capacity integer, OUT hits bigint,
								   OUT misses bigint, OUT evictions bigint, OUT invalidations bigint)
AS 'MODULE_PATHNAME', 'apikey_cache_stats'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION apikey.cache_stats()
	IS 'This backend''s key cache: entries, capacity (apikey.cache_size), hits, misses (table reads), evictions, invalidations';
REVOKE ALL ON FUNCTION apikey.cache_stats() FROM PUBLIC;

-- Row-level helpers evaluated once per statement, not once per row: a
-- planner support function rewrites current_key_id(), current_owner() and
-- has_scope(constant) into init plans over these twins.
CREATE FUNCTION apikey._current_key_id() RETURNS bigint
AS 'MODULE_PATHNAME', 'apikey_current_key_id'
LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._current_key_id() IS 'Internal: current_key_id() as evaluated once per statement';
CREATE FUNCTION apikey._current_owner() RETURNS text
AS 'MODULE_PATHNAME', 'apikey_current_owner'
LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._current_owner() IS 'Internal: current_owner() as evaluated once per statement';
CREATE FUNCTION apikey._has_scope(scope text) RETURNS boolean
AS 'MODULE_PATHNAME', 'apikey_has_scope'
LANGUAGE C STABLE PARALLEL SAFE;
COMMENT ON FUNCTION apikey._has_scope(text) IS 'Internal: has_scope() as evaluated once per statement';
GRANT EXECUTE ON FUNCTION apikey._current_key_id(), apikey._current_owner(), apikey._has_scope(text) TO PUBLIC;

CREATE FUNCTION apikey._helper_support(internal) RETURNS internal
AS 'MODULE_PATHNAME', 'apikey_helper_support'
LANGUAGE C STRICT;
COMMENT ON FUNCTION apikey._helper_support(internal) IS 'Internal: planner support that evaluates the row-level helpers once per statement';
ALTER FUNCTION apikey.current_key_id() SUPPORT apikey._helper_support;
ALTER FUNCTION apikey.current_owner() SUPPORT apikey._helper_support;
ALTER FUNCTION apikey.has_scope(text) SUPPORT apikey._helper_support;
REVOKE ALL ON FUNCTION apikey._helper_support(internal) FROM PUBLIC;
