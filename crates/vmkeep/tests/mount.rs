//! `vmkeep mount` through the real binary, read by real NBD clients (qemu-img, qemu-io,
//! nbdinfo): the served disk equals a full restore, zero ranges are reported as holes and never
//! fetched, a read fetches only the chunks it covers, a damaged pack gives read errors (never
//! wrong data) while the server keeps serving, and a repository behind `vmkeep serve` is served
//! on TCP the same way.
mod common;
#[path = "common/served.rs"]
mod served;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::Value;
use served::Served;
use vmkeep_testkit::data::random_bytes;

const MIB: usize = 1 << 20;

/// A running `vmkeep --json mount`: its start line, stopped (SIGTERM) for its report.
struct Mounted {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    start: Value,
}

impl Mounted {
    fn spawn(mut cmd: Command) -> Mounted {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("starting vmkeep mount");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let start: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                let _ = child.kill();
                panic!("mount's start line {line:?}: {e}");
            }
        };
        Mounted { child, out, start }
    }

    fn uri(&self) -> String {
        self.start["uri"].as_str().unwrap().to_string()
    }

    /// SIGTERM, then the final report's `stats`.
    fn stop(mut self) -> Value {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "mount exited with {status}");
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        let v: Value = serde_json::from_str(&rest).unwrap_or_else(|e| panic!("{rest:?}: {e}"));
        assert_eq!(v["stopped"], true, "{v}");
        v["stats"].clone()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mount_local(repo: &Path, args: &[&str]) -> Mounted {
    let mut c = vmkeep_std(repo);
    c.arg("--json").arg("mount").args(args);
    Mounted::spawn(c)
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// `qemu-img convert` of an NBD export into the raw file `out`.
fn convert_to_raw(uri: &str, out: &Path) -> std::process::Output {
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            out.to_str().unwrap(),
        ],
    )
}

/// 2 MiB random, 4 MiB of zeros, 2 MiB random and a short tail: 64 KiB chunks.
fn disk_image(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let mut data = random_bytes(2 * MIB, 1);
    data.extend(vec![0u8; 4 * MIB]);
    data.extend(random_bytes(2 * MIB + 12_345, 2));
    let p = dir.join("sys.img");
    write(&p, &data);
    (p, data)
}

/// A plain repository in a temporary folder holding one backup of [`disk_image`].
struct Scene {
    tmp: tempfile::TempDir,
    repo: std::path::PathBuf,
    img: std::path::PathBuf,
    data: Vec<u8>,
    id: String,
}

fn backed_up() -> Scene {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    init(&repo, &[]);
    let (img, data) = disk_image(tmp.path());
    let id = id_of(&backup(&repo, "vm", &[("sys", &img)]));
    Scene {
        tmp,
        repo,
        img,
        data,
        id,
    }
}

#[test]
fn a_mounted_restore_point_equals_its_restore_and_fetches_only_what_is_read() {
    let Scene {
        tmp,
        repo,
        data,
        id,
        ..
    } = backed_up();
    restore(&repo, &id, &tmp.path().join("r"));
    let restored = tmp.path().join("r/sys.raw");
    let nonzero_chunks = data
        .chunks(64 << 10)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64;

    let sock = tmp.path().join("sys.sock");
    let m = mount_local(&repo, &[&id, "--socket", sock.to_str().unwrap()]);
    assert_eq!(m.start["id"], id.as_str(), "{}", m.start);
    assert_eq!(m.start["disk"], "sys");
    assert_eq!(m.start["socket"], sock.to_str().unwrap());
    let uri = m.uri();
    // Identical to the full restore, read by QEMU's NBD client.
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            restored.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(cmp.status.success(), "{}", describe(&cmp));
    // base:allocation: the zero range is a hole that reads as zeros, the rest data.
    let map = run("nbdinfo", &["--map", "--json", &uri]);
    assert!(map.status.success(), "{}", describe(&map));
    let extents: Value = serde_json::from_slice(&map.stdout).unwrap();
    let holes: Vec<(u64, u64)> = extents
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(3))
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(holes, vec![(2 * MIB as u64, 4 * MIB as u64)], "{extents}");
    let stats = m.stop();
    assert_eq!(
        stats["chunks_fetched"].as_u64(),
        Some(nonzero_chunks),
        "each data chunk fetched once, no zero chunk: {stats}"
    );
    assert_eq!(stats["read_errors"], 0, "{stats}");

    // A 4 KiB read in the middle of the second data range fetches that one chunk.
    let sock2 = tmp.path().join("one.sock");
    let m = mount_local(
        &repo,
        &[&id, "--disk", "sys", "--socket", sock2.to_str().unwrap()],
    );
    let io = run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            &m.uri(),
            "-c",
            "read -P 0 2M 4k",
            "-c",
            "read 7M 4k",
        ],
    );
    assert!(io.status.success(), "{}", describe(&io));
    let stats = m.stop();
    assert_eq!(stats["chunks_fetched"], 1, "{stats}");
}

