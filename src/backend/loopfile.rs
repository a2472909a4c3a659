//! Loop volumes' backing files: a file of the volume's size under the root, sparse
//! or fully allocated, attached as a loop device when a node stages it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Context, Error, Result};
use crate::params::Allocation;

/// Makes the backing file at `path` with `size` bytes, replacing what an
/// interrupted earlier attempt left there (it was never reported created). Without
/// room for a preallocated file, nothing is left behind: RESOURCE_EXHAUSTED.
pub fn create(path: &Path, size: u64, allocation: Allocation) -> Result<()> {
    super::dir::remove(path)?;
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .ctx(|| format!("create {}", path.display()))?;
    if let Err(e) = size_file(&f, path, 0, size, allocation)
        .and_then(|()| f.sync_all().ctx(|| format!("sync {}", path.display())))
        .and_then(|()| settle(&f, allocation))
    {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

/// Grows the backing file to `size` and makes its length durable; a file already
/// that large keeps its length, and is still synced (a grow killed before its sync
/// leaves the length in the page cache only).
pub fn grow(path: &Path, size: u64, allocation: Allocation) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .ctx(|| format!("open {}", path.display()))?;
    let now = f
        .metadata()
        .ctx(|| format!("stat {}", path.display()))?
        .len();
    if now < size {
        size_file(&f, path, now, size, allocation)?;
    }
    f.sync_all().ctx(|| format!("sync {}", path.display()))?;
    // A retry that finds the file grown allocates nothing: no commit to pay (btrfs
    // makes its own within 30 s of a grow a crash interrupted).
    if now < size {
        settle(&f, allocation)?;
    }
    Ok(())
}

/// Makes the room a preallocation took show in the root's free space at once
/// (btrfs shows it only after a commit), so that it is not offered again.
fn settle(f: &File, allocation: Allocation) -> Result<()> {
    match allocation {
        Allocation::Sparse => Ok(()),
        Allocation::Preallocate => super::btrfs::commit_space(f),
    }
}

fn size_file(f: &File, path: &Path, from: u64, size: u64, allocation: Allocation) -> Result<()> {
    match allocation {
        Allocation::Sparse => f.set_len(size).ctx(|| format!("size {}", path.display())),
        Allocation::Preallocate => {
            let r = unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    0,
                    from as libc::off_t,
                    (size - from) as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOSPC) {
                // Give back what the failed allocation took.
                let _ = f.set_len(from);
                return Err(Error::NoSpace(format!(
                    "not enough free space under the driver root for {} preallocated bytes",
                    size - from
                )));
            }
            Err(Error::io(format!("allocate {}", path.display()), e))
        }
    }
}

/// Size of the backing file now.
pub fn size(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .ctx(|| format!("stat {}", path.display()))?
        .len())
}

/// Whether any of the backing file holds written data. A volume whose first blocks
/// read as zeros (no filesystem signature there) may still hold what a pod wrote
/// further in through the raw device; only a file with no data at all is empty.
/// Holes and preallocated (unwritten) ranges are not data. Where the filesystem
/// cannot tell, the whole file counts as data.
pub fn holds_data(path: &Path) -> Result<bool> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .ctx(|| format!("open {}", path.display()))?;
    let at = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    if at >= 0 {
        return Ok(true);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => Ok(false),
        _ => Ok(f.metadata().map_or(true, |m| m.len() > 0)),
    }
}
