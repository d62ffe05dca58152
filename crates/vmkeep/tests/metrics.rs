//! `--metrics-file`: the real binary writes Prometheus text-format metrics of each run. A
//! backup's figures equal its JSON; a failed run says so and keeps the last success time of
//! the run before; replication lag is what the replica lacks; the file is replaced whole.
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;

/// The samples of a metrics file: `name{labels}` to value. Every line is a comment or a
/// sample whose value parses.
fn samples(path: &Path) -> BTreeMap<String, f64> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.ends_with('\n'), "{text}");
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line:?}"));
        out.insert(series.to_owned(), value);
    }
    out
}

fn get(s: &BTreeMap<String, f64>, series: &str) -> f64 {
    *s.get(series)
        .unwrap_or_else(|| panic!("no {series} in {s:#?}"))
}

#[test]
fn a_backup_writes_its_figures_and_a_failure_keeps_the_last_success() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &[]);
    let img = d.join("disk.img");
    let mut data = vec![0u8; 4 << 20];
    for (i, b) in data.iter_mut().enumerate().take(1 << 20) {
        *b = (i * 7 % 251) as u8;
    }
    write(&img, &data);
    let prom = d.join("backup-web1.prom");
    let b = json(
        vmkeep(&repo)
            .arg("--metrics-file")
            .arg(&prom)
            .args(["backup", "image", "--vm", "web1", "--disk"])
            .arg(format!("vda={}", img.display())),
    );
    let s = samples(&prom);
    let run = r#"{command="backup",vm="web1"}"#;
    assert_eq!(get(&s, &format!("vmkeep_run_success{run}")), 1.0);
    assert_eq!(get(&s, &format!("vmkeep_run_exit_status{run}")), 0.0);
    for (metric, field) in [
        ("vmkeep_backup_read_bytes", "read_bytes"),
        ("vmkeep_backup_new_bytes", "new_bytes"),
        ("vmkeep_backup_stored_bytes", "stored_bytes"),
    ] {
        assert_eq!(
            get(&s, &format!("{metric}{run}")),
            b["stats"][field].as_u64().unwrap() as f64,
            "{metric}"
        );
    }
    assert_eq!(
        get(
            &s,
            r#"vmkeep_backup_change_tracking{command="backup",vm="web1",disk="vda",state="none"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &s,
            r#"vmkeep_backup_change_tracking{command="backup",vm="web1",disk="vda",state="used"}"#
        ),
        0.0
    );
    let succeeded = get(&s, &format!("vmkeep_last_success_timestamp_seconds{run}"));
    let ended = get(&s, &format!("vmkeep_run_timestamp_seconds{run}"));
    assert_eq!(succeeded, ended);
    assert!(get(&s, &format!("vmkeep_run_duration_seconds{run}")) > 0.0);

    // The same job failing (its disk gone): the file says so, the last success stays.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::remove_file(&img).unwrap();
    let out = vmkeep(&repo)
        .arg("--metrics-file")
        .arg(&prom)
        .args(["backup", "image", "--vm", "web1", "--disk"])
        .arg(format!("vda={}", img.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let s = samples(&prom);
    assert_eq!(get(&s, &format!("vmkeep_run_success{run}")), 0.0);
    assert_eq!(
        get(&s, &format!("vmkeep_last_success_timestamp_seconds{run}")),
        succeeded
    );
    assert!(get(&s, &format!("vmkeep_run_timestamp_seconds{run}")) > succeeded);
    assert!(
        !s.keys().any(|k| k.starts_with("vmkeep_backup_")),
        "no figures from a failed run: {s:#?}"
    );
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn replication_lag_is_what_the_replica_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, dst) = (d.join("src"), d.join("dst"));
    init(&src, &[]);
    json(vmkeep(&dst).args(["init", "--replica-of"]).arg(&src));
    let img = d.join("disk.img");
    write(&img, &vec![7u8; 1 << 20]);
    backup(&src, "db", &[("vda", &img)]);
    let prom = d.join("lag.prom");
    let lag = |dry: bool| {
        let mut c = vmkeep(&src);
        c.arg("--metrics-file")
            .arg(&prom)
            .args(["replicate", "--vm", "db", "--to"])
            .arg(&dst);
        if dry {
            c.arg("--dry-run");
        }
        json(&mut c);
        samples(&prom)
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    let s = lag(true);
    let run = r#"{command="replicate",vm="db"}"#;
    assert_eq!(
        get(
            &s,
            &format!("vmkeep_replicate_outstanding_restore_points{run}")
        ),
        1.0
    );
    assert!(get(&s, &format!("vmkeep_replicate_outstanding_bytes{run}")) > 0.0);
    assert!(get(&s, &format!("vmkeep_replicate_lag_seconds{run}")) >= 0.05);
    let s = lag(false);
    assert_eq!(
        get(&s, &format!("vmkeep_replicate_copied_restore_points{run}")),
        1.0
    );
    let s = lag(true);
    assert_eq!(
        get(
            &s,
            &format!("vmkeep_replicate_outstanding_restore_points{run}")
        ),
        0.0
    );
    assert_eq!(get(&s, &format!("vmkeep_replicate_lag_seconds{run}")), 0.0);
}

#[test]
fn an_unwritable_metrics_file_fails_the_run_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    fails_with(
        vmkeep(&repo)
            .arg("--metrics-file")
            .arg(dir.path().join("no/such/folder/m.prom"))
            .arg("init"),
        &["metrics file", "no/such/folder/m.prom"],
    );
}
