//! The command line: `serve`, `sim`, and the operator commands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::command::{ApiArgs, CommandError};
use crate::driver::node_id::{self, IdentitySettings, NodeIdLookup};
use crate::driver::{ControllerConfig, NodeConfig};
use crate::lunanode::{Client, Credentials};
use crate::server::{self, Endpoint, csi_router};
use crate::telemetry::{self, LogFormat};

/// Kubernetes CSI driver for Luna Node block-storage volumes.
#[derive(Debug, Parser)]
#[command(name = "lunanode-csi", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "LUNANODE_CSI_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log level or filter (e.g. `info`, `lunanode_csi=debug`); RUST_LOG wins when set.
    #[arg(
        long,
        global = true,
        env = "LUNANODE_CSI_LOG_LEVEL",
        default_value = "info"
    )]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the CSI gRPC API on a unix socket.
    Serve(ServeArgs),
    /// Run the Luna Node API simulator.
    Sim(crate::sim::SimArgs),
    /// Show the driver working: a simulated cloud, real loop devices, and the CSI calls
    /// Kubernetes makes, step by step.
    Demo(crate::demo::DemoArgs),
    /// Operate on Luna Node volumes (every action of the volume API).
    #[command(subcommand)]
    Volume(crate::ops::VolumeCommand),
    /// Operate on volume snapshots.
    #[command(subcommand)]
    Snapshot(crate::ops::SnapshotCommand),
    /// List virtual machines (the IDs volumes attach to).
    #[command(subcommand)]
    Vm(crate::ops::VmCommand),
    /// List and delete images (what `snapshot replicate` makes).
    #[command(subcommand)]
    Image(crate::ops::ImageCommand),
    /// Prove an account and this node before the first claim: credentials and clock, this
    /// VM in the install's region, then a labelled test volume created, attached, found by
    /// its serial, formatted, mounted, written, read back and removed. Run as root on a node.
    Preflight(crate::preflight::PreflightArgs),
}

/// Which CSI services this process offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Identity, Controller and Node.
    All,
    /// Identity and Controller (the controller StatefulSet).
    Controller,
    /// Identity and Node (the DaemonSet).
    Node,
}

/// `lunanode-csi serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// gRPC endpoint: unix:///absolute/path.sock
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// Which services to serve.
    #[arg(long, env = "LUNANODE_CSI_MODE", value_enum, default_value = "all")]
    pub mode: Mode,
    /// How long in-flight calls may run after SIGTERM before the process exits.
    #[arg(long, env = "LUNANODE_CSI_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Run the built-in Luna Node simulator in this process and use it instead of the cloud.
    #[arg(long, env = "LUNANODE_CSI_SIM")]
    pub sim: bool,
    /// Simulator backing (default: loop when root with loop devices, else memory).
    #[arg(long, env = "LUNANODE_CSI_SIM_BACKING", value_enum, requires = "sim")]
    pub sim_backing: Option<crate::sim::Backing>,
    /// Simulator state directory (default: a new temporary directory).
    #[arg(long, env = "LUNANODE_CSI_SIM_STATE_DIR", requires = "sim")]
    pub sim_state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on GET /metrics (and 200 on /healthz) at HOST:PORT; off
    /// when unset. Port 0 picks a free port (logged).
    #[arg(long, env = "LUNANODE_CSI_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub controller: ControllerArgs,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// Controller settings.
