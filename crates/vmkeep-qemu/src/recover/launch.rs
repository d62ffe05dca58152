//! Starting the recovered VM's QEMU in the background.
//!
//! QEMU runs in a session of its own (`setsid`: no controlling terminal, no signal from our
//! terminal or process group), stdin from /dev/null, stdout and stderr appended to the plan's
//! `qemu_log`, so it outlives vmkeep (unless the plan asks it to die with vmkeep, as a
//! verification sandbox does). We wait until its QMP socket answers (and is really
//! served by this QEMU: SO_PEERCRED). A [`RunningQemu`] that is dropped without
//! [`RunningQemu::detach`] kills its QEMU: an error anywhere leaves nothing running.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tracing::{debug, info, warn};

use super::RecoveryPlan;
use crate::error::{Error, Result};
use crate::qmp::{QmpClient, QmpOptions};

/// How long QEMU may take until its QMP socket answers.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a `quit` may take before QEMU is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of the QEMU log quoted in an error.
const LOG_TAIL_LINES: usize = 20;

/// A QEMU we started, and our QMP connection to it.
pub struct RunningQemu {
    pub(super) rt: Runtime,
    pub(super) qmp: Option<QmpClient>,
    child: Option<Child>,
    /// A QEMU started by an earlier vmkeep that we manage now ([`RunningQemu::attach`]): not
    /// our child, stopped by pid, and never killed on drop.
    attached: bool,
    pid: u32,
    qmp_socket: PathBuf,
    serial_log: PathBuf,
    qemu_log: PathBuf,
}

impl std::fmt::Debug for RunningQemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningQemu")
            .field("pid", &self.pid)
            .field("qmp_socket", &self.qmp_socket)
            .finish()
    }
}

/// Starts `qemu argv` (from [`super::rewrite()`]) as `plan` says and waits until it answers on
/// `plan.qmp_socket`. On failure QEMU is gone and the error quotes its log.
pub fn start_qemu(qemu: &Path, argv: &[String], plan: &RecoveryPlan) -> Result<RunningQemu> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the async runtime", e))?;
    prepare_socket(&plan.qmp_socket)?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&plan.qemu_log)
        .map_err(|e| Error::io(format!("open QEMU log {}", plan.qemu_log.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| Error::io("duplicate the QEMU log descriptor", e))?;
    let mut cmd = Command::new(qemu);
    cmd.args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    let die_with_parent = plan.die_with_parent;
    // SAFETY: the id of this process is read before the fork; setsid, prctl and getppid are
    // async-signal-safe and touch no memory of the parent.
    let parent = unsafe { libc::getpid() };
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if die_with_parent {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the prctl: nobody would kill us.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("vmkeep exited while starting QEMU"));
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("start {}", qemu.display()), e))?;
    let pid = child.id();
    info!(pid, qemu = %qemu.display(), "QEMU started");
    let mut vm = RunningQemu {
        rt,
        qmp: None,
        child: Some(child),
        attached: false,
        pid,
        qmp_socket: plan.qmp_socket.clone(),
        serial_log: plan.serial_log.clone(),
        qemu_log: plan.qemu_log.clone(),
    };
    match vm.wait_ready() {
        Ok(qmp) => {
            vm.qmp = Some(qmp);
            Ok(vm)
        }
        Err(what) => Err(vm.fail(what)),
    }
}

/// Takes over the QEMU that already runs on `plan.qmp_socket` (started by an earlier vmkeep,
/// e.g. an instant recovery whose vmkeep was killed): connects to it as [`start_qemu`] does.
/// It is not stopped when the returned value is dropped; [`RunningQemu::shut_down`] stops it.
pub fn attach(plan: &RecoveryPlan) -> Result<RunningQemu> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("start the async runtime", e))?;
    let socket = &plan.qmp_socket;
    let pid = crate::capture::peer::listener_pid(socket).ok_or_else(|| {
        Error::Definition(format!(
            "no QEMU answers on {}: the VM is not running",
            socket.display()
        ))
    })?;
    let qmp = rt
        .block_on(QmpClient::connect_with(socket, QmpOptions::default()))
        .map_err(|e| Error::Definition(format!("QEMU {pid} on {}: {e}", socket.display())))?;
    info!(pid, "attached to a running QEMU");
    Ok(RunningQemu {
        rt,
        qmp: Some(qmp),
        child: None,
        attached: true,
        pid,
        qmp_socket: socket.clone(),
        serial_log: plan.serial_log.clone(),
        qemu_log: plan.qemu_log.clone(),
    })
}

/// A QMP socket path must be free: a live listener there is someone else's VM.
fn prepare_socket(path: &Path) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::Definition(format!(
            "something already listens on {}: recover into an empty folder",
            path.display()
        )));
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(
            format!("remove stale socket {}", path.display()),
            e,
        )),
    }
}

