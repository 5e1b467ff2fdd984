//! The real binary with `--metrics-addr`: real RPCs over the unix socket, then a scrape of
//! `/metrics` over real HTTP.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{channel, code, create_req};
use lunanode_csi::csi::controller_client::ControllerClient;
use lunanode_csi::csi::identity_client::IdentityClient;
use lunanode_csi::csi::*;

const BIN: &str = env!("CARGO_BIN_EXE_lunanode-csi");

/// Start `serve` with metrics on a free port; the port is learnt from the JSON log line.
fn start(dir: &std::path::Path, extra: &[&str]) -> (Child, SocketAddr) {
    let sock = dir.join("csi.sock");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--log-format",
            "json",
            "--endpoint",
            &format!("unix://{}", sock.display()),
            "--mode",
            "controller",
            "--sim",
            "--sim-backing",
            "memory",
            "--sim-state-dir",
            dir.join("sim").to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:0",
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
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["message"] == "serving metrics on /metrics"
            {
                let _ = tx.send(v["addr"].as_str().unwrap().parse::<SocketAddr>().unwrap());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server logs the metrics address");
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, addr)
}

async fn stop(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
        }
        // Yield to the runtime so a still-connected client can answer the server's GOAWAY.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the sample line `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn rpcs_and_api_requests_are_counted_and_served_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = start(dir.path(), &[]);
    let http = reqwest::Client::new();

    let health = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let ch = channel(&dir.path().join("csi.sock")).await;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut ident = IdentityClient::new(ch);
    ident.probe(ProbeRequest {}).await.unwrap();
    let vol = ctl
        .create_volume(create_req("pvc-metrics-1", 1))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    // No name: refused before the cloud is asked.
    let bad = ctl.create_volume(create_req("", 1)).await;
    assert_eq!(code(bad), tonic::Code::InvalidArgument);
    // An unknown volume: the cloud answers not found; DeleteVolume is idempotent (OK).
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: "toronto/999999".into(),
        secrets: Default::default(),
    })
    .await
    .unwrap();
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        secrets: Default::default(),
    })
    .await
    .unwrap();

    let resp = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = resp.text().await.unwrap();
    let want = |series: &str, v: f64| {
        assert_eq!(sample(&text, series), Some(v), "{series} in\n{text}");
    };
    want(
        r#"csi_rpc_requests_total{method="CreateVolume",code="OK"}"#,
        1.0,
    );
    want(
        r#"csi_rpc_requests_total{method="CreateVolume",code="InvalidArgument"}"#,
        1.0,
    );
    want(
        r#"csi_rpc_requests_total{method="DeleteVolume",code="OK"}"#,
        2.0,
    );
    want(r#"csi_rpc_requests_total{method="Probe",code="OK"}"#, 1.0);
    want(
        r#"csi_rpc_duration_seconds_count{method="CreateVolume"}"#,
        2.0,
    );
    want(
        r#"csi_rpc_duration_seconds_bucket{method="CreateVolume",le="+Inf"}"#,
        2.0,
    );
    want(
        r#"csi_rpc_duration_seconds_count{method="DeleteVolume"}"#,
        2.0,
    );
    want(r#"csi_operations_in_flight{method="CreateVolume"}"#, 0.0);
    // CreateVolume: list (idempotency), create, info; DeleteVolume: info (+ delete).
    want(
        r#"lunanode_api_requests_total{action="volume/list",result="ok"}"#,
        1.0,
    );
    want(
        r#"lunanode_api_requests_total{action="volume/create",result="ok"}"#,
        1.0,
    );
    want(
        r#"lunanode_api_requests_total{action="volume/info",result="ok"}"#,
        2.0,
    );
    want(
        r#"lunanode_api_requests_total{action="volume/info",result="not_found"}"#,
        1.0,
    );
    want(
        r#"lunanode_api_requests_total{action="volume/delete",result="ok"}"#,
        1.0,
    );
    want(
        r#"lunanode_api_request_duration_seconds_count{action="volume/info"}"#,
        3.0,
    );
    assert!(sample(&text, r#"lunanode_api_retries_total{action="volume/info"}"#).is_none());
    // The create's wait for `available`: instant in the embedded simulator, so one poll.
    want(
        r#"csi_wait_polls_count{kind="create",result="ready",transition="started"}"#,
        1.0,
    );
    want(
        r#"csi_wait_polls_sum{kind="create",result="ready",transition="started"}"#,
        1.0,
    );
    want(
        r#"csi_wait_duration_seconds_count{kind="create",result="ready",transition="started"}"#,
        1.0,
    );
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        let v = sample(&text, name).unwrap_or_else(|| panic!("{name} missing in\n{text}"));
        assert!(v > 0.0, "{name} = {v}");
    }
    // CPU time is counted in clock ticks (10 ms): a server that has done this little can
    // honestly report 0, so only its presence and sign are checked here (CI once saw 0).
    let cpu = sample(&text, "process_cpu_seconds_total")
        .unwrap_or_else(|| panic!("process_cpu_seconds_total missing in\n{text}"));
    assert!(
        cpu >= 0.0 && cpu.is_finite(),
        "process_cpu_seconds_total = {cpu}"
    );
    // Nothing from a request ends up in a label.
    assert!(!text.contains("pvc-metrics-1") && !text.contains(&vol.volume_id));
    drop((ctl, ident));
    stop(child).await;
}

#[test]
fn a_bad_or_busy_metrics_address_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    for (addr, says) in [
        ("not-an-address", "metrics-addr"),
        (busy.as_str(), "cannot listen for metrics"),
    ] {
        let out = Command::new(BIN)
            .args([
                "serve",
                "--endpoint",
                &format!("unix://{}", dir.path().join("csi.sock").display()),
                "--mode",
                "controller",
                "--sim",
                "--sim-backing",
                "memory",
                "--metrics-addr",
                addr,
            ])
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{addr}: {stderr}");
        assert!(stderr.contains(says), "{addr}: {stderr}");
    }
}
