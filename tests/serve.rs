//! The real binary: `serve` on a unix socket, the Identity service, socket lifecycle and
//! start-up errors.

mod common;

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use lunanode_csi::csi::node_client::NodeClient;
use lunanode_csi::csi::plugin_capability::{self, service};
use lunanode_csi::csi::*;

use common::{BIN, spawn, terminate_and_wait, wait_for_socket};

#[tokio::test]
async fn serves_identity_replaces_stale_socket_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("plugin/csi.sock");
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    // A socket left behind by a crashed run.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());

    let endpoint = format!("unix://{}", sock.display());
    let mut child = spawn(&[
        "serve",
        "--endpoint",
        &endpoint,
        "--sim",
        "--sim-backing",
        "memory",
        "--sim-state-dir",
        dir.path().join("sim").to_str().unwrap(),
    ]);
    wait_for_socket(&sock, &mut child).await;

    let mut id =
        lunanode_csi::csi::identity_client::IdentityClient::new(common::channel(&sock).await);
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.lunanode.com");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let has_service = |t: service::Type| {
        caps.iter().any(|c| matches!(&c.r#type, Some(plugin_capability::Type::Service(s)) if s.r#type == t as i32))
    };
    assert!(has_service(service::Type::ControllerService));
    assert!(has_service(service::Type::VolumeAccessibilityConstraints));
    assert!(caps.iter().any(|c| matches!(&c.r#type,
        Some(plugin_capability::Type::VolumeExpansion(e)) if e.r#type == plugin_capability::volume_expansion::Type::Offline as i32)));
    let probe = id.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));

    let status = terminate_and_wait(&mut child).await;
    assert!(status.success(), "exit status {status}");
    assert!(!sock.exists(), "the socket is removed on SIGTERM");
}

#[test]
fn bad_endpoints_exit_2_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let cases = [
        ("tcp://127.0.0.1:1234".to_string(), "expected unix://"),
        ("unix://relative/csi.sock".to_string(), "must be absolute"),
        (
            format!("unix://{}/sub/csi.sock", blocker.display()),
            "cannot create directory",
        ),
        (format!("unix://{}", blocker.display()), "not a socket"),
    ];
    for (endpoint, needle) in cases {
        let out = Command::new(BIN)
            .args([
                "serve",
                "--mode",
                "node",
                "--node-id",
                "vm-1",
                "--region",
                "toronto",
                "--endpoint",
                &endpoint,
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{endpoint}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{endpoint}: expected {needle:?} in {stderr}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&blocker).unwrap(),
        "x",
        "a non-socket file is never replaced"
    );
}

#[test]
fn controller_without_credentials_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--mode",
            "controller",
            "--endpoint",
            &format!("unix://{}/c.sock", dir.path().display()),
        ])
        .env_remove("LUNANODE_API_ID")
        .env_remove("LUNANODE_API_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("LUNANODE_API_ID"));
}

/// A node-only plugin, with no API credentials in its environment.
fn node_only(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--mode", "node", "--node-id-source", "smbios"])
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("LUNANODE_REGION")
        .env_remove("LUNANODE_NODE_ID")
        .env_remove("LUNANODE_API_ID")
        .env_remove("LUNANODE_API_KEY");
    cmd
}

/// A node-only plugin serving on `sock`, its stderr piped.
fn start_node_only(sock: &Path, extra: &[&str]) -> std::process::Child {
    let endpoint = format!("unix://{}", sock.display());
    node_only(&[&["--endpoint", endpoint.as_str()][..], extra].concat())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn topology_of(sock: &Path) -> (String, HashMap<String, String>) {
    let mut node = NodeClient::new(common::channel(sock).await);
    let info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let segments = info
        .accessible_topology
        .expect("a node always reports its topology")
        .segments;
    (info.node_id, segments)
}

/// The failure seen on a real cluster: a node plugin with no region registered an empty
/// topology, and every WaitForFirstConsumer claim stayed Pending ("no topology key found
/// on CSINode"). Now it does not start, and says what to set.
#[test]
fn node_without_a_region_source_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    for extra in [
        &["--node-id", "vm-1"][..],
        &["--node-id", "vm-1", "--region", ""][..],
    ] {
        let out = node_only(&[&["--endpoint", &endpoint][..], extra].concat())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        for needle in [
            "region",
            "--region",
            "LUNANODE_REGION",
            "`region`",
            "node.regions",
        ] {
            assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
        }
        assert!(!sock.exists(), "nothing was served");
    }
    // A region the driver does not manage would register a topology no class can match.
    let out = node_only(&[
        "--endpoint",
        &endpoint,
        "--node-id",
        "vm-1",
        "--region",
        "toront",
    ])
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("\"toront\"") && stderr.contains("--regions"),
        "{stderr}"
    );
}

