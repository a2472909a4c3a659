//! Snapshots, restores and clones. A snapshot is a copy of a volume's data under
//! `<root>/snapshots`, independent of its source: deleting either never touches the
//! other. The copy is as cheap as the filesystem allows (`backend::copy`, btrfs
//! subvolume snapshots); a mounted loop filesystem is frozen for the instant of it.
//!
//! As with volumes, data is made first and the record written last: a crash before
//! the record leaves leftovers that the retry replaces and start-up removes. A copy
//! that shares no blocks is reported as soon as it is cut (copied into the page
//! cache, the source thawed) with ready_to_use false, and made durable in the
//! background; CSI allows this, and the CO waits for ready_to_use before
//! restoring. Its record says which boot cut it: after a crash within the same
//! boot the copy is whole in the page cache and start-up finishes it; after a
//! reboot it may be partial, so it is discarded and the CO's retry cuts it again.

use std::path::Path;

use crate::backend::{btrfs, copy, dir, loopfile};
use crate::error::{Error, Result};
use crate::faults;
use crate::filesystem;
use crate::ids::{self, Kind};
use crate::params::{self, VolumeType};
use crate::store::{SnapshotRecord, VolumeRecord};
use crate::volumes::{now_unix, Driver};

impl Driver {
    /// Looks up a snapshot by id; a malformed or unknown id is NOT_FOUND.
    pub fn snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        ids::check_id(Kind::Snapshot, id)?;
        self.store
            .snapshots
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("snapshot {id} does not exist")))
    }

    pub fn snapshot_data(&self, snap: &SnapshotRecord) -> std::path::PathBuf {
        self.layout.snapshot_data(&snap.id, snap.volume_type)
    }

    pub fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        parameters: &std::collections::BTreeMap<String, String>,
    ) -> Result<SnapshotRecord> {
        ids::check_name(name)?;
        if source_volume_id.is_empty() {
            return Err(Error::InvalidArgument(
                "source_volume_id is required".into(),
            ));
        }
        params::check_snapshot_parameters(parameters)?;
        let id = ids::id_for_name(Kind::Snapshot, name);
        let _guard = self.lock(&id)?;
        if let Some(existing) = self.store.snapshots.get(&id) {
            if existing.source_volume_id != source_volume_id {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} already exists ({id}) of another volume, {}",
                    existing.source_volume_id
                )));
            }
            drop(_guard);
            // The CO asks again until it is ready: this call finishes it.
            return self.finish_snapshot(&id);
        }
        let source = self.volume(source_volume_id)?;
        let _source_guard = self.lock(&source.id)?;
        let source = self.volume(source_volume_id)?;
        let (secs, nanos) = now_unix();
        let snap = SnapshotRecord {
            id: id.clone(),
            name: name.to_string(),
            source_volume_id: source.id.clone(),
            volume_type: source.volume_type,
            fs_type: source.fs_type.clone(),
            size_bytes: source.capacity_bytes,
            parameters: parameters.clone(),
            created_unix: secs,
            created_nanos: nanos,
            syncing_boot: None,
        };
        let dest = self.snapshot_data(&snap);
        let started = std::time::Instant::now();
        let shared = self.with_room(&id, || {
            dir::remove(&dest)?;
            // A full copy may not take room promised to volumes; once made, its
            // room is taken for real (no longer free).
            let all_reserved = self.reserve_copy(&id, &source)?;
            let copied = self.copy_volume(&source, &dest, true);
            self.promises.forget(&id);
            copied
                .and_then(|shared| {
                    if !shared && !all_reserved {
                        self.check_room_kept(&format!("a copy of volume {}", source.id))?;
                    }
                    Ok(shared)
                })
                .inspect_err(|_| {
                    // A partial copy (a full root) is no snapshot: give its space back now.
                    if let Err(re) = dir::remove(&dest) {
                        tracing::warn!(path = %dest.display(), error = %re, "cannot remove partial snapshot data");
                    }
                })
        })?;
        faults::point("snapshot.after_copy");
        // Shared blocks cost nothing to make durable: ready at once. A full copy
        // is handed to the background (`finish_snapshot`).
        let snap = if shared {
            copy::make_durable(&dest)?;
            snap
        } else {
            SnapshotRecord {
                syncing_boot: Some(this_boot().to_string()),
                ..snap
            }
        };
        self.store.snapshots.put_new(&snap)?;
        faults::point("snapshot.after_record");
        tracing::info!(snapshot = %id, volume = %source.id, ms = started.elapsed().as_millis() as u64,
            ready = snap.ready(), "snapshot cut");
        Ok(snap)
    }

    /// Makes a cut snapshot durable and marks it ready; a ready one is returned as
    /// is. Runs in the background after CreateSnapshot, on the CO's retries and at
    /// start-up; whichever comes first does the work.
    pub fn finish_snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        let snap = self.snapshot(id)?;
        if snap.ready() {
            return Ok(snap);
        }
        let started = std::time::Instant::now();
        // Outside the lock: a DeleteSnapshot meanwhile is fine (checked below).
        let synced = copy::make_durable(&self.snapshot_data(&snap));
        let _guard = self.lock(id)?;
        let synced_cut = (snap.created_unix, snap.created_nanos);
        let Some(snap) = self.store.snapshots.get(id) else {
            return Err(Error::NotFound(format!(
                "snapshot {id} was deleted while it was being made durable"
            )));
        };
        if snap.ready() {
            return Ok(snap);
        }
        if (snap.created_unix, snap.created_nanos) != synced_cut {
            // Deleted and cut again under the same name meanwhile: what was synced
            // is the old copy; the new one is made durable on its own.
            drop(_guard);
            return self.finish_snapshot(id);
        }
        if let Err(e) = synced {
            let data = self.snapshot_data(&snap);
            if std::fs::symlink_metadata(&data).is_ok() {
                return Err(e);
            }
            // Never reported ready, and its copy is gone: as after a reboot, it is
            // discarded and the CO's next call cuts it again.
            tracing::warn!(snapshot = %id, data = %data.display(), "snapshot data vanished before it was durable; discarded");
            self.store.snapshots.remove(id)?;
            return Err(Error::Aborted(format!(
                "snapshot {id}'s copy vanished before it was durable; it was discarded, retry to take it again"
            )));
        }
        faults::point("snapshot.before_ready");
        let snap = SnapshotRecord {
            syncing_boot: None,
            ..snap
        };
        self.store.snapshots.put(&snap)?;
        tracing::info!(snapshot = %id, ms = started.elapsed().as_millis() as u64, "snapshot durable and ready");
        Ok(snap)
    }

    /// Snapshots left cut but not durable by an earlier run: those of this boot
    /// are returned for `finish_snapshot`; those of an earlier boot may have lost
    /// data in the power cut and are discarded.
    pub fn unfinished_snapshots(&self) -> Result<Vec<String>> {
        let mut this = vec![];
        for snap in self.store.snapshots.all() {
            match &snap.syncing_boot {
                None => {}
                Some(b) if b == this_boot() => this.push(snap.id),
                Some(_) => {
                    tracing::warn!(snapshot = %snap.id, volume = %snap.source_volume_id,
                        "snapshot was not yet durable when the node went down; discarded \
                         (it was never reported ready; the CO's retry takes it again)");
                    self.store.snapshots.remove(&snap.id)?;
                    self.trash.discard(&self.snapshot_data(&snap))?;
                }
            }
        }
        Ok(this)
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        if id.is_empty() {
            return Err(Error::InvalidArgument("snapshot_id is required".into()));
        }
        if !ids::is_valid_id(Kind::Snapshot, id) {
            return Ok(());
        }
        let _guard = self.lock(id)?;
        let Some(snap) = self.store.snapshots.get(id) else {
            return Ok(());
        };
        self.store.snapshots.remove(id)?;
        faults::point("delete_snapshot.after_record");
        self.trash.discard(&self.snapshot_data(&snap))?;
        tracing::info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    /// One page of snapshots, filtered as ListSnapshots asks. Unknown ids in the
    /// filters give an empty list, not an error.
    pub fn list_snapshots(
        &self,
        snapshot_id: &str,
        source_volume_id: &str,
        starting_token: &str,
        max: i32,
    ) -> Result<(Vec<SnapshotRecord>, Option<String>)> {
        if max < 0 {
            return Err(Error::InvalidArgument(
                "max_entries must not be negative".into(),
            ));
        }
        let after = self.check_token(Kind::Snapshot, starting_token)?;
        if !snapshot_id.is_empty() {
            let found =
                self.store.snapshots.get(snapshot_id).filter(|s| {
                    source_volume_id.is_empty() || s.source_volume_id == source_volume_id
                });
            return Ok((found.into_iter().collect(), None));
        }
        let snapshots = &self.store.snapshots;
        Ok(if source_volume_id.is_empty() {
            snapshots.page(after, max as usize)
        } else {
            snapshots.page_of_group(source_volume_id, after, max as usize)
        })
    }

    /// Copies a volume's data to `dest` (absent, or for a directory an empty
    /// directory made for it), consistent as of one instant for loop filesystems
    /// (frozen while copied). Not yet durable; returns whether every block is
    /// shared with the source (nothing to write).
    pub(crate) fn copy_volume(
        &self,
        src: &VolumeRecord,
        dest: &Path,
        readonly: bool,
    ) -> Result<bool> {
        let data = self.data_path(src);
        match src.volume_type {
            VolumeType::Dir => copy_dir_data(&data, dest, readonly),
            VolumeType::Loop => {
                // Thawed when dropped, after the copy, also on error.
                let frozen = self.freeze_if_mounted(src)?;
                if frozen.is_some() {
                    faults::point("snapshot.frozen");
                } else if self.published_raw(src)? {
                    // Nothing to freeze: a pod writes the device directly. Only a
                    // copy made in one step (shared blocks) is of one moment.
                    if copy::clone_file(&data, dest)? {
                        return Ok(true);
                    }
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} is published as a raw block device, and this root cannot \
                         share blocks: a copy taken while the pod writes would mix blocks of \
                         different moments; unpublish it and retry (or use an xfs or btrfs root, \
                         where the copy is instant)",
                        src.id
                    )));
                }
                let copied = copy::copy_file(&data, dest);
                drop(frozen);
                Ok(copied? == copy::Method::Reflink)
            }
        }
    }

    /// Whether the loop volume's device node is bound read-write anywhere (a block
    /// publish a pod may write through).
    fn published_raw(&self, rec: &VolumeRecord) -> Result<bool> {
        let Some(dev) = self.loop_device(rec) else {
            return Ok(false);
        };
        Ok(self
            .mounts_of_volume(rec)?
            .iter()
            .any(|m| m.dev != dev.dev && !m.is_readonly()))
    }

    /// Freezes the loop volume's filesystem where this node has it mounted.
    fn freeze_if_mounted(&self, rec: &VolumeRecord) -> Result<Option<filesystem::Frozen>> {
        let Some(dev) = self.loop_device(rec) else {
            return Ok(None);
        };
        let mounts = self.mounts_of_volume(rec)?;
        let fs_mount = mounts
            .iter()
            .find(|m| m.dev == dev.dev && m.root == Path::new("/") && !m.is_readonly());
        match fs_mount {
            Some(m) => Ok(Some(filesystem::freeze(&m.mount_point)?)),
            None => Ok(None),
        }
    }

    /// Fills a new volume's data from a snapshot or another volume, grown to the
    /// new volume's capacity.
    pub(crate) fn fill_from(&self, rec: &VolumeRecord, source: &Source) -> Result<()> {
        let dest = self.data_path(rec);
        dir::remove(&dest)?;
        let limits = self.limits(rec.shared);
        if rec.volume_type == VolumeType::Dir {
            dir::prepare_copy(&dest, &rec.id, rec.capacity_bytes, limits)?;
        }
        match source {
            Source::Snapshot(snap) => {
                let data = self.snapshot_data(snap);
                match snap.volume_type {
                    VolumeType::Dir => copy_dir_data(&data, &dest, false).map(|_| ())?,
                    VolumeType::Loop => copy::copy_file(&data, &dest).map(|_| ())?,
                }
            }
            Source::Volume(v) => {
                self.copy_volume(v, &dest, false)?;
            }
        }
        // A new volume's record follows its data: durable first.
        copy::make_durable(&dest)?;
        match rec.volume_type {
            VolumeType::Dir => dir::limit_new(&dest, rec.capacity_bytes, limits),
            VolumeType::Loop => {
                let p = params::parse(&rec.parameters)?;
                loopfile::grow(&dest, rec.capacity_bytes, p.allocation)
            }
        }
    }
}