#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    /// Region for volumes whose StorageClass and topology name none.
    #[arg(long, env = "LUNANODE_DEFAULT_REGION", default_value = "toronto")]
    pub default_region: String,
    #[command(flatten)]
    pub regions: RegionsArgs,
    /// Size of a volume requested without a capacity, in GB (2^30 bytes).
    #[arg(long, env = "LUNANODE_DEFAULT_VOLUME_SIZE_GB", default_value_t = 10)]
    pub default_volume_size_gb: u64,
    /// Smallest volume the driver creates, in GB.
    #[arg(long, env = "LUNANODE_MIN_VOLUME_SIZE_GB", default_value_t = 1)]
    pub min_volume_size_gb: u64,
    /// Largest volume the driver creates, in GB.
    #[arg(long, env = "LUNANODE_MAX_VOLUME_SIZE_GB", default_value_t = 16_384)]
    pub max_volume_size_gb: u64,
    /// How waits for the cloud poll: learned per kind of transition, or the old fixed
    /// backoff (0 s, 0.5 s, then x1.5 up to 5 s).
    #[arg(
        long,
        env = "LUNANODE_CSI_WAIT_SCHEDULE",
        value_enum,
        default_value = "learned"
    )]
    pub wait_schedule: crate::driver::controller::wait::ScheduleName,
    /// Learned waits: the least one more poll must save, as a fraction of a transition's
    /// time (lower: more polls, answers closer to the cloud being ready).
    #[arg(long, env = "LUNANODE_CSI_WAIT_POLL_COST", default_value_t = crate::driver::controller::wait::DEFAULT_POLL_COST)]
    pub wait_poll_cost: f64,
    /// Learned waits: at most this many times the API calls per wait the fixed backoff
    /// would make for the same transitions (1: never more calls than the fixed backoff;
    /// `inf`: no cap, the poll cost alone decides).
    #[arg(long, env = "LUNANODE_CSI_WAIT_CALL_BUDGET", default_value_t = crate::driver::controller::wait::DEFAULT_CALL_BUDGET)]
    pub wait_call_budget: f64,
    /// For benchmarks only: multiply every time of the wait schedules by this, to match a
    /// simulator whose transitions are scaled the same way.
    #[arg(long, env = "LUNANODE_CSI_WAIT_TIME_SCALE", default_value_t = 1.0)]
    pub wait_time_scale: f64,
    /// While several volumes are waited for, poll them through one shared volume/list
    /// instead of a volume/info each; concurrent callers share each region's
    /// volume/snapshot-list and image/list (false: every caller sends its own).
    #[arg(long, env = "LUNANODE_CSI_WAIT_SHARE_LIST", default_value_t = true, action = clap::ArgAction::Set)]
    pub wait_share_list: bool,
    #[command(flatten)]
    pub attach: AttachArgs,
}

/// The regions the driver manages (the controller's setting; `preflight` takes it too).
#[derive(Debug, Clone, Args)]
pub struct RegionsArgs {
    /// Regions the driver manages (comma-separated).
    #[arg(
        long,
        env = "LUNANODE_REGIONS",
        value_delimiter = ',',
        default_value = "toronto,montreal,roubaix"
    )]
    pub regions: Vec<String>,
}

/// How volumes are attached (the controller's setting; `preflight` takes it too).
#[derive(Debug, Clone, Args)]
pub struct AttachArgs {
    /// volume/attach's `target`, which picks the bus: `/dev/vda` attaches on virtio (what
    /// Luna Node's own code sends; the disk gets the next free virtio letter, not vda),
    /// `/dev/sda` SCSI, `/dev/hda` IDE, `auto` leaves it to the cloud (undocumented; may be
    /// IDE on VMs created without volume_virtio). The node finds the disk on any bus.
    #[arg(long, env = "LUNANODE_ATTACH_TARGET", default_value = crate::driver::ATTACH_TARGET)]
    pub attach_target: String,
}

impl AttachArgs {
    /// The target, checked.
    pub fn target(&self) -> Result<String, CommandError> {
        let t = self.attach_target.trim();
        if crate::driver::valid_attach_target(t) {
            Ok(t.to_string())
        } else {
            Err(CommandError::Config(format!(
                "--attach-target {:?} is not auto or a bus device such as /dev/vda (virtio), /dev/sda (SCSI) or /dev/hda (IDE)",
                self.attach_target
            )))
        }
    }
}

impl ControllerArgs {
    fn config(&self) -> Result<ControllerConfig, CommandError> {
        let regions = &self.regions.regions;
        if !regions.contains(&self.default_region) {
            return Err(CommandError::Config(format!(
                "--default-region {} is not among --regions {}",
                self.default_region,
                regions.join(",")
            )));
        }
        if self.min_volume_size_gb == 0 || self.min_volume_size_gb > self.max_volume_size_gb {
            return Err(CommandError::Config(
                "volume size bounds must satisfy 1 <= min <= max".into(),
            ));
        }
        if !(self.wait_poll_cost.is_finite() && self.wait_poll_cost >= 0.0) {
            return Err(CommandError::Config(
                "--wait-poll-cost must be 0 or more".into(),
            ));
        }
        if self.wait_call_budget.is_nan() || self.wait_call_budget <= 0.0 {
            return Err(CommandError::Config(
                "--wait-call-budget must be above 0 (inf: no cap)".into(),
            ));
        }
        if !(self.wait_time_scale.is_finite() && self.wait_time_scale > 0.0) {
            return Err(CommandError::Config(
                "--wait-time-scale must be above 0".into(),
            ));
        }
        let scale = self.wait_time_scale;
        Ok(ControllerConfig {
            wait: crate::driver::controller::wait::WaitPolicy {
                share_list: self.wait_share_list,
                ..crate::driver::controller::wait::WaitPolicy::new(
                    self.wait_schedule,
                    crate::driver::controller::wait::Price {
                        poll_cost: self.wait_poll_cost,
                        call_budget: self.wait_call_budget,
                    },
                    scale,
                )
            },
            backoff: crate::driver::controller::wait::Backoff::default().scaled(scale),
            default_region: self.default_region.clone(),
            regions: regions.clone(),
            default_size_gb: self
                .default_volume_size_gb
                .clamp(self.min_volume_size_gb, self.max_volume_size_gb),
            min_size_gb: self.min_volume_size_gb,
            max_size_gb: self.max_volume_size_gb,
            attach_target: self.attach.target()?,
            ..ControllerConfig::default()
        })
    }
}

