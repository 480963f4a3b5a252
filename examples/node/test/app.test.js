// The example API end to end: start app.js against DATABASE_URL (the
// app's role, directly or through PgBouncer), issue keys through
// ADMIN_DATABASE_URL (a role that may call apikey.issue and revoke, e.g. a
// superuser, always a direct connection), and check what HTTP clients see.
// The database is examples/schema.sql's.  Run: node --test test/app.test.js
//
// The tokens live in this process only; the test checks that none of them
// reaches the app's output.

'use strict';

const { describe, test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const path = require('node:path');
const pg = require('pg');

const appUrl = process.env.DATABASE_URL;
const adminUrl = process.env.ADMIN_DATABASE_URL;
if (!appUrl || !adminUrl) {
  throw new Error('set DATABASE_URL (the app role) and ADMIN_DATABASE_URL (a superuser) to run these tests');
}

let admin;
let app;
let base;
let output = '';
const keys = {};
const expectedRows = {};

// Issue a key as the administrator; its token stays in this process.
async function issue(label, owner, limits = {}) {
  const r = await admin.query(
    `SELECT key_id, token FROM apikey.issue(owner => $1, scopes => $2,
       rate_limit => $3, rate_window => $4, quota => $5, quota_refill => $6, allowed_cidrs => $7)`,
    [owner, limits.scopes || ['orders:read'], limits.rate_limit || null, limits.rate_window || '1 minute',
      limits.quota || null, limits.quota_refill || null, limits.allowed_cidrs || null]);
  keys[label] = { id: r.rows[0].key_id, token: r.rows[0].token, owner };
}

// Start the app on a free port; resolve with its base URL.
function startApp() {
  return new Promise((resolve, reject) => {
    app = spawn(process.execPath, [path.join(__dirname, '..', 'app.js')], {
      env: { ...process.env, DATABASE_URL: appUrl, PORT: '0', HOST: '127.0.0.1', TRUST_PROXY: 'loopback' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const onData = (chunk) => {
      output += chunk;
      const m = /listening on (http:\/\/\S+)/.exec(output);
      if (m) resolve(m[1]);
    };
    app.stdout.setEncoding('utf8').on('data', onData);
    app.stderr.setEncoding('utf8').on('data', onData);
    app.on('exit', (code) => reject(new Error(`app exited (${code}): ${output}`)));
  });
}

// GET /orders with a token (or raw Authorization) and extra headers.
async function get({ token, authorization, headers = {} } = {}) {
  const h = { ...headers };
  if (token !== undefined) h.authorization = `Bearer ${token}`;
  if (authorization !== undefined) h.authorization = authorization;
  const res = await fetch(`${base}/orders`, { headers: h, signal: AbortSignal.timeout(30000) });
  return { status: res.status, headers: res.headers, body: await res.json() };
}

// One suite, whose before/after hooks bracket its tests (suite hooks exist
// since Node 18.8; Debian 12 ships 18).
describe('the example API', () => {
  before(async () => {
    admin = new pg.Client({ connectionString: adminUrl });
    await admin.connect();
    await issue('acme', 'acme');
    await issue('globex', 'globex');
    await issue('writer', 'acme', { scopes: ['orders:write'] });
    await issue('limited', 'acme', { rate_limit: 1, rate_window: '1 hour' });
    await issue('quota', 'globex', { quota: 1, quota_refill: '1 day' });
    await issue('doomed', 'globex');
    await issue('office', 'acme', { allowed_cidrs: ['203.0.113.0/24'] });
    // A superuser bypasses row-level security: the true counts.
    const r = await admin.query('SELECT tenant, count(*)::int AS n FROM orders GROUP BY tenant');
    for (const row of r.rows) expectedRows[row.tenant] = row.n;
    base = await startApp();
  });

  after(async () => {
    if (app && app.exitCode === null) {
      app.removeAllListeners('exit');
      await new Promise((resolve) => { app.on('exit', resolve); app.kill('SIGTERM'); });
    }
    if (admin) await admin.end();
  });

  test('each key sees its own tenant only, under concurrent requests', async () => {
    const asks = [];
    for (let i = 0; i < 40; i++) asks.push(i % 2 === 0 ? 'acme' : 'globex');
    const answers = await Promise.all(asks.map((k) => get({ token: keys[k].token })));
    answers.forEach((a, i) => {
      const owner = keys[asks[i]].owner;
      assert.equal(a.status, 200, `request ${i} (${owner}): ${JSON.stringify(a.body)}`);
      assert.equal(a.body.orders.length, expectedRows[owner], `request ${i}: ${owner}'s row count`);
      for (const row of a.body.orders) assert.equal(row.tenant, owner, `request ${i}: a row of another tenant`);
    });
  });

  test('missing or bad token: 401', async () => {
    let a = await get();
    assert.equal(a.status, 401);
    assert.equal(a.body.error, 'missing');
    assert.equal(a.headers.get('www-authenticate'), 'Bearer');
    a = await get({ authorization: `Basic ${Buffer.from('acme:secret').toString('base64')}` });
    assert.equal(a.status, 401);
    a = await get({ token: 'ak_not_a_real_key' });
    assert.equal(a.status, 401);
    assert.equal(a.body.error, 'malformed');
    assert.match(a.headers.get('www-authenticate'), /invalid_token/);
  });

  test('a key without the scope: 403', async () => {
    const a = await get({ token: keys.writer.token });
    assert.equal(a.status, 403);
    assert.equal(a.body.error, 'scope_denied');
    assert.match(a.headers.get('www-authenticate'), /insufficient_scope/);
  });

  test('a rate-limited key: 429 with Retry-After', async () => {
    assert.equal((await get({ token: keys.limited.token })).status, 200);
    const a = await get({ token: keys.limited.token });
    assert.equal(a.status, 429);
    assert.equal(a.body.error, 'rate_limited');
    const wait = Number(a.headers.get('retry-after'));
    assert.ok(Number.isInteger(wait) && wait > 3000 && wait <= 3600, `Retry-After: ${a.headers.get('retry-after')}`);
  });

  test('an exhausted quota: 429 with Retry-After until the refill', async () => {
    assert.equal((await get({ token: keys.quota.token })).status, 200);
    const a = await get({ token: keys.quota.token });
    assert.equal(a.status, 429);
    assert.equal(a.body.error, 'quota_exhausted');
    const wait = Number(a.headers.get('retry-after'));
    assert.ok(Number.isInteger(wait) && wait > 86000 && wait <= 86400, `Retry-After: ${a.headers.get('retry-after')}`);
  });

  test('a revoked key: 401 from the next request on', async () => {
    assert.equal((await get({ token: keys.doomed.token })).status, 200);
    await admin.query('SELECT apikey.revoke($1, $2)', [keys.doomed.id, 'example test']);
    const a = await get({ token: keys.doomed.token });
    assert.equal(a.status, 401);
    assert.equal(a.body.error, 'revoked');
  });

  test('the end client address from X-Forwarded-For reaches the allowlist', async () => {
    let a = await get({ token: keys.office.token, headers: { 'x-forwarded-for': '203.0.113.7' } });
    assert.equal(a.status, 200, JSON.stringify(a.body));
    assert.equal(a.body.orders.length, expectedRows.acme);
    a = await get({ token: keys.office.token, headers: { 'x-forwarded-for': '198.51.100.7' } });
    assert.equal(a.status, 403);
    assert.equal(a.body.error, 'address_denied');
    // An IPv4-mapped IPv6 address is the IPv4 client.
    a = await get({ token: keys.office.token, headers: { 'x-forwarded-for': '::ffff:203.0.113.7' } });
    assert.equal(a.status, 200, JSON.stringify(a.body));
    // The nearest untrusted hop counts: a client cannot prepend an allowed address.
    a = await get({ token: keys.office.token, headers: { 'x-forwarded-for': '203.0.113.7, 198.51.100.7' } });
    assert.equal(a.status, 403);
    // Without the header the client is the proxy itself (loopback): not allowed.
    a = await get({ token: keys.office.token });
    assert.equal(a.status, 403);
  });

  test('no token reaches the app output', () => {
    assert.match(output, /GET \/orders 200 valid/);
    for (const [label, k] of Object.entries(keys)) {
      assert.ok(!output.includes(k.token), `the ${label} token was logged`);
    }
    // Token-free, so it may be shown: the app's own account of the requests.
    process.stderr.write(`app output:\n${output}`);
  });
});
