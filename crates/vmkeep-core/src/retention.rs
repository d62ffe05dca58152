//! Retention: which restore points a `prune --keep-*` policy keeps. The rules are restic's
//! `forget --keep-*` rules as of restic 0.16 and later (restic's `ApplyPolicy`, checked against
//! restic's own policy test expectations, ported as data in `retention/restic_policy_cases.txt`):
//! keep-last N keeps the N newest points; keep-hourly N keeps the newest point of each of the N
//! newest hours that have one; likewise daily, weekly (ISO week, Monday to Sunday), monthly,
//! yearly. A point kept by any rule is kept. Applied per VM.
//!
//! Precisely: the points are walked newest to oldest. Each given rule has a counter, initially
//! N, and the bucket of the last point it kept: keep-last's bucket is the point itself, the
//! others' are its (year, month, day, hour) / (year, month, day) / ISO (year, week) / (year,
//! month) / (year). A rule keeps a point when its counter is > 0 and either
//! - the point's bucket differs from the rule's last kept bucket (reason `daily`, ...), or
//! - the point is the oldest of all (the last one walked): a rule that still has counts left
//!   after every bucket keeps it even if its bucket was already kept (reason `oldest daily`,
//!   ...). This keeps the longest history the counts allow: keep-yearly 10 over 3 years of
//!   points keeps the newest point of each year plus the very first one.
//!
//! and then decrements the counter, except for [`RetentionPolicy::UNLIMITED`] (restic's
//! `unlimited`, "keep all"), which never runs out.
//!
//! A count of 0 means the rule is not given, as in restic. A policy with no rule given
//! ([`RetentionPolicy::is_empty`]) keeps everything: `prune` without `--keep-*` forgets nothing
//! and only reclaims space (restic's `forget` refuses an empty policy instead).
//!
//! Differences from restic, each pinned by a test in `retention/tests.rs`:
//! - Buckets are taken in UTC (restic uses the time zone recorded in each snapshot, usually the
//!   backup host's local time), so a "day" is a UTC day (`buckets_are_utc`).
//! - Equal times: the greater id counts as newer, so the result does not depend on listing order
//!   (restic keeps the order in which it loaded the snapshots) (`equal_times_break_ties_by_id`).
//! - The CLI refuses `--keep-* 0` as a usage error rather than ignoring the option
//!   (`zero_counts_are_not_given` shows the library follows restic); there is no `--keep-within*`
//!   and no `--keep-tag` (restore points have no tags).
use chrono::{DateTime, Datelike, Timelike, Utc};
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
    /// A count that never runs out: restic's `unlimited` ("keep all hourly points", ...).
    pub const UNLIMITED: u32 = u32::MAX;

    /// True when no rule is given (None or 0 everywhere): prune then only reclaims space; it
    /// forgets nothing.
    pub fn is_empty(&self) -> bool {
        self.given_rules().next().is_none()
    }

    /// The rules with a count of at least 1 (a count of 0 is "not given", as in restic).
    fn given_rules(&self) -> impl Iterator<Item = (Rule, u32)> {
        self.rules()
            .into_iter()
            .filter_map(|(r, n)| n.filter(|&n| n > 0).map(|n| (r, n)))
    }

    fn rules(&self) -> [(Rule, Option<u32>); 6] {
        [
            (Rule::Last, self.last),
            (Rule::Hourly, self.hourly),
            (Rule::Daily, self.daily),
            (Rule::Weekly, self.weekly),
            (Rule::Monthly, self.monthly),
            (Rule::Yearly, self.yearly),
        ]
    }
}

/// A rule's bucket key (unused trailing fields are 0).
type Bucket = (i64, u32, u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    fn reason(self) -> &'static str {
        match self {
            Rule::Last => "last",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Yearly => "yearly",
        }
    }

    /// Reason when the rule keeps the oldest point although its bucket was already kept.
    fn oldest_reason(self) -> &'static str {
        match self {
            Rule::Last => "oldest last", // unreachable: every point is its own bucket
            Rule::Hourly => "oldest hourly",
            Rule::Daily => "oldest daily",
            Rule::Weekly => "oldest weekly",
            Rule::Monthly => "oldest monthly",
            Rule::Yearly => "oldest yearly",
        }
    }

    /// The bucket of the point at position `rank` (newest first) with time `t`.
    fn bucket(self, rank: usize, t: &DateTime<Utc>) -> Bucket {
        let y = t.year() as i64;
        match self {
            Rule::Last => (rank as i64, 0, 0, 0),
            Rule::Hourly => (y, t.month(), t.day(), t.hour()),
            Rule::Daily => (y, t.month(), t.day(), 0),
            Rule::Weekly => {
                let w = t.iso_week();
                (w.year() as i64, w.week(), 0, 0)
            }
            Rule::Monthly => (y, t.month(), 0, 0),
            Rule::Yearly => (y, 0, 0, 0),
        }
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
    let mut decisions: Vec<RetentionDecision> = points
        .iter()
        .map(|(id, _)| RetentionDecision {
            id: *id,
            keep: policy.is_empty(),
            reasons: Vec::new(),
        })
        .collect();
    if policy.is_empty() || points.is_empty() {
        return decisions;
    }
    // Newest first; equal times: greater id first, then input position (stable).
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| (points[b].1, points[b].0).cmp(&(points[a].1, points[a].0)));

    let mut rules: Vec<(Rule, u32, Option<Bucket>)> =
        policy.given_rules().map(|(r, n)| (r, n, None)).collect();
    let oldest = order.len() - 1;
    for (rank, &i) in order.iter().enumerate() {
        let t = &points[i].1;
        for (rule, left, last) in rules.iter_mut() {
            if *left == 0 {
                continue;
            }
            let b = rule.bucket(rank, t);
            let reason = if *last != Some(b) {
                rule.reason()
            } else if rank == oldest {
                rule.oldest_reason()
            } else {
                continue;
            };
            *last = Some(b);
            if *left != RetentionPolicy::UNLIMITED {
                *left -= 1;
            }
            decisions[i].keep = true;
            decisions[i].reasons.push(reason);
        }
    }
    decisions
}

#[cfg(test)]
mod tests;
