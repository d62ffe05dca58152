//! A disaster-recovery drill end to end: live backups with memory of a running test guest at
//! site A (two, the second incremental), pushed with an `append` token to a `vmkeep serve` at
//! site B (its own process and folder, in its own network namespace, reached over a veth
//! link), site A's repository gone, then `recover` at site B from B's own folder: the guest
//! continues where the last capture left it (the first number it prints continues from the
//! captured disk's SEQ 0..K) and never boots again. On the way, `diff` of the two replicated
//! points says the memory changed (part of it) and the definition did not.
//!
//! The network namespace needs root and iproute2; without them site B runs on 127.0.0.1 in
//! the test's namespace (printed). The real binary, the real test guest (seqwrite), one QEMU
//! at a time.
mod common;
#[path = "common/qemu.rs"]
mod qemu;
#[path = "common/served.rs"]
mod served;

use std::path::Path;

use common::*;
use qemu::*;
use vmkeep_testkit::guest::{counters, wait_serial_log};
use vmkeep_testkit::process::PidGuard;

const PASS: &str = "dr drill passphrase";

fn pv(repo: &Path) -> assert_cmd::Command {
    let mut c = vmkeep(repo);
    c.env("VMKEEP_PASSWORD", PASS);
    c
}

/// Site B's network: a namespace joined to this one by a veth pair, removed when dropped.
struct SiteNet {
    ns: String,
    host_if: String,
    /// The address site B listens on.
    addr: String,
}

impl SiteNet {
    fn create() -> Result<SiteNet, String> {
        let tag = std::process::id() % 100_000;
        let net = SiteNet {
            ns: format!("vmk-dr-{tag}"),
            host_if: format!("vmka{tag}"),
            addr: format!("10.231.{}.2", tag % 250),
        };
        let peer = format!("vmkb{tag}");
        let host_addr = format!("10.231.{}.1/30", tag % 250);
        let site_addr = format!("{}/30", net.addr);
        let steps: [&[&str]; 7] = [
            &["netns", "add", &net.ns],
            &[
                "link",
                "add",
                &net.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ],
            &["link", "set", &peer, "netns", &net.ns],
            &["addr", "add", &host_addr, "dev", &net.host_if],
            &["link", "set", &net.host_if, "up"],
            &["-n", &net.ns, "addr", "add", &site_addr, "dev", &peer],
            &["-n", &net.ns, "link", "set", &peer, "up"],
        ];
        for args in steps {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        let lo = ["-n", &net.ns, "link", "set", "lo", "up"];
        std::process::Command::new("ip").args(lo).status().ok();
        Ok(net)
    }
}

impl Drop for SiteNet {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

#[test]
fn back_up_at_a_replicate_to_b_recover_at_b() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (site_a, site_b) = (d.join("site-a"), d.join("site-b"));
    std::fs::create_dir_all(&site_b).unwrap();
    let repo_a = site_a.join("repo");
    json(pv(&repo_a).args(["init", "--encrypt"]));

    // Site B: its own server process, folder and (where the machine allows) network.
    let net = SiteNet::create();
    let (b, listen) = match &net {
        Ok(n) => (
            served::Served::start_in(&site_b.join("srv"), Some(&n.ns), &n.addr),
            n.addr.clone(),
        ),
        Err(why) => {
            eprintln!("site B runs in this network namespace: {why}");
            (
                served::Served::start(&site_b.join("srv")),
                "127.0.0.1".to_string(),
            )
        }
    };
    assert!(b.addr.starts_with(&listen), "{} on {listen}", b.addr);
    let url = b.url("dr");
    // B's operator creates the replica once with an admin token; A only ever holds an
    // append token, which cannot delete or replace anything at B.
    let admin = b.token("*", "admin");
    let append = b.token("guest", "append");
    json(
        b.client(&url, &admin)
            .env("VMKEEP_PASSWORD", PASS)
            .arg("init")
            .arg("--replica-of")
            .arg(&repo_a),
    );
    let repo_b = b.dir.join("dr");

    let _lock = qemu_lock();
    let mut vm = boot(d, true);
    vm.wait_progress(10);
    let backup = |repo: &Path, vm: &Vm| {
        json(
            pv(repo)
                .args(["backup", "vm", "--memory", "--qmp"])
                .arg(&vm.qmp)
                .args(["--vm", "guest"]),
        )
    };
    let first = id_of(&backup(&repo_a, &vm));
    let at = vm.progress();
    vm.wait_progress(at + 5);
    let last = id_of(&backup(&repo_a, &vm));
    // Site A pushes what B lacks, over HTTPS.
    let r = json(
        pv(&repo_a)
            .args(["--tls-fingerprint", &b.fingerprint])
            .env("VMKEEP_TOKEN", &append)
            .args(["replicate", "--to", &url]),
    );
    assert_eq!(r["copied"].as_array().unwrap().len(), 2, "{r}");
    vm.kill9();
    // Site A is lost.
    std::fs::remove_dir_all(&site_a).unwrap();

    // At site B, in B's network namespace, from B's own folder.
    let at_b = |args: &[&str]| {
        let mut c = match &net {
            Ok(n) => {
                let mut w = assert_cmd::Command::new("ip");
                w.args(["netns", "exec", &n.ns]).arg(bin());
                for v in ["VMKEEP_REPO", "VMKEEP_TOKEN", "VMKEEP_TOKEN_FILE"] {
                    w.env_remove(v);
                }
                w.env("VMKEEP_KDF_MEM_KIB", KDF_MEM_KIB);
                w
            }
            Err(_) => vmkeep_bare(),
        };
        c.arg("--repo").arg(&repo_b).env("VMKEEP_PASSWORD", PASS);
        c.args(args);
        json(&mut c)
    };
    let check = at_b(&["check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    // What changed between the two captures: the guest's memory (some of it), not its
    // definition.
    let diff = at_b(&["diff", &first, &last]);
    let stream = |name: &str| {
        diff["streams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no stream {name}: {diff}"))
            .clone()
    };
    let mem = stream("memory");
    assert_eq!(mem["differs"], true, "{diff}");
    // RAM bytes in differing page-image chunks: some, not all of the guest's 256 MiB.
    let changed = mem["changed_bytes"].as_u64().unwrap();
    assert!(changed > 0 && changed < 256 << 20, "{diff}");
    assert_eq!(stream("vm-definition")["differs"], false, "{diff}");
    let restored = site_b.join("disk");
    at_b(&["restore", &last, "--target", restored.to_str().unwrap()]);
    let k = prefix_k(
        &std::fs::read(restored.join("vd0.raw")).unwrap(),
        "captured disk",
    );
    let vm_dir = site_b.join("vm");
    let v = at_b(&[
        "recover",
        "guest@latest",
        "--accel",
        "tcg",
        "--target",
        vm_dir.to_str().unwrap(),
    ]);
    let _qemu = PidGuard(v["pid"].as_u64().unwrap() as u32);
    assert_eq!(v["id"], last.as_str(), "{v}");
    assert_eq!(v["resumed"], true, "{v}");
    let serial = std::path::PathBuf::from(v["serial"].as_str().unwrap());
    let text = wait_serial_log(&serial, "three counter lines", |t| counters(t).len() >= 3);
    let c = counters(&text);
    assert!(
        c[0] == k || c[0] == k + 1,
        "the first number ({}) continues from the capture (disk holds SEQ 0..{k}): {text}",
        c[0]
    );
    assert!(
        !text.contains("VMKEEP READY"),
        "it resumed, it did not boot: {text}"
    );
}
