//! Shared pieces of the reliability tests (soak, crash, bad input, secrets, edges): a
//! sidecar-like retry loop with exponential backoff, the driver's services (Identity,
//! Controller and Node) on one unix socket in this process, and small request builders.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lunanode_csi::csi::controller_client::ControllerClient;
use lunanode_csi::csi::node_client::NodeClient;
use lunanode_csi::csi::volume_capability::{
    AccessMode, AccessType, MountVolume, access_mode::Mode,
};
use lunanode_csi::csi::*;
use lunanode_csi::driver::{ControllerConfig, NodeConfig};
use lunanode_csi::lunanode::Client;
use lunanode_csi::sim::{SimHandle, SimState};
use tonic::transport::Channel;
use tonic::{Code, Status};

pub const GIB: i64 = 1 << 30;

/// Codes the CSI sidecars (and kubelet) retry. They retry everything, in fact; INTERNAL is
/// retried here too but counted, because the driver should not need it.
pub fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Internal
    )
}

/// What the retry loops saw: failed attempts per code, and the INTERNAL messages.
#[derive(Debug, Default)]
pub struct RetryStats {
    pub calls: AtomicU64,
    pub retries: AtomicU64,
    pub by_code: Mutex<BTreeMap<String, u64>>,
    pub internals: Mutex<Vec<String>>,
}

impl RetryStats {
    fn record(&self, what: &str, s: &Status) {
        *self
            .by_code
            .lock()
            .unwrap()
            .entry(format!("{:?}", s.code()))
            .or_insert(0) += 1;
        if s.code() == Code::Internal {
            self.internals
                .lock()
                .unwrap()
                .push(format!("{what}: {}", s.message()));
        }
    }

    pub fn internal_count(&self) -> usize {
        self.internals.lock().unwrap().len()
    }

    pub fn summary(&self) -> String {
        format!(
            "{} calls, {} retried attempts, failures by code {:?}",
            self.calls.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
            self.by_code.lock().unwrap()
        )
    }
}

/// Call `f` until it succeeds or fails with a non-retryable code, backing off exponentially
/// (10 ms doubling to 400 ms, with jitter) like the sidecars, for at most `budget`.
pub async fn retry<T, F, Fut>(
    stats: &RetryStats,
    what: &str,
    budget: Duration,
    mut f: F,
) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    stats.calls.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let mut delay = Duration::from_millis(10);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(s) if retryable(s.code()) && start.elapsed() < budget => {
                stats.record(what, &s);
                stats.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64() * 0.5)).await;
                delay = (delay * 2).min(Duration::from_millis(400));
            }
            Err(s) => {
                stats.record(what, &s);
                return Err(s);
            }
        }
    }
}

/// A request with a gRPC deadline, as the sidecars send them.
pub fn req<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// Identity, Controller and (optionally) Node services of the driver on one unix socket in
/// this process, talking to `sim`.
pub struct Driver {
    pub socket: PathBuf,
    served: crate::common::Served,
}

impl Driver {
    pub async fn start(
        dir: &Path,
        client: Client,
        ccfg: ControllerConfig,
        node: Option<NodeConfig>,
    ) -> Driver {
        let served =
            crate::common::Served::start(dir.join("csi/csi.sock"), Some((client, ccfg)), node);
        Driver {
            socket: served.socket.clone(),
            served,
        }
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(crate::common::channel(&self.socket).await)
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(crate::common::channel(&self.socket).await)
    }

    pub async fn stop(mut self) {
        self.served.stop().await;
    }
}

pub fn mount_cap(fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}

pub fn create_req(name: &str, gib: i64, region: Option<&str>) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: gib * GIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap("ext4")],
        parameters: region
            .map(|r| HashMap::from([("region".to_string(), r.to_string())]))
            .unwrap_or_default(),
        ..Default::default()
    }
}

pub fn from_snapshot(mut r: CreateVolumeRequest, snapshot_id: &str) -> CreateVolumeRequest {
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.into(),
            },
        )),
    });
    r
}

