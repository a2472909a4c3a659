//! A file of fixed-size slots holding the records of one table, so that every change
//! is one write in place and one fdatasync: no file is created, renamed or unlinked,
//! so no directory needs a flush, and the blocks written are already allocated.
//!
//! Each record (its JSON) sits at the start of a run of slots, behind a 32-byte
//! header: `LVS1`, the first 8 bytes of the SHA-256 of the rest, a sequence
//! number, the JSON's length and the run's length in slots. A crash mid-write
//! leaves a run whose checksum fails: no record, since the write was never
//! acknowledged; but its id, if legible, is still kept from losing its data (see
//! [`Damaged`]), as damage to an acknowledged record looks the same. A record is
//! replaced by writing the new version elsewhere first; until the old copy's
//! header is cleared (later, without a flush of its own) both may be on disk, and
//! the higher sequence number wins. Removal clears the header and flushes, which
//! also flushes every earlier clearing: they are dirty pages of the same file.
//!
//! Flushes are shared: writers that finish while an fdatasync runs wait for it and
//! then share the next one, so concurrent calls cost one flush between them. A
//! failed flush fails every write it covered and every later one: the kernel
//! reports a writeback error once, and pages it failed to write may be dropped,
//! so nothing written since can be called durable until a restart reads back
//! what the disk holds.

use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use crate::error::{Context, Error, Result};

/// One slot: a page, so that a small record is one aligned block write.
pub const SLOT: usize = 4096;
const HEADER: usize = 32;
/// Slots the file grows by when none is free: zeros written once, so that the
/// records that follow overwrite blocks already allocated (no size change to
/// flush) and a full root still has room for record changes.
const GROW: u64 = 64;
/// What growth writes: never written to, so it costs no memory of its own.
static ZEROS: [u8; GROW as usize * SLOT] = [0; GROW as usize * SLOT];
const MAGIC: &[u8; 4] = b"LVS1";

/// Where a record lives: its first slot and how many slots it spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start: u64,
    span: u64,
}

struct State {
    next_seq: u64,
    /// Slots in the file.
    end: u64,
    free: BTreeSet<u64>,
    /// Each record's run and sequence number.
    live: HashMap<String, (Run, u64)>,
}

pub struct SlotFile {
    file: File,
    path: PathBuf,
    state: Mutex<State>,
    flushes: Mutex<Flushes>,
    flushed: Condvar,
}

/// Writes are numbered as they finish; a flush started after write n covers it.
#[derive(Default)]
struct Flushes {
    written: u64,
    synced: u64,
    running: bool,
    failed: Option<String>,
}

/// A record read back at open: its id and its bytes.
pub struct Loaded {
    pub id: String,
    pub payload: Vec<u8>,
}

/// A slot that starts like a record but fails its checksum: a write a crash
/// tore (never acknowledged), or damage to a record that was. Its id, when its
/// first bytes still hold one, keeps that volume's data from being taken for a
/// leftover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    pub slot: u64,
    pub id: Option<String>,
}

/// What a slot file holds: the newest valid record of each id, and the damaged
/// slots whose id has no valid record.
pub struct Contents {
    pub records: Vec<Loaded>,
    pub damaged: Vec<Damaged>,
}

/// The id a damaged run's JSON starts with (`{"id":"...`), if it is legible.
fn legible_id(run: &[u8]) -> Option<String> {
    let head = run.get(HEADER..run.len().min(HEADER + 512))?;
    const KEY: &[u8] = b"\"id\":\"";
    let at = head.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = head[at..].iter().position(|&b| b == b'"')?;
    let id = std::str::from_utf8(&head[at..at + len]).ok()?;
    let plausible = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    plausible.then(|| id.to_string())
}

fn checksum(rest: &[u8]) -> [u8; 8] {
    let d = Sha256::digest(rest);
    d[..8].try_into().expect("8 bytes")
}

