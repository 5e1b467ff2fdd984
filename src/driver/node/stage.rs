//! Staging: finding the attached disk, formatting it only when provably blank, mounting it
//! at the staging path, and unstaging.

use std::path::Path;

use nix::mount::MsFlags;

use super::NodeConfig;
use super::publish::refuse_if_still_published;
use super::request::DiskRef;
use crate::driver::error::{Error, Result};
use crate::metrics;
use crate::volumes::mount::{self, MountInfo, MountOptions};
use crate::volumes::{Device, DeviceWait, Probe, VolumeError, device, fs, probe, resize};

pub(super) fn describe(m: &MountInfo) -> String {
    format!("{} (device {}:{})", m.source, m.major, m.minor)
}

pub(super) fn find_disk(cfg: &NodeConfig, disk: &DiskRef) -> Result<Device, VolumeError> {
    device::find(
        &cfg.by_id_dir,
        &disk.id,
        Some(disk.size),
        &DeviceWait::with_timeout(cfg.device_wait),
    )
}

/// Whether `staging` holds this node's note of an interrupted format of this disk. The note
/// names the by-id link the disk was found through then; a disk with several names may be
/// found through another one now, so any of its candidate links counts.
fn interrupted_here(staging: &Path, dev: &Device) -> bool {
    std::iter::once(&dev.link)
        .chain(&dev.links)
        .any(|link| fs::interrupted_format(staging, link))
}

/// Why a disk was refused formatting, as `csi_node_format_refusals_total` counts it;
/// `None` for any other error.
fn refusal(e: &VolumeError) -> Option<&'static str> {
    match e {
        VolumeError::NotBlank { .. } => Some(metrics::REFUSED_NOT_BLANK),
        VolumeError::ForeignFilesystem { .. } => Some(metrics::REFUSED_FOREIGN_FILESYSTEM),
        _ => None,
    }
}

