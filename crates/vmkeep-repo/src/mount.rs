//! A restore point's disk read in place, without restoring it: [`MountedDisk`] is the
//! [`ServedDisk`] that `vmkeep mount` and instant recovery serve over NBD.
//!
//! ```text
//! read_at(off, len) ─► chunks of the range ─► id (index tree, nodes cached) ─► ZERO: zeros
//!                                          └► chunk cache ─miss─► read_blob (verified by id)
//!                sequential reads ─► read-ahead threads fetch the next chunks into the cache
//! extents(off, len) ─► ids only: a ZERO chunk reads as zeros and is never fetched
//! ```
//!
//! Every chunk is verified against its id and its length against the disk's geometry before a
//! byte of it is served: damage is a read error, never wrong data. Memory is bounded by the two
//! caches (`MountOptions`), whatever the disk's size. The blob index is the cache-backed one a
//! backup uses; when a blob is missing where the index said (a prune repacked it while this
//! disk was served), the index is loaded again once and the read retried. With
//! `wait_out_outages` (instant recovery), a read that fails while the repository does not
//! answer at all waits until it does, so the VM's I/O pauses instead of failing.
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender, TrySendError};
use serde::Serialize;
use vmkeep_core::manifest::{DiskEntry, Manifest};
use vmkeep_core::tree::{ChunkCursor, Node, NodeStore};
use vmkeep_core::BlobId;
use vmkeep_io::{ServedDisk, ServedExtent};

use crate::error::{Error, Result};
use crate::index::BlobIndex;
use crate::restore::{check_chunk_len, select_disks};
use crate::sequential::{RunRef, SequentialReads};
use crate::Repository;

/// What a mount may hold in memory and how far it reads ahead.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Bytes of verified chunks kept (at least a few chunks).
    pub cache_bytes: u64,
    /// Chunks fetched ahead of a sequential reader (0: none).
    pub read_ahead: u64,
    /// Threads fetching ahead.
    pub read_ahead_threads: usize,
    /// A read that fails while the repository does not answer at all waits until it answers
    /// again (instant recovery: the VM's I/O pauses instead of failing), and says so once.
    /// Errors while the repository answers (damaged or missing data) fail at once either way.
    pub wait_out_outages: bool,
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions {
            cache_bytes: 64 << 20,
            read_ahead: 32,
            read_ahead_threads: 4,
            wait_out_outages: false,
        }
    }
}

/// What a mount did, for `vmkeep mount`'s report and the tests.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MountStats {
    /// Chunks read from the repository (each verified), read-ahead included.
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    /// Of those, fetched ahead of the reader.
    pub chunks_read_ahead: u64,
    /// Chunk reads answered from the cache.
    pub cache_hits: u64,
    /// Reads of data chunks that failed (damaged or missing data).
    pub read_errors: u64,
}

impl std::ops::AddAssign for MountStats {
    fn add_assign(&mut self, o: MountStats) {
        self.chunks_fetched += o.chunks_fetched;
        self.bytes_fetched += o.bytes_fetched;
        self.chunks_read_ahead += o.chunks_read_ahead;
        self.cache_hits += o.cache_hits;
        self.read_errors += o.read_errors;
    }
}

#[derive(Default)]
struct Counters {
    chunks_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    chunks_read_ahead: AtomicU64,
    cache_hits: AtomicU64,
    read_errors: AtomicU64,
}

/// The most chunks one `extents` call looks at: a bounded answer, the client asks again.
const EXTENT_CHUNKS_PER_CALL: u64 = 1 << 16;
/// Waits of a read while the repository does not answer: doubling from the first to the most.
const OUTAGE_FIRST_PAUSE: Duration = Duration::from_millis(250);
const OUTAGE_MAX_PAUSE: Duration = Duration::from_secs(5);
/// How often a read still waiting says so again.
const OUTAGE_REMINDER: Duration = Duration::from_secs(60);
/// Tree nodes kept (4 KiB each at most): the path to every leaf of a 256 GiB disk region.
const NODE_CACHE_ITEMS: usize = 4096;

