//! Change maps: which chunks of a disk have an id different from the parent restore point's.
//! FORMAT.md "Change maps". Stored in the manifest as sorted, disjoint, non-adjacent runs
//! `[[first_chunk, count], ...]`. Exactness comes from comparing ids; a map may be a superset
//! only after a merge (forget), and consumers confirm candidates by comparing ids.
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChangeMap {
    runs: Vec<(u64, u64)>,
}

impl ChangeMap {
    pub fn new() -> ChangeMap {
        ChangeMap::default()
    }

    /// From strictly ascending chunk indexes.
    ///
    /// Repeated consecutive indexes are tolerated (skipped). A descending index is a caller bug
    /// (debug assertion); release builds then fall back to sorting, so the map never loses an
    /// index and is always normalized.
    pub fn from_sorted(indexes: impl IntoIterator<Item = u64>) -> ChangeMap {
        let mut iter = indexes.into_iter();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        while let Some(i) = iter.next() {
            match runs.last_mut() {
                None => runs.push((i, 1)),
                Some((s, n)) => {
                    let last = *s + (*n - 1);
                    if i == last {
                        continue;
                    } else if i > last {
                        if i - last == 1 {
                            *n += 1;
                        } else {
                            runs.push((i, 1));
                        }
                    } else {
                        debug_assert!(false, "ChangeMap::from_sorted: {i} after {last}");
                        let mut all: Vec<u64> = ChangeMap { runs }.iter().collect();
                        all.push(i);
                        all.extend(iter);
                        all.sort_unstable();
                        return ChangeMap::from_sorted(all);
                    }
                }
            }
        }
        ChangeMap { runs }
    }

    /// Validate a map read from a manifest: runs sorted, disjoint, non-adjacent, non-empty, and
    /// within `chunks`.
    pub fn validate(&self, chunks: u64) -> Result<()> {
        let bad = |reason: String| Error::Corrupt {
            kind: "change map",
            reason,
        };
        let mut prev_end: Option<u64> = None;
        for (k, &(s, n)) in self.runs.iter().enumerate() {
            if n == 0 {
                return Err(bad(format!("run {k} [{s}, +0) is empty")));
            }
            let end = match s.checked_add(n) {
                Some(end) if end <= chunks => end,
                _ => {
                    return Err(bad(format!(
                        "run {k} [{s}, +{n}) extends beyond the disk's {chunks} chunks"
                    )))
                }
            };
            if let Some(p) = prev_end {
                if s < p {
                    return Err(bad(format!(
                        "run {k} [{s}, +{n}) overlaps or precedes the previous run (ends at {p})"
                    )));
                }
                if s == p {
                    return Err(bad(format!(
                        "run {k} [{s}, +{n}) is adjacent to the previous run (not merged)"
                    )));
                }
            }
            prev_end = Some(end);
        }
        Ok(())
    }

    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// Number of chunks marked.
    pub fn count(&self) -> u64 {
        self.runs
            .iter()
            .fold(0u64, |acc, &(_, n)| acc.saturating_add(n))
    }

    pub fn contains(&self, index: u64) -> bool {
        // Runs are sorted by start: the candidate is the last run starting at or before index.
        let k = self.runs.partition_point(|&(s, _)| s <= index);
        k > 0 && {
            let (s, n) = self.runs[k - 1];
            index - s < n
        }
    }

