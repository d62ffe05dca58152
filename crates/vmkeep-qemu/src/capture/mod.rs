//! Capture sessions: back up a running VM's disks at one instant through QMP and NBD.
//!
//! [`backup_vm`] does, over one QMP connection:
//! 1. list the disks (`query-block`: device id or drive id as name, root node, format, file);
//! 2. decide per disk whether its checkpoint bitmap can be trusted ([`cbt::decide`]);
//! 3. add a scratch qcow2 node per disk, then ONE transaction (no pause): fleecing backup job,
//!    new checkpoint bitmap, previous bitmap disabled ([`fleece`]);
//! 4. export the scratch nodes over NBD and read them into the repository (dirty chunks only
//!    when tracking is used, otherwise every allocated chunk);
//! 5. tear the capture down, commit, then retire the consumed bitmaps (or, on failure, merge
//!    the new writes back into the previous checkpoint so no write is ever lost).
//!
//! [`backup_images`] applies the same sequence to image files of a stopped VM, opened by a
//! `qemu-storage-daemon` we start (so qcow2 images keep incremental backups).

pub mod agent;
pub mod cbt;
pub mod disks;
pub mod fleece;
pub mod guard;
pub mod image;
pub(crate) mod peer;
pub mod recover;

use std::path::PathBuf;
use std::time::Duration;

use tokio::runtime::Runtime;
use tracing::warn;
use vmkeep_core::manifest::{ChangeTracking, Checkpoint, Manifest};
use vmkeep_repo::{BackupOptions, BackupSession, Progress, ReadPlan, Repository};

use crate::disk_reader::NbdDisk;
use crate::qmp::{EventStream, QmpClient};
pub use cbt::Decision;
pub use disks::VmDisk;
pub use guard::{run_guard, GuardCommand};
pub use image::backup_images;

/// Errors of a capture: QEMU's, the repository's, or a refusal.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Qemu(#[from] crate::Error),
    #[error(transparent)]
    Repo(#[from] vmkeep_repo::Error),
    #[error("{0}")]
    Refused(String),
}

pub type Result<T, E = CaptureError> = std::result::Result<T, E>;

/// `--freeze`: guest filesystem freeze around the cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Freeze {
    /// Freeze when the VM has a guest agent; skip silently otherwise.
    #[default]
    Auto,
    /// Require a guest agent.
    On,
    Off,
}

#[derive(Clone, Debug, Default)]
pub struct VmBackupOptions {
    /// The VM's QMP socket.
    pub qmp: PathBuf,
    pub vm: String,
    /// Ignore change tracking (the checkpoint still rotates).
    pub full: bool,
    /// Stop the VM for the cut and resume it after.
    pub suspend: bool,
    pub freeze: Freeze,
    /// The guard to start (see [`guard`]); None runs without one.
    pub guard: Option<GuardCommand>,
}

/// Options shared by live and image captures.
#[derive(Clone, Debug, Default)]
pub(crate) struct CutOptions {
    pub full: bool,
    pub suspend: bool,
    pub qmp_path: PathBuf,
    pub guard: Option<GuardCommand>,
    pub freeze: Freeze,
}

pub(crate) fn runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| crate::Error::io("start the async runtime", e).into())
}

/// A short unique token for this capture's node, job, export and bitmap names (node names are
/// limited to 31 bytes).
pub(crate) fn token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:08x}{:04x}",
        (nanos as u64 ^ (nanos >> 64) as u64) as u32,
        std::process::id() as u16
    )
}

/// Canonical path when the file exists (so `./a.qcow2` and `/x/a.qcow2` are one source).
pub(crate) fn canonical(file: &str) -> String {
    std::fs::canonicalize(file)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| file.to_string())
}

