//! Per-mount questions asked of the kernel directly: statx names the mount that
//! holds a path, statmount(2) (Linux 6.8) describes that one mount. Each answer
//! costs the same whether the node has ten mounts or ten thousand, where reading
//! /proc/self/mountinfo costs a line per mount.
//!
//! "Which mounts show this data" is answered from an index of every mount's
//! device and root, kept by the kernel's reports of each mount and unmount
//! (events.rs, Linux 6.15), so it costs the mounts changed since the last
//! question. Where there are no reports, listmount(2) (also 6.8) names every
//! mount by id on each question and statmount is asked only about mounts not
//! seen before, instead of formatting and parsing a text line per mount.
//!
//! Every function returns None where the kernel cannot answer (too old, or the
//! mount went away between the two calls); the caller then reads the mount table.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::events::{Event, Watch};
use super::{MountEntry, MountKey};

/// statmount(2) and listmount(2): the same numbers on every architecture but alpha.
const SYS_STATMOUNT: libc::c_long = 457;
const SYS_LISTMOUNT: libc::c_long = 458;
/// listmount's "every mount below this process's root".
const LSMT_ROOT: u64 = u64::MAX;
const MNT_ID_REQ_SIZE_VER0: u32 = 24;

const STATX_MNT_ID_UNIQUE: u32 = 0x4000;
const STATX_ATTR_MOUNT_ROOT: u64 = 0x2000;

const STATMOUNT_SB_BASIC: u64 = 0x1;
const STATMOUNT_MNT_BASIC: u64 = 0x2;
const STATMOUNT_MNT_ROOT: u64 = 0x8;
const STATMOUNT_MNT_POINT: u64 = 0x10;
const STATMOUNT_FS_TYPE: u64 = 0x20;
/// Both since 6.13; older kernels refuse the mask, so they are asked for once.
const STATMOUNT_FS_SUBTYPE: u64 = 0x100;
const STATMOUNT_SB_SOURCE: u64 = 0x200;

const BASE_MASK: u64 = STATMOUNT_SB_BASIC
    | STATMOUNT_MNT_BASIC
    | STATMOUNT_MNT_ROOT
    | STATMOUNT_MNT_POINT
    | STATMOUNT_FS_TYPE;
const FULL_MASK: u64 = BASE_MASK | STATMOUNT_FS_SUBTYPE | STATMOUNT_SB_SOURCE;

const SB_RDONLY: u32 = 0x1;

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR__ATIME: u64 = 0x70;
const MOUNT_ATTR_RELATIME: u64 = 0x0;
const MOUNT_ATTR_NOATIME: u64 = 0x10;
const MOUNT_ATTR_NODIRATIME: u64 = 0x80;
const MOUNT_ATTR_NOSYMFOLLOW: u64 = 0x20_0000;

/// What the kernel accepts; narrowed once on a kernel that refuses the full mask.
static MASK: AtomicU64 = AtomicU64::new(FULL_MASK);
/// Cleared for good once statx or statmount turns out to be missing.
static AVAILABLE: AtomicBool = AtomicBool::new(true);
/// Cleared for good once listmount turns out to be missing or refuses.
static LIST_AVAILABLE: AtomicBool = AtomicBool::new(true);

#[repr(C)]
struct MntIdReq {
    size: u32,
    spare: u32,
    mnt_id: u64,
    param: u64,
}

/// The fixed part of `struct statmount` (include/uapi/linux/mount.h); the strings
/// follow it in the same buffer, at offsets relative to its end.
#[repr(C)]
#[allow(dead_code)] // spelled out to keep the kernel's layout; not all are read
struct StatMount {
    size: u32,
    mnt_opts: u32,
    mask: u64,
    sb_dev_major: u32,
    sb_dev_minor: u32,
    sb_magic: u64,
    sb_flags: u32,
    fs_type: u32,
    mnt_id: u64,
    mnt_parent_id: u64,
    mnt_id_old: u32,
    mnt_parent_id_old: u32,
    mnt_attr: u64,
    mnt_propagation: u64,
    mnt_peer_group: u64,
    mnt_master: u64,
    propagate_from: u64,
    mnt_root: u32,
    mnt_point: u32,
    mnt_ns_id: u64,
    fs_subtype: u32,
    sb_source: u32,
    spare: [u32; 4],
    spare2: [u64; 46],
}

