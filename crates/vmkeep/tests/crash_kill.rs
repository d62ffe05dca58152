//! Crash safety with the real binary: a backup or prune that dies at any instant (at a named
//! kill point, which aborts the process, or by SIGKILL at a random moment) leaves a repository
//! that `check --read-data` finds intact, whose restore points restore exactly, and in which the
//! same operation run again succeeds.
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

/// The tests of this file run one at a time: the random kills time themselves against a clean
/// run, which other tests' I/O on the same two cores would distort.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn check_read_data_ok(repo: &Path, context: &str) -> Value {
    let out = vmkeep(repo)
        .args(["check", "--read-data", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "check --read-data after {context}: {}",
        describe(&out)
    );
    let v = single_json(&out.stdout);
    assert_eq!(v["ok"], true, "{context}: {v}");
    v
}

fn assert_aborted(status: ExitStatus, stderr: &[u8], point: &str) {
    let err = String::from_utf8_lossy(stderr);
    assert_eq!(
        status.code(),
        None,
        "the process dies by a signal at {point}: {status:?} {err}"
    );
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status:?} {err}");
    assert!(
        err.contains(&format!("VMKEEP_KILL_AT={point}: aborting")),
        "{err}"
    );
}

fn backup_cmd(repo: &Path, vm: &str, disk: &str, img: &Path) -> std::process::Command {
    let mut c = vmkeep_std(repo);
    c.args(["backup", "image", "--vm", vm, "--disk"])
        .arg(format!("{disk}={}", img.display()));
    c
}

// ---------------------------------------------------------------------------------------------
// (a) named kill points

/// A repository with restore point S1 of image A; a backup of image B (40 MiB, semi-compressible,
/// non-repeating: more than one pack) aborts at `point`.
fn backup_killed_at(point: &str) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &["--chunk-size", "64K"]);
    let a = dir.path().join("a.img");
    write(&a, &semi_bytes(4 * MIB, 100));
    let s1 = id_of(&backup(&repo, "vm", &[("sda", &a)]));
    let b = dir.path().join("b.img");
    write(&b, &semi_bytes(40 * MIB, 101));
    let packs0 = objects(&repo, "packs");
    let index0 = objects(&repo, "index");

    let out = backup_cmd(&repo, "vm", "sda", &b)
        .env("VMKEEP_KILL_AT", point)
        .output()
        .unwrap();
    assert_aborted(out.status, &out.stderr, point);
    assert!(out.stdout.is_empty());

    // Where it stopped, seen from the repository.
    let new_packs = objects(&repo, "packs").difference(&packs0).count();
    let new_index = objects(&repo, "index").difference(&index0).count();
    let ids = snapshot_ids(&repo);
    match point {
        "after-first-pack" => assert!(new_packs >= 1 && new_index == 0),
        "after-first-index" | "after-data" | "before-manifest" => {
            assert!(new_packs >= 2 && new_index >= 1 && ids.len() == 1)
        }
        "after-manifest" => assert!(new_packs >= 2 && new_index >= 1),
        _ => unreachable!(),
    }
    println!("{point}: {new_packs} new packs, {new_index} new index objects");

    check_read_data_ok(&repo, point);
    assert_restores(&repo, &s1, "sda", &a, dir.path());
    if point == "after-manifest" {
        assert_eq!(ids.len(), 2, "the restore point is committed: {ids:?}");
        assert_eq!(ids[0], s1);
        assert_restores(&repo, &ids[1], "sda", &b, dir.path());
        let list = snapshots(&repo);
        assert_eq!(list[1]["parent"], s1.as_str());
    } else {
        assert_eq!(ids, [s1.as_str()], "no restore point before the manifest");
    }

    // The backup again: succeeds, and reuses what the killed run indexed.
    let again = backup(&repo, "vm", &[("sda", &b)]);
    let new_bytes = again["stats"]["new_bytes"].as_u64().unwrap();
    if point == "after-first-pack" {
        assert_eq!(new_bytes, 40 * MIB as u64, "unindexed packs are not reused");
    } else {
        assert_eq!(new_bytes, 0, "indexed data is reused after {point}");
    }
    let again_id = id_of(&again);
    assert_restores(&repo, &again_id, "sda", &b, dir.path());
    assert_restores(&repo, "vm@latest", "sda", &b, dir.path());
    assert_restores(&repo, &s1, "sda", &a, dir.path());
    let ids = snapshot_ids(&repo);
    assert_eq!(ids.len(), if point == "after-manifest" { 3 } else { 2 });
    check_read_data_ok(&repo, &format!("the rerun after {point}"));

    // The stale lease of the dead process blocks nothing: prune reclaims what the crash left.
    let p = json(vmkeep(&repo).arg("prune"));
    if point == "after-first-pack" {
        assert!(
            p["reclaimed_bytes"].as_u64().unwrap() > 0,
            "the orphan pack is reclaimed: {p}"
        );
    }
    let c = check_read_data_ok(&repo, &format!("prune after {point}"));
    assert_eq!(c["warnings"], serde_json::json!([]), "{c}");
    assert_restores(&repo, &s1, "sda", &a, dir.path());
    assert_restores(&repo, &again_id, "sda", &b, dir.path());
}

