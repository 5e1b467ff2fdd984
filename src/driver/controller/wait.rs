//! Waiting for the cloud: status transitions are polled within the deadline the CO gave
//! the call, either on a schedule learnt from how long each kind of transition has taken
//! (the default) or on the old fixed backoff.
//!
//! The learnt schedule: per kind of transition a small window of recent durations
//! ([`Estimator`]); before each wait the poll times that minimise "expected overshoot (as a
//! fraction of the transition) + `poll_cost` × expected polls" over that window are chosen
//! exactly by dynamic programming ([`Estimator::plan`]). Past the last planned poll (the
//! cloud is slower than ever seen) a capped backoff takes over. Every poll is an ordinary
//! API call, so it takes its turn in the client's rate limiter like any other request; while
//! several volumes are waited for, their polls can share one `volume/list`
//! ([`Waits::share_volume_list`]). docs/benchmarks.md ("Waits") has the measurements.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::driver::error::Error;
use crate::metrics::Metrics;

/// How the fixed schedule backs off; the learnt one uses it while it has too few samples,
/// and its `max` caps the learnt schedule's fallback.
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

/// The kinds of cloud transition the controller waits for; each learns on its own, since
/// an attach and a restore from an image take very different times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WaitKind {
    /// `creating` → `available`, an empty volume.
    Create,
    /// `creating` → `available`, from a snapshot or an image (copies data).
    CreateFromSource,
    Attach,
    Detach,
    Extend,
    /// A volume snapshot becoming available.
    Snapshot,
    /// A snapshot replicated to another region becoming an active image.
    Replicate,
}

impl WaitKind {
    pub const ALL: [WaitKind; 7] = [
        WaitKind::Create,
        WaitKind::CreateFromSource,
        WaitKind::Attach,
        WaitKind::Detach,
        WaitKind::Extend,
        WaitKind::Snapshot,
        WaitKind::Replicate,
    ];

    /// The metrics label.
    pub fn name(self) -> &'static str {
        match self {
            WaitKind::Create => "create",
            WaitKind::CreateFromSource => "create_from_source",
            WaitKind::Attach => "attach",
            WaitKind::Detach => "detach",
            WaitKind::Extend => "extend",
            WaitKind::Snapshot => "snapshot",
            WaitKind::Replicate => "replicate",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which schedule waits follow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Learnt per kind; `poll_cost` is what one poll is worth in overshoot, as a fraction
    /// of the transition (0.03: one more poll is worth answering 3% of a transition sooner).
    Learned { poll_cost: f64 },
    /// The fixed backoff alone (0, then `initial` × `factor`… up to `max`), as before.
    Fixed,
}

/// The schedule's name, as `serve --wait-schedule` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScheduleName {
    /// Learnt per kind of transition.
    Learned,
    /// The fixed backoff the driver used before it learnt (for comparison).
    Fixed,
}

impl WaitPolicy {
    /// The policy `serve` runs with: `scale` multiplies every time in the schedule (the
    /// minimum gap; the fixed backoff, given separately, is scaled by the caller), which
    /// only benchmarks running the simulator's transitions at the same scale want.
    pub fn new(name: ScheduleName, poll_cost: f64, scale: f64) -> Self {
        let schedule = match name {
            ScheduleName::Learned => Schedule::Learned { poll_cost },
            ScheduleName::Fixed => Schedule::Fixed,
        };
        Self {
            schedule,
            min_gap: WaitPolicy::default().min_gap.mul_f64(scale),
            share_list: true,
        }
    }
}

impl Backoff {
    /// Every time multiplied by `scale` (see [`WaitPolicy::new`]).
    pub fn scaled(self, scale: f64) -> Self {
        Self {
            initial: self.initial.mul_f64(scale),
            max: self.max.mul_f64(scale),
            factor: self.factor,
        }
    }
}

