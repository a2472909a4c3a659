//! Controller publish: which node a volume is attached to, and the access-mode
//! promises that span nodes. Attachments are the one piece of state the kernel
//! cannot tell us (they describe other nodes), so they live in the volume's record.

use crate::access::{self, AccessMode, Capability};
use crate::error::{Error, Result};
use crate::ids::{self, Kind};
use crate::store::{Attachment, VolumeRecord};
use crate::volumes::Driver;

/// The rules a publish must follow, combining the request's capability with the
/// capabilities the volume was created for: the stricter promise wins, so a
/// ReadWriteOncePod volume stays single-pod whatever a later request says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRules {
    pub mode: AccessMode,
    pub readonly: bool,
    pub single_publisher: bool,
}

/// Checks a publish capability against the volume's and derives the rules.
pub fn publish_rules(rec: &VolumeRecord, cap: &Capability, readonly: bool) -> Result<PublishRules> {
    access::check_supported(Driver::offer_of(rec), cap).map_err(Error::InvalidArgument)?;
    if !rec.capabilities.is_empty() {
        let kind_matches = rec
            .capabilities
            .iter()
            .any(|c| c.is_block() == cap.is_block());
        if !kind_matches {
            return Err(Error::FailedPrecondition(format!(
                "volume {} was created for {} access and cannot be published as {}",
                rec.id,
                if cap.is_block() {
                    "filesystem"
                } else {
                    "block"
                },
                if cap.is_block() {
                    "a block device"
                } else {
                    "a filesystem"
                },
            )));
        }
    }
    let all = |f: fn(AccessMode) -> bool| {
        !rec.capabilities.is_empty() && rec.capabilities.iter().all(|c| f(c.mode))
    };
    Ok(PublishRules {
        mode: cap.mode,
        readonly: access::effective_readonly(cap.mode, readonly) || all(AccessMode::is_read_only),
        single_publisher: cap.mode.is_single_publisher() || all(AccessMode::is_single_publisher),
    })
}

