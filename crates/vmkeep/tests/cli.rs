//! The command-line contract, end to end with the real binary: init, backup, snapshots, restore,
//! key, forget, prune, check (docs: /work/shared/reference/cli-contract.md).
mod common;

use std::os::unix::fs::MetadataExt;

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

fn is_hex_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[test]
fn init_plain_encrypted_chunk_sizes_and_twice() {
    let dir = tempfile::tempdir().unwrap();

    let plain = dir.path().join("plain");
    let v = init(&plain, &[]);
    assert_eq!(v["repo"], plain.display().to_string());
    assert!(is_hex_id(v["id"].as_str().unwrap()), "{v}");
    assert_eq!(v["encrypted"], false);
    assert_eq!(v["chunk_size"], 65536);
    assert!(plain.join("config").is_file());

    let enc = dir.path().join("enc");
    let v = json(
        vmkeep(&enc)
            .env("VMKEEP_PASSWORD", "secret")
            .args(["init", "--encrypt"]),
    );
    assert_eq!(v["encrypted"], true);
    assert_eq!(v["chunk_size"], 65536);
    // An encrypted repository wants its passphrase; the right one opens it.
    fails_with(vmkeep(&enc).arg("snapshots"), &["VMKEEP_PASSWORD"]);
    let list = json(
        vmkeep(&enc)
            .env("VMKEEP_PASSWORD", "secret")
            .arg("snapshots"),
    );
    assert_eq!(list, serde_json::json!([]));

    // --encrypt without any passphrase source (stdin is not a terminal) is refused.
    let nopass = dir.path().join("nopass");
    fails_with(
        vmkeep(&nopass).args(["init", "--encrypt"]),
        &["passphrase", "VMKEEP_PASSWORD"],
    );
    assert!(!nopass.join("config").exists());

    let big = dir.path().join("big");
    let v = init(&big, &["--chunk-size", "256K"]);
    assert_eq!(v["chunk_size"], 256 * 1024);

    // Human output names the repository kind.
    let human = dir.path().join("human");
    let out = ok(vmkeep(&human).arg("init"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("created unencrypted repository"), "{text}");

    let bad = dir.path().join("bad");
    let line = fails_with(
        vmkeep(&bad).args(["init", "--chunk-size", "100K"]),
        &["chunk size", "power of two"],
    );
    assert!(line.contains("100"), "{line}");
    assert!(
        !bad.join("config").exists(),
        "no repository is created for a bad chunk size"
    );
    fails_with(
        vmkeep(&bad).args(["init", "--chunk-size", "12X"]),
        &["unit"],
    );
    fails_with(
        vmkeep(&bad).args(["init", "--chunk-size", "8M"]),
        &["chunk size"],
    );

    // Twice: refused, and the first repository is untouched.
    let config_before = std::fs::read(plain.join("config")).unwrap();
    fails_with(vmkeep(&plain).arg("init"), &["already exists"]);
    fails_with(
        vmkeep(&enc)
            .env("VMKEEP_PASSWORD", "other")
            .args(["init", "--encrypt"]),
        &["already exists"],
    );
    assert_eq!(std::fs::read(plain.join("config")).unwrap(), config_before);
}

#[test]
fn backup_twice_parent_stats_snapshots_and_restore_references() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let img = dir.path().join("disk.img");
    let v1 = dir.path().join("disk.v1");
    write(&img, &random_bytes(16 * MIB, 1));
    std::fs::copy(&img, &v1).unwrap();

    let b1 = backup(&repo, "web", &[("sda", &img)]);
    let id1 = id_of(&b1);
    assert!(is_hex_id(&id1), "{b1}");
    assert_eq!(b1["vm"], "web");
    assert_eq!(b1["parent"], Value::Null);
    let new1 = b1["stats"]["new_bytes"].as_u64().unwrap();
    assert_eq!(b1["stats"]["read_bytes"].as_u64().unwrap(), 16 * MIB as u64);
    assert_eq!(new1, 16 * MIB as u64, "all data is new the first time");
    assert!(b1["stats"]["stored_bytes"].as_u64().unwrap() >= 16 * MIB as u64);
    assert!(b1["stats"]["seconds"].as_f64().is_some());

    // Change 192 KiB in two places.
    patch(&img, 3 * MIB as u64 + 100, &random_bytes(128 * 1024, 2));
    patch(&img, 11 * MIB as u64, &random_bytes(64 * 1024, 3));
    let b2 = backup(&repo, "web", &[("sda", &img)]);
    let id2 = id_of(&b2);
    assert_ne!(id1, id2);
    assert_eq!(
        b2["parent"],
        id1.as_str(),
        "the previous point is the parent"
    );
    let new2 = b2["stats"]["new_bytes"].as_u64().unwrap();
    assert!(
        (128 * 1024..=4 * 64 * 1024).contains(&new2),
        "only the changed chunks are new: {new2} (first backup: {new1})"
    );
    assert!(new2 * 20 < new1);

    // Human output of backup: one restore point line naming the parent.
    patch(&img, 0, &random_bytes(1000, 4));
    let out = ok(vmkeep(&repo)
        .args(["backup", "image", "--vm", "web", "--disk"])
        .arg(format!("sda={}", img.display())));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.starts_with("restore point "), "{text}");
    assert!(text.contains(&format!("(parent {})", &id2[..8])), "{text}");
    let id3 = snapshot_ids(&repo)[2].clone();

    // snapshots --json: the contract's fields, oldest first.
    let list = snapshots(&repo);
    assert_eq!(list.len(), 3);
    let ids: Vec<&str> = list.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id1.as_str(), id2.as_str(), id3.as_str()]);
    let mut prev_time = None;
    for (i, s) in list.iter().enumerate() {
        assert_eq!(s["vm"], "web");
        let t = chrono::DateTime::parse_from_rfc3339(s["time"].as_str().unwrap())
            .unwrap_or_else(|e| panic!("time is RFC 3339: {e}: {s}"));
        if let Some(p) = prev_time {
            assert!(t >= p, "oldest first");
        }
        prev_time = Some(t);
        match i {
            0 => assert_eq!(s["parent"], Value::Null),
            _ => assert_eq!(s["parent"], ids[i - 1]),
        }
        assert_eq!(
            s["disks"],
            serde_json::json!([{"name": "sda", "size": 16 * MIB}]),
            "{s}"
        );
        assert_eq!(s["memory"], false);
        for f in ["read_bytes", "new_bytes", "stored_bytes", "seconds"] {
            assert!(s["stats"][f].is_number(), "stats.{f} in {s}");
        }
    }
    assert_eq!(list[1]["stats"]["new_bytes"], b2["stats"]["new_bytes"]);
    // --vm filters.
    assert_eq!(
        json(vmkeep(&repo).args(["snapshots", "--vm", "other"])),
        serde_json::json!([])
    );
    assert_eq!(
        json(vmkeep(&repo).args(["snapshots", "--vm", "web"]))
            .as_array()
            .unwrap()
            .len(),
        3
    );
    // Human listing: short ids and a count.
    let out = ok(vmkeep(&repo).arg("snapshots"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains(&id1[..8]) && text.contains("3 restore points"),
        "{text}"
    );

    // Restore by full id (the first version), by 8-digit prefix, by VM@latest.
    let t1 = dir.path().join("t1");
    let r = restore(&repo, &id1, &t1);
    assert_eq!(r["id"], id1.as_str());
    let disks = r["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0]["name"], "sda");
    assert_eq!(disks[0]["path"], t1.join("sda.raw").display().to_string());
    assert!(disks[0]["bytes_written"].as_u64().unwrap() > 0);
    assert_same_file(&t1.join("sda.raw"), &v1);

    let t2 = dir.path().join("t2");
    let r = restore(&repo, &id3[..8], &t2);
    assert_eq!(r["id"], id3.as_str());
    assert_same_file(&t2.join("sda.raw"), &img);

    let t3 = dir.path().join("t3");
    let r = restore(&repo, "web@latest", &t3);
    assert_eq!(r["id"], id3.as_str());
    assert_same_file(&t3.join("sda.raw"), &img);

    // Upper-case prefixes are the same reference.
    let t4 = dir.path().join("t4");
    let r = restore(&repo, &id1[..6].to_uppercase(), &t4);
    assert_eq!(r["id"], id1.as_str());

    // Restoring over an existing file is refused and leaves it alone.
    fails_with(
        vmkeep(&repo).args(["restore", &id1, "--target"]).arg(&t3),
        &["already exists"],
    );
    assert_same_file(&t3.join("sda.raw"), &img);
    assert!(!t3.join("sda.raw.partial").exists());
}

#[test]
fn two_disks_restore_one_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let sys = dir.path().join("sys.img");
    let data = dir.path().join("data.img");
    write(&sys, &semi_bytes(3 * MIB, 10));
    write(&data, &random_bytes(2 * MIB + 4096 + 17, 11)); // not a multiple of the chunk size
    let b = backup(&repo, "db", &[("sys", &sys), ("data", &data)]);
    let id = id_of(&b);
    let names: Vec<&str> = b["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sys", "data"]);
    let s = &snapshots(&repo)[0];
    assert_eq!(
        s["disks"],
        serde_json::json!([
            {"name": "sys", "size": 3 * MIB},
            {"name": "data", "size": 2 * MIB + 4096 + 17}
        ])
    );

    let only = dir.path().join("only");
    let r = json(
        vmkeep(&repo)
            .args(["restore", &id, "--disk", "data", "--target"])
            .arg(&only),
    );
    assert_eq!(r["disks"].as_array().unwrap().len(), 1);
    assert_eq!(r["disks"][0]["name"], "data");
    assert_same_file(&only.join("data.raw"), &data);
    let mut files: Vec<String> = std::fs::read_dir(&only)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    // The disk, and the record of what it holds (for a later `restore --onto`).
    assert_eq!(
        files,
        ["data.raw", "data.raw.vmkeep"],
        "only the named disk is written"
    );

    let all = dir.path().join("all");
    restore(&repo, &id, &all);
    assert_same_file(&all.join("sys.raw"), &sys);
    assert_same_file(&all.join("data.raw"), &data);

    let line = fails_with(
        vmkeep(&repo)
            .args(["restore", &id, "--disk", "nope", "--target"])
            .arg(dir.path().join("x")),
        &["no disk named", "nope"],
    );
    assert!(
        line.contains("sys") && line.contains("data"),
        "lists the disks: {line}"
    );
}

