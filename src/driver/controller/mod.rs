//! The CSI Controller service: volumes, attachments and snapshots on the Luna Node API.
//!
//! The handlers live in [`volumes`], [`attach`] and [`snapshots`]; this file holds the
//! configuration, the shared state and the gRPC trait, which only validates that the
//! service is reachable, wraps each call in [`observe::rpc`] and dispatches.

mod attach;
mod intents;
mod snapshots;
mod volumes;
pub mod wait;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::error::Error;
use super::inflight::InFlight;
use super::observe::{Ids, Observer, rpc_with};
use super::validate;
use crate::csi::controller_server::Controller;
use crate::csi::controller_service_capability::{self, rpc::Type as RpcType};
use crate::csi::*;
use crate::lunanode::Client;
use wait::{Backoff, Deadline, WaitPolicy, Waits};

/// Controller settings.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Where volumes go when neither the StorageClass nor the topology says.
    pub default_region: String,
    /// Every region the driver manages (ListSnapshots with no filter looks in each).
    pub regions: Vec<String>,
    /// Size of a volume created without a capacity range.
    pub default_size_gb: u64,
    pub min_size_gb: u64,
    pub max_size_gb: u64,
    /// How long an RPC may wait for the cloud when the CO set no deadline.
    pub default_timeout: Duration,
    /// How long a create with an unknown outcome (lost reply, timeout, cancelled call)
    /// blocks creating the same name again while the driver waits for it to appear.
    pub unknown_create_grace: Duration,
    /// The fixed schedule, and the cap of the learnt one's fallback.
    pub backoff: Backoff,
    /// Learnt or fixed waits.
    pub wait: WaitPolicy,
    /// `volume/attach`'s `target`: the bus the disk is attached on (see [`ATTACH_TARGET`]).
    pub attach_target: String,
}

/// The attach target by default: the virtio bus, as Luna Node's own code attaches. The
/// reference documents `target` as the bus (`/dev/vda` virtio, `/dev/hda` IDE); `auto` is
/// undocumented and, on a VM created without `volume_virtio`, may attach on IDE.
pub const ATTACH_TARGET: &str = "/dev/vda";

/// Whether `target` is one `volume/attach` takes: `auto`, or a device path naming a bus
/// (`/dev/vdX` virtio, `/dev/sdX` SCSI, `/dev/hdX` IDE).
pub fn valid_attach_target(target: &str) -> bool {
    target == "auto"
        || ["/dev/vd", "/dev/sd", "/dev/hd"].iter().any(|bus| {
            target
                .strip_prefix(bus)
                .is_some_and(|l| l.len() == 1 && l.as_bytes()[0].is_ascii_lowercase())
        })
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            default_region: "toronto".into(),
            regions: crate::lunanode::REGIONS
                .iter()
                .map(|r| r.to_string())
                .collect(),
            default_size_gb: 10,
            min_size_gb: 1,
            max_size_gb: 16_384,
            default_timeout: Duration::from_secs(300),
            unknown_create_grace: Duration::from_secs(60),
            backoff: Backoff::default(),
            wait: WaitPolicy::default(),
            attach_target: ATTACH_TARGET.to_string(),
        }
    }
}

/// The Controller service. Cheap to clone.
#[derive(Clone)]
pub struct ControllerService {
    inner: Arc<Inner>,
    obs: Observer,
}

pub(crate) struct Inner {
    client: Client,
    cfg: ControllerConfig,
    inflight: InFlight,
    /// VM ID → region. A VM never changes region, so this never goes stale; a VM that is
    /// deleted is caught by the cloud when attaching to it.
    vm_regions: Mutex<HashMap<String, String>>,
    /// The list has been seen calling a settled volume `active` (logged once: the operator
    /// learns which of the documented vocabularies the cloud uses).
    list_words_seen: std::sync::atomic::AtomicBool,
    /// Creates whose outcome is unknown, by name.
    intents: intents::Intents,
    /// Snapshot ID → when this process first saw it (the API gives no snapshot time).
    snapshot_first_seen: Mutex<HashMap<String, std::time::SystemTime>>,
    /// How long each kind of transition takes, and the waits that learn it.
    waits: Waits,
}

