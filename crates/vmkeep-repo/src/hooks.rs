//! Test instruments: named kill points (from vmkeep-io, always compiled: the real binary is
//! tested with them) and, with the `test-hooks` feature only, callbacks at the instants where concurrency matters.
#[cfg(feature = "test-hooks")]
use std::sync::Arc;

#[cfg(feature = "test-hooks")]
use vmkeep_core::BlobId;

pub use vmkeep_io::killpoint::kill_point;

/// A callback given the id of a blob.
#[cfg(feature = "test-hooks")]
pub type BlobHook = Arc<dyn Fn(&BlobId) + Send + Sync>;

/// Callbacks for deterministic concurrency tests (feature `test-hooks`, off in the binary).
#[cfg(feature = "test-hooks")]
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called by a backup right after it decided `id` already exists in the repository and will be
    /// referenced without being written again. A test can block here and run prune meanwhile.
    pub after_reuse_decision: Option<BlobHook>,
    /// Called right before a backup writes its manifest.
    pub before_commit: Option<Arc<dyn Fn() + Send + Sync>>,
}

#[cfg(feature = "test-hooks")]
impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooks")
    }
}
