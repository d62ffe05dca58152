//! The blob index: which pack holds each blob, from every listed `index/` object (read into
//! memory, or looked up in the local cache's runs, `cache/`), and which packs are condemned by
//! pending GC records (blobs there are not reused by new backups).
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use vmkeep_core::blob;
use vmkeep_core::keys::BlobKind;
use vmkeep_core::pack::{IndexFile, PackEntry};
use vmkeep_core::{object, ObjectKind};
use vmkeep_core::{BlobId, PackId};
use vmkeep_store::{Key, Store};

use crate::cache::{Cache, Table};
use crate::error::{Error, Result};
use crate::gc::record as gc_record;
use crate::Repository;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    pub offset: u32,
    pub length: u32,
    pub raw_len: u32,
    pub kind: BlobKind,
}

impl Location {
    pub fn from_entry(pack: PackId, e: &PackEntry) -> Location {
        Location {
            pack,
            offset: e.offset,
            length: e.length,
            raw_len: e.raw_len,
            kind: e.kind,
        }
    }
}

/// Blob id -> location, preferring packs that exist and are not condemned. A blob whose only
/// copies are in packs that do not exist (lost, or swept) or are condemned by a GC record is
/// not *usable*: a backup writes it again instead of referencing it, which also heals restore
/// points that reference a blob of a lost pack (their ids are the same).
///
/// Two forms with the same answers: every entry in memory ([`BlobIndex::from_raw`], for
/// `check` and `prune`, and without a cache), or the local cache's runs, read one bucket per
/// lookup ([`BlobIndex::load`] with a cache), whose memory does not grow with the repository.
#[derive(Debug)]
pub struct BlobIndex {
    entries: Entries,
    condemned: HashSet<PackId>,
    packs: Packs,
    /// Tree nodes may come from the cache's copies (backups and restores; never check or GC,
    /// which verify the repository).
    tree_cache: bool,
    /// The first cache failure met by a lookup (which then answered "not stored": safe for
    /// deduplication, which writes the blob again); readers report it instead of "missing".
    failure: Mutex<Option<String>>,
}

#[derive(Debug)]
enum Entries {
    /// The best location of each blob.
    Memory(HashMap<BlobId, Location>),
    /// Every location, from the cache.
    Cached { table: Table, cache: Cache },
}

/// Which packs exist.
#[derive(Debug)]
enum Packs {
    /// Listed after the index objects were read.
    Listed(HashSet<PackId>),
    /// Asked one by one when a lookup needs to know (after the index objects were read, as
    /// listing would be), each answer kept: a repository of millions of packs is not listed.
    Probed {
        store: Arc<dyn Store>,
        known: Mutex<HashMap<PackId, bool>>,
    },
}

impl Default for BlobIndex {
    fn default() -> Self {
        BlobIndex {
            entries: Entries::Memory(HashMap::new()),
            condemned: HashSet::new(),
            packs: Packs::Listed(HashSet::new()),
            tree_cache: false,
            failure: Mutex::new(None),
        }
    }
}

pub(crate) fn pack_key(id: &PackId) -> Key {
    Key::new(ObjectKind::Pack, id.to_hex()).expect("hex names are valid keys")
}

/// Every index object as stored, read once: entries grouped by pack (every copy), the packs
/// each object names, and the objects that could not be read. `check` and `prune` work on it
/// directly; [`BlobIndex::from_raw`] turns it into the lookup table.
#[derive(Default, Debug)]
pub struct RawIndex {
    pub by_pack: HashMap<PackId, Vec<PackEntry>>,
    /// (object name, packs it names)
    pub files: Vec<(String, Vec<PackId>)>,
    /// Objects that could not be read: check reports them, prune refuses to run, backups and
    /// restores skip them.
    pub damaged: Vec<(Key, vmkeep_core::Error)>,
}

impl RawIndex {
    pub fn load(repo: &Repository) -> Result<RawIndex> {
        let mut raw = RawIndex::default();
        for meta in repo.store.list(ObjectKind::Index)? {
            match fetch_index_object(repo, &meta.key)? {
                Fetched::Gone => {}
                Fetched::Damaged(e) => raw.damaged.push((meta.key, e)),
                Fetched::Read(f) => {
                    let mut names = Vec::with_capacity(f.packs.len());
                    for (pack, entries) in f.packs {
                        names.push(pack);
                        raw.by_pack.entry(pack).or_default().extend(entries);
                    }
                    raw.files.push((meta.key.name, names));
                }
            }
        }
        Ok(raw)
    }
}

