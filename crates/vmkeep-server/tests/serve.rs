//! `vmkeep serve` end to end: a real server over TLS, tokens, and the rules of PROTOCOL.md §4.
mod common;

use common::*;
use vmkeep_core::{ObjectKind, SnapshotId};
use vmkeep_server::tokens::{self, Right};
use vmkeep_store::Store;

const A: &[Right] = &[Right::Append];
const R: &[Right] = &[Right::Read];
const ADM: &[Right] = &[Right::Admin];

/// A served folder with repository `r` (plain): VM a's restore point SA (packs shared, pa),
/// VM b's SB (shared, pb), one of each other kind.
struct Fixture {
    _tmp: tempfile::TempDir,
    srv: Server,
    repo: Repo,
    sa: String,
    sb: String,
    shared: String,
    pa: String,
    pb: String,
}

fn fixture(encrypted: bool) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("srv");
    std::fs::create_dir(&dir).unwrap();
    let tokens = tmp.path().join("tokens.json");
    tokens::add(&tokens, &["*".into()], &[Right::Read], None).unwrap();
    let repo = Repo::create(&dir, "r", encrypted);
    let shared = repo.stored_pack(b"shared chunk");
    let pa = repo.stored_pack(b"a only");
    let pb = repo.stored_pack(b"b only");
    let sa = repo.snapshot("a", &[&shared, &pa]);
    let sb = repo.snapshot("b", &[&shared, &pb]);
    let srv = Server::start(&dir, &tokens);
    Fixture {
        _tmp: tmp,
        srv,
        repo,
        sa,
        sb,
        shared,
        pa,
        pb,
    }
}

fn o(kind: &str, name: &str) -> String {
    format!("/v1/r/o/{kind}/{name}")
}

