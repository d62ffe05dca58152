//! Streams (memory and device state, VM configuration), read to their end from a `Read`:
//!
//!   caller's thread: read, hash the whole stream, parse (memory) --batches of pieces--> N workers
//!   (zero test, BLAKE3 id, dedup claim, zstd, seal) --encoded blobs--> packer
//!                                                   \--(piece, id)--> collector thread
//!   collector: reorders, appends stream index entries (literal and op streams), builds the
//!   page images' index trees --index blobs and tree nodes--> packer
//!
//! The source is read on the caller's thread (a pipe from QEMU need not be `Send`); every
//! other stage is bounded, so memory stays at a few tens of MiB whatever the stream's size
//! (the page assembler holds at most 16 MiB of pages ahead of QEMU's scan).
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};
use vmkeep_core::blob;
use vmkeep_core::keys::BlobKind;
use vmkeep_core::manifest::{PageImage, PageImages, StreamRecord};
use vmkeep_core::memory::{self, EncodedSizes, MemoryEncoder, MemoryLayout, Piece, RamBlock};
use vmkeep_core::stream::{self, CdcParams, StreamEntry, ENTRIES_PER_BLOB};
use vmkeep_core::tree::{Node, NodeStore, TreeBuilder};
use vmkeep_core::BlobId;

use super::{BackupSession, Dedup};
use crate::error::{Error, Result};
use crate::packer::EncodedBlob;
use crate::progress::Progress;
use crate::Repository;

/// Bytes read from the source per `read` call.
const READ_BYTES: usize = 1 << 20;
/// Read buffers on their way through the stream hasher.
const HASH_BUFFERS: usize = 4;
/// A batch of pieces goes to the workers once it holds this many bytes.
const BATCH_BYTES: usize = 1 << 20;

static ZEROS: [u8; 256 << 10] = [0u8; 256 << 10];

struct Batch {
    seq: u64,
    pieces: Vec<Piece>,
}

/// A piece after the workers: what the collector needs of it.
enum Done {
    NewImage(RamBlock),
    Ops(StreamEntry),
    Literal(StreamEntry),
    Image { image: u32, chunk: u64, id: BlobId },
}

#[derive(Default)]
struct BatchDone {
    seq: u64,
    done: Vec<Done>,
    new_bytes: u64,
    chunks_new: u64,
    chunks_reused: u64,
}

/// Writes blobs through the session's dedup and packer; usable from any thread.
#[derive(Clone)]
struct BlobWriter<'r> {
    repo: &'r Repository,
    dedup: Arc<Dedup>,
    packer: Sender<EncodedBlob>,
}

impl BlobWriter<'_> {
    /// Stores `data` unless the repository or this session has it. Ok((id, new)).
    fn put(&self, kind: BlobKind, data: &[u8]) -> Result<(BlobId, bool)> {
        let id = self.repo.keys.blob_id(kind, data);
        if !self.dedup.claim(&id) {
            return Ok((id, false));
        }
        let msg = EncodedBlob {
            kind,
            id,
            raw_len: data.len() as u32,
            data: blob::encode(&self.repo.keys, kind, &id, data),
        };
        self.packer.send(msg).map_err(|_| packer_gone())?;
        Ok((id, true))
    }
}

fn packer_gone() -> Error {
    Error::Internal(super::pipeline::PACKER_GONE.into())
}

/// Tree nodes of page images: written, never read back (the trees are built from nothing).
struct ImageNodes<'r>(BlobWriter<'r>);

impl NodeStore for ImageNodes<'_> {
    fn load(&self, id: &BlobId) -> vmkeep_core::Result<Node> {
        Err(vmkeep_core::Error::Invalid {
            what: "page image node",
            reason: format!("{id} is not readable during a backup"),
        })
    }

    fn store(&mut self, node: &Node) -> vmkeep_core::Result<BlobId> {
        self.0
            .put(BlobKind::Tree, &node.encode())
            .map(|(id, _)| id)
            .map_err(|_| vmkeep_core::Error::Invalid {
                what: "repository write",
                reason: "the packer stopped".into(),
            })
    }
}

