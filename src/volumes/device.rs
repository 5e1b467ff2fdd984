//! Finding the attached disk of a volume by its stable identity, and verifying it.
//!
//! A volume's disk is found only through the `/dev/disk/by-id` names udev gives a KVM/QEMU
//! disk carrying the volume's serial, never by device letter or attach order. Which names
//! exist depends on the bus the disk came on (virtio-blk, virtio-scsi, IDE/SATA), which
//! depends on the attach target and the VM; [`candidate_names`] lists them all, and [`find`]
//! waits for any of them. Whatever it finds is verified before it is returned: every
//! candidate link present must resolve to the same device, that device must be a block
//! device of the volume's size, and the serial the kernel reports for it (when sysfs has
//! one: `serial` for virtio-blk, `device/vpd_pg80` for SCSI and ATA disks) must be the
//! volume's. A disk that does not appear is reported with what the node does have
//! ([`VolumeError::DeviceNotFound`]), so an operator sees at once whether it came under a
//! name nobody looked for.
//!
//! The entry points: [`DiskId`] (what to look for), [`candidate_names`] (the names, each
//! with the udev rule that makes it), [`find`] (wait, resolve, verify), [`aliases`] (every
//! by-id name of a device), [`still_same`] (re-check before a destructive step).
//!
//! ```no_run
//! use std::path::Path;
//! use std::time::Duration;
//! use lunanode_csi::volumes::device::{self, DeviceWait, DiskId};
//!
//! let by_id = Path::new("/dev/disk/by-id");
//! let disk = DiskId {
//!     serial: "6a3b1f0e-2c4d-4e5f-8".into(),
//!     identification: Some("6a3b1f0e-2c4d-4e5f-8a9b-0c1d2e3f4a5b".into()),
//! };
//! let wait = DeviceWait::with_timeout(Duration::from_secs(60));
//! match device::find(by_id, &disk, Some(10 << 30), &wait) {
//!     Ok(dev) => {
//!         // "/dev/sdb (8:16, 10737418240 bytes) found under ata-QEMU_HARDDISK_6a3b…
//!         //  (IDE/SATA, …; serial = the first 20 characters of the identification);
//!         //  serial rule held (SCSI unit serial (vpd_pg80) "6a3b…", 20 characters)"
//!         println!("{}", dev.describe());
//!         println!("the disk appeared under: {}", dev.aliases.join(", "));
//!         if let Some(c) = &dev.found_as {
//!             println!("bus {}, name rule: {}", c.bus, c.rule);
//!         }
//!     }
//!     // DeviceNotFound lists the names looked for and what the directory holds.
//!     Err(e) => eprintln!("{e}"),
//! }
//! ```

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::VolumeError;

/// Length of a virtio-blk (and ATA) serial: KVM truncates the volume identification to 20
/// characters (`VIRTIO_BLK_ID_BYTES`; the ATA IDENTIFY serial field is 20 bytes too).
pub const SERIAL_LEN: usize = 20;

/// Longest unit serial (VPD page 0x80) QEMU's scsi-hd reports (`MAX_SERIAL_LEN` in
/// `hw/scsi/scsi-disk.c`); a longer serial was silently cut there before QEMU 9.1.
pub const SCSI_SERIAL_LEN: usize = 36;

/// The virtio serial for a volume identification (its first 20 characters).
pub fn serial_for(identification: &str) -> String {
    identification.chars().take(SERIAL_LEN).collect()
}

/// The by-id link udev creates for a virtio-blk disk with this serial. Only one of the
/// names a disk can have; [`candidate_names`] lists them all.
pub fn by_id_link(by_id_dir: &Path, serial: &str) -> PathBuf {
    by_id_dir.join(format!("virtio-{serial}"))
}

/// A serial is used as a file name: refuse anything that could escape the by-id directory.
pub fn valid_serial(serial: &str) -> bool {
    !serial.is_empty()
        && serial.len() <= 64
        && serial
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && serial != "."
        && serial != ".."
}

/// Which volume's disk to look for.
///
/// `serial` is the volume's serial as the controller passes it (publish_context `serial`):
/// the first 20 characters of the volume's `identification`; a longer value is cut to 20
/// (and, when `identification` is `None`, also taken as the identification). `identification`
/// is the full identification (publish_context `identification`), when known: QEMU's SCSI
/// disks can carry up to 36 characters of it, so with it more names are looked for and the
/// kernel's SCSI serial can be checked in full. Both must pass [`valid_serial`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskId {
    pub serial: String,
    pub identification: Option<String>,
}

impl DiskId {
    /// The disk of a volume whose full identification is known.
    pub fn from_identification(identification: &str) -> DiskId {
        DiskId {
            serial: serial_for(identification),
            identification: Some(identification.to_string()),
        }
    }

    /// The 20-character serial and the full identification (if known), checked: both valid
    /// file-name parts, and the serial the identification's first 20 characters.
    pub fn normalized(&self) -> Result<(String, Option<String>), String> {
        let given = self.serial.trim();
        let full = self
            .identification
            .as_deref()
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .or((given.chars().count() > SERIAL_LEN).then_some(given));
        for (what, v) in [("serial", Some(given)), ("identification", full)] {
            if let Some(v) = v
                && !valid_serial(v)
            {
                return Err(format!("{what} {v:?} is not a valid disk serial"));
            }
        }
        let serial = serial_for(given);
        if let Some(full) = full
            && serial_for(full) != serial
        {
            return Err(format!(
                "serial {serial:?} is not the first {SERIAL_LEN} characters of identification {full:?}"
            ));
        }
        Ok((serial, full.map(str::to_string)))
    }
}

impl std::fmt::Display for DiskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.normalized() {
            Ok((serial, Some(full))) if full != serial => {
                write!(f, "serial {serial} (identification {full})")
            }
            Ok((serial, _)) => write!(f, "serial {serial}"),
            Err(_) => write!(f, "serial {:?}", self.serial),
        }
    }
}

/// The bus a disk came on, as its by-id name tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bus {
    /// virtio-blk (`/dev/vd*`): Luna Node's `volume_virtio`, attach target `/dev/vda`.
    VirtioBlk,
    /// virtio-scsi with QEMU's `scsi-hd` (`/dev/sd*`, vendor `QEMU`, model `QEMU HARDDISK`).
    VirtioScsi,
    /// IDE or SATA (AHCI), through libata (`/dev/sd*`, model `QEMU HARDDISK`): attach target
    /// `/dev/hda`, and possibly `auto`.
    Ata,
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bus::VirtioBlk => "virtio-blk",
            Bus::VirtioScsi => "virtio-scsi",
            Bus::Ata => "IDE/SATA",
        })
    }
}

