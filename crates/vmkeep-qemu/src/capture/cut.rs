//! The phases of a capture that change the VM, each recording its undo step first
//! (qemu-facts §1A and §3):
//!
//! 1. [`prepare`]: per disk a scratch qcow2 (passed as an fd) as a node; our NBD server on a
//!    socket we pass as an fd. Nothing the guest sees changes, and an NBD server that is already
//!    running fails the capture here, before the cut.
//! 2. [`cut`]: `stop`; per disk a copy-before-write filter with `on-cbw-error=break-snapshot`
//!    inserted above the disk (so a full scratch fails the backup, never a guest write); ONE
//!    transaction for every disk's bitmaps; the memory migration started and RAM iteration seen
//!    to begin; `cont`. The guest is paused for milliseconds.
//! 3. [`export`]: a read-only `snapshot-access` node per disk, exported with the frozen bitmap.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::{info, warn};

use super::cbt::Decision;
use super::disks::VmDisk;
use super::scratch::Scratch;
use super::undo::{Undo, UndoLog};
use crate::error::{Error, Result};
use crate::qmp::{BitmapRef, EventStream, NbdExport, QmpClient, TransactionAction};

const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the VM may stay stopped while RAM iteration has not begun.
const MIGRATION_START_TIMEOUT: Duration = Duration::from_secs(10);

/// One disk in a capture, with the names of everything the capture adds for it.
#[derive(Debug, Clone)]
pub struct CutDisk {
    pub vm: VmDisk,
    pub decision: Decision,
    pub new_bitmap: String,
    pub persistent: bool,
    /// Bitmap operations in the cut (false once tracking was given up for this disk).
    pub bitmaps: bool,
    pub scratch_node: String,
    pub cbw_node: String,
    pub snap_node: String,
    pub export_id: String,
    pub export_name: String,
}

impl CutDisk {
    pub fn new(vm: VmDisk, decision: Decision, token: &str, i: usize, new_bitmap: &str) -> Self {
        // A previous checkpoint that had to be non-persistent says so again.
        let persistent = vm.persistent_bitmaps()
            && !vm
                .bitmaps
                .iter()
                .any(|b| Some(&b.name) == decision.previous.as_ref() && !b.persistent);
        CutDisk {
            persistent,
            bitmaps: true,
            new_bitmap: new_bitmap.to_string(),
            scratch_node: format!("vmkeep-sc-{token}-{i}"),
            cbw_node: format!("vmkeep-cbw-{token}-{i}"),
            snap_node: format!("vmkeep-sa-{token}-{i}"),
            export_id: format!("vmkeep-exp-{token}-{i}"),
            export_name: format!("disk{i}"),
            vm,
            decision,
        }
    }

    /// The node whose contents are read: the snapshot of a disk something writes to, the disk
    /// itself when nothing does (an image opened only by our qemu-storage-daemon).
    pub fn read_node(&self) -> &str {
        if self.vm.qdev.is_some() {
            &self.snap_node
        } else {
            &self.vm.node
        }
    }
}

