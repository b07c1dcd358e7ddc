//! Real Consul clients, unchanged, against the binary's Consul adapter:
//!
//! - **py-consul** (pinned by `tests/consul/requirements.txt`, installed into `.venv/consul` by
//!   `scripts/test.sh`) runs `tests/consul/py_consul_flow.py`: TTL checks (critical at first,
//!   pass, warn, fail), a blocking `health.service` that wakes with a higher index, an HTTP
//!   check run by Sextant's scanner (200 / 429 / 500), maintenance, deregistration, removal
//!   after `DeregisterCriticalServiceAfter`, 404 for an unknown check, 501 for KV.
//! - **node-consul** (npm `consul`, pinned by `tests/consul/node/package-lock.json`, installed by
//!   `scripts/test.sh`) runs `tests/consul/node/watch.js`: its `watch` loop of blocking
//!   `health.service` queries (it follows `X-Consul-Index` and refuses a zero index) sees an
//!   instance registered natively, one registered through Consul's agent API, and that one
//!   leaving `?passing` when its TTL check fails, in order.
//!
//! Prometheus' `consul_sd_configs` is not tested here: Debian's Prometheus is built without
//! Consul service discovery, and no other build can be fetched on this machine.
//!
//! A missing client fails the test (never a silent skip): run `scripts/test.sh`. Every run and
//! wait is bounded; on failure the client's output and the server's log are printed.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Bound of the py-consul flow (about 10 s).
const FLOW: Duration = Duration::from_secs(120);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

/// Kills and reaps a child on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to its end, at most `bound`; returns whether it succeeded and what it printed.
fn run_bounded(mut cmd: Command, bound: Duration) -> (bool, String) {
    let mut child = Killed(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the client"),
    );
    let mut out = child.0.stdout.take().expect("stdout");
    let mut err = child.0.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        let mut e = String::new();
        let _ = err.read_to_string(&mut e);
        s + &e
    });
    let t0 = Instant::now();
    let ok = loop {
        if let Some(status) = child.0.try_wait().expect("poll the client") {
            break status.success();
        }
        if t0.elapsed() > bound {
            let _ = child.0.kill();
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.0.wait();
    (ok, reader.join().unwrap_or_default())
}

#[test]
fn py_consul_registers_checks_blocks_and_discovers() {
    let root = workspace_root();
    let python = root.join(".venv/consul/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test.sh, which builds .venv/consul from tests/consul/requirements.txt",
        python.display()
    );
    // A 2 s floor for DeregisterCriticalServiceAfter (Consul's is a minute), so the flow can
    // see a removal.
    let server = Server::start_with_args(&["--consul-deregister-min-seconds", "2"]);
    let consul = server.consul.expect("the Consul API is on by default");
    let mut cmd = Command::new(&python);
    cmd.arg(root.join("tests/consul/py_consul_flow.py"))
        .arg(consul.ip().to_string())
        .arg(consul.port().to_string())
        .env_remove("CONSUL_HTTP_ADDR")
        .env_remove("CONSUL_HTTP_TOKEN");
    let (ok, out) = run_bounded(cmd, FLOW);
    assert!(
        ok && out.contains("\nOK"),
        "the py-consul flow failed:\n{out}\n--- server log:\n{}",
        server.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_consul_watch_follows_blocking_queries() {
    let root = workspace_root();
    let dir = root.join("tests/consul/node");
    assert!(
        dir.join("node_modules/consul").exists(),
        "{}/node_modules is missing: run scripts/test.sh, which installs node-consul there with npm ci",
        dir.display()
    );
    let server = Server::start();
    let consul = server.consul.expect("the Consul API is on by default");
    // Registered natively: node-consul's first answer must already hold it.
    server
        .api()
        .register("public", "web", "native-1", &inst("127.0.0.1", 7002))
        .await;
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("watch.js"))
        .arg(consul.ip().to_string())
        .arg(consul.port().to_string())
        .current_dir(&dir);
    let (ok, out) = tokio::task::spawn_blocking(move || run_bounded(cmd, FLOW))
        .await
        .unwrap();
    assert!(
        ok && out.contains("\nOK"),
        "the node-consul watch failed:\n{out}\n--- server log:\n{}",
        server.log()
    );
    // Nothing node-consul did is left behind, and the native instance is untouched.
    let web = server.api().service("public", "web").await;
    assert_eq!(ids(&web), ["native-1"]);
}