pub struct MountedDisk {
    repo: Arc<Repository>,
    index: RwLock<Arc<BlobIndex>>,
    name: String,
    size: u64,
    chunk_size: u64,
    chunks: u64,
    cursor: Mutex<ChunkCursor>,
    nodes: quick_cache::sync::Cache<BlobId, Node>,
    data: quick_cache::sync::Cache<u64, Arc<Vec<u8>>>,
    /// The runs of sequential reads, which read ahead.
    sequential: SequentialReads,
    /// (chunk index, its id) for the read-ahead threads: the id is looked up once.
    ahead: Option<Sender<(u64, BlobId)>>,
    read_ahead: u64,
    counters: Counters,
    wait_out_outages: bool,
    /// Since when the repository has not answered (reads are waiting), and when that was last
    /// said; `None` while it answers.
    outage: Mutex<Option<(Instant, Instant)>>,
    /// Set by [`MountedDisk::give_up`]: waiting reads fail.
    given_up: AtomicBool,
}

impl MountedDisk {
    /// Serves disk `disk` of `m` (the only disk when `None`; else [`Error::NoSuchDisk`]).
    pub fn open(
        repo: Arc<Repository>,
        m: &Manifest,
        disk: Option<&str>,
        opts: &MountOptions,
    ) -> Result<Arc<MountedDisk>> {
        let d = pick_disk(m, disk)?;
        let index = Arc::new(BlobIndex::load(&repo)?);
        let chunk_size = repo.config.chunk_size as u64;
        let chunks = d.size.div_ceil(chunk_size);
        let cached_chunks = (opts.cache_bytes / chunk_size).max(4) as usize;
        let (tx, rx) = bounded::<(u64, BlobId)>(opts.read_ahead as usize * 2 + 1);
        let disk = Arc::new(MountedDisk {
            repo,
            index: RwLock::new(index),
            name: d.name.clone(),
            size: d.size,
            chunk_size,
            chunks,
            cursor: Mutex::new(ChunkCursor::new(d.root, chunks)),
            nodes: quick_cache::sync::Cache::new(NODE_CACHE_ITEMS),
            data: chunk_cache(cached_chunks),
            sequential: SequentialReads::new(opts.read_ahead),
            ahead: (opts.read_ahead > 0).then_some(tx),
            read_ahead: opts.read_ahead,
            counters: Counters::default(),
            wait_out_outages: opts.wait_out_outages,
            outage: Mutex::new(None),
            given_up: AtomicBool::new(false),
        });
        if opts.read_ahead > 0 {
            for _ in 0..opts.read_ahead_threads.max(1) {
                let weak: Weak<MountedDisk> = Arc::downgrade(&disk);
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name("vmkeep-read-ahead".into())
                    .spawn(move || {
                        // Ends when the disk is dropped (its sender goes with it).
                        for (i, id) in rx {
                            let Some(disk) = weak.upgrade() else { break };
                            if let Err(e) = disk.chunk(i, &id, true) {
                                tracing::debug!("read-ahead of chunk {i}: {e}");
                            }
                        }
                    })
                    .map_err(|e| Error::Internal(format!("starting read-ahead: {e}")))?;
            }
        }
        Ok(disk)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads waiting out an outage fail from now on (the server is stopping).
    pub fn give_up(&self) {
        self.given_up.store(true, Ordering::SeqCst);
    }

    /// Since when reads have been waiting for the repository, if they are.
    pub fn waiting_since(&self) -> Option<Instant> {
        self.outage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|(since, _)| since)
    }

    /// `f`, tried again while the repository does not answer at all (with
    /// [`MountOptions::wait_out_outages`]). Whether it answers is asked of its config: an
    /// error while the config reads is about the data (damaged, missing), returned at once.
    fn patiently<T>(&self, f: impl Fn() -> Result<T>) -> Result<T> {
        let mut pause = OUTAGE_FIRST_PAUSE;
        // Whether `f` already failed once while the config read: the repository may have
        // come back between the failure and the look at the config, so it is tried again
        // once before the error counts as being about the data.
        let mut failed_while_up = false;
        loop {
            let e = match f() {
                Ok(v) => {
                    self.outage_over();
                    return Ok(v);
                }
                Err(e) => e,
            };
            if !self.wait_out_outages || self.given_up.load(Ordering::SeqCst) {
                return Err(e);
            }
            // Even what looks like damage (a pack not found) may be an outage: a share that
            // is not mounted. The config answers whether the repository is there at all.
            if self.repo.answers().is_ok() {
                if failed_while_up {
                    return Err(e);
                }
                failed_while_up = true;
                continue;
            }
            failed_while_up = false;
            self.outage_goes_on(&e);
            std::thread::sleep(pause);
            pause = (pause * 2).min(OUTAGE_MAX_PAUSE);
        }
    }

