//! The write-ahead log: numbered segment files of framed, checksummed batches.
//!
//! A commit appends one record and `fdatasync`s the segment: one small sequential write, which
//! costs this kind of disk about half of a redb commit (that rewrites B-tree pages spread over
//! the file). The checkpointer later folds whole segments into redb and deletes them.
//!
//! Record: `len: u32 LE`, `crc32(payload): u32 LE`, `payload`. Payload: `revision: u64`,
//! `count: u32`, then per mutation `key_len: u32`, key bytes, `tag: u8` (0 remove, 1 put) and for
//! a put `value_len: u32` and the value. A record that does not check out ends the segment: only
//! the newest segment may end that way (a write the crash cut short was never acknowledged).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sextant_core::store::{Batch, StoreError};

const HEADER: usize = 8;
/// Larger than any batch the core builds (its batches are bounded by `max_batch_ops`); a length
/// beyond this is a torn or corrupt header, not a record to allocate for.
pub const MAX_RECORD: usize = 1 << 30;

/// Encodes a batch as one framed record. A batch too large to be read back (over
/// [`MAX_RECORD`]) is refused rather than written.
pub fn encode(batch: &Batch) -> Result<Vec<u8>, StoreError> {
    let size: usize = batch
        .mutations
        .iter()
        .map(|m| 9 + m.key.len() + m.value.as_ref().map_or(0, Vec::len))
        .sum();
    let mut out = Vec::with_capacity(HEADER + 12 + size);
    out.extend_from_slice(&[0; HEADER]);
    out.extend_from_slice(&batch.revision.to_le_bytes());
    out.extend_from_slice(&(batch.mutations.len() as u32).to_le_bytes());
    for m in &batch.mutations {
        out.extend_from_slice(&(m.key.len() as u32).to_le_bytes());
        out.extend_from_slice(m.key.as_bytes());
        match &m.value {
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                out.extend_from_slice(v);
            }
            None => out.push(0),
        }
    }
    let len = out.len() - HEADER;
    if len > MAX_RECORD {
        return Err(StoreError::Unavailable(format!(
            "a batch of {len} bytes is larger than a log record may be ({MAX_RECORD})"
        )));
    }
    let crc = crc32fast::hash(&out[HEADER..]);
    out[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Why a record could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum Torn {
    /// Fewer bytes than a header or than the header's length.
    Short,
    /// A length of zero or beyond any record.
    BadLength(usize),
    Checksum,
    /// The checksum held but the payload does not parse: written wrong, not torn.
    Malformed(&'static str),
}

/// One record, read in place: keys and values borrow from the segment's bytes, so a checkpoint
/// of the whole log allocates nothing per mutation.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub revision: u64,
    /// `(key, Some(value))` puts, `(key, None)` removes.
    pub mutations: Vec<(&'a str, Option<&'a [u8]>)>,
}

/// Reads the records of one segment: the records in order, the length of the valid prefix and,
/// when the segment does not end cleanly after it, why.
pub fn parse_all(bytes: &[u8]) -> (Vec<Record<'_>>, usize, Option<Torn>) {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match parse_one(&bytes[at..]) {
            Ok((record, used)) => {
                records.push(record);
                at += used;
            }
            Err(t) => return (records, at, Some(t)),
        }
    }
    (records, at, None)
}

/// Reads one record written by [`encode`] in this process (the log held in memory), which
/// cannot be torn: an error here means memory was damaged.
pub fn parse_whole(bytes: &[u8]) -> Result<Record<'_>, Torn> {
    match parse_one(bytes)? {
        (r, used) if used == bytes.len() => Ok(r),
        _ => Err(Torn::Malformed("bytes after the record")),
    }
}

