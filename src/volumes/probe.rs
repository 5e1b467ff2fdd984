//! Is there anything on this device? `blkid -p` (low-level superblock probing, no cache)
//! answers; a device is "blank" only when blkid positively says nothing was found AND the
//! device is readable at both ends AND its first MiB is all zeros. Any other outcome,
//! including a probe error, is never "blank".
//!
//! Why so strict: `blkid -p` exits 2 both for "nothing found" and when a probe hit an I/O
//! error, and mke2fs skips its own "has a filesystem" question when stdin is not a terminal.
//! A fresh cloud disk reads as zeros; a disk with data but no signature we know is left alone.
//!
//! The blkid run and the reads of the two ends happen at the same time, so a probe costs
//! about the slower of the two rather than their sum; both must finish, and both must say
//! "nothing here", for the device to be blank.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{VolumeError, cmd};

/// How many bytes at the start and at the end of the device must be readable (and, at the
/// start, zero) before it is called blank.
pub const READ_CHECK_BYTES: usize = 1 << 20;

/// The ends are read this many bytes at a time into one buffer. Reading a MiB at once needs
/// a MiB of fresh memory, whose page faults (256 of them) can cost more than the reads.
const READ_CHUNK: usize = 128 << 10;

/// Alignment of the read buffers: what `O_DIRECT` asks of memory and offsets (the logical
/// block size, 512 or 4096 bytes on Linux).
const DIRECT_ALIGN: usize = 4096;

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

/// What reading the two ends of the device showed (both reads succeeded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ends {
    /// Whether the first [`READ_CHECK_BYTES`] are all zero.
    pub head_zero: bool,
}

/// Why a device whose first MiB holds data that blkid cannot name is not blank (also how
/// the node recognises its own interrupted mkfs, see `fs::interrupted_format`).
pub const DATA_WITHOUT_SIGNATURE: &str = "the first MiB holds data but no known signature";

/// Interpret a finished `blkid -p -o export` run together with the result of [`read_ends`]
/// (read the first and the last MiB). The reads matter only when blkid cleanly says it found
/// nothing; then a failed read, or data in the first MiB, means "not blank".
pub fn interpret(
    device: &Path,
    out: &cmd::Output,
    ends: Result<Ends, VolumeError>,
) -> Result<Probe, VolumeError> {
    let not_blank = |what: String| VolumeError::NotBlank {
        device: device.to_path_buf(),
        what,
    };
    match out.code {
        Some(0) => Ok(Probe::from_export(&out.stdout)),
        // blkid -p exits 2 when it found nothing, but also when a probe failed on an I/O
        // error, sometimes saying so on stderr and sometimes not (util-linux 2.38 prints
        // nothing for a device every read of which fails). Only a silent exit 2 is a
        // candidate for blank, and then only if both ends read fine.
        Some(2) if out.stdout.trim().is_empty() && out.stderr.trim().is_empty() => {
            // A read error here propagates: an unreadable device is never blank.
            if ends?.head_zero {
                Ok(Probe::Blank)
            } else {
                Err(not_blank(DATA_WITHOUT_SIGNATURE.into()))
            }
        }
        Some(2) => Err(not_blank(format!(
            "blkid exited 2 but printed {:?}",
            format!("{} {}", out.stdout.trim(), out.stderr.trim())
                .trim()
                .replace('\n', " ")
        ))),
        // 4: usage or other error, 8: ambivalent probe result, or a signal.
        _ => Err(out.error("blkid")),
    }
}

/// Whether every byte is zero. Folds 64 bytes at a time, which the compiler turns into
/// vector instructions (a byte-at-a-time `all` is some 20 times slower on a MiB).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}

/// Run `a` on a thread of its own while `b` runs on this one, and wait for both. A panic in
/// `a`, or a thread that cannot be started, makes `a`'s result an error.
fn both<A: Send, B>(
    a: impl FnOnce() -> Result<A, VolumeError> + Send,
    b: impl FnOnce() -> B,
) -> (Result<A, VolumeError>, B) {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("probe".into())
            .spawn_scoped(s, a);
        let rb = b();
        let ra = match handle {
            Ok(h) => h.join().unwrap_or_else(|_| {
                Err(VolumeError::io(
                    "cannot probe the device",
                    io::Error::other("a probe thread panicked"),
                ))
            }),
            Err(e) => Err(VolumeError::io(
                "cannot start a thread to probe the device",
                e,
            )),
        };
        (ra, rb)
    })
}

