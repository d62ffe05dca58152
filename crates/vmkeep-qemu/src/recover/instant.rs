//! Instant recovery's QEMU side: each disk of the recovered VM is a local qcow2 whose backing
//! file is the restore point served over NBD ([`create_overlay`]); the VM starts at once on
//! it, and [`RunningQemu::copy_disks`] copies the served data into the qcow2 files while the
//! guest runs, in two steps:
//!
//! 1. **Fill, in parallel**: a `copy-on-read` filter node is added over each overlay (beside
//!    the guest's device, not in its path) and a `blockdev-mirror` (sync `full`) reads the
//!    whole disk through it into a `null-co` node. The mirror keeps two reads in flight (while
//!    one cluster is written the next is read); each
//!    read of a cluster the overlay lacks fetches it over NBD and writes it into the overlay,
//!    serialised against the guest's writes by QEMU's copy-on-read (a cluster the guest wrote
//!    is never overwritten). Once the mirror is ready it is cancelled (no pivot: the null
//!    target is thrown away) and the nodes are deleted. QEMU's `block-stream` alone reads
//!    one 512 KiB piece at a time: 5.8-7.5 s for 1.5 GiB here, against 3.7-4.0 s.
//! 2. **Stream**: `block-stream` copies whatever the overlay still lacks (nothing, unless the
//!    fill was interrupted) and, on completion, QEMU drops the backing link from the image, so
//!    the VM runs from local disks alone.
//!
//! Jobs an earlier vmkeep started (it was killed; this one took the VM over) are adopted by
//! their ids; nodes it added for a fill that is not running any more are deleted and made
//! again.
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::RunningQemu;
use crate::error::{Error, Result};

/// How often the jobs are polled for progress.
const POLL: Duration = Duration::from_millis(200);
/// How long a job paused by a read error waits before it is resumed.
const RETRY: Duration = Duration::from_secs(2);
/// The fill's bytes in flight: two reads of 1 MiB (the mirror's largest). The guest's reads of
/// data not yet copied queue behind them on the same NBD connection; with QEMU's default
/// (16 MiB: 16 reads) 200 random 4 KiB reads took 2.7 s during a fill, with 2 MiB 0.8 s (and
/// 0.06 s without a fill), and the fill itself was no slower: the server's read-ahead keeps
/// fetching the next chunks of a sequential reader in parallel anyway.
const FILL_BUFFER: u64 = 2 << 20;
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

/// A block job of the copy, and the image it copies into.
struct CopyJob {
    id: String,
    image: PathBuf,
}

/// The fill step's names for disk `i`: the mirror job; the nodes it reads through, from the
/// top (a throttle, only with a rate: QEMU's `speed` would count the zero ranges too, and a
/// throttle counts only what is read), the copy-on-read filter; the null node it writes to;
/// the throttle's group object.
struct FillNames {
    job: String,
    throttle: String,
    cor: String,
    sink: String,
    group: String,
}

impl FillNames {
    fn of(i: usize) -> FillNames {
        FillNames {
            job: format!("vmkeep-fill-{i}"),
            throttle: format!("vmkeep-fill-throttle-{i}"),
            cor: format!("vmkeep-fill-cor-{i}"),
            sink: format!("vmkeep-fill-null-{i}"),
            group: format!("vmkeep-fill-group-{i}"),
        }
    }
}

fn stream_job(i: usize) -> String {
    format!("vmkeep-stream-{i}")
}

impl RunningQemu {
    /// Copies every image in `images` (paths of the qcow2 files QEMU runs on) from its
    /// backing file into itself (see the module docs), reporting progress, until all are
    /// complete and no longer have a backing file. A job that fails is an error naming the
    /// disk and QEMU's reason. `rate`: bytes per second per disk, unlimited when `None` (the
    /// fill's reads through a throttle node, the stream's copies through its `speed`).
    /// Progress restarts at 0 for the stream step; callers keep the highest.
    pub fn copy_disks(
        &self,
        images: &[PathBuf],
        rate: Option<u64>,
        mut progress: impl FnMut(StreamProgress),
    ) -> Result<()> {
        let started = std::time::Instant::now();
        self.fill_disks(images, rate, &mut progress)?;
        let filled = started.elapsed().as_secs_f64();
        self.stream_disks(images, rate, &mut progress)?;
        tracing::info!(
            fill_seconds = filled,
            stream_seconds = started.elapsed().as_secs_f64() - filled,
            "disks copied"
        );
        Ok(())
    }

