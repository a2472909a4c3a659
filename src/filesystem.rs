//! Filesystems on loop volumes: recognise, format (only what holds none), mount,
//! grow. Formatting and growing run the standard programs, as every driver does;
//! everything else is a system call.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use crate::error::{Context, Error, Result};
use crate::mount::{self, check, Flags};

/// What the first bytes of a device say it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Nothing written where any signature would be: safe to format.
    Empty,
    /// Bytes, but no signature we know: an interrupted format of ours, or data of a
    /// kind we do not recognise. The caller knows which.
    Unrecognized,
    Filesystem(String),
    /// Something that is not a filesystem we mount (a partition table, swap, LUKS):
    /// data all the same, never to be formatted over.
    Other(String),
}

/// Signatures as (offset, bytes, what).
const SIGNATURES: &[(usize, &[u8], &str)] = &[
    (1080, &[0x53, 0xEF], "ext4"),
    (0, b"XFSB", "xfs"),
    (65600, b"_BHRfS_M", "btrfs"),
    (0, b"LUKS\xba\xbe", "LUKS"),
    (4086, b"SWAPSPACE2", "swap"),
    (512, b"EFI PART", "GPT partition table"),
    (510, &[0x55, 0xAA], "DOS partition table or boot sector"),
];

const XFS_SB_INPROGRESS: usize = 126;

/// Reads the device's signatures; the one decision that keeps data from being
/// formatted over. The device is first opened exclusively: a mkfs still running
/// from a call whose driver was killed holds it so, and formatting again beside it
/// could overwrite a filesystem that has just been made and used. Such a call is
/// ABORTED and retried once that mkfs is done (nothing starts another meanwhile:
/// the caller holds the volume's lock).
pub fn probe(device: &Path) -> Result<Content> {
    // Only the exclusive open is made while no program starts (a child would hold
    // a copy of it): a read that hangs on a failing disk must not hold up every
    // other program start on the node.
    crate::programs::without_children(|| check_not_busy(device))?;
    let mut head = vec![0u8; 65536 + 4096];
    read_head(device, &mut head)?;
    Ok(classify(&head))
}

/// Fails (ABORTED) if another holds `device` exclusively: a mkfs, or a mount.
fn check_not_busy(device: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(device)
    {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(Error::Aborted(format!(
            "{} is busy (a format started by an interrupted call may still be running, or \
             it is mounted elsewhere); retry",
            device.display()
        ))),
        Err(e) => Err(Error::io(format!("open {}", device.display()), e)),
    }
}

/// The first bytes of `device`.
fn read_head(device: &Path, head: &mut Vec<u8>) -> Result<()> {
    let mut f = std::fs::File::open(device)
        .map_err(|e| Error::io(format!("open {}", device.display()), e))?;
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(format!("read {}", device.display()), e)),
        }
    }
    head.truncate(n);
    Ok(())
}

fn classify(head: &[u8]) -> Content {
    for (off, sig, what) in SIGNATURES {
        if head.len() >= off + sig.len() && &head[*off..off + sig.len()] == *sig {
            // mkfs.xfs writes its superblock first, marked in progress until it is
            // done: one that never finished made a filesystem nobody ever used.
            if *what == "xfs" && head.get(XFS_SB_INPROGRESS).is_some_and(|b| *b != 0) {
                return Content::Empty;
            }
            return match *what {
                "ext4" | "xfs" | "btrfs" => Content::Filesystem(what.to_string()),
                _ => Content::Other(what.to_string()),
            };
        }
    }
    if head.iter().all(|b| *b == 0) {
        Content::Empty
    } else {
        Content::Unrecognized
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let out = crate::programs::output_of(cmd)
        .map_err(|e| Error::io(format!("run {what} (is the program installed?)"), e))?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Formats `device` with `fs_type`. Callers probe first: the probe decides, so
/// each mkfs is told to overwrite what it would second-guess (mkfs.xfs refuses
/// the superblock an unfinished mkfs.xfs left, which the probe reads as empty).
pub fn format(device: &Path, fs_type: &str) -> Result<()> {
    let mut cmd = match fs_type {
        // No reserved blocks: the claim's size is all the pod's. Lazy init and no
        // discard keep mkfs from writing the whole (sparse) backing file.
        "ext4" => {
            let mut c = Command::new("mkfs.ext4");
            c.args([
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            ]);
            c
        }
        "xfs" => {
            let mut c = Command::new("mkfs.xfs");
            c.args(["-q", "-f", "-K"]);
            c
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "cannot format {other}; use ext4 or xfs"
            )))
        }
    };
    cmd.arg(device);
    // A mkfs outliving a killed driver would race the retried stage for the device;
    // killed with the driver, it leaves at most an unfinished format, which the
    // probe reads as empty (ext4 writes its superblock last, xfs marks it in
    // progress) and the retry formats again.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run(&mut cmd).map_err(|e| match e {
        // The device is held (by a program of a killed call that has not exited
        // yet): nothing was written; the retry formats it.
        Error::Internal(m) if m.contains("in use") || m.contains("busy") => {
            Error::Aborted(format!("{}; retry", m))
        }
        e => e,
    })?;
    tracing::info!(device = %device.display(), fs_type, "formatted");
    Ok(())
}

