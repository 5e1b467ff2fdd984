//! `lunanode-csi preflight`: what an operator runs once, on a node of the cluster, before
//! trusting the driver with data.
//!
//! It takes the settings `serve` takes and walks the whole path a claim takes, for real: a
//! signed call (credentials and clock), this node's VM ID and region as the cloud knows them,
//! then a labelled 1 GB test volume created, attached with the configured target, found on
//! this node by its serial whatever bus it came on, checked for size, formatted, mounted,
//! written and read back, unmounted, detached and deleted. The cloud steps go through the
//! driver's own Controller service and the node steps through the same OS layer the Node
//! service uses, so what passes here is what the driver does.
//!
//! Nothing is left behind: every volume it makes carries a label naming this node
//! ([`label_prefix`]), and the end of every run (passed, failed or interrupted by SIGINT or
//! SIGTERM) detaches and deletes every volume with that label, as the start of the next run
//! does for a run that was killed outright.

mod report;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use tonic::Request;

use crate::cli::{AttachArgs, NodePlaceArgs, RegionsArgs};
use crate::command::{ApiArgs, CommandError};
use crate::csi::controller_server::Controller;
use crate::csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
use crate::csi::{
    CapacityRange, ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest,
    CreateVolumeRequest, DeleteVolumeRequest, VolumeCapability,
};
use crate::driver::ControllerConfig;
use crate::driver::node_id;
use crate::lunanode::{ApiError, Client};
use crate::volumes::{DeviceWait, Probe, device, fs, mount, probe};
use report::Report;
pub use report::{Line, Status, Summary};

/// Every preflight volume's label starts with this.
pub const LABEL_PREFIX: &str = "lunanode-csi-preflight-";

/// `lunanode-csi preflight`.
#[derive(Debug, Clone, Args)]
pub struct PreflightArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub attach: AttachArgs,
    #[command(flatten)]
    pub place: NodePlaceArgs,
    #[command(flatten)]
    pub regions: RegionsArgs,
    /// Filesystem to make on the test volume.
    #[arg(long, default_value = "ext4", value_parser = ["ext4", "xfs"])]
    pub fs_type: String,
    /// Size of the test volume, in GB.
    #[arg(long, default_value_t = 1)]
    pub size_gb: u64,
    /// Where the test volume is mounted (a directory per run is made under it).
    #[arg(long, env = "LUNANODE_PREFLIGHT_WORK_DIR", default_value_os_t = std::env::temp_dir().join("lunanode-csi-preflight"))]
    pub work_dir: PathBuf,
    /// How long each cloud step (create, attach, detach, delete) may take, in seconds.
    #[arg(long, default_value_t = 300)]
    pub step_timeout_secs: u64,
    /// Print one JSON document instead of lines.
    #[arg(long)]
    pub json: bool,
    /// Also log what the driver's code does on the way (its `info` logs, on stderr).
    #[arg(long)]
    pub verbose: bool,
}

/// The label prefix of this node's preflight volumes: a preflight removes only its own
/// node's leftovers, never a run in flight on another node.
pub fn label_prefix(node_id: &str) -> String {
    let short: String = node_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect();
    format!("{LABEL_PREFIX}{short}-")
}

/// Run the checks; exit 1 when any failed or something was left behind.
pub async fn run(args: PreflightArgs) -> Result<(), CommandError> {
    let target = args.attach.target()?;
    if args.size_gb == 0 {
        return Err(CommandError::Config("--size-gb must be at least 1".into()));
    }
    let client = args.api.client()?;
    let report = Report::new(args.json);
    report.with(|s| {
        s.attach_target = target.clone();
        s.api_rules = "current".into();
    });
    let run = Run {
        client: client.clone(),
        report: report.clone(),
        args,
        target,
        state: Arc::new(Mutex::new(State::default())),
        node_ops: Arc::new(tokio::sync::Mutex::new(())),
    };
    tokio::select! {
        () = run.checks() => {}
        signal = interrupted() => {
            report.line(Line {
                check: "interrupted".into(),
                status: Status::Failed,
                detail: format!("{signal} received; cleaning up before exiting"),
                fix: None,
                seconds: 0.0,
            });
        }
    }
    tokio::select! {
        () = run.clean_up() => {}
        signal = interrupted() => {
            report.line(Line {
                check: "clean-up".into(),
                status: Status::Failed,
                detail: format!("a second {signal}: stopped cleaning up"),
                fix: Some("run preflight again on this node: it removes its own leftovers first".into()),
                seconds: 0.0,
            });
            report.with(|s| s.left_behind.push("whatever the interrupted clean-up had not removed".into()));
        }
    }
    if client.old_rules() {
        report.with(|s| s.api_rules = "old".into());
    }
    let summary = report.finish();
    if summary.ok {
        Ok(())
    } else {
        Err(CommandError::Reported)
    }
}

