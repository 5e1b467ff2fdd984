//! What the subcommands share: the failure type whose kind picks the exit code, and the
//! settings that reach the Luna Node API (`serve` and the operator commands take the same
//! flags, so a setting means the same thing everywhere).
//!
//! It sits below [`crate::cli`], [`crate::demo`] and [`crate::ops`] and imports none of them,
//! so the command-line parser depends on the commands and never the other way round.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::lunanode::{Client, ClientConfig, Credentials};

/// The client-side API rate limit against the real cloud, requests per second.
pub const DEFAULT_QPS: f64 = 10.0;

/// A command's failure: configuration errors exit 2 (nothing was started), runtime
/// errors exit 1.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Runtime(String),
    /// A failure the command has already reported in its own output: exit 1, print nothing.
    #[error("failed (reported above)")]
    Reported,
}

/// How to reach the Luna Node API (shared by `serve` and the operator commands).
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Luna Node API base URL.
    #[arg(long, env = "LUNANODE_API_URL", default_value = crate::lunanode::DEFAULT_BASE_URL)]
    pub api_url: String,
    /// File holding the API ID (e.g. a mounted Secret); else LUNANODE_API_ID.
    #[arg(long, env = "LUNANODE_API_ID_FILE")]
    pub api_id_file: Option<PathBuf>,
    /// File holding the API key (e.g. a mounted Secret); else LUNANODE_API_KEY.
    #[arg(long, env = "LUNANODE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Client-side rate limit for API requests, per second; 0 = off
    /// [default: 10, or off with --sim, whose simulator has no limit unless asked]
    #[arg(long, env = "LUNANODE_API_QPS")]
    pub qps: Option<f64>,
    /// Requests allowed in a burst above the rate limit.
    #[arg(long, env = "LUNANODE_API_BURST", default_value_t = 20)]
    pub burst: u32,
    /// API requests on the wire at once (0 = no bound); bounds connections and memory when
    /// many RPCs arrive together.
    #[arg(long, env = "LUNANODE_API_MAX_IN_FLIGHT", default_value_t = 16)]
    pub api_max_in_flight: usize,
    /// Timeout of one API request, in seconds.
    #[arg(long, env = "LUNANODE_API_TIMEOUT_SECS", default_value_t = 30)]
    pub api_timeout_secs: u64,
    /// Request nonces: `clock` sends the current Unix second, as Luna Node's own clients do
    /// (requests within a second share it); `increasing` makes each one larger than the
    /// last, at most 2 s ahead of the clock, waiting for the clock at that bound (so about
    /// one request per second when sustained). Only for a cloud that refuses repeated nonces.
    #[arg(long, env = "LUNANODE_API_NONCE", value_enum, default_value = "clock")]
    pub api_nonce: crate::lunanode::NonceMode,
}

impl ApiArgs {
    /// The credentials in the environment or the files named by the flags.
    pub fn credentials(&self) -> Result<Credentials, CommandError> {
        Credentials::load(
            self.api_id_file.as_deref(),
            self.api_key_file.as_deref(),
            std::env::var("LUNANODE_API_ID").ok().as_deref(),
            std::env::var("LUNANODE_API_KEY").ok().as_deref(),
        )
        .map_err(|e| CommandError::Config(e.to_string()))
    }

    /// Whether any credentials were offered at all (a flag or a variable), valid or not.
    pub fn credentials_offered(&self) -> bool {
        self.api_id_file.is_some()
            || self.api_key_file.is_some()
            || std::env::var_os("LUNANODE_API_ID").is_some()
            || std::env::var_os("LUNANODE_API_KEY").is_some()
    }

    /// Build a client from these settings and the credentials in the environment or files.
    pub fn client(&self) -> Result<Client, CommandError> {
        self.client_with(self.credentials()?, &self.api_url, DEFAULT_QPS)
    }

    /// Build a client for `url` with `creds`; `default_qps` applies when `--qps` is unset.
    pub fn client_with(
        &self,
        creds: Credentials,
        url: &str,
        default_qps: f64,
    ) -> Result<Client, CommandError> {
        let mut cfg = ClientConfig::new(url, creds);
        cfg.qps = self.qps.unwrap_or(default_qps);
        cfg.burst = self.burst;
        cfg.max_in_flight = self.api_max_in_flight;
        cfg.request_timeout = Duration::from_secs(self.api_timeout_secs.max(1));
        cfg.nonce = self.api_nonce;
        Client::new(cfg).map_err(|e| CommandError::Config(e.to_string()))
    }
}
