//! Per-RPC logging and metrics: every call is logged once with its method, the IDs it
//! names, the gRPC code and the duration, and counted when metrics are on. Request bodies
//! are never logged, so CSI `secrets` cannot leak.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Response, Status};

use super::error::Error;
use crate::metrics::Metrics;

/// What every RPC of a service reports to: the log always, metrics when configured.
/// Cheap to clone; the default has no metrics.
#[derive(Debug, Clone, Default)]
pub struct Observer {
    metrics: Option<Arc<Metrics>>,
}

impl Observer {
    /// An observer that also records metrics.
    pub fn with_metrics(metrics: Arc<Metrics>) -> Self {
        Observer {
            metrics: Some(metrics),
        }
    }

    /// The metrics calls are recorded in, if any.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    async fn rpc<T, F>(
        &self,
        method: &'static str,
        ids: Ids<'_>,
        handler: F,
    ) -> Result<Response<T>, Status>
    where
        F: Future<Output = Result<T, Error>>,
    {
        let Some(m) = &self.metrics else {
            return rpc(method, ids, handler).await;
        };
        // Dropped unfinished (the call was cancelled), the guard counts a `Cancelled`.
        let guard = m.rpc_started(method);
        let result = rpc(method, ids, handler).await;
        guard.finish(match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        });
        result
    }
}

/// The identifiers of a request that are safe and useful to log.
#[derive(Debug, Default, Clone)]
pub struct Ids<'a> {
    pub name: Option<&'a str>,
    pub volume_id: Option<&'a str>,
    pub snapshot_id: Option<&'a str>,
    pub node_id: Option<&'a str>,
}

impl<'a> Ids<'a> {
    /// A call that names a volume.
    pub fn volume(id: &'a str) -> Self {
        Ids {
            volume_id: Some(id),
            ..Default::default()
        }
    }

    /// A call that names a snapshot.
    pub fn snapshot(id: &'a str) -> Self {
        Ids {
            snapshot_id: Some(id),
            ..Default::default()
        }
    }

    /// A create call, named by its idempotency key.
    pub fn named(name: &'a str) -> Self {
        Ids {
            name: Some(name),
            ..Default::default()
        }
    }

    /// Also name a node.
    pub fn on_node(self, node_id: &'a str) -> Self {
        Ids {
            node_id: Some(node_id),
            ..self
        }
    }
}

fn nonempty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

/// Run one RPC handler, log its outcome (and count it in `obs`'s metrics, if any), and turn
/// its error into a gRPC status.
pub async fn rpc_with<T, F>(
    obs: &Observer,
    method: &'static str,
    ids: Ids<'_>,
    handler: F,
) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, Error>>,
{
    obs.rpc(method, ids, handler).await
}

/// Run one RPC handler, log its outcome, and turn its error into a gRPC status.
pub async fn rpc<T, F>(
    method: &'static str,
    ids: Ids<'_>,
    handler: F,
) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, Error>>,
{
    let started = Instant::now();
    let result = handler.await;
    let elapsed = started.elapsed();
    let ms = elapsed.as_secs_f64() * 1000.0;
    let (name, volume_id, snapshot_id, node_id) = (
        nonempty(ids.name),
        nonempty(ids.volume_id),
        nonempty(ids.snapshot_id),
        nonempty(ids.node_id),
    );
    match result {
        Ok(resp) => {
            tracing::info!(
                method,
                name,
                volume_id,
                snapshot_id,
                node_id,
                code = "OK",
                duration_ms = ms,
                "rpc"
            );
            Ok(Response::new(resp))
        }
        Err(err) => {
            let status: Status = err.into();
            let code = format!("{:?}", status.code());
            let message = status.message();
            tracing::warn!(
                method,
                name,
                volume_id,
                snapshot_id,
                node_id,
                code,
                duration_ms = ms,
                error = message,
                "rpc"
            );
            Err(status)
        }
    }
}
