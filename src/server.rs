//! Serving the CSI services on a unix socket.
//!
//! The socket is where Kubernetes sidecars and kubelet find the driver, so its lifecycle
//! matters: a stale socket from a crashed run is replaced (but never a non-socket file), the
//! parent directory is created, permissions are restrictive, and on SIGTERM/SIGINT the server
//! stops accepting, lets in-flight calls finish within a bound, and removes the socket.

use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::driver::{
    ControllerConfig, ControllerService, IdentityService, NodeConfig, NodeService,
};
use crate::lunanode::Client;
use crate::metrics::Metrics;

/// The CSI services of one driver process: Identity always, the Controller when given a
/// client and its settings, the Node when given its settings, all reporting to `metrics`
/// when given. `serve` and `demo` both build their servers here, so the demo runs exactly
/// what a deployment runs. A Node configuration the service refuses is the error.
pub fn csi_router(
    controller: Option<(Client, ControllerConfig)>,
    node: Option<NodeConfig>,
    ready: Arc<AtomicBool>,
    metrics: Option<Arc<Metrics>>,
) -> crate::driver::error::Result<tonic::transport::server::Router> {
    let mut identity = IdentityService::new(controller.is_some(), ready);
    if let Some(m) = &metrics {
        identity = identity.with_metrics(m.clone());
    }
    let controller = controller.map(|(client, cfg)| {
        let svc = match &metrics {
            Some(m) => {
                ControllerService::new(client.with_metrics(m.clone()), cfg).with_metrics(m.clone())
            }
            None => ControllerService::new(client, cfg),
        };
        crate::csi::controller_server::ControllerServer::new(svc)
    });
    let node = match node {
        Some(cfg) => {
            let mut svc = NodeService::new(cfg)?;
            if let Some(m) = &metrics {
                svc = svc.with_metrics(m.clone());
            }
            Some(crate::csi::node_server::NodeServer::new(svc))
        }
        None => None,
    };
    Ok(tonic::transport::Server::builder()
        .add_service(crate::csi::identity_server::IdentityServer::new(identity))
        .add_optional_service(controller)
        .add_optional_service(node))
}

/// Where the gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    path: PathBuf,
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "invalid endpoint {0:?}: expected unix:///absolute/path/csi.sock (or an absolute path)"
    )]
    BadScheme(String),
    #[error("invalid endpoint {0:?}: the socket path must be absolute")]
    RelativePath(String),
    #[error("cannot use socket path {}: {reason}", path.display())]
    Path { path: PathBuf, reason: String },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl FromStr for Endpoint {
    type Err = ServeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let raw = if let Some(rest) = s.strip_prefix("unix://") {
            rest
        } else if let Some(rest) = s.strip_prefix("unix:") {
            rest
        } else if s.contains("://") || s.is_empty() {
            return Err(ServeError::BadScheme(s.to_string()));
        } else {
            s
        };
        if raw.is_empty() {
            return Err(ServeError::BadScheme(s.to_string()));
        }
        let path = PathBuf::from(raw);
        if !path.is_absolute() {
            return Err(ServeError::RelativePath(s.to_string()));
        }
        Ok(Endpoint { path })
    }
}

impl Endpoint {
    /// The socket's path on disk.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Create the parent directory, remove a stale socket, bind, and restrict permissions.
    pub fn bind(&self) -> Result<UnixListener, ServeError> {
        let path = &self.path;
        let err = |reason: String| ServeError::Path {
            path: path.clone(),
            reason,
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| err(format!("cannot create directory {}: {e}", parent.display())))?;
        }
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                fs::remove_file(path)
                    .map_err(|e| err(format!("cannot remove stale socket: {e}")))?;
            }
            Ok(_) => {
                return Err(err(
                    "a file that is not a socket is in the way; remove it or choose another path"
                        .into(),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e.to_string())),
        }
        // Bind under a restrictive umask so the socket is never reachable by others, not
        // even between bind and chmod. Start-up is the only place the process binds.
        let old_mask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o117));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old_mask);
        let listener = bound.map_err(|e| err(format!("cannot bind: {e}")))?;
        // Only the sidecars and kubelet (root, same pod or host) need the socket.
        fs::set_permissions(path, fs::Permissions::from_mode(0o660))
            .map_err(|e| err(format!("cannot set permissions: {e}")))?;
        Ok(listener)
    }
}

/// Serve `router` on `listener` until `shutdown` completes, then wait at most `grace` for
/// in-flight calls before returning. The socket file is removed on the way out.
pub async fn serve<L, S>(
    router: tonic::transport::server::Router<L>,
    endpoint: &Endpoint,
    listener: UnixListener,
    shutdown: S,
    grace: Duration,
) -> Result<(), ServeError>
where
    S: Future<Output = ()> + Send + 'static,
    L: tower::Layer<tonic::service::Routes> + Clone,
    L::Service: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Future: Send + 'static,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        tracing::info!("shutdown requested: no new calls accepted, waiting for in-flight calls");
        let _ = stopping_tx.send(true);
    };
    let incoming = UnixListenerStream::new(listener);
    let server = router.serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    let deadline = async {
        let _ = stopping_rx.wait_for(|stopping| *stopping).await;
        tokio::time::sleep(grace).await;
    };
    let result = tokio::select! {
        res = &mut server => res.map_err(ServeError::from),
        _ = deadline => {
            tracing::warn!(grace_secs = grace.as_secs_f64(), "in-flight calls did not finish in time; exiting anyway");
            Ok(())
        }
    };
    let _ = fs::remove_file(endpoint.path());
    result
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        let e: Endpoint = "unix:///csi/csi.sock".parse().unwrap();
        assert_eq!(e.path(), Path::new("/csi/csi.sock"));
        let e: Endpoint = "unix:/csi/csi.sock".parse().unwrap();
        assert_eq!(e.path(), Path::new("/csi/csi.sock"));
        let e: Endpoint = "/tmp/x.sock".parse().unwrap();
        assert_eq!(e.path(), Path::new("/tmp/x.sock"));
        assert!(matches!(
            "tcp://1.2.3.4:5".parse::<Endpoint>(),
            Err(ServeError::BadScheme(_))
        ));
        assert!(matches!(
            "unix://csi.sock".parse::<Endpoint>(),
            Err(ServeError::RelativePath(_))
        ));
        assert!(matches!(
            "relative.sock".parse::<Endpoint>(),
            Err(ServeError::RelativePath(_))
        ));
        assert!(matches!(
            "".parse::<Endpoint>(),
            Err(ServeError::BadScheme(_))
        ));
    }

    #[tokio::test]
    async fn refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        fs::write(&path, b"not a socket").unwrap();
        let e: Endpoint = path.to_str().unwrap().parse().unwrap();
        assert!(matches!(e.bind(), Err(ServeError::Path { .. })));
        assert_eq!(fs::read(&path).unwrap(), b"not a socket");
    }

    #[tokio::test]
    async fn replaces_a_stale_socket_and_restricts_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/csi.sock");
        let e: Endpoint = path.to_str().unwrap().parse().unwrap();
        drop(e.bind().unwrap());
        assert!(path.exists(), "a dropped listener leaves its socket behind");
        let _l = e.bind().unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
    }
}
