//! The simulator over real HTTP (memory backing), with a tiny signed-request client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use lunanode_csi::lunanode::ApiError;
use lunanode_csi::sim::{Bus, FaultKind, Quirks, SimConfig, SimHandle, SimRequest, VmSpec};
use serde_json::{Value, json};
use sha2::Sha512;

struct Api {
    http: reqwest::Client,
    url: String,
    id: String,
    key: String,
    nonce: AtomicU64,
}

/// One reply: HTTP status and the body (JSON if it parses, else a string).
#[derive(Debug, Clone, PartialEq)]
struct Reply {
    status: u16,
    body: Value,
}

impl Reply {
    fn ok(&self) -> bool {
        self.status == 200 && self.body["success"] == "yes"
    }
    #[track_caller]
    fn expect_ok(self) -> Value {
        assert!(self.ok(), "expected success, got {self:?}");
        self.body
    }
    #[track_caller]
    fn expect_err(&self) -> String {
        assert_eq!(self.status, 200, "{self:?}");
        assert_eq!(self.body["success"], "no", "{self:?}");
        self.body["error"].as_str().expect("error text").to_string()
    }
}

fn sign(key: &str, handler: &str, req: &str, nonce: &str) -> String {
    let mut mac = Hmac::<Sha512>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{handler}|{req}|{nonce}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

impl Api {
    fn new(h: &SimHandle) -> Self {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            url: h.url.clone(),
            id: h.api_id.clone(),
            key: h.api_key.clone(),
            nonce: AtomicU64::new(1_700_000_000),
        }
    }

    fn req_json(&self, params: &[(&str, &str)]) -> String {
        let mut m = serde_json::Map::new();
        for (k, v) in params {
            m.insert(k.to_string(), json!(v));
        }
        m.insert("api_id".into(), json!(self.id));
        m.insert("api_partialkey".into(), json!(&self.key[..64]));
        Value::Object(m).to_string()
    }

    async fn post(&self, handler: &str, req: &str, signature: &str, nonce: &str) -> Reply {
        let resp = self
            .http
            .post(format!("{}{handler}/", self.url))
            .form(&[
                ("req", req),
                ("signature", signature),
                ("nonce", nonce),
                ("handler", &format!("{handler}/")),
            ])
            .send()
            .await
            .expect("request sent");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, body }
    }

    async fn call(&self, handler: &str, params: &[(&str, &str)]) -> Reply {
        let req = self.req_json(params);
        self.call_raw(handler, &req).await
    }

    /// Send this exact `req` text, correctly signed.
    async fn call_raw(&self, handler: &str, req: &str) -> Reply {
        let nonce = self.nonce.fetch_add(1, Ordering::SeqCst).to_string();
        let sig = sign(&self.key, &format!("{handler}/"), req, &nonce);
        self.post(handler, req, &sig, &nonce).await
    }

    /// The credentials part of a `req`, to build one by hand: `"api_id":…,"api_partialkey":…`.
    fn creds_json(&self) -> String {
        format!(
            r#""api_id":"{}","api_partialkey":"{}""#,
            self.id,
            &self.key[..64]
        )
    }

    async fn attach(&self, id: &str, vm: &str, target: &str) {
        self.call(
            "volume/attach",
            &[("volume_id", id), ("vm_id", vm), ("target", target)],
        )
        .await
        .expect_ok();
    }

    async fn create(&self, region: &str, label: &str, size: &str) -> String {
        let b = self
            .call(
                "volume/create",
                &[("region", region), ("label", label), ("size", size)],
            )
            .await
            .expect_ok();
        b["volume_id"].as_str().unwrap().to_string()
    }
}

async fn sim(cfg: SimConfig) -> (SimHandle, Api) {
    let h = SimHandle::start(cfg).await.expect("simulator starts");
    let api = Api::new(&h);
    (h, api)
}

fn two_regions() -> SimConfig {
    SimConfig {
        vms: vec![
            VmSpec {
                region: "toronto".into(),
                name: Some("node-a".into()),
            },
            VmSpec {
                region: "montreal".into(),
                name: None,
            },
        ],
        ..SimConfig::default()
    }
}

#[derive(Debug, PartialEq)]
enum K {
    NotFound,
    Invalid,
    State,
}

#[track_caller]
fn kind(handler: &str, msg: &str) -> K {
    match ApiError::from_cloud_message(handler, msg) {
        ApiError::NotFound { .. } => K::NotFound,
        ApiError::InvalidArgument { .. } => K::Invalid,
        ApiError::WrongState { .. } => K::State,
        other => panic!("{msg:?} classified as {other:?}"),
    }
}

fn assert_str_fields(v: &Value, keys: &[&str]) {
    for k in keys {
        assert!(v[k].is_string(), "field {k} missing or not a string in {v}");
    }
}

