//! Failures the user sees: every one is a single `vmkeep: error:` line on stderr with exit
//! status 1 (2 for usage errors, 3 for damage found by check), never a panic.
mod common;

use std::path::Path;

use common::*;

const MIB: usize = 1 << 20;

/// A plain repository with one restore point of a 2 MiB random image; returns (repo, image, id).
fn repo_with_point(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let repo = dir.join("repo");
    init(&repo, &[]);
    let img = dir.join("a.img");
    write(&img, &random_bytes(2 * MIB, 1));
    let id = id_of(&backup(&repo, "vm", &[("sda", &img)]));
    (repo, img, id)
}

#[test]
fn missing_repository() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("does/not/exist");
    for args in [
        vec!["snapshots"],
        vec!["check"],
        vec!["restore", "abcdef", "--target", "/tmp/x"],
        vec!["backup", "image", "--vm", "v", "--disk", "a=/dev/null"],
    ] {
        fails_with(
            vmkeep(&missing).args(&args),
            &["no vmkeep repository", "does/not/exist", "vmkeep init"],
        );
    }
    // No repository given at all.
    fails_with(
        vmkeep_bare().arg("snapshots"),
        &["no repository given", "VMKEEP_REPO"],
    );
    // The environment variable is honoured.
    fails_with(
        vmkeep_bare().env("VMKEEP_REPO", &missing).arg("snapshots"),
        &["no vmkeep repository"],
    );
    assert!(!missing.exists(), "reading commands create nothing");
}

#[test]
fn folder_that_is_not_a_repository() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails_with(vmkeep(&empty).arg("snapshots"), &["no vmkeep repository"]);
    fails_with(vmkeep(&empty).arg("check"), &["no vmkeep repository"]);
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);

    let garbage = dir.path().join("garbage");
    std::fs::create_dir(&garbage).unwrap();
    write(
        &garbage.join("config"),
        b"\x00\x01 this is not json at all \xff",
    );
    fails_with(
        vmkeep(&garbage).arg("snapshots"),
        &["not a vmkeep repository"],
    );

    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    write(
        &foreign.join("config"),
        br#"{"magic": "restic", "version": 1}"#,
    );
    fails_with(vmkeep(&foreign).arg("check"), &["not a vmkeep repository"]);

    // A file where a folder is expected.
    let file = dir.path().join("file");
    write(&file, b"x");
    fails_with(vmkeep(&file).arg("snapshots"), &["file"]);
}

#[test]
fn passphrase_errors() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("enc");
    json(
        vmkeep(&repo)
            .env("VMKEEP_PASSWORD", "right")
            .args(["init", "--encrypt"]),
    );
    fails_with(
        vmkeep(&repo)
            .env("VMKEEP_PASSWORD", "wrong")
            .arg("snapshots"),
        &["wrong passphrase"],
    );
    let pf = dir.path().join("pf");
    write(&pf, b"also wrong\n");
    fails_with(
        vmkeep(&repo).arg("--password-file").arg(&pf).arg("check"),
        &["wrong passphrase"],
    );
    fails_with(
        vmkeep(&repo)
            .arg("--password-file")
            .arg(dir.path().join("no-such-file"))
            .arg("check"),
        &["password file"],
    );
    // No passphrase and stdin is not a terminal (assert_cmd pipes it): no prompt, a message
    // naming the ways to give one.
    for args in [
        vec!["snapshots"],
        vec!["check"],
        vec!["key", "export"],
        vec!["backup", "image", "--vm", "v", "--disk", "a=/dev/null"],
    ] {
        fails_with(vmkeep(&repo).args(&args), &["encrypted", "VMKEEP_PASSWORD"]);
    }
    // Stdin at /dev/null too.
    let out = vmkeep_std(&repo).arg("snapshots").output().unwrap();
    let line = one_line_error(&out, 1);
    assert!(line.contains("VMKEEP_PASSWORD"), "{line}");
}