    /// Says that reads wait: when the outage starts, then every [`OUTAGE_REMINDER`].
    fn outage_goes_on(&self, e: &Error) {
        let mut outage = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match *outage {
            None => {
                tracing::warn!(
                    "the repository does not answer ({e}); reads of disk {} wait until it \
                     does: the VM's I/O on data not yet copied is paused",
                    self.name
                );
                *outage = Some((now, now));
            }
            Some((since, said)) if now.duration_since(said) >= OUTAGE_REMINDER => {
                tracing::warn!(
                    "still waiting for the repository after {:.0} s ({e}); disk {}",
                    now.duration_since(since).as_secs_f64(),
                    self.name
                );
                *outage = Some((since, now));
            }
            Some(_) => {}
        }
    }

    fn outage_over(&self) {
        let mut outage = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((since, _)) = outage.take() {
            tracing::warn!(
                "the repository answers again after {:.0} s: reads of disk {} go on",
                since.elapsed().as_secs_f64(),
                self.name
            );
        }
    }

    pub fn stats(&self) -> MountStats {
        let c = &self.counters;
        MountStats {
            chunks_fetched: c.chunks_fetched.load(Ordering::Relaxed),
            bytes_fetched: c.bytes_fetched.load(Ordering::Relaxed),
            chunks_read_ahead: c.chunks_read_ahead.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            read_errors: c.read_errors.load(Ordering::Relaxed),
        }
    }

    /// Id of chunk `i` (ZERO for zeros), through the shared cursor and the node cache.
    fn chunk_id(&self, i: u64) -> Result<BlobId> {
        let index = self.current_index();
        let nodes = CachedNodes {
            disk: self,
            index: &index,
            failure: Mutex::new(None),
        };
        let r = self
            .cursor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&nodes, i);
        r.map_err(|e| {
            nodes
                .failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_else(|| Error::corrupt(format!("index of disk {}", self.name), e))
        })
    }

    fn current_index(&self) -> Arc<BlobIndex> {
        self.index.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The verified bytes of chunk `i`, whose id is `id` (not ZERO), from the cache or the
    /// repository.
    fn chunk(&self, i: u64, id: &BlobId, ahead: bool) -> Result<Arc<Vec<u8>>> {
        if !ahead {
            if let Some(hit) = self.data.get(&i) {
                self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(hit);
            }
        }
        self.data.get_or_insert_with(&i, || {
            let data = self.fetch(i, id)?;
            let c = &self.counters;
            c.chunks_fetched.fetch_add(1, Ordering::Relaxed);
            c.bytes_fetched
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            if ahead {
                c.chunks_read_ahead.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Arc::new(data))
        })
    }

    /// Reads blob `id` as chunk `i`: verified by id, and by length against the geometry. A
    /// blob missing where the index said is looked up once more in a freshly loaded index.
    fn fetch(&self, i: u64, id: &BlobId) -> Result<Vec<u8>> {
        let index = self.current_index();
        let data = match self.repo.read_blob(&index, id) {
            Err(Error::BlobMissing { .. }) => {
                tracing::info!("blob {id} moved (a prune ran?): loading the index again");
                let fresh = Arc::new(BlobIndex::load(&self.repo)?);
                *self.index.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
                self.repo.read_blob(&fresh, id)?
            }
            r => r?,
        };
        let expect = (self.size - i * self.chunk_size).min(self.chunk_size);
        check_chunk_len(id, data.len(), expect)?;
        Ok(data)
    }

    /// Queues the chunks after `last` for the read-ahead threads, skipping ZERO and cached
    /// ones, and those before where `run` ends now: readers already asked for them
    /// (with many readers in flight, a slow one finishing behind the others would otherwise
    /// fetch again what they read and the cache dropped). A full queue drops the rest (the
    /// reader is ahead anyway).
    fn read_ahead_after(&self, last: u64, run: RunRef) {
        let Some(tx) = &self.ahead else { return };
        let Some(run_end) = self.sequential.end(run) else {
            return;
        };
        let end = (last + 1 + self.read_ahead).min(self.chunks);
        let start = (last + 1).max(run_end);
        for i in start..end {
            if self.data.get(&i).is_some() {
                continue;
            }
            let id = match self.chunk_id(i) {
                Ok(id) if !id.is_zero() => id,
                _ => continue,
            };
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send((i, id))
            {
                break;
            }
        }
    }

    fn io_error(&self, what: &str, e: Error) -> io::Error {
        self.counters.read_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("disk {}: {what}: {e}", self.name);
        io::Error::other(format!("{what}: {e}"))
    }
}

