//! The waits phase: how long after the cloud is ready the driver answers, and how many API
//! calls each wait costs, for every kind of transition, under the learned schedule and the
//! old fixed backoff, in a steady cloud and a spread one. See docs/benchmarks.md ("Waits").
//!
//! Method. Each (cloud, schedule) pair is a rig: a simulator of its own (so that every
//! transition in its log is its driver's) and a driver process. Everything time-like is
//! scaled by `--wait-scale` alike (the simulator's transitions and API latency, and the
//! driver's schedules through `--wait-time-scale`), so overshoot *as a fraction of the
//! transition* is what it would be at full scale while the phase takes minutes, not hours.
//! Overshoot is computed from the simulator's own log: for waits that end an RPC (create,
//! create from a source, attach, detach, extend) the RPC's answer minus the moment the
//! transition completed; for the snapshot and image waits inside a clone or a cross-region
//! restore, the moment the driver's next call used the result (`volume/create` from it)
//! minus that moment. API calls per wait are the driver's own `csi_wait_polls` (waits whose
//! transition the call started), from `/metrics` before and after.
//!
//! Concurrency 1 means one wait of each kind in flight: the six streams of RPCs (create;
//! create from a snapshot; publish + unpublish; expand; clone; cross-region restore) run at
//! once, each one RPC at a time, and every rig of the cloud at once (one cloud after the
//! other). Concurrency N runs each stream alone with N workers, one rig at a time.

use std::sync::atomic::AtomicI64;

use super::*;
use lunanode_csi::sim::{TransitionKind, TransitionRecord, Transitions};

/// The kinds: the driver's metric label, the simulator's kind.
const KINDS: [(&str, TransitionKind); 7] = [
    ("create", TransitionKind::Create),
    ("create_from_source", TransitionKind::CreateFromSource),
    ("attach", TransitionKind::Attach),
    ("detach", TransitionKind::Detach),
    ("extend", TransitionKind::Extend),
    ("snapshot", TransitionKind::Snapshot),
    ("replicate", TransitionKind::Replicate),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Create,
    FromSnapshot,
    AttachDetach,
    Extend,
    Clone,
    Restore,
}

const STREAMS: [Stream; 6] = [
    Stream::Create,
    Stream::FromSnapshot,
    Stream::AttachDetach,
    Stream::Extend,
    Stream::Clone,
    Stream::Restore,
];

/// One RPC that ended with a wait: when it was sent and answered, and the volume.
struct Obs {
    kind: TransitionKind,
    volume: String,
    began: Instant,
    answered: Instant,
}

/// What the streams of a rig share: cheap to clone, so that streams run at once.
#[derive(Clone)]
struct Fixture {
    channel: Channel,
    vms: Arc<Vec<String>>,
    /// `toronto/<uuid>`: restored in toronto and into montreal.
    snapshot: Arc<String>,
    /// A roubaix volume the clone stream clones.
    clone_source: Arc<String>,
    /// Per worker: a volume to attach and detach, and one to extend (with its size in GiB).
    attach_volumes: Arc<Vec<String>>,
    extend_volumes: Arc<Vec<(String, AtomicI64)>>,
}

struct Rig {
    cloud: &'static str,
    schedule: &'static str,
    poll_cost: f64,
    call_budget: f64,
    sim: SimHandle,
    driver: Driver,
    metrics: String,
    fx: Fixture,
    errors: usize,
}

/// A call budget in the report: `null` for none (JSON has no infinity).
fn budget_json(b: f64) -> Value {
    if b.is_finite() { json!(b) } else { Value::Null }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn region(r: &str) -> HashMap<String, String> {
    HashMap::from([("region".to_string(), r.to_string())])
}

fn create(name: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: GIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        ..Default::default()
    }
}

fn from_snapshot(name: &str, snapshot: &str, to: &str) -> CreateVolumeRequest {
    use lunanode_csi::csi::volume_content_source::{SnapshotSource, Type};
    CreateVolumeRequest {
        parameters: region(to),
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(Type::Snapshot(SnapshotSource {
                snapshot_id: snapshot.to_string(),
            })),
        }),
        ..create(name)
    }
}

fn number(csi_id: &str) -> String {
    csi_id.rsplit('/').next().unwrap_or_default().to_string()
}

