//! A simulator of the Luna Node API: the same wire format, signature check, JSON shapes and
//! rules as the real cloud, with volumes kept in memory or in sparse files attached as loop
//! devices (with the by-id links udev makes on a real VM for a disk on the attachment's bus).
//! The real cloud's known and likely undocumented behaviours are played too ([`Quirks`]).
//!
//! Layout: [`state`] is the cloud model and its rules (pure), `actions` maps API calls onto
//! it, `http` is the axum server (form parsing, signature, faults, rate limit), `backing` keeps
//! the bytes, `faults` decides injected failures, `journal` records the requests received.

mod actions;
mod backing;
mod faults;
mod http;
mod journal;
mod quirks;
mod sign;
pub mod state;
pub mod transitions;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use backing::{link_name, link_name_on};
pub use faults::FaultKind;
pub use http::{AUTH_ERROR, RATE_LIMIT_ERROR, TRANSIENT_ERROR};
pub use journal::{JOURNAL_LIMIT, SimRequest};
pub use quirks::Quirks;
pub use sign::signature;
pub use state::{Bus, REGIONS};
pub use transitions::{Span, TransitionItem, TransitionKind, TransitionRecord, Transitions};

use backing::Store;
use faults::{Faults, TokenBucket};
use journal::Journal;
use state::{Cloud, Rules};

/// Where simulated volumes keep their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    /// Metadata only.
    Memory,
    /// A sparse file per volume, attached as a loop device with a by-id link.
    Loop,
}

/// A VM to pre-create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    pub region: String,
    pub name: Option<String>,
}

impl std::str::FromStr for VmSpec {
    type Err = String;

    /// `REGION` or `REGION:NAME` (a bus is given with [`VmArg`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let a: VmArg = s.parse()?;
        match a.bus {
            None => Ok(a.spec),
            Some(_) => Err(format!(
                "a bus cannot be given here in {s:?} (use REGION or REGION:NAME)"
            )),
        }
    }
}

/// A `--vm` value: `REGION`, `REGION:NAME`, `REGION:NAME:BUS` or `REGION::BUS`, where BUS
/// (`ide`, `virtio` or `scsi`) is the bus of the VM's disks, where `target=auto` attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmArg {
    pub spec: VmSpec,
    pub bus: Option<Bus>,
}

impl std::str::FromStr for VmArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.splitn(3, ':').map(str::trim);
        let region = parts.next().unwrap_or_default();
        let name = parts.next();
        let bus = parts.next();
        if !REGIONS.contains(&region) {
            return Err(format!(
                "unknown region {region:?} in --vm {s:?} (known: {})",
                REGIONS.join(", ")
            ));
        }
        let bus = match bus {
            None => None,
            Some(b) => Some(b.parse::<Bus>().map_err(|e| format!("{e} in --vm {s:?}"))?),
        };
        let name = match name {
            Some("") if bus.is_some() => None,
            Some("") => return Err(format!("empty VM name in --vm {s:?}")),
            n => n,
        };
        Ok(VmArg {
            spec: VmSpec {
                region: region.to_string(),
                name: name.map(str::to_string),
            },
            bus,
        })
    }
}

/// Simulator settings.
///
/// An empty `state_dir` means "make a temporary directory and remove it at shutdown"; an
/// empty `by_id_dir` means `{state_dir}/by-id`.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub backing: Backing,
    pub state_dir: PathBuf,
    pub by_id_dir: PathBuf,
    pub vms: Vec<VmSpec>,
    /// The bus of `vms[i]`'s disks, where `target=auto` attaches (kept apart from [`VmSpec`]
    /// so that its literals stay valid); missing or `None`: [`SimConfig::default_bus`].
    pub vm_buses: Vec<Option<Bus>>,
    /// The bus of VMs created without one (`None`: IDE with the `ide-auto` quirk, else
    /// virtio). Overrides the `ide-auto` quirk.
    pub auto_bus: Option<Bus>,
    /// The real cloud's undocumented behaviours to play (default: [`Quirks::LIKELY`]).
    pub quirks: Quirks,
    pub latency: Duration,
    /// How long status transitions take, per kind.
    pub transition: Transitions,
    pub fault_rate: f64,
    pub seed: u64,
    pub refuse_delete_with_snapshots: bool,
    pub rate_limit_qps: Option<f64>,
}

impl Default for SimConfig {
    /// Loopback on a free port, memory backing, a temporary state dir, one VM in toronto,
    /// the likely quirks (so `target=auto` attaches on IDE), no latency, no transitions, no
    /// faults, seed 1.
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            backing: Backing::Memory,
            state_dir: PathBuf::new(),
            by_id_dir: PathBuf::new(),
            vms: vec![VmSpec {
                region: "toronto".into(),
                name: None,
            }],
            vm_buses: Vec::new(),
            auto_bus: None,
            quirks: Quirks::default(),
            latency: Duration::ZERO,
            transition: Transitions::default(),
            fault_rate: 0.0,
            seed: 1,
            refuse_delete_with_snapshots: false,
            rate_limit_qps: None,
        }
    }
}

