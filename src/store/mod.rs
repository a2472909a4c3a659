//! Records of what was asked, one JSON document per volume and per snapshot, so
//! that a crash at any instant leaves either the old record or the new one.
//!
//! This node's records live in a slot file per table (`slots`): each change is one
//! write in place and one fdatasync. Records on the shared root, which other
//! nodes read and write too, are one file each, replaced atomically (write, fsync,
//! rename, fsync the directory).
//!
//! The records are read once at start-up into an ordered map; after that every call
//! costs one record write at most, whatever the number of volumes. The kernel's facts
//! (mounts, loop devices) are never recorded here: they are read from the kernel.

mod entries;
pub mod slots;

use entries::Entries;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use crate::access::{AccessMode, Capability};
use crate::error::{Context, Result};
use crate::params::VolumeType;

/// Where a volume's first data came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentSource {
    Snapshot(String),
    Volume(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub readonly: bool,
    /// The capability it was published with (absent in records of older versions):
    /// a repeat with another one is another request.
    #[serde(default)]
    pub mode: Option<AccessMode>,
    #[serde(default)]
    pub block: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: String,
    pub name: String,
    pub volume_type: VolumeType,
    pub capacity_bytes: u64,
    /// The StorageClass parameters as given (kept for idempotency checks and status).
    pub parameters: BTreeMap<String, String>,
    /// The capabilities the volume was created for.
    pub capabilities: Vec<Capability>,
    /// Filesystem of a loop mount volume, fixed at creation.
    #[serde(default)]
    pub fs_type: Option<String>,
    /// Lives on the shared root: every node reaches it, no node topology.
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub source: Option<ContentSource>,
    /// The node whose storage holds the volume (empty when shared).
    pub node_id: String,
    pub created_unix: i64,
    /// Nodes the volume is controller-published to (ControllerPublishVolume).
    #[serde(default)]
    pub attachments: BTreeMap<String, Attachment>,
    /// A format of ours may have been interrupted: what it left is not data.
    /// Kept only for volumes whose content could be data (`prepare_filesystem`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub formatting: bool,
    /// Where a loop volume is staged for block access. Such a stage mounts
    /// nothing, so the mount table cannot tell its path from any other; without
    /// it (records written before it was kept) any path is taken for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_staging: Option<PathBuf>,
    /// The device size a stage last grew the filesystem for: what that growth
    /// left unused is not looked at again until the device grows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grown_for: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub name: String,
    pub source_volume_id: String,
    pub volume_type: VolumeType,
    #[serde(default)]
    pub fs_type: Option<String>,
    pub size_bytes: u64,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    pub created_unix: i64,
    #[serde(default)]
    pub created_nanos: i32,
    /// Set while the copy is cut but not yet durable: the boot it was cut in. A
    /// restart within that boot finishes it (the page cache survived a crash); a
    /// snapshot pending across a reboot may be partial and is discarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syncing_boot: Option<String>,
}

impl SnapshotRecord {
    /// CSI's ready_to_use: the data is complete and durable.
    pub fn ready(&self) -> bool {
        self.syncing_boot.is_none()
    }
}

/// Something stored under its id.
pub trait Record: Clone + Serialize + DeserializeOwned {
    fn id(&self) -> &str;
    /// What records are listed by besides their id (see `Table::page_of_group`).
    fn group(&self) -> Option<&str> {
        None
    }
}

impl Record for VolumeRecord {
    fn id(&self) -> &str {
        &self.id
    }
}

impl Record for SnapshotRecord {
    fn id(&self) -> &str {
        &self.id
    }
    /// ListSnapshots filters by source volume.
    fn group(&self) -> Option<&str> {
        Some(&self.source_volume_id)
    }
}

/// The name of a table's slot file in its directory.
pub const SLOT_FILE: &str = "slots";

/// A directory in a slot table's directory that stops a localvol of an earlier
/// version at start-up: it reads every `*.json` entry as a record file and fails
/// on a directory, naming it. Without it, that version would find no records and
/// take every volume's data for leftovers to remove.
pub const TOO_OLD_GUARD: &str = "this-root-needs-a-newer-localvol.json";

