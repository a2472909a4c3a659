//! Directory volumes: a directory under the root (a subvolume on btrfs), bind-mounted
//! into pods, limited to its size by whatever the root's filesystem offers.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{btrfs, projquota, DirLimits};
use crate::error::{Context, Error, Result};

/// Makes an empty volume directory of `size` bytes at `path`, replacing what an
/// interrupted earlier attempt left there (it was never reported created).
pub fn create(path: &Path, id: &str, size: u64, limits: &DirLimits) -> Result<()> {
    remove(path)?;
    match limits {
        DirLimits::Btrfs { quota, .. } => {
            btrfs::create_subvolume(path)?;
            if *quota {
                btrfs::set_limit(path, size)?;
            }
        }
        DirLimits::ProjectQuota => {
            fs::create_dir(path).ctx(|| format!("create {}", path.display()))?;
            projquota::assign(path, id, size)?;
        }
        DirLimits::None { .. } => {
            fs::create_dir(path).ctx(|| format!("create {}", path.display()))?
        }
    }
    // Pods run as any user; access is confined by the bind mount, not the mode.
    fs::set_permissions(path, fs::Permissions::from_mode(0o777))
        .ctx(|| format!("chmod {}", path.display()))
}

/// Makes what a restore or clone copies into, where that must exist first: with
/// project quotas, a directory already in the volume's project, because only
/// files made after a directory joins a project inherit it. The copied data then
/// counts against the new volume's limit.
pub fn prepare_copy(path: &Path, id: &str, size: u64, limits: &DirLimits) -> Result<()> {
    match limits {
        DirLimits::ProjectQuota => create(path, id, size, limits),
        _ => Ok(()),
    }
}

/// Puts a size limit on a volume whose data was copied in (restore, clone): a
/// btrfs qgroup limit on the subvolume the copy made. (A project was given
/// before the copy, by `prepare_copy`.)
pub fn limit_new(path: &Path, size: u64, limits: &DirLimits) -> Result<()> {
    match limits {
        DirLimits::Btrfs { quota: true, .. } if btrfs::is_subvolume(path) => {
            btrfs::set_limit(path, size)
        }
        _ => Ok(()),
    }
}

/// Sets the size limit of an existing volume again (a retried create, start-up):
/// its own project or qgroup keeps its usage. A directory never given a project
/// gets one only while empty (a create killed before that step): files already
/// in it would stay outside the project, and renames across its edge would fail.
pub fn reapply_limit(path: &Path, id: &str, size: u64, limits: &DirLimits) -> Result<()> {
    match limits {
        DirLimits::ProjectQuota if projquota::project_of(path)? == 0 => {
            let empty = fs::read_dir(path)
                .ctx(|| format!("list {}", path.display()))?
                .next()
                .is_none();
            if empty {
                projquota::assign(path, id, size)
            } else {
                tracing::warn!(path = %path.display(), "volume holds data but no project (made before project quotas were on); its size is not limited");
                Ok(())
            }
        }
        _ => set_size(path, size, limits),
    }
}

/// Changes the size limit of the volume at `path`, where the root has limits.
pub fn set_size(path: &Path, size: u64, limits: &DirLimits) -> Result<()> {
    match limits {
        DirLimits::Btrfs { quota: true, .. } if btrfs::is_subvolume(path) => {
            btrfs::set_limit(path, size)
        }
        DirLimits::ProjectQuota => projquota::set_limit(path, size),
        _ => Ok(()),
    }
}

/// Removes volume data (a directory, a subvolume or a file) and everything in it;
/// absent is fine. Symlinks inside are removed, never followed.
pub fn remove(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("stat {}", path.display()), e)),
        Ok(m) if m.is_dir() => {
            if btrfs::is_subvolume(path) && btrfs::delete_subvolume(path).is_ok() {
                return Ok(());
            }
            fs::remove_dir_all(path).ctx(|| format!("remove {}", path.display()))
        }
        Ok(_) => fs::remove_file(path).ctx(|| format!("remove {}", path.display())),
    }
}

/// The kernel's name of the filesystem holding `dir` (ext4, xfs, btrfs, tmpfs,
/// nfs4, ...), from its mount: what every directory volume there holds.
pub fn filesystem_name(dir: &Path) -> Result<String> {
    Ok(crate::mount::mount_holding(dir)?.fs_type)
}

/// Creates one of the root's own directories, or checks the one there. It must be
/// a real directory: the driver removes entries in it, and a symlink planted in
/// its place would lead those removals outside the root.
pub fn own_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).ctx(|| format!("create {}", path.display()))?;
    let m = fs::symlink_metadata(path).ctx(|| format!("stat {}", path.display()))?;
    if m.is_dir() {
        return Ok(());
    }
    Err(Error::Internal(format!(
        "{} is not a directory (a symlink?); the driver removes entries in it, so it will \
         not start until it is removed",
        path.display()
    )))
}
