//! The instance endpoints of the 1.x API: register, deregister, modify (PUT/PATCH), health,
//! get, list and beat. Ephemeral instances hold a lease of the configured beat timeout that
//! beats renew. Deregistration, beats and modify find an instance by ip:port within the
//! service whatever its cluster when the client names none (as Nacos 2.x servers do).

use std::net::{IpAddr, SocketAddr};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sextant_core::model::{Registration, ServiceKey};
use sextant_core::HeartbeatResult;

use super::{ok, track, AppState, Params, LIST_CACHE_MILLIS};
use crate::mapping::{
    self, InfoOptions, NacosInstance, NacosRegistration, NacosService, BEAT_INTERVAL_MILLIS,
};
use crate::{commit_ignoring_missing, lease_seconds, udp, Adapter, NacosError};

/// Nacos' beat answer codes: renewed, and "unknown instance, register again".
const BEAT_OK: u32 = 10200;
const BEAT_NOT_FOUND: u32 = 20404;

pub(super) async fn register(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = do_register(&s, &p).await.map(|_| ok());
    track(&s, "instance.register", &r);
    r
}

pub(crate) async fn do_register(s: &Adapter, p: &Params) -> Result<(), NacosError> {
    let (_, key) = p.service()?;
    let reg = NacosRegistration {
        ip: p.required("ip")?.to_string(),
        port: p.port()?,
        cluster: p.cluster().to_string(),
        weight: p.parse::<f64>("weight")?.unwrap_or(1.0),
        healthy: p.flag("healthy")?.unwrap_or(true),
        enabled: p.flag("enabled")?.or(p.flag("enable")?).unwrap_or(true),
        metadata: p.metadata()?.unwrap_or_default(),
    };
    let ephemeral = p.flag("ephemeral")?.unwrap_or(true);
    register_instance(s, key, &reg, ephemeral).await
}

/// Registers (or re-registers) what a 1.x client describes; ephemeral instances get a lease
/// that beats renew.
async fn register_instance(
    s: &Adapter,
    key: ServiceKey,
    reg: &NacosRegistration,
    ephemeral: bool,
) -> Result<(), NacosError> {
    let existing = mapping::find_instance(&s.registry, &key, &reg.ip, reg.port, &reg.cluster)
        .map(|i| i.spec.id.to_string());
    let (spec, status) = reg.to_sextant(existing.as_deref())?;
    let ttl_seconds = if ephemeral {
        lease_seconds(s.config.http_beat_timeout)
    } else {
        0
    };
    s.registry
        .register(Registration {
            service: key.clone(),
            spec,
            status: Some(status),
            ttl_seconds,
        })
        .await?;
    if !ephemeral {
        crate::ensure_checked(&s.registry, &key).await?;
    }
    Ok(())
}

pub(super) async fn deregister(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = do_deregister(&s, &p).await.map(|_| ok());
    track(&s, "instance.deregister", &r);
    r
}

pub(crate) async fn do_deregister(s: &Adapter, p: &Params) -> Result<(), NacosError> {
    let (_, key) = p.service()?;
    let ip = p.required("ip")?;
    let port = p.port()?;
    // Deregistering what is not there is not an error in Nacos.
    if let Some(i) = mapping::find_by_address(&s.registry, &key, ip, port, p.given_cluster()) {
        let id = i.spec.id.to_string();
        commit_ignoring_missing(
            &s.registry,
            vec![sextant_core::Op::Deregister { service: key, id }],
        )
        .await?;
    }
    Ok(())
}

/// PUT and PATCH: the given fields replace the instance's, the others stay.
pub(super) async fn update(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = do_update(&s, &p).await.map(|_| ok());
    track(&s, "instance.update", &r);
    r
}

pub(crate) async fn do_update(s: &Adapter, p: &Params) -> Result<(), NacosError> {
    let (_, key) = p.service()?;
    let ip = p.required("ip")?;
    let port = p.port()?;
    let Some(i) = mapping::find_by_address(&s.registry, &key, ip, port, p.given_cluster()) else {
        return Err(NacosError::NotFound(format!(
            "instance {ip}:{port} not found in service {key}"
        )));
    };
    let mut spec = (*i.spec).clone();
    if let Some(m) = p.metadata()? {
        spec.metadata = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    }
    let mut status = i.status;
    if let Some(w) = p.parse::<f64>("weight")? {
        status.weight = mapping::weight_to_sextant(w)?;
    }
    if let Some(e) = p.flag("enabled")?.or(p.flag("enable")?) {
        status.enabled = e;
    }
    if let Some(h) = p.flag("healthy")? {
        status.health = if h {
            sextant_core::model::Health::Healthy
        } else {
            sextant_core::model::Health::Unhealthy
        };
    }
    s.registry
        .register(Registration {
            service: key,
            spec,
            status: Some(status),
            ttl_seconds: i.ttl_seconds,
        })
        .await?;
    Ok(())
}

/// `PUT /nacos/v1/ns/health/instance`: an operator sets a persistent instance's health.
pub(super) async fn set_health(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = async {
        let (_, key) = p.service()?;
        let ip = p.required("ip")?;
        let port = p.port()?;
        let healthy = p.flag("healthy")?.ok_or(NacosError::missing("healthy"))?;
        let i = mapping::find_instance(&s.registry, &key, ip, port, p.cluster())
            .ok_or_else(|| NacosError::NotFound(format!("instance {ip}:{port} not found")))?;
        let patch = sextant_core::model::StatusPatch {
            health: Some(if healthy {
                sextant_core::model::Health::Healthy
            } else {
                sextant_core::model::Health::Unhealthy
            }),
            ..Default::default()
        };
        s.registry
            .update_status(key, i.spec.id.to_string(), patch)
            .await?;
        Ok(ok())
    }
    .await;
    track(&s, "health.instance", &r);
    r
}

