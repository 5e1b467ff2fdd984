//! When a caller's request actually left: a wait records its transition as still pending or
//! done at the moment it *looked*, and with fifty waits at once a poll can spend a while in
//! the in-flight bound, the rate limiter or behind a shared list already on the wire before
//! it is sent. Recording the moment the poll was due instead taught the plan that
//! transitions end earlier than they do, so its last poll fell short of the slowest ones.
//!
//! A task-local rather than a return value: every client method would otherwise carry the
//! time in its signature for the one caller (the wait) that needs it.

use std::cell::Cell;
use std::future::Future;

use tokio::time::Instant;

tokio::task_local! {
    static LAST_SENT: Cell<Option<Instant>>;
}

/// Run `f`, and return with its output when the last request it sent left (`None`: it
/// sent none, e.g. it was answered from a shared call sent before it asked).
pub async fn last_sent<F: Future>(f: F) -> (F::Output, Option<Instant>) {
    LAST_SENT
        .scope(Cell::new(None), async {
            let out = f.await;
            (out, LAST_SENT.with(Cell::get))
        })
        .await
}

/// A request of the current task left at `at` (outside [`last_sent`]: nothing is recorded).
pub(crate) fn mark(at: Instant) {
    let _ = LAST_SENT.try_with(|c| c.set(Some(c.get().map_or(at, |t| t.max(at)))));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_latest_request_of_the_task_is_reported() {
        let t0 = Instant::now();
        let (v, at) = last_sent(async {
            mark(t0 + Duration::from_millis(5));
            mark(t0 + Duration::from_millis(2));
            7
        })
        .await;
        assert_eq!((v, at), (7, Some(t0 + Duration::from_millis(5))));
        assert_eq!(last_sent(async {}).await.1, None);
        // Outside a scope a mark is dropped, not a panic.
        mark(t0);
    }
}
