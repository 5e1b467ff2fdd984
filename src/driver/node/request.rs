//! Request validation: paths, the volume capability and the publish_context.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use super::{CTX_IDENTIFICATION, CTX_SERIAL, CTX_SIZE_BYTES};
use crate::csi::VolumeCapability;
use crate::csi::volume_capability::{AccessType, access_mode::Mode};
use crate::driver::error::{Error, Result};
use crate::driver::validate::required;
use crate::volumes::mount::MountOptions;
use crate::volumes::{DiskId, device, fs};

/// A required path: absolute, no `..` components, no NUL.
pub fn check_path(field: &str, value: &str) -> Result<PathBuf> {
    required(field, value)?;
    let p = Path::new(value);
    if !p.is_absolute() {
        return Err(Error::invalid(format!(
            "{field} {value:?} must be an absolute path"
        )));
    }
    if p.components().any(|c| c == Component::ParentDir) || value.contains('\0') {
        return Err(Error::invalid(format!(
            "{field} {value:?} must not contain \"..\""
        )));
    }
    Ok(p.to_path_buf())
}

/// The path of a volume that should already be published (NodeGetVolumeStats,
/// NodeExpandVolume). A path that cannot be one the driver published names no volume:
/// NOT_FOUND, as the spec's "volume does not exist on the specified path". A relative path
/// is never resolved against the driver's working directory.
pub(super) fn published_path(field: &str, value: &str) -> Result<PathBuf> {
    required(field, value)?;
    let p = Path::new(value);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) || value.contains('\0')
    {
        return Err(Error::NotFound(format!(
            "no volume is published at {value:?}: {field} must be the absolute path the volume was published or staged at"
        )));
    }
    Ok(p.to_path_buf())
}

/// How the volume is accessed, from a validated capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Access {
    Block,
    Mount {
        fs_type: String,
        options: MountOptions,
    },
}

#[derive(Debug, Clone)]
pub(super) struct Capability {
    pub(super) access: Access,
    pub(super) read_only_mode: bool,
}

pub(super) fn check_capability(cap: Option<&VolumeCapability>) -> Result<Capability> {
    let cap = cap.ok_or_else(|| Error::invalid("volume_capability is required"))?;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::invalid("volume_capability.access_mode is required"))?
        .mode;
    let mode = Mode::try_from(mode).unwrap_or(Mode::Unknown);
    let read_only_mode = match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {
            false
        }
        Mode::SingleNodeReaderOnly => true,
        other => {
            return Err(Error::invalid(format!(
                "access mode {other:?} is not supported: a Luna Node volume attaches to one node at a time"
            )));
        }
    };
    let access = match cap.access_type.as_ref() {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            let fs_type = if m.fs_type.is_empty() {
                fs::DEFAULT_FS_TYPE.to_string()
            } else {
                m.fs_type.to_ascii_lowercase()
            };
            if !fs::is_supported(&fs_type) {
                return Err(Error::invalid(format!(
                    "fsType {:?} is not supported; use ext4 or xfs",
                    m.fs_type
                )));
            }
            let options = MountOptions::parse(&m.mount_flags).map_err(Error::invalid)?;
            Access::Mount { fs_type, options }
        }
        None => {
            return Err(Error::invalid(
                "volume_capability must specify block or mount access",
            ));
        }
    };
    Ok(Capability {
        access,
        read_only_mode,
    })
}

/// Which disk the controller attached: serial, identification (when given) and size from
/// the publish_context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DiskRef {
    /// What to look for: the serial (first 20 characters of the identification) and the
    /// whole identification when the controller passed it.
    pub(super) id: DiskId,
    pub(super) size: u64,
}

/// A publish_context value, trimmed; absent when missing or empty.
fn ctx_value<'a>(ctx: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    ctx.get(key).map(|s| s.trim()).filter(|s| !s.is_empty())
}

