//! Prometheus metrics: per-RPC counts, latencies and in-flight operations; Luna Node API
//! requests by action and result, their latencies, retries and throttles; waits for the
//! cloud and how long its transitions usually take; volumes attached to each VM as the cloud
//! last showed them; the node's volume limit and the disks it refused to format; process
//! metrics. docs/monitoring.md lists them all, with the alerts and the dashboard built on
//! them.
//!
//! There is no global registry: `serve` makes one [`Metrics`] and hands an `Arc` of it to
//! the services and the API client, so tests in one process can run many servers, each
//! with its own numbers. Where no `Metrics` was handed over the hooks do nothing.
//!
//! Label values are bounded sets (method, gRPC code, action, result, kind, reason) and VM
//! IDs (`node_id`: as many as the account has VMs): never volume IDs, names or anything
//! else from a request, which would be unbounded and may be sensitive.

mod attached;
mod http;
mod process;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::lunanode::{ApiError, Volume};

pub use http::{CONTENT_TYPE, router, serve};

/// RPC latency buckets, in seconds: from a 1 ms answer (Identity, idempotent no-ops) to the
/// 5 minutes an attach or a restore may wait for the cloud.
const RPC_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// API request latency buckets, in seconds (one HTTP request, up to its 30 s timeout).
const API_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Wait buckets, in seconds: cloud transitions take from a fraction of a second to minutes.
const WAIT_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// Polls per wait (each one API call).
const POLL_BUCKETS: &[f64] = &[
    1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0,
];

fn wait_histogram() -> Histogram {
    Histogram::new(WAIT_BUCKETS.iter().copied())
}

fn poll_histogram() -> Histogram {
    Histogram::new(POLL_BUCKETS.iter().copied())
}

fn rpc_histogram() -> Histogram {
    Histogram::new(RPC_BUCKETS.iter().copied())
}

