//! Reading API replies: the status, the `success`/`error` envelope, and the payload, parsed
//! straight from the body's bytes into typed values (no `serde_json::Value` tree in
//! between, so a 1,000-volume `volume/list` costs its volumes and nothing more).
//!
//! The rules (`shared/lunanode-api.md`): a body whose `success` is not the string `"yes"`
//! is a failure whatever the HTTP status, its `error` text is HTML-unescaped and
//! classified; 429 is throttling and 5xx transient; a body that is not JSON is an error.

use std::fmt;
use std::marker::PhantomData;

use http::StatusCode;
use serde::Deserialize;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor,
};

use super::error::ApiError;
use super::types::html_unescape;

/// Whether a reply succeeded, and the failure's error text; every other field is skipped
/// without being stored.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Envelope {
    /// `success` is the string `"yes"`.
    pub ok: bool,
    /// `error`, when it is a string (still HTML-escaped).
    pub error: Option<String>,
}

/// Decide what an HTTP exchange means before its payload is read: `Ok` when the cloud
/// said `success: "yes"`, else the classified failure.
pub(super) fn check(action: &str, status: StatusCode, body: &[u8]) -> Result<(), ApiError> {
    if status == StatusCode::TOO_MANY_REQUESTS {
        let said = parse::<Envelope>(body)
            .ok()
            .and_then(|e| e.error)
            .map(|e| html_unescape(&e))
            .unwrap_or_default();
        return Err(ApiError::Throttled {
            action: action.to_string(),
            message: format!("HTTP 429 {said}"),
        });
    }
    if status.is_server_error() {
        return Err(ApiError::Transient {
            action: action.to_string(),
            message: format!("HTTP {status}"),
        });
    }
    let other = |message: String| ApiError::Other {
        action: action.to_string(),
        message,
    };
    let envelope = match parse::<Envelope>(body) {
        Ok(e) => e,
        Err(_) if !status.is_success() => return Err(other(format!("HTTP {status}"))),
        Err(e) => return Err(other(format!("unparseable response: {e}"))),
    };
    if envelope.ok {
        return Ok(());
    }
    let message = envelope.error.map_or_else(
        || format!("HTTP {status}: call failed without a message"),
        |e| html_unescape(&e),
    );
    Err(ApiError::from_cloud_message(action, &message))
}

/// The payload under `name` in a successful reply (`{"success": "yes", "volume": {...}}`).
pub(super) fn field<T: DeserializeOwned>(
    action: &str,
    body: &[u8],
    name: &str,
) -> Result<T, ApiError> {
    let other = |message: String| ApiError::Other {
        action: action.to_string(),
        message,
    };
    match parse_seed(body, Field::<T>::new(name)) {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(other(format!("response has no `{name}`"))),
        Err(e) => Err(other(format!("unexpected `{name}` in response: {e}"))),
    }
}

/// A payload spread over the reply's top level (`{"success": "yes", "volume_id": "12"}`).
pub(super) fn root<T: DeserializeOwned>(action: &str, body: &[u8]) -> Result<T, ApiError> {
    parse(body).map_err(|e| ApiError::Other {
        action: action.to_string(),
        message: format!("unexpected response: {e}"),
    })
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> serde_json::Result<T> {
    parse_seed(body, PhantomData)
}

/// Parse the bytes as they are; a body that is not UTF-8 is read again with the invalid
/// bytes replaced, so a stray Latin-1 error text is still shown rather than refused.
fn parse_seed<V, S>(body: &[u8], seed: S) -> serde_json::Result<V>
where
    S: for<'de> DeserializeSeed<'de, Value = V> + Clone,
{
    fn run<'de, S: DeserializeSeed<'de>>(
        mut de: serde_json::Deserializer<impl serde_json::de::Read<'de>>,
        seed: S,
    ) -> serde_json::Result<S::Value> {
        let v = seed.deserialize(&mut de)?;
        de.end()?;
        Ok(v)
    }
    match run(serde_json::Deserializer::from_slice(body), seed.clone()) {
        Err(_) if std::str::from_utf8(body).is_err() => {
            let text = String::from_utf8_lossy(body);
            run(serde_json::Deserializer::from_str(&text), seed)
        }
        r => r,
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(EnvelopeVisitor)
    }
}

struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON reply")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
        let mut out = Envelope::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Success => out.ok = map.next_value::<Text>()?.0.as_deref() == Some("yes"),
                Key::Error => out.error = map.next_value::<Text>()?.0,
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }

    // Any other JSON is a reply without `success`: a failure without a message.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Envelope, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Envelope::default())
    }
    fn visit_bool<E>(self, _: bool) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
    fn visit_i64<E>(self, _: i64) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
    fn visit_u64<E>(self, _: u64) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
    fn visit_str<E>(self, _: &str) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
    fn visit_unit<E>(self) -> Result<Envelope, E> {
        Ok(Envelope::default())
    }
}

