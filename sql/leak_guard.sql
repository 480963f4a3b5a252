-- apikey.leak_guard(column, mode): a trigger that keeps tokens out of an
-- application's text column.  reject raises, redact stores the hint
-- instead, report keeps the row and reports the leak (source
-- db:<schema>.<table>).  Only checksum-valid tokens count.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;
\set SHOW_CONTEXT never

CREATE TEMP TABLE tok (name text PRIMARY KEY, id bigint, token text);
INSERT INTO tok SELECT n, key_id, token FROM unnest(ARRAY['a', 'b', 'c', 'd']) n, LATERAL apikey.issue('acme', name => n) i;
CREATE FUNCTION t(n text) RETURNS text LANGUAGE sql AS 'SELECT token FROM tok WHERE name = n';
CREATE FUNCTION k(n text) RETURNS bigint LANGUAGE sql AS 'SELECT id FROM tok WHERE name = n';
SELECT left(t('a'), -1) || CASE WHEN right(t('a'), 1) = 'A' THEN 'B' ELSE 'A' END AS broken \gset

CREATE TABLE comments_reject (id serial, body text);
CREATE TABLE comments_redact (id serial, body text, n int);
CREATE TABLE comments_report (id serial, body text);
CREATE TRIGGER guard BEFORE INSERT OR UPDATE ON comments_reject
	FOR EACH ROW EXECUTE FUNCTION apikey.leak_guard('body', 'reject');
CREATE TRIGGER guard BEFORE INSERT OR UPDATE ON comments_redact
	FOR EACH ROW EXECUTE FUNCTION apikey.leak_guard('body', 'redact');
CREATE TRIGGER guard BEFORE INSERT OR UPDATE ON comments_report
	FOR EACH ROW EXECUTE FUNCTION apikey.leak_guard('body', 'report');

-- reject: the token is never stored.
INSERT INTO comments_reject (body) VALUES ('no key here'), (NULL), (:'broken');
DO $$
DECLARE
	d text;
	h text;
BEGIN
	INSERT INTO comments_reject (body) VALUES ('my key is ' || t('a') || ', please help');
EXCEPTION WHEN check_violation THEN
	GET STACKED DIAGNOSTICS d = PG_EXCEPTION_DETAIL, h = PG_EXCEPTION_HINT;
	RAISE NOTICE '%: % / detail names the hint: % / %', SQLSTATE, SQLERRM,
		d = 'Token ' || (SELECT hint FROM apikey.keys WHERE id = k('a')) || ' at character 11.', h;
END
$$;
\set VERBOSITY sqlstate
UPDATE comments_reject SET body = body || ' ' || t('a') WHERE id = 1;
\set VERBOSITY default
SELECT id, body = :'broken' AS near_miss_kept, CASE WHEN body = :'broken' THEN 'near miss' ELSE body END AS body
  FROM comments_reject ORDER BY id;
SELECT (apikey.check(t('a'))).code AS a_untouched;

-- redact: each token becomes its hint.
INSERT INTO comments_redact (body, n) VALUES ('keys ' || t('a') || ' and ' || t('b') || '.', 1), ('none', 2);
SELECT n, body = 'keys ' || (SELECT hint FROM apikey.keys WHERE id = k('a')) || ' and '
                 || (SELECT hint FROM apikey.keys WHERE id = k('b')) || '.' AS redacted,
       strpos(body, t('a')) = 0 AND strpos(body, t('b')) = 0 AS no_token
  FROM comments_redact ORDER BY n;
UPDATE comments_redact SET body = t('c') WHERE n = 2;
SELECT body = (SELECT hint FROM apikey.keys WHERE id = k('c')) AS update_redacted FROM comments_redact WHERE n = 2;

-- report: the row is kept, the key revoked as leaked, the leak recorded.
INSERT INTO comments_report (body) VALUES ('oops ' || t('d'));
SELECT count(*) AS kept FROM comments_report WHERE body = 'oops ' || t('d');
SELECT (apikey.check(t('d'))).code AS d,
       (SELECT source || ' ' || action_taken FROM apikey.exposures WHERE key_id = k('d')) AS exposure;
SELECT action, target_key_id = k('d') AS targets_d, details FROM apikey.audit_log ORDER BY seq DESC LIMIT 1;
-- An update that leaves the column alone reports nothing new.
SELECT max(seq) AS before FROM apikey.audit_log \gset
UPDATE comments_report SET id = id;
SELECT count(*) AS new_rows FROM apikey.audit_log WHERE seq > :before;

-- Misuse: a clear error, nothing stored.
CREATE TABLE misuse (id int, body text, doc jsonb);
CREATE TRIGGER bad_mode BEFORE INSERT ON misuse FOR EACH ROW EXECUTE FUNCTION apikey.leak_guard('body', 'shred');
INSERT INTO misuse VALUES (1, 'x');
DROP TRIGGER bad_mode ON misuse;
CREATE TRIGGER no_column BEFORE INSERT ON misuse FOR EACH ROW EXECUTE FUNCTION apikey.leak_guard('text', 'reject');
INSERT INTO misuse VALUES (1, 'x');
DROP TRIGGER no_column ON misuse;
CREATE TRIGGER not_text BEFORE INSERT ON misuse FOR EACH ROW EXECUTE FUNCTION apikey.leak_guard('doc', 'reject');
INSERT INTO misuse VALUES (1, 'x', '{"a": 1}');
DROP TRIGGER not_text ON misuse;
CREATE TRIGGER after_row AFTER INSERT ON misuse FOR EACH ROW EXECUTE FUNCTION apikey.leak_guard('body', 'reject');
INSERT INTO misuse VALUES (1, 'x');
DROP TRIGGER after_row ON misuse;
CREATE TRIGGER one_arg BEFORE INSERT ON misuse FOR EACH ROW EXECUTE FUNCTION apikey.leak_guard('body');
INSERT INTO misuse VALUES (1, 'x');
DROP TRIGGER one_arg ON misuse;
SELECT count(*) AS stored FROM misuse;
SELECT apikey.leak_guard();

-- Creating the trigger needs EXECUTE, the owner's until granted: report
-- mode revokes keys.
CREATE ROLE regress_leak_guard_app;
GRANT CREATE ON SCHEMA public TO regress_leak_guard_app;
SET ROLE regress_leak_guard_app;
CREATE TABLE app_notes (body text);
CREATE TRIGGER guard BEFORE INSERT ON app_notes FOR EACH ROW EXECUTE FUNCTION apikey.leak_guard('body', 'report');
DROP TABLE app_notes;
RESET ROLE;
REVOKE CREATE ON SCHEMA public FROM regress_leak_guard_app;
DROP ROLE regress_leak_guard_app;

DROP TABLE comments_reject, comments_redact, comments_report, misuse;
DROP FUNCTION t(text);
DROP FUNCTION k(text);
