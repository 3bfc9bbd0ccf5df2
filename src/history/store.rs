//! The node's history files: per partition, numbered segments of framed blocks, a sparse
//! in-memory index, retention by whole segments.
//!
//! `<data-dir>/history/<partition>/<epoch>-<seq>.hist` (hex), named by the segment's
//! first position. A segment starts with a header frame (`LHS1`, then the position
//! before its first block, if any), then blocks. One thread appends (the persister for
//! this node's own partitions; the replication and hand-off handlers for others'), any
//! task reads: a partition's mutex guards its segment list and is held only to find
//! offsets, never across file reads.
//!
//! Appends are `write`s, synced by [`HistoryStore::sync`] every second or so rather than
//! per commit: a killed process loses nothing (the page cache keeps it); a machine that
//! loses power loses up to that second of history on this node, which its replicas hold.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use hashbrown::HashMap;
use tokio::sync::watch;
use tracing::{info, warn};

use super::Pos;
use super::codec::{
    BlockHead, CodecError, Entry, HistFix, RawEvent, RawEventRecord, RawRecord, STARTS_SEGMENT, block_head, decode_any,
    decode_block, encode_block, encode_event_block, frame, frames, put_varint, raw_entries,
};
use crate::keys::PARTITIONS;

/// A segment is closed once it holds this many bytes.
const SEGMENT_BYTES: u64 = 16 << 20;
/// A sparse index mark every this many bytes of a segment.
const MARK_EVERY: u64 = 4096;
/// Bytes read from a file per call.
const READ_CHUNK: usize = 1 << 20;
/// By default, at most this much of a partition's history travels inside a hand-off's
/// pull (older segments are copied after it): a pull of 8 partitions stays well within
/// the hand-off's message limit.
pub const EXPORT_MAX: usize = 16 << 20;

const HEADER_MAGIC: &[u8; 4] = b"LHS1";
/// A raw fix entry is at least this long (a state change, rarer, may be shorter and
/// grow the vector once).
const MIN_RAW_FIX: usize = 42;
/// Bytes of a copied segment a node takes at most (a segment is cut at 16 MiB, plus its
/// last block).
pub const MAX_COPIED_SEGMENT: usize = 64 << 20;
/// A segment copied from another node is written under this suffix, then renamed.
const TMP_SUFFIX: &str = ".hist.tmp";

/// How long history is kept, and how segments are cut.
#[derive(Clone, Copy, Debug)]
pub struct HistoryConfig {
    pub retention_ms: i64,
    /// At most this many bytes of a partition's history go inside a pull
    /// ([`HistoryStore::export`]; [`EXPORT_MAX`] by default).
    pub pull_max: usize,
}

impl HistoryConfig {
    /// A segment spans at most this long, so retention frees space in eighths.
    fn segment_span_ms(&self) -> i64 {
        (self.retention_ms / 8).max(60_000)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history IO on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("history data: {0}")]
    Corrupt(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HistoryError + '_ {
    move |source| HistoryError::Io { path: path.to_path_buf(), source }
}

/// A consumer asked for fixes after `cursor`, but the partition's history no longer
/// reaches back that far: everything up to `oldest` is gone (retention, or a replica that
/// started later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Behind {
    pub partition: u16,
    pub cursor: Pos,
    /// The earliest cursor this partition can resume from.
    pub oldest: Pos,
    /// Older history is being copied here right now: ask again shortly.
    pub filling: bool,
}

/// One state change as the history keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct HistEvent {
    pub pos: Pos,
    /// 1: driver, 2: trip.
    pub entity: u8,
    pub id: Arc<str>,
    pub state: Arc<str>,
    /// `None` for a new entity.
    pub from_state: Option<Arc<str>>,
    pub timestamp_ms: i64,
    pub lat_e7: i32,
    pub lon_e7: i32,
}

/// What [`HistoryStore::read_after`] found.
#[derive(Debug, Default)]
pub struct Page {
    pub fixes: Vec<HistFix>,
    /// State changes, in order (their positions interleave with the fixes').
    pub events: Vec<HistEvent>,
    /// The position the read covered up to (the consumer's next cursor), if any.
    pub upto: Option<Pos>,
    /// More is there to read.
    pub more: bool,
}

/// A sparse index entry: a block starts at `offset`.
#[derive(Clone, Copy, Debug)]
struct Mark {
    offset: u64,
    first: Pos,
    received_ms: i64,
}

/// The parts of a segment a reader may use without the partition's lock.
struct Shared {
    path: PathBuf,
    names: RwLock<Vec<Arc<str>>>,
}

struct Seg {
    shared: Arc<Shared>,
    /// Open for appending (the last segment only).
    file: Option<File>,
    last: Pos,
    len: u64,
    min_recv: i64,
    max_recv: i64,
    marks: Vec<Mark>,
    /// Name → index, kept for the segment being appended to.
    index: HashMap<Arc<str>, u64>,
}

