use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;
use vmkeep_qemu::qcow2_target::Qcow2Target;
use vmkeep_repo::backup::MEMORY_STREAM;
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::restore::{select_disks, RestoredDisk};
use vmkeep_repo::{Manifest, Progress, Repository, RestoreOptions, RestoreStats};

use crate::args::{Format, Global, RestoreArgs};
use crate::context::open_repo;
use crate::output::{print_json, print_line};
use crate::progress::Bars;
use crate::size::human;

pub fn run(g: &Global, a: &RestoreArgs) -> Result<u8> {
    let repo = open_repo(g)?;
    // Before the restore point is read: a prune meanwhile keeps what it references.
    let _lease = repo.read_lease();
    let m = repo.resolve(&a.snapshot)?;
    let bars = Bars::new(g.quiet);
    if let Some(image) = &a.onto {
        return super::onto::run(g, &repo, &m, a.disk.as_deref(), image, &bars);
    }
    let opts = RestoreOptions {
        target: a.target.clone().expect("clap: --target unless --onto"),
        disk: a.disk.clone(),
    };
    // Refused before any disk is written: a restore point without memory, a file that exists.
    if let Some(f) = &a.memory_file {
        if !m.streams.iter().any(|s| s.name == MEMORY_STREAM) {
            anyhow::bail!(
                "restore point {:#} has no memory state (it was taken without --memory)",
                m.id
            );
        }
        if f.exists() {
            return Err(vmkeep_repo::Error::TargetExists { path: f.clone() }.into());
        }
    }
    let st = match a.format {
        Format::Raw => repo.restore(&m, &opts, &bars)?,
        Format::Qcow2 => restore_qcow2(&repo, &BlobIndex::load(&repo)?, &m, &opts, &bars)?,
    };
    crate::metrics::set_vm(&m.vm);
    crate::metrics::gauge(
        "vmkeep_restore_bytes_written",
        "Bytes written to the restored disks",
        &[],
        st.disks.iter().map(|d| d.bytes_written).sum::<u64>() as f64,
    );
    // What each new image holds, so a later `--onto` can write only the difference.
    for d in &st.disks {
        super::onto::write_record(&repo, &m, &d.name, &d.path)?;
    }
    let memory_bytes = match &a.memory_file {
        Some(f) => Some(write_memory(&repo, &m, f, &bars)?),
        None => None,
    };
    if g.json {
        print_json(
            &json!({"id": m.id, "disks": st.disks, "seconds": st.seconds,
            "memory_file": a.memory_file, "memory_bytes": memory_bytes}),
        )?;
    } else {
        for d in &st.disks {
            print_line(&format!(
                "restored {} to {} ({} written)",
                d.name,
                d.path.display(),
                human(d.bytes_written)
            ))?;
        }
        if let (Some(f), Some(n)) = (&a.memory_file, memory_bytes) {
            print_line(&format!(
                "memory and device state written to {} ({}); load it with QEMU's -incoming file:{}",
                f.display(),
                human(n),
                f.display()
            ))?;
        }
        print_line(&format!(
            "restore point {:#} restored in {:.2} s",
            m.id, st.seconds
        ))?;
    }
    Ok(0)
}

/// The memory stream into FILE.partial, fsynced, renamed to FILE: never a half file under
/// the final name.
fn write_memory(
    repo: &Repository,
    m: &Manifest,
    path: &Path,
    progress: &dyn Progress,
) -> Result<u64> {
    let partial = path.with_extension("partial");
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&partial)
        .with_context(|| format!("create {}", partial.display()))?;
    let n = repo.read_stream_to(m, MEMORY_STREAM, &mut f, progress);
    let n = match n.and_then(|n| {
        f.sync_all()
            .map_err(|cause| vmkeep_repo::Error::TargetWrite {
                path: partial.clone(),
                cause,
            })?;
        Ok(n)
    }) {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e.into());
        }
    };
    vmkeep_repo::restore::publish(&partial, path)
        .with_context(|| format!("rename {} to {}", partial.display(), path.display()))?;
    Ok(n)
}

/// Every selected disk into a new DIR/DISK.qcow2, written through qemu-nbd (no temporary raw
/// copy; zero chunks stay unallocated). Each image is written as DISK.qcow2.partial and
/// renamed when complete.
pub(crate) fn restore_qcow2(
    repo: &Repository,
    index: &BlobIndex,
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
    let mut out = Vec::new();
    for d in disks {
        let target = Qcow2Target::create(&path_of(&d.name), d.size)?;
        let written = repo.restore_disk_to(index, d, &target, progress)?;
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
