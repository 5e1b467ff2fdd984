//! CreateVolume, DeleteVolume, ControllerExpandVolume, ControllerGetVolume, ListVolumes and
//! ValidateVolumeCapabilities.

use std::collections::HashMap;
use std::sync::Arc;

use super::wait::{Deadline, WaitKind};
use super::{Inner, intents};
use crate::csi::volume_content_source::Type as Source;
use crate::csi::*;
use crate::driver::error::Error;
use crate::driver::ids::{SnapshotRef, VolumeRef};
use crate::driver::validate::{self, Access};
use crate::lunanode::{ApiError, CreateSource, Image, Readiness, Volume as CloudVolume};

/// StorageClass parameters the driver understands. Keys the external-provisioner adds
/// (`csi.storage.k8s.io/…`, with --extra-create-metadata) are accepted and ignored.
const PARAMETERS: &[&str] = &["region"];

fn check_parameters(params: &HashMap<String, String>) -> Result<(), Error> {
    for key in params.keys() {
        if !PARAMETERS.contains(&key.as_str()) && !key.starts_with("csi.storage.k8s.io/") {
            return Err(Error::invalid(format!(
                "unknown parameter {key:?}; supported StorageClass parameters: {}",
                PARAMETERS.join(", ")
            )));
        }
    }
    Ok(())
}

/// Whether an existing volume's region satisfies a retried request whose preferred region
/// changed: with no StorageClass region, any region the topology requires will do.
fn region_acceptable(r: &CreateVolumeRequest, region: &str) -> bool {
    if r.parameters.get("region").is_some_and(|p| !p.is_empty()) {
        return false;
    }
    r.accessibility_requirements.as_ref().is_some_and(|t| {
        t.requisite
            .iter()
            .any(|s| s.segments.get(crate::TOPOLOGY_KEY).map(String::as_str) == Some(region))
    })
}

/// Where the volume of a CreateVolume goes: the StorageClass `region`, else the topology
/// (preferred first, then requisite), else the default region.
fn choose_region(inner: &Inner, r: &CreateVolumeRequest) -> Result<String, Error> {
    let key = crate::TOPOLOGY_KEY;
    let topo = r.accessibility_requirements.as_ref();
    let requisite: Vec<&str> = topo
        .map(|t| {
            t.requisite
                .iter()
                .filter_map(|s| s.segments.get(key).map(String::as_str))
                .collect()
        })
        .unwrap_or_default();
    let region = if let Some(region) = r.parameters.get("region").filter(|s| !s.is_empty()) {
        if !requisite.is_empty() && !requisite.contains(&region.as_str()) {
            return Err(Error::ResourceExhausted(format!(
                "the StorageClass asks for region {region} but the volume must be reachable from {}; fix the StorageClass or the pod's node selection",
                requisite.join(", ")
            )));
        }
        region.clone()
    } else if let Some(region) = topo.and_then(|t| {
        t.preferred
            .iter()
            .chain(t.requisite.iter())
            .find_map(|s| s.segments.get(key))
    }) {
        region.clone()
    } else {
        inner.cfg.default_region.clone()
    };
    if !inner.cfg.regions.iter().any(|r| r == &region) {
        return Err(Error::invalid(format!(
            "region {region:?} is not one the driver manages ({})",
            inner.cfg.regions.join(", ")
        )));
    }
    Ok(region)
}

fn csi_volume(
    vol: &CloudVolume,
    region: &str,
    source: Option<VolumeContentSource>,
) -> crate::csi::Volume {
    crate::csi::Volume {
        capacity_bytes: validate::bytes(vol.size),
        volume_id: VolumeRef {
            region: region.to_string(),
            id: vol.id,
        }
        .to_string(),
        volume_context: HashMap::new(),
        content_source: source,
        accessible_topology: Inner::topology(region),
    }
}

fn condition(vol: &CloudVolume) -> VolumeCondition {
    match vol.readiness() {
        Readiness::Failed => VolumeCondition {
            abnormal: true,
            message: format!(
                "the cloud reports volume status {:?}; contact Luna Node support or restore from a snapshot",
                vol.status
            ),
        },
        _ => VolumeCondition {
            abnormal: false,
            message: format!("volume status {}", vol.status),
        },
    }
}