#[derive(Default)]
struct Part {
    segs: Vec<Seg>,
    /// Everything at or before this position is gone (or was never here).
    floor: Option<Pos>,
    last: Option<Pos>,
    /// The epoch this node serves the partition at (its appends are stamped with it).
    epoch: u64,
    /// Written since the last sync.
    dirty: bool,
    /// Replicated blocks are dropped until one starts a segment (after a gap or reset).
    resync: bool,
    /// Cut a new segment at the next local append (a replica needs its names from it).
    cut: bool,
    /// Older segments are being copied in from another node.
    filling: bool,
}

/// Per-partition history of every accepted fix on this node (owned or replicated).
pub struct HistoryStore {
    dir: PathBuf,
    cfg: HistoryConfig,
    parts: Vec<Mutex<Part>>,
    changed: watch::Sender<u64>,
    /// Segments closed since the last sync, still to be synced (by the upkeep thread,
    /// not the appender: a hand-off cuts hundreds of segments at once).
    closed: Mutex<Vec<File>>,
    /// Copied segments written so far (names their temporary files apart).
    copies: std::sync::atomic::AtomicU64,
}

/// Files to sync at once from which one `syncfs` is cheaper than one sync each.
const SYNCFS_FROM: usize = 8;

/// Flushes the whole filesystem holding `f` (Linux `syncfs`, which reports write-back
/// errors since Linux 5.8); whether it did.
fn sync_filesystem(f: &File) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; syncfs only reads it.
        if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
            return true;
        }
        warn!(error = %std::io::Error::last_os_error(), "history syncfs failed; syncing file by file");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = f;
    false
}

fn seg_name(first: Pos) -> String {
    format!("{:016x}-{:016x}.hist", first.epoch, first.seq)
}

fn parse_seg_name(name: &str) -> Option<Pos> {
    let stem = name.strip_suffix(".hist")?;
    let (e, s) = stem.split_once('-')?;
    Some(Pos { epoch: u64::from_str_radix(e, 16).ok()?, seq: u64::from_str_radix(s, 16).ok()? })
}

fn header(prev: Option<Pos>) -> Vec<u8> {
    let mut b = HEADER_MAGIC.to_vec();
    match prev {
        Some(p) => {
            b.push(1);
            put_varint(&mut b, p.epoch);
            put_varint(&mut b, p.seq);
        }
        None => b.push(0),
    }
    frame(&b)
}

fn parse_header(body: &[u8]) -> Option<Option<Pos>> {
    let rest = body.strip_prefix(HEADER_MAGIC)?;
    let mut r = super::codec::Reader { b: rest, at: 0 };
    match r.take(1)?[0] {
        0 => Some(None),
        _ => Some(Some(Pos { epoch: r.varint()?, seq: r.varint()? })),
    }
}

impl Seg {
    /// Registers a block appended at `offset`.
    fn note(&mut self, offset: u64, head: &BlockHead, frame_len: u64) {
        let need_mark = self.marks.last().is_none_or(|m| offset - m.offset >= MARK_EVERY);
        if need_mark {
            self.marks.push(Mark { offset, first: head.first, received_ms: head.base_received_ms });
        }
        self.min_recv = self.min_recv.min(head.base_received_ms);
        self.last = head.last();
        self.len = offset + frame_len;
    }

    fn add_names(&mut self, names: &[&str]) {
        let mut table = self.shared.names.write().expect("names lock");
        for n in names {
            let a: Arc<str> = Arc::from(*n);
            if self.file.is_some() {
                self.index.insert(a.clone(), table.len() as u64);
            }
            table.push(a);
        }
    }
}

/// A segment file read back: the segment (closed), the position before its first block
/// (its header's, if the header is whole), how many leading bytes are whole frames, and
/// what cut the rest.
struct Parsed {
    seg: Seg,
    prev: Option<Option<Pos>>,
    good: u64,
    torn: Option<CodecError>,
}

/// Reads a segment file's frames (`first`: the position its name gives).
fn parse_segment(path: PathBuf, first: Pos, bytes: &[u8]) -> Parsed {
    let mut seg = Seg {
        shared: Arc::new(Shared { path, names: RwLock::new(Vec::new()) }),
        file: None,
        last: first,
        len: 0,
        min_recv: i64::MAX,
        max_recv: i64::MIN,
        marks: Vec::new(),
        index: HashMap::new(),
    };
    let (mut prev, mut good, mut torn) = (None, 0u64, None);
    for f in frames(bytes) {
        let (offset, body) = match f {
            Ok(x) => x,
            Err(e) => {
                torn = Some(e);
                break;
            }
        };
        if offset == 0
            && let Some(p) = parse_header(body)
        {
            prev = Some(p);
            good = (body.len() + 8) as u64;
            seg.len = good;
            continue;
        }
        let Some((head, names, max)) = block_time(body) else {
            torn = Some(CodecError::Malformed(offset));
            break;
        };
        seg.add_names(&names);
        seg.note(offset as u64, &head, (body.len() + 8) as u64);
        seg.max_recv = seg.max_recv.max(max);
        good = seg.len;
    }
    Parsed { seg, prev, good, torn }
}

