//! The bootstrap file proxyless gRPC clients read (`GRPC_XDS_BOOTSTRAP`, gRFC A27): where the
//! management server is, how to reach it, and who and where the client is (its locality
//! decides which endpoints it prefers).

use serde_json::{json, Value};

/// Who and where a client is.
#[derive(Debug, Clone, Default)]
pub struct BootstrapNode {
    pub id: String,
    /// Reported as `node.cluster` (gRPC requires nothing of it; shown by `/v1/xds/clients`).
    pub cluster: String,
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

/// TLS to the xDS server (gRFC A65 `tls` channel credentials): PEM files the client reads.
#[derive(Debug, Clone, Default)]
pub struct BootstrapTls {
    /// CA to verify the server with; `None`: the system's roots.
    pub ca_certificate_file: Option<String>,
    /// Client certificate and key, for a server that requires one (mTLS).
    pub identity: Option<(String, String)>,
}

/// The bootstrap JSON for a client of the xDS server at `server_uri` (`host:port`, no
/// scheme): `tls` channel credentials when `tls` is given (the server's `https://`), else
/// insecure ones, and `ignore_resource_deletion`, so a service that loses all its instances
/// for a moment does not tear the client's channel down (gRFC A53).
pub fn render(server_uri: &str, node: &BootstrapNode, tls: Option<&BootstrapTls>) -> Value {
    let mut locality = serde_json::Map::new();
    for (k, v) in [
        ("region", &node.region),
        ("zone", &node.zone),
        ("sub_zone", &node.sub_zone),
    ] {
        if !v.is_empty() {
            locality.insert(k.into(), Value::String(v.clone()));
        }
    }
    let creds = match tls {
        None => json!({"type": "insecure"}),
        Some(t) => {
            let mut config = serde_json::Map::new();
            if let Some(ca) = &t.ca_certificate_file {
                config.insert("ca_certificate_file".into(), json!(ca));
            }
            if let Some((cert, key)) = &t.identity {
                config.insert("certificate_file".into(), json!(cert));
                config.insert("private_key_file".into(), json!(key));
            }
            json!({"type": "tls", "config": config})
        }
    };
    json!({
        "xds_servers": [{
            "server_uri": server_uri,
            "channel_creds": [creds],
            "server_features": ["ignore_resource_deletion"],
        }],
        "node": {
            "id": node.id,
            "cluster": node.cluster,
            "locality": locality,
        },
    })
}

/// `http://host:port` or `host:port` → `host:port`, as `server_uri` wants it.
pub fn server_uri(addr: &str) -> &str {
    let a = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    a.trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_grpc_requires() {
        let b = render(
            server_uri("http://127.0.0.1:8471/"),
            &BootstrapNode {
                id: "n1".into(),
                zone: "z1".into(),
                ..Default::default()
            },
            None,
        );
        assert_eq!(b["xds_servers"][0]["server_uri"], "127.0.0.1:8471");
        assert_eq!(b["xds_servers"][0]["channel_creds"][0]["type"], "insecure");
        assert_eq!(b["node"]["id"], "n1");
        assert_eq!(b["node"]["locality"], json!({"zone": "z1"}));
        let tls = BootstrapTls {
            ca_certificate_file: Some("/ca.pem".into()),
            identity: None,
        };
        let b = render("h:1", &BootstrapNode::default(), Some(&tls));
        assert_eq!(
            b["xds_servers"][0]["channel_creds"][0],
            json!({"type": "tls", "config": {"ca_certificate_file": "/ca.pem"}})
        );
    }
}
