use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the object stores. Messages name the object and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object {key} not found")]
    NotFound { key: String },
    #[error("object {key} is shorter than expected (wanted {len} bytes at offset {offset})")]
    ShortRead { key: String, offset: u64, len: u64 },
    /// An object is larger than its reader allows; it was not read.
    #[error("{kind} {key} is too large: {size} bytes, at most {max} allowed")]
    TooLarge {
        key: String,
        kind: &'static str,
        size: u64,
        max: u64,
    },
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

    // Remote stores (docs/PROTOCOL.md). `what` says the operation and the object or route,
    // never the token.
    /// The server answered 401: the token is missing, malformed or unknown.
    #[error("the server {location} refused the token: pass --token-file or set VMKEEP_TOKEN")]
    Unauthorized { location: String },
    /// The server answered 403: the token lacks the right, or the object is outside its scope.
    #[error("{what}: the server refused it ({message}): the token lacks the right or the VM is outside its scope")]
    Forbidden { what: String, message: String },
    /// The server answered 422: uploaded bytes that are not what their name says.
    #[error("{what}: the server refused the upload as not matching its name ({message})")]
    Verification { what: String, message: String },
    /// Any other refusal, or a server error after the retries ran out.
    #[error("{what}: the server answered {status} ({message})")]
    Http {
        what: String,
        status: u16,
        message: String,
    },
    /// A reply that does not follow the protocol (bad JSON, a bad object name, a missing header).
    #[error("{what}: the server's reply is malformed: {message}")]
    BadReply { what: String, message: String },
    /// The server could not be reached, or the connection broke (after the retries ran out).
    #[error("{what}: {cause} (is the server running and reachable?)")]
    Network { what: String, cause: String },
    /// The pinned fingerprint does not match the server's certificate.
    #[error("the server's certificate fingerprint is {actual}, expected {expected} ({location}): check --tls-fingerprint or VMKEEP_TLS_FINGERPRINT against the one `vmkeep serve` printed")]
    FingerprintMismatch {
        location: String,
        actual: String,
        expected: String,
    },
    /// The TLS handshake failed (an untrusted certificate, a wrong host name, no common cipher).
    #[error("TLS with {location} failed: {cause} (for a self-signed server certificate, pass --tls-fingerprint)")]
    Tls { location: String, cause: String },
    /// No fingerprint was given and the system has no CA certificates to verify the server.
    #[error("no system CA certificates could be loaded{cause}: pass --tls-fingerprint with the fingerprint `vmkeep serve` printed")]
    NoTrustRoots { cause: String },
    #[error("invalid repository URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid TLS fingerprint: {reason}; expected the 64 hex digits `vmkeep serve` prints (colons and case are ignored)")]
    InvalidFingerprint { reason: String },
    #[error("invalid token ({reason}): check --token-file or VMKEEP_TOKEN")]
    InvalidToken { reason: String },

    // Object storage (s3://). `what` says the operation, the object and the bucket.
    /// A request failed for good (after the retries, or one that is never retried).
    #[error("{what}: {cause}")]
    ObjectStore { what: String, cause: String },
    /// The AWS configuration cannot be used (a missing profile, half a key pair, a bad URL).
    #[error("S3 configuration: {reason}")]
    S3Config { reason: String },
}

impl Error {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    pub fn is_too_large(&self) -> bool {
        matches!(self, Error::TooLarge { .. })
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
