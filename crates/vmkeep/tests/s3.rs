//! Repositories on S3 (`--repo s3://BUCKET/PREFIX`) with the real binary against a real
//! distributed store: a 3-node Garage cluster on loopback (replication factor 3, conditional
//! writes ignored), configured through the AWS environment variables as a user would.
//!
//! - Many hosts, one bucket: two "hosts" (separate state folders and caches, so separate host
//!   identities, one of them in its own PID namespace) back up different VMs into one repository at once
//!   while a third runs prune beside them; nothing is lost and `check --read-data` is clean.
//! - A node lost mid-backup: with one of three nodes killed the backup completes (quorum) and
//!   checks clean; with two killed it fails with a clear error and leaves no restore point;
//!   with the nodes back the next backup succeeds.
//! - SIGKILL at random instants of backups and prunes, then bit rot of a pack in the bucket:
//!   nothing committed is lost; the rot is reported by `check --read-data` and refused by a
//!   restore.
//! - Latency, throttling and cut replies (through a fault proxy); Object Lock (on moto).
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;
use vmkeep_testkit::data::random_bytes;
use vmkeep_testkit::s3::{FaultProxy, Faults, Garage, Moto, S3Endpoint};

/// `vmkeep` with the cluster's AWS settings and its own state folder (its host identity).
fn on_garage(garage: &Garage, url: &str, state: &Path) -> assert_cmd::Command {
    on_endpoint(&garage.s3, url, state)
}

fn on_endpoint(s3: &S3Endpoint, url: &str, state: &Path) -> assert_cmd::Command {
    let mut c = vmkeep(Path::new(url));
    for (k, v) in s3.env() {
        c.env(k, v);
    }
    c.env("VMKEEP_STATE_DIR", state)
        .env("VMKEEP_CACHE_DIR", state.join("cache"))
        .env("VMKEEP_PASSWORD", "s3-test-passphrase");
    c
}

fn std_on_garage(garage: &Garage, url: &str, state: &Path, prefix: &[&str]) -> Command {
    let mut c = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(bin());
            c
        }
        None => Command::new(bin()),
    };
    for (k, v) in garage.s3.env() {
        c.env(k, v);
    }
    c.env("VMKEEP_KDF_MEM_KIB", KDF_MEM_KIB)
        .env("VMKEEP_STATE_DIR", state)
        .env("VMKEEP_CACHE_DIR", state.join("cache"))
        .env("VMKEEP_PASSWORD", "s3-test-passphrase")
        .env_remove("VMKEEP_REPO")
        .arg("--repo")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn image(dir: &Path, name: &str, mib: usize, seed: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    write(&p, &random_bytes(mib << 20, seed));
    p
}

fn succeeded(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", describe(out));
}

