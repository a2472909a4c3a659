//! Mounts: the kernel is the truth about what is mounted where, and it is asked
//! on every question, never copied. A question about one path (what is mounted
//! here, which data would a bind of this show) goes to that path's own mount
//! (statx, statmount), so its cost does not grow with the node's mount count.
//! Every mount of some data is found in an index kept current by the kernel's
//! reports of each mount change (fanotify), or by listing mount ids (listmount)
//! where there are no reports; the whole table
//! (/proc/self/mountinfo) is read at start-up, for status and where the kernel
//! cannot answer.
//!
//! Bind mounts use the new mount API (open_tree, mount_setattr, move_mount): the
//! mount is made read-only before it becomes visible, and the target is opened
//! without following symlinks, so a planted symlink cannot redirect a mount.

mod events;
mod statmount;

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags};

use crate::error::{Context, Error, Result};

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub dev: (u32, u32),
    /// The path inside the mounted filesystem that appears at `mount_point`.
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (ro/rw, nosuid, ...).
    pub options: String,
    pub fs_type: String,
    pub source: String,
    /// Options of the filesystem itself (prjquota, ...); only "ro" or "rw" in an
    /// entry read for one path (statmount), which projquota does not rely on.
    pub super_options: String,
}

impl MountEntry {
    pub fn is_readonly(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
    /// What the mount shows: the same key means the same data.
    pub fn key(&self) -> MountKey {
        MountKey {
            dev: self.dev,
            root: self.root.clone(),
        }
    }
}

/// Identifies a subtree of a filesystem: a bind mount of it carries the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountKey {
    pub dev: (u32, u32),
    pub root: PathBuf,
}

/// Undoes the octal escapes mountinfo uses for space, tab, newline and backslash.
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // Only \000..\377 is a byte; anything larger is not an escape.
        if b[i] == b'\\'
            && i + 3 < b.len()
            && (b'0'..=b'3').contains(&b[i + 1])
            && b[i + 2..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// Parses the text of a mountinfo file.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if f.len() < 6 || r.len() < 2 {
                return None;
            }
            let (maj, min) = f[2].split_once(':')?;
            Some(MountEntry {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                root: unescape(f[3]),
                mount_point: unescape(f[4]),
                options: f[5].to_string(),
                fs_type: r[0].to_string(),
                source: unescape(r[1]).to_string_lossy().into_owned(),
                super_options: r.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// The current mount table of this process's mount namespace.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let text = fs::read_to_string("/proc/self/mountinfo").ctx(|| "read /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

/// `path` with every symlink, `.` and `..` resolved, as `realpath` gives it, but
/// asked of the kernel in two calls (an O_PATH open, a readlink of its
/// /proc/self/fd entry) where realpath makes one readlink per component.
pub fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let resolved = fs::read_link(format!("/proc/self/fd/{fd}"))?;
    // Anything but an absolute path (a pseudo-file's name) is not a real answer.
    if resolved.is_absolute() {
        Ok(resolved)
    } else {
        fs::canonicalize(path)
    }
}

/// `path` with its parents resolved as far as they exist, as the kernel writes
/// mount points, and as a directory made there (missing parents too, through
/// their symlinks) would be named; the last component is kept as given (it may
/// be a symlink we must not follow).
pub fn canonical(path: &Path) -> PathBuf {
    let Some(name) = path.file_name() else {
        return path.to_path_buf();
    };
    let mut missing = vec![name.to_os_string()];
    let mut at = path.parent();
    while let Some(dir) = at {
        if let Ok(mut p) = resolve(dir) {
            p.extend(missing.iter().rev());
            return p;
        }
        missing.extend(dir.file_name().map(|n| n.to_os_string()));
        at = dir.parent();
    }
    path.to_path_buf()
}

/// The topmost mount at exactly `path`, if any (a symlink there is not followed).
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    match statmount::mount_at(path) {
        Some(answer) => Ok(answer),
        None => Ok(mount_at_in(&mounts()?, path)),
    }
}

/// The key of the data a bind mount of `path` would show (symlinks followed).
pub fn key_of(path: &Path) -> Result<MountKey> {
    let canon = resolve(path).ctx(|| format!("resolve {}", path.display()))?;
    if let Some(m) = statmount::mount_holding(&canon) {
        if let Some(key) = key_below(&m, &canon) {
            return Ok(key);
        }
    }
    key_of_in(&mounts()?, path)
}

/// The mount that holds `path` (symlinks followed): the topmost of the longest
/// mount point above it. Asked of the kernel for that one mount where it can
/// answer, so the cost does not grow with the node's mounts.
pub fn mount_holding(path: &Path) -> Result<MountEntry> {
    let canon = resolve(path).ctx(|| format!("resolve {}", path.display()))?;
    if let Some(m) = statmount::mount_holding(&canon) {
        return Ok(m);
    }
    holding_in(&mounts()?, &canon).cloned()
}

/// The mount of `table` that holds canonical `path`: the longest mount point above
/// it, and of a stack the last (topmost), as statx sees it.
fn holding_in<'t>(table: &'t [MountEntry], path: &Path) -> Result<&'t MountEntry> {
    table
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .ok_or_else(|| Error::Internal(format!("no mount holds {}", path.display())))
}

