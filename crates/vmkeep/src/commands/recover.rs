//! `vmkeep recover SNAP --target DIR [--cold]`: the VM of a restore point running again.
//!
//! Order matters for "refuse clearly, leave nothing": the definition is read and the QEMU at
//! hand checked (version, machine type, architecture) before anything is written; then the
//! disks (qcow2) and boot files go into DIR; then QEMU starts in the background on the
//! rewritten command line and, unless `--cold`, the memory state streams from the repository
//! straight into QEMU (no temporary file) and the VM resumes. Any failure after QEMU started
//! stops it (vmkeep_qemu::recover).
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::json;
use vmkeep_qemu::recover::{self, RecoveryPlan, StartMode};
use vmkeep_qemu::vmdef::{VmDefinition, DEFINITION_MAX_BYTES, DEFINITION_STREAM};
use vmkeep_repo::backup::MEMORY_STREAM;
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::{Manifest, NoProgress, Progress, Repository, RestoreOptions};

use super::instant::InstantDisks;
use crate::args::{Global, RecoverArgs};
use crate::context::open_repo;
use crate::output::{print_json, print_line};
use crate::progress::Bars;

pub fn run(g: &Global, a: &RecoverArgs) -> Result<u8> {
    // A throttle for instant recovery's copy, so it does not take all of the repository's
    // bandwidth; checked before anything starts.
    let copy_rate = match std::env::var("VMKEEP_COPY_RATE") {
        Ok(v) => Some(
            crate::size::parse_size(&v)
                .map_err(|e| anyhow::anyhow!("VMKEEP_COPY_RATE={v}: {e}"))?,
        ),
        Err(_) => None,
    };
    let repo = Arc::new(open_repo(g)?);
    // Held until the disks are written (or copied, --instant): a prune meanwhile keeps what
    // the restore point references.
    let _lease = repo.read_lease();
    let m = repo.resolve(&a.snapshot)?;
    // Loaded once for every stream and disk read below (each load lists the repository).
    let index = BlobIndex::load(&repo)?;
    if a.libvirt {
        return super::recover_libvirt::run(g, a, &repo, &index, &m);
    }
    let def = definition(&repo, &index, &m)?;
    let has_memory = m.streams.iter().any(|s| s.name == MEMORY_STREAM);
    let mode = match (a.cold, has_memory) {
        (true, _) => StartMode::Cold,
        (false, true) => StartMode::Resume,
        (false, false) => bail!(
            "restore point {:#} has no memory state (it was taken without --memory): recover it \
             with --cold to boot from its disks",
            m.id
        ),
    };
    // Absolute paths: QEMU runs in its own session and users script against the JSON.
    let target = std::path::absolute(&a.target)
        .with_context(|| format!("resolve {}", a.target.display()))?;
    let mut plan = RecoveryPlan::in_dir(&def, &target, mode);
    plan.network = a.network;
    plan.accel = a.accel.clone();
    plan.instant = a.instant;
    if a.instant && super::instant::unfinished(&target) {
        return take_over_instant(g, &repo, &m, copy_rate, &plan);
    }
    let qemu = recover::qemu_binary(&def, a.qemu.as_deref());
    recover::check_qemu(&qemu, &def, mode)?;
    refuse_non_empty(&target)?;

    let bars = Bars::new(g.quiet);
    let opts = RestoreOptions {
        target: target.clone(),
        disk: None,
    };
    // Instant: the disks are served from the repository and copied while the VM runs.
    let instant = match a.instant {
        true => Some(InstantDisks::serve(&repo, &m, &target, true, |name| {
            target.join(format!("{name}.qcow2"))
        })?),
        false => {
            super::restore::restore_qcow2(&repo, &index, &m, &opts, &bars)?;
            None
        }
    };
    for b in def.boot_files.iter().filter(|b| b.size.is_some()) {
        let Some(path) = plan.boot_files.get(&b.role) else {
            continue;
        };
        write_stream(&repo, &index, &m, &b.stream_name(), path)?;
    }
    let argv = recover::rewrite(&def, &plan)?;
    let mut vm = recover::start_qemu(&qemu, &argv, &plan)?;
    let resumed = match mode {
        StartMode::Resume => {
            let repo_ref = &repo;
            let (m_ref, index_ref) = (&m, &index);
            let report = vm.load_state_with(move |pipe| {
                repo_ref
                    .read_stream_with(index_ref, m_ref, MEMORY_STREAM, pipe, &NoProgress)
                    .map_err(std::io::Error::other)
            })?;
            tracing::info!(
                bytes = report.bytes,
                seconds = report.elapsed.as_secs_f64(),
                "state loaded"
            );
            true
        }
        StartMode::Cold => false,
    };
    if let Some(disks) = instant {
        return finish_instant(g, &m, vm, disks, copy_rate, &plan, &bars, false);
    }
    let pid = vm.detach();
    if g.json {
        print_json(&json!({
            "id": m.id,
            "pid": pid,
            "qmp": plan.qmp_socket,
            "serial": plan.serial_log,
            "resumed": resumed,
            "target": plan.target_dir,
        }))?;
    } else {
        print_line(&format!(
            "VM {} of restore point {:#} {} (QEMU pid {pid}); monitor {}, serial console {}",
            m.vm,
            m.id,
            if resumed {
                "resumed where it was captured"
            } else {
                "booted from its disks"
            },
            plan.qmp_socket.display(),
            plan.serial_log.display()
        ))?;
    }
    Ok(0)
}

