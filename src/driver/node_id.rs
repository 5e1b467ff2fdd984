//! Which VM is this node? The node ID must be the Luna Node VM ID, because the controller
//! attaches volumes to it. Sources, in order: an explicit setting, the OpenStack metadata
//! service (`uuid`), the SMBIOS system UUID. The source used is reported; when none works
//! the error says what was tried.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use super::error::Error;

/// The OpenStack metadata document that carries the VM's `uuid`.
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254/openstack/latest/meta_data.json";
/// The SMBIOS system UUID, which KVM sets to the instance UUID.
pub const DEFAULT_DMI_PATH: &str = "/sys/class/dmi/id/product_uuid";
/// How long to wait for the metadata service (absent on some hosts: fail fast).
pub const METADATA_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the node ID came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeIdSource {
    /// The `--node-id` setting.
    Explicit,
    /// The OpenStack metadata service.
    MetadataService,
    /// The SMBIOS system UUID.
    Dmi,
}

impl fmt::Display for NodeIdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeIdSource::Explicit => "explicit setting",
            NodeIdSource::MetadataService => "OpenStack metadata service",
            NodeIdSource::Dmi => "SMBIOS system UUID",
        })
    }
}

async fn from_metadata(url: &str) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .timeout(METADATA_TIMEOUT)
        .connect_timeout(METADATA_TIMEOUT)
        // The link-local metadata service must never be reached through a proxy.
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot build HTTP client: {e}"))?;
    let resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let body = resp.bytes().await.map_err(|e| e.to_string())?;
    let doc: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
    match doc.get("uuid").and_then(|v| v.as_str()).map(str::trim) {
        Some(id) if !id.is_empty() => Ok(id.to_string()),
        _ => Err("no \"uuid\" field".into()),
    }
}

fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

fn from_dmi(path: &Path) -> Result<String, String> {
    let raw = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let id = raw.trim().to_ascii_lowercase();
    if !looks_like_uuid(&id) {
        return Err(format!("{id:?} is not a UUID"));
    }
    if id.chars().all(|c| c == '0' || c == '-') {
        return Err("the UUID is all zeros (not set by the hypervisor)".into());
    }
    Ok(id)
}

/// Resolve the node ID: `explicit` (when non-empty) wins, else the metadata service at
/// `metadata_url`, else the UUID in `dmi_path` (lowercased).
pub async fn resolve_node_id(
    explicit: Option<String>,
    metadata_url: &str,
    dmi_path: &Path,
) -> Result<(String, NodeIdSource), Error> {
    if let Some(id) = explicit
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
    {
        return Ok((id, NodeIdSource::Explicit));
    }
    let meta_err = match from_metadata(metadata_url).await {
        Ok(id) => return Ok((id, NodeIdSource::MetadataService)),
        Err(e) => e,
    };
    tracing::debug!(url = metadata_url, error = %meta_err, "metadata service gave no node ID");
    let dmi_err = match from_dmi(dmi_path) {
        Ok(id) => return Ok((id, NodeIdSource::Dmi)),
        Err(e) => e,
    };
    Err(Error::FailedPrecondition(format!(
        "cannot determine this node's ID (the Luna Node VM ID): no node ID was set; \
         metadata service {metadata_url}: {meta_err}; {}: {dmi_err}. \
         Set the node ID explicitly (--node-id)",
        dmi_path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn stub(body: &'static str, status: u16) -> String {
        let app = axum::Router::new().route(
            "/openstack/latest/meta_data.json",
            axum::routing::get(move || async move {
                (http::StatusCode::from_u16(status).unwrap(), body)
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/openstack/latest/meta_data.json")
    }

    fn dmi_file(content: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), content).unwrap();
        f
    }

    /// A URL nothing listens on (a port just released).
    fn dead_url() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        format!("http://{addr}/openstack/latest/meta_data.json")
    }

    const DMI: &str = "4C4C4544-0042-3510-8056-B4C04F4A4B32\n";

    #[tokio::test]
    async fn explicit_wins() {
        let dmi = dmi_file(DMI);
        let (id, src) = resolve_node_id(Some(" vm-1 ".into()), &dead_url(), dmi.path())
            .await
            .unwrap();
        assert_eq!((id.as_str(), src), ("vm-1", NodeIdSource::Explicit));
    }

    #[tokio::test]
    async fn metadata_service_next() {
        let url = stub(
            r#"{"uuid": "0d7a5c2e-1111-2222-3333-444455556666", "name": "n1"}"#,
            200,
        )
        .await;
        let dmi = dmi_file(DMI);
        let (id, src) = resolve_node_id(Some(String::new()), &url, dmi.path())
            .await
            .unwrap();
        assert_eq!(id, "0d7a5c2e-1111-2222-3333-444455556666");
        assert_eq!(src, NodeIdSource::MetadataService);
    }

    #[tokio::test]
    async fn dmi_when_metadata_fails() {
        let dmi = dmi_file(DMI);
        for url in [
            dead_url(),
            stub("not json", 200).await,
            stub(r#"{"name": "n1"}"#, 200).await,
            stub(r#"{"uuid": "x"}"#, 500).await,
        ] {
            let (id, src) = resolve_node_id(None, &url, dmi.path()).await.unwrap();
            assert_eq!(id, "4c4c4544-0042-3510-8056-b4c04f4a4b32", "{url}");
            assert_eq!(src, NodeIdSource::Dmi);
        }
    }

    #[tokio::test]
    async fn fails_clearly_when_nothing_works() {
        let zeros = dmi_file("00000000-0000-0000-0000-000000000000");
        let err = resolve_node_id(None, &dead_url(), zeros.path())
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("metadata service") && msg.contains("all zeros"),
            "{msg}"
        );
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        let err = resolve_node_id(None, &dead_url(), Path::new("/nonexistent/uuid"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("--node-id"));
    }
}
