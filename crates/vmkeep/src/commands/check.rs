use anyhow::Result;
use serde_json::json;
use vmkeep_repo::CheckOptions;

use crate::args::{CheckArgs, Global};
use crate::context::open_repo;
use crate::output::{print_json, print_line};
use crate::progress::Bars;
use crate::EXIT_DAMAGE;

pub fn run(g: &Global, a: &CheckArgs) -> Result<u8> {
    let repo = open_repo(g)?;
    let bars = Bars::new(g.quiet);
    let r = repo.check(
        &CheckOptions {
            read_data: a.read_data,
        },
        &bars,
    )?;
    if g.json {
        print_json(&json!({
            "ok": r.ok,
            "snapshots_checked": r.snapshots_checked,
            "damaged": r.damaged,
            "packs_checked": r.packs_checked,
            "blobs_checked": r.blobs_checked,
            "warnings": r.warnings,
        }))?;
    } else {
        for w in &r.warnings {
            eprintln!("vmkeep: warning: {w}");
        }
        for d in &r.damaged {
            print_line(&format!(
                "DAMAGED restore point {}{}: {}",
                d.snapshot,
                d.disk
                    .as_ref()
                    .map(|x| format!(" disk {x}"))
                    .unwrap_or_default(),
                d.reason
            ))?;
        }
        print_line(&format!(
            "checked {} restore points{}: {}",
            r.snapshots_checked,
            if a.read_data {
                format!(
                    ", {} packs, {} blobs read",
                    r.packs_checked, r.blobs_checked
                )
            } else {
                String::new()
            },
            if r.ok { "no errors" } else { "DAMAGE FOUND" }
        ))?;
    }
    Ok(if r.ok { 0 } else { EXIT_DAMAGE })
}
