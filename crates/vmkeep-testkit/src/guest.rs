//! The tiny Linux test guest (tests/guest/build.sh) and its seqwrite workload.
//!
//! seqwrite writes `SEQ i` (zero padded to 4 KiB) to block `(i*97) mod N` of vda, then of vdb,
//! each fsynced, then prints `C i` and goes on with i+1. A point-in-time image of a disk
//! therefore holds exactly SEQ 0..K with no gap; with one cut over both disks, vdb's K is vda's
//! K (cut after vdb's write) or one less (cut between the two writes of the same i).
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::run;
use crate::tools::{make_qcow2, qemu_io};
use crate::vm::VmBuilder;

/// Size of the test disks: small enough for TCG, larger than the workload writes in a test.
pub const DISK_MIB: u64 = 32;
const MIB: u64 = 1 << 20;
/// 4 KiB blocks of a test disk (N of the workload).
pub const BLOCKS: u64 = DISK_MIB * MIB / 4096;
/// The byte [`make_filled_disks`] writes everywhere, so a first backup reads every chunk.
pub const FILL: u8 = 0x5a;
/// The kernel command line of the seqwrite workload.
pub const SEQWRITE: &str = "console=ttyS0 quiet panic=-1 vmkeep.workload=seqwrite";

/// The kernel command line of the idle workload (prints `IDLE`, then sleeps).
pub const IDLE: &str = "console=ttyS0 quiet panic=-1 vmkeep.workload=idle";

/// The guest's folder (`vmlinuz`, `initrd.gz`), built once and cached by the script.
pub fn guest() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/guest/build.sh");
    let out = run(Command::new("bash").arg(&script));
    PathBuf::from(
        out.lines()
            .last()
            .expect("build.sh printed the guest dir")
            .trim(),
    )
}

impl VmBuilder {
    /// Boots the test guest (`initrd`, or the guest's own `initrd.gz`) running seqwrite.
    pub fn seqwrite(self, guest: &Path, initrd: Option<&Path>) -> Self {
        let initrd = initrd
            .map(Path::to_path_buf)
            .unwrap_or_else(|| guest.join("initrd.gz"));
        self.kernel(&guest.join("vmlinuz"), &initrd, SEQWRITE)
    }
}

impl VmBuilder {
    /// Boots the test guest running the idle workload ([`crate::vm::Vm::wait_serial`] for
    /// `IDLE`).
    pub fn idle(self, guest: &Path) -> Self {
        self.kernel(&guest.join("vmlinuz"), &guest.join("initrd.gz"), IDLE)
    }
}

/// Two qcow2 disks `a.qcow2`, `b.qcow2` of [`DISK_MIB`] in `dir`, filled with [`FILL`].
pub fn make_filled_disks(dir: &Path) -> [PathBuf; 2] {
    let disks = [dir.join("a.qcow2"), dir.join("b.qcow2")];
    for disk in &disks {
        make_qcow2(disk, &format!("{DISK_MIB}M"));
        qemu_io(disk, &[&format!("write -P {FILL} 0 {DISK_MIB}M")]);
    }
    disks
}

/// The two disk configurations a capture must name: vda by `-blockdev` on a device with id
/// `vd0`, vdb by `-drive id=drive1` (QEMU-generated node names) on a device without an id.
pub fn two_disk_vm(dir: &Path, disks: &[PathBuf; 2], tag: &str) -> VmBuilder {
    VmBuilder::new(dir, tag)
        .blockdev_qcow2(&disks[0], "vd0")
        .drive_qcow2(&disks[1], "drive1")
}

/// The K of a point-in-time image of a seqwrite disk: every 4 KiB block is `fill` (never
/// written) or `SEQ j` at block (j*97) mod [`BLOCKS`], and the j's are exactly 0..=K. Returns
/// K (-1 when no SEQ block); panics naming `what` otherwise.
pub fn prefix_k(img: &[u8], fill: u8, what: &str) -> i64 {
    assert_eq!(img.len() as u64, BLOCKS * 4096, "{what}: size");
    let mut seen = BTreeSet::new();
    for (b, blk) in img.chunks(4096).enumerate() {
        if blk.iter().all(|x| *x == fill) {
            continue;
        }
        let head = std::str::from_utf8(&blk[..15])
            .unwrap_or_else(|_| panic!("{what}: block {b} is neither fill nor SEQ"));
        let j: u64 = head
            .strip_prefix("SEQ ")
            .and_then(|s| s.strip_suffix('\n'))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{what}: block {b} is neither fill nor SEQ: {head:?}"));
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

/// Both disks of one restore point of [`two_disk_vm`] (filled with [`FILL`]): each a prefix,
/// vdb's K equal to vda's or one less. Returns both K.
pub fn check_two_disk_cut(vd0: &[u8], drive1: &[u8]) -> (i64, i64) {
    let ka = prefix_k(vd0, FILL, "vd0");
    let kb = prefix_k(drive1, FILL, "drive1");
    assert!(
        kb == ka || kb == ka - 1,
        "disks cut at different instants: vda K={ka}, vdb K={kb}"
    );
    (ka, kb)
}

/// The seqwrite counters (`C i` lines) of a serial log, in order.
pub fn counters(log: &str) -> Vec<i64> {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("C ").and_then(|n| n.parse().ok()))
        .collect()
}

/// Waits until the serial log at `path` satisfies `done`; returns its text.
pub fn wait_serial_log(path: &Path, what: &str, done: impl Fn(&str) -> bool) -> String {
    let start = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if done(&text) {
            return text;
        }
        assert!(
            start.elapsed() < crate::vm::PROGRESS_TIMEOUT,
            "serial log {} never showed {what}: {text}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