/// Phase 1: scratch nodes and our NBD server, or the one QEMU already runs ([`nbd_share`]:
/// QEMU's process `qemu_pid`, whose monitor `monitor` vmkeep holds). Returns the socket to
/// read from.
pub async fn prepare(
    qmp: &QmpClient,
    log: &mut UndoLog,
    scratch: &Scratch,
    disks: &[CutDisk],
    token: &str,
    qemu_pid: Option<u32>,
    monitor: &std::path::Path,
) -> Result<std::path::PathBuf> {
    let live = disks.iter().any(|d| d.vm.qdev.is_some());
    let fdsets = if live {
        used_fdsets(qmp).await?
    } else {
        Vec::new()
    };
    let mut next_fdset = 1 + fdsets.iter().copied().max().unwrap_or(0);
    for (i, d) in disks.iter().enumerate() {
        if d.vm.qdev.is_none() {
            continue;
        }
        let image = scratch.image(i, d.vm.size)?;
        let fdset = next_fdset;
        next_fdset += 1;
        let rm = log.record(Undo::RemoveFdset { fdset });
        qmp.execute_with_fd(
            "add-fd",
            json!({ "fdset-id": fdset, "opaque": format!("vmkeep scratch {token}") }),
            image.as_fd(),
        )
        .await?;
        log.record(Undo::DeleteNode {
            node: d.scratch_node.clone(),
        });
        qmp.blockdev_add(json!({
            "driver": "qcow2", "node-name": d.scratch_node, "discard": "unmap",
            "file": {"driver": "file", "filename": format!("/dev/fdset/{fdset}"),
                     "discard": "unmap"},
        }))
        .await?;
        // QEMU holds its own duplicate now; the set is no longer needed.
        qmp.execute("remove-fd", json!({ "fdset-id": fdset }))
            .await?;
        log.done(rm);
    }
    let (listener, mut path) = scratch.nbd_listener()?;
    let fd_name = format!("vmkeep-nbd-{token}");
    let close = log.record(Undo::CloseFd {
        name: fd_name.clone(),
    });
    let started = match qmp.getfd(&fd_name, listener.as_fd()).await {
        Ok(()) => {
            qmp.execute(
                "nbd-server-start",
                json!({ "addr": { "type": "fd", "data": { "str": fd_name } } }),
            )
            .await
        }
        // qemu-storage-daemon (ours, same user) has no fd passing: a path then.
        Err(e) if e.qmp_class() == Some("CommandNotFound") => {
            drop(listener);
            let _ = std::fs::remove_file(&path);
            path = scratch.dir().join("nbd.sock");
            qmp.execute(
                "nbd-server-start",
                json!({ "addr": { "type": "unix", "data": { "path": path } } }),
            )
            .await
        }
        Err(e) => return Err(e),
    };
    match started {
        Ok(_) => {
            // Ours only now: a server someone else started is never stopped by us.
            log.record(Undo::StopNbdServer);
            log.done(close); // QEMU consumed the fd
            Ok(path)
        }
        Err(Error::QmpCommand { desc, .. }) if desc.contains("already running") => {
            // Someone else's server: ours is not needed, their server is shared, never stopped.
            qmp.execute("closefd", json!({ "fdname": fd_name })).await?;
            log.done(close);
            let _ = std::fs::remove_file(&path);
            let Some(pid) = qemu_pid else {
                return Err(Error::Refused(
                    "QEMU already runs an NBD server (started by libvirt, another backup tool, \
                     or by hand), and vmkeep cannot see QEMU's process to find where it \
                     listens (another PID namespace?): stop it (nbd-server-stop) or wait for \
                     that job to end, then run the backup again. Nothing was changed."
                        .into(),
                ));
            };
            let shared = super::nbd_share::find_server(pid, monitor)?;
            tracing::info!(socket = %shared.display(), "sharing the NBD server QEMU already runs");
            Ok(shared)
        }
        Err(e) => Err(e),
    }
}

async fn used_fdsets(qmp: &QmpClient) -> Result<Vec<u64>> {
    let v = qmp.execute("query-fdsets", serde_json::Value::Null).await?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["fdset-id"].as_u64())
        .collect())
}

/// The memory part of the cut: where the migration goes.
pub struct MemoryTarget {
    /// Name of the pipe's write end in QEMU (`getfd`).
    pub fd_name: String,
}

