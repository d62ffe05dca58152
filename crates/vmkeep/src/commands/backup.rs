use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;
use vmkeep_core::manifest::ChangeTracking;
use vmkeep_io::VmSource;
use vmkeep_qemu::capture::{CaptureOptions, ImageCapture, QmpCapture};
use vmkeep_repo::{BackupOptions, ImageBackupOptions, Manifest, Repository};

use crate::args::{BackupCommand, BackupImageArgs, BackupVmArgs, FreezeMode, Global};
use crate::context::{chain_of, open_repo};
use crate::output::{print_json, print_line};
use crate::progress::Bars;
use crate::size::human;

pub fn run(g: &Global, b: &BackupCommand) -> Result<u8> {
    match b {
        BackupCommand::Image(a) => {
            crate::metrics::set_vm(&a.vm);
            image(g, a)
        }
        BackupCommand::Vm(a) => {
            crate::metrics::set_vm(&a.source.vm_name());
            match &a.source.libvirt {
                Some(domain) => libvirt(g, a, domain),
                None => vm(g, a),
            }
        }
    }
}

fn parse_disks(specs: &[String]) -> Result<Vec<(String, PathBuf)>> {
    specs
        .iter()
        .map(|s| match s.split_once('=') {
            Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_string(), PathBuf::from(p))),
            _ => bail!("--disk {s:?}: expected NAME=PATH"),
        })
        .collect()
}

fn image(g: &Global, a: &BackupImageArgs) -> Result<u8> {
    let disks = parse_disks(&a.disks)?;
    let repo = open_repo(g)?;
    let opts = ImageBackupOptions {
        backup: BackupOptions {
            vm: a.vm.clone(),
            ..Default::default()
        },
        disks,
        full: a.full,
    };
    let bars = Bars::new(g.quiet);
    // Container formats (qcow2, ...) are read through qemu-storage-daemon, raw images directly.
    let non_raw = opts.disks.iter().any(|(_, p)| {
        matches!(
            vmkeep_repo::backup::probe_image(p),
            Err(vmkeep_repo::Error::NotRaw { .. })
        )
    });
    let m = if non_raw {
        let scratch = a.scratch_dir.clone();
        let full = a.full;
        let chain = chain_of(&repo);
        let cs = repo.config().chunk_size as u64;
        let images = opts.disks.clone();
        capture_backup(&repo, opts.backup, &bars, &|parent| {
            let o = CaptureOptions {
                full,
                scratch_dir: scratch.clone(),
                chain: chain.clone(),
                chunk_size: cs,
                ..Default::default()
            };
            Ok(Box::new(ImageCapture::start(&images, o, parent)?))
        })?
    } else {
        repo.backup_image(&opts, &bars)?
    };
    report(g, &m)
}

type StartCapture<'a> =
    dyn Fn(Option<&Manifest>) -> Result<Box<dyn VmSource>, vmkeep_qemu::Error> + 'a;

/// One restore point from a capture: the session decides the parent, the capture cuts, the
/// session reads it, commits, and the capture settles its checkpoints. When the memory
/// instant moved (the guest was stopped by someone else mid-capture), the capture is undone
/// and taken once more.
fn capture_backup(
    repo: &Repository,
    backup: BackupOptions,
    bars: &Bars,
    start: &StartCapture<'_>,
) -> Result<Manifest> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut session = repo.begin_backup(backup.clone())?;
        let mut capture = start(session.parent())?;
        if let Err(e) = session.add_source(&mut *capture, bars) {
            drop(capture); // undone
            let moved = matches!(&e, vmkeep_repo::Error::Source(s)
                if matches!(s.downcast_ref::<vmkeep_qemu::Error>(), Some(vmkeep_qemu::Error::InstantMoved)));
            if moved && attempt == 1 {
                tracing::warn!("{e}; capturing again");
                continue;
            }
            return Err(e.into());
        }
        let committed = session.commit();
        if let Err(e) = capture.finish(committed.is_ok()) {
            tracing::warn!(error = %e, "capture cleanup after the commit incomplete");
        }
        return Ok(committed?);
    }
}

