//! Snapshots, restores and clones. A snapshot is a copy of a volume's data under
//! `<root>/snapshots`, independent of its source: deleting either never touches the
//! other. The copy is as cheap as the filesystem allows (`backend::copy`, btrfs
//! subvolume snapshots); a mounted loop filesystem is frozen for the instant of it.
//!
//! As with volumes, data is made first and the record written last: a snapshot is
//! reported (and ready_to_use) only once its data is complete and durable, and a
//! crash before that leaves leftovers that the retry replaces and start-up removes.

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
            return Ok(existing);
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
        };
        let dest = self.snapshot_data(&snap);
        let started = std::time::Instant::now();
        if let Err(e) = self.copy_volume(&source, &dest, true) {
            // A partial copy (a full root) is no snapshot: give its space back now.
            if let Err(re) = dir::remove(&dest) {
                tracing::warn!(path = %dest.display(), error = %re, "cannot remove partial snapshot data");
            }
            return Err(e);
        }
        faults::point("snapshot.after_copy");
        self.store.snapshots.put_new(&snap)?;
        faults::point("snapshot.after_record");
        tracing::info!(snapshot = %id, volume = %source.id, ms = started.elapsed().as_millis() as u64, "snapshot created");
        Ok(snap)
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
        dir::remove(&self.snapshot_data(&snap))?;
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
        Ok(self.store.snapshots.page(after, max as usize, |s| {
            source_volume_id.is_empty() || s.source_volume_id == source_volume_id
        }))
    }

    /// Copies a volume's data to `dest` (which must not exist yet), consistent as
    /// of one instant for loop filesystems (frozen while copied).
    pub(crate) fn copy_volume(
        &self,
        src: &VolumeRecord,
        dest: &Path,
        readonly: bool,
    ) -> Result<()> {
        dir::remove(dest)?;
        let data = self.data_path(src);
        match src.volume_type {
            VolumeType::Dir => copy_dir_data(&data, dest, readonly),
            VolumeType::Loop => {
                // Thawed when dropped, after the copy, also on error.
                let frozen = self.freeze_if_mounted(src)?;
                if frozen.is_some() {
                    faults::point("snapshot.frozen");
                }
                let copied = copy::copy_file(&data, dest).map(|_| ());
                drop(frozen);
                copied
            }
        }?;
        crate::store::sync_dir(dest.parent().expect("data paths have a parent"))
    }

    /// Freezes the loop volume's filesystem where this node has it mounted.
    fn freeze_if_mounted(&self, rec: &VolumeRecord) -> Result<Option<filesystem::Frozen>> {
        let Some(dev) = self.loop_device(rec) else {
            return Ok(None);
        };
        let table = crate::mount::mounts()?;
        let fs_mount = table
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
        match source {
            Source::Snapshot(snap) => {
                dir::remove(&dest)?;
                let data = self.snapshot_data(snap);
                match snap.volume_type {
                    VolumeType::Dir => copy_dir_data(&data, &dest, false)?,
                    VolumeType::Loop => {
                        copy::copy_file(&data, &dest)?;
                    }
                }
                crate::store::sync_dir(dest.parent().expect("data paths have a parent"))?;
            }
            Source::Volume(v) => self.copy_volume(v, &dest, false)?,
        }
        match rec.volume_type {
            VolumeType::Dir => {
                dir::limit_new(&dest, &rec.id, rec.capacity_bytes, self.limits(rec.shared))
            }
            VolumeType::Loop => {
                let p = params::parse(&rec.parameters)?;
                loopfile::grow(&dest, rec.capacity_bytes, p.allocation)
            }
        }
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
/// (instant), else a tree copy.
fn copy_dir_data(src: &Path, dest: &Path, readonly: bool) -> Result<()> {
    if btrfs::is_subvolume(src) {
        match btrfs::snapshot(src, dest, readonly) {
            Ok(()) => return Ok(()),
            // Another filesystem (a shared root), or snapshots refused: copy instead.
            Err(e) => tracing::debug!("btrfs snapshot not possible ({e}); copying"),
        }
    }
    copy::copy_tree(src, dest).map(|_| ())
}
