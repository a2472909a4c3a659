//! CSI Node: staging, publishing, stats and the node's identity.

use tonic::{Request, Response, Status};

use super::{answer, capability, required, required_capability, run, topology, Shared};
use crate::error::Error;
use crate::ids::check_path;
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::{self as nsc, rpc};
use crate::proto::*;
use crate::publish::{PublishRequest, VolumeStats};

pub struct NodeService {
    pub driver: Shared,
}

pub const CAPABILITIES: &[rpc::Type] = &[
    rpc::Type::StageUnstageVolume,
    rpc::Type::GetVolumeStats,
    rpc::Type::VolumeCondition,
    rpc::Type::SingleNodeMultiWriter,
    rpc::Type::ExpandVolume,
];

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        let staging = check_path("staging_target_path", &r.staging_target_path)?;
        let cap = required_capability(&r.volume_capability)?;
        let driver = self.driver.clone();
        run("NodeStageVolume", &id.clone(), move || {
            driver.outside_own_dirs("staging_target_path", &staging)?;
            driver.stage(&id, &staging, &cap)?;
            Ok(Response::new(NodeStageVolumeResponse {}))
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        let staging = check_path("staging_target_path", &r.staging_target_path)?;
        let driver = self.driver.clone();
        run("NodeUnstageVolume", &id.clone(), move || {
            driver.outside_own_dirs("staging_target_path", &staging)?;
            driver.unstage(&id, &staging)?;
            Ok(Response::new(NodeUnstageVolumeResponse {}))
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        let target_path = check_path("target_path", &r.target_path)?;
        let capability = required_capability(&r.volume_capability)?;
        // STAGE_UNSTAGE_VOLUME is offered, so the spec names FAILED_PRECONDITION.
        if r.staging_target_path.is_empty() {
            return Err(Status::failed_precondition(
                "staging_target_path is required: this driver stages volumes \
                 (NodeStageVolume) before they are published",
            ));
        }
        let staging_path = check_path("staging_target_path", &r.staging_target_path)?;
        let req = PublishRequest {
            volume_id: id.clone(),
            staging_path,
            target_path,
            capability,
            readonly: r.readonly,
        };
        let driver = self.driver.clone();
        run("NodePublishVolume", &id, move || {
            driver.outside_own_dirs("staging_target_path", &req.staging_path)?;
            driver.outside_own_dirs("target_path", &req.target_path)?;
            driver.publish(&req)?;
            Ok(Response::new(NodePublishVolumeResponse {}))
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        let target = check_path("target_path", &r.target_path)?;
        let driver = self.driver.clone();
        run("NodeUnpublishVolume", &id.clone(), move || {
            driver.outside_own_dirs("target_path", &target)?;
            driver.unpublish(&id, &target)?;
            Ok(Response::new(NodeUnpublishVolumeResponse {}))
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        required("volume_path", &r.volume_path)?;
        let path = check_path("volume_path", &r.volume_path);
        let driver = self.driver.clone();
        run("NodeGetVolumeStats", &id.clone(), move || {
            // An unknown volume is NOT_FOUND whatever the path; a known one is not
            // found at a path that cannot be a mount point (the spec's row "volume
            // does not exist on specified volume_path").
            driver.volume(&id)?;
            let path = path.map_err(|e| {
                Error::NotFound(format!("{e}: volume {id} cannot be mounted there"))
            })?;
            let (stats, c) = driver.stats(&id, &path)?;
            let usage =
                |unit: volume_usage::Unit, total: u64, used: u64, available: u64| VolumeUsage {
                    total: total as i64,
                    used: used as i64,
                    available: available as i64,
                    unit: unit as i32,
                };
            let usage = match stats {
                VolumeStats::Block { bytes } => {
                    vec![usage(volume_usage::Unit::Bytes, bytes, 0, 0)]
                }
                VolumeStats::Filesystem(u) => vec![
                    usage(
                        volume_usage::Unit::Bytes,
                        u.total_bytes,
                        u.used_bytes,
                        u.available_bytes,
                    ),
                    usage(
                        volume_usage::Unit::Inodes,
                        u.total_inodes,
                        u.used_inodes,
                        u.available_inodes,
                    ),
                ],
            };
            Ok(Response::new(NodeGetVolumeStatsResponse {
                usage,
                volume_condition: Some(VolumeCondition {
                    abnormal: c.abnormal,
                    message: c.message,
                }),
            }))
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        required("volume_path", &r.volume_path)?;
        let path = check_path("volume_path", &r.volume_path);
        let (required_bytes, limit_bytes) = r
            .capacity_range
            .map_or((0, 0), |c| (c.required_bytes, c.limit_bytes));
        let block = match &r.volume_capability {
            Some(c) => capability(c)?.is_block(),
            None => false,
        };
        let driver = self.driver.clone();
        run("NodeExpandVolume", &id.clone(), move || {
            // An unknown volume is NOT_FOUND whatever the path.
            driver.volume(&id)?;
            let path = path?;
            let bytes = driver.node_expand(&id, &path, required_bytes, limit_bytes, block)?;
            Ok(Response::new(NodeExpandVolumeResponse {
                capacity_bytes: bytes as i64,
            }))
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|t| NodeServiceCapability {
                r#type: Some(nsc::Type::Rpc(nsc::Rpc { r#type: *t as i32 })),
            })
            .collect();
        answer("NodeGetCapabilities", "", async {
            Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
        })
        .await
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        answer("NodeGetInfo", "", async {
            Ok(Response::new(NodeGetInfoResponse {
                node_id: self.driver.cfg.node_id.clone(),
                max_volumes_per_node: 0,
                accessible_topology: Some(topology(&self.driver.this_node_segment())),
            }))
        })
        .await
    }
}
