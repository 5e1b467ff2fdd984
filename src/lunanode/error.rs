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
    /// The cloud could not verify the request's signature. The key is only one of the causes:
    /// the nonce is the clock's second, so a clock far off is refused the same way, and so is
    /// request text the cloud reads differently from how it was signed.
    #[error("{action}: the cloud refused the request's signature ({message}); {}", signature_causes(*.clock_skew))]
    Signature {
        action: String,
        message: String,
        /// The cloud's clock minus ours, in seconds, from the reply's `Date` header.
        clock_skew: Option<i64>,
    },
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
            | ApiError::Signature { message, .. }
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
        } else if has(&["signature"]) {
            ApiError::Signature {
                action,
                message,
                clock_skew: None,
            }
        } else if has(&[
            "authentication",
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

/// Within this many seconds the cloud's `Date` and our clock agree (it has 1 s resolution, and
/// the reply took some time to arrive).
const CLOCK_AGREES_SECS: i64 = 5;

/// What to check when a signature is refused, most likely first given what the reply said of
/// the cloud's clock.
fn signature_causes(clock_skew: Option<i64>) -> String {
    let clock = match clock_skew {
        Some(s) if s.abs() > CLOCK_AGREES_SECS => format!(
            "this machine's clock is {} s {} the cloud's: request nonces are the current Unix time, so fix the clock (NTP) first",
            s.abs(),
            if s > 0 { "behind" } else { "ahead of" }
        ),
        Some(_) => "the clock agrees with the cloud's, so it is not the cause".to_string(),
        None => "this machine's clock may be off (request nonces are the current Unix time; the reply had no Date to compare)".to_string(),
    };
    format!(
        "causes: the API key is wrong or truncated (all 128 characters are signed; the API ID is only checked separately); {clock}; or the request's text was read differently from how it was signed (the driver sends it ASCII-escaped; if key and clock are right, report this with the action)"
    )
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
        assert!(matches!(c("invalid signature"), ApiError::Signature { .. }));
        assert!(matches!(c("invalid api key"), ApiError::Auth { .. }));
        assert!(matches!(c("something odd"), ApiError::Other { .. }));
    }
}

#[cfg(test)]
mod signature_tests {
    use super::*;

    #[test]
    fn a_refused_signature_names_key_clock_and_encoding() {
        let mut e = ApiError::from_cloud_message(
            "volume/create",
            "authentication failed: invalid signature",
        );
        let shown = e.to_string();
        for cause in ["API key", "clock", "ASCII"] {
            assert!(shown.contains(cause), "{shown}");
        }
        assert!(
            shown.contains("authentication failed: invalid signature"),
            "{shown}"
        );
        if let ApiError::Signature { clock_skew, .. } = &mut e {
            *clock_skew = Some(-400);
        }
        let shown = e.to_string();
        assert!(
            shown.contains("clock is 400 s ahead of the cloud's"),
            "{shown}"
        );
        if let ApiError::Signature { clock_skew, .. } = &mut e {
            *clock_skew = Some(1);
        }
        assert!(e.to_string().contains("not the cause"), "{e}");
        assert!(!e.is_retryable());
        assert_eq!(e.message(), "authentication failed: invalid signature");
    }
}
