use std::fmt;

use crate::error::{Error, Result};

/// The kinds of objects a repository holds; each is a folder (local) or prefix (S3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// The single `config` object (its name is always "config").
    Config,
    Key,
    Snapshot,
    Index,
    Pack,
    Lock,
    Gc,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Config,
        Kind::Key,
        Kind::Snapshot,
        Kind::Index,
        Kind::Pack,
        Kind::Lock,
        Kind::Gc,
    ];

    /// What an object of this kind is, for messages.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Config => "config",
            Kind::Key => "key file",
            Kind::Snapshot => "manifest",
            Kind::Index => "index object",
            Kind::Pack => "pack",
            Kind::Lock => "lock",
            Kind::Gc => "gc record",
        }
    }

    /// Folder / prefix name.
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Config => "",
            Kind::Key => "keys",
            Kind::Snapshot => "snapshots",
            Kind::Index => "index",
            Kind::Pack => "packs",
            Kind::Lock => "locks",
            Kind::Gc => "gc",
        }
    }
}

/// A typed object key. Names are 1-128 characters of [0-9a-z-] (hex ids, mostly).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub kind: Kind,
    pub name: String,
}

impl Key {
    pub fn new(kind: Kind, name: impl Into<String>) -> Result<Key> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-');
        if !ok || (kind == Kind::Config && name != "config") {
            return Err(Error::InvalidName { name });
        }
        Ok(Key { kind, name })
    }

    pub fn config() -> Key {
        Key {
            kind: Kind::Config,
            name: "config".into(),
        }
    }

    /// Relative path: `config`, `keys/<name>`, `packs/<first two chars>/<name>`, ...
    pub fn path(&self) -> String {
        match self.kind {
            Kind::Config => "config".into(),
            Kind::Pack => format!(
                "packs/{}/{}",
                &self.name[..2.min(self.name.len())],
                self.name
            ),
            k => format!("{}/{}", k.dir(), self.name),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.path())
    }
}
