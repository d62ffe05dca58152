//! The server's cache of a repository's pack lists (`refs/<snapshot id>`, PROTOCOL.md §5): which
//! VM each restore point belongs to and which VMs' restore points name each pack. Built by
//! listing and reading `refs/`, refreshed incrementally (only pack lists whose size or time
//! changed are read again) when a decision misses it, and updated by the server's own writes.
use std::collections::HashMap;
use std::time::SystemTime;

use vmkeep_core::packlist::PackList;
use vmkeep_store::{Key, ObjectKind, ObjectMeta, Store};

/// What the cache knows of one pack list.
#[derive(Debug)]
struct Entry {
    size: u64,
    modified: SystemTime,
    /// None when it does not parse: in scope only for whole-repository tokens.
    vm: Option<String>,
    packs: Vec<String>,
}

#[derive(Debug, Default)]
pub(crate) struct PackLists {
    loaded: bool,
    /// Snapshot id (hex) -> its pack list.
    entries: HashMap<String, Entry>,
    /// Pack id (hex) -> VM -> how many pack lists of that VM name it.
    packs: HashMap<String, HashMap<String, u32>>,
}

/// Read and parse one pack list (bounded by its kind's read bound).
pub(crate) fn read(store: &dyn Store, key: &Key) -> vmkeep_store::Result<Option<PackList>> {
    let unusable = |why: &dyn std::fmt::Display| {
        // Scoped tokens lose sight of that restore point until the list is rewritten: say how.
        tracing::warn!(
            "pack list {key} in {} is unusable ({why}); its restore point is hidden from \
             VM-scoped tokens until `vmkeep repair refs` rewrites it",
            store.location()
        );
        Ok(None)
    };
    match store.get(key, ObjectKind::Refs.max_size()) {
        Ok(bytes) => match PackList::from_json(&bytes) {
            Ok(list) => Ok(Some(list)),
            Err(e) => unusable(&e),
        },
        Err(e) if e.is_too_large() => unusable(&e),
        Err(e) => Err(e),
    }
}

impl PackLists {
    fn unlink(&mut self, name: &str) {
        let Some(old) = self.entries.remove(name) else {
            return;
        };
        let Some(vm) = old.vm else { return };
        for p in old.packs {
            if let Some(vms) = self.packs.get_mut(&p) {
                if let Some(n) = vms.get_mut(&vm) {
                    *n -= 1;
                    if *n == 0 {
                        vms.remove(&vm);
                    }
                }
                if vms.is_empty() {
                    self.packs.remove(&p);
                }
            }
        }
    }

    /// Record `refs/<name>` as written (or found) with this content.
    pub(crate) fn set(&mut self, meta: &ObjectMeta, list: Option<&PackList>) {
        let name = meta.key.name.clone();
        self.unlink(&name);
        let (vm, packs) = match list {
            Some(l) => (
                Some(l.vm.clone()),
                l.packs.iter().map(|p| p.to_hex()).collect::<Vec<_>>(),
            ),
            None => (None, Vec::new()),
        };
        if let Some(vm) = &vm {
            for p in &packs {
                *self
                    .packs
                    .entry(p.clone())
                    .or_default()
                    .entry(vm.clone())
                    .or_default() += 1;
            }
        }
        self.entries.insert(
            name,
            Entry {
                size: meta.size,
                modified: meta.modified,
                vm,
                packs,
            },
        );
    }

    pub(crate) fn remove(&mut self, name: &str) {
        self.unlink(name);
    }

