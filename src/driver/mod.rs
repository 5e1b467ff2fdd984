//! The CSI protocol layer: the Identity, Controller and Node services.
//!
//! Handlers validate requests, call into [`crate::lunanode`] (controller) or
//! [`crate::volumes`] (node), and return [`error::Error`], which is mapped to a gRPC status
//! in exactly one place ([`error`]). Every RPC goes through [`observe::rpc`], which logs it.

pub mod controller;
pub mod error;
pub mod identity;
pub mod ids;
pub mod inflight;
pub mod node;
pub mod node_id;
pub mod observe;
pub mod validate;

pub use controller::{ATTACH_TARGET, ControllerConfig, ControllerService, valid_attach_target};
pub use error::Error;
pub use identity::IdentityService;
pub use node::{NodeConfig, NodeService};
