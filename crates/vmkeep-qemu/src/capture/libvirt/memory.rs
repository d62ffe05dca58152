//! `--memory` for a libvirt domain: RAM and device state at the instant of the disks, through
//! libvirt's QEMU monitor passthrough ([`super::monitor`]), since libvirt has no API for a
//! background snapshot (its own memory snapshots stop the guest for the whole write, or move
//! the instant to the end of a pre-copy migration).
//!
//! The order, each step announced to the guard first ([`MemoryUndo`] in a `memory` line):
//! 1. prepare (before the cut): no migration may be running; background-snapshot on and every
//!    incompatible capability off (the old set recorded), bandwidth unlimited, the write end
//!    of vmkeep's pipe handed to QEMU (`getfd` with `--pass-fds`);
//! 2. `virsh suspend`, so libvirt knows the domain is paused;
//! 3. the disks' instant (`backup-begin`, see the session) while the vCPUs stand still;
//! 4. `migrate fd:NAME`, and wait until QEMU iterates RAM (only then are devices saved and RAM
//!    write-protected);
//! 5. `virsh resume`: the pause is these milliseconds;
//! 6. after the stream's end: the migration must be `completed`; capabilities and bandwidth
//!    are put back.
//!
//! QEMU under libvirt runs as an unprivileged user, and the kernel gives such a process
//! userfaultfd (which a background snapshot write-protects RAM with) only when
//! `vm.unprivileged_userfaultfd` is 1; otherwise QEMU answers "Background-snapshot is not
//! supported by host kernel", and the capture refuses with that advice before any change.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::warn;

use super::monitor::Monitor;
use super::virsh::Virsh;
use crate::capture::cut::{
    background_snapshot_caps, parse_capabilities, ram_iterating, refuse_running_migration,
    UNLIMITED_BANDWIDTH,
};
use crate::capture::scratch;
use crate::error::{Error, Result};

/// How long QEMU may take to start iterating RAM once the migration is started.
const RAM_ITERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// What is left to put back; sent to the guard whole whenever it changes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUndo {
    /// The migration capabilities before the capture.
    pub caps: Option<Vec<(String, bool)>>,
    /// The migration bandwidth before the capture.
    pub bandwidth: Option<u64>,
    /// The pipe's name in QEMU, until the migration takes it.
    pub fd: Option<String>,
    /// vmkeep suspended the domain and has not resumed it.
    pub suspended: bool,
    /// The migration was started and has not ended.
    pub migration: bool,
}

impl MemoryUndo {
    pub fn is_empty(&self) -> bool {
        *self == MemoryUndo::default()
    }
}

/// The file in a capture's scratch directory holding its [`MemoryUndo`] (with the domain's
/// UUID): if vmkeep and its guard both die, the next capture of the domain puts back what it
/// says ([`settle_dead`]).
pub const UNDO_FILE: &str = "memory-undo.json";

#[derive(Serialize, Deserialize)]
struct Recorded {
    uuid: String,
    undo: MemoryUndo,
}

/// Records `state` in `dir` (replaced whole by a rename; best effort, the guard is the first
/// line of defence).
pub fn save(dir: &Path, uuid: &str, state: &MemoryUndo) {
    let rec = Recorded {
        uuid: uuid.to_string(),
        undo: state.clone(),
    };
    let tmp = dir.join(format!("{UNDO_FILE}.tmp"));
    let r = serde_json::to_vec(&rec)
        .map_err(std::io::Error::other)
        .and_then(|b| {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?
                .write_all(&b)
        })
        .and_then(|()| std::fs::rename(&tmp, dir.join(UNDO_FILE)));
    if let Err(e) = r {
        warn!(error = %e, "cannot record the memory capture's state in {}", dir.display());
    }
}

