//! The alert rules and the dashboard, proven with a real Prometheus (Debian's `prometheus`)
//! scraping real `lunanode-csi serve --sim --mode all` processes.
//!
//! One driver process per scenario, all scraped at once (1 s scrape and evaluation), each
//! with its embedded simulator turned bad through `POST /_sim/faults` while real RPCs go over
//! its CSI socket: a healthy one, a bad key, 5xx, throttling, an attach that never
//! completes, a disk refused formatting (root with loop devices only), a node near its
//! attach limit; plus a metrics target that never answers, and, before the driver targets are
//! added (a config reload), no controller target at all. Prometheus' own HTTP API must then
//! show exactly the matching alerts firing, none other ever pending or firing, every rule
//! evaluating without error, and every dashboard query returning series.
//!
//! The rules are deploy/monitoring/lunanode-csi.rules.yaml as shipped, with one change:
//! every `for:` is 2 s (a copy is written next to the Prometheus config), since production
//! waits of 5–15 minutes would not fit a test. Windows (`[10m]`) are kept: everything here
//! happens inside them.
//!
//! Needs `prometheus` and `promtool` on PATH (tests/run-all.sh installs Debian's package and
//! sets LUNANODE_CSI_REQUIRE_PROMETHEUS=1, which turns a missing one into a failure);
//! otherwise the tests print `skipped` and pass.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, channel, create_req, mount_cap};
use lunanode_csi::csi::controller_client::ControllerClient;
use lunanode_csi::csi::node_client::NodeClient;
use lunanode_csi::csi::*;
use serde_json::{Value, json};
use tonic::transport::Channel;

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/monitoring/lunanode-csi.rules.yaml"
);
const RULE_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/monitoring/lunanode-csi.rules.test.yaml"
);
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/monitoring/lunanode-csi-dashboard.json"
);
const CONTROLLER_JOB: &str = "lunanode-csi-controller";
const NODE_JOB: &str = "lunanode-csi-node";
/// What every `for:` becomes in the test's copy of the rules.
const TEST_FOR: &str = "2s";
/// A little more than the scrape interval (1 s).
const SCRAPE_GAP: Duration = Duration::from_millis(1100);

/// `name` on PATH; `None` (the test is skipped) unless LUNANODE_CSI_REQUIRE_PROMETHEUS is
/// set, when a missing tool fails the test.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("LUNANODE_CSI_REQUIRE_PROMETHEUS").is_none(),
            "{name} is not on PATH (apt-get install prometheus)"
        );
        eprintln!("skipped: {name} is not on PATH (apt-get install prometheus)");
    }
    found
}

