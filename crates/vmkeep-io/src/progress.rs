//! Progress is an observer the caller passes in (the CLI draws bars; tests pass `NoProgress`).

pub trait Progress: Send + Sync {
    /// A new phase begins, e.g. "backup disk vda" with the bytes it will cover (0 = unknown).
    fn phase(&self, _name: &str, _total_bytes: u64) {}
    /// Bytes done in the current phase (may be called from several threads).
    fn advance(&self, _bytes: u64) {}
    /// The current phase ended.
    fn finish_phase(&self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
