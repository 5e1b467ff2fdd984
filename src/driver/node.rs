//! The CSI Node service: runs on every Kubernetes node, privileged, and touches real disks.
//!
//! The rules it keeps (see `shared/field-notes.md`): the disk is found only through its
//! virtio serial link and verified (block device, expected size) before anything is done to
//! it; it is formatted only when a probe positively reports it blank; an existing filesystem
//! of another type, a partition table, or a mount of another device at the target is refused
//! and left untouched; a filesystem smaller than its device is grown at stage and expand.
//!
//! OS work runs on blocking threads, each holding the volume's in-flight guard until it ends
//! (even when the RPC is cancelled), so two operations on one volume never overlap.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
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
use crate::csi::volume_capability::{AccessType, access_mode::Mode};
use crate::csi::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology, VolumeCapability,
    VolumeCondition, VolumeUsage, volume_usage,
};
use crate::volumes::mount::{self, MountInfo, MountOptions};
use crate::volumes::{Device, DeviceWait, Probe, VolumeError, device, fs, probe, resize, stats};

/// publish_context key (set by ControllerPublishVolume): the disk's virtio serial.
pub const CTX_SERIAL: &str = "serial";
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
    /// Where `virtio-<serial>` links are found (`/dev/disk/by-id`).
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

    /// Record this service's RPCs in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
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

// ---------------------------------------------------------------------------------------
// Request validation
// ---------------------------------------------------------------------------------------

/// A required path: absolute, no `..` components, no NUL.
pub fn check_path(field: &str, value: &str) -> Result<PathBuf> {
    required(field, value)?;
    let p = Path::new(value);
    if !p.is_absolute() {
        return Err(Error::invalid(format!(
            "{field} {value:?} must be an absolute path"
        )));
    }
    if p.components().any(|c| c == Component::ParentDir) || value.contains('\0') {
        return Err(Error::invalid(format!(
            "{field} {value:?} must not contain \"..\""
        )));
    }
    Ok(p.to_path_buf())
}

/// The path of a volume that should already be published (NodeGetVolumeStats,
/// NodeExpandVolume). A path that cannot be one the driver published names no volume:
/// NOT_FOUND, as the spec's "volume does not exist on the specified path". A relative path
/// is never resolved against the driver's working directory.
fn published_path(field: &str, value: &str) -> Result<PathBuf> {
    required(field, value)?;
    let p = Path::new(value);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) || value.contains('\0')
    {
        return Err(Error::NotFound(format!(
            "no volume is published at {value:?}: {field} must be the absolute path the volume was published or staged at"
        )));
    }
    Ok(p.to_path_buf())
}

/// How the volume is accessed, from a validated capability.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Access {
    Block,
    Mount {
        fs_type: String,
        options: MountOptions,
    },
}

#[derive(Debug, Clone)]
struct Capability {
    access: Access,
    read_only_mode: bool,
}

fn check_capability(cap: Option<&VolumeCapability>) -> Result<Capability> {
    let cap = cap.ok_or_else(|| Error::invalid("volume_capability is required"))?;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::invalid("volume_capability.access_mode is required"))?
        .mode;
    let mode = Mode::try_from(mode).unwrap_or(Mode::Unknown);
    let read_only_mode = match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {
            false
        }
        Mode::SingleNodeReaderOnly => true,
        other => {
            return Err(Error::invalid(format!(
                "access mode {other:?} is not supported: a Luna Node volume attaches to one node at a time"
            )));
        }
    };
    let access = match cap.access_type.as_ref() {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            let fs_type = if m.fs_type.is_empty() {
                fs::DEFAULT_FS_TYPE.to_string()
            } else {
                m.fs_type.to_ascii_lowercase()
            };
            if !fs::is_supported(&fs_type) {
                return Err(Error::invalid(format!(
                    "fsType {:?} is not supported; use ext4 or xfs",
                    m.fs_type
                )));
            }
            let options = MountOptions::parse(&m.mount_flags).map_err(Error::invalid)?;
            Access::Mount { fs_type, options }
        }
        None => {
            return Err(Error::invalid(
                "volume_capability must specify block or mount access",
            ));
        }
    };
    Ok(Capability {
        access,
        read_only_mode,
    })
}

