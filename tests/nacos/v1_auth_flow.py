#!/usr/bin/env python3
"""The old Nacos Python client (`nacos.NacosClient`, Nacos 1.x HTTP) with username/password
against Sextant with auth on.

Usage: v1_auth_flow.py --nacos 127.0.0.1:P --http 127.0.0.1:H

Sets up through Sextant's native API (bootstrap, a policy `read`+`write` on namespace `prod`, a
token holding it), then: the client logs in (`/nacos/v1/auth/login`, username = the token's id,
password = its secret; it then sends `accessToken` with every request), registers and lists in
`prod`; the same token is refused in `dev` (403); a wrong password cannot log in.

Prints each step; any failed check prints `FAIL: ...` and exits 1. Every call is bounded.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import check, check_eq, fail_and_exit, http, log, loopback_addr, step  # noqa: E402

import nacos  # noqa: E402


def refused(f, what):
    """True if the call raised (the client's way of reporting a non-2xx answer)."""
    try:
        r = f()
    except Exception as e:  # noqa: BLE001
        log(f"    {what}: refused as expected: {type(e).__name__}: {str(e)[:200]}")
        return True
    log(f"    {what}: answered {r!r}")
    return False


def flow(nacos_addr, native):
    base = f"http://{native}"
    step("setup through the native API")
    r = http("POST", base + "/v1/acl/bootstrap")
    check_eq(r.status, 201, f"bootstrap {r!r}")
    admin = {"Authorization": "Bearer " + r.json()["secret"]}
    r = http("PUT", base + "/v1/acl/policies/prod-rw", headers=admin,
             json_body={"rules": [{"namespace": "prod", "rights": ["read", "write"]}]})
    check_eq(r.status, 200, f"policy {r!r}")
    r = http("POST", base + "/v1/acl/tokens", headers=admin, json_body={"policies": ["prod-rw"]})
    check_eq(r.status, 201, f"token {r!r}")
    user, password = r.json()["id"], r.json()["secret"]

    step("login, register and list in prod")
    c = nacos.NacosClient(nacos_addr, namespace="prod", username=user, password=password)
    check(c.add_naming_instance("web", "10.8.0.1", 8080, ephemeral=False) is True, "register in prod")
    r = http("GET", base + "/v1/namespaces/prod/services/web", headers=admin)
    check_eq([i["host"] for i in r.json()["instances"]], ["10.8.0.1"], "instances seen natively")
    hosts = c.list_naming_instance("web")["hosts"]
    check_eq([h["ip"] for h in hosts], ["10.8.0.1"], "instances listed by the client")

    step("the same token is refused in dev")
    dev = nacos.NacosClient(nacos_addr, namespace="dev", username=user, password=password)
    check(refused(lambda: dev.add_naming_instance("web", "10.8.0.2", 8080, ephemeral=False),
                  "register in dev"), "register in dev was accepted for a prod-only token")
    r = http("GET", base + "/v1/namespaces/dev/services/web", headers=admin)
    check_eq(r.json()["instances"], [], "dev instances")

    step("a wrong password cannot log in")
    # The client logs in when it is made (or on its first call): either refuses.
    check(refused(lambda: nacos.NacosClient(nacos_addr, namespace="prod", username=user,
                                            password="0" * 64).list_naming_instance("web"),
                  "list with a wrong password"),
          "a wrong password was let in")
    r = http("POST", f"http://{nacos_addr}/nacos/v1/auth/login",
             form={"username": user, "password": "0" * 64})
    check_eq(r.status, 401, f"login with a wrong password {r!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nacos", required=True, type=loopback_addr)
    ap.add_argument("--http", required=True, type=loopback_addr)
    args = ap.parse_args()
    signal.alarm(120)
    try:
        flow(args.nacos, args.http)
    except BaseException as e:  # noqa: BLE001
        fail_and_exit(f"{type(e).__name__}: {e}")
        os._exit(1)
    log("PASS: v1 auth flow")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
