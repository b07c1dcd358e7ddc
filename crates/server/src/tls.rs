//! Accepting connections, with or without TLS, for every TCP listener of a node: [`incoming`]
//! turns a `TcpListener` into a stream of ready connections ([`Accepted`]: the stream and its
//! [`ConnInfo`]) that both the HTTP server (`http/serve.rs`) and the gRPC servers
//! ([`serve_grpc`]) consume. With [`Tls`] on, each connection's handshake runs on a task of its
//! own (bounded by [`HANDSHAKE_TIMEOUT`]) so a slow client never holds up the accept loop;
//! failures are counted by listener and reason. [`Tls`] owns the certificate and key (reloaded
//! on SIGHUP and when the files change, keeping the old pair when the new one is bad, without
//! touching open connections) and the optional client CA (mTLS): the verified client
//! certificate's identity becomes a [`PeerIdentity`] request extension on every listener.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::Stream;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use sextant_core::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate and key files are checked for a change.
const RELOAD_POLL: Duration = Duration::from_secs(2);
/// Accepted connections waiting for the server to pick them up.
const ACCEPTED_QUEUE: usize = 256;

/// The files of a node's TLS set-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf.
    pub key: PathBuf,
    /// PEM CA certificates: when set, every client must present a certificate they signed.
    pub client_ca: Option<PathBuf>,
}

/// Why a TLS set-up could not be loaded; it names the file to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // The cause is in the message (not a `source`), so a reload's log line shows it too.
    #[error("cannot read the TLS {what} {path}: {error}")]
    Read {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("the TLS {what} {path} holds no PEM {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("the TLS {what} {path} is not valid PEM: {message}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("the TLS key {key} cannot serve the certificate {cert}: {message}")]
    Key {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("the TLS client CA {path} cannot verify clients: {message}")]
    ClientCa { path: PathBuf, message: String },
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

/// Who the client is, from the certificate it presented and the client CA verified (mTLS).
/// Every request of such a connection carries it as an extension, on every listener: axum
/// handlers take `Option<Extension<PeerIdentity>>`, tonic ones `request.extensions().get()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerIdentity {
    /// The subject's common name, else the first subject alternative name, else the whole
    /// subject: the name to authorize.
    pub name: String,
    pub common_name: Option<String>,
    /// Subject alternative names in order: DNS names, URIs (SPIFFE IDs), e-mails, IPs.
    pub sans: Vec<String>,
}

/// Whether the first certificate in `pem` may authenticate a TLS client: `Some(false)` when it
/// carries an extended key usage without `clientAuth` (or `anyExtendedKeyUsage`), `None` when
/// it does not parse.
pub fn allows_client_auth(pem: &[u8]) -> Option<bool> {
    let der = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    match cert.extended_key_usage() {
        Ok(Some(eku)) => Some(eku.value.client_auth || eku.value.any),
        Ok(None) => Some(true),
        Err(_) => None,
    }
}

impl PeerIdentity {
    /// The identity in a DER certificate, `None` if it does not parse.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(String::from);
        let sans = match cert.subject_alternative_name() {
            Ok(Some(ext)) => ext
                .value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                        Some((*s).to_string())
                    }
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => <[u8; 4]>::try_from(*b)
                            .ok()
                            .map(|a| IpAddr::from(a).to_string()),
                        16 => <[u8; 16]>::try_from(*b)
                            .ok()
                            .map(|a| IpAddr::from(a).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let name = common_name
            .clone()
            .or_else(|| sans.first().cloned())
            .unwrap_or_else(|| cert.subject().to_string());
        Some(PeerIdentity {
            name,
            common_name,
            sans,
        })
    }
}

/// What is known of a connection: an extension of every request on it (HTTP and gRPC).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub local: Option<SocketAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The verified client certificate's identity (mTLS only).
    pub peer: Option<PeerIdentity>,
}

/// What a listener speaks, for ALPN: HTTP (h2 and HTTP/1.1) or gRPC (h2 only; gRPC clients
/// refuse a server that does not select h2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    Http,
    Grpc,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    outcome: &'static str,
}

/// TLS metrics, registered whether TLS is on or not.
#[derive(Clone)]
pub struct TlsMetrics {
    handshake_failures: Family<HandshakeLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
}

