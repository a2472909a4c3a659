//! Randomized soak: concurrent clients create, publish, write, snapshot, restore,
//! unpublish and delete while a killer task SIGKILLs and restarts the driver at
//! random moments. A call that gets no answer (transport error, UNAVAILABLE) has an
//! unknown outcome and is repeated with the same name or id, as Kubernetes does.
//! Only acknowledged results enter the model; at the end the driver's state must
//! match it exactly, with every volume's data intact, and tear down to nothing.
//!
//! Bounded by a fixed op count and a deadline; seeded from LOCALVOL_SOAK_SEED or
//! the clock, and the seed is printed so a failure can be replayed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use localvol::proto::controller_client::ControllerClient;
use localvol::proto::identity_client::IdentityClient;
use localvol::proto::node_client::NodeClient;
use localvol::proto::volume_capability::access_mode::Mode;
use localvol::proto::volume_content_source::{SnapshotSource, Type as SourceType};
use localvol::proto::*;
use tonic::Code;

const TASKS: usize = 7;
const OPS_PER_TASK: usize = 500;
/// The random phase stops here even if ops remain; checks follow.
const PHASE: Duration = Duration::from_secs(40);
/// How long one call may keep getting no answer before the test gives up.
const CALL_DEADLINE: Duration = Duration::from_secs(30);
const MAX_VOLUMES: usize = 4;
const MAX_SNAPSHOTS: usize = 3;

/// xorshift64*: enough randomness for choosing ops, and replayable from a seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Dir,
    Ext4,
}

impl Kind {
    fn params(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Kind::Dir => &[],
            Kind::Ext4 => &[("type", "loop"), ("fsType", "ext4")],
        }
    }
    fn cap(self) -> VolumeCapability {
        match self {
            Kind::Dir => mount_cap(Mode::SingleNodeWriter),
            Kind::Ext4 => mount_cap_fs(Mode::SingleNodeWriter, "ext4", &[]),
        }
    }
}

/// An acknowledged volume, as the client knows it.
#[derive(Clone, Debug)]
struct Vol {
    id: String,
    kind: Kind,
    /// What the file `data` holds, if the client wrote (or restored) one.
    content: Option<String>,
    published: bool,
}

#[derive(Clone, Debug)]
struct Snap {
    id: String,
    kind: Kind,
    content: Option<String>,
}

/// What one client task saw acknowledged.
#[derive(Default)]
struct Model {
    volumes: BTreeMap<String, Vol>,
    snapshots: BTreeMap<String, Snap>,
    deleted_volumes: BTreeSet<String>,
    deleted_snapshots: BTreeSet<String>,
}

async fn try_clients(socket: &Path) -> Option<Clients> {
    let channel = localvol::client::connect(socket).await.ok()?;
    Some(Clients {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
    })
}

/// A client that survives driver restarts: it reconnects and repeats a call until
/// the driver answers it.
struct Client {
    socket: PathBuf,
    c: Option<Clients>,
    retries: Arc<AtomicU64>,
}

/// No answer from the driver: the call may or may not have happened.
fn unknown_outcome(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted
    )
}

