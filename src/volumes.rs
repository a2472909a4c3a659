//! The domain: what each volume operation does, in terms of records (store), data
//! (backend), mounts and access rules. Nothing here knows of gRPC; the `csi` edge
//! converts requests into these calls and errors into statuses.
//!
//! Every operation that changes something takes the volume's lock, so calls on one
//! volume are serialized while calls on different volumes run in parallel.
//! Creation makes the data first and writes the record last: a crash before the
//! record leaves unreported leftovers that the retry (same name, same id) replaces
//! and start-up removes; deletion removes the record first, then the data.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::access::{self, AccessMode, AccessType, Capability, Offer};
use crate::backend::trash::Trash;
use crate::backend::{dir, loopfile, DirLimits, Layout};
use crate::error::{Error, Result};
use crate::faults;
use crate::ids::{self, Kind};
use crate::locks::{KeyGuard, KeyLocks};
use crate::loopdev;
use crate::mount;
use crate::nodelock::NodeLock;
use crate::params::{self, VolumeType};
use crate::snapshots::Source;
use crate::store::{ContentSource, Store, VolumeRecord};

/// Size given to a volume whose request names none.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Marks a shared volume's data renamed for removal (`remove_shared_data`).
const DELETING: &str = ".deleting-";

/// Commits everything of the filesystem holding `path` (syncfs): what no fsync of
/// one file reaches, such as quota limits.
fn sync_filesystem(path: &Path) -> Result<()> {
    let f = fs::File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    nix::unistd::syncfs(&f).map_err(|e| {
        Error::io(
            format!("syncfs {}", path.display()),
            std::io::Error::from(e),
        )
    })
}

#[derive(Debug, Clone)]
pub struct Config {
    pub root: PathBuf,
    pub shared_root: Option<PathBuf>,
    pub node_id: String,
    pub driver_name: String,
    /// Allow turning btrfs quotas on at start-up, for directory volume limits.
    pub enable_btrfs_quota: bool,
    /// Leave all of expansion to NodeExpandVolume: the external-resizer runs once per
    /// cluster, not per node, so it cannot reach the node that holds a local volume.
    pub node_expansion_only: bool,
    /// How long to wait at start-up for another driver serving the same root to exit.
    pub root_lock_wait: std::time::Duration,
}

impl Config {
    /// The topology key whose value is this node's id.
    pub fn topology_key(&self) -> String {
        format!("topology.{}/node", self.driver_name)
    }
}

/// A topology segment, as in CSI: key -> value.
pub type Segment = BTreeMap<String, String>;

#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub name: String,
    pub required_bytes: i64,
    pub limit_bytes: i64,
    pub capabilities: Vec<Capability>,
    pub parameters: BTreeMap<String, String>,
    pub source: Option<ContentSource>,
    pub requisite: Vec<Segment>,
    pub preferred: Vec<Segment>,
}

/// The health of a volume as the system shows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

impl Condition {
    pub fn ok() -> Self {
        Condition {
            abnormal: false,
            message: "volume is healthy".into(),
        }
    }
    pub fn abnormal(message: impl Into<String>) -> Self {
        Condition {
            abnormal: true,
            message: message.into(),
        }
    }
}

pub struct Driver {
    pub cfg: Config,
    pub layout: Layout,
    pub store: Store,
    pub locks: KeyLocks,
    /// How directory volumes' sizes are enforced on this root.
    pub dir_limits: DirLimits,
    /// Where deleted data of this node's root goes to be removed in the background.
    pub trash: Trash,
    /// A private copy of the mount of volumes/, which directory volumes are
    /// staged from; None where the kernel cannot clone from one.
    pub volumes_mount: Option<mount::Detached>,
    /// Room this root's volumes may still take (GetCapacity subtracts it).
    pub promises: crate::promises::Promises,
    /// The root and the shared root as the kernel names them (symlinks
    /// resolved), which no staging or target path may lie in.
    pub own_dirs: Vec<PathBuf>,
    /// This driver alone serves the root while it runs.
    _root_lock: crate::rootlock::RootLock,
}

/// A shared volume's lock across nodes. A call that leaves no record of the volume
/// (a delete, a failed create, a volume deleted while it waited) removes the
/// lock's file, so the shared root keeps one only for volumes that exist.
pub struct SharedVolumeLock<'a> {
    lock: NodeLock,
    store: &'a Store,
    id: &'a str,
}

impl Drop for SharedVolumeLock<'_> {
    fn drop(&mut self) {
        if self.store.volume(self.id).is_none() {
            self.lock.remove_file();
        }
    }
}

/// Says on the shared root that this node uses it, so that other nodes' drivers
/// can tell a node that exists from a name that does not (ControllerPublish).
fn register_node(layout: &Layout, node: &str) -> Result<()> {
    let (Some(dir), Some(entry)) = (layout.nodes_dir(), layout.node_entry(node)) else {
        return Ok(());
    };
    dir::own_dir(&dir)?;
    if fs::read(&entry).is_ok_and(|held| held == node.as_bytes()) {
        return Ok(());
    }
    // Not synced: an entry lost in a crash is written again at the next start.
    fs::write(&entry, node).map_err(|e| Error::io(format!("write {}", entry.display()), e))
}

pub fn now_unix() -> (i64, i32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

/// mkfs.xfs refuses a filesystem smaller than this (xfsprogs 5.19 and later).
pub const XFS_MIN_BYTES: u64 = 300 * MIB;
/// mkfs.ext4 formats down to about 100 KiB, depending on its version; a MiB,
/// the smallest volume a range without a tight limit gets, is safe.
pub const EXT4_MIN_BYTES: u64 = MIB;

/// The capacity of a loop volume that will hold `fs_type` (None: handed out raw
/// only): at least what its mkfs can format, within the limit, rather than a
/// size its first stage could never format.
pub fn fit_filesystem(capacity: u64, fs_type: Option<&str>, limit: i64) -> Result<u64> {
    let (least, what) = match fs_type {
        Some("xfs") => (XFS_MIN_BYTES, "300 MiB"),
        Some(_) => (EXT4_MIN_BYTES, "1 MiB"),
        None => return Ok(capacity),
    };
    if capacity >= least {
        return Ok(capacity);
    }
    if limit > 0 && (limit as u64) < least {
        return Err(Error::OutOfRange(format!(
            "a {} volume cannot be smaller than {least} bytes ({what}, the least its mkfs \
             formats here); limit_bytes is {limit}",
            fs_type.unwrap_or_default()
        )));
    }
    Ok(least)
}

/// The capacity a CreateVolume request gets: its range's ([`choose_capacity`]),
/// at least what the filesystem of a loop volume to be mounted needs.
fn capacity_for(req: &CreateRequest, fs_type: Option<&str>) -> Result<u64> {
    fit_filesystem(
        choose_capacity(req.required_bytes, req.limit_bytes)?,
        sized_for(fs_type, &req.capabilities),
        req.limit_bytes,
    )
}

/// The filesystem a loop volume's size must fit: its own, where it will be
/// mounted (capabilities for block access only never are; none at all, as
/// GetCapacity may be asked, is taken to be).
fn sized_for<'a>(fs_type: Option<&'a str>, caps: &[Capability]) -> Option<&'a str> {
    fs_type.filter(|_| caps.is_empty() || caps.iter().any(|c| !c.is_block()))
}

