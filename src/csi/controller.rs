//! CSI Controller: volume lifecycle, capacity and listing.

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};

use super::{
    answer, capabilities, capability, capability_to_proto, required, run, segments, topology,
    Shared,
};
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::{self as csc, rpc};
use crate::proto::*;
use crate::store::{ContentSource, SnapshotRecord, VolumeRecord};
use crate::volumes::{CreateRequest, Driver};

pub struct ControllerService {
    pub driver: Shared,
}

/// The capabilities this controller advertises.
pub const CAPABILITIES: &[rpc::Type] = &[
    rpc::Type::CreateDeleteVolume,
    rpc::Type::ListVolumes,
    rpc::Type::GetCapacity,
    rpc::Type::GetVolume,
    rpc::Type::VolumeCondition,
    rpc::Type::PublishUnpublishVolume,
    rpc::Type::PublishReadonly,
    rpc::Type::ListVolumesPublishedNodes,
    rpc::Type::SingleNodeMultiWriter,
    rpc::Type::ExpandVolume,
    rpc::Type::CreateDeleteSnapshot,
    rpc::Type::ListSnapshots,
    rpc::Type::GetSnapshot,
    rpc::Type::CloneVolume,
];

pub fn volume_to_proto(driver: &Driver, rec: &VolumeRecord) -> Volume {
    let content_source = rec.source.as_ref().map(|s| VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => {
                volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                    snapshot_id: id.clone(),
                })
            }
            ContentSource::Volume(id) => {
                volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                    volume_id: id.clone(),
                })
            }
        }),
    });
    Volume {
        capacity_bytes: rec.capacity_bytes as i64,
        volume_id: rec.id.clone(),
        volume_context: volume_context(rec),
        content_source,
        accessible_topology: driver.topology_of(rec).iter().map(topology).collect(),
    }
}

/// What CreateVolume tells the CO about a volume, and ValidateVolumeCapabilities
/// checks against.
fn volume_context(rec: &VolumeRecord) -> std::collections::HashMap<String, String> {
    let mut context = std::collections::HashMap::new();
    context.insert(
        "type".to_string(),
        format!("{:?}", rec.volume_type).to_lowercase(),
    );
    if let Some(fs) = &rec.fs_type {
        context.insert("fsType".to_string(), fs.clone());
    }
    context
}

fn content_source(src: &Option<VolumeContentSource>) -> Result<Option<ContentSource>, Status> {
    use volume_content_source::Type;
    match src.as_ref().map(|s| &s.r#type) {
        None => Ok(None),
        Some(Some(Type::Snapshot(s))) => Ok(Some(ContentSource::Snapshot(
            required("snapshot_id", &s.snapshot_id)?.to_string(),
        ))),
        Some(Some(Type::Volume(v))) => Ok(Some(ContentSource::Volume(
            required("volume_id", &v.volume_id)?.to_string(),
        ))),
        Some(None) => Err(Status::invalid_argument(
            "volume_content_source names no source",
        )),
    }
}