impl TlsMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self {
            handshake_failures: Family::default(),
            reloads: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("sextant_tls");
        r.register(
            "handshake_failures",
            "TLS handshakes that failed, by listener and reason",
            m.handshake_failures.clone(),
        );
        r.register(
            "reloads",
            "Certificate reloads (SIGHUP or file change), by outcome (ok, error: old pair kept)",
            m.reloads.clone(),
        );
        m
    }
}

/// The certificate the handshakes present now; swapped whole by a reload, so a handshake
/// sees either the old pair or the new one, and open connections are untouched.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl Current {
    fn get(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = key;
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// Modification time and length of the certificate, key and client CA files: a change means
/// reload.
type Stamp = [(Option<SystemTime>, u64); 3];

/// A node's TLS: one per node, shared (cheaply cloned) by every listener.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: Arc<Current>,
    /// The acceptors (HTTP, gRPC), rebuilt when the client CA is reloaded.
    acceptors: RwLock<(TlsAcceptor, TlsAcceptor)>,
    metrics: TlsMetrics,
    /// The files' stamp at the last load attempt.
    seen: Mutex<Stamp>,
}

impl Tls {
    /// Loads the certificate, key and client CA; an error names the file at fault.
    pub fn load(files: TlsFiles, metrics: TlsMetrics) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let seen = stamp(&files);
        let current = Arc::new(Current(RwLock::new(load_key(&files, &provider)?)));
        let acceptors = acceptors(&files, &provider, &current)?;
        Ok(Tls {
            inner: Arc::new(Inner {
                files,
                provider,
                current,
                acceptors: RwLock::new(acceptors),
                metrics,
                seen: Mutex::new(seen),
            }),
        })
    }

    /// Whether clients must present a certificate (mTLS).
    pub fn mutual(&self) -> bool {
        self.inner.files.client_ca.is_some()
    }

    /// Loads the certificate and key again, and the client CA (mTLS); new handshakes use
    /// them, open connections keep theirs. Files that do not load are logged and the old
    /// set-up kept whole.
    pub fn reload(&self, why: &'static str) -> Result<(), TlsError> {
        let i = &self.inner;
        *i.seen.lock().unwrap_or_else(|e| e.into_inner()) = stamp(&i.files);
        let r = load_key(&i.files, &i.provider).and_then(|key| {
            // The CA is checked before the key is swapped in: both change, or neither.
            let rebuilt = match i.files.client_ca {
                Some(_) => Some(acceptors(&i.files, &i.provider, &i.current)?),
                None => None,
            };
            Ok((key, rebuilt))
        });
        let outcome = match &r {
            Ok((key, rebuilt)) => {
                i.current.set(key.clone());
                if let Some(a) = rebuilt {
                    *i.acceptors.write().unwrap_or_else(|e| e.into_inner()) = a.clone();
                }
                tracing::info!(cause = why, cert = %i.files.cert.display(), "TLS certificate reloaded");
                "ok"
            }
            Err(e) => {
                tracing::error!(cause = why, error = %e, "TLS certificate not reloaded; keeping the current one");
                "error"
            }
        };
        i.metrics
            .reloads
            .get_or_create(&ReloadLabels { outcome })
            .inc();
        r.map(|_| ())
    }

    /// Reloads on SIGHUP and whenever the files' modification time or size changes (checked
    /// every 2 s), until `stop`.
    pub fn spawn_reloader(&self, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let tls = self.clone();
        // Registered before returning, so a SIGHUP right after start-up reloads rather than
        // kills (the default action).
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let mut hup = match hup {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; TLS files reload on change only");
                None
            }
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let hup_recv = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stop.wait_for(|v| *v) => return,
                    _ = hup_recv => { let _ = tls.reload("SIGHUP"); }
                    _ = tick.tick() => {
                        let now = stamp(&tls.inner.files);
                        let changed = *tls.inner.seen.lock().unwrap_or_else(|e| e.into_inner()) != now;
                        if changed {
                            let _ = tls.reload("file change");
                        }
                    }
                }
            }
        })
    }

    /// The handshake of one accepted connection, bounded by [`HANDSHAKE_TIMEOUT`]; a failure
    /// is counted (by `listener` and reason), logged at debug and yields `None`.
    pub async fn accept<IO>(
        &self,
        io: IO,
        remote: SocketAddr,
        local: Option<SocketAddr>,
        speaks: Speaks,
        listener: &'static str,
    ) -> Option<Accepted<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = {
            let a = self
                .inner
                .acceptors
                .read()
                .unwrap_or_else(|e| e.into_inner());
            match speaks {
                Speaks::Http => a.0.clone(),
                Speaks::Grpc => a.1.clone(),
            }
        };
        let reason = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
            Ok(Ok(stream)) => {
                let peer = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| PeerIdentity::from_der(c.as_ref()));
                return Some(Accepted {
                    permit: None,
                    io: Conn::Tls(Box::new(stream)),
                    info: ConnInfo {
                        remote,
                        local,
                        tls: true,
                        peer,
                    },
                });
            }
            Ok(Err(e)) => {
                tracing::debug!(listener, %remote, error = %e, "TLS handshake failed");
                failure_reason(&e)
            }
            Err(_) => "timeout",
        };
        self.inner
            .metrics
            .handshake_failures
            .get_or_create(&HandshakeLabels { listener, reason })
            .inc();
        None
    }
}

