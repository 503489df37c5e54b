//! The disk spool (`--spool-dir`): messages the producer cannot hand to the
//! brokers are appended to segment files instead of dropped, and read back
//! in order when the brokers accept again.
//!
//! A segment is `NNNNNNNNNNNNNNNNNNNN.spool` (its number, 20 digits, so
//! names sort in order) holding entries of [`HEADER`] bytes and a payload:
//! the magic `XSP1`, a CRC-32 of the rest, the payload's length, its
//! records, the time it was written (Unix ms), then the Kafka message as the
//! producer would have sent it. The length and checksum find a torn or
//! corrupt tail (a power cut, `kill -9` mid-write, a full disk): at start
//! every segment left by an earlier run is read once, a bad span followed
//! by good entries is skipped, a bad tail is cut, and both are counted.
//!
//! New entries go to the newest segment until it reaches a sixteenth of
//! the bound (`--spool-bytes`), then to a new one. A segment is deleted once
//! every entry in it has been read back and resolved: acknowledged by a
//! broker, or failed and appended again at the end. At the bound, the oldest
//! segment is deleted and its unread records counted as dropped: the newest
//! data is kept. Memory holds a few numbers per segment and one entry.
//!
//! A clean stop saves where reading back got to (`cursor`), once nothing
//! taken is outstanding, so the next start goes on from there; after a
//! crash it starts at the oldest segment's beginning, and what was already
//! acknowledged of it is produced again (at least once).
//!
//! Not thread-safe: the forwarder keeps it behind a mutex.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::metrics::{ForwarderMetrics, ForwarderTotals};

const MAGIC: [u8; 4] = *b"XSP1";
/// Magic, CRC-32, payload length, records, written at (ms).
pub const HEADER: usize = 4 + 4 + 4 + 4 + 8;
/// Largest payload an entry may claim: a message made of one datagram is at
/// most 64 KiB of records and their length prefixes. A longer length is
/// corruption, whatever its checksum would say.
const MAX_PAYLOAD: usize = 1 << 20;
const SUFFIX: &str = ".spool";
/// Where a clean stop saves how far reading back got (`SEGMENT OFFSET`).
const CURSOR: &str = "cursor";
/// The smallest `--spool-bytes`: sixteen segments of 64 KiB, each holding at
/// least one largest entry.
pub const MIN_BOUND: u64 = 1 << 20;
/// Segments are a sixteenth of the bound, within these sizes.
const SEGMENT_SIZES: (u64, u64) = (64 << 10, 64 << 20);
/// After a write error, how long before a new segment is tried.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often written entries are forced to disk.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Why a message was spooled; each has its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The producer's queue was full.
    QueueFull,
    /// Not acknowledged within `--delivery-timeout`, or refused.
    DeliveryFailed,
    /// Still queued when the forwarder stopped.
    Shutdown,
    /// It arrived while the brokers were known to be down: not queued in
    /// memory at all.
    Outage,
    /// Taken out of the producer's queue when the brokers went down.
    Withdrawn,
}

impl Why {
    /// Its counters of messages and records spooled.
    fn counters(self, t: &mut ForwarderTotals) -> (&mut u64, &mut u64) {
        match self {
            Why::QueueFull => (&mut t.spooled_queue_full, &mut t.spooled_queue_full_records),
            Why::DeliveryFailed => (
                &mut t.spooled_delivery_failed,
                &mut t.spooled_delivery_failed_records,
            ),
            Why::Shutdown => (&mut t.spooled_shutdown, &mut t.spooled_shutdown_records),
            Why::Outage => (&mut t.spooled_outage, &mut t.spooled_outage_records),
            Why::Withdrawn => (&mut t.spooled_withdrawn, &mut t.spooled_withdrawn_records),
        }
    }
}

/// An entry read back: its segment (to resolve) and its records. The
/// payload is in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub segment: u64,
    pub records: u64,
}

/// One segment file, as far as memory knows it.
#[derive(Debug)]
struct Segment {
    id: u64,
    /// Length of the file's good entries.
    bytes: u64,
    /// Where reading back goes on.
    read: u64,
    /// Corrupt spans found at start, skipped when reading reaches them.
    holes: VecDeque<(u64, u64)>,
    unread_entries: u64,
    unread_records: u64,
    /// Entries read back and not yet resolved.
    outstanding: u64,
    /// When its first entry was written (Unix ms), 0 while it has none.
    first_ms: u64,
}