/// The shipped rules with every `for:` set to [`TEST_FOR`].
fn rules_for_test() -> String {
    let text = std::fs::read_to_string(RULES).unwrap();
    let mut out = String::new();
    let mut changed = 0;
    for line in text.lines() {
        let rest = line.trim_start();
        if rest.starts_with("for:") {
            let indent = &line[..line.len() - rest.len()];
            out.push_str(&format!("{indent}for: {TEST_FOR}\n"));
            changed += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(changed >= 9, "only {changed} `for:` lines in {RULES}");
    out
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    for args in [
        vec!["check", "rules", RULES],
        vec!["test", "rules", RULE_TESTS],
    ] {
        let out = Command::new(&promtool).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The test copy is valid too.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("rules.yaml");
    std::fs::write(&copy, rules_for_test()).unwrap();
    let out = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// One `serve --sim --mode all` process with metrics on a free port.
struct Driver {
    name: &'static str,
    child: Child,
    dir: tempfile::TempDir,
    metrics: SocketAddr,
    /// The embedded simulator, `http://HOST:PORT`.
    sim: String,
    sock: PathBuf,
    /// Whether volumes are loop devices (NodeStageVolume works).
    disks: bool,
}

impl Driver {
    fn start(name: &'static str, disks: bool, extra: &[&str]) -> Driver {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("csi.sock");
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--log-format",
                "json",
                "--endpoint",
                &format!("unix://{}", sock.display()),
                "--mode",
                "all",
                "--sim",
                "--sim-backing",
                if disks { "loop" } else { "memory" },
                "--sim-state-dir",
                dir.path().join("sim").to_str().unwrap(),
                "--metrics-addr",
                "127.0.0.1:0",
                "--shutdown-grace-secs",
                "2",
            ])
            .args(extra)
            .env_remove("RUST_LOG")
            .env("LUNANODE_CSI_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lunanode-csi");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let said = |k: &str| v[k].as_str().map(str::to_string);
                match v["message"].as_str() {
                    Some("serving metrics on /metrics") => {
                        let _ = tx.send(("metrics", said("addr").unwrap()));
                    }
                    Some("embedded Luna Node simulator started") => {
                        let _ = tx.send(("sim", said("url").unwrap()));
                    }
                    _ => {}
                }
            }
        });
        let (mut metrics, mut sim) = (None, None);
        while metrics.is_none() || sim.is_none() {
            let (what, v) = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("{name}: no metrics or simulator address logged"));
            match what {
                "metrics" => metrics = Some(v.parse().unwrap()),
                _ => sim = Some(v.trim_end_matches('/').trim_end_matches("/api").to_string()),
            }
        }
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name}: no socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Driver {
            name,
            child,
            dir,
            metrics: metrics.unwrap(),
            sim: sim.unwrap(),
            sock,
            disks,
        }
    }

    fn instance(&self) -> String {
        self.metrics.to_string()
    }

    /// Change the embedded simulator's faults (`POST /_sim/faults`).
    async fn faults(&self, settings: Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/_sim/faults", self.sim))
            .body(settings.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status();
        assert!(
            status.is_success(),
            "{}: {}",
            self.name,
            r.text().await.unwrap()
        );
    }

    async fn clients(&self) -> Csi {
        let ch = channel(&self.sock).await;
        let mut node = NodeClient::new(ch.clone());
        let node_id = node
            .node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .node_id;
        Csi {
            ctl: ControllerClient::new(ch),
            node,
            node_id,
            dir: self.dir.path().to_path_buf(),
        }
    }

    async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "{}: {status}", self.name);
    }
}

/// A driver's CSI clients and its node ID.
struct Csi {
    ctl: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    node_id: String,
    dir: PathBuf,
}

impl Csi {
    async fn create(&mut self, name: &str) -> Result<String, tonic::Status> {
        let v = self.ctl.create_volume(create_req(name, 1)).await?;
        Ok(v.into_inner().volume.unwrap().volume_id)
    }

    async fn publish(
        &mut self,
        vol: &str,
        timeout: Option<Duration>,
    ) -> Result<std::collections::HashMap<String, String>, tonic::Status> {
        let mut req = tonic::Request::new(ControllerPublishVolumeRequest {
            volume_id: vol.into(),
            node_id: self.node_id.clone(),
            volume_capability: Some(mount_cap("ext4")),
            ..Default::default()
        });
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        Ok(self
            .ctl
            .controller_publish_volume(req)
            .await?
            .into_inner()
            .publish_context)
    }

    async fn unpublish(&mut self, vol: &str) {
        self.ctl
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: vol.into(),
                node_id: self.node_id.clone(),
                secrets: Default::default(),
            })
            .await
            .unwrap();
    }

    async fn delete(&mut self, vol: &str) {
        self.ctl
            .delete_volume(DeleteVolumeRequest {
                volume_id: vol.into(),
                secrets: Default::default(),
            })
            .await
            .unwrap();
    }

    fn staging(&self, vol: &str) -> String {
        let p = self.dir.join(format!("staging-{}", vol.replace('/', "-")));
        p.to_str().unwrap().to_string()
    }

    async fn stage(
        &mut self,
        vol: &str,
        ctx: &std::collections::HashMap<String, String>,
        fs: &str,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: vol.into(),
                publish_context: ctx.clone(),
                staging_target_path: self.staging(vol),
                volume_capability: Some(mount_cap(fs)),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    async fn unstage(&mut self, vol: &str) {
        self.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: self.staging(vol),
            })
            .await
            .unwrap();
    }
}

/// Whole lifecycles on a cloud whose transitions take 80–150 ms: nothing may alert.
async fn healthy(d: &Driver) {
    d.faults(json!({"transition_ms": ["80..150"]})).await;
    let mut c = d.clients().await;
    for i in 0..5 {
        let vol = c.create(&format!("pvc-healthy-{i}")).await.unwrap();
        let ctx = c.publish(&vol, None).await.unwrap();
        if d.disks {
            c.stage(&vol, &ctx, "ext4").await.unwrap();
            c.unstage(&vol).await;
        }
        c.unpublish(&vol).await;
        c.delete(&vol).await;
    }
}

