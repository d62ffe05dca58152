//! The ordered write stage of a restore, for targets that lay data out in the order writes
//! arrive ([`DiskWriter::wants_ascending_writes`]).
//!
//! qcow2 appends a host cluster for every guest cluster first written, so chunks written as
//! the parallel workers finish them (a window's blobs are read in pack order, several jobs at
//! once) left a restored image 80-90% fragmented by `qemu-img check`. Here the workers still
//! read, decrypt, decompress and verify in parallel, but hand each chunk to one writer thread,
//! which writes the disk's non-zero chunks in ascending index order:
//!
//! ```text
//! planner ──window k's chunk indices (1 slot)──► writer ◄──(index, bytes)── N workers
//!    └──────────────read jobs of window k──────────────────────────────────────┘
//! ```
//!
//! - **Order.** The tree walk yields a window's chunks in ascending order; the planner sends
//!   their indices to the writer before the window's read jobs, so the writer always knows
//!   which chunk comes next. Chunks that arrive early wait in a reorder buffer.
//! - **Memory.** The window channel has one slot: the planner can hand over window k + 2 only
//!   once the writer took window k + 1, that is finished window k. So at most two windows are
//!   read and not yet written, and the reorder buffer holds at most two windows' chunks
//!   (the windows are capped for ordered targets: [`super::fetch::ReadShape::ordered`]).
//! - **Fewer round trips.** Neighbouring chunks already received are joined into one write of
//!   up to [`MAX_RUN`] bytes; before waiting for a chunk, the writer writes what it holds.
//! - **Zeros.** Zero chunks are not in the walk, so they are never written (unallocated).
//! - **Failure.** A worker that stops on an error (or panics) tells the writer through
//!   [`ChunkSender`]'s drop, so the writer stops waiting for chunks that will never come; the
//!   writer's end closing makes the planner and the other workers stop. Whoever failed reports
//!   the error; the others stop quietly.
//!
//! Why one ordered writer rather than long contiguous ranges per worker: two workers appending
//! at once still interleave their clusters (every write is a fragment boundary unless each
//! range is written alone), and after an incremental a range's chunks lie in several packs, so
//! ranges would cost reads. Here the reads stay grouped by pack, the writes are ordered, and
//! the cost is one thread that mostly waits: a 1.5 GiB restore to qcow2 went from 80-86%
//! fragmented to 0.00%, and from 3.89 s to 3.70 s (medians, docs/ARCHITECTURE.md "Restore").
use std::collections::HashMap;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::DiskWriter;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// The longest write the writer makes of neighbouring chunks.
const MAX_RUN: usize = 4 << 20;

/// What workers send the writer.
pub(super) enum Delivery {
    /// Chunk `index`'s verified bytes.
    Chunk(u64, Vec<u8>),
    /// A worker stopped before its jobs were done: some chunk will never come.
    Failed,
}

/// A worker's end of the stage. Dropped without [`done`](Self::done) (an error, a panic), it
/// tells the writer that the worker failed.
pub(super) struct ChunkSender {
    tx: Sender<Delivery>,
    done: bool,
}

impl ChunkSender {
    pub fn new(tx: Sender<Delivery>) -> ChunkSender {
        ChunkSender { tx, done: false }
    }

    /// Hands chunk `index` to the writer; false when the writer has stopped.
    pub fn send(&self, index: u64, data: Vec<u8>) -> bool {
        self.tx.send(Delivery::Chunk(index, data)).is_ok()
    }

    /// The worker ran out of jobs, or stopped because the writer did.
    pub fn done(mut self) {
        self.done = true;
    }
}

impl Drop for ChunkSender {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.tx.send(Delivery::Failed);
        }
    }
}

/// Neighbouring chunks held for one write.
struct Run {
    start: u64,
    len: u64,
    pieces: Vec<Vec<u8>>,
    joined: Vec<u8>,
}

impl Run {
    /// Adds the chunk at `offset`, first writing what is held if the chunk does not continue
    /// it or would make the run too long. Returns the bytes written.
    fn push(&mut self, offset: u64, data: Vec<u8>, writer: &dyn DiskWriter) -> Result<u64> {
        let mut written = 0;
        if self.start + self.len != offset || self.len as usize + data.len() > MAX_RUN {
            written = self.write(writer)?;
        }
        if self.pieces.is_empty() {
            self.start = offset;
        }
        self.len += data.len() as u64;
        self.pieces.push(data);
        Ok(written)
    }

