//! `vmkeep verify` of a restore point taken from a libvirt domain (`backup vm --libvirt`): the
//! sandbox is a transient libvirt domain, since libvirt is what runs such a VM at the DR site
//! and its definition is libvirt's XML, not a QEMU command line.
//!
//! The sandbox, in a private temporary folder (`$TMPDIR/vmkeep-verify-lv-*`, also the
//! domain's name):
//! - the disks restored as qcow2 images (mode 0600: libvirt hands them to QEMU's user for the
//!   run and back afterwards). Not served instantly as `verify` does for its own QEMU: QEMU
//!   runs as libvirt's user and would need a way into vmkeep's NBD socket;
//! - the recorded definition rewritten as `recover --libvirt` does (vmkeep-qemu
//!   `recover::libvirt`), with the network cut off, no UUID (libvirt makes a new one), and
//!   consoles on a pseudo-terminal written to `serial.log` in the folder instead;
//! - defined, then started (cold) or resumed with `virsh restore` of a save image streamed
//!   from the repository (memory). Defined rather than transient so that libvirt still tells
//!   why it stopped (shut down, crashed, destroyed) once it has.
//!
//! Evidence comes from libvirt (`recover::libvirt_vitals`): the domain's state and reason, and
//! guest-agent pings through `virsh qemu-agent-command`. The domain is destroyed and undefined
//! when the run ends, whatever happened. If vmkeep is killed, the domain runs on (libvirt owns
//! it); the next `verify` removes every sandbox domain whose folder's lock is free.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmkeep_qemu::capture::libvirt::xml::parse_domain;
use vmkeep_qemu::capture::libvirt::{Virsh, DOMAIN_XML_STREAM, RUNNING_XML_STREAM};
use vmkeep_qemu::recover::evidence::{watch_for_life, Evidence};
use vmkeep_qemu::recover::libvirt::{self as lv, LibvirtRecovery};
use vmkeep_qemu::recover::libvirt_vitals::LibvirtVitals;
use vmkeep_repo::backup::MEMORY_STREAM;
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::verification::VerifyMode;
use vmkeep_repo::{Manifest, NoProgress, Repository, RestoreOptions};

use super::recover_libvirt::read_text;
use super::verify::{evidence, path_str, Run};
use crate::args::VerifyArgs;
use crate::scratch::{self, ScratchDir};

/// The sandbox folders' prefix, and the sandbox domains'.
const PREFIX: &str = "vmkeep-verify-lv-";

/// Whether the restore point is a libvirt domain's (verified under libvirt).
pub fn is_libvirt(m: &Manifest) -> bool {
    let has = |n: &str| m.streams.iter().any(|s| s.name == n);
    has(DOMAIN_XML_STREAM) && !has(vmkeep_qemu::vmdef::DEFINITION_STREAM)
}

/// Removes the sandbox domain when the run ends.
struct Remove<'a>(&'a Virsh);

impl Drop for Remove<'_> {
    fn drop(&mut self) {
        remove_domain(self.0);
    }
}

/// Stops (if it runs) and undefines a sandbox domain.
fn remove_domain(virsh: &Virsh) {
    if let Err(e) = virsh.domain_cmd("destroy", &[]) {
        tracing::debug!(error = %e, "sandbox domain not destroyed (not running?)");
    }
    if let Err(e) = virsh.domain_cmd("undefine", &["--nvram"]) {
        tracing::warn!(error = %e, domain = %virsh.domain, "sandbox domain not undefined");
    }
}