#[test]
fn sparse_image_is_read_sparsely_and_restored_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let img = dir.path().join("sparse.img");
    let size = 64 * MIB as u64;
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    patch(&img, 0, &random_bytes(64 * 1024, 20));
    patch(&img, 20 * MIB as u64 + 12345, &random_bytes(100_000, 21));
    patch(&img, size - 4096, &random_bytes(4096, 22));
    let allocated = std::fs::metadata(&img).unwrap().blocks() * 512;
    assert!(
        allocated < 4 * MIB as u64,
        "the input is sparse ({allocated})"
    );

    let b = backup(&repo, "sparse", &[("sda", &img)]);
    let read = b["stats"]["read_bytes"].as_u64().unwrap();
    assert!(read < 4 * MIB as u64, "holes are not read: {read}");

    let t = dir.path().join("t");
    let r = restore(&repo, &id_of(&b), &t);
    let out = t.join("sda.raw");
    assert_same_file(&out, &img);
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!(m.len(), size);
    let used = m.blocks() * 512;
    assert!(
        used < size / 16,
        "the restored file is sparse: {used} bytes allocated for {size}"
    );
    let written = r["disks"][0]["bytes_written"].as_u64().unwrap();
    assert!(
        written < 4 * MIB as u64,
        "zero chunks are not written: {written}"
    );
}

