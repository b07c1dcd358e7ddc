//! The peers Sextant is compared with — ZooKeeper and etcd as Debian packages them — started by
//! this tool standalone on loopback ports with a fresh temporary data dir each, durable as
//! shipped (ZooKeeper `forceSync=yes`, etcd fsyncs its WAL), and stopped at the end by killing
//! their process group. Their pids are kept for CPU accounting from `/proc`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// A system the comparison can run.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// The node under test (`--spawn` or `--http`/`--grpc`).
    Sextant,
    /// Apache ZooKeeper (`java` + the Debian `zookeeper` package's jars), native jute protocol.
    Zookeeper,
    /// etcd (the Debian `etcd-server` package's `etcd`), native v3 gRPC API.
    Etcd,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Sextant => "sextant",
            System::Zookeeper => "zookeeper",
            System::Etcd => "etcd",
        }
    }
}

/// How to start the peers.
#[derive(Args, Debug, Clone)]
pub struct PeerOptions {
    /// The java binary that runs ZooKeeper.
    #[arg(help_heading = "Peers", long, default_value = "/usr/bin/java")]
    pub java: PathBuf,
    /// ZooKeeper's classpath, as the Debian package's zkEnv.sh sets it (zookeeper.jar names
    /// its dependencies in its manifest).
    #[arg(
        help_heading = "Peers",
        long,
        default_value = "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar"
    )]
    pub zookeeper_classpath: String,
    /// ZooKeeper's JVM heap (-Xmx).
    #[arg(help_heading = "Peers", long, default_value = "2g")]
    pub zookeeper_heap: String,
    /// The etcd binary.
    #[arg(help_heading = "Peers", long, default_value = "/usr/bin/etcd")]
    pub etcd: PathBuf,
    /// Where to create the peers' temporary data dirs [default: the system's].
    #[arg(help_heading = "Peers", long)]
    pub peer_data_parent: Option<PathBuf>,
    /// Keep the peers' data dirs and logs after the run.
    #[arg(help_heading = "Peers", long)]
    pub keep_peer_data: bool,
    /// Pin every peer this tool starts to these CPUs (a `taskset` list, e.g. `0`), as a
    /// deployment gives etcd machines of its own; run the tool under `taskset -c 1` so it and
    /// the nodes it starts stay on the other CPUs. Unset: no pinning.
    #[arg(help_heading = "Peers", long)]
    pub peer_cpus: Option<String>,
    /// Longest wait for a peer to answer after it was started.
    #[arg(help_heading = "Peers", long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub peer_startup_timeout: Duration,
}

/// A peer server this tool started.
pub struct Peer {
    pub system: System,
    /// ZooKeeper: `127.0.0.1:PORT` (its connect string); etcd: `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub pid: u32,
    /// The version the server reports.
    pub version: String,
    /// From spawn until the server answered.
    pub until_serving: Duration,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
    log_path: PathBuf,
}

/// A loopback port that was free a moment ago (bound, then released).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    sextant_testkit::try_free_port().context("cannot bind a loopback port")
}

/// The standalone ZooKeeper configuration: the shipped defaults (`forceSync` unset, so yes),
/// loopback only, no limit on connections per client address (the push scenario opens W
/// sessions from 127.0.0.1; the default 60 would refuse them), no admin HTTP server.
pub fn zookeeper_config(data_dir: &Path, port: u16) -> String {
    format!(
        "tickTime=2000\n\
         dataDir={}\n\
         clientPort={port}\n\
         clientPortAddress=127.0.0.1\n\
         maxClientCnxns=0\n\
         admin.enableServer=false\n",
        data_dir.display()
    )
}