/// (1) Every route and kind × method: no token, a malformed and an unknown token → 401; a token
/// for another VM → 403 where scope applies; a token lacking the right → 403; the allowed one
/// succeeds.
#[test]
fn every_route_checks_token_scope_and_right() {
    let f = fixture(false);
    let t = &f.srv.tokens;
    let admin_all = mint(t, &["*"], ADM);
    let admin_a = mint(t, &["a"], ADM);
    let append_a = mint(t, &["a"], A);
    let append_all = mint(t, &["*"], A);
    let read_a = mint(t, &["a"], R);
    let read_all = mint(t, &["*"], R);
    let other = mint(t, &["z*"], &[Right::Read, Right::Append, Right::Admin]);
    let unknown = format!("vmk_{}_{}", random_hex(8), random_hex(32));

    let repo = &f.repo;
    let k = |kind: ObjectKind, body: &[u8]| {
        let n = random_hex(16);
        repo.put(kind, &n, body);
        n
    };
    let key1 = k(ObjectKind::Key, b"{}");
    let key2 = k(ObjectKind::Key, b"{}");
    let (index_name, index_bytes) = {
        let b = repo.framed(ObjectKind::Index, b"x");
        (blake3::hash(&b).to_hex().to_string(), b)
    };
    let index2 = {
        let b = repo.framed(ObjectKind::Index, b"y");
        let n = blake3::hash(&b).to_hex().to_string();
        repo.put(ObjectKind::Index, &n, &b);
        n
    };
    let (new_pack, new_pack_bytes) = repo.pack(&[b"new pack"], false);
    let doomed_pack = repo.stored_pack(b"doomed");
    let lock1 = k(ObjectKind::Lock, b"lease");
    let lock2 = k(ObjectKind::Lock, b"lease");
    let gc1 = k(ObjectKind::GcRecord, b"gc");
    let gc2 = k(ObjectKind::GcRecord, b"gc");
    // Restore points of VM a to create and delete.
    let new_refs = SnapshotId::random().to_hex();
    let new_snap = SnapshotId::random().to_hex();
    repo.put(
        ObjectKind::Refs,
        &new_snap,
        &pack_list(&new_snap, "a", &[&f.pa]),
    );
    let doomed_refs = repo.snapshot("a", &[&f.pa]);
    let doomed_snap = repo.snapshot("a", &[&f.pa]);
    let new_repo_config = vmkeep_core::config::RepoConfig::new(64 << 10, false)
        .unwrap()
        .to_json(&vmkeep_core::keys::Keys::plain());

    struct Case<'a> {
        method: &'a str,
        path: String,
        body: Option<Vec<u8>>,
        headers: Vec<(&'a str, &'a str)>,
        /// A token in scope, lacking the right (None: any right will do).
        lacking: Option<&'a str>,
        /// Whether a token for another VM is refused.
        scoped: bool,
        allowed: &'a str,
        ok: u16,
    }
    let c = |method, path: String, body: Option<Vec<u8>>, lacking, scoped, allowed, ok| Case {
        method,
        path,
        body,
        headers: vec![],
        lacking,
        scoped,
        allowed,
        ok,
    };
    let mut cases = vec![
        c(
            "GET",
            o("config", "config"),
            None,
            None,
            false,
            &read_a,
            200,
        ),
        c(
            "HEAD",
            o("config", "config"),
            None,
            None,
            false,
            &read_a,
            200,
        ),
        c("GET", o("config", ""), None, None, false, &read_a, 200),
        c(
            "DELETE",
            o("config", "config"),
            None,
            Some(&append_all),
            false,
            "",
            403,
        ),
        c("GET", o("keys", &key1), None, None, false, &read_a, 200),
        c("GET", o("keys", ""), None, None, false, &read_a, 200),
        c(
            "PUT",
            o("keys", &random_hex(16)),
            Some(b"{}".to_vec()),
            Some(&append_all),
            false,
            &admin_a,
            201,
        ),
        c(
            "DELETE",
            o("keys", &key2),
            None,
            Some(&append_all),
            false,
            &admin_a,
            204,
        ),
        c("GET", o("index", &index2), None, None, false, &read_a, 200),
        c("GET", o("index", ""), None, None, false, &read_a, 200),
        c(
            "PUT",
            o("index", &index_name),
            Some(index_bytes.clone()),
            Some(&read_all),
            false,
            &append_a,
            201,
        ),
        c(
            "DELETE",
            o("index", &index2),
            None,
            Some(&append_all),
            false,
            &admin_a,
            204,
        ),
        c("GET", o("packs", ""), None, None, false, &read_a, 200),
        c("GET", o("packs", &f.pa), None, None, true, &read_a, 200),
        c("HEAD", o("packs", &f.pa), None, None, true, &read_a, 200),
        c(
            "PUT",
            o("packs", &new_pack),
            Some(new_pack_bytes.clone()),
            Some(&read_all),
            false,
            &append_a,
            201,
        ),
        c(
            "DELETE",
            o("packs", &doomed_pack),
            None,
            Some(&append_all),
            false,
            &admin_a,
            204,
        ),
        c("GET", o("refs", &f.sa), None, None, true, &read_a, 200),
        c("HEAD", o("refs", &f.sa), None, None, true, &read_a, 200),
        c("GET", o("refs", ""), None, None, false, &read_a, 200),
        c(
            "PUT",
            o("refs", &new_refs),
            Some(pack_list(&new_refs, "a", &[&f.pa])),
            Some(&read_all),
            true,
            &append_a,
            201,
        ),
        c(
            "DELETE",
            o("refs", &doomed_refs),
            None,
            Some(&append_all),
            true,
            &admin_a,
            204,
        ),
        c("GET", o("snapshots", &f.sa), None, None, true, &read_a, 200),
        c(
            "HEAD",
            o("snapshots", &f.sa),
            None,
            None,
            true,
            &read_a,
            200,
        ),
        c("GET", o("snapshots", ""), None, None, false, &read_a, 200),
        c(
            "PUT",
            o("snapshots", &new_snap),
            Some(repo.manifest(&new_snap, "a")),
            Some(&read_all),
            true,
            &append_a,
            201,
        ),
        c(
            "DELETE",
            o("snapshots", &doomed_snap),
            None,
            Some(&append_all),
            true,
            &admin_a,
            204,
        ),
        c("GET", o("locks", &lock1), None, None, false, &read_a, 200),
        c("GET", o("locks", ""), None, None, false, &read_a, 200),
        c(
            "PUT",
            o("locks", &random_hex(16)),
            Some(b"lease".to_vec()),
            Some(&read_all),
            false,
            &append_a,
            201,
        ),
        c(
            "DELETE",
            o("locks", &lock2),
            None,
            Some(&read_all),
            false,
            &admin_a,
            204,
        ),
        c("GET", o("gc", &gc1), None, None, false, &read_a, 200),
        c("GET", o("gc", ""), None, None, false, &read_a, 200),
        c(
            "PUT",
            o("gc", &random_hex(16)),
            Some(b"gc".to_vec()),
            Some(&append_all),
            false,
            &admin_a,
            201,
        ),
        c(
            "DELETE",
            o("gc", &gc2),
            None,
            Some(&append_all),
            false,
            &admin_a,
            204,
        ),
        c(
            "POST",
            "/v1/r/flush".into(),
            None,
            Some(&read_all),
            false,
            &append_a,
            204,
        ),
        c(
            "GET",
            "/v1/r/temporaries".into(),
            None,
            Some(&append_all),
            false,
            &admin_a,
            200,
        ),
        c(
            "POST",
            "/v1/r/temporaries/remove?older_than_secs=3600".into(),
            None,
            Some(&append_all),
            false,
            &admin_a,
            200,
        ),
        c(
            "GET",
            "/v1/r/whoami".into(),
            None,
            None,
            false,
            &read_a,
            200,
        ),
        c(
            "GET",
            "/v1/nope/whoami".into(),
            None,
            None,
            false,
            &admin_all,
            404,
        ),
        c(
            "GET",
            "/v1/r/o/bogus/x".into(),
            None,
            None,
            false,
            &admin_all,
            404,
        ),
        c(
            "GET",
            "/v2/r/whoami".into(),
            None,
            None,
            false,
            &admin_all,
            404,
        ),
        c(
            "PATCH",
            o("keys", &key1),
            None,
            None,
            false,
            &admin_all,
            404,
        ),
    ];
    let mut create = c(
        "PUT",
        "/v1/fresh/o/config/config".into(),
        Some(new_repo_config),
        Some(&append_all),
        false,
        &admin_all,
        201,
    );
    create.headers = vec![("If-None-Match", "*")];
    cases.push(create);

    for case in &cases {
        let what = format!("{} {}", case.method, case.path);
        let send = |token: Option<&str>| {
            f.srv
                .req(
                    case.method,
                    &case.path,
                    token,
                    &case.headers,
                    case.body.as_deref(),
                )
                .status
        };
        assert_eq!(send(None), 401, "{what} without a token");
        assert_eq!(send(Some("vmk_nonsense")), 401, "{what} malformed token");
        assert_eq!(send(Some(&unknown)), 401, "{what} unknown token");
        if case.scoped {
            assert_eq!(send(Some(&other)), 403, "{what} token of another VM");
        }
        if let Some(lacking) = case.lacking {
            assert_eq!(send(Some(lacking)), 403, "{what} token lacking the right");
        }
        if !case.allowed.is_empty() {
            assert_eq!(send(Some(case.allowed)), case.ok, "{what} allowed token");
        }
    }
    // The allowed writes landed, the deletes removed.
    assert!(repo.get(ObjectKind::Pack, &new_pack).is_some());
    assert!(repo.get(ObjectKind::Pack, &doomed_pack).is_none());
    assert!(repo.get(ObjectKind::Snapshot, &new_snap).is_some());
    assert!(repo.get(ObjectKind::Snapshot, &doomed_snap).is_none());
    assert!(
        repo.get(ObjectKind::Refs, &doomed_snap).is_none(),
        "manifest delete removes its pack list"
    );
    assert!(repo.get(ObjectKind::Refs, &doomed_refs).is_none());
    assert!(repo.get(ObjectKind::Refs, &new_refs).is_some());
    assert!(repo.get(ObjectKind::Config, "config").is_some());
    assert!(f.srv.dir.join("fresh/config").is_file());
    let who = f.srv.get("/v1/r/whoami", &read_a).json();
    assert_eq!(who["vms"], serde_json::json!(["a"]));
    assert_eq!(who["rights"], serde_json::json!(["read"]));
}

