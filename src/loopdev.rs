//! Loop devices through the kernel's loop-control and loop ioctls.
//!
//! Which device holds which backing file is read from sysfs
//! (`/sys/block/loopN/loop/backing_file`) every time it is asked: after a restart,
//! or a reboot that cleared every device, the answer is still right, and a file that
//! is already attached is found and reused instead of attached twice. The device a
//! file was last seen on is remembered only as a place to look first, so the usual
//! question reads one device's sysfs entry instead of every device's; the hint is
//! believed only after sysfs confirms it. That a file is attached nowhere, the
//! usual answer before a stage and at a delete, is asked of the file itself (a
//! lease, below), so no question reads every device unless the file is open
//! somewhere: the cost does not grow with the loop volumes on the node.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::error::{Context, Error, Result};

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

const LO_FLAGS_DIRECT_IO: u32 = 16;

/// Logical block size of our devices: 4 KiB keeps direct I/O possible on backing
/// filesystems whose own sectors are 4 KiB, and never changes for a volume (a
/// filesystem made on it must find the same sector size on every attach).
const BLOCK_SIZE: u32 = 4096;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `loop3`
    pub name: String,
    /// major, minor
    pub dev: (u32, u32),
}

impl LoopDevice {
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/dev").join(&self.name)
    }

    /// Whether the kernel bypasses the page cache for the backing file.
    pub fn direct_io(&self) -> bool {
        fs::read_to_string(sysfs(&self.name).join("loop/dio"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    }

    /// Size of the device in bytes, as the kernel sees it now.
    pub fn size_bytes(&self) -> Result<u64> {
        let p = sysfs(&self.name).join("size");
        let sectors: u64 = fs::read_to_string(&p)
            .ctx(|| format!("read {}", p.display()))?
            .trim()
            .parse()
            .map_err(|_| Error::Internal(format!("{} is not a number", p.display())))?;
        Ok(sectors * 512)
    }
}

fn sysfs(name: &str) -> PathBuf {
    PathBuf::from("/sys/block").join(name)
}

fn read_dev(name: &str) -> Option<(u32, u32)> {
    let s = fs::read_to_string(sysfs(name).join("dev")).ok()?;
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Every attached loop device with its backing file, as the kernel names it.
pub fn attached() -> Vec<(LoopDevice, PathBuf)> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return vec![];
    };
    let mut out = vec![];
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue; // not attached
        };
        let backing = backing.trim_end_matches('\n');
        let Some(dev) = read_dev(&name) else { continue };
        out.push((LoopDevice { name, dev }, PathBuf::from(backing)));
    }
    out
}

/// Canonical backing file -> device name it was last found on. Only a hint.
fn hints() -> &'static Mutex<HashMap<PathBuf, String>> {
    static HINTS: OnceLock<Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
    HINTS.get_or_init(Default::default)
}

fn remember(file: &Path, d: &LoopDevice) {
    if let Ok(file) = crate::mount::resolve(file) {
        hints().lock().unwrap().insert(file, d.name.clone());
    }
}

/// The device `name` if sysfs says it holds exactly `file` now.
fn confirmed(name: &str, file: &Path) -> Option<LoopDevice> {
    let backing = fs::read_to_string(sysfs(name).join("loop/backing_file")).ok()?;
    if Path::new(backing.trim_end_matches('\n')) != file {
        return None;
    }
    Some(LoopDevice {
        name: name.to_string(),
        dev: read_dev(name)?,
    })
}

/// The device `file` is attached to, if any. A file deleted while attached shows
/// as `"<path> (deleted)"` and is not matched: it is no longer this path's data.
pub fn find(file: &Path) -> Option<LoopDevice> {
    let file = crate::mount::resolve(file).ok()?;
    let hint = hints().lock().unwrap().get(&file).cloned();
    if let Some(d) = hint.and_then(|name| confirmed(&name, &file)) {
        return Some(d);
    }
    if open_elsewhere(&file) == Some(false) {
        hints().lock().unwrap().remove(&file);
        return None;
    }
    let found = attached()
        .into_iter()
        .find(|(_, backing)| *backing == file)
        .map(|(d, _)| d);
    let mut hints = hints().lock().unwrap();
    match &found {
        Some(d) => hints.insert(file, d.name.clone()),
        None => hints.remove(&file),
    };
    found
}

