//! Evidence of life of a recovered VM (`vmkeep verify`): waiting until the guest shows that it
//! runs, or fails in a way that says it will not.
//!
//! The checks asked for run in order, all against one deadline: a serial line matching a
//! pattern; a guest-agent ping; a probe command, run again every [`PROBE_PAUSE`] until it
//! succeeds. With none of them, the VM must run for a settle time. Throughout, every [`POLL`]
//! the signs of death are looked for: a kernel panic on the console, and what the VM's
//! [`Vitals`] report. A QEMU of vmkeep's own ([`QemuVitals`]): QEMU gone, the
//! `GUEST_PANICKED`, `SHUTDOWN` and `BLOCK_IO_ERROR` events, a `RESET` of a resumed VM (it had
//! no reason to reboot), a run state other than running. A libvirt domain: its state and
//! reason (`super::libvirt_vitals`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, info};

use super::RunningQemu;
use crate::qmp::EventStream;

/// How often the signs are looked at.
const POLL: Duration = Duration::from_millis(100);
/// Pause between two runs of a probe that failed.
const PROBE_PAUSE: Duration = Duration::from_secs(2);
/// The console text that means the guest's kernel gave up.
const PANIC_TEXT: &[&str] = &["Kernel panic - not syncing"];
/// Longest serial line kept for a reason (a line without newline is cut there).
const LINE_MAX: usize = 512;

/// A serial-console pattern: `matches` decides, `describe` names it in reports.
pub struct SerialPattern {
    pub describe: String,
    pub matches: Box<dyn Fn(&str) -> bool + Send>,
}

/// A command run on the host against the sandboxed VM.
pub struct Probe {
    pub command: String,
    /// Extra environment (where the VM's QMP socket, serial log and agent are).
    pub env: Vec<(String, String)>,
    /// Its stdout and stderr go here (the last line is quoted when it fails).
    pub log: PathBuf,
}

/// What counts as evidence of life.
pub struct Evidence {
    pub serial: Option<SerialPattern>,
    /// Wait for the guest agent to answer a ping ([`Vitals::ping_agent`]).
    pub agent: bool,
    pub probe: Option<Probe>,
    /// With no check above: how long the VM must run without a sign of death.
    pub settle: Duration,
    /// The VM was resumed from memory (a reset is then a crash).
    pub resumed: bool,
    /// Set from outside (SIGINT, SIGTERM) to end the watch at once: [`Verdict::Interrupted`].
    pub cancel: Option<&'static AtomicBool>,
}

/// What the watch found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Alive; what showed it.
    Alive(String),
    /// Dead, or no evidence before the deadline; why.
    Failed(String),
    /// The watch was cancelled: nothing was found either way.
    Interrupted,
}

/// The console as read so far.
struct SerialTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// The last complete non-empty line.
    last: Option<String>,
    lines: u64,
}

impl SerialTail {
    fn new(path: &Path) -> SerialTail {
        SerialTail {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
            last: None,
            lines: 0,
        }
    }

    /// New complete lines since the last call.
    fn read_lines(&mut self) -> Vec<String> {
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let n = f.take(1 << 20).read_to_end(&mut buf).unwrap_or(0);
        self.offset += n as u64;
        let mut out = Vec::new();
        for &b in &buf[..n] {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_string();
                self.partial.clear();
                if !line.trim().is_empty() {
                    self.last = Some(line.clone());
                }
                self.lines += 1;
                out.push(line);
            } else if self.partial.len() < LINE_MAX {
                self.partial.push(b);
            }
        }
        out
    }

    fn last_line(&self) -> String {
        match &self.last {
            Some(l) => format!("the console's last line: {l:?}"),
            None => "the console printed nothing".into(),
        }
    }
}

/// How a running VM shows that it is alive or dead, whoever runs it.
pub trait Vitals {
    /// Called every [`POLL`]: `Err(reason)` once the VM is dead or dying.
    fn signs_of_death(&mut self) -> Result<(), String>;
    /// `Err(reason)` unless the VM runs now.
    fn run_state(&mut self) -> Result<(), String>;
    /// One guest-agent ping within `timeout`.
    fn ping_agent(&mut self, timeout: Duration) -> Result<(), String>;
}

/// The vitals of a QEMU started by vmkeep: its process, its QMP events and run state, and the
/// guest agent's socket.
pub struct QemuVitals<'a> {
    pub vm: &'a mut RunningQemu,
    /// Subscribed before the VM started running, so no event is missed.
    pub events: EventStream,
    /// The VM was resumed from memory (a reset is then a crash).
    pub resumed: bool,
    /// The guest agent's socket on the host.
    pub agent: Option<PathBuf>,
}

