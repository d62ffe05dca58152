//! Restore: write a restore point's disks. A tree walker lists the non-zero chunks in order, N
//! workers read, verify and write them with positional writes through a [`DiskWriter`] (or,
//! for a target that wants ascending writes such as qcow2, hand them to one writer thread that
//! writes them in disk order: `ordered.rs`); zero chunks are never read or written, so the
//! target must read as zeros where nothing is written.
//!
//! [`Repository::restore`] writes sparse raw files ([`raw::RawFileWriter`]), each under a
//! `.partial` name, fsynced, renamed when complete and its folder fsynced ([`publish`]), so
//! neither a killed restore nor a power loss leaves a file that looks finished. [`Repository::restore_disk_to`] writes one disk into any other target (e.g. a
//! qcow2 image behind an NBD server, in vmkeep-qemu).
use std::path::PathBuf;

use crossbeam_channel::{bounded, unbounded};
use serde::Serialize;
use vmkeep_core::manifest::{DiskEntry, Manifest};
use vmkeep_core::tree;
use vmkeep_core::BlobId;

use crate::error::{Error, Result};
use crate::index::BlobIndex;
use crate::nodes::RepoNodes;
use crate::progress::Progress;
use crate::Repository;

mod fetch;
pub mod onto;
mod ordered;
mod publish;
pub mod raw;
pub(crate) mod stream;

pub use publish::{create_target_dir, publish};
pub use raw::{RawFileImage, RawFileWriter};

pub use vmkeep_io::target::DiskWriter;

