//! Test harness: starts the real `localvol` binary on a temporary root and socket,
//! connects real gRPC clients, and cleans up on drop — kills the driver, unmounts
//! everything below the test directory and detaches loop devices whose backing
//! file is there — also when the test fails.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use localvol::proto::controller_client::ControllerClient;
use localvol::proto::identity_client::IdentityClient;
use localvol::proto::node_client::NodeClient;
use localvol::proto::volume_capability::{
    access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
};
use localvol::proto::*;

pub const NODE: &str = "test-node";
pub const DRIVER: &str = "localvol.csi.io";
pub const TOPOLOGY_KEY: &str = "topology.localvol.csi.io/node";
pub const MIB: i64 = 1 << 20;

pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

/// A running driver on its own temporary directory.
pub struct Driver {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub extra_args: Vec<String>,
    pub envs: Vec<(String, String)>,
    /// The node id the driver runs as (NODE unless a test plays a second node).
    pub node_id: String,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_localvol")
}

impl Driver {
    pub async fn start() -> Driver {
        Driver::start_with(vec![], None).await
    }

    /// Starts the driver with extra flags; `root` overrides the driver root (for a
    /// root on a special filesystem made by the test).
    pub async fn start_with(extra_args: Vec<String>, root: Option<PathBuf>) -> Driver {
        Driver::start_as(NODE, extra_args, root).await
    }

    /// Starts a driver that plays node `node_id`.
    pub async fn start_as(node_id: &str, extra_args: Vec<String>, root: Option<PathBuf>) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("localvol-test-")
            .tempdir_in("/tmp")
            .unwrap();
        let root = root.unwrap_or_else(|| dir.path().join("root"));
        let socket = dir.path().join("csi.sock");
        let mut d = Driver {
            child: None,
            dir,
            root,
            socket,
            extra_args,
            envs: vec![],
            node_id: node_id.to_string(),
        };
        d.spawn().await;
        d
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub async fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("driver.log"))
            .unwrap();
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--node-id")
            .arg(&self.node_id)
            .arg("--root")
            .arg(&self.root)
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start localvol"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.socket.exists()
            || std::os::unix::net::UnixStream::connect(&self.socket).is_err()
        {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("localvol exited early ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "localvol did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("driver.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("driver running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        c.wait().unwrap()
    }

    pub async fn restart_after_kill9(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    pub async fn clients(&self) -> Clients {
        let channel = connect(&self.socket).await;
        Clients {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }
}

pub async fn connect(socket: &Path) -> Channel {
    localvol::client::connect(socket)
        .await
        .expect("connect to localvol")
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill9();
        cleanup_below(self.dir.path());
        if self.root.starts_with(self.dir.path()) {
            return;
        }
        cleanup_below(&self.root);
    }
}

/// Unmounts everything mounted below `dir` (deepest first) and detaches every loop
/// device whose backing file is below it.
pub fn cleanup_below(dir: &Path) {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    for _ in 0..4 {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<PathBuf> = localvol::mount::parse_mountinfo(&text)
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&dir) && p != &dir)
            .collect();
        if points.is_empty() {
            break;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in points {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    detach_loops_below(&dir);
}

/// Loop devices (name, backing file) as sysfs shows them.
pub fn loop_devices() -> Vec<(String, PathBuf)> {
    let mut out = vec![];
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                out.push((
                    name,
                    PathBuf::from(b.trim_end().trim_end_matches(" (deleted)")),
                ));
            }
        }
    }
    out
}

pub fn detach_loops_below(dir: &Path) {
    for (name, backing) in loop_devices() {
        if backing.starts_with(dir) {
            if let Ok(f) = std::fs::File::open(format!("/dev/{name}")) {
                use std::os::fd::AsRawFd;
                unsafe {
                    libc::ioctl(f.as_raw_fd(), 0x4C01 /* LOOP_CLR_FD */)
                };
            }
        }
    }
}

// ----- request builders -----

pub fn mount_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn mount_cap_fs(mode: Mode, fs: &str, flags: &[&str]) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn rwo() -> VolumeCapability {
    mount_cap(Mode::SingleNodeWriter)
}