#[test]
fn json_outputs_are_single_documents() {
    // Each command's --json output is checked by `json()` (one document, nothing else on
    // stdout); here every command with JSON output runs once, and a failing one prints nothing.
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let img = dir.path().join("a.img");
    write(&img, &semi_bytes(MIB, 30));
    let enc = dir.path().join("enc");
    for v in [
        init(&repo, &[]),
        json(
            vmkeep(&enc)
                .env("VMKEEP_PASSWORD", "pw")
                .args(["init", "--encrypt"]),
        ),
    ] {
        assert!(v.is_object());
    }
    let b = backup(&repo, "vm1", &[("d", &img)]);
    for f in ["id", "vm", "parent", "stats"] {
        assert!(b.get(f).is_some(), "backup --json has {f}: {b}");
    }
    for f in ["read_bytes", "new_bytes", "stored_bytes", "seconds"] {
        assert!(b["stats"][f].is_number(), "stats.{f}: {b}");
    }
    let id = id_of(&b);
    assert!(snapshots(&repo).len() == 1);
    let r = restore(&repo, &id, &dir.path().join("t"));
    assert!(r["disks"].is_array());
    let c = json(vmkeep(&repo).arg("check"));
    assert_eq!(c["ok"], true);
    let c = json(vmkeep(&repo).args(["check", "--read-data"]));
    assert_eq!(c["snapshots_checked"], 1);
    let p = json(vmkeep(&repo).args(["prune", "--keep-last", "5", "--dry-run"]));
    assert_eq!(p["kept"], serde_json::json!([id]));
    let p = json(vmkeep(&repo).args(["prune", "--keep-last", "5"]));
    assert_eq!(p["forgotten"], serde_json::json!([]));
    assert!(p["reclaimed_bytes"].is_number());
    let f = json(vmkeep(&repo).args(["forget", &id]));
    assert_eq!(f["forgotten"], serde_json::json!([id]));
    let k = json(
        vmkeep(&enc)
            .env("VMKEEP_PASSWORD", "pw")
            .args(["key", "export"]),
    );
    assert!(k["key"].is_string());
    let k = json(
        vmkeep(&enc)
            .env("VMKEEP_PASSWORD", "pw")
            .env("VMKEEP_NEW_PASSWORD", "pw2")
            .args(["key", "passwd"]),
    );
    assert!(k.is_object());
    let u = json(vmkeep(&repo).arg("unlock"));
    assert!(u["removed"].is_array());

    // Errors with --json: nothing on stdout, the one-line error on stderr.
    let out = vmkeep(&repo)
        .args(["restore", "ffffff", "--json", "--target"])
        .arg(dir.path().join("t2"))
        .output()
        .unwrap();
    one_line_error(&out, 1);
    assert!(out.stdout.is_empty(), "{}", describe(&out));
}

