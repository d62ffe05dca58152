//! The NBD server against hostile and odd clients speaking the protocol by hand: each case
//! gets the answer the protocol asks for (or a closed connection), and afterwards a fresh
//! client is still served correctly.

mod served_disk;

use served_disk::*;
use vmkeep_io::ServedDisk;
use vmkeep_qemu::nbd::proto::*;

const MIB: u64 = 1024 * 1024;

fn served() -> (Served, std::sync::Arc<MemDisk>) {
    // 34 MiB: room for a full 32 MiB read.
    let disk = MemDisk::new(image(34 * 16, 0));
    (serve(disk.clone(), opts()), disk)
}

#[test]
fn handshake_violations_close_the_connection() {
    let (srv, disk) = served();
    let p = &srv.sock;

    // Bad option magic.
    let mut c = Raw::connect(p);
    c.greet(CLIENT_FIXED_NEWSTYLE);
    c.send(&[0xde; 16]);
    assert!(c.closed());

    // A client that is not fixed newstyle, and one with unknown flags.
    for flags in [0, CLIENT_FIXED_NEWSTYLE | 0x100] {
        let mut c = Raw::connect(p);
        c.greet(flags);
        assert!(c.closed(), "client flags {flags:#x}");
    }

    // An unknown option claiming 4 GiB of data: closed, nothing read or allocated for it.
    let mut c = Raw::connect(p);
    c.greet(CLIENT_FIXED_NEWSTYLE);
    c.send(&IHAVEOPT.to_be_bytes());
    c.send(&999u32.to_be_bytes());
    c.send(&0xffff_fff0u32.to_be_bytes());
    assert!(c.closed());

    // EXPORT_NAME with an unknown name cannot be answered with an error: closed.
    let mut c = Raw::connect(p);
    c.greet(CLIENT_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());

    // NBD_OPT_ABORT is acknowledged, then the connection ends.
    let mut c = Raw::connect(p);
    c.greet(CLIENT_FIXED_NEWSTYLE);
    assert_eq!(c.haggle(OPT_ABORT, &[])[0].0, REP_ACK);
    assert!(c.closed());

    assert_serving(p, &disk);
}

#[test]
fn options_get_the_right_replies() {
    let (srv, disk) = served();
    let mut c = Raw::connect(&srv.sock);
    c.greet(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);

    // Unknown and unsupported options are refused, and haggling goes on.
    assert_eq!(c.haggle(999, b"whatever")[0].0, REP_ERR_UNSUP);
    assert_eq!(c.haggle(OPT_EXTENDED_HEADERS, &[])[0].0, REP_ERR_UNSUP);
    assert_eq!(c.haggle(OPT_STARTTLS, &[])[0].0, REP_ERR_POLICY);
    // Too large for memory but small enough to skip: read past, answered TOO_BIG.
    assert_eq!(c.haggle(999, &vec![7u8; 200 * 1024])[0].0, REP_ERR_TOO_BIG);

    // LIST: the export, with its description, then ACK; data is not allowed.
    let r = c.haggle(OPT_LIST, &[]);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].0, REP_SERVER);
    assert_eq!(&r[0].1[..8], &[0, 0, 0, 4, b'd', b'i', b's', b'k']);
    assert_eq!(&r[0].1[8..], b"vmkeep test disk");
    assert_eq!(c.haggle(OPT_LIST, b"x")[0].0, REP_ERR_INVALID);

    // Meta contexts: SET needs structured replies first; LIST does not.
    let q = encode_meta_context_request(NAME, &["base:allocation"]);
    assert_eq!(c.haggle(OPT_SET_META_CONTEXT, &q)[0].0, REP_ERR_INVALID);
    let r = c.haggle(
        OPT_LIST_META_CONTEXT,
        &encode_meta_context_request(NAME, &["base:"]),
    );
    assert_eq!(
        r[0],
        (
            REP_META_CONTEXT,
            [&[0u8; 4][..], b"base:allocation"].concat()
        )
    );
    assert_eq!(r[1].0, REP_ACK);
    let other = encode_meta_context_request(NAME, &["qemu:dirty-bitmap:x"]);
    assert_eq!(
        c.haggle(OPT_LIST_META_CONTEXT, &other),
        vec![(REP_ACK, vec![])]
    );
    let wrong = encode_meta_context_request("other", &["base:allocation"]);
    assert_eq!(
        c.haggle(OPT_LIST_META_CONTEXT, &wrong)[0].0,
        REP_ERR_UNKNOWN
    );
    // A query count far larger than the data is malformed, not an allocation.
    let mut lying = encode_meta_context_request(NAME, &[]);
    lying[8..12].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    assert_eq!(
        c.haggle(OPT_LIST_META_CONTEXT, &lying)[0].0,
        REP_ERR_INVALID
    );

    assert_eq!(c.haggle(OPT_STRUCTURED_REPLY, &[])[0].0, REP_ACK);
    assert_eq!(c.haggle(OPT_STRUCTURED_REPLY, &[])[0].0, REP_ERR_INVALID);
    let r = c.haggle(OPT_SET_META_CONTEXT, &q);
    assert_eq!(r[0].0, REP_META_CONTEXT);
    assert_eq!(&r[0].1[4..], b"base:allocation");

    // INFO: unknown export, then the real one with name and description.
    assert_eq!(
        c.haggle(OPT_INFO, &encode_go_request("other"))[0].0,
        REP_ERR_UNKNOWN
    );
    assert_eq!(c.haggle(OPT_INFO, b"\x00\x00")[0].0, REP_ERR_INVALID);
    let mut info = (NAME.len() as u32).to_be_bytes().to_vec();
    info.extend_from_slice(NAME.as_bytes());
    info.extend_from_slice(&[0, 2, 0, INFO_NAME as u8, 0, INFO_DESCRIPTION as u8]);
    let r = c.haggle(OPT_INFO, &info);
    let infos: Vec<Info> = r[..r.len() - 1]
        .iter()
        .map(|x| parse_info(&x.1).unwrap())
        .collect();
    let size = disk.data().len() as u64;
    let flags = TFLAG_HAS_FLAGS
        | TFLAG_READ_ONLY
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_DF
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE;
    assert!(infos.contains(&Info::Export { size, flags }), "{infos:?}");
    assert!(infos.contains(&Info::Name(NAME.into())));
    assert!(infos.contains(&Info::Description("vmkeep test disk".into())));

    // Then GO, and the connection serves.
    c.negotiate(false, false);
    check_client(c, &disk);
}