/// Prepares the migration (capabilities, the pipe's write end in QEMU), before the stop.
pub async fn prepare_memory(
    qmp: &QmpClient,
    log: &mut UndoLog,
    write_end: std::os::fd::BorrowedFd<'_>,
    token: &str,
    bandwidth: Option<u64>,
) -> Result<MemoryTarget> {
    let info = qmp
        .query_migrate()
        .await
        .map_err(|e| Error::Refused(format!("cannot query the migration state: {e}")))?;
    refuse_running_migration(info.status.as_deref())?;
    let caps = qmp
        .execute("query-migrate-capabilities", serde_json::Value::Null)
        .await?;
    let old = parse_capabilities(&caps);
    log.record(Undo::RestoreMigrationCaps { caps: old.clone() });
    qmp.migrate_set_capabilities(&background_snapshot_caps(&old))
        .await?;
    let old = qmp.migrate_max_bandwidth().await?;
    let want = bandwidth.unwrap_or(UNLIMITED_BANDWIDTH);
    if old != want {
        log.record(Undo::RestoreMigrationBandwidth { max_bandwidth: old });
        qmp.set_migrate_max_bandwidth(want).await?;
    }
    let fd_name = format!("vmkeep-mig-{token}");
    log.record(Undo::CloseFd {
        name: fd_name.clone(),
    });
    qmp.getfd(&fd_name, write_end).await?;
    Ok(MemoryTarget { fd_name })
}

/// Refuses while a migration runs (`status` from `query-migrate`): QEMU runs one at a time.
pub(crate) fn refuse_running_migration(status: Option<&str>) -> Result<()> {
    if matches!(
        status,
        Some("setup" | "active" | "device" | "cancelling" | "postcopy-active")
    ) {
        return Err(Error::Refused(
            "a migration is already running on this VM (another backup, or a live \
             migration): run the backup when it has ended. Nothing was changed."
                .into(),
        ));
    }
    Ok(())
}

/// `query-migrate-capabilities`' answer as (name, state) pairs.
pub(crate) fn parse_capabilities(caps: &serde_json::Value) -> Vec<(String, bool)> {
    caps.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c["capability"].as_str()?.to_string(), c["state"].as_bool()?)))
        .collect()
}

/// The capabilities of a background snapshot, given the ones set now. The full list every
/// time: capabilities persist between migrations, and several (multifd, mapped-ram, postcopy,
/// xbzrle...) are incompatible with background snapshots.
pub(crate) fn background_snapshot_caps(old: &[(String, bool)]) -> Vec<(&str, bool)> {
    let mut set: Vec<(&str, bool)> = old
        .iter()
        .map(|(c, s)| (c.as_str(), *s && SAFE_TO_KEEP.contains(&c.as_str())))
        .collect();
    for want in ["background-snapshot", "events"] {
        match set.iter_mut().find(|(c, _)| *c == want) {
            Some(e) => e.1 = true,
            None => set.push((want, true)),
        }
    }
    set
}

/// "No limit" for QEMU's `max-bandwidth` (the largest whole MiB/s it accepts, as libvirt
/// sets it).
pub const UNLIMITED_BANDWIDTH: u64 = (i64::MAX as u64) / (1 << 20) * (1 << 20);

/// Capabilities a user may have on that do not change the stream or conflict with a
/// background snapshot.
const SAFE_TO_KEEP: &[&str] = &["events", "pause-before-switchover"];

/// What the cut did.
#[derive(Debug, Default)]
pub struct CutOutcome {
    /// Sequence number of the Resume step (the VM is stopped until it is done).
    pub resume: Option<u64>,
    /// Why tracking had to be given up for every disk, if it had.
    pub no_tracking: Option<String>,
    /// When `cont` was sent (STOP events after it mean the memory instant moved).
    pub stopped: bool,
}