#[test]
fn backup_killed_after_first_pack() {
    backup_killed_at("after-first-pack");
}

#[test]
fn backup_killed_after_first_index() {
    backup_killed_at("after-first-index");
}

#[test]
fn backup_killed_after_data() {
    backup_killed_at("after-data");
}

#[test]
fn backup_killed_before_manifest() {
    backup_killed_at("before-manifest");
}

#[test]
fn backup_killed_after_manifest() {
    backup_killed_at("after-manifest");
}

/// S1 (image A) and S2 (image B, partly A's data) exist; S1 is forgotten; prune aborts at
/// `point`, then runs again.
fn prune_killed_at(point: &str) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &["--chunk-size", "64K"]);
    let a = dir.path().join("a.img");
    write(&a, &random_bytes(8 * MIB, 200));
    let s1 = id_of(&backup(&repo, "vm", &[("sda", &a)]));
    let a_packs = objects(&repo, "packs");
    // B keeps 1 MiB of A (so A's pack is partly live: repacked) and adds 7 MiB of its own.
    let b = dir.path().join("b.img");
    std::fs::copy(&a, &b).unwrap();
    patch(&b, MIB as u64, &random_bytes(7 * MIB, 201));
    let s2 = id_of(&backup(&repo, "vm", &[("sda", &b)]));
    let c = dir.path().join("c.img");
    write(&c, &random_bytes(2 * MIB, 202));
    let o1 = id_of(&backup(&repo, "other", &[("sdc", &c)]));
    json(vmkeep(&repo).args(["forget", &s1]));
    assert_eq!(snapshot_ids(&repo), [s2.clone(), o1.clone()]);

    let out = vmkeep_std(&repo)
        .arg("prune")
        .env("VMKEEP_KILL_AT", point)
        .output()
        .unwrap();
    assert_aborted(out.status, &out.stderr, point);
    let gc = objects(&repo, "gc");
    assert_eq!(
        gc.len(),
        1,
        "the gc record stays until the sweep ends: {gc:?}"
    );
    if point == "after-pack-delete" {
        assert!(
            objects(&repo, "packs").intersection(&a_packs).count() < a_packs.len(),
            "a condemned pack is gone"
        );
    }

    // Intact right after the crash.
    check_read_data_ok(&repo, point);
    assert_restores(&repo, &s2, "sda", &b, dir.path());
    assert_restores(&repo, &o1, "sdc", &c, dir.path());

    // A backup between the crash and the rerun does not rely on condemned packs (its first MiB
    // is S1's data, held only by a condemned pack).
    let c_o1 = dir.path().join("c.img.o1");
    std::fs::copy(&c, &c_o1).unwrap();
    patch(&c, 0, &std::fs::read(&a).unwrap()[2 * MIB..3 * MIB]);
    let o2 = id_of(&backup(&repo, "other", &[("sdc", &c)]));

    let p = json(vmkeep(&repo).arg("prune"));
    println!("{point}: rerun prune {p}");
    assert_eq!(objects(&repo, "gc"), BTreeSet::new(), "the record is swept");
    assert_eq!(
        objects(&repo, "packs").intersection(&a_packs).count(),
        0,
        "S1's pack is reclaimed"
    );
    let chk = check_read_data_ok(&repo, &format!("the rerun after {point}"));
    assert_eq!(chk["warnings"], serde_json::json!([]), "{chk}");
    assert_eq!(snapshot_ids(&repo), [s2.clone(), o1.clone(), o2.clone()]);
    assert_restores(&repo, &s2, "sda", &b, dir.path());
    assert_restores(&repo, &o1, "sdc", &c_o1, dir.path());
    assert_restores(&repo, &o2, "sdc", &c, dir.path());
}

