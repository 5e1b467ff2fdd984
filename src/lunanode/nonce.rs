//! The nonce of each signed request.
//!
//! Luna Node's own clients (its Go `lndynamic` package, the PHP, Python and Ruby clients) send
//! the current Unix time in seconds, several requests in one second sharing it. Whether the
//! server checks a window around its clock, or refuses a repeated nonce, is not known. So by
//! default the driver sends exactly what they send, never ahead of the clock: a nonce ahead
//! of the clock is the likeliest to fail a window check, and a restarted driver (back at the
//! clock) would sit behind the nonces it sent before.
//!
//! [`NonceMode::Increasing`] is kept for the day the cloud is seen to refuse a repeated
//! nonce: each request then gets a larger nonce than the last, but never more than
//! `max_ahead` ahead of the clock. At that bound a request waits for the clock instead of
//! running further ahead, which limits the sustained rate to one request per second after a
//! burst of `max_ahead + 1`: unique whole-second nonces cannot go faster without leaving the
//! clock behind, and a bounded lead keeps a restart (which starts again at the clock) from
//! repeating nonces for more than `max_ahead` seconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How nonces are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NonceMode {
    /// The current Unix time in seconds; requests within one second share it.
    #[default]
    Clock,
    /// Strictly increasing per client, at most `nonce_max_ahead` ahead of the clock.
    Increasing,
}

/// How far ahead of the clock [`NonceMode::Increasing`] may run by default.
pub const DEFAULT_MAX_AHEAD: Duration = Duration::from_secs(2);

/// Where the wall-clock time comes from.
#[derive(Debug)]
enum WallClock {
    System,
    /// `start` plus however far tokio's clock has moved since `origin`: with tokio's clock
    /// paused, a test's seconds pass instantly and exactly.
    #[cfg(test)]
    Tokio {
        start: Duration,
        origin: tokio::time::Instant,
    },
}

impl WallClock {
    fn since_epoch(&self) -> Duration {
        match self {
            WallClock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
            #[cfg(test)]
            WallClock::Tokio { start, origin } => *start + origin.elapsed(),
        }
    }
}

/// Hands out nonces; one per client, shared by its clones.
#[derive(Debug)]
pub(crate) struct Nonces {
    mode: NonceMode,
    max_ahead_secs: u64,
    /// The last nonce handed out in increasing mode. Held while a request waits for the
    /// clock, so waiters are served in order and one at a time.
    last: tokio::sync::Mutex<u64>,
    clock: WallClock,
}

impl Nonces {
    pub(crate) fn new(mode: NonceMode, max_ahead: Duration) -> Self {
        Self::with_clock(mode, max_ahead, WallClock::System)
    }

    fn with_clock(mode: NonceMode, max_ahead: Duration, clock: WallClock) -> Self {
        Self {
            mode,
            max_ahead_secs: max_ahead.as_secs(),
            last: tokio::sync::Mutex::new(0),
            clock,
        }
    }

    /// The nonce for a request about to be sent. In increasing mode this waits while the
    /// next nonce would be more than `max_ahead` ahead of the clock.
    pub(crate) async fn next(&self) -> u64 {
        match self.mode {
            NonceMode::Clock => self.clock.since_epoch().as_secs(),
            NonceMode::Increasing => {
                let mut last = self.last.lock().await;
                loop {
                    let now = self.clock.since_epoch();
                    let nonce = now.as_secs().max(*last + 1);
                    if nonce <= now.as_secs() + self.max_ahead_secs {
                        *last = nonce;
                        return nonce;
                    }
                    // The start of the second in which `nonce` is within the bound.
                    let ok_at = Duration::from_secs(nonce - self.max_ahead_secs);
                    tokio::time::sleep(ok_at.saturating_sub(now)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// 1_700_000_000.25 s after the epoch, on tokio's (paused) clock.
    fn nonces(mode: NonceMode) -> Arc<Nonces> {
        Arc::new(Nonces::with_clock(
            mode,
            DEFAULT_MAX_AHEAD,
            WallClock::Tokio {
                start: Duration::from_millis(1_700_000_000_250),
                origin: tokio::time::Instant::now(),
            },
        ))
    }

    /// `n` requests at once; each nonce with the clock's second when it was handed out.
    async fn burst(nonces: &Arc<Nonces>, n: usize) -> Vec<(u64, u64)> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let nonces = nonces.clone();
                tokio::spawn(async move {
                    let nonce = nonces.next().await;
                    (nonce, nonces.clock.since_epoch().as_secs())
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn clock_mode_sends_the_current_second_and_never_runs_ahead() {
        let n = nonces(NonceMode::Clock);
        let start = tokio::time::Instant::now();
        let first = burst(&n, 200).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "a burst never waits");
        assert!(
            first
                .iter()
                .all(|&(nonce, now)| nonce == 1_700_000_000 && now == nonce),
            "the whole burst shares the current second: {first:?}"
        );
        // A sustained 50 requests per second for 10 s stays on the clock.
        for _ in 0..10 {
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let (nonce, now) = (n.next().await, n.clock.since_epoch().as_secs());
                assert_eq!(nonce, now);
            }
        }
        assert_eq!(n.next().await, 1_700_000_010);
    }

    #[tokio::test(start_paused = true)]
    async fn increasing_mode_is_unique_and_waits_for_the_clock_at_its_bound() {
        let n = nonces(NonceMode::Increasing);
        let start = tokio::time::Instant::now();
        let got = burst(&n, 10).await;
        let handed: Vec<u64> = got.iter().map(|&(nonce, _)| nonce).collect();
        assert_eq!(
            handed,
            (1_700_000_000..1_700_000_010).collect::<Vec<_>>(),
            "strictly increasing, in the order asked"
        );
        for &(nonce, now) in &got {
            assert!(nonce >= now, "never behind the clock");
            assert!(nonce - now <= 2, "at most 2 s ahead: {nonce} at {now}");
        }
        // Three went at once (now, +1, +2); each of the other seven waited for a second.
        // The first wait ends at the next whole second, 0.75 s after the start.
        assert_eq!(start.elapsed(), Duration::from_millis(6_750));

        // After a quiet spell the nonce is back on the clock, with the lead to spend again.
        tokio::time::sleep(Duration::from_secs(30)).await;
        let now = n.clock.since_epoch().as_secs();
        assert_eq!(
            burst(&n, 3).await,
            [(now, now), (now + 1, now), (now + 2, now)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn increasing_mode_under_a_sustained_rate_holds_one_per_second() {
        let n = nonces(NonceMode::Increasing);
        let start = tokio::time::Instant::now();
        // Asked 10 times a second (the default --qps), one after the other, 200 times.
        let mut last = 0;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let nonce = n.next().await;
            let now = n.clock.since_epoch().as_secs();
            assert!(nonce > last && nonce <= now + 2, "{nonce} at {now}");
            last = nonce;
        }
        // The requests queue behind the clock, one a second after a lead of two, instead of
        // the nonce running ahead (the old `max(now, last + 1)` was 180 s ahead by now).
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(196) && took <= Duration::from_secs(198),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn the_system_clock_is_used_by_default() {
        let system = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let n = Nonces::new(NonceMode::Clock, DEFAULT_MAX_AHEAD);
        let nonce = n.next().await;
        assert!(
            (system..=system + 1).contains(&nonce),
            "{nonce} vs {system}"
        );
        let n = Nonces::new(NonceMode::Increasing, DEFAULT_MAX_AHEAD);
        let (a, b, c) = (n.next().await, n.next().await, n.next().await);
        assert!(a < b && b < c && c <= system + 3, "{a} {b} {c} vs {system}");
    }
}
