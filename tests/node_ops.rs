//! The node's OS operations (`lunanode_csi::volumes`) on real loop devices, as root.

#[path = "node_common.rs"]
mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::*;
use lunanode_csi::volumes::mount::{self, MountOptions};
use lunanode_csi::volumes::{
    DeviceWait, DiskId, Probe, VolumeError, device, fs, probe, resize, stats,
};
use nix::mount::MsFlags;

fn id(serial: &str) -> DiskId {
    DiskId {
        serial: serial.to_string(),
        identification: None,
    }
}

fn wait(ms: u64) -> DeviceWait {
    DeviceWait {
        timeout: Duration::from_millis(ms),
        initial: Duration::from_millis(20),
        max_interval: Duration::from_millis(200),
    }
}

#[test]
fn finds_and_verifies_the_device_by_serial() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let d = fx.disk(64 * MIB);
    let found = device::find(&fx.by_id, &id(&d.serial), Some(d.size), &wait(1000)).unwrap();
    assert_eq!(found.path, d.dev);
    assert_eq!(found.size, 64 * MIB);
    assert_eq!(found.rdev, std::fs::metadata(&d.dev).unwrap().rdev());

    // Wrong size: refused, clearly.
    let err = device::find(&fx.by_id, &id(&d.serial), Some(d.size * 2), &wait(1000)).unwrap_err();
    assert!(matches!(err, VolumeError::DeviceMismatch { .. }), "{err}");
    assert!(err.to_string().contains("size"), "{err}");
}

#[test]
fn a_device_that_appears_late_is_found() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let d = fx.disk_unlinked(64 * MIB);
    let link = fx.by_id.join(format!("virtio-{}", d.serial));
    let target = d.dev.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        std::os::unix::fs::symlink(target, link).unwrap();
    });
    let started = Instant::now();
    let found = device::find(&fx.by_id, &id(&d.serial), Some(d.size), &wait(10_000)).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(found.path, d.dev);
    t.join().unwrap();
}

#[test]
fn a_missing_device_fails_after_the_bound() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let started = Instant::now();
    let err = device::find(
        &fx.by_id,
        &id("nope-nope-nope-nope0"),
        Some(MIB),
        &wait(700),
    )
    .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, VolumeError::DeviceNotFound { .. }), "{err}");
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(err.to_string().contains("attached"), "{err}");
}

#[test]
fn probe_tells_blank_filesystem_and_partition_table_apart() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let blank = fx.disk(64 * MIB);
    assert_eq!(probe::probe(&blank.dev).unwrap(), Probe::Blank);

    let ext4 = fx.disk(64 * MIB);
    mkfs("ext4", &ext4.dev);
    assert_eq!(
        probe::probe(&ext4.dev).unwrap(),
        Probe::Filesystem("ext4".into())
    );

    let pt = fx.disk(64 * MIB);
    write_mbr(&pt.dev);
    assert_eq!(
        probe::probe(&pt.dev).unwrap(),
        Probe::PartitionTable("dos".into())
    );

    if have("mkfs.xfs") {
        let xfs = fx.disk(512 * MIB);
        mkfs("xfs", &xfs.dev);
        assert_eq!(
            probe::probe(&xfs.dev).unwrap(),
            Probe::Filesystem("xfs".into())
        );
    }
}

