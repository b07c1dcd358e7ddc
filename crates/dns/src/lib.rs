//! Sextant's DNS adapter: answers Consul's service names and Sextant's own
//! (`<svc>.<namespace>.sextant`) from the registry, over UDP and TCP (hickory-server). Like
//! every adapter it reads only through the core's `Registry` API; it keeps no state.
//!
//! - `names`: query name → service (or SRV target address), pure.
//! - `answer`: service → records and the answer's kind (records, NODATA, NXDOMAIN), pure.
//! - this module: the listener and the request handler; `metrics`.
//!
//! Authoritative for `consul.` and `sextant.` only: anything else is REFUSED (this is not a
//! recursive resolver; point a forwarding resolver's `consul` zone here). Large UDP answers
//! are truncated (TC) and the client retries over TCP.
#![forbid(unsafe_code)]

pub mod answer;
mod metrics;
pub mod names;

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use parking_lot::Mutex;
use sextant_core::model::XorShift;
use sextant_core::Registry;
use tokio::net::{TcpListener, UdpSocket};

pub use metrics::DnsMetrics;
use metrics::QueryLabels;
use names::{Asked, Parsed, Zone};

/// How a node's DNS adapter answers.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// TTL of every answer, and the negative-caching TTL of the SOA.
    pub ttl_seconds: u32,
    /// The datacenter name in Consul's names (`web.service.<dc>.consul`) and SRV targets.
    pub datacenter: String,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            ttl_seconds: 5,
            datacenter: "dc1".into(),
        }
    }
}

/// An idle TCP connection is closed after this long.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// A running DNS listener (UDP and TCP on the same address).
pub struct DnsServer {
    server: Server<Handler>,
}

impl DnsServer {
    /// Serves `udp` and `tcp` (bound by the caller, so bind errors surface at start-up).
    pub fn start(
        registry: Registry,
        config: DnsConfig,
        metrics: DnsMetrics,
        udp: UdpSocket,
        tcp: TcpListener,
    ) -> Self {
        let handler = Handler {
            registry,
            config,
            metrics,
            rng: Mutex::new(XorShift::from_clock()),
        };
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE, 64);
        Self { server }
    }

    /// Stops listening and waits for in-flight answers.
    pub async fn shutdown(mut self) {
        if let Err(e) = self.server.shutdown_gracefully().await {
            tracing::warn!(error = %e, "dns server did not stop cleanly");
        }
    }
}

struct Handler {
    registry: Registry,
    config: DnsConfig,
    metrics: DnsMetrics,
    rng: Mutex<XorShift>,
}

impl Handler {
    fn lookup(&self, qname: &Name, qtype: RecordType) -> (Option<Zone>, answer::Answer) {
        let labels: Vec<String> = qname
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let ttl = self.config.ttl_seconds;
        match names::parse(&labels, &self.config.datacenter) {
            Parsed::NotServed => (None, answer::Answer::default()),
            Parsed::NoSuchName(zone) => (Some(zone), answer::Answer::nxdomain()),
            Parsed::Found(zone, Asked::Addr(ip)) => {
                (Some(zone), answer::addr(qname, qtype, ip, ttl))
            }
            Parsed::Found(zone, Asked::Service { key, tag }) => {
                // Serving instances (all of them while protection has tripped), as discovery.
                let view = self.registry.get(&key, true);
                let a = answer::service(
                    qname,
                    qtype,
                    &view.instances,
                    tag.as_deref(),
                    ttl,
                    &self.config.datacenter,
                    &mut self.rng.lock(),
                );
                (Some(zone), a)
            }
        }
    }

    fn count(&self, protocol: Protocol, qtype: RecordType, outcome: &'static str) {
        let r#type = match qtype {
            RecordType::A => "A",
            RecordType::AAAA => "AAAA",
            RecordType::SRV => "SRV",
            RecordType::ANY => "ANY",
            RecordType::CNAME => "CNAME",
            RecordType::SOA => "SOA",
            RecordType::TXT => "TXT",
            _ => "other",
        };
        let protocol = if protocol == Protocol::Tcp {
            "tcp"
        } else {
            "udp"
        };
        self.metrics
            .queries
            .get_or_create(&QueryLabels {
                protocol,
                r#type,
                outcome,
            })
            .inc();
    }
}

fn failed(request: &Request, code: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = code;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let not_a_query = request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query;
        let info = match request.request_info() {
            Ok(info) if !not_a_query => info,
            _ => {
                let code = if not_a_query {
                    ResponseCode::NotImp
                } else {
                    ResponseCode::FormErr
                };
                let msg = builder.error_msg(&request.metadata, code);
                return response
                    .send_response(msg)
                    .await
                    .unwrap_or_else(|_| failed(request, code));
            }
        };
        let qname = info.query.original().name().clone();
        let qtype = info.query.query_type();
        let protocol = info.protocol;
        let (zone, a) = self.lookup(&qname, qtype);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let Some(zone) = zone else {
            self.count(protocol, qtype, "refused");
            let msg = builder.error_msg(&request.metadata, ResponseCode::Refused);
            return response
                .send_response(msg)
                .await
                .unwrap_or_else(|_| failed(request, ResponseCode::Refused));
        };
        metadata.authoritative = true;
        let outcome = if a.nxdomain {
            metadata.response_code = ResponseCode::NXDomain;
            "nxdomain"
        } else if a.is_negative() {
            "nodata"
        } else {
            "answer"
        };
        self.count(protocol, qtype, outcome);
        let soa = a
            .is_negative()
            .then(|| answer::soa(zone, self.config.ttl_seconds));
        let msg = builder.build(
            metadata,
            a.answers.iter(),
            std::iter::empty(),
            soa.iter(),
            a.additionals.iter(),
        );
        match response.send_response(msg).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "dns answer not sent");
                failed(request, ResponseCode::ServFail)
            }
        }
    }
}

/// Binds UDP and TCP on `addr`; with port 0, both on the same port the kernel picked for UDP.
/// That port may already be taken for TCP (by a client connection's local port, say): then
/// another one is tried, a few times.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener, SocketAddr)> {
    let attempts = if addr.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(addr).await?;
        let local = udp.local_addr()?;
        match TcpListener::bind(local).await {
            Ok(tcp) => return Ok((udp, tcp, local)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port for DNS")))
}
