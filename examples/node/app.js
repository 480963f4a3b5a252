// A minimal express + node-postgres API protected by apikey.
//
// Each request is ONE transaction on one pooled connection:
//   BEGIN; SELECT apikey.authenticate($1, $2, $3); SELECT ... FROM orders; COMMIT;
// authenticate() checks the token, the scope and the end client's address
// and binds the key to the transaction; the orders table's row-level
// security policy then shows the key's tenant its own rows only.  The
// binding ends at COMMIT or ROLLBACK, so a transaction-mode pooler
// (PgBouncer) can hand the server connection to anyone next.
//
// Rules kept here, as the README asks:
// - the token is a bind parameter, never part of a statement's text, and
//   never logged (the log line below names the verdict, not the token);
// - no query is given a `name`, so node-postgres uses the unnamed
//   statement, which PgBouncer before 1.21 passes through in transaction
//   mode (named statements there fail with "prepared statement ... does
//   not exist");
// - the end client's address comes from X-Forwarded-For only when the
//   request came from a trusted proxy (TRUST_PROXY, express's 'trust proxy'
//   setting; loopback by default), and the database role must be a member
//   of apikey_proxy for apikey to honour it.
//
// Configuration (environment): DATABASE_URL (else node-postgres reads
// PGHOST, PGPORT, PGUSER, PGDATABASE), PORT (default 3000; 0 picks a free
// one), HOST (default 127.0.0.1), TRUST_PROXY (default 'loopback').

'use strict';

const net = require('node:net');
const express = require('express');
const pg = require('pg');

// What each verdict code means for an HTTP client.  Codes not listed
// (rate_limit_unavailable, quota_unavailable) are the server's problem: 503.
const STATUS_BY_VERDICT = {
  malformed: 401,
  unknown: 401,
  expired: 401,
  revoked: 401,
  suspended: 401,
  scope_denied: 403,
  quarantined: 403,
  address_denied: 403,
  rate_limited: 429,
  quota_exhausted: 429,
  address_blocked: 429,
};

// authenticate() reports a rejected verdict as an error whose DETAIL is
// "Verdict: <code>." and, when there is a wait, whose HINT ends with it in
// whole seconds ("Retry after 60 seconds.", "The quota is refilled in
// 86400 seconds.", ...).
function verdictOf(err) {
  const m = /^Verdict: ([a-z_]+)\.$/.exec(err.detail || '');
  return m ? m[1] : null;
}

// retry_after in seconds from the HINT; null when the hint carries none.
function retryAfterSeconds(hint) {
  const m = / (\d+) seconds?\.$/.exec(hint || '');
  return m ? Number(m[1]) : null;
}

// The token of an "Authorization: Bearer <token>" header, or null.
function bearerToken(req) {
  const m = /^Bearer +([^ ]+) *$/i.exec(req.get('authorization') || '');
  return m ? m[1] : null;
}

// Send a rejection: the status for the verdict, and what RFC 6750 and
// RFC 9110 say goes with it.
function reject(res, verdict, retryAfter) {
  const status = STATUS_BY_VERDICT[verdict] || 503;
  if (status === 401) res.set('WWW-Authenticate', 'Bearer error="invalid_token"');
  if (status === 403 && verdict === 'scope_denied')
    res.set('WWW-Authenticate', 'Bearer error="insufficient_scope"');
  if (status === 429 && retryAfter !== null) res.set('Retry-After', String(retryAfter));
  res.status(status).json({ error: verdict });
}

// Run fn(client) in one transaction on one pooled connection.
async function inTransaction(pool, fn) {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    const result = await fn(client);
    await client.query('COMMIT');
    return result;
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  } finally {
    client.release();
  }
}

function createApp(pool, { trustProxy = 'loopback', log = console.log } = {}) {
  const app = express();
  app.set('trust proxy', trustProxy);

  // One line per request: no headers, so no token.
  app.use((req, res, next) => {
    res.on('finish', () => log(`${req.method} ${req.path} ${res.statusCode} ${res.locals.verdict || ''}`.trimEnd()));
    next();
  });

  app.get('/orders', async (req, res) => {
    const token = bearerToken(req);
    if (token === null) {
      res.locals.verdict = 'missing';
      res.set('WWW-Authenticate', 'Bearer');
      return res.status(401).json({ error: 'missing' });
    }
    // req.ip: the connection's address, or with a trusted proxy in front,
    // the nearest untrusted address of X-Forwarded-For.
    const clientAddr = req.ip;
    if (!net.isIP(clientAddr || '')) return res.status(400).json({ error: 'bad client address' });

    try {
      const rows = await inTransaction(pool, async (client) => {
        await client.query('SELECT apikey.authenticate($1, $2, $3)', [token, 'orders:read', clientAddr]);
        const r = await client.query('SELECT tenant, id, item FROM orders ORDER BY id');
        return r.rows;
      });
      res.locals.verdict = 'valid';
      res.json({ orders: rows });
    } catch (err) {
      const verdict = verdictOf(err);
      if (verdict === null) {
        // Not a verdict: a database or connection problem.  Its message
        // holds no token (apikey redacts token-shaped text in messages).
        log(`error: ${err.code || ''} ${err.message}`);
        return res.status(500).json({ error: 'internal' });
      }
      res.locals.verdict = verdict;
      reject(res, verdict, retryAfterSeconds(err.hint));
    }
  });

  return app;
}

module.exports = { createApp, retryAfterSeconds };

if (require.main === module) {
  const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: 4 });
  // An idle connection that breaks is dropped by the pool; say so, go on.
  pool.on('error', (err) => console.log(`idle connection error: ${err.code || ''} ${err.message}`));
  const app = createApp(pool, { trustProxy: process.env.TRUST_PROXY || 'loopback' });
  const server = app.listen(Number(process.env.PORT ?? 3000), process.env.HOST || '127.0.0.1', () => {
    const { address, port } = server.address();
    console.log(`listening on http://${address}:${port}`);
  });
  const stop = () => server.close(() => pool.end().then(() => process.exit(0)));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}
