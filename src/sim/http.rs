//! The HTTP face of the simulator: routes, form parsing, authentication, faults.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::actions::{self, Params};
use super::faults::FaultKind;
use super::journal::SimRequest;
use super::{Inner, lock, sign};

/// The error text for a refused signature or credentials.
pub const AUTH_ERROR: &str = "authentication failed: invalid signature";
/// The error text for throttling.
pub const RATE_LIMIT_ERROR: &str = "rate limit exceeded";
/// The error text of the injected transient `success: no`.
pub const TRANSIENT_ERROR: &str = "temporarily unavailable, try again";

pub fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/api/{category}/{action}/", post(api))
        .route("/api/{category}/{action}", post(api))
        .route("/_sim/state", get(state))
        .route("/_sim/requests", get(requests))
        .route("/_sim/faults", post(set_faults))
        .with_state(inner)
}

fn json_reply(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn failure(status: StatusCode, msg: &str) -> Response {
    json_reply(status, &json!({ "success": "no", "error": msg }))
}

fn text(status: StatusCode) -> Response {
    let body = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("error")
    );
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

async fn state(State(inner): State<Arc<Inner>>) -> Response {
    let s = inner.snapshot_state();
    json_reply(
        StatusCode::OK,
        &serde_json::to_value(s).unwrap_or(Value::Null),
    )
}

async fn requests(State(inner): State<Arc<Inner>>) -> Response {
    let all = lock(&inner.journal).all();
    json_reply(
        StatusCode::OK,
        &serde_json::to_value(all).unwrap_or(Value::Null),
    )
}

/// What `POST /_sim/faults` changes; a field left out keeps its setting. The same knobs as
/// `sim`'s flags, for a simulator that is already running (an embedded one included, whose
/// URL `serve --sim` logs): tests turn faults on and off while the driver runs.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSettings {
    /// Probability (0 to 1) that a request fails with an injected fault.
    fault_rate: Option<f64>,
    /// The kinds drawn from (`http500`, `http503`, `timeout`, `http429`, `transient`,
    /// `lost-reply`); empty: none.
    fault_kinds: Option<Vec<FaultKind>>,
    /// Server-side rate limit in requests per second; 0: none.
    rate_limit_qps: Option<f64>,
    /// `--transition-ms` items (`attach=3600000`, `100..200`, `steady`…), applied in order
    /// on top of the current durations, for changes started from now on.
    transition_ms: Option<Vec<String>>,
    /// Refuse every request as a bad API key or signature is refused.
    refuse_credentials: Option<bool>,
}

/// `POST /_sim/faults`: change faults, rate limit, transitions and credentials; answers the
/// fault settings now in force.
async fn set_faults(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let bad = |m: String| json_reply(StatusCode::BAD_REQUEST, &json!({ "error": m }));
    let s: FaultSettings = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return bad(format!("invalid fault settings: {e}")),
    };
    if let Some(r) = s.fault_rate
        && !(0.0..=1.0).contains(&r)
    {
        return bad(format!(
            "fault_rate {r} is not a probability between 0 and 1"
        ));
    }
    if let Some(q) = s.rate_limit_qps
        && !(q.is_finite() && q >= 0.0)
    {
        return bad(format!("rate_limit_qps {q} is not 0 or a positive number"));
    }
    let items = match s
        .transition_ms
        .iter()
        .flatten()
        .map(|i| i.parse::<super::TransitionItem>())
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(items) => items,
        Err(e) => return bad(format!("transition_ms: {e}")),
    };
    {
        let mut f = lock(&inner.faults);
        if let Some(r) = s.fault_rate {
            f.rate = super::faults::clamp_rate(r);
        }
        if let Some(k) = s.fault_kinds {
            f.kinds = k;
        }
    }
    if let Some(q) = s.rate_limit_qps {
        *lock(&inner.bucket) = (q > 0.0).then(|| super::TokenBucket::new(q, Instant::now()));
    }
    if !items.is_empty() {
        let mut w = lock(&inner.world);
        let t = &mut w.cloud.rules.transitions;
        *t = super::Transitions::apply(*t, &items);
    }
    if let Some(r) = s.refuse_credentials {
        inner.refuse_credentials.store(r, Relaxed);
    }
    let f = lock(&inner.faults);
    json_reply(
        StatusCode::OK,
        &json!({
            "fault_rate": f.rate,
            "fault_kinds": f.kinds,
            "rate_limit_qps": lock(&inner.bucket).as_ref().map(|b| b.qps()),
            "refuse_credentials": inner.refuse_credentials.load(Relaxed),
        }),
    )
}