    /// List `refs/` and read the pack lists that are new or changed; forget vanished ones.
    pub(crate) fn refresh(&mut self, store: &dyn Store) -> vmkeep_store::Result<()> {
        let listed = store.list(ObjectKind::Refs)?;
        let live: std::collections::HashSet<&str> =
            listed.iter().map(|m| m.key.name.as_str()).collect();
        let gone: Vec<String> = self
            .entries
            .keys()
            .filter(|n| !live.contains(n.as_str()))
            .cloned()
            .collect();
        for n in gone {
            self.unlink(&n);
        }
        for meta in &listed {
            let fresh = self
                .entries
                .get(&meta.key.name)
                .is_some_and(|e| e.size == meta.size && e.modified == meta.modified);
            if fresh {
                continue;
            }
            match read(store, &meta.key) {
                Ok(list) => self.set(meta, list.as_ref()),
                Err(e) if e.is_not_found() => self.unlink(&meta.key.name),
                Err(e) => return Err(e),
            }
        }
        self.loaded = true;
        Ok(())
    }

    pub(crate) fn ensure_loaded(&mut self, store: &dyn Store) -> vmkeep_store::Result<()> {
        if self.loaded {
            Ok(())
        } else {
            self.refresh(store)
        }
    }

    /// The VM of `refs/<name>` as cached: None when absent, Some(None) when unreadable.
    pub(crate) fn vm_of(&self, name: &str) -> Option<Option<&str>> {
        self.entries.get(name).map(|e| e.vm.as_deref())
    }

    /// Per VM: how many restore points (pack lists) and when the newest was written. Pack
    /// lists that do not parse are left out.
    pub(crate) fn per_vm(&self) -> Vec<(String, u64, SystemTime)> {
        let mut by: HashMap<&str, (u64, SystemTime)> = HashMap::new();
        for e in self.entries.values() {
            if let Some(vm) = e.vm.as_deref() {
                let slot = by.entry(vm).or_insert((0, SystemTime::UNIX_EPOCH));
                slot.0 += 1;
                slot.1 = slot.1.max(e.modified);
            }
        }
        let mut out: Vec<_> = by
            .into_iter()
            .map(|(vm, (n, t))| (vm.to_string(), n, t))
            .collect();
        out.sort();
        out
    }

    /// Whether a pack list of a VM `in_scope` accepts names `pack`.
    pub(crate) fn names_pack_for(&self, pack: &str, in_scope: impl Fn(&str) -> bool) -> bool {
        self.packs
            .get(pack)
            .is_some_and(|vms| vms.keys().any(|vm| in_scope(vm)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkeep_core::{PackId, SnapshotId};
    use vmkeep_store::LocalStore;

    #[test]
    fn tracks_writes_and_outside_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::create(dir.path().join("r")).unwrap();
        let put = |snap: u8, vm: &str, packs: &[u8]| {
            let l = PackList::new(
                SnapshotId([snap; 16]),
                vm,
                packs.iter().map(|&p| PackId([p; 32])).collect(),
            );
            let key = Key::new(ObjectKind::Refs, SnapshotId([snap; 16]).to_hex()).unwrap();
            store.put(&key, &l.to_json()).unwrap();
        };
        let pack = |p: u8| PackId([p; 32]).to_hex();
        put(1, "a", &[1, 2]);
        put(2, "b", &[2, 3]);
        let mut c = PackLists::default();
        c.ensure_loaded(&store).unwrap();
        assert!(c.names_pack_for(&pack(1), |vm| vm == "a"));
        assert!(!c.names_pack_for(&pack(3), |vm| vm == "a"));
        assert!(c.names_pack_for(&pack(2), |vm| vm == "b"));
        assert_eq!(c.vm_of(&SnapshotId([2; 16]).to_hex()), Some(Some("b")));
        // Changed outside the cache: seen after a refresh.
        store
            .delete(&Key::new(ObjectKind::Refs, SnapshotId([1; 16]).to_hex()).unwrap())
            .unwrap();
        put(3, "a", &[3]);
        c.refresh(&store).unwrap();
        assert!(!c.names_pack_for(&pack(1), |vm| vm == "a"));
        assert!(c.names_pack_for(&pack(3), |vm| vm == "a"));
        assert!(c.names_pack_for(&pack(2), |vm| vm == "b"));
        c.remove(&SnapshotId([2; 16]).to_hex());
        assert!(!c.names_pack_for(&pack(2), |_| true));
    }
}
