//! The in-memory blob index: which pack holds each blob, built from every `index/` object, and
//! which packs are condemned by pending GC records (blobs there are not reused by new backups).
use std::collections::{HashMap, HashSet};

use vmkeep_core::blob;
use vmkeep_core::keys::BlobKind;
use vmkeep_core::object::{self, ObjectKind};
use vmkeep_core::pack::{IndexFile, PackEntry};
use vmkeep_core::{BlobId, PackId};
use vmkeep_store::{Key, Kind};

use crate::error::{Error, Result};
use crate::gc_record;
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

/// Blob id -> location, preferring packs that are not condemned.
#[derive(Default, Debug)]
pub struct BlobIndex {
    map: HashMap<BlobId, Location>,
    condemned: HashSet<PackId>,
    /// Names of the index objects loaded.
    pub files: Vec<String>,
    /// Index objects that could not be read (check reports them; others skip them).
    pub damaged: Vec<(String, String)>,
}

pub(crate) fn pack_key(id: &PackId) -> Key {
    Key::new(Kind::Pack, id.to_hex()).expect("hex names are valid keys")
}

impl BlobIndex {
    /// Load pending GC records first, then every index object (docs/FORMAT.md: a backup reads
    /// in this order after writing its lease).
    pub fn load(repo: &Repository) -> Result<BlobIndex> {
        let mut idx = BlobIndex::default();
        for (_, rec) in gc_record::load_all(repo)? {
            idx.condemned.extend(rec.condemned.iter().copied());
        }
        for meta in repo.store.list(Kind::Index)? {
            let name = meta.key.name.clone();
            let file = match repo.store.get(&meta.key) {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue, // deleted by a concurrent prune
                Err(e) => return Err(e.into()),
            };
            match object::open(&repo.keys, ObjectKind::Index, &file)
                .and_then(|body| IndexFile::decode(&body))
            {
                Ok(f) => {
                    for (pack, entries) in &f.packs {
                        for e in entries {
                            idx.insert(e.id, Location::from_entry(*pack, e));
                        }
                    }
                    idx.files.push(name);
                }
                Err(e) => {
                    tracing::warn!(index = %name, error = %e, "skipping a damaged index object");
                    idx.damaged.push((name, e.to_string()));
                }
            }
        }
        Ok(idx)
    }

    pub fn insert(&mut self, id: BlobId, loc: Location) {
        match self.map.get(&id) {
            Some(old) if !self.condemned.contains(&old.pack) => {}
            _ => {
                self.map.insert(id, loc);
            }
        }
    }

    pub fn get(&self, id: &BlobId) -> Option<&Location> {
        self.map.get(id)
    }

    /// Present in a pack that is not condemned: a backup may reference it without writing it.
    pub fn usable(&self, id: &BlobId) -> bool {
        self.map
            .get(id)
            .is_some_and(|l| !self.condemned.contains(&l.pack))
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
            .filter(|(_, l)| !self.condemned.contains(&l.pack))
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
        let stored = match self
            .store
            .get_range(&key, loc.offset as u64, loc.length as u64)
        {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Err(Error::BlobMissing { id: id.to_hex() }),
            Err(vmkeep_store::Error::ShortRead { .. }) => {
                return Err(Error::corrupt(
                    key.to_string(),
                    vmkeep_core::Error::Corrupt {
                        kind: "pack",
                        reason: "truncated".into(),
                    },
                ))
            }
            Err(e) => return Err(e.into()),
        };
        blob::decode(&self.keys, loc.kind, id, loc.raw_len, &stored)
            .map_err(|e| Error::corrupt(format!("blob {id} in {key}"), e))
    }
}