/// A zeroed buffer of `len` bytes whose start is aligned for `O_DIRECT`.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let start = (DIRECT_ALIGN - storage.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Fill `buf` from `offset` of the device, all of it or an error (the end of the device
/// included). `direct` is the device opened with `O_DIRECT`, if it was: the device itself is
/// read, without going through (and filling) the page cache. Where the kernel does not take
/// a direct read (`EINVAL`: an alignment it does not support, a file on a filesystem
/// without `O_DIRECT`), the device is opened again without it (into `buffered`, kept for
/// the following reads) and read through the page cache.
fn read_chunk(
    device: &Path,
    direct: Option<&File>,
    buffered: &mut Option<File>,
    offset: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let f = match buffered {
        Some(f) => f,
        None => {
            if let Some(f) = direct {
                match f.read_exact_at(buf, offset) {
                    Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {}
                    done => return done,
                }
            }
            buffered.insert(File::open(device)?)
        }
    };
    f.read_exact_at(buf, offset)
}

/// Read `len` bytes of the device from `offset`, [`READ_CHUNK`] bytes at a time, handing
/// each chunk to `each`: all of them, or an error (the end of the device included). Gives up
/// with an error before the next chunk once `stop` is set.
fn read_region(
    device: &Path,
    direct: Option<&File>,
    offset: u64,
    len: usize,
    stop: &AtomicBool,
    mut each: impl FnMut(&[u8]),
) -> io::Result<()> {
    let mut buf = AlignedBuf::new(READ_CHUNK.min(len));
    let mut buffered = None;
    let mut done = 0;
    while done < len {
        if stop.load(Ordering::Relaxed) {
            return Err(io::Error::other("stopped: the result is no longer needed"));
        }
        let chunk = &mut buf.as_mut()[..READ_CHUNK.min(len - done)];
        read_chunk(device, direct, &mut buffered, offset + done as u64, chunk)?;
        each(chunk);
        done += chunk.len();
    }
    Ok(())
}

/// `device` opened again with `O_DIRECT` if it is a block device (`meta`), so that reads see
/// the disk itself rather than what the page cache holds of it; `None` where it cannot be.
fn open_direct(device: &Path, meta: &std::fs::Metadata) -> Option<File> {
    meta.file_type()
        .is_block_device()
        .then(|| {
            OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_DIRECT)
                .open(device)
                .ok()
        })
        .flatten()
}

/// Read the first and the last [`READ_CHECK_BYTES`] of the device (a device whose end cannot
/// be read may hide a signature there, e.g. GPT's backup header or an md superblock), and
/// report whether the first part is all zeros. A block device is read with `O_DIRECT`, both
/// ends at once.
pub fn read_ends(device: &Path) -> Result<Ends, VolumeError> {
    read_ends_until(device, &AtomicBool::new(false))
}

/// [`read_ends`], giving up (with an error) once `stop` is set.
fn read_ends_until(device: &Path, stop: &AtomicBool) -> Result<Ends, VolumeError> {
    let f = File::open(device)
        .map_err(|e| VolumeError::io(format!("cannot open {} for reading", device.display()), e))?;
    let meta = f
        .metadata()
        .map_err(|e| VolumeError::io(format!("cannot stat {}", device.display()), e))?;
    // Seeking to the end gives a block device's size too (its st_size is 0).
    let size = (&f)
        .seek(SeekFrom::End(0))
        .map_err(|e| VolumeError::io(format!("cannot read the size of {}", device.display()), e))?;
    let direct = open_direct(device, &meta);
    let direct = direct.as_ref();
    let mib = READ_CHECK_BYTES / (1 << 20);
    let failed = |which: &str, e: io::Error| {
        VolumeError::io(
            format!("cannot read the {which} {mib} MiB of {}", device.display()),
            e,
        )
    };
    let tail_at = size.saturating_sub(READ_CHECK_BYTES as u64);
    let (tail, head) = both(
        || {
            read_region(device, direct, tail_at, READ_CHECK_BYTES, stop, |_| {})
                .map_err(|e| failed("last", e))
        },
        || {
            let mut zero = true;
            read_region(device, direct, 0, READ_CHECK_BYTES, stop, |c| {
                zero = zero && is_zero(c);
            })
            .map_err(|e| failed("first", e))?;
            Ok(zero)
        },
    );
    let head_zero = head?;
    tail?;
    Ok(Ends { head_zero })
}

