//! Backups. A [`BackupSession`] holds a lease, deduplicates against the repository, streams new
//! blobs to the packer, and commits a manifest:
//!
//! 1. lease written, then pending GC records read, then the blob index (this order is what lets
//!    GC reason about which backups might reuse which packs; FORMAT.md "Concurrency and GC");
//! 2. disks (and streams) added: chunks read, hashed, compressed, encrypted in parallel; index
//!    trees built; change maps computed against the parent restore point;
//! 3. `commit`: the packer writes its last pack and index, the store is flushed, then the
//!    manifest is written (the commit point) and flushed again.
//!
//! A crash before step 3's manifest leaves only packs and indexes, which a rerun reuses and
//! prune eventually reclaims if nothing references them.
mod commit;
pub(crate) mod image;
mod jobs;
mod pipeline;
mod source;
mod stream;
mod tracking;

pub use image::{chunk_runs, file_identity, probe_image, ImageInfo, RawImage};
pub use jobs::ImageBackupOptions;
pub(crate) use pipeline::PACKER_GONE as PACKER_GONE_MSG;
pub use pipeline::{DiskReader, ReadPlan};
pub use source::MEMORY_STREAM;

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmkeep_core::manifest::{BackupStats, DiskEntry, Manifest, StreamRecord};
use vmkeep_core::{BlobId, PackId};

use crate::error::{Error, Result};
#[cfg(feature = "test-hooks")]
use crate::hooks::Hooks;
use crate::index::BlobIndex;
use crate::lease::{Lease, LeaseKind};
use crate::packer::Packer;
use crate::packlist::PackTracker;
use crate::progress::Progress;
use crate::Repository;

/// Which blobs this session may reference without writing them, and which it has claimed.
pub(crate) struct Dedup {
    pub(crate) index: Arc<BlobIndex>,
    claimed: Mutex<HashSet<BlobId>>,
    /// Packs of the stored blobs referenced, when the repository keeps pack lists.
    pub(crate) packs: Option<PackTracker>,
    #[cfg(feature = "test-hooks")]
    hooks: Hooks,
}

impl Dedup {
    /// True when the caller must write the blob (first sighting); false when it already exists
    /// in a usable pack or another thread of this session writes it.
    pub fn claim(&self, id: &BlobId) -> bool {
        if let Some(loc) = self.index.usable_location(id) {
            if let Some(t) = &self.packs {
                t.note(loc.pack);
            }
            #[cfg(feature = "test-hooks")]
            if let Some(h) = &self.hooks.after_reuse_decision {
                h(id);
            }
            return false;
        }
        self.claimed.lock().unwrap().insert(*id)
    }
}

#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    pub vm: String,
    #[cfg(feature = "test-hooks")]
    pub hooks: Hooks,
    /// Ignore earlier restore points when choosing the parent (change maps then cover everything).
    pub no_parent: bool,
    /// An index object after every pack, not every 8 (replication: a rerun after a kill reuses
    /// every pack written before it).
    pub index_every_pack: bool,
}

pub struct BackupSession<'r> {
    repo: &'r Repository,
    lease: Lease,
    dedup: Arc<Dedup>,
    packer: Option<Packer>,
    parent: Option<Manifest>,
    opts: BackupOptions,
    disks: Vec<DiskEntry>,
    streams: Vec<StreamRecord>,
    stats: BackupStats,
    started: Instant,
    pause_ms: u64,
    /// The parent's pack list (repositories that keep them): None without a parent, or when
    /// the parent has none (the commit then walks the new restore point).
    parent_packs: Option<BTreeSet<PackId>>,
}

