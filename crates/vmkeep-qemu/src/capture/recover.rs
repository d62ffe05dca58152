//! Leftovers of a capture whose vmkeep and guard both died: found by name at the start of the
//! next capture (we hold the monitor, so no other capture of this VM is running) and undone
//! like the guard would: exports, jobs and scratch nodes removed, and the dead capture's new
//! bitmap (`vmkeep-<token>`, the token is in the node and job names) merged back into the
//! disabled previous checkpoint, which records again.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tracing::warn;

use super::cbt::BITMAP_PREFIX;
use crate::error::Result;
use crate::qmp::{BitmapRef, QmpClient, TransactionAction};

/// Undoes leftovers; returns what it did (for logs and tests).
pub async fn recover_leftovers(qmp: &QmpClient) -> Result<Vec<String>> {
    let mut log = Vec::new();
    let mut tokens = BTreeSet::new();
    let token_of = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|r| r.rsplit_once('-'))
            .map(|(t, _)| t.to_string())
    };

    let exports = qmp
        .execute("query-block-exports", Value::Null)
        .await
        .unwrap_or(Value::Null);
    let mut had_export = false;
    for e in exports.as_array().into_iter().flatten() {
        let id = e["id"].as_str().unwrap_or_default();
        if let Some(t) = token_of(id, "vmkeep-exp-") {
            tokens.insert(t);
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
    }
    let jobs = qmp.execute("query-block-jobs", Value::Null).await?;
    for j in jobs.as_array().into_iter().flatten() {
        let id = j["device"].as_str().unwrap_or_default();
        if let Some(t) = token_of(id, "vmkeep-job-") {
            tokens.insert(t);
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
    }
    for n in qmp.query_named_block_nodes().await? {
        if let Some(t) = token_of(&n.node_name, "vmkeep-fl-") {
            tokens.insert(t);
            match qmp.blockdev_del(&n.node_name).await {
                Ok(()) => log.push(format!("removed node {}", n.node_name)),
                Err(e) => warn!(error = %e, node = %n.node_name, "cannot remove a leftover node"),
            }
        }
    }
    if had_export && qmp.nbd_server_stop().await.is_ok() {
        log.push("stopped the NBD server".into());
    }
    if tokens.is_empty() {
        return Ok(log);
    }
    // Bitmaps of the dead captures: merge back into the disabled previous checkpoint.
    for n in qmp.query_named_block_nodes().await? {
        for t in &tokens {
            let new = format!("{BITMAP_PREFIX}{t}");
            if !n.dirty_bitmaps.iter().any(|b| b.name == new) {
                continue;
            }
            let prev = n.dirty_bitmaps.iter().find(|b| {
                b.name.starts_with(BITMAP_PREFIX)
                    && b.name != new
                    && !b.recording
                    && !b.inconsistent
            });
            let r = match prev {
                Some(p) => {
                    qmp.transaction(&[
                        TransactionAction::BlockDirtyBitmapMerge {
                            node: n.node_name.clone(),
                            target: p.name.clone(),
                            bitmaps: vec![BitmapRef::name(&new)],
                        },
                        TransactionAction::BlockDirtyBitmapEnable {
                            node: n.node_name.clone(),
                            name: p.name.clone(),
                        },
                        TransactionAction::BlockDirtyBitmapRemove {
                            node: n.node_name.clone(),
                            name: new.clone(),
                        },
                    ])
                    .await
                }
                None => qmp.block_dirty_bitmap_remove(&n.node_name, &new).await,
            };
            match r {
                Ok(()) => log.push(format!(
                    "bitmap {new} on {} {}",
                    n.node_name,
                    prev.map(|p| format!("merged back into {}", p.name))
                        .unwrap_or_else(|| "removed".into())
                )),
                Err(e) => warn!(error = %e, bitmap = %new, "cannot undo a leftover bitmap"),
            }
        }
    }
    Ok(log)
}
