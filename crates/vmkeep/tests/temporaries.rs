//! Temporary files of killed writers (`.tmp-*`, written by the local store before the rename
//! that publishes an object), with the real binary: `check` reports them as warnings, `prune`
//! removes those older than the lease timeout plus the clock-skew allowance and reports what it
//! removed, and leaves younger ones (a live writer's) alone.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;

const MIB: usize = 1 << 20;

/// A temporary file of `len` bytes last modified `age` ago.
fn plant_temporary(path: &Path, len: usize, age: Duration) {
    write(path, &vec![0x5a; len]);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

#[test]
fn prune_removes_old_temporaries_and_check_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let img = dir.path().join("disk.img");
    write(&img, &random_bytes(2 * MIB, 5));
    let s1 = id_of(&backup(&repo, "web", &[("sda", &img)]));
    let pack = objects(&repo, "packs").into_iter().next().unwrap();
    let pack_dir = repo.join("packs").join(&pack[..2]);

    // A writer killed an hour ago mid-put of a 16 MiB pack; another one writing right now.
    let dead = pack_dir.join(".tmp-00dead00dead00de");
    plant_temporary(&dead, 16 * MIB, Duration::from_secs(3600));
    let live = repo.join("index").join(".tmp-11live11live11li");
    plant_temporary(&live, MIB, Duration::ZERO);

    // check: both are warnings, not damage.
    let c = json(vmkeep(&repo).arg("check"));
    assert_eq!(c["ok"], true, "{c}");
    let warnings = c["warnings"].to_string();
    assert!(
        warnings.contains(".tmp-00dead00dead00de") && warnings.contains(".tmp-11live11live11li"),
        "check names both temporaries: {c}"
    );

    // prune: the old one goes, the live writer's stays; the figures are in the stats.
    let p = json(vmkeep(&repo).arg("prune"));
    assert_eq!(p["temporaries"]["removed"], 1, "{p}");
    assert_eq!(p["temporaries"]["bytes"], 16 * MIB as u64, "{p}");
    assert!(!dead.exists(), "the dead writer's temporary is removed");
    assert!(live.exists(), "a live writer's temporary is kept");
    let out = ok(vmkeep(&repo).arg("prune"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("temporar"), "nothing more to remove: {text}");

    // check still reports the young one, and nothing else changed.
    let c = json(vmkeep(&repo).arg("check"));
    let warnings = c["warnings"].to_string();
    assert!(!warnings.contains(".tmp-00dead"), "{c}");
    assert!(warnings.contains(".tmp-11live"), "{c}");
    assert_restores(&repo, &s1, "sda", &img, dir.path());
}

#[test]
fn prune_reports_removed_temporaries_in_human_output() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    plant_temporary(
        &repo.join("snapshots").join(".tmp-22dead22dead22de"),
        3 * MIB,
        Duration::from_secs(7200),
    );
    let out = ok(vmkeep(&repo).arg("prune"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("removed 1 temporary file (3.00 MiB)"),
        "{text}"
    );
}