/// The unique id of the mount that holds `path` and whether `path` is its root.
fn holder(path: &Path, follow: bool) -> Option<io::Result<(u64, bool)>> {
    if !AVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let flags = libc::AT_NO_AUTOMOUNT | if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            flags,
            STATX_MNT_ID_UNIQUE,
            &mut stx,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSYS) {
            AVAILABLE.store(false, Ordering::Relaxed);
            return None;
        }
        return Some(Err(e));
    }
    if stx.stx_mask & STATX_MNT_ID_UNIQUE == 0
        || stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT == 0
    {
        AVAILABLE.store(false, Ordering::Relaxed);
        return None;
    }
    Some(Ok((
        stx.stx_mnt_id,
        stx.stx_attributes & STATX_ATTR_MOUNT_ROOT != 0,
    )))
}

/// Describes the mount with unique id `id`, as its mountinfo line would.
pub(super) fn describe(id: u64) -> Option<MountEntry> {
    if !AVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    // u64 elements keep the buffer aligned for the struct.
    let mut buf: Vec<u64> = vec![0; 1024];
    loop {
        let mask = MASK.load(Ordering::Relaxed);
        match ask(id, mask, &mut buf) {
            Ok(()) => return parse(&buf, buf.len() * 8),
            Err(libc::EINVAL) if mask != BASE_MASK => MASK.store(BASE_MASK, Ordering::Relaxed),
            Err(libc::ENOSYS) | Err(libc::EINVAL) => {
                AVAILABLE.store(false, Ordering::Relaxed);
                return None;
            }
            // Unmounted since statx named it (ENOENT), or not ours to see.
            Err(_) => return None,
        }
    }
}

fn parse(buf: &[u64], len: usize) -> Option<MountEntry> {
    let head = std::mem::size_of::<StatMount>();
    // SAFETY: the buffer is larger than the struct, aligned to 8, and every bit
    // pattern is a valid StatMount.
    let sm = unsafe { &*(buf.as_ptr() as *const StatMount) };
    let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, len) };
    let strings = bytes.get(head..(sm.size as usize).min(len))?;
    let string = |bit: u64, off: u32| -> Option<&[u8]> {
        if sm.mask & bit == 0 {
            return None;
        }
        let s = strings.get(off as usize..)?;
        Some(&s[..s.iter().position(|&b| b == 0)?])
    };
    let want = STATMOUNT_SB_BASIC | STATMOUNT_MNT_BASIC;
    if sm.mask & want != want {
        return None;
    }
    let path = |b: &[u8]| PathBuf::from(OsStr::from_bytes(b));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut fs_type = text(string(STATMOUNT_FS_TYPE, sm.fs_type)?);
    if let Some(sub) = string(STATMOUNT_FS_SUBTYPE, sm.fs_subtype).filter(|s| !s.is_empty()) {
        fs_type = format!("{fs_type}.{}", text(sub));
    }
    Some(MountEntry {
        dev: (sm.sb_dev_major, sm.sb_dev_minor),
        root: path(string(STATMOUNT_MNT_ROOT, sm.mnt_root)?),
        mount_point: path(string(STATMOUNT_MNT_POINT, sm.mnt_point)?),
        options: options(sm.mnt_attr),
        fs_type,
        source: string(STATMOUNT_SB_SOURCE, sm.sb_source)
            .map(text)
            .unwrap_or_default(),
        super_options: if sm.sb_flags & SB_RDONLY != 0 {
            "ro"
        } else {
            "rw"
        }
        .into(),
    })
}

