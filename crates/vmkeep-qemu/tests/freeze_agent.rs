//! `--freeze on` against a real qemu-guest-agent in the test guest: the agent is found through
//! QMP, answers the sync, is asked to freeze right before the cut and to thaw right after, and
//! the backup is still an exact point-in-time cut.
//!
//! The guest gets the agent through a second initramfs appended to the cached one (the kernel
//! unpacks both; later files win): qemu-ga from the distribution's package with the host's
//! copies of its libraries, and an /init that starts it before the workload. Cached next to
//! the guest.

mod common;
mod live;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use common::{backup_vm, VmBackupOptions};
use live::*;
use vmkeep_qemu::capture::Freeze;
use vmkeep_repo::NoProgress;

/// The guest's initrd with qemu-ga appended (built once, cached beside the guest).
fn initrd_with_agent(guest: &Path) -> PathBuf {
    let out = guest.join("initrd-qga.gz");
    if out.exists() {
        return out;
    }
    for bin in ["apt-get", "dpkg-deb", "cpio", "gzip", "ldd"] {
        require(bin);
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let dl = run(Command::new("sh")
        .current_dir(w)
        .arg("-c")
        .arg("apt-get download qemu-guest-agent >/dev/null 2>&1 && ls *.deb"));
    let deb = w.join(dl.lines().next().expect("qemu-guest-agent .deb").trim());
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(w.join("x")));
    let ga = w.join("x/usr/sbin/qemu-ga");
    let root = w.join("root");
    std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
    std::fs::copy(&ga, root.join("usr/sbin/qemu-ga")).unwrap();
    // Its libraries and the loader, at the paths ldd shows (host copies).
    let libs = run(Command::new("ldd").arg(&ga));
    for l in libs.lines() {
        let path = l
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        let Some(path) = path else { continue };
        let dest = root.join(path.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&path, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", path.display()));
    }
    // The guest's /init with the agent started before the workload.
    let init = run(Command::new("sh").arg("-c").arg(format!(
        "gzip -dc {} | cpio -i --quiet --to-stdout init",
        guest.join("initrd.gz").display()
    )));
    let start = r#"mkdir -p /var/run /usr/local/var/run /var/log
for f in /sys/class/virtio-ports/*; do
  [ "$(cat $f/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${f##*/}
done
if [ -n "$port" ]; then
  /usr/sbin/qemu-ga -v -m virtio-serial -p "$port" -l /dev/ttyS0 -d -f /var/run/qga.pid \
    && echo "VMKEEP agent on $port" || echo "VMKEEP agent failed"
else
  echo "VMKEEP agent port missing"
fi
"#;
    let at = init.find("workload=idle").expect("init sets the workload");
    let new_init = format!("{}{start}{}", &init[..at], &init[at..]);
    std::fs::write(root.join("init"), new_init).unwrap();
    run(Command::new("chmod").arg("755").arg(root.join("init")));
    let overlay = w.join("overlay.gz");
    run(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | cpio -o -H newc --quiet | gzip -1 > {}",
        overlay.display()
    )));
    let mut bytes = std::fs::read(guest.join("initrd.gz")).unwrap();
    bytes.extend(std::fs::read(&overlay).unwrap());
    let tmp = guest.join(format!("initrd-qga.gz.{}", std::process::id()));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, &out).unwrap();
    out
}

#[test]
fn freeze_on_with_a_real_guest_agent() {
    let g = guest();
    let initrd = initrd_with_agent(&g);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disks = make_disks(d);
    let repo = repo(d);
    let qga = d.join("qga.sock");
    let extra: Vec<String> = [
        "-device",
        "virtio-serial-pci,id=vser0",
        "-chardev",
        &format!("socket,path={},server=on,wait=off,id=qga0", qga.display()),
        "-device",
        "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _lock = qemu_lock();
    let mut vm = boot_with(d, &disks, 0, Some(&initrd), Some(&g), &extra);
    vm.wait_progress(10);
    let log = || std::fs::read_to_string(d.join("serial0.log")).unwrap_or_default();
    assert!(log().contains("VMKEEP agent on"), "{}", log());
    let m = backup_vm(
        &repo,
        &VmBackupOptions {
            qmp: vm.qmp.clone(),
            vm: "guest".into(),
            freeze: Freeze::On,
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap_or_else(|e| panic!("{e}\nserial: {}", log()));
    let at = vm.progress();
    vm.wait_progress(at + 3); // the guest runs on after the thaw
    let text = log();
    vm.kill9();
    let freeze = text.find(r#""execute":"guest-fsfreeze-freeze""#);
    let thaw = text.find(r#""execute":"guest-fsfreeze-thaw""#);
    assert!(
        freeze.is_some() && thaw > freeze,
        "agent log: {}",
        text.lines()
            .filter(|l| !l.starts_with("C "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    check_cut(&repo, &m, &d.join("r"));
}
