//! Restore points: listing, resolving references, reading and writing manifests (through the
//! local cache when the store gives version tokens, `cache/manifests.rs`).
use std::sync::atomic::{AtomicUsize, Ordering};

use vmkeep_core::manifest::Manifest;
use vmkeep_core::SnapshotId;
use vmkeep_core::{object, ObjectKind};
use vmkeep_store::{Key, ObjectMeta};

use crate::cache::manifests;
use crate::error::{Error, Result};
use crate::Repository;

pub(crate) fn snapshot_key(id: &SnapshotId) -> Key {
    Key::new(ObjectKind::Snapshot, id.to_hex()).expect("hex names are valid keys")
}

impl Repository {
    /// Read one manifest and check it is the restore point its name says.
    pub fn load_manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        let bytes = self.manifest_bytes(id)?;
        self.decode_manifest(id, &bytes)
    }

    /// A manifest's stored bytes, from the store.
    fn manifest_bytes(&self, id: &SnapshotId) -> Result<Vec<u8>> {
        match self
            .store
            .get(&snapshot_key(id), ObjectKind::Snapshot.max_size())
        {
            Ok(b) => Ok(b),
            Err(e) if e.is_not_found() => Err(Error::UnknownSnapshot {
                reference: id.to_hex(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Open, parse and verify a manifest's stored bytes: it must name itself `id` and have
    /// the repository's chunk size.
    fn decode_manifest(&self, id: &SnapshotId, bytes: &[u8]) -> Result<Manifest> {
        let key = snapshot_key(id);
        let m = object::open(&self.keys, ObjectKind::Snapshot, bytes)
            .and_then(|b| Manifest::from_json(&b))
            .map_err(|e| Error::corrupt(key.to_string(), e))?;
        if m.id != *id {
            return Err(Error::corrupt(
                key.to_string(),
                vmkeep_core::Error::Corrupt {
                    kind: "manifest",
                    reason: format!("it names itself {}", m.id),
                },
            ));
        }
        if m.chunk_size != self.config.chunk_size {
            return Err(Error::corrupt(
                key.to_string(),
                vmkeep_core::Error::Corrupt {
                    kind: "manifest",
                    reason: format!("chunk size {} differs from the repository's", m.chunk_size),
                },
            ));
        }
        Ok(m)
    }

    /// A listed manifest: from the cache when it holds the version listed, else from the
    /// store (then cached at that version). `check` passes `use_cache = false`: it verifies
    /// the repository.
    fn listed_manifest(
        &self,
        id: &SnapshotId,
        meta: &ObjectMeta,
        use_cache: bool,
    ) -> Result<Manifest> {
        let (Some(cache), Some(version), true) = (&self.cache, &meta.version, use_cache) else {
            return self.load_manifest(id);
        };
        let max = ObjectKind::Snapshot.max_size();
        if let Some(bytes) = manifests::get(cache, id, version, max) {
            match self.decode_manifest(id, &bytes) {
                Ok(m) => return Ok(m),
                Err(_) => manifests::discard(cache, id),
            }
        }
        let bytes = self.manifest_bytes(id)?;
        let m = self.decode_manifest(id, &bytes)?;
        manifests::put(cache, id, version, &bytes);
        Ok(m)
    }

    /// Write (or replace) a manifest: the commit point of a backup.
    pub(crate) fn write_manifest(&self, m: &Manifest) -> Result<u64> {
        let sealed = object::seal(&self.keys, ObjectKind::Snapshot, &m.to_json());
        self.store.put(&snapshot_key(&m.id), &sealed)?;
        Ok(sealed.len() as u64)
    }

    /// Every readable restore point, oldest first, and (name, reason) of each unreadable manifest.
    #[allow(clippy::type_complexity)]
    pub fn snapshots_with_damage(&self) -> Result<(Vec<Manifest>, Vec<(String, String)>)> {
        self.read_manifests(true)
    }

    /// As [`Repository::snapshots_with_damage`], every manifest read from the store (`check`).
    #[allow(clippy::type_complexity)]
    pub(crate) fn snapshots_from_store(&self) -> Result<(Vec<Manifest>, Vec<(String, String)>)> {
        self.read_manifests(false)
    }

    /// List the manifests and read them, as many at once as the store serves well.
    #[allow(clippy::type_complexity)]
    fn read_manifests(&self, use_cache: bool) -> Result<(Vec<Manifest>, Vec<(String, String)>)> {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        let mut listed = Vec::new();
        for meta in self.store.list(ObjectKind::Snapshot)? {
            match meta.key.name.parse::<SnapshotId>() {
                Ok(id) => listed.push((id, meta)),
                Err(_) => bad.push((meta.key.name.clone(), "not a snapshot id".into())),
            }
        }
        let threads = self.reader_threads().min(listed.len()).max(1);
        let next = AtomicUsize::new(0);
        let results: Vec<Vec<(usize, Result<Manifest>)>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some((id, meta)) = listed.get(i) else {
                                return out;
                            };
                            let r = self.listed_manifest(id, meta, use_cache);
                            let stop = matches!(&r, Err(e) if !e.is_damage()
                                && !matches!(e, Error::UnknownSnapshot { .. }));
                            out.push((i, r));
                            if stop {
                                // The others find no more work.
                                next.store(usize::MAX / 2, Ordering::Relaxed);
                                return out;
                            }
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("a manifest reader panicked"))
                .collect()
        });
        let mut results: Vec<(usize, Result<Manifest>)> = results.into_iter().flatten().collect();
        results.sort_by_key(|(i, _)| *i);
        for (i, r) in results {
            match r {
                Ok(m) => ok.push(m),
                Err(Error::UnknownSnapshot { .. }) => {} // forgotten meanwhile
                Err(e) if e.is_damage() => bad.push((listed[i].0.to_hex(), e.to_string())),
                Err(e) => return Err(e),
            }
        }
        ok.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
        Ok((ok, bad))
    }

    /// Every readable restore point, oldest first (damaged manifests are skipped with a warning;
    /// `check` reports them).
    pub fn snapshots(&self) -> Result<Vec<Manifest>> {
        let (ok, bad) = self.snapshots_with_damage()?;
        for (name, why) in bad {
            tracing::warn!(snapshot = %name, reason = %why, "skipping a damaged restore point");
        }
        Ok(ok)
    }

    /// Latest restore point of a VM, for restores and anything else that must be exact. Fails
    /// with [`Error::LatestUnknown`] while any manifest is unreadable: its VM and time are
    /// unknown, so it may be the VM's newest point, and answering with an older one would
    /// silently restore the wrong state.
    pub fn latest(&self, vm: &str) -> Result<Option<Manifest>> {
        let (ok, bad) = self.snapshots_with_damage()?;
        if let Some((name, why)) = bad.first() {
            return Err(Error::LatestUnknown {
                reference: format!("{vm}@latest"),
                snapshot: name.clone(),
                reason: why.clone(),
                others: bad.len() - 1,
            });
        }
        Ok(ok.into_iter().rfind(|m| m.vm == vm))
    }

    /// The newest *readable* restore point of a VM, skipping unreadable manifests with a
    /// warning. Only for choosing a backup's parent: the new point's change maps are computed
    /// against whatever parent it names, so an older parent costs change-map precision, never
    /// correctness. Restores use [`Repository::latest`], which refuses to guess.
    pub(crate) fn newest_readable_for_parent(&self, vm: &str) -> Result<Option<Manifest>> {
        Ok(self.snapshots()?.into_iter().rfind(|m| m.vm == vm))
    }

    /// Resolve a reference: a full id, a unique prefix of at least 6 hex digits, or `VM@latest`.
    pub fn resolve(&self, reference: &str) -> Result<Manifest> {
        let id = self.resolve_id(reference)?;
        self.load_manifest(&id)
    }

    /// Resolve a reference to an id without reading the manifest (works for damaged ones).
    pub fn resolve_id(&self, reference: &str) -> Result<SnapshotId> {
        if let Some(vm) = reference.strip_suffix("@latest") {
            return self
                .latest(vm)?
                .map(|m| m.id)
                .ok_or_else(|| Error::UnknownSnapshot {
                    reference: reference.into(),
                });
        }
        let r = reference.to_ascii_lowercase();
        if r.len() < 6 || !r.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::ShortReference {
                reference: reference.into(),
            });
        }
        let matches: Vec<SnapshotId> = self
            .store
            .list(ObjectKind::Snapshot)?
            .into_iter()
            .filter(|m| m.key.name.starts_with(&r))
            .filter_map(|m| m.key.name.parse().ok())
            .collect();
        match matches.as_slice() {
            [] => Err(Error::UnknownSnapshot {
                reference: reference.into(),
            }),
            [one] => Ok(*one),
            many => Err(Error::AmbiguousSnapshot {
                reference: reference.into(),
                candidates: many
                    .iter()
                    .map(|i| format!("{i:#}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}
