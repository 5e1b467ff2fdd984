//! The real binary: `serve` on a unix socket, the Identity service, socket lifecycle and
//! start-up errors.

mod common;

use std::os::unix::net::UnixListener;
use std::process::Command;

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
