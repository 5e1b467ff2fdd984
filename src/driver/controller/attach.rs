//! ControllerPublishVolume and ControllerUnpublishVolume: attach and detach.

use std::collections::HashMap;

use super::Inner;
use super::wait::{Deadline, WaitKind};
use crate::csi::*;
use crate::driver::error::Error;
use crate::driver::node::{CTX_IDENTIFICATION, CTX_SERIAL, CTX_SIZE_BYTES};
use crate::driver::validate;
use crate::lunanode::{ApiError, Readiness, Volume as CloudVolume};

/// What the node needs to find and verify the disk. The full identification goes with the
/// 20-character serial because SCSI disks carry serials up to 36 characters long.
fn publish_context(vol: &CloudVolume) -> HashMap<String, String> {
    HashMap::from([
        (CTX_SERIAL.to_string(), vol.serial().to_string()),
        (CTX_IDENTIFICATION.to_string(), vol.identification.clone()),
        (
            CTX_SIZE_BYTES.to_string(),
            validate::bytes(vol.size).to_string(),
        ),
    ])
}

/// Transitional statuses: the volume is busy and the caller should retry.
fn in_transition(vol: &CloudVolume) -> bool {
    vol.readiness() == Readiness::Pending
}

impl Inner {
    /// The region of a VM, or NOT_FOUND.
    async fn vm_region(&self, vm_id: &str) -> Result<String, Error> {
        if let Some(r) = self.vm_regions.lock().expect("vm cache").get(vm_id) {
            return Ok(r.clone());
        }
        let vm = match self.client.vm_info(vm_id).await {
            Ok(vm) => vm,
            Err(ApiError::NotFound { .. }) => {
                return Err(Error::NotFound(format!(
                    "node {vm_id} is not a Luna Node VM on this account"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        self.vm_regions
            .lock()
            .expect("vm cache")
            .insert(vm_id.to_string(), vm.region.clone());
        Ok(vm.region)
    }

    pub(super) async fn publish(
        &self,
        r: &ControllerPublishVolumeRequest,
        deadline: Deadline,
    ) -> Result<ControllerPublishVolumeResponse, Error> {
        validate::required("volume_id", &r.volume_id)?;
        validate::required("node_id", &r.node_id)?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Error::invalid("volume_capability is required"))?;
        validate::capability(cap).map_err(Error::InvalidArgument)?;
        if r.readonly {
            // PUBLISH_READONLY is not offered: the cloud attaches read-write only.
            return Err(Error::invalid(
                "readonly publishing is not supported (no PUBLISH_READONLY capability); mount read-only on the node instead",
            ));
        }
        let _guard = self.lock_volume(&r.volume_id)?;
        let (vref, vol) = self.volume_or_not_found(&r.volume_id).await?;
        let node = r.node_id.as_str();
        let vm_region = self.vm_region(node).await?;
        if !vm_region.is_empty() && vm_region != vref.region {
            return Err(Error::FailedPrecondition(format!(
                "volume {vref} is in region {} but node {node} is in {vm_region}; a volume attaches only to VMs in its region",
                vref.region
            )));
        }
        // Whether this call starts the attach (else it joins one under way).
        let mut fresh = false;
        match vol.attached_vm() {
            Some(vm) if vm == node && vol.status == "in-use" => {
                return Ok(ControllerPublishVolumeResponse {
                    publish_context: publish_context(&vol),
                });
            }
            Some(vm) if vm == node && vol.status == "detaching" => {
                return Err(Error::Aborted(format!(
                    "volume {vref} is still detaching from node {vm}; retry once it is detached"
                )));
            }
            Some(vm) if vm == node => {} // attaching: wait below
            Some(vm) => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {vref} is attached to node {vm}; it must be unpublished there first (single-node access)"
                )));
            }
            None if in_transition(&vol) => {
                return Err(super::busy(&vref, &vol));
            }
            None if vol.readiness() == Readiness::Failed => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {vref} is in status {:?} and cannot be attached",
                    vol.status
                )));
            }
            None => {
                fresh = true;
                let target = &self.cfg.attach_target;
                if let Err(e) = self.client.volume_attach(vref.id, node, target).await {
                    fresh = false;
                    // After a lost reply the repeat is refused as "already attached": check.
                    let now = self.client.volume_info(vref.id).await?;
                    if now.attached_vm() != Some(node) {
                        return Err(match e {
                            ApiError::WrongState { .. } => Error::Aborted(format!(
                                "volume {vref} or node {node} is busy: {e}; retry shortly"
                            )),
                            ApiError::NotFound { .. } => Error::NotFound(format!(
                                "attaching volume {vref} to node {node} failed: {e}"
                            )),
                            other => other.into(),
                        });
                    }
                }
            }
        }
        let what = format!("volume {vref} to attach to node {node}");
        let kind = WaitKind::Attach;
        let vol = self
            .waits
            .until(kind, fresh, deadline, &what, || async {
                let v = self.poll_volume(vref.id, true).await?;
                match v.attached_vm() {
                    Some(vm) if vm == node && v.status == "in-use" => Ok(Some(v)),
                    Some(vm) if vm != node => Err(Error::FailedPrecondition(format!(
                        "volume {vref} was attached to node {vm} meanwhile"
                    ))),
                    _ if v.readiness() == Readiness::Failed => Err(Error::Internal(format!(
                        "attaching volume {vref} failed: status {:?}",
                        v.status
                    ))),
                    _ => Ok(None),
                }
            })
            .await?;
        Ok(ControllerPublishVolumeResponse {
            publish_context: publish_context(&vol),
        })
    }

    pub(super) async fn unpublish(
        &self,
        r: &ControllerUnpublishVolumeRequest,
        deadline: Deadline,
    ) -> Result<ControllerUnpublishVolumeResponse, Error> {
        validate::required("volume_id", &r.volume_id)?;
        let _guard = self.lock_volume(&r.volume_id)?;
        let Some((vref, vol)) = self.find_volume(&r.volume_id).await? else {
            return Ok(ControllerUnpublishVolumeResponse {});
        };
        let node = r.node_id.as_str();
        let attached_here = |v: &CloudVolume| {
            v.attached_vm()
                .is_some_and(|vm| node.is_empty() || vm == node)
        };
        if !attached_here(&vol) {
            // An attach in flight may not name its VM yet: answering OK now would leave the
            // volume attached behind the CO's back once it completes.
            if vol.attached_vm().is_none() && in_transition(&vol) {
                return Err(super::busy(&vref, &vol));
            }
            return Ok(ControllerUnpublishVolumeResponse {});
        }
        let mut fresh = false;
        if vol.status != "detaching" {
            fresh = true;
            if let Err(e) = self.client.volume_detach(vref.id).await {
                fresh = false;
                let now = self.client.volume_info(vref.id).await?;
                if attached_here(&now) && now.status != "detaching" {
                    return Err(match e {
                        ApiError::WrongState { .. } => {
                            Error::Aborted(format!("volume {vref} is busy: {e}; retry shortly"))
                        }
                        other => other.into(),
                    });
                }
            }
        }
        let what = format!("volume {vref} to detach");
        let kind = WaitKind::Detach;
        self.waits
            .until(kind, fresh, deadline, &what, || async {
                match self.poll_volume(vref.id, true).await {
                    Ok(v) => Ok((!attached_here(&v) || v.attached_vm().is_none())
                        .then_some(())
                        .filter(|_| v.status != "detaching")),
                    Err(ApiError::NotFound { .. }) => Ok(Some(())),
                    Err(e) => Err(e.into()),
                }
            })
            .await?;
        Ok(ControllerUnpublishVolumeResponse {})
    }
}
