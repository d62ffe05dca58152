//! Loading a migration state into a QEMU started with `-incoming defer`.
//!
//! The state never touches a file: a pipe's read end goes to QEMU (`getfd`), `migrate-incoming
//! fd:NAME` starts the load, and a thread copies the source into the write end while we wait
//! for `MIGRATION` `completed` or `failed`. QEMU keeps the runstate the state was saved with
//! (qemu-facts.md §3): a state captured while paused comes up paused, and we `cont` it. Any
//! failure stops QEMU (`quit`, then SIGKILL) before it is reported.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{debug, info};

use super::RunningQemu;
use crate::error::{Error, Result};

/// Name of the state's pipe in QEMU's fd table.
const FD_NAME: &str = "vmkeep-state";
/// Pipe buffer we ask for (the default 64 KiB means a context switch per 64 KiB).
const PIPE_BYTES: libc::c_int = 1 << 20;
/// How long QEMU may take to finish after the whole state was written.
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);

/// What [`RunningQemu::load_state`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Bytes of state streamed into QEMU.
    pub bytes: u64,
    /// From `migrate-incoming` to the VM running.
    pub elapsed: Duration,
    /// The state was captured paused and we resumed it with `cont`.
    pub resumed_by_cont: bool,
}

impl RunningQemu {
    /// Streams `source` (a migration stream as QEMU's `migrate` wrote it) into this QEMU and
    /// leaves the VM running. On error QEMU has been stopped.
    pub fn load_state(&mut self, mut source: impl Read + Send) -> Result<LoadReport> {
        self.load_state_with(move |w| io::copy(&mut source, w))
    }

    /// [`load_state`](Self::load_state) for a producer that writes: `feed` gets the pipe to
    /// QEMU and returns how many bytes it wrote.
    pub fn load_state_with(
        &mut self,
        feed: impl FnOnce(&mut File) -> io::Result<u64> + Send,
    ) -> Result<LoadReport> {
        let started = Instant::now();
        let (read_end, write_end) = pipe().map_err(|e| Error::io("create the state pipe", e))?;
        let setup = self.block_on(async {
            let qmp = self.qmp();
            qmp.migrate_set_capabilities(&[("events", true)]).await?;
            qmp.getfd(FD_NAME, read_end.as_fd()).await
        });
        drop(read_end); // QEMU holds its own copy now
        if let Err(e) = setup {
            return Err(self.fail(format!("cannot hand the state to QEMU: {e}")));
        }

        // Set when the feed failed: the state cannot complete, whatever QEMU does with the
        // early EOF (it may wait without failing the load).
        let feed_failed = std::sync::atomic::AtomicBool::new(false);
        let outcome = std::thread::scope(|scope| {
            let failed = &feed_failed;
            let copier = scope.spawn(move || {
                let mut w = File::from(write_end);
                let r = feed(&mut w);
                if matches!(&r, Err(e) if e.kind() != io::ErrorKind::BrokenPipe) {
                    failed.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                drop(w); // EOF for QEMU
                r
            });
            let waited = self.block_on(self.run_incoming(&copier, &feed_failed));
            if waited.is_err() {
                // QEMU must let go of the pipe before the copier can end.
                self.terminate();
            }
            let copied = copier
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the state copier panicked")));
            (waited, copied)
        });
        let bytes = match outcome {
            (_, Err(e)) if e.kind() != io::ErrorKind::BrokenPipe => {
                return Err(self.fail(format!("reading the state failed: {e}")));
            }
            (Err(what), _) => return Err(self.fail(what)),
            (Ok(()), Ok(n)) => n,
            (Ok(()), Err(e)) => {
                return Err(self.fail(format!("QEMU stopped reading the state: {e}")));
            }
        };

        let resumed_by_cont = match self.resume() {
            Ok(r) => r,
            Err(what) => return Err(self.fail(what)),
        };
        let report = LoadReport {
            bytes,
            elapsed: started.elapsed(),
            resumed_by_cont,
        };
        info!(bytes, elapsed = ?report.elapsed, resumed_by_cont, "state loaded");
        Ok(report)
    }

    /// `migrate-incoming`, then waits for the end of the load; `Err` says why it failed.
    async fn run_incoming(
        &self,
        copier: &std::thread::ScopedJoinHandle<'_, io::Result<u64>>,
        feed_failed: &std::sync::atomic::AtomicBool,
    ) -> std::result::Result<(), String> {
        let qmp = self.qmp();
        let mut events = qmp.events();
        let uri = format!("fd:{FD_NAME}");
        // exit-on-error=false (QEMU >= 9.1) keeps QEMU alive to tell us why a load failed.
        let first = qmp
            .execute(
                "migrate-incoming",
                json!({ "uri": uri, "exit-on-error": false }),
            )
            .await;
        let started = match first {
            Err(e)
                if e.qmp_class() == Some("GenericError")
                    && e.to_string().contains("exit-on-error") =>
            {
                qmp.execute("migrate-incoming", json!({ "uri": uri })).await
            }
            other => other,
        };
        started.map_err(|e| format!("QEMU refused to load the state: {e}"))?;

        let mut copy_done: Option<Instant> = None;
        loop {
            let ev = events
                .wait_for(
                    "MIGRATION",
                    |ev| {
                        matches!(
                            ev.data["status"].as_str(),
                            Some("completed" | "failed" | "cancelled")
                        )
                    },
                    Duration::from_millis(500),
                )
                .await;
            match ev {
                Ok(ev) if ev.data["status"] == "completed" => return Ok(()),
                Ok(_) => {
                    let info = qmp.query_migrate().await.ok();
                    let desc = info
                        .and_then(|i| i.error_desc)
                        .unwrap_or_else(|| "no reason given".into());
                    return Err(format!("loading the state failed: {desc}"));
                }
                Err(Error::Timeout { .. }) => {
                    if feed_failed.load(std::sync::atomic::Ordering::SeqCst) {
                        return Err("the state could not be read to the end".into());
                    }
                    if copier.is_finished() {
                        let since = *copy_done.get_or_insert_with(Instant::now);
                        if since.elapsed() > FINISH_TIMEOUT {
                            return Err(format!(
                                "QEMU did not finish loading the state within {FINISH_TIMEOUT:?} after it was sent"
                            ));
                        }
                    }
                }
                Err(e) => return Err(format!("loading the state failed: {e}")),
            }
        }
    }

    /// `cont` when the state came up paused. Returns whether it did.
    fn resume(&self) -> std::result::Result<bool, String> {
        self.block_on(async {
            let qmp = self.qmp();
            let status = qmp.query_status().await.map_err(|e| e.to_string())?;
            debug!(status = %status.status, "runstate after the load");
            if status.running {
                return Ok(false);
            }
            if status.status != "paused" {
                return Err(format!(
                    "the VM is {} after loading the state, not running or paused",
                    status.status
                ));
            }
            qmp.cont()
                .await
                .map_err(|e| format!("cannot resume the VM: {e}"))?;
            Ok(true)
        })
    }
}

/// A close-on-exec pipe `(read, write)` with a larger buffer.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own; failure just keeps the default size.
    unsafe {
        libc::fcntl(fds[1], libc::F_SETPIPE_SZ, PIPE_BYTES);
    }
    Ok((r, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pipe_passes_bytes() {
        let (r, w) = pipe().unwrap();
        let mut w = File::from(w);
        w.write_all(b"state").unwrap();
        drop(w);
        let mut s = String::new();
        File::from(r).read_to_string(&mut s).unwrap();
        assert_eq!(s, "state");
    }
}