impl Vitals for QemuVitals<'_> {
    fn signs_of_death(&mut self) -> Result<(), String> {
        if let Some(status) = self.vm.exited() {
            return Err(format!(
                "QEMU exited ({status}); its log: {}",
                super::launch::log_tail(self.vm.qemu_log())
            ));
        }
        let events = &mut self.events;
        loop {
            let next = self.vm.rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(1), events.next()).await
            });
            let ev = match next {
                Err(_) => break, // nothing pending
                Ok(Err(e)) => return Err(format!("lost QEMU's monitor: {e}")),
                Ok(Ok(ev)) => ev,
            };
            debug!(event = %ev.event, data = %ev.data, "QMP event");
            match ev.event.as_str() {
                "GUEST_PANICKED" => return Err(format!("the guest panicked ({})", ev.data)),
                "SHUTDOWN" => {
                    return Err(format!(
                        "the guest shut down ({})",
                        ev.data["reason"].as_str().unwrap_or("no reason given")
                    ))
                }
                "RESET" if self.resumed => {
                    return Err("the guest reset itself after it was resumed".into())
                }
                "BLOCK_IO_ERROR" => {
                    return Err(format!(
                        "disk I/O error on {} ({}): {}",
                        ev.data["device"]
                            .as_str()
                            .filter(|d| !d.is_empty())
                            .unwrap_or(ev.data["node-name"].as_str().unwrap_or("a disk")),
                        ev.data["operation"].as_str().unwrap_or("?"),
                        ev.data["reason"].as_str().unwrap_or("no reason given")
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn run_state(&mut self) -> Result<(), String> {
        let status = self
            .vm
            .block_on(self.vm.qmp().query_status())
            .map_err(|e| format!("QEMU's monitor does not answer: {e}"))?;
        if status.status != "running" {
            return Err(format!("the VM is {} (not running)", status.status));
        }
        Ok(())
    }

    fn ping_agent(&mut self, timeout: Duration) -> Result<(), String> {
        match &self.agent {
            Some(socket) => super::agent::ping(socket, timeout),
            None => Err("the VM has no guest agent channel".into()),
        }
    }
}

/// The signs of death, watched while the checks run.
struct Watch<'a> {
    vitals: &'a mut dyn Vitals,
    serial: SerialTail,
    cancel: Option<&'static AtomicBool>,
    deadline: Instant,
    started: Instant,
}

impl Watch<'_> {
    /// Looks at everything once; `Err(reason)` when the VM is dead. Returns new serial lines.
    fn poll(&mut self) -> Result<Vec<String>, String> {
        if self.cancelled() {
            return Err("interrupted".into());
        }
        let lines = self.serial.read_lines();
        for line in &lines {
            if PANIC_TEXT.iter().any(|p| line.contains(p)) {
                return Err(format!("the guest's kernel panicked: {line:?}"));
            }
        }
        self.vitals.signs_of_death()?;
        Ok(lines)
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::SeqCst))
    }

    fn timed_out(&self, waiting_for: &str) -> String {
        format!(
            "no {waiting_for} within {:.0} s; {}",
            self.deadline
                .saturating_duration_since(self.started)
                .as_secs_f64(),
            self.serial.last_line()
        )
    }
}

/// Waits for `evidence` of life of the VM whose console is written to `serial_log` until
/// `deadline`.
pub fn watch_for_life(
    vitals: &mut dyn Vitals,
    serial_log: &Path,
    evidence: &Evidence,
    deadline: Instant,
) -> Verdict {
    let mut w = Watch {
        vitals,
        serial: SerialTail::new(serial_log),
        cancel: evidence.cancel,
        deadline,
        started: Instant::now(),
    };
    match watch(&mut w, evidence) {
        Ok(found) => {
            info!(evidence = %found, "the VM is alive");
            Verdict::Alive(found)
        }
        Err(_) if w.cancelled() => Verdict::Interrupted,
        Err(reason) => Verdict::Failed(reason),
    }
}

impl RunningQemu {
    /// Waits for `evidence` until `deadline`. `events` must have been subscribed before the VM
    /// started running, so no event is missed; `agent` is the guest agent's socket.
    pub fn watch_for_life(
        &mut self,
        events: EventStream,
        agent: Option<PathBuf>,
        evidence: &Evidence,
        deadline: Instant,
    ) -> Verdict {
        let serial_log = self.serial_log().to_path_buf();
        let mut vitals = QemuVitals {
            vm: self,
            events,
            resumed: evidence.resumed,
            agent,
        };
        watch_for_life(&mut vitals, &serial_log, evidence, deadline)
    }