fn parse_one(bytes: &[u8]) -> Result<(Record<'_>, usize), Torn> {
    if bytes.len() < HEADER {
        return Err(Torn::Short);
    }
    let len = u32_at(bytes, 0) as usize;
    if !(12..=MAX_RECORD).contains(&len) {
        return Err(Torn::BadLength(len));
    }
    let payload = bytes.get(HEADER..HEADER + len).ok_or(Torn::Short)?;
    if crc32fast::hash(payload) != u32_at(bytes, 4) {
        return Err(Torn::Checksum);
    }
    let mut r = Reader(payload);
    let revision = r.u64().ok_or(Torn::Malformed("revision"))?;
    let count = r.u32().ok_or(Torn::Malformed("count"))? as usize;
    // Each mutation takes at least 5 bytes, so a count beyond that is malformed, not a reason
    // to reserve memory.
    if count > payload.len() / 5 {
        return Err(Torn::Malformed("count"));
    }
    let mut mutations = Vec::with_capacity(count);
    for _ in 0..count {
        let klen = r.u32().ok_or(Torn::Malformed("key length"))? as usize;
        let key = r.bytes(klen).ok_or(Torn::Malformed("key"))?;
        let key = std::str::from_utf8(key).map_err(|_| Torn::Malformed("key is not UTF-8"))?;
        let value = match r.u8().ok_or(Torn::Malformed("tag"))? {
            0 => None,
            1 => {
                let vlen = r.u32().ok_or(Torn::Malformed("value length"))? as usize;
                Some(r.bytes(vlen).ok_or(Torn::Malformed("value"))?)
            }
            _ => return Err(Torn::Malformed("tag")),
        };
        mutations.push((key, value));
    }
    if !r.0.is_empty() {
        return Err(Torn::Malformed("trailing bytes"));
    }
    Ok((
        Record {
            revision,
            mutations,
        },
        HEADER + len,
    ))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.bytes(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }
}

/// The segment files of a WAL directory, by number.
pub fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let entries = fs::read_dir(dir)
        .map_err(|e| StoreError::disk(format!("cannot list {}", dir.display()), e))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| StoreError::disk(format!("cannot list {}", dir.display()), e))?;
        let name = entry.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((seq, entry.path()));
    }
    out.sort();
    Ok(out)
}

pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

/// Reads a whole segment file.
pub fn read_segment(path: &Path) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| StoreError::disk(format!("cannot read {}", path.display()), e))?;
    Ok(bytes)
}

/// Makes a directory entry (a created or removed file) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The segment being appended to.
pub struct Segment {
    pub seq: u64,
    file: File,
    /// Bytes of whole, synced records: a failed append is cut back to here.
    len: u64,
}

impl Segment {
    /// Creates segment `seq` (empty) and makes its directory entry durable.
    pub fn create(dir: &Path, seq: u64) -> io::Result<Segment> {
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(segment_path(dir, seq))?;
        sync_dir(dir)?;
        Ok(Segment { seq, file, len: 0 })
    }

    /// Appends one encoded record and returns once it is on disk. On failure the segment is
    /// cut back to its last whole record, so that a later record is never stranded behind a
    /// partial one; if even that fails, the error says so and the segment must not be used.
    pub fn append(&mut self, record: &[u8]) -> Result<(), AppendError> {
        let res = self
            .file
            .write_all(record)
            .and_then(|()| self.file.sync_data());
        match res {
            Ok(()) => {
                self.len += record.len() as u64;
                Ok(())
            }
            Err(e) => match self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data())
            {
                Ok(()) => Err(AppendError::Failed(e)),
                Err(e2) => Err(AppendError::Broken(e, e2)),
            },
        }
    }
}