/// Phase 2, up to (not including) `cont`: see the module docs.
pub async fn cut(
    qmp: &QmpClient,
    log: &mut UndoLog,
    disks: &mut [CutDisk],
    memory: Option<&MemoryTarget>,
) -> Result<CutOutcome> {
    let mut out = CutOutcome::default();
    // Only a guest writes through devices; images behind our qemu-storage-daemon (no devices,
    // no `query-status`) need no stop.
    let live = disks.iter().any(|d| d.vm.qdev.is_some()) || memory.is_some();
    if live && qmp.query_status().await?.running {
        let mut ev = qmp.events();
        out.resume = Some(log.record(Undo::Resume));
        qmp.stop().await?;
        ev.wait_for("STOP", |_| true, EVENT_TIMEOUT).await?;
        out.stopped = true;
        vmkeep_io::kill_point("capture-after-stop");
    }
    for d in disks.iter() {
        let Some(qdev) = &d.vm.qdev else { continue };
        log.record(Undo::DeleteNode {
            node: d.cbw_node.clone(),
        });
        qmp.blockdev_add(json!({
            "driver": "copy-before-write", "node-name": d.cbw_node,
            "file": d.vm.node, "target": d.scratch_node,
            // A full scratch image fails the snapshot (the backup), never the guest's write.
            "on-cbw-error": "break-snapshot", "cbw-timeout": 30,
        }))
        .await?;
        log.record(Undo::Reattach {
            qdev: qdev.clone(),
            node: d.vm.node.clone(),
        });
        qmp.qom_set(qdev, "drive", json!(d.cbw_node)).await?;
    }
    for d in disks.iter() {
        log.record(Undo::Bitmaps {
            node: d.vm.node.clone(),
            new: d.new_bitmap.clone(),
            previous: d.decision.previous.clone(),
            previous_recording: d
                .vm
                .bitmaps
                .iter()
                .any(|b| Some(&b.name) == d.decision.previous.as_ref() && b.recording)
                || !d.decision.repair.is_empty(),
        });
    }
    out.no_tracking = bitmap_transaction(qmp, disks).await?;
    if let Some(m) = memory {
        log.record(Undo::CancelMigration);
        qmp.migrate(&format!("fd:{}", m.fd_name)).await?;
        vmkeep_io::kill_point("capture-after-migrate-start");
        wait_ram_iteration(qmp).await?;
    }
    Ok(out)
}

/// The bitmaps of every disk in one transaction. Tracking never fails a backup: a refused
/// transaction is retried without bitmap operations for the disks whose bitmaps QEMU rejects
/// (each disk's persistence was already decided from its format).
async fn bitmap_transaction(qmp: &QmpClient, disks: &mut [CutDisk]) -> Result<Option<String>> {
    let actions = |disks: &[CutDisk]| {
        let mut a = Vec::new();
        for d in disks.iter().filter(|d| d.bitmaps) {
            a.push(TransactionAction::bitmap_add(
                &d.vm.node,
                &d.new_bitmap,
                d.persistent,
            ));
            if let Some(p) = &d.decision.previous {
                a.push(TransactionAction::bitmap_disable(&d.vm.node, p));
            }
        }
        a
    };
    let all = actions(disks);
    if all.is_empty() {
        return Ok(None);
    }
    let Err(first) = qmp.transaction(&all).await else {
        return Ok(None);
    };
    // Find the disks QEMU refuses, one by one (each alone; the VM is stopped, so doing them
    // separately is still one instant).
    warn!(error = %first, "checkpoint bitmaps refused; trying each disk alone");
    let mut refused = Vec::new();
    for i in 0..disks.len() {
        let one = actions(&disks[i..=i]);
        if let Err(e) = qmp.transaction(&one).await {
            warn!(disk = %disks[i].vm.name, error = %e, "no change tracking for this disk");
            disks[i].bitmaps = false;
            refused.push(format!("{}: {e}", disks[i].vm.name));
        }
    }
    Ok((!refused.is_empty()).then(|| refused.join("; ")))
}

