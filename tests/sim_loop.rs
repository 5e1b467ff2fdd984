//! The loop backing, end to end: real loop devices behind the by-id links udev makes for a
//! disk on the attachment's bus (`virtio-<serial>`, `ata-QEMU_HARDDISK_<serial>`,
//! `scsi-0QEMU_QEMU_HARDDISK_<serial>`).
//! Needs root and loop devices; elsewhere each test prints why it is skipped.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use lunanode_csi::sim::{Backing, Bus, SimConfig, SimHandle, VmSpec, link_name_on, loop_available};
use serde_json::{Value, json};
use sha2::Sha512;

const GIB: u64 = 1 << 30;

struct Api {
    http: reqwest::Client,
    url: String,
    id: String,
    key: String,
    nonce: AtomicU64,
}

impl Api {
    fn new(h: &SimHandle) -> Self {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            url: h.url.clone(),
            id: h.api_id.clone(),
            key: h.api_key.clone(),
            nonce: AtomicU64::new(1_700_000_000),
        }
    }

    /// Call and expect `success: yes`.
    async fn ok(&self, handler: &str, params: &[(&str, &str)]) -> Value {
        let b = self.call(handler, params).await;
        assert_eq!(b["success"], "yes", "{handler} {params:?}: {b}");
        b
    }

    async fn call(&self, handler: &str, params: &[(&str, &str)]) -> Value {
        let mut m = serde_json::Map::new();
        for (k, v) in params {
            m.insert(k.to_string(), json!(v));
        }
        m.insert("api_id".into(), json!(self.id));
        m.insert("api_partialkey".into(), json!(&self.key[..64]));
        let req = Value::Object(m).to_string();
        let nonce = self.nonce.fetch_add(1, Ordering::SeqCst).to_string();
        let mut mac = Hmac::<Sha512>::new_from_slice(self.key.as_bytes()).unwrap();
        mac.update(format!("{handler}/|{req}|{nonce}").as_bytes());
        let sig = hex::encode(mac.finalize().into_bytes());
        let resp = self
            .http
            .post(format!("{}{handler}/", self.url))
            .form(&[
                ("req", req.as_str()),
                ("signature", &sig),
                ("nonce", &nonce),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        serde_json::from_str(&resp.text().await.unwrap()).unwrap()
    }

    async fn create(&self, params: &[(&str, &str)]) -> String {
        self.ok("volume/create", params).await["volume_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn identification(&self, id: &str) -> String {
        self.ok("volume/info", &[("volume_id", id)]).await["volume"]["identification"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Attach on virtio (`target=/dev/vda`, as the driver does).
    async fn attach(&self, id: &str, vm: &str) {
        self.attach_on(id, vm, "/dev/vda").await;
    }

    async fn attach_on(&self, id: &str, vm: &str, target: &str) {
        self.ok(
            "volume/attach",
            &[("volume_id", id), ("vm_id", vm), ("target", target)],
        )
        .await;
    }
}

fn skip() -> bool {
    if loop_available() {
        false
    } else {
        println!("skipped: needs root and loop devices");
        true
    }
}

/// The virtio link of a volume.
fn link_for(h: &SimHandle, identification: &str) -> PathBuf {
    h.by_id_dir
        .join(format!("virtio-{}", &identification[..20]))
}

/// The names in the by-id directory.
fn links(h: &SimHandle) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(&h.by_id_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn size_of_device(dev: &Path) -> u64 {
    let out = Command::new("blockdev")
        .arg("--getsize64")
        .arg(dev)
        .output()
        .expect("blockdev runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The device a by-id link points to; checks it is a block device.
fn device_behind(link: &Path) -> PathBuf {
    let target = std::fs::read_link(link).unwrap_or_else(|e| panic!("{}: {e}", link.display()));
    let meta = std::fs::metadata(&target).unwrap();
    assert!(
        meta.file_type().is_block_device(),
        "{} is not a block device",
        target.display()
    );
    target
}

fn write_at(dev: &Path, off: u64, data: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read_at(dev: &Path, off: u64, n: usize) -> Vec<u8> {
    let mut f = File::open(dev).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut buf = vec![0; n];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn loops_of(file: &Path) -> String {
    let out = Command::new("losetup")
        .arg("-j")
        .arg(file)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn config(state_dir: &Path) -> SimConfig {
    SimConfig {
        backing: Backing::Loop,
        state_dir: state_dir.to_path_buf(),
        vms: vec![
            VmSpec {
                region: "toronto".into(),
                name: Some("node-t".into()),
            },
            VmSpec {
                region: "roubaix".into(),
                name: Some("node-r".into()),
            },
        ],
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn loop_volumes_carry_data_through_snapshots_and_images() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let h = SimHandle::start(config(dir.path())).await.unwrap();
    let api = Api::new(&h);
    let (tor, rbx) = (h.vms[0].id.clone(), h.vms[1].id.clone());

    // Attach: a by-id link to a block device of the volume's size.
    let vol = api
        .create(&[("region", "toronto"), ("label", "data"), ("size", "2")])
        .await;
    let ident = api.identification(&vol).await;
    let link = link_for(&h, &ident);
    assert!(!link.exists());
    api.attach(&vol, &tor).await;
    let dev = device_behind(&link);
    assert_eq!(size_of_device(&dev), 2 * GIB);
    let st = h.state();
    assert_eq!(st.volumes[0].device.as_deref(), Some(dev.to_str().unwrap()));
    assert_eq!(st.volumes[0].link.as_deref(), Some(link.to_str().unwrap()));
    let vol_file = dir.path().join(format!("volumes/vol-{vol}.img"));
    assert!(loops_of(&vol_file).contains(dev.to_str().unwrap()));

    // Write at 0 and at 1 GiB, then snapshot (while attached) and replicate to roubaix.
    write_at(&link, 0, b"first bytes");
    write_at(&link, GIB, b"one gig in");
    let sid = api
        .ok(
            "volume/snapshot-create",
            &[("volume_id", &vol), ("label", "s")],
        )
        .await["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    let img = api
        .ok(
            "volume/snapshot-replicate",
            &[
                ("region", "toronto"),
                ("snapshot_id", &sid),
                ("image_name", "i"),
                ("dst_region", "roubaix"),
            ],
        )
        .await["image_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Extend needs a detached volume, and grows the device on the next attach.
    let refused = api
        .call("volume/extend", &[("volume_id", &vol), ("size", "3")])
        .await;
    assert_eq!(refused["success"], "no");
    api.ok("volume/detach", &[("volume_id", &vol)]).await;
    assert!(
        !link.exists() && std::fs::symlink_metadata(&link).is_err(),
        "link left after detach"
    );
    assert_eq!(loops_of(&vol_file), "", "loop device left after detach");
    api.ok("volume/extend", &[("volume_id", &vol), ("size", "3")])
        .await;
    api.attach(&vol, &tor).await;
    let dev = device_behind(&link);
    assert_eq!(size_of_device(&dev), 3 * GIB);
    assert_eq!(read_at(&link, GIB, 10), b"one gig in");

    // A volume from the snapshot (bigger than the source) has the bytes.
    let from_snap = api
        .create(&[
            ("region", "toronto"),
            ("label", "fs"),
            ("size", "3"),
            ("snapshot_id", &sid),
        ])
        .await;
    api.attach(&from_snap, &tor).await;
    let l2 = link_for(&h, &api.identification(&from_snap).await);
    assert_eq!(size_of_device(&device_behind(&l2)), 3 * GIB);
    assert_eq!(read_at(&l2, 0, 11), b"first bytes");
    assert_eq!(read_at(&l2, GIB, 10), b"one gig in");

    // So does a volume from the image in the other region.
    let from_img = api
        .create(&[
            ("region", "roubaix"),
            ("label", "fi"),
            ("size", "2"),
            ("image", &img),
        ])
        .await;
    api.attach(&from_img, &rbx).await;
    let l3 = link_for(&h, &api.identification(&from_img).await);
    assert_eq!(size_of_device(&device_behind(&l3)), 2 * GIB);
    assert_eq!(read_at(&l3, 0, 11), b"first bytes");
    assert_eq!(read_at(&l3, GIB, 10), b"one gig in");

    // Copies are sparse: a few written blocks, not gigabytes.
    for f in ["snapshots", "images", "volumes"] {
        for e in std::fs::read_dir(dir.path().join(f)).unwrap() {
            use std::os::unix::fs::MetadataExt;
            let m = e.unwrap().metadata().unwrap();
            assert!(m.blocks() * 512 < 64 << 20, "{f} copy is not sparse");
        }
    }

    // Delete removes the file (after detach); the snapshot and image files go with theirs.
    api.ok("volume/detach", &[("volume_id", &from_img)]).await;
    api.ok("volume/delete", &[("volume_id", &from_img)]).await;
    assert!(
        !dir.path()
            .join(format!("volumes/vol-{from_img}.img"))
            .exists()
    );
    api.ok("image/delete", &[("image_id", &img)]).await;
    assert!(!dir.path().join(format!("images/{img}.img")).exists());
    api.ok(
        "volume/snapshot-delete",
        &[("region", "toronto"), ("snapshot_id", &sid)],
    )
    .await;
    assert!(!dir.path().join(format!("snapshots/{sid}.img")).exists());

    // Shutdown detaches everything still attached and removes the links.
    let files: Vec<PathBuf> = [&vol, &from_snap]
        .iter()
        .map(|v| dir.path().join(format!("volumes/vol-{v}.img")))
        .collect();
    h.shutdown().await;
    for f in &files {
        assert_eq!(loops_of(f), "", "loop device left for {}", f.display());
    }
    assert!(std::fs::symlink_metadata(&link).is_err());
    assert!(std::fs::symlink_metadata(&l2).is_err());
}

#[tokio::test]
async fn a_dropped_handle_still_cleans_up() {
    if skip() {
        return;
    }
    let h = SimHandle::start(SimConfig {
        state_dir: PathBuf::new(),
        ..config(Path::new("/unused"))
    })
    .await
    .unwrap();
    let api = Api::new(&h);
    let vol = api
        .create(&[("region", "toronto"), ("label", "d"), ("size", "1")])
        .await;
    api.attach_on(&vol, &h.vms[0].id.clone(), "auto").await;
    let link = h
        .by_id_dir
        .join(link_name_on(Bus::Ide, &api.identification(&vol).await));
    let dev = device_behind(&link);
    let state_dir = h.state_dir().to_path_buf();
    let file = state_dir.join(format!("volumes/vol-{vol}.img"));
    assert!(loops_of(&file).contains(dev.to_str().unwrap()));
    drop(h);
    assert!(std::fs::symlink_metadata(&link).is_err());
    assert!(!state_dir.exists(), "temporary state dir left behind");
    // The device no longer has a backing file.
    let out = Command::new("losetup").arg(&dev).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(file.to_str().unwrap()));
}

#[tokio::test]
async fn the_link_is_the_one_udev_makes_on_the_bus() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let h = SimHandle::start(SimConfig {
        vm_buses: vec![None, Some(Bus::Virtio)],
        ..config(dir.path())
    })
    .await
    .unwrap();
    let api = Api::new(&h);
    let vm = h.vms[0].id.clone();
    assert_eq!(h.vms[0].bus, Bus::Ide, "the likely default: IDE disks");
    let vol = api
        .create(&[("region", "toronto"), ("label", "b"), ("size", "1")])
        .await;
    let ident = api.identification(&vol).await;
    let file = dir.path().join(format!("volumes/vol-{vol}.img"));
    for (target, bus, name) in [
        (
            "auto",
            Bus::Ide,
            format!("ata-QEMU_HARDDISK_{}", &ident[..20]),
        ),
        ("/dev/vda", Bus::Virtio, format!("virtio-{}", &ident[..20])),
        (
            "/dev/sdb",
            Bus::Scsi,
            format!("scsi-0QEMU_QEMU_HARDDISK_{ident}"),
        ),
        (
            "/dev/hdb",
            Bus::Ide,
            format!("ata-QEMU_HARDDISK_{}", &ident[..20]),
        ),
    ] {
        assert_eq!(link_name_on(bus, &ident), name);
        api.attach_on(&vol, &vm, target).await;
        // Exactly that link (an IDE disk has no virtio- link), to the volume's device.
        assert_eq!(links(&h), std::slice::from_ref(&name), "{target}");
        let link = h.by_id_dir.join(&name);
        let dev = device_behind(&link);
        assert!(loops_of(&file).contains(dev.to_str().unwrap()));
        assert_eq!(size_of_device(&dev), GIB);
        let st = h.state();
        assert_eq!(st.volumes[0].bus.as_deref(), Some(bus.as_str()));
        assert_eq!(st.volumes[0].link.as_deref(), Some(link.to_str().unwrap()));
        write_at(&link, 0, target.as_bytes());
        api.ok("volume/detach", &[("volume_id", &vol)]).await;
        assert!(
            links(&h).is_empty(),
            "link left after detach: {:?}",
            links(&h)
        );
        assert_eq!(loops_of(&file), "", "loop device left after detach");
        assert_eq!(h.state().volumes[0].bus, None);
    }
    // A VM created with virtio disks attaches auto on virtio.
    assert_eq!(h.vms[1].bus, Bus::Virtio);
    let virtio_vm = h.add_vm_on("toronto", Some("v"), Bus::Virtio).unwrap();
    api.attach_on(&vol, &virtio_vm.id, "auto").await;
    assert_eq!(links(&h), [format!("virtio-{}", &ident[..20])]);
    assert_eq!(read_at(&link_for(&h, &ident), 0, 8), b"/dev/hdb");
    h.shutdown().await;
    assert!(
        std::fs::read_dir(dir.path().join("by-id"))
            .unwrap()
            .next()
            .is_none()
    );
}
