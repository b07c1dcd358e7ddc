//! An incremental parser of `text/event-stream` bodies, the framing of the native HTTP watch
//! (`GET /v1/watch`). The SDK's own watch does not use it; it is here so that every Rust reader
//! of the HTTP watch (the `sextant watch` command, the integration tests, the bench) parses it
//! the same way from one dependency that knows nothing of the server. It does no I/O: feed it
//! the body's chunks as they arrive, however they are split.

/// One server-sent event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frame {
    /// The `event:` field (`snapshot`, `upsert`, `status`, `delete`, `sync`, `close`).
    pub event: String,
    /// The `id:` field as sent (the watch puts a revision there, on a delivery's last frame).
    pub id: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
    /// Names of fields other than `event`, `id`, `data` and `retry`: ignored as the SSE
    /// standard says, but kept so that a test can insist there are none.
    pub unknown_fields: Vec<String>,
}

impl Frame {
    /// The `id:` as a revision, if it is one.
    pub fn revision_id(&self) -> Option<u64> {
        self.id.as_deref()?.parse().ok()
    }
}

/// Collects chunks until a blank line ends a frame. Comment lines (`:` keepalives) are skipped,
/// and a frame made only of comments yields nothing.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for the end of a frame (less one, for a split "\n\n"),
    /// so that a large frame arriving in many chunks is not rescanned from its start each time.
    scanned: usize,
}

impl SseParser {
    /// An empty parser, at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `chunk` and appends every frame it completes to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Frame>) {
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        let mut from = self.scanned;
        while let Some(end) = find(&self.buf[from..], b"\n\n").map(|e| from + e) {
            if let Some(f) = parse_frame(&self.buf[start..end]) {
                out.push(f);
            }
            start = end + 2;
            from = start;
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len().saturating_sub(1);
    }

    /// Bytes received that do not yet make a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

fn parse_frame(raw: &[u8]) -> Option<Frame> {
    let mut f = Frame::default();
    let mut any = false;
    for line in String::from_utf8_lossy(raw).lines() {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (k, v) = line.split_once(':').unwrap_or((line, ""));
        let v = v.strip_prefix(' ').unwrap_or(v);
        any = true;
        match k {
            "event" => f.event = v.to_string(),
            "id" => f.id = Some(v.to_string()),
            "data" => {
                if !f.data.is_empty() {
                    f.data.push('\n');
                }
                f.data.push_str(v);
            }
            "retry" => {}
            other => f.unknown_fields.push(other.to_string()),
        }
    }
    any.then_some(f)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_come_out_whole() {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        p.push(
            b"event: status\nid: 7\ndata: {\"a\":1}\n\n: keepalive\n\nevent: sta",
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].event, "status");
        assert_eq!(out[0].revision_id(), Some(7));
        assert_eq!(out[0].data, "{\"a\":1}");
        p.push(b"tus\nid: 8\ndata: {}\n", &mut out);
        assert_eq!(out.len(), 1);
        p.push(b"\n", &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].revision_id(), Some(8));
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn data_lines_join_and_unknown_fields_are_reported() {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        p.push(b"data: a\ndata: b\nflavour: x\nid: n/a\n\n", &mut out);
        assert_eq!(out[0].data, "a\nb");
        assert_eq!(out[0].unknown_fields, ["flavour"]);
        assert_eq!(out[0].id.as_deref(), Some("n/a"));
        assert_eq!(out[0].revision_id(), None);
    }
}
