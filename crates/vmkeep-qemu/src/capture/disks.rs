//! The VM's disks as `query-block` and `query-named-block-nodes` show them.

use serde_json::Value;

use crate::error::Result;
use crate::qmp::{DirtyBitmapInfo, QmpClient};

/// One disk of a running VM.
#[derive(Debug, Clone)]
pub struct VmDisk {
    /// Stable name: the device id, else the drive id, else the root node name.
    pub name: String,
    /// Root (format) node of the drive: where bitmaps live and what the cut copies from.
    pub node: String,
    /// Format driver of the root node (`qcow2`, `raw`, ...).
    pub format: String,
    /// Image file name as QEMU reports it.
    pub file: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bitmaps on the root node.
    pub bitmaps: Vec<DirtyBitmapInfo>,
    /// The device the guest writes through (`query-block` `qdev`); None for a drive without
    /// one (nothing writes to it, so it needs no copy-before-write filter).
    pub qdev: Option<String>,
    /// Why checkpoint bitmaps on this disk cannot be persistent (None: they can).
    pub not_persistent: Option<String>,
}

impl VmDisk {
    /// Persistent bitmaps are stored in qcow2 v3 images; anything else gets process-lifetime
    /// ones.
    pub fn persistent_bitmaps(&self) -> bool {
        self.not_persistent.is_none()
    }
}

/// Why a node cannot hold persistent bitmaps (decided per disk, so one qcow2 v2 disk does not
/// make every disk's bitmaps non-persistent).
pub fn not_persistent(format: &str, node: Option<&crate::qmp::BlockNodeInfo>) -> Option<String> {
    match (format, node.and_then(|n| n.qcow2_compat())) {
        ("qcow2", Some("0.10")) => Some("qcow2 v2 (compat 0.10) image".into()),
        ("qcow2", _) => None,
        (f, _) => Some(format!("{f} disk")),
    }
}

/// A usable disk name from `query-block` fields.
pub fn disk_name(device: &str, qdev: Option<&str>, node: &str) -> String {
    let raw = match qdev {
        Some(q) if q.starts_with("/machine/peripheral/") => q
            .trim_start_matches("/machine/peripheral/")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string(),
        Some(q) if !q.is_empty() && !q.starts_with('/') => q.to_string(),
        _ if !device.is_empty() => device.to_string(),
        _ => node.to_string(),
    };
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    while s.starts_with(['.', '-', '_']) {
        s.remove(0);
    }
    s.truncate(64);
    if s.is_empty() {
        s = "disk".into();
    }
    s
}

/// Every writable, non-removable disk with a medium, in `query-block` order.
pub async fn list_disks(qmp: &QmpClient) -> Result<Vec<VmDisk>> {
    let blocks = qmp.execute("query-block", Value::Null).await?;
    let nodes = qmp.query_named_block_nodes().await?;
    let mut out: Vec<VmDisk> = Vec::new();
    for b in blocks.as_array().into_iter().flatten() {
        let ins = &b["inserted"];
        if !ins.is_object() || b["removable"].as_bool() == Some(true) {
            continue; // empty drive, cdrom, floppy
        }
        if ins["ro"].as_bool() == Some(true) {
            tracing::info!(device = %b["device"], "skipping read-only drive");
            continue;
        }
        let Some(node) = ins["node-name"].as_str() else {
            continue;
        };
        let device = b["device"].as_str().unwrap_or_default();
        let mut name = disk_name(device, b["qdev"].as_str(), node);
        if out.iter().any(|d| d.name == name) {
            name = disk_name("", None, node);
        }
        let size = ins["image"]["virtual-size"].as_u64().unwrap_or(0);
        let info = nodes.iter().find(|n| n.node_name == node);
        let bitmaps = info.map(|n| n.dirty_bitmaps.clone()).unwrap_or_default();
        let format = ins["drv"].as_str().unwrap_or_default().to_string();
        out.push(VmDisk {
            name,
            node: node.to_string(),
            not_persistent: not_persistent(&format, info),
            format,
            file: ins["file"].as_str().unwrap_or_default().to_string(),
            size,
            bitmaps,
            qdev: b["qdev"].as_str().map(str::to_string),
        });
    }
    Ok(out)
}

/// Bitmaps currently on `node`.
pub async fn node_bitmaps(qmp: &QmpClient, node: &str) -> Result<Vec<DirtyBitmapInfo>> {
    Ok(qmp
        .query_named_block_nodes()
        .await?
        .into_iter()
        .find(|n| n.node_name == node)
        .map(|n| n.dirty_bitmaps)
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::disk_name;

    #[test]
    fn names() {
        assert_eq!(
            disk_name("", Some("/machine/peripheral/vd0/virtio-backend"), "disk0"),
            "vd0"
        );
        assert_eq!(disk_name("", Some("scsi0"), "n"), "scsi0");
        assert_eq!(
            disk_name(
                "virtio0",
                Some("/machine/peripheral-anon/device[0]/virtio-backend"),
                "#block1"
            ),
            "virtio0"
        );
        assert_eq!(disk_name("", None, "#block123"), "block123");
    }
}
