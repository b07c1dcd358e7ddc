//! The last-known-good cache file: the discovery cache as JSON, written atomically (a temporary
//! file in the same directory, fsynced, then renamed over the old one) and at most once per
//! interval, and read at start-up so that `get` can answer when no server is reachable.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sextant_model::now_ms;
use tokio::sync::watch;

use crate::cache::Cache;
use crate::error::Error;
use crate::stats::Counters;
use crate::types::Service;

/// The file's format version.
const FORMAT: u32 = 1;

#[derive(Serialize)]
struct FileOut<'a> {
    format: u32,
    written_at_ms: u64,
    services: Vec<&'a Service>,
}

#[derive(Deserialize)]
struct FileIn {
    format: u32,
    services: Vec<Service>,
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::CacheFile {
        path: path.to_owned(),
        source,
    }
}

/// Reads the cache file. A missing file is an empty cache; an unreadable or malformed one is an
/// error (the caller logs it and starts empty: a bad cache must not stop the client).
pub(crate) fn load(path: &Path) -> Result<Vec<Service>, Error> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path, e)),
    };
    let file: FileIn = serde_json::from_slice(&bytes).map_err(|e| io_err(path, e.into()))?;
    if file.format != FORMAT {
        return Err(io_err(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown format {}", file.format),
            ),
        ));
    }
    // The file may have been edited or damaged: keep valid names, and instances sorted by id
    // and unique (lookups rely on it).
    Ok(file
        .services
        .into_iter()
        .filter(|s| s.name.is_valid())
        .map(|mut s| {
            s.instances.sort_by(|a, b| a.id.cmp(&b.id));
            s.instances.dedup_by(|a, b| a.id == b.id);
            s
        })
        .collect())
}

/// Writes `services` to `path` atomically.
pub(crate) fn store(path: &Path, services: &[Arc<Service>]) -> Result<(), Error> {
    let out = FileOut {
        format: FORMAT,
        written_at_ms: now_ms(),
        services: services.iter().map(|s| &**s).collect(),
    };
    let bytes = serde_json::to_vec(&out).map_err(|e| io_err(path, e.into()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sextant-cache".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable (best effort: not every platform can open a dir).
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path, e)
    })
}

/// Writes the cache after it changes, at most once per `interval`, and once more on close.
pub(crate) struct Writer {
    pub path: PathBuf,
    pub interval: Duration,
    pub cache: Arc<Cache>,
    pub stats: Arc<Counters>,
    pub closed: watch::Receiver<bool>,
}

impl Writer {
    pub async fn run(mut self) {
        loop {
            let closing = tokio::select! {
                _ = self.cache.dirty_changed.notified() => false,
                _ = self.closed.changed() => true,
            };
            if !closing {
                // Coalesce everything that changes within the interval into one write.
                let closing = tokio::select! {
                    _ = tokio::time::sleep(self.interval) => false,
                    _ = self.closed.changed() => true,
                };
                self.flush().await;
                if closing {
                    return;
                }
            } else {
                self.flush().await;
                return;
            }
        }
    }

    /// Writes the cache if it changed since the last write.
    pub async fn flush(&self) {
        if !self.cache.take_dirty() {
            return;
        }
        let services = self.cache.all();
        let path = self.path.clone();
        match tokio::task::spawn_blocking(move || store(&path, &services)).await {
            Ok(Ok(())) => Counters::inc(&self.stats.cache_file_writes),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not write the cache file"),
            Err(e) => tracing::warn!(error = %e, "cache file writer failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ServiceName;

    #[test]
    fn round_trip_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.json");
        assert!(load(&path).unwrap().is_empty());
        let mut s = Service::empty(ServiceName::new("p", "s").unwrap());
        s.revision = 7;
        store(&path, &[Arc::new(s.clone())]).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].revision, 7);
        assert_eq!(back[0].source, crate::types::Source::CacheFile);
        // Only the file itself is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(load(&path).is_err());
        std::fs::write(&path, br#"{"format": 99, "services": []}"#).unwrap();
        assert!(load(&path).is_err());
    }
}
