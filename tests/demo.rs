//! The real `lunanode-csi demo` binary: every step reported ok, exit 0, and nothing left
//! behind (loop devices, mounts, the temp dir), also after a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_lunanode-csi");

fn demo(args: &[&str]) -> (Output, String) {
    let out = Command::new(BIN)
        .arg("demo")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run lunanode-csi demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (out, stdout)
}

fn temp_dir(stdout: &str) -> PathBuf {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("temp dir: "))
        .expect("the demo names its temp dir");
    PathBuf::from(line.trim())
}

/// Lines that report a step: `  7. NodeStageVolume ...  ok  69 ms`.
fn step_lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            let digits = t.bytes().take_while(u8::is_ascii_digit).count();
            digits > 0 && t[digits..].starts_with(". ")
        })
        .collect()
}

fn status(line: &str) -> &'static str {
    if line.contains(" FAILED ") {
        "FAILED"
    } else if line.trim_end().ends_with(" skipped") {
        "skipped"
    } else if line.contains(" ok ") {
        "ok"
    } else {
        panic!("step line without a status: {line:?}")
    }
}

fn assert_nothing_left(dir: &Path) {
    let shown = dir.display().to_string();
    if let Ok(out) = Command::new("losetup").arg("-a").output() {
        let text = String::from_utf8_lossy(&out.stdout);
        let left: Vec<&str> = text.lines().filter(|l| l.contains(&shown)).collect();
        assert!(left.is_empty(), "loop devices left: {left:?}");
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&shown)).collect();
    assert!(left.is_empty(), "mounts left: {left:?}");
    assert!(!dir.exists(), "{shown} was not removed");
}

fn loop_available() -> bool {
    lunanode_csi::sim::loop_available()
}

#[test]
fn demo_reports_every_step_ok_and_leaves_nothing_behind() {
    let (out, stdout) = demo(&[]);
    assert!(out.status.success(), "demo failed: {:?}", out.status);
    let steps = step_lines(&stdout);
    assert!(steps.len() >= 25, "too few steps: {steps:?}");
    for l in &steps {
        let s = status(l);
        assert_ne!(s, "FAILED", "{l}");
        if loop_available() {
            assert_eq!(s, "ok", "with loop devices nothing is skipped: {l}");
        }
    }
    if loop_available() {
        assert!(stdout.contains("backing: loop"));
        // The story's key checks, as printed.
        assert!(stdout.contains("(match)"), "the restored file matched");
        assert!(
            stdout
                .lines()
                .any(|l| l.trim_start().starts_with("size ") && l.contains(" -> ")),
            "the filesystem growth is shown"
        );
    } else {
        eprintln!("loop devices unavailable: the node steps were skipped");
        assert!(stdout.contains("backing: memory"));
    }
    assert!(stdout.contains("0 volumes, 0 snapshots, 0 images"));
    assert!(stdout.contains(" 0 failed"));
    assert!(stdout.contains("demo ok: every check held"));
    assert_nothing_left(&temp_dir(&stdout));
}

#[test]
fn memory_backing_skips_node_steps_and_runs_every_controller_step() {
    let (out, stdout) = demo(&["--backing", "memory", "--transition-ms", "0"]);
    assert!(out.status.success(), "demo failed: {:?}", out.status);
    assert!(stdout.contains("backing: memory (--backing memory)"));
    assert!(stdout.contains("skipped: the node steps"));
    let steps = step_lines(&stdout);
    for l in &steps {
        let s = status(l);
        assert_ne!(s, "FAILED", "{l}");
        if l.contains("Controller") || l.contains("CreateVolume") || l.contains("Snapshot") {
            assert_eq!(s, "ok", "controller steps run in memory mode: {l}");
        }
    }
    for needle in [
        "CreateVolume 1 GiB",
        "ControllerPublishVolume",
        "CreateSnapshot",
        "CreateVolume from the snapshot in montreal",
        "ControllerExpandVolume offline",
        "DeleteSnapshot",
        "DeleteVolume",
    ] {
        assert!(
            steps
                .iter()
                .any(|l| l.contains(needle) && status(l) == "ok"),
            "{needle} ran"
        );
    }
    assert!(steps.iter().any(|l| status(l) == "skipped"));
    assert_nothing_left(&temp_dir(&stdout));
}

#[test]
fn a_failed_step_is_named_exits_1_and_still_cleans_up() {
    // Fail once volumes are mounted on both nodes (loop), or once both exist (memory).
    let at = if loop_available() {
        "pod in montreal reads"
    } else {
        "attach the restored volume"
    };
    let (out, stdout) = demo(&["--fail-at", at]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("demo failed at step") && stderr.contains("injected failure"),
        "{stderr}"
    );
    let steps = step_lines(&stdout);
    let failed: Vec<_> = steps.iter().filter(|l| status(l) == "FAILED").collect();
    assert_eq!(failed.len(), 1, "{steps:?}");
    let cleanup = steps.last().unwrap();
    assert!(
        cleanup.contains("Clean up") && status(cleanup) == "ok",
        "{cleanup}"
    );
    assert!(stdout.contains("cleaned up"), "the ledger was undone");
    assert_nothing_left(&temp_dir(&stdout));
}
