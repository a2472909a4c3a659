//! A CSI client that plays the Kubernetes side (provisioner, attacher, kubelet)
//! for one pod at a time, against any driver, recording each RPC's latency.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use localvol::client::Direct;
use tonic::codegen::http::Uri;

use localvol::proto::controller_client::ControllerClient;
use localvol::proto::controller_service_capability::rpc::Type as CtrlRpc;
use localvol::proto::identity_client::IdentityClient;
use localvol::proto::node_client::NodeClient;
use localvol::proto::node_service_capability::rpc::Type as NodeRpc;
use localvol::proto::volume_capability::{
    access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
};
use localvol::proto::*;

use super::stats::Timings;
use super::{BenchError, Stop};

/// Connects to `unix:///path` (or a bare path).
pub async fn connect(endpoint: &str) -> Result<Direct, BenchError> {
    let path = PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint));
    localvol::client::connect_direct(&path)
        .await
        .map_err(|e| BenchError::Connect {
            endpoint: path.display().to_string(),
            message: e.to_string(),
        })
}

/// What the driver told us about itself once, at start.
#[derive(Clone, Debug)]
pub struct DriverInfo {
    pub name: String,
    pub version: String,
    pub node_id: String,
    /// This node's topology (NodeGetInfo), asked for at CreateVolume as the
    /// provisioner does once the scheduler has picked the node.
    pub topology: Option<Topology>,
    pub controller_publish: bool,
    pub snapshots: bool,
    pub node_stage: bool,
    /// The CSI mode a ReadWriteOnce claim arrives as: SINGLE_NODE_MULTI_WRITER
    /// where the driver advertises it on both services (as external-provisioner
    /// and the kubelet map it), else SINGLE_NODE_WRITER.
    pub rwo_mode: Mode,
}

/// The clients plus what every cycle needs; cheap to clone (one shared HTTP/2 channel).
#[derive(Clone)]
pub struct Session {
    pub identity: IdentityClient<Direct>,
    pub controller: ControllerClient<Direct>,
    pub node: NodeClient<Direct>,
    pub info: DriverInfo,
    pub params: HashMap<String, String>,
    /// Whether CreateVolume also gets the PVC's and PV's names.
    pub extra_create_metadata: bool,
    /// The mount capability's fs_type ("" = the driver's default).
    pub fs_type: String,
    pub size: i64,
    pub block: bool,
    pub work_dir: PathBuf,
    /// Whether pods go through ControllerPublish/Unpublish: advertised and not
    /// skipped by the user.
    pub controller_publish: bool,
    /// Set by a signal: steps not yet begun are not begun.
    pub stop: Stop,
    /// The endpoint, when node calls are made as the kubelet makes them
    /// (`--kubelet-dials`): each on a connection dialled for it.
    pub kubelet_dials: Option<String>,
}

/// What external-provisioner makes of a StorageClass's parameters.
#[derive(Debug, PartialEq)]
pub struct StorageClass {
    /// What CreateVolume gets: every key outside `csi.storage.k8s.io/`.
    pub parameters: HashMap<String, String>,
    /// The mount capability's fs_type, in every call that carries a capability.
    pub fs_type: String,
    /// Secret references: the provisioner resolves them to the `secrets` fields of
    /// later calls; the bench has no Secrets to read, so they are left out.
    pub dropped: Vec<String>,
    /// Whether CreateVolume also gets the PVC's and PV's names.
    pub extra_create_metadata: bool,
}

/// Keys the provisioner keeps for itself.
pub const K8S_PREFIX: &str = "csi.storage.k8s.io/";

/// Whose secret a `csi.storage.k8s.io/<whose>secret-name` (or `-namespace`) key names.
const SECRET_USERS: [&str; 7] = [
    "",
    "provisioner-",
    "controller-publish-",
    "node-stage-",
    "node-publish-",
    "controller-expand-",
    "node-expand-",
];

