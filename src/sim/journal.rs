//! The request journal: every API request the simulator receives, as the caller sent it
//! (read from the raw body before rate limits, faults or the signature check), without
//! credentials. Tests use it as a recording proxy: "every `volume/attach` sent
//! `target=/dev/vda`", "every `req` was ASCII".

use std::collections::{BTreeMap, HashMap, VecDeque};

/// How many requests the journal keeps (the oldest are dropped first).
pub const JOURNAL_LIMIT: usize = 100_000;

/// The parameters never kept: the credentials inside `req`.
const CREDENTIALS: [&str; 2] = ["api_id", "api_partialkey"];

/// One API request as the simulator received it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SimRequest {
    /// `category/action`, e.g. `volume/attach`.
    pub handler: String,
    /// Whether the `req` form field was pure ASCII (true when there was none).
    pub ascii: bool,
    /// The decoded `req` parameters (every value a string) without `api_id` and
    /// `api_partialkey`; empty when `req` was missing or not a JSON object. The signature
    /// and nonce are not kept.
    pub params: BTreeMap<String, String>,
}

impl SimRequest {
    /// The request for `handler` with this decoded form.
    pub(crate) fn from_form(handler: &str, form: &HashMap<String, String>) -> Self {
        let req = form.get("req");
        let params = req
            .and_then(|r| super::http::parse_req(r))
            .map(|p| {
                p.0.into_iter()
                    .filter(|(k, _)| !CREDENTIALS.contains(&k.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        SimRequest {
            handler: handler.to_string(),
            ascii: req.is_none_or(|r| r.is_ascii()),
            params,
        }
    }

    /// A parameter's value.
    pub fn param(&self, k: &str) -> Option<&str> {
        self.params.get(k).map(String::as_str)
    }
}

/// The last [`JOURNAL_LIMIT`] requests.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    entries: VecDeque<SimRequest>,
}

impl Journal {
    pub(crate) fn push(&mut self, r: SimRequest) {
        if self.entries.len() >= JOURNAL_LIMIT {
            self.entries.pop_front();
        }
        self.entries.push_back(r);
    }

    pub(crate) fn all(&self) -> Vec<SimRequest> {
        self.entries.iter().cloned().collect()
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keeps_params_without_credentials() {
        let r = SimRequest::from_form(
            "volume/attach",
            &form(&[
                (
                    "req",
                    r#"{"api_id":"x","api_partialkey":"y","volume_id":"3","target":"/dev/vda","n":4}"#,
                ),
                ("signature", "abc"),
                ("nonce", "1"),
            ]),
        );
        assert_eq!(r.handler, "volume/attach");
        assert!(r.ascii);
        assert_eq!(
            r.params.keys().collect::<Vec<_>>(),
            ["n", "target", "volume_id"]
        );
        assert_eq!(r.param("target"), Some("/dev/vda"));
        assert_eq!(r.param("n"), Some("4"));
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("abc") && !text.contains("api_"), "{text}");
    }

    #[test]
    fn flags_non_ascii_and_survives_garbage() {
        let r = SimRequest::from_form("volume/create", &form(&[("req", r#"{"label":"é"}"#)]));
        assert!(!r.ascii);
        assert_eq!(r.param("label"), Some("é"));
        let r = SimRequest::from_form("volume/create", &form(&[("req", r#"{"label":"\u00e9"}"#)]));
        assert!(r.ascii);
        assert_eq!(r.param("label"), Some("é"));
        let r = SimRequest::from_form("vm/list", &form(&[("req", "not json")]));
        assert!(r.ascii && r.params.is_empty());
        let r = SimRequest::from_form("vm/list", &HashMap::new());
        assert!(r.ascii && r.params.is_empty());
    }

    #[test]
    fn is_bounded() {
        let mut j = Journal::default();
        for i in 0..JOURNAL_LIMIT + 5 {
            j.push(SimRequest {
                handler: i.to_string(),
                ascii: true,
                params: BTreeMap::new(),
            });
        }
        let all = j.all();
        assert_eq!(all.len(), JOURNAL_LIMIT);
        assert_eq!(all[0].handler, "5");
        j.clear();
        assert!(j.all().is_empty());
    }
}
