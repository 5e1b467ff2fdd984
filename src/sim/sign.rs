//! The Luna Node request signature, as the simulator checks it.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha512;

fn mac(api_key: &str, handler: &str, req: &str, nonce: &str) -> Hmac<Sha512> {
    let mut mac =
        Hmac::<Sha512>::new_from_slice(api_key.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(handler.as_bytes());
    mac.update(b"|");
    mac.update(req.as_bytes());
    mac.update(b"|");
    mac.update(nonce.as_bytes());
    mac
}

/// `hex(HMAC-SHA512(key = api_key, "{handler}|{req}|{nonce}"))`, lowercase.
pub fn signature(api_key: &str, handler: &str, req: &str, nonce: &str) -> String {
    hex::encode(mac(api_key, handler, req, nonce).finalize().into_bytes())
}

/// Whether `sig` (hex, any case) is the signature of the request; compared in constant time.
pub fn verify(api_key: &str, handler: &str, req: &str, nonce: &str, sig: &str) -> bool {
    match hex::decode(sig.trim()) {
        Ok(bytes) => mac(api_key, handler, req, nonce)
            .verify_slice(&bytes)
            .is_ok(),
        Err(_) => false,
    }
}

/// `n` seeded random alphanumeric characters.
pub fn random_token(rng: &mut fastrand::Rng, n: usize) -> String {
    (0..n).map(|_| rng.alphanumeric()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &str = r#"{"api_id":"abcdefghijklmnop","api_partialkey":"abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijkl"}"#;

    fn key() -> String {
        format!(
            "{}{}",
            "abcdefghijklmnopqrstuvwxyz".repeat(4),
            "abcdefghijklmnopqrstuvwx"
        )
    }

    /// The test vector of `shared/lunanode-api.md`.
    #[test]
    fn matches_published_test_vector() {
        assert_eq!(key().len(), 128);
        let create = "183236c9a4635699e454236733a86045857818fa96f1631d1a68550a2277510ccd782fcfb15ea67d035fdfd2b3f7205258d15f72051a1e4d6f6d1d54a6b69997";
        let list = "af5b7ba795e6a65fd12ea80343652ce3de1008972cff6e28185043915ac6c6152e50a931c8ec054f416226b162d21ad7c4461dc2953448f5e743bcf41cdd46c9";
        assert_eq!(signature(&key(), "vm/create/", REQ, "775886400"), create);
        assert_eq!(signature(&key(), "vm/list/", REQ, "775886400"), list);
        assert!(verify(&key(), "vm/create/", REQ, "775886400", create));
        assert!(verify(
            &key(),
            "vm/list/",
            REQ,
            "775886400",
            &list.to_uppercase()
        ));
        assert!(!verify(&key(), "vm/list/", REQ, "775886400", create));
        assert!(!verify(&key(), "vm/list/", REQ, "775886401", list));
        assert!(!verify(&key(), "vm/list/", REQ, "775886400", "zz"));
    }

    #[test]
    fn tokens_are_seeded() {
        let a = random_token(&mut fastrand::Rng::with_seed(3), 128);
        let b = random_token(&mut fastrand::Rng::with_seed(3), 128);
        assert_eq!(a, b);
        assert_eq!(a.len(), 128);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
