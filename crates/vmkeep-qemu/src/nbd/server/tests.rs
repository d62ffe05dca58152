//! Unit tests of the server's pure parts: option parsing, read planning, block-status
//! descriptors, range checks. The socket-level tests are in `tests/nbd_server*.rs`.

use std::io;
use std::time::Duration;

use vmkeep_io::{ServedDisk, ServedExtent};

use super::options::{answer, parse_info_request, parse_meta_request, transmission_flags, Answer};
use super::options::{Negotiated, BASE_ALLOCATION_ID};
use super::reply::{descriptors, plan_read, Piece, MIN_HOLE};
use super::transmission::{check_range, parse_request, Request};
use super::{preferred_block, uri_escape, Export};
use crate::nbd::proto::*;

/// A disk whose extents follow `layout` (lengths and kinds), `per_call` at a time; with
/// `silent` it answers every extents call with nothing. Never read.
struct Layout {
    layout: Vec<(u64, bool)>,
    per_call: usize,
    silent: bool,
}

impl ServedDisk for Layout {
    fn size(&self) -> u64 {
        self.layout.iter().map(|e| e.0).sum()
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        unreachable!("planning never reads")
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<ServedExtent>> {
        if self.silent {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut start = 0;
        for &(l, zero) in &self.layout {
            let end = start + l;
            if end > offset && start < offset + len && out.len() < self.per_call {
                // Deliberately not clipped to `len`: the server must clip.
                out.push(ServedExtent {
                    len: end - start.max(offset),
                    zero,
                });
            }
            start = end;
        }
        Ok(out)
    }
    fn block_size(&self) -> u32 {
        4096
    }
}

fn export() -> Export {
    Export {
        name: "disk".into(),
        description: None,
        size: 1 << 20,
        preferred_block: 65536,
        max_request: 1 << 20,
        workers: 1,
        handshake_timeout: Duration::from_secs(1),
    }
}

fn meta(export: &str, queries: &[&str]) -> Vec<u8> {
    encode_meta_context_request(export, queries)
}

#[test]
fn info_request_parsing_is_bounded() {
    let mut ok = encode_go_request("disk");
    assert_eq!(
        parse_info_request(&ok),
        Some((&b"disk"[..], vec![INFO_BLOCK_SIZE]))
    );
    ok.push(0);
    assert_eq!(parse_info_request(&ok), None, "trailing byte");
    assert_eq!(
        parse_info_request(&[0, 0, 0, 9, b'a']),
        None,
        "name runs past the data"
    );
    assert_eq!(
        parse_info_request(&[0, 0, 0, 0, 0, 3, 0, 1]),
        None,
        "count says 3, has 1"
    );
    let long = encode_go_request(&"x".repeat(5000));
    assert_eq!(parse_info_request(&long), None, "name over 4096 bytes");
}

#[test]
fn meta_request_parsing_is_bounded() {
    let r = meta("disk", &["base:allocation", "x:y"]);
    let (name, q) = parse_meta_request(&r).unwrap();
    assert_eq!(name, b"disk");
    assert_eq!(q, vec![&b"base:allocation"[..], b"x:y"]);
    let mut lying = meta("disk", &[]);
    lying[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(parse_meta_request(&lying), None);
    let mut trailing = meta("disk", &["a:b"]);
    trailing.push(1);
    assert_eq!(parse_meta_request(&trailing), None);
}

fn replies(a: &Answer) -> Vec<(u32, Vec<u8>)> {
    let (Answer::Reply(b) | Answer::Go(b) | Answer::Abort(b)) = a;
    let mut out = Vec::new();
    let mut rest = &b[..];
    while !rest.is_empty() {
        let h = parse_option_reply_header(
            &rest[..20],
            u32::from_be_bytes(rest[8..12].try_into().unwrap()),
        )
        .unwrap();
        out.push((h.reply_type, rest[20..20 + h.len as usize].to_vec()));
        rest = &rest[20 + h.len as usize..];
    }
    out
}

#[test]
fn meta_contexts() {
    let e = export();
    let mut neg = Negotiated::default();
    // LIST with no query lists everything (id 0); an empty export name is this export.
    let r = replies(&answer(OPT_LIST_META_CONTEXT, &meta("", &[]), &e, &mut neg));
    assert_eq!(
        r[0],
        (
            REP_META_CONTEXT,
            [&[0u8; 4][..], b"base:allocation"].concat()
        )
    );
    assert_eq!(r[1].0, REP_ACK);
    assert!(!neg.base_allocation, "LIST selects nothing");

    neg.structured = true;
    let r = replies(&answer(
        OPT_SET_META_CONTEXT,
        &meta("disk", &["base:allocation"]),
        &e,
        &mut neg,
    ));
    assert_eq!(&r[0].1[..4], &BASE_ALLOCATION_ID.to_be_bytes());
    assert!(neg.base_allocation);
    // SET replaces the selection: a namespace alone selects nothing.
    let r = replies(&answer(
        OPT_SET_META_CONTEXT,
        &meta("disk", &["base:"]),
        &e,
        &mut neg,
    ));
    assert_eq!(r, vec![(REP_ACK, vec![])]);
    assert!(!neg.base_allocation);
}

#[test]
fn go_and_structured_reply() {
    let e = export();
    let mut neg = Negotiated::default();
    let a = answer(OPT_GO, &encode_go_request("disk"), &e, &mut neg);
    assert!(matches!(a, Answer::Go(_)));
    let r = replies(&a);
    assert_eq!(
        parse_info(&r[0].1).unwrap(),
        Info::Export {
            size: 1 << 20,
            flags: transmission_flags(false)
        }
    );
    assert_eq!(
        parse_info(&r[1].1).unwrap(),
        Info::BlockSize(BlockSize {
            minimum: 1,
            preferred: 65536,
            maximum: 1 << 20
        })
    );
    assert_eq!(
        transmission_flags(false) & TFLAG_SEND_DF,
        0,
        "DF needs structured replies"
    );
    assert_ne!(transmission_flags(true) & TFLAG_SEND_DF, 0);
    assert_eq!(
        replies(&answer(OPT_STRUCTURED_REPLY, b"x", &e, &mut neg))[0].0,
        REP_ERR_INVALID
    );
    assert!(!neg.structured);
}

#[test]
fn read_plan_clips_merges_and_keeps_holes_large() {
    let disk = Layout {
        layout: vec![
            (10_000, false),
            (MIN_HOLE - 1, true), // too short to be a hole: sent as data
            (20_000, false),
            (3 * MIN_HOLE, true),
            (5_000, false),
        ],
        per_call: 2,
        silent: false,
    };
    let size = disk.size();
    let p = plan_read(&disk, 100, size - 200).unwrap();
    let hole_at = 10_000 + MIN_HOLE - 1 + 20_000;
    assert_eq!(
        p,
        vec![
            Piece {
                offset: 100,
                len: hole_at - 100,
                hole: false
            },
            Piece {
                offset: hole_at,
                len: 3 * MIN_HOLE,
                hole: true
            },
            Piece {
                offset: hole_at + 3 * MIN_HOLE,
                len: 5_000 - 100,
                hole: false
            },
        ]
    );
    // A disk that answers nothing: all data, no endless asking.
    let silent = Layout {
        silent: true,
        ..disk
    };
    assert_eq!(
        plan_read(&silent, 0, 1000).unwrap(),
        vec![Piece {
            offset: 0,
            len: 1000,
            hole: false
        }]
    );
}

#[test]
fn descriptors_are_bounded() {
    let layout: Vec<(u64, bool)> = (0..100).map(|i| (512, i % 2 == 0)).collect();
    let disk = Layout {
        layout,
        per_call: 7,
        silent: false,
    };
    let all = descriptors(&disk, 0, 100 * 512, 1000).unwrap();
    assert_eq!(all.len(), 100);
    assert_eq!(all[0], (512, 3));
    assert_eq!(all[1], (512, 0));
    assert_eq!(descriptors(&disk, 0, 100 * 512, 10).unwrap().len(), 10);
    assert_eq!(descriptors(&disk, 100, 1000, 1).unwrap(), vec![(412, 3)]);
    let silent = Layout {
        silent: true,
        ..disk
    };
    assert_eq!(descriptors(&silent, 0, 4096, 10).unwrap(), vec![(4096, 0)]);
}

#[test]
fn range_checks() {
    let req = |offset, len| Request {
        flags: 0,
        command: CMD_READ,
        cookie: 1,
        offset,
        len,
    };
    let max = Some((1000, EOVERFLOW));
    assert_eq!(check_range(&req(0, 1000), 5000, max), Ok(()));
    assert_eq!(check_range(&req(0, 0), 5000, max).unwrap_err().0, EINVAL);
    assert_eq!(
        check_range(&req(4001, 1000), 5000, max).unwrap_err().0,
        EINVAL
    );
    assert_eq!(
        check_range(&req(u64::MAX, 2), 5000, max).unwrap_err().0,
        EINVAL
    );
    assert_eq!(
        check_range(&req(0, 1001), 5000, max).unwrap_err().0,
        EOVERFLOW
    );
    assert_eq!(check_range(&req(0, 5000), 5000, None), Ok(()));
}

#[test]
fn request_header() {
    let b = encode_request(4, CMD_READ, 0xabc, 77, 99);
    let r = parse_request(&b).unwrap();
    assert_eq!(
        (r.flags, r.command, r.cookie, r.offset, r.len),
        (4, CMD_READ, 0xabc, 77, 99)
    );
    let mut bad = b;
    bad[0] ^= 1;
    assert_eq!(parse_request(&bad), None);
}

#[test]
fn preferred_block_is_a_sane_power_of_two() {
    assert_eq!(preferred_block(65536, 32 << 20), 65536);
    assert_eq!(preferred_block(0, 32 << 20), 512);
    assert_eq!(preferred_block(3000, 32 << 20), 4096);
    assert_eq!(preferred_block(1 << 31, 65536), 65536);
    assert_eq!(preferred_block(u32::MAX, 100_000), 65536);
}

#[test]
fn uris_escape_names_and_paths() {
    assert_eq!(uri_escape("disk-1_a.b~/x"), "disk-1_a.b~/x");
    assert_eq!(uri_escape("a b?&=%"), "a%20b%3F%26%3D%25");
    assert_eq!(uri_escape("é"), "%C3%A9");
}

proptest::proptest! {
    /// Whatever a client sends as option data, the answer is well-formed option replies
    /// (no panic, no allocation from a length it claims).
    #[test]
    fn any_option_data_gets_well_formed_replies(
        opt in 0u32..16,
        data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        structured: bool,
    ) {
        let e = export();
        let mut neg = Negotiated { structured, base_allocation: false };
        let a = answer(opt, &data, &e, &mut neg);
        let r = replies(&a);
        proptest::prop_assert!(!r.is_empty());
        let (last, _) = r.last().unwrap();
        proptest::prop_assert!(*last == REP_ACK || *last & REP_FLAG_ERROR != 0);
    }

    /// Request headers of any bytes parse or are refused, never panic.
    #[test]
    fn any_request_header(b in proptest::prelude::any::<[u8; 28]>()) {
        let _ = parse_request(&b);
    }
}
