//! A token-bucket rate limiter shared by every caller of one client, so the driver as a
//! whole stays under the cloud's limit however many RPCs run at once.

use std::sync::Mutex;
use std::time::Duration;

// tokio's clock, so the limiter follows paused time in tests.
use tokio::time::Instant;

/// Allows `qps` requests per second on average and bursts of up to `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    qps: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// `qps <= 0` disables limiting.
    pub fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps,
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Take one token, reserving it now and sleeping until it is due. Reserving (letting the
    /// balance go negative) keeps waiters in arrival order without a queue. A waiter that
    /// is cancelled before its turn (its RPC timed out) gives its reservation back, so
    /// abandoned calls do not hold up the ones still waiting.
    pub async fn acquire(&self) {
        if self.qps <= 0.0 {
            return;
        }
        let wait = {
            let mut b = self.state.lock().expect("rate limiter lock");
            let now = Instant::now();
            let refill = now.duration_since(b.last).as_secs_f64() * self.qps;
            b.tokens = (b.tokens + refill).min(self.burst);
            b.last = now;
            b.tokens -= 1.0;
            if b.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-b.tokens / self.qps)
            }
        };
        if wait.is_zero() {
            return;
        }
        let mut refund = Refund(Some(self));
        tokio::time::sleep(wait).await;
        refund.0 = None;
    }
}

/// Returns a reservation to the bucket when dropped before it was used.
struct Refund<'a>(Option<&'a RateLimiter>);

impl Drop for Refund<'_> {
    fn drop(&mut self) {
        if let Some(rl) = self.0
            && let Ok(mut b) = rl.state.lock()
        {
            b.tokens = (b.tokens + 1.0).min(rl.burst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_its_rate_after_the_burst() {
        let rl = RateLimiter::new(10.0, 5);
        let start = tokio::time::Instant::now();
        for _ in 0..25 {
            rl.acquire().await;
        }
        // 5 from the burst, 20 more at 10 per second: about 2 seconds.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1900), "took {took:?}");
        assert!(took <= Duration::from_millis(2200), "took {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiters_give_their_turn_back() {
        let rl = RateLimiter::new(10.0, 1);
        rl.acquire().await;
        // Nine callers give up while waiting; the next one must not wait behind them.
        for _ in 0..9 {
            let _ = tokio::time::timeout(Duration::from_millis(1), rl.acquire()).await;
        }
        let start = tokio::time::Instant::now();
        rl.acquire().await;
        assert!(
            start.elapsed() <= Duration::from_millis(150),
            "waited {:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn zero_qps_is_unlimited() {
        let rl = RateLimiter::new(0.0, 1);
        for _ in 0..1000 {
            rl.acquire().await;
        }
    }
}
