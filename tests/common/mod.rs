//! Shared test harness: a simulator and the real gRPC server on a temporary unix socket,
//! with tonic clients connected over that socket.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use lunanode_csi::csi::controller_client::ControllerClient;
use lunanode_csi::csi::identity_client::IdentityClient;
use lunanode_csi::csi::node_client::NodeClient;
use lunanode_csi::csi::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use lunanode_csi::csi::*;
use lunanode_csi::driver::{ControllerConfig, NodeConfig};
use lunanode_csi::lunanode::{Client, ClientConfig, Credentials};
use lunanode_csi::server::{self, Endpoint};
use lunanode_csi::sim::{Backing, SimConfig, SimHandle, VmSpec};
use tonic::transport::{Channel, Endpoint as TonicEndpoint, Uri};

pub const GIB: i64 = 1 << 30;

/// The driver binary built by this `cargo test`.
pub const BIN: &str = env!("CARGO_BIN_EXE_lunanode-csi");

/// Start the driver binary, its stderr piped (read it after the child exits).
pub fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lunanode-csi")
}

/// Wait until the socket accepts connections; panic if the child exits first.
pub async fn wait_for_socket(path: &Path, child: &mut Child) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("server exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("socket {} never appeared", path.display());
}

/// SIGTERM the child and wait (at most 30 s) for it to exit.
pub async fn terminate_and_wait(child: &mut Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "server did not stop on SIGTERM"
        );
        // Yield to the runtime so the still-connected client can answer the server's GOAWAY.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connect a tonic channel to a unix socket.
pub async fn channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    TonicEndpoint::try_from("http://[::]:50051")
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

/// Simulator settings used by most tests: memory backing, instant transitions, VMs in
/// toronto and montreal.
pub fn sim_config(dir: &Path) -> SimConfig {
    SimConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        backing: Backing::Memory,
        state_dir: dir.join("sim"),
        by_id_dir: dir.join("sim/by-id"),
        vms: vec![
            VmSpec {
                region: "toronto".into(),
                name: Some("node-a".into()),
            },
            VmSpec {
                region: "toronto".into(),
                name: Some("node-b".into()),
            },
            VmSpec {
                region: "montreal".into(),
                name: Some("node-m".into()),
            },
        ],
        latency: Duration::ZERO,
        transition: Duration::ZERO.into(),
        fault_rate: 0.0,
        seed: 7,
        refuse_delete_with_snapshots: false,
        rate_limit_qps: None,
        ..SimConfig::default()
    }
}

pub fn client_for(sim: &SimHandle) -> Client {
    let creds = Credentials::new(&sim.api_id, &sim.api_key).unwrap();
    let mut cfg = ClientConfig::new(sim.url.clone(), creds);
    cfg.qps = 0.0;
    cfg.request_timeout = Duration::from_secs(2);
    cfg.initial_backoff = Duration::from_millis(5);
    cfg.max_backoff = Duration::from_millis(50);
    Client::new(cfg).unwrap()
}

pub fn controller_config() -> ControllerConfig {
    let mut cfg = ControllerConfig {
        unknown_create_grace: Duration::from_millis(50),
        default_timeout: Duration::from_secs(30),
        ..ControllerConfig::default()
    };
    cfg.backoff.initial = Duration::from_millis(5);
    cfg.backoff.max = Duration::from_millis(50);
    cfg
}

/// The driver's services, built exactly as `serve` builds them (`cli::csi_router`), served
/// on a unix socket in this process.
pub struct Served {
    pub socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Served {
    pub fn start(
        socket: PathBuf,
        controller: Option<(Client, ControllerConfig)>,
        node: Option<NodeConfig>,
    ) -> Served {
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let router = lunanode_csi::server::csi_router(controller, node, ready, None).unwrap();
        let endpoint: Endpoint = socket.to_str().unwrap().parse().unwrap();
        let listener = endpoint.bind().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            server::serve(
                router,
                &endpoint,
                listener,
                async {
                    let _ = rx.await;
                },
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        });
        Served {
            socket,
            stop: Some(tx),
            server: Some(server),
        }
    }

    /// Stop serving and wait for the server to finish.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            s.await.unwrap();
        }
    }
}

/// A simulator plus the driver's Identity and Controller services on a unix socket.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub sim: Option<SimHandle>,
    pub socket: PathBuf,
    pub client: Client,
    served: Served,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_| {}, controller_config()).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut SimConfig), ccfg: ControllerConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut scfg = sim_config(dir.path());
        std::fs::create_dir_all(&scfg.state_dir).unwrap();
        tweak(&mut scfg);
        let sim = SimHandle::start(scfg).await.expect("simulator starts");
        let client = client_for(&sim);
        let served = Served::start(
            dir.path().join("csi/csi.sock"),
            Some((client.clone(), ccfg)),
            None,
        );
        Harness {
            socket: served.socket.clone(),
            dir,
            sim: Some(sim),
            client,
            served,
        }
    }

    pub fn sim(&self) -> &SimHandle {
        self.sim.as_ref().unwrap()
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(channel(&self.socket).await)
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(channel(&self.socket).await)
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(channel(&self.socket).await)
    }

    pub fn vm(&self, name: &str) -> String {
        self.sim()
            .vms
            .iter()
            .find(|v| v.name == name)
            .unwrap()
            .id
            .clone()
    }

    pub async fn stop(self) {
        if let Some(sim) = &self.sim {
            assert_wire_as_the_cloud_accepts(sim, lunanode_csi::driver::ATTACH_TARGET);
        }
        self.stop_unchecked().await;
    }

    /// Stop without checking the recorded requests (for tests that set another attach
    /// target, or send raw requests of their own).
    pub async fn stop_unchecked(mut self) {
        self.served.stop().await;
        if let Some(sim) = self.sim.take() {
            sim.shutdown().await;
        }
    }
}

/// What the simulator recorded of the driver's requests holds to what the real cloud is
/// known to accept: every `req` ASCII (Luna Node refuses the signature of raw UTF-8), and
/// every `volume/attach` on the bus the driver is configured for (by default virtio, never
/// the undocumented `auto`). Every test that stops its [`Harness`] checks it, so the whole
/// controller suite runs through it.
pub fn assert_wire_as_the_cloud_accepts(sim: &SimHandle, attach_target: &str) {
    let requests = sim.requests();
    let raw: Vec<_> = requests.iter().filter(|r| !r.ascii).collect();
    assert!(raw.is_empty(), "requests with non-ASCII req: {raw:?}");
    let targets: Vec<_> = requests
        .iter()
        .filter(|r| r.handler == "volume/attach")
        .map(|r| r.params.get("target").cloned().unwrap_or_default())
        .filter(|t| t != attach_target)
        .collect();
    assert!(
        targets.is_empty(),
        "volume/attach targets other than {attach_target}: {targets:?}"
    );
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

pub fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

pub fn cap_with_mode(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        ..mount_cap("ext4")
    }
}

pub fn create_req(name: &str, gib: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: gib * GIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap("ext4")],
        ..Default::default()
    }
}

pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}
