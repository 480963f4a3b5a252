--
-- security_rotation_budget: during a rotation's grace period the old and
-- the new token draw on one rate limit and one quota.  Before the fix the
-- new key got a copy of the old key's remaining quota and a bucket of its
-- own, so rotating doubled both for the length of the grace period.
--
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS apikey CASCADE;
CREATE EXTENSION apikey;
RESET client_min_messages;

-- quota: 3 calls in all
SELECT key_id AS k_old, token AS t_old FROM apikey.issue(owner => 'acme', quota => 3) \gset
SELECT code, remaining FROM apikey.check(:'t_old');
SELECT key_id AS k_new, token AS t_new FROM apikey.rotate(:k_old, grace => '1 hour') \gset
SELECT budget_key_id = :k_new AS old_draws_on_new FROM apikey.key_lineage WHERE key_id = :k_old;
SELECT budget_key_id IS NULL AS new_draws_on_itself FROM apikey.key_lineage WHERE key_id = :k_new;
SELECT key_id = :k_new AS quota_row_is_new_keys, remaining FROM apikey.quotas
 WHERE key_id IN (:k_old, :k_new);
SELECT code, remaining FROM apikey.check(:'t_new');
SELECT code, remaining FROM apikey.check(:'t_old');
SELECT code, remaining FROM apikey.check(:'t_new');
SELECT code, remaining FROM apikey.check(:'t_old');

-- rotating again: the first key joins the newest key's budget too
SELECT apikey.set_limits(:k_new, quota => 2);
SELECT key_id AS k_third, token AS t_third FROM apikey.rotate(:k_new, grace => '1 hour') \gset
SELECT k.id = :k_third AS is_third, l.budget_key_id = :k_third AS draws_on_third
  FROM apikey.keys k LEFT JOIN apikey.key_lineage l ON l.key_id = k.id
 WHERE k.id IN (:k_old, :k_new, :k_third) ORDER BY k.id;
SELECT code, remaining FROM apikey.check(:'t_old');
SELECT code, remaining FROM apikey.check(:'t_new');
SELECT code, remaining FROM apikey.check(:'t_third');

-- rate limit: 2 per hour in all (GCRA: a burst of 2, then one every 30 min)
SELECT key_id AS r_old, token AS rt_old FROM apikey.issue(owner => 'globex', rate_limit => 2, rate_window => '1 hour') \gset
SELECT code FROM apikey.check(:'rt_old');
SELECT key_id AS r_new, token AS rt_new FROM apikey.rotate(:r_old, grace => '1 hour') \gset
SELECT code FROM apikey.check(:'rt_new');
SELECT code, retry_after > interval '0' AS must_wait FROM apikey.check(:'rt_old');
SELECT code, retry_after > interval '0' AS must_wait FROM apikey.check(:'rt_new');

-- once the new key is deleted the old one draws on its own budget again
DELETE FROM apikey.keys WHERE id = :r_new;
SELECT budget_key_id IS NULL AS own_budget_again FROM apikey.key_lineage WHERE key_id = :r_old;
