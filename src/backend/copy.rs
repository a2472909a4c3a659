//! Copies of volume data for snapshots, restores and clones, from cheapest: a
//! reflink (FICLONE: btrfs, xfs with reflink) shares every block and takes
//! milliseconds; otherwise a sparse-aware copy (SEEK_DATA/SEEK_HOLE and
//! copy_file_range) that keeps holes holes. Never an archive.
//!
//! A directory volume's tree is written by pods: it is walked with openat2 and
//! RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, so a symlink planted (or swapped in
//! mid-copy) cannot make us read anything outside the volume. The walk keeps a
//! queue of relative paths, not open descriptors or stack frames, so a deep or
//! wide tree costs neither.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};

const FICLONE: libc::c_ulong = 0x4004_9409;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;
const RESOLVE_NO_XDEV: u64 = 0x01;

/// How a file was copied (reported in logs and by the benchmark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Reflink,
    SparseCopy,
}

/// Copies the contents of `src` into the new file behind `dst`.
fn copy_fd(src: &File, dst: &File) -> io::Result<Method> {
    if unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) } == 0 {
        return Ok(Method::Reflink);
    }
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let mut off: i64 = 0;
    while (off as u64) < len {
        let data = unsafe { libc::lseek(src.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        copy_range(src, dst, data, hole - data)?;
        off = hole;
    }
    Ok(Method::SparseCopy)
}

/// Copies `n` bytes at `at` from `src` to the same offset of `dst`: in the kernel
/// where it can, through a buffer where it cannot (across filesystems, old kernels).
fn copy_range(src: &File, dst: &File, at: i64, n: i64) -> io::Result<()> {
    let (mut in_off, mut out_off, mut left) = (at, at, n as usize);
    while left > 0 {
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut in_off,
                dst.as_raw_fd(),
                &mut out_off,
                left,
                0,
            )
        };
        if r > 0 {
            left -= r as usize;
            continue;
        }
        if r == 0 {
            break; // the source shrank under us
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EXDEV)
            | Some(libc::ENOSYS)
            | Some(libc::EINVAL)
            | Some(libc::EOPNOTSUPP) => return buffered(src, dst, in_off, left),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
    Ok(())
}

fn buffered(src: &File, dst: &File, mut at: i64, mut left: usize) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = left.min(buf.len());
        let got = src.read_at(&mut buf[..want], at as u64)?;
        if got == 0 {
            break;
        }
        dst.write_all_at(&buf[..got], at as u64)?;
        at += got as i64;
        left -= got;
    }
    Ok(())
}

/// Copies the file `src` to the new file `dst` (which must not exist). The copy
/// is in the page cache only: `make_durable` is the caller's separate step, so a
/// snapshot's cut (and a loop filesystem's freeze) does not wait for the disk.
pub fn copy_file(src: &Path, dst: &Path) -> Result<Method> {
    let (s, d) = open_pair(src, dst)?;
    copy_fd(&s, &d).map_err(|e| copy_error(e, src, dst))
}

/// A copy of `src` at `dst` that shares every block (FICLONE, one atomic step),
/// or nothing (false) where the filesystem cannot share blocks.
pub fn clone_file(src: &Path, dst: &Path) -> Result<bool> {
    let (s, d) = open_pair(src, dst)?;
    if unsafe { libc::ioctl(d.as_raw_fd(), FICLONE as _, s.as_raw_fd()) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    drop(d);
    fs::remove_file(dst).ctx(|| format!("remove {}", dst.display()))?;
    match e.raw_os_error() {
        // The filesystem cannot share blocks (or not between these two files).
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL) => Ok(false),
        _ => Err(copy_error(e, src, dst)),
    }
}

/// `src` opened to read and the new file `dst` (which must not exist) to write,
/// neither through a symlink.
fn open_pair(src: &Path, dst: &Path) -> Result<(File, File)> {
    let s = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(src)
        .ctx(|| format!("open {}", src.display()))?;
    let d = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dst)
        .ctx(|| format!("create {}", dst.display()))?;
    Ok((s, d))
}

fn copy_error(e: io::Error, src: &Path, dst: &Path) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return Error::NoSpace(format!(
            "no room under the driver root to copy {} to {}",
            src.display(),
            dst.display()
        ));
    }
    if e.raw_os_error() == Some(libc::EDQUOT) {
        // Only a copy into a volume whose project was given first (project quotas).
        return Error::OutOfRange(format!(
            "the data of {} does not fit in the size limit of {}; ask for a larger capacity",
            src.display(),
            dst.display()
        ));
    }
    Error::io(format!("copy {} to {}", src.display(), dst.display()), e)
}

