//! The API's objects, parsed tolerantly: numbers may arrive as strings or as numbers,
//! unknown fields are ignored, and missing optional fields default.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer};

/// The regions the API reference names.
pub const REGIONS: &[&str] = &["toronto", "montreal", "roubaix"];

/// A count or ID: a JSON number, or a string holding one (`"100"`, `" 7 "`, `"1.5"`); an
/// empty string or `null` is 0. Read by a visitor rather than an untagged enum, which would
/// buffer every value before trying each shape.
fn num<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a non-negative number, or a string holding one")
        }
        fn visit_u64<E: de::Error>(self, u: u64) -> Result<u64, E> {
            Ok(u)
        }
        fn visit_i64<E: de::Error>(self, i: i64) -> Result<u64, E> {
            u64::try_from(i).map_err(|_| E::custom(format!("negative number {i}")))
        }
        fn visit_f64<E: de::Error>(self, f: f64) -> Result<u64, E> {
            if f >= 0.0 {
                Ok(f as u64)
            } else {
                Err(E::custom(format!("negative number {f}")))
            }
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
            let s = s.trim();
            if s.is_empty() {
                return Ok(0);
            }
            s.parse::<u64>()
                .or_else(|_| s.parse::<f64>().map(|f| f as u64))
                .map_err(E::custom)
        }
        fn visit_unit<E: de::Error>(self) -> Result<u64, E> {
            Ok(0)
        }
        fn visit_none<E: de::Error>(self) -> Result<u64, E> {
            Ok(0)
        }
    }
    d.deserialize_any(V)
}

/// A string field that may arrive as a number or a flag: numbers are written out, `true`
/// is `"1"`, `false` and `null` are empty.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string, number, flag or null")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<String, E> {
            Ok(s.to_string())
        }
        fn visit_string<E: de::Error>(self, s: String) -> Result<String, E> {
            Ok(s)
        }
        fn visit_u64<E: de::Error>(self, u: u64) -> Result<String, E> {
            Ok(u.to_string())
        }
        fn visit_i64<E: de::Error>(self, i: i64) -> Result<String, E> {
            Ok(i.to_string())
        }
        fn visit_f64<E: de::Error>(self, f: f64) -> Result<String, E> {
            Ok(f.to_string())
        }
        fn visit_bool<E: de::Error>(self, b: bool) -> Result<String, E> {
            Ok(if b { "1" } else { "" }.to_string())
        }
        fn visit_unit<E: de::Error>(self) -> Result<String, E> {
            Ok(String::new())
        }
        fn visit_none<E: de::Error>(self) -> Result<String, E> {
            Ok(String::new())
        }
    }
    d.deserialize_any(V)
}

/// A block-storage volume.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Volume {
    #[serde(deserialize_with = "num")]
    pub id: u64,
    /// The storage layer's UUID; its first 20 characters are the virtio serial.
    #[serde(default, deserialize_with = "text")]
    pub identification: String,
    /// The label (the CSI volume name when the driver made it).
    #[serde(default, deserialize_with = "text")]
    pub name: String,
    /// Present in `volume/list`; `volume/info` may leave it out.
    #[serde(default, deserialize_with = "text")]
    pub region: String,
    /// Size in GB (2^30 bytes).
    #[serde(default, deserialize_with = "num")]
    pub size: u64,
    #[serde(default, deserialize_with = "text")]
    pub status: String,
    /// The VM the volume is attached to, empty when detached.
    #[serde(default, deserialize_with = "text")]
    pub attached: String,
    /// `volume/info` says `created`, `volume/list` says `time_created`; either may be missing.
    #[serde(default, deserialize_with = "text")]
    pub created: String,
    #[serde(default, deserialize_with = "text")]
    pub time_created: String,
}

/// What a status string means for the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    Pending,
    Failed,
}

