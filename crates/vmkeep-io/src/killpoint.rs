//! Named kill points: the real binary is tested by killing or stopping it at them.

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