/// The key stops working (as when it is revoked): creates fail Unauthenticated.
async fn bad_key(d: &Driver) {
    let mut c = d.clients().await;
    for i in 0..2 {
        c.create(&format!("pvc-key-ok-{i}")).await.unwrap();
    }
    d.faults(json!({"refuse_credentials": true})).await;
    // Spread over several scrapes, as the sidecars' retries are: a counter's first sample
    // is not an increase, so failures that all fall before one scrape would not show.
    for i in 0..6 {
        let err = c.create(&format!("pvc-key-{i}")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains("signature"), "{err:?}");
        tokio::time::sleep(SCRAPE_GAP).await;
    }
}

/// 30% of API requests answered 500 or 503: retries keep the RPCs working.
async fn server_errors(d: &Driver) {
    let mut c = d.clients().await;
    let mut vols = Vec::new();
    for i in 0..3 {
        vols.push(c.create(&format!("pvc-5xx-{i}")).await.unwrap());
    }
    d.faults(json!({"fault_rate": 0.3, "fault_kinds": ["http500", "http503"]}))
        .await;
    let mut failed = 0;
    for _ in 0..5 {
        for vol in &vols {
            // An RPC fails only when all 5 attempts of one call fail (0.24%).
            if c.publish(vol, None).await.is_err() {
                failed += 1;
                continue;
            }
            let _ = c
                .ctl
                .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                    volume_id: vol.clone(),
                    node_id: c.node_id.clone(),
                    secrets: Default::default(),
                })
                .await;
        }
    }
    assert!(failed <= 2, "{failed} publishes failed");
}

/// The cloud's rate limit at 5 requests a second against a driver without its own.
async fn throttled(d: &Driver) {
    let mut c = d.clients().await;
    let a = c.create("pvc-throttle-a").await.unwrap();
    let b = c.create("pvc-throttle-b").await.unwrap();
    d.faults(json!({"rate_limit_qps": 5})).await;
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        for vol in [&a, &b] {
            c.publish(vol, None).await.unwrap();
            c.unpublish(vol).await;
        }
    }
}

/// Attaches take 100–150 ms, three times; then an attach never completes: the call (a 3 s
/// deadline, as a sidecar's --timeout) gives up on it, and the CO's retries find the volume
/// still attaching.
async fn stuck(d: &Driver) {
    d.faults(json!({"transition_ms": ["attach=100..150"]}))
        .await;
    let mut c = d.clients().await;
    let vol = c.create("pvc-stuck-learn").await.unwrap();
    for _ in 0..3 {
        c.publish(&vol, None).await.unwrap();
        c.unpublish(&vol).await;
    }
    let stuck = c.create("pvc-stuck").await.unwrap();
    d.faults(json!({"transition_ms": ["attach=3600000"]})).await;
    let three = Some(Duration::from_secs(3));
    let err = c.publish(&stuck, three).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    for _ in 0..5 {
        tokio::time::sleep(SCRAPE_GAP).await;
        let err = c.publish(&stuck, three).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted, "{err:?}");
        assert!(err.message().contains("attaching"), "{err:?}");
    }
}

/// A volume formatted ext4, then staged asking for xfs: refused, twice, and left as it is.
async fn not_blank(d: &Driver) {
    let mut c = d.clients().await;
    let vol = c.create("pvc-not-blank").await.unwrap();
    let ctx = c.publish(&vol, None).await.unwrap();
    c.stage(&vol, &ctx, "ext4").await.unwrap();
    c.unstage(&vol).await;
    for _ in 0..2 {
        let err = c.stage(&vol, &ctx, "xfs").await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("will not be reformatted"), "{err:?}");
    }
    c.unpublish(&vol).await;
    c.delete(&vol).await;
}

/// Four volumes attached to a node that takes four.
async fn full_node(d: &Driver) {
    let mut c = d.clients().await;
    for i in 0..4 {
        let vol = c.create(&format!("pvc-full-{i}")).await.unwrap();
        c.publish(&vol, None).await.unwrap();
    }
}

/// A real Prometheus, its config and rules in a temporary directory.
struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
    http: reqwest::Client,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The scrape config: `down` as the node job's only target; the drivers, if any, as the
