//! Test instruments: named kill points, always compiled (the real binary is tested with them),
//! and, with the `test-hooks` feature only, callbacks at the instants where concurrency matters.
#[cfg(feature = "test-hooks")]
use std::sync::Arc;

#[cfg(feature = "test-hooks")]
use vmkeep_core::BlobId;

/// Abort the process (as kill -9 would end it: no destructors, no cleanup) when the environment
/// variable `VMKEEP_KILL_AT` names this point, or stop it (SIGSTOP, as a suspended machine or an
/// operator's ^Z would) when `VMKEEP_STOP_AT` names it; a test resumes it with SIGCONT.
/// Points: see docs/FORMAT.md "Crash points".
pub fn kill_point(name: &str) {
    if let Some(v) = std::env::var_os("VMKEEP_KILL_AT") {
        if v == name {
            eprintln!("vmkeep: VMKEEP_KILL_AT={name}: aborting");
            std::process::abort();
        }
    }
    if let Some(v) = std::env::var_os("VMKEEP_STOP_AT") {
        if v == name {
            eprintln!("vmkeep: VMKEEP_STOP_AT={name}: stopping (resume with SIGCONT)");
            // SAFETY: raise(2) with a valid signal number has no memory-safety preconditions.
            unsafe { libc::raise(libc::SIGSTOP) };
        }
    }
}

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