    /// Union (used when forgetting a restore point merges its map into its successor's).
    ///
    /// A linear merge of two normalized maps; the result is normalized (overlapping and adjacent
    /// runs merged).
    pub fn union(&self, other: &ChangeMap) -> ChangeMap {
        // Ends as u128 so a run reaching u64::MAX cannot overflow.
        let mut out: Vec<(u64, u128)> = Vec::with_capacity(self.runs.len() + other.runs.len());
        let (mut a, mut b) = (self.runs.iter().peekable(), other.runs.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.0 <= y.0 => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            let &(s, n) = next.expect("peeked");
            if n == 0 {
                continue;
            }
            // Clamped to the index space: an invalid run may claim more.
            let end = (s as u128 + n as u128).min(1u128 << 64);
            match out.last_mut() {
                Some((_, e)) if s as u128 <= *e => *e = (*e).max(end),
                _ => out.push((s, end)),
            }
        }
        let mut runs = Vec::with_capacity(out.len());
        for (s, e) in out {
            let len = e - s as u128;
            if len > u64::MAX as u128 {
                // Only [0, 2^64): not representable as one run (and never valid for a disk).
                runs.push((s, u64::MAX));
                runs.push((s + u64::MAX, (len - u64::MAX as u128) as u64));
            } else {
                runs.push((s, len as u64));
            }
        }
        ChangeMap { runs }
    }

