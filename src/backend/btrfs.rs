//! btrfs through its ioctls: directory volumes as subvolumes, their size limits as
//! qgroup limits, and the qgroup numbers the kernel publishes in sysfs.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
/// The inode number of every subvolume's top directory.
const FIRST_FREE_OBJECTID: u64 = 256;
const QGROUP_LIMIT_MAX_RFER: u64 = 1;
const QUOTA_CTL_ENABLE: u64 = 1;

const fn ioc(dir: u64, nr: u64, size: u64) -> libc::c_ulong {
    ((dir << 30) | (size << 16) | (0x94 << 8) | nr) as libc::c_ulong
}
const W: u64 = 1;
const R: u64 = 2;
const SUBVOL_CREATE: libc::c_ulong = ioc(W, 14, 4096);
const SNAP_DESTROY: libc::c_ulong = ioc(W, 15, 4096);
const INO_LOOKUP: libc::c_ulong = ioc(R | W, 18, 4096);
const SNAP_CREATE_V2: libc::c_ulong = ioc(W, 23, 4096);
const FS_INFO: libc::c_ulong = ioc(R, 31, 1024);
const QUOTA_CTL: libc::c_ulong = ioc(R | W, 40, 16);
const QGROUP_LIMIT: libc::c_ulong = ioc(R, 43, 48);
const GET_SUBVOL_ROOTREF: libc::c_ulong = ioc(R | W, 61, 4096);
const START_SYNC: libc::c_ulong = ioc(R, 24, 8);
const WAIT_SYNC: libc::c_ulong = ioc(W, 22, 8);

#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}

#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}

#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}

#[repr(C)]
struct RootrefArgs {
    min_treeid: u64,
    /// (tree id, directory id) of each child subvolume.
    rootref: [[u64; 2]; 255],
    num_items: u8,
    align: [u8; 7],
}

fn ioctl<T>(f: &File, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_dir(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ctx(|| format!("open {}", path.display()))
}

fn name_bytes<const N: usize>(name: &OsStr) -> Result<[u8; N]> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= N || b.contains(&0) || b.contains(&b'/') {
        return Err(Error::Internal(format!("bad subvolume name {name:?}")));
    }
    let mut out = [0u8; N];
    out[..b.len()].copy_from_slice(b);
    Ok(out)
}

fn split(path: &Path) -> Result<(&Path, &OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => Ok((p, n)),
        _ => Err(Error::Internal(format!("{} has no parent", path.display()))),
    }
}

pub fn is_btrfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BTRFS_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Commits the current transaction of the btrfs holding `f`, writing no file
/// data. btrfs counts space that an allocation (fallocate) takes, or a removal
/// gives back, in statfs only once its transaction commits (every 30 s by
/// default), and capacity is judged by statfs: a preallocated volume would
/// otherwise take room that the next CreateVolume is offered again.
/// Nothing to do on other filesystems.
pub fn commit_space(f: &File) -> Result<()> {
    let on_btrfs = nix::sys::statfs::fstatfs(f)
        .map(|s| s.filesystem_type().0 == BTRFS_SUPER_MAGIC)
        .unwrap_or(false);
    if !on_btrfs {
        return Ok(());
    }
    let mut transid = 0u64;
    ioctl(f, START_SYNC, &mut transid)
        .and_then(|()| ioctl(f, WAIT_SYNC, &mut transid))
        .ctx(|| "commit the btrfs transaction".to_string())
}