async fn scrape(addr: &str) -> String {
    match reqwest::get(format!("http://{addr}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => panic!("scraping the driver's metrics: {e}"),
    }
}

/// `(sum, count)` of the polls of waits of `kind` whose transition the call started.
fn polls(text: &str, kind: &str) -> (f64, f64) {
    let get = |what: &str| {
        let series = format!(
            r#"csi_wait_polls_{what}{{kind="{kind}",result="ready",transition="started"}} "#
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (get("sum"), get("count"))
}

impl Rig {
    async fn start(
        cloud: &'static str,
        shape: Transitions,
        schedule: &'static str,
        (poll_cost, call_budget): (f64, f64),
        args: &Args,
    ) -> Rig {
        // "fixed" is the driver as it was: the old backoff, a volume/info per poll.
        let (schedule_flag, share) = match schedule.strip_suffix("-unshared") {
            Some(s) => (s, false),
            None => (schedule, schedule != "fixed"),
        };
        let scale = args.wait_scale;
        let workers = args.wait_concurrency.iter().copied().max().unwrap_or(1);
        let latency = Duration::from_millis(args.latency_ms).mul_f64(scale);
        let sim = start_sim(latency, Backing::Memory, vms_for(workers)).await;
        sim.set_transitions(shape.scaled(scale));
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut flags = controller_flags(args.qps, args.burst);
        flags.extend([
            format!("--metrics-addr={metrics}"),
            format!("--wait-schedule={schedule_flag}"),
            format!("--wait-poll-cost={poll_cost}"),
            format!("--wait-call-budget={call_budget}"),
            format!("--wait-time-scale={scale}"),
        ]);
        flags.push(format!("--wait-share-list={share}"));
        let driver = Driver::start(&sim, "controller", &flags).await;
        let mut ctl = ControllerClient::new(driver.channel.clone());
        let id =
            |r: tonic::Response<CreateVolumeResponse>| r.into_inner().volume.unwrap().volume_id;
        let snap_src = id(ctl.create_volume(create("snap-src")).await.expect("setup"));
        let snapshot = ctl
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: snap_src,
                name: "snap".into(),
                ..Default::default()
            })
            .await
            .expect("setup")
            .into_inner()
            .snapshot
            .unwrap()
            .snapshot_id;
        let clone_source = id(ctl
            .create_volume(CreateVolumeRequest {
                parameters: region("roubaix"),
                ..create("clone-src")
            })
            .await
            .expect("setup"));
        let made = futures_util::future::join_all((0..workers).map(|w| {
            let mut c = ctl.clone();
            async move {
                let a = c
                    .create_volume(create(&format!("ad-{w}")))
                    .await
                    .expect("setup");
                let e = c
                    .create_volume(create(&format!("ex-{w}")))
                    .await
                    .expect("setup");
                (id(a), id(e))
            }
        }))
        .await;
        let (attach_volumes, extend_volumes): (Vec<_>, Vec<_>) = made
            .into_iter()
            .map(|(a, e)| (a, (e, AtomicI64::new(1))))
            .unzip();
        // The snapshot must be ready before streams restore from it.
        let uuid = number(&snapshot);
        while sim
            .state()
            .snapshots
            .iter()
            .any(|s| s.id == uuid && s.status != "available")
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let fx = Fixture {
            channel: driver.channel.clone(),
            vms: Arc::new(vm_ids(&sim)),
            snapshot: Arc::new(snapshot),
            clone_source: Arc::new(clone_source),
            attach_volumes: Arc::new(attach_volumes),
            extend_volumes: Arc::new(extend_volumes),
        };
        Rig {
            cloud,
            schedule,
            poll_cost,
            call_budget,
            sim,
            driver,
            metrics,
            fx,
            errors: 0,
        }
    }
}

/// `cycles` cycles of `stream` by `workers` workers (worker `w` uses the `w`th attach and
/// extend volumes); the observations and the number of failed cycles.
async fn run(
    fx: Fixture,
    stream: Stream,
    workers: usize,
    cycles: usize,
    tag: String,
) -> (Vec<Obs>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..workers.min(cycles).max(1) {
        let fx = fx.clone();
        let next = next.clone();
        let tag = format!("{tag}-{w}");
        tasks.push(async move {
            let mut ctl = ControllerClient::new(fx.channel.clone());
            let (mut out, mut errors) = (Vec::new(), 0);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cycles {
                    break;
                }
                let name = format!("{tag}-{i}");
                if let Err(e) = cycle(&mut ctl, &fx, w, stream, &name, &mut out).await {
                    eprintln!("waits: {stream:?} {name}: {e}");
                    errors += 1;
                }
            }
            (out, errors)
        });
    }
    let mut obs = Vec::new();
    let mut errors = 0;
    for (o, e) in futures_util::future::join_all(tasks).await {
        obs.extend(o);
        errors += e;
    }
    (obs, errors)
}

