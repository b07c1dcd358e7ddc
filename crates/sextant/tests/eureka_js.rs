//! The real `eureka-js-client` (npm, pinned in `tests/eureka/package-lock.json`, installed by
//! `scripts/test.sh`) against the real binary's Eureka adapter. Each Eureka client is a
//! `node tests/eureka/client.js` process that prints one JSON line per event; the test drives
//! it and checks the registry through Sextant's native HTTP API:
//!
//! register (204, as the client demands), heartbeats that keep a short lease alive, the
//! registry fetch, a second client's instance seen by the first, a status override kept across
//! heartbeats (the client drops the instance, native discovery says not serving) and removed,
//! deregistration on stop, the instance of a SIGKILLed client expiring with its lease, and
//! both directions across protocols: an instance registered natively is in the Eureka
//! client's registry under the app name in upper case, and the Eureka-registered instance is
//! in `GET /v1/namespaces/public/services/billing` with what the client sent kept.
//!
//! Missing `node` or node modules fail the test (never a silent skip): run `scripts/test.sh`.
//! Every wait is bounded.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{find, ids, Api, Server};
use serde_json::{json, Value};

/// Bound of any one wait for a client event or a registry change.
const WAIT: Duration = Duration::from_secs(20);
/// The Eureka lease of the test clients, in seconds (`leaseInfo.durationInSecs`).
const LEASE_SECONDS: u64 = 3;

fn eureka_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/eureka")
        .canonicalize()
        .expect("tests/eureka")
}

/// Panics, saying how to fix it, unless `scripts/test.sh` installed the pinned client.
fn check_install() {
    let dir = eureka_dir();
    let module = dir.join("node_modules/eureka-js-client/package.json");
    let lock =
        std::fs::read(dir.join("package-lock.json")).expect("tests/eureka/package-lock.json");
    // scripts/test.sh stamps node_modules with the lock file it installed.
    let stamp =
        std::fs::read(dir.join("node_modules/.sextant-package-lock.json")).unwrap_or_default();
    assert!(
        module.exists() && stamp == lock,
        "eureka-js-client is not installed from the current tests/eureka/package-lock.json: run \
         scripts/test.sh from the workspace root (it runs npm ci in tests/eureka)"
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is needed by the Eureka client tests (Debian: apt-get install nodejs npm; \
         scripts/test.sh installs them)"
    );
}

/// One running `client.js`: its events so far, and its stdin for `stop`.
struct EurekaClient {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    events: Arc<Mutex<Vec<Value>>>,
}

