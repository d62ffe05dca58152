use std::fmt;

use vmkeep_core::ObjectKind;

use crate::error::{Error, Result};

/// A typed object key: its kind says its folder (FORMAT.md §1). Names are 1-128 characters of [0-9a-z-] (hex ids, mostly).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub kind: ObjectKind,
    pub name: String,
}

impl Key {
    pub fn new(kind: ObjectKind, name: impl Into<String>) -> Result<Key> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'-');
        if !ok || (kind == ObjectKind::Config && name != "config") {
            return Err(Error::InvalidName { name });
        }
        Ok(Key { kind, name })
    }

    pub fn config() -> Key {
        Key {
            kind: ObjectKind::Config,
            name: "config".into(),
        }
    }

    /// Relative path: `config`, `keys/<name>`, `packs/<first two chars>/<name>`, ...
    pub fn path(&self) -> String {
        match self.kind {
            ObjectKind::Config => "config".into(),
            ObjectKind::Pack => format!(
                "packs/{}/{}",
                &self.name[..2.min(self.name.len())],
                self.name
            ),
            k => format!("{}/{}", k.folder(), self.name),
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
