//! `vmkeep diff` against brute force: random write histories on image files (unaligned writes,
//! zeroed ranges, changes reverted to older content, grow and shrink, full rescans), restore
//! points forgotten in between, then every pair of the remaining points compared with the two
//! restored images chunk by chunk. The real binary.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

const CHUNK: u64 = 64 << 10;

/// Byte extents `(offset, length)`.
type Extents = Vec<(u64, u64)>;

/// One step of a history on `disk` (bytes in memory, written to `path` after).
fn step(r: &mut Rng, disk: &mut Vec<u8>, history: &[Vec<u8>]) {
    match r.below(10) {
        0 => {
            // Resize: grow or shrink by up to 5 chunks, at any byte.
            let new = (disk.len() as u64 + r.below(10 * CHUNK)).saturating_sub(5 * CHUNK);
            disk.resize(new.max(CHUNK / 2) as usize, 0);
        }
        1 if !history.is_empty() => {
            // Revert a range to what an older point held.
            let old = &history[r.below(history.len() as u64) as usize];
            let n = disk.len().min(old.len()) as u64;
            let at = r.below(n);
            let len = r.below(4 * CHUNK).min(n - at);
            let (a, b) = (at as usize, (at + len) as usize);
            disk[a..b].copy_from_slice(&old[a..b]);
        }
        2 => {
            // Zero a range (the chunk may read as zeros afterwards).
            let at = r.below(disk.len() as u64);
            let len = r.below(3 * CHUNK).min(disk.len() as u64 - at);
            disk[at as usize..(at + len) as usize].fill(0);
        }
        _ => {
            // A few unaligned random writes.
            for _ in 0..1 + r.below(4) {
                let at = r.below(disk.len() as u64);
                let len = (1 + r.below(CHUNK)).min(disk.len() as u64 - at);
                let v = r.next_u64();
                for (k, b) in disk[at as usize..(at + len) as usize]
                    .iter_mut()
                    .enumerate()
                {
                    *b = (v >> (8 * (k % 8))) as u8 | 1;
                }
            }
        }
    }
}

/// What diff must say: extents of `to`'s chunks that differ from `from`'s (zeros beyond its end).
fn brute_force(from: &[u8], to: &[u8]) -> (Extents, Extents) {
    let mut ext: Vec<(u64, u64)> = Vec::new();
    let mut zeros: Vec<(u64, u64)> = Vec::new();
    let push = |v: &mut Vec<(u64, u64)>, off: u64, len: u64| match v.last_mut() {
        Some((o, l)) if *o + *l == off => *l += len,
        _ => v.push((off, len)),
    };
    let mut off = 0u64;
    while off < to.len() as u64 {
        let end = (off + CHUNK).min(to.len() as u64);
        let b = &to[off as usize..end as usize];
        let a: Vec<u8> = (off..end)
            .map(|i| *from.get(i as usize).unwrap_or(&0))
            .collect();
        if a != b {
            push(&mut ext, off, end - off);
            if b.iter().all(|&x| x == 0) {
                push(&mut zeros, off, end - off);
            }
        }
        off = end;
    }
    (ext, zeros)
}

fn pairs(v: &Value) -> Vec<(u64, u64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap()))
        .collect()
}

fn history(seed: u64, dir: &Path) {
    let repo = dir.join("repo");
    init(&repo, &["--chunk-size", "64K"]);
    let img = dir.join("vda.img");
    let mut r = Rng::new(seed);
    let mut disk = vec![0u8; (40 * CHUNK + 1234) as usize];
    let mut contents: Vec<Vec<u8>> = Vec::new();
    let mut ids = Vec::new();
    for i in 0..9 {
        step(&mut r, &mut disk, &contents);
        if i % 3 == 1 {
            step(&mut r, &mut disk, &contents);
        }
        write(&img, &disk);
        let mut c = vmkeep(&repo);
        c.args(["backup", "image", "--vm", "v", "--disk"])
            .arg(format!("vda={}", img.display()));
        if r.below(4) == 0 {
            c.arg("--full"); // a rescan
        }
        ids.push(id_of(&json(&mut c)));
        contents.push(disk.clone());
    }
    // Forget two points in the middle: the diff must not need them.
    for k in [3, 6] {
        json(vmkeep(&repo).args(["forget", &ids[k]]));
    }
    let kept: Vec<usize> = (0..ids.len()).filter(|k| ![3, 6].contains(k)).collect();
    for &a in &kept {
        for &b in &kept {
            let d = json(vmkeep(&repo).args(["diff", &ids[a], &ids[b]]));
            let disk = &d["disks"][0];
            let (ext, zeros) = brute_force(&contents[a], &contents[b]);
            let ctx = format!("seed {seed}, points {a} -> {b}: {d}");
            assert_eq!(pairs(&disk["extents"]), ext, "{ctx}");
            assert_eq!(pairs(&disk["zero_extents"]), zeros, "{ctx}");
            assert_eq!(
                disk["changed_bytes"].as_u64().unwrap(),
                ext.iter().map(|e| e.1).sum::<u64>(),
                "{ctx}"
            );
            assert_eq!(disk["size_to"].as_u64().unwrap(), contents[b].len() as u64);
        }
    }
}

#[test]
fn diff_equals_brute_force_over_random_histories() {
    for seed in [0x9e37_79b9_7f4a_7c15, 42, 7_777_777] {
        let dir = tempfile::tempdir().unwrap();
        history(seed, dir.path());
    }
}

#[test]
fn diff_says_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let img = dir.path().join("a.img");
    write(&img, &vec![7u8; 100_000]);
    let id = id_of(&backup(&repo, "v", &[("vda", &img)]));
    fails_with(
        vmkeep(&repo).args(["diff", &id, &id, "--disk", "nope"]),
        &["nope", "vda"],
    );
    fails_with(vmkeep(&repo).args(["diff", &id, "abcdef"]), &["abcdef"]);
    // A point against itself: nothing differs.
    let d = json(vmkeep(&repo).args(["diff", &id, &id]));
    assert_eq!(d["disks"][0]["changed_bytes"], 0);
}