impl EurekaClient {
    fn start(server: &Server, service_path: &str, app: &str, id: &str, port: u16) -> Self {
        let cfg = json!({
            "host": "127.0.0.1",
            "port": server.http.port(),
            "servicePath": service_path,
            "app": app,
            "id": id,
            "instancePort": port,
            "lease": LEASE_SECONDS,
            "heartbeatMs": 700,
            "fetchMs": 300,
            "watch": ["BILLING", "ORDERS"],
        });
        let mut child = Command::new("node")
            .arg(eureka_dir().join("client.js"))
            .arg(cfg.to_string())
            .current_dir(eureka_dir())
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("EUREKA_ENV", "sextant-test")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node tests/eureka/client.js");
        let events = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for (pipe, is_err) in [
            (Box::new(stdout) as Box<dyn std::io::Read + Send>, false),
            (Box::new(stderr), true),
        ] {
            let events = events.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let v = if is_err {
                        json!({"event": "stderr", "line": line})
                    } else {
                        serde_json::from_str(&line)
                            .unwrap_or_else(|_| json!({"event": "stdout", "line": line}))
                    };
                    events.lock().unwrap().push(v);
                }
            });
        }
        let stdin = child.stdin.take();
        EurekaClient {
            name: id.to_string(),
            child,
            stdin,
            events,
        }
    }

    fn dump(&self) -> String {
        let ev = self.events.lock().unwrap();
        let tail: Vec<String> = ev
            .iter()
            .rev()
            .take(40)
            .rev()
            .map(|v| v.to_string())
            .collect();
        tail.join("\n")
    }

    /// Waits (bounded) for an event with index ≥ `from` that `pred` accepts; returns its index.
    async fn wait_event(&self, from: usize, what: &str, pred: impl Fn(&Value) -> bool) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            {
                let ev = self.events.lock().unwrap();
                if let Some(i) = (from..ev.len()).find(|i| pred(&ev[*i])) {
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "client {}: no {what} within {WAIT:?}; its last events:\n{}",
                self.name,
                self.dump()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// Waits for a registry fetch (after event `from`) whose `app` list `pred` accepts.
    async fn wait_registry(
        &self,
        from: usize,
        what: &str,
        app: &str,
        pred: impl Fn(&[String]) -> bool,
    ) -> usize {
        self.wait_event(from, what, |e| {
            e["event"] == "registry"
                && e["apps"][app].as_array().is_some_and(|l| {
                    let ids: Vec<String> = l
                        .iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect();
                    pred(&ids)
                })
        })
        .await
    }

    /// Waits for the client's registration (204); its start failing ends the wait at once.
    async fn wait_registered(&self) {
        let i = self
            .wait_event(0, "registered (204)", |e| {
                e["event"] == "registered" || (e["event"] == "started" && !e["error"].is_null())
            })
            .await;
        let e = self.events.lock().unwrap()[i].clone();
        assert_eq!(
            e["event"],
            "registered",
            "client {} failed to start: {e}; its events:\n{}",
            self.name,
            self.dump()
        );
    }

    /// Asks the client to stop (it deregisters) and waits for it to say so.
    async fn stop(&mut self) {
        let from = self.len();
        let mut stdin = self.stdin.take().expect("stdin");
        stdin.write_all(b"stop\n").expect("write stop");
        stdin.flush().expect("flush");
        let i = self
            .wait_event(from, "stopped", |e| e["event"] == "stopped")
            .await;
        let e = self.events.lock().unwrap()[i].clone();
        assert!(
            e["error"].is_null(),
            "client {} failed to deregister: {e}",
            self.name
        );
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EurekaClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn has(list: &[String], id: &str) -> bool {
    list.iter().any(|x| x == id)
}

/// Polls native discovery of `public/billing` until `pred` holds (bounded).
async fn wait_native(api: &Api, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = api.service("public", "billing").await;
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "native: no {what} within {WAIT:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eureka_js_client_against_sextant() {
    check_install();
    let started = Instant::now();
    let server = Server::start();
    let api = server.api();
    let http = common::http_client();
    let eureka = format!("{}/eureka/v2/apps", server.base());

    // Native → Eureka: a service registered natively as `orders` is the Eureka app ORDERS.
    api.register(
        "public",
        "orders",
        "orders-native-1",
        &json!({"host": "127.0.0.1", "port": 9001, "metadata": {"team": "shop"}}),
    )
    .await;

    // Client A registers (app given in lower case, as applications often do) and fetches.
    let a = EurekaClient::start(&server, "/eureka/v2/apps/", "billing", "billing-a", 9101);
    a.wait_registered().await;
    a.wait_registry(0, "ORDERS with the native instance", "ORDERS", |l| {
        has(l, "orders-native-1")
    })
    .await;
    a.wait_registry(0, "its own instance", "BILLING", |l| has(l, "billing-a"))
        .await;

    // Eureka → native: the instance, its lease and what the client sent.
    let v = wait_native(&api, "billing-a", |v| find(v, "billing-a").is_some()).await;
    let inst = find(&v, "billing-a").unwrap();
    assert_eq!(inst["host"], "127.0.0.1", "{inst}");
    assert_eq!(inst["port"], 9101, "{inst}");
    assert_eq!(inst["ttl_seconds"], LEASE_SECONDS, "{inst}");
    assert_eq!(inst["metadata"]["team"], "pay", "{inst}");
    assert_eq!(inst["status"]["serving"], true, "{inst}");
    // ... and echoed back to Eureka readers as sent.
    let echo: Value = http
        .get(format!("{eureka}/BILLING/billing-a"))
        .header("accept", "application/json")
        .send()
        .await
        .expect("GET instance")
        .json()
        .await
        .expect("instance JSON");
    let echo = &echo["instance"];
    assert_eq!(echo["hostName"], "billing-a.local", "{echo}");
    assert_eq!(echo["port"], json!({"$": 9101, "@enabled": true}), "{echo}");
    assert_eq!(echo["metadata"]["build.sha"], "abc123", "{echo}");
    assert_eq!(echo["status"], "UP", "{echo}");
    assert_eq!(
        echo["dataCenterInfo"]["@class"],
        "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo"
    );

    // Heartbeats keep the lease: still there well past one lease.
    let hb = a
        .wait_event(0, "a heartbeat", |e| e["event"] == "heartbeat")
        .await;
    tokio::time::sleep(Duration::from_secs(LEASE_SECONDS + 1)).await;
    a.wait_event(hb + 1, "another heartbeat", |e| e["event"] == "heartbeat")
        .await;
    let v = api.service("public", "billing").await;
    assert!(
        find(&v, "billing-a").is_some(),
        "the lease lapsed despite heartbeats: {v}"
    );

    // Client B (Spring's path, /eureka/apps/) appears in A's registry.
    let mut b = EurekaClient::start(&server, "/eureka/apps/", "BILLING", "billing-b", 9102);
    b.wait_registered().await;
    let from = a.len();
    a.wait_registry(from, "both billing instances", "BILLING", |l| {
        has(l, "billing-a") && has(l, "billing-b")
    })
    .await;

    // A status override takes billing-b out (Eureka clients keep UP instances only) and stays
    // across its heartbeats until it is deleted.
    let r = http
        .put(format!(
            "{eureka}/BILLING/billing-b/status?value=OUT_OF_SERVICE"
        ))
        .send()
        .await
        .expect("PUT status");
    assert_eq!(r.status(), 200);
    let from = a.len();
    a.wait_registry(from, "billing-b out of service", "BILLING", |l| {
        has(l, "billing-a") && !has(l, "billing-b")
    })
    .await;
    let from_b = b.len();
    b.wait_event(from_b, "a heartbeat", |e| e["event"] == "heartbeat")
        .await;
    let hb = b
        .wait_event(from_b, "a heartbeat", |e| e["event"] == "heartbeat")
        .await;
    b.wait_event(hb + 1, "a second heartbeat", |e| e["event"] == "heartbeat")
        .await;
    let v = api.service("public", "billing").await;
    let bi = find(&v, "billing-b").expect("billing-b registered");
    assert_eq!(bi["status"]["enabled"], false, "override lost: {bi}");
    assert_eq!(bi["status"]["serving"], false, "{bi}");
    let r = http
        .delete(format!("{eureka}/BILLING/billing-b/status"))
        .send()
        .await
        .expect("DELETE status");
    assert_eq!(r.status(), 200);
    let from = a.len();
    a.wait_registry(from, "billing-b back", "BILLING", |l| has(l, "billing-b"))
        .await;

    // Stop: the client deregisters; gone at once, natively and from A's registry.
    b.stop().await;
    let v = api.service("public", "billing").await;
    assert!(
        find(&v, "billing-b").is_none(),
        "billing-b still registered after stop: {v}"
    );
    let from = a.len();
    a.wait_registry(from, "billing-b gone", "BILLING", |l| !has(l, "billing-b"))
        .await;

    // A killed client's instance expires with its lease (no deregistration).
    let mut a = a;
    a.kill9();
    let killed = Instant::now();
    let v = api.service("public", "billing").await;
    assert!(
        find(&v, "billing-a").is_some(),
        "billing-a gone before its lease ran out"
    );
    wait_native(&api, "billing-a expired", |v| ids(v).is_empty()).await;
    let expired_after = killed.elapsed();
    assert!(
        expired_after >= Duration::from_secs(LEASE_SECONDS - 1),
        "billing-a expired after only {expired_after:?}"
    );

    // The adapter counted the requests.
    let metrics = api.get("/metrics").await.text;
    for endpoint in ["register", "renew", "cancel", "apps", "status_override"] {
        let line =
            format!("sextant_eureka_requests_total{{endpoint=\"{endpoint}\",outcome=\"ok\"}}");
        assert!(metrics.contains(&line), "no {line} in /metrics");
    }
    println!(
        "eureka-js-client flow passed in {:.1?} (expiry after kill: {expired_after:.1?})",
        started.elapsed()
    );
}