#[test]
fn two_hosts_back_up_into_one_bucket_while_a_third_prunes() {
    let garage = Garage::start(3);
    garage.bucket("many-hosts");
    let url = "s3://many-hosts/site-a";
    let tmp = tempfile::tempdir().unwrap();
    let (host_a, host_b, host_c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    json(on_garage(&garage, url, &host_a).args(["init", "--encrypt"]));
    // First points of both VMs, then a forgotten one, so prune has something to reclaim.
    let a0 = image(tmp.path(), "a0.img", 8, 1);
    let b0 = image(tmp.path(), "b0.img", 8, 2);
    for (vm, img, host) in [("vm-a", &a0, &host_a), ("vm-b", &b0, &host_b)] {
        json(
            on_garage(&garage, url, host)
                .args(["backup", "image", "--vm", vm, "--disk"])
                .arg(format!("sys={}", img.display())),
        );
    }
    let gone = image(tmp.path(), "gone.img", 8, 3);
    let v = json(
        on_garage(&garage, url, &host_a)
            .args(["backup", "image", "--vm", "vm-a", "--disk"])
            .arg(format!("sys={}", gone.display())),
    );
    let gone_id = id_of(&v);
    json(on_garage(&garage, url, &host_a).args(["forget", &gone_id]));

    // Three rounds: host A backs up vm-a, host B (its own PID namespace) vm-b, host C prunes.
    let mut last = Vec::new();
    for round in 0..3u64 {
        let a = image(tmp.path(), &format!("a{round}.img"), 8, 10 + round);
        let b = image(tmp.path(), &format!("b{round}.img"), 8, 20 + round);
        let mut ca = std_on_garage(&garage, url, &host_a, &[]);
        ca.args(["--json", "backup", "image", "--vm", "vm-a", "--disk"])
            .arg(format!("sys={}", a.display()));
        let mut cb = std_on_garage(
            &garage,
            url,
            &host_b,
            &["unshare", "--pid", "--fork", "--mount-proc"],
        );
        cb.args(["--json", "backup", "image", "--vm", "vm-b", "--disk"])
            .arg(format!("sys={}", b.display()));
        let mut cc = std_on_garage(&garage, url, &host_c, &[]);
        cc.args(["--json", "prune", "--keep-last", "2"]);
        let (pa, pb, pc) = (
            ca.spawn().unwrap(),
            cb.spawn().unwrap(),
            cc.spawn().unwrap(),
        );
        let (oa, ob, oc) = (
            pa.wait_with_output().unwrap(),
            pb.wait_with_output().unwrap(),
            pc.wait_with_output().unwrap(),
        );
        succeeded(&oa, "host A's backup");
        succeeded(&ob, "host B's backup");
        succeeded(&oc, "host C's prune");
        last = vec![
            (id_of(&single_json(&oa.stdout)), a),
            (id_of(&single_json(&ob.stdout)), b),
        ];
    }
    let check = json(on_garage(&garage, url, &host_c).args(["check", "--read-data"]));
    assert_eq!(check["ok"], true, "{check}");
    assert_eq!(check["damaged"].as_array().unwrap().len(), 0, "{check}");
    for (id, img) in &last {
        let target = tmp.path().join(format!("restore-{id}"));
        json(
            on_garage(&garage, url, &host_c)
                .args(["restore", id, "--target"])
                .arg(&target),
        );
        assert_same_file(&target.join("sys.raw"), img);
    }
    let ids: Vec<String> = json(on_garage(&garage, url, &host_c).arg("snapshots"))
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!ids.contains(&gone_id), "the forgotten point came back");
}

#[test]
fn a_lost_node_is_tolerated_two_are_a_clear_failure() {
    let mut garage = Garage::start(3);
    garage.bucket("quorum");
    let url = "s3://quorum";
    let tmp = tempfile::tempdir().unwrap();
    let host = tmp.path().join("host");
    json(on_garage(&garage, url, &host).args(["init", "--encrypt"]));
    let img = image(tmp.path(), "disk.img", 48, 7);

    // One node killed while the backup is stopped after its first pack: quorum holds.
    let mut c = std_on_garage(&garage, url, &host, &[]);
    c.env("VMKEEP_STOP_AT", "after-first-pack")
        .args(["--json", "backup", "image", "--vm", "vm", "--disk"])
        .arg(format!("sys={}", img.display()));
    let mut child = c.spawn().unwrap();
    wait_stopped(&mut child);
    garage.kill_node(2);
    resume(&child);
    let out = child.wait_with_output().unwrap();
    succeeded(&out, "backup with one node of three down");
    let first = id_of(&single_json(&out.stdout));
    let check = json(on_garage(&garage, url, &host).args(["check", "--read-data"]));
    assert_eq!(check["ok"], true, "{check}");

    // Two nodes down: no quorum. The backup fails, within the retry window, with an error
    // that names the object store, and no restore point appears.
    garage.kill_node(1);
    let img2 = image(tmp.path(), "disk2.img", 8, 8);
    let out = on_garage(&garage, url, &host)
        .env("VMKEEP_S3_RETRY_SECS", "3")
        .args(["backup", "image", "--vm", "vm", "--disk"])
        .arg(format!("sys={}", img2.display()))
        .output()
        .unwrap();
    let line = one_line_error(&out, 1);
    assert!(line.contains("s3://quorum"), "{line}");
    garage.start_node(1);
    garage.start_node(2);
    let snaps = json(on_garage(&garage, url, &host).arg("snapshots"));
    let ids: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![first.as_str()],
        "only the first backup is visible"
    );

    // Nodes back: the next backup succeeds and everything checks clean.
    let v = json(
        on_garage(&garage, url, &host)
            .args(["backup", "image", "--vm", "vm", "--disk"])
            .arg(format!("sys={}", img2.display())),
    );
    let check = json(on_garage(&garage, url, &host).args(["check", "--read-data"]));
    assert_eq!(check["ok"], true, "{check}");
    let target = tmp.path().join("r");
    json(
        on_garage(&garage, url, &host)
            .args(["restore", &id_of(&v), "--target"])
            .arg(&target),
    );
    assert_same_file(&target.join("sys.raw"), &img2);
}