#[test]
fn prune_killed_after_gc_record() {
    prune_killed_at("after-gc-record");
}

#[test]
fn prune_killed_after_pack_delete() {
    prune_killed_at("after-pack-delete");
}

// ---------------------------------------------------------------------------------------------
// (b) SIGKILL at random instants

/// Image size of the random-kill test, and how many kills.
const IMAGE: usize = 48 * MIB;
const BACKUP_KILLS: usize = 50;
const PRUNE_KILLS: usize = 10;

const BACKUP_PHASES: [&str; 5] = [
    "before any pack",
    "packs only",
    "packs+index",
    "committed",
    "finished before kill",
];

/// What the repository holds, to tell where a killed operation stopped.
#[derive(Clone, Debug)]
struct State {
    packs: BTreeSet<String>,
    index: BTreeSet<String>,
    snaps: BTreeSet<String>,
    gc: BTreeSet<String>,
}

impl State {
    fn of(repo: &Path) -> State {
        State {
            packs: objects(repo, "packs"),
            index: objects(repo, "index"),
            snaps: objects(repo, "snapshots"),
            gc: objects(repo, "gc"),
        }
    }
}

fn backup_phase(before: &State, after: &State, status: ExitStatus) -> &'static str {
    if status.success() {
        return "finished before kill";
    }
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "a backup failed on its own: {status:?}"
    );
    if after.snaps.difference(&before.snaps).next().is_some() {
        "committed"
    } else if after.index.difference(&before.index).next().is_some() {
        "packs+index"
    } else if after.packs.difference(&before.packs).next().is_some() {
        "packs only"
    } else {
        "before any pack"
    }
}

fn prune_phase(before: &State, after: &State, status: ExitStatus) -> &'static str {
    if status.success() {
        return "finished before kill";
    }
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "a prune failed on its own: {status:?}"
    );
    let forgot = before.snaps.difference(&after.snaps).next().is_some();
    let repacked = after.packs.difference(&before.packs).next().is_some();
    let new_gc = after.gc.difference(&before.gc).next().is_some();
    let deleted = before.packs.difference(&after.packs).next().is_some();
    match (forgot, repacked, new_gc, deleted) {
        (_, _, _, true) if !after.gc.is_empty() => "sweeping (record left)",
        (_, _, _, true) => "swept",
        (_, _, true, false) => "gc record written",
        (_, true, false, false) => "repacking",
        (true, false, false, false) => "forgot only",
        _ => "before any change",
    }
}

/// The repository, the image being backed up, and a copy of the image for every restore point.
struct World {
    dir: tempfile::TempDir,
    repo: PathBuf,
    img: PathBuf,
    rng: Rng,
    /// restore point id -> the image's content it holds
    versions: HashMap<String, PathBuf>,
    /// A copy of the image as it is now, if one was made since the last change.
    current: Option<PathBuf>,
    copies: usize,
}

impl World {
    fn new(seed: u64) -> World {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        init(&repo, &["--chunk-size", "64K"]);
        let img = dir.path().join("disk.img");
        write(&img, &semi_bytes(IMAGE, seed));
        World {
            repo,
            img,
            rng: Rng::new(seed ^ 0x5555),
            versions: HashMap::new(),
            current: None,
            copies: 0,
            dir,
        }
    }

