//! The VM definition and the QEMU side of recovery, against real QEMU and the test guest:
//! a definition captured from a running VM (a `-blockdev` and a `-drive` disk, kernel and
//! initrd), a cold boot of the rewritten VM in a new folder, a resume from states captured
//! paused and running (the guest's counter continues, no boot banner), failing loads and
//! starts that leave no QEMU behind, and refusals of QEMUs that cannot load the state.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use vmkeep_qemu::qmp::QmpClient;
use vmkeep_qemu::recover::{
    self, check_loadable, check_qemu, rewrite, start_qemu, RecoveryPlan, StartMode,
};
use vmkeep_qemu::vmdef::{
    capture_definition, ArgsOrigin, ArgsSource, QemuVersion, VmDefinition, DEFINITION_VERSION,
};
use vmkeep_testkit::guest::{
    check_two_disk_cut, counters, guest, make_filled_disks, two_disk_vm, wait_serial_log,
};
use vmkeep_testkit::vm::PROGRESS_TIMEOUT;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn capture(vm: &Vm, source: &ArgsSource) -> VmDefinition {
    runtime().block_on(async {
        let q = QmpClient::connect(&vm.qmp).await.unwrap();
        let d = capture_definition(&q, source).await.unwrap();
        q.close().await;
        d
    })
}

/// The installed QEMU's version, from its own `--version`.
fn installed_version() -> QemuVersion {
    let out = run(Command::new(require("qemu-system-x86_64")).arg("--version"));
    QemuVersion::find_in(&out).expect("a version in qemu --version")
}

/// The `C i` numbers of a serial log, in order.
/// Processes (other than this test) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(raw) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&raw).contains(needle) {
                out.push(pid);
            }
        }
    }
    out
}

/// Puts copies of the disks (`images[name]`, converted to qcow2) and boot files where the plan
/// wants them.
fn materialize(def: &VmDefinition, plan: &RecoveryPlan, images: &[(&str, &Path)]) {
    std::fs::create_dir_all(&plan.target_dir).unwrap();
    for (name, src) in images {
        run(Command::new(require("qemu-img"))
            .args(["convert", "-U", "-O", "qcow2"])
            .arg(src)
            .arg(&plan.disks[*name]));
    }
    for b in &def.boot_files {
        std::fs::copy(&b.host_path, &plan.boot_files[&b.role]).unwrap();
    }
}