/// Byte of the xfs superblock (`sb_inprogress`) that mkfs.xfs sets when it first writes the
/// superblock and clears when it is done; the kernel will not mount xfs while it is set.
const XFS_SB_INPROGRESS: usize = 126;

/// Whether the `fs_type` filesystem that [`probe`] found on `device` was left unfinished by
/// its mkfs. Only xfs can say so (see [`XFS_SB_INPROGRESS`]): blkid names it, yet it can
/// never be mounted. mke2fs writes ext4's primary superblock last, so an ext4 that blkid
/// names is finished.
pub fn unfinished_mkfs(device: &Path, fs_type: &str) -> Result<bool, VolumeError> {
    if fs_type != "xfs" {
        return Ok(false);
    }
    let failed = |e| {
        VolumeError::io(
            format!("cannot read the superblock of {}", device.display()),
            e,
        )
    };
    let f = File::open(device).map_err(failed)?;
    let direct = f.metadata().ok().and_then(|m| open_direct(device, &m));
    let mut buf = AlignedBuf::new(DIRECT_ALIGN);
    read_chunk(device, direct.as_ref(), &mut None, 0, buf.as_mut()).map_err(failed)?;
    let sb = buf.as_mut();
    Ok(&sb[..4] == b"XFSB" && sb[XFS_SB_INPROGRESS] != 0)
}

/// `blkid -p -o export <device>`.
fn blkid(device: &Path) -> Result<cmd::Output, VolumeError> {
    cmd::run(
        "blkid",
        [
            OsStr::new("-p"),
            OsStr::new("-o"),
            OsStr::new("export"),
            device.as_os_str(),
        ],
    )
}

