//! Manifests: a restore point. FORMAT.md "Manifests". Stored as JSON inside an object of kind
//! Manifest at `snapshots/<id>`; writing it is the commit point of a backup.
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::changes::ChangeMap;
use crate::error::Result;
use crate::id::{BlobId, SnapshotId};

pub const MANIFEST_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub id: SnapshotId,
    pub vm: String,
    pub time: DateTime<Utc>,
    /// The restore point of the same VM this one was compared against (change maps are relative
    /// to it); None for the first of a VM, or when every earlier one was forgotten.
    pub parent: Option<SnapshotId>,
    pub hostname: String,
    /// vmkeep version that wrote it.
    pub tool_version: String,
    pub chunk_size: u32,
    pub disks: Vec<DiskEntry>,
    #[serde(default)]
    pub streams: Vec<StreamRecord>,
    pub stats: BackupStats,
    /// Milliseconds the VM was paused for the capture (live backups); 0 for images.
    #[serde(default)]
    pub pause_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    /// Device id (or drive id) for live VMs, the user's name for images. [A-Za-z0-9._-]{1,64}
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Root of the disk index tree (ZERO for an all-zero disk).
    pub root: BlobId,
    /// Chunks whose id differs from the parent's disk of the same name; None when the parent had
    /// no such disk (or there is no parent): every chunk counts as changed.
    pub changes: Option<ChangeMap>,
    /// Bytes of non-zero data in this disk (sum of non-zero chunk lengths).
    #[serde(default)]
    pub data_bytes: u64,
    /// Change tracking used: "used" | "rescan" | "none".
    #[serde(default)]
    pub cbt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbt_reason: Option<String>,
    /// QEMU checkpoint (dirty bitmap) started at this restore point, to prove the next backup's
    /// bitmap belongs to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub bitmap: String,
    pub node: String,
    pub granularity: u64,
    /// Identity of the image file or QEMU process the bitmap lives in.
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamRecord {
    /// e.g. "memory", "vm-config"
    pub name: String,
    pub size: u64,
    /// Stream index blobs, in order (see stream.rs).
    pub index: Vec<BlobId>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupStats {
    /// Bytes read from the source.
    pub read_bytes: u64,
    /// Bytes in chunks whose id differs from the parent (the change).
    pub changed_bytes: u64,
    /// Plaintext bytes of blobs new to the repository.
    pub new_bytes: u64,
    /// Bytes those new blobs take in the repository after compression and encryption, plus new
    /// metadata (index nodes, manifest).
    pub stored_bytes: u64,
    /// Of stored_bytes, metadata (tree nodes, index objects, manifest).
    pub metadata_bytes: u64,
    pub chunks_new: u64,
    pub chunks_reused: u64,
    pub seconds: f64,
}

impl Manifest {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serialises")
    }

    /// Validates: version, name syntax, unique disk names, chunk_size a power of two in
    /// [64 KiB, 4 MiB], change maps within each disk's chunk count.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest> {
        todo!()
    }

    /// Number of chunks of a disk of `size` bytes.
    pub fn chunks_of(&self, size: u64) -> u64 {
        size.div_ceil(self.chunk_size as u64)
    }

    pub fn disk(&self, name: &str) -> Option<&DiskEntry> {
        self.disks.iter().find(|d| d.name == name)
    }
}

/// Disk, VM and stream names: 1-64 of [A-Za-z0-9._-], not starting with '.' or '-'.
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    todo!()
}
