//! Unit and property tests of the pure NBD parsers.

use super::*;
use proptest::prelude::*;

fn read_req(offset: u64, len: u32) -> Request {
    Request {
        kind: RequestKind::Read,
        offset,
        len,
        export_size: 1 << 30,
    }
}

fn status_req(offset: u64, len: u32) -> Request {
    Request {
        kind: RequestKind::BlockStatus,
        offset,
        len,
        export_size: 1 << 20,
    }
}

fn hdr(flags: u16, chunk_type: u16, len: u32) -> ChunkHeader {
    ChunkHeader {
        flags,
        chunk_type,
        cookie: 7,
        len,
    }
}

fn data_payload(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = offset.to_be_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

fn is_protocol(e: &Error) -> bool {
    matches!(e, Error::NbdProtocol { .. })
}

#[test]
fn greeting_ok_and_bad() {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&3u16.to_be_bytes());
    assert_eq!(parse_greeting(&g).unwrap(), 3);
    let mut bad = g.clone();
    bad[0] ^= 1;
    assert!(is_protocol(&parse_greeting(&bad).unwrap_err()));
    let mut old = g.clone();
    old[17] = 0; // not fixed newstyle
    assert!(matches!(
        parse_greeting(&old),
        Err(Error::NbdUnsupported(_))
    ));
    assert!(parse_greeting(&g[..10]).is_err());
}

#[test]
fn option_reply_header_checks() {
    let mut b = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&REP_ACK.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(
        parse_option_reply_header(&b, OPT_GO).unwrap().reply_type,
        REP_ACK
    );
    assert!(parse_option_reply_header(&b, OPT_SET_META_CONTEXT).is_err());
    let mut huge = b.clone();
    huge[16..20].copy_from_slice(&(MAX_OPTION_REPLY + 1).to_be_bytes());
    assert!(parse_option_reply_header(&huge, OPT_GO).is_err());
}

#[test]
fn info_parsing() {
    let mut e = INFO_EXPORT.to_be_bytes().to_vec();
    e.extend_from_slice(&4096u64.to_be_bytes());
    e.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_CAN_MULTI_CONN).to_be_bytes());
    assert_eq!(
        parse_info(&e).unwrap(),
        Info::Export {
            size: 4096,
            flags: TFLAG_HAS_FLAGS | TFLAG_CAN_MULTI_CONN
        }
    );
    assert!(parse_info(&e[..11]).is_err());
    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [1u32, 4096, 33554432] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    assert!(matches!(parse_info(&bs).unwrap(), Info::BlockSize(_)));
    let mut bad = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [3u32, 4096, 33554432] {
        bad.extend_from_slice(&v.to_be_bytes());
    }
    assert!(parse_info(&bad).is_err());
}

#[test]
fn read_assembly_data_and_hole() {
    let req = read_req(100, 8);
    let p1 = data_payload(100, b"abcd");
    let h1 = hdr(0, REPLY_TYPE_OFFSET_DATA, p1.len() as u32);
    let mut p2 = 104u64.to_be_bytes().to_vec();
    p2.extend_from_slice(&4u32.to_be_bytes());
    let h2 = hdr(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 12);
    let mut a = ReadAssembler::new(100, 8);
    a.apply(&parse_chunk(&h2, &p2, &req, &[]).unwrap()).unwrap();
    a.apply(&parse_chunk(&h1, &p1, &req, &[]).unwrap()).unwrap();
    let r = a.finish().unwrap().unwrap();
    assert_eq!(r.data, b"abcd\0\0\0\0");
    assert_eq!(r.holes, vec![(104, 4)]);
}