/// Whether anyone else has `file` open, asked of the kernel in one call: a write
/// lease is granted only on a file open nowhere else, and an attached loop device
/// holds its backing file open. The lease goes with the descriptor, at once. None
/// where no lease can be had (leases disabled, a filesystem without them, a lease
/// someone else holds): the caller must then look at every device.
fn open_elsewhere(file: &Path) -> Option<bool> {
    // Someone opening the file while we hold the lease has the kernel send us
    // SIGIO, whose default is to end the process. They wait the microseconds until
    // we let go; the notice itself we do not need.
    static IGNORE_SIGIO: std::sync::Once = std::sync::Once::new();
    IGNORE_SIGIO.call_once(|| unsafe {
        libc::signal(libc::SIGIO, libc::SIG_IGN);
    });
    crate::programs::without_children(|| {
        // O_NONBLOCK: an open that would have to break another's lease fails instead.
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(file)
            .ok()?;
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) } == 0 {
            return Some(false);
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EBUSY) => Some(true),
            _ => None,
        }
    })
}

/// Devices still attached to `file` after it was deleted (its path shows with
/// " (deleted)"): the data they hold is reachable through them alone.
pub fn find_deleted(file: &Path) -> Vec<LoopDevice> {
    let (Some(parent), Some(name)) = (file.parent(), file.file_name()) else {
        return vec![];
    };
    let parent = fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
    let mut shown = parent.join(name).into_os_string();
    shown.push(" (deleted)");
    attached()
        .into_iter()
        .filter(|(_, backing)| backing.as_os_str() == shown)
        .map(|(d, _)| d)
        .collect()
}

fn ioctl(fd: &impl AsRawFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Attaches `file` to a free loop device, or returns the device it is already
/// attached to. The caller serializes calls for one file (the volume lock).
pub fn attach(file: &Path) -> Result<LoopDevice> {
    attach_reporting(file).map(|(d, _)| d)
}

/// [`attach`], also saying whether this call made the attachment (one lookup,
/// not a second scan of every loop device to find out).
pub fn attach_reporting(file: &Path) -> Result<(LoopDevice, bool)> {
    attach_with_nodes_in(file, Path::new("/dev"))
}

/// [`attach_reporting`], opening device nodes in `dev` (tests use a directory
/// of their own, as a /dev that is not devtmpfs).
fn attach_with_nodes_in(file: &Path, dev_dir: &Path) -> Result<(LoopDevice, bool)> {
    if let Some(d) = find(file) {
        return Ok((d, false));
    }
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(file)
        .ctx(|| format!("open {}", file.display()))?;
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .ctx(|| "open /dev/loop-control (is the loop module loaded?)")?;
    // Another process may take the free device between our two calls: try again.
    for attempt in 0..32 {
        let n = ioctl(&control, LOOP_CTL_GET_FREE, 0).ctx(|| "find a free loop device")?;
        let name = format!("loop{n}");
        let path = dev_dir.join(&name);
        let dev = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The node appears a moment after the device; wait for devtmpfs.
                // A /dev that is a copy rather than devtmpfs (a kind node's) never
                // gets it: then it is made from the numbers sysfs gives.
                if attempt < 4 {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                } else {
                    make_node(&name, &path)?;
                }
                continue;
            }
            Err(e) => return Err(Error::io(format!("open {}", path.display()), e)),
        };
        match configure(&dev, &backing) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
            Err(e) => return Err(Error::io(format!("attach {} to {name}", file.display()), e)),
        }
        let d = LoopDevice {
            dev: read_dev(&name).ok_or_else(|| {
                Error::Internal(format!("{name} is attached but has no sysfs dev entry"))
            })?,
            name,
        };
        remember(file, &d);
        tracing::info!(device = %d.path().display(), file = %file.display(), direct_io = d.direct_io(), "loop device attached");
        return Ok((d, true));
    }
    Err(Error::Aborted(
        "every free loop device was taken by someone else; retry".into(),
    ))
}