/// Stage a filesystem volume; `refused` is told the reason whenever the disk is refused
/// formatting because it is not provably blank.
pub(super) fn stage_mount(
    dev: &Device,
    staging: &Path,
    fs_type: &str,
    options: &MountOptions,
    read_only: bool,
    refused: impl Fn(&'static str),
) -> Result<()> {
    let refuse = |e: VolumeError| -> Error {
        if let Some(reason) = refusal(&e) {
            refused(reason);
        }
        e.into()
    };
    // Read-only staging must not write to the disk at all: not by formatting it, not by
    // growing it. Either the access mode or an "ro" mount flag makes it read-only.
    let ro = read_only || options.flags.contains(MsFlags::MS_RDONLY);
    if let Some(m) = mount::mount_at(staging)? {
        if !m.is_device(dev.rdev) {
            return Err(VolumeError::MountConflict {
                target: staging.to_path_buf(),
                existing: describe(&m),
                wanted: dev.path.display().to_string(),
            }
            .into());
        }
        // The same disk staged with another capability is not "already done": the CSI spec
        // asks for ALREADY_EXISTS, and nothing is touched (no remount, no growth).
        let incompatible = if m.root != "/" {
            Some(format!(
                "it is a bind of the subtree {:?}, not the whole filesystem",
                m.root
            ))
        } else if m.fs_type != fs_type {
            Some(format!(
                "it holds {} but {fs_type} was requested",
                m.fs_type
            ))
        } else if m.read_only() != ro {
            Some(format!(
                "it is mounted {} but {} was requested",
                if m.read_only() {
                    "read-only"
                } else {
                    "read-write"
                },
                if ro { "read-only" } else { "read-write" }
            ))
        } else {
            None
        };
        if let Some(why) = incompatible {
            return Err(Error::AlreadyExists(format!(
                "volume already staged at {} with an incompatible capability: {why}; unstage it first",
                staging.display()
            )));
        }
        // Already staged: finish a growth that an earlier attempt may not have completed.
        if !m.read_only() {
            resize::grow_if_needed(fs_type, &dev.path, staging)?;
        }
        return Ok(());
    }

    // A disk formatted just now already fills its device: nothing to grow.
    let probed = match probe::probe(&dev.path) {
        // This node's own mkfs was killed half-way (the note it left says so): the data is
        // nothing but that mkfs's, so formatting again loses nothing.
        Err(VolumeError::NotBlank { what, .. })
            if what == probe::DATA_WITHOUT_SIGNATURE && !ro && interrupted_here(staging, dev) =>
        {
            tracing::warn!(device = %dev.path.display(), "an earlier format of this device was interrupted; formatting it again");
            Probe::Blank
        }
        other => other.map_err(refuse)?,
    };
    let fresh = match probed {
        Probe::Filesystem(found)
            if found == fs_type && probe::unfinished_mkfs(&dev.path, fs_type)? =>
        {
            // blkid names it but the kernel will never mount it. Redone only when it is
            // this node's own interrupted format; anything else is somebody's data.
            if ro || !interrupted_here(staging, dev) {
                return Err(refuse(VolumeError::NotBlank {
                    device: dev.path.clone(),
                    what: format!(
                        "its {fs_type} superblock says mkfs never finished, and this node did not start that mkfs; wipe the device (wipefs -a) if nothing on it is needed"
                    ),
                }));
            }
            tracing::warn!(device = %dev.path.display(), fs_type, "an earlier format of this device was interrupted; formatting it again");
            device::still_same(dev)?;
            fs::format_noted(&dev.path, &dev.link, staging, fs_type, true)?;
            true
        }
        Probe::Filesystem(found) if found == fs_type => {
            // Finished: a note of its format left by a kill just after mkfs (or by a
            // version that kept it) has done its job, and under the mount it would keep
            // unstage from removing the directory.
            fs::clear_note(staging)?;
            // An offline expansion: grow ext4 while it is still unmounted.
            if fs_type == "ext4" && !ro {
                resize::grow_ext4_offline(&dev.path)?;
            }
            false
        }
        Probe::Filesystem(found) => {
            return Err(refuse(VolumeError::ForeignFilesystem {
                device: dev.path.clone(),
                found,
                wanted: fs_type.to_string(),
            }));
        }
        Probe::PartitionTable(pt) => {
            return Err(refuse(VolumeError::NotBlank {
                device: dev.path.clone(),
                what: format!("it holds a {pt} partition table"),
            }));
        }
        Probe::Unknown(what) => {
            return Err(refuse(VolumeError::NotBlank {
                device: dev.path.clone(),
                what: format!("blkid found an unrecognised signature: {what}"),
            }));
        }
        Probe::Blank if ro => {
            return Err(Error::FailedPrecondition(format!(
                "{} is blank: an unformatted volume cannot be staged read-only; stage it read-write once to format it",
                dev.path.display()
            )));
        }
        Probe::Blank => {
            // The probe and its reads took time; udev may have re-pointed the link since
            // the disk was found. Never format a disk we did not verify.
            device::still_same(dev)?;
            // mkfs's own exit status is the check; a bad result would fail the mount.
            mount::ensure_dir(staging)?;
            fs::format_noted(&dev.path, &dev.link, staging, fs_type, false)?;
            true
        }
    };

    mount::ensure_dir(staging)?;
    let mut opts = options.clone();
    if ro {
        opts.flags.insert(MsFlags::MS_RDONLY);
    }
    // Clones of one xfs volume (from snapshots) share a UUID; let them mount side by side.
    if fs_type == "xfs" && !opts.data.iter().any(|d| d == "nouuid") {
        opts.data.push("nouuid".into());
    }
    mount::mount_fs(&dev.path, staging, fs_type, &opts)?;
    if !fresh && !ro {
        // How an offline expansion reaches the filesystem. On failure the mount stays; a
        // retried stage finds it and tries the growth again.
        resize::grow_if_needed(fs_type, &dev.path, staging)?;
    }
    Ok(())
}

/// Unstage: refused while the volume is still published elsewhere, then unmount the staging
/// path and remove it.
pub(super) fn unstage(staging: &Path) -> Result<()> {
    refuse_if_still_published(staging)?;
    // What was mounted was a finished filesystem, so a note of its format found
    // under the mount is stale. Without a mount, a note is kept: it may record
    // this node's own interrupted format for the next stage to redo.
    if mount::unmount(staging)? {
        fs::clear_note(staging)?;
    }
    // kubelet re-creates the directory before each stage; leave nothing behind.
    if std::fs::symlink_metadata(staging).is_ok_and(|m| m.is_dir()) {
        mount::remove_target(staging)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_not_blank_and_foreign_filesystem_are_refusals_to_format() {
        let device = std::path::PathBuf::from("/dev/vdb");
        let not_blank = VolumeError::NotBlank {
            device: device.clone(),
            what: "it holds a dos partition table".into(),
        };
        let foreign = VolumeError::ForeignFilesystem {
            device: device.clone(),
            found: "xfs".into(),
            wanted: "ext4".into(),
        };
        let busy = VolumeError::Busy {
            path: device,
            reason: "in use".into(),
        };
        assert_eq!(refusal(&not_blank), Some(metrics::REFUSED_NOT_BLANK));
        assert_eq!(refusal(&foreign), Some(metrics::REFUSED_FOREIGN_FILESYSTEM));
        assert_eq!(refusal(&busy), None);
    }
}