impl Client {
    async fn call<T, F, Fut>(&mut self, what: &str, mut f: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Clients) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + CALL_DEADLINE;
        loop {
            if self.c.is_none() {
                self.c = try_clients(&self.socket).await;
            }
            let r = match &self.c {
                Some(c) => Some(
                    f(Clients {
                        identity: c.identity.clone(),
                        controller: c.controller.clone(),
                        node: c.node.clone(),
                    })
                    .await,
                ),
                None => None,
            };
            match r {
                Some(Err(s)) if unknown_outcome(&s) => {
                    self.c = None;
                    assert!(
                        Instant::now() < deadline,
                        "{what}: no answer for {CALL_DEADLINE:?}: {s:?}"
                    );
                }
                Some(r) => return r,
                None => assert!(Instant::now() < deadline, "{what}: cannot connect"),
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn staging(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("s-{id}"))
}
fn target(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("t-{id}"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Writes `content` durably as the file `data` in a published volume.
async fn write_data(target: PathBuf, content: String) {
    blocking(move || {
        let p = target.join("data");
        std::fs::write(&p, content.as_bytes()).unwrap();
        std::fs::File::open(&p).unwrap().sync_all().unwrap();
    })
    .await
}

async fn read_data(target: PathBuf) -> Option<String> {
    blocking(move || std::fs::read_to_string(target.join("data")).ok()).await
}

impl Client {
    async fn create(
        &mut self,
        name: &str,
        kind: Kind,
        source: Option<&str>,
    ) -> Result<String, tonic::Status> {
        let mut req = create_req(name, 64 * MIB, kind.params(), kind.cap());
        req.volume_content_source = source.map(|s| VolumeContentSource {
            r#type: Some(SourceType::Snapshot(SnapshotSource {
                snapshot_id: s.to_string(),
            })),
        });
        self.call(&format!("CreateVolume {name}"), |mut c| {
            let req = req.clone();
            async move { c.controller.create_volume(req).await }
        })
        .await
        .map(|r| r.into_inner().volume.unwrap().volume_id)
    }

    async fn mount(&mut self, dir: &Path, v: &Vol) {
        let (s, t) = (staging(dir, &v.id), target(dir, &v.id));
        let (id, cap) = (v.id.clone(), v.kind.cap());
        self.call(&format!("NodeStageVolume {id}"), |mut c| {
            let (id, s, cap) = (id.clone(), s.clone(), cap.clone());
            async move { c.stage(&id, &s, cap).await }
        })
        .await
        .unwrap_or_else(|e| panic!("stage {id}: {e:?}"));
        self.call(&format!("NodePublishVolume {id}"), |mut c| {
            let (id, s, t, cap) = (id.clone(), s.clone(), t.clone(), cap.clone());
            async move { c.publish(&id, &s, &t, cap, false).await }
        })
        .await
        .unwrap_or_else(|e| panic!("publish {id}: {e:?}"));
    }

    async fn unmount(&mut self, dir: &Path, id: &str) {
        let (s, t) = (staging(dir, id), target(dir, id));
        self.call(&format!("NodeUnpublishVolume {id}"), |mut c| {
            let (id, t) = (id.to_string(), t.clone());
            async move { c.unpublish(&id, &t).await }
        })
        .await
        .unwrap_or_else(|e| panic!("unpublish {id}: {e:?}"));
        self.call(&format!("NodeUnstageVolume {id}"), |mut c| {
            let (id, s) = (id.to_string(), s.clone());
            async move { c.unstage(&id, &s).await }
        })
        .await
        .unwrap_or_else(|e| panic!("unstage {id}: {e:?}"));
    }

    async fn delete(&mut self, id: &str) {
        self.call(&format!("DeleteVolume {id}"), |mut c| {
            let id = id.to_string();
            async move { c.delete(&id).await }
        })
        .await
        .unwrap_or_else(|e| panic!("delete {id}: {e:?}"));
    }

    async fn snapshot(&mut self, name: &str, vol: &str) -> String {
        let req = CreateSnapshotRequest {
            source_volume_id: vol.into(),
            name: name.into(),
            ..Default::default()
        };
        // Called again until ready, as the snapshotter does.
        loop {
            let s = self
                .call(&format!("CreateSnapshot {name}"), |mut c| {
                    let req = req.clone();
                    async move { c.controller.create_snapshot(req).await }
                })
                .await
                .unwrap_or_else(|e| panic!("snapshot {name} of {vol}: {e:?}"))
                .into_inner()
                .snapshot
                .unwrap();
            if s.ready_to_use {
                return s.snapshot_id;
            }
        }
    }

    async fn delete_snapshot(&mut self, id: &str) {
        self.call(&format!("DeleteSnapshot {id}"), |mut c| {
            let req = DeleteSnapshotRequest {
                snapshot_id: id.to_string(),
                ..Default::default()
            };
            async move { c.controller.delete_snapshot(req).await }
        })
        .await
        .unwrap_or_else(|e| panic!("delete snapshot {id}: {e:?}"));
    }

    async fn list_volumes(&mut self) -> BTreeSet<String> {
        self.call("ListVolumes", |mut c| async move {
            c.controller
                .list_volumes(ListVolumesRequest::default())
                .await
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect()
    }

    async fn list_snapshots(&mut self) -> BTreeSet<String> {
        self.call("ListSnapshots", |mut c| async move {
            c.controller
                .list_snapshots(ListSnapshotsRequest::default())
                .await
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap().snapshot_id)
        .collect()
    }
}

/// One client: random ops on its own volumes and snapshots (names prefixed by the
/// task), so the model of each task is exact without coordination.
async fn client_task(
    task: usize,
    seed: u64,
    socket: PathBuf,
    dir: PathBuf,
    stop_at: Instant,
    ops: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
) -> Model {
    let mut rng = Rng::new(seed ^ ((task as u64 + 1) << 32));
    let mut cl = Client {
        socket,
        c: None,
        retries,
    };
    let mut m = Model::default();
    let mut n = 0;
    for _ in 0..OPS_PER_TASK {
        if Instant::now() >= stop_at {
            break;
        }
        n += 1;
        let name = format!("soak-{task}-{n}");
        let vols: Vec<Vol> = m.volumes.values().cloned().collect();
        let snaps: Vec<Snap> = m.snapshots.values().cloned().collect();
        match rng.below(8) {
            // Create.
            0 | 1 if vols.len() < MAX_VOLUMES => {
                let kind = if rng.below(2) == 0 {
                    Kind::Dir
                } else {
                    Kind::Ext4
                };
                let id = cl
                    .create(&name, kind, None)
                    .await
                    .unwrap_or_else(|e| panic!("create {name}: {e:?}"));
                m.volumes.insert(
                    id.clone(),
                    Vol {
                        id,
                        kind,
                        content: None,
                        published: false,
                    },
                );
            }
            // Stage, publish, write the volume's name.
            2 | 3 if !vols.is_empty() => {
                let v = &vols[rng.below(vols.len())];
                if !v.published {
                    cl.mount(&dir, v).await;
                }
                let content = format!("{name} wrote {}", v.id);
                write_data(target(&dir, &v.id), content.clone()).await;
                let mv = m.volumes.get_mut(&v.id).unwrap();
                mv.published = true;
                mv.content = Some(content);
            }
            // Snapshot.
            4 if !vols.is_empty() && snaps.len() < MAX_SNAPSHOTS => {
                let v = &vols[rng.below(vols.len())];
                let id = cl.snapshot(&name, &v.id).await;
                m.snapshots.insert(
                    id.clone(),
                    Snap {
                        id,
                        kind: v.kind,
                        content: v.content.clone(),
                    },
                );
            }
            // Restore a snapshot to a new volume.
            5 if !snaps.is_empty() && vols.len() < MAX_VOLUMES => {
                let s = &snaps[rng.below(snaps.len())];
                let id = cl
                    .create(&name, s.kind, Some(&s.id))
                    .await
                    .unwrap_or_else(|e| panic!("restore {name} from {}: {e:?}", s.id));
                m.volumes.insert(
                    id.clone(),
                    Vol {
                        id,
                        kind: s.kind,
                        content: s.content.clone(),
                        published: false,
                    },
                );
            }
            // Unpublish and unstage.
            6 if vols.iter().any(|v| v.published) => {
                let published: Vec<_> = vols.iter().filter(|v| v.published).collect();
                let v = published[rng.below(published.len())];
                cl.unmount(&dir, &v.id).await;
                m.volumes.get_mut(&v.id).unwrap().published = false;
            }
            // Delete a volume (unmounted first) or a snapshot.
            _ => {
                if !snaps.is_empty() && (vols.is_empty() || rng.below(3) == 0) {
                    let s = &snaps[rng.below(snaps.len())];
                    cl.delete_snapshot(&s.id).await;
                    m.snapshots.remove(&s.id);
                    m.deleted_snapshots.insert(s.id.clone());
                } else if !vols.is_empty() {
                    let v = &vols[rng.below(vols.len())];
                    if v.published {
                        cl.unmount(&dir, &v.id).await;
                        m.volumes.get_mut(&v.id).unwrap().published = false;
                    }
                    cl.delete(&v.id).await;
                    m.volumes.remove(&v.id);
                    m.deleted_volumes.insert(v.id.clone());
                } else {
                    continue;
                }
            }
        }
        ops.fetch_add(1, Ordering::Relaxed);
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_with_random_kills() {
    if !need_root() {
        return;
    }
    let seed: u64 = std::env::var("LOCALVOL_SOAK_SEED")
        .ok()
        .map(|s| s.parse().expect("LOCALVOL_SOAK_SEED is a u64"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("soak seed {seed} (replay with LOCALVOL_SOAK_SEED={seed})");
    let started = Instant::now();

    let d = Driver::start().await;
    let (socket, dir, root) = (d.socket.clone(), d.path("mnt"), d.root.clone());
    std::fs::create_dir_all(&dir).unwrap();
    let d = Arc::new(tokio::sync::Mutex::new(d));
    let stop_at = started + PHASE;
    let ops = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));

    // The killer owns the restarts; it stops once every client is done.
    let done = Arc::new(AtomicBool::new(false));
    let killer = {
        let (d, done) = (d.clone(), done.clone());
        tokio::spawn(async move {
            let mut rng = Rng::new(seed);
            let mut restarts = 0u64;
            loop {
                let wait = Duration::from_millis(1000 + rng.below(2000) as u64);
                let until = Instant::now() + wait;
                while Instant::now() < until {
                    if done.load(Ordering::Relaxed) {
                        return restarts;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                d.lock().await.restart_after_kill9().await;
                restarts += 1;
            }
        })
    };
    let clients: Vec<_> = (0..TASKS)
        .map(|t| {
            tokio::spawn(client_task(
                t,
                seed,
                socket.clone(),
                dir.clone(),
                stop_at,
                ops.clone(),
                retries.clone(),
            ))
        })
        .collect();
    let mut models = vec![];
    let mut failure = None;
    for c in clients {
        match c.await {
            Ok(m) => models.push(m),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    done.store(true, Ordering::Relaxed);
    let restarts = killer.await.unwrap();
    let d = d.lock().await;
    if let Some(e) = failure {
        let log = d.log();
        let tail: Vec<_> = log.lines().rev().take(40).collect();
        panic!(
            "seed {seed}: a client failed: {e}\ndriver log (last lines, newest first):\n{}",
            tail.join("\n")
        );
    }
    let phase = started.elapsed();

    // The driver is up and stays up: its state must be exactly the model.
    let mut cl = Client {
        socket: socket.clone(),
        c: None,
        retries: retries.clone(),
    };
    let mut model = Model::default();
    for m in models {
        model.volumes.extend(m.volumes);
        model.snapshots.extend(m.snapshots);
        model.deleted_volumes.extend(m.deleted_volumes);
        model.deleted_snapshots.extend(m.deleted_snapshots);
    }
    let listed = cl.list_volumes().await;
    let want: BTreeSet<String> = model.volumes.keys().cloned().collect();
    assert_eq!(
        listed, want,
        "seed {seed}: ListVolumes differs from the acknowledged volumes"
    );
    let listed = cl.list_snapshots().await;
    let want: BTreeSet<String> = model.snapshots.keys().cloned().collect();
    assert_eq!(
        listed, want,
        "seed {seed}: ListSnapshots differs from the acknowledged snapshots"
    );
    for id in model.deleted_volumes.iter().chain(&model.deleted_snapshots) {
        for sub in ["volumes", "snapshots"] {
            for name in [id.clone(), format!("{id}.img")] {
                let p = root.join(sub).join(name);
                assert!(
                    !p.exists(),
                    "seed {seed}: deleted {id} left {}",
                    p.display()
                );
            }
        }
    }
    let mut checked = 0;
    for v in model.volumes.values() {
        if !v.published {
            cl.mount(&dir, v).await;
        }
        let got = read_data(target(&dir, &v.id)).await;
        assert_eq!(got, v.content, "seed {seed}: data of volume {}", v.id);
        checked += 1;
    }
    // Every acknowledged snapshot holds what its volume held: restore each once.
    for (i, s) in model.snapshots.values().enumerate() {
        let name = format!("soak-check-{i}");
        let id = cl
            .create(&name, s.kind, Some(&s.id))
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: restore {}: {e:?}", s.id));
        let v = Vol {
            id,
            kind: s.kind,
            content: s.content.clone(),
            published: false,
        };
        cl.mount(&dir, &v).await;
        let got = read_data(target(&dir, &v.id)).await;
        assert_eq!(got, s.content, "seed {seed}: data of snapshot {}", s.id);
        model.volumes.insert(
            v.id.clone(),
            Vol {
                published: true,
                ..v
            },
        );
    }

    // Tear down everything and check nothing is orphaned.
    for v in model.volumes.values() {
        cl.unmount(&dir, &v.id).await;
        cl.delete(&v.id).await;
    }
    for s in model.snapshots.values() {
        cl.delete_snapshot(&s.id).await;
    }
    for sub in ["volumes", "snapshots"] {
        let left: Vec<_> = std::fs::read_dir(root.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "seed {seed}: {sub} keeps {left:?}");
        let left = records(&root, sub);
        assert!(
            left.is_empty(),
            "seed {seed}: records of {sub} remain: {left:?}"
        );
    }
    let loops = loops_below(&root);
    assert!(
        loops.is_empty(),
        "seed {seed}: loop devices left: {loops:?}"
    );
    let cdir = std::fs::canonicalize(d.dir.path()).unwrap();
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounts: Vec<_> = localvol::mount::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&cdir))
        .collect();
    assert!(mounts.is_empty(), "seed {seed}: mounts left: {mounts:?}");
    println!(
        "soak seed {seed}: {} ops by {TASKS} clients in {phase:.1?}, {restarts} SIGKILL restarts survived, \
         {} calls repeated after no answer, {checked} volumes and {} snapshots verified, total {:.1?}",
        ops.load(Ordering::Relaxed),
        retries.load(Ordering::Relaxed),
        model.snapshots.len(),
        started.elapsed()
    );
}