/// (2) An append token cannot delete or replace anything.
#[test]
fn append_cannot_delete_or_replace() {
    let f = fixture(false);
    let t = &f.srv.tokens;
    let append = mint(t, &["*"], A);
    let append_a = mint(t, &["a"], A);
    let repo = &f.repo;
    let key = random_hex(16);
    repo.put(ObjectKind::Key, &key, b"{}");
    let gc = random_hex(16);
    repo.put(ObjectKind::GcRecord, &gc, b"gc");
    let index = {
        let b = repo.framed(ObjectKind::Index, b"i");
        let n = blake3::hash(&b).to_hex().to_string();
        repo.put(ObjectKind::Index, &n, &b);
        n
    };
    // A lease of another token.
    let lock = random_hex(16);
    assert_eq!(
        f.srv.put(&o("locks", &lock), &append_a, b"mine").status,
        201
    );
    let before = tree(&f.srv.dir);

    for (kind, name) in [
        ("config", "config"),
        ("keys", key.as_str()),
        ("index", index.as_str()),
        ("packs", f.pa.as_str()),
        ("refs", f.sa.as_str()),
        ("snapshots", f.sa.as_str()),
        ("locks", lock.as_str()),
        ("gc", gc.as_str()),
    ] {
        let r = f
            .srv
            .req("DELETE", &o(kind, name), Some(&append), &[], None);
        assert_eq!(r.status, 403, "DELETE {kind}");
    }
    let config = repo.get(ObjectKind::Config, "config").unwrap();
    for (kind, name, body, want) in [
        ("snapshots", f.sa.clone(), repo.manifest(&f.sa, "a"), 409),
        ("refs", f.sa.clone(), pack_list(&f.sa, "a", &[&f.pa]), 409),
        ("config", "config".into(), config.clone(), 403),
        ("keys", key.clone(), b"{\"x\":1}".to_vec(), 403),
        ("gc", gc.clone(), b"other".to_vec(), 403),
        ("locks", lock.clone(), b"stolen".to_vec(), 409),
    ] {
        let r = f.srv.put(&o(kind, &name), &append, &body);
        assert_eq!(r.status, want, "PUT over {kind}: {:?}", r.json());
    }
    // Replacing a pack or index object with the same name and other bytes is impossible.
    let (_, other_pack) = repo.pack(&[b"other"], false);
    assert_eq!(
        f.srv.put(&o("packs", &f.pa), &append, &other_pack).status,
        422
    );
    // The same bytes again: 204, nothing rewritten.
    let same = repo.get(ObjectKind::Pack, &f.pa).unwrap();
    assert_eq!(f.srv.put(&o("packs", &f.pa), &append, &same).status, 204);
    let same = repo.get(ObjectKind::Index, &index).unwrap();
    assert_eq!(f.srv.put(&o("index", &index), &append, &same).status, 204);
    assert_eq!(tree(&f.srv.dir), before, "nothing changed on disk");

    // The lease's owner may refresh and remove it; the owner file follows.
    let owner = f.srv.dir.join(".vmkeep-serve/owners/r").join(&lock);
    assert!(owner.is_file());
    assert_eq!(
        f.srv
            .put(&o("locks", &lock), &append_a, b"refreshed")
            .status,
        204
    );
    assert_eq!(repo.get(ObjectKind::Lock, &lock).unwrap(), b"refreshed");
    assert_eq!(
        f.srv
            .req("DELETE", &o("locks", &lock), Some(&append_a), &[], None)
            .status,
        204
    );
    assert!(repo.get(ObjectKind::Lock, &lock).is_none());
    assert!(!owner.exists());
}

