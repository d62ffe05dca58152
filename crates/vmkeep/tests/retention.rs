//! `prune --keep-*` with the real binary: restic's current rules (restic >= 0.16), including the
//! oldest restore point kept by a rule that has counts left, and `unlimited`.

mod common;

use common::*;
use serde_json::Value;

/// Three restore points of one VM taken on one UTC day (retried in a fresh repository in the
/// rare case the backups straddle midnight). Returns (repository, ids oldest first).
fn three_points_on_one_day(dir: &std::path::Path) -> (std::path::PathBuf, Vec<String>) {
    for attempt in 0..3 {
        let repo = dir.join(format!("repo{attempt}"));
        init(&repo, &[]);
        let img = dir.join(format!("disk{attempt}.img"));
        let mut ids = Vec::new();
        for i in 0..3u64 {
            write(&img, &random_bytes(256 * 1024, 900 + i));
            ids.push(id_of(&backup(&repo, "vm", &[("sda", &img)])));
        }
        let days: Vec<String> = snapshots(&repo)
            .iter()
            .map(|s| s["time"].as_str().unwrap()[..10].to_string())
            .collect();
        if days.iter().all(|d| *d == days[0]) {
            return (repo, ids);
        }
    }
    panic!("three backups a few seconds apart kept straddling midnight");
}

/// The plan's (id, keep, reasons) per restore point, oldest first.
fn plan(repo: &std::path::Path, keep: &[&str]) -> Vec<(String, bool, Vec<String>)> {
    let v = json(vmkeep(repo).arg("prune").args(keep).arg("--dry-run"));
    v["plan"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p: &Value| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["keep"].as_bool().unwrap(),
                p["reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn keep_daily_with_counts_left_keeps_the_oldest_point_like_restic() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, ids) = three_points_on_one_day(dir.path());
    let reasons = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let want = vec![
        (ids[0].clone(), true, reasons(&["oldest daily"])),
        (ids[1].clone(), false, reasons(&[])),
        (ids[2].clone(), true, reasons(&["daily"])),
    ];
    // One day, 5 counts: the day's newest point, and the oldest point with a count left.
    assert_eq!(plan(&repo, &["--keep-daily", "5"]), want);
    assert_eq!(plan(&repo, &["--keep-daily", "unlimited"]), want);
    // Exactly one count: only the newest.
    let one = plan(&repo, &["--keep-daily", "1"]);
    assert_eq!(
        one.iter().map(|p| p.1).collect::<Vec<_>>(),
        [false, false, true]
    );
    // unlimited keep-last keeps everything.
    let all = plan(&repo, &["--keep-last", "unlimited"]);
    assert!(all.iter().all(|p| p.1 && p.2 == ["last"]), "{all:?}");

    // The real prune forgets exactly the middle point.
    let p = json(vmkeep(&repo).args(["prune", "--keep-daily", "5"]));
    assert_eq!(p["forgotten"], serde_json::json!([ids[1]]));
    assert_eq!(snapshot_ids(&repo), [ids[0].clone(), ids[2].clone()]);
}

#[test]
fn keep_zero_is_a_usage_error_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let out = vmkeep(&repo)
        .args(["prune", "--keep-daily", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("leave the option out"), "{err}");
}
