//! The driver benchmark: `cargo bench --bench driver -- [--quick] [--runs N] [--out PATH]`.
//!
//! The driver runs as its own process (the release binary, `serve --mode controller` on a
//! unix socket) against the simulator (in this process, memory backing, set latency), and
//! is driven through gRPC. See docs/benchmarks.md for what each figure means.
//!
//! Without `--bench` (as under `cargo test --benches`) it runs a tiny smoke version and
//! checks that it wrote valid JSON; it never asserts on timings.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hyper_util::rt::TokioIo;
use lunanode_csi::csi::controller_client::ControllerClient;
use lunanode_csi::csi::identity_client::IdentityClient;
use lunanode_csi::csi::node_client::NodeClient;
use lunanode_csi::csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode};
use lunanode_csi::csi::*;
use lunanode_csi::lunanode::{Client, ClientConfig, Credentials};
use lunanode_csi::sim::{Backing, SimConfig, SimHandle, VmSpec};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint, Uri};

#[path = "driver/waits.rs"]
mod waits;

const BIN: &str = env!("CARGO_BIN_EXE_lunanode-csi");

/// The driver binary to measure, chosen once in `main`.
static DRIVER_BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn driver_bin() -> String {
    DRIVER_BIN.get().expect("chosen in main").clone()
}

/// `LUNANODE_CSI_BENCH_BIN` (a static build, another commit's…) or else the binary as
/// shipped. The one `cargo bench` builds is not that: cargo unifies dev-dependency
/// features into it (tokio's multi-thread scheduler, which the tests use), so its size and
/// memory are not the release binary's. A full run therefore
/// builds `cargo build --release` into its own target directory (once; later runs are
/// incremental) and measures that. Smoke and `--quick` runs, whose figures mean nothing,
/// skip that build and use the binary cargo built.
fn pick_driver_bin(figures_matter: bool) -> String {
    if let Ok(bin) = std::env::var("LUNANODE_CSI_BENCH_BIN") {
        return bin;
    }
    if !figures_matter {
        return BIN.to_string();
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("target"))
        .join("shipped");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!(
        "building the shipped binary (`cargo build --release`, no dev-dependency features) into {}",
        target.display()
    );
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--bin",
            "lunanode-csi",
            "--manifest-path",
        ])
        .arg(manifest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --release failed");
    target
        .join("release/lunanode-csi")
        .to_string_lossy()
        .into_owned()
}

#[derive(Debug, Clone, Parser)]
#[command(about = "Benchmark the lunanode-csi driver against the simulator")]
struct Args {
    /// Passed by `cargo bench`; without it a tiny smoke run is made.
    #[arg(long, hide = true)]
    bench: bool,
    /// A fast smoke check with small counts (figures are not meaningful).
    #[arg(long)]
    quick: bool,
    /// Runs of each phase; figures are medians over runs.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Simulated API latency for every phase, in ms.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Lifecycles at concurrency 1 for the driver-added latency and API calls per RPC
    /// (100: each RPC's p99 is then its second-worst sample, not its single worst).
    #[arg(long, default_value_t = 100)]
    serial_lifecycles: usize,
    /// Lifecycles for the throughput phase.
    #[arg(long, default_value_t = 256)]
    lifecycles: usize,
    /// Concurrency of the throughput phase.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Client rate limit of the driver in the phases above (0: off), and its burst.
    #[arg(long, default_value_t = 0.0)]
    qps: f64,
    #[arg(long, default_value_t = 20)]
    burst: u32,
    /// Existing volumes for the scale phase, and concurrent CreateVolume calls.
    #[arg(long, default_value_t = 1000)]
    scale_volumes: usize,
    #[arg(long, default_value_t = 100)]
    scale_creates: usize,
    /// The target scenario: lifecycles, concurrency, client QPS limit (run once).
    #[arg(long, default_value_t = 500)]
    target_lifecycles: usize,
    #[arg(long, default_value_t = 100)]
    target_concurrency: usize,
    #[arg(long, default_value_t = 50.0)]
    target_qps: f64,
    /// NodeStageVolume samples per run (root with loop devices only), and the volume size.
    #[arg(long, default_value_t = 5)]
    stage_samples: usize,
    #[arg(long, default_value_t = 10)]
    stage_size_gb: u64,
    /// Waits phase: waits of each kind measured per (cloud, schedule, concurrency), after
    /// this many warm-up waits.
    #[arg(long, default_value_t = 200)]
    wait_count: usize,
    #[arg(long, default_value_t = 20)]
    wait_warmup: usize,
    /// Waits phase: every time (transitions, API latency, the driver's schedules) times this.
    #[arg(long, default_value_t = 0.1)]
    wait_scale: f64,
    /// Waits phase: concurrencies (waits of each kind in flight).
    #[arg(long, value_delimiter = ',', default_value = "1,50")]
    wait_concurrency: Vec<usize>,
    /// Waits phase: the learned rigs' poll cost (default: the driver's default).
    #[arg(long)]
    wait_poll_cost: Option<f64>,
    /// Waits phase: the learned rigs' call budget (default: the driver's default).
    #[arg(long)]
    wait_call_budget: Option<f64>,
    /// Waits phase: the call budgets of the spread cloud's overshoot/calls curve (`inf`:
    /// uncapped, the poll cost alone).
    #[arg(long, value_delimiter = ',', default_value = "0.6,0.8,1.25,1.5,inf")]
    wait_curve: Vec<f64>,
    /// Waits phase: the clouds (steady, spread).
    #[arg(long, value_delimiter = ',', default_value = "steady,spread")]
    wait_clouds: Vec<String>,
    /// Waits phase: also run learned rigs that do not share volume/list between waiting
    /// volumes, to show what sharing saves.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    wait_share_experiment: bool,
    /// Skip phases: any of serial, throughput, scale, target, stage, waits.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Where the JSON goes (default: target/bench/driver.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

impl Args {
    fn quick(mut self) -> Self {
        self.runs = 1;
        self.latency_ms = self.latency_ms.min(5);
        self.serial_lifecycles = 3;
        self.lifecycles = 16;
        self.concurrency = 4;
        self.scale_volumes = 100;
        self.scale_creates = 20;
        self.target_lifecycles = 20;
        self.target_concurrency = 10;
        self.stage_samples = 1;
        self.stage_size_gb = 1;
        self.wait_count = 10;
        self.wait_warmup = 5;
        self.wait_scale = self.wait_scale.min(0.02);
        self.wait_concurrency = vec![1, 4];
        self.wait_curve = vec![0.6];
        self.wait_share_experiment = false;
        self
    }

