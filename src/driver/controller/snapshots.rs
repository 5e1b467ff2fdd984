//! CreateSnapshot, DeleteSnapshot and ListSnapshots.

use std::sync::Arc;

use super::wait::{Deadline, WaitKind};
use super::{Inner, intents};
use crate::csi::*;
use crate::driver::error::Error;
use crate::driver::ids::{SnapshotRef, VolumeRef};
use crate::driver::validate;
use crate::lunanode::{ApiError, Readiness, Snapshot as CloudSnapshot};

fn csi_snapshot(inner: &Inner, s: &CloudSnapshot, region: &str) -> crate::csi::Snapshot {
    let creation_time = validate::timestamp(s.created_at()).or_else(|| {
        // The API reference shows no snapshot timestamp but the spec requires one: use the
        // time this process first saw the snapshot, so repeated answers agree.
        let mut seen = inner.snapshot_first_seen.lock().expect("snapshot times");
        // Bounded: a cluster with more snapshots than this sees some times move.
        if seen.len() >= 100_000 && !seen.contains_key(&s.id) {
            seen.clear();
        }
        let first = *seen
            .entry(s.id.clone())
            .or_insert_with(std::time::SystemTime::now);
        let since = first
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Some(prost_types::Timestamp {
            seconds: since.as_secs() as i64,
            nanos: since.subsec_nanos() as i32,
        })
    });
    crate::csi::Snapshot {
        size_bytes: validate::bytes(s.size),
        snapshot_id: SnapshotRef {
            region: region.to_string(),
            uuid: s.id.clone(),
        }
        .to_string(),
        source_volume_id: s
            .volume
            .as_ref()
            .map(|v| {
                VolumeRef {
                    region: region.to_string(),
                    id: v.id,
                }
                .to_string()
            })
            .unwrap_or_default(),
        creation_time,
        ready_to_use: s.readiness() == Readiness::Ready,
        group_snapshot_id: String::new(),
    }
}

impl Inner {
    /// A region's snapshots, from a `volume/snapshot-list` shared with concurrent callers
    /// (fifty snapshot waits at once then send one or two lists per round, not fifty)
    /// unless `--wait-share-list=false`.
    pub(super) async fn snapshots_in(
        &self,
        region: &str,
    ) -> Result<Arc<Vec<CloudSnapshot>>, ApiError> {
        if self.waits.share_lists() {
            self.client.snapshot_list_shared(region).await
        } else {
            self.client.snapshot_list(region).await.map(Arc::new)
        }
    }

    async fn snapshot_by_id(&self, sref: &SnapshotRef) -> Result<Option<CloudSnapshot>, Error> {
        if !self.cfg.regions.contains(&sref.region) {
            return Ok(None);
        }
        Ok(self
            .snapshots_in(&sref.region)
            .await?
            .iter()
            .find(|s| s.id == sref.uuid && s.region == sref.region)
            .cloned())
    }

    /// The snapshot, once ready; `None` when it does not exist. `fresh`: this call has just
    /// taken it.
    pub(super) async fn wait_snapshot_ready(
        &self,
        sref: &SnapshotRef,
        fresh: bool,
        deadline: Deadline,
    ) -> Result<Option<CloudSnapshot>, Error> {
        let what = format!("snapshot {sref} to become ready");
        let kind = WaitKind::Snapshot;
        self.waits
            .until(kind, fresh, deadline, &what, || async {
                match self.snapshot_by_id(sref).await? {
                    None => Ok(Some(None)),
                    Some(s) => match s.readiness() {
                        Readiness::Ready => Ok(Some(Some(s))),
                        Readiness::Pending => Ok(None),
                        Readiness::Failed => Err(Error::FailedPrecondition(format!(
                            "snapshot {sref} is in status {:?}; it cannot be restored",
                            s.status
                        ))),
                    },
                }
            })
            .await
    }

