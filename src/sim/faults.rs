//! Fault injection and the server-side rate limit, both deterministic given a seed.

use std::time::{Duration, Instant};

/// One kind of injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// HTTP 500, the action is not applied.
    Http500,
    /// HTTP 503, the action is not applied.
    Http503,
    /// The request is held for the fault timeout (or until shutdown), then answered 504;
    /// the action is not applied.
    Timeout,
    /// HTTP 429 with `rate limit exceeded`, the action is not applied.
    Http429,
    /// HTTP 200 with `success: no` "temporarily unavailable, try again"; not applied.
    Transient,
    /// The action IS applied, but the reply is lost: the client sees HTTP 503.
    LostReply,
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Http500,
        FaultKind::Http503,
        FaultKind::Timeout,
        FaultKind::Http429,
        FaultKind::Transient,
        FaultKind::LostReply,
    ];
}

/// Decides, request by request, whether to inject a fault.
#[derive(Debug)]
pub struct Faults {
    rng: fastrand::Rng,
    pub rate: f64,
    pub kinds: Vec<FaultKind>,
    pub timeout: Duration,
}

impl Faults {
    pub fn new(seed: u64, rate: f64) -> Self {
        Faults {
            rng: fastrand::Rng::with_seed(seed ^ 0xfa17_fa17),
            rate: clamp_rate(rate),
            kinds: FaultKind::ALL.to_vec(),
            timeout: Duration::from_secs(5),
        }
    }

    /// The fault for the next request, if any.
    pub fn draw(&mut self) -> Option<FaultKind> {
        if self.rate <= 0.0 || self.kinds.is_empty() {
            return None;
        }
        if self.rng.f64() < self.rate {
            Some(self.kinds[self.rng.usize(..self.kinds.len())])
        } else {
            None
        }
    }
}

/// A probability in `[0, 1]` (NaN counts as 0).
pub fn clamp_rate(p: f64) -> f64 {
    if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) }
}

/// A token bucket: `qps` tokens a second, holding at most `max(qps, 1)`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    qps: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(qps: f64, now: Instant) -> Self {
        let qps = if qps.is_finite() && qps > 0.0 {
            qps
        } else {
            1.0
        };
        let burst = qps.max(1.0);
        TokenBucket {
            qps,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Tokens added a second.
    pub fn qps(&self) -> f64 {
        self.qps
    }

    /// Take a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.qps).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_faults() {
        let seq = |seed| {
            let mut f = Faults::new(seed, 0.5);
            (0..200).map(|_| f.draw()).collect::<Vec<_>>()
        };
        assert_eq!(seq(42), seq(42));
        assert_ne!(seq(42), seq(43));
        let s = seq(42);
        let hits = s.iter().filter(|f| f.is_some()).count();
        assert!((60..140).contains(&hits), "{hits}");
        for k in FaultKind::ALL {
            assert!(s.contains(&Some(k)), "{k:?} never drawn");
        }
    }

    #[test]
    fn rate_zero_and_one() {
        let mut f = Faults::new(1, 0.0);
        assert!((0..100).all(|_| f.draw().is_none()));
        let mut f = Faults::new(1, 7.0);
        f.kinds = vec![FaultKind::Transient];
        assert!((0..100).all(|_| f.draw() == Some(FaultKind::Transient)));
        assert_eq!(clamp_rate(f64::NAN), 0.0);
    }

    #[test]
    fn bucket_limits_and_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5.0, t0);
        assert_eq!((0..10).filter(|_| b.try_take(t0)).count(), 5);
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_millis(200)));
        assert!(!b.try_take(t0 + Duration::from_millis(200)));
        let mut slow = TokenBucket::new(0.5, t0);
        assert!(slow.try_take(t0));
        assert!(!slow.try_take(t0 + Duration::from_secs(1)));
        assert!(slow.try_take(t0 + Duration::from_secs(2)));
    }
}