    fn runs(&self, phase: &str) -> bool {
        !self.skip.iter().any(|s| s == phase)
    }
}

// ---- measuring helpers ---------------------------------------------------------------

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    percentile(&s, 50.0)
}

fn p50_p99(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (percentile(&s, 50.0), percentile(&s, 99.0))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rss_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU time of a process (all its threads), in ms: the scheduler's exact run time from
/// `/proc/<pid>/task/*/schedstat`, else user plus system time from `/proc/<pid>/stat`
/// (counted in 10 ms ticks by sampling, which is coarse for a process that runs in
/// bursts of a few hundred microseconds).
fn cpu_ms(pid: u32) -> f64 {
    let exact = std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()
        .and_then(|tasks| {
            tasks
                .map(|t| {
                    let t = t.ok()?;
                    let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
                    s.split_whitespace().next()?.parse::<f64>().ok()
                })
                .sum::<Option<f64>>()
        });
    if let Some(ns) = exact {
        return ns / 1e6;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let f = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (f(14) + f(15)) * 10.0
}

fn total_calls(calls: &BTreeMap<String, u64>) -> u64 {
    calls.values().sum()
}

fn diff(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Samples a process's resident memory every 2 ms on its own thread and keeps the highest
/// private (anonymous) and file-backed parts, which `VmHWM` (the kernel's peak) does not split.
struct MemSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64, usize)>,
}

impl MemSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut anon, mut file, mut fds) = (0, 0, 0);
            // Sample at least once, so a run that skips every phase still reports the
            // driver as it is rather than zeros.
            loop {
                anon = anon.max(rss_kib(pid, "RssAnon").unwrap_or(0));
                file = file.max(rss_kib(pid, "RssFile").unwrap_or(0));
                let open = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
                fds = fds.max(open);
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (anon, file, fds)
        });
        MemSampler { stop, thread }
    }

    /// The highest private and file-backed resident KiB, and open file descriptors, seen.
    fn finish(self) -> (u64, u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

// ---- the processes -------------------------------------------------------------------

/// The simulator allows 15 volumes per VM (as the cloud does), so concurrent lifecycles are
/// spread over enough VMs that no worker is refused an attachment.
const VOLUMES_PER_VM: usize = 15;

fn vms_for(concurrency: usize) -> usize {
    concurrency.div_ceil(VOLUMES_PER_VM).max(1)
}

async fn start_sim(latency: Duration, backing: Backing, vms: usize) -> SimHandle {
    SimHandle::start(SimConfig {
        backing,
        latency,
        vms: (0..vms)
            .map(|i| VmSpec {
                region: "toronto".into(),
                name: Some(format!("bench-node-{i}")),
            })
            .collect(),
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts")
}

fn vm_ids(sim: &SimHandle) -> Vec<String> {
    sim.vms.iter().map(|vm| vm.id.clone()).collect()
}

/// The driver process and its gRPC channel.
struct Driver {
    child: Child,
    channel: Channel,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

async fn channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect to the driver socket")
}

impl Driver {
    /// `serve` as its own process; `extra` are more flags.
    async fn start(sim: &SimHandle, mode: &str, extra: &[String]) -> Driver {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("csi.sock");
        let mut cmd = Command::new(driver_bin());
        cmd.args([
            "serve",
            "--mode",
            mode,
            "--endpoint",
            &format!("unix://{}", sock.display()),
            "--api-url",
            &sim.url,
            "--log-level",
            &std::env::var("LUNANODE_CSI_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        ])
        .args(extra)
        .env_remove("RUST_LOG")
        .env("LUNANODE_API_ID", &sim.api_id)
        .env("LUNANODE_API_KEY", &sim.api_key)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("start the driver");
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Some(s) = child.try_wait().unwrap() {
                panic!("driver exited: {s}");
            }
            assert!(start.elapsed() < Duration::from_secs(30), "no socket");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let channel = channel(&sock).await;
        IdentityClient::new(channel.clone())
            .probe(ProbeRequest {})
            .await
            .expect("probe");
        Driver {
            child,
            channel,
            sock,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.pid(), "VmRSS").unwrap_or(0)
    }

    fn peak_kib(&self) -> u64 {
        rss_kib(self.pid(), "VmHWM").unwrap_or(0)
    }

    async fn stop(mut self) {
        drop(self.channel);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn controller_flags(qps: f64, burst: u32) -> Vec<String> {
    vec![
        "--qps".into(),
        qps.to_string(),
        "--burst".into(),
        burst.to_string(),
    ]
}

// ---- the lifecycle -------------------------------------------------------------------

const GIB: i64 = 1 << 30;

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
    }
}

const RPCS: &[&str] = &[
    "CreateVolume",
    "ControllerPublishVolume",
    "ControllerUnpublishVolume",
    "CreateSnapshot",
    "DeleteSnapshot",
    "DeleteVolume",
];

/// The fewest Luna Node API calls each RPC needs with instant transitions, and why.
const MINIMUM_CALLS: &[(&str, u64, &str)] = &[
    (
        "CreateVolume",
        3,
        "volume/list (idempotency: the API cannot look a label up) + volume/create + volume/info (create returns only the ID; the volume must be available)",
    ),
    (
        "ControllerPublishVolume",
        3,
        "volume/info (exists, region, current attachment) + volume/attach + volume/info (attached; the serial for the node); +1 vm/info the first time per VM (cached)",
    ),
    (
        "ControllerUnpublishVolume",
        3,
        "volume/info (attached to this node? idempotency) + volume/detach + volume/info (detached, so the next attach elsewhere works)",
    ),
    (
        "CreateSnapshot",
        4,
        "snapshot-list (idempotency by name) + volume/info (the source exists in the ID's region) + snapshot-create + snapshot-list (status and size: create returns only the UUID)",
    ),
    (
        "DeleteSnapshot",
        1,
        "snapshot-delete (not found counts as deleted)",
    ),
    (
        "DeleteVolume",
        2,
        "volume/info (exists in the ID's region, not attached) + volume/delete",
    ),
];

/// One timed RPC: its name, duration and outcome.
struct Sample {
    rpc: &'static str,
    took: Duration,
    ok: bool,
}

/// Runs lifecycles against one driver. With `observe`, each RPC is also measured against
/// the simulator's counters (only meaningful at concurrency 1).
struct Lifecycle {
    ctl: ControllerClient<Channel>,
    node_id: String,
    snapshots: bool,
}

/// What an RPC cost in the cloud: calls by action and time spent answering them, whole
/// (from each request read to its reply written) and in the API handler alone.
struct Cost {
    calls: BTreeMap<String, u64>,
    served: Duration,
    handler: Duration,
}

impl Lifecycle {
    async fn run(
        &mut self,
        name: &str,
        sim: Option<&SimHandle>,
        out: &mut Vec<(Sample, Option<Cost>)>,
    ) {
        macro_rules! timed {
            ($rpc:expr, $call:expr) => {{
                let before = sim.map(|s| (s.calls(), s.served_time(), s.api_time()));
                let t = Instant::now();
                let r = $call.await;
                let took = t.elapsed();
                let cost = sim.zip(before).map(|(s, (calls, served, handler))| Cost {
                    calls: diff(&s.calls(), &calls),
                    served: s.served_time() - served,
                    handler: s.api_time() - handler,
                });
                if let Err(e) = &r {
                    eprintln!("{} failed: {e}", $rpc);
                }
                out.push((
                    Sample {
                        rpc: $rpc,
                        took,
                        ok: r.is_ok(),
                    },
                    cost,
                ));
                r.ok().map(|r| r.into_inner())
            }};
        }
        let ctl = &mut self.ctl;
        let Some(created) = timed!(
            "CreateVolume",
            ctl.create_volume(CreateVolumeRequest {
                name: name.to_string(),
                capacity_range: Some(CapacityRange {
                    required_bytes: GIB,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![mount_cap()],
                ..Default::default()
            })
        ) else {
            return;
        };
        let volume_id = created.volume.unwrap().volume_id;
        timed!(
            "ControllerPublishVolume",
            ctl.controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: volume_id.clone(),
                node_id: self.node_id.clone(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
        );
        timed!(
            "ControllerUnpublishVolume",
            ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                node_id: self.node_id.clone(),
                ..Default::default()
            })
        );
        if self.snapshots {
            let snap = timed!(
                "CreateSnapshot",
                ctl.create_snapshot(CreateSnapshotRequest {
                    source_volume_id: volume_id.clone(),
                    name: format!("snap-{name}"),
                    ..Default::default()
                })
            );
            if let Some(snap) = snap.and_then(|s| s.snapshot) {
                timed!(
                    "DeleteSnapshot",
                    ctl.delete_snapshot(DeleteSnapshotRequest {
                        snapshot_id: snap.snapshot_id,
                        ..Default::default()
                    })
                );
            }
        }
        timed!(
            "DeleteVolume",
            ctl.delete_volume(DeleteVolumeRequest {
                volume_id,
                ..Default::default()
            })
        );
    }
}

/// `n` lifecycles by `concurrency` workers, worker `w` publishing to `node_ids[w % len]`;
/// returns the samples and the wall time.
async fn run_lifecycles(
    driver: &Driver,
    node_ids: &[String],
    prefix: &str,
    n: usize,
    concurrency: usize,
    snapshots: bool,
) -> (Vec<Sample>, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency.min(n).max(1) {
        let next = next.clone();
        let mut lc = Lifecycle {
            ctl: ControllerClient::new(driver.channel.clone()),
            node_id: node_ids[w % node_ids.len()].clone(),
            snapshots,
        };
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                lc.run(&format!("{prefix}-{i}"), None, &mut out).await;
            }
            out
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.unwrap().into_iter().map(|(s, _)| s));
    }
    (samples, started.elapsed())
}

fn per_rpc(samples: &[Sample]) -> BTreeMap<&'static str, Vec<f64>> {
    let mut m: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for s in samples {
        m.entry(s.rpc).or_default().push(ms(s.took));
    }
    m
}

// ---- phases --------------------------------------------------------------------------

/// Concurrency 1: per RPC, its time, the API calls on its path, and what the driver adds.
///
/// The measuring client runs on its own thread with a single-threaded runtime (as the driver
/// does), so that its gRPC and HTTP work is not spread over the worker threads the
/// simulator uses: on a shared multi-thread runtime a request's frames can leave in two
/// writes a thread hop apart, and that time would be charged to the driver.
async fn phase_serial(args: &Args, sim: &SimHandle, driver: &Driver, run: usize) -> Value {
    let (sock, pid) = (driver.sock.clone(), driver.pid());
    tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(serial(args, sim, &sock, pid, run))
            })
            .join()
            .unwrap()
        })
    })
}