/// The same backups and restore directly and through a proxy that adds 20-50 ms to every
/// request, answers 5% with 503 SlowDown and cuts 2% of replies half-way: everything succeeds,
/// restores are exact, and the faulty run stays within 2x of the direct one with the same
/// latency (the retries cost, not the latency).
#[test]
fn latency_throttling_and_cut_replies_are_retried_within_2x() {
    let garage = Garage::start(1);
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "disk.img", 24, 31);
    let latency = Faults {
        delay_ms: 20,
        jitter_ms: 30,
        fail_rate: 0.0,
        cut_rate: 0.0,
        fail_every: 0,
        cut_every: 0,
    };
    // About 5% answered 503 and 2-4% of replies cut: some at random, and every 17th request
    // and 23rd reply so that both surely happen.
    let faulty = Faults {
        fail_rate: 0.02,
        cut_rate: 0.01,
        fail_every: 17,
        cut_every: 23,
        ..latency
    };
    let mut times = Vec::new();
    for (n, faults) in [("latency", latency), ("faults", faulty)] {
        garage.bucket(n);
        let proxy = FaultProxy::start(&garage.s3, faults);
        let url = format!("s3://{n}");
        let host = tmp.path().join(n);
        let start = std::time::Instant::now();
        json(on_endpoint(&proxy.s3, &url, &host).args(["init", "--encrypt"]));
        let first = json(
            on_endpoint(&proxy.s3, &url, &host)
                .args(["backup", "image", "--vm", "vm", "--disk"])
                .arg(format!("sys={}", img.display())),
        );
        let target = tmp.path().join(format!("restore-{n}"));
        json(
            on_endpoint(&proxy.s3, &url, &host)
                .args(["restore", &id_of(&first), "--target"])
                .arg(&target),
        );
        let check = json(on_endpoint(&proxy.s3, &url, &host).args(["check", "--read-data"]));
        let elapsed = start.elapsed();
        assert_eq!(check["ok"], true, "{n}: {check}");
        assert_same_file(&target.join("sys.raw"), &img);
        let stats = proxy.stats();
        println!("{n}: {:.1} s, proxy saw {stats}", elapsed.as_secs_f64());
        if faults.fail_rate > 0.0 {
            assert!(
                stats["answered_503"].as_u64().unwrap() > 0 && stats["cut"].as_u64().unwrap() > 0,
                "faults were injected: {stats}"
            );
        }
        times.push(elapsed);
    }
    assert!(
        times[1] < times[0] * 2 + std::time::Duration::from_secs(2),
        "with faults {:?}, without {:?}",
        times[1],
        times[0]
    );
}

/// A bucket with S3 Object Lock enabled (versioning on), as README "Immutable buckets"
/// describes: backups, forget and prune work (a delete without a version id only adds a delete
/// marker), check and restore are exact, and what prune removed is still in the bucket as
/// noncurrent versions, which is what a user recovers after an attacker with the host's
/// credentials "deleted" the backups. Then a bucket with a default retention, which refuses
/// an upload without `Content-MD5` (moto checks the digest too): the same commands work there.
#[test]
fn buckets_with_object_lock_work_and_keep_what_prune_removed() {
    let moto = Moto::start();
    let tmp = tempfile::tempdir().unwrap();
    moto.locked_bucket("locked", None);
    exercise_object_lock(&moto, "s3://locked/repo", tmp.path());
    moto.locked_bucket("retained", Some(1));
    exercise_object_lock(&moto, "s3://retained/repo", tmp.path());
}