impl ServedDisk for MountedDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.chunk_size as u32
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("read past the end of the disk ({} bytes)", self.size),
            ));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let first = offset / self.chunk_size;
        let last = (end - 1) / self.chunk_size;
        let run = self.sequential.read(first, last);
        for i in first..=last {
            let start = i * self.chunk_size;
            let from = offset.max(start);
            let to = end.min(start + self.chunk_size);
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            let id = self
                .patiently(|| self.chunk_id(i))
                .map_err(|e| self.io_error(&format!("chunk {i}"), e))?;
            if id.is_zero() {
                out.fill(0);
                continue;
            }
            let data = self
                .patiently(|| self.chunk(i, &id, false))
                .map_err(|e| self.io_error(&format!("chunk {i} at byte {start}"), e))?;
            out.copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
        }
        if let Some(run) = run {
            self.read_ahead_after(last, run);
        }
        Ok(())
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<ServedExtent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<ServedExtent> = Vec::new();
        let mut pos = offset;
        let stop_chunk = offset / self.chunk_size + EXTENT_CHUNKS_PER_CALL;
        while pos < end {
            let i = pos / self.chunk_size;
            if i >= stop_chunk {
                break;
            }
            let zero = self
                .patiently(|| self.chunk_id(i))
                .map_err(|e| self.io_error(&format!("index of chunk {i}"), e))?
                .is_zero();
            let next = ((i + 1) * self.chunk_size).min(end);
            match out.last_mut() {
                Some(last) if last.zero == zero => last.len += next - pos,
                _ => out.push(ServedExtent {
                    len: next - pos,
                    zero,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
}

/// The cache of verified chunks. Most chunks are read once (a sequential reader, a copy), and
/// read-ahead puts them in before the reader arrives: quick_cache's default keeps 97% of the
/// room for entries read twice, which evicted read-ahead chunks before use (a copy at queue
/// depth 16 fetched 45% more than it read). So new entries get most of the room here.
fn chunk_cache(chunks: usize) -> quick_cache::sync::Cache<u64, Arc<Vec<u8>>> {
    let options = quick_cache::OptionsBuilder::new()
        .estimated_items_capacity(chunks)
        .weight_capacity(chunks as u64)
        .hot_allocation(0.1)
        .shards(4)
        .build()
        .expect("valid cache options");
    quick_cache::sync::Cache::with_options(
        options,
        Default::default(),
        Default::default(),
        Default::default(),
    )
}

/// The root's tree nodes through the disk's bounded node cache; the first load failure keeps
/// its own error type for the caller ([`crate::nodes::RepoNodes`] does the same, unshared).
struct CachedNodes<'a> {
    disk: &'a MountedDisk,
    index: &'a BlobIndex,
    failure: Mutex<Option<Error>>,
}

impl NodeStore for CachedNodes<'_> {
    fn load(&self, id: &BlobId) -> vmkeep_core::Result<Node> {
        let loaded = self.disk.nodes.get_or_insert_with(id, || {
            let bytes = self.disk.repo.read_blob(self.index, id)?;
            Node::decode(&bytes).map_err(|e| Error::corrupt(format!("index node {id}"), e))
        });
        loaded.map_err(|e| {
            self.failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
            vmkeep_core::Error::Corrupt {
                kind: "index node",
                reason: "could not be loaded".into(),
            }
        })
    }

    fn store(&mut self, _node: &Node) -> vmkeep_core::Result<BlobId> {
        Err(vmkeep_core::Error::Invalid {
            what: "operation",
            reason: "read-only node store".into(),
        })
    }
}

/// The disk a mount serves: the one named (as a restore selects it), or the only one.
fn pick_disk<'m>(m: &'m Manifest, disk: Option<&str>) -> Result<&'m DiskEntry> {
    match select_disks(m, disk)?.as_slice() {
        [d] => Ok(d),
        all => Err(Error::Invalid {
            what: "--disk",
            reason: format!(
                "restore point {:#} has {} disks ({}): name one with --disk",
                m.id,
                all.len(),
                all.iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}
