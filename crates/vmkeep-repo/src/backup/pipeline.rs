//! The data path of one disk: a reader thread, N worker threads (zero test, hash, dedup,
//! compress, encrypt) and a collector (this thread) that builds the index tree in chunk order.
//!
//!   reader --batches--> workers --encoded blobs--> packer thread --> packs, indexes
//!                          \--(chunk, id)--> collector --> TreeBuilder --> tree nodes --> packer
//!
//! Channels are bounded, so memory stays at a few MiB per thread whatever the disk size.
use std::collections::BTreeMap;
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};
use vmkeep_core::blob;
use vmkeep_core::changes::ChangeMap;
use vmkeep_core::keys::BlobKind;
use vmkeep_core::manifest::{DiskEntry, Manifest};
use vmkeep_core::tree::{self, TreeBuilder};
use vmkeep_core::BlobId;

use super::Dedup;
use crate::error::{Error, Result};
use crate::nodes::SessionNodes;
use crate::packer::{EncodedBlob, Packer};
use crate::progress::Progress;
use crate::Repository;
pub use vmkeep_io::source::{DiskReader, ReadPlan};

pub(crate) const PACKER_GONE: &str = "packer gone";

/// Bytes read per batch (a batch is whole chunks; at least one).
const BATCH_BYTES: u64 = 1 << 20;

static ZEROS: [u8; 4 << 20] = [0u8; 4 << 20];

pub(crate) struct DiskOutcome {
    pub entry: DiskEntry,
    pub read_bytes: u64,
    pub changed_bytes: u64,
    pub new_bytes: u64,
    pub chunks_new: u64,
    pub chunks_reused: u64,
}

struct Batch {
    seq: u64,
    first: u64,
    data: Vec<u8>,
}

#[derive(Default)]
struct BatchResult {
    seq: u64,
    entries: Vec<(u64, BlobId)>,
    read: u64,
    new_bytes: u64,
    chunks_new: u64,
    chunks_reused: u64,
}

