//! [`LibvirtCapture`]: a libvirt domain's disks at one instant, through libvirt's backup API
//! in pull mode.
//!
//! The order of a capture:
//! 1. The domain must be running, with no job of its own. A backup job whose NBD socket lies
//!    in the scratch directory of a dead vmkeep is that vmkeep's leftover, and is aborted.
//!    Any other job is someone else's, and the capture refuses, naming it.
//! 2. A private scratch directory is made (see [`open_to_qemu`] for what QEMU's user may do
//!    in it: QEMU binds the NBD socket itself). The guard is started (see [`super::guard`]).
//! 3. Each disk's change tracking is decided ([`super::tracking`]).
//! 4. Cut: `virsh backup-begin` with a pull-mode backup and a new checkpoint of this
//!    repository's chain. libvirt takes every disk's point in time in one QEMU transaction,
//!    without pausing the guest. A checkpoint whose bitmap QEMU lost (it was killed) is named
//!    in libvirt's error; that disk is rescanned and the cut is tried again.
//! 5. Each disk is read over NBD, the dirty chunks alone when tracking is used.
//! 6. `virsh domjobabort` ends the job; the repository commits.
//! 7. Committed: this chain's older checkpoints are deleted. Not committed: the new one is
//!    deleted. Either way libvirt merges the deleted bitmap into its parent's, so every chain
//!    stays exact.
//!
//! With `--memory` ([`super::memory`]) the migration is prepared in step 2, and the cut becomes
//! suspend, `backup-begin`, the background snapshot started, resume: the guest stands still
//! for those milliseconds ([`VmSource::pause_ms`]). No quiesce then: the frozen filesystems
//! would be in the captured RAM, and a resumed guest would stay frozen.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::runtime::Runtime;
use tracing::{info, warn};
use vmkeep_core::manifest::{ChangeTracking, Checkpoint, Manifest};
use vmkeep_io::{DiskReader, ReadPlan, SourceDisk, SourceError, VmSource};

use super::guard::GuardLine;
use super::memory::{self, MemoryUndo};
use super::tracking::{self, Decision, DiskFacts};
use super::virsh::{self, Virsh};
use super::xml::{self, BackupJob, CheckpointInfo, DiskBackup, Domain};
use crate::capture::guard::{Guard, GuardCommand, GuardSink};
use crate::capture::scratch::{self, Scratch};
use crate::capture::session::MemoryStream;
use crate::capture::undo::Sink;
use crate::capture::Freeze;
use crate::disk_reader::NbdDisk;
use crate::error::{Error, Result};

/// The stream holding the domain's definition (`virsh dumpxml --inactive`).
pub const DOMAIN_XML_STREAM: &str = "libvirt-domain.xml";

/// With `--memory`: the running domain's definition (`virsh dumpxml --migratable`), the one
/// the memory state loads into.
pub const RUNNING_XML_STREAM: &str = "libvirt-domain-running.xml";

/// What to capture and how.
#[derive(Clone, Debug, Default)]
pub struct LibvirtOptions {
    /// The domain's name or UUID.
    pub domain: String,
    /// libvirt's URI (`--connect`); None: virsh's default.
    pub uri: Option<String>,
    /// Read every disk whole (the checkpoint still rotates).
    pub full: bool,
    /// Quiesce the guest's filesystems through its agent (libvirt's `--quiesce`).
    pub freeze: Freeze,
    pub guard: Option<GuardCommand>,
    /// Where the scratch directory goes (default: the system temp dir).
    pub scratch_dir: Option<PathBuf>,
    /// This repository's checkpoint chain (`vmkeep-<chain>-<token>`).
    pub chain: String,
    pub chunk_size: u64,
    /// Capture RAM and device state too (needs `allow_qmp_passthrough`).
    pub memory: bool,
    /// With memory: QEMU's bandwidth for the stream in bytes/s (None: unlimited).
    pub memory_bandwidth: Option<u64>,
    /// The user accepts libvirt's monitor passthrough (libvirt then marks the domain tainted).
    pub allow_qmp_passthrough: bool,
}

