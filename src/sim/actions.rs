//! The API actions: parameters in, the cloud's JSON out. Runs under the world lock.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::{Value, json};

use super::World;
use super::state::{Cloud, CloudError, Image, Snapshot, USER_ID, Volume};

/// The parameters of one request (every value a string).
#[derive(Debug, Default, Clone)]
pub struct Params(pub HashMap<String, String>);

impl Params {
    /// A required parameter.
    pub fn req(&self, k: &str) -> Result<&str, CloudError> {
        match self.0.get(k) {
            Some(v) => Ok(v),
            None if k == "region" => Err(CloudError("region not set".into())),
            None => Err(CloudError(format!("missing parameter {k}"))),
        }
    }

    /// An optional parameter; an empty string counts as absent.
    pub fn opt(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }
}

/// The message for a failure of the storage behind the simulator (classified as transient).
fn backend(e: String) -> CloudError {
    tracing::warn!(error = %e, "sim: backing store failed");
    CloudError(format!("internal error: storage backend failed: {e}"))
}

fn ok(mut v: Value) -> Value {
    v["success"] = json!("yes");
    v
}

pub fn volume_list_json(v: &Volume) -> Value {
    json!({
        "id": v.id.to_string(),
        "identification": v.identification,
        "name": v.label,
        "region": v.region,
        "size": v.size_gb.to_string(),
        "status": v.status,
        "time_created": v.created,
        "user_id": USER_ID,
        "attached": v.attached(),
    })
}

pub fn volume_info_json(v: &Volume) -> Value {
    json!({
        "attached": v.attached(),
        "created": v.created,
        "id": v.id.to_string(),
        "identification": v.identification,
        "name": v.label,
        "size": v.size_gb.to_string(),
        "status": v.status,
        "region": v.region,
        "time_created": v.created,
        "user_id": USER_ID,
    })
}

fn snapshot_json(c: &Cloud, s: &Snapshot) -> Value {
    let volume = match c.volumes.get(&s.volume_id) {
        Some(v) => volume_list_json(v),
        None => {
            let mut v = volume_list_json(&s.volume);
            v["status"] = json!("deleted");
            v["attached"] = json!("");
            v
        }
    };
    json!({
        "id": s.id,
        "name": s.label,
        "region": s.region,
        "size": s.size_gb.to_string(),
        "status": s.status,
        "user_id": USER_ID,
        "volume": volume,
    })
}

fn image_json(i: &Image) -> Value {
    json!({
        "image_id": i.id.to_string(),
        "name": i.name,
        "region": i.region,
        "status": i.status,
        "size": i.size_gb.to_string(),
    })
}

/// Run `handler` (`category/action`). On any failure the cloud is left as it was.
pub fn execute(
    w: &mut World,
    now: Instant,
    handler: &str,
    p: &Params,
) -> Result<Value, CloudError> {
    w.cloud.settle(now);
    let saved = w.cloud.clone();
    let r = run(w, now, handler, p);
    if r.is_err() {
        w.cloud = saved;
    }
    r
}