pub(super) fn disk_ref(ctx: &HashMap<String, String>) -> Result<DiskRef> {
    let identification = ctx_value(ctx, CTX_IDENTIFICATION);
    if let Some(i) = identification
        && !device::valid_serial(i)
    {
        return Err(Error::invalid(format!(
            "publish_context {CTX_IDENTIFICATION:?} {i:?} is not a valid volume identification"
        )));
    }
    // The serial is the identification's first 20 characters; a controller that passes only
    // the identification is understood too.
    let serial = ctx_value(ctx, CTX_SERIAL)
        .or(identification)
        .map(device::serial_for)
        .ok_or_else(|| {
            Error::invalid(format!(
                "publish_context has no {CTX_SERIAL:?}; it is set by ControllerPublishVolume"
            ))
        })?;
    if !device::valid_serial(&serial) {
        return Err(Error::invalid(format!(
            "publish_context {CTX_SERIAL:?} {serial:?} is not a valid disk serial"
        )));
    }
    if let Some(i) = identification
        && device::serial_for(i) != serial
    {
        return Err(Error::invalid(format!(
            "publish_context {CTX_SERIAL:?} {serial:?} is not the first {} characters of {CTX_IDENTIFICATION:?} {i:?}",
            device::SERIAL_LEN
        )));
    }
    let id = DiskId {
        serial,
        identification: identification.map(str::to_string),
    };
    let size = ctx
        .get(CTX_SIZE_BYTES)
        .ok_or_else(|| {
            Error::invalid(format!(
                "publish_context has no {CTX_SIZE_BYTES:?}; it is set by ControllerPublishVolume"
            ))
        })?
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            Error::invalid(format!(
                "publish_context {CTX_SIZE_BYTES:?} must be a positive decimal number"
            ))
        })?;
    Ok(DiskRef { id, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};
    use nix::mount::MsFlags;

    fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: vec!["noatime".into()],
                ..Default::default()
            })),
        }
    }

    #[test]
    fn paths_must_be_absolute_without_dotdot() {
        assert!(check_path("p", "/var/lib/kubelet/x").is_ok());
        for bad in ["", "relative/x", "/a/../etc", "/a/..", "../x"] {
            let e = check_path("p", bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn paths_that_cannot_be_published_name_no_volume() {
        assert_eq!(
            published_path("p", "").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        for bad in ["some/path", "/a/../etc", "../x"] {
            let e = published_path("p", bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::NotFound, "{bad:?}");
        }
        assert!(published_path("p", "/var/lib/kubelet/pods/x/volumes").is_ok());
    }

    #[test]
    fn capabilities_are_validated() {
        let c = check_capability(Some(&mount_cap("", Mode::SingleNodeWriter))).unwrap();
        match c.access {
            Access::Mount { fs_type, options } => {
                assert_eq!(fs_type, "ext4");
                assert!(options.flags.contains(MsFlags::MS_NOATIME));
            }
            Access::Block => panic!(),
        }
        assert!(check_capability(Some(&mount_cap("XFS", Mode::SingleNodeMultiWriter))).is_ok());
        assert!(
            check_capability(Some(&mount_cap("xfs", Mode::SingleNodeReaderOnly)))
                .unwrap()
                .read_only_mode
        );
        for (fs, mode) in [
            ("btrfs", Mode::SingleNodeWriter),
            ("ext4", Mode::MultiNodeMultiWriter),
            ("ext4", Mode::MultiNodeReaderOnly),
            ("ext4", Mode::Unknown),
        ] {
            let e = check_capability(Some(&mount_cap(fs, mode))).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{fs} {mode:?}");
        }
        assert!(check_capability(None).is_err());
        let block = VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        };
        assert_eq!(
            check_capability(Some(&block)).unwrap().access,
            Access::Block
        );
        let no_type = VolumeCapability {
            access_type: None,
            ..block
        };
        assert!(check_capability(Some(&no_type)).is_err());
    }

    #[test]
    fn publish_context_is_parsed() {
        let ctx = |s: &str, n: &str| {
            HashMap::from([
                (CTX_SERIAL.to_string(), s.to_string()),
                (CTX_SIZE_BYTES.to_string(), n.to_string()),
            ])
        };
        let d = disk_ref(&ctx("6a3b1f0e-2c4d-4e5f-8a9b-0c1d2e3f4a5b", "1073741824")).unwrap();
        assert_eq!(d.id.serial, "6a3b1f0e-2c4d-4e5f-8");
        assert_eq!(d.id.identification, None);
        assert_eq!(d.size, 1 << 30);
        assert!(disk_ref(&ctx("../../etc", "1")).is_err());
        assert!(disk_ref(&ctx("abc", "0")).is_err());
        assert!(disk_ref(&ctx("abc", "1G")).is_err());
        assert!(disk_ref(&HashMap::new()).is_err());
    }

    #[test]
    fn the_identification_is_accepted_beside_the_serial() {
        let ident = "6a3b1f0e-2c4d-4e5f-8a9b-0c1d2e3f4a5b";
        let ctx = |pairs: &[(&str, &str)]| {
            let mut m = HashMap::from([(CTX_SIZE_BYTES.to_string(), "1024".to_string())]);
            m.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            m
        };
        let both = disk_ref(&ctx(&[
            (CTX_SERIAL, "6a3b1f0e-2c4d-4e5f-8"),
            (CTX_IDENTIFICATION, ident),
        ]))
        .unwrap();
        assert_eq!(both.id.serial, "6a3b1f0e-2c4d-4e5f-8");
        assert_eq!(both.id.identification.as_deref(), Some(ident));
        // Only the identification: the serial is derived from it.
        let only = disk_ref(&ctx(&[(CTX_IDENTIFICATION, ident)])).unwrap();
        assert_eq!(only, both);
        // An empty identification is no identification.
        let empty = disk_ref(&ctx(&[(CTX_SERIAL, "abc"), (CTX_IDENTIFICATION, " ")])).unwrap();
        assert_eq!(empty.id.identification, None);
        // They must agree, and neither may escape the by-id directory.
        for bad in [
            ctx(&[
                (CTX_SERIAL, "ffffffff-2c4d-4e5f-8"),
                (CTX_IDENTIFICATION, ident),
            ]),
            ctx(&[(CTX_SERIAL, "abc"), (CTX_IDENTIFICATION, "abc/../../x")]),
            ctx(&[(CTX_IDENTIFICATION, "../etc")]),
        ] {
            let e = disk_ref(&bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }
}
