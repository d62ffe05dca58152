//! Helpers of the live-backup tests: the two-disk guest, backups, restores, prefix checks.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use vmkeep_core::manifest::Manifest;
use vmkeep_qemu::capture::{backup_vm, VmBackupOptions};
use vmkeep_qemu::qmp::QmpClient;
use vmkeep_repo::{InitOptions, NoProgress, Repository, RestoreOptions};
use vmkeep_store::LocalStore;

pub const MIB: u64 = 1 << 20;
pub const DISK_MIB: u64 = 32;
pub const BLOCKS: u64 = DISK_MIB * MIB / 4096;
pub const FILL: u8 = 0x5a;
pub const CS: u64 = 65536;

pub fn guest() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/guest/build.sh");
    let out = run(Command::new("bash").arg(&script));
    PathBuf::from(out.lines().last().expect("guest dir").trim())
}

/// Two qcow2 disks, filled with FILL so the first backup reads everything.
pub fn make_disks(d: &Path) -> [PathBuf; 2] {
    let disks = [d.join("a.qcow2"), d.join("b.qcow2")];
    for disk in &disks {
        make_qcow2(disk, &format!("{DISK_MIB}M"));
        qemu_io(disk, &[&format!("write -P {FILL} 0 {DISK_MIB}M")]);
    }
    disks
}

pub struct Vm {
    pub qemu: ChildGuard,
    pub qmp: PathBuf,
    pub log: PathBuf,
}

/// Boots the guest on the two disks: vda by -blockdev + device id `vd0`, vdb by -drive id
/// `drive1` (auto-generated node names) with an anonymous device. `guest: false` starts QEMU
/// with -S and no kernel (just the block layer).
pub fn boot(d: &Path, disks: &[PathBuf; 2], run_id: usize, guest_dir: Option<&Path>) -> Vm {
    boot_with(
        d,
        disks,
        run_id,
        guest_dir.map(|g| g.join("initrd.gz")).as_deref(),
        guest_dir,
        &[],
    )
}

/// [`boot`] with another initrd and extra QEMU arguments.
pub fn boot_with(
    d: &Path,
    disks: &[PathBuf; 2],
    run_id: usize,
    initrd: Option<&Path>,
    guest_dir: Option<&Path>,
    extra: &[String],
) -> Vm {
    let qmp = d.join(format!("qmp{run_id}.sock"));
    let log = d.join(format!("serial{run_id}.log"));
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
    match guest_dir {
        Some(g) => {
            cmd.arg("-kernel")
                .arg(g.join("vmlinuz"))
                .arg("-initrd")
                .arg(initrd.expect("an initrd with the kernel"))
                .arg("-append")
                .arg("console=ttyS0 quiet panic=-1 vmkeep.workload=seqwrite");
        }
        None => {
            cmd.arg("-S");
        }
    }
    cmd.arg("-blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=f0",
            disks[0].display()
        ))
        .arg("-blockdev")
        .arg("driver=qcow2,file=f0,node-name=disk0")
        .arg("-device")
        .arg("virtio-blk-pci,drive=disk0,id=vd0")
        .arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=none,id=drive1",
            disks[1].display()
        ))
        .arg("-device")
        .arg("virtio-blk-pci,drive=drive1")
        .args(extra);
    let mut qemu = ChildGuard::spawn(&mut cmd);
    wait_for_socket(&qmp, &mut qemu);
    Vm { qemu, qmp, log }
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
            if let Ok(Some(st)) = self.qemu.0.try_wait() {
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

    pub fn qmp(&self, f: impl AsyncFnOnce(&QmpClient)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = QmpClient::connect(&self.qmp).await.unwrap();
            f(&c).await;
            c.close().await;
        });
    }

    pub fn quit(mut self) {
        self.qmp(async |c| {
            let _ = c.quit().await;
        });
        let _ = self.qemu.0.wait();
    }

    pub fn kill9(mut self) {
        self.qemu.0.kill().unwrap(); // SIGKILL
        let _ = self.qemu.0.wait();
    }

    pub fn vmkeep_bitmaps(&self) -> Vec<(String, String, bool)> {
        let mut out = Vec::new();
        self.qmp(async |c| {
            for n in c.query_named_block_nodes().await.unwrap() {
                for b in n.dirty_bitmaps {
                    if b.name.starts_with("vmkeep-") {
                        out.push((n.node_name.clone(), b.name, b.recording));
                    }
                }
            }
        });
        out
    }

    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.qmp(async |c| {
            for n in c.query_named_block_nodes().await.unwrap() {
                if n.node_name.starts_with("vmkeep") {
                    out.push(n.node_name);
                }
            }
            let jobs = c
                .execute("query-block-jobs", serde_json::Value::Null)
                .await
                .unwrap();
            for j in jobs.as_array().unwrap() {
                out.push(format!("job {}", j["device"]));
            }
        });
        out
    }
}

