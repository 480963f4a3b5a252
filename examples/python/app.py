"""A minimal Python API protected by apikey: psycopg 3 and the standard
library's http.server, nothing else (Debian: apt-get install python3-psycopg).

Each request is ONE transaction on one pooled connection:
    BEGIN; SELECT apikey.authenticate(%s, %s, %s); SELECT ... FROM orders; COMMIT;
authenticate() checks the token, the scope and the end client's address and
binds the key to the transaction; the orders table's row-level security
policy then shows the key's tenant its own rows only.  The binding ends at
COMMIT or ROLLBACK, so a transaction-mode pooler (PgBouncer) can hand the
server connection to anyone next.

Rules kept here, as the README asks:
- the token is a bound parameter, never part of a statement's text, and
  never logged (the log line names the verdict, not the token);
- prepare_threshold=None: psycopg never prepares a named statement, which
  PgBouncer before 1.21 does not support in transaction mode;
- the end client's address comes from X-Forwarded-For only when the request
  came from a trusted proxy (TRUSTED_PROXIES; loopback by default), and the
  database role must be a member of apikey_proxy for apikey to honour it.

Configuration (environment): DATABASE_URL (a libpq connection string; empty:
libpq's PGHOST, PGPORT, ... decide), PORT (default 8000; 0 picks a free
one), HOST (default 127.0.0.1), TRUSTED_PROXIES (comma-separated networks,
default "127.0.0.0/8, ::1/128").
"""

import ipaddress
import json
import os
import queue
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg

# What each verdict code means for an HTTP client.  Codes not listed
# (rate_limit_unavailable, quota_unavailable) are the server's problem: 503.
STATUS_BY_VERDICT = {
    "malformed": 401,
    "unknown": 401,
    "expired": 401,
    "revoked": 401,
    "suspended": 401,
    "scope_denied": 403,
    "quarantined": 403,
    "address_denied": 403,
    "rate_limited": 429,
    "quota_exhausted": 429,
    "address_blocked": 429,
}

VERDICT_RE = re.compile(r"^Verdict: ([a-z_]+)\.$")
RETRY_RE = re.compile(r" (\d+) seconds?\.$")
BEARER_RE = re.compile(r"^Bearer +([^ ]+) *$", re.IGNORECASE)


def verdict_of(err):
    """The verdict code of an error raised by apikey.authenticate() (its
    DETAIL is "Verdict: <code>."), or None for any other error."""
    m = VERDICT_RE.match(err.diag.message_detail or "")
    return m.group(1) if m else None


def retry_after_seconds(hint):
    """retry_after in seconds from authenticate()'s HINT ("Retry after 60
    seconds.", "The quota is refilled in 86400 seconds."); None when the
    hint carries none."""
    m = RETRY_RE.search(hint or "")
    return int(m.group(1)) if m else None


def client_address(peer, forwarded_for, trusted):
    """The end client's address: the peer's, or when the peer is a trusted
    proxy, the nearest address of X-Forwarded-For that is not one (walking
    from the right, as the proxies appended them).  None if malformed."""
    try:
        addr = ipaddress.ip_address(peer)
        hops = [h.strip() for h in forwarded_for.split(",")] if forwarded_for else []
        while hops and any(addr in net for net in trusted):
            addr = ipaddress.ip_address(hops.pop())
        return str(addr)
    except ValueError:
        return None


class Pool:
    """At most size connections, each used by one request at a time: a
    queue of slots, each an open connection or None (not opened yet, or
    dropped).  autocommit, so that conn.transaction() sends a real BEGIN
    ... COMMIT."""

    def __init__(self, conninfo, size):
        self.conninfo = conninfo
        self.slots = queue.LifoQueue()
        for _ in range(size):
            self.slots.put(None)

    def get(self):
        conn = self.slots.get()  # waits while every connection is in use
        if conn is not None:
            return conn
        try:
            return psycopg.connect(self.conninfo, autocommit=True, prepare_threshold=None)
        except BaseException:
            self.slots.put(None)
            raise

    def put(self, conn):
        if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.close()
            conn = None
        self.slots.put(conn)


def list_orders(pool, token, client_addr):
    """One request's work, in one transaction: authenticate, then read."""
    conn = pool.get()
    try:
        with conn.transaction():
            conn.execute("SELECT apikey.authenticate(%s, %s, %s)", (token, "orders:read", client_addr))
            cur = conn.execute("SELECT tenant, id, item FROM orders ORDER BY id")
            return [{"tenant": t, "id": i, "item": item} for t, i, item in cur]
    finally:
        pool.put(conn)


class Handler(BaseHTTPRequestHandler):
    pool = None
    trusted = []

    def send(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code="-", size="-"):
        # One line per request: method, path, status, verdict; no headers.
        sys.stdout.write(f"{self.command} {self.path} {code} {getattr(self, 'verdict', '')}".rstrip() + "\n")
        sys.stdout.flush()

    def do_GET(self):
        self.verdict = ""
        if self.path != "/orders":
            return self.send(404, {"error": "not found"})
        m = BEARER_RE.match(self.headers.get("Authorization", ""))
        if not m:
            self.verdict = "missing"
            return self.send(401, {"error": "missing"}, [("WWW-Authenticate", "Bearer")])
        addr = client_address(self.client_address[0], self.headers.get("X-Forwarded-For"), self.trusted)
        if addr is None:
            return self.send(400, {"error": "bad client address"})
        try:
            rows = list_orders(self.pool, m.group(1), addr)
        except psycopg.Error as err:
            verdict = verdict_of(err)
            if verdict is None:
                # Not a verdict: a database or connection problem.  Its
                # message holds no token (apikey redacts token-shaped text).
                sys.stdout.write(f"error: {err.sqlstate or ''} {err}\n")
                return self.send(500, {"error": "internal"})
            self.verdict = verdict
            return self.reject(verdict, retry_after_seconds(err.diag.message_hint))
        self.verdict = "valid"
        self.send(200, {"orders": rows})

    def reject(self, verdict, retry_after):
        """The status for a verdict, with what RFC 6750 and RFC 9110 say
        goes with it."""
        status = STATUS_BY_VERDICT.get(verdict, 503)
        headers = []
        if status == 401:
            headers.append(("WWW-Authenticate", 'Bearer error="invalid_token"'))
        if verdict == "scope_denied":
            headers.append(("WWW-Authenticate", 'Bearer error="insufficient_scope"'))
        if status == 429 and retry_after is not None:
            headers.append(("Retry-After", str(retry_after)))
        self.send(status, {"error": verdict}, headers)


def main():
    trusted = os.environ.get("TRUSTED_PROXIES", "127.0.0.0/8, ::1/128")
    Handler.trusted = [ipaddress.ip_network(n.strip()) for n in trusted.split(",") if n.strip()]
    Handler.pool = Pool(os.environ.get("DATABASE_URL", ""), size=4)
    server = ThreadingHTTPServer((os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))), Handler)
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
