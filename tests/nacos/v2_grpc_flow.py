#!/usr/bin/env python3
"""The Nacos Python SDK 3.x (`v2.nacos`, Nacos 2.x gRPC) against a Nacos-speaking server.

Usage: v2_grpc_flow.py --nacos 127.0.0.1:P --http 127.0.0.1:H

`--nacos` is the server's Nacos address as a Nacos client is given it (the SDK dials gRPC on
P + 1000); `--http` is Sextant's own HTTP API, through which the flow checks what the Nacos
client did (and registers instances natively for the interop checks).

The flow: register an instance (metadata, weight, cluster) and read it back through the SDK
(ServiceQueryRequest and list_instances, with cluster and health filters) and the native API;
subscribe from another client and see pushes (NotifySubscriberRequest, recorded as they arrive,
not polled: the SDK's periodic updater is off) when a second instance is registered, updated
and deregistered; a non-default group and a non-public namespace; list_services; interop with
instances registered, changed and removed natively; deregistration; and an ephemeral instance
vanishing after the client process that registered it is SIGKILLed.

Prints each step; any failed check prints `FAIL: ...` (and the tail of the SDK's log) to stderr
and exits 1. Every call and wait is bounded.
"""

import argparse
import asyncio
import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (Failure, Native, check, check_eq, fail_and_exit, log, loopback_addr,  # noqa: E402
                    step)

from v2.nacos import (BatchRegisterInstanceParam, ClientConfigBuilder,  # noqa: E402
                     DeregisterInstanceParam, GRPCConfig,
                     ListInstanceParam, ListServiceParam, NacosNamingService,
                     RegisterInstanceParam, SubscribeServiceParam)
from v2.nacos.naming.remote import naming_push_request_handler  # noqa: E402

#: Bound of one SDK call.
CALL = 15.0
#: Bound of connecting a client.
CONNECT = 30.0
#: Bound of a push reaching a subscriber.
PUSH = 10.0
#: Bound of an instance disappearing after its client process is killed.
LAPSE = 20.0
#: Bound of the whole flow (a last resort: every step has its own, smaller bound).
WHOLE = 300

GROUP = "DEFAULT_GROUP"


# --- pushes, recorded where the SDK receives them ------------------------------------------

# (receiving client's cache, Service) for every NotifySubscriberRequest any client received
PUSHES = []
_orig_reply = naming_push_request_handler.NamingPushRequestHandler.request_reply


async def _recording_reply(self, request):
    info = getattr(request, "serviceInfo", None)
    if info is not None:
        PUSHES.append((self.service_info_cache, info))
        tag = CLIENT_TAGS.get(id(self.service_info_cache), "?")
        log(f"    push to {tag}: {info.groupName}@@{info.name} hosts="
            f"{sorted((h.ip, h.port) for h in info.hosts)}")
    return await _orig_reply(self, request)


naming_push_request_handler.NamingPushRequestHandler.request_reply = _recording_reply
CLIENT_TAGS = {}  # id(service_info_cache) -> client tag, for the log


# --- helpers ---------------------------------------------------------------------------------

async def bounded(what, aw, timeout=CALL):
    try:
        return await asyncio.wait_for(aw, timeout)
    except asyncio.TimeoutError:
        raise Failure(f"{what}: no answer within {timeout}s")
    except Failure:
        raise
    except Exception as e:  # the SDK raises NacosException (and others) on refusals
        raise Failure(f"{what}: {type(e).__name__}: {e}")


async def native(fn, *args):
    """Runs a blocking native-API helper off the event loop (the SDK keeps running)."""
    return await asyncio.to_thread(fn, *args)


