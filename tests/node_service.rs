//! The Node service end to end over gRPC: the real tonic server on a temp unix socket,
//! called with a tonic client, on real loop devices (as root).

#[path = "node_common.rs"]
mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use lunanode_csi::csi::node_client::NodeClient;
use lunanode_csi::csi::node_server::NodeServer;
use lunanode_csi::csi::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use lunanode_csi::csi::*;
use lunanode_csi::driver::node::{CTX_IDENTIFICATION, CTX_SERIAL, CTX_SIZE_BYTES};
use lunanode_csi::driver::{NodeConfig, NodeService};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

type Client = NodeClient<Channel>;

async fn start(fx: &Fixture, device_wait: Duration) -> Client {
    let mut cfg = NodeConfig::new("vm-test-1", "toronto");
    cfg.by_id_dir = fx.by_id.clone();
    cfg.device_wait = device_wait;
    let svc = NodeService::new(cfg).unwrap();
    let sock = fx.path("csi.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(NodeServer::new(svc))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(sock).await?,
                ))
            }
        }))
        .await
        .unwrap();
    NodeClient::new(channel)
}

fn ctx(d: &Disk) -> HashMap<String, String> {
    HashMap::from([
        (CTX_SERIAL.to_string(), d.serial.clone()),
        (CTX_SIZE_BYTES.to_string(), d.size.to_string()),
    ])
}

fn mount_cap(fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec!["noatime".into()],
            ..Default::default()
        })),
    }
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

async fn stage(
    c: &mut Client,
    vol: &str,
    d: &Disk,
    staging: &Path,
    cap: VolumeCapability,
) -> Result<(), tonic::Status> {
    c.node_stage_volume(NodeStageVolumeRequest {
        volume_id: vol.into(),
        publish_context: ctx(d),
        staging_target_path: s(staging),
        volume_capability: Some(cap),
        ..Default::default()
    })
    .await
    .map(drop)
}

/// [`stage`] with a publish_context of one's own.
async fn stage_with(
    c: &mut Client,
    vol: &str,
    publish_context: HashMap<String, String>,
    staging: &Path,
    cap: VolumeCapability,
) -> Result<(), tonic::Status> {
    c.node_stage_volume(NodeStageVolumeRequest {
        volume_id: vol.into(),
        publish_context,
        staging_target_path: s(staging),
        volume_capability: Some(cap),
        ..Default::default()
    })
    .await
    .map(drop)
}

/// Assert that a call failed with `code` and a message naming `needle`.
#[track_caller]
fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    let err = r.unwrap_err();
    assert_eq!(err.code(), code, "{err:?}");
    assert!(err.message().contains(needle), "{}", err.message());
}

async fn unstage(c: &mut Client, vol: &str, staging: &Path) -> Result<(), tonic::Status> {
    c.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: s(staging),
    })
    .await
    .map(drop)
}

async fn publish(
    c: &mut Client,
    vol: &str,
    d: &Disk,
    staging: &Path,
    target: &Path,
    cap: VolumeCapability,
    readonly: bool,
) -> Result<(), tonic::Status> {
    c.node_publish_volume(NodePublishVolumeRequest {
        volume_id: vol.into(),
        publish_context: ctx(d),
        staging_target_path: s(staging),
        target_path: s(target),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    })
    .await
    .map(drop)
}

async fn unpublish(c: &mut Client, vol: &str, target: &Path) -> Result<(), tonic::Status> {
    c.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: vol.into(),
        target_path: s(target),
    })
    .await
    .map(drop)
}

