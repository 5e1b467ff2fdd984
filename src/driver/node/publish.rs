//! Publishing: bind mounts of the staged filesystem or of the raw block device.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nix::mount::MsFlags;

use super::NodeConfig;
use super::request::DiskRef;
use super::stage::{describe, find_disk};
use crate::driver::error::{Error, Result};
use crate::volumes::VolumeError;
use crate::volumes::mount;

pub(super) fn publish_mount(
    cfg: &NodeConfig,
    disk: Option<&DiskRef>,
    staging: &Path,
    target: &Path,
    flags: MsFlags,
) -> Result<()> {
    let staged = mount::mount_at(staging)?.ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "volume is not staged: {} is not a mount point; NodeStageVolume first",
            staging.display()
        ))
    })?;
    if let Some(disk) = disk {
        let dev = find_disk(cfg, disk)?;
        if !staged.is_device(dev.rdev) {
            return Err(VolumeError::MountConflict {
                target: staging.to_path_buf(),
                existing: describe(&staged),
                wanted: dev.path.display().to_string(),
            }
            .into());
        }
    }
    if let Some(m) = mount::mount_at(target)? {
        if !m.same_source(&staged) {
            return Err(VolumeError::MountConflict {
                target: target.to_path_buf(),
                existing: describe(&m),
                wanted: format!("{} (staged at {})", staged.source, staging.display()),
            }
            .into());
        }
        let want_ro = flags.contains(MsFlags::MS_RDONLY);
        if m.read_only() != want_ro {
            return Err(Error::AlreadyExists(format!(
                "{} is already published {} but {} was requested",
                target.display(),
                if m.read_only() {
                    "read-only"
                } else {
                    "read-write"
                },
                if want_ro { "read-only" } else { "read-write" },
            )));
        }
        return Ok(());
    }
    mount::ensure_dir(target)?;
    mount::bind(staging, target, flags)?;
    Ok(())
}

pub(super) fn publish_block(
    cfg: &NodeConfig,
    disk: &DiskRef,
    target: &Path,
    flags: MsFlags,
) -> Result<()> {
    let dev = find_disk(cfg, disk)?;
    if let Some(m) = mount::mount_at(target)? {
        let same = std::fs::metadata(target)
            .map(|md| md.file_type().is_block_device() && md.rdev() == dev.rdev)
            .unwrap_or(false);
        if !same {
            return Err(VolumeError::MountConflict {
                target: target.to_path_buf(),
                existing: describe(&m),
                wanted: dev.path.display().to_string(),
            }
            .into());
        }
        return Ok(());
    }
    mount::ensure_file(target)?;
    mount::bind(&dev.path, target, flags)?;
    Ok(())
}

/// Unmounting the staging mount succeeds even while publish bind mounts of the same
/// filesystem remain, after which the controller would detach a disk that is still mounted.
/// So: any other mount of the staged device (major:minor) blocks unstage, nothing unmounted.
pub(super) fn refuse_if_still_published(staging: &Path) -> Result<()> {
    let table = mount::mounts()?;
    let Some(staged) = mount::find_mount(&table, staging) else {
        return Ok(());
    };
    let others: Vec<String> = table
        .iter()
        .filter(|m| {
            (m.major, m.minor) == (staged.major, staged.minor)
                && m.mount_point != staged.mount_point
        })
        .map(|m| m.mount_point.display().to_string())
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    Err(Error::FailedPrecondition(format!(
        "the volume staged at {} is still mounted at {}; unpublish them first",
        staging.display(),
        others.join(", ")
    )))
}