fn validate_plan(plan: &ReadPlan, chunks: u64) -> Result<()> {
    let mut next = 0u64;
    for &(first, count) in &plan.runs {
        let end = first.checked_add(count);
        if count == 0 || first < next || end.is_none_or(|e| e > chunks) {
            return Err(Error::Internal(format!(
                "invalid read plan run ({first}, {count}) for {chunks} chunks"
            )));
        }
        next = first + count;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    repo: &Repository,
    dedup: &Arc<Dedup>,
    packer: &Packer,
    name: &str,
    reader: &dyn DiskReader,
    plan: &ReadPlan,
    parent: Option<&Manifest>,
    progress: &dyn Progress,
) -> Result<DiskOutcome> {
    let cs = repo.config.chunk_size as u64;
    let size = reader.size();
    let chunks = size.div_ceil(cs);
    validate_plan(plan, chunks)?;
    let planned: u64 = plan
        .runs
        .iter()
        .map(|&(f, n)| (n * cs).min(size - f * cs))
        .sum();
    progress.phase(&format!("disk {name}"), planned);
    let threads = repo.tuning.threads.max(1);
    let batch_chunks = (BATCH_BYTES / cs).max(1);

    let (batch_tx, batch_rx) = bounded::<Batch>(threads * 2);
    let (res_tx, res_rx) = bounded::<BatchResult>(threads * 4);

    let (reader_r, worker_rs, collect_r) = std::thread::scope(|s| {
        let readers = reader.parallel_reads().clamp(1, 8) as u64;
        let reader_hs: Vec<_> = (0..readers)
            .map(|r| {
                let tx = batch_tx.clone();
                let part = (r, readers);
                s.spawn(move || read_batches(reader, plan, cs, size, batch_chunks, part, tx))
            })
            .collect();
        drop(batch_tx);
        let mut workers = Vec::new();
        for _ in 0..threads {
            let rx = batch_rx.clone();
            let tx = res_tx.clone();
            let ptx = packer.sender();
            let dedup = dedup.clone();
            workers.push(s.spawn(move || work(repo, &dedup, cs, rx, tx, ptx)));
        }
        drop(batch_rx);
        drop(res_tx);
        let collected = collect(
            repo, dedup, packer, plan, chunks, cs, size, res_rx, progress,
        );
        // Every reader counts all batches (skipping the others'); keep the first error.
        let mut reader_r = Ok(0);
        for h in reader_hs {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("reader panicked".into())));
            if reader_r.is_ok() {
                reader_r = r;
            }
        }
        let worker_rs: Vec<Result<()>> = workers
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Internal("worker panicked".into())))
            })
            .collect();
        (reader_r, worker_rs, collected)
    });
    progress.finish_phase();
    // The root cause first: the source, then the workers (packer failures), then the collector.
    let batches = reader_r?;
    for r in worker_rs {
        r?;
    }
    let c = collect_r?;
    if c.batches != batches {
        return Err(Error::Internal(format!(
            "{} of {batches} batches processed",
            c.batches
        )));
    }

    // Change map against the parent's disk of the same name and size.
    let parent_disk = parent.and_then(|p| p.disk(name)).filter(|d| d.size == size);
    let nodes = c.nodes;
    let corrupt = |e| Error::corrupt(format!("index of disk {name}"), e);
    // Chunks whose id differs from the parent's (none to compare against without a parent).
    let changed: Vec<u64> = match parent_disk {
        Some(pd) => tree::changed_chunks(&nodes, &pd.root, &c.root, chunks).map_err(corrupt)?,
        None => Vec::new(),
    };
    let chunk_len = |i: u64| (size - i * cs).min(cs);
    let data_bytes = match (plan.base, parent_disk) {
        (None, _) => c.nonzero_bytes,
        (Some(_), Some(pd)) => {
            // Only chunks that changed can change the data total.
            let mut total = pd.data_bytes as i128;
            for &i in &changed {
                let old = tree::chunk_id(&nodes, &pd.root, chunks, i).map_err(corrupt)?;
                let new = tree::chunk_id(&nodes, &c.root, chunks, i).map_err(corrupt)?;
                total += (!new.is_zero() as i128 - !old.is_zero() as i128) * chunk_len(i) as i128;
            }
            total.max(0) as u64
        }
        (Some(_), None) => {
            let mut total = 0;
            tree::for_each_chunk(&nodes, &c.root, chunks, &mut |i, _| {
                total += chunk_len(i);
                Ok(())
            })
            .map_err(corrupt)?;
            total
        }
    };
    let (changes, changed_bytes) = match parent_disk {
        Some(_) => (
            Some(ChangeMap::from_sorted(changed.iter().copied())),
            changed.iter().map(|&i| chunk_len(i)).sum(),
        ),
        None => (None, data_bytes),
    };
    Ok(DiskOutcome {
        entry: DiskEntry {
            name: name.to_string(),
            size,
            root: c.root,
            changes,
            data_bytes,
            cbt: plan.cbt,
            cbt_reason: plan.cbt_reason.clone(),
            checkpoint: plan.checkpoint.clone(),
            source_identity: plan.source_identity.clone(),
        },
        read_bytes: c.read,
        changed_bytes,
        new_bytes: c.new_bytes,
        chunks_new: c.chunks_new,
        chunks_reused: c.chunks_reused,
    })
}

/// Reads the planned runs in batches of whole chunks. Returns the number of batches sent.
/// Reader `part.0` of `part.1` reads the batches whose sequence number is its own modulo the
/// reader count; the collector puts batches back in order.
fn read_batches(
    reader: &dyn DiskReader,
    plan: &ReadPlan,
    cs: u64,
    size: u64,
    batch_chunks: u64,
    part: (u64, u64),
    tx: Sender<Batch>,
) -> Result<u64> {
    let mut seq = 0;
    for &(first, count) in &plan.runs {
        let mut i = first;
        while i < first + count {
            let n = batch_chunks.min(first + count - i);
            if seq % part.1 != part.0 {
                seq += 1;
                i += n;
                continue;
            }
            let off = i * cs;
            let len = (n * cs).min(size - off);
            let data = reader
                .read_vec(off, len as usize)
                .map_err(|e| Error::SourceRead {
                    path: reader.describe().into(),
                    cause: e,
                })?;
            if tx
                .send(Batch {
                    seq,
                    first: i,
                    data,
                })
                .is_err()
            {
                return Ok(u64::MAX); // the consumers stopped; their error is reported
            }
            seq += 1;
            i += n;
        }
    }
    Ok(seq)
}

