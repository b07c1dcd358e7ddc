//! The server under test: one already running (`--http`, `--grpc`, `--server-pid`) or one this
//! tool starts (`--spawn`) on loopback ports picked by the kernel and a temporary data dir, and
//! can stop with SIGTERM and start again on the same data.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tokio::time::Instant;

/// Warnings and errors the spawned server logged, kept for the report.
#[derive(Default)]
pub struct ServerLog {
    pub warnings: AtomicU64,
    pub errors: AtomicU64,
    /// The first few WARN/ERROR lines.
    pub samples: Mutex<Vec<String>>,
}

impl ServerLog {
    fn observe(&self, line: &str) {
        let counter = if line.contains(" ERROR ") {
            &self.errors
        } else if line.contains(" WARN ") {
            &self.warnings
        } else {
            return;
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.samples.lock() {
            if s.len() < 5 {
                s.push(line.to_string());
            }
        }
    }

    /// One note for the report, if anything was logged at WARN or above.
    pub fn summary(&self) -> Option<String> {
        let w = self.warnings.load(Ordering::Relaxed);
        let e = self.errors.load(Ordering::Relaxed);
        if w == 0 && e == 0 {
            return None;
        }
        let samples = self
            .samples
            .lock()
            .map(|s| s.join(" | "))
            .unwrap_or_default();
        Some(format!(
            "server logged {w} WARN and {e} ERROR lines; first ones: {samples}"
        ))
    }
}

struct Spawned {
    bin: PathBuf,
    extra_args: Vec<String>,
    /// Holds the temporary directory (data and log) until the run ends, unless kept.
    _dir: Option<tempfile::TempDir>,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    log: Arc<ServerLog>,
    startup_timeout: Duration,
    /// With `--spawn-tls`: the throwaway CA whose server certificate the node serves.
    tls: Option<Box<sextant_testkit::TestCa>>,
}

/// Where the server is and, when known, its pid.
pub struct Target {
    pub http: String,
    pub grpc: String,
    pub pid: Option<u32>,
    /// Consul's HTTP API and the DNS listener, when a spawned server named them.
    pub consul: Option<SocketAddr>,
    pub dns: Option<SocketAddr>,
    spawned: Option<Spawned>,
}

/// The addresses a `sextant serving` line names.
struct Serving {
    http: SocketAddr,
    grpc: SocketAddr,
    consul: Option<SocketAddr>,
    dns: Option<SocketAddr>,
}

/// What one start of a spawned server took.
pub struct Started {
    /// From spawn until the `sextant serving` log line (store loaded, listeners bound).
    pub until_serving: Duration,
    pub spawned_at: Instant,
}

impl Target {
    pub fn attach(http: String, grpc: String, pid: Option<u32>) -> Self {
        Self {
            http: http.trim_end_matches('/').to_string(),
            grpc: grpc.trim_end_matches('/').to_string(),
            pid,
            consul: None,
            dns: None,
            spawned: None,
        }
    }

    /// Starts `bin serve` on a new temporary data dir (under `parent` when given).
    pub async fn spawn(
        bin: &Path,
        parent: Option<&Path>,
        keep: bool,
        mut extra_args: Vec<String>,
        startup_timeout: Duration,
        tls: bool,
    ) -> anyhow::Result<(Self, Started)> {
        // TLS on every listener with a CA made for this run, which the tool's clients trust.
        let tls = if tls {
            let ca = sextant_testkit::TestCa::new("sextant-bench CA");
            let files = ca.server("server", "sextant-bench");
            extra_args.extend(ca.serve_args(&files, false));
            let pem = std::fs::read(ca.ca_file()).context("reading the bench CA")?;
            crate::load::trust_ca(pem)?;
            Some(Box::new(ca))
        } else {
            None
        };
        let dir = match parent {
            Some(p) => tempfile::Builder::new()
                .prefix("sextant-bench-")
                .tempdir_in(p),
            None => tempfile::Builder::new().prefix("sextant-bench-").tempdir(),
        }
        .context("cannot create a temporary directory")?;
        let data_dir = dir.path().join("data");
        let log_path = dir.path().join("server.log");
        let kept = if keep {
            eprintln!(
                "keeping the data dir and log under {}",
                dir.path().display()
            );
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };
        let mut t = Self {
            http: String::new(),
            grpc: String::new(),
            pid: None,
            consul: None,
            dns: None,
            spawned: Some(Spawned {
                bin: bin.to_path_buf(),
                extra_args,
                _dir: kept,
                data_dir,
                log_path,
                child: None,
                log: Arc::new(ServerLog::default()),
                startup_timeout,
                tls,
            }),
        };
        let started = t.start().await?;
        Ok((t, started))
    }

    pub fn is_spawned(&self) -> bool {
        self.spawned.is_some()
    }

    pub fn data_dir(&self) -> Option<&Path> {
        self.spawned.as_ref().map(|s| s.data_dir.as_path())
    }

