//! Controller conformance tests, from the CSI v1.12.0 rules: required fields, error codes,
//! idempotency, paging, concurrency, content sources and fault recovery. They run the real
//! gRPC server on a unix socket against the built-in simulator.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use lunanode_csi::csi::controller_service_capability::rpc::Type as RpcType;
use lunanode_csi::csi::volume_capability::access_mode::Mode;
use lunanode_csi::csi::volume_content_source::{SnapshotSource, Type as Source, VolumeSource};
use lunanode_csi::csi::*;
use tonic::Code;

fn topo(region: &str) -> Topology {
    Topology {
        segments: HashMap::from([(lunanode_csi::TOPOLOGY_KEY.to_string(), region.to_string())]),
    }
}

async fn create(h: &Harness, name: &str, gib: i64) -> Volume {
    h.controller()
        .await
        .create_volume(create_req(name, gib))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
}

#[tokio::test]
async fn identity_and_capabilities() {
    let h = Harness::start().await;
    let info = h
        .identity()
        .await
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.lunanode.com");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = h
        .controller()
        .await
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let types: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for t in [
        RpcType::CreateDeleteVolume,
        RpcType::PublishUnpublishVolume,
        RpcType::ListVolumes,
        RpcType::ListVolumesPublishedNodes,
        RpcType::GetVolume,
        RpcType::VolumeCondition,
        RpcType::CreateDeleteSnapshot,
        RpcType::ListSnapshots,
        RpcType::CloneVolume,
        RpcType::ExpandVolume,
        RpcType::SingleNodeMultiWriter,
    ] {
        assert!(types.contains(&(t as i32)), "missing {t:?}");
    }
    assert!(!types.contains(&(RpcType::GetCapacity as i32)));
    assert_eq!(
        code(
            h.controller()
                .await
                .get_capacity(GetCapacityRequest::default())
                .await
        ),
        Code::Unimplemented
    );
    h.stop().await;
}

#[tokio::test]
async fn create_volume_validates_its_request() {
    let h = Harness::start().await;
    let mut c = h.controller().await;
    let bad = |f: fn(&mut CreateVolumeRequest)| {
        let mut r = create_req("pvc-bad", 1);
        f(&mut r);
        r
    };
    assert_eq!(
        code(c.create_volume(bad(|r| r.name.clear())).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_volume(bad(|r| r.volume_capabilities.clear()))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_volume(bad(
                |r| r.volume_capabilities = vec![cap_with_mode(Mode::MultiNodeMultiWriter)]
            ))
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_volume(bad(|r| r.volume_capabilities = vec![mount_cap("btrfs")]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_volume(bad(
                |r| r.volume_capabilities = vec![VolumeCapability::default()]
            ))
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_volume(bad(|r| {
                r.parameters.insert("iops".into(), "9000".into());
            }))
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_volume(bad(|r| {
                r.parameters.insert("region".into(), "atlantis".into());
            }))
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_volume(bad(|r| r.capacity_range = Some(CapacityRange {
                required_bytes: 0,
                limit_bytes: 1000
            })))
            .await
        ),
        Code::OutOfRange
    );
    assert_eq!(
        code(
            c.create_volume(bad(|r| r.capacity_range = Some(CapacityRange {
                required_bytes: GIB + 1,
                limit_bytes: GIB + 2
            })))
            .await
        ),
        Code::OutOfRange
    );
    assert_eq!(
        code(
            c.create_volume(bad(|r| r.capacity_range = Some(CapacityRange {
                required_bytes: -1,
                limit_bytes: 0
            })))
            .await
        ),
        Code::InvalidArgument
    );
    let bad_source = bad(|r| {
        r.volume_content_source = Some(VolumeContentSource {
            r#type: Some(Source::Snapshot(SnapshotSource {
                snapshot_id: "toronto/not-a-uuid".into(),
            })),
        })
    });
    assert_eq!(code(c.create_volume(bad_source).await), Code::NotFound);
    let missing = bad(|r| {
        r.volume_content_source = Some(VolumeContentSource {
            r#type: Some(Source::Snapshot(SnapshotSource {
                snapshot_id: "toronto/484a06d3-7ea6-40d6-8e72-9e7e23f6826b".into(),
            })),
        })
    });
    assert_eq!(code(c.create_volume(missing).await), Code::NotFound);
    let missing_vol = bad(|r| {
        r.volume_content_source = Some(VolumeContentSource {
            r#type: Some(Source::Volume(VolumeSource {
                volume_id: "toronto/999999".into(),
            })),
        })
    });
    assert_eq!(code(c.create_volume(missing_vol).await), Code::NotFound);
    assert!(
        h.sim().state().volumes.is_empty(),
        "a refused request creates nothing"
    );
    h.stop().await;
}