/// Puts back what dead captures of the domain `uuid` under `base` left (a suspended domain,
/// changed capabilities), and removes their scratch directories; returns what it did.
pub fn settle_dead(virsh: &Virsh, base: &Path, uuid: &str) -> Vec<String> {
    let mut done = Vec::new();
    let Ok(entries) = std::fs::read_dir(base) else {
        return done;
    };
    for dir in entries.flatten().map(|e| e.path()) {
        if !scratch::is_capture_dir_name(&dir) || !dir.join(UNDO_FILE).exists() || !ours(&dir) {
            continue;
        }
        let Ok(rec) = std::fs::read(dir.join(UNDO_FILE))
            .map_err(|_| ())
            .and_then(|b| serde_json::from_slice::<Recorded>(&b).map_err(|_| ()))
        else {
            continue;
        };
        if rec.uuid != uuid || !scratch::is_dead_capture_dir(&dir) {
            continue;
        }
        let mut pending = rec.undo;
        done.extend(undo(virsh, &mut pending));
        // The job, if one runs, is found by its socket in this directory: gone means dead.
        let _ = std::fs::remove_dir_all(&dir);
        done.push(format!("removed {}", dir.display()));
    }
    done
}

/// Whether `dir` and its record were made by this user and nobody else could write them: in a
/// shared temp dir, another user could otherwise plant a record that resumes a paused domain.
fn ours(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    [dir.to_path_buf(), dir.join(UNDO_FILE)].iter().all(|p| {
        std::fs::symlink_metadata(p)
            .map(|m| m.uid() == me && m.mode() & 0o022 == 0 && !m.file_type().is_symlink())
            .unwrap_or(false)
    })
}

/// Step 1. `tell` receives the state before each change.
pub fn prepare(
    virsh: &Virsh,
    write_end: BorrowedFd<'_>,
    token: &str,
    bandwidth: Option<u64>,
    state: &mut MemoryUndo,
    tell: &mut dyn FnMut(&MemoryUndo),
) -> Result<String> {
    let mon = Monitor::new(virsh);
    let info = mon.execute("query-migrate", Value::Null)?;
    refuse_running_migration(info["status"].as_str())?;
    let old = parse_capabilities(&mon.execute("query-migrate-capabilities", Value::Null)?);
    state.caps = Some(old.clone());
    tell(state);
    let set: Vec<Value> = background_snapshot_caps(&old)
        .into_iter()
        .map(|(c, s)| json!({ "capability": c, "state": s }))
        .collect();
    if let Err(e) = mon.execute("migrate-set-capabilities", json!({ "capabilities": set })) {
        return Err(explain_capability_error(e, &virsh.domain));
    }
    let params = mon.execute("query-migrate-parameters", Value::Null)?;
    let old_bw = params["max-bandwidth"].as_u64();
    let want = bandwidth.unwrap_or(UNLIMITED_BANDWIDTH);
    if let Some(old_bw) = old_bw.filter(|b| *b != want) {
        state.bandwidth = Some(old_bw);
        tell(state);
        mon.execute("migrate-set-parameters", json!({ "max-bandwidth": want }))?;
    }
    let name = format!("vmkeep-mig-{token}");
    state.fd = Some(name.clone());
    tell(state);
    mon.execute_passing("getfd", json!({ "fdname": name }), write_end)?;
    Ok(name)
}

/// QEMU refusing background-snapshot under libvirt almost always means userfaultfd.
fn explain_capability_error(e: Error, domain: &str) -> Error {
    match &e {
        Error::QmpCommand { desc, .. } if desc.contains("not supported by host kernel") => {
            Error::Refused(format!(
                "QEMU of libvirt domain {domain} cannot take a background memory snapshot: it \
                 runs as an unprivileged user, and this host denies such users userfaultfd \
                 (QEMU: \"{desc}\"). Allow it with `sysctl vm.unprivileged_userfaultfd=1` \
                 (persist it in /etc/sysctl.d/), or back up the disks alone (without --memory). \
                 Nothing was left changed."
            ))
        }
        _ => e,
    }
}