/// One disk taking part.
struct LvDisk {
    target: String,
    size: u64,
    identity: String,
    /// libvirt keeps checkpoint bitmaps only in qcow2 images.
    bitmaps: bool,
    decision: Decision,
    /// The export and its dirty-bitmap name once the job runs.
    export: Option<(String, Option<String>)>,
}

/// A running capture; see the module docs.
pub struct LibvirtCapture {
    rt: Runtime,
    virsh: Virsh,
    domain: Domain,
    /// `virsh dumpxml --inactive`: the definition stored with the restore point.
    definition: String,
    scratch: Option<Scratch>,
    guard: Option<Guard>,
    sink: Option<GuardSink>,
    disks: Vec<LvDisk>,
    /// The checkpoint this backup creates.
    checkpoint: String,
    socket: PathBuf,
    job_running: bool,
    checkpoint_created: bool,
    opts: LibvirtOptions,
    ended: bool,
    /// With memory: the stream, its error end, the pipe's name in QEMU, what to put back.
    memory: Option<MemoryStream>,
    memory_abort: Option<crossbeam_channel::Sender<std::io::Result<Vec<u8>>>>,
    memory_fd: Option<String>,
    memory_undo: MemoryUndo,
    /// Where the memory state is recorded for a later capture: (scratch dir, domain UUID).
    memory_record: Option<(PathBuf, String)>,
    /// `virsh dumpxml --migratable` taken while suspended (with memory).
    running_definition: Option<String>,
    pause_ms: u64,
}

impl LibvirtCapture {
    /// Prepares the capture of the running domain `opts.domain`; `parent` is the restore point
    /// the backup builds on.
    pub fn start(opts: LibvirtOptions, parent: Option<&Manifest>) -> Result<LibvirtCapture> {
        if opts.memory && !opts.allow_qmp_passthrough {
            return Err(Error::Refused(format!(
                "--memory of libvirt domain {} goes through libvirt's QEMU monitor passthrough \
                 (libvirt has no API for a background memory snapshot), and libvirt marks a \
                 domain that used it as tainted (\"custom-monitor\"); allow it with \
                 --allow-qmp-passthrough, or back up the disks alone (without --memory)",
                opts.domain
            )));
        }
        let virsh = Virsh::new(opts.uri.clone(), opts.domain.clone());
        let state = virsh.domain_cmd("domstate", &[])?;
        let state = state.trim();
        if state != "running" && state != "paused" {
            return Err(Error::Refused(format!(
                "libvirt domain {} is {state}: libvirt's backup API needs it running (start it, or back up its images with `vmkeep backup image`)",
                opts.domain
            )));
        }
        let domain = xml::parse_domain(&virsh.domain_cmd("dumpxml", &[])?)?;
        let definition = virsh.domain_cmd("dumpxml", &["--inactive"])?;
        let base = opts.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
        for done in memory::settle_dead(&virsh, &base, &domain.uuid) {
            warn!("a killed vmkeep's memory capture: {done}");
        }
        settle_running_job(&virsh, &domain.name)?;
        let token = crate::capture::token();
        let scratch = Scratch::create(&base, &token)?;
        let socket = scratch.dir().join("nbd").join("nbd.sock");
        let guard = opts
            .guard
            .as_ref()
            .and_then(|g| Guard::start(g, scratch.lock_fd()));
        let sink = guard.as_ref().map(Guard::sink);
        let mut c = LibvirtCapture {
            rt: crate::capture::session::runtime()?,
            virsh,
            checkpoint: format!("{}{}-{token}", tracking::CHECKPOINT_PREFIX, opts.chain),
            domain,
            definition,
            scratch: Some(scratch),
            guard,
            sink,
            disks: Vec::new(),
            socket,
            job_running: false,
            checkpoint_created: false,
            opts,
            ended: false,
            memory: None,
            memory_abort: None,
            memory_fd: None,
            memory_undo: MemoryUndo::default(),
            memory_record: None,
            running_definition: None,
            pause_ms: 0,
        };
        let dir = c.scratch.as_ref().expect("made above").dir().to_path_buf();
        c.tell(GuardLine::Scratch(dir.clone()));
        open_to_qemu(&dir, &c.socket, c.domain.qemu_user)?;
        c.disks = c.plan_disks(parent)?;
        if c.disks.is_empty() {
            return Err(Error::Refused(format!(
                "libvirt domain {} has no writable disk to back up",
                c.domain.name
            )));
        }
        if c.opts.memory {
            c.memory_record = Some((dir.clone(), c.domain.uuid.clone()));
            c.prepare_memory(&token)?;
        }
        Ok(c)
    }