/// Migrates the VM's state into `file` (background snapshot: the VM keeps its run state).
fn save_state(vm: &Vm, file: &Path) {
    let mut q = vm.connect();
    q.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [
            { "capability": "background-snapshot", "state": true },
            { "capability": "events", "state": true } ] }),
    );
    q.execute(
        "migrate",
        json!({ "uri": format!("file:{}", file.display()) }),
    );
    let start = Instant::now();
    loop {
        let m = q.execute("query-migrate", Value::Null);
        match m["status"].as_str() {
            Some("completed") => return,
            Some("failed") => panic!("migration failed: {m}"),
            _ => {}
        }
        assert!(
            start.elapsed() < PROGRESS_TIMEOUT,
            "migration did not end: {m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn captures_the_definition_of_a_running_vm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disks = make_filled_disks(d);
    let g = guest();
    let _lock = qemu_lock();
    let mut vm = two_disk_vm(d, &disks, "").seqwrite(&g, None).boot();
    vm.wait_progress(1);
    let def = capture(&vm, &ArgsSource::QmpPeer);

    let v = installed_version();
    assert_eq!(def.version, DEFINITION_VERSION);
    assert_eq!(def.qemu, v);
    // The default machine `pc` resolved to the versioned type this QEMU pins it to.
    assert_eq!(def.machine, format!("pc-i440fx-{}.{}", v.major, v.minor));
    assert_eq!(def.arch, "x86_64");
    assert_eq!(def.ram_bytes, 256 << 20);
    assert_eq!(
        def.args_source,
        ArgsOrigin::Process {
            pid: vm.qemu.0.id()
        }
    );
    let real = std::fs::canonicalize(require("qemu-system-x86_64")).unwrap();
    assert_eq!(def.binary.as_deref(), Some(real.to_str().unwrap()));
    assert_eq!(def.args[..2], ["-accel", "tcg"]);

    assert_eq!(def.disks.len(), 2, "{:?}", def.disks);
    let (vd0, drive1) = (def.disk("vd0").unwrap(), def.disk("drive1").unwrap());
    assert_eq!(
        (
            vd0.name.as_str(),
            vd0.node.as_str(),
            vd0.drive_id.as_deref(),
            vd0.device_id.as_deref()
        ),
        ("vd0", "disk0", None, Some("vd0"))
    );
    assert_eq!(
        vd0.qdev.as_deref(),
        Some("/machine/peripheral/vd0/virtio-backend")
    );
    assert_eq!(vd0.image.as_deref(), disks[0].to_str());
    assert_eq!((vd0.format.as_str(), vd0.size), ("qcow2", 32 << 20));
    assert_eq!(
        (
            drive1.name.as_str(),
            drive1.drive_id.as_deref(),
            drive1.device_id.as_deref()
        ),
        ("drive1", Some("drive1"), None)
    );
    assert!(drive1.node.starts_with('#'), "{}", drive1.node);
    assert_eq!(drive1.image.as_deref(), disks[1].to_str());
    assert!(vd0.on_command_line && drive1.on_command_line);

    let roles: Vec<(&str, &str, Option<u64>)> = def
        .boot_files
        .iter()
        .map(|b| (b.role.as_str(), b.host_path.as_str(), b.size))
        .collect();
    let size = |p: &Path| Some(std::fs::metadata(p).unwrap().len());
    let (kernel, initrd) = (g.join("vmlinuz"), g.join("initrd.gz"));
    assert_eq!(
        roles,
        [
            ("kernel", kernel.to_str().unwrap(), size(&kernel)),
            ("initrd", initrd.to_str().unwrap(), size(&initrd)),
        ]
    );
    assert_eq!(VmDefinition::from_json(&def.to_json()).unwrap(), def);

    // The same VM described by a --vm-config file: one argument per line, program first.
    let lines = d.join("vm.args");
    let mut text = format!("{}\n", real.display());
    for a in &def.args {
        text.push_str(a);
        text.push('\n');
    }
    std::fs::write(&lines, text).unwrap();
    let from_file = capture(&vm, &ArgsSource::File(lines.clone()));
    assert_eq!(
        from_file.args_source,
        ArgsOrigin::File {
            path: lines.display().to_string()
        }
    );
    assert_eq!(
        (&from_file.disks, &from_file.boot_files),
        (&def.disks, &def.boot_files)
    );

    // A JSON array whose kernel path is relative: resolved against the file's folder.
    std::fs::copy(&kernel, d.join("vmlinuz-copy")).unwrap();
    let mut args = def.args.clone();
    let k = args.iter().position(|a| a == "-kernel").unwrap();
    args[k + 1] = "vmlinuz-copy".into();
    let json_file = d.join("vm.json");
    std::fs::write(&json_file, serde_json::to_string(&args).unwrap()).unwrap();
    let rel = capture(&vm, &ArgsSource::File(json_file));
    assert_eq!(rel.binary, None);
    let kernel_file = &rel.boot_files[0];
    assert_eq!(
        (
            kernel_file.path.as_str(),
            kernel_file.host_path.as_str(),
            kernel_file.size
        ),
        (
            "vmlinuz-copy",
            d.join("vmlinuz-copy").to_str().unwrap(),
            size(&kernel)
        )
    );
    vm.quit();
}

#[test]
fn a_recovered_vm_boots_cold_in_a_new_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disks = make_filled_disks(d);
    let g = guest();
    let _lock = qemu_lock();
    let mut vm = two_disk_vm(d, &disks, "").seqwrite(&g, None).boot();
    vm.wait_progress(2);
    let def = capture(&vm, &ArgsSource::QmpPeer);
    let old_serial = vm.log.clone();
    vm.quit();
    let old_serial_len = std::fs::metadata(&old_serial).unwrap().len();

    let plan = RecoveryPlan::in_dir(&def, &d.join("new"), StartMode::Cold);
    materialize(&def, &plan, &[("vd0", &disks[0]), ("drive1", &disks[1])]);
    let qemu = recover::qemu_binary(&def, None);
    check_qemu(&qemu, &def, StartMode::Cold).unwrap();
    let argv = rewrite(&def, &plan).unwrap();
    let old_dir = d.to_str().unwrap();
    let new_dir = plan.target_dir.to_str().unwrap();
    for a in &argv {
        assert!(
            !a.contains(old_dir) || a.contains(new_dir),
            "the old place is still named: {a} in {argv:?}"
        );
    }
    let vm2 = start_qemu(&qemu, &argv, &plan).unwrap();
    let text = wait_serial_log(&plan.serial_log, "a boot and the workload", |t| {
        t.contains("VMKEEP READY") && counters(t).iter().any(|&c| c >= 2)
    });
    assert_eq!(
        counters(&text)[0],
        0,
        "a cold boot starts the workload again: {text}"
    );
    let blocks = vm2.block_on(vm2.qmp().query_block()).unwrap();
    let mut files: Vec<String> = blocks
        .iter()
        .filter_map(|b| b.inserted.as_ref().map(|i| i.file.clone()))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            plan.disks["drive1"].display().to_string(),
            plan.disks["vd0"].display().to_string()
        ]
    );
    assert_eq!(
        std::fs::metadata(&old_serial).unwrap().len(),
        old_serial_len
    );
    let pid = vm2.pid();
    vm2.shut_down();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn a_recovered_vm_resumes_where_it_was_captured() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disks = make_filled_disks(d);
    let g = guest();
    let _lock = qemu_lock();
    let mut vm = two_disk_vm(d, &disks, "").seqwrite(&g, None).boot();
    vm.wait_progress(5);

    // A state captured while the guest runs (restores running) ...
    let running_state = d.join("running.state");
    let k_before = vm.progress();
    save_state(&vm, &running_state);
    let k_after = vm.progress();
    vm.wait_progress(k_after + 3);
    // ... and one captured paused, with the disks copied at that same instant.
    vm.execute("stop", Value::Null);
    let paused_state = d.join("paused.state");
    let serial_at_stop = vm.serial();
    save_state(&vm, &paused_state);
    let snap = d.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let snap_disks = [snap.join("vd0.qcow2"), snap.join("drive1.qcow2")];
    for (src, dst) in disks.iter().zip(&snap_disks) {
        run(Command::new(require("qemu-img"))
            .args(["convert", "-U", "-O", "qcow2"])
            .arg(src)
            .arg(dst));
    }
    let def = capture(&vm, &ArgsSource::QmpPeer);
    vm.quit();

    let qemu = recover::qemu_binary(&def, None);
    check_loadable(&qemu, &def).unwrap();
    let images = [
        ("vd0", snap_disks[0].as_path()),
        ("drive1", snap_disks[1].as_path()),
    ];

    // Paused capture: comes up paused, we `cont`, the counter goes on from the stop.
    let plan = RecoveryPlan::in_dir(&def, &d.join("resumed-paused"), StartMode::Resume);
    materialize(&def, &plan, &images);
    let mut vm2 = start_qemu(&qemu, &rewrite(&def, &plan).unwrap(), &plan).unwrap();
    let report = vm2
        .load_state(std::fs::File::open(&paused_state).unwrap())
        .unwrap();
    assert!(report.resumed_by_cont);
    assert_eq!(
        report.bytes,
        std::fs::metadata(&paused_state).unwrap().len()
    );
    assert!(vm2.block_on(vm2.qmp().query_status()).unwrap().running);
    let text = wait_serial_log(&plan.serial_log, "the counter", |t| counters(t).len() >= 10);
    assert!(
        !text.contains("VMKEEP READY"),
        "the guest booted again: {text}"
    );
    // The console goes on exactly where it stopped, even mid-line: old log + new log count
    // 0, 1, 2, ... without a gap or a repeat.
    let all = counters(&format!("{serial_at_stop}{text}"));
    assert!(
        all.iter().copied().eq(0..all.len() as i64),
        "the counter does not continue: before the capture {:?}, after it {text:?}",
        serial_at_stop.lines().rev().take(3).collect::<Vec<_>>()
    );
    assert!(all.len() > counters(&serial_at_stop).len() + 9);
    let last = *all.last().unwrap();
    vm2.shut_down();
    // The disks hold exactly the writes up to now: the copy at the stop plus what followed.
    let vd0 = raw_content(&plan.disks["vd0"], d);
    let drive1 = raw_content(&plan.disks["drive1"], d);
    let (ka, _) = check_two_disk_cut(&vd0, &drive1);
    assert!(ka >= last, "disk K {ka} behind the last counter {last}");

    // Running capture: comes up running by itself.
    let plan = RecoveryPlan::in_dir(&def, &d.join("resumed-running"), StartMode::Resume);
    materialize(&def, &plan, &images);
    let mut vm3 = start_qemu(&qemu, &rewrite(&def, &plan).unwrap(), &plan).unwrap();
    let report = vm3
        .load_state(std::fs::File::open(&running_state).unwrap())
        .unwrap();
    assert!(!report.resumed_by_cont);
    let text = wait_serial_log(&plan.serial_log, "the counter", |t| !counters(t).is_empty());
    // The first whole line after the capture instant (a line cut in the middle by the capture
    // is completed first).
    let first = counters(&text)[0];
    assert!(
        (k_before..=k_after + 2).contains(&first),
        "first counter {first} after a capture between {k_before} and {k_after}: {text}"
    );
    assert!(
        !text.contains("VMKEEP READY"),
        "the guest booted again: {text}"
    );
    // Detached, it runs on without us (as after `vmkeep recover` exits).
    let pid = vm3.detach();
    std::thread::sleep(Duration::from_millis(300));
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let mut q = vmkeep_testkit::qmp::Qmp::connect(&plan.qmp_socket);
    assert_eq!(q.execute("query-status", Value::Null)["status"], "running");
    let _ = q.try_execute("quit", Value::Null);
    let start = Instant::now();
    while !processes_mentioning(plan.target_dir.to_str().unwrap()).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the detached QEMU did not quit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A definition of a diskless VM for the current QEMU (no guest needed).
