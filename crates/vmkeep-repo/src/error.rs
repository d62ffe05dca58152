//! The one error type of vmkeep-repo. Messages say what happened and, where it helps, what to do.
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The location holds no repository (no `config` object).
    #[error("no vmkeep repository at {location} (create one with `vmkeep init`)")]
    NotARepository { location: String },
    /// A `config` object exists but is not a vmkeep config.
    #[error("{location} is not a vmkeep repository: {reason}")]
    ForeignRepository { location: String, reason: String },
    #[error("a repository already exists at {location}")]
    AlreadyExists { location: String },
    #[error("the repository is encrypted: give the passphrase with --password-file, VMKEEP_PASSWORD_FILE or VMKEEP_PASSWORD")]
    PassphraseRequired,
    #[error("wrong passphrase for the repository at {location}")]
    WrongPassphrase { location: String },
    /// No key file unlocks the repository, and at least one key file could not be read.
    #[error("no key file of the repository at {location} accepts this passphrase, and {damaged}: if it held this passphrase, restore it from a copy of the repository, or use another passphrase")]
    KeyFileDamaged { location: String, damaged: String },
    #[error("the repository at {location} is encrypted but has no key file (keys/ is empty): it cannot be unlocked; restore keys/ from a copy of the repository")]
    NoKeyFile { location: String },
    /// The config says "not encrypted" but the repository shows that it is (FORMAT.md §3).
    #[error("the config of the repository at {location} says it is not encrypted, but {evidence}: the config looks tampered with (encryption switched off); refusing to use it. Restore the original config from a copy of the repository and find out who changed it")]
    PlainConfigTampered { location: String, evidence: String },
    /// A passphrase was given for a repository whose config says it is not encrypted.
    #[error("the repository at {location} is not encrypted, but a passphrase was given: if its config was tampered with to switch encryption off, restore the original config; if it really is unencrypted, run without --password-file, VMKEEP_PASSWORD_FILE and VMKEEP_PASSWORD")]
    PassphraseForPlain { location: String },
    #[error("no restore point matches {reference:?} (list them with `vmkeep snapshots`)")]
    UnknownSnapshot { reference: String },
    #[error("{reference:?} is ambiguous: it matches {candidates}; give more digits")]
    AmbiguousSnapshot {
        reference: String,
        candidates: String,
    },
    /// `VM@latest` cannot be answered while a manifest is unreadable (it may be the newest).
    #[error("cannot tell which restore point is {reference}: restore point {snapshot} is unreadable ({reason}){} and may be the newest; run `vmkeep check`, restore by id, or `vmkeep forget {snapshot}` if it is beyond repair", others_note(*.others))]
    LatestUnknown {
        reference: String,
        snapshot: String,
        reason: String,
        others: usize,
    },
    #[error("a snapshot reference needs at least 6 hex digits, or VM@latest; got {reference:?}")]
    ShortReference { reference: String },
    #[error("restore point {snapshot} has no disk named {disk:?} (it has: {available})")]
    NoSuchDisk {
        snapshot: String,
        disk: String,
        available: String,
    },
    #[error("restore point {snapshot} has no stream named {stream:?} (it has: {available})")]
    NoSuchStream {
        snapshot: String,
        stream: String,
        available: String,
    },
    /// The local cache could not be read or written (FORMAT.md §17). It is never needed:
    /// deleting it costs a rebuild from the repository.
    #[error("local cache {path}: cannot {what}: {source} (the cache is safe to delete; run with --no-cache to do without it)")]
    CacheIo {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    /// A cache file failed its verification: it is not used, and is rebuilt on the next run.
    #[error("local cache file {path} is damaged ({reason}); it was discarded and will be rebuilt from the repository: run the command again")]
    CacheDamaged { path: PathBuf, reason: String },
    /// Another process held the cache lock too long (it may be stopped).
    #[error("the local cache {path} has been locked by another vmkeep process for {waited_secs} s (is one stopped?)")]
    CacheBusy { path: PathBuf, waited_secs: u64 },
    /// A lookup in the local cache failed during the operation (the cache was discarded).
    #[error("the local cache failed: {reason}; run the command again (the cache is rebuilt from the repository), or run with --no-cache")]
    CacheFailed { reason: String },
    /// Corrupt or undecodable repository object.
    #[error("repository object {object} is damaged: {cause}")]
    CorruptObject {
        object: String,
        cause: vmkeep_core::Error,
    },
    /// A blob referenced by a restore point is not in any pack.
    #[error("blob {id} is missing from the repository (run `vmkeep check`)")]
    BlobMissing { id: String },
    #[error(transparent)]
    Store(vmkeep_store::Error),
    #[error(transparent)]
    Core(#[from] vmkeep_core::Error),
    /// The capture this backup reads from failed (a QEMU or NBD error, a refusal).
    #[error("{0}")]
    Source(vmkeep_io::SourceError),
    #[error("cannot read {path}: {cause}")]
    SourceRead {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is a {format} image, not raw: {hint}")]
    NotRaw {
        path: PathBuf,
        format: &'static str,
        hint: &'static str,
    },
    #[error("cannot write {path}: {cause}")]
    TargetWrite {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} already exists; remove it or choose another target")]
    TargetExists { path: PathBuf },
    #[error("another {what} is running on this repository ({holder}); wait for it, or if it died remove the stale lock with `vmkeep unlock` (`--remove-all` for a holder on another host or in another PID namespace, once you know it is gone)")]
    Locked { what: &'static str, holder: String },
    /// The operation's lease was not refreshed for the lease timeout (process stopped, machine
    /// suspended, store unreachable): others may have judged it dead and acted on that.
    #[error("{}", lease_lost_message(*kind))]
    LeaseLost { kind: crate::lease::LeaseKind },
    /// A replication's destination session stalled past its lease and data it reused there
    /// was reclaimed: nothing was committed.
    #[error(
        "this replication stalled longer than its lease at the destination and data it \
             reused there was reclaimed meanwhile; nothing was committed: run the replication \
             again (it sends only what is still missing)"
    )]
    ReplicationStalled,
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

fn lease_lost_message(kind: crate::lease::LeaseKind) -> String {
    use crate::lease::LeaseKind;
    match kind {
        LeaseKind::Backup => "this backup stalled longer than its lease and data it reused was \
                              reclaimed meanwhile; run the backup again"
            .into(),
        k => format!(
            "this {} was stopped longer than its lease timeout (process stopped, machine \
             suspended or repository unreachable) and may have been judged dead, so it stopped \
             before changing anything else; run it again",
            k.name()
        ),
    }
}

impl From<vmkeep_store::Error> for Error {
    /// An object over its kind's size bound is damage (it was never read), not an I/O failure.
    fn from(e: vmkeep_store::Error) -> Error {
        match too_large_or(e) {
            Ok((object, cause)) => Error::CorruptObject { object, cause },
            Err(e) => e,
        }
    }
}

/// A store error as damage when the object was over its bound: Ok((object, cause)) for callers
/// that record damaged objects and go on; any other store error as Err.
pub(crate) fn too_large_or(e: vmkeep_store::Error) -> Result<(String, vmkeep_core::Error)> {
    match e {
        vmkeep_store::Error::TooLarge {
            key,
            kind,
            size,
            max,
        } => Ok((key, vmkeep_core::Error::TooLarge { kind, size, max })),
        e => Err(Error::Store(e)),
    }
}

impl Error {
    pub(crate) fn cache_io(
        path: &std::path::Path,
        what: &'static str,
        source: std::io::Error,
    ) -> Error {
        Error::CacheIo {
            path: path.to_path_buf(),
            what,
            source,
        }
    }

    pub(crate) fn corrupt(object: impl Into<String>, source: vmkeep_core::Error) -> Error {
        Error::CorruptObject {
            object: object.into(),
            cause: source,
        }
    }

    /// True when retrying cannot help because the repository data is damaged.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            Error::CorruptObject { .. } | Error::BlobMissing { .. } | Error::LatestUnknown { .. }
        )
    }
}

fn others_note(others: usize) -> String {
    match others {
        0 => String::new(),
        1 => " (and 1 other)".into(),
        n => format!(" (and {n} others)"),
    }
}
