"""py-consul, unchanged, against Sextant's Consul adapter (crates/sextant/tests/consul_clients.rs).

Usage: py_consul_flow.py HOST PORT

The flow: the agent's datacenter; a service with a TTL check (starts critical, pass, warn,
fail, each seen through health.service, ?passing and health.state); a blocking
health.service query that wakes on a change with a higher index; a service with an HTTP check
run by Sextant's scanner against a small HTTP server here (200 passing, 429 warning, 500
critical); maintenance mode on and off; deregistration; a TTL check left critical longer than
its DeregisterCriticalServiceAfter removes its service (the server runs with a 2 s minimum);
an unknown check is 404 (Spring re-registers on it); KV is a clear 501.

Every wait is bounded; a failed check prints `FAIL: ...` and exits non-zero.
"""

import http.server
import sys
import threading
import time

import consul

DEADLINE = 15.0


class Failure(Exception):
    pass


def step(msg):
    print(f"--- {msg}", flush=True)


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def wait_for(what, fn, timeout=DEADLINE):
    """Polls fn() until it returns a truthy value; returns it, or fails naming `what`."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        time.sleep(0.1)
    raise Failure(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def service_checks(c, name, **kw):
    """{instance id: {check id: status}} from health.service."""
    _, entries = c.health.service(name, **kw)
    return {
        e["Service"]["ID"]: {ch["CheckID"]: ch["Status"] for ch in e["Checks"]} for e in entries
    }


class Health(http.server.BaseHTTPRequestHandler):
    """Answers /health with the status the flow sets."""

    code = 200

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.send_response(Health.code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    c = consul.Consul(host=host, port=port)

    step("agent/self names the datacenter; status/leader answers")
    me = c.agent.self()
    check(me["Config"]["Datacenter"] == "dc1", f"datacenter: {me['Config']}")
    check(c.status.leader() != "", "a leader")

    step("register web-1 with a TTL check: it starts critical")
    check(
        c.agent.service.register(
            "web",
            service_id="web-1",
            address="127.0.0.1",
            port=8080,
            tags=["v1", "primary"],
            meta={"team": "blue"},
            check=consul.Check.ttl("30s"),
        ),
        "register answered 200",
    )
    services = c.agent.services()
    check("web-1" in services, f"agent services: {services}")
    check(services["web-1"]["Meta"] == {"team": "blue"}, f"meta: {services['web-1']}")
    _, catalog = c.catalog.services()
    check(sorted(catalog.get("web", [])) == ["primary", "v1"], f"catalog: {catalog}")
    _, passing = c.health.service("web", passing=True)
    check(passing == [], f"a new TTL check is critical: {passing}")
    checks = service_checks(c, "web")
    check(checks["web-1"]["service:web-1"] == "critical", f"checks: {checks}")
    check(checks["web-1"]["serfHealth"] == "passing", f"node check: {checks}")

    step("pass: passing, also filtered by tags (AND)")
    c.agent.check.ttl_pass("service:web-1", "all good")
    index, passing = c.health.service("web", passing=True, tag=["v1", "primary"])
    check([e["Service"]["ID"] for e in passing] == ["web-1"], f"passing: {passing}")
    _, none = c.health.service("web", passing=True, tag=["v1", "nope"])
    check(none == [], f"tags are AND: {none}")
    out = [ch for ch in passing[0]["Checks"] if ch["CheckID"] == "service:web-1"][0]
    check(out["Output"] == "all good", f"the note is the output: {out}")

    step("a blocking health.service query wakes on warn with a higher index")
    result = {}

    def block():
        t0 = time.monotonic()
        result["answer"] = c.health.service("web", index=index, wait="20s")
        result["took"] = time.monotonic() - t0

    t = threading.Thread(target=block)
    t.start()
    time.sleep(0.5)
    check(t.is_alive(), "the query blocks while nothing changes")
    c.agent.check.ttl_warn("service:web-1", "slow")
    t.join(DEADLINE)
    check(not t.is_alive(), "the blocking query returned")
    new_index, entries = result["answer"]
    check(int(new_index) > int(index), f"index rose: {index} -> {new_index}")
    check(result["took"] < 5, f"woke promptly: {result['took']:.2f}s")
    statuses = {ch["CheckID"]: ch["Status"] for ch in entries[0]["Checks"]}
    check(statuses["service:web-1"] == "warning", f"warning: {statuses}")
    _, passing = c.health.service("web", passing=True)
    check(passing == [], f"warning is not passing: {passing}")

    step("fail: critical, listed by health.state")
    c.agent.check.ttl_fail("service:web-1", "down")
    _, critical = c.health.state("critical")
    check(
        any(ch["CheckID"] == "service:web-1" for ch in critical), f"health.state critical: {critical}"
    )

    step("an HTTP check run by Sextant: 200 passing, 429 warning, 500 critical")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    hport = srv.server_address[1]
    check(
        c.agent.service.register(
            "api",
            service_id="api-1",
            address="127.0.0.1",
            port=hport,
            check=consul.Check.http(f"http://127.0.0.1:{hport}/health", "500ms", timeout="400ms"),
        ),
        "register api",
    )
    wait_for("api-1 passing", lambda: service_checks(c, "api", passing=True).get("api-1"))
    Health.code = 429
    wait_for(
        "api-1 warning",
        lambda: service_checks(c, "api").get("api-1", {}).get("service:api-1") == "warning",
    )
    Health.code = 500
    wait_for(
        "api-1 critical",
        lambda: service_checks(c, "api").get("api-1", {}).get("service:api-1") == "critical",
    )
    Health.code = 200
    wait_for("api-1 passing again", lambda: service_checks(c, "api", passing=True).get("api-1"))

    step("maintenance on: the _service_maintenance check, off: gone")
    c.agent.service.maintenance("api-1", "true", "upgrade")
    checks = service_checks(c, "api")["api-1"]
    check(checks.get("_service_maintenance:api-1") == "critical", f"maintenance: {checks}")
    _, entries = c.health.service("api")
    notes = [ch["Notes"] for ch in entries[0]["Checks"] if ch["Name"] == "Service Maintenance Mode"]
    check(notes == ["upgrade"], f"the reason: {notes}")
    check(service_checks(c, "api", passing=True) == {}, "not passing in maintenance")
    c.agent.service.maintenance("api-1", "false")
    wait_for("api-1 back", lambda: service_checks(c, "api", passing=True).get("api-1"))

    step("deregister")
    c.agent.service.deregister("api-1")
    _, nodes = c.catalog.service("api")
    check(nodes == [], f"api gone: {nodes}")
    check("api-1" not in c.agent.services(), "not an agent service any more")
    srv.shutdown()

    step("a check critical longer than DeregisterCriticalServiceAfter removes its service")
    c.agent.service.register(
        "gone",
        service_id="gone-1",
        address="127.0.0.1",
        port=9,
        check={"TTL": "30s", "DeregisterCriticalServiceAfter": "2s"},
    )
    check(c.catalog.service("gone")[1] != [], "gone-1 registered")
    wait_for("gone-1 removed", lambda: c.catalog.service("gone")[1] == [])

    step("an unknown check is 404; KV is 501")
    # py-consul's boolean answers are "was it 200": False for the 404.
    check(c.agent.check.ttl_pass("service:nope") is False, "an unknown check was accepted")
    check(c.agent.check.ttl_pass("service:web-1") is True, "a known check is 200")
    try:
        c.kv.get("config/x")
        raise Failure("KV answered")
    except consul.ConsulException as e:
        check("501" in str(e) and "KV" in str(e), f"KV refused clearly: {e}")

    c.agent.service.deregister("web-1")
    print("OK", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        print(f"FAIL: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
