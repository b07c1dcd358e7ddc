//! The harness of the Rust Nacos SDK suite (`nacos_rust_sdk.rs`): the Sextant server it
//! drives (start, restart, kill, native API), the SDK's log captured in memory (a push is
//! recognised by the line the SDK's push handler writes), SDK clients with bounded calls, and
//! small builders of instances and listeners. The scenarios are in `nacos_rust_sdk.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use crate::common::{service_path, Api};
use nacos_sdk::api::naming::{
    NamingChangeEvent, NamingEventListener, NamingService, NamingServiceBuilder, ServiceInstance,
};
use nacos_sdk::api::props::ClientProps;
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

pub(crate) const STARTUP: Duration = Duration::from_secs(20);
/// Bound of one SDK call.
pub(crate) const CALL: Duration = Duration::from_secs(20);
/// Bound of waiting for a push.
pub(crate) const PUSH: Duration = Duration::from_secs(10);
/// Bound of an instance disappearing after its client's connection is cut.
pub(crate) const LAPSE: Duration = Duration::from_secs(20);
/// The SDK polls a subscribed service once, about 1 s after subscribing, and then only every
/// 6 × `cacheMillis` (60 s with Sextant's 10 s). Changes made after this settle time and seen
/// within `PUSH` can only have come by push.
pub(crate) const POLL_SETTLE: Duration = Duration::from_millis(1500);
/// How long "nothing is pushed" is watched.
pub(crate) const QUIET: Duration = Duration::from_secs(3);

/// The child-process mode of this test binary (see `sdk_child_process`).
pub(crate) const CHILD_ENV: &str = "SEXTANT_NACOS_SDK_CHILD";

// ---------------------------------------------------------------------------------------------
// The SDK's log, kept in memory: pushes are recognised by the line its push handler writes,
// and failures show the tail.

pub(crate) static SDK_LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub(crate) struct Capture;

pub(crate) struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.push_str(&format!(" {value:?}"));
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push(' ');
            self.0.push_str(value);
        } else {
            self.0.push_str(&format!(" {}={value}", field.name()));
        }
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut f = Fields(format!("{} {}:", meta.level(), meta.target()));
        event.record(&mut f);
        SDK_LOG.lock().unwrap().push(f.0);
    }
}

pub(crate) fn init_sdk_log() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let stderr = std::env::var("NACOS_SDK_TEST_LOG").ok().map(|filter| {
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(tracing_subscriber::EnvFilter::new(filter))
        });
        let _ = tracing_subscriber::registry()
            .with(Capture.with_filter(Targets::new().with_target("nacos_sdk", Level::DEBUG)))
            .with(stderr)
            .try_init();
    });
}

pub(crate) fn sdk_log_mark() -> usize {
    SDK_LOG.lock().unwrap().len()
}

pub(crate) fn sdk_log_tail(n: usize) -> String {
    let log = SDK_LOG.lock().unwrap();
    let from = log.len().saturating_sub(n);
    log[from..].join("\n")
}