    /// The UUID of the snapshot of `src` labelled `label`, creating it if there is none
    /// (then with `true`). After an unclear failure of the create, the label is looked up
    /// again rather than creating a second snapshot.
    pub(super) async fn snapshot_with_label(
        &self,
        src: &VolumeRef,
        label: &str,
    ) -> Result<(String, bool), Error> {
        let find = || async {
            let list = self.snapshots_in(&src.region).await?;
            Ok::<_, Error>(
                list.iter()
                    .filter(|s| s.readiness() != Readiness::Failed)
                    .find(|s| s.name == label && s.volume.as_ref().is_some_and(|v| v.id == src.id))
                    .map(|s| s.id.clone()),
            )
        };
        if let Some(id) = find().await? {
            self.intents
                .clear(&format!("snapshot:{}:{label}", src.region));
            return Ok((id, false));
        }
        Ok((self.create_labelled_snapshot(src, label).await?, true))
    }

    /// Create the snapshot of `src` labelled `label`, for a caller that has just seen that
    /// there is none. After an unclear failure the label is looked up instead of creating
    /// a second snapshot.
    async fn create_labelled_snapshot(
        &self,
        src: &VolumeRef,
        label: &str,
    ) -> Result<String, Error> {
        let key = format!("snapshot:{}:{label}", src.region);
        self.intents.check(&key, &format!("snapshot {label:?}"))?;
        match self
            .intents
            .run(&key, self.client.snapshot_create(src.id, label))
            .await
        {
            Ok(id) => Ok(id),
            Err(e) if !intents::made_nothing(&e) => {
                let list = self.snapshots_in(&src.region).await?;
                let found = list
                    .iter()
                    .find(|s| s.name == label && s.volume.as_ref().is_some_and(|v| v.id == src.id))
                    .map(|s| s.id.clone());
                found.inspect(|_| self.intents.clear(&key)).ok_or_else(|| {
                    Error::Unavailable(format!(
                        "creating snapshot {label:?} had an unknown outcome ({e}); a retry looks for it before creating again"
                    ))
                })
            }
            Err(ApiError::NotFound { .. }) => Err(Error::NotFound(format!(
                "source volume {src} does not exist"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn create_snapshot(
        &self,
        r: &CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, Error> {
        validate::name("name", &r.name)?;
        validate::required("source_volume_id", &r.source_volume_id)?;
        if let Some(k) = r
            .parameters
            .keys()
            .find(|k| !k.starts_with("csi.storage.k8s.io/"))
        {
            return Err(Error::invalid(format!(
                "unknown snapshot parameter {k:?}; VolumeSnapshotClass parameters are not used by this driver"
            )));
        }
        let not_found = || {
            Error::NotFound(format!(
                "source volume {} does not exist",
                r.source_volume_id
            ))
        };
        let src: VolumeRef = r.source_volume_id.parse().map_err(|_| not_found())?;
        if !self.cfg.regions.contains(&src.region) {
            return Err(not_found());
        }
        let _guard = self.inflight.lock(
            &format!("snapshot-name:{}", r.name),
            &format!("snapshot name {}", r.name),
        )?;

        // Idempotency by name + source: the label is unique per region in practice, so a
        // snapshot with this name on another volume is a conflict.
        let list = self.snapshots_in(&src.region).await?;
        if let Some(existing) = list.iter().find(|s| s.name == r.name) {
            self.intents
                .clear(&format!("snapshot:{}:{}", src.region, r.name));
            let same_source = existing.volume.as_ref().is_some_and(|v| v.id == src.id);
            if !same_source {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {:?} already exists for another volume ({})",
                    r.name,
                    existing
                        .volume
                        .as_ref()
                        .map_or("unknown".to_string(), |v| VolumeRef {
                            region: src.region.clone(),
                            id: v.id
                        }
                        .to_string())
                )));
            }
            return Ok(CreateSnapshotResponse {
                snapshot: Some(csi_snapshot(self, existing, &src.region)),
            });
        }
        // Another region may hold the name too; names are the CO's idempotency key.
        if self.find_volume(&r.source_volume_id).await?.is_none() {
            return Err(not_found());
        }
        // The list above showed no snapshot with this name: create without listing again.
        let uuid = self.create_labelled_snapshot(&src, &r.name).await?;
        let sref = SnapshotRef {
            region: src.region.clone(),
            uuid,
        };
        // Report the cloud's view (size, status); the snapshotter polls until ready_to_use.
        let snap = self.snapshot_by_id(&sref).await?.ok_or_else(|| {
            Error::Unavailable(format!(
                "snapshot {sref} was created but is not listed yet; retry"
            ))
        })?;
        Ok(CreateSnapshotResponse {
            snapshot: Some(csi_snapshot(self, &snap, &src.region)),
        })
    }

    pub(super) async fn delete_snapshot(
        &self,
        r: &DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotResponse, Error> {
        validate::required("snapshot_id", &r.snapshot_id)?;
        let Ok(sref) = r.snapshot_id.parse::<SnapshotRef>() else {
            return Ok(DeleteSnapshotResponse {});
        };
        if !self.cfg.regions.contains(&sref.region) {
            return Ok(DeleteSnapshotResponse {});
        }
        let _guard = self.inflight.lock(
            &format!("snapshot:{}", r.snapshot_id),
            &format!("snapshot {}", r.snapshot_id),
        )?;
        match self.client.snapshot_delete(&sref.region, &sref.uuid).await {
            Ok(()) | Err(ApiError::NotFound { .. }) => Ok(DeleteSnapshotResponse {}),
            Err(e @ ApiError::WrongState { .. }) => Err(Error::FailedPrecondition(format!(
                "snapshot {sref} cannot be deleted now: {e}"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn list_snapshots(
        &self,
        r: &ListSnapshotsRequest,
    ) -> Result<ListSnapshotsResponse, Error> {
        if r.max_entries < 0 {
            return Err(Error::invalid("max_entries must not be negative"));
        }
        let mut found: Vec<(String, CloudSnapshot)> = Vec::new();
        if !r.snapshot_id.is_empty() {
            // An ID that does not parse names nothing: an empty list, not an error.
            if let Ok(sref) = r.snapshot_id.parse::<SnapshotRef>() {
                if let Some(s) = self.snapshot_by_id(&sref).await? {
                    found.push((sref.region.clone(), s));
                }
            }
            if let (Some((_, s)), false) = (found.first(), r.source_volume_id.is_empty()) {
                let matches = r
                    .source_volume_id
                    .parse::<VolumeRef>()
                    .ok()
                    .is_some_and(|v| s.volume.as_ref().is_some_and(|sv| sv.id == v.id));
                if !matches {
                    found.clear();
                }
            }
        } else if !r.source_volume_id.is_empty() {
            if let Ok(vref) = r.source_volume_id.parse::<VolumeRef>() {
                if self.cfg.regions.contains(&vref.region) {
                    for s in self.snapshots_in(&vref.region).await?.iter() {
                        if s.volume.as_ref().is_some_and(|v| v.id == vref.id) {
                            found.push((vref.region.clone(), s.clone()));
                        }
                    }
                }
            }
        } else {
            for region in &self.cfg.regions {
                for s in self.snapshots_in(region).await?.iter() {
                    found.push((region.clone(), s.clone()));
                }
            }
        }
        let (page, next_token) = validate::page(
            found,
            |(region, s)| format!("{region}/{}", s.id),
            |t| t.parse::<SnapshotRef>().ok().map(|s| s.to_string()),
            r.max_entries,
            &r.starting_token,
        )?;
        Ok(ListSnapshotsResponse {
            entries: page
                .iter()
                .map(|(region, s)| list_snapshots_response::Entry {
                    snapshot: Some(csi_snapshot(self, s, region)),
                })
                .collect(),
            next_token,
        })
    }
}
