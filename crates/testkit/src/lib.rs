//! Starting the real `sextant serve` from outside, shared by the integration suites
//! (`crates/sextant/tests`, `crates/client/tests`) and the bench (`crates/bench`, which drives
//! the same start with tokio): the command with a clean environment, the parser of the
//! start-up line that names the addresses, and free loopback ports. [`spawn_serve`] also
//! drains stderr for the whole life of the process (so it never blocks on a full pipe) and
//! waits, bounded, for that line. [`Etcd`] starts a throwaway etcd member for the etcd store's
//! tests, [`EtcdCluster`] a cluster of several. [`TestCa`] makes a throwaway CA and certificates for TLS. Nothing here is linked into the server, the SDK or the binary.
#![forbid(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

mod etcd;
mod tls;
mod tmpfs;
pub use etcd::{etcd_binary, etcd_version, Etcd, EtcdCluster};
pub use tls::{CertFiles, TestCa};
pub use tmpfs::Tmpfs;

/// A started server process and its addresses. The caller owns killing it.
pub struct Spawned {
    pub child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// The Nacos adapter's HTTP and gRPC addresses, unless it is off.
    pub nacos: Option<(SocketAddr, SocketAddr)>,
    /// The DNS adapter's address (UDP and TCP), unless it is off.
    pub dns: Option<SocketAddr>,
    /// The Consul HTTP API's address, unless it is off.
    pub consul: Option<SocketAddr>,
    /// Every stderr line so far, for diagnostics.
    pub log: Arc<Mutex<Vec<String>>>,
}

/// The usual arguments of a server started from outside: HTTP on a kernel-chosen loopback
/// port, gRPC on `grpc_port` (0: kernel-chosen; fixed when a client must find it again after a
/// restart) and its data under `data_dir`.
pub fn loopback_args(data_dir: &Path, grpc_port: u16) -> Vec<OsString> {
    vec![
        "--http-addr".into(),
        "127.0.0.1:0".into(),
        "--grpc-addr".into(),
        format!("127.0.0.1:{grpc_port}").into(),
        "--data-dir".into(),
        data_dir.as_os_str().to_owned(),
    ]
}

/// `bin serve <args>` with the `SEXTANT_*` settings of the caller's environment removed, stdin
/// and stdout closed and stderr piped (the start-up line is logged there). Unless `args` give
/// `--nacos-http-addr` or `--no-nacos`, the Nacos adapter listens on a port of its own
/// choosing, so parallel servers do not fight over 8848; DNS likewise (`--dns-addr`,
/// `--no-dns`) over 8600, and Consul's HTTP API (`--consul-http-addr`, `--no-consul`) over 8500.
pub fn serve_command<S: AsRef<OsStr>>(bin: &OsStr, args: &[S]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("serve").args(args);
    // Only an address or `--no-nacos` counts: other Nacos flags (the grace) leave the port free.
    let placed = args.iter().any(|a| {
        let a = a.as_ref().to_string_lossy();
        a.starts_with("--nacos-http-addr") || a == "--no-nacos"
    });
    if !placed {
        cmd.args(["--nacos-http-addr", "127.0.0.1:0"]);
    }
    // Likewise DNS, off 8600.
    let dns_placed = args.iter().any(|a| {
        let a = a.as_ref().to_string_lossy();
        a.starts_with("--dns-addr") || a == "--no-dns"
    });
    if !dns_placed {
        cmd.args(["--dns-addr", "127.0.0.1:0"]);
    }
    let consul_placed = args.iter().any(|a| {
        let a = a.as_ref().to_string_lossy();
        a.starts_with("--consul-http-addr") || a == "--no-consul"
    });
    if !consul_placed {
        cmd.args(["--consul-http-addr", "127.0.0.1:0"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // Every setting has a `SEXTANT_*` variable: a developer's shell must not change the server
    // under test, whatever settings exist now or are added later.
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("SEXTANT_") {
            cmd.env_remove(var);
        }
    }
    cmd
}

/// Runs `bin serve <args>` (see [`serve_command`]) and waits up to `startup` for its
/// `sextant serving` line; panics with the server's stderr if it does not come. The Nacos
/// adapter's addresses, unless it is off, are in `nacos`.
pub fn spawn_serve<I, S>(bin: &OsStr, args: I, startup: Duration) -> Spawned
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    spawn(serve_command(bin, &args), startup)
}

/// Runs a [`serve_command`] the caller adjusted (e.g. with variables in its environment) and
/// waits up to `startup` for its `sextant serving` line, as [`spawn_serve`] does.
pub fn spawn(mut cmd: Command, startup: Duration) -> Spawned {
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
    let (http, grpc, nacos, dns, consul) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some((http, grpc)) = parse_serving_line(&line) {
                    assert!(http.ip().is_loopback() && grpc.ip().is_loopback(), "{line}");
                    break (
                        http,
                        grpc,
                        parse_nacos_addrs(&line),
                        field(&line, "dns_addr="),
                        field(&line, "consul_http_addr="),
                    );
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
        nacos,
        dns,
        consul,
        log,
    }
}

/// The address in field `name` (with its `=`, e.g. `"dns_addr="`) of a log line such as the
/// serving line; `None` when the field is absent or not an address.
pub fn field(line: &str, name: &str) -> Option<SocketAddr> {
    // `name` must start the field, not end another one (`http_addr=` in `nacos_http_addr=`).
    let start = line
        .match_indices(name)
        .find(|(i, _)| {
            line[..*i]
                .chars()
                .last()
                .is_none_or(|c| c.is_whitespace() || c == '"')
        })?
        .0
        + name.len();
    let rest = &line[start..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The Nacos adapter's HTTP and gRPC addresses from the serving line, if it is on.
pub fn parse_nacos_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    Some((
        field(line, "nacos_http_addr=")?,
        field(line, "nacos_grpc_addr=")?,
    ))
}

/// A loopback port that was free a moment ago (bound, then released): for a server that must
/// come back on the same address, or an address where nothing listens.
pub fn try_free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// [`try_free_port`], for tests.
pub fn free_port() -> u16 {
    try_free_port().expect("bind a free loopback port")
}

/// A port P for the Nacos adapter with P + 1000 free as well (Nacos clients find the gRPC
/// port at P + 1000). Free when asked; another process could take it before the server does.
pub fn try_free_nacos_port() -> std::io::Result<u16> {
    for _ in 0..200 {
        let p = try_free_port()?;
        let Some(g) = p.checked_add(1000) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", g)).is_ok() {
            return Ok(p);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port pair P, P+1000 on 127.0.0.1 after 200 tries",
    ))
}

/// [`try_free_nacos_port`], for tests.
pub fn free_nacos_port() -> u16 {
    try_free_nacos_port().expect("a free loopback port pair P, P + 1000")
}

/// Runs `bin serve` on an in-memory store with the Nacos adapter at `127.0.0.1:port` (and its
/// gRPC at `port` + 1000, where Nacos clients look), plus `extra` flags; checks both Nacos
/// addresses and returns the server and the Nacos HTTP address.
pub fn spawn_with_nacos(bin: &OsStr, port: u16, extra: &[&str], startup: Duration) -> NacosNode {
    let nacos = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--store",
        "memory",
        "--http-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "127.0.0.1:0",
        "--nacos-http-addr",
        nacos.as_str(),
        "--log",
        "info",
    ];
    args.extend_from_slice(extra);
    let s = spawn_serve(bin, args, startup);
    let (http, grpc) = s.nacos.expect("the Nacos adapter is on");
    assert_eq!(http.port(), port);
    assert_eq!(
        grpc.port(),
        port + 1000,
        "Nacos clients look for gRPC at P + 1000"
    );
    assert!(http.ip().is_loopback() && grpc.ip().is_loopback());
    NacosNode {
        child: s.child,
        http: s.http,
        nacos_http: http,
        log: s.log,
    }
}