/// Steps 4: the migration into the pipe, until RAM iterates.
pub fn start_migration(
    virsh: &Virsh,
    fd_name: &str,
    state: &mut MemoryUndo,
    tell: &mut dyn FnMut(&MemoryUndo),
) -> Result<()> {
    let mon = Monitor::new(virsh);
    state.migration = true;
    tell(state);
    mon.execute("migrate", json!({ "uri": format!("fd:{fd_name}") }))?;
    state.fd = None; // the migration owns it now
    tell(state);
    vmkeep_io::kill_point("libvirt-after-migrate-start");
    let start = Instant::now();
    loop {
        let m = mon.execute("query-migrate", Value::Null)?;
        let ram =
            m["ram"]["normal"].as_u64().unwrap_or(0) + m["ram"]["duplicate"].as_u64().unwrap_or(0);
        if ram_iterating(m["status"].as_str(), ram, m["error-desc"].as_str())? {
            return Ok(());
        }
        if start.elapsed() > RAM_ITERATION_TIMEOUT {
            return Err(Error::Timeout {
                what: "the memory snapshot to start iterating RAM".into(),
                timeout: RAM_ITERATION_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Step 6: after QEMU closed the stream, the migration must have completed.
pub fn check_completed(virsh: &Virsh, state: &mut MemoryUndo) -> Result<()> {
    let mon = Monitor::new(virsh);
    let start = Instant::now();
    loop {
        let m = mon.execute("query-migrate", Value::Null)?;
        match m["status"].as_str() {
            Some("completed") => {
                state.migration = false;
                return Ok(());
            }
            Some("failed" | "cancelled") => {
                return Err(Error::Refused(format!(
                    "QEMU's memory snapshot failed: {}",
                    m["error-desc"].as_str().unwrap_or("no reason given")
                )))
            }
            _ if start.elapsed() > RAM_ITERATION_TIMEOUT => {
                return Err(Error::Timeout {
                    what: "QEMU to complete the memory snapshot".into(),
                    timeout: RAM_ITERATION_TIMEOUT,
                })
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Puts back what `state` says is pending, the guest's pause first; returns what it did (for
/// the guard's report). Each step is tried even when one before failed.
pub fn undo(virsh: &Virsh, state: &mut MemoryUndo) -> Vec<String> {
    let mon = Monitor::new(virsh);
    let mut done = Vec::new();
    let mut note = |r: Result<Value>, what: String| match r {
        Ok(_) => done.push(what),
        Err(e) => {
            warn!(error = %e, "{what}: failed");
            done.push(format!("{what}: failed: {e}"));
        }
    };
    if state.migration {
        note(
            mon.execute("migrate_cancel", Value::Null),
            "cancelled the memory snapshot".into(),
        );
        wait_migration_end(&mon);
        state.migration = false;
    }
    if state.suspended {
        note(
            virsh.domain_cmd("resume", &[]).map(|_| Value::Null),
            format!("resumed domain {}", virsh.domain),
        );
        state.suspended = false;
    }
    if let Some(fd) = state.fd.take() {
        // Fails harmlessly when the migration already took it.
        let _ = mon.execute("closefd", json!({ "fdname": fd }));
    }
    if let Some(caps) = state.caps.take() {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({ "capability": c, "state": s }))
            .collect();
        note(
            mon.execute("migrate-set-capabilities", json!({ "capabilities": list })),
            "put the migration capabilities back".into(),
        );
    }
    if let Some(bw) = state.bandwidth.take() {
        note(
            mon.execute("migrate-set-parameters", json!({ "max-bandwidth": bw })),
            "put the migration bandwidth back".into(),
        );
    }
    done
}

/// Capabilities cannot change while a migration runs: wait (briefly) for a cancel to land.
fn wait_migration_end(mon: &Monitor<'_>) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        match mon.execute("query-migrate", Value::Null) {
            Ok(m)
                if matches!(
                    m["status"].as_str(),
                    Some("setup" | "active" | "device" | "cancelling")
                ) =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_userfaultfd_refusal_says_what_to_do() {
        let e = explain_capability_error(
            Error::QmpCommand {
                command: "migrate-set-capabilities".into(),
                class: "GenericError".into(),
                desc: "Background-snapshot is not supported by host kernel".into(),
            },
            "web1",
        );
        let s = e.to_string();
        assert!(s.contains("vm.unprivileged_userfaultfd=1"), "{s}");
        assert!(s.contains("without --memory"), "{s}");
        let other = Error::QmpCommand {
            command: "x".into(),
            class: "GenericError".into(),
            desc: "other".into(),
        };
        assert!(matches!(
            explain_capability_error(other, "web1"),
            Error::QmpCommand { .. }
        ));
    }

    #[test]
    fn undo_state_round_trips_through_json() {
        let s = MemoryUndo {
            caps: Some(vec![("events".into(), true)]),
            bandwidth: Some(1 << 20),
            fd: Some("vmkeep-mig-x".into()),
            suspended: true,
            migration: false,
        };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<MemoryUndo>(&j).unwrap(), s);
        assert!(MemoryUndo::default().is_empty());
    }
}
