//! A disaster-recovery drill end to end: live backups with memory of a running test guest at
//! site A (two, the second incremental), replicated to a replica at site B (its own folder;
//! `--from` pull, as a DR site runs it), site A's repository gone, then `recover` at site B:
//! the guest continues where the last capture left it (the first number it prints continues
//! from the captured disk's SEQ 0..K) and never boots again. On the way, `diff` of the two
//! replicated points says the memory changed (part of it) and the definition did not.
//!
//! Local repositories for now (the HTTPS server comes later). The real binary, the real test
//! guest (seqwrite), one QEMU at a time.
mod common;
#[path = "common/qemu.rs"]
mod qemu;

use std::path::Path;

use common::*;
use qemu::*;
use vmkeep_testkit::guest::{counters, wait_serial_log};
use vmkeep_testkit::process::PidGuard;

const PASS: &str = "dr drill passphrase";

fn pv(repo: &Path) -> assert_cmd::Command {
    let mut c = vmkeep(repo);
    c.env("VMKEEP_PASSWORD", PASS);
    c
}

#[test]
fn back_up_at_a_replicate_to_b_recover_at_b() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (site_a, site_b) = (d.join("site-a"), d.join("site-b"));
    std::fs::create_dir_all(&site_b).unwrap();
    let (repo_a, repo_b) = (site_a.join("repo"), site_b.join("repo"));
    json(pv(&repo_a).args(["init", "--encrypt"]));
    json(pv(&repo_b).arg("init").arg("--replica-of").arg(&repo_a));
    let _lock = qemu_lock();
    let mut vm = boot(d, true);
    vm.wait_progress(10);
    let backup = |repo: &Path, vm: &Vm| {
        json(
            pv(repo)
                .args(["backup", "vm", "--memory", "--qmp"])
                .arg(&vm.qmp)
                .args(["--vm", "guest"]),
        )
    };
    let first = id_of(&backup(&repo_a, &vm));
    let at = vm.progress();
    vm.wait_progress(at + 5);
    let last = id_of(&backup(&repo_a, &vm));
    // Site B pulls what it lacks.
    let r = json(pv(&repo_b).args(["replicate", "--from"]).arg(&repo_a));
    assert_eq!(r["copied"].as_array().unwrap().len(), 2, "{r}");
    vm.kill9();
    // Site A is lost.
    std::fs::remove_dir_all(&site_a).unwrap();

    let check = json(pv(&repo_b).args(["check", "--read-data"]));
    assert_eq!(check["ok"], true, "{check}");
    // What changed between the two captures: the guest's memory (some of it), not its
    // definition.
    let diff = json(pv(&repo_b).args(["diff", &first, &last]));
    let stream = |name: &str| {
        diff["streams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no stream {name}: {diff}"))
            .clone()
    };
    let mem = stream("memory");
    assert_eq!(mem["differs"], true, "{diff}");
    // RAM bytes in differing page-image chunks: some, not all of the guest's 256 MiB.
    let changed = mem["changed_bytes"].as_u64().unwrap();
    assert!(changed > 0 && changed < 256 << 20, "{diff}");
    assert_eq!(stream("vm-definition")["differs"], false, "{diff}");
    let restored = site_b.join("disk");
    json(
        pv(&repo_b)
            .args(["restore", &last, "--target"])
            .arg(&restored),
    );
    let k = prefix_k(
        &std::fs::read(restored.join("vd0.raw")).unwrap(),
        "captured disk",
    );
    let v = json(
        pv(&repo_b)
            .args(["recover", "guest@latest", "--accel", "tcg", "--target"])
            .arg(site_b.join("vm")),
    );
    let _qemu = PidGuard(v["pid"].as_u64().unwrap() as u32);
    assert_eq!(v["id"], last.as_str(), "{v}");
    assert_eq!(v["resumed"], true, "{v}");
    let serial = std::path::PathBuf::from(v["serial"].as_str().unwrap());
    let text = wait_serial_log(&serial, "three counter lines", |t| counters(t).len() >= 3);
    let c = counters(&text);
    assert!(
        c[0] == k || c[0] == k + 1,
        "the first number ({}) continues from the capture (disk holds SEQ 0..{k}): {text}",
        c[0]
    );
    assert!(
        !text.contains("VMKEEP READY"),
        "it resumed, it did not boot: {text}"
    );
}