/// [`mount_at`] answered from a mount table read once for many questions.
pub fn mount_at_in(table: &[MountEntry], path: &Path) -> Option<MountEntry> {
    let path = canonical(path);
    table.iter().rev().find(|m| m.mount_point == path).cloned()
}

/// [`key_of`] answered from a mount table read once for many questions.
pub fn key_of_in(table: &[MountEntry], path: &Path) -> Result<MountKey> {
    let path = resolve(path).ctx(|| format!("resolve {}", path.display()))?;
    Ok(key_below(holding_in(table, &path)?, &path).expect("prefix checked"))
}

/// The key of canonical `path` inside mount `m`; None if `m` is not above it.
fn key_below(m: &MountEntry, path: &Path) -> Option<MountKey> {
    let rel = path.strip_prefix(&m.mount_point).ok()?;
    let root = if rel.as_os_str().is_empty() {
        m.root.clone()
    } else {
        m.root.join(rel)
    };
    Some(MountKey { dev: m.dev, root })
}

/// Every mount that shows the data of `key`.
pub fn mounts_of<'a>(
    table: &'a [MountEntry],
    key: &'a MountKey,
) -> impl Iterator<Item = &'a MountEntry> {
    table
        .iter()
        .filter(move |m| m.dev == key.dev && m.root == key.root)
}

/// Every mount that shows the data of one of `keys`: what [`mounts_of`] finds in
/// [`mounts()`], without formatting and parsing the whole table.
pub fn mounts_showing(keys: &[MountKey]) -> Result<Vec<MountEntry>> {
    if keys.is_empty() {
        return Ok(vec![]);
    }
    if let Some(found) = statmount::mounts_showing(keys) {
        return Ok(found);
    }
    Ok(mounts()?
        .into_iter()
        .filter(|m| keys.contains(&m.key()))
        .collect())
}

/// Every mount that shows `key`'s directory or one below it.
pub fn mounts_below(key: &MountKey) -> Result<Vec<MountEntry>> {
    if let Some(found) = statmount::mounts_below(key) {
        return Ok(found);
    }
    let dir = key.root.as_os_str().as_bytes();
    Ok(mounts()?
        .into_iter()
        .filter(|m| m.dev == key.dev && statmount::is_below(m.root.as_os_str().as_bytes(), dir))
        .collect())
}

/// Mount flags a capability may carry. Flags a bind mount can apply become mount
/// attributes; the rest are filesystem options, valid only where a filesystem is
/// mounted (loop volumes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    pub attr_set: u64,
    pub attr_clr: u64,
    /// Options for the filesystem itself (`discard`, `nobarrier`, ...).
    pub fs_options: Vec<String>,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR__ATIME: u64 = 0x70;
const MOUNT_ATTR_NOATIME: u64 = 0x10;
const MOUNT_ATTR_STRICTATIME: u64 = 0x20;
const MOUNT_ATTR_NODIRATIME: u64 = 0x80;

impl Flags {
    /// Sorts capability mount flags into bind attributes and filesystem options.
    pub fn parse(flags: &[String]) -> Result<Flags> {
        let mut f = Flags::default();
        for flag in flags
            .iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            if flag.len() > 256 || flag.contains('\0') {
                // Cut by characters: a byte cut could split one and panic.
                return Err(Error::InvalidArgument(format!(
                    "mount flag {:?}... is malformed",
                    flag.chars().take(32).collect::<String>()
                )));
            }
            match flag {
                "ro" => f.attr_set |= MOUNT_ATTR_RDONLY,
                "rw" | "defaults" | "bind" | "rbind" => {}
                "nosuid" => f.attr_set |= MOUNT_ATTR_NOSUID,
                "suid" => f.attr_clr |= MOUNT_ATTR_NOSUID,
                "nodev" => f.attr_set |= MOUNT_ATTR_NODEV,
                "dev" => f.attr_clr |= MOUNT_ATTR_NODEV,
                "noexec" => f.attr_set |= MOUNT_ATTR_NOEXEC,
                "exec" => f.attr_clr |= MOUNT_ATTR_NOEXEC,
                "nodiratime" => f.attr_set |= MOUNT_ATTR_NODIRATIME,
                "noatime" | "strictatime" | "relatime" => {
                    f.attr_clr |= MOUNT_ATTR__ATIME;
                    f.attr_set = (f.attr_set & !MOUNT_ATTR__ATIME)
                        | match flag {
                            "noatime" => MOUNT_ATTR_NOATIME,
                            "strictatime" => MOUNT_ATTR_STRICTATIME,
                            _ => 0,
                        };
                }
                other => f.fs_options.push(other.to_string()),
            }
        }
        Ok(f)
    }

    pub fn readonly(mut self, ro: bool) -> Self {
        if ro {
            self.attr_set |= MOUNT_ATTR_RDONLY;
        }
        self
    }

    pub fn is_readonly(&self) -> bool {
        self.attr_set & MOUNT_ATTR_RDONLY != 0
    }

    /// Whether a mount with these per-mount `options` (as mountinfo spells them)
    /// is what the flags ask for, "ro" aside. Only what they name is compared: a
    /// bind takes its source's attributes, so one not named may be either way.
    pub fn agree_with(&self, options: &str) -> bool {
        let has = |o: &str| options.split(',').any(|x| x == o);
        for (bit, name) in [
            (MOUNT_ATTR_NOSUID, "nosuid"),
            (MOUNT_ATTR_NODEV, "nodev"),
            (MOUNT_ATTR_NOEXEC, "noexec"),
            (MOUNT_ATTR_NODIRATIME, "nodiratime"),
        ] {
            if (self.attr_set & bit != 0 && !has(name)) || (self.attr_clr & bit != 0 && has(name)) {
                return false;
            }
        }
        if self.attr_clr & MOUNT_ATTR__ATIME != 0 {
            let shown = if has("noatime") {
                MOUNT_ATTR_NOATIME
            } else if has("relatime") {
                0
            } else {
                MOUNT_ATTR_STRICTATIME
            };
            if self.attr_set & MOUNT_ATTR__ATIME != shown {
                return false;
            }
        }
        true
    }
}

