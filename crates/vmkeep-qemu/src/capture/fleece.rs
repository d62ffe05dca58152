//! The point-in-time cut (qemu-facts §1B/§7) and its teardown.
//!
//! Per disk a scratch qcow2 node backed by the disk's root node; then ONE transaction with, for
//! every disk, `blockdev-backup sync=none` into the scratch node (copy-before-write of old data
//! from now on), the new checkpoint bitmap, and the disabling of the previous one. The guest is
//! never paused. The scratch nodes are exported read-only over NBD on a unix socket in a private
//! directory, with the frozen previous bitmaps.
//!
//! Teardown order matters: export del (wait BLOCK_EXPORT_DELETED), block-job-cancel (wait
//! BLOCK_JOB_CANCELLED), blockdev-del, nbd-server-stop, scratch files removed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tracing::warn;

use crate::error::{Error, Result};
use crate::qmp::{BitmapRef, NbdExport, QmpClient, TransactionAction};

const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// One disk in the cut.
#[derive(Debug, Clone)]
pub struct FleeceDisk {
    /// The disk's root node (the cut's source, home of its bitmaps).
    pub root: String,
    pub size: u64,
    /// New checkpoint bitmap (recording from the cut on).
    pub new_bitmap: String,
    pub persistent: bool,
    /// Previous checkpoint bitmap to disable in the cut.
    pub previous: Option<String>,
    /// Frozen bitmap to export (the previous one when change tracking is used).
    pub export_bitmap: Option<String>,
    /// False when the cut had to go without bitmap operations (see [`Fleece::cut`]).
    pub bitmaps: bool,
    // Filled in by setup:
    pub scratch_node: String,
    pub job: String,
    pub export_id: String,
    pub export_name: String,
}

/// What exists in QEMU right now, so teardown removes exactly that.
pub struct Fleece {
    dir: tempfile::TempDir,
    pub disks: Vec<FleeceDisk>,
    nodes_added: Vec<String>,
    jobs_started: Vec<String>,
    exports_added: Vec<String>,
    nbd_started: bool,
}

