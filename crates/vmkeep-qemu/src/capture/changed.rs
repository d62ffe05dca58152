//! How much a VM's guest wrote since this repository's latest checkpoint, without capturing
//! anything (mechanism 22): the dirty bitmaps' counts, for a backup triggered by the amount of
//! change (`schedule add --when-changed`).
//!
//! QMP: every recording `vmkeep-<chain>-*` bitmap on the VM's nodes, the largest per node (a
//! node carries at most one recording bitmap of a chain once its backups settle). libvirt: the
//! newest checkpoint of the chain, `virsh checkpoint-dumpxml --size` (bytes changed per disk).
//! None when the chain has no checkpoint yet: the next backup is the first, so it is due.

use std::collections::HashMap;
use std::path::Path;

use super::cbt::of_chain;
use super::libvirt::Virsh;
use crate::error::Result;
use crate::qmp::QmpClient;

/// Dirty bytes on the VM behind the monitor `qmp` since chain `chain`'s latest checkpoint.
pub fn since_checkpoint_qmp(qmp: &Path, chain: &str) -> Result<Option<u64>> {
    let rt = super::session::runtime()?;
    rt.block_on(async {
        let client = QmpClient::connect(qmp).await?;
        let nodes = client.query_named_block_nodes().await;
        client.close().await;
        let mut per_node: HashMap<String, u64> = HashMap::new();
        for n in nodes? {
            for b in n
                .dirty_bitmaps
                .iter()
                .filter(|b| b.recording && !b.inconsistent && of_chain(&b.name, chain))
            {
                let e = per_node.entry(n.node_name.clone()).or_default();
                *e = (*e).max(b.count);
            }
        }
        Ok((!per_node.is_empty()).then(|| per_node.values().sum()))
    })
}

/// Bytes changed on libvirt domain `virsh.domain` since chain `chain`'s newest checkpoint.
pub fn since_checkpoint_libvirt(virsh: &Virsh, chain: &str) -> Result<Option<u64>> {
    let Some(newest) = virsh
        .checkpoint_names()?
        .into_iter()
        .rfind(|n| of_chain(n, chain))
    else {
        return Ok(None);
    };
    let xml = virsh.domain_cmd("checkpoint-dumpxml", &[&newest, "--size", "--no-domain"])?;
    Ok(Some(super::libvirt::xml::checkpoint_size(&xml)?))
}
