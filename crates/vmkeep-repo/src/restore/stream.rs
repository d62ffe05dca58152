//! Reading a stream back into any `Write` (a pipe QEMU's `migrate-incoming` reads, a file),
//! in order, with parallel reads and bounded read-ahead:
//!
//!   planner thread: stream index (and for memory streams the op stream and the page image
//!   trees) --fetches--> N workers (ranged get, decrypt, decompress, verify id and length)
//!   planner --segments (which bytes of which fetch, in stream order)--> caller's thread:
//!   waits for each fetch, writes its bytes, hashes the whole stream
//!
//! A fetch needs a permit, returned when the writer is done with it, so at most [`permits`]
//! blobs are held at any time, whatever the stream's size. Every blob is verified before a byte
//! of it is written; a memory stream is also checked against its recorded id at the end. On
//! any failure the error is returned (bytes already written stay written: the caller discards
//! the target, e.g. stops the QEMU that was reading).
use std::collections::HashMap;
use std::io::Write;

use crossbeam_channel::{bounded, Receiver, Sender};
use vmkeep_core::manifest::{Manifest, PageImages, StreamRecord};
use vmkeep_core::memory::{Op, OpsDecoder};
use vmkeep_core::stream::{decode_index_blob, StreamEntry};
use vmkeep_core::tree::ChunkCursor;
use vmkeep_core::BlobId;

use crate::error::{Error, Result};
use crate::index::BlobIndex;
use crate::nodes::RepoNodes;
use crate::progress::Progress;
use crate::Repository;

struct Fetch {
    seq: u64,
    id: BlobId,
    len: u32,
}

enum Segment {
    /// Bytes `start..start + len` of fetch `seq`.
    Bytes {
        seq: u64,
        start: u32,
        len: u32,
    },
    Zeros(u32),
    /// Fetch `seq` is not used again.
    Release(u64),
    /// The plan is complete.
    End,
}

/// Bytes gathered before a write to the target (a larger segment goes out in one write).
const OUT_BUFFER: usize = 1 << 20;

/// Blobs in flight (fetched or being fetched, not yet written).
fn permits(threads: usize) -> usize {
    threads * 4 + 4
}

fn damaged(what: String, reason: String) -> Error {
    Error::corrupt(
        what,
        vmkeep_core::Error::Corrupt {
            kind: "stream",
            reason,
        },
    )
}

impl Repository {
    /// Writes stream `name` of restore point `m` to `out`, in order, and returns its size.
    /// Every blob is verified (AEAD, length, id) before any of its bytes is written; a memory
    /// stream is regenerated from its literal bytes and page images and checked against the
    /// id of the original stream. A damaged or missing blob fails the read with an error.
    pub fn read_stream_to(
        &self,
        m: &Manifest,
        name: &str,
        out: &mut dyn Write,
        progress: &dyn Progress,
    ) -> Result<u64> {
        self.read_stream_with(&BlobIndex::load(self)?, m, name, out, progress)
    }