/// The instant recovery in `plan.target_dir` whose vmkeep was killed: its VM (still
/// running, its reads of data not yet copied held by QEMU) taken over, its disks served
/// again, the copy finished.
fn take_over_instant(
    g: &Global,
    repo: &Arc<Repository>,
    m: &Manifest,
    rate: Option<u64>,
    plan: &RecoveryPlan,
) -> Result<u8> {
    let dir = &plan.target_dir;
    let vm = recover::attach(plan).with_context(|| {
        format!(
            "{} holds an unfinished instant recovery whose VM no longer runs (its qcow2 files \
             hold the guest's writes but not what was still to copy): recover into a new \
             folder",
            dir.display()
        )
    })?;
    let disks = InstantDisks::serve_again(repo, m, dir, |name| dir.join(format!("{name}.qcow2")))?;
    finish_instant(g, m, vm, disks, rate, plan, &Bars::new(g.quiet), true)
}

/// Says the VM runs, copies the disks while it does, then lets it run on from local disks.
/// A copy that fails stops the VM: its disks would lose their backing when we exit (the
/// guest's writes stay in the qcow2 files). `taken_over`: the VM was started by an earlier
/// vmkeep (see `take_over_instant`).
#[allow(clippy::too_many_arguments)]
fn finish_instant(
    g: &Global,
    m: &Manifest,
    vm: recover::RunningQemu,
    disks: InstantDisks,
    rate: Option<u64>,
    plan: &RecoveryPlan,
    bars: &Bars,
    taken_over: bool,
) -> Result<u8> {
    let started = std::time::Instant::now();
    let resumed = plan.mode == StartMode::Resume;
    let line = if g.json {
        json!({"id": m.id, "pid": vm.pid(), "qmp": plan.qmp_socket, "serial": plan.serial_log,
            "resumed": resumed, "target": plan.target_dir, "instant": true,
            "taken_over": taken_over})
        .to_string()
    } else if taken_over {
        format!(
            "VM {} of restore point {:#} (QEMU pid {}) taken over: serving its disks again and \
             copying the rest into {}",
            m.vm,
            m.id,
            vm.pid(),
            plan.target_dir.display()
        )
    } else {
        format!(
            "VM {} of restore point {:#} {} on the repository's data (QEMU pid {}); serial \
             console {}; copying its disks into {} now (the VM runs meanwhile)",
            m.vm,
            m.id,
            if resumed { "resumed" } else { "booting" },
            vm.pid(),
            plan.serial_log.display(),
            plan.target_dir.display()
        )
    };
    print_line(&line)?;
    std::io::stdout().flush()?;
    let total: u64 = m.disks.iter().map(|d| d.size).sum();
    bars.phase("copy disks", total);
    let mut last = 0;
    // The highest figure: the stream step starts again at 0 (vmkeep-qemu recover::instant).
    let copied = vm.copy_disks(&disks.images, rate, |p| {
        if p.done > last {
            bars.advance(p.done - last);
            last = p.done;
        }
    });
    bars.finish_phase();
    if let Err(e) = copied {
        vm.shut_down();
        return Err(e)
            .context("copying the disks; the VM was stopped (its writes are in the qcow2 files)");
    }
    let stats = disks.stats();
    disks.finished()?;
    let pid = vm.detach();
    let seconds = started.elapsed().as_secs_f64();
    if g.json {
        print_line(
            &json!({"id": m.id, "pid": pid, "copied": true, "copy_seconds": seconds,
            "bytes_fetched": stats.bytes_fetched})
            .to_string(),
        )?;
    } else {
        print_line(&format!(
            "disks copied in {seconds:.1} s ({} fetched from the repository): VM {} runs from \
             local disks alone (QEMU pid {pid})",
            crate::size::human(stats.bytes_fetched),
            m.vm
        ))?;
    }
    Ok(0)
}

/// The VM's definition stored in the restore point (bounded: it is a few KiB).
pub(super) fn definition(
    repo: &Repository,
    index: &BlobIndex,
    m: &Manifest,
) -> Result<VmDefinition> {
    let libvirt = vmkeep_qemu::capture::libvirt::DOMAIN_XML_STREAM;
    if !m.streams.iter().any(|s| s.name == DEFINITION_STREAM)
        && m.streams.iter().any(|s| s.name == libvirt)
    {
        bail!(
            "restore point {:#} was taken from a libvirt domain: recover it with --libvirt \
             (as a libvirt domain again)",
            m.id
        );
    }
    if !m.streams.iter().any(|s| s.name == DEFINITION_STREAM) {
        bail!(
            "restore point {:#} has no VM definition (taken by `backup image`, or by a vmkeep \
             that did not record one): restore its disks with `vmkeep restore` and start the VM \
             yourself",
            m.id
        );
    }
    let mut buf = Bounded(Vec::new());
    repo.read_stream_with(index, m, DEFINITION_STREAM, &mut buf, &NoProgress)?;
    Ok(VmDefinition::from_json(&buf.0)?)
}

/// Recovery writes into a new or empty folder only.
pub(super) fn refuse_non_empty(target: &Path) -> Result<()> {
    if target.exists()
        && std::fs::read_dir(target)
            .with_context(|| format!("read {}", target.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} is not empty: recover into a new or empty folder",
            target.display()
        );
    }
    Ok(())
}

/// A Write that refuses to grow past the definition's bound.
pub(super) struct Bounded(pub(super) Vec<u8>);

impl Write for Bounded {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + b.len() > DEFINITION_MAX_BYTES {
            return Err(std::io::Error::other(
                "the VM definition is larger than allowed",
            ));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A stream into a new file, durable before QEMU reads it.
pub(super) fn write_stream(
    repo: &Repository,
    index: &BlobIndex,
    m: &Manifest,
    name: &str,
    path: &Path,
) -> Result<()> {
    let mut f = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    repo.read_stream_with(index, m, name, &mut f, &NoProgress)?;
    f.sync_all()
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}
