//! Fault soak: many volume lifecycles at once against a simulator that fails 15% of all
//! requests (every fault kind, lost replies included) with jittering latency, driven with
//! sidecar-like retries. Everything must complete, nothing may leak, no name may get two
//! volumes, and every byte written must read back. Bounded: 10 lifecycles, 100 s at most.
//!
//! As root with loop devices the node half runs too (stage, publish, write, read back,
//! offline expansion reaching the filesystem); otherwise the controller-only version runs
//! and says so.

mod common;
mod rel;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lunanode_csi::csi::*;
use lunanode_csi::driver::NodeConfig;
use lunanode_csi::lunanode::{Client, ClientConfig, Credentials};
use lunanode_csi::sim::{Backing, FaultKind, SimHandle};
use rel::*;

/// Concurrent lifecycles per round, and rounds (each with a fresh simulator and seed).
const LIFECYCLES: u64 = 12;
const ROUNDS: u64 = 2;
const FAULT_RATE: f64 = 0.15;
/// Per-call budget of the retry loop (a sidecar would retry forever).
const CALL_BUDGET: Duration = Duration::from_secs(40);
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
const FILE_BYTES: usize = 256 * 1024;

struct Ctx {
    sim_vm_toronto: String,
    sim_vm_montreal: String,
    driver_socket: PathBuf,
    dir: PathBuf,
    node: bool,
    stats: RetryStats,
}

fn client(sim: &SimHandle) -> Client {
    let creds = Credentials::new(&sim.api_id, &sim.api_key).unwrap();
    let mut cfg = ClientConfig::new(sim.url.clone(), creds);
    cfg.qps = 0.0;
    // Shorter than the simulator's fault timeout, so an injected timeout is seen as one.
    cfg.request_timeout = Duration::from_millis(250);
    // No retries inside the client: every fault reaches the driver's own reconciliation,
    // and most reach the CO as a retryable code.
    cfg.max_retries = 0;
    Client::new(cfg).unwrap()
}

async fn call<T, F, Fut>(ctx: &Ctx, what: &str, f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    retry(&ctx.stats, what, CALL_BUDGET, f)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("{what}: {:?} {}", s.code(), s.message()))
}

struct Mounted {
    staging: PathBuf,
    target: PathBuf,
}

