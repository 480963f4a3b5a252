"""The example API end to end: start app.py against DATABASE_URL (the app's
role, directly or through PgBouncer), issue keys through ADMIN_DATABASE_URL
(a role that may call apikey.issue and revoke, e.g. a superuser, always a
direct connection), and check what HTTP clients see.  The database is
examples/schema.sql's.  Run: python3 -m unittest -v test_app

The tokens live in this process only; the test checks that none of them
reaches the app's output.
"""

import json
import os
import re
import subprocess
import sys
import threading
import unittest
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psycopg

APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")


class ExampleApp(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        app_url = os.environ.get("DATABASE_URL")
        admin_url = os.environ.get("ADMIN_DATABASE_URL")
        if not app_url or not admin_url:
            raise RuntimeError("set DATABASE_URL (the app role) and ADMIN_DATABASE_URL (a superuser) to run these tests")
        cls.admin = psycopg.connect(admin_url, autocommit=True)
        cls.keys = {}
        cls.issue("acme", "acme")
        cls.issue("globex", "globex")
        cls.issue("writer", "acme", scopes=["orders:write"])
        cls.issue("limited", "acme", rate_limit=1, rate_window="1 hour")
        cls.issue("quota", "globex", quota=1, quota_refill="1 day")
        cls.issue("doomed", "globex")
        cls.issue("office", "acme", allowed_cidrs=["203.0.113.0/24"])
        # A superuser bypasses row-level security: the true counts.
        cls.expected = dict(cls.admin.execute("SELECT tenant, count(*) FROM orders GROUP BY tenant").fetchall())
        cls.start_app(app_url)

    @classmethod
    def issue(cls, label, owner, scopes=("orders:read",), rate_limit=None, rate_window="1 minute",
              quota=None, quota_refill=None, allowed_cidrs=None):
        """Issue a key as the administrator; its token stays in this process."""
        key_id, token = cls.admin.execute(
            "SELECT key_id, token FROM apikey.issue(owner => %s, scopes => %s, rate_limit => %s,"
            " rate_window => %s::interval, quota => %s, quota_refill => %s::interval,"
            " allowed_cidrs => %s::cidr[])",
            (owner, list(scopes), rate_limit, rate_window, quota, quota_refill, allowed_cidrs)).fetchone()
        cls.keys[label] = {"id": key_id, "token": token, "owner": owner}

    @classmethod
    def start_app(cls, app_url):
        """Start the app on a free port; read its output in a thread."""
        env = dict(os.environ, DATABASE_URL=app_url, PORT="0", HOST="127.0.0.1",
                   TRUSTED_PROXIES="127.0.0.0/8, ::1/128")
        cls.proc = subprocess.Popen([sys.executable, APP], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        first = cls.proc.stdout.readline()
        m = re.match(r"listening on (http://\S+)", first)
        if not m:
            cls.proc.kill()
            raise RuntimeError(f"the app did not start: {first}{cls.proc.stdout.read()}")
        cls.base = m.group(1)
        cls.output = [first]
        cls.reader = threading.Thread(target=lambda: cls.output.extend(cls.proc.stdout), daemon=True)
        cls.reader.start()

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait(timeout=30)
        cls.reader.join(timeout=30)
        cls.admin.close()
        # Checked last, once every request has been logged.
        output = "".join(cls.output)
        if "GET /orders 200 valid" not in output:
            raise AssertionError(f"no request was logged: {output}")
        for label, key in cls.keys.items():
            if key["token"] in output:
                raise AssertionError(f"the {label} token was logged")
        # Token-free, so it may be shown: the app's own account of the requests.
        sys.stderr.write(f"app output:\n{output}")

    def get(self, token=None, authorization=None, headers=None):
        """GET /orders; (status, headers, body)."""
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if authorization is not None:
            h["Authorization"] = authorization
        req = urllib.request.Request(f"{self.base}/orders", headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return res.status, res.headers, json.load(res)
        except urllib.error.HTTPError as err:
            return err.code, err.headers, json.load(err)

    def test_tenants_see_their_own_rows_only(self):
        asks = ["acme" if i % 2 == 0 else "globex" for i in range(40)]
        with ThreadPoolExecutor(max_workers=8) as ex:
            answers = list(ex.map(lambda k: self.get(self.keys[k]["token"]), asks))
        for i, (status, _, body) in enumerate(answers):
            owner = self.keys[asks[i]]["owner"]
            self.assertEqual(status, 200, f"request {i} ({owner}): {body}")
            self.assertEqual(len(body["orders"]), self.expected[owner], f"request {i}: {owner}'s row count")
            for row in body["orders"]:
                self.assertEqual(row["tenant"], owner, f"request {i}: a row of another tenant")

    def test_missing_or_bad_token_401(self):
        status, headers, body = self.get()
        self.assertEqual((status, body["error"], headers["WWW-Authenticate"]), (401, "missing", "Bearer"))
        status, _, _ = self.get(authorization="Basic YWNtZTpzZWNyZXQ=")
        self.assertEqual(status, 401)
        status, headers, body = self.get("ak_not_a_real_key")
        self.assertEqual((status, body["error"]), (401, "malformed"))
        self.assertIn("invalid_token", headers["WWW-Authenticate"])

    def test_wrong_scope_403(self):
        status, headers, body = self.get(self.keys["writer"]["token"])
        self.assertEqual((status, body["error"]), (403, "scope_denied"))
        self.assertIn("insufficient_scope", headers["WWW-Authenticate"])

    def test_rate_limited_429_with_retry_after(self):
        self.assertEqual(self.get(self.keys["limited"]["token"])[0], 200)
        status, headers, body = self.get(self.keys["limited"]["token"])
        self.assertEqual((status, body["error"]), (429, "rate_limited"))
        self.assertRegex(headers["Retry-After"], r"^\d+$")
        self.assertTrue(3000 < int(headers["Retry-After"]) <= 3600, headers["Retry-After"])

    def test_quota_exhausted_429_with_retry_after(self):
        self.assertEqual(self.get(self.keys["quota"]["token"])[0], 200)
        status, headers, body = self.get(self.keys["quota"]["token"])
        self.assertEqual((status, body["error"]), (429, "quota_exhausted"))
        self.assertRegex(headers["Retry-After"], r"^\d+$")
        self.assertTrue(86000 < int(headers["Retry-After"]) <= 86400, headers["Retry-After"])

    def test_revoked_key_401_on_next_request(self):
        self.assertEqual(self.get(self.keys["doomed"]["token"])[0], 200)
        self.admin.execute("SELECT apikey.revoke(%s, %s)", (self.keys["doomed"]["id"], "example test"))
        status, _, body = self.get(self.keys["doomed"]["token"])
        self.assertEqual((status, body["error"]), (401, "revoked"))

    def test_forwarded_client_address_reaches_allowlist(self):
        token = self.keys["office"]["token"]
        status, _, body = self.get(token, headers={"X-Forwarded-For": "203.0.113.7"})
        self.assertEqual(status, 200, body)
        self.assertEqual(len(body["orders"]), self.expected["acme"])
        status, _, body = self.get(token, headers={"X-Forwarded-For": "198.51.100.7"})
        self.assertEqual((status, body["error"]), (403, "address_denied"))
        # An IPv4-mapped IPv6 address is the IPv4 client.
        status, _, body = self.get(token, headers={"X-Forwarded-For": "::ffff:203.0.113.7"})
        self.assertEqual(status, 200, body)
        # The nearest untrusted hop counts: a client cannot prepend an allowed address.
        status, _, _ = self.get(token, headers={"X-Forwarded-For": "203.0.113.7, 198.51.100.7"})
        self.assertEqual(status, 403)
        # Without the header the client is the proxy itself (loopback): not allowed.
        self.assertEqual(self.get(token)[0], 403)


if __name__ == "__main__":
    unittest.main()