/// (3) A read token for VM a sees a's restore points and their packs, not b's.
#[test]
fn read_scope_hides_other_vms() {
    let f = fixture(true);
    let read_a = mint(&f.srv.tokens, &["a"], R);
    let names = |kind: &str| -> Vec<String> {
        let r = f.srv.get(&o(kind, ""), &read_a);
        assert_eq!(r.status, 200);
        let mut v: Vec<String> = r.json()["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("snapshots"), vec![f.sa.clone()]);
    assert_eq!(names("refs"), vec![f.sa.clone()]);
    assert_eq!(
        names("packs").len(),
        3,
        "pack names are listed to any reader"
    );
    assert_eq!(f.srv.get(&o("snapshots", &f.sb), &read_a).status, 403);
    assert_eq!(f.srv.get(&o("refs", &f.sb), &read_a).status, 403);
    assert_eq!(f.srv.get(&o("packs", &f.pb), &read_a).status, 403);
    let shared = f.srv.get(&o("packs", &f.shared), &read_a);
    assert_eq!(shared.status, 200);
    assert_eq!(
        shared.body,
        f.repo.get(ObjectKind::Pack, &f.shared).unwrap()
    );
    assert_eq!(f.srv.get(&o("packs", &f.pa), &read_a).status, 200);
    assert_eq!(f.srv.get(&o("snapshots", &f.sa), &read_a).status, 200);
    // A pack list written behind the server's back is found on a miss.
    let sb2 = f.repo.snapshot("a", &[&f.pb]);
    assert_eq!(f.srv.get(&o("packs", &f.pb), &read_a).status, 200);
    assert_eq!(names("snapshots").len(), 2);
    f.repo
        .store
        .delete(&vmkeep_store::Key::new(ObjectKind::Refs, &sb2).unwrap())
        .unwrap();
    assert_eq!(
        f.srv.get(&o("snapshots", &sb2), &read_a).status,
        403,
        "a manifest without a pack list"
    );

    // Reads: HEAD size, ?max, ranges.
    let size = f.repo.get(ObjectKind::Pack, &f.pa).unwrap().len();
    let head = f
        .srv
        .req("HEAD", &o("packs", &f.pa), Some(&read_a), &[], None);
    assert_eq!(head.size.as_deref(), Some(size.to_string().as_str()));
    let small = f.srv.get(&format!("{}?max=10", o("packs", &f.pa)), &read_a);
    assert_eq!(small.status, 413);
    assert_eq!(small.json()["error"], "too-large");
    assert_eq!(small.json()["size"], size as u64);
    assert_eq!(small.json()["max"], 10);
    let part = f.srv.req(
        "GET",
        &o("packs", &f.pa),
        Some(&read_a),
        &[("Range", "bytes=2-5")],
        None,
    );
    assert_eq!(part.status, 206);
    assert_eq!(
        part.body,
        f.repo.get(ObjectKind::Pack, &f.pa).unwrap()[2..6]
    );
    assert_eq!(
        part.range.as_deref(),
        Some(format!("bytes 2-5/{size}").as_str())
    );
    let past = format!("bytes={}-{}", size - 2, size + 5);
    let r = f.srv.req(
        "GET",
        &o("packs", &f.pa),
        Some(&read_a),
        &[("Range", past.as_str())],
        None,
    );
    assert_eq!(r.status, 416);
    assert_eq!(r.json()["error"], "short");
    // The largest end a header can carry is past the end too, not an overflow (found by hand:
    // the length was computed before the end was checked, and the handler panicked: a 500).
    let r = f.srv.req(
        "GET",
        &o("packs", &f.pa),
        Some(&read_a),
        &[("Range", "bytes=0-18446744073709551615")],
        None,
    );
    assert_eq!(r.status, 416);
    assert_eq!(f.srv.get(&o("keys", &random_hex(16)), &read_a).status, 404);
}

/// (4) Oversized bodies and bad names change nothing on disk.
#[test]
fn bounds_and_names() {
    let f = fixture(false);
    let admin = mint(&f.srv.tokens, &["*"], ADM);
    let append = mint(&f.srv.tokens, &["*"], A);
    let before = tree(&f.srv.dir);
    let lock = random_hex(16);
    let r = f
        .srv
        .put(&o("locks", &lock), &append, &vec![b'x'; (1 << 20) + 1]);
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "too-large");
    let r = f
        .srv
        .put(&o("keys", &lock), &admin, &vec![b'x'; (64 << 10) + 1]);
    assert_eq!(r.status, 413);
    // Exactly at the bound is accepted (then removed again).
    assert_eq!(
        f.srv
            .put(&o("locks", &lock), &append, &vec![b'x'; 1 << 20])
            .status,
        201
    );
    assert_eq!(
        f.srv
            .req("DELETE", &o("locks", &lock), Some(&append), &[], None)
            .status,
        204
    );
    assert_eq!(tree(&f.srv.dir), before);

    let long = "a".repeat(129);
    let long_repo = "r".repeat(65);
    for (path, want) in [
        ("/v1/r/o/keys/..".to_string(), 400),
        ("/v1/r/o/keys/%2e%2e".into(), 400),
        ("/v1/r/o/keys/%2e%2e%2fconfig".into(), 400),
        ("/v1/r/o/keys/a%2Fb".into(), 400),
        ("/v1/r/o/keys/ABCD".into(), 400),
        ("/v1/r/o/keys/.hidden".into(), 400),
        (format!("/v1/r/o/keys/{long}"), 400),
        ("/v1/r/o/config/other".into(), 400),
        ("/v1/../o/keys/abcd".into(), 400),
        ("/v1/%2e%2e/o/keys/abcd".into(), 400),
        ("/v1/.vmkeep-serve/o/keys/abcd".into(), 400),
        ("/v1/-r/o/keys/abcd".into(), 400),
        ("/v1/r%2Fx/o/keys/abcd".into(), 400),
        (format!("/v1/{long_repo}/o/keys/abcd"), 400),
        ("/v1/r/o/../config".into(), 404),
        ("/v1/r/o/keys/a/b".into(), 404),
        // (an admin key file PUT would create the repository: PROTOCOL.md §3)
        ("/v1/nosuch/o/index/abcd".into(), 404),
    ] {
        assert_eq!(f.srv.raw("PUT", &path, &admin, b"{}"), want, "PUT {path}");
        assert_eq!(
            f.srv.raw("DELETE", &path, &admin, b""),
            want,
            "DELETE {path}"
        );
    }
    // Creating a repository: an invalid or oversized config creates nothing.
    let inm = [("If-None-Match", "*")];
    let r = f.srv.req(
        "PUT",
        "/v1/new/o/config/config",
        Some(&admin),
        &inm,
        Some(b"{}"),
    );
    assert_eq!(r.status, 422);
    let big = vec![b' '; (64 << 10) + 1];
    let r = f.srv.req(
        "PUT",
        "/v1/new/o/config/config",
        Some(&admin),
        &inm,
        Some(&big),
    );
    assert_eq!(r.status, 413);
    assert_eq!(tree(&f.srv.dir), before, "nothing changed on disk");
    assert!(!f.srv.dir.join("nosuch").exists());
    assert!(!f.srv.dir.join("new").exists());
}

/// (5) Uploads that are not what their name says: 422.
#[test]
fn uploads_are_verified() {
    let f = fixture(false);
    let append = mint(&f.srv.tokens, &["*"], A);
    let repo = &f.repo;
    let before = tree(&f.srv.dir);
    let (name, bytes) = repo.pack(&[b"chunk"], false);
    let wrong_name = blake3::hash(b"else").to_hex().to_string();
    assert_eq!(
        f.srv.put(&o("packs", &wrong_name), &append, &bytes).status,
        422
    );
    let (bad_name, bad) = repo.pack(&[b"chunk one", b"chunk two"], true);
    let r = f.srv.put(&o("packs", &bad_name), &append, &bad);
    assert_eq!(r.status, 422, "{:?}", r.json());
    assert_eq!(r.json()["error"], "verification");
    let idx = repo.framed(ObjectKind::Index, b"index body");
    assert_eq!(
        f.srv.put(&o("index", &wrong_name), &append, &idx).status,
        422
    );
    // A pack list naming an invalid VM, or another restore point. (One naming a pack that
    // does not exist is accepted: PROTOCOL.md §5.)
    let snap = SnapshotId::random().to_hex();
    assert_eq!(
        f.srv
            .put(
                &o("refs", &snap),
                &append,
                &pack_list(&snap, "../a", &[&name])
            )
            .status,
        422
    );
    let other = SnapshotId::random().to_hex();
    assert_eq!(
        f.srv
            .put(&o("refs", &snap), &append, &pack_list(&other, "a", &[]))
            .status,
        422
    );
    assert_eq!(
        f.srv.put(&o("refs", &snap), &append, b"{not json").status,
        422
    );
    assert_eq!(tree(&f.srv.dir), before, "nothing stored");

    assert_eq!(f.srv.put(&o("packs", &name), &append, &bytes).status, 201);
    assert_eq!(
        f.srv
            .put(&o("refs", &snap), &append, &pack_list(&snap, "a", &[&name]))
            .status,
        201
    );
    // A manifest of another VM than its pack list, or naming another id.
    assert_eq!(
        f.srv
            .put(&o("snapshots", &snap), &append, &repo.manifest(&snap, "b"))
            .status,
        422
    );
    assert_eq!(
        f.srv
            .put(&o("snapshots", &snap), &append, &repo.manifest(&other, "a"))
            .status,
        422
    );
    assert_eq!(
        f.srv
            .put(&o("snapshots", &snap), &append, b"garbage")
            .status,
        422
    );
    assert!(repo.get(ObjectKind::Snapshot, &snap).is_none());
    assert_eq!(
        f.srv
            .put(&o("snapshots", &snap), &append, &repo.manifest(&snap, "a"))
            .status,
        201
    );
    // Without a pack list, an append token cannot write a manifest.
    let lone = SnapshotId::random().to_hex();
    assert_eq!(
        f.srv
            .put(&o("snapshots", &lone), &append, &repo.manifest(&lone, "a"))
            .status,
        403
    );

    // An encrypted repository cannot check blob ids: the same kind of pack is accepted there.
    let enc = Repo::create(&f.srv.dir, "e", true);
    let (bad_name, bad) = enc.pack(&[b"chunk"], true);
    assert_eq!(
        f.srv
            .put(&format!("/v1/e/o/packs/{bad_name}"), &append, &bad)
            .status,
        201
    );
    // The uploader may read it back (no pack list names it yet); a reader of VM a may not.
    assert_eq!(
        f.srv
            .get(&format!("/v1/e/o/packs/{bad_name}"), &append)
            .status,
        200
    );
    let read_a = mint(&f.srv.tokens, &["a"], R);
    let append_a = mint(&f.srv.tokens, &["a"], A);
    assert_eq!(
        f.srv
            .get(&format!("/v1/e/o/packs/{bad_name}"), &read_a)
            .status,
        403
    );
    let (p2, b2) = enc.pack(&[b"mine"], false);
    assert_eq!(
        f.srv
            .put(&format!("/v1/e/o/packs/{p2}"), &append_a, &b2)
            .status,
        201
    );
    assert_eq!(
        f.srv.get(&format!("/v1/e/o/packs/{p2}"), &append_a).status,
        200
    );
}

/// (6) Tokens added or removed while the server runs take effect without a restart.
#[test]
fn tokens_file_is_reread() {
    let f = fixture(false);
    let minted = tokens::add(&f.srv.tokens, &["a".into()], &[Right::Read], None).unwrap();
    assert_eq!(f.srv.get("/v1/r/whoami", &minted.token).status, 200);
    let other = mint(&f.srv.tokens, &["*"], R);
    assert!(tokens::remove(&f.srv.tokens, &minted.id).unwrap());
    assert_eq!(f.srv.get("/v1/r/whoami", &minted.token).status, 401);
    assert_eq!(f.srv.get("/v1/r/whoami", &other).status, 200);
    // A broken tokens file accepts no token.
    std::fs::write(&f.srv.tokens, b"{broken").unwrap();
    assert_eq!(f.srv.get("/v1/r/whoami", &other).status, 401);
}

/// (7) Many clients at once.
#[test]
fn concurrent_clients() {
    let f = fixture(true);
    let append = mint(&f.srv.tokens, &["*"], A);
    std::thread::scope(|s| {
        for t in 0..8 {
            let (f, append) = (&f, &append);
            s.spawn(move || {
                for i in 0..6 {
                    let content = format!("thread {t} pack {i}").repeat(1000);
                    let (name, bytes) = f.repo.pack(&[content.as_bytes()], false);
                    assert_eq!(f.srv.put(&o("packs", &name), append, &bytes).status, 201);
                    let r = f.srv.get(&o("packs", &name), append);
                    assert_eq!(r.status, 200);
                    assert_eq!(r.body, bytes);
                    let lock = random_hex(16);
                    assert_eq!(f.srv.put(&o("locks", &lock), append, b"lease").status, 201);
                    assert_eq!(f.srv.get(&o("snapshots", &f.sa), append).status, 200);
                }
            });
        }
    });
    assert_eq!(
        f.repo.store.list(ObjectKind::Pack).unwrap().len(),
        3 + 8 * 6
    );
}

/// (8) The self-signed certificate is kept: same fingerprint after a restart.
#[test]
fn fingerprint_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("tokens.json");
    let token = mint(&tokens, &["*"], R);
    Repo::create(tmp.path(), "r", false);
    let first = Server::start(tmp.path(), &tokens);
    assert_eq!(first.get("/v1/r/whoami", &token).status, 200);
    let fp = first.fingerprint.clone();
    first.stop();
    let second = Server::start(tmp.path(), &tokens);
    assert_eq!(second.fingerprint, fp);
    assert_eq!(second.get("/v1/r/whoami", &token).status, 200);
    let pem = std::fs::read(tmp.path().join(".vmkeep-serve/tls/cert.pem")).unwrap();
    assert_eq!(vmkeep_server::fingerprint_of_pem(&pem).unwrap(), fp);
    second.stop();
}

/// (9) `HttpStore` against a real server passes the conformance suite every backend passes
/// (vmkeep-testkit), on an encrypted repository with an admin token.
#[test]
fn http_store_passes_the_conformance_suite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("srv");
    std::fs::create_dir(&dir).unwrap();
    let tokens = tmp.path().join("tokens.json");
    let admin = mint(&tokens, &["*"], ADM);
    Repo::create(&dir, "r", true);
    let srv = Server::start(&dir, &tokens);
    let store = vmkeep_store::HttpStore::connect(
        &format!("https://{}/r", srv.addr),
        vmkeep_store::HttpOptions {
            token: Some(admin),
            tls_fingerprint: Some(srv.fingerprint.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let report = vmkeep_testkit::conformance::run(std::sync::Arc::new(store));
    assert!(report.conditional_writes_honoured);
}
