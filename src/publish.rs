//! Node operations: staging a volume at the node's global path, publishing it into
//! pods, and undoing both. What is mounted where is read from the kernel on every
//! call, so a restart or a reboot never leaves a stale belief behind.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::access::{self, Capability};
use crate::attach::publish_rules;
use crate::error::{Context, Error, Result};
use crate::mount::{self, Flags, MountEntry, MountKey, Usage};
use crate::params::VolumeType;
use crate::store::VolumeRecord;
use crate::volumes::{Condition, Driver};

#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub target_path: PathBuf,
    pub capability: Capability,
    pub readonly: bool,
}

impl Driver {
    /// The key that every mount of this volume's data carries on this node, or None
    /// when the volume is not reachable as a mount source right now.
    fn volume_key(&self, rec: &VolumeRecord, table: &[MountEntry]) -> Result<Option<MountKey>> {
        let data = self.data_path(rec);
        if !data.exists() {
            return Ok(None);
        }
        Ok(Some(mount::key_of(table, &data)?))
    }


    pub fn stage(&self, id: &str, staging: &Path, cap: &Capability) -> Result<()> {
        let rec = self.volume(id)?;
        let rules = publish_rules(&rec, cap, false)?;
        let _guard = self.lock(id)?;
        let table = mount::mounts()?;
        let key = self.volume_key(&rec, &table)?.ok_or_else(|| {
            Error::FailedPrecondition(format!("volume {id}'s data is missing from this node"))
        })?;
        let ro = rules.readonly;
        if let Some(m) = mount::mount_at(&table, staging) {
            if m.key() == key {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "staging path {} already holds another mount ({})",
                staging.display(),
                m.source
            )));
        }
        match rec.volume_type {
            VolumeType::Dir => {
                fs::create_dir_all(staging).ctx(|| format!("create {}", staging.display()))?;
                let flags = Flags::parse(cap.mount_flags())?.readonly(ro);
                mount::bind(&self.data_path(&rec), staging, &flags)?;
            }
            VolumeType::Loop => {
                return Err(Error::InvalidArgument(
                    "loop volumes are not supported yet".into(),
                ))
            }
        }
        tracing::info!(volume = %id, staging = %staging.display(), "volume staged");
        Ok(())
    }

    pub fn unstage(&self, id: &str, staging: &Path) -> Result<()> {
        let rec = self.volume(id)?;
        let _guard = self.lock(id)?;
        self.unmount_volume_at(&rec, staging)?;
        tracing::info!(volume = %id, staging = %staging.display(), "volume unstaged");
        Ok(())
    }

    /// Unmounts the volume from `path` if it is mounted there; refuses to unmount
    /// something that is not this volume.
    fn unmount_volume_at(&self, rec: &VolumeRecord, path: &Path) -> Result<bool> {
        let table = mount::mounts()?;
        let Some(m) = mount::mount_at(&table, path) else {
            return Ok(false);
        };
        if let Some(key) = self.volume_key(rec, &table)? {
            if m.key() != key {
                return Err(Error::FailedPrecondition(format!(
                    "{} holds a mount of {}, not of volume {}; leaving it",
                    path.display(),
                    m.source,
                    rec.id
                )));
            }
        }
        mount::unmount_all(path)?;
        Ok(true)
    }

    pub fn publish(&self, req: &PublishRequest) -> Result<()> {
        let rec = self.volume(&req.volume_id)?;
        let rules = publish_rules(&rec, &req.capability, req.readonly)?;
        let _guard = self.lock(&rec.id)?;
        let table = mount::mounts()?;
        let key = self.volume_key(&rec, &table)?.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "volume {}'s data is missing from this node",
                rec.id
            ))
        })?;
        match mount::mount_at(&table, &req.staging_path) {
            Some(m) if m.key() == key => {}
            _ => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is not staged at {}; call NodeStageVolume first",
                    rec.id,
                    req.staging_path.display()
                )))
            }
        }
        // Attached read-only to this node by the controller: read-only here too.
        let ro = rules.readonly
            || rec.attachments.get(&self.cfg.node_id).is_some_and(|a| a.readonly);
        let target = mount::canonical(&req.target_path);
        if let Some(m) = mount::mount_at(&table, &target) {
            if m.key() == key && m.is_readonly() == ro {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "target {} is already mounted ({}{}) differently from this request",
                target.display(),
                if m.key() == key {
                    "this volume, "
                } else {
                    "another volume, "
                },
                if m.is_readonly() {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        let staging = mount::canonical(&req.staging_path);
        let others: Vec<String> = mount::mounts_of(&table, &key)
            .filter(|m| m.mount_point != staging && m.mount_point != target)
            .map(|m| m.mount_point.display().to_string())
            .collect();
        access::check_node_publish(rules.single_publisher, &others)
            .map_err(Error::FailedPrecondition)?;

        if req.capability.is_block() {
            return Err(Error::InvalidArgument(
                "block volumes are not supported yet".into(),
            ));
        }
        match fs::create_dir(&req.target_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Error::io(
                    format!("create {}", req.target_path.display()),
                    e,
                ))
            }
        }
        let flags = Flags::parse(req.capability.mount_flags())?.readonly(ro);
        if let Err(e) = mount::bind(&req.staging_path, &req.target_path, &flags) {
            let _ = fs::remove_dir(&req.target_path);
            return Err(e);
        }
        tracing::info!(volume = %rec.id, target = %req.target_path.display(), readonly = ro, "volume published");
        Ok(())
    }

    pub fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        let rec = self.volume(id)?;
        let _guard = self.lock(id)?;
        self.unmount_volume_at(&rec, target)?;
        match fs::symlink_metadata(target) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("stat {}", target.display()), e)),
            Ok(m) if m.is_dir() => {
                fs::remove_dir(target).ctx(|| format!("remove {}", target.display()))?
            }
            Ok(_) => fs::remove_file(target).ctx(|| format!("remove {}", target.display()))?,
        }
        tracing::info!(volume = %id, target = %target.display(), "volume unpublished");
        Ok(())
    }

    /// Usage and condition of the volume as seen at `path` (a staging or target path).
    pub fn stats(&self, id: &str, path: &Path) -> Result<(Usage, Condition)> {
        let rec = self.volume(id)?;
        if fs::symlink_metadata(path).is_err() {
            return Err(Error::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        let table = mount::mounts()?;
        let mut condition = self.condition(&rec);
        if !condition.abnormal {
            let key = self.volume_key(&rec, &table)?;
            match mount::mount_at(&table, path) {
                Some(m) if Some(m.key()) == key => {}
                _ => {
                    condition = Condition::abnormal(format!(
                        "volume {} is not mounted at {}",
                        rec.id,
                        path.display()
                    ))
                }
            }
        }
        Ok((mount::usage(path)?, condition))
    }
}
