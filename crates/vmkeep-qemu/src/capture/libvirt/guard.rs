//! The guard of a libvirt capture: if vmkeep dies, it ends the backup job vmkeep started and
//! deletes the checkpoint no restore point recorded.
//!
//! The same child process as the QMP guard ([`crate::capture::guard`]: its own process group,
//! a pipe on stdin, the scratch lock inherited), speaking its own lines, since libvirt, not
//! vmkeep, holds the monitor. Without a `finished` line before the pipe closes, the guard:
//! - ends the job (`virsh domjobabort`) if the job running is still the one whose NBD socket is
//!   in this capture's scratch directory;
//! - with `--memory`, puts back what the memory capture changed: cancels the snapshot, resumes
//!   the domain it suspended, restores the migration capabilities and bandwidth
//!   ([`super::memory::undo`]);
//! - deletes the new checkpoint unless the restore point was committed (then the checkpoint is
//!   what the next backup starts from);
//! - removes the scratch directory.
//!
//! If the guard dies too, the next capture finds the job by its socket in a scratch directory
//! whose lock is free, and aborts it; a checkpoint left behind is deleted with the chain's other
//! old checkpoints after the next commit.

use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use super::memory::{self, MemoryUndo};
use super::session::delete_checkpoint;
use super::virsh::Virsh;
use super::xml;

/// One line of the pipe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardLine {
    Scratch(PathBuf),
    /// The job about to start, by its NBD socket.
    Job(PathBuf),
    JobEnded,
    /// The checkpoint about to be created.
    Checkpoint(String),
    Committed,
    /// What the memory capture has left to put back (the whole state, each time it changes).
    Memory(MemoryUndo),
    Finished,
}

impl fmt::Display for GuardLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuardLine::Scratch(p) => write!(f, "scratch {}", p.display()),
            GuardLine::Job(p) => write!(f, "job {}", p.display()),
            GuardLine::JobEnded => f.write_str("job-ended"),
            GuardLine::Checkpoint(c) => write!(f, "checkpoint {c}"),
            GuardLine::Committed => f.write_str("committed"),
            GuardLine::Memory(m) => write!(
                f,
                "memory {}",
                serde_json::to_string(m).map_err(|_| fmt::Error)?
            ),
            GuardLine::Finished => f.write_str("finished"),
        }
    }
}

impl GuardLine {
    pub fn parse(line: &str) -> Option<GuardLine> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        Some(match word {
            "scratch" => GuardLine::Scratch(PathBuf::from(rest)),
            "job" => GuardLine::Job(PathBuf::from(rest)),
            "job-ended" => GuardLine::JobEnded,
            "checkpoint" => GuardLine::Checkpoint(rest.to_string()),
            "committed" => GuardLine::Committed,
            "memory" => GuardLine::Memory(serde_json::from_str(rest).ok()?),
            "finished" => GuardLine::Finished,
            _ => return None,
        })
    }
}

/// What is left to undo after the lines read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pending {
    pub scratch: Option<PathBuf>,
    pub job: Option<PathBuf>,
    pub checkpoint: Option<String>,
    pub memory: MemoryUndo,
    pub finished: bool,
}

impl Pending {
    pub fn from_lines(lines: impl Iterator<Item = String>) -> Pending {
        let mut p = Pending::default();
        for l in lines {
            match GuardLine::parse(&l) {
                Some(GuardLine::Scratch(d)) => p.scratch = Some(d),
                Some(GuardLine::Job(s)) => p.job = Some(s),
                Some(GuardLine::JobEnded) => p.job = None,
                Some(GuardLine::Checkpoint(c)) => p.checkpoint = Some(c),
                Some(GuardLine::Committed) => p.checkpoint = None,
                Some(GuardLine::Memory(m)) => p.memory = m,
                Some(GuardLine::Finished) => p.finished = true,
                None => {}
            }
        }
        p
    }
}

/// The guard's main, for the domain `virsh` names: reads `input` to its end, then undoes what
/// is pending. Returns what it did.
pub fn run_guard(virsh: &Virsh, input: impl BufRead) -> Vec<String> {
    let mut pending = Pending::from_lines(input.lines().map_while(|l| l.ok()));
    let mut done = Vec::new();
    if pending.finished {
        return done;
    }
    // The guest's pause first.
    done.extend(memory::undo(virsh, &mut pending.memory));
    if let Some(socket) = &pending.job {
        if job_socket(virsh).as_deref() == Some(socket.as_path()) {
            match virsh.domain_cmd("domjobabort", &[]) {
                Ok(_) => done.push(format!("ended libvirt's backup job of {}", virsh.domain)),
                Err(e) => done.push(format!("cannot end the backup job: {e}")),
            }
        }
    }
    if let Some(c) = &pending.checkpoint {
        delete_checkpoint(virsh, c);
        done.push(format!("deleted checkpoint {c} (if it was created)"));
    }
    if let Some(dir) = &pending.scratch {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => done.push(format!("removed {}", dir.display())),
            Err(e) => done.push(format!("cannot remove {}: {e}", dir.display())),
        }
    }
    done
}

/// The NBD socket of the domain's running backup job, if any.
fn job_socket(virsh: &Virsh) -> Option<PathBuf> {
    let x = virsh.domain_cmd("backup-dumpxml", &[]).ok()?;
    xml::parse_backup_job(&x)
        .ok()?
        .socket
        .map(|s| Path::new(&s).to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_settle_what_is_pending() {
        let lines = [
            GuardLine::Scratch("/tmp/vmkeep-capture-x".into()),
            GuardLine::Job("/tmp/vmkeep-capture-x/nbd.sock".into()),
            GuardLine::Checkpoint("vmkeep-c-x".into()),
            GuardLine::Memory(MemoryUndo {
                suspended: true,
                ..Default::default()
            }),
        ];
        for l in &lines {
            assert_eq!(GuardLine::parse(&l.to_string()).as_ref(), Some(l));
        }
        let text = |ls: &[GuardLine]| ls.iter().map(|l| l.to_string()).collect::<Vec<_>>();
        let p = Pending::from_lines(text(&lines).into_iter());
        assert_eq!(
            p.job.as_deref(),
            Some(Path::new("/tmp/vmkeep-capture-x/nbd.sock"))
        );
        assert_eq!(p.checkpoint.as_deref(), Some("vmkeep-c-x"));
        assert!(p.memory.suspended);
        let mut later = lines.to_vec();
        later.extend([GuardLine::JobEnded, GuardLine::Committed]);
        let p = Pending::from_lines(text(&later).into_iter());
        assert_eq!((p.job, p.checkpoint, p.finished), (None, None, false));
        later.push(GuardLine::Finished);
        assert!(Pending::from_lines(text(&later).into_iter()).finished);
    }
}
