//! Leftovers of captures whose vmkeep and guard both died (a cgroup or OOM kill takes both).
//!
//! First by their undo logs: scratch directories whose lock is free belong to dead captures;
//! those of this VM's monitor are undone by the one executor (as their guard would have), those
//! of a VM that no longer exists are removed. A directory still locked for this monitor is a
//! capture (or its guard) still at work: we wait for it, then refuse.
//!
//! Then by name, for what no log describes any more (a log deleted by hand, or a capture by an
//! older vmkeep): our exports, block jobs and nodes. Bitmaps are settled by the change-tracking
//! decision ([`super::cbt`]), which repairs a checkpoint a dead capture left disabled.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tracing::{info, warn};

use super::executor::{self, Scope};
use super::scratch::{self, DeadCapture};
use crate::error::{Error, Result};
use crate::qmp::QmpClient;

const WAIT_FOR_LIVE: Duration = Duration::from_secs(60);

/// Dead captures of the VM behind `monitor` found in `base` (and the system temp dir), locked
/// for the caller. Dead captures of VMs that are gone are removed on the way.
pub fn claim_dead_captures(base: &Path, monitor: &Path) -> Result<Vec<DeadCapture>> {
    let mut bases = vec![base.to_path_buf()];
    let tmp = std::env::temp_dir();
    if tmp != base {
        bases.push(tmp);
    }
    let same = |m: Option<&Path>| m.is_some_and(|m| m == monitor);
    let mut mine = Vec::new();
    for b in &bases {
        let start = Instant::now();
        loop {
            let (dead, live) = scratch::scan(b);
            for d in dead {
                if same(d.pending.monitor()) {
                    mine.push(d);
                } else if d
                    .pending
                    .monitor()
                    .is_none_or(|m| !scratch::monitor_alive(m))
                {
                    info!(dir = %d.dir.display(), "removing the scratch directory of a dead capture of a VM that is gone");
                    d.remove();
                }
            }
            let busy: Vec<_> = live.iter().filter(|l| same(l.monitor.as_deref())).collect();
            if busy.is_empty() {
                break;
            }
            if start.elapsed() > WAIT_FOR_LIVE {
                return Err(Error::Refused(format!(
                    "another capture of this VM is running, or its guard is still undoing it \
                     (scratch directory {}): try again when it has ended",
                    busy[0].dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(mine)
}

/// Runs the undo log of each dead capture of this VM, then removes its directory.
pub async fn undo_dead_captures(qmp: &QmpClient, dead: Vec<DeadCapture>) {
    for d in dead {
        if !d.pending.is_empty() {
            let out = executor::undo(
                qmp,
                &d.pending.steps,
                Scope::All {
                    committed: d.pending.committed(),
                },
            )
            .await;
            for l in &out.lines {
                warn!("undoing an interrupted capture ({}): {l}", d.dir.display());
            }
        }
        d.remove();
    }
}

/// Our objects left in QEMU that no log describes; returns what it did.
pub async fn recover_by_name(qmp: &QmpClient) -> Result<Vec<String>> {
    let mut log = Vec::new();
    let ours = |name: &str, kinds: &[&str]| kinds.iter().any(|k| name.starts_with(k));

    let exports = qmp
        .execute("query-block-exports", Value::Null)
        .await
        .unwrap_or(Value::Null);
    let mut had_export = false;
    for e in exports.as_array().into_iter().flatten() {
        let id = e["id"].as_str().unwrap_or_default();
        if !ours(id, &["vmkeep-exp-"]) {
            continue;
        }
        had_export = true;
        let mut ev = qmp.events();
        if qmp
            .execute("block-export-del", json!({"id": id, "mode": "hard"}))
            .await
            .is_ok()
        {
            let _ = ev
                .wait_for(
                    "BLOCK_EXPORT_DELETED",
                    |e| e.data["id"] == id,
                    Duration::from_secs(10),
                )
                .await;
            log.push(format!("removed export {id}"));
        }
    }
    // Fleecing jobs of vmkeep before the copy-before-write filter.
    let jobs = qmp.execute("query-block-jobs", Value::Null).await?;
    for j in jobs.as_array().into_iter().flatten() {
        let id = j["device"].as_str().unwrap_or_default();
        if !ours(id, &["vmkeep-job-"]) {
            continue;
        }
        let mut ev = qmp.events();
        if qmp.block_job_cancel(id, true).await.is_ok() {
            let _ = ev
                .wait_for(
                    "BLOCK_JOB_CANCELLED",
                    |e| e.data["device"] == id,
                    Duration::from_secs(10),
                )
                .await;
            log.push(format!("cancelled job {id}"));
        }
    }
    // Devices still writing through one of our filters go back to the filter's child.
    let children = filter_children(qmp).await;
    for b in qmp.query_block().await? {
        let (Some(qdev), Some(node)) = (b.qdev, b.inserted.and_then(|i| i.node_name)) else {
            continue;
        };
        if !ours(&node, &["vmkeep-cbw-"]) {
            continue;
        }
        match children.get(&node) {
            Some(child) => match qmp.qom_set(&qdev, "drive", json!(child)).await {
                Ok(()) => log.push(format!("reattached {qdev} to {child}")),
                Err(e) => warn!(error = %e, device = %qdev, "cannot reattach a device"),
            },
            None => warn!(device = %qdev, filter = %node,
                "a device still writes through a filter of an interrupted capture whose log is lost; \
                 its child node is unknown (x-debug-query-block-graph unavailable)"),
        }
    }
    // Nodes: snapshot-access, then filters, then scratch images (parents before children).
    for kind in ["vmkeep-sa-", "vmkeep-cbw-", "vmkeep-sc-", "vmkeep-fl-"] {
        for n in qmp.query_named_block_nodes().await? {
            if !n.node_name.starts_with(kind) {
                continue;
            }
            match qmp.blockdev_del(&n.node_name).await {
                Ok(()) => log.push(format!("removed node {}", n.node_name)),
                Err(e) => warn!(error = %e, node = %n.node_name, "cannot remove a leftover node"),
            }
        }
    }
    if had_export && qmp.nbd_server_stop().await.is_ok() {
        log.push("stopped the NBD server".into());
    }
    Ok(log)
}

/// Each filter node's `file` child, from QEMU's block graph (a debug command: best effort).
async fn filter_children(qmp: &QmpClient) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(g) = qmp.execute("x-debug-query-block-graph", Value::Null).await else {
        return out;
    };
    let names: HashMap<u64, String> = g["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| Some((n["id"].as_u64()?, n["name"].as_str()?.to_string())))
        .collect();
    for e in g["edges"].as_array().into_iter().flatten() {
        if e["name"] != "file" {
            continue;
        }
        if let (Some(p), Some(c)) = (
            e["parent"].as_u64().and_then(|p| names.get(&p)),
            e["child"].as_u64().and_then(|c| names.get(&c)),
        ) {
            out.insert(p.clone(), c.clone());
        }
    }
    out
}
