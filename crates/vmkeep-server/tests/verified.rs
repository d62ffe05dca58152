//! Verification records (`verified/<snapshot id>-<record id>`, written by `vmkeep verify`)
//! through a real `vmkeep serve`: the rules of PROTOCOL.md §4, row "verified".
mod common;

use common::*;
use vmkeep_core::{ObjectKind, SnapshotId};
use vmkeep_server::tokens::Right;

const A: &[Right] = &[Right::Append];
const R: &[Right] = &[Right::Read];
const ADM: &[Right] = &[Right::Admin];

fn o(kind: &str, name: &str) -> String {
    format!("/v1/r/o/{kind}/{name}")
}

fn v(name: &str) -> String {
    o("verified", name)
}

/// A fresh record name for a restore point.
fn record(snapshot: &str) -> String {
    format!("{snapshot}-{}", random_hex(16))
}

/// The status, and for replies with a body the error code, exactly.
#[track_caller]
fn expect(r: &Reply, status: u16, error: Option<&str>, what: &str) {
    assert_eq!(
        r.status,
        status,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    if let Some(e) = error {
        assert_eq!(r.json()["error"], e, "{what}: {:?}", r.json());
    }
}

/// A served plain repository `r` with restore points of VMs a1, a2 and b1 (pack list and
/// manifest each, as a backup leaves them), and the tokens the tests use.
struct Fixture {
    _tmp: tempfile::TempDir,
    srv: Server,
    repo: Repo,
    a1: String,
    a2: String,
    b1: String,
    read_a: String,
    read_all: String,
    append_a: String,
    append_all: String,
    admin_a: String,
    admin_all: String,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("srv");
    std::fs::create_dir(&dir).unwrap();
    let tokens = tmp.path().join("tokens.json");
    let repo = Repo::create(&dir, "r", false);
    let pack = repo.stored_pack(b"a chunk");
    let a1 = repo.snapshot("a1", &[&pack]);
    let a2 = repo.snapshot("a2", &[&pack]);
    let b1 = repo.snapshot("b1", &[&pack]);
    let read_a = mint(&tokens, &["a*"], R);
    let read_all = mint(&tokens, &["*"], R);
    let append_a = mint(&tokens, &["a*"], A);
    let append_all = mint(&tokens, &["*"], A);
    let admin_a = mint(&tokens, &["a*"], ADM);
    let admin_all = mint(&tokens, &["*"], ADM);
    let srv = Server::start(&dir, &tokens);
    Fixture {
        _tmp: tmp,
        srv,
        repo,
        a1,
        a2,
        b1,
        read_a,
        read_all,
        append_a,
        append_all,
        admin_a,
        admin_all,
    }
}

impl Fixture {
    fn stored(&self, name: &str) -> Option<Vec<u8>> {
        self.repo.get(ObjectKind::Verification, name)
    }

    fn delete(&self, path: &str, token: &str) -> Reply {
        self.srv.req("DELETE", path, Some(token), &[], None)
    }

    fn head(&self, path: &str, token: &str) -> Reply {
        self.srv.req("HEAD", path, Some(token), &[], None)
    }

    /// The names `GET verified/` lists to `token`, sorted.
    fn listed(&self, token: &str) -> Vec<String> {
        let r = self.srv.get(&v(""), token);
        expect(&r, 200, None, "list verified/");
        let mut names: Vec<String> = r.json()["objects"]
            .as_array()
            .expect("an objects array")
            .iter()
            .map(|o| o["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// PUT: `append` creates a record once, only for a restore point whose manifest exists (409)
/// and which is in its scope (403); the content is not checked; deleting needs `admin`.
#[test]
fn append_creates_once_for_existing_restore_points_in_scope() {
    let f = fixture();
    let srv = &f.srv;

    // A scoped append token (VMs a*) creates a record of VM a1's restore point: 201, stored as
    // sent (any bytes: the content is not checked, it may be encrypted).
    let rec = record(&f.a1);
    let body = b"not json, not framed: any bytes".to_vec();
    expect(&srv.put(&v(&rec), &f.append_a, &body), 201, None, "create");
    assert_eq!(f.stored(&rec), Some(body.clone()));
    // The same token reads it back.
    let r = srv.get(&v(&rec), &f.append_a);
    expect(&r, 200, None, "read back");
    assert_eq!(r.body, body);

    // Writing it again (other bytes): 409 `exists`, not replaced; with If-None-Match: 412.
    let before = tree(&srv.dir);
    expect(
        &srv.put(&v(&rec), &f.append_a, b"other bytes"),
        409,
        Some("exists"),
        "append replacing a record",
    );
    expect(
        &srv.put(&v(&rec), &f.append_all, b"other bytes"),
        409,
        Some("exists"),
        "whole-repository append replacing a record",
    );
    let r = srv.req(
        "PUT",
        &v(&rec),
        Some(&f.append_a),
        &[("If-None-Match", "*")],
        Some(b"other bytes"),
    );
    expect(
        &r,
        412,
        Some("exists"),
        "If-None-Match on an existing record",
    );
    assert_eq!(f.stored(&rec), Some(body.clone()));

    // A restore point of VM b1 is outside a*: 403 `forbidden`.
    let rec_b = record(&f.b1);
    expect(
        &srv.put(&v(&rec_b), &f.append_a, b"record"),
        403,
        Some("forbidden"),
        "a record of b1 by an a* token",
    );
    // A restore point that does not exist: 409, for any token (even whole-repository admin).
    let missing = SnapshotId::random().to_hex();
    for t in [&f.append_a, &f.append_all, &f.admin_all] {
        expect(
            &srv.put(&v(&record(&missing)), t, b"record"),
            409,
            Some("exists"),
            "a record of a restore point that does not exist",
        );
    }
    // A read token may not write one: 403.
    expect(
        &srv.put(&v(&record(&f.a1)), &f.read_a, b"record"),
        403,
        Some("forbidden"),
        "a read token writing a record",
    );
    // Deleting needs `admin`: 403 for append tokens, scoped or not; the record stays.
    for t in [&f.append_a, &f.append_all] {
        expect(
            &f.delete(&v(&rec), t),
            403,
            Some("forbidden"),
            "an append token deleting a record",
        );
    }
    assert_eq!(f.stored(&rec), Some(body.clone()));
    assert_eq!(
        tree(&srv.dir),
        before,
        "refused requests changed nothing on disk"
    );

    // The manifest is what must exist: a pack list of a1 alone is not a restore point (409).
    let only_refs = SnapshotId::random().to_hex();
    f.repo.put(
        ObjectKind::Refs,
        &only_refs,
        &pack_list(&only_refs, "a1", &[]),
    );
    expect(
        &srv.put(&v(&record(&only_refs)), &f.append_a, b"record"),
        409,
        Some("exists"),
        "a record of a restore point with a pack list and no manifest",
    );
    // A manifest without a pack list names no VM: in scope only for whole-repository tokens.
    let only_manifest = SnapshotId::random().to_hex();
    f.repo.put(
        ObjectKind::Snapshot,
        &only_manifest,
        &f.repo.manifest(&only_manifest, "a1"),
    );
    let rec_m = record(&only_manifest);
    expect(
        &srv.put(&v(&rec_m), &f.append_a, b"record"),
        403,
        Some("forbidden"),
        "a scoped token, a manifest without a pack list",
    );
    assert_eq!(f.stored(&rec_m), None);
    expect(
        &srv.put(&v(&rec_m), &f.append_all, b"record"),
        201,
        None,
        "a whole-repository token, a manifest without a pack list",
    );

    // A whole-repository append token creates b1's record; two records of one restore point
    // are fine (record ids differ).
    expect(
        &srv.put(&v(&rec_b), &f.append_all, b"b record"),
        201,
        None,
        "b1 by a whole-repository append token",
    );
    let rec2 = record(&f.a1);
    expect(
        &srv.put(&v(&rec2), &f.append_a, b"second"),
        201,
        None,
        "a second record of a1",
    );
    assert_eq!(f.stored(&rec_b).as_deref(), Some(&b"b record"[..]));
    assert_eq!(f.stored(&rec2).as_deref(), Some(&b"second"[..]));
}

/// A name that is not `<32 hex>-<32 hex>`: 400, for every method, nothing stored.
#[test]
fn malformed_names_are_refused() {
    let f = fixture();
    let srv = &f.srv;
    let a1 = &f.a1;
    let rid = random_hex(16);
    let bad = [
        a1.clone(),                               // no record id
        format!("{a1}-"),                         // empty record id
        format!("-{rid}"),                        // empty snapshot id
        format!("{a1}{rid}"),                     // no dash
        format!("{a1}-{}", &rid[..31]),           // record id too short
        format!("{a1}-{rid}0"),                   // record id too long
        format!("{}-{rid}", &a1[..31]),           // snapshot id too short
        format!("{a1}0-{rid}"),                   // snapshot id too long
        format!("{a1}-{rid}-{}", random_hex(16)), // a third part
        format!("{a1}-{}g", &rid[..31]),          // not hex
        format!("{}-{rid}", "x".repeat(32)),      // not hex
    ];
    // Records of a1 exist (the names above must not reach them by accident).
    expect(
        &srv.put(&v(&record(a1)), &f.append_a, b"record"),
        201,
        None,
        "a well-formed record",
    );
    let before = tree(&srv.dir);
    for name in &bad {
        for t in [&f.append_a, &f.admin_a, &f.admin_all] {
            expect(
                &srv.put(&v(name), t, b"record"),
                400,
                Some("bad-request"),
                &format!("PUT verified/{name}"),
            );
        }
        for t in [&f.admin_a, &f.admin_all] {
            expect(
                &f.delete(&v(name), t),
                400,
                Some("bad-request"),
                &format!("DELETE verified/{name}"),
            );
        }
        for t in [&f.read_a, &f.append_a] {
            expect(
                &srv.get(&v(name), t),
                400,
                Some("bad-request"),
                &format!("GET verified/{name} (scoped)"),
            );
            expect(
                &f.head(&v(name), t),
                400,
                None,
                &format!("HEAD verified/{name} (scoped)"),
            );
        }
    }
    assert_eq!(tree(&srv.dir), before, "nothing changed on disk");
}

/// GET, HEAD and list: a record is in scope when its restore point is.
#[test]
fn reads_and_lists_follow_the_restore_point() {
    let f = fixture();
    let srv = &f.srv;
    let ra1 = record(&f.a1);
    let ra1b = record(&f.a1);
    let ra2 = record(&f.a2);
    let rb1 = record(&f.b1);
    for (name, t) in [
        (&ra1, &f.append_a),
        (&ra1b, &f.append_a),
        (&ra2, &f.append_a),
        (&rb1, &f.append_all),
    ] {
        expect(&srv.put(&v(name), t, name.as_bytes()), 201, None, name);
    }
    // One whose restore point never existed, written behind the server's back.
    let stray = record(&SnapshotId::random().to_hex());
    f.repo.put(ObjectKind::Verification, &stray, b"stray");

    let a_records = sorted(vec![ra1.clone(), ra1b.clone(), ra2.clone()]);
    let all = sorted(vec![
        ra1.clone(),
        ra1b.clone(),
        ra2.clone(),
        rb1.clone(),
        stray.clone(),
    ]);
    assert_eq!(
        f.listed(&f.read_a),
        a_records,
        "a* read token lists a*'s records"
    );
    assert_eq!(f.listed(&f.append_a), a_records, "a* append token");
    assert_eq!(f.listed(&f.admin_a), a_records, "a* admin token");
    assert_eq!(
        f.listed(&f.read_all),
        all,
        "whole-repository token lists all"
    );
    assert_eq!(
        f.listed(&f.admin_all),
        all,
        "whole-repository admin lists all"
    );
    // A token for b* only sees b1's.
    let read_b = mint(&srv.tokens, &["b1"], R);
    assert_eq!(f.listed(&read_b), vec![rb1.clone()]);

    for name in [&ra1, &ra2] {
        let r = srv.get(&v(name), &f.read_a);
        expect(&r, 200, None, name);
        assert_eq!(r.body, name.as_bytes());
        let h = f.head(&v(name), &f.read_a);
        expect(&h, 200, None, name);
        assert_eq!(h.size, Some(name.len().to_string()));
    }
    expect(
        &srv.get(&v(&rb1), &f.read_a),
        403,
        Some("forbidden"),
        "b1's record to an a* token",
    );
    expect(
        &f.head(&v(&rb1), &f.read_a),
        403,
        None,
        "HEAD b1's record, a*",
    );
    expect(
        &srv.get(&v(&stray), &f.read_a),
        403,
        Some("forbidden"),
        "a record of no restore point to a scoped token",
    );
    let r = srv.get(&v(&rb1), &f.read_all);
    expect(&r, 200, None, "b1's record, whole repository");
    assert_eq!(r.body, rb1.as_bytes());
    expect(
        &srv.get(&v(&stray), &f.read_all),
        200,
        None,
        "stray, whole repository",
    );
    let r = srv.get(&v(&rb1), &read_b);
    expect(&r, 200, None, "b1's record, b1 token");
    expect(
        &srv.get(&v(&ra1), &read_b),
        403,
        Some("forbidden"),
        "a1's record, b1 token",
    );
    // A record of a restore point in scope that was never written: 404.
    expect(
        &srv.get(&v(&record(&f.a1)), &f.read_a),
        404,
        Some("not-found"),
        "no such record",
    );
}

/// `admin` replaces and deletes records in scope; once a restore point's manifest is deleted
/// (its pack list with it), its records are removed only by whole-repository tokens.
#[test]
fn admin_replaces_and_deletes_orphans_need_the_whole_repository() {
    let f = fixture();
    let srv = &f.srv;
    let ra1 = record(&f.a1);
    let ra1b = record(&f.a1);
    let rb1 = record(&f.b1);
    expect(&srv.put(&v(&ra1), &f.append_a, b"one"), 201, None, "ra1");
    expect(&srv.put(&v(&ra1b), &f.append_a, b"two"), 201, None, "ra1b");
    expect(&srv.put(&v(&rb1), &f.append_all, b"b"), 201, None, "rb1");

    // A scoped admin replaces a record in its scope (204), not one outside it (403).
    expect(
        &srv.put(&v(&ra1), &f.admin_a, b"replaced"),
        204,
        None,
        "admin replaces",
    );
    assert_eq!(f.stored(&ra1).as_deref(), Some(&b"replaced"[..]));
    expect(
        &srv.put(&v(&rb1), &f.admin_a, b"replaced"),
        403,
        Some("forbidden"),
        "a* admin replacing b1's record",
    );
    assert_eq!(f.stored(&rb1).as_deref(), Some(&b"b"[..]));
    // A scoped admin may create one too (201).
    let ra2 = record(&f.a2);
    expect(
        &srv.put(&v(&ra2), &f.admin_a, b"a2"),
        201,
        None,
        "admin creates",
    );

    // Deleting: a scoped admin in scope 204 (gone), out of scope 403 (kept).
    expect(
        &f.delete(&v(&ra1b), &f.admin_a),
        204,
        None,
        "a* admin deletes a1's",
    );
    assert_eq!(f.stored(&ra1b), None);
    expect(
        &f.delete(&v(&rb1), &f.admin_a),
        403,
        Some("forbidden"),
        "a* admin deleting b1's record",
    );
    assert_eq!(f.stored(&rb1).as_deref(), Some(&b"b"[..]));
    expect(
        &f.delete(&v(&rb1), &f.admin_all),
        204,
        None,
        "whole admin deletes b1's",
    );
    assert_eq!(f.stored(&rb1), None);

    // The restore point a1 goes (DELETE snapshots/<id> removes refs/<id> too): its record
    // stays, an orphan.
    expect(
        &f.delete(&o("snapshots", &f.a1), &f.admin_a),
        204,
        None,
        "delete a1's manifest",
    );
    assert!(f.repo.get(ObjectKind::Snapshot, &f.a1).is_none());
    assert!(
        f.repo.get(ObjectKind::Refs, &f.a1).is_none(),
        "refs removed too"
    );
    assert_eq!(f.stored(&ra1).as_deref(), Some(&b"replaced"[..]));
    // No VM names it any more: scoped tokens neither list nor read it; others do.
    assert_eq!(f.listed(&f.read_a), vec![ra2.clone()]);
    assert_eq!(
        f.listed(&f.read_all),
        sorted(vec![ra1.clone(), ra2.clone()])
    );
    expect(
        &srv.get(&v(&ra1), &f.read_a),
        403,
        Some("forbidden"),
        "orphan, a*",
    );
    expect(
        &srv.get(&v(&ra1), &f.read_all),
        200,
        None,
        "orphan, whole repository",
    );
    // No new record for a restore point that is gone (409), nor may it be replaced.
    expect(
        &srv.put(&v(&record(&f.a1)), &f.append_a, b"late"),
        409,
        Some("exists"),
        "a record of a deleted restore point",
    );
    expect(
        &srv.put(&v(&ra1), &f.admin_all, b"late"),
        409,
        Some("exists"),
        "replacing an orphan",
    );
    // Deleting the orphan: the scoped admin 403 (kept), the whole-repository admin 204.
    expect(
        &f.delete(&v(&ra1), &f.admin_a),
        403,
        Some("forbidden"),
        "a* admin deleting an orphan",
    );
    assert_eq!(f.stored(&ra1).as_deref(), Some(&b"replaced"[..]));
    expect(
        &f.delete(&v(&ra1), &f.append_all),
        403,
        Some("forbidden"),
        "whole-repository append deleting an orphan",
    );
    assert!(f.stored(&ra1).is_some());
    expect(
        &f.delete(&v(&ra1), &f.admin_all),
        204,
        None,
        "whole admin deletes the orphan",
    );
    assert_eq!(f.stored(&ra1), None);
    assert_eq!(f.listed(&f.read_all), vec![ra2.clone()]);
}

/// PROTOCOL.md §4: a malformed name is refused (400) on GET and HEAD whatever the token, even
/// one stored behind the server's back.
#[test]
fn malformed_names_are_refused_to_whole_repository_reads() {
    let f = fixture();
    let malformed = format!("{}-{}", f.a1, "x".repeat(32));
    // A malformed name stored behind the server's back (e.g. by an older client).
    let stored = f.a1.clone();
    f.repo.put(ObjectKind::Verification, &stored, b"malformed");
    for name in [&malformed, &stored] {
        for t in [&f.read_all, &f.admin_all] {
            expect(
                &f.srv.get(&v(name), t),
                400,
                Some("bad-request"),
                &format!("GET verified/{name} (whole repository)"),
            );
            expect(
                &f.head(&v(name), t),
                400,
                None,
                &format!("HEAD verified/{name} (whole repository)"),
            );
        }
    }
}