#[test]
fn export_name_enters_transmission() {
    let (srv, disk) = served();
    for no_zeroes in [false, true] {
        let mut c = Raw::connect(&srv.sock);
        c.greet(CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 });
        c.option(OPT_EXPORT_NAME, NAME.as_bytes());
        let r = c.recv(if no_zeroes { 10 } else { 134 });
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), disk.size());
        assert!(r[10..].iter().all(|b| *b == 0));
        // Simple replies: the data follows the reply header.
        c.request(0, CMD_READ, 1, 1000, 5000);
        assert_eq!(c.simple(), (0, 1));
        assert_eq!(c.recv(5000), &disk.data()[1000..6000]);
    }
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let (srv, disk) = served();
    let size = disk.size();
    let mut c = Raw::start(&srv.sock, true, true);
    let cases: [(u16, u16, u64, u32, u32); 9] = [
        (0, CMD_READ, 0, 0, EINVAL),                      // zero length
        (0, CMD_READ, size - 10, 11, EINVAL),             // past the end
        (0, CMD_READ, u64::MAX - 10, 100, EINVAL),        // offset overflow
        (0, CMD_READ, 0, 32 * MIB as u32 + 1, EOVERFLOW), // over max_request
        (0, CMD_BLOCK_STATUS, size, 1, EINVAL),           // past the end
        (0, CMD_TRIM, 0, 4096, EPERM),
        (0, CMD_WRITE_ZEROES, 0, 4096, EPERM),
        (0, 99, 0, 4096, EINVAL),           // unknown command
        (0x100, CMD_READ, 0, 4096, EINVAL), // unknown flag
    ];
    for (i, (flags, cmd, off, len, errno)) in cases.into_iter().enumerate() {
        let cookie = 100 + i as u64;
        c.request(flags, cmd, cookie, off, len);
        assert_eq!(c.error(cookie), errno, "case {i}");
    }
    // A write: its payload is read past, the answer is EPERM, and the stream stays framed.
    c.request(0, CMD_WRITE, 7, 0, 5000);
    c.send(&[0xee; 5000]);
    assert_eq!(c.error(7), EPERM);
    // Unaligned reads return exactly the right bytes.
    for (off, len) in [(1, 1), (12_345, 70_001), (BLOCK - 3, 2 * BLOCK as u32 + 7)] {
        let got = c.read(8, off, len).unwrap();
        assert!(got == disk.data()[off as usize..off as usize + len as usize]);
    }
    // DF: one data chunk even across holes.
    c.request(CMD_FLAG_DF, CMD_READ, 9, 0, 4 * BLOCK as u32);
    let r = c.reply_chunks(9);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].chunk_type, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(&r[0].payload[8..], &disk.data()[..4 * BLOCK as usize]);
    // REQ_ONE: one descriptor.
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 10, 0, 8 * BLOCK as u32);
    let r = c.reply_chunks(10);
    assert_eq!(r[0].payload.len(), 4 + 8);
    // FLUSH and CACHE succeed; CACHE reads the range (warming the disk's cache).
    c.request(0, CMD_FLUSH, 11, 0, 0);
    assert_eq!(c.simple(), (0, 11));
    let before = disk.reads();
    c.request(0, CMD_CACHE, 12, 0, 3 * MIB as u32);
    assert_eq!(c.simple(), (0, 12));
    assert!(disk.reads() > before);
    check_client(c, &disk);

    // A write larger than the request limit cannot be skipped safely: closed.
    let mut c = Raw::start(&srv.sock, true, true);
    c.request(0, CMD_WRITE, 1, 0, 64 * MIB as u32);
    assert!(c.closed());
    // A bad request magic: closed.
    let mut c = Raw::start(&srv.sock, true, true);
    c.send(&[0x11; 28]);
    assert!(c.closed());
    assert_serving(&srv.sock, &disk);
}