/// Grows the filesystem mounted at `mount_point` (on `device`) to fill the device.
pub fn grow(device: &Path, mount_point: &Path, fs_type: &str) -> Result<()> {
    match fs_type {
        "ext4" => run(Command::new("resize2fs").arg(device)).map_err(|e| match e {
            // The kernel allows online ext4 resizing only with CAP_SYS_RESOURCE.
            Error::Internal(m) if m.contains("Permission denied") => {
                Error::FailedPrecondition(format!(
                    "online ext4 resize was refused ({m}): the driver needs CAP_SYS_RESOURCE \
                     (run it privileged); otherwise the filesystem grows when the volume is \
                     next staged"
                ))
            }
            e => e,
        }),
        "xfs" => run(Command::new("xfs_growfs").arg(mount_point)),
        other => Err(Error::Internal(format!("cannot grow a {other} filesystem"))),
    }
}

/// Grows an unmounted ext4 filesystem to fill its device (no capability needed,
/// unlike online growth). resize2fs wants a clean check first.
pub fn grow_offline(device: &Path) -> Result<()> {
    let out = crate::programs::output_of(Command::new("e2fsck").args(["-f", "-p"]).arg(device))
        .map_err(|e| Error::io("run e2fsck (is e2fsprogs installed?)", e))?;
    // 0: clean, 1: errors corrected. Anything else needs a person.
    if !matches!(out.status.code(), Some(0) | Some(1)) {
        return Err(Error::FailedPrecondition(format!(
            "e2fsck of {} before growing it found problems it could not fix ({}): {}",
            device.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    run(Command::new("resize2fs").arg(device))
}

/// Bytes the filesystem on `device` spans, from its superblock.
pub fn size_of(device: &Path, fs_type: &str) -> Result<Option<u64>> {
    let mut head = vec![0u8; 2048];
    let mut f = File::open(device).ctx(|| format!("open {}", device.display()))?;
    f.read_exact(&mut head)
        .ctx(|| format!("read {}", device.display()))?;
    let le32 = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().unwrap()) as u64;
    let be32 = |o: usize| u32::from_be_bytes(head[o..o + 4].try_into().unwrap()) as u64;
    let be64 = |o: usize| u64::from_be_bytes(head[o..o + 8].try_into().unwrap());
    Ok(match fs_type {
        "ext4" => {
            let sb = 1024;
            let blocks = le32(sb + 0x04) | (le32(sb + 0x150) << 32);
            Some(blocks << (10 + le32(sb + 0x18)))
        }
        "xfs" => Some(be64(8) * be32(4)),
        _ => None,
    })
}

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InvalidArgument(format!("{s:?} contains a NUL byte")))
}

/// The kernel's own words on why a filesystem context failed, if it left any.
fn context_log(fsfd: &OwnedFd) -> String {
    let mut buf = [0u8; 512];
    let mut msgs = vec![];
    loop {
        let n = unsafe { libc::read(fsfd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        msgs.push(String::from_utf8_lossy(&buf[..n as usize]).into_owned());
    }
    msgs.join("; ")
}

/// Mounts the `fs_type` filesystem on `device` at `target` with `flags`: the
/// per-mount attributes set before the mount is visible, the rest passed to the
/// filesystem as options. The target is opened without following symlinks.
pub fn mount(device: &Path, target: &Path, fs_type: &str, flags: &Flags) -> Result<()> {
    let dst = mount::open_nofollow(target)?;
    let fsname = cstr(fs_type)?;
    let fsfd = check(
        unsafe { libc::syscall(libc::SYS_fsopen, fsname.as_ptr(), FSOPEN_CLOEXEC) },
        || format!("open a {fs_type} filesystem context"),
    )?;
    let fsfd = unsafe { OwnedFd::from_raw_fd(fsfd as i32) };
    let set = |cmd: libc::c_uint, key: &str, value: Option<&str>| -> Result<()> {
        let k = cstr(key)?;
        let v = value.map(cstr).transpose()?;
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fsfd.as_raw_fd(),
                cmd,
                if key.is_empty() {
                    std::ptr::null()
                } else {
                    k.as_ptr()
                },
                v.as_ref().map_or(std::ptr::null(), |v| v.as_ptr()),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            let log = context_log(&fsfd);
            let what = if key.is_empty() {
                format!("mount {} ({fs_type}) [{log}]", device.display())
            } else {
                format!("{fs_type} mount option {key:?} [{log}]")
            };
            return Err(match e.raw_os_error() {
                Some(libc::EINVAL) if !key.is_empty() && key != "source" => {
                    Error::InvalidArgument(format!("{what}: the filesystem does not accept it"))
                }
                // Held by another program (an fsck or resize left by a killed call).
                Some(libc::EBUSY) => Error::Aborted(format!("{what}: device busy; retry")),
                _ => Error::io(what, e),
            });
        }
        Ok(())
    };
    set(
        FSCONFIG_SET_STRING,
        "source",
        Some(&device.to_string_lossy()),
    )?;
    if flags.is_readonly() {
        // Read-only superblock as well, so nothing (not even the journal) writes.
        set(FSCONFIG_SET_FLAG, "ro", None)?;
    }
    for opt in &flags.fs_options {
        match opt.split_once('=') {
            Some((k, v)) => set(FSCONFIG_SET_STRING, k, Some(v))?,
            None => set(FSCONFIG_SET_FLAG, opt, None)?,
        }
    }
    set(FSCONFIG_CMD_CREATE, "", None)?;
    let mnt = check(
        unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                fsfd.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                flags.attr_set as libc::c_uint,
            )
        },
        || format!("create a mount of {}", device.display()),
    )?;
    let mnt = unsafe { OwnedFd::from_raw_fd(mnt as i32) };
    mount::attach(&mnt, &dst, || {
        format!("mount {} at {}", device.display(), target.display())
    })
}

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A filesystem frozen for the instant of a copy: every write is flushed to the
/// device and new ones wait. Thawed on drop, so also on every error path; a crash
/// while frozen is undone at start-up (`thaw`).
pub struct Frozen {
    dir: File,
    mount_point: std::path::PathBuf,
}