/// Which disk the controller attached: serial and size from the publish_context.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DiskRef {
    serial: String,
    size: u64,
}

fn disk_ref(ctx: &HashMap<String, String>) -> Result<DiskRef> {
    let serial = ctx
        .get(CTX_SERIAL)
        .map(|s| device::serial_for(s.trim()))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Error::invalid(format!(
                "publish_context has no {CTX_SERIAL:?}; it is set by ControllerPublishVolume"
            ))
        })?;
    if !device::valid_serial(&serial) {
        return Err(Error::invalid(format!(
            "publish_context {CTX_SERIAL:?} {serial:?} is not a valid virtio serial"
        )));
    }
    let size = ctx
        .get(CTX_SIZE_BYTES)
        .ok_or_else(|| {
            Error::invalid(format!(
                "publish_context has no {CTX_SIZE_BYTES:?}; it is set by ControllerPublishVolume"
            ))
        })?
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            Error::invalid(format!(
                "publish_context {CTX_SIZE_BYTES:?} must be a positive decimal number"
            ))
        })?;
    Ok(DiskRef { serial, size })
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

// ---------------------------------------------------------------------------------------
// The operations (blocking)
// ---------------------------------------------------------------------------------------

fn describe(m: &MountInfo) -> String {
    format!("{} (device {}:{})", m.source, m.major, m.minor)
}

fn find_disk(cfg: &NodeConfig, disk: &DiskRef) -> Result<Device, VolumeError> {
    device::find(
        &cfg.by_id_dir,
        &disk.serial,
        Some(disk.size),
        &DeviceWait::with_timeout(cfg.device_wait),
    )
}

