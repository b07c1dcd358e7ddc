//! The bench's own Nacos 2.x gRPC client, written from Nacos' wire protocol (`proto/nacos`, a
//! copy of Nacos' envelope) so it drives any Nacos server: unary `Request/request` and the
//! `BiRequestStream` a client keeps open, both carrying `Payload{metadata.type, body: JSON}`.
//!
//! This module owns one subscriber's connection and its bookkeeping: the handshake
//! (`ServerCheckRequest` → connection id; bi-stream opened with `ConnectionSetupRequest`), the
//! `SubscribeServiceRequest`, and then every server request on the stream — a
//! `NotifySubscriberRequest` push is answered with `NotifySubscriberResponse`, a
//! `ClientDetectionRequest` with `ClientDetectionResponse`, as Nacos' SDKs do. A push carries
//! the service's whole state; the tool finds in it, without parsing all of it, the highest
//! change sequence number any instance's metadata shows (see [`scan_push`]), because a server
//! may coalesce changes: a push showing sequence `m` delivers every change up to `m`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::channel::mpsc;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::push::{Live, Seen};

/// Nacos' gRPC envelope, the same generated code the server's adapter uses.
pub use sextant_proto::nacos as pb;

use pb::bi_request_stream_client::BiRequestStreamClient;
use pb::request_client::RequestClient;

/// The client version this tool announces in `ConnectionSetupRequest`.
const CLIENT_VERSION: &str = "Nacos-Rust-Client:sextant-bench";
/// The metadata key whose value is the change sequence number the tool writes.
pub const SEQ_KEY: &str = "benchSeq";
/// Largest message accepted (a push carries a whole service).
const MAX_MESSAGE: usize = 64 << 20;

/// A Nacos payload: `metadata.type` names the JSON `body` (the proto crate's one envelope
/// builder).
pub fn payload(kind: &str, body: &Value) -> pb::Payload {
    // A `Value` always encodes (its keys are strings).
    let body = serde_json::to_vec(body).expect("a JSON value encodes");
    pb::Payload::envelope(kind, body).with_client_ip("127.0.0.1")
}

/// A connection to a Nacos server's gRPC port, after `ServerCheckRequest` (which answered with
/// a connection id).
pub struct Connection {
    pub channel: Channel,
    pub request: RequestClient<Channel>,
}

/// Opens one HTTP/2 connection (as one Nacos client holds) and asks `ServerCheckRequest`.
pub async fn connect(url: &str) -> anyhow::Result<Connection> {
    let channel = Channel::from_shared(url.to_string())
        .with_context(|| format!("invalid gRPC URL {url}"))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let mut request = RequestClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let check = call(
        &mut request,
        "ServerCheckRequest",
        &json!({"headers": {}, "requestId": "", "module": "internal"}),
        "ServerCheckResponse",
    )
    .await?;
    anyhow::ensure!(
        check.get("connectionId").and_then(Value::as_str).is_some(),
        "ServerCheckResponse without connectionId: {check}"
    );
    Ok(Connection { channel, request })
}

/// A unary request; the response's JSON body when its type is `expect` and its `resultCode`
/// is 200 (or absent), an error naming what came back otherwise.
pub async fn call(
    client: &mut RequestClient<Channel>,
    kind: &str,
    body: &Value,
    expect: &str,
) -> anyhow::Result<Value> {
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(payload(kind, body)))
        .await
        .with_context(|| format!("{kind}: no answer within 30 s"))?
        .with_context(|| format!("{kind}: gRPC error"))?
        .into_inner();
    let rtype = resp
        .metadata
        .as_ref()
        .map(|m| m.r#type.clone())
        .unwrap_or_default();
    let raw = resp.body.map(|b| b.value).unwrap_or_default();
    let v: Value = serde_json::from_slice(&raw).with_context(|| {
        format!(
            "{kind}: {rtype} body is not JSON: {}",
            String::from_utf8_lossy(&raw[..raw.len().min(300)])
        )
    })?;
    let code = v.get("resultCode").and_then(Value::as_u64).unwrap_or(200);
    if rtype != expect || code != 200 {
        anyhow::bail!("{kind} answered {rtype} {}", truncate(&v.to_string(), 300));
    }
    Ok(v)
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// What the tool found in one push body.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PushScan {
    pub request_id: Option<String>,
    /// Highest [`SEQ_KEY`] value of any instance; `None` when no instance has one.
    pub max_seq: Option<u64>,
    /// Instances in the push (occurrences of the key `"ip"`).
    pub hosts: usize,
}

