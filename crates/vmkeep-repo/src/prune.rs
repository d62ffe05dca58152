//! `prune`: apply a retention policy (forget), then collect garbage.
//!
//! GC never deletes a pack a running backup might reference. It works in two steps across time
//! (FORMAT.md "Concurrency and GC"):
//! 1. condemn: packs holding no blob any restore point references (and packs whose live blobs
//!    were copied into new packs: repacking) are listed in a new `gc/` record;
//! 2. sweep: a record's packs are deleted once every backup that might not have seen the record
//!    has ended: no live lease created before the record (plus the allowed clock skew for leases
//!    of other hosts). Backups that start after a record treat its packs as absent (they write
//!    such blobs anew), so they never depend on them. When no backup runs, both steps happen in
//!    the same prune and space comes back at once.
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use vmkeep_core::object::{self, ObjectKind};
use vmkeep_core::pack::{IndexFile, PackEntry};
use vmkeep_core::retention::{self, RetentionPolicy};
use vmkeep_core::{tree, BlobId, PackId, SnapshotId};
use vmkeep_store::{Key, Kind};

use crate::error::Result;
use crate::gc_record::{self, GcRecord};
use crate::index::{pack_key, pack_sizes, BlobIndex, Location, RawIndex};
use crate::lease::{self, LeaseRecord};
use crate::nodes::RepoNodes;
use crate::packer::Packer;
use crate::progress::Progress;
use crate::repository::hostname;
use crate::Repository;

/// Repack a pack when less than this fraction of its bytes is still referenced.
const REPACK_BELOW_USED: f64 = 0.8;