#[test]
fn block_status_needs_negotiation() {
    let (srv, disk) = served();
    // Structured replies but no meta context: an EINVAL error chunk.
    let mut c = Raw::start(&srv.sock, true, false);
    c.request(0, CMD_BLOCK_STATUS, 1, 0, 4096);
    assert_eq!(c.error(1), EINVAL);
    // Simple replies: a simple EINVAL.
    let mut c = Raw::start(&srv.sock, false, false);
    c.request(0, CMD_BLOCK_STATUS, 2, 0, 4096);
    assert_eq!(c.simple(), (EINVAL, 2));
    assert_serving(&srv.sock, &disk);
}

#[test]
fn read_errors_never_send_wrong_data() {
    let (srv, disk) = served();
    disk.fail(Some(4 * BLOCK..4 * BLOCK + 1));
    // Simple replies: EIO and no payload; the next request is answered normally.
    let mut c = Raw::start(&srv.sock, false, false);
    c.request(0, CMD_READ, 1, 0, 8 * BLOCK as u32);
    assert_eq!(c.simple(), (EIO, 1));
    c.request(0, CMD_READ, 2, 0, 100);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.recv(100), &disk.data()[..100]);
    // Structured: one ERROR_OFFSET chunk naming where, with a message.
    let mut c = Raw::start(&srv.sock, true, false);
    c.request(0, CMD_READ, 3, 3 * BLOCK, 4 * BLOCK as u32);
    let r = c.reply_chunks(3);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].chunk_type, REPLY_TYPE_ERROR_OFFSET);
    let p = &r[0].payload;
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), EIO);
    let msg_len = u16::from_be_bytes([p[4], p[5]]) as usize;
    assert!(msg_len > 0);
    let at = u64::from_be_bytes(p[6 + msg_len..].try_into().unwrap());
    assert!((3 * BLOCK..7 * BLOCK).contains(&at));
    assert_eq!(
        c.read(4, 0, 4 * BLOCK as u32).unwrap(),
        &disk.data()[..4 * BLOCK as usize]
    );
    disk.fail(None);
    assert_serving(&srv.sock, &disk);
}

#[test]
fn pipelined_requests_get_whole_replies() {
    let (srv, disk) = served();
    let mut c = Raw::start(&srv.sock, true, true);
    let reqs: Vec<(u64, u64, u32)> = (0..32u64)
        .map(|i| {
            (
                i,
                (i * 37 % 500) * BLOCK + i * 3,
                (1 + i % 5) as u32 * 100_000,
            )
        })
        .collect();
    for (cookie, off, len) in &reqs {
        c.request(0, CMD_READ, *cookie, *off, *len);
    }
    // Replies come in any order, but each one's chunks are contiguous.
    let mut seen = std::collections::HashSet::new();
    for _ in &reqs {
        let first = c.chunk();
        let (cookie, off, len) = reqs[first.cookie as usize];
        let mut chunks = vec![first];
        while chunks.last().unwrap().flags & REPLY_FLAG_DONE == 0 {
            let next = c.chunk();
            assert_eq!(next.cookie, cookie, "replies interleaved");
            chunks.push(next);
        }
        let mut data = vec![0u8; len as usize];
        for ch in chunks
            .iter()
            .filter(|ch| ch.chunk_type == REPLY_TYPE_OFFSET_DATA)
        {
            let rel = (u64::from_be_bytes(ch.payload[..8].try_into().unwrap()) - off) as usize;
            data[rel..rel + ch.payload.len() - 8].copy_from_slice(&ch.payload[8..]);
        }
        assert!(data == disk.data()[off as usize..off as usize + len as usize]);
        assert!(seen.insert(cookie));
    }
    check_client(c, &disk);
}

#[test]
fn client_gone_mid_reply() {
    let (srv, disk) = served();
    for structured in [false, true] {
        let mut c = Raw::start(&srv.sock, structured, false);
        // Two 32 MiB reads, then gone before reading anything.
        c.request(0, CMD_READ, 1, 0, 32 * MIB as u32);
        c.request(0, CMD_READ, 2, MIB, 32 * MIB as u32);
        drop(c);
        assert_serving(&srv.sock, &disk);
    }
    // And one that reads half a reply, then goes.
    let mut c = Raw::start(&srv.sock, false, false);
    c.request(0, CMD_READ, 1, 0, 32 * MIB as u32);
    let _ = c.recv(16 + MIB as usize);
    drop(c);
    assert_serving(&srv.sock, &disk);
}