/// Node settings.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub place: NodePlaceArgs,
    /// Volumes this node can attach: virtio disk slots minus the boot disk.
    #[arg(long, env = "LUNANODE_MAX_VOLUMES_PER_NODE", default_value_t = 15)]
    pub max_volumes_per_node: i64,
}

/// Which VM this node is, in which region, and where its disks appear: what the node plugin
/// and `preflight` share.
#[derive(Debug, Clone, Args)]
pub struct NodePlaceArgs {
    /// This node's Luna Node VM ID (default: looked up as --node-id-source says).
    #[arg(long, env = "LUNANODE_NODE_ID")]
    pub node_id: Option<String>,
    /// Where to look up the VM ID when --node-id is unset: `auto` (metadata service, else
    /// SMBIOS), `metadata` or `smbios` (never touches the network).
    #[arg(
        long,
        env = "LUNANODE_NODE_ID_SOURCE",
        value_enum,
        default_value = "auto"
    )]
    pub node_id_source: NodeIdLookup,
    /// This node's region, reported as topology (`preflight` checks it against the cloud's).
    /// Required unless the node has API credentials to ask the cloud (vm/info); without
    /// either the node does not start.
    #[arg(long, env = "LUNANODE_REGION")]
    pub region: Option<String>,
    /// Where udev puts the disk links.
    #[arg(long, env = "LUNANODE_BY_ID_DIR", default_value = "/dev/disk/by-id")]
    pub by_id_dir: PathBuf,
    /// How long NodeStageVolume waits for an attached disk to appear, in seconds.
    #[arg(long, env = "LUNANODE_DEVICE_WAIT_SECS", default_value_t = 60)]
    pub device_wait_secs: u64,
}

impl NodeArgs {
    /// The node's identity (see [`node_id::resolve`]) and settings; `cloud` is asked for
    /// the region only when none is set.
    async fn config(
        &self,
        regions: &[String],
        cloud: Option<&Client>,
    ) -> Result<NodeConfig, CommandError> {
        let p = &self.place;
        let settings = IdentitySettings {
            node_id: p.node_id.clone(),
            lookup: p.node_id_source,
            region: p.region.clone(),
            regions: regions.to_vec(),
        };
        let id = node_id::resolve(&settings, cloud)
            .await
            .map_err(|e| CommandError::Config(e.to_string()))?;
        tracing::info!(
            node_id = id.node_id,
            node_id_source = %id.node_id_source,
            region = id.region,
            region_source = %id.region_source,
            "node identity"
        );
        Ok(NodeConfig {
            by_id_dir: p.by_id_dir.clone(),
            max_volumes_per_node: self.max_volumes_per_node,
            device_wait: Duration::from_secs(p.device_wait_secs),
            ..NodeConfig::new(id.node_id, id.region)
        })
    }
}

/// Parse arguments, run the command, and map failures to exit codes: 2 for bad
/// configuration (nothing was started), 1 for a failure while running.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; the driver's per-RPC logs would drown it.
    let level = match &cli.command {
        Command::Demo(d) if !d.verbose => "warn",
        // Its report says what failed; the driver's own warnings (retries while a killed
        // run's volume settles) would only repeat it.
        Command::Preflight(p) if !p.verbose => "error",
        _ => &cli.log_level,
    };
    telemetry::init(cli.log_format, level);
    // One thread: the driver waits on the cloud and the disks (blocking work goes to
    // `spawn_blocking`), so more workers only add wake-ups between threads and memory (a
    // multi-thread runtime starts a worker per core, on every node).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CommandError::Config(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(CommandError::Runtime(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
        Err(CommandError::Reported) => ExitCode::from(1),
    }
}

async fn run(command: Command) -> Result<(), CommandError> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Sim(args) => crate::sim::run(args)
            .await
            .map_err(|e| CommandError::Runtime(e.to_string())),
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Volume(c) => crate::ops::volume(c).await,
        Command::Snapshot(c) => crate::ops::snapshot(c).await,
        Command::Vm(c) => crate::ops::vm(c).await,
        Command::Image(c) => crate::ops::image(c).await,
        Command::Preflight(args) => crate::preflight::run(args).await,
    }
}