    /// Step 1 (module docs): a mirror per disk through a copy-on-read filter into a null node.
    fn fill_disks(
        &self,
        images: &[PathBuf],
        rate: Option<u64>,
        progress: &mut impl FnMut(StreamProgress),
    ) -> Result<()> {
        let listed = self.jobs()?;
        let mut jobs = Vec::new();
        for (i, image) in images.iter().enumerate() {
            let f = FillNames::of(i);
            // An earlier vmkeep's fill that ended: fill again below if data is still missing
            // (what was copied is not read over NBD again).
            if self.adopt(&listed, &f.job, "fill")? {
                jobs.push(CopyJob {
                    id: f.job,
                    image: image.clone(),
                });
                continue;
            }
            let streaming = listed.iter().any(|j| j["device"] == stream_job(i).as_str());
            if streaming || self.backing_of(image)?.is_none() {
                self.delete_fill_nodes(&f)?;
                continue;
            }
            // Nodes an earlier vmkeep added go first: their options may differ (the rate).
            self.delete_fill_nodes(&f)?;
            let node = self
                .find_node(image)?
                .ok_or_else(|| stream_failed(image, "QEMU has no block node for it"))?;
            let (Some(name), Some(size)) = (
                node["node-name"].as_str(),
                node["image"]["virtual-size"].as_u64(),
            ) else {
                return Err(stream_failed(image, "QEMU reports no node name or size"));
            };
            self.blockdev_add(json!({"driver": "copy-on-read", "node-name": f.cor,
                                     "file": name}))?;
            let source = match rate {
                Some(r) => {
                    self.block_on(self.qmp().execute(
                        "object-add",
                        json!({"qom-type": "throttle-group", "id": f.group,
                               "limits": {"bps-read": r}}),
                    ))?;
                    self.blockdev_add(json!({"driver": "throttle", "node-name": f.throttle,
                                             "throttle-group": f.group, "file": f.cor}))?;
                    &f.throttle
                }
                None => &f.cor,
            };
            self.blockdev_add(
                json!({"driver": "null-co", "node-name": f.sink, "size": size,
                                     "read-zeroes": true}),
            )?;
            // on-source-error stop: as for the stream below. buf-size: see FILL_BUFFER.
            let args = json!({"job-id": f.job, "device": source, "target": f.sink,
                              "sync": "full", "auto-dismiss": false,
                              "buf-size": FILL_BUFFER,
                              "on-source-error": "stop", "on-target-error": "stop"});
            self.block_on(self.qmp().execute("blockdev-mirror", args))?;
            jobs.push(CopyJob {
                id: f.job,
                image: image.clone(),
            });
        }
        // A ready mirror has read everything once: cancelled, it ends without a pivot.
        self.watch(&jobs, progress, |job| {
            self.block_on(
                self.qmp()
                    .execute("block-job-cancel", json!({"device": job})),
            )
            .map(|_| ())
        })?;
        for (i, _) in images.iter().enumerate() {
            let f = FillNames::of(i);
            if jobs.iter().any(|j| j.id == f.job) {
                self.dismiss(&f.job)?;
            }
            self.delete_fill_nodes(&f)?;
        }
        Ok(())
    }

    fn blockdev_add(&self, args: Value) -> Result<()> {
        self.block_on(self.qmp().execute("blockdev-add", args))?;
        Ok(())
    }

    /// Deletes the fill step's nodes and throttle group that exist (from the top down).
    fn delete_fill_nodes(&self, f: &FillNames) -> Result<()> {
        let present = self.node_names()?;
        for name in [&f.throttle, &f.cor, &f.sink] {
            if present.contains(name) {
                self.block_on(
                    self.qmp()
                        .execute("blockdev-del", json!({"node-name": name})),
                )?;
            }
        }
        let path = format!("/objects/{}", f.group);
        if self
            .block_on(self.qmp().execute("qom-list", json!({"path": path})))
            .is_ok()
        {
            self.block_on(self.qmp().execute("object-del", json!({"id": f.group})))?;
        }
        Ok(())
    }

    /// Step 2 (module docs): `block-stream` per disk, until no image has a backing file.
    fn stream_disks(
        &self,
        images: &[PathBuf],
        rate: Option<u64>,
        progress: &mut impl FnMut(StreamProgress),
    ) -> Result<()> {
        let mut jobs = Vec::new();
        let earlier = self.jobs()?;
        for (i, image) in images.iter().enumerate() {
            let job = stream_job(i);
            if self.adopt(&earlier, &job, "copy")? {
                jobs.push(CopyJob {
                    id: job,
                    image: image.clone(),
                });
                continue;
            }
            if self.backing_of(image)?.is_none() {
                continue; // copied before
            }
            let node = self.node_of(image)?;
            // on-error stop: a read the repository cannot answer now pauses the job, which
            // is resumed by `watch`, instead of failing the copy.
            let mut args = json!({"job-id": job, "device": node, "auto-dismiss": false,
                                  "on-error": "stop"});
            if let Some(r) = rate {
                args["speed"] = json!(r);
            }
            self.block_on(self.qmp().execute("block-stream", args))?;
            jobs.push(CopyJob {
                id: job,
                image: image.clone(),
            });
        }
        self.watch(&jobs, progress, |_| Ok(()))?;
        for job in &jobs {
            self.dismiss(&job.id)?;
        }
        for image in images {
            if self.backing_of(image)?.is_some() {
                return Err(stream_failed(image, "it still has a backing file"));
            }
        }
        Ok(())
    }

