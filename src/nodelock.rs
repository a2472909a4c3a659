//! Locks that hold across nodes, for what several nodes' drivers change on the
//! shared root: a shared volume's record and data. The locks of `locks.rs` keep
//! one call per volume on a node; every node's provisioner sees a shared claim,
//! so two nodes may create, delete or attach one shared volume at the same moment.
//! An open-file-description lock on a file per volume under
//! `<shared-root>/state/locks/`, which NFS (v4) carries to its server. The file is
//! removed with its volume: a waiter that gets the lock of a removed file opens
//! the path afresh.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Held while a call changes one shared volume; dropping it lets the next one in,
/// on any node.
pub struct NodeLock {
    file: File,
    path: PathBuf,
}

impl NodeLock {
    /// Waits (as long as `locks::budget` allows) for the lock of `key` in `dir`.
    pub fn acquire(dir: &Path, key: &str) -> Result<NodeLock> {
        let path = dir.join(key);
        let until = Instant::now() + crate::locks::budget();
        let mut pause = Duration::from_millis(1);
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| Error::io(format!("open lock {}", path.display()), e))?;
            match try_lock(&file) {
                // Removed (its volume deleted) while this call waited: not the lock
                // a new holder would take.
                Ok(()) if same_file(&file, &path) => return Ok(NodeLock { file, path }),
                Ok(()) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {}
                Err(e) => return Err(Error::io(format!("lock {}", path.display()), e)),
            }
            if Instant::now() >= until {
                return Err(Error::Aborted(format!(
                    "another node's operation on {key} holds it; retry later"
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Removes the lock's file, still held (its volume is gone); the lock itself
    /// goes when this is dropped.
    pub fn remove_file(&self) {
        if same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn try_lock(file: &File) -> io::Result<()> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `path` still names the file `file` has open.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_a_removed_file_is_not_held() {
        let dir = tempfile::tempdir().unwrap();
        let first = NodeLock::acquire(dir.path(), "vol-a").unwrap();
        // Another open file description (another node's, as far as the kernel
        // can tell) does not get it while it is held.
        let other = OpenOptions::new()
            .write(true)
            .open(dir.path().join("vol-a"))
            .unwrap();
        assert!(try_lock(&other).is_err());
        let unrelated = NodeLock::acquire(dir.path(), "vol-b").unwrap();
        first.remove_file();
        drop(first);
        assert!(!dir.path().join("vol-a").exists());
        // The removed file's lock is free, but a new call takes the path's new file.
        assert!(try_lock(&other).is_ok());
        let again = NodeLock::acquire(dir.path(), "vol-a").unwrap();
        assert!(!same_file(&other, &dir.path().join("vol-a")));
        drop((again, unrelated));
    }
}
