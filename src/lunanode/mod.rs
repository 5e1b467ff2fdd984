//! The Luna Node API client.
//!
//! One [`Client`] per process: it signs requests (the nonce is the clock's second, as in Luna
//! Node's own clients), shares a rate limit across all callers, retries transient failures
//! of actions that are safe to repeat, and reports every failure as one [`ApiError`] kind.
//! Actions that create something are never repeated blindly: callers reconcile by looking
//! the name up.

mod client;
mod credentials;
mod error;
mod joined;
mod nonce;
mod ratelimit;
mod reply;
mod sent;
mod sign;
mod types;

pub use client::{Client, ClientConfig, ClientStats, CreateSource, DEFAULT_BASE_URL};
pub use credentials::{API_ID_LEN, API_KEY_LEN, Credentials, CredentialsError};
pub use error::ApiError;
pub use nonce::{DEFAULT_MAX_AHEAD as DEFAULT_NONCE_MAX_AHEAD, NonceMode};
pub use sent::last_sent;
#[cfg(test)]
pub(crate) use sent::mark as mark_sent;
pub use sign::signature;
pub use types::{Image, REGIONS, Readiness, Snapshot, SnapshotVolume, Vm, Volume, html_unescape};
