//! The NBD client against a scripted, misbehaving in-process server: every violation must
//! end in a typed error quickly — no panic, no hang, no huge allocation.

mod scripted_nbd;

use std::time::{Duration, Instant};

use scripted_nbd::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vmkeep_qemu::nbd::proto::*;
use vmkeep_qemu::nbd::NbdClient;
use vmkeep_qemu::Error;

const SIZE: u64 = 1 << 20;

/// A correct handshake granting `contexts` (id, name) for an export of SIZE bytes.
async fn handshake(s: &mut UnixStream, contexts: &[(u32, &str)]) {
    greet(s).await;
    loop {
        let (opt, _) = read_option(s).await;
        match opt {
            OPT_STRUCTURED_REPLY => s.write_all(&opt_reply(opt, REP_ACK, &[])).await.unwrap(),
            OPT_SET_META_CONTEXT => {
                for (id, name) in contexts {
                    let mut p = id.to_be_bytes().to_vec();
                    p.extend_from_slice(name.as_bytes());
                    s.write_all(&opt_reply(opt, REP_META_CONTEXT, &p))
                        .await
                        .unwrap();
                }
                s.write_all(&opt_reply(opt, REP_ACK, &[])).await.unwrap();
            }
            OPT_GO => {
                let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                p.extend_from_slice(&SIZE.to_be_bytes());
                p.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
                s.write_all(&opt_reply(opt, REP_INFO, &p)).await.unwrap();
                s.write_all(&opt_reply(opt, REP_ACK, &[])).await.unwrap();
                return;
            }
            other => panic!("unexpected option {other}"),
        }
    }
}

/// Reads one request: (command, cookie, offset, len).
async fn read_request(s: &mut UnixStream) -> (u16, u64, u64, u32) {
    let mut r = [0u8; 28];
    s.read_exact(&mut r).await.unwrap();
    (
        u16::from_be_bytes(r[6..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
        u64::from_be_bytes(r[16..24].try_into().unwrap()),
        u32::from_be_bytes(r[24..28].try_into().unwrap()),
    )
}

fn chunk(flags: u16, t: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    chunk_with_len(flags, t, cookie, payload.len() as u32, payload)
}

fn chunk_with_len(flags: u16, t: u16, cookie: u64, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&t.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn data(offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(bytes);
    p
}

fn assert_protocol<T: std::fmt::Debug>(r: Result<T, Error>) {
    match r {
        Err(Error::NbdProtocol { .. }) => {}
        other => panic!("expected NbdProtocol, got {other:?}"),
    }
}

/// Runs a read against a server that answers the first request with `reply(cookie, off, len)`.
async fn read_with_reply(reply: fn(u64, u64, u32) -> Vec<u8>) -> Result<Vec<u8>, Error> {
    let (_d, p) = serve(move |mut s| async move {
        handshake(&mut s, &[]).await;
        let (_, cookie, off, len) = read_request(&mut s).await;
        let _ = s.write_all(&reply(cookie, off, len)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    let c = NbdClient::connect_unix_with(&p, "x", &[], opts())
        .await
        .unwrap();
    let start = Instant::now();
    let r = c.read(0, 4096).await;
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
    r
}

#[tokio::test]
async fn bad_greeting_magic() {
    let (_d, p) = serve(|mut s| async move {
        let mut g = greeting();
        g[0] = b'X';
        s.write_all(&g).await.unwrap();
    });
    assert_protocol(NbdClient::connect_unix_with(&p, "x", &[], opts()).await);
}

#[tokio::test]
async fn huge_option_reply_rejected_without_allocating() {
    let (_d, p) = serve(|mut s| async move {
        s.write_all(&greeting()).await.unwrap();
        let mut f = [0u8; 4];
        s.read_exact(&mut f).await.unwrap();
        read_option(&mut s).await;
        let mut r = opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        r[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        s.write_all(&r).await.unwrap();
    });
    assert_protocol(NbdClient::connect_unix_with(&p, "x", &[], opts()).await);
}

#[tokio::test]
async fn structured_replies_refused() {
    let (_d, p) = serve(|mut s| async move {
        s.write_all(&greeting()).await.unwrap();
        let mut f = [0u8; 4];
        s.read_exact(&mut f).await.unwrap();
        read_option(&mut s).await;
        let r = opt_reply(OPT_STRUCTURED_REPLY, REP_FLAG_ERROR | 1, b"no");
        s.write_all(&r).await.unwrap();
    });
    let e = NbdClient::connect_unix_with(&p, "x", &[], opts())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NbdUnsupported(_)), "{e}");
}

#[tokio::test]
async fn unrequested_meta_context_rejected() {
    let (_d, p) = serve(|mut s| async move {
        handshake(
            &mut s,
            &[(1, "base:allocation"), (2, "qemu:dirty-bitmap:evil")],
        )
        .await;
    });
    assert_protocol(NbdClient::connect_unix_with(&p, "x", &["base:allocation"], opts()).await);
}

#[tokio::test]
async fn stalled_handshake_times_out() {
    let (_d, p) = serve(|s| async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(s);
    });
    let e = NbdClient::connect_unix_with(&p, "x", &[], opts())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
}

#[tokio::test]
async fn unknown_cookie() {
    assert_protocol(
        read_with_reply(|c, o, l| {
            chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                c + 1000,
                &data(o, &vec![1; l as usize]),
            )
        })
        .await,
    );
}

#[tokio::test]
async fn data_outside_request() {
    assert_protocol(
        read_with_reply(|c, o, l| {
            chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                c,
                &data(o + 1, &vec![1; l as usize]),
            )
        })
        .await,
    );
}

#[tokio::test]
async fn overlapping_data_chunks() {
    assert_protocol(
        read_with_reply(|c, o, l| {
            let half = l as usize / 2;
            let mut v = chunk(0, REPLY_TYPE_OFFSET_DATA, c, &data(o, &vec![1; half + 1]));
            v.extend(chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                c,
                &data(o + half as u64, &vec![2; half]),
            ));
            v
        })
        .await,
    );
}

#[tokio::test]
async fn offset_data_without_data() {
    assert_protocol(
        read_with_reply(|c, o, _| chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, c, &data(o, b"")))
            .await,
    );
}

