//! [`QmpCapture`]: a capture of a VM (or of images behind our qemu-storage-daemon) through its
//! QMP monitor, as a sequence of phases over one undo log:
//!
//! leftovers of dead captures undone -> disks listed and decisions taken (checkpoints repaired)
//! -> scratch directory, log and guard -> [`cut::prepare`] -> memory prepared -> freeze ->
//! [`cut::cut`] -> `cont`, thaw -> [`cut::export`] -> (the caller reads memory, then disks)
//! -> [`QmpCapture::release`] (teardown) -> the caller commits -> [`QmpCapture::finish`].
//!
//! Any error, and a capture dropped without `finish`, runs the executor over the whole log.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tracing::{info, warn};
use vmkeep_core::manifest::{ChangeTracking, Checkpoint, Manifest};
use vmkeep_io::{DiskReader, ReadPlan, SourceDisk, SourceError, VmSource};

use super::cut::{self, CutDisk};
use super::executor::{self, Scope};
use super::guard::{Guard, GuardCommand};
use super::scratch::{self, Scratch};
use super::undo::{Undo, UndoLog};
use super::{cbt, disks, leftovers, Freeze, VmDisk};
use crate::disk_reader::NbdDisk;
use crate::error::{Error, Result};
use crate::qmp::{EventStream, QmpClient};

/// What to capture and how.
#[derive(Clone, Debug, Default)]
pub struct CaptureOptions {
    /// The VM's QMP socket.
    pub qmp: PathBuf,
    /// Ignore change tracking (the checkpoint still rotates).
    pub full: bool,
    /// Keep the VM stopped from the cut until the disks are read (mechanism 5).
    pub suspend: bool,
    pub freeze: Freeze,
    /// Capture RAM and device state at the same instant as the disks.
    pub memory: bool,
    /// QEMU's bandwidth for the memory stream in bytes/s (None: unlimited). QEMU's own default
    /// (128 MiB/s) would keep the guest's RAM write-protected several times longer.
    pub memory_bandwidth: Option<u64>,
    /// The guard to start (see [`super::guard`]); None runs without one.
    pub guard: Option<GuardCommand>,
    /// Where scratch images go (default: the system temp dir).
    pub scratch_dir: Option<PathBuf>,
    /// Names this repository's checkpoint chain in bitmap names (`vmkeep-<chain>-<token>`), so
    /// chains of several repositories on one VM never touch each other's bitmaps.
    pub chain: String,
    /// The repository's chunk size (read plans are in chunks).
    pub chunk_size: u64,
    /// The VM's command line from a file (`--vm-config`) instead of its QEMU process.
    pub vm_config: Option<PathBuf>,
}

/// A running capture; see the module docs.
pub struct QmpCapture {
    rt: Runtime,
    qmp: Option<QmpClient>,
    log: UndoLog,
    scratch: Option<Scratch>,
    guard: Option<Guard>,
    disks: Vec<CutDisk>,
    nbd_socket: PathBuf,
    pid: Option<u32>,
    events: Option<EventStream>,
    memory: Option<MemoryStream>,
    memory_abort: Option<crossbeam_channel::Sender<std::io::Result<Vec<u8>>>>,
    memory_target: Option<cut::MemoryTarget>,
    agent: Option<(PathBuf, super::agent::Agent)>,
    memory_taken: bool,
    /// Collapsing the guest's RAM back into huge pages after the memory stream (see
    /// [`super::hugepages`]); joined at the end.
    rehuge: Option<std::thread::JoinHandle<super::hugepages::Report>>,
    /// Our `cont` was answered with RESUME: a STOP after it moves the memory instant.
    resumed: bool,
    instant_moved: bool,
    pause_ms: u64,
    /// `BLOCK_IO_ERROR`s the guest hit during the capture.
    io_errors: Vec<String>,
    no_tracking: Option<String>,
    /// The VM's definition (stored as a stream beside the disks).
    definition: Option<crate::vmdef::VmDefinition>,
    opts: CaptureOptions,
    ended: bool,
}

pub(crate) fn runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the async runtime", e))
}

