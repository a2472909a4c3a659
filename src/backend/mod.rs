//! Where volume data lives under the driver's root, and the backends that make it.
//!
//! ```text
//! <root>/state/volumes/<id>.json     records (store)
//! <root>/state/snapshots/<id>.json
//! <root>/volumes/<id>/               a directory volume (btrfs: a subvolume)
//! <root>/volumes/<id>.img            a loop volume's backing file
//! <root>/snapshots/<id>[.img]        a snapshot's data, same shapes
//! ```
//! Every path is built from a validated id (`ids`), never from a request string.

pub mod dir;

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