    /// A PNG of the VM's display into `path`; `Ok(false)` when the VM has no display.
    pub fn screenshot(&self, path: &Path) -> crate::Result<bool> {
        let args = serde_json::json!({"filename": path, "format": "png"});
        match self.block_on(self.qmp().execute("screendump", args)) {
            Ok(_) => Ok(true),
            // "There is no QemuConsole I can screendump from."
            Err(crate::Error::QmpCommand { desc, .. }) if desc.contains("Console") => {
                debug!(%desc, "no screenshot");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

fn watch(w: &mut Watch<'_>, ev: &Evidence) -> Result<String, String> {
    let mut found = Vec::new();
    if let Some(p) = &ev.serial {
        wait_serial(w, p)?;
        found.push(format!("a serial line matching {}", p.describe));
    }
    if ev.agent {
        wait_agent(w)?;
        found.push("the guest agent answered".into());
    }
    if let Some(probe) = &ev.probe {
        let runs = run_probe(w, probe)?;
        found.push(format!("the probe succeeded (run {runs} times)"));
    }
    if found.is_empty() {
        let until = Instant::now() + ev.settle;
        if until > w.deadline {
            return Err(format!(
                "the timeout is shorter than the settle time ({:.0} s)",
                ev.settle.as_secs_f64()
            ));
        }
        while Instant::now() < until {
            w.poll()?;
            std::thread::sleep(POLL);
        }
        w.vitals.run_state()?;
        found.push(format!(
            "it ran {:.0} s without a sign of failure ({} console lines); weak evidence: give \
             --serial or --probe",
            ev.settle.as_secs_f64(),
            w.serial.lines
        ));
    } else {
        w.poll()?;
        w.vitals.run_state()?;
    }
    Ok(found.join("; "))
}

fn wait_serial(w: &mut Watch<'_>, p: &SerialPattern) -> Result<(), String> {
    loop {
        for line in w.poll()? {
            if (p.matches)(&line) {
                return Ok(());
            }
        }
        if Instant::now() >= w.deadline {
            return Err(w.timed_out(&format!("serial line matching {}", p.describe)));
        }
        std::thread::sleep(POLL);
    }
}

fn wait_agent(w: &mut Watch<'_>) -> Result<(), String> {
    let mut last_error = String::from("not tried");
    loop {
        w.poll()?;
        let left = w.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the guest agent did not answer within {:.0} s (last: {last_error}); {}",
                w.deadline
                    .saturating_duration_since(w.started)
                    .as_secs_f64(),
                w.serial.last_line()
            ));
        }
        match w.vitals.ping_agent(left.min(Duration::from_secs(3))) {
            Ok(()) => return Ok(()),
            Err(e) => last_error = e,
        }
        std::thread::sleep(POLL);
    }
}

/// Runs the probe until it exits 0; returns how many runs it took.
fn run_probe(w: &mut Watch<'_>, probe: &Probe) -> Result<u32, String> {
    let mut runs = 0;
    let mut last = String::new();
    loop {
        if Instant::now() >= w.deadline {
            return Err(format!(
                "the probe did not succeed within {:.0} s ({runs} runs; last: {last}); {}",
                w.deadline
                    .saturating_duration_since(w.started)
                    .as_secs_f64(),
                w.serial.last_line()
            ));
        }
        runs += 1;
        let mut child = spawn_probe(probe).map_err(|e| format!("cannot run the probe: {e}"))?;
        let status = loop {
            if let Err(reason) = w.poll() {
                kill_group(&mut child);
                return Err(reason);
            }
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= w.deadline => {
                    kill_group(&mut child);
                    break None;
                }
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => return Err(format!("waiting for the probe: {e}")),
            }
        };
        match status {
            Some(s) if s.success() => return Ok(runs),
            Some(s) => {
                last = format!("{s}, {}", last_log_line(&probe.log));
            }
            None => last = "still running at the deadline (killed)".into(),
        }
        let pause_until = Instant::now() + PROBE_PAUSE;
        while Instant::now() < pause_until.min(w.deadline) {
            w.poll()?;
            std::thread::sleep(POLL);
        }
    }
}

fn spawn_probe(probe: &Probe) -> std::io::Result<Child> {
    let log = File::options().create(true).append(true).open(&probe.log)?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(&probe.command)
        .envs(probe.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .process_group(0); // killed as a group at the deadline
    cmd.spawn()
}

fn kill_group(child: &mut Child) {
    // SAFETY: kill(2) on the probe's own process group (process_group(0) made it its leader).
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
    let _ = child.wait();
}

fn last_log_line(path: &Path) -> String {
    let tail = super::launch::log_tail(path);
    match tail.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(l) => format!(
            "its last output: {:?}",
            l.chars().take(LINE_MAX).collect::<String>()
        ),
        None => "no output".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serial_tail_returns_whole_lines_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut t = SerialTail::new(&path);
        assert!(t.read_lines().is_empty(), "no file yet");
        std::fs::write(&path, "one\r\ntw").unwrap();
        assert_eq!(t.read_lines(), vec!["one".to_string()]);
        std::fs::write(&path, "one\r\ntwo\n\nthree").unwrap();
        assert_eq!(t.read_lines(), vec!["two".to_string(), String::new()]);
        assert_eq!(t.last_line(), "the console's last line: \"two\"");
        assert!(t.read_lines().is_empty());
    }

    #[test]
    fn a_long_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        std::fs::write(&path, format!("{}\n", "x".repeat(10_000))).unwrap();
        let lines = SerialTail::new(&path).read_lines();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), LINE_MAX);
    }
}