async fn serial(args: &Args, sim: &SimHandle, sock: &Path, pid: u32, run: usize) -> Value {
    let latency = Duration::from_millis(args.latency_ms);
    let channel = channel(sock).await;
    let mut lc = Lifecycle {
        ctl: ControllerClient::new(channel),
        node_id: sim.vms[0].id.clone(),
        snapshots: true,
    };
    // The floor any client pays per API call: a bare request from this process (same client
    // code, same HTTP stack) minus the simulator's own time answering it.
    let client = api_client(sim);
    let (mut floor, mut floor_handler) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let (served, handler) = (sim.served_time(), sim.api_time());
        let t = Instant::now();
        client.vm_info(&sim.vms[0].id).await.expect("vm/info");
        let took = ms(t.elapsed());
        floor.push(took - ms(sim.served_time() - served));
        floor_handler.push(took - ms(sim.api_time() - handler));
    }
    // The floor of an RPC: one that makes no API call (the gRPC round trip through the
    // driver's logging and dispatch).
    let mut rpc_floor = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        lc.ctl
            .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
            .await
            .expect("ControllerGetCapabilities");
        rpc_floor.push(ms(t.elapsed()));
    }
    let mut out = Vec::new();
    let cpu_before = cpu_ms(pid);
    for i in 0..args.serial_lifecycles {
        lc.run(&format!("serial-{run}-{i}"), Some(sim), &mut out)
            .await;
    }
    let driver_cpu_ms = cpu_ms(pid) - cpu_before;
    let api_calls: u64 = out
        .iter()
        .filter_map(|(_, c)| c.as_ref().map(|c| total_calls(&c.calls)))
        .sum();
    let mut by_rpc: BTreeMap<&str, Value> = BTreeMap::new();
    for rpc in RPCS {
        let rows: Vec<&(Sample, Option<Cost>)> =
            out.iter().filter(|(s, _)| s.rpc == *rpc && s.ok).collect();
        let took: Vec<f64> = rows.iter().map(|(s, _)| ms(s.took)).collect();
        let calls: Vec<u64> = rows
            .iter()
            .map(|(_, c)| total_calls(&c.as_ref().unwrap().calls))
            .collect();
        let nominal: Vec<f64> = rows
            .iter()
            .map(|(s, c)| ms(s.took) - total_calls(&c.as_ref().unwrap().calls) as f64 * ms(latency))
            .collect();
        let measured: Vec<f64> = rows
            .iter()
            .map(|(s, c)| ms(s.took) - ms(c.as_ref().unwrap().served))
            .collect();
        // The same against the handler's time alone (the simulator's HTTP parsing and
        // writing then count as added).
        let handler: Vec<f64> = rows
            .iter()
            .map(|(s, c)| ms(s.took) - ms(c.as_ref().unwrap().handler))
            .collect();
        // The breakdown of the most common number of calls (the steady state).
        let mut counts: HashMap<u64, usize> = HashMap::new();
        for c in &calls {
            *counts.entry(*c).or_default() += 1;
        }
        let typical = counts
            .iter()
            .max_by_key(|(c, n)| (**n, std::cmp::Reverse(**c)))
            .map(|(c, _)| *c)
            .unwrap_or(0);
        let breakdown = rows
            .iter()
            .map(|(_, c)| &c.as_ref().unwrap().calls)
            .find(|c| total_calls(c) == typical)
            .cloned()
            .unwrap_or_default();
        let (t50, t99) = p50_p99(&took);
        let (n50, n99) = p50_p99(&nominal);
        let (m50, m99) = p50_p99(&measured);
        let (h50, h99) = p50_p99(&handler);
        by_rpc.insert(
            rpc,
            json!({
                "samples": rows.len(),
                "rpc_ms": {"p50": t50, "p99": t99},
                "added_ms_nominal": {"p50": n50, "p99": n99},
                "added_ms_measured": {"p50": m50, "p99": m99},
                "added_ms_vs_handler": {"p50": h50, "p99": h99},
                "api_calls": {
                    "typical": typical,
                    "min": calls.iter().min(),
                    "max": calls.iter().max(),
                    "breakdown": breakdown,
                },
            }),
        );
    }
    let (gc50, gc99) = p50_p99(&rpc_floor);
    json!({
        "errors": out.iter().filter(|(s, _)| !s.ok).count(),
        "bare_client_overhead_ms_per_api_call": p50_p99(&floor).0,
        "bare_client_overhead_ms_per_api_call_vs_handler": p50_p99(&floor_handler).0,
        "rpc_without_api_calls_ms": {"p50": gc50, "p99": gc99},
        "driver_cpu_us_per_rpc": driver_cpu_ms * 1000.0 / out.len().max(1) as f64,
        "driver_cpu_us_per_api_call": driver_cpu_ms * 1000.0 / api_calls.max(1) as f64,
        "rpcs": by_rpc,
    })
}

