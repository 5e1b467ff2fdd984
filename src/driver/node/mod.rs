//! The CSI Node service: runs on every Kubernetes node, privileged, and touches real disks.
//!
//! The rules it keeps (see `shared/field-notes.md`): the disk is found only through the
//! by-id links udev makes from its serial (on whichever bus it came) and verified (one
//! device behind them all, block device, expected size, kernel serial) before anything is
//! done to it; it is formatted only when a probe positively reports it blank; an existing
//! filesystem of another type, a partition table, or a mount of another device at the
//! target is refused and left untouched; a filesystem smaller than its device is grown at
//! stage and expand.
//!
//! OS work runs on blocking threads, each holding the volume's in-flight guard until it ends
//! (even when the RPC is cancelled), so two operations on one volume never overlap.
//!
//! By concern: `request` validates paths, capabilities and the publish_context; `stage`
//! finds, formats and mounts the disk (and unstages it); `publish` makes the bind mounts;
//! `stats` answers NodeGetVolumeStats; `expand` grows filesystems. This module holds the
//! configuration, the service and its gRPC glue.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::mount::MsFlags;
use tonic::{Request, Response, Status};

use super::error::{Error, Result};
use super::inflight::{Guard, InFlight};
use super::observe::{Ids, Observer, rpc_with};
use super::validate::required;
use crate::csi::node_server::Node;
use crate::csi::node_service_capability::{self, rpc::Type as RpcType};
use crate::csi::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology,
};
use crate::volumes::mount;

mod expand;
mod publish;
mod request;
mod stage;
mod stats;

pub use request::check_path;

use expand::expand;
use publish::{publish_block, publish_mount};
use request::{Access, check_capability, disk_ref, published_path};
use stage::{find_disk, stage_mount, unstage};
use stats::{abnormal, no_block_device, volume_stats};

/// publish_context key (set by ControllerPublishVolume): the disk's serial, the first 20
/// characters of the volume's identification.
pub const CTX_SERIAL: &str = "serial";
/// publish_context key (set by ControllerPublishVolume, optional): the volume's whole
/// identification. With it, SCSI disks carrying the whole identification as their serial
/// are found too; without it the node works from [`CTX_SERIAL`] alone.
pub const CTX_IDENTIFICATION: &str = "identification";
/// publish_context key (set by ControllerPublishVolume): the volume's size in bytes.
pub const CTX_SIZE_BYTES: &str = "size_bytes";
/// Where udev links disks by serial.
pub const DEFAULT_BY_ID_DIR: &str = "/dev/disk/by-id";
/// Data volumes per node: a KVM guest's virtio-blk disks each take a PCI slot; 16 disks is
/// a conservative count that fits beside the other devices, minus the boot disk. A setting.
pub const DEFAULT_MAX_VOLUMES_PER_NODE: i64 = 15;
/// How long to wait for an attached disk's link to appear.
pub const DEFAULT_DEVICE_WAIT: Duration = Duration::from_secs(60);

/// Settings of the Node service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's ID: the Luna Node VM ID (see [`super::node_id::resolve_node_id`]).
    pub node_id: String,
    /// The node's region, reported as the topology segment [`crate::TOPOLOGY_KEY`]. Not
    /// optional: a node without it would leave every claim for it Pending (see
    /// [`super::node_id::resolve_region`]).
    pub region: String,
    /// Where udev's by-id links are found (`/dev/disk/by-id`); see
    /// [`crate::volumes::device::candidate_names`] for the names looked for.
    pub by_id_dir: PathBuf,
    /// Reported as `max_volumes_per_node`; must be positive (0 would mean "unlimited").
    pub max_volumes_per_node: i64,
    /// Total time to wait for a disk's link to appear (bounded exponential backoff).
    pub device_wait: Duration,
}