/// Reads a push's `requestId`, its instances' highest [`SEQ_KEY`] and their number, scanning
/// the JSON text for those keys instead of parsing every instance (a push carries the whole
/// service, and W subscribers each receive every push on the tool's share of two cores). Falls
/// back to a full parse for the `requestId` when the scan cannot read it.
pub fn scan_push(body: &[u8]) -> PushScan {
    let Ok(text) = std::str::from_utf8(body) else {
        return PushScan::default();
    };
    let mut out = PushScan {
        request_id: key_values(text, "requestId")
            .next()
            .and_then(|v| v.as_string()),
        ..PushScan::default()
    };
    for v in key_values(text, SEQ_KEY) {
        if let Some(n) = v.as_u64() {
            out.max_seq = Some(out.max_seq.map_or(n, |m| m.max(n)));
        }
    }
    out.hosts = key_values(text, "ip").count();
    if out.request_id.is_none() {
        out.request_id =
            serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| match v.get("requestId") {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Number(n)) => Some(n.to_string()),
                    _ => None,
                });
    }
    out
}

/// The instances of a `serviceInfo`-shaped JSON answer (a 1.x instance list), counted as the
/// occurrences of the key `"ip"`; `None` when the text is not a JSON object with `hosts`.
pub fn count_hosts(body: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(body).ok()?;
    if !text.trim_start().starts_with('{') || key_values(text, "hosts").next().is_none() {
        return None;
    }
    Some(key_values(text, "ip").count())
}

/// A scalar JSON value as it appears in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Raw<'a> {
    /// A string without escapes (its contents).
    Str(&'a str),
    /// A number, `true`, `false`, `null`, or a string with escapes (the raw token).
    Other(&'a str),
    /// An object or array (not read).
    Nested,
}

impl Raw<'_> {
    fn as_string(self) -> Option<String> {
        match self {
            Raw::Str(s) => Some(s.to_string()),
            Raw::Other(t) if t.starts_with('"') => serde_json::from_str(t).ok(),
            Raw::Other(t) if t.bytes().all(|b| b.is_ascii_digit()) && !t.is_empty() => {
                Some(t.to_string())
            }
            _ => None,
        }
    }

    fn as_u64(self) -> Option<u64> {
        match self {
            Raw::Str(s) | Raw::Other(s) => s.trim_matches('"').parse().ok(),
            Raw::Nested => None,
        }
    }
}

/// The values of every occurrence of `"key":` in `text` (at any depth).
fn key_values<'a>(text: &'a str, key: &'a str) -> impl Iterator<Item = Raw<'a>> + 'a {
    let quoted_len = key.len() + 2;
    let bytes = text.as_bytes();
    text.match_indices('"')
        .map(|(i, _)| i)
        .filter(move |&i| {
            bytes.get(i + 1..i + 1 + key.len()) == Some(key.as_bytes())
                && bytes.get(i + 1 + key.len()) == Some(&b'"')
        })
        .filter_map(move |i| {
            let mut p = i + quoted_len;
            let skip_ws = |p: &mut usize| {
                while bytes.get(*p).is_some_and(|b| b.is_ascii_whitespace()) {
                    *p += 1;
                }
            };
            skip_ws(&mut p);
            if bytes.get(p) != Some(&b':') {
                return None; // a string value equal to the key, not a key
            }
            p += 1;
            skip_ws(&mut p);
            match bytes.get(p)? {
                b'"' => {
                    let start = p + 1;
                    let mut q = start;
                    let mut escaped = false;
                    while let Some(&b) = bytes.get(q) {
                        match b {
                            b'\\' => {
                                escaped = true;
                                q += 2;
                            }
                            b'"' => break,
                            _ => q += 1,
                        }
                    }
                    let end = q.min(bytes.len());
                    if escaped {
                        text.get(p..(end + 1).min(bytes.len())).map(Raw::Other)
                    } else {
                        text.get(start..end).map(Raw::Str)
                    }
                }
                b'{' | b'[' => Some(Raw::Nested),
                _ => {
                    let start = p;
                    let mut q = p;
                    while bytes.get(q).is_some_and(|b| {
                        !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace()
                    }) {
                        q += 1;
                    }
                    text.get(start..q).map(Raw::Other)
                }
            }
        })
}

