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
    /// balance go negative) keeps waiters in arrival order without a queue.
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
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
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

    #[tokio::test]
    async fn zero_qps_is_unlimited() {
        let rl = RateLimiter::new(0.0, 1);
        for _ in 0..1000 {
            rl.acquire().await;
        }
    }
}
