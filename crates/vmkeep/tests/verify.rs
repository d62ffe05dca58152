//! `vmkeep verify` with the real binary and the real test guest in its diskboot workload: the
//! guest boots "from its disk" (a boot record in the disk's first block, run by its init),
//! prints `BOOTED OK`, then `ALIVE n` every second; it has a VGA display and a guest-agent
//! channel (answered by the guest's agent stand-in).
//!
//! - `--all-new` verifies every restore point without a record: the one with memory resumes
//!   and is alive (serial pattern and agent ping, a screenshot saved), the one whose boot
//!   record was wiped boots and fails with the reason (no matching line by the timeout, the
//!   console's last line quoted);
//! - a cold boot of the good one passes with a `--probe` that uses the VM's QMP socket and
//!   serial log;
//! - after one byte of its memory state is flipped in the repository, the good one fails:
//!   its memory does not load;
//! - a run that fails while the repository is gone records nothing and says why;
//! - SIGTERM during a run: the sandbox stops and goes, nothing recorded; SIGKILL: its QEMU
//!   dies with it (PR_SET_PDEATHSIG), and the next verify removes the folder;
//! - `snapshots` lists the latest verification of each, `--all-new` then has nothing to do,
//!   and `forget` removes a restore point's records.
//!
//! One QEMU at a time machine-wide.

mod common;
#[path = "common/qemu.rs"]
mod qemu;

use std::path::Path;
use std::sync::Arc;

use common::*;
use qemu::*;
use serde_json::Value;
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::Repository;
use vmkeep_store::LocalStore;

const PASS: &str = "verify test passphrase";
const BOOT_RECORD: &str = "#!vmkeep-boot\necho BOOTED OK\ni=0\nwhile true; do echo \"ALIVE $i\"; i=$((i+1)); sleep 1; done\n";

fn pv(repo: &Path) -> assert_cmd::Command {
    let mut c = vmkeep(repo);
    c.env("VMKEEP_PASSWORD", PASS);
    c
}

/// `verify ... --json`: its document and exit status.
fn verify(repo: &Path, shots: &Path, args: &[&str]) -> (Value, i32) {
    verify_in(repo, shots, &std::env::temp_dir(), args)
}

/// [`verify`] with TMPDIR=`tmp` (where its sandbox goes).
fn verify_in(repo: &Path, shots: &Path, tmp: &Path, args: &[&str]) -> (Value, i32) {
    let out = pv(repo)
        .env("TMPDIR", tmp)
        .args(["--json", "verify", "--accel", "tcg", "--screenshots"])
        .arg(shots)
        .args(args)
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        describe(&out)
    );
    (single_json(&out.stdout), code)
}

fn result_of<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no result for {id}: {doc}"))
}

