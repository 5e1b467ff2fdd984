//! The Luna Node client against the simulator over real HTTP: retries recover from
//! transient faults and give up after their bound, creates are never repeated, the rate
//! limiter holds its rate, requests on the wire stay within their bound, both nonce modes
//! are served, and a wrong key is refused.

mod common;

use std::time::{Duration, Instant};

use common::*;
use lunanode_csi::lunanode::{ApiError, Client, ClientConfig, Credentials, NonceMode};
use lunanode_csi::sim::{FaultKind, SimHandle};

fn client(sim: &SimHandle, tweak: impl FnOnce(&mut ClientConfig)) -> Client {
    let creds = Credentials::new(&sim.api_id, &sim.api_key).unwrap();
    let mut cfg = ClientConfig::new(sim.url.clone(), creds);
    cfg.qps = 0.0;
    cfg.initial_backoff = Duration::from_millis(1);
    cfg.max_backoff = Duration::from_millis(5);
    tweak(&mut cfg);
    Client::new(cfg).unwrap()
}

async fn sim() -> (tempfile::TempDir, SimHandle) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sim_config(dir.path());
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    (dir, SimHandle::start(cfg).await.unwrap())
}

#[tokio::test]
async fn retries_recover_from_transient_faults_and_give_up_after_their_bound() {
    let (_d, sim) = sim().await;
    sim.set_fault_kinds(&[FaultKind::Http500, FaultKind::Http503, FaultKind::Transient]);
    sim.set_fault_rate(0.5);
    let c = client(&sim, |c| c.max_retries = 12);
    for _ in 0..10 {
        c.volume_list(None)
            .await
            .expect("retries hide a 50% fault rate");
    }
    assert!(c.stats().retries.load(std::sync::atomic::Ordering::Relaxed) > 0);

    sim.set_fault_rate(1.0);
    sim.reset_counters();
    let c = client(&sim, |c| c.max_retries = 2);
    let err = c.volume_list(None).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(
        sim.calls().get("volume/list"),
        Some(&3),
        "one attempt and two retries"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn creates_are_never_repeated_by_the_client() {
    let (_d, sim) = sim().await;
    sim.set_fault_kinds(&[FaultKind::Http503]);
    sim.set_fault_rate(1.0);
    let c = client(&sim, |c| c.max_retries = 5);
    assert!(c.volume_create("toronto", "x", 1, None).await.is_err());
    assert!(c.snapshot_create(4682, "s").await.is_err());
    assert!(
        c.snapshot_replicate(
            "toronto",
            "484a06d3-7ea6-40d6-8e72-9e7e23f6826b",
            "i",
            "montreal"
        )
        .await
        .is_err()
    );
    let calls = sim.calls();
    for action in [
        "volume/create",
        "volume/snapshot-create",
        "volume/snapshot-replicate",
    ] {
        assert_eq!(calls.get(action), Some(&1), "{action} sent once: {calls:?}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn the_rate_limiter_holds_its_rate() {
    let (_d, sim) = sim().await;
    let c = client(&sim, |c| {
        c.qps = 20.0;
        c.burst = 1;
    });
    let start = Instant::now();
    let calls: Vec<_> = (0..21).map(|_| c.volume_list(None)).collect();
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    // 1 from the burst, then 20 at 20 per second: never faster than one second.
    assert!(
        start.elapsed() >= Duration::from_millis(950),
        "{:?}",
        start.elapsed()
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn requests_on_the_wire_stay_within_the_bound() {
    let (_d, sim) = sim().await;
    // Long enough that 40 concurrent calls would overlap if nothing held them back.
    sim.set_latency(Duration::from_millis(20));
    let bounded = client(&sim, |c| c.max_in_flight = 3);
    let calls: Vec<_> = (0..40).map(|_| bounded.volume_list(None)).collect();
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    assert_eq!(sim.calls().get("volume/list"), Some(&40));
    assert_eq!(sim.max_in_flight(), 3);

    // The same burst without a bound does overlap, so the check above is not vacuous.
    sim.reset_counters();
    let unbounded = client(&sim, |c| c.max_in_flight = 0);
    let calls: Vec<_> = (0..40).map(|_| unbounded.volume_list(None)).collect();
    for r in futures_util::future::join_all(calls).await {
        r.unwrap();
    }
    assert!(sim.max_in_flight() > 3, "{}", sim.max_in_flight());
    sim.shutdown().await;
}

/// A burst in each nonce mode is served: in `clock` mode the requests share one second, in
/// `increasing` mode they spend the lead ahead of the clock and then wait for it.
#[tokio::test]
async fn both_nonce_modes_are_served() {
    let (_d, sim) = sim().await;
    for (mode, n) in [(NonceMode::Clock, 20), (NonceMode::Increasing, 4)] {
        sim.reset_counters();
        let c = client(&sim, |c| c.nonce = mode);
        let calls: Vec<_> = (0..n).map(|_| c.vm_list()).collect();
        for r in futures_util::future::join_all(calls).await {
            r.unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        }
        assert_eq!(sim.calls().get("vm/list"), Some(&n), "{mode:?}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn a_wrong_key_is_an_authentication_error() {
    let (_d, sim) = sim().await;
    let creds = Credentials::new(&sim.api_id, &"x".repeat(128)).unwrap();
    let c = Client::new(ClientConfig::new(sim.url.clone(), creds)).unwrap();
    let err = c.vm_list().await.unwrap_err();
    // A wrong key shows as a refused signature, which names every cause it can have; the
    // simulator's reply carries a Date, so the clock is ruled in or out.
    let ApiError::Signature { clock_skew, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(clock_skew.is_some_and(|s| s.abs() <= 2), "{err:?}");
    let shown = err.to_string();
    assert!(
        shown.contains("API key") && shown.contains("clock agrees"),
        "{shown}"
    );
    assert!(!shown.contains(&"x".repeat(128)));
    sim.shutdown().await;
}
