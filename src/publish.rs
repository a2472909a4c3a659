//! Node operations: staging a volume at the node's global path, publishing it into
//! pods, and undoing both. What is mounted where is read from the kernel on every
//! call, so a restart or a reboot never leaves a stale belief behind.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use std::os::unix::fs::OpenOptionsExt;

use crate::access::{self, Capability};
use crate::attach::{publish_rules, PublishRules};
use crate::backend::{btrfs, loopfile, DirLimits};
use crate::error::{Context, Error, Result};
use crate::faults;
use crate::filesystem::{self, Content};
use crate::locks::KeyGuard;
use crate::loopdev;
use crate::mount::{self, Flags, MountEntry, Usage};
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
    /// Refuses a staging or target path inside the driver's root: a CO's paths
    /// are its own (the kubelet's directory), and one in the root would mount
    /// over, or remove, the driver's own data (another volume's empty directory).
    pub fn outside_own_dirs(&self, what: &str, path: &Path) -> Result<()> {
        // Parents a stage would make are resolved too (`canonical`): a symlink
        // among them would take the made directories into the root.
        let at = mount::canonical(path);
        match self.own_dirs.iter().find(|own| at.starts_with(own)) {
            Some(own) => Err(Error::InvalidArgument(format!(
                "{what} {} lies inside the driver's root {}; stage and publish volumes \
                 elsewhere (the kubelet's directory)",
                path.display(),
                own.display()
            ))),
            None => Ok(()),
        }
    }

    /// Whether `m` shows this volume's data (its directory, its loop filesystem, or
    /// its loop device node).
    fn is_ours(&self, rec: &VolumeRecord, m: &MountEntry) -> Result<bool> {
        Ok(self.volume_keys(rec)?.contains(&m.key()))
    }

    pub fn stage(&self, id: &str, staging: &Path, cap: &Capability) -> Result<()> {
        let rec = self.volume(id)?;
        // Attached read-only to this node by the controller: staged read-only, and
        // never checked or grown (both write).
        let attached_ro = rec
            .attachments
            .get(&self.cfg.node_id)
            .is_some_and(|a| a.readonly);
        let rules = node_rules(&rec, cap, attached_ro)?;
        let _guard = self.lock(id)?;
        let _path_guard = self.lock_path(staging)?;
        // Read again under the lock: a stage may write the record back.
        let rec = self.volume(id)?;
        let data = self.data_path(&rec);
        if fs::symlink_metadata(&data).is_err() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id}'s data {} is missing from this node",
                data.display()
            )));
        }
        let flags = Flags::parse(cap.mount_flags())?.readonly(rules.readonly);
        if let Some(m) = mount::mount_at(staging)? {
            if !self.is_ours(&rec, &m)? {
                return Err(Error::AlreadyExists(format!(
                    "staging path {} already holds another mount ({})",
                    staging.display(),
                    m.source
                )));
            }
            // Staged already: by this request, or by one it does not agree with.
            let asked_fs = cap.fs_type();
            if m.is_readonly() != flags.is_readonly()
                || !flags.agree_with(&m.options)
                || (rec.volume_type == VolumeType::Loop
                    && !asked_fs.is_empty()
                    && asked_fs != m.fs_type)
            {
                return Err(Error::AlreadyExists(format!(
                    "volume {id} is already staged at {} ({}, {}) differently from this request; \
                     unstage it first",
                    staging.display(),
                    m.fs_type,
                    m.options
                )));
            }
            return Ok(());
        }
        match rec.volume_type {
            VolumeType::Dir => {
                make_staging(staging)?;
                mount::bind_via(self.volumes_mount.as_ref(), &data, staging, &flags)?;
            }
            VolumeType::Loop => {
                // Staged for block access at another path, its device still
                // attached: one staging path per volume (a path kept from before a
                // reboot, with no device, is simply replaced).
                if let Some(at) = Self::block_staged_elsewhere(&rec, staging) {
                    if self.loop_device(&rec).is_some() {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {id} is staged for block access at {}; unstage it there \
                             before staging it at {}",
                            at.display(),
                            staging.display()
                        )));
                    }
                }
                // In use elsewhere on this node: a filesystem here would be a second
                // writer of the blocks of a filesystem mounted there, or of a device
                // published for block access; so would a block stage beside a
                // mounted filesystem.
                let elsewhere: Vec<String> = self
                    .mounts_of_volume(&rec)?
                    .iter()
                    .filter(|m| !cap.is_block() || m.fs_type != "devtmpfs")
                    .map(|m| m.mount_point.display().to_string())
                    .collect();
                if !elsewhere.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} is in use on this node at {elsewhere:?}; unpublish and \
                         unstage it there before staging it at {}",
                        staging.display()
                    )));
                }
                make_staging(staging)?;
                // The staging path is kept (or a stale one dropped) before the
                // device is attached, so that a stage killed after attaching is
                // undone by an unstage at its own path.
                let block_at = cap.is_block().then(|| mount::canonical(staging));
                let rec = self.change_record(id, |r| r.block_staging = block_at)?;
                let (dev, attached_here) = loopdev::attach_reporting(&data)?;
                faults::point("stage.after_attach");
                // A stage that fails after attaching must not leak the device: the
                // kubelet never unstages a volume whose stage did not succeed. The
                // device may be left from a stage killed after attaching: nothing
                // mounted from it, it is this failed stage's to detach.
                let detach_on_error = |e: Error| {
                    if attached_here || self.mounts_of_volume(&rec).is_ok_and(|m| m.is_empty()) {
                        let _ = loopdev::detach_device(&dev);
                    }
                    e
                };
                if cap.is_block() {
                    // Handed out raw from now on: whatever is written there is data.
                    self.change_record(id, |r| r.formatting = false)
                        .map_err(detach_on_error)?;
                }
                if !cap.is_block() {
                    let (fs_type, smaller) = (|| {
                        let fs_type = self.filesystem_for(&rec, cap)?;
                        self.prepare_filesystem(&rec, &dev, &fs_type)?;
                        faults::point("stage.after_format");
                        // A volume restored or expanded while not staged holds a smaller
                        // filesystem than its device: grow it (ext4 before mounting, xfs
                        // only can once mounted).
                        let smaller = !rules.readonly
                            && self.fs_smaller_than_device(&rec.id, &dev, &fs_type)?;
                        if smaller && fs_type == "ext4" {
                            filesystem::grow_offline(&dev.path())?;
                            self.note_grown(&rec.id, &dev)?;
                        }
                        let mut flags = flags.clone();
                        if fs_type == "xfs" {
                            // Restores and clones carry their source's filesystem UUID,
                            // which xfs otherwise refuses to mount twice.
                            flags.fs_options.push("nouuid".into());
                        }
                        filesystem::mount(&dev.path(), staging, &fs_type, &flags)?;
                        Ok((fs_type, smaller))
                    })()
                    .map_err(detach_on_error)?;
                    // Mounted now, so the volume is staged: a failed growth must not
                    // fail the stage (a retry would find it staged and skip it);
                    // NodeExpandVolume grows it later.
                    if smaller && fs_type == "xfs" {
                        match filesystem::grow(&dev.path(), staging, &fs_type) {
                            Ok(()) => self.note_grown(id, &dev)?,
                            Err(e) => {
                                tracing::warn!(volume = %id, error = %e, "growing the filesystem at stage failed")
                            }
                        }
                    }
                }
            }
        }
        faults::point("stage.after_mount");
        tracing::info!(volume = %id, staging = %staging.display(), "volume staged");
        Ok(())
    }

    /// Taken after the volume's lock by the calls that mount at a path the request
    /// names: two stages (or publishes) of different volumes at one path would
    /// otherwise each find it empty, and stack their mounts there.
    fn lock_path(&self, path: &Path) -> Result<KeyGuard> {
        self.locks
            .lock(&format!("path:{}", mount::canonical(path).display()))
    }

    /// Writes the volume's record back with `change` made, if it changes it. The
    /// record is read afresh (under the volume's lock, which the caller holds), so
    /// nothing written since the caller read it is undone.
    fn change_record(
        &self,
        id: &str,
        change: impl FnOnce(&mut VolumeRecord),
    ) -> Result<VolumeRecord> {
        let now = self.volume(id)?;
        let mut changed = now.clone();
        change(&mut changed);
        if changed != now {
            self.store.put_volume(&changed)?;
        }
        Ok(changed)
    }

    /// Whether the volume's block stage is kept at `path`.
    fn block_staged_at(rec: &VolumeRecord, path: &Path) -> bool {
        rec.block_staging.is_some() && Self::block_staged_elsewhere(rec, path).is_none()
    }

    /// The path of the volume's block stage, if it has one at another path than
    /// `path`. Records from before that path was kept take any path for it.
    fn block_staged_elsewhere<'r>(rec: &'r VolumeRecord, path: &Path) -> Option<&'r Path> {
        rec.block_staging
            .as_deref()
            .filter(|at| *at != mount::canonical(path))
    }

    /// The filesystem a loop mount volume holds: the record's, which a capability
    /// may repeat but not contradict.
    fn filesystem_for(&self, rec: &VolumeRecord, cap: &Capability) -> Result<String> {
        let fs_type = rec.fs_type.clone().unwrap_or_else(|| "ext4".into());
        let asked = cap.fs_type();
        if !asked.is_empty() && asked != fs_type {
            return Err(Error::FailedPrecondition(format!(
                "volume {} holds {fs_type}; the capability asks for {asked}",
                rec.id
            )));
        }
        Ok(fs_type)
    }

    /// Formats the device only when it holds nothing: data is never formatted over.
    ///
    /// Bytes without a signature we know are what an interrupted mkfs leaves, or
    /// data. A volume only ever staged as a filesystem, made empty, can hold
    /// nothing else. One that could hold data (handed out as a raw device, or made
    /// from a source) is formatted over such bytes only if its record says a
    /// format of ours was started; that intent is written before its mkfs and
    /// cleared before its device is handed out raw.
    fn prepare_filesystem(
        &self,
        rec: &VolumeRecord,
        dev: &loopdev::LoopDevice,
        fs_type: &str,
    ) -> Result<()> {
        let may_hold_data = rec.source.is_some() || rec.capabilities.iter().any(|c| c.is_block());
        let format = |rec: &VolumeRecord| {
            if may_hold_data && !rec.formatting {
                self.change_record(&rec.id, |r| r.formatting = true)?;
                faults::point("stage.format_marked");
            }
            filesystem::format(&dev.path(), fs_type)
        };
        // Zeros where a signature would be are not proof of an empty volume when
        // it may hold data: only a backing file with nothing written is.
        let empty = || -> Result<bool> {
            Ok(!may_hold_data || rec.formatting || !loopfile::holds_data(&self.data_path(rec))?)
        };
        match filesystem::probe(&dev.path())? {
            Content::Empty if empty()? => format(rec),
            Content::Empty => Err(Error::FailedPrecondition(format!(
                "volume {} holds data but no filesystem signature at its start (written \
                 through its block device or copied from its source); refusing to format it",
                rec.id
            ))),
            Content::Unrecognized if !may_hold_data || rec.formatting => format(rec),
            Content::Unrecognized => Err(Error::FailedPrecondition(format!(
                "volume {} holds data of a kind this driver does not recognise (no filesystem \
                 signature), written through its block device or copied from its source; \
                 refusing to format it",
                rec.id
            ))),
            Content::Filesystem(f) if f == fs_type => Ok(()),
            Content::Filesystem(f) => Err(Error::FailedPrecondition(format!(
                "volume {} holds a {f} filesystem, not {fs_type}; refusing to format it",
                rec.id
            ))),
            Content::Other(what) => Err(Error::FailedPrecondition(format!(
                "volume {} holds {what}, not a filesystem; refusing to format it",
                rec.id
            ))),
        }
    }

    /// Whether the filesystem could take more of its device than it spans. Sizes
    /// grow by whole MiB, so any shortfall is looked at, once per device size:
    /// growth can leave a tail unused (resize2fs drops a last block group too
    /// small for its metadata, xfs_growfs a last allocation group under 64
    /// blocks), and an e2fsck before every stage would cost minutes on a large
    /// volume.
    fn fs_smaller_than_device(
        &self,
        id: &str,
        dev: &loopdev::LoopDevice,
        fs_type: &str,
    ) -> Result<bool> {
        let device = dev.size_bytes()?;
        if self.volume(id)?.grown_for == Some(device) {
            return Ok(false);
        }
        Ok(filesystem::size_of(&dev.path(), fs_type)?.is_some_and(|fs| fs + 4096 <= device))
    }

    /// Records that the filesystem was grown for the device's present size.
    fn note_grown(&self, id: &str, dev: &loopdev::LoopDevice) -> Result<()> {
        let bytes = dev.size_bytes()?;
        self.change_record(id, |r| r.grown_for = Some(bytes))?;
        tracing::info!(volume = %id, device_bytes = bytes, "filesystem grown at stage");
        Ok(())
    }

    pub fn unstage(&self, id: &str, staging: &Path) -> Result<()> {
        self.volume(id)?;
        let _guard = self.lock(id)?;
        // Read under the lock: an unstage may write the record back.
        let rec = self.volume(id)?;
        if rec.volume_type == VolumeType::Loop {
            let staging = mount::canonical(staging);
            let mounts = self.mounts_of_volume(&rec)?;
            let here = mounts.iter().any(|m| m.mount_point == staging);
            // A filesystem is staged where it is mounted: mounted elsewhere and not
            // here, it is staged at another path, and this one has nothing to undo
            // (the spec's answer is OK). A block stage mounts nothing (a device
            // bound somewhere is a publish still in place): its path is recorded.
            let filesystem = mounts.iter().any(|m| m.fs_type != "devtmpfs");
            let block_elsewhere = Self::block_staged_elsewhere(&rec, &staging);
            if (filesystem && !here) || (!filesystem && block_elsewhere.is_some()) {
                tracing::info!(volume = %id, staging = %staging.display(), "volume not staged here; nothing to unstage");
                return Ok(());
            }
            let published: Vec<_> = mounts
                .into_iter()
                .filter(|m| m.mount_point != staging)
                .map(|m| m.mount_point.display().to_string())
                .collect();
            if !published.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is still published at {published:?}; unpublish it first"
                )));
            }
        }
        if let At::Other(source) = self.unmount_volume_at(&rec, staging)? {
            // Not staged there, so nothing to undo there (the spec's answer is OK).
            tracing::info!(volume = %id, staging = %staging.display(), %source, "another mount is there; left in place");
        }
        faults::point("unstage.after_unmount");
        if rec.volume_type == VolumeType::Loop {
            let data = self.data_path(&rec);
            loopdev::detach(&data)?;
            // Data removed behind our back stays attached to its deleted file;
            // once no mount uses the device, unstaging is its last chance to go.
            // With the file in place there is none to look for (a volume's file is
            // never made again while attached), so the common case scans nothing.
            let deleted = if fs::symlink_metadata(&data).is_ok() {
                vec![]
            } else {
                loopdev::find_deleted(&data)
            };
            let table = if deleted.is_empty() {
                vec![]
            } else {
                mount::mounts()?
            };
            for d in deleted {
                if !table.iter().any(|m| m.dev == d.dev) {
                    loopdev::detach_device(&d)?;
                    tracing::warn!(volume = %id, device = %d.path().display(), "detached a loop device whose backing file was removed");
                }
            }
            self.change_record(id, |r| r.block_staging = None)?;
        }
        tracing::info!(volume = %id, staging = %staging.display(), "volume unstaged");
        Ok(())
    }

    /// Unmounts the volume from `path` if it is mounted there (every copy of it
    /// stacked there). A mount that cannot be shown to be this volume's is left in
    /// place: the path comes from the request, and this volume is not there.
    fn unmount_volume_at(&self, rec: &VolumeRecord, path: &Path) -> Result<At> {
        let keys = self.volume_keys(rec)?;
        let mut unmounted = false;
        for _ in 0..16 {
            let Some(m) = mount::mount_at(path)? else {
                return Ok(if unmounted {
                    At::Unmounted
                } else {
                    At::Nothing
                });
            };
            let ours = keys.contains(&m.key()) || keys.is_empty() && self.shows_lost_data(rec, &m);
            if !ours && !unmounted {
                return Ok(At::Other(m.source));
            }
            if !ours {
                return Err(Error::FailedPrecondition(format!(
                    "{} holds a mount of {} under volume {}'s mount, now unmounted; leaving it",
                    path.display(),
                    m.source,
                    rec.id
                )));
            }
            mount::unmount(path)?;
            unmounted = true;
        }
        Err(Error::Internal(format!(
            "{} stays mounted after 16 unmounts",
            path.display()
        )))
    }

    /// A mount of a volume whose data was removed behind the driver's back no
    /// longer matches the volume's keys. It is still recognised: a directory
    /// volume's by its root, which names the volume, on the filesystem of the
    /// volumes; a loop volume's by the device still attached to the deleted file
    /// (its filesystem, or its device node bound for a block publish).
    fn shows_lost_data(&self, rec: &VolumeRecord, m: &mount::MountEntry) -> bool {
        let data = self.data_path(rec);
        if fs::symlink_metadata(&data).is_ok() {
            return false;
        }
        match rec.volume_type {
            VolumeType::Dir => {
                let names_it = m
                    .root
                    .iter()
                    .any(|c| c.to_str().is_some_and(|c| c.starts_with(rec.id.as_str())));
                names_it
                    && mount::key_of(&self.layout.volumes_dir(rec.shared))
                        .is_ok_and(|k| k.dev == m.dev)
            }
            VolumeType::Loop => loopdev::find_deleted(&data).iter().any(|d| {
                d.dev == m.dev
                    || (m.fs_type == "devtmpfs" && m.root == Path::new("/").join(&d.name))
            }),
        }
    }

    pub fn publish(&self, req: &PublishRequest) -> Result<()> {
        let rec = self.volume(&req.volume_id)?;
        let rules = node_rules(&rec, &req.capability, req.readonly)?;
        let _guard = self.lock(&rec.id)?;
        let _path_guard = self.lock_path(&req.target_path)?;
        let keys = self.volume_keys(&rec)?;
        let not_staged = || {
            Error::FailedPrecondition(format!(
                "volume {} is not staged at {}; call NodeStageVolume first",
                rec.id,
                req.staging_path.display()
            ))
        };
        if keys.is_empty() {
            return Err(not_staged());
        }
        let block = req.capability.is_block();
        // A block volume is staged by attaching its device; a mount volume by a mount.
        let (source, staged_ro) = if block {
            if Self::block_staged_elsewhere(&self.volume(&rec.id)?, &req.staging_path).is_some() {
                return Err(not_staged());
            }
            // Its device under a mounted filesystem is not for a pod to write.
            if let Some(m) = self
                .mounts_of_volume(&rec)?
                .into_iter()
                .find(|m| m.fs_type != "devtmpfs")
            {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is staged as a filesystem at {}, not for block access",
                    rec.id,
                    m.mount_point.display()
                )));
            }
            let dev = self.loop_device(&rec).ok_or_else(not_staged)?;
            // Handed out raw from now on: whatever a pod writes there is data,
            // never to be formatted over (as a block stage marks it).
            self.change_record(&rec.id, |r| r.formatting = false)?;
            (dev.path(), false)
        } else {
            match mount::mount_at(&req.staging_path)? {
                Some(m) if keys.contains(&m.key()) => (req.staging_path.clone(), m.is_readonly()),
                _ => return Err(not_staged()),
            }
        };
        // Attached read-only to this node by the controller: read-only here too.
        let ro = rules.readonly
            || rec
                .attachments
                .get(&self.cfg.node_id)
                .is_some_and(|a| a.readonly);
        let mut flags = Flags::parse(req.capability.mount_flags())?.readonly(ro);
        if rec.volume_type == VolumeType::Loop {
            // The kubelet sends a PV's mount options to both calls. Options of the
            // filesystem itself (discard, data=...) were applied when it was mounted
            // at stage; the bind here takes the per-mount ones.
            flags.fs_options.clear();
        }
        // What this request's mount is: read-only also when a mount flag says "ro"
        // or the staging mount it is cloned from is read-only, so that the same
        // request again finds its own mount.
        let ro = flags.is_readonly() || staged_ro;
        let target = mount::canonical(&req.target_path);
        if let Some(m) = mount::mount_at(&target)? {
            let ours = keys.contains(&m.key());
            if ours && m.is_readonly() == ro && flags.agree_with(&m.options) {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "target {} is already mounted ({}, {}) differently from this request",
                target.display(),
                if ours {
                    "this volume"
                } else {
                    "another volume"
                },
                m.options
            )));
        }
        // Only a single-publisher volume needs every mount of its data: the one
        // question here whose cost grows with the node's mounts.
        let others: Vec<String> = if rules.single_publisher {
            let staging = mount::canonical(&req.staging_path);
            mount::mounts_showing(&keys)?
                .iter()
                .filter(|m| m.mount_point != staging && m.mount_point != target)
                .map(|m| m.mount_point.display().to_string())
                .collect()
        } else {
            vec![]
        };
        access::check_node_publish(rules.single_publisher, &others)
            .map_err(Error::FailedPrecondition)?;

        let created = make_target(&req.target_path, block, &rec.id)?;
        faults::point("publish.after_target");
        if let Err(e) = mount::bind(&source, &req.target_path, &flags) {
            if created {
                let _ = remove_target(&req.target_path);
            }
            return Err(e);
        }
        tracing::info!(volume = %rec.id, target = %req.target_path.display(), readonly = ro, block, "volume published");
        Ok(())
    }

    pub fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        let rec = self.volume(id)?;
        let _guard = self.lock(id)?;
        match self.unmount_volume_at(&rec, target)? {
            At::Other(source) => Err(Error::FailedPrecondition(format!(
                "{} holds a mount of {source}, not of volume {id}; leaving it",
                target.display()
            ))),
            // The spec has the plugin remove the target it made: the one it just
            // unmounted the volume from (an empty directory or file).
            At::Unmounted => {
                remove_target(target)?;
                tracing::info!(volume = %id, target = %target.display(), "volume unpublished");
                Ok(())
            }
            // Nothing of the volume there (after a reboot, or a retry): the target
            // is removed only if it carries this volume's mark (`mark_target`).
            At::Nothing if marked_for(target, id) => remove_target(target),
            At::Nothing => Ok(()),
        }
    }

    /// Grows what the node sees of an expanded volume: the loop device's size and
    /// the filesystem on it, online. Directory volumes need nothing here. The
    /// volume must be staged or published at `path` before anything grows: the
    /// call is the kubelet's for a mounted volume, not a way to expand another.
    pub fn node_expand(
        &self,
        id: &str,
        path: &Path,
        required: i64,
        limit: i64,
        block: bool,
    ) -> Result<u64> {
        self.volume(id)?;
        if fs::symlink_metadata(path).is_err() {
            return Err(Error::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        let _guard = self.lock(id)?;
        let rec = self.volume(id)?;
        let keys = self.volume_keys(&rec)?;
        let mounted = mount::mount_at(path)?.filter(|m| keys.contains(&m.key()));
        let not_here = || {
            Error::NotFound(format!(
                "volume {id} is not staged or published at {}",
                path.display()
            ))
        };
        // Here means: its filesystem or its device node (a block publish) mounted
        // at the path, or the path its block stage was kept at (which mounts
        // nothing). Anything else is not the volume, whatever the request says.
        let block_staged_here =
            rec.volume_type == VolumeType::Loop && Self::block_staged_at(&rec, path);
        if mounted.is_none() && !block_staged_here {
            return Err(not_here());
        }
        let dev = match rec.volume_type {
            VolumeType::Dir => None,
            VolumeType::Loop => Some(self.loop_device(&rec).ok_or_else(not_here)?),
        };
        // Without controller expansion (or if it has not run) the node grows the
        // data itself; when the controller already did, this is a no-op.
        let rec = self.grow_locked(&rec.id, required, limit)?;
        let Some(dev) = dev else {
            return Ok(rec.capacity_bytes);
        };
        loopdev::refresh_size(&dev)?;
        faults::point("node_expand.after_refresh");
        let size = dev.size_bytes()?;
        if required > 0 && size < required as u64 {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is {size} bytes, less than the {required} asked; expand it through \
                 the controller first"
            )));
        }
        // A raw device has no filesystem to grow.
        let Some(m) = mounted.filter(|m| !block && m.fs_type != "devtmpfs") else {
            return Ok(size);
        };
        // A read-only mount cannot grow: a read-write one of the same filesystem
        // can (the staging mount under a read-only publish); without one, the
        // next read-write stage grows it.
        let grow_at = if m.is_readonly() {
            match self
                .mounts_of_volume(&rec)?
                .into_iter()
                .find(|w| w.fs_type == m.fs_type && !w.is_readonly())
            {
                Some(w) => w.mount_point,
                None => return Ok(size),
            }
        } else {
            path.to_path_buf()
        };
        filesystem::grow(&dev.path(), &grow_at, &m.fs_type)?;
        tracing::info!(volume = %id, bytes = size, "filesystem grown");
        Ok(size)
    }

    /// Usage and condition of the volume as seen at `path` (a staging or target
    /// path). The numbers are the volume's own where its size is enforced: a loop
    /// volume's filesystem or device, a btrfs qgroup's limit, a project quota.
    pub fn stats(&self, id: &str, path: &Path) -> Result<(VolumeStats, Condition)> {
        let rec = self.volume(id)?;
        if fs::symlink_metadata(path).is_err() {
            return Err(Error::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        let keys = self.volume_keys(&rec)?;
        let condition = self.condition(&rec);
        let at_path = mount::mount_at(path)?;
        let mounted = at_path.as_ref().filter(|m| keys.contains(&m.key()));
        if let Some(dev) = self.loop_device(&rec) {
            // Its device bound at a publish target; or, staged for block access
            // (which mounts nothing), the staging directory: a filesystem of the
            // volume mounted nowhere means its device is handed out raw.
            let block_staged = || {
                path.is_dir()
                    && at_path.is_none()
                    && Self::block_staged_elsewhere(&rec, path).is_none()
                    && self
                        .mounts_of_volume(&rec)
                        .is_ok_and(|ms| ms.iter().all(|m| m.fs_type == "devtmpfs"))
            };
            if mounted.is_some_and(|m| m.root != Path::new("/"))
                || (mounted.is_none() && block_staged())
            {
                return Ok((
                    VolumeStats::Block {
                        bytes: dev.size_bytes()?,
                    },
                    condition,
                ));
            }
        }
        // Data lost behind the driver's back leaves no key to match: its mount is
        // known by what it still shows, and answered there with its condition.
        let lost_here = || {
            at_path
                .as_ref()
                .is_some_and(|m| self.shows_lost_data(&rec, m))
        };
        if mounted.is_none() && !(condition.abnormal && lost_here()) {
            // What is at the path is not this volume: its usage would be another
            // filesystem's.
            return Err(Error::NotFound(format!(
                "volume {} is not staged or published at {}",
                rec.id,
                path.display()
            )));
        }
        let mut usage = mount::usage(path)?;
        if let (DirLimits::Btrfs { uuid, quota: true }, VolumeType::Dir, false) =
            (&self.dir_limits, rec.volume_type, rec.shared)
        {
            let data = self.data_path(&rec);
            if let Some((used, limit)) = btrfs::subvolume_id(&data)
                .ok()
                .and_then(|sv| btrfs::usage(uuid, sv))
                .filter(|(_, limit)| *limit > 0 && *limit != u64::MAX)
            {
                usage.total_bytes = limit;
                usage.used_bytes = used;
                usage.available_bytes = limit.saturating_sub(used).min(usage.available_bytes);
            }
        }
        Ok((VolumeStats::Filesystem(usage), condition))
    }
}

/// What a path showed of a volume being unmounted from it.
#[derive(Debug, PartialEq, Eq)]
enum At {
    /// Nothing mounted there.
    Nothing,
    /// The volume was, and is no longer.
    Unmounted,
    /// Another mount, left in place (its source).
    Other(String),
}

/// What NodeGetVolumeStats reports.
#[derive(Debug, Clone, Copy)]
pub enum VolumeStats {
    Filesystem(Usage),
    /// A raw block volume: only its size means anything.
    Block {
        bytes: u64,
    },
}

/// Makes the publish target: a directory for a mount, a file for a block device
/// (the kubelet may have made either already). Returns whether we made it.
fn make_target(path: &Path, block: bool, id: &str) -> Result<bool> {
    let made = if block {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map(|_| ())
    } else {
        fs::create_dir(path)
    };
    match made {
        Ok(()) => {
            mark_target(path, id);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let m = fs::symlink_metadata(path).ctx(|| format!("stat {}", path.display()))?;
            check_mount_point("target", path, &m, block)?;
            Ok(false)
        }
        Err(e) => Err(Error::io(format!("create {}", path.display()), e)),
    }
}

/// Names the volume on a target this driver made, in an extended attribute the
/// mount then covers: a later unpublish that finds nothing mounted there (after
/// a reboot, or a retry) removes the target only if it carries that name, never
/// an empty directory or file someone else made. Where the filesystem takes no
/// user attributes the target is left to the CO (the kubelet removes its own).
fn mark_target(path: &Path, id: &str) {
    let Some(p) = c_path(path) else {
        return;
    };
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            TARGET_MARK.as_ptr(),
            id.as_ptr().cast(),
            id.len(),
            0,
        )
    };
    if r != 0 {
        tracing::debug!(target = %path.display(), error = %io::Error::last_os_error(), "cannot mark the target");
    }
}