fn freeze_of(mode: FreezeMode) -> vmkeep_qemu::capture::Freeze {
    use vmkeep_qemu::capture::Freeze;
    match mode {
        FreezeMode::Auto => Freeze::Auto,
        FreezeMode::On => Freeze::On,
        FreezeMode::Off => Freeze::Off,
    }
}

/// `backup vm --libvirt DOMAIN`: the disks through libvirt's backup API.
fn libvirt(g: &Global, a: &BackupVmArgs, domain: &str) -> Result<u8> {
    use vmkeep_qemu::capture::libvirt::{self, LibvirtCapture, LibvirtOptions, Virsh};
    use vmkeep_qemu::capture::GuardCommand;
    if a.guard {
        let virsh = Virsh::new(a.source.connect.clone(), domain);
        for line in libvirt::run_guard(&virsh, std::io::stdin().lock()) {
            eprintln!("vmkeep guard: {line}");
        }
        return Ok(0);
    }
    let mut args = vec![
        "backup".into(),
        "vm".into(),
        "--libvirt".into(),
        domain.into(),
    ];
    if let Some(uri) = &a.source.connect {
        args.extend(["--connect".into(), uri.clone()]);
    }
    args.push("--guard".into());
    let repo = open_repo(g)?;
    let opts = LibvirtOptions {
        domain: domain.to_string(),
        uri: a.source.connect.clone(),
        full: a.full,
        freeze: freeze_of(a.freeze),
        guard: Some(GuardCommand {
            program: PathBuf::from("/proc/self/exe"),
            args,
            env: Vec::new(),
        }),
        scratch_dir: a.scratch_dir.clone(),
        chain: chain_of(&repo),
        chunk_size: repo.config().chunk_size as u64,
        memory: a.memory,
        memory_bandwidth: a.memory_bandwidth,
        allow_qmp_passthrough: a.source.allow_qmp_passthrough,
    };
    let bars = Bars::new(g.quiet);
    let backup = BackupOptions {
        vm: a.source.vm_name(),
        ..Default::default()
    };
    let m = capture_backup(&repo, backup, &bars, &|parent| {
        Ok(Box::new(LibvirtCapture::start(opts.clone(), parent)?))
    })?;
    report(g, &m)
}

fn vm(g: &Global, a: &BackupVmArgs) -> Result<u8> {
    use vmkeep_qemu::capture::{run_guard, GuardCommand};
    let qmp = a
        .source
        .qmp
        .clone()
        .expect("clap requires --qmp without --libvirt");
    let vm_name = a.source.vm_name();
    if a.guard {
        // The guard of another vmkeep process: undo its capture if it dies (see capture::guard).
        for line in run_guard(std::io::stdin().lock()) {
            eprintln!("vmkeep guard: {line}");
        }
        return Ok(0);
    }
    // /proc/self/exe, not the path: it works even if the binary was replaced meanwhile.
    let guard = Some(GuardCommand {
        program: PathBuf::from("/proc/self/exe"),
        args: vec![
            "backup".into(),
            "vm".into(),
            "--qmp".into(),
            qmp.display().to_string(),
            "--vm".into(),
            vm_name.clone(),
            "--guard".into(),
        ],
        env: Vec::new(),
    });
    let repo = open_repo(g)?;
    let opts = CaptureOptions {
        qmp,
        full: a.full,
        suspend: a.suspend,
        memory: a.memory,
        memory_bandwidth: a.memory_bandwidth,
        freeze: freeze_of(a.freeze),
        guard,
        scratch_dir: a.scratch_dir.clone(),
        chain: chain_of(&repo),
        chunk_size: repo.config().chunk_size as u64,
        vm_config: a.vm_config.clone(),
    };
    let bars = Bars::new(g.quiet);
    let backup = BackupOptions {
        vm: vm_name,
        ..Default::default()
    };
    let m = capture_backup(&repo, backup, &bars, &|parent| {
        Ok(Box::new(QmpCapture::start(opts.clone(), parent)?))
    })?;
    report(g, &m)
}