pub fn repo(d: &Path) -> Repository {
    let store = Arc::new(LocalStore::create(d.join("repo")).unwrap());
    Repository::init(
        store,
        InitOptions {
            chunk_size: CS as u32,
            passphrase: None,
            kdf: Default::default(),
        },
    )
    .unwrap()
}

pub fn backup(repo: &Repository, vm: &Vm, full: bool) -> Manifest {
    backup_vm(
        repo,
        &VmBackupOptions {
            qmp: vm.qmp.clone(),
            vm: "guest".into(),
            full,
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap()
}

pub fn restore(repo: &Repository, m: &Manifest, dir: &Path) -> Vec<(String, Vec<u8>)> {
    let stats = repo
        .restore(
            m,
            &RestoreOptions {
                target: dir.to_path_buf(),
                disk: None,
            },
            &NoProgress,
        )
        .unwrap();
    stats
        .disks
        .iter()
        .map(|d| (d.name.clone(), std::fs::read(&d.path).unwrap()))
        .collect()
}

/// The K of a point-in-time image: every block is FILL or `SEQ j` at block (j*97) mod N, and
/// the j's are exactly 0..=K. Returns K (-1 when no SEQ block).
pub fn prefix_k(img: &[u8], what: &str) -> i64 {
    assert_eq!(img.len() as u64, DISK_MIB * MIB, "{what}: size");
    let mut seen = BTreeSet::new();
    for (b, blk) in img.chunks(4096).enumerate() {
        if blk.iter().all(|x| *x == FILL) {
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
    let k = seen.len() as i64 - 1;
    assert!(
        seen.iter().copied().eq(0..seen.len() as u64),
        "{what}: SEQ blocks are not a prefix: {} blocks, max {:?}",
        seen.len(),
        seen.last()
    );
    assert!((k as u64) < BLOCKS, "{what}: the workload wrapped around");
    k
}

/// Both disks of a restore point: each a prefix, vdb's K equal to vda's or one less.
pub fn check_cut(repo: &Repository, m: &Manifest, dir: &Path) -> (i64, i64) {
    let disks = restore(repo, m, dir);
    let get = |n: &str| {
        &disks
            .iter()
            .find(|(name, _)| name == n)
            .unwrap_or_else(|| panic!("disk {n} in {:?}", m.disks))
            .1
    };
    let ka = prefix_k(get("vd0"), "vd0");
    let kb = prefix_k(get("drive1"), "drive1");
    assert!(
        kb == ka || kb == ka - 1,
        "disks cut at different instants: vda K={ka}, vdb K={kb}"
    );
    (ka, kb)
}

pub fn cbt(m: &Manifest) -> Vec<(String, String, Option<String>)> {
    m.disks
        .iter()
        .map(|d| (d.name.clone(), d.cbt.to_string(), d.cbt_reason.clone()))
        .collect()
}

pub fn open_repo(d: &Path) -> Repository {
    Repository::open(Arc::new(LocalStore::open(d.join("repo")).unwrap()), None).unwrap()
}
