//! `check`: structure (every manifest readable, every index node readable and verified, every
//! referenced blob indexed in a pack that exists) and, with `read_data`, the content of every
//! pack (every blob decrypted, decompressed and hashed against its id, in parallel) and the op
//! stream of every memory stream (it must give back exactly the stream's bytes). Damage is
//! reported per restore point and disk, so the user knows what is affected.
//!
//! In bounded memory, for a repository of any size (`scan.rs`): one walk of every restore
//! point (each shared subtree once) gathers the referenced ids into a sorted set on disk; one
//! pass joins them with the cached index in id order. Only when that finds a problem are the
//! restore points walked again one part at a time, to say which ones it affects.
use std::collections::{HashMap, HashSet};

use crossbeam_channel::bounded;
use serde::Serialize;
use vmkeep_core::blob;
use vmkeep_core::manifest::Manifest;
use vmkeep_core::{BlobId, ObjectKind, PackId, SnapshotId};
use vmkeep_store::Key;

use crate::error::Result;
use crate::gc;
use crate::index::{fetch_index_object, pack_key, BlobIndex, Fetched};
use crate::progress::Progress;
use crate::restore::stream::verify_memory_ops;
use crate::scan::RepoScan;
use crate::walk::Walker;
use crate::Repository;

/// Bad blobs remembered for the report, at most (a pack of damage beyond this is still
/// reported per restore point, as "not indexed" or "pack missing" when it is that).
const MAX_BAD_BLOBS: usize = 1 << 20;

#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    pub read_data: bool,
}

/// What is wrong with a restore point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DamageKind {
    /// The manifest cannot be read (or does not name itself).
    Manifest,
    /// A referenced blob is in no index object.
    BlobNotIndexed,
    /// A referenced blob's pack does not exist.
    PackMissing,
    /// A referenced blob failed verification (`--read-data`).
    BlobDamaged,
    /// An index tree node or stream index cannot be read or is malformed.
    Index,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Damage {
    pub snapshot: String,
    pub disk: Option<String>,
    pub kind: DamageKind,
    pub reason: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub snapshots_checked: usize,
    pub damaged: Vec<Damage>,
    pub packs_checked: u64,
    pub blobs_checked: u64,
    pub bytes_read: u64,
    /// Problems that affect no restore point (unindexed or unreferenced packs, damaged pack
    /// headers, ...).
    pub warnings: Vec<String>,
}

/// The problems found in one disk or stream: the first, and how many.
#[derive(Default)]
struct Problems {
    first: Option<(DamageKind, String)>,
    count: usize,
}

impl Problems {
    fn add(&mut self, kind: DamageKind, reason: String) {
        self.count += 1;
        self.first.get_or_insert((kind, reason));
    }

    fn report(self, snapshot: &SnapshotId, part: String, out: &mut Vec<Damage>) {
        if let Some((kind, mut reason)) = self.first {
            if self.count > 1 {
                reason.push_str(&format!(" (and {} more problems)", self.count - 1));
            }
            out.push(Damage {
                snapshot: snapshot.to_hex(),
                disk: Some(part),
                kind,
                reason,
            });
        }
    }
}

impl Repository {
    pub fn check(&self, opts: &CheckOptions, progress: &dyn Progress) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        let (snapshots, bad_manifests) = self.snapshots_from_store()?;
        for (name, why) in bad_manifests {
            report.damaged.push(Damage {
                snapshot: name,
                disk: None,
                kind: DamageKind::Manifest,
                reason: why,
            });
        }
        let records = gc::record::load_all(self)?;
        for (id, e) in &records.damaged {
            report.warnings.push(format!(
                "GC record {id} is damaged ({e}); the next prune replaces it"
            ));
        }
        let mut scan = RepoScan::load(self, records.condemned())?;
        for (key, e) in &scan.damaged {
            report
                .warnings
                .push(format!("index object {key} is damaged: {e}"));
        }
        // Every index object read again (the cache knows them by name, size and time, which
        // bit rot keeps), and with `read_data` every pack they name.
        let (bad_blobs, rotten) = self.reread(&scan, opts.read_data, &mut report, progress)?;
        scan.exclude(&rotten);