/// The parameters as external-provisioner passes them on: the keys under
/// `csi.storage.k8s.io/` never reach CreateVolume; `fstype` there (or a key
/// spelled `fstype` in any case, deprecated but still read, and still passed on)
/// becomes the capability's fs_type; `--fs-type` (`flag`) sets it directly. A
/// prefixed key the provisioner does not know makes it refuse the class, and so
/// does an fs type given twice; so does the bench.
pub fn storage_class(
    params: &[(String, String)],
    flag: Option<&str>,
) -> Result<StorageClass, String> {
    let mut sc = StorageClass {
        parameters: HashMap::new(),
        fs_type: String::new(),
        dropped: Vec::new(),
        extra_create_metadata: false,
    };
    let mut fs_keys = 0;
    for (k, v) in params {
        let ours = k.strip_prefix(K8S_PREFIX);
        if k.eq_ignore_ascii_case("fstype") || ours == Some("fstype") {
            fs_keys += 1;
            sc.fs_type = v.clone();
        }
        match ours {
            None => {
                sc.parameters.insert(k.clone(), v.clone());
            }
            Some("fstype") => {}
            Some(rest)
                if ["secret-name", "secret-namespace"].iter().any(|end| {
                    rest.strip_suffix(end)
                        .is_some_and(|user| SECRET_USERS.contains(&user))
                }) =>
            {
                sc.dropped.push(k.clone())
            }
            Some(_) => {
                return Err(format!(
                    "parameter {k:?}: external-provisioner refuses unknown keys under {K8S_PREFIX}"
                ))
            }
        }
    }
    if fs_keys > 1 {
        return Err(format!(
            "the fs type is given twice (fstype and {K8S_PREFIX}fstype); external-provisioner refuses that"
        ));
    }
    if let Some(f) = flag {
        if !sc.fs_type.is_empty() && sc.fs_type != f {
            return Err(format!(
                "--fs-type {f} contradicts the parameters' fs type {}",
                sc.fs_type
            ));
        }
        sc.fs_type = f.to_string();
    }
    Ok(sc)
}

fn rpc_err(rpc: &'static str, s: tonic::Status) -> BenchError {
    BenchError::Rpc {
        rpc,
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// Times one call into `t` (successful or not: a failure still took that long).
/// The longest the bench waits for one call, as a sidecar would (then it gives up
/// on the run, which undoes what it made).
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

macro_rules! timed {
    ($t:expr, $name:literal, $call:expr) => {{
        let start = Instant::now();
        let r = match tokio::time::timeout(CALL_TIMEOUT, $call).await {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer in {} s",
                CALL_TIMEOUT.as_secs()
            ))),
        };
        $t.record($name, start.elapsed());
        r.map(|r| r.into_inner()).map_err(|s| rpc_err($name, s))
    }};
}

impl Session {
    pub async fn open(
        endpoint: &str,
        sc: StorageClass,
        size: i64,
        block: bool,
        work_dir: PathBuf,
    ) -> Result<Session, BenchError> {
        let channel = connect(endpoint).await?;
        let origin = Uri::from_static(localvol::client::ORIGIN);
        let mut identity = IdentityClient::with_origin(channel.clone(), origin.clone());
        let mut controller = ControllerClient::with_origin(channel.clone(), origin.clone());
        let mut node = NodeClient::with_origin(channel, origin);
        let plugin = identity
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .map_err(|s| rpc_err("GetPluginInfo", s))?
            .into_inner();
        let ctrl_caps: Vec<i32> = controller
            .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
            .await
            .map_err(|s| rpc_err("ControllerGetCapabilities", s))?
            .into_inner()
            .capabilities
            .into_iter()
            .filter_map(|c| match c.r#type {
                Some(controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
                _ => None,
            })
            .collect();
        let node_caps: Vec<i32> = node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
            .map_err(|s| rpc_err("NodeGetCapabilities", s))?
            .into_inner()
            .capabilities
            .into_iter()
            .filter_map(|c| match c.r#type {
                Some(node_service_capability::Type::Rpc(r)) => Some(r.r#type),
                _ => None,
            })
            .collect();
        let node_info = node
            .node_get_info(NodeGetInfoRequest {})
            .await
            .map_err(|s| rpc_err("NodeGetInfo", s))?
            .into_inner();
        let info = DriverInfo {
            name: plugin.name,
            version: plugin.vendor_version,
            node_id: node_info.node_id,
            topology: node_info.accessible_topology,
            controller_publish: ctrl_caps.contains(&(CtrlRpc::PublishUnpublishVolume as i32)),
            snapshots: ctrl_caps.contains(&(CtrlRpc::CreateDeleteSnapshot as i32)),
            node_stage: node_caps.contains(&(NodeRpc::StageUnstageVolume as i32)),
            rwo_mode: if ctrl_caps.contains(&(CtrlRpc::SingleNodeMultiWriter as i32))
                && node_caps.contains(&(NodeRpc::SingleNodeMultiWriter as i32))
            {
                Mode::SingleNodeMultiWriter
            } else {
                Mode::SingleNodeWriter
            },
        };
        Ok(Session {
            identity,
            controller,
            node,
            controller_publish: info.controller_publish,
            info,
            params: sc.parameters,
            extra_create_metadata: sc.extra_create_metadata,
            fs_type: sc.fs_type,
            size,
            block,
            work_dir,
            stop: Stop::default(),
            kubelet_dials: None,
        })
    }