/// A metrics label for a failed handshake.
fn failure_reason(e: &io::Error) -> &'static str {
    use rustls::Error as E;
    match e.get_ref().and_then(|i| i.downcast_ref::<E>()) {
        Some(E::NoCertificatesPresented) => "no_client_cert",
        Some(E::InvalidCertificate(_)) => "bad_client_cert",
        // Usually the client refusing our certificate (unknown CA, wrong name).
        Some(E::AlertReceived(_)) => "alert_received",
        Some(E::NoApplicationProtocol) => "no_alpn",
        Some(E::PeerIncompatible(_)) => "incompatible",
        // Not TLS at all (plain HTTP on a TLS port) or malformed.
        Some(E::InvalidMessage(_) | E::InappropriateMessage { .. }) => "protocol",
        Some(E::InappropriateHandshakeMessage { .. }) => "protocol",
        Some(_) => "other",
        None if e.kind() == io::ErrorKind::UnexpectedEof => "eof",
        None => "io",
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_owned(),
        error,
    })
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The certificate chain and its key, checked to belong together.
fn load_key(files: &TlsFiles, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = certs(&files.cert, "certificate")?;
    let pem = read(&files.key, "key")?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: "key",
            path: files.key.clone(),
        },
        e => TlsError::Pem {
            what: "key",
            path: files.key.clone(),
            message: e.to_string(),
        },
    })?;
    CertifiedKey::from_der(chain, key, provider)
        .map(Arc::new)
        .map_err(|e| TlsError::Key {
            cert: files.cert.clone(),
            key: files.key.clone(),
            message: e.to_string(),
        })
}

