//! The tokens file (`--tokens FILE`, PROTOCOL.md §2): JSON, mode 0600, holding for each token
//! only its id, the BLAKE3 of the whole token, its VM globs and rights. `add` mints a token and
//! rewrites the file atomically; the server rereads it whenever its modification time (or size,
//! or inode) changes, so tokens added or removed take effect without a restart.
use std::fmt;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, RwLock};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::glob;

pub const TOKENS_VERSION: u32 = 1;
/// Largest tokens file read (a few hundred bytes per token).
const MAX_TOKENS_FILE: u64 = 16 << 20;
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;

/// What a token may do (PROTOCOL.md §2). `append` includes `read`; `admin` includes both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    Read,
    Append,
    Admin,
}

impl Right {
    pub const fn as_str(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::Append => "append",
            Right::Admin => "admin",
        }
    }
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Right {
    type Err = Error;
    fn from_str(s: &str) -> Result<Right> {
        match s {
            "read" => Ok(Right::Read),
            "append" => Ok(Right::Append),
            "admin" => Ok(Right::Admin),
            _ => Err(Error::Invalid {
                what: "right",
                reason: format!("{s:?}: expected read, append or admin"),
            }),
        }
    }
}

/// One entry of the tokens file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// 16 hex digits, public: names the token in logs.
    pub id: String,
    /// BLAKE3 of the whole token string, 64 hex digits.
    pub hash: String,
    /// Globs over VM names; `*` among them gives the whole-repository scope.
    pub vms: Vec<String>,
    pub rights: Vec<Right>,
    pub created: chrono::DateTime<chrono::Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    pub version: u32,
    pub tokens: Vec<TokenEntry>,
}

/// A freshly minted token: `token` is shown once and stored nowhere.
#[derive(Clone, PartialEq, Eq)]
pub struct Minted {
    pub token: String,
    pub id: String,
    pub vms: Vec<String>,
    pub rights: Vec<Right>,
}

impl fmt::Debug for Minted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minted")
            .field("token", &"<redacted>")
            .field("id", &self.id)
            .field("vms", &self.vms)
            .field("rights", &self.rights)
            .finish()
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The id of a well-formed token `vmk_<16 hex>_<64 hex>`, None when malformed.
pub fn token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix("vmk_")?;
    let (id, secret) = rest.split_once('_')?;
    (is_lower_hex(id, ID_HEX) && is_lower_hex(secret, SECRET_HEX)).then_some(id)
}

/// The hash the tokens file keeps: BLAKE3 of the whole token string.
pub fn token_hash(token: &str) -> blake3::Hash {
    blake3::hash(token.as_bytes())
}

impl TokensFile {
    /// Parse and validate: version, ids (16 hex, unique), hashes (64 hex), globs.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<TokensFile> {
        let invalid = |reason: String| Error::TokensFile {
            path: path.to_path_buf(),
            reason,
        };
        let f: TokensFile = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if f.version != TOKENS_VERSION {
            return Err(invalid(format!(
                "version {} (this build reads {TOKENS_VERSION})",
                f.version
            )));
        }
        let mut ids = std::collections::HashSet::new();
        for t in &f.tokens {
            if !is_lower_hex(&t.id, ID_HEX) {
                return Err(invalid(format!("id {:?} is not 16 hex digits", t.id)));
            }
            if !ids.insert(t.id.as_str()) {
                return Err(invalid(format!("id {} appears twice", t.id)));
            }
            if !is_lower_hex(&t.hash, 64) {
                return Err(invalid(format!(
                    "token {}: hash is not 64 hex digits",
                    t.id
                )));
            }
            for g in &t.vms {
                glob::validate(g).map_err(|r| invalid(format!("token {}: {r}", t.id)))?;
            }
        }
        Ok(f)
    }

    /// Read a tokens file (bounded). Err(Io) with NotFound when it does not exist.
    pub fn load(path: &Path) -> Result<TokensFile> {
        let f = fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
        let mut bytes = Vec::new();
        f.take(MAX_TOKENS_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io("read", path, e))?;
        if bytes.len() as u64 > MAX_TOKENS_FILE {
            return Err(Error::TokensFile {
                path: path.to_path_buf(),
                reason: format!("larger than {MAX_TOKENS_FILE} bytes"),
            });
        }
        TokensFile::parse(&bytes, path)
    }

    /// Write atomically: a temporary file (mode 0600) in the same folder, fsynced, renamed over
    /// the file, then the folder fsynced.
    pub fn store(&self, path: &Path) -> Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "tokens".into());
        let mut r = [0u8; 8];
        getrandom::getrandom(&mut r)
            .map_err(|e| Error::io("random", path, std::io::Error::other(e.to_string())))?;
        let tmp = dir.join(format!(".{name}.tmp-{}", hex::encode(r)));
        let mut bytes = serde_json::to_vec_pretty(self).expect("a tokens file serialises");
        bytes.push(b'\n');
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("write", path, e));
        }
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("fsync", &dir, e))
    }
}

