//! `vmkeep recover SNAP --libvirt --target DIR [--name NAME] [--cold]`: a restore point of a
//! libvirt domain running again under libvirt.
//!
//! Order, for "refuse clearly, leave nothing": the recorded definitions are read and the name
//! checked free before anything is written; the disks are restored into DIR; the rewritten
//! definition is defined; the domain is started, or restored from its memory through a save
//! image streamed into libvirt (vmkeep_qemu::recover::libvirt). If the start or the restore
//! fails, the definition is removed again (the restored disks stay in DIR).

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{bail, Context, Result};
use serde_json::json;
use vmkeep_qemu::capture::libvirt::xml::parse_domain;
use vmkeep_qemu::capture::libvirt::{Virsh, DOMAIN_XML_STREAM, RUNNING_XML_STREAM};
use vmkeep_qemu::recover::libvirt::{self as lv, LibvirtRecovery};
use vmkeep_repo::backup::MEMORY_STREAM;
use vmkeep_repo::index::BlobIndex;
use vmkeep_repo::{Manifest, NoProgress, Repository, RestoreOptions};

use super::recover::Bounded;
use crate::args::{Global, RecoverArgs};
use crate::output::{print_json, print_line};
use crate::progress::Bars;

pub fn run(
    g: &Global,
    a: &RecoverArgs,
    repo: &Repository,
    index: &BlobIndex,
    m: &Manifest,
) -> Result<u8> {
    let has = |name: &str| m.streams.iter().any(|s| s.name == name);
    if !has(DOMAIN_XML_STREAM) {
        bail!(
            "restore point {:#} was not taken from a libvirt domain (it has no domain XML): \
             recover it without --libvirt",
            m.id
        );
    }
    let resume = !a.cold && has(MEMORY_STREAM);
    if !a.cold && !resume {
        bail!(
            "restore point {:#} has no memory state (it was taken without --memory): recover \
             it with --cold to boot from its disks",
            m.id
        );
    }
    if resume && !has(RUNNING_XML_STREAM) {
        bail!(
            "restore point {:#} has memory but not the running domain's definition it belongs \
             to: recover it with --cold",
            m.id
        );
    }
    let inactive = read_text(repo, index, m, DOMAIN_XML_STREAM)?;
    let running = match resume {
        true => Some(read_text(repo, index, m, RUNNING_XML_STREAM)?),
        false => None,
    };
    let recorded = parse_domain(&inactive)?;
    let name = a.name.clone().unwrap_or_else(|| recorded.name.clone());
    let virsh = Virsh::new(a.connect.clone(), name.clone());
    if virsh.domain_cmd("domstate", &[]).is_ok() {
        bail!(
            "libvirt already has a domain named {name}: give the recovered one another name \
             with --name"
        );
    }
    // The same UUID names the same machine, unless libvirt has it already (the original still
    // defined on this host).
    let uuid_taken = Virsh::new(a.connect.clone(), recorded.uuid.clone())
        .domain_cmd("domname", &[])
        .is_ok();
    let domain_type = match a.accel.as_deref() {
        None => None,
        Some("tcg") => Some("qemu".to_string()),
        Some("kvm") => Some("kvm".to_string()),
        Some(other) => bail!("--accel {other}: a libvirt domain runs with tcg or kvm"),
    };
    let target = std::path::absolute(&a.target)
        .with_context(|| format!("resolve {}", a.target.display()))?;
    super::recover::refuse_non_empty(&target)?;
    std::fs::create_dir_all(&target).with_context(|| format!("create {}", target.display()))?;
    // QEMU runs as libvirt's user: it must reach the disks (libvirt labels the files).
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

    let bars = Bars::new(g.quiet);
    let opts = RestoreOptions {
        target: target.clone(),
        disk: None,
    };
    super::restore::restore_qcow2(repo, index, m, &opts, &bars)?;
    let disks: BTreeMap<String, std::path::PathBuf> = m
        .disks
        .iter()
        .map(|d| (d.name.clone(), target.join(format!("{}.qcow2", d.name))))
        .collect();
    let mut place = LibvirtRecovery {
        name: name.clone(),
        uuid: (!uuid_taken).then(|| recorded.uuid.clone()),
        dir: target.clone(),
        disks,
        network: a.network,
        domain_type,
        console_to_file: false,
    };
    let uuid = lv::define(&virsh, &target, &lv::rewrite_domain(&inactive, &place)?)?;
    let started = match &running {
        None => virsh.domain_cmd("start", &[]).map(drop),
        Some(xml) => {
            place.uuid = Some(uuid.clone());
            let head = lv::save_image_header(&lv::rewrite_domain(xml, &place)?, true);
            lv::restore_streamed(&virsh, head, |w| {
                repo.read_stream_with(index, m, MEMORY_STREAM, w, &NoProgress)
                    .map(drop)
                    .map_err(std::io::Error::other)
            })
        }
    };
    if let Err(e) = started {
        let _ = virsh.domain_cmd("destroy", &[]);
        let _ = virsh.domain_cmd("undefine", &["--nvram"]);
        return Err(anyhow::Error::new(e).context(format!(
            "libvirt could not {} domain {name} (its definition was removed again; the \
             restored disks stay in {})",
            if resume { "restore" } else { "start" },
            target.display()
        )));
    }
    if g.json {
        // cli-contract's recover fields: libvirt holds the monitor (no "qmp" of ours); the pid
        // from libvirt's system pid file when it is there; the console log when it is a file.
        let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        let serial = Some(target.join("serial.log")).filter(|p| p.exists());
        print_json(&json!({
            "id": m.id,
            "pid": pid,
            "qmp": null,
            "serial": serial,
            "domain": name,
            "uuid": uuid,
            "resumed": resume,
            "target": target,
            "network": a.network,
        }))?;
    } else {
        print_line(&format!(
            "VM {} of restore point {:#} is libvirt domain {name} ({uuid}), {}; its disks are in \
             {}{}",
            m.vm,
            m.id,
            if resume {
                "resumed where it was captured"
            } else {
                "booted from its disks"
            },
            target.display(),
            if a.network {
                ""
            } else {
                " (network cut off: NICs attached to nothing, links down)"
            }
        ))?;
    }
    Ok(0)
}

/// A recorded XML stream, bounded like the QEMU definition.
pub(super) fn read_text(
    repo: &Repository,
    index: &BlobIndex,
    m: &Manifest,
    name: &str,
) -> Result<String> {
    let mut buf = Bounded(Vec::new());
    repo.read_stream_with(index, m, name, &mut buf as &mut dyn Write, &NoProgress)?;
    String::from_utf8(buf.0).with_context(|| format!("stream {name} of {:#} is not UTF-8", m.id))
}
