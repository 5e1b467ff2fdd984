//! `lunanode-csi demo`: the driver working end to end on one machine.
//!
//! It starts the simulator (loop backing when root with loop devices: volumes are sparse
//! files attached as loop devices, with the `virtio-<serial>` links udev makes), serves the
//! driver's Identity, Controller and Node services on unix sockets with the same builder as
//! `serve`, and then makes the CSI calls Kubernetes' sidecars and kubelet would make, over
//! gRPC: provision, attach, format and mount, write as a pod, snapshot, restore into another
//! region on a node there, verify the bytes, expand offline, and tear it all down. Every step
//! is checked; whatever happens, clean-up leaves no mounts, loop devices or files behind.

mod env;
mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tonic::Request;

use crate::command::CommandError;
use crate::csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
use crate::csi::*;
use crate::sim::Backing;
use env::Env;
use report::{Failure, Reporter, StepOutput, human_bytes, secs};

/// `lunanode-csi demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Simulator backing (default: loop when root with loop devices, else memory, which
    /// skips the steps that need a real disk).
    #[arg(long, value_enum)]
    pub backing: Option<Backing>,
    /// How long the simulated cloud takes for each status change (creating, attaching,
    /// detaching, extending), in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub transition_ms: u64,
    /// Also show the driver's own logs (one line per RPC) on stderr.
    #[arg(long)]
    pub verbose: bool,
    /// Test hook: fail the first step whose name contains this text (after it did its
    /// work), to show that clean-up still leaves nothing behind.
    #[arg(long, hide = true)]
    pub fail_at: Option<String>,
}

const GIB: i64 = 1 << 30;
const FILE_NAME: &str = "demo.bin";
const FILE_BYTES: usize = 4 << 20;
const CALL_TIMEOUT: Duration = Duration::from_secs(90);
const NO_DISKS: &str = "memory backing: volumes have no devices to format or mount";

/// Run the demo. Exit 0 only when every step held.
pub async fn run(args: DemoArgs) -> Result<(), CommandError> {
    let loop_ok = crate::sim::loop_available();
    let backing = match args.backing {
        Some(Backing::Loop) if !loop_ok => {
            return Err(CommandError::Config(
                "--backing loop needs root, /dev/loop-control and losetup".into(),
            ));
        }
        Some(b) => b,
        None if loop_ok => Backing::Loop,
        None => Backing::Memory,
    };
    println!(
        "lunanode-csi {} demo: the CSI calls Kubernetes makes, over gRPC, against a simulated Luna Node cloud",
        crate::VERSION
    );
    match backing {
        Backing::Loop => println!(
            "backing: loop (volumes are sparse files attached as loop devices: real ext4, real mounts)"
        ),
        Backing::Memory => {
            let why = if args.backing.is_some() {
                "--backing memory"
            } else {
                "not root, or no loop devices"
            };
            println!("backing: memory ({why})");
            println!(
                "  skipped: the node steps (format, mount, write and read the file, filesystem growth);"
            );
            println!(
                "  run as root with loop devices to see them. Every controller step still runs."
            );
        }
    }
    let dir = env::make_temp_dir().map_err(CommandError::Runtime)?;
    println!("temp dir: {}", dir.display());
    println!();

    let mut rep = Reporter::new(args.fail_at.clone());
    let transition = Duration::from_millis(args.transition_ms);
    let mut ledger = Ledger::default();
    let mut env = None;
    let mut failure = match setup(&mut rep, &dir, backing, transition).await {
        Ok(e) => {
            let e = env.insert(e);
            let played = tokio::select! {
                r = play(e, &mut rep, &mut ledger) => Some(r),
                _ = crate::server::termination_signal() => None,
            };
            match played {
                Some(r) => r.err(),
                None => Some(Failure {
                    number: rep.results().len() + 1,
                    name: "interrupted".into(),
                    reason: "SIGINT or SIGTERM received".into(),
                }),
            }
        }
        Err(f) => Some(f),
    };
    if let Some(f) = &failure {
        println!();
        println!(
            "step {} ({}) FAILED: {}; cleaning up",
            f.number, f.name, f.reason
        );
    }
    let played_ok = failure.is_none();
    let cleaned = rep
        .step(
            "Clean up: stop driver and simulator; no mounts, loop devices, files left",
            finish(env, &mut ledger, &dir, played_ok),
        )
        .await;
    if let (Err(f), None) = (cleaned, &failure) {
        failure = Some(f);
    }

    let (ok, failed, skipped) = rep.counts();
    println!();
    println!(
        "summary: {} steps: {ok} ok, {failed} failed, {skipped} skipped; total {} (backing {})",
        rep.results().len(),
        secs(rep.elapsed()),
        match backing {
            Backing::Loop => "loop",
            Backing::Memory => "memory",
        }
    );
    let mut slowest: Vec<_> = rep
        .results()
        .iter()
        .filter(|r| !r.elapsed.is_zero())
        .collect();
    slowest.sort_by_key(|r| std::cmp::Reverse(r.elapsed));
    let slowest: Vec<String> = slowest
        .iter()
        .take(3)
        .map(|r| format!("{}. {} ({})", r.number, r.name, secs(r.elapsed)))
        .collect();
    if !slowest.is_empty() {
        println!("slowest: {}", slowest.join("; "));
    }
    match failure {
        None => {
            println!("demo ok: every check held");
            Ok(())
        }
        Some(f) => Err(CommandError::Runtime(format!(
            "demo failed at step {} ({}): {}",
            f.number, f.name, f.reason
        ))),
    }
}

