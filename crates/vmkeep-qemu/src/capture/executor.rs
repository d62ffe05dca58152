//! The one undo executor (see [`super::undo`]): used by a capture on error and at its end, by
//! the guard after vmkeep died, and by the next capture finding the log of a dead one.
//!
//! Order: steps that give the guest back its CPU or filesystems (`cont`, thaw) first, then the
//! rest newest first, each waiting for the event that says it is complete (an export is gone at
//! `BLOCK_EXPORT_DELETED`, a migration when it is no longer active). A step whose object is
//! already gone counts as done. Errors do not stop the executor: every step is tried.

use std::time::Duration;

use serde_json::{json, Value};

use super::undo::Undo;
use crate::error::{Error, Result};
use crate::qmp::{BitmapRef, QmpClient, TransactionAction};

const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Which steps to undo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The end of a successful read, before the commit: everything but the bitmaps (they are
    /// settled by the commit's outcome).
    Teardown,
    /// Everything; bitmaps revert (`committed` false) or retire (true).
    All { committed: bool },
}

/// What the executor did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Sequence numbers of the steps undone (or found already undone).
    pub done: Vec<u64>,
    /// One line per step, for logs and tests.
    pub lines: Vec<String>,
    pub first_error: Option<Error>,
}

/// Undoes `steps` (sequence number, record) within `scope`.
pub async fn undo(qmp: &QmpClient, steps: &[(u64, Undo)], scope: Scope) -> Outcome {
    let mut out = Outcome::default();
    let committed = match scope {
        Scope::All { committed } => committed || steps.iter().any(|(_, s)| *s == Undo::Committed),
        Scope::Teardown => false,
    };
    for (seq, step) in order(steps) {
        let skip = match step {
            Undo::Bitmaps { .. } => scope == Scope::Teardown,
            Undo::Monitor { .. } | Undo::Committed => {
                if scope != Scope::Teardown {
                    out.done.push(*seq);
                }
                true
            }
            _ => false,
        };
        if skip {
            continue;
        }
        match undo_one(qmp, step, committed).await {
            Ok(what) => {
                out.lines.push(what);
                out.done.push(*seq);
            }
            Err(e) => {
                out.lines.push(format!("{}: {e}", describe(step)));
                out.first_error.get_or_insert(e);
            }
        }
    }
    out
}

/// The order of undoing: the urgent steps (the guest's CPU and filesystems back), newest first
/// (`cont` before thaw: a stopped guest's agent cannot answer), then the rest, newest first.
fn order(steps: &[(u64, Undo)]) -> Vec<&(u64, Undo)> {
    let mut order: Vec<&(u64, Undo)> = steps.iter().rev().filter(|(_, s)| s.is_urgent()).collect();
    order.extend(steps.iter().rev().filter(|(_, s)| !s.is_urgent()));
    order
}

fn describe(step: &Undo) -> String {
    match step {
        Undo::Monitor { qmp, .. } => format!("monitor {}", qmp.display()),
        Undo::Resume => "cont".into(),
        Undo::Thaw { .. } => "guest-fsfreeze-thaw".into(),
        Undo::DeleteNode { node } => format!("blockdev-del {node}"),
        Undo::RemoveFdset { fdset } => format!("remove-fd {fdset}"),
        Undo::CloseFd { name } => format!("closefd {name}"),
        Undo::Reattach { qdev, node } => format!("reattach {qdev} to {node}"),
        Undo::Bitmaps { node, .. } => format!("bitmaps of {node}"),
        Undo::StopNbdServer => "nbd-server-stop".into(),
        Undo::DeleteExport { id } => format!("block-export-del {id}"),
        Undo::CancelMigration => "migrate_cancel".into(),
        Undo::RestoreMigrationCaps { .. } => "migration capabilities restored".into(),
        Undo::RestoreMigrationBandwidth { max_bandwidth } => {
            format!("migration max-bandwidth {max_bandwidth} restored")
        }
        Undo::Committed => "committed".into(),
    }
}