/// What a run has made, for the clean-up.
#[derive(Debug, Default)]
struct State {
    node_id: Option<String>,
    volume_id: Option<String>,
    mounted: Option<PathBuf>,
}

struct Run {
    client: Client,
    report: Report,
    args: PreflightArgs,
    target: String,
    state: Arc<Mutex<State>>,
    /// Held by every node step on its blocking thread, so a clean-up after an interrupt
    /// waits for a mkfs or mount already running instead of racing it.
    node_ops: Arc<tokio::sync::Mutex<()>>,
}

/// A check's outcome: what was seen, or what failed and the fix.
type Outcome<T> = Result<(T, String), (String, String)>;

impl Run {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("preflight state lock")
    }

    /// Run one check and report it; `None` when it failed.
    async fn check<T>(
        &self,
        name: &str,
        f: impl std::future::Future<Output = Outcome<T>>,
    ) -> Option<T> {
        let started = Instant::now();
        let outcome = f.await;
        let seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        match outcome {
            Ok((v, detail)) => {
                self.report.line(Line {
                    check: name.into(),
                    status: Status::Ok,
                    detail,
                    fix: None,
                    seconds,
                });
                Some(v)
            }
            Err((detail, fix)) => {
                self.report.line(Line {
                    check: name.into(),
                    status: Status::Failed,
                    detail,
                    fix: Some(fix),
                    seconds,
                });
                None
            }
        }
    }

    /// Run node work on a blocking thread, holding [`Self::node_ops`].
    async fn node_op<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let guard = self.node_ops.clone().lock_owned().await;
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            f()
        })
        .await
        .map_err(|e| format!("the node step failed unexpectedly: {e}"))
    }

    fn controller(&self, region: &str) -> crate::driver::ControllerService {
        let cfg = ControllerConfig {
            default_region: region.to_string(),
            regions: self.args.regions.regions.clone(),
            default_timeout: Duration::from_secs(self.args.step_timeout_secs),
            attach_target: self.target.clone(),
            ..ControllerConfig::default()
        };
        crate::driver::ControllerService::new(self.client.clone(), cfg)
    }

    /// Every check, in order, stopping at the first failure.
    async fn checks(&self) {
        let url = self.args.api.api_url.clone();
        let Some(vms) = self
            .check("API credentials and clock", async {
                match self.client.vm_list().await {
                    Ok(vms) => {
                        let n = vms.len();
                        Ok((
                            vms,
                            format!(
                                "a signed vm/list was accepted by {url} ({n} VMs on the account)"
                            ),
                        ))
                    }
                    Err(e) => Err((e.to_string(), api_fix(&e, &url))),
                }
            })
            .await
        else {
            return;
        };

        let Some(node_id) = self
            .check("this node's VM ID", async {
                node_id::resolve_node_id(
                    self.args.place.node_id.clone(),
                    self.args.place.node_id_source,
                    node_id::DEFAULT_METADATA_URL,
                    Path::new(node_id::DEFAULT_DMI_PATH),
                )
                .await
                .map(|(id, source)| (id.clone(), format!("{id} (from {source})")))
                .map_err(|e| {
                    (
                        e.to_string(),
                        "set --node-id (LUNANODE_NODE_ID) or --node-id-source (the chart's node.idSource), as for the node plugin".to_string(),
                    )
                })
            })
            .await
        else {
            return;
        };
        self.state().node_id = Some(node_id.clone());

        let region_check = format!("vm/list knows VM {node_id}, in the install's region");
        let Some(region) = self
            .check(&region_check, async {
                let Some(vm) = vms.iter().find(|v| v.vm_id == node_id) else {
                    let known: Vec<String> = vms.iter().take(10).map(|v| format!("{} ({})", v.vm_id, v.name)).collect();
                    return Err((
                        format!("no VM {node_id} on this account (it has: {})", if known.is_empty() { "none".into() } else { known.join(", ") }),
                        "the node ID must be this VM's Luna Node ID: set --node-id, or check that the credentials belong to the account that owns this VM".into(),
                    ));
                };
                match self.args.place.region.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
                    Some(r) if r != vm.region => Err((
                        format!("the install says region {r} but the cloud has VM {} ({}) in {}", vm.vm_id, vm.name, vm.region),
                        format!("set the chart's region (--region, LUNANODE_REGION) to {}", vm.region),
                    )),
                    Some(r) if !self.args.regions.regions.iter().any(|k| k == r) => Err((
                        format!("region {r} is not among the managed regions {}", self.args.regions.regions.join(",")),
                        "add it to --regions (LUNANODE_REGIONS)".into(),
                    )),
                    Some(r) => Ok((r.to_string(), format!("{} ({}) in {r}", vm.vm_id, vm.name))),
                    None => Ok((
                        vm.region.clone(),
                        format!("{} ({}) in {}; no region was set: the install must say {} (the chart's region)", vm.vm_id, vm.name, vm.region, vm.region),
                    )),
                }
            })
            .await
        else {
            return;
        };

        let prefix = label_prefix(&node_id);
        if self
            .check("leftovers of earlier preflights", async {
                // A killed run's mount first: its volume cannot be detached under it.
                let work = self.args.work_dir.clone();
                let mounts = self.node_op(move || unmount_under(&work)).await.unwrap_or_default();
                match self.sweep(&prefix).await {
                    Ok(removed) if removed.is_empty() && mounts.is_empty() => Ok(((), "none".to_string())),
                    Ok(mut removed) => {
                        removed.extend(mounts.into_iter().map(|m| format!("mount {m}")));
                        Ok(((), format!("removed {}", removed.join(", "))))
                    }
                    Err(e) => Err((e, "remove them with `lunanode-csi volume detach/delete`, or run preflight again".into())),
                }
            })
            .await
            .is_none()
        {
            return;
        }

        let controller = self.controller(&region);
        let label = format!(
            "{prefix}{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        );
        let size_gb = self.args.size_gb;
        let fs_type = self.args.fs_type.clone();
        let cap = VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs_type.clone(),
                ..Default::default()
            })),
        };

        let Some(volume_id) = self
            .check(&format!("test volume {label} ({size_gb} GB) created in {region}"), async {
                let req = CreateVolumeRequest {
                    name: label.clone(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: i64::try_from(size_gb << 30).unwrap_or(i64::MAX),
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![cap.clone()],
                    parameters: [("region".to_string(), region.clone())].into(),
                    ..Default::default()
                };
                match controller.create_volume(Request::new(req)).await {
                    Ok(r) => {
                        let id = r.into_inner().volume.map(|v| v.volume_id).unwrap_or_default();
                        self.state().volume_id = Some(id.clone());
                        Ok((id.clone(), format!("volume {id}")))
                    }
                    Err(s) => Err((status_text(&s), "check the account's volume quota and that the region takes volumes; the message says what the cloud refused".into())),
                }
            })
            .await
        else {
            return;
        };

        let target = self.target.clone();
        let Some(context) = self
            .check(&format!("attached to this VM with target {target}"), async {
                let req = ControllerPublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    node_id: node_id.clone(),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                };
                match controller.controller_publish_volume(Request::new(req)).await {
                    Ok(r) => Ok((r.into_inner().publish_context, format!("volume {volume_id} is in-use on {node_id}"))),
                    Err(s) => Err((status_text(&s), format!("the cloud would not attach it with target {target}: try --attach-target /dev/vda (the chart's controller.attachTarget), and check the VM has a free disk slot"))),
                }
            })
            .await
        else {
            return;
        };

        let serial = context
            .get(crate::driver::node::CTX_SERIAL)
            .cloned()
            .unwrap_or_default();
        let identification = context
            .get(crate::driver::node::CTX_IDENTIFICATION)
            .cloned();
        let by_id = self.args.place.by_id_dir.clone();
        let wait = DeviceWait::with_timeout(Duration::from_secs(self.args.place.device_wait_secs));
        let expected = size_gb << 30;
        let Some(dev) = self
            .check("disk found on this node by its serial", async {
                let id = device::DiskId {
                    serial: serial.clone(),
                    identification: identification.clone(),
                };
                let dir = by_id.clone();
                let found = self
                    .node_op(move || device::find(&dir, &id, None, &wait))
                    .await
                    .map_err(|e| (e, String::new()))?;
                match found {
                    Ok(dev) => {
                        let detail = format!(
                            "{}; by-id names: {}; {}",
                            dev.describe(),
                            dev.aliases.join(", "),
                            bus_advice(dev.found_as.as_ref())
                        );
                        self.report.with(|s| {
                            s.disk_names = dev.aliases.clone();
                            s.device = Some(dev.path.display().to_string());
                        });
                        Ok((dev, detail))
                    }
                    Err(e) => Err((
                        e.to_string(),
                        format!(
                            "the volume is attached (the cloud says in-use on this VM) but no disk with its serial appeared in {}: check that {} is the host's udev by-id directory (the node pod mounts /dev and /run/udev); the attach target was {target}: if `ls -l {}` shows the disk under another name, report it, and try --attach-target /dev/vda (the chart's controller.attachTarget)",
                            by_id.display(),
                            by_id.display(),
                            by_id.display()
                        ),
                    )),
                }
            })
            .await
        else {
            return;
        };

        if self
            .check("size", async {
                if dev.size == expected {
                    Ok(((), format!("{} bytes = {size_gb} GB as the cloud counts (2^30 bytes)", dev.size)))
                } else {
                    Err((
                        format!("{} is {} bytes but a {size_gb} GB volume should be {expected}", dev.path.display(), dev.size),
                        "the node refuses disks whose size does not match; report this with the volume's `lunanode-csi volume info`".into(),
                    ))
                }
            })
            .await
            .is_none()
        {
            return;
        }

        let path = dev.path.clone();
        let fs2 = fs_type.clone();
        let devc = dev.clone();
        if self
            .check(&format!("probed blank and formatted {fs_type}"), async {
                let r = self
                    .node_op(move || -> Result<(), String> {
                        match probe::probe(&path).map_err(|e| e.to_string())? {
                            Probe::Blank => {}
                            other => return Err(format!("a new volume is not blank: the probe found {other:?}; nothing was formatted")),
                        }
                        device::still_same(&devc).map_err(|e| e.to_string())?;
                        fs::format(&path, &fs2).map_err(|e| e.to_string())
                    })
                    .await
                    .and_then(|r| r);
                r.map(|()| ((), format!("{} is now {fs_type}", dev.path.display())))
                    .map_err(|e| (e, format!("the node image needs mkfs.{fs_type} and blkid; the message says what failed")))
            })
            .await
            .is_none()
        {
            return;
        }

        let dir = self.args.work_dir.join(&label);
        let (path, fs2, dir2) = (dev.path.clone(), fs_type.clone(), dir.clone());
        let state = self.state.clone();
        let at = format!("at {}", dir.display());
        if self
            .check("mounted", async move {
                self.node_op(move || -> Result<(), String> {
                    mount::ensure_dir(&dir2).map_err(|e| e.to_string())?;
                    mount::mount_fs(&path, &dir2, &fs2, &mount::MountOptions::default())
                        .map_err(|e| e.to_string())?;
                    state.lock().expect("preflight state lock").mounted = Some(dir2.to_path_buf());
                    Ok(())
                })
                .await
                .and_then(|r| r)
                .map(|()| ((), at))
                .map_err(|e| (e, "the node plugin runs privileged with /dev mounted; run preflight the same way (as root)".into()))
            })
            .await
            .is_none()
        {
            return;
        }

        let dir2 = dir.clone();
        if self
            .check("file written and read back", async {
                self.node_op(move || write_and_read(&dir2))
                    .await
                    .and_then(|r| r)
                    .map(|n| ((), format!("{n} bytes, fsynced and read back equal")))
                    .map_err(|e| (e, "the disk does not keep what is written to it: report this with the node's kernel log (dmesg)".into()))
            })
            .await
            .is_none()
        {
            return;
        }

        if self
            .check("unmounted", async {
                self.unmount_work()
                    .await
                    .map(|()| ((), "clean".to_string()))
                    .map_err(|e| (e, "something on this node holds the mount open".into()))
            })
            .await
            .is_none()
        {
            return;
        }

        if self
            .check("detached", async {
                let req = ControllerUnpublishVolumeRequest {
                    volume_id: volume_id.clone(),
                    node_id: node_id.clone(),
                    ..Default::default()
                };
                controller
                    .controller_unpublish_volume(Request::new(req))
                    .await
                    .map(|_| ((), format!("volume {volume_id} is available again")))
                    .map_err(|s| {
                        (
                            status_text(&s),
                            "the cloud did not detach it; see the message".into(),
                        )
                    })
            })
            .await
            .is_none()
        {
            return;
        }

        self.check("deleted", async {
            let req = DeleteVolumeRequest {
                volume_id: volume_id.clone(),
                ..Default::default()
            };
            match controller.delete_volume(Request::new(req)).await {
                Ok(_) => {
                    self.state().volume_id = None;
                    Ok(((), format!("volume {volume_id}")))
                }
                Err(s) => Err((
                    status_text(&s),
                    "the cloud did not delete it; see the message".into(),
                )),
            }
        })
        .await;
    }

    /// Unmount the test volume if it is mounted, and remove its directory.
    async fn unmount_work(&self) -> Result<(), String> {
        let Some(dir) = self.state().mounted.clone() else {
            return Ok(());
        };
        let state = self.state.clone();
        self.node_op(move || -> Result<(), String> {
            mount::unmount(&dir).map_err(|e| e.to_string())?;
            state.lock().expect("preflight state lock").mounted = None;
            let _ = std::fs::remove_dir(&dir);
            Ok(())
        })
        .await
        .and_then(|r| r)
    }

    /// Detach and delete every volume labelled with `prefix`. Returns what it removed.
    async fn sweep(&self, prefix: &str) -> Result<Vec<String>, String> {
        let vols = self
            .client
            .volume_list(None)
            .await
            .map_err(|e| e.to_string())?;
        let mut removed = Vec::new();
        let mut failed = Vec::new();
        for v in vols.iter().filter(|v| v.name.starts_with(prefix)) {
            let region = if v.region.is_empty() {
                self.args
                    .regions
                    .regions
                    .first()
                    .cloned()
                    .unwrap_or_default()
            } else {
                v.region.clone()
            };
            let controller = self.controller(&region);
            let id = format!("{region}/{}", v.id);
            let result = self.remove(&controller, &id).await;
            match result {
                Ok(()) => removed.push(format!("volume {id} ({})", v.name)),
                Err(s) => failed.push(format!("volume {id} ({}): {}", v.name, status_text(&s))),
            }
        }
        if failed.is_empty() {
            Ok(removed)
        } else {
            Err(format!("could not remove {}", failed.join("; ")))
        }
    }

    /// Detach and delete one volume, waiting out a transition an interrupted run left it in
    /// (the driver answers ABORTED while the cloud is still attaching it).
    async fn remove(
        &self,
        controller: &crate::driver::ControllerService,
        id: &str,
    ) -> Result<(), tonic::Status> {
        let deadline = Instant::now() + Duration::from_secs(self.args.step_timeout_secs);
        loop {
            let unpublish = ControllerUnpublishVolumeRequest {
                volume_id: id.to_string(),
                ..Default::default()
            };
            let result = match controller
                .controller_unpublish_volume(Request::new(unpublish))
                .await
            {
                Ok(_) => controller
                    .delete_volume(Request::new(DeleteVolumeRequest {
                        volume_id: id.to_string(),
                        ..Default::default()
                    }))
                    .await
                    .map(drop),
                Err(s) => Err(s),
            };
            match result {
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Aborted
                            | tonic::Code::Unavailable
                            | tonic::Code::FailedPrecondition
                    ) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    }

    /// After the checks, whatever they reached: unmount, then detach and delete every volume
    /// of this node's preflights, and report what could not be removed.
    async fn clean_up(&self) {
        let failed = self.report.failed();
        // Mounts a killed earlier run left in the work directory go first: the volumes
        // under them cannot be detached while mounted.
        let work = self.args.work_dir.clone();
        let stale = self
            .node_op(move || unmount_under(&work))
            .await
            .unwrap_or_default();
        let unmounted = self.unmount_work().await;
        let node_id = self.state().node_id.clone();
        let Some(node_id) = node_id else {
            return;
        };
        let prefix = label_prefix(&node_id);
        let swept = self.sweep(&prefix).await;
        let mut left = Vec::new();
        if let Err(e) = &unmounted {
            left.push(format!(
                "a mount under {}: {e}",
                self.args.work_dir.display()
            ));
        }
        match swept {
            Ok(removed) if failed || !removed.is_empty() || !stale.is_empty() => {
                let mut what = removed;
                what.extend(stale.into_iter().map(|p| format!("mount {p}")));
                self.report.line(Line {
                    check: "clean-up".into(),
                    status: Status::Ok,
                    detail: if what.is_empty() {
                        "nothing of this run was left in the cloud".into()
                    } else {
                        format!("removed {}", what.join(", "))
                    },
                    fix: None,
                    seconds: 0.0,
                });
            }
            Ok(_) => {}
            Err(e) => {
                left.push(e.clone());
                self.report.line(Line {
                    check: "clean-up".into(),
                    status: Status::Failed,
                    detail: e,
                    fix: Some("run preflight again on this node (it removes its own leftovers first), or `lunanode-csi volume detach` and `volume delete` them".into()),
                    seconds: 0.0,
                });
            }
        }
        self.report.with(|s| s.left_behind = left);
    }
}

