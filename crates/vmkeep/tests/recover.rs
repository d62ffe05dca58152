//! `vmkeep backup vm --memory` then `vmkeep recover`, with the real binary and the real test
//! guest (seqwrite: writes SEQ i to its disk, fsynced, then prints `C i`):
//! - the recovered VM resumes: the first number it prints continues from the capture instant
//!   (the disk of the restore point holds SEQ 0..K; it prints K or K+1), its boot banner never
//!   appears again, and it keeps running after vmkeep exits;
//! - a restore point without memory recovers with `--cold` and boots;
//! - a QEMU that cannot load the state is refused before anything is written, no QEMU left;
//! - capture and recover with TMPDIR on a 16 MiB tmpfs (no temporary copies); peak RSS printed.
//!
//! One QEMU at a time machine-wide.

mod common;
#[path = "common/qemu.rs"]
mod qemu;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;
use qemu::*;
use serde_json::Value;
use vmkeep_testkit::guest::{counters, wait_serial_log};
use vmkeep_testkit::process::{PidGuard, Tmpfs};

fn recover(repo: &Path, snap: &str, target: &Path, extra: &[&str]) -> (Value, PidGuard) {
    let v = json(
        vmkeep(repo)
            .args(["recover", snap, "--accel", "tcg", "--target"])
            .arg(target)
            .args(extra),
    );
    let pid = v["pid"].as_u64().expect("pid") as u32;
    (v, PidGuard(pid))
}

/// Runs `cmd` (stdout piped) and returns its JSON output and its peak RSS in KiB (wait4).
// The child is reaped by wait4 (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn json_and_rss(cmd: &mut std::process::Command) -> (Value, i64) {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut stdout = child.stdout.unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child, writing into valid locals.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid);
    let out = reader.join().unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "vmkeep failed: {out}"
    );
    (serde_json::from_str(&out).unwrap(), ru.ru_maxrss)
}

const PASS: &str = "recover test passphrase";

/// `vmkeep --repo REPO` with the passphrase of the encrypted repository.
fn pv(repo: &Path) -> assert_cmd::Command {
    let mut c = vmkeep(repo);
    c.env("VMKEEP_PASSWORD", PASS);
    c
}

