//! A vmkeep stopped (SIGSTOP) while an NBD read is in flight, for longer than the NBD request
//! timeout, finishes its backup once resumed (issue 7, defect 8): the reply sat in the socket
//! while the process was stopped, and time the process did not run is not a timeout.
//!
//! `backup image` of a qcow2 reads it through NBD from a qemu-storage-daemon vmkeep starts (no
//! system emulator). The request timeout is made short (`VMKEEP_NBD_TIMEOUT_SECS`) and vmkeep
//! stops itself at the kill point `nbd-request-sent` (its first read's request sent, its reply
//! awaited); the test keeps it stopped for twice the timeout, then resumes it.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use vmkeep_testkit::tools::{make_qcow2, qemu_io, raw_content};

const TIMEOUT_SECS: u64 = 2;

fn backup_image(repo: &Path, image: &Path) -> std::process::Command {
    let mut c = vmkeep_std(repo);
    c.args(["backup", "image", "--vm", "img", "--json", "--disk"])
        .arg(format!("vd0={}", image.display()))
        .env("VMKEEP_NBD_TIMEOUT_SECS", TIMEOUT_SECS.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c
}

#[test]
fn a_backup_stopped_past_the_nbd_timeout_completes_when_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let image = d.join("vd0.qcow2");
    make_qcow2(&image, "16M");
    qemu_io(
        &image,
        &[
            "write -P 0x5a 0 3M",
            "write -P 0xa5 7M 64k",
            "write -P 0x01 15M 1M",
        ],
    );

    let mut child = backup_image(&repo, &image)
        .env("VMKEEP_STOP_AT", "nbd-request-sent")
        .spawn()
        .expect("spawn vmkeep");
    wait_stopped(&mut child);
    std::thread::sleep(Duration::from_secs(2 * TIMEOUT_SECS));
    resume(&child);
    let out = child.wait_with_output().expect("vmkeep ran");
    assert!(out.status.success(), "{}", describe(&out));
    let b = single_json(&out.stdout);
    assert_eq!(
        b["stats"]["read_bytes"].as_u64(),
        Some((3 << 20) + (64 << 10) + (1 << 20)),
        "every allocated chunk read: {b}"
    );

    let want = d.join("want.raw");
    std::fs::write(&want, raw_content(&image, d)).unwrap();
    assert_restores(&repo, &id_of(&b), "vd0", &want, d);
}

#[test]
fn an_invalid_nbd_timeout_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    fails_with(
        vmkeep(&repo)
            .args(["snapshots"])
            .env("VMKEEP_NBD_TIMEOUT_SECS", "0"),
        &["VMKEEP_NBD_TIMEOUT_SECS", "whole number of seconds"],
    );
}
