//! [`Client`] and its [`ClientBuilder`]: the public entry point, wiring the transport, the
//! discovery cache and its watch stream, the registrations and their keepalive, and the cache
//! file writer; plus [`Updates`], the stream of service changes.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use sextant_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};

use crate::cache::{Cache, Fresh};
use crate::convert::{register_request, service_from, service_ref};
use crate::error::Error;
use crate::file;
use crate::keepalive::{Keepalive, Registrations};
use crate::stats::{Counters, Stats};
use crate::transport::{Backoff, Transport};
use crate::types::{InstanceKey, Registration, Service, ServiceName, ServiceUpdate};
use crate::watch::Watcher;

/// Deregistrations in flight at once during [`Client::shutdown`].
const SHUTDOWN_CONCURRENCY: usize = 16;

/// A service read directly but not yet taken over by the watch stream (which happens within
/// milliseconds when the stream is up) is read again by `get` after this long.
const REFETCH_AFTER: Duration = Duration::from_secs(5);

/// Configures and builds a [`Client`]. Start with [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    servers: Vec<String>,
    call_timeout: Duration,
    connect_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    heartbeat_interval: Option<Duration>,
    cache_file: Option<PathBuf>,
    cache_write_interval: Duration,
    update_capacity: usize,
    tls_ca: Option<TlsSource>,
    tls_identity: Option<(TlsSource, TlsSource)>,
    token: Option<Secret>,
}

/// A token's secret: never shown by `Debug`.
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// PEM given inline or as a file read at [`ClientBuilder::build`].
#[derive(Debug, Clone)]
enum TlsSource {
    Pem(Vec<u8>),
    File(PathBuf),
}

impl TlsSource {
    fn read(&self, field: &'static str) -> Result<Vec<u8>, Error> {
        match self {
            TlsSource::Pem(p) => Ok(p.clone()),
            TlsSource::File(path) => std::fs::read(path).map_err(|e| Error::InvalidArgument {
                field,
                reason: format!("cannot read {}: {e}", path.display()),
            }),
        }
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            call_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            heartbeat_interval: None,
            cache_file: None,
            cache_write_interval: Duration::from_secs(1),
            update_capacity: 1024,
            tls_ca: None,
            tls_identity: None,
            token: std::env::var("SEXTANT_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .map(Secret),
        }
    }
}

impl ClientBuilder {
    /// The gRPC addresses of the servers, e.g. `["http://10.0.0.1:8471", "http://10.0.0.2:8471"]`.
    /// The client uses one at a time, in this order, and moves to the next when the current one
    /// cannot be reached.
    pub fn servers<I, S>(mut self, servers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.servers = servers.into_iter().map(Into::into).collect();
        self
    }

    /// The secret of the token to send (`authorization: Bearer`) on every call, for a server
    /// with auth on; default: the `SEXTANT_TOKEN` variable, if set.
    pub fn token(mut self, secret: impl Into<String>) -> Self {
        self.token = Some(Secret(secret.into()));
        self
    }