/// Two backups, prune of the older, `check --read-data` and a restore on a bucket with Object
/// Lock at `url` (`s3://BUCKET/PREFIX`); the pruned packs stay behind delete markers.
fn exercise_object_lock(moto: &Moto, url: &str, tmp: &Path) {
    let (bucket, prefix) = url["s3://".len()..].split_once('/').unwrap();
    let host = tmp.join(format!("host-{bucket}"));
    let tmp = &tmp.join(bucket);
    std::fs::create_dir_all(tmp).unwrap();
    json(on_endpoint(&moto.s3, url, &host).args(["init", "--encrypt"]));
    let mut ids = Vec::new();
    for seed in [41, 42] {
        let img = image(tmp, &format!("{seed}.img"), 4, seed);
        let v = json(
            on_endpoint(&moto.s3, url, &host)
                .args(["backup", "image", "--vm", "vm", "--disk"])
                .arg(format!("sys={}", img.display())),
        );
        ids.push((id_of(&v), img));
    }
    let pruned = json(on_endpoint(&moto.s3, url, &host).args(["prune", "--keep-last", "1"]));
    assert!(
        pruned["gc"]["packs_deleted"].as_u64().unwrap() > 0,
        "prune deleted packs: {pruned}"
    );
    let check = json(on_endpoint(&moto.s3, url, &host).args(["check", "--read-data"]));
    assert_eq!(check["ok"], true, "{check}");
    let target = tmp.join("r");
    json(
        on_endpoint(&moto.s3, url, &host)
            .args(["restore", &ids[1].0, "--target"])
            .arg(&target),
    );
    assert_same_file(&target.join("sys.raw"), &ids[1].1);
    let (status, versions) = moto.raw(
        "GET",
        &format!("/{bucket}?versions&prefix={prefix}/packs/"),
        &[],
        "",
    );
    assert_eq!(status, 200, "{versions}");
    assert!(
        versions.contains("<DeleteMarker>") && versions.matches("<Version>").count() >= 2,
        "the deleted packs are kept as versions behind delete markers: {versions}"
    );
}