    /// Writes what is held, with one call. Returns the bytes written.
    fn write(&mut self, writer: &dyn DiskWriter) -> Result<u64> {
        let r = match self.pieces.as_slice() {
            [] => return Ok(0),
            [one] => writer.write_at(one, self.start),
            many => {
                self.joined.clear();
                for p in many {
                    self.joined.extend_from_slice(p);
                }
                writer.write_at(&self.joined, self.start)
            }
        };
        r.map_err(|e| Error::TargetWrite {
            path: writer.target().to_path_buf(),
            cause: e,
        })?;
        let n = self.len;
        self.pieces.clear();
        self.len = 0;
        Ok(n)
    }
}

/// Writes the chunks of every window `windows` names, in that order, as `chunks` delivers
/// them; chunk `i` goes to offset `i * chunk_size`. Returns the bytes written, or None when a
/// worker failed (it reports the error) so that some chunk never came.
pub(super) fn write_in_order(
    writer: &dyn DiskWriter,
    chunk_size: u64,
    windows: Receiver<Vec<u64>>,
    chunks: Receiver<Delivery>,
    progress: &dyn Progress,
) -> Result<Option<u64>> {
    let mut arrivals = Arrivals {
        chunks,
        early: HashMap::new(),
    };
    let mut run = Run {
        start: 0,
        len: 0,
        pieces: Vec::new(),
        joined: Vec::new(),
    };
    let mut written = 0;
    let mut wrote = |n: u64| {
        written += n;
        progress.advance(n);
    };
    for window in windows {
        for i in window {
            let data = match arrivals.get(i, false) {
                Arrival::Here(d) => d,
                Arrival::NotYet => {
                    // Nothing more to join before the wait: write what is held.
                    wrote(run.write(writer)?);
                    match arrivals.get(i, true) {
                        Arrival::Here(d) => d,
                        Arrival::NotYet | Arrival::Never => return Ok(None),
                    }
                }
                Arrival::Never => return Ok(None),
            };
            wrote(run.push(i * chunk_size, data, writer)?);
        }
    }
    wrote(run.write(writer)?);
    Ok(Some(written))
}

/// The chunks delivered, and the reorder buffer of those that came before their turn.
struct Arrivals {
    chunks: Receiver<Delivery>,
    early: HashMap<u64, Vec<u8>>,
}

enum Arrival {
    Here(Vec<u8>),
    /// Not delivered yet (only when not waiting).
    NotYet,
    /// A worker failed, or every worker is gone.
    Never,
}

