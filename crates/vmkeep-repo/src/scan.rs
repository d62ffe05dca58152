//! The whole repository seen in bounded memory, for `check` and `prune`: the blob index as the
//! local cache's sorted runs (brought up to date from the repository first), the packs as
//! listed, and the referenced ids as a sorted set on disk ([`IdSpill`]). A pass joins the
//! index with the referenced set in blob-id order, one [`Group`] per id, so the whole index is
//! never in memory: what stays in memory is per pack, and per restore point's metadata.
//!
//! Without a cache (`--no-cache`), or when another process holds the cache longer than the
//! lock wait, a temporary cache in the temporary folder (`TMPDIR`) serves, removed afterwards.
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use vmkeep_core::pack::PackEntry;
use vmkeep_core::{ObjectKind, PackId};
use vmkeep_store::Key;

use crate::cache::scan::Groups;
use crate::cache::{Cache, CacheOptions};
use crate::error::{Error, Result};
use crate::gc::plan::{Group, Visit};
use crate::index::{pack_sizes, BlobIndex};
use crate::spill::IdSpill;
use crate::Repository;

pub(crate) struct RepoScan {
    /// The lookup form of the same index (tree nodes are read from the store, never the
    /// cache's copies: check and GC verify the repository).
    pub index: BlobIndex,
    /// Packs that exist (listed after the index objects were read), with their sizes.
    pub sizes: HashMap<PackId, u64>,
    /// Listed index objects that could not be read.
    pub damaged: Vec<(Key, vmkeep_core::Error)>,
    /// Index objects read and verified by this scan's cache update.
    fresh: HashSet<[u8; 32]>,
    _temporary: Option<Temporary>,
}

/// A cache folder of this run only.
struct Temporary(PathBuf);

impl Drop for Temporary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temporary_cache(repo: &Repository) -> Result<(Cache, Temporary)> {
    let dir = std::env::temp_dir().join(format!(
        "vmkeep-scan-{}",
        hex::encode(&vmkeep_core::SnapshotId::random().0[..8])
    ));
    let guard = Temporary(dir.clone());
    let cache = Cache::open(&CacheOptions::new(dir), &repo.config.id)?;
    Ok((cache, guard))
}

impl RepoScan {
    /// Bring the index up to date, then list the packs (the order a backup reads them in,
    /// FORMAT.md §13), treating packs in `condemned` as about to go.
    pub fn load(repo: &Repository, condemned: HashSet<PackId>) -> Result<RepoScan> {
        let listed = repo.store.list(ObjectKind::Index)?;
        let (cache, temporary) = match &repo.cache {
            Some(c) => (c.clone(), None),
            None => {
                let (c, t) = temporary_cache(repo)?;
                (c, Some(t))
            }
        };
        let (synced, cache, temporary) = match crate::cache::sync::sync(repo, &cache, &listed) {
            Ok(s) => (s, cache, temporary),
            Err(e @ Error::CacheBusy { .. }) => {
                tracing::warn!("{e}; reading the index into a temporary cache instead");
                let (c, t) = temporary_cache(repo)?;
                (crate::cache::sync::sync(repo, &c, &listed)?, c, Some(t))
            }
            Err(e) => return Err(e),
        };
        crate::spill::remove_abandoned(&repo.spill_parent());
        let sizes = pack_sizes(repo)?;
        let index = BlobIndex::for_scan(
            synced.table,
            cache,
            condemned,
            sizes.keys().copied().collect(),
        );
        Ok(RepoScan {
            index,
            sizes,
            damaged: synced.damaged,
            fresh: synced.fresh,
            _temporary: temporary,
        })
    }

    /// One pass: every id the index or `referenced` holds, ascending, with its locations. A
    /// cache file that fails its verification is discarded (the next run rebuilds it).
    pub fn pass(&self, referenced: &mut IdSpill, f: &mut Visit) -> Result<()> {
        let r = self.join(referenced, f);
        if let Err(Error::CacheDamaged { path, .. }) = &r {
            self.index.discard_cache_file(path);
        }
        r
    }

    fn join(&self, referenced: &mut IdSpill, f: &mut Visit) -> Result<()> {
        let table = self.table()?;
        let mut groups = Groups::new(table)?;
        let mut ids = referenced.read()?;
        let mut g = groups.next_group()?;
        let mut r = ids.next()?;
        loop {
            let (id, indexed, is_referenced) = match (g, r) {
                (None, None) => return Ok(()),
                (Some(gid), Some(rid)) if gid == rid => (gid, true, true),
                (Some(gid), Some(rid)) if rid < gid => (rid, false, true),
                (Some(gid), _) => (gid, true, false),
                (None, Some(rid)) => (rid, false, true),
            };
            f(&Group {
                id,
                copies: if indexed { groups.copies() } else { &[] },
                referenced: is_referenced,
            })?;
            if indexed {
                g = groups.next_group()?;
            }
            if is_referenced {
                r = ids.next()?;
            }
        }
    }

    /// Every index object the table holds entries of.
    pub fn objects(&self) -> Result<Vec<Key>> {
        index_keys(self.table()?.live_sources())
    }

    /// The index objects the table holds entries of that were not read by this scan itself
    /// (those were verified moments ago).
    pub fn objects_read_before(&self) -> Result<Vec<Key>> {
        let mut names = self.table()?.live_sources();
        names.retain(|n| !self.fresh.contains(n));
        index_keys(names)
    }

    /// Stop using the entries of these index objects (found damaged when read again).
    pub fn exclude(&mut self, damaged: &[Key]) {
        let names: HashSet<[u8; 32]> = damaged
            .iter()
            .filter_map(|k| {
                let mut n = [0u8; 32];
                hex::decode_to_slice(&k.name, &mut n).ok().map(|()| n)
            })
            .collect();
        if let Some(t) = self.index.table_mut() {
            t.exclude(&names);
        }
    }

    fn table(&self) -> Result<&crate::cache::Table> {
        self.index.table().ok_or(Error::Internal(
            "a repository scan's index is the cache's".into(),
        ))
    }

    /// The entries the index gives for each of `packs` (each offset once, by offset).
    pub fn entries_of(&self, packs: &HashSet<PackId>) -> Result<Vec<(PackId, Vec<PackEntry>)>> {
        let mut out: HashMap<PackId, Vec<PackEntry>> = HashMap::new();
        self.table()?.for_each_live(|id, l| {
            if packs.contains(&l.pack) {
                out.entry(l.pack).or_default().push(PackEntry {
                    kind: l.kind,
                    id,
                    offset: l.offset,
                    length: l.length,
                    raw_len: l.raw_len,
                });
            }
            Ok(())
        })?;
        Ok(out
            .into_iter()
            .map(|(p, mut es)| {
                es.sort_by_key(|e| e.offset);
                es.dedup_by_key(|e| e.offset);
                (p, es)
            })
            .collect())
    }

    /// The index objects that hold entries of `packs`.
    pub fn objects_naming(&self, packs: &HashSet<PackId>) -> Result<Vec<Key>> {
        index_keys(self.table()?.sources_naming(packs)?)
    }
}

/// The index objects of these names, sorted.
fn index_keys(names: HashSet<[u8; 32]>) -> Result<Vec<Key>> {
    let mut keys: Vec<Key> = names
        .into_iter()
        .map(|name| Key::new(ObjectKind::Index, hex::encode(name)))
        .collect::<std::result::Result<_, _>>()?;
    keys.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(keys)
}