impl QmpCapture {
    /// Captures the running VM behind `opts.qmp`; `parent` is the restore point the backup
    /// builds on (its checkpoints decide what change tracking can be used).
    pub fn start(opts: CaptureOptions, parent: Option<&Manifest>) -> Result<QmpCapture> {
        let rt = runtime()?;
        let base = scratch_base(&opts);
        let mine = leftovers::claim_dead_captures(&base, &opts.qmp)?;
        let qmp = rt.block_on(QmpClient::connect(&opts.qmp))?;
        rt.block_on(leftovers::undo_dead_captures(&qmp, mine));
        match rt.block_on(leftovers::recover_by_name(&qmp)) {
            Ok(done) => done
                .iter()
                .for_each(|d| warn!("leftover of an interrupted capture: {d}")),
            Err(e) => warn!(error = %e, "cannot look for leftovers of interrupted captures"),
        }
        if let Err(e) = rt.block_on(super::coexist::refuse_foreign_jobs(&qmp)) {
            rt.block_on(qmp.close());
            return Err(e);
        }
        let pid = super::peer::listener_pid(&opts.qmp);
        let vm_disks = match rt.block_on(disks::list_disks(&qmp)) {
            Ok(d) => d,
            Err(e) => {
                rt.block_on(qmp.close());
                return Err(e);
            }
        };
        if vm_disks.is_empty() {
            rt.block_on(qmp.close());
            return Err(Error::Refused(format!(
                "VM behind {} has no writable disk to back up",
                opts.qmp.display()
            )));
        }
        let source = match &opts.vm_config {
            Some(f) => crate::vmdef::ArgsSource::File(f.clone()),
            None => match pid {
                Some(pid) => crate::vmdef::ArgsSource::Process(pid),
                None => crate::vmdef::ArgsSource::QmpPeer,
            },
        };
        let definition = match rt.block_on(crate::vmdef::capture_definition(&qmp, &source)) {
            Ok(d) => Some(d),
            // Without memory a restore point is still worth its disks; with it, recovery
            // needs the definition.
            Err(e) if !opts.memory => {
                warn!(error = %e, "the VM's definition is not recorded (recover needs --vm-config then)");
                None
            }
            Err(e) => {
                rt.block_on(qmp.close());
                // Say what to do once: most causes already end with the --vm-config advice.
                let e = e.to_string();
                let advice = if e.contains("--vm-config") {
                    ""
                } else {
                    " (give its command line with --vm-config FILE)"
                };
                return Err(Error::Refused(format!(
                    "cannot record the VM's definition, which --memory needs to resume it: \
                     {e}{advice}"
                )));
            }
        };
        let mut c = Self::start_on(rt, qmp, vm_disks, pid, opts, parent)?;
        c.definition = definition;
        Ok(c)
    }

    /// The capture of `vm_disks` over an open monitor (also used for images behind our
    /// qemu-storage-daemon, whose disks have no device and need no filter).
    pub(crate) fn start_on(
        rt: Runtime,
        qmp: QmpClient,
        vm_disks: Vec<VmDisk>,
        pid: Option<u32>,
        opts: CaptureOptions,
        parent: Option<&Manifest>,
    ) -> Result<QmpCapture> {
        let mut c = QmpCapture {
            rt,
            qmp: Some(qmp),
            log: UndoLog::in_memory(),
            scratch: None,
            guard: None,
            disks: Vec::new(),
            nbd_socket: PathBuf::new(),
            pid,
            events: None,
            memory: None,
            memory_abort: None,
            memory_target: None,
            agent: None,
            memory_taken: false,
            rehuge: None,
            resumed: false,
            instant_moved: false,
            pause_ms: 0,
            io_errors: Vec::new(),
            no_tracking: None,
            definition: None,
            opts,
            ended: false,
        };
        match c.setup(vm_disks, parent) {
            Ok(()) => Ok(c),
            Err(e) => {
                c.end(false);
                Err(e)
            }
        }
    }

    fn qmp(&self) -> &QmpClient {
        self.qmp.as_ref().expect("capture open")
    }