async def wait_for_cond(what, cond, timeout, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise Failure(f"{what}: not within {timeout}s")
        await asyncio.sleep(interval)


async def wait_native(what, fn, timeout, interval=0.2):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = await native(fn)
        if last:
            return last
        if time.monotonic() >= deadline:
            raise Failure(f"{what}: not within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


def addrs(instances):
    return sorted((i.ip, i.port) for i in instances)


class Client:
    """One NacosNamingService (one gRPC connection) with its own cache and log directories."""

    def __init__(self, tag, svc):
        self.tag = tag
        self.svc = svc

    @classmethod
    async def connect(cls, tag, nacos, work, namespace=""):
        d = os.path.join(work, tag)
        cfg = (ClientConfigBuilder()
               .server_address(nacos)
               .namespace_id(namespace)
               .log_dir(os.path.join(d, "logs"))
               .cache_dir(os.path.join(d, "cache"))
               .load_cache_at_start(False)
               .log_level(logging.INFO)
               .grpc_config(GRPCConfig(grpc_timeout=5000))
               .build())
        # Deliver empty instance lists to subscribers too (the SDK drops them by default), so
        # that "the last instance went away" is seen.
        cfg.set_update_cache_when_empty(True)
        log(f"    connecting client {tag!r} to {nacos} (namespace {namespace or 'public'!r})")
        svc = await bounded(f"client {tag}: create_naming_service",
                            NacosNamingService.create_naming_service(cfg), CONNECT)
        c = cls(tag, svc)
        CLIENT_TAGS[id(svc.service_info_holder)] = tag
        # create_naming_service returns even when it could not connect (it retries in the
        # background): insist on a live connection.
        await wait_for_cond(f"client {tag}: gRPC connection to {nacos}",
                            lambda: svc.grpc_client_proxy.server_health(), CONNECT)
        return c

    async def register(self, **kw):
        p = RegisterInstanceParam(**kw)
        ok = await bounded(f"client {self.tag}: register_instance {kw}", self.svc.register_instance(p))
        check(ok is True, f"client {self.tag}: register_instance {kw} answered {ok!r}")

    async def update(self, **kw):
        p = RegisterInstanceParam(**kw)
        ok = await bounded(f"client {self.tag}: update_instance {kw}", self.svc.update_instance(p))
        check(ok is True, f"client {self.tag}: update_instance {kw} answered {ok!r}")

    async def deregister(self, **kw):
        p = DeregisterInstanceParam(**kw)
        ok = await bounded(f"client {self.tag}: deregister_instance {kw}",
                           self.svc.deregister_instance(p))
        check(ok is True, f"client {self.tag}: deregister_instance {kw} answered {ok!r}")

    async def query(self, service, group=GROUP, clusters="", healthy_only=False):
        """A fresh read from the server (ServiceQueryRequest), bypassing the SDK's cache."""
        info = await bounded(
            f"client {self.tag}: query {group}@@{service}",
            self.svc.grpc_client_proxy.query_instance_of_service(service, group, clusters, healthy_only))
        check(info is not None, f"client {self.tag}: query {group}@@{service} gave no serviceInfo")
        return info

    async def list(self, service, group=GROUP, clusters=None, healthy_only=None):
        """The SDK's list_instances (subscribes on first use, then reads its push-fed cache)."""
        p = ListInstanceParam(service_name=service, group_name=group, clusters=clusters or [],
                              healthy_only=healthy_only)
        return await bounded(f"client {self.tag}: list_instances {service} {group}",
                             self.svc.list_instances(p))

    async def subscribe(self, service, group=GROUP, clusters=None):
        calls = []

        async def cb(instances):
            calls.append(list(instances))
            log(f"    callback on {self.tag}: {group}@@{service} -> {addrs(instances)}")

        p = SubscribeServiceParam(service_name=service, group_name=group, clusters=clusters or [],
                                  subscribe_callback=cb)
        await bounded(f"client {self.tag}: subscribe {group}@@{service}", self.svc.subscribe(p))
        return calls

    async def close(self):
        try:
            await asyncio.wait_for(self.svc.shutdown(), 10)
        except Exception as e:  # closing is best effort; the checks are what count
            log(f"    (client {self.tag} shutdown: {type(e).__name__}: {e})")


def marks(calls):
    """Where PUSHES and a subscriber's callback list stand now (for `expect_push`)."""
    return len(PUSHES), len(calls)


async def expect_push(what, sub, calls, mark, service, group, pred, timeout=PUSH):
    """Waits for a NotifySubscriberRequest of `group@@service` to client `sub` since `mark`
    (from `marks(calls)`) whose hosts satisfy `pred`, and for `sub`'s callback (`calls`) to be
    called with the same since then."""
    pmark, cmark = mark

    def pushed():
        for cache, info in PUSHES[pmark:]:
            if cache is sub.svc.service_info_holder and info.name == service \
                    and info.groupName == group and pred(info.hosts):
                return info
        return None

    try:
        info = await wait_for_cond(f"{what}: push", pushed, timeout)
    except Failure:
        seen = [(CLIENT_TAGS.get(id(c)), f"{i.groupName}@@{i.name}",
                 [(h.ip, h.port, "enabled" if h.enabled else "disabled",
                   "healthy" if h.healthy else "unhealthy", h.weight, h.metadata) for h in i.hosts])
                for c, i in PUSHES[pmark:]]
        raise Failure(f"{what}: no NotifySubscriberRequest to client {sub.tag} for {group}@@{service} "
                      f"matching within {timeout}s; pushes since (client, service, hosts): {seen}")
    await wait_for_cond(f"{what}: subscriber callback",
                        lambda: any(pred(c) for c in calls[cmark:]), timeout)
    return info


def one(instances, ip, port, what):
    found = [i for i in instances if i.ip == ip and i.port == port]
    check(len(found) == 1, f"{what}: expected {ip}:{port} once, got {addrs(instances)}")
    return found[0]


def check_instance(i, *, ip, port, weight, cluster, metadata, what, ephemeral=True):
    check_eq((i.ip, i.port), (ip, port), f"{what}: address")
    check(abs(i.weight - weight) < 1e-9, f"{what}: weight expected {weight}, got {i.weight}")
    check_eq(i.clusterName, cluster, f"{what}: clusterName")
    for k, v in metadata.items():
        check_eq(i.metadata.get(k), v, f"{what}: metadata[{k!r}] (all: {i.metadata})")
    check_eq(i.healthy, True, f"{what}: healthy")
    check_eq(i.enabled, True, f"{what}: enabled")
    if ephemeral is not None:
        check_eq(i.ephemeral, ephemeral, f"{what}: ephemeral")


# --- the flow ---------------------------------------------------------------------------------

async def flow(nacos, http_addr, work):
    nat = Native(http_addr)
    run = str(os.getpid())
    svc = f"py-v2-orders-{run}"
    clients = []

    async def connect(tag, namespace=""):
        c = await Client.connect(tag, nacos, work, namespace)
        clients.append(c)
        return c

    try:
        step("connect three clients (a: registers, b: second instance, s: subscriber)")
        a = await connect("a")
        b = await connect("b")
        s = await connect("s")

        step(f"register {svc} 127.0.0.10:8080 (weight 2.5, cluster c1, metadata) through client a")
        meta = {"team": "pay", "version": "1.2.3"}
        await a.register(service_name=svc, group_name=GROUP, ip="127.0.0.10", port=8080, weight=2.5,
                         cluster_name="c1", metadata=meta, ephemeral=True)

        step("read it back with a fresh query (ServiceQueryRequest)")
        info = await a.query(svc)
        # The SDK keys its cache by groupName + "@@" + name: the name must come without the group.
        check_eq(info.name, svc, "query: serviceInfo.name")
        check_eq(info.groupName, GROUP, "query: groupName")
        i = one(info.hosts, "127.0.0.10", 8080, "query")
        check_instance(i, ip="127.0.0.10", port=8080, weight=2.5, cluster="c1", metadata=meta,
                       what="query")
        log(f"    {i}")

        step("list_instances from client b: all, cluster c1, cluster other, healthy only")
        got = await b.list(svc)
        check_instance(one(got, "127.0.0.10", 8080, "list"), ip="127.0.0.10", port=8080, weight=2.5,
                       cluster="c1", metadata=meta, what="list_instances")
        check_eq(addrs(await b.list(svc, clusters=["c1"])), [("127.0.0.10", 8080)],
                 "list_instances clusters=[c1]")
        check_eq(addrs(await b.list(svc, clusters=["other"])), [], "list_instances clusters=[other]")
        check_eq(addrs(await b.list(svc, healthy_only=True)), [("127.0.0.10", 8080)],
                 "list_instances healthy_only=True")
        info = await a.query(svc, clusters="c1")
        check_eq(addrs(info.hosts), [("127.0.0.10", 8080)], "query cluster=c1")
        info = await a.query(svc, clusters="other")
        check_eq(addrs(info.hosts), [], "query cluster=other")

        step("the native API shows it (public/<svc>: weight 250, cell c1, metadata)")
        n = await native(nat.find, "public", svc, "127.0.0.10", 8080)
        check(n is not None, f"native: {svc} has no 127.0.0.10:8080: {await native(nat.instances, 'public', svc)}")
        check_eq(n.get("cell"), "c1", "native cell")
        check_eq(n.get("status", {}).get("weight"), 250, f"native weight (instance {n})")
        for k, v in meta.items():
            check_eq(n.get("metadata", {}).get(k), v, f"native metadata[{k!r}]")

        step("subscribe from client s; the callback sees the current instance")
        calls = await s.subscribe(svc)
        await wait_for_cond("initial callback with 127.0.0.10:8080",
                            lambda: any(addrs(c) == [("127.0.0.10", 8080)] for c in calls), PUSH)

        step("client b registers a second instance 127.0.0.11:8081: pushed to s")
        mark = marks(calls)
        await b.register(service_name=svc, ip="127.0.0.11", port=8081, weight=1.0, cluster_name="c1",
                         metadata={"team": "pay"})
        two = [("127.0.0.10", 8080), ("127.0.0.11", 8081)]
        await expect_push("second instance", s, calls, mark, svc, GROUP, lambda h: addrs(h) == two)

        step("client a updates its instance (weight 5, metadata): pushed to s")
        mark = marks(calls)
        meta2 = {"team": "pay", "version": "1.2.4"}
        await a.update(service_name=svc, ip="127.0.0.10", port=8080, weight=5.0, cluster_name="c1",
                       metadata=meta2)

        def updated(hosts):
            return any(h.port == 8080 and abs(h.weight - 5.0) < 1e-9
                       and h.metadata.get("version") == "1.2.4" for h in hosts) and len(hosts) == 2
        await expect_push("update", s, calls, mark, svc, GROUP, updated)

        step("client a disables its instance (enabled=False): Nacos serves and pushes enabled "
             "instances only; then enables it again")
        mark = marks(calls)
        await a.update(service_name=svc, ip="127.0.0.10", port=8080, weight=5.0, cluster_name="c1",
                       metadata=meta2, enabled=False)
        await expect_push("disable", s, calls, mark, svc, GROUP,
                          lambda h: addrs(h) == [("127.0.0.11", 8081)])
        check_eq(addrs((await a.query(svc)).hosts), [("127.0.0.11", 8081)], "query without the disabled")
        n = await native(nat.find, "public", svc, "127.0.0.10", 8080)
        check(n is not None and n.get("status", {}).get("enabled") is False,
              f"native: the disabled instance should be there with enabled false: {n}")
        mark = marks(calls)
        await a.update(service_name=svc, ip="127.0.0.10", port=8080, weight=5.0, cluster_name="c1",
                       metadata=meta2, enabled=True)
        await expect_push("enable", s, calls, mark, svc, GROUP, lambda h: addrs(h) == two)

        step("client b deregisters 127.0.0.11:8081: pushed to s")
        mark = marks(calls)
        await b.deregister(service_name=svc, ip="127.0.0.11", port=8081, cluster_name="c1")
        await expect_push("deregistration", s, calls, mark, svc, GROUP,
                          lambda h: addrs(h) == [("127.0.0.10", 8080)])
        check_eq(await native(nat.find, "public", svc, "127.0.0.11", 8081), None,
                 "native: 127.0.0.11:8081 after deregistration")

        step("list_services (DEFAULT_GROUP, public) names the service")
        sl = await bounded("list_services", a.svc.list_services(ListServiceParam(page_size=1000)))
        check(svc in sl.services, f"list_services: {svc} not in {sl.services} (count {sl.count})")

        grouped = f"py-v2-grouped-{run}"
        step(f"non-default group: pay-group@@{grouped} through client b")
        await b.register(service_name=grouped, group_name="pay-group", ip="127.0.0.12", port=8082,
                         cluster_name="DEFAULT")
        info = await a.query(grouped, group="pay-group")
        check_eq(info.groupName, "pay-group", "grouped query: groupName")
        check_eq(addrs(info.hosts), [("127.0.0.12", 8082)], "grouped query: hosts")
        info = await a.query(grouped, group=GROUP)
        check_eq(addrs(info.hosts), [], "the same name in DEFAULT_GROUP")
        n = await native(nat.find, "public", f"pay-group@@{grouped}", "127.0.0.12", 8082)
        check(n is not None, f"native: public/pay-group@@{grouped} lacks 127.0.0.12:8082")
        check_eq(await native(nat.instances, "public", grouped), [],
                 f"native: public/{grouped} (the DEFAULT_GROUP name) must be empty")
        sl = await bounded("list_services pay-group",
                           a.svc.list_services(ListServiceParam(group_name="pay-group", page_size=1000)))
        check(grouped in sl.services, f"list_services(pay-group): {grouped} not in {sl.services}")
        await b.deregister(service_name=grouped, group_name="pay-group", ip="127.0.0.12", port=8082,
                           cluster_name="DEFAULT")
        info = await a.query(grouped, group="pay-group")
        check_eq(addrs(info.hosts), [], "grouped query after deregistration")

        bsvc = f"py-v2-batch-{run}"
        step(f"batch register two instances of {bsvc} from client b (BatchInstanceRequest)")
        batch = [RegisterInstanceParam(service_name=bsvc, ip="127.0.0.14", port=p, weight=1.0,
                                       cluster_name="DEFAULT", metadata={"n": str(p)}, ephemeral=True)
                 for p in (8084, 8085)]
        ok = await bounded("batch_register_instances", b.svc.batch_register_instances(
            BatchRegisterInstanceParam(service_name=bsvc, group_name=GROUP, instances=batch)))
        check(ok is True, f"batch_register_instances answered {ok!r}")
        info = await a.query(bsvc)
        check_eq(addrs(info.hosts), [("127.0.0.14", 8084), ("127.0.0.14", 8085)], "batch query")
        check_eq(sorted(h.metadata.get("n") for h in info.hosts), ["8084", "8085"], "batch metadata")
        check_eq(len(await native(nat.instances, "public", bsvc)), 2, "native: batch instances")
        step("batch deregister one of them (the SDK re-sends the batch without it)")
        ok = await bounded("batch_deregister_instances", b.svc.batch_deregister_instances(
            BatchRegisterInstanceParam(service_name=bsvc, group_name=GROUP, instances=batch[:1])))
        check(ok is True, f"batch_deregister_instances answered {ok!r}")
        info = await a.query(bsvc)
        check_eq(addrs(info.hosts), [("127.0.0.14", 8085)], "query after the batch deregistration")
        check_eq([(i["host"], i["port"]) for i in await native(nat.instances, "public", bsvc)],
                 [("127.0.0.14", 8085)], "native after the batch deregistration")

        ns = f"py-ns-{run}"
        nsvc = f"py-v2-ns-{run}"
        step(f"non-public namespace {ns}: register, read back, invisible from public")
        c = await connect("n", namespace=ns)
        await c.register(service_name=nsvc, ip="127.0.0.13", port=8083, cluster_name="DEFAULT",
                         metadata={"ns": ns})
        info = await c.query(nsvc)
        check_eq(addrs(info.hosts), [("127.0.0.13", 8083)], f"query in {ns}")
        check_eq(info.hosts[0].metadata.get("ns"), ns, f"metadata in {ns}")
        info = await a.query(nsvc)
        check_eq(addrs(info.hosts), [], f"public query of {nsvc}")
        n = await native(nat.find, ns, nsvc, "127.0.0.13", 8083)
        check(n is not None, f"native: {ns}/{nsvc} lacks 127.0.0.13:8083: "
                             f"{await native(nat.instances, ns, nsvc)}")
        check_eq(await native(nat.instances, "public", nsvc), [], f"native public/{nsvc}")
        await c.deregister(service_name=nsvc, ip="127.0.0.13", port=8083, cluster_name="DEFAULT")
        check_eq(addrs((await c.query(nsvc)).hosts), [], f"query in {ns} after deregistration")

        isvc = f"py-v2-interop-{run}"
        step(f"interop: a native registration of {isvc} shows to the Nacos client")
        nat_meta = {"from": "native", "zone": "z1"}
        await native(nat.register, "public", isvc, "native-1",
                     {"host": "127.0.0.20", "port": 9090, "cell": "c9", "metadata": nat_meta,
                      "status": {"weight": 300}})
        info = await a.query(isvc)
        i = one(info.hosts, "127.0.0.20", 9090, "query of the native instance")
        check_instance(i, ip="127.0.0.20", port=9090, weight=3.0, cluster="c9", metadata=nat_meta,
                       what="native instance seen by Nacos", ephemeral=None)

        step("interop: native changes are pushed to a Nacos subscriber")
        icalls = await s.subscribe(isvc)
        await wait_for_cond("initial callback of the interop service",
                            lambda: any(addrs(c) == [("127.0.0.20", 9090)] for c in icalls), PUSH)
        mark = marks(icalls)
        await native(nat.register, "public", isvc, "native-2", {"host": "127.0.0.21", "port": 9091})
        await expect_push("native registration", s, icalls, mark, isvc, GROUP,
                          lambda h: addrs(h) == [("127.0.0.20", 9090), ("127.0.0.21", 9091)])
        mark = marks(icalls)
        await native(nat.set_status, "public", isvc, "native-2", {"weight": 50})
        await expect_push("native weight change", s, icalls, mark, isvc, GROUP,
                          lambda h: any(x.port == 9091 and abs(x.weight - 0.5) < 1e-9 for x in h))
        mark = marks(icalls)
        await native(nat.deregister, "public", isvc, "native-2")
        await expect_push("native deregistration", s, icalls, mark, isvc, GROUP,
                          lambda h: addrs(h) == [("127.0.0.20", 9090)])
        mark = marks(icalls)
        await native(nat.deregister, "public", isvc, "native-1")
        await expect_push("native deregistration of the last instance", s, icalls, mark, isvc, GROUP,
                          lambda h: addrs(h) == [])

        step("client a deregisters 127.0.0.10:8080: gone for Nacos and native, pushed empty to s")
        mark = marks(calls)
        await a.deregister(service_name=svc, ip="127.0.0.10", port=8080, cluster_name="c1")
        await expect_push("last deregistration", s, calls, mark, svc, GROUP, lambda h: addrs(h) == [])
        check_eq(addrs((await a.query(svc)).hosts), [], "query after deregistration")
        check_eq(await native(nat.instances, "public", svc), [], "native after deregistration")

        esvc = f"py-v2-ephemeral-{run}"
        step(f"ephemeral removal: a child process registers {esvc} 127.0.0.30:7070, is SIGKILLed")
        ecalls = await s.subscribe(esvc)
        await child_killed_flow(nacos, work, nat, esvc, s, ecalls)
    finally:
        for c in clients:
            await c.close()


async def child_killed_flow(nacos, work, nat, esvc, sub, ecalls):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(__file__), "--child", "--nacos", nacos, "--service", esvc,
        "--work", work, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        deadline = time.monotonic() + CONNECT + CALL
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure("child: no REGISTERED line in time")
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), left)
            except asyncio.TimeoutError:
                raise Failure("child: no REGISTERED line in time")
            if not line:
                raise Failure(f"child exited before registering (code {await proc.wait()})")
            text = line.decode(errors="replace").rstrip()
            log(f"    child: {text}")
            if text == "REGISTERED":
                break
        n = await native(nat.find, "public", esvc, "127.0.0.30", 7070)
        check(n is not None, f"native: {esvc} lacks the child's 127.0.0.30:7070")
        await wait_for_cond("subscriber sees the child's instance",
                            lambda: any(addrs(c) == [("127.0.0.30", 7070)] for c in ecalls), PUSH)
        mark = marks(ecalls)
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        log(f"    child SIGKILLed (exit {proc.returncode}); waiting up to {LAPSE}s for the instance to go")
        await wait_native(f"{esvc} 127.0.0.30:7070 removed after its client was killed",
                          lambda: nat.find("public", esvc, "127.0.0.30", 7070) is None, LAPSE)
        log(f"    gone from the native API after {time.monotonic() - killed_at:.1f}s")
        left = max(1.0, LAPSE - (time.monotonic() - killed_at))
        await expect_push("removal after the kill", sub, ecalls, mark, esvc, GROUP,
                          lambda h: addrs(h) == [], timeout=left)
        log(f"    pushed to the subscriber after {time.monotonic() - killed_at:.1f}s")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def child(nacos, service, work):
    """Registers 127.0.0.30:7070 in `service`, says REGISTERED, then waits to be killed."""
    c = await Client.connect("child", nacos, work)
    await c.register(service_name=service, ip="127.0.0.30", port=7070, cluster_name="DEFAULT")
    print("REGISTERED", flush=True)
    await asyncio.sleep(120)  # bounded: the parent kills us long before
    raise Failure("child: not killed within 120s")