fn small_definition() -> VmDefinition {
    let v = installed_version();
    VmDefinition {
        version: DEFINITION_VERSION,
        qemu: v,
        qemu_package: String::new(),
        binary: None,
        arch: "x86_64".into(),
        machine: format!("pc-i440fx-{}.{}", v.major, v.minor),
        ram_bytes: 64 << 20,
        args: ["-accel", "tcg", "-nodefaults", "-m", "64"]
            .map(String::from)
            .to_vec(),
        args_source: ArgsOrigin::File {
            path: "test".into(),
        },
        disks: vec![],
        boot_files: vec![],
    }
}

/// A reader that gives the first `left` bytes of `inner`, then fails.
struct FailingReader<R> {
    inner: R,
    left: usize,
}

impl<R: Read> Read for FailingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("repository chunk damaged"));
        }
        let n = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..n])?;
        self.left -= n;
        Ok(n)
    }
}

#[test]
fn failing_starts_and_loads_leave_no_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let def = small_definition();
    let qemu = require("qemu-system-x86_64");
    let _lock = qemu_lock();

    // Garbage instead of a migration stream: QEMU says so, and is gone.
    let plan = RecoveryPlan::in_dir(&def, &d.join("garbage"), StartMode::Resume);
    std::fs::create_dir(&plan.target_dir).unwrap();
    let mut vm = start_qemu(&qemu, &rewrite(&def, &plan).unwrap(), &plan).unwrap();
    let pid = vm.pid();
    let e = vm
        .load_state(&b"this is not a migration stream"[..])
        .unwrap_err()
        .to_string();
    assert!(e.contains("loading the state failed"), "{e}");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} left running"
    );
    // The connection is gone: closed, or (when the command is sent before the reader saw
    // the end) a broken pipe.
    let e = vm.block_on(vm.qmp().query_status()).unwrap_err();
    assert!(
        matches!(
            &e,
            vmkeep_qemu::Error::QmpClosed { .. } | vmkeep_qemu::Error::Io { .. }
        ),
        "{e}"
    );
    drop(vm);

    // The source fails mid-stream: its error is the one reported. A real state first (of
    // this VM in its firmware: no guest needed).
    let plan = RecoveryPlan::in_dir(&def, &d.join("source"), StartMode::Cold);
    std::fs::create_dir(&plan.target_dir).unwrap();
    let vm = start_qemu(&qemu, &rewrite(&def, &plan).unwrap(), &plan).unwrap();
    let state = d.join("small.state");
    vm.block_on(async {
        let mut events = vm.qmp().events();
        vm.qmp()
            .migrate_set_capabilities(&[("events", true)])
            .await
            .unwrap();
        vm.qmp()
            .migrate(&format!("file:{}", state.display()))
            .await
            .unwrap();
        events
            .wait_for(
                "MIGRATION",
                |e| e.data["status"] == "completed",
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    });
    vm.shut_down();
    let size = std::fs::metadata(&state).unwrap().len() as usize;
    let plan = RecoveryPlan::in_dir(&def, &d.join("source"), StartMode::Resume);
    let mut vm = start_qemu(&qemu, &rewrite(&def, &plan).unwrap(), &plan).unwrap();
    let pid = vm.pid();
    let source = FailingReader {
        inner: std::fs::File::open(&state).unwrap(),
        left: size / 2,
    };
    let e = vm.load_state(source).unwrap_err().to_string();
    assert!(
        e.contains("reading the state failed: repository chunk damaged"),
        "{e}"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} left running"
    );
    drop(vm);

    // QEMU refuses its command line: the error quotes its log.
    let plan = RecoveryPlan::in_dir(&def, &d.join("bad-args"), StartMode::Resume);
    std::fs::create_dir(&plan.target_dir).unwrap();
    let mut argv = rewrite(&def, &plan).unwrap();
    argv.extend(["-device".into(), "no-such-device-model".into()]);
    let e = start_qemu(&qemu, &argv, &plan).unwrap_err().to_string();
    assert!(e.contains("QEMU exited"), "{e}");
    assert!(
        e.contains("no-such-device-model"),
        "the log's tail is quoted: {e}"
    );

    // Dropping a RunningQemu that was not detached stops its QEMU.
    let plan = RecoveryPlan::in_dir(&def, &d.join("dropped"), StartMode::Cold);
    std::fs::create_dir(&plan.target_dir).unwrap();
    let vm = start_qemu(&qemu, &rewrite(&def, &plan).unwrap(), &plan).unwrap();
    let pid = vm.pid();
    drop(vm);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} left running"
    );
    assert_eq!(processes_mentioning(d.to_str().unwrap()), Vec::<u32>::new());
}