pub fn backup_json(m: &Manifest) -> serde_json::Value {
    json!({
        "id": m.id,
        "vm": m.vm,
        "time": m.time.to_rfc3339(),
        "parent": m.parent,
        "pause_ms": m.pause_ms,
        "stats": m.stats,
        "disks": m.disks.iter().map(|d| json!({
            "name": d.name,
            "size": d.size,
            "cbt": d.cbt,
            "reason": d.cbt_reason,
            "changed_chunks": d.changes.as_ref().map(|c| c.count()),
        })).collect::<Vec<_>>(),
    })
}

pub fn report(g: &Global, m: &Manifest) -> Result<u8> {
    record_metrics(m);
    if g.json {
        print_json(&backup_json(m))?;
        return Ok(0);
    }
    let s = &m.stats;
    print_line(&format!(
        "restore point {} of {} saved{}",
        m.id,
        m.vm,
        m.parent
            .map(|p| format!(" (parent {p:#})"))
            .unwrap_or_default()
    ))?;
    print_line(&format!(
        "  read {}, changed {}, new {}, stored {} (metadata {}) in {:.2} s ({}/s)",
        human(s.read_bytes),
        human(s.changed_bytes),
        human(s.new_bytes),
        human(s.stored_bytes),
        human(s.metadata_bytes),
        s.seconds,
        human((s.read_bytes as f64 / s.seconds.max(1e-6)) as u64)
    ))?;
    for d in &m.disks {
        if d.cbt == ChangeTracking::None && d.cbt_reason.is_none() {
            continue;
        }
        print_line(&format!(
            "  disk {}: change tracking {}{}",
            d.name,
            d.cbt,
            d.cbt_reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ))?;
    }
    if m.pause_ms > 0 {
        print_line(&format!("  VM paused {} ms", m.pause_ms))?;
    }
    Ok(0)
}

/// The restore point's figures for `--metrics-file`.
fn record_metrics(m: &Manifest) {
    use crate::metrics::{gauge, set_vm};
    set_vm(&m.vm);
    let s = &m.stats;
    for (name, help, v) in [
        (
            "vmkeep_backup_read_bytes",
            "Bytes read from the VM's disks",
            s.read_bytes,
        ),
        (
            "vmkeep_backup_changed_bytes",
            "Bytes that differed from the parent",
            s.changed_bytes,
        ),
        (
            "vmkeep_backup_new_bytes",
            "Bytes of chunks the repository lacked",
            s.new_bytes,
        ),
        (
            "vmkeep_backup_stored_bytes",
            "Bytes added to the repository (compressed)",
            s.stored_bytes,
        ),
    ] {
        gauge(name, help, &[], v as f64);
    }
    gauge(
        "vmkeep_backup_pause_seconds",
        "How long the VM was paused for the capture",
        &[],
        m.pause_ms as f64 / 1000.0,
    );
    gauge(
        "vmkeep_backup_timestamp_seconds",
        "When the restore point was captured (Unix time)",
        &[],
        m.time.timestamp_millis() as f64 / 1000.0,
    );
    for d in &m.disks {
        for state in [
            ChangeTracking::Used,
            ChangeTracking::Rescan,
            ChangeTracking::None,
        ] {
            gauge(
                "vmkeep_backup_change_tracking",
                "1 for the change tracking a disk's backup used (used, rescan, none)",
                &[("disk", &d.name), ("state", state.as_str())],
                if d.cbt == state { 1.0 } else { 0.0 },
            );
        }
    }
}
