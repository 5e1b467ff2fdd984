//! Request validation shared by the services: names, capabilities, capacities, paging.

use std::time::Duration;

use super::error::Error;
use crate::csi::VolumeCapability;
use crate::csi::volume_capability::access_mode::Mode;
use crate::csi::volume_capability::{AccessType, MountVolume};

/// One GB as the cloud counts it (2^30 bytes, like OpenStack).
pub const GIB: i64 = 1 << 30;

/// Filesystems the node can create and grow.
pub const SUPPORTED_FS: &[&str] = &["ext4", "xfs"];

/// The CSI name limit for strings.
const MAX_NAME_BYTES: usize = 128;

/// Check a CreateVolume/CreateSnapshot name: non-empty, within the size limit, and free of
/// the control characters the spec bans.
pub fn name(field: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::invalid(format!("{field} is required")));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(format!(
            "{field} is {} bytes long; at most {MAX_NAME_BYTES} are allowed",
            value.len()
        )));
    }
    if value
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(Error::invalid(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

/// A required string field.
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Error> {
    if value.is_empty() {
        Err(Error::invalid(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

/// How a volume will be used, from its capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Block,
    Mount { fs_type: Option<String> },
}

/// Why a capability is not supported (used by ValidateVolumeCapabilities to explain, and by
/// the other RPCs as an INVALID_ARGUMENT).
pub fn capability(cap: &VolumeCapability) -> Result<Access, String> {
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or("volume capability has no access_mode")?;
    match Mode::try_from(mode.mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => {}
        Ok(Mode::Unknown) => return Err("volume capability access mode is UNKNOWN".into()),
        Ok(m) => {
            return Err(format!(
                "access mode {} is not supported: a Luna Node volume attaches to one VM at a time (use ReadWriteOnce or ReadWriteOncePod)",
                m.as_str_name()
            ));
        }
        Err(_) => return Err(format!("access mode {} is not a known mode", mode.mode)),
    }
    match &cap.access_type {
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(MountVolume { fs_type, .. })) => {
            let fs = fs_type.trim();
            if fs.is_empty() {
                Ok(Access::Mount { fs_type: None })
            } else if SUPPORTED_FS.contains(&fs) {
                Ok(Access::Mount {
                    fs_type: Some(fs.to_string()),
                })
            } else {
                Err(format!(
                    "filesystem type {fs:?} is not supported; use ext4 or xfs"
                ))
            }
        }
        None => Err("volume capability has neither block nor mount access type".into()),
    }
}

/// Validate a non-empty list of capabilities; any unsupported one is INVALID_ARGUMENT.
pub fn capabilities(caps: &[VolumeCapability]) -> Result<Vec<Access>, Error> {
    if caps.is_empty() {
        return Err(Error::invalid("volume_capabilities is required"));
    }
    caps.iter()
        .map(|c| capability(c).map_err(Error::InvalidArgument))
        .collect()
}

/// Resolve a CSI capacity range to whole GB within `[min_gb, max_gb]`.
///
/// `required` rounds up; with only a limit, `default_gb` is used when it fits, else the
/// largest whole GB under the limit.
pub fn size_gb(
    range: Option<&crate::csi::CapacityRange>,
    default_gb: u64,
    min_gb: u64,
    max_gb: u64,
) -> Result<u64, Error> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Error::invalid("capacity_range bytes must not be negative"));
    }
    if limit > 0 && required > limit {
        return Err(Error::OutOfRange(format!(
            "required_bytes {required} is larger than limit_bytes {limit}"
        )));
    }
    let gb = if required > 0 {
        u64::try_from(required)
            .expect("positive")
            .div_ceil(GIB as u64)
    } else if limit > 0 {
        default_gb.min(u64::try_from(limit / GIB).expect("positive"))
    } else {
        default_gb
    };
    if gb == 0 {
        return Err(Error::OutOfRange(format!(
            "limit_bytes {limit} is below the smallest volume the cloud makes (1 GB = {GIB} bytes)"
        )));
    }
    if limit > 0 && bytes(gb) > limit {
        return Err(Error::OutOfRange(format!(
            "volumes come in whole GB (2^30 bytes): {gb} GB is more than limit_bytes {limit}"
        )));
    }
    if gb < min_gb || gb > max_gb {
        return Err(Error::OutOfRange(format!(
            "capacity_range (required_bytes {required}, limit_bytes {limit}) asks for {gb} GB, outside the allowed range {min_gb}..={max_gb} GB"
        )));
    }
    Ok(gb)
}

/// GB to bytes.
pub fn bytes(gb: u64) -> i64 {
    i64::try_from(gb)
        .unwrap_or(i64::MAX / GIB)
        .saturating_mul(GIB)
}

/// Keyset paging: a page holds the items whose key is greater than the token's, in key
/// order, so deleting or adding items between pages neither skips nor repeats any. The
/// token is the last key returned (empty when nothing is left). `parse` turns a token back
/// into a key; a token that does not parse was not handed out by the driver and is
/// ABORTED, as the spec requires.
pub fn page<T, K: Ord + ToString>(
    mut items: Vec<T>,
    key: impl Fn(&T) -> K,
    parse: impl Fn(&str) -> Option<K>,
    max_entries: i32,
    starting_token: &str,
) -> Result<(Vec<T>, String), Error> {
    if max_entries < 0 {
        return Err(Error::invalid("max_entries must not be negative"));
    }
    let after = if starting_token.is_empty() {
        None
    } else {
        Some(parse(starting_token).ok_or_else(|| {
            Error::Aborted(format!(
                "starting_token {starting_token:?} was not issued by this driver; list again from the start"
            ))
        })?)
    };
    items.sort_by_key(|t| key(t));
    if let Some(after) = &after {
        items.retain(|t| key(t) > *after);
    }
    let limit = if max_entries == 0 {
        usize::MAX
    } else {
        max_entries as usize
    };
    let more = items.len() > limit;
    items.truncate(limit);
    let token = match (more, items.last()) {
        (true, Some(last)) => key(last).to_string(),
        _ => String::new(),
    };
    Ok((items, token))
}

/// The deadline a gRPC client set (`grpc-timeout` header), if any.
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    // The gRPC wire format allows at most 8 digits; anything else is not a deadline.
    if num.is_empty() || num.len() > 8 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Parse the cloud's timestamps (`2018-12-17T01:00:15Z`, optionally with fractional seconds,
/// a numeric offset, or a space instead of `T`) into a protobuf timestamp.
pub fn timestamp(s: &str) -> Option<prost_types::Timestamp> {
    let s = s.trim();
    if s.len() < 19 {
        return None;
    }
    let b = s.as_bytes();
    let int = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    if b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d, h, mi, se) = (
        int(0..4)?,
        int(5..7)?,
        int(8..10)?,
        int(11..13)?,
        int(14..16)?,
        int(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0i32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let f = &frac[..digits.min(9)];
        nanos = format!("{f:0<9}").parse().ok()?;
        rest = &frac[digits..];
    }
    let offset = match rest {
        "" | "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (o[1..3].parse::<i64>().ok()? * 3600 + o[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(prost_types::Timestamp {
        seconds: days * 86_400 + h * 3600 + mi * 60 + se - offset,
        nanos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::CapacityRange;
    use crate::csi::volume_capability::{AccessMode, BlockVolume};

    fn cap(mode: Mode, access: AccessType) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(access),
        }
    }

    fn mount(fs: &str) -> AccessType {
        AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })
    }

    #[test]
    fn capabilities_single_node_only() {
        assert_eq!(
            capability(&cap(Mode::SingleNodeWriter, mount(""))),
            Ok(Access::Mount { fs_type: None })
        );
        assert_eq!(
            capability(&cap(
                Mode::SingleNodeMultiWriter,
                AccessType::Block(BlockVolume {})
            )),
            Ok(Access::Block)
        );
        assert!(capability(&cap(Mode::MultiNodeMultiWriter, mount("ext4"))).is_err());
        assert!(capability(&cap(Mode::SingleNodeWriter, mount("btrfs"))).is_err());
        assert!(capability(&VolumeCapability::default()).is_err());
        assert!(capabilities(&[]).is_err());
    }

    #[test]
    fn sizes_round_up_to_whole_gb() {
        let r = |req, lim| {
            Some(CapacityRange {
                required_bytes: req,
                limit_bytes: lim,
            })
        };
        assert_eq!(size_gb(None, 10, 1, 100).unwrap(), 10);
        assert_eq!(size_gb(r(1, 0).as_ref(), 10, 1, 100).unwrap(), 1);
        assert_eq!(size_gb(r(GIB + 1, 0).as_ref(), 10, 1, 100).unwrap(), 2);
        assert_eq!(size_gb(r(0, 5 * GIB).as_ref(), 10, 1, 100).unwrap(), 5);
        assert_eq!(size_gb(r(0, 20 * GIB).as_ref(), 10, 1, 100).unwrap(), 10);
        assert_eq!(
            size_gb(r(0, 1000).as_ref(), 10, 1, 100).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_gb(r(GIB + 1, GIB + 2).as_ref(), 10, 1, 100)
                .unwrap_err()
                .code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_gb(r(2 * GIB, GIB).as_ref(), 10, 1, 100)
                .unwrap_err()
                .code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_gb(r(101 * GIB, 0).as_ref(), 10, 1, 100)
                .unwrap_err()
                .code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            size_gb(r(-1, 0).as_ref(), 10, 1, 100).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn paging_is_stable_and_rejects_foreign_tokens() {
        let pg =
            |items: Vec<u64>, max, tok: &str| page(items, |v| *v, |t| t.parse().ok(), max, tok);
        let items: Vec<u64> = vec![4, 1, 3, 2, 5];
        let (p, t) = pg(items.clone(), 2, "").unwrap();
        assert_eq!((p, t.as_str()), (vec![1, 2], "2"));
        // Deleting the last item of a page and adding one later skips and repeats nothing.
        let (p, t) = pg(vec![1, 3, 4, 5, 6], 2, "2").unwrap();
        assert_eq!((p, t.as_str()), (vec![3, 4], "4"));
        let (p, t) = pg(items.clone(), 2, "4").unwrap();
        assert_eq!((p, t.as_str()), (vec![5], ""));
        let (p, _) = pg(items.clone(), 0, "").unwrap();
        assert_eq!(p.len(), 5);
        assert_eq!(
            pg(items.clone(), 1, "abc").unwrap_err().code(),
            tonic::Code::Aborted
        );
        assert_eq!(
            pg(items, -1, "").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn grpc_timeouts_parse_within_the_wire_format() {
        let t = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(t("10S"), Some(Duration::from_secs(10)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        assert_eq!(t("999999999H"), None, "more than 8 digits");
        assert_eq!(t("S"), None);
        assert_eq!(t("-1S"), None);
        assert_eq!(t("10x"), None);
    }

    #[test]
    fn parses_cloud_timestamps() {
        assert_eq!(timestamp("1970-01-01T00:00:00Z").unwrap().seconds, 0);
        assert_eq!(
            timestamp("2018-12-17T01:00:15Z").unwrap().seconds,
            1_545_008_415
        );
        assert_eq!(
            timestamp("2018-12-17 01:00:15").unwrap().seconds,
            1_545_008_415
        );
        let t = timestamp("2018-12-17T02:00:15.5+01:00").unwrap();
        assert_eq!((t.seconds, t.nanos), (1_545_008_415, 500_000_000));
        assert!(timestamp("yesterday").is_none());
        assert!(timestamp("2018-13-17T01:00:15Z").is_none());
    }

    #[test]
    fn names_are_checked() {
        assert!(name("name", "pvc-1").is_ok());
        assert!(name("name", "").is_err());
        assert!(name("name", &"x".repeat(129)).is_err());
        assert!(name("name", "a\u{1}b").is_err());
    }
}
