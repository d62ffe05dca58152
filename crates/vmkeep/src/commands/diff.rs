//! `vmkeep diff FROM TO [--disk NAME]`: the byte extents whose content differs between two
//! restore points (vmkeep_repo::diff), per disk, and whether their streams (memory, definition)
//! differ.
use anyhow::Result;
use serde_json::json;

use crate::args::{DiffArgs, Global};
use crate::context::open_repo;
use crate::output::{print_json, print_line};
use crate::size::human;

/// Extents listed one per line in human output before the rest is summed up.
const HUMAN_EXTENTS: usize = 20;

pub fn run(g: &Global, a: &DiffArgs) -> Result<u8> {
    let repo = open_repo(g)?;
    let from = repo.resolve(&a.from)?;
    let to = repo.resolve(&a.to)?;
    let d = repo.diff(&from, &to, a.disk.as_deref())?;
    if g.json {
        print_json(&json!({
            "from": d.from,
            "to": d.to,
            "disks": d.disks.iter().map(|x| json!({
                "name": x.name,
                "size_from": x.size_from,
                "size_to": x.size_to,
                "changed_bytes": x.changed_bytes,
                "extents": x.extents,
                "zero_extents": x.zero_extents,
            })).collect::<Vec<_>>(),
            "streams": d.streams.iter().map(|s| json!({
                "name": s.name,
                "size_from": s.size_from,
                "size_to": s.size_to,
                "differs": s.differs,
                "changed_bytes": s.changed_bytes,
            })).collect::<Vec<_>>(),
        }))?;
        return Ok(0);
    }
    print_line(&format!(
        "from {:#} ({} {}) to {:#} ({} {})",
        from.id,
        from.vm,
        from.time.format("%Y-%m-%d %H:%M:%S UTC"),
        to.id,
        to.vm,
        to.time.format("%Y-%m-%d %H:%M:%S UTC"),
    ))?;
    for x in &d.disks {
        let sizes = match (x.size_from, x.size_to) {
            (Some(f), Some(t)) if f == t => human(t),
            (Some(f), Some(t)) => format!("{} -> {}", human(f), human(t)),
            (None, Some(t)) => format!("new, {}", human(t)),
            (Some(f), None) => format!("gone in the second, was {}", human(f)),
            (None, None) => String::new(),
        };
        let zeros: u64 = x.zero_extents.iter().map(|e| e.1).sum();
        print_line(&format!(
            "disk {} ({sizes}): {} differ in {} extents{}",
            x.name,
            human(x.changed_bytes),
            x.extents.len(),
            if zeros > 0 {
                format!(", {} of it zeros now", human(zeros))
            } else {
                String::new()
            }
        ))?;
        for (off, len) in x.extents.iter().take(HUMAN_EXTENTS) {
            print_line(&format!("  {off:>16} +{len}"))?;
        }
        if x.extents.len() > HUMAN_EXTENTS {
            print_line(&format!(
                "  ... {} more (all of them with --json)",
                x.extents.len() - HUMAN_EXTENTS
            ))?;
        }
    }
    for s in &d.streams {
        print_line(&format!(
            "stream {}: {}",
            s.name,
            match (s.size_from, s.size_to, s.differs) {
                (Some(_), Some(_), false) => "identical".to_string(),
                (Some(_), Some(t), true) =>
                    format!("{} of {} differ", human(s.changed_bytes), human(t)),
                (None, Some(t), _) => format!("new ({})", human(t)),
                (Some(_), None, _) => "gone in the second".to_string(),
                (None, None, _) => String::new(),
            }
        ))?;
    }
    Ok(0)
}
