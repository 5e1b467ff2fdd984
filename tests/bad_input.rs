//! Bad input: every Controller and Node RPC with each missing or malformed field gets the
//! exact gRPC code the CSI spec asks for, a message naming the field, and changes nothing in
//! the cloud. Plus property tests: ID parsing and the client's reply parsing never panic.

mod common;
mod rel;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use lunanode_csi::csi::controller_client::ControllerClient;
use lunanode_csi::csi::node_client::NodeClient;
use lunanode_csi::csi::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use lunanode_csi::csi::*;
use lunanode_csi::driver::NodeConfig;
use lunanode_csi::sim::SimHandle;
use rel::*;
use tonic::Code;
use tonic::transport::Channel;

type Call = Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;

struct Case {
    what: String,
    want: Code,
    /// Must appear in the message (case-insensitive) when `want` is not OK.
    needle: &'static str,
    call: Call,
}

const UUID: &str = "484a06d3-7ea6-40d6-8e72-9e7e23f6826b";

fn cap(mode: Mode, access: Option<AccessType>) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: access,
    }
}
fn mount(fs: &str) -> Option<AccessType> {
    Some(AccessType::Mount(MountVolume {
        fs_type: fs.into(),
        ..Default::default()
    }))
}

/// Malformed capabilities, with the word their message must contain.
fn bad_caps() -> Vec<(&'static str, VolumeCapability, &'static str)> {
    vec![
        (
            "multi-node writer",
            cap(Mode::MultiNodeMultiWriter, mount("ext4")),
            "access mode",
        ),
        (
            "multi-node reader",
            cap(Mode::MultiNodeReaderOnly, mount("ext4")),
            "access mode",
        ),
        ("unknown mode", cap(Mode::Unknown, mount("ext4")), "mode"),
        (
            "unknown fs",
            cap(Mode::SingleNodeWriter, mount("btrfs")),
            "btrfs",
        ),
        (
            "no access type",
            cap(Mode::SingleNodeWriter, None),
            "access",
        ),
        (
            "no access mode",
            VolumeCapability {
                access_mode: None,
                access_type: Some(AccessType::Block(BlockVolume {})),
            },
            "access_mode",
        ),
    ]
}

/// Names the spec forbids, with the word their message must contain.
fn bad_names() -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("empty name", String::new(), "name"),
        ("129-byte name", "n".repeat(129), "name"),
        ("name with control char", "pvc-\u{1}x".into(), "name"),
        ("name with escape", "pvc-\u{1b}[31m".into(), "name"),
    ]
}

/// IDs that do not name a volume of this driver.
fn foreign_volume_ids() -> Vec<String> {
    vec![
        "x".into(),
        "toronto/01".into(),
        "mars/1".into(),
        format!("toronto/{UUID}"),
        "toronto/999999".into(),
        "toronto/1/2".into(),
    ]
}

fn bad_paths() -> Vec<(&'static str, &'static str)> {
    vec![
        ("relative path", "rel/path"),
        ("traversing path", "/a/../b"),
        ("dot-dot only", ".."),
    ]
}

fn range(req: i64, lim: i64) -> Option<CapacityRange> {
    Some(CapacityRange {
        required_bytes: req,
        limit_bytes: lim,
    })
}

struct Env {
    c: ControllerClient<Channel>,
    n: NodeClient<Channel>,
    vol: String,
    node: String,
    snap: String,
}

macro_rules! case {
    ($cases:ident, $what:expr, $want:expr, $needle:expr, $client:expr, $method:ident, $req:expr) => {{
        let mut c = $client.clone();
        let what = $what.to_string();
        let r = $req;
        $cases.push(Case {
            what,
            want: $want,
            needle: $needle,
            call: Box::pin(async move { c.$method(r).await.map(drop) }),
        });
    }};
}