impl Volume {
    /// Available to attach (or attached, for `in-use`).
    pub fn readiness(&self) -> Readiness {
        match self.status.as_str() {
            "available" | "active" | "in-use" => Readiness::Ready,
            "error" | "error_deleting" | "error_extending" => Readiness::Failed,
            _ => Readiness::Pending,
        }
    }

    /// The VM it is attached to, if any.
    pub fn attached_vm(&self) -> Option<&str> {
        Some(self.attached.as_str()).filter(|s| !s.is_empty())
    }

    /// When the volume was created, as the cloud wrote it.
    pub fn created_at(&self) -> &str {
        if self.created.is_empty() {
            &self.time_created
        } else {
            &self.created
        }
    }

    /// The virtio serial the VM's kernel reports for this disk.
    pub fn serial(&self) -> &str {
        let end = self
            .identification
            .char_indices()
            .nth(20)
            .map_or(self.identification.len(), |(i, _)| i);
        &self.identification[..end]
    }
}

/// The volume a snapshot was taken of, as `snapshot-list` nests it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct SnapshotVolume {
    #[serde(deserialize_with = "num")]
    pub id: u64,
    #[serde(default, deserialize_with = "text")]
    pub name: String,
}

/// A volume snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Snapshot {
    #[serde(deserialize_with = "text")]
    pub id: String,
    #[serde(default, deserialize_with = "text")]
    pub name: String,
    #[serde(default, deserialize_with = "text")]
    pub region: String,
    #[serde(default, deserialize_with = "num")]
    pub size: u64,
    #[serde(default, deserialize_with = "text")]
    pub status: String,
    #[serde(default)]
    pub volume: Option<SnapshotVolume>,
    /// `volume/info` says `created`, `volume/list` says `time_created`; either may be missing.
    #[serde(default, deserialize_with = "text")]
    pub created: String,
    #[serde(default, deserialize_with = "text")]
    pub time_created: String,
}

impl Snapshot {
    /// When the snapshot was created, if the cloud says.
    pub fn created_at(&self) -> &str {
        if self.created.is_empty() {
            &self.time_created
        } else {
            &self.created
        }
    }

    /// Snapshot statuses are undocumented: `available`/`active` are ready, `error` failed,
    /// anything else pending.
    pub fn readiness(&self) -> Readiness {
        match self.status.as_str() {
            "available" | "active" => Readiness::Ready,
            "error" => Readiness::Failed,
            _ => Readiness::Pending,
        }
    }
}

/// A virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Vm {
    #[serde(deserialize_with = "text")]
    pub vm_id: String,
    #[serde(default, deserialize_with = "text")]
    pub name: String,
    #[serde(default, deserialize_with = "text")]
    pub hostname: String,
    #[serde(default, deserialize_with = "text")]
    pub region: String,
}

/// An image (what `snapshot-replicate` produces).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Image {
    #[serde(alias = "id", deserialize_with = "num")]
    pub image_id: u64,
    #[serde(default, deserialize_with = "text")]
    pub name: String,
    #[serde(default, deserialize_with = "text")]
    pub region: String,
    #[serde(default, deserialize_with = "text")]
    pub status: String,
}

impl Image {
    /// `active` is ready; `error`/`killed` failed; anything else pending.
    pub fn readiness(&self) -> Readiness {
        match self.status.as_str() {
            "active" => Readiness::Ready,
            "error" | "killed" => Readiness::Failed,
            _ => Readiness::Pending,
        }
    }
}