/// How a table keeps its records on disk.
enum Medium {
    /// One JSON file per record, replaced atomically.
    Files,
    /// One slot file for the whole table.
    Slots(slots::SlotFile),
}

/// The id of a record whose shape may be unknown (another version's).
pub fn id_of(json: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        id: String,
    }
    serde_json::from_slice::<Id>(json).ok().map(|r| r.id)
}

/// A directory of records of one kind, mirrored in memory in id order.
pub struct Table<T: Record> {
    dir: PathBuf,
    medium: Medium,
    map: RwLock<Entries<T>>,
    /// Ids whose record exists but cannot be read: their data is never treated
    /// as a leftover.
    unreadable: std::collections::BTreeSet<String>,
    /// Damaged records whose id cannot be read either: while there are any, no
    /// data is a leftover, since any of it may be theirs.
    illegible: usize,
    /// For records in files (the shared root, where other nodes write too): the
    /// directory's modification time when the map last matched it.
    listed: std::sync::Mutex<Option<std::time::SystemTime>>,
}

impl<T: Record> Table<T> {
    /// Loads every record in `dir`, creating it if needed. Temporary files of writes
    /// that a crash interrupted are removed: the record they were replacing stands.
    pub fn open(dir: PathBuf) -> Result<Self> {
        // Temporary files in it are removed: it must not be a symlink to elsewhere.
        crate::backend::dir::own_dir(&dir)?;
        let mtime = modified(&dir);
        let (map, unreadable) = read_records(&dir, true)?;
        Ok(Table {
            dir,
            medium: Medium::Files,
            map: RwLock::new(Entries::new(map)),
            unreadable,
            illegible: 0,
            listed: std::sync::Mutex::new(mtime),
        })
    }

    /// Reads the records in files again if their directory changed since they were
    /// last read (another node made, replaced or removed one): one stat otherwise.
    pub fn refresh(&self) -> Result<()> {
        if !matches!(self.medium, Medium::Files) {
            return Ok(());
        }
        let mut listed = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        let before = modified(&self.dir);
        if before.is_some() && before == *listed {
            return Ok(());
        }
        let (map, unreadable) = read_records::<T>(&self.dir, false)?;
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = Entries::new(map);
        // Changed while it was read, or a record caught half-written (another
        // node's create writes in place): read it again next time.
        *listed = before.filter(|b| unreadable.is_empty() && modified(&self.dir) == Some(*b));
        Ok(())
    }

