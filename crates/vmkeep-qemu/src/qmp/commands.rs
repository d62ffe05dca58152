//! Typed helpers for the QMP commands a backup needs, and the reply types they return.
//! Reply structs ignore unknown fields, so newer QEMUs keep working.

use std::os::fd::BorrowedFd;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::QmpClient;
use crate::error::{Error, Result};

/// `query-status`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct StatusInfo {
    pub running: bool,
    /// `running`, `paused`, `postmigrate`, ...
    pub status: String,
}

/// One entry of `query-block`.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockInfo {
    pub device: String,
    #[serde(default)]
    pub qdev: Option<String>,
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

/// `query-block` `inserted` member.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockDeviceInfo {
    /// Root node of the drive (auto-generated `#blockNNN` for `-drive`).
    #[serde(rename = "node-name", default)]
    pub node_name: Option<String>,
    pub file: String,
    pub drv: String,
    #[serde(rename = "ro", default)]
    pub read_only: bool,
}

/// One entry of `query-named-block-nodes` (flat).
#[derive(Debug, Clone, Deserialize)]
pub struct BlockNodeInfo {
    #[serde(rename = "node-name")]
    pub node_name: String,
    pub drv: String,
    pub file: String,
    #[serde(rename = "backing_file", default)]
    pub backing_file: Option<String>,
    #[serde(rename = "dirty-bitmaps", default)]
    pub dirty_bitmaps: Vec<DirtyBitmapInfo>,
    #[serde(rename = "ro", default)]
    pub read_only: bool,
    /// `image` (ImageInfo), kept raw: only a few format-specific fields are read.
    #[serde(default)]
    pub image: Value,
}

impl BlockNodeInfo {
    /// For qcow2 nodes, the image's compatibility level (`0.10` = v2, `1.1` = v3).
    pub fn qcow2_compat(&self) -> Option<&str> {
        self.image["format-specific"]["data"]["compat"].as_str()
    }
}

/// A dirty bitmap as reported in `query-named-block-nodes`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct DirtyBitmapInfo {
    #[serde(default)]
    pub name: String,
    pub recording: bool,
    #[serde(default)]
    pub persistent: bool,
    #[serde(default)]
    pub busy: bool,
    pub granularity: u64,
    /// Dirty bytes.
    pub count: u64,
    /// Left `in-use` by an unclean shutdown: unusable, can only be removed.
    #[serde(default)]
    pub inconsistent: bool,
}

/// `query-migrate` (the parts a capture needs).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct MigrationInfo {
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub ram: Option<MigrationRam>,
    #[serde(rename = "error-desc", default)]
    pub error_desc: Option<String>,
}

/// `query-migrate` `ram` member.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct MigrationRam {
    #[serde(default)]
    pub transferred: u64,
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub normal: u64,
    #[serde(default)]
    pub duplicate: u64,
}

/// A bitmap reference: a plain name (looked up on the target node's chain) or node + name.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum BitmapRef {
    Name(String),
    Node { node: String, name: String },
}

impl BitmapRef {
    pub fn name(name: &str) -> Self {
        BitmapRef::Name(name.to_owned())
    }
    pub fn on_node(node: &str, name: &str) -> Self {
        BitmapRef::Node {
            node: node.to_owned(),
            name: name.to_owned(),
        }
    }
}

/// One action of a QMP `transaction`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(
    tag = "type",
    content = "data",
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case"
)]
pub enum TransactionAction {
    BlockdevBackup {
        device: String,
        target: String,
        /// `none` for fleecing.
        sync: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        job_id: Option<String>,
    },
    BlockDirtyBitmapAdd {
        node: String,
        name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        persistent: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        disabled: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        granularity: Option<u32>,
    },
    BlockDirtyBitmapRemove {
        node: String,
        name: String,
    },
    BlockDirtyBitmapClear {
        node: String,
        name: String,
    },
    BlockDirtyBitmapEnable {
        node: String,
        name: String,
    },
    BlockDirtyBitmapDisable {
        node: String,
        name: String,
    },
    BlockDirtyBitmapMerge {
        node: String,
        target: String,
        bitmaps: Vec<BitmapRef>,
    },
}

