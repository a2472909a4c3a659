//! Deleted data leaves through the trash. DeleteVolume and DeleteSnapshot rename it
//! into `<root>/trash/` and a background thread removes it: a rename takes the same
//! time whatever the data holds, while removing a large backing file (with the
//! root mounted `-o discard`) or a tree of many files can take longer than the
//! provisioner waits for an answer.
//!
//! Only the rename is in the caller's path. It needs no sync: the record's removal
//! is already durable, and after a crash the data is either still in place (a
//! leftover without a record, removed at start-up) or in the trash, which is
//! emptied at every start-up. Until then its space is in use, and the capacity
//! the driver reports (from statvfs) says so.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::dir;
use crate::error::{Error, Result};

pub struct Trash {
    dir: PathBuf,
    queue: Arc<Queue>,
}

#[derive(Default)]
struct Queue {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    items: VecDeque<PathBuf>,
    /// The reaper is removing an item it took off `items`.
    busy: bool,
}

impl Trash {
    /// Opens (creates) the trash at `dir` and starts its reaper, which first removes
    /// whatever an earlier run left there.
    pub fn open(dir: PathBuf) -> Result<Trash> {
        dir::own_dir(&dir)?;
        let queue = Arc::new(Queue::default());
        {
            let left = fs::read_dir(&dir)
                .map_err(|e| Error::io(format!("list {}", dir.display()), e))?
                .flatten()
                .map(|e| e.path());
            let mut s = queue.state.lock().unwrap();
            s.items.extend(left);
            if !s.items.is_empty() {
                tracing::info!(entries = s.items.len(), dir = %dir.display(), "emptying what an earlier run left in the trash");
            }
        }
        let reaper = queue.clone();
        let settle = super::btrfs::is_btrfs(&dir).then(|| dir.clone());
        std::thread::Builder::new()
            .name("trash".into())
            .spawn(move || reap(&reaper, settle.as_deref()))
            .map_err(|e| Error::io("start the trash thread", e))?;
        Ok(Trash { dir, queue })
    }

    /// Takes `path` (a volume's or snapshot's data, on the root's filesystem) out of
    /// the way at once; it is removed in the background. Absent data is fine. Data
    /// that cannot be renamed (another filesystem, another project quota) is removed
    /// in place, as before there was a trash.
    pub fn discard(&self, path: &Path) -> Result<()> {
        let name = path.file_name().expect("data paths have a file name");
        let dest = self
            .dir
            .join(format!("{}.{}", name.to_string_lossy(), unique()));
        match fs::rename(path, &dest) {
            Ok(()) => {
                let mut s = self.queue.state.lock().unwrap();
                s.items.push_back(dest);
                self.queue.changed.notify_all();
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot move into the trash; removing in place");
                dir::remove(path)
            }
        }
    }

    /// Waits until everything discarded so far is removed, or `at_most` has passed:
    /// a caller short of space gets back what deletions already freed.
    pub fn drain(&self, at_most: Duration) {
        let s = self.queue.state.lock().unwrap();
        let _ = self
            .queue
            .changed
            .wait_timeout_while(s, at_most, |s| s.busy || !s.items.is_empty())
            .unwrap();
    }

    /// Items not yet removed.
    pub fn pending(&self) -> usize {
        let s = self.queue.state.lock().unwrap();
        s.items.len() + usize::from(s.busy)
    }
}

/// Removes what is discarded, in order. On btrfs (`settle` is then the trash),
/// the space removals give back shows in statfs only once their transaction
/// commits (every 30 s by default): each time the trash is empty, it commits, so
/// that capacity, and a create waiting in `drain`, see the room at once.
fn reap(queue: &Queue, settle: Option<&Path>) {
    loop {
        let item = {
            let mut s = queue.state.lock().unwrap();
            s.busy = false;
            while s.items.is_empty() {
                queue.changed.notify_all();
                s = queue.changed.wait(s).unwrap();
            }
            s.busy = true;
            s.items.pop_front().expect("not empty")
        };
        if let Err(e) = dir::remove(&item) {
            // Left for the next start-up; the space stays in use until then.
            tracing::error!(path = %item.display(), error = %e, "cannot empty the trash");
        }
        let emptied = queue.state.lock().unwrap().items.is_empty();
        if let (true, Some(trash)) = (emptied, settle) {
            let committed = fs::File::open(trash)
                .map_err(|e| Error::io(format!("open {}", trash.display()), e))
                .and_then(|f| super::btrfs::commit_space(&f));
            if let Err(e) = committed {
                tracing::warn!(error = %e, "cannot commit the root's btrfs transaction; freed space shows within 30 s");
            }
        }
    }
}

/// A name part no other discard uses, also across restarts (the driver is often
/// pid 1 of its container, so the pid would repeat).
fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{nanos}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discarded_data_is_gone_at_once_and_removed_in_the_background() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("vol-1");
        fs::create_dir_all(data.join("a/b")).unwrap();
        fs::write(data.join("a/b/f"), b"x").unwrap();
        let left = tmp.path().join("trash");
        fs::create_dir_all(&left).unwrap();
        fs::write(left.join("from-an-earlier-run"), b"y").unwrap();

        let trash = Trash::open(left.clone()).unwrap();
        trash.discard(&data).unwrap();
        assert!(!data.exists());
        trash.discard(&data).unwrap(); // absent: fine
        trash.drain(Duration::from_secs(30));
        assert_eq!(trash.pending(), 0);
        assert_eq!(fs::read_dir(&left).unwrap().count(), 0);
    }

    #[test]
    fn a_symlinked_trash_is_refused() {
        // (dir::own_dir refuses it before anything is listed or removed.)
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        fs::create_dir_all(&elsewhere).unwrap();
        fs::write(elsewhere.join("precious"), b"x").unwrap();
        let trash = tmp.path().join("trash");
        std::os::unix::fs::symlink(&elsewhere, &trash).unwrap();
        assert!(Trash::open(trash).is_err());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(elsewhere.join("precious").exists());
    }
}
