//! Secrets stay secret: a full lifecycle through the real binary at trace log level, with
//! CSI `secrets` carrying a marker in every request that has them, and some calls failing
//! on purpose. Neither the API key, nor its first half (sent in every request), nor any
//! request signature, nor the marker may appear in stdout, stderr or any error returned.
//! (Metrics are on another branch and are not covered here.)

mod common;
mod rel;

use std::collections::HashMap;
use std::time::Duration;

use lunanode_csi::csi::*;
use lunanode_csi::sim::{Backing, SimHandle};
use rel::*;

const MARKER: &str = "S3CRET-MARKER-7f1c2a";
const T: Duration = Duration::from_secs(30);

fn secrets() -> HashMap<String, String> {
    HashMap::from([
        ("password".to_string(), MARKER.to_string()),
        (format!("key-{MARKER}"), format!("v-{MARKER}")),
    ])
}

/// Any run of 128 lowercase hex digits: the shape of an HMAC-SHA512 request signature.
fn has_signature_like(text: &str) -> Option<String> {
    let mut run = 0usize;
    for (i, b) in text.bytes().enumerate() {
        if b.is_ascii_digit() || (b'a'..=b'f').contains(&b) {
            run += 1;
            if run >= 128 {
                return Some(text[i + 1 - 128..=i].to_string());
            }
        } else {
            run = 0;
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_or_errors_at_trace_level() {
    let node_ok = node_capable();
    let dir = tempfile::tempdir().unwrap();
    let mut scfg = common::sim_config(dir.path());
    scfg.backing = if node_ok {
        Backing::Loop
    } else {
        Backing::Memory
    };
    // Some faults, so retry and error paths log too.
    scfg.fault_rate = 0.1;
    let sim = SimHandle::start(scfg).await.unwrap();
    let key = sim.api_key.clone();
    let node = sim
        .vms
        .iter()
        .find(|v| v.name == "node-a")
        .unwrap()
        .id
        .clone();
    let sock = dir.path().join("csi/csi.sock");
    // BinDriver removes RUST_LOG, so --log-level trace is the filter: everything is logged.
    let mut d = BinDriver::start(&sim, &node, &sock, &["--log-level", "trace"]).await;
    let c = d.controller().await;
    let stats = RetryStats::default();
    let mut errors: Vec<String> = Vec::new();
    macro_rules! call {
        ($client:expr, $method:ident, $req:expr) => {{
            let r = $req;
            let res = retry(&stats, stringify!($method), T, || {
                let mut c = $client.clone();
                let r = r.clone();
                async move { c.$method(req(r, T)).await }
            })
            .await;
            if let Err(s) = &res {
                errors.push(format!("{:?} {} {:?}", s.code(), s.message(), s.metadata()));
            }
            res.map(|r| r.into_inner())
        }};
    }

    let mut create = create_req("pvc-secret", 1, None);
    create.secrets = secrets();
    let vol = call!(c, create_volume, create.clone())
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    // Failing calls carrying secrets: the errors must not echo them. (Names, parameters
    // and node IDs are not secret, so the marker is only ever in `secrets`.)
    let mut bad = create.clone();
    bad.name = "pvc-\u{1}".into();
    let _ = call!(c, create_volume, bad);
    let mut bad = create.clone();
    bad.parameters.insert("iops".into(), "9000".into());
    let _ = call!(c, create_volume, bad);
    let _ = call!(
        c,
        controller_publish_volume,
        ControllerPublishVolumeRequest {
            volume_id: vol.clone(),
            node_id: "vm-unknown".into(),
            volume_capability: Some(mount_cap("ext4")),
            secrets: secrets(),
            ..Default::default()
        }
    );
    let pctx = call!(
        c,
        controller_publish_volume,
        ControllerPublishVolumeRequest {
            volume_id: vol.clone(),
            node_id: node.clone(),
            volume_capability: Some(mount_cap("ext4")),
            secrets: secrets(),
            ..Default::default()
        }
    )
    .unwrap()
    .publish_context;
    if node_ok {
        let n = d.node().await;
        let staging = dir.path().join("kubelet/staging");
        let target = dir.path().join("kubelet/target");
        call!(
            n,
            node_stage_volume,
            NodeStageVolumeRequest {
                volume_id: vol.clone(),
                publish_context: pctx.clone(),
                staging_target_path: staging.to_str().unwrap().into(),
                volume_capability: Some(mount_cap("ext4")),
                secrets: secrets(),
                ..Default::default()
            }
        )
        .unwrap();
        call!(
            n,
            node_publish_volume,
            NodePublishVolumeRequest {
                volume_id: vol.clone(),
                publish_context: pctx.clone(),
                staging_target_path: staging.to_str().unwrap().into(),
                target_path: target.to_str().unwrap().into(),
                volume_capability: Some(mount_cap("ext4")),
                secrets: secrets(),
                ..Default::default()
            }
        )
        .unwrap();
        call!(
            n,
            node_unpublish_volume,
            NodeUnpublishVolumeRequest {
                volume_id: vol.clone(),
                target_path: target.to_str().unwrap().into(),
            }
        )
        .unwrap();
        call!(
            n,
            node_unstage_volume,
            NodeUnstageVolumeRequest {
                volume_id: vol.clone(),
                staging_target_path: staging.to_str().unwrap().into(),
            }
        )
        .unwrap();
    }
    call!(
        c,
        controller_unpublish_volume,
        ControllerUnpublishVolumeRequest {
            volume_id: vol.clone(),
            node_id: node.clone(),
            secrets: secrets(),
        }
    )
    .unwrap();
    let snap = call!(
        c,
        create_snapshot,
        CreateSnapshotRequest {
            source_volume_id: vol.clone(),
            name: "snap-secret".into(),
            secrets: secrets(),
            ..Default::default()
        }
    )
    .unwrap()
    .snapshot
    .unwrap()
    .snapshot_id;
    call!(
        c,
        controller_expand_volume,
        ControllerExpandVolumeRequest {
            volume_id: vol.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 2 * GIB,
                limit_bytes: 0
            }),
            secrets: secrets(),
            ..Default::default()
        }
    )
    .unwrap();
    let _ = call!(
        c,
        list_snapshots,
        ListSnapshotsRequest {
            secrets: secrets(),
            ..Default::default()
        }
    );
    call!(
        c,
        delete_snapshot,
        DeleteSnapshotRequest {
            snapshot_id: snap,
            secrets: secrets(),
        }
    )
    .unwrap();
    call!(
        c,
        delete_volume,
        DeleteVolumeRequest {
            volume_id: vol,
            secrets: secrets(),
        }
    )
    .unwrap();

    let status = d.terminate(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "driver exit: {status:?}"
    );
    let log = d.log_text();
    sim.shutdown().await;

    assert!(
        log.contains("TRACE") || log.contains("trace"),
        "the driver logged at trace level"
    );
    assert!(log.contains("luna node api call"), "API calls were logged");
    assert!(
        errors.len() >= 3,
        "some calls failed on purpose: {errors:?}"
    );
    let everything = format!("{log}\n{}", errors.join("\n"));
    for (what, secret) in [
        ("API key", key.as_str()),
        ("partial key", &key[..64]),
        ("CSI secret marker", MARKER),
    ] {
        assert!(
            !everything.contains(secret),
            "the {what} leaked: {}",
            everything
                .lines()
                .find(|l| l.contains(secret))
                .unwrap_or_default()
        );
    }
    assert_eq!(
        has_signature_like(&everything),
        None,
        "a request signature leaked"
    );
    eprintln!(
        "secrets: {} bytes of trace log and {} error messages checked",
        log.len(),
        errors.len()
    );
}
