//! Room promised to volumes and not used by them yet. A sparse backing file, or a
//! directory under a size limit, takes its space only as its pod writes: the
//! root's free space alone would let the scheduler place more volumes than the
//! root can hold, and their pods would find out later (ENOSPC in a directory, I/O
//! errors in a loop filesystem). GetCapacity reports the free space less what is
//! promised.
//!
//! Each volume's part is measured (one stat or quota read) when it is made, grown
//! or deleted, and for every volume at start-up and then every minute, on a thread
//! of its own, since pods write in between: a GetCapacity reads one sum.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use crate::backend::{btrfs, projquota, DirLimits};
use crate::error::{Error, Result};
use crate::mount;
use crate::params::VolumeType;
use crate::store::VolumeRecord;
use crate::volumes::Driver;

/// How often every volume's part is measured again; external-provisioner asks
/// for capacity once a minute by default.
pub const REMEASURE_EVERY: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Promises {
    inner: Mutex<Parts>,
}

#[derive(Default)]
struct Parts {
    by_volume: HashMap<String, u64>,
    total: u64,
}

impl Promises {
    /// Records what the volume may still write; 0 forgets it.
    pub fn set(&self, id: &str, bytes: u64) {
        let mut p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let old = if bytes == 0 {
            p.by_volume.remove(id)
        } else {
            p.by_volume.insert(id.to_string(), bytes)
        };
        p.total = p.total - old.unwrap_or(0) + bytes;
    }

    /// Promises `bytes` to a volume about to be made or grown, if `free` less
    /// what is promised to others holds them; otherwise changes nothing and says
    /// no. Taken under the lock, so two creates at once cannot both take the last
    /// room.
    pub fn reserve(&self, id: &str, bytes: u64, free: u64) -> bool {
        let mut p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let old = p.by_volume.get(id).copied().unwrap_or(0);
        if bytes > free.saturating_sub(p.total - old) {
            return false;
        }
        p.by_volume.insert(id.to_string(), bytes);
        p.total = p.total - old + bytes;
        true
    }

    pub fn forget(&self, id: &str) {
        self.set(id, 0);
    }

    /// The volumes something is promised to.
    pub fn ids(&self) -> Vec<String> {
        let p = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        p.by_volume.keys().cloned().collect()
    }

