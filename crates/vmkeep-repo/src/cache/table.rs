//! The cached blob index as the catalog describes it: the open runs, and for each run which of
//! its sources (index objects) the repository still lists. Entries of sources no longer listed
//! are never used, so the answers are those of the listed index objects, exactly as if they had
//! all been read (FORMAT.md §13.4), while the runs keep older entries until a merge drops them.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use vmkeep_core::BlobId;

use super::run::{Run, Source};
use crate::error::{Error, Result};
use crate::index::Location;

pub(crate) const CATALOG: &str = "catalog";
const CATALOG_HEAD: &str = "vmkeep-cache-catalog 1";

pub(crate) struct Table {
    pub(crate) runs: Vec<(Run, Vec<bool>)>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("runs", &self.runs.len())
            .finish()
    }
}

impl Table {
    /// Every live location of `id`, each (pack, offset) once.
    pub fn find(&self, id: &BlobId) -> Result<Vec<Location>> {
        let mut out: Vec<Location> = Vec::new();
        for (run, live) in &self.runs {
            for e in run.find(id)? {
                if !live[e.source as usize] {
                    continue;
                }
                let loc = run.location(&e);
                if !out
                    .iter()
                    .any(|l| l.pack == loc.pack && l.offset == loc.offset)
                {
                    out.push(loc);
                }
            }
        }
        Ok(out)
    }

    /// Packs named by the runs (with repeats across runs): how large the repository is.
    pub fn pack_count(&self) -> usize {
        self.runs.iter().map(|(r, _)| r.packs.len()).sum()
    }

    pub fn entries(&self) -> u64 {
        self.runs.iter().map(|(r, _)| r.entries).sum()
    }
}

/// The run file names of the catalog; None when there is none. A damaged catalog is reported
/// and treated as absent (the runs are rebuilt).
pub(crate) fn read_catalog(dir: &Path) -> Result<Option<Vec<String>>> {
    let path = dir.join(CATALOG);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            tracing::warn!(path = %path.display(), "the cache catalog is damaged; rebuilding");
            return Ok(None);
        }
        Err(e) => return Err(Error::cache_io(&path, "read", e)),
    };
    let Some((body, sum)) = text.rsplit_once("sum ") else {
        tracing::warn!(path = %path.display(), "the cache catalog is damaged; rebuilding");
        return Ok(None);
    };
    if blake3::hash(body.as_bytes()).to_hex().as_str() != sum.trim_end() {
        tracing::warn!(path = %path.display(), "the cache catalog is damaged; rebuilding");
        return Ok(None);
    }
    let mut lines = body.lines();
    if lines.next() != Some(CATALOG_HEAD) {
        tracing::warn!(path = %path.display(), "the cache catalog is of another version; rebuilding");
        return Ok(None);
    }
    let mut runs = Vec::new();
    for l in lines {
        if !is_run_name(l) {
            tracing::warn!(path = %path.display(), "the cache catalog is damaged; rebuilding");
            return Ok(None);
        }
        runs.push(l.to_string());
    }
    Ok(Some(runs))
}

pub(crate) fn write_catalog(dir: &Path, runs: &[String]) -> Result<()> {
    let mut body = format!("{CATALOG_HEAD}\n");
    for r in runs {
        body.push_str(r);
        body.push('\n');
    }
    let sum = blake3::hash(body.as_bytes()).to_hex();
    body.push_str(&format!("sum {sum}\n"));
    super::publish(&dir.join(CATALOG), body.as_bytes())
}

pub(crate) fn is_run_name(s: &str) -> bool {
    s.len() == 4 + 32 + 4
        && s.starts_with("run-")
        && s.ends_with(".vkr")
        && s[4..36].bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn new_run_name() -> String {
    format!(
        "run-{}.vkr",
        hex::encode(&vmkeep_core::SnapshotId::random().0[..16])
    )
}

/// Mark which sources of `run` are among `listed` (same name, size and time).
pub(crate) fn live_mask(run: &Run, listed: &HashSet<Source>) -> Vec<bool> {
    run.sources.iter().map(|s| listed.contains(s)).collect()
}

pub(crate) fn run_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
