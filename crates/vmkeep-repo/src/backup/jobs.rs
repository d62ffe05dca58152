//! Ready-made backups: disk images of a stopped VM.
use std::path::PathBuf;

use vmkeep_core::manifest::{ChangeTracking, Manifest};

use super::{probe_image, BackupOptions, ReadPlan};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::Repository;

#[derive(Clone, Debug, Default)]
pub struct ImageBackupOptions {
    pub backup: BackupOptions,
    /// (disk name, path of a raw image or block device)
    pub disks: Vec<(String, PathBuf)>,
    /// Read every image even when its file is unchanged since the parent restore point.
    pub full: bool,
}

impl Repository {
    /// Back up raw images / block devices as one restore point of a VM. Every image is probed
    /// (format, size, extents) before anything is written, so a bad argument costs nothing.
    pub fn backup_image(
        &self,
        opts: &ImageBackupOptions,
        progress: &dyn Progress,
    ) -> Result<Manifest> {
        if opts.disks.is_empty() {
            return Err(Error::Invalid {
                what: "arguments",
                reason: "no --disk given".into(),
            });
        }
        let images = opts
            .disks
            .iter()
            .enumerate()
            .map(|(i, (name, path))| {
                vmkeep_core::manifest::validate_name("disk name", name)?;
                if opts.disks[..i].iter().any(|(n, _)| n == name) {
                    return Err(Error::Invalid {
                        what: "disk name",
                        reason: format!("{name:?} given twice"),
                    });
                }
                Ok((name.clone(), probe_image(path)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut session = self.begin_backup(opts.backup.clone())?;
        let cs = self.config.chunk_size as u64;
        for (name, image) in &images {
            // An image file not written since the parent (same device, inode, size, mtime and
            // ctime) has the parent's content: reuse its index without reading (restic's
            // unchanged-file rule, on ctime which user tools cannot set). `full` reads anyway.
            let unchanged = session
                .parent()
                .and_then(|p| p.disk(name))
                .filter(|d| {
                    !opts.full
                        && d.size == image.info().size
                        && d.source_identity.is_some()
                        && d.source_identity.as_deref() == image.identity()
                })
                .map(|d| d.root);
            let plan = match unchanged {
                Some(root) => ReadPlan {
                    base: Some(root),
                    cbt: ChangeTracking::None,
                    cbt_reason: Some(
                        "file unchanged since the parent restore point (same inode, size, mtime and ctime): nothing read"
                            .into(),
                    ),
                    source_identity: image.identity().map(str::to_string),
                    ..Default::default()
                },
                None => ReadPlan {
                    runs: image.data_runs(cs),
                    cbt: ChangeTracking::None,
                    source_identity: image.identity().map(str::to_string),
                    ..Default::default()
                },
            };
            session.add_disk(name, image, plan, progress)?;
        }
        session.commit()
    }
}
