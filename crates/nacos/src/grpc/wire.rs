//! The JSON shapes of Nacos 2.x gRPC requests and responses, as far as Sextant reads or writes
//! them, and the `Payload` envelopes carrying them (built with
//! [`Payload::envelope`](sextant_proto::nacos::Payload::envelope), the proto crate's one
//! builder). Decoding is lenient where Nacos clients differ (unknown fields are ignored) and
//! turns anything else into a 400-class [`NacosError`].

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};
use sextant_core::model::ServiceKey;
use sextant_proto::nacos::Payload;

use crate::mapping::{self, NacosRegistration, NacosService};
use crate::{encode_json, NacosError, NacosMetrics};

/// Nacos' error code for "no handler for this request type".
pub(crate) const NO_HANDLER: u16 = 302;

/// The fields of the naming requests Sextant reads; everything else is ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct NamingRequest {
    pub(crate) request_id: Option<String>,
    pub(crate) namespace: Option<String>,
    pub(crate) service_name: Option<String>,
    pub(crate) group_name: Option<String>,
    #[serde(rename = "type")]
    pub(crate) kind: Option<String>,
    pub(crate) instance: Option<WireInstance>,
    pub(crate) instances: Option<Vec<WireInstance>>,
    pub(crate) cluster: Option<String>,
    pub(crate) clusters: Option<String>,
    /// Java sends `healthyOnly`, the Python SDK `healthOnly`.
    #[serde(alias = "healthOnly")]
    pub(crate) healthy_only: Option<bool>,
    pub(crate) subscribe: Option<bool>,
    pub(crate) page_no: Option<usize>,
    pub(crate) page_size: Option<usize>,
}

/// What Sextant reads of a `ConnectionSetupRequest`: who the client is, for the logs.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct SetupRequest {
    pub(crate) client_version: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct WireInstance {
    pub(crate) ip: Option<String>,
    pub(crate) port: Option<i64>,
    pub(crate) weight: Option<f64>,
    pub(crate) healthy: Option<bool>,
    pub(crate) enabled: Option<bool>,
    pub(crate) cluster_name: Option<String>,
    pub(crate) metadata: Option<BTreeMap<String, Value>>,
}

impl WireInstance {
    pub(crate) fn registration(&self) -> Result<NacosRegistration, NacosError> {
        let port = self.port.ok_or(NacosError::missing("instance.port"))?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| NacosError::invalid("port", format!("must be 1-65535, got {port}")))?;
        Ok(NacosRegistration {
            ip: self
                .ip
                .clone()
                .filter(|ip| !ip.trim().is_empty())
                .ok_or(NacosError::missing("instance.ip"))?,
            port,
            cluster: mapping::cluster(self.cluster_name.as_deref()).to_string(),
            weight: self.weight.unwrap_or(1.0),
            healthy: self.healthy.unwrap_or(true),
            enabled: self.enabled.unwrap_or(true),
            metadata: self
                .metadata
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, mapping::json_text(v)))
                .collect(),
        })
    }
}

impl NamingRequest {
    pub(crate) fn service(&self) -> Result<(NacosService, ServiceKey), NacosError> {
        let svc = NacosService::parse(
            self.service_name.as_deref().unwrap_or(""),
            self.group_name.as_deref(),
        )?;
        let key = svc.key(mapping::namespace(self.namespace.as_deref()))?;
        Ok((svc, key))
    }
}

/// The response type Nacos pairs with a request type.
pub(crate) fn response_type(request: &str) -> Option<&'static str> {
    Some(match request {
        "ServerCheckRequest" => "ServerCheckResponse",
        "HealthCheckRequest" => "HealthCheckResponse",
        "InstanceRequest" | "PersistentInstanceRequest" => "InstanceResponse",
        "BatchInstanceRequest" => "BatchInstanceResponse",
        "ServiceQueryRequest" => "QueryServiceResponse",
        "ServiceListRequest" => "ServiceListResponse",
        "SubscribeServiceRequest" => "SubscribeServiceResponse",
        _ => return None,
    })
}

/// Decodes the JSON body of a `kind` request. Every naming request shares one shape (its
/// unknown fields are ignored), so the type only words the error.
pub(crate) fn decode_request(kind: &str, body: &[u8]) -> Result<NamingRequest, NacosError> {
    serde_json::from_slice(body).map_err(|e| {
        // The client's type name is echoed only when short: it is free text.
        let kind: String = kind.chars().take(64).collect();
        NacosError::invalid("body", format!("not valid JSON for {kind:?}: {e}"))
    })
}

/// A successful response: Nacos' common fields plus the response's own.
pub(crate) fn success_payload(
    metrics: &NacosMetrics,
    response: &str,
    request_id: &str,
    mut fields: Value,
) -> Result<Payload, NacosError> {
    if let Value::Object(m) = &mut fields {
        m.insert("resultCode".into(), json!(200));
        m.insert("errorCode".into(), json!(0));
        m.insert("message".into(), json!(""));
        m.insert("requestId".into(), json!(request_id));
    }
    let body = encode_json(metrics, "gRPC response", &fields)?;
    Ok(Payload::envelope(response, body))
}

/// An `ErrorResponse` for `e`, its `errorCode` from the error's class.
pub(crate) fn error_payload(metrics: &NacosMetrics, request_id: &str, e: &NacosError) -> Payload {
    error_payload_code(metrics, request_id, e.kind().nacos_code(), &e.to_string())
}

/// An `ErrorResponse` with an explicit Nacos error code.
pub(crate) fn error_payload_code(
    metrics: &NacosMetrics,
    request_id: &str,
    code: u16,
    message: &str,
) -> Payload {
    let body = json!({
        "resultCode": 500,
        "errorCode": code,
        "message": message,
        "requestId": request_id,
    });
    // Strings and numbers always encode; should it ever fail, the client still gets a
    // well-formed error rather than an empty body.
    let bytes = encode_json(metrics, "gRPC error response", &body).unwrap_or_else(|_| {
        br#"{"resultCode":500,"errorCode":500,"message":"could not encode the answer"}"#.to_vec()
    });
    Payload::envelope("ErrorResponse", bytes)
}