impl Segment {
    fn new(id: u64) -> Self {
        Segment {
            id,
            bytes: 0,
            read: 0,
            holes: VecDeque::new(),
            unread_entries: 0,
            unread_records: 0,
            outstanding: 0,
            first_ms: 0,
        }
    }

    fn done(&self) -> bool {
        self.read >= self.bytes && self.outstanding == 0
    }
}

/// An entry's header, checked.
struct Header {
    len: usize,
    records: u64,
    written_ms: u64,
}

/// What a start found in the spool left by an earlier run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub segments: u64,
    pub entries: u64,
    pub records: u64,
    pub bytes: u64,
}

/// The spool.
pub struct Spool {
    dir: PathBuf,
    bound: u64,
    segment_limit: u64,
    segments: VecDeque<Segment>,
    next_id: u64,
    /// Appends to the last segment, while it takes more.
    writer: Option<File>,
    /// The segment being read back, and its file.
    reader: Option<(u64, File)>,
    metrics: Arc<ForwarderMetrics>,
    /// No new segment before this, after a write error.
    retry_at: Option<Instant>,
    unsynced: bool,
    synced_at: Instant,
    /// Said once until the condition ends: dropping at the bound (until the
    /// spool empties), failing to write (until a write succeeds), failing
    /// to delete (for the run).
    said_bound: bool,
    said_write: bool,
    said_delete: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn crc(rest_of_header: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(rest_of_header);
    hasher.update(payload);
    hasher.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

/// The entry at `offset`, its payload read into `buf`, if it is whole
/// before `end` and its checksum agrees.
fn entry_at(file: &File, offset: u64, end: u64, buf: &mut Vec<u8>) -> Option<Header> {
    let mut header = [0u8; HEADER];
    if offset + HEADER as u64 > end || file.read_exact_at(&mut header, offset).is_err() {
        return None;
    }
    let len = u32_at(&header, 8) as usize;
    if header[..4] != MAGIC || len > MAX_PAYLOAD || offset + (HEADER + len) as u64 > end {
        return None;
    }
    buf.resize(len, 0);
    file.read_exact_at(buf, offset + HEADER as u64).ok()?;
    (crc(&header[8..], buf) == u32_at(&header, 4)).then(|| Header {
        len,
        records: u64::from(u32_at(&header, 12)),
        written_ms: u64::from_le_bytes(header[16..24].try_into().unwrap_or_default()),
    })
}

/// The first good entry after a bad one at `bad`, or `None` to the end.
fn next_good(file: &File, bad: u64, end: u64, buf: &mut Vec<u8>) -> Option<u64> {
    const CHUNK: usize = 64 << 10;
    let mut chunk = vec![0u8; CHUNK + MAGIC.len() - 1];
    let mut from = bad + 1;
    while from < end {
        let want = (chunk.len() as u64).min(end - from) as usize;
        file.read_exact_at(&mut chunk[..want], from).ok()?;
        for i in 0..want.saturating_sub(MAGIC.len() - 1) {
            if chunk[i..i + MAGIC.len()] == MAGIC
                && entry_at(file, from + i as u64, end, buf).is_some()
            {
                return Some(from + i as u64);
            }
        }
        from += CHUNK as u64;
    }
    None
}

/// Counts a corrupt span of `bytes` found while reading back.
fn count_corrupt(metrics: &ForwarderMetrics, bytes: u64) {
    metrics.counters.add(
        &[],
        &ForwarderTotals {
            spool_corrupt: 1,
            spool_corrupt_bytes: bytes,
            ..ForwarderTotals::default()
        },
    );
}

/// The cursor the last clean stop saved (segment, offset). It stays true
/// after later runs: segments are only appended to, and the entries
/// before it stay resolved; new segments are numbered after it.
fn read_cursor(dir: &Path) -> Option<(u64, u64)> {
    let text = fs::read_to_string(dir.join(CURSOR)).ok()?;
    let (id, offset) = text.trim().split_once(' ')?;
    Some((id.parse().ok()?, offset.parse().ok()?))
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{SUFFIX}"))
}

impl Spool {
    /// Opens (creating it if needed) the spool in `dir`, reading every
    /// segment an earlier run left: their entries are read back first.
    pub fn open(
        dir: &Path,
        bound: u64,
        metrics: Arc<ForwarderMetrics>,
    ) -> io::Result<(Spool, Found)> {
        // The records name hosts, addresses and services: the spool is the
        // forwarder's user's alone.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut ids = Vec::new();
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_suffix(SUFFIX)
                .and_then(|n| n.parse::<u64>().ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let cursor = read_cursor(dir);
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            bound,
            segment_limit: (bound / 16).clamp(SEGMENT_SIZES.0, SEGMENT_SIZES.1),
            segments: VecDeque::new(),
            next_id: ids
                .last()
                .max(cursor.map(|(id, _)| id).as_ref())
                .map_or(0, |last| last + 1),
            writer: None,
            reader: None,
            metrics,
            retry_at: None,
            unsynced: false,
            synced_at: Instant::now(),
            said_bound: false,
            said_write: false,
            said_delete: false,
        };
        let mut found = Found::default();
        let mut cut = ForwarderTotals::default();
        if cursor.is_some_and(|(id, _)| !ids.contains(&id)) {
            let _ = fs::remove_file(dir.join(CURSOR));
        }
        for id in ids {
            let start = cursor.filter(|&(at, _)| at == id).map(|(_, offset)| offset);
            let segment = spool.check(id, start, &mut cut)?;
            if segment.bytes == 0 {
                spool.delete(id);
                continue;
            }
            found.segments += 1;
            found.entries += segment.unread_entries;
            found.records += segment.unread_records;
            found.bytes += segment.bytes;
            spool.segments.push_back(segment);
        }
        if cut.spool_corrupt > 0 {
            xtcp_service::say!(
                "xtcp-forwarder: the spool in {} had {} corrupt spans ({} bytes: a torn write or damage), skipped; the entries around them are kept",
                dir.display(),
                cut.spool_corrupt,
                cut.spool_corrupt_bytes
            );
        }
        spool.metrics.counters.add(&[], &cut);
        spool.collect();
        spool.show();
        Ok((spool, found))
    }

    /// Reads segment `id` of an earlier run: its good entries, the spans
    /// between them that are not, and a bad tail, which is cut. Reading
    /// back resumes at `start`, where the earlier run's stop left it, if
    /// an entry begins there.
    fn check(&self, id: u64, start: Option<u64>, cut: &mut ForwarderTotals) -> io::Result<Segment> {
        let path = segment_path(&self.dir, id);
        let file = File::open(&path)?;
        let end = file.metadata()?.len();
        let mut segment = Segment::new(id);
        let mut buf = Vec::new();
        let mut offset = 0;
        // Entries and records before `start`, and whether an entry began
        // there (or the good entries ended there).
        let (mut before, mut resumes) = ((0, 0), start == Some(0));
        while offset < end {
            if let Some(header) = entry_at(&file, offset, end, &mut buf) {
                if segment.first_ms == 0 {
                    segment.first_ms = header.written_ms.max(1);
                }
                segment.unread_entries += 1;
                segment.unread_records += header.records;
                if start.is_some_and(|start| offset < start) {
                    before = (before.0 + 1, before.1 + header.records);
                }
                offset += (HEADER + header.len) as u64;
                resumes |= start == Some(offset);
                continue;
            }
            let resume = next_good(&file, offset, end, &mut buf);
            cut.spool_corrupt += 1;
            cut.spool_corrupt_bytes += resume.unwrap_or(end) - offset;
            match resume {
                Some(resume) => {
                    segment.holes.push_back((offset, resume));
                    offset = resume;
                    resumes |= start == Some(offset);
                }
                None => {
                    // A read-only disk keeps the tail; it is never read.
                    if let Err(e) = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(offset))
                    {
                        xtcp_service::say!(
                            "xtcp-forwarder: spool: cannot cut the bad tail of {}: {e}",
                            path.display()
                        );
                    }
                    break;
                }
            }
        }
        segment.bytes = offset;
        if let (Some(start), true) = (start, resumes) {
            segment.read = start;
            segment.unread_entries -= before.0;
            segment.unread_records -= before.1;
            segment.holes.retain(|&(hole, _)| hole >= start);
        }
        Ok(segment)
    }

    /// At a clean stop: what was written forced to disk, and where reading
    /// back got to saved, so that the next start does not produce again
    /// what was acknowledged. Only when no entry taken is outstanding:
    /// then every entry before that point is resolved.
    pub fn close(&mut self) {
        self.sync(true);
        let Some(front) = self.segments.front() else {
            return;
        };
        if front.read == 0 || self.segments.iter().any(|s| s.outstanding > 0) {
            return;
        }
        let saved = self.dir.join(format!("{CURSOR}.new"));
        let written = File::create(&saved).and_then(|mut f| {
            writeln!(f, "{} {}", front.id, front.read)?;
            f.sync_all()
        });
        if let Err(e) = written.and_then(|()| fs::rename(&saved, self.dir.join(CURSOR))) {
            xtcp_service::say!(
                "xtcp-forwarder: cannot save where the spool's replay stopped: {e}; the next start produces its first segment whole again"
            );
        }
    }

    /// Appends a message of `records` records; counts it as spooled for
    /// `why`, or as dropped when it cannot be written.
    pub fn append(&mut self, payload: &[u8], records: u64, why: Why) -> bool {
        let mut counted = ForwarderTotals::default();
        let written = self.write(payload, records, &mut counted);
        match &written {
            Err(e) => {
                if !self.said_write {
                    xtcp_service::say!(
                        "xtcp-forwarder: cannot write to the spool in {}: {e}; what cannot be delivered is dropped and counted until a write succeeds",
                        self.dir.display()
                    );
                    self.said_write = true;
                }
                // On arrival it was never produced: refused, for the
                // exit line's balance of datagrams.
                if matches!(why, Why::QueueFull | Why::Outage) {
                    counted.spool_failed_on_arrival = 1;
                } else {
                    counted.spool_failed = 1;
                }
                counted.spool_failed_records = records;
            }
            Ok(()) => {
                let (messages, in_them) = why.counters(&mut counted);
                (*messages, *in_them) = (1, records);
            }
        }
        self.metrics.counters.add(&[], &counted);
        self.show();
        written.is_ok()
    }

    fn write(
        &mut self,
        payload: &[u8],
        records: u64,
        counted: &mut ForwarderTotals,
    ) -> io::Result<()> {
        let (Ok(len), Ok(records32)) = (u32::try_from(payload.len()), u32::try_from(records))
        else {
            return Err(io::Error::other("a message too large to spool"));
        };
        if payload.len() > MAX_PAYLOAD {
            return Err(io::Error::other("a message too large to spool"));
        }
        let size = (HEADER + payload.len()) as u64;
        let full = self
            .segments
            .back()
            .is_some_and(|last| last.bytes + size > self.segment_limit);
        if full || self.writer.is_none() {
            self.roll()?;
        }
        self.make_room(size, counted);
        let written_ms = now_ms();
        let mut entry = Vec::with_capacity(HEADER + payload.len());
        entry.extend_from_slice(&MAGIC);
        entry.extend_from_slice(&[0; 4]);
        entry.extend_from_slice(&len.to_le_bytes());
        entry.extend_from_slice(&records32.to_le_bytes());
        entry.extend_from_slice(&written_ms.to_le_bytes());
        let sum = crc(&entry[8..], payload);
        entry[4..8].copy_from_slice(&sum.to_le_bytes());
        entry.extend_from_slice(payload);
        let (Some(writer), Some(last)) = (self.writer.as_mut(), self.segments.back_mut()) else {
            return Err(io::Error::other("no segment open"));
        };
        if let Err(e) = writer.write_all(&entry) {
            // A part written (a full disk) is taken back; if even that
            // fails, the next start cuts it as a torn tail.
            let _ = writer.set_len(last.bytes);
            self.writer = None;
            self.retry_at = Some(Instant::now() + RETRY_AFTER);
            // A segment left empty goes, or a disk that stays full would
            // collect one empty file per retry.
            if last.bytes == 0 {
                let id = last.id;
                self.segments.pop_back();
                self.delete(id);
            }
            return Err(e);
        }
        last.bytes += size;
        last.unread_entries += 1;
        last.unread_records += records;
        if last.first_ms == 0 {
            last.first_ms = written_ms.max(1);
        }
        self.unsynced = true;
        self.said_write = false;
        Ok(())
    }

    /// Closes the newest segment and starts the next.
    fn roll(&mut self) -> io::Result<()> {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return Err(io::Error::other(
                "the last write failed less than a second ago",
            ));
        }
        if let Some(writer) = self.writer.take() {
            // Best effort: what the page cache holds survives a crash of
            // this process either way.
            let _ = writer.sync_data();
        }
        let id = self.next_id;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(segment_path(&self.dir, id))
            .inspect_err(|_| self.retry_at = Some(Instant::now() + RETRY_AFTER))?;
        self.next_id += 1;
        self.retry_at = None;
        self.writer = Some(file);
        self.segments.push_back(Segment::new(id));
        Ok(())
    }

