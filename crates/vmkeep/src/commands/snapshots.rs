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
    // Which were proven to come back (`vmkeep verify`); an unreadable record is a warning.
    let verified = repo.verifications()?;
    for (name, reason) in &verified.unreadable {
        tracing::warn!(record = %name, %reason, "verification record not readable");
    }
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
                    "verified": verified.latest(&m.id).map(|r| json!({
                        "time": r.time.to_rfc3339(),
                        "ok": r.ok,
                        "mode": r.mode.name(),
                        "seconds": (r.seconds * 100.0).round() / 100.0,
                        "reason": r.reason,
                        "evidence": r.evidence,
                        "count": verified.by_snapshot.get(&m.id).map_or(0, Vec::len),
                    })),
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
        "{:<10} {:<20} {:<25} {:>10} {:>10}  {:<18} disks (+ memory: RAM and device state)",
        "id", "vm", "time", "changed", "stored", "verified"
    ))?;
    for m in &list {
        let proof = match verified.latest(&m.id) {
            None => "-".to_string(),
            Some(r) => format!(
                "{} {}",
                if r.ok { "ok" } else { "FAILED" },
                r.time.format("%Y-%m-%d %H:%M")
            ),
        };
        print_line(&format!(
            "{:<10} {:<20} {:<25} {:>10} {:>10}  {:<18} {}{}",
            format!("{:#}", m.id),
            m.vm,
            m.time.format("%Y-%m-%d %H:%M:%S UTC"),
            human(m.stats.changed_bytes),
            human(m.stats.stored_bytes),
            proof,
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
