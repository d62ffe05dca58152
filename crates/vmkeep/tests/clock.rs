//! A host whose clock is off by more than the skew allowance is named when a prune sees its
//! lease (FORMAT.md §13.1): the lease says when it was written by that host's clock, the store
//! says when the write landed.
mod common;

use chrono::{Duration, Utc};
use common::*;
use vmkeep_core::keys::Keys;
use vmkeep_core::{object, ObjectKind};

fn plant_lease(repo: &std::path::Path, name: &str, refreshed: chrono::DateTime<Utc>) {
    let t = refreshed.to_rfc3339();
    let body = serde_json::json!({
        "version": 1, "kind": "backup",
        "host": {"machine": "0123456789abcdef0123456789abcdef", "boot": "another-boot",
                 "pid_ns": 1, "name": name},
        "pid": 1, "pid_start": null, "created": t, "refreshed": t,
    });
    let sealed = object::seal(
        &Keys::plain(),
        ObjectKind::Lock,
        &serde_json::to_vec(&body).unwrap(),
    );
    let dir = repo.join("locks");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("00112233445566778899aabbccddeeff"), sealed).unwrap();
}

#[test]
fn a_host_clock_beyond_the_skew_allowance_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    // Written just now, but its holder's clock says two hours ago.
    plant_lease(&repo, "slow-clock-host", Utc::now() - Duration::hours(2));
    let out = ok(vmkeep(&repo).args(["prune", "--keep-last", "1"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("slow-clock-host")
            && stderr.contains("differs from the repository store's"),
        "{stderr}"
    );
    // A clock within the allowance: nothing said.
    plant_lease(&repo, "good-clock-host", Utc::now() - Duration::seconds(30));
    let out = ok(vmkeep(&repo).args(["prune", "--keep-last", "1"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("differs"), "{stderr}");
}
