//! The packer: a thread that receives encoded blobs, groups them into pack objects of the
//! repository's pack size, writes each pack, and after every few packs (and at the end) writes an
//! index object naming what those packs hold. Packs are written before the index that names them,
//! indexes before any manifest that needs them (FORMAT.md "Write ordering"); a rerun after a crash
//! finds every indexed blob and reuses it.
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use vmkeep_core::keys::{BlobKind, Keys};
use vmkeep_core::pack::{IndexFile, PackBuilder};
use vmkeep_core::BlobId;
use vmkeep_core::{object, ObjectKind};
use vmkeep_store::{Key, Store};

use crate::error::{Error, Result};
use crate::hooks::kill_point;
use crate::index::pack_key;
use crate::upload::Uploads;

/// Packs per index object.
pub(crate) const PACKS_PER_INDEX: usize = 8;

pub(crate) struct EncodedBlob {
    pub kind: BlobKind,
    pub id: BlobId,
    pub raw_len: u32,
    pub data: Vec<u8>,
}

#[derive(Clone, Debug, Default)]
pub struct PackerStats {
    pub packs: u64,
    pub pack_bytes: u64,
    pub index_objects: u64,
    pub index_bytes: u64,
    /// Encoded bytes of Tree blobs (index nodes).
    pub tree_bytes: u64,
    pub blobs: u64,
    /// Encoded bytes of Data blobs (chunks).
    pub data_blob_bytes: u64,
    /// The packs written.
    pub pack_ids: Vec<vmkeep_core::PackId>,
}

pub(crate) struct Packer {
    tx: Option<Sender<EncodedBlob>>,
    thread: Option<JoinHandle<Result<PackerStats>>>,
}

struct Worker {
    store: Arc<dyn Store>,
    uploads: Uploads,
    keys: Keys,
    pack_size: usize,
    packs_per_index: usize,
    builder: PackBuilder,
    pending: IndexFile,
    stats: PackerStats,
}

impl Worker {
    fn write_pack(&mut self) -> Result<()> {
        if self.builder.is_empty() {
            return Ok(());
        }
        let builder = std::mem::take(&mut self.builder);
        let (id, bytes, entries) = builder.finish(&self.keys);
        self.stats.packs += 1;
        self.stats.pack_bytes += bytes.len() as u64;
        // Stored now, or in flight while the next pack fills (upload.rs).
        self.uploads.put(pack_key(&id), bytes)?;
        self.stats.pack_ids.push(id);
        if self.stats.packs == 1 {
            kill_point("after-first-pack");
        }
        self.pending.packs.push((id, entries));
        if self.pending.packs.len() >= self.packs_per_index {
            self.write_index()?;
        }
        Ok(())
    }

    fn write_index(&mut self) -> Result<()> {
        if self.pending.packs.is_empty() {
            return Ok(());
        }
        // The packs must be durable before an index object names them: otherwise a power loss
        // could keep the index object and lose a pack, and later backups would reuse blobs that
        // are gone (FORMAT.md §1, §7). Uploads in flight finish first.
        self.uploads.wait()?;
        self.store.flush()?;
        let file = std::mem::take(&mut self.pending);
        let sealed = object::seal(&self.keys, ObjectKind::Index, &file.encode());
        let name = blake3::hash(&sealed).to_hex().to_string();
        self.store
            .put(&Key::new(ObjectKind::Index, name)?, &sealed)?;
        self.stats.index_objects += 1;
        self.stats.index_bytes += sealed.len() as u64;
        if self.stats.index_objects == 1 {
            kill_point("after-first-index");
        }
        Ok(())
    }

    fn run(mut self, rx: Receiver<EncodedBlob>) -> Result<PackerStats> {
        for blob in rx {
            if blob.kind == BlobKind::Tree {
                self.stats.tree_bytes += blob.data.len() as u64;
            } else {
                self.stats.data_blob_bytes += blob.data.len() as u64;
            }
            self.stats.blobs += 1;
            self.builder
                .add(blob.kind, blob.id, blob.raw_len, &blob.data);
            if self.builder.is_full(self.pack_size) {
                self.write_pack()?;
            }
        }
        self.write_pack()?;
        self.write_index()?;
        self.uploads.wait()?;
        Ok(self.stats)
    }
}

impl Packer {
    pub fn start(store: Arc<dyn Store>, keys: Keys, pack_size: usize) -> Result<Packer> {
        Packer::start_with(store, keys, pack_size, PACKS_PER_INDEX)
    }

    /// [`start`](Self::start) writing an index object every `packs_per_index` packs (1 for
    /// replication: a rerun after a kill then reuses every pack written before it).
    pub fn start_with(
        store: Arc<dyn Store>,
        keys: Keys,
        pack_size: usize,
        packs_per_index: usize,
    ) -> Result<Packer> {
        // Room for a few packs' worth of 64 KiB blobs while one pack is being written.
        let (tx, rx) = bounded::<EncodedBlob>(256);
        let worker = Worker {
            uploads: Uploads::start(store.clone())?,
            store,
            keys,
            pack_size,
            packs_per_index: packs_per_index.max(1),
            builder: PackBuilder::new(),
            pending: IndexFile::default(),
            stats: PackerStats::default(),
        };
        let thread = std::thread::Builder::new()
            .name("vmkeep-packer".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| Error::Internal(format!("spawning the packer: {e}")))?;
        Ok(Packer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn sender(&self) -> Sender<EncodedBlob> {
        self.tx.clone().expect("packer not finished")
    }

    /// Write what is buffered and wait until every pack and index object is stored.
    pub fn finish(mut self) -> Result<PackerStats> {
        self.tx = None;
        self.join()
    }

    fn join(&mut self) -> Result<PackerStats> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| Error::Internal("the packer thread panicked".into()))?,
            None => Err(Error::Internal("packer already finished".into())),
        }
    }

    /// After a send failed: the packer stopped on an error; return it.
    pub fn failure(mut self) -> Error {
        self.tx = None;
        match self.join() {
            Err(e) => e,
            Ok(_) => Error::Internal("the packer stopped without an error".into()),
        }
    }
}

impl Drop for Packer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