/// One index object as read.
pub(crate) enum Fetched {
    Read(IndexFile),
    /// Deleted since it was listed (by a concurrent prune).
    Gone,
    /// Too large, misnamed, failing authentication or undecodable.
    Damaged(vmkeep_core::Error),
}

/// Read, verify and decode one index object.
pub(crate) fn fetch_index_object(repo: &Repository, key: &Key) -> Result<Fetched> {
    let bytes = match repo.store.get(key, ObjectKind::Index.max_size()) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(Fetched::Gone),
        Err(e) => {
            let (_, cause) = crate::error::too_large_or(e)?;
            return Ok(Fetched::Damaged(cause));
        }
    };
    // The name is BLAKE3 of the stored bytes (FORMAT.md §2): a renamed or substituted
    // object is damaged even when its content is authentic.
    Ok(
        match check_index_name(&key.name, &bytes)
            .and_then(|()| object::open(&repo.keys, ObjectKind::Index, &bytes))
            .and_then(|body| IndexFile::decode(&body))
        {
            Ok(f) => Fetched::Read(f),
            Err(e) => Fetched::Damaged(e),
        },
    )
}

fn check_index_name(name: &str, bytes: &[u8]) -> vmkeep_core::Result<()> {
    if blake3::hash(bytes).to_hex().as_str() == name {
        return Ok(());
    }
    Err(vmkeep_core::Error::Corrupt {
        kind: "index",
        reason: "its name is not the BLAKE3 hash of its bytes (renamed or replaced)".into(),
    })
}

impl RawIndex {
    /// Entries of a pack as indexed (all index objects' entries for it, one per offset).
    pub fn entries_of(&self, p: &PackId) -> Vec<PackEntry> {
        let mut v = self.by_pack.get(p).cloned().unwrap_or_default();
        v.sort_by_key(|e| e.offset);
        v.dedup_by_key(|e| e.offset);
        v
    }
}

/// Size of every pack in the store.
pub(crate) fn pack_sizes(repo: &Repository) -> Result<HashMap<PackId, u64>> {
    Ok(repo
        .store
        .list(ObjectKind::Pack)?
        .into_iter()
        .filter_map(|m| m.key.name.parse().ok().map(|p| (p, m.size)))
        .collect())
}

impl BlobIndex {
    /// Load pending GC records first, then the index objects, then which packs exist
    /// (FORMAT.md §13: a backup reads in this order after writing its lease). With a cache,
    /// only the index objects it does not hold yet are read.
    pub fn load(repo: &Repository) -> Result<BlobIndex> {
        let records = gc_record::load_all(repo)?;
        records.warn_damaged();
        let condemned = records.condemned();
        let Some(cache) = repo.cache.clone() else {
            return BlobIndex::load_in_memory(repo, condemned);
        };
        let listed = repo.store.list(ObjectKind::Index)?;
        let synced = match crate::cache::sync::sync(repo, &cache, &listed) {
            Ok(s) => s,
            Err(e @ Error::CacheBusy { .. }) => {
                tracing::warn!("{e}; going on without the cache (the whole index in memory)");
                return BlobIndex::load_in_memory(repo, condemned);
            }
            Err(e) => return Err(e),
        };
        for (key, e) in &synced.damaged {
            tracing::warn!(index = %key, error = %e, "skipping a damaged index object");
        }
        tracing::debug!(
            entries = synced.table.entries(),
            read = synced.fetched,
            "blob index from the cache"
        );
        let packs = if synced.table.pack_count() <= repo.tuning.list_packs_up_to {
            Packs::Listed(pack_sizes(repo)?.into_keys().collect())
        } else {
            Packs::Probed {
                store: repo.store.clone(),
                known: Mutex::new(HashMap::new()),
            }
        };
        Ok(BlobIndex {
            entries: Entries::Cached {
                table: synced.table,
                cache,
            },
            condemned,
            packs,
            tree_cache: true,
            failure: Mutex::new(None),
        })
    }

    /// The index of a repository scan (`scan.rs`): the cache's table, the packs as listed,
    /// tree nodes always read from the store.
    pub(crate) fn for_scan(
        table: Table,
        cache: Cache,
        condemned: HashSet<PackId>,
        existing: HashSet<PackId>,
    ) -> BlobIndex {
        BlobIndex {
            entries: Entries::Cached { table, cache },
            condemned,
            packs: Packs::Listed(existing),
            tree_cache: false,
            failure: Mutex::new(None),
        }
    }

    pub(crate) fn table_mut(&mut self) -> Option<&mut Table> {
        match &mut self.entries {
            Entries::Cached { table, .. } => Some(table),
            Entries::Memory(_) => None,
        }
    }