impl SimConfig {
    /// The bus of VMs created without one: `auto_bus`, else IDE with the `ide-auto` quirk,
    /// else virtio.
    pub fn default_bus(&self) -> Bus {
        self.rules().default_bus()
    }

    fn rules(&self) -> Rules {
        Rules {
            transitions: self.transition,
            refuse_delete_with_snapshots: self.refuse_delete_with_snapshots,
            max_volumes_per_vm: state::MAX_VOLUMES_PER_VM,
            auto_bus: self.auto_bus,
            quirks: self.quirks,
        }
    }
}

/// A VM as the simulator created it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SimVm {
    pub id: String,
    pub name: String,
    pub region: String,
    /// The bus of the VM's own disks: where `target=auto` attaches.
    pub bus: Bus,
}

/// A volume, as [`SimHandle::state`] shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SimVolume {
    pub id: u64,
    pub identification: String,
    pub label: String,
    pub size_gb: u64,
    pub region: String,
    pub status: String,
    /// The VM it is attached to (as `volume/info` reports it).
    pub attached: Option<String>,
    /// The bus of its attachment (`virtio`, `ide` or `scsi`) while attached, attaching or
    /// detaching.
    pub bus: Option<String>,
    pub created: String,
    /// Loop backing: the loop device while attached.
    pub device: Option<String>,
    /// Loop backing: the by-id link while attached (named for the bus: see [`link_name_on`]).
    pub link: Option<String>,
}

/// A volume snapshot, as [`SimHandle::state`] shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SimSnapshot {
    pub id: String,
    pub label: String,
    pub region: String,
    pub volume_id: u64,
    pub size_gb: u64,
    pub status: String,
}

/// An image, as [`SimHandle::state`] shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SimImage {
    pub id: u64,
    pub name: String,
    pub region: String,
    pub size_gb: u64,
    pub status: String,
}

/// Everything the simulator holds, for tests (also served as `GET /_sim/state`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SimState {
    pub volumes: Vec<SimVolume>,
    pub snapshots: Vec<SimSnapshot>,
    pub images: Vec<SimImage>,
    pub vms: Vec<SimVm>,
    /// Requests per `category/action`, every request counted (failed and faulted ones too).
    pub calls: BTreeMap<String, u64>,
}

/// A running simulator.
pub struct SimHandle {
    pub url: String,
    pub api_id: String,
    pub api_key: String,
    pub vms: Vec<SimVm>,
    pub backing: Backing,
    pub by_id_dir: PathBuf,
    addr: SocketAddr,
    state_dir: PathBuf,
    inner: Arc<Inner>,
    /// Stops the server and cleans up when dropped (kept apart so that `SimHandle` itself has
    /// no `Drop` and its public fields can be moved out).
    guard: Guard,
}

/// Owns the server task and the clean-up duty.
struct Guard {
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
    server: Option<tokio::task::JoinHandle<()>>,
    /// The state dir, when the simulator made it (removed at the end).
    owned_dir: Option<PathBuf>,
    cleaned: bool,
}

/// Errors starting the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    Other(String),
}

/// The cloud and its bytes, under one lock.
pub(crate) struct World {
    pub(crate) cloud: Cloud,
    pub(crate) store: Store,
}

/// What the server tasks share.
pub(crate) struct Inner {
    pub(crate) api_id: String,
    pub(crate) api_key: String,
    pub(crate) world: Mutex<World>,
    pub(crate) faults: Mutex<Faults>,
    pub(crate) bucket: Mutex<Option<TokenBucket>>,
    pub(crate) calls: Mutex<BTreeMap<String, u64>>,
    /// Every API request received (the last [`JOURNAL_LIMIT`]).
    pub(crate) journal: Mutex<Journal>,
    pub(crate) latency: Mutex<Duration>,
    /// Total time spent in the API handler, in nanoseconds.
    pub(crate) api_nanos: std::sync::atomic::AtomicU64,
    /// API requests being answered now, and the most seen at once.
    pub(crate) in_flight: std::sync::atomic::AtomicUsize,
    pub(crate) max_in_flight: std::sync::atomic::AtomicUsize,
    /// Total time from requests' first bytes read to their replies written, in nanoseconds.
    pub(crate) served_nanos: std::sync::atomic::AtomicU64,
    /// Answer every request as a bad API key or signature is answered.
    pub(crate) refuse_credentials: std::sync::atomic::AtomicBool,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Lock, ignoring poisoning (a panicked request leaves consistent-enough state for a simulator).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    pub(crate) fn snapshot_state(&self) -> SimState {
        let calls = lock(&self.calls).clone();
        let mut w = lock(&self.world);
        w.cloud.settle(Instant::now());
        let World { cloud, store } = &*w;
        let volumes = cloud
            .volumes
            .values()
            .map(|v| {
                let a = store.attached.get(&v.id);
                SimVolume {
                    id: v.id,
                    identification: v.identification.clone(),
                    label: v.label.clone(),
                    size_gb: v.size_gb,
                    region: v.region.clone(),
                    status: v.status.to_string(),
                    attached: Some(v.attached().to_string()).filter(|s| !s.is_empty()),
                    bus: v.bus.map(|b| b.to_string()),
                    created: v.created.clone(),
                    device: a.map(|a| a.device.display().to_string()),
                    link: a.map(|a| a.link.display().to_string()),
                }
            })
            .collect();
        let snapshots = cloud
            .snapshots
            .values()
            .map(|s| SimSnapshot {
                id: s.id.clone(),
                label: s.label.clone(),
                region: s.region.clone(),
                volume_id: s.volume_id,
                size_gb: s.size_gb,
                status: s.status.to_string(),
            })
            .collect();
        let images = cloud
            .images
            .values()
            .map(|i| SimImage {
                id: i.id,
                name: i.name.clone(),
                region: i.region.clone(),
                size_gb: i.size_gb,
                status: i.status.to_string(),
            })
            .collect();
        let vms = cloud
            .vms
            .iter()
            .map(|v| SimVm {
                id: v.id.clone(),
                name: v.name.clone(),
                region: v.region.clone(),
                bus: v.auto_bus,
            })
            .collect();
        SimState {
            volumes,
            snapshots,
            images,
            vms,
            calls,
        }
    }
}

