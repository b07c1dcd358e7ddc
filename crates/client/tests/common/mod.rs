//! Shared helpers of the SDK's integration tests: build and start the real `sextant serve`
//! binary on loopback (addresses parsed from its start-up line, killed on drop), pick free
//! ports for restarts on a fixed address, a TCP proxy that can cut every connection through it,
//! a direct gRPC client for the test's own writes and reads, and bounded waiting.
#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sextant_proto::v1 as pb;
use sextant_proto::v1::registry_client::RegistryClient;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long the server may take to print its start-up line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound of one direct call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `sextant` binary: `SEXTANT_TEST_BIN` when set (`scripts/test.sh` names the one its
/// workspace build made: `cargo build -p sextant` resolves features anew and, on a fresh
/// clone, rebuilt the dependencies for about 100 s), else built once per test process
/// (`cargo build -p sextant`).
pub fn sextant_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("SEXTANT_TEST_BIN") {
            let bin = PathBuf::from(bin);
            assert!(
                bin.exists(),
                "SEXTANT_TEST_BIN names no file: {}",
                bin.display()
            );
            return bin;
        }
        let ws = workspace();
        let out = Command::new(env!("CARGO"))
            .args(["build", "-p", "sextant"])
            .current_dir(&ws)
            .stdin(Stdio::null())
            .output()
            .expect("run cargo build -p sextant");
        assert!(
            out.status.success(),
            "cargo build -p sextant failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(t) => {
                let t = PathBuf::from(t);
                if t.is_absolute() {
                    t
                } else {
                    ws.join(t)
                }
            }
            None => ws.join("target"),
        };
        let bin = target.join("debug").join("sextant");
        assert!(bin.exists(), "no binary at {}", bin.display());
        bin
    })
}

pub use sextant_testkit::free_port;

/// A running `sextant serve`. SIGKILLed and reaped on drop.
pub struct Server {
    child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// On a fresh temporary data dir, ephemeral ports.
    pub fn start() -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut s = Server::start_in(tmp.path(), None);
        s._tmp = Some(tmp);
        s
    }

    /// On `dir` (kept by the caller), gRPC on `grpc_port` (or an ephemeral one).
    pub fn start_in(dir: &Path, grpc_port: Option<u16>) -> Server {
        let mut args = sextant_testkit::loopback_args(dir, grpc_port.unwrap_or(0));
        args.extend(["--log".into(), "info".into()]);
        let sextant_testkit::Spawned {
            child,
            http,
            grpc,
            log,
            ..
        } = sextant_testkit::spawn_serve(sextant_bin().as_os_str(), args, STARTUP_TIMEOUT);
        Server {
            child,
            http,
            grpc,
            log,
            _tmp: None,
        }
    }

    /// `http://127.0.0.1:PORT` of the gRPC API.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL the server");
        self.child.wait().expect("reap the server");
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// A Prometheus metric's value from `/metrics` (plain HTTP/1.1 over a socket).
    pub fn metric(&self, name: &str) -> Option<f64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&self.http, CALL_TIMEOUT).ok()?;
        s.set_read_timeout(Some(CALL_TIMEOUT)).ok()?;
        let req = format!(
            "GET /metrics HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            self.http
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP forwarder on loopback that can cut every connection through it and refuse new ones
/// until resumed: a network failure between client and server while the server stays up.
pub struct Proxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let open = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0u64);
        let task = {
            let open = open.clone();
            let cuts = cuts.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((mut down, _)) = listener.accept().await else {
                        return;
                    };
                    if !open.load(Ordering::SeqCst) {
                        drop(down);
                        continue;
                    }
                    let mut cut = cuts.subscribe();
                    tokio::spawn(async move {
                        let Ok(Ok(mut up)) =
                            tokio::time::timeout(CALL_TIMEOUT, TcpStream::connect(upstream)).await
                        else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                            _ = cut.changed() => {}
                        }
                        // Dropping both sockets ends the connection on both sides.
                    });
                }
            })
        };
        Proxy {
            addr,
            open,
            cuts,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Accepts connections again.
    pub fn resume(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// A client that gives up on a lost server quickly and reconnects soon (short timeouts, fast
/// backoff), so that a test's outage and recovery fit in its bounds.
pub fn quick_client(url: String) -> sextant_client::Client {
    sextant_client::Client::builder()
        .servers([url])
        .call_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(1))
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .build()
        .expect("a client")
}

/// A direct gRPC client of `addr` (the test's own reads and writes, bypassing the SDK).
pub async fn direct(addr: SocketAddr) -> RegistryClient<tonic::transport::Channel> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(CALL_TIMEOUT);
    let ch = tokio::time::timeout(CALL_TIMEOUT, ep.connect())
        .await
        .expect("connect timed out")
        .expect("connect failed");
    RegistryClient::new(ch)
}

pub fn sref(ns: &str, svc: &str) -> pb::ServiceRef {
    pb::ServiceRef {
        namespace: ns.into(),
        service: svc.into(),
    }
}

/// Registers `id` at `host:port` (persistent) directly; returns the revision.
pub async fn put(addr: SocketAddr, ns: &str, svc: &str, id: &str, port: u32) -> u64 {
    let mut c = direct(addr).await;
    c.register(pb::RegisterRequest {
        service: Some(sref(ns, svc)),
        spec: Some(pb::InstanceSpec {
            id: id.into(),
            host: "10.0.0.1".into(),
            port,
            ..Default::default()
        }),
        status: None,
        ttl_seconds: 0,
    })
    .await
    .expect("direct register")
    .into_inner()
    .revision
}

/// Deregisters `id` directly.
pub async fn remove(addr: SocketAddr, ns: &str, svc: &str, id: &str) {
    let mut c = direct(addr).await;
    c.deregister(pb::DeregisterRequest {
        service: Some(sref(ns, svc)),
        id: id.into(),
    })
    .await
    .expect("direct deregister");
}

/// The ids of a service as the server has it, read directly.
pub async fn server_ids(addr: SocketAddr, ns: &str, svc: &str) -> Vec<String> {
    let mut c = direct(addr).await;
    let s = c
        .get_service(pb::GetServiceRequest {
            service: Some(sref(ns, svc)),
            ..Default::default()
        })
        .await
        .expect("direct get")
        .into_inner();
    let mut ids: Vec<String> = s
        .instances
        .into_iter()
        .filter_map(|i| i.spec.map(|s| s.id))
        .collect();
    ids.sort();
    ids
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Ok(Some(v)) = tokio::time::timeout_at(deadline, check()).await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `f` with a timeout, panicking with `what` if it takes longer.
pub async fn bounded<F: std::future::Future>(what: &str, within: Duration, f: F) -> F::Output {
    tokio::time::timeout(within, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {within:?}"))
}

/// Logs of the SDK to the test output (RUST_LOG-style filter in `SEXTANT_TEST_LOG`).
pub fn init_logs() {
    let filter = std::env::var("SEXTANT_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
