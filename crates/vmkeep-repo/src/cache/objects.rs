//! Cached tree nodes: `objects/tree/<2 hex>/<blob id>` holds a node's stored bytes (sealed and
//! compressed, exactly as in its pack). The caller decodes them with the blob's id, which
//! verifies them, and drops a file that fails. Files are written through a temporary and a
//! rename, so concurrent processes never read a partial one; a hit refreshes the file's time,
//! and [`trim`] removes the least recently used once the folder outgrows its bound.
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use vmkeep_core::BlobId;

use super::Cache;

/// Trim at most this often (the walk costs a stat per cached file).
const TRIM_EVERY: Duration = Duration::from_secs(3600);

fn path(cache: &Cache, id: &BlobId) -> PathBuf {
    let hex = id.to_hex();
    cache.dir.join("objects/tree").join(&hex[..2]).join(hex)
}

/// The stored bytes of a cached tree node, at most `max_len` of them.
pub(crate) fn get(cache: &Cache, id: &BlobId, max_len: u64) -> Option<Vec<u8>> {
    let p = path(cache, id);
    let bytes = super::read_and_touch(&p, max_len)?;
    if bytes.len() as u64 > max_len {
        let _ = std::fs::remove_file(&p);
        return None;
    }
    Some(bytes)
}

/// Keep a node's stored bytes (best effort: a cache that cannot be written is only slower).
pub(crate) fn put(cache: &Cache, id: &BlobId, stored: &[u8]) {
    let p = path(cache, id);
    if let Some(parent) = p.parent() {
        if std::fs::create_dir_all(parent).is_err() {
            return;
        }
    }
    let _ = super::publish(&p, stored);
}

/// A cached node that failed its verification.
pub(crate) fn discard(cache: &Cache, id: &BlobId) {
    tracing::warn!(id = %id, "a cached tree node failed verification; discarded");
    let _ = std::fs::remove_file(path(cache, id));
}

/// Remove the least recently used objects once they exceed the bound (down to 80% of it).
/// Runs at most hourly per cache; call it under the cache lock.
pub(crate) fn trim(cache: &Cache) {
    let stamp = cache.dir.join("trimmed");
    let recent = std::fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < TRIM_EVERY);
    if recent {
        return;
    }
    let _ = std::fs::write(&stamp, b"");
    let mut files = Vec::new();
    let mut total = 0u64;
    let root = cache.dir.join("objects");
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                dirs.push(e.path());
            } else {
                total += m.len();
                let t = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                files.push((t, m.len(), e.path()));
            }
        }
    }
    if total <= cache.max_object_bytes {
        return;
    }
    files.sort();
    let goal = cache.max_object_bytes / 5 * 4;
    for (_, len, p) in files {
        if total <= goal {
            break;
        }
        if std::fs::remove_file(&p).is_ok() {
            total -= len;
        }
    }
}
