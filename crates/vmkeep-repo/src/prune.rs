//! `prune`: plan (retention), then apply: forget what the plan drops and collect garbage
//! (`gc/`), under the exclusive maintenance lease. `prune --dry-run` prints the plan and the
//! GC preview ([`Repository::prune_preview`]) with the figures the real run would give.
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use vmkeep_core::retention::{self, RetentionPolicy};
use vmkeep_core::SnapshotId;

use crate::error::Result;
use crate::gc::{GcPreview, GcStats};
use crate::lease::{self, LeaseKind};
use crate::progress::Progress;
use crate::Repository;

#[derive(Clone, Debug, Default)]
pub struct PruneOptions {
    pub vm: Option<String>,
    pub policy: RetentionPolicy,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlannedPoint {
    pub id: SnapshotId,
    pub vm: String,
    pub time: DateTime<Utc>,
    pub keep: bool,
    pub reasons: Vec<&'static str>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PrunePlan {
    pub points: Vec<PlannedPoint>,
}

impl PrunePlan {
    pub fn kept(&self) -> Vec<SnapshotId> {
        self.points
            .iter()
            .filter(|p| p.keep)
            .map(|p| p.id)
            .collect()
    }
    pub fn forgotten(&self) -> Vec<SnapshotId> {
        self.points
            .iter()
            .filter(|p| !p.keep)
            .map(|p| p.id)
            .collect()
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneStats {
    pub kept: Vec<SnapshotId>,
    pub forgotten: Vec<SnapshotId>,
    pub gc: GcStats,
    pub temporaries: crate::TemporaryStats,
    /// Pack lists rewritten (repositories that keep them, docs/PROTOCOL.md §5).
    pub pack_lists: Option<crate::packlist::PackListRepair>,
    /// Verification records of restore points that are gone (verification.rs).
    pub verifications_removed: usize,
}

impl Repository {
    pub fn prune_plan(&self, opts: &PruneOptions) -> Result<PrunePlan> {
        let all = self.snapshots()?;
        let mut by_vm: HashMap<&str, Vec<&vmkeep_core::manifest::Manifest>> = HashMap::new();
        for m in &all {
            if opts.vm.as_deref().is_none_or(|v| v == m.vm) {
                by_vm.entry(&m.vm).or_default().push(m);
            }
        }
        let mut points = Vec::new();
        for (_, ms) in by_vm {
            let input: Vec<(SnapshotId, DateTime<Utc>)> =
                ms.iter().map(|m| (m.id, m.time)).collect();
            for (m, d) in ms.iter().zip(retention::plan(&opts.policy, &input)) {
                points.push(PlannedPoint {
                    id: m.id,
                    vm: m.vm.clone(),
                    time: m.time,
                    keep: d.keep,
                    reasons: d.reasons,
                });
            }
        }
        points.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
        Ok(PrunePlan { points })
    }

    /// What `prune` would do with `plan` now, without changing anything (`--dry-run`).
    pub fn prune_preview(&self, plan: &PrunePlan, progress: &dyn Progress) -> Result<GcPreview> {
        self.gc_preview(&plan.forgotten().into_iter().collect(), progress)
    }

    /// Forget what the plan drops, then collect garbage.
    pub fn prune(&self, plan: &PrunePlan, progress: &dyn Progress) -> Result<PruneStats> {
        let lease = self.maintenance_lease(LeaseKind::Prune)?;
        let _ = lease::remove_stale(self, false);
        let temporaries = self.remove_stale_temporaries()?; // safe age: temporaries.rs
        let forgotten = self.forget_locked(&lease, &plan.forgotten())?;
        let gc = self.gc_locked(&lease, progress)?;
        lease.check()?;
        let verifications_removed = self.remove_orphan_verifications()?;
        // Served repositories: lists naming packs this (or an earlier) prune removed.
        let pack_lists = if self.keeps_pack_lists()? {
            lease.check()?;
            Some(self.repair_pack_lists_locked(false)?)
        } else {
            None
        };
        if let Err(e) = lease.release() {
            tracing::warn!(error = %e, "could not remove the lease; the next prune removes it");
        }
        Ok(PruneStats {
            kept: plan.kept(),
            forgotten,
            gc,
            temporaries,
            pack_lists,
            verifications_removed,
        })
    }
}
