//! Where volume data lives under the driver's root, and the backends that make it.
//!
//! ```text
//! <root>/state/volumes/slots          records (store), one slot file per table
//! <root>/state/snapshots/slots
//! <root>/volumes/<id>/               a directory volume (btrfs: a subvolume)
//! <root>/volumes/<id>.img            a loop volume's backing file
//! <root>/snapshots/<id>[.img]        a snapshot's data, same shapes
//! <root>/trash/                      deleted data being removed (trash)
//! ```
//! Every path is built from a validated id (`ids`), never from a request string.

pub mod btrfs;
pub mod copy;
pub mod dir;
pub mod loopfile;
pub mod projquota;
pub mod trash;

use std::path::{Path, PathBuf};

use crate::params::VolumeType;

#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    /// A root mounted at the same path on every node, for shared volumes.
    pub shared_root: Option<PathBuf>,
}

impl Layout {
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    fn base(&self, shared: bool) -> &Path {
        match (&self.shared_root, shared) {
            (Some(s), true) => s,
            _ => &self.root,
        }
    }

    pub fn volumes_dir(&self, shared: bool) -> PathBuf {
        self.base(shared).join("volumes")
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Where the nodes that use the shared root say so: a shared volume can be
    /// ControllerPublished to those only.
    pub fn nodes_dir(&self) -> Option<PathBuf> {
        self.shared_root
            .as_ref()
            .map(|r| r.join("state").join("nodes"))
    }

    /// Where the locks of shared volumes are (`nodelock`).
    pub fn locks_dir(&self) -> Option<PathBuf> {
        self.shared_root
            .as_ref()
            .map(|r| r.join("state").join("locks"))
    }

    /// A node's entry there. Node ids are the operator's (Kubernetes node names,
    /// in deploy/), but any bytes can arrive in a request: the file is named by a
    /// digest, and holds the id for whoever looks.
    pub fn node_entry(&self, node: &str) -> Option<PathBuf> {
        use sha2::{Digest, Sha256};
        let digest = hex::encode(&Sha256::digest(node.as_bytes())[..16]);
        self.nodes_dir().map(|d| d.join(format!("{digest}.node")))
    }

    /// Deleted data of this node's root on its way out. Shared volumes are removed
    /// in place: another node may be emptying the shared root's directories.
    pub fn trash_dir(&self) -> PathBuf {
        self.root.join("trash")
    }

    /// The data of volume `id`.
    pub fn volume_data(&self, id: &str, t: VolumeType, shared: bool) -> PathBuf {
        self.volumes_dir(shared).join(data_name(id, t))
    }

    /// The data of snapshot `id` of a volume of type `t`.
    pub fn snapshot_data(&self, id: &str, t: VolumeType) -> PathBuf {
        self.snapshots_dir().join(data_name(id, t))
    }
}

fn data_name(id: &str, t: VolumeType) -> String {
    match t {
        VolumeType::Dir => id.to_string(),
        VolumeType::Loop => format!("{id}.img"),
    }
}

/// How the root's filesystem limits directory volumes' sizes, decided at start-up
/// from what the root is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirLimits {
    /// Each directory volume is a subvolume; `quota` says whether qgroup limits hold.
    Btrfs { uuid: String, quota: bool },
    /// xfs, or ext4 mounted with prjquota: a project id per volume with a hard limit.
    ProjectQuota,
    /// Plain directories with no limit; `why` is said at start-up.
    None { why: String },
}

impl DirLimits {
    /// Looks at the filesystem holding `root`. `enable_btrfs_quota` allows turning
    /// btrfs quotas on (they cost every write some accounting, so it is the
    /// administrator's call).
    pub fn detect(root: &Path, enable_btrfs_quota: bool) -> crate::error::Result<DirLimits> {
        if btrfs::is_btrfs(root) {
            let uuid = btrfs::fsid(root)?;
            let mut quota = btrfs::quota_enabled(&uuid);
            if !quota && enable_btrfs_quota {
                btrfs::enable_quota(root)?;
                quota = btrfs::quota_enabled(&uuid);
            }
            return Ok(DirLimits::Btrfs { uuid, quota });
        }
        match projquota::detect(root) {
            Ok(()) => Ok(DirLimits::ProjectQuota),
            Err(why) => Ok(DirLimits::None { why }),
        }
    }

    /// Whether a directory volume's size is enforced.
    pub fn enforced(&self) -> bool {
        matches!(
            self,
            DirLimits::Btrfs { quota: true, .. } | DirLimits::ProjectQuota
        )
    }

    pub fn describe(&self) -> String {
        match self {
            DirLimits::Btrfs { quota: true, .. } => {
                "btrfs root: directory volumes are subvolumes limited by qgroups".into()
            }
            DirLimits::Btrfs { quota: false, .. } => "btrfs root with quota disabled: directory \
                 volumes are subvolumes WITHOUT size limits (start with --enable-btrfs-quota \
                 or run `btrfs quota enable` on the root)"
                .into(),
            DirLimits::ProjectQuota => {
                "project quotas on the root: each directory volume has a hard block limit".into()
            }
            DirLimits::None { why } => {
                format!("directory volume sizes are NOT enforced: {why}")
            }
        }
    }
}
