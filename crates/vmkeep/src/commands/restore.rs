use std::path::Path;

use anyhow::Result;
use serde_json::json;
use vmkeep_qemu::qcow2_target::Qcow2Target;
use vmkeep_repo::restore::{select_disks, RestoredDisk};
use vmkeep_repo::{Manifest, Progress, Repository, RestoreOptions, RestoreStats};

use crate::args::{Format, Global, RestoreArgs};
use crate::context::open_repo;
use crate::output::{print_json, print_line};
use crate::progress::Bars;
use crate::size::human;

pub fn run(g: &Global, a: &RestoreArgs) -> Result<u8> {
    let repo = open_repo(g)?;
    let m = repo.resolve(&a.snapshot)?;
    let bars = Bars::new(g.quiet);
    let opts = RestoreOptions {
        target: a.target.clone(),
        disk: a.disk.clone(),
    };
    let st = match a.format {
        Format::Raw => repo.restore(&m, &opts, &bars)?,
        Format::Qcow2 => restore_qcow2(&repo, &m, &opts, &bars)?,
    };
    if g.json {
        print_json(&json!({"id": m.id, "disks": st.disks, "seconds": st.seconds}))?;
    } else {
        for d in &st.disks {
            print_line(&format!(
                "restored {} to {} ({} written)",
                d.name,
                d.path.display(),
                human(d.bytes_written)
            ))?;
        }
        print_line(&format!(
            "restore point {:#} restored in {:.2} s",
            m.id, st.seconds
        ))?;
    }
    Ok(0)
}

/// Every selected disk into a new DIR/DISK.qcow2, written through qemu-nbd (no temporary raw
/// copy; zero chunks stay unallocated). Each image is written as DISK.qcow2.partial and
/// renamed when complete.
pub(crate) fn restore_qcow2(
    repo: &Repository,
    m: &Manifest,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreStats> {
    let started = std::time::Instant::now();
    let disks = select_disks(m, opts.disk.as_deref())?;
    let target_dir: &Path = &opts.target;
    vmkeep_repo::restore::create_target_dir(target_dir).map_err(|e| {
        vmkeep_repo::Error::TargetWrite {
            path: target_dir.to_path_buf(),
            cause: e,
        }
    })?;
    let path_of = |name: &str| target_dir.join(format!("{name}.qcow2"));
    for d in &disks {
        let path = path_of(&d.name);
        if path.exists() {
            return Err(vmkeep_repo::Error::TargetExists { path }.into());
        }
    }
    let index = vmkeep_repo::index::BlobIndex::load(repo)?;
    let mut out = Vec::new();
    for d in disks {
        let target = Qcow2Target::create(&path_of(&d.name), d.size)?;
        let written = repo.restore_disk_to(&index, d, &target, progress)?;
        let path = target.commit()?;
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