/// The error of making `dst` (a directory, a link, a node) in a copy: no room and
/// no quota left are told as for file contents.
fn make_error(e: io::Error, src: &Path, dst: &Path) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => copy_error(e, src, dst),
        _ => Error::io(format!("create {}", dst.display()), e),
    }
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `rel` below the directory `base` without following any symlink,
/// without leaving `base`, and without entering a mount (a privileged pod's
/// inside its volume: what it shows is not the volume's data).
fn open_beneath(base: &File, rel: &Path, flags: i32) -> io::Result<File> {
    let path = if rel.as_os_str().is_empty() {
        CString::new(".").unwrap()
    } else {
        CString::new(rel.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?
    };
    let resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV;
    openat2(base.as_fd(), &path, flags, resolve).map(File::from)
}

/// The error of opening `path` in a tree being copied.
fn open_error(e: io::Error, path: &Path) -> Error {
    if e.kind() == io::ErrorKind::Interrupted {
        return Error::Aborted(format!("{} {e}; retry", path.display()));
    }
    if e.raw_os_error() == Some(libc::EXDEV) {
        return Error::FailedPrecondition(format!(
            "{} is a mount inside the volume; a copy does not cross into it (it is not the \
             volume's data): unmount it and retry",
            path.display()
        ));
    }
    Error::io(format!("open {}", path.display()), e)
}

/// Opens the directory `name` in `base` for listing, neither through a symlink
/// nor into another mount (a pod's bind mount inside its own volume).
/// Without openat2 (before Linux 5.6, or refused by a seccomp profile) a plain
/// openat with O_NOFOLLOW still refuses a symlink; a mount is then entered.
pub(crate) fn open_subdir(base: BorrowedFd, name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    let resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY;
    match openat2(base, name, flags, resolve) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
            let fd = unsafe {
                libc::openat(
                    base.as_raw_fd(),
                    name.as_ptr(),
                    flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
        r => r,
    }
}

fn openat2(
    base: BorrowedFd,
    path: &std::ffi::CStr,
    flags: i32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: 0,
        resolve,
    };
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            base.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Copies the directory tree `src` into the new directory `dst`: regular files
/// (reflinked or sparse-copied), directories, symlinks (as links, never followed),
/// fifos and device nodes, with owners and modes. Sockets are skipped. Returns the
/// number of files copied and whether every one was a reflink. Not yet durable:
/// see `make_durable`.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<(u64, bool)> {
    let base = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(src)
        .ctx(|| format!("open {}", src.display()))?;
    // An empty directory already there (a btrfs subvolume made for the copy) will do.
    match fs::DirBuilder::new().mode(0o700).create(dst) {
        Err(e)
            if e.kind() == io::ErrorKind::AlreadyExists
                && fs::read_dir(dst).is_ok_and(|mut d| d.next().is_none()) => {}
        r => r.ctx(|| format!("create {}", dst.display()))?,
    }
    let (mut files, mut all_reflink) = (0u64, true);
    // Files with more than one name: linked again, not copied twice (twice the
    // room, and no longer one file). Known by inode and birth time: a pod may
    // free an inode during the copy and make another file that reuses it.
    type Inode = (u64, u64, Option<std::time::SystemTime>);
    let mut linked: std::collections::HashMap<Inode, PathBuf> = Default::default();
    let mut queue: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = queue.pop() {
        let dir = open_beneath(&base, &rel, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| open_error(e, &src.join(&rel)))?;
        let out_dir = dst.join(&rel);
        copy_owner_mode(&dir.metadata().ctx(|| "stat")?, &out_dir)?;
        for entry in fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
            .ctx(|| format!("list {}", src.join(&rel).display()))?
        {
            let entry = entry.ctx(|| format!("list {}", src.join(&rel).display()))?;
            let name = entry.file_name();
            let child = rel.join(&name);
            let out = dst.join(&child);
            let meta = entry
                .metadata()
                .ctx(|| format!("stat {}", src.join(&child).display()))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&out)
                    .map_err(|e| make_error(e, &src.join(&child), &out))?;
                queue.push(child);
            } else if ft.is_file() {
                let (s, meta) =
                    open_regular(&base, &child).map_err(|e| open_error(e, &src.join(&child)))?;
                if meta.nlink() > 1 {
                    let inode = (meta.dev(), meta.ino(), meta.created().ok());
                    if let Some(first) = linked.get(&inode) {
                        fs::hard_link(first, &out)
                            .map_err(|e| make_error(e, &src.join(&child), &out))?;
                        continue;
                    }
                    linked.insert(inode, out.clone());
                }
                let d = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&out)
                    .map_err(|e| make_error(e, &src.join(&child), &out))?;
                let m = copy_fd(&s, &d).map_err(|e| copy_error(e, &src.join(&child), &out))?;
                all_reflink &= m == Method::Reflink;
                files += 1;
                copy_owner_mode(&meta, &out)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(entry.path())
                    .ctx(|| format!("read link {}", src.join(&child).display()))?;
                std::os::unix::fs::symlink(&target, &out)
                    .map_err(|e| make_error(e, &src.join(&child), &out))?;
                let _ = std::os::unix::fs::lchown(&out, Some(meta.uid()), Some(meta.gid()));
            } else {
                use std::os::unix::fs::FileTypeExt;
                if ft.is_socket() {
                    continue; // a socket is an endpoint of a process, not data
                }
                let kind = nix::sys::stat::SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT);
                nix::sys::stat::mknod(
                    &out,
                    kind,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    meta.rdev(),
                )
                .map_err(|e| make_error(e.into(), &src.join(&child), &out))?;
                copy_owner_mode(&meta, &out)?;
            }
        }
    }
    Ok((files, all_reflink))
}

