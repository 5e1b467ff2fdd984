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
pub fn mkfs_command<'a>(
    fs_type: &str,
    device: &'a Path,
    overwrite: bool,
) -> Option<(&'static str, Vec<&'a OsStr>)> {
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
        // Without -f mkfs.xfs itself refuses to overwrite an existing filesystem: a second
        // guard beside the probe, dropped only to redo this node's own unfinished format.
        "xfs" if overwrite => Some(("mkfs.xfs", vec![OsStr::new("-K"), OsStr::new("-f"), dev])),
        "xfs" => Some(("mkfs.xfs", vec![OsStr::new("-K"), dev])),
        _ => None,
    }
}

/// The file in a staging directory that says "this node began formatting the disk behind
/// this by-id link here": written (and synced) before mkfs, removed once it succeeded.
const FORMATTING: &str = ".lunanode-csi-formatting";

/// Format `device` (found through `link`) for staging at `staging`, leaving a note there while
/// mkfs runs. A node plugin killed inside mkfs leaves data in the first MiB and no
/// signature yet (or, for xfs, a superblock marked "being created"), which the probe rightly
/// calls "not blank": without the note that volume could never be staged again. Call this
/// only after [`super::probe::probe`] returned [`super::Probe::Blank`] for the same device,
/// or [`interrupted_format`] said yes; `overwrite` (redoing this node's own unfinished
/// format over the signature it left) lets mkfs.xfs write over an existing filesystem.
pub fn format_noted(
    device: &Path,
    link: &Path,
    staging: &Path,
    fs_type: &str,
    overwrite: bool,
) -> Result<(), VolumeError> {
    let note = staging.join(FORMATTING);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&note)?;
        std::io::Write::write_all(&mut f, link.as_os_str().as_encoded_bytes())?;
        f.sync_all()?;
        std::fs::File::open(staging)?.sync_all()
    };
    write().map_err(|e| VolumeError::io(format!("writing {}", note.display()), e))?;
    mkfs(device, fs_type, overwrite)?;
    clear_note(staging)
}

/// Remove the note of a format from `staging`, if there is one. Call it once the disk is
/// known to hold a finished filesystem: the note would otherwise stay under the mount and
/// keep the directory from being removed at unstage, and it must never outlive the format
/// it describes (it licenses formatting the disk again).
pub fn clear_note(staging: &Path) -> Result<(), VolumeError> {
    let note = staging.join(FORMATTING);
    match std::fs::remove_file(&note) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(VolumeError::io(format!("removing {}", note.display()), e))
        }
        _ => Ok(()),
    }
}

/// Whether `staging` holds the note of a format of the disk behind `link` that did not
/// finish: the unnamed data on it is then this node's own half-written mkfs.
pub fn interrupted_format(staging: &Path, link: &Path) -> bool {
    std::fs::read(staging.join(FORMATTING)).is_ok_and(|b| b == link.as_os_str().as_encoded_bytes())
}

/// Format `device` with `fs_type`. Call this only after [`super::probe::probe`] returned
/// [`super::Probe::Blank`] for the same device.
pub fn format(device: &Path, fs_type: &str) -> Result<(), VolumeError> {
    mkfs(device, fs_type, false)
}

fn mkfs(device: &Path, fs_type: &str, overwrite: bool) -> Result<(), VolumeError> {
    let Some((program, args)) = mkfs_command(fs_type, device, overwrite) else {
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
        let (p, a) = mkfs_command("ext4", Path::new("/dev/vdb"), false).unwrap();
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
        let (p, a) = mkfs_command("xfs", Path::new("/dev/vdb"), false).unwrap();
        assert_eq!(p, "mkfs.xfs");
        assert_eq!(a, ["-K", "/dev/vdb"]);
        let (_, a) = mkfs_command("xfs", Path::new("/dev/vdb"), true).unwrap();
        assert_eq!(a, ["-K", "-f", "/dev/vdb"]);
        let (_, a) = mkfs_command("ext4", Path::new("/dev/vdb"), true).unwrap();
        assert_eq!(
            a[0], "-F",
            "mkfs.ext4 always runs forced: the probe is the guard"
        );
        assert!(mkfs_command("btrfs", Path::new("/dev/vdb"), false).is_none());
        assert!(is_supported("xfs") && is_supported("ext4") && !is_supported("ext3"));
    }

    /// The note is there while mkfs runs (an interrupted format leaves it) and gone after;
    /// it names one disk, so another disk's unnamed data is still refused.
    #[test]
    fn a_format_leaves_a_note_only_while_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let link = Path::new("/dev/disk/by-id/virtio-abc");
        let other = Path::new("/dev/disk/by-id/virtio-def");
        assert!(!interrupted_format(&staging, link));
        // A mkfs that fails (here: no such device) is as unfinished as a killed one.
        let missing = dir.path().join("no-such-disk");
        assert!(format_noted(&missing, link, &staging, "ext4", false).is_err());
        assert!(interrupted_format(&staging, link));
        assert!(!interrupted_format(&staging, other));
        clear_note(&staging).unwrap();
        assert!(!interrupted_format(&staging, link));
        clear_note(&staging).unwrap();
        clear_note(&dir.path().join("no-such-dir")).unwrap();
        if cmd::run("mkfs.ext4", ["-V"]).is_err() {
            return;
        }
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        format_noted(&img, link, &staging, "ext4", false).unwrap();
        assert!(!interrupted_format(&staging, link));
        assert!(!staging.join(FORMATTING).exists());
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