impl NodeConfig {
    /// A configuration with the defaults for everything but the node ID and region.
    pub fn new(node_id: impl Into<String>, region: impl Into<String>) -> Self {
        NodeConfig {
            node_id: node_id.into(),
            region: region.into(),
            by_id_dir: PathBuf::from(DEFAULT_BY_ID_DIR),
            max_volumes_per_node: DEFAULT_MAX_VOLUMES_PER_NODE,
            device_wait: DEFAULT_DEVICE_WAIT,
        }
    }
}

/// The Node service.
#[derive(Debug, Clone)]
pub struct NodeService {
    cfg: Arc<NodeConfig>,
    inflight: InFlight,
    obs: Observer,
}

impl NodeService {
    /// Check the configuration and build the service.
    pub fn new(config: NodeConfig) -> Result<Self> {
        if config.node_id.trim().is_empty() {
            return Err(Error::invalid("node ID is empty"));
        }
        if config.region.trim().is_empty() {
            return Err(Error::invalid(
                "node region is empty: the node would register no topology; set --region",
            ));
        }
        if config.max_volumes_per_node <= 0 {
            return Err(Error::invalid(format!(
                "max volumes per node must be positive (got {}); 0 would mean unlimited",
                config.max_volumes_per_node
            )));
        }
        if !config.by_id_dir.is_absolute() {
            return Err(Error::invalid(format!(
                "device directory {} must be an absolute path",
                config.by_id_dir.display()
            )));
        }
        Ok(NodeService {
            cfg: Arc::new(config),
            inflight: InFlight::new(),
            obs: Observer::default(),
        })
    }

    /// Record this service's RPCs, its volume limit and the disks it refuses to format in
    /// `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        metrics.node_started(&self.cfg.node_id, self.cfg.max_volumes_per_node);
        self.obs = Observer::with_metrics(metrics);
        self
    }

    /// The service's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    fn lock(&self, volume_id: &str) -> Result<Guard> {
        self.inflight.try_lock(volume_id).ok_or_else(|| {
            Error::Aborted(format!(
                "an operation on volume {volume_id} is already in progress on this node; retry"
            ))
        })
    }
}

/// Run OS work on a blocking thread; the guard is held until it finishes.
async fn blocking<T, F>(guard: Guard, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let _guard = guard;
        f()
    })
    .await
    .map_err(|e| Error::Internal(format!("node operation failed unexpectedly: {e}")))?
}

