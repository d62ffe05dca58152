//! Restore: write a restore point's disks as sparse raw files. A tree walker lists the non-zero
//! chunks in order, N workers read, verify and write them with positional writes; zero chunks are
//! never written (the file is created sparse at its full size). The file is written under a
//! `.partial` name and renamed when complete, so a killed restore never leaves a file that looks
//! finished.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crossbeam_channel::bounded;
use serde::Serialize;
use vmkeep_core::manifest::{DiskEntry, Manifest};
use vmkeep_core::tree;
use vmkeep_core::BlobId;

use crate::error::{Error, Result};
use crate::index::BlobIndex;
use crate::nodes::RepoNodes;
use crate::progress::Progress;
use crate::Repository;

#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    pub target: PathBuf,
    /// Only this disk (all when None).
    pub disk: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestoredDisk {
    pub name: String,
    pub path: PathBuf,
    pub bytes_written: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestoreStats {
    pub disks: Vec<RestoredDisk>,
    pub seconds: f64,
}

pub(crate) fn select_disks<'m>(m: &'m Manifest, disk: Option<&str>) -> Result<Vec<&'m DiskEntry>> {
    match disk {
        None => Ok(m.disks.iter().collect()),
        Some(name) => m
            .disk(name)
            .map(|d| vec![d])
            .ok_or_else(|| Error::NoSuchDisk {
                snapshot: format!("{:#}", m.id),
                disk: name.into(),
                available: m
                    .disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
    }
}

impl Repository {
    pub fn restore(
        &self,
        m: &Manifest,
        opts: &RestoreOptions,
        progress: &dyn Progress,
    ) -> Result<RestoreStats> {
        let started = std::time::Instant::now();
        let disks = select_disks(m, opts.disk.as_deref())?;
        std::fs::create_dir_all(&opts.target).map_err(|e| Error::TargetWrite {
            path: opts.target.clone(),
            cause: e,
        })?;
        for d in &disks {
            let path = opts.target.join(format!("{}.raw", d.name));
            if path.exists() {
                return Err(Error::TargetExists { path });
            }
        }
        let index = BlobIndex::load(self)?;
        let mut out = Vec::new();
        for d in disks {
            let path = opts.target.join(format!("{}.raw", d.name));
            let partial = opts.target.join(format!("{}.raw.partial", d.name));
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&partial)
                .map_err(|e| Error::TargetWrite {
                    path: partial.clone(),
                    cause: e,
                })?;
            file.set_len(d.size).map_err(|e| Error::TargetWrite {
                path: partial.clone(),
                cause: e,
            })?;
            progress.phase(&format!("restore {}", d.name), d.data_bytes);
            let written = self.write_disk(&index, d, &file, &partial, progress);
            progress.finish_phase();
            let written = match written {
                Ok(w) => w,
                Err(e) => {
                    let _ = std::fs::remove_file(&partial);
                    return Err(e);
                }
            };
            std::fs::rename(&partial, &path).map_err(|e| Error::TargetWrite {
                path: path.clone(),
                cause: e,
            })?;
            out.push(RestoredDisk {
                name: d.name.clone(),
                path,
                bytes_written: written,
            });
        }
        Ok(RestoreStats {
            disks: out,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Write every non-zero chunk of `d` into `file` at its offset. Returns bytes written.
    pub(crate) fn write_disk(
        &self,
        index: &BlobIndex,
        d: &DiskEntry,
        file: &File,
        path: &Path,
        progress: &dyn Progress,
    ) -> Result<u64> {
        let cs = self.config.chunk_size as u64;
        let chunks = d.size.div_ceil(cs);
        let threads = self.tuning.threads.max(1);
        let (tx, rx) = bounded::<Vec<(u64, BlobId)>>(threads * 4);
        std::thread::scope(|s| {
            let mut workers = Vec::new();
            for _ in 0..threads {
                let rx = rx.clone();
                workers.push(s.spawn(move || -> Result<u64> {
                    let mut written = 0;
                    for batch in rx {
                        for (i, id) in batch {
                            let data = self.read_blob(index, &id)?;
                            let expect = (d.size - i * cs).min(cs);
                            if data.len() as u64 != expect {
                                return Err(Error::corrupt(
                                    format!("chunk {id}"),
                                    vmkeep_core::Error::Corrupt {
                                        kind: "chunk",
                                        reason: format!(
                                            "{} bytes where the disk needs {expect}",
                                            data.len()
                                        ),
                                    },
                                ));
                            }
                            file.write_all_at(&data, i * cs)
                                .map_err(|e| Error::TargetWrite {
                                    path: path.to_path_buf(),
                                    cause: e,
                                })?;
                            written += data.len() as u64;
                            progress.advance(data.len() as u64);
                        }
                    }
                    Ok(written)
                }));
            }
            drop(rx);
            let nodes = RepoNodes { repo: self, index };
            let mut batch = Vec::with_capacity(16);
            let walk = tree::for_each_chunk(&nodes, &d.root, chunks, &mut |i, id| {
                batch.push((i, *id));
                if batch.len() == 16 {
                    tx.send(std::mem::take(&mut batch)).map_err(|_| {
                        vmkeep_core::Error::Invalid {
                            what: "restore",
                            reason: "workers stopped".into(),
                        }
                    })?;
                }
                Ok(())
            });
            if walk.is_ok() && !batch.is_empty() {
                let _ = tx.send(batch);
            }
            drop(tx);
            let mut total = 0;
            let mut first_err = None;
            for w in workers {
                match w
                    .join()
                    .unwrap_or_else(|_| Err(Error::Internal("restore worker panicked".into())))
                {
                    Ok(n) => total += n,
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            walk.map_err(|e| Error::corrupt(format!("index of disk {}", d.name), e))?;
            Ok(total)
        })
    }
}