fn temp_state_dir(seed: u64) -> std::io::Result<PathBuf> {
    let mut rng = fastrand::Rng::new();
    for _ in 0..16 {
        let p = std::env::temp_dir().join(format!(
            "lunanode-sim-{}-{seed:x}-{:08x}",
            std::process::id(),
            rng.u32(..)
        ));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(
        "cannot pick a temporary directory name",
    ))
}

impl SimHandle {
    /// Start a simulator.
    pub async fn start(cfg: SimConfig) -> Result<SimHandle, SimError> {
        let err = |m: String| SimError::Other(format!("simulator: {m}"));
        if cfg.backing == Backing::Loop && !loop_available() {
            return Err(err(
                "the loop backing needs root, /dev/loop-control and losetup".into(),
            ));
        }
        if let Some(q) = cfg.rate_limit_qps
            && !(q.is_finite() && q > 0.0)
        {
            return Err(err(format!(
                "rate limit must be a positive number, got {q}"
            )));
        }
        // Credentials and IDs follow from the seed.
        let mut rng = fastrand::Rng::with_seed(cfg.seed);
        let api_id = sign::random_token(&mut rng, 16);
        let api_key = sign::random_token(&mut rng, 128);
        let mut cloud = Cloud::new(cfg.rules(), cfg.seed);
        let mut vms = Vec::new();
        for (i, spec) in cfg.vms.iter().enumerate() {
            let bus = cfg.vm_buses.get(i).copied().flatten();
            vms.push(
                cloud
                    .add_vm_on(&spec.region, spec.name.as_deref(), bus)
                    .map_err(|e| err(e.0))?,
            );
        }

        let owned_state_dir = cfg.state_dir.as_os_str().is_empty();
        let state_dir = if owned_state_dir {
            temp_state_dir(cfg.seed).map_err(|e| err(format!("cannot make a state dir: {e}")))?
        } else {
            std::fs::create_dir_all(&cfg.state_dir)
                .map_err(|e| err(format!("cannot create {}: {e}", cfg.state_dir.display())))?;
            cfg.state_dir.clone()
        };
        let remove_owned = || {
            if owned_state_dir {
                let _ = std::fs::remove_dir_all(&state_dir);
            }
        };
        let by_id_dir = if cfg.by_id_dir.as_os_str().is_empty() {
            state_dir.join("by-id")
        } else {
            cfg.by_id_dir.clone()
        };
        let store = match Store::new(cfg.backing, state_dir.clone(), by_id_dir.clone()) {
            Ok(s) => s,
            Err(e) => {
                remove_owned();
                return Err(err(e));
            }
        };
        let listener = match tokio::net::TcpListener::bind(cfg.listen).await {
            Ok(l) => l,
            Err(e) => {
                remove_owned();
                return Err(err(format!("cannot listen on {}: {e}", cfg.listen)));
            }
        };
        let addr = listener
            .local_addr()
            .map_err(|e| err(format!("no local address: {e}")))?;

        let (stop, stop_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            api_id: api_id.clone(),
            api_key: api_key.clone(),
            world: Mutex::new(World { cloud, store }),
            faults: Mutex::new(Faults::new(cfg.seed, cfg.fault_rate)),
            bucket: Mutex::new(
                cfg.rate_limit_qps
                    .map(|q| TokenBucket::new(q, Instant::now())),
            ),
            calls: Mutex::new(BTreeMap::new()),
            journal: Mutex::new(Journal::default()),
            latency: Mutex::new(cfg.latency),
            api_nanos: std::sync::atomic::AtomicU64::new(0),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            max_in_flight: std::sync::atomic::AtomicUsize::new(0),
            served_nanos: std::sync::atomic::AtomicU64::new(0),
            refuse_credentials: std::sync::atomic::AtomicBool::new(false),
            shutdown: stop_rx.clone(),
        });
        let app = http::router(inner.clone());
        let listener = http::TimedListener {
            listener,
            inner: inner.clone(),
        };
        let mut graceful = stop_rx;
        let server = tokio::spawn(async move {
            let shutdown = async move {
                let _ = graceful.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "sim: server failed");
            }
        });
        tracing::info!(%addr, backing = ?cfg.backing, quirks = %cfg.quirks, state_dir = %state_dir.display(), "simulator listening");
        Ok(SimHandle {
            url: format!("http://{addr}/api/"),
            api_id,
            api_key,
            vms,
            backing: cfg.backing,
            by_id_dir,
            addr,
            state_dir: state_dir.clone(),
            inner: inner.clone(),
            guard: Guard {
                inner,
                stop,
                server: Some(server),
                owned_dir: owned_state_dir.then_some(state_dir),
                cleaned: false,
            },
        })
    }

    /// Stop serving and clean up loop devices and links.
    pub async fn shutdown(mut self) {
        let g = &mut self.guard;
        let _ = g.stop.send(true);
        if let Some(server) = g.server.take() {
            let abort = server.abort_handle();
            if tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let inner = g.inner.clone();
        let dir = g.owned_dir.clone();
        g.cleaned = true;
        let _ = tokio::task::spawn_blocking(move || cleanup(&inner, dir.as_deref())).await;
    }

    /// The address the server is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where volume, snapshot and image files live (loop backing).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Everything the simulator holds, with transitions that are due applied.
    pub fn state(&self) -> SimState {
        self.inner.snapshot_state()
    }

    /// Zero the per-action request counters (and the times spent answering, and the most
    /// requests seen at once).
    pub fn reset_counters(&self) {
        lock(&self.inner.calls).clear();
        for n in [&self.inner.api_nanos, &self.inner.served_nanos] {
            n.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        self.inner
            .max_in_flight
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// The most API requests the simulator was answering at the same time since the start
    /// or the last [`SimHandle::reset_counters`].
    pub fn max_in_flight(&self) -> usize {
        self.inner
            .max_in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Total time the API handler spent on requests (latency included) since the start or
    /// the last [`SimHandle::reset_counters`]: from the parsed request to the reply built.
    pub fn api_time(&self) -> Duration {
        Duration::from_nanos(
            self.inner
                .api_nanos
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Total time the simulator spent serving HTTP requests (latency included) since the
    /// start or the last [`SimHandle::reset_counters`]: from each request's first bytes
    /// read off its connection to its reply written, so HTTP parsing, routing and writing
    /// count too. This is the cloud's whole share of a caller's latency when the caller
    /// sends one request at a time (benchmarks subtract it to find what the caller adds).
    pub fn served_time(&self) -> Duration {
        Duration::from_nanos(
            self.inner
                .served_nanos
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Every API request received since the start or the last
    /// [`SimHandle::clear_requests`] (the last [`JOURNAL_LIMIT`]), oldest first: handler,
    /// whether `req` was ASCII, and its parameters without credentials. Also served as
    /// `GET /_sim/requests`. Not cleared by [`SimHandle::reset_counters`].
    pub fn requests(&self) -> Vec<SimRequest> {
        lock(&self.inner.journal).all()
    }

    /// Empty the request journal.
    pub fn clear_requests(&self) {
        lock(&self.inner.journal).clear();
    }

    /// The quirks being played.
    pub fn quirks(&self) -> Quirks {
        lock(&self.inner.world).cloud.rules.quirks
    }

    /// Change the quirks played from now on. `ide-auto` decides the bus of VMs created
    /// afterwards without one (unless the configuration named an `auto_bus`); the others
    /// apply to the next request.
    pub fn set_quirks(&self, q: Quirks) {
        lock(&self.inner.world).cloud.rules.quirks = q;
    }

    /// Requests per `category/action` since the start or the last reset, without copying
    /// the rest of the state.
    pub fn calls(&self) -> BTreeMap<String, u64> {
        lock(&self.inner.calls).clone()
    }

    /// Change the probability that a request fails with an injected fault (clamped to [0, 1]).
    pub fn set_fault_rate(&self, p: f64) {
        lock(&self.inner.faults).rate = faults::clamp_rate(p);
    }

    /// Limit injected faults to these kinds (all kinds by default; empty means none).
    pub fn set_fault_kinds(&self, kinds: &[FaultKind]) {
        lock(&self.inner.faults).kinds = kinds.to_vec();
    }

    /// How long an injected timeout holds the request before answering 504 (default 5 s).
    pub fn set_fault_timeout(&self, d: Duration) {
        lock(&self.inner.faults).timeout = d;
    }

    /// Change the server-side rate limit (`None`: unlimited). Non-positive values mean `None`.
    pub fn set_rate_limit_qps(&self, qps: Option<f64>) {
        let qps = qps.filter(|q| q.is_finite() && *q > 0.0);
        *lock(&self.inner.bucket) = qps.map(|q| TokenBucket::new(q, Instant::now()));
    }

    /// Refuse every request from now on as the cloud refuses a bad API key or signature
    /// (`false`: accept correctly signed requests again). Also `POST /_sim/faults`.
    pub fn set_refuse_credentials(&self, refuse: bool) {
        self.inner
            .refuse_credentials
            .store(refuse, std::sync::atomic::Ordering::Relaxed);
    }

    /// Change the latency added to every API request.
    pub fn set_latency(&self, d: Duration) {
        *lock(&self.inner.latency) = d;
    }

    /// Make every status transition take `d` (for changes started from now on).
    pub fn set_transition(&self, d: Duration) {
        self.set_transitions(d.into());
    }

    /// Change how long status transitions take, per kind (for changes started from now on).
    pub fn set_transitions(&self, t: Transitions) {
        lock(&self.inner.world).cloud.rules.transitions = t;
    }

    /// The transitions made since the start or the last call (at most the last 100,000):
    /// when each started, was ready, and was first used as a source.
    pub fn take_transitions(&self) -> Vec<TransitionRecord> {
        lock(&self.inner.world).cloud.log.take()
    }

    /// Create another VM, on the default bus (see [`SimConfig::default_bus`]).
    pub fn add_vm(&self, region: &str, name: Option<&str>) -> Result<SimVm, SimError> {
        lock(&self.inner.world)
            .cloud
            .add_vm(region, name)
            .map_err(|e| SimError::Other(e.0))
    }

    /// Create another VM whose disks are on `bus` (where `target=auto` attaches).
    pub fn add_vm_on(&self, region: &str, name: Option<&str>, bus: Bus) -> Result<SimVm, SimError> {
        lock(&self.inner.world)
            .cloud
            .add_vm_on(region, name, Some(bus))
            .map_err(|e| SimError::Other(e.0))
    }
}

/// Detach loop devices, remove links, and remove the state dir if the simulator made it.
fn cleanup(inner: &Inner, owned_dir: Option<&Path>) {
    lock(&inner.world).store.cleanup();
    if let Some(dir) = owned_dir
        && let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "sim: cannot remove the state dir");
    }
}

impl Drop for Guard {
    /// A handle dropped without [`SimHandle::shutdown`] (e.g. a failing test) still releases
    /// its loop devices, links and temporary files.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let _ = self.stop.send(true);
        if let Some(server) = self.server.take() {
            server.abort();
        }
        cleanup(&self.inner, self.owned_dir.as_deref());
    }
}

/// Whether the loop backing can run here (root and a loop control device).
pub fn loop_available() -> bool {
    nix::unistd::geteuid().is_root()
        && Path::new("/dev/loop-control").exists()
        && backing::find_program("losetup").is_some()
}

/// `lunanode-csi sim` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on (port 0: any free port; the real one is printed).
    #[arg(long, env = "LUNANODE_SIM_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Where volume bytes live.
    #[arg(
        long,
        env = "LUNANODE_SIM_BACKING",
        value_enum,
        default_value = "memory"
    )]
    pub backing: Backing,
    /// Directory for volume, snapshot and image files (default: a new temporary directory,
    /// removed at exit).
    #[arg(long, env = "LUNANODE_SIM_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Directory for the by-id links of attached volumes (`virtio-<serial>`,
    /// `ata-QEMU_HARDDISK_<serial>` or `scsi-0QEMU_QEMU_HARDDISK_<serial>` by the bus)
    /// (default: `{state-dir}/by-id`).
    #[arg(long, env = "LUNANODE_SIM_BY_ID_DIR")]
    pub by_id_dir: Option<PathBuf>,
    /// A VM to create, `REGION[:NAME[:BUS]]` (`REGION::BUS` for no name), BUS being `ide`,
    /// `virtio` or `scsi`: the bus of the VM's disks, where `volume/attach` with
    /// `target=auto` attaches (default: --auto-bus). Repeatable; default: one in toronto.
    #[arg(
        long = "vm",
        env = "LUNANODE_SIM_VMS",
        value_delimiter = ',',
        value_name = "REGION[:NAME[:BUS]]"
    )]
    pub vms: Vec<VmArg>,
    /// The bus of VMs that do not name one in --vm (`ide`, `virtio` or `scsi`): where
    /// `target=auto` attaches on them. Default: `ide` with the `ide-auto` quirk (on by
    /// default: VMs are created with IDE disks unless made with `volume_virtio`), else
    /// `virtio`.
    #[arg(long, env = "LUNANODE_SIM_AUTO_BUS", value_name = "BUS")]
    pub auto_bus: Option<Bus>,
    /// The real cloud's undocumented behaviours to play, comma-separated, applied left to
    /// right: `ide-auto` (VMs without a bus attach `target=auto` on IDE: no `virtio-` link;
    /// like --auto-bus ide), `list-words` (`volume/list` says `active` where `volume/info`
    /// says `available` or `in-use`), `old-rules` (`volume/list`, `info`, `attach`,
    /// `detach`, `extend`, `delete` and `snapshot-create` answer `region not set` without
    /// `region`, and refuse a region the volume is not in), `object-lists` (the `volumes`,
    /// `snapshots`, `images` and `vms` lists come as objects keyed "0", "1", …); `likely`
    /// (= ide-auto,list-words: the likeliest real behaviour), `none`, `all`, and `no-NAME`
    /// to turn one off. Always on: a `req` with non-ASCII bytes fails the signature check,
    /// and `image/delete` of a missing image succeeds.
    #[arg(
        long,
        env = "LUNANODE_SIM_QUIRKS",
        default_value = "likely",
        value_name = "LIST"
    )]
    pub quirks: Quirks,
    /// Latency added to every request, in milliseconds.
    #[arg(long, env = "LUNANODE_SIM_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// How long status transitions (creating, attaching, detaching, extending, pending)
    /// take, in ms, drawn per operation from the seed: `MS`, or `LO..HI` (uniform), for every
    /// kind, or `KIND=MS` / `KIND=LO..HI` for one kind (create, create-from-source, attach,
    /// detach, extend, snapshot, replicate); or a named shape: `steady` (each kind within
    /// ±10% of its own mean: create 3000, create-from-source 4000, attach 2000, detach 2000,
    /// extend 3000, snapshot 3000, replicate 5000) or `spread` (every kind 2000..8000).
    /// Comma-separated or repeated; later items win. Default: instant.
    #[arg(
        long,
        env = "LUNANODE_SIM_TRANSITION_MS",
        value_delimiter = ',',
        value_name = "SPEC"
    )]
    pub transition_ms: Vec<TransitionItem>,
    /// Probability (0 to 1) that a request fails with an injected fault.
    #[arg(long, env = "LUNANODE_SIM_FAULT_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub fault_rate: f64,
    /// How long an injected timeout holds a request, in ms.
    #[arg(long, env = "LUNANODE_SIM_FAULT_TIMEOUT_MS", default_value_t = 5000)]
    pub fault_timeout_ms: u64,
    /// Seed for credentials, IDs and faults (default: random).
    #[arg(long, env = "LUNANODE_SIM_SEED")]
    pub seed: Option<u64>,
    /// Refuse `volume/delete` while the volume has snapshots.
    #[arg(long, env = "LUNANODE_SIM_REFUSE_DELETE_WITH_SNAPSHOTS")]
    pub refuse_delete_with_snapshots: bool,
    /// Server-side rate limit in requests per second (over it: HTTP 429).
    #[arg(long, env = "LUNANODE_SIM_RATE_LIMIT_QPS", value_parser = parse_qps)]
    pub rate_limit_qps: Option<f64>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a probability between 0 and 1")),
    }
}

