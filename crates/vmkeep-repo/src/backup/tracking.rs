//! A change-tracking (`cbt: used`) read plan checked against the disk's allocation before it is
//! trusted.
//!
//! A dirty bitmap can miss changes that are not writes: QEMU marks nothing dirty when a disk is
//! shrunk and grown back (`block_resize`), yet the area cut off then reads as zeros. So before
//! a `used` plan runs, the chunks that read as all zeros now ([`ReadPlan::zero_runs`], from the
//! source's allocation map) and were not marked dirty are looked up in the base tree: if one of
//! them holds data there, the bitmap provably missed a change, and the disk is rescanned (every
//! chunk outside the zero runs read, no base) with a reason.
//!
//! Cost: the base tree's nodes at the edges of the zero runs (an all-zero subtree is never
//! loaded, and a subtree holding data wholly inside a zero run ends the check after one path),
//! at most every stored node of the base tree and usually far fewer; no chunk data is read.
//!
//! Limit: the check has chunk precision. A chunk only partly zero now (a disk shrunk to a size
//! that is not a multiple of the chunk size, then grown back, on a raw image whose file system
//! zeroes the cut-off tail) cannot be compared with the base without reading it, so it is not
//! checked; the whole zero chunks after it are, and reveal the shrink whenever the base held
//! data anywhere in them. (qcow2 images keep the old bytes of the cluster holding the shrunk
//! end, so with 64 KiB clusters and chunks nothing is partly zero there.)
use tracing::warn;
use vmkeep_core::manifest::ChangeTracking;
use vmkeep_core::tree;

use super::ReadPlan;
use crate::error::{Error, Result};
use crate::index::BlobIndex;
use crate::nodes::RepoNodes;
use crate::Repository;

/// Reason recorded when the allocation contradicts the bitmap.
pub(crate) const CONTRADICTED: &str =
    "the disk reads zeros where its last restore point has data, with no write recorded \
     (shrunk and grown back?)";

/// `plan` itself, or for a `used` plan the allocation contradicts, a rescan of the disk.
pub(crate) fn check_used_plan(
    repo: &Repository,
    index: &BlobIndex,
    disk: &str,
    plan: ReadPlan,
    size: u64,
) -> Result<ReadPlan> {
    let Some(base) = plan.base else {
        return Ok(plan);
    };
    if plan.cbt != ChangeTracking::Used || plan.zero_runs.is_empty() {
        return Ok(plan);
    }
    let chunks = size.div_ceil(repo.config.chunk_size as u64);
    validate_runs(&plan.zero_runs, chunks)?;
    let unrecorded = subtract(&plan.zero_runs, &plan.runs);
    let nodes = RepoNodes::new(repo, index);
    let found = nodes.typed(
        tree::first_nonzero_in(&nodes, &base, chunks, &unrecorded),
        || format!("index of the last restore point's disk {disk}"),
    )?;
    let Some(chunk) = found else {
        return Ok(plan);
    };
    warn!(
        disk,
        chunk, "{CONTRADICTED}: the dirty bitmap missed changes; reading the whole disk"
    );
    Ok(ReadPlan {
        base: None,
        runs: complement(&plan.zero_runs, chunks),
        cbt: ChangeTracking::Rescan,
        cbt_reason: Some(format!("{CONTRADICTED}: first at chunk {chunk}")),
        ..plan
    })
}

/// `runs` must be ascending, disjoint, non-empty and inside the disk: they come from a source.
fn validate_runs(runs: &[(u64, u64)], chunks: u64) -> Result<()> {
    let mut next = 0u64;
    for &(first, count) in runs {
        let end = first.checked_add(count);
        if count == 0 || first < next || end.is_none_or(|e| e > chunks) {
            return Err(Error::Internal(format!(
                "invalid zero run ({first}, {count}) for {chunks} chunks"
            )));
        }
        next = first + count;
    }
    Ok(())
}

/// The chunks of `a` not in `b` (both ascending and disjoint), as runs.
fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(first, count) in a {
        let (mut pos, end) = (first, first + count);
        while j < b.len() && b[j].0 + b[j].1 <= pos {
            j += 1;
        }
        let mut k = j;
        while pos < end {
            match b.get(k) {
                Some(&(bf, bn)) if bf < end => {
                    if bf > pos {
                        out.push((pos, bf - pos));
                    }
                    pos = pos.max(bf + bn);
                    k += 1;
                }
                _ => {
                    out.push((pos, end - pos));
                    pos = end;
                }
            }
        }
    }
    out
}

/// The chunks of a disk of `chunks` chunks outside `runs` (ascending and disjoint).
fn complement(runs: &[(u64, u64)], chunks: u64) -> Vec<(u64, u64)> {
    subtract(&[(0, chunks)], runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_arithmetic() {
        assert_eq!(
            subtract(&[(0, 10), (20, 5)], &[(2, 3), (8, 14)]),
            vec![(0, 2), (5, 3), (22, 3)]
        );
        assert_eq!(subtract(&[(0, 10)], &[]), vec![(0, 10)]);
        assert_eq!(subtract(&[(0, 10)], &[(0, 10)]), vec![]);
        assert_eq!(
            subtract(&[(5, 5)], &[(0, 6), (7, 1), (9, 9)]),
            vec![(6, 1), (8, 1)]
        );
        assert_eq!(complement(&[(0, 2), (5, 1)], 8), vec![(2, 3), (6, 2)]);
        assert_eq!(complement(&[], 3), vec![(0, 3)]);
        assert!(validate_runs(&[(0, 2), (2, 1)], 3).is_ok());
        assert!(validate_runs(&[(0, 2), (1, 1)], 3).is_err());
        assert!(validate_runs(&[(2, 2)], 3).is_err());
        assert!(validate_runs(&[(1, 0)], 3).is_err());
    }
}
