//! `HttpStore` against a real HTTPS server (tests/test_server): the `Store` semantics of
//! `LocalStore`, bounded reads, certificate pinning, the token, and retries.
mod test_server;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use test_server::{Fault, Server, TOKEN};
use vmkeep_store::{Error, HttpOptions, HttpStore, Key, ObjectKind, Store, TemporariesRemoved};

fn options(server: &Server) -> HttpOptions {
    HttpOptions {
        token: Some(TOKEN.to_string()),
        tls_fingerprint: Some(server.fingerprint.clone()),
        retry_for: Duration::from_secs(10),
    }
}

fn store(server: &Server) -> HttpStore {
    HttpStore::connect(&server.url(), options(server)).unwrap()
}

fn pack(name: &str) -> Key {
    Key::new(ObjectKind::Pack, name).unwrap()
}

#[test]
fn every_store_method_round_trips() {
    let server = Server::start();
    let s = store(&server);
    assert_eq!(s.location(), server.url());
    assert!(s.needs_pack_lists());

    let k = pack("abcdef");
    assert!(s.get(&k, 100).unwrap_err().is_not_found());
    assert!(s.size(&k).unwrap_err().is_not_found());
    s.put(&k, b"hello").unwrap();
    assert_eq!(s.get(&k, 5).unwrap(), b"hello");
    assert_eq!(s.get(&k, u64::MAX).unwrap(), b"hello");
    assert_eq!(s.get_range(&k, 1, 3).unwrap(), b"ell");
    assert_eq!(s.get_range(&k, 0, 5).unwrap(), b"hello");
    assert_eq!(s.get_range(&k, 2, 0).unwrap(), b"");
    assert!(matches!(
        s.get_range(&k, 3, 5),
        Err(Error::ShortRead {
            offset: 3,
            len: 5,
            ..
        })
    ));
    assert!(matches!(
        s.get_range(&k, u64::MAX, 2),
        Err(Error::ShortRead { .. })
    ));
    assert!(s.get_range(&pack("00"), 0, 1).unwrap_err().is_not_found());
    assert_eq!(s.size(&k).unwrap(), 5);

    // Replace, then conditional creates.
    s.put(&k, b"hello!").unwrap();
    assert_eq!(s.get(&k, 100).unwrap(), b"hello!");
    assert!(!s.put_if_absent(&k, b"other").unwrap());
    assert_eq!(s.get(&k, 100).unwrap(), b"hello!");
    let snap = Key::new(ObjectKind::Snapshot, "0123").unwrap();
    assert!(s.put_if_absent(&snap, b"x").unwrap());
    assert!(s.put_if_absent(&Key::config(), b"{}").unwrap());
    assert_eq!(s.get(&Key::config(), 64 << 10).unwrap(), b"{}");

    // Listing by kind, sorted, with sizes and times.
    s.put(&pack("0a"), b"").unwrap();
    let before = SystemTime::now() - Duration::from_secs(60);
    let l = s.list(ObjectKind::Pack).unwrap();
    let names: Vec<_> = l.iter().map(|m| m.key.name.as_str()).collect();
    assert_eq!(names, ["0a", "abcdef"]);
    assert_eq!((l[0].size, l[1].size), (0, 6));
    assert!(l
        .iter()
        .all(|m| m.modified > before && m.key.kind == ObjectKind::Pack));
    assert_eq!(s.list(ObjectKind::Config).unwrap()[0].key, Key::config());
    assert_eq!(s.list(ObjectKind::Snapshot).unwrap()[0].key, snap);
    assert!(s.list(ObjectKind::Index).unwrap().is_empty());

    // Delete; absent is fine.
    s.delete(&k).unwrap();
    s.delete(&k).unwrap();
    assert!(s.get(&k, 5).unwrap_err().is_not_found());
    s.flush().unwrap();
    assert_eq!(server.state.flushes.load(Ordering::SeqCst), 1);

    // Temporaries.
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    *server.state.temporaries.lock().unwrap() = vec![
        ("packs/ab/.tmp-dead".into(), 7, now_ms - 600_000),
        ("index/.tmp-live".into(), 2, now_ms),
    ];
    let t = s.list_temporaries().unwrap();
    assert_eq!(t.len(), 2);
    assert_eq!(t[0].location, "packs/ab/.tmp-dead");
    assert_eq!(t[0].size, 7);
    assert!(t[0].modified < SystemTime::now() - Duration::from_secs(500));
    let removed = s.remove_temporaries(Duration::from_secs(60)).unwrap();
    assert_eq!(removed, TemporariesRemoved { count: 1, bytes: 7 });
    assert_eq!(s.list_temporaries().unwrap().len(), 1);

    // Every request carried the token and the headers its method needs.
    let log = server.state.log.lock().unwrap();
    assert!(log.iter().all(|l| l.contains("auth=true")), "{log:?}");
    assert!(log
        .iter()
        .any(|l| l.starts_with("GET /v1/r/o/packs/abcdef") && l.contains("range=bytes=1-3")));
    assert!(log
        .iter()
        .any(|l| l.starts_with("PUT /v1/r/o/config/config") && l.ends_with("inm=*")));
}