fn stage_mount(
    dev: &Device,
    staging: &Path,
    fs_type: &str,
    options: &MountOptions,
    read_only: bool,
) -> Result<()> {
    // Read-only staging must not write to the disk at all: not by formatting it, not by
    // growing it. Either the access mode or an "ro" mount flag makes it read-only.
    let ro = read_only || options.flags.contains(MsFlags::MS_RDONLY);
    if let Some(m) = mount::mount_at(staging)? {
        if !m.is_device(dev.rdev) {
            return Err(VolumeError::MountConflict {
                target: staging.to_path_buf(),
                existing: describe(&m),
                wanted: dev.path.display().to_string(),
            }
            .into());
        }
        // The same disk staged with another capability is not "already done": the CSI spec
        // asks for ALREADY_EXISTS, and nothing is touched (no remount, no growth).
        let incompatible = if m.root != "/" {
            Some(format!(
                "it is a bind of the subtree {:?}, not the whole filesystem",
                m.root
            ))
        } else if m.fs_type != fs_type {
            Some(format!(
                "it holds {} but {fs_type} was requested",
                m.fs_type
            ))
        } else if m.read_only() != ro {
            Some(format!(
                "it is mounted {} but {} was requested",
                if m.read_only() {
                    "read-only"
                } else {
                    "read-write"
                },
                if ro { "read-only" } else { "read-write" }
            ))
        } else {
            None
        };
        if let Some(why) = incompatible {
            return Err(Error::AlreadyExists(format!(
                "volume already staged at {} with an incompatible capability: {why}; unstage it first",
                staging.display()
            )));
        }
        // Already staged: finish a growth that an earlier attempt may not have completed.
        if !m.read_only() {
            resize::grow_if_needed(fs_type, &dev.path, staging)?;
        }
        return Ok(());
    }

    // A disk formatted just now already fills its device: nothing to grow.
    let probed = match probe::probe(&dev.path) {
        // This node's own mkfs was killed half-way (the note it left says so): the data is
        // nothing but that mkfs's, so formatting again loses nothing.
        Err(VolumeError::NotBlank { what, .. })
            if what == probe::DATA_WITHOUT_SIGNATURE
                && !ro
                && fs::interrupted_format(staging, &dev.link) =>
        {
            tracing::warn!(device = %dev.path.display(), "an earlier format of this device was interrupted; formatting it again");
            Probe::Blank
        }
        other => other?,
    };
    let fresh = match probed {
        Probe::Filesystem(found)
            if found == fs_type && probe::unfinished_mkfs(&dev.path, fs_type)? =>
        {
            // blkid names it but the kernel will never mount it. Redone only when it is
            // this node's own interrupted format; anything else is somebody's data.
            if ro || !fs::interrupted_format(staging, &dev.link) {
                return Err(VolumeError::NotBlank {
                    device: dev.path.clone(),
                    what: format!(
                        "its {fs_type} superblock says mkfs never finished, and this node did not start that mkfs; wipe the device (wipefs -a) if nothing on it is needed"
                    ),
                }
                .into());
            }
            tracing::warn!(device = %dev.path.display(), fs_type, "an earlier format of this device was interrupted; formatting it again");
            device::still_same(dev)?;
            fs::format_noted(&dev.path, &dev.link, staging, fs_type, true)?;
            true
        }
        Probe::Filesystem(found) if found == fs_type => {
            // Finished: a note of its format left by a kill just after mkfs (or by a
            // version that kept it) has done its job, and under the mount it would keep
            // unstage from removing the directory.
            fs::clear_note(staging)?;
            // An offline expansion: grow ext4 while it is still unmounted.
            if fs_type == "ext4" && !ro {
                resize::grow_ext4_offline(&dev.path)?;
            }
            false
        }
        Probe::Filesystem(found) => {
            return Err(VolumeError::ForeignFilesystem {
                device: dev.path.clone(),
                found,
                wanted: fs_type.to_string(),
            }
            .into());
        }
        Probe::PartitionTable(pt) => {
            return Err(VolumeError::NotBlank {
                device: dev.path.clone(),
                what: format!("it holds a {pt} partition table"),
            }
            .into());
        }
        Probe::Unknown(what) => {
            return Err(VolumeError::NotBlank {
                device: dev.path.clone(),
                what: format!("blkid found an unrecognised signature: {what}"),
            }
            .into());
        }
        Probe::Blank if ro => {
            return Err(Error::FailedPrecondition(format!(
                "{} is blank: an unformatted volume cannot be staged read-only; stage it read-write once to format it",
                dev.path.display()
            )));
        }
        Probe::Blank => {
            // The probe and its reads took time; udev may have re-pointed the link since
            // the disk was found. Never format a disk we did not verify.
            device::still_same(dev)?;
            // mkfs's own exit status is the check; a bad result would fail the mount.
            mount::ensure_dir(staging)?;
            fs::format_noted(&dev.path, &dev.link, staging, fs_type, false)?;
            true
        }
    };

    mount::ensure_dir(staging)?;
    let mut opts = options.clone();
    if ro {
        opts.flags.insert(MsFlags::MS_RDONLY);
    }
    // Clones of one xfs volume (from snapshots) share a UUID; let them mount side by side.
    if fs_type == "xfs" && !opts.data.iter().any(|d| d == "nouuid") {
        opts.data.push("nouuid".into());
    }
    mount::mount_fs(&dev.path, staging, fs_type, &opts)?;
    if !fresh && !ro {
        // How an offline expansion reaches the filesystem. On failure the mount stays; a
        // retried stage finds it and tries the growth again.
        resize::grow_if_needed(fs_type, &dev.path, staging)?;
    }
    Ok(())
}