/// Counters every subscriber adds to.
#[derive(Default)]
pub struct PushStats {
    /// `NotifySubscriberRequest`s received.
    pub pushes: AtomicU64,
    /// Their body bytes.
    pub bytes: AtomicU64,
    /// Pushes that showed no change newer than the subscriber already had.
    pub stale: AtomicU64,
    /// Pushes without a readable `requestId` (answered with an empty one).
    pub no_request_id: AtomicU64,
    /// Pushes whose instance count was not the service's.
    pub partial: AtomicU64,
    /// `NotifySubscriberResponse`s that could not be queued.
    pub ack_failures: AtomicU64,
    /// `ClientDetectionRequest`s answered.
    pub detections: AtomicU64,
    /// Other server requests on the stream (type names of the first few kept).
    pub other: AtomicU64,
    pub other_kinds: std::sync::Mutex<Vec<String>>,
    /// Subscribe attempts refused and retried (e.g. the connection not yet registered).
    pub subscribe_retries: AtomicU64,
}

impl PushStats {
    /// One line for the report.
    pub fn summary(&self, instances: u64) -> String {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let kinds = self
            .other_kinds
            .lock()
            .map(|k| k.join(", "))
            .unwrap_or_default();
        format!(
            "NotifySubscriberRequest pushes received: {} ({:.1} MB); pushes with no newer change: {}; pushes without {instances} instances: {}; without a readable requestId: {}; acks not queued: {}; ClientDetectionRequests answered: {}; other server requests: {}{}; subscribe retries: {}",
            l(&self.pushes),
            l(&self.bytes) as f64 / 1e6,
            l(&self.stale),
            l(&self.partial),
            l(&self.no_request_id),
            l(&self.ack_failures),
            l(&self.detections),
            l(&self.other),
            if kinds.is_empty() { String::new() } else { format!(" ({kinds})") },
            l(&self.subscribe_retries),
        )
    }
}

