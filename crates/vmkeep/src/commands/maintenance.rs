use anyhow::Result;
use serde_json::json;
use vmkeep_core::retention::RetentionPolicy;
use vmkeep_repo::PruneOptions;

use crate::args::{ForgetArgs, Global, PruneArgs, UnlockArgs};
use crate::context::open_repo;
use crate::output::{print_json, print_line};
use crate::progress::Bars;
use crate::size::human;

pub fn forget(g: &Global, a: &ForgetArgs) -> Result<u8> {
    let repo = open_repo(g)?;
    let ids = a
        .snapshots
        .iter()
        .map(|s| Ok(repo.resolve_id(s)?))
        .collect::<Result<Vec<_>>>()?;
    let done = repo.forget(&ids)?;
    if g.json {
        print_json(&json!({"forgotten": done}))?;
    } else {
        for id in &done {
            print_line(&format!("forgot {id}"))?;
        }
        print_line("space is reclaimed by the next `vmkeep prune`")?;
    }
    Ok(0)
}

pub fn prune(g: &Global, a: &PruneArgs) -> Result<u8> {
    let repo = open_repo(g)?;
    let policy = RetentionPolicy {
        last: a.keep.keep_last,
        hourly: a.keep.keep_hourly,
        daily: a.keep.keep_daily,
        weekly: a.keep.keep_weekly,
        monthly: a.keep.keep_monthly,
        yearly: a.keep.keep_yearly,
    };
    let plan = repo.prune_plan(&PruneOptions {
        vm: a.vm.clone(),
        policy,
    })?;
    if a.dry_run {
        let bars = Bars::new(g.quiet);
        let preview = repo.prune_preview(&plan, &bars)?;
        if g.json {
            print_json(&json!({
                "dry_run": true,
                "kept": plan.kept(),
                "forgotten": plan.forgotten(),
                "plan": plan.points,
                "reclaimed_bytes": preview.reclaimed_bytes,
                "gc": preview,
            }))?;
        } else {
            for p in &plan.points {
                print_line(&format!(
                    "{} {:#} {} {}{}",
                    if p.keep { "keep  " } else { "forget" },
                    p.id,
                    p.vm,
                    p.time.format("%Y-%m-%d %H:%M:%S"),
                    if p.keep {
                        format!("  ({})", p.reasons.join(", "))
                    } else {
                        String::new()
                    }
                ))?;
            }
            print_line(&format!(
                "would keep {}, forget {}; reclaim {} ({} packs), repack {} of live data{} \
                 (dry run: nothing changed)",
                plan.kept().len(),
                plan.forgotten().len(),
                human(preview.reclaimed_bytes),
                preview.sweep.delete.len(),
                human(preview.bytes_to_repack),
                if preview.live_leases > 0 {
                    format!(
                        "; {} running operations hold {} back",
                        preview.live_leases,
                        human(preview.sweep.waiting.iter().map(|(_, b)| b).sum())
                    )
                } else {
                    String::new()
                }
            ))?;
        }
        return Ok(0);
    }
    let bars = Bars::new(g.quiet);
    let st = repo.prune(&plan, &bars)?;
    if g.json {
        print_json(&json!({
            "kept": st.kept,
            "forgotten": st.forgotten,
            "reclaimed_bytes": st.gc.reclaimed_bytes,
            "gc": st.gc,
            "temporaries": st.temporaries,
            "pack_lists": st.pack_lists,
        }))?;
    } else {
        print_line(&format!(
            "kept {}, forgot {}; reclaimed {} ({} packs deleted, {} repacked)",
            st.kept.len(),
            st.forgotten.len(),
            human(st.gc.reclaimed_bytes),
            st.gc.packs_deleted,
            st.gc.packs_repacked
        ))?;
        if st.temporaries.removed > 0 {
            print_line(&format!(
                "removed {} temporary file{} ({}) left by killed writers",
                st.temporaries.removed,
                if st.temporaries.removed == 1 { "" } else { "s" },
                human(st.temporaries.bytes)
            ))?;
        }
        if st.gc.packs_waiting > 0 {
            print_line(&format!(
                "{} ({} packs) wait for running backups to finish; the next prune reclaims them",
                human(st.gc.bytes_waiting),
                st.gc.packs_waiting
            ))?;
        }
    }
    Ok(0)
}

pub fn unlock(g: &Global, a: &UnlockArgs) -> Result<u8> {
    let repo = open_repo(g)?;
    let (removed, kept) = vmkeep_repo::lease::remove_stale(&repo, a.remove_all)?;
    if g.json {
        print_json(&json!({
            "removed": removed.iter().map(|r| r.describe()).collect::<Vec<_>>(),
            "kept": kept.iter().map(|r| r.describe()).collect::<Vec<_>>(),
        }))?;
    } else {
        for r in &removed {
            print_line(&format!("removed lock: {}", r.describe()))?;
        }
        for r in &kept {
            print_line(&format!("kept lock: {}", r.describe()))?;
        }
        print_line(&format!("{} locks removed", removed.len()))?;
        if !kept.is_empty() {
            print_line(
                "kept locks belong to processes that run, or that run on another host or in \
                 another PID namespace (this host cannot see them end: their locks expire when \
                 not refreshed for the lease timeout); `vmkeep unlock --remove-all` removes \
                 them too once you know nothing runs",
            )?;
        }
    }
    Ok(0)
}