/// The mount holds a read lease: its restore point forgotten and pruned while it is served,
/// the packs wait for the mount (reported as waiting), every byte still reads, and a prune
/// after the mount ended reclaims them.
#[test]
fn a_restore_point_pruned_while_mounted_still_reads() {
    let Scene {
        tmp,
        repo,
        data,
        id,
        ..
    } = backed_up();
    let sock = tmp.path().join("sys.sock");
    let m = mount_local(&repo, &[&id, "--socket", sock.to_str().unwrap()]);
    json(vmkeep(&repo).args(["forget", &id]));
    let pruned = json(vmkeep(&repo).arg("prune"));
    assert!(
        pruned["gc"]["packs_waiting"].as_u64().unwrap() > 0,
        "the packs wait for the mount: {pruned}"
    );
    assert!(!objects(&repo, "packs").is_empty(), "{pruned}");
    let out = tmp.path().join("copy.raw");
    let conv = convert_to_raw(&m.uri(), &out);
    assert!(conv.status.success(), "{}", describe(&conv));
    let copy = std::fs::read(&out).unwrap();
    // qemu-img rounds the size up to whole sectors.
    assert!(copy[..data.len()] == data[..], "every byte as backed up");
    assert!(copy[data.len()..].iter().all(|&b| b == 0));
    m.stop();
    json(vmkeep(&repo).arg("prune"));
    assert!(
        objects(&repo, "packs").is_empty(),
        "reclaimed once the mount ended"
    );
}

#[test]
fn a_damaged_pack_gives_read_errors_never_wrong_data_and_the_server_keeps_serving() {
    let Scene { tmp, repo, id, .. } = backed_up();
    for pack in objects(&repo, "packs") {
        // A byte well inside the pack's blobs (the header is at its end).
        patch(&pack_path(&repo, &pack), 4096, b"\xff\x00\xff");
    }
    let sock = tmp.path().join("sys.sock");
    let m = mount_local(&repo, &[&id, "--socket", sock.to_str().unwrap()]);
    let out = tmp.path().join("copy.raw");
    let conv = convert_to_raw(&m.uri(), &out);
    assert!(
        !conv.status.success(),
        "a damaged chunk must not convert: {}",
        describe(&conv)
    );
    let err = String::from_utf8_lossy(&conv.stderr);
    assert!(err.contains("Input/output error"), "{err}");
    // The zero range and the undamaged chunks still read; the server is still up.
    let io = run(
        "qemu-io",
        &["-r", "-f", "raw", &m.uri(), "-c", "read -P 0 3M 1M"],
    );
    assert!(io.status.success(), "{}", describe(&io));
    let stats = m.stop();
    assert!(stats["read_errors"].as_u64().unwrap() >= 1, "{stats}");
}

#[test]
fn a_repository_behind_vmkeep_serve_is_mounted_on_tcp() {
    let tmp = tempfile::tempdir().unwrap();
    let served = Served::start(&tmp.path().join("srv"));
    let url = served.url("main");
    let token = served.token("*", "admin");
    ok(served.client(&url, &token).args(["init", "--encrypt"]));
    let (img, _) = disk_image(tmp.path());
    let v = json(
        served
            .client(&url, &token)
            .args(["backup", "image", "--vm", "vm", "--disk"])
            .arg(format!("sys={}", img.display())),
    );
    let id = id_of(&v);
    let mut c = vmkeep_std_at(&bin(), Path::new(&url));
    c.args(["--tls-fingerprint", &served.fingerprint])
        .env("VMKEEP_TOKEN", &token)
        .env("VMKEEP_PASSWORD", "served-test-passphrase")
        .args(["--json", "mount", &id, "--listen", "127.0.0.1:0"]);
    let m = Mounted::spawn(c);
    let listen = m.start["listen"].as_str().unwrap().to_string();
    assert!(
        m.uri().starts_with(&format!("nbd://{listen}")),
        "{}",
        m.start
    );
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            &m.uri(),
        ],
    );
    assert!(cmp.status.success(), "{}", describe(&cmp));
    m.stop();
}

