//! A per-object in-flight guard: while one call works on a volume (or snapshot, or name),
//! a second call for the same key is refused with ABORTED instead of racing it. The CSI
//! sidecars and kubelet retry ABORTED with backoff.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::error::Error;

/// The set of keys with an operation in flight. Cloning shares the set.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Holds a key until dropped.
#[derive(Debug)]
#[must_use = "the key is released when the guard is dropped"]
pub struct Guard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take `key`, or `None` when an operation on it is already in flight.
    pub fn try_lock(&self, key: &str) -> Option<Guard> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if !keys.insert(key.to_string()) {
            return None;
        }
        Some(Guard {
            keys: Arc::clone(&self.keys),
            key: key.to_string(),
        })
    }

    /// Take `key`, or fail with ABORTED naming `what` (e.g. "volume toronto/12").
    pub fn lock(&self, key: &str, what: &str) -> Result<Guard, Error> {
        self.try_lock(key).ok_or_else(|| {
            Error::Aborted(format!(
                "an operation on {what} is already in progress; retry when it has finished"
            ))
        })
    }

    /// Whether `key` is held right now.
    pub fn is_locked(&self, key: &str) -> bool {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }
}

impl Guard {
    /// The key this guard holds.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_the_same_key_fails_until_released() {
        let f = InFlight::new();
        let g = f.try_lock("vol-1").unwrap();
        assert_eq!(g.key(), "vol-1");
        assert!(f.try_lock("vol-1").is_none());
        let other = f.clone().try_lock("vol-2").unwrap();
        assert!(f.is_locked("vol-1") && f.is_locked("vol-2"));
        drop(g);
        assert!(!f.is_locked("vol-1"));
        assert!(f.try_lock("vol-1").is_some());
        drop(other);
    }

    #[test]
    fn released_even_when_the_holder_panics() {
        let f = InFlight::new();
        let f2 = f.clone();
        let _ = std::thread::spawn(move || {
            let _g = f2.try_lock("vol").unwrap();
            panic!("boom");
        })
        .join();
        assert!(f.try_lock("vol").is_some());
    }
}
