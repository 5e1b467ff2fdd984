//! Is there anything on this device? `blkid -p` (low-level superblock probing, no cache)
//! answers; a device is "blank" only when blkid positively says nothing was found AND the
//! device is readable. Any other outcome, including a probe error, is never "blank".

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::{VolumeError, cmd};

/// How many bytes at the start of the device must be readable before it is called blank.
pub const READ_CHECK_BYTES: usize = 64 * 1024;

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No filesystem, no partition table, no other signature, and the device reads fine.
    Blank,
    /// A filesystem (or other content signature such as swap or LVM) of this type.
    Filesystem(String),
    /// A partition table of this type (e.g. `gpt`, `dos`).
    PartitionTable(String),
    /// blkid found something it could not name; never treated as blank.
    Unknown(String),
}

impl Probe {
    /// Interpret `blkid -p -o export` output from a successful (exit 0) run.
    pub fn from_export(output: &str) -> Probe {
        let mut ty = None;
        let mut ptty = None;
        for line in output.lines() {
            if let Some((k, v)) = line.split_once('=') {
                match k.trim() {
                    "TYPE" => ty = Some(v.trim().to_string()),
                    "PTTYPE" => ptty = Some(v.trim().to_string()),
                    _ => {}
                }
            }
        }
        match (ptty, ty) {
            // A partition table wins: a disk with one is never formatted as a whole.
            (Some(pt), _) => Probe::PartitionTable(pt),
            (None, Some(t)) if !t.is_empty() => Probe::Filesystem(t),
            _ => Probe::Unknown(output.trim().replace('\n', " ")),
        }
    }
}

/// Interpret a finished `blkid -p -o export` run; `readable` is consulted only when blkid
/// says it found nothing.
pub fn interpret(
    device: &Path,
    out: &cmd::Output,
    readable: impl FnOnce() -> Result<(), VolumeError>,
) -> Result<Probe, VolumeError> {
    match out.code {
        Some(0) => Ok(Probe::from_export(&out.stdout)),
        // blkid -p exits 2 when it found nothing at all.
        Some(2) if out.stdout.trim().is_empty() => {
            readable()?;
            Ok(Probe::Blank)
        }
        Some(2) => Err(VolumeError::NotBlank {
            device: device.to_path_buf(),
            what: format!(
                "blkid exited 2 but printed {:?}",
                out.stdout.trim().replace('\n', " ")
            ),
        }),
        // 4: usage or other error, 8: ambivalent probe result, or a signal.
        _ => Err(out.error("blkid")),
    }
}

/// Check that the first [`READ_CHECK_BYTES`] of the device can be read.
pub fn check_readable(device: &Path) -> Result<(), VolumeError> {
    let mut f = File::open(device)
        .map_err(|e| VolumeError::io(format!("cannot open {} for reading", device.display()), e))?;
    let mut buf = vec![0u8; READ_CHECK_BYTES];
    f.read_exact(&mut buf).map_err(|e| {
        VolumeError::io(
            format!(
                "cannot read the first {} KiB of {}",
                READ_CHECK_BYTES / 1024,
                device.display()
            ),
            e,
        )
    })
}

/// Probe a device.
pub fn probe(device: &Path) -> Result<Probe, VolumeError> {
    let out = cmd::run(
        "blkid",
        [
            OsStr::new("-p"),
            OsStr::new("-o"),
            OsStr::new("export"),
            device.as_os_str(),
        ],
    )?;
    interpret(device, &out, || check_readable(device))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(code: Option<i32>, stdout: &str) -> cmd::Output {
        cmd::Output {
            code,
            stdout: stdout.to_string(),
            stderr: String::new(),
        }
    }

    fn ok() -> Result<(), VolumeError> {
        Ok(())
    }

    const DEV: &str = "/dev/vdz";

    #[test]
    fn filesystem_and_partition_table() {
        let fs = "DEVNAME=/dev/vdz\nUUID=1234\nVERSION=1.0\nTYPE=ext4\nUSAGE=filesystem\n";
        assert_eq!(
            interpret(Path::new(DEV), &out(Some(0), fs), ok).unwrap(),
            Probe::Filesystem("ext4".into())
        );
        let pt = "DEVNAME=/dev/vdz\nPTUUID=abcd\nPTTYPE=gpt\n";
        assert_eq!(
            interpret(Path::new(DEV), &out(Some(0), pt), ok).unwrap(),
            Probe::PartitionTable("gpt".into())
        );
        let odd = "DEVNAME=/dev/vdz\nUSAGE=other\n";
        assert!(matches!(
            interpret(Path::new(DEV), &out(Some(0), odd), ok).unwrap(),
            Probe::Unknown(_)
        ));
    }

    #[test]
    fn blank_only_when_nothing_found_and_readable() {
        assert_eq!(
            interpret(Path::new(DEV), &out(Some(2), ""), ok).unwrap(),
            Probe::Blank
        );
        let unreadable = || {
            Err(VolumeError::io(
                "read",
                std::io::Error::from_raw_os_error(nix::libc::EIO),
            ))
        };
        assert!(interpret(Path::new(DEV), &out(Some(2), ""), unreadable).is_err());
        // Exit 2 with output is not a clean "nothing found".
        assert!(matches!(
            interpret(Path::new(DEV), &out(Some(2), "TYPE=ext4\n"), ok),
            Err(VolumeError::NotBlank { .. })
        ));
    }

    #[test]
    fn any_other_outcome_is_an_error_never_blank() {
        for code in [Some(1), Some(4), Some(8), Some(127), None] {
            let r = interpret(Path::new(DEV), &out(code, ""), ok);
            assert!(
                matches!(r, Err(VolumeError::Command { .. })),
                "{code:?}: {r:?}"
            );
        }
    }

    #[test]
    fn probing_a_missing_device_is_an_error() {
        let r = probe(Path::new("/nonexistent/device-xyz"));
        assert!(r.is_err(), "{r:?}");
    }

    #[test]
    fn zeroed_file_is_blank_and_unreadable_short_file_is_not() {
        if crate::volumes::cmd::run("blkid", ["-V"]).is_err() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("zero.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        assert_eq!(probe(&img).unwrap(), Probe::Blank);
        // Too short to read 64 KiB: blkid finds nothing, but the read check fails.
        let short = dir.path().join("short.img");
        std::fs::write(&short, vec![0u8; 1024]).unwrap();
        assert!(probe(&short).is_err());
    }
}