/// SIGINT or SIGTERM: the name of the one that came.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Whether the disk came as the driver first assumed (`virtio-<first 20 characters>`), and
/// what to change when it did not.
fn bus_advice(found_as: Option<&device::Candidate>) -> String {
    match found_as {
        Some(c) if c.bus == device::Bus::VirtioBlk => {
            "the virtio serial rule held (virtio-<first 20 characters of the identification>)"
                .to_string()
        }
        Some(c) => format!(
            "it came on the {} bus, not as virtio-<first 20 characters>: the driver finds it there too; --attach-target /dev/vda (the chart's controller.attachTarget) asks for virtio",
            c.bus
        ),
        None => "found by its link".to_string(),
    }
}

/// Write a MiB of varied bytes, fsync, drop it from the page cache as far as the kernel
/// lets us, read it back and compare. Returns the byte count.
fn write_and_read(dir: &Path) -> Result<usize, String> {
    use std::io::{Read, Write};
    let path = dir.join("preflight.bin");
    let data: Vec<u8> = (0..(1usize << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut f = std::fs::File::create(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(&data)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    drop(f);
    let mut back = Vec::with_capacity(data.len());
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut back))
        .map_err(|e| format!("cannot read {} back: {e}", path.display()))?;
    if back != data {
        return Err(format!(
            "{} read back {} bytes that differ from the {} written",
            path.display(),
            back.len(),
            data.len()
        ));
    }
    std::fs::remove_file(&path).map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
    Ok(data.len())
}

/// Unmount everything mounted under `work` (a killed run's test mount). Returns what it
/// unmounted.
fn unmount_under(work: &Path) -> Vec<String> {
    let work = mount::resolve(work);
    let Ok(table) = mount::mounts() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for m in table
        .iter()
        .filter(|m| m.mount_point.starts_with(&work) && m.mount_point != work)
    {
        if mount::unmount(&m.mount_point).is_ok() {
            let _ = std::fs::remove_dir(&m.mount_point);
            out.push(m.mount_point.display().to_string());
        }
    }
    out
}

/// What to do about a failed first call.
fn api_fix(e: &ApiError, url: &str) -> String {
    match e {
        ApiError::Signature { .. } => "check, in this order, the causes the line names: the API key (the Secret's api-key, 128 characters), this node's clock (NTP), then report it".into(),
        ApiError::Auth { .. } => "check the API ID (16 characters) and key (128) in the Secret; the key must be allowed to use the volume and vm APIs".into(),
        ApiError::Transient { .. } | ApiError::Throttled { .. } => format!("this node cannot reach {url} reliably: check egress (HTTPS to dynamic.lunanode.com), DNS and proxies"),
        _ => format!("the cloud at {url} answered something unexpected; check --api-url"),
    }
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_the_node_and_stay_short() {
        let p = label_prefix("2f1c6a6e-1b2c-4d5e-8f90-aabbccddeeff");
        assert_eq!(p, "lunanode-csi-preflight-2f1c6a6e1b2c-");
        assert!(label_prefix("a/b c").starts_with("lunanode-csi-preflight-abc-"));
    }

    #[test]
    fn the_bus_the_disk_came_on_is_said_plainly() {
        let id = "6a3b1f0e-2c4d-4e5f-8a9b-0c1d2e3f4a5b";
        let names = device::candidate_names(&device::serial_for(id), Some(id));
        let virtio = names
            .iter()
            .find(|c| c.bus == device::Bus::VirtioBlk)
            .unwrap();
        assert!(bus_advice(Some(virtio)).contains("rule held"));
        let ata = names.iter().find(|c| c.bus == device::Bus::Ata).unwrap();
        let said = bus_advice(Some(ata));
        assert!(
            said.contains("/dev/vda") && said.contains("not as virtio"),
            "{said}"
        );
    }

    #[test]
    fn a_written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(write_and_read(dir.path()).unwrap(), 1 << 20);
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }
}
