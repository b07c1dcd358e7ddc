//! Encoded answers shared by every read that asks the same question of the same state.
//!
//! When a service changes, every blocking query parked on it wakes at once (a thousand
//! Prometheus, Traefik or consul-template watchers of one service); building and serializing
//! the JSON once per watcher cost about 200 µs of CPU each (docs/benchmarks.md, Run 8). The
//! answer depends only on the question (endpoint, service or namespace, `passing`, tags) and the
//! state (the service's revision — the registry's for catalog-wide answers — and the agent's
//! generation for TTL outputs and maintenance
//! reasons, which change without a revision), so the first reader of a state builds it and the
//! others clone its bytes. One entry per question: a newer state replaces it, and the table is
//! emptied if it ever holds more than `MAX_QUESTIONS` (made-up names cannot grow it for long).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use parking_lot::Mutex;
use sextant_core::model::Revision;

const MAX_QUESTIONS: usize = 4096;

/// What was asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Question {
    pub endpoint: &'static str,
    /// What it is about: `namespace/service`, or a namespace for catalog-wide answers.
    pub scope: String,
    pub passing: bool,
    /// Sorted, so the order they were given in does not matter.
    pub tags: Vec<String>,
}

/// The state an answer was built from: (the service's or the registry's revision, agent
/// generation).
pub(crate) type Version = (Revision, u64);

/// An answer being built or built: the first reader builds it, the others wait for it.
type Cell = Arc<OnceLock<Bytes>>;

#[derive(Default)]
pub(crate) struct Answers {
    map: Mutex<HashMap<Question, (Version, Cell)>>,
}

impl Answers {
    /// The answer to `q` at `version`: built by `build` once, shared after.
    pub fn get(&self, q: Question, version: Version, build: impl FnOnce() -> Bytes) -> Bytes {
        let cell = {
            let mut m = self.map.lock();
            if m.len() >= MAX_QUESTIONS && !m.contains_key(&q) {
                m.clear();
            }
            match m.get(&q) {
                Some((v, cell)) if *v == version => Some(cell.clone()),
                // A reader still holding an older state: answer it, keep the newer entry.
                Some((v, _)) if *v > version => None,
                _ => {
                    let cell = Arc::new(OnceLock::new());
                    m.insert(q, (version, cell.clone()));
                    Some(cell)
                }
            }
        };
        match cell {
            Some(cell) => cell.get_or_init(build).clone(),
            None => build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn q(passing: bool) -> Question {
        Question {
            endpoint: "health_service",
            scope: "public/web".into(),
            passing,
            tags: Vec::new(),
        }
    }

    #[test]
    fn built_once_per_question_and_state() {
        let a = Answers::default();
        let builds = AtomicUsize::new(0);
        let build = |s: &'static str| {
            builds.fetch_add(1, Ordering::SeqCst);
            Bytes::from_static(s.as_bytes())
        };
        assert_eq!(a.get(q(false), (5, 0), || build("a")), "a");
        assert_eq!(a.get(q(false), (5, 0), || build("x")), "a");
        assert_eq!(builds.load(Ordering::SeqCst), 1);
        // Another question, or a new state (revision or agent generation), is built again.
        assert_eq!(a.get(q(true), (5, 0), || build("p")), "p");
        assert_eq!(a.get(q(false), (5, 1), || build("b")), "b");
        assert_eq!(a.get(q(false), (6, 1), || build("c")), "c");
        // An older state is answered but does not replace the newer one.
        assert_eq!(a.get(q(false), (5, 1), || build("old")), "old");
        assert_eq!(a.get(q(false), (6, 1), || build("y")), "c");
        assert_eq!(builds.load(Ordering::SeqCst), 5);
    }
}