#[test]
fn snapshot_reference_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _img, id) = repo_with_point(dir.path());
    let target = dir.path().join("t");
    let restore = |r: &str| {
        let mut c = vmkeep(&repo);
        c.args(["restore", r, "--target"]).arg(&target);
        c
    };
    // Unknown: a full id, a prefix, a VM without restore points.
    let unknown = if id.starts_with('0') {
        "1".repeat(32)
    } else {
        "0".repeat(32)
    };
    fails_with(
        &mut restore(&unknown),
        &["no restore point matches", &unknown],
    );
    let prefix = if id.starts_with("fff") {
        "000000"
    } else {
        "ffffff"
    };
    fails_with(&mut restore(prefix), &["no restore point matches"]);
    fails_with(
        &mut restore("nosuchvm@latest"),
        &["no restore point matches"],
    );
    fails_with(
        vmkeep(&repo).args(["forget", &unknown]),
        &["no restore point matches"],
    );
    // Too short, or not hex.
    fails_with(&mut restore("abc"), &["at least 6 hex digits", "abc"]);
    fails_with(&mut restore(&id[..5]), &["at least 6 hex digits"]);
    fails_with(&mut restore("zzzzzzzz"), &["at least 6 hex digits"]);
    assert!(!target.exists(), "nothing restored");

    // Ambiguous: two restore point names sharing a prefix (crafted files; the prefix is
    // resolved from the names alone).
    let snaps = repo.join("snapshots");
    write(
        &snaps.join(format!("abcdef00{}", "0".repeat(24))),
        b"garbage one",
    );
    write(
        &snaps.join(format!("abcdef11{}", "1".repeat(24))),
        b"garbage two",
    );
    let line = fails_with(&mut restore("abcdef"), &["ambiguous", "abcdef"]);
    assert!(
        line.contains("abcdef00") && line.contains("abcdef11"),
        "{line}"
    );
    fails_with(vmkeep(&repo).args(["forget", "abcdef"]), &["ambiguous"]);
    // A unique prefix of a garbage manifest: damaged, still one line.
    fails_with(&mut restore("abcdef00"), &["damaged"]);
    // The real restore point is unaffected.
    let r = json(
        vmkeep(&repo)
            .args(["restore", &id[..8], "--target"])
            .arg(dir.path().join("ok")),
    );
    assert_eq!(r["id"], id.as_str());
}

#[test]
fn unreadable_input_images() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, img, _) = repo_with_point(dir.path());
    let backup_cmd = |disks: &[&str]| {
        let mut c = vmkeep(&repo);
        c.args(["backup", "image", "--vm", "vm"]);
        for d in disks {
            c.args(["--disk", d]);
        }
        c
    };
    let packs_before = objects(&repo, "packs");
    let missing = dir.path().join("missing.img");
    fails_with(
        &mut backup_cmd(&[&format!("sda={}", missing.display())]),
        &["cannot read", "missing.img", "no such file"],
    );
    fails_with(
        &mut backup_cmd(&[&format!("sda={}", dir.path().display())]),
        &["cannot read", "not a regular file or block device"],
    );
    // A bad second disk fails before the first is read.
    fails_with(
        &mut backup_cmd(&[
            &format!("sda={}", img.display()),
            &format!("sdb={}", missing.display()),
        ]),
        &["missing.img"],
    );

    assert_eq!(objects(&repo, "packs"), packs_before, "nothing written");
    assert_eq!(snapshot_ids(&repo).len(), 1);
}

fn qemu_img(args: &[&str], paths: &[&Path]) {
    let st = std::process::Command::new("qemu-img")
        .args(args)
        .args(paths)
        .status()
        .expect("qemu-img is installed");
    assert!(st.success(), "qemu-img {args:?} {paths:?}");
}

