//! The in-memory blob index: which pack holds each blob, built from every `index/` object, and
//! which packs are condemned by pending GC records (blobs there are not reused by new backups).
use std::collections::{HashMap, HashSet};

use vmkeep_core::blob;
use vmkeep_core::keys::BlobKind;
use vmkeep_core::pack::{IndexFile, PackEntry};
use vmkeep_core::{object, ObjectKind};
use vmkeep_core::{BlobId, PackId};
use vmkeep_store::Key;

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
#[derive(Default, Debug)]
pub struct BlobIndex {
    map: HashMap<BlobId, Location>,
    condemned: HashSet<PackId>,
    /// Packs listed in the store after the index objects were read.
    existing: HashSet<PackId>,
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
            let bytes = match repo.store.get(&meta.key, ObjectKind::Index.max_size()) {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue, // deleted by a concurrent prune
                Err(e) => {
                    let (_, cause) = crate::error::too_large_or(e)?;
                    raw.damaged.push((meta.key, cause));
                    continue;
                }
            };
            // The name is BLAKE3 of the stored bytes (FORMAT.md §2): a renamed or substituted
            // object is damaged even when its content is authentic.
            match check_index_name(&meta.key.name, &bytes)
                .and_then(|()| object::open(&repo.keys, ObjectKind::Index, &bytes))
                .and_then(|body| IndexFile::decode(&body))
            {
                Ok(f) => {
                    let mut names = Vec::with_capacity(f.packs.len());
                    for (pack, entries) in f.packs {
                        names.push(pack);
                        raw.by_pack.entry(pack).or_default().extend(entries);
                    }
                    raw.files.push((meta.key.name, names));
                }
                Err(e) => raw.damaged.push((meta.key, e)),
            }
        }
        Ok(raw)
    }
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
    /// Load pending GC records first, then every index object, then the list of packs
    /// (FORMAT.md §13: a backup reads in this order after writing its lease).
    pub fn load(repo: &Repository) -> Result<BlobIndex> {
        let records = gc_record::load_all(repo)?;
        records.warn_damaged();
        let condemned = records.condemned();
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
        let mut idx = BlobIndex {
            map: HashMap::new(),
            condemned,
            existing,
        };
        for (key, e) in &raw.damaged {
            tracing::warn!(index = %key, error = %e, "skipping a damaged index object");
        }
        for (pack, entries) in &raw.by_pack {
            for e in entries {
                idx.insert(e.id, Location::from_entry(*pack, e));
            }
        }
        idx
    }

    /// 0: usable; 1: exists but condemned (readable until swept); 2: gone.
    fn rank(&self, pack: &PackId) -> u8 {
        match (self.existing.contains(pack), self.condemned.contains(pack)) {
            (true, false) => 0,
            (true, true) => 1,
            (false, _) => 2,
        }
    }

    /// Add a location; the best of a blob's locations (by [`BlobIndex::rank`], then pack id,
    /// so the choice does not depend on reading order) is kept.
    pub fn insert(&mut self, id: BlobId, loc: Location) {
        let better = match self.map.get(&id) {
            None => true,
            Some(old) => (self.rank(&loc.pack), loc.pack) < (self.rank(&old.pack), old.pack),
        };
        if better {
            self.map.insert(id, loc);
        }
    }

    pub fn get(&self, id: &BlobId) -> Option<&Location> {
        self.map.get(id)
    }

    /// Present in a pack that exists and is not condemned: a backup may reference it without
    /// writing it.
    pub fn usable(&self, id: &BlobId) -> bool {
        self.map.get(id).is_some_and(|l| self.rank(&l.pack) == 0)
    }

    /// Whether the pack was listed when this index was loaded.
    pub fn pack_exists(&self, pack: &PackId) -> bool {
        self.existing.contains(pack)
    }

    pub fn is_condemned(&self, pack: &PackId) -> bool {
        self.condemned.contains(pack)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&BlobId, &Location)> {
        self.map.iter()
    }

    /// Ids usable for deduplication.
    pub fn usable_ids(&self) -> HashSet<BlobId> {
        self.map
            .iter()
            .filter(|(_, l)| self.rank(&l.pack) == 0)
            .map(|(id, _)| *id)
            .collect()
    }
}

impl Repository {
    /// Read, decrypt, decompress and verify one blob.
    pub fn read_blob(&self, index: &BlobIndex, id: &BlobId) -> Result<Vec<u8>> {
        let loc = index
            .get(id)
            .ok_or_else(|| Error::BlobMissing { id: id.to_hex() })?;
        self.read_blob_at(id, loc)
    }

    pub fn read_blob_at(&self, id: &BlobId, loc: &Location) -> Result<Vec<u8>> {
        let key = pack_key(&loc.pack);
        let stored = self.read_stored_blob(id, loc)?;
        blob::decode(&self.keys, loc.kind, id, loc.raw_len, &stored)
            .map_err(|e| Error::corrupt(format!("blob {id} in {key}"), e))
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
