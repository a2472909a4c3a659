//! The floor: the kernel and disk work a pod cycle cannot do without, for a
//! directory volume or a loop volume, timed on its own with no driver and no RPC
//! in the way. Its sum is the fastest any driver that keeps its state durable
//! could cycle on this filesystem, so a driver's figure can be read against what
//! the disk allows rather than against another machine's.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use localvol::backend::loopfile;
use localvol::filesystem;
use localvol::loopdev::{self, LoopDevice};
use localvol::mount::{bind, bind_via, unmount, Detached, Flags};
use localvol::params::Allocation;
use localvol::store::sync_dir;

use super::csi::{io_err, write_and_fsync};
use super::stats::Timings;
use super::{BenchError, Stop};

/// What a driver may leave to a background thread: reported, not counted in the
/// floor.
pub const BACKGROUND: &str = "trash: remove data (background)";

/// What kubelet does around the driver's calls (the pod's and the staging
/// directories, made and removed): in every measured cycle, but no driver's to
/// skip; reported beside the floor, not in it.
pub const KUBELET: &str = "kubelet: pod+staging dirs made, removed";

/// The step the issue asks a loop cycle to be dominated by.
pub const MKFS: &str = "stage: mkfs";

/// Unmounts on drop, so an error or a panic mid-run leaves no bind mount behind.
struct Mounted(PathBuf);

impl Mounted {
    /// Unmounts now, reporting a failure; the guard stays armed until it worked.
    fn release(self) -> Result<(), BenchError> {
        unmount(&self.0).map_err(|e| lib_err(&self.0, e))?;
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.0) {
            eprintln!("localvol-bench: cannot unmount {}: {e}", self.0.display());
        }
    }
}

/// Detaches on drop, for the same reason.
struct Attached(LoopDevice);

impl Attached {
    fn release(self) -> Result<(), BenchError> {
        loopdev::detach_device(&self.0).map_err(|e| lib_err(&self.0.path(), e))?;
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Err(e) = loopdev::detach_device(&self.0) {
            eprintln!(
                "localvol-bench: cannot detach {}: {e}",
                self.0.path().display()
            );
        }
    }
}

/// What each floor cycle provisions.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A directory, bind-mounted.
    Dir,
    /// A sparse backing file of `size` bytes, attached, formatted with `fs_type`
    /// and mounted at the staging path.
    Loop { size: u64, fs_type: String },
}

/// A library call's error, named by the path it was about.
fn lib_err(path: &Path, e: localvol::error::Error) -> BenchError {
    io_err(path, std::io::Error::other(e.to_string()))
}

/// Times `n` floor cycles in `dir` (on the filesystem to judge: the driver's
/// root), one at a time, after `warmup` untimed ones, or fewer if `stop` is set:
/// the run then ends after the cycle under way, with its mounts and devices
/// undone. Needs the right to mount.
pub fn measure(
    dir: &Path,
    warmup: usize,
    n: usize,
    kind: &Kind,
    stop: &Stop,
) -> Result<Timings, BenchError> {
    let base = dir.join(format!("floor-{}", std::process::id()));
    let made = Made(base.clone());
    for d in ["volumes", "trash", "staging", "pods"] {
        std::fs::create_dir_all(base.join(d)).map_err(|e| io_err(&base, e))?;
    }
    // A record file with its blocks already written, as a driver's would be.
    let rec_path = base.join("records");
    let records = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&rec_path)
        .map_err(|e| io_err(&rec_path, e))?;
    records
        .write_all_at(&vec![0u8; 64 * 4096], 0)
        .and_then(|()| records.sync_all())
        .map_err(|e| io_err(&rec_path, e))?;
    sync_dir(&base).map_err(|e| lib_err(&base, e))?;

    // Stage binds clone from a private copy of the volumes' mount, as localvol's
    // do, where the kernel can: the cheapest bind there is (see mount::Detached).
    let volumes = Detached::of(&base.join("volumes")).ok();
    let (mut t, mut untimed) = (Timings::default(), Timings::default());
    for i in 0..warmup + n {
        if stop.is_set() {
            break;
        }
        let t = if i < warmup { &mut untimed } else { &mut t };
        one(&base, volumes.as_ref(), &records, i, kind, t)?;
    }
    drop(made);
    Ok(t)
}