/// controller job. Each process's embedded simulator makes the same VM IDs (seed 1), so
/// `node_id` is prefixed with the instance: each process is a cluster of its own.
fn prometheus_config(down: &str, drivers: &[String]) -> String {
    let mut cfg = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
rule_files:
  - rules.yaml
scrape_configs:
  - job_name: {NODE_JOB}
    static_configs:
      - targets: ["{down}"]
"#
    );
    if !drivers.is_empty() {
        let targets: Vec<String> = drivers.iter().map(|t| format!("\"{t}\"")).collect();
        cfg.push_str(&format!(
            r#"  - job_name: {CONTROLLER_JOB}
    static_configs:
      - targets: [{}]
    metric_relabel_configs:
      - source_labels: [instance, node_id]
        regex: "(.+);(.+)"
        target_label: node_id
        replacement: "$1/$2"
"#,
            targets.join(", ")
        ));
    }
    cfg
}

impl Prometheus {
    async fn start(bin: &Path, config: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yaml"), rules_for_test()).unwrap();
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-lifecycle")
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let start = Instant::now();
        loop {
            if let Ok(r) = p.http.get(format!("{}/-/ready", p.url)).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "prometheus not ready:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn reload(&self, config: &str) {
        std::fs::write(self.dir.path().join("prometheus.yml"), config).unwrap();
        let r = self
            .http
            .post(format!("{}/-/reload", self.url))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "reload: {}", self.log());
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let r = self
            .http
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(v["status"], "success", "{path} {query:?}: {v}");
        v["data"].clone()
    }

