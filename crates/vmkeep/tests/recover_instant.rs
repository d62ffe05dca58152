//! `vmkeep recover --instant` with the real binary and the real test guest (seqwrite: writes
//! SEQ i to its disk, fsynced, then prints `C i`): the VM resumes on the restore point served
//! from the repository, its first serial lines appear while the disks are still being copied
//! (the copy is throttled so it lasts; the zero ranges are in the overlay from the start), the guest writes during the copy, and when the command
//! returns the local qcow2 has no backing file and holds every SEQ the guest wrote, a gap-free
//! prefix continuing the captured one. Also from a `vmkeep serve` repository that stalls
//! (SIGSTOP) 3 s, then is stopped for 8 s and restarted mid-copy: the guest's reads wait,
//! the copy completes, the guest sees no error.
//!
//! One QEMU at a time machine-wide.

mod common;
#[path = "common/qemu.rs"]
mod qemu;
#[path = "common/served.rs"]
mod served;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use common::*;
use qemu::*;
use serde_json::Value;
use served::Served;
use vmkeep_testkit::guest::{counters, wait_serial_log};
use vmkeep_testkit::process::PidGuard;

const PASS: &str = "instant recovery test passphrase";

fn pv(repo: &Path) -> assert_cmd::Command {
    let mut c = vmkeep(repo);
    c.env("VMKEEP_PASSWORD", PASS);
    c
}

fn qemu_img_json(args: &[&str]) -> Value {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A running `recover --json --instant`, its start line read.
struct InstantRun {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
    start: Value,
    t0: Instant,
    _qemu: PidGuard,
}

fn spawn_instant(mut cmd: std::process::Command, snap: &str, target: &Path) -> InstantRun {
    // The copy's reads at 2 MiB/s (zero ranges are not read): about 2 MiB of data, and the
    // clusters the guest wrote meanwhile (it writes all over the 32 MiB disk, so in the end
    // up to all of it): a copy of 1-16 s, long enough to watch the guest run, short enough
    // for the guest's SEQ numbers not to wrap around the disk's blocks.
    if !cmd.get_envs().any(|(k, _)| k == "VMKEEP_COPY_RATE") {
        cmd.env("VMKEEP_COPY_RATE", "2M");
    }
    cmd.args([
        "--json",
        "recover",
        snap,
        "--instant",
        "--accel",
        "tcg",
        "--target",
    ])
    .arg(target)
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(target.with_extension("stderr")).unwrap());
    let t0 = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let start: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let qemu = PidGuard(start["pid"].as_u64().unwrap() as u32);
    assert_eq!(start["instant"], true, "{start}");
    // The restore point's zero tail (the guest wrote only the disk's start) is in the overlay
    // as zero clusters from the start, before the copy could reach it: neither the copy nor
    // the guest reads it over NBD.
    let image = target.join("vd0.qcow2");
    let map = qemu_img_json(&["map", "-U", "--output=json", image.to_str().unwrap()]);
    let tail = (DISK_MIB << 20) - (1 << 20);
    let covering = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            let s = e["start"].as_u64().unwrap();
            s <= tail && tail < s + e["length"].as_u64().unwrap()
        })
        .unwrap_or_else(|| panic!("{map}"));
    assert!(
        covering["depth"] == 0 && covering["zero"] == true && covering["present"] == true,
        "{covering}"
    );
    assert_eq!(start["resumed"], true, "{start}");
    InstantRun {
        child,
        out,
        start,
        t0,
        _qemu: qemu,
    }
}

impl InstantRun {
    fn serial(&self) -> PathBuf {
        PathBuf::from(self.start["serial"].as_str().unwrap())
    }

    /// Waits for three counter lines while the copy still runs; returns them.
    fn runs_during_the_copy(&mut self) -> Vec<i64> {
        let text = wait_serial_log(&self.serial(), "three counter lines", |t| {
            counters(t).len() >= 3
        });
        eprintln!(
            "first serial lines after {:.2} s",
            self.t0.elapsed().as_secs_f64()
        );
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the guest ran only after the copy ended"
        );
        assert!(!text.contains("VMKEEP READY"), "it resumed: {text}");
        counters(&text)
    }

    /// Waits for the copy; checks the VM then runs from a local disk without backing that
    /// holds every SEQ the guest printed, gap-free, and no I/O error reached the guest.
    fn copy_completes_and_keeps_the_writes(mut self, d: &Path, during: &[i64]) {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "recover --instant exited with {status}");
        eprintln!(
            "copy complete after {:.2} s",
            self.t0.elapsed().as_secs_f64()
        );
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        let fin: Value =
            serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("{rest:?}: {e}"));
        assert_eq!(fin["copied"], true, "{fin}");
        let image = PathBuf::from(self.start["target"].as_str().unwrap()).join("vd0.qcow2");
        let info = qemu_img_json(&["info", "-U", "--output=json", image.to_str().unwrap()]);
        assert!(info.get("backing-filename").is_none(), "{info}");
        let serial = self.serial();
        let mut q = Qmp::connect(Path::new(self.start["qmp"].as_str().unwrap()));
        let c0 = counters(&std::fs::read_to_string(&serial).unwrap()).len();
        let text = wait_serial_log(&serial, "more counter lines", |t| {
            counters(t).len() >= c0 + 3
        });
        assert!(
            !text.contains("failed"),
            "no I/O error in the guest: {text}"
        );
        let all = counters(&text);
        assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{text}");
        q.execute("quit", Value::Null);
        drop(q);
        std::thread::sleep(std::time::Duration::from_millis(500));
        let raw = d.join("after.raw");
        let conv = std::process::Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(&image)
            .arg(&raw)
            .output()
            .unwrap();
        assert!(conv.status.success(), "{}", describe(&conv));
        let k = prefix_k(&std::fs::read(&raw).unwrap(), "instantly recovered disk");
        assert!(
            k >= *all.last().unwrap() && during[0] <= k,
            "the disk holds SEQ 0..{k}; the guest printed {all:?}"
        );
    }
}

