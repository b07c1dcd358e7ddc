//! The Sextant subscriber of the push scenario: one `GET /v1/watch` stream, parsed with the
//! SDK's SSE parser, recording when each change's event arrives (by revision) and any resync
//! snapshot, into the shared [`Live`] state and its own [`Seen`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use serde::Deserialize;
use sextant_client::sse::SseParser;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use super::{Live, Seen};

#[derive(Deserialize)]
struct SnapshotData {
    #[serde(default)]
    resync: bool,
    #[serde(default)]
    instances: Vec<serde::de::IgnoredAny>,
}

/// The revision fields of a frame's data (the rest is skipped, not parsed).
#[derive(Deserialize)]
struct FrameRevision {
    #[serde(default)]
    revision: Option<u64>,
    #[serde(default)]
    resume_revision: Option<u64>,
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn subscriber(
    n: usize,
    client: reqwest::Client,
    url: String,
    service: String,
    connect_slots: Arc<Semaphore>,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen::default();
    let result: anyhow::Result<()> = async {
        let permit = connect_slots.acquire().await?;
        let t0 = Instant::now();
        let resp = client
            .get(&url)
            .query(&[("service", service.as_str())])
            .send()
            .await
            .context("connect")?;
        anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
        let mut body = resp.bytes_stream();
        let mut parser = SseParser::default();
        let mut frames = Vec::new();
        let mut permit = Some(permit);
        loop {
            let chunk = tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                c = body.next() => c,
            };
            let Some(chunk) = chunk else {
                anyhow::bail!("the stream ended");
            };
            let chunk = chunk.context("reading the stream")?;
            let now = Instant::now();
            parser.push(&chunk, &mut frames);
            for f in frames.drain(..) {
                // Only a delivery's last frame has an SSE id; every frame's data has its
                // revision (`resume_revision` for snapshots and sync bookmarks).
                let rev = serde_json::from_str::<FrameRevision>(&f.data)
                    .map(|r| r.resume_revision.or(r.revision).unwrap_or(0))
                    .unwrap_or_else(|_| f.revision_id().unwrap_or(0));
                match f.event.as_str() {
                    "sync" => {}
                    "snapshot" => {
                        let d: SnapshotData =
                            serde_json::from_str(&f.data).context("snapshot JSON")?;
                        if seen.connect.is_none() {
                            permit.take();
                            live.snapshot_arrived(&mut seen, t0, rev, d.instances.len());
                        } else {
                            seen.resyncs += 1;
                            if d.resync {
                                seen.resync_through = seen.resync_through.max(rev);
                            }
                        }
                    }
                    "close" => anyhow::bail!("closed by the server: {}", f.data),
                    _ => seen.events.push((rev, now)),
                }
                live.max_rev[n].fetch_max(rev, Ordering::Relaxed);
            }
        }
    }
    .await;
    live.subscriber_ended(n, &mut seen, result);
    seen
}
