//! `check`: structure (every manifest readable, every index node readable and verified, every
//! referenced blob indexed in a pack that exists) and, with `read_data`, the content of every
//! pack (every blob decrypted, decompressed and hashed against its id, in parallel) and the op
//! stream of every memory stream (it must give back exactly the stream's bytes). Damage is
//! reported per restore point and disk, so the user knows what is affected.
use std::collections::{HashMap, HashSet};

use crossbeam_channel::bounded;
use serde::Serialize;
use vmkeep_core::blob;
use vmkeep_core::pack::PackEntry;
use vmkeep_core::{BlobId, ObjectKind, PackId, SnapshotId};

use crate::error::Result;
use crate::gc;
use crate::index::{pack_key, pack_sizes, BlobIndex, RawIndex};
use crate::progress::Progress;
use crate::restore::stream::verify_memory_ops;
use crate::walk::Walker;
use crate::Repository;

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
        let (snapshots, bad_manifests) = self.snapshots_with_damage()?;
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
        let condemned = records.condemned();
        let raw = RawIndex::load(self)?;
        let sizes = pack_sizes(self)?;
        let index = BlobIndex::from_raw(&raw, condemned, sizes.keys().copied().collect());
        let RawIndex {
            by_pack, damaged, ..
        } = raw;
        for (key, e) in damaged {
            report
                .warnings
                .push(format!("index object {key} is damaged: {e}"));
        }
        for p in sizes.keys() {
            if !by_pack.contains_key(p) {
                report.warnings.push(format!(
                    "pack {p} is not indexed (left by an interrupted backup; prune reclaims it, \
                     or `vmkeep repair index` indexes it)"
                ));
            }
        }

        let bad_blobs = if opts.read_data {
            self.read_all_packs(&by_pack, &sizes, &mut report, progress)?
        } else {
            HashSet::new()
        };

        let mut referenced: HashSet<BlobId> = HashSet::new();
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
        for m in &snapshots {
            report.snapshots_checked += 1;
            let parts = m
                .disks
                .iter()
                .map(|d| (d.name.clone(), Some(d), None))
                .chain(
                    m.streams
                        .iter()
                        .map(|s| (format!("stream:{}", s.name), None, Some(s))),
                );
            for (part, disk, stream) in parts {
                let mut problems = Problems::default();
                let mut visit = |r: &crate::walk::Ref| -> Result<()> {
                    referenced.insert(r.id);
                    if let Some((kind, reason)) = problem(&r.id) {
                        problems.add(kind, reason);
                    }
                    Ok(())
                };
                // A fresh walker per part: damage in a subtree shared by several restore
                // points is reported for each of them.
                let mut walker = Walker::new(self);
                let walked = match (disk, stream) {
                    (Some(d), _) => walker.walk_disk(&index, m, d, &mut visit),
                    (_, Some(s)) => walker.walk_stream(&index, s, &mut visit),
                    _ => Ok(()),
                };
                // A memory stream's ops must give back exactly its bytes.
                let walked = walked.and_then(|()| match stream {
                    Some(s) if opts.read_data => verify_memory_ops(self, &index, s),
                    _ => Ok(()),
                });
                match walked {
                    Ok(()) => {}
                    Err(e) if e.is_damage() => {
                        problems.add(DamageKind::Index, format!("index unreadable: {e}"))
                    }
                    Err(e) => return Err(e),
                }
                problems.report(&m.id, part, &mut report.damaged);
            }
        }
        let mut unreferenced: Vec<&PackId> = by_pack
            .iter()
            .filter(|(p, es)| {
                sizes.contains_key(p) && !es.iter().any(|e| referenced.contains(&e.id))
            })
            .map(|(p, _)| p)
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

    /// Read every indexed pack in parallel; return the ids of blobs that failed verification.
    fn read_all_packs(
        &self,
        by_pack: &HashMap<PackId, Vec<PackEntry>>,
        packs: &HashMap<PackId, u64>,
        report: &mut CheckReport,
        progress: &dyn Progress,
    ) -> Result<HashSet<BlobId>> {
        let total: u64 = by_pack.keys().filter_map(|p| packs.get(p)).sum();
        progress.phase("read data", total);
        let threads = self.reader_threads();
        let (tx, rx) = bounded::<(&PackId, &Vec<PackEntry>)>(threads * 2);
        struct Out {
            bad: HashSet<BlobId>,
            warnings: Vec<String>,
            packs: u64,
            blobs: u64,
            bytes: u64,
        }
        let outs: Vec<Result<Out>> = std::thread::scope(|s| {
            let mut hs = Vec::new();
            for _ in 0..threads {
                let rx = rx.clone();
                hs.push(s.spawn(move || -> Result<Out> {
                    let mut o = Out {
                        bad: HashSet::new(),
                        warnings: Vec::new(),
                        packs: 0,
                        blobs: 0,
                        bytes: 0,
                    };
                    for (pack, entries) in rx {
                        if !packs.contains_key(pack) {
                            continue; // reported by the structural pass for referenced blobs
                        }
                        let bytes =
                            match self.store.get(&pack_key(pack), ObjectKind::Pack.max_size()) {
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
                            if !ok {
                                o.bad.insert(e.id);
                            }
                        }
                        progress.advance(bytes.len() as u64);
                    }
                    Ok(o)
                }));
            }
            drop(rx);
            for item in by_pack.iter() {
                if tx.send(item).is_err() {
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
        for o in outs {
            let o = o?;
            bad.extend(o.bad);
            report.warnings.extend(o.warnings);
            report.packs_checked += o.packs;
            report.blobs_checked += o.blobs;
            report.bytes_read += o.bytes;
        }
        Ok(bad)
    }
}
