//! Project quotas (xfs, or ext4 with the project feature, mounted with prjquota): a
//! directory volume gets a project id that its whole tree inherits, and a hard
//! block limit for that project.
//!
//! Kernels built without quota support refuse such mounts; `detect` then says why
//! directory sizes are not enforced.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Context, Error, Result};
use crate::mount;

const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801C_581F;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401C_5820;
const FS_XFLAG_PROJINHERIT: u32 = 0x200;
const PRJQUOTA: u32 = 2;
const Q_GETQUOTA: u32 = 0x80_0007;
const Q_SETQUOTA: u32 = 0x80_0008;
const QIF_BLIMITS: u32 = 1;
const SYS_QUOTACTL_FD: libc::c_long = 443;

#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

#[repr(C)]
#[derive(Default)]
struct DqBlk {
    bhardlimit: u64,
    bsoftlimit: u64,
    curspace: u64,
    ihardlimit: u64,
    isoftlimit: u64,
    curinodes: u64,
    btime: u64,
    itime: u64,
    valid: u32,
}

/// Ok when the filesystem holding `root` enforces project quotas; else why not.
pub fn detect(root: &Path) -> std::result::Result<(), String> {
    let table = mount::mounts().map_err(|e| e.to_string())?;
    let canon = std::fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let Some(m) = table
        .iter()
        .filter(|m| canon.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
    else {
        return Err(format!("no mount holds {}", root.display()));
    };
    let on = m
        .super_options
        .split(',')
        .any(|o| matches!(o, "prjquota" | "pquota" | "prjjquota"));
    match m.fs_type.as_str() {
        "xfs" | "ext4" if on => Ok(()),
        "xfs" | "ext4" => Err(format!(
            "the root is {} mounted without prjquota (mount it with -o prjquota, on a kernel \
             with quota support, or use a btrfs root or type: loop volumes)",
            m.fs_type
        )),
        other => Err(format!(
            "the root's filesystem is {other}, which has no per-directory limits (use a btrfs \
             root, an xfs/ext4 root mounted with prjquota, or type: loop volumes)"
        )),
    }
}

fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ctx(|| format!("open {}", path.display()))
}

fn quotactl(fs: &File, cmd: u32, id: u32, q: &mut DqBlk) -> io::Result<()> {
    let r = unsafe {
        libc::syscall(
            SYS_QUOTACTL_FD,
            fs.as_raw_fd(),
            (cmd << 8) | PRJQUOTA,
            id,
            q as *mut DqBlk,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A project id for the volume: from its id's hash, moved on past ids that some
/// other tree already uses. A limit alone does not make an id used: one is left
/// by every deleted volume and every failed restore (the limit is set before the
/// directory joins), and a project that holds no inode holds no directory.
fn free_project(fs: &File, volume_id: &str) -> Result<u32> {
    let hex = volume_id.rsplit('-').next().unwrap_or("");
    let base = u32::from_str_radix(hex.get(..8).unwrap_or("1"), 16).unwrap_or(1) | 0x1000_0000;
    for k in 0..64u32 {
        let id = base.wrapping_add(k).max(1);
        let mut q = DqBlk::default();
        match quotactl(fs, Q_GETQUOTA, id, &mut q) {
            Ok(()) if q.curspace == 0 && q.curinodes == 0 => return Ok(id),
            Ok(()) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(id),
            Err(e) => return Err(Error::io("read project quota", e)),
        }
    }
    Err(Error::Internal("no free project id found".into()))
}

/// Gives the (new, empty) directory `dir` a project of its own limited to `bytes`.
/// The limit is set before the directory joins the project, so that a journal
/// commit that makes the directory's change durable (its fsync) makes the limit,
/// an earlier change, durable too.
pub fn assign(dir: &Path, volume_id: &str, bytes: u64) -> Result<()> {
    // Two volumes whose ids hash near each other could both find one id free
    // before either joined it.
    static CHOOSING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _choosing = CHOOSING.lock().unwrap_or_else(|e| e.into_inner());
    let d = open(dir)?;
    let id = free_project(&d, volume_id)?;
    limit_project(&d, dir, id, bytes)?;
    let mut x = FsXattr::default();
    let joined = ioctl(&d, FS_IOC_FSGETXATTR, &mut x).and_then(|()| {
        x.projid = id;
        x.xflags |= FS_XFLAG_PROJINHERIT;
        ioctl(&d, FS_IOC_FSSETXATTR, &mut x)
    });
    if let Err(e) = joined {
        // Tidy: a limit on a project nobody joined means nothing.
        let _ = limit_project(&d, dir, id, 0);
        return Err(Error::io(format!("set project of {}", dir.display()), e));
    }
    Ok(())
}

/// The project `dir` belongs to; 0 for none.
pub fn project_of(dir: &Path) -> Result<u32> {
    let d = open(dir)?;
    let mut x = FsXattr::default();
    ioctl(&d, FS_IOC_FSGETXATTR, &mut x).ctx(|| format!("read attributes of {}", dir.display()))?;
    Ok(x.projid)
}

/// (bytes used, hard limit in bytes) of the project `dir` belongs to, from the
/// quota itself: statfs of the directory would report the whole filesystem for
/// one a pod took out of inheritance. None without a project or a limit.
pub fn usage(dir: &Path) -> Option<(u64, u64)> {
    let projid = project_of(dir).ok().filter(|p| *p != 0)?;
    let mut q = DqBlk::default();
    quotactl(&open(dir).ok()?, Q_GETQUOTA, projid, &mut q).ok()?;
    (q.bhardlimit > 0).then_some((q.curspace, q.bhardlimit * 1024))
}

/// Sets the hard limit of the project `dir` belongs to.
pub fn set_limit(dir: &Path, bytes: u64) -> Result<()> {
    let projid = project_of(dir)?;
    if projid == 0 {
        return Err(Error::FailedPrecondition(format!(
            "{} has no project id; it was made without project quotas",
            dir.display()
        )));
    }
    limit_project(&open(dir)?, dir, projid, bytes)
}

fn limit_project(fs: &File, dir: &Path, projid: u32, bytes: u64) -> Result<()> {
    let kib = bytes.div_ceil(1024);
    let mut q = DqBlk {
        bhardlimit: kib,
        bsoftlimit: kib,
        valid: QIF_BLIMITS,
        ..Default::default()
    };
    quotactl(fs, Q_SETQUOTA, projid, &mut q)
        .ctx(|| format!("set project quota of {}", dir.display()))
}

fn ioctl(f: &File, req: libc::c_ulong, x: &mut FsXattr) -> io::Result<()> {
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, x as *mut FsXattr) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