pub fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn create_req(
    name: &str,
    bytes: i64,
    kv: &[(&str, &str)],
    cap: VolumeCapability,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        parameters: params(kv),
        ..Default::default()
    }
}

impl Clients {
    pub async fn create(
        &mut self,
        name: &str,
        bytes: i64,
        kv: &[(&str, &str)],
        cap: VolumeCapability,
    ) -> Volume {
        self.create_as(create_req(name, bytes, kv, cap)).await
    }

    /// CreateVolume of a request built by the caller (several capabilities, ...).
    pub async fn create_as(&mut self, req: CreateVolumeRequest) -> Volume {
        let name = req.name.clone();
        self.controller
            .create_volume(req)
            .await
            .unwrap_or_else(|s| panic!("CreateVolume {name}: {s:?}"))
            .into_inner()
            .volume
            .unwrap()
    }

    pub async fn stage(
        &mut self,
        id: &str,
        staging: &Path,
        cap: VolumeCapability,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn unstage(&mut self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .map(|_| ())
    }

    pub async fn publish(
        &mut self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub async fn unpublish(&mut self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            })
            .await
            .map(|_| ())
    }

    /// Every volume ListVolumes returns (one page: no max_entries).
    pub async fn all_volumes(&mut self) -> Vec<Volume> {
        self.controller
            .list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .filter_map(|e| e.volume)
            .collect()
    }

    pub async fn delete(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: Default::default(),
            })
            .await
            .map(|_| ())
    }
}

/// Asserts a call failed with `code`, printing the message either way.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: tonic::Code) {
    match r {
        Ok(v) => panic!("expected {code:?}, got OK: {v:?}"),
        Err(s) => assert_eq!(s.code(), code, "message: {}", s.message()),
    }
}

pub fn is_mounted(path: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    localvol::mount::parse_mountinfo(&text)
        .iter()
        .any(|m| m.mount_point == path)
}

pub fn need_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A filesystem made on a loop-attached image file and mounted, for a driver root
/// of a particular kind (btrfs, xfs with reflink, a tiny root that fills up).
/// Dropping it unmounts everything below it, unmounts it and detaches its device.
pub struct ImageFs {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    device: localvol::loopdev::LoopDevice,
    mounted: bool,
}