/// Everything the cloud holds apart from the call counters, for before/after comparisons.
pub fn objects(s: &SimState) -> String {
    format!(
        "volumes={:?}\nsnapshots={:?}\nimages={:?}\nvms={:?}",
        s.volumes, s.snapshots, s.images, s.vms
    )
}

/// Labels carried by more than one volume right now.
pub fn duplicate_labels(sim: &SimHandle) -> Vec<String> {
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for v in sim.state().volumes {
        *seen.entry(v.label).or_insert(0) += 1;
    }
    seen.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(l, _)| l)
        .collect()
}

/// Lazily detach whatever is still mounted under `root` (test cleanup only; the driver
/// itself never unmounts lazily).
pub fn unmount_all_under(root: &Path) {
    let root = std::fs::canonicalize(root).unwrap_or(root.into());
    for _ in 0..10 {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mine: Vec<PathBuf> = lunanode_csi::volumes::mount::parse_mountinfo(&text)
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&root))
            .collect();
        if mine.is_empty() {
            return;
        }
        mine.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in mine {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Root with loop devices, mkfs.ext4 and blkid: the node half of the tests can run.
pub fn node_capable() -> bool {
    lunanode_csi::sim::loop_available()
        && std::process::Command::new("mkfs.ext4")
            .arg("-V")
            .output()
            .is_ok()
}

/// Deterministic file content for a lifecycle.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

pub const BIN: &str = env!("CARGO_BIN_EXE_lunanode-csi");

/// The real binary serving all services against `sim`, in its own process group (so a
/// SIGKILL of the group also kills a mkfs it started, as when a container dies).
pub struct BinDriver {
    pub child: std::process::Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl BinDriver {
    /// Start `lunanode-csi serve --mode all` on `socket` with `extra` arguments.
    pub async fn start(sim: &SimHandle, node_id: &str, socket: &Path, extra: &[&str]) -> BinDriver {
        use std::os::unix::process::CommandExt;
        let n = LOG_SEQ.fetch_add(1, Ordering::Relaxed);
        let log = socket.with_file_name(format!("driver-{n}.log"));
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        let logf = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(BIN)
            .args([
                "serve",
                "--mode",
                "all",
                "--endpoint",
                &format!("unix://{}", socket.display()),
                "--api-url",
                &sim.url,
                "--qps",
                "0",
                "--api-timeout-secs",
                "5",
                "--node-id",
                node_id,
                "--region",
                "toronto",
                "--by-id-dir",
                sim.by_id_dir.to_str().unwrap(),
                "--device-wait-secs",
                "10",
                "--shutdown-grace-secs",
                "20",
            ])
            .args(extra)
            .env("LUNANODE_API_ID", &sim.api_id)
            .env("LUNANODE_API_KEY", &sim.api_key)
            .env_remove("RUST_LOG")
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .process_group(0)
            .spawn()
            .expect("start lunanode-csi");
        let mut d = BinDriver {
            child,
            socket: socket.to_path_buf(),
            log,
        };
        d.wait_ready().await;
        d
    }

    async fn wait_ready(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "driver exited early ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("driver socket {} never appeared", self.socket.display());
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(crate::common::channel(&self.socket).await)
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(crate::common::channel(&self.socket).await)
    }

    /// SIGKILL the whole process group and reap the driver.
    pub fn kill(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM the driver and wait (at most `limit`) for it to exit.
    pub async fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BinDriver {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}

static LOG_SEQ: AtomicU64 = AtomicU64::new(0);

/// Wait until `cond` holds on the simulator's state (polled every 2 ms), at most `limit`.
pub async fn until_state(sim: &SimHandle, limit: Duration, cond: impl Fn(&SimState) -> bool) {
    let start = Instant::now();
    while !cond(&sim.state()) {
        assert!(
            start.elapsed() < limit,
            "the simulator never reached the awaited state: {}",
            objects(&sim.state())
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