    fn setup(&mut self, vm_disks: Vec<VmDisk>, parent: Option<&Manifest>) -> Result<()> {
        let token = super::token();
        let chain = if self.opts.chain.is_empty() {
            String::from("0")
        } else {
            self.opts.chain.clone()
        };
        let new_bitmap = format!("{}{chain}-{token}", cbt::BITMAP_PREFIX);
        self.disks = self.decide(vm_disks, parent, &token, &new_bitmap);

        // Scratch directory, log and guard: from here every change is recorded first.
        let scratch = Scratch::create(&scratch_base(&self.opts), &token)?;
        self.check_space(&scratch);
        self.log = UndoLog::create(&scratch.log_path())
            .map_err(|e| Error::io("create the capture's undo log", e))?;
        if let Some(cmd) = &self.opts.guard {
            if let Some(g) = Guard::start(cmd, scratch.lock_fd()) {
                self.log.add_sink(Box::new(g.sink()));
                self.guard = Some(g);
            }
        }
        self.log.record(Undo::Monitor {
            qmp: self.opts.qmp.clone(),
            scratch: Some(scratch.dir().to_path_buf()),
        });
        let scratch = self.scratch.insert(scratch);

        let qmp = self.qmp.as_ref().expect("capture open");
        self.nbd_socket = self.rt.block_on(cut::prepare(
            qmp,
            &mut self.log,
            scratch,
            &self.disks,
            &token,
            self.pid,
            &self.opts.qmp,
        ))?;
        let memory = if self.opts.memory {
            let (read, write) = pipe()?;
            let target = self.rt.block_on(cut::prepare_memory(
                qmp,
                &mut self.log,
                std::os::fd::AsFd::as_fd(&write),
                &token,
                self.opts.memory_bandwidth,
            ))?;
            drop(write); // QEMU holds its own copy
            let (stream, abort) = MemoryStream::pump(File::from(read))?;
            self.memory = Some(stream);
            self.memory_abort = Some(abort);
            Some(target)
        } else {
            None
        };
        self.agent = self
            .rt
            .block_on(super::connect_agent(qmp, self.opts.freeze))?;
        self.memory_target = memory;
        Ok(())
    }

    /// The cut (see [`cut::cut`]) and the exports. The guest is paused from `stop` to `cont`.
    /// With memory, the caller must be reading the memory stream meanwhile (QEMU cannot
    /// `cont` while its migration is blocked on a full pipe): [`VmSource::cut`] runs on its own
    /// thread while the repository reads.
    pub fn cut(&mut self) -> Result<()> {
        let r = self.cut_and_export();
        if r.is_ok() {
            // Only the pump's sender is left: the stream ends when QEMU's does.
            self.memory_abort = None;
        }
        if r.is_err() {
            // The reader of the memory stream must not wait for bytes that never come.
            if let Some(tx) = self.memory_abort.take() {
                let _ = tx.try_send(Err(std::io::Error::other("the capture failed")));
            }
        }
        r
    }

    fn cut_and_export(&mut self) -> Result<()> {
        let qmp = self.qmp.as_ref().expect("capture open");
        let memory = self.memory_target.take();
        let mut agent = self.agent.take();
        let mut events = qmp.events();
        let rt = &self.rt;
        let log = &mut self.log;
        let disks = &mut self.disks;
        let freeze_required = self.opts.freeze == Freeze::On;
        let suspend = self.opts.suspend;
        let r: Result<()> = rt.block_on(async {
            let thaw = match agent.as_mut() {
                Some((path, a)) => Some(cut::freeze(log, a, path, freeze_required).await?),
                None => None,
            };
            let outcome = cut::cut(qmp, log, disks, memory.as_ref()).await?;
            if let (Some(seq), false) = (outcome.resume, suspend) {
                cut::resume(qmp, log, seq).await?;
            }
            if let (Some(seq), Some((_, a))) = (thaw, agent.as_mut()) {
                match a.thaw().await {
                    Ok(_) => log.done(seq),
                    Err(e) => warn!(error = %e, "could not thaw the guest's filesystems"),
                }
            }
            self.no_tracking = outcome.no_tracking;
            Ok(())
        });
        drop(agent);
        let (pause, seen) = self.rt.block_on(cut::pauses(&mut events));
        self.pause_ms = pause;
        self.note_events(&seen);
        self.events = Some(events);
        r?;
        vmkeep_io::kill_point("capture-after-fleece");
        let qmp = self.qmp.as_ref().expect("capture open");
        self.rt
            .block_on(cut::export(qmp, &mut self.log, &self.disks))?;
        Ok(())
    }