impl Inner {
    /// Look a volume up by ID; an ID that does not parse, or that names a volume in another
    /// region, names nothing.
    pub(super) async fn find_volume(
        &self,
        id: &str,
    ) -> Result<Option<(VolumeRef, CloudVolume)>, Error> {
        let Ok(vref) = id.parse::<VolumeRef>() else {
            return Ok(None);
        };
        match self.client.volume_info(vref.id).await {
            Ok(v) if !v.region.is_empty() && v.region != vref.region => Ok(None),
            Ok(v) => Ok(Some((vref, v))),
            Err(ApiError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn volume_or_not_found(
        &self,
        id: &str,
    ) -> Result<(VolumeRef, CloudVolume), Error> {
        validate::required("volume_id", id)?;
        self.find_volume(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))
    }

    /// A waiting volume's status: while other volumes are waited for too (and sharing is
    /// on, and the account's list is not much longer than the waiters it answers), from a
    /// `volume/list` shared with them (one call answers every waiter whose poll is due while
    /// a list is being sent: ~45% fewer API calls per wait at 50 concurrent waits in the
    /// benchmark), else `volume/info`. `attachment`: the caller needs to know whether the
    /// volume is attached (`in-use`) or not, which a list item in the list's own words
    /// (`active`) does not say.
    pub(super) async fn poll_volume(
        &self,
        id: u64,
        attachment: bool,
    ) -> Result<CloudVolume, ApiError> {
        if !self.waits.share_volume_list() {
            return self.client.volume_info(id).await;
        }
        let all = self.client.volume_list_shared().await?;
        self.waits.listed(all.len());
        let v = all
            .iter()
            .find(|v| v.id == id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound {
                action: "volume/list".into(),
                message: format!("volume {id} not found"),
            })?;
        // Which fields the real cloud's list items carry is undocumented: an attached volume
        // whose item names no VM is asked about directly rather than waited on forever. And
        // the list has its own word for a settled volume (`active`, where `volume/info` says
        // `available` or `in-use`; `shared/lunanode-api.md`), so a wait on an attachment
        // asks `volume/info` once the list shows the volume settled.
        // A load first: every poll of a settled volume passes here, and only the first
        // needs the write.
        let seen = &self.list_words_seen;
        if v.status == "active"
            && !seen.load(std::sync::atomic::Ordering::Relaxed)
            && !seen.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(
                volume_id = id,
                "volume/list calls a settled volume `active` where volume/info says `available` or `in-use` (the two vocabularies the API docs show); waits on an attachment confirm with volume/info"
            );
        }
        if (v.status == "in-use" && v.attached_vm().is_none())
            || (attachment && v.status == "active")
        {
            return self.client.volume_info(id).await;
        }
        Ok(v)
    }

    /// The volume labelled `name`, if any. Lookups share one in-flight `volume/list`.
    async fn volume_by_label(&self, name: &str) -> Result<Option<CloudVolume>, Error> {
        let all = self.client.volume_list_shared().await?;
        self.waits.listed(all.len());
        let mut found: Vec<&CloudVolume> = all.iter().filter(|v| v.name == name).collect();
        found.sort_by_key(|v| v.id);
        if found.len() > 1 {
            tracing::warn!(name, ids = ?found.iter().map(|v| v.id).collect::<Vec<_>>(), "several volumes carry this name; using the oldest");
        }
        Ok(found.first().map(|v| (*v).clone()))
    }

    /// Wait for a volume to be usable. A volume that fails is deleted, so a retry starts
    /// clean and nothing leaks. `fresh`: this call has just created it.
    async fn wait_available(
        &self,
        vref: &VolumeRef,
        kind: WaitKind,
        fresh: bool,
        deadline: Deadline,
    ) -> Result<CloudVolume, Error> {
        let what = format!("volume {vref} to become available");
        let vol = self.waits.until(kind, fresh, deadline, &what, || async {
            let v = match self.poll_volume(vref.id, false).await {
                Ok(v) => v,
                // NOT_FOUND would tell the CO the request's source is missing (final).
                Err(ApiError::NotFound { .. }) => {
                    return Err(Error::Unavailable(format!(
                        "volume {vref} disappeared while waiting for it; retry to create it again"
                    )));
                }
                Err(e) => return Err(e.into()),
            };
            Ok(match v.readiness() {
                Readiness::Pending => None,
                _ => Some(v),
            })
        })
        .await?;
        if vol.readiness() == Readiness::Failed {
            let cleanup = match self.client.volume_delete(vref.id).await {
                Ok(()) | Err(ApiError::NotFound { .. }) => "it was deleted".to_string(),
                Err(e) => format!("deleting it failed too ({e}); delete it by hand"),
            };
            return Err(Error::Internal(format!(
                "volume {vref} ended in status {:?} in the cloud; {cleanup}; retry to create a new one",
                vol.status
            )));
        }
        Ok(vol)
    }

    pub(super) async fn create_volume(
        &self,
        r: &CreateVolumeRequest,
        deadline: Deadline,
    ) -> Result<CreateVolumeResponse, Error> {
        validate::name("name", &r.name)?;
        validate::capabilities(&r.volume_capabilities)?;
        check_parameters(&r.parameters)?;
        let cfg = &self.cfg;
        let size_gb = validate::size_gb(
            r.capacity_range.as_ref(),
            cfg.default_size_gb,
            cfg.min_size_gb,
            cfg.max_size_gb,
        )?;
        let region = choose_region(self, r)?;
        let _guard = self.inflight.lock(
            &format!("name:{}", r.name),
            &format!("volume name {}", r.name),
        )?;

        let source = match r.volume_content_source.as_ref().map(|s| s.r#type.as_ref()) {
            None => None,
            Some(None) => {
                return Err(Error::invalid(
                    "volume_content_source has no snapshot or volume",
                ));
            }
            Some(Some(s)) => Some(s.clone()),
        };

        // Idempotency: a volume with this name is the answer, if it fits the request.
        if let Some(existing) = self.volume_by_label(&r.name).await? {
            return self
                .adopt_existing(r, existing, &region, size_gb, deadline)
                .await;
        }

        let vol = match &source {
            None => {
                self.create_and_wait(&r.name, &region, size_gb, None, deadline)
                    .await?
            }
            Some(Source::Snapshot(s)) => {
                self.create_from_snapshot(&r.name, &region, size_gb, &s.snapshot_id, deadline)
                    .await?
            }
            Some(Source::Volume(v)) => {
                self.clone_volume(&r.name, &region, size_gb, &v.volume_id, deadline)
                    .await?
            }
        };
        Ok(CreateVolumeResponse {
            volume: Some(csi_volume(&vol, &region, r.volume_content_source.clone())),
        })
    }

    /// A volume with the requested name already exists: return it when compatible (after
    /// finishing what an interrupted call left undone), else ALREADY_EXISTS.
    async fn adopt_existing(
        &self,
        r: &CreateVolumeRequest,
        existing: CloudVolume,
        region: &str,
        size_gb: u64,
        deadline: Deadline,
    ) -> Result<CreateVolumeResponse, Error> {
        let have = validate::bytes(existing.size);
        let (required, limit) = r
            .capacity_range
            .as_ref()
            .map_or((0, 0), |c| (c.required_bytes, c.limit_bytes));
        let vref = VolumeRef {
            region: if existing.region.is_empty() {
                region.to_string()
            } else {
                existing.region.clone()
            },
            id: existing.id,
        };
        if vref.region != region && !region_acceptable(r, &vref.region) {
            return Err(Error::AlreadyExists(format!(
                "volume {vref} named {:?} already exists in region {}, not {region}",
                r.name, vref.region
            )));
        }
        let fits = |bytes: i64| bytes >= required && (limit == 0 || bytes <= limit);
        // A restore to a larger size may have been cut short before the extend.
        let from_source = r.volume_content_source.is_some();
        let resumable = from_source && have < validate::bytes(size_gb);
        if !(fits(have) || resumable) {
            return Err(Error::AlreadyExists(format!(
                "volume {vref} named {:?} already exists with {} GB, which does not fit the requested capacity",
                r.name, existing.size
            )));
        }
        self.intents.clear(&format!("volume:{}", r.name));
        let kind = if from_source {
            WaitKind::CreateFromSource
        } else {
            WaitKind::Create
        };
        // Created by an earlier call: how far along it is, is unknown.
        let mut vol = self.wait_available(&vref, kind, false, deadline).await?;
        if from_source && vol.size < size_gb {
            vol = self.extend_and_wait(&vref, size_gb, deadline).await?;
        }
        self.cleanup_restore_leftovers(&r.name, &vref.region)
            .await?;
        if let Some(Source::Volume(src)) = r
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
            && let Ok(src) = src.volume_id.parse::<VolumeRef>()
        {
            self.cleanup_clone_snapshot(&r.name, &src).await?;
        }
        Ok(CreateVolumeResponse {
            volume: Some(csi_volume(
                &vol,
                &vref.region,
                r.volume_content_source.clone(),
            )),
        })
    }

    /// Create, and after an unclear failure look the name up again instead of creating a
    /// second volume: the create may have happened even though its reply was lost.
    async fn create_and_wait(
        &self,
        name: &str,
        region: &str,
        size_gb: u64,
        source: Option<CreateSource<'_>>,
        deadline: Deadline,
    ) -> Result<CloudVolume, Error> {
        let key = format!("volume:{name}");
        self.intents.check(&key, &format!("volume {name:?}"))?;
        let kind = match source {
            None => WaitKind::Create,
            Some(_) => WaitKind::CreateFromSource,
        };
        let create = self.client.volume_create(region, name, size_gb, source);
        let mut fresh = true;
        let id = match self.intents.run(&key, create).await {
            Ok(id) => id,
            Err(e) if !intents::made_nothing(&e) => match self.volume_by_label(name).await {
                Ok(Some(v)) => {
                    tracing::info!(
                        name,
                        volume = v.id,
                        "create reply was lost but the volume exists; using it"
                    );
                    self.intents.clear(&key);
                    fresh = false;
                    v.id
                }
                _ => {
                    return Err(Error::Unavailable(format!(
                        "creating volume {name:?} had an unknown outcome ({e}); a retry looks for it before creating again"
                    )));
                }
            },
            Err(e) => return Err(e.into()),
        };
        let vref = VolumeRef {
            region: region.to_string(),
            id,
        };
        let vol = self.wait_available(&vref, kind, fresh, deadline).await?;
        if vol.size < size_gb {
            // The cloud may create from a source at the source's size: honour the request.
            return self.extend_and_wait(&vref, size_gb, deadline).await;
        }
        Ok(vol)
    }

    pub(super) async fn extend_and_wait(
        &self,
        vref: &VolumeRef,
        size_gb: u64,
        deadline: Deadline,
    ) -> Result<CloudVolume, Error> {
        let mut fresh = true;
        if let Err(e) = self.client.volume_extend(vref.id, size_gb).await {
            // A repeated extend after a lost reply is refused ("must be larger"): check.
            let now = self.client.volume_info(vref.id).await?;
            if now.size < size_gb {
                return Err(e.into());
            }
            fresh = false;
        }
        let what = format!("volume {vref} to grow to {size_gb} GB");
        let kind = WaitKind::Extend;
        self.waits.until(kind, fresh, deadline, &what, || async {
            let v = self.poll_volume(vref.id, false).await?;
            if v.readiness() == Readiness::Failed {
                return Err(Error::Internal(format!(
                    "extending volume {vref} failed in the cloud (status {:?}); contact Luna Node support",
                    v.status
                )));
            }
            Ok((v.size >= size_gb && v.readiness() == Readiness::Ready).then_some(v))
        })
        .await
    }

    async fn create_from_snapshot(
        &self,
        name: &str,
        region: &str,
        size_gb: u64,
        snapshot_id: &str,
        deadline: Deadline,
    ) -> Result<CloudVolume, Error> {
        let not_found = || Error::NotFound(format!("source snapshot {snapshot_id} does not exist"));
        let sref: SnapshotRef = snapshot_id.parse().map_err(|_| not_found())?;
        // The CO's own snapshot, taken by an earlier call (usually long ready).
        let snap = self
            .wait_snapshot_ready(&sref, false, deadline)
            .await?
            .ok_or_else(not_found)?;
        if snap.size > size_gb {
            return Err(Error::OutOfRange(format!(
                "snapshot {snapshot_id} holds {} GB; the new volume must be at least that large",
                snap.size
            )));
        }
        if sref.region == region {
            return self
                .create_and_wait(
                    name,
                    region,
                    size_gb,
                    Some(CreateSource::Snapshot(&sref.uuid)),
                    deadline,
                )
                .await;
        }
        self.restore_across_regions(name, region, size_gb, &sref, deadline)
            .await
    }

    /// Cross-region restore: replicate the snapshot into the target region as an image,
    /// create the volume from the image, delete the image. The image is named after the
    /// volume, so a retry after a crash finds and reuses it instead of making another.
    async fn restore_across_regions(
        &self,
        name: &str,
        region: &str,
        size_gb: u64,
        sref: &SnapshotRef,
        deadline: Deadline,
    ) -> Result<CloudVolume, Error> {
        let image_name = restore_image_name(name);
        let key = format!("image:{region}:{image_name}");
        let mut fresh = false;
        let image_id = match self.find_image(&image_name, region).await? {
            Some(id) => {
                self.intents.clear(&key);
                id
            }
            None => {
                self.intents.check(&key, &format!("image {image_name:?}"))?;
                let replicate =
                    self.client
                        .snapshot_replicate(&sref.region, &sref.uuid, &image_name, region);
                match self.intents.run(&key, replicate).await {
                    Ok(id) => {
                        fresh = true;
                        id
                    }
                    Err(e) if !intents::made_nothing(&e) => {
                        let found = self.find_image(&image_name, region).await?;
                        found.inspect(|_| self.intents.clear(&key)).ok_or_else(|| {
                            Error::Unavailable(format!(
                                "replicating snapshot {sref} to {region} had an unknown outcome ({e}); a retry looks for the image first"
                            ))
                        })?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let what = format!("image {image_id} (snapshot {sref} replicated to {region})");
        let kind = WaitKind::Replicate;
        self.waits.until(kind, fresh, deadline, &what, || async {
            let images = self.images_in(region).await?;
            match images
                .iter()
                .find(|i| i.image_id == image_id)
                .map(|i| i.readiness())
            {
                Some(Readiness::Ready) => Ok(Some(())),
                Some(Readiness::Pending) => Ok(None),
                Some(Readiness::Failed) => {
                    // Remove it so that the retry replicates afresh instead of waiting on it.
                    let _ = self.client.image_delete(image_id).await;
                    Err(Error::Unavailable(format!(
                        "replicating snapshot {sref} to {region} failed in the cloud; the failed image was removed and a retry replicates again"
                    )))
                }
                None => Err(Error::Unavailable(format!(
                    "image {image_id} disappeared while waiting for it; retry"
                ))),
            }
        })
        .await?;
        let vol = self
            .create_and_wait(
                name,
                region,
                size_gb,
                Some(CreateSource::Image(image_id)),
                deadline,
            )
            .await?;
        self.cleanup_restore_leftovers(name, region).await?;
        Ok(vol)
    }

    /// A region's images, from an `image/list` shared with concurrent callers unless
    /// `--wait-share-list=false` (as [`Self::snapshots_in`]).
    async fn images_in(&self, region: &str) -> Result<Arc<Vec<Image>>, ApiError> {
        if self.waits.share_lists() {
            self.client.image_list_shared(region).await
        } else {
            self.client.image_list(Some(region)).await.map(Arc::new)
        }
    }

    async fn find_image(&self, image_name: &str, region: &str) -> Result<Option<u64>, Error> {
        let images = self.images_in(region).await?;
        Ok(images
            .iter()
            .filter(|i| i.name == image_name && (i.region.is_empty() || i.region == region))
            .filter(|i| i.readiness() != Readiness::Failed)
            .map(|i| i.image_id)
            .min())
    }

    /// Remove the temporary image of a cross-region restore, if this or an earlier
    /// (interrupted) call left it. A retryable failure is returned (UNAVAILABLE), so the CO
    /// retries the CreateVolume, which finds the volume and cleans up again: a best-effort
    /// cleanup leaked one image in every few restores when the cloud was failing requests.
    /// Other failures are logged: the volume is fine and an operator can delete the image.
    async fn cleanup_restore_leftovers(&self, name: &str, region: &str) -> Result<(), Error> {
        let image_name = restore_image_name(name);
        let images = self
            .images_in(region)
            .await
            .map_err(|e| leftover_error(name, "restore image", e))?;
        for img in images.iter().filter(|i| i.name == image_name) {
            match self.client.image_delete(img.image_id).await {
                Ok(()) | Err(ApiError::NotFound { .. }) => {}
                Err(e) if e.is_retryable() => return Err(leftover_error(name, "restore image", e)),
                Err(e) => {
                    tracing::warn!(image = img.image_id, error = %e, "could not delete temporary restore image")
                }
            }
        }
        Ok(())
    }

    /// Remove the temporary snapshot a clone of `src` named `name` made, if it is still
    /// there (the same rules as [`Self::cleanup_restore_leftovers`]).
    async fn cleanup_clone_snapshot(&self, name: &str, src: &VolumeRef) -> Result<(), Error> {
        if !self.cfg.regions.contains(&src.region) {
            return Ok(());
        }
        let label = clone_snapshot_name(name);
        let snaps = self
            .snapshots_in(&src.region)
            .await
            .map_err(|e| leftover_error(name, "clone snapshot", e))?;
        for s in snaps
            .iter()
            .filter(|s| s.name == label && s.volume.as_ref().is_some_and(|v| v.id == src.id))
        {
            match self.client.snapshot_delete(&src.region, &s.id).await {
                Ok(()) | Err(ApiError::NotFound { .. }) => {}
                Err(e) if e.is_retryable() => {
                    return Err(leftover_error(name, "clone snapshot", e));
                }
                Err(e) => {
                    tracing::warn!(snapshot = %s.id, error = %e, "could not delete the clone's temporary snapshot")
                }
            }
        }
        Ok(())
    }

    /// A clone goes through a temporary snapshot (named after the new volume, so a retry
    /// reuses it), which is removed once the clone exists.
    async fn clone_volume(
        &self,
        name: &str,
        region: &str,
        size_gb: u64,
        source_id: &str,
        deadline: Deadline,
    ) -> Result<CloudVolume, Error> {
        let (src, src_vol) = self
            .find_volume(source_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("source volume {source_id} does not exist")))?;
        if src_vol.size > size_gb {
            return Err(Error::OutOfRange(format!(
                "source volume {source_id} is {} GB; the clone must be at least that large",
                src_vol.size
            )));
        }
        let label = clone_snapshot_name(name);
        let (snap_uuid, fresh) = self.snapshot_with_label(&src, &label).await?;
        let sref = SnapshotRef {
            region: src.region.clone(),
            uuid: snap_uuid,
        };
        match self.wait_snapshot_ready(&sref, fresh, deadline).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(Error::Unavailable(format!(
                    "temporary snapshot {sref} for the clone disappeared; retry"
                )));
            }
            Err(Error::FailedPrecondition(msg)) => {
                // A failed temporary snapshot would block every retry: remove it.
                let _ = self.client.snapshot_delete(&sref.region, &sref.uuid).await;
                return Err(Error::Unavailable(format!(
                    "{msg}; the temporary snapshot was removed and a retry takes a new one"
                )));
            }
            Err(e) => return Err(e),
        }
        let vol = if src.region == region {
            self.create_and_wait(
                name,
                region,
                size_gb,
                Some(CreateSource::Snapshot(&sref.uuid)),
                deadline,
            )
            .await?
        } else {
            self.restore_across_regions(name, region, size_gb, &sref, deadline)
                .await?
        };
        self.cleanup_clone_snapshot(name, &src).await?;
        Ok(vol)
    }

    pub(super) async fn delete_volume(
        &self,
        r: &DeleteVolumeRequest,
    ) -> Result<DeleteVolumeResponse, Error> {
        validate::required("volume_id", &r.volume_id)?;
        let _guard = self.lock_volume(&r.volume_id)?;
        let Some((vref, vol)) = self.find_volume(&r.volume_id).await? else {
            return Ok(DeleteVolumeResponse {});
        };
        if let Some(vm) = vol.attached_vm() {
            return Err(Error::FailedPrecondition(format!(
                "volume {vref} is attached to VM {vm}; it must be unpublished (detached) before it can be deleted"
            )));
        }
        if vol.readiness() == Readiness::Pending {
            return Err(super::busy(&vref, &vol));
        }
        match self.client.volume_delete(vref.id).await {
            Ok(()) | Err(ApiError::NotFound { .. }) => Ok(DeleteVolumeResponse {}),
            Err(e @ ApiError::WrongState { .. }) => Err(Error::FailedPrecondition(format!(
                "volume {vref} cannot be deleted now: {e}"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn expand_volume(
        &self,
        r: &ControllerExpandVolumeRequest,
        deadline: Deadline,
    ) -> Result<ControllerExpandVolumeResponse, Error> {
        validate::required("volume_id", &r.volume_id)?;
        let range = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| Error::invalid("capacity_range is required"))?;
        let access = match &r.volume_capability {
            Some(c) => Some(validate::capability(c).map_err(Error::InvalidArgument)?),
            None => None,
        };
        let node_expansion_required = !matches!(access, Some(Access::Block));
        let _guard = self.lock_volume(&r.volume_id)?;
        let (vref, vol) = self.volume_or_not_found(&r.volume_id).await?;
        let want_gb = validate::size_gb(Some(range), vol.size, 1, self.cfg.max_size_gb)?;
        if want_gb <= vol.size {
            return Ok(ControllerExpandVolumeResponse {
                capacity_bytes: validate::bytes(vol.size),
                node_expansion_required,
            });
        }
        if let Some(vm) = vol.attached_vm() {
            return Err(Error::FailedPrecondition(format!(
                "volume {vref} is published (attached to VM {vm}); Luna Node extends only detached volumes: stop the pod using it so it is detached, and expansion continues (offline expansion)"
            )));
        }
        if vol.readiness() == Readiness::Pending {
            return Err(super::busy(&vref, &vol));
        }
        let vol = self.extend_and_wait(&vref, want_gb, deadline).await?;
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: validate::bytes(vol.size),
            node_expansion_required,
        })
    }

    pub(super) async fn get_volume(
        &self,
        r: &ControllerGetVolumeRequest,
    ) -> Result<ControllerGetVolumeResponse, Error> {
        let (vref, vol) = self.volume_or_not_found(&r.volume_id).await?;
        Ok(ControllerGetVolumeResponse {
            volume: Some(csi_volume(&vol, &vref.region, None)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: vol.attached_vm().map(str::to_string).into_iter().collect(),
                volume_condition: Some(condition(&vol)),
            }),
        })
    }

    pub(super) async fn list_volumes(
        &self,
        r: &ListVolumesRequest,
    ) -> Result<ListVolumesResponse, Error> {
        // Validate paging before calling the cloud.
        if r.max_entries < 0 {
            return Err(Error::invalid("max_entries must not be negative"));
        }
        let mut all: Vec<CloudVolume> = self
            .client
            .volume_list_shared()
            .await?
            .iter()
            .cloned()
            .collect();
        all.retain(|v| self.cfg.regions.iter().any(|reg| reg == &v.region));
        let (page, next_token) = validate::page(
            all,
            |v| v.id,
            |t| t.parse().ok(),
            r.max_entries,
            &r.starting_token,
        )?;
        Ok(ListVolumesResponse {
            entries: page
                .iter()
                .map(|v| list_volumes_response::Entry {
                    volume: Some(csi_volume(v, &v.region, None)),
                    status: Some(list_volumes_response::VolumeStatus {
                        published_node_ids: v
                            .attached_vm()
                            .map(str::to_string)
                            .into_iter()
                            .collect(),
                        volume_condition: Some(condition(v)),
                    }),
                })
                .collect(),
            next_token,
        })
    }

    pub(super) async fn validate_capabilities(
        &self,
        r: &ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse, Error> {
        validate::required("volume_id", &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(Error::invalid("volume_capabilities is required"));
        }
        let (vref, _) = self.volume_or_not_found(&r.volume_id).await?;
        // The driver's volumes carry no context, and a region parameter must be theirs.
        let context = (!r.volume_context.is_empty()).then(|| {
            "volume_context is not one this driver produced (its volumes have none)".to_string()
        });
        let region = r
            .parameters
            .get("region")
            .filter(|reg| **reg != vref.region)
            .map(|reg| format!("the volume is in region {}, not {reg}", vref.region));
        let problems: Vec<String> = r
            .volume_capabilities
            .iter()
            .filter_map(|c| validate::capability(c).err())
            .chain(check_parameters(&r.parameters).err().map(|e| e.to_string()))
            .chain(context)
            .chain(region)
            .collect();
        if !problems.is_empty() {
            return Ok(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: problems.join("; "),
            });
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: r.volume_context.clone(),
                volume_capabilities: r.volume_capabilities.clone(),
                parameters: r.parameters.clone(),
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        })
    }
}

/// The volume exists but a temporary object could not be removed yet: retryable.
fn leftover_error(name: &str, what: &str, e: ApiError) -> Error {
    let msg = format!(
        "volume {name:?} is ready but its temporary {what} could not be removed yet ({e}); retry"
    );
    if e.is_retryable() {
        Error::Unavailable(msg)
    } else {
        Error::from(e)
    }
}

/// Name of the temporary image a cross-region restore makes.
fn restore_image_name(volume_name: &str) -> String {
    format!("csi-restore-{volume_name}")
}

/// Label of the temporary snapshot a clone makes.
pub(super) fn clone_snapshot_name(volume_name: &str) -> String {
    format!("csi-clone-{volume_name}")
}