#[test]
fn read_assembly_rejects_overlap_and_gaps() {
    let req = read_req(0, 8);
    let p = data_payload(0, b"abcdef");
    let h = hdr(0, REPLY_TYPE_OFFSET_DATA, p.len() as u32);
    let mut a = ReadAssembler::new(0, 8);
    a.apply(&parse_chunk(&h, &p, &req, &[]).unwrap()).unwrap();
    let p2 = data_payload(4, b"xyzw");
    let h2 = hdr(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, p2.len() as u32);
    assert!(is_protocol(
        &a.apply(&parse_chunk(&h2, &p2, &req, &[]).unwrap())
            .unwrap_err()
    ));

    let mut gap = ReadAssembler::new(0, 8);
    gap.apply(&parse_chunk(&h, &p, &req, &[]).unwrap()).unwrap();
    assert!(is_protocol(&gap.finish().unwrap_err()));
}

#[test]
fn data_outside_request_rejected() {
    let req = read_req(0, 8);
    let p = data_payload(6, b"abcd"); // 6..10 > 8
    let h = hdr(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, p.len() as u32);
    assert!(is_protocol(&parse_chunk(&h, &p, &req, &[]).unwrap_err()));
    let p = data_payload(u64::MAX - 1, b"abcd"); // overflow
    assert!(is_protocol(&parse_chunk(&h, &p, &req, &[]).unwrap_err()));
}

#[test]
fn oversized_and_illegal_chunks_rejected_before_allocation() {
    let req = read_req(0, 4096);
    assert!(max_chunk_payload(&hdr(0, REPLY_TYPE_OFFSET_DATA, 4096 + 9), &req).is_err());
    assert!(max_chunk_payload(&hdr(0, REPLY_TYPE_OFFSET_DATA, u32::MAX), &req).is_err());
    assert!(max_chunk_payload(&hdr(0, REPLY_TYPE_BLOCK_STATUS, 12), &req).is_err());
    assert!(max_chunk_payload(&hdr(0, 77, 0), &req).is_err());
    assert!(max_chunk_payload(&hdr(0, REPLY_TYPE_ERROR, 6 + 5000), &req).is_err());
    let st = status_req(0, 4096);
    assert!(max_chunk_payload(&hdr(0, REPLY_TYPE_OFFSET_DATA, 10), &st).is_err());
    assert!(parse_chunk_header(&[0, 4, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]).is_err());
}

