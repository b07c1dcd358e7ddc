#!/usr/bin/env python3
"""The old Nacos Python SDK (`nacos.NacosClient`, 1.x line, Nacos 1.x HTTP Open API) and raw
requests shaped like the Java 1.4 client's, against a Nacos-speaking server.

Usage: v1_http_flow.py --nacos 127.0.0.1:P --http 127.0.0.1:H

`--nacos` is the server's Nacos HTTP address; `--http` is Sextant's own HTTP API, through which
the flow checks what the Nacos client did (and flips an instance's health natively).

The flow: register with automatic heartbeats; list with healthyOnly and clusters filters; get
one instance; modify weight, metadata and enabled; send_heartbeat (and its answer), a beat that
re-registers an unknown instance, a light beat answering 20404; a non-public namespace;
register / modify / beat / deregister without a cluster (the instance really gone); service
create / get / list / update (protectThreshold) / delete; deregistration; the raw
register / list / beat / deregister requests of the Java 1.4 client (parameters in the query
string with an empty form body, and in a form body); bad input answered 400 with a message;
an instance kept alive by beats past its lease, and one without beats gone (or unhealthy).

Prints each step; any failed check prints `FAIL: ...` to stderr and exits 1. Every call and wait
is bounded.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (Failure, Native, check, check_eq, fail_and_exit, http, log,  # noqa: E402
                    loopback_addr, step)

import nacos  # noqa: E402
import nacos.client  # noqa: E402

# The SDK turns an HTTP error into "Request Error, code is 400" and drops the server's message:
# keep the last one, for failure messages.
LAST_HTTP_ERROR = []
_orig_do_sync_req = nacos.client.NacosClient._do_sync_req


def _recording_do_sync_req(self, url, *args, **kwargs):
    try:
        return _orig_do_sync_req(self, url, *args, **kwargs)
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace")
        method = kwargs.get("method", args[4] if len(args) > 4 else "GET")
        params = kwargs.get("params", args[1] if len(args) > 1 else None)
        LAST_HTTP_ERROR[:] = [f"{method} {url} {params} -> HTTP {e.code} {body!r}"]
        raise


nacos.client.NacosClient._do_sync_req = _recording_do_sync_req

#: The SDK's per-request timeout, in seconds.
SDK_TIMEOUT = 5
#: Bound of the whole flow (a last resort: every step has its own, smaller bound).
WHOLE = 240
#: How long an ephemeral 1.x instance lives without beats (Nacos: unhealthy after 15 s, removed
#: after 30 s; Sextant: a 15 s lease). The flow checks the instances it left alone after this
#: plus a margin.
LEASE = 15.0
MARGIN = 5.0

GROUP = "DEFAULT_GROUP"

# What the Java 1.4 client puts on every naming request.
JAVA_HEADERS = {
    "Client-Version": "Nacos-Java-Client:v1.4.1",
    "User-Agent": "Nacos-Java-Client:v1.4.1",
    "Accept-Encoding": "gzip,deflate,sdch",
    "Request-Module": "Naming",
    "Content-Type": "application/x-www-form-urlencoded;charset=UTF-8",
}


def hosts_of(listing):
    check(isinstance(listing, dict) and isinstance(listing.get("hosts"), list),
          f"instance list answer without hosts: {listing!r}")
    return listing["hosts"]


def addrs(hosts):
    return sorted((h["ip"], h["port"]) for h in hosts)


def one(hosts, ip, port, what):
    found = [h for h in hosts if h.get("ip") == ip and h.get("port") == port]
    check(len(found) == 1, f"{what}: expected {ip}:{port} once, got {addrs(hosts)}")
    return found[0]


def approx(a, b):
    return a is not None and abs(float(a) - float(b)) < 1e-9


class Flow:
    def __init__(self, nacos_addr, http_addr, work):
        self.nacos_addr = nacos_addr
        self.base = f"http://{nacos_addr}"
        self.native = Native(http_addr)
        self.work = work
        self.run = str(os.getpid())
        self.client = self.new_client("public-client")

    def new_client(self, tag, namespace=None):
        c = nacos.NacosClient(self.nacos_addr, namespace=namespace,
                              logDir=os.path.join(self.work, tag))
        c.set_options(default_timeout=SDK_TIMEOUT)
        return c

    def sdk(self, what, fn, *args, **kw):
        """An SDK call; its exceptions become failures naming the call."""
        LAST_HTTP_ERROR.clear()
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - the SDK raises NacosException and urllib errors
            answer = f" (the request: {LAST_HTTP_ERROR[0]})" if LAST_HTTP_ERROR else ""
            raise Failure(f"{what}: {type(e).__name__}: {e}{answer}")

    def nacos(self, method, path, *, query=None, form=None, headers=None):
        return http(method, self.base + path, query=query, form=form, headers=headers)

    def list(self, svc, **kw):
        return hosts_of(self.sdk(f"list_naming_instance {svc} {kw}",
                                 self.client.list_naming_instance, svc, **kw))

    # -----------------------------------------------------------------------------------------

    def main(self):
        started = time.monotonic()
        svc = f"py-v1-orders-{self.run}"
        lapse_svc = f"py-v1-lapse-{self.run}"

        step(f"register {svc} 127.0.0.40:8080 (cluster c1, weight 2, metadata) with beats every 2 s")
        ok = self.sdk("add_naming_instance", self.client.add_naming_instance, svc, "127.0.0.40", 8080,
                      cluster_name="c1", weight=2.0, metadata={"team": "pay", "v": "1"},
                      ephemeral=True, heartbeat_interval=2)
        check_eq(ok, True, "add_naming_instance answer is 'ok'")
        t_registered = time.monotonic()

        step(f"register {lapse_svc} 127.0.0.49:8089 without beats (must lapse after its lease)")
        ok = self.sdk("add_naming_instance", self.client.add_naming_instance, lapse_svc, "127.0.0.49",
                      8089, cluster_name="c1", ephemeral=True)
        check_eq(ok, True, "add_naming_instance (no beats) answer")
        t_lapse = time.monotonic()

        step("register a second instance 127.0.0.41:8081 in cluster c2")
        ok = self.sdk("add_naming_instance", self.client.add_naming_instance, svc, "127.0.0.41", 8081,
                      cluster_name="c2", weight=1.0, metadata={"team": "pay"}, ephemeral=True,
                      heartbeat_interval=2)
        check_eq(ok, True, "add_naming_instance (second) answer")

        step("list: both; clusters=c1 and c2 filter; the host fields as Nacos gives them")
        listing = self.sdk("list_naming_instance", self.client.list_naming_instance, svc)
        check_eq(listing.get("name"), f"{GROUP}@@{svc}", "list: name")
        check(listing.get("cacheMillis", 0) > 0, f"list: cacheMillis {listing.get('cacheMillis')!r}")
        hosts = hosts_of(listing)
        check_eq(addrs(hosts), [("127.0.0.40", 8080), ("127.0.0.41", 8081)], "list: hosts")
        h = one(hosts, "127.0.0.40", 8080, "list")
        check(approx(h.get("weight"), 2.0), f"list: weight {h.get('weight')!r}")
        check_eq(h.get("clusterName"), "c1", "list: clusterName")
        check_eq(h.get("metadata"), {"team": "pay", "v": "1"}, "list: metadata")
        check_eq((h.get("healthy"), h.get("enabled"), h.get("ephemeral")), (True, True, True),
                 "list: healthy, enabled, ephemeral")
        check_eq(h.get("serviceName"), f"{GROUP}@@{svc}", "list: host serviceName")
        check(h.get("instanceId"), f"list: no instanceId in {h}")
        check_eq(addrs(self.list(svc, clusters="c1")), [("127.0.0.40", 8080)], "list clusters=c1")
        check_eq(addrs(self.list(svc, clusters="c2")), [("127.0.0.41", 8081)], "list clusters=c2")
        check_eq(addrs(self.list(svc, clusters="c1,c2")), [("127.0.0.40", 8080), ("127.0.0.41", 8081)],
                 "list clusters=c1,c2")
        check_eq(addrs(self.list(svc, clusters="nope")), [], "list clusters=nope")

        step("healthyOnly: mark 127.0.0.41:8081 unhealthy natively, then list")
        n = self.native.find("public", svc, "127.0.0.41", 8081)
        check(n is not None, f"native: {svc} lacks 127.0.0.41:8081: {self.native.instances('public', svc)}")
        check_eq(n.get("cell"), "c2", "native: cell of 127.0.0.41:8081")
        self.native.set_status("public", svc, n["id"], {"health": "unhealthy"})
        check_eq(addrs(self.list(svc, healthy_only=True)), [("127.0.0.40", 8080)], "list healthyOnly=true")
        everything = self.list(svc, healthy_only=False)
        check_eq(addrs(everything), [("127.0.0.40", 8080), ("127.0.0.41", 8081)], "list healthyOnly=false")
        check_eq(one(everything, "127.0.0.41", 8081, "list")["healthy"], False,
                 "list: healthy of the unhealthy instance")
        self.native.set_status("public", svc, n["id"], {"health": "healthy"})
        check_eq(addrs(self.list(svc, healthy_only=True)), [("127.0.0.40", 8080), ("127.0.0.41", 8081)],
                 "list healthyOnly=true after it is healthy again")

        step("get_naming_instance 127.0.0.40:8080 c1")
        got = self.sdk("get_naming_instance", self.client.get_naming_instance, svc, "127.0.0.40", 8080,
                       cluster_name="c1")
        check_eq((got.get("ip"), got.get("port")), ("127.0.0.40", 8080), f"get: address ({got})")
        check(approx(got.get("weight"), 2.0), f"get: weight {got.get('weight')!r}")
        check_eq(got.get("clusterName"), "c1", "get: clusterName")
        check_eq(got.get("metadata"), {"team": "pay", "v": "1"}, "get: metadata")
        check_eq(got.get("healthy"), True, "get: healthy")

        step("modify_naming_instance: weight 3, metadata v=2")
        ok = self.sdk("modify_naming_instance", self.client.modify_naming_instance, svc, "127.0.0.40", 8080,
                      cluster_name="c1", weight=3.0, metadata={"team": "pay", "v": "2"})
        check_eq(ok, True, "modify_naming_instance answer")
        h = one(self.list(svc), "127.0.0.40", 8080, "list after modify")
        check(approx(h.get("weight"), 3.0), f"weight after modify: {h.get('weight')!r}")
        check_eq(h.get("metadata", {}).get("v"), "2", "metadata after modify")
        n = self.native.find("public", svc, "127.0.0.40", 8080)
        check_eq(n.get("status", {}).get("weight"), 300, f"native weight after modify ({n})")

        step("modify_naming_instance enable=False: out of the list, get says enabled false; back")
        ok = self.sdk("modify_naming_instance", self.client.modify_naming_instance, svc, "127.0.0.41", 8081,
                      cluster_name="c2", enable=False)
        check_eq(ok, True, "modify enable=False answer")
        check_eq(addrs(self.list(svc)), [("127.0.0.40", 8080)], "list without the disabled instance")
        got = self.sdk("get_naming_instance", self.client.get_naming_instance, svc, "127.0.0.41", 8081,
                       cluster_name="c2")
        # Nacos' GET /instance finds disabled instances too (its answer has no `enabled` field;
        # if one is given it must say false).
        check_eq((got.get("ip"), got.get("port")), ("127.0.0.41", 8081), f"get of the disabled instance ({got})")
        check(got.get("enabled", False) is False, f"get: enabled of the disabled instance ({got})")
        n = self.native.find("public", svc, "127.0.0.41", 8081)
        check_eq(n.get("status", {}).get("enabled"), False, f"native enabled ({n})")
        ok = self.sdk("modify_naming_instance", self.client.modify_naming_instance, svc, "127.0.0.41", 8081,
                      cluster_name="c2", enable=True)
        check_eq(ok, True, "modify enable=True answer")
        check_eq(addrs(self.list(svc)), [("127.0.0.40", 8080), ("127.0.0.41", 8081)],
                 "list with the instance enabled again")

        step("send_heartbeat for a registered instance: code 10200 and a beat interval")
        beat = self.sdk("send_heartbeat", self.client.send_heartbeat, svc, "127.0.0.40", 8080,
                        cluster_name="c1", weight=3.0, metadata={"team": "pay", "v": "2"})
        check_eq(beat.get("code"), 10200, f"beat answer {beat}")
        check(isinstance(beat.get("clientBeatInterval"), int) and beat["clientBeatInterval"] > 0,
              f"beat answer clientBeatInterval: {beat}")

        step("send_heartbeat (with beat info) for an unknown instance re-registers it")
        beat = self.sdk("send_heartbeat", self.client.send_heartbeat, svc, "127.0.0.42", 8082,
                        cluster_name="c1", weight=1.0, metadata={"from": "beat"})
        check_eq(beat.get("code"), 10200, f"beat answer for an unknown instance {beat}")
        h = one(self.list(svc), "127.0.0.42", 8082, "list after the re-registering beat")
        check_eq(h.get("clusterName"), "c1", "re-registered by beat: clusterName")
        check_eq(h.get("metadata", {}).get("from"), "beat", "re-registered by beat: metadata")
        ok = self.sdk("remove_naming_instance", self.client.remove_naming_instance, svc, "127.0.0.42", 8082,
                      cluster_name="c1")
        check_eq(ok, True, "remove the beat-registered instance")

        step("a light beat (no beat info) for an unknown instance answers 20404")
        r = self.nacos("PUT", "/nacos/v1/ns/instance/beat",
                       query={"serviceName": f"{GROUP}@@{svc}", "clusterName": "c1",
                              "ip": "127.0.0.43", "port": "8083"}, form={}, headers=JAVA_HEADERS)
        check_eq(r.status, 200, f"light beat for an unknown instance: {r!r}")
        check_eq(r.json().get("code"), 20404, f"light beat for an unknown instance: {r!r}")
        r = self.nacos("PUT", "/nacos/v1/ns/instance/beat",
                       query={"serviceName": f"{GROUP}@@{svc}", "clusterName": "c1",
                              "ip": "127.0.0.40", "port": "8080"}, form={}, headers=JAVA_HEADERS)
        check_eq((r.status, r.json().get("code")), (200, 10200), f"light beat for a known instance: {r!r}")

        self.namespace_flow()
        self.no_cluster_flow()
        self.service_flow()
        self.java_flow()
        self.bad_input_flow()

        step("beats keep an instance past its lease; one without beats lapses")
        wait_for = max(t_registered, t_lapse) + LEASE + MARGIN - time.monotonic()
        if wait_for > 0:
            log(f"    waiting {wait_for:.1f}s (lease {LEASE}s + {MARGIN}s since registering)")
            time.sleep(wait_for)
        hosts = self.list(svc, healthy_only=True)
        check_eq(addrs(hosts), [("127.0.0.40", 8080), ("127.0.0.41", 8081)],
                 "instances with beats, healthy, after the lease")
        lapsed = self.list(lapse_svc, healthy_only=True)
        check_eq(addrs(lapsed), [], f"{lapse_svc}: the instance without beats is not served after the lease")
        native_lapsed = self.native.instances("public", lapse_svc)
        check(all(i.get("status", {}).get("health") != "healthy" for i in native_lapsed),
              f"native: {lapse_svc} still healthy after its lease: {native_lapsed}")

        step("deregister both (stopping the SDK's beat threads first, so no beat re-registers them)")
        for ip, port, cluster in (("127.0.0.40", 8080, "c1"), ("127.0.0.41", 8081, "c2")):
            key = f"{svc}#{ip}#{port}"
            task = self.client.heartbeats.get(key)
            check(task is not None, f"the SDK has no beat task {key}: {list(self.client.heartbeats)}")
            task.stop()
            task.join(timeout=2 + SDK_TIMEOUT + 2)
            check(not task.is_alive(), f"beat task {key} did not stop")
            ok = self.sdk("remove_naming_instance", self.client.remove_naming_instance, svc, ip, port,
                          cluster_name=cluster)
            check_eq(ok, True, f"remove_naming_instance {ip}:{port}")
        check_eq(self.list(svc), [], "list after deregistration")
        check_eq(self.native.instances("public", svc), [], "native after deregistration")
        log(f"PASS: v1 HTTP flow ({time.monotonic() - started:.1f}s)")

    # -----------------------------------------------------------------------------------------

    def no_cluster_flow(self):
        """The SDK without a cluster: `add_naming_instance` sends `clusterName=None` (Python's
        None, url-encoded), while modify, send_heartbeat and remove send no cluster at all.
        Nacos 2.x finds an HTTP client's instance by ip:port whatever its cluster."""
        svc = f"py-v1-nocluster-{self.run}"
        ip, port = "127.0.0.45", 8085
        step(f"{svc}: register, modify, beat and remove without a cluster")
        ok = self.sdk("add_naming_instance", self.client.add_naming_instance, svc, ip, port,
                      ephemeral=True)
        check_eq(ok, True, "add_naming_instance without a cluster")
        hosts = self.list(svc)
        registered_as = one(hosts, ip, port, "list after registering without a cluster").get("clusterName")
        log(f"    registered in cluster {registered_as!r}")
        ok = self.sdk("modify_naming_instance", self.client.modify_naming_instance, svc, ip, port,
                      weight=4.0)
        check_eq(ok, True, "modify_naming_instance without a cluster")
        h = one(self.list(svc), ip, port, "list after modify without a cluster")
        check(approx(h.get("weight"), 4.0), f"weight after modify without a cluster: {h.get('weight')!r}")
        beat = self.sdk("send_heartbeat", self.client.send_heartbeat, svc, ip, port, weight=4.0)
        check_eq(beat.get("code"), 10200, f"beat without a cluster {beat}")
        check_eq(addrs(self.list(svc)), [(ip, port)],
                 "one instance after a beat without a cluster (not a second one in DEFAULT)")
        ok = self.sdk("remove_naming_instance", self.client.remove_naming_instance, svc, ip, port)
        check_eq(ok, True, "remove_naming_instance without a cluster")
        check_eq(self.list(svc), [], "list after removing without a cluster")
        check_eq(self.native.instances("public", svc), [], "native after removing without a cluster")

    def namespace_flow(self):
        ns = f"py-v1-ns-{self.run}"
        svc = f"py-v1-ns-svc-{self.run}"
        step(f"namespace {ns}: register and list there, invisible from public")
        c = self.new_client("ns-client", namespace=ns)
        ok = self.sdk("add_naming_instance", c.add_naming_instance, svc, "127.0.0.44", 8084,
                      cluster_name="DEFAULT", ephemeral=False)
        check_eq(ok, True, f"add_naming_instance in {ns}")
        hosts = hosts_of(self.sdk("list in ns", c.list_naming_instance, svc))
        check_eq(addrs(hosts), [("127.0.0.44", 8084)], f"list in {ns}")
        check_eq(hosts[0].get("ephemeral"), False, f"persistent instance in {ns}: ephemeral")
        check_eq(self.list(svc), [], f"list of {svc} in public")
        n = self.native.find(ns, svc, "127.0.0.44", 8084)
        check(n is not None, f"native: {ns}/{svc} lacks 127.0.0.44:8084")
        check_eq(self.native.instances("public", svc), [], f"native public/{svc}")
        ok = self.sdk("remove_naming_instance", c.remove_naming_instance, svc, "127.0.0.44", 8084,
                      cluster_name="DEFAULT", ephemeral=False)
        check_eq(ok, True, f"remove_naming_instance in {ns}")
        check_eq(hosts_of(self.sdk("list in ns", c.list_naming_instance, svc)), [],
                 f"list in {ns} after removal")

    def service_flow(self):
        svc = f"py-v1-service-{self.run}"
        step(f"service {svc}: create (protectThreshold 0.5), get, list, update (0.8), delete")
        r = self.nacos("POST", "/nacos/v1/ns/service",
                       form={"serviceName": svc, "groupName": GROUP, "protectThreshold": "0.5"})
        check_eq((r.status, r.text), (200, "ok"), f"create service: {r!r}")
        r = self.nacos("GET", "/nacos/v1/ns/service", query={"serviceName": svc, "groupName": GROUP})
        check_eq(r.status, 200, f"get service: {r!r}")
        body = r.json()
        check(body.get("name") in (svc, f"{GROUP}@@{svc}"), f"get service: name {body!r}")
        check_eq(body.get("groupName"), GROUP, f"get service: groupName ({body})")
        check(approx(body.get("protectThreshold"), 0.5), f"get service: protectThreshold ({body})")
        native = self.native.service("public", svc)
        check(approx(native.get("protect_threshold"), 0.5), f"native protect_threshold ({native})")

        r = self.nacos("GET", "/nacos/v1/ns/service/list",
                       query={"pageNo": "1", "pageSize": "1000", "groupName": GROUP})
        check_eq(r.status, 200, f"service list: {r!r}")
        body = r.json()
        check(svc in body.get("doms", []), f"service list: {svc} not in {body}")
        check(isinstance(body.get("count"), int) and body["count"] >= 1, f"service list: count ({body})")

        r = self.nacos("PUT", "/nacos/v1/ns/service",
                       form={"serviceName": svc, "groupName": GROUP, "protectThreshold": "0.8"})
        check_eq((r.status, r.text), (200, "ok"), f"update service: {r!r}")
        r = self.nacos("GET", "/nacos/v1/ns/service", query={"serviceName": svc})
        check(approx(r.json().get("protectThreshold"), 0.8), f"get service after update: {r!r}")
        native = self.native.service("public", svc)
        check(approx(native.get("protect_threshold"), 0.8), f"native protect_threshold ({native})")

        r = self.nacos("DELETE", "/nacos/v1/ns/service", query={"serviceName": svc, "groupName": GROUP})
        check_eq((r.status, r.text), (200, "ok"), f"delete service: {r!r}")
        r = self.nacos("GET", "/nacos/v1/ns/service", query={"serviceName": svc})
        check(r.status in (400, 404), f"get of a deleted service: expected 404 (or 400), got {r!r}")
        r = self.nacos("GET", "/nacos/v1/ns/service/list",
                       query={"pageNo": "1", "pageSize": "1000", "groupName": GROUP})
        check(svc not in r.json().get("doms", []), f"service list after delete still has {svc}: {r!r}")

    def java_flow(self):
        svc = f"py-v1-java-{self.run}"
        grouped = f"{GROUP}@@{svc}"
        step(f"Java 1.4 client requests on {svc}: register (query + empty form), list, beat, deregister")
        hdrs = dict(JAVA_HEADERS, RequestId=str(uuid.uuid4()))
        reg = {"namespaceId": "public", "serviceName": grouped, "groupName": GROUP,
               "clusterName": "DEFAULT", "ip": "127.0.0.45", "port": "8085", "weight": "1.0",
               "enable": "true", "healthy": "true", "ephemeral": "true",
               "metadata": json.dumps({"lang": "java"})}
        r = self.nacos("POST", "/nacos/v1/ns/instance", query=reg, form={}, headers=hdrs)
        check_eq((r.status, r.text), (200, "ok"), f"Java register: {r!r}")

        step("form-encoded POST /nacos/v1/ns/instance (parameters in the body)")
        reg2 = dict(reg, ip="127.0.0.46", port="8086", serviceName=svc,
                    metadata="lang=java,kind=form")
        r = self.nacos("POST", "/nacos/v1/ns/instance", form=reg2, headers=hdrs)
        check_eq((r.status, r.text), (200, "ok"), f"form register: {r!r}")

        r = self.nacos("GET", "/nacos/v1/ns/instance/list",
                       query={"namespaceId": "public", "serviceName": grouped, "clusters": "",
                              "udpPort": "0", "clientIP": "127.0.0.1", "healthyOnly": "false"},
                       headers=hdrs)
        check_eq(r.status, 200, f"Java list: {r!r}")
        hosts = hosts_of(r.json())
        check_eq(addrs(hosts), [("127.0.0.45", 8085), ("127.0.0.46", 8086)], "Java list: hosts")
        check_eq(one(hosts, "127.0.0.45", 8085, "Java list")["metadata"], {"lang": "java"},
                 "JSON metadata")
        check_eq(one(hosts, "127.0.0.46", 8086, "Java list")["metadata"], {"lang": "java", "kind": "form"},
                 "k=v,k=v metadata")

        beat_info = {"port": 8085, "ip": "127.0.0.45", "weight": 1.0, "serviceName": grouped,
                     "cluster": "DEFAULT", "metadata": {"lang": "java"}, "scheduled": False,
                     "period": 5000, "stopped": False}
        common_q = {"namespaceId": "public", "serviceName": grouped, "clusterName": "DEFAULT",
                    "ip": "127.0.0.45", "port": "8085"}
        step("Java 1.4 beat: PUT /instance/beat with the beat JSON in a form body")
        r = self.nacos("PUT", "/nacos/v1/ns/instance/beat", query=common_q,
                       form={"beat": json.dumps(beat_info)}, headers=hdrs)
        check_eq(r.status, 200, f"Java beat: {r!r}")
        check_eq(r.json().get("code"), 10200, f"Java beat: {r!r}")
        step("older 1.x beat: PUT /instance/beat?serviceName=...&beat={json}")
        r = self.nacos("PUT", "/nacos/v1/ns/instance/beat",
                       query={"serviceName": grouped, "beat": json.dumps(beat_info)}, headers=hdrs)
        check_eq((r.status, r.json().get("code")), (200, 10200), f"query-string beat: {r!r}")

        step("Java deregister: DELETE /nacos/v1/ns/instance with query parameters")
        for ip, port in (("127.0.0.45", "8085"), ("127.0.0.46", "8086")):
            r = self.nacos("DELETE", "/nacos/v1/ns/instance",
                           query={"namespaceId": "public", "serviceName": grouped, "clusterName": "DEFAULT",
                                  "ip": ip, "port": port, "ephemeral": "true"}, headers=hdrs)
            check_eq((r.status, r.text), (200, "ok"), f"Java deregister {ip}:{port}: {r!r}")
        step("a light beat after deregistration answers 20404 (the Java client then re-registers)")
        r = self.nacos("PUT", "/nacos/v1/ns/instance/beat", query=common_q, form={}, headers=hdrs)
        check_eq((r.status, r.json().get("code")), (200, 20404), f"light beat after deregister: {r!r}")
        check_eq(self.native.instances("public", svc), [], "native after the Java deregistrations")

    def bad_input_flow(self):
        svc = f"py-v1-bad-{self.run}"
        step("bad input: 400 with a message, never a 5xx")
        base = {"serviceName": svc, "ip": "127.0.0.47", "port": "8087", "clusterName": "DEFAULT"}
        cases = [
            ("POST", "/nacos/v1/ns/instance", "no serviceName", {k: v for k, v in base.items() if k != "serviceName"}),
            ("POST", "/nacos/v1/ns/instance", "no ip", {k: v for k, v in base.items() if k != "ip"}),
            ("POST", "/nacos/v1/ns/instance", "no port", {k: v for k, v in base.items() if k != "port"}),
            ("POST", "/nacos/v1/ns/instance", "port not a number", dict(base, port="http")),
            ("POST", "/nacos/v1/ns/instance", "weight not a number", dict(base, weight="heavy")),
            ("POST", "/nacos/v1/ns/instance", "negative weight", dict(base, weight="-1")),
            ("POST", "/nacos/v1/ns/instance", "metadata neither JSON nor k=v", dict(base, metadata="{not json")),
            ("GET", "/nacos/v1/ns/instance/list", "list without serviceName", {"healthyOnly": "true"}),
            ("PUT", "/nacos/v1/ns/instance/beat", "beat that is not JSON", dict(base, beat="{nope")),
            ("POST", "/nacos/v1/ns/service", "protectThreshold not a number",
             {"serviceName": svc, "protectThreshold": "high"}),
        ]
        for method, path, what, params in cases:
            if method == "GET":
                r = self.nacos(method, path, query=params)
            else:
                r = self.nacos(method, path, form=params)
            log(f"    {what}: HTTP {r.status} {r.text.strip()[:100]!r}")
            check(r.status < 500, f"{what}: a 5xx for bad input: {r!r}")
            check_eq(r.status, 400, f"{what}: status ({r!r})")
            check(r.text.strip() != "", f"{what}: 400 without a message")
        check_eq(self.native.instances("public", svc), [], "nothing registered by the bad requests")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nacos", required=True, type=loopback_addr, help="Nacos HTTP address host:port")
    ap.add_argument("--http", required=True, type=loopback_addr, help="Sextant's native HTTP API host:port")
    args = ap.parse_args()
    signal.alarm(WHOLE)  # the last resort bound of the whole flow
    work = tempfile.mkdtemp(prefix="sextant-nacos-py-v1-")
    code = 1
    try:
        Flow(args.nacos, args.http, work).main()
        code = 0
    except Failure as e:
        fail_and_exit(e)
    except BaseException as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        fail_and_exit(f"unexpected {type(e).__name__}: {e}")
    finally:
        if code == 0:
            shutil.rmtree(work, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the SDK's beat threads are daemons; do not wait for them


if __name__ == "__main__":
    main()
