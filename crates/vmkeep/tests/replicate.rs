//! `vmkeep replicate` between local repositories: a replica made with `init --replica-of`
//! receives restore points with only the blobs it lacks, survives kill -9 at named points (the
//! rerun sends only the rest), never commits a restore point whose source blob is damaged, and
//! refuses a destination that is not a replica. The real binary.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

const MIB: usize = 1 << 20;

/// Encrypted repositories: every command gets the passphrase (the common helpers run without).
fn vk(repo: &Path) -> assert_cmd::Command {
    let mut c = vmkeep(repo);
    c.env("VMKEEP_PASSWORD", "replica-test-passphrase");
    c
}

fn vk_std(repo: &Path) -> std::process::Command {
    let mut c = vmkeep_std(repo);
    c.env("VMKEEP_PASSWORD", "replica-test-passphrase");
    c
}

fn backup_img(repo: &Path, vm: &str, img: &Path) -> Value {
    json(
        vk(repo)
            .args(["backup", "image", "--vm", vm, "--disk"])
            .arg(format!("vda={}", img.display())),
    )
}

/// Restore `snap` from `repo` and compare its disk with `want`.
fn restores(repo: &Path, snap: &str, want: &Path, scratch: &Path) {
    let out = scratch.join(format!("r-{snap}"));
    json(vk(repo).args(["restore", snap, "--target"]).arg(&out));
    assert_same_file(&out.join("vda.raw"), want);
    std::fs::remove_dir_all(&out).unwrap();
}

fn replicate(repo: &Path, args: &[&str]) -> Value {
    json(vk(repo).arg("replicate").args(args))
}

fn ids(repo: &Path) -> Vec<String> {
    json(vk(repo).arg("snapshots"))
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

/// A source with two VMs (two points of `web`, one of `db`) and its replica.
fn setup(d: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let (src, dst) = (d.join("src"), d.join("dst"));
    json(vk(&src).args(["init", "--encrypt"]));
    let web = d.join("web.img");
    write(&web, &random_bytes(8 * MIB, 1));
    backup_img(&src, "web", &web);
    let db = d.join("db.img");
    write(&db, &random_bytes(2 * MIB, 2));
    backup_img(&src, "db", &db);
    patch(&web, 3 * MIB as u64, &random_bytes(100_000, 3));
    backup_img(&src, "web", &web);
    json(vk(&dst).arg("init").arg("--replica-of").arg(&src));
    (src, dst, web)
}

#[test]
fn replicate_sends_only_what_the_replica_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, dst, web) = setup(d);
    let dry = replicate(&src, &["--to", dst.to_str().unwrap(), "--dry-run"]);
    assert_eq!(dry["outstanding"].as_array().unwrap().len(), 3, "{dry}");
    let first = replicate(&src, &["--to", dst.to_str().unwrap()]);
    assert_eq!(first["copied"].as_array().unwrap().len(), 3, "{first}");
    assert_eq!(
        first["bytes_sent"], dry["bytes_missing"],
        "{first} vs {dry}"
    );
    assert_eq!(ids(&dst), ids(&src));
    let check = json(vk(&dst).args(["check", "--read-data"]));
    assert_eq!(check["ok"], true, "{check}");
    restores(&dst, &ids(&src)[2], &web, d);
    // Nothing new: nothing sent.
    let again = replicate(&src, &["--to", dst.to_str().unwrap()]);
    assert_eq!(again["copied"].as_array().unwrap().len(), 0);
    assert_eq!(again["bytes_sent"], 0);

    // A 1% change: at most 1.1x what the new backup stored.
    patch(&web, 5 * MIB as u64, &random_bytes(8 * MIB / 100, 4));
    let b = backup_img(&src, "web", &web);
    let stored = b["stats"]["stored_bytes"].as_u64().unwrap();
    let pull = json(
        vk(&dst)
            .args(["replicate", "--from"])
            .arg(&src)
            .arg("--vm")
            .arg("web"),
    );
    assert_eq!(pull["copied"].as_array().unwrap().len(), 1, "{pull}");
    let sent = pull["bytes_sent"].as_u64().unwrap();
    assert!(
        sent * 10 <= stored * 11,
        "sent {sent}, the backup stored {stored}"
    );
    restores(&dst, &id_of(&b), &web, d);
}

#[test]
fn a_killed_replication_resumes_with_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, dst, _) = setup(d);
    let full = replicate(&src, &["--to", dst.to_str().unwrap(), "--dry-run"])["bytes_missing"]
        .as_u64()
        .unwrap();
    for point in [
        "replicate-after-first-blob",
        "replicate-before-commit",
        "replicate-after-commit",
    ] {
        let out = vk_std(&src)
            .env("VMKEEP_KILL_AT", point)
            .args(["replicate", "--to"])
            .arg(&dst)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{point}");
        // The point being copied is not visible; the one committed before the kill is.
        let n = ids(&dst).len();
        assert_eq!(n, usize::from(point == "replicate-after-commit"), "{point}");
    }
    let rest = replicate(&src, &["--to", dst.to_str().unwrap()]);
    assert_eq!(ids(&dst), ids(&src));
    let sent = rest["bytes_sent"].as_u64().unwrap();
    assert!(sent < full, "the rerun sent {sent} of {full}");
    let check = json(vk(&dst).args(["check", "--read-data"]));
    assert_eq!(check["ok"], true, "{check}");
}

