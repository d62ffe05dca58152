//! The capture's undo log: every step that changes the VM appends a typed record BEFORE it
//! happens, and one executor ([`super::executor`]) undoes them, whether called by vmkeep on an
//! error, by the guard after vmkeep died, or by the next capture finding the log of a dead one.
//!
//! Undoing a step that did not happen fails harmlessly (a node that does not exist cannot be
//! deleted), so "record, then act" is always safe; the one exception is stopping an NBD
//! server, which is recorded only after our `nbd-server-start` succeeded, so a server someone
//! else started is never stopped by us.
//!
//! The log is a file of JSON lines in the capture's private scratch directory (`undo.log`),
//! mirrored line by line to the guard's stdin. A step undone (or finished) is marked with a
//! `done` line naming its sequence number, so nothing is undone twice.

use std::fs::File;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

/// One step that changed the VM, and what undoes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "undo", rename_all = "kebab-case")]
pub enum Undo {
    /// Which monitor the log is about, and the capture's scratch directory (first record of
    /// every log; nothing to undo).
    Monitor {
        qmp: PathBuf,
        #[serde(default)]
        scratch: Option<PathBuf>,
    },
    /// We stopped a running VM: `cont`. Undone before anything else.
    Resume,
    /// We froze the guest's filesystems: thaw through the agent. Undone before anything else.
    Thaw { agent: PathBuf },
    /// A node we added: `blockdev-del`.
    DeleteNode { node: String },
    /// An fd set we created with `add-fd`: `remove-fd`.
    RemoveFdset { fdset: u64 },
    /// An fd we passed with `getfd`: `closefd`.
    CloseFd { name: String },
    /// A device whose drive we pointed at our filter: point it back at `node`.
    Reattach { qdev: String, node: String },
    /// The cut's bitmap operations on one disk: `new` added (recording), `previous` disabled.
    /// Before the commit: `previous` takes `new`'s writes and records again (only if it was
    /// recording before the cut), `new` goes. After the commit: `previous` and every other
    /// vmkeep bitmap but `new` go.
    Bitmaps {
        node: String,
        new: String,
        previous: Option<String>,
        previous_recording: bool,
    },
    /// Our NBD server (recorded after it started): `nbd-server-stop`.
    StopNbdServer,
    /// An export we added: `block-export-del`, then wait for `BLOCK_EXPORT_DELETED`.
    DeleteExport { id: String },
    /// A migration we started: `migrate_cancel`, then wait until it is no longer active.
    CancelMigration,
    /// Migration capabilities as they were before we set ours.
    RestoreMigrationCaps { caps: Vec<(String, bool)> },
    /// QEMU's migration bandwidth limit (`max-bandwidth`, bytes/s) as it was before ours.
    RestoreMigrationBandwidth { max_bandwidth: u64 },
    /// The restore point was committed: bitmaps retire instead of reverting.
    Committed,
}

impl Undo {
    /// Steps that give the guest back its CPU or its filesystems: undone first.
    pub fn is_urgent(&self) -> bool {
        matches!(self, Undo::Resume | Undo::Thaw { .. })
    }
}

/// One line of the log.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    Step {
        seq: u64,
        step: Undo,
    },
    Done {
        done: u64,
    },
    /// The capture ended cleanly: nothing is left to undo.
    Finished {
        finished: bool,
    },
}

/// The records of a log not yet undone, in order, and whether the capture finished.
#[derive(Clone, Debug, Default)]
pub struct Pending {
    pub steps: Vec<(u64, Undo)>,
    pub finished: bool,
}

impl Pending {
    /// Replays log lines (unknown or torn lines are skipped: a torn last line is a step
    /// that never happened).
    pub fn from_lines<I: IntoIterator<Item = String>>(lines: I) -> Pending {
        let mut p = Pending::default();
        for line in lines {
            match serde_json::from_str::<Line>(&line) {
                Ok(Line::Step { seq, step }) => p.steps.push((seq, step)),
                Ok(Line::Done { done }) => p.steps.retain(|(s, _)| *s != done),
                Ok(Line::Finished { finished }) => p.finished |= finished,
                Err(_) => {}
            }
        }
        p
    }

    pub fn read(path: &Path) -> std::io::Result<Pending> {
        let f = File::open(path)?;
        let lines = std::io::BufReader::new(f).lines().map_while(|l| l.ok());
        Ok(Pending::from_lines(lines))
    }

    pub fn scratch(&self) -> Option<&Path> {
        self.steps.iter().find_map(|(_, s)| match s {
            Undo::Monitor { scratch, .. } => scratch.as_deref(),
            _ => None,
        })
    }