    /// Change-tracking decisions, with stale bitmaps removed and disabled checkpoints repaired
    /// from the recording bitmaps of dead captures (tracking problems never fail a backup).
    fn decide(
        &mut self,
        vm_disks: Vec<VmDisk>,
        parent: Option<&Manifest>,
        token: &str,
        new_bitmap: &str,
    ) -> Vec<CutDisk> {
        let qmp = self.qmp.as_ref().expect("capture open");
        let mut out = Vec::new();
        for (i, d) in vm_disks.into_iter().enumerate() {
            let file = super::canonical(&d.file);
            let mut dec = cbt::decide(
                &cbt::DiskFacts {
                    name: &d.name,
                    size: d.size,
                    bitmaps: &d.bitmaps,
                    file: &file,
                    pid: self.pid,
                    not_persistent: d.not_persistent.as_deref(),
                    new_bitmap,
                },
                parent,
                self.opts.full,
            );
            for stale in &dec.remove_stale {
                if let Err(e) = self
                    .rt
                    .block_on(qmp.block_dirty_bitmap_remove(&d.node, stale))
                {
                    warn!(error = %e, bitmap = %stale, "cannot remove a stale bitmap");
                }
            }
            if let (false, Some(p)) = (dec.repair.is_empty(), dec.previous.clone()) {
                match self.rt.block_on(repair(qmp, &d.node, &p, &dec.repair)) {
                    Ok(()) => info!(disk = %d.name, checkpoint = %p, orphans = ?dec.repair,
                        "checkpoint of an interrupted capture repaired"),
                    Err(e) => {
                        warn!(error = %e, disk = %d.name, "cannot repair the checkpoint; rescanning");
                        dec.cbt = ChangeTracking::Rescan;
                        dec.reason =
                            Some("bitmap not recording (an earlier backup was interrupted)".into());
                        dec.export_bitmap = None;
                        dec.base = None;
                        dec.repair.clear();
                    }
                }
            }
            out.push(CutDisk::new(d, dec, token, i, new_bitmap));
        }
        out
    }

    /// The worst case: every block of every disk rewritten while it is read.
    fn check_space(&self, scratch: &Scratch) {
        let worst: u64 = self
            .disks
            .iter()
            .filter(|d| d.vm.qdev.is_some())
            .map(|d| d.vm.size)
            .sum();
        if let Some(free) = scratch.free_bytes() {
            if free < worst {
                warn!(
                    "scratch space {} has {} MiB free; if the guest rewrote whole disks during \
                     the backup it would need {} MiB. Running out fails the backup (never the \
                     guest); --scratch-dir chooses a larger filesystem",
                    scratch.dir().display(),
                    free >> 20,
                    worst >> 20
                );
            }
        }
    }

    fn note_events(&mut self, seen: &[crate::qmp::QmpEvent]) {
        for e in seen {
            match e.event.as_str() {
                "RESUME" => self.resumed = true,
                "STOP" if self.resumed => self.instant_moved = true,
                "BLOCK_IO_ERROR" => self.io_errors.push(format!(
                    "{} ({}{})",
                    e.data["device"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| e.data["node-name"].as_str().unwrap_or("?")),
                    e.data["operation"].as_str().unwrap_or("?"),
                    if e.data["nospace"].as_bool() == Some(true) {
                        ", no space"
                    } else {
                        ""
                    }
                )),
                _ => {}
            }
        }
    }

    fn drain_events(&mut self) {
        if let Some(mut ev) = self.events.take() {
            let (_, seen) = self.rt.block_on(cut::pauses(&mut ev));
            self.note_events(&seen);
            self.events = Some(ev);
        }
    }

