//! The one error type of the Luna Node client.

/// A failed Luna Node API call, classified so callers can decide whether to retry, reconcile
/// or report. Every variant keeps the action and the cloud's own (HTML-unescaped) message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The object named in the call does not exist.
    #[error("{action}: {message}")]
    NotFound { action: String, message: String },
    /// The cloud refused a parameter.
    #[error("{action}: {message}")]
    InvalidArgument { action: String, message: String },
    /// The object is in the wrong state (e.g. attached, not available).
    #[error("{action}: {message}")]
    WrongState { action: String, message: String },
    /// A quota or hard limit was reached (e.g. no free disk slot on the VM).
    #[error("{action}: limit reached: {message}")]
    LimitExceeded { action: String, message: String },
    /// The cloud's rate limit was hit (HTTP 429 or a rate-limit message).
    #[error("{action}: throttled: {message}")]
    Throttled { action: String, message: String },
    /// A failure that may succeed when repeated: connection errors, timeouts, 5xx.
    #[error("{action}: transient failure: {message}")]
    Transient { action: String, message: String },
    /// The API ID or key was refused.
    #[error("{action}: authentication failed: {message}")]
    Auth { action: String, message: String },
    /// Anything else the cloud said.
    #[error("{action}: {message}")]
    Other { action: String, message: String },
}

impl ApiError {
    /// Whether repeating the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ApiError::Throttled { .. } | ApiError::Transient { .. }
        )
    }

    /// The cloud's message, without the action.
    pub fn message(&self) -> &str {
        match self {
            ApiError::NotFound { message, .. }
            | ApiError::InvalidArgument { message, .. }
            | ApiError::WrongState { message, .. }
            | ApiError::LimitExceeded { message, .. }
            | ApiError::Throttled { message, .. }
            | ApiError::Transient { message, .. }
            | ApiError::Auth { message, .. }
            | ApiError::Other { message, .. } => message,
        }
    }

    /// Classify a `success: no` body by its message. The real cloud's messages are not
    /// documented beyond a few examples, so this matches on the wording the API and its
    /// public clients are known to use, and falls back to [`ApiError::Other`].
    pub fn from_cloud_message(action: &str, message: &str) -> Self {
        let action = action.to_string();
        let lower = message.to_ascii_lowercase();
        let message = message.to_string();
        let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
        if has(&["rate limit", "too many requests", "throttl", "slow down"]) {
            ApiError::Throttled { action, message }
        } else if has(&["nonce"]) {
            // A nonce the server did not like (e.g. reordered concurrent requests): a fresh
            // request carries a fresh nonce.
            ApiError::Transient { action, message }
        } else if has(&["maximum of", "quota", "limit reached", "too many volumes"]) {
            ApiError::LimitExceeded { action, message }
        } else if has(&[
            "temporarily",
            "try again",
            "internal error",
            "service unavailable",
            "timed out",
        ]) {
            ApiError::Transient { action, message }
        } else if has(&[
            "authentication",
            "signature",
            "invalid api",
            "api key",
            "api_id",
            "unauthorized",
            "permission denied",
        ]) {
            ApiError::Auth { action, message }
        } else if has(&["not found", "does not exist", "no such"]) || names_unknown_object(&lower) {
            ApiError::NotFound { action, message }
        } else if has(&[
            "attached",
            "in use",
            "in-use",
            "not available",
            "busy",
            "detached",
            "must be",
            "state",
            "has snapshots",
        ]) {
            ApiError::WrongState { action, message }
        } else if has(&[
            "invalid",
            "missing",
            "required",
            "must",
            "region not set",
            "unknown region",
        ]) {
            ApiError::InvalidArgument { action, message }
        } else {
            ApiError::Other { action, message }
        }
    }
}

/// "invalid vm" is how the API says a VM does not exist (and likewise for the other
/// objects), but "invalid volume size" is a bad parameter: only the bare phrase, optionally
/// followed by an ID, names an unknown object.
fn names_unknown_object(lower: &str) -> bool {
    [
        "invalid vm",
        "invalid volume",
        "invalid snapshot",
        "invalid image",
    ]
    .iter()
    .any(|p| match lower.trim().strip_prefix(p) {
        Some(rest) => {
            let rest = rest.trim_start_matches([' ', ':', '#']).trim();
            rest.is_empty()
                || rest == "id"
                || rest.starts_with("id ")
                || (rest.bytes().any(|b| b.is_ascii_digit())
                    && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        }
        None => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_known_messages() {
        let c = |m| ApiError::from_cloud_message("volume/x", m);
        assert!(matches!(c("invalid vm"), ApiError::NotFound { .. }));
        assert!(matches!(
            c("invalid volume 4682"),
            ApiError::NotFound { .. }
        ));
        assert!(matches!(
            c("invalid volume size"),
            ApiError::InvalidArgument { .. }
        ));
        assert!(matches!(c("invalid nonce"), ApiError::Transient { .. }));
        assert!(matches!(c("volume not found"), ApiError::NotFound { .. }));
        assert!(matches!(
            c("region not set"),
            ApiError::InvalidArgument { .. }
        ));
        assert!(matches!(
            c("volume is attached to a VM"),
            ApiError::WrongState { .. }
        ));
        assert!(matches!(
            c("rate limit exceeded"),
            ApiError::Throttled { .. }
        ));
        assert!(matches!(
            c("temporarily unavailable, try again"),
            ApiError::Transient { .. }
        ));
        assert!(matches!(c("invalid signature"), ApiError::Auth { .. }));
        assert!(matches!(c("something odd"), ApiError::Other { .. }));
    }
}
