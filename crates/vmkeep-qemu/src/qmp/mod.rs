//! Async QMP client.
//!
//! ```no_run
//! # async fn demo() -> vmkeep_qemu::Result<()> {
//! use vmkeep_qemu::qmp::QmpClient;
//! let qmp = QmpClient::connect("/run/vm1/qmp.sock").await?;
//! let status = qmp.query_status().await?;
//! let mut events = qmp.events(); // subscribe before the command that causes the event
//! qmp.stop().await?;
//! events.wait_for("STOP", |_| true, std::time::Duration::from_secs(5)).await?;
//! # let _ = status; Ok(()) }
//! ```

mod client;
mod commands;
mod fdpass;
pub mod holder;

pub use client::{EventStream, QmpClient, QmpEvent, QmpGreeting, QmpOptions};
pub use commands::{
    BitmapRef, BlockDeviceInfo, BlockInfo, BlockNodeInfo, DirtyBitmapInfo, MigrationInfo,
    MigrationRam, NbdExport, StatusInfo, TransactionAction,
};