fn client_verifier(
    path: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(path, "client CA")? {
        roots.add(c).map_err(|e| TlsError::ClientCa {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::ClientCa {
            path: path.to_owned(),
            message: e.to_string(),
        })
}

fn stamp(files: &TlsFiles) -> Stamp {
    let one = |p: &Path| match std::fs::metadata(p) {
        Ok(m) => (m.modified().ok(), m.len()),
        Err(_) => (None, 0),
    };
    let ca = files.client_ca.as_deref().map_or((None, 0), one);
    [one(&files.cert), one(&files.key), ca]
}

/// The HTTP and gRPC acceptors (they differ in ALPN) presenting `current`, verifying clients
/// against the client CA file when there is one.
fn acceptors(
    files: &TlsFiles,
    provider: &Arc<CryptoProvider>,
    current: &Arc<Current>,
) -> Result<(TlsAcceptor, TlsAcceptor), TlsError> {
    let verifier = match &files.client_ca {
        Some(path) => Some(client_verifier(path, provider)?),
        None => None,
    };
    let config = |alpn: &[&[u8]]| -> Result<TlsAcceptor, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let builder = match &verifier {
            Some(v) => builder.with_client_cert_verifier(v.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut c = builder.with_cert_resolver(current.clone());
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::from(Arc::new(c)))
    };
    Ok((config(&[b"h2", b"http/1.1"])?, config(&[b"h2"])?))
}

/// A connection's byte stream: plain or TLS.
pub enum Conn<IO> {
    Plain(IO),
    Tls(Box<TlsStream<IO>>),
}

/// An accepted (and, with TLS, handshaken) connection and what is known of it.
pub struct Accepted<IO> {
    pub io: Conn<IO>,
    pub info: ConnInfo,
    /// Counts the connection against `max_connections` until it is dropped.
    pub permit: Option<sextant_core::ConnectionPermit>,
}

/// Accepts on `listener` until the returned stream is dropped: sets no-Nagle, wraps each
/// socket with `wrap` (the HTTP server's linger-on-close) and, with `tls`, runs its handshake
/// on a task of its own. Accept errors are logged and retried, never the end of the stream.
/// `name` labels log lines and the handshake failure metric (`http`, `grpc`, `nacos-http`…).
/// A connection over the node's `max_connections` (asked of `registry`) is closed at once,
/// before any TLS handshake; the refusal is counted.
pub fn incoming<IO, W>(
    listener: TcpListener,
    registry: Registry,
    tls: Option<Tls>,
    speaks: Speaks,
    name: &'static str,
    wrap: W,
) -> Incoming<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    W: Fn(TcpStream) -> IO + Send + 'static,
{
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        accept_error(name, e).await;
                        continue;
                    }
                },
                _ = tx.closed() => break,
            };
            let Some(permit) = registry.admit_connection(name) else {
                // Closing at once tells the client now (a reset or EOF) instead of letting it
                // wait; logged at debug, since a flood would otherwise flood the log.
                tracing::debug!(listener = name, %remote, "max_connections reached; closing");
                drop(tcp);
                continue;
            };
            // No Nagle: SSE frames, pushes and answers written in pieces must not wait for
            // delayed ACKs.
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().ok();
            let io = wrap(tcp);
            match &tls {
                None => {
                    let info = ConnInfo {
                        remote,
                        local,
                        tls: false,
                        peer: None,
                    };
                    let a = Accepted {
                        io: Conn::Plain(io),
                        info,
                        permit: Some(permit),
                    };
                    if tx.send(a).await.is_err() {
                        break;
                    }
                }
                Some(tls) => {
                    let (tls, tx) = (tls.clone(), tx.clone());
                    tokio::spawn(async move {
                        if let Some(mut a) = tls.accept(io, remote, local, speaks, name).await {
                            a.permit = Some(permit);
                            let _ = tx.send(a).await;
                        }
                    });
                }
            }
        }
    });
    Incoming { rx, task }
}

/// Accept errors are the listener's, not a reason to stop serving: a peer that reset before
/// it was accepted is skipped, anything else (e.g. out of file descriptors) is logged and
/// retried after a pause so that the loop does not spin.
async fn accept_error(name: &'static str, e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(listener = name, error = %e, "accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The connections of [`incoming`]; dropping it closes the listener.
pub struct Incoming<IO> {
    rx: mpsc::Receiver<Accepted<IO>>,
    task: JoinHandle<()>,
}

impl<IO> Drop for Incoming<IO> {
    fn drop(&mut self) {
        // Stop accepting now, not when the loop next wakes.
        self.task.abort();
    }
}

impl<IO> Stream for Incoming<IO> {
    type Item = io::Result<Accepted<IO>>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|a| a.map(Ok))
    }
}

impl<IO> tonic::transport::server::Connected for Accepted<IO> {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            Conn::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Conn::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Accepted<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Accepted<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// How a gRPC listener is served (keepalive and stream limits differ per protocol).
#[derive(Debug, Clone, Copy)]
pub(crate) struct GrpcOptions {
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Option<Duration>,
    pub max_concurrent_streams: Option<u32>,
}

/// Serves `routes` on `listener` (through [`incoming`], so with `tls` when on) until `stop`;
/// every request carries its connection's [`ConnInfo`], tonic's `TcpConnectInfo` (so
/// `Request::remote_addr` works) and, with mTLS, the [`PeerIdentity`].
pub(crate) async fn serve_grpc(
    routes: tonic::service::Routes,
    listener: TcpListener,
    registry: Registry,
    tls: Option<Tls>,
    options: GrpcOptions,
    mut stop: watch::Receiver<bool>,
    name: &'static str,
) {
    let incoming = incoming(listener, registry, tls, Speaks::Grpc, name, |tcp| tcp);
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(options.keepalive_interval))
        .max_concurrent_streams(options.max_concurrent_streams);
    if let Some(t) = options.keepalive_timeout {
        builder = builder.http2_keepalive_timeout(Some(t));
    }
    let r = builder
        .layer(ConnInfoLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|v| *v).await;
        })
        .await;
    if let Err(e) = r {
        tracing::error!(listener = name, error = %e, "grpc server failed");
    }
}