#[test]
fn block_status_checks() {
    let req = status_req(0, 8192);
    let mut p = 1u32.to_be_bytes().to_vec();
    for (l, f) in [(4096u32, 0u32), (4096, 3)] {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    let h = hdr(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, p.len() as u32);
    match parse_chunk(&h, &p, &req, &[1]).unwrap() {
        Chunk::BlockStatus { context, extents } => {
            assert_eq!(context, 1);
            assert_eq!(extents.len(), 2);
        }
        c => panic!("unexpected {c:?}"),
    }
    // Context not negotiated.
    assert!(is_protocol(&parse_chunk(&h, &p, &req, &[2]).unwrap_err()));
    // Zero-length extent.
    let mut z = 1u32.to_be_bytes().to_vec();
    z.extend_from_slice(&[0; 8]);
    let hz = hdr(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 12);
    assert!(is_protocol(&parse_chunk(&hz, &z, &req, &[1]).unwrap_err()));
    // Past the end of the export.
    let mut big = 1u32.to_be_bytes().to_vec();
    big.extend_from_slice(&u32::MAX.to_be_bytes());
    big.extend_from_slice(&0u32.to_be_bytes());
    assert!(is_protocol(
        &parse_chunk(&hz, &big, &req, &[1]).unwrap_err()
    ));
    // Same context twice.
    let mut a = BlockStatusAssembler::new();
    a.apply(parse_chunk(&h, &p, &req, &[1]).unwrap()).unwrap();
    assert!(a.apply(parse_chunk(&h, &p, &req, &[1]).unwrap()).is_err());
}

#[test]
fn error_chunks() {
    let req = read_req(0, 4096);
    let mut p = 5u32.to_be_bytes().to_vec();
    p.extend_from_slice(&3u16.to_be_bytes());
    p.extend_from_slice(b"bad");
    let h = hdr(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, p.len() as u32);
    let c = parse_chunk(&h, &p, &req, &[]).unwrap();
    let mut a = ReadAssembler::new(0, 4096);
    a.apply(&c).unwrap();
    let e = a.finish().unwrap().unwrap_err();
    assert_eq!((e.errno, e.message.as_str()), (5, "bad"));
    // Message length lies.
    let mut lie = p.clone();
    lie[4..6].copy_from_slice(&100u16.to_be_bytes());
    assert!(is_protocol(&parse_chunk(&h, &lie, &req, &[]).unwrap_err()));
    // errno 0.
    let mut zero = p.clone();
    zero[0..4].copy_from_slice(&0u32.to_be_bytes());
    assert!(is_protocol(&parse_chunk(&h, &zero, &req, &[]).unwrap_err()));
    // Error offset out of range.
    let mut off = p.clone();
    off.extend_from_slice(&9999u64.to_be_bytes());
    let ho = hdr(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, off.len() as u32);
    assert!(is_protocol(&parse_chunk(&ho, &off, &req, &[]).unwrap_err()));
}

#[test]
fn none_requires_done() {
    let req = read_req(0, 1);
    assert!(parse_chunk(&hdr(0, REPLY_TYPE_NONE, 0), &[], &req, &[]).is_err());
    assert_eq!(
        parse_chunk(&hdr(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0), &[], &req, &[]).unwrap(),
        Chunk::None
    );
}

#[test]
fn write_replies_carry_no_data() {
    let req = Request {
        kind: RequestKind::Write,
        offset: 4096,
        len: 4096,
        export_size: 1 << 20,
    };
    assert_eq!(req.command_name(), "NBD_CMD_WRITE");
    assert_eq!(req.kind.command(), CMD_WRITE);
    assert!(RequestKind::Write.simple_success_allowed());
    assert!(RequestKind::Flush.simple_success_allowed());
    assert!(!RequestKind::Read.simple_success_allowed());
    // Data, hole and status chunks are illegal for a write, whatever their length.
    for t in [
        REPLY_TYPE_OFFSET_DATA,
        REPLY_TYPE_OFFSET_HOLE,
        REPLY_TYPE_BLOCK_STATUS,
    ] {
        assert!(is_protocol(
            &max_chunk_payload(&hdr(REPLY_FLAG_DONE, t, 12), &req).unwrap_err()
        ));
    }
    // NONE: success.
    let mut a = AckAssembler::new();
    a.apply(parse_chunk(&hdr(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0), &[], &req, &[]).unwrap())
        .unwrap();
    assert_eq!(a.finish().unwrap(), Ok(()));
    // ERROR (with an offset inside the request): the server's error.
    let mut p = 28u32.to_be_bytes().to_vec();
    p.extend_from_slice(&6u16.to_be_bytes());
    p.extend_from_slice(b"no spc");
    p.extend_from_slice(&5000u64.to_be_bytes());
    let h = hdr(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, p.len() as u32);
    let mut a = AckAssembler::new();
    a.apply(parse_chunk(&h, &p, &req, &[]).unwrap()).unwrap();
    let e = a.finish().unwrap().unwrap_err();
    assert_eq!((e.errno, e.offset), (28, Some(5000)));
    // A data chunk handed to the assembler directly is a protocol violation.
    let mut a = AckAssembler::new();
    assert!(is_protocol(
        &a.apply(Chunk::Data {
            offset: 4096,
            data: b"x"
        })
        .unwrap_err()
    ));
}

#[test]
fn clip() {
    let e = vec![
        Extent {
            length: 10,
            flags: 0,
        },
        Extent {
            length: 10,
            flags: 1,
        },
    ];
    assert_eq!(
        clip_extents(e, 15),
        vec![
            Extent {
                length: 10,
                flags: 0
            },
            Extent {
                length: 5,
                flags: 1
            }
        ]
    );
}

fn arb_request() -> impl Strategy<Value = Request> {
    (0u8..4, 0u64..(1 << 40), 1u32..(1 << 16), any::<u64>()).prop_map(
        |(kind, offset, len, export_size)| Request {
            kind: match kind {
                0 => RequestKind::Read,
                1 => RequestKind::BlockStatus,
                2 => RequestKind::Write,
                _ => RequestKind::Flush,
            },
            offset,
            len,
            export_size,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    /// No parser panics on arbitrary bytes.
    #[test]
    fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64), opt in any::<u32>()) {
        let _ = parse_greeting(&b);
        let _ = parse_option_reply_header(&b, opt);
        let _ = parse_info(&b);
        let _ = parse_meta_context(&b);
        let _ = parse_option_error(&b);
        let _ = parse_reply_magic(&b);
        let _ = parse_simple_reply(&b);
        let _ = parse_chunk_header(&b);
    }

    /// Arbitrary chunk headers + payloads for arbitrary requests: parse and assemble
    /// without panicking; whatever an assembler accepts stays inside the request.
    #[test]
    fn chunks_never_panic(
        req in arb_request(),
        chunks in proptest::collection::vec(
            (any::<u16>(), any::<u16>(), proptest::collection::vec(any::<u8>(), 0..96), any::<bool>()),
            0..8),
        ctx in proptest::collection::vec(any::<u32>(), 0..3),
    ) {
        let mut ra = ReadAssembler::new(req.offset, req.len);
        let mut sa = BlockStatusAssembler::new();
        let mut aa = AckAssembler::new();
        for (flags, t, payload, realistic_offset) in chunks {
            let mut payload = payload;
            if realistic_offset && payload.len() >= 8 {
                // Steer some chunks into the request's range so the assemblers get exercised.
                let o = req.offset + u64::from(payload[0]) % u64::from(req.len);
                payload[..8].copy_from_slice(&o.to_be_bytes());
            }
            let h = ChunkHeader { flags, chunk_type: t, cookie: 1, len: payload.len() as u32 };
            if max_chunk_payload(&h, &req).is_err() { continue; }
            if let Ok(c) = parse_chunk(&h, &payload, &req, &ctx) {
                match req.kind {
                    RequestKind::Read => { let _ = ra.apply(&c); }
                    RequestKind::BlockStatus => { let _ = sa.apply(c); }
                    RequestKind::Write | RequestKind::Flush => {
                        // Only NONE and ERROR chunks get past the payload bound for writes.
                        let no_data = matches!(c, Chunk::None | Chunk::Error { .. });
                        prop_assert!(no_data, "write reply chunk {:?}", c);
                        let _ = aa.apply(c);
                    }
                }
            }
        }
        if let Ok(Ok(r)) = ra.finish() {
            prop_assert_eq!(r.data.len(), req.len as usize);
        }
        let _ = sa.finish();
        let _ = aa.finish();
    }

    /// A correct split of a read into data and hole chunks always reassembles exactly.
    #[test]
    fn read_roundtrip(data in proptest::collection::vec(any::<u8>(), 1..2000),
                      cuts in proptest::collection::vec((any::<u16>(), any::<bool>()), 0..10)) {
        let offset = 4096u64;
        let req = read_req(offset, data.len() as u32);
        let mut points: Vec<usize> = cuts.iter().map(|(c, _)| *c as usize % data.len()).collect();
        points.push(0);
        points.push(data.len());
        points.sort_unstable();
        points.dedup();
        let mut expected = data.clone();
        let mut a = ReadAssembler::new(offset, data.len() as u32);
        for (i, w) in points.windows(2).enumerate() {
            let (s, e) = (w[0], w[1]);
            let hole = cuts.get(i).is_some_and(|c| c.1);
            let (t, p) = if hole {
                expected[s..e].fill(0);
                let mut p = (offset + s as u64).to_be_bytes().to_vec();
                p.extend_from_slice(&((e - s) as u32).to_be_bytes());
                (REPLY_TYPE_OFFSET_HOLE, p)
            } else {
                (REPLY_TYPE_OFFSET_DATA, data_payload(offset + s as u64, &data[s..e]))
            };
            let h = hdr(0, t, p.len() as u32);
            a.apply(&parse_chunk(&h, &p, &req, &[]).unwrap()).unwrap();
        }
        let r = a.finish().unwrap().unwrap();
        prop_assert_eq!(r.data, expected);
    }
}
