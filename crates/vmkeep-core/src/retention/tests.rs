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
    assert!(policy(|p| p.last = Some(0)).is_empty());
    assert!(!policy(|p| {
        p.last = Some(0);
        p.daily = Some(1);
    })
    .is_empty());
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
/// As in restic, a count of 0 means the rule is not given: alone it makes an empty policy
/// (which keeps everything: prune then only reclaims space), beside other rules it changes
/// nothing. (It used to keep nothing by itself, so `--keep-last 0` alone forgot every point.)
fn zero_counts_are_not_given() {
    let pts: Vec<_> = (0..5).map(|i| (sid(i), t(2024, 1, 1 + i, 0, 0))).collect();
    let d = plan(&policy(|p| p.last = Some(0)), &pts);
    assert!(d.iter().all(|d| d.keep && d.reasons.is_empty()));
    let with_zero = plan(
        &policy(|p| {
            p.last = Some(0);
            p.daily = Some(2);
        }),
        &pts,
    );
    assert_eq!(with_zero, plan(&policy(|p| p.daily = Some(2)), &pts));
    assert_eq!(kept(&with_zero), vec![sid(3), sid(4)]);
}

/// Buckets are UTC calendar units, whatever the host's time zone: 23:30 and 00:30 UTC are two
/// days (restic would use each snapshot's recorded zone, where they might be one day).
#[test]
fn buckets_are_utc() {
    let pts = vec![
        (sid(1), t(2024, 3, 1, 23, 30)),
        (sid(2), t(2024, 3, 2, 0, 30)),
    ];
    let d = plan(&policy(|p| p.daily = Some(1)), &pts);
    assert_eq!(kept(&d), vec![sid(2)]);
    let d = plan(&policy(|p| p.daily = Some(2)), &pts);
    assert_eq!(kept(&d), vec![sid(1), sid(2)]);
    assert_eq!(d[0].reasons, vec!["daily"]);
}

/// restic >= 0.16: a rule with counts left after every bucket also keeps the oldest point, so
/// the history reaches back as far as the counts allow.
#[test]
fn oldest_point_kept_while_counts_are_left() {
    // Three days, two points each; keep-daily 5 has counts left after the 3 days.
    let pts: Vec<_> = (0..6)
        .map(|i| (sid(i), t(2024, 3, 1 + i / 2, 6 + 12 * (i % 2), 0)))
        .collect();
    let d = plan(&policy(|p| p.daily = Some(5)), &pts);
    assert_eq!(kept(&d), vec![sid(0), sid(1), sid(3), sid(5)]);
    assert_eq!(d[0].reasons, vec!["oldest daily"]);
    assert_eq!(d[1].reasons, vec!["daily"]);
    // Exactly enough counts for the days: none left for the oldest point.
    let d = plan(&policy(|p| p.daily = Some(3)), &pts);
    assert_eq!(kept(&d), vec![sid(1), sid(3), sid(5)]);
    // Unlimited never runs out.
    let d = plan(
        &policy(|p| p.daily = Some(RetentionPolicy::UNLIMITED)),
        &pts,
    );
    assert_eq!(kept(&d), vec![sid(0), sid(1), sid(3), sid(5)]);
    // keep-last: every point is its own bucket, "oldest" never applies.
    let d = plan(&policy(|p| p.last = Some(10)), &pts);
    assert!(d.iter().all(|x| x.reasons == ["last"]));
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
    let d = plan(&policy(|p| p.monthly = Some(2)), &pts);
    assert_eq!(kept(&d), vec![sid(2), sid(4)]);
    let d = plan(&policy(|p| p.yearly = Some(2)), &pts);
    assert_eq!(kept(&d), vec![sid(2), sid(4)]);
    // Counts left after every month / year: the oldest point is kept too.
    let d = plan(&policy(|p| p.monthly = Some(10)), &pts);
    assert_eq!(kept(&d), vec![sid(1), sid(2), sid(4)]);
    assert_eq!(d[0].reasons, vec!["oldest monthly"]);
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
    let d = plan(&policy(|p| p.daily = Some(1)), &pts);
    assert_eq!(kept(&d), vec![sid(3)]);
    // The smallest id is the oldest point: kept by a rule with counts left.
    let d = plan(&policy(|p| p.daily = Some(5)), &pts);
    assert_eq!(kept(&d), vec![sid(1), sid(3)]);
    assert_eq!(d[0].reasons, vec!["oldest daily"]);
}