/// Finishes a cut snapshot on a thread of its own, so that it becomes ready
/// without waiting for the CO to ask again.
pub fn finish_in_background(driver: &std::sync::Arc<Driver>, id: String) {
    let driver = driver.clone();
    let spawned = std::thread::Builder::new()
        .name("snapshot-sync".into())
        .spawn(move || {
            match driver.finish_snapshot(&id) {
                Ok(_) => {}
                // Deleted meanwhile: nothing left to finish.
                Err(Error::NotFound(_)) => {}
                Err(e) => tracing::warn!(snapshot = %id, error = %e, "making the snapshot durable failed; the CO's next CreateSnapshot retries it"),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a thread to finish a snapshot; the CO's next CreateSnapshot finishes it");
    }
}

/// Where a new volume's content comes from.
pub enum Source {
    Snapshot(SnapshotRecord),
    Volume(VolumeRecord),
}

impl Source {
    pub fn volume_type(&self) -> VolumeType {
        match self {
            Source::Snapshot(s) => s.volume_type,
            Source::Volume(v) => v.volume_type,
        }
    }
    pub fn fs_type(&self) -> Option<&str> {
        match self {
            Source::Snapshot(s) => s.fs_type.as_deref(),
            Source::Volume(v) => v.fs_type.as_deref(),
        }
    }
    pub fn size_bytes(&self) -> u64 {
        match self {
            Source::Snapshot(s) => s.size_bytes,
            Source::Volume(v) => v.capacity_bytes,
        }
    }
}

/// A directory's data: a btrfs snapshot where source and destination allow it
/// (instant), else a tree copy. Returns whether every block is shared.
fn copy_dir_data(src: &Path, dest: &Path, readonly: bool) -> Result<bool> {
    if btrfs::is_subvolume(src) {
        // A snapshot would leave the pod's own subvolumes in it empty.
        if !btrfs::has_child_subvolumes(src) {
            match btrfs::snapshot(src, dest, readonly) {
                Ok(()) => return Ok(true),
                // Another filesystem (a shared root), or snapshots refused: copy instead.
                Err(e) => tracing::debug!("btrfs snapshot not possible ({e}); copying"),
            }
        }
        // Copied into a subvolume of its own where the root allows, which keeps a
        // size limit (a plain directory on btrfs can have none).
        let _ = btrfs::create_subvolume(dest);
    }
    copy::copy_tree(src, dest).map(|(_, all_reflink)| all_reflink)
}

/// This boot's id: a pending snapshot from another boot may have lost data.
fn this_boot() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            // Without a boot id every restart counts as a reboot: safe, never wrong.
            .unwrap_or_else(|_| format!("unknown-{}", std::process::id()))
    })
}