/// Whether `path` carries the mark of a target made for volume `id`.
fn marked_for(path: &Path, id: &str) -> bool {
    let Some(p) = c_path(path) else {
        return false;
    };
    let mut buf = [0u8; 64];
    let n = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            TARGET_MARK.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    n > 0 && &buf[..n as usize] == id.as_bytes()
}

const TARGET_MARK: &std::ffi::CStr = c"user.localvol.target";

fn c_path(path: &Path) -> Option<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()
}

/// Refuses an existing path as a place to mount on: a symlink (it would redirect
/// the mount), the wrong kind, or anything holding data (a mount would hide it;
/// the kubelet hands over empty paths, so data there means a wrong path).
fn check_mount_point(what: &str, path: &Path, m: &fs::Metadata, block: bool) -> Result<()> {
    if m.is_symlink() {
        return Err(Error::InvalidArgument(format!(
            "{what} {} is a symlink; localvol does not mount onto symlinks",
            path.display()
        )));
    }
    if !m.is_dir() && !m.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{what} {} is neither a directory nor a regular file (a device node, FIFO or \
             socket); localvol does not mount over it",
            path.display()
        )));
    }
    if m.is_dir() == block {
        return Err(Error::FailedPrecondition(format!(
            "{what} {} is a {} but a {} volume needs a {}",
            path.display(),
            if m.is_dir() { "directory" } else { "file" },
            if block { "block" } else { "mount" },
            if block { "file" } else { "directory" }
        )));
    }
    let holds_data = if m.is_dir() {
        fs::read_dir(path)
            .ctx(|| format!("read {}", path.display()))?
            .next()
            .is_some()
    } else {
        m.len() > 0
    };
    if holds_data {
        return Err(Error::FailedPrecondition(format!(
            "{what} {} is not empty; localvol does not mount over data",
            path.display()
        )));
    }
    Ok(())
}