async fn phase_throughput(args: &Args, sim: &SimHandle, driver: &Driver, run: usize) -> Value {
    let (samples, wall) = run_lifecycles(
        driver,
        &vm_ids(sim),
        &format!("tp-{run}"),
        args.lifecycles,
        args.concurrency,
        true,
    )
    .await;
    let errors = samples.iter().filter(|s| !s.ok).count();
    let rpcs: BTreeMap<&str, Value> = per_rpc(&samples)
        .into_iter()
        .map(|(k, v)| {
            let (p50, p99) = p50_p99(&v);
            (k, json!({"p50_ms": p50, "p99_ms": p99}))
        })
        .collect();
    json!({
        "lifecycles": args.lifecycles,
        "concurrency": args.concurrency,
        "wall_s": wall.as_secs_f64(),
        "lifecycles_per_s": args.lifecycles as f64 / wall.as_secs_f64(),
        "errors": errors,
        "rpcs": rpcs,
    })
}

fn api_client(sim: &SimHandle) -> Client {
    let creds = Credentials::new(&sim.api_id, &sim.api_key).unwrap();
    let mut cfg = ClientConfig::new(sim.url.clone(), creds);
    cfg.qps = 0.0;
    Client::new(cfg).unwrap()
}

/// Many existing volumes, many concurrent creates: the idempotency lookups must share
/// `volume/list` calls.
async fn phase_scale(args: &Args, sim: &SimHandle, driver: &Driver, run: usize) -> Value {
    // Fill the cloud quickly, without latency, straight through the API.
    sim.set_latency(Duration::ZERO);
    let client = api_client(sim);
    let next = Arc::new(AtomicUsize::new(0));
    let mut fill = Vec::new();
    for _ in 0..16 {
        let (client, next) = (client.clone(), next.clone());
        let n = args.scale_volumes;
        fill.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                client
                    .volume_create("toronto", &format!("existing-{run}-{i}"), 1, None)
                    .await
                    .expect("fill volume");
            }
        }));
    }
    for f in fill {
        f.await.unwrap();
    }
    sim.set_latency(Duration::from_millis(args.latency_ms));
    sim.reset_counters();
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.scale_creates)
        .map(|i| {
            let mut ctl = ControllerClient::new(driver.channel.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                let r = ctl
                    .create_volume(CreateVolumeRequest {
                        name: format!("scale-{run}-{i}"),
                        capacity_range: Some(CapacityRange {
                            required_bytes: GIB,
                            limit_bytes: 0,
                        }),
                        volume_capabilities: vec![mount_cap()],
                        ..Default::default()
                    })
                    .await;
                if let Err(e) = &r {
                    eprintln!("scale CreateVolume failed: {e}");
                }
                (r.is_ok(), ms(t.elapsed()))
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (ok, took) = t.await.unwrap();
        times.push(took);
        errors += usize::from(!ok);
    }
    let wall = started.elapsed();
    let calls = sim.calls();
    let (p50, p99) = p50_p99(&times);
    json!({
        "existing_volumes": args.scale_volumes,
        "concurrent_creates": args.scale_creates,
        "wall_s": wall.as_secs_f64(),
        "create_ms": {"p50": p50, "p99": p99},
        "volume_list_calls": calls.get("volume/list").copied().unwrap_or(0),
        "api_calls": calls,
        "errors": errors,
    })
}

/// The target: many lifecycles at high concurrency under the client rate limit.
async fn phase_target(args: &Args) -> Value {
    let sim = start_sim(
        Duration::from_millis(args.latency_ms),
        Backing::Memory,
        vms_for(args.target_concurrency),
    )
    .await;
    let burst = args.burst;
    let driver = Driver::start(
        &sim,
        "controller",
        &controller_flags(args.target_qps, burst),
    )
    .await;
    let idle = driver.rss_kib();
    sim.reset_counters();
    let (samples, wall) = run_lifecycles(
        &driver,
        &vm_ids(&sim),
        "target",
        args.target_lifecycles,
        args.target_concurrency,
        false,
    )
    .await;
    let calls = sim.calls();
    let total = total_calls(&calls);
    let forced = total as f64 / args.target_qps;
    let rpcs: BTreeMap<&str, Value> = per_rpc(&samples)
        .into_iter()
        .map(|(k, v)| {
            let (p50, p99) = p50_p99(&v);
            (k, json!({"p50_ms": p50, "p99_ms": p99}))
        })
        .collect();
    let peak = driver.peak_kib();
    driver.stop().await;
    sim.shutdown().await;
    json!({
        "lifecycles": args.target_lifecycles,
        "concurrency": args.target_concurrency,
        "qps": args.target_qps,
        "burst": burst,
        "latency_ms": args.latency_ms,
        "errors": samples.iter().filter(|s| !s.ok).count(),
        "wall_s": wall.as_secs_f64(),
        "api_calls": total,
        "api_calls_per_lifecycle": total as f64 / args.target_lifecycles as f64,
        "api_calls_by_action": calls,
        "rate_limit_floor_s": forced,
        "wall_over_floor": wall.as_secs_f64() / forced,
        "rpcs": rpcs,
        "driver_idle_kib": idle,
        "driver_peak_kib": peak,
    })
}

// ---- NodeStageVolume against mkfs + mount ----------------------------------------------

fn is_root_with_loop() -> bool {
    lunanode_csi::sim::loop_available()
}

/// Create and attach a volume through the API; returns (volume ID, serial, loop device).
async fn attached_volume(
    sim: &SimHandle,
    client: &Client,
    label: &str,
    gb: u64,
) -> (u64, String, PathBuf) {
    let id = client
        .volume_create("toronto", label, gb, None)
        .await
        .unwrap();
    client
        .volume_attach(id, &sim.vms[0].id, "auto")
        .await
        .unwrap();
    let serial = client.volume_info(id).await.unwrap().serial().to_string();
    let dev = sim
        .state()
        .volumes
        .into_iter()
        .find(|v| v.id == id)
        .and_then(|v| v.device)
        .expect("loop device");
    (id, serial, PathBuf::from(dev))
}

fn timed_cmd(program: &str, args: &[&std::ffi::OsStr]) -> Duration {
    let t = Instant::now();
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} failed: {out:?}");
    t.elapsed()
}