/// ControllerPublish to `vm`, then NodeStage and NodePublish.
async fn attach_and_mount(ctx: &Ctx, vol: &str, vm: &str, tag: &str) -> Result<Mounted, String> {
    let cc = rel_controller(ctx).await;
    let pctx = call(ctx, &format!("publish {vol}"), || {
        let mut c = cc.clone();
        async move {
            c.controller_publish_volume(req(
                ControllerPublishVolumeRequest {
                    volume_id: vol.into(),
                    node_id: vm.into(),
                    volume_capability: Some(mount_cap("ext4")),
                    ..Default::default()
                },
                RPC_TIMEOUT,
            ))
            .await
        }
    })
    .await?
    .publish_context;
    let base = ctx.dir.join("kubelet").join(tag);
    let staging = base.join("staging");
    let target = base.join("target");
    let nc = rel_node(ctx).await;
    let stage = NodeStageVolumeRequest {
        volume_id: vol.into(),
        publish_context: pctx.clone(),
        staging_target_path: staging.to_str().unwrap().into(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    call(ctx, &format!("stage {vol}"), || {
        let mut c = nc.clone();
        let r = stage.clone();
        async move { c.node_stage_volume(req(r, RPC_TIMEOUT)).await }
    })
    .await?;
    let publish = NodePublishVolumeRequest {
        volume_id: vol.into(),
        publish_context: pctx,
        staging_target_path: staging.to_str().unwrap().into(),
        target_path: target.to_str().unwrap().into(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    call(ctx, &format!("node publish {vol}"), || {
        let mut c = nc.clone();
        let r = publish.clone();
        async move { c.node_publish_volume(req(r, RPC_TIMEOUT)).await }
    })
    .await?;
    Ok(Mounted { staging, target })
}

/// NodeUnpublish, NodeUnstage, ControllerUnpublish.
async fn unmount_and_detach(ctx: &Ctx, vol: &str, vm: &str, m: &Mounted) -> Result<(), String> {
    let nc = rel_node(ctx).await;
    call(ctx, &format!("node unpublish {vol}"), || {
        let mut c = nc.clone();
        let r = NodeUnpublishVolumeRequest {
            volume_id: vol.into(),
            target_path: m.target.to_str().unwrap().into(),
        };
        async move { c.node_unpublish_volume(req(r, RPC_TIMEOUT)).await }
    })
    .await?;
    call(ctx, &format!("unstage {vol}"), || {
        let mut c = nc.clone();
        let r = NodeUnstageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: m.staging.to_str().unwrap().into(),
        };
        async move { c.node_unstage_volume(req(r, RPC_TIMEOUT)).await }
    })
    .await?;
    let cc = rel_controller(ctx).await;
    call(ctx, &format!("unpublish {vol}"), || {
        let mut c = cc.clone();
        let r = ControllerUnpublishVolumeRequest {
            volume_id: vol.into(),
            node_id: vm.into(),
            ..Default::default()
        };
        async move { c.controller_unpublish_volume(req(r, RPC_TIMEOUT)).await }
    })
    .await?;
    Ok(())
}

async fn rel_controller(
    ctx: &Ctx,
) -> lunanode_csi::csi::controller_client::ControllerClient<tonic::transport::Channel> {
    lunanode_csi::csi::controller_client::ControllerClient::new(
        common::channel(&ctx.driver_socket).await,
    )
}

async fn rel_node(
    ctx: &Ctx,
) -> lunanode_csi::csi::node_client::NodeClient<tonic::transport::Channel> {
    lunanode_csi::csi::node_client::NodeClient::new(common::channel(&ctx.driver_socket).await)
}

fn fs_bytes(p: &Path) -> u64 {
    let v = nix::sys::statvfs::statvfs(p).unwrap();
    v.blocks() as u64 * v.fragment_size() as u64
}

async fn create(ctx: &Ctx, r: CreateVolumeRequest) -> Result<Volume, String> {
    let cc = rel_controller(ctx).await;
    let what = format!("create {}", r.name);
    let v = call(ctx, &what, || {
        let mut c = cc.clone();
        let r = r.clone();
        async move { c.create_volume(req(r, RPC_TIMEOUT)).await }
    })
    .await?;
    v.volume
        .ok_or_else(|| format!("{what}: no volume in the reply"))
}

/// One lifecycle: create, (write), snapshot, restore (cross-region for every second),
/// clone (every third),
/// (read back), expand offline (and see the filesystem grow), delete everything.
async fn lifecycle(ctx: Arc<Ctx>, i: u64) -> Result<(), String> {
    let ctx = &*ctx;
    let name = format!("soak-{i}");
    let data = pattern(i, FILE_BYTES);
    let vol = create(ctx, create_req(&name, 1, Some("toronto")))
        .await?
        .volume_id;
    let vm_t = ctx.sim_vm_toronto.as_str();

    if ctx.node {
        let m = attach_and_mount(ctx, &vol, vm_t, &format!("{name}-a")).await?;
        let f = m.target.join("data.bin");
        std::fs::write(&f, &data).map_err(|e| format!("write {f:?}: {e}"))?;
        std::fs::File::open(&f).and_then(|f| f.sync_all()).unwrap();
        unmount_and_detach(ctx, &vol, vm_t, &m).await?;
    }

    let cc = rel_controller(ctx).await;
    let snap_name = format!("snap-{name}");
    let snap = call(ctx, &format!("snapshot {snap_name}"), || {
        let mut c = cc.clone();
        let r = CreateSnapshotRequest {
            source_volume_id: vol.clone(),
            name: snap_name.clone(),
            ..Default::default()
        };
        async move { c.create_snapshot(req(r, RPC_TIMEOUT)).await }
    })
    .await?
    .snapshot
    .ok_or("no snapshot in the reply")?;
    // The snapshotter polls until the snapshot is ready to use.
    let started = Instant::now();
    loop {
        let list = call(ctx, "list snapshot", || {
            let mut c = cc.clone();
            let r = ListSnapshotsRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            };
            async move { c.list_snapshots(req(r, RPC_TIMEOUT)).await }
        })
        .await?;
        if list
            .entries
            .iter()
            .any(|e| e.snapshot.as_ref().is_some_and(|s| s.ready_to_use))
        {
            break;
        }
        if started.elapsed() > CALL_BUDGET {
            return Err(format!("snapshot {} never became ready", snap.snapshot_id));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (region, vm_r) = if i % 2 == 0 {
        ("montreal", ctx.sim_vm_montreal.as_str())
    } else {
        ("toronto", vm_t)
    };
    let restored = create(
        ctx,
        from_snapshot(
            create_req(&format!("restore-{name}"), 1, Some(region)),
            &snap.snapshot_id,
        ),
    )
    .await?
    .volume_id;
    if !restored.starts_with(&format!("{region}/")) {
        return Err(format!(
            "restore of {name} landed in {restored}, not {region}"
        ));
    }
    if ctx.node {
        let m = attach_and_mount(ctx, &restored, vm_r, &format!("{name}-r")).await?;
        let got = std::fs::read(m.target.join("data.bin")).map_err(|e| e.to_string())?;
        if got != data {
            return Err(format!("restored {restored}: data.bin differs"));
        }
        unmount_and_detach(ctx, &restored, vm_r, &m).await?;
    }

    let mut extra = vec![restored];
    if i % 3 == 1 {
        let mut r = create_req(&format!("clone-{name}"), 1, Some("toronto"));
        r.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Volume(
                volume_content_source::VolumeSource {
                    volume_id: vol.clone(),
                },
            )),
        });
        let clone = create(ctx, r).await?.volume_id;
        if ctx.node {
            let m = attach_and_mount(ctx, &clone, vm_t, &format!("{name}-c")).await?;
            let got = std::fs::read(m.target.join("data.bin")).map_err(|e| e.to_string())?;
            if got != data {
                return Err(format!("clone {clone}: data.bin differs"));
            }
            unmount_and_detach(ctx, &clone, vm_t, &m).await?;
        }
        extra.push(clone);
    }

    // Offline expansion: the volume is detached; the filesystem grows at the next stage.
    let exp = call(ctx, &format!("expand {vol}"), || {
        let mut c = cc.clone();
        let r = ControllerExpandVolumeRequest {
            volume_id: vol.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 2 * GIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount_cap("ext4")),
            ..Default::default()
        };
        async move { c.controller_expand_volume(req(r, RPC_TIMEOUT)).await }
    })
    .await?;
    if exp.capacity_bytes != 2 * GIB || !exp.node_expansion_required {
        return Err(format!("expand {vol}: unexpected reply {exp:?}"));
    }
    if ctx.node {
        let m = attach_and_mount(ctx, &vol, vm_t, &format!("{name}-e")).await?;
        let size = fs_bytes(&m.staging);
        if size < (GIB as u64) * 3 / 2 {
            return Err(format!("{vol}: filesystem is {size} bytes after expansion"));
        }
        let got = std::fs::read(m.target.join("data.bin")).map_err(|e| e.to_string())?;
        if got != data {
            return Err(format!("expanded {vol}: data.bin differs"));
        }
        unmount_and_detach(ctx, &vol, vm_t, &m).await?;
    }

    call(ctx, "delete snapshot", || {
        let mut c = cc.clone();
        let r = DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        };
        async move { c.delete_snapshot(req(r, RPC_TIMEOUT)).await }
    })
    .await?;
    extra.push(vol.clone());
    for v in &extra {
        call(ctx, &format!("delete {v}"), || {
            let mut c = cc.clone();
            let r = DeleteVolumeRequest {
                volume_id: v.to_string(),
                ..Default::default()
            };
            async move { c.delete_volume(req(r, RPC_TIMEOUT)).await }
        })
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycles_converge_under_faults() {
    let node = node_capable();
    if !node {
        eprintln!(
            "soak: not root with loop devices and mkfs.ext4: running the controller-only version (no stage, no data checks)"
        );
    }
    for round in 0..ROUNDS {
        soak_round(node, 0x50a6 + round).await;
    }
}

async fn soak_round(node: bool, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut scfg = common::sim_config(dir.path());
    scfg.backing = if node { Backing::Loop } else { Backing::Memory };
    scfg.transition = Duration::from_millis(5).into();
    scfg.seed = seed;
    let sim = SimHandle::start(scfg).await.unwrap();
    sim.set_fault_timeout(Duration::from_millis(400));
    sim.set_fault_kinds(&FaultKind::ALL);
    let vm = |n: &str| sim.vms.iter().find(|v| v.name == n).unwrap().id.clone();

    let mut ncfg = NodeConfig::new(vm("node-a"), "toronto");
    ncfg.by_id_dir = sim.by_id_dir.clone();
    ncfg.device_wait = Duration::from_secs(10);
    let mut ccfg = common::controller_config();
    ccfg.backoff.initial = Duration::from_millis(3);
    ccfg.backoff.max = Duration::from_millis(30);
    let driver = Driver::start(dir.path(), client(&sim), ccfg, node.then_some(ncfg)).await;
    let ctx = Arc::new(Ctx {
        sim_vm_toronto: vm("node-a"),
        sim_vm_montreal: vm("node-m"),
        driver_socket: driver.socket.clone(),
        dir: dir.path().to_path_buf(),
        node,
        stats: RetryStats::default(),
    });

    let sim = Arc::new(sim);
    let done = Arc::new(AtomicBool::new(false));
    // Latency jitter (0-8 ms, changing every 20 ms) and a watch for duplicate names.
    let watcher = {
        let (sim, done) = (sim.clone(), done.clone());
        tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut dups = Vec::new();
            while !done.load(Ordering::Relaxed) {
                sim.set_latency(Duration::from_micros(rng.u64(0..8000)));
                dups.extend(duplicate_labels(&sim));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            dups
        })
    };
    sim.set_fault_rate(FAULT_RATE);
    sim.reset_counters();

    let started = Instant::now();
    let tasks: Vec<_> = (0..LIFECYCLES)
        .map(|i| tokio::spawn(lifecycle(ctx.clone(), i)))
        .collect();
    let results = tokio::time::timeout(
        Duration::from_secs(100),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("the soak finishes within 100 s");
    let elapsed = started.elapsed();
    sim.set_fault_rate(0.0);
    done.store(true, Ordering::Relaxed);
    let dups = watcher.await.unwrap();

    let state = sim.state();
    let requests: u64 = state.calls.values().sum();
    eprintln!(
        "soak: seed {seed:#x}: {LIFECYCLES} lifecycles ({}), fault rate {FAULT_RATE}, {requests} API requests, {:.1} s; CO side: {}",
        if node {
            "controller + node"
        } else {
            "controller only"
        },
        elapsed.as_secs_f64(),
        ctx.stats.summary()
    );
    eprintln!("soak: API requests by action: {:?}", state.calls);
    let failures: Vec<String> = results
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("lifecycle {i}: {e}")),
            Err(e) => Some(format!("lifecycle {i} panicked: {e}")),
        })
        .collect();

    driver.stop().await;
    unmount_all_under(dir.path());
    let sim = Arc::try_unwrap(sim).ok().expect("sole owner");
    sim.shutdown().await;

    assert!(failures.is_empty(), "lifecycles failed: {failures:#?}");
    assert!(dups.is_empty(), "names that got two volumes: {dups:?}");
    assert!(
        state.volumes.is_empty() && state.snapshots.is_empty() && state.images.is_empty(),
        "left behind in the cloud:\n{}",
        objects(&state)
    );
    let internals = ctx.stats.internals.lock().unwrap().clone();
    assert!(
        internals.is_empty(),
        "retryable cloud faults reached the CO as INTERNAL: {internals:#?}"
    );
}
