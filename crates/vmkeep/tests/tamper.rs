//! Tampering with an encrypted repository by someone who can write to the store but does not
//! know the passphrase (docs/FORMAT.md §16). Every change must be refused or reported by the
//! real binary, never silently used.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

const PASS: &str = "correct horse battery staple";

/// An encrypted repository with one restore point of a small disk, and the password file.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    repo: PathBuf,
    pass_file: PathBuf,
    disk: PathBuf,
    snapshot: String,
}

fn encrypted_repo_with_a_point(name: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let repo = root.join(name);
    let pass_file = root.join("pass");
    write(&pass_file, format!("{PASS}\n").as_bytes());
    json(
        vmkeep(&repo)
            .arg("--password-file")
            .arg(&pass_file)
            .args(["init", "--encrypt"]),
    );
    let disk = root.join("disk.raw");
    write(&disk, &semi_bytes(5 * 65536 + 1000, 7));
    let v = json(
        vmkeep(&repo)
            .arg("--password-file")
            .arg(&pass_file)
            .args(["backup", "image", "--vm", "vm1", "--disk"])
            .arg(format!("vda={}", disk.display())),
    );
    Fixture {
        snapshot: id_of(&v),
        _dir: dir,
        root,
        repo,
        pass_file,
        disk,
    }
}

/// Every object of the kinds a backup writes, with its bytes.
fn data_objects(repo: &Path) -> BTreeMap<(String, String), Vec<u8>> {
    let mut out = BTreeMap::new();
    for kind in ["packs", "index", "snapshots"] {
        for name in objects(repo, kind) {
            let path = if kind == "packs" {
                pack_path(repo, &name)
            } else {
                repo.join(kind).join(&name)
            };
            out.insert((kind.to_string(), name), std::fs::read(path).unwrap());
        }
    }
    out
}

/// Rewrite `config` as JSON after `edit`.
fn edit_config(repo: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = repo.join("config");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    write(&path, &serde_json::to_vec_pretty(&v).unwrap());
}

fn switch_encryption_off(repo: &Path) {
    edit_config(repo, |c| {
        c.insert("encrypted".into(), Value::Bool(false));
        c.remove("mac");
    });
}

/// `backup image` of the fixture's disk, the passphrase given as `how` says.
fn backup_cmd(f: &Fixture, how: &str) -> assert_cmd::Command {
    let mut c = vmkeep(&f.repo);
    match how {
        "--password-file" => {
            c.arg("--password-file").arg(&f.pass_file);
        }
        "VMKEEP_PASSWORD_FILE" => {
            c.env("VMKEEP_PASSWORD_FILE", &f.pass_file);
        }
        "VMKEEP_PASSWORD" => {
            c.env("VMKEEP_PASSWORD", PASS);
        }
        "none" => {}
        other => panic!("unknown passphrase source {other}"),
    }
    c.args(["backup", "image", "--vm", "vm1", "--disk"])
        .arg(format!("vda={}", f.disk.display()));
    c
}

/// Defect 5: `"encrypted": false` without a MAC, key files still present. Before the fix the
/// backup opened the repository as plain and wrote plaintext, exit 0.
#[test]
fn config_switched_to_plain_is_refused_and_nothing_is_written() {
    let f = encrypted_repo_with_a_point("enc");
    switch_encryption_off(&f.repo);
    let before = data_objects(&f.repo);
    for how in [
        "--password-file",
        "VMKEEP_PASSWORD_FILE",
        "VMKEEP_PASSWORD",
        "none",
    ] {
        let line = fails_with(&mut backup_cmd(&f, how), &["tampered", "config"]);
        assert!(
            line.contains("key file"),
            "{how}: names the evidence: {line}"
        );
        assert_eq!(
            data_objects(&f.repo),
            before,
            "{how}: the refused backup wrote or changed objects"
        );
    }
    for cmd in [vec!["snapshots"], vec!["check"]] {
        fails_with(vmkeep(&f.repo).args(&cmd), &["tampered"]);
    }
}