pub(super) async fn get_instance(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = (|| {
        let (svc, key) = p.service()?;
        let ip = p.required("ip")?;
        let port = p.port()?;
        let i = mapping::find_instance(&s.registry, &key, ip, port, p.cluster())
            .ok_or_else(|| NacosError::NotFound("no matched ip found!".into()))?;
        let n = NacosInstance::from_sextant(&i, &svc, false, s.beat_timeout_ms());
        Ok(Json(json!({
            "service": n.service_name,
            "ip": n.ip,
            "port": n.port,
            "clusterName": n.cluster_name,
            "weight": n.weight,
            "healthy": n.healthy,
            "enabled": n.enabled,
            "ephemeral": n.ephemeral,
            "instanceId": n.instance_id,
            "metadata": n.metadata,
        }))
        .into_response())
    })();
    track(&s, "instance.get", &r);
    r
}

pub(super) async fn list(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = (|| {
        let (_, key) = p.service()?;
        let mut opts = InfoOptions {
            grouped_name: true,
            clusters: mapping::cluster_filter(p.get("clusters")),
            healthy_only: p.flag("healthyOnly")?.unwrap_or(false),
            cache_millis: LIST_CACHE_MILLIS,
            now_ms: 0,
            beat_timeout_ms: s.beat_timeout_ms(),
        };
        // A 1.x client that gives a UDP port and its address is pushed to (and told to poll
        // less, as Nacos does); without them it polls.
        let udp_port = p.get("udpPort").and_then(|v| v.trim().parse::<u16>().ok());
        let client_ip = p
            .get("clientIP")
            .and_then(|v| v.trim().parse::<IpAddr>().ok());
        if let (Some(port), Some(ip)) = (udp_port.filter(|p| *p > 0), client_ip) {
            let mut pushed = opts.clone();
            pushed.cache_millis = crate::grpc::PUSH_CACHE_MILLIS;
            if udp::UdpPush::refresh(&s, &key, SocketAddr::new(ip, port), pushed.clone()) {
                opts = pushed;
            }
        }
        let body = s.infos.get(&s.registry, &s.metrics, &key, &opts)?;
        Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
    })();
    track(&s, "instance.list", &r);
    r
}

/// A 1.x beat. With a `beat` body the client describes the instance, and one that is gone
/// (expired, server restarted) is registered again from it, as Nacos does; a light beat
/// without one gets 20404 so the client registers again itself.
pub(super) async fn beat(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = do_beat(&s, &p).await;
    track(&s, "instance.beat", &r);
    r.map(|code| {
        Json(json!({
            "clientBeatInterval": BEAT_INTERVAL_MILLIS,
            "code": code,
            "lightBeatEnabled": true,
        }))
        .into_response()
    })
}

pub(crate) async fn do_beat(s: &Adapter, p: &Params) -> Result<u32, NacosError> {
    let beat: Option<serde_json::Map<String, serde_json::Value>> = match p.get("beat") {
        Some(b) if !b.trim().is_empty() => Some(
            serde_json::from_str(b)
                .map_err(|e| NacosError::invalid("beat", format!("not a JSON object: {e}")))?,
        ),
        _ => None,
    };
    let from_beat = |k: &str| beat.as_ref().and_then(|b| b.get(k));
    let service_name = match p.get("serviceName").filter(|v| !v.trim().is_empty()) {
        Some(v) => v.to_string(),
        None => from_beat("serviceName")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or(NacosError::missing("serviceName"))?,
    };
    let svc = NacosService::parse(&service_name, p.get("groupName"))?;
    let key = svc.key(p.namespace())?;
    let ip = match p.get("ip").filter(|v| !v.is_empty()) {
        Some(ip) => ip.to_string(),
        None => from_beat("ip")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or(NacosError::missing("ip"))?,
    };
    let port = match p.parse::<u16>("port")? {
        Some(port) => port,
        None => from_beat("port")
            .and_then(|v| v.as_u64())
            .and_then(|v| u16::try_from(v).ok())
            .ok_or(NacosError::missing("port"))?,
    };
    let given_cluster = p
        .given_cluster()
        .or_else(|| from_beat("cluster").and_then(|v| v.as_str()))
        .filter(|c| !c.trim().is_empty())
        .map(|c| c.trim().to_string());
    if let Some(i) =
        mapping::find_by_address(&s.registry, &key, &ip, port, given_cluster.as_deref())
    {
        let r = s
            .registry
            .heartbeat(&[(key.clone(), i.spec.id.to_string())]);
        if !matches!(r.first(), Some(HeartbeatResult::Unknown) | None) {
            return Ok(BEAT_OK);
        }
    }
    let Some(beat) = beat.as_ref() else {
        return Ok(BEAT_NOT_FOUND);
    };
    let metadata = beat
        .get("metadata")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), mapping::json_text(v.clone())))
                .collect()
        })
        .unwrap_or_default();
    let reg = NacosRegistration {
        ip,
        port,
        cluster: mapping::cluster(given_cluster.as_deref()).to_string(),
        weight: beat.get("weight").and_then(|w| w.as_f64()).unwrap_or(1.0),
        healthy: true,
        enabled: true,
        metadata,
    };
    register_instance(s, key, &reg, true).await?;
    Ok(BEAT_OK)
}