    /// Deletes the oldest segments until `size` more bytes fit the bound;
    /// never the newest, which takes the entry.
    fn make_room(&mut self, size: u64, counted: &mut ForwarderTotals) {
        while self.bytes() + size > self.bound && self.segments.len() > 1 {
            let Some(oldest) = self.segments.pop_front() else {
                break;
            };
            counted.spool_bound += oldest.unread_entries;
            counted.spool_bound_records += oldest.unread_records;
            if !self.said_bound {
                xtcp_service::say!(
                    "xtcp-forwarder: the spool in {} is at --spool-bytes {}: its oldest segment is dropped (counted by records) to keep the newest data",
                    self.dir.display(),
                    self.bound
                );
                self.said_bound = true;
            }
            self.delete(oldest.id);
        }
    }

    fn delete(&mut self, id: u64) {
        if self.reader.as_ref().is_some_and(|(r, _)| *r == id) {
            self.reader = None;
        }
        if let Err(e) = fs::remove_file(segment_path(&self.dir, id)) {
            if !self.said_delete {
                xtcp_service::say!(
                    "xtcp-forwarder: cannot delete a read spool segment in {}: {e}; a later start reads it again (at least once)",
                    self.dir.display()
                );
                self.said_delete = true;
            }
        }
    }

    /// The oldest entry not yet read back, its payload into `buf`.
    pub fn take(&mut self, buf: &mut Vec<u8>) -> Option<Taken> {
        let index = self.segments.iter().position(|s| s.read < s.bytes)?;
        let id = self.segments[index].id;
        if self.reader.as_ref().is_none_or(|(r, _)| *r != id) {
            match File::open(segment_path(&self.dir, id)) {
                Ok(file) => self.reader = Some((id, file)),
                Err(e) => {
                    // Gone from under us: its records cannot be read.
                    xtcp_service::say!("xtcp-forwarder: spool segment {id} unreadable: {e}");
                    let segment = &mut self.segments[index];
                    count_corrupt(&self.metrics, segment.bytes - segment.read);
                    segment.read = segment.bytes;
                    (segment.unread_entries, segment.unread_records) = (0, 0);
                    self.collect();
                    return self.take(buf);
                }
            }
        }
        let file = &self.reader.as_ref()?.1;
        let segment = &mut self.segments[index];
        if let Some(&(start, end)) = segment.holes.front() {
            if start == segment.read {
                segment.read = end;
                segment.holes.pop_front();
            }
        }
        match entry_at(file, segment.read, segment.bytes, buf) {
            Some(header) => {
                segment.read += (HEADER + header.len) as u64;
                segment.unread_entries = segment.unread_entries.saturating_sub(1);
                segment.unread_records = segment.unread_records.saturating_sub(header.records);
                segment.outstanding += 1;
                self.show();
                Some(Taken {
                    segment: id,
                    records: header.records,
                })
            }
            None if segment.read >= segment.bytes => self.take(buf),
            None => {
                // Damaged since it was written or checked.
                let resume =
                    next_good(file, segment.read, segment.bytes, buf).unwrap_or(segment.bytes);
                xtcp_service::say!(
                    "xtcp-forwarder: spool segment {id}: {} corrupt bytes skipped",
                    resume - segment.read
                );
                count_corrupt(&self.metrics, resume - segment.read);
                segment.read = resume;
                if resume >= segment.bytes {
                    (segment.unread_entries, segment.unread_records) = (0, 0);
                }
                self.take(buf)
            }
        }
    }

