//! Read-only facts about a root for operators: space used by volume data and loop
//! devices backed by it. Shared by the metrics endpoint and the `status` command;
//! nothing here writes or takes a volume lock.

use std::collections::HashSet;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::params::VolumeType;

/// Lower-case name of a volume type, as in StorageClass parameters and records.
pub fn type_name(t: VolumeType) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{t:?}").to_lowercase())
}

/// How many filesystem entries a usage walk may still visit. Walking a directory
/// tree costs one stat per file, so callers bound the total work.
#[derive(Debug, Clone, Copy)]
pub struct Budget(pub u64);

/// Bytes allocated on the root for one volume's data, and whether the count is
/// complete (false: the budget ran out, the figure is a lower bound).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    pub bytes: u64,
    pub complete: bool,
}

/// Allocated bytes (st_blocks, like `du`) of a volume's data: for a loop volume the
/// backing file, i.e. what it costs the root, not what its filesystem reports used;
/// for a directory volume the tree below it, on the same filesystem only, hard
/// links counted once. None when the data is missing.
///
/// The tree is a pod's: each directory is opened relative to its parent, never
/// through a symlink, so one swapped in during the walk cannot lead it out.
pub fn used_bytes(data: &Path, t: VolumeType, budget: &mut Budget) -> Option<Used> {
    use nix::dir::{Dir, Type};
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::{fstatat, Mode};

    let meta = fs::symlink_metadata(data).ok()?;
    let mut used = Used {
        bytes: meta.blocks() * 512,
        complete: true,
    };
    if t != VolumeType::Dir || !meta.is_dir() {
        budget.0 = budget.0.saturating_sub(1);
        return Some(used);
    }
    let dev = meta.dev();
    let mut seen = HashSet::new();
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let Ok(top) = Dir::open(data, flags, Mode::empty()) else {
        return Some(used);
    };
    // One open directory per level of depth, not per directory waiting.
    let mut stack = vec![top.into_iter()];
    while let Some(dir) = stack.last_mut() {
        let Some(entry) = dir.next() else {
            stack.pop();
            continue;
        };
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        if budget.0 == 0 {
            used.complete = false;
            return Some(used);
        }
        budget.0 -= 1;
        // SAFETY: the directory stays open (in `stack`) while the fd is used.
        let dir_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(dir.as_raw_fd()) };
        let Ok(st) = fstatat(dir_fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        if st.st_dev != dev {
            continue;
        }
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if st.st_nlink > 1 && !is_dir && !seen.insert(st.st_ino) {
            continue;
        }
        used.bytes += st.st_blocks as u64 * 512;
        if is_dir || entry.file_type() == Some(Type::Directory) {
            if let Ok(child) = Dir::openat(dir_fd, name, flags, Mode::empty()) {
                stack.push(child.into_iter());
            }
        }
    }
    Some(used)
}

/// A loop device as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `loop3`
    pub name: String,
    /// (major, minor)
    pub dev: (u32, u32),
    pub backing_file: PathBuf,
}

/// Every attached loop device (those with a backing file).
pub fn loop_devices() -> Vec<LoopDevice> {
    let mut out = vec![];
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let dev = fs::read_to_string(e.path().join("dev"))
            .ok()
            .and_then(|s| {
                let (a, b) = s.trim().split_once(':')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .unwrap_or((0, 0));
        out.push(LoopDevice {
            name,
            dev,
            backing_file: PathBuf::from(backing.trim_end().trim_end_matches(" (deleted)")),
        });
    }
    out
}

/// Loop devices whose backing file lies under `root`.
pub fn loop_devices_under(root: &Path) -> Vec<LoopDevice> {
    let root = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    loop_devices()
        .into_iter()
        .filter(|l| l.backing_file.starts_with(&root))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn du_counts_files_once_and_stops_at_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("v");
        fs::create_dir_all(data.join("a/b")).unwrap();
        fs::write(data.join("a/b/f"), vec![1u8; 64 * 1024]).unwrap();
        fs::hard_link(data.join("a/b/f"), data.join("a/g")).unwrap();
        let full = used_bytes(&data, VolumeType::Dir, &mut Budget(1000)).unwrap();
        assert!(full.complete);
        assert!(
            full.bytes >= 64 * 1024 && full.bytes < 2 * 64 * 1024,
            "{full:?}"
        );
        let partial = used_bytes(&data, VolumeType::Dir, &mut Budget(1)).unwrap();
        assert!(!partial.complete);
        assert!(used_bytes(&dir.path().join("none"), VolumeType::Dir, &mut Budget(9)).is_none());
        assert_eq!(type_name(VolumeType::Loop), "loop");
    }

    /// A symlink to a directory outside (a pod's, or one swapped in) is counted
    /// as a link, never walked.
    #[test]
    fn du_never_follows_a_symlink_out() {
        let dir = tempfile::tempdir().unwrap();
        let (data, outside) = (dir.path().join("v"), dir.path().join("host"));
        fs::create_dir_all(data.join("a")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("big"), vec![1u8; 1 << 20]).unwrap();
        std::os::unix::fs::symlink(&outside, data.join("a/link")).unwrap();
        let used = used_bytes(&data, VolumeType::Dir, &mut Budget(1000)).unwrap();
        assert!(used.complete);
        assert!(used.bytes < 1 << 20, "{used:?}");
    }
}