/// The capacity to give for a range: the request rounded up to a MiB, within the
/// limit. An impossible range is OUT_OF_RANGE.
pub fn choose_capacity(required: i64, limit: i64) -> Result<u64> {
    if required < 0 || limit < 0 {
        return Err(Error::InvalidArgument(
            "capacity_range values must not be negative".into(),
        ));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && limit < required {
        return Err(Error::OutOfRange(format!(
            "capacity_range is impossible: limit_bytes {limit} is below required_bytes {required}"
        )));
    }
    let wanted = if required == 0 {
        DEFAULT_CAPACITY
    } else {
        required
    };
    let mut size = wanted.div_ceil(MIB) * MIB;
    if limit > 0 && size > limit {
        // Round down to what a block device can hold, but never below the request.
        size = (limit / 4096) * 4096;
        if size < required || size == 0 {
            return Err(Error::OutOfRange(format!(
                "no volume size fits between required_bytes {required} and limit_bytes {limit} \
                 (sizes are whole 4 KiB blocks)"
            )));
        }
    }
    Ok(size)
}

impl Driver {
    /// Opens the driver's root: creates its layout, loads the records and removes
    /// the leftovers of creations and deletions that a crash interrupted.
    pub fn open(cfg: Config) -> Result<Driver> {
        let layout = Layout {
            root: cfg.root.clone(),
            shared_root: cfg.shared_root.clone(),
        };
        // The root itself may be a symlink (to a disk mounted elsewhere); the
        // directories the driver removes entries from may not.
        fs::create_dir_all(&layout.root)
            .map_err(|e| Error::io(format!("create {}", layout.root.display()), e))?;
        let root_lock = crate::rootlock::RootLock::take(&layout.root, cfg.root_lock_wait)?;
        // state/ too: the record directories below it are checked, but a link in
        // its place would put them, and their removals, outside the root.
        for d in [
            layout.volumes_dir(false),
            layout.snapshots_dir(),
            layout.state_dir(),
        ] {
            dir::own_dir(&d)?;
        }
        let shared_state = layout.shared_root.as_ref().map(|r| r.join("state"));
        if let Some(state) = &shared_state {
            dir::own_dir(&layout.volumes_dir(true))?;
            dir::own_dir(state)?;
            if let Some(locks) = layout.locks_dir() {
                dir::own_dir(&locks)?;
            }
            register_node(&layout, &cfg.node_id)?;
        }
        let store = Store::open(&layout.state_dir(), shared_state.as_deref())?;
        let dir_limits = DirLimits::detect(&layout.root, cfg.enable_btrfs_quota)?;
        if dir_limits.enforced() {
            tracing::info!("{}", dir_limits.describe());
        } else {
            tracing::warn!("{}", dir_limits.describe());
        }
        let trash = Trash::open(layout.trash_dir())?;
        let volumes_mount = match mount::Detached::of(&layout.volumes_dir(false)) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::info!(error = %e, "directory volumes are staged from the root's own mount");
                None
            }
        };
        let own_dirs = std::iter::once(&layout.root)
            .chain(layout.shared_root.as_ref())
            .map(|r| fs::canonicalize(r).unwrap_or_else(|_| r.clone()))
            .collect();
        let driver = Driver {
            cfg,
            own_dirs,
            layout,
            store,
            locks: KeyLocks::default(),
            dir_limits,
            trash,
            volumes_mount,
            promises: Default::default(),
            _root_lock: root_lock,
        };
        driver.remove_leftovers()?;
        driver.reapply_limits();
        driver.report_found();
        driver.measure_promises();
        Ok(driver)
    }

    /// Says in the log what an earlier run (or someone else) left attached and
    /// mounted for this node's volumes. Nothing is undone: a stage reuses the loop
    /// device, unpublish and unstage take mounts down, and a mount not ours is
    /// refused by name when a call meets it.
    fn report_found(&self) {
        let Ok(table) = mount::mounts() else {
            return;
        };
        for rec in self.store.volumes.all() {
            let dev = self.loop_device(&rec);
            let keys = self.volume_keys(&rec).unwrap_or_default();
            let at: Vec<String> = table
                .iter()
                .filter(|m| keys.contains(&m.key()) && m.mount_point != self.data_path(&rec))
                .map(|m| m.mount_point.display().to_string())
                .collect();
            match (&dev, at.is_empty()) {
                (None, true) => {}
                (Some(d), true) if rec.block_staging.is_some() => tracing::info!(
                    volume = %rec.id,
                    device = %d.path().display(),
                    staging = %rec.block_staging.as_deref().unwrap_or(Path::new("")).display(),
                    "found volume staged for block access; kept"
                ),
                (Some(d), true) => tracing::warn!(
                    volume = %rec.id,
                    device = %d.path().display(),
                    "found loop device attached but not mounted (left by an earlier run); \
                     kept: the next stage reuses it, unstage detaches it"
                ),
                (_, false) => tracing::info!(
                    volume = %rec.id,
                    device = dev.as_ref().map(|d| d.path().display().to_string()).unwrap_or_default(),
                    mounts = ?at,
                    "found volume in use; kept"
                ),
            }
        }
    }

    /// Sets every local directory volume's size limit again from its record and
    /// makes the limits durable. A limit is not in what a volume's fsync or a
    /// record's flush writes (a btrfs qgroup limit waits for the next transaction
    /// commit, a quota for the next journal commit), so a power cut can lose one
    /// that was set just before; the record says what it must be.
    fn reapply_limits(&self) {
        if !self.dir_limits.enforced() {
            return;
        }
        let mut set = 0;
        for rec in self.store.volumes.all() {
            if rec.volume_type != VolumeType::Dir || rec.shared {
                continue;
            }
            let data = self.data_path(&rec);
            match dir::reapply_limit(&data, &rec.id, rec.capacity_bytes, &self.dir_limits) {
                Ok(()) => set += 1,
                Err(e) => {
                    tracing::warn!(volume = %rec.id, error = %e, "cannot set the volume's size limit again")
                }
            }
        }
        if set > 0 {
            if let Err(e) = sync_filesystem(&self.layout.volumes_dir(false)) {
                tracing::warn!(error = %e, "cannot make the size limits durable");
            }
        }
    }

    /// Data under volumes/ or snapshots/ with no record was never reported created
    /// (or was being deleted): remove it, unless something still has it in use. A
    /// loop filesystem a crash left frozen (mid-snapshot) is thawed.
    fn remove_leftovers(&self) -> Result<()> {
        let table = mount::mounts()?;
        let root = fs::canonicalize(&self.layout.root).unwrap_or(self.layout.root.clone());
        for (dev, backing) in loopdev::attached() {
            if !backing.starts_with(&root) {
                continue;
            }
            for m in table
                .iter()
                .filter(|m| m.dev == dev.dev && m.root == Path::new("/"))
            {
                if let Ok(true) = crate::filesystem::thaw(&m.mount_point) {
                    tracing::warn!(mount = %m.mount_point.display(), "thawed a filesystem left frozen by an interrupted snapshot");
                }
            }
        }
        // On the shared root only what a delete renamed for removal: data without
        // a record there may be another node's create in progress.
        // In the background: a large tree on a network filesystem must not hold
        // up serving.
        if let Some(shared) = self
            .layout
            .shared_root
            .is_some()
            .then(|| self.layout.volumes_dir(true))
        {
            let sweep = move || {
                for entry in fs::read_dir(&shared).into_iter().flatten().flatten() {
                    if entry.file_name().to_string_lossy().contains(DELETING) {
                        let path = entry.path();
                        tracing::info!(path = %path.display(), "removing a shared volume's data left by an interrupted delete");
                        if let Err(e) = dir::remove(&path) {
                            tracing::warn!(path = %path.display(), error = %e, "cannot remove it yet");
                        }
                    }
                }
            };
            if let Err(e) = std::thread::Builder::new()
                .name("shared-sweep".into())
                .spawn(sweep)
            {
                tracing::warn!(error = %e, "cannot start removing what interrupted shared deletes left");
            }
        }
        // Only this node's root: on a shared root, data without a record may be
        // another node's create in progress.
        for (d, kind) in [
            (self.layout.volumes_dir(false), Kind::Volume),
            (self.layout.snapshots_dir(), Kind::Snapshot),
        ] {
            let illegible = match kind {
                Kind::Volume => self.store.volumes.has_illegible(),
                Kind::Snapshot => self.store.snapshots.has_illegible(),
            };
            if illegible {
                tracing::warn!(dir = %d.display(), "a damaged record's id is illegible: data without a record there is kept");
                continue;
            }
            let Ok(entries) = fs::read_dir(&d) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let id = name.strip_suffix(".img").unwrap_or(&name);
                let known = match kind {
                    Kind::Volume => {
                        self.store.volume(id).is_some() || self.store.volumes.is_unreadable(id)
                    }
                    Kind::Snapshot => {
                        self.store.snapshots.get(id).is_some()
                            || self.store.snapshots.is_unreadable(id)
                    }
                };
                if !ids::is_valid_id(kind, id) || known {
                    continue;
                }
                let path = entry.path();
                let in_use = loopdev::find(&path).is_some()
                    || mount::key_of_in(&table, &path)
                        .map(|k| mount::mounts_of(&table, &k).any(|m| m.mount_point != path))
                        .unwrap_or(false);
                if in_use {
                    tracing::warn!(path = %path.display(), "unrecorded data is in use; leaving it");
                    continue;
                }
                tracing::info!(path = %path.display(), "removing data of an interrupted create or delete");
                self.trash.discard(&path)?;
            }
        }
        Ok(())
    }

    /// Takes the lock of a volume (or of a request name's volume).
    pub fn lock(&self, id: &str) -> Result<KeyGuard> {
        self.locks.lock(id)
    }

    /// For a shared volume, the lock every node's driver takes (after its own,
    /// `lock`) to change its record or data; None for a node-local one.
    pub fn lock_across_nodes<'a>(
        &'a self,
        id: &'a str,
        shared: bool,
    ) -> Result<Option<SharedVolumeLock<'a>>> {
        match (shared, self.layout.locks_dir()) {
            (true, Some(dir)) => Ok(Some(SharedVolumeLock {
                lock: NodeLock::acquire(&dir, id)?,
                store: &self.store,
                id,
            })),
            _ => Ok(None),
        }
    }

    /// Whether the root is usable: exists, is a directory, is writable.
    pub fn probe(&self) -> bool {
        nix::unistd::access(&self.layout.root, nix::unistd::AccessFlags::W_OK).is_ok()
            && self.layout.state_dir().is_dir()
    }

    pub fn this_node_segment(&self) -> Segment {
        BTreeMap::from([(self.cfg.topology_key(), self.cfg.node_id.clone())])
    }

    /// The topology a volume is reachable from: this node, or everywhere if shared.
    pub fn topology_of(&self, rec: &VolumeRecord) -> Vec<Segment> {
        if rec.shared {
            vec![]
        } else {
            vec![BTreeMap::from([(
                self.cfg.topology_key(),
                rec.node_id.clone(),
            )])]
        }
    }

    fn matches_this_node(&self, seg: &Segment) -> bool {
        seg.get(&self.cfg.topology_key()) == Some(&self.cfg.node_id)
    }

    pub fn offer_of(rec: &VolumeRecord) -> Offer {
        Offer {
            block: rec.volume_type == VolumeType::Loop,
            multi_node: rec.shared,
        }
    }

    pub fn data_path(&self, rec: &VolumeRecord) -> PathBuf {
        self.layout
            .volume_data(&rec.id, rec.volume_type, rec.shared)
    }

    /// Looks up a volume by id; a malformed or unknown id is NOT_FOUND.
    pub fn volume(&self, id: &str) -> Result<VolumeRecord> {
        ids::check_id(Kind::Volume, id)?;
        self.store
            .volume(id)
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))
    }

    /// Checks that `caps` can all be served by a volume offering `offer`.
    fn check_capabilities(offer: Offer, caps: &[Capability]) -> Result<()> {
        for cap in caps {
            access::check_supported(offer, cap).map_err(Error::InvalidArgument)?;
        }
        Ok(())
    }

    /// Checks a requested fs type against the volume type.
    fn fs_type_for(p: &params::VolumeParams, caps: &[Capability]) -> Result<Option<String>> {
        if p.volume_type != VolumeType::Loop {
            return Ok(None);
        }
        let mut fs = p.fs_type.clone();
        for cap in caps.iter().filter(|c| !c.is_block()) {
            let want = cap.fs_type();
            if want.is_empty() {
                continue;
            }
            params::check_fs_type(want)?;
            match &fs {
                Some(f) if f != want => {
                    return Err(Error::InvalidArgument(format!(
                        "capabilities ask for fsType {want} but the volume is {f}"
                    )))
                }
                _ => fs = Some(want.to_string()),
            }
        }
        Ok(Some(fs.unwrap_or_else(|| "ext4".into())))
    }

    /// Why a directory volume on the local (or shared) root cannot serve `cap`, if
    /// it cannot: it is a bind mount of that root's filesystem, whatever a
    /// capability names. An empty fs_type asks for nothing (Kubernetes sends that
    /// for a class without fsType).
    fn dir_refusal(&self, shared: bool, cap: &Capability) -> Result<Option<String>> {
        // A bind mount takes per-mount flags only: a class whose mountOptions name
        // the filesystem's (size=, discard, ...) could never be staged.
        let fs_options = crate::mount::Flags::parse(cap.mount_flags())?.fs_options;
        if !fs_options.is_empty() {
            return Ok(Some(format!(
                "directory volumes are bind mounts of the driver's root, which take no \
                 filesystem options: mount flags {fs_options:?}; drop them, or use a StorageClass \
                 with type: loop for a filesystem of the volume's own"
            )));
        }
        let asked = cap.fs_type();
        if asked.is_empty() {
            return Ok(None);
        }
        let holds = dir::filesystem_name(&self.layout.volumes_dir(shared))?;
        if asked == holds {
            return Ok(None);
        }
        let root = if shared { "shared root" } else { "root" };
        Ok(Some(format!(
            "directory volumes hold the filesystem of the driver's {root}, {holds}, not \
             {asked}: ask for fsType {holds} or none, or use a StorageClass with type: loop \
             for a volume with a filesystem of its own"
        )))
    }

    pub fn create_volume(&self, req: CreateRequest) -> Result<VolumeRecord> {
        ids::check_name(&req.name)?;
        if req.capabilities.is_empty() {
            return Err(Error::InvalidArgument(
                "volume_capabilities are required".into(),
            ));
        }
        let p = params::parse(&req.parameters)?;
        if p.shared && self.layout.shared_root.is_none() {
            return Err(Error::InvalidArgument(
                "parameter shared: \"true\" needs the driver to run with --shared-root".into(),
            ));
        }
        let offer = Offer {
            block: p.volume_type == VolumeType::Loop,
            multi_node: p.shared,
        };
        Self::check_capabilities(offer, &req.capabilities)?;
        let fs_type = Self::fs_type_for(&p, &req.capabilities)?;
        if p.volume_type == VolumeType::Dir {
            for cap in &req.capabilities {
                if let Some(why) = self.dir_refusal(p.shared, cap)? {
                    return Err(Error::InvalidArgument(why));
                }
            }
        }
        let capacity = capacity_for(&req, fs_type.as_deref())?;
        let id = ids::id_for_name(Kind::Volume, &req.name);
        // A volume of this name here, asked for elsewhere, is ALREADY_EXISTS
        // (check_same_volume); a new one is not made here at all.
        if !p.shared && self.store.volume(&id).is_none() {
            self.check_topology(&req)?;
        }
        self.check_fits(capacity, p.shared)?;

        let _guard = self.lock(&id)?;
        let _across = self.lock_across_nodes(&id, p.shared)?;
        if let Some(existing) = self.store.volume(&id) {
            let same = self.check_same_volume(existing, &req, &p, fs_type.as_deref());
            self.settle_promise(&id);
            return same;
        }
        if !p.shared {
            // Again under the lock: a volume of this name may have gone since.
            self.check_topology(&req)?;
        }
        let (_source_guard, source) = self.locked_source(&id, &req, &p, fs_type.as_deref())?;
        let capacity = match &source {
            Some(s) => capacity.max(s.size_bytes()),
            None => capacity,
        };
        if p.enforce_size && p.volume_type == VolumeType::Dir && !self.limits_for(p.shared) {
            return Err(Error::FailedPrecondition(format!(
                "enforceSize is \"true\" but directory volume sizes are not enforced here ({}); \
                 use type: loop or a root that can limit directories",
                self.dir_limits.describe()
            )));
        }
        let (secs, _) = now_unix();
        let rec = VolumeRecord {
            id: id.clone(),
            name: req.name.clone(),
            volume_type: p.volume_type,
            capacity_bytes: capacity,
            parameters: req.parameters.clone(),
            capabilities: req.capabilities.clone(),
            fs_type,
            shared: p.shared,
            source: req.source.clone(),
            node_id: if p.shared {
                String::new()
            } else {
                self.cfg.node_id.clone()
            },
            created_unix: secs,
            attachments: BTreeMap::new(),
            formatting: false,
            block_staging: None,
            grown_for: None,
        };
        let made = self.make_recorded(&rec, source.as_ref());
        self.settle_promise(&rec.id);
        made?;
        tracing::info!(volume = %rec.id, name = %rec.name, bytes = rec.capacity_bytes, "volume created");
        Ok(rec)
    }

    /// Makes a new volume's data and then its record, both durable.
    fn make_recorded(&self, rec: &VolumeRecord, source: Option<&Source>) -> Result<()> {
        let data = self.data_path(rec);
        self.make_data(rec, source)?;
        faults::point("create.after_data");
        // The data's directory entry is synced while the record is written: the
        // disk flushes overlap. Either may reach the disk first; a record found
        // without its data is one never acknowledged, and the retry remakes the data
        // (check_same_volume). A new empty directory is synced itself too: without a
        // journal, its parent's entry alone may point at an inode never written.
        // (Backing files and copied data were synced as they were made.)
        let new_dir = source.is_none() && rec.volume_type == VolumeType::Dir;
        let (data_synced, recorded) = crate::beside::both(
            move || {
                if new_dir {
                    crate::store::sync_dir(&data)?;
                }
                crate::store::sync_dir(data.parent().expect("volume paths have a parent"))
            },
            || self.store.put_new_volume(rec),
        );
        recorded.and(data_synced)?;
        faults::point("create.after_record");
        Ok(())
    }

    /// Makes a new volume's data: empty, or filled from its content source. On
    /// failure (a full root) the partial data is removed at once, so the space is
    /// back and nothing half-made waits for the next start-up to be cleaned.
    fn make_data(&self, rec: &VolumeRecord, source: Option<&Source>) -> Result<()> {
        let data = self.data_path(rec);
        let p = params::parse(&rec.parameters)?;
        let make = || {
            self.reserve_room(rec, rec.capacity_bytes)?;
            let made = match (source, rec.volume_type) {
                (Some(s), _) => self.fill_from(rec, s),
                (None, VolumeType::Dir) => {
                    dir::create(&data, &rec.id, rec.capacity_bytes, self.limits(rec.shared))
                }
                (None, VolumeType::Loop) => {
                    loopfile::create(&data, rec.capacity_bytes, p.allocation)
                }
            };
            if made.is_err() {
                if let Err(e) = dir::remove(&data) {
                    tracing::warn!(path = %data.display(), error = %e, "cannot remove partial volume data");
                }
            }
            made
        };
        self.with_room(&rec.id, make)
    }

    /// Runs `f`, and once more if the root was full while deleted data waited in
    /// the trash: a delete answered a moment ago has not given its space back yet.
    /// `f` leaves nothing behind when it fails.
    pub(crate) fn with_room<T>(&self, what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        match f() {
            Err(e) if e.is_no_space() && self.trash.pending() > 0 => {
                tracing::info!(
                    what,
                    "root is full; waiting for the trash to be emptied, then trying again"
                );
                // Bounded: the call's own deadline must still be met.
                self.trash.drain(std::time::Duration::from_secs(30));
                f()
            }
            done => done,
        }
    }

    /// The snapshot or volume a new volume is to be filled from, checked against
    /// what is asked: the same volume type and filesystem, and room for its data.
    fn resolve_source(
        &self,
        req: &CreateRequest,
        p: &params::VolumeParams,
        fs_type: Option<&str>,
    ) -> Result<Option<Source>> {
        // Kubernetes picks the node before it asks (WaitForFirstConsumer): a source
        // held by another node is RESOURCE_EXHAUSTED, which sends the claim back to
        // the scheduler, where NOT_FOUND would be retried on this node forever.
        let not_here = |e: Error| match e {
            Error::NotFound(m) if !req.requisite.is_empty() && !p.shared => {
                Error::ResourceExhausted(format!(
                    "{m} on this node ({}); a copy is made on the node that holds its source, \
                     so the new claim's pod must run there",
                    self.cfg.node_id
                ))
            }
            e => e,
        };
        let source = match &req.source {
            None => return Ok(None),
            Some(ContentSource::Snapshot(id)) => {
                Source::Snapshot(self.snapshot(id).map_err(|e| {
                    if ids::is_valid_id(Kind::Snapshot, id) {
                        not_here(e)
                    } else {
                        e
                    }
                })?)
            }
            Some(ContentSource::Volume(id)) => Source::Volume(self.volume(id).map_err(|e| {
                if ids::is_valid_id(Kind::Volume, id) {
                    not_here(e)
                } else {
                    e
                }
            })?),
        };
        if source.volume_type() != p.volume_type {
            return Err(Error::InvalidArgument(format!(
                "the content source holds a {:?} volume's data; the new volume must have the \
                 same type",
                source.volume_type()
            )));
        }
        if p.volume_type == VolumeType::Loop && source.fs_type() != fs_type {
            return Err(Error::InvalidArgument(format!(
                "the content source holds {}; the new volume asks for {}",
                source.fs_type().unwrap_or("no filesystem"),
                fs_type.unwrap_or("none")
            )));
        }
        let size = source.size_bytes();
        // Judged by the size the request gets (rounded up to a MiB, as its source's
        // was): a clone asking what its source's claim asked (20M) is not smaller
        // than the source it became (20 MiB).
        let made = match req.required_bytes {
            0 => size,
            _ => capacity_for(req, fs_type)?,
        };
        if made < size || (req.limit_bytes > 0 && (req.limit_bytes as u64) < size) {
            return Err(Error::OutOfRange(format!(
                "the content source holds {size} bytes; the new volume cannot be smaller"
            )));
        }
        Ok(Some(source))
    }

    /// The request's content source, locked against its deletion for the copy and
    /// looked up again under that lock (deleted meanwhile, it is NOT_FOUND).
    fn locked_source(
        &self,
        id: &str,
        req: &CreateRequest,
        p: &params::VolumeParams,
        fs_type: Option<&str>,
    ) -> Result<(Option<KeyGuard>, Option<Source>)> {
        let source = self.resolve_source(req, p, fs_type)?;
        let guard = match &source {
            Some(Source::Volume(v)) if v.id != id => self.lock(&v.id)?,
            Some(Source::Snapshot(snap)) => self.lock(&snap.id)?,
            _ => return Ok((None, source)),
        };
        Ok((Some(guard), self.resolve_source(req, p, fs_type)?))
    }

    /// Volumes may overcommit free space (sparse files, unused directories), but
    /// never promise more than the whole filesystem could ever hold.
    fn check_fits(&self, capacity: u64, shared: bool) -> Result<()> {
        let total = mount::usage(&self.layout.volumes_dir(shared))?.total_bytes;
        if capacity > total {
            return Err(Error::OutOfRange(format!(
                "{capacity} bytes is more than the whole filesystem under the driver root \
                 holds ({total} bytes)"
            )));
        }
        Ok(())
    }

    /// Refuses a required topology that does not include this node.
    fn check_topology(&self, req: &CreateRequest) -> Result<()> {
        let here = |segs: &[Segment]| segs.iter().any(|s| self.matches_this_node(s));
        if !req.requisite.is_empty() && !here(&req.requisite) {
            return Err(Error::ResourceExhausted(format!(
                "requisite topology does not include this node ({}={}); a localvol volume lives \
                 on the node whose driver creates it",
                self.cfg.topology_key(),
                self.cfg.node_id
            )));
        }
        // Without requisite topologies the spec lets the plugin choose any topology
        // when it cannot serve a preferred one: here, this node.
        Ok(())
    }

    /// A CreateVolume retry: the same volume back if the arguments agree.
    fn check_same_volume(
        &self,
        existing: VolumeRecord,
        req: &CreateRequest,
        p: &params::VolumeParams,
        fs_type: Option<&str>,
    ) -> Result<VolumeRecord> {
        let conflict = |what: &str| {
            Err(Error::AlreadyExists(format!(
                "volume {:?} already exists ({}) with a different {what}",
                req.name, existing.id
            )))
        };
        let cap = existing.capacity_bytes;
        if (req.required_bytes as u64) > cap
            || (req.limit_bytes > 0 && (req.limit_bytes as u64) < cap)
        {
            return conflict("capacity");
        }
        if existing.parameters != req.parameters || existing.volume_type != p.volume_type {
            return conflict("set of parameters");
        }
        if existing.source != req.source {
            return conflict("content source");
        }
        if !existing.shared && self.check_topology(req).is_err() {
            return conflict(
                "topology (it is on this node, which the requisite topology leaves out)",
            );
        }
        if p.volume_type == VolumeType::Loop && existing.fs_type.as_deref() != fs_type {
            return conflict("filesystem type");
        }
        if !existing.capabilities.is_empty() {
            for cap in &req.capabilities {
                if let Err(why) = access::check_created_for(&existing.capabilities, cap) {
                    return Err(Error::AlreadyExists(format!(
                        "volume {:?} already exists ({}) with other capabilities: {why}",
                        req.name, existing.id
                    )));
                }
            }
        }
        // A crash between the record's commit and the data directory's can leave a
        // record (never acknowledged) without data: the retry makes it again.
        let data = self.data_path(&existing);
        if fs::symlink_metadata(&data).is_err() && existing.attachments.is_empty() {
            tracing::warn!(volume = %existing.id, "data of an unacknowledged create is missing; making it again");
            let (_source_guard, source) = self.locked_source(&existing.id, req, p, fs_type)?;
            self.make_data(&existing, source.as_ref())?;
        }
        // The first attempt may have been killed after its record was flushed and
        // before its data was durable or limited: acknowledged only now, the
        // volume is made so again (each step is a no-op where it was done). Data
        // removed since it was acknowledged stays missing: its condition says so.
        if fs::symlink_metadata(&data).is_err() {
            return Ok(existing);
        }
        match existing.volume_type {
            VolumeType::Dir => {
                dir::reapply_limit(
                    &data,
                    &existing.id,
                    existing.capacity_bytes,
                    self.limits(existing.shared),
                )?;
                crate::store::sync_dir(&data)?;
            }
            VolumeType::Loop => loopfile::grow(&data, existing.capacity_bytes, p.allocation)?,
        }
        crate::store::sync_dir(data.parent().expect("volume paths have a parent"))?;
        Ok(existing)
    }

    pub fn delete_volume(&self, id: &str) -> Result<()> {
        if id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        if !ids::is_valid_id(Kind::Volume, id) {
            // Nothing of ours can have that id: already deleted, as far as we know.
            return Ok(());
        }
        let _guard = self.lock(id)?;
        let Some(rec) = self.store.volume(id) else {
            return Ok(());
        };
        // Read again once no other node changes it.
        let _across = self.lock_across_nodes(id, rec.shared)?;
        let Some(rec) = self.store.volume(id) else {
            return Ok(());
        };
        if !rec.attachments.is_empty() {
            let nodes: Vec<_> = rec.attachments.keys().cloned().collect();
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still published to node(s) {nodes:?}; unpublish it first"
            )));
        }
        if let Some(d) = self.loop_device(&rec) {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is attached as {} on this node; unpublish and unstage it first",
                d.path().display()
            )));
        }
        // Backing file removed behind our back while staged: the device still holds
        // the pod's data, and the pod still uses it.
        let data = self.data_path(&rec);
        if rec.volume_type == VolumeType::Loop && fs::symlink_metadata(&data).is_err() {
            if let Some(d) = loopdev::find_deleted(&data).first() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id}'s backing file was removed, but {} still holds its data on this \
                     node; unpublish and unstage it first",
                    d.path().display()
                )));
            }
        }
        // A directory volume's subdirectory mounted on its own (a pod's subPath)
        // shows its data too.
        let mounts = match rec.volume_type {
            VolumeType::Dir => self
                .volume_keys(&rec)?
                .iter()
                .map(mount::mounts_below)
                .collect::<Result<Vec<_>>>()?
                .concat(),
            VolumeType::Loop => self.mounts_of_volume(&rec)?,
        };
        if let Some(m) = mounts.first() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still mounted at {}; unpublish and unstage it first",
                m.mount_point.display()
            )));
        }
        if rec.shared {
            // Data first: on the shared root data without a record is never taken
            // for a leftover (it may be another node's create), a renamed tree is.
            self.remove_shared_data(&rec.id, &data)?;
            self.store.remove_volume(&rec)?;
            faults::point("delete.after_record");
        } else {
            self.store.remove_volume(&rec)?;
            self.promises.forget(&rec.id);
            faults::point("delete.after_record");
            self.trash.discard(&data)?;
        }
        faults::point("delete.in_trash");
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    /// Removes a shared volume's data. Every node's provisioner sees a shared
    /// volume's deletion, so other nodes may be here at the same moment: the node
    /// whose rename wins removes the data, the others find it gone. A crash leaves
    /// the renamed tree, which the next start of any node removes.
    fn remove_shared_data(&self, id: &str, data: &Path) -> Result<()> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let doomed = data.with_file_name(format!("{id}{DELETING}{nanos}"));
        // Two removers of one tree (another node's retry sweeping it) each find
        // entries gone under them: a removal that fails is tried again on what
        // is left, and it is done once nothing is left.
        let remove = |path: &Path| {
            let mut tries = 0;
            loop {
                match dir::remove(path) {
                    Err(_) if fs::symlink_metadata(path).is_err() => return Ok(()),
                    Err(e) if tries == 3 => return Err(e),
                    Err(_) => tries += 1,
                    done => return done,
                }
            }
        };
        match fs::rename(data, &doomed) {
            Ok(()) => remove(&doomed),
            // Gone already: renamed by another node, or by an attempt of ours whose
            // removal failed (its retry lands here; what it left is removed now, as
            // far as it can be: another node may be removing the same tree, and
            // any node's next start removes what stays).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let parent = data.parent().expect("volume paths have a parent");
                let prefix = format!("{id}{DELETING}");
                for entry in fs::read_dir(parent).into_iter().flatten().flatten() {
                    if entry.file_name().to_string_lossy().starts_with(&prefix) {
                        if let Err(e) = remove(&entry.path()) {
                            tracing::debug!(path = %entry.path().display(), error = %e, "left for another remover");
                        }
                    }
                }
                Ok(())
            }
            Err(e) => Err(Error::io(
                format!("rename {} for removal", data.display()),
                e,
            )),
        }
    }

    /// The size limits that apply to directory volumes on the local or shared root.
    /// A shared root is another filesystem: its sizes are not enforced.
    pub(crate) fn limits(&self, shared: bool) -> &DirLimits {
        static NONE: std::sync::OnceLock<DirLimits> = std::sync::OnceLock::new();
        if shared {
            NONE.get_or_init(|| DirLimits::None {
                why: "volumes on the shared root are not limited".into(),
            })
        } else {
            &self.dir_limits
        }
    }

    fn limits_for(&self, shared: bool) -> bool {
        self.limits(shared).enforced()
    }

    /// The loop device a loop volume is attached to on this node, if any.
    pub fn loop_device(&self, rec: &VolumeRecord) -> Option<loopdev::LoopDevice> {
        match rec.volume_type {
            VolumeType::Loop => loopdev::find(&self.data_path(rec)),
            VolumeType::Dir => None,
        }
    }

    /// Grows a volume to the capacity range. Returns the capacity and whether the
    /// node must grow a filesystem too. Shrinking is OUT_OF_RANGE; a capability
    /// (optional) the volume cannot serve is INVALID_ARGUMENT, before anything grows.
    pub fn expand_volume(
        &self,
        id: &str,
        required: i64,
        limit: i64,
        cap: Option<&Capability>,
    ) -> Result<(u64, bool)> {
        let rec = self.volume(id)?;
        if let Some(cap) = cap {
            // What is judged (type, capabilities, filesystem) never changes after
            // creation: no lock needed.
            self.check_serves(&rec, cap)?.map_err(|why| {
                Error::InvalidArgument(format!(
                    "volume {id} does not support the volume_capability asked ({why}); expand \
                     it with a capability it was created for, or with none"
                ))
            })?;
        }
        let _guard = self.lock(id)?;
        let _across = self.lock_across_nodes(id, rec.shared)?;
        let rec = self.grow_locked(id, required, limit)?;
        Ok((rec.capacity_bytes, Self::needs_node_expansion(&rec)))
    }

    /// Whether a grown volume needs NodeExpandVolume: a loop volume that may hold a
    /// filesystem does (its device and filesystem are grown on the node); one made
    /// for block access only, or a directory (its limit is all), does not. From the
    /// volume, not from a request: the CO may name any capability, or none.
    fn needs_node_expansion(rec: &VolumeRecord) -> bool {
        let block_only =
            !rec.capabilities.is_empty() && rec.capabilities.iter().all(Capability::is_block);
        rec.volume_type == VolumeType::Loop && !block_only
    }

    /// Grows the volume's data (backing file or size limit) and then its record, so
    /// that a crash between the two is completed by the retry. The caller holds
    /// the volume's lock.
    pub(crate) fn grow_locked(&self, id: &str, required: i64, limit: i64) -> Result<VolumeRecord> {
        let mut rec = self.volume(id)?;
        if required < 0 || limit < 0 {
            return Err(Error::InvalidArgument(
                "capacity_range values must not be negative".into(),
            ));
        }
        if limit > 0 && (limit as u64) < rec.capacity_bytes {
            return Err(Error::OutOfRange(format!(
                "volume {id} is already {} bytes, more than limit_bytes {limit}; volumes cannot \
                 shrink",
                rec.capacity_bytes
            )));
        }
        if (required as u64) <= rec.capacity_bytes {
            return Ok(rec);
        }
        let wanted = choose_capacity(required, limit)?;
        self.check_fits(wanted, rec.shared)?;
        self.with_room(id, || {
            self.reserve_room(&rec, self.promise_grown(&rec, wanted))
        })?;
        let grown = self.grow_data(&mut rec, wanted);
        // The promise as it is now: grown, or as before.
        self.settle_promise(id);
        grown?;
        tracing::info!(volume = %id, bytes = wanted, "volume expanded");
        Ok(rec)
    }

    /// Grows a volume's data (its limit, its backing file) and then its record.
    fn grow_data(&self, rec: &mut VolumeRecord, wanted: u64) -> Result<()> {
        let id = rec.id.clone();
        let p = params::parse(&rec.parameters)?;
        let data = self.data_path(rec);
        match rec.volume_type {
            // A power cut can take back a limit set now (limits are in no fsync);
            // start-up sets it again from the record.
            VolumeType::Dir => dir::set_size(&data, wanted, self.limits(rec.shared))?,
            VolumeType::Loop => {
                self.with_room(&id, || loopfile::grow(&data, wanted, p.allocation))?;
                faults::point("expand.after_grow");
                // Attached here: let the device see the new size now.
                if let Some(d) = loopdev::find(&data) {
                    loopdev::refresh_size(&d)?;
                }
            }
        }
        let mut grown = rec.clone();
        grown.capacity_bytes = wanted;
        self.store.put_volume(&grown)?;
        *rec = grown;
        Ok(())
    }

    /// Every mount on this node that shows the volume's data.
    pub fn mounts_of_volume(&self, rec: &VolumeRecord) -> Result<Vec<mount::MountEntry>> {
        mount::mounts_showing(&self.volume_keys(rec)?)
    }

    /// The keys every mount of this volume's data carries on this node: the data
    /// directory's, or a loop volume's filesystem and device node.
    pub fn volume_keys(&self, rec: &VolumeRecord) -> Result<Vec<mount::MountKey>> {
        match rec.volume_type {
            VolumeType::Dir => {
                let data = self.data_path(rec);
                match mount::key_of(&data) {
                    Ok(key) => Ok(vec![key]),
                    // Gone, also a moment ago (a shared volume another node deletes).
                    Err(_) if fs::symlink_metadata(&data).is_err() => Ok(vec![]),
                    Err(e) => Err(e),
                }
            }
            VolumeType::Loop => {
                let Some(d) = self.loop_device(rec) else {
                    return Ok(vec![]);
                };
                let mut keys = vec![mount::MountKey {
                    dev: d.dev,
                    root: PathBuf::from("/"),
                }];
                if let Ok(k) = mount::key_of(&d.path()) {
                    keys.push(k);
                }
                Ok(keys)
            }
        }
    }

    /// Checks that each capability can be served, and that `parameters` (when
    /// given) are the volume's; the record back, or why not.
    pub fn validate_capabilities(
        &self,
        id: &str,
        caps: &[Capability],
        parameters: &BTreeMap<String, String>,
    ) -> Result<std::result::Result<VolumeRecord, String>> {
        let rec = self.volume(id)?;
        if !parameters.is_empty() && *parameters != rec.parameters {
            return Ok(Err(format!(
                "the parameters are not the volume's: it was created with {:?}",
                rec.parameters
            )));
        }
        for cap in caps {
            if let Err(why) = self.check_serves(&rec, cap)? {
                return Ok(Err(why));
            }
        }
        Ok(Ok(rec))
    }

    /// Whether the volume can serve `cap`: its offer (block, several nodes), the
    /// access type it was created for, and its filesystem. Ok(Err(why)) when not;
    /// ValidateVolumeCapabilities and ControllerExpandVolume judge alike.
    fn check_serves(
        &self,
        rec: &VolumeRecord,
        cap: &Capability,
    ) -> Result<std::result::Result<(), String>> {
        if let Err(why) = access::check_supported(Self::offer_of(rec), cap) {
            return Ok(Err(why));
        }
        let kind_created = rec
            .capabilities
            .iter()
            .any(|c| c.is_block() == cap.is_block());
        if !rec.capabilities.is_empty() && !kind_created {
            return Ok(Err(format!(
                "the volume was created for {} access",
                if cap.is_block() {
                    "filesystem"
                } else {
                    "block"
                }
            )));
        }
        if rec.volume_type == VolumeType::Dir {
            if let Some(why) = self.dir_refusal(rec.shared, cap)? {
                return Ok(Err(why));
            }
        }
        if rec.volume_type == VolumeType::Loop && !cap.is_block() {
            let fs = cap.fs_type();
            if !fs.is_empty() && Some(fs) != rec.fs_type.as_deref() {
                return Ok(Err(format!(
                    "volume holds {} but {fs} was asked",
                    rec.fs_type.as_deref().unwrap_or("no filesystem")
                )));
            }
        }
        Ok(Ok(()))
    }

    /// One page of volumes after `starting_token`; a token we did not hand out is
    /// ABORTED, as the spec says.
    pub fn list_volumes(
        &self,
        starting_token: &str,
        max: i32,
    ) -> Result<(Vec<VolumeRecord>, Option<String>)> {
        if max < 0 {
            return Err(Error::InvalidArgument(
                "max_entries must not be negative".into(),
            ));
        }
        let after = self.check_token(Kind::Volume, starting_token)?;
        Ok(self.store.page_volumes(after, max as usize))
    }

    pub fn check_token<'a>(&self, kind: Kind, token: &'a str) -> Result<Option<&'a str>> {
        if token.is_empty() {
            return Ok(None);
        }
        if !ids::is_valid_id(kind, token) {
            return Err(Error::Aborted(format!(
                "starting_token {token:?} was not issued by this driver; start again without one"
            )));
        }
        Ok(Some(token))
    }

    /// Free bytes for new volumes on this node (0 for a topology elsewhere).
    pub fn capacity(
        &self,
        segment: Option<&Segment>,
        caps: &[Capability],
        params: &BTreeMap<String, String>,
    ) -> Result<u64> {
        let p = params::parse(params)?;
        // Kubernetes asks with the StorageClass's parameters as they are and no
        // capabilities: its filesystem is then only in the provisioner's own key,
        // which CreateVolume will get as the capability's fs_type.
        let implied;
        let caps = match params::provisioner_fs_type(params) {
            Some(fs_type) if caps.is_empty() => {
                implied = [Capability {
                    access_type: AccessType::Mount {
                        fs_type: fs_type.to_string(),
                        flags: vec![],
                    },
                    mode: AccessMode::SingleNodeWriter,
                }];
                &implied[..]
            }
            _ => caps,
        };
        // Nothing of a class CreateVolume refuses here can be made here: report no
        // room, so that the scheduler does not send its pods to this node.
        let refused = (p.shared && self.layout.shared_root.is_none())
            || (p.enforce_size && p.volume_type == VolumeType::Dir && !self.limits_for(p.shared));
        if refused {
            return Ok(0);
        }
        if let Some(seg) = segment {
            if !p.shared && !seg.is_empty() && !self.matches_this_node(seg) {
                return Ok(0);
            }
        }
        let offer = Offer {
            block: p.volume_type == VolumeType::Loop,
            multi_node: p.shared,
        };
        if caps
            .iter()
            .any(|c| access::check_supported(offer, c).is_err())
        {
            return Ok(0);
        }
        if p.volume_type == VolumeType::Dir {
            for cap in caps {
                if self.dir_refusal(p.shared, cap)?.is_some() {
                    return Ok(0);
                }
            }
        }
        let base = self.layout.volumes_dir(p.shared);
        let free = mount::usage(&base)?.available_bytes;
        let room = if p.shared {
            // Other nodes' volumes share that root; their promises are not known here.
            free
        } else {
            free.saturating_sub(self.promises.total())
        };
        // Less room than the least volume of the class's filesystem: none.
        let fs_type = Self::fs_type_for(&p, caps)?;
        if fit_filesystem(1, sized_for(fs_type.as_deref(), caps), 0)? > room {
            return Ok(0);
        }
        // CreateVolume rounds sizes up to whole MiB: a figure between two would
        // promise the scheduler a request that CreateVolume then refuses.
        Ok(room / MIB * MIB)
    }

    /// The condition of a volume as the system shows it now: its data present and
    /// of the right kind, readable, and, for a loop filesystem in use, free of
    /// errors the kernel has counted.
    pub fn condition(&self, rec: &VolumeRecord) -> Condition {
        let data = self.data_path(rec);
        let dir = rec.volume_type == VolumeType::Dir;
        match fs::symlink_metadata(&data) {
            Ok(m) if m.is_dir() == dir && (dir || m.is_file()) => {}
            Ok(_) => {
                return Condition::abnormal(format!(
                    "volume data {} has the wrong file type",
                    data.display()
                ))
            }
            Err(e) => {
                return Condition::abnormal(format!(
                    "volume data {} is unavailable: {e}",
                    data.display()
                ))
            }
        }
        let readable = if dir {
            fs::read_dir(&data).map(|_| ())
        } else {
            fs::File::open(&data).map(|_| ())
        };
        if let Err(e) = readable {
            return Condition::abnormal(format!(
                "volume data {} is not readable: {e}",
                data.display()
            ));
        }
        if let Some(dev) = self.loop_device(rec) {
            let errors = fs::read_to_string(format!("/sys/fs/ext4/{}/errors_count", dev.name))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
            if errors > 0 {
                return Condition::abnormal(format!(
                    "the kernel counted {errors} ext4 errors on {} (volume {}); unstage it and run \
                     e2fsck",
                    dev.path().display(),
                    rec.id
                ));
            }
        }
        Condition::ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_rounds_up_within_limit() {
        assert_eq!(choose_capacity(0, 0).unwrap(), DEFAULT_CAPACITY);
        assert_eq!(choose_capacity(1, 0).unwrap(), MIB);
        assert_eq!(choose_capacity(MIB as i64 + 1, 0).unwrap(), 2 * MIB);
        assert_eq!(choose_capacity(1000, 8192).unwrap(), 8192);
        assert_eq!(choose_capacity(0, 4 * MIB as i64).unwrap(), 4 * MIB);
        assert!(matches!(choose_capacity(10, 5), Err(Error::OutOfRange(_))));
        assert_eq!(
            fit_filesystem(64 * MIB, Some("xfs"), 0).unwrap(),
            XFS_MIN_BYTES
        );
        assert_eq!(
            fit_filesystem(64 * MIB, Some("xfs"), 300 * MIB as i64).unwrap(),
            XFS_MIN_BYTES
        );
        assert!(matches!(
            fit_filesystem(64 * MIB, Some("xfs"), 100 * MIB as i64),
            Err(Error::OutOfRange(_))
        ));
        assert_eq!(fit_filesystem(64 * MIB, Some("ext4"), 0).unwrap(), 64 * MIB);
        assert_eq!(fit_filesystem(64 * MIB, None, 0).unwrap(), 64 * MIB);
        assert!(matches!(
            fit_filesystem(8192, Some("ext4"), 8192),
            Err(Error::OutOfRange(_))
        ));
        assert_eq!(fit_filesystem(8192, None, 8192).unwrap(), 8192);
        assert_eq!(
            fit_filesystem(512 * MIB, Some("xfs"), 0).unwrap(),
            512 * MIB
        );
        assert!(matches!(
            choose_capacity(5000, 6000),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            choose_capacity(-1, 0),
            Err(Error::InvalidArgument(_))
        ));
    }
}
