//! A throwaway etcd for tests: one member ([`Etcd`]) or a cluster of several ([`EtcdCluster`]),
//! each member on free loopback ports (client and peer) with a temporary data dir, killed on
//! drop; members can be killed, restarted, paused (SIGSTOP) and resumed, and a cluster says
//! which member leads. The binary is `$SEXTANT_TEST_ETCD`, or `etcd` on the PATH
//! (scripts/test.sh installs Debian's `etcd-server` when there is none). A test that needs etcd
//! and cannot find it fails with a message saying how to get it: CI must prove the etcd store,
//! not skip it.

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
    /// The member's name, `--initial-cluster` (every member's `name=peer URL`) and
    /// `--initial-cluster-token` (the same for every member of one cluster, unique per cluster).
    name: String,
    initial_cluster: String,
    token: String,
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
        let bin = find_binary()?;
        retry_taken_ports(|| {
            let mut etcd = Etcd::member(&bin, "test")?;
            etcd.initial_cluster = format!("test=http://127.0.0.1:{}", etcd.peer_port);
            etcd.token = format!("sextant-test-{}", etcd.peer_port);
            etcd.launch()?;
            Ok(etcd)
        })
    }

    /// A member not started yet: its ports and data dir.
    fn member(bin: &Path, name: &str) -> Result<Etcd, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir for etcd: {e}"))?;
        let port = || try_free_port().map_err(|e| format!("no free loopback port: {e}"));
        let (client_port, peer_port) = (port()?, port()?);
        Ok(Etcd {
            child: None,
            bin: bin.to_path_buf(),
            endpoint: format!("http://127.0.0.1:{client_port}"),
            client_port,
            peer_port,
            dir,
            name: name.to_string(),
            initial_cluster: String::new(),
            token: String::new(),
        })
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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
        self.spawn()?;
        self.wait_healthy(Duration::from_secs(30))
    }

    /// Starts the process without waiting for it (a cluster's members wait for each other).
    fn spawn(&mut self) -> Result<(), String> {
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
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            // Several clusters may run at once on one machine: never join another's.
            .args(["--initial-cluster-token", &self.token])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // The caller's ETCD_* settings must not change the member under test.
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(var);
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits (bounded) until the member answers `/health` (which needs a quorum).
    fn wait_healthy(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err("etcd is not running".into());
            };
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!(
                    "etcd {} exited before serving ({status}); its log:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            if healthy(self.client_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "etcd {} did not answer /health within {within:?}; its log:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the member with SIGSTOP: it keeps its connections and answers nothing (a hung or
    /// cut-off etcd, unlike [`Etcd::kill`]'s refused connections). [`Etcd::resume`] goes on.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Etcd::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let st = Command::new("kill").arg(sig).arg(pid.to_string()).status();
            assert!(
                st.is_ok_and(|s| s.success()),
                "kill {sig} {pid} (etcd) failed"
            );
        }
    }

    /// Whether this member is its cluster's raft leader (asked over its JSON gateway).
    pub fn is_leader(&self) -> bool {
        let Some(status) = post(self.client_port, "/v3/maintenance/status", "{}") else {
            return false;
        };
        let me = field(&status, "member_id");
        me.is_some() && me == field(&status, "leader")
    }

    /// Compacts etcd's history up to its current revision (physically, so it is gone when
    /// this returns); that revision, or why not.
    pub fn compact(&self) -> Result<i64, String> {
        // A range of "/" (base64) only for the header's revision.
        let range = post(self.client_port, "/v3/kv/range", r#"{"key":"Lw=="}"#)
            .ok_or("etcd did not answer the range")?;
        let revision: i64 = field(&range, "revision")
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| format!("no revision in {range}"))?;
        let body = format!(r#"{{"revision":"{revision}","physical":true}}"#);
        post(self.client_port, "/v3/kv/compaction", &body).ok_or("etcd refused the compaction")?;
        Ok(revision)
    }

    /// Kills the member with SIGKILL (its data stays, for [`Etcd::restart`]); a paused one too.
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

fn find_binary() -> Result<PathBuf, String> {
    etcd_binary().ok_or_else(|| {
        "etcd not found: these tests need a real etcd. Run scripts/test.sh (it installs \
         Debian's etcd-server), or `apt-get install etcd-server`, or set SEXTANT_TEST_ETCD \
         to an etcd binary"
            .to_string()
    })
}

/// A throwaway etcd cluster of several members on loopback (one raft group, `--initial-cluster`
/// over their free peer ports). Every member killed on drop.
pub struct EtcdCluster {
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    /// Starts `n` members and waits (up to 60 s) until each answers `/health`; panics with a
    /// clear message when etcd is missing or a member does not come up.
    pub fn start(n: usize) -> EtcdCluster {
        match Self::try_start(n) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    pub fn try_start(n: usize) -> Result<EtcdCluster, String> {
        let bin = find_binary()?;
        retry_taken_ports(|| Self::try_start_once(&bin, n))
    }

    fn try_start_once(bin: &Path, n: usize) -> Result<EtcdCluster, String> {
        let mut members = (0..n)
            .map(|i| Etcd::member(bin, &format!("m{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "sextant-test-{}",
            members.first().map_or(0, |m| m.peer_port)
        );
        for m in &mut members {
            m.initial_cluster = initial.clone();
            m.token = token.clone();
            m.spawn()?;
        }
        for m in &mut members {
            m.wait_healthy(Duration::from_secs(60))?;
        }
        Ok(EtcdCluster { members })
    }

    /// Every member's client URL, comma-separated (what `--etcd-endpoints` takes).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.endpoint.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the member that leads now, waiting (bounded) for an election.
    pub fn leader(&self, within: Duration) -> Option<usize> {
        let deadline = Instant::now() + within;
        loop {
            let running = |m: &&Etcd| m.child.is_some();
            if let Some(i) = self
                .members
                .iter()
                .position(|m| running(&m) && m.is_leader())
            {
                return Some(i);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The first string value of `"name"` in a JSON text (the gateway writes 64-bit numbers as
/// strings), without a JSON parser in the testkit.
fn field(text: &str, name: &str) -> Option<String> {
    let at = text.find(&format!("\"{name}\":\""))? + name.len() + 4;
    let end = text[at..].find('"')? + at;
    Some(text[at..end].to_string())
}

/// POSTs `body` to `path` on etcd's JSON gateway; the answer's body if it is a 200.
fn post(port: u16, path: &str, body: &str) -> Option<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let req = format!(
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, rest) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then(|| rest.to_string())
        .or_else(|| head.starts_with("HTTP/1.1 200").then(|| rest.to_string()))
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

/// Runs `start` again (up to 5 times, with fresh ports) when etcd could not bind a port: a free
/// port is found by binding and closing it, and a test running in parallel may take it before
/// etcd does ("address already in use").
fn retry_taken_ports<T>(mut start: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let mut tries = 0;
    loop {
        match start() {
            Err(e) if e.contains("address already in use") && tries < 4 => tries += 1,
            r => return r,
        }
    }
}
