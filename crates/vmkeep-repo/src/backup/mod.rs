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
mod image;
mod jobs;
mod pipeline;
mod stream;

pub use image::{chunk_runs, probe_image, ImageInfo, RawImage};
pub use jobs::ImageBackupOptions;
pub use pipeline::{DiskReader, ReadPlan};

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::Utc;
use vmkeep_core::manifest::{BackupStats, DiskEntry, Manifest, StreamRecord, MANIFEST_VERSION};
use vmkeep_core::{BlobId, SnapshotId};

use crate::error::{Error, Result};
use crate::hooks::{kill_point, Hooks};
use crate::index::BlobIndex;
use crate::lease::Lease;
use crate::packer::Packer;
use crate::progress::Progress;
use crate::repository::hostname;
use crate::Repository;

/// Which blobs this session may reference without writing them, and which it has claimed.
pub(crate) struct Dedup {
    pub(crate) index: Arc<BlobIndex>,
    claimed: Mutex<HashSet<BlobId>>,
    hooks: Hooks,
}

impl Dedup {
    /// True when the caller must write the blob (first sighting); false when it already exists
    /// in a usable pack or another thread of this session writes it.
    pub fn claim(&self, id: &BlobId) -> bool {
        if self.index.usable(id) {
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
    pub hooks: Hooks,
    /// Ignore earlier restore points when choosing the parent (change maps then cover everything).
    pub no_parent: bool,
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
}

impl Repository {
    pub fn begin_backup(&self, opts: BackupOptions) -> Result<BackupSession<'_>> {
        vmkeep_core::manifest::validate_name("VM name", &opts.vm)?;
        let started = Instant::now();
        let lease = Lease::acquire(self, "backup")?;
        let index = Arc::new(BlobIndex::load(self)?);
        let parent = if opts.no_parent {
            None
        } else {
            self.newest_readable_for_parent(&opts.vm)?
        };
        let packer = Packer::start(
            self.store.clone(),
            self.keys.clone(),
            self.config.pack_size as usize,
        )?;
        let dedup = Arc::new(Dedup {
            index,
            claimed: Mutex::new(HashSet::new()),
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
    pub fn add_disk(
        &mut self,
        name: &str,
        reader: &dyn DiskReader,
        plan: ReadPlan,
        progress: &dyn Progress,
    ) -> Result<&DiskEntry> {
        self.check_new_disk_name(name)?;
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

    /// Commit: write the remaining packs and indexes, flush, then the manifest (commit point).
    pub fn commit(mut self) -> Result<Manifest> {
        if let Some(h) = &self.opts.hooks.before_commit {
            h();
        }
        let packer = self.packer.take().expect("session open");
        let pstats = packer.finish()?;
        kill_point("after-data");
        if self.lease.possibly_expired() {
            self.verify_after_stall()?;
        }
        self.repo.store.flush()?;
        let mut stats = self.stats.clone();
        stats.stored_bytes = pstats.pack_bytes + pstats.index_bytes;
        stats.metadata_bytes = pstats.pack_bytes - pstats.data_blob_bytes + pstats.index_bytes;
        stats.seconds = self.started.elapsed().as_secs_f64();
        let mut m = Manifest {
            version: MANIFEST_VERSION,
            id: SnapshotId::random(),
            vm: self.opts.vm.clone(),
            time: Utc::now(),
            parent: self.parent.as_ref().map(|p| p.id),
            hostname: hostname(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            chunk_size: self.repo.config.chunk_size,
            disks: std::mem::take(&mut self.disks),
            streams: std::mem::take(&mut self.streams),
            stats,
            pause_ms: self.pause_ms,
        };
        // The manifest's own size counts as stored metadata; estimate it before writing.
        let estimate = vmkeep_core::object::seal(
            &self.repo.keys,
            vmkeep_core::object::ObjectKind::Manifest,
            &m.to_json(),
        )
        .len() as u64;
        m.stats.stored_bytes += estimate;
        m.stats.metadata_bytes += estimate;
        kill_point("before-manifest");
        self.repo.write_manifest(&m)?;
        self.repo.store.flush()?;
        kill_point("after-manifest");
        let lease = self.lease;
        if let Err(e) = lease.release() {
            tracing::warn!(error = %e, "could not remove the backup's lease; prune removes it later");
        }
        Ok(m)
    }

    /// The lease may have expired (the process was stopped or the store unreachable for longer
    /// than the lease timeout): a prune may have reclaimed packs this backup reuses. Check every
    /// blob the new restore point references is still in a pack that exists and is not condemned.
    fn verify_after_stall(&self) -> Result<()> {
        tracing::warn!("the backup's lease may have expired; verifying reused data still exists");
        let index = BlobIndex::load(self.repo)?;
        let packs: HashSet<String> = self
            .repo
            .store
            .list(vmkeep_store::Kind::Pack)?
            .into_iter()
            .map(|m| m.key.name)
            .collect();
        let ok = |id: &BlobId| {
            index
                .get(id)
                .is_some_and(|l| !index.is_condemned(&l.pack) && packs.contains(&l.pack.to_hex()))
        };
        let nodes = crate::nodes::RepoNodes {
            repo: self.repo,
            index: &index,
        };
        for d in &self.disks {
            let chunks = d.size.div_ceil(self.repo.config.chunk_size as u64);
            let mut bad = false;
            vmkeep_core::tree::for_each_node(&nodes, &d.root, chunks, &mut |id, _| {
                bad |= !ok(id);
                Ok(())
            })
            .map_err(|_| Error::LeaseLost)?;
            vmkeep_core::tree::for_each_chunk(&nodes, &d.root, chunks, &mut |_, id| {
                bad |= !ok(id);
                Ok(())
            })
            .map_err(|_| Error::LeaseLost)?;
            if bad {
                return Err(Error::LeaseLost);
            }
        }
        for s in &self.streams {
            for id in &s.index {
                if !ok(id) {
                    return Err(Error::LeaseLost);
                }
            }
        }
        Ok(())
    }
}