/// What exists and must be undone if the demo stops early.
#[derive(Default)]
struct Ledger {
    published: Vec<Placed>,
    staged: Vec<Placed>,
    /// (volume ID, node ID)
    attached: Vec<(String, String)>,
    snapshots: Vec<String>,
    volumes: Vec<String>,
}

/// A volume staged or published at a path on one of the nodes.
#[derive(Debug, Clone)]
struct Placed {
    node: usize,
    volume: String,
    path: PathBuf,
}

fn req<T>(t: T) -> Request<T> {
    let mut r = Request::new(t);
    r.set_timeout(CALL_TIMEOUT);
    r
}

fn st(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
    }
}

fn region_of(topology: &[Topology]) -> String {
    topology
        .iter()
        .filter_map(|t| t.segments.get(crate::TOPOLOGY_KEY))
        .cloned()
        .collect::<Vec<_>>()
        .join(",")
}

fn topology(region: &str) -> Topology {
    Topology {
        segments: HashMap::from([(crate::TOPOLOGY_KEY.to_string(), region.to_string())]),
    }
}

/// Where kubelet would stage a volume on a node.
fn staging_path(env: &Env, node: usize, volume_id: &str) -> PathBuf {
    let hash = hex::encode(&Sha256::digest(volume_id.as_bytes())[..8]);
    env.nodes[node]
        .kubelet_dir
        .join("plugins/kubernetes.io/csi/csi.lunanode.com")
        .join(hash)
        .join("globalmount")
}

/// Where kubelet would publish a volume for a pod.
fn pod_path(env: &Env, node: usize, pod: &str, pv: &str) -> PathBuf {
    env.nodes[node]
        .kubelet_dir
        .join("pods")
        .join(pod)
        .join("volumes/kubernetes.io~csi")
        .join(pv)
        .join("mount")
}

/// Start the simulator and the driver.
async fn setup(
    rep: &mut Reporter,
    dir: &Path,
    backing: Backing,
    transition: Duration,
) -> Result<Env, Failure> {
    let name = match backing {
        Backing::Loop => "Start the simulated cloud (loop backing), VMs in toronto and montreal",
        Backing::Memory => {
            "Start the simulated cloud (memory backing), VMs in toronto and montreal"
        }
    };
    let (sim, mtl) = rep
        .step(name, async {
            let sim = env::start_sim(dir, backing, transition).await?;
            let mtl = match sim.add_vm("montreal", Some("node-mtl")) {
                Ok(vm) => vm,
                Err(e) => {
                    sim.shutdown().await;
                    return Err(e.to_string());
                }
            };
            let detail = format!(
                "API {}\nVM node-1 {} (toronto), VM node-mtl {} (montreal)",
                sim.url, sim.vms[0].id, mtl.id
            );
            Ok(((sim, mtl), detail))
        })
        .await?;
    rep.step(
        "Start the driver: controller+node for node-1, node for node-mtl",
        async {
            match Env::start(dir, sim, mtl).await {
                Ok(env) => {
                    let detail = format!(
                        "sockets in {}; --by-id-dir {}",
                        dir.join("sockets").display(),
                        env.sim().by_id_dir.display()
                    );
                    Ok((env, detail))
                }
                Err((e, sim)) => {
                    sim.shutdown().await;
                    Err(e)
                }
            }
        },
    )
    .await
}