/// The entries of one content-defined stream, written out as index blobs of
/// [`ENTRIES_PER_BLOB`] entries as soon as they fill one.
#[derive(Default)]
struct IndexWriter {
    entries: Vec<StreamEntry>,
    index: Vec<BlobId>,
    size: u64,
}

impl IndexWriter {
    fn push(&mut self, w: &BlobWriter, e: StreamEntry) -> Result<()> {
        self.size += e.len as u64;
        self.entries.push(e);
        if self.entries.len() == ENTRIES_PER_BLOB {
            self.flush(w)?;
        }
        Ok(())
    }

    fn flush(&mut self, w: &BlobWriter) -> Result<()> {
        if !self.entries.is_empty() {
            let bytes = stream::encode_index_blob(&self.entries);
            self.index.push(w.put(BlobKind::Tree, &bytes)?.0);
            self.entries.clear();
        }
        Ok(())
    }

    fn finish(mut self, w: &BlobWriter) -> Result<(u64, Vec<BlobId>)> {
        self.flush(w)?;
        Ok((self.size, self.index))
    }
}

/// What the collector built.
struct Collected {
    literal: (u64, Vec<BlobId>),
    ops: (u64, Vec<BlobId>),
    images: Vec<PageImage>,
    new_bytes: u64,
    chunks_new: u64,
    chunks_reused: u64,
}