impl RunningQemu {
    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Our QMP connection (the VM's only monitor, until [`detach`](Self::detach)). After a
    /// failure stopped QEMU, its commands fail with [`Error::QmpClosed`].
    pub fn qmp(&self) -> &QmpClient {
        self.qmp
            .as_ref()
            .expect("a RunningQemu has its QMP connection until detached")
    }

    /// Runs a QMP future (e.g. `vm.block_on(vm.qmp().query_status())`).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    pub fn serial_log(&self) -> &Path {
        &self.serial_log
    }

    pub fn qemu_log(&self) -> &Path {
        &self.qemu_log
    }

    /// Lets QEMU run on without us: closes our QMP connection (the monitor is free for the
    /// user) and returns the pid.
    pub fn detach(mut self) -> u32 {
        if let Some(q) = self.qmp.take() {
            self.rt.block_on(q.close());
        }
        self.child = None; // not killed, not waited for: init adopts it when we exit
        self.attached = false;
        self.pid
    }

    /// Stops QEMU: `quit`, then SIGKILL if it does not exit in time; reaps it.
    pub fn shut_down(mut self) {
        self.terminate();
    }

    /// Waits until the QMP socket answers; `Err` says why not (QEMU is still to be killed).
    fn wait_ready(&mut self) -> std::result::Result<QmpClient, String> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return Err(format!(
                    "QEMU exited ({status}) before its QMP socket answered"
                ));
            }
            if start.elapsed() > READY_TIMEOUT {
                return Err(format!(
                    "QEMU's QMP socket {} did not answer within {READY_TIMEOUT:?}",
                    self.qmp_socket.display()
                ));
            }
            if std::os::unix::net::UnixStream::connect(&self.qmp_socket).is_err() {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            match crate::capture::peer::listener_pid(&self.qmp_socket) {
                Some(p) if p != self.pid => {
                    return Err(format!(
                        "{} is served by process {p}, not by the QEMU we started ({})",
                        self.qmp_socket.display(),
                        self.pid
                    ))
                }
                _ => {}
            }
            let opts = QmpOptions {
                greeting_timeout: READY_TIMEOUT.saturating_sub(start.elapsed()),
                ..QmpOptions::default()
            };
            match self
                .rt
                .block_on(QmpClient::connect_with(&self.qmp_socket, opts))
            {
                Ok(q) => {
                    debug!(pid = self.pid, elapsed = ?start.elapsed(), "QEMU answers on QMP");
                    return Ok(q);
                }
                Err(e) => {
                    if let Some(status) = self.exited() {
                        return Err(format!("QEMU exited ({status}) while we connected: {e}"));
                    }
                    debug!(error = %e, "QMP not ready yet");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    pub(super) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        if self.attached {
            use std::os::unix::process::ExitStatusExt;
            // Not our child: we see only whether it still runs.
            return (!pid_alive(self.pid)).then(|| std::process::ExitStatus::from_raw(0));
        }
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Makes sure QEMU is gone, then the error for `what` with the log's tail.
    pub(super) fn fail(&mut self, what: String) -> Error {
        self.terminate();
        Error::Recovery {
            what,
            log: log_tail(&self.qemu_log),
        }
    }

    /// `quit`, wait, SIGKILL; reaps the process. Idempotent.
    pub(super) fn terminate(&mut self) {
        if std::mem::take(&mut self.attached) {
            self.terminate_attached();
            return;
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        // The client stays: once QEMU is gone its commands fail with "connection closed".
        if let Some(q) = &self.qmp {
            let quit = q.execute_with_timeout("quit", serde_json::Value::Null, QUIT_TIMEOUT);
            let _ = self.rt.block_on(quit);
        }
        let start = Instant::now();
        while start.elapsed() < QUIT_TIMEOUT {
            if let Ok(Some(_)) = child.try_wait() {
                debug!(pid = self.pid, "QEMU exited");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        warn!(pid = self.pid, "QEMU did not quit: killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl RunningQemu {
    /// [`RunningQemu::terminate`] for a QEMU that is not our child.
    fn terminate_attached(&mut self) {
        if let Some(q) = &self.qmp {
            let quit = q.execute_with_timeout("quit", serde_json::Value::Null, QUIT_TIMEOUT);
            let _ = self.rt.block_on(quit);
        }
        let start = Instant::now();
        while start.elapsed() < QUIT_TIMEOUT {
            if !pid_alive(self.pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        warn!(pid = self.pid, "QEMU did not quit: killing it");
        // SAFETY: kill(2) on the pid that served this VM's QMP socket.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
    }
}

/// Whether a process with this pid exists (a zombie counts as gone only once reaped).
fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

impl Drop for RunningQemu {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Not detached: a failure path. Nothing may stay running.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last [`LOG_TAIL_LINES`] lines of the log (at most 8 KiB read).
pub(super) fn log_tail(path: &Path) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
    let mut buf = Vec::new();
    let _ = f.take(8192).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}
