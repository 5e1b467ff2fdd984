//! Which VM is this node, and in which region? Both are resolved once, at start-up, and
//! the node plugin does not start without both.
//!
//! The node ID must be the Luna Node VM ID, because the controller attaches volumes to it.
//! Sources, in order: an explicit setting, the OpenStack metadata service (`uuid`), the
//! SMBIOS system UUID; [`NodeIdLookup`] can restrict the lookup to one of the last two (so
//! nothing probes the link-local metadata address on hosts that have none).
//!
//! The region is reported as the node's topology, and the provisioner refuses to create any
//! volume for a `WaitForFirstConsumer` claim on a node without it, so a node that cannot
//! name its region must fail to start rather than register with an empty topology. Sources:
//! an explicit setting (the chart passes one), else the cloud's `vm/info` for this VM when
//! the node was given API credentials (opt-in: it puts the account key on every node). The
//! metadata document is not used: Luna Node does not document a region in it.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use super::error::Error;
use crate::lunanode::Client;

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

/// Which sources may name the node's VM when no node ID is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NodeIdLookup {
    /// The metadata service, else the SMBIOS UUID.
    #[default]
    Auto,
    /// Only the OpenStack metadata service.
    Metadata,
    /// Only the SMBIOS system UUID (never touches the network).
    Smbios,
}

/// Where the region came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionSource {
    /// The `--region` setting.
    Explicit,
    /// The cloud's `vm/info` for this node's VM.
    Cloud,
}

impl fmt::Display for RegionSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RegionSource::Explicit => "explicit setting",
            RegionSource::Cloud => "the cloud's vm/info",
        })
    }
}

/// What the node was told about itself: each `None` is looked up.
#[derive(Debug, Clone, Default)]
pub struct IdentitySettings {
    /// The VM ID, when set explicitly.
    pub node_id: Option<String>,
    /// Where to look for the VM ID when it is not set.
    pub lookup: NodeIdLookup,
    /// The region, when set explicitly.
    pub region: Option<String>,
    /// The regions the driver manages; the node's must be one of them.
    pub regions: Vec<String>,
}

/// This node's VM ID and region, and where each came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_id: String,
    pub node_id_source: NodeIdSource,
    pub region: String,
    pub region_source: RegionSource,
}

/// Resolve the node's VM ID (see [`resolve_node_id`]), then its region (see
/// [`resolve_region`]), from the real metadata service and SMBIOS, asking `cloud` for the
/// region only when it is not set.
pub async fn resolve(
    settings: &IdentitySettings,
    cloud: Option<&Client>,
) -> Result<NodeIdentity, Error> {
    let (node_id, node_id_source) = resolve_node_id(
        settings.node_id.clone(),
        settings.lookup,
        DEFAULT_METADATA_URL,
        Path::new(DEFAULT_DMI_PATH),
    )
    .await?;
    let (region, region_source) =
        resolve_region(settings.region.clone(), &node_id, cloud, &settings.regions).await?;
    Ok(NodeIdentity {
        node_id,
        node_id_source,
        region,
        region_source,
    })
}

/// What to tell an operator whose node has no region.
const SET_REGION: &str = "Set --region (LUNANODE_REGION); with the Helm chart, set the value \
     `region` (the one region of the cluster's nodes) or `node.regions` (one node DaemonSet \
     per region, on nodes labelled with their region)";