/// The scenario.
async fn play(env: &mut Env, rep: &mut Reporter, led: &mut Ledger) -> Result<(), Failure> {
    let real = env.backing == Backing::Loop;
    let tor_vm = env.nodes[0].vm.clone();

    // ---- the driver registers -------------------------------------------------------------
    rep.step(
        "Identity: GetPluginInfo, Probe, GetPluginCapabilities",
        async {
            let mut id = env.identity.clone();
            let info = id
                .get_plugin_info(req(GetPluginInfoRequest {}))
                .await
                .map_err(st)?
                .into_inner();
            if info.name != crate::DRIVER_NAME {
                return Err(format!("driver name is {:?}", info.name));
            }
            let probe = id
                .probe(req(ProbeRequest {}))
                .await
                .map_err(st)?
                .into_inner();
            if probe.ready != Some(true) {
                return Err("Probe did not report ready".into());
            }
            let caps = id
                .get_plugin_capabilities(req(GetPluginCapabilitiesRequest {}))
                .await
                .map_err(st)?
                .into_inner();
            let offline = caps.capabilities.iter().any(|c| {
                matches!(
                    &c.r#type,
                    Some(plugin_capability::Type::VolumeExpansion(e))
                        if e.r#type == plugin_capability::volume_expansion::Type::Offline as i32
                )
            });
            if !offline {
                return Err("VolumeExpansion OFFLINE is not declared".into());
            }
            Ok((
                (),
                format!(
                    "{} {}, ready; controller service, topology, offline expansion",
                    info.name, info.vendor_version
                ),
            ))
        },
    )
    .await?;

    rep.step(
        "NodeGetInfo on both nodes: node ID is the VM ID, topology is the region",
        async {
            let mut lines = Vec::new();
            for n in &env.nodes {
                let info = n
                    .client
                    .clone()
                    .node_get_info(req(NodeGetInfoRequest {}))
                    .await
                    .map_err(st)?
                    .into_inner();
                let region = region_of(info.accessible_topology.as_slice());
                if info.node_id != n.vm.id || region != n.vm.region {
                    return Err(format!(
                        "{} reports node {} in {region:?}; expected {} in {}",
                        n.vm.name, info.node_id, n.vm.id, n.vm.region
                    ));
                }
                lines.push(format!(
                    "{}: node {} topology {}={} max volumes {}",
                    n.vm.name,
                    info.node_id,
                    crate::TOPOLOGY_KEY,
                    region,
                    info.max_volumes_per_node
                ));
            }
            Ok(((), lines.join("\n")))
        },
    )
    .await?;

    // ---- provision, attach, mount, write ---------------------------------------------------
    let pv1 = format!("pvc-{}", uuid::Uuid::new_v4());
    let v1 = rep
        .step(
            "CreateVolume 1 GiB ext4 (WaitForFirstConsumer: topology of node-1)",
            async {
                let r = env
                    .controller
                    .clone()
                    .create_volume(req(CreateVolumeRequest {
                        name: pv1.clone(),
                        capacity_range: Some(CapacityRange {
                            required_bytes: GIB,
                            limit_bytes: 0,
                        }),
                        volume_capabilities: vec![mount_cap()],
                        accessibility_requirements: Some(TopologyRequirement {
                            requisite: vec![topology(&tor_vm.region)],
                            preferred: vec![topology(&tor_vm.region)],
                        }),
                        ..Default::default()
                    }))
                    .await
                    .map_err(st)?
                    .into_inner();
                let v = r.volume.ok_or("no volume in the response")?;
                led.volumes.push(v.volume_id.clone());
                let region = region_of(&v.accessible_topology);
                if region != "toronto" || v.capacity_bytes != GIB {
                    return Err(format!(
                        "got {} bytes in {region:?}, expected 1 GiB in toronto",
                        v.capacity_bytes
                    ));
                }
                let d = format!(
                    "volume {} ({}), label {pv1}, accessible in {region}",
                    v.volume_id,
                    human_bytes(v.capacity_bytes)
                );
                Ok((v.volume_id, d))
            },
        )
        .await?;

    let ctx1 = publish(
        env,
        rep,
        led,
        &v1,
        0,
        "ControllerPublishVolume: attach it to node-1",
    )
    .await?;

    let stage1 = staging_path(env, 0, &v1);
    let pod1 = pod_path(env, 0, &uuid::Uuid::new_v4().to_string(), &pv1);
    let mut digest = String::new();
    let mut stats_before: Option<Usage> = None;
    if real {
        stage(
            env,
            rep,
            led,
            0,
            &v1,
            &ctx1,
            &stage1,
            "NodeStageVolume: blank disk, so format ext4 and mount",
        )
        .await?;
        node_publish(
            env,
            rep,
            led,
            0,
            &v1,
            &ctx1,
            &stage1,
            &pod1,
            "NodePublishVolume: bind-mount into the pod's volume dir",
        )
        .await?;
        digest = rep
            .step(
                format!(
                    "The pod writes {FILE_NAME}: {} MiB of random bytes",
                    FILE_BYTES >> 20
                ),
                write_file(pod1.join(FILE_NAME)),
            )
            .await?;
    } else {
        rep.skip("NodeStageVolume: format ext4 and mount", NO_DISKS);
        rep.skip("NodePublishVolume into the pod's volume dir", NO_DISKS);
        rep.skip("The pod writes a file of random bytes", NO_DISKS);
    }

    // ---- snapshot, restore into montreal, verify -------------------------------------------
    let snap_name = format!("snapshot-{}", uuid::Uuid::new_v4());
    let snap = rep
        .step(
            format!("CreateSnapshot of {v1}, repeated until ready to use"),
            async {
                // Like csi-snapshotter: CreateSnapshot is idempotent by name, and is called
                // again until the snapshot is ready to use.
                let started = tokio::time::Instant::now();
                let mut calls = 0;
                loop {
                    calls += 1;
                    let r = env
                        .controller
                        .clone()
                        .create_snapshot(req(CreateSnapshotRequest {
                            source_volume_id: v1.clone(),
                            name: snap_name.clone(),
                            ..Default::default()
                        }))
                        .await
                        .map_err(st)?
                        .into_inner();
                    let s = r.snapshot.ok_or("no snapshot in the response")?;
                    if !led.snapshots.contains(&s.snapshot_id) {
                        led.snapshots.push(s.snapshot_id.clone());
                    }
                    if s.source_volume_id != v1 {
                        return Err(format!(
                            "snapshot {} names source {:?}",
                            s.snapshot_id, s.source_volume_id
                        ));
                    }
                    if s.ready_to_use {
                        let d = format!(
                            "snapshot {} ({}), ready to use after {calls} call(s)",
                            s.snapshot_id,
                            human_bytes(s.size_bytes)
                        );
                        return Ok((s.snapshot_id, d));
                    }
                    if started.elapsed() > Duration::from_secs(60) {
                        return Err(format!("snapshot {} not ready after 60s", s.snapshot_id));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        )
        .await?;

    let pv2 = format!("pvc-{}", uuid::Uuid::new_v4());
    let v2 = rep
        .step(
            "CreateVolume from the snapshot in montreal (StorageClass region: montreal)",
            async {
                let r = env
                    .controller
                    .clone()
                    .create_volume(req(CreateVolumeRequest {
                        name: pv2.clone(),
                        capacity_range: Some(CapacityRange {
                            required_bytes: GIB,
                            limit_bytes: 0,
                        }),
                        volume_capabilities: vec![mount_cap()],
                        parameters: HashMap::from([("region".into(), "montreal".into())]),
                        volume_content_source: Some(VolumeContentSource {
                            r#type: Some(volume_content_source::Type::Snapshot(
                                volume_content_source::SnapshotSource {
                                    snapshot_id: snap.clone(),
                                },
                            )),
                        }),
                        ..Default::default()
                    }))
                    .await
                    .map_err(st)?
                    .into_inner();
                let v = r.volume.ok_or("no volume in the response")?;
                led.volumes.push(v.volume_id.clone());
                let region = region_of(&v.accessible_topology);
                if region != "montreal" || !v.volume_id.starts_with("montreal/") {
                    return Err(format!("restored volume {} is in {region:?}", v.volume_id));
                }
                let state = env.sim().state();
                let replicated = state.calls.get("volume/snapshot-replicate").copied().unwrap_or(0);
                if replicated == 0 {
                    return Err("the snapshot was not replicated to montreal".into());
                }
                if !state.images.is_empty() {
                    return Err(format!(
                        "the intermediate image was left behind: {:?}",
                        state.images
                    ));
                }
                let d = format!(
                    "volume {} ({}) in montreal: snapshot replicated to an image in montreal,\nvolume created from the image, image deleted",
                    v.volume_id,
                    human_bytes(v.capacity_bytes)
                );
                Ok((v.volume_id, d))
            },
        )
        .await?;

    let ctx2 = publish(
        env,
        rep,
        led,
        &v2,
        1,
        "ControllerPublishVolume: attach the restored volume to node-mtl",
    )
    .await?;
    let stage2 = staging_path(env, 1, &v2);
    let pod2 = pod_path(env, 1, &uuid::Uuid::new_v4().to_string(), &pv2);
    if real {
        stage(
            env,
            rep,
            led,
            1,
            &v2,
            &ctx2,
            &stage2,
            "NodeStageVolume on node-mtl: ext4 found, mounted as is (no format)",
        )
        .await?;
        node_publish(
            env,
            rep,
            led,
            1,
            &v2,
            &ctx2,
            &stage2,
            &pod2,
            "NodePublishVolume on node-mtl into a pod",
        )
        .await?;
        rep.step(
            format!("The pod in montreal reads {FILE_NAME}: same bytes as written in toronto"),
            check_file(pod2.join(FILE_NAME), digest.clone()),
        )
        .await?;
    } else {
        rep.skip("NodeStageVolume on node-mtl", NO_DISKS);
        rep.skip("NodePublishVolume on node-mtl", NO_DISKS);
        rep.skip("The pod in montreal reads the file: same bytes", NO_DISKS);
    }

    // ---- offline expansion of the first volume ---------------------------------------------
    if real {
        stats_before = Some(
            rep.step(
                format!("NodeGetVolumeStats {v1} before expansion"),
                stats(env, 0, &v1, &pod1),
            )
            .await?,
        );
        unpublish_one(
            env,
            rep,
            led,
            &v1,
            "NodeUnpublishVolume: the pod on node-1 stops",
        )
        .await?;
        unstage_one(env, rep, led, &v1, "NodeUnstageVolume: unmount from node-1").await?;
    } else {
        rep.skip("NodeGetVolumeStats before expansion", NO_DISKS);
        rep.skip("NodeUnpublishVolume: the pod stops", NO_DISKS);
        rep.skip("NodeUnstageVolume", NO_DISKS);
    }
    rep.step("ControllerUnpublishVolume: detach it from node-1", async {
        controller_unpublish(env, &v1, &tor_vm.id).await?;
        led.attached.retain(|(v, _)| v != &v1);
        Ok(((), format!("{v1} detached from {}", tor_vm.id)))
    })
    .await?;
    rep.step("ControllerExpandVolume offline: 1 GiB -> 2 GiB", async {
        let r = env
            .controller
            .clone()
            .controller_expand_volume(req(ControllerExpandVolumeRequest {
                volume_id: v1.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 2 * GIB,
                    limit_bytes: 0,
                }),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            }))
            .await
            .map_err(st)?
            .into_inner();
        if r.capacity_bytes != 2 * GIB || !r.node_expansion_required {
            return Err(format!(
                "capacity {} node_expansion_required {}",
                r.capacity_bytes, r.node_expansion_required
            ));
        }
        Ok((
            (),
            format!(
                "{v1} is now {}; the filesystem grows at the next stage",
                human_bytes(r.capacity_bytes)
            ),
        ))
    })
    .await?;
    let ctx1 = publish(
        env,
        rep,
        led,
        &v1,
        0,
        "ControllerPublishVolume: attach it to node-1 again",
    )
    .await?;
    if real {
        stage(
            env,
            rep,
            led,
            0,
            &v1,
            &ctx1,
            &stage1,
            "NodeStageVolume: the device is bigger, so grow ext4 and mount",
        )
        .await?;
        node_publish(
            env,
            rep,
            led,
            0,
            &v1,
            &ctx1,
            &stage1,
            &pod1,
            "NodePublishVolume into the pod's volume dir",
        )
        .await?;
        let before = stats_before.unwrap_or_default();
        rep.step(
            format!("NodeGetVolumeStats: the filesystem grew and {FILE_NAME} is intact"),
            async {
                let (after, d) = stats(env, 0, &v1, &pod1).await?;
                if after.total <= before.total {
                    return Err(format!(
                        "filesystem did not grow: {} before, {} after",
                        before.total, after.total
                    ));
                }
                let (_, check) = check_file(pod1.join(FILE_NAME), digest.clone()).await?;
                Ok((
                    (),
                    format!(
                        "size {} -> {}\n{d}\n{check}",
                        human_bytes(before.total),
                        human_bytes(after.total)
                    ),
                ))
            },
        )
        .await?;
    } else {
        rep.skip("NodeStageVolume: grow ext4 and mount", NO_DISKS);
        rep.skip("NodePublishVolume", NO_DISKS);
        rep.skip(
            "NodeGetVolumeStats: the filesystem grew, the file is intact",
            NO_DISKS,
        );
    }

    // ---- tear down ----------------------------------------------------------------------
    if real {
        rep.step("NodeUnpublishVolume both pods", async {
            let done = undo_published(env, led).await?;
            Ok(((), done.join("\n")))
        })
        .await?;
        rep.step("NodeUnstageVolume both volumes", async {
            let done = undo_staged(env, led).await?;
            Ok(((), done.join("\n")))
        })
        .await?;
    } else {
        rep.skip("NodeUnpublishVolume both pods", NO_DISKS);
        rep.skip("NodeUnstageVolume both volumes", NO_DISKS);
    }
    rep.step("ControllerUnpublishVolume both volumes", async {
        let done = undo_attached(env, led).await?;
        Ok(((), done.join("\n")))
    })
    .await?;
    rep.step(format!("DeleteSnapshot {snap}"), async {
        let done = undo_snapshots(env, led).await?;
        Ok(((), done.join("\n")))
    })
    .await?;
    rep.step("DeleteVolume both volumes", async {
        let done = undo_volumes(env, led).await?;
        Ok(((), done.join("\n")))
    })
    .await?;
    rep.step(
        "The simulated cloud holds no volumes, snapshots or images",
        async {
            let s = env.sim().state();
            if !(s.volumes.is_empty() && s.snapshots.is_empty() && s.images.is_empty()) {
                return Err(format!(
                    "left: {} volumes, {} snapshots, {} images",
                    s.volumes.len(),
                    s.snapshots.len(),
                    s.images.len()
                ));
            }
            let calls: u64 = s.calls.values().sum();
            Ok((
                (),
                format!("0 volumes, 0 snapshots, 0 images ({calls} API calls made)"),
            ))
        },
    )
    .await?;
    Ok(())
}