/// Makes the staging directory, or checks the one the kubelet made.
fn make_staging(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(path).ctx(|| format!("create {}", path.display()))
        }
        Err(e) => Err(Error::io(format!("stat {}", path.display()), e)),
        Ok(m) => check_mount_point("staging path", path, &m, false),
    }
}

/// Removes an unmounted publish target; an absent one is fine. Only empty
/// directories and empty files are removed: data in a target is never ours to drop.
fn remove_target(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("stat {}", path.display()), e)),
        Ok(m) if m.is_dir() => match fs::remove_dir(path) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Err(Error::FailedPrecondition(
                format!("target {} is not empty; leaving it", path.display()),
            )),
            r => r.ctx(|| format!("remove {}", path.display())),
        },
        Ok(m) if m.is_file() && m.len() == 0 => {
            fs::remove_file(path).ctx(|| format!("remove {}", path.display()))
        }
        Ok(_) => Err(Error::FailedPrecondition(format!(
            "target {} is not an empty directory or file; leaving it",
            path.display()
        ))),
    }
}

/// [`publish_rules`] as the node answers them: the node calls' tables name
/// FAILED_PRECONDITION for a capability the volume does not support ("Exceeds
/// capabilities"), where the controller's calls say INVALID_ARGUMENT.
fn node_rules(rec: &VolumeRecord, cap: &Capability, readonly: bool) -> Result<PublishRules> {
    publish_rules(rec, cap, readonly).map_err(|e| match e {
        Error::InvalidArgument(why) => Error::FailedPrecondition(why),
        e => e,
    })
}