    /// Overwrite a random region with new random (incompressible) data: a few MiB (one time in
    /// three), else 16-40 MiB, so that a backup writes zero, one or two packs before its end.
    fn mutate(&mut self) -> usize {
        let len = if self.rng.below(3) == 0 {
            MIB + self.rng.below(5 * MIB as u64) as usize
        } else {
            16 * MIB + self.rng.below(24 * MIB as u64) as usize
        };
        let off = self.rng.below((IMAGE - len) as u64);
        let mut data = vec![0u8; len];
        self.rng.fill(&mut data);
        patch(&self.img, off, &data);
        self.current = None;
        len
    }

    fn copy_of_current(&mut self) -> PathBuf {
        if let Some(p) = &self.current {
            return p.clone();
        }
        self.copies += 1;
        let p = self.dir.path().join(format!("version-{}", self.copies));
        std::fs::copy(&self.img, &p).unwrap();
        self.current = Some(p.clone());
        p
    }

    /// Remember the image content of restore points that appeared since `before`.
    fn record_new(&mut self, before: &State) -> usize {
        let after = State::of(&self.repo);
        let new: Vec<String> = after.snaps.difference(&before.snaps).cloned().collect();
        for id in &new {
            let p = self.copy_of_current();
            self.versions.insert(id.clone(), p);
        }
        new.len()
    }

    /// Drop image copies no restore point needs any more.
    fn forget_versions(&mut self) {
        let live: BTreeSet<String> = objects(&self.repo, "snapshots");
        self.versions.retain(|id, _| live.contains(id));
        let used: BTreeSet<PathBuf> = self.versions.values().cloned().collect();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("version-")
                && !used.contains(&p)
                && self.current.as_ref() != Some(&p)
            {
                std::fs::remove_file(&p).unwrap();
            }
        }
    }

    /// Every restore point restores byte-identical to the image it was taken of.
    fn verify_all(&self, context: &str) -> usize {
        let ids = snapshot_ids(&self.repo);
        for id in &ids {
            let want = self
                .versions
                .get(id)
                .unwrap_or_else(|| panic!("{context}: unknown restore point {id}"));
            assert_restores(&self.repo, id, "sda", want, self.dir.path());
        }
        ids.len()
    }

    fn clean_backup(&mut self) -> Duration {
        let before = State::of(&self.repo);
        let t = Instant::now();
        let out = backup_cmd(&self.repo, "vm", "sda", &self.img)
            .output()
            .unwrap();
        let took = t.elapsed();
        assert!(out.status.success(), "clean backup: {}", describe(&out));
        assert_eq!(self.record_new(&before), 1);
        took
    }

    /// Spawn `cmd`, SIGKILL it after `delay`, wait for it.
    fn kill_after(&self, mut cmd: std::process::Command, delay: Duration) -> ExitStatus {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL; an error means it already exited
        child.wait().unwrap()
    }
}

fn print_table(title: &str, order: &[&str], counts: &BTreeMap<&'static str, usize>) {
    println!("{title}");
    println!("  {:<24} {:>5}", "phase", "kills");
    let mut names: Vec<&str> = order.to_vec();
    for k in counts.keys() {
        if !names.contains(k) {
            names.push(k);
        }
    }
    for n in names {
        println!("  {:<24} {:>5}", n, counts.get(n).copied().unwrap_or(0));
    }
}