/// Serialises `add` and `remove` within this process (the rename keeps readers safe anyway).
static EDIT: Mutex<()> = Mutex::new(());

fn load_or_empty(path: &Path) -> Result<TokensFile> {
    match TokensFile::load(path) {
        Ok(f) => Ok(f),
        Err(Error::Io { cause, .. }) if cause.kind() == ErrorKind::NotFound => Ok(TokensFile {
            version: TOKENS_VERSION,
            tokens: Vec::new(),
        }),
        Err(e) => Err(e),
    }
}

/// Mint a token for `vms` (globs) with `rights`, and add its hash to the tokens file (created
/// with mode 0600 when absent, rewritten atomically).
pub fn add(path: &Path, vms: &[String], rights: &[Right], comment: Option<&str>) -> Result<Minted> {
    if vms.is_empty() {
        return Err(Error::Invalid {
            what: "VM globs",
            reason: "give at least one (`*` for the whole repository)".into(),
        });
    }
    for g in vms {
        glob::validate(g).map_err(|reason| Error::Invalid {
            what: "VM glob",
            reason,
        })?;
    }
    if rights.is_empty() {
        return Err(Error::Invalid {
            what: "rights",
            reason: "give at least one of read, append, admin".into(),
        });
    }
    let mut rights = rights.to_vec();
    rights.sort();
    rights.dedup();
    let _guard = EDIT.lock().unwrap_or_else(|e| e.into_inner());
    let mut file = load_or_empty(path)?;
    let mut random = [0u8; 8 + 32];
    let (id, token) = loop {
        getrandom::getrandom(&mut random)
            .map_err(|e| Error::io("random", path, std::io::Error::other(e.to_string())))?;
        let id = hex::encode(&random[..8]);
        if !file.tokens.iter().any(|t| t.id == id) {
            let token = format!("vmk_{id}_{}", hex::encode(&random[8..]));
            break (id, token);
        }
    };
    file.tokens.push(TokenEntry {
        id: id.clone(),
        hash: token_hash(&token).to_hex().to_string(),
        vms: vms.to_vec(),
        rights: rights.clone(),
        created: chrono::Utc::now(),
        comment: comment.map(str::to_string),
    });
    file.store(path)?;
    Ok(Minted {
        token,
        id,
        vms: vms.to_vec(),
        rights,
    })
}

/// Remove the token `id` from the tokens file; Ok(false) when it was not there.
pub fn remove(path: &Path, id: &str) -> Result<bool> {
    let _guard = EDIT.lock().unwrap_or_else(|e| e.into_inner());
    let mut file = TokensFile::load(path)?;
    let before = file.tokens.len();
    file.tokens.retain(|t| t.id != id);
    if file.tokens.len() == before {
        return Ok(false);
    }
    file.store(path)?;
    Ok(true)
}

/// A verified token: who it is and what it may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub id: String,
    pub vms: Vec<String>,
    pub rights: Vec<Right>,
}

impl Principal {
    pub fn can_read(&self) -> bool {
        !self.rights.is_empty()
    }

    pub fn can_append(&self) -> bool {
        self.rights.contains(&Right::Append) || self.is_admin()
    }

    pub fn is_admin(&self) -> bool {
        self.rights.contains(&Right::Admin)
    }

    /// A glob `*` gives the whole-repository scope.
    pub fn whole_repository(&self) -> bool {
        self.vms.iter().any(|g| g == "*")
    }

    pub fn vm_in_scope(&self, vm: &str) -> bool {
        self.vms.iter().any(|g| glob::matches(g, vm))
    }
}

/// What identifies one version of the tokens file on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: SystemTime,
    len: u64,
    ino: u64,
}

/// The server's view of the tokens file, reread when it changes.
#[derive(Debug)]
pub(crate) struct TokenStore {
    path: PathBuf,
    current: RwLock<(Option<Stamp>, Vec<TokenEntry>)>,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = fs::metadata(path)?;
    Ok(Stamp {
        modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        len: m.len(),
        ino: m.ino(),
    })
}