    /// The client for one node call. The kubelet dials the socket for every node
    /// call and closes it after (its csiDriverClient makes a gRPC connection per
    /// method); the sidecars and, without `--kubelet-dials`, the bench keep one.
    async fn node_for_call(&self) -> Result<NodeClient<Direct>, tonic::Status> {
        match &self.kubelet_dials {
            None => Ok(self.node.clone()),
            Some(endpoint) => {
                let conn = connect(endpoint)
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                Ok(NodeClient::with_origin(
                    conn,
                    Uri::from_static(localvol::client::ORIGIN),
                ))
            }
        }
    }

    /// The NodeGetCapabilities calls the kubelet makes before a node call, each
    /// on its own connection (none without `--kubelet-dials`): whether the driver
    /// stages, and which single-node access modes it knows.
    async fn kubelet_asks_capabilities(
        &self,
        t: &mut Timings,
        times: usize,
    ) -> Result<(), BenchError> {
        if self.kubelet_dials.is_none() {
            return Ok(());
        }
        for _ in 0..times {
            timed!(t, "NodeGetCapabilities", async {
                self.node_for_call()
                    .await?
                    .node_get_capabilities(NodeGetCapabilitiesRequest {})
                    .await
            })?;
        }
        Ok(())
    }

    /// CreateVolume's parameters; with the PVC's and PV's names where the
    /// provisioner would add them (the bench's volume name stands for both).
    fn create_parameters(&self, name: &str) -> HashMap<String, String> {
        let mut p = self.params.clone();
        if self.extra_create_metadata {
            for (k, v) in [
                ("pvc/name", name),
                ("pvc/namespace", "localvol-bench"),
                ("pv/name", name),
            ] {
                p.insert(format!("{K8S_PREFIX}{k}"), v.to_string());
            }
        }
        p
    }

    /// One of each call that asks the driver for nothing it must look up: what
    /// they take is what every call pays for the socket, HTTP/2, the codec and
    /// the machine's thread wake-ups. Probe comes last: a driver may check its
    /// health there (localvol looks at its root, on its blocking pool).
    pub async fn idle_calls(&mut self, t: &mut Timings) -> Result<(), BenchError> {
        timed!(
            t,
            "NodeGetCapabilities",
            self.node
                .node_get_capabilities(NodeGetCapabilitiesRequest {})
        )?;
        timed!(
            t,
            "ControllerGetCapabilities",
            self.controller
                .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        )?;
        timed!(t, "Probe", self.identity.probe(ProbeRequest {}))?;
        Ok(())
    }

