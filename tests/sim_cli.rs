//! `lunanode-csi sim` as a process: the start-up line, serving, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha512;

fn start(args: &[&str]) -> (Child, Value) {
    start_with_env(args, &[])
}

fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> (Child, Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lunanode-csi"))
        .arg("sim")
        .args(args)
        .env_remove("LUNANODE_SIM_SEED")
        .env_remove("LUNANODE_SIM_QUIRKS")
        .env_remove("LUNANODE_SIM_AUTO_BUS")
        .env_remove("LUNANODE_SIM_VMS")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("binary starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    (child, v)
}

async fn call(sim: &Value, handler: &str, params: &[(&str, &str)]) -> Value {
    let key = sim["api_key"].as_str().unwrap();
    let mut m = serde_json::Map::new();
    for (k, v) in params {
        m.insert(k.to_string(), json!(v));
    }
    m.insert("api_id".into(), sim["api_id"].clone());
    m.insert("api_partialkey".into(), json!(&key[..64]));
    let req = Value::Object(m).to_string();
    let nonce = "1700000000";
    let mut mac = Hmac::<Sha512>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{handler}/|{req}|{nonce}").as_bytes());
    let sig = hex::encode(mac.finalize().into_bytes());
    let resp = reqwest::Client::new()
        .post(format!("{}{handler}/", sim["url"].as_str().unwrap()))
        .form(&[("req", req.as_str()), ("signature", &sig), ("nonce", nonce)])
        .send()
        .await
        .unwrap();
    serde_json::from_str(&resp.text().await.unwrap()).unwrap()
}

fn terminate(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sim did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn prints_one_line_serves_and_exits_on_sigterm() {
    let (child, sim) = start(&["--seed", "3", "--vm", "toronto:node-1", "--vm", "roubaix"]);
    assert!(
        sim["url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );
    assert!(sim["url"].as_str().unwrap().ends_with("/api/"));
    assert_eq!(sim["api_id"].as_str().unwrap().len(), 16);
    assert_eq!(sim["api_key"].as_str().unwrap().len(), 128);
    assert_eq!(sim["backing"], "memory");
    assert_eq!(
        sim["quirks"], "ide-auto,list-words",
        "the likely preset by default"
    );
    let vms = sim["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2);
    assert_eq!(
        (vms[0]["name"].as_str(), vms[0]["region"].as_str()),
        (Some("node-1"), Some("toronto"))
    );
    assert_eq!(vms[1]["region"], "roubaix");
    assert!(uuid::Uuid::parse_str(vms[0]["id"].as_str().unwrap()).is_ok());
    let state_dir = sim["state_dir"].as_str().unwrap().to_string();
    assert!(Path::new(&state_dir).is_dir());

    let list = call(&sim, "vm/list", &[]).await;
    assert_eq!(list["success"], "yes");
    assert_eq!(list["vms"].as_array().unwrap().len(), 2);
    terminate(child);
    assert!(
        !Path::new(&state_dir).exists(),
        "temporary state dir left behind"
    );

    // Same seed, same credentials; the default is one VM in toronto.
    let (child, again) = start(&["--seed", "3"]);
    assert_eq!(again["api_key"], sim["api_key"]);
    assert_eq!(again["vms"].as_array().unwrap().len(), 1);
    assert_eq!(again["vms"][0]["region"], "toronto");
    terminate(child);
}

#[tokio::test]
async fn loop_backing_is_cleaned_up_on_sigterm() {
    if !lunanode_csi::sim::loop_available() {
        println!("skipped: needs root and loop devices");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let by_id = dir.path().join("links");
    let (child, sim) = start(&[
        "--backing",
        "loop",
        "--state-dir",
        dir.path().to_str().unwrap(),
        "--by-id-dir",
        by_id.to_str().unwrap(),
    ]);
    assert_eq!(sim["backing"], "loop");
    let vm = sim["vms"][0]["id"].as_str().unwrap().to_string();
    let created = call(
        &sim,
        "volume/create",
        &[("region", "toronto"), ("label", "x"), ("size", "1")],
    )
    .await;
    let id = created["volume_id"].as_str().unwrap().to_string();
    let info = call(
        &sim,
        "volume/attach",
        &[("volume_id", &id), ("vm_id", &vm), ("target", "auto")],
    )
    .await;
    assert_eq!(info["success"], "yes", "{info}");
    let links: Vec<String> = std::fs::read_dir(&by_id)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // By default a VM has IDE disks, so `auto` gives an IDE disk: an ata- link only.
    assert_eq!(links.len(), 1);
    assert!(links[0].starts_with("ata-QEMU_HARDDISK_"), "{links:?}");
    let file = dir.path().join(format!("volumes/vol-{id}.img"));
    let attached = |f: &Path| {
        let out = Command::new("losetup").arg("-j").arg(f).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_ne!(attached(&file), "");
    terminate(child);
    assert_eq!(attached(&file), "", "loop device left after SIGTERM");
    assert_eq!(
        std::fs::read_dir(&by_id).unwrap().count(),
        0,
        "link left after SIGTERM"
    );
    assert!(file.exists(), "a given state dir is kept");
}

#[test]
fn help_documents_every_setting() {
    let out = Command::new(env!("CARGO_BIN_EXE_lunanode-csi"))
        .args(["sim", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--quirks",
        "LUNANODE_SIM_QUIRKS",
        "[default: likely]",
        "ide-auto",
        "list-words",
        "old-rules",
        "object-lists",
        "likely",
        "none",
        "region not set",
        "--auto-bus",
        "LUNANODE_SIM_AUTO_BUS",
        "REGION[:NAME[:BUS]]",
        "LUNANODE_SIM_VMS",
        "ata-QEMU_HARDDISK_",
        "scsi-0QEMU_QEMU_HARDDISK_",
        "non-ASCII",
        "image/delete",
    ] {
        assert!(
            help.contains(needle),
            "{needle:?} not in sim --help:\n{help}"
        );
    }
}

#[tokio::test]
async fn quirks_and_buses_from_flags_and_env() {
    let (child, sim) = start(&[
        "--quirks",
        "none,object-lists",
        "--auto-bus",
        "virtio",
        "--vm",
        "toronto:a:ide",
        "--vm",
        "montreal:b",
    ]);
    assert_eq!(sim["quirks"], "object-lists");
    assert_eq!(sim["vms"][0]["bus"], "ide");
    assert_eq!(sim["vms"][1]["bus"], "virtio");
    let list = call(&sim, "vm/list", &[]).await;
    assert!(list["vms"].is_object(), "{list}");
    assert_eq!(list["vms"]["1"]["name"], "b");
    terminate(child);

    let (child, sim) = start_with_env(
        &[],
        &[
            ("LUNANODE_SIM_QUIRKS", "likely,old-rules,no-list-words"),
            ("LUNANODE_SIM_VMS", "roubaix::virtio,toronto"),
        ],
    );
    assert_eq!(sim["quirks"], "ide-auto,old-rules");
    assert_eq!(sim["vms"][0]["region"], "roubaix");
    assert_eq!(sim["vms"][0]["bus"], "virtio");
    assert_eq!(sim["vms"][1]["bus"], "ide");
    let list = call(&sim, "volume/list", &[]).await;
    assert_eq!(list["error"], "region not set", "{list}");
    terminate(child);

    let out = Command::new(env!("CARGO_BIN_EXE_lunanode-csi"))
        .args(["sim", "--quirks", "likely,floppy"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("floppy"));
}
