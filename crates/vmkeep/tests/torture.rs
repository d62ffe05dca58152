//! Torture rounds with the real binary (issue 6): in each round a restore point is forgotten
//! and, at once, a prune runs on a slowed store (strace delays every file open it makes) while
//! backups deduplicate against the just-forgotten point: one plain, one of another VM, one
//! stopped (SIGSTOP) past the lease timeout and resumed, one started in another PID namespace
//! (`unshare --pid`). After every round `check --read-data` is clean, every restore point
//! restores byte-identical to the image it was taken from, and every backup either committed
//! or failed with a clear one-line error. A backup may fail; it may never commit missing data.
//!
//! `VMKEEP_TORTURE_ROUNDS` (default 3) sets the number of rounds.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const TIMEOUTS: [(&str, &str); 2] = [
    ("VMKEEP_LEASE_TIMEOUT_SECS", "3"),
    ("VMKEEP_LEASE_REFRESH_SECS", "1"),
];

fn with_timeouts(mut c: Command) -> Command {
    for (k, v) in TIMEOUTS {
        c.env(k, v);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// strace arguments that slow every fsync/fdatasync by `ms` (a backup's packs and manifest
/// land late, so a prune marks and condemns while it runs).
fn slow_syncs(ms: u64) -> Vec<String> {
    let mut v: Vec<String> = [
        "strace",
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        "trace=fsync,fdatasync",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for call in ["fsync", "fdatasync"] {
        v.push("-e".into());
        v.push(format!("inject={call}:delay_enter={ms}ms"));
    }
    v
}

fn backup_cmd(repo: &Path, prefix: &[String], vm: &str, image: &Path) -> Command {
    let prefix: Vec<&str> = prefix.iter().map(|s| s.as_str()).collect();
    let mut c = wrapped(&prefix, repo);
    c.args(["--json", "backup", "image", "--vm", vm, "--disk"])
        .arg(format!("sys={}", image.display()));
    c
}

/// `vmkeep --repo REPO ...` run as a child of `prefix` (strace, unshare), or directly.
fn wrapped(prefix: &[&str], repo: &Path) -> Command {
    let plain = vmkeep_std(repo);
    if prefix.is_empty() {
        return with_timeouts(plain);
    }
    let mut c = Command::new(prefix[0]);
    c.args(&prefix[1..]).arg(plain.get_program());
    c.args(plain.get_args());
    for (k, v) in plain.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.stdin(Stdio::null());
    with_timeouts(c)
}

/// What a backup process ended with: its restore point id, or its one-line error.
fn outcome(name: &str, out: &Output) -> Result<String, String> {
    if out.status.success() {
        let v = single_json(&out.stdout);
        return Ok(id_of(&v));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default().to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{name} failed without a clean error: {}",
        describe(out)
    );
    assert!(
        last.starts_with("vmkeep: error: "),
        "{name}: the error is one clear line: {}",
        describe(out)
    );
    Err(last)
}

#[test]
fn torture_rounds_never_commit_missing_data() {
    let rounds: usize = std::env::var("VMKEEP_TORTURE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let repo = dir.join("repo");
    ok(vmkeep(&repo).args(["init"]));
    // Every committed restore point and the image it must restore to.
    let mut points: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut data = semi_bytes(6 << 20, seed("torture"));
    let mut table = Vec::new();
    for round in 0..rounds {
        // This round's images: the base changes a little each round; vm b's differs more.
        let mut rng = Rng::new(seed(&format!("torture-round-{round}")));
        for _ in 0..8 {
            let at = rng.below((data.len() - 65536) as u64) as usize;
            rng.fill(&mut data[at..at + 65536]);
        }
        let base = dir.join(format!("base-{round}.img"));
        write(&base, &data);
        let mut other = data.clone();
        rng.fill(&mut other[..2 << 20]);
        let other_img = dir.join(format!("other-{round}.img"));
        write(&other_img, &other);

        // The point everyone deduplicates against, forgotten right away.
        let p = json(
            with_timeouts_assert(&repo)
                .args(["--json", "backup", "image", "--vm", "a", "--disk"])
                .arg(format!("sys={}", base.display())),
        );
        ok(vmkeep(&repo).args(["forget", &id_of(&p)]));

        // Each round slows the prune's object reads and the backups' syncs differently, so the
        // rounds hit different interleavings.
        let prune_ms = [15, 2, 40][round % 3];
        let sync_ms = [400, 1500, 0][round % 3];
        let t0 = Instant::now();
        let prune = wrapped(
            &[
                "strace",
                "-f",
                "-qq",
                "-o",
                "/dev/null",
                "-e",
                "trace=openat",
                "-e",
                &format!("inject=openat:delay_enter={prune_ms}ms"),
            ],
            &repo,
        )
        .args(["--json", "prune", "--keep-last", "2"])
        .spawn()
        .unwrap();
        let slow = slow_syncs(sync_ms);
        let plain = backup_cmd(&repo, &slow, "a", &base).spawn().unwrap();
        let other_vm = backup_cmd(&repo, &slow, "b", &other_img).spawn().unwrap();
        let mut stopped = backup_cmd(&repo, &[], "c", &base)
            .env("VMKEEP_STOP_AT", "after-data")
            .spawn()
            .unwrap();
        let mut in_ns: Vec<String> = ["unshare", "--pid", "--fork", "--mount-proc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        in_ns.extend(slow.iter().cloned());
        let namespaced = backup_cmd(&repo, &in_ns, "d", &base).spawn().unwrap();
        wait_stopped(&mut stopped);
        std::thread::sleep(Duration::from_millis(4500)); // past the 3 s lease timeout
        resume(&stopped);

        let prune_out = prune.wait_with_output().unwrap();
        assert!(
            prune_out.status.success(),
            "prune: {}",
            describe(&prune_out)
        );
        let pst = single_json(&prune_out.stdout);
        let mut row = vec![format!("round {round}")];
        for (name, child, image) in [
            ("plain backup", plain, &base),
            ("other VM", other_vm, &other_img),
            ("stopped past timeout", stopped, &base),
            ("other PID namespace", namespaced, &base),
        ] {
            let out = child.wait_with_output().unwrap();
            match outcome(name, &out) {
                Ok(id) => {
                    points.insert(id, image.clone());
                    row.push(format!("{name}: committed"));
                }
                Err(e) => row.push(format!("{name}: failed ({e})")),
            }
        }
        for id in pst["forgotten"].as_array().unwrap() {
            points.remove(id.as_str().unwrap());
        }
        row.push(format!(
            "prune: condemned {}, deleted {}, waiting {}, reprieved {}, forgot {}",
            pst["gc"]["packs_condemned"],
            pst["gc"]["packs_deleted"],
            pst["gc"]["packs_waiting"],
            pst["gc"]["packs_reprieved"],
            pst["forgotten"].as_array().map_or(0, |a| a.len())
        ));
        row.push(format!("{:.1} s", t0.elapsed().as_secs_f64()));
        println!("{}", row.join(" | "));
        table.push(row);

        // Nothing committed may miss data.
        let out = vmkeep(&repo)
            .args(["check", "--read-data"])
            .output()
            .unwrap();
        assert!(out.status.success(), "round {round}: {}", describe(&out));
        let listed = snapshot_ids(&repo);
        for (id, image) in &points {
            assert!(
                listed.contains(id),
                "round {round}: restore point {id} vanished"
            );
            assert_restores(&repo, id, "sys", image, dir);
        }
    }
    // A last prune with nothing running reclaims everything that waited.
    let out = json(vmkeep(&repo).args(["--json", "prune"]));
    assert_eq!(out["gc"]["packs_waiting"].as_u64(), Some(0), "{out}");
    let out = vmkeep(&repo)
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    for (id, image) in &points {
        assert_restores(&repo, id, "sys", image, dir);
    }
}

fn with_timeouts_assert(repo: &Path) -> assert_cmd::Command {
    let mut c = vmkeep(repo);
    for (k, v) in TIMEOUTS {
        c.env(k, v);
    }
    c
}
