//! Finding the attached disk of a volume by its stable identity, and verifying it.
//!
//! KVM exposes a virtio disk's serial (the first 20 characters of the storage-layer volume
//! identification) and udev links it as `<by-id dir>/virtio-<serial>`. That link is the only
//! way a volume's device is found: never device letters or attach order. The link is
//! resolved, the target must be a block device, its size must match the volume's, and its
//! kernel-reported serial (when sysfs has one) must match the serial it was looked up by.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::VolumeError;

/// Length of a virtio serial: KVM truncates the volume identification to 20 characters.
pub const SERIAL_LEN: usize = 20;

/// The virtio serial for a volume identification (its first 20 characters).
pub fn serial_for(identification: &str) -> String {
    identification.chars().take(SERIAL_LEN).collect()
}

/// The by-id link udev creates for a virtio disk with this serial.
pub fn by_id_link(by_id_dir: &Path, serial: &str) -> PathBuf {
    by_id_dir.join(format!("virtio-{serial}"))
}

/// A serial is used as a file name: refuse anything that could escape the by-id directory.
pub fn valid_serial(serial: &str) -> bool {
    !serial.is_empty()
        && serial.len() <= 64
        && serial
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && serial != "."
        && serial != ".."
}

/// How long, and how often, to wait for a device link to appear: exponential backoff from
/// `initial`, doubling, capped at `max_interval`, giving up after `timeout` in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceWait {
    pub timeout: Duration,
    pub initial: Duration,
    pub max_interval: Duration,
}

impl DeviceWait {
    /// Backoff from 100 ms up to 2 s between checks, for at most `timeout`.
    pub fn with_timeout(timeout: Duration) -> Self {
        DeviceWait {
            timeout,
            initial: Duration::from_millis(100),
            max_interval: Duration::from_secs(2),
        }
    }
}

impl Default for DeviceWait {
    fn default() -> Self {
        DeviceWait::with_timeout(Duration::from_secs(30))
    }
}

/// A verified block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The by-id link it was found through.
    pub link: PathBuf,
    /// The resolved device node (e.g. `/dev/vdc`).
    pub path: PathBuf,
    /// Its device number (`st_rdev`), which is what mount tables record.
    pub rdev: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// The size in bytes of a block device (or file), by seeking to its end.
pub fn device_size(path: &Path) -> Result<u64, VolumeError> {
    let mut f = File::open(path)
        .map_err(|e| VolumeError::io(format!("cannot open {}", path.display()), e))?;
    f.seek(SeekFrom::End(0))
        .map_err(|e| VolumeError::io(format!("cannot read the size of {}", path.display()), e))
}