impl TransactionAction {
    /// `blockdev-backup sync=none`: the fleecing cut.
    pub fn fleece(device: &str, target: &str, job_id: &str) -> Self {
        TransactionAction::BlockdevBackup {
            device: device.into(),
            target: target.into(),
            sync: "none".into(),
            job_id: Some(job_id.into()),
        }
    }
    /// Adds a recording bitmap.
    pub fn bitmap_add(node: &str, name: &str, persistent: bool) -> Self {
        TransactionAction::BlockDirtyBitmapAdd {
            node: node.into(),
            name: name.into(),
            persistent: Some(persistent),
            disabled: None,
            granularity: None,
        }
    }
    pub fn bitmap_disable(node: &str, name: &str) -> Self {
        TransactionAction::BlockDirtyBitmapDisable {
            node: node.into(),
            name: name.into(),
        }
    }
}

/// Arguments of an NBD `block-export-add`.
#[derive(Debug, Clone)]
pub struct NbdExport {
    pub id: String,
    pub node_name: String,
    /// Export name clients open.
    pub name: String,
    pub writable: bool,
    /// Bitmaps exposed as `qemu:dirty-bitmap:NAME`; export only disabled ones.
    pub bitmaps: Vec<BitmapRef>,
}

impl QmpClient {
    pub async fn query_status(&self) -> Result<StatusInfo> {
        self.execute_as("query-status", Value::Null).await
    }

    pub async fn query_block(&self) -> Result<Vec<BlockInfo>> {
        self.execute_as("query-block", Value::Null).await
    }

    /// `query-named-block-nodes` with `flat: true`.
    pub async fn query_named_block_nodes(&self) -> Result<Vec<BlockNodeInfo>> {
        self.execute_as("query-named-block-nodes", json!({ "flat": true }))
            .await
    }

    /// `blockdev-add` with the node's full description (QAPI `BlockdevOptions`).
    pub async fn blockdev_add(&self, options: Value) -> Result<()> {
        self.execute("blockdev-add", options).await.map(drop)
    }

    pub async fn blockdev_del(&self, node_name: &str) -> Result<()> {
        self.execute("blockdev-del", json!({ "node-name": node_name }))
            .await
            .map(drop)
    }

    /// Runs the actions atomically: all or none.
    pub async fn transaction(&self, actions: &[TransactionAction]) -> Result<()> {
        self.execute("transaction", json!({ "actions": actions }))
            .await
            .map(drop)
    }

    pub async fn block_dirty_bitmap_add(
        &self,
        node: &str,
        name: &str,
        persistent: bool,
        disabled: bool,
    ) -> Result<()> {
        let args =
            json!({ "node": node, "name": name, "persistent": persistent, "disabled": disabled });
        self.execute("block-dirty-bitmap-add", args).await.map(drop)
    }

    pub async fn block_dirty_bitmap_remove(&self, node: &str, name: &str) -> Result<()> {
        self.execute(
            "block-dirty-bitmap-remove",
            json!({ "node": node, "name": name }),
        )
        .await
        .map(drop)
    }

    pub async fn block_dirty_bitmap_clear(&self, node: &str, name: &str) -> Result<()> {
        self.execute(
            "block-dirty-bitmap-clear",
            json!({ "node": node, "name": name }),
        )
        .await
        .map(drop)
    }

    pub async fn block_dirty_bitmap_merge(
        &self,
        node: &str,
        target: &str,
        bitmaps: &[BitmapRef],
    ) -> Result<()> {
        let args = json!({ "node": node, "target": target, "bitmaps": bitmaps });
        self.execute("block-dirty-bitmap-merge", args)
            .await
            .map(drop)
    }

    pub async fn block_export_add_nbd(&self, e: &NbdExport) -> Result<()> {
        let args = json!({
            "type": "nbd", "id": e.id, "node-name": e.node_name, "name": e.name,
            "writable": e.writable, "bitmaps": e.bitmaps,
        });
        self.execute("block-export-add", args).await.map(drop)
    }

    /// Starts deleting an export; completion is the `BLOCK_EXPORT_DELETED` event.
    pub async fn block_export_del(&self, id: &str) -> Result<()> {
        self.execute("block-export-del", json!({ "id": id }))
            .await
            .map(drop)
    }

    /// `nbd-server-start` on a unix socket (legacy `addr` union, as QEMU 10 wants it).
    pub async fn nbd_server_start_unix(&self, path: &Path) -> Result<()> {
        let args = json!({ "addr": { "type": "unix", "data": { "path": path } } });
        self.execute("nbd-server-start", args).await.map(drop)
    }