/// A fresh blank volume (ID, loop device), for timing one step of the stage on its own:
/// each step gets a volume nothing has read yet, as the stage and the direct run do.
async fn fresh_device(sim: &SimHandle, client: &Client, label: &str, gb: u64) -> (u64, PathBuf) {
    let (id, _, dev) = attached_volume(sim, client, label, gb).await;
    (id, dev)
}

/// Detach and delete a volume: a VM takes only so many, and each sample uses five.
async fn release(client: &Client, id: u64) {
    client.volume_detach(id).await.expect("detach");
    client.volume_delete(id).await.expect("delete");
}

async fn phase_stage(args: &Args) -> Value {
    if !is_root_with_loop() {
        return json!({"skipped": "needs root, /dev/loop-control and losetup"});
    }
    let sim = start_sim(Duration::ZERO, Backing::Loop, 1).await;
    let vm = sim.vms[0].clone();
    let driver = Driver::start(
        &sim,
        "node",
        &[
            "--node-id".into(),
            vm.id.clone(),
            "--region".into(),
            vm.region.clone(),
            "--by-id-dir".into(),
            sim.by_id_dir.display().to_string(),
        ],
    )
    .await;
    let client = api_client(&sim);
    let mut node = NodeClient::new(driver.channel.clone());
    let work = tempfile::tempdir().unwrap();
    let (mut staged, mut direct) = (Vec::new(), Vec::new());
    let (mut probes, mut blkids, mut ends) = (Vec::new(), Vec::new(), Vec::new());
    let gb = args.stage_size_gb;
    for i in 0..args.stage_samples {
        // The driver: find the disk by serial, probe, format, mount.
        let (id, serial, _) = attached_volume(&sim, &client, &format!("stage-{i}"), gb).await;
        let target = work.path().join(format!("staged-{i}"));
        std::fs::create_dir_all(&target).unwrap();
        let volume_id = format!("toronto/{id}");
        let t = Instant::now();
        node.node_stage_volume(NodeStageVolumeRequest {
            volume_id: volume_id.clone(),
            publish_context: HashMap::from([
                ("serial".into(), serial),
                ("size_bytes".into(), (gb << 30).to_string()),
            ]),
            staging_target_path: target.display().to_string(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        })
        .await
        .expect("NodeStageVolume");
        staged.push(ms(t.elapsed()));
        node.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id,
            staging_target_path: target.display().to_string(),
        })
        .await
        .expect("NodeUnstageVolume");
        release(&client, id).await;

        // Directly: the same mkfs command line, then mount(2), on a disk nothing has read.
        let (id, dev) = fresh_device(&sim, &client, &format!("direct-{i}"), gb).await;
        let target = work.path().join(format!("direct-{i}"));
        std::fs::create_dir_all(&target).unwrap();
        let (program, mkfs_args) =
            lunanode_csi::volumes::fs::mkfs_command("ext4", &dev, false).unwrap();
        let t = Instant::now();
        timed_cmd(program, &mkfs_args);
        nix::mount::mount(
            Some(&dev),
            &target,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount");
        direct.push(ms(t.elapsed()));
        nix::mount::umount(&target).expect("umount");
        release(&client, id).await;

        // What the driver adds, step by step, each on a fresh blank disk of its own (a disk
        // read once is faster to read again): the whole safety probe as the driver runs it
        // (blkid and the reads of both ends at once), and its two parts alone.
        let (id, dev) = fresh_device(&sim, &client, &format!("probe-{i}"), gb).await;
        let t = Instant::now();
        let found = lunanode_csi::volumes::probe::probe(&dev).expect("probe");
        probes.push(ms(t.elapsed()));
        assert_eq!(found, lunanode_csi::volumes::Probe::Blank);
        release(&client, id).await;
        let (id, dev) = fresh_device(&sim, &client, &format!("blkid-{i}"), gb).await;
        let t = Instant::now();
        let _ = Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(&dev)
            .env("LC_ALL", "C")
            .output();
        blkids.push(ms(t.elapsed()));
        release(&client, id).await;
        let (id, dev) = fresh_device(&sim, &client, &format!("ends-{i}"), gb).await;
        let t = Instant::now();
        let e = lunanode_csi::volumes::probe::read_ends(&dev).expect("read_ends");
        ends.push(ms(t.elapsed()));
        assert!(e.head_zero);
        release(&client, id).await;
    }
    driver.stop().await;
    sim.shutdown().await;
    let (s50, _) = p50_p99(&staged);
    let (d50, _) = p50_p99(&direct);
    json!({
        "size_gb": gb,
        "samples": args.stage_samples,
        "stage_ms_p50": s50,
        "direct_ms_p50": d50,
        "ratio": s50 / d50,
        "added_ms_p50": s50 - d50,
        "probe_ms_p50": p50_p99(&probes).0,
        "blkid_probe_ms_p50": p50_p99(&blkids).0,
        "read_ends_ms_p50": p50_p99(&ends).0,
        "stage_ms": staged,
        "direct_ms": direct,
        "probe_ms": probes,
        "blkid_probe_ms": blkids,
        "read_ends_ms": ends,
    })
}