fn ids(volume_id: &str) -> Ids<'_> {
    Ids {
        volume_id: Some(volume_id),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> std::result::Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        rpc_with(&self.obs, "NodeStageVolume", ids(&req.volume_id), async {
            required("volume_id", &req.volume_id)?;
            let staging = check_path("staging_target_path", &req.staging_target_path)?;
            let cap = check_capability(req.volume_capability.as_ref())?;
            let disk = disk_ref(&req.publish_context)?;
            let guard = self.lock(&req.volume_id)?;
            let cfg = Arc::clone(&self.cfg);
            let metrics = self.obs.metrics().cloned();
            blocking(guard, move || {
                let dev = find_disk(&cfg, &disk)?;
                match cap.access {
                    // Raw block: nothing to prepare; the device was found and verified.
                    Access::Block => Ok(()),
                    Access::Mount { fs_type, options } => {
                        let refused = |reason| {
                            if let Some(m) = &metrics {
                                m.format_refused(reason);
                            }
                        };
                        let ro = cap.read_only_mode;
                        stage_mount(&dev, &staging, &fs_type, &options, ro, refused)
                    }
                }
            })
            .await?;
            Ok(NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> std::result::Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        rpc_with(&self.obs, "NodeUnstageVolume", ids(&req.volume_id), async {
            required("volume_id", &req.volume_id)?;
            let staging = check_path("staging_target_path", &req.staging_target_path)?;
            let guard = self.lock(&req.volume_id)?;
            blocking(guard, move || unstage(&staging)).await?;
            Ok(NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> std::result::Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        rpc_with(&self.obs, "NodePublishVolume", ids(&req.volume_id), async {
            required("volume_id", &req.volume_id)?;
            let target = check_path("target_path", &req.target_path)?;
            let cap = check_capability(req.volume_capability.as_ref())?;
            let staging = check_path("staging_target_path", &req.staging_target_path)?;
            let mut flags = MsFlags::empty();
            if req.readonly || cap.read_only_mode {
                flags |= MsFlags::MS_RDONLY;
            }
            let guard = self.lock(&req.volume_id)?;
            let cfg = Arc::clone(&self.cfg);
            match cap.access {
                Access::Block => {
                    let disk = disk_ref(&req.publish_context)?;
                    blocking(guard, move || publish_block(&cfg, &disk, &target, flags)).await?;
                }
                Access::Mount { options, .. } => {
                    flags |= options.per_mount_flags();
                    // The serial, when given, double-checks what is staged.
                    let disk = if req.publish_context.contains_key(CTX_SERIAL)
                        || req.publish_context.contains_key(CTX_IDENTIFICATION)
                    {
                        Some(disk_ref(&req.publish_context)?)
                    } else {
                        None
                    };
                    blocking(guard, move || {
                        publish_mount(&cfg, disk.as_ref(), &staging, &target, flags)
                    })
                    .await?;
                }
            }
            Ok(NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        rpc_with(
            &self.obs,
            "NodeUnpublishVolume",
            ids(&req.volume_id),
            async {
                required("volume_id", &req.volume_id)?;
                let target = check_path("target_path", &req.target_path)?;
                let guard = self.lock(&req.volume_id)?;
                blocking(guard, move || {
                    mount::unmount(&target)?;
                    mount::remove_target(&target)?;
                    Ok(())
                })
                .await?;
                Ok(NodeUnpublishVolumeResponse {})
            },
        )
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> std::result::Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        rpc_with(
            &self.obs,
            "NodeGetVolumeStats",
            ids(&req.volume_id),
            async {
                required("volume_id", &req.volume_id)?;
                let path = published_path("volume_path", &req.volume_path)?;
                // Stats are read-only: no in-flight guard, so they never block a stage.
                tokio::task::spawn_blocking(move || {
                    let meta = match std::fs::metadata(&path) {
                        Ok(m) => m,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            return Err(Error::NotFound(format!(
                                "volume path {} does not exist",
                                path.display()
                            )));
                        }
                        Err(e) => {
                            return Ok(abnormal(format!("cannot stat {}: {e}", path.display())));
                        }
                    };
                    // A block target whose device bind mount is gone is just kubelet's
                    // placeholder file: no volume there (stats of the file's filesystem
                    // would describe some other disk).
                    if meta.is_file() {
                        return Err(no_block_device(&path));
                    }
                    Ok(volume_stats(&path, &meta))
                })
                .await
                .map_err(|e| Error::Internal(format!("stats failed unexpectedly: {e}")))?
            },
        )
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> std::result::Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        rpc_with(&self.obs, "NodeExpandVolume", ids(&req.volume_id), async {
            required("volume_id", &req.volume_id)?;
            let path = published_path("volume_path", &req.volume_path)?;
            let block = match req.volume_capability.as_ref() {
                Some(cap) => check_capability(Some(cap))?.access == Access::Block,
                None => false,
            };
            if let Some(r) = req.capacity_range.as_ref() {
                // Checked before anything else, as the controller does: a negative size
                // must not silently mean "any size".
                if r.required_bytes < 0 || r.limit_bytes < 0 {
                    return Err(Error::invalid("capacity_range bytes must not be negative"));
                }
                if r.limit_bytes > 0 && r.required_bytes > r.limit_bytes {
                    return Err(Error::OutOfRange(format!(
                        "capacity_range: required_bytes {} is larger than limit_bytes {}",
                        r.required_bytes, r.limit_bytes
                    )));
                }
            }
            let required = req
                .capacity_range
                .as_ref()
                .map(|r| u64::try_from(r.required_bytes).unwrap_or(0))
                .unwrap_or(0);
            if !tokio::fs::try_exists(&path).await.unwrap_or(true) {
                return Err(Error::NotFound(format!(
                    "volume path {} does not exist",
                    path.display()
                )));
            }
            let guard = self.lock(&req.volume_id)?;
            let capacity = blocking(guard, move || expand(&path, block, required)).await?;
            Ok(NodeExpandVolumeResponse {
                capacity_bytes: i64::try_from(capacity).unwrap_or(i64::MAX),
            })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<NodeGetCapabilitiesResponse>, Status> {
        rpc_with(&self.obs, "NodeGetCapabilities", Ids::default(), async {
            let cap = |t: RpcType| NodeServiceCapability {
                r#type: Some(node_service_capability::Type::Rpc(
                    node_service_capability::Rpc { r#type: t as i32 },
                )),
            };
            Ok(NodeGetCapabilitiesResponse {
                capabilities: vec![
                    cap(RpcType::StageUnstageVolume),
                    cap(RpcType::GetVolumeStats),
                    cap(RpcType::ExpandVolume),
                    cap(RpcType::VolumeCondition),
                    cap(RpcType::SingleNodeMultiWriter),
                ],
            })
        })
        .await
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> std::result::Result<Response<NodeGetInfoResponse>, Status> {
        let node_id = self.cfg.node_id.as_str();
        rpc_with(
            &self.obs,
            "NodeGetInfo",
            Ids {
                node_id: Some(node_id),
                ..Default::default()
            },
            async {
                let accessible_topology = Some(Topology {
                    segments: HashMap::from([(
                        crate::TOPOLOGY_KEY.to_string(),
                        self.cfg.region.clone(),
                    )]),
                });
                Ok(NodeGetInfoResponse {
                    node_id: self.cfg.node_id.clone(),
                    max_volumes_per_node: self.cfg.max_volumes_per_node,
                    accessible_topology,
                })
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn info_and_capabilities() {
        let cfg = NodeConfig::new("vm-1", "toronto");
        assert!(
            NodeService::new(NodeConfig {
                max_volumes_per_node: 0,
                ..cfg.clone()
            })
            .is_err()
        );
        let err = NodeService::new(NodeConfig::new("vm-1", " ")).unwrap_err();
        assert!(err.to_string().contains("no topology"), "{err}");
        let svc = NodeService::new(cfg).unwrap();
        let info = svc
            .node_get_info(Request::new(NodeGetInfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.node_id, "vm-1");
        assert_eq!(info.max_volumes_per_node, DEFAULT_MAX_VOLUMES_PER_NODE);
        assert_eq!(
            info.accessible_topology.unwrap().segments[crate::TOPOLOGY_KEY],
            "toronto"
        );
        let caps = svc
            .node_get_capabilities(Request::new(NodeGetCapabilitiesRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(caps.capabilities.len(), 5);
    }

    #[tokio::test]
    async fn concurrent_call_on_the_same_volume_is_aborted() {
        let svc = NodeService::new(NodeConfig::new("vm-1", "toronto")).unwrap();
        let _held = svc.lock("vol-1").unwrap();
        let err = svc
            .node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
                volume_id: "vol-1".into(),
                target_path: "/tmp/does-not-matter".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted);
    }

    #[tokio::test]
    async fn stats_of_a_missing_path_is_not_found() {
        let svc = NodeService::new(NodeConfig::new("vm-1", "toronto")).unwrap();
        let err = svc
            .node_get_volume_stats(Request::new(NodeGetVolumeStatsRequest {
                volume_id: "v".into(),
                volume_path: "/nonexistent/lunanode-csi/x".into(),
                staging_target_path: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        // An existing directory that is not a mount point is reported abnormal.
        let dir = tempfile::tempdir().unwrap();
        let resp = svc
            .node_get_volume_stats(Request::new(NodeGetVolumeStatsRequest {
                volume_id: "v".into(),
                volume_path: dir.path().to_str().unwrap().into(),
                staging_target_path: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(resp.volume_condition.unwrap().abnormal);
    }
}
