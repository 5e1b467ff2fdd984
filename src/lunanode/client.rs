//! The HTTP client: signing, nonces, rate limiting, retries, and one typed method per action.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Url;
use serde::de::DeserializeOwned;

use super::credentials::Credentials;
use super::error::ApiError;
use super::joined::Joined;
use super::nonce::{DEFAULT_MAX_AHEAD, NonceMode, Nonces};
use super::ratelimit::RateLimiter;
use super::reply::{self, List};
use super::sent;
use super::sign::signature;
use super::types::{Image, Snapshot, Vm, Volume};
use crate::metrics::Metrics;

/// The real API's base URL.
pub const DEFAULT_BASE_URL: &str = "https://dynamic.lunanode.com/api/";

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL ending in `/api/`; a missing trailing slash is added.
    pub base_url: String,
    pub credentials: Credentials,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Client-side rate limit shared by all callers; `<= 0` disables it.
    pub qps: f64,
    pub burst: u32,
    /// Requests on the wire at once, shared by all callers; 0 = no bound. Each one holds an
    /// HTTP connection and its buffers, so this bounds the driver's memory under a burst of
    /// RPCs as well as the load it puts on the cloud.
    pub max_in_flight: usize,
    /// Retries after the first attempt, for actions safe to repeat.
    pub max_retries: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How each request's nonce is chosen (see `nonce.rs`): the clock's second by default.
    pub nonce: NonceMode,
    /// How far ahead of the clock [`NonceMode::Increasing`] may run (whole seconds).
    pub nonce_max_ahead: Duration,
    /// The regions listed one by one when the account turns out to be on the API's old rules
    /// (`volume/list` then needs a `region`).
    pub regions: Vec<String>,
}

impl ClientConfig {
    /// Defaults suited to the real cloud.
    pub fn new(base_url: impl Into<String>, credentials: Credentials) -> Self {
        Self {
            base_url: base_url.into(),
            credentials,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            qps: 10.0,
            burst: 20,
            max_in_flight: 16,
            max_retries: 4,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            nonce: NonceMode::Clock,
            nonce_max_ahead: DEFAULT_MAX_AHEAD,
            regions: super::types::REGIONS
                .iter()
                .map(|r| r.to_string())
                .collect(),
        }
    }
}

/// Whether a failed call may be sent again as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Reads, and changes that cannot create anything (attach, detach, extend, delete…):
    /// a repeat after a lost reply at worst reports a state the caller reconciles.
    Safe,
    /// Creates: a repeat after a lost reply would make a second object. The caller looks
    /// the name up instead.
    Never,
}

/// Counts of what the client sent, for tests, benchmarks and metrics.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub throttled: AtomicU64,
}

/// An action's parameters, in the order they are sent (every value a string).
type Params = Vec<(&'static str, String)>;

struct Inner {
    http: reqwest::Client,
    cfg: ClientConfig,
    /// Each handler's URL, parsed once (parsing a URL per request showed in profiles).
    urls: Mutex<Vec<(&'static str, Url)>>,
    nonces: Nonces,
    limiter: RateLimiter,
    /// `None` when `max_in_flight` is 0.
    in_flight: Option<tokio::sync::Semaphore>,
    stats: ClientStats,
    /// Shared `volume/list` (every region), `volume/snapshot-list` and `image/list` (by
    /// region) calls.
    volumes: Joined<(), Vec<Volume>>,
    snapshots: Joined<String, Vec<Snapshot>>,
    images: Joined<String, Vec<Image>>,
    /// The account answered `region not set` to a volume call without `region`: it is on the
    /// API's rules from before 2018, and every volume call carries `region` from then on.
    old_rules: AtomicBool,
    /// Each volume's region, as lists and creates showed it (needed only on the old rules).
    regions_of: Mutex<HashMap<u64, String>>,
}

/// A Luna Node API client. Cheap to clone; clones share nonces, rate limit and counters.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// Where each request is recorded, when metrics are on.
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.inner.cfg.base_url)
            .field("credentials", &self.inner.cfg.credentials)
            .finish()
    }
}

