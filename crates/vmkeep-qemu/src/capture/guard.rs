//! The guard: a small child process that puts the VM back if vmkeep dies mid-capture.
//!
//! vmkeep starts the guard (its own process group, so a Ctrl-C to vmkeep does not reach it)
//! with a pipe on its stdin and writes one JSON line per step: what it stopped, added, cut and
//! committed. A clean finish ends with `{"done":true}` and the guard exits. If the pipe closes
//! without it, vmkeep is gone: its QMP connection closed with it, so the guard connects to the
//! monitor and undoes the capture: `cont` if vmkeep had stopped the VM, exports, fleecing jobs,
//! scratch nodes and the NBD server removed, and the bitmaps put back (the consumed previous
//! checkpoint re-enabled with the new writes merged in; after a commit only the consumed
//! previous bitmap is removed). The next backup then still uses change tracking.
//!
//! The guard is any program that calls [`run_guard`] with the pipe as stdin: the `vmkeep`
//! binary re-executes itself (`backup vm --guard`). crates/vmkeep/tests/capture_guard.rs kills
//! that binary at every capture kill point.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::warn;

use super::fleece::FleeceDisk;
use crate::qmp::{BitmapRef, QmpClient, QmpOptions, TransactionAction};

/// How to start the guard: a program and its arguments (stdin is connected by vmkeep).
#[derive(Clone, Debug)]
pub struct GuardCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// One step vmkeep reports to its guard.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GuardState {
    pub qmp: PathBuf,
    pub stopped: bool,
    pub resumed: bool,
    pub nodes: Vec<String>,
    pub jobs: Vec<String>,
    pub exports: Vec<String>,
    pub nbd: bool,
    pub cut: bool,
    pub bitmaps: Vec<GuardBitmaps>,
    pub committed: bool,
    pub done: bool,
    /// The guest agent's socket, and whether the guest was (about to be) frozen / thawed.
    pub agent: Option<PathBuf>,
    pub frozen: bool,
    pub thawed: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GuardBitmaps {
    pub node: String,
    pub new: String,
    pub previous: Option<String>,
}

impl GuardBitmaps {
    pub fn of(disks: &[FleeceDisk]) -> Vec<GuardBitmaps> {
        disks
            .iter()
            .map(|d| GuardBitmaps {
                node: d.root.clone(),
                new: d.new_bitmap.clone(),
                previous: d.previous.clone(),
            })
            .collect()
    }
}

/// vmkeep's end of the guard. Without a guard command every report is a no-op.
pub struct Guard {
    child: Option<(Child, ChildStdin)>,
    pub state: GuardState,
}

