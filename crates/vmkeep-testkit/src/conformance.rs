//! The `Store` conformance suite: what the repository protocol (docs/FORMAT.md) needs of a
//! backend, checked the same way on every one (a local folder, `vmkeep serve` over HTTPS,
//! S3 on Garage and on moto). Each check says what failed and why it matters.
//!
//! [`run`] writes objects and removes them again; objects already there (a served repository's
//! config and keys) are left alone and allowed for. Pack and index objects are named by the
//! BLAKE3 of their bytes, and replacements use kinds a server lets an admin replace, so the
//! same checks run unchanged behind `vmkeep serve`'s upload verification (an encrypted
//! repository there: the server cannot check blobs it cannot decrypt). The config is written
//! only on stores without that guard (a served config is create-only, never deleted).
use std::collections::BTreeSet;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vmkeep_store::ObjectMeta;

use vmkeep_store::{Key, ObjectKind, Store};

use crate::data::random_bytes;

/// What the suite learnt about the store.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// `put_if_absent` refused the second create (Garage and s3rver ignore it: false).
    pub conditional_writes_honoured: bool,
}

/// Runs every check; panics on the first failure, with the store's location in the message.
pub fn run(store: Arc<dyn Store>) -> Report {
    let at = store.location();
    let served = store.needs_pack_lists();
    absent_objects(&*store, &at);
    whole_objects_and_bounds(&*store, &at);
    ranges(&*store, &at);
    listing_by_kind(&*store, &at, served);
    let report = conditional_creates(&*store, &at);
    replacement_is_atomic(store.clone(), &at);
    versions_change_on_replacement(&*store, &at);
    concurrent_writers(store.clone(), &at);
    store.flush().unwrap_or_else(|e| panic!("{at}: flush: {e}"));
    report
}

fn key(kind: ObjectKind, name: &str) -> Key {
    Key::new(kind, name).unwrap()
}

fn hex_name(seed: u64) -> String {
    blake3::hash(&seed.to_le_bytes()).to_hex().to_string()
}

/// A pack or index object's name: the BLAKE3 of its bytes (FORMAT.md §1).
fn content_key(kind: ObjectKind, data: &[u8]) -> Key {
    key(kind, &blake3::hash(data).to_hex())
}

fn names(listed: &[ObjectMeta]) -> BTreeSet<Key> {
    listed.iter().map(|m| m.key.clone()).collect()
}

fn absent_objects(s: &dyn Store, at: &str) {
    let k = key(ObjectKind::Snapshot, "0123456789abcdef0123456789abcdef");
    let e = s.get(&k, 1 << 20).expect_err("get of an absent object");
    assert!(e.is_not_found(), "{at}: get of an absent object: {e}");
    let e = s.size(&k).expect_err("size of an absent object");
    assert!(e.is_not_found(), "{at}: size of an absent object: {e}");
    let e = s
        .get_range(&k, 0, 4)
        .expect_err("range of an absent object");
    assert!(e.is_not_found(), "{at}: range of an absent object: {e}");
    s.delete(&k)
        .unwrap_or_else(|e| panic!("{at}: deleting an absent object must succeed: {e}"));
}

fn whole_objects_and_bounds(s: &dyn Store, at: &str) {
    // An empty object, a small one, and one larger than a multipart threshold would be.
    for (i, len) in [0usize, 1, 1000, 20 << 20].into_iter().enumerate() {
        let data = random_bytes(len, 0xc0ff_ee00 + i as u64);
        let k = content_key(ObjectKind::Index, &data);
        s.put(&k, &data)
            .unwrap_or_else(|e| panic!("{at}: put of {len} bytes: {e}"));
        let got = s
            .get(&k, len as u64)
            .unwrap_or_else(|e| panic!("{at}: get: {e}"));
        assert!(got == data, "{at}: {len} bytes read back differ");
        assert_eq!(s.size(&k).unwrap(), len as u64, "{at}: size");
        if len > 0 {
            // Bounded before read: one byte over the bound is refused, not returned.
            let e = s.get(&k, len as u64 - 1).expect_err("bound");
            assert!(
                e.is_too_large(),
                "{at}: a get over its bound must be TooLarge: {e}"
            );
        }
        s.delete(&k).unwrap();
        assert!(
            s.get(&k, 1 << 30).unwrap_err().is_not_found(),
            "{at}: deleted"
        );
    }
}

