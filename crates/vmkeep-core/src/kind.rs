//! The kinds of objects a repository holds: the one definition behind both the store key (its
//! folder, FORMAT.md §1) and the object framing (its kind byte, §8), with each kind's read bound.
use crate::pack::MAX_PACK_LEN;

/// What an object is. A store key names its folder; a framed object carries its kind byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// The single `config` object (its name is always "config"). Not framed.
    Config,
    /// A key file (a wrapped master key). Not framed.
    Key,
    /// A restore point's manifest, in the `snapshots` folder.
    Snapshot,
    /// An index object: which blobs live in which packs.
    Index,
    /// A pack of blobs. Not framed (it has its own header, §6).
    Pack,
    /// A lease (`locks` folder).
    Lock,
    /// A GC record of a running or interrupted prune.
    GcRecord,
    /// A restore point's pack list (`refs` folder): plain JSON naming its VM and the packs it
    /// references, kept in served repositories (docs/PROTOCOL.md §5). Not framed.
    Refs,
    /// A verification record (`verified` folder): the result of one `vmkeep verify` run of a
    /// restore point, named `<snapshot id>-<record id>` (FORMAT.md §9.1).
    Verification,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 9] = [
        ObjectKind::Config,
        ObjectKind::Key,
        ObjectKind::Snapshot,
        ObjectKind::Index,
        ObjectKind::Pack,
        ObjectKind::Lock,
        ObjectKind::GcRecord,
        ObjectKind::Refs,
        ObjectKind::Verification,
    ];

    /// What an object of this kind is, for messages.
    pub const fn name(self) -> &'static str {
        match self {
            ObjectKind::Config => "config",
            ObjectKind::Key => "key file",
            ObjectKind::Snapshot => "manifest",
            ObjectKind::Index => "index object",
            ObjectKind::Pack => "pack",
            ObjectKind::Lock => "lock",
            ObjectKind::GcRecord => "gc record",
            ObjectKind::Refs => "pack list",
            ObjectKind::Verification => "verification record",
        }
    }

    /// The folder (local store) or prefix (S3) of its keys; empty for `config`, which sits at
    /// the top of the repository.
    pub const fn folder(self) -> &'static str {
        match self {
            ObjectKind::Config => "",
            ObjectKind::Key => "keys",
            ObjectKind::Snapshot => "snapshots",
            ObjectKind::Index => "index",
            ObjectKind::Pack => "packs",
            ObjectKind::Lock => "locks",
            ObjectKind::GcRecord => "gc",
            ObjectKind::Refs => "refs",
            ObjectKind::Verification => "verified",
        }
    }

    /// The kind byte of its object header ([`crate::object`]); None for the kinds that are not
    /// framed (config and key files are JSON, packs have their own header).
    pub const fn frame_byte(self) -> Option<u8> {
        match self {
            ObjectKind::Snapshot => Some(1),
            ObjectKind::Index => Some(2),
            ObjectKind::GcRecord => Some(3),
            ObjectKind::Lock => Some(4),
            ObjectKind::Verification => Some(5),
            ObjectKind::Config | ObjectKind::Key | ObjectKind::Pack | ObjectKind::Refs => None,
        }
    }

    /// The framed kind whose header carries `byte`.
    pub fn from_frame_byte(byte: u8) -> Option<ObjectKind> {
        ObjectKind::ALL
            .into_iter()
            .find(|k| k.frame_byte() == Some(byte))
    }

    /// The largest object of this kind a reader accepts: whole-object reads are bounded by it
    /// before anything is allocated (FORMAT.md §1 "Bound first, then read").
    pub const fn max_size(self) -> u64 {
        match self {
            ObjectKind::Config => 64 << 10,
            ObjectKind::Key => 64 << 10,
            ObjectKind::Snapshot => 64 << 20,
            ObjectKind::Index => 256 << 20,
            ObjectKind::Pack => MAX_PACK_LEN,
            ObjectKind::Lock => 1 << 20,
            ObjectKind::GcRecord => 256 << 20,
            ObjectKind::Refs => 16 << 20,
            ObjectKind::Verification => 64 << 10,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// docs/FORMAT.md, read at run time (the crate builds without it).
    fn format_md() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/FORMAT.md");
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The rows of the first table in section `heading` (a line starting with it), header and
    /// separator skipped, cells trimmed.
    fn table(doc: &str, heading: &str) -> Vec<Vec<String>> {
        let section: Vec<&str> = doc
            .lines()
            .skip_while(|l| !l.starts_with(heading))
            .skip(1)
            .take_while(|l| !l.starts_with("## "))
            .collect();
        let rows: Vec<Vec<String>> = section
            .iter()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                l.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .collect();
        assert!(rows.len() > 2, "no table in {heading}");
        rows[2..].to_vec()
    }

    fn unquote(cell: &str) -> &str {
        cell.trim_matches('`')
    }

    /// "256 MiB + 4 KiB + 41" -> bytes.
    fn size(cell: &str) -> u64 {
        cell.split('+')
            .map(|term| {
                let mut words = term.split_whitespace();
                let n: u64 = words.next().unwrap().parse().unwrap();
                match words.next() {
                    None | Some("bytes") => n,
                    Some("KiB") => n << 10,
                    Some("MiB") => n << 20,
                    Some(u) => panic!("unknown unit {u} in {cell:?}"),
                }
            })
            .sum()
    }

    fn by_folder(folder: &str) -> ObjectKind {
        ObjectKind::ALL
            .into_iter()
            .find(|k| k.folder() == folder)
            .unwrap_or_else(|| panic!("no kind has the folder {folder:?}"))
    }

    /// §1's table (kind, key, content, mutable, read bound) names every kind's folder and bound.
    #[test]
    fn keys_and_bounds_match_format_md_section_1() {
        let rows = table(&format_md(), "## 1. ");
        let mut seen = BTreeSet::new();
        for row in &rows {
            let path = unquote(&row[1]);
            let folder = path.split_once('/').map_or("", |(f, _)| f);
            let kind = by_folder(folder);
            if kind == ObjectKind::Config {
                assert_eq!(path, "config");
            }
            assert_eq!(kind.max_size(), size(&row[4]), "read bound of {path}");
            assert!(seen.insert(kind), "{kind:?} twice");
        }
        assert_eq!(seen.len(), ObjectKind::ALL.len(), "every kind has a row");
    }

    /// §8's table (folder, kind byte) lists exactly the framed kinds.
    #[test]
    fn frame_bytes_match_format_md_section_8() {
        let rows = table(&format_md(), "## 8. ");
        let documented: BTreeSet<(ObjectKind, u8)> = rows
            .iter()
            .map(|row| {
                let folder = unquote(&row[1]).trim_end_matches('/');
                (by_folder(folder), row[2].parse().unwrap())
            })
            .collect();
        let framed: BTreeSet<(ObjectKind, u8)> = ObjectKind::ALL
            .into_iter()
            .filter_map(|k| k.frame_byte().map(|b| (k, b)))
            .collect();
        assert_eq!(documented, framed);
        assert_eq!(framed.len(), 5);
    }

    #[test]
    fn frame_bytes_round_trip() {
        for kind in ObjectKind::ALL {
            match kind.frame_byte() {
                Some(b) => assert_eq!(ObjectKind::from_frame_byte(b), Some(kind)),
                None => assert!(matches!(
                    kind,
                    ObjectKind::Config | ObjectKind::Key | ObjectKind::Pack | ObjectKind::Refs
                )),
            }
        }
        for b in [0, 6, 255] {
            assert_eq!(ObjectKind::from_frame_byte(b), None);
        }
    }

    #[test]
    fn folders_and_names_are_distinct() {
        let folders: BTreeSet<_> = ObjectKind::ALL.iter().map(|k| k.folder()).collect();
        let names: BTreeSet<_> = ObjectKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(folders.len(), ObjectKind::ALL.len());
        assert_eq!(names.len(), ObjectKind::ALL.len());
    }
}
