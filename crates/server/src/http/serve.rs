//! Serving an axum router on a TCP listener with the limits a production HTTP server sets, for
//! both HTTP listeners of a node (the native API and the Nacos 1.x API): the size of a request
//! head and the number of its headers (hyper answers more with 431), no Nagle, the peer address
//! for `ConnectInfo`, a close that lets the client read an early answer, a deadline on reading
//! a request head (slowloris), and graceful shutdown.
//! TLS, when on, comes from [`crate::tls`], which every listener goes through.
//! `axum::serve` does the same but does not expose hyper's limits.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use futures::StreamExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower_service::Service;

use crate::tls::{self, Speaks, Tls};

/// Limits on what a client may send before its request is handed to the router.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest request head (request line and headers), in bytes; at least 8192. HTTP/1 reads
    /// the head into a buffer of at most this size; HTTP/2 bounds the decoded header list.
    pub max_header_bytes: usize,
    /// Most headers in one HTTP/1 request.
    pub max_headers: usize,
    /// How long a client may take to send a whole request head; `None` for no limit. HTTP/1:
    /// hyper's timer runs from the moment it waits for a head — when the connection opens, and
    /// again as soon as an answer is written on a kept-alive connection, so an idle
    /// keep-alive connection is closed after this long too. Any connection (also one that
    /// sends nothing, or an HTTP/2 one) whose first request has not arrived this long after
    /// it was accepted is closed, since hyper-util reads the protocol preface before hyper's
    /// timer starts.
    pub header_read_timeout: Option<Duration>,
}

/// How much unread input, and for how long, is read and thrown away after the server ended a
/// connection early (e.g. a 431 while the client was still sending its headers): closing a
/// socket with unread input makes the kernel send a reset, which can destroy the answer
/// before the client reads it.
const LINGER_BYTES: usize = 1024 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);

/// Serves `app` on `listener` until `stop` completes, then stops accepting and waits for the
/// open connections to finish (the caller bounds that wait). Connections come through
/// [`crate::tls::incoming`], so with `tls` they are TLS (and, with mTLS, every request carries
/// the client's [`crate::tls::PeerIdentity`]). `name` labels log lines and metrics (`http`,
/// `nacos-http`).
pub(crate) async fn serve(
    listener: TcpListener,
    registry: sextant_core::Registry,
    app: Router,
    limits: HttpLimits,
    tls: Option<Tls>,
    stop: impl Future<Output = ()>,
    name: &'static str,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        // hyper's own default is 30 s, but only with a timer; without one it never fires.
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let graceful = GracefulShutdown::new();
    let mut incoming = tls::incoming(listener, registry, tls, Speaks::Http, name, |tcp| {
        LingerOnClose(Some(tcp))
    });
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            a = incoming.next() => match a {
                Some(Ok(a)) => a,
                _ => break,
            },
            _ = &mut stop => break,
        };
        let app = app.clone();
        let started = Arc::new(AtomicBool::new(false));
        let seen = started.clone();
        let info = accepted.info.clone();
        let peer = info.remote;
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            seen.store(true, Ordering::Relaxed);
            let ext = req.extensions_mut();
            ext.insert(ConnectInfo(peer));
            if let Some(id) = &info.peer {
                ext.insert(sextant_core::TlsPeer(id.name.clone()));
                ext.insert(id.clone());
            }
            ext.insert(info.clone());
            app.clone().call(req.map(Body::new))
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(accepted), service)
            .into_owned();
        let conn = graceful.watch(conn);
        let first_request_deadline = limits.header_read_timeout;
        tokio::spawn(async move {
            tokio::pin!(conn);
            // hyper's header timer starts only once hyper-util has read enough of the input to
            // tell HTTP/1 from HTTP/2; a client that sends nothing (or a slow HTTP/2 preface)
            // would be held open for ever without this deadline on the first request.
            if let Some(limit) = first_request_deadline {
                let ended = tokio::select! {
                    r = &mut conn => Some(r),
                    _ = tokio::time::sleep(limit) => None,
                };
                match ended {
                    Some(r) => return log_end(name, peer, r),
                    None if !started.load(Ordering::Relaxed) => {
                        tracing::debug!(listener = name, %peer, "no request head in time; closing");
                        return;
                    }
                    None => {}
                }
            }
            log_end(name, peer, conn.await);
        });
    }
    drop(incoming);
    graceful.shutdown().await;
}

fn log_end<E: std::fmt::Display>(name: &'static str, peer: SocketAddr, r: Result<(), E>) {
    if let Err(e) = r {
        tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
    }
}

/// A connection's socket that, when dropped with unread input waiting, hands itself to a task
/// that sends FIN and reads (bounded) before closing, so the client gets the answer instead of
/// a reset.
struct LingerOnClose(Option<TcpStream>);

impl LingerOnClose {
    fn inner(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        match self.0.as_mut() {
            Some(tcp) => Ok(Pin::new(tcp)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Drop for LingerOnClose {
    fn drop(&mut self) {
        let Some(tcp) = self.0.take() else { return };
        let mut probe = [0u8; 1];
        // Nothing waiting (or the peer already closed): an ordinary close sends no reset.
        if !matches!(tcp.try_read(&mut probe), Ok(n) if n > 0) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(drain_then_close(tcp));
        }
    }
}

async fn drain_then_close(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut buf = vec![0u8; 16 * 1024];
    let mut seen = 0usize;
    while seen < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen += n,
            _ => break,
        }
    }
}

impl AsyncRead for LingerOnClose {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.inner() {
            Ok(tcp) => tcp.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for LingerOnClose {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.inner() {
            Ok(tcp) => tcp.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.inner() {
            Ok(tcp) => tcp.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|t| t.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner() {
            Ok(tcp) => tcp.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner() {
            Ok(tcp) => tcp.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}
