//! Per-RPC logging: every call is logged once with its method, the IDs it names, the gRPC
//! code and the duration. Request bodies are never logged, so CSI `secrets` cannot leak.

use std::future::Future;
use std::time::Instant;

use tonic::{Response, Status};

use super::error::Error;

/// The identifiers of a request that are safe and useful to log.
#[derive(Debug, Default, Clone)]
pub struct Ids<'a> {
    pub name: Option<&'a str>,
    pub volume_id: Option<&'a str>,
    pub snapshot_id: Option<&'a str>,
    pub node_id: Option<&'a str>,
}

fn nonempty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
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
