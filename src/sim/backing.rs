//! Where volume bytes live: nowhere (`memory`) or in sparse files attached as loop devices
//! (`loop`), with the by-id link udev would make on a real VM for a disk on the attachment's
//! bus (`virtio-<serial>`, `ata-QEMU_HARDDISK_<serial>` or `scsi-0QEMU_QEMU_HARDDISK_<serial>`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::Backing;
use super::state::{Bus, Source};

/// One GB as the cloud counts it.
pub const GIB: u64 = 1 << 30;

/// A loop device the simulator attached, and the link it made to it.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub device: PathBuf,
    pub link: PathBuf,
}

/// The bytes of the simulated cloud.
#[derive(Debug)]
pub struct Store {
    pub kind: Backing,
    pub state_dir: PathBuf,
    pub by_id_dir: PathBuf,
    losetup: PathBuf,
    /// Attached volumes by ID.
    pub attached: BTreeMap<u64, Attachment>,
}

/// `virtio-` plus the first 20 characters of the identification, as udev names it: the
/// link of a virtio disk ([`link_name_on`] for [`Bus::Virtio`]).
pub fn link_name(identification: &str) -> String {
    link_name_on(Bus::Virtio, identification)
}

/// The `/dev/disk/by-id` name udev gives a QEMU disk on `bus` whose serial is the volume's
/// identification (as OpenStack sets it):
/// - virtio: `virtio-<first 20 characters>` (a virtio-blk serial is 20 bytes);
/// - IDE/SATA: `ata-QEMU_HARDDISK_<first 20 characters>` (an ATA serial is 20 bytes);
/// - SCSI (virtio-scsi): `scsi-0QEMU_QEMU_HARDDISK_<up to 36 characters>`.
pub fn link_name_on(bus: Bus, identification: &str) -> String {
    let serial = |n: usize| identification.chars().take(n).collect::<String>();
    match bus {
        Bus::Virtio => format!("virtio-{}", serial(20)),
        Bus::Ide => format!("ata-QEMU_HARDDISK_{}", serial(20)),
        Bus::Scsi => format!("scsi-0QEMU_QEMU_HARDDISK_{}", serial(36)),
    }
}

/// Find a program on PATH (and in the sbin directories, which non-login PATHs may lack).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn run(program: &Path, args: &[&std::ffi::OsStr]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{} {:?} failed ({}): {}",
            program.display(),
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> String {
    let p = path.display().to_string();
    let what = what.to_string();
    move |e| format!("{what} {p}: {e}")
}

impl Store {
    pub fn new(kind: Backing, state_dir: PathBuf, by_id_dir: PathBuf) -> Result<Self, String> {
        let losetup = match kind {
            Backing::Memory => PathBuf::new(),
            Backing::Loop => find_program("losetup").ok_or("losetup not found on PATH")?,
        };
        let store = Store {
            kind,
            state_dir,
            by_id_dir,
            losetup,
            attached: BTreeMap::new(),
        };
        fs::create_dir_all(&store.by_id_dir).map_err(io("cannot create", &store.by_id_dir))?;
        if kind == Backing::Loop {
            for d in ["volumes", "snapshots", "images"] {
                let p = store.state_dir.join(d);
                fs::create_dir_all(&p).map_err(io("cannot create", &p))?;
            }
        }
        Ok(store)
    }

    fn is_loop(&self) -> bool {
        self.kind == Backing::Loop
    }

    pub fn volume_file(&self, id: u64) -> PathBuf {
        self.state_dir.join("volumes").join(format!("vol-{id}.img"))
    }
    pub fn snapshot_file(&self, id: &str) -> PathBuf {
        self.state_dir.join("snapshots").join(format!("{id}.img"))
    }
    pub fn image_file(&self, id: u64) -> PathBuf {
        self.state_dir.join("images").join(format!("{id}.img"))
    }

    /// A sparse-aware copy (`cp --sparse=always`), replacing `dst`.
    fn copy(&self, src: &Path, dst: &Path) -> Result<(), String> {
        let _ = fs::remove_file(dst);
        let cp = find_program("cp").ok_or("cp not found on PATH")?;
        run(
            &cp,
            &["--sparse=always".as_ref(), src.as_os_str(), dst.as_os_str()],
        )
        .map(|_| ())
    }