impl Guard {
    pub fn start(cmd: Option<&GuardCommand>, qmp: PathBuf) -> Guard {
        let state = GuardState {
            qmp,
            ..Default::default()
        };
        let child = cmd.and_then(|c| {
            use std::os::unix::process::CommandExt;
            let mut command = Command::new(&c.program);
            command
                .args(&c.args)
                .envs(c.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .process_group(0);
            match command.spawn() {
                Ok(mut ch) => {
                    let stdin = ch.stdin.take().expect("piped stdin");
                    Some((ch, stdin))
                }
                Err(e) => {
                    warn!(error = %e, "cannot start the capture guard; continuing without it");
                    None
                }
            }
        });
        let mut g = Guard { child, state };
        g.report();
        g
    }

    /// Sends the current state (one JSON line).
    pub fn report(&mut self) {
        if let Some((_, stdin)) = &mut self.child {
            let mut line = serde_json::to_vec(&self.state).unwrap_or_default();
            line.push(b'\n');
            if stdin.write_all(&line).and_then(|_| stdin.flush()).is_err() {
                warn!("the capture guard went away");
                self.child = None;
            }
        }
    }

    /// Clean finish: the guard exits without touching the VM.
    pub fn finish(mut self) {
        self.state.done = true;
        self.report();
        if let Some((mut ch, stdin)) = self.child.take() {
            drop(stdin);
            let _ = ch.wait();
        }
    }
}

/// The guard's main: read states from `input` until EOF; undo the capture unless told `done`.
/// Returns what it did, for logs and tests.
pub fn run_guard(input: impl BufRead) -> Vec<String> {
    let mut state: Option<GuardState> = None;
    for line in input.lines() {
        let Ok(line) = line else { break };
        if let Ok(s) = serde_json::from_str::<GuardState>(&line) {
            if s.done {
                return Vec::new();
            }
            state = Some(s);
        }
    }
    match state {
        Some(s) => undo(&s),
        None => Vec::new(),
    }
}

fn undo(s: &GuardState) -> Vec<String> {
    let mut log = Vec::new();
    let nothing = !s.stopped && s.nodes.is_empty() && !s.cut && !s.nbd && !s.frozen;
    if nothing {
        return log;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return vec![format!("no runtime: {e}")],
    };
    rt.block_on(async {
        let opts = QmpOptions {
            greeting_timeout: Duration::from_secs(30),
            ..Default::default()
        };
        let qmp = match QmpClient::connect_with(&s.qmp, opts).await {
            Ok(q) => q,
            Err(e) => {
                log.push(format!("cannot connect to QMP: {e}"));
                return;
            }
        };
        let mut step = |what: String, r: crate::Result<()>| match r {
            Ok(()) => log.push(what),
            Err(e) => log.push(format!("{what}: {e}")),
        };
        if s.stopped && !s.resumed {
            step("cont".into(), qmp.cont().await);
        }
        if let (true, false, Some(path)) = (s.frozen, s.thawed, &s.agent) {
            let r = match super::agent::Agent::connect(path, Duration::from_secs(10)).await {
                Ok(mut a) => a.thaw().await.map(drop),
                Err(e) => Err(e),
            };
            step("guest-fsfreeze-thaw".into(), r);
        }
        for id in &s.exports {
            let r = qmp
                .execute("block-export-del", json!({"id": id, "mode": "hard"}))
                .await
                .map(drop);
            step(format!("block-export-del {id}"), r);
        }
        if !s.exports.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for job in &s.jobs {
            let mut ev = qmp.events();
            let r = qmp.block_job_cancel(job, true).await;
            let ok = r.is_ok();
            step(format!("block-job-cancel {job}"), r);
            if ok {
                let _ = ev
                    .wait_for(
                        "BLOCK_JOB_CANCELLED",
                        |e| e.data["device"] == job.as_str(),
                        Duration::from_secs(30),
                    )
                    .await;
            }
        }
        for node in &s.nodes {
            step(format!("blockdev-del {node}"), qmp.blockdev_del(node).await);
        }
        if s.nbd {
            step("nbd-server-stop".into(), qmp.nbd_server_stop().await);
        }
        if s.cut {
            for b in &s.bitmaps {
                let r = if s.committed {
                    match &b.previous {
                        Some(p) => qmp.block_dirty_bitmap_remove(&b.node, p).await,
                        None => Ok(()),
                    }
                } else {
                    match &b.previous {
                        Some(p) => {
                            qmp.transaction(&[
                                TransactionAction::BlockDirtyBitmapMerge {
                                    node: b.node.clone(),
                                    target: p.clone(),
                                    bitmaps: vec![BitmapRef::name(&b.new)],
                                },
                                TransactionAction::BlockDirtyBitmapEnable {
                                    node: b.node.clone(),
                                    name: p.clone(),
                                },
                                TransactionAction::BlockDirtyBitmapRemove {
                                    node: b.node.clone(),
                                    name: b.new.clone(),
                                },
                            ])
                            .await
                        }
                        None => qmp.block_dirty_bitmap_remove(&b.node, &b.new).await,
                    }
                };
                step(format!("bitmaps of {}", b.node), r);
            }
        }
        qmp.close().await;
    });
    log
}