def dump_logs(work):
    """The tail of the SDK's log. Every client of the process logs to the one `naming` logger,
    so the first client's file has it all."""
    paths = glob.glob(os.path.join(work, "*", "logs", "naming.log"))
    if not paths:
        return ""
    path = max(paths, key=os.path.getsize)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()[-30:]
    except OSError:
        return ""
    return f"--- tail of the SDK's log {path}\n" + "".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nacos", required=True, type=loopback_addr,
                    help="Nacos server address host:port (gRPC on port + 1000)")
    ap.add_argument("--http", type=loopback_addr, help="Sextant's native HTTP API host:port")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--service", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        try:
            asyncio.run(asyncio.wait_for(child(args.nacos, args.service, args.work), 180))
        except BaseException as e:  # noqa: BLE001 - report anything, then exit non-zero
            fail_and_exit(f"child: {e!r}")
            os._exit(1)
        os._exit(1)

    if not args.http:
        ap.error("--http is required")
    signal.alarm(WHOLE)  # the last resort bound of the whole flow
    work = tempfile.mkdtemp(prefix="sextant-nacos-py-v2-")
    started = time.monotonic()
    try:
        asyncio.run(flow(args.nacos, args.http, work))
    except Failure as e:
        fail_and_exit(e, dump_logs(work))
        sys.stdout.flush()
        os._exit(1)
    except BaseException as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        fail_and_exit(f"unexpected {type(e).__name__}: {e}", dump_logs(work))
        os._exit(1)
    shutil.rmtree(work, ignore_errors=True)
    log(f"PASS: v2 gRPC flow ({time.monotonic() - started:.1f}s)")
    sys.stdout.flush()
    # The SDK leaves background tasks and gRPC channels; do not wait for them.
    os._exit(0)


if __name__ == "__main__":
    main()
