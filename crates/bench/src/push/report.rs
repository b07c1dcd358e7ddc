//! What one system's push run yields: its rows and notes, and the latencies and counts that
//! `compare` sets side by side.

use crate::stats::{CpuUsed, Latency, Row};

/// How one system's push rows are named, and what only it needs said.
pub(crate) struct Labels {
    /// Put before every row name ("" when only Sextant runs).
    pub(crate) prefix: String,
    /// How a subscriber subscribes, e.g. "SSE GET /v1/watch".
    pub(crate) subscribe: String,
    /// How a change is written, e.g. "PATCH status".
    pub(crate) write: String,
    /// Notes of this system only, appended after the common ones.
    pub(crate) notes: Vec<String>,
}

/// One system's push results: its full table and the figures compared side by side.
pub(crate) struct PushResult {
    pub(crate) rows: Vec<Row>,
    pub(crate) notes: Vec<String>,
    /// Write acknowledged -> event, over all delivered (subscriber, change) pairs.
    pub(crate) ack: Latency,
    /// Write sent -> event.
    pub(crate) sent: Latency,
    /// Per change, acknowledged -> the last subscriber had it.
    pub(crate) fanout: Latency,
    pub(crate) delivered: u64,
    pub(crate) expected: u64,
    pub(crate) resynced: u64,
    pub(crate) missing: u64,
    pub(crate) watchers: usize,
    pub(crate) writes: usize,
    /// CPU over the writes and the drain.
    pub(crate) cpu: CpuUsed,
    pub(crate) secs: f64,
}

impl PushResult {
    /// One row of a side-by-side table: `pick` 0 is ack → event, 1 write sent → event, 2 ack →
    /// last subscriber (per change); `event_unit` names what the first two count per second.
    pub(crate) fn latency_row(
        &self,
        scenario: String,
        params: String,
        pick: usize,
        event_unit: &'static str,
    ) -> Row {
        let latency = match pick {
            0 => self.ack.clone(),
            1 => self.sent.clone(),
            _ => self.fanout.clone(),
        };
        let per_change = pick == 2;
        Row {
            scenario,
            params,
            ops: if per_change {
                latency.count()
            } else {
                self.delivered
            },
            errors: if per_change {
                (self.writes as u64).saturating_sub(latency.count())
            } else {
                self.missing
            },
            secs: self.secs,
            unit: if per_change { "changes/s" } else { event_unit },
            latency,
            cpu: (pick == 0).then_some(self.cpu),
        }
    }
}