/// Which udev rule makes a by-id name (see [`candidate_names`] for the sources).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// systemd `60-persistent-storage.rules`: `virtio-$attr{serial}` for `vd*` disks.
    VirtioSerial,
    /// systemd `60-persistent-storage.rules`: `$env{ID_BUS}-$env{ID_SERIAL}` with `ata_id`
    /// (`ID_BUS=ata`, `ID_SERIAL=<model>_<serial>`).
    AtaId,
    /// `$env{ID_BUS}-$env{ID_SERIAL}` with `scsi_id --whitelisted` (VPD page 0x83's
    /// vendor-specific designator: `0<vendor>_<model>_<id>`), and sg3_utils'
    /// `58-scsi-sg3_symlink.rules` `scsi-0…` link for the same designator.
    ScsiVendorSpecific,
    /// sg3_utils `58-scsi-sg3_symlink.rules`: `scsi-S<vendor>_<model>_<VPD 0x80 serial>`.
    ScsiUnitSerial,
    /// sg3_utils `58-scsi-sg3_symlink.rules`: `scsi-1<T10 vendor ID>` (VPD page 0x83), which
    /// libata builds as `ATA_<model>_<serial>`.
    ScsiT10,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Rule::VirtioSerial => "udev virtio-$attr{serial}",
            Rule::AtaId => "udev ata_id: ata-<model>_<serial>",
            Rule::ScsiVendorSpecific => "udev scsi_id/sg3_utils: VPD 0x83 vendor-specific id",
            Rule::ScsiUnitSerial => "sg3_utils: VPD 0x80 unit serial",
            Rule::ScsiT10 => "sg3_utils: VPD 0x83 T10 vendor id",
        })
    }
}

/// One by-id name a disk with the volume's serial can get, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// The file name in the by-id directory, e.g. `ata-QEMU_HARDDISK_6a3b1f0e-2c4d-4e5f-8`.
    pub name: String,
    /// The bus a disk with this name is on.
    pub bus: Bus,
    /// The udev rule that makes the name.
    pub rule: Rule,
    /// The serial inside the name: the first 20 characters of the identification, or (for
    /// SCSI only) up to [`SCSI_SERIAL_LEN`] characters of it.
    pub serial: String,
    /// Whether `serial` is the whole identification (longer than 20 characters) rather than
    /// its first 20 characters.
    pub full_identification: bool,
}

impl Candidate {
    /// How the serial in the name relates to the identification, e.g. `first 20 characters`.
    pub fn serial_rule(&self) -> String {
        if self.full_identification {
            format!(
                "the whole identification ({} characters)",
                self.serial.chars().count()
            )
        } else {
            format!(
                "the first {} characters of the identification",
                self.serial.chars().count()
            )
        }
    }
}

impl std::fmt::Display for Candidate {
    /// `ata-QEMU_HARDDISK_x (IDE/SATA, udev ata_id: …; serial = the first 20 characters of
    /// the identification)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {}; serial = {})",
            self.name,
            self.bus,
            self.rule,
            self.serial_rule()
        )
    }
}

/// Every by-id name udev gives a KVM/QEMU disk carrying this serial, most likely first.
///
/// `serial` is the volume's 20-character serial (longer input is cut to 20); `identification`
/// the full identification when known. Names with the full identification are added only
/// when it is longer than 20 characters. Callers are expected to have checked both with
/// [`valid_serial`] (or [`DiskId::normalized`]); [`find`] does.
///
/// The names, and where they come from:
/// - `virtio-<serial20>`: virtio-blk. systemd `rules.d/60-persistent-storage.rules`:
///   `KERNEL=="vd*[!0-9]", ATTRS{serial}=="?*", … SYMLINK+="disk/by-id/virtio-$env{ID_SERIAL}"`.
///   The virtio-blk serial is at most 20 bytes (`VIRTIO_BLK_ID_BYTES`), so
///   `virtio-<whole identification>` cannot appear (cinder-csi tries it anyway).
/// - `scsi-0QEMU_QEMU_HARDDISK_<serial>`: virtio-scsi (`scsi-hd`). The same rules file runs
///   `scsi_id --export --whitelisted` and links `$env{ID_BUS}-$env{ID_SERIAL}`; for QEMU's
///   disk ID_SERIAL is `0` + vendor + model + the VPD 0x83 vendor-specific id, which QEMU
///   fills with the serial's first 20 characters (`device_id` defaults to `"%.20s"` of the
///   serial in `hw/scsi/scsi-disk.c`); other QEMU versions and an explicit `device_id`
///   carry the whole identification. Both are tried, as kubernetes/cloud-provider-openstack
///   `pkg/util/mount/mount.go` `getDevicePathBySerialID` does (its issue #852 shows
///   `scsi-0QEMU_QEMU_HARDDISK_<whole UUID>` on a Ceph-backed OpenStack).
/// - `scsi-SQEMU_QEMU_HARDDISK_<serial>`: the VPD 0x80 unit serial (up to 36 characters in
///   QEMU), linked by sg3_utils `scripts/58-scsi-sg3_symlink.rules`
///   (`scsi-S$env{SCSI_VENDOR}_$env{SCSI_MODEL}_$env{SCSI_IDENT_SERIAL}`); seen with the
///   whole UUID in kopeio/etcd-manager#357. Both lengths are tried.
/// - `ata-QEMU_HARDDISK_<serial20>`: IDE/SATA. `60-persistent-storage.rules` runs `ata_id`
///   for `ATTRS{vendor}=="ATA"` disks (ID_BUS=ata, ID_SERIAL=`<model>_<serial>`, QEMU's
///   model being `QEMU HARDDISK`); the ATA serial field holds 20 characters.
/// - `scsi-0ATA_QEMU_HARDDISK_<serial20>`, `scsi-1ATA_QEMU_HARDDISK_<serial20>`,
///   `scsi-SATA_QEMU_HARDDISK_<serial20>`: the same ATA disk as libata presents it to the
///   SCSI layer (vendor `ATA`), linked by sg3_utils' rules from VPD 0x83 (vendor-specific,
///   T10 vendor id) and 0x80.
///
/// The sg3_utils names (`scsi-S…`, `scsi-1…`, and `scsi-0…` for ATA disks) are off by
/// default since sg3_utils 1.48 (`.SCSI_SYMLINK_SRC`, "don't create extra by-id symlinks by
/// default"), so they are extra chances, never the only name relied on. Not looked for:
/// `wwn-0x…` (ESXi, or a WWN QEMU only sets when configured; cannot be derived from the
/// serial) and `nvme-…` (Luna Node attaches virtio or IDE disks, not NVMe).
pub fn candidate_names(serial: &str, identification: Option<&str>) -> Vec<Candidate> {
    let s20 = serial_for(serial);
    let full: Option<String> = identification
        .map(|i| i.chars().take(SCSI_SERIAL_LEN).collect::<String>())
        .filter(|i| i.chars().count() > SERIAL_LEN);
    let mut out = Vec::new();
    let mut add = |name: String, bus: Bus, rule: Rule, serial: &str, full_identification| {
        if !out.iter().any(|c: &Candidate| c.name == name) {
            out.push(Candidate {
                name,
                bus,
                rule,
                serial: serial.to_string(),
                full_identification,
            });
        }
    };
    add(
        format!("virtio-{s20}"),
        Bus::VirtioBlk,
        Rule::VirtioSerial,
        &s20,
        false,
    );
    let mut scsi = vec![(s20.as_str(), false)];
    if let Some(full) = full.as_deref() {
        scsi.push((full, true));
    }
    for &(s, whole) in &scsi {
        add(
            format!("scsi-0QEMU_QEMU_HARDDISK_{s}"),
            Bus::VirtioScsi,
            Rule::ScsiVendorSpecific,
            s,
            whole,
        );
    }
    for &(s, whole) in &scsi {
        add(
            format!("scsi-SQEMU_QEMU_HARDDISK_{s}"),
            Bus::VirtioScsi,
            Rule::ScsiUnitSerial,
            s,
            whole,
        );
    }
    add(
        format!("ata-QEMU_HARDDISK_{s20}"),
        Bus::Ata,
        Rule::AtaId,
        &s20,
        false,
    );
    for (prefix, rule) in [
        ("scsi-0ATA", Rule::ScsiVendorSpecific),
        ("scsi-1ATA", Rule::ScsiT10),
        ("scsi-SATA", Rule::ScsiUnitSerial),
    ] {
        add(
            format!("{prefix}_QEMU_HARDDISK_{s20}"),
            Bus::Ata,
            rule,
            &s20,
            false,
        );
    }
    out
}