impl BackupSession<'_> {
    /// Add a stream read to its end from `source`, cut into content-defined chunks.
    pub fn add_stream(
        &mut self,
        name: &str,
        source: &mut dyn Read,
        params: CdcParams,
        progress: &dyn Progress,
    ) -> Result<&StreamRecord> {
        let layout = MemoryLayout {
            parse: false,
            cdc: params,
            ..MemoryLayout::DEFAULT
        };
        self.add_stream_with(name, source, layout, progress)
    }

    /// Add a QEMU migration stream (RAM and device state) read to its end from `source`: its
    /// pages go into page images, the rest into a literal stream (FORMAT.md §11.1). A stream
    /// the parser does not understand, wholly or from some point on, is stored as literal
    /// bytes: never refused, always given back byte for byte.
    pub fn add_memory_stream(
        &mut self,
        name: &str,
        source: &mut dyn Read,
        progress: &dyn Progress,
    ) -> Result<&StreamRecord> {
        self.add_stream_with(name, source, MemoryLayout::DEFAULT, progress)
    }

    /// [`BackupSession::add_memory_stream`] with another layout (benchmarks compare them).
    pub fn add_stream_with(
        &mut self,
        name: &str,
        source: &mut dyn Read,
        layout: MemoryLayout,
        progress: &dyn Progress,
    ) -> Result<&StreamRecord> {
        vmkeep_core::manifest::validate_name("stream name", name)?;
        if self.streams.iter().any(|s| s.name == name) {
            return Err(Error::Invalid {
                what: "stream name",
                reason: format!("{name:?} given twice"),
            });
        }
        layout.validate()?;
        progress.phase(&format!("stream {name}"), 0);
        let out = self.ingest(name, source, layout, progress);
        progress.finish_phase();
        let (record, sizes) = match out {
            Ok(r) => r,
            Err(Error::Internal(msg)) if msg == super::pipeline::PACKER_GONE => {
                return Err(self.packer.take().expect("session open").failure());
            }
            Err(e) => return Err(e),
        };
        if let Some(p) = &sizes.parse.fallback {
            tracing::info!(
                stream = name,
                offset = p.0,
                reason = %p.1,
                pages = sizes.pages,
                "memory stream: the rest of the stream is stored as literal bytes"
            );
        }
        self.streams.push(record);
        Ok(self.streams.last().expect("just pushed"))
    }

    fn ingest(
        &mut self,
        name: &str,
        source: &mut dyn Read,
        layout: MemoryLayout,
        progress: &dyn Progress,
    ) -> Result<(StreamRecord, EncodedSizes)> {
        let repo = self.repo;
        let writer = BlobWriter {
            repo,
            dedup: self.dedup.clone(),
            packer: self.packer.as_ref().expect("session open").sender(),
        };
        let threads = repo.tuning.threads.max(1);
        let (batch_tx, batch_rx) = bounded::<Batch>(threads * 2);
        let (done_tx, done_rx) = bounded::<BatchDone>(threads * 4);
        // The stream id is hashed on its own thread, beside the parser (only paged streams
        // record it).
        let (hash_tx, hash_rx) = bounded::<Arc<Vec<u8>>>(HASH_BUFFERS);
        let (back_tx, back_rx) = bounded::<Arc<Vec<u8>>>(HASH_BUFFERS + 1);
        let keys = &repo.keys;

        let (read_r, worker_rs, collected, stream_id) = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let (rx, tx, w) = (batch_rx.clone(), done_tx.clone(), writer.clone());
                    s.spawn(move || work(&w, rx, tx))
                })
                .collect();
            drop((batch_rx, done_tx));
            let w = writer.clone();
            let collector = s.spawn(move || collect(&w, layout.image_chunk, done_rx));
            let hasher = s.spawn(move || {
                let mut h = keys.data_hasher();
                for buf in hash_rx {
                    h.update(&buf);
                    let _ = back_tx.try_send(buf); // for reuse; dropped when not wanted
                }
                h.finish()
            });
            let hash = layout.parse.then_some(hash_tx);
            let read_r = produce(name, source, layout, progress, batch_tx, hash, back_rx);
            let worker_rs: Vec<Result<()>> = workers
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Internal("stream worker panicked".into())))
                })
                .collect();
            let collected = collector
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("stream collector panicked".into())));
            let stream_id = hasher.join();
            (read_r, worker_rs, collected, stream_id)
        });
        // The root cause first: the source, then the workers (packer failures), the collector.
        let read = read_r?;
        for r in worker_rs {
            r?;
        }
        let c = collected?;
        let stream_id = stream_id.map_err(|_| Error::Internal("stream hasher panicked".into()))?;
        let Some((sizes, size)) = read else {
            return Err(Error::Internal(
                "the stream's consumers stopped early".into(),
            ));
        };
        if c.literal.0 != sizes.literal || c.ops.0 != sizes.ops {
            return Err(Error::Internal(format!(
                "stream {name}: {} of {} literal and {} of {} op bytes stored",
                c.literal.0, sizes.literal, c.ops.0, sizes.ops
            )));
        }
        self.stats.read_bytes += size;
        self.stats.new_bytes += c.new_bytes;
        self.stats.chunks_new += c.chunks_new;
        self.stats.chunks_reused += c.chunks_reused;
        let pages = (sizes.pages > 0).then_some(PageImages {
            stream_id,
            literal_size: sizes.literal,
            page_size: memory::PAGE_SIZE,
            chunk_size: layout.image_chunk,
            ops_size: c.ops.0,
            ops: c.ops.1,
            images: c.images,
        });
        let record = StreamRecord {
            name: name.to_string(),
            size,
            index: c.literal.1,
            pages,
        };
        Ok((record, sizes))
    }
}

