//! The Nacos 2.x gRPC protocol of the real binary at the wire level (`Payload` with JSON
//! bodies), for what real clients do not show on their own: error answers to bad input,
//! push on a native change, and ephemeral instances lapsing a grace after their connection
//! drops while another connection's subscription sees them go. The real clients are tested in
//! `nacos_python.rs` and `nacos_rust_sdk.rs`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use sextant_proto::nacos::bi_request_stream_client::BiRequestStreamClient;
use sextant_proto::nacos::request_client::RequestClient;
use sextant_proto::nacos::Payload;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

fn payload(kind: &str, body: Value) -> Payload {
    Payload::envelope(kind, serde_json::to_vec(&body).unwrap()).with_client_ip("127.0.0.1")
}

/// The server's count of attached Nacos bi-streams (`sextant_nacos_connections`).
async fn attached_streams(server: &Server) -> f64 {
    let metrics = server.api().get("/metrics").await.text;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("sextant_nacos_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no connection gauge in {metrics}"))
}

/// Waits (bounded) until the server has attached `n` bi-streams: it registers a stream
/// asynchronously, after the client's call returned.
async fn wait_for_streams(server: &Server, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = attached_streams(server).await;
        if now >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server attached {now} bi-streams, not {n}, within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn parse(p: &Payload) -> (String, Value) {
    let kind = p.metadata.as_ref().unwrap().r#type.clone();
    let body = serde_json::from_slice(&p.body.as_ref().unwrap().value).unwrap();
    (kind, body)
}

/// One Nacos client connection: the unary stub and the bi-stream on one channel.
struct NacosConn {
    channel: Channel,
    unary: RequestClient<Channel>,
    to_server: mpsc::Sender<Payload>,
    pushes: mpsc::Receiver<Value>,
    reader: tokio::task::JoinHandle<()>,
}

impl NacosConn {
    /// Connects to `server`'s Nacos gRPC port and returns once the server has attached the
    /// bi-stream.
    async fn open(server: &Server) -> NacosConn {
        let (_, addr) = server.nacos.expect("nacos on");
        let before = attached_streams(server).await;
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the Nacos gRPC port");
        let mut unary = RequestClient::new(channel.clone());
        let (kind, check) = parse(
            &unary
                .request(payload("ServerCheckRequest", json!({"requestId": "1"})))
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(kind, "ServerCheckResponse");
        assert_eq!(check["resultCode"], 200);
        assert!(!check["connectionId"].as_str().unwrap().is_empty());

        let (to_server, rx) = mpsc::channel(16);
        to_server
            .send(payload(
                "ConnectionSetupRequest",
                json!({"clientVersion": "wire-test", "tenant": "", "labels": {}}),
            ))
            .await
            .unwrap();
        let mut inbound = BiRequestStreamClient::new(channel.clone())
            .request_bi_stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let (push_tx, pushes) = mpsc::channel(64);
        let ack = to_server.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(p)) = inbound.message().await {
                let (kind, body) = parse(&p);
                if kind == "NotifySubscriberRequest" {
                    let id = body["requestId"].clone();
                    let _ = ack
                        .send(payload(
                            "NotifySubscriberResponse",
                            json!({"requestId": id, "resultCode": 200}),
                        ))
                        .await;
                    let _ = push_tx.send(body).await;
                }
            }
        });
        wait_for_streams(server, before + 1.0).await;
        NacosConn {
            channel,
            unary,
            to_server,
            pushes,
            reader,
        }
    }

    /// Closes the connection abruptly, as a killed process would: no deregistration.
    async fn kill(self) {
        self.reader.abort();
        let _ = self.reader.await;
        drop(self.to_server);
        drop(self.unary);
    }

    /// A call carrying `accessToken` in the payload's headers, as the Nacos SDKs send it.
    async fn call_with_token(&mut self, kind: &str, body: Value, token: &str) -> (String, Value) {
        let mut p = payload(kind, body);
        if let Some(m) = p.metadata.as_mut() {
            m.headers.insert("accessToken".into(), token.into());
        }
        parse(&self.unary.request(p).await.unwrap().into_inner())
    }

    async fn call(&mut self, kind: &str, body: Value) -> (String, Value) {
        parse(
            &self
                .unary
                .request(payload(kind, body))
                .await
                .unwrap()
                .into_inner(),
        )
    }

    /// Waits (bounded) for a push whose host list satisfies `want`.
    async fn push_where(&mut self, what: &str, want: impl Fn(&[Value]) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.pushes.recv()).await {
                Ok(Some(push)) => {
                    let hosts = push["serviceInfo"]["hosts"].as_array().unwrap().clone();
                    if want(&hosts) {
                        return push;
                    }
                }
                _ => panic!("no push where {what} within 15 s"),
            }
        }
    }
}

