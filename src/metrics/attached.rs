//! `lunanode_vm_volumes_attached`: how many volumes the cloud says are attached to each VM.
//!
//! The controller never asks for this: it is what the replies the driver gets anyway say.
//! A `volume/list` of the whole account (every CreateVolume's lookup by name, shared waits,
//! ListVolumes) replaces the picture; each `volume/info` (every attach and detach ends with
//! one) and each delete updates one volume in it. So the count is the cloud's own, volumes
//! attached outside Kubernetes included, as of the last list, kept current by the driver's
//! own attaches and detaches in between; a volume attached behind the driver's back shows at
//! the next list. Nothing is reported until one whole list has been seen: counts made from
//! `volume/info` alone would leave out every volume the driver has not touched.
//!
//! A VM keeps its series (at 0) once seen with a volume, so a detach reads as a drop to 0,
//! not as a series that vanished. Label: `node_id`, the VM's ID, which is the CSI node ID
//! of a Kubernetes node on that VM (the same label as `csi_node_max_volumes`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::lunanode::Volume;

const NAME: &str = "lunanode_vm_volumes_attached";
const HELP: &str = "Volumes attached (or attaching, or detaching) to a VM, as the cloud's last volume/list showed them and later volume/info replies and deletes updated them, by node_id (the VM's ID); absent until a whole volume/list was seen";

#[derive(Debug, Default)]
struct State {
    /// Volume ID to the VM it is attached to; `None` until a whole list was seen.
    volumes: Option<HashMap<u64, String>>,
    /// Every VM seen with a volume attached.
    vms: BTreeSet<String>,
}

/// The picture, shared between the client's hooks and the registry.
#[derive(Debug, Default)]
pub struct Attachments(Mutex<State>);

impl Attachments {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cloud listed `volumes`; `complete`: all of the account's.
    pub fn listed(&self, volumes: &[Volume], complete: bool) {
        let mut s = self.state();
        if complete {
            s.volumes = Some(HashMap::new());
        }
        for v in volumes {
            s.update(v);
        }
    }

    /// The cloud described one volume.
    pub fn seen(&self, volume: &Volume) {
        self.state().update(volume);
    }

    /// The volume was deleted.
    pub fn deleted(&self, volume_id: u64) {
        if let Some(map) = self.state().volumes.as_mut() {
            map.remove(&volume_id);
        }
    }

    /// Volumes per VM, every VM seen included; `None` before a whole list.
    pub fn counts(&self) -> Option<BTreeMap<String, i64>> {
        let s = self.state();
        let map = s.volumes.as_ref()?;
        let mut counts: BTreeMap<String, i64> = s.vms.iter().map(|vm| (vm.clone(), 0)).collect();
        for vm in map.values() {
            *counts.entry(vm.clone()).or_default() += 1;
        }
        Some(counts)
    }
}

impl State {
    fn update(&mut self, v: &Volume) {
        let Some(map) = self.volumes.as_mut() else {
            return;
        };
        match v.attached_vm() {
            Some(vm) => {
                map.insert(v.id, vm.to_string());
                if !self.vms.contains(vm) {
                    self.vms.insert(vm.to_string());
                }
            }
            None => {
                map.remove(&v.id);
            }
        }
    }
}

impl Collector for Attachments {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(counts) = self.counts() else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(NAME, HELP, None, MetricType::Gauge)?;
        for (vm, n) in &counts {
            let labels = [("node_id", vm.as_str())];
            ConstGauge::new(*n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(id: u64, vm: &str) -> Volume {
        Volume {
            id,
            identification: String::new(),
            name: format!("v{id}"),
            region: "toronto".into(),
            size: 1,
            status: if vm.is_empty() { "available" } else { "in-use" }.into(),
            attached: vm.into(),
            created: String::new(),
            time_created: String::new(),
        }
    }

    fn counts(a: &Attachments) -> Vec<(String, i64)> {
        a.counts().unwrap().into_iter().collect()
    }

    #[test]
    fn nothing_before_a_whole_list_then_the_clouds_picture_kept_current() {
        let a = Attachments::default();
        // volume/info and region lists alone never make a count.
        a.seen(&vol(1, "vm-a"));
        a.listed(&[vol(2, "vm-a")], false);
        assert_eq!(a.counts(), None);
        a.listed(
            &[vol(1, "vm-a"), vol(2, "vm-a"), vol(3, "vm-b"), vol(4, "")],
            true,
        );
        assert_eq!(counts(&a), [("vm-a".into(), 2), ("vm-b".into(), 1)]);
        // An attach seen through volume/info, a detach, a delete.
        a.seen(&vol(4, "vm-b"));
        a.seen(&vol(3, ""));
        a.deleted(1);
        assert_eq!(counts(&a), [("vm-a".into(), 1), ("vm-b".into(), 1)]);
        a.seen(&vol(4, ""));
        assert_eq!(counts(&a), [("vm-a".into(), 1), ("vm-b".into(), 0)]);
        // The next whole list is the truth: a volume attached behind the driver's back shows,
        // one that is gone is dropped.
        a.listed(&[vol(2, "vm-a"), vol(5, "vm-a"), vol(6, "vm-c")], true);
        assert_eq!(
            counts(&a),
            [("vm-a".into(), 2), ("vm-b".into(), 0), ("vm-c".into(), 1)]
        );
    }

    #[test]
    fn encodes_a_gauge_per_vm() {
        let a = std::sync::Arc::new(Attachments::default());
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(a.clone()));
        let text = |r: &prometheus_client::registry::Registry| {
            let mut out = String::new();
            prometheus_client::encoding::prometheus_text::encode(&mut out, r).unwrap();
            out
        };
        assert!(!text(&r).contains(NAME), "{}", text(&r));
        a.listed(&[vol(1, "vm-a"), vol(2, "vm-a")], true);
        let out = text(&r);
        assert!(
            out.contains("# TYPE lunanode_vm_volumes_attached gauge"),
            "{out}"
        );
        assert!(
            out.lines()
                .any(|l| l == r#"lunanode_vm_volumes_attached{node_id="vm-a"} 2"#),
            "{out}"
        );
    }
}
