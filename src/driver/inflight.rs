//! A per-key guard: a second call on the same volume (or name) while one is running gets
//! ABORTED, as the CSI spec recommends, while different keys proceed in parallel.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::error::Error;

/// The set of keys with an operation in flight.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Releases its key when dropped, including when the handler's future is cancelled.
#[derive(Debug)]
pub struct Guard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    /// Claim `key`, or say who holds it.
    pub fn try_lock(&self, key: impl Into<String>) -> Option<Guard> {
        let key = key.into();
        let mut keys = self.keys.lock().expect("in-flight lock");
        if !keys.insert(key.clone()) {
            return None;
        }
        Some(Guard {
            keys: self.keys.clone(),
            key,
        })
    }

    /// Claim `key` or fail with ABORTED naming `what`.
    pub fn lock(&self, key: impl Into<String>, what: &str) -> Result<Guard, Error> {
        self.try_lock(key).ok_or_else(|| {
            Error::Aborted(format!(
                "an operation on {what} is already in progress; retry when it has finished"
            ))
        })
    }

    /// How many operations are in flight.
    pub fn len(&self) -> usize {
        self.keys.lock().expect("in-flight lock").len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_fails_until_released() {
        let f = InFlight::default();
        let g = f.try_lock("vol:1").unwrap();
        assert!(f.try_lock("vol:1").is_none());
        assert!(f.try_lock("vol:2").is_some());
        assert_eq!(
            f.lock("vol:1", "volume toronto/1").unwrap_err().code(),
            tonic::Code::Aborted
        );
        drop(g);
        assert!(f.try_lock("vol:1").is_some());
        assert!(f.is_empty());
    }
}