/// The pushes (`NotifySubscriberRequest`s as the SDK logged them) of `service` in `group`
/// received since `mark`.
pub(crate) fn pushes_since(mark: usize, service: &str, group: &str) -> Vec<String> {
    let name = format!("name: \"{service}\",");
    let group = format!("group_name: \"{group}\",");
    SDK_LOG.lock().unwrap()[mark..]
        .iter()
        .filter(|l| l.contains("receive NotifySubscriberRequest"))
        .filter(|l| l.contains(&name) && l.contains(&group))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The server.

/// `sextant serve` with the memory store, its Nacos adapter on P and P + 1000, and the SDK-side
/// helpers of these tests. Killed on drop (by the node it holds).
pub(crate) struct Sextant(pub(crate) sextant_testkit::NacosNode);

impl std::ops::Deref for Sextant {
    type Target = sextant_testkit::NacosNode;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Sextant {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Sextant {
    pub(crate) fn start() -> Sextant {
        Sextant::start_on(sextant_testkit::free_nacos_port())
    }

    /// A server whose Nacos adapter listens on `port` (and `port` + 1000).
    pub(crate) fn start_on(port: u16) -> Sextant {
        Sextant(sextant_testkit::spawn_with_nacos(
            env!("CARGO_BIN_EXE_sextant").as_ref(),
            port,
            &[],
            STARTUP,
        ))
    }

    pub(crate) fn api(&self) -> Api {
        Api::new(self.http)
    }

    /// The tails of the SDK's and the server's logs, for failure messages.
    pub(crate) fn diag(&self) -> String {
        let server = self.log_tail(40);
        format!(
            "\n--- nacos-sdk log (tail) ---\n{}\n--- sextant log (tail) ---\n{server}",
            sdk_log_tail(80)
        )
    }

    /// A Nacos naming client of this server in `namespace` ("" is public), caching on disk
    /// under `cache`. Environment variables and `.env` files do not override these settings.
    pub(crate) async fn client(&self, namespace: &str, cache: &Path) -> NamingService {
        let props = ClientProps::new()
            .server_addr(self.nacos_http.to_string())
            .namespace(namespace)
            .app_name("sextant-nacos-rust-sdk-test")
            .cache_dir(cache)
            .env_first(false)
            // Let pushes of an empty or all-unhealthy service through, so that the listener
            // sees the last instance go.
            .naming_push_empty_protection(false);
        self.sdk(
            "build a NamingService",
            NamingServiceBuilder::new(props).build(),
        )
        .await
    }

    /// Runs an SDK call, bounded; panics with both logs on error or time-out.
    pub(crate) async fn sdk<T>(
        &self,
        what: &str,
        f: impl Future<Output = nacos_sdk::api::error::Result<T>>,
    ) -> T {
        match tokio::time::timeout(CALL, f).await {
            Err(_) => panic!("{what}: no answer within {CALL:?}{}", self.diag()),
            Ok(Err(e)) => panic!("{what}: {e:?}{}", self.diag()),
            Ok(Ok(v)) => v,
        }
    }

    /// Subscribes `client` to `svc` (in `group`), waits for the initial state (instances on
    /// `want` ports) and then for the SDK's one poll after subscribing, so that every later
    /// event is a push. Returns the listener (to unsubscribe), its events and the first one.
    pub(crate) async fn subscribe_settled(
        &self,
        what: &str,
        client: &NamingService,
        svc: &str,
        group: Option<String>,
        want: &[i32],
    ) -> (
        Arc<dyn NamingEventListener>,
        mpsc::UnboundedReceiver<Arc<NamingChangeEvent>>,
        Arc<NamingChangeEvent>,
    ) {
        let (listener, mut events) = recorder();
        let subscribed = Instant::now();
        self.sdk(
            what,
            client.subscribe(s(svc), group, vec![], listener.clone()),
        )
        .await;
        let first = self
            .event_where(&mut events, "the initial state", |h| ports(h) == want)
            .await;
        tokio::time::sleep(POLL_SETTLE.saturating_sub(subscribed.elapsed())).await;
        (listener, events, first)
    }

    /// Waits (bounded) for the listener's next event whose instances satisfy `want`, skipping
    /// others.
    pub(crate) async fn event_where(
        &self,
        events: &mut mpsc::UnboundedReceiver<Arc<NamingChangeEvent>>,
        what: &str,
        want: impl Fn(&[ServiceInstance]) -> bool,
    ) -> Arc<NamingChangeEvent> {
        let deadline = tokio::time::Instant::now() + PUSH;
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(ev)) => {
                    let hosts = ev.instances.clone().unwrap_or_default();
                    if want(&hosts) {
                        return ev;
                    }
                    seen.push(ports(&hosts));
                }
                Ok(None) => panic!("{what}: the listener is gone{}", self.diag()),
                Err(_) => panic!(
                    "{what}: no such event within {PUSH:?} (events seen, as ports: {seen:?}){}",
                    self.diag()
                ),
            }
        }
    }

    /// Waits (bounded) for a push of `service`/`group` received since `mark` whose logged form
    /// satisfies `want`.
    pub(crate) async fn push_where(
        &self,
        mark: usize,
        service: &str,
        group: &str,
        what: &str,
        want: impl Fn(&str) -> bool,
    ) {
        let deadline = Instant::now() + PUSH;
        loop {
            if pushes_since(mark, service, group).iter().any(|l| want(l)) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what}: the SDK received no NotifySubscriberRequest for {group}@@{service} \
                     within {PUSH:?}{}",
                    self.diag()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asserts that no push of `service`/`group` arrives for `QUIET`.
    pub(crate) async fn no_push(&self, service: &str, group: &str, what: &str) {
        let mark = sdk_log_mark();
        tokio::time::sleep(QUIET).await;
        let got = pushes_since(mark, service, group);
        assert!(got.is_empty(), "{what}: unexpected pushes {got:#?}");
    }

    /// The instances of a native service (none if it does not exist).
    pub(crate) async fn native(&self, ns: &str, svc: &str) -> Vec<Value> {
        let r = self.api().get(&service_path(ns, svc)).await;
        match r.status {
            200 => r.body["instances"]
                .as_array()
                .unwrap_or_else(|| panic!("no instances in {}", r.text))
                .clone(),
            404 => Vec::new(),
            s => panic!("GET {ns}/{svc}: HTTP {s}: {}{}", r.text, self.diag()),
        }
    }

    /// Waits (bounded by `within`) until the native instances satisfy `want`.
    pub(crate) async fn native_where(
        &self,
        ns: &str,
        svc: &str,
        within: Duration,
        what: &str,
        want: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let now = self.native(ns, svc).await;
            if want(&now) {
                return now;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what}: not so within {within:?}; native instances: {now:#?}{}",
                    self.diag()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

/// An ephemeral instance on 127.0.0.1 (never probed: ephemeral instances get no health check).
pub(crate) fn instance(
    port: i32,
    cluster: &str,
    weight: f64,
    meta: &[(&str, &str)],
) -> ServiceInstance {
    ServiceInstance {
        ip: "127.0.0.1".to_string(),
        port,
        weight,
        cluster_name: Some(cluster.to_string()),
        metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

pub(crate) fn ports(hosts: &[ServiceInstance]) -> Vec<i32> {
    let mut p: Vec<i32> = hosts.iter().map(|h| h.port).collect();
    p.sort_unstable();
    p
}

pub(crate) fn native_ids(instances: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = instances
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

pub(crate) fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(crate) struct Recorder(pub(crate) mpsc::UnboundedSender<Arc<NamingChangeEvent>>);

impl NamingEventListener for Recorder {
    fn event(&self, event: Arc<NamingChangeEvent>) {
        let _ = self.0.send(event);
    }
}

pub(crate) fn recorder() -> (
    Arc<dyn NamingEventListener>,
    mpsc::UnboundedReceiver<Arc<NamingChangeEvent>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Arc::new(Recorder(tx)), rx)
}

pub(crate) fn s(v: &str) -> String {
    v.to_string()
}

/// Kills its child process on drop.
pub(crate) struct ChildGuard(pub(crate) Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