#[test]
fn format_mount_bind_readonly_and_unmount() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let d = fx.disk(64 * MIB);
    fs::format(&d.dev, "ext4").unwrap();
    assert_eq!(blkid_type(&d.dev).as_deref(), Some("ext4"));

    let staging = fx.path("staging");
    mount::ensure_dir(&staging).unwrap();
    let opts = MountOptions::parse(&["noatime"]).unwrap();
    mount::mount_fs(&d.dev, &staging, "ext4", &opts).unwrap();
    let m = mount::mount_at(&staging).unwrap().expect("staged");
    assert!(m.is_device(std::fs::metadata(&d.dev).unwrap().rdev()));
    assert_eq!(m.fs_type, "ext4");
    assert!(m.options.contains("noatime"), "{}", m.options);
    std::fs::write(staging.join("hello"), b"world").unwrap();

    // A read-only bind: same source, writes fail with EROFS.
    let ro = fx.path("pods/ro target");
    mount::ensure_dir(&ro).unwrap();
    mount::bind(&staging, &ro, MsFlags::MS_RDONLY).unwrap();
    let rm = mount::mount_at(&ro).unwrap().expect("bound");
    assert!(rm.read_only() && rm.same_source(&m));
    assert_eq!(std::fs::read(ro.join("hello")).unwrap(), b"world");
    let err = std::fs::write(ro.join("x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS));

    // A busy mount is reported busy, never forced.
    let busy = std::fs::File::open(ro.join("hello")).unwrap();
    let cwd_holder = std::process::Command::new("sleep")
        .arg("30")
        .current_dir(&ro)
        .spawn()
        .unwrap();
    let err = mount::unmount(&ro).unwrap_err();
    assert!(matches!(err, VolumeError::Busy { .. }), "{err}");
    assert!(is_mount_point(&ro));
    let mut cwd_holder = cwd_holder;
    cwd_holder.kill().unwrap();
    cwd_holder.wait().unwrap();
    drop(busy);

    // The holders are gone, but a test running beside this one may fork between our open
    // and close and carry the file into its child until that child execs: the mount can
    // stay busy for a moment (seen once in a full run). Only that moment is waited out.
    let mut tries = 0;
    let unmounted = loop {
        match mount::unmount(&ro) {
            Err(VolumeError::Busy { .. }) if tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => break other.unwrap(),
        }
    };
    assert!(unmounted);
    assert!(!mount::unmount(&ro).unwrap());
    mount::remove_target(&ro).unwrap();
    assert!(!ro.exists());
    assert!(mount::unmount(&staging).unwrap());
    assert!(!is_mount_point(&staging));
}

#[test]
fn stats_match_statvfs_and_device_size() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let d = fx.disk(128 * MIB);
    fs::format(&d.dev, "ext4").unwrap();
    let dir = fx.path("mnt");
    mount::ensure_dir(&dir).unwrap();
    mount::mount_fs(&d.dev, &dir, "ext4", &MountOptions::default()).unwrap();
    std::fs::write(dir.join("blob"), vec![7u8; 8 << 20]).unwrap();
    nix::unistd::sync();
    let s = stats::fs_stats(&dir).unwrap();
    let v = nix::sys::statvfs::statvfs(&dir).unwrap();
    assert_eq!(s.bytes_total, v.blocks() as u64 * v.fragment_size() as u64);
    assert_eq!(s.inodes_total, v.files() as u64);
    // Within filesystem overhead of the device size.
    assert!(
        s.bytes_total <= 128 * MIB && s.bytes_total > 100 * MIB,
        "{s:?}"
    );
    assert!(s.bytes_used >= 8 << 20, "{s:?}");
    assert!(
        s.inodes_used >= 12 && s.inodes_used < s.inodes_total,
        "{s:?}"
    );
    assert_eq!(stats::block_size(&d.dev).unwrap(), 128 * MIB);
}

fn grow_case(fs_type: &str, size: u64, new_size: u64) {
    let fx = Fixture::new();
    let mut d = fx.disk(size);
    fs::format(&d.dev, fs_type).unwrap();
    let dir = fx.path("mnt");
    mount::ensure_dir(&dir).unwrap();
    mount::mount_fs(&d.dev, &dir, fs_type, &MountOptions::default()).unwrap();
    let before = resize::report(fs_type, &d.dev, &dir).unwrap();
    assert!(!before.needs_grow(), "{before:?}");
    assert!(
        before.fs_bytes <= size && before.fs_bytes > size - 16 * MIB,
        "{before:?}"
    );

    fx.grow(&mut d, new_size);
    let mid = resize::report(fs_type, &d.dev, &dir).unwrap();
    assert_eq!(mid.device_bytes, new_size);
    assert!(mid.needs_grow(), "{mid:?}");

    let after = resize::grow_if_needed(fs_type, &d.dev, &dir).unwrap();
    assert!(!after.needs_grow(), "{after:?}");
    assert!(after.fs_bytes > new_size - 16 * MIB, "{after:?}");
    let s = stats::fs_stats(&dir).unwrap();
    assert!(s.bytes_total > size, "{s:?}");
    // Growing again is a no-op.
    assert_eq!(
        resize::grow_if_needed(fs_type, &d.dev, &dir).unwrap(),
        after
    );
}

#[test]
fn grows_ext4_online() {
    if !can_run() || !can_resize_ext4_online() {
        return;
    }
    grow_case("ext4", 64 * MIB, 160 * MIB);
}

#[test]
fn grows_xfs_online() {
    if !can_run() || !have("mkfs.xfs") {
        return;
    }
    grow_case("xfs", 512 * MIB, 1024 * MIB);
}

#[test]
fn ext4_resize_without_cap_sys_resource_says_why() {
    if !can_run() || can_resize_ext4_online() {
        return;
    }
    let fx = Fixture::new();
    let mut d = fx.disk(64 * MIB);
    fs::format(&d.dev, "ext4").unwrap();
    let dir = fx.path("mnt");
    mount::ensure_dir(&dir).unwrap();
    mount::mount_fs(&d.dev, &dir, "ext4", &MountOptions::default()).unwrap();
    fx.grow(&mut d, 128 * MIB);
    let err = resize::grow_if_needed("ext4", &d.dev, &dir).unwrap_err();
    assert!(err.to_string().contains("CAP_SYS_RESOURCE"), "{err}");
}

