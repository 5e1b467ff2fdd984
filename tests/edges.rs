//! Robust edges: the real binary's socket permissions; SIGTERM during an in-flight call
//! loses nothing; a mount lost behind the driver's back is reported abnormal; a busy mount
//! is never forced and is reported retryable.

mod common;
mod rel;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use lunanode_csi::csi::*;
use lunanode_csi::driver::NodeConfig;
use lunanode_csi::sim::{Backing, SimHandle};
use rel::*;
use tonic::Code;

const T: Duration = Duration::from_secs(30);

fn vm(sim: &SimHandle, name: &str) -> String {
    sim.vms.iter().find(|v| v.name == name).unwrap().id.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_0660_and_sigterm_lets_an_in_flight_create_finish() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimHandle::start(common::sim_config(dir.path()))
        .await
        .unwrap();
    let node = vm(&sim, "node-a");
    let sock = dir.path().join("csi/csi.sock");
    let mut d = BinDriver::start(&sim, &node, &sock, &[]).await;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");

    // Every API request takes 400 ms: CreateVolume (list, create, info) is in flight for
    // over a second when SIGTERM arrives.
    sim.set_latency(Duration::from_millis(400));
    let mut c = d.controller().await;
    let call = tokio::spawn(async move {
        c.create_volume(req(create_req("pvc-shutdown", 1, None), T))
            .await
            .map(|r| r.into_inner().volume.unwrap().volume_id)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let status = d.terminate(Duration::from_secs(20)).await;
    let result = call.await.unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "driver exits 0 within the grace: {status:?}\n{}",
        d.log_text()
    );
    eprintln!(
        "edges: SIGTERM to exit {:.2} s; in-flight CreateVolume: {:?}",
        started.elapsed().as_secs_f64(),
        result.as_ref().map_err(|s| s.code())
    );
    sim.set_latency(Duration::ZERO);
    let vol = match result {
        Ok(id) => id,
        Err(s) => {
            // Cut off after all: the retry after a restart must find exactly one volume.
            assert!(
                matches!(
                    s.code(),
                    Code::Unavailable | Code::Cancelled | Code::Unknown
                ),
                "{s:?}"
            );
            let d = BinDriver::start(&sim, &node, &sock, &[]).await;
            let c = d.controller().await;
            let stats = RetryStats::default();
            retry(&stats, "create", T, || {
                let mut c = c.clone();
                async move {
                    c.create_volume(req(create_req("pvc-shutdown", 1, None), T))
                        .await
                }
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id
        }
    };
    let s = sim.state();
    assert_eq!(s.volumes.len(), 1, "{:?}", s.volumes);
    assert_eq!(vol, format!("toronto/{}", s.volumes[0].id));
    assert!(!sock.exists(), "the socket is removed at exit");
    sim.shutdown().await;
}

struct Staged {
    vol: String,
    staging: std::path::PathBuf,
    target: std::path::PathBuf,
}

async fn stage_and_publish(d: &Driver, sim: &SimHandle, dir: &Path, name: &str) -> Staged {
    let node = vm(sim, "node-a");
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let vol = c
        .create_volume(create_req(name, 1, None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let pctx = c
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: vol.clone(),
            node_id: node,
            volume_capability: Some(mount_cap("ext4")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let staging = dir.join(format!("kubelet/{name}/staging"));
    let target = dir.join(format!("kubelet/{name}/target"));
    n.node_stage_volume(NodeStageVolumeRequest {
        volume_id: vol.clone(),
        publish_context: pctx.clone(),
        staging_target_path: staging.to_str().unwrap().into(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    })
    .await
    .unwrap();
    n.node_publish_volume(NodePublishVolumeRequest {
        volume_id: vol.clone(),
        publish_context: pctx,
        staging_target_path: staging.to_str().unwrap().into(),
        target_path: target.to_str().unwrap().into(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    })
    .await
    .unwrap();
    Staged {
        vol,
        staging,
        target,
    }
}

fn is_mount_point(p: &Path) -> bool {
    lunanode_csi::volumes::mount::mount_at(p).unwrap().is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_mount_is_abnormal_and_busy_mounts_are_not_forced() {
    if !node_capable() {
        eprintln!("skipped: needs root, loop devices and mkfs.ext4");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut scfg = common::sim_config(dir.path());
    scfg.backing = Backing::Loop;
    let sim = SimHandle::start(scfg).await.unwrap();
    let mut ncfg = NodeConfig::new(vm(&sim, "node-a"), "toronto");
    ncfg.by_id_dir = sim.by_id_dir.clone();
    ncfg.device_wait = Duration::from_secs(5);
    let d = Driver::start(
        dir.path(),
        common::client_for(&sim),
        common::controller_config(),
        Some(ncfg),
    )
    .await;
    let mut n = d.node().await;

    // 1. The mount disappears behind the driver's back (lazy unmount).
    let a = stage_and_publish(&d, &sim, dir.path(), "pvc-lost").await;
    let stats = |n: &mut lunanode_csi::csi::node_client::NodeClient<_>, p: &Path, v: &str| {
        let r = NodeGetVolumeStatsRequest {
            volume_id: v.into(),
            volume_path: p.to_str().unwrap().into(),
            ..Default::default()
        };
        let mut n = n.clone();
        async move { n.node_get_volume_stats(r).await.unwrap().into_inner() }
    };
    let ok = stats(&mut n, &a.target, &a.vol).await;
    assert!(!ok.volume_condition.unwrap().abnormal);
    nix::mount::umount2(&a.target, nix::mount::MntFlags::MNT_DETACH).unwrap();
    let lost = stats(&mut n, &a.target, &a.vol).await;
    let cond = lost.volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
    assert!(cond.message.contains("not a mount point"), "{cond:?}");

    // 2. A file held open under the published target: unpublish is UNAVAILABLE, not forced.
    let b = stage_and_publish(&d, &sim, dir.path(), "pvc-busy").await;
    std::fs::write(b.target.join("f"), b"x").unwrap();
    let held = std::fs::File::open(b.target.join("f")).unwrap();
    let err = n
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: b.vol.clone(),
            target_path: b.target.to_str().unwrap().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("in use"), "{err:?}");
    assert!(is_mount_point(&b.target), "a busy mount is left mounted");
    drop(held);
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: b.vol.clone(),
        target_path: b.target.to_str().unwrap().into(),
    })
    .await
    .unwrap();

    // 3. A process with its working directory in the staged filesystem: unstage is
    //    UNAVAILABLE and the staging mount stays.
    let mut sleeper = std::process::Command::new("sleep")
        .arg("60")
        .current_dir(&b.staging)
        .spawn()
        .unwrap();
    let err = n
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: b.vol.clone(),
            staging_target_path: b.staging.to_str().unwrap().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        is_mount_point(&b.staging),
        "a busy staging mount is left mounted"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    n.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: b.vol.clone(),
        staging_target_path: b.staging.to_str().unwrap().into(),
    })
    .await
    .unwrap();
    assert!(!is_mount_point(&b.staging));

    d.stop().await;
    unmount_all_under(dir.path());
    sim.shutdown().await;
}