impl HistoryStore {
    /// Opens (and loads) the history under `dir`.
    pub fn open(dir: &Path, cfg: HistoryConfig) -> Result<HistoryStore, HistoryError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let parts: Vec<Mutex<Part>> = (0..PARTITIONS).map(|_| Mutex::new(Part::default())).collect();
        let store = HistoryStore {
            dir: dir.to_path_buf(),
            cfg,
            parts,
            changed: watch::channel(0).0,
            closed: Mutex::new(Vec::new()),
            copies: std::sync::atomic::AtomicU64::new(0),
        };
        let (mut segs, mut bytes) = (0usize, 0u64);
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u16>().ok()).filter(|p| *p < PARTITIONS) else {
                continue;
            };
            let mut part = store.parts[p as usize].lock().expect("history lock");
            store.load(p, &mut part)?;
            segs += part.segs.len();
            bytes += part.segs.iter().map(|s| s.len).sum::<u64>();
        }
        if segs > 0 {
            info!(segments = segs, bytes, "history loaded");
        }
        Ok(store)
    }

    fn part_dir(&self, p: u16) -> PathBuf {
        self.dir.join(format!("{p:04}"))
    }

    /// Reads a partition's segments from disk (at startup).
    fn load(&self, p: u16, part: &mut Part) -> Result<(), HistoryError> {
        let dir = self.part_dir(p);
        let mut files: Vec<(Pos, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name();
            let name = name.to_str().unwrap_or_default();
            if let Some(first) = parse_seg_name(name) {
                files.push((first, e.path()));
            } else if name.ends_with(TMP_SUFFIX) {
                // A copy cut short by a crash.
                let _ = std::fs::remove_file(e.path());
            }
        }
        files.sort();
        for (i, (first, path)) in files.iter().enumerate() {
            let bytes = std::fs::read(path).map_err(io(path))?;
            let Parsed { seg, prev, good, torn } = parse_segment(path.clone(), *first, &bytes);
            if i == 0
                && let Some(prev) = prev
            {
                part.floor = prev;
            }
            if let Some(e) = torn {
                warn!(file = %path.display(), valid_bytes = good, error = %e, "history: torn tail cut");
                let f = OpenOptions::new().write(true).open(path).map_err(io(path))?;
                f.set_len(good).map_err(io(path))?;
            }
            if seg.marks.is_empty() {
                // Nothing but a header: drop the file.
                let _ = std::fs::remove_file(path);
                continue;
            }
            part.last = Some(seg.last);
            part.epoch = part.epoch.max(seg.last.epoch);
            part.segs.push(seg);
        }
        // Appends go to a fresh segment (the names index of the old one is not kept).
        part.cut = true;
        Ok(())
    }

    /// Wakes readers waiting for new history.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// This node serves `partition` at `epoch`: its appends are stamped with it.
    pub fn serve(&self, partition: u16, epoch: u64) {
        let mut part = self.parts[partition as usize].lock().expect("history lock");
        if epoch > part.epoch {
            part.epoch = epoch;
        }
    }

    /// The next local append of `partition` starts a segment (a new replica needs a
    /// block that carries its names from the start).
    pub fn cut(&self, partition: u16) {
        self.parts[partition as usize].lock().expect("history lock").cut = true;
    }

    /// The last position of a partition's history, if any.
    pub fn last(&self, partition: u16) -> Option<Pos> {
        self.parts[partition as usize].lock().expect("history lock").last
    }

    /// The oldest cursor a partition can resume from (`None`: from the start).
    pub fn floor(&self, partition: u16) -> Option<Pos> {
        self.parts[partition as usize].lock().expect("history lock").floor
    }

    /// Appends a shard commit's raw entries, one block per partition; returns the
    /// framed blocks (for the partitions' replicas).
    pub fn append_local(&self, raw: &[u8]) -> Vec<(u16, Vec<u8>)> {
        if raw.is_empty() {
            return Vec::new();
        }
        // Sized once (for fixes), and ordered by partition through indices: an entry is
        // a few dozen bytes, an index four.
        let mut entries: Vec<Entry<'_>> = Vec::with_capacity(raw.len() / MIN_RAW_FIX + 1);
        entries.extend(raw_entries(raw));
        let mut order: Vec<u32> = (0..entries.len() as u32).collect();
        order.sort_by_key(|&i| entries[i as usize].partition());
        let mut out = Vec::new();
        let mut group: Vec<Entry<'_>> = Vec::new();
        for idx in order.chunk_by(|a, b| entries[*a as usize].partition() == entries[*b as usize].partition()) {
            group.clear();
            group.extend(idx.iter().map(|&i| entries[i as usize]));
            let p = group[0].partition();
            let mut part = self.parts[p as usize].lock().expect("history lock");
            // One block per run of fixes or of state changes, in order.
            for run in group.chunk_by(|a, b| a.is_event() == b.is_event()) {
                match self.append_group(p, &mut part, run) {
                    Ok(block) => out.push((p, block)),
                    Err(e) => {
                        warn!(partition = p, error = %e, "history append failed");
                        metrics::counter!("locus_history_errors_total").increment(1);
                    }
                }
            }
        }
        self.notify();
        out
    }

    /// Appends a run of entries of one kind as one block.
    fn append_group(&self, p: u16, part: &mut Part, group: &[Entry<'_>]) -> Result<Vec<u8>, HistoryError> {
        let newest = group.iter().map(Entry::time_ms).max().unwrap_or(0);
        let first =
            Pos { epoch: part.epoch.max(part.last.map_or(0, |l| l.epoch)), seq: part.last.map_or(0, |l| l.seq + 1) };
        let span = self.cfg.segment_span_ms();
        let roll = part.cut
            || part
                .segs
                .last()
                .is_none_or(|s| s.file.is_none() || s.len >= SEGMENT_BYTES || newest - s.min_recv >= span);
        if roll {
            self.start_segment(p, part, first)?;
            part.cut = false;
        }
        let seg = part.segs.last_mut().expect("a segment");
        let mut fresh: Vec<Arc<str>> = Vec::new();
        let next = seg.shared.names.read().expect("names lock").len() as u64;
        let block = {
            let index = &seg.index;
            let mut lookup = |name: &str| -> (u64, bool) {
                if let Some(i) = index.get(name) {
                    return (*i, false);
                }
                if let Some(i) = fresh.iter().position(|f| &**f == name) {
                    return (next + i as u64, false);
                }
                fresh.push(Arc::from(name));
                (next + fresh.len() as u64 - 1, true)
            };
            let flags = if roll { STARTS_SEGMENT } else { 0 };
            if group[0].is_event() {
                let events: Vec<RawEvent<'_>> =
                    group.iter().filter_map(|e| if let Entry::Event(x) = e { Some(*x) } else { None }).collect();
                encode_event_block(flags, first, &events, &mut lookup)
            } else {
                let fixes: Vec<_> =
                    group.iter().filter_map(|e| if let Entry::Fix(x) = e { Some(*x) } else { None }).collect();
                encode_block(flags, first, &fixes, &mut lookup)
            }
        };
        let file = seg.file.as_mut().expect("the last segment is open");
        file.write_all(&block).map_err(io(&seg.shared.path))?;
        {
            let mut table = seg.shared.names.write().expect("names lock");
            for n in fresh {
                seg.index.insert(n.clone(), table.len() as u64);
                table.push(n);
            }
        }
        let head = block_head(&block[8..]).expect("just encoded").0;
        let offset = seg.len;
        seg.note(offset, &head, block.len() as u64);
        seg.max_recv = seg.max_recv.max(newest);
        part.last = Some(head.last());
        part.dirty = true;
        let what = if group[0].is_event() { "events" } else { "fixes" };
        metrics::counter!("locus_history_entries_total", "kind" => what).increment(group.len() as u64);
        metrics::counter!("locus_history_bytes_total").increment(block.len() as u64);
        Ok(block)
    }

    /// Closes the last segment and opens a new one whose first position is `first`.
    fn start_segment(&self, p: u16, part: &mut Part, first: Pos) -> Result<(), HistoryError> {
        if let Some(s) = part.segs.last_mut()
            && let Some(f) = s.file.take()
        {
            self.closed.lock().expect("closed lock").push(f);
            s.index = HashMap::new();
        }
        let dir = self.part_dir(p);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(seg_name(first));
        let mut f = OpenOptions::new().create(true).truncate(true).write(true).open(&path).map_err(io(&path))?;
        let h = header(part.last.or(part.floor));
        f.write_all(&h).map_err(io(&path))?;
        part.segs.push(Seg {
            shared: Arc::new(Shared { path, names: RwLock::new(Vec::new()) }),
            file: Some(f),
            last: first,
            len: h.len() as u64,
            min_recv: i64::MAX,
            max_recv: i64::MIN,
            marks: Vec::new(),
            index: HashMap::new(),
        });
        Ok(())
    }

    /// Appends framed blocks another node wrote (replication, hand-off), in order.
    /// Blocks already held are skipped; after a gap the partition's older history is
    /// dropped (its floor moves up) and appends wait for a block that starts a segment.
    pub fn append_frames(&self, p: u16, bytes: &[u8]) -> Result<usize, HistoryError> {
        if bytes.is_empty() || p >= PARTITIONS {
            return Ok(0);
        }
        let mut part = self.parts[p as usize].lock().expect("history lock");
        let mut applied = 0;
        for f in frames(bytes) {
            let (_, body) = f.map_err(|e| HistoryError::Corrupt(e.to_string()))?;
            let Some((head, names, max)) = block_time(body) else {
                return Err(HistoryError::Corrupt("malformed history block".into()));
            };
            if head.count == 0 {
                continue;
            }
            if let Some(l) = part.last
                && head.last() <= l
            {
                continue;
            }
            // With nothing here, only a partition's very first block (seq 0) continues.
            let expected = part.last.or(part.floor).map_or(0, |l| l.seq + 1);
            let contiguous = head.first.seq == expected && part.last.is_none_or(|l| head.first.epoch >= l.epoch);
            let starts = head.flags & STARTS_SEGMENT != 0;
            if !contiguous {
                if !starts {
                    part.resync = true;
                    continue;
                }
                // A gap: what came before is no longer a whole history.
                Self::clear(&mut part);
                part.floor = head.first.seq.checked_sub(1).map(|seq| Pos { epoch: head.first.epoch, seq });
            } else if part.resync && !starts {
                continue;
            }
            part.resync = false;
            if starts || part.segs.last().is_none_or(|s| s.file.is_none()) {
                if !starts {
                    part.resync = true;
                    continue;
                }
                self.start_segment(p, &mut part, head.first)?;
            }
            let seg = part.segs.last_mut().expect("a segment");
            let framed = frame(body);
            seg.file.as_mut().expect("open").write_all(&framed).map_err(io(&seg.shared.path))?;
            seg.add_names(&names);
            let offset = seg.len;
            seg.note(offset, &head, framed.len() as u64);
            seg.max_recv = seg.max_recv.max(max);
            part.last = Some(head.last());
            part.epoch = part.epoch.max(head.first.epoch);
            part.dirty = true;
            applied += 1;
        }
        drop(part);
        if applied > 0 {
            self.notify();
        }
        Ok(applied)
    }

    /// Forgets a partition's history (deletes its files).
    fn clear(part: &mut Part) {
        for s in part.segs.drain(..) {
            let _ = std::fs::remove_file(&s.shared.path);
        }
        part.last = None;
        part.floor = None;
        part.resync = false;
        part.cut = true;
        part.filling = false;
    }

    /// Drops a partition's history: this node neither serves nor keeps a replica of it.
    pub fn drop_partition(&self, p: u16) {
        let mut part = self.parts[p as usize].lock().expect("history lock");
        Self::clear(&mut part);
        part.epoch = 0;
    }

    /// A partition's history for a hand-off: its floor, its blocks, framed (at most
    /// `pull_max` bytes: the newest segments that fit), and whether older segments
    /// were left out (the new owner copies them with [`segments_before`](Self::segments_before)).
    pub fn export(&self, p: u16) -> Result<(Option<Pos>, Vec<u8>, bool), HistoryError> {
        let (mut floor, segs) = {
            let part = self.parts[p as usize].lock().expect("history lock");
            let segs: Vec<(PathBuf, u64, Pos)> =
                part.segs.iter().map(|s| (s.shared.path.clone(), s.len, s.last)).collect();
            (part.floor, segs)
        };
        let mut total = 0u64;
        let mut keep = segs.len();
        while keep > 0 && total + segs[keep - 1].1 <= self.cfg.pull_max as u64 {
            total += segs[keep - 1].1;
            keep -= 1;
        }
        if keep > 0 {
            floor = Some(segs[keep - 1].2);
        }
        let mut out = Vec::with_capacity(total as usize);
        for (path, len, _) in &segs[keep..] {
            let bytes = read_range(path, 0, *len)?;
            for f in frames(&bytes) {
                let (_, body) = f.map_err(|e| HistoryError::Corrupt(e.to_string()))?;
                if parse_header(body).is_none() {
                    out.extend_from_slice(&frame(body));
                }
            }
        }
        Ok((floor, out, keep > 0))
    }

    /// Segments of `p` that end at `upto` and chain back from it, newest first (path and
    /// length written), leaving out any past the retention: what a node whose history of
    /// `p` starts after `upto` lacks.
    pub fn segments_before(&self, p: u16, upto: Pos, now_ms: i64) -> Vec<(PathBuf, u64)> {
        let cutoff = now_ms - self.cfg.retention_ms;
        let part = self.parts[p as usize].lock().expect("history lock");
        let mut out = Vec::new();
        let mut want: Option<Pos> = Some(upto);
        for s in part.segs.iter().rev() {
            let Some(w) = want else { break };
            if s.last.seq > w.seq {
                continue;
            }
            // Each ends right before the next (by sequence: a floor set after a gap names
            // the next block's epoch, not the one the entry before it was written at). An
            // open segment is read as far as it is written now (appends only add).
            if s.last.seq != w.seq || s.max_recv < cutoff {
                break;
            }
            let Some(first) = s.marks.first().map(|m| m.first) else { break };
            out.push((s.shared.path.clone(), s.len));
            want = first.seq.checked_sub(1).map(|seq| Pos { epoch: first.epoch, seq });
        }
        out
    }

    /// Puts an older segment (a whole segment file another node holds, from
    /// [`segments_before`](Self::segments_before)) before this node's history of `p`. It
    /// must be whole and end where this history starts (its floor's sequence); the floor
    /// becomes the position before the segment (its header's). Returns whether it was
    /// added.
    pub fn prepend(&self, p: u16, bytes: &[u8]) -> Result<bool, HistoryError> {
        let corrupt = |why: &str| HistoryError::Corrupt(format!("a copied segment of partition {p}: {why}"));
        let first = frames(bytes)
            .nth(1)
            .and_then(Result::ok)
            .and_then(|(_, body)| block_head(body))
            .map(|(h, _)| h.first)
            .ok_or_else(|| corrupt("no block"))?;
        let dir = self.part_dir(p);
        let path = dir.join(seg_name(first));
        let Parsed { seg, prev, good, torn } = parse_segment(path.clone(), first, bytes);
        let Some(prev) = prev else { return Err(corrupt("no header")) };
        if torn.is_some() || good != bytes.len() as u64 || seg.marks.is_empty() {
            return Err(corrupt("not whole"));
        }
        let fits = |floor: Option<Pos>| floor.is_some_and(|f| f.seq == seg.last.seq && f.epoch >= seg.last.epoch);
        if !fits(self.floor(p)) || prev.is_some_and(|pr| pr.seq + 1 != first.seq) {
            return Ok(false);
        }
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let n = self.copies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!("{}-{n}{TMP_SUFFIX}", seg_name(first).trim_end_matches(".hist")));
        {
            let mut f = File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(bytes).map_err(io(&tmp))?;
            f.sync_data().map_err(io(&tmp))?;
        }
        let mut part = self.parts[p as usize].lock().expect("history lock");
        // Checked again: the history may have been reset or pruned meanwhile.
        if !fits(part.floor) {
            let _ = std::fs::remove_file(&tmp);
            return Ok(false);
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        part.floor = prev;
        part.segs.insert(0, seg);
        drop(part);
        metrics::counter!("locus_history_copied_bytes_total").increment(bytes.len() as u64);
        self.notify();
        Ok(true)
    }

    /// Marks `p` as having older segments copied in (readers behind its floor wait
    /// rather than being told the history is gone), or no longer.
    pub fn set_filling(&self, p: u16, on: bool) {
        self.parts[p as usize].lock().expect("history lock").filling = on;
        if !on {
            self.notify();
        }
    }

    /// Installs a partition's history from a hand-off (replacing what is here); `older`:
    /// older segments are still to be copied in (readers behind the floor wait for them).
    pub fn import(&self, p: u16, floor: Option<Pos>, frames_bytes: &[u8], older: bool) -> Result<(), HistoryError> {
        {
            let mut part = self.parts[p as usize].lock().expect("history lock");
            Self::clear(&mut part);
            part.floor = floor;
            part.filling = older && floor.is_some();
        }
        self.append_frames(p, frames_bytes)?;
        let mut part = self.parts[p as usize].lock().expect("history lock");
        // Local appends continue in a segment of their own.
        part.cut = true;
        if part.last.is_none() {
            part.last = floor;
        }
        Ok(())
    }

    /// Syncs every partition appended to since the last call, and the segments closed
    /// since (outside the partitions' locks). Many files at once (a busy node touches
    /// most of its partitions every second) are synced with one `syncfs` of the
    /// history's filesystem: one journal commit and one device flush instead of one per
    /// file, a few percent of a busy node's CPU.
    pub fn sync(&self) {
        let closed = std::mem::take(&mut *self.closed.lock().expect("closed lock"));
        let mut dirty = Vec::new();
        for (p, m) in self.parts.iter().enumerate() {
            let mut part = m.lock().expect("history lock");
            if part.dirty {
                part.dirty = false;
                dirty.push(p);
            }
        }
        // One descriptor on the filesystem is all `syncfs` needs (not one per file: a
        // node keeps a segment file open per partition already).
        if closed.len() + dirty.len() >= SYNCFS_FROM
            && let Ok(dir) = File::open(&self.dir)
            && sync_filesystem(&dir)
        {
            return;
        }
        for f in closed {
            if let Err(e) = f.sync_data() {
                warn!(error = %e, "history sync failed");
            }
        }
        for p in dirty {
            let file = {
                let part = self.parts[p].lock().expect("history lock");
                part.segs.last().and_then(|s| s.file.as_ref()).and_then(|f| f.try_clone().ok())
            };
            if let Some(f) = file
                && let Err(e) = f.sync_data()
            {
                warn!(partition = p, error = %e, "history sync failed");
            }
        }
    }

    /// Starts the thread that syncs the history every second and drops what is past
    /// the retention every half minute; it ends when the store is dropped.
    pub fn start_upkeep(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("locus-history".into())
            .spawn(move || {
                let mut n = 0u64;
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    let Some(s) = weak.upgrade() else { return };
                    s.sync();
                    if n.is_multiple_of(30) {
                        s.prune(crate::clock::wall_ms());
                        metrics::gauge!("locus_history_bytes").set(s.bytes() as f64);
                    }
                    n += 1;
                }
            })
            .expect("spawn the history thread");
    }

    /// Deletes segments older than the retention (by server time); returns how many.
    pub fn prune(&self, now_ms: i64) -> usize {
        let cutoff = now_ms - self.cfg.retention_ms;
        let mut n = 0;
        for m in &self.parts {
            let mut part = m.lock().expect("history lock");
            while part.segs.first().is_some_and(|s| s.max_recv < cutoff && (s.file.is_none() || part.segs.len() == 1)) {
                let s = part.segs.remove(0);
                let _ = std::fs::remove_file(&s.shared.path);
                part.floor = Some(s.last);
                n += 1;
            }
        }
        if n > 0 {
            metrics::counter!("locus_history_segments_pruned_total").increment(n as u64);
        }
        n
    }

    /// Fixes after `after` (`None`: from the oldest kept), up to about `max`.
    pub fn read_after(&self, p: u16, after: Option<Pos>, max: usize) -> Result<Page, Behind> {
        let (plan, from) = {
            let part = self.parts[p as usize].lock().expect("history lock");
            if let (Some(c), Some(f)) = (after, part.floor)
                && c < f
            {
                return Err(Behind { partition: p, cursor: c, oldest: f, filling: part.filling });
            }
            // From the oldest kept while older segments are still coming: wait for them.
            if let (None, Some(f), true) = (after, part.floor, part.filling) {
                return Err(Behind { partition: p, cursor: f, oldest: f, filling: true });
            }
            let from = after.or(part.floor);
            (self.read_plan(&part, from), from)
        };
        Ok(self.run_plan(p, plan, from, max))
    }

    fn read_plan(&self, part: &Part, after: Option<Pos>) -> Vec<(Arc<Shared>, u64, u64)> {
        let mut plan = Vec::new();
        for s in &part.segs {
            if after.is_some_and(|a| s.last <= a) {
                continue;
            }
            let start = match after {
                Some(a) => s.marks.iter().rev().find(|m| m.first <= a).or(s.marks.first()),
                None => s.marks.first(),
            };
            if let Some(m) = start {
                plan.push((s.shared.clone(), m.offset, s.len));
            }
        }
        plan
    }

    fn run_plan(&self, p: u16, plan: Vec<(Arc<Shared>, u64, u64)>, after: Option<Pos>, max: usize) -> Page {
        let mut page = Page::default();
        for (shared, from, to) in plan {
            let mut raws: Vec<(Pos, RawRecord)> = Vec::new();
            let mut evs: Vec<(Pos, RawEventRecord)> = Vec::new();
            let upto = std::cell::Cell::new(page.upto);
            let already = page.fixes.len() + page.events.len();
            let r = scan(&shared.path, from, to, |body| {
                if already + raws.len() + evs.len() >= max {
                    return false;
                }
                let fresh = |pos: Pos| after.is_none_or(|a| pos > a);
                decode_any(
                    body,
                    |pos, rec| {
                        if fresh(pos) {
                            raws.push((pos, *rec));
                            upto.set(Some(pos));
                        }
                    },
                    |pos, rec| {
                        if fresh(pos) {
                            evs.push((pos, *rec));
                            upto.set(Some(pos));
                        }
                    },
                );
                true
            });
            if let Err(e) = r {
                warn!(partition = p, error = %e, "history read failed");
                break;
            }
            let names = shared.names.read().expect("names lock");
            page.fixes.extend(raws.iter().filter_map(|(pos, r)| resolve(*pos, r, &names)));
            page.events.extend(evs.iter().filter_map(|(pos, r)| resolve_event(*pos, r, &names)));
            page.upto = upto.get();
            if page.fixes.len() + page.events.len() >= max {
                page.more = true;
                break;
            }
        }
        page
    }

    /// One driver's fixes accepted (server time) within `[from_ms, to_ms]`, in order;
    /// `each` returns false to stop.
    pub fn driver_history(
        &self,
        p: u16,
        driver_id: &str,
        from_ms: i64,
        to_ms: i64,
        after: Option<Pos>,
        mut each: impl FnMut(HistFix) -> bool,
    ) -> Result<(), HistoryError> {
        let plan: Vec<(Arc<Shared>, u64, u64)> = {
            let part = self.parts[p as usize].lock().expect("history lock");
            part.segs
                .iter()
                .filter(|s| s.min_recv <= to_ms && s.max_recv >= from_ms && after.is_none_or(|a| s.last > a))
                .filter_map(|s| {
                    // The later of: the last mark before `from_ms`, the last at or before `after`.
                    let by_time = s.marks.iter().rposition(|m| m.received_ms <= from_ms).unwrap_or(0);
                    let by_pos = after.and_then(|a| s.marks.iter().rposition(|m| m.first <= a)).unwrap_or(0);
                    let m = s.marks.get(by_time.max(by_pos))?;
                    Some((s.shared.clone(), m.offset, s.len))
                })
                .collect()
        };
        for (shared, from, to) in plan {
            let idx = {
                let names = shared.names.read().expect("names lock");
                match names.iter().position(|n| &**n == driver_id) {
                    Some(i) => i as u64,
                    None => continue,
                }
            };
            let mut hits: Vec<(Pos, RawRecord)> = Vec::new();
            let mut going = true;
            scan(&shared.path, from, to, |body| {
                let Some((head, _)) = block_head(body) else { return false };
                if head.base_received_ms > to_ms {
                    going = false;
                    return false;
                }
                decode_block(body, |pos, r| {
                    if r.name == idx
                        && r.received_ms >= from_ms
                        && r.received_ms <= to_ms
                        && after.is_none_or(|a| pos > a)
                    {
                        hits.push((pos, *r));
                    }
                });
                true
            })?;
            let names = shared.names.read().expect("names lock");
            for f in hits.iter().filter_map(|(pos, r)| resolve(*pos, r, &names)) {
                if !each(f) {
                    return Ok(());
                }
            }
            if !going {
                break;
            }
        }
        Ok(())
    }

    /// Bytes of history held (every partition).
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|m| m.lock().expect("history lock").segs.iter().map(|s| s.len).sum::<u64>()).sum()
    }
}

