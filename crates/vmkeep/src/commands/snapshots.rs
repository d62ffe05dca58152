use anyhow::Result;
use serde_json::json;

use crate::args::{Global, SnapshotsArgs};
use crate::context::open_repo;
use crate::output::{print_json, print_line};
use crate::size::human;

pub fn run(g: &Global, a: &SnapshotsArgs) -> Result<u8> {
    let repo = open_repo(g)?;
    let list: Vec<_> = repo
        .snapshots()?
        .into_iter()
        .filter(|m| a.vm.as_deref().is_none_or(|v| v == m.vm))
        .collect();
    if g.json {
        let v: Vec<_> = list
            .iter()
            .map(|m| {
                json!({
                    "id": m.id,
                    "vm": m.vm,
                    "time": m.time.to_rfc3339(),
                    "parent": m.parent,
                    "disks": m.disks.iter().map(|d| json!({"name": d.name, "size": d.size})).collect::<Vec<_>>(),
                    "memory": has_memory(m),
                    "stats": m.stats,
                })
            })
            .collect();
        print_json(&v)?;
        return Ok(0);
    }
    if list.is_empty() {
        print_line("no restore points")?;
        return Ok(0);
    }
    print_line(&format!(
        "{:<10} {:<20} {:<25} {:>10} {:>10}  disks (+ memory: RAM and device state)",
        "id", "vm", "time", "changed", "stored"
    ))?;
    for m in &list {
        print_line(&format!(
            "{:<10} {:<20} {:<25} {:>10} {:>10}  {}{}",
            format!("{:#}", m.id),
            m.vm,
            m.time.format("%Y-%m-%d %H:%M:%S UTC"),
            human(m.stats.changed_bytes),
            human(m.stats.stored_bytes),
            m.disks
                .iter()
                .map(|d| format!("{} ({})", d.name, human(d.size)))
                .collect::<Vec<_>>()
                .join(", "),
            if has_memory(m) { " + memory" } else { "" }
        ))?;
    }
    print_line(&format!("{} restore points", list.len()))?;
    Ok(0)
}

/// A restore point that `recover` can resume (it carries RAM and device state).
fn has_memory(m: &vmkeep_repo::Manifest) -> bool {
    m.streams
        .iter()
        .any(|s| s.name == vmkeep_repo::backup::MEMORY_STREAM)
}
