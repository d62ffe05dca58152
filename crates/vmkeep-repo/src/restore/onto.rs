//! Restore onto an existing image, writing only the chunks that differ: rewind and roll
//! forward in one (mechanisms 12-13).
//!
//! Two ways to know what differs:
//! - **known**: the image is known to hold restore point X unmodified (the caller proves it);
//!   then the chunks are those of `diff(X, SNAP)` ([`tree::differing_chunks`]) and the image is
//!   not read at all;
//! - **compare**: every chunk of the image is read, its id computed as the repository would,
//!   and compared with SNAP's; only differing chunks are written.
//!
//! The image must already have SNAP's disk size (the caller truncates or grows it). A chunk that
//! is zeros in SNAP is zeroed with [`ImageAccess::zero_at`] (a hole where the format allows).
//! Crash story: a kill leaves the image part old, part new (each written chunk whole); running
//! the same command again (compare, since the caller's proof is gone) finishes it.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crossbeam_channel::bounded;
use vmkeep_core::keys::BlobKind;
use vmkeep_core::manifest::{DiskEntry, Manifest};
use vmkeep_core::tree::{self, ChunkCursor, TreeRef};
use vmkeep_core::BlobId;

use crate::error::{Error, Result};
use crate::index::BlobIndex;
use crate::nodes::RepoNodes;
use crate::progress::Progress;
use crate::Repository;

pub use vmkeep_io::ImageAccess;

/// What [`Repository::restore_onto`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OntoStats {
    /// Bytes read from the image (0 when its content was known).
    pub bytes_read: u64,
    /// Bytes written to it (zeroed ranges included).
    pub bytes_written: u64,
    pub chunks_written: u64,
    pub seconds: f64,
}

/// Chunk indexes handed to the workers at a time.
const BATCH: usize = 16;