/// `check`'s warnings except the killed writers' temporaries: those are seconds old here, and
/// prune removes temporaries only after the lease timeout plus the clock-skew allowance.
fn warnings_besides_temporaries(check: &Value) -> Vec<&Value> {
    check["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| !w.as_str().unwrap().starts_with("temporary file "))
        .collect()
}

#[test]
fn random_sigkill_during_backup_and_prune() {
    let _serial = serial();
    let started = Instant::now();
    let seed = seed("random_sigkill_during_backup_and_prune");
    let mut w = World::new(seed);

    // A first restore point, then measure how long one backup of a changed image takes.
    w.clean_backup();
    let mut samples = Vec::new();
    for _ in 0..3 {
        w.mutate();
        samples.push(w.clean_backup());
    }
    samples.sort();
    let mut t_backup = samples[samples.len() / 2]; // the median: one slow fsync is no guide
    println!(
        "one clean backup of the {} MiB image: {t_backup:?} ({samples:?})",
        IMAGE / MIB
    );

    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for i in 0..BACKUP_KILLS {
        let changed = w.mutate();
        let before = State::of(&w.repo);
        let limit = (t_backup.as_micros() as u64 * 125 / 100).max(1);
        let delay = Duration::from_micros(w.rng.below(limit));
        let status = w.kill_after(backup_cmd(&w.repo, "vm", "sda", &w.img), delay);
        let after = State::of(&w.repo);
        let phase = backup_phase(&before, &after, status);
        *counts.entry(phase).or_default() += 1;
        w.record_new(&before);
        println!(
            "backup kill {i:2}: {} MiB changed, killed after {delay:?}: {phase}",
            changed / MIB
        );
        check_read_data_ok(&w.repo, &format!("backup kill {i} ({phase})"));

        if i % 10 == 9 {
            let n = w.verify_all(&format!("after backup kill {i}"));
            // A clean backup of a changed image, like the killed ones; it refines the estimate.
            w.mutate();
            let took = w.clean_backup();
            t_backup = (t_backup * 3 + took) / 4;
            // Keep the repository small: a clean prune also reclaims what the kills left.
            let p = json(vmkeep(&w.repo).args(["prune", "--keep-last", "3"]));
            w.forget_versions();
            let c = check_read_data_ok(&w.repo, &format!("prune after kill {i}"));
            assert!(warnings_besides_temporaries(&c).is_empty(), "{c}");
            let m = w.verify_all(&format!("prune after backup kill {i}"));
            println!(
                "after kill {i}: {n} restore points verified; clean backup {took:?}; \
                 prune reclaimed {} bytes; {m} points verified",
                p["reclaimed_bytes"]
            );
        }
    }
    print_table(
        &format!("SIGKILL during backup: {BACKUP_KILLS} kills (seed {seed})"),
        &BACKUP_PHASES,
        &counts,
    );
    let backup_time = started.elapsed();

    // Kills during prune: each round adds a restore point and prunes to the last 3 (forget,
    // repack, condemn, sweep), killed at a random instant.
    w.mutate();
    w.clean_backup();
    let t = Instant::now();
    json(vmkeep(&w.repo).args(["prune", "--keep-last", "3"]));
    let t_prune = t.elapsed();
    w.forget_versions();
    println!("one clean prune: {t_prune:?}");
    let mut pcounts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for i in 0..PRUNE_KILLS {
        w.mutate();
        w.clean_backup();
        let before = State::of(&w.repo);
        let limit = (t_prune.as_micros() as u64 * 125 / 100).max(1);
        let delay = Duration::from_micros(w.rng.below(limit));
        let mut cmd = vmkeep_std(&w.repo);
        cmd.args(["prune", "--keep-last", "3"]);
        let status = w.kill_after(cmd, delay);
        let after = State::of(&w.repo);
        let phase = prune_phase(&before, &after, status);
        *pcounts.entry(phase).or_default() += 1;
        println!("prune kill {i}: killed after {delay:?}: {phase}");
        check_read_data_ok(&w.repo, &format!("prune kill {i} ({phase})"));
        w.verify_all(&format!("prune kill {i}"));
        w.forget_versions();
    }
    print_table(
        &format!("SIGKILL during prune: {PRUNE_KILLS} kills"),
        &[],
        &pcounts,
    );

    // Finally: prune and backup run clean, and everything is intact.
    json(vmkeep(&w.repo).arg("prune"));
    w.forget_versions();
    let c = check_read_data_ok(&w.repo, "the final prune");
    assert!(warnings_besides_temporaries(&c).is_empty(), "{c}");
    w.mutate();
    w.clean_backup();
    check_read_data_ok(&w.repo, "the final backup");
    let n = w.verify_all("the end");
    println!(
        "end: {n} restore points verified; backup part {backup_time:?}, total {:?}",
        started.elapsed()
    );

    let phases = counts.len();
    assert!(
        phases >= 3,
        "the kills should land in at least 3 different phases: {counts:?}"
    );
}
