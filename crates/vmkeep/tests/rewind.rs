//! `restore SNAP --onto IMAGE`: an existing image rewound three restore points back and rolled
//! two forward, by both paths (the image's record proves what it holds: nothing read; no proof:
//! every chunk read and compared), raw and qcow2, each result byte-identical to a full restore
//! and writing no more than the diff says. An interrupted rewind leaves no record and a rerun
//! finishes it. The real binary (and qemu-img for qcow2).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

const CHUNK: usize = 64 << 10;

/// Six restore points of one disk: each changes a few chunks, one grows the disk, one zeroes.
fn history(repo: &Path, dir: &Path) -> (Vec<String>, Vec<Vec<u8>>) {
    init(repo, &["--chunk-size", "64K"]);
    let img = dir.join("src.img");
    let mut disk = vec![0u8; 48 * CHUNK + 777];
    let (mut ids, mut contents) = (Vec::new(), Vec::new());
    for p in 0..6u8 {
        for k in 0..4usize {
            let at = (p as usize * 7 + k * 11) % (disk.len() - 5000);
            disk[at..at + 5000].fill(p * 16 + k as u8 + 1);
        }
        if p == 3 {
            disk.resize(52 * CHUNK + 99, 0);
            disk[50 * CHUNK..50 * CHUNK + 10].fill(9);
        }
        if p == 4 {
            disk[2 * CHUNK..5 * CHUNK].fill(0);
        }
        write(&img, &disk);
        ids.push(id_of(&backup(repo, "v", &[("vda", &img)])));
        contents.push(disk.clone());
    }
    (ids, contents)
}

fn onto(repo: &Path, snap: &str, image: &Path) -> Value {
    json(
        vmkeep(repo)
            .args(["restore", snap, "--disk", "vda", "--onto"])
            .arg(image),
    )
}

fn changed(repo: &Path, a: &str, b: &str) -> u64 {
    json(vmkeep(repo).args(["diff", a, b]))["disks"][0]["changed_bytes"]
        .as_u64()
        .unwrap()
}

/// Equal bytes, or a short message (lengths, first difference) instead of two dumps. A qcow2
/// image's virtual size is whole sectors: its tail past the disk must read as zeros.
fn assert_holds(got: &[u8], want: &[u8], ctx: &str) {
    let got = if got.len() > want.len() && got.len() - want.len() < 512 {
        assert!(
            got[want.len()..].iter().all(|&b| b == 0),
            "{ctx}: tail not zero"
        );
        &got[..want.len()]
    } else {
        got
    };
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{ctx}: {} bytes, want {}; first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

fn raw_of(image: &Path) -> Vec<u8> {
    if image.extension().is_some_and(|e| e == "qcow2") {
        let out = image.with_extension("check.raw");
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(image)
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success());
        let v = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        v
    } else {
        std::fs::read(image).unwrap()
    }
}

fn record(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".vmkeep");
    PathBuf::from(p)
}

/// Point 5 restored, then 2 (three back), then 4 (two forward), each through the record; then
/// the image is written by hand and taken to 1 by comparing.
fn rewind(format: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let (ids, contents) = history(&repo, d);
    let out = d.join("out");
    json(
        vmkeep(&repo)
            .args(["restore", &ids[5], "--format", format, "--target"])
            .arg(&out),
    );
    let image = out.join(format!("vda.{format}"));
    assert!(record(&image).exists(), "restore records what it wrote");
    let mut held = 5;
    for to in [2, 4] {
        let r = onto(&repo, &ids[to], &image);
        assert_eq!(r["from"], ids[held].as_str(), "{format}: {r}");
        assert_eq!(r["bytes_read"], 0, "{format}: {r}");
        let diff = changed(&repo, &ids[held], &ids[to]);
        assert!(
            r["bytes_written"].as_u64().unwrap() <= diff,
            "{format}: {r} vs {diff}"
        );
        assert!(r["bytes_written"].as_u64().unwrap() > 0, "{format}: {r}");
        assert_holds(
            &raw_of(&image),
            &contents[to],
            &format!("{format}: {held} -> {to}"),
        );
        held = to;
    }
    // Written behind vmkeep's back: the record no longer matches, every chunk is compared.
    if format == "raw" {
        patch(&image, 7, b"tampered");
    } else {
        let st = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x55 7 8"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(st.status.success(), "{st:?}");
    }
    let r = onto(&repo, &ids[1], &image);
    assert!(r["from"].is_null(), "{format}: {r}");
    assert!(
        r["compared_because"]
            .as_str()
            .unwrap()
            .contains("written since"),
        "{format}: {r}"
    );
    // Every chunk compared: read in full, but for the holes of a sparse raw file, which read
    // as zeros without being read.
    let read = r["bytes_read"].as_u64().unwrap();
    if format == "raw" {
        assert!(read > 0 && read < contents[1].len() as u64, "{r}");
    } else {
        assert_eq!(read, contents[1].len() as u64, "{r}");
    }
    let diff = changed(&repo, &ids[held], &ids[1]) + CHUNK as u64;
    assert!(
        r["bytes_written"].as_u64().unwrap() <= diff,
        "{format}: {r} vs {diff}"
    );
    assert_holds(
        &raw_of(&image),
        &contents[1],
        &format!("{format}: compare path"),
    );
    // Nothing differs any more: nothing is written.
    let r = onto(&repo, &ids[1], &image);
    assert_eq!(r["bytes_written"], 0, "{format}: {r}");
}

