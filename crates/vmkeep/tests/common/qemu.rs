//! A real QEMU guest for the command-line tests of `backup vm` (the approach of
//! crates/vmkeep-qemu/tests/live/): the test guest of tests/guest/build.sh on one 32 MiB qcow2
//! disk (`-blockdev` + virtio-blk-pci id `vd0`) running the seqwrite workload, a tiny blocking
//! QMP client, and the point-in-time check of a restored disk. One QEMU at a time machine-wide
//! (the flock shared with vmkeep-qemu's tests).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const DISK_MIB: u64 = 32;
pub const BLOCKS: u64 = DISK_MIB * 1024 * 1024 / 4096;

/// Path of a required program; panics (never skips) with a hint when it is missing.
pub fn require(bin: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(bin);
        if p.is_file() {
            return p;
        }
    }
    panic!("required program `{bin}` is missing: run scripts/install-deps.sh (as root)");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test guest's folder (vmlinuz, initrd.gz), built once and cached by the script.
pub fn guest() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/guest/build.sh");
    let out = run(Command::new("bash").arg(&script));
    PathBuf::from(out.lines().last().expect("guest dir").trim())
}

/// Machine-wide lock: one QEMU guest at a time across test binaries and threads.
pub struct QemuLock(File);

pub fn qemu_lock() -> QemuLock {
    let f = File::create(std::env::temp_dir().join("vmkeep-qemu-tests.lock")).expect("lock file");
    // SAFETY: flock on an fd we own; released when the file is closed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock failed");
    QemuLock(f)
}

/// A running QEMU, killed (SIGKILL) and reaped when dropped.
pub struct Vm {
    pub child: Child,
    pub qmp: PathBuf,
    pub log: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots QEMU (TCG) on a fresh 32 MiB qcow2 disk in `d`. `seqwrite`: the guest kernel with the
/// seqwrite workload; otherwise QEMU starts stopped (-S) with no kernel, just the block layer.
pub fn boot(d: &Path, seqwrite: bool) -> Vm {
    let disk = d.join("vda.qcow2");
    run(Command::new(require("qemu-img"))
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg(format!("{DISK_MIB}M")));
    let qmp = d.join("qmp.sock");
    let log = d.join("serial.log");
    let mut cmd = Command::new(require("qemu-system-x86_64"));
    cmd.args([
        "-accel",
        "tcg",
        "-m",
        "256",
        "-nodefaults",
        "-display",
        "none",
    ])
    .arg("-no-reboot")
    .arg("-serial")
    .arg(format!("file:{}", log.display()))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if seqwrite {
        let g = guest();
        cmd.arg("-kernel")
            .arg(g.join("vmlinuz"))
            .arg("-initrd")
            .arg(g.join("initrd.gz"))
            .arg("-append")
            .arg("console=ttyS0 quiet panic=-1 vmkeep.workload=seqwrite");
    } else {
        cmd.arg("-S");
    }
    cmd.arg("-blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=f0",
            disk.display()
        ))
        .arg("-blockdev")
        .arg("driver=qcow2,file=f0,node-name=disk0")
        .arg("-device")
        .arg("virtio-blk-pci,drive=disk0,id=vd0");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut vm = Vm { child, qmp, log };
    let start = Instant::now();
    while UnixStream::connect(&vm.qmp).is_err() {
        if let Ok(Some(st)) = vm.child.try_wait() {
            panic!("QEMU exited ({st}) before creating its QMP socket");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no QMP socket after 20 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    vm
}

impl Vm {
    /// Highest `C i` the guest printed (-1 before the first).
    pub fn progress(&mut self) -> i64 {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
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
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("QEMU exited ({st})");
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "guest made no progress: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A QMP connection (greeting read, capabilities negotiated).
    pub fn connect(&self) -> Qmp {
        Qmp::connect(&self.qmp)
    }

    /// One QMP command on a fresh connection; its `return` value.
    pub fn execute(&self, cmd: &str, args: Value) -> Value {
        self.connect().execute(cmd, args)
    }

    pub fn running(&self) -> bool {
        self.execute("query-status", Value::Null)["running"]
            .as_bool()
            .expect("query-status: running")
    }

    /// Block nodes, block jobs and NBD exports a capture leaves behind when it is not undone.
    pub fn leftovers(&self) -> Vec<String> {
        let mut q = self.connect();
        let mut out: Vec<String> = q
            .execute("query-named-block-nodes", Value::Null)
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["node-name"].as_str())
            .filter(|n| n.starts_with("vmkeep"))
            .map(String::from)
            .collect();
        for j in q
            .execute("query-block-jobs", Value::Null)
            .as_array()
            .unwrap()
        {
            out.push(format!("job {}", j["device"]));
        }
        out
    }
}

/// A blocking QMP client: enough for the tests.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let s = UnixStream::connect(path).expect("connecting to QMP");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        q.execute("qmp_capabilities", Value::Null);
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("reading QMP");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP line {line:?}: {e}"))
    }

    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let mut msg = json!({ "execute": cmd });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).unwrap();
        line.push(b'\n');
        self.writer.write_all(&line).unwrap();
        loop {
            let v = self.read();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("error").is_none(), "QMP {cmd}: {v}");
            // An event: skip.
        }
    }
}

/// The K of a point-in-time image of the seqwrite guest's disk: every 4 KiB block is zero or
/// `SEQ j` at block (j*97) mod BLOCKS, and the j's are exactly 0..=K. Returns K (-1: no SEQ).
pub fn prefix_k(img: &[u8], what: &str) -> i64 {
    assert_eq!(img.len() as u64, BLOCKS * 4096, "{what}: size");
    let mut seen = BTreeSet::new();
    for (b, blk) in img.chunks(4096).enumerate() {
        if blk.iter().all(|x| *x == 0) {
            continue;
        }
        let head = std::str::from_utf8(&blk[..15])
            .unwrap_or_else(|_| panic!("{what}: block {b} is neither zero nor SEQ"));
        let j: u64 = head
            .strip_prefix("SEQ ")
            .and_then(|s| s.strip_suffix('\n'))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{what}: block {b} is neither zero nor SEQ: {head:?}"));
        assert_eq!((j * 97) % BLOCKS, b as u64, "{what}: SEQ {j} in block {b}");
        assert!(blk[15..].iter().all(|x| *x == 0), "{what}: SEQ {j} padding");
        seen.insert(j);
    }
    assert!(
        seen.iter().copied().eq(0..seen.len() as u64),
        "{what}: SEQ blocks are not a prefix: {} blocks, max {:?}",
        seen.len(),
        seen.last()
    );
    assert!(
        (seen.len() as u64) < BLOCKS,
        "{what}: the workload wrapped around"
    );
    seen.len() as i64 - 1
}