    pub fn capability(&self) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(if self.block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: self.fs_type.clone(),
                    ..Default::default()
                })
            }),
            access_mode: Some(AccessMode {
                mode: self.info.rwo_mode as i32,
            }),
        }
    }

    pub async fn create(
        &mut self,
        t: &mut Timings,
        name: &str,
        source: Option<VolumeContentSource>,
    ) -> Result<Volume, BenchError> {
        let req = CreateVolumeRequest {
            name: name.to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: self.size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![self.capability()],
            parameters: self.create_parameters(name),
            volume_content_source: source,
            accessibility_requirements: self.info.topology.clone().map(|t| TopologyRequirement {
                requisite: vec![t.clone()],
                preferred: vec![t],
            }),
            ..Default::default()
        };
        let resp = timed!(t, "CreateVolume", self.controller.create_volume(req))?;
        resp.volume.ok_or(BenchError::Protocol(
            "CreateVolume answered without a volume",
        ))
    }

    pub async fn delete(&mut self, t: &mut Timings, id: &str) -> Result<(), BenchError> {
        let req = DeleteVolumeRequest {
            volume_id: id.to_string(),
            secrets: Default::default(),
        };
        timed!(t, "DeleteVolume", self.controller.delete_volume(req)).map(|_| ())
    }
}

/// One volume as a pod sees it; records which steps are done so a failure in the
/// middle undoes exactly those and leaves no mount behind.
pub struct Pod {
    pub volume: Volume,
    pub staging: PathBuf,
    pub target: PathBuf,
    publish_context: HashMap<String, String>,
    controller_published: bool,
    staged: bool,
    published: bool,
}

impl Pod {
    /// Paths under the work dir, named after the volume name (unique per run).
    pub fn new(s: &Session, volume: Volume, name: &str) -> Pod {
        Pod {
            staging: s.work_dir.join("staging").join(name),
            target: s.work_dir.join("pods").join(name).join("mount"),
            volume,
            publish_context: HashMap::new(),
            controller_published: false,
            staged: false,
            published: false,
        }
    }

    /// ControllerPublish (if advertised and not skipped), NodeStage (if
    /// advertised), NodePublish; a signal stops it between them (`down` undoes).
    pub async fn up(&mut self, s: &mut Session, t: &mut Timings) -> Result<(), BenchError> {
        let cap = s.capability();
        let id = self.volume.volume_id.clone();
        if s.controller_publish {
            s.stop.check()?;
            let req = ControllerPublishVolumeRequest {
                volume_id: id.clone(),
                node_id: s.info.node_id.clone(),
                volume_capability: Some(cap.clone()),
                readonly: false,
                secrets: Default::default(),
                volume_context: self.volume.volume_context.clone(),
            };
            // Marked before the call, as for every step: a timed-out call may
            // still have done its work, and `down` undoes it (an undo of nothing
            // is OK for a conformant driver).
            self.controller_published = true;
            let r = timed!(
                t,
                "ControllerPublishVolume",
                s.controller.controller_publish_volume(req)
            )?;
            self.publish_context = r.publish_context;
        }
        if s.info.node_stage {
            s.stop.check()?;
            // Kubelet creates the staging directory; the driver only mounts on it.
            std::fs::create_dir_all(&self.staging).map_err(|e| io_err(&self.staging, e))?;
            let req = NodeStageVolumeRequest {
                volume_id: id.clone(),
                publish_context: self.publish_context.clone(),
                staging_target_path: self.staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                secrets: Default::default(),
                volume_context: self.volume.volume_context.clone(),
            };
            // Kubelet's MountDevice: does it stage? Then NodeStageVolume, which
            // first asks again for the access modes.
            s.kubelet_asks_capabilities(t, 2).await?;
            self.staged = true;
            timed!(t, "NodeStageVolume", async {
                s.node_for_call().await?.node_stage_volume(req).await
            })?;
        }
        s.stop.check()?;
        // Kubelet creates only the parent of the target; the driver makes the target.
        let parent = self.target.parent().expect("target has a parent");
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
        let req = NodePublishVolumeRequest {
            volume_id: id,
            publish_context: self.publish_context.clone(),
            staging_target_path: if s.info.node_stage {
                self.staging.display().to_string()
            } else {
                String::new()
            },
            target_path: self.target.display().to_string(),
            volume_capability: Some(cap),
            readonly: false,
            secrets: Default::default(),
            volume_context: self.volume.volume_context.clone(),
        };
        // Kubelet's SetUp: does it stage? Then NodePublishVolume, which first asks
        // again for the access modes.
        s.kubelet_asks_capabilities(t, 2).await?;
        self.published = true;
        timed!(t, "NodePublishVolume", async {
            s.node_for_call().await?.node_publish_volume(req).await
        })?;
        Ok(())
    }