/// Defect 5 with the key files deleted too: the passphrase the user configured, and the
/// encrypted objects themselves, still give it away.
#[test]
fn config_switched_to_plain_with_key_files_deleted_is_refused() {
    let f = encrypted_repo_with_a_point("enc");
    switch_encryption_off(&f.repo);
    for k in objects(&f.repo, "keys") {
        std::fs::remove_file(f.repo.join("keys").join(k)).unwrap();
    }
    let before = data_objects(&f.repo);
    for how in ["--password-file", "VMKEEP_PASSWORD"] {
        let line = fails_with(&mut backup_cmd(&f, how), &["tampered", "config"]);
        assert!(line.contains("encrypted"), "{how}: {line}");
        assert_eq!(data_objects(&f.repo), before, "{how}: objects changed");
    }
    // No passphrase at all: the encrypted manifests and index objects give it away.
    let line = fails_with(&mut backup_cmd(&f, "none"), &["tampered", "encrypted"]);
    assert!(
        line.contains("snapshots/") || line.contains("index/"),
        "{line}"
    );
    assert_eq!(data_objects(&f.repo), before, "objects changed");
}

/// A passphrase given for an unencrypted repository is refused (the user expects
/// encryption), and so is `init` with a passphrase but without --encrypt.
#[test]
fn passphrase_for_an_unencrypted_repository_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("plain");
    init(&repo, &[]);
    let line = fails_with(
        vmkeep(&repo).env("VMKEEP_PASSWORD", PASS).arg("snapshots"),
        &["not encrypted", "passphrase"],
    );
    assert!(line.contains("VMKEEP_PASSWORD"), "{line}");
    json(vmkeep(&repo).arg("snapshots"));

    let other = dir.path().join("other");
    fails_with(
        vmkeep(&other).env("VMKEEP_PASSWORD", PASS).arg("init"),
        &["--encrypt"],
    );
    assert!(!other.join("config").exists());
}

/// `vmkeep` with the fixture's passphrase.
fn unlocked(f: &Fixture) -> assert_cmd::Command {
    let mut c = vmkeep(&f.repo);
    c.arg("--password-file").arg(&f.pass_file);
    c
}

/// `check --read-data --json`: (exit status, report).
fn check(f: &Fixture) -> (i32, Value) {
    let out = unlocked(f)
        .args(["check", "--read-data", "--json"])
        .output()
        .unwrap();
    let code = out.status.code().expect("check exited");
    assert!(code == 0 || code == 3, "check failed: {}", describe(&out));
    (code, single_json(&out.stdout))
}

/// Restoring `snap` fails (exit 1) with an error line naming the damage (after warnings about
/// the damage it met, if any), and writes no disk.
fn restore_refused(f: &Fixture, snap: &str, needles: &[&str]) {
    let target = f.root.join(format!("refused-{snap}"));
    let out = unlocked(f)
        .args(["restore", snap, "--target"])
        .arg(&target)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{}", describe(&out));
    let line = stderr
        .lines()
        .find(|l| l.starts_with("vmkeep: error: "))
        .unwrap_or_else(|| panic!("no error line: {}", describe(&out)));
    for n in needles {
        assert!(line.contains(n), "the error should mention {n:?}: {line}");
    }
    assert!(
        !target.join("vda.raw").exists(),
        "a refused restore left a disk behind"
    );
}

