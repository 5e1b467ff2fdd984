//! How long the simulated cloud's status transitions take: a distribution per kind of
//! transition, drawn per operation from the seed, and a log of every transition (when it
//! started, when it was due, when a create first used its result) so that benchmarks can
//! tell how long after the cloud was ready the driver noticed.

use std::time::{Duration, Instant};

/// The kinds of transition, as `--transition-ms KIND=…` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransitionKind {
    /// An empty volume: `creating` → `available`.
    Create,
    /// A volume from a snapshot or an image: `creating` → `available`.
    CreateFromSource,
    /// `attaching` → `in-use`.
    Attach,
    /// `detaching` → `available`.
    Detach,
    /// `extending` → `available`.
    Extend,
    /// A snapshot: `pending` → `available`.
    Snapshot,
    /// A replicated image: `pending` → `active`.
    Replicate,
}

impl TransitionKind {
    pub const ALL: [TransitionKind; 7] = [
        TransitionKind::Create,
        TransitionKind::CreateFromSource,
        TransitionKind::Attach,
        TransitionKind::Detach,
        TransitionKind::Extend,
        TransitionKind::Snapshot,
        TransitionKind::Replicate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TransitionKind::Create => "create",
            TransitionKind::CreateFromSource => "create-from-source",
            TransitionKind::Attach => "attach",
            TransitionKind::Detach => "detach",
            TransitionKind::Extend => "extend",
            TransitionKind::Snapshot => "snapshot",
            TransitionKind::Replicate => "replicate",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Durations drawn uniformly from `lo..=hi` (`lo == hi`: always that long).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub lo: Duration,
    pub hi: Duration,
}

impl Span {
    pub const fn fixed(d: Duration) -> Self {
        Span { lo: d, hi: d }
    }

    /// `mean` ± `percent`%.
    pub fn around(mean: Duration, percent: u32) -> Self {
        let d = mean * percent / 100;
        Span {
            lo: mean - d,
            hi: mean + d,
        }
    }

    fn draw(&self, rng: &mut fastrand::Rng) -> Duration {
        if self.hi <= self.lo {
            return self.lo;
        }
        self.lo + (self.hi - self.lo).mul_f64(rng.f64())
    }

    fn scaled(self, s: f64) -> Self {
        Span {
            lo: self.lo.mul_f64(s),
            hi: self.hi.mul_f64(s),
        }
    }
}

/// A duration distribution for every kind of transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transitions([Span; 7]);

impl Default for Transitions {
    /// Instant: every change completes within the call that made it.
    fn default() -> Self {
        Transitions::fixed(Duration::ZERO)
    }
}

impl From<Duration> for Transitions {
    fn from(d: Duration) -> Self {
        Transitions::fixed(d)
    }
}

impl Transitions {
    /// Every kind takes `d`.
    pub fn fixed(d: Duration) -> Self {
        Transitions([Span::fixed(d); 7])
    }

    /// Every kind drawn from `span`.
    pub fn all(span: Span) -> Self {
        Transitions([span; 7])
    }

    /// The `steady` shape: each kind within ±10% of a mean of its own (create 3 s, from a
    /// source 4 s, attach 2 s, detach 2 s, extend 3 s, snapshot 3 s, replicate 5 s).
    pub fn steady() -> Self {
        let s = |ms| Span::around(Duration::from_millis(ms), 10);
        Transitions([
            s(3000),
            s(4000),
            s(2000),
            s(2000),
            s(3000),
            s(3000),
            s(5000),
        ])
    }

    /// The `spread` shape: every kind anywhere from 2 s to 8 s.
    pub fn spread() -> Self {
        Transitions::all(Span {
            lo: Duration::from_secs(2),
            hi: Duration::from_secs(8),
        })
    }

    pub fn span(&self, kind: TransitionKind) -> Span {
        self.0[kind.index()]
    }

    pub fn set(&mut self, kind: TransitionKind, span: Span) {
        self.0[kind.index()] = span;
    }

    /// Every duration multiplied by `s` (benchmarks run the shapes faster).
    pub fn scaled(self, s: f64) -> Self {
        Transitions(self.0.map(|sp| sp.scaled(s)))
    }

    /// Draw one transition's duration.
    pub fn draw(&self, kind: TransitionKind, rng: &mut fastrand::Rng) -> Duration {
        self.span(kind).draw(rng)
    }

    /// Apply `--transition-ms` items in order (later ones win).
    pub fn from_items(items: &[TransitionItem]) -> Self {
        Transitions::apply(Transitions::default(), items)
    }

    /// `t` with `items` applied in order (later ones win).
    pub fn apply(mut t: Transitions, items: &[TransitionItem]) -> Self {
        for item in items {
            match *item {
                TransitionItem::Shape(s) => t = s,
                TransitionItem::All(span) => t = Transitions::all(span),
                TransitionItem::Kind(k, span) => t.set(k, span),
            }
        }
        t
    }
}

/// One item of `--transition-ms`: `MS`, `LO..HI`, `steady`, `spread`, or either of the
/// first two after `KIND=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionItem {
    Shape(Transitions),
    All(Span),
    Kind(TransitionKind, Span),
}