#[test]
fn a_damaged_source_blob_is_never_committed() {
    // Unencrypted, so the test can find a chunk's bytes in its pack (random data is stored as
    // it is) and damage exactly that: the walker reads tree nodes itself, so only the check
    // of each copied blob against its id can catch a damaged chunk.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, dst) = (d.join("src"), d.join("dst"));
    init(&src, &[]);
    let img = d.join("a.img");
    write(&img, &random_bytes(MIB, 5));
    backup(&src, "a", &[("vda", &img)]);
    json(vmkeep(&dst).arg("init").arg("--replica-of").arg(&src));
    json(vmkeep(&src).args(["replicate", "--to"]).arg(&dst));
    let before = objects(&src, "packs");
    let fresh = random_bytes(MIB, 6);
    write(&img, &fresh);
    backup(&src, "a", &[("vda", &img)]);
    let needle = &fresh[300_000..300_064];
    let mut damaged = 0;
    for p in objects(&src, "packs").difference(&before) {
        let path = pack_path(&src, p);
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[at + 10] ^= 0x40;
            write(&path, &bytes);
            damaged += 1;
        }
    }
    assert_eq!(damaged, 1, "the chunk's bytes are in one new pack");
    let n = snapshot_ids(&dst).len();
    fails_with(
        vmkeep(&src).args(["replicate", "--to"]).arg(&dst),
        &["damaged"],
    );
    assert_eq!(
        snapshot_ids(&dst).len(),
        n,
        "nothing with damaged data is committed"
    );
}

#[test]
fn replicate_refuses_what_is_not_a_replica() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, _, _) = setup(d);
    let other = d.join("other");
    json(vk(&other).args(["init", "--encrypt"]));
    fails_with(
        vk(&src).args(["replicate", "--to"]).arg(&other),
        &["not a replica", "--replica-of"],
    );
}

#[test]
fn a_replication_killed_inside_a_large_point_keeps_its_finished_packs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, dst) = (d.join("src"), d.join("dst"));
    json(vk(&src).args(["init", "--encrypt"]));
    let img = d.join("big.img");
    write(&img, &random_bytes(40 * MIB, 11));
    backup_img(&src, "big", &img);
    json(vk(&dst).arg("init").arg("--replica-of").arg(&src));
    let full = replicate(&src, &["--to", dst.to_str().unwrap(), "--dry-run"])["bytes_missing"]
        .as_u64()
        .unwrap();
    // Killed once the first 16 MiB pack and its index object are stored at the destination.
    let out = vk_std(&src)
        .env("VMKEEP_KILL_AT", "after-first-index")
        .args(["replicate", "--to"])
        .arg(&dst)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(ids(&dst).is_empty());
    let rest = replicate(&src, &["--to", dst.to_str().unwrap()]);
    let sent = rest["bytes_sent"].as_u64().unwrap();
    // The first index object came with the first pack, long before the point's last blob.
    assert!(sent > 0, "the kill came only after every pack was stored");
    assert!(
        sent + 15 * MIB as u64 <= full,
        "the rerun sent {sent} of {full}: the stored pack was not reused"
    );
    restores(&dst, &ids(&src)[0], &img, d);
}

/// The lease protocol holds for replication as for backups: a replication stopped (SIGSTOP,
/// as a suspended machine) past its lease timeout, its restore point reusing blobs the replica
/// no longer references, while a prune at the replica reclaims them: it must not commit a
/// restore point with missing data, and the replica checks clean.
#[test]
fn a_replication_stopped_past_its_lease_never_commits_lost_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (src, dst) = (d.join("src"), d.join("dst"));
    init(&src, &[]);
    let old = random_bytes(24 * MIB, 21);
    let img = d.join("a.img");
    write(&img, &old);
    let first = id_of(&backup(&src, "vm", &[("vda", &img)]));
    json(vmkeep(&dst).arg("init").arg("--replica-of").arg(&src));
    json(vmkeep(&src).args(["replicate", "--to"]).arg(&dst));
    // Forgotten on both sides: at the replica its blobs are unreferenced, reclaimable.
    json(vmkeep(&src).args(["forget", &first]));
    json(vmkeep(&dst).args(["forget", &first]));
    let mut both = old;
    both.extend_from_slice(&random_bytes(24 * MIB, 22));
    write(&img, &both);
    backup(&src, "vm", &[("vda", &img)]);
    let timeouts = [
        ("VMKEEP_LEASE_TIMEOUT_SECS", "3"),
        ("VMKEEP_LEASE_REFRESH_SECS", "1"),
    ];
    let mut c = vmkeep_std(&src);
    c.args(["replicate", "--to"])
        .arg(&dst)
        .env("VMKEEP_STOP_AT", "replicate-before-commit")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in timeouts {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    wait_stopped(&mut child);
    std::thread::sleep(std::time::Duration::from_secs(5)); // past the lease timeout
    let mut prune = vmkeep(&dst);
    for (k, v) in timeouts {
        prune.env(k, v);
    }
    let st = json(prune.arg("prune"));
    assert!(
        st["gc"]["packs_deleted"].as_u64().unwrap() > 0,
        "prune judged the stopped replication dead and reclaimed the forgotten point: {st}"
    );
    resume(&child);
    let out = child.wait_with_output().unwrap();
    let check = vmkeep(&dst)
        .args(["check", "--read-data"])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", describe(&check));
    if out.status.success() {
        // Committed: then everything it references must be there (check above) and whole.
        restores_plain(&dst, &snapshot_ids(&dst)[0], &img, d);
    } else {
        assert!(snapshot_ids(&dst).is_empty(), "{}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("run the replication again"),
            "{}",
            describe(&out)
        );
        // The rerun completes it.
        json(vmkeep(&src).args(["replicate", "--to"]).arg(&dst));
        restores_plain(&dst, &snapshot_ids(&dst)[0], &img, d);
    }
}

fn restores_plain(repo: &Path, snap: &str, want: &Path, scratch: &Path) {
    let out = scratch.join(format!("p-{snap}"));
    restore(repo, snap, &out);
    assert_same_file(&out.join("vda.raw"), want);
}
