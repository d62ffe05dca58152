//! Replication (`vmkeep replicate`): restore points copied from this repository to a replica
//! (`init --replica-of`: same chunking, same key material), sending only the blobs the
//! destination lacks. Plan, then apply.
//!
//! - **Plan**: per VM, the source's restore points newer than the destination's newest of that
//!   VM (all of them when it has none), or with `all` every one it lacks; oldest first. The
//!   outstanding bytes (encoded blobs the destination lacks) are the replication lag.
//! - **Apply**, per restore point: a destination session (lease, blob index, packer: a backup
//!   session without a VM) gets every blob the point references, through the one walker
//!   ([`crate::walk`]), unless it has it; each copied blob is read from its source pack,
//!   decoded and checked against its id (AEAD, length, hash) and then stored as it was
//!   (compressed and sealed: the keys are the same). Then the point's manifest is committed
//!   there, exactly like a backup's (commit point last, parent relinked if the destination lacks
//!   it, the lease's loss checked): it appears only when all it references is stored.
//!
//! Crash story: a kill at any instant leaves at the destination the points committed so far, and
//! packs and index objects without a manifest (prune reclaims them if nothing comes to use
//! them). A rerun plans again and skips every blob the destination has indexed: it sends only
//! the rest: the destination session writes an index object after every pack, so only the
//! blobs of the pack being filled at the kill are sent again.
//! A damaged source blob fails the replication of its restore point; nothing of it is committed.

use std::collections::{HashMap, HashSet};

use vmkeep_core::keys::BlobKind;
use vmkeep_core::manifest::Manifest;
use vmkeep_core::{blob, SnapshotId};

use crate::backup::BackupOptions;
use crate::error::{Error, Result};
use crate::hooks::kill_point;
use crate::index::BlobIndex;
use crate::packer::EncodedBlob;
use crate::progress::Progress;
use crate::walk::Walker;
use crate::Repository;

/// Which restore points to copy.
#[derive(Clone, Debug, Default)]
pub struct ReplicateOptions {
    /// Only this VM.
    pub vm: Option<String>,
    /// Every restore point the destination lacks, not only those newer than its newest.
    pub all: bool,
}

/// What a replication would copy.
#[derive(Clone, Debug, Default)]
pub struct ReplicationPlan {
    /// Source restore points to copy, oldest first.
    pub points: Vec<Manifest>,
    /// Blobs they reference that the destination lacks, and their stored bytes.
    pub blobs_missing: u64,
    pub bytes_missing: u64,
}

/// What a replication did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicationStats {
    pub copied: Vec<SnapshotId>,
    /// Stored bytes of the blobs sent.
    pub bytes_sent: u64,
    pub chunks_sent: u64,
    /// Blobs the destination already had.
    pub chunks_skipped: u64,
}

impl Repository {
    /// Refuses a destination that does not share this repository's chunking and keys.
    fn check_replica(&self, dest: &Repository) -> Result<()> {
        let probe = b"vmkeep replica probe";
        let same_keys = self.keys.blob_id(BlobKind::Data, probe)
            == dest.keys.blob_id(BlobKind::Data, probe)
            && self.config.encrypted == dest.config.encrypted;
        if !same_keys || self.config.chunk_size != dest.config.chunk_size {
            return Err(Error::Invalid {
                what: "replication destination",
                reason: format!(
                    "{} is not a replica of {} (other {}): create it with `vmkeep init \
                     --replica-of {}`",
                    dest.store.location(),
                    self.store.location(),
                    if same_keys { "chunk size" } else { "keys" },
                    self.store.location()
                ),
            });
        }
        Ok(())
    }