// ---- the report ----------------------------------------------------------------------

fn get(v: &Value, path: &str) -> f64 {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN)
}

/// Medians over runs of every number in the per-run objects, keeping the shape.
fn median_of(runs: &[Value]) -> Value {
    match runs.first() {
        Some(Value::Object(first)) => Value::Object(
            first
                .keys()
                .map(|k| {
                    let vals: Vec<Value> = runs.iter().filter_map(|r| r.get(k).cloned()).collect();
                    (k.clone(), median_of(&vals))
                })
                .collect(),
        ),
        Some(Value::Number(_)) => {
            let v: Vec<f64> = runs.iter().filter_map(Value::as_f64).collect();
            json!(median(&v))
        }
        Some(other) => other.clone(),
        None => Value::Null,
    }
}

fn print_report(r: &Value) {
    let f = |x: f64| {
        if x.is_nan() {
            "-".to_string()
        } else {
            format!("{x:.2}")
        }
    };
    println!("\nlunanode-csi driver benchmark ({})", r["machine"]["cpu"]);
    if let Some(s) = r.get("serial").filter(|v| !v.is_null()) {
        println!(
            "\nConcurrency 1, API latency {} ms: median over {} runs",
            r["config"]["latency_ms"], r["config"]["runs"]
        );
        println!(
            "{:<27} {:>9} {:>9} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>6} {:>4}",
            "RPC",
            "p50 ms",
            "p99 ms",
            "added p50",
            "added p99",
            "handler p50",
            "handler p99",
            "nominal p50",
            "nominal p99",
            "calls",
            "min"
        );
        for (rpc, min, _) in MINIMUM_CALLS {
            let x = &s["rpcs"][rpc];
            println!(
                "{:<27} {:>9} {:>9} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>6} {:>4}",
                rpc,
                f(get(x, "rpc_ms.p50")),
                f(get(x, "rpc_ms.p99")),
                f(get(x, "added_ms_measured.p50")),
                f(get(x, "added_ms_measured.p99")),
                f(get(x, "added_ms_vs_handler.p50")),
                f(get(x, "added_ms_vs_handler.p99")),
                f(get(x, "added_ms_nominal.p50")),
                f(get(x, "added_ms_nominal.p99")),
                get(x, "api_calls.typical"),
                min
            );
        }
    }
    if let Some(s) = r.get("serial").filter(|v| !v.is_null()) {
        println!(
            "  (added = RPC time minus the simulator's own time serving its API calls, from each request read to its reply written;\n   handler = the same minus only the API handler's time, so the simulator's HTTP parsing and writing count as added;\n   nominal = RPC time minus calls x configured latency)\n  a bare API call from the bench adds {} ms over the simulator's time ({} ms over the handler's): the HTTP + loopback floor\n  an RPC without API calls (ControllerGetCapabilities) takes {} ms p50, {} ms p99: the gRPC floor\n  driver CPU: {} us per RPC, {} us per API call",
            f(get(s, "bare_client_overhead_ms_per_api_call")),
            f(get(s, "bare_client_overhead_ms_per_api_call_vs_handler")),
            f(get(s, "rpc_without_api_calls_ms.p50")),
            f(get(s, "rpc_without_api_calls_ms.p99")),
            f(get(s, "driver_cpu_us_per_rpc")),
            f(get(s, "driver_cpu_us_per_api_call"))
        );
    }
    if let Some(t) = r.get("throughput").filter(|v| !v.is_null()) {
        println!(
            "\nThroughput: {} lifecycles at concurrency {} (create, publish, unpublish, snapshot, delete snapshot, delete)",
            t["lifecycles"], t["concurrency"]
        );
        println!(
            "  {} lifecycles/s, wall {} s, errors {}",
            f(get(t, "lifecycles_per_s")),
            f(get(t, "wall_s")),
            t["errors"]
        );
        for rpc in RPCS {
            let x = &t["rpcs"][rpc];
            println!(
                "  {:<27} p50 {:>9} ms  p99 {:>9} ms",
                rpc,
                f(get(x, "p50_ms")),
                f(get(x, "p99_ms"))
            );
        }
    }
    if let Some(s) = r.get("scale").filter(|v| !v.is_null()) {
        println!(
            "\nScale: {} existing volumes, {} concurrent CreateVolume: {} volume/list calls, wall {} s, create p50 {} ms p99 {} ms, errors {}",
            s["existing_volumes"],
            s["concurrent_creates"],
            s["volume_list_calls"],
            f(get(s, "wall_s")),
            f(get(s, "create_ms.p50")),
            f(get(s, "create_ms.p99")),
            s["errors"]
        );
    }
    if let Some(m) = r.get("memory").filter(|v| !v.is_null()) {
        println!(
            "\nDriver memory (controller): idle {} MiB ({} MiB private, {} MiB mapped files), peak {} MiB (highest private {} MiB, highest mapped files {} MiB), {} MiB after the phases, at most {} open fds",
            f(get(m, "idle_kib") / 1024.0),
            f(get(m, "idle_anon_kib") / 1024.0),
            f(get(m, "idle_file_kib") / 1024.0),
            f(get(m, "peak_kib") / 1024.0),
            f(get(m, "peak_anon_kib") / 1024.0),
            f(get(m, "peak_file_kib") / 1024.0),
            f(get(m, "after_kib") / 1024.0),
            get(m, "peak_open_fds")
        );
    }
    if let Some(t) = r.get("target").filter(|v| !v.is_null()) {
        println!(
            "\nTarget: {} lifecycles at concurrency {}, {} ms latency, {} QPS client limit (one run)",
            t["lifecycles"], t["concurrency"], t["latency_ms"], t["qps"]
        );
        println!(
            "  errors {}, wall {} s, API calls {} ({} per lifecycle), rate-limit floor {} s, wall/floor {}",
            t["errors"],
            f(get(t, "wall_s")),
            t["api_calls"],
            f(get(t, "api_calls_per_lifecycle")),
            f(get(t, "rate_limit_floor_s")),
            f(get(t, "wall_over_floor"))
        );
        println!(
            "  driver memory: idle {} MiB, peak {} MiB",
            f(get(t, "driver_idle_kib") / 1024.0),
            f(get(t, "driver_peak_kib") / 1024.0)
        );
    }
    if let Some(w) = r.get("waits").filter(|v| !v.is_null()) {
        waits::print_waits(w);
    }
    if let Some(s) = r.get("stage").filter(|v| !v.is_null()) {
        if let Some(why) = s.get("skipped") {
            println!("\nNodeStageVolume: skipped ({why})");
        } else {
            println!(
                "\nNodeStageVolume ({} GB, ext4): {} ms vs mkfs + mount directly {} ms: ratio {}, {} ms added",
                s["size_gb"],
                f(get(s, "stage_ms_p50")),
                f(get(s, "direct_ms_p50")),
                f(get(s, "ratio")),
                f(get(s, "added_ms_p50"))
            );
            println!(
                "  safety probe of a blank disk {} ms (blkid -p and both ends read at once); alone: blkid -p {} ms, read both ends {} ms",
                f(get(s, "probe_ms_p50")),
                f(get(s, "blkid_probe_ms_p50")),
                f(get(s, "read_ends_ms_p50"))
            );
        }
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernel": kernel.trim(),
    })
}

