//! The simulated cloud: regions, VMs, volumes, volume snapshots and images, and the rules
//! the real cloud enforces. Pure (no I/O): time comes in as an [`Instant`] so that status
//! transitions can be tested without sleeping.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime};

use super::SimVm;
use super::quirks::Quirks;
use super::transitions::{TransitionKind, TransitionLog, TransitionRecord, Transitions};

/// The regions the cloud has.
pub const REGIONS: [&str; 3] = ["toronto", "montreal", "roubaix"];

/// The account every object belongs to.
pub const USER_ID: &str = "36";

/// Largest volume the simulator accepts, in GB.
pub const MAX_SIZE_GB: u64 = 10_240;

/// A `success: no` answer. The message is worded so that the client's classifier
/// ([`crate::lunanode::ApiError::from_cloud_message`]) files it under the right kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CloudError(pub String);

impl CloudError {
    fn new(msg: impl Into<String>) -> Self {
        CloudError(msg.into())
    }
}

type Res<T> = Result<T, CloudError>;

/// The bus a volume is attached on, which decides the name udev gives its disk on the VM
/// (see [`crate::sim::link_name_on`]). `volume/attach`'s `target` picks it: `/dev/vdX` is
/// virtio, `/dev/hdX` IDE, `/dev/sdX` SCSI (virtio-scsi), and `auto` the VM's own bus.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    /// virtio-blk: `/dev/vdX`, `virtio-<serial>`.
    Virtio,
    /// IDE/SATA: `/dev/hdX`, `ata-QEMU_HARDDISK_<serial>`.
    Ide,
    /// virtio-scsi: `/dev/sdX`, `scsi-0QEMU_QEMU_HARDDISK_<serial>`.
    Scsi,
}

impl Bus {
    pub const ALL: [Bus; 3] = [Bus::Virtio, Bus::Ide, Bus::Scsi];

    /// `virtio`, `ide` or `scsi`.
    pub fn as_str(self) -> &'static str {
        match self {
            Bus::Virtio => "virtio",
            Bus::Ide => "ide",
            Bus::Scsi => "scsi",
        }
    }

    /// The bus a device target names (`/dev/vdb` → virtio, `/dev/hda` → IDE, `/dev/sdc` →
    /// SCSI); `None` for anything else (`auto` included).
    pub fn of_target(target: &str) -> Option<Bus> {
        let t = target.as_bytes();
        if t.len() != 8 || !t[7].is_ascii_lowercase() {
            return None;
        }
        match &t[..7] {
            b"/dev/vd" => Some(Bus::Virtio),
            b"/dev/hd" => Some(Bus::Ide),
            b"/dev/sd" => Some(Bus::Scsi),
            _ => None,
        }
    }
}

impl std::fmt::Display for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Bus {
    type Err = String;

    /// `virtio`, `ide` or `scsi` (any case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        Bus::ALL
            .into_iter()
            .find(|b| b.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| format!("unknown bus {s:?} (known: virtio, ide, scsi)"))
    }
}

/// Where a new volume's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Empty,
    Snapshot(String),
    Image(u64),
}

/// A status change that completes later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    at: Instant,
    to: &'static str,
}

#[derive(Debug, Clone)]
pub struct Volume {
    pub id: u64,
    pub identification: String,
    pub label: String,
    pub size_gb: u64,
    pub region: String,
    pub status: &'static str,
    /// The VM the volume is attached to (or being attached to / detached from).
    pub vm: Option<String>,
    /// The bus of that attachment.
    pub bus: Option<Bus>,
    pub created: String,
    pending: Option<Pending>,
}

impl Volume {
    /// The `attached` field as the API shows it: the VM while `in-use` or `detaching`.
    pub fn attached(&self) -> &str {
        match (self.status, &self.vm) {
            ("in-use" | "detaching", Some(vm)) => vm,
            _ => "",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: String,
    pub label: String,
    pub region: String,
    pub size_gb: u64,
    pub status: &'static str,
    pub volume_id: u64,
    /// The volume as it was when the snapshot was taken (shown if it is gone).
    pub volume: Volume,
    pending: Option<Pending>,
}

#[derive(Debug, Clone)]
pub struct Image {
    pub id: u64,
    pub name: String,
    pub region: String,
    pub size_gb: u64,
    pub status: &'static str,
    pub snapshot_id: String,
    pending: Option<Pending>,
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub region: String,
    pub index: usize,
    /// The bus of the VM's own disks: where `target=auto` attaches.
    pub auto_bus: Bus,
}

impl Vm {
    pub fn hostname(&self) -> String {
        format!("{}.lunanode.sim", self.name)
    }
    pub fn primary_ip(&self) -> String {
        format!("203.0.113.{}", 10 + self.index % 240)
    }
    pub fn private_ip(&self) -> String {
        format!("10.1.0.{}", 10 + self.index % 240)
    }
}

/// Settings of the model.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// How long `creating`, `attaching`, `detaching`, `extending` and `pending` last.
    pub transitions: Transitions,
    /// Refuse `volume/delete` while the volume has snapshots.
    pub refuse_delete_with_snapshots: bool,
    /// Volumes one VM can have attached (virtio slots minus the boot disk).
    pub max_volumes_per_vm: usize,
    /// The bus of VMs created without one (`None`: IDE with the `ide-auto` quirk, else
    /// virtio).
    pub auto_bus: Option<Bus>,
    /// The real cloud's undocumented behaviours to play.
    pub quirks: Quirks,
}

impl Rules {
    /// The bus of a VM created without one.
    pub fn default_bus(&self) -> Bus {
        self.auto_bus.unwrap_or(if self.quirks.ide_auto {
            Bus::Ide
        } else {
            Bus::Virtio
        })
    }
}

/// The default per-VM attachment limit; the node plugin reports the same number.
pub const MAX_VOLUMES_PER_VM: usize = 15;

/// The whole cloud.
#[derive(Debug, Clone)]
pub struct Cloud {
    pub rules: Rules,
    pub vms: Vec<Vm>,
    pub volumes: BTreeMap<u64, Volume>,
    pub snapshots: BTreeMap<String, Snapshot>,
    pub images: BTreeMap<u64, Image>,
    next_volume: u64,
    next_image: u64,
    rng: fastrand::Rng,
    /// Draws transition durations (apart from `rng`, so that IDs do not depend on timing).
    timing: fastrand::Rng,
    pub log: TransitionLog,
}

/// Show a caller-supplied value in a message only when it is short and plain, so that odd
/// input cannot change how the message is classified.
fn show(s: &str) -> &str {
    if !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        s
    } else {
        "(given)"
    }
}