fn volume_status(driver: &Driver, rec: &VolumeRecord) -> (Vec<String>, VolumeCondition) {
    let c = driver.condition(rec);
    (
        rec.attachments.keys().cloned().collect(),
        VolumeCondition {
            abnormal: c.abnormal,
            message: c.message,
        },
    )
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = r.name.clone();
        let driver = self.driver.clone();
        run("CreateVolume", &name, move || {
            let range = r.capacity_range.unwrap_or_default();
            let topo = r.accessibility_requirements.unwrap_or_default();
            let req = CreateRequest {
                name: r.name,
                required_bytes: range.required_bytes,
                limit_bytes: range.limit_bytes,
                capabilities: capabilities(&r.volume_capabilities)?,
                parameters: r.parameters.into_iter().collect(),
                source: content_source(&r.volume_content_source)
                    .map_err(|s| crate::error::Error::InvalidArgument(s.message().to_string()))?,
                requisite: segments(&topo.requisite),
                preferred: segments(&topo.preferred),
            };
            let rec = driver.create_volume(req)?;
            Ok(Response::new(CreateVolumeResponse {
                volume: Some(volume_to_proto(&driver, &rec)),
            }))
        })
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        let driver = self.driver.clone();
        let log_id = id.clone();
        run("DeleteVolume", &log_id, move || {
            driver.delete_volume(&id)?;
            Ok(Response::new(DeleteVolumeResponse {}))
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        required("node_id", &r.node_id)?;
        let cap = super::required_capability(&r.volume_capability)?;
        let driver = self.driver.clone();
        run("ControllerPublishVolume", &id.clone(), move || {
            driver.controller_publish(&id, &r.node_id, &cap, r.readonly)?;
            Ok(Response::new(ControllerPublishVolumeResponse {
                publish_context: Default::default(),
            }))
        })
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        let driver = self.driver.clone();
        run("ControllerUnpublishVolume", &id.clone(), move || {
            driver.controller_unpublish(&id, &r.node_id)?;
            Ok(Response::new(ControllerUnpublishVolumeResponse {}))
        })
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities are required"));
        }
        let driver = self.driver.clone();
        run("ValidateVolumeCapabilities", &id.clone(), move || {
            let caps = capabilities(&r.volume_capabilities)?;
            let params: std::collections::BTreeMap<_, _> =
                r.parameters.clone().into_iter().collect();
            let checked = driver
                .validate_capabilities(&id, &caps, &params)?
                .and_then(|rec| {
                    if !r.mutable_parameters.is_empty() {
                        return Err(
                            "mutable parameters are not supported: this driver does not \
                                    modify volumes"
                                .to_string(),
                        );
                    }
                    // Keys of ours must agree; others (the CO's own) are not ours to judge.
                    let context = volume_context(&rec);
                    let ours_differ = r.volume_context.iter().any(|(k, v)| {
                        ["type", "fsType"].contains(&k.as_str()) && context.get(k) != Some(v)
                    });
                    if ours_differ {
                        return Err(format!(
                            "the volume context is not the volume's: it is {context:?}"
                        ));
                    }
                    Ok(())
                });
            let answer = match checked {
                Ok(()) => ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(validate_volume_capabilities_response::Confirmed {
                        volume_context: r.volume_context,
                        volume_capabilities: caps.iter().map(capability_to_proto).collect(),
                        parameters: r.parameters,
                        mutable_parameters: r.mutable_parameters,
                    }),
                    message: String::new(),
                },
                Err(why) => ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: why,
                },
            };
            Ok(Response::new(answer))
        })
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let r = request.into_inner();
        let driver = self.driver.clone();
        run("ListVolumes", "", move || {
            let (recs, next) = driver.list_volumes(&r.starting_token, r.max_entries)?;
            let entries = recs
                .iter()
                .map(|rec| {
                    let (nodes, condition) = volume_status(&driver, rec);
                    list_volumes_response::Entry {
                        volume: Some(volume_to_proto(&driver, rec)),
                        status: Some(list_volumes_response::VolumeStatus {
                            published_node_ids: nodes,
                            volume_condition: Some(condition),
                        }),
                    }
                })
                .collect();
            Ok(Response::new(ListVolumesResponse {
                entries,
                next_token: next.unwrap_or_default(),
            }))
        })
        .await
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let r = request.into_inner();
        let driver = self.driver.clone();
        run("GetCapacity", "", move || {
            let caps = capabilities(&r.volume_capabilities)?;
            let seg = r
                .accessible_topology
                .map(|t| t.segments.into_iter().collect());
            let params = r.parameters.into_iter().collect();
            let available = driver.capacity(seg.as_ref(), &caps, &params)?;
            // The largest volume that fits without overcommitting the node is
            // all of it; Kubernetes' scheduler prefers this figure when it is set.
            let available = i64::try_from(available).unwrap_or(i64::MAX);
            Ok(Response::new(GetCapacityResponse {
                available_capacity: available,
                maximum_volume_size: Some(available),
                minimum_volume_size: None,
            }))
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let node_only = self.driver.cfg.node_expansion_only;
        let capabilities = CAPABILITIES
            .iter()
            .filter(|t| !(node_only && **t == rpc::Type::ExpandVolume))
            .map(|t| ControllerServiceCapability {
                r#type: Some(csc::Type::Rpc(csc::Rpc { r#type: *t as i32 })),
            })
            .collect();
        answer("ControllerGetCapabilities", "", async {
            Ok(Response::new(ControllerGetCapabilitiesResponse {
                capabilities,
            }))
        })
        .await
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let name = required("name", &r.name)?.to_string();
        let source = required("source_volume_id", &r.source_volume_id)?.to_string();
        let parameters: BTreeMap<String, String> = r.parameters.into_iter().collect();
        let driver = self.driver.clone();
        run("CreateSnapshot", &source.clone(), move || {
            let snap = driver.create_snapshot(&name, &source, &parameters)?;
            if !snap.ready() {
                crate::snapshots::finish_in_background(&driver, snap.id.clone());
            }
            Ok(Response::new(CreateSnapshotResponse {
                snapshot: Some(snapshot_to_proto(&snap)),
            }))
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let id = required("snapshot_id", &request.get_ref().snapshot_id)?.to_string();
        let driver = self.driver.clone();
        run("DeleteSnapshot", &id.clone(), move || {
            driver.delete_snapshot(&id)?;
            Ok(Response::new(DeleteSnapshotResponse {}))
        })
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        let driver = self.driver.clone();
        run("ListSnapshots", "", move || {
            let (snaps, next) = driver.list_snapshots(
                &r.snapshot_id,
                &r.source_volume_id,
                &r.starting_token,
                r.max_entries,
            )?;
            Ok(Response::new(ListSnapshotsResponse {
                entries: snaps
                    .iter()
                    .map(|s| list_snapshots_response::Entry {
                        snapshot: Some(snapshot_to_proto(s)),
                    })
                    .collect(),
                next_token: next.unwrap_or_default(),
            }))
        })
        .await
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let id = required("snapshot_id", &request.get_ref().snapshot_id)?.to_string();
        let driver = self.driver.clone();
        run("GetSnapshot", &id.clone(), move || {
            let snap = driver.snapshot(&id)?;
            Ok(Response::new(GetSnapshotResponse {
                snapshot: Some(snapshot_to_proto(&snap)),
            }))
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        // Not advertised in this mode (the CO must not call it): the spec's
        // UNIMPLEMENTED for a call disabled in the plugin's mode of operation.
        if self.driver.cfg.node_expansion_only {
            return answer(
                "ControllerExpandVolume",
                &request.get_ref().volume_id,
                async {
                    Err(Status::unimplemented(
                        "ControllerExpandVolume is not offered: this driver runs with \
                     --node-expansion-only (no EXPAND_VOLUME controller capability); \
                     NodeExpandVolume on the volume's node grows it",
                    ))
                },
            )
            .await;
        }
        let r = request.into_inner();
        let id = required("volume_id", &r.volume_id)?.to_string();
        let range = r
            .capacity_range
            .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        let cap = r.volume_capability.as_ref().map(capability).transpose()?;
        let driver = self.driver.clone();
        run("ControllerExpandVolume", &id.clone(), move || {
            let (bytes, node) =
                driver.expand_volume(&id, range.required_bytes, range.limit_bytes, cap.as_ref())?;
            Ok(Response::new(ControllerExpandVolumeResponse {
                capacity_bytes: bytes as i64,
                node_expansion_required: node,
            }))
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        required("volume_id", &id)?;
        let driver = self.driver.clone();
        run("ControllerGetVolume", &id.clone(), move || {
            let rec = driver.volume(&id)?;
            let (nodes, condition) = volume_status(&driver, &rec);
            Ok(Response::new(ControllerGetVolumeResponse {
                volume: Some(volume_to_proto(&driver, &rec)),
                status: Some(controller_get_volume_response::VolumeStatus {
                    published_node_ids: nodes,
                    volume_condition: Some(condition),
                }),
            }))
        })
        .await
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        answer("ControllerModifyVolume", "", async {
            Err(Status::unimplemented(
                "ControllerModifyVolume is not offered by this driver (no MODIFY_VOLUME capability)",
            ))
        })
        .await
    }
}

/// A snapshot as CSI shows it: ready once its data is durable.
fn snapshot_to_proto(s: &SnapshotRecord) -> Snapshot {
    Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created_unix,
            nanos: s.created_nanos,
        }),
        ready_to_use: s.ready(),
        group_snapshot_id: String::new(),
    }
}