/// Resolve the node's region: `explicit` (when non-empty) wins, else the cloud's `vm/info`
/// for `node_id` when a client is given. It must be one of `regions`. Every failure is an
/// error that names the setting to set: a node without a region would register no topology
/// and leave every `WaitForFirstConsumer` claim Pending.
pub async fn resolve_region(
    explicit: Option<String>,
    node_id: &str,
    cloud: Option<&Client>,
    regions: &[String],
) -> Result<(String, RegionSource), Error> {
    let explicit = explicit
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let (region, source) = match (explicit, cloud) {
        (Some(r), _) => (r, RegionSource::Explicit),
        (None, Some(client)) => match client.vm_info(node_id).await {
            Ok(vm) if !vm.region.trim().is_empty() => {
                (vm.region.trim().to_string(), RegionSource::Cloud)
            }
            Ok(_) => {
                return Err(Error::FailedPrecondition(format!(
                    "cannot determine this node's region: the cloud's vm/info for VM {node_id} \
                     names none. {SET_REGION}"
                )));
            }
            Err(e) => {
                return Err(Error::FailedPrecondition(format!(
                    "cannot determine this node's region: asking the cloud for VM {node_id} \
                     failed: {e}. {SET_REGION}"
                )));
            }
        },
        (None, None) => {
            return Err(Error::FailedPrecondition(format!(
                "cannot determine this node's region: none was set, and the node plugin has \
                 no API credentials to ask the cloud. Without a region the node would \
                 register no topology and no claim could be provisioned for it. {SET_REGION}"
            )));
        }
    };
    if !regions.contains(&region) {
        return Err(Error::FailedPrecondition(format!(
            "this node's region {region:?} (from the {source}) is not one of the regions the \
             driver manages ({}); set --region to one of them, or add it to --regions",
            regions.join(", ")
        )));
    }
    Ok((region, source))
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

/// Resolve the node ID: `explicit` (when non-empty) wins, else the sources `lookup`
/// allows: the metadata service at `metadata_url`, then the UUID in `dmi_path`
/// (lowercased).
pub async fn resolve_node_id(
    explicit: Option<String>,
    lookup: NodeIdLookup,
    metadata_url: &str,
    dmi_path: &Path,
) -> Result<(String, NodeIdSource), Error> {
    if let Some(id) = explicit
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
    {
        return Ok((id, NodeIdSource::Explicit));
    }
    let mut tried = Vec::new();
    if lookup != NodeIdLookup::Smbios {
        match from_metadata(metadata_url).await {
            Ok(id) => return Ok((id, NodeIdSource::MetadataService)),
            Err(e) => {
                tracing::debug!(url = metadata_url, error = %e, "metadata service gave no node ID");
                tried.push(format!("metadata service {metadata_url}: {e}"));
            }
        }
    }
    if lookup != NodeIdLookup::Metadata {
        match from_dmi(dmi_path) {
            Ok(id) => return Ok((id, NodeIdSource::Dmi)),
            Err(e) => tried.push(format!("{}: {e}", dmi_path.display())),
        }
    }
    Err(Error::FailedPrecondition(format!(
        "cannot determine this node's ID (the Luna Node VM ID): no node ID was set; {}. \
         Set the node ID explicitly (--node-id), or choose another source \
         (--node-id-source; chart value node.idSource)",
        tried.join("; ")
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
        let (id, src) = resolve_node_id(
            Some(" vm-1 ".into()),
            NodeIdLookup::Auto,
            &dead_url(),
            dmi.path(),
        )
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
        let (id, src) = resolve_node_id(Some(String::new()), NodeIdLookup::Auto, &url, dmi.path())
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
            let (id, src) = resolve_node_id(None, NodeIdLookup::Auto, &url, dmi.path())
                .await
                .unwrap();
            assert_eq!(id, "4c4c4544-0042-3510-8056-b4c04f4a4b32", "{url}");
            assert_eq!(src, NodeIdSource::Dmi);
        }
    }

    #[tokio::test]
    async fn fails_clearly_when_nothing_works() {
        let zeros = dmi_file("00000000-0000-0000-0000-000000000000");
        let err = resolve_node_id(None, NodeIdLookup::Auto, &dead_url(), zeros.path())
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("metadata service") && msg.contains("all zeros"),
            "{msg}"
        );
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        let err = resolve_node_id(
            None,
            NodeIdLookup::Auto,
            &dead_url(),
            Path::new("/nonexistent/uuid"),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("--node-id"));
    }

    #[tokio::test]
    async fn lookup_restricts_the_sources() {
        let url = stub(r#"{"uuid": "0d7a5c2e-1111-2222-3333-444455556666"}"#, 200).await;
        let dmi = dmi_file(DMI);
        let (id, src) = resolve_node_id(None, NodeIdLookup::Smbios, &url, dmi.path())
            .await
            .unwrap();
        assert_eq!(id, "4c4c4544-0042-3510-8056-b4c04f4a4b32");
        assert_eq!(
            src,
            NodeIdSource::Dmi,
            "smbios never asks the metadata service"
        );
        let (_, src) = resolve_node_id(None, NodeIdLookup::Metadata, &url, dmi.path())
            .await
            .unwrap();
        assert_eq!(src, NodeIdSource::MetadataService);

        // Restricted to one source, its failure is the error: no silent fallback.
        let err = resolve_node_id(None, NodeIdLookup::Metadata, &dead_url(), dmi.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("metadata service") && !err.contains("product_uuid"),
            "{err}"
        );
        assert!(err.contains("--node-id-source"), "{err}");
        let err = resolve_node_id(
            None,
            NodeIdLookup::Smbios,
            &url,
            Path::new("/nonexistent/product_uuid"),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/nonexistent/product_uuid") && !err.contains("metadata"),
            "{err}"
        );
    }

    fn regions() -> Vec<String> {
        ["toronto", "montreal", "roubaix"]
            .map(String::from)
            .to_vec()
    }

    #[tokio::test]
    async fn explicit_region_is_checked_against_the_managed_regions() {
        let (r, src) = resolve_region(Some(" montreal ".into()), "vm-1", None, &regions())
            .await
            .unwrap();
        assert_eq!((r.as_str(), src), ("montreal", RegionSource::Explicit));
        let err = resolve_region(Some("toront".into()), "vm-1", None, &regions())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        let msg = err.to_string();
        assert!(
            msg.contains("\"toront\"") && msg.contains("toronto, montreal, roubaix"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn no_region_source_is_an_error_that_names_the_settings() {
        for explicit in [None, Some(String::new()), Some("  ".into())] {
            let msg = resolve_region(explicit, "vm-1", None, &regions())
                .await
                .unwrap_err()
                .to_string();
            for needle in ["--region", "LUNANODE_REGION", "`region`", "node.regions"] {
                assert!(msg.contains(needle), "{needle} not in {msg}");
            }
        }
    }

    async fn sim_with_vm(region: &str) -> (crate::sim::SimHandle, Client, String) {
        let sim = crate::sim::SimHandle::start(crate::sim::SimConfig {
            vms: vec![crate::sim::VmSpec {
                region: region.into(),
                name: Some("node-a".into()),
            }],
            ..Default::default()
        })
        .await
        .unwrap();
        let creds = crate::lunanode::Credentials::new(&sim.api_id, &sim.api_key).unwrap();
        let client =
            Client::new(crate::lunanode::ClientConfig::new(sim.url.clone(), creds)).unwrap();
        let vm = sim.vms[0].id.clone();
        (sim, client, vm)
    }

    #[tokio::test]
    async fn region_from_the_cloud_when_a_client_is_given() {
        let (sim, client, vm) = sim_with_vm("roubaix").await;
        let (r, src) = resolve_region(None, &vm, Some(&client), &regions())
            .await
            .unwrap();
        assert_eq!((r.as_str(), src), ("roubaix", RegionSource::Cloud));
        // The explicit setting wins without asking.
        let (r, src) = resolve_region(Some("toronto".into()), &vm, Some(&client), &regions())
            .await
            .unwrap();
        assert_eq!((r.as_str(), src), ("toronto", RegionSource::Explicit));
        // A VM the cloud does not know is an error, not an empty topology.
        let msg = resolve_region(None, "no-such-vm", Some(&client), &regions())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("no-such-vm") && msg.contains("--region"),
            "{msg}"
        );
        sim.shutdown().await;
    }
}
