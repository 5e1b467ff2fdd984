//! Waiting for the cloud: status transitions are polled with capped exponential backoff,
//! within the deadline the CO gave the call.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::driver::error::Error;

/// How polling backs off.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub factor: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(5),
            factor: 1.5,
        }
    }
}

/// When the current call must have answered by.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    /// The client's `grpc-timeout` if it sent one, else `default`. A little is kept back so
    /// the driver answers before the client gives up on it.
    pub fn new(client_timeout: Option<Duration>, default: Duration) -> Self {
        let t = client_timeout.map_or(default, |t| {
            t.saturating_sub((t / 20).min(Duration::from_secs(2)))
        });
        // Far-future deadlines (a client's "99999999H") are capped rather than overflowing.
        let t = t.min(Duration::from_secs(86_400 * 365));
        Deadline(Instant::now() + t)
    }

    /// Time left.
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

/// Call `check` until it returns `Some`, sleeping between tries; the first try is
/// immediate. Past the deadline the error says what was being waited for; the operation
/// continues in the cloud and a retry of the RPC picks it up.
pub async fn until<T, F, Fut>(
    deadline: Deadline,
    backoff: Backoff,
    what: &str,
    mut check: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, Error>>,
{
    let mut delay = backoff.initial;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        let left = deadline.remaining();
        if left.is_zero() {
            return Err(Error::DeadlineExceeded(format!(
                "timed out waiting for {what}; the operation continues in the cloud and a retry will pick it up"
            )));
        }
        tokio::time::sleep(delay.min(left)).await;
        delay = delay.mul_f64(backoff.factor).min(backoff.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn polls_until_ready_then_times_out() {
        let mut n = 0;
        let v = until(
            Deadline::new(None, Duration::from_secs(60)),
            Backoff::default(),
            "x",
            || {
                n += 1;
                let done = n >= 3;
                async move { Ok(done.then_some(n)) }
            },
        )
        .await
        .unwrap();
        assert_eq!(v, 3);
        let err = until::<(), _, _>(
            Deadline::new(Some(Duration::from_secs(3)), Duration::from_secs(60)),
            Backoff::default(),
            "volume toronto/1 to be available",
            || async { Ok(None) },
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert!(err.to_string().contains("volume toronto/1"));
    }
}