/// A script that claims to be QEMU 7.2.0 without today's machine types, and otherwise runs
/// the real QEMU.
fn old_qemu_wrapper(dir: &Path) -> PathBuf {
    let real = require("qemu-system-x86_64");
    let script = dir.join("qemu-system-x86_64");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             if [ \"$1\" = --version ]; then echo 'QEMU emulator version 7.2.0 (wrapper)'; exit 0; fi\n\
             if [ \"$1\" = -machine ] && [ \"$2\" = help ]; then\n\
             printf 'Supported machines are:\\npc                   Standard PC (alias of pc-i440fx-7.2)\\npc-i440fx-7.2        Standard PC (default)\\n'; exit 0; fi\n\
             exec {} \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// QEMU 7.2 from Debian bookworm (`apt-get download`, `dpkg-deb -x`), cached; `Err` with the
/// reason when it cannot be had.
fn bookworm_qemu() -> Result<PathBuf, String> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or("no cache folder (HOME unset)")?
        .join("vmkeep-qemu-7.2");
    let bin = cache.join("root/usr/bin/qemu-system-x86_64");
    if bin.is_file() {
        return Ok(bin);
    }
    let madison = Command::new("apt-cache")
        .args(["madison", "qemu-system-x86"])
        .output()
        .map_err(|e| format!("apt-cache: {e}"))?;
    let text = String::from_utf8_lossy(&madison.stdout);
    let version = text
        .lines()
        .filter_map(|l| l.split('|').nth(1).map(str::trim))
        .find(|v| v.starts_with("1:7.2"))
        .ok_or_else(|| format!("no QEMU 7.2 in the package index: {text}"))?
        .to_owned();
    let work = cache.join("download");
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let dl = Command::new("apt-get")
        .args(["download", &format!("qemu-system-x86={version}")])
        .current_dir(&work)
        .output()
        .map_err(|e| format!("apt-get: {e}"))?;
    if !dl.status.success() {
        return Err(format!(
            "apt-get download failed: {}",
            String::from_utf8_lossy(&dl.stderr)
        ));
    }
    let deb = std::fs::read_dir(&work)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or("apt-get download left no .deb")?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(cache.join("root")));
    Ok(bin)
}

