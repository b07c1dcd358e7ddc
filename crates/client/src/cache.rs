//! The discovery cache: the state of every service the client asked about, how fresh each one
//! is, the set the watch stream must cover, the stream's resume point, and the rules that apply
//! watch frames to it (per-service revisions make a replayed frame a no-op, so resuming from an
//! earlier point is always safe). Changes go out on a bounded broadcast channel.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use sextant_proto::v1 as pb;
use tokio::sync::{broadcast, Notify};
use tokio::time::Instant;

use crate::convert::{delete_reason, instance_from, service_from, service_name, status_from};
use crate::error::Error;
use crate::stats::Counters;
use crate::types::{Change, Service, ServiceName, ServiceUpdate, Source};

/// How far a cached service can be trusted, and what the watch stream must do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fresh {
    /// Loaded from the cache file; no server has confirmed it yet.
    File,
    /// Read directly from server `index` in a consistent cut at revision `cut`, at `at`, not
    /// yet covered by the watch stream.
    Fetched { index: usize, cut: u64, at: Instant },
    /// Kept current by the watch stream to server `index`.
    Live { index: usize },
    /// Served, but known to need a fresh read (the server's history changed under it, or an
    /// event did not fit it).
    Stale,
}

pub(crate) struct Entry {
    pub service: Arc<Service>,
    /// Every change of this service at or below this revision is reflected.
    pub applied: u64,
    pub fresh: Fresh,
}

#[derive(Default)]
pub(crate) struct CacheState {
    pub entries: HashMap<ServiceName, Entry>,
    /// The services the watch stream must cover.
    pub wanted: BTreeSet<ServiceName>,
    /// Where the stream resumes: the server whose history the revision belongs to, and the
    /// revision of the last frame received from it.
    pub resume: Option<(usize, u64)>,
}

/// What one open stream knows about itself while frames are applied.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamCtx {
    /// The server it is connected to.
    pub index: usize,
    /// The `since` it was opened with.
    pub since: Option<u64>,
    /// The server's history turned out not to be the one `since` came from.
    pub foreign: bool,
}

pub(crate) struct Cache {
    pub state: Mutex<CacheState>,
    /// Signalled when `wanted` grows.
    pub wanted_changed: Notify,
    updates: broadcast::Sender<ServiceUpdate>,
    dirty: AtomicBool,
    /// Signalled when the cache changed (the cache-file writer waits on it).
    pub dirty_changed: Notify,
    stats: Arc<Counters>,
}