/// ControllerPublishVolume as the attacher sends it; returns the publish context.
async fn publish(
    env: &Env,
    rep: &mut Reporter,
    led: &mut Ledger,
    volume: &str,
    node: usize,
    name: &str,
) -> Result<HashMap<String, String>, Failure> {
    let vm = env.nodes[node].vm.clone();
    rep.step(name, async {
        let r = env
            .controller
            .clone()
            .controller_publish_volume(req(ControllerPublishVolumeRequest {
                volume_id: volume.to_string(),
                node_id: vm.id.clone(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            }))
            .await
            .map_err(st)?
            .into_inner();
        led.attached.push((volume.to_string(), vm.id.clone()));
        let serial = r
            .publish_context
            .get(crate::driver::node::CTX_SERIAL)
            .cloned()
            .ok_or("publish context has no serial")?;
        let mut d = format!(
            "{volume} attached to {} ({}), virtio serial {serial}",
            vm.name, vm.id
        );
        if let Some(v) = env
            .sim()
            .state()
            .volumes
            .iter()
            .find(|v| volume.ends_with(&format!("/{}", v.id)))
            && let (Some(dev), Some(link)) = (&v.device, &v.link)
        {
            d.push_str(&format!("\nthe VM sees {link} -> {dev}"));
        }
        Ok((r.publish_context, d))
    })
    .await
}

#[allow(clippy::too_many_arguments)]
async fn stage(
    env: &Env,
    rep: &mut Reporter,
    led: &mut Ledger,
    node: usize,
    volume: &str,
    ctx: &HashMap<String, String>,
    staging: &Path,
    name: &str,
) -> Result<(), Failure> {
    rep.step(name, async {
        env.nodes[node]
            .client
            .clone()
            .node_stage_volume(req(NodeStageVolumeRequest {
                volume_id: volume.to_string(),
                publish_context: ctx.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            }))
            .await
            .map_err(st)?;
        led.staged.push(Placed {
            node,
            volume: volume.to_string(),
            path: staging.to_path_buf(),
        });
        let m = crate::volumes::mount::mount_at(staging)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{} is not a mount point", staging.display()))?;
        Ok((
            (),
            format!(
                "{} ({}) mounted at {}",
                m.source,
                m.fs_type,
                staging.display()
            ),
        ))
    })
    .await
}

#[allow(clippy::too_many_arguments)]
async fn node_publish(
    env: &Env,
    rep: &mut Reporter,
    led: &mut Ledger,
    node: usize,
    volume: &str,
    ctx: &HashMap<String, String>,
    staging: &Path,
    target: &Path,
    name: &str,
) -> Result<(), Failure> {
    rep.step(name, async {
        env.nodes[node]
            .client
            .clone()
            .node_publish_volume(req(NodePublishVolumeRequest {
                volume_id: volume.to_string(),
                publish_context: ctx.clone(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            }))
            .await
            .map_err(st)?;
        led.published.push(Placed {
            node,
            volume: volume.to_string(),
            path: target.to_path_buf(),
        });
        Ok(((), format!("pod sees it at {}", target.display())))
    })
    .await
}

async fn unpublish_one(
    env: &Env,
    rep: &mut Reporter,
    led: &mut Ledger,
    volume: &str,
    name: &str,
) -> Result<(), Failure> {
    rep.step(name, async {
        let mut done = Vec::new();
        for p in led.published.iter().filter(|p| p.volume == volume) {
            node_unpublish(env, p).await?;
            done.push(format!("unmounted {}", p.path.display()));
        }
        led.published.retain(|p| p.volume != volume);
        Ok(((), done.join("\n")))
    })
    .await
}

async fn unstage_one(
    env: &Env,
    rep: &mut Reporter,
    led: &mut Ledger,
    volume: &str,
    name: &str,
) -> Result<(), Failure> {
    rep.step(name, async {
        let mut done = Vec::new();
        for p in led.staged.iter().filter(|p| p.volume == volume) {
            node_unstage(env, p).await?;
            done.push(format!("unmounted {}", p.path.display()));
        }
        led.staged.retain(|p| p.volume != volume);
        Ok(((), done.join("\n")))
    })
    .await
}

/// df-like numbers of a volume.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    total: i64,
}

async fn stats(env: &Env, node: usize, volume: &str, path: &Path) -> StepOutput<Usage> {
    let r = env.nodes[node]
        .client
        .clone()
        .node_get_volume_stats(req(NodeGetVolumeStatsRequest {
            volume_id: volume.to_string(),
            volume_path: path.display().to_string(),
            ..Default::default()
        }))
        .await
        .map_err(st)?
        .into_inner();
    if let Some(c) = &r.volume_condition
        && c.abnormal
    {
        return Err(format!("volume condition abnormal: {}", c.message));
    }
    let bytes = r
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .ok_or("no byte usage reported")?;
    let inodes = r
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Inodes as i32);
    let pct = if bytes.total > 0 {
        bytes.used * 100 / bytes.total
    } else {
        0
    };
    let mut d = format!(
        "{:<10} {:>10} {:>10} {:>10} {:>5}\n{:<10} {:>10} {:>10} {:>10} {:>4}%",
        "",
        "Size",
        "Used",
        "Avail",
        "Use%",
        "bytes",
        human_bytes(bytes.total),
        human_bytes(bytes.used),
        human_bytes(bytes.available),
        pct
    );
    if let Some(i) = inodes {
        d.push_str(&format!(
            "\n{:<10} {:>10} {:>10} {:>10}",
            "inodes", i.total, i.used, i.available
        ));
    }
    Ok((Usage { total: bytes.total }, d))
}

