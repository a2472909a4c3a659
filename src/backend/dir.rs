//! Directory volumes: a directory under the root, bind-mounted into pods.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::error::{Context, Result};
use crate::store::sync_dir;

/// Makes an empty volume directory at `path`, replacing what an interrupted
/// earlier attempt left there (it was never reported created).
pub fn create(path: &Path) -> Result<()> {
    remove(path)?;
    fs::create_dir(path).ctx(|| format!("create {}", path.display()))?;
    // Pods run as any user; access is confined by the bind mount, not the mode.
    fs::set_permissions(path, fs::Permissions::from_mode(0o777))
        .ctx(|| format!("chmod {}", path.display()))?;
    sync_dir(path.parent().expect("volume paths have a parent"))
}

/// Removes a volume directory and everything in it; absent is fine. Symlinks inside
/// are removed, never followed.
pub fn remove(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(crate::error::Error::io(
            format!("stat {}", path.display()),
            e,
        )),
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(path).ctx(|| format!("remove {}", path.display()))
        }
        Ok(_) => fs::remove_file(path).ctx(|| format!("remove {}", path.display())),
    }
}