type KeyFn = Box<dyn Fn(&DateTime<Utc>) -> Bucket>;

/// Independent model of one time rule: group by bucket, the N newest buckets, newest point of
/// each; when fewer than N buckets exist, the oldest point too (restic >= 0.16). Returns each
/// point's reason (None: not kept by this rule).
fn model(
    pts: &[(SnapshotId, DateTime<Utc>)],
    n: u32,
    reason: &'static str,
    oldest_reason: &'static str,
    key: impl Fn(&DateTime<Utc>) -> Bucket,
) -> Vec<Option<&'static str>> {
    let mut groups: BTreeMap<Bucket, usize> = BTreeMap::new();
    for (i, (id, t)) in pts.iter().enumerate() {
        let e = groups.entry(key(t)).or_insert(i);
        if (pts[*e].1, pts[*e].0) < (*t, *id) {
            *e = i;
        }
    }
    let mut keep = vec![None; pts.len()];
    for (_, &i) in groups.iter().rev().take(n as usize) {
        keep[i] = Some(reason);
    }
    let oldest = (0..pts.len()).min_by_key(|&i| (pts[i].1, pts[i].0));
    if let Some(o) = oldest.filter(|_| groups.len() < n as usize) {
        keep[o].get_or_insert(oldest_reason);
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

/// Whether `rule` is among the reasons `x` is kept.
fn kept_by(x: &RetentionDecision, rule: Rule) -> bool {
    x.reasons.contains(&rule.reason()) || x.reasons.contains(&rule.oldest_reason())
}

fn opt() -> impl Strategy<Value = Option<u32>> {
    prop_oneof![
        Just(None),
        (0u32..6).prop_map(Some),
        Just(Some(RetentionPolicy::UNLIMITED))
    ]
}

proptest! {
    #[test]
    fn rules_match_model(
        pts in points(),
        n in prop_oneof![1u32..8, Just(RetentionPolicy::UNLIMITED)],
    ) {
        type Rule = (RetentionPolicy, &'static str, &'static str, KeyFn);
        let cases: [Rule; 5] = [
            (policy(|p| p.hourly = Some(n)), "hourly", "oldest hourly",
             Box::new(|t| (t.year() as i64, t.month(), t.day(), t.hour()))),
            (policy(|p| p.daily = Some(n)), "daily", "oldest daily",
             Box::new(|t| (t.year() as i64, t.month(), t.day(), 0))),
            (policy(|p| p.weekly = Some(n)), "weekly", "oldest weekly",
             Box::new(|t| (t.iso_week().year() as i64, t.iso_week().week(), 0, 0))),
            (policy(|p| p.monthly = Some(n)), "monthly", "oldest monthly",
             Box::new(|t| (t.year() as i64, t.month(), 0, 0))),
            (policy(|p| p.yearly = Some(n)), "yearly", "oldest yearly",
             Box::new(|t| (t.year() as i64, 0, 0, 0))),
        ];
        for (p, reason, oldest, key) in cases {
            let d = plan(&p, &pts);
            let want = model(&pts, n, reason, oldest, key);
            let got: Vec<Option<&str>> = d.iter().map(|x| {
                assert!(x.reasons.len() <= 1);
                x.reasons.first().copied()
            }).collect();
            prop_assert_eq!(got, want, "{}", reason);
            for x in &d {
                prop_assert_eq!(x.keep, !x.reasons.is_empty());
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
            let count = d.iter().filter(|x| kept_by(x, rule)).count();
            prop_assert!(count as u32 <= n.unwrap_or(0), "{:?}", rule);
            // A rule that keeps fewer than N keeps the oldest point (restic >= 0.16).
            let oldest = (0..pts.len()).min_by_key(|&i| (pts[i].1, pts[i].0));
            if let (Some(o), Some(n)) = (oldest, n.filter(|&n| n > 0)) {
                if (count as u32) < n {
                    prop_assert!(kept_by(&d[o], rule), "{:?}", rule);
                }
            }
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
                prop_assert_eq!(kept_by(x, rule), y.keep);
            }
        }
    }
}

/// A `case` of `restic_policy_cases.txt`: the policy and the kept points, newest first, as
/// (time, reasons).
struct ResticCase {
    name: String,
    policy: RetentionPolicy,
    keep: Vec<(DateTime<Utc>, Vec<String>)>,
}

fn parse_time(s: &str) -> DateTime<Utc> {
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
        .unwrap_or_else(|e| panic!("bad time {s:?}: {e}"))
        .and_utc()
}

fn parse_count(s: &str) -> u32 {
    if s == "unlimited" {
        RetentionPolicy::UNLIMITED
    } else {
        s.parse().unwrap()
    }
}

/// The input points and the cases of the fixture (format in its header).
fn restic_cases() -> (Vec<DateTime<Utc>>, Vec<ResticCase>) {
    let mut points = Vec::new();
    let mut cases: Vec<ResticCase> = Vec::new();
    for line in include_str!("restic_policy_cases.txt").lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if let Some(t) = line.strip_prefix("point ") {
            points.push(parse_time(t));
        } else if let Some(rest) = line.strip_prefix("case ") {
            let mut words = rest.split(' ');
            let name = words.next().unwrap().to_string();
            let mut policy = RetentionPolicy::default();
            for w in words {
                let (rule, n) = w.split_once('=').unwrap();
                let n = Some(parse_count(n));
                match rule {
                    "last" => policy.last = n,
                    "hourly" => policy.hourly = n,
                    "daily" => policy.daily = n,
                    "weekly" => policy.weekly = n,
                    "monthly" => policy.monthly = n,
                    "yearly" => policy.yearly = n,
                    other => panic!("unknown rule {other}"),
                }
            }
            cases.push(ResticCase {
                name,
                policy,
                keep: Vec::new(),
            });
        } else if let Some(rest) = line.strip_prefix("keep ") {
            let (t, reasons) = rest.rsplit_once(' ').unwrap();
            let reasons = reasons.split(',').map(|r| r.replace('-', " ")).collect();
            cases
                .last_mut()
                .unwrap()
                .keep
                .push((parse_time(t), reasons));
        } else {
            panic!("unknown fixture line {line:?}");
        }
    }
    (points, cases)
}

/// restic's own policy test expectations (ported as data): the same points kept, for the same
/// reasons, including the oldest point kept by a rule with counts left (restic >= 0.16).
#[test]
fn matches_restic_policy_expectations() {
    let (times, cases) = restic_cases();
    assert_eq!(times.len(), 103);
    assert_eq!(cases.len(), 21);
    // restic sorts stably, newest first: of equal times the earlier input counts as newer. Here
    // equal times are ordered by id, so earlier input gets the greater id.
    let n = times.len() as u32;
    let pts: Vec<(SnapshotId, DateTime<Utc>)> = times
        .iter()
        .enumerate()
        .map(|(i, t)| (sid(n - i as u32), *t))
        .collect();
    for case in cases {
        let d = plan(&case.policy, &pts);
        let mut got: Vec<(DateTime<Utc>, Vec<String>)> = d
            .iter()
            .zip(&pts)
            .filter(|(x, _)| x.keep)
            .map(|(x, (_, t))| (*t, x.reasons.iter().map(|r| r.to_string()).collect()))
            .collect();
        got.sort();
        let mut want = case.keep.clone();
        want.sort();
        assert_eq!(got, want, "restic case {} ({:?})", case.name, case.policy);
    }
}