impl Fleece {
    /// A private (0700) scratch directory and per-disk names derived from `token`.
    pub fn new(token: &str, mut disks: Vec<FleeceDisk>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("vmkeep-capture-")
            .tempdir()
            .map_err(|e| Error::io("create the capture's scratch directory", e))?;
        for (i, d) in disks.iter_mut().enumerate() {
            d.scratch_node = format!("vmkeep-fl-{token}-{i}");
            d.job = format!("vmkeep-job-{token}-{i}");
            d.export_id = format!("vmkeep-exp-{token}-{i}");
            d.export_name = format!("disk{i}");
        }
        Ok(Fleece {
            dir,
            disks,
            nodes_added: Vec::new(),
            jobs_started: Vec::new(),
            exports_added: Vec::new(),
            nbd_started: false,
        })
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    /// Creates the scratch images and adds their nodes (backing = the live disk).
    pub async fn prepare(&mut self, qmp: &QmpClient) -> Result<()> {
        for i in 0..self.disks.len() {
            let d = &self.disks[i];
            let path = self.dir.path().join(format!("scratch{i}.qcow2"));
            create_qcow2(&path, d.size)?;
            qmp.blockdev_add(json!({
                "driver": "qcow2", "node-name": d.scratch_node,
                "file": {"driver": "file", "filename": path},
                "backing": d.root,
            }))
            .await?;
            self.nodes_added.push(d.scratch_node.clone());
        }
        Ok(())
    }

    /// The atomic cut: all disks, all bitmap operations, one transaction.
    ///
    /// Tracking never fails a backup: when the transaction is refused (a transaction is all
    /// or nothing), it is retried with non-persistent bitmaps (e.g. qcow2 v2 images cannot
    /// store bitmaps), then without any bitmap operation. Returns why tracking was given up
    /// in that last case (every disk's `bitmaps` is then false and nothing is exported).
    pub async fn cut(&mut self, qmp: &QmpClient) -> Result<Option<String>> {
        let actions = |disks: &[FleeceDisk]| {
            let mut actions = Vec::new();
            for d in disks {
                actions.push(TransactionAction::fleece(&d.root, &d.scratch_node, &d.job));
                if !d.bitmaps {
                    continue;
                }
                actions.push(TransactionAction::bitmap_add(
                    &d.root,
                    &d.new_bitmap,
                    d.persistent,
                ));
                if let Some(p) = &d.previous {
                    actions.push(TransactionAction::bitmap_disable(&d.root, p));
                }
            }
            actions
        };
        let mut gave_up = None;
        if let Err(e) = qmp.transaction(&actions(&self.disks)).await {
            let mut last = e;
            let mut done = false;
            if self.disks.iter().any(|d| d.persistent) {
                warn!(error = %last, "cut refused; retrying with non-persistent bitmaps");
                for d in &mut self.disks {
                    d.persistent = false;
                }
                match qmp.transaction(&actions(&self.disks)).await {
                    Ok(()) => done = true,
                    Err(e) => last = e,
                }
            }
            if !done {
                warn!(error = %last, "cut refused; retrying without change tracking");
                for d in &mut self.disks {
                    d.bitmaps = false;
                    d.export_bitmap = None;
                }
                qmp.transaction(&actions(&self.disks)).await?;
                gave_up = Some(last.to_string());
            }
        }
        self.jobs_started = self.disks.iter().map(|d| d.job.clone()).collect();
        Ok(gave_up)
    }

    /// Starts the NBD server and exports every scratch node read-only.
    pub async fn export(&mut self, qmp: &QmpClient) -> Result<()> {
        qmp.nbd_server_start_unix(&self.nbd_socket()).await?;
        self.nbd_started = true;
        for d in &self.disks {
            qmp.block_export_add_nbd(&NbdExport {
                id: d.export_id.clone(),
                node_name: d.scratch_node.clone(),
                name: d.export_name.clone(),
                writable: false,
                bitmaps: d.export_bitmap.iter().map(|b| BitmapRef::name(b)).collect(),
            })
            .await?;
            self.exports_added.push(d.export_id.clone());
        }
        Ok(())
    }

    /// Removes everything this capture added, in the documented order. Keeps going after an
    /// error and returns the first one.
    pub async fn teardown(&mut self, qmp: &QmpClient) -> Result<()> {
        let mut first: Option<Error> = None;
        let mut note = |e: Error, what: &str| {
            warn!(error = %e, "capture teardown: {what}");
            if first.is_none() {
                first = Some(e);
            }
        };
        for id in std::mem::take(&mut self.exports_added) {
            let mut ev = qmp.events();
            match qmp
                .execute("block-export-del", json!({"id": id, "mode": "hard"}))
                .await
            {
                Ok(_) => {
                    if let Err(e) = ev
                        .wait_for(
                            "BLOCK_EXPORT_DELETED",
                            |e| e.data["id"] == id.as_str(),
                            EVENT_TIMEOUT,
                        )
                        .await
                    {
                        note(e, "waiting for BLOCK_EXPORT_DELETED");
                    }
                }
                Err(e) => note(e, "block-export-del"),
            }
        }
        for job in std::mem::take(&mut self.jobs_started) {
            let mut ev = qmp.events();
            match qmp.block_job_cancel(&job, true).await {
                Ok(()) => {
                    let j = job.clone();
                    let r = tokio::time::timeout(EVENT_TIMEOUT, async {
                        loop {
                            let e = ev.next().await?;
                            if matches!(
                                e.event.as_str(),
                                "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_COMPLETED"
                            ) && e.data["device"] == j.as_str()
                            {
                                return Ok::<(), Error>(());
                            }
                        }
                    })
                    .await;
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => note(e, "waiting for BLOCK_JOB_CANCELLED"),
                        Err(_) => note(
                            Error::Timeout {
                                what: format!("cancellation of block job {job}"),
                                timeout: EVENT_TIMEOUT,
                            },
                            "block job",
                        ),
                    }
                }
                Err(e) => note(e, "block-job-cancel"),
            }
        }
        for node in std::mem::take(&mut self.nodes_added) {
            if let Err(e) = qmp.blockdev_del(&node).await {
                note(e, "blockdev-del");
            }
        }
        if std::mem::take(&mut self.nbd_started) {
            if let Err(e) = qmp.nbd_server_stop().await {
                note(e, "nbd-server-stop");
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The scratch directory (removed when the `Fleece` is dropped).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Bitmap bookkeeping after the backup. Success: the consumed previous checkpoints go.
/// Failure: the previous checkpoint takes the writes recorded since the cut and records
/// again, and the new bitmap goes, so the latest restore point's checkpoint stays exact.
pub async fn finish_bitmaps(qmp: &QmpClient, disks: &[FleeceDisk], committed: bool) -> Result<()> {
    let mut first = None;
    for d in disks {
        let r = if committed {
            // Consumed, or (cut without bitmaps) belonging to a restore point that is no
            // longer the latest: useless either way.
            match &d.previous {
                Some(p) => qmp.block_dirty_bitmap_remove(&d.root, p).await,
                None => Ok(()),
            }
        } else if !d.bitmaps {
            Ok(()) // nothing was changed
        } else {
            match &d.previous {
                Some(p) => {
                    qmp.transaction(&[
                        TransactionAction::BlockDirtyBitmapMerge {
                            node: d.root.clone(),
                            target: p.clone(),
                            bitmaps: vec![BitmapRef::name(&d.new_bitmap)],
                        },
                        TransactionAction::BlockDirtyBitmapEnable {
                            node: d.root.clone(),
                            name: p.clone(),
                        },
                        TransactionAction::BlockDirtyBitmapRemove {
                            node: d.root.clone(),
                            name: d.new_bitmap.clone(),
                        },
                    ])
                    .await
                }
                None => qmp.block_dirty_bitmap_remove(&d.root, &d.new_bitmap).await,
            }
        };
        if let Err(e) = r {
            warn!(error = %e, node = %d.root, "checkpoint bitmap bookkeeping failed");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// `qemu-img create -f qcow2 PATH SIZE`.
pub fn create_qcow2(path: &Path, size: u64) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io("run qemu-img create", e))?;
    if !out.status.success() {
        return Err(Error::io(
            format!("qemu-img create {}", path.display()),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(())
}

/// A QMP event timestamp in milliseconds.
pub fn event_ms(ts: (i64, i64)) -> i64 {
    ts.0 * 1000 + ts.1 / 1000
}