/// Opens for reading the regular file at `rel`, with what it is now. The pod may
/// have swapped it for a FIFO or a device node since it was listed, and opening a
/// device can act on it: the path is taken without opening what it names
/// (O_PATH), checked to be a regular file, and only then opened. A file replaced
/// by another (a rename over it) is copied as it is now.
fn open_regular(base: &File, rel: &Path) -> io::Result<(File, fs::Metadata)> {
    let handle = open_beneath(base, rel, libc::O_PATH)?;
    let now = handle.metadata()?;
    if !now.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "is no longer a regular file",
        ));
    }
    Ok((
        File::open(format!("/proc/self/fd/{}", handle.as_raw_fd()))?,
        now,
    ))
}

fn copy_owner_mode(meta: &fs::Metadata, path: &Path) -> Result<()> {
    nix::unistd::chown(path, Some(meta.uid().into()), Some(meta.gid().into()))
        .ctx(|| format!("chown {}", path.display()))?;
    fs::set_permissions(
        path,
        std::os::unix::fs::PermissionsExt::from_mode(meta.mode() & 0o7777),
    )
    .ctx(|| format!("chmod {}", path.display()))
}

/// Makes a copy durable, with its name in its parent: a file by fsync, a tree by
/// syncfs, which covers every file and directory of it in one call. A btrfs
/// subvolume snapshot was committed by the ioctl that made it.
pub fn make_durable(dst: &Path) -> Result<()> {
    let f = File::open(dst).ctx(|| format!("open {}", dst.display()))?;
    let synced = if super::btrfs::is_subvolume(dst) {
        Ok(())
    } else if f
        .metadata()
        .ctx(|| format!("stat {}", dst.display()))?
        .is_dir()
    {
        if unsafe { libc::syncfs(f.as_raw_fd()) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    } else {
        f.sync_all()
    };
    synced.map_err(|e| Error::io(format!("sync {}", dst.display()), e))?;
    crate::store::sync_dir(dst.parent().expect("data paths have a parent"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(64 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        copy_file(&src, &dst).unwrap();
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
        // Far less allocated than the 64 MiB length: the hole stayed a hole.
        assert!(fs::metadata(&dst).unwrap().blocks() * 512 < 8 << 20);
    }

    /// A file the pod swapped for a FIFO after the listing is neither opened (the
    /// open would block the copy forever) nor taken for the file.
    #[test]
    fn a_file_swapped_for_a_fifo_is_refused_without_opening_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), b"data").unwrap();
        let base = File::open(dir.path()).unwrap();
        let read = |base: &File| {
            let mut text = String::new();
            io::Read::read_to_string(
                &mut open_regular(base, Path::new("f")).unwrap().0,
                &mut text,
            )
            .unwrap();
            text
        };
        assert_eq!(read(&base), "data");
        // Replaced by another file (a rename over it): copied as it is now.
        fs::write(dir.path().join("g"), b"newer").unwrap();
        fs::rename(dir.path().join("g"), dir.path().join("f")).unwrap();
        assert_eq!(read(&base), "newer");

        fs::remove_file(dir.path().join("f")).unwrap();
        nix::unistd::mkfifo(
            &dir.path().join("f"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = open_regular(&base, Path::new("f")).map(|_| ());
            let _ = tx.send(r.map_err(|e| e.kind()));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the open blocked on the FIFO");
        assert_eq!(r, Err(io::ErrorKind::Interrupted));
    }

    #[test]
    fn tree_copy_keeps_hard_links_as_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("d")).unwrap();
        fs::write(src.join("f"), b"data").unwrap();
        fs::hard_link(src.join("f"), src.join("d/g")).unwrap();
        let dst = dir.path().join("dst");
        let (files, _) = copy_tree(&src, &dst).unwrap();
        assert_eq!(files, 1, "one file, two names");
        let (f, g) = (
            fs::metadata(dst.join("f")).unwrap(),
            fs::metadata(dst.join("d/g")).unwrap(),
        );
        assert_eq!((f.ino(), f.nlink()), (g.ino(), 2));
        assert_eq!(fs::read(dst.join("d/g")).unwrap(), b"data");
    }

    #[test]
    fn tree_copy_keeps_links_as_links() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/b/f"), b"data").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", src.join("a/escape")).unwrap();
        let dst = dir.path().join("dst");
        let (files, _) = copy_tree(&src, &dst).unwrap();
        assert_eq!(files, 1);
        assert_eq!(fs::read(dst.join("a/b/f")).unwrap(), b"data");
        assert_eq!(
            fs::read_link(dst.join("a/escape")).unwrap(),
            PathBuf::from("/etc/hostname")
        );
    }
}