    pub fn committed(&self) -> bool {
        self.steps.iter().any(|(_, s)| *s == Undo::Committed)
    }

    pub fn monitor(&self) -> Option<&Path> {
        self.steps.iter().find_map(|(_, s)| match s {
            Undo::Monitor { qmp, .. } => Some(qmp.as_path()),
            _ => None,
        })
    }

    /// Nothing left that touches the VM.
    pub fn is_empty(&self) -> bool {
        self.finished
            || self
                .steps
                .iter()
                .all(|(_, s)| matches!(s, Undo::Monitor { .. } | Undo::Committed))
    }
}

/// Where log lines go besides the in-memory list: the log file and the guard.
pub trait Sink: Send {
    fn line(&mut self, line: &str);
}

/// The live log of a running capture.
pub struct UndoLog {
    next: u64,
    pending: Vec<(u64, Undo)>,
    file: Option<File>,
    path: Option<PathBuf>,
    sinks: Vec<Box<dyn Sink>>,
}

impl UndoLog {
    /// A log kept in memory only (tests, and captures without a scratch directory).
    pub fn in_memory() -> UndoLog {
        UndoLog {
            next: 1,
            pending: Vec::new(),
            file: None,
            path: None,
            sinks: Vec::new(),
        }
    }

    /// A log written to `path` (created; must not exist).
    pub fn create(path: &Path) -> std::io::Result<UndoLog> {
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(path)?;
        Ok(UndoLog {
            file: Some(file),
            path: Some(path.to_path_buf()),
            ..UndoLog::in_memory()
        })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Mirrors every line (those already written, then new ones) to `sink`.
    pub fn add_sink(&mut self, mut sink: Box<dyn Sink>) {
        for (seq, step) in &self.pending {
            sink.line(&encode(&Line::Step {
                seq: *seq,
                step: step.clone(),
            }));
        }
        self.sinks.push(sink);
    }

    /// Records `step` before it happens; returns its sequence number.
    pub fn record(&mut self, step: Undo) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.write(&Line::Step {
            seq,
            step: step.clone(),
        });
        self.pending.push((seq, step));
        // Tests stop the capture after any prefix of its steps (the step recorded, not done).
        vmkeep_io::kill_point(&format!("undo-step-{seq}"));
        seq
    }

    /// The step `seq` was undone or is no longer needed.
    pub fn done(&mut self, seq: u64) {
        if let Some(i) = self.pending.iter().position(|(s, _)| *s == seq) {
            self.pending.remove(i);
            self.write(&Line::Done { done: seq });
        }
    }

    /// The capture ended: nothing left to undo.
    pub fn finished(&mut self) {
        self.pending.clear();
        self.write(&Line::Finished { finished: true });
    }

    pub fn pending(&self) -> &[(u64, Undo)] {
        &self.pending
    }

    fn write(&mut self, line: &Line) {
        let text = encode(line);
        if let Some(f) = &mut self.file {
            // No fsync: the log must survive the death of vmkeep (the page cache does), not of
            // the host (QEMU dies with it, taking every change the log describes).
            let mut buf = text.clone().into_bytes();
            buf.push(b'\n');
            if let Err(e) = f.write_all(&buf) {
                warn!(error = %e, "cannot append to the capture's undo log");
            }
        }
        for s in &mut self.sinks {
            s.line(&text);
        }
    }
}

fn encode(line: &Line) -> String {
    serde_json::to_string(line).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_skips_done_and_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("undo.log");
        let mut log = UndoLog::create(&path).unwrap();
        log.record(Undo::Monitor {
            qmp: "/q".into(),
            scratch: None,
        });
        let a = log.record(Undo::DeleteNode { node: "a".into() });
        log.record(Undo::Resume);
        log.done(a);
        drop(log);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"seq\":9,\"step\":{\"undo\":\"delete-n")
            .unwrap();
        let p = Pending::read(&path).unwrap();
        assert_eq!(p.monitor(), Some(Path::new("/q")));
        assert_eq!(
            p.steps.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>(),
            vec![
                Undo::Monitor {
                    qmp: "/q".into(),
                    scratch: None
                },
                Undo::Resume
            ]
        );
        assert!(!p.is_empty() && !p.committed() && !p.finished);
    }

    #[test]
    fn finished_log_is_empty() {
        let p = Pending::from_lines(vec![
            r#"{"seq":1,"step":{"undo":"resume"}}"#.to_string(),
            r#"{"finished":true}"#.to_string(),
        ]);
        assert!(p.is_empty());
    }
}
