//! Reading a 1.x request's parameters: the query string and a form body together, as Nacos
//! reads them, with Nacos' lenient forms (case-insensitive booleans, `cluster` for
//! `clusterName`, metadata as JSON or `k=v,...`). Bad values are 400-class errors naming the
//! parameter.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use sextant_core::model::ServiceKey;

use crate::mapping::{self, NacosService};
use crate::NacosError;

/// Request parameters from the query string and a form body together, as Nacos reads them.
pub struct Params(HashMap<String, String>);

impl<S: Send + Sync> FromRequest<S> for Params {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let mut map: HashMap<String, String> = req
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|ct| ct.starts_with("application/x-www-form-urlencoded"));
        let body = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        if form && !body.is_empty() {
            map.extend(form_urlencoded::parse(&body).into_owned());
        }
        Ok(Params(map))
    }
}

impl Params {
    /// Parameters as given (tests call the handlers' parsing directly with these).
    pub fn from_map(map: HashMap<String, String>) -> Self {
        Params(map)
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    pub(crate) fn required(&self, k: &'static str) -> Result<&str, NacosError> {
        match self.get(k).map(str::trim) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(NacosError::missing(k)),
        }
    }

    pub(crate) fn parse<T: std::str::FromStr>(
        &self,
        k: &'static str,
    ) -> Result<Option<T>, NacosError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(k).map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|e| NacosError::invalid(k, format!("{v:?}: {e}"))),
        }
    }

    /// Booleans as Java's `Boolean.parseBoolean` reads them, case-insensitively (the old
    /// Python client sends `True`); anything but true/false is refused.
    pub(crate) fn flag(&self, k: &'static str) -> Result<Option<bool>, NacosError> {
        match self.get(k).map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(NacosError::invalid(
                k,
                format!("{v:?} is not true or false"),
            )),
        }
    }

    pub(crate) fn port(&self) -> Result<u16, NacosError> {
        self.parse::<u16>("port")?
            .ok_or(NacosError::missing("port"))
    }

    pub(crate) fn namespace(&self) -> &str {
        mapping::namespace(self.get("namespaceId"))
    }

    pub(crate) fn service(&self) -> Result<(NacosService, ServiceKey), NacosError> {
        let svc = NacosService::parse(self.required("serviceName")?, self.get("groupName"))?;
        let key = svc.key(self.namespace())?;
        Ok((svc, key))
    }

    /// `clusterName`, or the older `cluster`; `DEFAULT` when neither is given.
    pub(crate) fn cluster(&self) -> &str {
        mapping::cluster(self.given_cluster())
    }

    /// The cluster the client named, if it named one (lookups by address then ignore it).
    pub(crate) fn given_cluster(&self) -> Option<&str> {
        self.get("clusterName")
            .or(self.get("cluster"))
            .filter(|c| !c.trim().is_empty())
    }

    pub(crate) fn metadata(
        &self,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>, NacosError> {
        self.get("metadata")
            .map(mapping::parse_metadata)
            .transpose()
    }
}
