use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;
use vmkeep_core::manifest::ChangeTracking;
use vmkeep_repo::{BackupOptions, ImageBackupOptions, Manifest};

use crate::args::{BackupCommand, BackupImageArgs, BackupVmArgs, FreezeMode, Global};
use crate::context::open_repo;
use crate::output::{print_json, print_line};
use crate::progress::Bars;
use crate::size::human;

pub fn run(g: &Global, b: &BackupCommand) -> Result<u8> {
    match b {
        BackupCommand::Image(a) => image(g, a),
        BackupCommand::Vm(a) => vm(g, a),
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
        vmkeep_qemu::capture::backup_images(&repo, opts.backup, &opts.disks, a.full, &bars)?
    } else {
        repo.backup_image(&opts, &bars)?
    };
    report(g, &m)
}

fn vm(g: &Global, a: &BackupVmArgs) -> Result<u8> {
    use vmkeep_qemu::capture::{backup_vm, run_guard, Freeze, GuardCommand, VmBackupOptions};
    if a.guard {
        // The guard of another vmkeep process: undo its capture if it dies (see capture::guard).
        for line in run_guard(std::io::stdin().lock()) {
            eprintln!("vmkeep guard: {line}");
        }
        return Ok(0);
    }
    let guard = std::env::current_exe().ok().map(|exe| GuardCommand {
        program: exe,
        args: vec![
            "backup".into(),
            "vm".into(),
            "--qmp".into(),
            a.qmp.display().to_string(),
            "--vm".into(),
            a.vm.clone(),
            "--guard".into(),
        ],
        env: Vec::new(),
    });
    let repo = open_repo(g)?;
    let opts = VmBackupOptions {
        qmp: a.qmp.clone(),
        vm: a.vm.clone(),
        full: a.full,
        suspend: a.suspend,
        freeze: match a.freeze {
            FreezeMode::Auto => Freeze::Auto,
            FreezeMode::On => Freeze::On,
            FreezeMode::Off => Freeze::Off,
        },
        guard,
    };
    let bars = Bars::new(g.quiet);
    let m = backup_vm(&repo, &opts, &bars)?;
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