#[test]
fn qcow2_image_is_never_backed_up_as_raw_bytes() {
    // The contract reads qcow2 through an NBD export of the image (its virtual disk). A build that
    // cannot must refuse it with a one-line message saying it is qcow2, not raw; in no case may
    // the container's own bytes be stored as if they were the disk.
    let dir = tempfile::tempdir().unwrap();
    let (repo, _img, _) = repo_with_point(dir.path());
    let src = dir.path().join("src.raw");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(8 * MIB as u64)
        .unwrap();
    patch(&src, 123_456, &random_bytes(3 * MIB, 7));
    let full = dir.path().join("full.qcow2");
    qemu_img(
        &["convert", "-q", "-f", "raw", "-O", "qcow2"],
        &[&src, &full],
    );
    // An empty one, as `qemu-img create` makes it, reads as 64 MiB of zeros.
    let empty = dir.path().join("empty.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&empty)
        .arg("64M")
        .status()
        .expect("qemu-img is installed");
    assert!(st.success());
    let zeros = dir.path().join("zeros.raw");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(64 * MIB as u64)
        .unwrap();

    for (i, (qcow, want)) in [(&full, &src), (&empty, &zeros)].into_iter().enumerate() {
        let out = vmkeep(&repo)
            .args(["backup", "image", "--vm", "q", "--json", "--disk"])
            .arg(format!("d={}", qcow.display()))
            .output()
            .unwrap();
        if out.status.success() {
            let id = id_of(&single_json(&out.stdout));
            println!("{}: backed up through its virtual disk", qcow.display());
            let target = dir.path().join(format!("t{i}"));
            restore(&repo, &id, &target);
            assert_same_file(&target.join("d.raw"), want);
        } else {
            let line = one_line_error(&out, 1);
            println!("{}: refused: {line}", qcow.display());
            assert!(line.contains("qcow2") && line.contains("not raw"), "{line}");
        }
    }
}

#[test]
fn damaged_pack() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _img, id) = repo_with_point(dir.path());
    // A second restore point with its own data, which stays intact.
    let img2 = dir.path().join("b.img");
    write(&img2, &random_bytes(MIB, 2));
    let id2 = id_of(&backup(&repo, "other", &[("sdb", &img2)]));
    let packs = objects(&repo, "packs");
    assert_eq!(packs.len(), 2);

    // Find the pack of the first restore point: the one bigger than 2 MiB.
    let pack = packs
        .iter()
        .map(|p| pack_path(&repo, p))
        .find(|p| std::fs::metadata(p).unwrap().len() > 2 * MIB as u64)
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x5a;
    write(&pack, &bytes);

    let target = dir.path().join("t");
    fails_with(
        vmkeep(&repo)
            .args(["restore", &id, "--target"])
            .arg(&target),
        &["damaged"],
    );
    assert!(!target.join("sda.raw").exists(), "no finished-looking file");
    assert!(!target.join("sda.raw.partial").exists(), "no partial file");
    // The other restore point is fine.
    assert_restores(&repo, &id2, "sdb", &img2, dir.path());

    // Structure alone is intact.
    ok(vmkeep(&repo).arg("check"));
    // Reading the data finds the damage: exit 3, the restore point named.
    let out = vmkeep(&repo)
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains(&id) && text.contains("DAMAGE"), "{text}");
    assert!(
        !text.contains(&id2),
        "only the damaged point is named: {text}"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));

    let out = vmkeep(&repo)
        .args(["check", "--read-data", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let v = single_json(&out.stdout);
    assert_eq!(v["ok"], false);
    let damaged = v["damaged"].as_array().unwrap();
    assert!(!damaged.is_empty());
    assert!(damaged.iter().all(|d| d["snapshot"] == id.as_str()), "{v}");
    assert_eq!(damaged[0]["disk"], "sda");
    assert!(
        damaged[0]["reason"].as_str().unwrap().contains("damaged"),
        "{v}"
    );
}

#[test]
fn bad_disk_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, _img, _) = repo_with_point(dir.path());
    let fresh = dir.path().join("fresh.img");
    write(&fresh, &random_bytes(3 * MIB, 3));
    let before = tree_listing(&repo);
    // The same disk name twice: refused before anything is written.
    let line = fails_with(
        vmkeep(&repo).args(["backup", "image", "--vm", "vm"]).args([
            "--disk",
            &format!("d={}", fresh.display()),
            "--disk",
            &format!("d={}", fresh.display()),
        ]),
        &["given twice"],
    );
    assert!(line.contains("\"d\""), "{line}");
    assert_eq!(
        tree_listing(&repo),
        before,
        "a bad argument costs nothing: no packs or indexes written"
    );
    for bad in ["foo", "=x", "x=", ""] {
        let out = vmkeep(&repo)
            .args(["backup", "image", "--vm", "vm", "--disk", bad])
            .output()
            .unwrap();
        let code = out.status.code();
        assert!(
            code == Some(1) || code == Some(2),
            "--disk {bad:?}: {}",
            describe(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"));
        if code == Some(1) {
            let line = one_line_error(&out, 1);
            assert!(line.contains("NAME=PATH"), "{line}");
        }
    }
    // Invalid names (path separators and the like).
    for name in ["a/b", "..", "a b"] {
        let out = vmkeep(&repo)
            .args(["backup", "image", "--vm", "vm", "--disk"])
            .arg(format!("{name}={}", fresh.display()))
            .output()
            .unwrap();
        one_line_error(&out, 1);
    }
    let out = vmkeep(&repo)
        .args(["backup", "image", "--vm", "bad/vm", "--disk"])
        .arg(format!("d={}", fresh.display()))
        .output()
        .unwrap();
    one_line_error(&out, 1);
    assert_eq!(tree_listing(&repo), before);
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    for args in [
        vec![],
        vec!["frobnicate"],
        vec!["snapshots", "--no-such-flag"],
        vec!["backup", "image", "--vm", "v"],
        vec!["backup", "image", "--disk", "a=b"],
        vec!["restore", "abcdef"],
        vec!["restore", "--target", "x"],
        vec!["restore", "abcdef", "--target", "x", "--format", "vmdk"],
        vec!["prune", "--keep-last", "many"],
        vec!["prune", "--keep-last", "-1"],
        vec!["prune", "--keep-daily", "0"],
        vec!["forget"],
        vec!["key"],
        vec!["init", "--chunk-size"],
    ] {
        let out = vmkeep(&repo).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Usage") || err.contains("error:"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"));
        assert!(out.stdout.is_empty(), "{args:?}: {}", describe(&out));
    }
    assert!(!repo.exists());
    // --help and --version succeed.
    ok(vmkeep_bare().arg("--help"));
    ok(vmkeep_bare().arg("--version"));
}
