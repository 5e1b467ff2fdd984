//! The operator commands of the real binary against a simulator started in the test:
//! every subcommand, table and JSON output, and the cloud's errors.

use std::process::Output;

use lunanode_csi::sim::{SimConfig, SimHandle, VmSpec};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lunanode-csi");

async fn start() -> SimHandle {
    SimHandle::start(SimConfig {
        vms: vec![
            VmSpec {
                region: "toronto".into(),
                name: Some("node-1".into()),
            },
            VmSpec {
                region: "montreal".into(),
                name: Some("node-m".into()),
            },
        ],
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts")
}

/// Run `lunanode-csi ARGS --api-url URL` with the simulator's credentials in the environment.
async fn cli(sim: &SimHandle, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .args(["--api-url", &sim.url])
        .env("LUNANODE_API_ID", &sim.api_id)
        .env("LUNANODE_API_KEY", &sim.api_key)
        .env_remove("LUNANODE_API_URL")
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("run lunanode-csi");
    eprintln!(
        "$ lunanode-csi {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run it and expect success; return stdout.
async fn ok(sim: &SimHandle, args: &[&str]) -> String {
    let out = cli(sim, args).await;
    assert!(out.status.success(), "{args:?} failed: {:?}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

async fn json(sim: &SimHandle, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    serde_json::from_str(&ok(sim, &a).await).expect("JSON output")
}

/// Run it and expect failure with `code`; return stderr.
async fn fails(sim: &SimHandle, args: &[&str], code: i32) -> String {
    let out = cli(sim, args).await;
    assert_eq!(out.status.code(), Some(code), "{args:?}");
    String::from_utf8(out.stderr).unwrap()
}

fn header(table: &str) -> Vec<&str> {
    table
        .lines()
        .next()
        .unwrap()
        .split("  ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_commands_cover_every_volume_action() {
    let sim = start().await;
    let vm = sim.vms[0].id.clone();

    // create (JSON) and list / info in both formats
    let created = json(
        &sim,
        &[
            "volume", "create", "--region", "toronto", "--size", "2", "--label", "ops-a",
        ],
    )
    .await;
    let id = created["volume_id"].as_u64().unwrap();
    assert_eq!(created["csi_id"], format!("toronto/{id}"));
    let text = ok(
        &sim,
        &[
            "volume", "create", "--region", "toronto", "--size", "1", "--label", "ops-b",
        ],
    )
    .await;
    assert!(
        text.starts_with("created volume ") && text.contains("(toronto/"),
        "{text}"
    );

    let table = ok(&sim, &["volume", "list"]).await;
    assert_eq!(
        header(&table),
        [
            "CSI ID", "ID", "LABEL", "SIZE_GB", "STATUS", "ATTACHED", "CREATED"
        ]
    );
    let row = table
        .lines()
        .find(|l| l.contains("ops-a"))
        .expect("ops-a listed");
    assert!(row.starts_with(&format!("toronto/{id} ")), "{row}");
    // Columns line up: every row's second column starts where the header's does.
    let col = table.lines().next().unwrap().find("  ID  ").unwrap() + 2;
    assert!(
        table
            .lines()
            .skip(1)
            .all(|l| l[col..].starts_with(|c: char| c.is_ascii_digit()))
    );
    let list = json(&sim, &["volume", "list", "--region", "toronto"]).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(
        json(&sim, &["volume", "list", "--region", "montreal"])
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );

    let info = ok(&sim, &["volume", "info", &format!("toronto/{id}")]).await;
    assert!(
        info.contains("virtio serial:") && info.contains("ops-a"),
        "{info}"
    );
    let info = json(&sim, &["volume", "info", &id.to_string()]).await;
    assert_eq!(
        (
            info["name"].as_str(),
            info["region"].as_str(),
            info["size"].as_u64()
        ),
        (Some("ops-a"), Some("toronto"), Some(2))
    );

    // attach; deleting or extending an attached volume fails with the cloud's message
    let text = ok(&sim, &["volume", "attach", &id.to_string(), "--vm", &vm]).await;
    assert!(text.contains("attached volume"), "{text}");
    let info = json(&sim, &["volume", "info", &id.to_string()]).await;
    assert_eq!(info["attached"], vm.as_str());
    let err = fails(&sim, &["volume", "delete", &id.to_string()], 1).await;
    assert!(
        err.contains("volume/delete")
            && err.contains("attached")
            && err.contains("detach it first"),
        "{err}"
    );
    let err = fails(
        &sim,
        &["volume", "extend", &id.to_string(), "--size", "3"],
        1,
    )
    .await;
    assert!(err.contains("volume/extend"), "{err}");

    // detach, extend, rename, delete
    ok(&sim, &["volume", "detach", &format!("toronto/{id}")]).await;
    let r = json(&sim, &["volume", "extend", &id.to_string(), "--size", "3"]).await;
    assert_eq!(r["success"], true);
    let r = json(&sim, &["volume", "rename", &id.to_string(), "renamed"]).await;
    assert_eq!(r["name"], "renamed");
    let info = json(&sim, &["volume", "info", &id.to_string()]).await;
    assert_eq!(
        (
            info["name"].as_str(),
            info["size"].as_u64(),
            info["attached"].as_str()
        ),
        (Some("renamed"), Some(3), Some(""))
    );
    let text = ok(&sim, &["volume", "delete", &id.to_string()]).await;
    assert_eq!(text, format!("deleted volume {id}\n"));
    let list = json(&sim, &["volume", "list"]).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "ops-b");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_vm_and_image_commands() {
    let sim = start().await;
    let vol = json(
        &sim,
        &[
            "volume", "create", "--region", "toronto", "--size", "1", "--label", "src",
        ],
    )
    .await;
    let vol_id = vol["volume_id"].as_u64().unwrap().to_string();

    let snap = json(&sim, &["snapshot", "create", &vol_id, "--label", "snap-1"]).await;
    let uuid = snap["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(snap["csi_id"], format!("toronto/{uuid}"));
    let text = ok(
        &sim,
        &[
            "snapshot",
            "create",
            &format!("toronto/{vol_id}"),
            "--label",
            "snap-2",
        ],
    )
    .await;
    assert!(text.starts_with("created snapshot toronto/"), "{text}");

    let table = ok(&sim, &["snapshot", "list"]).await;
    assert_eq!(
        header(&table),
        ["CSI ID", "LABEL", "SIZE_GB", "STATUS", "VOLUME", "CREATED"]
    );
    assert!(
        table.contains(&format!("toronto/{uuid}")) && table.contains("snap-2"),
        "{table}"
    );
    let list = json(&sim, &["snapshot", "list", "--region", "toronto"]).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(
        json(&sim, &["snapshot", "list", "--region", "roubaix"])
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );

    // replicate into montreal, make a volume of the image there, then clean up
    let img = json(
        &sim,
        &[
            "snapshot",
            "replicate",
            &format!("toronto/{uuid}"),
            "--to",
            "montreal",
            "--image-name",
            "copy",
        ],
    )
    .await;
    let image_id = img["image_id"].as_u64().unwrap().to_string();
    let images = ok(&sim, &["image", "list", "--region", "montreal"]).await;
    assert_eq!(header(&images), ["ID", "NAME", "REGION", "STATUS"]);
    assert!(
        images
            .lines()
            .any(|l| l.starts_with(&format!("{image_id} ")) && l.contains("copy")),
        "{images}"
    );
    let restored = json(
        &sim,
        &[
            "volume", "create", "--region", "montreal", "--size", "1", "--label", "restored",
            "--image", &image_id,
        ],
    )
    .await;
    assert_eq!(restored["region"], "montreal");
    ok(&sim, &["image", "delete", &image_id]).await;
    assert!(
        json(&sim, &["image", "list"])
            .await
            .as_array()
            .unwrap()
            .is_empty()
    );
    // A volume from a snapshot in its own region.
    let same = json(
        &sim,
        &[
            "volume",
            "create",
            "--region",
            "toronto",
            "--size",
            "1",
            "--label",
            "clone",
            "--snapshot",
            &format!("toronto/{uuid}"),
        ],
    )
    .await;
    assert_eq!(same["region"], "toronto");

    let vms = ok(&sim, &["vm", "list"]).await;
    assert_eq!(header(&vms), ["ID", "NAME", "HOSTNAME", "REGION"]);
    for v in &sim.vms {
        assert!(
            vms.lines()
                .any(|l| l.starts_with(&v.id) && l.ends_with(&v.region)),
            "{vms}"
        );
    }
    assert_eq!(
        json(&sim, &["vm", "list"]).await.as_array().unwrap().len(),
        2
    );

    // delete: the region comes from the ID or --region
    ok(&sim, &["snapshot", "delete", &format!("toronto/{uuid}")]).await;
    let other = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] != uuid.as_str())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = json(&sim, &["snapshot", "delete", &other, "--region", "toronto"]).await;
    assert_eq!(r["success"], true);
    let state = sim.state();
    assert!(state.snapshots.is_empty() && state.images.is_empty());
    assert_eq!(state.volumes.len(), 3);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_exit_1_from_the_cloud_and_2_for_bad_usage() {
    let sim = start().await;
    // The cloud's message, exit 1.
    let err = fails(&sim, &["volume", "info", "99999"], 1).await;
    assert!(
        err.contains("volume/info") && err.contains("not found"),
        "{err}"
    );
    let err = fails(
        &sim,
        &[
            "snapshot",
            "delete",
            "toronto/484a06d3-7ea6-40d6-8e72-9e7e23f6826b",
        ],
        1,
    )
    .await;
    assert!(err.contains("volume/snapshot-delete"), "{err}");
    // Bad usage, exit 2.
    let err = fails(
        &sim,
        &["snapshot", "delete", "484a06d3-7ea6-40d6-8e72-9e7e23f6826b"],
        2,
    )
    .await;
    assert!(err.contains("--region"), "{err}");
    let err = fails(&sim, &["volume", "list", "--region", "paris"], 2).await;
    assert!(err.contains("unknown region"), "{err}");
    let err = fails(&sim, &["volume", "info", "toronto/abc"], 2).await;
    assert!(err.contains("not a volume ID"), "{err}");
    let err = fails(
        &sim,
        &[
            "volume",
            "create",
            "--region",
            "montreal",
            "--size",
            "1",
            "--label",
            "x",
            "--snapshot",
            "toronto/484a06d3-7ea6-40d6-8e72-9e7e23f6826b",
        ],
        2,
    )
    .await;
    assert!(err.contains("is in toronto"), "{err}");
    // No credentials: a configuration error naming what is missing.
    let out = tokio::process::Command::new(BIN)
        .args(["volume", "list", "--api-url", &sim.url])
        .env_remove("LUNANODE_API_ID")
        .env_remove("LUNANODE_API_KEY")
        .env_remove("LUNANODE_API_ID_FILE")
        .env_remove("LUNANODE_API_KEY_FILE")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("LUNANODE_API_ID"));
    // Wrong key: the cloud refuses it, exit 1.
    let out = tokio::process::Command::new(BIN)
        .args(["vm", "list", "--api-url", &sim.url])
        .env("LUNANODE_API_ID", &sim.api_id)
        .env("LUNANODE_API_KEY", "k".repeat(128))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("authentication failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sim.shutdown().await;
}