    /// The restore points to copy to `dest`, and the bytes it lacks for them.
    pub fn plan_replication(
        &self,
        dest: &Repository,
        opts: &ReplicateOptions,
    ) -> Result<ReplicationPlan> {
        self.check_replica(dest)?;
        let have: Vec<Manifest> = dest.snapshots()?;
        let have_ids: HashSet<SnapshotId> = have.iter().map(|m| m.id).collect();
        let mut newest: HashMap<&str, (chrono::DateTime<chrono::Utc>, SnapshotId)> = HashMap::new();
        for m in &have {
            let e = newest.entry(m.vm.as_str()).or_insert((m.time, m.id));
            if (m.time, m.id) > *e {
                *e = (m.time, m.id);
            }
        }
        let mut points: Vec<Manifest> = self
            .snapshots()?
            .into_iter()
            .filter(|m| opts.vm.as_deref().is_none_or(|v| v == m.vm))
            .filter(|m| !have_ids.contains(&m.id))
            .filter(|m| {
                opts.all
                    || newest
                        .get(m.vm.as_str())
                        .is_none_or(|n| (m.time, m.id) > *n)
            })
            .collect();
        points.sort_by_key(|m| (m.time, m.id));
        let (src_index, dest_index) = (BlobIndex::load(self)?, BlobIndex::load(dest)?);
        let mut walker = Walker::new(self);
        let (mut blobs, mut bytes) = (0u64, 0u64);
        let mut seen = HashSet::new();
        for m in &points {
            walker.walk(&src_index, m, &mut |r| {
                // A chunk can be referenced from several places: counted once.
                if !dest_index.usable(&r.id) && seen.insert(r.id) {
                    blobs += 1;
                    bytes += src_index.get(&r.id).map_or(0, |l| l.length as u64);
                }
                Ok(())
            })?;
        }
        Ok(ReplicationPlan {
            points,
            blobs_missing: blobs,
            bytes_missing: bytes,
        })
    }

    /// Copies the planned restore points to `dest` (see the module docs).
    pub fn replicate(
        &self,
        dest: &Repository,
        plan: &ReplicationPlan,
        progress: &dyn Progress,
    ) -> Result<ReplicationStats> {
        self.check_replica(dest)?;
        let src_index = BlobIndex::load(self)?;
        let mut stats = ReplicationStats::default();
        let mut seen = HashSet::new();
        progress.phase("replicate", plan.bytes_missing);
        for m in &plan.points {
            let mut session = dest.begin_backup(BackupOptions {
                vm: m.vm.clone(),
                no_parent: true,
                index_every_pack: true,
                ..Default::default()
            })?;
            let mut walker = Walker::new(self);
            let mut sent_any = false;
            let walked = walker.walk(&src_index, m, &mut |r| {
                if session.has_blob(&r.id) {
                    if seen.insert(r.id) {
                        stats.chunks_skipped += 1;
                    }
                    return Ok(());
                }
                seen.insert(r.id);
                let loc = src_index
                    .get(&r.id)
                    .ok_or_else(|| Error::BlobMissing { id: r.id.to_hex() })?;
                let stored = self.read_stored_blob(&r.id, &loc)?;
                blob::decode(&self.keys, loc.kind, &r.id, loc.raw_len, &stored).map_err(|e| {
                    Error::corrupt(format!("blob {} of restore point {:#}", r.id, m.id), e)
                })?;
                let len = stored.len() as u64;
                let sent = session.add_encoded(EncodedBlob {
                    kind: loc.kind,
                    id: r.id,
                    raw_len: loc.raw_len,
                    data: stored,
                })?;
                if sent {
                    stats.chunks_sent += 1;
                    stats.bytes_sent += len;
                    progress.advance(len);
                    if !sent_any {
                        sent_any = true;
                        kill_point("replicate-after-first-blob");
                    }
                }
                Ok(())
            });
            if let Err(e) = walked {
                return Err(match e {
                    Error::Internal(ref msg) if msg == crate::backup::PACKER_GONE_MSG => {
                        session.packer_failure()
                    }
                    e => e,
                });
            }
            kill_point("replicate-before-commit");
            session.commit_replica(m.clone()).map_err(|e| match e {
                Error::LeaseLost { .. } => Error::ReplicationStalled,
                e => e,
            })?;
            stats.copied.push(m.id);
            kill_point("replicate-after-commit");
        }
        progress.finish_phase();
        Ok(stats)
    }
}