/// Data chunks may come in any order; each lands where its offset says (the client reads them
/// straight into the request's buffer).
#[tokio::test]
async fn data_chunks_out_of_order_land_in_place() {
    let got = read_with_reply(|c, o, l| {
        let half = l as usize / 2;
        let mut v = chunk(
            0,
            REPLY_TYPE_OFFSET_DATA,
            c,
            &data(o + half as u64, &vec![2; l as usize - half]),
        );
        v.extend(chunk(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            c,
            &data(o, &vec![1; half]),
        ));
        v
    })
    .await
    .unwrap();
    assert_eq!(got.len(), 4096);
    assert!(got[..2048].iter().all(|&b| b == 1) && got[2048..].iter().all(|&b| b == 2));
}

#[tokio::test]
async fn oversized_chunk_length() {
    assert_protocol(
        read_with_reply(|c, o, _| {
            chunk_with_len(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                c,
                u32::MAX,
                &data(o, b"x"),
            )
        })
        .await,
    );
}

#[tokio::test]
async fn unknown_chunk_type() {
    assert_protocol(read_with_reply(|c, _, _| chunk(REPLY_FLAG_DONE, 42, c, &[])).await);
}

#[tokio::test]
async fn unknown_chunk_flags() {
    assert_protocol(
        read_with_reply(|c, o, l| {
            chunk(
                0x8001,
                REPLY_TYPE_OFFSET_DATA,
                c,
                &data(o, &vec![1; l as usize]),
            )
        })
        .await,
    );
}

#[tokio::test]
async fn incomplete_coverage() {
    assert_protocol(
        read_with_reply(|c, o, _| {
            chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                c,
                &data(o, &[1; 100]),
            )
        })
        .await,
    );
}

#[tokio::test]
async fn successful_simple_reply_to_read() {
    assert_protocol(
        read_with_reply(|c, _, _| {
            let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            v.extend_from_slice(&0u32.to_be_bytes());
            v.extend_from_slice(&c.to_be_bytes());
            v
        })
        .await,
    );
}

#[tokio::test]
async fn garbage_reply_magic() {
    assert_protocol(read_with_reply(|_, _, _| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]).await);
}

