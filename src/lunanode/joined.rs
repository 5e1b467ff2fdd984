//! Calls that concurrent callers share: a caller joins the next call for the same key that
//! has not been sent yet instead of sending its own, and at most one is on the wire per key.
//!
//! A call already on the wire is never joined: it may have been answered before a change the
//! caller needs to see. So a caller either starts the call (nothing is pending) or joins the
//! one that will be sent as soon as the current one returns; everyone who arrives while a
//! list is on the wire shares the next. Fifty snapshots polled at once then cost one or two
//! region-wide lists per round instead of fifty.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use tokio::time::Instant;

use super::error::ApiError;
use super::sent;

/// A shared call, which every caller awaits: its answer, and when it was sent.
type Call<T> = Shared<BoxFuture<'static, Result<(Arc<T>, Option<Instant>), ApiError>>>;

struct Slot<T> {
    /// The next call, not sent yet, which callers can join.
    next: Mutex<Option<Call<T>>>,
    /// Held while this key's call is on the wire.
    on_the_wire: tokio::sync::Mutex<()>,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self {
            next: Mutex::new(None),
            on_the_wire: tokio::sync::Mutex::new(()),
        }
    }
}

/// Shared calls by key (a region, or `()` for one account-wide call). A slot per key is kept
/// for the life of the process: keys are regions, a handful.
pub struct Joined<K, T> {
    slots: Mutex<HashMap<K, Arc<Slot<T>>>>,
}

impl<K, T> Default for Joined<K, T> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, T: Send + Sync + 'static> Joined<K, T> {
    /// The answer of the next call for `key`: `send` makes the call's future, and is used
    /// only when there is no call to join. Every caller's task is told when the call was
    /// sent ([`sent::last_sent`]), not only the one whose task happened to drive it.
    pub async fn call<Fut>(&self, key: &K, send: impl FnOnce() -> Fut) -> Result<Arc<T>, ApiError>
    where
        Fut: Future<Output = Result<T, ApiError>> + Send + 'static,
    {
        let (answer, at) = self.next_call(key, send).await?;
        if let Some(at) = at {
            sent::mark(at);
        }
        Ok(answer)
    }

    fn next_call<Fut>(&self, key: &K, send: impl FnOnce() -> Fut) -> Call<T>
    where
        Fut: Future<Output = Result<T, ApiError>> + Send + 'static,
    {
        let slot = {
            let mut slots = self.slots.lock().expect("joined calls lock");
            slots.entry(key.clone()).or_default().clone()
        };
        let mut next = slot.next.lock().expect("joined call lock");
        if let Some(call) = next.as_ref() {
            return call.clone();
        }
        let fut = send();
        let this = slot.clone();
        let call = async move {
            let _wire = this.on_the_wire.lock().await;
            // From here on this call is (about to be) sent: later callers start the next one.
            this.next.lock().expect("joined call lock").take();
            let (answer, at) = sent::last_sent(fut).await;
            answer.map(|v| (Arc::new(v), at))
        }
        .boxed()
        .shared();
        *next = Some(call.clone());
        call
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A call that is sent at once, takes 10 ms, and counts how often it was sent.
    async fn counted(sent: Arc<AtomicUsize>) -> Result<usize, ApiError> {
        sent::mark(Instant::now());
        let n = sent.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(n)
    }

    /// A caller in a task of its own: the call's answer, and when its task was told the
    /// call was sent.
    fn spawn_call(
        joined: &Arc<Joined<&'static str, usize>>,
        key: &'static str,
        sent: &Arc<AtomicUsize>,
    ) -> tokio::task::JoinHandle<(usize, Option<Instant>)> {
        let (joined, sent) = (joined.clone(), sent.clone());
        tokio::spawn(async move {
            let (answer, at) = sent::last_sent(joined.call(&key, || counted(sent))).await;
            (*answer.unwrap(), at)
        })
    }

    #[tokio::test(start_paused = true)]
    async fn callers_share_the_next_call_but_never_one_on_the_wire() {
        let joined: Arc<Joined<&str, usize>> = Arc::default();
        let sent = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        // The first caller starts a call; it is on the wire once polled.
        let first = spawn_call(&joined, "a", &sent);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(sent.load(Ordering::SeqCst), 1);
        // Ten callers arriving meanwhile share one further call, sent when the first
        // returns, and every one of them learns when that was.
        let later: Vec<_> = (0..10).map(|_| spawn_call(&joined, "a", &sent)).collect();
        // Another key is independent.
        let other = spawn_call(&joined, "b", &sent);
        assert_eq!(first.await.unwrap(), (1, Some(t0)));
        for l in later {
            assert_eq!(l.await.unwrap(), (3, Some(t0 + Duration::from_millis(10))));
        }
        assert_eq!(other.await.unwrap().0, 2);
        assert_eq!(sent.load(Ordering::SeqCst), 3);
        // With nothing pending, the next caller sends at once.
        assert_eq!(spawn_call(&joined, "a", &sent).await.unwrap().0, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_all_its_callers_dropped_does_not_block_the_next() {
        let joined: Arc<Joined<&str, usize>> = Arc::default();
        let sent = Arc::new(AtomicUsize::new(0));
        let abandoned = spawn_call(&joined, "a", &sent);
        tokio::time::sleep(Duration::from_millis(1)).await;
        abandoned.abort();
        let _ = abandoned.await;
        assert_eq!(spawn_call(&joined, "a", &sent).await.unwrap().0, 2);
        let failing = joined.call(&"a", || async {
            Err::<usize, _>(ApiError::Other {
                action: "x".into(),
                message: "down".into(),
            })
        });
        assert!(failing.await.is_err());
        assert_eq!(spawn_call(&joined, "a", &sent).await.unwrap().0, 3);
    }
}