fn publish_mount(
    cfg: &NodeConfig,
    disk: Option<&DiskRef>,
    staging: &Path,
    target: &Path,
    flags: MsFlags,
) -> Result<()> {
    let staged = mount::mount_at(staging)?.ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "volume is not staged: {} is not a mount point; NodeStageVolume first",
            staging.display()
        ))
    })?;
    if let Some(disk) = disk {
        let dev = find_disk(cfg, disk)?;
        if !staged.is_device(dev.rdev) {
            return Err(VolumeError::MountConflict {
                target: staging.to_path_buf(),
                existing: describe(&staged),
                wanted: dev.path.display().to_string(),
            }
            .into());
        }
    }
    if let Some(m) = mount::mount_at(target)? {
        if !m.same_source(&staged) {
            return Err(VolumeError::MountConflict {
                target: target.to_path_buf(),
                existing: describe(&m),
                wanted: format!("{} (staged at {})", staged.source, staging.display()),
            }
            .into());
        }
        let want_ro = flags.contains(MsFlags::MS_RDONLY);
        if m.read_only() != want_ro {
            return Err(Error::AlreadyExists(format!(
                "{} is already published {} but {} was requested",
                target.display(),
                if m.read_only() {
                    "read-only"
                } else {
                    "read-write"
                },
                if want_ro { "read-only" } else { "read-write" },
            )));
        }
        return Ok(());
    }
    mount::ensure_dir(target)?;
    mount::bind(staging, target, flags)?;
    Ok(())
}

fn publish_block(cfg: &NodeConfig, disk: &DiskRef, target: &Path, flags: MsFlags) -> Result<()> {
    let dev = find_disk(cfg, disk)?;
    if let Some(m) = mount::mount_at(target)? {
        let same = std::fs::metadata(target)
            .map(|md| md.file_type().is_block_device() && md.rdev() == dev.rdev)
            .unwrap_or(false);
        if !same {
            return Err(VolumeError::MountConflict {
                target: target.to_path_buf(),
                existing: describe(&m),
                wanted: dev.path.display().to_string(),
            }
            .into());
        }
        return Ok(());
    }
    mount::ensure_file(target)?;
    mount::bind(&dev.path, target, flags)?;
    Ok(())
}

/// Unmounting the staging mount succeeds even while publish bind mounts of the same
/// filesystem remain, after which the controller would detach a disk that is still mounted.
/// So: any other mount of the staged device (major:minor) blocks unstage, nothing unmounted.
fn refuse_if_still_published(staging: &Path) -> Result<()> {
    let table = mount::mounts()?;
    let Some(staged) = mount::find_mount(&table, staging) else {
        return Ok(());
    };
    let others: Vec<String> = table
        .iter()
        .filter(|m| {
            (m.major, m.minor) == (staged.major, staged.minor)
                && m.mount_point != staged.mount_point
        })
        .map(|m| m.mount_point.display().to_string())
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    Err(Error::FailedPrecondition(format!(
        "the volume staged at {} is still mounted at {}; unpublish them first",
        staging.display(),
        others.join(", ")
    )))
}

/// Find the device node behind a mount, by its device number (not by name).
fn device_of(m: &MountInfo) -> Result<PathBuf> {
    let matches = |p: &Path| {
        std::fs::metadata(p)
            .map(|md| md.file_type().is_block_device() && m.is_device(md.rdev()))
            .unwrap_or(false)
    };
    let uevent = format!("/sys/dev/block/{}:{}/uevent", m.major, m.minor);
    if let Ok(text) = std::fs::read_to_string(&uevent)
        && let Some(name) = text.lines().find_map(|l| l.strip_prefix("DEVNAME="))
    {
        let p = Path::new("/dev").join(name.trim());
        if matches(&p) {
            return Ok(p);
        }
    }
    let src = Path::new(&m.source);
    if src.is_absolute() && matches(src) {
        return Ok(src.to_path_buf());
    }
    Err(Error::Internal(format!(
        "cannot find the device node of {} mounted at {} (device {}:{})",
        m.source,
        m.mount_point.display(),
        m.major,
        m.minor
    )))
}

fn abnormal(message: impl Into<String>) -> NodeGetVolumeStatsResponse {
    NodeGetVolumeStatsResponse {
        usage: Vec::new(),
        volume_condition: Some(VolumeCondition {
            abnormal: true,
            message: message.into(),
        }),
    }
}

fn usage(unit: volume_usage::Unit, total: u64, available: u64, used: u64) -> VolumeUsage {
    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    VolumeUsage {
        available: i(available),
        total: i(total),
        used: i(used),
        unit: unit as i32,
    }
}