/// A `sextant serve` with its Nacos adapter on a chosen port (gRPC on that port + 1000, where
/// Nacos clients look for it). Killed on drop.
pub struct NacosNode {
    pub child: Child,
    /// The native HTTP API.
    pub http: SocketAddr,
    /// The Nacos 1.x HTTP API.
    pub nacos_http: SocketAddr,
    /// Every stderr line so far, for diagnostics.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl NacosNode {
    /// The last `n` lines the server logged.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let from = log.len().saturating_sub(n);
        log[from..].join("\n")
    }
}

impl Drop for NacosNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HTTP and gRPC addresses from a `sextant serving http_addr=... grpc_addr=...` line.
pub fn parse_serving_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    if !line.contains("sextant serving") {
        return None;
    }
    let http = field(line, "http_addr=")?;
    let grpc = field(line, "grpc_addr=")?;
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
        let with_nacos = "INFO sextant serving http_addr=127.0.0.1:1 grpc_addr=127.0.0.1:2 nacos_http_addr=127.0.0.1:3 nacos_grpc_addr=127.0.0.1:4";
        let (h, g) = parse_serving_line(with_nacos).unwrap();
        assert_eq!((h.port(), g.port()), (1, 2));
        let (nh, ng) = parse_nacos_addrs(with_nacos).unwrap();
        assert_eq!((nh.port(), ng.port()), (3, 4));
        assert!(parse_nacos_addrs(line).is_none());
    }

    #[test]
    fn reads_one_field_by_its_whole_name() {
        let line = "INFO sextant serving http_addr=127.0.0.1:1 grpc_addr=127.0.0.1:2 consul_http_addr=127.0.0.1:5 dns_addr=127.0.0.1:6";
        assert_eq!(field(line, "http_addr=").map(|a| a.port()), Some(1));
        assert_eq!(field(line, "consul_http_addr=").map(|a| a.port()), Some(5));
        assert_eq!(field(line, "dns_addr=").map(|a| a.port()), Some(6));
        assert!(field(line, "nacos_http_addr=").is_none());
    }

    #[test]
    fn a_free_nacos_port_has_its_grpc_port_free() {
        let p = try_free_nacos_port().expect("a free port");
        assert!(std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        assert!(std::net::TcpListener::bind(("127.0.0.1", p + 1000)).is_ok());
    }
}
