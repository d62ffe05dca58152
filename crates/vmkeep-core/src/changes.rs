//! Change maps: which chunks of a disk have an id different from the parent restore point's.
//! FORMAT.md "Change maps". Stored in the manifest as sorted, disjoint, non-adjacent runs
//! `[[first_chunk, count], ...]`. Exactness comes from comparing ids; a map may be a superset
//! only after a merge (forget), and consumers confirm candidates by comparing ids.
use serde::{Deserialize, Serialize};

use crate::error::Result;

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
    pub fn from_sorted(indexes: impl IntoIterator<Item = u64>) -> ChangeMap {
        todo!()
    }

    /// Validate a map read from a manifest: runs sorted, disjoint, non-adjacent, non-empty, and
    /// within `chunks`.
    pub fn validate(&self, chunks: u64) -> Result<()> {
        todo!()
    }

    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// Number of chunks marked.
    pub fn count(&self) -> u64 {
        todo!()
    }

    pub fn contains(&self, index: u64) -> bool {
        todo!()
    }

    /// Union (used when forgetting a restore point merges its map into its successor's).
    pub fn union(&self, other: &ChangeMap) -> ChangeMap {
        todo!()
    }

    /// Every marked chunk index, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|&(s, n)| s..s + n)
    }

    /// Marked chunks limited to [0, chunks) (a disk that shrank).
    pub fn truncate(&self, chunks: u64) -> ChangeMap {
        todo!()
    }
}
