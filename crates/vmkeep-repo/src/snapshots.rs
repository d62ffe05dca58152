//! Restore points: listing, resolving references, reading and writing manifests.
use vmkeep_core::manifest::Manifest;
use vmkeep_core::SnapshotId;
use vmkeep_core::{object, ObjectKind};
use vmkeep_store::Key;

use crate::error::{Error, Result};
use crate::Repository;

pub(crate) fn snapshot_key(id: &SnapshotId) -> Key {
    Key::new(ObjectKind::Snapshot, id.to_hex()).expect("hex names are valid keys")
}

impl Repository {
    /// Read one manifest and check it is the restore point its name says.
    pub fn load_manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        let key = snapshot_key(id);
        let bytes = match self.store.get(&key, ObjectKind::Snapshot.max_size()) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(Error::UnknownSnapshot {
                    reference: id.to_hex(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let m = object::open(&self.keys, ObjectKind::Snapshot, &bytes)
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

    /// Write (or replace) a manifest: the commit point of a backup.
    pub(crate) fn write_manifest(&self, m: &Manifest) -> Result<u64> {
        let sealed = object::seal(&self.keys, ObjectKind::Snapshot, &m.to_json());
        self.store.put(&snapshot_key(&m.id), &sealed)?;
        Ok(sealed.len() as u64)
    }

    /// Every readable restore point, oldest first, and (name, reason) of each unreadable manifest.
    #[allow(clippy::type_complexity)]
    pub fn snapshots_with_damage(&self) -> Result<(Vec<Manifest>, Vec<(String, String)>)> {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for meta in self.store.list(ObjectKind::Snapshot)? {
            let Ok(id) = meta.key.name.parse::<SnapshotId>() else {
                bad.push((meta.key.name.clone(), "not a snapshot id".into()));
                continue;
            };
            match self.load_manifest(&id) {
                Ok(m) => ok.push(m),
                Err(Error::UnknownSnapshot { .. }) => {} // forgotten meanwhile
                Err(e) if e.is_damage() => bad.push((id.to_hex(), e.to_string())),
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
