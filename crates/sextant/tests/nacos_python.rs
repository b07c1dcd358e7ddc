//! The Nacos Python SDKs, unchanged, against the real binary's Nacos adapter: each test starts
//! `sextant serve` on loopback and runs one flow script of `tests/nacos/` with the Python of its
//! venv, which `scripts/test.sh` builds (pinned by `tests/nacos/requirements-*.txt`):
//!
//! - `.venv/nacos-v2`: nacos-sdk-python 3.x (`v2.nacos`, Nacos 2.x gRPC) runs
//!   `v2_grpc_flow.py`: register / query / list with filters, pushes to a subscriber on
//!   register, update, disable, deregister, a non-default group and a non-public namespace,
//!   batch registration, interop with the native API both ways, and an ephemeral instance
//!   vanishing after its client process is SIGKILLed.
//! - `.venv/nacos-v1`: the old 1.x-line client (`nacos.NacosClient`, Nacos 1.x HTTP Open API)
//!   runs `v1_http_flow.py`: register with beats, list with healthyOnly and clusters filters,
//!   get, modify, beats and their answer codes, register / modify / beat / deregister without a
//!   cluster (the instance really gone), services, the Java 1.4 client's raw requests,
//!   bad input, and leases kept by beats or lapsing without them.
//!
//! - `.venv/nacos-v2` also runs `v2_auth_flow.py` against a node with `--auth on`: login with
//!   username/password, register where the token may, refused elsewhere; `.venv/nacos-v1`
//!   likewise runs `v1_auth_flow.py` (login, then `accessToken` on every 1.x request).
//!
//! A missing venv fails the test (never a silent skip): run `scripts/test.sh`. Every script run
//! is bounded; on failure the script's output and the tail of the server's log are printed.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the server may take to print its start-up line.
const STARTUP: Duration = Duration::from_secs(20);
/// Bound of the gRPC flow (it takes about 10 s; its own last-resort bound is 300 s).
const V2_FLOW: Duration = Duration::from_secs(240);
/// Bound of the HTTP flow (it takes about 20 s, most of it waiting out a lease).
const V1_FLOW: Duration = Duration::from_secs(180);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

/// The Python of `.venv/<venv>`, built by `scripts/test.sh` from
/// `tests/nacos/requirements-<suffix>.txt`; panics, saying how to build it, if it is missing or
/// was built from other requirements.
fn venv_python(venv: &str, requirements: &str) -> PathBuf {
    let root = workspace_root();
    let dir = root.join(".venv").join(venv);
    let python = dir.join("bin/python");
    let wanted = root.join("tests/nacos").join(requirements);
    assert!(
        python.exists(),
        "{} is missing: the Nacos Python SDK tests need the venvs that scripts/test.sh builds \
         (run scripts/test.sh from the workspace root; it installs them, pinned by {})",
        python.display(),
        wanted.display()
    );
    // scripts/test.sh stamps each venv with a copy of the requirements it was built from.
    let stamp = std::fs::read(dir.join("sextant-requirements.txt")).unwrap_or_default();
    let wanted_text =
        std::fs::read(&wanted).unwrap_or_else(|e| panic!("read {}: {e}", wanted.display()));
    assert!(
        stamp == wanted_text,
        "{} was not built from the current {}: run scripts/test.sh to rebuild it",
        dir.display(),
        wanted.display()
    );
    python
}

/// What a finished (or killed) script run printed.
struct Run {
    status: Option<std::process::ExitStatus>,
    out: String,
    elapsed: Duration,
}

