//! Shared fixtures for the node tests (included by `tests/node_ops.rs` and
//! `tests/node_service.rs` with `#[path]`): real loop devices on sparse files, a by-id
//! directory with `virtio-<serial>` links exactly as udev makes them (or the names other
//! buses get, [`Fixture::link_as`]), and cleanup that always unmounts and detaches, even
//! when a test panics.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Root with loop devices? If not, the caller prints the skip message and returns.
pub fn can_run() -> bool {
    let ok = nix::unistd::geteuid().is_root() && Path::new("/dev/loop-control").exists();
    if !ok {
        eprintln!("skipped: needs root and loop devices");
    }
    ok
}

pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("-V")
        .output()
        .map(|o| o.status.success() || !o.stdout.is_empty() || !o.stderr.is_empty())
        .unwrap_or(false)
}

pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A volume identification (36 characters, like Luna Node's UUIDs) whose first 20
/// characters are the disk's serial.
pub fn identification_of(disk: &Disk) -> String {
    format!("{}-{:015x}", disk.serial, 0xa9b8_0c1d_2e3f_u64)
}

/// One simulated attached disk.
#[derive(Debug, Clone)]
pub struct Disk {
    pub serial: String,
    pub file: PathBuf,
    pub dev: PathBuf,
    pub size: u64,
}

/// A temp root holding backing files, the by-id directory and mount targets. Dropping it
/// unmounts everything under the root (deepest first) and detaches its loop devices.
pub struct Fixture {
    pub root: tempfile::TempDir,
    pub by_id: PathBuf,
    loops: std::cell::RefCell<Vec<PathBuf>>,
    counter: std::cell::Cell<u32>,
}

impl Fixture {
    pub fn new() -> Fixture {
        let root = tempfile::Builder::new()
            .prefix("lunanode-node-test")
            .tempdir()
            .unwrap();
        let by_id = root.path().join("by-id");
        std::fs::create_dir_all(&by_id).unwrap();
        Fixture {
            root,
            by_id,
            loops: Default::default(),
            counter: Default::default(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    /// A 20-character serial unique to this fixture.
    pub fn new_serial(&self) -> String {
        let n = self.counter.get() + 1;
        self.counter.set(n);
        let base = format!("{:08x}-t{n:02}-", std::process::id());
        format!("{base:0<20}")[..20].to_string()
    }

    /// A sparse file attached to a loop device, without a by-id link yet.
    pub fn disk_unlinked(&self, size: u64) -> Disk {
        self.disk_unlinked_with(size, &[])
    }

    /// [`Fixture::disk_unlinked`] with more `losetup` options (e.g. `--sector-size 4096`).
    pub fn disk_unlinked_with(&self, size: u64, losetup: &[&str]) -> Disk {
        let serial = self.new_serial();
        let file = self.path(&format!("{serial}.img"));
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        let dev = self.attach(&file, losetup);
        Disk {
            serial,
            file,
            dev,
            size,
        }
    }

    fn attach(&self, file: &Path, losetup: &[&str]) -> PathBuf {
        let mut args = vec!["--find", "--show"];
        args.extend_from_slice(losetup);
        args.push(file.to_str().unwrap());
        let dev = PathBuf::from(run("losetup", &args).trim());
        self.loops.borrow_mut().push(dev.clone());
        dev
    }

    /// An attached disk (with its by-id link) every read of which fails with EIO: a loop
    /// device over a sparse file on an ext4 filesystem that is then shut down (`xfs_io`'s
    /// `shutdown` works on ext4 too). `None` without `xfs_io`.
    pub fn unreadable_disk(&self, size: u64) -> Option<Disk> {
        if !have("xfs_io") {
            eprintln!("skipped (unreadable disk): needs xfs_io");
            return None;
        }
        let outer = self.disk_unlinked(32 * MIB);
        mkfs("ext4", &outer.dev);
        let dir = self.path(&format!("{}-fs", outer.serial));
        std::fs::create_dir_all(&dir).unwrap();
        nix::mount::mount(
            Some(&outer.dev),
            &dir,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let file = dir.join("disk.img");
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        let dev = self.attach(&file, &[]);
        run("xfs_io", &["-x", "-c", "shutdown", dir.to_str().unwrap()]);
        let d = Disk {
            serial: self.new_serial(),
            file,
            dev,
            size,
        };
        self.link(&d);
        Some(d)
    }

    /// Create the `virtio-<serial>` link, as udev would.
    pub fn link(&self, disk: &Disk) {
        std::os::unix::fs::symlink(
            &disk.dev,
            self.by_id.join(format!("virtio-{}", disk.serial)),
        )
        .unwrap();
    }

    /// Create the by-id link `name` to the disk's device, as udev would for another bus
    /// (e.g. `ata-QEMU_HARDDISK_<serial>`).
    pub fn link_as(&self, disk: &Disk, name: &str) {
        std::os::unix::fs::symlink(&disk.dev, self.by_id.join(name)).unwrap();
    }

    /// An attached disk with its by-id link.
    pub fn disk(&self, size: u64) -> Disk {
        let d = self.disk_unlinked(size);
        self.link(&d);
        d
    }

    /// Grow the backing file and tell the loop device (like an offline cloud expansion).
    pub fn grow(&self, disk: &mut Disk, new_size: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk.file)
            .unwrap()
            .set_len(new_size)
            .unwrap();
        run("losetup", &["-c", disk.dev.to_str().unwrap()]);
        disk.size = new_size;
    }

    fn cleanup(&self) {
        let root = std::fs::canonicalize(self.root.path()).unwrap_or(self.root.path().into());
        for _ in 0..10 {
            let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let mut mine: Vec<PathBuf> = lunanode_csi::volumes::mount::parse_mountinfo(&text)
                .into_iter()
                .map(|m| m.mount_point)
                .filter(|p| p.starts_with(&root))
                .collect();
            if mine.is_empty() {
                break;
            }
            mine.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for p in mine {
                // Test cleanup only: the driver itself never detaches lazily.
                let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        // Newest first: a loop device may live on a filesystem on an older one.
        for dev in self.loops.borrow_mut().drain(..).rev() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).output();
        }
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture::new()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Put an MBR partition table on a device.
pub fn write_mbr(dev: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    let mut entry = vec![0u8, 0, 2, 0, 0x83, 0, 0, 0];
    entry.extend_from_slice(&2048u32.to_le_bytes());
    entry.extend_from_slice(&100_000u32.to_le_bytes());
    f.seek(SeekFrom::Start(446)).unwrap();
    f.write_all(&entry).unwrap();
    f.seek(SeekFrom::Start(510)).unwrap();
    f.write_all(&[0x55, 0xaa]).unwrap();
    f.sync_all().unwrap();
}

/// Format with a program directly (to prepare "existing data" cases).
pub fn mkfs(fs: &str, dev: &Path) {
    match fs {
        "ext4" => run("mkfs.ext4", &["-q", "-F", dev.to_str().unwrap()]),
        "xfs" => run("mkfs.xfs", &["-q", "-f", dev.to_str().unwrap()]),
        _ => unreachable!(),
    };
}

/// Mount a device briefly, write a file, unmount.
pub fn put_file(fs: &str, dev: &Path, dir: &Path, name: &str, content: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    nix::mount::mount(
        Some(dev),
        dir,
        Some(fs),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    std::fs::write(dir.join(name), content).unwrap();
    nix::unistd::sync();
    nix::mount::umount2(dir, nix::mount::MntFlags::empty()).unwrap();
}

/// The filesystem type blkid sees on a device (None when nothing).
pub fn blkid_type(dev: &Path) -> Option<String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(dev)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!s.is_empty()).then_some(s)
}

pub fn is_mount_point(p: &Path) -> bool {
    lunanode_csi::volumes::mount::mount_at(p).unwrap().is_some()
}

pub const MIB: u64 = 1 << 20;

/// Online ext4 resize (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE; a privileged node plugin
/// has it, some sandboxes do not.
pub fn can_resize_ext4_online() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let ok = eff & (1 << 24) != 0;
    if !ok {
        eprintln!("skipped (ext4 online growth): needs CAP_SYS_RESOURCE");
    }
    ok
}
