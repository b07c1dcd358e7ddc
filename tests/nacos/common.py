"""Helpers shared by the Nacos Python SDK flows in this folder (standard library only, so that
both venvs, .venv/nacos-v2 and .venv/nacos-v1, can import it).

Every network call has a timeout and every wait is bounded; a failed check raises `Failure`,
which the scripts turn into a `FAIL: ...` line on stderr and a non-zero exit.
"""

import json
import sys
import urllib.error
import urllib.parse
import urllib.request

#: Bound of one HTTP call.
HTTP_TIMEOUT = 10.0

# Requests go straight to the loopback servers under test, never through a proxy from the
# environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Failure(Exception):
    """A check of the flow failed; the message says what was expected and what came."""


def log(msg):
    print(msg, flush=True)


def step(msg):
    print(f"--- {msg}", flush=True)


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def check_eq(actual, expected, what):
    if actual != expected:
        raise Failure(f"{what}: expected {expected!r}, got {actual!r}")


def loopback_addr(text):
    """Validates a `host:port` argument: loopback only (these tests never leave the machine)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"not a host:port address: {text!r}")
    if not (host.startswith("127.") or host in ("localhost", "[::1]")):
        raise SystemExit(f"refusing a non-loopback address: {text!r}")
    return text


class HttpAnswer:
    def __init__(self, method, url, status, body, headers):
        self.method = method
        self.url = url
        self.status = status
        self.body = body
        self.headers = headers

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            raise Failure(f"{self.method} {self.url}: not JSON (HTTP {self.status}): {self.text!r}")

    def __repr__(self):
        return f"{self.method} {self.url} -> HTTP {self.status} {self.text!r}"


def http(method, url, *, query=None, form=None, json_body=None, headers=None,
         timeout=HTTP_TIMEOUT):
    """One HTTP request; returns an `HttpAnswer` for any status (4xx/5xx included). Transport
    errors (refused, timed out) raise `Failure`."""
    if query:
        url = url + ("&" if "?" in url else "?") + urllib.parse.urlencode(query)
    data = None
    hdrs = dict(headers or {})
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
    elif json_body is not None:
        data = json.dumps(json_body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return HttpAnswer(method, url, resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as e:
        return HttpAnswer(method, url, e.code, e.read(), dict(e.headers or {}))
    except (urllib.error.URLError, OSError) as e:
        raise Failure(f"{method} {url}: no answer: {e!r}")


class Native:
    """Sextant's own HTTP API (`/v1/...`), to see through it what the Nacos clients did."""

    def __init__(self, addr):
        self.base = f"http://{addr}"

    def service(self, ns, svc):
        """`GET /v1/namespaces/NS/services/SVC` (an unknown service is an empty one)."""
        path = f"/v1/namespaces/{urllib.parse.quote(ns, safe='')}/services/{urllib.parse.quote(svc, safe='')}"
        r = http("GET", self.base + path)
        if r.status == 404:
            return {"instances": []}
        check(r.status == 200, f"native read of {ns}/{svc}: {r!r}")
        return r.json()

    def instances(self, ns, svc):
        return self.service(ns, svc).get("instances", [])

    def find(self, ns, svc, host, port):
        for i in self.instances(ns, svc):
            if i.get("host") == host and i.get("port") == port:
                return i
        return None

    def register(self, ns, svc, inst_id, body):
        path = (f"/v1/namespaces/{urllib.parse.quote(ns, safe='')}/services/"
                f"{urllib.parse.quote(svc, safe='')}/instances/{urllib.parse.quote(inst_id, safe='')}")
        r = http("PUT", self.base + path, json_body=body)
        check(r.status == 200, f"native register {ns}/{svc}/{inst_id}: {r!r}")
        return r.json()

    def deregister(self, ns, svc, inst_id):
        path = (f"/v1/namespaces/{urllib.parse.quote(ns, safe='')}/services/"
                f"{urllib.parse.quote(svc, safe='')}/instances/{urllib.parse.quote(inst_id, safe='')}")
        r = http("DELETE", self.base + path)
        check(r.status == 200, f"native deregister {ns}/{svc}/{inst_id}: {r!r}")
        return r.json()

    def set_status(self, ns, svc, inst_id, patch):
        path = (f"/v1/namespaces/{urllib.parse.quote(ns, safe='')}/services/"
                f"{urllib.parse.quote(svc, safe='')}/instances/{urllib.parse.quote(inst_id, safe='')}/status")
        r = http("PATCH", self.base + path, json_body=patch)
        check(r.status == 200, f"native status change {ns}/{svc}/{inst_id}: {r!r}")
        return r.json()


def fail_and_exit(e, extra=None):
    print(f"FAIL: {e}", file=sys.stderr, flush=True)
    if extra:
        print(extra, file=sys.stderr, flush=True)
