//! Full stack, as root with loop devices: the simulator (loop backing) + the driver's
//! Controller and Node services (built exactly as `serve` builds them) on a unix socket,
//! driven over gRPC through a volume's life: create → publish → stage → publish → write →
//! tear down → expand offline → publish + stage again → the data is there and the
//! filesystem is bigger.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use lunanode_csi::csi::controller_client::ControllerClient;
use lunanode_csi::csi::node_client::NodeClient;
use lunanode_csi::csi::*;
use lunanode_csi::driver::NodeConfig;
use lunanode_csi::sim::{Backing, SimHandle, VmSpec};
use tonic::Code;
use tonic::transport::Channel;

/// Unmounts whatever a failing test left under the temp dir (before the simulator's own
/// clean-up detaches the loop devices).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut left: Vec<PathBuf> = lunanode_csi::volumes::mount::parse_mountinfo(&text)
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&self.0))
            .collect();
        left.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in left {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn bytes_total(r: &NodeGetVolumeStatsResponse) -> i64 {
    r.usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .expect("byte usage")
        .total
}

struct Stack {
    ctrl: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    vm: String,
}

impl Stack {
    async fn publish(&mut self, vol: &str) -> HashMap<String, String> {
        self.ctrl
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: vol.into(),
                node_id: self.vm.clone(),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            })
            .await
            .expect("ControllerPublishVolume")
            .into_inner()
            .publish_context
    }

    async fn stage_and_publish(
        &mut self,
        vol: &str,
        ctx: &HashMap<String, String>,
        staging: &Path,
        target: &Path,
    ) {
        self.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: vol.into(),
                publish_context: ctx.clone(),
                staging_target_path: s(staging),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            })
            .await
            .expect("NodeStageVolume");
        self.node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: vol.into(),
                publish_context: ctx.clone(),
                staging_target_path: s(staging),
                target_path: s(target),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            })
            .await
            .expect("NodePublishVolume");
    }

    async fn tear_down(&mut self, vol: &str, staging: &Path, target: &Path) {
        self.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: vol.into(),
                target_path: s(target),
            })
            .await
            .expect("NodeUnpublishVolume");
        self.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: s(staging),
            })
            .await
            .expect("NodeUnstageVolume");
        self.ctrl
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: vol.into(),
                node_id: self.vm.clone(),
                ..Default::default()
            })
            .await
            .expect("ControllerUnpublishVolume");
    }

    async fn stats(&mut self, vol: &str, target: &Path) -> NodeGetVolumeStatsResponse {
        self.node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: vol.into(),
                volume_path: s(target),
                ..Default::default()
            })
            .await
            .expect("NodeGetVolumeStats")
            .into_inner()
    }

    async fn expand(
        &mut self,
        vol: &str,
        gib: i64,
    ) -> Result<ControllerExpandVolumeResponse, tonic::Status> {
        self.ctrl
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: vol.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: gib * GIB,
                    limit_bytes: 0,
                }),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_life_with_offline_expansion_keeps_data_and_grows_the_filesystem() {
    if !lunanode_csi::sim::loop_available() {
        eprintln!("skipped: needs root, loop devices and losetup");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("lunanode-e2e")
        .tempdir()
        .unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let mut cfg = sim_config(&root);
    cfg.backing = Backing::Loop;
    cfg.transition = Duration::from_millis(50).into();
    cfg.vms = vec![VmSpec {
        region: "toronto".into(),
        name: Some("node-1".into()),
    }];
    let sim = SimHandle::start(cfg).await.expect("simulator starts");
    let _unmount = Unmount(root.clone());
    let vm = sim.vms[0].clone();

    // The same router `serve --mode all` builds.
    let node_cfg = NodeConfig {
        by_id_dir: sim.by_id_dir.clone(),
        device_wait: Duration::from_secs(10),
        ..NodeConfig::new(vm.id.clone(), vm.region.clone())
    };
    let mut served = Served::start(
        root.join("csi/csi.sock"),
        Some((client_for(&sim), controller_config())),
        Some(node_cfg),
    );
    let socket = served.socket.clone();
    let ch = channel(&socket).await;
    let mut st = Stack {
        ctrl: ControllerClient::new(ch.clone()),
        node: NodeClient::new(ch),
        vm: vm.id.clone(),
    };

    // create → publish → stage → publish → write
    let vol = st
        .ctrl
        .create_volume(create_req("pvc-e2e", 1))
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = root.join("kubelet/staging/pvc-e2e/globalmount");
    let target = root.join("kubelet/pods/pod-1/volumes/pvc-e2e/mount");
    let ctx = st.publish(&vol).await;
    st.stage_and_publish(&vol, &ctx, &staging, &target).await;
    let data: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(target.join("data.bin"), &data).unwrap();
    nix::unistd::sync();
    let before = bytes_total(&st.stats(&vol, &target).await);

    // While published the cloud cannot extend it: the driver says to detach.
    let err = st.expand(&vol, 2).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("detach"), "{}", err.message());

    // tear down → expand offline
    st.tear_down(&vol, &staging, &target).await;
    assert!(
        lunanode_csi::volumes::mount::mount_at(&staging)
            .unwrap()
            .is_none()
    );
    let r = st.expand(&vol, 2).await.expect("ControllerExpandVolume");
    assert_eq!(r.capacity_bytes, 2 * GIB);
    assert!(r.node_expansion_required);
    let sv = sim.state();
    assert_eq!(sv.volumes[0].size_gb, 2);

    // publish + stage again: the data is there and the filesystem is bigger
    let ctx = st.publish(&vol).await;
    assert_eq!(
        ctx.get("size_bytes").map(String::as_str),
        Some(&*(2 * GIB).to_string())
    );
    st.stage_and_publish(&vol, &ctx, &staging, &target).await;
    assert_eq!(std::fs::read(target.join("data.bin")).unwrap(), data);
    let after = bytes_total(&st.stats(&vol, &target).await);
    assert!(
        after > before + GIB / 2,
        "filesystem total grew from {before} to {after} bytes"
    );

    // and everything goes away
    st.tear_down(&vol, &staging, &target).await;
    st.ctrl
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
    let left = sim.state();
    assert!(left.volumes.is_empty() && left.snapshots.is_empty() && left.images.is_empty());
    served.stop().await;
    let sim_dir = sim.state_dir().to_path_buf();
    sim.shutdown().await;
    let losetup = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .unwrap();
    let shown = s(&sim_dir);
    assert!(
        !String::from_utf8_lossy(&losetup.stdout).contains(&shown),
        "loop devices left under {shown}"
    );
}