async fn write_file(path: PathBuf) -> StepOutput<String> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut data = vec![0u8; FILE_BYTES];
        fastrand::fill(&mut data);
        let digest = hex::encode(Sha256::digest(&data));
        let mut f = std::fs::File::create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        f.write_all(&data)
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let d = format!("sha256 {digest}");
        Ok((digest, d))
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn check_file(path: PathBuf, want: String) -> StepOutput<()> {
    tokio::task::spawn_blocking(move || {
        let data =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let got = hex::encode(Sha256::digest(&data));
        if got != want || data.len() != FILE_BYTES {
            return Err(format!(
                "{} has {} bytes with sha256 {got}; expected {FILE_BYTES} bytes with sha256 {want}",
                path.display(),
                data.len()
            ));
        }
        Ok((
            (),
            format!("{FILE_NAME}: {} bytes, sha256 {got} (match)", data.len()),
        ))
    })
    .await
    .map_err(|e| e.to_string())?
}

// ---- undoing, for the teardown steps and for clean-up after a failure ----------------------

async fn node_unpublish(env: &Env, p: &Placed) -> Result<(), String> {
    env.nodes[p.node]
        .client
        .clone()
        .node_unpublish_volume(req(NodeUnpublishVolumeRequest {
            volume_id: p.volume.clone(),
            target_path: p.path.display().to_string(),
        }))
        .await
        .map(drop)
        .map_err(|e| format!("NodeUnpublishVolume {}: {}", p.volume, st(e)))
}

