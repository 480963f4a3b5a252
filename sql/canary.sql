-- Canary keys: a token like any other that no call accepts.  Every use
-- answers unknown (every key field NULL, the same error as a token that
-- matches no key) and is recorded outside the caller's transaction, so a
-- read-only or rolled-back use still opens a critical finding at the next
-- detection pass; the evidence names the address and the scope asked for,
-- never a token.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

-- canary uses are kept by id and ids restart with the extension: give
-- these ids of their own
SELECT setval('apikey.keys_id_seq', (extract(epoch FROM clock_timestamp()) * 1000)::bigint) IS NOT NULL AS fresh_ids;
INSERT INTO apikey.scopes (name) VALUES ('orders:read'), ('orders:write');
-- only the canary rule: what earlier suites did must not open findings here
UPDATE apikey.detection_rules SET enabled = (kind = 'canary_use');
SELECT key_id AS canary_id, token AS canary FROM apikey.issue_canary('acme', 'planted in the wiki') \gset
SELECT key_id AS real_id, token AS real FROM apikey.issue('acme', '{orders:read}') \gset
SELECT token AS unknown FROM apikey._new_token('ak') \gset

-- It looks like a key: same length, same prefix, a checksum that holds
-- (find_tokens sees a token), an id from the keys' sequence.
SELECT length(:'canary') = length(:'real') AS same_length,
       split_part(:'canary', '_', 1) = split_part(:'real', '_', 1) AS same_prefix,
       (SELECT count(*) FROM apikey.find_tokens('see ' || :'canary')) AS found_as_token,
       :canary_id < :real_id AS id_from_keys_sequence;
-- Not a key: key_status does not list it; apikey.canaries does.
SELECT count(*) AS in_key_status FROM apikey.key_status WHERE key_id = :canary_id;
SELECT id = :canary_id AS same_id, owner, name, hint = 'ak_...' || right(:'canary', 4) AS hint_ok
  FROM apikey.canaries;

-- Every use answers unknown, exactly as a token that matches no key.
SELECT * FROM apikey.check(:'canary');
SELECT * FROM apikey.check(:'canary', 'orders:read');
SELECT apikey.check(:'canary', 'orders:write') IS NOT DISTINCT FROM apikey.check(:'unknown', 'orders:write')
       AS same_verdict_as_unknown;
SELECT apikey.verify(:'canary') AS verify;
SELECT apikey.authenticate(:'canary');
SELECT apikey.authenticate(:'unknown');
SELECT apikey.current_key_id() AS bound_key;

-- Uses in a read-only transaction and in rolled-back ones are recorded too.
BEGIN READ ONLY;
SELECT code FROM apikey.check(:'canary', 'orders:write');
ROLLBACK;
BEGIN;
SELECT code FROM apikey.check(:'canary', 'orders:write');
SAVEPOINT s;
SELECT code FROM apikey.check(:'canary');
ROLLBACK TO SAVEPOINT s;
ROLLBACK;
-- A scope shaped like a token is not kept: the evidence only counts it.
SELECT code FROM apikey.check(:'canary', 'x' || :'real');
-- From an address a trusted proxy asserts (the superuser may): a finding
-- of its own, per network.
SELECT code FROM apikey.check(:'canary', 'orders:read', '203.0.113.9');

-- Nothing filed yet: the pass files it.
SELECT count(*) AS findings_before_pass FROM apikey.findings;
SELECT apikey.run_detection() AS opened;
SELECT rule, key_id = :canary_id AS is_the_canary, owner, network, severity, action_taken,
       resolved_at IS NULL AS open
  FROM apikey.findings ORDER BY network;
SELECT network, evidence - 'first_at' - 'last_at' - 'hint' AS evidence,
       evidence->>'hint' = 'ak_...' || right(:'canary', 4) AS hint_is_the_canarys,
       (evidence->>'first_at')::timestamptz <= (evidence->>'last_at')::timestamptz AS times_in_order
  FROM apikey.findings ORDER BY network;
-- The evidence holds no token and no hash.
SELECT count(*) AS evidence_with_secret FROM apikey.findings
 WHERE strpos(evidence::text, substr(:'canary', 4, 20)) > 0
    OR strpos(evidence::text, substr(:'real', 4, 20)) > 0
    OR strpos(evidence::text, encode(apikey.hash(:'canary'), 'hex')) > 0;