async fn bench(args: Args) -> Value {
    let mut serial = Vec::new();
    let mut throughput = Vec::new();
    let mut scale = Vec::new();
    let mut memory = Vec::new();
    let mut stage = Vec::new();
    let latency = Duration::from_millis(args.latency_ms);
    for run in 0..args.runs {
        eprintln!("run {}/{}", run + 1, args.runs);
        let sim = start_sim(latency, Backing::Memory, vms_for(args.concurrency)).await;
        let driver =
            Driver::start(&sim, "controller", &controller_flags(args.qps, args.burst)).await;
        // Idle: started, answered a Probe, nothing else.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let idle = driver.rss_kib();
        // Private memory vs. the binary's and libc's pages mapped from the page cache.
        let idle_anon = rss_kib(driver.pid(), "RssAnon").unwrap_or(0);
        let idle_file = rss_kib(driver.pid(), "RssFile").unwrap_or(0);
        let sampler = MemSampler::start(driver.pid());
        if args.runs("serial") {
            serial.push(phase_serial(&args, &sim, &driver, run).await);
        }
        if args.runs("throughput") {
            throughput.push(phase_throughput(&args, &sim, &driver, run).await);
        }
        if args.runs("scale") {
            scale.push(phase_scale(&args, &sim, &driver, run).await);
        }
        let (peak_anon, peak_file, peak_fds) = sampler.finish();
        memory.push(json!({
            "idle_kib": idle,
            "idle_anon_kib": idle_anon,
            "idle_file_kib": idle_file,
            "peak_kib": driver.peak_kib(),
            "peak_anon_kib": peak_anon,
            "peak_file_kib": peak_file,
            "after_kib": driver.rss_kib(),
            "peak_open_fds": peak_fds,
        }));
        driver.stop().await;
        sim.shutdown().await;
        if args.runs("stage") {
            stage.push(phase_stage(&args).await);
        }
    }
    let target = if args.runs("target") {
        eprintln!("target scenario");
        Some(phase_target(&args).await)
    } else {
        None
    };
    let waits = if args.runs("waits") {
        eprintln!("waits");
        Some(waits::phase_waits(&args).await)
    } else {
        None
    };
    let opt = |v: Vec<Value>| (!v.is_empty()).then(|| median_of(&v));
    json!({
        "machine": machine(),
        "config": {
            "driver_bin": driver_bin(),
            "runs": args.runs,
            "latency_ms": args.latency_ms,
            "qps": args.qps,
            "burst": args.burst,
            "quick": args.quick,
        },
        "minimum_calls": MINIMUM_CALLS.iter().map(|(rpc, n, why)| json!({"rpc": rpc, "calls": n, "why": why})).collect::<Vec<_>>(),
        "serial": opt(serial.clone()),
        "throughput": opt(throughput.clone()),
        "scale": opt(scale.clone()),
        "memory": opt(memory.clone()),
        "stage": opt(stage.clone()),
        "target": target,
        "waits": waits,
        "runs": {"serial": serial, "throughput": throughput, "scale": scale, "memory": memory, "stage": stage},
    })
}

fn main() {
    let mut args = Args::parse();
    let smoke = !args.bench;
    let figures_matter = !smoke && !args.quick;
    if smoke {
        // `cargo test --benches`: prove it runs and writes JSON; no loop devices.
        args = args.quick();
        args.skip.push("stage".into());
        args.target_lifecycles = 10;
    } else if args.quick {
        args = args.quick();
    }
    DRIVER_BIN.set(pick_driver_bin(figures_matter)).unwrap();
    let out = args.out.clone().unwrap_or_else(|| {
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
        let name = if smoke {
            "driver-smoke.json"
        } else {
            "driver.json"
        };
        target_dir.join("bench").join(name)
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(bench(args));
    print_report(&report);
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\nJSON: {}", out.display());
    if smoke {
        let back: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert!(back["serial"]["rpcs"]["CreateVolume"].is_object());
        assert!(back["target"]["api_calls"].as_u64().unwrap() > 0);
        assert!(back["waits"]["results"][0]["kinds"]["attach"].is_object());
    }
}
