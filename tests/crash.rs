//! Crash and restart: the real binary is SIGKILLed (with its whole process group, as when a
//! container dies) in the middle of a call, restarted, and the call retried as a sidecar
//! would. The simulator lives in this test process, so the cloud survives the crash. The
//! outcome must equal the no-crash outcome: one volume per name, one snapshot per name, the
//! attachment converges, no temporary image is left, and a disk whose formatting or growth
//! was cut short ends up with a valid, clean filesystem holding the data written before.

mod common;
mod rel;

use std::path::Path;
use std::time::Duration;

use lunanode_csi::csi::*;
use lunanode_csi::sim::{Backing, SimHandle, SimState};
use rel::*;
use tonic::Code;

const BUDGET: Duration = Duration::from_secs(60);
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

async fn sim(dir: &Path, backing: Backing) -> SimHandle {
    let mut cfg = common::sim_config(dir);
    cfg.backing = backing;
    SimHandle::start(cfg).await.unwrap()
}

fn vm(sim: &SimHandle, name: &str) -> String {
    sim.vms.iter().find(|v| v.name == name).unwrap().id.clone()
}

fn labelled(s: &SimState, label: &str) -> usize {
    s.volumes.iter().filter(|v| v.label == label).count()
}

async fn create_retrying(d: &BinDriver, stats: &RetryStats, r: CreateVolumeRequest) -> Volume {
    let c = d.controller().await;
    retry(stats, "create", BUDGET, || {
        let mut c = c.clone();
        let r = r.clone();
        async move { c.create_volume(req(r, RPC_TIMEOUT)).await }
    })
    .await
    .unwrap()
    .into_inner()
    .volume
    .unwrap()
}

async fn publish_retrying(
    d: &BinDriver,
    stats: &RetryStats,
    vol: &str,
    node: &str,
) -> std::collections::HashMap<String, String> {
    let c = d.controller().await;
    retry(stats, "publish", BUDGET, || {
        let mut c = c.clone();
        let r = ControllerPublishVolumeRequest {
            volume_id: vol.into(),
            node_id: node.into(),
            volume_capability: Some(mount_cap("ext4")),
            ..Default::default()
        };
        async move { c.controller_publish_volume(req(r, RPC_TIMEOUT)).await }
    })
    .await
    .unwrap()
    .into_inner()
    .publish_context
}

/// Start `f` on the driver in the background; it is expected to die with the driver.
fn in_flight<F>(f: F) -> tokio::task::JoinHandle<Result<(), tonic::Status>>
where
    F: std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    tokio::spawn(f)
}