impl Cache {
    pub fn new(update_capacity: usize, stats: Arc<Counters>) -> Self {
        let (updates, _) = broadcast::channel(update_capacity.max(1));
        Self {
            state: Mutex::new(CacheState::default()),
            wanted_changed: Notify::new(),
            updates,
            dirty: AtomicBool::new(false),
            dirty_changed: Notify::new(),
            stats,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ServiceUpdate> {
        self.updates.subscribe()
    }

    fn publish(&self, revision: u64, change: Change, service: &Arc<Service>) {
        self.dirty.store(true, Ordering::Release);
        self.dirty_changed.notify_one();
        if self.updates.receiver_count() > 0 {
            let _ = self.updates.send(ServiceUpdate {
                revision,
                change,
                service: service.clone(),
            });
        }
    }

    /// Takes the dirty flag: whether anything changed since the last call.
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }

    /// Loads services from the cache file (only those not already known).
    pub fn load_file(&self, services: Vec<Service>) {
        let mut st = self.state.lock();
        for mut s in services {
            s.source = Source::CacheFile;
            st.entries.entry(s.name.clone()).or_insert(Entry {
                service: Arc::new(s),
                applied: 0,
                fresh: Fresh::File,
            });
        }
    }

    /// Every cached service, for the cache file.
    pub fn all(&self) -> Vec<Arc<Service>> {
        let st = self.state.lock();
        let mut v: Vec<_> = st.entries.values().map(|e| e.service.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Adds `name` to the set the watch stream covers; wakes the stream if it is new.
    pub fn want(&self, name: &ServiceName) {
        let added = self.state.lock().wanted.insert(name.clone());
        if added {
            self.wanted_changed.notify_one();
        }
    }

    pub fn lookup(&self, name: &ServiceName) -> Option<(Arc<Service>, Fresh)> {
        let st = self.state.lock();
        st.entries.get(name).map(|e| (e.service.clone(), e.fresh))
    }

    /// Stores a direct read unless the stream already keeps the service (then its state wins:
    /// it is at least as new) or an earlier read from the same server was newer. Returns what
    /// the cache now holds.
    pub fn insert_fetched(&self, service: Service, index: usize, cut: u64) -> Arc<Service> {
        let mut st = self.state.lock();
        let name = service.name.clone();
        if let Some(e) = st.entries.get(&name) {
            let keep = match e.fresh {
                Fresh::Live { .. } => true,
                Fresh::Fetched {
                    index: i, cut: c, ..
                } => i == index && c > cut,
                Fresh::File | Fresh::Stale => false,
            };
            if keep {
                return e.service.clone();
            }
        }
        let service = Arc::new(service);
        st.entries.insert(
            name,
            Entry {
                service: service.clone(),
                applied: cut,
                fresh: Fresh::Fetched {
                    index,
                    cut,
                    at: Instant::now(),
                },
            },
        );
        drop(st);
        self.publish(cut, Change::Fetched, &service);
        service
    }

    /// Called once a stream to server `index` opened with `since` = `Some(_)`: marks the
    /// services it covers that need no more (read from this server at or after `since`) as
    /// live, and returns those that must be read directly because the stream will only send
    /// their changes after `since`, not their state.
    pub fn needs_fetch(
        &self,
        services: &BTreeSet<ServiceName>,
        index: usize,
        since: u64,
    ) -> Vec<ServiceName> {
        let mut st = self.state.lock();
        let mut out = Vec::new();
        for name in services {
            match st.entries.get_mut(name) {
                Some(e) => match e.fresh {
                    Fresh::Live { index: i } if i == index => {}
                    Fresh::Fetched { index: i, cut, .. } if i == index && cut >= since => {
                        e.fresh = Fresh::Live { index };
                    }
                    _ => out.push(name.clone()),
                },
                None => out.push(name.clone()),
            }
        }
        out
    }

    /// Stores services read in one consistent cut at `cut` on the stream's server.
    pub fn apply_fetch(&self, ctx: &StreamCtx, cut: u64, services: Vec<Service>) {
        for s in services {
            let name = s.name.clone();
            let service = Arc::new(s);
            self.state.lock().entries.insert(
                name,
                Entry {
                    service: service.clone(),
                    applied: cut,
                    fresh: Fresh::Live { index: ctx.index },
                },
            );
            Counters::inc(&self.stats.services_fetched);
            self.publish(cut, Change::Fetched, &service);
        }
    }

    /// Records a delivery boundary from a bookmark frame.
    fn advance_resume(&self, ctx: &StreamCtx, bookmark: u64) {
        let mut st = self.state.lock();
        let resume = match st.resume {
            Some((i, r)) if i == ctx.index && !ctx.foreign => r.max(bookmark),
            _ => bookmark,
        };
        st.resume = Some((ctx.index, resume));
        self.stats.last_revision.store(resume, Ordering::Relaxed);
    }

    /// Applies one watch frame. Frames of one stream arrive in revision order; a frame at or
    /// below a service's applied revision is skipped. Returns `true` when the frame showed the
    /// cached state of its service to be off, so the stream should re-open and re-read it.
    pub fn apply_frame(&self, ctx: &mut StreamCtx, ev: pb::WatchEvent) -> Result<bool, Error> {
        use pb::watch_event::Kind;
        let rev = ev.revision;
        // Only the last frame of a delivery carries the point to resume from; a frame with
        // nothing else is a bookmark (the stream is caught up to it).
        let bookmark = ev.resume_revision;
        if ev.kind.is_none() && bookmark > 0 {
            self.advance_resume(ctx, bookmark);
            return Ok(false);
        }
        let name = service_name(ev.service.as_ref())?;
        let kind = ev
            .kind
            .ok_or_else(|| Error::Protocol("watch frame without a kind".into()))?;
        let mut st = self.state.lock();
        let live = Fresh::Live { index: ctx.index };
        let mut reread = false;
        let published = match kind {
            Kind::Snapshot(svc) => {
                Counters::inc(&self.stats.snapshots_received);
                if ev.resync {
                    Counters::inc(&self.stats.resync_snapshots_received);
                }
                if let Some(since) = ctx.since {
                    if rev < since && !ctx.foreign {
                        // The server is behind the revision we resumed from: its history is
                        // not the one our revisions came from (a wiped data dir). Everything
                        // cached from the old history must be replaced.
                        tracing::warn!(
                            since,
                            server_revision = rev,
                            "the server's history changed; replacing the cache"
                        );
                        ctx.foreign = true;
                        for e in st.entries.values_mut() {
                            if e.fresh != Fresh::File {
                                e.fresh = Fresh::Stale;
                                e.applied = 0;
                            }
                        }
                    }
                }
                let svc = service_from(svc)?;
                let keep_ours = st
                    .entries
                    .get(&name)
                    .is_some_and(|e| e.fresh == live && e.applied > rev);
                if keep_ours {
                    None
                } else {
                    let service = Arc::new(svc);
                    st.entries.insert(
                        name,
                        Entry {
                            service: service.clone(),
                            applied: rev,
                            fresh: live,
                        },
                    );
                    Some((Change::Snapshot { resync: ev.resync }, service))
                }
            }
            kind => {
                Counters::inc(&self.stats.events_received);
                match st.entries.get_mut(&name) {
                    Some(e) if e.fresh == live && rev > e.applied => {
                        let change = apply_event(e, rev, kind)?;
                        reread = e.fresh == Fresh::Stale;
                        change.map(|c| (c, e.service.clone()))
                    }
                    Some(e) if e.fresh == live => {
                        Counters::inc(&self.stats.events_skipped);
                        None
                    }
                    _ => {
                        // Not a service this stream keeps (it cannot happen with this server:
                        // every covered service was snapshotted or read before frames are
                        // read); the next stream re-reads it.
                        tracing::debug!(service = %name, rev, "event for a service without live state; skipped");
                        Counters::inc(&self.stats.events_skipped);
                        None
                    }
                }
            }
        };
        if bookmark > 0 {
            let resume = match st.resume {
                Some((i, r)) if i == ctx.index && !ctx.foreign => r.max(bookmark),
                _ => bookmark,
            };
            st.resume = Some((ctx.index, resume));
            self.stats.last_revision.store(resume, Ordering::Relaxed);
        }
        if ctx.foreign {
            // From now on this stream's revisions are the only history.
            ctx.foreign = false;
            ctx.since = None;
        }
        drop(st);
        if let Some((change, service)) = published {
            self.publish(rev, change, &service);
        }
        Ok(reread)
    }
}

/// Applies an upsert, status or delete at `rev` (> the entry's applied revision). `None` when
/// it changed nothing visible.
fn apply_event(
    e: &mut Entry,
    rev: u64,
    kind: pb::watch_event::Kind,
) -> Result<Option<Change>, Error> {
    use pb::watch_event::Kind;
    let change = match kind {
        Kind::Upsert(i) => {
            let inst = instance_from(i)?;
            let id = inst.id.clone();
            let svc = Arc::make_mut(&mut e.service);
            match svc.position(&id) {
                Ok(n) => svc.instances[n] = inst,
                Err(n) => svc.instances.insert(n, inst),
            }
            Some(Change::Upsert { id })
        }
        Kind::Status(s) => {
            let status = status_from(s.status)?;
            let svc = Arc::make_mut(&mut e.service);
            match svc.position(&s.id) {
                Ok(n) => {
                    svc.instances[n].status = status;
                    svc.instances[n].status_revision = rev;
                    Some(Change::Status { id: s.id })
                }
                Err(_) => {
                    // A status for an instance we do not have: our state is off; re-read it.
                    tracing::warn!(service = %svc.name, id = %s.id, "status event for an unknown instance; will re-read the service");
                    e.fresh = Fresh::Stale;
                    None
                }
            }
        }
        Kind::Delete(d) => {
            let svc = Arc::make_mut(&mut e.service);
            match svc.position(&d.id) {
                Ok(n) => {
                    svc.instances.remove(n);
                    Some(Change::Delete {
                        id: d.id,
                        reason: delete_reason(&d.reason),
                    })
                }
                Err(_) => None,
            }
        }
        Kind::Snapshot(_) => None,
    };
    let svc = Arc::make_mut(&mut e.service);
    svc.revision = rev;
    svc.source = Source::Server;
    e.applied = rev;
    Ok(change)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServiceName {
        ServiceName::new("t", s).unwrap()
    }

    fn sref(s: &str) -> Option<pb::ServiceRef> {
        Some(pb::ServiceRef {
            namespace: "t".into(),
            service: s.into(),
        })
    }

    fn inst(id: &str) -> pb::Instance {
        pb::Instance {
            spec: Some(pb::InstanceSpec {
                id: id.into(),
                host: "10.0.0.1".into(),
                port: 80,
                ..Default::default()
            }),
            status: Some(pb::InstanceStatus {
                enabled: true,
                weight: 100,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn snapshot(s: &str, rev: u64, ids: &[&str]) -> pb::WatchEvent {
        pb::WatchEvent {
            revision: rev,
            service: sref(s),
            kind: Some(pb::watch_event::Kind::Snapshot(pb::Service {
                service: sref(s),
                revision: rev,
                instances: ids.iter().map(|i| inst(i)).collect(),
                ..Default::default()
            })),
            resync: false,
            resume_revision: rev,
        }
    }

    fn upsert(s: &str, rev: u64, id: &str) -> pb::WatchEvent {
        pb::WatchEvent {
            revision: rev,
            service: sref(s),
            kind: Some(pb::watch_event::Kind::Upsert(inst(id))),
            resync: false,
            resume_revision: rev,
        }
    }

    fn delete(s: &str, rev: u64, id: &str) -> pb::WatchEvent {
        pb::WatchEvent {
            revision: rev,
            service: sref(s),
            kind: Some(pb::watch_event::Kind::Delete(pb::Deletion {
                id: id.into(),
                reason: "deregistered".into(),
            })),
            resync: false,
            resume_revision: rev,
        }
    }

    fn ids(c: &Cache, s: &str) -> Vec<String> {
        c.lookup(&name(s))
            .map(|(svc, _)| svc.instances.iter().map(|i| i.id.clone()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn events_apply_in_order_and_replays_are_skipped() {
        let stats = Arc::new(Counters::default());
        let c = Cache::new(16, stats.clone());
        let mut ctx = StreamCtx {
            index: 0,
            since: None,
            foreign: false,
        };
        c.apply_frame(&mut ctx, snapshot("a", 5, &["x"])).unwrap();
        c.apply_frame(&mut ctx, upsert("a", 6, "y")).unwrap();
        c.apply_frame(&mut ctx, delete("a", 7, "x")).unwrap();
        assert_eq!(ids(&c, "a"), vec!["y"]);
        // A replay (resumed from an earlier point) changes nothing.
        c.apply_frame(&mut ctx, upsert("a", 5, "x")).unwrap();
        c.apply_frame(&mut ctx, upsert("a", 6, "y")).unwrap();
        assert_eq!(ids(&c, "a"), vec!["y"]);
        assert_eq!(stats.snapshot().events_skipped, 2);
        assert_eq!(c.state.lock().resume, Some((0, 7)));
        assert_eq!(c.lookup(&name("a")).unwrap().0.revision, 7);
    }

    #[test]
    fn a_snapshot_behind_since_means_another_history() {
        let c = Cache::new(16, Arc::new(Counters::default()));
        let mut ctx = StreamCtx {
            index: 0,
            since: None,
            foreign: false,
        };
        c.apply_frame(&mut ctx, snapshot("a", 50, &["x"])).unwrap();
        c.apply_frame(&mut ctx, snapshot("b", 50, &["x"])).unwrap();
        // The server came back with a wiped data dir: we resume from 50, it is at 3.
        let mut ctx = StreamCtx {
            index: 0,
            since: Some(50),
            foreign: false,
        };
        c.apply_frame(&mut ctx, snapshot("a", 3, &["z"])).unwrap();
        assert_eq!(ids(&c, "a"), vec!["z"]);
        assert_eq!(c.state.lock().resume, Some((0, 3)));
        // b has not been re-sent yet: it must be re-read on the next stream.
        assert_eq!(c.lookup(&name("b")).unwrap().1, Fresh::Stale);
        let wanted: BTreeSet<_> = [name("a"), name("b")].into();
        assert_eq!(c.needs_fetch(&wanted, 0, 3), vec![name("b")]);
        c.apply_frame(&mut ctx, upsert("a", 4, "w")).unwrap();
        assert_eq!(ids(&c, "a"), vec!["w", "z"]);
    }

    #[test]
    fn a_direct_read_is_confirmed_only_when_it_covers_the_resume_point() {
        let c = Cache::new(16, Arc::new(Counters::default()));
        let mut svc = Service::empty(name("a"));
        svc.revision = 9;
        c.insert_fetched(svc.clone(), 0, 20);
        let wanted: BTreeSet<_> = [name("a")].into();
        assert!(c.needs_fetch(&wanted, 0, 20).is_empty());
        c.insert_fetched(svc.clone(), 0, 20); // ignored: already live
        assert_eq!(c.lookup(&name("a")).unwrap().1, Fresh::Live { index: 0 });

        let c = Cache::new(16, Arc::new(Counters::default()));
        c.insert_fetched(svc.clone(), 0, 20);
        assert_eq!(c.needs_fetch(&wanted, 0, 21), vec![name("a")]);
        let c = Cache::new(16, Arc::new(Counters::default()));
        c.insert_fetched(svc, 1, 20);
        assert_eq!(c.needs_fetch(&wanted, 0, 20), vec![name("a")]);
    }

    #[test]
    fn a_newer_direct_read_is_not_replaced_by_an_older_snapshot() {
        let c = Cache::new(16, Arc::new(Counters::default()));
        let ctx0 = StreamCtx {
            index: 0,
            since: Some(10),
            foreign: false,
        };
        let mut svc = Service::empty(name("a"));
        svc.instances = vec![];
        c.apply_fetch(&ctx0, 30, vec![svc]);
        let mut ctx = ctx0;
        c.apply_frame(&mut ctx, snapshot("a", 12, &["old"]))
            .unwrap();
        assert!(ids(&c, "a").is_empty());
        c.apply_frame(&mut ctx, upsert("a", 31, "new")).unwrap();
        assert_eq!(ids(&c, "a"), vec!["new"]);
    }

    #[test]
    fn a_status_for_an_unknown_instance_asks_for_a_re_read() {
        let c = Cache::new(16, Arc::new(Counters::default()));
        let mut ctx = StreamCtx {
            index: 0,
            since: None,
            foreign: false,
        };
        assert!(!c.apply_frame(&mut ctx, snapshot("a", 1, &["x"])).unwrap());
        let status = pb::WatchEvent {
            revision: 2,
            service: sref("a"),
            kind: Some(pb::watch_event::Kind::Status(pb::StatusChange {
                id: "ghost".into(),
                status: Some(pb::InstanceStatus::default()),
            })),
            resync: false,
            resume_revision: 2,
        };
        assert!(c.apply_frame(&mut ctx, status).unwrap());
        let wanted: BTreeSet<_> = [name("a")].into();
        assert_eq!(c.needs_fetch(&wanted, 0, 2), vec![name("a")]);
        // Still served meanwhile.
        assert_eq!(ids(&c, "a"), vec!["x"]);
    }

    #[test]
    fn frames_missing_their_parts_are_errors() {
        let c = Cache::new(16, Arc::new(Counters::default()));
        let mut ctx = StreamCtx {
            index: 0,
            since: None,
            foreign: false,
        };
        let mut ev = upsert("a", 1, "x");
        ev.kind = None;
        ev.resume_revision = 0;
        assert!(c.apply_frame(&mut ctx, ev).is_err());
        // Without a kind but with a resume revision it is a bookmark: the resume point moves.
        let bookmark = pb::WatchEvent {
            revision: 9,
            resume_revision: 9,
            ..Default::default()
        };
        assert!(!c.apply_frame(&mut ctx, bookmark).unwrap());
        assert_eq!(c.state.lock().resume, Some((0, 9)));
        let mut ev = upsert("a", 1, "x");
        ev.service = None;
        assert!(c.apply_frame(&mut ctx, ev).is_err());
    }

    #[tokio::test]
    async fn subscribers_get_the_state_after_each_change() {
        let c = Cache::new(16, Arc::new(Counters::default()));
        let mut rx = c.subscribe();
        let mut ctx = StreamCtx {
            index: 0,
            since: None,
            foreign: false,
        };
        c.apply_frame(&mut ctx, snapshot("a", 1, &["x"])).unwrap();
        c.apply_frame(&mut ctx, upsert("a", 2, "y")).unwrap();
        let u1 = rx.recv().await.unwrap();
        assert_eq!(u1.change, Change::Snapshot { resync: false });
        let u2 = rx.recv().await.unwrap();
        assert_eq!(u2.change, Change::Upsert { id: "y".into() });
        assert_eq!(u2.service.instances.len(), 2);
        assert_eq!(
            u1.service.instances.len(),
            1,
            "earlier updates keep their state"
        );
        assert!(c.take_dirty());
        assert!(!c.take_dirty());
    }
}
