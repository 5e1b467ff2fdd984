//! Formatting a device that a probe has shown to be blank.
//!
//! Options suit fresh cloud disks: no blocks reserved for root (`-m0`), and inode tables and
//! journal initialised lazily in the background so formatting a large disk takes seconds.
//! Neither filesystem discards the device first (`nodiscard`, `-K`): on a fresh
//! thin-provisioned disk that is slow and pointless.

use std::ffi::OsStr;
use std::path::Path;

use super::{VolumeError, cmd};

/// The filesystem used when the volume capability names none.
pub const DEFAULT_FS_TYPE: &str = "ext4";

/// The filesystems the driver creates and grows.
pub const SUPPORTED_FS_TYPES: &[&str] = &["ext4", "xfs"];

/// Whether the driver can create and grow this filesystem type.
pub fn is_supported(fs_type: &str) -> bool {
    SUPPORTED_FS_TYPES.contains(&fs_type)
}

/// The program and arguments that format `device` with `fs_type`.
pub fn mkfs_command<'a>(fs_type: &str, device: &'a Path) -> Option<(&'static str, Vec<&'a OsStr>)> {
    let dev = device.as_os_str();
    match fs_type {
        "ext4" => Some((
            "mkfs.ext4",
            vec![
                OsStr::new("-F"),
                OsStr::new("-m0"),
                OsStr::new("-E"),
                OsStr::new("lazy_itable_init=1,lazy_journal_init=1,nodiscard"),
                dev,
            ],
        )),
        // No -f: mkfs.xfs itself refuses to overwrite an existing filesystem.
        "xfs" => Some(("mkfs.xfs", vec![OsStr::new("-K"), dev])),
        _ => None,
    }
}

/// Format `device` with `fs_type`. Call this only after [`super::probe::probe`] returned
/// [`super::Probe::Blank`] for the same device.
pub fn format(device: &Path, fs_type: &str) -> Result<(), VolumeError> {
    let Some((program, args)) = mkfs_command(fs_type, device) else {
        return Err(VolumeError::Command {
            program: format!("mkfs.{fs_type}"),
            status: "not run".into(),
            stderr: format!("unsupported filesystem type {fs_type:?}; supported: ext4, xfs"),
        });
    };
    tracing::info!(device = %device.display(), fs_type, "formatting blank device");
    cmd::run_ok(program, args)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_format_options() {
        let (p, a) = mkfs_command("ext4", Path::new("/dev/vdb")).unwrap();
        assert_eq!(p, "mkfs.ext4");
        assert_eq!(
            a,
            [
                "-F",
                "-m0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                "/dev/vdb"
            ]
        );
        let (p, a) = mkfs_command("xfs", Path::new("/dev/vdb")).unwrap();
        assert_eq!(p, "mkfs.xfs");
        assert_eq!(a, ["-K", "/dev/vdb"]);
        assert!(mkfs_command("btrfs", Path::new("/dev/vdb")).is_none());
        assert!(is_supported("xfs") && is_supported("ext4") && !is_supported("ext3"));
    }

    #[test]
    fn formats_a_file_image_with_ext4() {
        if cmd::run("mkfs.ext4", ["-V"]).is_err() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        format(&img, "ext4").unwrap();
        assert_eq!(
            super::super::probe::probe(&img).unwrap(),
            super::super::Probe::Filesystem("ext4".into())
        );
    }
}
