//! Temporary objects left by killed writers (the local store's `.tmp-*` files): `check` reports
//! them, `prune` removes those no live writer can own.
//!
//! Which age is safe: a writer's temporary is written in one go (at most one pack) and then
//! published by a rename, so a live writer's temporary was written to moments ago. One idle for
//! longer than the lease timeout belongs to a process that is dead or stalled past its lease
//! (SIGSTOP, a suspended machine, a store outage): such a process has lost its lease anyway and
//! must not commit. If it resumes after its temporary was removed, its publishing rename (or
//! link) finds nothing and the put fails: the operation fails with an error and never publishes
//! a partial object. The clock-skew allowance is added because the file's time comes from the
//! clock of whatever host (or file server) wrote it.
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::Result;
use crate::Repository;

/// What prune removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TemporaryStats {
    pub removed: u64,
    pub bytes: u64,
}

impl Repository {
    /// Temporaries idle for longer than this belong to no live writer: the lease timeout plus
    /// the clock-skew allowance (module documentation).
    pub fn temporary_max_age(&self) -> Duration {
        self.tuning.lease_timeout + self.tuning.clock_skew
    }

    /// Remove the temporaries older than [`Repository::temporary_max_age`].
    pub fn remove_stale_temporaries(&self) -> Result<TemporaryStats> {
        let r = self.store.remove_temporaries(self.temporary_max_age())?;
        if r.count > 0 {
            tracing::info!(
                files = r.count,
                bytes = r.bytes,
                "removed temporary files of killed writers"
            );
        }
        Ok(TemporaryStats {
            removed: r.count,
            bytes: r.bytes,
        })
    }

    /// One warning per temporary present, for `check`.
    pub fn temporary_warnings(&self) -> Result<Vec<String>> {
        let max_age = self.temporary_max_age();
        Ok(self
            .store
            .list_temporaries()?
            .into_iter()
            .map(|t| {
                let age = SystemTime::now()
                    .duration_since(t.modified)
                    .unwrap_or_default();
                let fate = if age > max_age {
                    "left by a killed writer; the next prune removes it"
                } else {
                    "being written, or left by a writer killed less than the lease timeout ago"
                };
                format!(
                    "temporary file {} ({} bytes, last written {} s ago): {fate}",
                    t.location,
                    t.size,
                    age.as_secs()
                )
            })
            .collect())
    }
}
