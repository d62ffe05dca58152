//! The crate's one error type.

use std::path::PathBuf;
use std::time::Duration;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to QEMU (QMP) or to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The monitor accepted the connection but sent no greeting: another client holds it
    /// (`holder`: who, when it can be seen; `advice`: what to do).
    #[error(
        "QMP socket {} is held by another client{}: no greeting within {timeout:?}; {advice}",
        path.display(),
        holder.as_deref().map(|h| format!(" ({h})")).unwrap_or_default()
    )]
    QmpBusy {
        path: PathBuf,
        timeout: Duration,
        holder: Option<String>,
        advice: String,
    },

    /// QEMU answered a command with an error reply.
    #[error("QMP command {command} failed: {class}: {desc}")]
    QmpCommand {
        command: String,
        class: String,
        desc: String,
    },

    /// QEMU sent something that is not valid QMP (bad JSON, oversized line, wrong shape).
    #[error("QMP protocol violation: {0}")]
    QmpProtocol(String),

    /// The QMP connection is gone (QEMU exited or the socket was closed).
    #[error("QMP connection closed{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    QmpClosed { reason: Option<String> },

    /// An operation did not complete in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },

    /// The NBD server sent bytes that break the protocol. The connection is unusable.
    #[error("NBD protocol violation in {what}: {detail}")]
    NbdProtocol { what: &'static str, detail: String },

    /// The NBD server lacks something we require (fixed newstyle, structured replies, ...).
    #[error("NBD server does not support {0}")]
    NbdUnsupported(String),

    /// The server refused an option during the handshake (e.g. unknown export name).
    #[error("NBD server rejected {option}: {reply} {message:?}")]
    NbdOptionRejected {
        option: &'static str,
        reply: String,
        message: String,
    },

    /// A requested meta context (e.g. `qemu:dirty-bitmap:NAME`) is not offered by the export.
    #[error("NBD export does not offer meta context {0:?}")]
    NbdContextUnavailable(String),

    /// The server reported an error for one request (the connection stays usable).
    #[error("NBD server error {errno} ({}) for {command} at offset {offset}{}",
        errno_name(*errno), if message.is_empty() { String::new() } else { format!(": {message}") })]
    NbdServer {
        command: &'static str,
        offset: u64,
        errno: u32,
        message: String,
    },

    /// A request outside the export, or larger than this client allows.
    #[error("NBD request {offset}+{len} is invalid: {detail}")]
    NbdInvalidRequest {
        offset: u64,
        len: u64,
        detail: String,
    },

    /// A write to an export the server offers read-only (nothing was sent).
    #[error("NBD export {export:?} is read-only")]
    NbdReadOnly { export: String },

    /// The VM was stopped (by someone else, or QEMU) after our `cont` while its memory was
    /// captured: RAM and disks would not be from one instant.
    #[error("the VM was stopped during the memory capture, so its RAM and disks would not be from one instant; the capture was discarded")]
    InstantMoved,

    /// A `virsh` command failed; `message` is libvirt's own error text.
    #[error("libvirt: virsh {command} failed: {message}")]
    Libvirt { command: String, message: String },

    /// A capture or recovery refused, with what to do about it.
    #[error("{0}")]
    Refused(String),

    /// The NBD connection is closed (after a protocol error, a disconnect, or EOF).
    #[error("NBD connection closed{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    NbdClosed { reason: Option<String> },

    /// The NBD server's Unix socket path is already taken (a running server, or a stale file).
    #[error("NBD socket {} already exists: another server uses it, or it is stale (remove it)", path.display())]
    NbdSocketExists { path: PathBuf },

    /// NBD server options that cannot work (zero workers, a tiny request limit, ...).
    #[error("invalid NBD server options: {0}")]
    NbdServeOptions(String),

    /// A VM definition cannot be captured, read, or rewritten for a recovery.
    #[error("VM definition: {0}")]
    Definition(String),

    /// The QEMU at hand cannot run the recorded VM (architecture, machine type); the message
    /// names both QEMUs and the way out.
    #[error("{0}")]
    NotLoadable(String),

    /// A QEMU started for a recovery failed (exited, never answered, or refused the state);
    /// `log` is the tail of its log. QEMU is no longer running when this is returned.
    #[error("{what}{}", if log.is_empty() { String::new() } else { format!("; QEMU log ends with:\n{log}") })]
    Recovery { what: String, log: String },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn nbd(what: &'static str, detail: impl Into<String>) -> Self {
        Error::NbdProtocol {
            what,
            detail: detail.into(),
        }
    }

    /// The QEMU error class of a failed QMP command (`GenericError`, `CommandNotFound`, ...).
    pub fn qmp_class(&self) -> Option<&str> {
        match self {
            Error::QmpCommand { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// Symbolic name of an NBD errno value (NBD uses its own fixed numbering).
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown errno",
    }
}
