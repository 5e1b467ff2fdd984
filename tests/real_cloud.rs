//! Day one on the real cloud: the driver against the simulator playing each behaviour the real
//! Luna Node API is known or likely to have (`shared/lunanode-api.md`), with the simulator's
//! request journal as the recording proxy between them.

mod common;

use std::collections::HashMap;

use common::*;
use lunanode_csi::csi::volume_content_source::{SnapshotSource, Type as Source};
use lunanode_csi::csi::*;
use lunanode_csi::sim::{Bus, Quirks, SimRequest};

fn topo(region: &str) -> Topology {
    Topology {
        segments: HashMap::from([(lunanode_csi::TOPOLOGY_KEY.to_string(), region.to_string())]),
    }
}

fn calls<'a>(reqs: &'a [SimRequest], handler: &str) -> Vec<&'a SimRequest> {
    reqs.iter().filter(|r| r.handler == handler).collect()
}

/// A volume's whole life: create, attach, detach, snapshot, restore, expand, list, delete.
async fn lifecycle(h: &Harness, name: &str) {
    let mut c = h.controller().await;
    let node = h.vm("node-a");
    let mut req = create_req(name, 1);
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topo("toronto")],
        preferred: vec![topo("toronto")],
    });
    let vol = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = vol.volume_id.clone();
    let publish = ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node.clone(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    let ctx = c
        .controller_publish_volume(publish.clone())
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert!(
        ctx.contains_key("serial") && ctx.contains_key("identification"),
        "{ctx:?}"
    );
    // Published again: the same answer, nothing sent to attach.
    c.controller_publish_volume(publish).await.unwrap();
    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let entry = listed
        .entries
        .iter()
        .find(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == id))
        .expect("the volume is listed");
    assert_eq!(
        entry.status.as_ref().map(|s| s.published_node_ids.clone()),
        Some(vec![node.clone()])
    );
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.controller_expand_volume(ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: 2 * GIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let snap = c
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: format!("{name}-snap"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let mut restore = create_req(&format!("{name}-restored"), 2);
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Source::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let restored = c
        .create_volume(restore)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let snaps = c
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snaps.entries.len(), 1);
    for del in [restored.volume_id, id.clone()] {
        c.delete_volume(DeleteVolumeRequest {
            volume_id: del,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id,
        ..Default::default()
    })
    .await
    .unwrap();
    let state = h.sim().state();
    assert!(
        state.volumes.is_empty() && state.snapshots.is_empty(),
        "{state:?}"
    );
}

#[tokio::test]
async fn a_name_in_any_script_is_created_with_ascii_requests() {
    let h = Harness::start().await;
    let name = "pvc-données-日本-😀";
    let vol = h
        .controller()
        .await
        .create_volume(create_req(name, 1))
        .await
        .expect("a non-ASCII name is created")
        .into_inner()
        .volume
        .unwrap();
    let state = h.sim().state();
    assert_eq!(state.volumes.len(), 1);
    assert_eq!(
        state.volumes[0].label, name,
        "the cloud decoded the escaped label"
    );
    let reqs = h.sim().requests();
    let creates = calls(&reqs, "volume/create");
    assert_eq!(creates.len(), 1);
    assert!(creates[0].ascii);
    assert_eq!(creates[0].params["label"], name);
    // The same name again is the same volume (found by its label in the list).
    let again = h
        .controller()
        .await
        .create_volume(create_req(name, 1))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    h.stop().await;
}

/// The likeliest real cloud (the simulator's default): `auto` would attach on IDE, and the
/// list says `active` where `volume/info` says `available` or `in-use`.
#[tokio::test]
async fn the_likeliest_cloud_attaches_on_virtio() {
    let h = Harness::start().await;
    assert_eq!(h.sim().quirks(), Quirks::LIKELY);
    lifecycle(&h, "pvc-likely").await;
    let reqs = h.sim().requests();
    let attaches = calls(&reqs, "volume/attach");
    assert_eq!(attaches.len(), 1, "{attaches:?}");
    assert_eq!(attaches[0].params["target"], "/dev/vda");
    h.stop().await;
}

/// Every quirk at once: the old rules (`region not set`), lists as objects, the list's own
/// status words, IDE on `auto`. The driver learns the old rules from the first refusal and
/// sends `region` on every volume call from then on.
#[tokio::test]
async fn every_known_quirk_at_once() {
    let all = Quirks {
        ide_auto: true,
        list_words: true,
        old_rules: true,
        object_lists: true,
    };
    let h = Harness::start_with(|c| c.quirks = all, controller_config()).await;
    assert!(!h.client.old_rules());
    lifecycle(&h, "pvc-quirks").await;
    assert!(h.client.old_rules(), "the client learnt the old rules");
    let reqs = h.sim().requests();
    let needs_region = [
        "volume/info",
        "volume/attach",
        "volume/detach",
        "volume/extend",
        "volume/delete",
        "volume/snapshot-create",
        "volume/list",
    ];
    let without: Vec<_> = reqs
        .iter()
        .filter(|r| needs_region.contains(&r.handler.as_str()))
        .filter(|r| !r.params.contains_key("region"))
        .collect();
    // Only the first call, which taught the client, went without a region.
    assert_eq!(without.len(), 1, "{without:#?}");
    h.stop().await;
}

#[tokio::test]
async fn the_attach_target_is_a_setting() {
    let mut ccfg = controller_config();
    ccfg.attach_target = "auto".into();
    let h = Harness::start_with(|_| {}, ccfg).await;
    let mut c = h.controller().await;
    let vol = c
        .create_volume(create_req("pvc-auto", 1))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    c.controller_publish_volume(ControllerPublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        node_id: h.vm("node-a"),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    })
    .await
    .unwrap();
    let state = h.sim().state();
    // What `auto` means on a VM created the default way: an IDE disk.
    assert_eq!(
        state.volumes[0].bus.as_deref(),
        Some(Bus::Ide.to_string().as_str())
    );
    assert_wire_as_the_cloud_accepts(h.sim(), "auto");
    h.stop_unchecked().await;
}
