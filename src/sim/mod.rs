//! A simulator of the Luna Node API (INTERFACE STUB: being implemented).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where simulated volumes keep their bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
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

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub backing: Backing,
    pub state_dir: PathBuf,
    pub by_id_dir: PathBuf,
    pub vms: Vec<VmSpec>,
    pub latency: Duration,
    pub transition: Duration,
    pub fault_rate: f64,
    pub seed: u64,
    pub refuse_delete_with_snapshots: bool,
    pub rate_limit_qps: Option<f64>,
}

/// A VM as the simulator created it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimVm {
    pub id: String,
    pub name: String,
    pub region: String,
}

/// A running simulator.
pub struct SimHandle {
    pub url: String,
    pub api_id: String,
    pub api_key: String,
    pub vms: Vec<SimVm>,
    pub backing: Backing,
    pub by_id_dir: PathBuf,
}

/// Errors starting the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}")]
    Other(String),
}

impl SimHandle {
    /// Start a simulator.
    pub async fn start(_cfg: SimConfig) -> Result<SimHandle, SimError> {
        Err(SimError::Other("simulator not implemented yet".into()))
    }

    /// Stop serving and clean up loop devices and links.
    pub async fn shutdown(self) {}
}

/// Whether the loop backing can run here (root and a loop control device).
pub fn loop_available() -> bool {
    false
}

/// `lunanode-csi sim` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {}

/// Run `lunanode-csi sim` until SIGTERM.
pub async fn run(_args: SimArgs) -> Result<(), SimError> {
    Err(SimError::Other("simulator not implemented yet".into()))
}