#[tokio::test]
async fn every_action_has_the_reference_shape() {
    let (h, api) = sim(two_regions()).await;
    let vm = h.vms[0].id.clone();

    let vms = api.call("vm/list", &[]).await.expect_ok();
    let list = vms["vms"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_str_fields(
        &list[0],
        &[
            "vm_id",
            "name",
            "hostname",
            "primaryip",
            "privateip",
            "region",
        ],
    );
    assert_eq!(list[0]["vm_id"], vm.as_str());
    assert_eq!(list[0]["name"], "node-a");
    let info = api.call("vm/info", &[("vm_id", &vm)]).await.expect_ok();
    assert_eq!(info["info"]["status_raw"], "active");
    assert_eq!(info["extra"]["vm_id"], vm.as_str());
    assert_eq!(info["extra"]["region"], "toronto");
    assert_str_fields(&info["extra"], &["vm_id", "name", "hostname", "region"]);

    let created = api
        .call(
            "volume/create",
            &[("region", "toronto"), ("label", "myvolume"), ("size", "2")],
        )
        .await
        .expect_ok();
    let id = created["volume_id"].as_str().unwrap().to_string();
    assert!(id.parse::<u64>().is_ok());

    let vols = api.call("volume/list", &[]).await.expect_ok();
    let v = &vols["volumes"][0];
    assert_str_fields(
        v,
        &[
            "id",
            "identification",
            "name",
            "region",
            "size",
            "status",
            "time_created",
            "user_id",
            "attached",
        ],
    );
    assert_eq!(
        (v["id"].as_str(), v["name"].as_str(), v["size"].as_str()),
        (Some(id.as_str()), Some("myvolume"), Some("2"))
    );
    let ident = v["identification"].as_str().unwrap().to_string();
    assert_eq!(ident.len(), 36);
    let in_mtl = api
        .call("volume/list", &[("region", "montreal")])
        .await
        .expect_ok();
    assert_eq!(in_mtl["volumes"].as_array().unwrap().len(), 0);

    let info = api
        .call("volume/info", &[("volume_id", &id)])
        .await
        .expect_ok();
    let vi = &info["volume"];
    assert_str_fields(
        vi,
        &[
            "attached",
            "created",
            "id",
            "identification",
            "name",
            "size",
            "status",
            "region",
        ],
    );
    assert_eq!(
        (vi["status"].as_str(), vi["attached"].as_str()),
        (Some("available"), Some(""))
    );

    api.call(
        "volume/attach",
        &[("volume_id", &id), ("vm_id", &vm), ("target", "auto")],
    )
    .await
    .expect_ok();
    let vi = api
        .call("volume/info", &[("volume_id", &id)])
        .await
        .expect_ok()["volume"]
        .clone();
    assert_eq!(
        (vi["status"].as_str(), vi["attached"].as_str()),
        (Some("in-use"), Some(vm.as_str()))
    );
    let st = h.state();
    assert_eq!(st.volumes[0].attached.as_deref(), Some(vm.as_str()));
    assert_eq!(st.volumes[0].device, None, "memory backing has no devices");

    let snap = api
        .call(
            "volume/snapshot-create",
            &[("volume_id", &id), ("label", "myvolsnapshot")],
        )
        .await
        .expect_ok();
    let sid = snap["snapshot_id"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&sid).is_ok());

    api.call("volume/detach", &[("volume_id", &id)])
        .await
        .expect_ok();
    api.call("volume/extend", &[("volume_id", &id), ("size", "3")])
        .await
        .expect_ok();
    api.call(
        "volume/rename",
        &[("volume_id", &id), ("name", "myvolume2")],
    )
    .await
    .expect_ok();
    let vi = api
        .call("volume/info", &[("volume_id", &id)])
        .await
        .expect_ok()["volume"]
        .clone();
    assert_eq!(
        (
            vi["size"].as_str(),
            vi["name"].as_str(),
            vi["attached"].as_str()
        ),
        (Some("3"), Some("myvolume2"), Some(""))
    );

    let snaps = api
        .call("volume/snapshot-list", &[("region", "toronto")])
        .await
        .expect_ok();
    let s = &snaps["snapshots"][0];
    assert_str_fields(s, &["id", "name", "region", "size", "status", "user_id"]);
    assert_eq!(
        (s["id"].as_str(), s["size"].as_str(), s["status"].as_str()),
        (Some(sid.as_str()), Some("2"), Some("available"))
    );
    assert_str_fields(
        &s["volume"],
        &[
            "id",
            "identification",
            "name",
            "region",
            "size",
            "status",
            "time_created",
            "user_id",
        ],
    );
    assert_eq!(s["volume"]["identification"], ident.as_str());

    let rep = api
        .call(
            "volume/snapshot-replicate",
            &[
                ("region", "toronto"),
                ("snapshot_id", &sid),
                ("image_name", "img"),
                ("dst_region", "roubaix"),
            ],
        )
        .await
        .expect_ok();
    let image = rep["image_id"].as_str().unwrap().to_string();
    assert!(image.parse::<u64>().is_ok());
    let imgs = api
        .call("image/list", &[("region", "roubaix")])
        .await
        .expect_ok();
    let i = &imgs["images"][0];
    assert_str_fields(i, &["image_id", "name", "region", "status"]);
    assert_eq!(
        (i["image_id"].as_str(), i["status"].as_str()),
        (Some(image.as_str()), Some("active"))
    );
    assert_eq!(
        api.call("image/list", &[]).await.expect_ok()["images"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let from_img = api
        .call(
            "volume/create",
            &[
                ("region", "roubaix"),
                ("label", "c"),
                ("size", "2"),
                ("image", &image),
            ],
        )
        .await
        .expect_ok();
    let from_snap = api
        .call(
            "volume/create",
            &[
                ("region", "toronto"),
                ("label", "d"),
                ("size", "2"),
                ("snapshot_id", &sid),
            ],
        )
        .await
        .expect_ok();
    assert_ne!(from_img["volume_id"], from_snap["volume_id"]);

    api.call("image/delete", &[("image_id", &image)])
        .await
        .expect_ok();
    api.call(
        "volume/snapshot-delete",
        &[("region", "toronto"), ("snapshot_id", &sid)],
    )
    .await
    .expect_ok();
    api.call("volume/delete", &[("volume_id", &id)])
        .await
        .expect_ok();
    let st = h.state();
    assert_eq!(
        (st.volumes.len(), st.snapshots.len(), st.images.len()),
        (2, 0, 0)
    );
    assert_eq!(st.calls["volume/create"], 3);
    assert_eq!(st.calls["volume/info"], 3);

    // The same state over HTTP, without authentication.
    let text = reqwest::get(format!("http://{}/_sim/state", h.addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let raw: lunanode_csi::sim::SimState = serde_json::from_str(&text).unwrap();
    assert_eq!(raw, h.state());
    h.reset_counters();
    assert!(h.state().calls.is_empty());
    h.shutdown().await;
}

#[tokio::test]
async fn every_rule_refuses_with_a_classifiable_error() {
    let (h, api) = sim(two_regions()).await;
    let (tor, mtl) = (h.vms[0].id.clone(), h.vms[1].id.clone());
    let id = api.create("toronto", "v", "2").await;

    let check = |r: Reply, handler: &str, want: K, needle: &str| {
        let msg = r.expect_err();
        assert_eq!(kind(handler, &msg), want, "{handler}: {msg}");
        assert!(msg.contains(needle), "{handler}: {msg:?} lacks {needle:?}");
    };
    // Invalid arguments.
    check(
        api.call(
            "volume/create",
            &[("region", "paris"), ("label", "a"), ("size", "1")],
        )
        .await,
        "volume/create",
        K::Invalid,
        "unknown region",
    );
    for size in ["0", "-3", "1.5", "big"] {
        check(
            api.call(
                "volume/create",
                &[("region", "toronto"), ("label", "a"), ("size", size)],
            )
            .await,
            "volume/create",
            K::Invalid,
            "invalid size",
        );
    }
    check(
        api.call("volume/create", &[("label", "a"), ("size", "1")])
            .await,
        "volume/create",
        K::Invalid,
        "region not set",
    );
    check(
        api.call("volume/extend", &[("volume_id", &id), ("size", "2")])
            .await,
        "volume/extend",
        K::Invalid,
        "invalid size",
    );
    check(
        api.call("volume/extend", &[("volume_id", &id), ("size", "1")])
            .await,
        "volume/extend",
        K::Invalid,
        "invalid size",
    );
    check(
        api.call(
            "volume/attach",
            &[("volume_id", &id), ("vm_id", &mtl), ("target", "auto")],
        )
        .await,
        "volume/attach",
        K::Invalid,
        "region",
    );
    check(
        api.call("volume/snapshot-list", &[("region", "atlantis")])
            .await,
        "volume/snapshot-list",
        K::Invalid,
        "unknown region",
    );
    // Not found.
    check(
        api.call("volume/info", &[("volume_id", "999")]).await,
        "volume/info",
        K::NotFound,
        "volume 999 not found",
    );
    check(
        api.call(
            "volume/attach",
            &[("volume_id", &id), ("vm_id", "nope"), ("target", "auto")],
        )
        .await,
        "volume/attach",
        K::NotFound,
        "invalid vm",
    );
    check(
        api.call("vm/info", &[("vm_id", "nope")]).await,
        "vm/info",
        K::NotFound,
        "vm",
    );
    // (image/delete of a missing image succeeds: see `image_delete_of_a_missing_image_succeeds`.)
    // Wrong state.
    check(
        api.call("volume/detach", &[("volume_id", &id)]).await,
        "volume/detach",
        K::State,
        &format!("volume {id} is not attached"),
    );
    api.call(
        "volume/attach",
        &[("volume_id", &id), ("vm_id", &tor), ("target", "auto")],
    )
    .await
    .expect_ok();
    check(
        api.call(
            "volume/attach",
            &[("volume_id", &id), ("vm_id", &tor), ("target", "auto")],
        )
        .await,
        "volume/attach",
        K::State,
        &format!("volume {id} is already attached to vm {tor}"),
    );
    check(
        api.call("volume/delete", &[("volume_id", &id)]).await,
        "volume/delete",
        K::State,
        &format!("volume {id} is attached to vm {tor}; detach it first"),
    );
    check(
        api.call("volume/extend", &[("volume_id", &id), ("size", "5")])
            .await,
        "volume/extend",
        K::State,
        "attached",
    );
    // Snapshots and images live in one region.
    let sid = api
        .call(
            "volume/snapshot-create",
            &[("volume_id", &id), ("label", "s")],
        )
        .await
        .expect_ok()["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mtl_list = api
        .call("volume/snapshot-list", &[("region", "montreal")])
        .await
        .expect_ok();
    assert!(mtl_list["snapshots"].as_array().unwrap().is_empty());
    check(
        api.call(
            "volume/snapshot-delete",
            &[("region", "montreal"), ("snapshot_id", &sid)],
        )
        .await,
        "volume/snapshot-delete",
        K::NotFound,
        &sid,
    );
    check(
        api.call(
            "volume/create",
            &[
                ("region", "montreal"),
                ("label", "a"),
                ("size", "2"),
                ("snapshot_id", &sid),
            ],
        )
        .await,
        "volume/create",
        K::Invalid,
        "region",
    );
    check(
        api.call(
            "volume/create",
            &[
                ("region", "toronto"),
                ("label", "a"),
                ("size", "1"),
                ("snapshot_id", &sid),
            ],
        )
        .await,
        "volume/create",
        K::Invalid,
        "invalid size",
    );
    let img = api
        .call(
            "volume/snapshot-replicate",
            &[
                ("region", "toronto"),
                ("snapshot_id", &sid),
                ("image_name", "i"),
                ("dst_region", "roubaix"),
            ],
        )
        .await
        .expect_ok()["image_id"]
        .as_str()
        .unwrap()
        .to_string();
    check(
        api.call(
            "volume/create",
            &[
                ("region", "toronto"),
                ("label", "a"),
                ("size", "2"),
                ("image", &img),
            ],
        )
        .await,
        "volume/create",
        K::Invalid,
        "region",
    );
    check(
        api.call(
            "volume/create",
            &[
                ("region", "roubaix"),
                ("label", "a"),
                ("size", "1"),
                ("image", &img),
            ],
        )
        .await,
        "volume/create",
        K::Invalid,
        "invalid size",
    );
    // Delete with snapshots is allowed by default.
    api.call("volume/detach", &[("volume_id", &id)])
        .await
        .expect_ok();
    api.call("volume/delete", &[("volume_id", &id)])
        .await
        .expect_ok();
    // Unknown action.
    let r = api.call("volume/teleport", &[("volume_id", "1")]).await;
    assert_eq!(r.expect_err(), "unknown action");
    assert_eq!(h.state().calls["volume/teleport"], 1);
    h.shutdown().await;
}

#[tokio::test]
async fn delete_with_snapshots_can_be_refused() {
    let (h, api) = sim(SimConfig {
        refuse_delete_with_snapshots: true,
        ..SimConfig::default()
    })
    .await;
    let id = api.create("toronto", "v", "1").await;
    let sid = api
        .call(
            "volume/snapshot-create",
            &[("volume_id", &id), ("label", "s")],
        )
        .await
        .expect_ok()["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    let msg = api
        .call("volume/delete", &[("volume_id", &id)])
        .await
        .expect_err();
    assert_eq!(kind("volume/delete", &msg), K::State, "{msg}");
    api.call(
        "volume/snapshot-delete",
        &[("region", "toronto"), ("snapshot_id", &sid)],
    )
    .await
    .expect_ok();
    api.call("volume/delete", &[("volume_id", &id)])
        .await
        .expect_ok();
    h.shutdown().await;
}

#[tokio::test]
async fn bad_signatures_and_credentials_are_refused() {
    let (h, api) = sim(SimConfig::default()).await;
    let auth = |r: Reply| {
        let msg = r.expect_err();
        assert_eq!(msg, "authentication failed: invalid signature");
        assert!(matches!(
            ApiError::from_cloud_message("x", &msg),
            ApiError::Signature { .. }
        ));
    };
    let req = api.req_json(&[("region", "toronto"), ("label", "x"), ("size", "1")]);
    let good = sign(&api.key, "volume/create/", &req, "100");
    // Wrong signature, wrong nonce, wrong handler, tampered req.
    auth(
        api.post("volume/create", &req, &"0".repeat(128), "100")
            .await,
    );
    auth(api.post("volume/create", &req, &good, "101").await);
    auth(api.post("volume/list", &req, &good, "100").await);
    let tampered = req.replace("\"size\":\"1\"", "\"size\":\"2\"");
    auth(api.post("volume/create", &tampered, &good, "100").await);
    // Wrong key, wrong ID.
    let other_key = "k".repeat(128);
    auth(
        api.post(
            "volume/create",
            &req,
            &sign(&other_key, "volume/create/", &req, "100"),
            "100",
        )
        .await,
    );
    let bad_id = req.replace(&api.id, "AAAAAAAAAAAAAAAA");
    auth(
        api.post(
            "volume/create",
            &bad_id,
            &sign(&api.key, "volume/create/", &bad_id, "100"),
            "100",
        )
        .await,
    );
    assert!(h.state().volumes.is_empty());
    assert_eq!(h.state().calls["volume/create"], 5);
    assert_eq!(h.state().calls["volume/list"], 1);
    // The right one works.
    api.post("volume/create", &req, &good, "100")
        .await
        .expect_ok();
    assert_eq!(h.state().volumes.len(), 1);
    h.shutdown().await;
}

/// The signature covers the nonce (above), but nothing more is known of how the real cloud
/// judges nonces, and Luna Node's own clients send one value for all requests in a second.
/// So the simulator accepts a repeated nonce, one behind an earlier one and one far ahead:
/// the driver's `clock` and `increasing` modes are both served, and neither is favoured.
#[tokio::test]
async fn nonces_are_signed_but_not_judged() {
    let (h, api) = sim(SimConfig::default()).await;
    let req = api.req_json(&[]);
    for nonce in [
        "1700000000",
        "1700000000",
        "1699999000",
        "1700000001",
        "4000000000",
    ] {
        let sig = sign(&api.key, "vm/list/", &req, nonce);
        api.post("vm/list", &req, &sig, nonce).await.expect_ok();
    }
    assert_eq!(h.state().calls["vm/list"], 5);
    h.shutdown().await;
}

/// What a client sees for one call, reduced to compare runs.
fn outcome(r: &Reply) -> String {
    match (r.status, r.body.get("success").and_then(Value::as_str)) {
        (200, Some("yes")) => "ok".into(),
        (s, _) => format!(
            "{s}:{}",
            r.body.get("error").and_then(Value::as_str).unwrap_or("-")
        ),
    }
}

#[tokio::test]
async fn faults_are_deterministic_for_a_seed() {
    async fn run(seed: u64) -> (Vec<String>, usize) {
        let (h, api) = sim(SimConfig {
            seed,
            fault_rate: 0.5,
            ..SimConfig::default()
        })
        .await;
        h.set_fault_timeout(Duration::from_millis(20));
        let mut seen = Vec::new();
        for i in 0..40 {
            let r = api
                .call(
                    "volume/create",
                    &[
                        ("region", "toronto"),
                        ("label", &format!("v{i}")),
                        ("size", "1"),
                    ],
                )
                .await;
            seen.push(outcome(&r));
        }
        let n = h.state().volumes.len();
        h.shutdown().await;
        (seen, n)
    }
    let (a, na) = run(11).await;
    let (b, nb) = run(11).await;
    assert_eq!(a, b);
    assert_eq!(na, nb);
    let (c, _) = run(12).await;
    assert_ne!(a, c);
    for want in [
        "ok",
        "500:-",
        "503:-",
        "504:-",
        "429:rate limit exceeded",
        "200:temporarily unavailable, try again",
    ] {
        assert!(a.contains(&want.to_string()), "{want} never seen in {a:?}");
    }
    // Lost replies applied their creates: more volumes than successes.
    let oks = a.iter().filter(|o| *o == "ok").count();
    assert!(na > oks, "volumes {na}, successes {oks}");
}

#[tokio::test]
async fn a_lost_reply_still_applies_the_action() {
    let (h, api) = sim(SimConfig::default()).await;
    h.set_fault_kinds(&[FaultKind::LostReply]);
    h.set_fault_rate(1.0);
    let r = api
        .call(
            "volume/create",
            &[("region", "toronto"), ("label", "ghost"), ("size", "1")],
        )
        .await;
    assert_eq!(r.status, 503);
    h.set_fault_rate(0.0);
    let vols = api.call("volume/list", &[]).await.expect_ok();
    assert_eq!(vols["volumes"][0]["name"], "ghost");
    assert_eq!(h.state().calls["volume/create"], 1);
    h.shutdown().await;
}

#[tokio::test]
async fn other_faults_do_not_apply_the_action() {
    let (h, api) = sim(SimConfig::default()).await;
    h.set_fault_rate(1.0);
    h.set_fault_timeout(Duration::from_millis(200));
    for (k, status) in [
        (FaultKind::Http500, 500),
        (FaultKind::Http503, 503),
        (FaultKind::Http429, 429),
        (FaultKind::Transient, 200),
        (FaultKind::Timeout, 504),
    ] {
        h.set_fault_kinds(&[k]);
        let t = Instant::now();
        let r = api
            .call(
                "volume/create",
                &[("region", "toronto"), ("label", "x"), ("size", "1")],
            )
            .await;
        assert_eq!(r.status, status, "{k:?}");
        if k == FaultKind::Timeout {
            assert!(t.elapsed() >= Duration::from_millis(200));
        }
        if k == FaultKind::Transient {
            let msg = r.expect_err();
            assert!(matches!(
                ApiError::from_cloud_message("x", &msg),
                ApiError::Transient { .. }
            ));
        }
    }
    assert!(h.state().volumes.is_empty());
    assert_eq!(h.state().calls["volume/create"], 5);
    h.shutdown().await;
}

#[tokio::test]
async fn rate_limit_answers_429() {
    let (h, api) = sim(SimConfig {
        rate_limit_qps: Some(1.0),
        ..SimConfig::default()
    })
    .await;
    let mut limited = 0;
    for _ in 0..10 {
        let r = api.call("vm/list", &[]).await;
        if r.status == 429 {
            assert_eq!(
                r.body,
                json!({"success": "no", "error": "rate limit exceeded"})
            );
            limited += 1;
        } else {
            r.expect_ok();
        }
    }
    assert!(limited >= 5, "only {limited} limited");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    api.call("vm/list", &[]).await.expect_ok();
    assert_eq!(h.state().calls["vm/list"], 11);
    h.set_rate_limit_qps(None);
    for _ in 0..10 {
        api.call("vm/list", &[]).await.expect_ok();
    }
    h.shutdown().await;
}

#[tokio::test]
async fn transitions_and_latency_take_time() {
    let (h, api) = sim(SimConfig {
        transition: Duration::from_millis(600).into(),
        latency: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .await;
    let vm = h.vms[0].id.clone();
    let t = Instant::now();
    let id = api.create("toronto", "v", "1").await;
    assert!(t.elapsed() >= Duration::from_millis(50));
    let status = |b: Value| b["volume"]["status"].as_str().unwrap().to_string();
    assert_eq!(
        status(
            api.call("volume/info", &[("volume_id", &id)])
                .await
                .expect_ok()
        ),
        "creating"
    );
    let msg = api
        .call(
            "volume/attach",
            &[("volume_id", &id), ("vm_id", &vm), ("target", "auto")],
        )
        .await
        .expect_err();
    assert_eq!(kind("volume/attach", &msg), K::State);
    tokio::time::sleep(Duration::from_millis(650)).await;
    assert_eq!(
        status(
            api.call("volume/info", &[("volume_id", &id)])
                .await
                .expect_ok()
        ),
        "available"
    );
    api.call(
        "volume/attach",
        &[("volume_id", &id), ("vm_id", &vm), ("target", "auto")],
    )
    .await
    .expect_ok();
    let b = api
        .call("volume/info", &[("volume_id", &id)])
        .await
        .expect_ok();
    assert_eq!(
        (
            b["volume"]["status"].as_str(),
            b["volume"]["attached"].as_str()
        ),
        (Some("attaching"), Some(""))
    );
    tokio::time::sleep(Duration::from_millis(650)).await;
    let b = api
        .call("volume/info", &[("volume_id", &id)])
        .await
        .expect_ok();
    assert_eq!(
        (
            b["volume"]["status"].as_str(),
            b["volume"]["attached"].as_str()
        ),
        (Some("in-use"), Some(vm.as_str()))
    );
    api.call("volume/detach", &[("volume_id", &id)])
        .await
        .expect_ok();
    assert_eq!(
        status(
            api.call("volume/info", &[("volume_id", &id)])
                .await
                .expect_ok()
        ),
        "detaching"
    );
    let sid = api
        .call(
            "volume/snapshot-create",
            &[("volume_id", &id), ("label", "s")],
        )
        .await;
    // A detaching volume cannot be snapshotted.
    assert_eq!(kind("x", &sid.expect_err()), K::State);
    tokio::time::sleep(Duration::from_millis(650)).await;
    let b = api
        .call("volume/info", &[("volume_id", &id)])
        .await
        .expect_ok();
    assert_eq!(
        (
            b["volume"]["status"].as_str(),
            b["volume"]["attached"].as_str()
        ),
        (Some("available"), Some(""))
    );
    let sid = api
        .call(
            "volume/snapshot-create",
            &[("volume_id", &id), ("label", "s")],
        )
        .await
        .expect_ok()["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    let snaps = api
        .call("volume/snapshot-list", &[("region", "toronto")])
        .await
        .expect_ok();
    assert_eq!(snaps["snapshots"][0]["status"], "pending");
    tokio::time::sleep(Duration::from_millis(650)).await;
    let _ = sid;
    assert_eq!(h.state().snapshots[0].status, "available");
    h.shutdown().await;
}

/// The bus of volume `id` as `/_sim/state` shows it.
fn bus_of(h: &SimHandle, id: &str) -> Option<String> {
    let st = h.state();
    let v = st
        .volumes
        .iter()
        .find(|v| v.id.to_string() == id)
        .expect("volume in state");
    v.bus.clone()
}

#[tokio::test]
async fn the_target_picks_the_bus_and_auto_the_vms() {
    // The default (likely) quirks: a VM that does not say has IDE disks.
    let (h, api) = sim(SimConfig {
        vms: vec![
            VmSpec {
                region: "toronto".into(),
                name: Some("ide-vm".into()),
            },
            VmSpec {
                region: "toronto".into(),
                name: Some("virtio-vm".into()),
            },
        ],
        vm_buses: vec![None, Some(Bus::Virtio)],
        ..SimConfig::default()
    })
    .await;
    let (ide_vm, virtio_vm) = (h.vms[0].id.clone(), h.vms[1].id.clone());
    assert_eq!((h.vms[0].bus, h.vms[1].bus), (Bus::Ide, Bus::Virtio));
    for (vm, target, want) in [
        (&ide_vm, "auto", "ide"),
        (&virtio_vm, "auto", "virtio"),
        (&ide_vm, "/dev/vda", "virtio"),
        (&virtio_vm, "/dev/vda", "virtio"),
        (&ide_vm, "/dev/sdb", "scsi"),
        (&virtio_vm, "/dev/hdc", "ide"),
    ] {
        let id = api.create("toronto", "v", "1").await;
        assert_eq!(bus_of(&h, &id), None);
        api.attach(&id, vm, target).await;
        assert_eq!(bus_of(&h, &id).as_deref(), Some(want), "{target} on {vm}");
        // The state over HTTP shows it too, and the VMs' buses.
        let raw: Value = serde_json::from_str(
            &reqwest::get(format!("http://{}/_sim/state", h.addr()))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        )
        .unwrap();
        let v = raw["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == id.parse::<u64>().unwrap())
            .unwrap();
        assert_eq!(v["bus"], want);
        assert_eq!(raw["vms"][0]["bus"], "ide");
        assert_eq!(raw["vms"][1]["bus"], "virtio");
        api.call("volume/detach", &[("volume_id", &id)])
            .await
            .expect_ok();
        assert_eq!(bus_of(&h, &id), None, "detach forgets the bus");
    }
    let id = api.create("toronto", "v", "1").await;
    let msg = api
        .call(
            "volume/attach",
            &[
                ("volume_id", &id),
                ("vm_id", &ide_vm),
                ("target", "/dev/fd0"),
            ],
        )
        .await
        .expect_err();
    assert_eq!(kind("volume/attach", &msg), K::Invalid, "{msg}");
    h.shutdown().await;

    // Without the ide-auto quirk (or with --auto-bus virtio), auto attaches on virtio.
    for cfg in [
        SimConfig {
            quirks: Quirks::NONE,
            ..SimConfig::default()
        },
        SimConfig {
            auto_bus: Some(Bus::Virtio),
            ..SimConfig::default()
        },
    ] {
        let (h, api) = sim(cfg).await;
        assert_eq!(h.vms[0].bus, Bus::Virtio);
        let id = api.create("toronto", "v", "1").await;
        api.attach(&id, &h.vms[0].id, "auto").await;
        assert_eq!(bus_of(&h, &id).as_deref(), Some("virtio"));
        h.shutdown().await;
    }
}

#[tokio::test]
async fn a_req_with_raw_utf8_is_refused_and_escaped_it_works() {
    let (h, api) = sim(SimConfig::default()).await;
    let creds = api.creds_json();
    // Raw UTF-8 ("é" and an emoji), correctly signed over its bytes: refused as the real
    // cloud refuses it, as a bad signature.
    let raw = format!(r#"{{"region":"toronto","label":"disque-é-😀","size":"1",{creds}}}"#);
    assert!(!raw.is_ascii());
    let msg = api.call_raw("volume/create", &raw).await.expect_err();
    assert_eq!(msg, lunanode_csi::sim::AUTH_ERROR);
    assert!(h.state().volumes.is_empty());
    // The same request with the characters escaped as \uXXXX (a surrogate pair for the
    // emoji), as PHP and Python send it: accepted, and the label has the real characters.
    let escaped = format!(
        r#"{{"region":"toronto","label":"disque-\u00e9-\ud83d\ude00","size":"1",{creds}}}"#
    );
    assert!(escaped.is_ascii());
    let id = api.call_raw("volume/create", &escaped).await.expect_ok()["volume_id"]
        .as_str()
        .unwrap()
        .to_string();
    let st = h.state();
    assert_eq!(st.volumes[0].label, "disque-é-😀");
    let info = api
        .call("volume/info", &[("volume_id", &id)])
        .await
        .expect_ok();
    assert_eq!(info["volume"]["name"], "disque-é-😀");
    // Any non-ASCII byte counts, wherever it is (here in a parameter name).
    let raw = format!(r#"{{"région":"x",{creds}}}"#);
    assert_eq!(
        api.call_raw("vm/list", &raw).await.expect_err(),
        lunanode_csi::sim::AUTH_ERROR
    );
    // The journal saw both, and which was ASCII.
    let creates: Vec<SimRequest> = h
        .requests()
        .into_iter()
        .filter(|r| r.handler == "volume/create")
        .collect();
    assert_eq!(
        creates.iter().map(|r| r.ascii).collect::<Vec<_>>(),
        [false, true]
    );
    assert_eq!(creates[0].param("label"), Some("disque-é-😀"));
    assert_eq!(creates[1].param("label"), Some("disque-é-😀"));
    h.shutdown().await;
}

#[tokio::test]
async fn old_rules_want_the_volumes_region() {
    let (h, api) = sim(SimConfig {
        quirks: "likely,old-rules".parse().unwrap(),
        ..two_regions()
    })
    .await;
    let vm = h.vms[0].id.clone();
    // volume/create always took region; it is unchanged.
    let id = api.create("toronto", "v", "1").await;
    let other = api.create("montreal", "m", "1").await;
    let region_not_set = |r: Reply, handler: &str| {
        let msg = r.expect_err();
        assert_eq!(msg, "region not set", "{handler}");
        assert_eq!(kind(handler, &msg), K::Invalid);
    };
    let calls: [(&str, Vec<(&str, &str)>); 7] = [
        ("volume/list", vec![]),
        ("volume/info", vec![("volume_id", &id)]),
        (
            "volume/attach",
            vec![("volume_id", &id), ("vm_id", &vm), ("target", "/dev/vda")],
        ),
        ("volume/detach", vec![("volume_id", &id)]),
        (
            "volume/snapshot-create",
            vec![("volume_id", &id), ("label", "s")],
        ),
        ("volume/extend", vec![("volume_id", &id), ("size", "2")]),
        ("volume/delete", vec![("volume_id", &id)]),
    ];
    for (handler, params) in &calls {
        // Without region: refused, whatever the volume's state.
        region_not_set(api.call(handler, params).await, handler);
        let mut empty = params.clone();
        empty.push(("region", ""));
        region_not_set(api.call(handler, &empty).await, handler);
        // A region the volume is not in: as if the volume did not exist there.
        if *handler != "volume/list" {
            let mut wrong = params.clone();
            wrong.push(("region", "montreal"));
            let msg = api.call(handler, &wrong).await.expect_err();
            assert_eq!(kind(handler, &msg), K::NotFound, "{handler}: {msg}");
            assert!(msg.contains("invalid volume"), "{msg}");
        }
        // With the volume's region: works.
        let mut with = params.clone();
        with.push(("region", "toronto"));
        let b = api.call(handler, &with).await.expect_ok();
        if *handler == "volume/list" {
            let vols = b["volumes"].as_array().unwrap();
            assert_eq!(vols.len(), 1, "only toronto's");
            assert_eq!(vols[0]["id"], id.as_str());
        }
    }
    assert!(h.state().volumes.iter().all(|v| v.id.to_string() != id));
    assert_eq!(h.state().snapshots.len(), 1);
    // The actions that always took region, and the rest, are as before.
    api.call("volume/snapshot-list", &[("region", "toronto")])
        .await
        .expect_ok();
    api.call("vm/list", &[]).await.expect_ok();
    api.call("image/list", &[]).await.expect_ok();
    api.call("volume/rename", &[("volume_id", &other), ("name", "n")])
        .await
        .expect_ok();
    // Off by default.
    h.set_quirks(Quirks::default());
    api.call("volume/info", &[("volume_id", &other)])
        .await
        .expect_ok();
    h.shutdown().await;
}

/// The list field `field` of a reply: an object keyed "0", "1", … (checked), as a list.
#[track_caller]
fn object_list(body: &Value, field: &str) -> Vec<Value> {
    let obj = body[field]
        .as_object()
        .unwrap_or_else(|| panic!("{field} is not an object: {body}"));
    (0..obj.len())
        .map(|i| {
            obj.get(&i.to_string())
                .unwrap_or_else(|| panic!("{field} lacks key {i}: {body}"))
                .clone()
        })
        .collect()
}

#[tokio::test]
async fn object_lists_are_keyed_in_order() {
    let (h, api) = sim(SimConfig {
        quirks: "likely,object-lists".parse().unwrap(),
        ..two_regions()
    })
    .await;
    let vm = h.vms[0].id.clone();
    // Empty lists are empty objects.
    let b = api.call("volume/list", &[]).await.expect_ok();
    assert_eq!(b["volumes"], json!({}));
    let ids: Vec<String> = create_many(&api, 12).await;
    let b = api.call("volume/list", &[]).await.expect_ok();
    let listed: Vec<String> = object_list(&b, "volumes")
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, ids, "keys follow the list's order");
    // In the text too: "2" before "10".
    let req = api.req_json(&[]);
    let nonce = "1800000000";
    let resp = api
        .http
        .post(format!("{}volume/list/", api.url))
        .form(&[
            ("req", req.as_str()),
            ("signature", &sign(&api.key, "volume/list/", &req, nonce)),
            ("nonce", nonce),
        ])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (two, ten) = (
        resp.find(r#""2":"#).unwrap(),
        resp.find(r#""10":"#).unwrap(),
    );
    assert!(two < ten, "{resp}");

    api.attach(&ids[0], &vm, "/dev/vda").await;
    let info = api.call("vm/info", &[("vm_id", &vm)]).await.expect_ok();
    let vols = object_list(&info["info"], "volumes");
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0]["id"], ids[0].as_str());
    let vms = object_list(&api.call("vm/list", &[]).await.expect_ok(), "vms");
    assert_eq!(
        vms.iter().map(|v| v["vm_id"].clone()).collect::<Vec<_>>(),
        [json!(h.vms[0].id), json!(h.vms[1].id)]
    );
    let mut sids = Vec::new();
    for (i, id) in ids.iter().take(2).enumerate() {
        let label = format!("s{i}");
        let b = api
            .call(
                "volume/snapshot-create",
                &[("volume_id", id), ("label", &label)],
            )
            .await
            .expect_ok();
        sids.push(b["snapshot_id"].as_str().unwrap().to_string());
    }
    let snaps = object_list(
        &api.call("volume/snapshot-list", &[("region", "toronto")])
            .await
            .expect_ok(),
        "snapshots",
    );
    let mut listed: Vec<String> = snaps
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    sids.sort();
    assert_eq!(listed, sids);
    let mut images = Vec::new();
    for name in ["a", "b"] {
        let b = api
            .call(
                "volume/snapshot-replicate",
                &[
                    ("region", "toronto"),
                    ("snapshot_id", &sids[0]),
                    ("image_name", name),
                    ("dst_region", "roubaix"),
                ],
            )
            .await
            .expect_ok();
        images.push(b["image_id"].clone());
    }
    let imgs = object_list(&api.call("image/list", &[]).await.expect_ok(), "images");
    assert_eq!(
        imgs.iter()
            .map(|i| i["image_id"].clone())
            .collect::<Vec<_>>(),
        images
    );
    // Off: arrays again.
    h.set_quirks(Quirks::default());
    let b = api.call("volume/list", &[]).await.expect_ok();
    assert_eq!(b["volumes"].as_array().unwrap().len(), 12);
    h.shutdown().await;
}

/// Create `n` volumes in toronto, one after another; their IDs in order.
async fn create_many(api: &Api, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(api.create("toronto", &format!("v{i}"), "1").await);
    }
    ids
}

#[tokio::test]
async fn list_and_info_use_their_own_words() {
    let (h, api) = sim(SimConfig {
        transition: Duration::from_millis(300).into(),
        ..SimConfig::default()
    })
    .await;
    let vm = h.vms[0].id.clone();
    let listed = |b: Value| {
        let v = &b["volumes"][0];
        (
            v["status"].as_str().unwrap().to_string(),
            v["attached"].as_str().unwrap().to_string(),
        )
    };
    let info = |b: Value| {
        let v = &b["volume"];
        (
            v["status"].as_str().unwrap().to_string(),
            v["attached"].as_str().unwrap().to_string(),
        )
    };
    let both = async |id: &str| {
        (
            listed(api.call("volume/list", &[]).await.expect_ok()),
            info(
                api.call("volume/info", &[("volume_id", id)])
                    .await
                    .expect_ok(),
            ),
        )
    };
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    let id = api.create("toronto", "v", "1").await;
    // Transitional statuses are the same in both.
    assert_eq!(both(&id).await, (s("creating", ""), s("creating", "")));
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(both(&id).await, (s("active", ""), s("available", "")));
    api.attach(&id, &vm, "/dev/vda").await;
    assert_eq!(both(&id).await, (s("attaching", ""), s("attaching", "")));
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(both(&id).await, (s("active", &vm), s("in-use", &vm)));
    api.call("volume/detach", &[("volume_id", &id)])
        .await
        .expect_ok();
    assert_eq!(both(&id).await, (s("detaching", &vm), s("detaching", &vm)));
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(both(&id).await, (s("active", ""), s("available", "")));
    // Without the quirk the list uses info's words.
    h.set_quirks(Quirks::NONE);
    assert_eq!(both(&id).await, (s("available", ""), s("available", "")));
    h.shutdown().await;
}

#[tokio::test]
async fn image_delete_of_a_missing_image_succeeds() {
    for quirks in [Quirks::NONE, Quirks::default()] {
        let (h, api) = sim(SimConfig {
            quirks,
            ..SimConfig::default()
        })
        .await;
        for image in ["5", "141129", "not-a-number"] {
            api.call("image/delete", &[("image_id", image)])
                .await
                .expect_ok();
        }
        // A real one is deleted, and deleting it again succeeds too.
        let id = api.create("toronto", "v", "1").await;
        let sid = api
            .call(
                "volume/snapshot-create",
                &[("volume_id", &id), ("label", "s")],
            )
            .await
            .expect_ok()["snapshot_id"]
            .as_str()
            .unwrap()
            .to_string();
        let img = api
            .call(
                "volume/snapshot-replicate",
                &[
                    ("region", "toronto"),
                    ("snapshot_id", &sid),
                    ("image_name", "i"),
                    ("dst_region", "montreal"),
                ],
            )
            .await
            .expect_ok()["image_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(h.state().images.len(), 1);
        for _ in 0..2 {
            api.call("image/delete", &[("image_id", &img)])
                .await
                .expect_ok();
            assert!(h.state().images.is_empty());
        }
        // The parameter is still required.
        let msg = api.call("image/delete", &[]).await.expect_err();
        assert_eq!(kind("image/delete", &msg), K::Invalid, "{msg}");
        h.shutdown().await;
    }
}

#[tokio::test]
async fn the_journal_records_every_request_without_credentials() {
    let (h, api) = sim(SimConfig::default()).await;
    let vm = h.vms[0].id.clone();
    let id = api.create("toronto", "v", "1").await;
    api.attach(&id, &vm, "/dev/vda").await;
    // A refused signature and an injected fault are recorded too.
    let req = api.req_json(&[("volume_id", &id)]);
    api.post("volume/detach", &req, &"0".repeat(128), "1")
        .await
        .expect_err();
    h.set_fault_kinds(&[lunanode_csi::sim::FaultKind::Http500]);
    h.set_fault_rate(1.0);
    assert_eq!(
        api.call("volume/info", &[("volume_id", &id)]).await.status,
        500
    );
    h.set_fault_rate(0.0);
    // A body that is not a request at all.
    let r = api
        .http
        .post(format!("{}vm/list/", api.url))
        .body("garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    let got = h.requests();
    let handlers: Vec<&str> = got.iter().map(|r| r.handler.as_str()).collect();
    assert_eq!(
        handlers,
        [
            "volume/create",
            "volume/attach",
            "volume/detach",
            "volume/info",
            "vm/list"
        ]
    );
    assert!(got.iter().all(|r| r.ascii));
    let attach = &got[1];
    assert_eq!(
        attach.params,
        [
            ("target", "/dev/vda"),
            ("vm_id", vm.as_str()),
            ("volume_id", id.as_str())
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into_iter()
        .collect()
    );
    assert_eq!(got[0].param("label"), Some("v"));
    assert_eq!(got[2].param("volume_id"), Some(id.as_str()));
    assert!(got[4].params.is_empty());
    for r in &got {
        assert!(
            !r.params.contains_key("api_id") && !r.params.contains_key("api_partialkey"),
            "{r:?}"
        );
    }
    // The same over HTTP, with no secret in it.
    let text = reqwest::get(format!("http://{}/_sim/requests", h.addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let served: Vec<SimRequest> = serde_json::from_str(&text).unwrap();
    assert_eq!(served, got);
    let zeros = "0".repeat(128);
    for secret in [api.id.as_str(), &api.key[..64], &zeros] {
        assert!(!text.contains(secret), "a secret in the journal");
    }
    // Counters reset without the journal; clearing empties it.
    h.reset_counters();
    assert_eq!(h.requests().len(), 5);
    h.clear_requests();
    assert!(h.requests().is_empty());
    api.call("vm/list", &[]).await.expect_ok();
    assert_eq!(h.requests().len(), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn faults_credentials_and_transitions_change_over_http_while_running() {
    let (h, api) = sim(SimConfig::default()).await;
    let vm = h.vms[0].id.clone();
    let control = format!("http://{}/_sim/faults", h.addr());
    let set = |body: Value| {
        let (http, control) = (api.http.clone(), control.clone());
        async move {
            let r = http
                .post(control)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (
                status,
                serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap(),
            )
        }
    };

    // A bad key, as the cloud answers it, and back.
    let (status, now) = set(json!({"refuse_credentials": true})).await;
    assert_eq!(status, 200, "{now}");
    assert_eq!(now["refuse_credentials"], true);
    let err = api.call("vm/list", &[]).await.expect_err();
    assert_eq!(err, lunanode_csi::sim::AUTH_ERROR);
    assert!(matches!(
        ApiError::from_cloud_message("vm/list", &err),
        ApiError::Signature { .. }
    ));
    set(json!({"refuse_credentials": false})).await;
    api.call("vm/list", &[]).await.expect_ok();

    // Every request a 5xx of the chosen kinds; a field left out keeps its setting.
    let (_, now) = set(json!({"fault_rate": 1.0, "fault_kinds": ["http500", "http503"]})).await;
    assert_eq!(now["fault_kinds"], json!(["http500", "http503"]));
    for _ in 0..6 {
        let r = api.call("vm/list", &[]).await;
        assert!([500, 503].contains(&r.status), "{r:?}");
    }
    let (_, now) = set(json!({"rate_limit_qps": 1})).await;
    assert_eq!(now["fault_rate"], 1.0);
    set(json!({"fault_rate": 0})).await;
    // The rate limit: the second request within a second is throttled; 0 lifts it.
    let statuses = [
        api.call("vm/list", &[]).await.status,
        api.call("vm/list", &[]).await.status,
    ];
    assert_eq!(statuses, [200, 429]);
    let (_, now) = set(json!({"rate_limit_qps": 0})).await;
    assert_eq!(now["rate_limit_qps"], Value::Null);
    for _ in 0..3 {
        api.call("vm/list", &[]).await.expect_ok();
    }

    // A transition that never completes (for changes started from now on): others stay
    // instant.
    set(json!({"transition_ms": ["attach=3600000"]})).await;
    let id = api.create("toronto", "stuck", "1").await;
    let info = |id: String| {
        let api = &api;
        async move {
            let b = api
                .call("volume/info", &[("volume_id", &id)])
                .await
                .expect_ok();
            b["volume"]["status"].as_str().unwrap().to_string()
        }
    };
    assert_eq!(info(id.clone()).await, "available");
    api.attach(&id, &vm, "/dev/vda").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(info(id.clone()).await, "attaching");

    // Nothing is changed by a request that is not understood.
    for bad in [
        json!({"fault_rate": 2}),
        json!({"fault_kinds": ["http-418"]}),
        json!({"rate_limit_qps": -1}),
        json!({"transition_ms": ["attach=soon"]}),
        json!({"refuse_credential": true}),
    ] {
        let (status, body) = set(bad.clone()).await;
        assert_eq!(status, 400, "{bad} -> {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    api.call("vm/list", &[]).await.expect_ok();
    h.shutdown().await;
}
