//! TLS on every TCP listener of the real binary, with a throwaway CA made at run time
//! (`sextant_testkit::TestCa`): curl over HTTPS to the native API and the Nacos 1.x API, the
//! Rust SDK to native gRPC, a tonic client to Nacos 2.x gRPC, the CLI with `--tls-ca`; mTLS
//! (no certificate or a foreign one refused, a signed one's identity in `GET /v1/whoami`);
//! and reloads (SIGHUP and file change) that keep open connections and survive a bad file.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use sextant_client::{Client, Registration, ServiceName};
use sextant_proto::nacos::request_client::RequestClient;
use sextant_proto::nacos::Payload;
use sextant_testkit::{CertFiles, TestCa};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// curl's exit status, stdout and stderr; every call bounded by `--max-time`.
fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl runs (scripts/test.sh installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// curl with the CA (and a client certificate), expecting success and JSON.
fn curl_json(ca: &Path, client: Option<&CertFiles>, extra: &[&str]) -> Value {
    let ca = ca.display().to_string();
    let mut args = vec!["--fail-with-body", "--cacert", ca.as_str()];
    let (cert, key);
    if let Some(c) = client {
        cert = c.cert.display().to_string();
        key = c.key.display().to_string();
        args.extend(["--cert", cert.as_str(), "--key", key.as_str()]);
    }
    args.extend_from_slice(extra);
    let (ok, out, err) = curl(&args);
    assert!(ok, "curl {args:?} failed: {err} {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn start(args: &[String]) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with_args(&args)
}

/// The server's handshake failures with `listener` and `reason`, from `/metrics` over HTTPS.
fn handshake_failures(s: &Server, ca: &Path, client: Option<&CertFiles>, labels: &str) -> f64 {
    let ca = ca.display().to_string();
    let url = format!("https://{}/metrics", s.http);
    let mut args = vec!["--cacert", ca.as_str(), url.as_str()];
    let (cert, key);
    if let Some(c) = client {
        cert = c.cert.display().to_string();
        key = c.key.display().to_string();
        args.extend(["--cert", cert.as_str(), "--key", key.as_str()]);
    }
    let (ok, out, err) = curl(&args);
    assert!(ok, "{err}");
    out.lines()
        .filter(|l| l.starts_with("sextant_tls_handshake_failures_total{") && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether `f` holds within 5 s (a failed handshake is counted by the server a moment after
/// the client gave up).
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sdk(grpc: std::net::SocketAddr, ca: &Path, identity: Option<&CertFiles>) -> Client {
    let mut b = Client::builder()
        .servers([format!("https://127.0.0.1:{}", grpc.port())])
        .call_timeout(Duration::from_secs(5))
        .tls_ca_file(ca);
    if let Some(i) = identity {
        b = b.tls_identity_files(&i.cert, &i.key);
    }
    b.build().expect("build the SDK client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_speaks_tls() {
    let ca = TestCa::new("sextant test CA");
    let server_files = ca.server("server", "sextant-test");
    let s = start(&ca.serve_args(&server_files, false));
    assert!(s.log().contains("tls=\"on\""), "{}", s.log());
    let cafile = ca.ca_file();
    let base = format!("https://{}", s.http);

    // Native HTTP: a registration and whoami with curl.
    let put = format!("{base}/v1/namespaces/public/services/web/instances/w1");
    curl_json(
        cafile,
        None,
        &[
            "-X",
            "PUT",
            "-d",
            r#"{"host":"10.0.0.1","port":8080}"#,
            &put,
        ],
    );
    let me = curl_json(cafile, None, &[&format!("{base}/v1/whoami")]);
    assert_eq!(me["tls"], json!(true), "{me}");
    assert_eq!(me["identity"], Value::Null, "{me}");
    assert!(
        me["addr"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{me}"
    );

    // Plain HTTP on the TLS port, and a client that does not trust the CA, get nothing.
    let (ok, out, _) = curl(&[&format!("http://{}/healthz", s.http)]);
    assert!(!ok, "plain HTTP answered: {out}");
    let (ok, _, err) = curl(&[&format!("{base}/healthz")]);
    assert!(!ok && err.contains("certificate"), "{err}");
    for reason in ["protocol", "alert_received"] {
        let labels = format!("listener=\"http\",reason=\"{reason}\"");
        assert!(
            eventually(|| handshake_failures(&s, cafile, None, &labels) >= 1.0),
            "{reason}"
        );
    }

    // The Nacos 1.x API, over TLS, sees the native registration.
    let (nacos_http, nacos_grpc) = s.nacos.expect("Nacos is on");
    let list = curl_json(
        cafile,
        None,
        &[&format!(
            "https://{nacos_http}/nacos/v1/ns/instance/list?serviceName=web"
        )],
    );
    assert_eq!(list["hosts"][0]["ip"], json!("10.0.0.1"), "{list}");

    // Native gRPC through the SDK over TLS: register, then read both instances.
    let client = sdk(s.grpc, cafile, None);
    let web = ServiceName::new("public", "web").unwrap();
    client
        .register(Registration::new(web.clone(), "10.0.0.2", 8080).id("w2"))
        .await
        .expect("register over gRPC with TLS");
    let got = client.get(&web).await.expect("get over gRPC with TLS");
    assert_eq!(got.instances.len(), 2, "{got:?}");

    // Nacos 2.x gRPC over TLS.
    let pem = std::fs::read(cafile).unwrap();
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{}", nacos_grpc.port()))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
        .unwrap()
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .expect("connect to Nacos gRPC over TLS");
    let check = RequestClient::new(channel)
        .request(Payload::envelope(
            "ServerCheckRequest",
            br#"{"requestId":"1"}"#.to_vec(),
        ))
        .await
        .expect("ServerCheckRequest over TLS")
        .into_inner();
    assert_eq!(check.kind(), "ServerCheckResponse");

    // The CLI with --tls-ca, and without it.
    let cli = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sextant"))
            .args(["--server", &base])
            .args(extra)
            .args(["get", "public/web"])
            .env_remove("SEXTANT_TLS_CA")
            .output()
            .expect("run the CLI")
    };
    let out = cli(&["--tls-ca", &cafile.display().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("10.0.0.2"), "{out:?}");
    assert!(!cli(&[]).status.success(), "the CLI trusted an unknown CA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_signed_client_certificate_and_names_it() {
    let ca = TestCa::new("sextant test CA");
    let server_files = ca.server("server", "sextant-test");
    let s = start(&ca.serve_args(&server_files, true));
    assert!(s.log().contains("tls=\"mutual\""), "{}", s.log());
    let cafile = ca.ca_file();
    let orders = ca.client(
        "orders",
        "orders-client",
        vec!["spiffe://sextant.test/orders".into()],
    );
    let whoami = format!("https://{}/v1/whoami", s.http);

    // No certificate, or one from another CA: refused.
    let (ok, out, _) = curl(&["--cacert", &cafile.display().to_string(), &whoami]);
    assert!(!ok, "answered without a client certificate: {out}");
    let stranger_ca = TestCa::new("another CA");
    let stranger = stranger_ca.client("stranger", "stranger", vec![]);
    let (ok, out, _) = curl(&[
        "--cacert",
        &cafile.display().to_string(),
        "--cert",
        &stranger.cert.display().to_string(),
        "--key",
        &stranger.key.display().to_string(),
        &whoami,
    ]);
    assert!(!ok, "answered a foreign certificate: {out}");

    // A signed certificate: its identity reaches the handler.
    let me = curl_json(cafile, Some(&orders), &[&whoami]);
    assert_eq!(me["tls"], json!(true), "{me}");
    assert_eq!(me["identity"]["name"], json!("orders-client"), "{me}");
    assert_eq!(
        me["identity"]["sans"],
        json!(["spiffe://sextant.test/orders"]),
        "{me}"
    );
    let fails = |labels| handshake_failures(&s, cafile, Some(&orders), labels);
    assert!(eventually(|| fails("reason=\"no_client_cert\"") >= 1.0));
    assert!(eventually(|| fails("reason=\"bad_client_cert\"") >= 1.0));

    // The Nacos HTTP listener asks for the certificate too.
    let (nacos_http, _) = s.nacos.expect("Nacos is on");
    let nacos = format!("https://{nacos_http}/nacos/v1/ns/service/list?pageNo=1&pageSize=10");
    assert!(!curl(&["--cacert", &cafile.display().to_string(), &nacos]).0);
    curl_json(cafile, Some(&orders), &[&nacos]);

    // gRPC: the SDK without a certificate fails, with one it works.
    let web = ServiceName::new("public", "web").unwrap();
    let reg = || Registration::new(web.clone(), "10.0.0.3", 80);
    let anonymous = sdk(s.grpc, cafile, None);
    assert!(anonymous.register(reg()).await.is_err());
    let client = sdk(s.grpc, cafile, Some(&orders));
    client
        .register(reg())
        .await
        .expect("register with a client certificate");
}

/// `GET /v1/whoami` with `client`, answering the client's address as the server sees it.
async fn whoami_addr(client: &reqwest::Client, url: &str) -> Result<String, reqwest::Error> {
    let v: Value = client
        .get(url)
        .timeout(CALL_TIMEOUT)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(v["addr"].as_str().unwrap_or_default().to_string())
}

fn trusting(ca: &TestCa) -> reqwest::Client {
    let pem = std::fs::read(ca.ca_file()).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .build()
        .unwrap()
}

fn install(from: &CertFiles, to: &CertFiles) {
    std::fs::copy(&from.key, &to.key).unwrap();
    std::fs::copy(&from.cert, &to.cert).unwrap();
}

fn sighup(s: &Server) {
    let st = Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .expect("run kill -HUP");
    assert!(st.success());
}

/// Polls (bounded) until a fresh client trusting `ca` gets an answer.
async fn wait_trusted(ca: &TestCa, url: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if whoami_addr(&trusting(ca), url).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_dropping_connections() {
    let (one, two, three) = (
        TestCa::new("CA one"),
        TestCa::new("CA two"),
        TestCa::new("CA three"),
    );
    let live = one.server("live", "first");
    let s = start(&one.serve_args(&live, false));
    let url = format!("https://{}/v1/whoami", s.http);
    // An HTTP/1.1 client trusting only CA one, whose connection stays open (pooled).
    let old = trusting(&one);
    let before = whoami_addr(&old, &url).await.expect("CA one serves");

    // SIGHUP after the files are replaced by CA two's: new connections get the new pair.
    install(&two.server("next", "second"), &live);
    sighup(&s);
    assert!(
        wait_trusted(&two, &url, Duration::from_secs(10)).await,
        "the new certificate was not served; log:\n{}",
        s.log()
    );
    assert!(whoami_addr(&trusting(&one), &url).await.is_err());
    assert!(
        s.log()
            .lines()
            .any(|l| l.contains("TLS certificate reloaded") && l.contains("SIGHUP")),
        "{}",
        s.log()
    );
    // The kept-alive connection made with the old certificate still answers, on the same
    // connection (the same client port).
    let after = whoami_addr(&old, &url)
        .await
        .expect("the old connection lives");
    assert_eq!(before, after, "the old connection was replaced");

    // A bad file is refused, logged, and the current pair kept.
    std::fs::write(&live.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    sighup(&s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.log().contains("not reloaded") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(s.log().contains("not reloaded"), "{}", s.log());
    whoami_addr(&trusting(&two), &url)
        .await
        .expect("the current pair kept after a bad file");

    // A change of the files alone (no signal) is picked up by the poll.
    install(&three.server("third", "third"), &live);
    assert!(
        wait_trusted(&three, &url, Duration::from_secs(15)).await,
        "file change not picked up; log:\n{}",
        s.log()
    );
}

/// A child process killed on drop.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cmd` without the proxy and gRPC variables of the caller's shell.
fn clean(cmd: &mut Command) -> &mut Command {
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
        "GRPC_XDS_BOOTSTRAP",
        "GRPC_XDS_BOOTSTRAP_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost")
}

/// grpcio's own xDS client (`.venv/xds`, installed by scripts/test.sh) resolves and calls a
/// service over an ADS stream on TLS, with the bootstrap `sextant xds bootstrap` prints for an
/// `https://` server and `--tls-ca`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_xds_client_over_tls() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap();
    let python = root.join(".venv/xds/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test.sh (it installs grpcio)",
        python.display()
    );
    let ca = TestCa::new("sextant test CA");
    let files = ca.server("server", "sextant-test");
    let s = start(&ca.serve_args(&files, false));
    let cafile = ca.ca_file().display().to_string();

    // A plain gRPC echo server, registered over HTTPS.
    let mut echo = Command::new(&python);
    clean(&mut echo)
        .arg(root.join("tests/xds/echo_server.py"))
        .args(["--port", "0", "--id", "e1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut echo = Kill(echo.spawn().expect("start the echo server"));
    let stdout = echo.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(STARTUP_TIMEOUT)
        .expect("the echo server's READY line");
    let port: u16 = line
        .trim()
        .strip_prefix("READY ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("echo server said {line:?}"));
    let body = json!({"host": "127.0.0.1", "port": port, "protocol": "grpc",
                      "location": {"region": "r1", "zone": "z1"}})
    .to_string();
    let put = format!(
        "https://{}/v1/namespaces/prod/services/echo/instances/e1",
        s.http
    );
    curl_json(ca.ca_file(), None, &["-X", "PUT", "-d", &body, &put]);

    // The bootstrap for https:// names the CA; then one client process makes its calls.
    let out = Command::new(env!("CARGO_BIN_EXE_sextant"))
        .args(["--grpc-server", &format!("https://{}", s.grpc)])
        .args(["--tls-ca", &cafile])
        .args([
            "xds",
            "bootstrap",
            "--node-id",
            "tls-1",
            "--region",
            "r1",
            "--zone",
            "z1",
        ])
        .output()
        .expect("run sextant xds bootstrap");
    assert!(out.status.success(), "{out:?}");
    let bootstrap: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        bootstrap["xds_servers"][0]["channel_creds"][0],
        json!({"type": "tls", "config": {"ca_certificate_file": cafile}})
    );
    let path = ca.dir().join("bootstrap.json");
    std::fs::write(&path, &out.stdout).unwrap();
    let mut client = Command::new(&python);
    clean(&mut client)
        .arg(root.join("tests/xds/client.py"))
        .args(["--target", "xds:///echo.prod", "--calls", "3"])
        .args(["--deadline-ms", "5000", "--batch-seconds", "20"])
        .env("GRPC_XDS_BOOTSTRAP", &path);
    let out = client.output().expect("run the grpcio client");
    let text = String::from_utf8_lossy(&out.stdout);
    let last: Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no result from client.py: {out:?}"));
    assert_eq!(last["counts"]["e1"], json!(3), "{last} {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_ca_reloads_too() {
    let server_ca = TestCa::new("server CA");
    let (old_ca, new_ca) = (TestCa::new("clients before"), TestCa::new("clients after"));
    let server_files = server_ca.server("server", "sextant-test");
    // The client CA file the node reads: a copy, replaced below.
    let clients = server_ca.dir().join("clients.pem");
    std::fs::copy(old_ca.ca_file(), &clients).unwrap();
    let mut args = server_ca.serve_args(&server_files, false);
    args.extend(["--tls-client-ca".into(), clients.display().to_string()]);
    let s = start(&args);
    let whoami = format!("https://{}/v1/whoami", s.http);
    let before = old_ca.client("before", "before", vec![]);
    let after = new_ca.client("after", "after", vec![]);
    let ca = server_ca.ca_file().display().to_string();
    let works = |c: &CertFiles| {
        let (cert, key) = (c.cert.display().to_string(), c.key.display().to_string());
        curl(&[
            "--fail", "--cacert", &ca, "--cert", &cert, "--key", &key, &whoami,
        ])
        .0
    };
    assert!(works(&before) && !works(&after));

    std::fs::copy(new_ca.ca_file(), &clients).unwrap();
    sighup(&s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !works(&after) {
        assert!(
            Instant::now() < deadline,
            "the new client CA was not used; log:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!works(&before), "a client of the old CA still accepted");

    // A bad CA file keeps the current set-up whole.
    std::fs::write(&clients, b"not a certificate").unwrap();
    sighup(&s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.log().contains("not reloaded") {
        assert!(Instant::now() < deadline, "{}", s.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(works(&after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_bound_to_a_token_is_a_credential() {
    let ca = TestCa::new("sextant test CA");
    let server_files = ca.server("server", "sextant-test");
    let mut args = ca.serve_args(&server_files, true);
    args.extend(["--auth".into(), "on".into()]);
    let s = start(&args);
    let cafile = ca.ca_file();
    let orders = ca.client("orders", "orders-client", vec![]);
    let stranger = ca.client("stranger", "stranger", vec![]);
    let base = format!("https://{}", s.http);
    let with = |c: &CertFiles, extra: &[&str]| {
        let (cert, key) = (c.cert.display().to_string(), c.key.display().to_string());
        let ca = cafile.display().to_string();
        let mut a = vec!["--cacert", &ca, "--cert", &cert, "--key", &key];
        a.extend_from_slice(extra);
        let (_, out, err) = curl(&a.iter().map(|s| &**s).collect::<Vec<_>>());
        (out, err)
    };
    let status = |c: &CertFiles, extra: &[&str]| {
        let mut a = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        a.extend_from_slice(extra);
        with(c, &a).0
    };

    // The first admin token (bootstrap is public), a policy, and a token bound to the
    // orders-client certificate.
    let boot_url = format!("{base}/v1/acl/bootstrap");
    let (boot, _) = with(&orders, &["-X", "POST", &boot_url]);
    let boot: Value = serde_json::from_str(&boot).unwrap_or_else(|e| panic!("{e}: {boot}"));
    let bearer = format!("authorization: Bearer {}", boot["secret"].as_str().unwrap());
    let json_ct = "content-type: application/json";
    let policy = json!({"rules": [{"namespace": "prod", "rights": ["read", "write"]}]});
    let url = format!("{base}/v1/acl/policies/prod-rw");
    let body = policy.to_string();
    let put = ["-X", "PUT", "-H", &bearer, "-H", json_ct, "-d", &body, &url];
    assert_eq!(status(&orders, &put), "200");
    let token = json!({"policies": ["prod-rw"], "tls_identities": ["orders-client"]});
    let url = format!("{base}/v1/acl/tokens");
    let body = token.to_string();
    let post = [
        "-X", "POST", "-H", &bearer, "-H", json_ct, "-d", &body, &url,
    ];
    assert_eq!(status(&orders, &post), "201");

    // No bearer token: the certificate is the credential, with that token's rights.
    let reg = json!({"host": "10.0.0.5", "port": 80}).to_string();
    let inst = format!("{base}/v1/namespaces/prod/services/web/instances/a");
    let put = ["-X", "PUT", "-H", json_ct, "-d", &reg, &inst];
    assert_eq!(status(&orders, &put), "200");
    let dev = format!("{base}/v1/namespaces/dev/services/web");
    assert_eq!(status(&orders, &[&dev]), "403");
    // A certificate bound to no token is no credential.
    let (out, _) = with(&stranger, &[&inst]);
    assert!(
        out.contains("unauthenticated") && out.contains("stranger"),
        "{out}"
    );

    // The same over gRPC: the SDK with the certificate and no token.
    let web = ServiceName::new("prod", "web").unwrap();
    let client = sdk(s.grpc, cafile, Some(&orders));
    client
        .register(Registration::new(web.clone(), "10.0.0.6", 80))
        .await
        .expect("register over gRPC with the bound certificate");
    let other = sdk(s.grpc, cafile, Some(&stranger));
    assert!(other
        .register(Registration::new(web, "10.0.0.7", 80))
        .await
        .is_err());
}