/// Back up every disk of a running VM at one instant. See the module docs.
pub fn backup_vm(
    repo: &Repository,
    opts: &VmBackupOptions,
    progress: &dyn Progress,
) -> Result<Manifest> {
    let rt = runtime()?;
    let qmp = rt.block_on(QmpClient::connect(&opts.qmp))?;
    let pid = peer::listener_pid(&opts.qmp);
    let r = (|| {
        match rt.block_on(recover::recover_leftovers(&qmp)) {
            Ok(done) => {
                for d in done {
                    warn!("leftover of an interrupted capture: {d}");
                }
            }
            Err(e) => warn!(error = %e, "cannot look for leftovers of interrupted captures"),
        }
        let disks = rt.block_on(disks::list_disks(&qmp))?;
        if disks.is_empty() {
            return Err(CaptureError::Refused(format!(
                "VM behind {} has no writable disk to back up",
                opts.qmp.display()
            )));
        }
        let session = repo.begin_backup(BackupOptions {
            vm: opts.vm.clone(),
            ..Default::default()
        })?;
        let cut = CutOptions {
            full: opts.full,
            suspend: opts.suspend,
            qmp_path: opts.qmp.clone(),
            guard: opts.guard.clone(),
            freeze: opts.freeze,
        };
        capture(&rt, &qmp, disks, pid, session, &cut, progress)
    })();
    rt.block_on(qmp.close());
    r
}

