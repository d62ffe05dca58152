use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the object stores. Messages name the object and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object {key} not found")]
    NotFound { key: String },
    #[error("object {key} is shorter than expected (wanted {len} bytes at offset {offset})")]
    ShortRead { key: String, offset: u64, len: u64 },
    #[error("no space left on the device holding {path}: free space or move the repository")]
    NoSpace { path: PathBuf },
    #[error("permission denied on {path}")]
    PermissionDenied { path: PathBuf },
    #[error("{op} {path}: {cause}")]
    Io {
        op: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("invalid object name {name:?}")]
    InvalidName { name: String },
}

impl Error {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::NoSpace { path },
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                Error::PermissionDenied { path }
            }
            _ => Error::Io {
                op,
                path,
                cause: source,
            },
        }
    }
}