    /// Loads the table kept in a slot file in `dir`. Records still in files of an
    /// earlier version are moved into it first; that cannot be undone, so an
    /// earlier localvol must not be started on this root again.
    pub fn open_slots(dir: PathBuf) -> Result<Self> {
        let files = Self::open(dir)?;
        let guard = files.dir.join(TOO_OLD_GUARD);
        match fs::create_dir(&guard) {
            Ok(()) => sync_dir(&files.dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(crate::error::Error::io(
                    format!("create {}", guard.display()),
                    e,
                ))
            }
        }
        let path = files.dir.join(SLOT_FILE);
        let (slots, contents) = slots::SlotFile::open(path.clone(), id_of)?;
        let mut map = BTreeMap::new();
        let mut unreadable = files.unreadable;
        let mut illegible = 0;
        for d in contents.damaged {
            match d.id {
                Some(id) => {
                    tracing::error!(path = %path.display(), slot = d.slot, id = %id,
                        "record is damaged (its checksum fails); its data is kept until it is repaired or removed");
                    unreadable.insert(id);
                }
                None => {
                    tracing::error!(path = %path.display(), slot = d.slot,
                        "a damaged record's id is illegible: data without a record is kept, not removed, while it is there");
                    illegible += 1;
                }
            }
        }
        for l in contents.records {
            match serde_json::from_slice::<T>(&l.payload) {
                Ok(rec) => {
                    map.insert(l.id, rec);
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), id = %l.id, error = %e,
                        "record is unreadable; it is ignored, and its data kept, until repaired or removed");
                    unreadable.insert(l.id);
                }
            }
        }
        let moved = files
            .map
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .into_map();
        if !moved.is_empty() {
            // Written to the slots durably before any file goes; the files' removal
            // is durable before anything is served, so a stale file cannot later
            // overwrite a newer slot.
            for rec in moved.values() {
                slots.write(
                    rec.id(),
                    &serde_json::to_vec(rec).expect("records serialize"),
                )?;
            }
            for id in moved.keys() {
                let path = files.dir.join(format!("{id}.json"));
                fs::remove_file(&path).ctx(|| format!("remove {}", path.display()))?;
            }
            sync_dir(&files.dir)?;
            tracing::info!(dir = %files.dir.display(), records = moved.len(), "records moved from one file each into the slot file");
            map.extend(moved);
        }
        Ok(Table {
            dir: files.dir,
            medium: Medium::Slots(slots),
            map: RwLock::new(Entries::new(map)),
            unreadable,
            illegible,
            listed: std::sync::Mutex::new(None),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn get(&self, id: &str) -> Option<T> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a record for `id` exists but could not be read at start-up.
    pub fn is_unreadable(&self, id: &str) -> bool {
        self.unreadable.contains(id)
    }

    /// Whether records were found damaged beyond reading their ids: then data
    /// without a record may be theirs.
    pub fn has_illegible(&self) -> bool {
        self.illegible > 0
    }

    /// Writes a record that does not exist yet, durably. In a slot table that is
    /// any write. In files, it is written in place rather than through a temporary
    /// file and a rename, which saves a sync: a crash mid-write leaves an
    /// unreadable file for an id whose creation was never acknowledged, and the
    /// retry replaces it.
    pub fn put_new(&self, rec: &T) -> Result<()> {
        if let Medium::Slots(_) = self.medium {
            return self.put(rec);
        }
        let bytes = serde_json::to_vec_pretty(rec).expect("records serialize");
        let path = self.path(rec.id());
        let create = || {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
        };
        let mut f = match create() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                fs::remove_file(&path).ctx(|| format!("remove {}", path.display()))?;
                create()
            }
            other => other,
        }
        .ctx(|| format!("create {}", path.display()))?;
        f.write_all(&bytes)
            .ctx(|| format!("write {}", path.display()))?;
        f.sync_all().ctx(|| format!("fsync {}", path.display()))?;
        sync_dir(&self.dir)?;
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(rec.clone());
        Ok(())
    }

    /// Writes the record durably, then makes it visible.
    pub fn put(&self, rec: &T) -> Result<()> {
        match &self.medium {
            Medium::Files => {
                let bytes = serde_json::to_vec_pretty(rec).expect("records serialize");
                write_atomic(&self.path(rec.id()), &bytes)?;
            }
            Medium::Slots(s) => {
                s.write(
                    rec.id(),
                    &serde_json::to_vec(rec).expect("records serialize"),
                )?;
            }
        }
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(rec.clone());
        Ok(())
    }

    /// Removes the record durably; removing an absent record is fine.
    pub fn remove(&self, id: &str) -> Result<()> {
        if let Medium::Slots(s) = &self.medium {
            s.remove(id)?;
            self.map
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            return Ok(());
        }
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(crate::error::Error::io(
                    format!("remove {}", path.display()),
                    e,
                ))
            }
        }
        self.map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(())
    }

    /// Up to `max` records with ids after `after` (all when `max` is 0), and the
    /// id to continue after when more remain.
    pub fn page(&self, after: Option<&str>, max: usize) -> (Vec<T>, Option<String>) {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        take_page(map.after(after), max)
    }

    /// Like `page`, of the records of one group only: costs what the group holds.
    pub fn page_of_group(
        &self,
        group: &str,
        after: Option<&str>,
        max: usize,
    ) -> (Vec<T>, Option<String>) {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        take_page(map.of_group_after(group, after), max)
    }

    /// Reads one record again from disk (another node may have written it, on a
    /// shared root), updating the in-memory copy.
    pub fn reload(&self, id: &str) -> Option<T> {
        if let Medium::Slots(_) = self.medium {
            // No one else writes this node's slots.
            return self.get(id);
        }
        let fresh = fs::read(self.path(id))
            .ok()
            .and_then(|b| serde_json::from_slice::<T>(&b).ok());
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        match &fresh {
            Some(rec) => map.insert(rec.clone()),
            None => map.remove(id),
        }
        fresh
    }

    /// Every record, in id order.
    pub fn all(&self) -> Vec<T> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// Up to `max` records (all when `max` is 0), and the id to continue after when