/// Undo the HTML escaping the API applies to error messages.
pub fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        let Some(end) = rest.find(';').filter(|&e| e <= 10) else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..end];
        let decoded = match entity {
            "quot" => Some('"'),
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reference_shapes() {
        let v: Volume = serde_json::from_str(
            r#"{ "attached": "", "created": "2018-12-17T01:00:15Z", "id": "4682", "identification": "8b48723c-f53a-4717-9f04-fa194869db18", "name": "myvolume", "size": "100", "status": "available" }"#,
        )
        .unwrap();
        assert_eq!(v.id, 4682);
        assert_eq!(v.size, 100);
        assert_eq!(v.serial(), "8b48723c-f53a-4717-9");
        assert_eq!(v.readiness(), Readiness::Ready);
        assert_eq!(v.attached_vm(), None);
        let v: Volume = serde_json::from_str(
            r#"{"id": 7, "size": 10, "status": "in-use", "attached": "abc", "time_created": "t", "extra": {"x": 1}}"#,
        )
        .unwrap();
        assert_eq!(
            (v.id, v.size, v.attached_vm(), v.created_at()),
            (7, 10, Some("abc"), "t")
        );
        let s: Snapshot = serde_json::from_str(
            r#"{ "id": "484a06d3-7ea6-40d6-8e72-9e7e23f6826b", "name": "s", "region": "toronto", "size": "150", "status": "available", "user_id": "36", "volume": { "id": "4682", "identification": "x", "name": "myvolume", "region": "toronto", "size": "150", "status": "active", "time_created": "2018-12-17T01:00:15Z", "user_id": "36" } }"#,
        )
        .unwrap();
        assert_eq!(s.volume.unwrap().id, 4682);
        let i: Image =
            serde_json::from_str(r#"{"image_id": "141129", "name": "n", "status": "saving"}"#)
                .unwrap();
        assert_eq!((i.image_id, i.readiness()), (141129, Readiness::Pending));
    }

    #[test]
    fn rejects_garbage_numbers_without_panicking() {
        assert!(serde_json::from_str::<Volume>(r#"{"id": "x"}"#).is_err());
        assert!(serde_json::from_str::<Volume>(r#"{"id": -3}"#).is_err());
        assert!(serde_json::from_str::<Volume>(r#"{"id": [1]}"#).is_err());
        assert!(serde_json::from_str::<Volume>(r#"{"id": true}"#).is_err());
        assert!(serde_json::from_str::<Volume>(r#"{"id": "-2.5e0x"}"#).is_err());
        assert!(serde_json::from_str::<Volume>(r#"{"id": 1, "name": [1]}"#).is_err());
        assert!(serde_json::from_str::<Volume>(r#"{"id": 1, "name": {}}"#).is_err());
    }

    #[test]
    fn numbers_and_strings_are_read_tolerantly() {
        let v: Volume = serde_json::from_str(
            r#"{"id": " 12 ", "size": "1.9", "name": 5, "status": -1, "attached": null, "region": true, "created": 2.5, "identification": false}"#,
        )
        .unwrap();
        assert_eq!((v.id, v.size), (12, 1));
        assert_eq!((v.name.as_str(), v.status.as_str()), ("5", "-1"));
        assert_eq!((v.attached.as_str(), v.region.as_str()), ("", "1"));
        assert_eq!((v.created.as_str(), v.identification.as_str()), ("2.5", ""));
        let v: Volume = serde_json::from_str(r#"{"id": 3.0, "size": "", "status": null}"#).unwrap();
        assert_eq!((v.id, v.size, v.status.as_str()), (3, 0, ""));
        let v: Volume = serde_json::from_str(r#"{"id": 4, "size": null}"#).unwrap();
        assert_eq!(v.size, 0);
        let e = serde_json::from_str::<Volume>(r#"{"id": -3.5}"#).unwrap_err();
        assert!(e.to_string().contains("negative number -3.5"), "{e}");
        let e = serde_json::from_str::<Volume>(r#"{"id": -3}"#).unwrap_err();
        assert!(e.to_string().contains("negative number -3"), "{e}");
    }

    #[test]
    fn unescapes_html() {
        assert_eq!(
            html_unescape("invalid &quot;size&quot; &amp; more &#39;x&#x27;"),
            "invalid \"size\" & more 'x'"
        );
        assert_eq!(html_unescape("a & b &bogus; &"), "a & b &bogus; &");
    }
}