pub fn freeze(mount_point: &Path) -> Result<Frozen> {
    let dir = File::open(mount_point).ctx(|| format!("open {}", mount_point.display()))?;
    // Flushed while writers still run, the freeze itself has little left to
    // write: the pod stalls for the copy, not for the disk.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } < 0 {
        tracing::debug!(mount = %mount_point.display(), err = %io::Error::last_os_error(), "syncfs before freeze failed");
    }
    if unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) } < 0 {
        return Err(Error::io(
            format!("freeze {}", mount_point.display()),
            io::Error::last_os_error(),
        ));
    }
    Ok(Frozen {
        dir,
        mount_point: mount_point.to_path_buf(),
    })
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW as _, 0) } < 0 {
            tracing::error!(mount = %self.mount_point.display(), err = %io::Error::last_os_error(), "thaw failed");
        }
    }
}

/// Thaws a filesystem a crashed run may have left frozen; not frozen is fine.
pub fn thaw(mount_point: &Path) -> Result<bool> {
    let dir = File::open(mount_point).ctx(|| format!("open {}", mount_point.display()))?;
    if unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW as _, 0) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok(false);
        }
        return Err(Error::io(format!("thaw {}", mount_point.display()), e));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_recognised() {
        let mut b = vec![0u8; 70000];
        assert_eq!(classify(&b), Content::Empty);
        b[1080] = 0x53;
        b[1081] = 0xEF;
        assert_eq!(classify(&b), Content::Filesystem("ext4".into()));
        let mut x = vec![0u8; 70000];
        x[..4].copy_from_slice(b"XFSB");
        assert_eq!(classify(&x), Content::Filesystem("xfs".into()));
        x[XFS_SB_INPROGRESS] = 1;
        assert_eq!(classify(&x), Content::Empty, "an unfinished mkfs.xfs");
        let mut p = vec![0u8; 70000];
        p[510] = 0x55;
        p[511] = 0xAA;
        assert!(matches!(classify(&p), Content::Other(_)));
        assert_eq!(classify(&[]), Content::Empty);
        let mut lvm = vec![0u8; 70000];
        lvm[512..520].copy_from_slice(b"LABELONE");
        assert_eq!(classify(&lvm), Content::Unrecognized);
    }
}