/// Major and minor numbers of a device number.
pub fn major_minor(rdev: u64) -> (u64, u64) {
    (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
}

/// Where the kernel exposes block devices by number (`<root>/dev/block/<maj>:<min>`).
pub const SYSFS_ROOT: &str = "/sys";

/// Compare the serial the kernel reports for the device with the one we looked it up by.
/// virtio-blk exposes `serial` in sysfs; a by-id link can be stale (udev lagging after a
/// detach/attach), and a size match alone does not tell two equal-sized volumes apart.
/// Devices without the file (loop devices, other drivers) are not checked.
pub fn check_serial(sysfs_root: &Path, rdev: u64, expected: &str) -> Result<(), String> {
    let (maj, min) = major_minor(rdev);
    let file = sysfs_root.join(format!("dev/block/{maj}:{min}/serial"));
    let found = match std::fs::read_to_string(&file) {
        Ok(found) => found,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        // The kernel has a serial for it but we cannot read it: unverified is not verified.
        Err(e) => {
            return Err(format!(
                "cannot read its serial from {}: {e}",
                file.display()
            ));
        }
    };
    // KVM truncates the serial to 20 characters; sysfs may pad or end it with a newline.
    let norm = |s: &str| {
        s.trim()
            .chars()
            .take(SERIAL_LEN)
            .collect::<String>()
            .trim()
            .to_string()
    };
    let (found, want) = (norm(&found), norm(expected));
    if found == want {
        Ok(())
    } else {
        Err(format!(
            "its virtio serial is {found:?} but the volume's is {want:?}"
        ))
    }
}

/// Resolve `link` and verify it is a block device of `expected_size` bytes (when given).
pub fn inspect(link: &Path, expected_size: Option<u64>) -> Result<Device, VolumeError> {
    inspect_in(Path::new(SYSFS_ROOT), link, expected_size, None)
}

/// [`inspect`], also checking the kernel's serial for the device (when it has one) against
/// `expected_serial`, with sysfs at `sysfs_root`.
fn inspect_in(
    sysfs_root: &Path,
    link: &Path,
    expected_size: Option<u64>,
    expected_serial: Option<&str>,
) -> Result<Device, VolumeError> {
    let path = std::fs::canonicalize(link)
        .map_err(|e| VolumeError::io(format!("cannot resolve {}", link.display()), e))?;
    let meta = std::fs::metadata(&path)
        .map_err(|e| VolumeError::io(format!("cannot stat {}", path.display()), e))?;
    if !meta.file_type().is_block_device() {
        return Err(VolumeError::DeviceMismatch {
            device: path,
            reason: format!("{} does not resolve to a block device", link.display()),
        });
    }
    let size = device_size(&path)?;
    if let Some(expected) = expected_size
        && size != expected
    {
        return Err(VolumeError::DeviceMismatch {
            device: path,
            reason: format!("its size is {size} bytes but the volume is {expected} bytes"),
        });
    }
    if let Some(serial) = expected_serial {
        check_serial(sysfs_root, meta.rdev(), serial).map_err(|reason| {
            VolumeError::DeviceMismatch {
                device: path.clone(),
                reason,
            }
        })?;
    }
    Ok(Device {
        link: link.to_path_buf(),
        path,
        rdev: meta.rdev(),
        size,
    })
}

/// Wait (blocking, with bounded backoff) for `<by_id_dir>/virtio-<serial>` to appear, then
/// resolve and verify it. Run this on a blocking thread.
pub fn find(
    by_id_dir: &Path,
    serial: &str,
    expected_size: Option<u64>,
    wait: &DeviceWait,
) -> Result<Device, VolumeError> {
    let link = by_id_link(by_id_dir, serial);
    if !valid_serial(serial) {
        return Err(VolumeError::DeviceMismatch {
            device: link,
            reason: format!("{serial:?} is not a valid virtio serial"),
        });
    }
    let started = Instant::now();
    let mut interval = wait.initial.max(Duration::from_millis(1));
    loop {
        match std::fs::symlink_metadata(&link) {
            // The link exists; a dangling link (udev mid-update) counts as not there yet.
            Ok(_) if link.exists() => {
                return inspect_in(Path::new(SYSFS_ROOT), &link, expected_size, Some(serial));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(VolumeError::io(
                    format!("cannot stat {}", link.display()),
                    e,
                ));
            }
        }
        let waited = started.elapsed();
        if waited >= wait.timeout {
            return Err(VolumeError::DeviceNotFound {
                serial: serial.to_string(),
                path: link,
                waited,
            });
        }
        std::thread::sleep(interval.min(wait.timeout - waited));
        interval = (interval * 2).min(wait.max_interval);
    }
}

/// Check that `dev.link` still resolves to the same device number as when it was found.
/// Called right before a destructive step (mkfs): between finding the disk and formatting it
/// (a probe, possibly a long wait) udev may have re-pointed the link at another disk.
pub fn still_same(dev: &Device) -> Result<(), VolumeError> {
    let now = std::fs::metadata(&dev.link)
        .map_err(|e| VolumeError::io(format!("cannot stat {}", dev.link.display()), e))?;
    if now.rdev() != dev.rdev {
        let (a, b) = major_minor(dev.rdev);
        let (c, d) = major_minor(now.rdev());
        return Err(VolumeError::DeviceMismatch {
            device: dev.path.clone(),
            reason: format!(
                "{} pointed at device {a}:{b} when it was found but now points at {c}:{d}",
                dev.link.display()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_is_first_20_chars() {
        assert_eq!(
            serial_for("6a3b1f0e-2c4d-4e5f-8a9b-0c1d2e3f4a5b"),
            "6a3b1f0e-2c4d-4e5f-8"
        );
        assert_eq!(serial_for("short"), "short");
        assert_eq!(
            by_id_link(Path::new("/dev/disk/by-id"), "abc"),
            Path::new("/dev/disk/by-id/virtio-abc")
        );
    }

    #[test]
    fn serials_cannot_escape_the_directory() {
        assert!(valid_serial("6a3b1f0e-2c4d-4e5f-8"));
        for bad in ["", "..", "a/b", "../../etc", "a b", "x\n"] {
            assert!(!valid_serial(bad), "{bad:?}");
        }
    }

    #[test]
    fn missing_link_fails_after_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let wait = DeviceWait {
            timeout: Duration::from_millis(300),
            initial: Duration::from_millis(10),
            max_interval: Duration::from_millis(50),
        };
        let started = Instant::now();
        let err = find(dir.path(), "abc", None, &wait).unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, VolumeError::DeviceNotFound { .. }), "{err}");
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert!(err.to_string().contains("virtio-abc"));
    }

    #[test]
    fn a_regular_file_is_not_a_device() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        std::fs::write(&file, vec![0u8; 4096]).unwrap();
        std::os::unix::fs::symlink(&file, dir.path().join("virtio-abc")).unwrap();
        let err = find(dir.path(), "abc", Some(4096), &DeviceWait::default()).unwrap_err();
        assert!(matches!(err, VolumeError::DeviceMismatch { .. }), "{err}");
    }

    #[test]
    fn kernel_serial_must_match_when_sysfs_has_one() {
        let sys = tempfile::tempdir().unwrap();
        let rdev = nix::sys::stat::makedev(252, 16);
        // No serial file (loop devices): nothing to compare.
        assert!(check_serial(sys.path(), rdev, "6a3b1f0e-2c4d-4e5f-8").is_ok());
        let dir = sys.path().join("dev/block/252:16");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("serial"), "6a3b1f0e-2c4d-4e5f-8\n").unwrap();
        assert!(check_serial(sys.path(), rdev, "6a3b1f0e-2c4d-4e5f-8").is_ok());
        // Only the first 20 characters count (KVM truncates), whitespace trimmed.
        assert!(check_serial(sys.path(), rdev, " 6a3b1f0e-2c4d-4e5f-8a9b-0c1d ").is_ok());
        let err = check_serial(sys.path(), rdev, "ffffffff-2c4d-4e5f-8").unwrap_err();
        assert!(err.contains("6a3b1f0e-2c4d-4e5f-8"), "{err}");
        // Another device number has no serial file: not checked.
        assert!(check_serial(sys.path(), nix::sys::stat::makedev(252, 32), "x").is_ok());
    }

    #[test]
    fn a_serial_mismatch_is_a_device_mismatch() {
        // /dev/loop0 stands in for a virtio disk; a fake sysfs gives it another disk's serial.
        let Ok(meta) = std::fs::metadata("/dev/loop0") else {
            return;
        };
        if !meta.file_type().is_block_device() || File::open("/dev/loop0").is_err() {
            return;
        }
        let sys = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("virtio-this-disk-serial-000");
        std::os::unix::fs::symlink("/dev/loop0", &link).unwrap();
        let want = Some("this-disk-serial-000");
        // No serial file: accepted on size alone.
        inspect_in(sys.path(), &link, None, want).unwrap();
        let (maj, min) = major_minor(meta.rdev());
        let serial_dir = sys.path().join(format!("dev/block/{maj}:{min}"));
        std::fs::create_dir_all(&serial_dir).unwrap();
        std::fs::write(serial_dir.join("serial"), "other-disk-serial-00\n").unwrap();
        let err = inspect_in(sys.path(), &link, None, want).unwrap_err();
        assert!(matches!(err, VolumeError::DeviceMismatch { .. }), "{err}");
        std::fs::write(serial_dir.join("serial"), "this-disk-serial-000\n").unwrap();
        inspect_in(sys.path(), &link, None, want).unwrap();
    }

    #[test]
    fn a_relinked_device_is_noticed_before_formatting() {
        let (Ok(null), Ok(zero)) = (
            std::fs::metadata("/dev/null"),
            std::fs::metadata("/dev/zero"),
        ) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("virtio-abc");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        let dev = Device {
            link: link.clone(),
            path: PathBuf::from("/dev/null"),
            rdev: null.rdev(),
            size: 0,
        };
        still_same(&dev).unwrap();
        // udev re-points the link at another device between find and mkfs.
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert_ne!(null.rdev(), zero.rdev());
        let err = still_same(&dev).unwrap_err();
        assert!(matches!(err, VolumeError::DeviceMismatch { .. }), "{err}");
        // And a link that vanished is an error too, never "same".
        std::fs::remove_file(&link).unwrap();
        assert!(still_same(&dev).is_err());
    }

    #[test]
    fn link_to_a_real_block_device_is_checked_for_size() {
        // /dev/loop0 exists on most Linux hosts even when unused (size 0).
        let Ok(meta) = std::fs::metadata("/dev/loop0") else {
            return;
        };
        if !meta.file_type().is_block_device() || File::open("/dev/loop0").is_err() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/loop0", dir.path().join("virtio-abc")).unwrap();
        let size = device_size(Path::new("/dev/loop0")).unwrap();
        let dev = find(dir.path(), "abc", Some(size), &DeviceWait::default()).unwrap();
        assert_eq!(dev.path, Path::new("/dev/loop0"));
        let err = find(dir.path(), "abc", Some(size + 512), &DeviceWait::default()).unwrap_err();
        assert!(matches!(err, VolumeError::DeviceMismatch { .. }), "{err}");
    }
}