/// The per-mount options as mountinfo spells them, in its order.
fn options(attr: u64) -> String {
    let mut o = vec![if attr & MOUNT_ATTR_RDONLY != 0 {
        "ro"
    } else {
        "rw"
    }];
    for (bit, name) in [
        (MOUNT_ATTR_NOSUID, "nosuid"),
        (MOUNT_ATTR_NODEV, "nodev"),
        (MOUNT_ATTR_NOEXEC, "noexec"),
    ] {
        if attr & bit != 0 {
            o.push(name);
        }
    }
    if attr & MOUNT_ATTR__ATIME == MOUNT_ATTR_NOATIME {
        o.push("noatime");
    }
    if attr & MOUNT_ATTR_NODIRATIME != 0 {
        o.push("nodiratime");
    }
    if attr & MOUNT_ATTR__ATIME == MOUNT_ATTR_RELATIME {
        o.push("relatime");
    }
    if attr & MOUNT_ATTR_NOSYMFOLLOW != 0 {
        o.push("nosymfollow");
    }
    o.join(",")
}

/// Unique ids of every mount this process's root reaches, in id order (the
/// mounts mountinfo lists); None when listmount cannot answer.
pub(super) fn list_ids() -> Option<Vec<u64>> {
    if !AVAILABLE.load(Ordering::Relaxed) || !LIST_AVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    let mut ids = Vec::new();
    let mut page: Vec<u64> = vec![0; 1024];
    let mut last = 0;
    loop {
        let req = MntIdReq {
            size: MNT_ID_REQ_SIZE_VER0,
            spare: 0,
            mnt_id: LSMT_ROOT,
            // Ids are listed in increasing order: a full page resumes after its last.
            param: last,
        };
        let r = unsafe {
            libc::syscall(
                SYS_LISTMOUNT,
                &req as *const MntIdReq,
                page.as_mut_ptr(),
                page.len(),
                0 as libc::c_uint,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) {
                LIST_AVAILABLE.store(false, Ordering::Relaxed);
            }
            tracing::debug!(error = %e, "listmount failed; reading mountinfo");
            return None;
        }
        let n = (r as usize).min(page.len());
        ids.extend_from_slice(&page[..n]);
        if n < page.len() {
            return Some(ids);
        }
        last = page[n - 1];
    }
}

/// Asks statmount for `mask` only, growing `buf` when the strings do not fit.
/// Err carries the errno: ENOENT when the mount is gone.
fn ask(id: u64, mask: u64, buf: &mut Vec<u64>) -> Result<(), i32> {
    loop {
        let req = MntIdReq {
            size: MNT_ID_REQ_SIZE_VER0,
            spare: 0,
            mnt_id: id,
            param: mask,
        };
        let len = buf.len() * 8;
        let r = unsafe {
            libc::syscall(
                SYS_STATMOUNT,
                &req as *const MntIdReq,
                buf.as_mut_ptr(),
                len,
                0 as libc::c_uint,
            )
        };
        if r == 0 {
            return Ok(());
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EOVERFLOW) if len < 1 << 20 => buf.resize(buf.len() * 4, 0),
            e => return Err(e.unwrap_or(0)),
        }
    }
}

/// The fixed part of the answer in `buf`.
fn head(buf: &[u64]) -> &StatMount {
    assert!(buf.len() * 8 >= std::mem::size_of::<StatMount>());
    // SAFETY: large enough (checked), aligned to 8, any bit pattern is valid.
    unsafe { &*(buf.as_ptr() as *const StatMount) }
}

/// A mount's superblock device and root inside its filesystem: the data it shows.
type Seen = ((u32, u32), Vec<u8>);

