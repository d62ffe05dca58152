//! `vmkeep serve` with the real binary on both ends: repositories created, backed up,
//! restored, checked, forgotten and pruned over HTTPS with scoped tokens; an `append` token
//! cannot destroy anything; a token for one VM sees nothing of another; pack lists keep a
//! VM's readers working after a prune moved its blobs; replication pushes to and pulls from a
//! served repository, survives a connection cut mid-reply and a kill -9, and a rerun sends
//! only the rest. Route-by-route checks of the server are in crates/vmkeep-server/tests.

mod common;
#[path = "common/served.rs"]
mod served;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use serde_json::Value;
use served::Served;

const MIB: usize = 1 << 20;

fn backup_img(c: &mut assert_cmd::Command, vm: &str, img: &Path) -> Value {
    json(
        c.args(["backup", "image", "--vm", vm, "--disk"])
            .arg(format!("vda={}", img.display())),
    )
}

/// Every file below `dir` (relative path) with its bytes.
fn contents(dir: &Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    tree_listing(dir)
        .into_iter()
        .map(|(p, _)| {
            let bytes = std::fs::read(dir.join(&p)).unwrap();
            (p, bytes)
        })
        .collect()
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

fn restores_to(c: &mut assert_cmd::Command, snap: &str, want: &Path, out: &Path) {
    json(c.args(["restore", snap, "--target"]).arg(out));
    assert_same_file(&out.join("vda.raw"), want);
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn tokens_scope_what_a_host_can_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = Served::start(&d.join("srv"));
    let url = s.url("main");
    let admin = s.token("*", "admin");
    let web_append = s.token("web", "append");
    let db_append = s.token("db*", "append");
    let web_read = s.token("web", "read");
    let db_read = s.token("db*", "read");

    // Nothing without a valid token; init needs admin.
    fails_with(
        s.client(&url, "vmk_0000000000000000_00")
            .args(["init", "--encrypt"]),
        &["token"],
    );
    fails_with(
        s.client(&url, &web_append).args(["init", "--encrypt"]),
        &["refused"],
    );
    json(s.client(&url, &admin).args(["init", "--encrypt"]));
    assert!(s.dir.join("main/config").exists());

    let web = d.join("web.img");
    write(&web, &random_bytes(6 * MIB, 1));
    let w1 = id_of(&backup_img(&mut s.client(&url, &web_append), "web", &web));
    let db = d.join("db.img");
    write(&db, &random_bytes(2 * MIB, 2));
    let d1 = id_of(&backup_img(&mut s.client(&url, &db_append), "db1", &db));
    // An append token only backs up its own VMs.
    fails_with(
        s.client(&url, &web_append)
            .args(["backup", "image", "--vm", "db1", "--disk"])
            .arg(format!("vda={}", db.display())),
        &["refused"],
    );
    // Most of the disk changes: forgetting w1 leaves its packs mostly unreferenced, so a
    // prune repacks them (and must rewrite w2's pack list, which named them).
    patch(&web, MIB as u64, &random_bytes(4 * MIB, 3));
    let w2 = id_of(&backup_img(&mut s.client(&url, &web_append), "web", &web));

    // Each reader sees its own VMs only.
    assert_eq!(
        ids(&json(s.client(&url, &web_read).arg("snapshots"))),
        [w1.clone(), w2.clone()]
    );
    assert_eq!(
        ids(&json(s.client(&url, &db_read).arg("snapshots"))),
        vec![d1.clone()]
    );
    assert_eq!(
        json(s.client(&url, &admin).arg("snapshots"))
            .as_array()
            .unwrap()
            .len(),
        3
    );
    restores_to(&mut s.client(&url, &web_read), &w2, &web, &d.join("r1"));
    restores_to(&mut s.client(&url, &db_read), &d1, &db, &d.join("r2"));
    let out = s
        .client(&url, &db_read)
        .args(["restore", &w2, "--target"])
        .arg(d.join("r3"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a db reader restored web: {}",
        describe(&out)
    );

    // An append token destroys nothing.
    let before = contents(&s.dir.join("main"));
    fails_with(
        s.client(&url, &web_append).args(["forget", &w1]),
        &["may not"],
    );
    fails_with(
        s.client(&url, &web_append)
            .args(["prune", "--keep-last", "1"]),
        &["refused"],
    );
    let after = contents(&s.dir.join("main"));
    let lost: Vec<_> = before
        .iter()
        .filter(|(p, _)| !p.starts_with("locks"))
        .filter(|(p, bytes)| after.get(*p) != Some(bytes))
        .map(|(p, _)| p)
        .collect();
    assert!(
        lost.is_empty(),
        "an append token changed or removed {lost:?}"
    );

    // Admin forgets and prunes; the pack lists follow the moved blobs, so the readers of
    // web still restore everything (the prune repacks the packs the forgotten point used).
    json(s.client(&url, &admin).args(["forget", &w1]));
    let pr = json(s.client(&url, &admin).args(["prune"]));
    assert!(pr["reclaimed_bytes"].as_u64().unwrap() > 0, "{pr}");
    restores_to(&mut s.client(&url, &web_read), &w2, &web, &d.join("r4"));
    restores_to(&mut s.client(&url, &db_read), &d1, &db, &d.join("r5"));
    let chk = json(s.client(&url, &admin).args(["check", "--read-data"]));
    assert_eq!(chk["ok"], true, "{chk}");
}

/// A TCP proxy to `target` that cuts each of its first `first` connections once it forwarded
/// `after` bytes of the server's replies. Returns its address and the count of cuts.
fn cutting_proxy(target: String, first: usize, after: usize) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let cuts = Arc::new(AtomicUsize::new(0));
    let c2 = cuts.clone();
    std::thread::spawn(move || {
        for (n, client) in l.incoming().enumerate() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(&target) else {
                continue;
            };
            let cut = n < first;
            let cuts = c2.clone();
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let (mut s_in, mut c_out) = (server, client);
                let mut sent = 0usize;
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    let n = match s_in.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if cut && sent + n > after {
                        let _ = c_out.write_all(&buf[..after.saturating_sub(sent)]);
                        cuts.fetch_add(1, Ordering::SeqCst);
                        let _ = c_out.shutdown(std::net::Shutdown::Both);
                        let _ = s_in.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    if c_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                }
                let _ = c_out.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, cuts)
}

#[test]
fn replication_to_and_from_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = Served::start(&d.join("srv"));
    let admin = s.token("*", "admin");
    let push = s.token("*", "append");
    let pull = s.token("web", "read");
    let pass = "served-test-passphrase";

    // A primary with two VMs, replicated to a served replica with an append token.
    let src = d.join("src");
    let local = |repo: &Path| {
        let mut c = vmkeep(repo);
        c.env("VMKEEP_PASSWORD", pass);
        c
    };
    json(local(&src).args(["init", "--encrypt"]));
    let web = d.join("web.img");
    write(&web, &random_bytes(8 * MIB, 4));
    backup_img(&mut local(&src), "web", &web);
    let db = d.join("db.img");
    write(&db, &random_bytes(2 * MIB, 5));
    backup_img(&mut local(&src), "db", &db);
    let url = s.url("dr");
    json(
        s.client(&url, &admin)
            .arg("init")
            .arg("--replica-of")
            .arg(&src),
    );
    // A token that covers only web, or may only read, is refused before anything is sent,
    // naming the VM it does not cover (the first try of this, in the demo, failed half-way).
    let scoped = s.url("dr-scoped");
    json(
        s.client(&scoped, &admin)
            .arg("init")
            .arg("--replica-of")
            .arg(&src),
    );
    let web_only = s.token("web", "append");
    for (token, needles) in [
        (&web_only, ["restore points of db", "nothing was sent"]),
        (&pull, ["may not add restore points", "rights: read"]),
    ] {
        let out = local(&src)
            .args(["--tls-fingerprint", &s.fingerprint])
            .env("VMKEEP_TOKEN", token)
            .args(["replicate", "--to", &scoped])
            .output()
            .unwrap();
        let line = one_line_error(&out, 1);
        assert!(needles.iter().all(|n| line.contains(n)), "{line}");
    }
    let there = json(s.client(&scoped, &admin).arg("snapshots"));
    assert_eq!(
        there.as_array().unwrap().len(),
        0,
        "nothing was sent: {there}"
    );
    let web_pushed = json(
        local(&src)
            .args(["--tls-fingerprint", &s.fingerprint])
            .env("VMKEEP_TOKEN", &web_only)
            .args(["replicate", "--vm", "web", "--to", &scoped]),
    );
    assert_eq!(
        web_pushed["copied"].as_array().unwrap().len(),
        1,
        "{web_pushed}"
    );

    // Through a proxy that cuts its first connection in the middle of a reply: without
    // retries the replication fails; with them (the default) the rerun completes, sending
    // only what the first run did not.
    let (proxy, cuts) = cutting_proxy(s.addr.clone(), 1, 6 << 10);
    let out = vmkeep_std(&src)
        .env("VMKEEP_PASSWORD", pass)
        .env("VMKEEP_TOKEN", &push)
        .env("VMKEEP_HTTP_RETRY_SECS", "0")
        .args(["--tls-fingerprint", &s.fingerprint, "replicate", "--to"])
        .arg(format!("https://{proxy}/dr"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a cut connection went unnoticed: {}",
        describe(&out)
    );
    assert_eq!(cuts.load(Ordering::SeqCst), 1);
    let (proxy, cuts) = cutting_proxy(s.addr.clone(), 1, 6 << 10);
    let first = json(
        local(&src)
            .args(["--tls-fingerprint", &s.fingerprint])
            .env("VMKEEP_TOKEN", &push)
            .args(["replicate", "--to"])
            .arg(format!("https://{proxy}/dr")),
    );
    assert_eq!(
        cuts.load(Ordering::SeqCst),
        1,
        "the retried run's connection was not cut"
    );
    let at_dr = json(s.client(&url, &admin).arg("snapshots"));
    assert_eq!(at_dr.as_array().unwrap().len(), 2, "{at_dr}");
    let full = 10 * MIB as u64;
    let sent = first["bytes_sent"].as_u64().unwrap();
    assert!(
        sent > 0 && sent < full,
        "the rerun sent {sent} bytes: everything again, or nothing: {first}"
    );

    // kill -9 after the first blob of the next point; the rerun sends only the rest.
    patch(&web, 2 * MIB as u64, &random_bytes(2 * MIB, 6));
    let w2 = id_of(&backup_img(&mut local(&src), "web", &web));
    let out = vmkeep_std(&src)
        .env("VMKEEP_PASSWORD", pass)
        .env("VMKEEP_TOKEN", &push)
        .env("VMKEEP_KILL_AT", "replicate-after-first-blob")
        .args([
            "--tls-fingerprint",
            &s.fingerprint,
            "replicate",
            "--to",
            &url,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the kill point was not reached");
    let rerun = json(
        local(&src)
            .args(["--tls-fingerprint", &s.fingerprint])
            .env("VMKEEP_TOKEN", &push)
            .args(["replicate", "--to", &url]),
    );
    assert_eq!(rerun["copied"], serde_json::json!([w2]), "{rerun}");
    let resent = rerun["bytes_sent"].as_u64().unwrap();
    // The change once (nothing of it was stored yet: its only pack was still being filled
    // when the kill came), not the image again.
    assert!(
        resent >= 2 * MIB as u64 && resent < 3 * MIB as u64,
        "the rerun sent {resent} bytes for a 2 MiB change"
    );
    let again = json(
        local(&src)
            .args(["--tls-fingerprint", &s.fingerprint])
            .env("VMKEEP_TOKEN", &push)
            .args(["replicate", "--to", &url]),
    );
    assert_eq!(again["bytes_sent"], 0, "{again}");

    // A DR site pulls web with a read token into its own replica, and restores.
    let dr = d.join("dr-local");
    json(
        local(&dr)
            .args(["--tls-fingerprint", &s.fingerprint])
            .env("VMKEEP_TOKEN", &pull)
            .arg("init")
            .arg("--replica-of")
            .arg(&url),
    );
    let pulled = json(
        local(&dr)
            .args(["--tls-fingerprint", &s.fingerprint])
            .env("VMKEEP_TOKEN", &pull)
            .args(["replicate", "--all", "--from", &url]),
    );
    assert_eq!(
        pulled["copied"].as_array().unwrap().len(),
        2,
        "only web's points: {pulled}"
    );
    let out = d.join("restored");
    json(local(&dr).args(["restore", &w2, "--target"]).arg(&out));
    assert_same_file(&out.join("vda.raw"), &web);
    let chk = json(local(&dr).args(["check", "--read-data"]));
    assert_eq!(chk["ok"], true, "{chk}");
}

#[test]
fn wrong_fingerprint_and_plain_http_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start(&dir.path().join("srv"));
    let admin = s.token("*", "admin");
    let url = s.url("x");
    let mut c = vmkeep_bare();
    c.arg("--repo")
        .arg(&url)
        .args(["--tls-fingerprint", &"ab".repeat(32)])
        .env("VMKEEP_TOKEN", &admin)
        .env("VMKEEP_HTTP_RETRY_SECS", "0")
        .arg("snapshots");
    fails_with(&mut c, &["fingerprint"]);
    let mut c = s.client(&format!("http://{}/x", s.addr), &admin);
    fails_with(c.arg("snapshots"), &["https"]);
}

#[test]
fn many_clients_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = Served::start(&d.join("srv"));
    let url = s.url("busy");
    let admin = s.token("*", "admin");
    json(s.client(&url, &admin).args(["init", "--encrypt"]));
    // A first point of `old`, which a restore and a pull read while three backups run.
    let old = d.join("old.img");
    write(&old, &random_bytes(4 * MIB, 40));
    let old_id = id_of(&backup_img(&mut s.client(&url, &admin), "old", &old));
    let pull_dir = d.join("pulled");
    let pass = "served-test-passphrase";
    let mut c = vmkeep(&pull_dir);
    c.env("VMKEEP_PASSWORD", pass)
        .args(["--tls-fingerprint", &s.fingerprint])
        .env("VMKEEP_TOKEN", &admin)
        .arg("init")
        .arg("--replica-of")
        .arg(&url);
    json(&mut c);

    let mut children = Vec::new();
    for (i, vm) in ["vm1", "vm2", "vm3"].into_iter().enumerate() {
        let img = d.join(format!("{vm}.img"));
        write(&img, &random_bytes(6 * MIB, 50 + i as u64));
        let token = s.token(vm, "append");
        let mut c = std::process::Command::new(bin());
        c.args([
            "--json",
            "--repo",
            &url,
            "--tls-fingerprint",
            &s.fingerprint,
        ])
        .env("VMKEEP_TOKEN", token)
        .env("VMKEEP_PASSWORD", pass)
        .env("VMKEEP_KDF_MEM_KIB", KDF_MEM_KIB)
        .args(["backup", "image", "--vm", vm, "--disk"])
        .arg(format!("vda={}", img.display()));
        children.push((vm.to_string(), c.output_async()));
    }
    let reader = s.token("old", "read");
    let mut r = std::process::Command::new(bin());
    r.args([
        "--json",
        "--repo",
        &url,
        "--tls-fingerprint",
        &s.fingerprint,
    ])
    .env("VMKEEP_TOKEN", &reader)
    .env("VMKEEP_PASSWORD", pass)
    .args(["restore", &old_id, "--target"])
    .arg(d.join("restored"));
    children.push(("restore".into(), r.output_async()));
    let mut p = std::process::Command::new(bin());
    p.args(["--json", "--repo"])
        .arg(&pull_dir)
        .args(["--tls-fingerprint", &s.fingerprint])
        .env("VMKEEP_TOKEN", &reader)
        .env("VMKEEP_PASSWORD", pass)
        .args(["replicate", "--from", &url]);
    children.push(("pull".into(), p.output_async()));

    for (what, h) in children {
        let out = h.join().unwrap();
        assert!(out.status.success(), "{what}: {}", describe(&out));
    }
    assert_same_file(&d.join("restored/vda.raw"), &old);
    let all = json(s.client(&url, &admin).arg("snapshots"));
    assert_eq!(all.as_array().unwrap().len(), 4, "{all}");
    let chk = json(s.client(&url, &admin).args(["check", "--read-data"]));
    assert_eq!(chk["ok"], true, "{chk}");
}

/// `Command::output` on a thread.
trait OutputAsync {
    fn output_async(&mut self) -> std::thread::JoinHandle<std::process::Output>;
}

impl OutputAsync for std::process::Command {
    fn output_async(&mut self) -> std::thread::JoinHandle<std::process::Output> {
        let child = self
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawning vmkeep");
        std::thread::spawn(move || child.wait_with_output().unwrap())
    }
}

/// `GET https://ADDR/metrics` with `token` (curl; the certificate is not what this checks).
fn scrape(s: &Served, token: Option<&str>) -> (u16, String) {
    let mut c = std::process::Command::new(vmkeep_testkit::process::require("curl"));
    c.args(["-sk", "-w", "\n%{http_code}"]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = c
        .arg(format!("https://{}/metrics", s.addr))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

#[test]
fn metrics_show_each_token_its_own_vms() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = Served::start(&d.join("srv"));
    let admin = s.token("*", "admin");
    let web_read = s.token("web", "read");
    json(s.client(&s.url("site"), &admin).args(["init", "--encrypt"]));
    let img = d.join("a.img");
    write(&img, &random_bytes(MIB, 7));
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for vm in ["web", "web", "db"] {
        backup_img(&mut s.client(&s.url("site"), &admin), vm, &img);
    }

    let (code, text) = scrape(&s, Some(&admin));
    assert_eq!(code, 200, "{text}");
    assert!(
        text.contains("vmkeep_restore_points{repository=\"site\",vm=\"web\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("vmkeep_restore_points{repository=\"site\",vm=\"db\"} 1"),
        "{text}"
    );
    assert!(text.contains("vmkeep_server_repositories 1"), "{text}");
    assert!(
        text.contains("vmkeep_server_requests_total{class=\"2xx\"}"),
        "{text}"
    );
    let newest: f64 = text
        .lines()
        .find(|l| {
            l.starts_with(
                "vmkeep_last_restore_point_timestamp_seconds{repository=\"site\",vm=\"web\"}",
            )
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("the web VM's newest restore point time");
    assert!(newest >= before.floor() - 1.0, "{newest} < {before}");
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );

    // A token scoped to one VM sees that VM only; no token, no metrics.
    let (code, text) = scrape(&s, Some(&web_read));
    assert_eq!(code, 200);
    assert!(text.contains("vm=\"web\""), "{text}");
    assert!(!text.contains("vm=\"db\""), "a web token saw db: {text}");
    assert_eq!(scrape(&s, None).0, 401);
    assert_eq!(scrape(&s, Some("vmk_0000000000000000_00")).0, 401);
}