fn one(
    base: &Path,
    volumes_mount: Option<&Detached>,
    records: &File,
    i: usize,
    kind: &Kind,
    t: &mut Timings,
) -> Result<(), BenchError> {
    let name = format!("vol-{i}");
    let volumes = base.join("volumes");
    let data = volumes.join(&name);
    let staging = base.join("staging").join(&name);
    let pod = base.join("pods").join(&name);
    let target = pod.join("mount");
    let slot = (i % 64) as u64 * 4096;
    // What the CO makes before it calls the node (kubelet's pod directories).
    let start = Instant::now();
    std::fs::create_dir_all(&staging).map_err(|e| io_err(&staging, e))?;
    std::fs::create_dir_all(&pod).map_err(|e| io_err(&pod, e))?;
    let kubelet = start.elapsed();

    // Create: the new directory (or backing file) and its entry made durable,
    // beside the record's write and flush (the two overlap, as they should in any
    // driver).
    let start = Instant::now();
    let (made, recorded) = localvol::beside::both(
        {
            let (kind, data, volumes) = (kind.clone(), data.clone(), volumes.clone());
            move || {
                make(&kind, &data)
                    .and_then(|()| sync_dir(&volumes).map_err(|e| lib_err(&volumes, e)))
            }
        },
        || {
            records
                .write_all_at(&[0xa5; 4096], slot)
                .and_then(|()| records.sync_data())
                .map_err(|e| io_err(base, e))
        },
    );
    recorded.and(made)?;
    t.record(
        match kind {
            Kind::Dir => "create: mkdir+fsync || record+fdatasync",
            Kind::Loop { .. } => "create: backing file || record+fdatasync",
        },
        start.elapsed(),
    );

    // Declared so that on an early return the unmount comes before the detach.
    let (device, staged) = match kind {
        Kind::Dir => {
            let start = Instant::now();
            bind_via(volumes_mount, &data, &staging, &Flags::default())
                .map_err(|e| lib_err(&staging, e))?;
            t.record("stage: bind mount", start.elapsed());
            (None, Mounted(staging.clone()))
        }
        Kind::Loop { fs_type, .. } => {
            let start = Instant::now();
            let device = Attached(loopdev::attach(&data).map_err(|e| lib_err(&data, e))?);
            let dev = device.0.path();
            t.record("stage: attach loop device", start.elapsed());
            // A driver must look before it formats: a volume's filesystem is never
            // made twice.
            let start = Instant::now();
            let found = filesystem::probe(&dev).map_err(|e| lib_err(&dev, e))?;
            if found != filesystem::Content::Empty {
                return Err(io_err(
                    &dev,
                    std::io::Error::other(format!("a new image already holds {found:?}")),
                ));
            }
            t.record("stage: probe for a filesystem", start.elapsed());
            let start = Instant::now();
            filesystem::format(&dev, fs_type).map_err(|e| lib_err(&dev, e))?;
            t.record(MKFS, start.elapsed());
            let start = Instant::now();
            filesystem::mount(&dev, &staging, fs_type, &Flags::default())
                .map_err(|e| lib_err(&staging, e))?;
            t.record("stage: mount", start.elapsed());
            (Some(device), Mounted(staging.clone()))
        }
    };

    let start = Instant::now();
    std::fs::create_dir(&target).map_err(|e| io_err(&target, e))?;
    bind(&staging, &target, &Flags::default()).map_err(|e| lib_err(&target, e))?;
    let published = Mounted(target.clone());
    t.record("publish: mkdir+bind mount", start.elapsed());

    let start = Instant::now();
    write_and_fsync(&target)?;
    t.record("pod: write+fsync 4KiB", start.elapsed());

    let start = Instant::now();
    published.release()?;
    std::fs::remove_dir(&target).map_err(|e| io_err(&target, e))?;
    t.record("unpublish: umount+rmdir", start.elapsed());

    let start = Instant::now();
    staged.release()?;
    if let Some(device) = device {
        device.release()?;
    }
    t.record(
        match kind {
            Kind::Dir => "unstage: umount",
            Kind::Loop { .. } => "unstage: umount+detach",
        },
        start.elapsed(),
    );

    // Delete: the record cleared and flushed, then the data moved aside.
    let start = Instant::now();
    records
        .write_all_at(&[0; 32], slot)
        .and_then(|()| records.sync_data())
        .map_err(|e| io_err(base, e))?;
    let trashed = base.join("trash").join(&name);
    std::fs::rename(&data, &trashed).map_err(|e| io_err(&data, e))?;
    t.record("delete: record+fdatasync, rename", start.elapsed());

    let start = Instant::now();
    match kind {
        Kind::Dir => std::fs::remove_dir_all(&trashed),
        Kind::Loop { .. } => std::fs::remove_file(&trashed),
    }
    .map_err(|e| io_err(&trashed, e))?;
    t.record(BACKGROUND, start.elapsed());

    // The CO's own directories go, as kubelet removes them.
    let start = Instant::now();
    std::fs::remove_dir(&staging).map_err(|e| io_err(&staging, e))?;
    std::fs::remove_dir(&pod).map_err(|e| io_err(&pod, e))?;
    t.record(KUBELET, kubelet + start.elapsed());
    Ok(())
}

/// The new volume's data: a directory synced itself (without a journal its
/// parent's entry alone may point at an inode never written), or a backing file.
fn make(kind: &Kind, data: &Path) -> Result<(), BenchError> {
    match kind {
        Kind::Dir => std::fs::create_dir(data)
            .map_err(|e| io_err(data, e))
            .and_then(|()| sync_dir(data).map_err(|e| lib_err(data, e))),
        Kind::Loop { size, .. } => {
            loopfile::create(data, *size, Allocation::Sparse).map_err(|e| lib_err(data, e))
        }
    }
}

/// Removes the floor's directory when the run ends, however it ends (mounts in it
/// are gone first: their guards dropped before this one).
struct Made(PathBuf);

impl Drop for Made {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The floor per cycle: the sum of the step medians a driver must wait for.
pub fn floor_of(t: &Timings) -> Duration {
    t.summaries()
        .iter()
        .filter(|(step, _)| *step != BACKGROUND && *step != KUBELET)
        .map(|(_, s)| Duration::from_secs_f64(s.p50_ms / 1000.0))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_sums_medians_but_not_the_background_or_kubelet_steps() {
        let mut t = Timings::default();
        for ms in [1, 3, 2] {
            t.record("create", Duration::from_millis(ms));
        }
        t.record("stage", Duration::from_millis(5));
        t.record(BACKGROUND, Duration::from_millis(100));
        t.record(KUBELET, Duration::from_millis(10));
        assert_eq!(floor_of(&t), Duration::from_millis(7));
    }
}