impl ImageFs {
    /// Err(why) when the kernel refuses the mount (e.g. no quota support).
    pub fn new(fs: &str, bytes: u64, mkfs_args: &[&str], options: &str) -> Result<ImageFs, String> {
        let dir = tempfile::Builder::new()
            .prefix("localvol-image-")
            .tempdir_in("/tmp")
            .unwrap();
        let image = dir.path().join("image");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        let device = localvol::loopdev::attach(&image).expect("attach image");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut me = ImageFs {
            dir,
            mnt,
            device,
            mounted: false,
        };
        let out = Command::new(format!("mkfs.{fs}"))
            .args(mkfs_args)
            .arg(me.device.path())
            .output()
            .unwrap_or_else(|e| panic!("mkfs.{fs}: {e} (install it; .ci/run does)"));
        assert!(
            out.status.success(),
            "mkfs.{fs}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let data = (!options.is_empty()).then_some(options);
        nix::mount::mount(
            Some(&me.device.path()),
            &me.mnt,
            Some(fs),
            nix::mount::MsFlags::empty(),
            data,
        )
        .map_err(|e| format!("mount {fs} -o {options}: {e}"))?;
        me.mounted = true;
        Ok(me)
    }
}

impl Drop for ImageFs {
    fn drop(&mut self) {
        cleanup_below(&self.mnt);
        if self.mounted {
            let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = localvol::loopdev::detach_device(&self.device);
    }
}

/// Writes `mib` MiB of 0xAB into a new file at `path`, fsyncing each MiB; returns
/// the MiB written before the first error, and that error.
pub fn write_mib(path: &Path, mib: usize) -> (usize, Option<std::io::Error>) {
    use std::io::Write;
    let mut f = match std::fs::File::create(path) {
        Ok(f) => f,
        Err(e) => return (0, Some(e)),
    };
    let chunk = vec![0xABu8; 1 << 20];
    for i in 0..mib {
        if let Err(e) = f.write_all(&chunk).and_then(|_| f.sync_data()) {
            return (i, Some(e));
        }
    }
    (mib, None)
}

impl Clients {
    pub async fn expand(
        &mut self,
        id: &str,
        bytes: i64,
        cap: Option<VolumeCapability>,
    ) -> Result<ControllerExpandVolumeResponse, tonic::Status> {
        self.controller
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: id.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capability: cap,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn node_expand(
        &mut self,
        id: &str,
        path: &Path,
        bytes: i64,
        cap: Option<VolumeCapability>,
    ) -> Result<NodeExpandVolumeResponse, tonic::Status> {
        self.node
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: id.into(),
                volume_path: path.display().to_string(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capability: cap,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn stats(&mut self, id: &str, path: &Path) -> NodeGetVolumeStatsResponse {
        self.node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: path.display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("NodeGetVolumeStats {id}: {s:?}"))
            .into_inner()
    }
}

impl Clients {
    /// CreateSnapshot of `source` named `name`, as csi-snapshotter sends it.
    /// CreateSnapshot as the external-snapshotter calls it: again until the
    /// snapshot is ready to use (a full copy is cut first, made durable after).
    pub async fn snapshot(&mut self, name: &str, source: &str) -> Result<Snapshot, tonic::Status> {
        loop {
            let s = self.snapshot_once(name, source).await?;
            if s.ready_to_use {
                return Ok(s);
            }
        }
    }

    /// One CreateSnapshot call, ready or not.
    pub async fn snapshot_once(
        &mut self,
        name: &str,
        source: &str,
    ) -> Result<Snapshot, tonic::Status> {
        self.controller
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: source.into(),
                name: name.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().snapshot.unwrap())
    }

    pub async fn delete_snapshot(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.controller
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }
}

/// Loop devices (names) whose backing file is below `dir`.
pub fn loops_below(dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap();
    loop_devices()
        .into_iter()
        .filter(|(_, b)| b.starts_with(&dir))
        .map(|(n, _)| n)
        .collect()
}

/// Size of the filesystem at `path`, as `df` shows it.
pub fn fs_total_bytes(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    s.blocks() as u64 * s.fragment_size() as u64
}

/// Restarts the driver armed to crash at `point`.
pub async fn arm(d: &mut Driver, point: &str) -> Clients {
    d.kill9();
    d.envs = vec![("LOCALVOL_CRASH_AT".into(), point.into())];
    d.spawn().await;
    d.clients().await
}

/// After the crash: the driver is gone; start it normally.
pub async fn recover(d: &mut Driver, r: Result<(), tonic::Status>, point: &str) -> Clients {
    assert!(
        r.is_err(),
        "the call should have crashed the driver at {point}"
    );
    d.kill9();
    assert!(
        d.log().contains("crashing on purpose"),
        "{point} was not reached:\n{}",
        d.log()
    );
    d.envs.clear();
    d.spawn().await;
    d.clients().await
}

/// Waits until the driver's trash under `root` is empty: deleted data is removed
/// in the background. Panics after a generous while (a correctness check, not a
/// timing one).
pub async fn trash_emptied(root: &Path) {
    let trash = root.join("trash");
    for _ in 0..600 {
        let empty = std::fs::read_dir(&trash).map_or(true, |mut d| d.next().is_none());
        if empty {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let left: Vec<_> = std::fs::read_dir(&trash)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    panic!("the trash still holds {left:?} after 30 s");
}

/// Ids of the records on disk under `root` for `table` ("volumes" or
/// "snapshots"): those in its slot file and any still in files of their own.
pub fn records(root: &Path, table: &str) -> Vec<String> {
    let dir = root.join("state").join(table);
    let mut ids: Vec<String> = localvol::store::slots::read(
        &dir.join(localvol::store::SLOT_FILE),
        localvol::store::id_of,
    )
    .unwrap()
    .records
    .into_iter()
    .map(|l| l.id)
    .collect();
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name != localvol::store::SLOT_FILE && name != localvol::store::TOO_OLD_GUARD {
            ids.push(name);
        }
    }
    ids.sort();
    ids
}