/// more remain.
fn take_page<'a, T: Record + 'a>(
    records: impl Iterator<Item = &'a T>,
    max: usize,
) -> (Vec<T>, Option<String>) {
    let mut out: Vec<T> = Vec::new();
    for rec in records {
        if max > 0 && out.len() == max {
            let next = out.last().map(|r| r.id().to_string());
            return (out, next);
        }
        out.push(rec.clone());
    }
    (out, None)
}

/// A temporary record file older than this is no write in progress.
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(600);

fn modified(dir: &Path) -> Option<std::time::SystemTime> {
    fs::metadata(dir).and_then(|m| m.modified()).ok()
}

/// The readable records in `dir`, and the ids of those that are not. Temporary
/// files of interrupted writes are removed if `remove_temporary` (at start-up).
fn read_records<T: Record>(
    dir: &Path,
    remove_temporary: bool,
) -> Result<(BTreeMap<String, T>, std::collections::BTreeSet<String>)> {
    let mut map = BTreeMap::new();
    let mut unreadable = std::collections::BTreeSet::new();
    for entry in fs::read_dir(dir).ctx(|| format!("read {}", dir.display()))? {
        let entry = entry.ctx(|| format!("read {}", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == TOO_OLD_GUARD {
            continue;
        }
        if name.ends_with(".tmp") {
            // Left by a write a crash interrupted; on the shared root a recent one
            // may be another node's write in progress.
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_TEMPORARY));
            if remove_temporary && stale {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        if !name.ends_with(".json") {
            continue;
        }
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            // Removed by another node since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).ctx(|| format!("read {}", path.display())),
        };
        match serde_json::from_slice::<T>(&bytes) {
            Ok(rec) => {
                map.insert(rec.id().to_string(), rec);
            }
            Err(e) => {
                if remove_temporary {
                    tracing::error!(path = %path.display(), error = %e,
                        "record is unreadable; it is ignored, and its data kept, until repaired or removed");
                }
                unreadable.insert(name.trim_end_matches(".json").to_string());
            }
        }
    }
    Ok((map, unreadable))
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("record paths have a parent");
    // A name of this write's own: on the shared root another node may be writing
    // the same record, and a shared name would let the two writes mix.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_extension(format!("json.{}-{nanos}.tmp", std::process::id()));
    let mut f = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
    f.write_all(bytes)
        .ctx(|| format!("write {}", tmp.display()))?;
    f.sync_all().ctx(|| format!("fsync {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path).ctx(|| format!("rename {} into place", tmp.display()))?;
    sync_dir(dir)
}

/// Makes a directory's entries (a create, rename or unlink) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("fsync directory {}", dir.display()))
}

/// All records of the driver.
pub struct Store {
    pub volumes: Table<VolumeRecord>,
    pub snapshots: Table<SnapshotRecord>,
    /// Records of shared volumes, on the shared root where every node reads them.
    pub shared_volumes: Option<Table<VolumeRecord>>,
}

impl Store {
    pub fn open(state_dir: &Path, shared_state_dir: Option<&Path>) -> Result<Self> {
        Ok(Store {
            volumes: Table::open_slots(state_dir.join("volumes"))?,
            snapshots: Table::open_slots(state_dir.join("snapshots"))?,
            shared_volumes: match shared_state_dir {
                Some(d) => Some(Table::open(d.join("volumes"))?),
                None => None,
            },
        })
    }

    /// A volume's record: local first, then the shared root read afresh, since
    /// another node may have created or changed it.
    pub fn volume(&self, id: &str) -> Option<VolumeRecord> {
        self.volumes
            .get(id)
            .or_else(|| self.shared_volumes.as_ref().and_then(|t| t.reload(id)))
    }

    fn table_for(&self, rec: &VolumeRecord) -> &Table<VolumeRecord> {
        match (&self.shared_volumes, rec.shared) {
            (Some(t), true) => t,
            _ => &self.volumes,
        }
    }

    pub fn put_volume(&self, rec: &VolumeRecord) -> Result<()> {
        self.table_for(rec).put(rec)
    }

    pub fn put_new_volume(&self, rec: &VolumeRecord) -> Result<()> {
        self.table_for(rec).put_new(rec)
    }

    pub fn remove_volume(&self, rec: &VolumeRecord) -> Result<()> {
        self.table_for(rec).remove(&rec.id)
    }

    /// One page of volumes, local and shared merged in id order.
    pub fn page_volumes(
        &self,
        after: Option<&str>,
        max: usize,
    ) -> (Vec<VolumeRecord>, Option<String>) {
        let Some(shared) = &self.shared_volumes else {
            return self.volumes.page(after, max);
        };
        // Other nodes make and remove shared volumes: list what the root holds now.
        if let Err(e) = shared.refresh() {
            tracing::warn!(error = %e, "cannot read the shared root's records again; listing what was read before");
        }
        let take = if max == 0 { 0 } else { max + 1 };
        let (mut all, _) = self.volumes.page(after, take);
        all.extend(shared.page(after, take).0);
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all.dedup_by(|a, b| a.id == b.id);
        if max > 0 && all.len() > max {
            all.truncate(max);
            let next = all.last().map(|r| r.id.clone());
            return (all, next);
        }
        (all, None)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn snap(id: &str) -> SnapshotRecord {
        snapshot_of(id, "v")
    }

    /// A ready snapshot record `id` of volume `source`, for tests.
    pub(crate) fn snapshot_of(id: &str, source: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: id.into(),
            name: format!("n-{id}"),
            source_volume_id: source.into(),
            volume_type: VolumeType::Dir,
            fs_type: None,
            size_bytes: 1,
            parameters: BTreeMap::new(),
            created_unix: 0,
            created_nanos: 0,
            syncing_boot: None,
        }
    }

    #[test]
    fn records_survive_reopen_and_page_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let t: Table<SnapshotRecord> = Table::open(dir.path().join("s")).unwrap();
        for id in ["c", "a", "b", "d"] {
            t.put(&snap(id)).unwrap();
        }
        t.remove("d").unwrap();
        t.remove("never-was").unwrap();
        // A write a crash interrupted an hour ago goes; one in progress (another
        // node's, on a shared root) stays.
        let (old, fresh) = (
            dir.path().join("s/x.json.tmp"),
            dir.path().join("s/y.json.1-2.tmp"),
        );
        std::fs::write(&old, b"{half").unwrap();
        std::fs::write(&fresh, b"{hal").unwrap();
        let hour_ago = nix::sys::time::TimeSpec::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                - std::time::Duration::from_secs(3600),
        );
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &old,
            &hour_ago,
            &hour_ago,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        let t: Table<SnapshotRecord> = Table::open(dir.path().join("s")).unwrap();
        assert_eq!(t.len(), 3);
        assert!(!old.exists());
        assert!(fresh.exists());
        let (p1, next) = t.page(None, 2);
        assert_eq!(
            p1.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(next.as_deref(), Some("b"));
        let (p2, next) = t.page(next.as_deref(), 2);
        assert_eq!(p2.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(next, None);
        let (all, next) = t.page(None, 0);
        assert_eq!(all.len(), 3);
        assert_eq!(next, None);
    }

    #[test]
    fn records_in_files_move_into_the_slot_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("s");
        let files: Table<SnapshotRecord> = Table::open(d.clone()).unwrap();
        for id in ["a", "b"] {
            files.put(&snap(id)).unwrap();
        }
        std::fs::write(d.join("bad.json"), b"{half").unwrap();
        drop(files);
        let t: Table<SnapshotRecord> = Table::open_slots(d.clone()).unwrap();
        assert_eq!(t.len(), 2);
        assert!(t.is_unreadable("bad"));
        assert!(!d.join("a.json").exists() && d.join("bad.json").exists());
        let mut b = snap("b");
        b.size_bytes = 7;
        t.put(&b).unwrap();
        t.put_new(&snap("c")).unwrap();
        t.remove("a").unwrap();
        drop(t);
        let t: Table<SnapshotRecord> = Table::open_slots(d.clone()).unwrap();
        let ids: Vec<_> = t.all().into_iter().map(|r| (r.id, r.size_bytes)).collect();
        assert_eq!(ids, [("b".to_string(), 7), ("c".to_string(), 1)]);
        let mut names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["bad.json", SLOT_FILE, TOO_OLD_GUARD]);
    }
}