/// The bytes of a run holding `payload`, header first, zero-padded to whole slots.
fn encode(seq: u64, payload: &[u8]) -> Vec<u8> {
    let span = span_of(payload.len());
    let mut buf = vec![0u8; span as usize * SLOT];
    buf[0..4].copy_from_slice(MAGIC);
    buf[12..20].copy_from_slice(&seq.to_le_bytes());
    buf[20..24].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    buf[24..28].copy_from_slice(&(span as u32).to_le_bytes());
    buf[HEADER..HEADER + payload.len()].copy_from_slice(payload);
    let sum = checksum(&buf[12..HEADER + payload.len()]);
    buf[4..12].copy_from_slice(&sum);
    buf
}

fn span_of(len: usize) -> u64 {
    (HEADER + len).div_ceil(SLOT) as u64
}

/// The valid run at the start of `run` (its first slot onwards): seq, span, payload.
fn decode(run: &[u8]) -> Option<(u64, u64, &[u8])> {
    let head = run.get(..HEADER)?;
    if &head[0..4] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(head[12..20].try_into().ok()?);
    let len = u32::from_le_bytes(head[20..24].try_into().ok()?) as usize;
    let span = u32::from_le_bytes(head[24..28].try_into().ok()?) as u64;
    if span != span_of(len) {
        return None;
    }
    let body = run.get(12..HEADER + len)?;
    if checksum(body) != head[4..12] {
        return None;
    }
    Some((seq, span, &body[HEADER - 12..]))
}

/// Walks the valid runs of a slot file in order, a slot at a time (the kernel's
/// readahead makes that a sequential read), so memory does not grow with the file.
/// Returns the number of slots.
fn scan(
    file: &File,
    mut visit: impl FnMut(Run, u64, &[u8]),
) -> std::io::Result<(u64, Vec<Damaged>)> {
    let end = file.metadata()?.len() / SLOT as u64;
    let mut damaged = Vec::new();
    let mut buf = vec![0u8; SLOT];
    let mut slot = 0;
    while slot < end {
        buf.resize(SLOT, 0);
        file.read_exact_at(&mut buf, slot * SLOT as u64)?;
        let span = u32::from_le_bytes(buf[24..28].try_into().expect("4 bytes")) as u64;
        if &buf[0..4] == MAGIC && span > 1 && slot + span <= end {
            buf.resize(span as usize * SLOT, 0);
            file.read_exact_at(&mut buf[SLOT..], (slot + 1) * SLOT as u64)?;
        }
        match decode(&buf) {
            Some((seq, span, payload)) if slot + span <= end => {
                visit(Run { start: slot, span }, seq, payload);
                slot += span;
            }
            _ => {
                if &buf[0..4] == MAGIC {
                    damaged.push(Damaged {
                        slot,
                        id: legible_id(&buf),
                    });
                }
                slot += 1;
            }
        }
    }
    Ok((end, damaged))
}

/// A slot file read through once.
struct Survey {
    /// Slots in the file.
    end: u64,
    next_seq: u64,
    /// The newest valid copy of each id: sequence number, run, payload.
    newest: HashMap<String, (u64, Run, Vec<u8>)>,
    /// Older copies of ids in `newest`, which a crash left uncleared.
    stale: Vec<Run>,
    /// Valid runs whose payload has no id.
    anonymous: Vec<Run>,
    /// Damaged slots whose id has no valid record.
    damaged: Vec<Damaged>,
}

