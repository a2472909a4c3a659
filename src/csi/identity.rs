//! CSI Identity: who the plugin is, what it offers, whether it is ready.

use tonic::{Request, Response, Status};

use super::{answer, run, Shared};
use crate::error::Error;
use crate::proto::identity_server::Identity;
use crate::proto::plugin_capability::{self, service};
use crate::proto::*;

pub struct IdentityService {
    pub driver: Shared,
}

fn service_cap(t: service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        answer("GetPluginInfo", "", async {
            Ok(Response::new(GetPluginInfoResponse {
                name: self.driver.cfg.driver_name.clone(),
                vendor_version: crate::VERSION.to_string(),
                manifest: Default::default(),
            }))
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        answer("GetPluginCapabilities", "", async {
            Ok(Response::new(GetPluginCapabilitiesResponse {
                capabilities: vec![
                    service_cap(service::Type::ControllerService),
                    service_cap(service::Type::VolumeAccessibilityConstraints),
                    // Loop filesystems grow while mounted; nothing needs a pod stopped.
                    PluginCapability {
                        r#type: Some(plugin_capability::Type::VolumeExpansion(
                            plugin_capability::VolumeExpansion {
                                r#type: plugin_capability::volume_expansion::Type::Online as i32,
                            },
                        )),
                    },
                ],
            }))
        })
        .await
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        // The check touches the root, which can hang with its disk: it runs on the
        // blocking pool under the deadline, never on the one gRPC thread.
        let driver = self.driver.clone();
        run("Probe", "", move || {
            if !driver.probe() {
                return Err(Error::FailedPrecondition(format!(
                    "driver root {} is not usable (missing or not writable)",
                    driver.layout.root.display()
                )));
            }
            Ok(Response::new(ProbeResponse { ready: Some(true) }))
        })
        .await
    }
}