    /// An entry taken from `segment` is acknowledged, or spooled again.
    pub fn resolved(&mut self, segment: u64) {
        if let Some(s) = self.segments.iter_mut().find(|s| s.id == segment) {
            s.outstanding = s.outstanding.saturating_sub(1);
        }
        self.collect();
        self.show();
    }

    /// Deletes the segments at the front that are wholly read back and
    /// resolved, the newest too (a later entry starts a new one).
    fn collect(&mut self) {
        while self.segments.front().is_some_and(Segment::done) {
            if self.segments.len() == 1 {
                self.writer = None;
            }
            if let Some(done) = self.segments.pop_front() {
                self.delete(done.id);
            }
        }
        if self.segments.is_empty() {
            self.said_bound = false;
        }
    }

    /// Forces what was written to disk, at most once a second unless `now`.
    fn sync(&mut self, now: bool) {
        if !self.unsynced || (!now && self.synced_at.elapsed() < SYNC_EVERY) {
            return;
        }
        if let Some(writer) = &self.writer {
            let _ = writer.sync_data();
        }
        self.unsynced = false;
        self.synced_at = Instant::now();
        self.show();
    }

    /// Once per receive-loop tick: forces writes to disk now and then,
    /// and ages the oldest entry.
    pub fn tick(&mut self) {
        self.sync(false);
        self.show();
    }

    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Updates the spool's gauges.
    fn show(&self) {
        let g = &self.metrics.gauges;
        g.spool_bytes.set(self.bytes() as i64);
        g.spool_segments.set(self.segments.len() as i64);
        g.spool_records
            .set(self.segments.iter().map(|s| s.unread_records).sum::<u64>() as i64);
        let oldest = self.segments.front().map_or(0, |s| s.first_ms);
        let age = if oldest == 0 {
            0
        } else {
            now_ms().saturating_sub(oldest) / 1000
        };
        g.spool_oldest_seconds.set(age as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn metrics() -> Arc<ForwarderMetrics> {
        Arc::new(ForwarderMetrics::new().unwrap())
    }

    /// A payload that says its number: `n` as 8 bytes, then filler.
    fn payload(n: u64, len: usize) -> Vec<u8> {
        let mut p = n.to_le_bytes().to_vec();
        p.resize(len.max(8), (n % 251) as u8);
        p
    }

    fn number(buf: &[u8]) -> u64 {
        u64::from_le_bytes(buf[..8].try_into().unwrap())
    }

    /// Takes and resolves everything; the numbers in order.
    fn drain(spool: &mut Spool) -> Vec<u64> {
        let (mut buf, mut seen) = (Vec::new(), Vec::new());
        while let Some(taken) = spool.take(&mut buf) {
            assert_eq!(taken.records, number(&buf) % 7 + 1);
            seen.push(number(&buf));
            spool.resolved(taken.segment);
        }
        seen
    }

    fn fill(spool: &mut Spool, numbers: std::ops::Range<u64>, len: usize) {
        for n in numbers {
            assert!(spool.append(&payload(n, len), n % 7 + 1, Why::Outage));
        }
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }

    #[test]
    fn entries_come_back_in_order_across_segments_and_restarts_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let m = metrics();
        let (mut spool, found) = Spool::open(dir.path(), MIN_BOUND, Arc::clone(&m)).unwrap();
        assert_eq!(found, Found::default());
        // 64 KiB segments: 100 entries of 3000 bytes take 5.
        fill(&mut spool, 0..100, 3000);
        assert_eq!(files(dir.path()).len(), 5);
        for file in files(dir.path()) {
            let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file:?}");
        }
        assert_eq!(m.gauges.spool_segments.get(), 5);
        assert_eq!(
            m.gauges.spool_bytes.get() as u64,
            100 * (HEADER as u64 + 3000)
        );
        let records: u64 = (0..100).map(|n| n % 7 + 1).sum();
        assert_eq!(m.gauges.spool_records.get() as u64, records);
        assert_eq!(m.counters.totals().spooled_outage_records, records);
        // Half read back, of which one is still outstanding at the "crash".
        let mut buf = Vec::new();
        for n in 0..50 {
            let taken = spool.take(&mut buf).unwrap();
            assert_eq!(number(&buf), n);
            if n != 10 {
                spool.resolved(taken.segment);
            }
        }
        // The first segment (entries 0..21) waits for entry 10.
        assert_eq!(files(dir.path()).len(), 5);
        drop(spool);

        let (mut spool, found) = Spool::open(dir.path(), MIN_BOUND, metrics()).unwrap();
        assert_eq!((found.segments, found.entries), (5, 100));
        let seen = drain(&mut spool);
        assert_eq!(
            seen,
            (0..100).collect::<Vec<_>>(),
            "at least once, in order"
        );
        fill(&mut spool, 100..103, 10);
        assert_eq!(drain(&mut spool), vec![100, 101, 102]);
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
        assert_eq!(spool.bytes(), 0);
    }

