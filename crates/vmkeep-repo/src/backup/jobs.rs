//! Ready-made backups: disk images of a stopped VM.
use std::path::PathBuf;

use vmkeep_core::manifest::Manifest;

use super::{probe_image, BackupOptions, ReadPlan};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::Repository;

#[derive(Clone, Debug, Default)]
pub struct ImageBackupOptions {
    pub backup: BackupOptions,
    /// (disk name, path of a raw image or block device)
    pub disks: Vec<(String, PathBuf)>,
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
            let plan = ReadPlan {
                runs: image.data_runs(cs),
                cbt: "none".into(),
                ..Default::default()
            };
            session.add_disk(name, image, plan, progress)?;
        }
        session.commit()
    }
}