impl Arrivals {
    /// Chunk `i`, once delivered (waiting for it when `wait`); whatever else is delivered
    /// meanwhile goes to the reorder buffer.
    fn get(&mut self, i: u64, wait: bool) -> Arrival {
        if let Some(d) = self.early.remove(&i) {
            return Arrival::Here(d);
        }
        loop {
            let delivered = if wait {
                self.chunks.recv().ok()
            } else {
                match self.chunks.try_recv() {
                    Ok(d) => Some(d),
                    Err(TryRecvError::Empty) => return Arrival::NotYet,
                    Err(TryRecvError::Disconnected) => None,
                }
            };
            match delivered {
                Some(Delivery::Chunk(j, d)) if j == i => return Arrival::Here(d),
                Some(Delivery::Chunk(j, d)) => {
                    self.early.insert(j, d);
                }
                Some(Delivery::Failed) | None => return Arrival::Never,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Mutex;

    use crossbeam_channel::{bounded, unbounded};

    use super::*;
    use crate::progress::NoProgress;

    const CS: u64 = 64 << 10;

    /// Records every write (offset, length, first byte); fails the write at `fail_at`.
    #[derive(Default)]
    struct Recorder {
        writes: Mutex<Vec<(u64, usize, Vec<u8>)>>,
        fail_at: Option<u64>,
    }

    impl DiskWriter for Recorder {
        fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
            if self.fail_at == Some(offset) {
                return Err(std::io::Error::other("disk full"));
            }
            self.writes
                .lock()
                .unwrap()
                .push((offset, data.len(), data.to_vec()));
            Ok(())
        }
        fn finish(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn target(&self) -> &Path {
            Path::new("recorder")
        }
        fn wants_ascending_writes(&self) -> bool {
            true
        }
    }

    fn chunk(i: u64) -> Vec<u8> {
        vec![i as u8 + 1; CS as usize]
    }

    /// Runs the writer over `windows`, the chunks delivered by `deliver` on another thread.
    fn run(
        rec: &Recorder,
        windows: &[Vec<u64>],
        deliver: impl FnOnce(ChunkSender) + Send,
    ) -> Result<Option<u64>> {
        let (wtx, wrx) = bounded(windows.len());
        for w in windows {
            wtx.send(w.clone()).unwrap();
        }
        drop(wtx);
        let (ctx, crx) = unbounded();
        std::thread::scope(|s| {
            let sink = ChunkSender::new(ctx);
            s.spawn(move || deliver(sink));
            write_in_order(rec, CS, wrx, crx, &NoProgress)
        })
    }

    #[test]
    fn chunks_delivered_out_of_order_are_written_ascending_and_joined() {
        let rec = Recorder::default();
        // Chunks 0-3, a zero chunk at 4 (never named), 5-7, and 70 after a gap; delivered
        // in pack order, which is not disk order.
        let windows = vec![vec![0, 1, 2, 3], vec![5, 6, 7, 70]];
        let n = run(&rec, &windows, |sink| {
            for i in [70, 2, 6, 0, 3, 1, 7, 5] {
                assert!(sink.send(i, chunk(i)));
            }
            sink.done();
        })
        .unwrap();
        assert_eq!(n, Some(8 * CS));
        let writes = rec.writes.into_inner().unwrap();
        let offsets: Vec<u64> = writes.iter().map(|w| w.0).collect();
        assert!(offsets.windows(2).all(|p| p[0] < p[1]), "{offsets:?}");
        // Every chunk where it belongs, and nothing at the zero chunk.
        let mut covered = Vec::new();
        for (offset, len, data) in &writes {
            assert_eq!(*len, data.len());
            for (k, piece) in data.chunks(CS as usize).enumerate() {
                let i = offset / CS + k as u64;
                assert_eq!(piece, chunk(i).as_slice(), "chunk {i}");
                covered.push(i);
            }
        }
        assert_eq!(covered, [0, 1, 2, 3, 5, 6, 7, 70]);
        // Runs are joined only when the next chunk is already there, so how many writes
        // depends on timing; never more than one per chunk, never across the gaps.
        assert!(writes.len() <= 8 && writes.len() >= 3, "{writes:?}");
    }

    #[test]
    fn runs_are_joined_up_to_the_limit() {
        let rec = Recorder::default();
        let count = 2 * MAX_RUN as u64 / CS + 1;
        // Everything delivered before the writer starts: joined as far as allowed.
        let (wtx, wrx) = bounded(1);
        wtx.send((0..count).collect()).unwrap();
        drop(wtx);
        let (ctx, crx) = unbounded();
        let sink = ChunkSender::new(ctx);
        for i in (0..count).rev() {
            sink.send(i, chunk(i));
        }
        sink.done();
        let n = write_in_order(&rec, CS, wrx, crx, &NoProgress).unwrap();
        assert_eq!(n, Some(count * CS));
        let lens: Vec<usize> = rec
            .writes
            .into_inner()
            .unwrap()
            .iter()
            .map(|w| w.1)
            .collect();
        assert_eq!(lens, [MAX_RUN, MAX_RUN, CS as usize]);
    }

    #[test]
    fn a_failed_worker_stops_the_writer() {
        let rec = Recorder::default();
        let windows = vec![vec![0, 1, 2]];
        // Chunk 1 never comes: the worker fails (its sender dropped without `done`).
        let n = run(&rec, &windows, |sink| {
            sink.send(0, chunk(0));
            sink.send(2, chunk(2));
            drop(sink);
        })
        .unwrap();
        assert_eq!(n, None);
        let writes = rec.writes.into_inner().unwrap();
        assert!(writes.iter().all(|w| w.0 == 0), "{writes:?}");
    }

    #[test]
    fn a_write_error_is_returned() {
        let rec = Recorder {
            fail_at: Some(5 * CS),
            ..Recorder::default()
        };
        let windows = vec![vec![0], vec![5, 6]];
        let r = run(&rec, &windows, |sink| {
            for i in [0, 5, 6] {
                sink.send(i, chunk(i));
            }
            sink.done();
        });
        match r {
            Err(Error::TargetWrite { path, cause }) => {
                assert_eq!(path, Path::new("recorder"));
                assert_eq!(cause.to_string(), "disk full");
            }
            other => panic!("{other:?}"),
        }
    }
}
