//! Instant recovery's QEMU side: each disk of the recovered VM is a local qcow2 whose backing
//! file is the restore point served over NBD ([`create_overlay`]); the VM starts at once on
//! it, and [`RunningQemu::stream_disks`] copies the served data into the qcow2 files with
//! `block-stream` while the guest runs. The guest's writes go to the qcow2 from the start and
//! are never overwritten (block-stream copies only clusters the top image lacks). When a job
//! completes QEMU drops the backing link from the image, so the VM runs from local disks alone.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::RunningQemu;
use crate::error::{Error, Result};

/// How often the jobs are polled for progress.
const POLL: Duration = Duration::from_millis(200);
/// How long a job paused by a read error waits before it is resumed.
const RETRY: Duration = Duration::from_secs(2);
/// Read errors in a row (without progress in between) after which a job fails. The server
/// waits out repository outages itself (`MountOptions::wait_out_outages`), so an error that
/// reaches the job is about the data, and retrying it for ever would hide it.
const FAILED_READS_MAX: u32 = 5;

pub use crate::overlay::{create_overlay, mark_zero_clusters};

/// The backing file of an instant recovery's overlay: the raw export `export` on the Unix
/// socket `socket`, with `reconnect-delay`: when the serving vmkeep goes away (killed,
/// crashed), QEMU holds the guest's reads of data not yet copied for that long, retrying the
/// connection, so a vmkeep started again on the same socket takes over without an I/O error.
pub fn instant_backing(socket: &Path, export: &str, reconnect_secs: u64) -> String {
    let spec = json!({"driver": "raw", "file": {"driver": "nbd",
        "server": {"type": "unix", "path": socket}, "export": export,
        "reconnect-delay": reconnect_secs}});
    format!("json:{spec}")
}

/// Progress of the copy: bytes done and to do, over every disk.
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamProgress {
    pub done: u64,
    pub total: u64,
}

impl RunningQemu {
    /// Streams every image in `images` (paths of the qcow2 files QEMU runs on) from its
    /// backing file into itself, reporting progress, until all are complete and no longer
    /// have a backing file. A job that fails is an error naming the disk and QEMU's reason.
    /// `rate`: bytes per second per disk (QEMU's `speed`), unlimited when `None`.
    pub fn stream_disks(
        &self,
        images: &[PathBuf],
        rate: Option<u64>,
        mut progress: impl FnMut(StreamProgress),
    ) -> Result<()> {
        let mut jobs = Vec::new();
        // Jobs an earlier vmkeep started (this one took the VM over): adopted as they are.
        let earlier = self.block_on(self.qmp().execute("query-block-jobs", Value::Null))?;
        let earlier = earlier.as_array().cloned().unwrap_or_default();
        for (i, image) in images.iter().enumerate() {
            let job = format!("vmkeep-stream-{i}");
            match earlier.iter().find(|j| j["device"] == job.as_str()) {
                Some(j) if j["status"] == "concluded" => {
                    self.block_on(self.qmp().execute("job-dismiss", json!({"id": job})))?;
                }
                Some(_) => {
                    tracing::info!(job, "adopting the copy job already running");
                    jobs.push((job, image.clone()));
                    continue;
                }
                None => {}
            }
            if self.backing_of(image)?.is_none() {
                continue; // copied before
            }
            let node = self.node_of(image)?;
            // on-error stop: a read the repository cannot answer now pauses the job, which
            // is resumed below, instead of failing the copy.
            let mut args = json!({"job-id": job, "device": node, "auto-dismiss": false,
                                  "on-error": "stop"});
            if let Some(r) = rate {
                args["speed"] = json!(r);
            }
            self.block_on(self.qmp().execute("block-stream", args))?;
            jobs.push((job, image.clone()));
        }
        // Per job: read errors in a row, and the offset when the last one happened.
        let mut failures = vec![(0u32, 0u64); jobs.len()];
        loop {
            let listed = self.block_on(self.qmp().execute("query-block-jobs", Value::Null))?;
            let listed = listed.as_array().cloned().unwrap_or_default();
            let mut p = StreamProgress::default();
            let mut running = 0;
            for ((job, image), failed) in jobs.iter().zip(failures.iter_mut()) {
                let Some(j) = listed.iter().find(|j| j["device"] == job.as_str()) else {
                    return Err(stream_failed(image, "the job vanished"));
                };
                let offset = j["offset"].as_u64().unwrap_or(0);
                p.done += offset;
                p.total += j["len"].as_u64().unwrap_or(0);
                match j["status"].as_str() {
                    Some("concluded") => {
                        if let Some(e) = j["error"].as_str() {
                            return Err(stream_failed(image, e));
                        }
                    }
                    Some("paused") if j["io-status"] == "failed" => {
                        running += 1;
                        *failed = match *failed {
                            (n, at) if at == offset => (n + 1, at),
                            _ => (1, offset),
                        };
                        if failed.0 >= FAILED_READS_MAX {
                            return Err(stream_failed(
                                image,
                                &format!(
                                    "a read from the repository failed {FAILED_READS_MAX} times \
                                     at byte {offset} (damaged or unreadable data: run vmkeep \
                                     check; the server's log says which chunk)"
                                ),
                            ));
                        }
                        tracing::warn!(
                            "copying {}: a read from the repository failed at byte {offset}; \
                             retrying",
                            image.display()
                        );
                        std::thread::sleep(RETRY);
                        self.block_on(
                            self.qmp()
                                .execute("block-job-resume", json!({"device": job})),
                        )?;
                    }
                    _ => running += 1,
                }
            }
            progress(p);
            if running == 0 {
                break;
            }
            std::thread::sleep(POLL);
        }
        for (job, _) in &jobs {
            self.block_on(self.qmp().execute("job-dismiss", json!({"id": job})))?;
        }
        for image in images {
            if self.backing_of(image)?.is_some() {
                return Err(stream_failed(image, "it still has a backing file"));
            }
        }
        Ok(())
    }

    /// The node name of the format node whose image file is `image`.
    fn node_of(&self, image: &Path) -> Result<String> {
        self.find_node(image)?
            .and_then(|n| n["node-name"].as_str().map(str::to_owned))
            .ok_or_else(|| stream_failed(image, "QEMU has no block node for it"))
    }

    /// The backing file QEMU sees for `image`, if any.
    fn backing_of(&self, image: &Path) -> Result<Option<String>> {
        Ok(self
            .find_node(image)?
            .and_then(|n| n["image"]["backing-filename"].as_str().map(str::to_owned)))
    }

    fn find_node(&self, image: &Path) -> Result<Option<Value>> {
        let nodes = self.block_on(
            self.qmp()
                .execute("query-named-block-nodes", json!({"flat": true})),
        )?;
        let want = image.to_string_lossy();
        Ok(nodes.as_array().and_then(|a| {
            a.iter()
                .find(|n| n["drv"] == "qcow2" && n["file"].as_str() == Some(&want))
                .cloned()
        }))
    }
}

fn stream_failed(image: &Path, why: &str) -> Error {
    Error::io(
        format!("copying {} from the repository", image.display()),
        std::io::Error::other(why.to_owned()),
    )
}