/// The real binary killed with SIGKILL at random instants of backups and prunes on Garage,
/// then bit rot: after every kill the next backup and prune succeed, and at the end
/// `check --read-data` is clean and every surviving restore point restores exactly. Then one
/// byte of a pack is changed in the bucket (as a disk of a node could rot, or a hand could
/// edit): `check --read-data` names the damage (exit 3), and a restore that needs the pack
/// fails with a clear error instead of writing wrong data.
#[test]
fn random_kills_then_bit_rot_on_garage() {
    use std::sync::Arc;
    use vmkeep_store::{Key, ObjectKind, S3Options, S3Store, Store};
    let garage = Garage::start(3);
    garage.bucket("kills");
    let url = "s3://kills/repo";
    let tmp = tempfile::tempdir().unwrap();
    let host = tmp.path().join("host");
    json(on_garage(&garage, url, &host).args(["init", "--encrypt"]));
    let img = tmp.path().join("disk.img");
    let mut data = random_bytes(24 << 20, 31);
    write(&img, &data);
    let mut rng = vmkeep_testkit::data::Rng::new(
        std::env::var("VMKEEP_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_0031),
    );
    let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
    let mut killed_running = 0;
    for round in 0..6 {
        // Change a few MiB, then start a backup or a prune and kill it after 20-600 ms.
        let at = (rng.below(20) as usize) << 20;
        data[at..at + (2 << 20)].copy_from_slice(&random_bytes(2 << 20, 100 + round));
        write(&img, &data);
        let mut c = std_on_garage(&garage, url, &host, &[]);
        if round % 3 == 2 {
            c.args(["--json", "prune", "--keep-last", "3"]);
        } else {
            c.args(["--json", "backup", "image", "--vm", "vm", "--disk"])
                .arg(format!("sys={}", img.display()));
        }
        let mut child = c.spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20 + rng.below(580)));
        if child.try_wait().unwrap().is_none() {
            killed_running += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        // A killed prune's lease is judged dead at once (same host, process gone).
        let v = json(
            on_garage(&garage, url, &host)
                .args(["backup", "image", "--vm", "vm", "--disk"])
                .arg(format!("sys={}", img.display())),
        );
        kept.push((id_of(&v), data.clone()));
        json(on_garage(&garage, url, &host).args(["prune", "--keep-last", "3"]));
        kept.retain(|(id, _)| {
            let snaps = json(on_garage(&garage, url, &host).arg("snapshots"));
            snaps
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["id"].as_str() == Some(id.as_str()))
        });
    }
    println!("{killed_running} of 6 kills hit a running process");
    assert!(
        killed_running >= 3,
        "the kills came too late: {killed_running} of 6"
    );
    let check = json(on_garage(&garage, url, &host).args(["check", "--read-data"]));
    assert_eq!(check["ok"], true, "{check}");
    assert!(!kept.is_empty());
    for (i, (id, bytes)) in kept.iter().enumerate() {
        let target = tmp.path().join(format!("r{i}"));
        json(
            on_garage(&garage, url, &host)
                .args(["restore", id, "--target"])
                .arg(&target),
        );
        assert_eq!(
            std::fs::read(target.join("sys.raw")).unwrap(),
            *bytes,
            "restore point {id}"
        );
    }

    // Bit rot: one byte of one pack, rewritten in the bucket under its name.
    let store: Arc<dyn Store> = Arc::new(
        S3Store::open_with("s3://kills/repo", garage.s3.config(), S3Options::default()).unwrap(),
    );
    let pack = store
        .list(ObjectKind::Pack)
        .unwrap()
        .into_iter()
        .max_by_key(|m| m.size)
        .unwrap()
        .key;
    let mut bytes = store.get(&pack, 64 << 20).unwrap();
    bytes[100] ^= 0x5a;
    store
        .put(
            &Key::new(ObjectKind::Pack, pack.name.clone()).unwrap(),
            &bytes,
        )
        .unwrap();
    let out = on_garage(&garage, url, &host)
        .args(["check", "--read-data", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let report = single_json(&out.stdout);
    let damaged = report["damaged"].as_array().unwrap();
    assert!(!damaged.is_empty(), "{report}");
    assert!(
        report["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("does not hash to its name")),
        "{report}"
    );
    let victim = damaged[0]["snapshot"].as_str().unwrap();
    let out = on_garage(&garage, url, &host)
        .args(["restore", victim, "--target"])
        .arg(tmp.path().join("rotten"))
        .output()
        .unwrap();
    let line = one_line_error(&out, 1);
    assert!(line.contains("damaged"), "{line}");
}

/// `vmkeep mount` of a restore point in a bucket on a 3-node Garage cluster: QEMU's NBD client
/// reads it identical to the image, fetching each data chunk once (range GETs through the
/// cached index) and never a zero one.
#[test]
fn a_restore_point_on_garage_is_mounted_and_read_in_place() {
    use std::io::{BufRead, BufReader, Read};
    let garage = Garage::start(3);
    garage.bucket("mounted");
    let url = "s3://mounted/repo";
    let tmp = tempfile::tempdir().unwrap();
    let host = tmp.path().join("host");
    json(on_garage(&garage, url, &host).args(["init", "--encrypt"]));
    let mut data = random_bytes(3 << 20, 77);
    data.extend(vec![0u8; 2 << 20]);
    data.extend(random_bytes(1 << 20, 78));
    let img = tmp.path().join("d.img");
    write(&img, &data);
    let v = json(
        on_garage(&garage, url, &host)
            .args(["backup", "image", "--vm", "vm", "--disk"])
            .arg(format!("d={}", img.display())),
    );
    let sock = tmp.path().join("d.sock");
    let mut child = std_on_garage(&garage, url, &host, &[])
        .args(["--json", "mount", &id_of(&v), "--socket"])
        .arg(&sock)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let start: serde_json::Value = serde_json::from_str(&line).unwrap();
    let uri = start["uri"].as_str().unwrap();
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&img)
        .arg(uri)
        .output()
        .unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(cmp.status.success(), "{}", describe(&cmp));
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let report: serde_json::Value = serde_json::from_str(&rest).unwrap();
    assert_eq!(
        report["stats"]["chunks_fetched"], 64,
        "4 MiB of data chunks: {report}"
    );
}