/// One cycle of a stream; the RPCs that end with a wait are observed into `out`.
async fn cycle(
    ctl: &mut ControllerClient<Channel>,
    fx: &Fixture,
    w: usize,
    stream: Stream,
    name: &str,
    out: &mut Vec<Obs>,
) -> Result<(), tonic::Status> {
    let delete = |id: String| DeleteVolumeRequest {
        volume_id: id,
        ..Default::default()
    };
    match stream {
        Stream::Create | Stream::FromSnapshot => {
            let (req, kind) = if stream == Stream::Create {
                (create(name), TransitionKind::Create)
            } else {
                (
                    from_snapshot(name, &fx.snapshot, "toronto"),
                    TransitionKind::CreateFromSource,
                )
            };
            let began = Instant::now();
            let vol = ctl.create_volume(req).await?.into_inner().volume.unwrap();
            out.push(Obs {
                kind,
                volume: number(&vol.volume_id),
                began,
                answered: Instant::now(),
            });
            ctl.delete_volume(delete(vol.volume_id)).await?;
        }
        Stream::AttachDetach => {
            let volume = &fx.attach_volumes[w];
            let node = &fx.vms[w % fx.vms.len()];
            let began = Instant::now();
            ctl.controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: volume.clone(),
                node_id: node.clone(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await?;
            out.push(Obs {
                kind: TransitionKind::Attach,
                volume: number(volume),
                began,
                answered: Instant::now(),
            });
            let began = Instant::now();
            ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: volume.clone(),
                node_id: node.clone(),
                ..Default::default()
            })
            .await?;
            out.push(Obs {
                kind: TransitionKind::Detach,
                volume: number(volume),
                began,
                answered: Instant::now(),
            });
        }
        Stream::Extend => {
            let (volume, size) = &fx.extend_volumes[w];
            let gib = size.load(Ordering::Relaxed) + 1;
            let began = Instant::now();
            ctl.controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: volume.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: gib * GIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await?;
            size.store(gib, Ordering::Relaxed);
            out.push(Obs {
                kind: TransitionKind::Extend,
                volume: number(volume),
                began,
                answered: Instant::now(),
            });
        }
        Stream::Clone | Stream::Restore => {
            use lunanode_csi::csi::volume_content_source::{Type, VolumeSource};
            // Measured from the simulator's log alone (the snapshot's or image's first use).
            let req = if stream == Stream::Clone {
                CreateVolumeRequest {
                    parameters: region("roubaix"),
                    volume_content_source: Some(VolumeContentSource {
                        r#type: Some(Type::Volume(VolumeSource {
                            volume_id: fx.clone_source.to_string(),
                        })),
                    }),
                    ..create(name)
                }
            } else {
                from_snapshot(name, &fx.snapshot, "montreal")
            };
            let vol = ctl.create_volume(req).await?.into_inner().volume.unwrap();
            ctl.delete_volume(delete(vol.volume_id)).await?;
        }
    }
    Ok(())
}

/// Every stream at once, each with `workers` workers.
async fn run_streams(
    rig: &mut Rig,
    streams: &[Stream],
    workers: usize,
    cycles: usize,
    tag: &str,
) -> Vec<Obs> {
    let runs = streams
        .iter()
        .map(|s| run(rig.fx.clone(), *s, workers, cycles, format!("{tag}-{s:?}")));
    let mut out = Vec::new();
    for (obs, errors) in futures_util::future::join_all(runs).await {
        out.extend(obs);
        rig.errors += errors;
    }
    out
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(v, p)
}

