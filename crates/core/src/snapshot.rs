//! Consistent snapshots of a registry, for backup and for moving between stores.
//!
//! A [`Snapshot`] is every store record of the registry at one revision — instances, service
//! settings, tokens, policies and the audit log's tail: the same keys and versioned values the
//! writer commits (see `codec`), so it restores into any [`Store`] —
//! embedded or etcd — and a node started on the restored store loads it as it loads its own.
//! [`Registry::snapshot`](crate::Registry::snapshot) takes it from memory under the publish
//! gate, so it is one cut across services without stopping writes.
//!
//! The file: `SEXTANT-SNAPSHOT\n`, a format byte (1), the revision and the record count
//! (u64 LE), each record as key length (u32 LE), key, value length (u32 LE), value, then a
//! CRC-32 of everything before it. Reading checks the checksum and decodes every record, so a
//! damaged or foreign file is refused before anything is written.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;

use sextant_model::Revision;

use crate::codec;
use crate::store::{Batch, Mutation, Store, StoreError};

const MAGIC: &[u8] = b"SEXTANT-SNAPSHOT\n";
const FORMAT: u8 = 1;
/// Longest key or value a reader accepts (records are far smaller; a bigger length means a
/// damaged file, not a reason to allocate gigabytes).
const MAX_FIELD: u32 = 64 * 1024 * 1024;

/// Why a snapshot could not be read or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read the snapshot: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a Sextant snapshot: {0}")]
    Format(String),
    #[error("the snapshot is damaged: {0}")]
    Damaged(String),
    #[error("the target store is not empty (revision {revision}, {keys} keys): restore only into an empty store")]
    NotEmpty { revision: Revision, keys: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Every record of a registry at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: Revision,
    /// Store key → value, in key order.
    pub records: BTreeMap<String, Vec<u8>>,
}

impl Snapshot {
    /// Services with a record, and instances.
    pub fn counts(&self) -> (usize, usize) {
        let services = self.records.keys().filter(|k| k.starts_with("s/")).count();
        let instances = self
            .records
            .keys()
            .filter(|k| k.starts_with("i/") && k.ends_with("/spec"))
            .count();
        (services, instances)
    }

    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(
            64 + self
                .records
                .iter()
                .map(|(k, v)| 8 + k.len() + v.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(MAGIC);
        out.push(FORMAT);
        out.extend_from_slice(&self.revision.to_le_bytes());
        out.extend_from_slice(&(self.records.len() as u64).to_le_bytes());
        for (k, v) in &self.records {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        w.write_all(&out)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut v);
        v
    }

    /// Reads and checks a snapshot: magic, format, checksum, and every record decoding as the
    /// registry would decode it.
    pub fn read_from(r: &mut impl Read) -> Result<Snapshot, SnapshotError> {
        let mut all = Vec::new();
        r.read_to_end(&mut all)?;
        Self::from_bytes(&all)
    }

    pub fn from_bytes(all: &[u8]) -> Result<Snapshot, SnapshotError> {
        if !all.starts_with(MAGIC) {
            return Err(SnapshotError::Format(
                "it does not start with SEXTANT-SNAPSHOT".into(),
            ));
        }
        if all.len() < MAGIC.len() + 1 + 16 + 4 {
            return Err(SnapshotError::Damaged("it is cut short".into()));
        }
        let (body, crc) = all.split_at(all.len() - 4);
        let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(body) != want {
            return Err(SnapshotError::Damaged(
                "its checksum does not match (cut short or changed)".into(),
            ));
        }
        let mut cur = &body[MAGIC.len()..];
        let format = take(&mut cur, 1)?[0];
        if format != FORMAT {
            return Err(SnapshotError::Format(format!(
                "format {format} is not one this build reads ({FORMAT})"
            )));
        }
        let revision = u64_le(take(&mut cur, 8)?);
        let count = u64_le(take(&mut cur, 8)?);
        let mut records = BTreeMap::new();
        for _ in 0..count {
            let key = field(&mut cur)?;
            let key = std::str::from_utf8(key)
                .map_err(|_| SnapshotError::Damaged("a key is not UTF-8".into()))?
                .to_string();
            let value = field(&mut cur)?.to_vec();
            check_record(&key, &value)?;
            records.insert(key, value);
        }
        if !cur.is_empty() {
            return Err(SnapshotError::Damaged(format!(
                "{} bytes after the last record",
                cur.len()
            )));
        }
        Ok(Snapshot { revision, records })
    }
}

fn take<'a>(cur: &mut &'a [u8], n: usize) -> Result<&'a [u8], SnapshotError> {
    if cur.len() < n {
        return Err(SnapshotError::Damaged("a record is cut short".into()));
    }
    let (head, rest) = cur.split_at(n);
    *cur = rest;
    Ok(head)
}

fn u64_le(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn field<'a>(cur: &mut &'a [u8]) -> Result<&'a [u8], SnapshotError> {
    let len = take(cur, 4)?;
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
    if len > MAX_FIELD {
        return Err(SnapshotError::Damaged(format!("a field of {len} bytes")));
    }
    take(cur, len as usize)
}