impl ControllerService {
    /// A controller talking to the cloud through `client`.
    pub fn new(client: Client, cfg: ControllerConfig) -> Self {
        let unknown_create_grace = cfg.unknown_create_grace;
        let waits = Waits::new(cfg.wait, cfg.backoff);
        Self {
            inner: Arc::new(Inner {
                waits,
                client,
                cfg,
                inflight: InFlight::default(),
                vm_regions: Mutex::new(HashMap::new()),
                list_words_seen: std::sync::atomic::AtomicBool::new(false),
                snapshot_first_seen: Mutex::new(HashMap::new()),
                intents: intents::Intents::new(unknown_create_grace),
            }),
            obs: Observer::default(),
        }
    }

    /// Record this service's RPCs in `metrics` (the client records its API requests:
    /// see [`Client::with_metrics`]).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.inner.waits.set_metrics(metrics.clone());
        self.obs = Observer::with_metrics(metrics);
        self
    }
}

impl Inner {
    fn deadline<T>(&self, req: &Request<T>) -> Deadline {
        Deadline::new(
            validate::grpc_timeout(req.metadata()),
            self.cfg.default_timeout,
        )
    }

    /// Claim a volume for this call; a concurrent call on it gets ABORTED.
    fn lock_volume(&self, volume_id: &str) -> Result<super::inflight::Guard, Error> {
        self.inflight
            .lock(&format!("vol:{volume_id}"), &format!("volume {volume_id}"))
    }

    fn topology(region: &str) -> Vec<Topology> {
        vec![Topology {
            segments: HashMap::from([(crate::TOPOLOGY_KEY.to_string(), region.to_string())]),
        }]
    }
}

/// A volume in a transitional status: the CO should retry shortly (ABORTED).
fn busy(vref: &crate::driver::ids::VolumeRef, vol: &crate::lunanode::Volume) -> Error {
    Error::Aborted(format!(
        "volume {vref} is busy (status {:?}); retry once it settles",
        vol.status
    ))
}