#[test]
fn a_recovered_vm_continues_where_it_was_captured() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    json(pv(&repo).args(["init", "--encrypt"]));
    let _lock = qemu_lock();
    let mut vm = boot(d, true);
    vm.wait_progress(20);
    let b = json(
        pv(&repo)
            .args(["backup", "vm", "--memory", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    );
    let id = id_of(&b);
    // The disk of the restore point: SEQ 0..K.
    let restored = d.join("restored");
    let state = d.join("state.bin");
    let r = json(
        pv(&repo)
            .args(["restore", &id, "--target"])
            .arg(&restored)
            .arg("--memory-file")
            .arg(&state),
    );
    // The state as QEMU wrote it: a migration stream (magic "QEVM"), for -incoming file:.
    let bytes = std::fs::read(&state).unwrap();
    assert_eq!(r["memory_bytes"].as_u64(), Some(bytes.len() as u64), "{r}");
    assert_eq!(&bytes[..4], b"QEVM", "{r}");
    let k = prefix_k(
        &std::fs::read(restored.join("vd0.raw")).unwrap(),
        "captured disk",
    );
    let went_on = vm.progress();
    vm.kill9(); // the original is gone: the recovered VM is the only one
    assert!(went_on >= k);
    let snaps = json(pv(&repo).arg("snapshots"));
    assert_eq!(snaps[0]["memory"], true, "{snaps:?}");

    let target = d.join("recovered");
    let t0 = Instant::now();
    let v = json(
        pv(&repo)
            .args(["recover", &id, "--accel", "tcg", "--target"])
            .arg(&target),
    );
    let _qemu = PidGuard(v["pid"].as_u64().unwrap() as u32);
    assert_eq!(v["resumed"], true, "{v}");
    let serial = PathBuf::from(v["serial"].as_str().unwrap());
    let text = wait_serial_log(&serial, "three counter lines", |t| counters(t).len() >= 3);
    eprintln!(
        "recover to the first new serial line: {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let c = counters(&text);
    assert!(
        c[0] == k || c[0] == k + 1,
        "the first number ({}) continues from the capture (disk holds SEQ 0..{k}): {text}",
        c[0]
    );
    assert!(c.windows(2).all(|w| w[1] == w[0] + 1), "{text}");
    assert!(
        !text.contains("VMKEEP READY"),
        "it resumed, it did not boot: {text}"
    );
    assert!(
        !text.contains("failed"),
        "no I/O error in the recovered guest: {text}"
    );
    // The target holds the recovered VM's files; the QMP socket answers.
    let qmp = PathBuf::from(v["qmp"].as_str().unwrap());
    let mut q = Qmp::connect(&qmp);
    assert_eq!(q.execute("query-status", Value::Null)["status"], "running");
    assert!(target.join("vd0.qcow2").exists());
}

#[test]
fn without_memory_recover_needs_cold_and_boots() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let _lock = qemu_lock();
    let mut vm = boot(d, true);
    vm.wait_progress(5);
    let b = json(
        vmkeep(&repo)
            .args(["backup", "vm", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    );
    vm.kill9();
    let id = id_of(&b);
    assert_eq!(snapshots(&repo)[0]["memory"], false);
    fails_with(
        vmkeep(&repo)
            .args(["recover", &id, "--target"])
            .arg(d.join("t1")),
        &["no memory state", "--cold"],
    );
    fails_with(
        vmkeep(&repo)
            .args(["restore", &id, "--target"])
            .arg(d.join("r1"))
            .arg("--memory-file")
            .arg(d.join("state.bin")),
        &["no memory state"],
    );
    assert!(!d.join("r1").exists(), "refused before writing anything");
    let (v, _qemu) = recover(&repo, &id, &d.join("t2"), &["--cold"]);
    assert_eq!(v["resumed"], false, "{v}");
    let serial = PathBuf::from(v["serial"].as_str().unwrap());
    wait_serial_log(&serial, "the boot banner and counting", |t| {
        t.contains("VMKEEP READY") && counters(t).len() >= 2
    });
}

#[test]
fn a_qemu_that_cannot_load_the_state_is_refused_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let _lock = qemu_lock();
    let mut vm = boot(d, true);
    vm.wait_progress(3);
    let b = json(
        vmkeep(&repo)
            .args(["backup", "vm", "--memory", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    );
    vm.kill9();
    // A QEMU that says it is 7.2 and knows only 7.2 machine types.
    let real = vmkeep_testkit::process::require("qemu-system-x86_64");
    let wrapper = d.join("qemu-system-x86_64");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = --version ]; then echo 'QEMU emulator version 7.2.0 (wrapper)'; exit 0; fi\n\
             if [ \"$1\" = -machine ] && [ \"$2\" = help ]; then\n\
             printf 'Supported machines are:\\npc                   Standard PC (alias of pc-i440fx-7.2)\\npc-i440fx-7.2        Standard PC (default)\\n'; exit 0; fi\n\
             exec {} \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = d.join("t");
    let line = fails_with(
        vmkeep(&repo)
            .args(["recover", &id_of(&b), "--qemu"])
            .arg(&wrapper)
            .arg("--target")
            .arg(&target),
        &["7.2.0", "cannot load a state saved by QEMU 10", "--qemu"],
    );
    eprintln!("{line}");
    assert!(!target.exists(), "nothing written");
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmd).contains(&*target.to_string_lossy()),
            "a process still runs for the target: {}",
            String::from_utf8_lossy(&cmd)
        );
    }
}

#[test]
fn capture_and_recover_with_a_16_mib_tmpdir() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let small = d.join("small");
    let Some(_m) = Tmpfs::mount(&small, "16m") else {
        return;
    };
    let _lock = qemu_lock();
    let mut vm = boot(d, true);
    vm.wait_progress(5);
    let (b, rss_capture) = json_and_rss(
        vmkeep_std(&repo)
            .env("TMPDIR", &small)
            .args(["backup", "vm", "--json", "--memory", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    );
    vm.kill9();
    let target = d.join("t");
    let (v, rss_recover) = json_and_rss(
        vmkeep_std(&repo)
            .env("TMPDIR", &small)
            .args([
                "recover",
                &id_of(&b),
                "--json",
                "--accel",
                "tcg",
                "--target",
            ])
            .arg(&target),
    );
    let _qemu = PidGuard(v["pid"].as_u64().unwrap() as u32);
    eprintln!(
        "peak RSS of vmkeep: capture {} MiB, recover {} MiB (256 MiB guest; {} bytes read)",
        rss_capture / 1024,
        rss_recover / 1024,
        b["stats"]["read_bytes"]
    );
    // Bounded, and well below the guest's RAM: no copy of the memory is held.
    assert!(rss_capture < 200 * 1024 && rss_recover < 200 * 1024);
    let serial = PathBuf::from(v["serial"].as_str().unwrap());
    wait_serial_log(&serial, "counting", |t| counters(t).len() >= 2);
    assert_eq!(std::fs::read_dir(&small).unwrap().count(), 0);
}