    /// `nbd-server-start` on TCP.
    pub async fn nbd_server_start_tcp(&self, host: &str, port: u16) -> Result<()> {
        let args = json!({ "addr": { "type": "inet",
            "data": { "host": host, "port": port.to_string() } } });
        self.execute("nbd-server-start", args).await.map(drop)
    }

    pub async fn nbd_server_stop(&self) -> Result<()> {
        self.execute("nbd-server-stop", Value::Null).await.map(drop)
    }

    /// Cancels a block job; completion is `BLOCK_JOB_CANCELLED` (or `_COMPLETED`).
    pub async fn block_job_cancel(&self, device: &str, force: bool) -> Result<()> {
        self.execute(
            "block-job-cancel",
            json!({ "device": device, "force": force }),
        )
        .await
        .map(drop)
    }

    pub async fn stop(&self) -> Result<()> {
        self.execute("stop", Value::Null).await.map(drop)
    }

    pub async fn cont(&self) -> Result<()> {
        self.execute("cont", Value::Null).await.map(drop)
    }

    pub async fn qom_set(&self, path: &str, property: &str, value: Value) -> Result<()> {
        let args = json!({ "path": path, "property": property, "value": value });
        self.execute("qom-set", args).await.map(drop)
    }

    pub async fn query_migrate(&self) -> Result<MigrationInfo> {
        self.execute_as("query-migrate", Value::Null).await
    }

    /// Sets migration capabilities. Set the full list every time: they persist.
    pub async fn migrate_set_capabilities(&self, caps: &[(&str, bool)]) -> Result<()> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({ "capability": c, "state": s }))
            .collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": list }))
            .await
            .map(drop)
    }

    /// QEMU's migration bandwidth limit in bytes per second (`max-bandwidth`).
    pub async fn migrate_max_bandwidth(&self) -> Result<u64> {
        let p = self
            .execute("query-migrate-parameters", Value::Null)
            .await?;
        p["max-bandwidth"].as_u64().ok_or_else(|| {
            Error::QmpProtocol(format!(
                "query-migrate-parameters has no max-bandwidth: {p}"
            ))
        })
    }

    /// Sets QEMU's migration bandwidth limit in bytes per second. It persists: put the old
    /// value back when done.
    pub async fn set_migrate_max_bandwidth(&self, bytes_per_second: u64) -> Result<()> {
        self.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": bytes_per_second }),
        )
        .await
        .map(drop)
    }

    /// Starts a migration to `uri` (`file:PATH`, `fd:NAME`, `exec:CMD`).
    pub async fn migrate(&self, uri: &str) -> Result<()> {
        self.execute("migrate", json!({ "uri": uri }))
            .await
            .map(drop)
    }

    /// Hands `fd` to QEMU under `name` (SCM_RIGHTS), e.g. for `migrate uri=fd:NAME`.
    pub async fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        self.execute_with_fd("getfd", json!({ "fdname": name }), fd)
            .await
            .map(drop)
    }

    /// Closes an fd previously passed with [`getfd`](Self::getfd).
    pub async fn closefd(&self, name: &str) -> Result<()> {
        self.execute("closefd", json!({ "fdname": name }))
            .await
            .map(drop)
    }

    /// Asks QEMU to exit (the connection then closes).
    pub async fn quit(&self) -> Result<()> {
        self.execute("quit", Value::Null).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_actions_serialize_as_qapi() {
        let a = vec![
            TransactionAction::fleece("disk0", "fl", "job1"),
            TransactionAction::bitmap_add("disk0", "bm1", true),
            TransactionAction::bitmap_disable("disk0", "bm0"),
            TransactionAction::BlockDirtyBitmapMerge {
                node: "disk0".into(),
                target: "t".into(),
                bitmaps: vec![BitmapRef::name("a"), BitmapRef::on_node("n", "b")],
            },
        ];
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(
            v,
            json!([
                {"type":"blockdev-backup","data":{"device":"disk0","target":"fl","sync":"none","job-id":"job1"}},
                {"type":"block-dirty-bitmap-add","data":{"node":"disk0","name":"bm1","persistent":true}},
                {"type":"block-dirty-bitmap-disable","data":{"node":"disk0","name":"bm0"}},
                {"type":"block-dirty-bitmap-merge","data":{"node":"disk0","target":"t","bitmaps":["a",{"node":"n","name":"b"}]}}
            ])
        );
    }
}