    /// Bound of every call to one server (default 5 s); a call that fails over may try each
    /// server once.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Bound of establishing a connection to one server (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Range of the jittered exponential backoff between reconnect attempts of the background
    /// tasks (default 100 ms to 5 s).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max;
        self
    }

    /// Heartbeat interval (default: a third of the shortest TTL of the client's ephemeral
    /// instances).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = Some(interval);
        self
    }

    /// Keeps the discovery cache in this JSON file (written atomically, at most once per
    /// [`cache_write_interval`](Self::cache_write_interval)) and, when no server can be reached,
    /// answers [`Client::get`] from what it held last.
    pub fn cache_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.cache_file = Some(path.into());
        self
    }

    /// Shortest time between two writes of the cache file (default 1 s).
    pub fn cache_write_interval(mut self, interval: Duration) -> Self {
        self.cache_write_interval = interval;
        self
    }

    /// How many updates a [`Updates`] subscriber may fall behind before it misses some
    /// (default 1024).
    pub fn update_capacity(mut self, capacity: usize) -> Self {
        self.update_capacity = capacity;
        self
    }

    /// Trusts this CA certificate (PEM) for `https://` servers instead of the system's roots.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(TlsSource::Pem(pem.into()));
        self
    }

    /// [`tls_ca_pem`](Self::tls_ca_pem) from a file, read by [`build`](Self::build).
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(TlsSource::File(path.into()));
        self
    }

    /// The client certificate and key (PEM files, read by [`build`](Self::build)) presented to
    /// `https://` servers that require one (mTLS).
    pub fn tls_identity_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls_identity = Some((TlsSource::File(cert.into()), TlsSource::File(key.into())));
        self
    }

    /// The TLS settings of `https://` servers: the CA given, else the system's roots.
    fn tls_config(&self) -> Result<tonic::transport::ClientTlsConfig, Error> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut tls = ClientTlsConfig::new();
        tls = match &self.tls_ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca.read("tls_ca")?)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.tls_identity {
            tls = tls.identity(Identity::from_pem(
                cert.read("tls_identity")?,
                key.read("tls_identity")?,
            ));
        }
        Ok(tls)
    }

    /// Builds the client and starts its background tasks. Needs a Tokio runtime. Does not
    /// connect: a client starts even when no server is reachable (then `get` answers from the
    /// cache file, if any, and the background tasks keep trying).
    pub fn build(self) -> Result<Client, Error> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let stats = Arc::new(Counters::default());
        let transport = Arc::new(
            Transport::new(
                &self.servers,
                &self.tls_config()?,
                self.connect_timeout,
                self.call_timeout,
                stats.clone(),
            )?
            .with_token(self.token.as_ref().map(|s| s.0.as_str()))?,
        );
        let cache = Arc::new(Cache::new(self.update_capacity, stats.clone()));
        if let Some(path) = &self.cache_file {
            match file::load(path) {
                Ok(services) => {
                    tracing::debug!(path = %path.display(), services = services.len(), "loaded the cache file");
                    cache.load_file(services);
                }
                Err(e) => tracing::warn!(error = %e, "ignoring the cache file"),
            }
        }
        let regs = Arc::new(Registrations::new());
        let (closed, closed_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        tasks.push(
            rt.spawn(
                Watcher {
                    cache: cache.clone(),
                    transport: transport.clone(),
                    stats: stats.clone(),
                    backoff: Backoff::new(self.backoff_min, self.backoff_max),
                    closed: closed_rx.clone(),
                }
                .run(),
            ),
        );
        tasks.push(
            rt.spawn(
                Keepalive {
                    regs: regs.clone(),
                    transport: transport.clone(),
                    stats: stats.clone(),
                    interval: self.heartbeat_interval,
                    backoff: Backoff::new(self.backoff_min, self.backoff_max),
                    closed: closed_rx.clone(),
                }
                .run(),
            ),
        );
        if let Some(path) = &self.cache_file {
            tasks.push(
                rt.spawn(
                    file::Writer {
                        path: path.clone(),
                        interval: self.cache_write_interval,
                        cache: cache.clone(),
                        stats: stats.clone(),
                        closed: closed_rx,
                    }
                    .run(),
                ),
            );
        }
        Ok(Client {
            inner: Arc::new(Inner {
                transport,
                cache,
                regs,
                stats,
                closed,
                closing: AtomicBool::new(false),
                tasks: Mutex::new(tasks),
            }),
        })
    }
}

struct Inner {
    transport: Arc<Transport>,
    cache: Arc<Cache>,
    regs: Arc<Registrations>,
    stats: Arc<Counters>,
    closed: watch::Sender<bool>,
    closing: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The background tasks stop (the cache file gets a last write); ephemeral instances
        // are left to expire: only `shutdown` deregisters.
        let _ = self.closed.send(true);
    }
}

