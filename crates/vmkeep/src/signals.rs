//! SIGINT and SIGTERM as a request to stop: commands that run until told (`mount`) or that
//! must clean up what they started (`verify`'s sandbox) poll [`STOP`] instead of dying where
//! they stand.
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;

/// Set by SIGINT and SIGTERM once [`stop_on_signals`] ran.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the handlers.
pub fn stop_on_signals() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let r = unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
        if r == libc::SIG_ERR {
            anyhow::bail!(
                "installing the signal handler: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Whether a stop was asked for.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}