async fn stats(
    c: &mut Client,
    vol: &str,
    path: &Path,
) -> Result<NodeGetVolumeStatsResponse, tonic::Status> {
    c.node_get_volume_stats(NodeGetVolumeStatsRequest {
        volume_id: vol.into(),
        volume_path: s(path),
        staging_target_path: String::new(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn expand(
    c: &mut Client,
    vol: &str,
    path: &Path,
    required: u64,
) -> Result<i64, tonic::Status> {
    c.node_expand_volume(NodeExpandVolumeRequest {
        volume_id: vol.into(),
        volume_path: s(path),
        capacity_range: Some(CapacityRange {
            required_bytes: required as i64,
            limit_bytes: 0,
        }),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().capacity_bytes)
}

fn blkid_uuid(dev: &Path) -> String {
    run(
        "blkid",
        &["-p", "-o", "value", "-s", "UUID", dev.to_str().unwrap()],
    )
    .trim()
    .to_string()
}

fn fs_total(path: &Path) -> u64 {
    let v = nix::sys::statvfs::statvfs(path).unwrap();
    v.blocks() as u64 * v.fragment_size() as u64
}

fn read_file_on(fs: &str, dev: &Path, dir: &PathBuf, name: &str) -> Vec<u8> {
    std::fs::create_dir_all(dir).unwrap();
    nix::mount::mount(
        Some(dev),
        dir.as_path(),
        Some(fs),
        nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    let data = std::fs::read(dir.join(name)).unwrap();
    nix::mount::umount2(dir.as_path(), nix::mount::MntFlags::empty()).unwrap();
    data
}

#[tokio::test]
async fn info_and_capabilities_over_grpc() {
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(1)).await;
    let info = c
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "vm-test-1");
    assert!(info.max_volumes_per_node > 0);
    assert_eq!(
        info.accessible_topology.unwrap().segments[lunanode_csi::TOPOLOGY_KEY],
        "toronto"
    );
    let caps = c
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let types: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    use node_service_capability::rpc::Type;
    for t in [
        Type::StageUnstageVolume,
        Type::GetVolumeStats,
        Type::ExpandVolume,
        Type::VolumeCondition,
        Type::SingleNodeMultiWriter,
    ] {
        assert!(types.contains(&(t as i32)), "{t:?}");
    }
}

#[tokio::test]
async fn invalid_requests_are_refused() {
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(1)).await;
    let d = Disk {
        serial: "abc".into(),
        file: PathBuf::new(),
        dev: PathBuf::new(),
        size: MIB,
    };
    for (vol, path, cap) in [
        ("", "/tmp/x", Some(mount_cap("ext4"))),
        ("v", "relative/path", Some(mount_cap("ext4"))),
        ("v", "/tmp/a/../../etc", Some(mount_cap("ext4"))),
        ("v", "/tmp/x", None),
        ("v", "/tmp/x", Some(mount_cap("btrfs"))),
    ] {
        let err = c
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: vol.into(),
                publish_context: ctx(&d),
                staging_target_path: path.into(),
                volume_capability: cap,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{vol:?} {path:?}: {err:?}"
        );
    }
    let err = unpublish(&mut c, "v", Path::new("rel")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut no_ctx = mount_cap("ext4");
    no_ctx.access_mode = Some(AccessMode {
        mode: Mode::MultiNodeMultiWriter as i32,
    });
    let err = stage(&mut c, "v", &d, Path::new("/tmp/x"), no_ctx)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn blank_device_is_formatted_and_mounted_and_stage_is_idempotent() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let d = fx.disk(64 * MIB);
    let staging = fx.path("globalmount");
    stage(&mut c, "vol-1", &d, &staging, mount_cap(""))
        .await
        .unwrap();
    assert_eq!(blkid_type(&d.dev).as_deref(), Some("ext4"));
    let m = lunanode_csi::volumes::mount::mount_at(&staging)
        .unwrap()
        .unwrap();
    assert_eq!(m.fs_type, "ext4");
    assert!(m.options.contains("noatime"));
    let uuid = blkid_uuid(&d.dev);
    std::fs::write(staging.join("f"), b"1").unwrap();
    // Again: OK, nothing reformatted.
    stage(&mut c, "vol-1", &d, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    assert_eq!(blkid_uuid(&d.dev), uuid);
    assert_eq!(std::fs::read(staging.join("f")).unwrap(), b"1");
    unstage(&mut c, "vol-1", &staging).await.unwrap();
    assert!(!staging.exists());
}

#[tokio::test]
async fn existing_ext4_keeps_its_data() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let d = fx.disk(64 * MIB);
    mkfs("ext4", &d.dev);
    put_file(
        "ext4",
        &d.dev,
        &fx.path("prep"),
        "precious",
        b"do not lose me",
    );
    let uuid = blkid_uuid(&d.dev);
    let staging = fx.path("globalmount");
    stage(&mut c, "vol-1", &d, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(staging.join("precious")).unwrap(),
        b"do not lose me"
    );
    assert_eq!(blkid_uuid(&d.dev), uuid);
}

#[tokio::test]
async fn wrong_filesystem_and_partition_table_are_refused_untouched() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    if have("mkfs.xfs") {
        let d = fx.disk(512 * MIB);
        mkfs("xfs", &d.dev);
        put_file("xfs", &d.dev, &fx.path("prep"), "precious", b"xfs data");
        let staging = fx.path("gm-xfs");
        refused(
            stage(&mut c, "vol-x", &d, &staging, mount_cap("ext4")).await,
            Code::FailedPrecondition,
            "xfs",
        );
        assert!(!is_mount_point(&staging));
        assert_eq!(blkid_type(&d.dev).as_deref(), Some("xfs"));
        assert_eq!(
            read_file_on("xfs", &d.dev, &fx.path("check"), "precious"),
            b"xfs data"
        );
    } else {
        eprintln!("skipped (xfs part): mkfs.xfs not installed");
    }

    let p = fx.disk(64 * MIB);
    write_mbr(&p.dev);
    let staging = fx.path("gm-pt");
    refused(
        stage(&mut c, "vol-p", &p, &staging, mount_cap("ext4")).await,
        Code::FailedPrecondition,
        "partition table",
    );
    assert!(!is_mount_point(&staging));
    let out = run("blkid", &["-p", "-o", "export", p.dev.to_str().unwrap()]);
    assert!(out.contains("PTTYPE=dos"), "{out}");
}

#[tokio::test]
async fn late_device_is_found_and_missing_one_fails_after_the_bound() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(10)).await;
    let d = fx.disk_unlinked(64 * MIB);
    let (dev, link) = (d.dev.clone(), fx.by_id.join(format!("virtio-{}", d.serial)));
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        std::os::unix::fs::symlink(dev, link).unwrap();
    });
    let staging = fx.path("gm-late");
    let started = Instant::now();
    stage(&mut c, "vol-late", &d, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(is_mount_point(&staging));
    t.join().unwrap();

    let fx2 = Fixture::new();
    let mut c2 = start(&fx2, Duration::from_millis(1500)).await;
    let ghost = Disk {
        serial: "ghost-ghost-ghost-gh".into(),
        file: PathBuf::new(),
        dev: PathBuf::new(),
        size: 64 * MIB,
    };
    let started = Instant::now();
    let err = stage(
        &mut c2,
        "vol-ghost",
        &ghost,
        &fx2.path("gm"),
        mount_cap("ext4"),
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("virtio-ghost-ghost-ghost-gh"),
        "{}",
        err.message()
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn size_mismatch_and_foreign_mount_are_refused() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let a = fx.disk(64 * MIB);
    let mut wrong = a.clone();
    wrong.size = 128 * MIB;
    let staging = fx.path("gm");
    refused(
        stage(&mut c, "vol-a", &wrong, &staging, mount_cap("ext4")).await,
        Code::FailedPrecondition,
        "size",
    );
    assert_eq!(blkid_type(&a.dev), None, "nothing was formatted");

    // A stages; then B at the same path is refused and A stays.
    stage(&mut c, "vol-a", &a, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    let b = fx.disk(64 * MIB);
    let err = stage(&mut c, "vol-b", &b, &staging, mount_cap("ext4"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(blkid_type(&b.dev), None, "B untouched");
    let m = lunanode_csi::volumes::mount::mount_at(&staging)
        .unwrap()
        .unwrap();
    assert_eq!(m.source, s(&a.dev));
}

#[tokio::test]
async fn publish_unpublish_unstage_are_idempotent_and_readonly_is_enforced() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let d = fx.disk(64 * MIB);
    let staging = fx.path("plugins/gm");
    let target = fx.path("pods/uid/volumes/pv-1/mount");
    let ro_target = fx.path("pods/uid2/volumes/pv-1/mount");

    // Publishing before staging is a precondition failure.
    let err = publish(&mut c, "v", &d, &staging, &target, mount_cap("ext4"), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    stage(&mut c, "v", &d, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    for _ in 0..2 {
        publish(&mut c, "v", &d, &staging, &target, mount_cap("ext4"), false)
            .await
            .unwrap();
    }
    std::fs::write(target.join("written"), b"via target").unwrap();
    assert_eq!(
        std::fs::read(staging.join("written")).unwrap(),
        b"via target"
    );

    publish(
        &mut c,
        "v",
        &d,
        &staging,
        &ro_target,
        mount_cap("ext4"),
        true,
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(ro_target.join("written")).unwrap(),
        b"via target"
    );
    let err = std::fs::write(ro_target.join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    // Same target, read-write now: incompatible.
    let err = publish(
        &mut c,
        "v",
        &d,
        &staging,
        &ro_target,
        mount_cap("ext4"),
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    for t in [&target, &ro_target] {
        unpublish(&mut c, "v", t).await.unwrap();
        unpublish(&mut c, "v", t).await.unwrap();
        assert!(!t.exists());
    }
    unstage(&mut c, "v", &staging).await.unwrap();
    unstage(&mut c, "v", &staging).await.unwrap();
    assert!(!is_mount_point(&staging));
    // Paths already gone entirely (parents too).
    std::fs::remove_dir_all(fx.path("pods")).unwrap();
    std::fs::remove_dir_all(fx.path("plugins")).unwrap();
    unpublish(&mut c, "v", &target).await.unwrap();
    unstage(&mut c, "v", &staging).await.unwrap();
    // Data survived the whole cycle.
    assert_eq!(
        read_file_on("ext4", &d.dev, &fx.path("check"), "written"),
        b"via target"
    );
}

#[tokio::test]
async fn block_publish_gives_a_usable_device() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let d = fx.disk(64 * MIB);
    let staging = fx.path("staging/pv-b");
    let target = fx.path("pods/uid/volumeDevices/pv-b/dev");
    stage(&mut c, "vb", &d, &staging, block_cap())
        .await
        .unwrap();
    assert_eq!(
        blkid_type(&d.dev),
        None,
        "no filesystem work for block access"
    );
    for _ in 0..2 {
        publish(&mut c, "vb", &d, &staging, &target, block_cap(), false)
            .await
            .unwrap();
    }
    assert!(
        std::fs::metadata(&target)
            .unwrap()
            .file_type()
            .is_block_device()
    );
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        f.seek(SeekFrom::Start(MIB)).unwrap();
        f.write_all(b"raw block bytes").unwrap();
        f.sync_all().unwrap();
    }
    let mut back = vec![0u8; 15];
    let mut f = std::fs::File::open(&d.dev).unwrap();
    f.seek(SeekFrom::Start(MIB)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"raw block bytes");

    let st = stats(&mut c, "vb", &target).await.unwrap();
    assert_eq!(st.usage.len(), 1);
    assert_eq!(st.usage[0].total, (64 * MIB) as i64);
    assert!(!st.volume_condition.unwrap().abnormal);
    assert_eq!(
        expand(&mut c, "vb", &target, 0).await.unwrap(),
        (64 * MIB) as i64
    );

    for _ in 0..2 {
        unpublish(&mut c, "vb", &target).await.unwrap();
    }
    assert!(!target.exists());
    unstage(&mut c, "vb", &staging).await.unwrap();
}

#[tokio::test]
async fn stats_are_right_and_condition_is_reported() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let d = fx.disk(128 * MIB);
    let staging = fx.path("gm");
    let target = fx.path("pod/mount");
    stage(&mut c, "v", &d, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    publish(&mut c, "v", &d, &staging, &target, mount_cap("ext4"), false)
        .await
        .unwrap();
    std::fs::write(target.join("blob"), vec![1u8; 10 << 20]).unwrap();
    nix::unistd::sync();

    let st = stats(&mut c, "v", &target).await.unwrap();
    let v = nix::sys::statvfs::statvfs(&target).unwrap();
    let bytes = st
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .unwrap();
    let inodes = st
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Inodes as i32)
        .unwrap();
    let frs = v.fragment_size() as i64;
    assert_eq!(bytes.total, v.blocks() as i64 * frs);
    assert_eq!(bytes.available, v.blocks_available() as i64 * frs);
    assert!(bytes.used >= 10 << 20 && bytes.used < 40 << 20, "{bytes:?}");
    assert!(
        bytes.total > 100 * MIB as i64 && bytes.total <= 128 * MIB as i64,
        "{bytes:?}"
    );
    assert_eq!(inodes.total, v.files() as i64);
    assert_eq!(inodes.used, (v.files() - v.files_free()) as i64);
    assert!(!st.volume_condition.unwrap().abnormal);

    // The path exists but the mount is gone: abnormal, with a reason.
    unpublish(&mut c, "v", &target).await.unwrap();
    std::fs::create_dir_all(&target).unwrap();
    let st = stats(&mut c, "v", &target).await.unwrap();
    let cond = st.volume_condition.unwrap();
    assert!(
        cond.abnormal && cond.message.contains("not a mount point"),
        "{cond:?}"
    );
    // Unknown path: NOT_FOUND.
    let err = stats(&mut c, "v", &fx.path("nowhere")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

async fn expand_case(fs: &str, size: u64, new_size: u64) {
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let mut d = fx.disk(size);
    let staging = fx.path("gm");
    let target = fx.path("pod/mount");
    stage(&mut c, "v", &d, &staging, mount_cap(fs))
        .await
        .unwrap();
    publish(&mut c, "v", &d, &staging, &target, mount_cap(fs), false)
        .await
        .unwrap();
    std::fs::write(target.join("keep"), b"grow me").unwrap();
    let before = fs_total(&target);
    // Resizing to the current size is a no-op.
    assert_eq!(
        expand(&mut c, "v", &target, size).await.unwrap(),
        size as i64
    );

    fx.grow(&mut d, new_size);
    let cap = expand(&mut c, "v", &target, new_size).await.unwrap();
    assert_eq!(cap, new_size as i64);
    let after = fs_total(&target);
    assert!(
        after > before + (new_size - size) / 2,
        "{before} -> {after}"
    );
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"grow me");
    // Asking for more than the device has: a clear precondition failure.
    let err = expand(&mut c, "v", &target, new_size * 2)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[tokio::test]
async fn expand_grows_ext4_online() {
    if !can_run() || !can_resize_ext4_online() {
        return;
    }
    expand_case("ext4", 64 * MIB, 192 * MIB).await;
}

#[tokio::test]
async fn expand_grows_xfs_online() {
    if !can_run() || !have("mkfs.xfs") {
        return;
    }
    expand_case("xfs", 512 * MIB, 1024 * MIB).await;
}

async fn stage_after_growth_case(fs: &str, size: u64, new_size: u64) {
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let mut d = fx.disk(size);
    let staging = fx.path("gm");
    stage(&mut c, "v", &d, &staging, mount_cap(fs))
        .await
        .unwrap();
    std::fs::write(staging.join("keep"), b"offline").unwrap();
    let before = fs_total(&staging);
    unstage(&mut c, "v", &staging).await.unwrap();

    // Offline expansion: the cloud grows the detached disk; the new size is published.
    fx.grow(&mut d, new_size);
    stage(&mut c, "v", &d, &staging, mount_cap(fs))
        .await
        .unwrap();
    let after = fs_total(&staging);
    assert!(
        after > before + (new_size - size) / 2,
        "{fs}: {before} -> {after}"
    );
    assert_eq!(std::fs::read(staging.join("keep")).unwrap(), b"offline");
}

#[tokio::test]
async fn stage_after_growth_grows_ext4() {
    if !can_run() {
        return;
    }
    stage_after_growth_case("ext4", 64 * MIB, 160 * MIB).await;
}

#[tokio::test]
async fn stage_after_growth_grows_xfs() {
    if !can_run() || !have("mkfs.xfs") {
        return;
    }
    stage_after_growth_case("xfs", 512 * MIB, 1024 * MIB).await;
}

#[tokio::test]
async fn a_second_call_for_the_same_volume_is_aborted() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let c = start(&fx, Duration::from_secs(3)).await;
    let d = fx.disk_unlinked(64 * MIB);
    let staging = fx.path("gm");
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (d1, st1) = (d.clone(), staging.clone());
    // The first stage waits for a link that appears after 1.5 s.
    let first =
        tokio::spawn(async move { stage(&mut c1, "v", &d1, &st1, mount_cap("ext4")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = stage(&mut c2, "v", &d, &staging, mount_cap("ext4"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    // Another volume is not blocked.
    unpublish(&mut c2, "other", &fx.path("nothing"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    fx.link(&d);
    first.await.unwrap().unwrap();
    assert!(is_mount_point(&staging));
}

// ---------------------------------------------------------------------------------------
// Review fixes: each test below fails without its fix.
// ---------------------------------------------------------------------------------------

fn cap_with(fs: &str, mode: Mode, flags: &[&str]) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        })),
    }
}

fn read_head(dev: &Path, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(dev)
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf
}

/// Deterministic noise with no filesystem signature (blkid finds nothing in it).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn ext4_block_count(dev: &Path) -> u64 {
    let out = run("dumpe2fs", &["-h", dev.to_str().unwrap()]);
    out.lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

// Fix 1: blkid's exit 2 does not prove a disk blank; data in the first MiB is never formatted.
#[tokio::test]
async fn data_without_a_signature_is_never_formatted() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let d = fx.disk(64 * MIB);
    let bytes = noise(MIB as usize);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&d.dev)
            .unwrap();
        f.write_all(&bytes).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(
        blkid_type(&d.dev),
        None,
        "the noise must carry no signature"
    );
    let staging = fx.path("gm");
    refused(
        stage(&mut c, "v", &d, &staging, mount_cap("ext4")).await,
        Code::FailedPrecondition,
        "no known signature",
    );
    assert!(!is_mount_point(&staging));
    assert_eq!(read_head(&d.dev, MIB as usize), bytes, "bytes untouched");
}

/// The note a format leaves in the staging directory while mkfs runs (see `volumes::fs`).
fn format_note(fx: &Fixture, d: &Disk, staging: &Path) -> PathBuf {
    std::fs::create_dir_all(staging).unwrap();
    let note = staging.join(".lunanode-csi-formatting");
    let link = lunanode_csi::volumes::device::by_id_link(&fx.by_id, &d.serial);
    std::fs::write(&note, link.as_os_str().as_encoded_bytes()).unwrap();
    note
}

// mkfs.xfs writes its superblock "in progress" first and clears the flag last: a kill in
// between leaves an xfs that blkid names and the kernel will never mount. This node's own
// (its note says so) is formatted again; one it did not start is refused, untouched.
#[tokio::test]
async fn an_unfinished_xfs_is_redone_only_when_this_node_began_it() {
    if !can_run() || !have("mkfs.xfs") || !have("xfs_db") {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let d = fx.disk(512 * MIB);
    mkfs("xfs", &d.dev);
    run(
        "xfs_db",
        &[
            "-x",
            "-c",
            "sb 0",
            "-c",
            "write inprogress 1",
            d.dev.to_str().unwrap(),
        ],
    );
    let uuid = blkid_uuid(&d.dev);
    let head = read_head(&d.dev, MIB as usize);
    let staging = fx.path("gm");

    refused(
        stage(&mut c, "v", &d, &staging, mount_cap("xfs")).await,
        Code::FailedPrecondition,
        "mkfs never finished",
    );
    assert!(!is_mount_point(&staging));
    assert_eq!(read_head(&d.dev, MIB as usize), head, "bytes untouched");

    // Read-only never writes, even to redo this node's own format.
    let note = format_note(&fx, &d, &staging);
    let ro = cap_with("xfs", Mode::SingleNodeReaderOnly, &[]);
    assert!(stage(&mut c, "v", &d, &staging, ro).await.is_err());
    assert_eq!(read_head(&d.dev, MIB as usize), head, "bytes untouched");

    stage(&mut c, "v", &d, &staging, mount_cap("xfs"))
        .await
        .unwrap();
    assert_eq!(blkid_type(&d.dev).as_deref(), Some("xfs"));
    assert_ne!(blkid_uuid(&d.dev), uuid, "formatted again");
    std::fs::write(staging.join("f"), b"1").unwrap();
    unstage(&mut c, "v", &staging).await.unwrap();
    assert!(!note.exists());
    assert!(!staging.exists(), "nothing left behind");
}

// A kill between mkfs and removing the note leaves a note beside a finished filesystem.
// That filesystem's data is kept (the note licenses formatting only unnamed data or an
// unfinished xfs), the note is cleared before the mount hides it, and unstage removes the
// directory.
#[tokio::test]
async fn a_note_beside_a_finished_filesystem_is_cleared_and_the_data_kept() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let d = fx.disk(64 * MIB);
    mkfs("ext4", &d.dev);
    put_file("ext4", &d.dev, &fx.path("prep"), "precious", b"keep");
    let uuid = blkid_uuid(&d.dev);
    let staging = fx.path("gm");
    let note = format_note(&fx, &d, &staging);
    stage(&mut c, "v", &d, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(staging.join("precious")).unwrap(), b"keep");
    assert_eq!(blkid_uuid(&d.dev), uuid);
    unstage(&mut c, "v", &staging).await.unwrap();
    assert!(!note.exists());
    assert!(!staging.exists(), "nothing left behind");

    // A note found at unstage with nothing mounted may record an interrupted format: kept.
    let note = format_note(&fx, &d, &staging);
    unstage(&mut c, "v", &staging).await.unwrap();
    assert!(note.exists());
}

// blkid exits 2 without a word on a disk it cannot read; the reads of both ends catch it.
#[tokio::test]
async fn a_disk_that_cannot_be_read_is_never_formatted() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let Some(d) = fx.unreadable_disk(64 * MIB) else {
        return;
    };
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let staging = fx.path("unreadable");
    refused(
        stage(&mut c, "v", &d, &staging, mount_cap("ext4")).await,
        Code::Internal,
        "cannot read the",
    );
    assert!(!is_mount_point(&staging));
}

// Fix 2: unstage must not unmount the staging mount while publish bind mounts remain.
#[tokio::test]
async fn unstage_refuses_while_the_volume_is_still_published() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let d = fx.disk(64 * MIB);
    let staging = fx.path("gm");
    let target = fx.path("pod/mount");
    stage(&mut c, "v", &d, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    publish(&mut c, "v", &d, &staging, &target, mount_cap("ext4"), false)
        .await
        .unwrap();
    let err = unstage(&mut c, "v", &staging).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("unpublish them first")
            && err.message().contains(target.to_str().unwrap()),
        "{}",
        err.message()
    );
    assert!(is_mount_point(&staging) && is_mount_point(&target));
    unpublish(&mut c, "v", &target).await.unwrap();
    unstage(&mut c, "v", &staging).await.unwrap();
    assert!(!is_mount_point(&staging));
}

// Fix 5: read-only staging (access mode or "ro" flag) never writes: no mkfs, no offline grow.
#[tokio::test]
async fn read_only_staging_never_writes_to_the_disk() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let blank = fx.disk(64 * MIB);
    for (i, cap) in [
        cap_with("ext4", Mode::SingleNodeReaderOnly, &[]),
        cap_with("ext4", Mode::SingleNodeWriter, &["ro"]),
    ]
    .into_iter()
    .enumerate()
    {
        let staging = fx.path(&format!("gm-blank-{i}"));
        refused(
            stage(&mut c, "vb", &blank, &staging, cap).await,
            Code::FailedPrecondition,
            "cannot be staged read-only",
        );
        assert!(!is_mount_point(&staging));
        assert_eq!(blkid_type(&blank.dev), None, "not formatted");
    }

    // An ext4 disk grown offline, staged with the "ro" flag: the growth waits for a
    // read-write stage.
    let mut d = fx.disk(64 * MIB);
    mkfs("ext4", &d.dev);
    let blocks = ext4_block_count(&d.dev);
    fx.grow(&mut d, 128 * MIB);
    let staging = fx.path("gm-ro");
    stage(
        &mut c,
        "vr",
        &d,
        &staging,
        cap_with("ext4", Mode::SingleNodeWriter, &["ro"]),
    )
    .await
    .unwrap();
    let m = lunanode_csi::volumes::mount::mount_at(&staging)
        .unwrap()
        .unwrap();
    assert!(m.read_only(), "{m:?}");
    assert_eq!(
        ext4_block_count(&d.dev),
        blocks,
        "not grown while read-only"
    );
}

// Fix 6: staged again with an incompatible capability → ALREADY_EXISTS, nothing touched.
#[tokio::test]
async fn staging_again_with_an_incompatible_capability_is_already_exists() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let d = fx.disk(64 * MIB);
    let staging = fx.path("gm");
    stage(&mut c, "v", &d, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    std::fs::create_dir(staging.join("sub")).unwrap();
    std::fs::write(staging.join("sub/f"), b"keep").unwrap();
    let before = lunanode_csi::volumes::mount::mount_at(&staging)
        .unwrap()
        .unwrap();

    for cap in [
        cap_with("ext4", Mode::SingleNodeReaderOnly, &["noatime"]),
        cap_with("ext4", Mode::SingleNodeWriter, &["ro"]),
        cap_with("xfs", Mode::SingleNodeWriter, &["noatime"]),
    ] {
        let err = stage(&mut c, "v", &d, &staging, cap.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{cap:?}: {err:?}");
        assert!(
            err.message().contains("incompatible capability"),
            "{}",
            err.message()
        );
    }
    let after = lunanode_csi::volumes::mount::mount_at(&staging)
        .unwrap()
        .unwrap();
    assert_eq!(before, after, "the staging mount is untouched");

    // A staging path holding a bind of a subtree of the disk is not a staged volume.
    let sub_staging = fx.path("gm-sub");
    std::fs::create_dir_all(&sub_staging).unwrap();
    nix::mount::mount(
        Some(&staging.join("sub")),
        &sub_staging,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    refused(
        stage(&mut c, "v2", &d, &sub_staging, mount_cap("ext4")).await,
        Code::AlreadyExists,
        "subtree",
    );
    assert_eq!(std::fs::read(sub_staging.join("f")).unwrap(), b"keep");

    // The same capability again is still fine.
    stage(&mut c, "v", &d, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(staging.join("sub/f")).unwrap(), b"keep");
}

// Fix 8: a block target whose device bind mount is gone names no volume.
#[tokio::test]
async fn block_target_without_its_device_is_not_found() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let d = fx.disk(64 * MIB);
    let staging = fx.path("staging/pv-b");
    let target = fx.path("pods/uid/volumeDevices/pv-b/dev");
    stage(&mut c, "vb", &d, &staging, block_cap())
        .await
        .unwrap();
    publish(&mut c, "vb", &d, &staging, &target, block_cap(), false)
        .await
        .unwrap();
    // The bind mount disappears (e.g. a node reboot), kubelet's placeholder file remains.
    nix::mount::umount2(&target, nix::mount::MntFlags::empty()).unwrap();
    assert!(target.is_file());

    let err = expand(&mut c, "vb", &target, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = c
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "vb".into(),
            volume_path: s(&target),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = stats(&mut c, "vb", &target).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

/// The device mounted at `path`, as the mount table says.
fn mounted_from(path: &Path) -> String {
    lunanode_csi::volumes::mount::mount_at(path)
        .unwrap()
        .expect("mounted")
        .source
}

// The disk may come on IDE/SATA or virtio-scsi instead of virtio-blk (attach target, VM):
// udev then names it otherwise, and the node finds it under those names too.
#[tokio::test]
async fn a_disk_is_found_on_whichever_bus_it_came() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;

    // IDE/SATA through libata: ata-QEMU_HARDDISK_<serial>, and nothing else.
    let ata = fx.disk_unlinked(64 * MIB);
    fx.link_as(&ata, &format!("ata-QEMU_HARDDISK_{}", ata.serial));
    let staging = fx.path("ata");
    stage(&mut c, "vol-ata", &ata, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    assert_eq!(mounted_from(&staging), s(&ata.dev));
    assert_eq!(blkid_type(&ata.dev).as_deref(), Some("ext4"));
    // Publishing double-checks the staged disk through the same name.
    let target = fx.path("pods/ata");
    publish(
        &mut c,
        "vol-ata",
        &ata,
        &staging,
        &target,
        mount_cap("ext4"),
        false,
    )
    .await
    .unwrap();
    assert!(is_mount_point(&target));

    // virtio-scsi carrying the whole identification: found when the controller passes it.
    let scsi = fx.disk_unlinked(64 * MIB);
    let ident = identification_of(&scsi);
    assert_eq!(ident.len(), 36);
    fx.link_as(&scsi, &format!("scsi-0QEMU_QEMU_HARDDISK_{ident}"));
    let staging = fx.path("scsi");
    let mut ctx_full = ctx(&scsi);
    ctx_full.insert(CTX_IDENTIFICATION.into(), ident.clone());
    stage_with(&mut c, "vol-scsi", ctx_full, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    assert_eq!(mounted_from(&staging), s(&scsi.dev));
    // Raw block access finds it the same way.
    let mut ctx_full = ctx(&scsi);
    ctx_full.insert(CTX_IDENTIFICATION.into(), ident.clone());
    let block_target = fx.path("pods/scsi-block");
    c.node_publish_volume(NodePublishVolumeRequest {
        volume_id: "vol-scsi-block".into(),
        publish_context: ctx_full,
        staging_target_path: s(&fx.path("scsi-block-staging")),
        target_path: s(&block_target),
        volume_capability: Some(block_cap()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        std::fs::metadata(&block_target)
            .unwrap()
            .file_type()
            .is_block_device()
    );

    // virtio-blk: the name it always had.
    let virtio = fx.disk_unlinked(64 * MIB);
    fx.link_as(&virtio, &format!("virtio-{}", virtio.serial));
    let staging = fx.path("virtio");
    stage(&mut c, "vol-virtio", &virtio, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    assert_eq!(mounted_from(&staging), s(&virtio.dev));
}

#[tokio::test]
async fn the_whole_identification_is_needed_for_a_name_that_carries_only_it() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_millis(600)).await;
    let d = fx.disk_unlinked(64 * MIB);
    let ident = identification_of(&d);
    fx.link_as(&d, &format!("scsi-SQEMU_QEMU_HARDDISK_{ident}"));
    // Only the serial: that name cannot be known, so the disk is not found (never guessed).
    let staging = fx.path("gm");
    let err = stage(&mut c, "v", &d, &staging, mount_cap("ext4"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // ...and the error shows it under the name it has, with its size.
    assert!(
        err.message().contains(&format!(
            "scsi-SQEMU_QEMU_HARDDISK_{ident} → {} (67108864 bytes",
            d.dev.display()
        )),
        "{}",
        err.message()
    );
    assert_eq!(blkid_type(&d.dev), None);
    let mut with_ident = ctx(&d);
    with_ident.insert(CTX_IDENTIFICATION.into(), ident);
    stage_with(&mut c, "v", with_ident, &staging, mount_cap("ext4"))
        .await
        .unwrap();
    assert_eq!(mounted_from(&staging), s(&d.dev));
}

#[tokio::test]
async fn names_of_one_serial_on_different_disks_are_refused_untouched() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_secs(5)).await;
    let a = fx.disk(64 * MIB);
    let b = fx.disk_unlinked(64 * MIB);
    // udev (or a stale link) gives another disk a name of A's serial.
    let ata_name = format!("ata-QEMU_HARDDISK_{}", a.serial);
    fx.link_as(&b, &ata_name);
    let staging = fx.path("gm");
    let err = stage(&mut c, "vol-a", &a, &staging, mount_cap("ext4"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    for needle in [
        format!("virtio-{} → {}", a.serial, a.dev.display()),
        format!("{ata_name} → {}", b.dev.display()),
        "refusing to guess".to_string(),
    ] {
        assert!(
            err.message().contains(&needle),
            "{needle:?} in {}",
            err.message()
        );
    }
    assert!(!is_mount_point(&staging));
    assert_eq!(blkid_type(&a.dev), None, "A untouched");
    assert_eq!(blkid_type(&b.dev), None, "B untouched");
    // Raw block publishing refuses the same way.
    let err = c
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: "vol-a".into(),
            publish_context: ctx(&a),
            staging_target_path: s(&staging),
            target_path: s(&fx.path("pods/block")),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[tokio::test]
async fn a_missing_disk_says_where_it_looked_and_what_the_node_has() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut c = start(&fx, Duration::from_millis(1500)).await;
    let present = fx.disk(64 * MIB);
    fx.link_as(&present, &format!("virtio-{}-part1", present.serial));
    let ghost = Disk {
        serial: "ghost-ghost-ghost-gh".into(),
        file: PathBuf::new(),
        dev: PathBuf::new(),
        size: 64 * MIB,
    };
    let started = Instant::now();
    let err = stage(
        &mut c,
        "vol-ghost",
        &ghost,
        &fx.path("gm"),
        mount_cap("ext4"),
    )
    .await
    .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let msg = err.message();
    eprintln!("{msg}");
    for needle in [
        format!(
            "no disk with serial ghost-ghost-ghost-gh appeared in {} within 1.5s",
            fx.by_id.display()
        ),
        "virtio-ghost-ghost-ghost-gh".into(),
        "scsi-0QEMU_QEMU_HARDDISK_ghost-ghost-ghost-gh".into(),
        "scsi-SQEMU_QEMU_HARDDISK_ghost-ghost-ghost-gh".into(),
        "ata-QEMU_HARDDISK_ghost-ghost-ghost-gh".into(),
        format!(
            "this node has: virtio-{} → {} (67108864 bytes = 0.06 GiB)",
            present.serial,
            present.dev.display()
        ),
        "--attach-target".into(),
    ] {
        assert!(msg.contains(&needle), "{needle:?} in {msg}");
    }
    assert!(!msg.contains("-part1"), "partitions are not listed: {msg}");
}
