//! Mounting, bind-mounting and unmounting through `mount(2)`/`umount2(2)`, and answering "is
//! this path a mount point, and of what" from `/proc/self/mountinfo`.
//!
//! Mount tables are compared by device number (major:minor) and root, never by device name,
//! so `/dev/vdc`, `/dev/disk/by-id/...` and `/dev/loop3` spellings cannot confuse them.
//! Unmounting never uses lazy or forced unmounts: a busy mount is reported as busy.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use super::VolumeError;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_id: u32,
    pub parent_id: u32,
    pub major: u64,
    pub minor: u64,
    /// The path inside the source filesystem that is mounted (`/` unless a bind of a subtree).
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`, ...).
    pub options: String,
    pub fs_type: String,
    /// The mount source (a device path for disk filesystems).
    pub source: String,
    pub super_options: String,
}

impl MountInfo {
    /// Whether the mount is read-only.
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }

    /// Whether the filesystem itself (the superblock) is read-only while this mount point is
    /// read-write: what the kernel does after I/O or corruption errors (ext4
    /// `errors=remount-ro`, xfs shutdown). Writes then fail although the mount says `rw`.
    pub fn kernel_remounted_read_only(&self) -> bool {
        !self.read_only() && self.super_options.split(',').any(|o| o == "ro")
    }

    /// Whether the mounted filesystem lives on the device with this device number.
    pub fn is_device(&self, rdev: u64) -> bool {
        (self.major, self.minor) == super::device::major_minor(rdev)
    }

    /// Whether two mounts show the same filesystem subtree (e.g. a bind and its source).
    pub fn same_source(&self, other: &MountInfo) -> bool {
        self.major == other.major && self.minor == other.minor && self.root == other.root
    }
}

/// Undo the octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash) the
/// kernel uses in mountinfo paths.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if v <= 255 {
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_line(line: &str) -> Option<MountInfo> {
    let mut fields = line.split(' ');
    let mount_id = fields.next()?.parse().ok()?;
    let parent_id = fields.next()?.parse().ok()?;
    let (maj, min) = fields.next()?.split_once(':')?;
    let root = unescape(fields.next()?);
    let mount_point = PathBuf::from(unescape(fields.next()?));
    let options = fields.next()?.to_string();
    // Optional fields, up to the "-" separator.
    for f in fields.by_ref() {
        if f == "-" {
            break;
        }
    }
    let fs_type = unescape(fields.next()?);
    let source = unescape(fields.next()?);
    let super_options = fields.next().unwrap_or("").to_string();
    Some(MountInfo {
        mount_id,
        parent_id,
        major: maj.parse().ok()?,
        minor: min.parse().ok()?,
        root,
        mount_point,
        options,
        fs_type,
        source,
        super_options,
    })
}

/// Parse the text of a mountinfo file; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_line).collect()
}

/// The current mount table of this process's mount namespace.
pub fn mounts() -> Result<Vec<MountInfo>, VolumeError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| VolumeError::io("cannot read /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

/// The path as the kernel reports it in mountinfo: the parent resolved (symlinks, `.`), the
/// last component kept as is (so a broken mount point itself is never stat-ed).
pub fn resolve(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => match std::fs::canonicalize(parent) {
            Ok(p) => p.join(name),
            Err(_) => path.to_path_buf(),
        },
        _ => path.to_path_buf(),
    }
}

/// The topmost mount at `path` in `table`, if `path` is a mount point.
pub fn find_mount<'a>(table: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    let want = resolve(path);
    table
        .iter()
        .rev()
        .find(|m| m.mount_point == want || m.mount_point == path)
}

/// The topmost mount at `path`, if `path` is a mount point.
pub fn mount_at(path: &Path) -> Result<Option<MountInfo>, VolumeError> {
    Ok(find_mount(&mounts()?, path).cloned())
}

/// Mount options split into `mount(2)` flags and the filesystem-specific data string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub data: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            data: Vec::new(),
        }
    }
}

impl MountOptions {
    /// Parse CSI `mount_flags` (each may itself be comma-separated). Options that would
    /// change what is mounted (bind, remount, move, propagation) are refused.
    pub fn parse<S: AsRef<str>>(flags: &[S]) -> Result<MountOptions, String> {
        let mut o = MountOptions::default();
        for opt in flags
            .iter()
            .flat_map(|f| f.as_ref().split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (set, clear) = match opt {
                "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
                "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
                "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
                "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
                "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
                "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
                "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
                "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
                "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
                "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
                "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
                "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
                "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
                "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
                "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
                "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
                "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
                "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
                "lazytime" => (MsFlags::MS_LAZYTIME, MsFlags::empty()),
                "nolazytime" => (MsFlags::empty(), MsFlags::MS_LAZYTIME),
                // fstab-only options: meaningless here.
                "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "nouser" => {
                    (MsFlags::empty(), MsFlags::empty())
                }
                "bind" | "rbind" | "remount" | "move" | "shared" | "rshared" | "private"
                | "rprivate" | "slave" | "rslave" | "unbindable" | "runbindable" => {
                    return Err(format!("mount option {opt:?} is not allowed"));
                }
                other => {
                    o.data.push(other.to_string());
                    continue;
                }
            };
            o.flags.insert(set);
            o.flags.remove(clear);
        }
        Ok(o)
    }

    /// The per-mount-point flags (those a bind mount can carry too).
    pub fn per_mount_flags(&self) -> MsFlags {
        self.flags
            & (MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC
                | MsFlags::MS_NOATIME
                | MsFlags::MS_NODIRATIME
                | MsFlags::MS_RELATIME
                | MsFlags::MS_STRICTATIME)
    }

    fn data_string(&self) -> Option<String> {
        (!self.data.is_empty()).then(|| self.data.join(","))
    }
}

/// Mount the filesystem on `device` at `target`.
pub fn mount_fs(
    device: &Path,
    target: &Path,
    fs_type: &str,
    options: &MountOptions,
) -> Result<(), VolumeError> {
    let data = options.data_string();
    tracing::info!(device = %device.display(), target = %target.display(), fs_type, "mounting");
    nix::mount::mount(
        Some(device),
        target,
        Some(fs_type),
        options.flags,
        data.as_deref(),
    )
    .map_err(|e| {
        VolumeError::errno(
            format!(
                "cannot mount {} ({fs_type}) at {}",
                device.display(),
                target.display()
            ),
            e,
        )
    })
}

/// Bind-mount `source` (a directory or a device node) onto `target`, then apply `flags`
/// (e.g. `MS_RDONLY`) to the new mount point with a bind remount.
pub fn bind(source: &Path, target: &Path, flags: MsFlags) -> Result<(), VolumeError> {
    tracing::info!(source = %source.display(), target = %target.display(), ?flags, "bind mounting");
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| {
        VolumeError::errno(
            format!(
                "cannot bind-mount {} at {}",
                source.display(),
                target.display()
            ),
            e,
        )
    })?;
    if !flags.is_empty() {
        let remount = nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
            None::<&str>,
        );
        if let Err(e) = remount {
            // Do not leave a writable mount behind where a read-only one was asked for.
            let _ = nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW);
            return Err(VolumeError::errno(
                format!("cannot remount {} with {flags:?}", target.display()),
                e,
            ));
        }
    }
    Ok(())
}

/// Unmount everything mounted at `target` (stacked mounts included). A path that is not
/// mounted or does not exist is success. Returns whether anything was unmounted. A busy
/// mount is [`VolumeError::Busy`]; lazy or forced unmounts are never used.
pub fn unmount(target: &Path) -> Result<bool, VolumeError> {
    let mut unmounted = false;
    for _ in 0..16 {
        if mount_at(target)?.is_none() {
            return Ok(unmounted);
        }
        tracing::info!(target = %target.display(), "unmounting");
        match nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => unmounted = true,
            // Not a mount point (any more) or gone: someone else got there first.
            Err(Errno::EINVAL) | Err(Errno::ENOENT) => return Ok(unmounted),
            Err(Errno::EBUSY) => {
                return Err(VolumeError::Busy {
                    path: target.to_path_buf(),
                    reason: "the mount is in use (EBUSY)".into(),
                });
            }
            Err(e) => {
                return Err(VolumeError::errno(
                    format!("cannot unmount {}", target.display()),
                    e,
                ));
            }
        }
    }
    Err(VolumeError::Busy {
        path: target.to_path_buf(),
        reason: "still mounted after unmounting 16 stacked mounts".into(),
    })
}

/// Create `path` (and parents) as a directory; an existing directory is fine.
pub fn ensure_dir(path: &Path) -> Result<(), VolumeError> {
    std::fs::create_dir_all(path)
        .map_err(|e| VolumeError::io(format!("cannot create directory {}", path.display()), e))
}

/// Create `path` as an empty regular file (parents too) for a device bind mount; an
/// existing file is fine.
pub fn ensure_file(path: &Path) -> Result<(), VolumeError> {
    if let Some(parent) = path.parent() {
        ensure_dir(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(VolumeError::io(
            format!(
                "{} is a directory; a block volume needs a file target",
                path.display()
            ),
            std::io::Error::from(ErrorKind::IsADirectory),
        )),
        Ok(_) => Ok(()),
        Err(_) => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map(drop)
            .map_err(|e| VolumeError::io(format!("cannot create file {}", path.display()), e)),
    }
}

/// Remove a mount target left behind after unmounting: an empty directory or a regular file.
/// Gone already is fine; a non-empty directory is left in place (it holds data that is not
/// ours) and reported with a warning. Never removes a mount point.
pub fn remove_target(path: &Path) -> Result<(), VolumeError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(VolumeError::io(
                format!("cannot stat {}", path.display()),
                e,
            ));
        }
    };
    if mount_at(path)?.is_some() {
        return Err(VolumeError::Busy {
            path: path.to_path_buf(),
            reason: "still a mount point".into(),
        });
    }
    let res = if meta.is_dir() {
        std::fs::remove_dir(path)
    } else if meta.is_file() {
        std::fs::remove_file(path)
    } else {
        tracing::warn!(path = %path.display(), "not removing: neither a directory nor a regular file");
        return Ok(());
    };
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => {
            tracing::warn!(path = %path.display(), "not removing: directory is not empty");
            Ok(())
        }
        Err(e) => Err(VolumeError::io(
            format!("cannot remove {}", path.display()),
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
40 22 7:3 / /var/lib/kubelet/plugins/x/globalmount rw,relatime shared:30 - ext4 /dev/loop3 rw
41 22 7:3 / /var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/pv\\040one/mount ro,relatime shared:30 - ext4 /dev/loop3 rw
42 22 0:5 /loop3 /var/lib/kubelet/pods/p/volumeDevices/dev rw,nosuid - devtmpfs udev rw,size=1k
43 22 7:4 / /stacked rw - xfs /dev/loop4 rw
44 43 7:5 / /stacked rw - xfs /dev/loop5 rw
";

    #[test]
    fn parses_and_unescapes() {
        let t = parse_mountinfo(SAMPLE);
        assert_eq!(t.len(), 7);
        assert_eq!(t[1].root, "/mnt1");
        assert_eq!(t[1].fs_type, "ext3");
        assert_eq!(t[1].source, "/dev/root");
        assert_eq!((t[2].major, t[2].minor), (7, 3));
        let pub_ = find_mount(
            &t,
            Path::new("/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/pv one/mount"),
        )
        .unwrap();
        assert!(pub_.read_only());
        assert!(pub_.same_source(&t[2]));
        assert!(!t[2].read_only());
        assert!(t[2].is_device(nix::sys::stat::makedev(7, 3)));
        assert!(!t[2].is_device(nix::sys::stat::makedev(7, 4)));
        assert_eq!(find_mount(&t, Path::new("/stacked")).unwrap().minor, 5);
        assert!(find_mount(&t, Path::new("/nothing")).is_none());
    }

    #[test]
    fn superblock_read_only_under_a_rw_mount_is_noticed() {
        let t = parse_mountinfo(
            "\
50 22 7:3 / /gm rw,relatime shared:30 - ext4 /dev/loop3 ro,errors=remount-ro
51 22 7:3 / /pub ro,relatime shared:30 - ext4 /dev/loop3 ro,errors=remount-ro
52 22 7:4 / /ok rw,relatime - ext4 /dev/loop4 rw,errors=remount-ro
53 22 7:5 / /opt rw,relatime - xfs /dev/loop5 rw,attr2,rotational=0
",
        );
        assert_eq!(t[0].super_options, "ro,errors=remount-ro");
        assert!(t[0].kernel_remounted_read_only());
        // Mounted read-only on purpose: nothing wrong.
        assert!(!t[1].kernel_remounted_read_only());
        assert!(!t[2].kernel_remounted_read_only());
        // "ro" must be a whole option, not a prefix of another ("rotational=0").
        assert!(!t[3].kernel_remounted_read_only());
    }

    #[test]
    fn unescape_octal() {
        assert_eq!(unescape("a\\040b\\011c\\012d\\134e"), "a b\tc\nd\\e");
        assert_eq!(unescape("no\\escape\\9"), "no\\escape\\9");
        assert_eq!(unescape("end\\04"), "end\\04");
    }

    #[test]
    fn this_process_sees_its_root_mount() {
        let t = mounts().unwrap();
        assert!(find_mount(&t, Path::new("/")).is_some());
    }

    #[test]
    fn mount_options() {
        let o =
            MountOptions::parse(&["noatime,nodev", "discard", "ro", "errors=remount-ro"]).unwrap();
        assert!(
            o.flags
                .contains(MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_RDONLY)
        );
        assert_eq!(o.data, ["discard", "errors=remount-ro"]);
        let o = MountOptions::parse(&["ro", "rw", "defaults"]).unwrap();
        assert!(o.flags.is_empty());
        assert!(MountOptions::parse(&["bind"]).is_err());
        assert!(MountOptions::parse(&["noatime,remount"]).is_err());
        let none: [&str; 0] = [];
        assert_eq!(MountOptions::parse(&none).unwrap(), MountOptions::default());
    }

    #[test]
    fn unmounting_what_is_not_mounted_is_success() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!unmount(dir.path()).unwrap());
        assert!(!unmount(&dir.path().join("gone")).unwrap());
    }

    #[test]
    fn targets_are_created_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b/target");
        ensure_dir(&d).unwrap();
        ensure_dir(&d).unwrap();
        remove_target(&d).unwrap();
        assert!(!d.exists());
        remove_target(&d).unwrap();
        let f = dir.path().join("c/dev");
        ensure_file(&f).unwrap();
        ensure_file(&f).unwrap();
        assert!(f.is_file());
        remove_target(&f).unwrap();
        assert!(!f.exists());
        // A non-empty directory is left alone.
        ensure_dir(&d).unwrap();
        std::fs::write(d.join("data"), b"x").unwrap();
        remove_target(&d).unwrap();
        assert!(d.join("data").exists());
        assert!(ensure_file(&d).is_err());
    }
}
