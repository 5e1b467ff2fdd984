//! NodeGetVolumeStats: usage and the volume condition.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::csi::{NodeGetVolumeStatsResponse, VolumeCondition, VolumeUsage, volume_usage};
use crate::driver::error::Error;
use crate::volumes::{mount, stats};

pub(super) fn abnormal(message: impl Into<String>) -> NodeGetVolumeStatsResponse {
    NodeGetVolumeStatsResponse {
        usage: Vec::new(),
        volume_condition: Some(VolumeCondition {
            abnormal: true,
            message: message.into(),
        }),
    }
}

pub(super) fn usage(
    unit: volume_usage::Unit,
    total: u64,
    available: u64,
    used: u64,
) -> VolumeUsage {
    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    VolumeUsage {
        available: i(available),
        total: i(total),
        used: i(used),
        unit: unit as i32,
    }
}

pub(super) fn volume_stats(path: &Path, meta: &std::fs::Metadata) -> NodeGetVolumeStatsResponse {
    let mounted = match mount::mount_at(path) {
        Ok(m) => m,
        Err(e) => return abnormal(format!("cannot read the mount table: {e}")),
    };
    let Some(mounted) = mounted else {
        return abnormal(format!(
            "{} is not a mount point: the volume is no longer mounted there",
            path.display()
        ));
    };
    if mounted.kernel_remounted_read_only() {
        return abnormal(format!(
            "the {} filesystem at {} was made read-only by the kernel although it is mounted \
             read-write (usually after I/O or corruption errors); check the node's kernel log",
            mounted.fs_type,
            path.display()
        ));
    }
    if meta.file_type().is_block_device() {
        let size = match stats::block_size(path) {
            Ok(s) => s,
            Err(e) => return abnormal(format!("block device I/O failed: {e}")),
        };
        if let Err(e) = stats::check_block_io(path) {
            return abnormal(format!("block device I/O failed: {e}"));
        }
        return NodeGetVolumeStatsResponse {
            usage: vec![usage(volume_usage::Unit::Bytes, size, 0, 0)],
            volume_condition: Some(VolumeCondition {
                abnormal: false,
                message: "block device is attached and readable".into(),
            }),
        };
    }
    let s = match stats::fs_stats(path) {
        Ok(s) => s,
        Err(e) => return abnormal(format!("filesystem I/O failed: {e}")),
    };
    if let Err(e) = std::fs::read_dir(path) {
        return abnormal(format!(
            "filesystem I/O failed: cannot list {}: {e}",
            path.display()
        ));
    }
    NodeGetVolumeStatsResponse {
        usage: vec![
            usage(
                volume_usage::Unit::Bytes,
                s.bytes_total,
                s.bytes_available,
                s.bytes_used,
            ),
            usage(
                volume_usage::Unit::Inodes,
                s.inodes_total,
                s.inodes_free,
                s.inodes_used,
            ),
        ],
        volume_condition: Some(VolumeCondition {
            abnormal: false,
            message: "filesystem is mounted and readable".into(),
        }),
    }
}

pub(super) fn no_block_device(path: &Path) -> Error {
    Error::NotFound(format!(
        "no volume is published at {}: it is not a block device bind mount (the device is no longer bound there)",
        path.display()
    ))
}