/// Makes `/dev/loopN` for a device the kernel has (its sysfs entry), as devtmpfs
/// would have.
fn make_node(name: &str, path: &Path) -> Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let Some((major, minor)) = read_dev(name) else {
        // Not (or no longer) a device: the caller asks for another.
        std::thread::sleep(std::time::Duration::from_millis(5));
        return Ok(());
    };
    match mknod(
        path,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o660),
        makedev(major.into(), minor.into()),
    ) {
        Ok(()) => {
            tracing::info!(device = %path.display(), "made the device node /dev lacks (not devtmpfs)");
            Ok(())
        }
        Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(Error::io(
            format!("make the missing device node {}", path.display()),
            io::Error::from(e),
        )),
    }
}

/// LOOP_CONFIGURE sets file, block size and direct I/O in one call (Linux 5.8);
/// older kernels get the three-step way.
fn configure(dev: &File, backing: &File) -> io::Result<()> {
    let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
    cfg.fd = backing.as_raw_fd() as u32;
    cfg.block_size = BLOCK_SIZE;
    cfg.info.lo_flags = LO_FLAGS_DIRECT_IO;
    match ioctl(
        dev,
        LOOP_CONFIGURE,
        &cfg as *const LoopConfig as libc::c_ulong,
    ) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // Direct I/O refused by the backing filesystem (tmpfs, ...): go without.
            cfg.info.lo_flags = 0;
            match ioctl(
                dev,
                LOOP_CONFIGURE,
                &cfg as *const LoopConfig as libc::c_ulong,
            ) {
                Ok(_) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => legacy_configure(dev, backing),
                Err(e) => Err(e),
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => legacy_configure(dev, backing),
        Err(e) => Err(e),
    }
}

fn legacy_configure(dev: &File, backing: &File) -> io::Result<()> {
    ioctl(dev, LOOP_SET_FD, backing.as_raw_fd() as libc::c_ulong)?;
    let info: LoopInfo64 = unsafe { std::mem::zeroed() };
    if let Err(e) = ioctl(
        dev,
        LOOP_SET_STATUS64,
        &info as *const LoopInfo64 as libc::c_ulong,
    ) {
        let _ = ioctl(dev, LOOP_CLR_FD, 0);
        return Err(e);
    }
    let _ = ioctl(dev, LOOP_SET_DIRECT_IO, 1);
    Ok(())
}

/// Detaches the device of `file` if it has one. The kernel defers the detach of a
/// device still open (a mount we did not make): it goes when the last user closes it.
pub fn detach(file: &Path) -> Result<()> {
    let Some(d) = find(file) else {
        return Ok(());
    };
    detach_device(&d)?;
    tracing::info!(device = %d.path().display(), file = %file.display(), "loop device detached");
    Ok(())
}

pub fn detach_device(d: &LoopDevice) -> Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(d.path())
        .ctx(|| format!("open {}", d.path().display()))?;
    match ioctl(&f, LOOP_CLR_FD, 0) {
        Ok(_) => Ok(()),
        // Already detached by someone else.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(e) => Err(Error::io(format!("detach {}", d.path().display()), e)),
    }
}

