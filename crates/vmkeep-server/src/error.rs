use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of `vmkeep serve` and of the tokens file. Messages name the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {cause}")]
    Io {
        op: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The tokens file does not parse or holds an invalid entry.
    #[error("tokens file {path} is invalid: {reason}")]
    TokensFile { path: PathBuf, reason: String },
    /// A value given to `token add` (a VM glob, a right) is not valid.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// A certificate or key file cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    #[error("--tls-cert and --tls-key go together: give both or neither")]
    TlsHalfGiven,
    #[error("cannot listen on {addr}: {cause}")]
    Bind {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
    #[error("cannot start the server's runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Store(#[from] vmkeep_store::Error),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, cause: std::io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            cause,
        }
    }
}