fn damaged_snapshots(report: &Value) -> Vec<String> {
    report["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["snapshot"].as_str().unwrap().to_string())
        .collect()
}

fn warnings(report: &Value) -> String {
    report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn random_hex(bytes: usize, seed: u64) -> String {
    random_bytes(bytes, seed)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The untouched fixture checks clean and restores byte-identical (so the refusals below are
/// caused by the tampering, not by the fixture).
fn assert_intact(f: &Fixture) {
    let (code, report) = check(f);
    assert_eq!(code, 0, "{report}");
    let target = f.root.join(format!("intact-{}", random_hex(4, 1)));
    json(
        unlocked(f)
            .args(["restore", &f.snapshot, "--target"])
            .arg(&target),
    );
    assert_same_file(&target.join("vda.raw"), &f.disk);
    std::fs::remove_dir_all(target).unwrap();
}

/// Another chunk size (or any other edit of an encrypted config) fails the config MAC.
#[test]
fn config_edits_fail_the_mac() {
    let f = encrypted_repo_with_a_point("enc");
    assert_intact(&f);
    let original = std::fs::read(f.repo.join("config")).unwrap();
    let edits: [(&str, Value); 4] = [
        ("chunk_size", 131072.into()),
        ("chunk_size", 4194304.into()),
        ("pack_size", 1048576.into()),
        ("created", "2020-01-01T00:00:00Z".into()),
    ];
    for (field, value) in edits {
        edit_config(&f.repo, |c| {
            c.insert(field.into(), value.clone());
        });
        for cmd in [vec!["snapshots"], vec!["check"]] {
            fails_with(unlocked(&f).args(&cmd), &["config", "modified"]);
        }
        let before = data_objects(&f.repo);
        fails_with(
            &mut backup_cmd(&f, "--password-file"),
            &["config", "modified"],
        );
        assert_eq!(data_objects(&f.repo), before, "{field}: objects changed");
        write(&f.repo.join("config"), &original);
    }
    assert_intact(&f);
}

/// A manifest copied in from another repository that was initialised with the same passphrase
/// (so a different master key): check reports it as damaged and restore refuses it, both when
/// it is added under its own name and when it replaces one of ours.
#[test]
fn manifest_from_another_repository_is_reported_and_refused() {
    let f = encrypted_repo_with_a_point("enc");
    let other = encrypted_repo_with_a_point("other");
    let foreign = other.repo.join("snapshots").join(&other.snapshot);

    std::fs::copy(&foreign, f.repo.join("snapshots").join(&other.snapshot)).unwrap();
    let (code, report) = check(&f);
    assert_eq!(code, 3, "{report}");
    assert_eq!(damaged_snapshots(&report), vec![other.snapshot.clone()]);
    restore_refused(&f, &other.snapshot, &["damaged", &other.snapshot]);
    std::fs::remove_file(f.repo.join("snapshots").join(&other.snapshot)).unwrap();

    let ours = f.repo.join("snapshots").join(&f.snapshot);
    let saved = std::fs::read(&ours).unwrap();
    std::fs::copy(&foreign, &ours).unwrap();
    let (code, report) = check(&f);
    assert_eq!(code, 3, "{report}");
    assert_eq!(damaged_snapshots(&report), vec![f.snapshot.clone()]);
    restore_refused(&f, &f.snapshot, &["damaged", &f.snapshot]);
    write(&ours, &saved);
    assert_intact(&f);
}

/// An index object copied in from another repository with the same passphrase is reported as
/// damaged and never used; replacing ours with it leaves our blobs unindexed, which check
/// reports against the restore point and restore refuses.
#[test]
fn index_from_another_repository_is_reported_and_not_used() {
    let f = encrypted_repo_with_a_point("enc");
    let other = encrypted_repo_with_a_point("other");
    let theirs = objects(&other.repo, "index").into_iter().next().unwrap();
    let ours = objects(&f.repo, "index").into_iter().next().unwrap();
    let foreign = std::fs::read(other.repo.join("index").join(&theirs)).unwrap();

    write(&f.repo.join("index").join(&theirs), &foreign);
    let (code, report) = check(&f);
    assert_eq!(code, 0, "our restore point is intact: {report}");
    let w = warnings(&report);
    assert!(w.contains(&theirs) && w.contains("damaged"), "{w}");
    let target = f.root.join("with-foreign-index");
    json(
        unlocked(&f)
            .args(["restore", &f.snapshot, "--target"])
            .arg(&target),
    );
    assert_same_file(&target.join("vda.raw"), &f.disk);
    std::fs::remove_file(f.repo.join("index").join(&theirs)).unwrap();

    let path = f.repo.join("index").join(&ours);
    let saved = std::fs::read(&path).unwrap();
    write(&path, &foreign);
    let (code, report) = check(&f);
    assert_eq!(code, 3, "{report}");
    assert_eq!(damaged_snapshots(&report), vec![f.snapshot.clone()]);
    assert!(warnings(&report).contains(&ours), "{report}");
    restore_refused(&f, &f.snapshot, &["missing"]);
    write(&path, &saved);
    assert_intact(&f);
}

/// A manifest renamed to another id: check reports it as damaged, restore refuses it.
#[test]
fn renamed_manifest_is_reported_and_refused() {
    let f = encrypted_repo_with_a_point("enc");
    let new_id = random_hex(16, 2);
    let from = f.repo.join("snapshots").join(&f.snapshot);
    let to = f.repo.join("snapshots").join(&new_id);
    std::fs::rename(&from, &to).unwrap();
    let (code, report) = check(&f);
    assert_eq!(code, 3, "{report}");
    assert_eq!(damaged_snapshots(&report), vec![new_id.clone()]);
    restore_refused(&f, &new_id, &["damaged", "names itself"]);
    // A copy under a second name: the original stays good, the copy is reported.
    std::fs::rename(&to, &from).unwrap();
    std::fs::copy(&from, &to).unwrap();
    let (code, report) = check(&f);
    assert_eq!(code, 3, "{report}");
    assert_eq!(damaged_snapshots(&report), vec![new_id.clone()]);
    restore_refused(&f, &new_id, &["damaged"]);
    std::fs::remove_file(&to).unwrap();
    assert_intact(&f);
}

/// Index object names are BLAKE3 of their bytes (FORMAT.md §2): a renamed index object is
/// reported as damaged and not used. Before the fix it was loaded silently.
#[test]
fn renamed_index_object_is_reported_as_damaged() {
    let f = encrypted_repo_with_a_point("enc");
    let ours = objects(&f.repo, "index").into_iter().next().unwrap();
    let new_name = random_hex(32, 3);
    let from = f.repo.join("index").join(&ours);
    let to = f.repo.join("index").join(&new_name);
    std::fs::rename(&from, &to).unwrap();
    let (code, report) = check(&f);
    let w = warnings(&report);
    assert!(
        w.contains(&new_name) && w.contains("name"),
        "check names the renamed index object: {report}"
    );
    assert_eq!(code, 3, "its blobs count as unindexed: {report}");
    assert_eq!(damaged_snapshots(&report), vec![f.snapshot.clone()]);
    restore_refused(&f, &f.snapshot, &["missing"]);
    std::fs::rename(&to, &from).unwrap();
    assert_intact(&f);
}

/// Defect 13: a damaged key file is named as damaged, not reported as a wrong passphrase
/// (before the fix: "wrong passphrase" for both kinds of damage below). An intact second key
/// file still unlocks, and a wrong passphrase with intact files is still "wrong passphrase".
#[test]
fn damaged_key_file_is_named_not_reported_as_wrong_passphrase() {
    let f = encrypted_repo_with_a_point("enc");
    let name = objects(&f.repo, "keys").into_iter().next().unwrap();
    let path = f.repo.join("keys").join(&name);
    let original = std::fs::read(&path).unwrap();
    let text = String::from_utf8(original.clone()).unwrap();
    // Truncated (unparseable), and one hex digit of the wrapped key changed (parseable).
    let wrapped_at = text.find("\"wrapped\"").unwrap() + "\"wrapped\": \"".len() + 40;
    let mut flipped = original.clone();
    flipped[wrapped_at] = if flipped[wrapped_at] == b'0' {
        b'1'
    } else {
        b'0'
    };
    for damaged in [original[..original.len() / 2].to_vec(), flipped] {
        write(&path, &damaged);
        let line = fails_with(unlocked(&f).arg("snapshots"), &["damaged", &name]);
        assert!(!line.contains("wrong passphrase"), "{line}");
        // A second, intact key file for the same passphrase unlocks.
        write(
            &f.repo.join("keys").join("0123456789abcdef0123456789abcdef"),
            &original,
        );
        json(unlocked(&f).arg("snapshots"));
        std::fs::remove_file(f.repo.join("keys").join("0123456789abcdef0123456789abcdef")).unwrap();
    }
    write(&path, &original);
    fails_with(
        vmkeep(&f.repo)
            .env("VMKEEP_PASSWORD", "not it")
            .arg("snapshots"),
        &["wrong passphrase"],
    );
    std::fs::remove_file(&path).unwrap();
    fails_with(unlocked(&f).arg("snapshots"), &["no key file"]);
}
