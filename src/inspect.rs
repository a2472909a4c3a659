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
/// complete (false: the budget ran out, or a part of the tree could not be
/// entered: deeper than `MAX_DEPTH`, a mount inside, an error; the figure is a
/// lower bound).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    pub bytes: u64,
    pub complete: bool,
}

/// How deep a usage walk goes: one open directory per level, so a pod's tree a
/// million levels deep cannot take the driver's every file descriptor.
const MAX_DEPTH: usize = 256;

/// Allocated bytes (st_blocks, like `du`) of a volume's data: for a loop volume the
/// backing file, i.e. what it costs the root, not what its filesystem reports used;
/// for a directory volume the tree below it, on the same filesystem only, hard
/// links counted once. None when the data is missing.
///
/// The tree is a pod's: each directory is opened beneath its parent, never
/// through a symlink or into a mount, so none swapped in during the walk can lead
/// it out. What it could not enter makes the count incomplete.
pub fn used_bytes(data: &Path, t: VolumeType, budget: &mut Budget) -> Option<Used> {
    use nix::dir::Dir;
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::{fstat, fstatat, Mode};

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
        used.complete = false;
        return Some(used);
    };
    let mut stack = vec![top.into_iter()];
    while let Some(dir) = stack.last_mut() {
        let entry = match dir.next() {
            Some(Ok(entry)) => entry,
            end => {
                used.complete &= end.is_none();
                stack.pop();
                continue;
            }
        };
        let name = entry.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        if budget.0 == 0 {
            used.complete = false;
            return Some(used);
        }
        budget.0 -= 1;
        // SAFETY: the directory stays open (in `stack`) while the fd is used,
        // which ends before anything is pushed or popped.
        let dir_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(dir.as_raw_fd()) };
        let Ok(st) = fstatat(dir_fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue; // removed since it was listed
        };
        if st.st_dev != dev {
            used.complete = false; // a mount inside: not the root's room
            continue;
        }
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if st.st_nlink > 1 && !is_dir && !seen.insert(st.st_ino) {
            continue;
        }
        used.bytes += st.st_blocks as u64 * 512;
        if !is_dir {
            continue;
        }
        if stack.len() >= MAX_DEPTH {
            used.complete = false;
            continue;
        }
        // The directory opened must be the one just counted (not one renamed
        // over it meanwhile).
        let child = crate::backend::copy::open_subdir(dir_fd, name)
            .ok()
            .filter(|fd| fstat(fd).is_ok_and(|c| (c.st_dev, c.st_ino) == (st.st_dev, st.st_ino)))
            .and_then(|fd| Dir::from_fd(fd).ok());
        match child {
            Some(child) => stack.push(child.into_iter()),
            None => used.complete = false,
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

    /// A bind mount of the same filesystem inside the volume (a privileged pod's)
    /// is not entered: its device tells nothing, the mount does.
    #[test]
    fn du_does_not_enter_a_bind_mount_of_the_same_filesystem() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let (data, host) = (dir.path().join("v"), dir.path().join("host"));
        fs::create_dir_all(data.join("m")).unwrap();
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("big"), vec![1u8; 1 << 20]).unwrap();
        nix::mount::mount(
            Some(&host),
            &data.join("m"),
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let _mounted = Unmount(data.join("m"));
        let used = used_bytes(&data, VolumeType::Dir, &mut Budget(1000)).unwrap();
        assert!(used.bytes < 1 << 20, "{used:?}");
    }

    /// A tree deeper than the walk goes is counted as far as it goes, and said
    /// to be incomplete.
    #[test]
    fn du_stops_at_its_depth_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("v");
        let deep: PathBuf = std::iter::once(data.clone())
            .chain((0..MAX_DEPTH + 10).map(|_| PathBuf::from("d")))
            .collect();
        fs::create_dir_all(&deep).unwrap();
        let used = used_bytes(&data, VolumeType::Dir, &mut Budget(u64::MAX)).unwrap();
        assert!(!used.complete);
        let shallow = used_bytes(&data.join("d"), VolumeType::Dir, &mut Budget(u64::MAX));
        assert!(!shallow.unwrap().complete);
        let inner: PathBuf = deep.ancestors().nth(20).unwrap().to_path_buf();
        assert!(
            used_bytes(&inner, VolumeType::Dir, &mut Budget(u64::MAX))
                .unwrap()
                .complete
        );
    }
}