impl Repository {
    pub fn begin_backup(&self, opts: BackupOptions) -> Result<BackupSession<'_>> {
        vmkeep_core::manifest::validate_name("VM name", &opts.vm)?;
        let started = Instant::now();
        let lease = Lease::acquire(self, LeaseKind::Backup)?;
        let index = Arc::new(BlobIndex::load(self)?);
        let parent = if opts.no_parent {
            None
        } else {
            self.newest_readable_for_parent(&opts.vm)?
        };
        let packer = Packer::start_with(
            self.store.clone(),
            self.keys.clone(),
            self.config.pack_size as usize,
            if opts.index_every_pack {
                1
            } else {
                crate::packer::PACKS_PER_INDEX
            },
        )?;
        let keeps_lists = self.keeps_pack_lists()?;
        let parent_packs = match (&parent, keeps_lists) {
            (Some(p), true) => self.load_pack_list(&p.id).ok().flatten().map(|l| l.packs),
            _ => None,
        };
        let dedup = Arc::new(Dedup {
            index,
            claimed: Mutex::new(HashSet::new()),
            packs: keeps_lists.then(PackTracker::default),
            #[cfg(feature = "test-hooks")]
            hooks: opts.hooks.clone(),
        });
        Ok(BackupSession {
            repo: self,
            lease,
            dedup,
            packer: Some(packer),
            parent,
            opts,
            disks: Vec::new(),
            streams: Vec::new(),
            stats: BackupStats::default(),
            started,
            pause_ms: 0,
            parent_packs,
        })
    }
}

impl<'r> BackupSession<'r> {
    pub fn parent(&self) -> Option<&Manifest> {
        self.parent.as_ref()
    }

    pub fn repository(&self) -> &'r Repository {
        self.repo
    }

    /// Stores a blob copied as it is (already compressed and sealed with this repository's
    /// keys) unless this repository has it or this session already sent it. Returns whether
    /// it was sent. The caller has verified it against its id.
    pub(crate) fn add_encoded(&self, blob: crate::packer::EncodedBlob) -> Result<bool> {
        if !self.dedup.claim(&blob.id) {
            return Ok(false);
        }
        let tx = self.packer.as_ref().expect("session open").sender();
        tx.send(blob)
            .map_err(|_| Error::Internal(pipeline::PACKER_GONE.into()))?;
        Ok(true)
    }

    /// Why the packer stopped (after a send failed with the packer gone).
    pub(crate) fn packer_failure(&mut self) -> Error {
        match self.packer.take() {
            Some(p) => p.failure(),
            None => Error::Internal(pipeline::PACKER_GONE.into()),
        }
    }

    /// Whether this repository (as loaded at the session's start) or this session has `id`.
    pub(crate) fn has_blob(&self, id: &BlobId) -> bool {
        if let Some(loc) = self.dedup.index.usable_location(id) {
            if let Some(t) = &self.dedup.packs {
                t.note(loc.pack);
            }
            return true;
        }
        self.dedup.claimed.lock().unwrap().contains(id)
    }

    pub fn set_pause_ms(&mut self, ms: u64) {
        self.pause_ms = ms;
    }

    pub fn stats(&self) -> &BackupStats {
        &self.stats
    }

    fn check_new_disk_name(&self, name: &str) -> Result<()> {
        vmkeep_core::manifest::validate_name("disk name", name)?;
        if self.disks.iter().any(|d| d.name == name) {
            return Err(Error::Invalid {
                what: "disk name",
                reason: format!("{name:?} given twice"),
            });
        }
        Ok(())
    }

    /// Back up one disk: read the chunks `plan` lists from `reader`, keep the rest from
    /// `plan.base` (zeros when None). Returns the disk's entry as it will appear in the manifest.
    /// A `used` plan the disk's allocation contradicts becomes a rescan (see [`tracking`]).
    pub fn add_disk(
        &mut self,
        name: &str,
        reader: &dyn DiskReader,
        plan: ReadPlan,
        progress: &dyn Progress,
    ) -> Result<&DiskEntry> {
        self.check_new_disk_name(name)?;
        let plan =
            tracking::check_used_plan(self.repo, &self.dedup.index, name, plan, reader.size())?;
        let packer = self.packer.as_ref().expect("session open");
        let out = pipeline::run(
            self.repo,
            &self.dedup,
            packer,
            name,
            reader,
            &plan,
            self.parent.as_ref(),
            progress,
        );
        let out = match out {
            Ok(o) => o,
            Err(Error::Internal(msg)) if msg == pipeline::PACKER_GONE => {
                return Err(self.packer.take().expect("session open").failure());
            }
            Err(e) => return Err(e),
        };
        self.stats.read_bytes += out.read_bytes;
        self.stats.changed_bytes += out.changed_bytes;
        self.stats.new_bytes += out.new_bytes;
        self.stats.chunks_new += out.chunks_new;
        self.stats.chunks_reused += out.chunks_reused;
        self.disks.push(out.entry);
        Ok(self.disks.last().expect("just pushed"))
    }
}
