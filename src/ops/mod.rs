//! The operator commands: `volume`, `snapshot`, `vm` and `image`, one subcommand per action
//! of the Luna Node API, with the driver's own client, credentials and settings.
//!
//! They reach what CSI has no verb for (rename, replicating a snapshot to another region)
//! and show what the driver made: its volumes and snapshots are labelled with the
//! PersistentVolume and VolumeSnapshotContent names, and their CSI IDs (`region/id`) are
//! printed next to the cloud's, so `kubectl get pv` and these tables can be matched up.

pub mod table;

use std::str::FromStr;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::command::{ApiArgs, CommandError};
use crate::lunanode::{ApiError, Client, CreateSource, REGIONS, Snapshot, Volume};
use table::{or_dash, render, render_pairs};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

/// Settings every operator command takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
}

/// A volume as the operator names it: the cloud's number (`4682`) or the CSI volume ID
/// (`toronto/4682`, the PersistentVolume's `volumeHandle`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeArg {
    pub region: Option<String>,
    pub id: u64,
}

impl FromStr for VolumeArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(id) = s.parse::<u64>() {
            return Ok(VolumeArg { region: None, id });
        }
        s.parse::<crate::driver::ids::VolumeRef>()
            .map(|v| VolumeArg {
                region: Some(v.region),
                id: v.id,
            })
            .map_err(|_| format!("{s:?} is not a volume ID (expected 4682 or toronto/4682)"))
    }
}

/// A snapshot as the operator names it: its UUID (with `--region`) or the CSI snapshot ID
/// (`toronto/<uuid>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotArg {
    pub region: Option<String>,
    pub uuid: String,
}

impl FromStr for SnapshotArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(r) = s.parse::<crate::driver::ids::SnapshotRef>() {
            return Ok(SnapshotArg {
                region: Some(r.region),
                uuid: r.uuid,
            });
        }
        match uuid::Uuid::try_parse(s) {
            Ok(u) => Ok(SnapshotArg {
                region: None,
                uuid: u.hyphenated().to_string(),
            }),
            Err(_) => Err(format!(
                "{s:?} is not a snapshot ID (expected <uuid> or <region>/<uuid>)"
            )),
        }
    }
}

impl SnapshotArg {
    /// The snapshot's region: from its ID, else `--region`; both must agree.
    fn region(&self, flag: Option<&str>) -> Result<String, CommandError> {
        match (&self.region, flag) {
            (Some(a), Some(b)) if a != b => Err(CommandError::Config(format!(
                "snapshot {}/{} is in {a}, but --region says {b}",
                a, self.uuid
            ))),
            (Some(a), _) => Ok(a.clone()),
            (None, Some(b)) => Ok(b.to_string()),
            (None, None) => Err(CommandError::Config(format!(
                "which region is snapshot {} in? Give --region or the ID as <region>/<uuid>",
                self.uuid
            ))),
        }
    }
}

fn region_arg(s: &str) -> Result<String, String> {
    if REGIONS.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "unknown region {s:?} (known: {})",
            REGIONS.join(", ")
        ))
    }
}

