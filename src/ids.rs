//! Volume and snapshot ids, request names and caller-given paths.
//!
//! An id is derived from the request name by a hash, so CreateVolume is idempotent
//! by name without a name index, and an id is checked against one strict shape
//! before it is ever joined to a path: nothing a caller sends can name a file
//! outside the driver's root.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const HASH_HEX: usize = 32;
/// Longest name accepted; Kubernetes names are `pvc-<uuid>` (40 bytes).
pub const MAX_NAME_LEN: usize = 1024;
/// Longest caller-given path accepted (PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

/// What an id names. The prefix keeps volume and snapshot ids apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Volume,
    Snapshot,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Volume => "vol-",
            Kind::Snapshot => "snap-",
        }
    }
    fn noun(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
        }
    }
}

/// The id for a request name: the same name always gives the same id.
pub fn id_for_name(kind: Kind, name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    format!("{}{}", kind.prefix(), &hex::encode(digest)[..HASH_HEX])
}

/// True when `id` has exactly the shape `id_for_name` produces.
pub fn is_valid_id(kind: Kind, id: &str) -> bool {
    id.strip_prefix(kind.prefix()).is_some_and(|h| {
        h.len() == HASH_HEX && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Checks an id from a request. A malformed id cannot name anything we made, so it
/// is NOT_FOUND (the spec's answer for an unknown id), with a hint at the shape.
pub fn check_id(kind: Kind, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{} id is required",
            kind.noun()
        )));
    }
    if !is_valid_id(kind, id) {
        return Err(Error::NotFound(format!(
            "no {} with id {:?}: localvol {} ids look like {}<32 hex digits>",
            kind.noun(),
            truncate(id),
            kind.noun(),
            kind.prefix()
        )));
    }
    Ok(())
}

/// Checks a CreateVolume/CreateSnapshot name: required, bounded, and free of the
/// control characters the CSI spec bans.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidArgument("name is required".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::InvalidArgument(format!(
            "name is {} bytes long; at most {MAX_NAME_LEN} are accepted",
            name.len()
        )));
    }
    let banned =
        |c: char| matches!(c as u32, 0x00..=0x08 | 0x0B | 0x0C | 0x0E..=0x1F | 0x7F..=0x9F);
    if name.chars().any(banned) {
        return Err(Error::InvalidArgument(
            "name contains control characters, which the CSI spec forbids".into(),
        ));
    }
    Ok(())
}

/// Checks a path given by the caller (staging or target path): absolute, bounded,
/// no NUL, no `.`/`..` components. The path is the caller's to choose; this only
/// makes sure it means what it says.
pub fn check_path(what: &str, path: &str) -> Result<PathBuf> {
    if path.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is required")));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(Error::InvalidArgument(format!(
            "{what} is longer than {MAX_PATH_LEN} bytes"
        )));
    }
    if path.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{what} contains a NUL byte"
        )));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "{what} {path:?} is not an absolute path"
        )));
    }
    if path.split('/').any(|c| c == "." || c == "..") {
        return Err(Error::InvalidArgument(format!(
            "{what} {path:?} contains '.' or '..' components"
        )));
    }
    if p == Path::new("/") {
        return Err(Error::InvalidArgument(format!("{what} cannot be /")));
    }
    Ok(p.to_path_buf())
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_kind_specific() {
        let a = id_for_name(Kind::Volume, "pvc-1");
        assert_eq!(a, id_for_name(Kind::Volume, "pvc-1"));
        assert_ne!(a, id_for_name(Kind::Volume, "pvc-2"));
        assert!(is_valid_id(Kind::Volume, &a));
        assert!(!is_valid_id(Kind::Snapshot, &a));
        assert!(is_valid_id(
            Kind::Snapshot,
            &id_for_name(Kind::Snapshot, "pvc-1")
        ));
    }

    #[test]
    fn hostile_ids_are_not_found() {
        for id in [
            "../etc",
            "vol-../../x",
            "vol-",
            "/etc/passwd",
            "vol-ABCDEF0123456789abcdef0123456789",
        ] {
            assert!(
                matches!(check_id(Kind::Volume, id), Err(Error::NotFound(_))),
                "{id}"
            );
        }
        assert!(matches!(
            check_id(Kind::Volume, ""),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn names_reject_control_characters() {
        assert!(check_name("pvc-0f3c").is_ok());
        assert!(check_name("with space and ünicode").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a\u{0}b").is_err());
        assert!(check_name("a\u{85}b").is_err());
        assert!(check_name(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    #[test]
    fn paths_must_be_plain_absolute() {
        assert!(check_path("target", "/var/lib/kubelet/pods/x/mount").is_ok());
        for p in ["", "relative/x", "/a/../b", "/a/./b", "/", "/a\0b"] {
            assert!(check_path("target", p).is_err(), "{p:?}");
        }
    }
}