fn resolve(pos: Pos, r: &RawRecord, names: &[Arc<str>]) -> Option<HistFix> {
    Some(HistFix {
        pos,
        driver_id: names.get(r.name as usize)?.clone(),
        lat_e7: r.lat_e7,
        lon_e7: r.lon_e7,
        motion: r.motion,
        timestamp_ms: r.timestamp_ms,
        received_ms: r.received_ms,
        status: r.status,
        trip_id: r.trip.checked_sub(1).and_then(|i| names.get(i as usize).cloned()),
        trip_cost_cents: r.trip_cost_cents,
    })
}

/// A block's header, new names and newest time (server time of a fix, or of a state
/// change); `None` if malformed.
fn block_time(body: &[u8]) -> Option<(BlockHead, Vec<&str>, i64)> {
    let max = std::cell::Cell::new(i64::MIN);
    let (head, names) =
        decode_any(body, |_, r| max.set(max.get().max(r.received_ms)), |_, e| max.set(max.get().max(e.timestamp_ms)))?;
    Some((head, names, max.get()))
}

fn resolve_event(pos: Pos, r: &RawEventRecord, names: &[Arc<str>]) -> Option<HistEvent> {
    Some(HistEvent {
        pos,
        entity: r.entity,
        id: names.get(r.id as usize)?.clone(),
        state: names.get(r.state as usize)?.clone(),
        from_state: r.from.checked_sub(1).and_then(|i| names.get(i as usize).cloned()),
        timestamp_ms: r.timestamp_ms,
        lat_e7: r.lat_e7,
        lon_e7: r.lon_e7,
    })
}