#[test]
fn key_passwd_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    json(
        vmkeep(&repo)
            .env("VMKEEP_PASSWORD", "old passphrase")
            .args(["init", "--encrypt"]),
    );
    let img = dir.path().join("a.img");
    write(&img, &semi_bytes(2 * MIB, 40));
    let b = json(
        vmkeep(&repo)
            .env("VMKEEP_PASSWORD", "old passphrase")
            .args(["backup", "image", "--vm", "v", "--disk"])
            .arg(format!("a={}", img.display())),
    );
    let id = id_of(&b);

    let export = |pass: &str| -> String {
        let out = ok(vmkeep(&repo)
            .env("VMKEEP_PASSWORD", pass)
            .args(["key", "export"]));
        String::from_utf8(out.stdout).unwrap()
    };
    let before = export("old passphrase");
    assert!(before.starts_with("vmkeep master key"), "{before}");
    assert!(before.contains("checksum:"), "{before}");
    let hex_digits = before
        .lines()
        .filter(|l| !l.starts_with("vmkeep") && !l.starts_with("checksum"))
        .flat_map(|l| l.chars())
        .filter(|c| c.is_ascii_hexdigit())
        .count();
    assert_eq!(hex_digits, 128, "64 key bytes as hex: {before}");

    // Change the passphrase (new one from VMKEEP_NEW_PASSWORD).
    let out = ok(vmkeep(&repo)
        .env("VMKEEP_PASSWORD", "old passphrase")
        .env("VMKEEP_NEW_PASSWORD", "new passphrase")
        .args(["key", "passwd"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("passphrase changed"));

    fails_with(
        vmkeep(&repo)
            .env("VMKEEP_PASSWORD", "old passphrase")
            .arg("snapshots"),
        &["wrong passphrase"],
    );
    let list = json(
        vmkeep(&repo)
            .env("VMKEEP_PASSWORD", "new passphrase")
            .arg("snapshots"),
    );
    assert_eq!(list[0]["id"], id.as_str());
    // The same master key: the export does not change with the passphrase.
    assert_eq!(export("new passphrase"), before);

    // The new passphrase from a file works too (trailing newline ignored).
    let pf = dir.path().join("pass");
    write(&pf, b"new passphrase\n");
    let t = dir.path().join("t");
    let r = json(
        vmkeep(&repo)
            .arg("--password-file")
            .arg(&pf)
            .args(["restore", &id, "--target"])
            .arg(&t),
    );
    assert_eq!(r["id"], id.as_str());
    assert_same_file(&t.join("a.raw"), &img);

    // passwd with no new passphrase available fails cleanly.
    fails_with(
        vmkeep(&repo)
            .env("VMKEEP_PASSWORD", "new passphrase")
            .args(["key", "passwd"]),
        &["VMKEEP_NEW_PASSWORD"],
    );
    // A plain repository has no key to export.
    let plain = dir.path().join("plain");
    init(&plain, &[]);
    fails_with(vmkeep(&plain).args(["key", "export"]), &["not encrypted"]);
}

fn restore_point_ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn forget_and_prune() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let img = dir.path().join("a.img");
    // S1: data only S1 holds. S2: other data. S3: S2 slightly changed.
    write(&img, &random_bytes(6 * MIB, 50));
    let s1 = id_of(&backup(&repo, "vm", &[("sda", &img)]));
    write(&img, &random_bytes(6 * MIB, 51));
    let s2 = id_of(&backup(&repo, "vm", &[("sda", &img)]));
    patch(&img, MIB as u64, &random_bytes(64 * 1024, 52));
    let s3 = id_of(&backup(&repo, "vm", &[("sda", &img)]));
    let other = dir.path().join("other.img");
    write(&other, &random_bytes(MIB, 53));
    let o1 = id_of(&backup(&repo, "other", &[("sda", &other)]));

    // forget S2: S3 now descends from S1.
    let f = json(vmkeep(&repo).args(["forget", &s2[..10]]));
    assert_eq!(restore_point_ids(&f["forgotten"]), [s2.as_str()]);
    let list = snapshots(&repo);
    let ids: Vec<&str> = list.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [s1.as_str(), s3.as_str(), o1.as_str()]);
    assert_eq!(list[1]["parent"], s1.as_str());
    // Forgotten points are gone for every reference.
    fails_with(
        vmkeep(&repo)
            .args(["restore", &s2, "--target"])
            .arg(dir.path().join("x")),
        &["no restore point"],
    );
    // S3 still restores exactly (its data shares packs with the forgotten S2).
    assert_restores(&repo, &s3, "sda", &img, dir.path());

    // Dry run: prints the plan, changes nothing.
    let before = tree_listing(&repo);
    let out = ok(vmkeep(&repo).args(["prune", "--vm", "vm", "--keep-last", "1", "--dry-run"]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("dry run"), "{text}");
    let forget_line = text
        .lines()
        .find(|l| l.contains(&s1[..8]))
        .unwrap_or_else(|| panic!("the plan names S1: {text}"));
    assert!(forget_line.starts_with("forget"), "{text}");
    let keep_line = text.lines().find(|l| l.contains(&s3[..8])).unwrap();
    assert!(keep_line.starts_with("keep"), "{text}");
    assert!(!text.contains(&o1[..8]), "--vm limits the plan: {text}");
    let plan = json(vmkeep(&repo).args(["prune", "--vm", "vm", "--keep-last", "1", "--dry-run"]));
    assert_eq!(restore_point_ids(&plan["forgotten"]), [s1.as_str()]);
    assert_eq!(restore_point_ids(&plan["kept"]), [s3.as_str()]);
    assert_eq!(tree_listing(&repo), before, "a dry run changes nothing");
    assert_eq!(snapshot_ids(&repo), [s1.clone(), s3.clone(), o1.clone()]);

    // The real prune forgets S1 and reclaims its data.
    let p = json(vmkeep(&repo).args(["prune", "--vm", "vm", "--keep-last", "1"]));
    assert_eq!(restore_point_ids(&p["forgotten"]), [s1.as_str()]);
    assert_eq!(restore_point_ids(&p["kept"]), [s3.as_str()]);
    let reclaimed = p["reclaimed_bytes"].as_u64().unwrap();
    assert!(reclaimed >= 6 * MIB as u64, "S1's pack is reclaimed: {p}");
    assert_eq!(snapshot_ids(&repo), [s3.clone(), o1.clone()]);
    assert_eq!(snapshots(&repo)[0]["parent"], Value::Null);
    assert_restores(&repo, &s3, "sda", &img, dir.path());
    assert_restores(&repo, &o1, "sda", &other, dir.path());
    let c = json(vmkeep(&repo).args(["check", "--read-data"]));
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["snapshots_checked"], 2);

    // A second prune has nothing left to reclaim.
    let p = json(vmkeep(&repo).arg("prune"));
    assert_eq!(restore_point_ids(&p["forgotten"]), Vec::<String>::new());
    assert_eq!(p["reclaimed_bytes"], 0);
    assert_eq!(snapshot_ids(&repo).len(), 2);
}

