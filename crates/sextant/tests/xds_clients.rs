//! Real proxyless gRPC clients resolve and balance over Sextant with xDS: the Python client
//! (grpcio's built-in `xds:///` resolver, from `.venv/xds`, pinned by
//! `tests/xds/requirements.txt`) and the Node client (`@grpc/grpc-js` with
//! `@grpc/grpc-js-xds`, from `tests/xds/node/package-lock.json`), both installed by
//! `scripts/test.sh`. A missing install fails the test (never a silent skip).
//!
//! Each flow starts the real binary, Python gRPC echo servers (`tests/xds/echo_server.py`,
//! answering `/echo.Echo/Who` with their own id) registered in Sextant with locations, and two
//! long-lived client processes (`tests/xds/client.py` or `tests/xds/node/client.js`) dialing
//! `xds:///echo.prod` with a bootstrap that points at Sextant's gRPC listener: one that states
//! no locality and one in zone `a`. Each batch of calls reports how many answers came from each
//! backend; after each change the test polls (bounded) until the counts show it, then checks
//! one more batch:
//!
//! 0. the clients dial before the service has any instance: no call is answered (and the
//!    subscription to a name that does not exist yet must be answered once it does);
//! 1. three instances (two in zone `a`, one in zone `b`): the calls spread over all three, the
//!    zone-`a` client uses only zone `a`;
//! 2. deregister one: no further traffic to it;
//! 3. drain the other zone-`a` instance: traffic leaves it, and the zone-`a` client, with no
//!    serving instance left in its zone, falls over to zone `b`;
//! 4. a new instance in zone `a`: traffic reaches it, and the zone-`a` client comes back to
//!    its zone;
//! 5. undrain: the drained instance takes traffic again.
//!
//! The Node driver loads `@grpc/grpc-js-xds`'s xxhash module before it opens its channel: without
//! that, that client can apply its first two xDS updates out of order when they come within a
//! few tens of ms of each other, and keep the older endpoint list (a race in the client, seen in
//! this test; `tests/xds/node/client.js` explains it).
//!
//! Negative control: against a Sextant started with `--xds false`, every call of both clients
//! fails and none reaches the registered, running backend.
//!
//! A failure prints the last batches, the client's output, the server's log and
//! `GET /v1/xds/clients` (versions sent and acknowledged per stream). To see more, run with
//! `XDS_TEST_DUMP=DIR` (every child's whole output is written there) and the clients' own
//! tracing, e.g. `GRPC_TRACE=xds_client,priority GRPC_VERBOSITY=DEBUG`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// How long an echo server or a client may take to start.
const START: Duration = Duration::from_secs(20);
/// How long the first resolution may take (process start, ADS stream, four resources, first
/// connections).
const FIRST: Duration = Duration::from_secs(20);
/// How long a change may take to show in the counts (Sextant pushes within tens of ms).
const SETTLE: Duration = Duration::from_secs(5);
/// Calls in one polling batch and in the batch that confirms a settled state.
const POLL_CALLS: u32 = 30;
const CONFIRM_CALLS: u32 = 60;
/// Every backend that should take traffic takes at least this share of a confirming batch.
const MIN_SHARE: f64 = 0.05;
/// Deadline of each call.
const CALL_DEADLINE_MS: u32 = 1000;

const NS: &str = "prod";
const SVC: &str = "echo";
const TARGET: &str = "xds:///echo.prod";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

/// Panics, saying how to install it, unless `stamp` (written by `scripts/test.sh` after a
/// successful install) holds exactly the content of `source` (what it was installed from).
fn assert_installed(what: &Path, stamp: &Path, source: &Path) {
    assert!(
        what.exists(),
        "{} is missing: the xDS client tests need what scripts/test.sh installs \
         (run scripts/test.sh from the workspace root; it installs it from {})",
        what.display(),
        source.display()
    );
    let wanted = std::fs::read(source).unwrap_or_else(|e| panic!("read {}: {e}", source.display()));
    let stamped = std::fs::read(stamp).unwrap_or_default();
    assert!(
        stamped == wanted,
        "{} was not installed from the current {}: run scripts/test.sh to install it again",
        what.display(),
        source.display()
    );
}

