//! Growing a mounted filesystem to the size of its device: ext4 with `resize2fs DEVICE`
//! (online), xfs with `xfs_growfs MOUNTPOINT`. Sizes are reported so callers can tell whether
//! growth is needed (it is how an offline expansion reaches the filesystem).

use std::ffi::OsStr;
use std::path::Path;

use super::{VolumeError, cmd};

/// A device larger than its filesystem by no more than this is considered fully used
/// (filesystems round down to their block and allocation-group sizes).
pub const GROW_SLACK_BYTES: u64 = 1 << 20;

/// A filesystem's size next to its device's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeReport {
    pub fs_bytes: u64,
    pub device_bytes: u64,
}

impl SizeReport {
    /// Whether the device has room the filesystem does not use yet.
    pub fn needs_grow(&self) -> bool {
        self.device_bytes > self.fs_bytes.saturating_add(GROW_SLACK_BYTES)
    }
}

fn field_u64(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().parse().ok())?
    })
}

/// Filesystem size from `dumpe2fs -h` output: block count × block size.
pub fn parse_dumpe2fs(text: &str) -> Option<u64> {
    Some(field_u64(text, "Block count")? * field_u64(text, "Block size")?)
}

/// Filesystem size from `xfs_info` output (`xfs_spaceman -c info`): the `data` section's
/// blocks × bsize.
pub fn parse_xfs_info(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.trim_start().starts_with("data"))?;
    let mut bsize = None;
    let mut blocks = None;
    for tok in line.split(|c: char| c.is_whitespace() || c == ',') {
        if let Some(v) = tok.strip_prefix("bsize=") {
            bsize = v.parse::<u64>().ok();
        } else if let Some(v) = tok.strip_prefix("blocks=") {
            blocks = v.parse::<u64>().ok();
        }
    }
    Some(bsize? * blocks?)
}

fn unsupported(fs_type: &str) -> VolumeError {
    VolumeError::Command {
        program: "resize".into(),
        status: "not run".into(),
        stderr: format!("cannot grow a {fs_type:?} filesystem; supported: ext4, xfs"),
    }
}

/// The size of the `fs_type` filesystem on `device`, mounted at `mount_point`.
pub fn fs_size(fs_type: &str, device: &Path, mount_point: &Path) -> Result<u64, VolumeError> {
    let (program, out, parsed) = match fs_type {
        "ext4" | "ext3" | "ext2" => {
            let out = cmd::run_ok("dumpe2fs", [OsStr::new("-h"), device.as_os_str()])?;
            let size = parse_dumpe2fs(&out.stdout);
            ("dumpe2fs", out, size)
        }
        "xfs" => {
            // What `xfs_info MOUNTPOINT` runs (xfs_info is a shell script; the image has none).
            let out = cmd::run_ok(
                "xfs_spaceman",
                [
                    OsStr::new("-p"),
                    OsStr::new("xfs_info"),
                    OsStr::new("-c"),
                    OsStr::new("info"),
                    mount_point.as_os_str(),
                ],
            )?;
            let size = parse_xfs_info(&out.stdout);
            ("xfs_spaceman", out, size)
        }
        other => return Err(unsupported(other)),
    };
    parsed.ok_or_else(|| VolumeError::Command {
        program: program.into(),
        status: "unparseable output".into(),
        stderr: out.stdout.chars().take(500).collect(),
    })
}

/// The filesystem's size next to the device's.
pub fn report(fs_type: &str, device: &Path, mount_point: &Path) -> Result<SizeReport, VolumeError> {
    Ok(SizeReport {
        fs_bytes: fs_size(fs_type, device, mount_point)?,
        device_bytes: super::device::device_size(device)?,
    })
}

/// Grow the mounted filesystem to fill its device (a no-op when it already does).
pub fn grow(fs_type: &str, device: &Path, mount_point: &Path) -> Result<(), VolumeError> {
    tracing::info!(device = %device.display(), mount_point = %mount_point.display(), fs_type, "growing filesystem");
    match fs_type {
        "ext4" | "ext3" | "ext2" => {
            let out = cmd::run("resize2fs", [device.as_os_str()])?;
            if out.code == Some(0) {
                return Ok(());
            }
            let mut err = out.error("resize2fs");
            if let VolumeError::Command { stderr, .. } = &mut err
                && stderr.contains("Permission denied")
            {
                stderr.push_str(
                    " (online ext4 resize needs CAP_SYS_RESOURCE: run the node plugin privileged)",
                );
            }
            Err(err)
        }
        "xfs" => cmd::run_ok("xfs_growfs", [mount_point.as_os_str()]).map(drop),
        other => Err(unsupported(other)),
    }
}

