//! A real libvirt for tests: the system's `libvirtd` and `virtlogd` (Debian's
//! libvirt-daemon-system, installed by scripts/install-deps.sh), started by the test itself
//! when none runs (machines without systemd) and stopped again at its end; and a TCG test
//! domain booting the test guest by direct kernel boot.
//!
//! libvirt runs QEMU as its own user (`libvirt-qemu`), which must reach the guest's kernel and
//! the images: a test domain lives in a folder opened to others (0711) with its own copy of the
//! kernel and initrd. Tests hold [`crate::vm::qemu_lock`] while a domain runs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::require;

const URI: &str = "qemu:///system";

/// `virsh -c qemu:///system ARGS...`; its output, or its error text.
pub fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| format!("run virsh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// `virsh` that must succeed.
pub fn virsh_ok(args: &[&str]) -> String {
    virsh(args).unwrap_or_else(|e| panic!("virsh {}: {e}", args.join(" ")))
}

/// libvirt's daemons for one test: started if none answered, stopped on drop if started here.
pub struct Libvirtd {
    started: Vec<(&'static str, PathBuf)>,
}

impl Libvirtd {
    pub fn ensure() -> Libvirtd {
        require("virsh");
        let mut started = Vec::new();
        if virsh(&["version"]).is_err() {
            for (daemon, pidfile) in [
                ("virtlogd", "/run/virtlogd.pid"),
                ("libvirtd", "/run/libvirtd.pid"),
            ] {
                let bin = PathBuf::from("/usr/sbin").join(daemon);
                assert!(
                    bin.exists(),
                    "{} is missing: run scripts/install-deps.sh (Debian: libvirt-daemon-system)",
                    bin.display()
                );
                let mut cmd = if daemon == "libvirtd" && Path::new("/dev/kvm").exists() {
                    // libvirtd probes QEMU with KVM whenever /dev/kvm exists, and nested KVM
                    // hangs here: each probe took 68 s until its timeout, and libvirt probes
                    // again at every `virsh define`. The test domains are TCG, so libvirtd
                    // (and the QEMUs it starts) get a mount namespace without /dev/kvm.
                    let mut c = Command::new("unshare");
                    c.args(["--mount", "--propagation", "private", "sh", "-c"])
                        .arg("mount --bind /dev/null /dev/kvm && exec \"$0\" \"$@\"")
                        .arg(&bin);
                    c
                } else {
                    Command::new(&bin)
                };
                let st = cmd
                    .args(["--daemon", "--pid-file", pidfile])
                    .status()
                    .expect("start a libvirt daemon");
                assert!(st.success(), "{daemon} --daemon failed: {st}");
                started.push((daemon, PathBuf::from(pidfile)));
            }
            let t0 = Instant::now();
            while virsh(&["version"]).is_err() {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "libvirtd never answered"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Libvirtd { started }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for (_, pidfile) in self.started.iter().rev() {
            let Some(pid) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: kill(2) with a pid the daemon wrote and a valid signal.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            crate::process::wait_gone(pid);
        }
    }
}

/// The test guest as a persistent libvirt domain (defined, started; destroyed and undefined
/// with its checkpoints on drop).
pub struct Domain {
    pub name: String,
    pub dir: PathBuf,
    pub serial: PathBuf,
}

impl Domain {
    /// Defines and starts domain `name` in `dir` booting `guest` (tests/guest/build.sh) with
    /// kernel command line `cmdline`, with the qcow2 `disks` as vda, vdb, ...
    pub fn start(dir: &Path, name: &str, guest: &Path, cmdline: &str, disks: &[PathBuf]) -> Domain {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        for f in ["vmlinuz", "initrd.gz"] {
            std::fs::copy(guest.join(f), dir.join(f)).expect("copy the guest");
        }
        let serial = dir.join(format!("{name}.serial.log"));
        let mut devices = String::new();
        for (i, d) in disks.iter().enumerate() {
            devices.push_str(&disk_xml(d, &format!("vd{}", (b'a' + i as u8) as char)));
        }
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{dir}/vmlinuz</kernel><initrd>{dir}/initrd.gz</initrd>
    <cmdline>{cmdline}</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{devices}    <serial type='file'><source path='{serial}' append='on'/><target port='0'/></serial>
    <console type='file'><source path='{serial}' append='on'/><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
",
            dir = dir.display(),
            serial = serial.display(),
        );
        let xml_path = dir.join(format!("{name}.xml"));
        std::fs::write(&xml_path, xml).unwrap();
        // A domain of an earlier, killed run of this test goes first.
        let _ = virsh(&["destroy", name]);
        let _ = virsh(&["undefine", name, "--checkpoints-metadata"]);
        virsh_ok(&["define", &xml_path.display().to_string()]);
        let d = Domain {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            serial,
        };
        virsh_ok(&["start", name]);
        d
    }

    /// The serial log so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// `virsh domjobinfo`'s job type (`None` when no job runs).
    pub fn job_type(&self) -> String {
        virsh_ok(&["domjobinfo", &self.name])
            .lines()
            .find_map(|l| l.strip_prefix("Job type:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    }

    /// The domain's checkpoint names, oldest first.
    pub fn checkpoints(&self) -> Vec<String> {
        virsh_ok(&["checkpoint-list", &self.name, "--name", "--topological"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The pid of the domain's QEMU.
    pub fn qemu_pid(&self) -> i32 {
        let pidfile = format!("/run/libvirt/qemu/{}.pid", self.name);
        std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("{pidfile}: {e}"))
            .trim()
            .parse()
            .expect("a pid")
    }
}

/// A `<disk>` element for a qcow2 image as target `dev`.
pub fn disk_xml(image: &Path, dev: &str) -> String {
    format!(
        "    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='{dev}' bus='virtio'/></disk>\n",
        image.display()
    )
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name, "--checkpoints-metadata"]);
    }
}