async fn node_unstage(env: &Env, p: &Placed) -> Result<(), String> {
    env.nodes[p.node]
        .client
        .clone()
        .node_unstage_volume(req(NodeUnstageVolumeRequest {
            volume_id: p.volume.clone(),
            staging_target_path: p.path.display().to_string(),
        }))
        .await
        .map(drop)
        .map_err(|e| format!("NodeUnstageVolume {}: {}", p.volume, st(e)))
}

async fn controller_unpublish(env: &Env, volume: &str, node: &str) -> Result<(), String> {
    env.controller
        .clone()
        .controller_unpublish_volume(req(ControllerUnpublishVolumeRequest {
            volume_id: volume.to_string(),
            node_id: node.to_string(),
            ..Default::default()
        }))
        .await
        .map(drop)
        .map_err(|e| format!("ControllerUnpublishVolume {volume}: {}", st(e)))
}

async fn undo_published(env: &Env, led: &mut Ledger) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    while let Some(p) = led.published.last().cloned() {
        node_unpublish(env, &p).await?;
        led.published.pop();
        done.push(format!("{}: unmounted {}", p.volume, p.path.display()));
    }
    Ok(done)
}

async fn undo_staged(env: &Env, led: &mut Ledger) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    while let Some(p) = led.staged.last().cloned() {
        node_unstage(env, &p).await?;
        led.staged.pop();
        done.push(format!("{}: unmounted {}", p.volume, p.path.display()));
    }
    Ok(done)
}