/// `lunanode-csi volume ...`
#[derive(Debug, Clone, Subcommand)]
pub enum VolumeCommand {
    /// List volumes (volume/list).
    List {
        /// Only this region.
        #[arg(long, value_parser = region_arg)]
        region: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Show one volume (volume/info).
    Info {
        /// Volume: 4682 or toronto/4682.
        volume: VolumeArg,
        #[command(flatten)]
        common: Common,
    },
    /// Create a volume, empty or from a snapshot or image (volume/create).
    Create {
        /// Region to create it in.
        #[arg(long, value_parser = region_arg)]
        region: String,
        /// Size in GB (2^30 bytes).
        #[arg(long)]
        size: u64,
        /// Label (the driver uses the PersistentVolume name).
        #[arg(long)]
        label: String,
        /// Fill it from this volume snapshot (same region): <uuid> or <region>/<uuid>.
        #[arg(long, conflicts_with = "image")]
        snapshot: Option<SnapshotArg>,
        /// Fill it from this image ID (same region).
        #[arg(long)]
        image: Option<u64>,
        #[command(flatten)]
        common: Common,
    },
    /// Attach a volume to a VM (volume/attach).
    Attach {
        /// Volume: 4682 or toronto/4682.
        volume: VolumeArg,
        /// The VM's ID (see `lunanode-csi vm list`).
        #[arg(long)]
        vm: String,
        /// The bus to attach on (volume/attach's `target`): `/dev/vda` virtio, as the
        /// driver does; `/dev/sda` SCSI, `/dev/hda` IDE, `auto` (undocumented: may be IDE).
        #[arg(long, env = "LUNANODE_ATTACH_TARGET", default_value = crate::driver::ATTACH_TARGET)]
        target: String,
        #[command(flatten)]
        common: Common,
    },
    /// Detach a volume from its VM (volume/detach).
    Detach {
        /// Volume: 4682 or toronto/4682.
        volume: VolumeArg,
        #[command(flatten)]
        common: Common,
    },
    /// Grow a detached volume (volume/extend).
    Extend {
        /// Volume: 4682 or toronto/4682.
        volume: VolumeArg,
        /// New size in GB.
        #[arg(long)]
        size: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Change a volume's label (volume/rename).
    Rename {
        /// Volume: 4682 or toronto/4682.
        volume: VolumeArg,
        /// The new label.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Delete a detached volume (volume/delete).
    Delete {
        /// Volume: 4682 or toronto/4682.
        volume: VolumeArg,
        #[command(flatten)]
        common: Common,
    },
}

/// `lunanode-csi snapshot ...`
#[derive(Debug, Clone, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a volume (volume/snapshot-create).
    Create {
        /// Volume: 4682 or toronto/4682.
        volume: VolumeArg,
        /// Label (the driver uses the VolumeSnapshotContent name).
        #[arg(long)]
        label: String,
        #[command(flatten)]
        common: Common,
    },
    /// List snapshots (volume/snapshot-list; every region unless --region).
    List {
        /// Only this region.
        #[arg(long, value_parser = region_arg)]
        region: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Copy a snapshot into an image, in its region or another (volume/snapshot-replicate).
    Replicate {
        /// Snapshot: <region>/<uuid>, or <uuid> with --region.
        snapshot: SnapshotArg,
        /// The snapshot's region (when the ID has none).
        #[arg(long, value_parser = region_arg)]
        region: Option<String>,
        /// Region to make the image in.
        #[arg(long, value_parser = region_arg)]
        to: String,
        /// Name of the new image.
        #[arg(long)]
        image_name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Delete a snapshot (volume/snapshot-delete).
    Delete {
        /// Snapshot: <region>/<uuid>, or <uuid> with --region.
        snapshot: SnapshotArg,
        /// The snapshot's region (when the ID has none).
        #[arg(long, value_parser = region_arg)]
        region: Option<String>,
        #[command(flatten)]
        common: Common,
    },
}

/// `lunanode-csi vm ...`
#[derive(Debug, Clone, Subcommand)]
pub enum VmCommand {
    /// List VMs (vm/list).
    List {
        #[command(flatten)]
        common: Common,
    },
}

/// `lunanode-csi image ...`
#[derive(Debug, Clone, Subcommand)]
pub enum ImageCommand {
    /// List images (image/list).
    List {
        /// Only this region.
        #[arg(long, value_parser = region_arg)]
        region: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Delete an image (image/delete).
    Delete {
        /// The image ID.
        image: u64,
        #[command(flatten)]
        common: Common,
    },
}

fn api(e: ApiError) -> CommandError {
    CommandError::Runtime(e.to_string())
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// Print a result: JSON as given, or the table text.
fn emit(output: Output, json: Value, text: impl FnOnce() -> String) {
    match output {
        Output::Json => print_json(&json),
        Output::Table => print!("{}", text()),
    }
}

fn csi_volume_id(region: &str, id: u64) -> String {
    if region.is_empty() {
        String::new()
    } else {
        format!("{region}/{id}")
    }
}

fn volume_json(v: &Volume, region: &str) -> Value {
    let mut j = serde_json::to_value(v).unwrap_or(Value::Null);
    if let Some(o) = j.as_object_mut() {
        o.insert("region".into(), json!(region));
        o.insert("serial".into(), json!(v.serial()));
        o.insert("csi_id".into(), json!(csi_volume_id(region, v.id)));
    }
    j
}

fn snapshot_json(s: &Snapshot) -> Value {
    let mut j = serde_json::to_value(s).unwrap_or(Value::Null);
    if let Some(o) = j.as_object_mut() {
        o.insert("csi_id".into(), json!(format!("{}/{}", s.region, s.id)));
    }
    j
}

/// The region of a volume: from its ID when given, else from the volume list
/// (`volume/info` does not say).
async fn volume_region(client: &Client, v: &VolumeArg) -> Result<String, CommandError> {
    if let Some(r) = &v.region {
        return Ok(r.clone());
    }
    let all = client.volume_list(None).await.map_err(api)?;
    Ok(all
        .iter()
        .find(|x| x.id == v.id)
        .map(|x| x.region.clone())
        .unwrap_or_default())
}

/// `lunanode-csi volume ...`
pub async fn volume(cmd: VolumeCommand) -> Result<(), CommandError> {
    match cmd {
        VolumeCommand::List { region, common } => {
            let client = common.api.client()?;
            let mut vols = client.volume_list(region.as_deref()).await.map_err(api)?;
            vols.sort_by(|a, b| (&a.region, a.id).cmp(&(&b.region, b.id)));
            let j = Value::Array(vols.iter().map(|v| volume_json(v, &v.region)).collect());
            emit(common.output, j, || {
                let rows: Vec<Vec<String>> = vols
                    .iter()
                    .map(|v| {
                        vec![
                            csi_volume_id(&v.region, v.id),
                            v.id.to_string(),
                            or_dash(&v.name),
                            v.size.to_string(),
                            or_dash(&v.status),
                            or_dash(&v.attached),
                            or_dash(v.created_at()),
                        ]
                    })
                    .collect();
                render(
                    &[
                        "CSI ID", "ID", "LABEL", "SIZE_GB", "STATUS", "ATTACHED", "CREATED",
                    ],
                    &rows,
                )
            });
        }
        VolumeCommand::Info { volume, common } => {
            let client = common.api.client()?;
            let v = client.volume_info(volume.id).await.map_err(api)?;
            let region = if v.region.is_empty() {
                volume_region(&client, &volume).await?
            } else {
                v.region.clone()
            };
            emit(common.output, volume_json(&v, &region), || {
                render_pairs(&[
                    ("csi id", or_dash(&csi_volume_id(&region, v.id))),
                    ("id", v.id.to_string()),
                    ("label", or_dash(&v.name)),
                    ("region", or_dash(&region)),
                    ("size", format!("{} GB", v.size)),
                    ("status", or_dash(&v.status)),
                    ("attached to", or_dash(&v.attached)),
                    ("identification", or_dash(&v.identification)),
                    ("virtio serial", or_dash(v.serial())),
                    ("created", or_dash(v.created_at())),
                ])
            });
        }
        VolumeCommand::Create {
            region,
            size,
            label,
            snapshot,
            image,
            common,
        } => {
            // A volume is made from a snapshot in the snapshot's own region only.
            if let Some(s) = &snapshot {
                s.region(Some(&region))?;
            }
            let client = common.api.client()?;
            let source = match (&snapshot, image) {
                (Some(s), _) => Some(CreateSource::Snapshot(&s.uuid)),
                (None, Some(i)) => Some(CreateSource::Image(i)),
                (None, None) => None,
            };
            let id = client
                .volume_create(&region, &label, size, source)
                .await
                .map_err(api)?;
            let csi = csi_volume_id(&region, id);
            emit(
                common.output,
                json!({"volume_id": id, "region": region, "csi_id": csi}),
                || format!("created volume {id} ({csi}), {size} GB, label {label}\n"),
            );
        }
        VolumeCommand::Attach {
            volume,
            vm,
            target,
            common,
        } => {
            if !crate::driver::valid_attach_target(&target) {
                return Err(CommandError::Config(format!(
                    "--target {target:?} is not auto or a bus device such as /dev/vda (virtio), /dev/sda (SCSI) or /dev/hda (IDE)"
                )));
            }
            let client = common.api.client()?;
            client
                .volume_attach(volume.id, &vm, &target)
                .await
                .map_err(api)?;
            emit(
                common.output,
                json!({"success": true, "volume_id": volume.id, "vm_id": vm}),
                || format!("attached volume {} to VM {vm}\n", volume.id),
            );
        }
        VolumeCommand::Detach { volume, common } => {
            let client = common.api.client()?;
            client.volume_detach(volume.id).await.map_err(api)?;
            emit(
                common.output,
                json!({"success": true, "volume_id": volume.id}),
                || format!("detached volume {}\n", volume.id),
            );
        }
        VolumeCommand::Extend {
            volume,
            size,
            common,
        } => {
            let client = common.api.client()?;
            client.volume_extend(volume.id, size).await.map_err(api)?;
            emit(
                common.output,
                json!({"success": true, "volume_id": volume.id, "size": size}),
                || format!("extended volume {} to {size} GB\n", volume.id),
            );
        }
        VolumeCommand::Rename {
            volume,
            name,
            common,
        } => {
            let client = common.api.client()?;
            client.volume_rename(volume.id, &name).await.map_err(api)?;
            emit(
                common.output,
                json!({"success": true, "volume_id": volume.id, "name": name}),
                || format!("renamed volume {} to {name}\n", volume.id),
            );
        }
        VolumeCommand::Delete { volume, common } => {
            let client = common.api.client()?;
            client.volume_delete(volume.id).await.map_err(api)?;
            emit(
                common.output,
                json!({"success": true, "volume_id": volume.id}),
                || format!("deleted volume {}\n", volume.id),
            );
        }
    }
    Ok(())
}

/// `lunanode-csi snapshot ...`
pub async fn snapshot(cmd: SnapshotCommand) -> Result<(), CommandError> {
    match cmd {
        SnapshotCommand::Create {
            volume,
            label,
            common,
        } => {
            let client = common.api.client()?;
            let uuid = client
                .snapshot_create(volume.id, &label)
                .await
                .map_err(api)?;
            let region = volume_region(&client, &volume).await?;
            let csi = if region.is_empty() {
                String::new()
            } else {
                format!("{region}/{uuid}")
            };
            emit(
                common.output,
                json!({"snapshot_id": uuid, "region": region, "csi_id": csi}),
                || {
                    format!(
                        "created snapshot {} of volume {}\n",
                        if csi.is_empty() { &uuid } else { &csi },
                        volume.id
                    )
                },
            );
        }
        SnapshotCommand::List { region, common } => {
            let client = common.api.client()?;
            let regions: Vec<String> = match region {
                Some(r) => vec![r],
                None => REGIONS.iter().map(|r| r.to_string()).collect(),
            };
            let mut snaps = Vec::new();
            for r in &regions {
                let mut found = client.snapshot_list(r).await.map_err(api)?;
                // The list is per region; say so even when the cloud leaves it out.
                for s in &mut found {
                    if s.region.is_empty() {
                        s.region = r.clone();
                    }
                }
                snaps.extend(found);
            }
            let j = Value::Array(snaps.iter().map(snapshot_json).collect());
            emit(common.output, j, || {
                let rows: Vec<Vec<String>> = snaps
                    .iter()
                    .map(|s| {
                        vec![
                            format!("{}/{}", s.region, s.id),
                            or_dash(&s.name),
                            s.size.to_string(),
                            or_dash(&s.status),
                            s.volume
                                .as_ref()
                                .map_or("-".into(), |v| format!("{}/{}", s.region, v.id)),
                            or_dash(s.created_at()),
                        ]
                    })
                    .collect();
                render(
                    &["CSI ID", "LABEL", "SIZE_GB", "STATUS", "VOLUME", "CREATED"],
                    &rows,
                )
            });
        }
        SnapshotCommand::Replicate {
            snapshot,
            region,
            to,
            image_name,
            common,
        } => {
            let region = snapshot.region(region.as_deref())?;
            let client = common.api.client()?;
            let image = client
                .snapshot_replicate(&region, &snapshot.uuid, &image_name, &to)
                .await
                .map_err(api)?;
            emit(
                common.output,
                json!({"image_id": image, "region": to, "name": image_name}),
                || {
                    format!(
                        "replicating snapshot {region}/{} to image {image} ({image_name}) in {to}; \
                         `lunanode-csi volume create --region {to} --image {image} ...` makes a volume of it\n",
                        snapshot.uuid
                    )
                },
            );
        }
        SnapshotCommand::Delete {
            snapshot,
            region,
            common,
        } => {
            let region = snapshot.region(region.as_deref())?;
            let client = common.api.client()?;
            client
                .snapshot_delete(&region, &snapshot.uuid)
                .await
                .map_err(api)?;
            emit(
                common.output,
                json!({"success": true, "snapshot_id": snapshot.uuid, "region": region}),
                || format!("deleted snapshot {region}/{}\n", snapshot.uuid),
            );
        }
    }
    Ok(())
}

/// `lunanode-csi vm ...`
pub async fn vm(cmd: VmCommand) -> Result<(), CommandError> {
    let VmCommand::List { common } = cmd;
    let client = common.api.client()?;
    let vms = client.vm_list().await.map_err(api)?;
    let j = serde_json::to_value(&vms).unwrap_or(Value::Null);
    emit(common.output, j, || {
        let rows: Vec<Vec<String>> = vms
            .iter()
            .map(|v| {
                vec![
                    v.vm_id.clone(),
                    or_dash(&v.name),
                    or_dash(&v.hostname),
                    or_dash(&v.region),
                ]
            })
            .collect();
        render(&["ID", "NAME", "HOSTNAME", "REGION"], &rows)
    });
    Ok(())
}

/// `lunanode-csi image ...`
pub async fn image(cmd: ImageCommand) -> Result<(), CommandError> {
    match cmd {
        ImageCommand::List { region, common } => {
            let client = common.api.client()?;
            let images = client.image_list(region.as_deref()).await.map_err(api)?;
            let j = serde_json::to_value(&images).unwrap_or(Value::Null);
            emit(common.output, j, || {
                let rows: Vec<Vec<String>> = images
                    .iter()
                    .map(|i| {
                        vec![
                            i.image_id.to_string(),
                            or_dash(&i.name),
                            or_dash(&i.region),
                            or_dash(&i.status),
                        ]
                    })
                    .collect();
                render(&["ID", "NAME", "REGION", "STATUS"], &rows)
            });
        }
        ImageCommand::Delete { image, common } => {
            let client = common.api.client()?;
            client.image_delete(image).await.map_err(api)?;
            emit(
                common.output,
                json!({"success": true, "image_id": image}),
                || format!("deleted image {image}\n"),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_args_take_both_id_forms() {
        assert_eq!(
            "42".parse::<VolumeArg>().unwrap(),
            VolumeArg {
                region: None,
                id: 42
            }
        );
        assert_eq!(
            "montreal/42".parse::<VolumeArg>().unwrap(),
            VolumeArg {
                region: Some("montreal".into()),
                id: 42
            }
        );
        assert!("x/42".parse::<VolumeArg>().is_ok());
        assert!("toronto/abc".parse::<VolumeArg>().is_err());
        assert!("-1".parse::<VolumeArg>().is_err());
    }

    #[test]
    fn snapshot_args_need_a_region_from_somewhere() {
        let u = "484a06d3-7ea6-40d6-8e72-9e7e23f6826b";
        let bare: SnapshotArg = u.parse().unwrap();
        assert!(bare.region(None).is_err());
        assert_eq!(bare.region(Some("roubaix")).unwrap(), "roubaix");
        let full: SnapshotArg = format!("toronto/{u}").parse().unwrap();
        assert_eq!(full.region(None).unwrap(), "toronto");
        assert!(full.region(Some("montreal")).is_err());
        assert!("toronto/nope".parse::<SnapshotArg>().is_err());
    }
}