fn volume_stats(path: &Path, meta: &std::fs::Metadata) -> NodeGetVolumeStatsResponse {
    let mounted = match mount::mount_at(path) {
        Ok(m) => m,
        Err(e) => return abnormal(format!("cannot read the mount table: {e}")),
    };
    let Some(mounted) = mounted else {
        return abnormal(format!(
            "{} is not a mount point: the volume is no longer mounted there",
            path.display()
        ));
    };
    if mounted.kernel_remounted_read_only() {
        return abnormal(format!(
            "the {} filesystem at {} was made read-only by the kernel although it is mounted \
             read-write (usually after I/O or corruption errors); check the node's kernel log",
            mounted.fs_type,
            path.display()
        ));
    }
    if meta.file_type().is_block_device() {
        let size = match stats::block_size(path) {
            Ok(s) => s,
            Err(e) => return abnormal(format!("block device I/O failed: {e}")),
        };
        if let Err(e) = stats::check_block_io(path) {
            return abnormal(format!("block device I/O failed: {e}"));
        }
        return NodeGetVolumeStatsResponse {
            usage: vec![usage(volume_usage::Unit::Bytes, size, 0, 0)],
            volume_condition: Some(VolumeCondition {
                abnormal: false,
                message: "block device is attached and readable".into(),
            }),
        };
    }
    let s = match stats::fs_stats(path) {
        Ok(s) => s,
        Err(e) => return abnormal(format!("filesystem I/O failed: {e}")),
    };
    if let Err(e) = std::fs::read_dir(path) {
        return abnormal(format!(
            "filesystem I/O failed: cannot list {}: {e}",
            path.display()
        ));
    }
    NodeGetVolumeStatsResponse {
        usage: vec![
            usage(
                volume_usage::Unit::Bytes,
                s.bytes_total,
                s.bytes_available,
                s.bytes_used,
            ),
            usage(
                volume_usage::Unit::Inodes,
                s.inodes_total,
                s.inodes_free,
                s.inodes_used,
            ),
        ],
        volume_condition: Some(VolumeCondition {
            abnormal: false,
            message: "filesystem is mounted and readable".into(),
        }),
    }
}

fn no_block_device(path: &Path) -> Error {
    Error::NotFound(format!(
        "no volume is published at {}: it is not a block device bind mount (the device is no longer bound there)",
        path.display()
    ))
}

fn expand(path: &Path, block: bool, required: u64) -> Result<u64> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::NotFound(format!("volume path {}: {e}", path.display())))?;
    let capacity = if block || !meta.is_dir() {
        // A block volume is a device node bind-mounted onto a file. Without the mount the
        // path is only the placeholder file, whose size (0) is no volume's capacity.
        let bound = meta.file_type().is_block_device() && mount::mount_at(path)?.is_some();
        if !bound {
            return Err(no_block_device(path));
        }
        stats::block_size(path)?
    } else {
        let m = mount::mount_at(path)?.ok_or_else(|| VolumeError::NotMounted {
            path: path.to_path_buf(),
        })?;
        if !fs::is_supported(&m.fs_type) {
            return Err(Error::FailedPrecondition(format!(
                "{} holds a {} filesystem; only ext4 and xfs can be grown",
                path.display(),
                m.fs_type
            )));
        }
        if m.read_only() {
            return Err(Error::FailedPrecondition(format!(
                "{} is mounted read-only; a read-only filesystem cannot be grown online",
                path.display()
            )));
        }
        let dev = device_of(&m)?;
        let report = resize::grow_if_needed(&m.fs_type, &dev, path)?;
        if report.needs_grow() {
            return Err(Error::Internal(format!(
                "{} filesystem on {} is {} bytes after growing, device is {} bytes",
                m.fs_type,
                dev.display(),
                report.fs_bytes,
                report.device_bytes
            )));
        }
        report.device_bytes
    };
    if required > capacity {
        return Err(Error::FailedPrecondition(format!(
            "the device behind {} is {capacity} bytes, less than the requested {required}; \
             the volume has not been expanded on this node yet (ControllerExpandVolume, then reattach)",
            path.display()
        )));
    }
    Ok(capacity)
}