const CAPABILITIES: &[RpcType] = &[
    RpcType::CreateDeleteVolume,
    RpcType::PublishUnpublishVolume,
    RpcType::ListVolumes,
    RpcType::ListVolumesPublishedNodes,
    RpcType::GetVolume,
    RpcType::VolumeCondition,
    RpcType::CreateDeleteSnapshot,
    RpcType::ListSnapshots,
    RpcType::CloneVolume,
    RpcType::ExpandVolume,
    RpcType::SingleNodeMultiWriter,
];

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Reply<CreateVolumeResponse> {
        let deadline = self.inner.deadline(&req);
        let r = req.into_inner();
        let work = self.inner.create_volume(&r, deadline);
        rpc_with(&self.obs, "CreateVolume", Ids::named(&r.name), work).await
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Reply<DeleteVolumeResponse> {
        let r = req.into_inner();
        let work = self.inner.delete_volume(&r);
        rpc_with(&self.obs, "DeleteVolume", Ids::volume(&r.volume_id), work).await
    }

    async fn controller_publish_volume(
        &self,
        req: Request<ControllerPublishVolumeRequest>,
    ) -> Reply<ControllerPublishVolumeResponse> {
        let deadline = self.inner.deadline(&req);
        let r = req.into_inner();
        let ids = Ids::volume(&r.volume_id).on_node(&r.node_id);
        rpc_with(
            &self.obs,
            "ControllerPublishVolume",
            ids,
            self.inner.publish(&r, deadline),
        )
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Reply<ControllerUnpublishVolumeResponse> {
        let deadline = self.inner.deadline(&req);
        let r = req.into_inner();
        let ids = Ids::volume(&r.volume_id).on_node(&r.node_id);
        rpc_with(
            &self.obs,
            "ControllerUnpublishVolume",
            ids,
            self.inner.unpublish(&r, deadline),
        )
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Reply<ValidateVolumeCapabilitiesResponse> {
        let r = req.into_inner();
        let work = self.inner.validate_capabilities(&r);
        rpc_with(
            &self.obs,
            "ValidateVolumeCapabilities",
            Ids::volume(&r.volume_id),
            work,
        )
        .await
    }

    async fn list_volumes(&self, req: Request<ListVolumesRequest>) -> Reply<ListVolumesResponse> {
        let r = req.into_inner();
        rpc_with(
            &self.obs,
            "ListVolumes",
            Ids::default(),
            self.inner.list_volumes(&r),
        )
        .await
    }

    async fn get_capacity(&self, _req: Request<GetCapacityRequest>) -> Reply<GetCapacityResponse> {
        rpc_with(&self.obs, "GetCapacity", Ids::default(), async {
            Err(Error::Unimplemented(
                "GetCapacity is not offered: Luna Node does not report free capacity".into(),
            ))
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<ControllerGetCapabilitiesRequest>,
    ) -> Reply<ControllerGetCapabilitiesResponse> {
        rpc_with(
            &self.obs,
            "ControllerGetCapabilities",
            Ids::default(),
            async {
                let rpc = |t: &RpcType| ControllerServiceCapability {
                    r#type: Some(controller_service_capability::Type::Rpc(
                        controller_service_capability::Rpc { r#type: *t as i32 },
                    )),
                };
                Ok(ControllerGetCapabilitiesResponse {
                    capabilities: CAPABILITIES.iter().map(rpc).collect(),
                })
            },
        )
        .await
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Reply<CreateSnapshotResponse> {
        let r = req.into_inner();
        let ids = Ids {
            volume_id: Some(&r.source_volume_id),
            ..Ids::named(&r.name)
        };
        rpc_with(
            &self.obs,
            "CreateSnapshot",
            ids,
            self.inner.create_snapshot(&r),
        )
        .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Reply<DeleteSnapshotResponse> {
        let r = req.into_inner();
        let work = self.inner.delete_snapshot(&r);
        rpc_with(
            &self.obs,
            "DeleteSnapshot",
            Ids::snapshot(&r.snapshot_id),
            work,
        )
        .await
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Reply<ListSnapshotsResponse> {
        let r = req.into_inner();
        let ids = Ids {
            volume_id: Some(&r.source_volume_id),
            ..Ids::snapshot(&r.snapshot_id)
        };
        rpc_with(
            &self.obs,
            "ListSnapshots",
            ids,
            self.inner.list_snapshots(&r),
        )
        .await
    }

    async fn get_snapshot(&self, req: Request<GetSnapshotRequest>) -> Reply<GetSnapshotResponse> {
        let r = req.into_inner();
        rpc_with(
            &self.obs,
            "GetSnapshot",
            Ids::snapshot(&r.snapshot_id),
            async {
                Err(Error::Unimplemented(
                    "GetSnapshot (alpha) is not offered; use ListSnapshots with snapshot_id".into(),
                ))
            },
        )
        .await
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Reply<ControllerExpandVolumeResponse> {
        let deadline = self.inner.deadline(&req);
        let r = req.into_inner();
        let work = self.inner.expand_volume(&r, deadline);
        rpc_with(
            &self.obs,
            "ControllerExpandVolume",
            Ids::volume(&r.volume_id),
            work,
        )
        .await
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Reply<ControllerGetVolumeResponse> {
        let r = req.into_inner();
        let work = self.inner.get_volume(&r);
        rpc_with(
            &self.obs,
            "ControllerGetVolume",
            Ids::volume(&r.volume_id),
            work,
        )
        .await
    }

    async fn controller_modify_volume(
        &self,
        req: Request<ControllerModifyVolumeRequest>,
    ) -> Reply<ControllerModifyVolumeResponse> {
        let r = req.into_inner();
        rpc_with(&self.obs, "ControllerModifyVolume", Ids::volume(&r.volume_id), async {
            Err(Error::Unimplemented(
                "ControllerModifyVolume is not offered: Luna Node volumes have no mutable parameters"
                    .into(),
            ))
        })
        .await
    }
}