/// Waits until the background snapshot iterates RAM: only then are the devices saved and RAM
/// write-protected, so `cont` cannot move the captured instant (qemu-facts §3, the race).
async fn wait_ram_iteration(qmp: &QmpClient) -> Result<()> {
    let start = Instant::now();
    loop {
        let m = qmp.query_migrate().await?;
        let ram = m.ram.as_ref().map(|r| r.normal + r.duplicate).unwrap_or(0);
        if ram_iterating(m.status.as_deref(), ram, m.error_desc.as_deref())? {
            return Ok(());
        }
        if start.elapsed() > MIGRATION_START_TIMEOUT {
            return Err(Error::Timeout {
                what: "the memory snapshot to start iterating RAM".into(),
                timeout: MIGRATION_START_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Whether a background snapshot iterates RAM (or is already done), from `query-migrate`'s
/// status, RAM pages sent and error; an error when it ended without.
pub(crate) fn ram_iterating(
    status: Option<&str>,
    ram_pages: u64,
    error: Option<&str>,
) -> Result<bool> {
    match status {
        Some("completed") => Ok(true),
        Some("failed" | "cancelled") => Err(Error::Refused(format!(
            "QEMU's memory snapshot failed to start: {}",
            error.unwrap_or("no reason given")
        ))),
        _ => Ok(ram_pages > 0),
    }
}

/// `cont`, waiting for RESUME; the Resume step is then done.
pub async fn resume(qmp: &QmpClient, log: &mut UndoLog, seq: u64) -> Result<()> {
    let mut ev = qmp.events();
    qmp.cont().await?;
    ev.wait_for("RESUME", |_| true, EVENT_TIMEOUT).await?;
    log.done(seq);
    Ok(())
}

/// Phase 3: snapshot-access nodes and their exports.
pub async fn export(qmp: &QmpClient, log: &mut UndoLog, disks: &[CutDisk]) -> Result<()> {
    for d in disks {
        if d.vm.qdev.is_some() {
            log.record(Undo::DeleteNode {
                node: d.snap_node.clone(),
            });
            qmp.blockdev_add(json!({
                "driver": "snapshot-access", "node-name": d.snap_node, "file": d.cbw_node,
            }))
            .await?;
        }
        log.record(Undo::DeleteExport {
            id: d.export_id.clone(),
        });
        let bitmap = d
            .decision
            .export_bitmap
            .as_ref()
            .filter(|_| d.bitmaps)
            .map(|b| BitmapRef::on_node(&d.vm.node, b));
        qmp.block_export_add_nbd(&NbdExport {
            id: d.export_id.clone(),
            node_name: d.read_node().to_string(),
            name: d.export_name.clone(),
            writable: false,
            bitmaps: bitmap.into_iter().collect(),
        })
        .await?;
    }
    Ok(())
}

/// Milliseconds between STOP and RESUME events received so far, and whether a STOP came after
/// the last RESUME of ours (`after_cont`).
pub async fn pauses(ev: &mut EventStream) -> (u64, Vec<crate::qmp::QmpEvent>) {
    let mut stop_at = None;
    let mut total = 0u64;
    let mut seen = Vec::new();
    while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(1), ev.next()).await {
        match e.event.as_str() {
            "STOP" => stop_at = Some(event_ms(e.timestamp)),
            "RESUME" => {
                if let Some(s) = stop_at.take() {
                    total += (event_ms(e.timestamp) - s).max(0) as u64;
                }
            }
            _ => {}
        }
        seen.push(e);
    }
    (total, seen)
}

/// A QMP event timestamp in milliseconds.
pub fn event_ms(ts: (i64, i64)) -> i64 {
    ts.0 * 1000 + ts.1 / 1000
}

/// The guest agent freeze: recorded, then asked. A timed-out freeze may still have frozen,
/// so the thaw step stays until a thaw succeeds.
pub async fn freeze(
    log: &mut UndoLog,
    agent: &mut super::agent::Agent,
    path: &std::path::Path,
    required: bool,
) -> Result<u64> {
    let seq = log.record(Undo::Thaw {
        agent: path.to_path_buf(),
    });
    match agent.freeze().await {
        Ok(n) => info!(filesystems = n, "guest filesystems frozen"),
        Err(e) if required => return Err(e),
        Err(e) => warn!(error = %e, "guest freeze failed; capturing unfrozen"),
    }
    Ok(seq)
}
