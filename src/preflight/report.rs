//! What `preflight` tells the operator: one line per check, `ok` or `FAILED` with the fix,
//! printed as each check ends (a run that hangs in the cloud still shows how far it got),
//! or one JSON document at the end for machines.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Failed,
}

/// One check.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Line {
    /// What was checked, e.g. `disk found on this node`.
    pub check: String,
    pub status: Status,
    /// What was seen.
    pub detail: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// How long it took, in seconds.
    pub seconds: f64,
}

/// Everything a run found; the JSON document of `--json`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// Every check passed and nothing was left behind.
    pub ok: bool,
    pub checks: Vec<Line>,
    /// Which API rules the account answered by: `current` (the reference's) or `old` (it
    /// said `region not set` and volume calls carry `region`).
    pub api_rules: String,
    /// The attach target used.
    pub attach_target: String,
    /// The by-id names the test disk appeared under, and the device they led to.
    pub disk_names: Vec<String>,
    pub device: Option<String>,
    /// Objects of this node's preflights still in the cloud at the end (none on success).
    pub left_behind: Vec<String>,
}

/// Collects lines, printing each as it comes unless the output is JSON.
#[derive(Debug, Clone)]
pub struct Report {
    inner: Arc<Mutex<Summary>>,
    json: bool,
}

impl Report {
    pub fn new(json: bool) -> Self {
        Report {
            inner: Arc::new(Mutex::new(Summary::default())),
            json,
        }
    }

    /// Record a check.
    pub fn line(&self, line: Line) {
        if !self.json {
            let mut out = std::io::stdout().lock();
            let mark = match line.status {
                Status::Ok => "ok    ",
                Status::Failed => "FAILED",
            };
            let _ = writeln!(out, "{mark}  {}: {}", line.check, line.detail);
            if let Some(fix) = &line.fix {
                let _ = writeln!(out, "        fix: {fix}");
            }
            let _ = out.flush();
        }
        self.with(|s| s.checks.push(line));
    }

    /// Change the summary.
    pub fn with<T>(&self, f: impl FnOnce(&mut Summary) -> T) -> T {
        f(&mut self.inner.lock().expect("report lock"))
    }

    /// Whether any check failed so far.
    pub fn failed(&self) -> bool {
        self.with(|s| s.checks.iter().any(|l| l.status == Status::Failed))
    }

    /// The final word: the summary line, or the JSON document.
    pub fn finish(&self) -> Summary {
        let summary = self.with(|s| {
            s.ok = !s.checks.iter().any(|l| l.status == Status::Failed) && s.left_behind.is_empty();
            s.clone()
        });
        let mut out = std::io::stdout().lock();
        if self.json {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&summary).unwrap_or_default()
            );
        } else if summary.ok {
            let _ = writeln!(
                out,
                "preflight passed: this node and account can run lunanode-csi (attach target {}, {} API rules)",
                summary.attach_target, summary.api_rules
            );
        } else if summary.left_behind.is_empty() {
            let _ = writeln!(
                out,
                "preflight FAILED (see the FAILED lines and their fixes); nothing was left behind"
            );
        } else {
            let _ = writeln!(
                out,
                "preflight FAILED and could not remove: {}; a later preflight on this node removes them, or use `lunanode-csi volume detach/delete`",
                summary.left_behind.join(", ")
            );
        }
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(status: Status) -> Line {
        Line {
            check: "c".into(),
            status,
            detail: "d".into(),
            fix: None,
            seconds: 0.0,
        }
    }

    #[test]
    fn a_run_passes_only_with_every_check_ok_and_nothing_left() {
        let r = Report::new(true);
        r.line(line(Status::Ok));
        assert!(!r.failed());
        assert!(r.finish().ok);
        r.with(|s| s.left_behind.push("volume 7".into()));
        assert!(!r.finish().ok);
        let r = Report::new(true);
        r.line(line(Status::Ok));
        r.line(line(Status::Failed));
        assert!(r.failed());
        let s = r.finish();
        assert!(!s.ok);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["checks"][1]["status"], "failed");
        assert!(v["checks"][0].get("fix").is_none());
    }
}
