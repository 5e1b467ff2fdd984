//! lunanode-csi: a Kubernetes CSI driver for Luna Node block-storage volumes.
//!
//! The crate is split the way the driver is layered:
//!
//! - [`driver`]: the CSI protocol layer (Identity, Controller and Node services, request
//!   validation, and the one place where errors become gRPC status codes).
//! - [`lunanode`]: the client for the Luna Node HTTP API (signing, retries, rate limiting).
//! - [`volumes`]: the node's operating-system work (find the device, probe, format, mount,
//!   stats, resize), with no knowledge of CSI or of the cloud.
//! - [`sim`]: a simulator of the Luna Node API, so the whole driver runs on one machine.
//! - [`server`]: serving the CSI services on a unix socket, with graceful shutdown.
//! - [`demo`] and [`ops`]: `lunanode-csi demo` (the driver end to end on one machine) and
//!   the operator commands (`volume`, `snapshot`, `vm`, `image`).
//! - [`cli`]: the command line, on top of everything; [`command`] holds what the
//!   subcommands share (exit-code errors, API client settings), so nothing imports `cli`.

pub mod cli;
pub mod command;
pub mod demo;
pub mod driver;
pub mod lunanode;
pub mod metrics;
pub mod ops;
pub mod preflight;
pub mod server;
pub mod sim;
pub mod telemetry;
pub mod volumes;

/// Code generated from `proto/csi.proto` (CSI spec v1.12.0, package `csi.v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// The CSI driver name, as registered with Kubernetes.
pub const DRIVER_NAME: &str = "csi.lunanode.com";

/// The topology segment key that carries a Luna Node region.
pub const TOPOLOGY_KEY: &str = "topology.csi.lunanode.com/region";

/// The driver's version, reported as the CSI `vendor_version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