/// Check a region name.
pub fn check_region(region: &str) -> Res<()> {
    if REGIONS.contains(&region) {
        Ok(())
    } else {
        Err(CloudError::new(format!(
            "unknown region {} (known: toronto, montreal, roubaix)",
            show(region)
        )))
    }
}

/// Parse a size in GB: a positive whole number, at most [`MAX_SIZE_GB`].
pub fn parse_size(size: &str) -> Res<u64> {
    let t = size.trim();
    match t.parse::<i64>() {
        Ok(n) if n > 0 && (n as u64) <= MAX_SIZE_GB => Ok(n as u64),
        Ok(n) if n > 0 => Err(CloudError::new(format!(
            "invalid size {n}: the largest volume is {MAX_SIZE_GB} GB"
        ))),
        _ => Err(CloudError::new(format!(
            "invalid size {}: expected a positive whole number of GB",
            show(t)
        ))),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a wall-clock time.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Cloud {
    pub fn new(rules: Rules, seed: u64) -> Self {
        Cloud {
            rules,
            vms: Vec::new(),
            volumes: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            images: BTreeMap::new(),
            next_volume: 4682,
            next_image: 141_129,
            rng: fastrand::Rng::with_seed(seed ^ 0x005e_ed0f_c10d),
            timing: fastrand::Rng::with_seed(seed ^ 0x7157_0000_d1a7),
            log: TransitionLog::default(),
        }
    }

    /// A random (seeded) UUID.
    pub fn uuid(&mut self) -> String {
        let mut b = [0u8; 16];
        self.rng.fill(&mut b);
        uuid::Builder::from_random_bytes(b).into_uuid().to_string()
    }

    /// Add a VM on the default bus ([`Rules::default_bus`]). Region must be known.
    pub fn add_vm(&mut self, region: &str, name: Option<&str>) -> Res<SimVm> {
        self.add_vm_on(region, name, None)
    }

    /// Add a VM whose disks are on `bus` (`None`: [`Rules::default_bus`]).
    pub fn add_vm_on(&mut self, region: &str, name: Option<&str>, bus: Option<Bus>) -> Res<SimVm> {
        check_region(region)?;
        let auto_bus = bus.unwrap_or_else(|| self.rules.default_bus());
        let index = self.vms.len() + 1;
        let name = name
            .map(str::to_string)
            .unwrap_or_else(|| format!("sim-{region}-{index}"));
        let id = self.uuid();
        self.vms.push(Vm {
            id: id.clone(),
            name: name.clone(),
            region: region.to_string(),
            index,
            auto_bus,
        });
        Ok(SimVm {
            id,
            name,
            region: region.to_string(),
            bus: auto_bus,
        })
    }

    /// A transition of `object` starting `now`: its duration is drawn for `kind`, and it
    /// is logged unless it completes at once.
    fn pending(
        &mut self,
        now: Instant,
        kind: TransitionKind,
        object: String,
        to: &'static str,
    ) -> (Option<Pending>, &'static str) {
        let d = self.rules.transitions.draw(kind, &mut self.timing);
        if d.is_zero() {
            return (None, to);
        }
        let at = now + d;
        self.log.push(TransitionRecord {
            kind,
            object,
            started: now,
            ready: at,
            used: None,
        });
        (Some(Pending { at, to }), "")
    }

    /// Complete every transition that is due by `now`.
    pub fn settle(&mut self, now: Instant) {
        for v in self.volumes.values_mut() {
            if let Some(p) = v.pending
                && p.at <= now
            {
                v.status = p.to;
                v.pending = None;
                if p.to == "available" {
                    v.vm = None;
                    v.bus = None;
                }
            }
        }
        for s in self.snapshots.values_mut() {
            if let Some(p) = s.pending
                && p.at <= now
            {
                s.status = p.to;
                s.pending = None;
            }
        }
        for i in self.images.values_mut() {
            if let Some(p) = i.pending
                && p.at <= now
            {
                i.status = p.to;
                i.pending = None;
            }
        }
    }

    /// Set a volume's status, now or after the transition time.
    fn transition(
        &mut self,
        now: Instant,
        kind: TransitionKind,
        id: u64,
        during: &'static str,
        to: &'static str,
    ) {
        let (pending, immediate) = self.pending(now, kind, id.to_string(), to);
        let v = self.volumes.get_mut(&id).expect("volume exists");
        if pending.is_some() {
            v.status = during;
            v.pending = pending;
        } else {
            v.status = immediate;
            v.pending = None;
            if to == "available" {
                v.vm = None;
                v.bus = None;
            }
        }
    }

    pub fn vm(&self, id: &str) -> Res<&Vm> {
        self.vms
            .iter()
            .find(|v| v.id == id)
            .ok_or_else(|| CloudError::new(format!("invalid vm: vm {} not found", show(id))))
    }

    fn volume_id(id: &str) -> Res<u64> {
        id.trim()
            .parse::<u64>()
            .map_err(|_| CloudError::new(format!("volume {} not found", show(id))))
    }

    pub fn volume(&self, id: &str) -> Res<&Volume> {
        let n = Self::volume_id(id)?;
        self.volumes
            .get(&n)
            .ok_or_else(|| CloudError::new(format!("volume {n} not found")))
    }

    fn image(&self, id: &str) -> Res<&Image> {
        id.trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| self.images.get(&n))
            .ok_or_else(|| CloudError::new(format!("image {} not found", show(id))))
    }

    /// A snapshot in `region`; one in another region is "not found" there.
    fn snapshot_in(&self, region: &str, id: &str) -> Res<&Snapshot> {
        check_region(region)?;
        match self.snapshots.get(id) {
            Some(s) if s.region == region => Ok(s),
            _ => Err(CloudError::new(format!(
                "snapshot {} not found in region {region}",
                show(id)
            ))),
        }
    }

    /// `volume/create`. Returns the new volume's ID and where its bytes come from.
    pub fn create_volume(
        &mut self,
        now: Instant,
        region: &str,
        label: &str,
        size: &str,
        image: Option<&str>,
        snapshot_id: Option<&str>,
    ) -> Res<(u64, Source)> {
        check_region(region)?;
        let size_gb = parse_size(size)?;
        if label.trim().is_empty() {
            return Err(CloudError::new("invalid label: empty"));
        }
        let source = match (image, snapshot_id) {
            (Some(_), Some(_)) => {
                return Err(CloudError::new(
                    "invalid request: give either image or snapshot_id, not both",
                ));
            }
            (None, None) => Source::Empty,
            (None, Some(sid)) => {
                let s = self
                    .snapshots
                    .get(sid)
                    .ok_or_else(|| CloudError::new(format!("snapshot {} not found", show(sid))))?;
                if s.region != region {
                    return Err(CloudError::new(format!(
                        "invalid region {region} for snapshot {}: a volume from it can only be created in {}",
                        s.id, s.region
                    )));
                }
                if s.status != "available" {
                    return Err(CloudError::new(format!(
                        "snapshot {} is not available (status {})",
                        s.id, s.status
                    )));
                }
                if size_gb < s.size_gb {
                    return Err(CloudError::new(format!(
                        "invalid size {size_gb}: smaller than snapshot {} ({} GB)",
                        s.id, s.size_gb
                    )));
                }
                Source::Snapshot(s.id.clone())
            }
            (Some(iid), None) => {
                let i = self.image(iid)?;
                if i.region != region {
                    return Err(CloudError::new(format!(
                        "invalid region {region} for image {}: a volume from it can only be created in {}",
                        i.id, i.region
                    )));
                }
                if i.status != "active" {
                    return Err(CloudError::new(format!(
                        "image {} is not available (status {})",
                        i.id, i.status
                    )));
                }
                if size_gb < i.size_gb {
                    return Err(CloudError::new(format!(
                        "invalid size {size_gb}: smaller than image {} ({} GB)",
                        i.id, i.size_gb
                    )));
                }
                Source::Image(i.id)
            }
        };
        let id = self.next_volume;
        self.next_volume += 1;
        let identification = self.uuid();
        let kind = match &source {
            Source::Empty => TransitionKind::Create,
            Source::Snapshot(sid) => {
                self.log.used(TransitionKind::Snapshot, sid, now);
                TransitionKind::CreateFromSource
            }
            Source::Image(iid) => {
                self.log
                    .used(TransitionKind::Replicate, &iid.to_string(), now);
                TransitionKind::CreateFromSource
            }
        };
        let (pending, status) = self.pending(now, kind, id.to_string(), "available");
        self.volumes.insert(
            id,
            Volume {
                id,
                identification,
                label: label.to_string(),
                size_gb,
                region: region.to_string(),
                status: if pending.is_some() {
                    "creating"
                } else {
                    status
                },
                vm: None,
                bus: None,
                created: rfc3339(SystemTime::now()),
                pending,
            },
        );
        Ok((id, source))
    }

    /// `volume/list`, optionally in one region.
    pub fn list_volumes(&self, region: Option<&str>) -> Res<Vec<&Volume>> {
        if let Some(r) = region {
            check_region(r)?;
        }
        Ok(self
            .volumes
            .values()
            .filter(|v| region.is_none_or(|r| v.region == r))
            .collect())
    }

    /// `volume/attach`. Returns the volume's ID and the bus it is attached on: the one
    /// `target` names, or for `auto` the VM's own.
    pub fn attach(
        &mut self,
        now: Instant,
        volume_id: &str,
        vm_id: &str,
        target: &str,
    ) -> Res<(u64, Bus)> {
        let v = self.volume(volume_id)?;
        let id = v.id;
        let vm = self.vm(vm_id)?;
        if let Some(other) = &v.vm {
            return Err(CloudError::new(format!(
                "volume {id} is already attached to vm {other}"
            )));
        }
        if v.status != "available" {
            return Err(CloudError::new(format!(
                "volume {id} is not available (status {})",
                v.status
            )));
        }
        if vm.region != v.region {
            return Err(CloudError::new(format!(
                "volume {id} is in region {} but vm {} is in region {}; cross-region attach is invalid",
                v.region, vm.id, vm.region
            )));
        }
        let t = target.trim();
        let bus = if t == "auto" {
            vm.auto_bus
        } else {
            Bus::of_target(t).ok_or_else(|| {
                CloudError::new(format!(
                    "invalid target {}: use auto or a device such as /dev/vdb",
                    show(t)
                ))
            })?
        };
        let vm_id = vm.id.clone();
        let attached = self
            .volumes
            .values()
            .filter(|o| o.vm.as_deref() == Some(vm_id.as_str()))
            .count();
        if attached >= self.rules.max_volumes_per_vm {
            return Err(CloudError::new(format!(
                "vm {vm_id} already has the maximum of {} volumes attached",
                self.rules.max_volumes_per_vm
            )));
        }
        let v = self.volumes.get_mut(&id).expect("volume exists");
        v.vm = Some(vm_id);
        v.bus = Some(bus);
        self.transition(now, TransitionKind::Attach, id, "attaching", "in-use");
        Ok((id, bus))
    }

    /// `volume/detach`. Returns the volume's ID.
    pub fn detach(&mut self, now: Instant, volume_id: &str) -> Res<u64> {
        let v = self.volume(volume_id)?;
        let id = v.id;
        match (v.status, &v.vm) {
            ("in-use", Some(_)) => {}
            ("attaching" | "detaching", _) => {
                return Err(CloudError::new(format!(
                    "volume {id} is busy (status {})",
                    v.status
                )));
            }
            _ => return Err(CloudError::new(format!("volume {id} is not attached"))),
        }
        self.transition(now, TransitionKind::Detach, id, "detaching", "available");
        Ok(id)
    }

    /// `volume/extend`. Returns the volume's ID and new size.
    pub fn extend(&mut self, now: Instant, volume_id: &str, size: &str) -> Res<(u64, u64)> {
        let v = self.volume(volume_id)?;
        let id = v.id;
        let size_gb = parse_size(size)?;
        if let Some(vm) = &v.vm {
            return Err(CloudError::new(format!(
                "volume {id} is attached to vm {vm}; only a detached volume can be extended"
            )));
        }
        if v.status != "available" {
            return Err(CloudError::new(format!(
                "volume {id} is not available (status {})",
                v.status
            )));
        }
        if size_gb <= v.size_gb {
            return Err(CloudError::new(format!(
                "invalid size {size_gb}: the new size has to exceed the current {} GB",
                v.size_gb
            )));
        }
        self.volumes.get_mut(&id).expect("volume exists").size_gb = size_gb;
        self.transition(now, TransitionKind::Extend, id, "extending", "available");
        Ok((id, size_gb))
    }

    /// `volume/rename`.
    pub fn rename(&mut self, volume_id: &str, name: &str) -> Res<u64> {
        let id = self.volume(volume_id)?.id;
        if name.trim().is_empty() {
            return Err(CloudError::new("invalid name: empty"));
        }
        self.volumes.get_mut(&id).expect("volume exists").label = name.to_string();
        Ok(id)
    }

    /// `volume/delete`. Returns the volume's ID.
    pub fn delete_volume(&mut self, volume_id: &str) -> Res<u64> {
        let v = self.volume(volume_id)?;
        let id = v.id;
        if let Some(vm) = &v.vm {
            if matches!(v.status, "attaching" | "detaching") {
                return Err(CloudError::new(format!(
                    "volume {id} is busy (status {})",
                    v.status
                )));
            }
            return Err(CloudError::new(format!(
                "volume {id} is attached to vm {vm}; detach it first"
            )));
        }
        if self.rules.refuse_delete_with_snapshots {
            let n = self
                .snapshots
                .values()
                .filter(|s| s.volume_id == id)
                .count();
            if n > 0 {
                return Err(CloudError::new(format!(
                    "volume {id} has snapshots ({n}); delete them first"
                )));
            }
        }
        self.volumes.remove(&id);
        Ok(id)
    }

    /// `volume/snapshot-create`. Returns the snapshot's UUID and the volume's ID.
    pub fn snapshot_create(
        &mut self,
        now: Instant,
        volume_id: &str,
        label: &str,
    ) -> Res<(String, u64)> {
        let v = self.volume(volume_id)?.clone();
        if !matches!(v.status, "available" | "in-use") {
            return Err(CloudError::new(format!(
                "volume {} is not available (status {})",
                v.id, v.status
            )));
        }
        if label.trim().is_empty() {
            return Err(CloudError::new("invalid label: empty"));
        }
        let id = self.uuid();
        let (pending, status) =
            self.pending(now, TransitionKind::Snapshot, id.clone(), "available");
        self.snapshots.insert(
            id.clone(),
            Snapshot {
                id: id.clone(),
                label: label.to_string(),
                region: v.region.clone(),
                size_gb: v.size_gb,
                status: if pending.is_some() { "pending" } else { status },
                volume_id: v.id,
                volume: v.clone(),
                pending,
            },
        );
        Ok((id, v.id))
    }

    /// `volume/snapshot-list`: the snapshots of one region.
    pub fn snapshot_list(&self, region: &str) -> Res<Vec<&Snapshot>> {
        check_region(region)?;
        Ok(self
            .snapshots
            .values()
            .filter(|s| s.region == region)
            .collect())
    }

    /// `volume/snapshot-replicate`. Returns the new image's ID.
    pub fn snapshot_replicate(
        &mut self,
        now: Instant,
        region: &str,
        snapshot_id: &str,
        image_name: &str,
        dst_region: &str,
    ) -> Res<u64> {
        check_region(region)?;
        check_region(dst_region)?;
        let s = self.snapshot_in(region, snapshot_id)?;
        if s.status != "available" {
            return Err(CloudError::new(format!(
                "snapshot {} is not available (status {})",
                s.id, s.status
            )));
        }
        if image_name.trim().is_empty() {
            return Err(CloudError::new("invalid request: image_name is empty"));
        }
        let (size_gb, sid) = (s.size_gb, s.id.clone());
        let id = self.next_image;
        self.next_image += 1;
        let (pending, status) =
            self.pending(now, TransitionKind::Replicate, id.to_string(), "active");
        self.images.insert(
            id,
            Image {
                id,
                name: image_name.to_string(),
                region: dst_region.to_string(),
                size_gb,
                status: if pending.is_some() { "pending" } else { status },
                snapshot_id: sid,
                pending,
            },
        );
        Ok(id)
    }

    /// `volume/snapshot-delete`.
    pub fn snapshot_delete(&mut self, region: &str, snapshot_id: &str) -> Res<String> {
        let id = self.snapshot_in(region, snapshot_id)?.id.clone();
        self.snapshots.remove(&id);
        Ok(id)
    }

    /// `image/list`, optionally in one region.
    pub fn image_list(&self, region: Option<&str>) -> Res<Vec<&Image>> {
        if let Some(r) = region {
            check_region(r)?;
        }
        Ok(self
            .images
            .values()
            .filter(|i| region.is_none_or(|r| i.region == r))
            .collect())
    }

    /// `image/delete`: the deleted image's ID, or `None` when there was no such image (the
    /// real cloud answers `success: yes` for that too).
    pub fn image_delete(&mut self, image_id: &str) -> Option<u64> {
        let id = self.image(image_id).ok()?.id;
        self.images.remove(&id);
        Some(id)
    }

    /// Under the `old-rules` quirk: the region a volume action has to carry, and for an
    /// action on one volume, that it is the volume's.
    pub fn check_old_rules(&self, region: Option<&str>, volume_id: Option<&str>) -> Res<()> {
        let Some(region) = region.filter(|r| !r.is_empty()) else {
            return Err(CloudError::new("region not set"));
        };
        check_region(region)?;
        if let Some(vid) = volume_id {
            let v = self.volume(vid)?;
            if v.region != region {
                return Err(CloudError::new(format!(
                    "invalid volume: volume {} not found in region {region}",
                    v.id
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lunanode::ApiError;
    use crate::sim::transitions::Span;
    use std::time::Duration;

    fn cloud(transition_ms: u64, refuse: bool) -> (Cloud, String, String) {
        let mut c = Cloud::new(
            Rules {
                transitions: Duration::from_millis(transition_ms).into(),
                refuse_delete_with_snapshots: refuse,
                max_volumes_per_vm: 2,
                auto_bus: None,
                quirks: Quirks::NONE,
            },
            7,
        );
        let t = c.add_vm("toronto", Some("node-a")).unwrap().id;
        let m = c.add_vm("montreal", None).unwrap().id;
        (c, t, m)
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum K {
        NotFound,
        Invalid,
        State,
    }

    fn kind(e: &CloudError) -> K {
        match ApiError::from_cloud_message("volume/x", &e.0) {
            ApiError::NotFound { .. } => K::NotFound,
            ApiError::InvalidArgument { .. } => K::Invalid,
            ApiError::WrongState { .. } => K::State,
            other => panic!("message {:?} classified as {other:?}", e.0),
        }
    }

    #[track_caller]
    fn err<T: std::fmt::Debug>(r: Res<T>, k: K) -> String {
        let e = r.expect_err("expected a refusal");
        assert_eq!(kind(&e), k, "message {:?}", e.0);
        e.0
    }

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn create_validates_region_and_size() {
        let (mut c, _, _) = cloud(0, false);
        let n = now();
        err(
            c.create_volume(n, "paris", "a", "10", None, None),
            K::Invalid,
        );
        for bad in ["0", "-1", "1.5", "ten", "", "99999999"] {
            let m = err(
                c.create_volume(n, "toronto", "a", bad, None, None),
                K::Invalid,
            );
            assert!(m.contains("invalid size"), "{m}");
        }
        err(
            c.create_volume(n, "toronto", "", "1", None, None),
            K::Invalid,
        );
        err(
            c.create_volume(n, "toronto", "a", "1", Some("1"), Some("x")),
            K::Invalid,
        );
        let (id, src) = c
            .create_volume(n, "toronto", "a", "10", None, None)
            .unwrap();
        assert_eq!(src, Source::Empty);
        let v = c.volume(&id.to_string()).unwrap();
        assert_eq!(
            (v.status, v.size_gb, v.region.as_str()),
            ("available", 10, "toronto")
        );
        assert_eq!(v.identification.len(), 36);
        assert!(
            v.created.ends_with('Z') && v.created.len() == 20,
            "{}",
            v.created
        );
        err(c.list_volumes(Some("mars")), K::Invalid);
        assert_eq!(c.list_volumes(Some("montreal")).unwrap().len(), 0);
        assert_eq!(c.list_volumes(None).unwrap().len(), 1);
    }

    #[test]
    fn unknown_objects_are_not_found() {
        let (mut c, t, _) = cloud(0, false);
        let n = now();
        err(c.volume("12"), K::NotFound);
        err(c.volume("abc"), K::NotFound);
        err(c.attach(n, "12", &t, "auto"), K::NotFound);
        err(c.detach(n, "12"), K::NotFound);
        err(c.extend(n, "12", "5"), K::NotFound);
        err(c.rename("12", "x"), K::NotFound);
        err(c.delete_volume("12"), K::NotFound);
        err(c.snapshot_create(n, "12", "s"), K::NotFound);
        err(c.snapshot_delete("toronto", "nope"), K::NotFound);
        err(
            c.snapshot_replicate(n, "toronto", "nope", "i", "montreal"),
            K::NotFound,
        );
        assert_eq!(c.image_delete("5"), None);
        err(
            c.create_volume(n, "toronto", "a", "1", Some("5"), None),
            K::NotFound,
        );
        err(
            c.create_volume(n, "toronto", "a", "1", None, Some("nope")),
            K::NotFound,
        );
        let (id, _) = c.create_volume(n, "toronto", "a", "1", None, None).unwrap();
        let m = err(
            c.attach(n, &id.to_string(), "no-such-vm", "auto"),
            K::NotFound,
        );
        assert!(m.contains("invalid vm"));
        assert!(c.vm("no-such-vm").is_err());
    }

    #[test]
    fn attachments_per_vm_are_limited() {
        let (mut c, t, _) = cloud(0, false);
        let n = now();
        for i in 0..2 {
            let (id, _) = c
                .create_volume(n, "toronto", &format!("v{i}"), "1", None, None)
                .unwrap();
            c.attach(n, &id.to_string(), &t, "auto").unwrap();
        }
        let (id, _) = c
            .create_volume(n, "toronto", "v3", "1", None, None)
            .unwrap();
        let e = c.attach(n, &id.to_string(), &t, "auto").unwrap_err();
        assert!(
            matches!(
                ApiError::from_cloud_message("volume/attach", &e.to_string()),
                ApiError::LimitExceeded { .. }
            ),
            "{e}"
        );
    }

    #[test]
    fn attach_rules() {
        let (mut c, t, m) = cloud(0, false);
        let n = now();
        let (id, _) = c.create_volume(n, "toronto", "a", "2", None, None).unwrap();
        let ids = id.to_string();
        let msg = err(c.attach(n, &ids, &m, "auto"), K::Invalid);
        assert!(msg.contains("region"), "{msg}");
        err(c.attach(n, &ids, &t, "floppy"), K::Invalid);
        c.attach(n, &ids, &t, "auto").unwrap();
        let v = c.volume(&ids).unwrap();
        assert_eq!((v.status, v.attached()), ("in-use", t.as_str()));
        let msg = err(c.attach(n, &ids, &t, "auto"), K::State);
        assert_eq!(msg, format!("volume {id} is already attached to vm {t}"));
        let msg = err(c.delete_volume(&ids), K::State);
        assert_eq!(
            msg,
            format!("volume {id} is attached to vm {t}; detach it first")
        );
        err(c.extend(n, &ids, "5"), K::State);
        c.detach(n, &ids).unwrap();
        let v = c.volume(&ids).unwrap();
        assert_eq!((v.status, v.attached()), ("available", ""));
        let msg = err(c.detach(n, &ids), K::State);
        assert_eq!(msg, format!("volume {id} is not attached"));
        c.attach(n, &ids, &t, "/dev/vdc").unwrap();
    }

    #[test]
    fn the_target_or_the_vm_picks_the_bus() {
        let (mut c, virtio_vm, _) = cloud(0, false);
        c.rules.max_volumes_per_vm = 15;
        assert_eq!(c.vms[0].auto_bus, Bus::Virtio, "no quirks: virtio");
        let ide_vm = c.add_vm_on("toronto", Some("old"), Some(Bus::Ide)).unwrap();
        assert_eq!(ide_vm.bus, Bus::Ide);
        c.rules.quirks.ide_auto = true;
        assert_eq!(c.add_vm("toronto", None).unwrap().bus, Bus::Ide);
        c.rules.auto_bus = Some(Bus::Virtio);
        assert_eq!(c.add_vm("toronto", None).unwrap().bus, Bus::Virtio);
        let n = now();
        let mut attach = |vm: &str, target: &str| {
            let (id, _) = c.create_volume(n, "toronto", "a", "1", None, None).unwrap();
            let (got, bus) = c.attach(n, &id.to_string(), vm, target).unwrap();
            assert_eq!(got, id);
            assert_eq!(c.volumes[&id].bus, Some(bus));
            bus
        };
        assert_eq!(attach(&ide_vm.id, "auto"), Bus::Ide);
        assert_eq!(attach(&virtio_vm, "auto"), Bus::Virtio);
        for vm in [&ide_vm.id, &virtio_vm] {
            assert_eq!(attach(vm, "/dev/vda"), Bus::Virtio);
            assert_eq!(attach(vm, " /dev/hdb "), Bus::Ide);
            assert_eq!(attach(vm, "/dev/sdb"), Bus::Scsi);
        }
        for bad in ["/dev/xda", "/dev/vd1", "/dev/vdaa", "vda", ""] {
            let (id, _) = c.create_volume(n, "toronto", "a", "1", None, None).unwrap();
            err(c.attach(n, &id.to_string(), &virtio_vm, bad), K::Invalid);
            assert_eq!(c.volumes[&id].bus, None);
        }
        // Detach forgets the bus (also after a transition).
        let id = c.volumes.values().find(|v| v.bus.is_some()).unwrap().id;
        c.detach(n, &id.to_string()).unwrap();
        assert_eq!(
            (c.volumes[&id].vm.clone(), c.volumes[&id].bus),
            (None, None)
        );
        c.rules.transitions = Duration::from_millis(10).into();
        let (id, _) = c.create_volume(n, "toronto", "a", "1", None, None).unwrap();
        c.settle(n + Duration::from_millis(10));
        let ids = id.to_string();
        c.attach(n + Duration::from_millis(10), &ids, &ide_vm.id, "auto")
            .unwrap();
        assert_eq!(
            c.volumes[&id].bus,
            Some(Bus::Ide),
            "attaching keeps its bus"
        );
        c.settle(n + Duration::from_millis(20));
        c.detach(n + Duration::from_millis(20), &ids).unwrap();
        assert_eq!(
            c.volumes[&id].bus,
            Some(Bus::Ide),
            "detaching keeps its bus"
        );
        c.settle(n + Duration::from_millis(30));
        assert_eq!(c.volumes[&id].bus, None);
    }

    #[test]
    fn buses_parse_and_show() {
        for b in Bus::ALL {
            assert_eq!(b.as_str().parse::<Bus>().unwrap(), b);
            assert_eq!(b.to_string(), b.as_str());
            assert_eq!(
                serde_json::to_string(&b).unwrap(),
                format!("\"{}\"", b.as_str())
            );
        }
        assert_eq!("IDE".parse::<Bus>().unwrap(), Bus::Ide);
        assert!("floppy".parse::<Bus>().is_err());
        assert_eq!(Bus::of_target("/dev/vdz"), Some(Bus::Virtio));
        assert_eq!(Bus::of_target("auto"), None);
    }

    #[test]
    fn old_rules_need_the_volumes_region() {
        let (mut c, _, _) = cloud(0, false);
        let (id, _) = c
            .create_volume(now(), "montreal", "a", "1", None, None)
            .unwrap();
        let ids = id.to_string();
        for region in [None, Some("")] {
            let m = err(c.check_old_rules(region, Some(&ids)), K::Invalid);
            assert_eq!(m, "region not set");
            err(c.check_old_rules(region, None), K::Invalid);
        }
        c.check_old_rules(Some("montreal"), Some(&ids)).unwrap();
        c.check_old_rules(Some("toronto"), None).unwrap();
        let m = err(c.check_old_rules(Some("toronto"), Some(&ids)), K::NotFound);
        assert!(m.starts_with("invalid volume"), "{m}");
        err(c.check_old_rules(Some("mars"), Some(&ids)), K::Invalid);
        err(c.check_old_rules(Some("toronto"), Some("999")), K::NotFound);
    }

    #[test]
    fn extend_rules() {
        let (mut c, _, _) = cloud(0, false);
        let n = now();
        let (id, _) = c.create_volume(n, "toronto", "a", "2", None, None).unwrap();
        let ids = id.to_string();
        err(c.extend(n, &ids, "2"), K::Invalid);
        err(c.extend(n, &ids, "1"), K::Invalid);
        err(c.extend(n, &ids, "x"), K::Invalid);
        assert_eq!(c.extend(n, &ids, "3").unwrap(), (id, 3));
        assert_eq!(c.volume(&ids).unwrap().size_gb, 3);
        c.rename(&ids, "b").unwrap();
        assert_eq!(c.volume(&ids).unwrap().label, "b");
        err(c.rename(&ids, ""), K::Invalid);
    }

    #[test]
    fn transitions_take_time() {
        let (mut c, t, _) = cloud(1000, false);
        let t0 = now();
        let later = |s| t0 + Duration::from_millis(s);
        let (id, _) = c
            .create_volume(t0, "toronto", "a", "1", None, None)
            .unwrap();
        let ids = id.to_string();
        assert_eq!(c.volume(&ids).unwrap().status, "creating");
        let msg = err(c.attach(t0, &ids, &t, "auto"), K::State);
        assert!(msg.contains("not available"), "{msg}");
        err(c.snapshot_create(t0, &ids, "s"), K::State);
        c.settle(later(999));
        assert_eq!(c.volume(&ids).unwrap().status, "creating");
        c.settle(later(1000));
        assert_eq!(c.volume(&ids).unwrap().status, "available");
        c.attach(later(1000), &ids, &t, "auto").unwrap();
        let v = c.volume(&ids).unwrap();
        assert_eq!((v.status, v.attached()), ("attaching", ""));
        err(c.detach(later(1000), &ids), K::State);
        err(c.delete_volume(&ids), K::State);
        err(c.attach(later(1000), &ids, &t, "auto"), K::State);
        c.settle(later(2000));
        let v = c.volume(&ids).unwrap();
        assert_eq!((v.status, v.attached()), ("in-use", t.as_str()));
        let (sid, _) = c.snapshot_create(later(2000), &ids, "s").unwrap();
        assert_eq!(c.snapshots[&sid].status, "pending");
        err(
            c.snapshot_replicate(later(2000), "toronto", &sid, "i", "roubaix"),
            K::State,
        );
        err(
            c.create_volume(later(2000), "toronto", "b", "1", None, Some(&sid)),
            K::State,
        );
        c.detach(later(2000), &ids).unwrap();
        let v = c.volume(&ids).unwrap();
        assert_eq!((v.status, v.attached()), ("detaching", t.as_str()));
        err(c.detach(later(2000), &ids), K::State);
        c.settle(later(3000));
        let v = c.volume(&ids).unwrap();
        assert_eq!(
            (v.status, v.attached(), v.vm.clone()),
            ("available", "", None)
        );
        assert_eq!(c.snapshots[&sid].status, "available");
        let img = c
            .snapshot_replicate(later(3000), "toronto", &sid, "i", "roubaix")
            .unwrap();
        assert_eq!(c.images[&img].status, "pending");
        err(
            c.create_volume(
                later(3000),
                "roubaix",
                "b",
                "1",
                Some(&img.to_string()),
                None,
            ),
            K::State,
        );
        c.settle(later(4000));
        assert_eq!(c.images[&img].status, "active");
        c.create_volume(
            later(4000),
            "roubaix",
            "b",
            "1",
            Some(&img.to_string()),
            None,
        )
        .unwrap();
    }

    #[test]
    fn transitions_are_drawn_per_kind_and_logged() {
        let (mut c, t, _) = cloud(0, false);
        let ms = Duration::from_millis;
        c.rules
            .transitions
            .set(TransitionKind::Create, Span::fixed(ms(100)));
        c.rules
            .transitions
            .set(TransitionKind::Extend, Span::fixed(ms(300)));
        c.rules.transitions.set(
            TransitionKind::Snapshot,
            Span {
                lo: ms(400),
                hi: ms(500),
            },
        );
        let t0 = now();
        let (id, _) = c
            .create_volume(t0, "toronto", "a", "1", None, None)
            .unwrap();
        let ids = id.to_string();
        // Attach was left instant: no transition, nothing logged.
        c.settle(t0 + ms(100));
        c.attach(t0 + ms(100), &ids, &t, "auto").unwrap();
        assert_eq!(c.volume(&ids).unwrap().status, "in-use");
        let (sid, _) = c.snapshot_create(t0 + ms(100), &ids, "s").unwrap();
        c.detach(t0 + ms(100), &ids).unwrap();
        c.extend(t0 + ms(100), &ids, "2").unwrap();
        let v = c.volume(&ids).unwrap();
        assert_eq!((v.status, v.size_gb), ("extending", 2));
        c.settle(t0 + ms(399));
        assert_eq!(c.volume(&ids).unwrap().status, "extending");
        c.settle(t0 + ms(400));
        assert_eq!(c.volume(&ids).unwrap().status, "available");
        c.settle(t0 + ms(600));
        let (v2, _) = c
            .create_volume(t0 + ms(700), "toronto", "b", "1", None, Some(&sid))
            .unwrap();
        assert_eq!(c.volume(&v2.to_string()).unwrap().status, "available");
        let log = c.log.take();
        let kinds: Vec<_> = log.iter().map(|r| (r.kind, r.object.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (TransitionKind::Create, ids.as_str()),
                (TransitionKind::Snapshot, sid.as_str()),
                (TransitionKind::Extend, ids.as_str())
            ]
        );
        assert_eq!(log[0].ready - log[0].started, ms(100));
        let snap = &log[1];
        assert!(snap.ready - snap.started >= ms(400) && snap.ready - snap.started <= ms(500));
        assert_eq!(snap.used, Some(t0 + ms(700)));
        assert_eq!(log[2].used, None);
        assert!(c.log.take().is_empty());
    }

    #[test]
    fn snapshot_and_image_rules() {
        let (mut c, _, _) = cloud(0, false);
        let n = now();
        let (id, _) = c.create_volume(n, "toronto", "a", "2", None, None).unwrap();
        let ids = id.to_string();
        err(c.snapshot_create(n, &ids, " "), K::Invalid);
        let (sid, vid) = c.snapshot_create(n, &ids, "snap").unwrap();
        assert_eq!(vid, id);
        assert_eq!(sid.len(), 36);
        assert_eq!(c.snapshot_list("toronto").unwrap().len(), 1);
        assert_eq!(c.snapshot_list("montreal").unwrap().len(), 0);
        err(c.snapshot_list("atlantis"), K::Invalid);
        // Wrong region: not found there.
        let msg = err(c.snapshot_delete("montreal", &sid), K::NotFound);
        assert!(msg.contains(&sid));
        err(c.snapshot_delete("atlantis", &sid), K::Invalid);
        err(
            c.snapshot_replicate(n, "montreal", &sid, "i", "roubaix"),
            K::NotFound,
        );
        err(
            c.snapshot_replicate(n, "toronto", &sid, "i", "mars"),
            K::Invalid,
        );
        err(
            c.snapshot_replicate(n, "toronto", &sid, "", "roubaix"),
            K::Invalid,
        );
        // Create from a snapshot: only in its region, and not smaller.
        let msg = err(
            c.create_volume(n, "montreal", "b", "2", None, Some(&sid)),
            K::Invalid,
        );
        assert!(msg.contains("region"));
        err(
            c.create_volume(n, "toronto", "b", "1", None, Some(&sid)),
            K::Invalid,
        );
        let (v2, src) = c
            .create_volume(n, "toronto", "b", "3", None, Some(&sid))
            .unwrap();
        assert_eq!(src, Source::Snapshot(sid.clone()));
        assert_eq!(c.volumes[&v2].size_gb, 3);
        // Replicate to another region; create from the image only there.
        let img = c
            .snapshot_replicate(n, "toronto", &sid, "img", "roubaix")
            .unwrap();
        let imgs = img.to_string();
        assert_eq!(c.images[&img].status, "active");
        assert_eq!(c.image_list(Some("roubaix")).unwrap().len(), 1);
        assert_eq!(c.image_list(Some("toronto")).unwrap().len(), 0);
        err(c.image_list(Some("nowhere")), K::Invalid);
        let msg = err(
            c.create_volume(n, "toronto", "c", "2", Some(&imgs), None),
            K::Invalid,
        );
        assert!(msg.contains("region"));
        err(
            c.create_volume(n, "roubaix", "c", "1", Some(&imgs), None),
            K::Invalid,
        );
        let (_, src) = c
            .create_volume(n, "roubaix", "c", "2", Some(&imgs), None)
            .unwrap();
        assert_eq!(src, Source::Image(img));
        // Delete with snapshots is allowed by default.
        c.delete_volume(&ids).unwrap();
        assert_eq!(c.snapshot_list("toronto").unwrap().len(), 1);
        c.snapshot_delete("toronto", &sid).unwrap();
        err(c.snapshot_delete("toronto", &sid), K::NotFound);
        assert_eq!(c.image_delete(&imgs), Some(img));
        assert_eq!(c.image_delete(&imgs), None);
        assert_eq!(c.image_delete("not-a-number"), None);
    }

    #[test]
    fn refuse_delete_with_snapshots_setting() {
        let (mut c, _, _) = cloud(0, true);
        let n = now();
        let (id, _) = c.create_volume(n, "toronto", "a", "2", None, None).unwrap();
        let ids = id.to_string();
        let (sid, _) = c.snapshot_create(n, &ids, "s").unwrap();
        let msg = err(c.delete_volume(&ids), K::State);
        assert!(msg.contains("has snapshots"), "{msg}");
        c.snapshot_delete("toronto", &sid).unwrap();
        c.delete_volume(&ids).unwrap();
        err(c.volume(&ids), K::NotFound);
    }

    #[test]
    fn seeded_ids_are_deterministic() {
        let (a, _, _) = cloud(0, false);
        let (b, _, _) = cloud(0, false);
        assert_eq!(a.vms[0].id, b.vms[0].id);
        assert_ne!(a.vms[0].id, a.vms[1].id);
    }

    #[test]
    fn rfc3339_formats() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_545_008_415);
        assert_eq!(rfc3339(t), "2018-12-17T01:00:15Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00Z");
    }
}