    fn check_guest(&mut self) -> Result<()> {
        self.drain_events();
        if self.io_errors.is_empty() {
            return Ok(());
        }
        Err(Error::Refused(format!(
            "the guest hit I/O errors during the capture: {}; the capture was abandoned (its \
             scratch space freed) and a VM it stopped resumed. If the scratch directory shares \
             a filesystem with the VM's images, choose another with --scratch-dir",
            self.io_errors.join(", ")
        )))
    }

    /// Undoes what is left: teardown, or everything (bitmaps per `committed`).
    fn end(&mut self, committed: bool) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.memory = None; // a migration still writing fails at once on a closed pipe
        self.memory_abort = None;
        self.agent = None;
        if let Some(qmp) = self.qmp.take() {
            let pending = self.log.pending().to_vec();
            let out = self
                .rt
                .block_on(executor::undo(&qmp, &pending, Scope::All { committed }));
            for seq in &out.done {
                self.log.done(*seq);
            }
            for l in &out.lines {
                info!("capture undo: {l}");
            }
            if let Some(e) = &out.first_error {
                warn!(error = %e, "capture cleanup incomplete");
            }
            // A VM stopped by an I/O error during our capture (our scratch space shared its
            // filesystem) runs again now that the space is freed.
            if !self.io_errors.is_empty() {
                if let Ok(st) = self.rt.block_on(qmp.query_status()) {
                    if st.status == "io-error" {
                        warn!("resuming the VM stopped by an I/O error during the capture");
                        let _ = self.rt.block_on(qmp.cont());
                    }
                }
            }
            if out.first_error.is_none() {
                self.log.finished();
            }
            self.rt.block_on(qmp.close());
            if out.first_error.is_some() {
                // Leave the directory (and its log) for the next capture to finish the undo;
                // the lock goes with this process.
                self.scratch = None;
            }
        }
        if let Some(s) = self.scratch.take() {
            s.remove();
        }
        if let Some(g) = self.guard.take() {
            g.finish();
        }
        if let Some(t) = self.rehuge.take() {
            let _ = t.join();
        }
    }
}

/// Merges the recording bitmaps a dead capture left into the checkpoint it disabled.
async fn repair(qmp: &QmpClient, node: &str, checkpoint: &str, orphans: &[String]) -> Result<()> {
    use crate::qmp::{BitmapRef, TransactionAction};
    let mut actions = vec![TransactionAction::BlockDirtyBitmapMerge {
        node: node.to_string(),
        target: checkpoint.to_string(),
        bitmaps: orphans.iter().map(|o| BitmapRef::name(o)).collect(),
    }];
    actions.push(TransactionAction::BlockDirtyBitmapEnable {
        node: node.to_string(),
        name: checkpoint.to_string(),
    });
    for o in orphans {
        actions.push(TransactionAction::BlockDirtyBitmapRemove {
            node: node.to_string(),
            name: o.clone(),
        });
    }
    qmp.transaction(&actions).await
}

fn scratch_base(opts: &CaptureOptions) -> PathBuf {
    opts.scratch_dir.clone().unwrap_or_else(std::env::temp_dir)
}

pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array; we take ownership of both.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io(
            "create the memory pipe",
            std::io::Error::last_os_error(),
        ));
    }
    // A larger pipe means fewer wake-ups for QEMU's migration thread (best effort).
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 1 << 20) };
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Bytes of the migration stream queued between the pipe and the caller (who reads from
/// before the cut on), whatever the RAM size.
const MEMORY_QUEUE_BUFFERS: usize = 16;
const MEMORY_BUFFER: usize = 1 << 20;

/// The memory stream as the caller reads it: a thread drains the pipe into a bounded queue
/// (no temporary file: memory holds the guest's secrets). The stream ends when QEMU closes its
/// end (the migration completed or failed), or with an error when the capture failed.
pub(crate) struct MemoryStream {
    rx: crossbeam_channel::Receiver<std::io::Result<Vec<u8>>>,
    current: Vec<u8>,
    at: usize,
    read: u64,
    eof: bool,
}

impl MemoryStream {
    /// The stream, and a sender to end it with an error when the capture fails.
    #[allow(clippy::type_complexity)]
    pub(crate) fn pump(
        mut pipe: File,
    ) -> Result<(
        MemoryStream,
        crossbeam_channel::Sender<std::io::Result<Vec<u8>>>,
    )> {
        let (tx, rx) = crossbeam_channel::bounded(MEMORY_QUEUE_BUFFERS);
        let abort = tx.clone();
        std::thread::Builder::new()
            .name("vmkeep-memory".into())
            .spawn(move || loop {
                // Whole buffers (QEMU writes 32 KiB at a time), never zero-filled first: a
                // zeroed 1 MiB per pipe read cost more than the rest of this thread.
                let mut buf = Vec::with_capacity(MEMORY_BUFFER);
                match (&mut pipe).take(MEMORY_BUFFER as u64).read_to_end(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => {
                        if tx.send(Ok(buf)).is_err() {
                            return; // the capture is gone: closing the pipe stops QEMU
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("start the memory stream thread", e))?;
        Ok((
            MemoryStream {
                rx,
                current: Vec::new(),
                at: 0,
                read: 0,
                eof: false,
            },
            abort,
        ))
    }
}

impl Read for MemoryStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            if self.eof {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(r) => {
                    self.current = r?;
                    self.at = 0;
                }
                Err(_) => {
                    self.eof = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        let before = self.read;
        self.read += n as u64;
        if before < 4 << 20 && self.read >= 4 << 20 {
            vmkeep_io::kill_point("capture-mid-memory");
        }
        Ok(n)
    }
}

impl QmpCapture {
    pub fn disks(&self) -> Vec<SourceDisk> {
        self.disks
            .iter()
            .map(|d| SourceDisk {
                name: d.vm.name.clone(),
                size: d.vm.size,
            })
            .collect()
    }

    pub fn take_memory(&mut self) -> Option<Box<dyn Read + Send>> {
        self.memory_taken = true;
        self.memory
            .take()
            .map(|m| Box::new(m) as Box<dyn Read + Send>)
    }

    /// See [`VmSource::memory_done`]; [`Error::InstantMoved`] when the instant moved.
    pub fn memory_done(&mut self) -> Result<()> {
        let qmp = self.qmp.as_ref().expect("capture open");
        let start = Instant::now();
        let status = loop {
            let m = self.rt.block_on(qmp.query_migrate())?;
            match m.status.as_deref() {
                Some("completed") => break Ok(()),
                Some("failed" | "cancelled") => {
                    break Err(Error::Refused(format!(
                        "QEMU's memory snapshot failed: {}",
                        m.error_desc.unwrap_or_else(|| "no reason given".into())
                    )))
                }
                _ if start.elapsed() > Duration::from_secs(60) => {
                    break Err(Error::Timeout {
                        what: "QEMU to complete the memory snapshot".into(),
                        timeout: Duration::from_secs(60),
                    })
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        status?;
        // Write-protection is over: give the guest its huge pages back while the disks are read.
        if let Some(pid) = self.pid {
            self.rehuge = Some(std::thread::spawn(move || super::hugepages::collapse(pid)));
        }
        self.drain_events();
        if self.instant_moved {
            return Err(Error::InstantMoved);
        }
        self.check_guest()
    }

    pub fn open_disk(&mut self, i: usize) -> Result<(Box<dyn DiskReader + Send>, ReadPlan)> {
        self.check_guest()?;
        let cs = self.opts.chunk_size;
        let d = &self.disks[i];
        let source = cbt::source_identity(
            d.persistent && d.bitmaps,
            &super::canonical(&d.vm.file),
            self.pid,
        );
        let granularity = self
            .rt
            .block_on(disks::node_bitmaps(self.qmp(), &d.vm.node))?
            .iter()
            .find(|b| b.name == d.new_bitmap)
            .map(|b| b.granularity)
            .unwrap_or(0);
        let export_bitmap = d.decision.export_bitmap.as_deref().filter(|_| d.bitmaps);
        let disk = NbdDisk::connect_unix(
            self.rt.handle().clone(),
            &self.nbd_socket,
            &d.export_name,
            export_bitmap,
            format!("disk {} ({}) via NBD", d.vm.name, d.vm.file),
        )?;
        let dec = &d.decision;
        let plan = match export_bitmap {
            Some(b) => ReadPlan {
                base: dec.base,
                runs: disk.dirty_runs(b, cs)?,
                cbt: dec.cbt,
                cbt_reason: dec.reason.clone(),
                ..Default::default()
            },
            None if !d.bitmaps && dec.cbt == ChangeTracking::Used => ReadPlan {
                runs: disk.allocated_runs(cs),
                cbt: ChangeTracking::Rescan,
                cbt_reason: Some(format!(
                    "checkpoint bitmaps refused by QEMU: {}",
                    self.no_tracking.as_deref().unwrap_or("no reason given")
                )),
                ..Default::default()
            },
            None => ReadPlan {
                runs: disk.allocated_runs(cs),
                cbt: dec.cbt,
                cbt_reason: dec.reason.clone(),
                ..Default::default()
            },
        };
        let plan = ReadPlan {
            zero_runs: disk.zero_runs(cs), // lets the repository check a `used` plan
            checkpoint: d.bitmaps.then(|| Checkpoint {
                bitmap: d.new_bitmap.clone(),
                node: d.vm.node.clone(),
                granularity,
                source,
            }),
            ..plan
        };
        Ok((Box::new(disk), plan))
    }

    pub fn release(&mut self) -> Result<()> {
        self.check_guest()?;
        let qmp = self.qmp.as_ref().expect("capture open");
        let pending = self.log.pending().to_vec();
        let out = self
            .rt
            .block_on(executor::undo(qmp, &pending, Scope::Teardown));
        for seq in &out.done {
            self.log.done(*seq);
        }
        if let Some(e) = out.first_error {
            warn!(error = %e, "capture teardown incomplete (the backup itself is complete)");
        }
        self.drain_events();
        Ok(())
    }

    pub fn pause_ms(&self) -> u64 {
        self.pause_ms
    }

    pub fn finish(mut self, committed: bool) {
        if committed {
            // First of all: from here an undo (ours, the guard's, the next capture's) retires
            // the consumed checkpoints instead of reverting them.
            self.log.record(Undo::Committed);
            vmkeep_io::kill_point("capture-after-commit");
        }
        self.end(committed);
    }
}

impl VmSource for QmpCapture {
    fn disks(&self) -> Vec<SourceDisk> {
        QmpCapture::disks(self)
    }
    fn cut(&mut self) -> Result<(), SourceError> {
        QmpCapture::cut(self).map_err(Into::into)
    }
    fn take_memory(&mut self) -> Option<Box<dyn Read + Send>> {
        QmpCapture::take_memory(self)
    }
    fn config_streams(&mut self) -> Vec<(String, Box<dyn Read + Send>)> {
        let Some(def) = &self.definition else {
            return Vec::new();
        };
        let mut out: Vec<(String, Box<dyn Read + Send>)> = vec![(
            crate::vmdef::DEFINITION_STREAM.to_string(),
            Box::new(std::io::Cursor::new(def.to_json())),
        )];
        for b in def.boot_files.iter().filter(|b| b.size.is_some()) {
            match File::open(&b.host_path) {
                Ok(f) => out.push((b.stream_name(), Box::new(f))),
                Err(e) => warn!(error = %e, file = %b.host_path, "boot file not stored"),
            }
        }
        out
    }
    fn memory_done(&mut self) -> Result<(), SourceError> {
        QmpCapture::memory_done(self).map_err(Into::into)
    }
    fn open_disk(
        &mut self,
        i: usize,
    ) -> Result<(Box<dyn DiskReader + Send>, ReadPlan), SourceError> {
        QmpCapture::open_disk(self, i).map_err(Into::into)
    }
    fn release(&mut self) -> Result<(), SourceError> {
        QmpCapture::release(self).map_err(Into::into)
    }
    fn pause_ms(&self) -> u64 {
        self.pause_ms
    }
    fn finish(self: Box<Self>, committed: bool) -> Result<(), SourceError> {
        QmpCapture::finish(*self, committed);
        Ok(())
    }
}

impl Drop for QmpCapture {
    fn drop(&mut self) {
        self.end(false);
    }
}

/// Whether `path` is a scratch directory of ours (for tests and `leftovers`).
pub fn is_scratch_dir(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(scratch::DIR_PREFIX))
}