/// Reads `source` to its end on the caller's thread: each buffer to the hasher (`hash`) and the
/// encoder, the pieces in batches to the workers. Ok(Some((sizes, stream bytes))), or
/// Ok(None) when a consumer stopped (it reports why).
fn produce(
    name: &str,
    source: &mut dyn Read,
    layout: MemoryLayout,
    progress: &dyn Progress,
    batches: Sender<Batch>,
    hash: Option<Sender<Arc<Vec<u8>>>>,
    reuse: Receiver<Arc<Vec<u8>>>,
) -> Result<Option<(EncodedSizes, u64)>> {
    let mut encoder = MemoryEncoder::new(layout);
    let mut batch = Batch {
        seq: 0,
        pieces: Vec::new(),
    };
    let mut batch_bytes = 0usize;
    // Pieces come in bursts (the assembler releases many chunks at once): batches are cut at
    // BATCH_BYTES whatever the burst, so every worker gets some.
    let mut send = |pieces: Vec<Piece>, end: bool| -> bool {
        let mut pieces = pieces.into_iter().peekable();
        while pieces.peek().is_some() || (end && !batch.pieces.is_empty()) {
            if let Some(p) = pieces.next() {
                batch_bytes += piece_len(&p);
                batch.pieces.push(p);
            }
            let last = pieces.peek().is_none();
            if batch_bytes >= BATCH_BYTES || (end && last) {
                let next = Batch {
                    seq: batch.seq + 1,
                    pieces: Vec::new(),
                };
                batch_bytes = 0;
                if batches.send(std::mem::replace(&mut batch, next)).is_err() {
                    return false;
                }
            }
        }
        true
    };
    let mut size = 0u64;
    let mut spare: Option<Vec<u8>> = None;
    loop {
        // The last buffer when nobody else holds it, one the hasher is done with, or a new one.
        let mut buf = spare
            .take()
            .or_else(|| reuse.try_recv().ok().and_then(|b| Arc::try_unwrap(b).ok()))
            .unwrap_or_default();
        buf.resize(READ_BYTES, 0);
        let n = match read_full(source, &mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                return Err(Error::SourceRead {
                    path: format!("stream {name}").into(),
                    cause: e,
                })
            }
        };
        buf.truncate(n);
        size += n as u64;
        progress.advance(n as u64);
        let buf = Arc::new(buf);
        if let Some(h) = &hash {
            if h.send(buf.clone()).is_err() {
                return Ok(None);
            }
        }
        if !send(encoder.push(&buf), false) {
            return Ok(None);
        }
        spare = Arc::try_unwrap(buf).ok();
    }
    let (pieces, sizes) = encoder.finish();
    if !send(pieces, true) {
        return Ok(None);
    }
    Ok(Some((sizes, size)))
}

fn piece_len(p: &Piece) -> usize {
    match p {
        Piece::NewImage(_) => 0,
        Piece::Ops(d) | Piece::Literal(d) | Piece::Image { data: d, .. } => d.len(),
    }
}

fn work(w: &BlobWriter, rx: Receiver<Batch>, tx: Sender<BatchDone>) -> Result<()> {
    for b in rx {
        let mut r = BatchDone {
            seq: b.seq,
            ..Default::default()
        };
        for p in b.pieces {
            let done = match p {
                Piece::NewImage(b) => Done::NewImage(b),
                Piece::Ops(d) => Done::Ops(stream_entry(w, &d, &mut r)?),
                Piece::Literal(d) => Done::Literal(stream_entry(w, &d, &mut r)?),
                Piece::Image { image, chunk, data } => Done::Image {
                    image,
                    chunk,
                    id: image_chunk(w, &data, &mut r)?,
                },
            };
            r.done.push(done);
        }
        if tx.send(r).is_err() {
            return Ok(()); // the collector stopped; it reports why
        }
    }
    Ok(())
}

/// A page image chunk: ZERO when all zero (a hole), like a disk chunk.
fn image_chunk(w: &BlobWriter, data: &[u8], r: &mut BatchDone) -> Result<BlobId> {
    if data.len() <= ZEROS.len() && data == &ZEROS[..data.len()] {
        return Ok(BlobId::ZERO);
    }
    count(w.put(BlobKind::Data, data)?, data.len(), r)
}

fn count((id, new): (BlobId, bool), len: usize, r: &mut BatchDone) -> Result<BlobId> {
    if new {
        r.new_bytes += len as u64;
        r.chunks_new += 1;
    } else {
        r.chunks_reused += 1;
    }
    Ok(id)
}