fn run(w: &mut World, now: Instant, handler: &str, p: &Params) -> Result<Value, CloudError> {
    let World { cloud: c, store } = w;
    match handler {
        "volume/create" => {
            let (id, source) = c.create_volume(
                now,
                p.req("region")?,
                p.req("label")?,
                p.req("size")?,
                p.opt("image"),
                p.opt("snapshot_id"),
            )?;
            let size = c.volumes[&id].size_gb;
            store.create_volume(id, size, &source).map_err(backend)?;
            Ok(ok(json!({ "volume_id": id.to_string() })))
        }
        "volume/list" => {
            let vols = c.list_volumes(p.opt("region"))?;
            let list: Vec<Value> = vols.into_iter().map(volume_list_json).collect();
            Ok(ok(json!({ "volumes": list })))
        }
        "volume/info" => {
            let v = c.volume(p.req("volume_id")?)?;
            Ok(ok(json!({ "volume": volume_info_json(v) })))
        }
        "volume/attach" => {
            let id = c.attach(now, p.req("volume_id")?, p.req("vm_id")?, p.req("target")?)?;
            let ident = c.volumes[&id].identification.clone();
            store.attach(id, &ident).map_err(backend)?;
            Ok(ok(json!({})))
        }
        "volume/detach" => {
            let id = c.detach(now, p.req("volume_id")?)?;
            if let Err(e) = store.detach(id) {
                // The link is gone already; a loop device that lingers is not the caller's problem.
                tracing::warn!(volume = id, error = %e, "sim: detach of the loop device failed");
            }
            Ok(ok(json!({})))
        }
        "volume/extend" => {
            let (id, size) = c.extend(now, p.req("volume_id")?, p.req("size")?)?;
            store.extend(id, size).map_err(backend)?;
            Ok(ok(json!({})))
        }
        "volume/rename" => {
            c.rename(p.req("volume_id")?, p.req("name")?)?;
            Ok(ok(json!({})))
        }
        "volume/delete" => {
            let id = c.delete_volume(p.req("volume_id")?)?;
            store.delete_volume(id).map_err(backend)?;
            Ok(ok(json!({})))
        }
        "volume/snapshot-create" => {
            let (sid, vid) = c.snapshot_create(now, p.req("volume_id")?, p.req("label")?)?;
            store.snapshot(vid, &sid).map_err(backend)?;
            Ok(ok(json!({ "snapshot_id": sid })))
        }
        "volume/snapshot-list" => {
            let snaps = c.snapshot_list(p.req("region")?)?;
            let list: Vec<Value> = snaps.into_iter().map(|s| snapshot_json(c, s)).collect();
            Ok(ok(json!({ "snapshots": list })))
        }
        "volume/snapshot-replicate" => {
            let sid = p.req("snapshot_id")?;
            let id = c.snapshot_replicate(
                now,
                p.req("region")?,
                sid,
                p.req("image_name")?,
                p.req("dst_region")?,
            )?;
            store.replicate(sid, id).map_err(backend)?;
            Ok(ok(json!({ "image_id": id.to_string() })))
        }
        "volume/snapshot-delete" => {
            let sid = c.snapshot_delete(p.req("region")?, p.req("snapshot_id")?)?;
            store.delete_snapshot(&sid).map_err(backend)?;
            Ok(ok(json!({})))
        }
        "vm/list" => {
            let list: Vec<Value> = c
                .vms
                .iter()
                .map(|vm| {
                    json!({
                        "vm_id": vm.id,
                        "name": vm.name,
                        "hostname": vm.hostname(),
                        "primaryip": vm.primary_ip(),
                        "privateip": vm.private_ip(),
                        "region": vm.region,
                        "plan_id": "1",
                        "os_status": "active",
                    })
                })
                .collect();
            Ok(ok(json!({ "vms": list })))
        }
        "vm/info" => {
            let vm = c.vm(p.req("vm_id")?)?;
            let volumes: Vec<Value> = c
                .volumes
                .values()
                .filter(|v| v.attached() == vm.id)
                .map(|v| json!({ "id": v.id.to_string(), "identification": v.identification }))
                .collect();
            Ok(ok(json!({
                "info": {
                    "status_raw": "active",
                    "status": "Online",
                    "hostname": vm.hostname(),
                    "ip": vm.primary_ip(),
                    "privateip": vm.private_ip(),
                    "volumes": volumes,
                },
                "extra": {
                    "vm_id": vm.id,
                    "name": vm.name,
                    "hostname": vm.hostname(),
                    "region": vm.region,
                    "primaryip": vm.primary_ip(),
                    "privateip": vm.private_ip(),
                },
            })))
        }
        "image/list" => {
            let list: Vec<Value> = c
                .image_list(p.opt("region"))?
                .into_iter()
                .map(image_json)
                .collect();
            Ok(ok(json!({ "images": list })))
        }
        "image/delete" => {
            let id = c.image_delete(p.req("image_id")?)?;
            store.delete_image(id).map_err(backend)?;
            Ok(ok(json!({})))
        }
        _ => Err(CloudError("unknown action".into())),
    }
}