fn ranges(s: &dyn Store, at: &str) {
    let data = random_bytes(100_000, 7);
    let k = content_key(ObjectKind::Pack, &data);
    s.put(&k, &data).unwrap();
    for (off, len) in [(0u64, 1u64), (5, 4096), (99_000, 1000), (0, 100_000)] {
        let got = s
            .get_range(&k, off, len)
            .unwrap_or_else(|e| panic!("{at}: range {off}+{len}: {e}"));
        assert!(
            got == data[off as usize..(off + len) as usize],
            "{at}: range {off}+{len} differs"
        );
    }
    for (off, len) in [(99_999u64, 2u64), (100_000, 1), (200_000, 10)] {
        match s.get_range(&k, off, len) {
            Err(vmkeep_store::Error::ShortRead { .. }) => {}
            other => panic!("{at}: range {off}+{len} past the end must be ShortRead: {other:?}"),
        }
    }
    s.delete(&k).unwrap();
}

fn listing_by_kind(s: &dyn Store, at: &str, served: bool) {
    let kinds = [
        ObjectKind::Pack,
        ObjectKind::Index,
        ObjectKind::Key,
        ObjectKind::Lock,
        ObjectKind::GcRecord,
        ObjectKind::Config,
    ];
    let before: Vec<BTreeSet<Key>> = kinds.iter().map(|&k| names(&s.list(k).unwrap())).collect();
    let mut written = Vec::new();
    for (kind, n) in [
        (ObjectKind::Pack, 5u64),
        (ObjectKind::Index, 3),
        (ObjectKind::Key, 2),
        (ObjectKind::Lock, 2),
        (ObjectKind::GcRecord, 2),
    ] {
        for i in 0..n {
            let data = format!("{kind:?} {i}").into_bytes();
            let k = match kind {
                ObjectKind::Pack | ObjectKind::Index => content_key(kind, &data),
                _ => key(kind, &hex_name(1000 + i)[..32]),
            };
            s.put(&k, &data)
                .unwrap_or_else(|e| panic!("{at}: put {k}: {e}"));
            written.push((k, data.len() as u64));
        }
    }
    if !served {
        s.put(&Key::config(), b"{}").unwrap();
        written.push((Key::config(), 2));
    }
    // Listed at once after the writes (S3 is strongly consistent for list-after-write), each
    // under its own kind only, with sizes.
    for (kind, before) in kinds.iter().zip(&before) {
        let mine: BTreeSet<Key> = written
            .iter()
            .filter(|(k, _)| k.kind == *kind)
            .map(|(k, _)| k.clone())
            .collect();
        let listed = s
            .list(*kind)
            .unwrap_or_else(|e| panic!("{at}: listing {kind:?}: {e}"));
        let want: BTreeSet<Key> = before.union(&mine).cloned().collect();
        assert_eq!(names(&listed), want, "{at}: listing {kind:?}");
        for m in listed.iter().filter(|m| mine.contains(&m.key)) {
            let size = written.iter().find(|(k, _)| *k == m.key).unwrap().1;
            assert_eq!(m.size, size, "{at}: listed size of {}", m.key);
        }
    }
    for (k, _) in &written {
        s.delete(k)
            .unwrap_or_else(|e| panic!("{at}: delete {k}: {e}"));
    }
    for (kind, before) in kinds.iter().zip(&before) {
        assert_eq!(
            &names(&s.list(*kind).unwrap()),
            before,
            "{at}: {kind:?} listed after delete"
        );
    }
}