/// A record the registry could load: a known key shape with a value that decodes.
fn check_record(key: &str, value: &[u8]) -> Result<(), SnapshotError> {
    let bad = |e: StoreError| SnapshotError::Damaged(e.to_string());
    match codec::parse_key(key).map_err(bad)? {
        codec::Key::Spec(..) => codec::decode_spec(key, value).map(drop).map_err(bad),
        codec::Key::Status(..) => codec::decode_status(key, value).map(drop).map_err(bad),
        codec::Key::Service(..) => codec::decode_service(key, value).map(drop).map_err(bad),
        codec::Key::Token => codec::decode_token(key, value).map(drop).map_err(bad),
        codec::Key::Policy => codec::decode_v1::<sextant_model::acl::Policy>(key, value)
            .map(drop)
            .map_err(bad),
        codec::Key::Bootstrap => codec::decode_v1::<u64>(key, value).map(drop).map_err(bad),
        codec::Key::Audit => codec::decode_v1::<sextant_model::acl::AuditEntry>(key, value)
            .map(drop)
            .map_err(bad),
    }
}

/// Writes `snapshot` into `store`, which must be empty, as one batch at the snapshot's
/// revision (a store that splits batches, like etcd's, splits it).
pub async fn restore(store: Arc<dyn Store>, snapshot: Snapshot) -> Result<(), SnapshotError> {
    let reader = store.clone();
    let (revision, keys) = tokio::task::spawn_blocking(move || {
        let mut keys = 0;
        reader
            .load(&mut |_, _| {
                keys += 1;
                Ok(())
            })
            .map(|r| (r, keys))
    })
    .await
    .map_err(|e| StoreError::Io(format!("the store's load stopped: {e}")))??;
    if revision != 0 || keys != 0 {
        return Err(SnapshotError::NotEmpty { revision, keys });
    }
    let batch = Batch {
        // A registry at revision 0 has no records; committing at 1 keeps the store's
        // "revision of the last batch" meaningful.
        revision: snapshot.revision.max(1),
        mutations: snapshot
            .records
            .into_iter()
            .map(|(key, value)| Mutation {
                key,
                value: Some(value),
            })
            .collect(),
        ..Batch::default()
    };
    store.commit(batch).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;

    fn sample() -> Snapshot {
        let mut records = BTreeMap::new();
        records.insert(
            "s/ns/svc".to_string(),
            codec::encode_service(&codec::ServiceRecord {
                revision: 7,
                config: Default::default(),
            }),
        );
        Snapshot {
            revision: 7,
            records,
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let s = sample();
        let bytes = s.to_bytes();
        assert_eq!(Snapshot::from_bytes(&bytes).unwrap(), s);
        for i in [0, MAGIC.len() + 3, bytes.len() / 2, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Snapshot::from_bytes(&b).is_err(), "byte {i} flipped");
        }
        assert!(Snapshot::from_bytes(&bytes[..bytes.len() - 3]).is_err());
        // A well-formed file holding a record the registry cannot load is refused too.
        let mut junk = sample();
        junk.records.insert("s/ns/other".into(), vec![9, 9]);
        assert!(matches!(
            Snapshot::from_bytes(&junk.to_bytes()),
            Err(SnapshotError::Damaged(_))
        ));
    }

    /// A registry restored from its snapshot is the same registry: instances, statuses,
    /// settings and revisions.
    #[tokio::test]
    async fn a_restored_registry_is_the_same() {
        use crate::{CoreConfig, CoreMetrics, Registry};
        use sextant_model::{InstanceSpec, Registration, ServiceKey, StatusPatch};
        let open = |store: Arc<dyn Store>| async move {
            Registry::open(store, CoreConfig::default(), CoreMetrics::default())
                .await
                .unwrap()
        };
        let r = open(Arc::new(MemStore::new())).await;
        let key = ServiceKey::new("ns", "svc").unwrap();
        for (i, ttl) in [(1u16, 0u32), (2, 30)] {
            r.register(Registration {
                service: key.clone(),
                spec: InstanceSpec {
                    port: i,
                    ..crate::tests::spec(&format!("i{i}"))
                },
                status: None,
                ttl_seconds: ttl,
            })
            .await
            .unwrap();
        }
        r.update_status(
            key.clone(),
            "i1".into(),
            StatusPatch {
                enabled: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let snap = Snapshot::from_bytes(&r.snapshot().to_bytes()).unwrap();
        assert_eq!(snap.revision, r.revision());
        assert_eq!(snap.counts(), (1, 2));
        let target: Arc<dyn Store> = Arc::new(MemStore::new());
        restore(target.clone(), snap).await.unwrap();
        let back = open(target).await;
        assert_eq!(back.revision(), r.revision());
        let (a, b) = (r.get(&key, false), back.get(&key, false));
        assert_eq!(a.revision, b.revision);
        assert_eq!(a.instances, b.instances);
    }

    #[tokio::test]
    async fn restores_only_into_an_empty_store() {
        let mem = Arc::new(MemStore::new());
        let store: Arc<dyn Store> = mem.clone();
        restore(store.clone(), sample()).await.unwrap();
        assert_eq!(mem.len(), 1);
        let err = restore(store, sample()).await.unwrap_err();
        assert!(
            matches!(err, SnapshotError::NotEmpty { keys: 1, .. }),
            "{err}"
        );
    }
}