#[test]
fn ext4_grows_offline_before_mounting() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let mut d = fx.disk(64 * MIB);
    fs::format(&d.dev, "ext4").unwrap();
    put_file("ext4", &d.dev, &fx.path("tmpmnt"), "keep", b"data");
    fx.grow(&mut d, 128 * MIB);
    // Refused while mounted.
    let dir = fx.path("mnt");
    mount::ensure_dir(&dir).unwrap();
    mount::mount_fs(&d.dev, &dir, "ext4", &MountOptions::default()).unwrap();
    let err = resize::grow_ext4_offline(&d.dev).unwrap_err();
    assert!(matches!(err, VolumeError::Busy { .. }), "{err}");
    mount::unmount(&dir).unwrap();

    let after = resize::grow_ext4_offline(&d.dev).unwrap();
    assert!(!after.needs_grow(), "{after:?}");
    assert!(after.fs_bytes > 120 * MIB, "{after:?}");
    mount::mount_fs(&d.dev, &dir, "ext4", &MountOptions::default()).unwrap();
    assert_eq!(std::fs::read(dir.join("keep")).unwrap(), b"data");
}

/// Write `bytes` at `offset` of a device through the page cache; `sync` flushes them to the
/// device, without it they are only dirty pages (which a direct read must still see).
fn write_at(dev: &std::path::Path, offset: u64, bytes: &[u8], sync: bool) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    if sync {
        f.sync_all().unwrap();
    }
}

fn not_blank_no_signature(r: Result<Probe, VolumeError>) -> bool {
    matches!(&r, Err(VolumeError::NotBlank { what, .. }) if what.contains("no known signature"))
}

#[test]
fn one_byte_anywhere_in_the_first_mib_is_not_blank() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    for (offset, sync) in [
        (0, true),
        (4095, true),
        (512 * 1024 + 3, true),
        (MIB - 1, true),
        // Only in the page cache, not yet on the device: seen all the same.
        (MIB - 1, false),
        (77_777, false),
    ] {
        let d = fx.disk(64 * MIB);
        assert_eq!(probe::probe(&d.dev).unwrap(), Probe::Blank);
        write_at(&d.dev, offset, &[0x01], sync);
        assert_eq!(blkid_type(&d.dev), None, "no signature in one byte");
        let r = probe::probe(&d.dev);
        let shown = format!("{r:?}");
        assert!(
            not_blank_no_signature(r),
            "byte at {offset} (synced {sync}): {shown}"
        );
        assert_eq!(
            probe::read_ends(&d.dev).unwrap(),
            probe::Ends { head_zero: false }
        );
    }
}

#[test]
fn four_k_sector_devices_are_read_too() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let d = fx.disk_unlinked_with(64 * MIB, &["--sector-size", "4096"]);
    assert_eq!(probe::probe(&d.dev).unwrap(), Probe::Blank);
    write_at(&d.dev, MIB - 4096, &[0xff; 4096], true);
    assert!(not_blank_no_signature(probe::probe(&d.dev)));
    let e = fx.disk_unlinked_with(64 * MIB, &["--sector-size", "4096"]);
    mkfs("ext4", &e.dev);
    assert_eq!(
        probe::probe(&e.dev).unwrap(),
        Probe::Filesystem("ext4".into())
    );
}

#[test]
fn a_device_smaller_than_the_checked_ends_is_not_blank() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let d = fx.disk(512 * 1024);
    assert_eq!(blkid_type(&d.dev), None);
    let r = probe::probe(&d.dev);
    assert!(matches!(r, Err(VolumeError::Io { .. })), "{r:?}");
}

#[test]
fn a_device_that_cannot_be_read_is_not_blank() {
    if !can_run() {
        return;
    }
    let fx = Fixture::new();
    let Some(d) = fx.unreadable_disk(64 * MIB) else {
        return;
    };
    // blkid alone cannot tell: on this device it exits 2 ("nothing found") and says
    // nothing (util-linux 2.38), which is why both ends are read as well.
    let out = std::process::Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(&d.dev)
        .output()
        .unwrap();
    eprintln!(
        "blkid on an unreadable device: {:?}, stdout {:?}, stderr {:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r = probe::probe(&d.dev);
    assert!(r.is_err(), "{r:?}");
    let r = probe::read_ends(&d.dev);
    assert!(
        matches!(&r, Err(VolumeError::Io { source, .. }) if source.raw_os_error() == Some(nix::libc::EIO)),
        "{r:?}"
    );
}