impl Client {
    /// Build a client (HTTPS through rustls; no OpenSSL).
    pub fn new(mut cfg: ClientConfig) -> Result<Self, ApiError> {
        if !cfg.base_url.ends_with('/') {
            cfg.base_url.push('/');
        }
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.request_timeout)
            .user_agent(concat!("lunanode-csi/", env!("CARGO_PKG_VERSION")))
            // reqwest's default, stated because latency depends on it: no Nagle delay on
            // small requests (connections are kept alive and reused by default too).
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ApiError::Other {
                action: "client".into(),
                message: format!("cannot build HTTP client: {e}"),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                limiter: RateLimiter::new(cfg.qps, cfg.burst),
                in_flight: (cfg.max_in_flight > 0)
                    .then(|| tokio::sync::Semaphore::new(cfg.max_in_flight)),
                nonces: Nonces::new(cfg.nonce, cfg.nonce_max_ahead),
                cfg,
                urls: Mutex::new(Vec::new()),
                stats: ClientStats::default(),
                volumes: Joined::default(),
                snapshots: Joined::default(),
                images: Joined::default(),
                old_rules: AtomicBool::new(false),
                regions_of: Mutex::new(HashMap::new()),
            }),
            metrics: None,
        })
    }

    /// This client, recording every request in `metrics` (clones made from it do too).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// What this client has sent so far.
    pub fn stats(&self) -> &ClientStats {
        &self.inner.stats
    }

    /// The URL of `handler`, parsed on first use. `None` when the base URL does not parse:
    /// the request is then built from the string, and fails as it always did.
    fn url(&self, handler: &'static str) -> Option<Url> {
        let mut urls = self.inner.urls.lock().expect("url cache lock");
        if let Some((_, u)) = urls.iter().find(|(h, _)| *h == handler) {
            return Some(u.clone());
        }
        let u = Url::parse(&format!("{}{}", self.inner.cfg.base_url, handler)).ok()?;
        urls.push((handler, u.clone()));
        Some(u)
    }

    /// One attempt: sign, send, and check the reply's status and `success`. Returns the
    /// body of a successful reply for the caller to read its payload from.
    async fn call_once(
        &self,
        handler: &'static str,
        params: &[(&'static str, String)],
    ) -> Result<bytes::Bytes, ApiError> {
        let inner = &self.inner;
        // A slot on the wire first: a rate-limit token taken before it would be wasted waiting.
        let _slot = match &inner.in_flight {
            Some(s) => Some(s.acquire().await.expect("the semaphore is never closed")),
            None => None,
        };
        // Then the rate limit, so nonces are taken in the order requests leave.
        inner.limiter.acquire().await;
        let creds = &inner.cfg.credentials;
        let req = request_json(creds.api_id(), creds.partial_key(), params);
        let nonce = inner.nonces.next().await.to_string();
        let sig = signature(creds.api_key(), handler, &req, &nonce);
        let action = handler.trim_end_matches('/');
        let transient = |message: String| ApiError::Transient {
            action: action.to_string(),
            message,
        };

        inner.stats.requests.fetch_add(1, Ordering::Relaxed);
        sent::mark(tokio::time::Instant::now());
        let builder = match self.url(handler) {
            Some(url) => inner.http.post(url),
            None => inner
                .http
                .post(format!("{}{}", inner.cfg.base_url, handler)),
        };
        let body = form(&[
            ("req", &req),
            ("signature", &sig),
            ("nonce", &nonce),
            ("handler", handler),
        ]);
        let resp = builder
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| {
                // reqwest's Display includes the URL, never the form body.
                let what = if e.is_timeout() {
                    "request timed out"
                } else if e.is_connect() {
                    "cannot connect"
                } else {
                    "request failed"
                };
                transient(format!("{what}: {}", without_url(&e)))
            })?;
        let status = resp.status();
        let server_date = resp
            .headers()
            .get(http::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok());
        let body = resp
            .bytes()
            .await
            .map_err(|e| transient(format!("reading the response failed: {}", without_url(&e))))?;
        let mut checked = reply::check(action, status, &body);
        if let Err(ApiError::Signature { clock_skew, .. }) = &mut checked {
            *clock_skew = server_date.map(skew_from);
        }
        if matches!(checked, Err(ApiError::Throttled { .. })) {
            inner.stats.throttled.fetch_add(1, Ordering::Relaxed);
        }
        checked.map(|()| body)
    }

    async fn call(
        &self,
        handler: &'static str,
        params: Params,
        repeat: Repeat,
    ) -> Result<bytes::Bytes, ApiError> {
        let cfg = &self.inner.cfg;
        let action = handler.trim_end_matches('/');
        let mut backoff = cfg.initial_backoff;
        let mut attempt = 0;
        loop {
            let started = std::time::Instant::now();
            let result = self.call_once(handler, &params).await;
            let elapsed = started.elapsed();
            tracing::debug!(
                action,
                attempt,
                ok = result.is_ok(),
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                "luna node api call"
            );
            if let Some(m) = &self.metrics {
                m.api_attempt(action, &result, elapsed);
            }
            match result {
                Err(e)
                    if e.is_retryable() && repeat == Repeat::Safe && attempt < cfg.max_retries =>
                {
                    attempt += 1;
                    self.inner.stats.retries.fetch_add(1, Ordering::Relaxed);
                    if let Some(m) = &self.metrics {
                        m.api_retry(action);
                    }
                    // Full jitter keeps many drivers from retrying in lockstep.
                    let sleep = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
                    tracing::debug!(action = handler, error = %e, retry_in_ms = sleep.as_millis() as u64, "retrying");
                    tokio::time::sleep(sleep).await;
                    backoff = (backoff * 2).min(cfg.max_backoff);
                }
                other => return other,
            }
        }
    }

    /// Call, and read the payload under `field` of the reply.
    async fn call_as<T: DeserializeOwned>(
        &self,
        handler: &'static str,
        params: Params,
        repeat: Repeat,
        field: &str,
    ) -> Result<T, ApiError> {
        let body = self.call(handler, params, repeat).await?;
        reply::field(handler.trim_end_matches('/'), &body, field)
    }

    // ---- volume actions -------------------------------------------------------------

    /// `volume/create`: never repeated automatically; after an unclear failure, look the
    /// label up before trying again.
    pub async fn volume_create(
        &self,
        region: &str,
        label: &str,
        size_gb: u64,
        source: Option<CreateSource<'_>>,
    ) -> Result<u64, ApiError> {
        let mut p = params([
            ("region", region.to_string()),
            ("label", label.to_string()),
            ("size", size_gb.to_string()),
        ]);
        match source {
            Some(CreateSource::Snapshot(id)) => p.push(("snapshot_id", id.to_string())),
            Some(CreateSource::Image(id)) => p.push(("image", id.to_string())),
            None => {}
        }
        let id: IdOnly = self
            .call_as_root("volume/create/", p, Repeat::Never)
            .await?;
        if self.old_rules() {
            self.remember_region(id.volume_id, region);
        }
        Ok(id.volume_id)
    }

    /// `volume/list`, optionally for one region. Without one, on an account on the old rules
    /// (see [`Self::old_rules`]), every region of [`ClientConfig::regions`] is listed in turn.
    pub async fn volume_list(&self, region: Option<&str>) -> Result<Vec<Volume>, ApiError> {
        let vols = match region {
            Some(r) => self.volume_list_in(Some(r)).await,
            None if self.old_rules() => self.volume_list_each_region().await,
            None => match self.volume_list_in(None).await {
                Err(e) if says_region_not_set(&e) => {
                    self.learn_old_rules("volume/list");
                    self.volume_list_each_region().await
                }
                other => other,
            },
        }?;
        if let Some(m) = &self.metrics {
            m.volumes_listed(&vols, region.is_none());
        }
        Ok(vols)
    }

    async fn volume_list_in(&self, region: Option<&str>) -> Result<Vec<Volume>, ApiError> {
        let p = region
            .map(|r| params([("region", r.to_string())]))
            .unwrap_or_default();
        let List(mut vols): List<Volume> = self
            .call_as("volume/list/", p, Repeat::Safe, "volumes")
            .await?;
        if let Some(r) = region {
            for v in vols.iter_mut().filter(|v| v.region.is_empty()) {
                v.region = r.to_string();
            }
        }
        if self.old_rules() {
            for v in vols.iter().filter(|v| !v.region.is_empty()) {
                self.remember_region(v.id, &v.region);
            }
        }
        Ok(vols)
    }

    async fn volume_list_each_region(&self) -> Result<Vec<Volume>, ApiError> {
        let mut all = Vec::new();
        for r in &self.inner.cfg.regions {
            all.extend(self.volume_list_in(Some(r)).await?);
        }
        Ok(all)
    }

    /// Whether the account answered `region not set` to a volume call sent as the reference
    /// says (without `region`): it is on the API's rules from before 2018, and every volume
    /// call has carried the volume's region since.
    pub fn old_rules(&self) -> bool {
        self.inner.old_rules.load(Ordering::Relaxed)
    }

    fn learn_old_rules(&self, action: &str) {
        if !self.inner.old_rules.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                action,
                "the Luna Node API answered `region not set` to {action} sent without a region, as the current API reference has it: this account is on the API's pre-2018 rules, so every volume call now carries the volume's region"
            );
        }
    }

    fn remember_region(&self, volume_id: u64, region: &str) {
        let mut known = self.inner.regions_of.lock().expect("region cache lock");
        if known.get(&volume_id).map(String::as_str) != Some(region) {
            known.insert(volume_id, region.to_string());
        }
    }

    /// A volume's region, for the old rules: as a list or create showed it, else found by
    /// listing each region.
    async fn region_of(&self, volume_id: u64) -> Result<String, ApiError> {
        let known = |c: &Self| {
            c.inner
                .regions_of
                .lock()
                .expect("region cache lock")
                .get(&volume_id)
                .cloned()
        };
        if let Some(r) = known(self) {
            return Ok(r);
        }
        self.volume_list_each_region().await?;
        known(self).ok_or_else(|| ApiError::NotFound {
            action: "volume/list".into(),
            message: format!(
                "volume {volume_id} is in none of the regions {}",
                self.inner.cfg.regions.join(", ")
            ),
        })
    }

    /// A call on one volume: sent as the current reference says, without `region`; on an
    /// account that answers `region not set`, sent once more with the volume's region, and
    /// with it from then on. A refusal made nothing, so even a create-like call may be sent
    /// again.
    async fn call_on_volume(
        &self,
        handler: &'static str,
        volume_id: u64,
        mut p: Params,
        repeat: Repeat,
    ) -> Result<bytes::Bytes, ApiError> {
        if !self.old_rules() {
            match self.call(handler, p.clone(), repeat).await {
                Err(e) if says_region_not_set(&e) => {
                    self.learn_old_rules(handler.trim_end_matches('/'));
                }
                other => return other,
            }
        }
        p.push(("region", self.region_of(volume_id).await?));
        self.call(handler, p, repeat).await
    }

    /// `volume/list` for every region, shared: a caller joins the next list call that has
    /// not been sent yet instead of sending its own. A list already on the wire is never
    /// joined, because it may predate a change the caller needs to see.
    pub async fn volume_list_shared(&self) -> Result<Arc<Vec<Volume>>, ApiError> {
        let this = self.clone();
        let list = || async move { this.volume_list(None).await };
        self.inner.volumes.call(&(), list).await
    }

    /// `volume/info`.
    pub async fn volume_info(&self, volume_id: u64) -> Result<Volume, ApiError> {
        let body = self
            .call_on_volume(
                "volume/info/",
                volume_id,
                params([("volume_id", volume_id.to_string())]),
                Repeat::Safe,
            )
            .await?;
        let vol: Volume = reply::field("volume/info", &body, "volume")?;
        if let Some(m) = &self.metrics {
            m.volume_seen(&vol);
        }
        Ok(vol)
    }

    /// `volume/attach` with the given target: the bus, `/dev/vda` for virtio (see
    /// `shared/lunanode-api.md`: `auto` is undocumented and may give an IDE disk).
    pub async fn volume_attach(
        &self,
        volume_id: u64,
        vm_id: &str,
        target: &str,
    ) -> Result<(), ApiError> {
        let p = params([
            ("volume_id", volume_id.to_string()),
            ("vm_id", vm_id.to_string()),
            ("target", target.to_string()),
        ]);
        self.call_on_volume("volume/attach/", volume_id, p, Repeat::Safe)
            .await
            .map(drop)
    }

    /// `volume/detach`.
    pub async fn volume_detach(&self, volume_id: u64) -> Result<(), ApiError> {
        let p = params([("volume_id", volume_id.to_string())]);
        self.call_on_volume("volume/detach/", volume_id, p, Repeat::Safe)
            .await
            .map(drop)
    }

    /// `volume/extend` (detached volumes only).
    pub async fn volume_extend(&self, volume_id: u64, size_gb: u64) -> Result<(), ApiError> {
        let p = params([
            ("volume_id", volume_id.to_string()),
            ("size", size_gb.to_string()),
        ]);
        self.call_on_volume("volume/extend/", volume_id, p, Repeat::Safe)
            .await
            .map(drop)
    }

    /// `volume/rename`.
    pub async fn volume_rename(&self, volume_id: u64, name: &str) -> Result<(), ApiError> {
        let p = params([
            ("volume_id", volume_id.to_string()),
            ("name", name.to_string()),
        ]);
        self.call("volume/rename/", p, Repeat::Safe).await.map(drop)
    }

    /// `volume/delete`.
    pub async fn volume_delete(&self, volume_id: u64) -> Result<(), ApiError> {
        let p = params([("volume_id", volume_id.to_string())]);
        self.call_on_volume("volume/delete/", volume_id, p, Repeat::Safe)
            .await?;
        self.inner
            .regions_of
            .lock()
            .expect("region cache lock")
            .remove(&volume_id);
        if let Some(m) = &self.metrics {
            m.volume_deleted(volume_id);
        }
        Ok(())
    }

    /// `volume/snapshot-create`: never repeated automatically.
    pub async fn snapshot_create(&self, volume_id: u64, label: &str) -> Result<String, ApiError> {
        let p = params([
            ("volume_id", volume_id.to_string()),
            ("label", label.to_string()),
        ]);
        let body = self
            .call_on_volume("volume/snapshot-create/", volume_id, p, Repeat::Never)
            .await?;
        let id: SnapshotIdOnly = reply::root("volume/snapshot-create", &body)?;
        Ok(id.snapshot_id)
    }

    /// `volume/snapshot-list` for one region. Items that leave their region out (some API
    /// shapes do) get `region`.
    pub async fn snapshot_list(&self, region: &str) -> Result<Vec<Snapshot>, ApiError> {
        let List(mut list): List<Snapshot> = self
            .call_as(
                "volume/snapshot-list/",
                params([("region", region.to_string())]),
                Repeat::Safe,
                "snapshots",
            )
            .await?;
        for s in list.iter_mut().filter(|s| s.region.is_empty()) {
            s.region = region.to_string();
        }
        Ok(list)
    }

    /// `volume/snapshot-list` for one region, shared like [`Self::volume_list_shared`].
    pub async fn snapshot_list_shared(&self, region: &str) -> Result<Arc<Vec<Snapshot>>, ApiError> {
        let (this, r) = (self.clone(), region.to_string());
        let list = || async move { this.snapshot_list(&r).await };
        self.inner.snapshots.call(&region.to_string(), list).await
    }

    /// `volume/snapshot-replicate`: makes an image in `dst_region`; never repeated
    /// automatically.
    pub async fn snapshot_replicate(
        &self,
        region: &str,
        snapshot_id: &str,
        image_name: &str,
        dst_region: &str,
    ) -> Result<u64, ApiError> {
        let p = params([
            ("region", region.to_string()),
            ("snapshot_id", snapshot_id.to_string()),
            ("image_name", image_name.to_string()),
            ("dst_region", dst_region.to_string()),
        ]);
        let id: ImageIdOnly = self
            .call_as_root("volume/snapshot-replicate/", p, Repeat::Never)
            .await?;
        Ok(id.image_id)
    }

    /// `volume/snapshot-delete`.
    pub async fn snapshot_delete(&self, region: &str, snapshot_id: &str) -> Result<(), ApiError> {
        let p = params([
            ("region", region.to_string()),
            ("snapshot_id", snapshot_id.to_string()),
        ]);
        self.call("volume/snapshot-delete/", p, Repeat::Safe)
            .await
            .map(drop)
    }

    // ---- VMs and images -------------------------------------------------------------

    /// `vm/list`.
    pub async fn vm_list(&self) -> Result<Vec<Vm>, ApiError> {
        let List(vms) = self
            .call_as("vm/list/", Vec::new(), Repeat::Safe, "vms")
            .await?;
        Ok(vms)
    }

    /// `vm/info`: the region and ID are in `extra`.
    pub async fn vm_info(&self, vm_id: &str) -> Result<Vm, ApiError> {
        self.call_as(
            "vm/info/",
            params([("vm_id", vm_id.to_string())]),
            Repeat::Safe,
            "extra",
        )
        .await
    }

    /// `image/list`, optionally for one region.
    pub async fn image_list(&self, region: Option<&str>) -> Result<Vec<Image>, ApiError> {
        let p = region
            .map(|r| params([("region", r.to_string())]))
            .unwrap_or_default();
        let List(images) = self
            .call_as("image/list/", p, Repeat::Safe, "images")
            .await?;
        Ok(images)
    }

    /// `image/list` for one region, shared like [`Self::volume_list_shared`].
    pub async fn image_list_shared(&self, region: &str) -> Result<Arc<Vec<Image>>, ApiError> {
        let (this, r) = (self.clone(), region.to_string());
        let list = || async move { this.image_list(Some(&r)).await };
        self.inner.images.call(&region.to_string(), list).await
    }

    /// `image/delete`. The cloud says yes even for an image that does not exist, so a yes
    /// proves only that no such image is left.
    pub async fn image_delete(&self, image_id: u64) -> Result<(), ApiError> {
        self.call(
            "image/delete/",
            params([("image_id", image_id.to_string())]),
            Repeat::Safe,
        )
        .await
        .map(drop)
    }

    /// Call, and read the payload from the top level of the reply.
    async fn call_as_root<T: DeserializeOwned>(
        &self,
        handler: &'static str,
        p: Params,
        repeat: Repeat,
    ) -> Result<T, ApiError> {
        let body = self.call(handler, p, repeat).await?;
        reply::root(handler.trim_end_matches('/'), &body)
    }
}