/// How long, and how often, to wait for a device link to appear: exponential backoff from
/// `initial`, doubling, capped at `max_interval`, giving up after `timeout` in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceWait {
    pub timeout: Duration,
    pub initial: Duration,
    pub max_interval: Duration,
}

impl DeviceWait {
    /// Backoff from 100 ms up to 2 s between checks, for at most `timeout`.
    pub fn with_timeout(timeout: Duration) -> Self {
        DeviceWait {
            timeout,
            initial: Duration::from_millis(100),
            max_interval: Duration::from_secs(2),
        }
    }
}

impl Default for DeviceWait {
    fn default() -> Self {
        DeviceWait::with_timeout(Duration::from_secs(30))
    }
}

/// Where the kernel's serial for a device was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerialSource {
    /// `/sys/dev/block/<maj>:<min>/serial` (virtio-blk).
    Virtio,
    /// `/sys/dev/block/<maj>:<min>/device/vpd_pg80`, the unit serial page (SCSI disks, and
    /// ATA disks through libata).
    UnitSerial,
}

impl std::fmt::Display for SerialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SerialSource::Virtio => "virtio serial",
            SerialSource::UnitSerial => "SCSI unit serial (vpd_pg80)",
        })
    }
}

/// What the kernel's serial for a found device said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialCheck {
    /// Nothing was compared (the device was inspected without a [`DiskId`]).
    NotChecked,
    /// sysfs has no serial for the device (loop devices, some drivers): only its size was
    /// verified.
    NotExposed,
    /// The kernel's serial is the volume's.
    Held {
        source: SerialSource,
        /// The serial as the kernel reports it (trimmed).
        serial: String,
        /// Whether it matched the whole identification rather than its first 20 characters.
        full_identification: bool,
    },
}

impl std::fmt::Display for SerialCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialCheck::NotChecked => f.write_str("serial not checked"),
            SerialCheck::NotExposed => {
                f.write_str("the kernel exposes no serial for it (size checked only)")
            }
            SerialCheck::Held {
                source,
                serial,
                full_identification,
            } => write!(
                f,
                "serial rule held ({source} {serial:?}, {} characters{})",
                serial.chars().count(),
                if *full_identification {
                    ", the whole identification"
                } else {
                    ""
                }
            ),
        }
    }
}

/// A verified block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The by-id link it was found through: the first of [`Device::links`].
    pub link: PathBuf,
    /// The resolved device node (e.g. `/dev/vdc`).
    pub path: PathBuf,
    /// Its device number (`st_rdev`), which is what mount tables record.
    pub rdev: u64,
    /// Its size in bytes.
    pub size: u64,
    /// The candidate name `link` is (`None` when the device was inspected through a link
    /// given by the caller, [`inspect`]).
    pub found_as: Option<Candidate>,
    /// Every candidate link that was present when it was found, in [`candidate_names`]
    /// order; all resolved to this device ([`find`] refuses otherwise).
    pub links: Vec<PathBuf>,
    /// Every name in the by-id directory that resolved to this device when it was found
    /// (sorted; see [`aliases`]), candidate or not (e.g. `wwn-…`).
    pub aliases: Vec<String>,
    /// What the kernel's serial for it said.
    pub serial_check: SerialCheck,
}

impl Device {
    /// One line for people: `/dev/sdb (8:16, 1073741824 bytes) found under
    /// ata-QEMU_HARDDISK_x (IDE/SATA, …); serial rule held (…)`.
    pub fn describe(&self) -> String {
        let (maj, min) = major_minor(self.rdev);
        let under = match &self.found_as {
            Some(c) => c.to_string(),
            None => self.link.display().to_string(),
        };
        format!(
            "{} ({maj}:{min}, {} bytes) found under {under}; {}",
            self.path.display(),
            self.size,
            self.serial_check
        )
    }
}

/// The size in bytes of a block device (or file), by seeking to its end.
pub fn device_size(path: &Path) -> Result<u64, VolumeError> {
    let mut f = File::open(path)
        .map_err(|e| VolumeError::io(format!("cannot open {}", path.display()), e))?;
    f.seek(SeekFrom::End(0))
        .map_err(|e| VolumeError::io(format!("cannot read the size of {}", path.display()), e))
}