/// What is known of one mount namespace's mounts, by unique id and by the data
/// each shows. Ids are never reused within a boot and a mount's superblock and
/// root directory never change, so each mount is asked about once, when the
/// kernel reports it attached (or, without reports, when a listing first names
/// it). Answers are asked afresh before use, so a mount moved or made read-only
/// since is reported as it is now. What this cannot see is a rename of a mount's
/// root directory after it was first seen: for a volume's data directory that
/// leaves the volume without data, and so without a key.
struct Index {
    by_id: HashMap<u64, Seen>,
    /// Ordered, so that the mounts of a directory's subdirectories are one range.
    by_data: BTreeMap<Seen, Vec<u64>>,
    /// The kernel's reports of mount changes; None before Linux 6.15 (or once
    /// reading them failed): then every question lists every mount.
    watch: Option<Watch>,
    /// Whether `by_id` holds every mount: false until the first listing, and
    /// after reports were lost.
    complete: bool,
    /// Listings of every mount so far: with reports, one plus one per loss.
    listings: u64,
}

/// One index per mount namespace (by its inode): a thread in another namespace
/// sees other mounts.
static INDEXES: Mutex<Option<HashMap<u64, Index>>> = Mutex::new(None);

impl Index {
    fn new() -> Index {
        let watch = match Watch::new() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::debug!(error = %e, "no mount notifications; listing every mount per question");
                None
            }
        };
        Index {
            by_id: HashMap::new(),
            by_data: BTreeMap::new(),
            watch,
            complete: false,
            listings: 0,
        }
    }

    /// Brings the index up to date: the reports queued since the last question,
    /// or a listing where there are none to trust. None when the kernel cannot
    /// answer.
    fn catch_up(&mut self) -> Option<()> {
        let mut buf: Vec<u64> = vec![0; std::mem::size_of::<StatMount>() / 8 + 512];
        if let Some(watch) = self.watch.take() {
            let mut failed = false;
            let drained = watch.drain(|event| match event {
                Event::Attached(id) | Event::Moved(id) => {
                    failed |= self.learn(id, &mut buf).is_err();
                }
                Event::Detached(id) => self.forget_one(id),
                Event::Overflow => self.complete = false,
            });
            match drained {
                Ok(()) => self.watch = Some(watch),
                Err(e) => {
                    tracing::warn!(error = %e, "reading mount notifications failed; listing every mount from now on")
                }
            }
            if failed {
                // A report not taken in is lost: the next question lists again.
                self.complete = false;
                return None;
            }
        }
        if self.watch.is_none() || !self.complete {
            self.relist(&mut buf)?;
            self.complete = true;
        }
        Some(())
    }

    /// Makes the index hold exactly the mounts listmount names.
    fn relist(&mut self, buf: &mut Vec<u64>) -> Option<()> {
        let ids = list_ids()?;
        self.listings += 1;
        if self.watch.is_some() && self.listings > 1 {
            tracing::debug!(
                listings = self.listings,
                "mount reports were lost; listed every mount again"
            );
        }
        let gone: Vec<u64> = self
            .by_id
            .keys()
            .filter(|id| ids.binary_search(id).is_err())
            .copied()
            .collect();
        for id in gone {
            self.forget_one(id);
        }
        for id in ids {
            self.learn(id, buf).ok()?;
        }
        Some(())
    }

    /// Asks what mount `id` shows, unless known. A mount already gone is no error.
    fn learn(&mut self, id: u64, buf: &mut Vec<u64>) -> Result<(), i32> {
        if self.by_id.contains_key(&id) {
            return Ok(());
        }
        let want = STATMOUNT_SB_BASIC | STATMOUNT_MNT_ROOT;
        match ask(id, want, buf) {
            Ok(()) => {}
            Err(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
        let sm = head(buf);
        if sm.mask & want != want {
            return Err(libc::EINVAL);
        }
        let strings = &bytes(buf)[std::mem::size_of::<StatMount>()..];
        let root = strings.get(sm.mnt_root as usize..).ok_or(libc::EINVAL)?;
        let root = root[..root.iter().position(|&b| b == 0).ok_or(libc::EINVAL)?].to_vec();
        let seen = ((sm.sb_dev_major, sm.sb_dev_minor), root);
        self.by_data.entry(seen.clone()).or_default().push(id);
        self.by_id.insert(id, seen);
        Ok(())
    }

    fn forget_one(&mut self, id: u64) {
        let Some(seen) = self.by_id.remove(&id) else {
            return;
        };
        if let Some(ids) = self.by_data.get_mut(&seen) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.by_data.remove(&seen);
            }
        }
    }

    /// Ids of the mounts known to show `key`'s directory or one below it.
    fn showing_below(&self, key: &MountKey) -> Vec<u64> {
        let prefix = key.root.as_os_str().as_bytes();
        let mut ids: Vec<u64> = self
            .by_data
            .range((key.dev, prefix.to_vec())..)
            .take_while(|((dev, root), _)| *dev == key.dev && root.starts_with(prefix))
            .filter(|((_, root), _)| is_below(root, prefix))
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Ids of the mounts known to show one of `keys`, in id order.
    fn showing(&self, keys: &[MountKey]) -> Vec<u64> {
        let mut ids: Vec<u64> = keys
            .iter()
            .filter_map(|k| {
                self.by_data
                    .get(&(k.dev, k.root.as_os_str().as_bytes().to_vec()))
            })
            .flatten()
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Runs `f` on the index of the calling thread's mount namespace, made if need
/// be; None when the namespace cannot be named.
fn with_index<T>(f: impl FnOnce(&mut Index) -> T) -> Option<T> {
    let namespace = own_namespace()?;
    let mut indexes = INDEXES.lock().unwrap_or_else(|e| e.into_inner());
    Some(f(indexes
        .get_or_insert_with(HashMap::new)
        .entry(namespace)
        .or_insert_with(Index::new)))
}

/// The inode of the calling thread's mount namespace.
fn own_namespace() -> Option<u64> {
    std::fs::metadata("/proc/thread-self/ns/mnt")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// Every mount that shows the data of one of `keys`, in mount id order. None
/// when the kernel cannot answer for every mount; mounts that vanish while
/// being asked about are left out, as a later reading of mountinfo would.
pub(super) fn mounts_showing(keys: &[MountKey]) -> Option<Vec<MountEntry>> {
    let candidates = indexed(|index| index.showing(keys))?;
    describe_those(candidates, |m| keys.contains(&m.key()))
}

/// Ids `query` picks from this namespace's index, brought up to date first; None
/// where the kernel cannot answer for every mount.
fn indexed(query: impl FnOnce(&Index) -> Vec<u64>) -> Option<Vec<u64>> {
    if !AVAILABLE.load(Ordering::Relaxed) || !LIST_AVAILABLE.load(Ordering::Relaxed) {
        return None;
    }
    with_index(|index| {
        index.catch_up()?;
        Some(query(index))
    })?
}

/// The mounts of `candidates` (ids the index remembers) that `wanted` accepts,
/// asked afresh: the answer is today's, not the remembered one. None when one
/// cannot be answered.
fn describe_those(
    candidates: Vec<u64>,
    wanted: impl Fn(&MountEntry) -> bool,
) -> Option<Vec<MountEntry>> {
    let mut found = Vec::new();
    let mut buf: Vec<u64> = vec![0; std::mem::size_of::<StatMount>() / 8];
    for id in candidates {
        match describe(id) {
            Some(m) if wanted(&m) => found.push(m),
            Some(_) => {}
            // Gone since (the cheap question now fails too), or not answerable.
            None if ask(id, STATMOUNT_SB_BASIC, &mut buf) == Err(libc::ENOENT) => {}
            None => return None,
        }
    }
    Some(found)
}

/// Whether `root` is the directory `dir` or lies below it (bytes of paths).
pub(super) fn is_below(root: &[u8], dir: &[u8]) -> bool {
    root.starts_with(dir)
        && (root.len() == dir.len() || dir.ends_with(b"/") || root[dir.len()] == b'/')
}

/// Every mount that shows `key`'s directory or a directory below it (a bind of
/// a subdirectory, as a pod's subPath is): [`mounts_showing`] for a tree.
pub(super) fn mounts_below(key: &MountKey) -> Option<Vec<MountEntry>> {
    let candidates = indexed(|index| index.showing_below(key))?;
    let dir = key.root.as_os_str().as_bytes();
    describe_those(candidates, |m| {
        m.dev == key.dev && is_below(m.root.as_os_str().as_bytes(), dir)
    })
}

/// Forgets every mount seen, for measuring the first call.
#[cfg(test)]
pub(super) fn forget() {
    *INDEXES.lock().unwrap() = None;
}

/// Starts this namespace's index afresh (its watch too), without listing.
#[cfg(test)]
pub(super) fn renew() {
    forget();
    with_index(|_| ()).unwrap()
}

/// Whether the kernel reports this namespace's mount changes to the index.
#[cfg(test)]
pub(super) fn reported() -> bool {
    with_index(|i| i.watch.is_some()).unwrap()
}

/// Throws the queued reports away and marks the index incomplete, as a
/// queue overflow does.
#[cfg(test)]
pub(super) fn lose_reports() {
    with_index(|i| {
        if let Some(w) = &i.watch {
            w.drain(|_| {}).unwrap();
        }
        i.complete = false;
    })
    .unwrap()
}

/// How many times this namespace's index listed every mount.
#[cfg(test)]
pub(super) fn listings() -> u64 {
    with_index(|i| i.listings).unwrap()
}

/// Stops the reports, as on a kernel without them.
#[cfg(test)]
pub(super) fn stop_reports() {
    with_index(|i| i.watch = None).unwrap()
}

/// A watch of its own, to see the reports as they come.
#[cfg(test)]
pub(super) fn watch() -> std::io::Result<Watch> {
    Watch::new()
}

/// The unique id of the mount at `path`.
#[cfg(test)]
pub(super) fn id_at(path: &Path) -> u64 {
    holder(path, false).unwrap().unwrap().0
}

fn bytes(buf: &[u64]) -> &[u8] {
    // SAFETY: the same memory, read as bytes.
    unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, buf.len() * 8) }
}

/// The topmost mount at exactly `path` (not following a symlink there): Some(None)
/// when nothing is mounted there, None when the kernel cannot say.
pub(super) fn mount_at(path: &Path) -> Option<Option<MountEntry>> {
    match holder(path, false)? {
        Ok((_, false)) => Some(None),
        Ok((id, true)) => describe(id).map(Some),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
            Some(None)
        }
        Err(_) => None,
    }
}