    /// Polls `jobs` until every one has concluded, reporting progress; a job paused by a
    /// read error is resumed (up to [`FAILED_READS_MAX`] times at one offset); `on_ready` is
    /// called once for a job that reports ready (a mirror). A job that concluded with an
    /// error, or vanished, is an error naming its disk.
    fn watch(
        &self,
        jobs: &[CopyJob],
        progress: &mut impl FnMut(StreamProgress),
        on_ready: impl Fn(&str) -> Result<()>,
    ) -> Result<()> {
        // Per job: read errors in a row and the offset when the last one happened; whether
        // `on_ready` was called.
        let mut failures = vec![(0u32, 0u64); jobs.len()];
        let mut readied = vec![false; jobs.len()];
        loop {
            let listed = self.jobs()?;
            let mut p = StreamProgress::default();
            let mut running = 0;
            for (k, job) in jobs.iter().enumerate() {
                let Some(j) = listed.iter().find(|j| j["device"] == job.id.as_str()) else {
                    return Err(stream_failed(&job.image, "the job vanished"));
                };
                let offset = j["offset"].as_u64().unwrap_or(0);
                p.done += offset;
                p.total += j["len"].as_u64().unwrap_or(0);
                match j["status"].as_str() {
                    Some("concluded") => {
                        if let Some(e) = j["error"].as_str() {
                            return Err(stream_failed(&job.image, e));
                        }
                    }
                    Some("paused") if j["io-status"] == "failed" => {
                        running += 1;
                        let failed = &mut failures[k];
                        *failed = match *failed {
                            (n, at) if at == offset => (n + 1, at),
                            _ => (1, offset),
                        };
                        if failed.0 >= FAILED_READS_MAX {
                            return Err(stream_failed(
                                &job.image,
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
                            job.image.display()
                        );
                        std::thread::sleep(RETRY);
                        self.block_on(
                            self.qmp()
                                .execute("block-job-resume", json!({"device": job.id})),
                        )?;
                    }
                    Some("ready") => {
                        running += 1;
                        if !readied[k] {
                            on_ready(&job.id)?;
                            readied[k] = true;
                        }
                    }
                    _ => running += 1,
                }
            }
            progress(p);
            if running == 0 {
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether job `id` of an earlier vmkeep (in `listed`) still runs, to be adopted; one
    /// that concluded is dismissed, so the caller may start it again.
    fn adopt(&self, listed: &[Value], id: &str, what: &str) -> Result<bool> {
        match listed.iter().find(|j| j["device"] == id) {
            Some(j) if j["status"] == "concluded" => {
                self.dismiss(id)?;
                Ok(false)
            }
            Some(_) => {
                tracing::info!(job = id, "adopting the {what} job already running");
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// QEMU's block jobs (`query-block-jobs`).
    fn jobs(&self) -> Result<Vec<Value>> {
        let listed = self.block_on(self.qmp().execute("query-block-jobs", Value::Null))?;
        Ok(listed.as_array().cloned().unwrap_or_default())
    }

    fn dismiss(&self, job: &str) -> Result<()> {
        self.block_on(self.qmp().execute("job-dismiss", json!({"id": job})))?;
        Ok(())
    }

    /// The names of QEMU's named block nodes.
    fn node_names(&self) -> Result<Vec<String>> {
        Ok(self
            .named_nodes()?
            .iter()
            .filter_map(|n| n["node-name"].as_str().map(str::to_owned))
            .collect())
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
        let want = image.to_string_lossy();
        Ok(self
            .named_nodes()?
            .into_iter()
            .find(|n| n["drv"] == "qcow2" && n["file"].as_str() == Some(&want)))
    }

    fn named_nodes(&self) -> Result<Vec<Value>> {
        let nodes = self.block_on(
            self.qmp()
                .execute("query-named-block-nodes", json!({"flat": true})),
        )?;
        Ok(nodes.as_array().cloned().unwrap_or_default())
    }
}

fn stream_failed(image: &Path, why: &str) -> Error {
    Error::io(
        format!("copying {} from the repository", image.display()),
        std::io::Error::other(why.to_owned()),
    )
}
