//! API credentials: where they come from, how they are checked, and how the key is kept out
//! of logs.

use std::fmt;
use std::path::Path;

/// Exact length of a Luna Node API ID.
pub const API_ID_LEN: usize = 16;
/// Exact length of a Luna Node API key.
pub const API_KEY_LEN: usize = 128;

/// An API ID and key. `Debug` never shows the key.
#[derive(Clone)]
pub struct Credentials {
    api_id: String,
    api_key: String,
}

/// Why credentials could not be loaded. Messages never contain the key.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "no Luna Node API credentials: set LUNANODE_API_ID and LUNANODE_API_KEY, or pass --api-id-file and --api-key-file (or run with --sim)"
    )]
    Missing,
    #[error(
        "the API ID must be exactly {API_ID_LEN} characters, got {0}; check LUNANODE_API_ID / --api-id-file"
    )]
    BadIdLength(usize),
    #[error(
        "the API key must be exactly {API_KEY_LEN} characters, got {0}; check LUNANODE_API_KEY / --api-key-file"
    )]
    BadKeyLength(usize),
    #[error("cannot read {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Credentials {
    /// Check lengths; surrounding whitespace (a trailing newline in a Secret file) is ignored.
    pub fn new(api_id: &str, api_key: &str) -> Result<Self, CredentialsError> {
        let api_id = api_id.trim();
        let api_key = api_key.trim();
        if api_id.chars().count() != API_ID_LEN {
            return Err(CredentialsError::BadIdLength(api_id.chars().count()));
        }
        if api_key.chars().count() != API_KEY_LEN {
            return Err(CredentialsError::BadKeyLength(api_key.chars().count()));
        }
        Ok(Self {
            api_id: api_id.to_string(),
            api_key: api_key.to_string(),
        })
    }

    /// Files win over the environment values, as a mounted Kubernetes Secret is the
    /// deliberate choice of whoever wrote the manifest.
    pub fn load(
        id_file: Option<&Path>,
        key_file: Option<&Path>,
        env_id: Option<&str>,
        env_key: Option<&str>,
    ) -> Result<Self, CredentialsError> {
        let read = |what: &'static str, p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CredentialsError::Read {
                what,
                path: p.display().to_string(),
                source,
            })
        };
        let id = match id_file {
            Some(p) => Some(read("the API ID", p)?),
            None => env_id.map(str::to_string),
        };
        let key = match key_file {
            Some(p) => Some(read("the API key", p)?),
            None => env_key.map(str::to_string),
        };
        match (id, key) {
            (Some(id), Some(key)) => Self::new(&id, &key),
            _ => Err(CredentialsError::Missing),
        }
    }

    /// The API ID (not secret).
    pub fn api_id(&self) -> &str {
        &self.api_id
    }

    /// The full key, for signing only.
    pub(crate) fn api_key(&self) -> &str {
        &self.api_key
    }

    /// The first half of the key, which the API expects inside every request.
    pub(crate) fn partial_key(&self) -> &str {
        &self.api_key[..64]
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("api_id", &self.api_id)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        "k".repeat(API_KEY_LEN)
    }

    #[test]
    fn checks_lengths_without_echoing_the_key() {
        let err = Credentials::new("short", &key()).unwrap_err();
        assert!(err.to_string().contains("API ID"));
        let bad_key = "s3cr3t".repeat(3);
        let err = Credentials::new("abcdefghijklmnop", &bad_key).unwrap_err();
        assert!(err.to_string().contains("API key"));
        assert!(!err.to_string().contains(&bad_key));
    }

    #[test]
    fn debug_redacts_the_key() {
        let c = Credentials::new("abcdefghijklmnop\n", &format!("{}\n", key())).unwrap();
        let shown = format!("{c:?}");
        assert!(shown.contains("abcdefghijklmnop"));
        assert!(!shown.contains(&key()));
        assert_eq!(c.partial_key().len(), 64);
    }

    #[test]
    fn files_win_over_environment() {
        let dir = tempfile::tempdir().unwrap();
        let idf = dir.path().join("id");
        let keyf = dir.path().join("key");
        std::fs::write(&idf, "ffffffffffffffff\n").unwrap();
        std::fs::write(&keyf, key()).unwrap();
        let c = Credentials::load(Some(&idf), Some(&keyf), Some("eeeeeeeeeeeeeeee"), None).unwrap();
        assert_eq!(c.api_id(), "ffffffffffffffff");
        assert!(matches!(
            Credentials::load(None, None, None, None),
            Err(CredentialsError::Missing)
        ));
    }
}