/// A chunk of a content-defined stream (never replaced by ZERO: its index lists every chunk).
fn stream_entry(w: &BlobWriter, data: &[u8], r: &mut BatchDone) -> Result<StreamEntry> {
    let id = count(w.put(BlobKind::Data, data)?, data.len(), r)?;
    Ok(StreamEntry {
        id,
        len: data.len() as u32,
    })
}

/// Yields the workers' results in the order the pieces were produced.
struct InOrder {
    rx: Receiver<BatchDone>,
    pending: BTreeMap<u64, BatchDone>,
    next: u64,
    current: std::vec::IntoIter<Done>,
    new_bytes: u64,
    chunks_new: u64,
    chunks_reused: u64,
}

impl Iterator for InOrder {
    type Item = Done;

    fn next(&mut self) -> Option<Done> {
        loop {
            if let Some(d) = self.current.next() {
                return Some(d);
            }
            while !self.pending.contains_key(&self.next) {
                let b = self.rx.recv().ok()?;
                self.pending.insert(b.seq, b);
            }
            let b = self.pending.remove(&self.next).expect("present");
            self.next += 1;
            self.new_bytes += b.new_bytes;
            self.chunks_new += b.chunks_new;
            self.chunks_reused += b.chunks_reused;
            self.current = b.done.into_iter();
        }
    }
}

fn collect(w: &BlobWriter, image_chunk: u32, rx: Receiver<BatchDone>) -> Result<Collected> {
    let mut results = InOrder {
        rx,
        pending: BTreeMap::new(),
        next: 0,
        current: Vec::new().into_iter(),
        new_bytes: 0,
        chunks_new: 0,
        chunks_reused: 0,
    };
    let mut literal = IndexWriter::default();
    let mut ops = IndexWriter::default();
    // A tree builder per page image, created when the image is announced. Builders borrow
    // their node stores, so the stores exist first, one per possible image.
    let mut stores: Vec<ImageNodes> = (0..memory::assemble::MAX_IMAGES)
        .map(|_| ImageNodes(w.clone()))
        .collect();
    let mut free = stores.iter_mut();
    let mut builders = Vec::new();
    let mut blocks: Vec<RamBlock> = Vec::new();
    for d in results.by_ref() {
        match d {
            Done::Literal(e) => literal.push(w, e)?,
            Done::Ops(e) => ops.push(w, e)?,
            Done::NewImage(b) => {
                let store = free
                    .next()
                    .ok_or_else(|| Error::Internal("too many page images".into()))?;
                builders.push(TreeBuilder::new(
                    store,
                    None,
                    b.size.div_ceil(image_chunk as u64),
                ));
                blocks.push(b);
            }
            Done::Image { image, chunk, id } => builders
                .get_mut(image as usize)
                .ok_or_else(|| Error::Internal(format!("page image {image} not announced")))?
                .set(chunk, id)
                .map_err(tree_error)?,
        }
    }
    let mut images = Vec::new();
    for (builder, b) in builders.into_iter().zip(blocks) {
        images.push(PageImage {
            name: b.name,
            size: b.size,
            root: builder.finish().map_err(tree_error)?,
        });
    }
    Ok(Collected {
        literal: literal.finish(w)?,
        ops: ops.finish(w)?,
        images,
        new_bytes: results.new_bytes,
        chunks_new: results.chunks_new,
        chunks_reused: results.chunks_reused,
    })
}

fn tree_error(e: vmkeep_core::Error) -> Error {
    match e {
        vmkeep_core::Error::Invalid {
            what: "repository write",
            ..
        } => packer_gone(),
        other => Error::Core(other),
    }
}

/// Reads until `buf` is full or the source ends: whole buffers keep the reused ones from being
/// zero-filled again (`resize`) and halve the work per byte downstream.
fn read_full(source: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match source.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
