#!/usr/bin/env python3
"""The Nacos Python SDK 3.x (Nacos 2.x gRPC) with username/password against Sextant with auth on.

Usage: v2_auth_flow.py --nacos 127.0.0.1:P --http 127.0.0.1:H

Sets up through Sextant's native API (bootstrap, a policy `read`+`write` on namespace `prod`,
a token holding it), then: the SDK logs in (`/nacos/v1/auth/users/login`, username = the token's
id, password = its secret) and registers and queries in `prod` (the native API, with the admin
token, sees the instance); the same client is refused in namespace `dev`; a client with a wrong
password cannot register; a 1.x HTTP call without `accessToken` is a 401.

Prints each step; any failed check prints `FAIL: ...` and exits 1. Every call is bounded.
"""

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Failure, check, check_eq, fail_and_exit, http, log, loopback_addr, step  # noqa: E402

from v2.nacos import (ClientConfigBuilder, GRPCConfig, ListInstanceParam,  # noqa: E402
                     NacosNamingService, RegisterInstanceParam)

CALL = 15.0
WHOLE = 120


async def bounded(what, aw, timeout=CALL):
    try:
        return await asyncio.wait_for(aw, timeout)
    except asyncio.TimeoutError:
        raise Failure(f"{what}: no answer within {timeout}s")


async def client(nacos, work, tag, namespace, username, password):
    d = os.path.join(work, tag)
    cfg = (ClientConfigBuilder()
           .server_address(nacos)
           .namespace_id(namespace)
           .username(username)
           .password(password)
           .log_dir(os.path.join(d, "logs"))
           .cache_dir(os.path.join(d, "cache"))
           .load_cache_at_start(False)
           .log_level(logging.WARNING)
           .grpc_config(GRPCConfig(grpc_timeout=5000))
           .build())
    return await bounded(f"{tag}: create_naming_service",
                         NacosNamingService.create_naming_service(cfg), 30.0)


async def try_register(svc, tag, **kw):
    """True if registered, False if refused (an exception or a False answer)."""
    try:
        return await bounded(f"{tag}: register_instance", svc.register_instance(RegisterInstanceParam(**kw))) is True
    except Failure:
        raise
    except Exception as e:  # noqa: BLE001 - a refusal surfaces as the SDK's exception
        log(f"    {tag}: refused as expected: {type(e).__name__}: {e}")
        return False


async def flow(nacos, native, work):
    base = f"http://{native}"
    step("setup through the native API")
    r = http("POST", base + "/v1/acl/bootstrap")
    check_eq(r.status, 201, f"bootstrap {r!r}")
    admin = {"Authorization": "Bearer " + r.json()["secret"]}
    r = http("PUT", base + "/v1/acl/policies/prod-rw", headers=admin,
             json_body={"rules": [{"namespace": "prod", "rights": ["read", "write"]}]})
    check_eq(r.status, 200, f"policy {r!r}")
    r = http("POST", base + "/v1/acl/tokens", headers=admin,
             json_body={"policies": ["prod-rw"], "description": "nacos app"})
    check_eq(r.status, 201, f"token {r!r}")
    user, password = r.json()["id"], r.json()["secret"]

    step("1.x HTTP without accessToken is refused")
    r = http("GET", f"http://{nacos}/nacos/v1/ns/instance/list", query={"serviceName": "web"})
    check_eq(r.status, 401, f"list without token {r!r}")

    step("login, register and query in prod")
    good = await client(nacos, work, "good", "prod", user, password)
    ok = await try_register(good, "good", service_name="web", group_name="DEFAULT_GROUP",
                            ip="10.9.0.1", port=8080, weight=1.0, ephemeral=True)
    check(ok, "register in prod with valid credentials was refused")
    r = http("GET", base + "/v1/namespaces/prod/services/web", headers=admin)
    check_eq(r.status, 200, f"native read {r!r}")
    hosts = [i["host"] for i in r.json()["instances"]]
    check_eq(hosts, ["10.9.0.1"], "instances seen natively")
    insts = await bounded("good: list_instances",
                          good.list_instances(ListInstanceParam(service_name="web", group_name="DEFAULT_GROUP",
                                                                clusters=[], healthy_only=None, subscribe=False)))
    check_eq([i.ip for i in insts], ["10.9.0.1"], "instances listed by the SDK")
    r = http("GET", base + "/v1/audit?namespace=prod", headers=admin)
    entries = [e for e in r.json()["entries"] if e["protocol"] == "nacos-grpc"]
    check(any(e["token_id"] == user for e in entries), f"no nacos-grpc audit entry by {user}: {r.json()}")

    step("the same token is refused in dev")
    dev = await client(nacos, work, "dev", "dev", user, password)
    ok = await try_register(dev, "dev", service_name="web", group_name="DEFAULT_GROUP",
                            ip="10.9.0.2", port=8080, weight=1.0, ephemeral=True)
    check(not ok, "register in dev was accepted for a prod-only token")
    r = http("GET", base + "/v1/namespaces/dev/services/web", headers=admin)
    check_eq(r.json()["instances"], [], "dev instances")

    step("a wrong password cannot register")
    bad = await client(nacos, work, "bad", "prod", user, "0" * 64)
    ok = await try_register(bad, "bad", service_name="web", group_name="DEFAULT_GROUP",
                            ip="10.9.0.3", port=8080, weight=1.0, ephemeral=True)
    check(not ok, "register with a wrong password was accepted")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nacos", required=True, type=loopback_addr)
    ap.add_argument("--http", required=True, type=loopback_addr)
    args = ap.parse_args()
    signal.alarm(WHOLE)
    work = tempfile.mkdtemp(prefix="sextant-nacos-auth-")
    try:
        asyncio.run(flow(args.nacos, args.http, work))
    except BaseException as e:  # noqa: BLE001
        fail_and_exit(f"{type(e).__name__}: {e}")
        os._exit(1)
    shutil.rmtree(work, ignore_errors=True)
    log("PASS: v2 auth flow")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
