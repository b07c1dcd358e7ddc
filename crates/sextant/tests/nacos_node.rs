//! Nacos 1.x UDP push, with the real Nacos Node.js SDK (npm `nacos`, installed by
//! scripts/test.sh into tests/nacos/node): a subscriber sees each change within milliseconds,
//! pushed and acknowledged, not on its next poll (it is told to poll every 10 s); with push
//! turned off it still converges by polling and nothing is pushed.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

/// Far below the 10 s the SDK waits between polls while it is pushed to: a change seen within
/// this was pushed.
const PUSHED_WITHIN: Duration = Duration::from_millis(1500);

fn node_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/nacos/node")
}

/// The SDK subscribed to a service; killed when dropped.
struct Subscriber {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Subscriber {
    fn start(nacos_http: std::net::SocketAddr, service: &str) -> Subscriber {
        let dir = node_dir();
        assert!(
            dir.join("node_modules/nacos").is_dir(),
            "the Nacos Node.js SDK is not installed in {}: run scripts/test.sh",
            dir.display()
        );
        let mut child = Command::new("node")
            .arg(dir.join("subscriber.js"))
            .arg(nacos_http.to_string())
            .arg(service)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run node");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let s = Subscriber { child, lines };
        s.expect_line(|l| l == "READY", Duration::from_secs(20));
        s
    }

    fn expect_line(&self, want: impl Fn(&str) -> bool, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if want(&l) => return l,
                Ok(_) => {}
                Err(e) => panic!("the subscriber did not print the expected line: {e:?}"),
            }
        }
    }

    /// Waits for a change showing exactly `hosts`; returns when the SDK reported it (ms).
    fn expect_hosts(&self, hosts: &[&str], within: Duration) -> u64 {
        let line = self.expect_line(
            |l| {
                serde_json::from_str::<Value>(l).is_ok_and(|v| {
                    let got: Vec<&str> = v["hosts"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    got == hosts
                })
            },
            within,
        );
        let v: Value = serde_json::from_str(&line).expect("a JSON line");
        v["t"].as_u64().expect("a time")
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn switches(nacos_http: std::net::SocketAddr) -> Value {
    let url = format!("http://{nacos_http}/nacos/v1/ns/operator/switches");
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

fn host(i: u8) -> Value {
    json!({"host": format!("10.9.0.{i}"), "port": 80})
}

#[tokio::test]
async fn the_node_sdk_gets_changes_pushed_over_udp() {
    let server = Server::start();
    let (nacos_http, _) = server.nacos.expect("the Nacos adapter is on");
    let api = server.api();
    api.register("public", "pushed", "a1", &host(1)).await;
    let sub = Subscriber::start(nacos_http, "pushed");
    sub.expect_hosts(&["10.9.0.1:80"], Duration::from_secs(10));

    let mut latencies = Vec::new();
    let mut expected = vec!["10.9.0.1:80".to_string()];
    for i in 2..=4u8 {
        let sent = now_ms();
        api.register("public", "pushed", &format!("a{i}"), &host(i))
            .await;
        expected.push(format!("10.9.0.{i}:80"));
        let want: Vec<&str> = expected.iter().map(String::as_str).collect();
        let seen = sub.expect_hosts(&want, PUSHED_WITHIN);
        latencies.push(seen.saturating_sub(sent));
    }
    let sent = now_ms();
    api.deregister("public", "pushed", "a1").await;
    let seen = sub.expect_hosts(
        &["10.9.0.2:80", "10.9.0.3:80", "10.9.0.4:80"],
        PUSHED_WITHIN,
    );
    latencies.push(seen.saturating_sub(sent));
    eprintln!("write → Node SDK listener (ms): {latencies:?}");

    // Each change was a UDP push the SDK acknowledged.
    let deadline = Instant::now() + Duration::from_secs(3);
    while metric(&api, "sextant_nacos_udp_acks_total").await < 4.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(metric(&api, "sextant_nacos_udp_acks_total").await >= 4.0);
    assert_eq!(metric(&api, "sextant_nacos_udp_clients").await, 1.0);
    assert_eq!(switches(nacos_http).await["pushEnabled"], true);
}

#[tokio::test]
async fn without_udp_push_the_node_sdk_polls() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(tmp.path(), &["--nacos-udp-push", "false"]);
    let (nacos_http, _) = server.nacos.expect("the Nacos adapter is on");
    let api = server.api();
    api.register("public", "polled", "a1", &host(1)).await;
    let sub = Subscriber::start(nacos_http, "polled");
    sub.expect_hosts(&["10.9.0.1:80"], Duration::from_secs(10));
    api.register("public", "polled", "a2", &host(2)).await;
    // Polling every 3 s (the list's cacheMillis without push).
    sub.expect_hosts(&["10.9.0.1:80", "10.9.0.2:80"], Duration::from_secs(8));
    assert_eq!(metric(&api, "sextant_nacos_udp_pushes_total").await, 0.0);
    assert_eq!(switches(nacos_http).await["pushEnabled"], false);
}