#[test]
fn the_store_is_shared_by_many_threads() {
    let server = Server::start();
    let s = Arc::new(store(&server));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..10 {
                    let k = pack(&format!("{t:02x}{i:02x}"));
                    let data = vec![t as u8; 1000 * i];
                    s.put(&k, &data).unwrap();
                    assert_eq!(s.get(&k, 1 << 20).unwrap(), data);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(s.list(ObjectKind::Pack).unwrap().len(), 80);
}

#[test]
fn reads_are_bounded() {
    let server = Server::start();
    let s = store(&server);
    let k = Key::new(ObjectKind::Snapshot, "abcd").unwrap();
    s.put(&k, b"12345").unwrap();
    // The server refuses (413 with size and max).
    match s.get(&k, 4) {
        Err(
            e @ Error::TooLarge {
                size: 5, max: 4, ..
            },
        ) => {
            assert!(
                e.to_string()
                    .contains("manifest snapshots/abcd is too large"),
                "{e}"
            );
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // A server that ignores ?max and announces a huge length: refused unread.
    server.fault_next(&[Fault::HugeLength(1 << 40)]);
    assert!(matches!(
        s.get(&k, 1000),
        Err(Error::TooLarge {
            size: 1099511627776,
            max: 1000,
            ..
        })
    ));
    // A server that ignores ?max and streams without a length: the client stops reading one
    // byte past the bound and drops the connection.
    let flood = 256u64 << 20;
    server.fault_next(&[Fault::Flood(flood)]);
    let max = 100_000;
    match s.get(&k, max) {
        Err(Error::TooLarge {
            size, max: 100_000, ..
        }) => assert_eq!(size, max + 1),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(200));
    let sent = server.state.flooded.load(Ordering::SeqCst);
    assert!(
        sent < flood / 4,
        "the client read on: the server sent {sent} bytes"
    );
    // And the store still works afterwards.
    assert_eq!(s.get(&k, 5).unwrap(), b"12345");
}

#[test]
fn pinning_accepts_the_right_certificate_only() {
    let server = Server::start();
    // Colons and case are ignored.
    let colons: Vec<String> = server
        .fingerprint
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8(c.to_vec()).unwrap().to_uppercase())
        .collect();
    let s = HttpStore::connect(
        &server.url(),
        HttpOptions {
            tls_fingerprint: Some(colons.join(":")),
            ..options(&server)
        },
    )
    .unwrap();
    s.put(&pack("aa"), b"x").unwrap();

    let wrong = "ab".repeat(32);
    let s = HttpStore::connect(
        &server.url(),
        HttpOptions {
            tls_fingerprint: Some(wrong.clone()),
            ..options(&server)
        },
    )
    .unwrap();
    let start = Instant::now();
    match s.get(&pack("aa"), 10) {
        Err(e @ Error::FingerprintMismatch { .. }) => {
            let msg = e.to_string();
            let expected = format!(
                "the server's certificate fingerprint is {}, expected {wrong}",
                server.fingerprint
            );
            assert!(msg.contains(&expected), "{msg}");
            assert!(msg.contains("--tls-fingerprint"), "{msg}");
        }
        other => panic!("expected FingerprintMismatch, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(2), "not retried");
    assert_eq!(server.requests(), 1, "no request was sent");
}

#[test]
fn pinning_works_over_tls12() {
    let server = Server::start_with(true);
    let s = store(&server);
    s.put(&pack("aa"), b"x").unwrap();
    assert_eq!(s.get(&pack("aa"), 1).unwrap(), b"x");
}

#[test]
fn without_a_fingerprint_a_self_signed_server_is_refused() {
    let server = Server::start();
    let opts = HttpOptions {
        tls_fingerprint: None,
        ..options(&server)
    };
    match HttpStore::connect(&server.url(), opts) {
        // A system without CA certificates.
        Err(e @ Error::NoTrustRoots { .. }) => assert!(e.to_string().contains("--tls-fingerprint")),
        Ok(s) => match s.size(&pack("aa")) {
            Err(e @ Error::Tls { .. }) => assert!(e.to_string().contains("--tls-fingerprint")),
            other => panic!("expected a TLS error, got {other:?}"),
        },
        Err(e) => panic!("{e}"),
    }
    assert_eq!(server.requests(), 0);
}

#[test]
fn a_missing_or_wrong_token_is_refused_clearly() {
    let server = Server::start();
    for token in [None, Some("vmk_0123456789abcdef_ffff".to_string())] {
        let s = HttpStore::connect(
            &server.url(),
            HttpOptions {
                token: token.clone(),
                ..options(&server)
            },
        )
        .unwrap();
        match s.list(ObjectKind::Pack) {
            Err(e @ Error::Unauthorized { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("refused the token"), "{msg}");
                assert!(
                    msg.contains("--token-file") && msg.contains("VMKEEP_TOKEN"),
                    "{msg}"
                );
                assert!(!msg.contains("ffff"), "{msg}");
            }
            other => panic!("expected Unauthorized, got {other:?}"),
        }
    }
    let log = server.state.log.lock().unwrap();
    assert_eq!(log.len(), 2, "401 is not retried: {log:?}");
    assert!(log[0].contains("auth=false"));
}

#[test]
fn connection_drops_and_503s_are_retried() {
    let server = Server::start();
    let s = store(&server);
    s.put(&pack("aa"), b"payload").unwrap();
    let n = server.requests();
    server.fault_next(&[Fault::DropMidReply, Fault::DropMidReply]);
    assert_eq!(s.get(&pack("aa"), 10_000).unwrap(), b"payload");
    assert_eq!(server.requests(), n + 3);
    server.fault_next(&[Fault::Status(503), Fault::Status(500)]);
    s.put(&pack("bb"), b"two").unwrap();
    assert_eq!(server.requests(), n + 6);
    assert_eq!(s.get(&pack("bb"), 100).unwrap(), b"two");
}

#[test]
fn retries_give_up_after_the_window() {
    let server = Server::start();
    let s = HttpStore::connect(
        &server.url(),
        HttpOptions {
            retry_for: Duration::from_secs(1),
            ..options(&server)
        },
    )
    .unwrap();
    *server.state.always.lock().unwrap() = Some(Fault::Status(503));
    let start = Instant::now();
    match s.list(ObjectKind::Pack) {
        Err(e @ Error::Http { status: 503, .. }) => {
            assert!(e.to_string().contains("injected 503"), "{e}")
        }
        other => panic!("expected the last 503, got {other:?}"),
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // 0.2 + 0.4 + the 0.4 s left: four attempts.
    assert!(
        (3..=5).contains(&server.requests()),
        "{}",
        server.requests()
    );
}

#[test]
fn client_errors_are_not_retried() {
    let server = Server::start();
    let s = store(&server);
    let k = pack("aa");
    type Check = fn(&Error) -> bool;
    let cases: [(u16, Check); 5] = [
        (400, |e| matches!(e, Error::Http { status: 400, .. })),
        (
            403,
            |e| matches!(e, Error::Forbidden { message, .. } if message == "injected 403"),
        ),
        (409, |e| matches!(e, Error::Http { status: 409, .. })),
        (422, |e| matches!(e, Error::Verification { .. })),
        (507, |e| matches!(e, Error::NoSpace { .. })),
    ];
    for (status, expected) in cases {
        let n = server.requests();
        server.fault_next(&[Fault::Status(status)]);
        let e = s.put(&k, b"x").unwrap_err();
        assert!(expected(&e), "{status}: {e:?}");
        assert!(!e.to_string().contains('\n'));
        assert_eq!(server.requests(), n + 1, "{status} was retried");
    }
    // put_if_absent reads 409 and 412 as "existed".
    server.fault_next(&[Fault::Status(409)]);
    assert!(!s.put_if_absent(&pack("bb"), b"x").unwrap());
}

#[test]
fn a_bad_reply_is_an_error_not_a_panic() {
    let server = Server::start();
    let s = store(&server);
    // A name that is not an object name.
    server
        .state
        .objects
        .lock()
        .unwrap()
        .insert("packs/../x".into(), (vec![], 0));
    match s.list(ObjectKind::Pack) {
        Err(e @ Error::BadReply { .. }) => assert!(e.to_string().contains("invalid object name")),
        other => panic!("{other:?}"),
    }
    // An unreachable server: a network error after the retries.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = HttpStore::connect(
        &format!("https://127.0.0.1:{port}/r"),
        HttpOptions {
            retry_for: Duration::from_millis(300),
            ..options(&server)
        },
    )
    .unwrap();
    match s.flush() {
        Err(e @ Error::Network { .. }) => {
            assert!(e.to_string().contains("reachable"), "{e}");
            assert!(!e.to_string().contains(TOKEN));
        }
        other => panic!("{other:?}"),
    }
}
