//! `VM@latest` with an unreadable manifest, with the real binary. An unreadable manifest's VM
//! and time are unknown, so it may be the newest point of the VM: resolving `VM@latest` must
//! fail and name it, never silently restore an older point. Backups still choose their parent
//! among the readable points.

mod common;

use std::path::Path;

use common::*;

/// Overwrite the middle of a manifest object so it no longer decodes.
fn damage_manifest(repo: &Path, id: &str) {
    let path = repo.join("snapshots").join(id);
    let len = std::fs::metadata(&path).unwrap().len();
    patch(&path, len / 2, b"garbage!");
}

#[test]
fn latest_fails_when_a_manifest_is_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let img1 = dir.path().join("disk1.img");
    let img2 = dir.path().join("disk2.img");
    write(&img1, &random_bytes(512 * 1024, 71));
    write(&img2, &random_bytes(512 * 1024, 72));
    let s1 = id_of(&backup(&repo, "web", &[("sda", &img1)]));
    let s2 = id_of(&backup(&repo, "web", &[("sda", &img2)]));
    damage_manifest(&repo, &s2);

    // web@latest must not fall back to S1.
    let target = dir.path().join("out");
    let line = fails_with(
        vmkeep(&repo)
            .args(["restore", "web@latest", "--target"])
            .arg(&target),
        &[&s2, "unreadable", "vmkeep check", "vmkeep forget"],
    );
    assert!(!line.contains(&s1), "S1 is not what was asked for: {line}");
    assert!(!target.join("sda.raw").exists(), "nothing restored: {line}");

    // The older point restores by id.
    assert_restores(&repo, &s1, "sda", &img1, dir.path());
}

#[test]
fn latest_of_any_vm_fails_while_some_manifest_is_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let img = dir.path().join("disk.img");
    write(&img, &random_bytes(256 * 1024, 81));
    let web = id_of(&backup(&repo, "web", &[("sda", &img)]));
    let db = id_of(&backup(&repo, "db", &[("sda", &img)]));
    // The damaged manifest could belong to web: web@latest cannot be known.
    damage_manifest(&repo, &db);
    fails_with(
        vmkeep(&repo)
            .args(["restore", "web@latest", "--target"])
            .arg(dir.path().join("out")),
        &[&db, "unreadable"],
    );
    // By id it works.
    assert_restores(&repo, &web, "sda", &img, dir.path());
    // After forgetting the damaged point, web@latest works again.
    json(vmkeep(&repo).args(["forget", &db]));
    assert_restores(&repo, "web@latest", "sda", &img, dir.path());
}

#[test]
fn backup_still_chooses_the_newest_readable_parent() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let img = dir.path().join("disk.img");
    write(&img, &random_bytes(256 * 1024, 91));
    let s1 = id_of(&backup(&repo, "web", &[("sda", &img)]));
    let s2 = id_of(&backup(&repo, "web", &[("sda", &img)]));
    damage_manifest(&repo, &s2);
    let s3 = backup(&repo, "web", &[("sda", &img)]);
    assert_eq!(s3["parent"], s1.as_str(), "{s3}");
}