/// The sandbox folders in `tmp` (verify's TMPDIR).
fn sandboxes(tmp: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(tmp)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains("vmkeep-verify-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of the processes whose command line names something in `tmp` (the sandbox's QEMU).
fn processes_in(tmp: &Path) -> Vec<u32> {
    let needle = tmp.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// A verify of `snap` that waits for a line that never comes, started with TMPDIR=`tmp`;
/// returned once its sandboxed QEMU runs.
fn verify_running(
    repo: &Path,
    shots: &Path,
    tmp: &Path,
    snap: &str,
    timeout: &str,
) -> std::process::Child {
    let mut child = vmkeep_std(repo)
        .env("VMKEEP_PASSWORD", PASS)
        .env("TMPDIR", tmp)
        .args(["verify", "--accel", "tcg", "--screenshots"])
        .arg(shots)
        .args([snap, "--serial", "NEVER PRINTED", "--timeout", timeout])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while processes_in(tmp).is_empty() {
        assert!(
            std::time::Instant::now() < until,
            "no sandboxed QEMU in 60 s"
        );
        assert!(child.try_wait().unwrap().is_none(), "verify ended early");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child
}

/// Waits up to 10 s for the processes of `tmp` to be gone.
fn assert_no_process_in(tmp: &Path) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !processes_in(tmp).is_empty() {
        assert!(
            std::time::Instant::now() < until,
            "left running: {:?}",
            processes_in(tmp)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A 32 MiB qcow2 whose first block holds the boot record.
fn bootable_disk(d: &Path) -> std::path::PathBuf {
    let raw = d.join("boot.raw");
    let mut data = vec![0u8; (DISK_MIB << 20) as usize];
    data[..BOOT_RECORD.len()].copy_from_slice(BOOT_RECORD.as_bytes());
    write(&raw, &data);
    let disk = d.join("vda.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    disk
}

/// Flips one byte inside the first index blob of the memory stream of `snap` (`check` finds
/// it without `--read-data`: it reads every stream index).
fn damage_memory(repo: &Path, snap: &str) {
    let store = Arc::new(LocalStore::open(repo).unwrap());
    let r = Repository::open(store, Some(PASS.as_bytes())).unwrap();
    let m = r.resolve(snap).unwrap();
    let stream = m.streams.iter().find(|s| s.name == "memory").unwrap();
    let index = BlobIndex::load(&r).unwrap();
    let loc = index.get(&stream.index[0]).unwrap();
    let pack = pack_path(repo, &loc.pack.to_hex());
    let at = loc.offset as u64 + loc.length as u64 / 2;
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[at as usize] ^= 0xff;
    write(&pack, &bytes);
}

#[test]
fn verify_proves_what_comes_back_and_says_why_the_rest_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let shots = d.join("shots");
    json(pv(&repo).args(["init", "--encrypt"]));
    let disk = bootable_disk(d);
    let _lock = qemu_lock();
    let qga = d.join("qga.sock");
    let mut vm = VmBuilder::new(d, "")
        .blockdev_qcow2(&disk, "vd0")
        .kernel(
            &guest().join("vmlinuz"),
            &guest().join("initrd.gz"),
            "console=ttyS0 quiet panic=-1 vmkeep.workload=diskboot",
        )
        .args(["-device", "VGA", "-device", "virtio-serial-pci", "-chardev"])
        .arg(format!(
            "socket,id=qga0,path={},server=on,wait=off",
            qga.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ])
        .boot();
    vm.wait_serial("ALIVE 2");
    let good = id_of(&json(
        pv(&repo)
            .args(["backup", "vm", "--memory", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    ));
    // The boot record wiped under the running guest: the next restore point cannot boot.
    let said = vm.execute(
        "human-monitor-command",
        serde_json::json!({"command-line": "qemu-io -d /machine/peripheral/vd0/virtio-backend \"write -P 0 0 4k\""}),
    );
    assert_eq!(said, "", "qemu-io reports errors, and only errors, here");
    let wiped = id_of(&json(
        pv(&repo)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    ));
    vm.kill9();

    // Both new: the good one resumes and answers; the wiped one boots and fails.
    let (doc, code) = verify(
        &repo,
        &shots,
        &[
            "--all-new",
            "--serial",
            "ALIVE|BOOTED OK",
            "--timeout",
            "25",
        ],
    );
    assert_eq!(code, 3, "one failed: {doc}");
    let ok = result_of(&doc, &good);
    assert_eq!(ok["ok"], true, "{doc}");
    assert_eq!(ok["mode"], "resume", "{doc}");
    assert_eq!(ok["recorded"], true, "{doc}");
    let evidence = ok["evidence"].as_str().unwrap();
    assert!(evidence.contains("serial line"), "{evidence}");
    assert!(evidence.contains("guest agent answered"), "{evidence}");
    let png = std::fs::read(ok["screenshot"].as_str().expect("a screenshot")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let bad = result_of(&doc, &wiped);
    assert_eq!(bad["ok"], false, "{doc}");
    assert_eq!(bad["mode"], "boot", "{doc}");
    let reason = bad["reason"].as_str().unwrap();
    assert!(
        reason.contains("no serial line matching") && reason.contains("no boot record"),
        "{reason}"
    );

    // A cold boot of the good one, proven by a probe against its QMP socket and console.
    let (doc, code) = verify(
        &repo,
        &shots,
        &[
            &good,
            "--cold",
            "--no-agent",
            "--timeout",
            "60",
            "--probe",
            "test -S \"$VMKEEP_QMP\" && grep -q 'BOOTED OK' \"$VMKEEP_SERIAL\"",
        ],
    );
    assert_eq!(code, 0, "{doc}");
    let r = result_of(&doc, &good);
    assert_eq!(r["mode"], "boot", "{doc}");
    assert!(
        r["evidence"].as_str().unwrap().contains("probe succeeded"),
        "{doc}"
    );

    // Interrupted (SIGTERM): the sandbox stops and goes, nothing is recorded.
    let tmp = d.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let records = objects(&repo, "verified").len();
    let child = verify_running(&repo, &shots, &tmp, &good, "300");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(
        one_line_error(&out, 1).contains("interrupted while verifying"),
        "{}",
        describe(&out)
    );
    assert_no_process_in(&tmp);
    assert_eq!(sandboxes(&tmp), Vec::<std::path::PathBuf>::new());
    assert_eq!(objects(&repo, "verified").len(), records);
    // The repository gone while a run fails (here by its timeout): that says nothing about
    // the restore point, and nothing is recorded.
    let child = verify_running(&repo, &shots, &tmp, &good, "15");
    let away = d.join("repo-away");
    std::fs::rename(&repo, &away).unwrap();
    let out = child.wait_with_output().unwrap();
    std::fs::rename(&away, &repo).unwrap();
    // (Warnings of the failed reads come before the error line.)
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && stderr
                .lines()
                .last()
                .is_some_and(|l| l.contains("the repository does not answer")),
        "{}",
        describe(&out)
    );
    assert_no_process_in(&tmp);
    assert_eq!(objects(&repo, "verified").len(), records);
    // Killed (SIGKILL): its QEMU dies with it; the next verify removes the sandbox folder.
    let mut child = verify_running(&repo, &shots, &tmp, &good, "300");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_no_process_in(&tmp);
    assert_eq!(sandboxes(&tmp).len(), 1, "left by the killed verify");
    assert_eq!(objects(&repo, "verified").len(), records);

    // Its memory damaged in the repository: it no longer comes back.
    damage_memory(&repo, &good);
    let out = pv(&repo).args(["--json", "check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("stream:memory"));
    // The host's cache holds the blob as it was read before (verified by its id): without
    // it, the damaged copy in the repository is all there is.
    std::fs::remove_dir_all(cache_beside(&repo)).unwrap();
    let (doc, code) = verify_in(
        &repo,
        &shots,
        &tmp,
        &[&good, "--serial", "ALIVE", "--timeout", "60"],
    );
    assert_eq!(code, 3, "{doc}");
    assert_eq!(sandboxes(&tmp), Vec::<std::path::PathBuf>::new(), "swept");
    let r = result_of(&doc, &good);
    assert_eq!(r["ok"], false, "{doc}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("the memory state did not load"),
        "{doc}"
    );
    // At once: QEMU waited for the rest of a state that could not come (120 s) before.
    assert!(r["seconds"].as_f64().unwrap() < 30.0, "{doc}");

    // `snapshots` shows the latest of each; nothing is new any more.
    let list = json(pv(&repo).arg("snapshots"));
    let list = list.as_array().unwrap();
    let entry = |id: &str| list.iter().find(|s| s["id"] == id).unwrap().clone();
    let g = entry(&good);
    assert_eq!(g["verified"]["ok"], false, "{g}");
    assert_eq!(g["verified"]["count"], 3, "{g}");
    let w = entry(&wiped);
    assert_eq!(w["verified"]["mode"], "boot", "{w}");
    assert_eq!(w["verified"]["count"], 1, "{w}");
    let (doc, code) = verify(&repo, &shots, &["--all-new"]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["results"].as_array().unwrap().len(), 0, "{doc}");

    // Forget takes a restore point's records with it.
    assert_eq!(objects(&repo, "verified").len(), 4);
    json(pv(&repo).args(["forget", &wiped]));
    assert_eq!(objects(&repo, "verified").len(), 3);
}