/// The envelope's keys; the rest are skipped.
enum Key {
    Success,
    Error,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, k: &str) -> Result<Key, E> {
                Ok(match k {
                    "success" => Key::Success,
                    "error" => Key::Error,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// A list field: a JSON array, or an object keyed `"0"`, `"1"`, … as some Luna Node list
/// actions answer (seen on `sshkey/list` and `dns/dyn-list`; `shared/lunanode-api.md`). The
/// object's values are taken in the numeric order of their keys; a key that is not a number
/// sorts after the numbered ones, in the order it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct List<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<fn() -> T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = List<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list, or an object keyed \"0\", \"1\", …")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List<T>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(item) = seq.next_element()? {
                    out.push(item);
                }
                Ok(List(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<List<T>, A::Error> {
                let mut keyed: Vec<(u64, usize, T)> = Vec::new();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let rank = key.trim().parse::<u64>().unwrap_or(u64::MAX);
                    let order = keyed.len();
                    keyed.push((rank, order, map.next_value()?));
                }
                keyed.sort_by_key(|(rank, order, _)| (*rank, *order));
                Ok(List(keyed.into_iter().map(|(_, _, t)| t).collect()))
            }
            // An empty list has been seen written as `""`, `null` or `false` by PHP APIs.
            fn visit_unit<E>(self) -> Result<List<T>, E> {
                Ok(List(Vec::new()))
            }
            fn visit_none<E>(self) -> Result<List<T>, E> {
                Ok(List(Vec::new()))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<List<T>, E> {
                if s.is_empty() {
                    Ok(List(Vec::new()))
                } else {
                    Err(E::invalid_type(de::Unexpected::Str(s), &self))
                }
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<List<T>, E> {
                if b {
                    Err(E::invalid_type(de::Unexpected::Bool(b), &self))
                } else {
                    Ok(List(Vec::new()))
                }
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A value that counts only when it is a string; anything else reads as absent.
struct Text(Option<String>);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, s: &str) -> Result<Text, E> {
                Ok(Text(Some(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Text, E> {
                Ok(Text(Some(s)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_unit<E>(self) -> Result<Text, E> {
                Ok(Text(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Text(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads one top-level field as `T`, skipping the others; `None` when it is missing.
struct Field<'n, T> {
    name: &'n str,
    _t: PhantomData<fn() -> T>,
}

impl<'n, T> Field<'n, T> {
    fn new(name: &'n str) -> Self {
        Field {
            name,
            _t: PhantomData,
        }
    }
}

impl<T> Clone for Field<'_, T> {
    fn clone(&self) -> Self {
        Field::new(self.name)
    }
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Field<'_, T> {
    type Value = Option<T>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Field<'_, T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a JSON object with `{}`", self.name)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
        let mut out = None;
        while let Some(is_it) = map.next_key_seed(IsKey(self.name))? {
            if is_it {
                // A repeated key: the last one wins, as with any JSON object.
                out = Some(map.next_value::<T>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

/// Compares a key with the wanted name without copying it.
#[derive(Clone, Copy)]
struct IsKey<'n>(&'n str);

impl<'de> DeserializeSeed<'de> for IsKey<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for IsKey<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, k: &str) -> Result<bool, E> {
        Ok(k == self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lunanode::{Snapshot, Volume};

    const OK: StatusCode = StatusCode::OK;

    fn checked(status: StatusCode, body: &str) -> Result<(), ApiError> {
        check("volume/info", status, body.as_bytes())
    }

    #[test]
    fn success_is_the_string_yes_only() {
        assert_eq!(checked(OK, r#"{"success":"yes","volume":{}}"#), Ok(()));
        assert_eq!(checked(OK, r#"{"volume":{},"success":"yes"}"#), Ok(()));
        for body in [
            r#"{"success":"no"}"#,
            r#"{"success":true}"#,
            r#"{"success":"YES"}"#,
            r#"{"success":1}"#,
            r#"{"success":null}"#,
            r#"{"success":["yes"]}"#,
            r#"{"volume":{"id":"1"}}"#,
            r#"[{"success":"yes"}]"#,
            r#""yes""#,
            "null",
            "7",
        ] {
            let e = checked(OK, body).unwrap_err();
            assert_eq!(
                e.message(),
                "HTTP 200 OK: call failed without a message",
                "{body}"
            );
        }
    }

    #[test]
    fn failures_carry_the_unescaped_cloud_message_whatever_the_status() {
        let e = checked(OK, r#"{"success":"no","error":"invalid vm"}"#).unwrap_err();
        assert!(matches!(e, ApiError::NotFound { .. }), "{e:?}");
        assert_eq!(e.to_string(), "volume/info: invalid vm");
        let e = checked(
            StatusCode::BAD_REQUEST,
            r#"{"success":"no","error":"invalid &quot;size&quot;"}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ApiError::InvalidArgument { .. }), "{e:?}");
        assert_eq!(e.message(), "invalid \"size\"");
        let e = checked(OK, r#"{"error":"temporarily unavailable, try again"}"#).unwrap_err();
        assert!(e.is_retryable(), "{e:?}");
        // An error that is not a string is no message; unknown fields are skipped.
        let e = checked(
            OK,
            r#"{"success":"no","error":{"code":3},"extra":[1,{"a":null}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.message(), "HTTP 200 OK: call failed without a message");
        // A repeated key: the last one counts.
        let e = checked(OK, r#"{"success":"yes","success":"no","error":"x"}"#).unwrap_err();
        assert_eq!(e.message(), "x");
    }

    #[test]
    fn statuses_and_unparseable_bodies() {
        let e = checked(
            StatusCode::TOO_MANY_REQUESTS,
            r#"{"success":"no","error":"rate limit exceeded"}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ApiError::Throttled { .. }), "{e:?}");
        assert_eq!(e.message(), "HTTP 429 rate limit exceeded");
        let e = checked(StatusCode::TOO_MANY_REQUESTS, "slow down").unwrap_err();
        assert!(matches!(e, ApiError::Throttled { .. }), "{e:?}");
        // 5xx is transient even with a `success: yes` body.
        let e = checked(StatusCode::BAD_GATEWAY, r#"{"success":"yes"}"#).unwrap_err();
        assert!(matches!(e, ApiError::Transient { .. }), "{e:?}");
        assert_eq!(e.message(), "HTTP 502 Bad Gateway");
        let e = checked(StatusCode::NOT_FOUND, "<html>no</html>").unwrap_err();
        assert!(matches!(e, ApiError::Other { .. }), "{e:?}");
        assert_eq!(e.message(), "HTTP 404 Not Found");
        for body in [
            "<html>",
            "",
            r#"{"success":"yes""#,
            r#"{"success":"yes"} x"#,
        ] {
            let e = checked(OK, body).unwrap_err();
            assert!(matches!(e, ApiError::Other { .. }), "{body}: {e:?}");
            assert!(e.message().starts_with("unparseable response"), "{e:?}");
        }
        // Bytes that are not UTF-8 are replaced, not refused.
        let e = check(
            "vm/info",
            OK,
            b"{\"success\":\"no\",\"error\":\"invalid vm \xe9\"}",
        )
        .unwrap_err();
        assert_eq!(e.message(), "invalid vm \u{fffd}");
    }

    #[test]
    fn payloads_are_read_typed_with_numbers_as_strings() {
        let body = br#"{"success":"yes","volumes":[
            {"id":"4682","identification":"8b48723c-f53a-4717-9f04-fa194869db18","name":"a","region":"toronto","size":"100","status":"available","attached":"","time_created":"t","user_id":"36"},
            {"id":7,"size":10.0,"status":"in-use","attached":"vm-1","nested":{"x":[1,2]}}
        ],"other":{"volumes":"not these"}}"#;
        let vols: Vec<Volume> = field("volume/list", body, "volumes").unwrap();
        assert_eq!(vols.len(), 2);
        assert_eq!((vols[0].id, vols[0].size), (4682, 100));
        assert_eq!(vols[0].serial(), "8b48723c-f53a-4717-9");
        assert_eq!((vols[1].id, vols[1].size), (7, 10));
        assert_eq!(vols[1].attached_vm(), Some("vm-1"));

        let snaps: Vec<Snapshot> = field(
            "volume/snapshot-list",
            br#"{"snapshots":[{"id":"u","size":"2","volume":{"id":"3"}}],"success":"yes"}"#,
            "snapshots",
        )
        .unwrap();
        assert_eq!(snaps[0].volume.as_ref().map(|v| v.id), Some(3));

        #[derive(Deserialize)]
        struct Id {
            volume_id: String,
        }
        let id: Id = root("volume/create", br#"{"success":"yes","volume_id":"12"}"#).unwrap();
        assert_eq!(id.volume_id, "12");
    }

    #[test]
    fn lists_are_arrays_or_objects_keyed_by_position() {
        let body =
            br#"{"success":"yes","volumes":{"1":{"id":"8"},"0":{"id":"7"},"10":{"id":"9"}}}"#;
        let List(vols): List<Volume> = field("volume/list", body, "volumes").unwrap();
        assert_eq!(vols.iter().map(|v| v.id).collect::<Vec<_>>(), [7, 8, 9]);
        let List(vols): List<Volume> = field(
            "volume/list",
            br#"{"success":"yes","volumes":[{"id":"7"}]}"#,
            "volumes",
        )
        .unwrap();
        assert_eq!(vols[0].id, 7);
        for empty in [r#"{}"#, "[]", "null", r#""""#, "false"] {
            let body = format!(r#"{{"success":"yes","volumes":{empty}}}"#);
            let List(vols): List<Volume> =
                field("volume/list", body.as_bytes(), "volumes").unwrap();
            assert!(vols.is_empty(), "{empty}");
        }
        for bad in [r#""x""#, "true", "3", r#"{"0":{"name":"no id"}}"#] {
            let body = format!(r#"{{"success":"yes","volumes":{bad}}}"#);
            assert!(
                field::<List<Volume>>("volume/list", body.as_bytes(), "volumes").is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn missing_or_malformed_payloads_are_errors_not_panics() {
        let e = field::<Volume>("volume/info", br#"{"success":"yes"}"#, "volume").unwrap_err();
        assert!(matches!(e, ApiError::Other { .. }));
        assert_eq!(e.message(), "response has no `volume`");
        for body in [
            r#"{"success":"yes","volume":null}"#,
            r#"{"success":"yes","volume":[]}"#,
            r#"{"success":"yes","volume":{"id":"x"}}"#,
            r#"{"success":"yes","volume":{"name":"no id"}}"#,
            r#"{"success":"yes","volume":{"id":-1}}"#,
        ] {
            let e = field::<Volume>("volume/info", body.as_bytes(), "volume").unwrap_err();
            assert!(
                e.message().starts_with("unexpected `volume` in response"),
                "{body}: {e:?}"
            );
        }
        let e = root::<Vec<u8>>("volume/create", br#"{"success":"yes"}"#).unwrap_err();
        assert!(e.message().starts_with("unexpected response"), "{e:?}");
    }
}
