//! Volume and snapshot IDs as the CO sees them: `<region>/<luna volume id>` and
//! `<region>/<snapshot uuid>`. Parsing is strict; an ID that does not parse names nothing.

use std::fmt;
use std::str::FromStr;

/// Why an ID did not parse (the caller decides whether that is NOT_FOUND or OK).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a lunanode-csi {1} ID (expected {2})")]
pub struct BadId(pub String, pub &'static str, pub &'static str);

fn split_region<'a>(
    s: &'a str,
    kind: &'static str,
    shape: &'static str,
) -> Result<(&'a str, &'a str), BadId> {
    let bad = || BadId(s.to_string(), kind, shape);
    let (region, rest) = s.split_once('/').ok_or_else(bad)?;
    let region_ok = !region.is_empty()
        && region.len() <= 32
        && region
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !region_ok || rest.is_empty() {
        return Err(bad());
    }
    Ok((region, rest))
}

/// A Luna Node volume, named by region and numeric ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeRef {
    pub region: String,
    pub id: u64,
}

impl FromStr for VolumeRef {
    type Err = BadId;
    fn from_str(s: &str) -> Result<Self, BadId> {
        const SHAPE: &str = "<region>/<volume number>, e.g. toronto/4682";
        let (region, id) = split_region(s, "volume", SHAPE)?;
        let bad = || BadId(s.to_string(), "volume", SHAPE);
        // Digits only, no sign or leading zero, so each volume has exactly one ID string.
        if !id.bytes().all(|b| b.is_ascii_digit()) || (id.len() > 1 && id.starts_with('0')) {
            return Err(bad());
        }
        let id = id.parse::<u64>().map_err(|_| bad())?;
        Ok(VolumeRef {
            region: region.to_string(),
            id,
        })
    }
}

impl fmt::Display for VolumeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.region, self.id)
    }
}

/// A Luna Node volume snapshot, named by region and UUID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotRef {
    pub region: String,
    pub uuid: String,
}

impl FromStr for SnapshotRef {
    type Err = BadId;
    fn from_str(s: &str) -> Result<Self, BadId> {
        const SHAPE: &str = "<region>/<snapshot uuid>";
        let (region, uuid) = split_region(s, "snapshot", SHAPE)?;
        let parsed =
            uuid::Uuid::try_parse(uuid).map_err(|_| BadId(s.to_string(), "snapshot", SHAPE))?;
        // Only the canonical lowercase hyphenated form, so one snapshot has one ID string.
        if parsed.hyphenated().to_string() != uuid {
            return Err(BadId(s.to_string(), "snapshot", SHAPE));
        }
        Ok(SnapshotRef {
            region: region.to_string(),
            uuid: uuid.to_string(),
        })
    }
}

impl fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.region, self.uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_round_trip_and_parse_strictly() {
        let v: VolumeRef = "toronto/4682".parse().unwrap();
        assert_eq!((v.region.as_str(), v.id), ("toronto", 4682));
        assert_eq!(v.to_string(), "toronto/4682");
        for bad in [
            "",
            "toronto",
            "toronto/",
            "/4682",
            "toronto/+1",
            "toronto/-1",
            "toronto/01",
            "toronto/1/2",
            "Toronto/1",
            "toronto/1a",
            "toronto/99999999999999999999999",
            "to ronto/1",
            "toronto/ 1",
        ] {
            assert!(bad.parse::<VolumeRef>().is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn snapshot_ids_round_trip_and_parse_strictly() {
        let s: SnapshotRef = "montreal/484a06d3-7ea6-40d6-8e72-9e7e23f6826b"
            .parse()
            .unwrap();
        assert_eq!(s.region, "montreal");
        assert_eq!(
            s.to_string(),
            "montreal/484a06d3-7ea6-40d6-8e72-9e7e23f6826b"
        );
        for bad in [
            "montreal/484A06D3-7EA6-40D6-8E72-9E7E23F6826B",
            "montreal/484a06d37ea640d68e729e7e23f6826b",
            "montreal/not-a-uuid",
            "484a06d3-7ea6-40d6-8e72-9e7e23f6826b",
            "montreal/",
        ] {
            assert!(
                bad.parse::<SnapshotRef>().is_err(),
                "{bad:?} must not parse"
            );
        }
    }
}