/// The Python of `.venv/xds` (grpcio), built by `scripts/test.sh`.
fn python() -> PathBuf {
    let root = workspace_root();
    let dir = root.join(".venv/xds");
    let python = dir.join("bin/python");
    assert_installed(
        &python,
        &dir.join("sextant-requirements.txt"),
        &root.join("tests/xds/requirements.txt"),
    );
    python
}

/// `tests/xds/node`, with its `node_modules` installed by `scripts/test.sh` (`npm ci`).
fn node_dir() -> PathBuf {
    let dir = workspace_root().join("tests/xds/node");
    let modules = dir.join("node_modules");
    assert_installed(
        &modules.join("@grpc/grpc-js-xds"),
        &modules.join(".sextant-package-lock.json"),
        &dir.join("package-lock.json"),
    );
    dir
}

/// A command with the test's environment: no proxies (everything here is on loopback) and no
/// Python or Node path settings from the developer's shell.
fn clean(mut cmd: Command) -> Command {
    for var in [
        "http_proxy",
        "https_proxy",
        "grpc_proxy",
        "all_proxy",
        "no_grpc_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "PYTHONPATH",
        "PYTHONHOME",
        "NODE_PATH",
        "NODE_OPTIONS",
        "GRPC_XDS_BOOTSTRAP",
        "GRPC_XDS_BOOTSTRAP_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(workspace_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A child process whose stdout lines come through a channel and whose stderr is kept for
/// diagnostics. Killed and reaped on drop; its stdin is a pipe, so a process that outlives a
/// crashed test still sees EOF.
struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Everything it printed, stdout and stderr, in arrival order.
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command) -> Proc {
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({cmd:?}): {e}"));
        let stdin = child.stdin.take();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(line.clone());
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(format!("[stderr] {line}"));
                }
            });
        }
        Proc {
            name: name.to_string(),
            child,
            stdin,
            lines,
            log,
        }
    }

    /// The next stdout line, waiting at most `within`; panics with the process's output if
    /// none comes.
    fn line(&mut self, within: Duration) -> String {
        match self.lines.recv_timeout(within) {
            Ok(line) => line,
            Err(e) => {
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "{}: no output line within {within:?} ({e:?}; exit status {status:?}); its output:\n{}",
                    self.name,
                    self.output()
                )
            }
        }
    }

    fn output(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let from = log.len().saturating_sub(80);
        log[from..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(dir) = std::env::var_os("XDS_TEST_DUMP") {
            let log = self
                .log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .join("\n");
            let file = format!("{}-{}.log", self.name.replace(' ', "_"), self.child.id());
            let _ = std::fs::write(Path::new(&dir).join(file), log);
        }
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One echo server: `tests/xds/echo_server.py --id ID` on a loopback port of its choosing.
struct Echo {
    id: String,
    port: u16,
    _proc: Proc,
}

impl Echo {
    fn start(id: &str) -> Echo {
        let mut cmd = clean(Command::new(python()));
        cmd.arg(workspace_root().join("tests/xds/echo_server.py"))
            .args(["--port", "0", "--id", id]);
        let mut proc = Proc::spawn(&format!("echo server {id}"), cmd);
        let line = proc.line(START);
        let port = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("echo server {id} said {line:?}, not READY <port>"));
        Echo {
            id: id.to_string(),
            port,
            _proc: proc,
        }
    }

    /// Its registration body, in region `r1` and zone `zone`.
    fn registration(&self, zone: &str) -> Value {
        json!({
            "host": "127.0.0.1",
            "port": self.port,
            "protocol": "grpc",
            "location": {"region": "r1", "zone": zone, "idc": format!("dc-{zone}")},
        })
    }
}

/// Which real client a driver runs.
#[derive(Debug, Clone, Copy)]
enum Lang {
    Python,
    Node,
}

/// Where a client says it runs (its bootstrap's `node.locality`).
#[derive(Debug, Clone, Copy)]
struct Zone {
    region: &'static str,
    zone: &'static str,
}

/// The `GRPC_XDS_BOOTSTRAP` file that `sextant xds bootstrap` prints for a client with id
/// `node_id` in `zone` (none: the client states no locality), pointing at the xDS server
/// `server`, written to `dir`.
fn write_bootstrap(dir: &Path, server: SocketAddr, node_id: &str, zone: Option<Zone>) -> PathBuf {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sextant"));
    cmd.arg("--grpc-server")
        .arg(format!("http://{server}"))
        .args(["xds", "bootstrap", "--node-id", node_id]);
    if let Some(z) = zone {
        cmd.args(["--region", z.region, "--zone", z.zone]);
    }
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("SEXTANT_") {
            cmd.env_remove(var);
        }
    }
    let out = cmd.output().expect("run sextant xds bootstrap");
    assert!(
        out.status.success(),
        "sextant xds bootstrap failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let bootstrap: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "sextant xds bootstrap printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    // What the clients need of it: the server, and a `node.locality` that is always there
    // (`@grpc/grpc-js-xds` refuses a node without one: `validateNode` in its
    // `xds-bootstrap.ts`, "locality field missing in node element").
    assert_eq!(
        bootstrap["xds_servers"][0]["server_uri"],
        server.to_string(),
        "{bootstrap}"
    );
    assert_eq!(bootstrap["node"]["id"], node_id, "{bootstrap}");
    let locality = &bootstrap["node"]["locality"];
    assert!(locality.is_object(), "no node.locality: {bootstrap}");
    if let Some(z) = zone {
        assert_eq!(locality["region"], z.region, "{bootstrap}");
        assert_eq!(locality["zone"], z.zone, "{bootstrap}");
    }
    let path = dir.join(format!("{node_id}.json"));
    std::fs::write(&path, &out.stdout).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// What one batch of calls gave.
#[derive(Debug, Clone)]
struct Batch {
    calls: u64,
    ok: u64,
    counts: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    raw: String,
}

impl Batch {
    fn parse(line: &str) -> Option<Batch> {
        let v: Value = serde_json::from_str(line).ok()?;
        let map = |v: &Value| -> Option<BTreeMap<String, u64>> {
            v.as_object()?
                .iter()
                .map(|(k, n)| Some((k.clone(), n.as_u64()?)))
                .collect()
        };
        Some(Batch {
            calls: v["calls"].as_u64()?,
            ok: v["ok"].as_u64()?,
            counts: map(&v["counts"])?,
            errors: map(&v["errors"])?,
            raw: line.to_string(),
        })
    }

    fn backends(&self) -> BTreeSet<&str> {
        self.counts.keys().map(String::as_str).collect()
    }

    /// Every call succeeded, exactly the backends `want` answered, each at least `min_share`
    /// of the calls.
    fn is(&self, want: &[&str], min_share: f64) -> bool {
        let want: BTreeSet<&str> = want.iter().copied().collect();
        self.ok == self.calls
            && self.errors.is_empty()
            && self.backends() == want
            && self
                .counts
                .values()
                .all(|&n| n as f64 >= min_share * self.ok as f64)
    }
}

/// A long-lived client process (`tests/xds/client.py` or `tests/xds/node/client.js`) with one
/// channel to `target`.
struct Driver {
    label: String,
    proc: Proc,
}

impl Driver {
    fn start(lang: Lang, label: &str, target: &str, bootstrap: &Path) -> Driver {
        let mut cmd = match lang {
            Lang::Python => {
                let mut cmd = clean(Command::new(python()));
                cmd.arg(workspace_root().join("tests/xds/client.py"));
                cmd
            }
            Lang::Node => {
                let dir = node_dir();
                let mut cmd = clean(Command::new("node"));
                cmd.arg(dir.join("client.js")).current_dir(&dir);
                cmd
            }
        };
        cmd.args(["--target", target])
            .args(["--deadline-ms", &CALL_DEADLINE_MS.to_string()])
            .env("GRPC_XDS_BOOTSTRAP", bootstrap);
        let label = format!("{lang:?} client {label}");
        let mut proc = Proc::spawn(&label, cmd);
        let line = proc.line(START);
        assert_eq!(line, "READY", "{label} did not start: {}", proc.output());
        Driver { label, proc }
    }

    /// Makes up to `n` calls on the driver's channel and reads their counts.
    fn batch(&mut self, n: u32) -> Batch {
        self.command(&n.to_string())
    }

    /// Makes up to `n` calls, each with a deadline of `deadline`.
    fn batch_with_deadline(&mut self, n: u32, deadline: Duration) -> Batch {
        self.command(&format!("{n} {}", deadline.as_millis()))
    }

    fn command(&mut self, line: &str) -> Batch {
        let stdin = self.proc.stdin.as_mut().expect("the driver's stdin");
        if let Err(e) = writeln!(stdin, "{line}").and_then(|()| stdin.flush()) {
            panic!(
                "{}: write a command: {e}; its output:\n{}",
                self.label,
                self.proc.output()
            );
        }
        // A batch is bounded by the driver (10 s); a little more for the process itself.
        let line = self.proc.line(Duration::from_secs(20));
        Batch::parse(&line).unwrap_or_else(|| {
            panic!(
                "{}: not a batch result: {line:?}; its output:\n{}",
                self.label,
                self.proc.output()
            )
        })
    }

    /// Polls with small batches, for at most `within`, until a batch is exactly `want` (see
    /// [`Batch::is`]), then checks that a larger batch is too; panics with what it saw
    /// otherwise. Returns the confirming batch.
    fn settle(&mut self, step: &str, want: &[&str], within: Duration, server: &Server) -> Batch {
        let started = Instant::now();
        let mut seen = Vec::new();
        let mut polls = 0;
        loop {
            let b = self.batch(POLL_CALLS);
            let done = b.is(want, 0.0);
            // The last few are enough to tell what happened.
            if seen.len() == 8 {
                seen.remove(0);
            }
            seen.push(b.raw.clone());
            polls += 1;
            if done {
                break;
            }
            if started.elapsed() > within {
                panic!(
                    "{}: {step}: wanted traffic to exactly {want:?}, still not so after {:.1?}; \
                     last batches:\n{}\n--- client output ---\n{}\n--- sextant log (tail) ---\n{}\n\
                     --- GET /v1/xds/clients ---\n{}",
                    self.label,
                    started.elapsed(),
                    seen.join("\n"),
                    self.proc.output(),
                    log_tail(server, 40),
                    xds_clients(server)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let settled = started.elapsed();
        let b = self.batch(CONFIRM_CALLS);
        assert!(
            b.is(want, MIN_SHARE),
            "{}: {step}: traffic went to exactly {want:?} (each at least {MIN_SHARE}), then not: \
             {}\nlast batches before:\n{}\n--- client output ---\n{}",
            self.label,
            b.raw,
            seen.join("\n"),
            self.proc.output()
        );
        println!(
            "{}: {step}: settled after {settled:.1?} ({polls} polls): {}",
            self.label, b.raw
        );
        b
    }
}

/// What Sextant says of its xDS clients (`GET /v1/xds/clients`), for diagnostics.
fn xds_clients(server: &Server) -> String {
    let r = raw_http(
        server.http,
        "GET",
        "/v1/xds/clients",
        "application/json",
        b"",
        Framing::ContentLength,
    );
    format!("{} {}", r.status, r.text)
}

fn log_tail(server: &Server, n: usize) -> String {
    let log = server.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn register(api: &Api, echo: &Echo, zone: &str) {
    api.register(NS, SVC, &echo.id, &echo.registration(zone))
        .await;
}

async fn instance_action(api: &Api, id: &str, action: &str) {
    api.post(
        &format!("{}/{action}", instance_path(NS, SVC, id)),
        &json!({}),
    )
    .await
    .ok();
}

/// The whole flow with one kind of client (see the module docs).
async fn flow(lang: Lang) {
    let started = Instant::now();
    // Make the installs' absence fail before anything starts.
    match lang {
        Lang::Python => drop(python()),
        Lang::Node => drop(node_dir()),
    }
    let server = Server::start();
    let api = server.api();
    let tmp = tempfile::tempdir().expect("a temp dir");

    // `anywhere` states no locality: every locality is as near as any other.
    let anywhere = write_bootstrap(tmp.path(), server.grpc, "anywhere", None);
    let zone_a = Zone {
        region: "r1",
        zone: "a",
    };
    let in_a = write_bootstrap(tmp.path(), server.grpc, "in-zone-a", Some(zone_a));
    let mut all = Driver::start(lang, "anywhere", TARGET, &anywhere);
    let mut near = Driver::start(lang, "in zone a", TARGET, &in_a);

    // 0. The clients subscribe before the service has any instance (a channel resolves on its
    //    first call): nothing answers yet.
    for driver in [&mut all, &mut near] {
        let b = driver.batch_with_deadline(2, Duration::from_millis(300));
        assert_eq!(
            b.ok, 0,
            "{}: answered before any instance: {}",
            driver.label, b.raw
        );
        println!("{}: before any instance: {}", driver.label, b.raw);
    }

    let e1 = Echo::start("e1");
    let e2 = Echo::start("e2");
    let e3 = Echo::start("e3");
    register(&api, &e1, "a").await;
    register(&api, &e2, "a").await;
    register(&api, &e3, "b").await;

    // 1. Spread over all three; the zone-a client stays in zone a.
    all.settle("three instances", &["e1", "e2", "e3"], FIRST, &server);
    near.settle(
        "three instances, zone a first",
        &["e1", "e2"],
        FIRST,
        &server,
    );

    // 2. Deregister e1: no further traffic to it.
    api.deregister(NS, SVC, "e1").await;
    all.settle("e1 deregistered", &["e2", "e3"], SETTLE, &server);
    near.settle("e1 deregistered", &["e2"], SETTLE, &server);

    // 3. Drain e2: traffic leaves it; zone a has nothing serving, so the zone-a client falls
    //    over to zone b.
    instance_action(&api, "e2", "drain").await;
    all.settle("e2 drained", &["e3"], SETTLE, &server);
    near.settle(
        "e2 drained: zone a empty, fall over",
        &["e3"],
        SETTLE,
        &server,
    );

    // 4. A new instance in zone a: traffic reaches it; the zone-a client comes back.
    let e4 = Echo::start("e4");
    register(&api, &e4, "a").await;
    all.settle("e4 registered", &["e3", "e4"], SETTLE, &server);
    near.settle("e4 registered in zone a", &["e4"], SETTLE, &server);

    // 5. Undrain e2: it takes traffic again.
    instance_action(&api, "e2", "undrain").await;
    all.settle("e2 undrained", &["e2", "e3", "e4"], SETTLE, &server);
    near.settle("e2 undrained", &["e2", "e4"], SETTLE, &server);

    println!("{lang:?} xDS flow passed in {:.1?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_xds_client_follows_the_registry() {
    flow(Lang::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_grpc_js_xds_client_follows_the_registry() {
    flow(Lang::Node).await;
}

/// The flows can fail: against a Sextant started with `--xds false` (no ADS service on its gRPC
/// listener), with an echo server registered and running, neither client gets a single call
/// through, while a direct call to the same echo server works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_xds_no_call_gets_through() {
    let server = Server::start_with_args(&["--xds", "false"]);
    let api = server.api();
    let tmp = tempfile::tempdir().expect("a temp dir");
    let echo = Echo::start("e1");
    register(&api, &echo, "a").await;
    let bootstrap = write_bootstrap(tmp.path(), server.grpc, "no-xds", None);
    for lang in [Lang::Python, Lang::Node] {
        let direct = format!("127.0.0.1:{}", echo.port);
        let mut direct = Driver::start(lang, "direct", &direct, &bootstrap);
        let b = direct.batch(3);
        assert!(
            b.is(&["e1"], 0.0),
            "{lang:?}: the direct target fails: {}",
            b.raw
        );

        let mut client = Driver::start(lang, "without xDS", TARGET, &bootstrap);
        let b = client.batch_with_deadline(3, Duration::from_millis(500));
        assert_eq!(b.calls, 3, "{lang:?}: {}", b.raw);
        assert_eq!(
            b.ok, 0,
            "{lang:?}: calls got through without xDS: {}",
            b.raw
        );
        assert!(!b.errors.is_empty(), "{lang:?}: {}", b.raw);
        println!("{lang:?} client without xDS: {}", b.raw);
    }
}
