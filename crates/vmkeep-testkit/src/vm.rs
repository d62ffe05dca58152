//! A real QEMU for tests: TCG (nested KVM hangs on the test machines), no default devices, a
//! QMP socket, and whatever disks and kernel a test adds; at most one at a time machine-wide.
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::process::{require, wait_for_socket, ChildGuard};
use crate::qmp::Qmp;

/// Machine-wide lock: at most one QEMU system emulator at a time on the 2-core test machines,
/// across test binaries, crates and threads. Held until dropped.
pub struct QemuLock {
    _held: File,
}

pub fn qemu_lock() -> QemuLock {
    let f = File::create(std::env::temp_dir().join("vmkeep-qemu-tests.lock")).expect("lock file");
    // SAFETY: flock on an fd we own; released when the file is closed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock failed");
    QemuLock { _held: f }
}

/// How long a guest may go without printing progress before the test fails.
pub const PROGRESS_TIMEOUT: Duration = Duration::from_secs(180);

/// The command line of a test VM, built step by step, then [`VmBuilder::boot`].
pub struct VmBuilder {
    qmp: PathBuf,
    log: PathBuf,
    memory_mib: u32,
    /// `-S` or `-kernel ...`: how the VM starts.
    start: Vec<OsString>,
    /// Disks, devices and extra arguments, in order.
    args: Vec<OsString>,
    blockdevs: usize,
}

impl VmBuilder {
    /// A VM whose QMP socket is `dir/qmp{tag}.sock` and serial console (with a kernel)
    /// `dir/serial{tag}.log`; 256 MiB of memory, started paused unless [`VmBuilder::kernel`].
    pub fn new(dir: &Path, tag: &str) -> VmBuilder {
        VmBuilder {
            qmp: dir.join(format!("qmp{tag}.sock")),
            log: dir.join(format!("serial{tag}.log")),
            memory_mib: 256,
            start: vec!["-S".into()],
            args: Vec::new(),
            blockdevs: 0,
        }
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Starts with the CPUs running and no kernel (`-machine none`: just the monitor).
    pub fn unpaused(mut self) -> Self {
        self.start.clear();
        self
    }

    /// Boots `kernel` with `initrd` and the command line `append`, its console on the serial
    /// log (instead of starting paused with no kernel, just the block layer).
    pub fn kernel(mut self, kernel: &Path, initrd: &Path, append: &str) -> Self {
        self.start = vec![
            "-serial".into(),
            format!("file:{}", self.log.display()).into(),
            "-kernel".into(),
            kernel.into(),
            "-initrd".into(),
            initrd.into(),
            "-append".into(),
            append.into(),
        ];
        self
    }

    /// A qcow2 image as `-blockdev` nodes `f{i}` (file) and `disk{i}` (qcow2), on a
    /// virtio-blk-pci device with id `device_id` (the disk's name in a capture).
    pub fn blockdev_qcow2(mut self, image: &Path, device_id: &str) -> Self {
        let i = self.blockdevs;
        self.blockdevs += 1;
        self.arg("-blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=f{i}",
                image.display()
            ))
            .arg("-blockdev")
            .arg(format!("driver=qcow2,file=f{i},node-name=disk{i}"))
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive=disk{i},id={device_id}"))
    }

    /// A qcow2 image as `-drive id=drive_id` (QEMU names its nodes) on a virtio-blk-pci device
    /// without an id (the capture names the disk after the drive).
    pub fn drive_qcow2(self, image: &Path, drive_id: &str) -> Self {
        self.arg("-drive")
            .arg(format!(
                "file={},format=qcow2,if=none,id={drive_id}",
                image.display()
            ))
            .arg("-device")
            .arg(format!("virtio-blk-pci,drive={drive_id}"))
    }

    /// One more argument, after those added so far.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// More arguments, after those added so far.
    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// The path of the QMP socket the VM will listen on.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// Starts QEMU and waits until its QMP socket listens. The caller holds [`qemu_lock`].
    pub fn boot(self) -> Vm {
        let mut cmd = Command::new(require("qemu-system-x86_64"));
        cmd.args(["-accel", "tcg", "-nodefaults", "-display", "none"])
            .arg("-m")
            .arg(self.memory_mib.to_string())
            .arg("-no-reboot")
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", self.qmp.display()))
            .args(&self.start)
            .args(&self.args);
        let mut qemu = ChildGuard::spawn(&mut cmd);
        wait_for_socket(&self.qmp, &mut qemu);
        Vm {
            qemu,
            qmp: self.qmp,
            log: self.log,
        }
    }
}

