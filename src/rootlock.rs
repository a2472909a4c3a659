//! One driver per root. Two would each take the other's half-made volumes for
//! leftovers to remove, and write the same slot files from two allocators. That
//! happens when a DaemonSet's rolling update starts the new pod before the old
//! one has exited (maxSurge), or when two DaemonSets are given the same root.
//!
//! The lock is an flock on `<root>/localvol.lock`: the kernel drops it when the
//! holder exits, however it exits, so a killed driver never leaves it behind.

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};

pub const LOCK_FILE: &str = "localvol.lock";

/// Held for the driver's lifetime.
pub struct RootLock {
    _held: Flock<File>,
}

impl RootLock {
    /// Takes the lock of `root`, waiting up to `wait` for a driver that holds it
    /// to exit (an old pod finishing its calls).
    pub fn take(root: &Path, wait: Duration) -> Result<RootLock> {
        let path = root.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .ctx(|| format!("open {}", path.display()))?;
        let started = Instant::now();
        let mut told = false;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(held) => {
                    // Who holds it, for the message of the next one to try.
                    let pid = format!("{}\n", std::process::id());
                    held.set_len(0)
                        .and_then(|()| held.write_all_at(pid.as_bytes(), 0))
                        .ctx(|| format!("write {}", path.display()))?;
                    return Ok(RootLock { _held: held });
                }
                Err((f, Errno::EWOULDBLOCK)) => {
                    let holder = holder(&f);
                    if started.elapsed() >= wait {
                        return Err(Error::FailedPrecondition(format!(
                            "another localvol ({holder}) serves the root {}; stop it first, or \
                             give this one another --root",
                            root.display()
                        )));
                    }
                    if !told {
                        tracing::warn!(root = %root.display(), holder, ?wait,
                            "another localvol serves this root; waiting for it to exit");
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    file = f;
                }
                Err((_, e)) => return Err(Error::io(format!("lock {}", path.display()), e)),
            }
        }
    }
}

fn holder(f: &File) -> String {
    let mut buf = [0u8; 32];
    let n = f.read_at(&mut buf, 0).unwrap_or(0);
    match std::str::from_utf8(&buf[..n]).map(str::trim) {
        Ok(pid) if !pid.is_empty() => format!("pid {pid}"),
        _ => "pid unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_then_is_refused_and_gets_it_once_freed() {
        let dir = tempfile::tempdir().unwrap();
        let first = RootLock::take(dir.path(), Duration::ZERO).unwrap();
        let t = Instant::now();
        let e = RootLock::take(dir.path(), Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        RootLock::take(dir.path(), Duration::ZERO).unwrap();
    }
}