    /// The cache's table, when this index is read from it.
    pub(crate) fn table(&self) -> Option<&Table> {
        match &self.entries {
            Entries::Cached { table, .. } => Some(table),
            Entries::Memory(_) => None,
        }
    }

    /// Every listed index object read into memory, then the list of packs.
    fn load_in_memory(repo: &Repository, condemned: HashSet<PackId>) -> Result<BlobIndex> {
        let raw = RawIndex::load(repo)?;
        let existing = pack_sizes(repo)?.into_keys().collect();
        Ok(BlobIndex::from_raw(&raw, condemned, existing))
    }

    /// The lookup table of `raw`, treating the packs in `condemned` as about to disappear and
    /// packs not in `existing` as gone. Damaged index objects are skipped with a warning.
    pub fn from_raw(
        raw: &RawIndex,
        condemned: HashSet<PackId>,
        existing: HashSet<PackId>,
    ) -> BlobIndex {
        for (key, e) in &raw.damaged {
            tracing::warn!(index = %key, error = %e, "skipping a damaged index object");
        }
        let mut idx = BlobIndex {
            entries: Entries::Memory(HashMap::new()),
            condemned,
            packs: Packs::Listed(existing),
            tree_cache: false,
            failure: Mutex::new(None),
        };
        let mut map = HashMap::new();
        for (pack, entries) in &raw.by_pack {
            for e in entries {
                let loc = Location::from_entry(*pack, e);
                let better = match map.get(&e.id) {
                    None => true,
                    Some(old) => idx.better(&loc, old),
                };
                if better {
                    map.insert(e.id, loc);
                }
            }
        }
        idx.entries = Entries::Memory(map);
        idx
    }

    /// 0: usable; 1: exists but condemned (readable until swept); 2: gone.
    fn rank(&self, pack: &PackId) -> u8 {
        match (self.pack_exists(pack), self.condemned.contains(pack)) {
            (true, false) => 0,
            (true, true) => 1,
            (false, _) => 2,
        }
    }

    /// The better of two locations: by [`BlobIndex::rank`], then pack id, so the choice does
    /// not depend on reading order.
    fn better(&self, a: &Location, b: &Location) -> bool {
        (self.rank(&a.pack), a.pack) < (self.rank(&b.pack), b.pack)
    }

    fn note_failure(&self, e: crate::Error) {
        let mut f = self.failure.lock().unwrap();
        if f.is_none() {
            tracing::warn!(error = %e, "the local cache failed; treating the blob as not stored");
            if let crate::Error::CacheDamaged { path, .. } = &e {
                self.discard_cache_file(path);
            }
            *f = Some(e.to_string());
        }
    }

    /// Remove a cache file that failed its verification, and the catalog naming it: the next
    /// run rebuilds them from the repository.
    pub(crate) fn discard_cache_file(&self, path: &std::path::Path) {
        if let Entries::Cached { cache, .. } = &self.entries {
            let _ = std::fs::remove_file(cache.path(crate::cache::table::CATALOG));
            let _ = std::fs::remove_file(path);
        }
    }