#[tokio::test]
async fn create_volume_rounds_places_and_is_idempotent() {
    let h = Harness::start().await;
    let mut c = h.controller().await;
    let mut r = create_req("pvc-1", 1);
    r.capacity_range = Some(CapacityRange {
        required_bytes: 1,
        limit_bytes: 0,
    });
    r.parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "data".into());
    let v = c
        .create_volume(r.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, GIB);
    assert!(v.volume_id.starts_with("toronto/"), "{}", v.volume_id);
    assert_eq!(v.accessible_topology, vec![topo("toronto")]);
    let again = c
        .create_volume(r.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    // Same name, incompatible size.
    r.capacity_range = Some(CapacityRange {
        required_bytes: 5 * GIB,
        limit_bytes: 0,
    });
    assert_eq!(code(c.create_volume(r).await), Code::AlreadyExists);
    assert_eq!(h.sim().state().volumes.len(), 1);

    // No capacity → the default size (10 GB).
    let mut d = create_req("pvc-default", 1);
    d.capacity_range = None;
    assert_eq!(
        c.create_volume(d)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .capacity_bytes,
        10 * GIB
    );

    // Region: StorageClass parameter, then preferred topology, then requisite.
    let mut p = create_req("pvc-param", 1);
    p.parameters.insert("region".into(), "montreal".into());
    assert_eq!(
        c.create_volume(p)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .accessible_topology,
        vec![topo("montreal")]
    );
    let mut t = create_req("pvc-topo", 1);
    t.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topo("toronto"), topo("roubaix")],
        preferred: vec![topo("roubaix")],
    });
    let tv = c
        .create_volume(t)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(tv.volume_id.starts_with("roubaix/"));
    let mut conflict = create_req("pvc-conflict", 1);
    conflict
        .parameters
        .insert("region".into(), "montreal".into());
    conflict.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topo("toronto")],
        preferred: vec![],
    });
    assert_eq!(
        code(c.create_volume(conflict).await),
        Code::ResourceExhausted
    );
    h.stop().await;
}