/// Major and minor numbers of a device number.
pub fn major_minor(rdev: u64) -> (u64, u64) {
    (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
}

/// Where the kernel exposes block devices by number (`<root>/dev/block/<maj>:<min>`).
pub const SYSFS_ROOT: &str = "/sys";

/// The unit serial in a VPD page 0x80 as sysfs gives it (`device/vpd_pg80`): a 4-byte header
/// (peripheral byte, page code 0x80, 16-bit big-endian length), then the serial, which may
/// be padded with spaces (ATA serials through libata are) or NULs.
pub fn parse_vpd_pg80(page: &[u8]) -> Result<String, String> {
    if page.len() < 4 || page[1] != 0x80 {
        return Err(format!(
            "it is not a unit serial page ({} bytes, page code {:#04x})",
            page.len(),
            page.get(1).copied().unwrap_or(0)
        ));
    }
    let len = usize::from(u16::from_be_bytes([page[2], page[3]]));
    let body = &page[4..page.len().min(4 + len)];
    Ok(String::from_utf8_lossy(body)
        .trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .to_string())
}

/// The serial the kernel reports for device `rdev`, and where it was read: the virtio-blk
/// `serial` file first, then the SCSI/ATA unit serial page `device/vpd_pg80`. `Ok(None)`
/// when sysfs has neither (loop devices). A file that exists but cannot be read or parsed
/// is an error: unverified is not verified.
pub fn kernel_serial(
    sysfs_root: &Path,
    rdev: u64,
) -> Result<Option<(SerialSource, String)>, String> {
    let (maj, min) = major_minor(rdev);
    let base = sysfs_root.join(format!("dev/block/{maj}:{min}"));
    let file = base.join("serial");
    match std::fs::read(&file) {
        Ok(bytes) => {
            let s = String::from_utf8_lossy(&bytes)
                .trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .to_string();
            return Ok(Some((SerialSource::Virtio, s)));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(format!(
                "cannot read its serial from {}: {e}",
                file.display()
            ));
        }
    }
    let file = base.join("device/vpd_pg80");
    match std::fs::read(&file) {
        Ok(page) => parse_vpd_pg80(&page)
            .map(|s| Some((SerialSource::UnitSerial, s)))
            .map_err(|e| format!("cannot read its unit serial from {}: {e}", file.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "cannot read its unit serial from {}: {e}",
            file.display()
        )),
    }
}

/// Compare the serial the kernel reports for device `rdev` with the volume's.
///
/// A by-id link can be stale (udev lagging after a detach/attach), and a size match alone
/// does not tell two equal-sized volumes apart, so the kernel is asked too (see
/// [`kernel_serial`]). The comparison is on the first 20 characters, trimmed (KVM truncates
/// virtio-blk and ATA serials to 20). A SCSI unit serial longer than 20 characters is
/// compared whole with the identification when that is known (QEMU keeps up to 36).
/// Devices without a serial in sysfs are not checked ([`SerialCheck::NotExposed`]).
pub fn check_serial(sysfs_root: &Path, rdev: u64, disk: &DiskId) -> Result<SerialCheck, String> {
    let (want, identification) = disk.normalized()?;
    let Some((source, found)) = kernel_serial(sysfs_root, rdev)? else {
        return Ok(SerialCheck::NotExposed);
    };
    let held = |full_identification| {
        Ok(SerialCheck::Held {
            source,
            serial: found.clone(),
            full_identification,
        })
    };
    if source == SerialSource::UnitSerial
        && found.chars().count() > SERIAL_LEN
        && let Some(id) = identification.as_deref()
    {
        let id: String = id.chars().take(SCSI_SERIAL_LEN).collect();
        return if found == id {
            held(true)
        } else {
            Err(format!(
                "its {source} is {found:?} but the volume's identification is {id:?}"
            ))
        };
    }
    let found20 = serial_for(&found).trim().to_string();
    if found20 == want {
        held(false)
    } else {
        Err(format!(
            "its {source} is {found:?} but the volume's serial is {want:?}"
        ))
    }
}

/// Resolve `link` and verify it is a block device of `expected_size` bytes (when given).
/// The kernel's serial is not compared ([`SerialCheck::NotChecked`]); [`find`] does that.
pub fn inspect(link: &Path, expected_size: Option<u64>) -> Result<Device, VolumeError> {
    inspect_in(Path::new(SYSFS_ROOT), link, expected_size, None)
}

/// [`inspect`], also checking the kernel's serial for the device (when it has one) against
/// `disk`, with sysfs at `sysfs_root`.
fn inspect_in(
    sysfs_root: &Path,
    link: &Path,
    expected_size: Option<u64>,
    disk: Option<&DiskId>,
) -> Result<Device, VolumeError> {
    let path = std::fs::canonicalize(link)
        .map_err(|e| VolumeError::io(format!("cannot resolve {}", link.display()), e))?;
    let meta = std::fs::metadata(&path)
        .map_err(|e| VolumeError::io(format!("cannot stat {}", path.display()), e))?;
    if !meta.file_type().is_block_device() {
        return Err(VolumeError::DeviceMismatch {
            device: path,
            reason: format!("{} does not resolve to a block device", link.display()),
        });
    }
    let size = device_size(&path)?;
    if let Some(expected) = expected_size
        && size != expected
    {
        return Err(VolumeError::DeviceMismatch {
            device: path,
            reason: format!("its size is {size} bytes but the volume is {expected} bytes"),
        });
    }
    let serial_check = match disk {
        Some(disk) => check_serial(sysfs_root, meta.rdev(), disk).map_err(|reason| {
            VolumeError::DeviceMismatch {
                device: path.clone(),
                reason,
            }
        })?,
        None => SerialCheck::NotChecked,
    };
    Ok(Device {
        link: link.to_path_buf(),
        path,
        rdev: meta.rdev(),
        size,
        found_as: None,
        links: vec![link.to_path_buf()],
        aliases: Vec::new(),
        serial_check,
    })
}

/// A by-id name of a partition (`…-part1`): never a whole disk.
fn is_partition_name(name: &str) -> bool {
    name.rsplit_once("-part")
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Every name in `by_id_dir` that resolves to the block device `rdev`, sorted. For a
/// preflight's "the disk appeared under: …". Unreadable entries are skipped; an unreadable
/// directory gives an empty list.
pub fn aliases(by_id_dir: &Path, rdev: u64) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(by_id_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| {
            std::fs::metadata(e.path())
                .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// How many by-id entries a "disk did not appear" error lists.
pub const LISTED_ENTRIES: usize = 20;

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / f64::from(1u32 << 30);
    if bytes % (1 << 30) == 0 {
        format!("{g:.0} GiB")
    } else {
        format!("{g:.2} GiB")
    }
}

/// The size of block device `rdev` at `path`: from sysfs (no need to open the device),
/// else by opening it.
fn size_of(sysfs_root: &Path, rdev: u64, path: &Path) -> Option<u64> {
    let (maj, min) = major_minor(rdev);
    std::fs::read_to_string(sysfs_root.join(format!("dev/block/{maj}:{min}/size")))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|sectors| sectors * 512)
        .or_else(|| device_size(path).ok())
}

/// What the by-id directory holds, one line per whole-disk entry (partitions skipped, at
/// most [`LISTED_ENTRIES`]): `virtio-abc → /dev/vdb (10737418240 bytes = 10 GiB, serial
/// abc)`. For the "did not appear" error.
fn present_entries(by_id_dir: &Path, sysfs_root: &Path) -> Vec<String> {
    let entries = match std::fs::read_dir(by_id_dir) {
        Ok(e) => e,
        Err(e) => return vec![format!("nothing readable ({e})")],
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !is_partition_name(n))
        .collect();
    names.sort();
    let more = names.len().saturating_sub(LISTED_ENTRIES);
    let mut out: Vec<String> = names
        .iter()
        .take(LISTED_ENTRIES)
        .map(|name| {
            let link = by_id_dir.join(name);
            let Ok(path) = std::fs::canonicalize(&link) else {
                return format!("{name} → nothing (dangling link)");
            };
            let meta = match std::fs::metadata(&path) {
                Ok(m) if m.file_type().is_block_device() => m,
                Ok(_) => return format!("{name} → {} (not a block device)", path.display()),
                Err(e) => return format!("{name} → {} ({e})", path.display()),
            };
            let mut what = match size_of(sysfs_root, meta.rdev(), &path) {
                Some(b) => format!("{b} bytes = {}", gib(b)),
                None => "size unknown".to_string(),
            };
            if let Ok(Some((_, serial))) = kernel_serial(sysfs_root, meta.rdev()) {
                what.push_str(&format!(", serial {serial}"));
            }
            format!("{name} → {} ({what})", path.display())
        })
        .collect();
    if out.is_empty() {
        out.push("no disks there".to_string());
    }
    if more > 0 {
        out.push(format!("and {more} more"));
    }
    out
}

/// Wait (blocking, with bounded backoff) for the volume's disk to appear in `by_id_dir`
/// under any of its [`candidate_names`], then resolve and verify it. Run this on a blocking
/// thread.
///
/// - Every candidate link present must resolve to the same device; links to different
///   devices are refused ([`VolumeError::DeviceMismatch`] naming both), never guessed
///   between. A dangling link counts as not there yet (udev mid-update).
/// - The device must be a block device of `expected_size` bytes (when given), and the
///   kernel's serial for it must be the volume's ([`check_serial`]).
/// - When no candidate appears within `wait.timeout`: [`VolumeError::DeviceNotFound`], which
///   names the names looked for, the directory, the time waited and what the directory
///   does hold (device, size and kernel serial of each entry).
/// - An invalid serial or identification ([`valid_serial`], [`DiskId::normalized`]) is a
///   [`VolumeError::DeviceMismatch`] at once.
///
/// The returned [`Device`] says which candidate it was found under (`found_as`), every
/// candidate link present (`links`), every by-id name of the device (`aliases`) and what
/// the serial check found (`serial_check`).
pub fn find(
    by_id_dir: &Path,
    disk: &DiskId,
    expected_size: Option<u64>,
    wait: &DeviceWait,
) -> Result<Device, VolumeError> {
    find_in(Path::new(SYSFS_ROOT), by_id_dir, disk, expected_size, wait)
}

/// [`find`] with sysfs at `sysfs_root`.
fn find_in(
    sysfs_root: &Path,
    by_id_dir: &Path,
    disk: &DiskId,
    expected_size: Option<u64>,
    wait: &DeviceWait,
) -> Result<Device, VolumeError> {
    let (serial, identification) =
        disk.normalized()
            .map_err(|reason| VolumeError::DeviceMismatch {
                device: by_id_dir.to_path_buf(),
                reason,
            })?;
    let disk = DiskId {
        serial: serial.clone(),
        identification: identification.clone(),
    };
    let candidates = candidate_names(&serial, identification.as_deref());
    let started = Instant::now();
    let mut interval = wait.initial.max(Duration::from_millis(1));
    loop {
        let mut present: Vec<(&Candidate, PathBuf)> = Vec::new();
        for c in &candidates {
            let link = by_id_dir.join(&c.name);
            match std::fs::symlink_metadata(&link) {
                // The link exists; a dangling link (udev mid-update) counts as not there yet.
                Ok(_) if link.exists() => present.push((c, link)),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(VolumeError::io(
                        format!("cannot stat {}", link.display()),
                        e,
                    ));
                }
            }
        }
        if !present.is_empty() {
            return verify_found(sysfs_root, by_id_dir, &disk, &present, expected_size);
        }
        let waited = started.elapsed();
        if waited >= wait.timeout {
            return Err(VolumeError::DeviceNotFound {
                serial,
                identification,
                dir: by_id_dir.to_path_buf(),
                looked_for: candidates.into_iter().map(|c| c.name).collect(),
                waited,
                present: present_entries(by_id_dir, sysfs_root).into(),
            });
        }
        std::thread::sleep(interval.min(wait.timeout - waited));
        interval = (interval * 2).min(wait.max_interval);
    }
}

/// The candidate links found must all be one device; verify that device.
fn verify_found(
    sysfs_root: &Path,
    by_id_dir: &Path,
    disk: &DiskId,
    present: &[(&Candidate, PathBuf)],
    expected_size: Option<u64>,
) -> Result<Device, VolumeError> {
    let resolve = |link: &Path| -> Result<(PathBuf, u64), VolumeError> {
        let path = std::fs::canonicalize(link)
            .map_err(|e| VolumeError::io(format!("cannot resolve {}", link.display()), e))?;
        let meta = std::fs::metadata(&path)
            .map_err(|e| VolumeError::io(format!("cannot stat {}", path.display()), e))?;
        // Not a device: compared by path (inspect refuses it below).
        let id = if meta.file_type().is_block_device() || meta.file_type().is_char_device() {
            meta.rdev()
        } else {
            meta.ino()
        };
        Ok((path, id))
    };
    let (first, first_link) = &present[0];
    let (first_path, first_id) = resolve(first_link)?;
    for (c, link) in &present[1..] {
        let (path, id) = resolve(link)?;
        if id != first_id || path != first_path {
            return Err(VolumeError::DeviceMismatch {
                device: first_path.clone(),
                reason: format!(
                    "two by-id names for this volume point at different devices: {} → {} and {} → {}; refusing to guess between them (check `ls -l {}` and that only this volume carries serial {})",
                    first.name,
                    first_path.display(),
                    c.name,
                    path.display(),
                    by_id_dir.display(),
                    disk.serial
                ),
            });
        }
    }
    let mut dev = inspect_in(sysfs_root, first_link, expected_size, Some(disk))?;
    dev.found_as = Some((*first).clone());
    dev.links = present.iter().map(|(_, l)| l.clone()).collect();
    dev.aliases = aliases(by_id_dir, dev.rdev);
    Ok(dev)
}

/// Check that the link the device was found through (`dev.link`) still resolves to the
/// same device number as when it was found, and that none of the other candidate links it
/// had (`dev.links`) now points elsewhere (one that vanished is not held against it).
/// Called right before a destructive step (mkfs): between finding the disk and formatting it
/// (a probe, possibly a long wait) udev may have re-pointed a link at another disk.
pub fn still_same(dev: &Device) -> Result<(), VolumeError> {
    let moved = |link: &Path, now: u64| {
        let (a, b) = major_minor(dev.rdev);
        let (c, d) = major_minor(now);
        VolumeError::DeviceMismatch {
            device: dev.path.clone(),
            reason: format!(
                "{} pointed at device {a}:{b} when it was found but now points at {c}:{d}",
                link.display()
            ),
        }
    };
    let now = std::fs::metadata(&dev.link)
        .map_err(|e| VolumeError::io(format!("cannot stat {}", dev.link.display()), e))?;
    if now.rdev() != dev.rdev {
        return Err(moved(&dev.link, now.rdev()));
    }
    for link in dev.links.iter().filter(|l| **l != dev.link) {
        if let Ok(now) = std::fs::metadata(link)
            && now.rdev() != dev.rdev
        {
            return Err(moved(link, now.rdev()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDENT: &str = "6a3b1f0e-2c4d-4e5f-8a9b-0c1d2e3f4a5b";

    fn id(serial: &str) -> DiskId {
        DiskId {
            serial: serial.into(),
            identification: None,
        }
    }

    fn quick() -> DeviceWait {
        DeviceWait {
            timeout: Duration::from_millis(300),
            initial: Duration::from_millis(10),
            max_interval: Duration::from_millis(50),
        }
    }

    /// /dev/loop0 when this host has it and we may open it (root): a real block device.
    fn loop0() -> Option<std::fs::Metadata> {
        let meta = std::fs::metadata("/dev/loop0").ok()?;
        (meta.file_type().is_block_device() && File::open("/dev/loop0").is_ok()).then_some(meta)
    }

    /// A fake sysfs with `rel` (under `dev/block/<maj>:<min>/`) holding `content`.
    fn sysfs_with(sys: &Path, rdev: u64, rel: &str, content: &[u8]) {
        let (maj, min) = major_minor(rdev);
        let file = sys.join(format!("dev/block/{maj}:{min}/{rel}"));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, content).unwrap();
    }

    /// A VPD page 0x80 as sysfs gives it.
    fn vpd80(serial: &[u8]) -> Vec<u8> {
        let mut page = vec![0x00, 0x80];
        page.extend_from_slice(&u16::try_from(serial.len()).unwrap().to_be_bytes());
        page.extend_from_slice(serial);
        page
    }

    #[test]
    fn serial_is_first_20_chars() {
        assert_eq!(serial_for(IDENT), "6a3b1f0e-2c4d-4e5f-8");
        assert_eq!(serial_for("short"), "short");
        assert_eq!(
            by_id_link(Path::new("/dev/disk/by-id"), "abc"),
            Path::new("/dev/disk/by-id/virtio-abc")
        );
    }

    #[test]
    fn serials_cannot_escape_the_directory() {
        assert!(valid_serial("6a3b1f0e-2c4d-4e5f-8"));
        for bad in ["", "..", "a/b", "../../etc", "a b", "x\n"] {
            assert!(!valid_serial(bad), "{bad:?}");
        }
    }

    #[test]
    fn disk_ids_are_normalized_and_checked() {
        let full = DiskId::from_identification(IDENT);
        assert_eq!(
            full.normalized().unwrap(),
            ("6a3b1f0e-2c4d-4e5f-8".to_string(), Some(IDENT.to_string()))
        );
        // A serial given whole is cut to 20 and kept as the identification.
        assert_eq!(id(IDENT).normalized().unwrap(), full.normalized().unwrap());
        assert_eq!(id("abc").normalized().unwrap(), ("abc".to_string(), None));
        // Serial and identification must agree, and neither may escape the directory.
        let other = DiskId {
            serial: "ffffffff-2c4d-4e5f-8".into(),
            identification: Some(IDENT.into()),
        };
        assert!(other.normalized().unwrap_err().contains("first 20"));
        for bad in [
            id("../../etc"),
            DiskId {
                serial: "abc".into(),
                identification: Some("abc/../../x".into()),
            },
        ] {
            assert!(bad.normalized().is_err(), "{bad:?}");
        }
        assert_eq!(
            full.to_string(),
            format!("serial 6a3b1f0e-2c4d-4e5f-8 (identification {IDENT})")
        );
    }

    #[test]
    fn candidate_names_cover_every_bus_the_vm_may_use() {
        let s = "6a3b1f0e-2c4d-4e5f-8";
        let names: Vec<String> = candidate_names(s, Some(IDENT))
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(
            names,
            [
                format!("virtio-{s}"),
                format!("scsi-0QEMU_QEMU_HARDDISK_{s}"),
                format!("scsi-0QEMU_QEMU_HARDDISK_{IDENT}"),
                format!("scsi-SQEMU_QEMU_HARDDISK_{s}"),
                format!("scsi-SQEMU_QEMU_HARDDISK_{IDENT}"),
                format!("ata-QEMU_HARDDISK_{s}"),
                format!("scsi-0ATA_QEMU_HARDDISK_{s}"),
                format!("scsi-1ATA_QEMU_HARDDISK_{s}"),
                format!("scsi-SATA_QEMU_HARDDISK_{s}"),
            ]
        );
        // Without the identification (or with one no longer than the serial): the 20-char
        // names only, no duplicates.
        for ident in [None, Some(s), Some("6a3b1f0e")] {
            let c = candidate_names(s, ident);
            assert_eq!(c.len(), 7, "{ident:?}");
            assert!(c.iter().all(|c| !c.full_identification && c.serial == s));
        }
        // Each says which rule it follows.
        let c = candidate_names(s, Some(IDENT));
        let ata = c.iter().find(|c| c.name.starts_with("ata-")).unwrap();
        assert_eq!((ata.bus, ata.rule), (Bus::Ata, Rule::AtaId));
        assert!(
            ata.to_string()
                .contains("serial = the first 20 characters of the identification"),
            "{ata}"
        );
        let whole = c
            .iter()
            .find(|c| c.name == format!("scsi-0QEMU_QEMU_HARDDISK_{IDENT}"))
            .unwrap();
        assert!(whole.full_identification);
        assert_eq!(
            (whole.bus, whole.rule),
            (Bus::VirtioScsi, Rule::ScsiVendorSpecific)
        );
        assert!(whole.serial_rule().contains("whole identification (36"));
        // A longer identification is cut where QEMU cuts a SCSI serial.
        let long = format!("{IDENT}-0123456789");
        assert!(
            candidate_names(s, Some(&long))
                .iter()
                .any(|c| c.name == format!("scsi-SQEMU_QEMU_HARDDISK_{IDENT}"))
        );
    }

    #[test]
    fn missing_link_fails_after_the_bound_and_says_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, b"x").unwrap();
        let by_id = dir.path().join("by-id");
        std::fs::create_dir(&by_id).unwrap();
        let err = find(&by_id, &id("abc"), None, &quick()).unwrap_err();
        assert!(err.to_string().contains("no disks there"), "{err}");

        std::os::unix::fs::symlink(&img, by_id.join("virtio-other")).unwrap();
        std::os::unix::fs::symlink(&img, by_id.join("virtio-other-part1")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone"), by_id.join("virtio-stale")).unwrap();
        let started = Instant::now();
        let err = find(&by_id, &id("abc"), None, &quick()).unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
        let VolumeError::DeviceNotFound {
            looked_for,
            present,
            ..
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!(looked_for.len(), 7);
        assert_eq!(present.len(), 2, "{present:?}");
        let msg = err.to_string();
        for needle in [
            "no disk with serial abc appeared in",
            "virtio-abc",
            "ata-QEMU_HARDDISK_abc",
            "scsi-0QEMU_QEMU_HARDDISK_abc",
            "virtio-other → ",
            "(not a block device)",
            "virtio-stale → nothing (dangling link)",
            "--attach-target",
            "attached to this node",
        ] {
            assert!(msg.contains(needle), "{needle:?} in {msg}");
        }
        assert!(!msg.contains("part1"), "{msg}");
    }

    #[test]
    fn the_listing_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..LISTED_ENTRIES + 5 {
            std::os::unix::fs::symlink("/nonexistent", dir.path().join(format!("x-{i:02}")))
                .unwrap();
        }
        let present = present_entries(dir.path(), Path::new("/nonexistent-sysfs"));
        assert_eq!(present.len(), LISTED_ENTRIES + 1);
        assert_eq!(present.last().unwrap(), "and 5 more");
    }

    #[test]
    fn a_regular_file_is_not_a_device() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        std::fs::write(&file, vec![0u8; 4096]).unwrap();
        std::os::unix::fs::symlink(&file, dir.path().join("virtio-abc")).unwrap();
        let err = find(dir.path(), &id("abc"), Some(4096), &DeviceWait::default()).unwrap_err();
        assert!(matches!(err, VolumeError::DeviceMismatch { .. }), "{err}");
    }

    #[test]
    fn names_pointing_at_different_devices_are_refused() {
        if std::fs::metadata("/dev/null").is_err() || std::fs::metadata("/dev/zero").is_err() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/null", dir.path().join("virtio-abc")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("ata-QEMU_HARDDISK_abc")).unwrap();
        let err = find(dir.path(), &id("abc"), None, &quick()).unwrap_err();
        assert!(matches!(err, VolumeError::DeviceMismatch { .. }), "{err}");
        let msg = err.to_string();
        for needle in [
            "virtio-abc → /dev/null",
            "ata-QEMU_HARDDISK_abc → /dev/zero",
            "refusing to guess",
        ] {
            assert!(msg.contains(needle), "{needle:?} in {msg}");
        }
        // An invalid serial is refused before anything is looked at.
        let err = find(dir.path(), &id("../x"), None, &quick()).unwrap_err();
        assert!(matches!(err, VolumeError::DeviceMismatch { .. }), "{err}");
    }

    #[test]
    fn kernel_serial_must_match_when_sysfs_has_one() {
        let sys = tempfile::tempdir().unwrap();
        let rdev = nix::sys::stat::makedev(252, 16);
        let want = id("6a3b1f0e-2c4d-4e5f-8");
        // No serial file (loop devices): nothing to compare.
        assert_eq!(
            check_serial(sys.path(), rdev, &want).unwrap(),
            SerialCheck::NotExposed
        );
        sysfs_with(sys.path(), rdev, "serial", b"6a3b1f0e-2c4d-4e5f-8\n");
        let held = check_serial(sys.path(), rdev, &want).unwrap();
        assert_eq!(
            held,
            SerialCheck::Held {
                source: SerialSource::Virtio,
                serial: "6a3b1f0e-2c4d-4e5f-8".into(),
                full_identification: false,
            }
        );
        assert!(held.to_string().contains("serial rule held"), "{held}");
        // Only the first 20 characters count (KVM truncates), whitespace trimmed.
        assert!(check_serial(sys.path(), rdev, &id(" 6a3b1f0e-2c4d-4e5f-8a9b-0c1d ")).is_ok());
        let err = check_serial(sys.path(), rdev, &id("ffffffff-2c4d-4e5f-8")).unwrap_err();
        assert!(err.contains("6a3b1f0e-2c4d-4e5f-8"), "{err}");
        // Another device number has no serial file: not checked.
        assert!(check_serial(sys.path(), nix::sys::stat::makedev(252, 32), &id("x")).is_ok());
    }

    #[test]
    fn vpd_pages_are_parsed() {
        assert_eq!(parse_vpd_pg80(&vpd80(b"abc")).unwrap(), "abc");
        // ATA serials through libata come space-padded; a page may carry trailing bytes.
        assert_eq!(
            parse_vpd_pg80(&vpd80(b"    6a3b1f0e-2c4d-4e5f-8")).unwrap(),
            "6a3b1f0e-2c4d-4e5f-8"
        );
        let mut page = vpd80(b"abc\0");
        page.extend_from_slice(b"junk");
        assert_eq!(parse_vpd_pg80(&page).unwrap(), "abc");
        assert!(parse_vpd_pg80(b"\0\x83\0\x03abc").is_err());
        assert!(parse_vpd_pg80(b"\0\x80").is_err());
    }

    #[test]
    fn scsi_and_ata_unit_serials_are_checked() {
        let sys = tempfile::tempdir().unwrap();
        let rdev = nix::sys::stat::makedev(8, 16);
        let s = "6a3b1f0e-2c4d-4e5f-8";
        // An ATA disk: 20 characters, space-padded.
        sysfs_with(
            sys.path(),
            rdev,
            "device/vpd_pg80",
            &vpd80(format!("{s}    ").as_bytes()),
        );
        let held = check_serial(sys.path(), rdev, &id(s)).unwrap();
        assert_eq!(
            held,
            SerialCheck::Held {
                source: SerialSource::UnitSerial,
                serial: s.into(),
                full_identification: false,
            }
        );
        assert!(check_serial(sys.path(), rdev, &DiskId::from_identification(IDENT)).is_ok());
        let err = check_serial(sys.path(), rdev, &id("ffffffff-2c4d-4e5f-8")).unwrap_err();
        assert!(err.contains("unit serial") && err.contains(s), "{err}");

        // A SCSI disk carrying the whole identification: compared whole when it is known.
        sysfs_with(
            sys.path(),
            rdev,
            "device/vpd_pg80",
            &vpd80(IDENT.as_bytes()),
        );
        let held = check_serial(sys.path(), rdev, &DiskId::from_identification(IDENT)).unwrap();
        assert!(
            matches!(
                held,
                SerialCheck::Held {
                    full_identification: true,
                    ..
                }
            ),
            "{held:?}"
        );
        let twin = "6a3b1f0e-2c4d-4e5f-8fff-ffffffffffff";
        let err = check_serial(sys.path(), rdev, &DiskId::from_identification(twin)).unwrap_err();
        assert!(err.contains(IDENT) && err.contains(twin), "{err}");
        // Without the identification, its first 20 characters are what can be compared.
        assert!(check_serial(sys.path(), rdev, &id(s)).is_ok());
        assert!(check_serial(sys.path(), rdev, &id("ffffffff-2c4d-4e5f-8")).is_err());

        // A virtio `serial` file is read first.
        sysfs_with(sys.path(), rdev, "serial", b"ffffffff-2c4d-4e5f-8");
        assert!(check_serial(sys.path(), rdev, &id(s)).is_err());
    }

    #[test]
    fn a_serial_mismatch_is_a_device_mismatch() {
        // /dev/loop0 stands in for a virtio disk; a fake sysfs gives it another disk's serial.
        let Some(meta) = loop0() else {
            return;
        };
        let sys = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("virtio-this-disk-serial-000");
        std::os::unix::fs::symlink("/dev/loop0", &link).unwrap();
        let want = id("this-disk-serial-000");
        // No serial file: accepted on size alone.
        inspect_in(sys.path(), &link, None, Some(&want)).unwrap();
        sysfs_with(sys.path(), meta.rdev(), "serial", b"other-disk-serial-00\n");
        let err = inspect_in(sys.path(), &link, None, Some(&want)).unwrap_err();
        assert!(matches!(err, VolumeError::DeviceMismatch { .. }), "{err}");
        sysfs_with(sys.path(), meta.rdev(), "serial", b"this-disk-serial-000\n");
        inspect_in(sys.path(), &link, None, Some(&want)).unwrap();
    }

    #[test]
    fn an_ata_disk_is_found_and_its_unit_serial_checked() {
        let Some(meta) = loop0() else {
            return;
        };
        let sys = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let s = "6a3b1f0e-2c4d-4e5f-8";
        let name = format!("ata-QEMU_HARDDISK_{s}");
        std::os::unix::fs::symlink("/dev/loop0", dir.path().join(&name)).unwrap();
        std::os::unix::fs::symlink("/dev/loop0", dir.path().join("wwn-0x5000c500a1b2c3d4"))
            .unwrap();
        let disk = DiskId::from_identification(IDENT);
        sysfs_with(
            sys.path(),
            meta.rdev(),
            "device/vpd_pg80",
            &vpd80(format!("{s}   ").as_bytes()),
        );
        // No size expected: another test may attach /dev/loop0 meanwhile (sizes are
        // checked elsewhere).
        let dev = find_in(sys.path(), dir.path(), &disk, None, &quick()).unwrap();
        assert_eq!(dev.path, Path::new("/dev/loop0"));
        assert_eq!(dev.link, dir.path().join(&name));
        assert_eq!(dev.found_as.as_ref().unwrap().bus, Bus::Ata);
        assert_eq!(dev.links, [dir.path().join(&name)]);
        assert_eq!(dev.aliases, [name.clone(), "wwn-0x5000c500a1b2c3d4".into()]);
        assert_eq!(aliases(dir.path(), meta.rdev()), dev.aliases);
        assert!(matches!(
            dev.serial_check,
            SerialCheck::Held {
                source: SerialSource::UnitSerial,
                ..
            }
        ));
        let line = dev.describe();
        assert!(
            line.contains(&name) && line.contains("serial rule held"),
            "{line}"
        );
        // Another disk's unit serial behind the same name: refused.
        sysfs_with(
            sys.path(),
            meta.rdev(),
            "device/vpd_pg80",
            &vpd80(b"ffffffff-2c4d-4e5f-8"),
        );
        let err = find_in(sys.path(), dir.path(), &disk, None, &quick()).unwrap_err();
        assert!(matches!(err, VolumeError::DeviceMismatch { .. }), "{err}");
    }

    #[test]
    fn a_relinked_device_is_noticed_before_formatting() {
        let (Ok(null), Ok(zero)) = (
            std::fs::metadata("/dev/null"),
            std::fs::metadata("/dev/zero"),
        ) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("virtio-abc");
        let other = dir.path().join("scsi-0QEMU_QEMU_HARDDISK_abc");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        std::os::unix::fs::symlink("/dev/null", &other).unwrap();
        let dev = Device {
            link: link.clone(),
            path: PathBuf::from("/dev/null"),
            rdev: null.rdev(),
            size: 0,
            found_as: None,
            links: vec![link.clone(), other.clone()],
            aliases: Vec::new(),
            serial_check: SerialCheck::NotChecked,
        };
        still_same(&dev).unwrap();
        // Another of its names re-pointed: noticed too; one that vanished is not held
        // against it.
        std::fs::remove_file(&other).unwrap();
        still_same(&dev).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &other).unwrap();
        let err = still_same(&dev).unwrap_err();
        assert!(err.to_string().contains("scsi-0QEMU"), "{err}");
        std::fs::remove_file(&other).unwrap();
        // udev re-points the link at another device between find and mkfs.
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert_ne!(null.rdev(), zero.rdev());
        let err = still_same(&dev).unwrap_err();
        assert!(matches!(err, VolumeError::DeviceMismatch { .. }), "{err}");
        // And a link that vanished is an error too, never "same".
        std::fs::remove_file(&link).unwrap();
        assert!(still_same(&dev).is_err());
    }

    #[test]
    fn partition_names_are_told_apart() {
        assert!(is_partition_name("virtio-abc-part1"));
        assert!(is_partition_name("ata-QEMU_HARDDISK_x-part15"));
        assert!(!is_partition_name("virtio-abc"));
        assert!(!is_partition_name("virtio-part"));
        assert!(!is_partition_name("virtio-abc-partx"));
    }

    #[test]
    fn link_to_a_real_block_device_is_checked_for_size() {
        // /dev/loop0 exists on most Linux hosts even when unused (size 0).
        if loop0().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/loop0", dir.path().join("virtio-abc")).unwrap();
        let size = device_size(Path::new("/dev/loop0")).unwrap();
        let dev = find(dir.path(), &id("abc"), Some(size), &DeviceWait::default()).unwrap();
        assert_eq!(dev.path, Path::new("/dev/loop0"));
        assert_eq!(dev.found_as.unwrap().name, "virtio-abc");
        let err = find(
            dir.path(),
            &id("abc"),
            Some(size + 512),
            &DeviceWait::default(),
        )
        .unwrap_err();
        assert!(matches!(err, VolumeError::DeviceMismatch { .. }), "{err}");
    }
}
