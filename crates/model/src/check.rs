//! Health check definitions: how the central scanner probes a service's instances.

use serde::{Deserialize, Serialize};

use crate::InvalidField;

/// What a probe does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// No probing: health comes from leases or operators only.
    #[default]
    None,
    /// TCP connect.
    Tcp,
    /// HTTP GET of a path; healthy on a status in a range.
    Http,
    /// `grpc.health.v1.Health/Check`.
    Grpc,
}

impl CheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::None => "none",
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Grpc => "grpc",
        }
    }
}

/// A service's check. Times are in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    /// Consecutive successes before an instance is marked healthy.
    pub rise: u32,
    /// Consecutive failures before an instance is marked unhealthy.
    pub fall: u32,
    /// Spread of each probe around its due time, as a percentage of the interval (0-50).
    pub jitter_percent: u32,
    /// Port to probe; 0 = the instance's own port.
    pub port: u16,
    /// For `http`: the path to GET.
    pub http_path: String,
    /// For `http`: healthy when `status_min <= status <= status_max`.
    pub http_status_min: u16,
    pub http_status_max: u16,
    /// For `grpc`: the service name asked about ("" = the whole server).
    pub grpc_service: String,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: CheckKind::None,
            interval_ms: 5_000,
            timeout_ms: 1_000,
            rise: 2,
            fall: 3,
            jitter_percent: 10,
            port: 0,
            http_path: "/health".into(),
            http_status_min: 200,
            http_status_max: 399,
            grpc_service: String::new(),
        }
    }
}

impl HealthCheck {
    pub fn is_active(&self) -> bool {
        self.kind != CheckKind::None
    }

    pub fn validate(&self) -> Result<(), InvalidField> {
        let bad = |f: &str, m: String| Err(InvalidField::new(format!("check.{f}"), m));
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return bad(
                "interval_ms",
                format!("must be 100-3600000, got {}", self.interval_ms),
            );
        }
        if self.timeout_ms < 10 || self.timeout_ms > self.interval_ms {
            return bad(
                "timeout_ms",
                format!(
                    "must be 10 up to interval_ms ({}), got {}",
                    self.interval_ms, self.timeout_ms
                ),
            );
        }
        if !(1..=100).contains(&self.rise) {
            return bad("rise", format!("must be 1-100, got {}", self.rise));
        }
        if !(1..=100).contains(&self.fall) {
            return bad("fall", format!("must be 1-100, got {}", self.fall));
        }
        if self.jitter_percent > 50 {
            return bad(
                "jitter_percent",
                format!("must be 0-50, got {}", self.jitter_percent),
            );
        }
        if !self.http_path.starts_with('/')
            || self.http_path.len() > 1024
            || self.http_path.chars().any(|c| c.is_control() || c == ' ')
        {
            return bad(
                "http_path",
                format!(
                    "{:?} must be an absolute path without spaces",
                    self.http_path
                ),
            );
        }
        if !(100..=599).contains(&self.http_status_min)
            || !(100..=599).contains(&self.http_status_max)
            || self.http_status_min > self.http_status_max
        {
            return bad(
                "http_status_min",
                format!(
                    "status range {}-{} must lie within 100-599, min <= max",
                    self.http_status_min, self.http_status_max
                ),
            );
        }
        if self.grpc_service.len() > 256 {
            return bad("grpc_service", "at most 256 characters".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bounds_are_checked() {
        assert!(HealthCheck::default().validate().is_ok());
        let c = HealthCheck {
            timeout_ms: 10_000,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "check.timeout_ms");
        let c = HealthCheck {
            http_path: "health".into(),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "check.http_path");
        let c = HealthCheck {
            http_status_min: 500,
            http_status_max: 200,
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }
}