#[tokio::test]
async fn delete_volume_rules() {
    let h = Harness::start().await;
    let mut c = h.controller().await;
    assert_eq!(
        code(c.delete_volume(DeleteVolumeRequest::default()).await),
        Code::InvalidArgument
    );
    for id in ["garbage", "toronto/999999", "toronto/01"] {
        c.delete_volume(DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let v = create(&h, "pvc-del", 1).await;
    c.controller_publish_volume(ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: h.vm("node-a"),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = c
        .delete_volume(DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains(&h.vm("node-a")),
        "names the VM: {}",
        err.message()
    );
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: h.vm("node-a"),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_volume(DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_volume(DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(h.sim().state().volumes.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn publish_and_unpublish_rules() {
    let h = Harness::start().await;
    let mut c = h.controller().await;
    let v = create(&h, "pvc-pub", 2).await;
    let (a, b, m) = (h.vm("node-a"), h.vm("node-b"), h.vm("node-m"));
    let req = |vol: &str, node: &str| ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    assert_eq!(
        code(c.controller_publish_volume(req("", &a)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.controller_publish_volume(req(&v.volume_id, "")).await),
        Code::InvalidArgument
    );
    let mut no_cap = req(&v.volume_id, &a);
    no_cap.volume_capability = None;
    assert_eq!(
        code(c.controller_publish_volume(no_cap).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.controller_publish_volume(req("toronto/999999", &a)).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.controller_publish_volume(req("nonsense", &a)).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller_publish_volume(req(&v.volume_id, "no-such-vm"))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(c.controller_publish_volume(req(&v.volume_id, &m)).await),
        Code::FailedPrecondition
    );

    let ctx = c
        .controller_publish_volume(req(&v.volume_id, &a))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx.get("serial").map(String::len), Some(20));
    assert_eq!(ctx.get("size_bytes").unwrap(), &(2 * GIB).to_string());
    let again = c
        .controller_publish_volume(req(&v.volume_id, &a))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(again, ctx, "publishing again returns the same context");
    assert_eq!(
        code(c.controller_publish_volume(req(&v.volume_id, &b)).await),
        Code::FailedPrecondition
    );

    let unpub = |node: &str| ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: node.into(),
        ..Default::default()
    };
    assert_eq!(
        code(
            c.controller_unpublish_volume(ControllerUnpublishVolumeRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    c.controller_unpublish_volume(unpub(&b)).await.unwrap();
    assert!(
        h.sim().state().volumes[0].attached.is_some(),
        "unpublish from another node leaves it attached"
    );
    c.controller_unpublish_volume(unpub(&a)).await.unwrap();
    c.controller_unpublish_volume(unpub(&a)).await.unwrap();
    assert!(h.sim().state().volumes[0].attached.is_none());
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: "toronto/999999".into(),
        node_id: a.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    h.stop().await;
}

#[tokio::test]
async fn expansion_is_offline() {
    let h = Harness::start().await;
    let mut c = h.controller().await;
    let v = create(&h, "pvc-grow", 1).await;
    let a = h.vm("node-a");
    let grow = |gib: i64, cap: Option<VolumeCapability>| ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: gib * GIB,
            limit_bytes: 0,
        }),
        volume_capability: cap,
        ..Default::default()
    };
    assert_eq!(
        code(
            c.controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller_expand_volume(ControllerExpandVolumeRequest {
                capacity_range: Some(CapacityRange {
                    required_bytes: GIB,
                    limit_bytes: 0
                }),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: "toronto/999999".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: GIB,
                    limit_bytes: 0
                }),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    c.controller_publish_volume(ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: a.clone(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = c.controller_expand_volume(grow(3, None)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("detach"), "{}", err.message());
    // The current size is fine even while attached.
    let same = c
        .controller_expand_volume(grow(1, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.capacity_bytes, GIB);
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: a,
        ..Default::default()
    })
    .await
    .unwrap();
    let grown = c
        .controller_expand_volume(grow(3, Some(mount_cap("ext4"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 3 * GIB);
    assert!(grown.node_expansion_required);
    let block = c
        .controller_expand_volume(grow(3, Some(block_cap())))
        .await
        .unwrap()
        .into_inner();
    assert!(!block.node_expansion_required);
    assert_eq!(h.sim().state().volumes[0].size_gb, 3);
    h.stop().await;
}

#[tokio::test]
async fn snapshots_are_idempotent_and_listed_with_paging() {
    let h = Harness::start().await;
    let mut c = h.controller().await;
    let v1 = create(&h, "pvc-s1", 1).await;
    let v2 = create(&h, "pvc-s2", 1).await;
    let snap = |name: &str, src: &str| CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: src.into(),
        ..Default::default()
    };
    assert_eq!(
        code(c.create_snapshot(snap("", &v1.volume_id)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_snapshot(snap("snap-x", "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_snapshot(snap("snap-x", "toronto/999999")).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.create_snapshot(snap("snap-x", "bogus")).await),
        Code::NotFound
    );

    let s1 = c
        .create_snapshot(snap("snap-1", &v1.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(s1.source_volume_id, v1.volume_id);
    assert_eq!(s1.size_bytes, GIB);
    assert!(s1.creation_time.is_some());
    assert!(s1.snapshot_id.starts_with("toronto/"));
    let again = c
        .create_snapshot(snap("snap-1", &v1.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, s1.snapshot_id);
    assert_eq!(
        again.creation_time, s1.creation_time,
        "the creation time is stable"
    );
    assert_eq!(
        code(c.create_snapshot(snap("snap-1", &v2.volume_id)).await),
        Code::AlreadyExists
    );
    for i in 2..=4 {
        c.create_snapshot(snap(&format!("snap-{i}"), &v2.volume_id))
            .await
            .unwrap();
    }
    assert_eq!(h.sim().state().snapshots.len(), 4);

    let list = |r: ListSnapshotsRequest| {
        let mut c = c.clone();
        async move { c.list_snapshots(r).await }
    };
    let all = list(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 4);
    // Paging walks every entry exactly once.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(ListSnapshotsRequest {
            max_entries: 3,
            starting_token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
        assert!(page.entries.len() <= 3);
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.snapshot.unwrap().snapshot_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4);
    assert_eq!(
        code(
            list(ListSnapshotsRequest {
                starting_token: "not-a-token".into(),
                ..Default::default()
            })
            .await
        ),
        Code::Aborted
    );
    assert_eq!(
        code(
            list(ListSnapshotsRequest {
                max_entries: -1,
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    let by_id = list(ListSnapshotsRequest {
        snapshot_id: s1.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    let by_src = list(ListSnapshotsRequest {
        source_volume_id: v2.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(by_src.entries.len(), 3);
    for unknown in ["garbage", "toronto/484a06d3-7ea6-40d6-8e72-9e7e23f6826b"] {
        let none = list(ListSnapshotsRequest {
            snapshot_id: unknown.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
        assert!(none.entries.is_empty());
    }

    assert_eq!(
        code(c.delete_snapshot(DeleteSnapshotRequest::default()).await),
        Code::InvalidArgument
    );
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: "garbage".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: s1.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: s1.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(h.sim().state().snapshots.len(), 3);
    h.stop().await;
}

#[tokio::test]
async fn restore_clone_and_cross_region_leave_nothing_behind() {
    let h = Harness::start().await;
    let mut c = h.controller().await;
    let src = create(&h, "pvc-src", 2).await;
    let snap = c
        .create_snapshot(CreateSnapshotRequest {
            name: "snap-src".into(),
            source_volume_id: src.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let from_snap = |name: &str, gib: i64, region: Option<&str>| {
        let mut r = create_req(name, gib);
        r.volume_content_source = Some(VolumeContentSource {
            r#type: Some(Source::Snapshot(SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            })),
        });
        if let Some(reg) = region {
            r.parameters.insert("region".into(), reg.into());
        }
        r
    };
    // Same region, larger than the source.
    let restored = c
        .create_volume(from_snap("pvc-restore", 5, None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.capacity_bytes, 5 * GIB);
    assert!(restored.content_source.is_some());
    // Smaller than the source is refused.
    assert_eq!(
        code(c.create_volume(from_snap("pvc-small", 1, None)).await),
        Code::OutOfRange
    );
    // Cross-region: replicate → image → volume → image deleted.
    let far = c
        .create_volume(from_snap("pvc-far", 2, Some("montreal")))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(far.volume_id.starts_with("montreal/"), "{}", far.volume_id);
    assert_eq!(far.accessible_topology, vec![topo("montreal")]);
    let again = c
        .create_volume(from_snap("pvc-far", 2, Some("montreal")))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, far.volume_id);
    assert!(
        h.sim().state().images.is_empty(),
        "the temporary image is removed"
    );
    // Clone through a temporary snapshot, which is removed.
    let mut clone = create_req("pvc-clone", 3);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Source::Volume(VolumeSource {
            volume_id: src.volume_id.clone(),
        })),
    });
    let cl = c
        .create_volume(clone)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(cl.capacity_bytes, 3 * GIB);
    let state = h.sim().state();
    assert_eq!(state.snapshots.len(), 1, "only the user's snapshot remains");
    assert_eq!(state.volumes.len(), 4);
    h.stop().await;
}

#[tokio::test]
async fn list_get_and_validate() {
    let h = Harness::start().await;
    let mut c = h.controller().await;
    let a = h.vm("node-a");
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(create(&h, &format!("pvc-l{i}"), 1).await.volume_id);
    }
    c.controller_publish_volume(ControllerPublishVolumeRequest {
        volume_id: ids[0].clone(),
        node_id: a.clone(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    })
    .await
    .unwrap();
    let all = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 5);
    let published: Vec<_> = all
        .entries
        .iter()
        .filter(|e| !e.status.as_ref().unwrap().published_node_ids.is_empty())
        .collect();
    assert_eq!(published.len(), 1);
    assert_eq!(
        published[0].status.as_ref().unwrap().published_node_ids,
        vec![a.clone()]
    );
    let p1 = c
        .list_volumes(ListVolumesRequest {
            max_entries: 2,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.entries.len(), 2);
    let p2 = c
        .list_volumes(ListVolumesRequest {
            max_entries: 10,
            starting_token: p1.next_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.entries.len(), 3);
    assert!(p2.next_token.is_empty());
    assert_eq!(
        code(
            c.list_volumes(ListVolumesRequest {
                max_entries: 1,
                starting_token: "xyz".into()
            })
            .await
        ),
        Code::Aborted
    );

    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: ids[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status.as_ref().unwrap().published_node_ids, vec![a]);
    assert!(!got.status.unwrap().volume_condition.unwrap().abnormal);
    assert_eq!(
        code(
            c.controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "toronto/999999".into()
            })
            .await
        ),
        Code::NotFound
    );

    let vreq = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = c
        .validate_volume_capabilities(vreq(&ids[1], vec![mount_cap("ext4")]))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let no = c
        .validate_volume_capabilities(vreq(
            &ids[1],
            vec![cap_with_mode(Mode::MultiNodeReaderOnly)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none());
    assert!(!no.message.is_empty());
    assert_eq!(
        code(c.validate_volume_capabilities(vreq(&ids[1], vec![])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.validate_volume_capabilities(vreq("", vec![mount_cap("")]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.validate_volume_capabilities(vreq("toronto/999999", vec![mount_cap("")]))
                .await
        ),
        Code::NotFound
    );
    h.stop().await;
}

#[tokio::test]
async fn concurrent_calls_on_one_volume_are_aborted() {
    // Latency keeps the first call in flight while the second arrives.
    let h = Harness::start_with(
        |s| s.latency = Duration::from_millis(300),
        controller_config(),
    )
    .await;
    let c = h.controller().await;
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (r1, r2) = tokio::join!(c1.create_volume(create_req("pvc-race", 1)), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c2.create_volume(create_req("pvc-race", 1)).await
    });
    assert!(r1.is_ok());
    assert_eq!(code(r2), Code::Aborted);
    // Different names proceed in parallel.
    let (mut c3, mut c4) = (c.clone(), c.clone());
    let (a, b) = tokio::join!(
        c3.create_volume(create_req("pvc-p1", 1)),
        c4.create_volume(create_req("pvc-p2", 1))
    );
    assert!(a.is_ok() && b.is_ok());
    assert_eq!(h.sim().state().volumes.len(), 3);
    h.stop().await;
}

#[tokio::test]
async fn lost_replies_and_faults_never_duplicate_or_leak() {
    let h = Harness::start().await;
    h.sim().set_fault_rate(0.35);
    let mut c = h.controller().await;
    // Retry retryable codes like the external-provisioner does.
    for i in 0..12 {
        let name = format!("pvc-fault-{i}");
        let mut ok = false;
        for _ in 0..40 {
            match c.create_volume(create_req(&name, 1)).await {
                Ok(_) => {
                    ok = true;
                    break;
                }
                Err(s)
                    if matches!(
                        s.code(),
                        Code::Unavailable | Code::Aborted | Code::DeadlineExceeded
                    ) =>
                {
                    // Like a sidecar: back off (longer than the harness's unknown-create grace).
                    tokio::time::sleep(Duration::from_millis(60)).await;
                    continue;
                }
                Err(s) => panic!("{name}: unexpected {s:?}"),
            }
        }
        assert!(ok, "{name} never succeeded");
    }
    h.sim().set_fault_rate(0.0);
    let state = h.sim().state();
    let mut labels: Vec<&str> = state.volumes.iter().map(|v| v.label.as_str()).collect();
    labels.sort();
    let n = labels.len();
    labels.dedup();
    assert_eq!(labels.len(), n, "a name got two volumes: {state:?}");
    assert_eq!(n, 12);
    h.stop().await;
}

#[tokio::test]
async fn publishing_past_the_per_node_limit_is_resource_exhausted() {
    let h = Harness::start().await;
    let mut c = h.controller().await;
    let a = h.vm("node-a");
    let publish = |id: String| ControllerPublishVolumeRequest {
        volume_id: id,
        node_id: a.clone(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    for i in 0..15 {
        let v = create(&h, &format!("pvc-limit-{i}"), 1).await;
        c.controller_publish_volume(publish(v.volume_id))
            .await
            .unwrap();
    }
    let extra = create(&h, "pvc-limit-extra", 1).await;
    let err = c
        .controller_publish_volume(publish(extra.volume_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    h.stop().await;
}

#[tokio::test]
async fn transitional_states_and_unsupported_requests() {
    // Status changes take 1.5 s, so a publish cut short by its deadline leaves the volume
    // `attaching` (the API shows no VM yet).
    let h = Harness::start_with(
        |s| s.transition = Duration::from_millis(1500).into(),
        controller_config(),
    )
    .await;
    let mut c = h.controller().await;
    let v = create(&h, "pvc-busy", 1).await;
    let a = h.vm("node-a");
    let publish = ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: a.clone(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    let mut ro = publish.clone();
    ro.readonly = true;
    assert_eq!(
        code(c.controller_publish_volume(ro).await),
        Code::InvalidArgument
    );

    let mut short = tonic::Request::new(publish.clone());
    short.set_timeout(Duration::from_millis(300));
    assert!(c.controller_publish_volume(short).await.is_err());
    // OK here would leave the volume attached behind the CO's back once the attach lands.
    let unpublish = ControllerUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: a.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(c.controller_unpublish_volume(unpublish.clone()).await),
        Code::Aborted
    );
    assert_eq!(
        code(
            c.delete_volume(DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::Aborted
    );
    // Retried like a sidecar, both converge.
    let mut published = false;
    for _ in 0..50 {
        match c.controller_publish_volume(publish.clone()).await {
            Ok(_) => {
                published = true;
                break;
            }
            Err(s) if s.code() == Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    assert!(published);
    c.controller_unpublish_volume(unpublish).await.unwrap();
    assert!(h.sim().state().volumes[0].attached.is_none());

    // A volume context this driver never produced is not confirmed, nor another region.
    let mut vreq = ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.clone(),
        volume_capabilities: vec![mount_cap("ext4")],
        ..Default::default()
    };
    vreq.volume_context.insert("foo".into(), "bar".into());
    assert!(
        c.validate_volume_capabilities(vreq.clone())
            .await
            .unwrap()
            .into_inner()
            .confirmed
            .is_none()
    );
    vreq.volume_context.clear();
    vreq.parameters.insert("region".into(), "montreal".into());
    assert!(
        c.validate_volume_capabilities(vreq)
            .await
            .unwrap()
            .into_inner()
            .confirmed
            .is_none()
    );

    // A retry whose preferred region changed still gets the volume, if its region is allowed.
    let mut again = create_req("pvc-busy", 1);
    again.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![topo("montreal"), topo("toronto")],
        preferred: vec![topo("montreal")],
    });
    let got = c
        .create_volume(again)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(got.volume_id, v.volume_id);
    assert_eq!(got.accessible_topology, vec![topo("toronto")]);
    h.stop().await;
}