    /// The cache failure a lookup met, if any (its message).
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap().clone()
    }

    /// Every location of `id` the cache gives (empty on a failure, which is noted).
    fn candidates(&self, table: &Table, id: &BlobId) -> Vec<Location> {
        table.find(id).unwrap_or_else(|e| {
            self.note_failure(e);
            Vec::new()
        })
    }

    /// The best location of a blob.
    pub fn get(&self, id: &BlobId) -> Option<Location> {
        match &self.entries {
            Entries::Memory(map) => map.get(id).copied(),
            Entries::Cached { table, .. } => {
                let c = self.candidates(table, id);
                if c.len() <= 1 {
                    // One copy: no choice to make, and no need to ask whether its pack exists.
                    return c.first().copied();
                }
                c.into_iter()
                    .reduce(|best, l| if self.better(&l, &best) { l } else { best })
            }
        }
    }

    /// The best location of a blob, or why there is none: missing, or the cache failed.
    pub(crate) fn locate(&self, id: &BlobId) -> Result<Location> {
        self.get(id).ok_or_else(|| match self.failure() {
            Some(reason) => Error::CacheFailed { reason },
            None => Error::BlobMissing { id: id.to_hex() },
        })
    }

    /// Present in a pack that exists and is not condemned: a backup may reference it without
    /// writing it.
    pub fn usable(&self, id: &BlobId) -> bool {
        self.usable_location(id).is_some()
    }

    /// The usable location of a blob, if it has one.
    pub fn usable_location(&self, id: &BlobId) -> Option<Location> {
        match &self.entries {
            Entries::Memory(map) => map.get(id).filter(|l| self.rank(&l.pack) == 0).copied(),
            Entries::Cached { table, .. } => {
                let mut c = self.candidates(table, id);
                c.sort_by_key(|l| l.pack);
                c.into_iter().find(|l| self.rank(&l.pack) == 0)
            }
        }
    }

    /// Whether the pack exists (listed when this index was loaded, or found when asked).
    pub fn pack_exists(&self, pack: &PackId) -> bool {
        match &self.packs {
            Packs::Listed(set) => set.contains(pack),
            Packs::Probed { store, known } => {
                if let Some(k) = known.lock().unwrap().get(pack) {
                    return *k;
                }
                let exists = match store.size(&pack_key(pack)) {
                    Ok(_) => true,
                    Err(e) if e.is_not_found() => false,
                    Err(e) => {
                        // Unknown: not usable this time (writing a blob again is always safe).
                        tracing::warn!(pack = %pack, error = %e, "cannot tell whether a pack exists");
                        return false;
                    }
                };
                known.lock().unwrap().insert(*pack, exists);
                exists
            }
        }
    }

    pub fn is_condemned(&self, pack: &PackId) -> bool {
        self.condemned.contains(pack)
    }

    /// Blobs in the index (every entry, with repeats, when cached).
    pub fn len(&self) -> usize {
        match &self.entries {
            Entries::Memory(map) => map.len(),
            Entries::Cached { table, .. } => table.entries() as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every blob and its location (in-memory indexes only: check and prune).
    pub fn iter(&self) -> impl Iterator<Item = (&BlobId, &Location)> {
        let map = match &self.entries {
            Entries::Memory(map) => Some(map),
            Entries::Cached { .. } => None,
        };
        map.into_iter().flat_map(|m| m.iter())
    }
}

impl Repository {
    /// Read, decrypt, decompress and verify one blob. Through an index read from the cache,
    /// tree nodes come from the cache when it has them (verified by their id, as every blob
    /// read is) and are kept there after a read from the store; `check` and GC always read the
    /// store (they verify the repository, not the cache).
    pub fn read_blob(&self, index: &BlobIndex, id: &BlobId) -> Result<Vec<u8>> {
        let loc = index.locate(id)?;
        let cache = match &index.entries {
            Entries::Cached { cache, .. } if loc.kind == BlobKind::Tree && index.tree_cache => {
                cache
            }
            _ => return self.read_blob_at(id, &loc),
        };
        if let Some(stored) = crate::cache::objects::get(cache, id, loc.length as u64) {
            match self.decode_stored(id, &loc, &stored) {
                Ok(plain) => return Ok(plain),
                Err(_) => crate::cache::objects::discard(cache, id),
            }
        }
        let stored = self.read_stored_blob(id, &loc)?;
        let plain = self.decode_stored(id, &loc, &stored)?;
        crate::cache::objects::put(cache, id, &stored);
        Ok(plain)
    }

    pub fn read_blob_at(&self, id: &BlobId, loc: &Location) -> Result<Vec<u8>> {
        let stored = self.read_stored_blob(id, loc)?;
        self.decode_stored(id, loc, &stored)
    }

    /// Decrypt, decompress and verify a blob's stored bytes against its id.
    pub(crate) fn decode_stored(
        &self,
        id: &BlobId,
        loc: &Location,
        stored: &[u8],
    ) -> Result<Vec<u8>> {
        blob::decode(&self.keys, loc.kind, id, loc.raw_len, stored)
            .map_err(|e| Error::corrupt(format!("blob {id} in {}", pack_key(&loc.pack)), e))
    }

    /// A blob's stored bytes (compressed and sealed) as its pack holds them, unverified.
    pub(crate) fn read_stored_blob(&self, id: &BlobId, loc: &Location) -> Result<Vec<u8>> {
        let key = pack_key(&loc.pack);
        match self
            .store
            .get_range(&key, loc.offset as u64, loc.length as u64)
        {
            Ok(b) => Ok(b),
            Err(e) if e.is_not_found() => Err(Error::BlobMissing { id: id.to_hex() }),
            Err(vmkeep_store::Error::ShortRead { .. }) => Err(Error::corrupt(
                key.to_string(),
                vmkeep_core::Error::Corrupt {
                    kind: "pack",
                    reason: "truncated".into(),
                },
            )),
            Err(e) => Err(e.into()),
        }
    }
}
