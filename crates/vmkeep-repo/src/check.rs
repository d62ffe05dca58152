//! `check`: structure (every manifest readable, every index node readable and verified, every
//! referenced blob indexed in a pack that exists) and, with `read_data`, the content of every
//! pack (every blob decrypted, decompressed and hashed against its id, in parallel). Damage is
//! reported per restore point and disk, so the user knows what is affected.
use std::collections::{HashMap, HashSet};

use crossbeam_channel::bounded;
use serde::Serialize;
use vmkeep_core::blob;
use vmkeep_core::pack::{PackEntry, MAX_PACK_LEN};
use vmkeep_core::{tree, BlobId, PackId};
use vmkeep_store::Kind;

use crate::error::Result;
use crate::gc_record;
use crate::index::{pack_key, BlobIndex, RawIndex};
use crate::nodes::RepoNodes;
use crate::progress::Progress;
use crate::Repository;

#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    pub read_data: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Damage {
    pub snapshot: String,
    pub disk: Option<String>,
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
    /// Problems that affect no restore point (unindexed packs, damaged pack headers, ...).
    pub warnings: Vec<String>,
}

impl Repository {
    pub fn check(&self, opts: &CheckOptions, progress: &dyn Progress) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        let (snapshots, bad_manifests) = self.snapshots_with_damage()?;
        for (name, why) in bad_manifests {
            report.damaged.push(Damage {
                snapshot: name,
                disk: None,
                reason: why,
            });
        }
        let condemned = gc_record::load_all(self)?
            .into_iter()
            .flat_map(|(_, rec)| rec.condemned)
            .collect();
        let raw = RawIndex::load(self)?;
        let index = BlobIndex::from_raw(&raw, condemned);
        let RawIndex {
            by_pack, damaged, ..
        } = raw;
        for (key, e) in damaged {
            report
                .warnings
                .push(format!("index object {key} is damaged: {e}"));
        }
        let packs: HashMap<String, u64> = self
            .store
            .list(Kind::Pack)?
            .into_iter()
            .map(|m| (m.key.name, m.size))
            .collect();
        for name in packs.keys() {
            if !name
                .parse::<PackId>()
                .is_ok_and(|p| by_pack.contains_key(&p))
            {
                report.warnings.push(format!(
                    "pack {name} is not indexed (left by an interrupted backup; prune reclaims it)"
                ));
            }
        }

        let bad_blobs = if opts.read_data {
            self.read_all_packs(&by_pack, &packs, &mut report, progress)?
        } else {
            HashSet::new()
        };

        let nodes = RepoNodes {
            repo: self,
            index: &index,
        };
        let cs = self.config.chunk_size as u64;
        let usable = |id: &BlobId| -> Option<String> {
            match index.get(id) {
                None => Some(format!("blob {id:#} is not in any index")),
                Some(l) if !packs.contains_key(&l.pack.to_hex()) => Some(format!(
                    "blob {id:#} is in pack {:#}, which is missing",
                    l.pack
                )),
                Some(_) if bad_blobs.contains(id) => Some(format!("blob {id:#} is damaged")),
                Some(_) => None,
            }
        };
        for m in &snapshots {
            report.snapshots_checked += 1;
            for d in &m.disks {
                let chunks = d.size.div_ceil(cs);
                let mut problems: Vec<String> = Vec::new();
                let r = tree::for_each_node(&nodes, &d.root, chunks, &mut |id, _| {
                    if let Some(p) = usable(id) {
                        problems.push(p);
                    }
                    Ok(())
                })
                .and_then(|_| {
                    tree::for_each_chunk(&nodes, &d.root, chunks, &mut |_, id| {
                        if let Some(p) = usable(id) {
                            problems.push(p);
                        }
                        Ok(())
                    })
                });
                if let Err(e) = r {
                    problems.push(format!("index tree unreadable: {e}"));
                }
                if !problems.is_empty() {
                    let n = problems.len();
                    let mut reason = problems.swap_remove(0);
                    if n > 1 {
                        reason.push_str(&format!(" (and {} more problems)", n - 1));
                    }
                    report.damaged.push(Damage {
                        snapshot: m.id.to_hex(),
                        disk: Some(d.name.clone()),
                        reason,
                    });
                }
            }
            for s in &m.streams {
                let mut problems = Vec::new();
                for id in &s.index {
                    if let Some(p) = usable(id) {
                        problems.push(p);
                        continue;
                    }
                    match self
                        .read_blob(&index, id)
                        .map_err(|e| e.to_string())
                        .and_then(|b| {
                            vmkeep_core::stream::decode_index_blob(&b).map_err(|e| e.to_string())
                        }) {
                        Ok(entries) => {
                            problems.extend(entries.iter().filter_map(|e| usable(&e.id)))
                        }
                        Err(e) => problems.push(format!("stream index unreadable: {e}")),
                    }
                }
                if let Some(reason) = problems.first() {
                    report.damaged.push(Damage {
                        snapshot: m.id.to_hex(),
                        disk: Some(format!("stream:{}", s.name)),
                        reason: reason.clone(),
                    });
                }
            }
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
        packs: &HashMap<String, u64>,
        report: &mut CheckReport,
        progress: &dyn Progress,
    ) -> Result<HashSet<BlobId>> {
        let total: u64 = by_pack.keys().filter_map(|p| packs.get(&p.to_hex())).sum();
        progress.phase("read data", total);
        let threads = self.tuning.threads.max(1);
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
                        if !packs.contains_key(&pack.to_hex()) {
                            continue; // reported by the structural pass for referenced blobs
                        }
                        let bytes = match self.store.get(&pack_key(pack), MAX_PACK_LEN) {
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