/// Copies a gRPC connection's [`ConnInfo`] into the extensions handlers read.
#[derive(Debug, Clone, Copy)]
struct ConnInfoLayer;

impl<S> tower_layer::Layer<S> for ConnInfoLayer {
    type Service = WithConnInfo<S>;
    fn layer(&self, inner: S) -> WithConnInfo<S> {
        WithConnInfo(inner)
    }
}

#[derive(Debug, Clone)]
struct WithConnInfo<S>(S);

impl<S, B> tower_service::Service<axum::http::Request<B>> for WithConnInfo<S>
where
    S: tower_service::Service<axum::http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> S::Future {
        if let Some(info) = req.extensions().get::<ConnInfo>().cloned() {
            let ext = req.extensions_mut();
            ext.insert(tonic::transport::server::TcpConnectInfo {
                local_addr: info.local,
                remote_addr: Some(info.remote),
            });
            if let Some(peer) = info.peer {
                ext.insert(sextant_core::TlsPeer(peer.name.clone()));
                ext.insert(peer);
            }
        }
        self.0.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_reasons_name_the_rustls_error() {
        let wrap = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        assert_eq!(
            failure_reason(&wrap(rustls::Error::NoCertificatesPresented)),
            "no_client_cert"
        );
        assert_eq!(
            failure_reason(&wrap(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))),
            "protocol"
        );
        assert_eq!(failure_reason(&io::ErrorKind::UnexpectedEof.into()), "eof");
    }

    /// The gRPC layer hands the connection's address to `Request::remote_addr` and its
    /// identity to handlers.
    #[test]
    fn grpc_requests_carry_the_address_and_identity() {
        use tonic::transport::server::TcpConnectInfo;
        use tower_service::Service;
        type Seen = (Option<SocketAddr>, Option<PeerIdentity>);
        #[derive(Clone)]
        struct Echo;
        impl Service<axum::http::Request<()>> for Echo {
            type Response = Seen;
            type Error = std::convert::Infallible;
            type Future = std::future::Ready<Result<Seen, Self::Error>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, req: axum::http::Request<()>) -> Self::Future {
                let e = req.extensions();
                let addr = e.get::<TcpConnectInfo>().and_then(|i| i.remote_addr());
                std::future::ready(Ok((addr, e.get::<PeerIdentity>().cloned())))
            }
        }
        let peer = PeerIdentity {
            name: "orders".into(),
            common_name: Some("orders".into()),
            sans: vec![],
        };
        let remote: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut req = axum::http::Request::new(());
        req.extensions_mut().insert(ConnInfo {
            remote,
            local: None,
            tls: true,
            peer: Some(peer.clone()),
        });
        let mut svc = tower_layer::Layer::layer(&ConnInfoLayer, Echo);
        let seen = futures::executor::block_on(svc.call(req)).unwrap();
        assert_eq!(seen, (Some(remote), Some(peer)));
    }

    #[test]
    fn garbage_is_no_identity() {
        assert_eq!(PeerIdentity::from_der(b"not a certificate"), None);
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = std::env::temp_dir().join(format!("sextant-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, b"").unwrap();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let files = TlsFiles {
            cert: dir.join("missing.pem"),
            key: empty.clone(),
            client_ca: None,
        };
        let e = load_key(&files, &provider).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        let files = TlsFiles {
            cert: empty.clone(),
            key: empty,
            client_ca: None,
        };
        let e = load_key(&files, &provider).unwrap_err().to_string();
        assert!(e.contains("empty.pem") && e.contains("no PEM"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
