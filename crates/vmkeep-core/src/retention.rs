//! Retention: which restore points a `prune --keep-*` policy keeps. Same rules as restic's
//! `forget --keep-*`: keep-last N keeps the N newest; keep-hourly N keeps the newest restore point
//! of each of the N newest hours that have one; likewise daily, weekly (ISO week), monthly,
//! yearly. A point kept by any rule is kept. Applied per VM. Times are UTC.
//!
//! Precisely (restic's `ApplyPolicy`): the points are walked newest to oldest (equal times:
//! the greater id counts as newer). Each rule has a counter, initially N, and the bucket of the
//! last point it kept: keep-last's bucket is the point itself, the others' are its (year,
//! month, day, hour) / (year, month, day) / ISO (year, week) / (year, month) / (year). A rule
//! keeps a point when its counter is > 0 and the point's bucket differs from the rule's last
//! kept bucket; it then decrements the counter. So keep-daily 3 keeps the newest point of each
//! of the 3 newest days that have points.
//!
//! An empty policy (no rule given, [`RetentionPolicy::is_empty`]) keeps everything: `prune`
//! without `--keep-*` forgets nothing. A rule given as 0 keeps nothing by itself; a policy whose
//! only rules are 0 therefore forgets every point (restic would treat it as empty), so callers
//! should reject `--keep-* 0` if they want the other reading.
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
    /// True when no rule is set (prune then only reclaims space; it forgets nothing).
    pub fn is_empty(&self) -> bool {
        self.rules().iter().all(|(_, n)| n.is_none())
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
    if policy.is_empty() {
        return decisions;
    }
    // Newest first; equal times: greater id first, then input position (stable).
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| (points[b].1, points[b].0).cmp(&(points[a].1, points[a].0)));

    let mut rules: Vec<(Rule, u32, Option<Bucket>)> = policy
        .rules()
        .iter()
        .filter_map(|&(r, n)| n.map(|n| (r, n, None)))
        .collect();
    for (rank, &i) in order.iter().enumerate() {
        let t = &points[i].1;
        for (rule, left, last) in rules.iter_mut() {
            if *left == 0 {
                continue;
            }
            let b = rule.bucket(rank, t);
            if *last != Some(b) {
                *last = Some(b);
                *left -= 1;
                decisions[i].keep = true;
                decisions[i].reasons.push(rule.reason());
            }
        }
    }
    decisions
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn sid(n: u32) -> SnapshotId {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&n.to_be_bytes());
        SnapshotId(b)
    }

    fn t(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn kept(decisions: &[RetentionDecision]) -> Vec<SnapshotId> {
        decisions.iter().filter(|d| d.keep).map(|d| d.id).collect()
    }

    fn policy(f: impl FnOnce(&mut RetentionPolicy)) -> RetentionPolicy {
        let mut p = RetentionPolicy::default();
        f(&mut p);
        p
    }

    #[test]
    fn is_empty() {
        assert!(RetentionPolicy::default().is_empty());
        assert!(!policy(|p| p.yearly = Some(1)).is_empty());
        assert!(!policy(|p| p.last = Some(0)).is_empty());
    }

    #[test]
    fn empty_policy_keeps_everything() {
        let pts: Vec<_> = (0..5).map(|i| (sid(i), t(2024, 1, 1 + i, 0, 0))).collect();
        let d = plan(&RetentionPolicy::default(), &pts);
        assert_eq!(d.len(), 5);
        assert!(d.iter().all(|d| d.keep && d.reasons.is_empty()));
        assert!(plan(&RetentionPolicy::default(), &[]).is_empty());
        assert!(plan(&policy(|p| p.daily = Some(3)), &[]).is_empty());
    }

    #[test]
    fn zero_rules_keep_nothing() {
        let pts: Vec<_> = (0..5).map(|i| (sid(i), t(2024, 1, 1 + i, 0, 0))).collect();
        let d = plan(&policy(|p| p.last = Some(0)), &pts);
        assert!(d.iter().all(|d| !d.keep && d.reasons.is_empty()));
    }

    /// 10 daily snapshots (given oldest first), keep-daily 3: the 3 newest days, in input order.
    #[test]
    fn keep_daily_three_of_ten() {
        let pts: Vec<_> = (0..10)
            .map(|i| (sid(i), t(2024, 3, 1 + i, 12, 0)))
            .collect();
        let d = plan(&policy(|p| p.daily = Some(3)), &pts);
        assert_eq!(
            d.iter().map(|d| d.id).collect::<Vec<_>>(),
            (0..10).map(sid).collect::<Vec<_>>()
        );
        assert_eq!(kept(&d), vec![sid(7), sid(8), sid(9)]);
        assert!(d[9].reasons == ["daily"]);
        assert!(d[0].reasons.is_empty());
    }

    /// Two snapshots on the same day: keep-daily keeps only the newer one; the day slot is not
    /// spent twice, so the next day gets its own.
    #[test]
    fn same_day_keeps_newest() {
        let pts = vec![
            (sid(1), t(2024, 3, 1, 9, 0)),
            (sid(2), t(2024, 3, 2, 8, 0)),
            (sid(3), t(2024, 3, 2, 20, 0)),
        ];
        let d = plan(&policy(|p| p.daily = Some(2)), &pts);
        assert_eq!(kept(&d), vec![sid(1), sid(3)]);
        let d = plan(&policy(|p| p.daily = Some(1)), &pts);
        assert_eq!(kept(&d), vec![sid(3)]);
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let mut pts: Vec<_> = (0..30)
            .map(|i| (sid(i), t(2024, 1, 1, 0, 0) + Duration::hours(7 * i as i64)))
            .collect();
        let p = policy(|p| {
            p.last = Some(2);
            p.daily = Some(4);
            p.weekly = Some(2);
        });
        let a = plan(&p, &pts);
        pts.reverse();
        let mut b = plan(&p, &pts);
        b.reverse();
        assert_eq!(a, b);
    }

    #[test]
    fn keep_last_and_reasons() {
        let pts: Vec<_> = (0..6).map(|i| (sid(i), t(2024, 1, 1, i, 0))).collect();
        let d = plan(
            &policy(|p| {
                p.last = Some(2);
                p.hourly = Some(3);
                p.yearly = Some(1);
            }),
            &pts,
        );
        assert_eq!(kept(&d), vec![sid(3), sid(4), sid(5)]);
        assert_eq!(d[5].reasons, vec!["last", "hourly", "yearly"]);
        assert_eq!(d[4].reasons, vec!["last", "hourly"]);
        assert_eq!(d[3].reasons, vec!["hourly"]);
    }

    /// Weekly uses ISO weeks (Monday start; the ISO year differs from the calendar year around
    /// New Year); monthly and yearly take the newest of each.
    #[test]
    fn weekly_monthly_yearly() {
        // 2024-12-30 (Mon) and 2025-01-05 (Sun) are both ISO 2025-W01; 2024-12-29 is 2024-W52.
        let pts = vec![
            (sid(1), t(2024, 12, 29, 10, 0)),
            (sid(2), t(2024, 12, 30, 10, 0)),
            (sid(3), t(2025, 1, 5, 10, 0)),
            (sid(4), t(2025, 1, 6, 10, 0)),
        ];
        let d = plan(&policy(|p| p.weekly = Some(10)), &pts);
        assert_eq!(kept(&d), vec![sid(1), sid(3), sid(4)]);
        let d = plan(&policy(|p| p.monthly = Some(10)), &pts);
        assert_eq!(kept(&d), vec![sid(2), sid(4)]);
        let d = plan(&policy(|p| p.yearly = Some(10)), &pts);
        assert_eq!(kept(&d), vec![sid(2), sid(4)]);
        let d = plan(&policy(|p| p.yearly = Some(1)), &pts);
        assert_eq!(kept(&d), vec![sid(4)]);
    }

    /// restic's documented example shape: keep-daily 7 and keep-weekly 4 over two months of
    /// nightly snapshots keeps 7 nights plus the newest of 4 weeks, overlapping where they meet.
    #[test]
    fn daily_and_weekly_overlap() {
        // Nightly from Mon 2024-01-01 to Sun 2024-02-25 (8 full ISO weeks).
        let pts: Vec<_> = (0..56)
            .map(|i| (sid(i), t(2024, 1, 1, 23, 0) + Duration::days(i as i64)))
            .collect();
        let d = plan(
            &policy(|p| {
                p.daily = Some(7);
                p.weekly = Some(4);
            }),
            &pts,
        );
        // Daily: the last 7 nights (49..=55); weekly: the Sundays of the last 4 weeks.
        let want: Vec<_> = [34, 41, 48, 49, 50, 51, 52, 53, 54, 55]
            .into_iter()
            .map(sid)
            .collect();
        assert_eq!(kept(&d), want);
        assert_eq!(d[55].reasons, vec!["daily", "weekly"]);
        assert_eq!(d[48].reasons, vec!["weekly"]);
    }

    #[test]
    fn equal_times_break_ties_by_id() {
        let when = t(2024, 5, 5, 5, 5);
        let pts = vec![(sid(1), when), (sid(3), when), (sid(2), when)];
        let d = plan(&policy(|p| p.last = Some(1)), &pts);
        assert_eq!(kept(&d), vec![sid(3)]);
        let d = plan(&policy(|p| p.daily = Some(5)), &pts);
        assert_eq!(kept(&d), vec![sid(3)]);
    }

    type KeyFn = Box<dyn Fn(&DateTime<Utc>) -> Bucket>;

    /// Independent model of one time rule: group by bucket, the N newest buckets, newest point
    /// of each.
    fn model(
        pts: &[(SnapshotId, DateTime<Utc>)],
        n: u32,
        key: impl Fn(&DateTime<Utc>) -> Bucket,
    ) -> Vec<bool> {
        let mut groups: BTreeMap<Bucket, usize> = BTreeMap::new();
        for (i, (id, t)) in pts.iter().enumerate() {
            let e = groups.entry(key(t)).or_insert(i);
            if (pts[*e].1, pts[*e].0) < (*t, *id) {
                *e = i;
            }
        }
        let mut keep = vec![false; pts.len()];
        for (_, &i) in groups.iter().rev().take(n as usize) {
            keep[i] = true;
        }
        keep
    }

    fn points() -> impl Strategy<Value = Vec<(SnapshotId, DateTime<Utc>)>> {
        // Times within ~3 years, clustered (minutes apart up to months apart).
        prop::collection::vec(
            (
                0u32..1000,
                prop_oneof![0i64..600, 0i64..200_000, 0i64..100_000_000],
            ),
            0..60,
        )
        .prop_map(|v| {
            let base = t(2022, 11, 27, 0, 0).timestamp();
            v.into_iter()
                .enumerate()
                .map(|(k, (id, off))| {
                    (
                        sid(id * 100 + k as u32),
                        Utc.timestamp_opt(base + off, 0).unwrap(),
                    )
                })
                .collect()
        })
    }

    fn opt() -> impl Strategy<Value = Option<u32>> {
        prop_oneof![Just(None), (0u32..6).prop_map(Some)]
    }

    proptest! {
        #[test]
        fn rules_match_model(pts in points(), n in 0u32..8) {
            let cases: [(RetentionPolicy, &str, KeyFn); 5] = [
                (policy(|p| p.hourly = Some(n)), "hourly",
                 Box::new(|t| (t.year() as i64, t.month(), t.day(), t.hour()))),
                (policy(|p| p.daily = Some(n)), "daily",
                 Box::new(|t| (t.year() as i64, t.month(), t.day(), 0))),
                (policy(|p| p.weekly = Some(n)), "weekly",
                 Box::new(|t| (t.iso_week().year() as i64, t.iso_week().week(), 0, 0))),
                (policy(|p| p.monthly = Some(n)), "monthly",
                 Box::new(|t| (t.year() as i64, t.month(), 0, 0))),
                (policy(|p| p.yearly = Some(n)), "yearly", Box::new(|t| (t.year() as i64, 0, 0, 0))),
            ];
            for (p, reason, key) in cases {
                let d = plan(&p, &pts);
                let want = model(&pts, n, key);
                prop_assert_eq!(d.iter().map(|d| d.keep).collect::<Vec<_>>(), want, "{}", reason);
                for x in &d {
                    prop_assert_eq!(x.keep, x.reasons == [reason]);
                }
            }
            // keep-last: the n newest.
            let d = plan(&policy(|p| p.last = Some(n)), &pts);
            let mut order: Vec<usize> = (0..pts.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse((pts[i].1, pts[i].0)));
            let mut want = vec![false; pts.len()];
            for &i in order.iter().take(n as usize) {
                want[i] = true;
            }
            prop_assert_eq!(d.iter().map(|d| d.keep).collect::<Vec<_>>(), want);
        }

        #[test]
        fn combined_policy_laws(
            pts in points(),
            (last, hourly, daily, weekly, monthly, yearly) in (opt(), opt(), opt(), opt(), opt(), opt()),
        ) {
            let p = RetentionPolicy { last, hourly, daily, weekly, monthly, yearly };
            let d = plan(&p, &pts);
            prop_assert_eq!(d.len(), pts.len());
            for (x, (id, _)) in d.iter().zip(&pts) {
                prop_assert_eq!(x.id, *id);
                if !p.is_empty() {
                    prop_assert_eq!(x.keep, !x.reasons.is_empty());
                }
            }
            if p.is_empty() {
                prop_assert!(d.iter().all(|x| x.keep));
                return Ok(());
            }
            // Per rule: at most N kept, and the union of rules is what's kept.
            for (rule, n) in p.rules() {
                let count = d.iter().filter(|x| x.reasons.contains(&rule.reason())).count();
                prop_assert!(count as u32 <= n.unwrap_or(0), "{:?}", rule);
            }
            // The newest point is kept when any rule keeps at least one.
            let any = p.rules().iter().any(|(_, n)| n.is_some_and(|n| n >= 1));
            if let Some(newest) = (0..pts.len()).max_by_key(|&i| (pts[i].1, pts[i].0)) {
                prop_assert_eq!(d[newest].keep, any);
            }
            // Each rule on its own keeps exactly what it contributes to the combination.
            for (rule, n) in p.rules() {
                let mut single = RetentionPolicy::default();
                match rule {
                    Rule::Last => single.last = n,
                    Rule::Hourly => single.hourly = n,
                    Rule::Daily => single.daily = n,
                    Rule::Weekly => single.weekly = n,
                    Rule::Monthly => single.monthly = n,
                    Rule::Yearly => single.yearly = n,
                }
                if single.is_empty() {
                    continue;
                }
                let alone = plan(&single, &pts);
                for (x, y) in d.iter().zip(&alone) {
                    prop_assert_eq!(x.reasons.contains(&rule.reason()), y.keep);
                }
            }
        }
    }
}