/// The mount holding `path`, a canonical path.
pub(super) fn mount_holding(path: &Path) -> Option<MountEntry> {
    let (id, _) = holder(path, true)?.ok()?;
    describe(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_is_the_directory_or_its_subdirectories() {
        let dir = b"/volumes/vol-1";
        assert!(is_below(b"/volumes/vol-1", dir));
        assert!(is_below(b"/volumes/vol-1/sub", dir));
        assert!(!is_below(b"/volumes/vol-1.img", dir));
        assert!(!is_below(b"/volumes/vol-10", dir));
        assert!(!is_below(b"/volumes", dir));
        assert!(is_below(b"/x", b"/"));
    }

    #[test]
    fn structs_have_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<MntIdReq>(), 24);
        assert_eq!(std::mem::size_of::<StatMount>(), 512);
        assert_eq!(std::mem::offset_of!(StatMount, mnt_attr), 64);
        assert_eq!(std::mem::offset_of!(StatMount, mnt_root), 104);
        assert_eq!(std::mem::offset_of!(StatMount, sb_source), 124);
    }

    #[test]
    fn options_read_like_mountinfo() {
        assert_eq!(options(0), "rw,relatime");
        assert_eq!(
            options(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOATIME),
            "ro,nosuid,noatime"
        );
    }
}
