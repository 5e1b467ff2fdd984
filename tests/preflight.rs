//! `lunanode-csi preflight`, the real binary, against the simulator: on loop devices it
//! passes on every bus, and whatever fails or interrupts it, nothing is left in the cloud.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{BIN, sim_config};
use lunanode_csi::sim::{Backing, Bus, Quirks, SimConfig, SimHandle, VmSpec};
use serde_json::Value;

fn root_with_loop() -> bool {
    let ok = nix::unistd::geteuid().is_root() && Path::new("/dev/loop-control").exists();
    if !ok {
        eprintln!("skipped: needs root and loop devices");
    }
    ok
}

/// A simulator with one VM in toronto (`bus`: where `auto` attaches on it).
async fn sim(
    dir: &Path,
    backing: Backing,
    bus: Bus,
    tweak: impl FnOnce(&mut SimConfig),
) -> SimHandle {
    let mut cfg = SimConfig {
        backing,
        vms: vec![VmSpec {
            region: "toronto".into(),
            name: Some("node-1".into()),
        }],
        vm_buses: vec![Some(bus)],
        ..sim_config(dir)
    };
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    tweak(&mut cfg);
    SimHandle::start(cfg).await.expect("simulator starts")
}

/// The binary pointed at `sim` as the node `node-1`; `extra` flags win over the defaults.
fn command(sim: &SimHandle, dir: &Path, extra: &[&str]) -> tokio::process::Command {
    let work = dir.join("work");
    let defaults = [
        ("--api-url", sim.url.as_str()),
        ("--qps", "0"),
        ("--node-id", sim.vms[0].id.as_str()),
        ("--region", "toronto"),
        ("--by-id-dir", sim.by_id_dir.to_str().unwrap()),
        ("--work-dir", work.to_str().unwrap()),
        ("--device-wait-secs", "5"),
    ];
    let mut c = tokio::process::Command::new(BIN);
    c.arg("preflight");
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            c.args([flag, value]);
        }
    }
    c.args(extra)
        .env("LUNANODE_API_ID", &sim.api_id)
        .env("LUNANODE_API_KEY", &sim.api_key)
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    c
}

async fn preflight(sim: &SimHandle, dir: &Path, extra: &[&str]) -> (Output, Value) {
    let out = command(sim, dir, &[&["--json"], extra].concat())
        .output()
        .await
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, report)
}

fn checks(report: &Value) -> Vec<(String, String)> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["check"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn failed(report: &Value) -> &Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["status"] == "failed")
        .unwrap_or_else(|| panic!("no failed check: {report:#}"))
}

/// Nothing of the run is left: no volume in the cloud, no mount under the work directory.
fn nothing_left(sim: &SimHandle, dir: &Path) {
    let state = sim.state();
    assert!(
        state.volumes.is_empty(),
        "left in the cloud: {:?}",
        state.volumes
    );
    let work = dir.join("work");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(work.to_str().unwrap()),
        "a mount is left under {}",
        work.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_on_loop_devices_with_the_virtio_target() {
    if !root_with_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), Backing::Loop, Bus::Ide, |_| {}).await;
    let (out, report) = preflight(&sim, dir.path(), &[]).await;
    assert!(out.status.success(), "{report:#}");
    assert_eq!(report["ok"], true);
    let names: Vec<String> = checks(&report).into_iter().map(|(c, _)| c).collect();
    for step in [
        "API credentials and clock",
        "this node's VM ID",
        "disk found on this node by its serial",
        "size",
        "probed blank and formatted ext4",
        "mounted",
        "file written and read back",
        "unmounted",
        "detached",
        "deleted",
    ] {
        assert!(names.iter().any(|n| n == step), "no {step:?} in {names:?}");
    }
    assert!(checks(&report).iter().all(|(_, s)| s == "ok"), "{report:#}");
    // The VM would have put `auto` on IDE; the driver asked for virtio and got it.
    let disk = report["disk_names"][0].as_str().unwrap();
    assert!(disk.starts_with("virtio-"), "{report:#}");
    assert_eq!(report["attach_target"], "/dev/vda");
    assert_eq!(report["api_rules"], "current");
    let attaches: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.handler == "volume/attach")
        .collect();
    assert_eq!(attaches.len(), 1);
    assert_eq!(attaches[0].params["target"], "/dev/vda");
    assert!(sim.requests().iter().all(|r| r.ascii));
    nothing_left(&sim, dir.path());
    sim.shutdown().await;
}

/// With `auto` on a VM whose disks are IDE, the disk comes as `ata-QEMU_HARDDISK_<serial>`:
/// preflight passes, finding it there, and says how to ask for virtio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finds_an_ide_disk_and_names_the_setting() {
    if !root_with_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), Backing::Loop, Bus::Ide, |_| {}).await;
    let (out, report) = preflight(&sim, dir.path(), &["--attach-target", "auto"]).await;
    assert!(out.status.success(), "{report:#}");
    let disk = report["disk_names"][0].as_str().unwrap();
    assert!(disk.starts_with("ata-QEMU_HARDDISK_"), "{report:#}");
    let found = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "disk found on this node by its serial")
        .unwrap();
    let detail = found["detail"].as_str().unwrap();
    assert!(
        detail.contains("IDE") && detail.contains("--attach-target /dev/vda"),
        "{detail}"
    );
    nothing_left(&sim, dir.path());
    sim.shutdown().await;
}