/// The shared sequence: decisions, cut, read, teardown, commit, bitmap bookkeeping.
pub(crate) fn capture(
    rt: &Runtime,
    qmp: &QmpClient,
    disks: Vec<VmDisk>,
    pid: Option<u32>,
    mut session: BackupSession<'_>,
    opts: &CutOptions,
    progress: &dyn Progress,
) -> Result<Manifest> {
    let parent = session.parent().cloned();
    let cs = session.repository().config().chunk_size as u64;
    let token = token();
    let new_bitmap = format!("{}{token}", cbt::BITMAP_PREFIX);
    let mut decisions = Vec::new();
    let mut fds = Vec::new();
    for d in &disks {
        let file = canonical(&d.file);
        let dec = cbt::decide(
            &cbt::DiskFacts {
                name: &d.name,
                size: d.size,
                bitmaps: &d.bitmaps,
                file: &file,
                pid,
            },
            parent.as_ref(),
            opts.full,
        );
        for stale in &dec.remove_stale {
            if let Err(e) = rt.block_on(qmp.block_dirty_bitmap_remove(&d.node, stale)) {
                warn!(error = %e, bitmap = %stale, "cannot remove a stale bitmap");
            }
        }
        fds.push(fleece::FleeceDisk {
            root: d.node.clone(),
            size: d.size,
            new_bitmap: new_bitmap.clone(),
            // A previous checkpoint that had to be non-persistent (qcow2 v2) says so again.
            persistent: d.persistent_bitmaps()
                && !d
                    .bitmaps
                    .iter()
                    .any(|b| Some(&b.name) == dec.previous.as_ref() && !b.persistent),
            previous: dec.previous.clone(),
            export_bitmap: dec.export_bitmap.clone(),
            bitmaps: true,
            scratch_node: String::new(),
            job: String::new(),
            export_id: String::new(),
            export_name: String::new(),
        });
        decisions.push(dec);
    }
    let mut fl = fleece::Fleece::new(&token, fds)?;
    let mut guard = guard::Guard::start(opts.guard.as_ref(), opts.qmp_path.clone());
    // The guard hears of every step before it happens: undoing a step that did not happen
    // only fails harmlessly.
    guard.state.nodes = fl.disks.iter().map(|d| d.scratch_node.clone()).collect();
    guard.state.jobs = fl.disks.iter().map(|d| d.job.clone()).collect();
    guard.state.bitmaps = guard::GuardBitmaps::of(&fl.disks);
    guard.report();

    // The guest agent, when freezing: found and synchronised before anything is set up.
    let mut agent = match rt.block_on(connect_agent(qmp, opts.freeze)) {
        Ok(a) => a,
        Err(e) => return Err(abort(rt, qmp, &mut fl, guard, false, e)),
    };
    if let Some(a) = &agent {
        guard.state.agent = Some(a.0.clone());
    }

    // Setup and cut. Whatever happens, a VM we stopped runs again and a frozen guest thaws.
    let mut events = qmp.events();
    let mut frozen = false;
    let mut stopped = false;
    let mut cut_done = false;
    let mut no_tracking: Option<String> = None;
    let setup: Result<()> = rt.block_on(async {
        fl.prepare(qmp).await?;
        if let Some((_, a)) = agent.as_mut() {
            guard.state.frozen = true;
            guard.report();
            // Thawed afterwards whatever the answer: a timed-out freeze may still have frozen.
            frozen = true;
            match a.freeze().await {
                Ok(n) => tracing::info!(filesystems = n, "guest filesystems frozen"),
                Err(e) if opts.freeze == Freeze::On => return Err(e.into()),
                Err(e) => warn!(error = %e, "guest freeze failed; capturing unfrozen"),
            }
        }
        if opts.suspend && qmp.query_status().await?.running {
            guard.state.stopped = true;
            guard.report();
            let mut ev = qmp.events();
            qmp.stop().await?;
            stopped = true;
            ev.wait_for("STOP", |_| true, Duration::from_secs(30))
                .await?;
            vmkeep_repo::hooks::kill_point("capture-after-stop");
        }
        guard.state.cut = true;
        guard.report();
        no_tracking = fl.cut(qmp).await?;
        cut_done = true;
        Ok(())
    });
    if stopped {
        let resumed = rt.block_on(async {
            let mut ev = qmp.events();
            qmp.cont().await?;
            ev.wait_for("RESUME", |_| true, Duration::from_secs(30))
                .await
                .map(drop)
        });
        match resumed {
            Ok(()) => {
                guard.state.resumed = true;
                guard.report();
            }
            Err(e) => {
                warn!(error = %e, "could not resume the VM after the cut");
                if setup.is_ok() {
                    return Err(abort(rt, qmp, &mut fl, guard, true, e.into()));
                }
            }
        }
    }
    if frozen {
        if let Some((_, a)) = agent.as_mut() {
            match rt.block_on(a.thaw()) {
                Ok(_) => {
                    guard.state.thawed = true;
                    guard.report();
                }
                Err(e) => warn!(error = %e, "could not thaw the guest's filesystems"),
            }
        }
    }
    drop(agent);
    if let Err(e) = setup {
        return Err(abort(rt, qmp, &mut fl, guard, cut_done, e));
    }
    vmkeep_repo::hooks::kill_point("capture-after-fleece");
    let pause_ms = rt.block_on(pause_from_events(&mut events));

    // Read.
    guard.state.nbd = true;
    guard.state.exports = fl.disks.iter().map(|d| d.export_id.clone()).collect();
    guard.report();
    let read: Result<()> = (|| {
        rt.block_on(fl.export(qmp))?;
        let sock = fl.nbd_socket();
        for (i, d) in disks.iter().enumerate() {
            let fd = &fl.disks[i];
            let dec = &decisions[i];
            // The cut may have fallen back to non-persistent bitmaps.
            let source = cbt::source_identity(fd.persistent, &canonical(&d.file), pid);
            let granularity = rt
                .block_on(disks::node_bitmaps(qmp, &d.node))?
                .iter()
                .find(|b| b.name == fd.new_bitmap)
                .map(|b| b.granularity)
                .unwrap_or(0);
            let disk = NbdDisk::connect_unix(
                rt.handle().clone(),
                &sock,
                &fd.export_name,
                fd.export_bitmap.as_deref(),
                format!("disk {} ({}) via NBD", d.name, d.file),
            )?;
            let plan = match (&fd.export_bitmap, &no_tracking) {
                (Some(b), _) => ReadPlan {
                    base: dec.base,
                    runs: disk.dirty_runs(b, cs)?,
                    cbt: dec.cbt,
                    cbt_reason: dec.reason.clone(),
                    ..Default::default()
                },
                (None, Some(why)) if dec.cbt == ChangeTracking::Used => ReadPlan {
                    runs: disk.allocated_runs(cs),
                    cbt: ChangeTracking::Rescan,
                    cbt_reason: Some(format!("checkpoint bitmaps refused by QEMU: {why}")),
                    ..Default::default()
                },
                (None, _) => ReadPlan {
                    runs: disk.allocated_runs(cs),
                    cbt: dec.cbt,
                    cbt_reason: dec.reason.clone(),
                    ..Default::default()
                },
            };
            let plan = ReadPlan {
                checkpoint: fd.bitmaps.then(|| Checkpoint {
                    bitmap: fd.new_bitmap.clone(),
                    node: d.node.clone(),
                    granularity,
                    source,
                }),
                ..plan
            };
            session.add_disk(&d.name, &disk, plan, progress)?;
            if i == 0 {
                vmkeep_repo::hooks::kill_point("capture-mid-read"); // one disk read, NBD open
            }
            if let Err(e) = disk.disconnect() {
                warn!(error = %e, "NBD disconnect");
            }
        }
        Ok(())
    })();
    if let Err(e) = read {
        return Err(abort(rt, qmp, &mut fl, guard, true, e));
    }
    if let Err(e) = rt.block_on(fl.teardown(qmp)) {
        warn!(error = %e, "capture teardown incomplete (the backup itself is complete)");
    }
    guard.state.exports.clear();
    guard.state.jobs.clear();
    guard.state.nodes.clear();
    guard.state.nbd = false;
    guard.report();
    session.set_pause_ms(pause_ms);
    vmkeep_repo::hooks::kill_point("capture-before-commit");
    match session.commit() {
        Ok(m) => {
            guard.state.committed = true;
            guard.report();
            vmkeep_repo::hooks::kill_point("capture-after-commit");
            if let Err(e) = rt.block_on(fleece::finish_bitmaps(qmp, &fl.disks, true)) {
                warn!(error = %e, "could not remove the consumed checkpoint bitmap");
            }
            guard.finish();
            Ok(m)
        }
        Err(e) => {
            if let Err(e2) = rt.block_on(fleece::finish_bitmaps(qmp, &fl.disks, false)) {
                warn!(error = %e2, "could not restore the checkpoint bitmaps");
            }
            guard.finish();
            Err(e.into())
        }
    }
}

