//! The demo's world: a temporary directory, the simulator, the driver's servers on unix
//! sockets (one per simulated node), tonic clients, and the clean-up that leaves nothing
//! behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint as TonicEndpoint, Uri};

use crate::csi::controller_client::ControllerClient;
use crate::csi::identity_client::IdentityClient;
use crate::csi::node_client::NodeClient;
use crate::driver::{ControllerConfig, NodeConfig};
use crate::lunanode::{Client, ClientConfig, Credentials};
use crate::server::Endpoint;
use crate::sim::{Backing, SimConfig, SimHandle, SimVm, VmSpec};

/// One simulated Kubernetes node: its VM and the driver's Node service on its own socket.
pub struct NodeEnv {
    pub vm: SimVm,
    pub client: NodeClient<Channel>,
    /// Where this node's kubelet keeps staging and pod directories.
    pub kubelet_dir: PathBuf,
}

/// A driver server task.
struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Everything the demo runs on.
pub struct Env {
    pub sim: Option<SimHandle>,
    pub backing: Backing,
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    /// `nodes[0]` is in toronto (and shares its process with the controller, like
    /// `serve --mode all`); `nodes[1]` is in montreal.
    pub nodes: Vec<NodeEnv>,
    servers: Vec<Server>,
}

/// A fresh directory of our own under the system temp dir.
pub fn make_temp_dir() -> Result<PathBuf, String> {
    for _ in 0..16 {
        let p = std::env::temp_dir().join(format!(
            "lunanode-csi-demo-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        match std::fs::create_dir(&p) {
            Ok(()) => return std::fs::canonicalize(&p).map_err(|e| e.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot create {}: {e}", p.display())),
        }
    }
    Err("cannot pick a temporary directory name".into())
}

/// Start the simulator with a VM in toronto; the montreal VM is added afterwards, the way
/// a second node joins a cluster.
pub async fn start_sim(
    dir: &Path,
    backing: Backing,
    transition: Duration,
) -> Result<SimHandle, String> {
    let state_dir = dir.join("sim");
    let cfg = SimConfig {
        backing,
        by_id_dir: state_dir.join("by-id"),
        state_dir,
        vms: vec![VmSpec {
            region: "toronto".into(),
            name: Some("node-1".into()),
        }],
        transition: transition.into(),
        seed: fastrand::u64(..),
        ..SimConfig::default()
    };
    SimHandle::start(cfg).await.map_err(|e| e.to_string())
}

/// Connect a tonic channel to a unix socket.
pub async fn channel(path: &Path) -> Result<Channel, String> {
    let path = path.to_path_buf();
    let shown = path.display().to_string();
    TonicEndpoint::try_from("http://[::]:50051")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| format!("cannot connect to {shown}: {e}"))
}

/// Serve a driver router on `socket` in a task.
fn spawn_server(router: tonic::transport::server::Router, socket: &Path) -> Result<Server, String> {
    let endpoint: Endpoint = format!("unix://{}", socket.display())
        .parse()
        .map_err(|e: crate::server::ServeError| e.to_string())?;
    let listener = endpoint.bind().map_err(|e| e.to_string())?;
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = rx.await;
        };
        if let Err(e) = crate::server::serve(
            router,
            &endpoint,
            listener,
            shutdown,
            Duration::from_secs(5),
        )
        .await
        {
            tracing::warn!(error = %e, "demo: driver server failed");
        }
    });
    Ok(Server { stop, task })
}

impl Env {
    /// Start the driver: controller + node for the toronto VM on one socket (what
    /// `serve --mode all` runs), and a node-only server for the montreal VM on another.
    pub async fn start(dir: &Path, sim: SimHandle, mtl: SimVm) -> Result<Env, (String, SimHandle)> {
        let backing = sim.backing;
        match Self::start_servers(dir, &sim, mtl).await {
            Ok((servers, identity, controller, nodes)) => Ok(Env {
                sim: Some(sim),
                backing,
                identity,
                controller,
                nodes,
                servers,
            }),
            Err(e) => Err((e, sim)),
        }
    }