async fn undo_attached(env: &Env, led: &mut Ledger) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    while let Some((v, n)) = led.attached.last().cloned() {
        controller_unpublish(env, &v, &n).await?;
        led.attached.pop();
        done.push(format!("{v}: detached from {n}"));
    }
    Ok(done)
}

async fn undo_snapshots(env: &Env, led: &mut Ledger) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    while let Some(s) = led.snapshots.last().cloned() {
        env.controller
            .clone()
            .delete_snapshot(req(DeleteSnapshotRequest {
                snapshot_id: s.clone(),
                ..Default::default()
            }))
            .await
            .map_err(|e| format!("DeleteSnapshot {s}: {}", st(e)))?;
        led.snapshots.pop();
        done.push(format!("{s}: deleted"));
    }
    Ok(done)
}

async fn undo_volumes(env: &Env, led: &mut Ledger) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    while let Some(v) = led.volumes.last().cloned() {
        env.controller
            .clone()
            .delete_volume(req(DeleteVolumeRequest {
                volume_id: v.clone(),
                ..Default::default()
            }))
            .await
            .map_err(|e| format!("DeleteVolume {v}: {}", st(e)))?;
        led.volumes.pop();
        done.push(format!("{v}: deleted"));
    }
    Ok(done)
}

/// Undo whatever the scenario left (after a failure), stop everything, and check that
/// nothing is left on the machine.
async fn finish(env: Option<Env>, led: &mut Ledger, dir: &Path, played_ok: bool) -> StepOutput<()> {
    let mut notes = Vec::new();
    if let Some(mut env) = env {
        // Each kind in order, so a failure in one does not stop the others.
        let undo: [(&str, _); 5] = [
            ("unpublish", undo_published(&env, led).await),
            ("unstage", undo_staged(&env, led).await),
            ("detach", undo_attached(&env, led).await),
            ("delete snapshots", undo_snapshots(&env, led).await),
            ("delete volumes", undo_volumes(&env, led).await),
        ];
        for (what, r) in undo {
            match r {
                Ok(done) => notes.extend(done.into_iter().map(|d| format!("cleaned up {d}"))),
                Err(e) => notes.push(format!("{what} failed: {e}")),
            }
        }
        env.stop_servers().await;
        let forced = env::unmount_all_under(dir);
        if !forced.is_empty() {
            notes.push(format!(
                "unmounted {} left-over mount(s): {}",
                forced.len(),
                forced
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            if played_ok {
                return Err(format!(
                    "the driver left mounts behind: {}",
                    notes.join("; ")
                ));
            }
        }
        if let Some(sim) = env.sim.take() {
            sim.shutdown().await;
        }
    }
    let forced = env::unmount_all_under(dir);
    if !forced.is_empty() {
        notes.push(format!(
            "unmounted {} more left-over mount(s)",
            forced.len()
        ));
    }
    let detached = env::detach_loops_under(dir);
    if !detached.is_empty() {
        notes.push(format!(
            "detached left-over loop devices: {}",
            detached.join(", ")
        ));
    }
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(format!("cannot remove {}: {e}", dir.display()));
    }
    let mounts = env::mounts_under(dir);
    let loops = env::loops_under(dir);
    if !mounts.is_empty() || !loops.is_empty() || dir.exists() {
        return Err(format!(
            "left behind: mounts {mounts:?}, loop devices {loops:?}, dir exists: {}",
            dir.exists()
        ));
    }
    if played_ok && !detached.is_empty() {
        return Err(format!(
            "the simulator left loop devices behind: {}",
            detached.join(", ")
        ));
    }
    notes.push(format!(
        "removed {}: no mounts or loop devices left under it",
        dir.display()
    ));
    Ok(((), notes.join("\n")))
}