    fn set_size(path: &Path, size_gb: u64) -> Result<(), String> {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io("cannot open", path))?;
        f.set_len(size_gb * GIB).map_err(io("cannot resize", path))
    }

    /// Make a new volume's file: empty (sparse) or a copy of a snapshot or image.
    pub fn create_volume(&mut self, id: u64, size_gb: u64, source: &Source) -> Result<(), String> {
        if !self.is_loop() {
            return Ok(());
        }
        let path = self.volume_file(id);
        match source {
            Source::Empty => {
                let f = fs::File::create(&path).map_err(io("cannot create", &path))?;
                f.set_len(size_gb * GIB)
                    .map_err(io("cannot resize", &path))?;
            }
            Source::Snapshot(s) => self.copy(&self.snapshot_file(s), &path)?,
            Source::Image(i) => self.copy(&self.image_file(*i), &path)?,
        }
        Self::set_size(&path, size_gb)
    }

    pub fn delete_volume(&mut self, id: u64) -> Result<(), String> {
        if self.attached.contains_key(&id) {
            self.detach(id)?;
        }
        if self.is_loop() {
            remove_file(&self.volume_file(id))?;
        }
        Ok(())
    }

    /// Attach the volume's file as a loop device and link the by-id name of a disk on `bus`
    /// to it (only that one: an IDE disk has no `virtio-` link). Returns the device.
    pub fn attach(
        &mut self,
        id: u64,
        identification: &str,
        bus: Bus,
    ) -> Result<Option<PathBuf>, String> {
        if !self.is_loop() {
            return Ok(None);
        }
        if let Some(a) = self.attached.get(&id) {
            return Ok(Some(a.device.clone()));
        }
        let file = self.volume_file(id);
        let dev = run(
            &self.losetup,
            &["--find".as_ref(), "--show".as_ref(), file.as_os_str()],
        )?;
        let device = PathBuf::from(dev);
        let link = self.by_id_dir.join(link_name_on(bus, identification));
        let _ = fs::remove_file(&link);
        if let Err(e) = std::os::unix::fs::symlink(&device, &link) {
            let _ = run(&self.losetup, &["-d".as_ref(), device.as_os_str()]);
            return Err(format!("cannot link {}: {e}", link.display()));
        }
        tracing::debug!(volume = id, device = %device.display(), link = %link.display(), "sim: attached");
        self.attached.insert(
            id,
            Attachment {
                device: device.clone(),
                link,
            },
        );
        Ok(Some(device))
    }

    /// Remove the link and detach the loop device.
    pub fn detach(&mut self, id: u64) -> Result<(), String> {
        let Some(a) = self.attached.remove(&id) else {
            return Ok(());
        };
        if fs::read_link(&a.link).is_ok_and(|t| t == a.device) {
            let _ = fs::remove_file(&a.link);
        }
        run(&self.losetup, &["-d".as_ref(), a.device.as_os_str()])?;
        // The kernel may tear the device down lazily (while something still has it open);
        // wait a little so that "detached" means gone, as on a real VM.
        if !wait_unbound(&a.device, std::time::Duration::from_secs(3)) {
            tracing::warn!(device = %a.device.display(), "sim: loop device still bound after detach (in use?)");
        }
        Ok(())
    }

    pub fn extend(&mut self, id: u64, size_gb: u64) -> Result<(), String> {
        if !self.is_loop() {
            return Ok(());
        }
        Self::set_size(&self.volume_file(id), size_gb)?;
        if let Some(a) = self.attached.get(&id) {
            run(&self.losetup, &["-c".as_ref(), a.device.as_os_str()])?;
        }
        Ok(())
    }

    pub fn snapshot(&mut self, volume_id: u64, snapshot_id: &str) -> Result<(), String> {
        if !self.is_loop() {
            return Ok(());
        }
        self.copy(
            &self.volume_file(volume_id),
            &self.snapshot_file(snapshot_id),
        )
    }

    pub fn delete_snapshot(&mut self, snapshot_id: &str) -> Result<(), String> {
        if !self.is_loop() {
            return Ok(());
        }
        remove_file(&self.snapshot_file(snapshot_id))
    }

    pub fn replicate(&mut self, snapshot_id: &str, image_id: u64) -> Result<(), String> {
        if !self.is_loop() {
            return Ok(());
        }
        self.copy(&self.snapshot_file(snapshot_id), &self.image_file(image_id))
    }

    pub fn delete_image(&mut self, image_id: u64) -> Result<(), String> {
        if !self.is_loop() {
            return Ok(());
        }
        remove_file(&self.image_file(image_id))
    }

    /// Detach every loop device and remove every link the simulator made.
    pub fn cleanup(&mut self) {
        let ids: Vec<u64> = self.attached.keys().copied().collect();
        for id in ids {
            if let Err(e) = self.detach(id) {
                tracing::warn!(volume = id, error = %e, "sim: cleanup could not detach");
            }
        }
    }
}

