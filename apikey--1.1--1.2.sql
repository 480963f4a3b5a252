/* apikey--1.1--1.2.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION apikey UPDATE TO '1.2'" to load this file. \quit

-- 1.2: what the outside attack review found, closed (see the README's
-- security model).  Sections are added below, one per concern.

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