    /// An instant query's result vector.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", expr)]).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The alerts now pending or firing, by [`alert_key`], with their state.
    async fn alerts(&self) -> BTreeMap<String, String> {
        let data = self.api("alerts", &[]).await;
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    alert_key(&a["labels"]),
                    a["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `Alertname@who[,label=value…]`: who is the instance, else the node ID, else the job; the
/// labels that tell one alert of a rule from another are added.
fn alert_key(labels: &Value) -> String {
    let l = |k: &str| labels[k].as_str().map(str::to_string);
    let who = l("instance")
        .or_else(|| l("node_id"))
        .or_else(|| l("job"))
        .unwrap_or_default();
    let mut key = format!("{}@{who}", l("alertname").unwrap());
    for extra in ["method", "kind", "result", "reason"] {
        if let Some(v) = l(extra) {
            key.push_str(&format!(",{extra}={v}"));
        }
    }
    key
}

/// Wait until every `expected` alert fires, failing with what Prometheus shows after
/// `within`.
async fn until_firing(p: &Prometheus, expected: &BTreeSet<String>, within: Duration) {
    let start = Instant::now();
    loop {
        let now = p.alerts().await;
        let firing: BTreeSet<String> = now
            .iter()
            .filter(|(_, s)| *s == "firing")
            .map(|(k, _)| k.clone())
            .collect();
        if expected.is_subset(&firing) {
            return;
        }
        assert!(
            start.elapsed() < within,
            "not firing after {within:?}: {:?}\nall alerts now: {now:#?}",
            expected.difference(&firing).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_for_real_faults_and_every_dashboard_query_has_data() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let started = Instant::now();
    let disks = lunanode_csi::sim::loop_available();
    if !disks {
        eprintln!(
            "skipped (part): no root or loop devices, so no NodeStageVolume and no refused format"
        );
    }

    let healthy_d = Driver::start("healthy", disks, &[]);
    let key_d = Driver::start("bad-key", false, &[]);
    let errors_d = Driver::start("5xx", false, &[]);
    let throttle_d = Driver::start("throttled", false, &[]);
    let stuck_d = Driver::start("stuck", false, &[]);
    let full_d = Driver::start("full-node", false, &["--max-volumes-per-node", "4"]);
    let blank_d = disks.then(|| Driver::start("not-blank", true, &[]));
    let down = format!("127.0.0.1:{}", free_port());
    let mut all = vec![
        &healthy_d,
        &key_d,
        &errors_d,
        &throttle_d,
        &stuck_d,
        &full_d,
    ];
    all.extend(blank_d.as_ref());
    let targets: Vec<String> = all.iter().map(|d| d.instance()).collect();

    // No controller target at all: the driver is not scraped.
    let p = Prometheus::start(&prometheus, &prometheus_config(&down, &[])).await;
    let absent = format!("LunanodeCSIMetricsAbsent@{CONTROLLER_JOB}");
    let down_alert = format!("LunanodeCSIMetricsDown@{down}");
    until_firing(
        &p,
        &BTreeSet::from([absent.clone(), down_alert.clone()]),
        Duration::from_secs(20),
    )
    .await;
    p.reload(&prometheus_config(&down, &targets)).await;
    let scraping = Instant::now();
    // Every driver scraped once before anything happens: what comes next is an increase.
    let up = format!("count(up{{job=\"{CONTROLLER_JOB}\"}} == 1)");
    loop {
        let n = p.query(&up).await;
        if n.first().and_then(|s| s["value"][1].as_str()) == Some(&targets.len().to_string()) {
            break;
        }
        assert!(
            scraping.elapsed() < Duration::from_secs(20),
            "targets not up: {n:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let blank = async {
        if let Some(d) = &blank_d {
            not_blank(d).await;
        }
    };
    tokio::join!(
        healthy(&healthy_d),
        bad_key(&key_d),
        server_errors(&errors_d),
        throttled(&throttle_d),
        stuck(&stuck_d),
        full_node(&full_d),
        blank,
    );
    let driven = scraping.elapsed();

    let full_vm = full_d.clients().await.node_id;
    let mut expected = BTreeSet::from([
        down_alert,
        format!(
            "LunanodeCSICloudRefusesCredentials@{},result=signature",
            key_d.instance()
        ),
        format!(
            "LunanodeCSIOperationsFailing@{},method=CreateVolume",
            key_d.instance()
        ),
        format!("LunanodeCSICloudErrors@{}", errors_d.instance()),
        format!("LunanodeCSICloudThrottling@{}", throttle_d.instance()),
        format!(
            "LunanodeCSICloudTransitionStuck@{},kind=attach",
            stuck_d.instance()
        ),
        format!(
            "LunanodeCSIOperationsFailing@{},method=ControllerPublishVolume",
            stuck_d.instance()
        ),
        format!(
            "LunanodeCSINodeNearAttachLimit@{}/{full_vm}",
            full_d.instance()
        ),
    ]);
    if let Some(d) = &blank_d {
        expected.insert(format!(
            "LunanodeCSIVolumeNotBlank@{},reason=foreign_filesystem",
            d.instance()
        ));
    }
    until_firing(&p, &expected, Duration::from_secs(60)).await;
    // A few more evaluations: nothing else may turn up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = p.alerts().await;
    let active: BTreeSet<String> = now.keys().cloned().collect();
    assert_eq!(active, expected, "alerts now: {now:#?}");
    // Nothing else was ever pending or firing, at any evaluation since the start.
    let ever: BTreeSet<String> = p
        .query("count by (alertname, instance, node_id, job, method, kind, result, reason) (count_over_time(ALERTS[10m]))")
        .await
        .iter()
        .map(|s| alert_key(&s["metric"]))
        .collect();
    let mut allowed = expected.clone();
    allowed.insert(absent.clone());
    assert_eq!(ever, allowed, "alerts ever pending or firing");

    // Every rule loaded with the test's `for`, and evaluates cleanly.
    let rules = p.api("rules", &[]).await;
    let rules: Vec<&Value> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(rules.len(), 9, "{rules:#?}");
    for r in &rules {
        assert_eq!(r["health"], "ok", "{r:#}");
        assert_eq!(r["duration"], 2.0, "{r:#}");
    }

    // Every dashboard query returns series, with numbers in them.
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut checked = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "2m")
                .replace("$__range", "10m");
            let result = p.query(&expr).await;
            let numbers = result
                .iter()
                .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
                .filter(|v| v.is_finite())
                .count();
            assert!(
                numbers > 0,
                "panel {:?}: no data for {expr}: {result:?}",
                panel["title"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} dashboard queries");
    eprintln!(
        "prometheus test: {} drivers, scenarios driven in {:.1} s, {} alerts firing, {checked} dashboard queries with data, {:.1} s in all",
        all.len(),
        driven.as_secs_f64(),
        expected.len(),
        started.elapsed().as_secs_f64()
    );

    p.stop().await;
    for d in [healthy_d, key_d, errors_d, throttle_d, stuck_d, full_d] {
        d.stop().await;
    }
    if let Some(d) = blank_d {
        d.stop().await;
    }
}
