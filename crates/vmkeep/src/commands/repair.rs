use anyhow::Result;
use serde_json::json;

use crate::args::{Global, RepairCommand};
use crate::context::open_repo;
use crate::output::{print_json, print_line};
use crate::progress::Bars;

pub fn run(g: &Global, c: &RepairCommand) -> Result<u8> {
    match c {
        RepairCommand::Index => index(g),
        RepairCommand::Refs { all } => refs(g, *all),
    }
}

fn refs(g: &Global, all: bool) -> Result<u8> {
    let repo = open_repo(g)?;
    let st = repo.repair_pack_lists(all)?;
    if g.json {
        print_json(&json!({"checked": st.checked, "written": st.written, "removed": st.removed}))?;
    } else {
        print_line(&format!(
            "pack lists: {} restore points checked, {} lists written, {} removed",
            st.checked, st.written, st.removed
        ))?;
    }
    Ok(0)
}

fn index(g: &Global) -> Result<u8> {
    let repo = open_repo(g)?;
    let bars = Bars::new(g.quiet);
    let st = repo.repair_index(&bars)?;
    if g.json {
        print_json(&json!({
            "packs_read": st.packs_read,
            "blobs_indexed": st.blobs_indexed,
            "index_objects_written": st.index_objects_written,
            "index_objects_removed": st.index_objects_removed,
            "packs_kept_from_old_index": st.packs_kept_from_old_index,
            "packs_unreadable": st
                .packs_unreadable
                .iter()
                .map(|(p, why)| json!({"pack": p, "reason": why}))
                .collect::<Vec<_>>(),
        }))?;
    } else {
        for (p, why) in &st.packs_unreadable {
            eprintln!("vmkeep: warning: the header of pack {p} cannot be read: {why}");
        }
        print_line(&format!(
            "indexed {} blobs of {} packs into {} index objects (replacing {}); run `vmkeep check`",
            st.blobs_indexed, st.packs_read, st.index_objects_written, st.index_objects_removed
        ))?;
    }
    Ok(0)
}