/// Opens `path` as an O_PATH handle, refusing a symlink in the last component.
pub fn open_nofollow(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("{} contains a NUL byte", path.display())))?;
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ELOOP) {
            return Err(Error::InvalidArgument(format!(
                "{} is a symlink; localvol does not mount onto symlinks",
                path.display()
            )));
        }
        return Err(Error::io(format!("open {}", path.display()), e));
    }
    // A symlink opened with O_PATH|O_NOFOLLOW succeeds: refuse it here.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = nix::sys::stat::fstat(&owned).ctx(|| format!("stat {}", path.display()))?;
    if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(Error::InvalidArgument(format!(
            "{} is a symlink; localvol does not mount onto symlinks",
            path.display()
        )));
    }
    Ok(owned)
}

pub(crate) fn check(ret: libc::c_long, what: impl FnOnce() -> String) -> Result<libc::c_long> {
    if ret < 0 {
        Err(Error::io(what(), io::Error::last_os_error()))
    } else {
        Ok(ret)
    }
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

/// A detached copy of the mount that holds a directory, rooted at that directory
/// and seen by no one else. Binds of what lies below the directory are cloned
/// from the copy: cloning checks every mount below the mount cloned from (the
/// kernel's `__has_locked_children`), and on a node where the driver runs on the
/// host, every pod's mounts sit below the mount of the driver's root; below this
/// copy sits nothing. With 3000 mounts on the node that check alone cost a stage
/// 0.7 ms. The copy lives as long as its descriptor (the process, kill -9
/// included); the kernel frees it then.
pub struct Detached {
    fd: OwnedFd,
    dir: PathBuf,
}

impl Detached {
    /// A copy of the mount holding `dir`. Fails on kernels before 6.15, which do
    /// not clone from a detached mount; binds then clone from the node's mount.
    pub fn of(dir: &Path) -> Result<Detached> {
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
            Error::InvalidArgument(format!("{} contains a NUL byte", dir.display()))
        })?;
        let fd = check(
            unsafe {
                libc::syscall(
                    libc::SYS_open_tree,
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
                )
            },
            || format!("detached copy of the mount of {}", dir.display()),
        )?;
        let copy = Detached {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            dir: dir.to_path_buf(),
        };
        // Kernels before 6.15 refuse to clone from a detached mount: find out now.
        clone_tree(&copy.fd, || {
            format!("clone of the detached copy of {}", dir.display())
        })?;
        Ok(copy)
    }

    /// `path`, below the copied directory, opened in the copy; None unless it is
    /// the very file `direct` (the same path opened on the node) holds, under the
    /// same mount flags, so neither a mount the copy lacks (something mounted
    /// below `dir` since) nor a mount made read-only since is bypassed.
    fn open_same(&self, path: &Path, direct: &OwnedFd) -> Option<OwnedFd> {
        use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
        let rel = path.strip_prefix(&self.dir).ok()?;
        if rel.as_os_str().is_empty() {
            return None;
        }
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_XDEV,
            );
        let fd = openat2(&self.fd, rel, how).ok()?;
        let (a, b) = (
            nix::sys::stat::fstat(&fd).ok()?,
            nix::sys::stat::fstat(direct).ok()?,
        );
        let same_file = a.st_dev == b.st_dev && a.st_ino == b.st_ino;
        let flags = |f: &OwnedFd| nix::sys::statvfs::fstatvfs(f).ok().map(|v| v.flags());
        (same_file && flags(&fd)? == flags(direct)?).then_some(fd)
    }
}

/// Bind-mounts `source` onto `target` (an existing directory, or a file for a block
/// device), with `flags` applied before the mount becomes visible.
pub fn bind(source: &Path, target: &Path, flags: &Flags) -> Result<()> {
    bind_via(None, source, target, flags)
}

/// [`bind`], cloned from `via` where `source` lies below it.
pub fn bind_via(via: Option<&Detached>, source: &Path, target: &Path, flags: &Flags) -> Result<()> {
    if !flags.fs_options.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "mount flags {:?} are filesystem options and cannot apply to a bind mount",
            flags.fs_options
        )));
    }
    let direct = open_nofollow(source)?;
    let src = match via.and_then(|d| d.open_same(source, &direct)) {
        Some(copy) => copy,
        None => direct,
    };
    let dst = open_nofollow(target)?;
    let empty = c"";
    let tree = clone_tree(&src, || format!("clone mount of {}", source.display()))?;
    if flags.attr_set != 0 || flags.attr_clr != 0 {
        let attr = MountAttr {
            attr_set: flags.attr_set,
            attr_clr: flags.attr_clr,
            propagation: 0,
            userns_fd: 0,
        };
        check(
            unsafe {
                libc::syscall(
                    libc::SYS_mount_setattr,
                    tree.as_raw_fd(),
                    empty.as_ptr(),
                    libc::AT_EMPTY_PATH as libc::c_uint,
                    &attr as *const MountAttr,
                    std::mem::size_of::<MountAttr>(),
                )
            },
            || format!("set mount attributes for {}", target.display()),
        )?;
    }
    attach(&tree, &dst, || {
        format!("mount {} at {}", source.display(), target.display())
    })
}

