//! How the demo tells its story: one line per step with its outcome and duration, details
//! indented below it, a spinner on stderr while a step runs (only when stdout is a
//! terminal), and a summary.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A step's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed(String),
    Skipped(String),
}

/// One reported step.
#[derive(Debug, Clone)]
pub struct StepResult {
    pub number: usize,
    pub name: String,
    pub outcome: Outcome,
    pub elapsed: Duration,
}

/// The step that stopped the demo.
#[derive(Debug, Clone)]
pub struct Failure {
    pub number: usize,
    pub name: String,
    pub reason: String,
}

/// What a step's work returns: its value and a detail line (may be empty or multi-line).
pub type StepOutput<T> = Result<(T, String), String>;

/// Longest a single step may take before it is reported as failed.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
const NAME_WIDTH: usize = 76;

/// Prints steps and keeps their results.
pub struct Reporter {
    results: Vec<StepResult>,
    spinner: bool,
    started: Instant,
    /// Test hook: the first step whose name contains this fails after doing its work.
    fail_at: Option<String>,
}

impl Reporter {
    pub fn new(fail_at: Option<String>) -> Self {
        Reporter {
            results: Vec::new(),
            spinner: std::io::stdout().is_terminal() && std::io::stderr().is_terminal(),
            started: Instant::now(),
            fail_at: fail_at.map(|s| s.to_lowercase()),
        }
    }

    pub fn results(&self) -> &[StepResult] {
        &self.results
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Run one step: print it, time it, and report ok or FAILED with the reason.
    pub async fn step<T, F>(&mut self, name: impl Into<String>, work: F) -> Result<T, Failure>
    where
        F: Future<Output = StepOutput<T>>,
    {
        let name = name.into();
        let number = self.results.len() + 1;
        let start = Instant::now();
        let spinner = self.spinner.then(|| spin(number, name.clone()));
        let result = match tokio::time::timeout(STEP_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(format!("did not finish within {}s", STEP_TIMEOUT.as_secs())),
        };
        let elapsed = start.elapsed();
        if let Some(s) = spinner {
            s.abort();
            let _ = s.await;
            eprint!("\r\x1b[2K");
            let _ = std::io::stderr().flush();
        }
        let injected = self
            .fail_at
            .as_ref()
            .is_some_and(|f| name.to_lowercase().contains(f.as_str()));
        let result = match result {
            Ok(_) if injected => {
                self.fail_at = None;
                Err("injected failure (--fail-at), to show that the demo cleans up".into())
            }
            r => r,
        };
        match result {
            Ok((value, detail)) => {
                self.print(number, &name, "ok", elapsed, &detail);
                self.results.push(StepResult {
                    number,
                    name,
                    outcome: Outcome::Ok,
                    elapsed,
                });
                Ok(value)
            }
            Err(reason) => {
                self.print(number, &name, "FAILED", elapsed, &reason);
                self.results.push(StepResult {
                    number,
                    name: name.clone(),
                    outcome: Outcome::Failed(reason.clone()),
                    elapsed,
                });
                Err(Failure {
                    number,
                    name,
                    reason,
                })
            }
        }
    }

    /// Report a step that does not run in this mode.
    pub fn skip(&mut self, name: impl Into<String>, why: &str) {
        let name = name.into();
        let number = self.results.len() + 1;
        self.print(number, &name, "skipped", Duration::ZERO, why);
        self.results.push(StepResult {
            number,
            name,
            outcome: Outcome::Skipped(why.to_string()),
            elapsed: Duration::ZERO,
        });
    }

    fn print(&self, number: usize, name: &str, status: &str, elapsed: Duration, detail: &str) {
        let time = if status == "skipped" {
            String::new()
        } else {
            secs(elapsed)
        };
        let line = format!("{number:>3}. {name:<NAME_WIDTH$} {status:<7} {time:>7}");
        let mut text = format!("{}\n", line.trim_end());
        for line in detail.lines().filter(|l| !l.trim().is_empty()) {
            text.push_str(&format!("       {line}\n"));
        }
        // print! (not a raw stdout handle) so that unit tests capture it.
        print!("{text}");
        let _ = std::io::stdout().flush();
    }

    /// Counts of ok, failed and skipped steps.
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for r in &self.results {
            match r.outcome {
                Outcome::Ok => c.0 += 1,
                Outcome::Failed(_) => c.1 += 1,
                Outcome::Skipped(_) => c.2 += 1,
            }
        }
        c
    }
}

/// A step's duration as printed.
pub fn secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// Bytes in binary units, as `df -h` shows them.
pub fn human_bytes(b: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn spin(number: usize, name: String) -> tokio::task::JoinHandle<()> {
    // Short enough for an 80-column terminal: a wrapped line cannot be redrawn with \r.
    let name: String = match name.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &name[..i]),
        None => name,
    };
    tokio::spawn(async move {
        const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
        let start = Instant::now();
        let mut i = 0;
        loop {
            eprint!(
                "\r\x1b[2K{} {number:>2}. {name}  {:.1}s",
                FRAMES[i % FRAMES.len()],
                start.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
            i += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_shown_like_df() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(2 << 30), "2.0 GiB");
        assert_eq!(secs(Duration::from_millis(42)), "42 ms");
        assert_eq!(secs(Duration::from_millis(1500)), "1.50 s");
    }

    #[tokio::test]
    async fn steps_are_counted_and_the_injected_failure_fires_once() {
        let mut r = Reporter::new(Some("Second".into()));
        assert_eq!(
            r.step("first", async { Ok((1, String::new())) })
                .await
                .unwrap(),
            1
        );
        let f = r
            .step("the second step", async { Ok(((), String::new())) })
            .await
            .unwrap_err();
        assert_eq!((f.number, f.reason.contains("injected")), (2, true));
        r.skip("third", "not here");
        assert!(
            r.step("second again", async { Ok(((), String::new())) })
                .await
                .is_ok()
        );
        assert_eq!(r.counts(), (2, 1, 1));
    }
}
