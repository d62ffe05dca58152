//! Parent links stay exact when processes die mid-way (issue 6, defect 6, crash stories of
//! FORMAT.md §13.6): a backup commits while a forget deletes its parent, and both die before
//! either can fix the link; the next prune relinks the restore point (newest older point,
//! change maps by tree comparison). Also `repair index` killed between writing the new index
//! objects and deleting the old ones.
mod common;

use std::process::Stdio;

use common::*;

#[test]
fn a_dangling_parent_left_by_two_crashes_is_relinked_by_the_next_prune() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    ok(vmkeep(&repo).args(["init"]));
    let img = dir.join("a.img");
    let mut data = semi_bytes(4 << 20, seed("relink"));
    write(&img, &data);
    let m0 = id_of(&backup(&repo, "vm", &[("sys", &img)]));
    data[0..65536].copy_from_slice(&random_bytes(65536, seed("relink-1")));
    write(&img, &data);
    let m1 = id_of(&backup(&repo, "vm", &[("sys", &img)]));
    data[1 << 20..(1 << 20) + 65536].copy_from_slice(&random_bytes(65536, seed("relink-2")));
    write(&img, &data);
    let want = dir.join("want.img");
    std::fs::copy(&img, &want).unwrap();

    // The backup checks its parent (m1, present), then stops before writing its manifest.
    let mut b = vmkeep_std(&repo);
    b.args(["--json", "backup", "image", "--vm", "vm", "--disk"])
        .arg(format!("sys={}", img.display()))
        .env("VMKEEP_STOP_AT", "before-manifest")
        .env("VMKEEP_KILL_AT", "after-manifest")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut b = b.spawn().unwrap();
    wait_stopped(&mut b);
    // Forget m1: it lists the points (the backup's is not there), deletes m1, and dies before
    // it re-lists.
    let out = vmkeep_std(&repo)
        .args(["forget", &m1])
        .env("VMKEEP_KILL_AT", "after-forget-delete")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "forget was killed: {}",
        describe(&out)
    );
    // The backup writes its manifest naming m1, and dies before it checks its parent again.
    resume(&b);
    let out = b.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "backup was killed: {}",
        describe(&out)
    );
    let points = snapshots(&repo);
    let new = points
        .iter()
        .find(|p| p["id"] != m0.as_str())
        .expect("the backup's restore point landed");
    assert_eq!(
        new["parent"],
        m1.as_str(),
        "it names the forgotten point: {new}"
    );

    // The next maintenance run relinks it first thing.
    json(vmkeep(&repo).arg("prune"));
    let points = snapshots(&repo);
    let new = points.iter().find(|p| p["id"] != m0.as_str()).unwrap();
    assert_eq!(
        new["parent"],
        m0.as_str(),
        "relinked to the newest older point: {new}"
    );
    let id = id_of(new);
    assert_restores(&repo, &id, "sys", &want, dir);
    // Its change map against m0 is exact: the two chunks that differ (0 and 16).
    let diff = vmkeep(&repo)
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    assert!(diff.status.success(), "{}", describe(&diff));
    let manifest_changes = changes_of(&repo, &id);
    assert_eq!(manifest_changes, vec![0, 16], "change map against m0");
}

/// The change map of `id`'s disk `sys` (the CLI prints no change maps: read the manifest with
/// the library).
fn changes_of(repo: &std::path::Path, id: &str) -> Vec<u64> {
    let store: std::sync::Arc<dyn vmkeep_store::Store> =
        std::sync::Arc::new(vmkeep_store::LocalStore::open(repo).unwrap());
    let r = vmkeep_repo::Repository::open(store, None).unwrap();
    let m = r.load_manifest(&id.parse().unwrap()).unwrap();
    m.disk("sys")
        .unwrap()
        .changes
        .as_ref()
        .unwrap()
        .iter()
        .collect()
}

#[test]
fn repair_index_killed_between_new_and_old_objects_leaves_a_clean_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    ok(vmkeep(&repo).args(["init"]));
    let img = dir.join("a.img");
    write(&img, &semi_bytes(3 << 20, seed("repair-kill")));
    let id = id_of(&backup(&repo, "vm", &[("sys", &img)]));
    let before = objects(&repo, "index");
    let out = vmkeep_std(&repo)
        .args(["repair", "index"])
        .env("VMKEEP_KILL_AT", "after-index-rebuilt")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    let out = vmkeep(&repo)
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "old and new index objects side by side: {}",
        describe(&out)
    );
    json(vmkeep(&repo).args(["repair", "index"]));
    let after = objects(&repo, "index");
    assert!(!after.is_empty());
    assert_restores(&repo, &id, "sys", &img, dir);
    println!("index objects before {before:?}, after {after:?}");
}
