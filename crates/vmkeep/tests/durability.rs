//! Durability order, observed with strace on the real binary (and its qemu-nbd child):
//! - a backup makes its packs durable before an index object names them: the fsync of each new
//!   `packs/xx` folder's entry in `packs/` and of `packs/xx` itself (the pack's name) complete
//!   before the index object's rename starts;
//! - a restore fsyncs the target before renaming it from `.partial`, and fsyncs the folder
//!   after (raw and qcow2).
//!
//! A power loss at any instant can then lose only work that was not yet committed, never leave
//! an index naming a pack that is gone or a restored disk whose name exists before its bytes.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const MIB: usize = 1 << 20;

fn strace_path() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("strace");
        if p.is_file() {
            return p;
        }
    }
    panic!("strace is required for the durability tests: run scripts/install-deps.sh (as root)");
}

/// One traced system call: its name, the paths it names (string arguments and `-y` fd paths),
/// whether it succeeded, and the trace lines where it started and completed.
#[derive(Debug, Clone)]
struct Call {
    name: String,
    paths: Vec<String>,
    ok: bool,
    start: usize,
    end: usize,
}

/// Paths in a strace line: "quoted" arguments and <fd paths> (from -y).
fn paths_in(args: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = args.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let close = match b[i] {
            b'"' => b'"',
            b'<' => b'>',
            _ => {
                i += 1;
                continue;
            }
        };
        let from = i + 1;
        // Find the closing character, skipping backslash escapes (data strings may hold `\"`).
        let mut j = from;
        while j < b.len() && b[j] != close {
            j += if b[j] == b'\\' { 2 } else { 1 };
        }
        if j >= b.len() {
            break;
        }
        let len = j - from;
        let p = &args[from..from + len];
        if p.starts_with('/') {
            out.push(p.to_string());
        }
        i = from + len + 1;
    }
    out
}

/// Parses `strace -f -y -o FILE` output, joining `<unfinished ...>` / `<... resumed>` pairs.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut pending: HashMap<String, (String, usize)> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if rest.starts_with("+++") || rest.starts_with("---") {
            continue;
        }
        let (text, start) = if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid.to_string(), (head.to_string(), n));
            continue;
        } else if rest.starts_with("<... ") {
            let Some((head, start)) = pending.remove(pid) else {
                continue;
            };
            let tail = rest.split_once("resumed>").map(|x| x.1).unwrap_or("");
            (format!("{head}{tail}"), start)
        } else {
            (rest.to_string(), n)
        };
        let Some(open) = text.find('(') else { continue };
        // strace pads short calls: "fsync(3</d>)       = 0".
        let Some(eq) = text.rfind(" = ") else {
            continue;
        };
        let args = text[open..eq].trim_end();
        calls.push(Call {
            name: text[..open].to_string(),
            paths: paths_in(args),
            ok: !text[eq + 3..].starts_with('-'),
            start,
            end: n,
        });
    }
    calls
}

/// Runs `vmkeep ARGS` under strace, following children; returns the successful calls.
fn traced(repo: &Path, args: &[&str], extra: &[&Path], syscalls: &str) -> Vec<Call> {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("trace");
    let mut c = Command::new(strace_path());
    c.args(["-f", "-y", "-qq", "-e"])
        .arg(format!("trace={syscalls}"))
        .arg("-o")
        .arg(&log)
        .arg(bin())
        .arg("--repo")
        .arg(repo)
        .args(args)
        .args(extra)
        .env("VMKEEP_KDF_MEM_KIB", KDF_MEM_KIB)
        .env_remove("VMKEEP_PASSWORD")
        .env_remove("VMKEEP_LOG")
        .stdin(Stdio::null());
    let out = c.output().expect("running strace");
    assert!(out.status.success(), "{}", describe(&out));
    let text = std::fs::read_to_string(&log).unwrap();
    // For debugging a failure: DUMP_TRACE=1 prints the raw trace.
    if std::env::var_os("DUMP_TRACE").is_some() {
        eprintln!("{text}");
    }
    let calls: Vec<Call> = parse_trace(&text).into_iter().filter(|c| c.ok).collect();
    assert!(!calls.is_empty(), "nothing traced:\n{text}");
    calls
}

fn is_sync(c: &Call) -> bool {
    c.name == "fsync" || c.name == "fdatasync"
}

fn is_rename(c: &Call) -> bool {
    matches!(c.name.as_str(), "rename" | "renameat" | "renameat2")
}

fn is_mkdir(c: &Call) -> bool {
    c.name == "mkdir" || c.name == "mkdirat"
}

/// The rename's destination (its last path).
fn dest(c: &Call) -> &str {
    c.paths.last().map(|s| s.as_str()).unwrap_or("")
}