/// Runs `python tests/nacos/<script> <args>` with a bound; kills its whole process group if
/// it takes longer (the gRPC flow starts a child process of its own).
fn run_script(python: &Path, script: &str, args: &[String], bound: Duration) -> Run {
    let path = workspace_root().join("tests/nacos").join(script);
    assert!(path.exists(), "{} is missing", path.display());
    let mut cmd = Command::new(python);
    cmd.arg(&path)
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .process_group(0);
    // gRPC and urllib would honour these; the servers under test are on loopback.
    for var in [
        "http_proxy",
        "https_proxy",
        "grpc_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "PYTHONPATH",
        "PYTHONHOME",
    ] {
        cmd.env_remove(var);
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("start {} {}: {e}", python.display(), path.display()));
    // Both pipes go into one buffer as they come, so the output reads in order.
    let out = Arc::new(Mutex::new(Vec::<u8>::new()));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|mut pipe| {
        let out = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    })
    .collect();
    let deadline = started + bound;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for the script") {
            break Some(st);
        }
        if Instant::now() >= deadline {
            // The whole group: the script and any child it started.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = started.elapsed();
    // The pipes close when the group is gone; a reader still blocked after that is left behind.
    let join_by = Instant::now() + Duration::from_secs(5);
    for r in readers {
        while !r.is_finished() && Instant::now() < join_by {
            std::thread::sleep(Duration::from_millis(20));
        }
        if r.is_finished() {
            let _ = r.join();
        }
    }
    let out = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    Run {
        status,
        out,
        elapsed,
    }
}

/// Runs one flow against a fresh server and asserts it passed.
fn flow(venv: &str, requirements: &str, script: &str, bound: Duration) {
    flow_with(venv, requirements, script, bound, &[]);
}

/// [`flow`] against a server started with `extra` flags.
fn flow_with(venv: &str, requirements: &str, script: &str, bound: Duration, extra: &[&str]) {
    let python = venv_python(venv, requirements);
    let server = sextant_testkit::spawn_with_nacos(
        env!("CARGO_BIN_EXE_sextant").as_ref(),
        sextant_testkit::free_nacos_port(),
        extra,
        STARTUP,
    );
    let args = vec![
        "--nacos".to_string(),
        server.nacos_http.to_string(),
        "--http".to_string(),
        server.http.to_string(),
    ];
    let run = run_script(&python, script, &args, bound);
    let ok = run.status.is_some_and(|s| s.success());
    if !ok {
        let how = match run.status {
            Some(st) => format!("exited with {st}"),
            None => format!("did not finish within {bound:?} and was killed"),
        };
        panic!(
            "tests/nacos/{script} ({venv}) {how} after {:.1?}\n--- its output ---\n{}\n--- sextant log (tail) ---\n{}",
            run.elapsed,
            run.out,
            server.log_tail(60)
        );
    }
    assert!(
        run.out.contains("PASS:"),
        "tests/nacos/{script} exited 0 without its PASS line:\n{}",
        run.out
    );
    println!("{}", run.out);
}

#[test]
fn nacos_python_sdk_v2_grpc_flow() {
    flow(
        "nacos-v2",
        "requirements-v2.txt",
        "v2_grpc_flow.py",
        V2_FLOW,
    );
}

/// With auth on: the SDK logs in with a token's id and secret as username and password,
/// registers in the namespace its token may write, and is refused elsewhere or with a wrong
/// password (`tests/nacos/v2_auth_flow.py`).
#[test]
fn nacos_python_sdk_v2_with_username_and_password() {
    flow_with(
        "nacos-v2",
        "requirements-v2.txt",
        "v2_auth_flow.py",
        Duration::from_secs(150),
        &["--auth", "on"],
    );
}

/// The old 1.x-line client with username/password against auth on (`v1_auth_flow.py`).
#[test]
fn nacos_python_sdk_v1_with_username_and_password() {
    flow_with(
        "nacos-v1",
        "requirements-v1.txt",
        "v1_auth_flow.py",
        Duration::from_secs(150),
        &["--auth", "on"],
    );
}

#[test]
fn nacos_python_sdk_v1_http_flow() {
    flow(
        "nacos-v1",
        "requirements-v1.txt",
        "v1_http_flow.py",
        V1_FLOW,
    );
}

/// The flows report a failure as a failure: against a port nobody listens on, the HTTP flow
/// exits non-zero at once with a `FAIL:` line naming the call.
#[test]
fn a_flow_fails_loudly_without_a_server() {
    let python = venv_python("nacos-v1", "requirements-v1.txt");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let args = vec![
        "--nacos".to_string(),
        closed.to_string(),
        "--http".to_string(),
        closed.to_string(),
    ];
    let run = run_script(&python, "v1_http_flow.py", &args, Duration::from_secs(60));
    let status = run.status.expect("the flow ends by itself");
    assert!(!status.success(), "passed without a server:\n{}", run.out);
    assert!(
        run.out.contains("FAIL: add_naming_instance"),
        "no FAIL line naming the call:\n{}",
        run.out
    );
}