#[test]
fn a_qemu_that_cannot_load_the_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let def = small_definition();
    let real = require("qemu-system-x86_64");
    let _lock = qemu_lock();

    let info = check_loadable(&real, &def).unwrap();
    assert_eq!(info.version, def.qemu);
    assert!(info.machines.contains(&def.machine));

    let wrapper = old_qemu_wrapper(dir.path());
    let e = check_loadable(&wrapper, &def).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "QEMU 7.2.0 at {} cannot load a state saved by QEMU {} with machine {}: that machine \
             type is unknown to it; use a QEMU >= {}.{} (--qemu BINARY)",
            wrapper.display(),
            def.qemu,
            def.machine,
            def.qemu.major,
            def.qemu.minor
        )
    );
    let e = check_qemu(&wrapper, &def, StartMode::Cold)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot boot the VM recorded by QEMU"), "{e}");

    let mut arm = def.clone();
    arm.arch = "aarch64".into();
    arm.machine = "virt-10.0".into();
    let e = check_loadable(&real, &arm).unwrap_err().to_string();
    assert!(
        e.ends_with(
            "it emulates x86_64, the VM is aarch64; use qemu-system-aarch64 (--qemu BINARY)"
        ),
        "{e}"
    );

    let e = check_loadable(&dir.path().join("no-qemu-here"), &def)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot run QEMU"), "{e}");

    match bookworm_qemu() {
        Err(reason) => eprintln!("SKIPPED the QEMU 7.2 check: {reason}"),
        Ok(old) => {
            let e = check_loadable(&old, &def).unwrap_err().to_string();
            assert!(e.starts_with("QEMU 7.2."), "{e}");
            assert!(
                e.ends_with(&format!(
                    "with machine {}: that machine type is unknown to it; use a QEMU >= {}.{} \
                     (--qemu BINARY)",
                    def.machine, def.qemu.major, def.qemu.minor
                )),
                "{e}"
            );
        }
    }
}