/// Where and what a subscriber subscribes to.
#[derive(Clone)]
pub struct Subscription {
    /// `http://127.0.0.1:PORT` of the gRPC port.
    pub url: String,
    pub namespace: String,
    pub group: String,
    pub service: String,
    /// Instances the service has; a snapshot with another count is reported.
    pub instances: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscribeResponse {
    #[serde(default)]
    service_info: Option<ServiceInfo>,
}

#[derive(Deserialize)]
struct ServiceInfo {
    #[serde(default)]
    hosts: Option<Vec<Value>>,
}

/// The highest [`SEQ_KEY`] of the instances of a parsed `serviceInfo`.
fn max_seq_of(hosts: &[Value]) -> Option<u64> {
    hosts
        .iter()
        .filter_map(|h| h.get("metadata")?.get(SEQ_KEY))
        .filter_map(|v| match v {
            Value::String(s) => s.parse().ok(),
            other => other.as_u64(),
        })
        .max()
}

/// Subscribes with retries: a server may refuse a request on a connection it has not yet
/// registered (Nacos answers such requests with error 301 until the bi-stream's set-up is
/// processed); other refusals fail at once.
async fn subscribe(
    conn: &mut RequestClient<Channel>,
    s: &Subscription,
    stats: &PushStats,
    deadline: Instant,
) -> anyhow::Result<Value> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let body = json!({
            "headers": {},
            "requestId": attempt.to_string(),
            "module": "naming",
            "namespace": s.namespace,
            "serviceName": s.service,
            "groupName": s.group,
            "subscribe": true,
            "clusters": "",
        });
        match call(
            conn,
            "SubscribeServiceRequest",
            &body,
            "SubscribeServiceResponse",
        )
        .await
        {
            Ok(v) => return Ok(v),
            Err(e) => {
                let text = format!("{e:#}");
                let retry = text.contains("\"errorCode\":301") || text.contains("unregister");
                if !retry || Instant::now() > deadline || attempt >= 100 {
                    return Err(e);
                }
                stats.subscribe_retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One subscriber: connects, sets up, subscribes, and records every push until `stop`. The
/// sequence numbers of changes a push covers (those above the highest it had) are recorded as
/// events arriving with it, so [`crate::push::finish`] accounts for every (subscriber, change).
#[allow(clippy::too_many_arguments)]
pub async fn subscriber(
    n: usize,
    s: Subscription,
    ready_deadline: Instant,
    connect_slots: Arc<Semaphore>,
    live: Arc<Live>,
    stats: Arc<PushStats>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen::default();
    let result: anyhow::Result<()> = async {
        let permit = connect_slots.acquire().await?;
        let t0 = Instant::now();
        let Connection {
            channel,
            mut request,
        } = connect(&s.url).await?;
        let (mut tx, rx) = mpsc::channel::<pb::Payload>(256);
        tx.try_send(payload(
            "ConnectionSetupRequest",
            &json!({
                "headers": {},
                "requestId": "",
                "module": "internal",
                "clientVersion": CLIENT_VERSION,
                "tenant": s.namespace,
                "labels": {"source": "sdk", "module": "naming"},
                "abilityTable": {},
            }),
        ))
        .context("queueing ConnectionSetupRequest")?;
        let mut bi = BiRequestStreamClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut inbound = tokio::time::timeout(Duration::from_secs(30), bi.request_bi_stream(rx))
            .await
            .context("requestBiStream: no answer within 30 s")?
            .context("requestBiStream")?
            .into_inner();
        let sub = subscribe(&mut request, &s, &stats, ready_deadline);
        tokio::pin!(sub);
        let mut subscribed = false;
        let mut permit = Some(permit);
        let mut have = 0u64;
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                r = &mut sub, if !subscribed => {
                    subscribed = true;
                    let v = r?;
                    let info: SubscribeResponse =
                        serde_json::from_value(v).context("SubscribeServiceResponse JSON")?;
                    let hosts = info.service_info.and_then(|i| i.hosts).unwrap_or_default();
                    let seq = max_seq_of(&hosts).unwrap_or(0);
                    live.snapshot_arrived(&mut seen, t0, seq, hosts.len());
                    // Changes the snapshot already shows were delivered by it.
                    let now = Instant::now();
                    for k in have + 1..=seq {
                        seen.events.push((k, now));
                    }
                    have = have.max(seq);
                    live.max_rev[n].fetch_max(have, Ordering::Relaxed);
                    permit.take();
                }
                m = inbound.message() => {
                    let Some(p) = m.context("reading the bi-stream")? else {
                        anyhow::bail!("the server ended the bi-stream");
                    };
                    let now = Instant::now();
                    let kind = p.metadata.as_ref().map(|m| m.r#type.as_str()).unwrap_or("");
                    let body = p.body.as_ref().map(|b| b.value.as_slice()).unwrap_or(&[]);
                    match kind {
                        "NotifySubscriberRequest" => {
                            stats.pushes.fetch_add(1, Ordering::Relaxed);
                            stats.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                            let scan = scan_push(body);
                            if scan.hosts as u64 != s.instances {
                                stats.partial.fetch_add(1, Ordering::Relaxed);
                            }
                            match scan.max_seq {
                                Some(m) if m > have => {
                                    for k in have + 1..=m {
                                        seen.events.push((k, now));
                                    }
                                    have = m;
                                    live.max_rev[n].fetch_max(have, Ordering::Relaxed);
                                }
                                _ => {
                                    stats.stale.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            let id = scan.request_id.unwrap_or_else(|| {
                                stats.no_request_id.fetch_add(1, Ordering::Relaxed);
                                String::new()
                            });
                            let ack = payload(
                                "NotifySubscriberResponse",
                                &json!({"requestId": id, "resultCode": 200, "errorCode": 0, "message": ""}),
                            );
                            if tx.try_send(ack).is_err() {
                                stats.ack_failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        "ClientDetectionRequest" | "SetupAckRequest" => {
                            let id = serde_json::from_slice::<Value>(body)
                                .ok()
                                .and_then(|v| v.get("requestId").and_then(Value::as_str).map(str::to_string))
                                .unwrap_or_default();
                            let answer = if kind == "ClientDetectionRequest" {
                                stats.detections.fetch_add(1, Ordering::Relaxed);
                                "ClientDetectionResponse"
                            } else {
                                "SetupAckResponse"
                            };
                            let _ = tx.try_send(payload(
                                answer,
                                &json!({"requestId": id, "resultCode": 200, "errorCode": 0, "message": ""}),
                            ));
                        }
                        "ConnectResetRequest" => {
                            anyhow::bail!("the server asked to reset the connection (ConnectResetRequest)");
                        }
                        other => {
                            stats.other.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut k) = stats.other_kinds.lock() {
                                if k.len() < 5 && !k.iter().any(|x| x == other) {
                                    k.push(other.to_string());
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    .await;
    live.subscriber_ended(n, &mut seen, result);
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_a_push_body_like_sextant_and_rnacos_send_it() {
        let body = br#"{"requestId":"42","module":"naming","headers":{},"namespace":"public","serviceName":"s","groupName":"DEFAULT_GROUP","serviceInfo":{"name":"s","groupName":"DEFAULT_GROUP","hosts":[{"ip":"10.0.0.1","port":8080,"metadata":{"benchSeq":"7","team":"bench"}},{"ip":"10.0.0.2","port":8080,"metadata":{"benchSeq":"12"}},{"ip":"10.0.0.3","port":8080,"metadata":{}}]}}"#;
        assert_eq!(
            scan_push(body),
            PushScan {
                request_id: Some("42".into()),
                max_seq: Some(12),
                hosts: 3
            }
        );
        // Spaces, the requestId last, numbers instead of strings.
        let body = br#"{ "serviceInfo" : { "hosts" : [ { "ip" : "a", "metadata" : { "benchSeq" : 3 } } ] } , "requestId" : 9 }"#;
        assert_eq!(
            scan_push(body),
            PushScan {
                request_id: Some("9".into()),
                max_seq: Some(3),
                hosts: 1
            }
        );
    }

    #[test]
    fn a_value_equal_to_a_key_name_is_not_a_key() {
        let body = br#"{"requestId":"a\"b","x":"ip","hosts":[]}"#;
        let s = scan_push(body);
        assert_eq!(s.request_id.as_deref(), Some("a\"b"));
        assert_eq!(s.hosts, 0);
        assert_eq!(s.max_seq, None);
    }

    #[test]
    fn garbage_scans_to_nothing() {
        assert_eq!(scan_push(b"\xff\xfe"), PushScan::default());
        assert_eq!(scan_push(b"{\"requestId\":"), PushScan::default());
        assert_eq!(scan_push(b"\"ip\""), PushScan::default());
    }

    #[test]
    fn counts_the_hosts_of_an_instance_list() {
        let body = br#"{"name":"DEFAULT_GROUP@@s","hosts":[{"ip":"10.0.0.1","port":8080},{"ip":"10.0.0.2","port":8080}],"clusters":""}"#;
        assert_eq!(count_hosts(body), Some(2));
        assert_eq!(count_hosts(br#"{"hosts":[]}"#), Some(0));
        assert_eq!(count_hosts(b"service not found"), None);
        assert_eq!(count_hosts(br#"{"error":"x"}"#), None);
    }

    #[test]
    fn max_seq_of_parsed_hosts() {
        let hosts: Vec<Value> = serde_json::from_str(
            r#"[{"metadata":{"benchSeq":"4"}},{"metadata":{"benchSeq":"10"}},{"metadata":null},{}]"#,
        )
        .unwrap_or_default();
        assert_eq!(max_seq_of(&hosts), Some(10));
        assert_eq!(max_seq_of(&[]), None);
    }
}
