//! `vmkeep replicate --to REPO | --from REPO [--vm NAME] [--all] [--dry-run]`: restore points
//! copied to a replica, only the blobs it lacks sent (vmkeep_repo::replicate).
use anyhow::{bail, Result};
use serde_json::json;
use vmkeep_repo::replicate::ReplicateOptions;

use crate::args::{Global, ReplicateArgs};
use crate::context::{open_repo, open_repo_at};
use crate::output::{print_json, print_line};
use crate::progress::Bars;
use crate::size::human;

pub fn run(g: &Global, a: &ReplicateArgs) -> Result<u8> {
    // First: a run that fails is labelled like the runs that succeed.
    if let Some(vm) = &a.vm {
        crate::metrics::set_vm(vm);
    }
    let here = open_repo(g)?;
    let (source, dest) = match (&a.to, &a.from) {
        (Some(to), None) => (here, open_repo_at(g, to)?),
        (None, Some(from)) => (open_repo_at(g, from)?, here),
        _ => unreachable!("clap: exactly one of --to and --from"),
    };
    let opts = ReplicateOptions {
        vm: a.vm.clone(),
        all: a.all,
    };
    let plan = source.plan_replication(&dest, &opts)?;
    refuse_points_outside_the_token(&dest, &plan)?;
    if a.dry_run {
        record_outstanding(&plan);
        if g.json {
            print_json(&json!({
                "dry_run": true,
                "outstanding": plan.points.iter().map(|m| m.id).collect::<Vec<_>>(),
                "blobs_missing": plan.blobs_missing,
                "bytes_missing": plan.bytes_missing,
            }))?;
        } else {
            for m in &plan.points {
                print_line(&format!(
                    "would copy {:#} {} {}",
                    m.id,
                    m.vm,
                    m.time.format("%Y-%m-%d %H:%M:%S UTC")
                ))?;
            }
            print_line(&format!(
                "{} restore points outstanding, {} to send ({} blobs)",
                plan.points.len(),
                human(plan.bytes_missing),
                plan.blobs_missing
            ))?;
        }
        return Ok(0);
    }
    let bars = Bars::new(g.quiet);
    let st = source.replicate(&dest, &plan, &bars)?;
    crate::metrics::gauge(
        "vmkeep_replicate_bytes_sent",
        "Bytes sent to the replica by this run",
        &[],
        st.bytes_sent as f64,
    );
    crate::metrics::gauge(
        "vmkeep_replicate_copied_restore_points",
        "Restore points this run copied",
        &[],
        st.copied.len() as f64,
    );
    if g.json {
        print_json(&json!({
            "copied": st.copied,
            "bytes_sent": st.bytes_sent,
            "chunks_sent": st.chunks_sent,
            "chunks_skipped": st.chunks_skipped,
        }))?;
    } else {
        print_line(&format!(
            "{} restore points copied, {} sent ({} blobs; {} the destination had)",
            st.copied.len(),
            human(st.bytes_sent),
            st.chunks_sent,
            st.chunks_skipped
        ))?;
    }
    Ok(0)
}

/// Replication lag for `--metrics-file` (a monitoring job runs `replicate --dry-run`): what
/// the replica lacks, and how old the oldest restore point it lacks is.
fn record_outstanding(plan: &vmkeep_repo::replicate::ReplicationPlan) {
    use crate::metrics::gauge;
    gauge(
        "vmkeep_replicate_outstanding_restore_points",
        "Restore points the replica lacks",
        &[],
        plan.points.len() as f64,
    );
    gauge(
        "vmkeep_replicate_outstanding_bytes",
        "Bytes the replica lacks (blobs to send)",
        &[],
        plan.bytes_missing as f64,
    );
    let oldest = plan.points.iter().map(|m| m.time).min();
    let lag = oldest.map_or(0.0, |t| {
        (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
    });
    gauge(
        "vmkeep_replicate_lag_seconds",
        "Age of the oldest restore point the replica lacks (0: it lacks none)",
        &[],
        lag,
    );
}

/// A destination served with a scoped token refuses restore points of VMs outside its globs:
/// say so before anything is sent, naming them, rather than fail half-way.
fn refuse_points_outside_the_token(
    dest: &vmkeep_repo::Repository,
    plan: &vmkeep_repo::replicate::ReplicationPlan,
) -> Result<()> {
    if plan.points.is_empty() {
        return Ok(());
    }
    let Some(scope) = dest.store().token_scope()? else {
        return Ok(());
    };
    let location = dest.location();
    if !scope.may_write() {
        bail!(
            "the token for {location} may not add restore points (rights: {}): use an append or admin token",
            scope.rights.join(", ")
        );
    }
    let mut outside: Vec<&str> = plan
        .points
        .iter()
        .map(|m| m.vm.as_str())
        .filter(|vm| {
            !scope
                .vms
                .iter()
                .any(|g| vmkeep_server::glob::matches(g, vm))
        })
        .collect();
    outside.sort_unstable();
    outside.dedup();
    if !outside.is_empty() {
        bail!(
            "the token for {location} covers only VMs matching {}, but restore points of {} are outstanding: replicate with --vm NAME for the VMs it covers, or use a token that covers them (nothing was sent)",
            scope.vms.join(", "),
            outside.join(", ")
        );
    }
    Ok(())
}