#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    pub target: PathBuf,
    /// Only this disk (all when None).
    pub disk: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestoredDisk {
    pub name: String,
    pub path: PathBuf,
    pub bytes_written: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestoreStats {
    pub disks: Vec<RestoredDisk>,
    pub seconds: f64,
}

/// The disks of `m` a restore covers: all, or the one named (else [`Error::NoSuchDisk`]).
pub fn select_disks<'m>(m: &'m Manifest, disk: Option<&str>) -> Result<Vec<&'m DiskEntry>> {
    match disk {
        None => Ok(m.disks.iter().collect()),
        Some(name) => m
            .disk(name)
            .map(|d| vec![d])
            .ok_or_else(|| Error::NoSuchDisk {
                snapshot: format!("{:#}", m.id),
                disk: name.into(),
                available: m
                    .disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
    }
}

/// A chunk's plaintext must have exactly the length its position on the disk needs (FORMAT.md
/// §10 "The last chunk"): anything else is damage, never written or served.
pub(crate) fn check_chunk_len(id: &BlobId, got: usize, expect: u64) -> Result<()> {
    if got as u64 == expect {
        return Ok(());
    }
    Err(Error::corrupt(
        format!("chunk {id}"),
        vmkeep_core::Error::Corrupt {
            kind: "chunk",
            reason: format!("{got} bytes where the disk needs {expect}"),
        },
    ))
}

impl Repository {
    pub fn restore(
        &self,
        m: &Manifest,
        opts: &RestoreOptions,
        progress: &dyn Progress,
    ) -> Result<RestoreStats> {
        let started = std::time::Instant::now();
        let disks = select_disks(m, opts.disk.as_deref())?;
        create_target_dir(&opts.target).map_err(|e| Error::TargetWrite {
            path: opts.target.clone(),
            cause: e,
        })?;
        for d in &disks {
            let path = opts.target.join(format!("{}.raw", d.name));
            if path.exists() {
                return Err(Error::TargetExists { path });
            }
        }
        let index = BlobIndex::load(self)?;
        let mut out = Vec::new();
        for d in disks {
            let path = opts.target.join(format!("{}.raw", d.name));
            let partial = opts.target.join(format!("{}.raw.partial", d.name));
            let file = RawFileWriter::create(&partial, d.size)?;
            let written = self.restore_disk_to(&index, d, &file, progress);
            drop(file);
            let written = match written {
                Ok(w) => w,
                Err(e) => {
                    let _ = std::fs::remove_file(&partial);
                    return Err(e);
                }
            };
            publish(&partial, &path).map_err(|e| Error::TargetWrite {
                path: path.clone(),
                cause: e,
            })?;
            out.push(RestoredDisk {
                name: d.name.clone(),
                path,
                bytes_written: written,
            });
        }
        Ok(RestoreStats {
            disks: out,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Writes disk `d` into `writer` (every non-zero chunk at its offset, then
    /// [`DiskWriter::finish`]), reading blobs through `index` (load it once for all disks with
    /// [`BlobIndex::load`]). Returns the bytes written. The caller creates the target (at least
    /// the disk's size, reading as zeros) and makes it final afterwards.
    pub fn restore_disk_to(
        &self,
        index: &BlobIndex,
        d: &DiskEntry,
        writer: &dyn DiskWriter,
        progress: &dyn Progress,
    ) -> Result<u64> {
        progress.phase(&format!("restore {}", d.name), d.data_bytes);
        let written = self.write_disk(index, d, writer, progress).and_then(|n| {
            writer.finish().map_err(|e| Error::TargetWrite {
                path: writer.target().to_path_buf(),
                cause: e,
            })?;
            Ok(n)
        });
        progress.finish_phase();
        written
    }

    /// Write every non-zero chunk of `d` into `writer` at its offset. Returns bytes written.
    /// The tree walk gathers windows of chunks, each planned into read jobs ([`fetch`]: blobs
    /// of a pack close together read with one request), which the workers read and write; for
    /// a target that wants ascending writes, the workers hand the chunks to one writer thread
    /// that writes them in disk order ([`ordered`]).
    pub(crate) fn write_disk(
        &self,
        index: &BlobIndex,
        d: &DiskEntry,
        writer: &dyn DiskWriter,
        progress: &dyn Progress,
    ) -> Result<u64> {
        let cs = self.config.chunk_size as u64;
        let chunks = d.size.div_ceil(cs);
        let threads = self.reader_threads();
        let in_order = writer.wants_ascending_writes();
        let mut shape = fetch::ReadShape::for_store(self.store.concurrency());
        if in_order {
            shape = shape.ordered(cs, threads);
        }
        let (tx, rx) = bounded::<fetch::ReadJob<u64>>(threads * 4);
        // The ordered stage: window indices to the writer (one slot: at most two windows
        // between read and written), chunks from the workers (bounded by those windows).
        let (window_tx, window_rx) = bounded::<Vec<u64>>(1);
        let (chunk_tx, chunk_rx) = unbounded::<ordered::Delivery>();
        std::thread::scope(|s| {
            let ordered_writer = in_order.then(|| {
                s.spawn(move || ordered::write_in_order(writer, cs, window_rx, chunk_rx, progress))
            });
            let mut workers = Vec::new();
            for _ in 0..threads {
                let rx = rx.clone();
                let sink = in_order.then(|| ordered::ChunkSender::new(chunk_tx.clone()));
                workers.push(s.spawn(move || -> Result<u64> {
                    let mut written = 0;
                    let mut writer_stopped = false;
                    for job in rx {
                        let r = self.read_job(&job, |i, id, data| {
                            let expect = (d.size - i * cs).min(cs);
                            check_chunk_len(id, data.len(), expect)?;
                            if let Some(sink) = &sink {
                                if !sink.send(i, data) {
                                    writer_stopped = true;
                                    return Err(Error::Internal("restore writer stopped".into()));
                                }
                                return Ok(());
                            }
                            writer
                                .write_at(&data, i * cs)
                                .map_err(|e| Error::TargetWrite {
                                    path: writer.target().to_path_buf(),
                                    cause: e,
                                })?;
                            written += data.len() as u64;
                            progress.advance(data.len() as u64);
                            Ok(())
                        });
                        match r {
                            // The writer reports why it stopped (or the worker that made it).
                            Err(_) if writer_stopped => break,
                            r => r?,
                        }
                    }
                    if let Some(sink) = sink {
                        sink.done();
                    }
                    Ok(written)
                }));
            }
            drop(rx);
            drop(chunk_tx);
            let nodes = RepoNodes::new(self, index);
            let mut window = Vec::with_capacity(shape.window);
            let mut plan_error: Option<Error> = None;
            let mut send = |window: &mut Vec<(u64, BlobId)>| -> vmkeep_core::Result<()> {
                let stopped = || vmkeep_core::Error::Invalid {
                    what: "restore",
                    reason: "workers stopped".into(),
                };
                let jobs = match self.plan_reads(index, window, shape) {
                    Ok(j) => j,
                    Err(e) => {
                        plan_error.get_or_insert(e);
                        return Err(stopped());
                    }
                };
                if in_order {
                    let indices = window.iter().map(|(i, _)| *i).collect();
                    window_tx.send(indices).map_err(|_| stopped())?;
                }
                window.clear();
                for job in jobs {
                    tx.send(job).map_err(|_| stopped())?;
                }
                Ok(())
            };
            let mut walk = tree::for_each_chunk(&nodes, &d.root, chunks, &mut |i, id| {
                window.push((i, *id));
                if window.len() == shape.window {
                    send(&mut window)?;
                }
                Ok(())
            });
            if walk.is_ok() && !window.is_empty() {
                walk = send(&mut window);
            }
            drop(tx);
            drop(window_tx);
            let mut total = 0;
            let mut first_err = None;
            // A write error first: the workers stopped because of it.
            let mut stopped_early = false;
            if let Some(w) = ordered_writer {
                match w
                    .join()
                    .unwrap_or_else(|_| Err(Error::Internal("restore writer panicked".into())))
                {
                    Ok(Some(n)) => total = n,
                    Ok(None) => stopped_early = true,
                    Err(e) => first_err = Some(e),
                }
            }
            for w in workers {
                match w
                    .join()
                    .unwrap_or_else(|_| Err(Error::Internal("restore worker panicked".into())))
                {
                    Ok(n) => total += n,
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_err.or(plan_error) {
                return Err(e);
            }
            nodes.typed(walk, || format!("index of disk {}", d.name))?;
            if stopped_early {
                return Err(Error::Internal(
                    "restore writer stopped without an error".into(),
                ));
            }
            Ok(total)
        })
    }
}