/// Wait until a loop device has no backing file (true) or the time is up (false).
fn wait_unbound(device: &Path, limit: std::time::Duration) -> bool {
    let Some(name) = device.file_name() else {
        return true;
    };
    let backing = Path::new("/sys/block").join(name).join("loop/backing_file");
    let deadline = std::time::Instant::now() + limit;
    loop {
        if !backing.exists() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn remove_file(p: &Path) -> Result<(), String> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}", p.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_name_takes_twenty_chars() {
        assert_eq!(
            link_name("8b48723c-f53a-4717-9f04-fa194869db18"),
            "virtio-8b48723c-f53a-4717-9"
        );
    }

    #[test]
    fn link_names_per_bus() {
        let id = "8b48723c-f53a-4717-9f04-fa194869db18";
        assert_eq!(link_name_on(Bus::Virtio, id), link_name(id));
        assert_eq!(
            link_name_on(Bus::Ide, id),
            "ata-QEMU_HARDDISK_8b48723c-f53a-4717-9"
        );
        assert_eq!(
            link_name_on(Bus::Scsi, id),
            "scsi-0QEMU_QEMU_HARDDISK_8b48723c-f53a-4717-9f04-fa194869db18"
        );
        assert_eq!(
            link_name_on(Bus::Scsi, &format!("{id}-and-more")),
            format!("scsi-0QEMU_QEMU_HARDDISK_{id}")
        );
        assert_eq!(link_name_on(Bus::Ide, "short"), "ata-QEMU_HARDDISK_short");
    }

    #[test]
    fn finds_programs() {
        assert!(find_program("sh").is_some());
        assert!(find_program("no-such-program-here").is_none());
    }

    #[test]
    fn memory_store_touches_nothing_but_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::new(
            Backing::Memory,
            dir.path().to_path_buf(),
            dir.path().join("by-id"),
        )
        .unwrap();
        s.create_volume(1, 1, &Source::Empty).unwrap();
        assert_eq!(s.attach(1, "abc", Bus::Ide).unwrap(), None);
        s.snapshot(1, "x").unwrap();
        s.cleanup();
        assert!(!dir.path().join("volumes").exists());
        assert!(dir.path().join("by-id").is_dir());
    }

    #[test]
    fn loop_files_are_sparse_copies() {
        // File work only (no loop devices): needs cp, not root.
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store {
            kind: Backing::Loop,
            state_dir: dir.path().to_path_buf(),
            by_id_dir: dir.path().join("by-id"),
            losetup: PathBuf::from("/nonexistent/losetup"),
            attached: BTreeMap::new(),
        };
        for d in ["volumes", "snapshots", "images"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        s.create_volume(1, 2, &Source::Empty).unwrap();
        let f = s.volume_file(1);
        assert_eq!(fs::metadata(&f).unwrap().len(), 2 * GIB);
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut h = fs::OpenOptions::new().write(true).open(&f).unwrap();
            h.seek(SeekFrom::Start(GIB)).unwrap();
            h.write_all(b"hello").unwrap();
        }
        s.snapshot(1, "snap").unwrap();
        s.create_volume(2, 3, &Source::Snapshot("snap".into()))
            .unwrap();
        s.replicate("snap", 9).unwrap();
        s.create_volume(3, 2, &Source::Image(9)).unwrap();
        for id in [2, 3] {
            let p = s.volume_file(id);
            let data = read_at(&p, GIB, 5);
            assert_eq!(data, b"hello");
            use std::os::unix::fs::MetadataExt;
            let m = fs::metadata(&p).unwrap();
            assert!(m.blocks() * 512 < 64 << 20, "copy is not sparse");
        }
        assert_eq!(fs::metadata(s.volume_file(2)).unwrap().len(), 3 * GIB);
        s.extend(1, 4).unwrap();
        assert_eq!(fs::metadata(&f).unwrap().len(), 4 * GIB);
        s.delete_volume(1).unwrap();
        assert!(!f.exists());
        s.delete_snapshot("snap").unwrap();
        s.delete_image(9).unwrap();
        assert!(!s.snapshot_file("snap").exists() && !s.image_file(9).exists());
    }

    fn read_at(p: &Path, off: u64, n: usize) -> Vec<u8> {
        use std::io::{Read, Seek, SeekFrom};
        let mut h = fs::File::open(p).unwrap();
        h.seek(SeekFrom::Start(off)).unwrap();
        let mut buf = vec![0; n];
        h.read_exact(&mut buf).unwrap();
        buf
    }
}