fn work(
    repo: &Repository,
    dedup: &Dedup,
    cs: u64,
    rx: Receiver<Batch>,
    tx: Sender<BatchResult>,
    ptx: Sender<EncodedBlob>,
) -> Result<()> {
    let keys = &repo.keys;
    for b in rx {
        let mut r = BatchResult {
            seq: b.seq,
            read: b.data.len() as u64,
            ..Default::default()
        };
        for (k, data) in b.data.chunks(cs as usize).enumerate() {
            let index = b.first + k as u64;
            if data == &ZEROS[..data.len()] {
                r.entries.push((index, BlobId::ZERO));
                continue;
            }
            let id = keys.blob_id(BlobKind::Data, data);
            if dedup.claim(&id) {
                let encoded = blob::encode(keys, BlobKind::Data, &id, data);
                r.new_bytes += data.len() as u64;
                r.chunks_new += 1;
                let msg = EncodedBlob {
                    kind: BlobKind::Data,
                    id,
                    raw_len: data.len() as u32,
                    data: encoded,
                };
                ptx.send(msg)
                    .map_err(|_| Error::Internal(PACKER_GONE.into()))?;
            } else {
                r.chunks_reused += 1;
            }
            r.entries.push((index, id));
        }
        if tx.send(r).is_err() {
            return Ok(()); // the collector stopped; it reports why
        }
    }
    Ok(())
}

struct Collected<'a> {
    root: BlobId,
    nodes: SessionNodes<'a>,
    batches: u64,
    read: u64,
    nonzero_bytes: u64,
    new_bytes: u64,
    chunks_new: u64,
    chunks_reused: u64,
}

#[allow(clippy::too_many_arguments)]
fn collect<'a>(
    repo: &'a Repository,
    dedup: &Arc<Dedup>,
    packer: &Packer,
    plan: &ReadPlan,
    chunks: u64,
    cs: u64,
    size: u64,
    rx: Receiver<BatchResult>,
    progress: &dyn Progress,
) -> Result<Collected<'a>> {
    let mut nodes = SessionNodes {
        repo,
        index: dedup.index.clone(),
        dedup: dedup.clone(),
        packer: packer.sender(),
        written: Default::default(),
        packer_gone: false,
        failure: Default::default(),
    };
    let mut out_stats = (0u64, 0u64, 0u64, 0u64, 0u64); // batches, read, nonzero, new, (new chunks)
    let mut reused = 0u64;
    let mut pending: BTreeMap<u64, BatchResult> = BTreeMap::new();
    let root: vmkeep_core::Result<BlobId> = (|| {
        let mut builder = TreeBuilder::new(&mut nodes, plan.base, chunks);
        let mut next = 0u64;
        for r in rx {
            pending.insert(r.seq, r);
            while let Some(r) = pending.remove(&next) {
                for (i, id) in r.entries {
                    if !id.is_zero() {
                        out_stats.2 += (size - i * cs).min(cs);
                    }
                    builder.set(i, id)?;
                }
                out_stats.0 += 1;
                out_stats.1 += r.read;
                out_stats.3 += r.new_bytes;
                out_stats.4 += r.chunks_new;
                reused += r.chunks_reused;
                progress.advance(r.read);
                next += 1;
            }
        }
        builder.finish()
    })();
    let root = root.map_err(|e| tree_error(e, nodes.failure.borrow_mut().take()))?;
    if nodes.packer_gone {
        return Err(Error::Internal(PACKER_GONE.into()));
    }
    Ok(Collected {
        root,
        nodes,
        batches: out_stats.0,
        read: out_stats.1,
        nonzero_bytes: out_stats.2,
        new_bytes: out_stats.3,
        chunks_new: out_stats.4,
        chunks_reused: reused,
    })
}

/// A tree operation's error: the packer's failure, the real error of a node that could not be
/// loaded (`failure`, kept by the node store), or the core error itself.
fn tree_error(e: vmkeep_core::Error, failure: Option<Error>) -> Error {
    if let Some(f) = failure {
        return f;
    }
    match e {
        vmkeep_core::Error::Invalid {
            what: "repository write",
            ..
        } => Error::Internal(PACKER_GONE.into()),
        other => Error::Core(other),
    }
}