fn parse_qps(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(q) if q.is_finite() && q > 0.0 => Ok(q),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

impl SimArgs {
    /// The configuration these arguments describe.
    pub fn config(&self) -> SimConfig {
        let (vms, vm_buses) = if self.vms.is_empty() {
            (SimConfig::default().vms, Vec::new())
        } else {
            self.vms.iter().map(|a| (a.spec.clone(), a.bus)).unzip()
        };
        SimConfig {
            listen: self.listen,
            backing: self.backing,
            state_dir: self.state_dir.clone().unwrap_or_default(),
            by_id_dir: self.by_id_dir.clone().unwrap_or_default(),
            vms,
            vm_buses,
            auto_bus: self.auto_bus,
            quirks: self.quirks,
            latency: Duration::from_millis(self.latency_ms),
            transition: Transitions::from_items(&self.transition_ms),
            fault_rate: self.fault_rate,
            seed: self.seed.unwrap_or_else(|| fastrand::u64(..)),
            refuse_delete_with_snapshots: self.refuse_delete_with_snapshots,
            rate_limit_qps: self.rate_limit_qps,
        }
    }
}

/// The line `sim` prints on start.
pub fn startup_line(h: &SimHandle) -> String {
    serde_json::json!({
        "url": h.url,
        "api_id": h.api_id,
        "api_key": h.api_key,
        "backing": h.backing,
        "quirks": h.quirks().to_string(),
        "vms": h.vms,
        "by_id_dir": h.by_id_dir,
        "state_dir": h.state_dir,
    })
    .to_string()
}

/// Run `lunanode-csi sim` until SIGTERM.
pub async fn run(args: SimArgs) -> Result<(), SimError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| SimError::Other(format!("cannot watch SIGTERM: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| SimError::Other(format!("cannot watch SIGINT: {e}")))?;
    let handle = SimHandle::start(args.config()).await?;
    handle.set_fault_timeout(Duration::from_millis(args.fault_timeout_ms));
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", startup_line(&handle));
        let _ = out.flush();
    }
    tokio::select! {
        _ = term.recv() => tracing::info!("sim: SIGTERM, stopping"),
        _ = int.recv() => tracing::info!("sim: SIGINT, stopping"),
    }
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_specs_parse() {
        let v: VmSpec = "toronto".parse().unwrap();
        assert_eq!((v.region.as_str(), v.name), ("toronto", None));
        let v: VmSpec = "roubaix:node-1".parse().unwrap();
        assert_eq!(v.name.as_deref(), Some("node-1"));
        assert!("paris".parse::<VmSpec>().is_err());
        assert!("toronto:".parse::<VmSpec>().is_err());
        assert!("toronto:a:ide".parse::<VmSpec>().is_err());
    }

    #[test]
    fn vm_args_take_a_bus() {
        let a: VmArg = "toronto".parse().unwrap();
        assert_eq!(
            (a.spec.region.as_str(), a.spec.name, a.bus),
            ("toronto", None, None)
        );
        let a: VmArg = "montreal:n1".parse().unwrap();
        assert_eq!((a.spec.name.as_deref(), a.bus), (Some("n1"), None));
        let a: VmArg = "montreal:n1:virtio".parse().unwrap();
        assert_eq!(
            (a.spec.name.as_deref(), a.bus),
            (Some("n1"), Some(Bus::Virtio))
        );
        let a: VmArg = "roubaix::IDE".parse().unwrap();
        assert_eq!((a.spec.name, a.bus), (None, Some(Bus::Ide)));
        let a: VmArg = "roubaix:x:scsi".parse().unwrap();
        assert_eq!(a.bus, Some(Bus::Scsi));
        for bad in [
            "mars:a:ide",
            "toronto:a:floppy",
            "toronto:",
            "toronto::",
            "toronto:a:",
        ] {
            assert!(bad.parse::<VmArg>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn vms_get_their_bus() {
        let h = SimHandle::start(SimConfig {
            vms: ["toronto", "toronto", "montreal", "roubaix"]
                .map(|r| VmSpec {
                    region: r.into(),
                    name: None,
                })
                .to_vec(),
            vm_buses: vec![None, Some(Bus::Virtio), Some(Bus::Scsi)],
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let buses: Vec<Bus> = h.vms.iter().map(|v| v.bus).collect();
        assert_eq!(buses, [Bus::Ide, Bus::Virtio, Bus::Scsi, Bus::Ide]);
        assert_eq!(h.state().vms[1].bus, Bus::Virtio);
        assert_eq!(h.add_vm("toronto", None).unwrap().bus, Bus::Ide);
        assert_eq!(
            h.add_vm_on("toronto", None, Bus::Virtio).unwrap().bus,
            Bus::Virtio
        );
        h.set_quirks(Quirks::NONE);
        assert_eq!(h.quirks(), Quirks::NONE);
        assert_eq!(h.add_vm("toronto", None).unwrap().bus, Bus::Virtio);
        let line: serde_json::Value = serde_json::from_str(&startup_line(&h)).unwrap();
        assert_eq!(line["quirks"], "none");
        assert_eq!(line["vms"][0]["bus"], "ide");
        h.shutdown().await;

        let cfg = SimConfig {
            auto_bus: Some(Bus::Virtio),
            ..SimConfig::default()
        };
        assert_eq!(cfg.default_bus(), Bus::Virtio);
        let h = SimHandle::start(cfg).await.unwrap();
        assert_eq!(h.vms[0].bus, Bus::Virtio);
        h.shutdown().await;
        let cfg = SimConfig {
            quirks: Quirks::NONE,
            ..SimConfig::default()
        };
        assert_eq!(cfg.default_bus(), Bus::Virtio);
        assert_eq!(SimConfig::default().default_bus(), Bus::Ide);
    }

    #[test]
    fn args_parse_with_defaults() {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            a: SimArgs,
        }
        use clap::Parser;
        let t = T::try_parse_from(["x", "--vm", "montreal:a", "--vm", "toronto", "--seed", "5"])
            .unwrap();
        let c = t.a.config();
        assert_eq!(c.vms.len(), 2);
        assert_eq!(c.seed, 5);
        assert_eq!(c.backing, Backing::Memory);
        assert!(c.state_dir.as_os_str().is_empty());
        let t = T::try_parse_from([
            "x",
            "--fault-rate",
            "0.2",
            "--backing",
            "loop",
            "--refuse-delete-with-snapshots",
            "--rate-limit-qps",
            "3",
        ])
        .unwrap();
        let c = t.a.config();
        assert_eq!(c.vms, SimConfig::default().vms);
        assert_eq!(
            (
                c.fault_rate,
                c.backing,
                c.refuse_delete_with_snapshots,
                c.rate_limit_qps
            ),
            (0.2, Backing::Loop, true, Some(3.0))
        );
        assert!(T::try_parse_from(["x", "--fault-rate", "2"]).is_err());
        assert!(T::try_parse_from(["x", "--vm", "mars"]).is_err());
        assert!(T::try_parse_from(["x", "--rate-limit-qps", "0"]).is_err());
    }

    #[test]
    fn args_parse_quirks_and_buses() {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            a: SimArgs,
        }
        use clap::Parser;
        let c = T::try_parse_from(["x"]).unwrap().a.config();
        assert_eq!(c.quirks, Quirks::LIKELY);
        assert_eq!((c.auto_bus, c.vm_buses.clone()), (None, vec![]));
        assert_eq!(c.default_bus(), Bus::Ide);
        let c = T::try_parse_from([
            "x",
            "--quirks",
            "none,object-lists,old-rules",
            "--auto-bus",
            "virtio",
            "--vm",
            "toronto:a:ide",
            "--vm",
            "montreal:b",
            "--vm",
            "roubaix::scsi",
        ])
        .unwrap()
        .a
        .config();
        assert_eq!(
            c.quirks,
            Quirks {
                old_rules: true,
                object_lists: true,
                ..Quirks::NONE
            }
        );
        assert_eq!(c.auto_bus, Some(Bus::Virtio));
        assert_eq!(c.vms.len(), 3);
        assert_eq!(c.vms[1].name.as_deref(), Some("b"));
        assert_eq!(c.vm_buses, [Some(Bus::Ide), None, Some(Bus::Scsi)]);
        let c = T::try_parse_from(["x", "--vm", "toronto:a:virtio,montreal"])
            .unwrap()
            .a
            .config();
        assert_eq!(c.vm_buses, [Some(Bus::Virtio), None]);
        assert!(T::try_parse_from(["x", "--quirks", "floppy"]).is_err());
        assert!(T::try_parse_from(["x", "--auto-bus", "floppy"]).is_err());
        assert!(T::try_parse_from(["x", "--vm", "toronto:a:floppy"]).is_err());
    }

    #[test]
    fn backing_serializes_lowercase() {
        assert_eq!(serde_json::to_string(&Backing::Loop).unwrap(), "\"loop\"");
    }

    #[tokio::test]
    async fn start_reports_bound_address_and_cleans_up() {
        let h = SimHandle::start(SimConfig::default()).await.unwrap();
        assert!(h.url.starts_with("http://127.0.0.1:") && h.url.ends_with("/api/"));
        assert_ne!(h.addr().port(), 0);
        assert_eq!((h.api_id.len(), h.api_key.len()), (16, 128));
        assert_eq!(h.vms.len(), 1);
        assert!(h.by_id_dir.is_dir());
        let dir = h.state_dir().to_path_buf();
        let line: serde_json::Value = serde_json::from_str(&startup_line(&h)).unwrap();
        assert_eq!(line["backing"], "memory");
        assert_eq!(line["vms"][0]["region"], "toronto");
        h.shutdown().await;
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn same_seed_same_credentials() {
        let a = SimHandle::start(SimConfig::default()).await.unwrap();
        let b = SimHandle::start(SimConfig::default()).await.unwrap();
        assert_eq!(a.api_key, b.api_key);
        assert_eq!(a.vms, b.vms);
        let c = SimHandle::start(SimConfig {
            seed: 2,
            ..SimConfig::default()
        })
        .await
        .unwrap();
        assert_ne!(a.api_key, c.api_key);
        // Public fields can be moved out (the handle has no Drop of its own); the rest is
        // cleaned up when dropped.
        let url = a.url;
        assert!(url.ends_with("/api/"));
        b.shutdown().await;
        c.shutdown().await;
    }

    /// Every message the simulator can answer with classifies to the kind the driver expects.
    #[test]
    fn fixed_messages_classify() {
        use crate::lunanode::ApiError;
        let c = |m: &str| ApiError::from_cloud_message("volume/x", m);
        assert!(matches!(c(AUTH_ERROR), ApiError::Signature { .. }));
        assert!(matches!(c(RATE_LIMIT_ERROR), ApiError::Throttled { .. }));
        assert!(matches!(c(TRANSIENT_ERROR), ApiError::Transient { .. }));
        assert!(matches!(
            c("internal error: storage backend failed: cp failed: volume 3 not found"),
            ApiError::Transient { .. }
        ));
        assert!(matches!(
            c("region not set"),
            ApiError::InvalidArgument { .. }
        ));
        assert!(matches!(
            c("missing parameter volume_id"),
            ApiError::InvalidArgument { .. }
        ));
        assert!(matches!(
            c("missing parameter image_name"),
            ApiError::InvalidArgument { .. }
        ));
        assert!(matches!(
            c("invalid request: req is not a JSON object"),
            ApiError::InvalidArgument { .. }
        ));
        assert!(matches!(c("unknown action"), ApiError::Other { .. }));
    }
}
