//! vmkeep's QEMU side.
//!
//! - [`qmp`]: an async QMP (QEMU Machine Protocol) client over a unix socket: commands with
//!   per-command timeouts, typed errors, an event stream, and file-descriptor passing (`getfd`).
//! - [`nbd`]: an async NBD client (fixed newstyle, structured replies, meta contexts, block
//!   status) that validates every byte the server sends before using it.
//!
//! Both speak to programs we do not control, so every reply is size-bounded and checked;
//! hostile or broken peers produce an [`Error`], never a panic or an unbounded allocation.

pub mod error;
pub mod nbd;
pub mod qmp;

pub use error::{Error, Result};