    #[allow(clippy::type_complexity)]
    async fn start_servers(
        dir: &Path,
        sim: &SimHandle,
        mtl: SimVm,
    ) -> Result<
        (
            Vec<Server>,
            IdentityClient<Channel>,
            ControllerClient<Channel>,
            Vec<NodeEnv>,
        ),
        String,
    > {
        let creds = Credentials::new(&sim.api_id, &sim.api_key).map_err(|e| e.to_string())?;
        let client =
            Client::new(ClientConfig::new(sim.url.clone(), creds)).map_err(|e| e.to_string())?;
        let mut ccfg = ControllerConfig::default();
        // The simulator answers in milliseconds; poll it accordingly.
        ccfg.backoff.initial = Duration::from_millis(50);
        ccfg.backoff.max = Duration::from_millis(500);
        ccfg.default_timeout = Duration::from_secs(120);
        let node_cfg = |vm: &SimVm| NodeConfig {
            by_id_dir: sim.by_id_dir.clone(),
            device_wait: Duration::from_secs(20),
            ..NodeConfig::new(vm.id.clone(), vm.region.clone())
        };
        let tor = sim.vms.first().cloned().ok_or("the simulator has no VM")?;
        let mut servers = Vec::new();
        let mut nodes = Vec::new();
        let sockets = dir.join("sockets");
        std::fs::create_dir_all(&sockets).map_err(|e| e.to_string())?;
        for (i, vm) in [tor, mtl].into_iter().enumerate() {
            let controller = (i == 0).then(|| (client.clone(), ccfg.clone()));
            let ready = Arc::new(AtomicBool::new(true));
            let router = crate::server::csi_router(controller, Some(node_cfg(&vm)), ready, None)
                .map_err(|e| e.to_string())?;
            let socket = sockets.join(format!("{}.sock", vm.name));
            servers.push(spawn_server(router, &socket)?);
            let ch = channel(&socket).await?;
            nodes.push(NodeEnv {
                kubelet_dir: dir.join(&vm.name).join("kubelet"),
                client: NodeClient::new(ch),
                vm,
            });
        }
        let ch = channel(&sockets.join(format!("{}.sock", nodes[0].vm.name))).await?;
        Ok((
            servers,
            IdentityClient::new(ch.clone()),
            ControllerClient::new(ch),
            nodes,
        ))
    }

    pub fn sim(&self) -> &SimHandle {
        self.sim.as_ref().expect("simulator running")
    }

    /// Stop the driver servers (in-flight calls get a short grace).
    pub async fn stop_servers(&mut self) {
        for s in self.servers.drain(..) {
            let _ = s.stop.send(());
            let abort = s.task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(10), s.task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

/// Mounts under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = crate::volumes::mount::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// Loop devices whose backing file is under `dir`.
pub fn loops_under(dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(f) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            let f = f.trim().to_string();
            if Path::new(&f).starts_with(dir) {
                found.push((format!("/dev/{name}"), f));
            }
        }
    }
    found
}

/// Unmount whatever is left under `dir`: a normal unmount first, a lazy one as the last
/// resort (this is the demo's own scratch space, never a user's data). Returns what was
/// unmounted.
pub fn unmount_all_under(dir: &Path) -> Vec<PathBuf> {
    let mut done = Vec::new();
    for _ in 0..5 {
        let left = mounts_under(dir);
        if left.is_empty() {
            break;
        }
        for p in left {
            if nix::mount::umount2(&p, nix::mount::MntFlags::empty()).is_err() {
                let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
            }
            done.push(p);
        }
    }
    done
}

/// Detach loop devices still backed by files under `dir`.
pub fn detach_loops_under(dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    for (dev, _) in loops_under(dir) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&dev)
            .output();
        done.push(dev);
    }
    done
}