#[tokio::test]
async fn connection_closed_mid_reply() {
    let r = read_with_reply(|c, o, _| {
        let mut v = chunk_with_len(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            c,
            4104,
            &data(o, b"x"),
        );
        v.truncate(v.len() - 1);
        v
    });
    // The scripted server sleeps then closes: either a protocol error (EOF mid-reply) or closed.
    match r.await {
        Err(Error::NbdProtocol { .. })
        | Err(Error::NbdClosed { .. })
        | Err(Error::Timeout { .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn block_status_for_unnegotiated_context() {
    let (_d, p) = serve(|mut s| async move {
        handshake(&mut s, &[(7, "base:allocation")]).await;
        let (_, cookie, _, len) = read_request(&mut s).await;
        let mut pl = 8u32.to_be_bytes().to_vec(); // id 8 was never negotiated
        pl.extend_from_slice(&len.to_be_bytes());
        pl.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&chunk(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            &pl,
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    let c = NbdClient::connect_unix_with(&p, "x", &["base:allocation"], opts())
        .await
        .unwrap();
    assert_protocol(c.block_status("base:allocation", 0, 4096).await);
    // The connection is now closed for good.
    assert!(matches!(c.read(0, 1).await, Err(Error::NbdClosed { .. })));
}

#[tokio::test]
async fn server_error_chunk_is_per_request_and_connection_survives() {
    let (_d, p) = serve(|mut s| async move {
        handshake(&mut s, &[(1, "base:allocation")]).await;
        let (_, cookie, off, _) = read_request(&mut s).await;
        let mut pl = 5u32.to_be_bytes().to_vec();
        pl.extend_from_slice(&4u16.to_be_bytes());
        pl.extend_from_slice(b"oops");
        pl.extend_from_slice(&(off + 10).to_be_bytes());
        s.write_all(&chunk(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR_OFFSET,
            cookie,
            &pl,
        ))
        .await
        .unwrap();
        // Second request: a hole + data, split over two chunks.
        let (_, cookie, off, len) = read_request(&mut s).await;
        let mut hole = off.to_be_bytes().to_vec();
        hole.extend_from_slice(&(len / 2).to_be_bytes());
        s.write_all(&chunk(0, REPLY_TYPE_OFFSET_HOLE, cookie, &hole))
            .await
            .unwrap();
        let d = data(off + u64::from(len / 2), &vec![9; (len - len / 2) as usize]);
        s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, &d))
            .await
            .unwrap();
        // Third: block status with an extent longer than asked (gets clipped).
        let (cmd, cookie, _, len) = read_request(&mut s).await;
        assert_eq!(cmd, CMD_BLOCK_STATUS);
        let mut pl = 1u32.to_be_bytes().to_vec();
        for (l, f) in [(len / 2, 3u32), (len, 0)] {
            pl.extend_from_slice(&l.to_be_bytes());
            pl.extend_from_slice(&f.to_be_bytes());
        }
        s.write_all(&chunk(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            &pl,
        ))
        .await
        .unwrap();
        let (cmd, ..) = read_request(&mut s).await;
        assert_eq!(cmd, CMD_DISC);
    });
    let c = NbdClient::connect_unix_with(&p, "x", &["base:allocation"], opts())
        .await
        .unwrap();
    match c.read(0, 4096).await {
        Err(Error::NbdServer {
            errno: 5,
            offset: 10,
            message,
            ..
        }) => assert_eq!(message, "oops"),
        other => panic!("unexpected {other:?}"),
    }
    let sp = c.read_sparse(4096, 4096).await.unwrap();
    assert_eq!(&sp.data[..2048], &[0; 2048][..]);
    assert_eq!(&sp.data[2048..], &[9; 2048][..]);
    assert_eq!(sp.holes, vec![(4096, 2048)]);
    let ext = c.block_status("base:allocation", 0, 8192).await.unwrap();
    assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 8192);
    assert_eq!((ext[0].length, ext[0].flags), (4096, 3));
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn silent_server_times_out_and_closes() {
    let (_d, p) = serve(|mut s| async move {
        handshake(&mut s, &[]).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let c = NbdClient::connect_unix_with(&p, "x", &[], opts())
        .await
        .unwrap();
    // Timeouts count running time in ticks (nbd/timeout.rs): a silent server still fails
    // the request after about the limit (500 ms).
    let t = Instant::now();
    let e = c.read(0, 4096).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "timed out after {took:?}"
    );
    assert!(matches!(c.read(0, 1).await, Err(Error::NbdClosed { .. })));
}