/// Bytes `[from, to)` of a history file.
pub fn read_range(path: &Path, from: u64, to: u64) -> Result<Vec<u8>, HistoryError> {
    let f = File::open(path).map_err(io(path))?;
    let mut buf = vec![0u8; to.saturating_sub(from) as usize];
    f.read_exact_at(&mut buf, from).map_err(io(path))?;
    Ok(buf)
}

/// Calls `each` with the body of every block frame in `[from, to)` of a segment file,
/// reading a chunk at a time, until it returns false. The header frame is skipped.
fn scan(path: &Path, from: u64, to: u64, mut each: impl FnMut(&[u8]) -> bool) -> Result<(), HistoryError> {
    let f = File::open(path).map_err(io(path))?;
    let corrupt = |what: String| HistoryError::Corrupt(format!("{}: {what}", path.display()));
    let (mut at, mut chunk) = (from, READ_CHUNK);
    let mut buf = Vec::new();
    while at < to {
        let left = (to - at) as usize;
        buf.resize(chunk.min(left), 0);
        f.read_exact_at(&mut buf, at).map_err(io(path))?;
        let mut used = 0usize;
        for fr in frames(&buf) {
            match fr {
                Ok((off, body)) => {
                    used = off + 8 + body.len();
                    if parse_header(body).is_some() {
                        continue;
                    }
                    if !each(body) {
                        return Ok(());
                    }
                }
                // The chunk ends inside a frame: read on from it.
                Err(CodecError::Truncated(off)) if buf.len() < left => {
                    used = off;
                    break;
                }
                Err(e) => return Err(corrupt(e.to_string())),
            }
        }
        if used == 0 {
            // One frame larger than the chunk: read it whole.
            let len = buf.get(..4).map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4")) as usize);
            if len + 8 > left || len + 8 <= chunk {
                return Err(corrupt("a frame runs past the segment's end".into()));
            }
            chunk = len + 8;
            continue;
        }
        at += used as u64;
        chunk = READ_CHUNK;
    }
    Ok(())
}