fn api_histogram() -> Histogram {
    Histogram::new(API_BUCKETS.iter().copied())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodCode {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionResult {
    action: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Action {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindResult {
    kind: &'static str,
    result: &'static str,
    /// `started`: the call made the change it waits for (what the learned schedule learns
    /// from); `joined`: it found the change under way or done (a retried RPC, a restore's
    /// check of its source snapshot), often a single poll.
    transition: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeId {
    node_id: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// `reason` of `csi_node_format_refusals_total`: the probe did not positively report the
/// disk blank (a partition table, an unknown signature, data without a signature, an
/// unfinished mkfs that is not this node's).
pub const REFUSED_NOT_BLANK: &str = "not_blank";
/// `reason` of `csi_node_format_refusals_total`: the disk holds a filesystem of another type
/// than the one requested.
pub const REFUSED_FOREIGN_FILESYSTEM: &str = "foreign_filesystem";

/// The driver's metrics and the registry that exposes them.
pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<MethodCode, Counter>,
    rpc_duration: HistogramFamily<Method>,
    rpc_in_flight: Family<Method, Gauge>,
    api_requests: Family<ActionResult, Counter>,
    api_duration: HistogramFamily<Action>,
    api_retries: Family<Action, Counter>,
    api_throttled: Family<Action, Counter>,
    wait_duration: HistogramFamily<KindResult>,
    wait_polls: HistogramFamily<KindResult>,
    transition_typical: Family<Kind, Gauge<f64, AtomicU64>>,
    format_refusals: Family<Reason, Counter>,
    node_max_volumes: Family<NodeId, Gauge>,
    attached: Arc<attached::Attachments>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A new registry with every metric of the driver and the process collector.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let rpc_requests = Family::<MethodCode, Counter>::default();
        let rpc_duration = HistogramFamily::<Method>::new_with_constructor(rpc_histogram);
        let rpc_in_flight = Family::<Method, Gauge>::default();
        let api_requests = Family::<ActionResult, Counter>::default();
        let api_duration = HistogramFamily::<Action>::new_with_constructor(api_histogram);
        let api_retries = Family::<Action, Counter>::default();
        let api_throttled = Family::<Action, Counter>::default();
        let wait_duration = HistogramFamily::<KindResult>::new_with_constructor(wait_histogram);
        let wait_polls = HistogramFamily::<KindResult>::new_with_constructor(poll_histogram);
        let transition_typical = Family::<Kind, Gauge<f64, AtomicU64>>::default();
        let format_refusals = Family::<Reason, Counter>::default();
        let node_max_volumes = Family::<NodeId, Gauge>::default();
        let attached = Arc::new(attached::Attachments::default());
        registry.register(
            "csi_rpc_requests",
            "CSI RPCs answered, by method and gRPC code",
            rpc_requests.clone(),
        );
        registry.register(
            "csi_rpc_duration_seconds",
            "Time to answer a CSI RPC, by method",
            rpc_duration.clone(),
        );
        registry.register(
            "csi_operations_in_flight",
            "CSI RPCs being worked on now, by method",
            rpc_in_flight.clone(),
        );
        registry.register(
            "lunanode_api_requests",
            "Luna Node API requests sent (each attempt), by action and result",
            api_requests.clone(),
        );
        registry.register(
            "lunanode_api_request_duration_seconds",
            "Time of one Luna Node API request (including the rate-limit wait), by action",
            api_duration.clone(),
        );
        registry.register(
            "lunanode_api_retries",
            "Luna Node API requests repeated after a retryable failure, by action",
            api_retries.clone(),
        );
        registry.register(
            "lunanode_api_throttled",
            "Luna Node API requests refused by the cloud's rate limit, by action",
            api_throttled.clone(),
        );
        registry.register(
            "csi_wait_duration_seconds",
            "Time the controller waited for a cloud transition, by kind (create, attach, …), result (ready, failed, timeout) and whether the call started the transition or joined it",
            wait_duration.clone(),
        );
        registry.register(
            "csi_wait_polls",
            "Status checks (API calls) one wait for a cloud transition made, by kind, result and whether the call started the transition or joined it",
            wait_polls.clone(),
        );
        registry.register(
            "lunanode_transition_typical_seconds",
            "What a cloud transition of this kind usually takes, as the controller has seen it: the median of the last 64 it started (each between the check that saw it pending and the one that saw it done); absent until 3 were seen",
            transition_typical.clone(),
        );
        registry.register(
            "csi_node_format_refusals",
            "Disks NodeStageVolume refused to format because they are not provably blank, by reason (not_blank, foreign_filesystem)",
            format_refusals.clone(),
        );
        registry.register(
            "csi_node_max_volumes",
            "Volumes this node can have attached (max_volumes_per_node, as reported to Kubernetes), by node_id (the node's VM ID)",
            node_max_volumes.clone(),
        );
        registry.register_collector(Box::new(attached.clone()));
        registry.register_collector(Box::new(process::ProcessCollector));
        Metrics {
            registry,
            rpc_requests,
            rpc_duration,
            rpc_in_flight,
            api_requests,
            api_duration,
            api_retries,
            api_throttled,
            wait_duration,
            wait_polls,
            transition_typical,
            format_refusals,
            node_max_volumes,
            attached,
        }
    }

    /// Everything, in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// An RPC started: counted in flight until the returned guard is finished or dropped
    /// (a dropped guard is a cancelled call).
    pub fn rpc_started(&self, method: &'static str) -> RpcGuard<'_> {
        self.rpc_in_flight.get_or_create(&Method { method }).inc();
        RpcGuard {
            metrics: self,
            method,
            started: std::time::Instant::now(),
            done: false,
        }
    }

    /// One API request attempt ended.
    pub fn api_attempt<T>(
        &self,
        action: &'static str,
        result: &Result<T, ApiError>,
        elapsed: Duration,
    ) {
        let result = match result {
            Ok(_) => "ok",
            Err(e) => api_result(e),
        };
        self.api_requests
            .get_or_create(&ActionResult { action, result })
            .inc();
        self.api_duration
            .get_or_create(&Action { action })
            .observe(elapsed.as_secs_f64());
        if result == "throttled" {
            self.api_throttled.get_or_create(&Action { action }).inc();
        }
    }

    /// A wait for a cloud transition started. Its `timeout` series is made now, at 0, so
    /// that a rule sees the first wait that gives up as an increase (a series that appears
    /// with its first count does not show one).
    pub fn wait_started(&self, kind: &'static str, started: bool) {
        let transition = if started { "started" } else { "joined" };
        let labels = KindResult {
            kind,
            result: "timeout",
            transition,
        };
        let _ = self.wait_duration.get_or_create(&labels);
    }

    /// A wait for a cloud transition ended.
    pub fn wait_finished(
        &self,
        kind: &'static str,
        result: &'static str,
        started: bool,
        took: Duration,
        polls: u32,
    ) {
        let transition = if started { "started" } else { "joined" };
        let labels = KindResult {
            kind,
            result,
            transition,
        };
        self.wait_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.wait_polls
            .get_or_create(&labels)
            .observe(f64::from(polls));
    }

    /// An API request is about to be repeated.
    pub fn api_retry(&self, action: &'static str) {
        self.api_retries.get_or_create(&Action { action }).inc();
    }

    /// What transitions of `kind` usually take now, in seconds.
    pub fn transition_typical(&self, kind: &'static str, seconds: f64) {
        self.transition_typical
            .get_or_create(&Kind { kind })
            .set(seconds);
    }

    /// A Node service started on `node_id` with room for `max_volumes`. Its refusal
    /// counters start at 0, so that the first refusal is an increase a rule can see.
    pub fn node_started(&self, node_id: &str, max_volumes: i64) {
        self.node_max_volumes
            .get_or_create(&NodeId {
                node_id: node_id.to_string(),
            })
            .set(max_volumes);
        for reason in [REFUSED_NOT_BLANK, REFUSED_FOREIGN_FILESYSTEM] {
            let _ = self.format_refusals.get_or_create(&Reason { reason });
        }
    }

    /// NodeStageVolume refused to format a disk that is not provably blank.
    pub fn format_refused(&self, reason: &'static str) {
        self.format_refusals.get_or_create(&Reason { reason }).inc();
    }

    /// The cloud listed these volumes; `complete`: every volume of the account (a
    /// `volume/list` without a region), so volumes missing from it are gone.
    pub fn volumes_listed(&self, volumes: &[Volume], complete: bool) {
        self.attached.listed(volumes, complete);
    }

    /// The cloud described one volume (`volume/info`).
    pub fn volume_seen(&self, volume: &Volume) {
        self.attached.seen(volume);
    }

    /// A volume was deleted.
    pub fn volume_deleted(&self, volume_id: u64) {
        self.attached.deleted(volume_id);
    }
}

/// The `result` label of a failed API request.
fn api_result(e: &ApiError) -> &'static str {
    match e {
        ApiError::NotFound { .. } => "not_found",
        ApiError::InvalidArgument { .. } => "invalid_argument",
        ApiError::WrongState { .. } => "wrong_state",
        ApiError::LimitExceeded { .. } => "limit_exceeded",
        ApiError::Throttled { .. } => "throttled",
        ApiError::Transient { .. } => "transient",
        ApiError::Auth { .. } => "auth",
        ApiError::Signature { .. } => "signature",
        ApiError::Other { .. } => "other",
    }
}

/// Keeps an RPC counted as in flight; records its code and duration when finished.
pub struct RpcGuard<'a> {
    metrics: &'a Metrics,
    method: &'static str,
    started: std::time::Instant,
    done: bool,
}

impl RpcGuard<'_> {
    /// The RPC answered with `code`.
    pub fn finish(mut self, code: tonic::Code) {
        self.record(code_name(code));
    }

    fn record(&mut self, code: &'static str) {
        self.done = true;
        let m = self.metrics;
        let method = self.method;
        m.rpc_in_flight.get_or_create(&Method { method }).dec();
        m.rpc_requests
            .get_or_create(&MethodCode { method, code })
            .inc();
        m.rpc_duration
            .get_or_create(&Method { method })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for RpcGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            // The client went away (or the deadline passed) before the handler finished.
            self.record("Cancelled");
        }
    }
}

/// The gRPC code's name as the CSI spec and grpc-go spell it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn records_rpcs_api_requests_and_process() {
        let m = Metrics::new();
        m.rpc_started("CreateVolume").finish(tonic::Code::Ok);
        m.rpc_started("CreateVolume")
            .finish(tonic::Code::InvalidArgument);
        let pending = m.rpc_started("DeleteVolume");
        let text = m.encode();
        assert!(
            line(
                &text,
                r#"csi_operations_in_flight{method="DeleteVolume"} 1"#
            )
            .is_some(),
            "{text}"
        );
        drop(pending);
        m.api_attempt::<()>("volume/list", &Ok(()), Duration::from_millis(3));
        let throttled: Result<(), _> = Err(ApiError::Throttled {
            action: "volume/info".into(),
            message: "rate limit exceeded".into(),
        });
        m.api_attempt("volume/info", &throttled, Duration::from_millis(1));
        m.api_retry("volume/info");
        m.wait_finished("attach", "ready", true, Duration::from_millis(2500), 3);
        m.wait_finished("snapshot", "ready", false, Duration::ZERO, 1);

        let text = m.encode();
        for want in [
            r#"csi_rpc_requests_total{method="CreateVolume",code="OK"} 1"#,
            r#"csi_rpc_requests_total{method="CreateVolume",code="InvalidArgument"} 1"#,
            r#"csi_rpc_requests_total{method="DeleteVolume",code="Cancelled"} 1"#,
            r#"csi_rpc_duration_seconds_count{method="CreateVolume"} 2"#,
            r#"csi_rpc_duration_seconds_bucket{method="CreateVolume",le="300"} 2"#,
            r#"csi_operations_in_flight{method="DeleteVolume"} 0"#,
            r#"lunanode_api_requests_total{action="volume/list",result="ok"} 1"#,
            r#"lunanode_api_requests_total{action="volume/info",result="throttled"} 1"#,
            r#"lunanode_api_throttled_total{action="volume/info"} 1"#,
            r#"lunanode_api_retries_total{action="volume/info"} 1"#,
            r#"lunanode_api_request_duration_seconds_count{action="volume/list"} 1"#,
            r#"csi_wait_duration_seconds_bucket{kind="attach",result="ready",transition="started",le="3"} 1"#,
            r#"csi_wait_duration_seconds_bucket{kind="attach",result="ready",transition="started",le="2"} 0"#,
            r#"csi_wait_polls_sum{kind="attach",result="ready",transition="started"} 3.0"#,
            r#"csi_wait_polls_count{kind="attach",result="ready",transition="started"} 1"#,
            r#"csi_wait_polls_count{kind="snapshot",result="ready",transition="joined"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want} in\n{text}");
        }
        for name in [
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(line(&text, name).is_some(), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn records_transitions_nodes_refusals_and_attachments() {
        let m = Metrics::new();
        let text = m.encode();
        // Nothing is said before it is known.
        for absent in [
            "lunanode_transition_typical_seconds{",
            "csi_node_max_volumes{",
            "csi_node_format_refusals_total{",
            "lunanode_vm_volumes_attached{",
        ] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
        m.transition_typical("attach", 2.5);
        m.node_started("vm-1", 15);
        m.wait_started("detach", true);
        let text = m.encode();
        for want in [
            r#"lunanode_transition_typical_seconds{kind="attach"} 2.5"#,
            // A wait under way: the series its timeout would count is there, at 0.
            r#"csi_wait_duration_seconds_count{kind="detach",result="timeout",transition="started"} 0"#,
            r#"csi_node_max_volumes{node_id="vm-1"} 15"#,
            // Both reasons start at 0, so the first refusal is an increase.
            r#"csi_node_format_refusals_total{reason="not_blank"} 0"#,
            r#"csi_node_format_refusals_total{reason="foreign_filesystem"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want} in\n{text}");
        }
        m.format_refused(REFUSED_FOREIGN_FILESYSTEM);
        let attached = |id, vm: &str| Volume {
            id,
            identification: String::new(),
            name: String::new(),
            region: "toronto".into(),
            size: 1,
            status: "in-use".into(),
            attached: vm.into(),
            created: String::new(),
            time_created: String::new(),
        };
        m.volumes_listed(&[attached(1, "vm-1")], true);
        m.volume_seen(&attached(2, "vm-1"));
        m.volume_deleted(1);
        m.volume_seen(&attached(3, "vm-2"));
        let text = m.encode();
        for want in [
            r#"csi_node_format_refusals_total{reason="foreign_filesystem"} 1"#,
            r#"csi_node_format_refusals_total{reason="not_blank"} 0"#,
            r#"lunanode_vm_volumes_attached{node_id="vm-1"} 1"#,
            r#"lunanode_vm_volumes_attached{node_id="vm-2"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want} in\n{text}");
        }
    }

    #[test]
    fn every_code_has_a_name() {
        for c in 0..17 {
            let code = tonic::Code::from_i32(c);
            assert_eq!(
                code_name(code).to_ascii_lowercase(),
                format!("{code:?}").to_ascii_lowercase()
            );
        }
    }
}