/// A new encrypted repository `d/repo` holding a restore point (with memory) of the test
/// guest taken while it writes; the guest is then killed. Returns the repository and the id.
fn guest_backed_up(d: &Path) -> (PathBuf, String) {
    let repo = d.join("repo");
    json(pv(&repo).args(["init", "--encrypt"]));
    let mut vm = boot(d, true);
    vm.wait_progress(20);
    let b = json(
        pv(&repo)
            .args(["backup", "vm", "--memory", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    );
    vm.kill9();
    (repo, id_of(&b))
}

#[test]
fn an_instant_recovery_runs_before_its_disks_are_copied_and_keeps_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _lock = qemu_lock();
    let (repo, snap) = guest_backed_up(d);
    let mut cmd = vmkeep_std(&repo);
    cmd.env("VMKEEP_PASSWORD", PASS);
    let mut run = spawn_instant(cmd, &snap, &d.join("instant"));
    let during = run.runs_during_the_copy();
    run.copy_completes_and_keeps_the_writes(d, &during);
}

/// vmkeep killed (SIGKILL) mid-copy: QEMU holds the guest's reads of data not yet copied
/// (the overlays' reconnect delay) and the guest goes on; the same command run again takes
/// the VM over, serves the same sockets and finishes the copy. The guest never sees an I/O
/// error, and every SEQ it wrote is on the local disk.
#[test]
fn an_instant_recovery_whose_vmkeep_was_killed_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _lock = qemu_lock();
    let (repo, snap) = guest_backed_up(d);
    let target = d.join("instant");
    let mut cmd = vmkeep_std(&repo);
    cmd.env("VMKEEP_PASSWORD", PASS)
        .env("VMKEEP_COPY_RATE", "2M");
    let mut run = spawn_instant(cmd, &snap, &target);
    let during = run.runs_during_the_copy();
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let pid = run.start["pid"].as_u64().unwrap() as i32;
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "QEMU runs on");
    assert!(target.join(".instant/state.json").is_file());

    let mut cmd = vmkeep_std(&repo);
    cmd.env("VMKEEP_PASSWORD", PASS).env("VMKEEP_LOG", "info");
    let again = spawn_instant(cmd, &snap, &target);
    assert_eq!(again.start["taken_over"], true, "{}", again.start);
    assert_eq!(again.start["pid"], run.start["pid"]);
    again.copy_completes_and_keeps_the_writes(d, &during);
    assert!(
        !target.join(".instant").exists(),
        "its state goes with the copy"
    );
    // The killed vmkeep's copy job (its reads held while nothing served them) went on.
    let said = std::fs::read_to_string(target.with_extension("stderr")).unwrap();
    assert!(
        said.contains("adopting the fill job already running")
            || said.contains("adopting the copy job already running"),
        "{said}"
    );
}

/// The repository is behind `vmkeep serve`. In the middle of the copy the server stops
/// answering (SIGSTOP) for 3 s, which the HTTPS store's retries hide; then it is killed, and
/// restarted 8 s later, well past the client's retry window (2 s here): reads wait for it
/// (the VM's I/O pauses), the command says so and says when it is back, the copy completes,
/// and the guest never sees an I/O error or wrong data.
#[test]
fn an_instant_recovery_from_a_server_that_stalls_mid_copy_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let served = Served::start(&d.join("srv"));
    let url = served.url("main");
    let token = served.token("*", "admin");
    ok(served.client(&url, &token).args(["init", "--encrypt"]));
    let _lock = qemu_lock();
    let mut vm = boot(d, true);
    vm.wait_progress(20);
    let b = json(
        served
            .client(&url, &token)
            .args(["backup", "vm", "--memory", "--qmp"])
            .arg(&vm.qmp)
            .args(["--vm", "guest"]),
    );
    vm.kill9();
    let mut cmd = vmkeep_std_at(&bin(), Path::new(&url));
    // The outage below starts while the copy runs (see spawn_instant).
    cmd.env("VMKEEP_HTTP_RETRY_SECS", "2")
        .env("VMKEEP_COPY_RATE", "2M")
        .args(["--tls-fingerprint", &served.fingerprint])
        .env("VMKEEP_TOKEN", &token)
        .env("VMKEEP_PASSWORD", "served-test-passphrase");
    let mut run = spawn_instant(cmd, &id_of(&b), &d.join("instant"));
    let during = run.runs_during_the_copy();
    let pid = served.pid() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(std::time::Duration::from_secs(3));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let mut served = served;
    served.kill();
    std::thread::sleep(std::time::Duration::from_secs(8));
    served.restart();
    run.copy_completes_and_keeps_the_writes(d, &during);
    let said = std::fs::read_to_string(d.join("instant.stderr")).unwrap();
    assert!(
        said.contains("the repository does not answer")
            && said.contains("the VM's I/O on data not yet copied is paused")
            && said.contains("the repository answers again"),
        "{said}"
    );
}

/// A bad throttle is refused before anything starts: no folder, no QEMU.
#[test]
fn a_bad_copy_rate_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    json(pv(&repo).args(["init", "--encrypt"]));
    let target = dir.path().join("t");
    fails_with(
        pv(&repo)
            .env("VMKEEP_COPY_RATE", "fast")
            .args(["recover", "guest@latest", "--instant", "--target"])
            .arg(&target),
        &["VMKEEP_COPY_RATE=fast"],
    );
    assert!(!target.exists());
}