impl Repository {
    /// Makes `image` hold disk `disk` of restore point `to`, writing only differing chunks;
    /// `known` is a restore point the image is proven to hold unmodified (same disk name).
    pub fn restore_onto(
        &self,
        index: &BlobIndex,
        to: &Manifest,
        disk: &DiskEntry,
        image: &dyn ImageAccess,
        known: Option<&Manifest>,
        progress: &dyn Progress,
    ) -> Result<OntoStats> {
        let started = Instant::now();
        if image.size() != disk.size {
            return Err(Error::Invalid {
                what: "restore target",
                reason: format!(
                    "{} is {} bytes, disk {} of the restore point {}",
                    image.describe(),
                    image.size(),
                    disk.name,
                    disk.size
                ),
            });
        }
        let c = to.chunk_size as u64;
        let chunks = to.chunks_of(disk.size);
        let to_tree = TreeRef {
            root: disk.root,
            chunks,
        };
        let base = match known {
            Some(k) => Some(k.disk(&disk.name).ok_or_else(|| Error::Invalid {
                what: "known restore point",
                reason: format!("{:#} has no disk {}", k.id, disk.name),
            })?),
            None => None,
        };
        if let (Some(k), Some(_)) = (known, base) {
            if k.chunk_size != to.chunk_size {
                return Err(Error::Invalid {
                    what: "known restore point",
                    reason: "another chunk size".into(),
                });
            }
        }
        // Holes of a sparse image read as zeros: known without reading them.
        let data = if base.is_none() {
            image.data_extents().map_err(|e| Error::SourceRead {
                path: image.describe().into(),
                cause: e,
            })?
        } else {
            None
        };
        let read = AtomicU64::new(0);
        let written = AtomicU64::new(0);
        let chunks_written = AtomicU64::new(0);
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let fail = |e: Error| {
            failure.lock().expect("not poisoned").get_or_insert(e);
        };
        let compare = base.is_none();
        progress.phase(
            &format!(
                "{} {}",
                if compare {
                    "compare and write"
                } else {
                    "write"
                },
                disk.name
            ),
            if compare { disk.size } else { 0 },
        );
        let threads = self.reader_threads();
        let (tx, rx) = bounded::<Vec<(u64, BlobId, bool)>>(threads * 2);
        std::thread::scope(|s| {
            for _ in 0..threads {
                let rx = rx.clone();
                let (read, written, chunks_written, fail) =
                    (&read, &written, &chunks_written, &fail);
                let failure = &failure;
                s.spawn(move || {
                    let mut buf = vec![0u8; c as usize];
                    for batch in rx {
                        if failure.lock().expect("not poisoned").is_some() {
                            continue; // drain
                        }
                        for (i, want, hole) in batch {
                            let off = i * c;
                            let len = ((i + 1) * c).min(disk.size) - off;
                            let r = self.onto_chunk(
                                index,
                                image,
                                &mut buf[..len as usize],
                                off,
                                want,
                                compare && !hole,
                            );
                            match r {
                                Ok((r, w)) => {
                                    read.fetch_add(r, Ordering::Relaxed);
                                    if w > 0 {
                                        written.fetch_add(w, Ordering::Relaxed);
                                        if chunks_written.fetch_add(1, Ordering::Relaxed) == 0 {
                                            vmkeep_io::kill_point("onto-after-first-write");
                                        }
                                    }
                                    progress.advance(if compare { r } else { w });
                                }
                                Err(e) => {
                                    fail(e);
                                    break;
                                }
                            }
                        }
                    }
                });
            }
            drop(rx);
            let nodes = RepoNodes::new(self, index);
            let mut batch = Vec::with_capacity(BATCH);
            let mut send = |i: u64, id: BlobId, hole: bool| -> vmkeep_core::Result<()> {
                batch.push((i, id, hole));
                if batch.len() == BATCH && tx.send(std::mem::take(&mut batch)).is_err() {
                    return Err(vmkeep_core::Error::Invalid {
                        what: "restore",
                        reason: "workers stopped".into(),
                    });
                }
                Ok(())
            };
            let walked = match base {
                Some(b) => tree::differing_chunks(
                    &nodes,
                    TreeRef {
                        root: b.root,
                        chunks: to.chunks_of(b.size),
                    },
                    to_tree,
                    &mut |i, id| send(i, id, false),
                ),
                None => (|| {
                    let mut cursor = ChunkCursor::new(disk.root, chunks);
                    let mut holes = Holes::new(data.as_deref());
                    for i in 0..chunks {
                        let id = cursor.get(&nodes, i)?;
                        let hole = holes.covers(i * c, ((i + 1) * c).min(disk.size));
                        // A hole where the restore point has zeros: nothing to read or write.
                        if !(hole && id.is_zero()) {
                            send(i, id, hole)?;
                        }
                    }
                    Ok(())
                })(),
            };
            if let Err(e) = nodes.typed(walked, || {
                format!("disk {} of restore point {:#}", disk.name, to.id)
            }) {
                fail(e);
            }
            if !batch.is_empty() {
                let _ = tx.send(batch);
            }
            drop(tx);
        });
        progress.finish_phase();
        if let Some(e) = failure.into_inner().expect("not poisoned") {
            return Err(e);
        }
        image.flush().map_err(|e| Error::TargetWrite {
            path: image.describe().into(),
            cause: e,
        })?;
        Ok(OntoStats {
            bytes_read: read.into_inner(),
            bytes_written: written.into_inner(),
            chunks_written: chunks_written.into_inner(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// One chunk: compare (when asked) and write it if it differs. Returns (read, written).
    fn onto_chunk(
        &self,
        index: &BlobIndex,
        image: &dyn ImageAccess,
        buf: &mut [u8],
        off: u64,
        want: BlobId,
        compare: bool,
    ) -> Result<(u64, u64)> {
        let len = buf.len() as u64;
        let target_err = |e: io::Error| Error::TargetWrite {
            path: image.describe().into(),
            cause: e,
        };
        let mut read = 0;
        if compare {
            image.read_at(buf, off).map_err(|e| Error::SourceRead {
                path: image.describe().into(),
                cause: e,
            })?;
            read = len;
            let have = if buf.iter().all(|&b| b == 0) {
                BlobId::ZERO
            } else {
                self.keys().blob_id(BlobKind::Data, buf)
            };
            if have == want {
                return Ok((read, 0));
            }
        }
        if want.is_zero() {
            image.zero_at(off, len).map_err(target_err)?;
        } else {
            let data = self.read_blob(index, &want)?;
            super::check_chunk_len(&want, data.len(), len)?;
            image.write_at(&data, off).map_err(target_err)?;
        }
        Ok((read, len))
    }
}

/// Whether byte ranges lie wholly in holes, asked in ascending order.
struct Holes<'a> {
    data: Option<&'a [(u64, u64)]>,
    next: usize,
}

impl<'a> Holes<'a> {
    fn new(data: Option<&'a [(u64, u64)]>) -> Holes<'a> {
        Holes { data, next: 0 }
    }

    /// True when `start..end` meets no data extent (false when the extents are unknown).
    fn covers(&mut self, start: u64, end: u64) -> bool {
        let Some(data) = self.data else {
            return false;
        };
        while self.next < data.len() && data[self.next].0 + data[self.next].1 <= start {
            self.next += 1;
        }
        data.get(self.next).is_none_or(|&(off, _)| off >= end)
    }
}

#[cfg(test)]
mod tests {
    use super::Holes;

    #[test]
    fn holes_between_extents() {
        let data = [(100, 50), (400, 10)];
        let mut h = Holes::new(Some(&data));
        assert!(h.covers(0, 100));
        assert!(!h.covers(100, 200));
        assert!(h.covers(200, 300));
        assert!(!h.covers(300, 401));
        assert!(h.covers(410, 1000));
        assert!(!Holes::new(None).covers(0, 10));
    }
}
