//! `vmkeep recover --instant` with the real binary and the real test guest (seqwrite: writes
//! SEQ i to its disk, fsynced, then prints `C i`): the VM resumes on the restore point served
//! from the repository, its first serial lines appear while the disks are still being copied
//! (the copy is throttled so it lasts), the guest writes during the copy, and when the command
//! returns the local qcow2 has no backing file and holds every SEQ the guest wrote, a gap-free
//! prefix continuing the captured one.
//!
//! One QEMU at a time machine-wide.

mod common;
#[path = "common/qemu.rs"]
mod qemu;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use common::*;
use qemu::*;
use serde_json::Value;
use vmkeep_testkit::guest::{counters, wait_serial_log};
use vmkeep_testkit::process::PidGuard;

const PASS: &str = "instant recovery test passphrase";

fn pv(repo: &Path) -> assert_cmd::Command {
    let mut c = vmkeep(repo);
    c.env("VMKEEP_PASSWORD", PASS);
    c
}

fn qemu_img_json(args: &[&str]) -> Value {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn an_instant_recovery_runs_before_its_disks_are_copied_and_keeps_its_writes() {
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
    vm.kill9();

    let target = d.join("instant");
    let t0 = Instant::now();
    let mut cmd = vmkeep_std(&repo);
    cmd.env("VMKEEP_PASSWORD", PASS)
        // 32 MiB at 4 MiB/s: the copy lasts about 8 s, long enough to watch the guest run.
        .env("VMKEEP_COPY_RATE", "4M")
        .args([
            "--json",
            "recover",
            &id,
            "--instant",
            "--accel",
            "tcg",
            "--target",
        ])
        .arg(&target)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let start: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let _qemu = PidGuard(start["pid"].as_u64().unwrap() as u32);
    assert_eq!(start["instant"], true, "{start}");
    assert_eq!(start["resumed"], true, "{start}");
    let serial = PathBuf::from(start["serial"].as_str().unwrap());
    let text = wait_serial_log(&serial, "three counter lines", |t| counters(t).len() >= 3);
    let first_line = t0.elapsed();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the guest ran only after the copy ended"
    );
    let during = counters(&text);
    assert!(!text.contains("VMKEEP READY"), "it resumed: {text}");

    let status = child.wait().unwrap();
    let copied_after = t0.elapsed();
    assert!(status.success(), "recover --instant exited with {status}");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let fin: Value = serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("{rest:?}: {e}"));
    assert_eq!(fin["copied"], true, "{fin}");
    eprintln!(
        "recover --instant: first serial lines after {:.2} s, copy complete after {:.2} s",
        first_line.as_secs_f64(),
        copied_after.as_secs_f64()
    );
    // The VM runs on from local disks alone.
    let image = target.join("vd0.qcow2");
    let info = qemu_img_json(&["info", "-U", "--output=json", image.to_str().unwrap()]);
    assert!(info.get("backing-filename").is_none(), "{info}");
    let qmp = PathBuf::from(start["qmp"].as_str().unwrap());
    let mut q = Qmp::connect(&qmp);
    let c0 = counters(&std::fs::read_to_string(&serial).unwrap()).len();
    let text = wait_serial_log(&serial, "more counter lines", |t| {
        counters(t).len() >= c0 + 3
    });
    assert!(
        !text.contains("failed"),
        "no I/O error in the guest: {text}"
    );
    let all = counters(&text);
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{text}");
    q.execute("quit", Value::Null);
    drop(q);
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Every SEQ the guest printed (during the copy and after) is on the local disk.
    let raw = d.join("after.raw");
    let conv = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(&image)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(conv.status.success(), "{}", describe(&conv));
    let k = prefix_k(&std::fs::read(&raw).unwrap(), "instantly recovered disk");
    assert!(
        k >= *all.last().unwrap() && during[0] <= k,
        "the disk holds SEQ 0..{k}; the guest printed {:?}",
        all
    );
}