/// QEMU's words for "no such object": the step is already undone.
fn gone(e: &Error) -> bool {
    match e {
        Error::QmpCommand { class, desc, .. } => {
            let d = desc.to_ascii_lowercase();
            class == "DeviceNotFound"
                || d.contains("not found")
                || d.contains("cannot find")
                || d.contains("failed to find")
                || d.contains("no such")
                || d.contains("not running")
                || d.contains("does not exist")
        }
        _ => false,
    }
}

fn ok_if_gone(r: Result<()>) -> Result<()> {
    match r {
        Err(e) if gone(&e) => Ok(()),
        r => r,
    }
}

async fn undo_one(qmp: &QmpClient, step: &Undo, committed: bool) -> Result<String> {
    let what = describe(step);
    match step {
        Undo::Monitor { .. } | Undo::Committed => {}
        Undo::Resume => {
            let st = qmp.query_status().await?;
            if !st.running {
                qmp.cont().await?;
            }
        }
        Undo::Thaw { agent } => {
            let mut a = super::agent::Agent::connect(agent, Duration::from_secs(10)).await?;
            a.thaw().await?;
        }
        Undo::DeleteNode { node } => ok_if_gone(qmp.blockdev_del(node).await)?,
        Undo::RemoveFdset { fdset } => ok_if_gone(
            qmp.execute("remove-fd", json!({ "fdset-id": fdset }))
                .await
                .map(drop),
        )?,
        Undo::CloseFd { name } => ok_if_gone(qmp.closefd(name).await)?,
        Undo::Reattach { qdev, node } => {
            let attached = qmp
                .query_block()
                .await?
                .into_iter()
                .find(|b| b.qdev.as_deref() == Some(qdev.as_str()))
                .and_then(|b| b.inserted.and_then(|i| i.node_name));
            if attached.as_deref() != Some(node.as_str()) {
                qmp.qom_set(qdev, "drive", json!(node)).await?;
            }
        }
        Undo::Bitmaps {
            node,
            new,
            previous,
            previous_recording,
        } => {
            return bitmaps(
                qmp,
                node,
                new,
                previous.as_deref(),
                *previous_recording,
                committed,
            )
            .await
            .map(|s| format!("{what}: {s}"))
        }
        Undo::StopNbdServer => ok_if_gone(qmp.nbd_server_stop().await)?,
        Undo::DeleteExport { id } => {
            let mut ev = qmp.events();
            match qmp
                .execute("block-export-del", json!({ "id": id, "mode": "hard" }))
                .await
            {
                Ok(_) => {
                    ev.wait_for(
                        "BLOCK_EXPORT_DELETED",
                        |e| e.data["id"] == id.as_str(),
                        EVENT_TIMEOUT,
                    )
                    .await?;
                }
                Err(e) if gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Undo::CancelMigration => cancel_migration(qmp).await?,
        Undo::RestoreMigrationCaps { caps } => {
            let caps: Vec<(&str, bool)> = caps.iter().map(|(c, s)| (c.as_str(), *s)).collect();
            qmp.migrate_set_capabilities(&caps).await?;
        }
        Undo::RestoreMigrationBandwidth { max_bandwidth } => {
            qmp.set_migrate_max_bandwidth(*max_bandwidth).await?;
        }
    }
    Ok(what)
}

/// Migration states in which a migration is still running.
fn migration_active(status: Option<&str>) -> bool {
    matches!(
        status,
        Some(
            "setup"
                | "active"
                | "device"
                | "pre-switchover"
                | "cancelling"
                | "postcopy-active"
                | "postcopy-paused"
                | "postcopy-recover"
                | "postcopy-recover-setup"
                | "wait-unplug"
        )
    )
}

async fn cancel_migration(qmp: &QmpClient) -> Result<()> {
    let info = qmp.query_migrate().await?;
    if !migration_active(info.status.as_deref()) {
        return Ok(());
    }
    qmp.execute("migrate_cancel", Value::Null).await?;
    let start = std::time::Instant::now();
    loop {
        let info = qmp.query_migrate().await?;
        if !migration_active(info.status.as_deref()) {
            return Ok(());
        }
        if start.elapsed() > EVENT_TIMEOUT {
            return Err(Error::Timeout {
                what: "the cancelled migration to end".into(),
                timeout: EVENT_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether `name` is a vmkeep bitmap of the same chain as `new` (`vmkeep-<chain>-<token>`), or
/// one from before bitmaps carried a chain (`vmkeep-<token>`).
pub fn same_chain(new: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(super::cbt::BITMAP_PREFIX) else {
        return false;
    };
    let legacy = !rest.contains('-');
    let chain = new.rsplit_once('-').map(|(c, _)| c).unwrap_or(new);
    legacy || name.rsplit_once('-').map(|(c, _)| c) == Some(chain)
}

async fn bitmaps(
    qmp: &QmpClient,
    node: &str,
    new: &str,
    previous: Option<&str>,
    previous_recording: bool,
    committed: bool,
) -> Result<String> {
    let on_node = super::disks::node_bitmaps(qmp, node).await?;
    if committed {
        // The previous checkpoint is consumed; any other bitmap of this chain belongs to a
        // restore point that is no longer the latest (forgotten, or a dead capture's): each
        // slows the guest's writes and blocks `qemu-img snapshot -a`.
        let mut removed = Vec::new();
        for b in on_node
            .iter()
            .filter(|b| b.name != new && same_chain(new, &b.name))
        {
            ok_if_gone(qmp.block_dirty_bitmap_remove(node, &b.name).await)?;
            removed.push(b.name.clone());
        }
        return Ok(format!("retired {removed:?}"));
    }
    if !on_node.iter().any(|b| b.name == new) {
        return Ok("cut never happened".into());
    }
    match previous {
        // The previous checkpoint recorded up to the cut: give it the writes since, so the
        // latest restore point's checkpoint stays exact.
        Some(p) if previous_recording => {
            qmp.transaction(&[
                TransactionAction::BlockDirtyBitmapMerge {
                    node: node.to_string(),
                    target: p.to_string(),
                    bitmaps: vec![BitmapRef::name(new)],
                },
                TransactionAction::BlockDirtyBitmapEnable {
                    node: node.to_string(),
                    name: p.to_string(),
                },
                TransactionAction::BlockDirtyBitmapRemove {
                    node: node.to_string(),
                    name: new.to_string(),
                },
            ])
            .await?;
            Ok(format!("{new} merged back into {p}, which records again"))
        }
        // A checkpoint that was not recording must never be re-enabled: it misses writes.
        _ => {
            qmp.block_dirty_bitmap_remove(node, new).await?;
            Ok(format!("{new} removed"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{order, same_chain, Undo};

    #[test]
    fn the_guest_runs_again_before_anything_else_and_cont_precedes_thaw() {
        let steps = vec![
            (1, Undo::DeleteNode { node: "sc".into() }),
            (
                2,
                Undo::Thaw {
                    agent: "/qga".into(),
                },
            ),
            (3, Undo::Resume),
            (4, Undo::DeleteNode { node: "cbw".into() }),
        ];
        let seqs: Vec<u64> = order(&steps).iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![3, 2, 4, 1]);
    }

    #[test]
    fn chains() {
        assert!(same_chain("vmkeep-aa11-t1", "vmkeep-aa11-t0"));
        assert!(!same_chain("vmkeep-aa11-t1", "vmkeep-bb22-t0"));
        assert!(same_chain("vmkeep-aa11-t1", "vmkeep-0123abcd4567"));
        assert!(!same_chain("vmkeep-aa11-t1", "other"));
    }
}
