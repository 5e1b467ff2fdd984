//! The driver's error type, and the one place where errors become gRPC status codes.
//!
//! Every service returns [`Error`]; cloud errors ([`ApiError`]) and OS errors
//! ([`VolumeError`]) are converted here, so the CSI error-code rules live in one file.

use tonic::{Code, Status};

use crate::lunanode::ApiError;
use crate::volumes::VolumeError;

/// A failed CSI call. Each variant names the gRPC code it maps to; the message says what
/// went wrong and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required field is missing or a field has a value the driver does not accept.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume, snapshot or node named in the request does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A volume or snapshot with this name exists but is incompatible with the request.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the object is in the wrong state for it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The requested capacity cannot be satisfied.
    #[error("{0}")]
    OutOfRange(String),
    /// Another operation on the same object is in flight, or a paging token is stale.
    #[error("{0}")]
    Aborted(String),
    /// The cloud is unreachable, throttling, or failing transiently: retry with backoff.
    #[error("{0}")]
    Unavailable(String),
    /// The operation did not finish within the call's deadline; it may still complete.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A limit was reached (e.g. too many volumes on a node).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The RPC is not offered by this driver or in this mode.
    #[error("{0}")]
    Unimplemented(String),
    /// The driver's credentials were refused by the cloud.
    #[error("{0}")]
    Unauthenticated(String),
    /// Anything else; the message carries the underlying cause.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Aborted(_) => Code::Aborted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// Shorthand for the most common error: a missing or malformed request field.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

/// Cloud errors, as the CSI sidecars should see them. Retryable conditions become codes the
/// sidecars retry with backoff (UNAVAILABLE, ABORTED), never INTERNAL.
impl From<ApiError> for Error {
    fn from(err: ApiError) -> Self {
        let msg = format!("Luna Node API: {err}");
        match err {
            ApiError::NotFound { .. } => Error::NotFound(msg),
            ApiError::InvalidArgument { .. } => Error::InvalidArgument(msg),
            ApiError::WrongState { .. } => Error::FailedPrecondition(msg),
            ApiError::LimitExceeded { .. } => Error::ResourceExhausted(msg),
            ApiError::Throttled { .. } | ApiError::Transient { .. } => Error::Unavailable(msg),
            ApiError::Auth { .. } => Error::Unauthenticated(format!(
                "{msg}; check the API ID and key the driver was started with"
            )),
            // Its message already names the causes to check (key, clock, encoding).
            ApiError::Signature { .. } => Error::Unauthenticated(msg),
            ApiError::Other { .. } => Error::Internal(msg),
        }
    }
}

/// Node OS errors. A device that has not appeared yet is retryable; a device that is not
/// what we expected is a precondition failure: the node must not touch it.
impl From<VolumeError> for Error {
    fn from(err: VolumeError) -> Self {
        let msg = err.to_string();
        match err {
            VolumeError::DeviceNotFound { .. } => Error::NotFound(msg),
            VolumeError::DeviceMismatch { .. }
            | VolumeError::ForeignFilesystem { .. }
            | VolumeError::NotBlank { .. }
            | VolumeError::MountConflict { .. } => Error::FailedPrecondition(msg),
            VolumeError::Busy { .. } => Error::Unavailable(msg),
            VolumeError::NotMounted { .. } => Error::NotFound(msg),
            VolumeError::Command { .. } | VolumeError::Io { .. } => Error::Internal(msg),
        }
    }
}

/// Convert any error into a status; handlers use `?` with this.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_cloud_errors_are_unavailable() {
        let e: Error = ApiError::Throttled {
            action: "volume/list".into(),
            message: "rate limit".into(),
        }
        .into();
        assert_eq!(e.code(), Code::Unavailable);
        let e: Error = ApiError::Transient {
            action: "volume/list".into(),
            message: "HTTP 503".into(),
        }
        .into();
        assert_eq!(e.code(), Code::Unavailable);
    }

    #[test]
    fn status_carries_message() {
        let s: Status = Error::NotFound("volume toronto/1 not found".into()).into();
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "volume toronto/1 not found");
    }
}