// ---------------------------------------------------------------------------------------
// The gRPC service
// ---------------------------------------------------------------------------------------

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
            blocking(guard, move || {
                let dev = find_disk(&cfg, &disk)?;
                match cap.access {
                    // Raw block: nothing to prepare; the device was found and verified.
                    Access::Block => Ok(()),
                    Access::Mount { fs_type, options } => {
                        stage_mount(&dev, &staging, &fs_type, &options, cap.read_only_mode)
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
            blocking(guard, move || {
                refuse_if_still_published(&staging)?;
                // What was mounted was a finished filesystem, so a note of its format found
                // under the mount is stale. Without a mount, a note is kept: it may record
                // this node's own interrupted format for the next stage to redo.
                if mount::unmount(&staging)? {
                    fs::clear_note(&staging)?;
                }
                // kubelet re-creates the directory before each stage; leave nothing behind.
                if std::fs::symlink_metadata(&staging).is_ok_and(|m| m.is_dir()) {
                    mount::remove_target(&staging)?;
                }
                Ok(())
            })
            .await?;
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
                    let disk = if req.publish_context.contains_key(CTX_SERIAL) {
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
    use crate::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: vec!["noatime".into()],
                ..Default::default()
            })),
        }
    }

    #[test]
    fn paths_must_be_absolute_without_dotdot() {
        assert!(check_path("p", "/var/lib/kubelet/x").is_ok());
        for bad in ["", "relative/x", "/a/../etc", "/a/..", "../x"] {
            let e = check_path("p", bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn paths_that_cannot_be_published_name_no_volume() {
        assert_eq!(
            published_path("p", "").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        for bad in ["some/path", "/a/../etc", "../x"] {
            let e = published_path("p", bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::NotFound, "{bad:?}");
        }
        assert!(published_path("p", "/var/lib/kubelet/pods/x/volumes").is_ok());
    }

    #[test]
    fn capabilities_are_validated() {
        let c = check_capability(Some(&mount_cap("", Mode::SingleNodeWriter))).unwrap();
        match c.access {
            Access::Mount { fs_type, options } => {
                assert_eq!(fs_type, "ext4");
                assert!(options.flags.contains(MsFlags::MS_NOATIME));
            }
            Access::Block => panic!(),
        }
        assert!(check_capability(Some(&mount_cap("XFS", Mode::SingleNodeMultiWriter))).is_ok());
        assert!(
            check_capability(Some(&mount_cap("xfs", Mode::SingleNodeReaderOnly)))
                .unwrap()
                .read_only_mode
        );
        for (fs, mode) in [
            ("btrfs", Mode::SingleNodeWriter),
            ("ext4", Mode::MultiNodeMultiWriter),
            ("ext4", Mode::MultiNodeReaderOnly),
            ("ext4", Mode::Unknown),
        ] {
            let e = check_capability(Some(&mount_cap(fs, mode))).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{fs} {mode:?}");
        }
        assert!(check_capability(None).is_err());
        let block = VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        };
        assert_eq!(
            check_capability(Some(&block)).unwrap().access,
            Access::Block
        );
        let no_type = VolumeCapability {
            access_type: None,
            ..block
        };
        assert!(check_capability(Some(&no_type)).is_err());
    }

    #[test]
    fn publish_context_is_parsed() {
        let ctx = |s: &str, n: &str| {
            HashMap::from([
                (CTX_SERIAL.to_string(), s.to_string()),
                (CTX_SIZE_BYTES.to_string(), n.to_string()),
            ])
        };
        let d = disk_ref(&ctx("6a3b1f0e-2c4d-4e5f-8a9b-0c1d2e3f4a5b", "1073741824")).unwrap();
        assert_eq!(d.serial, "6a3b1f0e-2c4d-4e5f-8");
        assert_eq!(d.size, 1 << 30);
        assert!(disk_ref(&ctx("../../etc", "1")).is_err());
        assert!(disk_ref(&ctx("abc", "0")).is_err());
        assert!(disk_ref(&ctx("abc", "1G")).is_err());
        assert!(disk_ref(&HashMap::new()).is_err());
    }

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