    /// Step 1 of [`super::memory`]: the pipe, its reader, QEMU's migration settings.
    fn prepare_memory(&mut self, token: &str) -> Result<()> {
        let (read, write) = crate::capture::session::pipe()?;
        let (sink, record) = (&mut self.sink, &self.memory_record);
        let r = memory::prepare(
            &self.virsh,
            std::os::fd::AsFd::as_fd(&write),
            token,
            self.opts.memory_bandwidth,
            &mut self.memory_undo,
            &mut |u| tell_memory(sink, record.as_ref(), u),
        );
        drop(write); // QEMU holds its own copy
        self.memory_fd = Some(r?);
        let (stream, abort) = MemoryStream::pump(std::fs::File::from(read))?;
        self.memory = Some(stream);
        self.memory_abort = Some(abort);
        Ok(())
    }

    fn tell(&mut self, line: GuardLine) {
        if let Some(s) = self.sink.as_mut() {
            s.line(&line.to_string());
        }
    }

    /// The disks to back up, their sizes and change tracking.
    fn plan_disks(&self, parent: Option<&Manifest>) -> Result<Vec<LvDisk>> {
        let sizes = self.disk_sizes()?;
        let wanted: Vec<&str> = parent
            .map(|p| {
                p.disks
                    .iter()
                    .filter_map(|d| d.checkpoint.as_ref().map(|c| c.bitmap.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        let checkpoints = self.checkpoints(&wanted)?;
        let mut out = Vec::new();
        for d in &self.domain.disks {
            if !d.backed_up() {
                info!(disk = %d.target, "not backed up: {}", d.skipped_because());
                continue;
            }
            let size = *sizes.get(&d.target).ok_or_else(|| {
                Error::Refused(format!(
                    "libvirt reports no capacity for disk {} of domain {}",
                    d.target, self.domain.name
                ))
            })?;
            let identity =
                tracking::source_identity(&self.domain.uuid, d.source.as_deref().unwrap_or(""));
            let bitmaps = d.format.as_deref() == Some("qcow2");
            let facts = DiskFacts {
                name: &d.target,
                size,
                identity: &identity,
                bitmaps,
            };
            let decision = tracking::decide(&facts, parent, self.opts.full, &checkpoints);
            out.push(LvDisk {
                target: d.target.clone(),
                size,
                identity,
                bitmaps,
                decision,
                export: None,
            });
        }
        Ok(out)
    }

    /// Every disk's capacity (`virsh domstats --block`), by target name.
    fn disk_sizes(&self) -> Result<HashMap<String, u64>> {
        let out = self.virsh.domain_cmd("domstats", &["--block"])?;
        Ok(parse_block_capacities(&out))
    }

    /// The checkpoints named in `wanted` that exist, read.
    fn checkpoints(&self, wanted: &[&str]) -> Result<HashMap<String, CheckpointInfo>> {
        let mut out = HashMap::new();
        if wanted.is_empty() {
            return Ok(out);
        }
        for name in self
            .virsh
            .checkpoint_names()?
            .iter()
            .filter(|n| wanted.contains(&n.as_str()))
        {
            let x = self
                .virsh
                .domain_cmd("checkpoint-dumpxml", &[name, "--no-domain"])?;
            let info = xml::parse_checkpoint(&x)?;
            out.insert(info.name.clone(), info);
        }
        Ok(out)
    }

    /// The instant: starts libvirt's backup job with this capture's checkpoint (and with
    /// memory, the background snapshot while the domain is suspended).
    pub fn cut(&mut self) -> Result<()> {
        let r = self.cut_inner();
        // The stream ends when QEMU closes the pipe, once this sender is gone too; after a
        // failure, with an error: the reader must not take a short stream for a whole one.
        if let Some(tx) = self.memory_abort.take() {
            if r.is_err() {
                let _ = tx.send(Err(std::io::Error::other("the capture failed")));
            }
        }
        r
    }

    fn cut_inner(&mut self) -> Result<()> {
        let suspended_at = match self.memory_fd.is_some() {
            true => self.suspend()?,
            false => None,
        };
        self.begin_job()?;
        if let Some(fd) = self.memory_fd.clone() {
            let (sink, record) = (&mut self.sink, &self.memory_record);
            memory::start_migration(&self.virsh, &fd, &mut self.memory_undo, &mut |u| {
                tell_memory(sink, record.as_ref(), u)
            })?;
            if let Some(t0) = suspended_at {
                self.virsh.domain_cmd("resume", &[])?;
                self.pause_ms = t0.elapsed().as_millis() as u64;
                self.memory_undo.suspended = false;
                tell_memory(
                    &mut self.sink,
                    self.memory_record.as_ref(),
                    &self.memory_undo,
                );
            }
        }
        self.read_job()
    }

    /// Suspends a running domain (announced to the guard first) and records the definition
    /// the memory state belongs to; when it started.
    fn suspend(&mut self) -> Result<Option<std::time::Instant>> {
        let state = self.virsh.domain_cmd("domstate", &[])?;
        // Before the pause, which is short by as much (libvirt holds devices steady meanwhile
        // unless someone hot-plugs in these milliseconds).
        self.running_definition = Some(self.virsh.domain_cmd("dumpxml", &["--migratable"])?);
        let t0 = std::time::Instant::now();
        let suspended = state.trim() == "running";
        if suspended {
            self.memory_undo.suspended = true;
            tell_memory(
                &mut self.sink,
                self.memory_record.as_ref(),
                &self.memory_undo,
            );
            self.virsh.domain_cmd("suspend", &[])?;
            vmkeep_io::kill_point("libvirt-after-suspend");
        }
        Ok(suspended.then_some(t0))
    }

    /// libvirt's backup job, retried while a broken checkpoint turns into a rescan.
    fn begin_job(&mut self) -> Result<()> {
        let dir = self
            .scratch
            .as_ref()
            .expect("capture open")
            .dir()
            .to_path_buf();
        self.tell(GuardLine::Job(self.socket.clone()));
        self.tell(GuardLine::Checkpoint(self.checkpoint.clone()));
        // Each round either starts the job or turns one broken checkpoint into a rescan.
        for _ in 0..=self.disks.len() {
            match self.begin(&dir) {
                Ok(()) => {
                    self.job_running = true;
                    self.checkpoint_created = true;
                    vmkeep_io::kill_point("libvirt-after-begin");
                    return Ok(());
                }
                Err(Error::Libvirt { command, message }) => {
                    // A checkpoint of an incremental disk whose bitmap QEMU lost: read it whole.
                    let broken = virsh::broken_bitmap(&message).and_then(|(checkpoint, disk)| {
                        let d = self
                            .disks
                            .iter_mut()
                            .find(|d| d.target == disk && d.decision.since.is_some())?;
                        Some((checkpoint, d))
                    });
                    let Some((checkpoint, d)) = broken else {
                        return Err(explain_begin_error(
                            Error::Libvirt { command, message },
                            &self.domain.name,
                        ));
                    };
                    let disk = &d.target;
                    warn!(disk = %disk, checkpoint = %checkpoint, "checkpoint bitmap broken; reading the disk whole");
                    d.decision = Decision::broken(&checkpoint);
                }
                Err(e) => return Err(explain_begin_error(e, &self.domain.name)),
            }
        }
        Err(Error::Refused(
            "libvirt kept refusing the backup's checkpoints".into(),
        ))
    }

    fn begin(&mut self, dir: &Path) -> Result<()> {
        let mut parts = Vec::new();
        let mut marks = Vec::new();
        for d in &self.domain.disks {
            let Some(ours) = self.disks.iter().find(|x| x.target == d.target) else {
                parts.push((d.target.clone(), DiskBackup::Skip));
                continue;
            };
            let scratch = dir
                .join(format!("{}.scratch", ours.target))
                .display()
                .to_string();
            let how = match &ours.decision.since {
                Some(since) => DiskBackup::Incremental {
                    since: since.clone(),
                    scratch,
                },
                None => DiskBackup::Full { scratch },
            };
            parts.push((d.target.clone(), how));
            marks.push((d.target.clone(), ours.bitmaps));
        }
        let backup = dir.join("backup.xml");
        let checkpoint = dir.join("checkpoint.xml");
        write_file(
            &backup,
            &xml::backup_xml(&self.socket.display().to_string(), &parts),
        )?;
        write_file(
            &checkpoint,
            &xml::checkpoint_xml(
                &self.checkpoint,
                &format!("vmkeep restore point chain {}", self.opts.chain),
                &marks,
            ),
        )?;
        let b = backup.display().to_string();
        let c = checkpoint.display().to_string();
        let quiesce = match self.opts.freeze {
            _ if self.opts.memory => false, // see the module docs
            Freeze::Off => false,
            Freeze::On => true,
            Freeze::Auto => self.domain.agent,
        };
        let mut args = vec![b.as_str(), c.as_str()];
        if quiesce {
            args.push("--quiesce");
        }
        match self.virsh.domain_cmd("backup-begin", &args) {
            Err(e @ Error::Libvirt { .. })
                if quiesce && self.opts.freeze == Freeze::Auto && is_agent_error(&e) =>
            {
                warn!(error = %e, "the guest agent did not quiesce the filesystems; capturing without");
                self.virsh.domain_cmd("backup-begin", &args[..2]).map(drop)
            }
            r => r.map(drop),
        }
    }

    /// The running job's exports.
    fn read_job(&mut self) -> Result<()> {
        let job = xml::parse_backup_job(&self.virsh.domain_cmd("backup-dumpxml", &[])?)?;
        for d in &mut self.disks {
            let (_, export, bitmap) = job
                .exports
                .iter()
                .find(|(name, _, _)| *name == d.target)
                .ok_or_else(|| {
                    Error::Refused(format!(
                        "libvirt's backup job has no export for disk {}",
                        d.target
                    ))
                })?;
            d.export = Some((export.clone(), bitmap.clone()));
        }
        Ok(())
    }

    pub fn open_disk(&mut self, i: usize) -> Result<(Box<dyn DiskReader + Send>, ReadPlan)> {
        let cs = self.opts.chunk_size;
        let d = &self.disks[i];
        let (export, bitmap) = d.export.clone().expect("cut before open_disk");
        let used = d.decision.cbt == ChangeTracking::Used;
        let bitmap = bitmap.filter(|_| used);
        if used && bitmap.is_none() {
            return Err(Error::Refused(format!(
                "libvirt exported disk {} without the dirty bitmap of its incremental backup",
                d.target
            )));
        }
        let disk = NbdDisk::connect_unix(
            self.rt.handle().clone(),
            &self.socket,
            &export,
            bitmap.as_deref(),
            format!(
                "disk {} of libvirt domain {} via NBD",
                d.target, self.domain.name
            ),
        )?;
        if disk.client().size() != d.size {
            return Err(Error::Refused(format!(
                "disk {} changed size during the backup ({} bytes, now {})",
                d.target,
                d.size,
                disk.client().size()
            )));
        }
        let runs = match &bitmap {
            Some(b) => disk.dirty_runs(b, cs)?,
            None => disk.allocated_runs(cs),
        };
        let plan = ReadPlan {
            base: d.decision.base,
            runs,
            zero_runs: disk.zero_runs(cs),
            cbt: d.decision.cbt,
            cbt_reason: d.decision.reason.clone(),
            checkpoint: d.bitmaps.then(|| Checkpoint {
                bitmap: self.checkpoint.clone(),
                node: d.target.clone(),
                granularity: 0,
                source: d.identity.clone(),
            }),
            source_identity: None,
        };
        Ok((Box::new(disk), plan))
    }

    /// After the memory stream ended: the snapshot completed, QEMU's settings put back.
    pub fn memory_done(&mut self) -> Result<()> {
        self.memory_abort = None;
        if self.memory_fd.is_none() {
            return Ok(());
        }
        memory::check_completed(&self.virsh, &mut self.memory_undo)?;
        memory::undo(&self.virsh, &mut self.memory_undo);
        tell_memory(
            &mut self.sink,
            self.memory_record.as_ref(),
            &self.memory_undo,
        );
        Ok(())
    }

    /// Ends libvirt's backup job (a pull-mode job ends when it is aborted).
    pub fn release(&mut self) -> Result<()> {
        if self.job_running {
            self.virsh.domain_cmd("domjobabort", &[])?;
            self.job_running = false;
            self.tell(GuardLine::JobEnded);
        }
        Ok(())
    }

    pub fn finish(mut self, committed: bool) {
        if committed {
            self.tell(GuardLine::Committed);
            vmkeep_io::kill_point("libvirt-after-commit");
            // This chain's older checkpoints belong to restore points no longer the latest;
            // each keeps a bitmap recording every guest write.
            match self.virsh.checkpoint_names() {
                Ok(names) => {
                    for old in names.iter().filter(|n| {
                        tracking::of_chain(n, &self.opts.chain) && **n != self.checkpoint
                    }) {
                        delete_checkpoint(&self.virsh, old);
                    }
                }
                Err(e) => warn!(error = %e, "cannot list the older checkpoints to retire them"),
            }
            self.checkpoint_created = false; // kept: the next backup starts from it
        }
        self.end();
    }

    /// Undoes what is still pending: the job, an uncommitted checkpoint, the scratch directory.
    fn end(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.memory = None; // a migration still writing fails at once on a closed pipe
        self.memory_abort = None;
        if !self.memory_undo.is_empty() {
            memory::undo(&self.virsh, &mut self.memory_undo);
            tell_memory(
                &mut self.sink,
                self.memory_record.as_ref(),
                &self.memory_undo,
            );
        }
        if self.job_running {
            if let Err(e) = self.virsh.domain_cmd("domjobabort", &[]) {
                warn!(error = %e, "cannot end libvirt's backup job");
            }
            self.job_running = false;
        }
        if self.checkpoint_created {
            delete_checkpoint(&self.virsh, &self.checkpoint);
            self.checkpoint_created = false;
        }
        self.tell(GuardLine::Finished);
        if let Some(g) = self.guard.take() {
            g.finish();
        }
        if let Some(s) = self.scratch.take() {
            s.remove();
        }
    }
}

/// What QEMU, running as the domain's user, needs of the scratch directory: to reach the
/// scratch images libvirt creates in it (the directory becomes 0711: passable, not listable
/// nor writable), and to bind the NBD socket itself, in a subdirectory of its own. Nothing
/// else in the directory is QEMU's to change: a compromised QEMU must not be able to replace
/// the XML libvirt reads as root, nor plant a link where libvirt creates a scratch image.
fn open_to_qemu(dir: &Path, socket: &Path, user: Option<(u32, u32)>) -> Result<()> {
    if socket.as_os_str().len() >= 100 {
        return Err(Error::Refused(format!(
            "the scratch path {} is too long for the NBD socket libvirt creates; choose a shorter one with --scratch-dir",
            dir.display()
        )));
    }
    let nbd = socket.parent().expect("the socket is in a folder");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(nbd)
        .map_err(|e| Error::io("create the NBD socket's folder", e))?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(nbd, Some(uid), Some(gid))
            .map_err(|e| Error::io("hand the NBD socket's folder to QEMU's user", e))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| Error::io("open the scratch directory to QEMU", e))
}

/// Deletes a checkpoint, merging its bitmap into its parent's. A checkpoint whose bitmap QEMU
/// lost can only lose its metadata.
pub(crate) fn delete_checkpoint(virsh: &Virsh, name: &str) {
    match virsh.domain_cmd("checkpoint-delete", &[name]) {
        Ok(_) => info!(checkpoint = name, "deleted libvirt checkpoint"),
        Err(Error::Libvirt { message, .. })
            if message.contains("not found in backing chain")
                || message.contains("missing or broken bitmap") =>
        {
            match virsh.domain_cmd("checkpoint-delete", &[name, "--metadata"]) {
                Ok(_) => info!(
                    checkpoint = name,
                    "deleted libvirt checkpoint whose bitmap was lost"
                ),
                Err(e) => warn!(error = %e, checkpoint = name, "cannot delete libvirt checkpoint"),
            }
        }
        Err(Error::Libvirt { message, .. }) if message.contains("no domain checkpoint") => {}
        Err(e) => warn!(error = %e, checkpoint = name, "cannot delete libvirt checkpoint"),
    }
}

/// A job already running on the domain: a dead vmkeep's backup job is aborted; any other job
/// is refused with who runs it and what to do.
fn settle_running_job(virsh: &Virsh, domain: &str) -> Result<()> {
    let info = virsh.domain_cmd("domjobinfo", &[])?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let kind = field("Job type:").unwrap_or_else(|| "None".into());
    if kind == "None" {
        return Ok(());
    }
    let operation = field("Operation:").unwrap_or_else(|| "unknown".into());
    if operation != "Backup" {
        return Err(Error::Refused(format!(
            "libvirt domain {domain} is running a {operation} job; run the backup when it has ended (`virsh domjobinfo {domain}`)"
        )));
    }
    let job = virsh
        .domain_cmd("backup-dumpxml", &[])
        .and_then(|x| xml::parse_backup_job(&x))
        .unwrap_or(BackupJob {
            mode: "unknown".into(),
            socket: None,
            exports: Vec::new(),
        });
    // The socket is DIR/nbd/nbd.sock in a capture's scratch directory DIR.
    if let Some(dir) = job
        .socket
        .as_deref()
        .map(Path::new)
        .and_then(|s| s.ancestors().find(|a| scratch::is_capture_dir_name(a)))
        .filter(|d| scratch::is_dead_capture_dir(d))
    {
        warn!(dir = %dir.display(), "aborting the backup job a killed vmkeep left on the domain");
        virsh.domain_cmd("domjobabort", &[])?;
        let _ = std::fs::remove_dir_all(dir);
        return Ok(());
    }
    let by = match &job.socket {
        Some(s) if s.contains(scratch::DIR_PREFIX) => {
            format!("by another vmkeep, still running (NBD socket {s})")
        }
        Some(s) => format!("by another tool, such as virtnbdbackup (NBD socket {s})"),
        None => format!("by another tool ({} mode)", job.mode),
    };
    Err(Error::Refused(format!(
        "libvirt domain {domain} already has a backup job, started {by}; libvirt allows one at a time: wait until it ends, or end it with `virsh domjobabort {domain}`"
    )))
}

/// A failed `backup-begin` in a user's words where libvirt's are opaque.
fn explain_begin_error(e: Error, domain: &str) -> Error {
    match &e {
        Error::Libvirt { message, .. }
            if message.contains("already") && message.contains("job") =>
        {
            Error::Refused(format!(
                "libvirt domain {domain} started another job just now ({message}); libvirt allows one backup at a time: try again when it has ended"
            ))
        }
        Error::Libvirt { message, .. } if message.contains("nbd-server-start") => {
            Error::Refused(format!(
                "QEMU of domain {domain} cannot start the backup's NBD server ({message}); QEMU runs one NBD server at a time, so another tool's export may be open: end it, then try again"
            ))
        }
        _ => e,
    }
}

fn is_agent_error(e: &Error) -> bool {
    e.to_string().to_lowercase().contains("agent")
}

/// Sends the memory state to the guard, if there is one, and records it in the scratch
/// directory for the next capture in case the guard dies too ([`memory::settle_dead`]).
fn tell_memory(
    sink: &mut Option<GuardSink>,
    record: Option<&(PathBuf, String)>,
    state: &MemoryUndo,
) {
    if let Some((dir, uuid)) = record {
        memory::save(dir, uuid, state);
    }
    if let Some(s) = sink.as_mut() {
        s.line(&GuardLine::Memory(state.clone()).to_string());
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    // libvirt reads these as root; nobody else needs them.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))
}

/// `block.N.name=vda` / `block.N.capacity=BYTES` lines of `virsh domstats --block`.
fn parse_block_capacities(out: &str) -> HashMap<String, u64> {
    let mut names: HashMap<&str, &str> = HashMap::new();
    let mut caps: HashMap<&str, u64> = HashMap::new();
    for l in out.lines().map(str::trim) {
        let Some(rest) = l.strip_prefix("block.") else {
            continue;
        };
        let Some((key, value)) = rest.split_once('=') else {
            continue;
        };
        let Some((idx, field)) = key.split_once('.') else {
            continue;
        };
        match field {
            "name" => {
                names.insert(idx, value);
            }
            "capacity" => {
                if let Ok(v) = value.parse() {
                    caps.insert(idx, v);
                }
            }
            _ => {}
        }
    }
    names
        .into_iter()
        .filter_map(|(idx, name)| caps.get(idx).map(|c| (name.to_string(), *c)))
        .collect()
}

impl VmSource for LibvirtCapture {
    fn cut(&mut self) -> Result<(), SourceError> {
        LibvirtCapture::cut(self).map_err(Into::into)
    }
    fn disks(&self) -> Vec<SourceDisk> {
        self.disks
            .iter()
            .map(|d| SourceDisk {
                name: d.target.clone(),
                size: d.size,
            })
            .collect()
    }
    fn take_memory(&mut self) -> Option<Box<dyn Read + Send>> {
        self.memory
            .take()
            .map(|m| Box::new(m) as Box<dyn Read + Send>)
    }
    fn config_streams(&mut self) -> Vec<(String, Box<dyn Read + Send>)> {
        let stream = |name: &str, text: &str| -> (String, Box<dyn Read + Send>) {
            (
                name.to_string(),
                Box::new(std::io::Cursor::new(text.as_bytes().to_vec())),
            )
        };
        let mut out = vec![stream(DOMAIN_XML_STREAM, &self.definition)];
        if let Some(running) = &self.running_definition {
            out.push(stream(RUNNING_XML_STREAM, running));
        }
        out
    }
    fn memory_done(&mut self) -> Result<(), SourceError> {
        LibvirtCapture::memory_done(self).map_err(Into::into)
    }
    fn open_disk(
        &mut self,
        i: usize,
    ) -> Result<(Box<dyn DiskReader + Send>, ReadPlan), SourceError> {
        LibvirtCapture::open_disk(self, i).map_err(Into::into)
    }
    fn release(&mut self) -> Result<(), SourceError> {
        LibvirtCapture::release(self).map_err(Into::into)
    }
    fn pause_ms(&self) -> u64 {
        // Without memory libvirt's transaction does not stop the vCPUs.
        self.pause_ms
    }
    fn finish(self: Box<Self>, committed: bool) -> Result<(), SourceError> {
        LibvirtCapture::finish(*self, committed);
        Ok(())
    }
}

impl Drop for LibvirtCapture {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_come_by_target_name() {
        let out = "Domain: 'web1'\n  block.count=2\n  block.0.name=vda\n  block.0.path=/a.qcow2\n  block.0.capacity=33554432\n  block.1.name=vdb\n  block.1.capacity=1048576\n  block.2.name=sda\n";
        let c = parse_block_capacities(out);
        assert_eq!(c.get("vda"), Some(&33554432));
        assert_eq!(c.get("vdb"), Some(&1048576));
        assert_eq!(c.get("sda"), None);
    }
}