impl Driver {
    pub fn controller_publish(
        &self,
        id: &str,
        node: &str,
        cap: &Capability,
        readonly: bool,
    ) -> Result<()> {
        let mut rec = self.volume(id)?;
        if !rec.shared && node != rec.node_id {
            if let Some(other) = rec.attachments.keys().next() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is published to node {other:?}; it lives there and cannot be \
                     published to node {node:?}"
                )));
            }
            return Err(Error::NotFound(format!(
                "node {node:?} cannot reach volume {id}: it lives on node {:?}",
                rec.node_id
            )));
        }
        if rec.shared && node != self.cfg.node_id {
            let known = self.layout.node_entry(node).is_some_and(|e| e.exists());
            if !known {
                return Err(Error::NotFound(format!(
                    "node {node:?} does not use the shared root of volume {id}: no localvol \
                     with --shared-root has run there"
                )));
            }
        }
        let _guard = self.lock(id)?;
        let _across = self.lock_across_nodes(id, rec.shared)?;
        rec = self.volume(id)?;
        // Already attached here: the spec's answer to anything but the same request
        // is ALREADY_EXISTS ("published but is incompatible"), also for a capability
        // the volume cannot serve at all, which publish_rules would refuse.
        if let Some(existing) = rec.attachments.get(node) {
            let same = publish_rules(&rec, cap, readonly).is_ok_and(|rules| {
                existing.readonly == rules.readonly
                    && existing.mode.is_none_or(|m| m == cap.mode)
                    && existing.block.is_none_or(|b| b == cap.is_block())
            });
            if same {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "volume {id} is already published to node {node:?} {}{}{}; unpublish it first to change that",
                if existing.readonly { "read-only" } else { "read-write" },
                existing.mode.map(|m| format!(" as {m:?}")).unwrap_or_default(),
                match existing.block {
                    Some(true) => " for block access",
                    Some(false) => " for filesystem access",
                    None => "",
                }
            )));
        }
        let rules = publish_rules(&rec, cap, readonly)?;
        let attached: Vec<String> = rec.attachments.keys().cloned().collect();
        // Several nodes only when both the request and every created mode allow it.
        let multi =
            cap.mode.is_multi_node() && rec.capabilities.iter().all(|c| c.mode.is_multi_node());
        let mode = if multi {
            cap.mode
        } else {
            AccessMode::SingleNodeWriter
        };
        access::check_controller_publish(mode, node, &attached)
            .map_err(Error::FailedPrecondition)?;
        if multi && mode == AccessMode::MultiNodeSingleWriter && !rules.readonly {
            if let Some((writer, _)) = rec.attachments.iter().find(|(_, a)| !a.readonly) {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is MULTI_NODE_SINGLE_WRITER and node {writer:?} already writes to it; \
                     publish read-only here or unpublish it there first"
                )));
            }
        }
        rec.attachments.insert(
            node.to_string(),
            Attachment {
                readonly: rules.readonly,
                mode: Some(cap.mode),
                block: Some(cap.is_block()),
            },
        );
        self.store.put_volume(&rec)?;
        tracing::info!(volume = %id, node, readonly = rules.readonly, "volume published to node");
        Ok(())
    }

    /// Unpublishes from `node`, or from every node when `node` is empty. An unknown
    /// volume or node is already unpublished.
    pub fn controller_unpublish(&self, id: &str, node: &str) -> Result<()> {
        if !ids::is_valid_id(Kind::Volume, id) {
            return Ok(());
        }
        let _guard = self.lock(id)?;
        let Ok(rec) = self.volume(id) else {
            return Ok(());
        };
        // Read again once no other node changes it.
        let _across = self.lock_across_nodes(id, rec.shared)?;
        let Ok(mut rec) = self.volume(id) else {
            return Ok(());
        };
        let before = rec.attachments.len();
        if node.is_empty() {
            rec.attachments.clear();
        } else {
            rec.attachments.remove(node);
        }
        if rec.attachments.len() != before {
            self.store.put_volume(&rec)?;
            tracing::info!(volume = %id, node, "volume unpublished from node");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::AccessType;
    use crate::params::VolumeType;
    use std::collections::BTreeMap;

    fn rec(modes: &[AccessMode], block: bool) -> VolumeRecord {
        let t = |m| Capability {
            access_type: if block {
                AccessType::Block
            } else {
                AccessType::Mount {
                    fs_type: String::new(),
                    flags: vec![],
                }
            },
            mode: m,
        };
        VolumeRecord {
            id: "vol-x".into(),
            name: "n".into(),
            volume_type: if block {
                VolumeType::Loop
            } else {
                VolumeType::Dir
            },
            capacity_bytes: 1,
            parameters: BTreeMap::new(),
            capabilities: modes.iter().map(|m| t(*m)).collect(),
            fs_type: None,
            shared: true,
            source: None,
            node_id: String::new(),
            created_unix: 0,
            attachments: BTreeMap::new(),
            formatting: false,
            block_staging: None,
            grown_for: None,
        }
    }

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
    fn the_stricter_promise_wins() {
        let rwop = rec(&[AccessMode::SingleNodeSingleWriter], false);
        let r = publish_rules(&rwop, &mount(AccessMode::SingleNodeMultiWriter), false).unwrap();
        assert!(r.single_publisher);
        let rox = rec(&[AccessMode::MultiNodeReaderOnly], false);
        let r = publish_rules(&rox, &mount(AccessMode::MultiNodeMultiWriter), false).unwrap();
        assert!(r.readonly);
        let rwx = rec(&[AccessMode::MultiNodeMultiWriter], false);
        let r = publish_rules(&rwx, &mount(AccessMode::MultiNodeMultiWriter), false).unwrap();
        assert!(!r.readonly && !r.single_publisher);
    }

    #[test]
    fn block_and_mount_do_not_mix() {
        let fs = rec(&[AccessMode::SingleNodeWriter], true);
        let err = publish_rules(&fs, &mount(AccessMode::SingleNodeWriter), false).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    }
}