        // One walk of everything, then one pass over the index.
        progress.phase("walk", 0);
        let mut referenced = self.new_spill()?;
        let mut walker = Walker::new(self);
        let mut walk_damage = false;
        let mut op_damage: HashMap<(SnapshotId, String), String> = HashMap::new();
        for m in &snapshots {
            report.snapshots_checked += 1;
            for (part, disk, stream) in parts(m) {
                let mut visit = |r: &crate::walk::Ref| referenced.insert(r.id);
                let walked = match (disk, stream) {
                    (Some(d), _) => walker.walk_disk(&scan.index, m, d, &mut visit),
                    (_, Some(s)) => walker.walk_stream(&scan.index, s, &mut visit),
                    _ => Ok(()),
                };
                match walked {
                    Ok(()) => {}
                    Err(e) if e.is_damage() => walk_damage = true,
                    Err(e) => return Err(e),
                }
                // A memory stream's ops must give back exactly its bytes.
                if let (Some(s), true) = (stream, opts.read_data) {
                    match verify_memory_ops(self, &scan.index, s) {
                        Ok(()) => {}
                        Err(e) if e.is_damage() => {
                            op_damage.insert((m.id, part), format!("index unreadable: {e}"));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        progress.finish_phase();

        progress.phase("index", 0);
        let mut indexed: HashSet<PackId> = HashSet::new();
        let mut with_referenced: HashSet<PackId> = HashSet::new();
        let mut problems = 0u64;
        scan.pass(&mut referenced, &mut |g| {
            for l in g.copies {
                indexed.insert(l.pack);
                if g.referenced {
                    with_referenced.insert(l.pack);
                }
            }
            if g.referenced
                && (!g.copies.iter().any(|l| scan.index.pack_exists(&l.pack))
                    || bad_blobs.contains(&g.id))
            {
                problems += 1;
            }
            Ok(())
        })?;
        drop(referenced);
        progress.finish_phase();

        if problems > 0 || walk_damage || !op_damage.is_empty() {
            self.attribute_damage(&scan.index, &snapshots, &bad_blobs, op_damage, &mut report)?;
        }

        let mut unindexed: Vec<&PackId> =
            scan.sizes.keys().filter(|p| !indexed.contains(p)).collect();
        unindexed.sort();
        for p in unindexed {
            report.warnings.push(format!(
                "pack {p} is not indexed (left by an interrupted backup; prune reclaims it, \
                 or `vmkeep repair index` indexes it)"
            ));
        }
        let mut unreferenced: Vec<&PackId> = indexed
            .iter()
            .filter(|p| scan.sizes.contains_key(p) && !with_referenced.contains(p))
            .collect();
        unreferenced.sort();
        for p in unreferenced {
            report.warnings.push(format!(
                "pack {p} holds no referenced data (a forgotten restore point or an interrupted \
                 backup; prune reclaims it)"
            ));
        }
        // Temporary files of killed writers: warnings only (temporaries.rs).
        report.warnings.extend(self.temporary_warnings()?);

        report.ok = report.damaged.is_empty();
        Ok(report)
    }

    /// Walk each disk and stream of each restore point on its own (damage in a subtree shared
    /// by several restore points is reported for each of them), and report its problems.
    fn attribute_damage(
        &self,
        index: &BlobIndex,
        snapshots: &[Manifest],
        bad_blobs: &HashSet<BlobId>,
        mut op_damage: HashMap<(SnapshotId, String), String>,
        report: &mut CheckReport,
    ) -> Result<()> {
        let problem = |id: &BlobId| -> Option<(DamageKind, String)> {
            match index.get(id) {
                None => Some((
                    DamageKind::BlobNotIndexed,
                    format!("blob {id:#} is not in any index"),
                )),
                Some(l) if !index.pack_exists(&l.pack) => Some((
                    DamageKind::PackMissing,
                    format!("blob {id:#} is in pack {:#}, which is missing", l.pack),
                )),
                Some(_) if bad_blobs.contains(id) => {
                    Some((DamageKind::BlobDamaged, format!("blob {id:#} is damaged")))
                }
                Some(_) => None,
            }
        };
        for m in snapshots {
            for (part, disk, stream) in parts(m) {
                let mut problems = Problems::default();
                let mut visit = |r: &crate::walk::Ref| -> Result<()> {
                    if let Some((kind, reason)) = problem(&r.id) {
                        problems.add(kind, reason);
                    }
                    Ok(())
                };
                let mut walker = Walker::new(self);
                let walked = match (disk, stream) {
                    (Some(d), _) => walker.walk_disk(index, m, d, &mut visit),
                    (_, Some(s)) => walker.walk_stream(index, s, &mut visit),
                    _ => Ok(()),
                };
                match walked {
                    Ok(()) => {}
                    Err(e) if e.is_damage() => {
                        problems.add(DamageKind::Index, format!("index unreadable: {e}"))
                    }
                    Err(e) => return Err(e),
                }
                if let Some(reason) = op_damage.remove(&(m.id, part.clone())) {
                    problems.add(DamageKind::Index, reason);
                }
                problems.report(&m.id, part, &mut report.damaged);
            }
        }
        Ok(())
    }

    /// Read every index object again in parallel and verify it, and with `read_packs` every
    /// pack it names (memory holds one object and one pack per reader). Returns the ids of
    /// blobs that failed verification (at most [`MAX_BAD_BLOBS`]) and the index objects found
    /// damaged.
    fn reread(
        &self,
        scan: &RepoScan,
        read_packs: bool,
        report: &mut CheckReport,
        progress: &dyn Progress,
    ) -> Result<(HashSet<BlobId>, Vec<Key>)> {
        // Reading the packs needs every object's entries; verifying needs only those the
        // cache did not read just now.
        let objects = match read_packs {
            true => scan.objects()?,
            false => scan.objects_read_before()?,
        };
        match read_packs {
            true => progress.phase("read data", scan.sizes.values().sum()),
            false => progress.phase("read index", objects.len() as u64),
        }
        let threads = self.reader_threads();
        let (tx, rx) = bounded::<&Key>(threads * 2);
        struct Out {
            bad: HashSet<BlobId>,
            rotten: Vec<Key>,
            warnings: Vec<String>,
            packs: u64,
            blobs: u64,
            bytes: u64,
        }
        let sizes = &scan.sizes;
        let outs: Vec<Result<Out>> = std::thread::scope(|s| {
            let mut hs = Vec::new();
            for _ in 0..threads {
                let rx = rx.clone();
                hs.push(s.spawn(move || -> Result<Out> {
                    let mut o = Out {
                        bad: HashSet::new(),
                        rotten: Vec::new(),
                        warnings: Vec::new(),
                        packs: 0,
                        blobs: 0,
                        bytes: 0,
                    };
                    for key in rx {
                        let file = match fetch_index_object(self, key)? {
                            Fetched::Read(f) => f,
                            Fetched::Gone => continue, // rewritten by a prune meanwhile
                            Fetched::Damaged(e) => {
                                o.warnings
                                    .push(format!("index object {key} is damaged: {e}"));
                                o.rotten.push(key.clone());
                                continue;
                            }
                        };
                        if !read_packs {
                            progress.advance(1);
                            continue;
                        }
                        for (pack, entries) in &file.packs {
                            if !sizes.contains_key(pack) {
                                continue; // reported by the structural pass for referenced blobs
                            }
                            let bytes = match self
                                .store
                                .get(&pack_key(pack), ObjectKind::Pack.max_size())
                            {
                                Ok(b) => b,
                                Err(e) if e.is_not_found() => continue,
                                Err(e) if e.is_too_large() => {
                                    o.warnings.push(e.to_string());
                                    o.bad.extend(entries.iter().map(|e| e.id));
                                    continue;
                                }
                                Err(e) => return Err(e.into()),
                            };
                            o.packs += 1;
                            o.bytes += bytes.len() as u64;
                            if blake3::hash(&bytes).as_bytes() != pack.as_bytes() {
                                o.warnings
                                    .push(format!("pack {pack} does not hash to its name"));
                            }
                            for e in entries {
                                o.blobs += 1;
                                let start = e.offset as usize;
                                let ok = start
                                    .checked_add(e.length as usize)
                                    .and_then(|end| bytes.get(start..end))
                                    .is_some_and(|stored| {
                                        blob::decode(&self.keys, e.kind, &e.id, e.raw_len, stored)
                                            .is_ok()
                                    });
                                if !ok && o.bad.len() < MAX_BAD_BLOBS {
                                    o.bad.insert(e.id);
                                }
                            }
                            progress.advance(bytes.len() as u64);
                        }
                    }
                    Ok(o)
                }));
            }
            drop(rx);
            for key in &objects {
                if tx.send(key).is_err() {
                    break;
                }
            }
            drop(tx);
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(crate::Error::Internal("check worker panicked".into()))
                    })
                })
                .collect()
        });
        progress.finish_phase();
        let mut bad = HashSet::new();
        let mut rotten = Vec::new();
        for o in outs {
            let o = o?;
            bad.extend(o.bad);
            rotten.extend(o.rotten);
            report.warnings.extend(o.warnings);
            report.packs_checked += o.packs;
            report.blobs_checked += o.blobs;
            report.bytes_read += o.bytes;
        }
        if bad.len() >= MAX_BAD_BLOBS {
            report.warnings.push(format!(
                "more than {MAX_BAD_BLOBS} damaged blobs: the report names the restore points \
                 affected by the first ones only"
            ));
        }
        Ok((bad, rotten))
    }
}

/// The parts of a restore point check reports on: each disk, each stream.
#[allow(clippy::type_complexity)]
fn parts(
    m: &Manifest,
) -> impl Iterator<
    Item = (
        String,
        Option<&vmkeep_core::manifest::DiskEntry>,
        Option<&vmkeep_core::manifest::StreamRecord>,
    ),
> {
    m.disks
        .iter()
        .map(|d| (d.name.clone(), Some(d), None))
        .chain(
            m.streams
                .iter()
                .map(|s| (format!("stream:{}", s.name), None, Some(s))),
        )
}