/// The old rules and lists as objects: the run passes and says which rules it met.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_on_an_account_on_the_old_rules() {
    if !root_with_loop() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let all = Quirks {
        ide_auto: true,
        list_words: true,
        old_rules: true,
        object_lists: true,
    };
    let sim = sim(dir.path(), Backing::Loop, Bus::Virtio, |c| c.quirks = all).await;
    let (out, report) = preflight(&sim, dir.path(), &[]).await;
    assert!(out.status.success(), "{report:#}");
    assert_eq!(report["api_rules"], "old");
    nothing_left(&sim, dir.path());
    sim.shutdown().await;
}

/// A disk that never appears (the memory backing makes none): the run fails at the disk,
/// the message names the attach target setting and what the node has, and the test volume
/// is detached and deleted anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_part_way_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), Backing::Memory, Bus::Ide, |_| {}).await;
    let (out, report) = preflight(&sim, dir.path(), &["--device-wait-secs", "1"]).await;
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    assert_eq!(report["ok"], false);
    let f = failed(&report);
    assert_eq!(f["check"], "disk found on this node by its serial");
    let detail = f["detail"].as_str().unwrap();
    assert!(
        detail.contains("virtio-") && detail.contains("ata-QEMU_HARDDISK_"),
        "{detail}"
    );
    assert!(
        f["fix"].as_str().unwrap().contains("--attach-target"),
        "{f:#}"
    );
    let last = report["checks"].as_array().unwrap().last().unwrap();
    assert_eq!(last["check"], "clean-up");
    assert_eq!(last["status"], "ok");
    assert_eq!(report["left_behind"], Value::Array(vec![]));
    nothing_left(&sim, dir.path());
    sim.shutdown().await;
}

/// Interrupted while the cloud is still attaching: SIGTERM cleans up before exiting; a run
/// killed outright leaves its volume, and the next run removes it by its label first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_is_cleaned_up_now_or_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), Backing::Memory, Bus::Virtio, |c| {
        c.transition = Duration::from_millis(1500).into();
    })
    .await;
    let attaching = || {
        sim.state()
            .volumes
            .iter()
            .any(|v| v.status == "attaching" || v.status == "creating")
    };
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let child = command(&sim, dir.path(), &["--json"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while !attaching() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "never reached the cloud"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
        let out = child.wait_with_output().await.unwrap();
        assert!(!out.status.success());
        if signal == nix::sys::signal::Signal::SIGTERM {
            let report: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(failed(&report)["check"], "interrupted", "{report:#}");
            assert_eq!(report["left_behind"], Value::Array(vec![]), "{report:#}");
            nothing_left(&sim, dir.path());
        } else {
            assert_eq!(
                sim.state().volumes.len(),
                1,
                "a killed run leaves its volume"
            );
        }
    }
    // The next run finds the killed one's volume by its label and removes it first. (The
    // memory backing makes no disk, so this run fails later on; that is not the point.)
    let (_, report) = preflight(&sim, dir.path(), &["--device-wait-secs", "1"]).await;
    let leftovers = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "leftovers of earlier preflights")
        .unwrap();
    assert_eq!(leftovers["status"], "ok");
    assert!(
        leftovers["detail"]
            .as_str()
            .unwrap()
            .starts_with("removed volume toronto/"),
        "{leftovers:#}"
    );
    nothing_left(&sim, dir.path());
    sim.shutdown().await;
}

/// Each account or node problem fails its own check, with its fix, before anything is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_and_node_problems_fail_early_with_their_fix() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), Backing::Memory, Bus::Virtio, |_| {}).await;

    // A wrong key: the signature is refused, and the line names key, clock and encoding.
    let out = command(&sim, dir.path(), &["--json"])
        .env("LUNANODE_API_KEY", "k".repeat(128))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = failed(&report);
    assert_eq!(f["check"], "API credentials and clock");
    let detail = f["detail"].as_str().unwrap();
    assert!(
        detail.contains("signature") && detail.contains("clock"),
        "{detail}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&"k".repeat(128)));

    // A VM the account does not have.
    let (_, report) = preflight(&sim, dir.path(), &["--node-id", "not-a-vm"]).await;
    let f = failed(&report);
    assert!(
        f["check"].as_str().unwrap().starts_with("vm/list knows VM"),
        "{f:#}"
    );
    assert!(f["fix"].as_str().unwrap().contains("--node-id"), "{f:#}");

    // The install says another region than the cloud.
    let (_, report) = preflight(&sim, dir.path(), &["--region", "montreal"]).await;
    let f = failed(&report);
    assert!(f["detail"].as_str().unwrap().contains("montreal"), "{f:#}");
    assert!(f["fix"].as_str().unwrap().contains("toronto"), "{f:#}");

    // A bad attach target is refused before anything is sent.
    let out = command(&sim, dir.path(), &["--attach-target", "/dev/vdb1"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--attach-target"));
    assert!(sim.state().volumes.is_empty());
    sim.shutdown().await;
}

/// The text report: one line per check, `ok` or `FAILED` and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_text_report_has_a_line_per_check() {
    let dir = tempfile::tempdir().unwrap();
    let sim = sim(dir.path(), Backing::Memory, Bus::Virtio, |_| {}).await;
    let out = command(&sim, dir.path(), &["--device-wait-secs", "1"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .next()
            .unwrap()
            .starts_with("ok      API credentials and clock"),
        "{text}"
    );
    assert!(
        text.contains("\nFAILED  disk found on this node by its serial: "),
        "{text}"
    );
    assert!(text.contains("\n        fix: "), "{text}");
    assert!(
        text.trim_end().ends_with("nothing was left behind"),
        "{text}"
    );
    sim.shutdown().await;
}