    /// A clean stop with nothing outstanding: the next start goes on where
    /// reading back stopped, in the middle of a segment, and repeats
    /// nothing. With something outstanding it saves nothing new, and the
    /// cursor saved before still holds.
    #[test]
    fn a_clean_stop_saves_where_reading_back_got_to() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), MIN_BOUND, metrics()).unwrap();
        fill(&mut spool, 0..40, 3000);
        let mut buf = Vec::new();
        for _ in 0..30 {
            let taken = spool.take(&mut buf).unwrap();
            spool.resolved(taken.segment);
        }
        spool.close();
        drop(spool);
        let (mut spool, found) = Spool::open(dir.path(), MIN_BOUND, metrics()).unwrap();
        assert_eq!(found.entries, 10);
        // One outstanding at this stop: the 10 again next time.
        spool.take(&mut buf).unwrap();
        assert_eq!(number(&buf), 30);
        spool.close();
        drop(spool);
        let (mut spool, _) = Spool::open(dir.path(), MIN_BOUND, metrics()).unwrap();
        assert_eq!(drain(&mut spool), (30..40).collect::<Vec<_>>());
        // Emptied: the cursor names a segment gone; new segments are
        // numbered after it, and it is removed at the next start.
        fill(&mut spool, 40..41, 10);
        spool.close();
        drop(spool);
        let (mut spool, found) = Spool::open(dir.path(), MIN_BOUND, metrics()).unwrap();
        assert_eq!(found.entries, 1);
        assert_eq!(drain(&mut spool), vec![40]);
        assert!(files(dir.path()).is_empty(), "{:?}", files(dir.path()));
    }

    #[test]
    fn a_segment_stays_until_each_entry_taken_from_it_is_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), MIN_BOUND, metrics()).unwrap();
        fill(&mut spool, 0..3, 100);
        let mut buf = Vec::new();
        let taken: Vec<Taken> = (0..3).map(|_| spool.take(&mut buf).unwrap()).collect();
        assert!(spool.take(&mut buf).is_none());
        for t in &taken {
            assert_eq!(files(dir.path()).len(), 1);
            spool.resolved(t.segment);
        }
        assert!(files(dir.path()).is_empty());
    }

    /// A crash mid-write leaves part of an entry: it is cut, counted, and
    /// the entries before it come back; new entries go to a new segment.
    #[test]
    fn a_torn_tail_is_cut_at_the_last_good_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), MIN_BOUND, metrics()).unwrap();
        fill(&mut spool, 0..3, 500);
        drop(spool);
        let file = files(dir.path()).remove(0);
        let whole = fs::metadata(&file).unwrap().len();
        let entry = (HEADER + 500) as u64;
        // The third entry half written.
        OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(whole - entry / 2)
            .unwrap();
        let m = metrics();
        let (mut spool, found) = Spool::open(dir.path(), MIN_BOUND, Arc::clone(&m)).unwrap();
        assert_eq!((found.entries, found.bytes), (2, 2 * entry));
        assert_eq!(fs::metadata(&file).unwrap().len(), 2 * entry, "cut");
        let t = m.counters.totals();
        assert_eq!(
            (t.spool_corrupt, t.spool_corrupt_bytes),
            (1, entry - entry / 2)
        );
        fill(&mut spool, 3..4, 500);
        assert_eq!(drain(&mut spool), vec![0, 1, 3]);
    }

    /// Damage inside a segment: the damaged entry is skipped, the good ones
    /// after it found again by their magic and checksum.
    #[test]
    fn a_corrupt_entry_in_the_middle_is_skipped() {
        let entry = (HEADER + 700) as u64;
        for (what, at) in [
            ("payload", entry + HEADER as u64 + 100),
            ("length", entry + 9),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (mut spool, _) = Spool::open(dir.path(), MIN_BOUND, metrics()).unwrap();
            fill(&mut spool, 0..4, 700);
            drop(spool);
            let file = files(dir.path()).remove(0);
            let mut bytes = fs::read(&file).unwrap();
            bytes[at as usize] ^= 0x5a;
            fs::write(&file, &bytes).unwrap();
            let m = metrics();
            let (mut spool, found) = Spool::open(dir.path(), MIN_BOUND, Arc::clone(&m)).unwrap();
            assert_eq!(found.entries, 3, "{what}");
            let t = m.counters.totals();
            assert_eq!(
                (t.spool_corrupt, t.spool_corrupt_bytes),
                (1, entry),
                "{what}"
            );
            assert_eq!(drain(&mut spool), vec![0, 2, 3], "{what}");
            assert!(files(dir.path()).is_empty());
        }
    }

    /// Damage after the start is found when read back, counted once.
    #[test]
    fn damage_while_running_is_skipped_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let m = metrics();
        let (mut spool, _) = Spool::open(dir.path(), MIN_BOUND, Arc::clone(&m)).unwrap();
        fill(&mut spool, 0..3, 300);
        let file = files(dir.path()).remove(0);
        let mut bytes = fs::read(&file).unwrap();
        bytes[HEADER + 50] ^= 1;
        fs::write(&file, &bytes).unwrap();
        assert_eq!(drain(&mut spool), vec![1, 2]);
        let t = m.counters.totals();
        assert_eq!(
            (t.spool_corrupt, t.spool_corrupt_bytes),
            (1, HEADER as u64 + 300)
        );
    }

    /// At the bound the oldest segments go, counted by their records; the
    /// newest entries are all kept.
    #[test]
    fn at_the_bound_the_oldest_segment_is_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let m = metrics();
        let (mut spool, _) = Spool::open(dir.path(), MIN_BOUND, Arc::clone(&m)).unwrap();
        let n = 1000;
        fill(&mut spool, 0..n, 4000 - HEADER);
        assert!(spool.bytes() <= MIN_BOUND, "{}", spool.bytes());
        let on_disk: u64 = files(dir.path())
            .iter()
            .map(|f| fs::metadata(f).unwrap().len())
            .sum();
        assert_eq!(on_disk, spool.bytes());
        let t = m.counters.totals();
        let seen = drain(&mut spool);
        assert_eq!(seen.last(), Some(&(n - 1)), "the newest kept");
        let first = seen[0];
        assert_eq!(seen, (first..n).collect::<Vec<_>>(), "a contiguous tail");
        assert_eq!(t.spool_bound, first);
        assert_eq!(
            t.spool_bound_records,
            (0..first).map(|n| n % 7 + 1).sum::<u64>()
        );
        // 16 segments of 64 KiB hold 16 entries of 4000 bytes each.
        assert!(seen.len() >= 240, "{}", seen.len());
    }

    /// A spool directory made by the forwarder is its user's alone.
    #[test]
    fn a_new_spool_directory_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("a/spool");
        Spool::open(&spool_dir, MIN_BOUND, metrics()).unwrap();
        let mode = fs::metadata(&spool_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn files_that_are_not_segments_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        fs::write(dir.path().join(format!("{:020}{SUFFIX}", 7)), b"").unwrap();
        let (mut spool, found) = Spool::open(dir.path(), MIN_BOUND, metrics()).unwrap();
        assert_eq!(found, Found::default());
        fill(&mut spool, 0..1, 10);
        // Numbered after what was there; the empty one deleted.
        assert_eq!(
            files(dir.path()),
            vec![
                dir.path().join(format!("{:020}{SUFFIX}", 8)),
                dir.path().join("notes.txt")
            ]
        );
    }
}