#[derive(Clone, Debug, Default)]
pub struct PruneOptions {
    pub vm: Option<String>,
    pub policy: RetentionPolicy,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlannedPoint {
    pub id: SnapshotId,
    pub vm: String,
    pub time: DateTime<Utc>,
    pub keep: bool,
    pub reasons: Vec<&'static str>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PrunePlan {
    pub points: Vec<PlannedPoint>,
}

impl PrunePlan {
    pub fn kept(&self) -> Vec<SnapshotId> {
        self.points
            .iter()
            .filter(|p| p.keep)
            .map(|p| p.id)
            .collect()
    }
    pub fn forgotten(&self) -> Vec<SnapshotId> {
        self.points
            .iter()
            .filter(|p| !p.keep)
            .map(|p| p.id)
            .collect()
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcStats {
    pub packs_deleted: u64,
    pub reclaimed_bytes: u64,
    pub packs_condemned: u64,
    pub packs_repacked: u64,
    pub bytes_repacked: u64,
    /// Condemned packs whose deletion waits for running backups (reclaimed by a later prune).
    pub packs_waiting: u64,
    pub bytes_waiting: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneStats {
    pub kept: Vec<SnapshotId>,
    pub forgotten: Vec<SnapshotId>,
    pub gc: GcStats,
    pub temporaries: crate::TemporaryStats,
}

/// Every blob id the current restore points reference.
pub(crate) fn referenced_blobs(repo: &Repository, index: &BlobIndex) -> Result<HashSet<BlobId>> {
    let nodes = RepoNodes { repo, index };
    let cs = repo.config.chunk_size as u64;
    let mut set = HashSet::new();
    // A manifest that cannot be read still owns its data: never collect garbage around it.
    let (manifests, damaged) = repo.snapshots_with_damage()?;
    if let Some((name, why)) = damaged.into_iter().next() {
        return Err(crate::Error::Invalid {
            what: "repository state",
            reason: format!(
                "restore point {name} is unreadable ({why}); prune refuses to run so its data is \
                 not collected; run `vmkeep check`, then `vmkeep forget` it if it is beyond repair"
            ),
        });
    }
    for m in manifests {
        for d in &m.disks {
            let chunks = d.size.div_ceil(cs);
            tree::for_each_node(&nodes, &d.root, chunks, &mut |id, _| {
                set.insert(*id);
                Ok(())
            })
            .and_then(|_| {
                tree::for_each_chunk(&nodes, &d.root, chunks, &mut |_, id| {
                    set.insert(*id);
                    Ok(())
                })
            })
            .map_err(|e| crate::Error::corrupt(format!("index of {} disk {}", m.id, d.name), e))?;
        }
        for s in &m.streams {
            for id in &s.index {
                set.insert(*id);
                let b = repo.read_blob(index, id)?;
                let entries = vmkeep_core::stream::decode_index_blob(&b)
                    .map_err(|e| crate::Error::corrupt(format!("stream index {id}"), e))?;
                set.extend(entries.iter().map(|e| e.id));
            }
        }
    }
    Ok(set)
}

impl Repository {
    pub fn prune_plan(&self, opts: &PruneOptions) -> Result<PrunePlan> {
        let all = self.snapshots()?;
        let mut by_vm: HashMap<&str, Vec<&vmkeep_core::manifest::Manifest>> = HashMap::new();
        for m in &all {
            if opts.vm.as_deref().is_none_or(|v| v == m.vm) {
                by_vm.entry(&m.vm).or_default().push(m);
            }
        }
        let mut points = Vec::new();
        for (_, ms) in by_vm {
            let input: Vec<(SnapshotId, DateTime<Utc>)> =
                ms.iter().map(|m| (m.id, m.time)).collect();
            for (m, d) in ms.iter().zip(retention::plan(&opts.policy, &input)) {
                points.push(PlannedPoint {
                    id: m.id,
                    vm: m.vm.clone(),
                    time: m.time,
                    keep: d.keep,
                    reasons: d.reasons,
                });
            }
        }
        points.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
        Ok(PrunePlan { points })
    }

    /// Forget what the plan drops, then collect garbage.
    pub fn prune(&self, plan: &PrunePlan, progress: &dyn Progress) -> Result<PruneStats> {
        let lease = self.maintenance_lease("prune")?;
        let _ = lease::remove_stale(self, false);
        let temporaries = self.remove_stale_temporaries()?; // safe age: temporaries.rs
        let forgotten = self.forget_locked(&plan.forgotten())?;
        let gc = self.gc_locked(lease.name(), progress)?;
        drop(lease);
        Ok(PruneStats {
            kept: plan.kept(),
            forgotten,
            gc,
            temporaries,
        })
    }

    fn gc_locked(&self, my_lease: &str, progress: &dyn Progress) -> Result<GcStats> {
        let mut stats = GcStats::default();
        let records = gc_record::load_all(self)?;
        let condemned_before: HashSet<PackId> = records
            .iter()
            .flat_map(|(_, r)| r.condemned.iter().copied())
            .collect();
        let (by_pack, index_files, index) = {
            let raw = intact_index(self)?;
            let index = BlobIndex::from_raw(&raw, condemned_before.clone());
            (raw.by_pack, raw.files, index)
        };
        let pack_sizes = pack_sizes(self)?;
        progress.phase("mark", 0);
        let referenced = referenced_blobs(self, &index)?;
        progress.finish_phase();

        // 1. Condemn: choose one home pack per referenced blob (the most used pack holding it),
        //    then condemn packs that are home to nothing, and repack sparsely used ones.
        let mut used: HashMap<PackId, u64> = HashMap::new();
        for (p, es) in &by_pack {
            if pack_sizes.contains_key(p) && !condemned_before.contains(p) {
                let u = es
                    .iter()
                    .filter(|e| referenced.contains(&e.id))
                    .map(|e| e.length as u64)
                    .sum();
                used.insert(*p, u);
            }
        }
        let frac =
            |p: &PackId| used.get(p).copied().unwrap_or(0) as f64 / pack_sizes[p].max(1) as f64;
        let mut home: HashMap<BlobId, PackId> = HashMap::new();
        for (p, es) in &by_pack {
            if !used.contains_key(p) {
                continue;
            }
            for e in es.iter().filter(|e| referenced.contains(&e.id)) {
                let better = match home.get(&e.id) {
                    None => true,
                    Some(h) => (frac(p), *p) > (frac(h), *h),
                };
                if better {
                    home.insert(e.id, *p);
                }
            }
        }
        let mut homed: HashMap<PackId, Vec<PackEntry>> = HashMap::new();
        for (p, es) in &by_pack {
            for e in es {
                if home.get(&e.id) == Some(p)
                    && !homed.get(p).is_some_and(|v| v.iter().any(|x| x.id == e.id))
                {
                    homed.entry(*p).or_default().push(*e);
                }
            }
        }
        let mut condemn: Vec<PackId> = Vec::new();
        let mut repack: Vec<(PackId, Vec<PackEntry>)> = Vec::new();
        for (p, size) in &pack_sizes {
            if condemned_before.contains(p) {
                continue;
            }
            match homed.get(p) {
                None => condemn.push(*p), // unreferenced, or not indexed at all (orphan)
                Some(es) => {
                    let live: u64 = es.iter().map(|e| e.length as u64).sum();
                    if (live as f64) < REPACK_BELOW_USED * *size as f64 {
                        repack.push((*p, es.clone()));
                    }
                }
            }
        }
        if !repack.is_empty() {
            progress.phase(
                "repack",
                repack
                    .iter()
                    .map(|(_, es)| es.iter().map(|e| e.length as u64).sum::<u64>())
                    .sum(),
            );
            let packer = Packer::start(
                self.store.clone(),
                self.keys.clone(),
                self.config.pack_size as usize,
            )?;
            let tx = packer.sender();
            for (p, es) in &repack {
                for e in es {
                    let data = self.read_blob_at(&e.id, &Location::from_entry(*p, e))?;
                    let encoded = vmkeep_core::blob::encode(&self.keys, e.kind, &e.id, &data);
                    stats.bytes_repacked += e.length as u64;
                    progress.advance(e.length as u64);
                    let msg = crate::packer::EncodedBlob {
                        kind: e.kind,
                        id: e.id,
                        raw_len: e.raw_len,
                        data: encoded,
                    };
                    if tx.send(msg).is_err() {
                        drop(tx);
                        return Err(packer.failure());
                    }
                }
                condemn.push(*p);
                stats.packs_repacked += 1;
            }
            drop(tx);
            packer.finish()?;
            self.store.flush()?;
            progress.finish_phase();
        }
        // The sweep must see the copies just repacked (and their packs): otherwise every repacked
        // pack counts as the only home of its live blobs and is kept until a later prune.
        let (by_pack, index_files, pack_sizes) = if repack.is_empty() {
            (by_pack, index_files, pack_sizes)
        } else {
            let raw = intact_index(self)?;
            // A pack condemned as unindexed (left by a dead repack) may just have been written
            // again, same bytes and name, by this repack: it is a live home now.
            condemn.retain(|p| by_pack.contains_key(p) || !raw.by_pack.contains_key(p));
            (raw.by_pack, raw.files, crate::index::pack_sizes(self)?)
        };
        let mut records = records;
        if !condemn.is_empty() {
            condemn.sort();
            stats.packs_condemned = condemn.len() as u64;
            let rec = GcRecord {
                created: Utc::now(),
                host: hostname(),
                pid: std::process::id(),
                condemned: condemn,
            };
            let key = gc_record::write(self, &rec)?;
            self.store.flush()?;
            crate::hooks::kill_point("after-gc-record");
            records.push((key, rec));
        }

        // 2. Sweep every record no running backup predates. Leases are listed after the record
        //    was written: a backup missing from this list started after it and has seen it.
        let leases = lease::list(self)?;
        let now = Utc::now();
        let me = hostname();
        let blocking = |rec: &GcRecord| -> bool {
            leases.iter().any(|(k, l): &(Key, LeaseRecord)| {
                if k.name == my_lease || !lease::holder_alive(l, now, self.tuning.lease_timeout) {
                    return false;
                }
                let margin = if l.host == me {
                    chrono::Duration::zero()
                } else {
                    chrono::Duration::from_std(self.tuning.clock_skew).unwrap_or_default()
                };
                l.created <= rec.created + margin
            })
        };
        let mut copies: HashMap<BlobId, Vec<PackId>> = HashMap::new();
        for (p, es) in &by_pack {
            for e in es.iter().filter(|e| referenced.contains(&e.id)) {
                copies.entry(e.id).or_default().push(*p);
            }
        }
        let mut deleted: HashSet<PackId> = HashSet::new();
        let mut swept: Vec<Key> = Vec::new();
        for (key, rec) in &records {
            if blocking(rec) {
                for p in &rec.condemned {
                    stats.packs_waiting += 1;
                    stats.bytes_waiting += pack_sizes.get(p).copied().unwrap_or(0);
                }
                continue;
            }
            let mut kept = Vec::new();
            for p in &rec.condemned {
                // A backup that predates the record may have reused a blob only this pack has.
                let needed = by_pack.get(p).is_some_and(|es| {
                    es.iter().any(|e| {
                        referenced.contains(&e.id)
                            && !copies.get(&e.id).is_some_and(|qs| {
                                qs.iter().any(|q| {
                                    q != p
                                        && pack_sizes.contains_key(q)
                                        && !deleted.contains(q)
                                        && !rec.condemned.contains(q)
                                })
                            })
                    })
                });
                if needed {
                    kept.push(*p);
                    continue;
                }
                self.store.delete(&pack_key(p))?;
                crate::hooks::kill_point("after-pack-delete");
                deleted.insert(*p);
                stats.packs_deleted += 1;
                stats.reclaimed_bytes += pack_sizes.get(p).copied().unwrap_or(0);
            }
            if !kept.is_empty() {
                tracing::info!(
                    packs = kept.len(),
                    "condemned packs are referenced again; kept"
                );
            }
            swept.push(key.clone());
        }

        // 3. Drop index entries of deleted packs (new index objects first, then the old ones),
        //    then the swept records.
        if !deleted.is_empty() {
            for (name, packs) in &index_files {
                if !packs.iter().any(|p| deleted.contains(p)) {
                    continue;
                }
                let keep: Vec<(PackId, Vec<PackEntry>)> = packs
                    .iter()
                    .filter(|p| !deleted.contains(p))
                    .map(|p| (*p, by_pack_for_file(&by_pack, p)))
                    .collect();
                if !keep.is_empty() {
                    let file = IndexFile { packs: keep };
                    let sealed = object::seal(&self.keys, ObjectKind::Index, &file.encode());
                    let new_name = blake3::hash(&sealed).to_hex().to_string();
                    if new_name != *name {
                        self.store.put(&Key::new(Kind::Index, new_name)?, &sealed)?;
                    }
                }
                self.store.flush()?;
                self.store.delete(&Key::new(Kind::Index, name.clone())?)?;
            }
        }
        self.store.flush()?;
        for key in swept {
            self.store.delete(&key)?;
        }
        self.store.flush()?;
        Ok(stats)
    }
}

/// Entries of a pack as indexed (all index objects' entries for that pack, deduplicated).
fn by_pack_for_file(by_pack: &HashMap<PackId, Vec<PackEntry>>, p: &PackId) -> Vec<PackEntry> {
    let mut v = by_pack.get(p).cloned().unwrap_or_default();
    v.sort_by_key(|e| e.offset);
    v.dedup_by_key(|e| e.offset);
    v
}

/// Every index object, or the first damaged one as an error: GC must not decide what is
/// unreferenced while part of the index is unreadable.
fn intact_index(repo: &Repository) -> Result<RawIndex> {
    let mut raw = RawIndex::load(repo)?;
    match raw.damaged.pop() {
        Some((key, e)) => Err(crate::Error::corrupt(key.to_string(), e)),
        None => Ok(raw),
    }
}
