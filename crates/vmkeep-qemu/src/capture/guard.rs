//! The guard: a small child process that undoes the capture if vmkeep dies mid-capture.
//!
//! vmkeep starts the guard (its own process group, so a Ctrl-C to vmkeep does not reach it)
//! with a pipe on its stdin, and mirrors every line of the undo log to it ([`super::undo`]).
//! The guard inherits the capture's scratch lock, so the next capture leaves the scratch
//! directory alone while either of them lives. A clean finish ends with a `finished` line and
//! the guard exits. If the pipe closes without it, vmkeep is gone, and with it its QMP
//! connection: the guard connects to the monitor and runs the one undo executor over the steps
//! still pending, then removes the scratch directory.
//!
//! The guard is any program that calls [`run_guard`] with the pipe as stdin: the `vmkeep`
//! binary re-executes itself (`backup vm --guard`). crates/vmkeep/tests/capture_guard.rs kills
//! that binary at every capture kill point.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::warn;

use super::executor::{self, Scope};
use super::undo::{Pending, Sink};
use crate::qmp::{QmpClient, QmpOptions};

/// How to start the guard: a program and its arguments (stdin is connected by vmkeep).
#[derive(Clone, Debug)]
pub struct GuardCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// vmkeep's end of the guard.
pub struct Guard {
    child: Child,
    stdin: Arc<Mutex<Option<ChildStdin>>>,
}

/// Writes log lines to the guard's stdin; a guard that went away is logged once.
pub struct GuardSink(Arc<Mutex<Option<ChildStdin>>>);

impl Sink for GuardSink {
    fn line(&mut self, line: &str) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stdin) = g.as_mut() {
            let mut buf = line.as_bytes().to_vec();
            buf.push(b'\n');
            if stdin.write_all(&buf).and_then(|_| stdin.flush()).is_err() {
                warn!("the capture guard went away");
                *g = None;
            }
        }
    }
}

impl Guard {
    /// Starts the guard, handing it `lock_fd` (the scratch lock) to hold while it lives.
    /// None when it cannot start (the capture goes on without it, with a warning).
    pub fn start(cmd: &GuardCommand, lock_fd: i32) -> Option<Guard> {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(&cmd.program);
        command
            .args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0);
        // SAFETY: only async-signal-safe fcntl runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Keep the lock's fd open across exec: the guard holds the lock too.
                if libc::fcntl(lock_fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match command.spawn() {
            Ok(mut child) => {
                let stdin = child.stdin.take();
                Some(Guard {
                    child,
                    stdin: Arc::new(Mutex::new(stdin)),
                })
            }
            Err(e) => {
                warn!(error = %e, "cannot start the capture guard; continuing without it");
                None
            }
        }
    }

    pub fn sink(&self) -> GuardSink {
        GuardSink(self.stdin.clone())
    }

    /// Closes the pipe and waits for the guard (which exits at once after a `finished` line,
    /// or undoes what is pending).
    pub fn finish(mut self) {
        drop(self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take());
        let _ = self.child.wait();
    }
}

/// The guard's main: read log lines from `input` until EOF; undo what is pending unless the
/// capture finished. Returns what it did, for logs and tests.
pub fn run_guard(input: impl BufRead) -> Vec<String> {
    let pending = Pending::from_lines(input.lines().map_while(|l| l.ok()));
    if pending.finished {
        return Vec::new();
    }
    let (mut lines, clean) = if pending.is_empty() {
        (Vec::new(), true) // nothing reached the VM
    } else {
        undo_pending(&pending)
    };
    // After a failure the directory and its log stay for the next capture to finish the undo.
    if let (true, Some(dir)) = (clean, pending.scratch()) {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => lines.push(format!("removed {}", dir.display())),
            Err(e) => lines.push(format!("cannot remove {}: {e}", dir.display())),
        }
    }
    lines
}

/// Connects to the monitor (vmkeep's connection closed with it) and runs the executor.
fn undo_pending(pending: &Pending) -> (Vec<String>, bool) {
    let Some(monitor) = pending.monitor().map(PathBuf::from) else {
        return (vec!["no monitor in the undo log".into()], false);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return (vec![format!("no runtime: {e}")], false),
    };
    rt.block_on(async {
        let opts = QmpOptions {
            greeting_timeout: Duration::from_secs(30),
            ..Default::default()
        };
        let qmp = match QmpClient::connect_with(&monitor, opts).await {
            Ok(q) => q,
            Err(e) => return (vec![format!("cannot connect to QMP: {e}")], false),
        };
        let out = executor::undo(
            &qmp,
            &pending.steps,
            Scope::All {
                committed: pending.committed(),
            },
        )
        .await;
        qmp.close().await;
        (out.lines, out.first_error.is_none())
    })
}
