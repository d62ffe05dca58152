//! Retention: which restore points a `prune --keep-*` policy keeps. Same rules as restic's
//! `forget --keep-*`: keep-last N keeps the N newest; keep-hourly N keeps the newest restore point
//! of each of the N newest hours that have one; likewise daily, weekly (ISO week), monthly,
//! yearly. A point kept by any rule is kept. Applied per VM. Times are UTC.
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::id::SnapshotId;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetentionPolicy {
    pub last: Option<u32>,
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub yearly: Option<u32>,
}

impl RetentionPolicy {
    /// True when no rule is set (prune then only reclaims space; it forgets nothing).
    pub fn is_empty(&self) -> bool {
        todo!()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetentionDecision {
    pub id: SnapshotId,
    pub keep: bool,
    /// e.g. ["last", "daily"]; empty when forgotten.
    pub reasons: Vec<&'static str>,
}

/// Decide for the restore points of ONE VM, given (id, time). Output in the input's order.
pub fn plan(
    policy: &RetentionPolicy,
    points: &[(SnapshotId, DateTime<Utc>)],
) -> Vec<RetentionDecision> {
    todo!()
}