fn controller_cases(e: &Env, cases: &mut Vec<Case>) {
    let c = &e.c;
    let good_create = create_req("pvc-good-name", 1, None);
    // CreateVolume
    for (what, name, needle) in bad_names() {
        let r = CreateVolumeRequest {
            name,
            ..good_create.clone()
        };
        case!(
            cases,
            format!("CreateVolume {what}"),
            Code::InvalidArgument,
            needle,
            c,
            create_volume,
            r
        );
    }
    case!(
        cases,
        "CreateVolume no capabilities",
        Code::InvalidArgument,
        "volume_capabilities",
        c,
        create_volume,
        CreateVolumeRequest {
            volume_capabilities: vec![],
            ..good_create.clone()
        }
    );
    for (what, vc, needle) in bad_caps() {
        case!(
            cases,
            format!("CreateVolume {what}"),
            Code::InvalidArgument,
            needle,
            c,
            create_volume,
            CreateVolumeRequest {
                volume_capabilities: vec![vc],
                ..good_create.clone()
            }
        );
    }
    for (what, rg, code, needle) in [
        (
            "negative required",
            range(-1, 0),
            Code::InvalidArgument,
            "capacity_range",
        ),
        (
            "negative limit",
            range(0, -5),
            Code::InvalidArgument,
            "capacity_range",
        ),
        (
            "i64::MAX required",
            range(i64::MAX, 0),
            Code::OutOfRange,
            "required_bytes",
        ),
        (
            "i64::MAX both",
            range(i64::MAX, i64::MAX),
            Code::OutOfRange,
            "required_bytes",
        ),
        (
            "limit below required",
            range(2 * GIB, GIB),
            Code::OutOfRange,
            "limit_bytes",
        ),
        (
            "limit below 1 GB",
            range(0, 1000),
            Code::OutOfRange,
            "limit_bytes",
        ),
    ] {
        case!(
            cases,
            format!("CreateVolume {what}"),
            code,
            needle,
            c,
            create_volume,
            CreateVolumeRequest {
                capacity_range: rg,
                ..good_create.clone()
            }
        );
    }
    case!(
        cases,
        "CreateVolume unknown parameter",
        Code::InvalidArgument,
        "parameter",
        c,
        create_volume,
        CreateVolumeRequest {
            parameters: HashMap::from([("iops".into(), "5".into())]),
            ..good_create.clone()
        }
    );
    case!(
        cases,
        "CreateVolume unknown region",
        Code::InvalidArgument,
        "region",
        c,
        create_volume,
        CreateVolumeRequest {
            parameters: HashMap::from([("region".into(), "mars".into())]),
            ..good_create.clone()
        }
    );
    case!(
        cases,
        "CreateVolume empty content source",
        Code::InvalidArgument,
        "volume_content_source",
        c,
        create_volume,
        CreateVolumeRequest {
            volume_content_source: Some(VolumeContentSource { r#type: None }),
            ..good_create.clone()
        }
    );
    for sid in [
        "x".to_string(),
        "mars/1".into(),
        format!("toronto/{UUID}"),
        "toronto/1".into(),
        e.vol.clone(),
    ] {
        case!(
            cases,
            format!("CreateVolume from snapshot {sid:?}"),
            Code::NotFound,
            "snapshot",
            c,
            create_volume,
            from_snapshot(good_create.clone(), &sid)
        );
    }
    for vid in foreign_volume_ids() {
        let mut r = good_create.clone();
        r.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Volume(
                volume_content_source::VolumeSource {
                    volume_id: vid.clone(),
                },
            )),
        });
        case!(
            cases,
            format!("CreateVolume clone of {vid:?}"),
            Code::NotFound,
            "volume",
            c,
            create_volume,
            r
        );
    }

    // DeleteVolume: an ID that names nothing is already deleted.
    case!(
        cases,
        "DeleteVolume empty id",
        Code::InvalidArgument,
        "volume_id",
        c,
        delete_volume,
        DeleteVolumeRequest::default()
    );
    for vid in foreign_volume_ids() {
        case!(
            cases,
            format!("DeleteVolume {vid:?}"),
            Code::Ok,
            "",
            c,
            delete_volume,
            DeleteVolumeRequest {
                volume_id: vid,
                ..Default::default()
            }
        );
    }

    // ControllerPublishVolume
    let good_pub = ControllerPublishVolumeRequest {
        volume_id: e.vol.clone(),
        node_id: e.node.clone(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    case!(
        cases,
        "ControllerPublish empty volume_id",
        Code::InvalidArgument,
        "volume_id",
        c,
        controller_publish_volume,
        ControllerPublishVolumeRequest {
            volume_id: String::new(),
            ..good_pub.clone()
        }
    );
    case!(
        cases,
        "ControllerPublish empty node_id",
        Code::InvalidArgument,
        "node_id",
        c,
        controller_publish_volume,
        ControllerPublishVolumeRequest {
            node_id: String::new(),
            ..good_pub.clone()
        }
    );
    case!(
        cases,
        "ControllerPublish no capability",
        Code::InvalidArgument,
        "volume_capability",
        c,
        controller_publish_volume,
        ControllerPublishVolumeRequest {
            volume_capability: None,
            ..good_pub.clone()
        }
    );
    for (what, vc, needle) in bad_caps() {
        case!(
            cases,
            format!("ControllerPublish {what}"),
            Code::InvalidArgument,
            needle,
            c,
            controller_publish_volume,
            ControllerPublishVolumeRequest {
                volume_capability: Some(vc),
                ..good_pub.clone()
            }
        );
    }
    for vid in foreign_volume_ids() {
        case!(
            cases,
            format!("ControllerPublish volume {vid:?}"),
            Code::NotFound,
            "volume",
            c,
            controller_publish_volume,
            ControllerPublishVolumeRequest {
                volume_id: vid,
                ..good_pub.clone()
            }
        );
    }
    for nid in ["vm-does-not-exist", UUID] {
        case!(
            cases,
            format!("ControllerPublish node {nid:?}"),
            Code::NotFound,
            "node",
            c,
            controller_publish_volume,
            ControllerPublishVolumeRequest {
                node_id: nid.into(),
                ..good_pub.clone()
            }
        );
    }

    // ControllerUnpublishVolume: a volume that does not exist is not published anywhere.
    case!(
        cases,
        "ControllerUnpublish empty volume_id",
        Code::InvalidArgument,
        "volume_id",
        c,
        controller_unpublish_volume,
        ControllerUnpublishVolumeRequest::default()
    );
    for vid in foreign_volume_ids() {
        case!(
            cases,
            format!("ControllerUnpublish {vid:?}"),
            Code::Ok,
            "",
            c,
            controller_unpublish_volume,
            ControllerUnpublishVolumeRequest {
                volume_id: vid,
                node_id: e.node.clone(),
                ..Default::default()
            }
        );
    }

    // ValidateVolumeCapabilities: unsupported capabilities are "not confirmed", not errors.
    let good_val = ValidateVolumeCapabilitiesRequest {
        volume_id: e.vol.clone(),
        volume_capabilities: vec![mount_cap("ext4")],
        ..Default::default()
    };
    case!(
        cases,
        "ValidateVolumeCapabilities empty volume_id",
        Code::InvalidArgument,
        "volume_id",
        c,
        validate_volume_capabilities,
        ValidateVolumeCapabilitiesRequest {
            volume_id: String::new(),
            ..good_val.clone()
        }
    );
    case!(
        cases,
        "ValidateVolumeCapabilities no capabilities",
        Code::InvalidArgument,
        "volume_capabilities",
        c,
        validate_volume_capabilities,
        ValidateVolumeCapabilitiesRequest {
            volume_capabilities: vec![],
            ..good_val.clone()
        }
    );
    for vid in foreign_volume_ids() {
        case!(
            cases,
            format!("ValidateVolumeCapabilities {vid:?}"),
            Code::NotFound,
            "volume",
            c,
            validate_volume_capabilities,
            ValidateVolumeCapabilitiesRequest {
                volume_id: vid,
                ..good_val.clone()
            }
        );
    }

    // Paging.
    for (what, max, tok, code, needle) in [
        (
            "negative max_entries",
            -1,
            "",
            Code::InvalidArgument,
            "max_entries",
        ),
        (
            "i32::MIN max_entries",
            i32::MIN,
            "",
            Code::InvalidArgument,
            "max_entries",
        ),
        ("bad token", 0, "bogus", Code::Aborted, "starting_token"),
        ("token -1", 1, "-1", Code::Aborted, "starting_token"),
    ] {
        case!(
            cases,
            format!("ListVolumes {what}"),
            code,
            needle,
            c,
            list_volumes,
            ListVolumesRequest {
                max_entries: max,
                starting_token: tok.into()
            }
        );
        case!(
            cases,
            format!("ListSnapshots {what}"),
            code,
            needle,
            c,
            list_snapshots,
            ListSnapshotsRequest {
                max_entries: max,
                starting_token: tok.into(),
                ..Default::default()
            }
        );
    }
    for sid in [
        "x".to_string(),
        "mars/1".into(),
        format!("toronto/{}", UUID.to_uppercase()),
    ] {
        case!(
            cases,
            format!("ListSnapshots snapshot_id {sid:?} (empty list)"),
            Code::Ok,
            "",
            c,
            list_snapshots,
            ListSnapshotsRequest {
                snapshot_id: sid,
                ..Default::default()
            }
        );
    }

    // CreateSnapshot
    let good_snap = CreateSnapshotRequest {
        source_volume_id: e.vol.clone(),
        name: "snap-good-name".into(),
        ..Default::default()
    };
    for (what, name, needle) in bad_names() {
        case!(
            cases,
            format!("CreateSnapshot {what}"),
            Code::InvalidArgument,
            needle,
            c,
            create_snapshot,
            CreateSnapshotRequest {
                name,
                ..good_snap.clone()
            }
        );
    }
    case!(
        cases,
        "CreateSnapshot empty source",
        Code::InvalidArgument,
        "source_volume_id",
        c,
        create_snapshot,
        CreateSnapshotRequest {
            source_volume_id: String::new(),
            ..good_snap.clone()
        }
    );
    for vid in foreign_volume_ids() {
        case!(
            cases,
            format!("CreateSnapshot source {vid:?}"),
            Code::NotFound,
            "source volume",
            c,
            create_snapshot,
            CreateSnapshotRequest {
                source_volume_id: vid,
                ..good_snap.clone()
            }
        );
    }
    case!(
        cases,
        "CreateSnapshot unknown parameter",
        Code::InvalidArgument,
        "parameter",
        c,
        create_snapshot,
        CreateSnapshotRequest {
            parameters: HashMap::from([("tier".into(), "gold".into())]),
            ..good_snap.clone()
        }
    );

    // DeleteSnapshot
    case!(
        cases,
        "DeleteSnapshot empty id",
        Code::InvalidArgument,
        "snapshot_id",
        c,
        delete_snapshot,
        DeleteSnapshotRequest::default()
    );
    for sid in [
        "x".to_string(),
        "mars/1".into(),
        format!("toronto/{UUID}"),
        e.vol.clone(),
    ] {
        case!(
            cases,
            format!("DeleteSnapshot {sid:?}"),
            Code::Ok,
            "",
            c,
            delete_snapshot,
            DeleteSnapshotRequest {
                snapshot_id: sid,
                ..Default::default()
            }
        );
    }

    // ControllerExpandVolume
    let good_exp = ControllerExpandVolumeRequest {
        volume_id: e.vol.clone(),
        capacity_range: range(2 * GIB, 0),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    case!(
        cases,
        "ControllerExpand empty volume_id",
        Code::InvalidArgument,
        "volume_id",
        c,
        controller_expand_volume,
        ControllerExpandVolumeRequest {
            volume_id: String::new(),
            ..good_exp.clone()
        }
    );
    case!(
        cases,
        "ControllerExpand no capacity_range",
        Code::InvalidArgument,
        "capacity_range",
        c,
        controller_expand_volume,
        ControllerExpandVolumeRequest {
            capacity_range: None,
            ..good_exp.clone()
        }
    );
    case!(
        cases,
        "ControllerExpand negative",
        Code::InvalidArgument,
        "capacity_range",
        c,
        controller_expand_volume,
        ControllerExpandVolumeRequest {
            capacity_range: range(-GIB, 0),
            ..good_exp.clone()
        }
    );
    case!(
        cases,
        "ControllerExpand i64::MAX",
        Code::OutOfRange,
        "required_bytes",
        c,
        controller_expand_volume,
        ControllerExpandVolumeRequest {
            capacity_range: range(i64::MAX, 0),
            ..good_exp.clone()
        }
    );
    for (what, vc, needle) in bad_caps() {
        case!(
            cases,
            format!("ControllerExpand {what}"),
            Code::InvalidArgument,
            needle,
            c,
            controller_expand_volume,
            ControllerExpandVolumeRequest {
                volume_capability: Some(vc),
                ..good_exp.clone()
            }
        );
    }
    for vid in foreign_volume_ids() {
        case!(
            cases,
            format!("ControllerExpand {vid:?}"),
            Code::NotFound,
            "volume",
            c,
            controller_expand_volume,
            ControllerExpandVolumeRequest {
                volume_id: vid,
                ..good_exp.clone()
            }
        );
    }

    // ControllerGetVolume
    case!(
        cases,
        "ControllerGetVolume empty id",
        Code::InvalidArgument,
        "volume_id",
        c,
        controller_get_volume,
        ControllerGetVolumeRequest::default()
    );
    for vid in foreign_volume_ids() {
        case!(
            cases,
            format!("ControllerGetVolume {vid:?}"),
            Code::NotFound,
            "volume",
            c,
            controller_get_volume,
            ControllerGetVolumeRequest { volume_id: vid }
        );
    }

    // Not offered.
    case!(
        cases,
        "GetCapacity",
        Code::Unimplemented,
        "GetCapacity",
        c,
        get_capacity,
        GetCapacityRequest::default()
    );
    case!(
        cases,
        "GetSnapshot",
        Code::Unimplemented,
        "GetSnapshot",
        c,
        get_snapshot,
        GetSnapshotRequest {
            snapshot_id: e.snap.clone(),
            ..Default::default()
        }
    );
    case!(
        cases,
        "ControllerModifyVolume",
        Code::Unimplemented,
        "ControllerModifyVolume",
        c,
        controller_modify_volume,
        ControllerModifyVolumeRequest {
            volume_id: e.vol.clone(),
            ..Default::default()
        }
    );
}

fn node_cases(e: &Env, dir: &std::path::Path, cases: &mut Vec<Case>) {
    let n = &e.n;
    let staging = dir.join("staging").to_str().unwrap().to_string();
    let target = dir.join("target").to_str().unwrap().to_string();
    let ctx = HashMap::from([
        ("serial".to_string(), "6a3b1f0e-2c4d-4e5f-8".to_string()),
        ("size_bytes".to_string(), GIB.to_string()),
    ]);
    let good_stage = NodeStageVolumeRequest {
        volume_id: e.vol.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.clone(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    case!(
        cases,
        "NodeStage empty volume_id",
        Code::InvalidArgument,
        "volume_id",
        n,
        node_stage_volume,
        NodeStageVolumeRequest {
            volume_id: String::new(),
            ..good_stage.clone()
        }
    );
    case!(
        cases,
        "NodeStage empty staging path",
        Code::InvalidArgument,
        "staging_target_path",
        n,
        node_stage_volume,
        NodeStageVolumeRequest {
            staging_target_path: String::new(),
            ..good_stage.clone()
        }
    );
    for (what, p) in bad_paths() {
        case!(
            cases,
            format!("NodeStage {what}"),
            Code::InvalidArgument,
            "staging_target_path",
            n,
            node_stage_volume,
            NodeStageVolumeRequest {
                staging_target_path: p.into(),
                ..good_stage.clone()
            }
        );
    }
    case!(
        cases,
        "NodeStage no capability",
        Code::InvalidArgument,
        "volume_capability",
        n,
        node_stage_volume,
        NodeStageVolumeRequest {
            volume_capability: None,
            ..good_stage.clone()
        }
    );
    for (what, vc, needle) in bad_caps() {
        let needle = if needle == "btrfs" { "fstype" } else { needle };
        case!(
            cases,
            format!("NodeStage {what}"),
            Code::InvalidArgument,
            needle,
            n,
            node_stage_volume,
            NodeStageVolumeRequest {
                volume_capability: Some(vc),
                ..good_stage.clone()
            }
        );
    }
    for (what, k, v) in [
        ("no serial", "serial", None),
        ("traversing serial", "serial", Some("../../etc/passwd")),
        ("no size", "size_bytes", None),
        ("size not a number", "size_bytes", Some("1G")),
        ("size zero", "size_bytes", Some("0")),
        ("size negative", "size_bytes", Some("-1")),
    ] {
        let mut pc = ctx.clone();
        match v {
            None => {
                pc.remove(k);
            }
            Some(v) => {
                pc.insert(k.into(), v.into());
            }
        }
        let needle = if k == "serial" {
            "serial"
        } else {
            "size_bytes"
        };
        case!(
            cases,
            format!("NodeStage publish_context {what}"),
            Code::InvalidArgument,
            needle,
            n,
            node_stage_volume,
            NodeStageVolumeRequest {
                publish_context: pc,
                ..good_stage.clone()
            }
        );
    }

    case!(
        cases,
        "NodeUnstage empty volume_id",
        Code::InvalidArgument,
        "volume_id",
        n,
        node_unstage_volume,
        NodeUnstageVolumeRequest {
            volume_id: String::new(),
            staging_target_path: staging.clone()
        }
    );
    case!(
        cases,
        "NodeUnstage empty path",
        Code::InvalidArgument,
        "staging_target_path",
        n,
        node_unstage_volume,
        NodeUnstageVolumeRequest {
            volume_id: e.vol.clone(),
            staging_target_path: String::new()
        }
    );
    for (what, p) in bad_paths() {
        case!(
            cases,
            format!("NodeUnstage {what}"),
            Code::InvalidArgument,
            "staging_target_path",
            n,
            node_unstage_volume,
            NodeUnstageVolumeRequest {
                volume_id: e.vol.clone(),
                staging_target_path: p.into()
            }
        );
    }

    let good_pub = NodePublishVolumeRequest {
        volume_id: e.vol.clone(),
        publish_context: ctx.clone(),
        staging_target_path: staging.clone(),
        target_path: target.clone(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    case!(
        cases,
        "NodePublish empty volume_id",
        Code::InvalidArgument,
        "volume_id",
        n,
        node_publish_volume,
        NodePublishVolumeRequest {
            volume_id: String::new(),
            ..good_pub.clone()
        }
    );
    case!(
        cases,
        "NodePublish empty target",
        Code::InvalidArgument,
        "target_path",
        n,
        node_publish_volume,
        NodePublishVolumeRequest {
            target_path: String::new(),
            ..good_pub.clone()
        }
    );
    case!(
        cases,
        "NodePublish empty staging path",
        Code::InvalidArgument,
        "staging_target_path",
        n,
        node_publish_volume,
        NodePublishVolumeRequest {
            staging_target_path: String::new(),
            ..good_pub.clone()
        }
    );
    for (what, p) in bad_paths() {
        case!(
            cases,
            format!("NodePublish target {what}"),
            Code::InvalidArgument,
            "target_path",
            n,
            node_publish_volume,
            NodePublishVolumeRequest {
                target_path: p.into(),
                ..good_pub.clone()
            }
        );
        case!(
            cases,
            format!("NodePublish staging {what}"),
            Code::InvalidArgument,
            "staging_target_path",
            n,
            node_publish_volume,
            NodePublishVolumeRequest {
                staging_target_path: p.into(),
                ..good_pub.clone()
            }
        );
    }
    case!(
        cases,
        "NodePublish no capability",
        Code::InvalidArgument,
        "volume_capability",
        n,
        node_publish_volume,
        NodePublishVolumeRequest {
            volume_capability: None,
            ..good_pub.clone()
        }
    );
    for (what, vc, needle) in bad_caps() {
        let needle = if needle == "btrfs" { "fstype" } else { needle };
        case!(
            cases,
            format!("NodePublish {what}"),
            Code::InvalidArgument,
            needle,
            n,
            node_publish_volume,
            NodePublishVolumeRequest {
                volume_capability: Some(vc),
                ..good_pub.clone()
            }
        );
    }

    case!(
        cases,
        "NodeUnpublish empty volume_id",
        Code::InvalidArgument,
        "volume_id",
        n,
        node_unpublish_volume,
        NodeUnpublishVolumeRequest {
            volume_id: String::new(),
            target_path: target.clone()
        }
    );
    case!(
        cases,
        "NodeUnpublish empty target",
        Code::InvalidArgument,
        "target_path",
        n,
        node_unpublish_volume,
        NodeUnpublishVolumeRequest {
            volume_id: e.vol.clone(),
            target_path: String::new()
        }
    );
    for (what, p) in bad_paths() {
        case!(
            cases,
            format!("NodeUnpublish {what}"),
            Code::InvalidArgument,
            "target_path",
            n,
            node_unpublish_volume,
            NodeUnpublishVolumeRequest {
                volume_id: e.vol.clone(),
                target_path: p.into()
            }
        );
    }

    case!(
        cases,
        "NodeGetVolumeStats empty volume_id",
        Code::InvalidArgument,
        "volume_id",
        n,
        node_get_volume_stats,
        NodeGetVolumeStatsRequest {
            volume_id: String::new(),
            volume_path: target.clone(),
            ..Default::default()
        }
    );
    case!(
        cases,
        "NodeGetVolumeStats empty path",
        Code::InvalidArgument,
        "volume_path",
        n,
        node_get_volume_stats,
        NodeGetVolumeStatsRequest {
            volume_id: e.vol.clone(),
            ..Default::default()
        }
    );
    // A path the driver can never have published names no volume: NOT_FOUND, which is
    // also what csi-sanity expects for a relative volume_path here.
    for (what, p) in bad_paths() {
        case!(
            cases,
            format!("NodeGetVolumeStats {what}"),
            Code::NotFound,
            "volume_path",
            n,
            node_get_volume_stats,
            NodeGetVolumeStatsRequest {
                volume_id: e.vol.clone(),
                volume_path: p.into(),
                ..Default::default()
            }
        );
    }
    case!(
        cases,
        "NodeGetVolumeStats missing path",
        Code::NotFound,
        "volume path",
        n,
        node_get_volume_stats,
        NodeGetVolumeStatsRequest {
            volume_id: e.vol.clone(),
            volume_path: "/nonexistent/lunanode-csi/x".into(),
            ..Default::default()
        }
    );

    let good_nexp = NodeExpandVolumeRequest {
        volume_id: e.vol.clone(),
        volume_path: target.clone(),
        capacity_range: range(2 * GIB, 0),
        ..Default::default()
    };
    case!(
        cases,
        "NodeExpand empty volume_id",
        Code::InvalidArgument,
        "volume_id",
        n,
        node_expand_volume,
        NodeExpandVolumeRequest {
            volume_id: String::new(),
            ..good_nexp.clone()
        }
    );
    case!(
        cases,
        "NodeExpand empty path",
        Code::InvalidArgument,
        "volume_path",
        n,
        node_expand_volume,
        NodeExpandVolumeRequest {
            volume_path: String::new(),
            ..good_nexp.clone()
        }
    );
    // A path the driver can never have published names no volume: NOT_FOUND, which is
    // also what csi-sanity expects for a relative volume_path here.
    for (what, p) in bad_paths() {
        case!(
            cases,
            format!("NodeExpand {what}"),
            Code::NotFound,
            "volume_path",
            n,
            node_expand_volume,
            NodeExpandVolumeRequest {
                volume_path: p.into(),
                ..good_nexp.clone()
            }
        );
    }
    case!(
        cases,
        "NodeExpand negative capacity",
        Code::InvalidArgument,
        "capacity_range",
        n,
        node_expand_volume,
        NodeExpandVolumeRequest {
            capacity_range: range(-1, 0),
            ..good_nexp.clone()
        }
    );
    case!(
        cases,
        "NodeExpand limit below required",
        Code::OutOfRange,
        "limit_bytes",
        n,
        node_expand_volume,
        NodeExpandVolumeRequest {
            capacity_range: range(2 * GIB, GIB),
            ..good_nexp.clone()
        }
    );
    for (what, vc, needle) in bad_caps() {
        let needle = if needle == "btrfs" { "fstype" } else { needle };
        case!(
            cases,
            format!("NodeExpand {what}"),
            Code::InvalidArgument,
            needle,
            n,
            node_expand_volume,
            NodeExpandVolumeRequest {
                volume_capability: Some(vc),
                ..good_nexp.clone()
            }
        );
    }
    case!(
        cases,
        "NodeExpand missing path",
        Code::NotFound,
        "volume path",
        n,
        node_expand_volume,
        NodeExpandVolumeRequest {
            volume_path: "/nonexistent/lunanode-csi/x".into(),
            ..good_nexp.clone()
        }
    );
}

/// Actions that change the cloud and must not be attempted for bad input.
const MUTATING: &[&str] = &[
    "volume/create",
    "volume/delete",
    "volume/attach",
    "volume/detach",
    "volume/extend",
    "volume/rename",
    "volume/snapshot-create",
    // Not "volume/snapshot-delete": DeleteSnapshot of a well-formed ID that names nothing
    // asks the cloud, which answers "not found" (OK per the spec); the object comparison
    // shows nothing changed.
    "volume/snapshot-replicate",
    "image/delete",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_malformed_input_with_the_spec_code_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sim = SimHandle::start(common::sim_config(dir.path()))
        .await
        .unwrap();
    let node = sim
        .vms
        .iter()
        .find(|v| v.name == "node-a")
        .unwrap()
        .id
        .clone();
    let mut ncfg = NodeConfig::new(node.clone(), "toronto");
    ncfg.by_id_dir = dir.path().join("by-id");
    ncfg.device_wait = std::time::Duration::from_millis(200);
    std::fs::create_dir_all(&ncfg.by_id_dir).unwrap();
    let driver = Driver::start(
        dir.path(),
        common::client_for(&sim),
        common::controller_config(),
        Some(ncfg),
    )
    .await;
    let mut c = driver.controller().await;
    // Something to point at: a volume and a snapshot of it.
    let vol = c
        .create_volume(create_req("pvc-existing", 1, None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let snap = c
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: vol.clone(),
            name: "snap-existing".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let env = Env {
        c: c.clone(),
        n: driver.node().await,
        vol,
        node,
        snap,
    };
    let mut cases = Vec::new();
    controller_cases(&env, &mut cases);
    let n_controller = cases.len();
    node_cases(&env, &dir.path().join("kubelet"), &mut cases);
    let n_node = cases.len() - n_controller;

    let before = sim.state();
    let mut problems = Vec::new();
    for case in cases {
        let got = case.call.await;
        let (code, msg) = match &got {
            Ok(()) => (Code::Ok, String::new()),
            Err(s) => (s.code(), s.message().to_string()),
        };
        if code != case.want {
            problems.push(format!(
                "{}: want {:?}, got {code:?} {msg:?}",
                case.what, case.want
            ));
        } else if code != Code::Ok
            && (msg.trim().is_empty() || !msg.to_lowercase().contains(&case.needle.to_lowercase()))
        {
            problems.push(format!(
                "{}: message {msg:?} does not name {:?}",
                case.what, case.needle
            ));
        }
    }
    let after = sim.state();
    eprintln!(
        "bad input: {n_controller} controller cases, {n_node} node cases, {} problems",
        problems.len()
    );
    assert!(
        problems.is_empty(),
        "{} cases wrong:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert_eq!(
        objects(&before),
        objects(&after),
        "bad input changed the cloud"
    );
    for action in MUTATING {
        assert_eq!(
            before.calls.get(*action),
            after.calls.get(*action),
            "bad input led to a {action} call"
        );
    }
    driver.stop().await;
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------

mod props {
    use lunanode_csi::driver::ids::{SnapshotRef, VolumeRef};
    use lunanode_csi::lunanode::{ApiError, Image, Snapshot, Vm, Volume};
    use proptest::prelude::*;

    fn region() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9-]{0,31}"
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn volume_ids_never_panic_and_round_trip(s in "\\PC{0,40}") {
            if let Ok(v) = s.parse::<VolumeRef>() {
                // Only canonical strings parse: printing gives the same string back.
                prop_assert_eq!(v.to_string(), s);
            }
        }

        #[test]
        fn volume_ids_canonical(r in region(), id in any::<u64>()) {
            let v = VolumeRef { region: r.clone(), id };
            let s = v.to_string();
            prop_assert_eq!(s.parse::<VolumeRef>().unwrap(), v);
            // Non-canonical spellings of the same volume do not parse.
            let zero_padded = format!("{r}/0{id}");
            let plus = format!("{r}/+{id}");
            let upper = format!("{}/{id}", r.to_uppercase());
            let spaced = format!(" {s}");
            prop_assert!(zero_padded.parse::<VolumeRef>().is_err());
            prop_assert!(plus.parse::<VolumeRef>().is_err());
            prop_assert!(r == r.to_uppercase() || upper.parse::<VolumeRef>().is_err());
            prop_assert!(spaced.parse::<VolumeRef>().is_err());
        }

        #[test]
        fn snapshot_ids_never_panic_and_round_trip(s in "\\PC{0,60}") {
            if let Ok(v) = s.parse::<SnapshotRef>() {
                prop_assert_eq!(v.to_string(), s);
            }
        }

        #[test]
        fn snapshot_ids_canonical(r in region(), bytes in any::<[u8; 16]>()) {
            let u = uuid::Uuid::from_bytes(bytes);
            let s = format!("{r}/{}", u.hyphenated());
            let v: SnapshotRef = s.parse().unwrap();
            prop_assert_eq!(v.to_string(), s.clone());
            let simple = format!("{r}/{}", u.simple());
            let upper = format!("{r}/{}", u.hyphenated().to_string().to_uppercase());
            let braced = format!("{r}/{}", u.braced());
            prop_assert!(simple.parse::<SnapshotRef>().is_err());
            prop_assert!(upper == s || upper.parse::<SnapshotRef>().is_err());
            prop_assert!(braced.parse::<SnapshotRef>().is_err());
            // A snapshot ID is never a volume ID and vice versa.
            prop_assert!(s.parse::<VolumeRef>().is_err());
        }

        #[test]
        fn cloud_objects_parse_from_any_bytes_without_panicking(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = serde_json::from_slice::<Volume>(&b);
            let _ = serde_json::from_slice::<Snapshot>(&b);
            let _ = serde_json::from_slice::<Image>(&b);
            let _ = serde_json::from_slice::<Vm>(&b);
        }

        #[test]
        fn cloud_objects_parse_from_any_json_without_panicking(v in super::json()) {
            let _ = serde_json::from_value::<Volume>(v.clone()).map(|v| (v.readiness(), v.serial().len(), v.attached_vm().is_some()));
            let _ = serde_json::from_value::<Snapshot>(v.clone()).map(|s| s.readiness());
            let _ = serde_json::from_value::<Image>(v.clone()).map(|i| i.readiness());
            let _ = serde_json::from_value::<Vm>(v.clone());
            let _ = serde_json::from_value::<Vec<Volume>>(v);
        }

        #[test]
        fn error_classifier_never_panics(action in "\\PC{0,20}", msg in "\\PC{0,80}") {
            let e = ApiError::from_cloud_message(&action, &msg);
            prop_assert_eq!(e.message(), msg.as_str());
            let _ = lunanode_csi::lunanode::html_unescape(&msg);
        }
    }
}

/// Arbitrary JSON, biased towards the shapes the cloud sends (objects with the fields the
/// types read, numbers as strings, nulls).
fn json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    use serde_json::Value;
    let key = prop_oneof![
        Just("id".to_string()),
        Just("size".to_string()),
        Just("status".to_string()),
        Just("identification".to_string()),
        Just("attached".to_string()),
        Just("volume".to_string()),
        Just("image_id".to_string()),
        Just("vm_id".to_string()),
        Just("region".to_string()),
        Just("name".to_string()),
        "[a-z_]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,24}".prop_map(Value::String),
        "-?[0-9]{0,25}(\\.[0-9]{0,5})?".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The next HTTP status and body the fake cloud answers with.
type Reply = std::sync::Arc<std::sync::Mutex<(u16, Vec<u8>)>>;

/// The client end to end on arbitrary replies: a local HTTP server answers every request
/// with the next generated status and body; every typed client method must return (Ok or
/// a classified error), never panic.
#[test]
fn client_survives_arbitrary_replies() {
    use axum::extract::State;
    use axum::http::StatusCode;
    use lunanode_csi::lunanode::{Client, ClientConfig, Credentials};
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    let rt = tokio::runtime::Runtime::new().unwrap();
    let reply: Reply = Arc::new(Mutex::new((200, Vec::new())));
    let (url, client) = rt.block_on(async {
        let app = axum::Router::new()
            .route(
                "/api/{c}/{a}/",
                axum::routing::post(|State(r): State<Reply>| async move {
                    let (code, body) = r.lock().unwrap().clone();
                    (StatusCode::from_u16(code).unwrap_or(StatusCode::OK), body)
                }),
            )
            .with_state(reply.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        let url = format!("http://{addr}/api/");
        let creds = Credentials::new("abcdefghijklmnop", &"k".repeat(128)).unwrap();
        let mut cfg = ClientConfig::new(url.clone(), creds);
        cfg.qps = 0.0;
        cfg.max_retries = 0;
        cfg.request_timeout = std::time::Duration::from_secs(5);
        (url, Client::new(cfg).unwrap())
    });
    let _ = url;
    let wrap = |field: &'static str| {
        json().prop_map(move |v| {
            serde_json::json!({ "success": "yes", field: v, "volume_id": v.clone(), "snapshot_id": v.clone(), "image_id": v })
                .to_string()
                .into_bytes()
        })
    };
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..120),
        "\\PC{0,80}".prop_map(String::into_bytes),
        json().prop_map(|v| v.to_string().into_bytes()),
        wrap("volumes"),
        wrap("volume"),
        wrap("snapshots"),
        wrap("images"),
        wrap("extra"),
        "\\PC{0,60}".prop_map(|m| serde_json::json!({"success": "no", "error": m})
            .to_string()
            .into_bytes()),
    ];
    let status = prop_oneof![
        Just(200u16),
        Just(429u16),
        Just(500u16),
        Just(404u16),
        200u16..600
    ];
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 300,
        ..ProptestConfig::default()
    });
    runner
        .run(&(status, body), |(status, body)| {
            *reply.lock().unwrap() = (status, body);
            rt.block_on(async {
                let _ = client.volume_list(None).await;
                let _ = client.volume_info(1).await;
                let _ = client.volume_create("toronto", "x", 1, None).await;
                let _ = client.snapshot_list("toronto").await;
                let _ = client.snapshot_create(1, "x").await;
                let _ = client
                    .snapshot_replicate("toronto", "x", "y", "montreal")
                    .await;
                let _ = client.image_list(None).await;
                let _ = client.vm_info("vm").await;
                let _ = client.volume_delete(1).await;
            });
            Ok(())
        })
        .unwrap();
}