fn parse_span(s: &str) -> Result<Span, String> {
    let ms = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("{v:?} is not a whole number of milliseconds"))
    };
    match s.split_once("..") {
        Some((lo, hi)) => {
            let (lo, hi) = (ms(lo)?, ms(hi)?);
            if lo > hi {
                return Err(format!("{s:?}: the range is empty"));
            }
            Ok(Span { lo, hi })
        }
        None => Ok(Span::fixed(ms(s)?)),
    }
}

impl std::str::FromStr for TransitionItem {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "steady" => return Ok(TransitionItem::Shape(Transitions::steady())),
            "spread" => return Ok(TransitionItem::Shape(Transitions::spread())),
            _ => {}
        }
        match s.split_once('=') {
            Some((kind, span)) => {
                let kind = TransitionKind::ALL
                    .into_iter()
                    .find(|k| k.name() == kind.trim())
                    .ok_or_else(|| {
                        format!(
                            "unknown transition kind {kind:?} (known: {})",
                            TransitionKind::ALL.map(TransitionKind::name).join(", ")
                        )
                    })?;
                Ok(TransitionItem::Kind(kind, parse_span(span)?))
            }
            None => Ok(TransitionItem::All(parse_span(s)?)),
        }
    }
}

/// One transition the cloud made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionRecord {
    pub kind: TransitionKind,
    /// The volume ID, snapshot UUID or image ID.
    pub object: String,
    pub started: Instant,
    /// When it completed (was due).
    pub ready: Instant,
    /// Snapshots and images: when a `volume/create` first used it as a source.
    pub used: Option<Instant>,
}

/// The most records kept; older ones are dropped.
const LOG_CAPACITY: usize = 100_000;

/// Every transition since the start or the last [`TransitionLog::take`].
#[derive(Debug, Clone, Default)]
pub struct TransitionLog {
    records: Vec<TransitionRecord>,
}

impl TransitionLog {
    pub fn push(&mut self, r: TransitionRecord) {
        if self.records.len() >= LOG_CAPACITY {
            self.records.drain(..LOG_CAPACITY / 2);
        }
        self.records.push(r);
    }

    /// A create used `object` as its source at `at`.
    pub fn used(&mut self, kind: TransitionKind, object: &str, at: Instant) {
        if let Some(r) = self
            .records
            .iter_mut()
            .rev()
            .find(|r| r.kind == kind && r.object == object)
            && r.used.is_none()
        {
            r.used = Some(at);
        }
    }

    pub fn take(&mut self) -> Vec<TransitionRecord> {
        std::mem::take(&mut self.records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_parse_and_apply_in_order() {
        let items: Vec<TransitionItem> = ["2000..8000", "attach=500", "detach=100..200"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let t = Transitions::from_items(&items);
        let ms = Duration::from_millis;
        assert_eq!(
            t.span(TransitionKind::Create),
            Span {
                lo: ms(2000),
                hi: ms(8000)
            }
        );
        assert_eq!(t.span(TransitionKind::Attach), Span::fixed(ms(500)));
        assert_eq!(
            t.span(TransitionKind::Detach),
            Span {
                lo: ms(100),
                hi: ms(200)
            }
        );
        let steady: TransitionItem = "steady".parse().unwrap();
        assert_eq!(
            Transitions::from_items(&[steady]).span(TransitionKind::Replicate),
            Span {
                lo: ms(4500),
                hi: ms(5500)
            }
        );
        assert_eq!(Transitions::from_items(&[]), Transitions::default());
        for bad in ["8000..2000", "fast", "mount=5", "1.5", "attach=", "-1"] {
            assert!(bad.parse::<TransitionItem>().is_err(), "{bad}");
        }
    }

    #[test]
    fn draws_are_seeded_and_within_the_span() {
        let t = Transitions::spread();
        let draw = |seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            (0..200)
                .map(|_| t.draw(TransitionKind::Attach, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = draw(3);
        assert_eq!(a, draw(3));
        assert_ne!(a, draw(4));
        assert!(
            a.iter()
                .all(|d| *d >= Duration::from_secs(2) && *d <= Duration::from_secs(8))
        );
        // Spread over the range, not bunched.
        assert!(a.iter().any(|d| *d < Duration::from_secs(3)));
        assert!(a.iter().any(|d| *d > Duration::from_secs(7)));
        assert_eq!(
            Transitions::steady()
                .scaled(0.1)
                .span(TransitionKind::Attach),
            Span {
                lo: Duration::from_millis(180),
                hi: Duration::from_millis(220)
            }
        );
    }
}