fn conditional_creates(s: &dyn Store, at: &str) -> Report {
    let k = key(ObjectKind::Lock, &hex_name(3000)[..32]);
    assert!(
        s.put_if_absent(&k, b"first").unwrap(),
        "{at}: the first create must report created"
    );
    let second = s
        .put_if_absent(&k, b"second")
        .unwrap_or_else(|e| panic!("{at}: second create: {e}"));
    let now = s.get(&k, 100).unwrap();
    // Either honoured (refused, first kept) or ignored (overwritten): never a mix.
    if second {
        assert_eq!(
            now, b"second",
            "{at}: a create reported as done must have written"
        );
    } else {
        assert_eq!(now, b"first", "{at}: a refused create must change nothing");
    }
    s.delete(&k).unwrap();
    Report {
        conditional_writes_honoured: !second,
    }
}

/// Readers of an object being replaced see the old bytes or the new, whole.
fn replacement_is_atomic(s: Arc<dyn Store>, at: &str) {
    let k = key(ObjectKind::GcRecord, &hex_name(4000)[..32]);
    let a = vec![b'a'; 3 << 20];
    let b = vec![b'b'; 3 << 20];
    s.put(&k, &a).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (s, k, stop) = (s.clone(), k.clone(), stop.clone());
        let at = at.to_string();
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) || reads == 0 {
                let got = s.get(&k, 4 << 20).unwrap();
                let first = got[0];
                assert!(
                    got.len() == 3 << 20 && got.iter().all(|&x| x == first),
                    "{at}: a reader saw a mix of two versions"
                );
                reads += 1;
            }
        })
    };
    for i in 0..6 {
        s.put(&k, if i % 2 == 0 { &b } else { &a }).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    s.delete(&k).unwrap();
}

/// A listed version token, when the store gives one, differs after each replacement (even one
/// of the same size within the same second): caches of manifests, which forget rewrites in
/// place, rely on it (FORMAT.md §17).
fn versions_change_on_replacement(s: &dyn Store, at: &str) {
    // A kind a server lets an admin replace, as above.
    let k = key(ObjectKind::GcRecord, &hex_name(4100)[..32]);
    let version = || {
        let listed = s.list(ObjectKind::GcRecord).unwrap();
        listed.into_iter().find(|m| m.key == k).map(|m| m.version)
    };
    let mut seen: Vec<Option<String>> = Vec::new();
    for content in [
        b"first version".as_slice(),
        b"other version",
        b"first version",
    ] {
        s.put(&k, content).unwrap();
        s.flush().unwrap();
        let v = version().unwrap_or_else(|| panic!("{at}: a written object is not listed"));
        seen.push(v);
    }
    s.delete(&k).unwrap();
    if seen.iter().all(Option::is_some) {
        assert!(
            seen[0] != seen[1] && seen[1] != seen[2],
            "{at}: a replaced object kept its version token: {seen:?}"
        );
    }
}

/// Eight threads write, read and delete their own objects at once.
fn concurrent_writers(s: Arc<dyn Store>, at: &str) {
    let before = names(&s.list(ObjectKind::Pack).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let s = s.clone();
            let at = at.to_string();
            std::thread::spawn(move || {
                for i in 0..6u64 {
                    let data = random_bytes(64 << 10, t * 100 + i);
                    let k = content_key(ObjectKind::Pack, &data);
                    s.put(&k, &data).unwrap();
                    assert!(
                        s.get(&k, 1 << 20).unwrap() == data,
                        "{at}: thread {t} object {i}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mine: Vec<Key> = names(&s.list(ObjectKind::Pack).unwrap())
        .difference(&before)
        .cloned()
        .collect();
    assert_eq!(mine.len(), 48, "{at}: objects written by 8 threads");
    for k in mine {
        s.delete(&k).unwrap();
    }
}