    /// Every marked chunk index, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        // (0..n) rather than s..s + n: a run ending at u64::MAX does not overflow (and an invalid
        // one stops at u64::MAX).
        self.runs
            .iter()
            .flat_map(|&(s, n)| (0..n).map_while(move |k| s.checked_add(k)))
    }

    /// Marked chunks limited to [0, chunks) (a disk that shrank).
    pub fn truncate(&self, chunks: u64) -> ChangeMap {
        let runs = self
            .runs
            .iter()
            .filter(|&&(s, n)| s < chunks && n > 0)
            .map(|&(s, n)| (s, n.min(chunks - s)))
            .collect();
        ChangeMap { runs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn map(runs: &[(u64, u64)]) -> ChangeMap {
        ChangeMap {
            runs: runs.to_vec(),
        }
    }

    fn is_normalized(m: &ChangeMap) -> bool {
        m.runs.iter().all(|&(_, n)| n > 0)
            && m.runs
                .windows(2)
                .all(|w| (w[0].0 as u128 + w[0].1 as u128) < (w[1].0 as u128))
    }

    #[test]
    fn from_sorted_merges_consecutive() {
        assert_eq!(ChangeMap::from_sorted([]), ChangeMap::new());
        assert_eq!(ChangeMap::from_sorted([5]).runs(), &[(5, 1)]);
        let m = ChangeMap::from_sorted([0, 1, 2, 4, 5, 9]);
        assert_eq!(m.runs(), &[(0, 3), (4, 2), (9, 1)]);
        assert_eq!(m.count(), 6);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 1, 2, 4, 5, 9]);
        // Repeated consecutive values are skipped.
        assert_eq!(
            ChangeMap::from_sorted([3, 3, 4, 4, 7]).runs(),
            &[(3, 2), (7, 1)]
        );
        // Extremes do not overflow.
        let m = ChangeMap::from_sorted([u64::MAX - 1, u64::MAX]);
        assert_eq!(m.runs(), &[(u64::MAX - 1, 2)]);
        assert_eq!(m.count(), 2);
        assert!(m.contains(u64::MAX));
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![u64::MAX - 1, u64::MAX]);
        m.validate(u64::MAX).unwrap_err();
        assert_eq!(
            ChangeMap::from_sorted([u64::MAX, u64::MAX]).runs(),
            &[(u64::MAX, 1)]
        );
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "from_sorted")]
    fn from_sorted_descending_is_a_debug_assertion() {
        ChangeMap::from_sorted([5, 3]);
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn from_sorted_descending_falls_back_to_sorting() {
        let m = ChangeMap::from_sorted([5, 6, 3, 9, 4, 4]);
        assert_eq!(m.runs(), &[(3, 4), (9, 1)]);
    }

    #[test]
    fn validate_cases() {
        map(&[]).validate(0).unwrap();
        map(&[(0, 10)]).validate(10).unwrap();
        map(&[(0, 1), (2, 3), (9, 1)]).validate(10).unwrap();
        let err = |m: ChangeMap, chunks| match m.validate(chunks) {
            Err(Error::Corrupt {
                kind: "change map",
                reason,
            }) => reason,
            other => panic!("{m:?} in {chunks}: {other:?}"),
        };
        assert!(err(map(&[(0, 0)]), 10).contains("empty"));
        assert!(err(map(&[(0, 11)]), 10).contains("beyond"));
        assert!(err(map(&[(10, 1)]), 10).contains("beyond"));
        assert!(err(map(&[(0, 1)]), 0).contains("beyond"));
        assert!(err(map(&[(u64::MAX, 2)]), u64::MAX).contains("beyond"));
        assert!(err(map(&[(2, u64::MAX)]), u64::MAX).contains("beyond"));
        assert!(err(map(&[(0, 2), (2, 1)]), 10).contains("adjacent"));
        assert!(err(map(&[(0, 3), (2, 1)]), 10).contains("overlaps"));
        assert!(err(map(&[(5, 1), (2, 1)]), 10).contains("overlaps"));
        assert!(err(map(&[(5, 1), (5, 1)]), 10).contains("overlaps"));
        let msg = map(&[(0, 0)]).validate(1).unwrap_err().to_string();
        assert!(msg.starts_with("corrupt change map:"), "{msg}");
    }

    #[test]
    fn contains_and_truncate() {
        let m = map(&[(2, 3), (10, 1), (20, 5)]);
        let members: Vec<u64> = (0..30).filter(|&i| m.contains(i)).collect();
        assert_eq!(members, m.iter().collect::<Vec<_>>());
        assert!(!ChangeMap::new().contains(0));
        assert_eq!(m.truncate(100), m);
        assert_eq!(m.truncate(22).runs(), &[(2, 3), (10, 1), (20, 2)]);
        assert_eq!(m.truncate(20).runs(), &[(2, 3), (10, 1)]);
        assert_eq!(m.truncate(3).runs(), &[(2, 1)]);
        assert_eq!(m.truncate(2), ChangeMap::new());
        assert_eq!(m.truncate(0), ChangeMap::new());
    }

    #[test]
    fn union_cases() {
        let a = map(&[(0, 2), (10, 5)]);
        let b = map(&[(2, 3), (12, 10), (30, 1)]);
        assert_eq!(a.union(&b).runs(), &[(0, 5), (10, 12), (30, 1)]);
        assert_eq!(b.union(&a), a.union(&b));
        assert_eq!(a.union(&ChangeMap::new()), a);
        assert_eq!(ChangeMap::new().union(&a), a);
        assert_eq!(a.union(&a), a);
        // Containment, and a run reaching u64::MAX.
        let big = map(&[(0, u64::MAX)]);
        assert_eq!(big.union(&a), big);
        let top = map(&[(u64::MAX, 1)]);
        // 2^64 chunks do not fit one run's count: two runs (never valid for a disk anyway).
        assert_eq!(big.union(&top).runs(), &[(0, u64::MAX), (u64::MAX, 1)]);
        assert_eq!(
            top.union(&map(&[(u64::MAX - 1, 1)])).runs(),
            &[(u64::MAX - 1, 2)]
        );
    }

    #[test]
    fn serde_format() {
        let m = map(&[(0, 3), (7, 1)]);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, "[[0,3],[7,1]]");
        assert_eq!(serde_json::from_str::<ChangeMap>(&json).unwrap(), m);
        assert_eq!(serde_json::to_string(&ChangeMap::new()).unwrap(), "[]");
        assert!(serde_json::from_str::<ChangeMap>("[[1]]").is_err());
        assert!(serde_json::from_str::<ChangeMap>("{}").is_err());
    }

    fn index_set() -> impl Strategy<Value = BTreeSet<u64>> {
        // Clustered indexes so runs of several chunks and adjacency happen often.
        prop::collection::btree_set(0u64..300, 0..120)
    }

    proptest! {
        #[test]
        fn from_sorted_iter_round_trip(set in index_set()) {
            let m = ChangeMap::from_sorted(set.iter().copied());
            prop_assert!(is_normalized(&m));
            prop_assert_eq!(m.iter().collect::<BTreeSet<_>>(), set.clone());
            prop_assert_eq!(m.iter().collect::<Vec<_>>(), set.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(m.count(), set.len() as u64);
            for i in 0..310 {
                prop_assert_eq!(m.contains(i), set.contains(&i));
            }
            let bound = set.last().map_or(0, |l| l + 1);
            prop_assert!(m.validate(bound).is_ok());
            prop_assert!(m.validate(bound + 1000).is_ok());
            if bound > 0 {
                prop_assert!(m.validate(bound - 1).is_err());
            }
            // Duplicating every index changes nothing.
            let dup = ChangeMap::from_sorted(set.iter().flat_map(|&i| [i, i]));
            prop_assert_eq!(&dup, &m);
            // JSON round trip.
            let json = serde_json::to_string(&m).unwrap();
            prop_assert_eq!(serde_json::from_str::<ChangeMap>(&json).unwrap(), m);
        }

        #[test]
        fn union_is_set_union(a in index_set(), b in index_set()) {
            let (ma, mb) = (ChangeMap::from_sorted(a.iter().copied()),
                            ChangeMap::from_sorted(b.iter().copied()));
            let u = ma.union(&mb);
            prop_assert!(is_normalized(&u));
            let want: BTreeSet<u64> = a.union(&b).copied().collect();
            prop_assert_eq!(u.iter().collect::<BTreeSet<_>>(), want.clone());
            prop_assert_eq!(&u, &ChangeMap::from_sorted(want.iter().copied()));
            prop_assert_eq!(&u, &mb.union(&ma));
            prop_assert!(u.validate(300).is_ok());
        }

        #[test]
        fn truncate_is_filter(set in index_set(), chunks in 0u64..320) {
            let m = ChangeMap::from_sorted(set.iter().copied());
            let t = m.truncate(chunks);
            prop_assert!(is_normalized(&t));
            prop_assert!(t.validate(chunks).is_ok());
            let want: Vec<u64> = set.iter().copied().filter(|&i| i < chunks).collect();
            prop_assert_eq!(t.iter().collect::<Vec<_>>(), want);
        }

        /// validate accepts exactly the normalized maps within the disk (model: runs checked
        /// pairwise), and never panics on arbitrary runs.
        #[test]
        fn validate_matches_model(
            runs in prop::collection::vec(
                (prop_oneof![0u64..200, Just(u64::MAX - 1), Just(u64::MAX)],
                 prop_oneof![0u64..20, Just(u64::MAX)]), 0..8),
            chunks in prop_oneof![0u64..250, Just(u64::MAX)],
        ) {
            let m = ChangeMap { runs: runs.clone() };
            let in_disk = runs.iter().all(|&(s, n)| n > 0 && s as u128 + n as u128 <= chunks as u128);
            let model = in_disk && is_normalized(&m);
            prop_assert_eq!(m.validate(chunks).is_ok(), model);
            if model {
                // A valid map is its own normal form.
                let re = ChangeMap::from_sorted(m.iter().take(10_000));
                if m.count() <= 10_000 {
                    prop_assert_eq!(re, m.clone());
                }
            }
            let _ = (m.count(), m.contains(5), m.truncate(chunks), m.union(&m));
        }

        /// Breaking a normalized map in any of the ways a manifest could is rejected.
        #[test]
        fn validate_rejects_broken(set in prop::collection::btree_set(0u64..300, 2..60), k in any::<prop::sample::Index>(), how in 0u8..4) {
            let m = ChangeMap::from_sorted(set.iter().copied());
            prop_assume!(m.runs.len() >= 2);
            let mut runs = m.runs.clone();
            let i = k.index(runs.len() - 1);
            match how {
                0 => runs.swap(i, i + 1),                        // unsorted
                1 => runs[i].1 = runs[i + 1].0 - runs[i].0 + 1,  // overlapping
                2 => runs[i].1 = runs[i + 1].0 - runs[i].0,      // adjacent
                _ => runs[i].1 = 0,                              // empty
            }
            let broken = ChangeMap { runs };
            prop_assert!(broken.validate(1000).is_err());
            // Out of range.
            prop_assert!(m.validate(*set.last().unwrap()).is_err());
        }
    }
}