    /// Undoes what `up` did, in reverse; tries every step and returns the first error.
    pub async fn down(&mut self, s: &mut Session, t: &mut Timings) -> Result<(), BenchError> {
        let id = self.volume.volume_id.clone();
        let mut first: Option<BenchError> = None;
        let mut keep = |r: Result<(), BenchError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if self.published {
            let req = NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: self.target.display().to_string(),
            };
            let r = timed!(t, "NodeUnpublishVolume", async {
                s.node_for_call().await?.node_unpublish_volume(req).await
            });
            self.published = r.is_err();
            keep(r.map(|_| ()));
        }
        if self.staged {
            let req = NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: self.staging.display().to_string(),
            };
            // Kubelet's UnmountDevice asks whether the driver stages first.
            let r = match s.kubelet_asks_capabilities(t, 1).await {
                Ok(()) => timed!(t, "NodeUnstageVolume", async {
                    s.node_for_call().await?.node_unstage_volume(req).await
                }),
                Err(e) => Err(e),
            };
            self.staged = r.is_err();
            keep(r.map(|_| ()));
        }
        if self.controller_published {
            let req = ControllerUnpublishVolumeRequest {
                volume_id: id,
                node_id: s.info.node_id.clone(),
                secrets: Default::default(),
            };
            let r = timed!(
                t,
                "ControllerUnpublishVolume",
                s.controller.controller_unpublish_volume(req)
            );
            self.controller_published = r.is_err();
            keep(r.map(|_| ()));
        }
        // Only empty directories are removed (never recursively): if a mount is
        // left behind, its data stays and the error says so.
        if !self.published && !self.staged {
            for d in [
                self.target.as_path(),
                self.target.parent().unwrap(),
                &self.staging,
            ] {
                match std::fs::remove_dir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => keep(Err(io_err(d, e))),
                }
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

pub fn io_err(path: &Path, e: std::io::Error) -> BenchError {
    BenchError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// What a pod does with its volume: 4 KiB written and made durable.
pub fn write_and_fsync(target: &Path) -> Result<(), BenchError> {
    use std::io::Write;
    let path = target.join("localvol-bench.dat");
    let mut f = std::fs::File::create(&path).map_err(|e| io_err(&path, e))?;
    f.write_all(&[0x5a; 4096]).map_err(|e| io_err(&path, e))?;
    f.sync_all().map_err(|e| io_err(&path, e))
}

/// One full pod lifecycle; on failure or a signal, undoes what was done and
/// deletes the volume.
pub async fn cycle(s: &mut Session, t: &mut Timings, name: &str) -> Result<(), BenchError> {
    let volume = s.create(t, name, None).await?;
    let mut pod = Pod::new(s, volume, name);
    let mut result = pod.up(s, t).await.and_then(|()| s.stop.check());
    if result.is_ok() {
        // On the blocking pool: a pod's fsync is another process's; it must not
        // hold up the calls of the other cycles in flight, as a kubelet's are not.
        let start = Instant::now();
        let (target, block) = (pod.target.clone(), s.block);
        result = tokio::task::spawn_blocking(move || {
            if block {
                super::io::write_and_fsync_device(&target)
            } else {
                write_and_fsync(&target)
            }
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        t.record("write+fsync 4KiB", start.elapsed());
    }
    let down = pod.down(s, t).await;
    let result = BenchError::and_undo(result, down);
    if pod.published || pod.staged || pod.controller_published {
        // Deleting a volume still in use would fail anyway; leave it for the user.
        return result;
    }
    let del = s.delete(t, &pod.volume.volume_id.clone()).await;
    BenchError::and_undo(result, del)
}
