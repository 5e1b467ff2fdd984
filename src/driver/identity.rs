//! The CSI Identity service.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic::{Request, Response, Status};

use super::observe::{Ids, Observer, rpc_with};
use crate::csi::identity_server::Identity;
use crate::csi::plugin_capability::{self, service, volume_expansion};
use crate::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// Identity service. `ready` flips to true once the services behind it are usable.
#[derive(Debug, Clone)]
pub struct IdentityService {
    controller: bool,
    ready: Arc<AtomicBool>,
    obs: Observer,
}

impl IdentityService {
    /// `controller` says whether this process serves the Controller service.
    pub fn new(controller: bool, ready: Arc<AtomicBool>) -> Self {
        Self {
            controller,
            ready,
            obs: Observer::default(),
        }
    }

    /// Record this service's RPCs in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.obs = Observer::with_metrics(metrics);
        self
    }

    fn capabilities(&self) -> Vec<PluginCapability> {
        let svc = |t: service::Type| PluginCapability {
            r#type: Some(plugin_capability::Type::Service(
                plugin_capability::Service { r#type: t as i32 },
            )),
        };
        let mut caps = Vec::new();
        if self.controller {
            caps.push(svc(service::Type::ControllerService));
        }
        caps.push(svc(service::Type::VolumeAccessibilityConstraints));
        // The cloud extends only detached volumes, so expansion is offline.
        caps.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: volume_expansion::Type::Offline as i32,
                },
            )),
        });
        caps
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        rpc_with(&self.obs, "GetPluginInfo", Ids::default(), async {
            Ok(GetPluginInfoResponse {
                name: crate::DRIVER_NAME.to_string(),
                vendor_version: crate::VERSION.to_string(),
                manifest: Default::default(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        rpc_with(&self.obs, "GetPluginCapabilities", Ids::default(), async {
            Ok(GetPluginCapabilitiesResponse {
                capabilities: self.capabilities(),
            })
        })
        .await
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        rpc_with(&self.obs, "Probe", Ids::default(), async {
            Ok(ProbeResponse {
                ready: Some(self.ready.load(Ordering::Acquire)),
            })
        })
        .await
    }
}