#[test]
fn mount_refuses_clearly() {
    let Scene { tmp, repo, id, .. } = backed_up();
    let sock = tmp.path().join("s.sock");
    fails_with(
        vmkeep(&repo)
            .args(["mount", &id, "--disk", "nope", "--socket"])
            .arg(&sock),
        &["nope", "sys"],
    );
    write(&sock, b"");
    fails_with(
        vmkeep(&repo).args(["mount", &id, "--socket"]).arg(&sock),
        &["exists"],
    );
    let out = vmkeep(&repo).args(["mount", &id]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

#[test]
fn writes_to_a_writable_mount_go_to_an_overlay_and_the_restore_point_never_changes() {
    let Scene {
        tmp, repo, img, id, ..
    } = backed_up();
    let sock = tmp.path().join("rw.sock");
    let m = mount_local(
        &repo,
        &[&id, "--writable", "--socket", sock.to_str().unwrap()],
    );
    assert_eq!(m.start["writable"], true, "{}", m.start);
    let uri = m.uri();
    // Written by one client (into data and into the zero range), read back by another.
    let w = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "write -P 0xa5 3M 4k",
        ],
    );
    assert!(w.status.success(), "{}", describe(&w));
    let r = run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0x5a 1M 64k",
            "-c",
            "read -P 0xa5 3M 4k",
            "-c",
            "read -P 0 3149824 4096",
        ],
    );
    assert!(r.status.success(), "{}", describe(&r));
    m.stop();
    // The restore point is what was backed up, and a new mount has none of those writes.
    assert_restores(&repo, &id, "sys", &img, &tmp.path().join("check"));
    let sock = tmp.path().join("ro.sock");
    let m = mount_local(&repo, &[&id, "--socket", sock.to_str().unwrap()]);
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            &m.uri(),
        ],
    );
    assert!(cmp.status.success(), "{}", describe(&cmp));
    // Without --writable a write is refused.
    let w = run("qemu-io", &["-f", "raw", &m.uri(), "-c", "write -P 1 0 4k"]);
    assert!(
        !w.status.success(),
        "a read-only mount took a write: {}",
        describe(&w)
    );
    m.stop();
}

/// This machine has no nbd kernel module, so the attach itself is not tested here; the refusal
/// is: one clear line, and nothing left behind (the socket is removed).
#[test]
fn an_nbd_device_that_is_not_there_is_refused_clearly() {
    let Scene { tmp, repo, id, .. } = backed_up();
    let sock = tmp.path().join("dev.sock");
    for (device, needle) in [("/dev/nbd97", "modprobe nbd"), ("/dev/sda", "/dev/nbdN")] {
        fails_with(
            vmkeep(&repo)
                .args(["mount", &id, "--nbd-device", device, "--socket"])
                .arg(&sock),
            &[needle],
        );
        assert!(!sock.exists(), "the socket is removed after a refusal");
    }
}

/// vmkeep killed with SIGKILL: the qemu-nbd serving its writable overlay dies with it, so no
/// overlay is left served over an export that is gone.
#[test]
fn a_killed_writable_mount_takes_its_qemu_nbd_with_it() {
    let Scene { tmp, repo, id, .. } = backed_up();
    let sock = tmp.path().join("k.sock");
    // Its private folder (the overlay) in a TMPDIR of its own, to watch it.
    let private_tmp = tmp.path().join("tmp");
    std::fs::create_dir(&private_tmp).unwrap();
    let folders = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&private_tmp)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect()
    };
    let writable = |socket: &Path| {
        let mut c = vmkeep_std(&repo);
        c.env("TMPDIR", &private_tmp)
            .args(["--json", "mount", &id, "--writable", "--socket"])
            .arg(socket);
        Mounted::spawn(c)
    };
    let mut m = writable(&sock);
    let pid = m.child.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let qemu_nbd: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{qemu_nbd}/comm")).unwrap();
    assert_eq!(comm.trim(), "qemu-nbd");
    m.child.kill().unwrap();
    m.child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let alive = |p: i32| {
        std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    };
    while alive(qemu_nbd) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        !alive(qemu_nbd),
        "qemu-nbd {qemu_nbd} outlived the killed mount"
    );
    // Its folder stays behind; the next mount removes it (its owner is gone).
    let left = folders();
    assert_eq!(left.len(), 1, "{left:?}");
    let _ = std::fs::remove_file(&sock);
    let next = writable(&tmp.path().join("k2.sock"));
    let now = folders();
    assert!(!now.contains(&left[0]), "{now:?}");
    assert_eq!(now.len(), 1, "the new mount's own: {now:?}");
    next.stop();
}