    /// Everything promised and not yet used.
    pub fn total(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// What a volume whose data is at `data` may still write beyond what it holds
/// now: the unallocated part of a loop volume's backing file, the unused part of
/// a limited directory's limit. Nothing for a directory without a limit (its size
/// is no promise) or a shared volume (another root). `localvol status` reads it
/// too, with the driver stopped.
pub fn promise(rec: &VolumeRecord, data: &Path, limits: &DirLimits) -> u64 {
    promise_at(rec, data, limits, None)
}

/// [`promise`] as it would be at `size` bytes (a volume about to grow), or at
/// the size the volume has now. The growth is counted from what the data holds,
/// not from the record: a growth done before a crash and not yet recorded is
/// not counted twice by its retry.
pub fn promise_at(rec: &VolumeRecord, data: &Path, limits: &DirLimits, size: Option<u64>) -> u64 {
    if rec.shared {
        return 0;
    }
    match (rec.volume_type, limits) {
        // A file grown whose record was not (a failed expansion) holds its
        // new size all the same.
        (VolumeType::Loop, _) => std::fs::metadata(data)
            .map(|m| {
                size.unwrap_or(0)
                    .max(rec.capacity_bytes)
                    .max(m.len())
                    .saturating_sub(m.blocks() * 512)
            })
            .unwrap_or(0),
        // What it shares with snapshots counts as room it may take: writing
        // over shared blocks takes new ones.
        (VolumeType::Dir, DirLimits::Btrfs { uuid, quota: true }) => {
            let Ok(sv) = btrfs::subvolume_id(data) else {
                return 0;
            };
            let limit = size.or_else(|| {
                btrfs::usage(uuid, sv)
                    .map(|(_, limit)| limit)
                    .filter(|limit| *limit > 0 && *limit != u64::MAX)
            });
            limit
                .zip(btrfs::exclusive(uuid, sv))
                .map(|(limit, own)| limit.saturating_sub(own))
                .unwrap_or(0)
        }
        // One never given a project (made before project quotas) has none.
        (VolumeType::Dir, DirLimits::ProjectQuota) => projquota::usage(data)
            .map(|(used, limit)| size.unwrap_or(limit).saturating_sub(used))
            .unwrap_or(0),
        (VolumeType::Dir, _) => 0,
    }
}

impl Driver {
    /// What a volume of this root may still write beyond what it holds now
    /// (`promise`).
    pub fn promise_of(&self, rec: &VolumeRecord) -> u64 {
        promise(rec, &self.data_path(rec), &self.dir_limits)
    }

    /// What the volume would be promised grown to `size` bytes.
    pub fn promise_grown(&self, rec: &VolumeRecord, size: u64) -> u64 {
        promise_at(rec, &self.data_path(rec), &self.dir_limits, Some(size))
    }

    /// Sets what volume `id` is promised from what it holds now, after a call
    /// changed it (or failed to): nothing if it has no record.
    pub fn settle_promise(&self, id: &str) {
        match self.store.volume(id) {
            Some(rec) => self.promises.set(id, self.promise_of(&rec)),
            None => self.promises.forget(id),
        }
    }

    /// Promises a volume `bytes` (a new one its whole size, a grown one what it
    /// had and the growth) where its size is a promise (a loop volume, a limited
    /// directory), if the root's free space less what is promised to others holds
    /// it: RESOURCE_EXHAUSTED otherwise (after the trash gave back what it holds:
    /// `with_room`).
    pub(crate) fn reserve_room(&self, rec: &VolumeRecord, bytes: u64) -> Result<()> {
        let promised = !rec.shared
            && match rec.volume_type {
                VolumeType::Loop => true,
                VolumeType::Dir => self.dir_limits.enforced(),
            };
        if !promised {
            return Ok(());
        }
        self.reserve(
            &rec.id,
            bytes,
            &format!("{bytes} more bytes for volume {}", rec.id),
        )
    }

    /// Reserves the room a full copy of `source` into snapshot `id` will take
    /// (what its data holds), where the copy will be full: not from this root's
    /// volumes on btrfs or xfs, whose copies share blocks. True when all of it is
    /// reserved; otherwise the copy is checked after it is made
    /// (`check_room_kept`). The caller forgets it once the copy is done.
    pub(crate) fn reserve_copy(&self, id: &str, source: &VolumeRecord) -> Result<bool> {
        let volumes = self.layout.volumes_dir(false);
        if !source.shared && shares_blocks(&volumes) {
            return Ok(false);
        }
        // The copy walks the whole tree anyway; this walk is its metadata only.
        let mut no_bound = crate::inspect::Budget(u64::MAX);
        let Some(used) =
            crate::inspect::used_bytes(&self.data_path(source), source.volume_type, &mut no_bound)
        else {
            return Ok(false);
        };
        self.reserve(
            id,
            used.bytes,
            &format!("a copy of volume {} ({} bytes)", source.id, used.bytes),
        )?;
        Ok(used.complete)
    }

    /// After a copy that was expected to share blocks and did not (an xfs made
    /// without reflink, a btrfs file that is NOCOW): RESOURCE_EXHAUSTED if it took
    /// room promised to volumes, measured again before it says so.
    pub(crate) fn check_room_kept(&self, what: &str) -> Result<()> {
        let volumes = self.layout.volumes_dir(false);
        for attempt in 0..2 {
            let free = mount::usage(&volumes)?.available_bytes;
            if free >= self.promises.total() {
                return Ok(());
            }
            if attempt == 0 {
                self.measure_promises();
            }
        }
        Err(Error::NoSpace(format!(
            "no room for {what}: it took room promised to the root's volumes (what their \
             sparse files and limits may still take)"
        )))
    }

    /// Takes `bytes` of unpromised room for `id`. A refusal measures every volume
    /// again first (pods have written since the last measurement, which makes what
    /// is promised look larger than it is) and asks once more.
    fn reserve(&self, id: &str, bytes: u64, what: &str) -> Result<()> {
        let volumes = self.layout.volumes_dir(false);
        for attempt in 0..2 {
            let free = mount::usage(&volumes)?.available_bytes;
            if self.promises.reserve(id, bytes, free) {
                return Ok(());
            }
            if attempt == 0 {
                self.measure_promises();
            }
        }
        let free = mount::usage(&volumes)?.available_bytes;
        Err(Error::NoSpace(format!(
            "no room for {what}: the root has {free} bytes free, of which {} are promised to \
             its volumes (what their sparse files and limits may still take)",
            self.promises.total()
        )))
    }

    /// Measures every volume's promise again (start-up, then every minute), and
    /// drops what no record holds (a create that panicked). A volume being changed
    /// is skipped: its call holds its lock, and settles its promise when done.
    pub fn measure_promises(&self) {
        let ids = self.store.volumes.all().into_iter().map(|r| r.id);
        let known: Vec<String> = ids.chain(self.promises.ids()).collect();
        for id in known {
            if let Ok(_guard) = self.locks.lock_within(&id, Duration::ZERO) {
                self.settle_promise(&id);
            }
        }
    }
}

/// Whether copies on this filesystem share blocks (btrfs, xfs with reflink):
/// they take no room when made.
fn shares_blocks(path: &Path) -> bool {
    use nix::sys::statfs::{BTRFS_SUPER_MAGIC, XFS_SUPER_MAGIC};
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| [BTRFS_SUPER_MAGIC, XFS_SUPER_MAGIC].contains(&s.filesystem_type()))
}

/// Measures every volume's part again every `REMEASURE_EVERY`, for as long as
/// the driver lives.
pub fn remeasure_in_background(driver: Weak<crate::volumes::Driver>) {
    let spawned = std::thread::Builder::new()
        .name("promises".into())
        .spawn(move || loop {
            std::thread::sleep(REMEASURE_EVERY);
            let Some(d) = driver.upgrade() else {
                return;
            };
            d.measure_promises();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the thread that measures promised room; GetCapacity counts what volumes used at start-up and at their last change");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_follows_every_change() {
        let p = Promises::default();
        p.set("a", 10);
        p.set("b", 5);
        assert_eq!(p.total(), 15);
        p.set("a", 3); // the pod wrote 7
        assert_eq!(p.total(), 8);
        p.forget("b");
        p.forget("never");
        assert_eq!(p.total(), 3);
        p.set("a", 0);
        assert_eq!(p.total(), 0);
    }

    #[test]
    fn a_reservation_needs_room_beside_what_is_promised() {
        let p = Promises::default();
        assert!(p.reserve("a", 60, 100));
        assert!(!p.reserve("b", 50, 100), "40 left");
        assert_eq!(p.total(), 60);
        assert!(p.reserve("b", 40, 100));
        // A retry of the same volume counts its own earlier reservation as free.
        assert!(p.reserve("b", 40, 100));
        assert_eq!(p.total(), 100);
        p.forget("a");
        assert!(p.reserve("c", 60, 100));
    }
}