/// A Sextant client: registers this process's instances and keeps them alive, and discovers
/// services from a local cache kept current by one watch stream. Cheap to clone; all clones
/// share one connection, one cache and one set of background tasks, which stop when the last
/// clone is dropped (prefer [`Client::shutdown`], which also deregisters).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A builder with the defaults; give it at least [`ClientBuilder::servers`].
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.inner.closing.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Registers (or replaces) one instance and returns its key. An ephemeral instance
    /// ([`Registration::ttl`]) is then kept alive in the background, and registered again if
    /// a server reports it unknown. If no server is reachable the error is
    /// [`Error::Unavailable`] and nothing is kept: call again later.
    pub async fn register(&self, registration: Registration) -> Result<InstanceKey, Error> {
        self.check_open()?;
        registration.validate()?;
        let key = registration.key();
        let req = register_request(&registration);
        let _order = self.inner.regs.order.read().await;
        let t = &self.inner.transport;
        t.call("Register", |mut c| {
            let r = t.request(req.clone());
            async move { c.register(r).await }
        })
        .await?;
        self.inner.regs.insert(key.clone(), req);
        Ok(key)
    }

    /// Registers many instances in one call and one durable commit (`BatchRegister`).
    pub async fn register_many(
        &self,
        registrations: impl IntoIterator<Item = Registration>,
    ) -> Result<Vec<InstanceKey>, Error> {
        self.check_open()?;
        let mut keys = Vec::new();
        let mut reqs = Vec::new();
        for r in registrations {
            r.validate()?;
            keys.push(r.key());
            reqs.push(register_request(&r));
        }
        if reqs.is_empty() {
            return Ok(keys);
        }
        let batch = pb::BatchRegisterRequest {
            instances: reqs.clone(),
        };
        let _order = self.inner.regs.order.read().await;
        let t = &self.inner.transport;
        t.call("BatchRegister", |mut c| {
            let r = t.request(batch.clone());
            async move { c.batch_register(r).await }
        })
        .await?;
        for (k, r) in keys.iter().zip(reqs) {
            self.inner.regs.insert(k.clone(), r);
        }
        Ok(keys)
    }

    /// Deregisters an instance and stops keeping it alive. Succeeds if the server no longer
    /// has it.
    pub async fn deregister(&self, key: &InstanceKey) -> Result<(), Error> {
        let _order = self.inner.regs.order.read().await;
        self.inner.regs.remove(key);
        deregister(&self.inner.transport, key).await
    }

    /// The instances this client registered and keeps.
    pub fn registered(&self) -> Vec<InstanceKey> {
        let mut v: Vec<_> = self.inner.regs.entries.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// The current state of `service`. Answered from the local cache, which one watch stream
    /// keeps current; the first call for a service reads it directly and adds it to the
    /// stream. When no server is reachable, answers from the cache file (see
    /// [`ClientBuilder::cache_file`]) if it has the service; [`Service::source`] tells.
    pub async fn get(&self, service: &ServiceName) -> Result<Arc<Service>, Error> {
        let inner = &self.inner;
        let closing = inner.closing.load(Ordering::Acquire);
        if !closing {
            inner.cache.want(service);
        }
        let cached = inner.cache.lookup(service);
        match &cached {
            // Kept current by the stream, or read moments ago (the stream takes it over in
            // milliseconds when it is healthy).
            Some((s, Fresh::Live { .. })) => return Ok(s.clone()),
            Some((s, Fresh::Fetched { at, .. })) if at.elapsed() < REFETCH_AFTER => {
                return Ok(s.clone())
            }
            // From the cache file, stale, or read long ago while the stream is down: read
            // again, unless no server was reachable a moment ago.
            Some((s, _)) if closing || inner.transport.recently_unreachable() => {
                return Ok(s.clone())
            }
            _ => {}
        }
        if closing {
            return Err(Error::Closed);
        }
        match self.fetch(service).await {
            Ok(s) => Ok(s),
            Err(e) if e.is_retryable() => match cached {
                Some((s, _)) => {
                    tracing::debug!(service = %service, error = %e, "no server reachable; answering from the cache file");
                    Ok(s)
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// What the cache holds for `service`, without any network call (and without adding it to
    /// the watch stream).
    pub fn cached(&self, service: &ServiceName) -> Option<Arc<Service>> {
        self.inner.cache.lookup(service).map(|(s, _)| s)
    }

    async fn fetch(&self, service: &ServiceName) -> Result<Arc<Service>, Error> {
        let req = pb::DiscoverRequest {
            services: vec![service_ref(service)],
            healthy_only: false,
        };
        let t = &self.inner.transport;
        let (index, resp) = t
            .call_indexed("Discover", |mut c| {
                let r = t.request(req.clone());
                async move { c.discover(r).await }
            })
            .await?;
        let svc = resp
            .services
            .into_iter()
            .next()
            .ok_or_else(|| Error::Protocol("Discover answered no service".into()))?;
        let svc = service_from(svc)?;
        if svc.name != *service {
            return Err(Error::Protocol(format!(
                "asked for {service}, got {}",
                svc.name
            )));
        }
        Counters::inc(&self.inner.stats.services_fetched);
        Ok(self.inner.cache.insert_fetched(svc, index, resp.revision))
    }

    /// A stream of every change to the services this client watches (those it called
    /// [`get`](Self::get) for). Bounded: a subscriber that falls more than
    /// [`ClientBuilder::update_capacity`] updates behind skips ahead (each update carries the
    /// service's whole state, so the next one it sees is complete).
    pub fn subscribe(&self) -> Updates {
        Updates {
            inner: BroadcastStream::new(self.inner.cache.subscribe()),
            missed: 0,
        }
    }

    /// The client's counters.
    pub fn stats(&self) -> Stats {
        self.inner.stats.snapshot()
    }

    /// Deregisters every instance this client registered, stops the background tasks and
    /// writes the cache file a last time. Later registrations fail with [`Error::Closed`];
    /// `get` still answers from the cache. Returns the first deregistration error, if any
    /// (each instance is still attempted).
    pub async fn shutdown(&self) -> Result<(), Error> {
        let inner = &self.inner;
        if inner.closing.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let keys: Vec<InstanceKey> = {
            // No re-registration is in flight once we hold this, and none starts after the
            // entries are gone.
            let _exclusive = inner.regs.order.write().await;
            let mut entries = inner.regs.entries.lock();
            entries.drain().map(|(k, _)| k).collect()
        };
        let _ = inner.closed.send(true);
        let mut first_error = None;
        let mut set = tokio::task::JoinSet::new();
        let mut pending = keys.into_iter();
        loop {
            while set.len() < SHUTDOWN_CONCURRENCY {
                let Some(key) = pending.next() else { break };
                let t = inner.transport.clone();
                set.spawn(async move { deregister(&t, &key).await.map_err(|e| (key, e)) });
            }
            let Some(done) = set.join_next().await else {
                break;
            };
            match done {
                Ok(Ok(())) => {}
                Ok(Err((key, e))) => {
                    tracing::warn!(instance = %key, error = %e, "could not deregister on shutdown");
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(Error::Protocol(format!("deregister task: {e}")));
                }
            }
        }
        let tasks: Vec<_> = std::mem::take(&mut *inner.tasks.lock());
        for task in tasks {
            let _ = tokio::time::timeout(inner.transport.call_timeout, task).await;
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

async fn deregister(t: &Transport, key: &InstanceKey) -> Result<(), Error> {
    let req = pb::DeregisterRequest {
        service: Some(service_ref(&key.service)),
        id: key.id.clone(),
    };
    match t
        .call("Deregister", |mut c| {
            let r = t.request(req.clone());
            async move { c.deregister(r).await }
        })
        .await
    {
        Ok(_) => Ok(()),
        // Already gone (expired, deregistered by an operator, or a retried call that had
        // succeeded): the goal is reached.
        Err(Error::Rejected {
            code: tonic::Code::NotFound,
            ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Changes to the services a [`Client`] watches, from [`Client::subscribe`]. Use
/// [`Updates::recv`], or it as a [`Stream`].
pub struct Updates {
    inner: BroadcastStream<ServiceUpdate>,
    missed: u64,
}

impl std::fmt::Debug for Updates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updates")
            .field("missed", &self.missed)
            .finish_non_exhaustive()
    }
}

impl Updates {
    /// The next update; `None` once the client is gone.
    pub async fn recv(&mut self) -> Option<ServiceUpdate> {
        self.next().await
    }

    /// How many updates this subscriber missed by falling behind.
    pub fn missed(&self) -> u64 {
        self.missed
    }
}

impl Stream for Updates {
    type Item = ServiceUpdate;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ServiceUpdate>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(u))) => return Poll::Ready(Some(u)),
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(n)))) => {
                    tracing::debug!(missed = n, "update subscriber fell behind");
                    this.missed += n;
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_send<T: Send>(_: &T) {}

    /// Compiles only if the client's futures can be spawned on a multi-threaded runtime.
    #[allow(dead_code)]
    fn futures_are_send(c: &Client, n: &ServiceName, r: Registration, k: &InstanceKey) {
        is_send(&c.get(n));
        is_send(&c.register(r));
        is_send(&c.deregister(k));
        is_send(&c.shutdown());
        is_send(&c.subscribe());
    }

    #[test]
    fn client_is_shareable() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Client>();
    }

    #[test]
    fn build_needs_a_runtime_and_servers() {
        let r = Client::builder().servers(["http://127.0.0.1:1"]).build();
        assert!(matches!(r, Err(Error::NoRuntime)), "{r:?}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(matches!(Client::builder().build(), Err(Error::NoServers)));
        });
    }

    #[tokio::test]
    async fn get_without_any_server_fails_fast_and_typed() {
        let c = Client::builder()
            .servers(["http://127.0.0.1:1"])
            .connect_timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        let n = ServiceName::new("p", "s").unwrap();
        let e = c.get(&n).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        c.shutdown().await.unwrap();
        assert!(matches!(c.get(&n).await, Err(Error::Closed)));
    }
}