/// One API request, timed from the handler's start to its reply (see also [`Timed`], which
/// times the whole exchange on the connection).
async fn api(
    State(inner): State<Arc<Inner>>,
    Path((category, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let _answering = InFlight::enter(&inner);
    let reply = serve_api(inner.clone(), category, action, body).await;
    let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    inner
        .api_nanos
        .fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
    reply
}

/// Counts a request as being answered until dropped (also when the caller hangs up and the
/// request future is dropped mid-way).
struct InFlight<'a>(&'a Inner);

impl<'a> InFlight<'a> {
    fn enter(inner: &'a Inner) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let now = inner.in_flight.fetch_add(1, Relaxed) + 1;
        inner.max_in_flight.fetch_max(now, Relaxed);
        InFlight(inner)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn serve_api(inner: Arc<Inner>, category: String, action: String, body: Bytes) -> Response {
    let handler = format!("{category}/{action}");
    *lock(&inner.calls).entry(handler.clone()).or_insert(0) += 1;
    let form = parse_form(&body);
    lock(&inner.journal).push(SimRequest::from_form(&handler, &form));

    let allowed = match lock(&inner.bucket).as_mut() {
        Some(b) => b.try_take(Instant::now()),
        None => true,
    };
    if !allowed {
        return failure(StatusCode::TOO_MANY_REQUESTS, RATE_LIMIT_ERROR);
    }
    let latency = *lock(&inner.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (fault, hold) = {
        let mut f = lock(&inner.faults);
        (f.draw(), f.timeout)
    };
    if let Some(kind) = fault {
        tracing::debug!(handler = %handler, fault = ?kind, "sim: injecting a fault");
    }
    match fault {
        Some(FaultKind::Http500) => return text(StatusCode::INTERNAL_SERVER_ERROR),
        Some(FaultKind::Http503) => return text(StatusCode::SERVICE_UNAVAILABLE),
        Some(FaultKind::Http429) => {
            return failure(StatusCode::TOO_MANY_REQUESTS, RATE_LIMIT_ERROR);
        }
        Some(FaultKind::Transient) => return failure(StatusCode::OK, TRANSIENT_ERROR),
        Some(FaultKind::Timeout) => {
            let mut stop = inner.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(hold) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            return text(StatusCode::GATEWAY_TIMEOUT);
        }
        Some(FaultKind::LostReply) | None => {}
    }
    let reply = handle(inner, &category, &action, handler, &form).await;
    if fault == Some(FaultKind::LostReply) {
        return text(StatusCode::SERVICE_UNAVAILABLE);
    }
    reply
}

/// Authenticate and run one request.
async fn handle(
    inner: Arc<Inner>,
    category: &str,
    action: &str,
    handler: String,
    form: &HashMap<String, String>,
) -> Response {
    let (Some(req), Some(sig), Some(nonce)) =
        (form.get("req"), form.get("signature"), form.get("nonce"))
    else {
        return failure(StatusCode::OK, AUTH_ERROR);
    };
    if inner
        .refuse_credentials
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return failure(StatusCode::OK, AUTH_ERROR);
    }
    // The real cloud fails the signature check of a `req` with multi-byte characters even
    // when the HMAC over its bytes is right (escaped as `\uXXXX` they pass).
    if !req.is_ascii() {
        return failure(StatusCode::OK, AUTH_ERROR);
    }
    let params = match parse_req(req) {
        Some(p) => p,
        None => return failure(StatusCode::OK, "invalid request: req is not a JSON object"),
    };
    let partial: String = inner.api_key.chars().take(64).collect();
    let signed_path = format!("{category}/{action}/");
    let authentic = params.0.get("api_id") == Some(&inner.api_id)
        && params.0.get("api_partialkey") == Some(&partial)
        && sign::verify(&inner.api_key, &signed_path, req, nonce, sig);
    if !authentic {
        return failure(StatusCode::OK, AUTH_ERROR);
    }
    let work = inner.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut world = lock(&work.world);
        let r = actions::execute(&mut world, Instant::now(), &handler, &params);
        (r, world.cloud.rules.quirks.object_lists)
    })
    .await;
    match result {
        Ok((Ok(v), object_lists)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            actions::reply_text(&v, object_lists),
        )
            .into_response(),
        Ok((Err(e), _)) => failure(StatusCode::OK, &e.0),
        Err(e) => {
            tracing::error!(error = %e, "sim: action panicked");
            text(StatusCode::INTERNAL_SERVER_ERROR)
        }
    }
}

/// The `req` JSON object, with every value as a string (numbers and booleans converted).
pub fn parse_req(req: &str) -> Option<Params> {
    let Value::Object(map) = serde_json::from_str::<Value>(req).ok()? else {
        return None;
    };
    let mut out = HashMap::new();
    for (k, v) in map {
        let s = match v {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => (if b { "1" } else { "" }).to_string(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        out.insert(k, s);
    }
    Some(Params(out))
}

/// Parse `application/x-www-form-urlencoded` (the last value of a repeated key wins).
/// Malformed `%` escapes are kept as they are and invalid UTF-8 is replaced, as a lenient
/// server does.
pub fn parse_form(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// The simulator's listener: sets `TCP_NODELAY` on each connection (axum's `serve` does not)
/// and times the simulator's own handling of every request on it (see [`Timed`]).
pub(crate) struct TimedListener {
    pub(crate) listener: tokio::net::TcpListener,
    pub(crate) inner: Arc<Inner>,
}

impl axum::serve::Listener for TimedListener {
    type Io = Timed;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Timed, std::net::SocketAddr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        if let Err(e) = io.set_nodelay(true) {
            tracing::debug!(error = %e, "sim: cannot set TCP_NODELAY");
        }
        let timed = Timed {
            io,
            inner: self.inner.clone(),
            since: None,
            answering: false,
        };
        (timed, addr)
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// A connection that adds to [`Inner::served_nanos`] the time from the first bytes of each
/// request read to its response written: everything the simulator does for the request
/// (HTTP parsing, routing, the handler with its latency, the reply and the write), and
/// nothing of the client's (requests on one connection are answered in turn, so the
/// client's time between them falls outside the spans). The time the bytes spend reaching
/// the simulator, and the reply reaching the client, are not in it.
pub(crate) struct Timed {
    io: tokio::net::TcpStream,
    inner: Arc<Inner>,
    /// When the request being answered was first read (or its reply last written to).
    since: Option<Instant>,
    /// The reply has started to be written: the next bytes read start a new request.
    answering: bool,
}

impl Timed {
    fn read_some(&mut self) {
        if self.since.is_none() || self.answering {
            self.since = Some(Instant::now());
            self.answering = false;
        }
    }

    /// Called with every write's outcome; only bytes actually written count.
    fn wrote(&mut self, r: &std::task::Poll<std::io::Result<usize>>) {
        if !matches!(r, std::task::Poll::Ready(Ok(n)) if *n > 0) {
            return;
        }
        if let Some(since) = self.since {
            let now = Instant::now();
            let nanos = u64::try_from((now - since).as_nanos()).unwrap_or(u64::MAX);
            self.inner
                .served_nanos
                .fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
            self.since = Some(now);
            self.answering = true;
        }
    }
}

impl tokio::io::AsyncRead for Timed {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.read_some();
        }
        r
    }
}

impl tokio::io::AsyncWrite for Timed {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(&r);
        r
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        let f = parse_form(b"req=%7B%22a%22%3A%22b+c%22%7D&signature=ab&nonce=12&x=%zz&y=%4");
        assert_eq!(f["req"], r#"{"a":"b c"}"#);
        assert_eq!(f["signature"], "ab");
        assert_eq!(f["nonce"], "12");
        assert_eq!(f["x"], "%zz");
        assert_eq!(f["y"], "%4");
        assert!(parse_form(b"").is_empty());
        assert_eq!(parse_form(b"a=%41")["a"], "A");
    }

    #[test]
    fn req_values_become_strings() {
        let p = parse_req(r#"{"size":10,"label":"x","flag":true,"n":null}"#).unwrap();
        assert_eq!(p.0["size"], "10");
        assert_eq!(p.0["label"], "x");
        assert_eq!(p.0["flag"], "1");
        assert_eq!(p.opt("n"), None);
        assert!(parse_req("[1]").is_none());
        assert!(parse_req("nope").is_none());
    }
}