-- A second pass files nothing new; a new use adds to the open finding.
SELECT apikey.run_detection() AS opened_again;
SELECT code FROM apikey.check(:'canary', 'orders:read');
SELECT apikey.run_detection() AS opened_after_new_use;
SELECT network, evidence->'calls' AS calls, evidence->'scopes' AS scopes, last_seen_at >= at AS seen_again
  FROM apikey.findings ORDER BY network;

-- Resolved, then used again: a new finding (a canary use is never dropped).
SELECT apikey.resolve_finding(id, 'mitigated', 'wiki page removed')
  FROM apikey.findings WHERE network = '127.0.0.1/32';
SELECT code FROM apikey.check(:'canary');
SELECT apikey.run_detection() AS opened_after_resolve;
SELECT network, resolution, evidence->'calls' AS calls FROM apikey.findings ORDER BY id;

-- A pass that rolls back files nothing and consumes nothing.
SELECT code FROM apikey.check(:'canary', 'orders:write', '198.51.100.4');
BEGIN;
SELECT apikey.run_detection() AS opened_in_rolled_back_pass;
ROLLBACK;
SELECT count(*) AS findings_for_198_51_100 FROM apikey.findings WHERE network = '198.51.100.4/32';
SELECT apikey.run_detection() AS opened_after_rolled_back_pass;
SELECT network, evidence->'calls' AS calls, evidence->'scopes' AS scopes
  FROM apikey.findings WHERE network = '198.51.100.4/32';

-- Bad input and privileges: only a granted role issues canaries or reads
-- them; their hash is for the owner only.
SELECT apikey.issue_canary(NULL);
SELECT apikey.issue_canary('acme', 'x', 'bad prefix');
CREATE ROLE regress_canary_nobody;
CREATE ROLE regress_canary_admin;
SELECT apikey.grant_admin('regress_canary_admin');
SET ROLE regress_canary_nobody;
SELECT apikey.issue_canary('acme');
SELECT count(*) FROM apikey.canaries;
SELECT count(*) FROM apikey._canary_uses();
SET ROLE regress_canary_admin;
SELECT key_id > 0 AS issued FROM apikey.issue_canary('initech', 'in a CI secret');
SELECT owner, name FROM apikey.canaries ORDER BY id;
SELECT hash FROM apikey.canaries;
RESET ROLE;
SELECT apikey.revoke_admin('regress_canary_admin');
DROP ROLE regress_canary_nobody, regress_canary_admin;

-- Ids restart with the extension: a use of a canary of the dropped
-- extension, never filed, is not filed as the new canary with its id.
SELECT code FROM apikey.check(:'canary', 'orders:read', '192.0.2.99');
SET client_min_messages = warning;
DROP EXTENSION apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
SELECT setval('apikey.keys_id_seq', :canary_id - 1) IS NOT NULL AS same_ids_again;
SELECT key_id = :canary_id AS same_id_as_the_dropped_canary FROM apikey.issue_canary('globex', 'new');
SELECT apikey.run_detection() AS opened;
SELECT count(*) AS findings FROM apikey.findings;

-- One canary's holder cannot crowd out another canary: 128 uses of one
-- canary, each asking for another scope (a PUBLIC role can), then one use
-- of a second canary.  Both are filed; the first keeps its first uses one
-- by one and counts the rest.
SELECT token AS x FROM apikey.issue_canary('honeypot', 'public-repo') \gset
SELECT token AS y FROM apikey.issue_canary('internal', 'vault-only') \gset
CREATE ROLE regress_canary_eve;
SET ROLE regress_canary_eve;
SELECT count(*) FROM (SELECT apikey.verify(:'x', 's' || i) FROM generate_series(1, 128) i) s;
SELECT (apikey.check(:'y')).code;
RESET ROLE;
SELECT apikey.run_detection() > 0 AS opened;
SELECT c.name, f.network, f.evidence->'calls' AS calls,
       jsonb_array_length(COALESCE(NULLIF(f.evidence->'scopes', 'null'), '[]')) AS scopes_named,
       f.evidence->'calls_other_variants' AS calls_other_variants
  FROM apikey.findings f JOIN apikey.canaries c ON c.id = f.key_id ORDER BY c.name;
DROP ROLE regress_canary_eve;
