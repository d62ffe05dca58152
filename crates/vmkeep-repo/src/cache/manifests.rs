//! Cached manifests: `objects/manifest/<snapshot id>` holds the version token the listing gave
//! when it was read, then the manifest's stored bytes. A manifest is rewritten in place by
//! `forget` (its parent and change maps), so a cached copy is used only while the listing
//! shows the same version (S3's ETag; locally inode, time and size): times alone are too
//! coarse (S3 gives seconds). The caller verifies the bytes as it verifies a manifest read
//! from the store, and drops a file that fails. They live beside the tree nodes, so the same
//! least-recently-used trim bounds them (`objects.rs`).
use std::path::PathBuf;

use vmkeep_core::SnapshotId;

use super::Cache;

fn path(cache: &Cache, id: &SnapshotId) -> PathBuf {
    cache.dir.join("objects/manifest").join(id.to_hex())
}

/// The stored bytes of a cached manifest if it was cached at `version` (at most `max_len`).
pub(crate) fn get(cache: &Cache, id: &SnapshotId, version: &str, max_len: u64) -> Option<Vec<u8>> {
    let bound = 1 + vmkeep_store::MAX_VERSION_LEN as u64 + max_len;
    let mut bytes = super::read_and_touch(&path(cache, id), bound)?;
    let n = *bytes.first()? as usize;
    if bytes.len() as u64 > bound || bytes.len() < 1 + n || &bytes[1..1 + n] != version.as_bytes() {
        return None;
    }
    bytes.drain(..1 + n);
    Some(bytes)
}

/// Keep a manifest's stored bytes as listed at `version` (best effort).
pub(crate) fn put(cache: &Cache, id: &SnapshotId, version: &str, stored: &[u8]) {
    if version.len() > vmkeep_store::MAX_VERSION_LEN || version.len() > u8::MAX as usize {
        return;
    }
    let p = path(cache, id);
    if let Some(parent) = p.parent() {
        if std::fs::create_dir_all(parent).is_err() {
            return;
        }
    }
    let mut file = Vec::with_capacity(1 + version.len() + stored.len());
    file.push(version.len() as u8);
    file.extend_from_slice(version.as_bytes());
    file.extend_from_slice(stored);
    let _ = super::publish(&p, &file);
}

/// A cached manifest that failed its verification.
pub(crate) fn discard(cache: &Cache, id: &SnapshotId) {
    tracing::warn!(snapshot = %id, "a cached manifest failed verification; discarded");
    let _ = std::fs::remove_file(path(cache, id));
}
