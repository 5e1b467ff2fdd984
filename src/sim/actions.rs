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

/// The status word `volume/list` uses: with the `list-words` quirk, `active` for what
/// `volume/info` calls `available` or `in-use`.
fn list_status(v: &Volume, list_words: bool) -> &'static str {
    match v.status {
        "available" | "in-use" if list_words => "active",
        s => s,
    }
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

/// The actions that took `region` before 2018 (the `old-rules` quirk), and whether each
/// names one volume.
const OLD_RULES: [(&str, bool); 7] = [
    ("volume/list", false),
    ("volume/info", true),
    ("volume/attach", true),
    ("volume/detach", true),
    ("volume/extend", true),
    ("volume/delete", true),
    ("volume/snapshot-create", true),
];

/// The fields that hold lists (sent as objects with the `object-lists` quirk).
const LIST_FIELDS: [&str; 4] = ["volumes", "snapshots", "images", "vms"];

/// The reply's JSON text. With `object_lists`, every list field ([`LIST_FIELDS`], at any
/// depth) is written as an object keyed `"0"`, `"1"`, … in the list's order (also in the
/// text, where a sorted map would put `"10"` before `"2"`); an empty list is `{}`.
pub fn reply_text(v: &Value, object_lists: bool) -> String {
    if !object_lists {
        return v.to_string();
    }
    let mut out = String::new();
    write_json(&mut out, v);
    out
}

fn write_json(out: &mut String, v: &Value) {
    match v {
        Value::Object(m) => {
            out.push('{');
            for (i, (k, val)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::from(k.as_str()).to_string());
                out.push(':');
                match val {
                    Value::Array(items) if LIST_FIELDS.contains(&k.as_str()) => {
                        out.push('{');
                        for (j, item) in items.iter().enumerate() {
                            if j > 0 {
                                out.push(',');
                            }
                            out.push_str(&format!("\"{j}\":"));
                            write_json(out, item);
                        }
                        out.push('}');
                    }
                    _ => write_json(out, val),
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (j, item) in items.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                write_json(out, item);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn run(w: &mut World, now: Instant, handler: &str, p: &Params) -> Result<Value, CloudError> {
    let World { cloud: c, store } = w;
    let quirks = c.rules.quirks;
    if quirks.old_rules
        && let Some((_, one_volume)) = OLD_RULES.iter().find(|(h, _)| *h == handler)
    {
        let volume = if *one_volume {
            Some(p.req("volume_id")?)
        } else {
            None
        };
        c.check_old_rules(p.opt("region"), volume)?;
    }
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
            let list: Vec<Value> = vols
                .into_iter()
                .map(|v| {
                    let mut j = volume_list_json(v);
                    j["status"] = json!(list_status(v, quirks.list_words));
                    j
                })
                .collect();
            Ok(ok(json!({ "volumes": list })))
        }
        "volume/info" => {
            let v = c.volume(p.req("volume_id")?)?;
            Ok(ok(json!({ "volume": volume_info_json(v) })))
        }
        "volume/attach" => {
            let (id, bus) =
                c.attach(now, p.req("volume_id")?, p.req("vm_id")?, p.req("target")?)?;
            let ident = c.volumes[&id].identification.clone();
            store.attach(id, &ident, bus).map_err(backend)?;
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
            // An image that does not exist is "deleted" too, as on the real cloud.
            if let Some(id) = c.image_delete(p.req("image_id")?) {
                store.delete_image(id).map_err(backend)?;
            }
            Ok(ok(json!({})))
        }
        _ => Err(CloudError("unknown action".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_lists_keep_their_order_in_the_text() {
        let items: Vec<Value> = (0..12).map(|i| json!({ "id": i.to_string() })).collect();
        let v = json!({
            "success": "yes",
            "volumes": items,
            "info": { "volumes": [], "name": "x" },
            "other": [1, 2],
        });
        assert_eq!(reply_text(&v, false), v.to_string());
        let text = reply_text(&v, true);
        let back: Value = serde_json::from_str(&text).unwrap();
        let vols = back["volumes"].as_object().unwrap();
        assert_eq!(vols.len(), 12);
        for i in 0..12 {
            assert_eq!(vols[&i.to_string()]["id"], i.to_string());
        }
        assert!(
            text.find("\"2\":").unwrap() < text.find("\"10\":").unwrap(),
            "{text}"
        );
        assert_eq!(back["info"]["volumes"], json!({}));
        assert_eq!(back["other"], json!([1, 2]), "only list fields change");
        assert_eq!(back["success"], "yes");
        // Strings are escaped as serde_json escapes them.
        let odd = json!({ "vms": [{ "name": "a\"b\\c\u{e9}" }] });
        let back: Value = serde_json::from_str(&reply_text(&odd, true)).unwrap();
        assert_eq!(back["vms"]["0"]["name"], "a\"b\\c\u{e9}");
    }

    #[test]
    fn list_words() {
        let mut c = Cloud::new(
            super::super::state::Rules {
                transitions: Default::default(),
                refuse_delete_with_snapshots: false,
                max_volumes_per_vm: 15,
                auto_bus: None,
                quirks: super::super::Quirks::NONE,
            },
            1,
        );
        let (id, _) = c
            .create_volume(Instant::now(), "toronto", "a", "1", None, None)
            .unwrap();
        let v = &c.volumes[&id];
        assert_eq!(list_status(v, false), "available");
        assert_eq!(list_status(v, true), "active");
        let mut v = v.clone();
        for (s, listed) in [
            ("in-use", "active"),
            ("creating", "creating"),
            ("attaching", "attaching"),
            ("detaching", "detaching"),
            ("error", "error"),
        ] {
            v.status = s;
            assert_eq!(list_status(&v, true), listed);
            assert_eq!(list_status(&v, false), s);
        }
    }
}