#[test]
fn rewind_and_roll_forward_a_raw_image() {
    rewind("raw");
}

#[test]
fn rewind_and_roll_forward_a_qcow2_image() {
    rewind("qcow2");
}

#[test]
fn an_interrupted_rewind_leaves_no_record_and_a_rerun_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let (ids, contents) = history(&repo, d);
    let out = d.join("out");
    restore(&repo, &ids[5], &out);
    let image = out.join("vda.raw");
    let killed = vmkeep_std(&repo)
        .env("VMKEEP_KILL_AT", "onto-after-first-write")
        .args(["restore", &ids[0], "--disk", "vda", "--onto"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(!killed.status.success());
    assert!(
        !record(&image).exists(),
        "a half-written image must not claim a restore point"
    );
    let r = onto(&repo, &ids[0], &image);
    assert!(r["from"].is_null(), "{r}");
    assert_holds(
        &std::fs::read(&image).unwrap(),
        &contents[0],
        "after the rerun",
    );
    // And the record it leaves proves the next rewind.
    assert_eq!(onto(&repo, &ids[3], &image)["from"], ids[0].as_str());
    assert_holds(&std::fs::read(&image).unwrap(), &contents[3], "then to 3");
}

#[test]
fn onto_says_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let (ids, _) = history(&repo, d);
    fails_with(
        vmkeep(&repo)
            .args(["restore", &ids[0], "--onto"])
            .arg(d.join("missing.img")),
        &["does not exist"],
    );
    fails_with(
        vmkeep(&repo)
            .args(["restore", &ids[0], "--disk", "vdz", "--onto"])
            .arg(d.join("src.img")),
        &["no disk vdz", "vda"],
    );
}

#[test]
fn an_image_in_use_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let (ids, contents) = history(&repo, d);
    let out = d.join("out");
    restore(&repo, &ids[5], &out);
    for format in ["raw", "qcow2"] {
        let image = if format == "raw" {
            out.join("vda.raw")
        } else {
            let q = out.join("vda.qcow2");
            let st = Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(out.join("vda.raw"))
                .arg(&q)
                .status()
                .unwrap();
            assert!(st.success());
            q
        };
        // A QEMU-side program holding the image open, with QEMU's image locks.
        let sock = d.join(format!("{format}.sock"));
        // Killed when dropped, also when an assertion fails.
        let holder = vmkeep_testkit::process::ChildGuard::spawn(
            Command::new("qemu-nbd")
                .args(["-f", format, "--persistent", "-k"])
                .arg(&sock)
                .arg(&image),
        );
        let t0 = std::time::Instant::now();
        while !sock.exists() {
            assert!(t0.elapsed().as_secs() < 20, "qemu-nbd did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let before = std::fs::read(&image).unwrap();
        fails_with(
            vmkeep(&repo)
                .args(["restore", &ids[0], "--disk", "vda", "--onto"])
                .arg(&image),
            &["in use", "stop the VM"],
        );
        assert_eq!(
            std::fs::read(&image).unwrap(),
            before,
            "{format}: untouched"
        );
        drop(holder);
    }
    // Free again: it works.
    let image = out.join("vda.raw");
    onto(&repo, &ids[0], &image);
    assert_holds(
        &std::fs::read(&image).unwrap(),
        &contents[0],
        "after the holder left",
    );
}

#[test]
fn comparing_a_sparse_image_reads_only_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    init(&repo, &["--chunk-size", "64K"]);
    let img = d.join("sparse.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(256 << 20).unwrap(); // 256 MiB, all hole
    drop(f);
    patch(&img, 5 << 20, &[7u8; 100_000]);
    let a = id_of(&backup(&repo, "v", &[("vda", &img)]));
    patch(&img, 200 << 20, &[9u8; 100_000]);
    let b = id_of(&backup(&repo, "v", &[("vda", &img)]));
    let out = d.join("out");
    restore(&repo, &b, &out);
    let image = out.join("vda.raw");
    std::fs::remove_file(record(&image)).unwrap(); // no proof: every chunk compared
    let r = onto(&repo, &a, &image);
    assert!(r["from"].is_null(), "{r}");
    // The data of both points lies in 4 chunks: the rest is holes, never read.
    assert!(r["bytes_read"].as_u64().unwrap() <= 4 * CHUNK as u64, "{r}");
    assert_eq!(
        r["bytes_written"].as_u64().unwrap(),
        2 * CHUNK as u64,
        "{r}"
    );
    let mut want = vec![0u8; 256 << 20];
    want[5 << 20..(5 << 20) + 100_000].fill(7);
    assert_holds(
        &std::fs::read(&image).unwrap(),
        &want,
        "rewound sparse image",
    );
}