/// `region not set`: the answer of an account on the API's old rules to a volume call without
/// `region`.
fn says_region_not_set(e: &ApiError) -> bool {
    e.message().to_ascii_lowercase().contains("region not set")
}

/// What a new volume is filled from.
#[derive(Debug, Clone, Copy)]
pub enum CreateSource<'a> {
    /// A volume snapshot in the same region.
    Snapshot(&'a str),
    /// An image in the same region (e.g. one made by `snapshot-replicate`).
    Image(u64),
}

#[derive(serde::Deserialize)]
struct IdOnly {
    #[serde(deserialize_with = "de_id")]
    volume_id: u64,
}

#[derive(serde::Deserialize)]
struct ImageIdOnly {
    #[serde(deserialize_with = "de_id")]
    image_id: u64,
}

#[derive(serde::Deserialize)]
struct SnapshotIdOnly {
    snapshot_id: String,
}

fn de_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an id")
        }
        fn visit_u64<E: serde::de::Error>(self, u: u64) -> Result<u64, E> {
            Ok(u)
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<u64, E> {
            Err(E::custom("not an id"))
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<u64, E> {
            Err(E::custom("not an id"))
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<u64, E> {
            s.trim().parse().map_err(E::custom)
        }
    }
    d.deserialize_any(V)
}

fn params<const N: usize>(kv: [(&'static str, String); N]) -> Params {
    kv.into()
}

/// The `req` field: a JSON object of strings, the credentials first. Written directly
/// (string escaping by serde_json) rather than through a map.
fn request_json(api_id: &str, partial_key: &str, params: &[(&'static str, String)]) -> String {
    let len = params
        .iter()
        .map(|(k, v)| k.len() + v.len() + 6)
        .sum::<usize>();
    let mut out = Vec::with_capacity(128 + len);
    out.push(b'{');
    let fields = [("api_id", api_id), ("api_partialkey", partial_key)]
        .into_iter()
        .chain(params.iter().map(|(k, v)| (*k, v.as_str())));
    for (i, (k, v)) in fields.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, k).expect("a string serializes");
        out.push(b':');
        serde_json::to_writer(&mut out, v).expect("a string serializes");
    }
    out.push(b'}');
    let json = String::from_utf8(out).expect("JSON of strings is UTF-8");
    if json.is_ascii() {
        json
    } else {
        ascii_escaped(&json)
    }
}

/// JSON text with every non-ASCII character written as `\uXXXX` (UTF-16 code units, so a
/// character beyond U+FFFF is a surrogate pair), as PHP's `json_encode` and Python's
/// `json.dumps` write it. Luna Node refuses the signature of a `req` carrying raw multi-byte
/// UTF-8 (`shared/lunanode-api.md`, "Keep `req` ASCII"); the escaped text decodes to the same
/// strings. Only string contents can hold such characters, and there `\uXXXX` is valid.
fn ascii_escaped(json: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                write!(out, "\\u{u:04x}").expect("writing to a String");
            }
        }
    }
    out
}