/// A detached bind mount of what `src` (an O_PATH handle) is.
fn clone_tree(src: &OwnedFd, what: impl FnOnce() -> String) -> Result<OwnedFd> {
    let empty = c"";
    let tree = check(
        unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                src.as_raw_fd(),
                empty.as_ptr(),
                (OPEN_TREE_CLONE
                    | libc::O_CLOEXEC as libc::c_uint
                    | libc::AT_EMPTY_PATH as libc::c_uint) as libc::c_uint,
            )
        },
        what,
    )?;
    Ok(unsafe { OwnedFd::from_raw_fd(tree as i32) })
}

/// Makes the detached mount `mnt` (from open_tree or fsmount) visible on `dst`, an
/// O_PATH handle of the target opened without following symlinks.
pub(crate) fn attach(mnt: &OwnedFd, dst: &OwnedFd, what: impl FnOnce() -> String) -> Result<()> {
    let empty = c"";
    check(
        unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                mnt.as_raw_fd(),
                empty.as_ptr(),
                dst.as_raw_fd(),
                empty.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
            )
        },
        what,
    )?;
    Ok(())
}

/// Unmounts whatever is mounted at `target` (topmost only); not mounted is fine.
/// A busy mount is reported, never detached lazily under a user.
pub fn unmount(target: &Path) -> Result<()> {
    match umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(Error::io(format!("unmount {}", target.display()), e)),
    }
}

/// Whether `path` is the root of a mount, asked of the path itself (statx) rather
/// than of the whole mount table; None where the kernel cannot say (before 5.8).
pub fn is_mount_root(path: &Path) -> Option<bool> {
    const STATX_ATTR_MOUNT_ROOT: u64 = 0x2000;
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
            0,
            &mut stx,
        )
    };
    if r != 0 {
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => Some(false),
            _ => None,
        };
    }
    if stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT == 0 {
        return None;
    }
    Some(stx.stx_attributes & STATX_ATTR_MOUNT_ROOT != 0)
}

/// Filesystem usage of the filesystem holding `path`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub used_inodes: u64,
    pub available_inodes: u64,
}