async fn expect_cut_off(task: tokio::task::JoinHandle<Result<(), tonic::Status>>) {
    if let Ok(Err(s)) = task.await {
        assert!(
            matches!(
                s.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "a call cut off by the crash fails as the transport failing: {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_killed_before_and_after_the_cloud_acted() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), Backing::Memory).await;
    let node = vm(&sim, "node-a");
    let sock = dir.path().join("csi/csi.sock");
    let stats = RetryStats::default();

    // 1. Killed after volume/create was applied, while waiting for the volume to be ready.
    sim.set_transition(Duration::from_secs(2));
    let mut d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let mut c = d.controller().await;
    let task = in_flight(async move {
        c.create_volume(req(create_req("pvc-crash-1", 1, None), RPC_TIMEOUT))
            .await
            .map(drop)
    });
    until_state(&sim, Duration::from_secs(10), |s| {
        labelled(s, "pvc-crash-1") == 1
    })
    .await;
    d.kill();
    expect_cut_off(task).await;
    // 2. Killed while volume/list (the name lookup) was still on the wire.
    sim.set_latency(Duration::from_millis(400));
    let mut d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let mut c = d.controller().await;
    let task = in_flight(async move {
        c.create_volume(req(create_req("pvc-crash-2", 1, None), RPC_TIMEOUT))
            .await
            .map(drop)
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    d.kill();
    expect_cut_off(task).await;
    sim.set_latency(Duration::ZERO);

    // Restart and retry both, as the provisioner would.
    let d = BinDriver::start(&sim, &node, &sock, &[]).await;
    for name in ["pvc-crash-1", "pvc-crash-2"] {
        let v = create_retrying(&d, &stats, create_req(name, 1, None)).await;
        let s = sim.state();
        assert_eq!(labelled(&s, name), 1, "exactly one volume named {name}");
        let cloud = s.volumes.iter().find(|x| x.label == name).unwrap();
        assert_eq!(v.volume_id, format!("toronto/{}", cloud.id));
        assert_eq!(cloud.status, "available");
    }
    drop(d);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_unpublish_killed_midway_converge() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), Backing::Memory).await;
    let node = vm(&sim, "node-a");
    let sock = dir.path().join("csi/csi.sock");
    let stats = RetryStats::default();
    let d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let vol = create_retrying(&d, &stats, create_req("pvc-attach", 1, None))
        .await
        .volume_id;
    drop(d);

    // Killed after volume/attach was applied, while waiting for in-use.
    sim.set_transition(Duration::from_secs(2));
    let mut d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let mut c = d.controller().await;
    let (v2, n2) = (vol.clone(), node.clone());
    let task = in_flight(async move {
        c.controller_publish_volume(req(
            ControllerPublishVolumeRequest {
                volume_id: v2,
                node_id: n2,
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            },
            RPC_TIMEOUT,
        ))
        .await
        .map(drop)
    });
    until_state(&sim, Duration::from_secs(10), |s| {
        s.volumes[0].attached.is_some()
    })
    .await;
    d.kill();
    expect_cut_off(task).await;

    let mut d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let ctx = publish_retrying(&d, &stats, &vol, &node).await;
    let s = sim.state();
    assert_eq!(s.volumes.len(), 1);
    assert_eq!(s.volumes[0].attached.as_deref(), Some(node.as_str()));
    assert_eq!(s.volumes[0].status, "in-use");
    assert_eq!(ctx["serial"], s.volumes[0].identification[..20]);

    // Killed after volume/detach was applied, while waiting for it to finish.
    let mut c = d.controller().await;
    let (v2, n2) = (vol.clone(), node.clone());
    let task = in_flight(async move {
        c.controller_unpublish_volume(req(
            ControllerUnpublishVolumeRequest {
                volume_id: v2,
                node_id: n2,
                ..Default::default()
            },
            RPC_TIMEOUT,
        ))
        .await
        .map(drop)
    });
    until_state(&sim, Duration::from_secs(10), |s| {
        s.volumes[0].status == "detaching"
    })
    .await;
    d.kill();
    expect_cut_off(task).await;
    let d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let c = d.controller().await;
    retry(&stats, "unpublish", BUDGET, || {
        let mut c = c.clone();
        let r = ControllerUnpublishVolumeRequest {
            volume_id: vol.clone(),
            node_id: node.clone(),
            ..Default::default()
        };
        async move { c.controller_unpublish_volume(req(r, RPC_TIMEOUT)).await }
    })
    .await
    .unwrap();
    let s = sim.state();
    assert_eq!(s.volumes[0].attached, None);
    assert_eq!(s.volumes[0].status, "available");
    drop(d);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_snapshot_killed_after_the_cloud_acted_gives_one_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), Backing::Memory).await;
    let node = vm(&sim, "node-a");
    let sock = dir.path().join("csi/csi.sock");
    let stats = RetryStats::default();
    let d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let vol = create_retrying(&d, &stats, create_req("pvc-snap", 1, None))
        .await
        .volume_id;
    drop(d);

    // Latency keeps the reply of snapshot-create (and the list after it) in flight.
    sim.set_latency(Duration::from_millis(300));
    let mut d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let mut c = d.controller().await;
    let v2 = vol.clone();
    let task = in_flight(async move {
        c.create_snapshot(req(
            CreateSnapshotRequest {
                source_volume_id: v2,
                name: "snap-crash".into(),
                ..Default::default()
            },
            RPC_TIMEOUT,
        ))
        .await
        .map(drop)
    });
    until_state(&sim, Duration::from_secs(10), |s| s.snapshots.len() == 1).await;
    d.kill();
    expect_cut_off(task).await;
    sim.set_latency(Duration::ZERO);

    let d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let c = d.controller().await;
    let snap = retry(&stats, "snapshot", BUDGET, || {
        let mut c = c.clone();
        let r = CreateSnapshotRequest {
            source_volume_id: vol.clone(),
            name: "snap-crash".into(),
            ..Default::default()
        };
        async move { c.create_snapshot(req(r, RPC_TIMEOUT)).await }
    })
    .await
    .unwrap()
    .into_inner()
    .snapshot
    .unwrap();
    let s = sim.state();
    assert_eq!(
        s.snapshots.len(),
        1,
        "exactly one snapshot: {:?}",
        s.snapshots
    );
    assert_eq!(snap.snapshot_id, format!("toronto/{}", s.snapshots[0].id));
    assert_eq!(snap.source_volume_id, vol);
    drop(d);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_region_restore_killed_between_replicate_and_create_and_before_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), Backing::Memory).await;
    let node = vm(&sim, "node-a");
    let sock = dir.path().join("csi/csi.sock");
    let stats = RetryStats::default();
    let d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let vol = create_retrying(&d, &stats, create_req("pvc-src", 1, None))
        .await
        .volume_id;
    let c = d.controller().await;
    let snap = retry(&stats, "snapshot", BUDGET, || {
        let mut c = c.clone();
        let r = CreateSnapshotRequest {
            source_volume_id: vol.clone(),
            name: "snap-src".into(),
            ..Default::default()
        };
        async move { c.create_snapshot(req(r, RPC_TIMEOUT)).await }
    })
    .await
    .unwrap()
    .into_inner()
    .snapshot
    .unwrap()
    .snapshot_id;
    drop(d);

    let restore = |name: &str| from_snapshot(create_req(name, 1, Some("montreal")), &snap);
    // Replication takes 2 s: kill while the image is pending (after replicate, before create).
    sim.set_transition(Duration::from_secs(2));
    let mut d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let mut c = d.controller().await;
    let r = restore("pvc-restore-1");
    let task = in_flight(async move { c.create_volume(req(r, RPC_TIMEOUT)).await.map(drop) });
    until_state(&sim, Duration::from_secs(10), |s| s.images.len() == 1).await;
    d.kill();
    expect_cut_off(task).await;
    let d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let v = create_retrying(&d, &stats, restore("pvc-restore-1")).await;
    drop(d);
    let s = sim.state();
    assert_eq!(labelled(&s, "pvc-restore-1"), 1);
    assert!(v.volume_id.starts_with("montreal/"), "{v:?}");
    assert!(
        s.images.is_empty(),
        "no temporary image left: {:?}",
        s.images
    );
    assert_eq!(
        sim.state().calls["volume/snapshot-replicate"],
        1,
        "the image was reused"
    );

    // Kill after the volume was created from the image, before the image was deleted.
    let mut d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let mut c = d.controller().await;
    let r = restore("pvc-restore-2");
    let task = in_flight(async move { c.create_volume(req(r, RPC_TIMEOUT)).await.map(drop) });
    until_state(&sim, Duration::from_secs(20), |s| {
        labelled(s, "pvc-restore-2") == 1
    })
    .await;
    d.kill();
    expect_cut_off(task).await;
    assert_eq!(
        sim.state().images.len(),
        1,
        "the crash left the image behind"
    );
    let d = BinDriver::start(&sim, &node, &sock, &[]).await;
    create_retrying(&d, &stats, restore("pvc-restore-2")).await;
    let s = sim.state();
    assert_eq!(labelled(&s, "pvc-restore-2"), 1);
    assert!(
        s.images.is_empty(),
        "no temporary image left: {:?}",
        s.images
    );
    assert_eq!(
        s.snapshots.len(),
        1,
        "only the user's snapshot: {:?}",
        s.snapshots
    );
    drop(d);
    sim.shutdown().await;
}

