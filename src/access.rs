//! Access modes and the rules that keep their promises. Pure functions: the callers
//! gather the facts (what is mounted, what is attached) and these decide.

use serde::{Deserialize, Serialize};

/// The CSI access modes, as the domain sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// More than one node may use the volume at once.
    pub fn is_multi_node(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeReaderOnly
                | AccessMode::MultiNodeSingleWriter
                | AccessMode::MultiNodeMultiWriter
        )
    }

    /// Every mount of the volume must be read-only.
    pub fn is_read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }

    /// At most one published target in the whole cluster (ReadWriteOncePod).
    pub fn is_single_publisher(self) -> bool {
        matches!(self, AccessMode::SingleNodeSingleWriter)
    }
}

/// How the workload reaches the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessType {
    /// A filesystem at the target path. `fs_type` empty means the volume's default.
    Mount { fs_type: String, flags: Vec<String> },
    /// The raw block device, bind-mounted onto a file at the target path.
    Block,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub access_type: AccessType,
    pub mode: AccessMode,
}

impl Capability {
    pub fn is_block(&self) -> bool {
        matches!(self.access_type, AccessType::Block)
    }
    pub fn mount_flags(&self) -> &[String] {
        match &self.access_type {
            AccessType::Mount { flags, .. } => flags,
            AccessType::Block => &[],
        }
    }
    pub fn fs_type(&self) -> &str {
        match &self.access_type {
            AccessType::Mount { fs_type, .. } => fs_type,
            AccessType::Block => "",
        }
    }
}

/// What a volume can offer, fixed when it is created.
#[derive(Debug, Clone, Copy)]
pub struct Offer {
    /// The volume is a raw device (loop) that can be handed out as a block volume.
    pub block: bool,
    /// Several nodes reach the same data (a shared root mounted on every node).
    pub multi_node: bool,
}

/// Whether a volume with `offer` can serve `cap`; the error says why not.
pub fn check_supported(offer: Offer, cap: &Capability) -> Result<(), String> {
    if cap.is_block() && !offer.block {
        return Err(
            "block access needs a loop volume (StorageClass parameter type: loop); \
                    directory volumes are filesystems only"
                .into(),
        );
    }
    if cap.mode.is_multi_node() && !offer.multi_node {
        return Err(format!(
            "access mode {:?} needs a volume that several nodes can reach; this volume lives on \
             one node's local storage (use a shared root, StorageClass parameter shared: \"true\", \
             for directory volumes on a filesystem every node mounts)",
            cap.mode
        ));
    }
    Ok(())
}

/// Whether `asked` is among the capabilities a volume was created for, by access
/// type (block or filesystem) and access mode: a CreateVolume retry must ask for
/// the volume that exists, not another one under the same name.
pub fn check_created_for(created: &[Capability], asked: &Capability) -> Result<(), String> {
    let kind = |c: &Capability| if c.is_block() { "block" } else { "filesystem" };
    if created
        .iter()
        .any(|c| c.is_block() == asked.is_block() && c.mode == asked.mode)
    {
        return Ok(());
    }
    let made: Vec<String> = created
        .iter()
        .map(|c| format!("{} {:?}", kind(c), c.mode))
        .collect();
    Err(format!(
        "it was created for {}, not {} {:?}",
        made.join(", "),
        kind(asked),
        asked.mode
    ))
}

/// Whether a mount should be read-only: the caller asked, or the mode says so.
pub fn effective_readonly(mode: AccessMode, readonly_flag: bool) -> bool {
    readonly_flag || mode.is_read_only()
}

/// Decides a NodePublishVolume given the other targets where the volume is already
/// published on this node; `single_publisher` is the ReadWriteOncePod promise.
pub fn check_node_publish(single_publisher: bool, other_targets: &[String]) -> Result<(), String> {
    if single_publisher {
        if let Some(t) = other_targets.first() {
            return Err(format!(
                "the volume is ReadWriteOncePod (SINGLE_NODE_SINGLE_WRITER) and already published at {t}; \
                 unpublish it there first"
            ));
        }
    }
    Ok(())
}

/// Decides a ControllerPublishVolume to `node` given the nodes it is attached to.
pub fn check_controller_publish(
    mode: AccessMode,
    node: &str,
    attached: &[String],
) -> Result<(), String> {
    if mode.is_multi_node() {
        return Ok(());
    }
    match attached.iter().find(|n| n.as_str() != node) {
        Some(other) => Err(format!(
            "the volume's access mode {mode:?} allows one node and it is published to node {other:?}; \
             unpublish it there first"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AccessMode::*;

    const ALL: [AccessMode; 7] = [
        SingleNodeWriter,
        SingleNodeReaderOnly,
        MultiNodeReaderOnly,
        MultiNodeSingleWriter,
        MultiNodeMultiWriter,
        SingleNodeSingleWriter,
        SingleNodeMultiWriter,
    ];

    fn mount(mode: AccessMode) -> Capability {
        Capability {
            access_type: AccessType::Mount {
                fs_type: String::new(),
                flags: vec![],
            },
            mode,
        }
    }

    #[test]
    fn local_volumes_refuse_multi_node_modes() {
        let local = Offer {
            block: false,
            multi_node: false,
        };
        let shared = Offer {
            block: false,
            multi_node: true,
        };
        for m in ALL {
            assert_eq!(
                check_supported(local, &mount(m)).is_ok(),
                !m.is_multi_node(),
                "{m:?}"
            );
            assert!(check_supported(shared, &mount(m)).is_ok(), "{m:?}");
        }
    }

    #[test]
    fn a_retry_asks_for_what_was_created() {
        let block = |mode| Capability {
            access_type: AccessType::Block,
            mode,
        };
        let created = [block(SingleNodeWriter), mount(SingleNodeReaderOnly)];
        assert!(check_created_for(&created, &block(SingleNodeWriter)).is_ok());
        assert!(check_created_for(&created, &mount(SingleNodeReaderOnly)).is_ok());
        let why = check_created_for(&created, &mount(SingleNodeWriter)).unwrap_err();
        assert!(why.contains("block SingleNodeWriter"), "{why}");
        assert!(check_created_for(&created, &block(SingleNodeSingleWriter)).is_err());
    }

    #[test]
    fn block_needs_a_device() {
        let cap = Capability {
            access_type: AccessType::Block,
            mode: SingleNodeWriter,
        };
        assert!(check_supported(
            Offer {
                block: false,
                multi_node: false
            },
            &cap
        )
        .is_err());
        assert!(check_supported(
            Offer {
                block: true,
                multi_node: false
            },
            &cap
        )
        .is_ok());
    }

    #[test]
    fn reader_modes_force_readonly() {
        for m in ALL {
            assert_eq!(
                effective_readonly(m, false),
                matches!(m, SingleNodeReaderOnly | MultiNodeReaderOnly)
            );
            assert!(effective_readonly(m, true));
        }
    }

    #[test]
    fn single_writer_pod_allows_one_target() {
        let other = vec!["/t1".to_string()];
        for m in ALL {
            let single = m.is_single_publisher();
            assert_eq!(
                check_node_publish(single, &other).is_err(),
                m == SingleNodeSingleWriter
            );
            assert!(check_node_publish(single, &[]).is_ok());
        }
    }

    #[test]
    fn single_node_modes_allow_one_node() {
        let attached = vec!["node-a".to_string()];
        for m in ALL {
            assert!(check_controller_publish(m, "node-a", &attached).is_ok());
            assert_eq!(
                check_controller_publish(m, "node-b", &attached).is_err(),
                !m.is_multi_node()
            );
        }
    }
}
