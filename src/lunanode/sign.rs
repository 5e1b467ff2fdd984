//! Request signing, exactly as the Luna Node API expects it.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha512;

/// `hex(HMAC-SHA512(key, "{handler}|{req}|{nonce}"))`, lowercase.
///
/// `handler` is `category/action/` with its trailing slash; `req` must be the exact bytes
/// sent in the `req` form field.
pub fn signature(api_key: &str, handler: &str, req: &str, nonce: &str) -> String {
    let mut mac = Hmac::<Sha512>::new_from_slice(api_key.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(handler.as_bytes());
    mac.update(b"|");
    mac.update(req.as_bytes());
    mac.update(b"|");
    mac.update(nonce.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector from the API notes (`shared/lunanode-api.md`).
    #[test]
    fn matches_published_test_vector() {
        let key = format!(
            "{}{}",
            "abcdefghijklmnopqrstuvwxyz".repeat(4),
            "abcdefghijklmnopqrstuvwx"
        );
        assert_eq!(key.len(), 128);
        let req = r#"{"api_id":"abcdefghijklmnop","api_partialkey":"abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijkl"}"#;
        assert_eq!(
            signature(&key, "vm/create/", req, "775886400"),
            "183236c9a4635699e454236733a86045857818fa96f1631d1a68550a2277510ccd782fcfb15ea67d035fdfd2b3f7205258d15f72051a1e4d6f6d1d54a6b69997"
        );
        assert_eq!(
            signature(&key, "vm/list/", req, "775886400"),
            "af5b7ba795e6a65fd12ea80343652ce3de1008972cff6e28185043915ac6c6152e50a931c8ec054f416226b162d21ad7c4461dc2953448f5e743bcf41cdd46c9"
        );
    }
}