/// The guest agent to freeze with: None when not freezing, or (`auto`) when the VM has no
/// agent channel or nothing answers on it; an error for `on` in those cases.
async fn connect_agent(qmp: &QmpClient, freeze: Freeze) -> Result<Option<(PathBuf, agent::Agent)>> {
    if freeze == Freeze::Off {
        return Ok(None);
    }
    let path = match agent::find_agent_socket(qmp).await {
        Ok(Some(p)) => p,
        Ok(None) if freeze == Freeze::On => {
            return Err(CaptureError::Refused(
                "--freeze on: the VM has no guest agent channel (virtserialport org.qemu.guest_agent.0 on a unix socket)".into(),
            ))
        }
        Ok(None) => return Ok(None),
        Err(e) if freeze == Freeze::On => return Err(e.into()),
        Err(e) => {
            warn!(error = %e, "cannot look for a guest agent; not freezing");
            return Ok(None);
        }
    };
    match agent::Agent::connect(&path, Duration::from_secs(3)).await {
        Ok(a) => Ok(Some((path, a))),
        Err(e) if freeze == Freeze::On => Err(CaptureError::Refused(format!(
            "--freeze on: the guest agent does not answer: {e}"
        ))),
        Err(e) => {
            tracing::info!(error = %e, "guest agent not answering; not freezing");
            Ok(None)
        }
    }
}

/// Undo a failed capture: teardown, and bitmaps put back if the cut happened.
fn abort(
    rt: &Runtime,
    qmp: &QmpClient,
    fl: &mut fleece::Fleece,
    guard: guard::Guard,
    cut_done: bool,
    e: CaptureError,
) -> CaptureError {
    if let Err(t) = rt.block_on(fl.teardown(qmp)) {
        warn!(error = %t, "capture teardown after a failure incomplete");
    }
    if cut_done {
        if let Err(b) = rt.block_on(fleece::finish_bitmaps(qmp, &fl.disks, false)) {
            warn!(error = %b, "could not restore the checkpoint bitmaps");
        }
    }
    guard.finish();
    e
}

/// Milliseconds between STOP and RESUME events received so far (0 when never stopped).
async fn pause_from_events(ev: &mut EventStream) -> u64 {
    let mut stop_at = None;
    let mut total = 0u64;
    while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(20), ev.next()).await {
        match e.event.as_str() {
            "STOP" => stop_at = Some(fleece::event_ms(e.timestamp)),
            "RESUME" => {
                if let Some(s) = stop_at.take() {
                    total += (fleece::event_ms(e.timestamp) - s).max(0) as u64;
                }
            }
            _ => {}
        }
    }
    total
}