/// Overshoot fractions per kind, from the RPC answers and the simulator's log.
fn overshoot(
    obs: &[Obs],
    log: &[TransitionRecord],
    since: Instant,
) -> BTreeMap<&'static str, Vec<f64>> {
    let mut by: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let frac = |r: &TransitionRecord, seen: Instant| {
        seen.saturating_duration_since(r.ready).as_secs_f64() / (r.ready - r.started).as_secs_f64()
    };
    for o in obs {
        let label = KINDS.iter().find(|(_, k)| *k == o.kind).unwrap().0;
        if let Some(r) = log.iter().find(|r| {
            r.kind == o.kind
                && r.object == o.volume
                && r.started >= o.began
                && r.started <= o.answered
        }) {
            by.entry(label).or_default().push(frac(r, o.answered));
        }
    }
    for (label, kind) in [
        ("snapshot", TransitionKind::Snapshot),
        ("replicate", TransitionKind::Replicate),
    ] {
        for r in log.iter().filter(|r| r.kind == kind && r.started >= since) {
            if let Some(used) = r.used {
                by.entry(label).or_default().push(frac(r, used));
            }
        }
    }
    by
}

/// Warm up, then measure `wait_count` cycles of `streams` with `workers` each, all at once.
async fn measure(
    rig: &mut Rig,
    streams: &[Stream],
    workers: usize,
    args: &Args,
    tag: &str,
) -> Value {
    let warm = args.wait_warmup;
    run_streams(
        rig,
        streams,
        workers.min(warm).max(1),
        warm,
        &format!("{tag}w"),
    )
    .await;
    rig.sim.take_transitions();
    let before = scrape(&rig.metrics).await;
    let calls_before = total_calls(&rig.sim.calls());
    let since = Instant::now();
    let obs = run_streams(rig, streams, workers, args.wait_count, &format!("{tag}m")).await;
    let log = rig.sim.take_transitions();
    let api_calls = total_calls(&rig.sim.calls()) - calls_before;
    let after = scrape(&rig.metrics).await;
    let fracs = overshoot(&obs, &log, since);
    let mut kinds = serde_json::Map::new();
    let (mut all, mut calls_sum, mut calls_n) = (Vec::new(), 0.0, 0.0);
    for (label, kind) in KINDS {
        if !fracs.contains_key(label) {
            continue;
        }
        let (s1, n1) = polls(&after, label);
        let (s0, n0) = polls(&before, label);
        let (sum, n) = (s1 - s0, n1 - n0);
        let mut f = fracs[label].clone();
        let d: Vec<f64> = log
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| ms(r.ready - r.started))
            .collect();
        let mean_ms = d.iter().sum::<f64>() / d.len().max(1) as f64;
        all.extend(f.iter().copied());
        calls_sum += sum;
        calls_n += n;
        kinds.insert(
            label.to_string(),
            json!({
                "waits": f.len(),
                "overshoot_p50": pct(&mut f, 50.0),
                "overshoot_p95": pct(&mut f, 95.0),
                "calls_per_wait": if n > 0.0 { sum / n } else { f64::NAN },
                "polled_waits": n,
                "transition_ms_mean_unscaled": mean_ms / args.wait_scale,
            }),
        );
    }
    json!({
        "cloud": rig.cloud,
        "schedule": rig.schedule,
        "poll_cost": rig.poll_cost,
        "call_budget": budget_json(rig.call_budget),
        "concurrency": workers,
        "kinds": kinds,
        "all": {
            "waits": all.len(),
            "overshoot_p50": pct(&mut all, 50.0),
            "overshoot_p95": pct(&mut all, 95.0),
            "calls_per_wait": calls_sum / calls_n.max(1.0),
            // Every API call of the streams (their other calls too) per measured wait:
            // what sharing a volume/list changes shows here, not in polls.
            "api_calls_per_wait": api_calls as f64 / all.len().max(1) as f64,
        },
    })
}