async fn serve(args: ServeArgs) -> Result<(), CommandError> {
    let endpoint: Endpoint = args
        .endpoint
        .parse()
        .map_err(|e: server::ServeError| CommandError::Config(e.to_string()))?;
    let controller_on = matches!(args.mode, Mode::All | Mode::Controller);
    let node_on = matches!(args.mode, Mode::All | Mode::Node);
    let controller_cfg = args.controller.config()?;
    let (metrics, metrics_task) = match args.metrics_addr {
        Some(addr) => {
            let (m, task) = start_metrics(addr).await?;
            (Some(m), Some(task))
        }
        None => (None, None),
    };

    // With --sim the cloud is a simulator in this process; its VM in toronto is this node.
    let mut sim = None;
    let mut node = args.node.clone();
    let client = if args.sim {
        let backing = args.sim_backing.unwrap_or(if crate::sim::loop_available() {
            crate::sim::Backing::Loop
        } else {
            crate::sim::Backing::Memory
        });
        let handle = start_embedded_sim(backing, args.sim_state_dir.clone()).await?;
        tracing::info!(url = %handle.url, backing = ?handle.backing, "embedded Luna Node simulator started");
        if handle.backing == crate::sim::Backing::Memory && node_on {
            tracing::warn!(
                "simulator backing is memory: volumes have no devices, so NodeStageVolume cannot find a disk; run as root with loop devices for the loop backing"
            );
        }
        let vm = handle
            .vms
            .first()
            .cloned()
            .ok_or_else(|| CommandError::Runtime("simulator started without a VM".into()))?;
        node.place.node_id.get_or_insert(vm.id);
        node.place.region.get_or_insert(vm.region);
        node.place.by_id_dir = handle.by_id_dir.clone();
        let creds = Credentials::new(&handle.api_id, &handle.api_key)
            .map_err(|e| CommandError::Runtime(e.to_string()))?;
        let client = args.api.client_with(creds, &handle.url, 0.0)?;
        sim = Some(handle);
        Some(client)
    } else if controller_on || args.api.credentials_offered() {
        // A node-only plugin needs no credentials; given some (opt-in), it asks the cloud
        // for its region when none is set.
        Some(args.api.client()?)
    } else {
        None
    };

    let ready = Arc::new(AtomicBool::new(false));
    let controller = match (&client, controller_on) {
        (Some(c), true) => Some((c.clone(), controller_cfg)),
        _ => None,
    };
    let node_cfg = match node_on {
        true => Some(
            node.config(&args.controller.regions.regions, client.as_ref())
                .await?,
        ),
        false => None,
    };
    let router = csi_router(controller, node_cfg, ready.clone(), metrics.clone())
        .map_err(|e| CommandError::Config(e.to_string()))?;
    let listener = match endpoint.bind() {
        Ok(l) => l,
        Err(e) => {
            if let Some(s) = sim {
                s.shutdown().await;
            }
            return Err(CommandError::Config(e.to_string()));
        }
    };
    ready.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(endpoint = %endpoint.path().display(), mode = ?args.mode, version = crate::VERSION, "serving CSI");
    let result = server::serve(
        router,
        &endpoint,
        listener,
        server::termination_signal(),
        Duration::from_secs(args.shutdown_grace_secs),
    )
    .await;
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some(s) = sim {
        s.shutdown().await;
    }
    result.map_err(|e| CommandError::Runtime(e.to_string()))?;
    tracing::info!("stopped");
    Ok(())
}

/// Bind the metrics endpoint (a bad address is a configuration error) and serve it in the
/// background until the process ends.
async fn start_metrics(
    addr: std::net::SocketAddr,
) -> Result<(Arc<crate::metrics::Metrics>, tokio::task::JoinHandle<()>), CommandError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CommandError::Config(format!("cannot listen for metrics on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| CommandError::Runtime(format!("metrics listener has no address: {e}")))?;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let m = metrics.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = crate::metrics::serve(listener, m, std::future::pending()).await {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    tracing::info!(addr = %bound, "serving metrics on /metrics");
    Ok((metrics, task))
}

async fn start_embedded_sim(
    backing: crate::sim::Backing,
    state_dir: Option<PathBuf>,
) -> Result<crate::sim::SimHandle, CommandError> {
    // An empty state dir makes the simulator use a temporary one that it removes at exit.
    let cfg = crate::sim::SimConfig {
        backing,
        state_dir: state_dir.unwrap_or_default(),
        vms: vec![crate::sim::VmSpec {
            region: "toronto".into(),
            name: Some("node-1".into()),
        }],
        ..Default::default()
    };
    crate::sim::SimHandle::start(cfg)
        .await
        .map_err(|e| CommandError::Runtime(format!("cannot start the simulator: {e}")))
}