fn survey(file: &File, id_of: impl Fn(&[u8]) -> Option<String>) -> std::io::Result<Survey> {
    let mut newest: HashMap<String, (u64, Run, Vec<u8>)> = HashMap::new();
    let (mut stale, mut anonymous) = (Vec::new(), Vec::new());
    let mut next_seq = 1;
    let (end, damaged) = scan(file, |run, seq, payload| {
        next_seq = next_seq.max(seq + 1);
        let Some(id) = id_of(payload) else {
            anonymous.push(run);
            return;
        };
        match newest.get(&id) {
            Some(&(s, _, _)) if s > seq => stale.push(run),
            _ => {
                if let Some((_, old, _)) = newest.insert(id, (seq, run, payload.to_vec())) {
                    stale.push(old);
                }
            }
        }
    })?;
    let damaged = damaged
        .into_iter()
        .filter(|d| d.id.as_ref().is_none_or(|id| !newest.contains_key(id)))
        .collect();
    Ok(Survey {
        end,
        next_seq,
        newest,
        stale,
        anonymous,
        damaged,
    })
}

impl SlotFile {
    /// Opens (creating) the file and reads back the newest valid record of each id;
    /// `id_of` reads a payload's id. Stale copies a crash left are cleared durably
    /// before anything is served, so a later removal cannot uncover them.
    pub fn open(
        path: PathBuf,
        id_of: impl Fn(&[u8]) -> Option<String>,
    ) -> Result<(SlotFile, Contents)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .ctx(|| format!("open {}", path.display()))?;
        let survey = survey(&file, id_of).ctx(|| format!("read {}", path.display()))?;
        for run in &survey.stale {
            file.write_all_at(&[0u8; HEADER], run.start * SLOT as u64)
                .ctx(|| format!("clear a stale record in {}", path.display()))?;
        }
        if !survey.stale.is_empty() {
            file.sync_data()
                .ctx(|| format!("fdatasync {}", path.display()))?;
        }
        let mut taken = BTreeSet::new();
        for run in &survey.anonymous {
            // Valid but of no known shape (a newer version's?): kept, never reused.
            tracing::error!(path = %path.display(), slot = run.start, "record without an id; its slots are kept as they are");
            taken.extend(run.start..run.start + run.span);
        }
        // A damaged slot is kept as it is while its id has no valid record, so
        // that the next start-up still knows the id; the retry of a torn create
        // writes the record anew, and then the slot is free again.
        taken.extend(survey.damaged.iter().map(|d| d.slot));
        let mut live = HashMap::new();
        let mut loaded = Vec::new();
        for (id, (seq, run, payload)) in survey.newest {
            taken.extend(run.start..run.start + run.span);
            loaded.push(Loaded {
                id: id.clone(),
                payload,
            });
            live.insert(id, (run, seq));
        }
        let (end, next_seq, damaged) = (survey.end, survey.next_seq, survey.damaged);
        let free = (0..end).filter(|s| !taken.contains(s)).collect();
        let state = State {
            next_seq,
            end,
            free,
            live,
        };
        Ok((
            SlotFile {
                file,
                path,
                state: Mutex::new(state),
                flushes: Mutex::new(Flushes::default()),
                flushed: Condvar::new(),
            },
            Contents {
                records: loaded,
                damaged,
            },
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every write finished before this call durable: one fdatasync, or a
    /// share of one that starts after it.
    fn flush(&self) -> std::io::Result<()> {
        let mut f = self.flushes.lock().unwrap_or_else(|e| e.into_inner());
        f.written += 1;
        let ticket = f.written;
        loop {
            if let Some(e) = &f.failed {
                return Err(std::io::Error::other(format!(
                    "an earlier flush of this file failed ({e}); restart the driver to read back what the disk holds"
                )));
            }
            if f.synced >= ticket {
                return Ok(());
            }
            if f.running {
                f = self.flushed.wait(f).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            f.running = true;
            let covers = f.written;
            drop(f);
            let result = self.file.sync_data();
            f = self.flushes.lock().unwrap_or_else(|e| e.into_inner());
            f.running = false;
            match &result {
                Ok(()) => f.synced = covers,
                Err(e) => f.failed = Some(e.to_string()),
            }
            self.flushed.notify_all();
            result?;
        }
    }

    /// Writes `payload` as the record of `id`, durably, replacing any earlier one.
    pub fn write(&self, id: &str, payload: &[u8]) -> Result<()> {
        let (run, seq) = {
            let mut st = self.lock();
            let span = span_of(payload.len());
            let run = match st.allocate(span) {
                Some(run) => run,
                None => {
                    // Under the lock: no one may take the new slots before they
                    // are zeros. The next flush makes them durable.
                    let more = GROW.max(span);
                    for chunk in (st.end..st.end + more).step_by(GROW as usize) {
                        let n = GROW.min(st.end + more - chunk) as usize;
                        self.file
                            .write_all_at(&ZEROS[..n * SLOT], chunk * SLOT as u64)
                            .map_err(|e| {
                                no_space_or_io(e, format!("grow {}", self.path.display()))
                            })?;
                    }
                    let end = st.end;
                    st.release(Run {
                        start: end,
                        span: more,
                    });
                    st.end += more;
                    st.allocate(span).expect("room was just made")
                }
            };
            let seq = st.next_seq;
            st.next_seq += 1;
            (run, seq)
        };
        let bytes = encode(seq, payload);
        let at = run.start * SLOT as u64;
        let written = self
            .file
            .write_all_at(&bytes, at)
            .and_then(|()| self.flush());
        if let Err(e) = written {
            // Never acknowledged: clear it so a restart does not take it, and give
            // the slots back only if that worked.
            let mut st = self.lock();
            if self.file.write_all_at(&[0u8; HEADER], at).is_ok() {
                st.release(run);
            }
            return Err(no_space_or_io(
                e,
                format!("write a record to {}", self.path.display()),
            ));
        }
        let mut st = self.lock();
        let old = match st.live.get(id) {
            // A newer write of the same id got in first (callers lock per id, so
            // only a bug gets here): ours is the stale one.
            Some(&(_, s)) if s > seq => Some(run),
            _ => st.live.insert(id.to_string(), (run, seq)).map(|(r, _)| r),
        };
        if let Some(old) = old {
            crate::faults::point("record.replaced");
            // Flushed by the next fdatasync of this file, whoever makes it; until
            // then the new copy outranks the old by its sequence number.
            if self
                .file
                .write_all_at(&[0u8; HEADER], old.start * SLOT as u64)
                .is_ok()
            {
                st.release(old);
            }
        }
        Ok(())
    }

    /// Removes the record of `id` durably; removing an absent record is fine.
    pub fn remove(&self, id: &str) -> Result<()> {
        let Some((run, _)) = self.lock().live.get(id).copied() else {
            return Ok(());
        };
        self.file
            .write_all_at(&[0u8; HEADER], run.start * SLOT as u64)
            .and_then(|()| self.flush())
            .ctx(|| format!("remove a record from {}", self.path.display()))?;
        let mut st = self.lock();
        if st.live.get(id).map(|(r, _)| r) == Some(&run) {
            st.live.remove(id);
            st.release(run);
        }
        Ok(())
    }

    /// Slots in the file, used or not (for tests and status).
    pub fn slots(&self) -> u64 {
        self.lock().end
    }
}

impl State {
    /// A free single slot, or a free run of `span`: the lowest.
    fn allocate(&mut self, span: u64) -> Option<Run> {
        if span == 1 {
            return self.free.pop_first().map(|start| Run { start, span });
        }
        // Records longer than a slot are rare (very long parameters): a scan of
        // the free slots is fine for them.
        let mut run_start = None;
        let mut prev = None;
        for &s in &self.free {
            if prev.map(|p| p + 1) != Some(s) {
                run_start = Some(s);
            }
            prev = Some(s);
            let start = run_start.expect("set above");
            if s + 1 - start == span {
                for x in start..start + span {
                    self.free.remove(&x);
                }
                return Some(Run { start, span });
            }
        }
        None
    }

    fn release(&mut self, run: Run) {
        self.free.extend(run.start..run.start + run.span);
    }
}

fn no_space_or_io(e: std::io::Error, what: String) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        Error::NoSpace(format!("{what}: the root's filesystem is full"))
    } else {
        Error::io(what, e)
    }
}

/// Reads the newest valid records of a slot file without opening it for writing
/// (for `localvol status`, which may run beside the driver).
pub fn read(path: &Path, id_of: impl Fn(&[u8]) -> Option<String>) -> std::io::Result<Contents> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Contents {
                records: vec![],
                damaged: vec![],
            })
        }
        Err(e) => return Err(e),
    };
    let survey = survey(&file, id_of)?;
    Ok(Contents {
        records: survey
            .newest
            .into_iter()
            .map(|(id, (_, _, payload))| Loaded { id, payload })
            .collect(),
        damaged: survey.damaged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(p: &[u8]) -> Option<String> {
        let s = std::str::from_utf8(p).ok()?;
        Some(s.split(':').next()?.to_string())
    }

    fn open(path: &Path) -> (SlotFile, Vec<(String, String)>) {
        let (f, contents) = SlotFile::open(path.to_path_buf(), id_of).unwrap();
        let mut got: Vec<_> = contents
            .records
            .into_iter()
            .map(|l| (l.id, String::from_utf8(l.payload).unwrap()))
            .collect();
        got.sort();
        (f, got)
    }

    #[test]
    fn records_are_replaced_removed_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slots");
        let (f, got) = open(&path);
        assert!(got.is_empty());
        f.write("a", b"a:1").unwrap();
        f.write("b", b"b:1").unwrap();
        f.write("a", b"a:2").unwrap();
        f.write("c", b"c:1").unwrap();
        f.remove("b").unwrap();
        f.remove("never").unwrap();
        // The file grew once, by GROW slots of zeros.
        assert_eq!(f.slots(), GROW);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), GROW * SLOT as u64);
        drop(f);
        let (f, got) = open(&path);
        assert_eq!(
            got,
            [("a".into(), "a:2".into()), ("c".into(), "c:1".into())]
        );
        assert_eq!(f.slots(), GROW);
        assert_eq!(read(&path, id_of).unwrap().records.len(), 2);
    }

    #[test]
    fn long_records_span_slots_and_their_room_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slots");
        let (f, _) = open(&path);
        let long = format!("big:{}", "x".repeat(3 * SLOT));
        f.write("s", b"s:1").unwrap();
        f.write("big", long.as_bytes()).unwrap();
        assert_eq!(f.slots(), GROW);
        f.remove("big").unwrap();
        // Freed runs are reused: many long records come and go, the file stays.
        for i in 0..200 {
            let id = format!("big{}", i % 3);
            f.write(&id, format!("{id}:{}", "y".repeat(2 * SLOT)).as_bytes())
                .unwrap();
            if i % 3 != 2 {
                f.remove(&id).unwrap();
            }
        }
        assert_eq!(f.slots(), GROW);
        f.remove("big2").unwrap();
        // One that does not fit in what is left grows the file by itself.
        let huge = format!("huge:{}", "z".repeat(GROW as usize * SLOT));
        f.write("huge", huge.as_bytes()).unwrap();
        assert_eq!(f.slots(), 2 * GROW + 1);
        f.write("big2", format!("big2:{}", "y".repeat(2 * SLOT)).as_bytes())
            .unwrap();
        f.remove("huge").unwrap();
        f.write("t", b"t:1").unwrap();
        drop(f);
        let (_, got) = open(&path);
        assert_eq!(
            got.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
            ["big2", "s", "t"]
        );
    }

    #[test]
    fn a_torn_write_reads_as_absent_and_the_older_copy_stands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slots");
        let (f, _) = open(&path);
        f.write("a", b"a:old").unwrap();
        drop(f);
        // A newer copy whose last bytes never reached the disk.
        let mut torn = encode(99, b"a:new");
        torn[HEADER + 4] ^= 0xff;
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        raw.write_all_at(&torn, SLOT as u64).unwrap();
        drop(raw);
        let (f, got) = open(&path);
        assert_eq!(got, [("a".into(), "a:old".into())]);
        // Its slot is free again.
        f.write("b", b"b:1").unwrap();
        assert_eq!(f.slots(), GROW);
    }

    #[test]
    fn a_run_cut_short_by_the_end_of_the_file_reads_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slots");
        let (f, _) = open(&path);
        f.write("s", b"s:1").unwrap();
        f.write("big", format!("big:{}", "x".repeat(2 * SLOT)).as_bytes())
            .unwrap();
        drop(f);
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        raw.set_len(3 * SLOT as u64).unwrap();
        drop(raw);
        let (f, got) = open(&path);
        assert_eq!(got, [("s".into(), "s:1".into())]);
        assert_eq!(f.slots(), 3);
    }

    #[test]
    fn a_stale_copy_left_by_a_crash_is_cleared_and_never_uncovered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slots");
        let (f, _) = open(&path);
        f.write("a", b"a:1").unwrap();
        drop(f);
        // A crash after the new copy's flush, before the old header was cleared.
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        raw.write_all_at(&encode(7, b"a:2"), SLOT as u64).unwrap();
        drop(raw);
        let (f, got) = open(&path);
        assert_eq!(got, [("a".into(), "a:2".into())]);
        f.remove("a").unwrap();
        drop(f);
        let (_, got) = open(&path);
        assert!(got.is_empty(), "the old copy came back: {got:?}");
    }

    #[test]
    fn concurrent_writes_and_removes_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slots");
        let (f, _) = open(&path);
        std::thread::scope(|s| {
            for t in 0..4 {
                let f = &f;
                s.spawn(move || {
                    for i in 0..50 {
                        let id = format!("{t}-{i}");
                        f.write(&id, format!("{id}:x").as_bytes()).unwrap();
                        if i % 2 == 0 {
                            f.remove(&id).unwrap();
                        }
                    }
                });
            }
        });
        drop(f);
        let (_, got) = open(&path);
        assert_eq!(got.len(), 100);
    }

    #[test]
    fn a_damaged_record_keeps_its_id_known_and_its_slot_until_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slots");
        let json_id = crate::store::id_of;
        let (f, _) = SlotFile::open(path.clone(), json_id).unwrap();
        f.write("vol-a", br#"{"id":"vol-a","size":1}"#).unwrap();
        f.write("vol-b", br#"{"id":"vol-b","size":2}"#).unwrap();
        drop(f);
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        // vol-a: a flipped bit past its id; vol-b: its id itself damaged.
        raw.write_all_at(b"3", (HEADER + 21) as u64).unwrap();
        raw.write_all_at(b"\0", (SLOT + HEADER + 8) as u64).unwrap();
        drop(raw);
        let damaged = |c: &Contents| {
            let mut d: Vec<_> = c.damaged.iter().map(|d| (d.slot, d.id.clone())).collect();
            d.sort();
            d
        };
        let got = read(&path, json_id).unwrap();
        assert!(got.records.is_empty());
        assert_eq!(damaged(&got), [(0, Some("vol-a".into())), (1, None)]);
        let (f, contents) = SlotFile::open(path.clone(), json_id).unwrap();
        assert_eq!(damaged(&contents), [(0, Some("vol-a".into())), (1, None)]);
        // Neither slot is reused while its record is missing.
        f.write("vol-c", br#"{"id":"vol-c"}"#).unwrap();
        f.write("vol-a", br#"{"id":"vol-a","size":1}"#).unwrap();
        drop(f);
        let (_, contents) = SlotFile::open(path.clone(), json_id).unwrap();
        assert_eq!(contents.records.len(), 2);
        // vol-a has a valid record again: its damaged slot is free.
        assert_eq!(damaged(&contents), [(1, None)]);
    }
}