    /// [`read_stream_to`](Self::read_stream_to) through an index already loaded (a command
    /// that reads several streams loads it once).
    pub fn read_stream_with(
        &self,
        index: &BlobIndex,
        m: &Manifest,
        name: &str,
        out: &mut dyn Write,
        progress: &dyn Progress,
    ) -> Result<u64> {
        let record =
            m.streams
                .iter()
                .find(|s| s.name == name)
                .ok_or_else(|| Error::NoSuchStream {
                    snapshot: format!("{:#}", m.id),
                    stream: name.into(),
                    available: m
                        .streams
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
        progress.phase(&format!("stream {name}"), record.size);
        let r = self.write_stream(index, record, out, progress);
        progress.finish_phase();
        r
    }

    fn write_stream(
        &self,
        index: &BlobIndex,
        record: &StreamRecord,
        out: &mut dyn Write,
        progress: &dyn Progress,
    ) -> Result<u64> {
        let threads = self.reader_threads();
        let (fetch_tx, fetch_rx) = bounded::<Fetch>(permits(threads));
        let (data_tx, data_rx) = bounded::<(u64, Result<Vec<u8>>)>(permits(threads));
        let (seg_tx, seg_rx) = bounded::<Segment>(4096);
        let (permit_tx, permit_rx) = bounded::<()>(permits(threads));
        std::thread::scope(|s| {
            for _ in 0..threads {
                let (rx, tx) = (fetch_rx.clone(), data_tx.clone());
                s.spawn(move || {
                    for f in rx {
                        let data = self.read_blob(index, &f.id).and_then(|d| {
                            if d.len() == f.len as usize {
                                Ok(d)
                            } else {
                                Err(damaged(
                                    format!("chunk {}", f.id),
                                    format!("{} bytes where the stream needs {}", d.len(), f.len),
                                ))
                            }
                        });
                        if tx.send((f.seq, data)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop((fetch_rx, data_tx));
            let planner = s.spawn(move || {
                let mut plan = Planner {
                    repo: self,
                    index,
                    fetch: fetch_tx,
                    segments: seg_tx,
                    permits: permit_tx,
                    next_seq: 0,
                };
                let r = plan.run(record);
                if r.is_ok() {
                    let _ = plan.segments.send(Segment::End);
                }
                r
            });
            let written = write_segments(record, seg_rx, data_rx, permit_rx, out, self, progress);
            let planned = planner
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("stream planner panicked".into())));
            // The cause first: the writer's error when the planner only saw it go away, else
            // the planner's (the writer then only saw the plan stop).
            match (planned, written) {
                (Err(e), Err(w)) if is_writer_gone(&e) => Err(w),
                (Err(e), _) => Err(e),
                (Ok(()), w) => w,
            }
        })
    }
}

/// The caller's side: bytes in order to `out`.
fn write_segments(
    record: &StreamRecord,
    segments: Receiver<Segment>,
    data: Receiver<(u64, Result<Vec<u8>>)>,
    permits: Receiver<()>,
    out: &mut dyn Write,
    repo: &Repository,
    progress: &dyn Progress,
) -> Result<u64> {
    let target_err = |e: std::io::Error| Error::TargetWrite {
        path: format!("stream {}", record.name).into(),
        cause: e,
    };
    let mut held: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut hasher = record.pages.as_ref().map(|_| repo.keys().data_hasher());
    let mut written = 0u64;
    // Bytes go out (and into the hash) in large writes: a segment is often an 8-byte header.
    let mut pending: Vec<u8> = Vec::with_capacity(OUT_BUFFER);
    let mut emit = |pending: &mut Vec<u8>| -> Result<()> {
        if let Some(h) = &mut hasher {
            h.update(pending);
        }
        out.write_all(pending).map_err(target_err)?;
        progress.advance(pending.len() as u64);
        pending.clear();
        Ok(())
    };
    let zeros = [0u8; 4096];
    loop {
        let Ok(seg) = segments.recv() else {
            return Err(Error::Internal("the stream plan stopped".into()));
        };
        let bytes: &[u8] = match seg {
            Segment::End => break,
            Segment::Release(seq) => {
                held.remove(&seq);
                let _ = permits.recv();
                continue;
            }
            Segment::Zeros(n) => &zeros[..n as usize],
            Segment::Bytes { seq, start, len } => {
                while !held.contains_key(&seq) {
                    let Ok((s, d)) = data.recv() else {
                        return Err(Error::Internal("the stream readers stopped".into()));
                    };
                    held.insert(s, d?);
                }
                &held[&seq][start as usize..(start + len) as usize]
            }
        };
        written += bytes.len() as u64;
        if written > record.size {
            return Err(damaged(
                format!("stream {}", record.name),
                format!("longer than its {} bytes", record.size),
            ));
        }
        if pending.len() + bytes.len() > OUT_BUFFER {
            emit(&mut pending)?;
        }
        pending.extend_from_slice(bytes);
    }
    if written != record.size {
        return Err(damaged(
            format!("stream {}", record.name),
            format!("{written} bytes where it has {}", record.size),
        ));
    }
    emit(&mut pending)?;
    if let (Some(p), Some(h)) = (&record.pages, &hasher) {
        let id = h.finish();
        if id != p.stream_id {
            return Err(damaged(
                format!("stream {}", record.name),
                format!("regenerated as {id:#}, recorded as {:#}", p.stream_id),
            ));
        }
    }
    out.flush().map_err(target_err)?;
    Ok(written)
}

/// The planner's side: what to fetch, and which bytes of it go where.
struct Planner<'a> {
    repo: &'a Repository,
    index: &'a BlobIndex,
    fetch: Sender<Fetch>,
    segments: Sender<Segment>,
    permits: Sender<()>,
    next_seq: u64,
}

const WRITER_GONE: &str = "the stream writer stopped";

/// The writer went away: it reports why.
fn stopped() -> Error {
    Error::Internal(WRITER_GONE.into())
}

fn is_writer_gone(e: &Error) -> bool {
    matches!(e, Error::Internal(m) if m == WRITER_GONE)
}

impl Planner<'_> {
    fn run(&mut self, record: &StreamRecord) -> Result<()> {
        let mut literal = Literals::new(&record.index);
        match &record.pages {
            None => {
                while let Some(n) = literal.remaining_in_entry(self)? {
                    literal.copy(self, n)?;
                }
            }
            Some(p) => self.run_memory(record, p, &mut literal)?,
        }
        literal.release(self)
    }

    fn dispatch(&mut self, id: BlobId, len: u32) -> Result<u64> {
        self.permits.send(()).map_err(|_| stopped())?;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.fetch
            .send(Fetch { seq, id, len })
            .map_err(|_| stopped())?;
        Ok(seq)
    }

    fn segment(&self, s: Segment) -> Result<()> {
        self.segments.send(s).map_err(|_| stopped())
    }

    fn run_memory(
        &mut self,
        record: &StreamRecord,
        p: &PageImages,
        literal: &mut Literals,
    ) -> Result<()> {
        let what = || format!("memory stream {}", record.name);
        let nodes = RepoNodes::new(self.repo, self.index);
        let mut cursors: Vec<ChunkCursor> = p
            .images
            .iter()
            .map(|i| ChunkCursor::new(i.root, p.chunks_of(i.size)))
            .collect();
        // The image chunk being copied from: (image, chunk, fetch).
        let mut current: Option<(u32, u64, Option<u64>)> = None;
        let mut decoder = OpsDecoder::new();
        let mut literal_left = p.literal_size;
        let ps = p.page_size as u64;
        let cs = p.chunk_size as u64;
        for blob in &p.ops {
            let entries = decode_index_blob(&self.repo.read_blob(self.index, blob)?)
                .map_err(|e| Error::corrupt(format!("op stream index {blob}"), e))?;
            for e in entries {
                let bytes = self.repo.read_blob(self.index, &e.id)?;
                if bytes.len() != e.len as usize {
                    return Err(damaged(
                        what(),
                        format!("op chunk {} has a wrong length", e.id),
                    ));
                }
                decoder.push(&bytes);
                while let Some(op) = decoder.next_op().map_err(|e| Error::corrupt(what(), e))? {
                    match op {
                        Op::Literal(n) => {
                            if n > literal_left {
                                return Err(damaged(
                                    what(),
                                    "more literal bytes than stored".into(),
                                ));
                            }
                            literal_left -= n;
                            literal.copy(self, n)?;
                        }
                        Op::Page { block, page } => {
                            let image = p.images.get(block as usize).ok_or_else(|| {
                                damaged(
                                    what(),
                                    format!("a page of image {block}, which is not there"),
                                )
                            })?;
                            if page >= image.size / ps {
                                return Err(damaged(
                                    what(),
                                    format!("page {page} beyond image {:?}", image.name),
                                ));
                            }
                            let chunk = page * ps / cs;
                            let chunk_len = (image.size - chunk * cs).min(cs) as u32;
                            let fetch = match current {
                                Some((b, c, f)) if b == block && c == chunk => f,
                                _ => {
                                    if let Some((_, _, Some(seq))) = current {
                                        self.segment(Segment::Release(seq))?;
                                    }
                                    let id = nodes.typed(
                                        cursors[block as usize].get(&nodes, chunk),
                                        || format!("index of page image {:?}", image.name),
                                    )?;
                                    let f = if id.is_zero() {
                                        None
                                    } else {
                                        Some(self.dispatch(id, chunk_len)?)
                                    };
                                    current = Some((block, chunk, f));
                                    f
                                }
                            };
                            let start = (page * ps - chunk * cs) as u32;
                            self.segment(match fetch {
                                Some(seq) => Segment::Bytes {
                                    seq,
                                    start,
                                    len: ps as u32,
                                },
                                None => Segment::Zeros(ps as u32),
                            })?;
                        }
                    }
                }
            }
        }
        decoder.finish().map_err(|e| Error::corrupt(what(), e))?;
        if let Some((_, _, Some(seq))) = current {
            self.segment(Segment::Release(seq))?;
        }
        if literal_left != 0 {
            return Err(damaged(
                what(),
                format!("{literal_left} literal bytes never used"),
            ));
        }
        Ok(())
    }
}

/// A position in a stream's content-defined chunks, read from its index blobs as needed.
struct Literals<'i> {
    index: &'i [BlobId],
    next_blob: usize,
    entries: std::vec::IntoIter<StreamEntry>,
    /// The entry being copied from, its fetch and the bytes of it already used.
    current: Option<(StreamEntry, u64, u32)>,
}

impl<'i> Literals<'i> {
    fn new(index: &'i [BlobId]) -> Literals<'i> {
        Literals {
            index,
            next_blob: 0,
            entries: Vec::new().into_iter(),
            current: None,
        }
    }

    /// Bytes left in the current entry, moving to the next one when it is used up; None at
    /// the end of the stream.
    fn remaining_in_entry(&mut self, plan: &mut Planner) -> Result<Option<u64>> {
        loop {
            if let Some((e, _, used)) = &self.current {
                if *used < e.len {
                    return Ok(Some((e.len - used) as u64));
                }
            }
            self.release(plan)?;
            let e = loop {
                if let Some(e) = self.entries.next() {
                    break e;
                }
                let Some(blob) = self.index.get(self.next_blob) else {
                    return Ok(None);
                };
                self.next_blob += 1;
                self.entries = decode_index_blob(&plan.repo.read_blob(plan.index, blob)?)
                    .map_err(|e| Error::corrupt(format!("stream index {blob}"), e))?
                    .into_iter();
            };
            let seq = plan.dispatch(e.id, e.len)?;
            self.current = Some((e, seq, 0));
        }
    }

    /// Plans the next `n` bytes.
    fn copy(&mut self, plan: &mut Planner, mut n: u64) -> Result<()> {
        while n > 0 {
            let Some(left) = self.remaining_in_entry(plan)? else {
                return Err(damaged(
                    "literal stream".into(),
                    "shorter than its ops need".into(),
                ));
            };
            let take = left.min(n) as u32;
            let (_, seq, used) = self.current.as_mut().expect("an entry is current");
            plan.segment(Segment::Bytes {
                seq: *seq,
                start: *used,
                len: take,
            })?;
            *used += take;
            n -= take as u64;
        }
        Ok(())
    }

    fn release(&mut self, plan: &mut Planner) -> Result<()> {
        if let Some((_, seq, _)) = self.current.take() {
            plan.segment(Segment::Release(seq))?;
        }
        Ok(())
    }
}

/// The structure of a memory stream without reading its literals or pages: every op decodes,
/// every page lies inside its image, the literal stream is exactly as long as the ops use, and
/// the ops give exactly the stream's size (`check --read-data`; the blobs themselves are
/// verified by reading the packs). Errors are damage, or store errors.
pub(crate) fn verify_memory_ops(
    repo: &Repository,
    index: &BlobIndex,
    record: &StreamRecord,
) -> Result<()> {
    let Some(p) = &record.pages else {
        return Ok(());
    };
    let what = || format!("memory stream {}", record.name);
    let mut literal_stored = 0u64;
    for blob in &record.index {
        let entries = decode_index_blob(&repo.read_blob(index, blob)?)
            .map_err(|e| Error::corrupt(format!("stream index {blob}"), e))?;
        literal_stored += entries.iter().map(|e| e.len as u64).sum::<u64>();
    }
    if literal_stored != p.literal_size {
        return Err(damaged(
            what(),
            format!(
                "{literal_stored} literal bytes stored, {} recorded",
                p.literal_size
            ),
        ));
    }
    let mut decoder = OpsDecoder::new();
    let (mut literal, mut pages, mut ops_size) = (0u64, 0u64, 0u64);
    for blob in &p.ops {
        let entries = decode_index_blob(&repo.read_blob(index, blob)?)
            .map_err(|e| Error::corrupt(format!("op stream index {blob}"), e))?;
        for e in entries {
            let bytes = repo.read_blob(index, &e.id)?;
            ops_size += bytes.len() as u64;
            decoder.push(&bytes);
            while let Some(op) = decoder.next_op().map_err(|e| Error::corrupt(what(), e))? {
                match op {
                    Op::Literal(n) => literal = literal.saturating_add(n),
                    Op::Page { block, page } => {
                        let ok = p
                            .images
                            .get(block as usize)
                            .is_some_and(|i| page < i.size / p.page_size as u64);
                        if !ok {
                            return Err(damaged(
                                what(),
                                format!("page {page} of image {block} is outside the images"),
                            ));
                        }
                        pages += 1;
                    }
                }
            }
        }
    }
    decoder.finish().map_err(|e| Error::corrupt(what(), e))?;
    let total = pages
        .checked_mul(p.page_size as u64)
        .and_then(|b| b.checked_add(literal));
    if literal != p.literal_size || ops_size != p.ops_size || total != Some(record.size) {
        return Err(damaged(
            what(),
            format!(
                "its ops give {literal} literal bytes and {pages} pages ({ops_size} op bytes) \
                 for a stream of {} bytes with {} literal ({} op bytes)",
                record.size, p.literal_size, p.ops_size
            ),
        ));
    }
    Ok(())
}
