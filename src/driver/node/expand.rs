//! NodeExpandVolume: growing the filesystem to its (already grown) device.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::stats::no_block_device;
use crate::driver::error::{Error, Result};
use crate::volumes::mount::{self, MountInfo};
use crate::volumes::{VolumeError, fs, resize, stats};

pub(super) fn expand(path: &Path, block: bool, required: u64) -> Result<u64> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::NotFound(format!("volume path {}: {e}", path.display())))?;
    let capacity = if block || !meta.is_dir() {
        // A block volume is a device node bind-mounted onto a file. Without the mount the
        // path is only the placeholder file, whose size (0) is no volume's capacity.
        let bound = meta.file_type().is_block_device() && mount::mount_at(path)?.is_some();
        if !bound {
            return Err(no_block_device(path));
        }
        stats::block_size(path)?
    } else {
        let m = mount::mount_at(path)?.ok_or_else(|| VolumeError::NotMounted {
            path: path.to_path_buf(),
        })?;
        if !fs::is_supported(&m.fs_type) {
            return Err(Error::FailedPrecondition(format!(
                "{} holds a {} filesystem; only ext4 and xfs can be grown",
                path.display(),
                m.fs_type
            )));
        }
        if m.read_only() {
            return Err(Error::FailedPrecondition(format!(
                "{} is mounted read-only; a read-only filesystem cannot be grown online",
                path.display()
            )));
        }
        let dev = device_of(&m)?;
        let report = resize::grow_if_needed(&m.fs_type, &dev, path)?;
        if report.needs_grow() {
            return Err(Error::Internal(format!(
                "{} filesystem on {} is {} bytes after growing, device is {} bytes",
                m.fs_type,
                dev.display(),
                report.fs_bytes,
                report.device_bytes
            )));
        }
        report.device_bytes
    };
    if required > capacity {
        return Err(Error::FailedPrecondition(format!(
            "the device behind {} is {capacity} bytes, less than the requested {required}; \
             the volume has not been expanded on this node yet (ControllerExpandVolume, then reattach)",
            path.display()
        )));
    }
    Ok(capacity)
}

/// Find the device node behind a mount, by its device number (not by name).
pub(super) fn device_of(m: &MountInfo) -> Result<PathBuf> {
    let matches = |p: &Path| {
        std::fs::metadata(p)
            .map(|md| md.file_type().is_block_device() && m.is_device(md.rdev()))
            .unwrap_or(false)
    };
    let uevent = format!("/sys/dev/block/{}:{}/uevent", m.major, m.minor);
    if let Ok(text) = std::fs::read_to_string(&uevent)
        && let Some(name) = text.lines().find_map(|l| l.strip_prefix("DEVNAME="))
    {
        let p = Path::new("/dev").join(name.trim());
        if matches(&p) {
            return Ok(p);
        }
    }
    let src = Path::new(&m.source);
    if src.is_absolute() && matches(src) {
        return Ok(src.to_path_buf());
    }
    Err(Error::Internal(format!(
        "cannot find the device node of {} mounted at {} (device {}:{})",
        m.source,
        m.mount_point.display(),
        m.major,
        m.minor
    )))
}