impl TokenStore {
    /// Load at start: the file must be valid when it exists. A missing one means no token yet
    /// (`vmkeep token add` creates it; it is read when it appears).
    pub(crate) fn open(path: &Path) -> Result<TokenStore> {
        let st = match stamp(path) {
            Ok(st) => st,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(
                    "no tokens file {} yet: every request is refused until `vmkeep token add --tokens {}` makes one",
                    path.display(),
                    path.display()
                );
                return Ok(TokenStore {
                    path: path.to_path_buf(),
                    current: RwLock::new((None, Vec::new())),
                });
            }
            Err(e) => return Err(Error::io("stat", path, e)),
        };
        let file = TokensFile::load(path)?;
        let m = fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
        if m.mode() & 0o077 != 0 {
            tracing::warn!(
                "tokens file {} is readable by others (mode {:o}): chmod 600 it",
                path.display(),
                m.mode() & 0o777
            );
        }
        Ok(TokenStore {
            path: path.to_path_buf(),
            current: RwLock::new((Some(st), file.tokens)),
        })
    }

    /// Reread the file when its stamp changed. A file that vanished or does not parse leaves no
    /// valid token (fail closed), logged.
    fn refresh(&self) {
        let now = stamp(&self.path).ok();
        {
            let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
            if cur.0 == now && now.is_some() {
                return;
            }
        }
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        let tokens = match now.map(|_| TokensFile::load(&self.path)) {
            Some(Ok(f)) => {
                tracing::info!(
                    "tokens file {} reread: {} tokens",
                    self.path.display(),
                    f.tokens.len()
                );
                f.tokens
            }
            Some(Err(e)) => {
                tracing::error!("{e}: no token is accepted until it is fixed");
                Vec::new()
            }
            None => {
                if cur.0.is_some() {
                    tracing::error!(
                        "tokens file {} is gone: no token is accepted",
                        self.path.display()
                    );
                }
                Vec::new()
            }
        };
        *cur = (now, tokens);
    }

    /// The principal of a presented token, None when malformed or unknown. The hash is compared
    /// in constant time (`blake3::Hash` equality).
    pub(crate) fn verify(&self, token: &str) -> Option<Principal> {
        let id = token_id(token)?;
        self.refresh();
        let cur = self.current.read().unwrap_or_else(|e| e.into_inner());
        let entry = cur.1.iter().find(|t| t.id == id)?;
        let stored = blake3::Hash::from_hex(&entry.hash).ok()?;
        (token_hash(token) == stored).then(|| Principal {
            id: entry.id.clone(),
            vms: entry.vms.clone(),
            rights: entry.rights.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn add_verify_remove() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let a = add(
            &path,
            &["web*".into()],
            &[Right::Append, Right::Read],
            Some("host a"),
        )
        .unwrap();
        assert_eq!(token_id(&a.token), Some(a.id.as_str()));
        assert_eq!(a.rights, vec![Right::Read, Right::Append]);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&a.token), "the secret is never stored");
        let store = TokenStore::open(&path).unwrap();
        let p = store.verify(&a.token).unwrap();
        assert!(p.can_read() && p.can_append() && !p.is_admin() && !p.whole_repository());
        assert!(p.vm_in_scope("web1") && !p.vm_in_scope("db1"));
        // Wrong secret with the right id, and malformed tokens.
        let mut wrong = a.token.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert!(store.verify(&wrong).is_none());
        for bad in [
            "",
            "vmk_",
            &a.token.to_uppercase(),
            &format!("{}0", a.token),
        ] {
            assert!(store.verify(bad).is_none(), "{bad:?}");
        }
        let b = add(&path, &["*".into()], &[Right::Admin], None).unwrap();
        assert!(store.verify(&b.token).unwrap().whole_repository());
        assert!(remove(&path, &a.id).unwrap());
        assert!(!remove(&path, &a.id).unwrap());
        assert!(store.verify(&a.token).is_none());
        assert!(store.verify(&b.token).is_some());
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        assert!(add(&path, &[], &[Right::Read], None).is_err());
        assert!(add(&path, &["a/b".into()], &[Right::Read], None).is_err());
        assert!(add(&path, &["*".into()], &[], None).is_err());
        assert!("write".parse::<Right>().is_err());
        assert_eq!("admin".parse::<Right>().unwrap().to_string(), "admin");
        // A missing file at start: no token is accepted until it appears.
        let missing = TokenStore::open(&path).unwrap();
        let t = add(
            &dir.path().join("other"),
            &["*".into()],
            &[Right::Read],
            None,
        )
        .unwrap();
        assert!(missing.verify(&t.token).is_none());
        fs::write(&path, br#"{"version":1,"tokens":[],"x":1}"#).unwrap();
        assert!(TokenStore::open(&path).is_err());
        fs::write(&path, br#"{"version":2,"tokens":[]}"#).unwrap();
        assert!(TokenStore::open(&path).is_err());
    }
}