/// The phase: every rig at concurrency 1 at once (the call-budget curve's rigs too), then
/// each main rig alone at each higher concurrency.
pub async fn phase_waits(args: &Args) -> Value {
    use lunanode_csi::driver::controller::wait::{DEFAULT_CALL_BUDGET, DEFAULT_POLL_COST};
    let default = (
        args.wait_poll_cost.unwrap_or(DEFAULT_POLL_COST),
        args.wait_call_budget.unwrap_or(DEFAULT_CALL_BUDGET),
    );
    type Spec = (&'static str, Transitions, &'static str, (f64, f64), bool);
    let mut specs: Vec<Spec> = vec![
        ("steady", Transitions::steady(), "fixed", default, true),
        ("steady", Transitions::steady(), "learned", default, true),
        ("spread", Transitions::spread(), "fixed", default, true),
        ("spread", Transitions::spread(), "learned", default, true),
    ];
    if args.wait_share_experiment {
        for (cloud, shape) in [
            ("steady", Transitions::steady()),
            ("spread", Transitions::spread()),
        ] {
            specs.push((cloud, shape, "learned-unshared", default, true));
        }
    }
    for &budget in &args.wait_curve {
        if budget != default.1 {
            let price = (default.0, budget);
            specs.push(("spread", Transitions::spread(), "learned", price, false));
        }
    }
    specs.retain(|s| args.wait_clouds.iter().any(|c| c == s.0));
    // In the order concurrency 1 measures them (by cloud), which the results follow.
    specs.sort_by_key(|s| s.0 != "steady");
    let started = Instant::now();
    let mut rigs = Vec::new();
    for (cloud, shape, schedule, cost, main) in specs {
        rigs.push((Rig::start(cloud, shape, schedule, cost, args).await, main));
    }
    // Concurrency 1, one cloud at a time: its rigs at once (the fixed and learned rigs of a
    // cloud see the same machine), the other cloud's rigs idle. All rigs at once put up to
    // 66 streams on two cores, and that contention, which does not scale with
    // `--wait-scale`, cost the steady cloud's short kinds ~1.5 points of p50 (see
    // docs/benchmarks.md).
    let mut serial = Vec::new();
    if args.wait_concurrency.contains(&1) {
        for cloud in ["steady", "spread"] {
            let batch: Vec<_> = rigs.iter_mut().filter(|(r, _)| r.cloud == cloud).collect();
            if batch.is_empty() {
                continue;
            }
            eprintln!("waits: {} {cloud} rigs at concurrency 1", batch.len());
            serial.extend(
                futures_util::future::join_all(
                    batch
                        .into_iter()
                        .map(|(rig, _)| async move { measure(rig, &STREAMS, 1, args, "c1").await }),
                )
                .await,
            );
        }
    }
    let mut results = Vec::new();
    let mut curve = Vec::new();
    for ((rig, main), r) in rigs.iter().zip(serial.drain(..)) {
        if rig.cloud == "spread" && !rig.schedule.ends_with("-unshared") {
            curve.push(json!({
                "schedule": rig.schedule,
                "poll_cost": rig.poll_cost,
                "call_budget": budget_json(rig.call_budget),
                "all": r["all"].clone(),
            }));
        }
        if *main {
            results.push(r);
        }
    }
    for &c in args.wait_concurrency.iter().filter(|c| **c > 1) {
        for (rig, main) in rigs.iter_mut() {
            if !*main {
                continue;
            }
            eprintln!("waits: {} {} at concurrency {c}", rig.cloud, rig.schedule);
            let mut kinds = serde_json::Map::new();
            let mut streams = serde_json::Map::new();
            for s in STREAMS {
                let r = measure(rig, &[s], c, args, &format!("c{c}")).await;
                streams.insert(format!("{s:?}"), r["all"].clone());
                if let Some(k) = r["kinds"].as_object() {
                    for (name, v) in k {
                        // Clone and restore streams also report the creates from their
                        // snapshot or image; the create-from-snapshot stream's are the ones.
                        if !kinds.contains_key(name) || s == Stream::FromSnapshot {
                            kinds.insert(name.clone(), v.clone());
                        }
                    }
                }
            }
            results.push(json!({
                "cloud": rig.cloud,
                "schedule": rig.schedule,
                "poll_cost": rig.poll_cost,
                "call_budget": budget_json(rig.call_budget),
                "concurrency": c,
                "kinds": kinds,
                "streams": streams,
            }));
        }
    }
    let errors: usize = rigs.iter().map(|(r, _)| r.errors).sum();
    for (rig, _) in rigs {
        rig.driver.stop().await;
        rig.sim.shutdown().await;
    }
    json!({
        "scale": args.wait_scale,
        "count": args.wait_count,
        "warmup": args.wait_warmup,
        "latency_ms_unscaled": args.latency_ms,
        "errors": errors,
        "wall_s": started.elapsed().as_secs_f64(),
        "results": results,
        "curve": curve,
    })
}