/// The default price of a poll; docs/benchmarks.md shows the overshoot/calls curve it was
/// chosen from.
pub const DEFAULT_POLL_COST: f64 = 0.03;

/// Wait settings.
#[derive(Debug, Clone, Copy)]
pub struct WaitPolicy {
    pub schedule: Schedule,
    /// No two polls of one wait are closer than this, whatever the estimate says: a
    /// cloud that answers "done" within a few ms of itself is not worth a burst of polls.
    pub min_gap: Duration,
    /// While more than one volume is waited for, poll through a `volume/list` shared by
    /// all the waiters instead of one `volume/info` each.
    pub share_list: bool,
}

impl Default for WaitPolicy {
    fn default() -> Self {
        Self {
            schedule: Schedule::Learned {
                poll_cost: DEFAULT_POLL_COST,
            },
            min_gap: Duration::from_millis(100),
            share_list: true,
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

/// Recent durations of one kind of transition: a ring of the last [`Estimator::CAPACITY`]
/// observations, weighted by age (half-life [`Estimator::HALF_LIFE`] observations) so that a
/// cloud that gets slower or faster is followed within a few waits, and memory stays fixed.
///
/// Hand-rolled rather than a quantile-sketch crate: sketches answer quantile queries, but
/// the schedule needs the weighted samples themselves to optimise poll times over, and 32
/// floats are both smaller and exact.
#[derive(Debug, Clone, Default)]
pub struct Estimator {
    /// Seconds, oldest first.
    samples: VecDeque<f64>,
}

impl Estimator {
    pub const CAPACITY: usize = 32;
    pub const HALF_LIFE: f64 = 16.0;
    /// Fewer samples than this and the schedule is the fixed backoff: too little is known.
    pub const MIN_SAMPLES: usize = 3;

    /// Record how long a transition took.
    pub fn observe(&mut self, took: Duration) {
        if self.samples.len() == Self::CAPACITY {
            self.samples.pop_front();
        }
        self.samples.push_back(took.as_secs_f64());
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The poll times (from the start of a wait, after the immediate check) that minimise
    /// `E[overshoot / duration] + poll_cost × E[polls]` if the next transition takes one of
    /// the recorded durations with their weights. Polls are placed at recorded durations (an
    /// optimal placement for a discrete distribution never polls between two of its points)
    /// and the last at the longest. `floor` keeps the fraction finite for instant transitions.
    /// Empty while fewer than [`Self::MIN_SAMPLES`] were recorded.
    pub fn plan(&self, poll_cost: f64, floor: Duration) -> Vec<Duration> {
        let n = self.samples.len();
        if n < Self::MIN_SAMPLES {
            return Vec::new();
        }
        let mut pts: Vec<(f64, f64)> = self
            .samples
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let age = (n - 1 - i) as f64;
                (s, 0.5f64.powf(age / Self::HALF_LIFE))
            })
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total: f64 = pts.iter().map(|p| p.1).sum();
        let floor = floor.as_secs_f64().max(1e-3);
        // Prefix sums of weight and of weight / duration: a segment of samples (k, j] all
        // answered by a poll at x_j costs x_j·Σw/x − Σw in overshoot.
        let mut w0 = vec![0.0; n + 1];
        let mut w1 = vec![0.0; n + 1];
        for (i, &(x, w)) in pts.iter().enumerate() {
            w0[i + 1] = w0[i] + w / total;
            w1[i + 1] = w1[i] + w / total / x.max(floor);
        }
        // cost[j]: the best plan whose last poll is at x_{j-1} (j = 0: only the immediate
        // check). A poll after the one at x_{k-1} is paid for when the transition outlasts
        // it, i.e. with probability 1 − w0[k].
        let mut cost = vec![f64::INFINITY; n + 1];
        let mut prev = vec![0usize; n + 1];
        cost[0] = 0.0;
        for j in 1..=n {
            let xj = pts[j - 1].0;
            for k in 0..j {
                let c =
                    cost[k] + poll_cost * (1.0 - w0[k]) + xj * (w1[j] - w1[k]) - (w0[j] - w0[k]);
                if c < cost[j] {
                    cost[j] = c;
                    prev[j] = k;
                }
            }
        }
        let mut polls = Vec::new();
        let mut j = n;
        while j > 0 {
            polls.push(Duration::from_secs_f64(pts[j - 1].0));
            j = prev[j];
        }
        polls.reverse();
        polls.dedup();
        polls
    }
}

/// The controller's waits: the schedule, an estimator per kind, and where to report.
#[derive(Debug)]
pub struct Waits {
    policy: WaitPolicy,
    backoff: Backoff,
    estimators: [Mutex<Estimator>; 7],
    metrics: OnceLock<Arc<Metrics>>,
    /// Waits for a volume's status under way now.
    volume_waits: std::sync::atomic::AtomicUsize,
    /// How many volumes the last `volume/list` carried (0: none seen yet).
    listed: std::sync::atomic::AtomicUsize,
}

/// A shared list is used only while it answers at least one waiter per this many volumes
/// it carries: on an account with thousands of volumes, a few waiters' polls are cheaper as
/// `volume/info` calls than as whole lists held in memory.
const VOLUMES_PER_WAITER: usize = 10;

/// Counts a volume wait as under way until dropped.
struct Active<'a>(Option<&'a std::sync::atomic::AtomicUsize>);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            n.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Where a wait's next poll comes from.
enum Next {
    /// The learnt plan, from this index on.
    Plan(usize),
    /// Backing off with this delay.
    Backoff(Duration),
}

impl Waits {
    pub fn new(policy: WaitPolicy, backoff: Backoff) -> Self {
        Self {
            policy,
            backoff,
            estimators: Default::default(),
            metrics: OnceLock::new(),
            volume_waits: Default::default(),
            listed: Default::default(),
        }
    }