/// An `application/x-www-form-urlencoded` body (what reqwest's `.form()` sends), written
/// into one buffer sized for the worst case instead of through serde.
fn form(fields: &[(&str, &str)]) -> String {
    let len: usize = fields
        .iter()
        .map(|(k, v)| 2 + 3 * (k.len() + v.len()))
        .sum();
    form_urlencoded::Serializer::new(String::with_capacity(len))
        .extend_pairs(fields)
        .finish()
}

/// The cloud's clock (its reply's `Date`) minus ours, in whole seconds.
fn skew_from(server: std::time::SystemTime) -> i64 {
    let now = std::time::SystemTime::now();
    match server.duration_since(now) {
        Ok(ahead) => i64::try_from(ahead.as_secs()).unwrap_or(i64::MAX),
        Err(behind) => -i64::try_from(behind.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(&format!(" for url ({url})"), "");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        let creds = Credentials::new("abcdefghijklmnop", &"k".repeat(128)).unwrap();
        Client::new(ClientConfig::new("http://127.0.0.1:1/api", creds)).unwrap()
    }

    #[test]
    fn the_request_is_a_json_object_of_strings_with_the_credentials() {
        let req = request_json(
            "abcdefghijklmnop",
            "pk",
            &[("label", "a \"b\"\\ é\n".into()), ("size", "10".into())],
        );
        assert_eq!(
            req,
            r#"{"api_id":"abcdefghijklmnop","api_partialkey":"pk","label":"a \"b\"\\ \u00e9\n","size":"10"}"#
        );
        let parsed: std::collections::BTreeMap<String, String> =
            serde_json::from_str(&req).unwrap();
        assert_eq!(parsed["label"], "a \"b\"\\ é\n");
        assert_eq!(
            request_json("i", "k", &[]),
            r#"{"api_id":"i","api_partialkey":"k"}"#
        );
    }

    /// The signed text is ASCII whatever the parameters hold, and is what Python's
    /// `json.dumps` writes; the signature is checked against an HMAC computed by Python's
    /// `hmac` over that text (not by this crate's signing code).
    #[test]
    fn non_ascii_is_escaped_and_signed_as_sent() {
        let req = request_json(
            "abcdefghijklmnop",
            "pk",
            &[("label", "Grüße 日本 😀".into())],
        );
        let python = r#"{"api_id":"abcdefghijklmnop","api_partialkey":"pk","label":"Gr\u00fc\u00dfe \u65e5\u672c \ud83d\ude00"}"#;
        assert!(req.is_ascii(), "{req}");
        assert_eq!(req, python);
        let decoded: std::collections::BTreeMap<String, String> =
            serde_json::from_str(&req).unwrap();
        assert_eq!(decoded["label"], "Grüße 日本 😀");
        // python3 -c 'import hmac,hashlib; print(hmac.new(b"k"*128,
        //   ("volume/create/|"+REQ+"|775886400").encode(), hashlib.sha512).hexdigest())'
        assert_eq!(
            signature(&"k".repeat(128), "volume/create/", &req, "775886400"),
            "8820dee4dd59d8b8fdeaff6d38d6539b77dba73e1ab1cf95d4448d91adeb2f7b2ee5c448589974230fb0f12acf9421c94c16603894116aafd035ab8d014863cf"
        );
        // ASCII text is left exactly as serde_json wrote it.
        assert_eq!(
            request_json("i", "k", &[("label", "pvc-1\t\"x\"".into())]),
            r#"{"api_id":"i","api_partialkey":"k","label":"pvc-1\t\"x\""}"#
        );
    }

    #[test]
    fn form_bodies_are_url_encoded() {
        assert_eq!(
            form(&[
                ("req", r#"{"a":"b c","d":"é&="}"#),
                ("nonce", "12"),
                ("h", "volume/list/")
            ]),
            "req=%7B%22a%22%3A%22b+c%22%2C%22d%22%3A%22%C3%A9%26%3D%22%7D&nonce=12&h=volume%2Flist%2F"
        );
        assert_eq!(form(&[("k", "AZaz09*-._~+%")]), "k=AZaz09*-._%7E%2B%25");
        assert_eq!(form(&[]), "");
    }

    #[test]
    fn ids_are_numbers_or_strings_holding_one() {
        let id: IdOnly = serde_json::from_str(r#"{"volume_id":" 12 ","x":1}"#).unwrap();
        assert_eq!(id.volume_id, 12);
        let id: ImageIdOnly = serde_json::from_str(r#"{"image_id":7}"#).unwrap();
        assert_eq!(id.image_id, 7);
        for bad in [r#""""#, r#""x""#, "-1", "1.5", "null", "[1]", "true"] {
            let body = format!(r#"{{"volume_id":{bad}}}"#);
            assert!(serde_json::from_str::<IdOnly>(&body).is_err(), "{bad}");
        }
    }

    #[test]
    fn handler_urls_are_parsed_once_and_match_the_base() {
        let c = client();
        let u = c.url("volume/list/").unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:1/api/volume/list/");
        assert_eq!(c.url("volume/list/").unwrap(), u);
        assert_eq!(c.inner.urls.lock().unwrap().len(), 1);
        let creds = Credentials::new("abcdefghijklmnop", &"k".repeat(128)).unwrap();
        let bad = Client::new(ClientConfig::new("not a url", creds)).unwrap();
        assert!(bad.url("volume/list/").is_none());
    }

    #[test]
    fn debug_hides_the_key() {
        let shown = format!("{:?}", client());
        assert!(!shown.contains(&"k".repeat(128)));
        assert!(shown.contains("http://127.0.0.1:1/api/"));
    }
}
