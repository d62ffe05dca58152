use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;
use vmkeep_repo::{BackupOptions, ImageBackupOptions, Manifest};

use crate::args::{BackupCommand, BackupImageArgs, Global};
use crate::context::open_repo;
use crate::output::{print_json, print_line};
use crate::progress::Bars;
use crate::size::human;

pub fn run(g: &Global, b: &BackupCommand) -> Result<u8> {
    match b {
        BackupCommand::Image(a) => image(g, a),
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
    };
    let bars = Bars::new(g.quiet);
    let m = repo.backup_image(&opts, &bars)?;
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
    Ok(0)
}