pub enum AppendError {
    /// Not written; the segment is as before.
    Failed(io::Error),
    /// Not written, and the segment could not be cut back.
    Broken(io::Error, io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sextant_core::model::Revision;

    use sextant_core::store::Mutation;

    fn batch(revision: Revision, n: usize) -> Batch {
        Batch {
            revision,
            mutations: (0..n)
                .map(|i| Mutation {
                    key: format!("k{revision}-{i}"),
                    value: (i % 3 != 0).then(|| vec![i as u8; i]),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn records_round_trip_and_a_cut_tail_is_reported() {
        let batches = [batch(1, 0), batch(2, 5), batch(9, 40)];
        let mut bytes = Vec::new();
        for b in &batches {
            bytes.extend(encode(b).unwrap());
        }
        let (got, used, torn) = parse_all(&bytes);
        assert_eq!((got.len(), used, torn), (3, bytes.len(), None));
        for (g, b) in got.iter().zip(&batches) {
            let want: Vec<(&str, Option<&[u8]>)> = b
                .mutations
                .iter()
                .map(|m| (m.key.as_str(), m.value.as_deref()))
                .collect();
            assert_eq!((g.revision, &g.mutations), (b.revision, &want));
        }
        let one = encode(&batches[1]).unwrap();
        assert_eq!(parse_whole(&one).unwrap().revision, 2);
        assert!(parse_whole(&bytes).is_err());
        let whole = bytes.len() - encode(&batches[2]).unwrap().len();
        for cut in [bytes.len() - 1, whole + 3, whole + 20] {
            let (got, used, torn) = parse_all(&bytes[..cut]);
            assert_eq!((got.len(), used), (2, whole));
            assert!(torn.is_some());
        }
        let mut flipped = bytes.clone();
        flipped[whole + 30] ^= 1;
        assert_eq!(parse_all(&flipped).2, Some(Torn::Checksum));
        // A zeroed tail (a preallocated or half-written block) is a bad length, not a record.
        let mut zeros = bytes.clone();
        zeros.extend([0; 64]);
        assert_eq!(parse_all(&zeros).2, Some(Torn::BadLength(0)));
    }

    proptest! {
        /// Any prefix of a segment decodes to the whole records in it, in order, and nothing
        /// else: what a crash at any byte leaves is read back as the acknowledged prefix.
        #[test]
        fn any_cut_yields_the_whole_records_before_it(
            sizes in proptest::collection::vec(0usize..20, 1..8),
            cut_frac in 0.0f64..=1.0,
        ) {
            let mut bytes = Vec::new();
            let mut ends = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                bytes.extend(encode(&batch(i as u64 + 1, *n)).unwrap());
                ends.push(bytes.len());
            }
            let cut = (bytes.len() as f64 * cut_frac) as usize;
            let (got, used, torn) = parse_all(&bytes[..cut]);
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            prop_assert_eq!(got.len(), whole);
            prop_assert_eq!(used, if whole == 0 { 0 } else { ends[whole - 1] });
            prop_assert_eq!(torn.is_none(), used == cut);
            for (i, b) in got.iter().enumerate() {
                prop_assert_eq!(b.revision, i as u64 + 1);
            }
        }
    }

    /// Re-encodes parsed records, to compare with the bytes they were read from.
    fn reencode(records: &[Record<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            let batch = Batch {
                revision: r.revision,
                mutations: r
                    .mutations
                    .iter()
                    .map(|(k, v)| Mutation {
                        key: k.to_string(),
                        value: v.map(<[u8]>::to_vec),
                    })
                    .collect(),
                ..Default::default()
            };
            out.extend(encode(&batch).unwrap());
        }
        out
    }

    /// Garbage that sometimes looks like a header: a plausible length, a zeroed block.
    fn garbage() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 1..300),
            (12u32..200, proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(len, rest)| {
                let mut b = len.to_le_bytes().to_vec();
                b.extend(rest);
                b
            }),
            (1usize..64).prop_map(|n| vec![0; n]),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic the reader; what it accepts is exactly a run of whole
        /// records (they re-encode to the bytes they came from), and anything else is reported.
        #[test]
        fn arbitrary_bytes_read_as_whole_records_or_a_reason(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (got, used, torn) = parse_all(&bytes);
            prop_assert!(used <= bytes.len());
            prop_assert_eq!(torn.is_none(), used == bytes.len());
            prop_assert_eq!(reencode(&got), bytes[..used].to_vec());
            let _ = parse_whole(&bytes);
        }

        /// Valid records followed by garbage (a torn tail) read back as exactly those records,
        /// and the garbage is reported.
        #[test]
        fn a_torn_tail_leaves_the_valid_prefix(
            sizes in proptest::collection::vec(0usize..12, 0..6),
            tail in garbage(),
        ) {
            let mut bytes = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                bytes.extend(encode(&batch(i as u64 + 1, *n)).unwrap());
            }
            let valid = bytes.len();
            bytes.extend(&tail);
            let (got, used, torn) = parse_all(&bytes);
            prop_assert_eq!(got.len(), sizes.len());
            prop_assert_eq!(used, valid);
            prop_assert!(torn.is_some());
        }
    }
}
