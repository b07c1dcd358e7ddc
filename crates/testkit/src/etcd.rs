//! A throwaway etcd for tests: one member on free loopback ports (client and peer) with a
//! temporary data dir, killed on drop. The binary is `$SEXTANT_TEST_ETCD`, or `etcd` on the
//! PATH (scripts/test.sh installs Debian's `etcd-server` when there is none). A test that needs
//! etcd and cannot find it fails with a message saying how to get it: CI must prove the etcd
//! store, not skip it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::try_free_port;

/// A running etcd member. Killed (SIGKILL) and its data removed on drop.
pub struct Etcd {
    child: Option<Child>,
    bin: PathBuf,
    /// `http://127.0.0.1:PORT`, the client URL.
    pub endpoint: String,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

/// The etcd binary to use: `$SEXTANT_TEST_ETCD`, else `etcd` on the PATH.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SEXTANT_TEST_ETCD") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

/// `etcd --version`'s first line, e.g. `etcd Version: 3.4.23`.
pub fn etcd_version(bin: &Path) -> Result<String, String> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("").to_string())
}

impl Etcd {
    /// Starts a fresh member and waits (up to 30 s) until it answers `/health`; panics with a
    /// clear message when etcd is not installed or does not come up.
    pub fn start() -> Etcd {
        match Self::try_start() {
            Ok(e) => e,
            Err(e) => panic!("{e}"),
        }
    }

    /// [`Etcd::start`], returning why it could not start instead of panicking.
    pub fn try_start() -> Result<Etcd, String> {
        let bin = etcd_binary().ok_or(
            "etcd not found: these tests need a real etcd. Run scripts/test.sh (it installs \
             Debian's etcd-server), or `apt-get install etcd-server`, or set SEXTANT_TEST_ETCD \
             to an etcd binary",
        )?;
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir for etcd: {e}"))?;
        let port = || try_free_port().map_err(|e| format!("no free loopback port: {e}"));
        let (client_port, peer_port) = (port()?, port()?);
        let mut etcd = Etcd {
            child: None,
            bin,
            endpoint: format!("http://127.0.0.1:{client_port}"),
            client_port,
            peer_port,
            dir,
        };
        etcd.launch()?;
        Ok(etcd)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The last lines etcd logged, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn launch(&mut self) -> Result<(), String> {
        let client = self.endpoint.clone();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("etcd log file: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("etcd log file: {e}"))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // The caller's ETCD_* settings must not change the member under test.
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(var);
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "etcd exited before serving ({status}); its log:\n{}",
                    self.log_tail()
                ));
            }
            if healthy(self.client_port) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "etcd did not answer /health within 30 s; its log:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the member with SIGKILL (its data stays, for [`Etcd::restart`]).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the member again on the same ports and data, after [`Etcd::kill`].
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.launch()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether etcd on `port` answers `GET /health` with `"health":"true"`.
fn healthy(port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}
