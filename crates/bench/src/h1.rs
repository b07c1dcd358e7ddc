//! A lean HTTP/1.1 keep-alive client for the throughput phases of the Nacos scenarios: one
//! connection per load worker (as C independent clients hold), requests made from a method and
//! a ready path-and-query, answers read whole. It owns nothing else.
//!
//! The tool shares the machine's two cores with the server it measures; a general client
//! (pool checkout, URL parsing, per-request builders) costs the tool more CPU per query than
//! the fastest server spends answering it, which caps what a faster server can show. Here a
//! query costs the tool a connection lock, one request head and the read.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use tokio::sync::Mutex;

/// One keep-alive connection per worker to one server.
pub struct H1 {
    addr: SocketAddr,
    /// For `https://`: the TLS client (trusting the run's CA) and the name to verify.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    host: String,
    conns: Vec<Mutex<Option<SendRequest<Full<Bytes>>>>>,
    timeout: Duration,
    /// `Bearer <SEXTANT_BENCH_TOKEN>`, for a node with auth on.
    authorization: Option<String>,
}

impl H1 {
    /// `base` is `http://IP:PORT` or `https://IP:PORT` (trusting the run's `--tls-ca`);
    /// connections are opened on first use.
    pub fn new(base: &str, workers: usize, timeout: Duration) -> anyhow::Result<Self> {
        let (https, rest) = match base.strip_prefix("https://") {
            Some(rest) => (true, rest),
            None => (
                false,
                base.strip_prefix("http://")
                    .with_context(|| format!("not an http:// URL: {base}"))?,
            ),
        };
        let host = rest.trim_end_matches('/').to_string();
        let addr: SocketAddr = host
            .parse()
            .with_context(|| format!("not IP:PORT: {host}"))?;
        let tls = if https {
            let mut roots = rustls::RootCertStore::empty();
            let pem = crate::load::tls_ca().context("an https:// target needs --tls-ca")?;
            for c in <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(pem) {
                roots.add(c.context("the TLS CA")?)?;
            }
            let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            Some((
                tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
                name,
            ))
        } else {
            None
        };
        Ok(Self {
            addr,
            tls,
            host,
            conns: (0..workers.max(1)).map(|_| Mutex::new(None)).collect(),
            timeout,
            authorization: std::env::var("SEXTANT_BENCH_TOKEN")
                .ok()
                .map(|t| format!("Bearer {t}")),
        })
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let Some((connector, name)) = &self.tls else {
            return connect(self.addr).await;
        };
        let stream = connector
            .connect(name.clone(), tcp(self.addr).await?)
            .await
            .with_context(|| format!("TLS handshake with {}", self.addr))?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// Sends `method path_and_query` on worker `w`'s connection (opened, or reopened after a
    /// failure, as needed); the status and the whole body, bounded by the timeout.
    pub async fn call(
        &self,
        w: usize,
        method: Method,
        path_and_query: &str,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.send(w, method, path_and_query, None).await
    }

    /// As [`H1::call`], with a JSON body when `json` is given.
    pub async fn send(
        &self,
        w: usize,
        method: Method,
        path_and_query: &str,
        json: Option<Bytes>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let slot = &self.conns[w % self.conns.len()];
        let mut guard = slot.lock().await;
        let result = tokio::time::timeout(self.timeout, async {
            let sender = match guard.as_mut() {
                Some(s) if !s.is_closed() => s,
                _ => guard.insert(self.connect().await?),
            };
            sender.ready().await.context("connection not ready")?;
            let mut req = Request::builder()
                .method(method)
                .uri(path_and_query)
                .header(hyper::header::HOST, self.host.as_str());
            if json.is_some() {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            if let Some(a) = &self.authorization {
                req = req.header(hyper::header::AUTHORIZATION, a.as_str());
            }
            let req = req
                .body(Full::new(json.unwrap_or_default()))
                .context("building the request")?;
            let resp = sender.send_request(req).await.context("sending")?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .context("reading the body")?
                .to_bytes();
            anyhow::Ok((status, body))
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {:?}", self.timeout)));
        if result.is_err() {
            // A failed exchange may leave the connection mid-message: start afresh.
            *guard = None;
        }
        result
    }
}

/// One HTTP/1.1 connection to `addr` (TCP_NODELAY), its driver spawned on the runtime.
/// A TCP connection to `addr` (bounded, no Nagle).
async fn tcp(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .with_context(|| format!("connecting to {addr}: timed out"))?
    .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

pub async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp(addr).await?))
            .await?;
    // Runs until the connection closes (or the sender is dropped).
    tokio::spawn(conn);
    Ok(sender)
}

/// Percent-encodes a query parameter value (everything but RFC 3986's unreserved characters).
pub fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `path?k=v&...` with every value encoded.
pub fn path_query(path: &str, params: &[(&str, &str)]) -> String {
    let mut s = String::with_capacity(path.len() + 16 * params.len());
    s.push_str(path);
    for (n, (k, v)) in params.iter().enumerate() {
        s.push(if n == 0 { '?' } else { '&' });
        s.push_str(k);
        s.push('=');
        s.push_str(&encode(v));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode("a-b.c_d~9"), "a-b.c_d~9");
        assert_eq!(encode(r#"{"k":"v 1"}"#), "%7B%22k%22%3A%22v%201%22%7D");
        assert_eq!(encode("DEFAULT_GROUP@@s"), "DEFAULT_GROUP%40%40s");
        assert_eq!(
            path_query("/p", &[("a", "1"), ("b", "x y")]),
            "/p?a=1&b=x%20y"
        );
        assert_eq!(path_query("/p", &[]), "/p");
    }

    #[test]
    fn needs_an_http_ip_port_base() {
        assert!(H1::new("http://127.0.0.1:8848", 2, Duration::from_secs(1)).is_ok());
        assert!(H1::new("https://127.0.0.1:8848", 2, Duration::from_secs(1)).is_err());
        assert!(H1::new("http://localhost:8848", 2, Duration::from_secs(1)).is_err());
    }
}
