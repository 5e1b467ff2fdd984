//! Usage of a mounted filesystem (statvfs) and the size of a block device.

use std::path::Path;

use super::VolumeError;

/// Bytes and inodes of a mounted filesystem, as `df` would report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    pub bytes_total: u64,
    /// Available to unprivileged users (what a pod can still write).
    pub bytes_available: u64,
    pub bytes_used: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
    pub inodes_used: u64,
}

/// statvfs of the filesystem mounted at `path`.
pub fn fs_stats(path: &Path) -> Result<FsStats, VolumeError> {
    let s = nix::sys::statvfs::statvfs(path)
        .map_err(|e| VolumeError::errno(format!("statvfs {}", path.display()), e))?;
    let frsize = s.fragment_size() as u64;
    let blocks = s.blocks() as u64;
    let bfree = s.blocks_free() as u64;
    let bavail = s.blocks_available() as u64;
    let files = s.files() as u64;
    let ffree = s.files_free() as u64;
    Ok(FsStats {
        bytes_total: blocks * frsize,
        bytes_available: bavail * frsize,
        bytes_used: blocks.saturating_sub(bfree) * frsize,
        inodes_total: files,
        inodes_free: ffree,
        inodes_used: files.saturating_sub(ffree),
    })
}

/// The size in bytes of the block device at `path` (a device node or a bind-mounted file).
pub fn block_size(path: &Path) -> Result<u64, VolumeError> {
    super::device::device_size(path)
}

/// Read the first 4 KiB of `path` (a device) to check it still answers I/O.
pub fn check_block_io(path: &Path) -> Result<(), VolumeError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| VolumeError::io(format!("cannot open {}", path.display()), e))?;
    let mut buf = [0u8; 4096];
    f.read(&mut buf)
        .map(drop)
        .map_err(|e| VolumeError::io(format!("cannot read {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_the_temp_filesystem_are_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let s = fs_stats(dir.path()).unwrap();
        assert!(s.bytes_total > 0);
        assert!(s.bytes_used <= s.bytes_total);
        assert!(s.bytes_available <= s.bytes_total);
        assert!(s.inodes_used <= s.inodes_total);
        assert!(fs_stats(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn size_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("img");
        std::fs::File::create(&f).unwrap().set_len(3 << 20).unwrap();
        assert_eq!(block_size(&f).unwrap(), 3 << 20);
        check_block_io(&f).unwrap();
    }
}
