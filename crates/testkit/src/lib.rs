//! Test support shared by the integration suites (`crates/sextant/tests`,
//! `crates/client/tests`): spawns the real `sextant serve` on loopback with a clean
//! environment, drains its stderr for the whole life of the process (so it never blocks on a
//! full pipe) and waits, bounded, for the start-up line that names its addresses.
#![forbid(unsafe_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Settings a developer's shell might carry that would change the server under test.
const SEXTANT_VARS: &[&str] = &[
    "SEXTANT_LOG",
    "SEXTANT_CONFIG",
    "SEXTANT_STORE",
    "SEXTANT_HTTP_ADDR",
    "SEXTANT_GRPC_ADDR",
    "SEXTANT_DATA_DIR",
    "SEXTANT_EVENT_LOG_PER_SERVICE",
    "SEXTANT_MAX_BATCH_OPS",
];

/// A started server process and its addresses. The caller owns killing it.
pub struct Spawned {
    pub child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// Every stderr line so far, for diagnostics.
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Runs `bin serve <args>` and waits up to `startup` for its `sextant serving` line; panics
/// with the server's stderr if it does not come.
pub fn spawn_serve<I, S>(bin: &OsStr, args: I, startup: Duration) -> Spawned
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for var in SEXTANT_VARS {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn().expect("spawn the sextant binary");
    let stderr = child.stderr.take().expect("piped stderr");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel::<String>();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + startup;
    let (http, grpc) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(addrs) = parse_serving_line(&line) {
                    break addrs;
                }
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let lines = log.lock().unwrap().join("\n");
                panic!("sextant did not report its addresses ({e:?}); stderr:\n{lines}");
            }
        }
    };
    Spawned {
        child,
        http,
        grpc,
        log,
    }
}

/// The HTTP and gRPC addresses from a `sextant serving http_addr=... grpc_addr=...` line.
pub fn parse_serving_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    if !line.contains("sextant serving") {
        return None;
    }
    let field = |name: &str| -> Option<SocketAddr> {
        let start = line.find(name)? + name.len();
        let rest = &line[start..];
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        rest[..end].trim_matches('"').parse().ok()
    };
    let http = field("http_addr=")?;
    let grpc = field("grpc_addr=")?;
    assert!(http.ip().is_loopback() && grpc.ip().is_loopback(), "{line}");
    Some((http, grpc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_serving_line() {
        let line = "2026-11-22T04:39:41Z INFO sextant_server: sextant serving http_addr=127.0.0.1:8470 grpc_addr=127.0.0.1:8471";
        let (h, g) = parse_serving_line(line).unwrap();
        assert_eq!((h.port(), g.port()), (8470, 8471));
        assert!(parse_serving_line("registry loaded").is_none());
    }
}