#[test]
fn check_on_a_clean_repository() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    // Empty repository.
    let out = ok(vmkeep(&repo).arg("check"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no errors"));
    let img = dir.path().join("a.img");
    write(&img, &semi_bytes(3 * MIB, 60));
    backup(&repo, "vm", &[("sda", &img)]);
    patch(&img, 0, &random_bytes(70_000, 61));
    backup(&repo, "vm", &[("sda", &img)]);
    let out = ok(vmkeep(&repo).arg("check"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("checked 2 restore points") && text.contains("no errors"),
        "{text}"
    );
    let out = ok(vmkeep(&repo).args(["check", "--read-data"]));
    assert_eq!(out.status.code(), Some(0));
    let c = json(vmkeep(&repo).args(["check", "--read-data"]));
    assert_eq!(c["ok"], true);
    assert_eq!(c["damaged"], serde_json::json!([]));
    assert_eq!(c["snapshots_checked"], 2);
    assert!(c["blobs_checked"].as_u64().unwrap() > 0);
}

#[test]
fn encrypted_repository_round_trip_with_large_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    json(vmkeep(&repo).env("VMKEEP_PASSWORD", "pw").args([
        "init",
        "--encrypt",
        "--chunk-size",
        "1M",
    ]));
    let img = dir.path().join("a.img");
    write(&img, &random_bytes(5 * MIB + 333, 70));
    let b = json(
        vmkeep(&repo)
            .env("VMKEEP_PASSWORD", "pw")
            .args(["backup", "image", "--vm", "v", "--disk"])
            .arg(format!("a={}", img.display())),
    );
    // The plaintext does not appear in the repository.
    let needle = &std::fs::read(&img).unwrap()[4096..4096 + 64];
    for p in objects(&repo, "packs") {
        let bytes = std::fs::read(pack_path(&repo, &p)).unwrap();
        assert!(
            !bytes.windows(64).any(|w| w == needle),
            "plaintext in pack {p}"
        );
    }
    let t = dir.path().join("t");
    json(
        vmkeep(&repo)
            .env("VMKEEP_PASSWORD", "pw")
            .args(["restore", &id_of(&b), "--target"])
            .arg(&t),
    );
    assert_same_file(&t.join("a.raw"), &img);
    let c = json(
        vmkeep(&repo)
            .env("VMKEEP_PASSWORD", "pw")
            .args(["check", "--read-data"]),
    );
    assert_eq!(c["ok"], true);
}

fn pack_bytes(repo: &std::path::Path) -> u64 {
    objects(repo, "packs")
        .iter()
        .map(|p| std::fs::metadata(pack_path(repo, p)).unwrap().len())
        .sum()
}

#[test]
fn prune_reclaims_a_sparsely_used_pack_in_one_run() {
    // S1's pack stays 1/8 referenced after S1 is forgotten: prune repacks the live eighth and
    // reclaims the old pack in the same run (no backup is running).
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    init(&repo, &[]);
    let img = dir.path().join("a.img");
    write(&img, &random_bytes(8 * MIB, 80));
    let s1 = id_of(&backup(&repo, "vm", &[("sda", &img)]));
    let s1_packs = objects(&repo, "packs");
    patch(&img, MIB as u64, &random_bytes(7 * MIB, 81));
    let s2 = id_of(&backup(&repo, "vm", &[("sda", &img)]));
    let before = pack_bytes(&repo);

    let p = json(vmkeep(&repo).args(["prune", "--keep-last", "1"]));
    assert_eq!(restore_point_ids(&p["forgotten"]), [s1.as_str()]);
    assert_eq!(p["gc"]["packs_repacked"], 1, "{p}");
    assert!(
        p["reclaimed_bytes"].as_u64().unwrap() >= 7 * MIB as u64,
        "the repacked pack is reclaimed at once: {p}"
    );
    assert!(pack_bytes(&repo) < before - 6 * MIB as u64, "{p}");
    assert_eq!(objects(&repo, "packs").intersection(&s1_packs).count(), 0);
    assert_eq!(objects(&repo, "gc").len(), 0);
    assert_restores(&repo, &s2, "sda", &img, dir.path());
    let c = json(vmkeep(&repo).args(["check", "--read-data"]));
    assert_eq!(c["ok"], true, "{c}");
    assert_eq!(c["warnings"], serde_json::json!([]), "{c}");
}