pub(super) fn sandbox(
    repo: &Arc<Repository>,
    index: &BlobIndex,
    m: &Manifest,
    a: &VerifyArgs,
    mode: VerifyMode,
    serial: Option<&regex::Regex>,
    started: Instant,
) -> Result<Run> {
    if a.qemu.is_some() {
        bail!("--qemu does not apply to a libvirt restore point: libvirt picks the emulator");
    }
    let domain_type = match a.accel.as_deref() {
        None => None,
        Some("tcg") => Some("qemu".to_string()),
        Some("kvm") => Some("kvm".to_string()),
        Some(other) => bail!("--accel {other}: a libvirt domain runs with tcg or kvm"),
    };
    let resume = mode == VerifyMode::Resume;
    let inactive = read_text(repo, index, m, DOMAIN_XML_STREAM)?;
    let running = match resume {
        true => Some(read_text(repo, index, m, RUNNING_XML_STREAM).context(
            "the restore point has memory but not the running domain's definition it belongs to",
        )?),
        false => None,
    };
    let recorded = parse_domain(&inactive)?;
    sweep_dead_domains(a.connect.as_deref());
    // Removed when this returns (the domain is destroyed before); after a kill, by the next
    // verify (sweep_dead_domains, then ScratchDir's own sweep).
    let dir = ScratchDir::create(PREFIX).context("creating the sandbox folder")?;
    let name = dir
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("the sandbox folder has no name")?;
    let target = dir.path().join("vm");
    std::fs::create_dir(&target).with_context(|| format!("create {}", target.display()))?;
    // QEMU runs as libvirt's user: it must get through the folders (libvirt labels the files).
    for d in [dir.path(), &target] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("open {} to libvirt's QEMU", d.display()))?;
    }
    let opts = RestoreOptions {
        target: target.clone(),
        disk: None,
    };
    super::restore::restore_qcow2(repo, index, m, &opts, &NoProgress)?;
    let mut disks = BTreeMap::new();
    for d in &m.disks {
        let path = target.join(format!("{}.qcow2", d.name));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("make {} private", path.display()))?;
        disks.insert(d.name.clone(), path);
    }
    let place = LibvirtRecovery {
        name: name.clone(),
        uuid: None,
        dir: target.clone(),
        disks,
        network: false,
        domain_type,
        console_to_file: true,
    };
    let virsh = Virsh::new(a.connect.clone(), name.clone());
    let uuid = lv::define(&virsh, &target, &lv::rewrite_domain(&inactive, &place)?)
        .context("libvirt could not define the sandbox domain")?;
    let _remove = Remove(&virsh);
    match &running {
        None => {
            virsh
                .domain_cmd("start", &[])
                .context("libvirt could not start the sandbox domain")?;
        }
        Some(xml) => {
            let place = LibvirtRecovery {
                uuid: Some(uuid),
                ..place
            };
            let head = lv::save_image_header(&lv::rewrite_domain(xml, &place)?, true);
            lv::restore_streamed(&virsh, head, |w| {
                repo.read_stream_with(index, m, MEMORY_STREAM, w, &NoProgress)
                    .map(drop)
                    .map_err(std::io::Error::other)
            })
            .context("the memory state did not load")?;
        }
    }
    let serial_log = target.join("serial.log");
    let mut env = vec![
        ("VMKEEP_SERIAL".to_string(), path_str(&serial_log)),
        ("VMKEEP_SNAPSHOT".to_string(), m.id.to_hex()),
        ("VMKEEP_VM".to_string(), m.vm.clone()),
        ("VMKEEP_DOMAIN".to_string(), name.clone()),
    ];
    if let Some(uri) = &a.connect {
        env.push(("VMKEEP_CONNECT".to_string(), uri.clone()));
    }
    let evidence: Evidence = evidence(
        a,
        serial,
        recorded.agent && !a.no_agent,
        env,
        &dir.path().join("probe.log"),
        resume,
    );
    let deadline = started + Duration::from_secs(a.timeout);
    let mut vitals = LibvirtVitals::new(virsh.clone());
    let verdict = watch_for_life(&mut vitals, &serial_log, &evidence, deadline);
    let seconds = started.elapsed().as_secs_f64();
    let screenshot = screenshot(&virsh, &dir.path().join("screen"));
    Ok(Run {
        verdict,
        seconds,
        screenshot,
    })
}

/// The console as a PNG, when the domain has a display and libvirt gives PNG (libvirt 9.0
/// does, into the file named).
fn screenshot(virsh: &Virsh, path: &Path) -> Option<Vec<u8>> {
    if let Err(e) = virsh.domain_cmd("screenshot", &[&path_str(path)]) {
        tracing::debug!(error = %e, "no screenshot");
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    bytes.starts_with(b"\x89PNG").then_some(bytes)
}

/// Removes the sandbox domains of verify runs that died (their folder's lock is free, or the
/// folder is gone). A domain whose folder is locked belongs to a verify still running.
fn sweep_dead_domains(connect: Option<&str>) {
    let lister = Virsh::new(connect.map(str::to_string), String::new());
    let Ok(names) = lister.run(&["list", "--all", "--name"]) else {
        return;
    };
    let tmp = std::env::temp_dir();
    for name in names
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(PREFIX))
    {
        if scratch::is_dead(&tmp.join(name)) {
            tracing::info!(domain = name, "removing a killed verify's sandbox domain");
            remove_domain(&Virsh::new(connect.map(str::to_string), name));
        }
    }
}