fn instance(ip: &str, port: u16) -> Value {
    json!({"ip": ip, "port": port, "weight": 2.0, "healthy": true, "enabled": true,
           "ephemeral": true, "clusterName": "DEFAULT", "metadata": {"v": "1"}})
}

fn ports(hosts: &[Value]) -> Vec<u64> {
    let mut p: Vec<u64> = hosts.iter().map(|h| h["port"].as_u64().unwrap()).collect();
    p.sort();
    p
}

#[tokio::test]
async fn bad_requests_get_error_responses_not_failures() {
    let server = Server::start();
    let mut c = NacosConn::open(&server).await;

    let (kind, body) = c.call("NoSuchRequest", json!({"requestId": "7"})).await;
    assert_eq!(kind, "ErrorResponse");
    assert_eq!(body["errorCode"], 302);
    assert_eq!(body["requestId"], "7");

    let (kind, body) = c.call("ConfigQueryRequest", json!({})).await;
    assert_eq!(kind, "ErrorResponse");
    assert!(
        body["message"].as_str().unwrap().contains("config center"),
        "{body}"
    );

    let bad_port = json!({"requestId": "8", "serviceName": "orders", "type": "registerInstance",
                          "instance": instance("10.0.0.1", 1)});
    let mut bad_port_body = bad_port.clone();
    bad_port_body["instance"]["port"] = json!(70000);
    let (kind, body) = c.call("InstanceRequest", bad_port_body).await;
    assert_eq!(kind, "ErrorResponse");
    assert_eq!(body["errorCode"], 400);
    assert!(body["message"].as_str().unwrap().contains("port"), "{body}");

    let mut bad_weight = bad_port.clone();
    bad_weight["instance"]["weight"] = json!(1000.0);
    let (_, body) = c.call("InstanceRequest", bad_weight).await;
    assert_eq!(body["errorCode"], 400);
    assert!(
        body["message"].as_str().unwrap().contains("weight"),
        "{body}"
    );

    let (_, body) = c
        .call(
            "InstanceRequest",
            json!({"type": "registerInstance", "instance": instance("10.0.0.1", 1)}),
        )
        .await;
    assert!(
        body["message"].as_str().unwrap().contains("serviceName"),
        "{body}"
    );

    let (kind, body) = parse(
        &c.unary
            .request(Payload::envelope("InstanceRequest", b"{not json".to_vec()))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(kind, "ErrorResponse");
    assert_eq!(body["errorCode"], 400);

    // A persistent instance is registered without a lease, and its service gets the TCP
    // check Nacos would run on it (unless it has one).
    let (kind, body) = c
        .call(
            "PersistentInstanceRequest",
            json!({"requestId": "9", "serviceName": "db", "type": "registerInstance",
                   "instance": instance("127.0.0.1", 5432)}),
        )
        .await;
    assert_eq!(
        (kind.as_str(), &body["resultCode"]),
        ("InstanceResponse", &json!(200)),
        "{body}"
    );
    let native = server
        .api()
        .get("/v1/namespaces/public/services/db")
        .await
        .ok();
    assert_eq!(native["check"]["kind"], "tcp", "{native}");
    assert_eq!(native["instances"][0]["ttl_seconds"], 0, "{native}");

    // None of it was a server error.
    let metrics = server.api().get("/metrics").await.text;
    for outcome in ["unavailable", "internal", "shutting_down"] {
        assert!(
            !metrics.contains(&format!("outcome=\"{outcome}\"")),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn subscribers_see_native_changes_and_instances_of_a_dropped_connection_lapse() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(tmp.path(), &["--nacos-connection-grace-seconds", "1"]);
    let mut watcher = NacosConn::open(&server).await;
    let mut owner = NacosConn::open(&server).await;

    let (kind, body) = owner
        .call(
            "InstanceRequest",
            json!({"requestId": "1", "namespace": "public", "serviceName": "orders",
                   "groupName": "G1", "type": "registerInstance",
                   "instance": instance("10.0.0.1", 8080)}),
        )
        .await;
    assert_eq!(
        (kind.as_str(), &body["resultCode"]),
        ("InstanceResponse", &json!(200)),
        "{body}"
    );

    let (kind, body) = watcher
        .call(
            "SubscribeServiceRequest",
            json!({"requestId": "2", "namespace": "", "serviceName": "orders",
                   "groupName": "G1", "clusters": "", "subscribe": true}),
        )
        .await;
    assert_eq!(kind, "SubscribeServiceResponse");
    let info = &body["serviceInfo"];
    assert_eq!(
        (info["name"].as_str(), info["groupName"].as_str()),
        (Some("orders"), Some("G1"))
    );
    assert_eq!(ports(info["hosts"].as_array().unwrap()), vec![8080]);
    assert_eq!(info["hosts"][0]["weight"], 2.0);
    assert_eq!(info["hosts"][0]["metadata"]["v"], "1");

    // A native registration into the same service reaches the Nacos subscriber.
    server
        .api()
        .register(
            "public",
            "G1@@orders",
            "native-1",
            &json!({"host": "10.0.0.2", "port": 9090, "protocol": "http"}),
        )
        .await;
    watcher
        .push_where("the native instance is added", |h| {
            ports(h) == vec![8080, 9090]
        })
        .await;

    // The owner's connection drops without deregistering: its instance lapses a grace later.
    let dropped = Instant::now();
    owner.kill().await;
    watcher
        .push_where("the dropped connection's instance is gone", |h| {
            ports(h) == vec![9090]
        })
        .await;
    let took = dropped.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "removed before the grace: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // A live connection's instances outlive many grace periods.
    let (_, body) = watcher
        .call(
            "InstanceRequest",
            json!({"requestId": "3", "serviceName": "orders", "groupName": "G1",
                   "type": "registerInstance", "instance": instance("10.0.0.3", 7000)}),
        )
        .await;
    assert_eq!(body["resultCode"], 200, "{body}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, body) = watcher
        .call(
            "ServiceQueryRequest",
            json!({"requestId": "4", "serviceName": "orders", "groupName": "G1",
                   "cluster": "", "healthyOnly": false}),
        )
        .await;
    assert_eq!(
        ports(body["serviceInfo"]["hosts"].as_array().unwrap()),
        vec![7000, 9090]
    );

    // One connection holds one instance per service: a second registration replaces it.
    let (_, body) = watcher
        .call(
            "InstanceRequest",
            json!({"requestId": "6", "serviceName": "orders", "groupName": "G1",
                   "type": "registerInstance", "instance": instance("10.0.0.3", 7001)}),
        )
        .await;
    assert_eq!(body["resultCode"], 200, "{body}");
    watcher
        .push_where("the connection's instance moved to port 7001", |h| {
            ports(h) == vec![7001, 9090]
        })
        .await;

    let (_, body) = watcher
        .call(
            "ServiceListRequest",
            json!({"requestId": "5", "namespace": "public", "groupName": "G1",
                   "pageNo": 1, "pageSize": 10}),
        )
        .await;
    assert_eq!(body["serviceNames"], json!(["orders"]), "{body}");
    // The watcher answered every push it got; the server counted those acks.
    let metrics = server.api().get("/metrics").await.text;
    let acks: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sextant_nacos_push_acks_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no push ack counter in {metrics}"));
    assert!(acks >= 3.0, "only {acks} push acks counted");
}

#[tokio::test]
async fn a_newer_stream_on_the_same_connection_keeps_its_instances() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(tmp.path(), &["--nacos-connection-grace-seconds", "1"]);
    let mut c = NacosConn::open(&server).await;
    let (_, body) = c
        .call(
            "InstanceRequest",
            json!({"requestId": "1", "serviceName": "pay", "type": "registerInstance",
                   "instance": instance("10.0.0.7", 8080)}),
        )
        .await;
    assert_eq!(body["resultCode"], 200, "{body}");

    // A second bi-stream on the same HTTP/2 connection, then the first one ends.
    let (tx2, rx2) = mpsc::channel(4);
    tx2.send(payload(
        "ConnectionSetupRequest",
        json!({"clientVersion": "second"}),
    ))
    .await
    .unwrap();
    let _inbound2 = BiRequestStreamClient::new(c.channel.clone())
        .request_bi_stream(ReceiverStream::new(rx2))
        .await
        .unwrap()
        .into_inner();
    // Both streams attached before the first one ends.
    wait_for_streams(&server, 2.0).await;
    c.reader.abort();
    let _ = (&mut c.reader).await;
    let mut unary = c.unary.clone();
    drop(c.to_server);

    // Several grace periods later the instance is still served.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, body) = parse(
        &unary
            .request(payload(
                "ServiceQueryRequest",
                json!({"requestId": "2", "serviceName": "pay", "cluster": "", "healthyOnly": false}),
            ))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        ports(body["serviceInfo"]["hosts"].as_array().unwrap()),
        vec![8080],
        "{body}"
    );
}

#[tokio::test]
async fn revoking_a_token_ends_its_nacos_subscriptions() {
    let server = Server::start_with_args(&["--auth", "on"]);
    let anon = server.api();
    let boot = anon.post("/v1/acl/bootstrap", &json!({})).await;
    assert_eq!(boot.status, 201, "{}", boot.text);
    let admin_secret = boot.body["secret"].as_str().unwrap().to_string();
    let admin = server.api().with_bearer(&admin_secret);
    admin
        .put(
            "/v1/acl/policies/reader",
            &json!({"rules": [{"namespace": "public", "rights": ["read"]}]}),
        )
        .await
        .ok();
    let t = admin
        .post("/v1/acl/tokens", &json!({"policies": ["reader"]}))
        .await;
    assert_eq!(t.status, 201, "{}", t.text);
    let (id, secret) = (
        t.body["id"].as_str().unwrap().to_string(),
        t.body["secret"].as_str().unwrap().to_string(),
    );

    let mut watcher = NacosConn::open(&server).await;
    let (kind, body) = watcher
        .call_with_token(
            "SubscribeServiceRequest",
            json!({"requestId": "1", "namespace": "", "serviceName": "orders",
                   "groupName": "G1", "clusters": "", "subscribe": true}),
            &secret,
        )
        .await;
    assert_eq!(kind, "SubscribeServiceResponse", "{body}");
    assert_eq!(body["resultCode"], 200, "{body}");
    let reg = |port: u16| json!({"host": "10.0.0.2", "port": port, "protocol": "http"});
    admin
        .put(&instance_path("public", "G1@@orders", "a"), &reg(9090))
        .await
        .ok();
    watcher
        .push_where("the first instance is pushed", |h| ports(h) == vec![9090])
        .await;
    let metrics_api = server.api().with_bearer(&admin_secret);
    assert_eq!(
        metric(&metrics_api, "sextant_nacos_subscriptions").await,
        1.0
    );

    // Revoked: the subscription ends (no more pushes) and a new subscribe is refused.
    let r = admin.delete(&format!("/v1/acl/tokens/{id}")).await;
    assert!(r.status < 300, "{}", r.text);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&metrics_api, "sextant_nacos_subscriptions").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the subscription outlived its token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while watcher.pushes.try_recv().is_ok() {}
    admin
        .put(&instance_path("public", "G1@@orders", "b"), &reg(9091))
        .await
        .ok();
    let late = tokio::time::timeout(Duration::from_millis(700), watcher.pushes.recv()).await;
    assert!(late.is_err(), "a push after revocation: {late:?}");
    let (_, body) = watcher
        .call_with_token(
            "SubscribeServiceRequest",
            json!({"requestId": "2", "namespace": "", "serviceName": "orders",
                   "groupName": "G1", "clusters": "", "subscribe": true}),
            &secret,
        )
        .await;
    assert_eq!(body["errorCode"], 401, "{body}");
}
