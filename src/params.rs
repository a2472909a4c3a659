//! StorageClass parameters: parsed once, validated strictly, so that a typo in a
//! StorageClass is an INVALID_ARGUMENT naming the key instead of a silent default.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Keys the Kubernetes provisioner adds on its own (`--extra-create-metadata`,
/// secrets, fstype): accepted and kept, never interpreted.
pub const KUBERNETES_PREFIX: &str = "csi.storage.k8s.io/";

/// The provisioner's key for a class's filesystem. It moves the value into the
/// mount capability of CreateVolume and strips the key; GetCapacity gets the
/// class's parameters unchanged.
pub const PROVISIONER_FS_TYPE: &str = "csi.storage.k8s.io/fstype";

/// The filesystem a StorageClass names in the provisioner's key, if any.
pub fn provisioner_fs_type(params: &BTreeMap<String, String>) -> Option<&str> {
    params
        .get(PROVISIONER_FS_TYPE)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeType {
    /// A directory (a btrfs subvolume where the root is btrfs).
    Dir,
    /// A backing file attached as a loop device.
    Loop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    Sparse,
    Preallocate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    pub volume_type: VolumeType,
    /// Filesystem for loop mount volumes; `None` means the capability's or ext4.
    pub fs_type: Option<String>,
    pub allocation: Allocation,
    /// Refuse to create a volume whose size the root cannot enforce.
    pub enforce_size: bool,
    /// Place the volume on the shared root (reachable from every node).
    pub shared: bool,
}

pub const SUPPORTED_FS: [&str; 2] = ["ext4", "xfs"];

/// Checks a filesystem name against what loop volumes can be formatted with.
pub fn check_fs_type(fs: &str) -> Result<()> {
    if SUPPORTED_FS.contains(&fs) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "fsType {fs:?} is not supported; use one of {}",
            SUPPORTED_FS.join(", ")
        )))
    }
}

fn bool_param(key: &str, v: &str) -> Result<bool> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Error::InvalidArgument(format!(
            "parameter {key}: {v:?} is not \"true\" or \"false\""
        ))),
    }
}

/// Validates VolumeSnapshotClass parameters: localvol takes none of its own, so
/// only the keys the snapshotter adds are accepted.
pub fn check_snapshot_parameters(params: &BTreeMap<String, String>) -> Result<()> {
    match params.keys().find(|k| !k.starts_with(KUBERNETES_PREFIX)) {
        Some(k) => Err(Error::InvalidArgument(format!(
            "unknown snapshot parameter {k:?}; localvol snapshot classes take only \
             csi.storage.k8s.io/* keys"
        ))),
        None => Ok(()),
    }
}

/// Parses and validates StorageClass parameters.
pub fn parse(params: &BTreeMap<String, String>) -> Result<VolumeParams> {
    let mut p = VolumeParams {
        volume_type: VolumeType::Dir,
        fs_type: None,
        allocation: Allocation::Sparse,
        enforce_size: false,
        shared: false,
    };
    for (k, v) in params {
        match k.as_str() {
            "type" => {
                p.volume_type = match v.as_str() {
                    "dir" => VolumeType::Dir,
                    "loop" => VolumeType::Loop,
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "parameter type: {v:?} is not a volume type; use \"dir\" or \"loop\""
                        )))
                    }
                }
            }
            "fsType" => {
                check_fs_type(v)?;
                p.fs_type = Some(v.clone());
            }
            "allocation" => {
                p.allocation = match v.as_str() {
                    "sparse" => Allocation::Sparse,
                    "preallocate" => Allocation::Preallocate,
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "parameter allocation: {v:?} is not \"sparse\" or \"preallocate\""
                        )))
                    }
                }
            }
            "enforceSize" => p.enforce_size = bool_param(k, v)?,
            "shared" => p.shared = bool_param(k, v)?,
            _ if k.starts_with(KUBERNETES_PREFIX) => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown parameter {k:?}; localvol accepts type, fsType, allocation, \
                     enforceSize, shared and csi.storage.k8s.io/* keys"
                )))
            }
        }
    }
    if p.volume_type == VolumeType::Dir {
        if p.fs_type.is_some() {
            return Err(Error::InvalidArgument(
                "parameter fsType applies to loop volumes only (type: loop)".into(),
            ));
        }
        if p.allocation == Allocation::Preallocate {
            return Err(Error::InvalidArgument(
                "parameter allocation applies to loop volumes only (type: loop)".into(),
            ));
        }
    }
    if p.volume_type == VolumeType::Loop && p.shared {
        return Err(Error::InvalidArgument(
            "parameter shared: loop volumes cannot be shared between nodes (two kernels must \
             never mount one filesystem); use type: dir"
                .into(),
        ));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_to_dir() {
        let p = parse(&map(&[])).unwrap();
        assert_eq!(p.volume_type, VolumeType::Dir);
        assert!(!p.enforce_size && !p.shared);
    }

    #[test]
    fn kubernetes_keys_are_accepted() {
        let p = parse(&map(&[
            ("csi.storage.k8s.io/pvc/name", "www-web-0"),
            ("type", "loop"),
        ]))
        .unwrap();
        assert_eq!(p.volume_type, VolumeType::Loop);
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        for (k, v) in [
            ("tpye", "dir"),
            ("type", "nfs"),
            ("fsType", "btrfs"),
            ("enforceSize", "yes"),
        ] {
            let err = parse(&map(&[(k, v)])).unwrap_err().to_string();
            assert!(err.contains(k), "{err}");
        }
        assert!(
            parse(&map(&[("fsType", "xfs")])).is_err(),
            "fsType on a dir volume"
        );
        assert!(parse(&map(&[("type", "loop"), ("shared", "true")])).is_err());
    }
}
