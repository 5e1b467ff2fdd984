//! Creates whose outcome is unknown.
//!
//! The API cannot filter by label and a create may be applied even though its reply was
//! lost, timed out or cancelled. A create that has not ended in a known outcome leaves an
//! intent behind; until the object shows up, or a grace period passes, a retry of the same
//! name looks it up and answers UNAVAILABLE instead of creating a second one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::driver::error::Error;
use crate::lunanode::ApiError;

/// Whether a failed create certainly made nothing. A `success: no` answer is a refusal; a
/// 429 was not processed; anything else (timeouts, 5xx, unparseable replies) may have
/// created the object.
pub fn made_nothing(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::NotFound { .. }
            | ApiError::InvalidArgument { .. }
            | ApiError::WrongState { .. }
            | ApiError::LimitExceeded { .. }
            | ApiError::Auth { .. }
            | ApiError::Signature { .. }
            | ApiError::Throttled { .. }
    )
}

/// Names with a create of unknown outcome, and when it started.
#[derive(Debug)]
pub struct Intents {
    grace: Duration,
    started: Mutex<HashMap<String, Instant>>,
}

impl Intents {
    /// Intents older than `grace` are forgotten: by then the cloud has either made the
    /// object (and a lookup finds it) or never will.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            started: Mutex::new(HashMap::new()),
        }
    }

    /// Fail with UNAVAILABLE while an earlier create of `key` may still appear.
    pub fn check(&self, key: &str, what: &str) -> Result<(), Error> {
        let mut started = self.started.lock().expect("intents lock");
        match started.get(key) {
            Some(t) if t.elapsed() < self.grace => Err(Error::Unavailable(format!(
                "an earlier attempt to create {what} has an unknown outcome; waiting up to {}s for it to appear before creating again",
                self.grace.saturating_sub(t.elapsed()).as_secs()
            ))),
            Some(_) => {
                started.remove(key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Run `create`, leaving the intent behind unless it ends in a known outcome. A
    /// cancelled call (the CO's deadline) leaves it behind too.
    pub async fn run<T>(
        &self,
        key: &str,
        create: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        self.started
            .lock()
            .expect("intents lock")
            .insert(key.to_string(), Instant::now());
        let result = create.await;
        if result.as_ref().err().is_none_or(made_nothing) {
            self.clear(key);
        }
        result
    }

    /// The object was found: the intent is settled.
    pub fn clear(&self, key: &str) {
        self.started.lock().expect("intents lock").remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient() -> ApiError {
        ApiError::Transient {
            action: "volume/create".into(),
            message: "HTTP 503".into(),
        }
    }

    #[tokio::test]
    async fn unknown_outcomes_block_a_second_create_until_found_or_expired() {
        let i = Intents::new(Duration::from_secs(60));
        assert!(i.check("volume:a", "volume a").is_ok());
        let _ = i.run("volume:a", async { Err::<(), _>(transient()) }).await;
        assert_eq!(
            i.check("volume:a", "volume a").unwrap_err().code(),
            tonic::Code::Unavailable
        );
        i.clear("volume:a");
        assert!(i.check("volume:a", "volume a").is_ok());

        let refused = ApiError::InvalidArgument {
            action: "x".into(),
            message: "invalid size".into(),
        };
        let _ = i.run("volume:b", async { Err::<(), _>(refused) }).await;
        assert!(
            i.check("volume:b", "volume b").is_ok(),
            "a refusal made nothing"
        );
        let _ = i.run("volume:c", async { Ok::<_, ApiError>(1) }).await;
        assert!(i.check("volume:c", "volume c").is_ok());

        // A cancelled create leaves its intent.
        let pending = i.run("volume:d", std::future::pending::<Result<(), ApiError>>());
        let _ = tokio::time::timeout(Duration::from_millis(10), pending).await;
        assert!(i.check("volume:d", "volume d").is_err());

        let short = Intents::new(Duration::ZERO);
        let _ = short
            .run("volume:e", async { Err::<(), _>(transient()) })
            .await;
        assert!(
            short.check("volume:e", "volume e").is_ok(),
            "expired intents are forgotten"
        );
    }
}