pub fn usage(path: &Path) -> Result<Usage> {
    let s = nix::sys::statvfs::statvfs(path).ctx(|| format!("statvfs {}", path.display()))?;
    let frsize = s.fragment_size() as u64;
    let total = s.blocks() as u64 * frsize;
    let free = s.blocks_free() as u64 * frsize;
    Ok(Usage {
        total_bytes: total,
        used_bytes: total.saturating_sub(free),
        available_bytes: s.blocks_available() as u64 * frsize,
        total_inodes: s.files() as u64,
        used_inodes: (s.files() as u64).saturating_sub(s.files_free() as u64),
        available_inodes: s.files_available() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unmounts every mount stacked at `target` (the driver unmounts only what it
    /// shows to be a volume's: `Driver::unmount_volume_at`).
    fn unmount_all(target: &Path) -> Result<()> {
        for _ in 0..16 {
            let mounted = match is_mount_root(target) {
                Some(m) => m,
                None => mount_at(target)?.is_some(),
            };
            if !mounted {
                return Ok(());
            }
            unmount(target)?;
        }
        Err(Error::Internal(format!(
            "{} stays mounted after 16 unmounts",
            target.display()
        )))
    }

    const SAMPLE: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 253:0 /var/lib/localvol/volumes/vol-1 /var/lib/kubelet/a\\040b rw,nosuid - ext4 /dev/vda rw
41 22 7:3 / /mnt/staged ro,relatime - xfs /dev/loop3 rw,attr2
";

    #[test]
    fn resolve_agrees_with_realpath() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        fs::create_dir_all(base.join("a/b c/d")).unwrap();
        std::os::unix::fs::symlink(base.join("a/b c"), base.join("link")).unwrap();
        std::os::unix::fs::symlink("..", base.join("a/b c/up")).unwrap();
        for p in ["a/b c/d", "link/d", "link/up/b c/./d/..", "a"] {
            let p = base.join(p);
            assert_eq!(resolve(&p).unwrap(), fs::canonicalize(&p).unwrap(), "{p:?}");
        }
        assert!(resolve(&base.join("nothing")).is_err());
    }

    #[test]
    fn parses_and_unescapes() {
        let t = parse_mountinfo(SAMPLE);
        assert_eq!(t.len(), 3);
        assert_eq!(t[1].mount_point, PathBuf::from("/var/lib/kubelet/a b"));
        assert_eq!(t[1].root, PathBuf::from("/var/lib/localvol/volumes/vol-1"));
        assert_eq!(t[2].dev, (7, 3));
        assert!(t[2].is_readonly() && !t[1].is_readonly());
        assert_eq!(t[2].fs_type, "xfs");
        let key = t[1].key();
        assert_eq!(mounts_of(&t, &key).count(), 1);
    }

    #[test]
    fn flags_sort_into_attributes_and_options() {
        let f = Flags::parse(&["ro,noexec".into(), "noatime".into(), "discard".into()]).unwrap();
        assert!(f.is_readonly());
        assert_eq!(f.attr_set & MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOEXEC);
        assert_eq!(f.attr_set & MOUNT_ATTR__ATIME, MOUNT_ATTR_NOATIME);
        assert_eq!(f.fs_options, vec!["discard".to_string()]);
        assert!(!Flags::parse(&[]).unwrap().is_readonly());
    }

    #[test]
    fn flags_agree_only_on_what_they_name() {
        let f = |s: &str| Flags::parse(&[s.to_string()]).unwrap();
        assert!(f("").agree_with("rw,nosuid,nodev,noexec,relatime"));
        assert!(f("noexec,nosuid").agree_with("rw,nosuid,noexec,relatime"));
        assert!(!f("noexec").agree_with("rw,relatime"));
        assert!(!f("exec").agree_with("rw,noexec,relatime"));
        assert!(f("noatime").agree_with("ro,noatime"));
        assert!(!f("noatime").agree_with("rw,relatime"));
        assert!(f("relatime").agree_with("rw,relatime"));
        assert!(!f("strictatime").agree_with("rw,relatime"));
        assert!(f("strictatime").agree_with("rw"));
        assert!(
            f("discard").agree_with("rw,relatime"),
            "filesystem options are not per-mount"
        );
    }

    #[test]
    fn hostile_text_does_not_panic() {
        // Found by tests/fuzz_validation.rs: a byte cut inside a character, and
        // an octal escape above \377.
        assert!(Flags::parse(&["aé".repeat(200)]).is_err());
        let t = parse_mountinfo("1 2 7:3 / /a\\777b rw - xfs /dev/loop3 rw\n");
        assert_eq!(t[0].mount_point, PathBuf::from("/a\\777b"));
    }

    fn is_root() -> bool {
        nix::unistd::Uid::effective().is_root()
    }

    /// The per-path answers (statmount) agree with the mount table for every
    /// mount a path can still reach.
    #[test]
    fn statmount_agrees_with_mountinfo() {
        if !is_root() {
            return;
        }
        let table = mounts().unwrap();
        let temp = fs::canonicalize(std::env::temp_dir()).unwrap();
        let mut compared = 0;
        for (i, line) in table.iter().enumerate() {
            let mp = &line.mount_point;
            // Shadowed: mounted over later, at this point or above it.
            if table[i + 1..]
                .iter()
                .any(|m| mp.starts_with(&m.mount_point))
            {
                continue;
            }
            if fs::canonicalize(mp).ok().as_ref() != Some(mp) {
                continue; // not reachable by this name
            }
            // The tests beside this one mount, unmount and remount read-only
            // in their temporary directories while this one reads.
            if mp.starts_with(&temp) {
                continue;
            }
            let Some(fast) = statmount::mount_at(mp) else {
                panic!("statmount cannot answer for {}", mp.display());
            };
            let fast = fast.unwrap_or_else(|| panic!("{} is not a mount root", mp.display()));
            assert_eq!(fast.mount_point, *mp);
            assert_eq!(fast.dev, line.dev, "dev of {}", mp.display());
            assert_eq!(fast.root, line.root, "root of {}", mp.display());
            assert_eq!(
                fast.is_readonly(),
                line.is_readonly(),
                "ro of {}",
                mp.display()
            );
            assert_eq!(fast.fs_type, line.fs_type, "type of {}", mp.display());
            compared += 1;
        }
        assert!(compared > 0);
    }

    /// Unmounts what a test mounted, also when it fails.
    struct Unmount(Vec<PathBuf>);
    impl Drop for Unmount {
        fn drop(&mut self) {
            for p in self.0.iter().rev() {
                // A test beside this one that reads every mount on the machine
                // (statmount_agrees_with_mountinfo) may hold one of ours for a
                // moment: then detach it lazily rather than leave it mounted.
                if unmount_all(p).is_err() {
                    while is_mount_root(p) == Some(true) && umount2(p, MntFlags::MNT_DETACH).is_ok()
                    {
                    }
                }
            }
        }
    }

    /// A temporary `data` tree (with `dirs` inside) and empty mount targets named
    /// `targets` beside it, unmounted by the returned guard.
    fn bind_scene(
        dirs: &[&str],
        targets: &[impl AsRef<str>],
    ) -> (tempfile::TempDir, PathBuf, PathBuf, Vec<PathBuf>, Unmount) {
        let dir = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(dir.path()).unwrap();
        let data = base.join("data");
        for d in dirs {
            fs::create_dir_all(data.join(d)).unwrap();
        }
        let targets: Vec<PathBuf> = targets.iter().map(|n| base.join(n.as_ref())).collect();
        for t in &targets {
            fs::create_dir(t).unwrap();
        }
        let guard = Unmount(targets.clone());
        (dir, base, data, targets, guard)
    }

    #[test]
    fn binds_read_the_same_both_ways() {
        if !is_root() {
            return;
        }
        let (_dir, base, data, targets, guard) =
            bind_scene(&["sub/deeper"], &["rw", "ro", "sub", "stacked"]);
        let ro = Flags::default().readonly(true);
        bind(&data, &targets[0], &Flags::default()).unwrap();
        bind(&data, &targets[1], &ro).unwrap();
        bind(&data.join("sub"), &targets[2], &Flags::default()).unwrap();
        bind(&data, &targets[3], &Flags::default()).unwrap();
        bind(&data.join("sub"), &targets[3], &ro).unwrap();

        let table = mounts().unwrap();
        for t in &targets {
            let fast = mount_at(t).unwrap().expect("mounted");
            let scan = mount_at_in(&table, t).expect("mounted");
            assert_eq!(fast.mount_point, scan.mount_point);
            assert_eq!(fast.key(), scan.key(), "{}", t.display());
            assert_eq!(fast.is_readonly(), scan.is_readonly(), "{}", t.display());
            assert_eq!(fast.fs_type, scan.fs_type);
            assert_eq!(fast.source, scan.source);
            assert_eq!(key_of(t).unwrap(), key_of_in(&table, t).unwrap());
            let inner = t.join("deeper");
            if inner.exists() {
                assert_eq!(key_of(&inner).unwrap(), key_of_in(&table, &inner).unwrap());
            }
        }
        let sub = mount_at(&targets[2]).unwrap().unwrap();
        assert_ne!(sub.root, Path::new("/"));
        assert_eq!(sub.key(), key_of(&data.join("sub")).unwrap());
        assert_eq!(
            mount_at(&targets[0]).unwrap().unwrap().key(),
            key_of(&data).unwrap()
        );
        assert!(mount_at(&targets[1]).unwrap().unwrap().is_readonly());
        assert!(!mount_at(&targets[0]).unwrap().unwrap().is_readonly());
        // The top of the stack answers.
        let top = mount_at(&targets[3]).unwrap().unwrap();
        assert!(top.is_readonly() && top.root.ends_with("sub"));
        // Not a mount, and not there at all.
        assert_eq!(mount_at(&data).unwrap(), mount_at_in(&table, &data));
        assert_eq!(mount_at(&base.join("missing")).unwrap(), None);
        drop(guard);
        assert_eq!(mount_at(&targets[0]).unwrap(), None);
    }

    /// (mount point, dev, root, read-only): what the callers of mounts_showing use.
    fn summary<'a>(
        ms: impl IntoIterator<Item = &'a MountEntry>,
    ) -> Vec<(PathBuf, (u32, u32), PathBuf, bool)> {
        let mut v: Vec<_> = ms
            .into_iter()
            .map(|m| {
                (
                    m.mount_point.clone(),
                    m.dev,
                    m.root.clone(),
                    m.is_readonly(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// listmount names the mounts mountinfo lists. Other processes mount and
    /// unmount meanwhile, so a few readings may differ before two agree.
    #[test]
    fn listmount_lists_what_mountinfo_lists() {
        if !is_root() {
            return;
        }
        for _ in 0..20 {
            let ids = statmount::list_ids().expect("listmount answers");
            let points: Vec<PathBuf> = ids
                .iter()
                .filter_map(|&id| statmount::describe(id))
                .map(|m| m.mount_point)
                .collect();
            let table = mounts().unwrap();
            let mut a = points.clone();
            a.sort();
            let mut b: Vec<PathBuf> = table.iter().map(|m| m.mount_point.clone()).collect();
            b.sort();
            if ids.len() == table.len() && a == b {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("listmount and mountinfo never agreed");
    }

    #[test]
    fn mounts_showing_matches_the_scan() {
        if !is_root() {
            return;
        }
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let (_dir, _base, data, targets, guard) =
            bind_scene(&["sub", "unmounted"], &["rw", "ro", "sub", "rw2"]);
        bind(&data, &targets[0], &Flags::default()).unwrap();
        bind(&data, &targets[1], &Flags::default().readonly(true)).unwrap();
        bind(&data.join("sub"), &targets[2], &Flags::default()).unwrap();
        bind(&data, &targets[3], &Flags::default()).unwrap();

        let keys = [
            key_of(&data).unwrap(),
            key_of(&data.join("sub")).unwrap(),
            key_of(&data.join("unmounted")).unwrap(),
        ];
        let table = mounts().unwrap();
        for key in &keys {
            let fast =
                statmount::mounts_showing(std::slice::from_ref(key)).expect("listmount answers");
            let scan: Vec<_> = mounts_of(&table, key).collect();
            assert_eq!(summary(&fast), summary(scan), "{key:?}");
            assert_eq!(
                summary(&mounts_showing(std::slice::from_ref(key)).unwrap()),
                summary(&fast)
            );
        }
        // Remembered mounts and first sight give the same answer.
        statmount::forget();
        let cold = statmount::mounts_showing(&keys).unwrap();
        let all = statmount::mounts_showing(&keys).unwrap();
        assert_eq!(summary(&cold), summary(&all));
        assert_eq!(all.len(), 4);
        assert_eq!(summary(&all).iter().filter(|m| m.3).count(), 1);
        assert!(mounts_showing(&keys[2..]).unwrap().is_empty());
        assert!(mounts_showing(&[]).unwrap().is_empty());
        drop(guard);
        assert!(mounts_showing(&keys).unwrap().is_empty());
    }

    /// A bind cloned from a detached copy shows the same data as one cloned from
    /// the node's mount, and a mount made below the copied directory since (which
    /// the copy lacks) is never bypassed.
    /// A detached copy of the mount of `dir`; None (test skipped) on kernels that
    /// cannot clone from one.
    fn copy_of(dir: &Path) -> Option<Detached> {
        Detached::of(dir)
            .map_err(|e| eprintln!("skipped: this kernel cannot clone from a detached mount ({e})"))
            .ok()
    }

    fn bind_from(copy: &Detached, source: &Path, target: &Path) {
        bind_via(Some(copy), source, target, &Flags::default()).unwrap();
    }

    #[test]
    fn binds_via_a_detached_copy_show_what_the_node_shows() {
        if !is_root() {
            return;
        }
        let (_dir, base, data, targets, guard) =
            bind_scene(&["plain", "covered"], &["via", "covered-via", "cover"]);
        let Some(copy) = copy_of(&data) else {
            return;
        };
        fs::write(data.join("plain/file"), b"plain").unwrap();
        bind_from(&copy, &data.join("plain"), &targets[0]);
        assert_eq!(fs::read(targets[0].join("file")).unwrap(), b"plain");
        assert_eq!(
            mount_at(&targets[0]).unwrap().unwrap().key(),
            key_of(&data.join("plain")).unwrap()
        );
        // Covered on the node after the copy was made: the bind shows the cover.
        fs::create_dir(base.join("cover-src")).unwrap();
        fs::write(base.join("cover-src/file"), b"cover").unwrap();
        bind(
            &base.join("cover-src"),
            &data.join("covered"),
            &Flags::default(),
        )
        .unwrap();
        let mut guard = guard;
        guard.0.insert(0, data.join("covered"));
        bind_from(&copy, &data.join("covered"), &targets[1]);
        assert_eq!(fs::read(targets[1].join("file")).unwrap(), b"cover");
        // Outside the copied directory, the node's own mount is cloned.
        bind_from(&copy, &base.join("cover-src"), &targets[2]);
        assert_eq!(fs::read(targets[2].join("file")).unwrap(), b"cover");
        drop(guard);
    }

    /// A mount made read-only after the copy was taken: binds are read-only too.
    #[test]
    fn binds_via_a_detached_copy_keep_later_mount_flags() {
        if !is_root() {
            return;
        }
        let (_dir, _base, data, targets, mut guard) = bind_scene(&["plain"], &["before", "after"]);
        // The data gets a mount of its own, to change its flags.
        bind(&data, &data, &Flags::default()).unwrap();
        guard.0.insert(0, data.clone());
        let Some(copy) = copy_of(&data) else {
            return;
        };
        bind_from(&copy, &data.join("plain"), &targets[0]);
        assert!(!mount_at(&targets[0]).unwrap().unwrap().is_readonly());
        use nix::mount::MsFlags;
        nix::mount::mount(
            None::<&str>,
            &data,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .unwrap();
        bind_from(&copy, &data.join("plain"), &targets[1]);
        assert!(mount_at(&targets[1]).unwrap().unwrap().is_readonly());
        drop(guard);
    }

    /// The kernel reports each mount and unmount by the mount's unique id, before
    /// the call returns.
    #[test]
    fn mount_changes_are_reported() {
        if !is_root() {
            return;
        }
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let watch = match statmount::watch() {
            Ok(w) => w,
            Err(e) => {
                eprintln!("skipped: no mount notifications on this kernel ({e})");
                return;
            }
        };
        let (_dir, _base, data, targets, guard) = bind_scene(&["sub"], &["t"]);
        let mut events = vec![];
        watch.drain(|e| events.push(e)).unwrap();
        bind(&data, &targets[0], &Flags::default()).unwrap();
        let id = statmount::id_at(&targets[0]);
        let ours = |events: &mut Vec<events::Event>| {
            events.clear();
            watch.drain(|e| events.push(e)).unwrap();
            events.retain(|e| matches!(e, events::Event::Attached(i) | events::Event::Detached(i) if *i == id));
            events.clone()
        };
        assert_eq!(ours(&mut events), [events::Event::Attached(id)]);
        unmount(&targets[0]).unwrap();
        assert_eq!(ours(&mut events), [events::Event::Detached(id)]);
        drop(guard);
    }

    /// How many mounts the index finds showing `key`.
    fn showing(key: &MountKey) -> usize {
        statmount::mounts_showing(std::slice::from_ref(key))
            .unwrap()
            .len()
    }

    fn bind_each(source: &Path, targets: &[PathBuf]) {
        for t in targets {
            bind(source, t, &Flags::default()).unwrap();
        }
    }

    /// More reports than one read takes (about a hundred) are all taken in.
    #[test]
    fn many_reports_between_two_questions() {
        if !is_root() {
            return;
        }
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let names: Vec<String> = (0..300).map(|i| format!("t{i}")).collect();
        let (_dir, _base, data, targets, guard) = bind_scene(&["sub"], &names);
        let key = key_of(&data).unwrap();
        let count = || showing(&key);
        assert_eq!(count(), 0);
        bind_each(&data, &targets);
        assert_eq!(count(), targets.len());
        drop(guard);
        assert_eq!(count(), 0);
    }

    /// Held by the tests that read mount reports or use the shared index: one
    /// never starts a watch while another has made the kernel's queue tiny, and
    /// none resets or drains the index while another counts its listings.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A real queue overflow: with the kernel's queue made tiny for a moment
    /// (the limit is read when a watch starts), thirty binds overflow it, the
    /// kernel says so, and the index lists again and answers right.
    #[test]
    fn a_real_queue_overflow_is_recovered_from() {
        if !is_root() {
            return;
        }
        const LIMIT: &str = "/proc/sys/fs/fanotify/max_queued_events";
        struct Restore(String);
        impl Drop for Restore {
            fn drop(&mut self) {
                let _ = fs::write(LIMIT, &self.0);
            }
        }
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(old) = fs::read_to_string(LIMIT) else {
            eprintln!("skipped: no {LIMIT}");
            return;
        };
        let names: Vec<String> = (0..30).map(|i| format!("t{i}")).collect();
        let (_dir, _base, data, targets, guard) = bind_scene(&["sub"], &names);
        let key = key_of(&data).unwrap();
        let count = || showing(&key);
        let (watch, reported) = {
            let restore = Restore(old);
            if fs::write(LIMIT, "8").is_err() {
                eprintln!("skipped: {LIMIT} is not writable");
                return;
            }
            let watch = statmount::watch();
            statmount::renew();
            drop(restore);
            (watch, statmount::reported())
        };
        assert_eq!(count(), 0);
        let Ok(watch) = watch else {
            eprintln!("skipped: no mount notifications on this kernel");
            return;
        };
        assert!(reported);
        let listed = statmount::listings();
        bind_each(&data, &targets);
        let mut events = vec![];
        watch.drain(|e| events.push(e)).unwrap();
        assert!(events.contains(&events::Event::Overflow), "{events:?}");
        assert_eq!(count(), targets.len());
        // The index learned of the loss from the kernel and listed again.
        assert!(statmount::listings() > listed);
        drop(guard);
        assert_eq!(count(), 0);
    }

    /// The index follows reports, recovers from reports lost (a queue overflow)
    /// by listing again, and answers by listing where there are no reports.
    #[test]
    fn mounts_showing_survives_lost_reports() {
        if !is_root() {
            return;
        }
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let (_dir, _base, data, targets, guard) = bind_scene(&["sub"], &["a", "b", "c"]);
        let key = key_of(&data).unwrap();
        let points = || -> Vec<PathBuf> {
            let mut v: Vec<_> = statmount::mounts_showing(std::slice::from_ref(&key))
                .expect("the kernel answers")
                .into_iter()
                .map(|m| m.mount_point)
                .collect();
            v.sort();
            v
        };
        assert!(points().is_empty());
        bind(&data, &targets[0], &Flags::default()).unwrap();
        assert_eq!(points(), targets[..1]);
        bind(&data, &targets[1], &Flags::default()).unwrap();
        statmount::lose_reports();
        assert_eq!(points(), targets[..2]);
        unmount(&targets[0]).unwrap();
        statmount::lose_reports();
        assert_eq!(points(), targets[1..2]);
        if statmount::reported() {
            statmount::stop_reports();
        }
        bind(&data, &targets[2], &Flags::default()).unwrap();
        assert_eq!(points(), targets[1..3]);
        drop(guard);
        assert!(points().is_empty());
        // The next question starts a fresh index, with reports where there are.
        statmount::forget();
        assert!(points().is_empty());
    }

    /// Not a test: prints what "which mounts show this data" costs by a scan of
    /// mountinfo and through the index, with 20 and 2000 extra bind mounts
    /// (`cargo test --release --lib mounts_showing_cost -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn mounts_showing_cost() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let base = Path::new("/tmp/sf-binds");
        let _ = fs::create_dir(base);
        let src = base.join("src");
        let one = base.join("one");
        let one_at = base.join("one-at");
        for d in [&src, &one, &one_at] {
            fs::create_dir_all(d).unwrap();
        }
        let mut guard = Unmount(vec![one_at.clone()]);
        bind(&one, &one_at, &Flags::default()).unwrap();
        let key = key_of(&one).unwrap();
        let time = |f: &dyn Fn() -> usize| {
            let mut v: Vec<u128> = (0..50)
                .map(|_| {
                    let t = std::time::Instant::now();
                    assert_eq!(f(), 1);
                    t.elapsed().as_micros()
                })
                .collect();
            v.sort();
            v[v.len() / 2]
        };
        for n in [20, 2000] {
            while guard.0.len() <= n {
                let t = base.join(format!("b{}", guard.0.len()));
                fs::create_dir_all(&t).unwrap();
                guard.0.push(t.clone());
                bind(&src, &t, &Flags::default()).unwrap();
            }
            let lines = mounts().unwrap().len();
            let ids = statmount::list_ids().unwrap().len();
            let scan = time(&|| mounts_of(&mounts().unwrap(), &key).count());
            let fast = time(&|| mounts_showing(std::slice::from_ref(&key)).unwrap().len());
            statmount::forget();
            let t = std::time::Instant::now();
            assert_eq!(mounts_showing(std::slice::from_ref(&key)).unwrap().len(), 1);
            let first = t.elapsed().as_micros();
            println!("{n} binds: {lines} mountinfo lines, {ids} listmount ids; scan p50 {scan} us, indexed p50 {fast} us (first call, listing every mount: {first} us)");
        }
        drop(guard);
        let _ = fs::remove_dir_all(base);
    }
}
