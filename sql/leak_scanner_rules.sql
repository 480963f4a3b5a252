-- apikey.scanner_rules(format): gitleaks, trufflehog and GitHub custom
-- pattern rules for every prefix in use.  The regular expressions in the
-- output match the tokens issued here (checked with PostgreSQL's own
-- regular expressions), inside text too, and not their near misses.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

-- No prefix in use yet: the files have no rule.
SELECT apikey.scanner_rules();

CREATE TEMP TABLE tok (name text PRIMARY KEY, prefix text, token text);
INSERT INTO tok SELECT 'ak', 'ak', token FROM apikey.issue('acme');
INSERT INTO tok SELECT 'ak_live', 'ak_live', token FROM apikey.issue('acme', prefix => 'ak_live');
INSERT INTO tok SELECT 'gx', 'gx', token FROM apikey.issue('globex', prefix => 'gx');
INSERT INTO apikey.prefixes (prefix, public) VALUES ('pk', true);

SELECT apikey.scanner_rules('gitleaks');
SELECT apikey.scanner_rules('trufflehog');
SELECT apikey.scanner_rules('github');

-- The regexes, taken from the output of each format.
CREATE TEMP TABLE rules AS
SELECT 'gitleaks' AS format, m[1] AS regex
  FROM regexp_matches(apikey.scanner_rules('gitleaks'), $$\nregex = '''([^\n]*)'''\n$$, 'g') m
UNION ALL
SELECT 'trufflehog', m[1]
  FROM regexp_matches(apikey.scanner_rules('trufflehog'), $$\n +token: '([^\n]*)'\n$$, 'g') m
UNION ALL
SELECT 'github', '(?:^|[^0-9A-Za-z_])(' || m[1] || ')(?:[^0-9A-Za-z]|$)'
  FROM regexp_matches(apikey.scanner_rules('github'), $$\nSecret format: ([^\n]*)\n$$, 'g') m;
ALTER TABLE rules ADD COLUMN prefix text;
UPDATE rules SET prefix = substring(regex from '[(]([a-z][a-z0-9_]*)_\[');
SELECT format, count(*) AS rules, string_agg(prefix, ',' ORDER BY prefix) AS prefixes FROM rules GROUP BY format ORDER BY format;
-- Every issued token matches its prefix's rule, alone and inside text, and
-- the rule extracts exactly the token; no other prefix's rule matches it.
SELECT r.format, t.name,
       t.token ~ r.regex AS alone,
       substring('config: key=' || t.token || E'\n' from r.regex) = t.token AS extracted_from_text,
       (SELECT count(*) FROM rules o WHERE o.format = r.format AND o.prefix <> t.prefix
           AND ('x ' || t.token || ' y') ~ o.regex) AS other_rules_matching
  FROM rules r JOIN tok t ON t.prefix = r.prefix
 ORDER BY r.format, t.name;
-- Near misses do not match.
SELECT r.format, count(*) FILTER (WHERE v ~ r.regex) AS near_misses_matching
  FROM rules r JOIN tok t ON t.prefix = r.prefix,
       LATERAL (VALUES (left(t.token, -1)), (t.token || 'x'), ('x' || t.token), (upper(t.token))) AS nm(v)
 GROUP BY r.format ORDER BY r.format;

\set VERBOSITY sqlstate
SELECT apikey.scanner_rules(NULL);
SELECT apikey.scanner_rules('semgrep');
\set VERBOSITY default
SELECT apikey.scanner_rules('semgrep');
