-- Token format: <prefix>_<43 base62 secret><6 base62 CRC-32 checksum>.
-- Tokens are random, so only their shape is printed, never the token.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

INSERT INTO apikey.scopes (name) VALUES ('orders:read');

SELECT key_id AS k1, token AS t1 FROM apikey.issue(owner => 'acme', scopes => '{orders:read}') \gset
SELECT key_id AS k2, token AS t2 FROM apikey.issue(owner => 'acme') \gset
SELECT key_id AS k3, token AS t3 FROM apikey.issue(owner => 'acme', prefix => 'ak_live') \gset
SELECT key_id AS k4, token AS t4 FROM apikey.issue(owner => 'acme', prefix => 'a') \gset
SELECT key_id AS k5, token AS t5 FROM apikey.issue(owner => 'acme', prefix => 'abcdefghij012_yz') \gset

-- Shape and length.
SELECT :'t1' ~ '^ak_[0-9A-Za-z]{49}$' AS default_shape, length(:'t1') AS default_len,
       :'t3' ~ '^ak_live_[0-9A-Za-z]{49}$' AS live_shape, length(:'t3') AS live_len,
       :'t4' ~ '^a_[0-9A-Za-z]{49}$' AS one_char_prefix_shape,
       :'t5' ~ '^abcdefghij012_yz_[0-9A-Za-z]{49}$' AS max_prefix_shape, length(:'t5') AS max_len;

-- Every issued token is valid, and two issues never give the same token.
SELECT apikey.verify(:'t1') AS t1, apikey.verify(:'t2') AS t2, apikey.verify(:'t3') AS t3,
       apikey.verify(:'t4') AS t4, apikey.verify(:'t5') AS t5;
SELECT :'t1' <> :'t2' AS differ,
       substr(:'t1', 4, 43) <> substr(:'t2', 4, 43) AS secrets_differ;
SELECT count(DISTINCT t) AS distinct_tokens
  FROM (SELECT (apikey.issue(owner => 'bulk')).token AS t FROM generate_series(1, 20)) s;

-- Stored prefix and hint: prefix || '_...' || last four characters.
SELECT k.id = :k1 AS is_k1, k.prefix, k.hint = 'ak_...' || right(:'t1', 4) AS hint_ok,
       k.hint ~ '^ak_\.\.\.[0-9A-Za-z]{4}$' AS hint_shape
  FROM apikey.keys k WHERE k.id = :k1;
SELECT k.prefix, k.hint = 'ak_live_...' || right(:'t3', 4) AS hint_ok
  FROM apikey.keys k WHERE k.id = :k3;
SELECT k.prefix, k.hint = 'abcdefghij012_yz_...' || right(:'t5', 4) AS hint_ok
  FROM apikey.keys k WHERE k.id = :k5;
-- The hint reveals no more than those four characters of the body.
SELECT position(substr(:'t1', 4, 43) IN k.hint) = 0 AS secret_not_in_hint
  FROM apikey.keys k WHERE k.id = :k1;

-- Changing any single character anywhere (prefix, separator, secret or
-- checksum) to any other character of [0-9A-Za-z_] gives malformed.
SELECT count(*) AS variants,
       count(*) FILTER (WHERE (apikey.check(v)).code = 'malformed') AS malformed,
       count(*) FILTER (WHERE apikey.verify(v)) AS accepted
  FROM (SELECT overlay(:'t1' PLACING c FROM i FOR 1) AS v
          FROM generate_series(1, length(:'t1')) AS i,
               regexp_split_to_table('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_', '') AS c
         WHERE substr(:'t1', i, 1) <> c) s;
-- Same for a token with a long prefix containing an underscore.
SELECT count(*) > 0 AS some_variants,
       count(*) = count(*) FILTER (WHERE (apikey.check(v)).code = 'malformed') AS all_malformed
  FROM (SELECT overlay(:'t3' PLACING c FROM i FOR 1) AS v
          FROM generate_series(1, length(:'t3')) AS i,
               regexp_split_to_table('0aZz_', '') AS c
         WHERE substr(:'t3', i, 1) <> c) s;
-- Swapping two adjacent different characters gives malformed too.
SELECT count(*) >= 40 AS enough_swaps,
       count(*) = count(*) FILTER (WHERE (apikey.check(v)).code = 'malformed') AS all_malformed
  FROM (SELECT left(:'t1', i - 1) || substr(:'t1', i + 1, 1) || substr(:'t1', i, 1) || substr(:'t1', i + 2) AS v
          FROM generate_series(1, length(:'t1') - 1) AS i
         WHERE substr(:'t1', i, 1) <> substr(:'t1', i + 1, 1)) s;
-- Changing letter case (prefix only, or the whole token) gives malformed.
SELECT (apikey.check(overlay(:'t1' PLACING upper(substr(:'t1', 1, 1)) FROM 1 FOR 1))).code AS prefix_upper,
       (apikey.check(upper(:'t1'))).code AS all_upper,
       (apikey.check(lower(:'t1'))).code AS all_lower;

-- Truncation and extra characters give malformed.
SELECT count(*) AS truncations,
       count(*) FILTER (WHERE (apikey.check(left(:'t1', n))).code = 'malformed') AS malformed
  FROM generate_series(0, length(:'t1') - 1) AS n;
SELECT count(*) AS suffix_cuts,
       count(*) FILTER (WHERE (apikey.check(right(:'t1', n))).code = 'malformed') AS malformed
  FROM generate_series(0, length(:'t1') - 1) AS n;
SELECT (apikey.check(:'t1' || 'a')).code AS append_char,
       (apikey.check(:'t1' || '_')).code AS append_underscore,
       (apikey.check('a' || :'t1')).code AS prepend_char,
       (apikey.check('x_' || :'t1')).code AS prepend_prefix,
       (apikey.check(:'t1' || :'t1')).code AS doubled,
       (apikey.check(left(:'t1', 3) || '_' || substr(:'t1', 4))).code AS double_separator,
       (apikey.check(left(:'t1', 10) || substr(:'t1', 12))).code AS middle_char_removed,
       (apikey.check(left(:'t1', 10) || 'a' || substr(:'t1', 11))).code AS middle_char_added;
-- A prefix swapped for another valid prefix breaks the checksum.
SELECT (apikey.check('ak_live' || substr(:'t1', 3))).code AS other_prefix,
       (apikey.check('ak' || substr(:'t3', 8))).code AS shorter_prefix,
       (apikey.check('ak_test' || substr(:'t3', 8))).code AS same_length_prefix;

-- The untouched tokens are still valid after all that.
SELECT (apikey.check(:'t1')).code AS t1, (apikey.check(:'t3')).code AS t3;