/// The filesystem's UUID as sysfs names it (`/sys/fs/btrfs/<uuid>`).
pub fn fsid(path: &Path) -> Result<String> {
    let f = open_dir(path)?;
    let mut buf = [0u8; 1024];
    ioctl(&f, FS_INFO, &mut buf).ctx(|| format!("btrfs fs info of {}", path.display()))?;
    let h = hex::encode(&buf[16..32]);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

fn sysfs(uuid: &str) -> PathBuf {
    PathBuf::from("/sys/fs/btrfs").join(uuid)
}

pub fn quota_enabled(uuid: &str) -> bool {
    sysfs(uuid).join("qgroups").is_dir()
}

pub fn enable_quota(path: &Path) -> Result<()> {
    let f = open_dir(path)?;
    let mut args = [QUOTA_CTL_ENABLE, 0u64];
    ioctl(&f, QUOTA_CTL, &mut args).ctx(|| format!("enable btrfs quota on {}", path.display()))
}

/// Whether `path` is the top of a subvolume.
pub fn is_subvolume(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(path)
        .map(|m| m.is_dir() && m.ino() == FIRST_FREE_OBJECTID)
        .unwrap_or(false)
        && is_btrfs(path)
}

pub fn create_subvolume(path: &Path) -> Result<()> {
    let (parent, name) = split(path)?;
    let p = open_dir(parent)?;
    let mut args = VolArgs {
        fd: 0,
        name: name_bytes(name)?,
    };
    ioctl(&p, SUBVOL_CREATE, &mut args).ctx(|| format!("create subvolume {}", path.display()))
}

/// Whether the subvolume at `path` holds subvolumes of its own. A pod can make
/// them in its volume without privileges, and a btrfs snapshot does not descend
/// into them (they show as empty directories in it). When the kernel cannot say
/// (before Linux 4.18), the answer is yes: a copy is never wrong.
pub fn has_child_subvolumes(path: &Path) -> bool {
    let Ok(f) = open_dir(path) else {
        return true;
    };
    let mut args = RootrefArgs {
        min_treeid: 0,
        rootref: [[0; 2]; 255],
        num_items: 0,
        align: [0; 7],
    };
    match ioctl(&f, GET_SUBVOL_ROOTREF, &mut args) {
        Ok(()) => args.num_items > 0,
        // More than one call's worth of children.
        Err(e) if e.raw_os_error() == Some(libc::EOVERFLOW) => true,
        Err(_) => true,
    }
}

const SUBVOL_RDONLY: u64 = 1 << 1;

/// A snapshot of subvolume `source` at `dest`: instant, no data copied. Snapshots
/// kept as snapshots are read-only; restores and clones are writable.
pub fn snapshot(source: &Path, dest: &Path, readonly: bool) -> Result<()> {
    let src = open_dir(source)?;
    let (parent, name) = split(dest)?;
    let p = open_dir(parent)?;
    let mut args = VolArgsV2 {
        fd: src.as_raw_fd() as i64,
        transid: 0,
        flags: if readonly { SUBVOL_RDONLY } else { 0 },
        unused: [0; 4],
        name: name_bytes(name)?,
    };
    ioctl(&p, SNAP_CREATE_V2, &mut args).ctx(|| {
        format!(
            "snapshot subvolume {} to {}",
            source.display(),
            dest.display()
        )
    })
}

pub fn delete_subvolume(path: &Path) -> Result<()> {
    let (parent, name) = split(path)?;
    let p = open_dir(parent)?;
    let mut args = VolArgs {
        fd: 0,
        name: name_bytes(name)?,
    };
    ioctl(&p, SNAP_DESTROY, &mut args).ctx(|| format!("delete subvolume {}", path.display()))
}

/// The subvolume id (and so the level-0 qgroup id) of the subvolume at `path`.
pub fn subvolume_id(path: &Path) -> Result<u64> {
    let f = open_dir(path)?;
    let mut args = InoLookupArgs {
        treeid: 0,
        objectid: FIRST_FREE_OBJECTID,
        name: [0; 4080],
    };
    ioctl(&f, INO_LOOKUP, &mut args).ctx(|| format!("look up subvolume {}", path.display()))?;
    Ok(args.treeid)
}

/// Limits what the subvolume at `path` may reference to `bytes`.
pub fn set_limit(path: &Path, bytes: u64) -> Result<()> {
    let f = open_dir(path)?;
    let mut args = QgroupLimitArgs {
        qgroupid: 0,
        flags: QGROUP_LIMIT_MAX_RFER,
        max_rfer: bytes,
        max_excl: 0,
        rsv_rfer: 0,
        rsv_excl: 0,
    };
    ioctl(&f, QGROUP_LIMIT, &mut args).ctx(|| format!("set qgroup limit of {}", path.display()))
}

/// (bytes referenced, limit) of a subvolume's qgroup, as the kernel last counted.
pub fn usage(uuid: &str, subvol: u64) -> Option<(u64, u64)> {
    let dir = sysfs(uuid).join("qgroups").join(format!("0_{subvol}"));
    let read =
        |f: &str| -> Option<u64> { fs::read_to_string(dir.join(f)).ok()?.trim().parse().ok() };
    Some((read("referenced")?, read("max_referenced")?))
}

/// Bytes only this subvolume holds (not shared with a snapshot or a clone), as
/// the kernel last counted: writing over the shared rest takes new room.
pub fn exclusive(uuid: &str, subvol: u64) -> Option<u64> {
    let f = sysfs(uuid)
        .join("qgroups")
        .join(format!("0_{subvol}"))
        .join("exclusive");
    fs::read_to_string(f).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(SUBVOL_CREATE, 0x5000_940E);
        assert_eq!(SNAP_DESTROY, 0x5000_940F);
        assert_eq!(INO_LOOKUP, 0xD000_9412);
        assert_eq!(FS_INFO, 0x8400_941F);
        assert_eq!(QUOTA_CTL, 0xC010_9428);
        assert_eq!(QGROUP_LIMIT, 0x8030_942B);
        assert_eq!(GET_SUBVOL_ROOTREF, 0xD000_943D);
        assert_eq!(START_SYNC, 0x8008_9418);
        assert_eq!(WAIT_SYNC, 0x4008_9416);
        assert_eq!(std::mem::size_of::<RootrefArgs>(), 4096);
        assert_eq!(std::mem::size_of::<VolArgs>(), 4096);
        assert_eq!(std::mem::size_of::<VolArgsV2>(), 4096);
        assert_eq!(std::mem::size_of::<QgroupLimitArgs>(), 48);
    }
}