/// The arguments of a standalone etcd on loopback.
pub fn etcd_args(data_dir: &Path, client_port: u16, peer_port: u16) -> Vec<String> {
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    vec![
        "--name".into(),
        "bench".into(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--listen-client-urls".into(),
        client.clone(),
        "--advertise-client-urls".into(),
        client,
        "--listen-peer-urls".into(),
        peer.clone(),
        "--initial-advertise-peer-urls".into(),
        peer.clone(),
        "--initial-cluster".into(),
        format!("bench={peer}"),
    ]
}

/// Sends ZooKeeper's `srvr` four-letter command; its answer (version, mode, counts).
pub async fn zookeeper_srvr(addr: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"srvr").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .context("no answer to srvr")??;
    anyhow::ensure!(
        out.contains("Zookeeper version"),
        "unexpected answer {out:?}"
    );
    Ok(out)
}

/// A fresh temporary directory named `prefix…`, under `parent` or the system's.
pub(crate) fn temp_dir(parent: Option<&Path>, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    match parent {
        Some(p) => tempfile::Builder::new().prefix(prefix).tempdir_in(p),
        None => tempfile::Builder::new().prefix(prefix).tempdir(),
    }
    .context("cannot create a temporary directory")
}

/// Starts `cmd` in a process group of its own (so a stop reaches its children), stdout and
/// stderr into `log`, killed if dropped; returns it and its pid.
pub(crate) fn spawn_logged(
    cmd: &mut Command,
    log: std::fs::File,
    what: &str,
) -> anyhow::Result<(Child, u32)> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let pid = child
        .id()
        .with_context(|| format!("{what} exited at once"))?;
    Ok((child, pid))
}

/// With `keep`, leaves `dir` on disk (and says where); otherwise hands it back, to be removed
/// when dropped.
pub(crate) fn keep_dir(
    dir: tempfile::TempDir,
    keep: bool,
    what: &str,
) -> Option<tempfile::TempDir> {
    if !keep {
        return Some(dir);
    }
    eprintln!(
        "keeping {what}'s data dir and log under {}",
        dir.path().display()
    );
    let _ = dir.keep();
    None
}