/// Probe a device: blkid and [`read_ends`] at the same time, then [`interpret`] both.
pub fn probe(device: &Path) -> Result<Probe, VolumeError> {
    let stop = AtomicBool::new(false);
    let (ends, out) = both(
        || read_ends_until(device, &stop),
        || {
            let out = blkid(device);
            // The reads count only when blkid exits 2 (see `interpret`); after any other
            // answer (a filesystem found, say) they are stopped instead of waited for.
            if !matches!(&out, Ok(o) if o.code == Some(2)) {
                stop.store(true, Ordering::Relaxed);
            }
            out
        },
    );
    interpret(device, &out?, ends)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(code: Option<i32>, stdout: &str) -> cmd::Output {
        out_err(code, stdout, "")
    }

    fn out_err(code: Option<i32>, stdout: &str, stderr: &str) -> cmd::Output {
        cmd::Output {
            code,
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
        }
    }

    fn ok() -> Result<Ends, VolumeError> {
        Ok(Ends { head_zero: true })
    }

    fn eio() -> Result<Ends, VolumeError> {
        Err(VolumeError::io(
            "read",
            std::io::Error::from_raw_os_error(nix::libc::EIO),
        ))
    }

    const DEV: &str = "/dev/vdz";

    /// Only an xfs superblock with `sb_inprogress` set is unfinished; other filesystems are
    /// not read at all.
    #[test]
    fn an_xfs_superblock_in_progress_is_unfinished() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("sb.img");
        let mut sb = vec![0u8; 64 << 10];
        sb[..4].copy_from_slice(b"XFSB");
        sb[XFS_SB_INPROGRESS] = 1;
        std::fs::write(&img, &sb).unwrap();
        assert!(unfinished_mkfs(&img, "xfs").unwrap());
        assert!(!unfinished_mkfs(&img, "ext4").unwrap());
        sb[XFS_SB_INPROGRESS] = 0;
        std::fs::write(&img, &sb).unwrap();
        assert!(!unfinished_mkfs(&img, "xfs").unwrap());
        sb[..4].copy_from_slice(b"XFSC");
        sb[XFS_SB_INPROGRESS] = 1;
        std::fs::write(&img, &sb).unwrap();
        assert!(
            !unfinished_mkfs(&img, "xfs").unwrap(),
            "not an xfs superblock"
        );
        assert!(unfinished_mkfs(&dir.path().join("missing"), "xfs").is_err());
        assert!(!unfinished_mkfs(&dir.path().join("missing"), "ext4").unwrap());
    }

    #[test]
    fn filesystem_and_partition_table() {
        let fs = "DEVNAME=/dev/vdz\nUUID=1234\nVERSION=1.0\nTYPE=ext4\nUSAGE=filesystem\n";
        assert_eq!(
            interpret(Path::new(DEV), &out(Some(0), fs), ok()).unwrap(),
            Probe::Filesystem("ext4".into())
        );
        let pt = "DEVNAME=/dev/vdz\nPTUUID=abcd\nPTTYPE=gpt\n";
        assert_eq!(
            interpret(Path::new(DEV), &out(Some(0), pt), ok()).unwrap(),
            Probe::PartitionTable("gpt".into())
        );
        let odd = "DEVNAME=/dev/vdz\nUSAGE=other\n";
        assert!(matches!(
            interpret(Path::new(DEV), &out(Some(0), odd), ok()).unwrap(),
            Probe::Unknown(_)
        ));
    }

    #[test]
    fn blank_only_when_nothing_found_and_readable() {
        // Silent exit 2, both ends readable, first MiB zero: the only way to be blank.
        assert_eq!(
            interpret(Path::new(DEV), &out(Some(2), ""), ok()).unwrap(),
            Probe::Blank
        );
        // A read error at either end (read_ends fails) is never blank.
        assert!(interpret(Path::new(DEV), &out(Some(2), ""), eio()).is_err());
        // Exit 2 with output is not a clean "nothing found".
        assert!(matches!(
            interpret(Path::new(DEV), &out(Some(2), "TYPE=ext4\n"), ok()),
            Err(VolumeError::NotBlank { .. })
        ));
        // Exit 2 with a complaint on stderr (a probe that hit an I/O error) is not blank,
        // even when the reads afterwards succeed. The old rule called this blank.
        let r = interpret(
            Path::new(DEV),
            &out_err(Some(2), "", "error: /dev/vdz: Input/output error\n"),
            ok(),
        );
        assert!(matches!(r, Err(VolumeError::NotBlank { .. })), "{r:?}");
        // Nothing found, readable, but data in the first MiB: left alone.
        let data = Ok(Ends { head_zero: false });
        let r = interpret(Path::new(DEV), &out(Some(2), ""), data);
        assert!(
            matches!(&r, Err(VolumeError::NotBlank { what, .. }) if what.contains("no known signature")),
            "{r:?}"
        );
    }

    #[test]
    fn the_reads_only_matter_when_blkid_found_nothing() {
        // They run at the same time as blkid now, but a device blkid names is named by
        // blkid, whatever the reads said; no read result makes a non-clean blkid run blank.
        let fs = "TYPE=ext4\n";
        assert_eq!(
            interpret(Path::new(DEV), &out(Some(0), fs), eio()).unwrap(),
            Probe::Filesystem("ext4".into())
        );
        for code in [Some(2), Some(4), Some(8), None] {
            let r = interpret(Path::new(DEV), &out_err(code, "", "oops"), ok());
            assert!(r.is_err(), "{code:?}: {r:?}");
        }
    }

    #[test]
    fn both_run_and_a_panic_is_an_error() {
        let (a, b) = both(|| Ok(1), || 2);
        assert_eq!((a.unwrap(), b), (1, 2));
        let (a, b) = both::<(), _>(|| panic!("boom"), || 3);
        assert!(matches!(a, Err(VolumeError::Io { .. })), "{a:?}");
        assert_eq!(b, 3);
    }

    #[test]
    fn zero_check_sees_every_byte() {
        assert!(is_zero(&[]));
        for len in [1usize, 63, 64, 65, 1000, 4096, 4097, READ_CHECK_BYTES] {
            let mut buf = vec![0u8; len];
            assert!(is_zero(&buf), "{len}");
            let mut positions = vec![0, len / 2, len - 1];
            // In the tail that does not fill a 64-byte chunk, and at chunk edges.
            positions.extend([63, 64, len - len % 64].into_iter().filter(|&p| p < len));
            for p in positions {
                for byte in [1u8, 0x80, 0xff] {
                    buf[p] = byte;
                    assert!(!is_zero(&buf), "len {len}, byte {byte:#x} at {p}");
                    buf[p] = 0;
                }
            }
        }
    }

    #[test]
    fn read_buffers_are_aligned_for_direct_io() {
        for _ in 0..8 {
            let mut b = AlignedBuf::new(READ_CHUNK);
            let s = b.as_mut();
            assert_eq!(s.len(), READ_CHUNK);
            assert_eq!(s.as_ptr() as usize % DIRECT_ALIGN, 0);
            assert!(is_zero(s));
        }
    }

    #[test]
    fn a_direct_read_the_kernel_refuses_is_read_again_through_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("data.img");
        let bytes: Vec<u8> = (0..3 * DIRECT_ALIGN).map(|i| (i % 251) as u8).collect();
        std::fs::write(&img, &bytes).unwrap();
        // Not every filesystem takes O_DIRECT (then there is nothing to fall back from).
        let Ok(direct) = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&img)
        else {
            return;
        };
        let go = AtomicBool::new(false);
        // An odd offset and length: EINVAL from O_DIRECT, then buffered reads.
        let mut seen = Vec::new();
        read_region(&img, Some(&direct), 7, 1001, &go, |c| {
            seen.extend_from_slice(c)
        })
        .unwrap();
        assert_eq!(seen, bytes[7..1008]);
        // Past the end is an error either way, never a short success.
        let r = read_region(&img, Some(&direct), 0, 4 * DIRECT_ALIGN, &go, |_| {});
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let r = read_region(&img, None, 4097, 3 * DIRECT_ALIGN, &go, |_| {});
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn reads_come_in_chunks_and_stop_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("data.img");
        let len = 3 * READ_CHUNK + 5;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        std::fs::write(&img, &bytes).unwrap();
        let go = AtomicBool::new(false);
        let mut sizes = Vec::new();
        let mut seen = Vec::new();
        read_region(&img, None, 0, len, &go, |c| {
            sizes.push(c.len());
            seen.extend_from_slice(c);
        })
        .unwrap();
        assert_eq!(sizes, [READ_CHUNK, READ_CHUNK, READ_CHUNK, 5]);
        assert_eq!(seen, bytes);
        // Stopped: an error, never a success; no chunk after the stop.
        let stop = AtomicBool::new(false);
        let mut chunks = 0;
        let r = read_region(&img, None, 0, len, &stop, |_| {
            chunks += 1;
            stop.store(true, Ordering::Relaxed);
        });
        assert!(r.is_err());
        assert_eq!(chunks, 1);
        let file = dir.path().join("zero.img");
        std::fs::write(&file, vec![0u8; 2 * READ_CHECK_BYTES]).unwrap();
        assert!(read_ends_until(&file, &AtomicBool::new(true)).is_err());
    }

    #[test]
    fn read_ends_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(4 * READ_CHECK_BYTES as u64).unwrap();
        assert_eq!(read_ends(&img).unwrap(), Ends { head_zero: true });
        // One byte at the very end of the first MiB.
        f.write_all_at(&[1], READ_CHECK_BYTES as u64 - 1).unwrap();
        assert_eq!(read_ends(&img).unwrap(), Ends { head_zero: false });
        // Exactly one MiB: head and tail are the same bytes.
        let one = dir.path().join("one.img");
        std::fs::write(&one, vec![0u8; READ_CHECK_BYTES]).unwrap();
        assert_eq!(read_ends(&one).unwrap(), Ends { head_zero: true });
        let short = dir.path().join("short.img");
        std::fs::write(&short, vec![0u8; READ_CHECK_BYTES - 1]).unwrap();
        assert!(read_ends(&short).is_err());
        assert!(read_ends(&dir.path().join("missing.img")).is_err());
    }

    #[test]
    fn any_other_outcome_is_an_error_never_blank() {
        for code in [Some(1), Some(4), Some(8), Some(127), None] {
            let r = interpret(Path::new(DEV), &out(code, ""), ok());
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
        // Too short to read 1 MiB: blkid finds nothing, but the read check fails.
        let short = dir.path().join("short.img");
        std::fs::write(&short, vec![0u8; 1024]).unwrap();
        assert!(probe(&short).is_err());
        // No signature, but not zeros: not blank.
        let noise = dir.path().join("noise.img");
        let bytes: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(&noise, bytes).unwrap();
        let r = probe(&noise);
        assert!(!matches!(r, Ok(Probe::Blank)), "{r:?}");
    }
}
