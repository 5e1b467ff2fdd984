//! The node's operating-system work on volumes: find the attached disk, probe it, format it
//! only when provably blank, mount, bind-mount, report stats and grow filesystems.
//!
//! Nothing here knows about CSI or the cloud; the node service in [`crate::driver`] composes
//! these operations.

use std::path::PathBuf;
use std::time::Duration;

pub mod cmd;
pub mod device;
pub mod fs;
pub mod mount;
pub mod probe;
pub mod resize;
pub mod stats;

pub use device::{Device, DeviceWait, DiskId};
pub use probe::Probe;

/// What can go wrong while working on a node's disks and mounts.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No by-id name of the volume's disk appeared within the wait. The message names the
    /// names looked for, the directory, the time waited and what the directory does hold,
    /// so an operator sees at once whether the disk came under another name.
    #[error(
        "no disk with serial {serial}{} appeared in {} within {} (looked for {}); this node has: {}; check that the volume is attached to this node (lunanode-csi volume info <volume>) and the attach target (--attach-target, the chart's controller.attachTarget)",
        identification.as_deref().filter(|i| *i != serial.as_str()).map(|i| format!(" (identification {i})")).unwrap_or_default(),
        dir.display(),
        seconds(*waited),
        looked_for.join(", "),
        present.join("; ")
    )]
    DeviceNotFound {
        /// The serial looked for (the first 20 characters of the identification).
        serial: String,
        /// The whole identification, when it was known.
        identification: Option<String>,
        /// The by-id directory.
        dir: PathBuf,
        /// Every name looked for ([`device::candidate_names`]).
        looked_for: Box<[String]>,
        /// How long it waited.
        waited: Duration,
        /// What the directory holds: one entry per whole disk, `name → /dev/x (size, serial)`
        /// (at most [`device::LISTED_ENTRIES`], then "and N more").
        present: Box<[String]>,
    },
    /// The device found is not the volume we were asked for; it is left untouched.
    #[error("device {} does not match the volume: {reason}; refusing to use it", device.display())]
    DeviceMismatch { device: PathBuf, reason: String },
    /// The device holds a filesystem of another type; it is never reformatted.
    #[error(
        "device {} already holds a {found} filesystem but {wanted} was requested; it will not be reformatted (use fsType {found} or a new volume)",
        device.display()
    )]
    ForeignFilesystem {
        device: PathBuf,
        found: String,
        wanted: String,
    },
    /// The probe did not positively report a blank device, so it is not formatted.
    #[error("device {} is not provably blank ({what}); refusing to format it", device.display())]
    NotBlank { device: PathBuf, what: String },
    /// The target is already mounted from something else.
    #[error(
        "{} is already mounted from {existing}, not {wanted}; unpublish or unstage it first",
        target.display()
    )]
    MountConflict {
        target: PathBuf,
        existing: String,
        wanted: String,
    },
    /// The mount is in use; retry later rather than forcing it.
    #[error("{} is busy ({reason}); retry once the workload has released it", path.display())]
    Busy { path: PathBuf, reason: String },
    /// The path is not a mount point (e.g. the volume is not staged here).
    #[error("{} is not mounted", path.display())]
    NotMounted { path: PathBuf },
    /// An external program (mkfs, blkid, resize2fs, xfs_growfs) failed.
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        program: String,
        status: String,
        stderr: String,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// A wait for people: `60s`, `1.5s`.
fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if (s - s.round()).abs() < 0.05 {
        format!("{}s", s.round())
    } else {
        format!("{s:.1}s")
    }
}

impl VolumeError {
    /// A failed system call, with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VolumeError::Io {
            context: context.into(),
            source,
        }
    }

    /// A failed `nix` call, with what was being done.
    pub fn errno(context: impl Into<String>, errno: nix::errno::Errno) -> Self {
        VolumeError::Io {
            context: context.into(),
            source: std::io::Error::from(errno),
        }
    }
}