    pub fn log(&self) -> Option<Arc<ServerLog>> {
        self.spawned.as_ref().map(|s| s.log.clone())
    }

    pub fn log_path(&self) -> Option<&Path> {
        self.spawned.as_ref().map(|s| s.log_path.as_path())
    }

    /// Starts the spawned server (again) on its data dir and waits for its serving line.
    pub async fn start(&mut self) -> anyhow::Result<Started> {
        let s = self
            .spawned
            .as_mut()
            .context("the server was not spawned by this tool")?;
        if s.child.is_some() {
            bail!("the server is already running");
        }
        let spawned_at = Instant::now();
        // The same command the integration suites start (clean `SEXTANT_*` environment, Nacos
        // adapter on a port of its own unless the extra arguments place it), driven by tokio.
        let mut args = sextant_testkit::loopback_args(&s.data_dir, 0);
        args.extend(s.extra_args.iter().map(Into::into));
        let mut child = Command::from(sextant_testkit::serve_command(s.bin.as_os_str(), &args))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", s.bin.display()))?;
        let pid = child.id().context("the server exited at once")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let log_file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log_path)
            .await
            .with_context(|| format!("cannot open {}", s.log_path.display()))?;
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(pump_stderr(stderr, log_file, s.log.clone(), addr_tx));
        let addrs = tokio::time::timeout(s.startup_timeout, addr_rx).await;
        let serving = match addrs {
            Ok(Ok(a)) => a,
            Ok(Err(_)) => {
                let status = child.wait().await.ok();
                bail!(
                    "the server exited before serving ({status:?}); see {}",
                    s.log_path.display()
                )
            }
            Err(_) => {
                let _ = child.kill().await;
                bail!(
                    "the server did not log `sextant serving` within {:?}; see {}",
                    s.startup_timeout,
                    s.log_path.display()
                )
            }
        };
        let until_serving = spawned_at.elapsed();
        s.child = Some(child);
        let scheme = if s.tls.is_some() { "https" } else { "http" };
        self.http = format!("{scheme}://{}", serving.http);
        self.grpc = format!("{scheme}://{}", serving.grpc);
        self.consul = serving.consul;
        self.dns = serving.dns;
        self.pid = Some(pid);
        Ok(Started {
            until_serving,
            spawned_at,
        })
    }

    /// Sends SIGTERM to the spawned server and waits (bounded) for it to exit.
    pub async fn stop(&mut self, timeout: Duration) -> anyhow::Result<(Duration, String)> {
        let s = self
            .spawned
            .as_mut()
            .context("the server was not spawned by this tool")?;
        let mut child = s.child.take().context("the server is not running")?;
        let pid = child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
            .context("the server already exited")?;
        let t0 = Instant::now();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .context("cannot send SIGTERM to the server")?;
        let status = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(r) => r.context("cannot wait for the server")?,
            Err(_) => {
                let _ = child.kill().await;
                bail!("the server did not exit within {timeout:?} of SIGTERM; killed it")
            }
        };
        self.pid = None;
        Ok((t0.elapsed(), status.to_string()))
    }

    /// Kills the spawned server with SIGKILL, as a crash would (no shutdown, no lease
    /// revoked); `start` brings it back on the same data dir (on new ports).
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        let s = self
            .spawned
            .as_mut()
            .context("the server was not spawned by this tool")?;
        let mut child = s.child.take().context("the server is not running")?;
        child.kill().await.context("cannot kill the server")?;
        self.pid = None;
        Ok(())
    }

    /// Stops a spawned server at the end of a run (SIGTERM, then kill after 30 s).
    pub async fn finish(mut self) {
        if self.spawned.as_ref().is_some_and(|s| s.child.is_some()) {
            if let Err(e) = self.stop(Duration::from_secs(30)).await {
                eprintln!("warning: stopping the server: {e:#}");
            }
        }
    }
}

/// Copies the server's stderr to its log file, counts warnings, and reports the addresses of
/// the `sextant serving http_addr=... grpc_addr=...` line (parsed as the test suites parse it),
/// with Consul's and DNS's when it names them. Runs until the pipe closes, so the server never
/// blocks on a full pipe.
async fn pump_stderr(
    stderr: ChildStderr,
    mut file: tokio::fs::File,
    log: Arc<ServerLog>,
    addr_tx: tokio::sync::oneshot::Sender<Serving>,
) {
    let mut addr_tx = Some(addr_tx);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = file.write_all(line.as_bytes()).await;
        let _ = file.write_all(b"\n").await;
        log.observe(&line);
        if let Some((http, grpc)) = sextant_testkit::parse_serving_line(&line) {
            if let Some(tx) = addr_tx.take() {
                let _ = tx.send(Serving {
                    http,
                    grpc,
                    consul: sextant_testkit::field(&line, "consul_http_addr="),
                    dns: sextant_testkit::field(&line, "dns_addr="),
                });
            }
        }
    }
    let _ = file.flush().await;
}

/// Total size of the files under `dir`, in bytes.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