    /// A `volume/list` just answered with `n` volumes.
    pub fn listed(&self, n: usize) {
        self.listed.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a volume's poll should go through the shared `volume/list`: sharing is on,
    /// another volume wait is under way to share it with, and the list is not much longer
    /// than the waiters it would answer.
    pub fn share_volume_list(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let waiters = self.volume_waits.load(Relaxed);
        self.policy.share_list
            && waiters > 1
            && waiters * VOLUMES_PER_WAITER >= self.listed.load(Relaxed)
    }

    /// Report every wait's duration and polls to `metrics` from now on.
    pub fn set_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// How many durations of `kind` are recorded (for tests).
    pub fn samples(&self, kind: WaitKind) -> usize {
        self.lock(kind).len()
    }

    fn lock(&self, kind: WaitKind) -> std::sync::MutexGuard<'_, Estimator> {
        self.estimators[kind.index()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Call `check` until it returns `Some`; the first try is immediate. `fresh` says the
    /// transition started just before this wait (this call made the change), so its
    /// duration teaches the estimator; waits that join a transition already under way (a
    /// retried RPC) follow the schedule but teach nothing. Past the deadline the error says
    /// what was being waited for; the operation continues in the cloud and a retry of the
    /// RPC picks it up.
    pub async fn until<T, F, Fut>(
        &self,
        kind: WaitKind,
        fresh: bool,
        deadline: Deadline,
        what: &str,
        mut check: F,
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, Error>>,
    {
        let start = Instant::now();
        let on_volume = !matches!(kind, WaitKind::Snapshot | WaitKind::Replicate);
        let _active = Active(on_volume.then(|| {
            self.volume_waits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            &self.volume_waits
        }));
        let plan = match self.policy.schedule {
            Schedule::Learned { poll_cost } => self.lock(kind).plan(poll_cost, self.policy.min_gap),
            Schedule::Fixed => Vec::new(),
        };
        let mut next = if plan.is_empty() {
            Next::Backoff(self.backoff.initial)
        } else {
            Next::Plan(0)
        };
        // The transition is known to have taken longer than `not_before` (a check sent
        // then saw it pending) and at most until the ready check returned.
        let mut not_before = Duration::ZERO;
        let mut polls: u32 = 0;
        let outcome = loop {
            let sent = start.elapsed();
            polls += 1;
            match check().await {
                Ok(Some(v)) => {
                    if fresh {
                        let done = start.elapsed();
                        self.lock(kind).observe((not_before + done) / 2);
                    }
                    break Ok(v);
                }
                Ok(None) => not_before = sent,
                Err(e) => break Err(e),
            }
            let left = deadline.remaining();
            if left.is_zero() {
                break Err(Error::DeadlineExceeded(format!(
                    "timed out waiting for {what}; the operation continues in the cloud and a retry will pick it up"
                )));
            }
            let now = start.elapsed();
            let earliest = sent + self.policy.min_gap;
            let at = loop {
                match next {
                    Next::Plan(i) => match plan.get(i) {
                        // A plan point already passed (the poll was held up in the rate
                        // limiter, or is too close to the last) is skipped, not made up.
                        Some(&p) if p < earliest || p <= now => next = Next::Plan(i + 1),
                        Some(&p) => {
                            next = Next::Plan(i + 1);
                            break p;
                        }
                        None => {
                            // Slower than any transition recorded: back off from a tenth
                            // of the time waited so far, capped.
                            let d = now.mul_f64(0.1).max(self.policy.min_gap);
                            next = Next::Backoff(d.min(self.backoff.max));
                        }
                    },
                    Next::Backoff(d) => {
                        next = Next::Backoff(d.mul_f64(self.backoff.factor).min(self.backoff.max));
                        break now + d;
                    }
                }
            };
            tokio::time::sleep_until(start + at.min(now + left)).await;
        };
        if let Some(m) = self.metrics.get() {
            let result = match &outcome {
                Ok(_) => "ready",
                Err(Error::DeadlineExceeded(_)) => "timeout",
                Err(_) => "failed",
            };
            m.wait_finished(kind.name(), result, fresh, start.elapsed(), polls);
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waits(schedule: Schedule) -> Waits {
        Waits::new(
            WaitPolicy {
                schedule,
                ..WaitPolicy::default()
            },
            Backoff::default(),
        )
    }

    /// The old backoff sees a 3 s transition at 0.5 + 0.75 + 1.125 + 1.6875 = 4.0625 s, on
    /// its 5th check; tokio's timer rounds each sleep up to the millisecond.
    #[track_caller]
    fn like_the_old_backoff((t, n): (Duration, u32)) {
        let old = Duration::from_micros(4_062_500);
        assert!(t >= old && t <= old + Duration::from_millis(4), "{t:?}");
        assert_eq!(n, 5);
    }

    fn secs(v: &[Duration]) -> Vec<f64> {
        v.iter()
            .map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
            .collect()
    }

    /// A transition that completes `took` after the wait starts: returns when the wait
    /// answered (from its start) and how many checks it made.
    async fn wait_for(w: &Waits, kind: WaitKind, took: Duration) -> (Duration, u32) {
        let start = Instant::now();
        let mut n = 0;
        w.until(
            kind,
            true,
            Deadline::new(None, Duration::from_secs(600)),
            "x",
            || {
                n += 1;
                let done = start.elapsed() >= took;
                async move { Ok(done.then_some(())) }
            },
        )
        .await
        .unwrap();
        (start.elapsed(), n)
    }

    #[tokio::test(start_paused = true)]
    async fn polls_until_ready_then_times_out() {
        let w = waits(Schedule::Fixed);
        let mut n = 0;
        let v = w
            .until(
                WaitKind::Create,
                true,
                Deadline::new(None, Duration::from_secs(60)),
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
        let err = w
            .until::<(), _, _>(
                WaitKind::Create,
                true,
                Deadline::new(Some(Duration::from_secs(3)), Duration::from_secs(60)),
                "volume toronto/1 to be available",
                || async { Ok(None) },
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert!(err.to_string().contains("volume toronto/1"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_fixed_schedule_is_the_old_backoff() {
        let w = waits(Schedule::Fixed);
        for _ in 0..5 {
            like_the_old_backoff(wait_for(&w, WaitKind::Attach, Duration::from_secs(3)).await);
        }
        // It records what it saw but never uses it.
        assert_eq!(w.samples(WaitKind::Attach), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn learned_waits_answer_just_after_a_steady_transition() {
        let w = waits(Schedule::Learned { poll_cost: 0.03 });
        let took = Duration::from_secs(3);
        // Cold: the fixed backoff, as before.
        like_the_old_backoff(wait_for(&w, WaitKind::Create, took).await);
        for _ in 0..30 {
            wait_for(&w, WaitKind::Create, took).await;
        }
        let (t, n) = wait_for(&w, WaitKind::Create, took).await;
        assert!(t >= took, "answered at {t:?}, before the transition ended");
        assert!(
            t <= took + took / 20,
            "answered at {t:?}: more than 5% after"
        );
        assert!(n <= 4, "{n} checks");
        // Another kind has learnt nothing from it.
        assert_eq!(w.samples(WaitKind::Detach), 0);
        like_the_old_backoff(wait_for(&w, WaitKind::Detach, took).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cloud_that_changes_speed_is_followed() {
        let w = waits(Schedule::Learned { poll_cost: 0.03 });
        for _ in 0..40 {
            wait_for(&w, WaitKind::Attach, Duration::from_secs(2)).await;
        }
        // Much slower now: past the plan the fallback backs off, capped at 5 s between
        // checks, and the estimate moves up within a window.
        let (t, _) = wait_for(&w, WaitKind::Attach, Duration::from_secs(20)).await;
        assert!(
            t >= Duration::from_secs(20) && t <= Duration::from_secs(25),
            "{t:?}"
        );
        for _ in 0..40 {
            wait_for(&w, WaitKind::Attach, Duration::from_secs(20)).await;
        }
        let (t, n) = wait_for(&w, WaitKind::Attach, Duration::from_secs(20)).await;
        assert!(t <= Duration::from_secs(21), "{t:?}");
        assert!(n <= 4, "{n} checks");
        // And faster again: the first planned poll finds it done, the midpoint of what is
        // known pulls the estimate down.
        for _ in 0..40 {
            wait_for(&w, WaitKind::Attach, Duration::from_secs(1)).await;
        }
        let (t, _) = wait_for(&w, WaitKind::Attach, Duration::from_secs(1)).await;
        assert!(t <= Duration::from_millis(1050), "{t:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_that_joined_a_transition_late_teach_nothing() {
        let w = waits(Schedule::Learned { poll_cost: 0.03 });
        let mut n = 0;
        w.until(
            WaitKind::Extend,
            false,
            Deadline::new(None, Duration::from_secs(60)),
            "x",
            || {
                n += 1;
                let done = n >= 2;
                async move { Ok(done.then_some(())) }
            },
        )
        .await
        .unwrap();
        assert_eq!(w.samples(WaitKind::Extend), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn polls_are_never_closer_than_the_minimum_gap() {
        let w = waits(Schedule::Learned { poll_cost: 0.0 });
        // Free polls and a spread of durations: the plan polls at every sample, but a wait
        // still checks at most every 100 ms.
        for i in 0..32u64 {
            let mut e = w.lock(WaitKind::Create);
            e.observe(Duration::from_millis(1000 + 10 * i));
        }
        let start = Instant::now();
        let mut times = Vec::new();
        w.until(
            WaitKind::Create,
            false,
            Deadline::new(None, Duration::from_secs(60)),
            "x",
            || {
                times.push(start.elapsed());
                let done = start.elapsed() >= Duration::from_millis(1300);
                async move { Ok(done.then_some(())) }
            },
        )
        .await
        .unwrap();
        for pair in times.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(100), "{times:?}");
        }
        assert!(times.len() >= 3, "{times:?}");
    }

    #[test]
    fn the_plan_is_dense_where_durations_are_and_sparse_when_polls_cost_more() {
        let mut e = Estimator::default();
        assert!(e.plan(0.03, Duration::from_millis(100)).is_empty());
        for ms in [2900, 3000, 3100, 2950, 3050, 3000, 2980, 3020] {
            e.observe(Duration::from_millis(ms));
        }
        let p = e.plan(0.03, Duration::from_millis(100));
        // Every poll is within the recorded range, the last at the longest.
        assert_eq!(*p.last().unwrap(), Duration::from_millis(3100));
        assert!(p[0] >= Duration::from_millis(2900), "{:?}", secs(&p));
        let cheap = e.plan(0.001, Duration::from_millis(100));
        let dear = e.plan(0.5, Duration::from_millis(100));
        assert!(
            cheap.len() > p.len() && p.len() > dear.len(),
            "{cheap:?} {p:?} {dear:?}"
        );
        assert_eq!(dear, vec![Duration::from_millis(3100)]);
        // Bounded memory: only the last CAPACITY are kept.
        for _ in 0..100 {
            e.observe(Duration::from_secs(9));
        }
        assert_eq!(e.len(), Estimator::CAPACITY);
        assert_eq!(
            e.plan(0.03, Duration::from_millis(100)),
            vec![Duration::from_secs(9)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lists_are_shared_only_between_several_waiters_on_a_small_enough_account() {
        let w = waits(Schedule::Fixed);
        let deadline = Deadline::new(None, Duration::from_secs(60));
        let seen = std::cell::RefCell::new(Vec::new());
        let (seen_ref, w_ref) = (&seen, &w);
        // Each check yields before and after looking, so that waits joined together are
        // all under way when each looks.
        let poll = |kind| {
            w_ref.until(kind, false, deadline, "x", move || async move {
                tokio::task::yield_now().await;
                seen_ref.borrow_mut().push(w_ref.share_volume_list());
                tokio::task::yield_now().await;
                Ok(Some(()))
            })
        };
        poll(WaitKind::Attach).await.unwrap();
        // Two volume waits at once share; a snapshot wait is no volume wait.
        let (a, b) = tokio::join!(poll(WaitKind::Attach), poll(WaitKind::Create));
        a.unwrap();
        b.unwrap();
        tokio::join!(poll(WaitKind::Attach), poll(WaitKind::Snapshot))
            .0
            .unwrap();
        assert_eq!(*seen.borrow(), [false, true, true, false, false]);
        // A list of 25 volumes for 2 waiters is too long to share.
        w.listed(25);
        seen.borrow_mut().clear();
        let (a, b) = tokio::join!(poll(WaitKind::Attach), poll(WaitKind::Create));
        a.unwrap();
        b.unwrap();
        assert_eq!(*seen.borrow(), [false, false]);
    }

    #[test]
    fn recent_samples_weigh_more() {
        // Half the samples at 2 s, half at 10 s. Polling at 2 s before 10 s pays when
        // poll_cost < 4·w/(1 − w), w the weight of the 2 s samples: under 8 when they are
        // the recent half (w = 2/3), under 2 when they are the old half (w = 1/3).
        let plan = |first: u64, then: u64| {
            let mut e = Estimator::default();
            for _ in 0..16 {
                e.observe(Duration::from_secs(first));
            }
            for _ in 0..16 {
                e.observe(Duration::from_secs(then));
            }
            e.plan(4.0, Duration::from_millis(100))
        };
        assert_eq!(
            plan(10, 2),
            vec![Duration::from_secs(2), Duration::from_secs(10)]
        );
        assert_eq!(plan(2, 10), vec![Duration::from_secs(10)]);
    }
}