/// An fsync/fdatasync of exactly `path` that completed after line `after` and before line
/// `before`.
fn synced_between(calls: &[Call], path: &str, after: usize, before: usize) -> bool {
    calls.iter().any(|c| {
        is_sync(c)
            && c.paths.first().map(|p| p.as_str()) == Some(path)
            && c.start > after
            && c.end < before
    })
}

#[test]
fn backup_makes_packs_durable_before_an_index_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let img = dir.path().join("disk.img");
    // Several packs (16 MiB each) and their index objects.
    write(&img, &random_bytes(40 * MIB, 3));
    let calls = traced(
        &repo,
        &["backup", "image", "-q", "--vm", "vm", "--disk"],
        &[Path::new(&format!("sda={}", img.display()))],
        "fsync,fdatasync,rename,renameat,renameat2,mkdir,mkdirat",
    );
    let packs = repo.join("packs").display().to_string();
    let index = repo.join("index").display().to_string();
    let index_renames: Vec<&Call> = calls
        .iter()
        .filter(|c| is_rename(c) && dest(c).starts_with(&format!("{index}/")))
        .collect();
    assert!(!index_renames.is_empty(), "the backup wrote index objects");
    let mkdirs: Vec<&Call> = calls
        .iter()
        .filter(|c| {
            is_mkdir(c)
                && c.paths
                    .first()
                    .is_some_and(|p| p.starts_with(&format!("{packs}/")))
        })
        .collect();
    assert!(!mkdirs.is_empty(), "the backup created packs/xx folders");
    let pack_renames: Vec<&Call> = calls
        .iter()
        .filter(|c| is_rename(c) && dest(c).starts_with(&format!("{packs}/")))
        .collect();
    assert!(pack_renames.len() >= 3, "several packs: {pack_renames:?}");
    for ix in &index_renames {
        for m in mkdirs.iter().filter(|m| m.end < ix.start) {
            assert!(
                synced_between(&calls, &packs, m.end, ix.start),
                "the new folder {} is not fsynced into packs/ before index object {} is renamed",
                m.paths[0],
                dest(ix)
            );
        }
        for p in pack_renames.iter().filter(|p| p.end < ix.start) {
            let folder = Path::new(dest(p)).parent().unwrap().display().to_string();
            assert!(
                synced_between(&calls, &folder, p.end, ix.start),
                "pack {} is not durable (folder fsync) before index object {} is renamed",
                dest(p),
                dest(ix)
            );
        }
    }
}

/// The restore of `file` (DIR/NAME): the last write to the partial file, then its fsync, then
/// the rename, then the folder's fsync.
fn assert_durable_restore(calls: &[Call], target: &Path, name: &str) {
    let partial = target.join(format!("{name}.partial")).display().to_string();
    let fin = target.join(name).display().to_string();
    let rename = calls
        .iter()
        .find(|c| is_rename(c) && c.paths.first() == Some(&partial) && dest(c) == fin)
        .unwrap_or_else(|| panic!("no rename of {partial}: {calls:#?}"));
    let last_write = calls
        .iter()
        .filter(|c| c.name.starts_with("pwrite") && c.paths.first() == Some(&partial))
        .map(|c| c.end)
        .max()
        .unwrap_or(0);
    assert!(
        synced_between(calls, &partial, last_write, rename.start),
        "{partial} is renamed without an fsync after its last write"
    );
    let folder = target.display().to_string();
    assert!(
        synced_between(calls, &folder, rename.end, usize::MAX),
        "the folder {folder} is not fsynced after the rename to {fin}"
    );
}

#[test]
fn raw_restore_is_fsynced_before_its_rename_and_the_folder_after() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let img = dir.path().join("disk.img");
    write(&img, &random_bytes(3 * MIB, 4));
    let id = id_of(&backup(&repo, "vm", &[("sda", &img)]));
    let target = dir.path().join("out");
    let calls = traced(
        &repo,
        &["restore", &id, "-q", "--target"],
        &[&target],
        "fsync,fdatasync,rename,renameat,renameat2,pwrite64",
    );
    assert_durable_restore(&calls, &target, "sda.raw");
    assert_same_file(&target.join("sda.raw"), &img);
}

#[test]
fn qcow2_restore_is_fsynced_before_its_rename_and_the_folder_after() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let img = dir.path().join("disk.img");
    write(&img, &random_bytes(3 * MIB, 5));
    let id = id_of(&backup(&repo, "vm", &[("sda", &img)]));
    let target = dir.path().join("out");
    // qemu-nbd (a child) writes the image; -f follows it.
    let calls = traced(
        &repo,
        &["restore", &id, "-q", "--format", "qcow2", "--target"],
        &[&target],
        "fsync,fdatasync,rename,renameat,renameat2,pwrite64,pwritev,pwritev2",
    );
    assert_durable_restore(&calls, &target, "sda.qcow2");
}
