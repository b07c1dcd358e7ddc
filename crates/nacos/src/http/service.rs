//! The service endpoints of the 1.x API: create, update (protect threshold), delete, get and
//! list. Sextant keeps no service metadata or selectors; they are refused, not dropped.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sextant_core::model::ServiceConfig;
use sextant_core::ServiceView;

use super::{ok, track, AppState, Params};
use crate::mapping::{self, NacosService};
use crate::{Adapter, NacosError};

/// A service exists for Nacos when it has instances or settings.
fn exists(view: &ServiceView) -> bool {
    !view.instances.is_empty() || view.config != ServiceConfig::default()
}

fn threshold(p: &Params) -> Result<Option<f32>, NacosError> {
    match p.parse::<f32>("protectThreshold")? {
        Some(t) if !(0.0..=1.0).contains(&t) => Err(NacosError::invalid(
            "protectThreshold",
            format!("must be between 0 and 1, got {t}"),
        )),
        t => Ok(t),
    }
}

/// Sextant keeps no service-level metadata or selectors; refuse them rather than drop them.
fn refuse_service_extras(p: &Params) -> Result<(), NacosError> {
    if let Some(m) = p.metadata()? {
        if !m.is_empty() {
            return Err(NacosError::Unsupported(
                "service metadata is not kept by Sextant; put metadata on instances".into(),
            ));
        }
    }
    if let Some(sel) = p.get("selector") {
        let none = sel.trim().is_empty() || sel.contains("\"none\"");
        if !none {
            return Err(NacosError::Unsupported(
                "service selectors are not supported by Sextant".into(),
            ));
        }
    }
    Ok(())
}

pub(super) async fn create_service(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = async {
        let (svc, key) = p.service()?;
        refuse_service_extras(&p)?;
        let t = threshold(&p)?.unwrap_or(0.0);
        if exists(&s.registry.get(&key, false)) {
            return Err(NacosError::Conflict(format!(
                "specified service already exists, serviceName : {}",
                svc.grouped()
            )));
        }
        let config = ServiceConfig {
            protect_threshold: t,
            ..ServiceConfig::default()
        };
        s.registry.configure(key, config).await?;
        Ok(ok())
    }
    .await;
    track(&s, "service.create", &r);
    r
}

pub(super) async fn update_service(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = async {
        let (svc, key) = p.service()?;
        refuse_service_extras(&p)?;
        let view = s.registry.get(&key, false);
        if !exists(&view) {
            return Err(NacosError::NotFound(format!(
                "service {} not found",
                svc.grouped()
            )));
        }
        let mut config = view.config;
        if let Some(t) = threshold(&p)? {
            config.protect_threshold = t;
        }
        s.registry.configure(key, config).await?;
        Ok(ok())
    }
    .await;
    track(&s, "service.update", &r);
    r
}

pub(super) async fn delete_service(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = async {
        let (svc, key) = p.service()?;
        let view = s.registry.get(&key, false);
        if !view.instances.is_empty() {
            return Err(NacosError::Conflict(format!(
                "service {} is not empty, can't be delete. Please unregister instance first",
                svc.grouped()
            )));
        }
        if view.config == ServiceConfig::default() {
            return Err(NacosError::NotFound(format!(
                "specified service not exist, serviceName : {}",
                svc.grouped()
            )));
        }
        s.registry.configure(key, ServiceConfig::default()).await?;
        Ok(ok())
    }
    .await;
    track(&s, "service.delete", &r);
    r
}

pub(super) async fn get_service(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = (|| {
        let (svc, key) = p.service()?;
        let view = s.registry.get(&key, false);
        if !exists(&view) {
            return Err(NacosError::NotFound(format!(
                "service {} not found",
                svc.grouped()
            )));
        }
        let mut clusters: Vec<&str> = view
            .instances
            .iter()
            .map(|i| mapping::cluster_of(&i.spec))
            .collect();
        clusters.sort_unstable();
        clusters.dedup();
        let clusters: Vec<_> = clusters
            .into_iter()
            .map(|c| json!({"name": c, "healthChecker": {"type": "NONE"}, "metadata": {}}))
            .collect();
        Ok(Json(json!({
            "namespaceId": &*key.namespace,
            "groupName": svc.group,
            "name": svc.name,
            // Through its shortest decimal form, so 0.8 stays 0.8 and not 0.800000011920929.
            "protectThreshold": view.config.protect_threshold.to_string().parse::<f64>().unwrap_or(0.0),
            "metadata": {},
            "selector": {"type": "none"},
            "clusters": clusters,
        }))
        .into_response())
    })();
    track(&s, "service.get", &r);
    r
}

/// The services of a namespace in one group, paged the way Nacos pages (1-based pages).
pub(crate) fn services_page(
    s: &Adapter,
    namespace: &str,
    group: Option<&str>,
    page_no: usize,
    page_size: usize,
) -> (usize, Vec<String>) {
    let group = match group.map(str::trim) {
        None | Some("") => mapping::DEFAULT_GROUP,
        Some(g) => g,
    };
    let names: Vec<String> = s
        .registry
        .services(namespace)
        .into_iter()
        .map(|summary| NacosService::from_sextant(&summary.service.service))
        .filter(|svc| svc.group == group)
        .map(|svc| svc.name)
        .collect();
    let count = names.len();
    let start = page_no.max(1).saturating_sub(1).saturating_mul(page_size);
    let page = names.into_iter().skip(start).take(page_size).collect();
    (count, page)
}

pub(super) async fn list_services(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = (|| {
        let page_no = p.parse::<usize>("pageNo")?.unwrap_or(1);
        let page_size = p.parse::<usize>("pageSize")?.unwrap_or(10);
        let (count, doms) =
            services_page(&s, p.namespace(), p.get("groupName"), page_no, page_size);
        Ok(Json(json!({"count": count, "doms": doms})).into_response())
    })();
    track(&s, "service.list", &r);
    r
}