#[tokio::test]
async fn node_reports_the_region_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let mut child = start_node_only(&sock, &["--node-id", "vm-1", "--region", "montreal"]);
    wait_for_socket(&sock, &mut child).await;
    let (node_id, segments) = topology_of(&sock).await;
    assert_eq!(node_id, "vm-1");
    assert_eq!(
        segments,
        HashMap::from([(
            lunanode_csi::TOPOLOGY_KEY.to_string(),
            "montreal".to_string()
        )])
    );
    assert!(terminate_and_wait(&mut child).await.success());
}

/// Opt-in: a node plugin given API credentials asks the cloud for its VM's region.
// Multi-thread: the simulator must answer while the test blocks on a child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_credentials_learns_its_region_from_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let sim = lunanode_csi::sim::SimHandle::start(common::sim_config(dir.path()))
        .await
        .unwrap();
    let vm = sim
        .vms
        .iter()
        .find(|v| v.region == "montreal")
        .expect("the test simulator has a VM in montreal")
        .clone();
    // A node plugin with the simulator's credentials, as VM `vm_id`, serving on `sock`.
    let with_cloud = |sock: &Path, vm_id: &str| {
        let mut cmd = node_only(&[
            "--endpoint",
            &format!("unix://{}", sock.display()),
            "--node-id",
            vm_id,
            "--api-url",
            &sim.url,
        ]);
        cmd.env("LUNANODE_API_ID", &sim.api_id)
            .env("LUNANODE_API_KEY", &sim.api_key);
        cmd
    };
    let sock = dir.path().join("csi.sock");
    let mut child = with_cloud(&sock, &vm.id)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&sock, &mut child).await;
    let (node_id, segments) = topology_of(&sock).await;
    assert_eq!(node_id, vm.id);
    assert_eq!(segments[lunanode_csi::TOPOLOGY_KEY], "montreal");
    assert!(terminate_and_wait(&mut child).await.success());

    // A VM the cloud does not know: no start, rather than a node without topology.
    let out = with_cloud(&dir.path().join("other.sock"), "no-such-vm")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no-such-vm") && stderr.contains("--region"),
        "{stderr}"
    );
    sim.shutdown().await;
}

/// `--node-id-source smbios` reads only the SMBIOS UUID: the node is named by it when the
/// machine has one, and otherwise the error names that file and nothing about the metadata
/// service.
#[tokio::test]
async fn node_id_source_smbios_reads_only_smbios() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let mut child = start_node_only(&sock, &["--region", "toronto", "--log-level", "debug"]);
    let start = Instant::now();
    let exited = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            break None;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "neither served nor exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let smbios = std::fs::read_to_string("/sys/class/dmi/id/product_uuid")
        .ok()
        .map(|s| s.trim().to_ascii_lowercase());
    match exited {
        None => {
            let (node_id, _) = topology_of(&sock).await;
            assert_eq!(Some(node_id), smbios, "named by the SMBIOS UUID");
            terminate_and_wait(&mut child).await;
        }
        Some(status) => {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            assert_eq!(status.code(), Some(2), "{stderr}");
            assert!(stderr.contains("product_uuid"), "{stderr}");
            assert!(!stderr.contains("metadata"), "{stderr}");
        }
    }
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    for sub in [
        &["serve", "--help"][..],
        &["sim", "--help"][..],
        &["--help"][..],
    ] {
        let out = Command::new(BIN).args(sub).output().unwrap();
        assert!(out.status.success(), "{sub:?}");
        assert!(!out.stdout.is_empty());
    }
}