impl Peer {
    /// Starts `system` (ZooKeeper or etcd) and waits until it answers.
    pub async fn start(system: System, o: &PeerOptions) -> anyhow::Result<Peer> {
        let dir = temp_dir(
            o.peer_data_parent.as_deref(),
            &format!("sextant-bench-{}-", system.name()),
        )?;
        // etcd creates its data dir itself (mode 0700, or it warns); ZooKeeper needs it made.
        let data_dir = dir.path().join("data");
        let log_path = dir.path().join("server.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = match system {
            System::Zookeeper => {
                std::fs::create_dir_all(&data_dir)?;
                let port = free_port()?;
                let cfg = dir.path().join("zoo.cfg");
                std::fs::write(&cfg, zookeeper_config(&data_dir, port))?;
                let mut c = Command::new(&o.java);
                c.arg(format!("-Xmx{}", o.zookeeper_heap))
                    .arg("-cp")
                    .arg(&o.zookeeper_classpath)
                    .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
                    .arg(&cfg);
                (c, format!("127.0.0.1:{port}"))
            }
            System::Etcd => {
                let (client, peer) = (free_port()?, free_port()?);
                let mut c = Command::new(&o.etcd);
                c.args(etcd_args(&data_dir, client, peer));
                (c, format!("http://127.0.0.1:{client}"))
            }
            System::Sextant => bail!("sextant is not a peer"),
        };
        let endpoint = cmd.1.clone();
        let spawned_at = Instant::now();
        let (child, pid) = spawn_logged(&mut cmd.0, log, system.name())?;
        if let Some(cpus) = &o.peer_cpus {
            // Every thread it has; threads it starts later inherit the mask.
            let out = std::process::Command::new("taskset")
                .args(["-a", "-cp", cpus, &pid.to_string()])
                .output()
                .context("run taskset (Debian: util-linux)")?;
            anyhow::ensure!(
                out.status.success(),
                "taskset -a -cp {cpus} {pid}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let kept = keep_dir(dir, o.keep_peer_data, system.name());
        let mut peer = Peer {
            system,
            endpoint,
            pid,
            version: String::new(),
            until_serving: Duration::ZERO,
            child: Some(child),
            _dir: kept,
            log_path,
        };
        let deadline = spawned_at + o.peer_startup_timeout;
        let mut last_err: String;
        loop {
            if let Some(c) = peer.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!(
                        "{} exited before serving ({status}); its log: {}",
                        system.name(),
                        peer.log_tail()
                    );
                }
            }
            let probe = match system {
                System::Zookeeper => zookeeper_srvr(&peer.endpoint).await.map(|s| {
                    s.lines()
                        .next()
                        .unwrap_or("")
                        .trim_start_matches("Zookeeper version: ")
                        .to_string()
                }),
                System::Etcd => crate::etcd::probe(&peer.endpoint).await,
                System::Sextant => unreachable!(),
            };
            match probe {
                Ok(v) => {
                    peer.version = v;
                    break;
                }
                Err(e) => last_err = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                peer.stop().await;
                bail!(
                    "{} did not answer within {:?} ({last_err})",
                    system.name(),
                    o.peer_startup_timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if system == System::Etcd {
            if let Ok(out) = Command::new(&o.etcd).arg("--version").output().await {
                let text = String::from_utf8_lossy(&out.stdout);
                if let Some(v) = text.lines().next() {
                    peer.version = v.trim_start_matches("etcd Version: ").to_string();
                }
            }
        }
        peer.until_serving = spawned_at.elapsed();
        Ok(peer)
    }

    /// The last lines of the peer's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join(" | ")
    }

    /// Warning and error lines in the peer's log (etcd's `W |`/`E |` and zap levels; ZooKeeper
    /// logs nothing with the package's classpath, which has no SLF4J binding).
    pub fn log_summary(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.log_path).ok()?;
        let (mut w, mut e) = (0, 0);
        let mut first = Vec::new();
        for l in text.lines() {
            let warn =
                l.contains(" W | ") || l.contains("\"level\":\"warn\"") || l.contains(" WARN ");
            let err =
                l.contains(" E | ") || l.contains("\"level\":\"error\"") || l.contains(" ERROR ");
            if warn {
                w += 1;
            }
            if err {
                e += 1;
            }
            if (warn || err) && first.len() < 3 {
                first.push(l.chars().take(200).collect::<String>());
            }
        }
        (w + e > 0).then(|| {
            format!(
                "{} logged {w} warnings and {e} errors; first: {}",
                self.system.name(),
                first.join(" | ")
            )
        })
    }

    /// Stops the peer: SIGTERM to its process group, SIGKILL after 30 s.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pg) = rustix::process::Pid::from_raw(self.pid as i32) {
            let _ = rustix::process::kill_process_group(pg, rustix::process::Signal::TERM);
            if tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .is_err()
            {
                eprintln!(
                    "warning: {} did not exit within 30 s of SIGTERM; killing it",
                    self.system.name()
                );
                let _ = rustix::process::kill_process_group(pg, rustix::process::Signal::KILL);
                let _ = child.wait().await;
            }
        } else {
            let _ = child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zookeeper_config_is_standalone_on_loopback_and_durable_as_shipped() {
        let cfg = zookeeper_config(Path::new("/tmp/x/data"), 2181);
        assert!(cfg.contains("dataDir=/tmp/x/data\n"));
        assert!(cfg.contains("clientPort=2181\n"));
        assert!(cfg.contains("clientPortAddress=127.0.0.1\n"));
        assert!(cfg.contains("maxClientCnxns=0\n"));
        assert!(!cfg.contains("forceSync"));
        assert!(!cfg.contains("server."));
    }

    #[test]
    fn etcd_listens_on_loopback_only() {
        let args = etcd_args(Path::new("/tmp/e"), 1, 2);
        let urls: Vec<&String> = args.iter().filter(|a| a.contains("://")).collect();
        assert_eq!(urls.len(), 5);
        assert!(urls.iter().all(|u| u.contains("127.0.0.1:")));
        assert!(!args.iter().any(|a| a.contains("unsafe-no-fsync")));
    }
}