/// Grow the filesystem when the device has room for it; returns the sizes afterwards.
pub fn grow_if_needed(
    fs_type: &str,
    device: &Path,
    mount_point: &Path,
) -> Result<SizeReport, VolumeError> {
    let before = report(fs_type, device, mount_point)?;
    if !before.needs_grow() {
        return Ok(before);
    }
    grow(fs_type, device, mount_point)?;
    let after = report(fs_type, device, mount_point)?;
    tracing::info!(device = %device.display(), before = before.fs_bytes, after = after.fs_bytes, device_bytes = after.device_bytes, "filesystem grown");
    Ok(after)
}

/// Whether a filesystem on this device is mounted anywhere in this mount namespace.
fn mounted_anywhere(device: &Path) -> Result<bool, VolumeError> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(device)
        .map_err(|e| VolumeError::io(format!("cannot stat {}", device.display()), e))?
        .rdev();
    Ok(super::mount::mounts()?.iter().any(|m| m.is_device(rdev)))
}

/// Grow an unmounted ext4 filesystem to fill its device, before it is mounted: how an
/// offline expansion completes at the next stage. Only when growth is needed: first
/// `e2fsck -f -p` (resize2fs requires a freshly checked filesystem; preen mode fixes only
/// what is safe and fails otherwise), then `resize2fs DEVICE`. Refuses when the device is
/// mounted anywhere. Returns the sizes afterwards.
pub fn grow_ext4_offline(device: &Path) -> Result<SizeReport, VolumeError> {
    let before = report("ext4", device, Path::new("/"))?;
    if !before.needs_grow() {
        return Ok(before);
    }
    if mounted_anywhere(device)? {
        return Err(VolumeError::Busy {
            path: device.to_path_buf(),
            reason: "it is mounted; it can only be grown online".into(),
        });
    }
    tracing::info!(device = %device.display(), fs_bytes = before.fs_bytes, device_bytes = before.device_bytes, "checking ext4 filesystem before growing it");
    let fsck = cmd::run(
        "e2fsck",
        [OsStr::new("-f"), OsStr::new("-p"), device.as_os_str()],
    )?;
    // 0: clean, 1: errors corrected. Anything else: do not touch it further.
    if !matches!(fsck.code, Some(0) | Some(1)) {
        return Err(fsck.error("e2fsck (check before growing; the filesystem was not resized)"));
    }
    cmd::run_ok("resize2fs", [device.as_os_str()])?;
    let after = report("ext4", device, Path::new("/"))?;
    tracing::info!(device = %device.display(), before = before.fs_bytes, after = after.fs_bytes, "filesystem grown offline");
    Ok(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dumpe2fs() {
        let t = "dumpe2fs 1.47.0 (5-Feb-2023)\nFilesystem volume name:   <none>\nBlock count:              262144\nReserved block count:     0\nBlock size:               4096\n";
        assert_eq!(parse_dumpe2fs(t), Some(1 << 30));
        assert_eq!(parse_dumpe2fs("nothing"), None);
    }

    #[test]
    fn parses_xfs_info() {
        let t = "meta-data=/dev/loop3             isize=512    agcount=4, agsize=65536 blks\n         =                       sectsz=512   attr=2, projid32bit=1\ndata     =                       bsize=4096   blocks=262144, imaxpct=25\n         =                       sunit=0      swidth=0 blks\nnaming   =version 2              bsize=4096   ascii-ci=0, ftype=1\nlog      =internal log           bsize=4096   blocks=16384, version=2\n";
        assert_eq!(parse_xfs_info(t), Some(1 << 30));
        assert_eq!(parse_xfs_info("log =internal bsize=4096 blocks=1"), None);
    }

    #[test]
    fn growth_needed_only_beyond_the_slack() {
        let r = |fs, dev| SizeReport {
            fs_bytes: fs,
            device_bytes: dev,
        };
        assert!(!r(1 << 30, 1 << 30).needs_grow());
        assert!(!r((1 << 30) - 4096, 1 << 30).needs_grow());
        assert!(r(1 << 30, 2 << 30).needs_grow());
        assert!(!r(2 << 30, 1 << 30).needs_grow());
    }

    #[test]
    fn unsupported_types_are_refused() {
        assert!(grow("btrfs", Path::new("/dev/x"), Path::new("/mnt")).is_err());
        assert!(fs_size("vfat", Path::new("/dev/x"), Path::new("/mnt")).is_err());
    }
}