/// The table: per cloud, concurrency and kind, the fixed schedule against the learned one.
pub fn print_waits(w: &Value) {
    let f = |x: &Value| match x.as_f64() {
        Some(v) if v.is_finite() => format!("{v:.2}"),
        _ => "-".into(),
    };
    let pc = |x: &Value| match x.as_f64() {
        Some(v) if v.is_finite() => format!("{:.1}%", v * 100.0),
        _ => "-".into(),
    };
    println!(
        "\nWaits: {} waits per kind after {} warm-up, time scale {}, {} errors, {:.0} s",
        w["count"],
        w["warmup"],
        w["scale"],
        w["errors"],
        w["wall_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  {:<7} {:>3} {:<19} {:>9} {:>9} {:>7}   {:>9} {:>9} {:>7}",
        "cloud", "c", "kind", "old p50", "old p95", "calls", "new p50", "new p95", "calls"
    );
    let results = w["results"].as_array().cloned().unwrap_or_default();
    for r in results.iter().filter(|r| r["schedule"] == "learned") {
        // (the "-unshared" rigs are shown apart below)
        let Some(old) = results.iter().find(|o| {
            o["schedule"] == "fixed"
                && o["cloud"] == r["cloud"]
                && o["concurrency"] == r["concurrency"]
        }) else {
            continue;
        };
        for (kind, _) in KINDS {
            let (n, o) = (&r["kinds"][kind], &old["kinds"][kind]);
            println!(
                "  {:<7} {:>3} {:<19} {:>9} {:>9} {:>7}   {:>9} {:>9} {:>7}",
                r["cloud"].as_str().unwrap_or(""),
                r["concurrency"],
                kind,
                pc(&o["overshoot_p50"]),
                pc(&o["overshoot_p95"]),
                f(&o["calls_per_wait"]),
                pc(&n["overshoot_p50"]),
                pc(&n["overshoot_p95"]),
                f(&n["calls_per_wait"]),
            );
        }
    }
    let unshared: Vec<&Value> = results
        .iter()
        .filter(|r| r["schedule"] == "learned-unshared")
        .collect();
    if !unshared.is_empty() {
        println!(
            "  sharing lists between waiters: every API call of a stream per wait, and overshoot p50 (a call of its own for each poll -> shared)"
        );
        for plain in unshared {
            let Some(r) = results.iter().find(|o| {
                o["schedule"] == "learned"
                    && o["cloud"] == plain["cloud"]
                    && o["concurrency"] == plain["concurrency"]
            }) else {
                continue;
            };
            let rows: Vec<(&str, &Value, &Value)> = if r["streams"].is_null() {
                vec![("all streams", &plain["all"], &r["all"])]
            } else {
                [
                    "Create",
                    "FromSnapshot",
                    "AttachDetach",
                    "Extend",
                    "Clone",
                    "Restore",
                ]
                .into_iter()
                .map(|s| (s, &plain["streams"][s], &r["streams"][s]))
                .collect()
            };
            for (s, a, b) in rows {
                println!(
                    "    {:<7} c={:<3} {:<13} calls/wait {} -> {}   p50 {} -> {}",
                    r["cloud"].as_str().unwrap_or(""),
                    r["concurrency"],
                    s,
                    f(&a["api_calls_per_wait"]),
                    f(&b["api_calls_per_wait"]),
                    pc(&a["overshoot_p50"]),
                    pc(&b["overshoot_p50"]),
                );
            }
        }
    }
    println!("  spread cloud, concurrency 1, all kinds: overshoot against calls per wait");
    for c in w["curve"].as_array().cloned().unwrap_or_default() {
        let budget = match &c["call_budget"] {
            Value::Null => "none".to_string(),
            b => b.to_string(),
        };
        println!(
            "    {:<8} call budget {:<5} poll cost {:<5} p50 {:>7} p95 {:>7} calls {}",
            c["schedule"].as_str().unwrap_or(""),
            if c["schedule"] == "fixed" {
                "-"
            } else {
                &budget
            },
            c["poll_cost"],
            pc(&c["all"]["overshoot_p50"]),
            pc(&c["all"]["overshoot_p95"]),
            f(&c["all"]["calls_per_wait"]),
        );
    }
}
