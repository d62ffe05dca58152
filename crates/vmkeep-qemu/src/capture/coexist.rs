//! Another party's block job on the VM: named in one line before the capture changes anything.
//!
//! A backup, mirror, commit or stream job holds its disk's node; the capture's cut would fail
//! on it with QEMU's "Node '#block628' is busy: block device is in use by block job: backup",
//! which names neither the job's owner nor the way out. The job's id tells the owner: libvirt
//! names its jobs after the disk's node (`backup-vda-libvirt-1-format`, `libvirt-...`),
//! Proxmox after the drive (`drive-scsi0`); vmkeep's own (`vmkeep-...`) are its leftovers'
//! business ([`super::leftovers`]).

use serde_json::Value;

use crate::error::{Error, Result};
use crate::qmp::QmpClient;

/// One running block job: (id, type).
fn jobs(listed: &Value) -> Vec<(String, String)> {
    listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| {
            Some((
                j["device"].as_str()?.to_string(),
                j["type"].as_str().unwrap_or("block").to_string(),
            ))
        })
        .filter(|(id, _)| !id.starts_with("vmkeep"))
        .collect()
}

/// Who runs the job `id`, and what the user can do.
fn owner(id: &str) -> (&'static str, &'static str) {
    if id.contains("libvirt") {
        (
            "libvirt (a `virsh backup-begin`, e.g. by virtnbdbackup, or a blockcopy/blockcommit)",
            "wait until it ends (`virsh domjobinfo DOMAIN`) or end it (`virsh domjobabort DOMAIN`); for a libvirt domain, `vmkeep backup vm --libvirt DOMAIN` shares libvirt's backup API instead",
        )
    } else if id.starts_with("drive-") {
        (
            "Proxmox (vzdump or a disk move)",
            "wait until Proxmox's task ends, then run the backup again",
        )
    } else {
        (
            "another tool",
            "wait until it ends (`query-block-jobs`), or cancel it (`block-job-cancel`), then run the backup again",
        )
    }
}

/// Refuses when a block job of someone else runs on the VM.
pub async fn refuse_foreign_jobs(qmp: &QmpClient) -> Result<()> {
    let listed = qmp.execute("query-block-jobs", Value::Null).await?;
    match jobs(&listed).first() {
        None => Ok(()),
        Some((id, kind)) => {
            let (who, what) = owner(id);
            Err(Error::Refused(format!(
                "the VM's disks are in use by a {kind} job `{id}` started by {who}; QEMU lets one job hold a disk: {what}. Nothing was changed."
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_are_named_by_their_owner() {
        let listed = serde_json::json!([
            {"device": "vmkeep-fill-0", "type": "mirror"},
            {"device": "backup-vda-libvirt-1-format", "type": "backup"},
        ]);
        let j = jobs(&listed);
        assert_eq!(
            j,
            vec![("backup-vda-libvirt-1-format".into(), "backup".into())]
        );
        assert!(owner(&j[0].0).0.starts_with("libvirt"));
        assert!(owner("drive-scsi0").0.starts_with("Proxmox"));
        assert_eq!(owner("job0").0, "another tool");
        assert!(jobs(&serde_json::json!([])).is_empty());
    }
}