/// The PIDs in process group `pgid` whose command name is `comm`.
fn group_has(pgid: u32, comm: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let p = e.path();
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        // pid (comm) state ppid pgrp ...
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            return false;
        };
        let pgrp = rest
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse::<u32>().ok());
        pgrp == Some(pgid)
            && std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == comm)
    })
}

/// Start a stage in the background and SIGKILL the driver's group as soon as `comm` runs in
/// it; returns whether the kill landed while `comm` was running.
async fn kill_during(d: &mut BinDriver, r: NodeStageVolumeRequest, comm: &str) -> bool {
    let mut n = d.node().await;
    let task = in_flight(async move { n.node_stage_volume(req(r, RPC_TIMEOUT)).await.map(drop) });
    let pgid = d.child.id();
    let start = std::time::Instant::now();
    let mut caught = false;
    while start.elapsed() < Duration::from_secs(20) && !task.is_finished() {
        if group_has(pgid, comm) {
            caught = true;
            break;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    d.kill();
    let _ = task.await;
    caught
}

fn blkid_type(dev: &str) -> String {
    let out = std::process::Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", dev])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn fsck_clean(dev: &str) {
    let out = std::process::Command::new("fsck.ext4")
        .args(["-n", "-f", dev])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fsck -n {dev}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_killed_during_mkfs_and_during_growth_leaves_a_valid_filesystem() {
    if !node_capable() {
        eprintln!("skipped: needs root, loop devices and mkfs.ext4");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), Backing::Loop).await;
    let node = vm(&sim, "node-a");
    let sock = dir.path().join("csi/csi.sock");
    let stats = RetryStats::default();
    let staging = dir.path().join("kubelet/staging");
    let target = dir.path().join("kubelet/target");
    // Large and sparse, so that mkfs and resize2fs take long enough to be interrupted.
    let mut d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let vol = create_retrying(&d, &stats, create_req("pvc-stage", 64, None))
        .await
        .volume_id;
    let pctx = publish_retrying(&d, &stats, &vol, &node).await;
    let stage_req = |pctx: &std::collections::HashMap<String, String>| NodeStageVolumeRequest {
        volume_id: vol.clone(),
        publish_context: pctx.clone(),
        staging_target_path: staging.to_str().unwrap().into(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    let device = || sim.state().volumes[0].device.clone().unwrap();

    let caught_mkfs = kill_during(&mut d, stage_req(&pctx), "mkfs.ext4").await;
    eprintln!(
        "crash: kill landed during mkfs.ext4: {caught_mkfs}; blkid now says {:?}",
        blkid_type(&device())
    );
    let d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let n = d.node().await;
    let stage = |r: NodeStageVolumeRequest| {
        let n = n.clone();
        let stats = &stats;
        async move {
            retry(stats, "stage", BUDGET, || {
                let mut n = n.clone();
                let r = r.clone();
                async move { n.node_stage_volume(req(r, RPC_TIMEOUT)).await }
            })
            .await
            .unwrap();
        }
    };
    let unstage = || {
        let n = n.clone();
        let stats = &stats;
        let staging = staging.clone();
        let vol = vol.clone();
        async move {
            retry(stats, "unstage", BUDGET, || {
                let mut n = n.clone();
                let r = NodeUnstageVolumeRequest {
                    volume_id: vol.clone(),
                    staging_target_path: staging.to_str().unwrap().into(),
                };
                async move { n.node_unstage_volume(req(r, RPC_TIMEOUT)).await }
            })
            .await
            .unwrap();
        }
    };
    stage(stage_req(&pctx)).await;
    assert_eq!(blkid_type(&device()), "ext4");
    let data = pattern(42, 1 << 20);
    std::fs::write(staging.join("data.bin"), &data).unwrap();
    std::fs::File::open(staging.join("data.bin"))
        .unwrap()
        .sync_all()
        .unwrap();
    unstage().await;
    fsck_clean(&device());
    let _ = target;

    // Grow the volume offline; the next stage grows the filesystem (resize2fs): kill it there.
    let c = d.controller().await;
    retry(&stats, "unpublish", BUDGET, || {
        let mut c = c.clone();
        let r = ControllerUnpublishVolumeRequest {
            volume_id: vol.clone(),
            node_id: node.clone(),
            ..Default::default()
        };
        async move { c.controller_unpublish_volume(req(r, RPC_TIMEOUT)).await }
    })
    .await
    .unwrap();
    retry(&stats, "expand", BUDGET, || {
        let mut c = c.clone();
        let r = ControllerExpandVolumeRequest {
            volume_id: vol.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 256 * GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        };
        async move { c.controller_expand_volume(req(r, RPC_TIMEOUT)).await }
    })
    .await
    .unwrap();
    let pctx = publish_retrying(&d, &stats, &vol, &node).await;
    drop(n);
    drop(d);
    let mut d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let caught_resize = kill_during(&mut d, stage_req(&pctx), "resize2fs").await;
    eprintln!("crash: kill landed during resize2fs: {caught_resize}");
    let d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let n = d.node().await;
    let stage = |r: NodeStageVolumeRequest| {
        let n = n.clone();
        let stats = &stats;
        async move {
            retry(stats, "stage", BUDGET, || {
                let mut n = n.clone();
                let r = r.clone();
                async move { n.node_stage_volume(req(r, RPC_TIMEOUT)).await }
            })
            .await
            .unwrap();
        }
    };
    stage(stage_req(&pctx)).await;
    let v = nix::sys::statvfs::statvfs(&staging).unwrap();
    let fs_bytes = v.blocks() as u64 * v.fragment_size() as u64;
    assert!(fs_bytes > 200 * GIB as u64, "filesystem grew: {fs_bytes}");
    assert_eq!(std::fs::read(staging.join("data.bin")).unwrap(), data);
    retry(&stats, "unstage", BUDGET, || {
        let mut n = n.clone();
        let r = NodeUnstageVolumeRequest {
            volume_id: vol.clone(),
            staging_target_path: staging.to_str().unwrap().into(),
        };
        async move { n.node_unstage_volume(req(r, RPC_TIMEOUT)).await }
    })
    .await
    .unwrap();
    assert_eq!(blkid_type(&device()), "ext4");
    fsck_clean(&device());
    assert!(
        caught_mkfs || caught_resize,
        "neither kill landed inside mkfs or resize2fs; the disk is too fast for this test"
    );
    drop(d);
    unmount_all_under(dir.path());
    sim.shutdown().await;
}