/// A running QEMU, killed (SIGKILL) and reaped when dropped.
pub struct Vm {
    pub qemu: ChildGuard,
    pub qmp: PathBuf,
    pub log: PathBuf,
}

impl Vm {
    /// The serial console so far (empty before the first line).
    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Highest `C i` the guest's workload printed (-1 before the first).
    pub fn progress(&mut self) -> i64 {
        let text = self.serial();
        assert!(!text.contains("failed"), "guest: {text}");
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("C ").and_then(|n| n.parse().ok()))
            .max()
            .unwrap_or(-1)
    }

    /// Waits until the guest printed `C n` for some n >= `at_least`.
    pub fn wait_progress(&mut self, at_least: i64) {
        let start = Instant::now();
        while self.progress() < at_least {
            if let Ok(Some(st)) = self.qemu.0.try_wait() {
                panic!("QEMU exited ({st})");
            }
            assert!(
                start.elapsed() < PROGRESS_TIMEOUT,
                "guest made no progress: {}",
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the serial console shows `text`.
    pub fn wait_serial(&mut self, text: &str) {
        let start = Instant::now();
        while !self.serial().contains(text) {
            if let Ok(Some(st)) = self.qemu.0.try_wait() {
                panic!("QEMU exited ({st})");
            }
            assert!(
                start.elapsed() < PROGRESS_TIMEOUT,
                "the guest never printed {text:?}: {}",
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A fresh QMP connection (QEMU serves one client per monitor: drop it before vmkeep
    /// connects).
    pub fn connect(&self) -> Qmp {
        Qmp::connect(&self.qmp)
    }

    /// One QMP command on a fresh connection; its `return` value.
    pub fn execute(&self, cmd: &str, args: Value) -> Value {
        self.connect().execute(cmd, args)
    }

    /// Whether the guest CPUs run (`query-status`).
    pub fn running(&self) -> bool {
        self.execute("query-status", Value::Null)["running"]
            .as_bool()
            .expect("query-status: running")
    }

    /// Block nodes and block jobs a capture leaves behind when it is not undone.
    pub fn leftovers(&self) -> Vec<String> {
        let mut q = self.connect();
        let mut out: Vec<String> = q
            .execute("query-named-block-nodes", Value::Null)
            .as_array()
            .expect("query-named-block-nodes is an array")
            .iter()
            .filter_map(|n| n["node-name"].as_str())
            .filter(|n| n.starts_with("vmkeep"))
            .map(String::from)
            .collect();
        for j in q
            .execute("query-block-jobs", Value::Null)
            .as_array()
            .expect("query-block-jobs is an array")
        {
            out.push(format!("job {}", j["device"]));
        }
        out
    }

    /// vmkeep's checkpoint bitmaps as `(node, bitmap, recording)`.
    pub fn vmkeep_bitmaps(&self) -> Vec<(String, String, bool)> {
        let nodes = self.execute("query-named-block-nodes", Value::Null);
        let mut out = Vec::new();
        for n in nodes
            .as_array()
            .expect("query-named-block-nodes is an array")
        {
            let node = n["node-name"].as_str().unwrap_or_default();
            for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
                let name = b["name"].as_str().unwrap_or_default();
                if name.starts_with("vmkeep-") {
                    let recording = b["recording"].as_bool().expect("bitmap: recording");
                    out.push((node.to_string(), name.to_string(), recording));
                }
            }
        }
        out
    }

    /// Clean shutdown (`quit`), then waits for QEMU to exit.
    pub fn quit(mut self) {
        // QEMU may close the connection before its reply arrives: the exit is what counts.
        let _ = self.connect().try_execute("quit", Value::Null);
        let _ = self.qemu.0.wait();
    }

    /// kill -9 of QEMU (nothing flushed, bitmaps left marked in use).
    pub fn kill9(mut self) {
        self.qemu.0.kill().unwrap();
        let _ = self.qemu.0.wait();
    }
}