/// Makes the device see its backing file's new size after the file grew.
pub fn refresh_size(d: &LoopDevice) -> Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(d.path())
        .ctx(|| format!("open {}", d.path().display()))?;
    ioctl(&f, LOOP_SET_CAPACITY, 0).ctx(|| format!("refresh size of {}", d.path().display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_have_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    struct Detach(PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = detach(&self.0);
        }
    }

    /// A hint is a place to look, never an answer: wrong or stale, it is checked
    /// against sysfs and replaced by the scan's answer.
    #[test]
    fn a_wrong_hint_is_never_believed() {
        let Some((_dir, file)) = image() else {
            return;
        };
        let canon = fs::canonicalize(&file).unwrap();
        // Not attached: a hint naming some device is dropped.
        hints()
            .lock()
            .unwrap()
            .insert(canon.clone(), "loop0".into());
        assert_eq!(find(&file), None);
        assert!(!hints().lock().unwrap().contains_key(&canon));

        let d = attach(&file).unwrap();
        let _guard = Detach(file.clone());
        assert_eq!(find(&file), Some(d.clone()));
        // A hint pointing elsewhere (a device reused by another file).
        hints()
            .lock()
            .unwrap()
            .insert(canon.clone(), "loop-none".into());
        assert_eq!(find(&file), Some(d.clone()));
        assert_eq!(hints().lock().unwrap().get(&canon), Some(&d.name));
        detach(&file).unwrap();
        assert_eq!(find(&file), None);
    }

    /// In a /dev that is a copy (a kind node's), a new device's node never appears:
    /// the attach makes it. Played with a directory of the test's own as /dev.
    #[test]
    fn attaches_where_dev_is_not_devtmpfs() {
        let Some((dir, file)) = image() else {
            return;
        };
        let dev_dir = dir.path().join("dev");
        fs::create_dir(&dev_dir).unwrap();
        let (d, made) = attach_with_nodes_in(&file, &dev_dir).unwrap();
        let _guard = Detach(file.clone());
        assert!(made);
        let node = fs::metadata(dev_dir.join(&d.name)).unwrap();
        assert!(
            std::os::unix::fs::FileTypeExt::is_block_device(&node.file_type()),
            "{} made",
            d.name
        );
        assert_eq!(find(&file), Some(d));
        detach(&file).unwrap();
        assert_eq!(find(&file), None);
    }

    /// A 1 MiB image in a new directory, when running as root; None (the test is
    /// skipped) otherwise.
    fn image() -> Option<(tempfile::TempDir, PathBuf)> {
        if !nix::unistd::Uid::effective().is_root() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("img");
        // A program started by a test beside this one would copy the descriptor
        // and hold the file open for a moment, which the lease takes for a user.
        crate::programs::without_children(|| {
            File::create(&file).unwrap().set_len(1 << 20).unwrap()
        });
        Some((dir, file))
    }

    /// [`image`], on a filesystem that grants leases.
    fn leasable_image() -> Option<(tempfile::TempDir, PathBuf)> {
        let (dir, file) = image()?;
        if open_elsewhere(&file).is_none() {
            eprintln!("skipped: no leases on this filesystem");
            return None;
        }
        Some((dir, file))
    }

    /// Leases taken while programs start, and the file opened right after: no
    /// child copies a leased descriptor (its copy would keep the lease, and our
    /// own open would break it), and a break's SIGIO does not end the process.
    #[test]
    fn leases_and_starting_programs_keep_apart() {
        let Some((_dir, file)) = leasable_image() else {
            return;
        };
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    crate::programs::output_of(&mut std::process::Command::new("true")).unwrap();
                }
            });
            let until = std::time::Instant::now() + std::time::Duration::from_millis(1500);
            while std::time::Instant::now() < until {
                assert_eq!(find(&file), None);
                drop(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&file)
                        .unwrap(),
                );
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }

    /// "Attached nowhere" is answered by the lease alone; an attached file, or one
    /// some program holds open, is looked for on every device, and found.
    #[test]
    fn the_lease_tells_a_file_no_device_holds() {
        let Some((_dir, file)) = leasable_image() else {
            return;
        };
        assert_eq!(open_elsewhere(&file), Some(false));
        assert_eq!(find(&file), None);
        {
            // Open by someone else: not proof of a device, so the scan decides.
            let _held = File::open(&file).unwrap();
            assert_eq!(open_elsewhere(&file), Some(true));
            assert_eq!(find(&file), None);
        }
        let d = attach(&file).unwrap();
        let _guard = Detach(file.clone());
        assert_eq!(open_elsewhere(&file), Some(true));
        // Without a hint the scan finds it.
        hints()
            .lock()
            .unwrap()
            .remove(&crate::mount::resolve(&file).unwrap());
        assert_eq!(find(&file), Some(d));
        detach(&file).unwrap();
        // The kernel lets go of the file once the device's last opener closes it
        // (another test's probe may hold it for a moment).
        let released = (0..200).any(|_| {
            let free = open_elsewhere(&file) == Some(false);
            if !free {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            free
        });
        assert!(
            released,
            "the detached device still holds the file after 2 s"
        );
        assert_eq!(find(&file), None);
    }
}