/// Starts `args` (plus a QMP socket in `dir`) as the "original" VM, captures its definition
/// and its state (stopped first), and stops it.
fn original_vm(qemu: &Path, dir: &Path, args: &[&str]) -> (VmDefinition, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let plan = RecoveryPlan {
        target_dir: dir.to_path_buf(),
        disks: Default::default(),
        boot_files: Default::default(),
        qmp_socket: dir.join("qmp.sock"),
        serial_log: dir.join("serial.log"),
        qemu_log: dir.join("qemu.log"),
        network: true,
        mode: StartMode::Cold,
        accel: None,
        instant: false,
        probe_qmp: None,
        die_with_parent: false,
    };
    let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    argv.extend(["-display", "none", "-qmp"].map(String::from));
    argv.push(format!(
        "unix:{},server=on,wait=off",
        plan.qmp_socket.display()
    ));
    let vm = start_qemu(qemu, &argv, &plan).unwrap();
    let state = dir.join("state");
    let def = vm.block_on(async {
        let q = vm.qmp();
        let def = capture_definition(q, &ArgsSource::QmpPeer).await.unwrap();
        let mut events = q.events();
        q.stop().await.unwrap();
        q.migrate_set_capabilities(&[("events", true)])
            .await
            .unwrap();
        q.migrate(&format!("file:{}", state.display()))
            .await
            .unwrap();
        events
            .wait_for(
                "MIGRATION",
                |e| e.data["status"] == "completed",
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        def
    });
    vm.shut_down();
    (def, state)
}

#[test]
fn cut_off_networks_and_moved_chardevs_still_load_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let qemu = require("qemu-system-x86_64");
    let _lock = qemu_lock();
    let sock = d.join("old-agent.sock");
    let sock = format!(
        "socket,id=charchannel0,path={},server=on,wait=off",
        sock.display()
    );
    let configs: [(&str, Vec<&str>); 2] = [
        // QEMU's defaults: a NIC on user networking, a serial port, a monitor, VGA.
        ("defaults", vec!["-accel", "tcg", "-m", "64"]),
        (
            "explicit",
            vec![
                "-accel",
                "tcg",
                "-m",
                "64",
                "-nodefaults",
                "-netdev",
                "user,id=n0,hostfwd=tcp:127.0.0.1:0-:22",
                "-device",
                "virtio-net-pci,netdev=n0,id=net0",
                "-nic",
                "user,model=e1000",
                "-netdev",
                "socket,id=n2,udp=127.0.0.1:40001,localaddr=127.0.0.1:40002",
                "-device",
                "rtl8139,netdev=n2,id=net2",
                "-chardev",
                "pty,id=charserial0",
                "-device",
                r#"{"driver":"isa-serial","chardev":"charserial0","id":"serial0"}"#,
                "-chardev",
                &sock,
                "-device",
                "virtio-serial-pci,id=vser0",
                "-device",
                "virtserialport,chardev=charchannel0,id=channel0,name=org.qemu.guest_agent.0",
            ],
        ),
    ];
    for (tag, args) in configs {
        let (def, state) = original_vm(&qemu, &d.join(format!("{tag}-original")), &args);
        let plan = RecoveryPlan::in_dir(&def, &d.join(tag), StartMode::Resume);
        std::fs::create_dir_all(&plan.target_dir).unwrap();
        let argv = rewrite(&def, &plan).unwrap();
        let mut vm = start_qemu(&qemu, &argv, &plan).unwrap();
        let report = vm
            .load_state(std::fs::File::open(&state).unwrap())
            .unwrap_or_else(|e| panic!("{tag}: {e}\n{argv:?}"));
        assert!(report.resumed_by_cont, "{tag}");
        let usernet = vm
            .block_on(vm.qmp().execute(
                "human-monitor-command",
                json!({ "command-line": "info usernet" }),
            ))
            .unwrap();
        let usernet = usernet.as_str().unwrap_or_default().to_owned();
        assert!(!usernet.contains("HOST_FORWARD"), "{tag}: {usernet}");
        if tag == "explicit" {
            // The user backend is still there (its state loaded), without the forward.
            assert!(usernet.contains("(n0)"), "{tag}: {usernet}");
            assert!(plan.target_dir.join("chardev-charchannel0.sock").exists());
        }
        vm.shut_down();
    }
    assert_eq!(processes_mentioning(d.to_str().unwrap()), Vec::<u32>::new());
}
