//! The op list of a memory stream: how its literal bytes and its image pages interleave to give
//! back the original stream. FORMAT.md §11.1.
//!
//! ```text
//! ops = "VMKM" || version u8 (1) || op*
//! op  = 0x01 varint n                   copy the next n (>= 1) bytes of the literal stream
//!     | 0x02 varint block varint page   copy page `page` of page image `block`
//!     | 0x03                            copy the page after the previous page op's, same image
//! varint = unsigned LEB128, at most 10 bytes, value < 2^64
//! ```
use crate::error::{Error, Result};

pub const OPS_MAGIC: [u8; 4] = *b"VMKM";
pub const OPS_VERSION: u8 = 1;
const OP_LITERAL: u8 = 0x01;
const OP_PAGE: u8 = 0x02;
const OP_NEXT_PAGE: u8 = 0x03;
const HEADER: usize = 5;
/// Longest op: tag + two 10-byte varints.
const MAX_OP: usize = 21;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Copy this many literal bytes.
    Literal(u64),
    /// Copy one page of a page image.
    Page { block: u32, page: u64 },
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Ok(None) when `b` holds only part of a varint.
fn get_varint(b: &[u8]) -> Result<Option<(u64, usize)>> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        let bits = (byte & 0x7f) as u64;
        if i == 9 && bits > 1 {
            return Err(corrupt("a varint exceeds 64 bits".into()));
        }
        v |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((v, i + 1)));
        }
    }
    if b.len() >= 10 {
        return Err(corrupt("a varint is longer than 10 bytes".into()));
    }
    Ok(None)
}

fn corrupt(reason: String) -> Error {
    Error::Corrupt {
        kind: "memory ops",
        reason,
    }
}

/// Writes ops; [`OpsWriter::take`] hands out the bytes written so far.
pub struct OpsWriter {
    out: Vec<u8>,
    last: Option<(u32, u64)>,
    written: u64,
}

impl Default for OpsWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl OpsWriter {
    pub fn new() -> OpsWriter {
        let mut out = Vec::with_capacity(1 << 16);
        out.extend_from_slice(&OPS_MAGIC);
        out.push(OPS_VERSION);
        OpsWriter {
            out,
            last: None,
            written: 0,
        }
    }

    /// `n` literal bytes (n >= 1).
    pub fn literal(&mut self, n: u64) {
        debug_assert!(n > 0);
        self.out.push(OP_LITERAL);
        put_varint(&mut self.out, n);
    }

    pub fn page(&mut self, block: u32, page: u64) {
        if self.last == Some((block, page.wrapping_sub(1))) && page > 0 {
            self.out.push(OP_NEXT_PAGE);
        } else {
            self.out.push(OP_PAGE);
            put_varint(&mut self.out, block as u64);
            put_varint(&mut self.out, page);
        }
        self.last = Some((block, page));
    }

    /// Bytes of ops written since the last call.
    pub fn take(&mut self) -> Vec<u8> {
        self.written += self.out.len() as u64;
        std::mem::take(&mut self.out)
    }

    pub fn pending_len(&self) -> usize {
        self.out.len()
    }
}

/// Decodes ops from bytes pushed in pieces (the chunks of the op stream).
#[derive(Default)]
pub struct OpsDecoder {
    buf: Vec<u8>,
    pos: usize,
    header: bool,
    last: Option<(u32, u64)>,
}

impl OpsDecoder {
    pub fn new() -> OpsDecoder {
        OpsDecoder::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.buf.extend_from_slice(bytes);
    }

    /// The next op, or None until more bytes are pushed.
    pub fn next_op(&mut self) -> Result<Option<Op>> {
        if !self.header {
            if self.buf.len() < HEADER {
                return Ok(None);
            }
            if self.buf[..4] != OPS_MAGIC {
                return Err(Error::BadMagic { kind: "memory ops" });
            }
            if self.buf[4] != OPS_VERSION {
                return Err(Error::UnsupportedVersion {
                    kind: "memory ops",
                    version: self.buf[4] as u32,
                    supported: OPS_VERSION as u32,
                });
            }
            self.header = true;
            self.pos = HEADER;
        }
        let b = &self.buf[self.pos..];
        let Some(&tag) = b.first() else {
            return Ok(None);
        };
        let (op, len) = match tag {
            OP_LITERAL => match get_varint(&b[1..])? {
                None => return Ok(None),
                Some((0, _)) => return Err(corrupt("an empty literal".into())),
                Some((n, l)) => (Op::Literal(n), 1 + l),
            },
            OP_PAGE => {
                let Some((block, l1)) = get_varint(&b[1..])? else {
                    return Ok(None);
                };
                let Some((page, l2)) = get_varint(&b[1 + l1..])? else {
                    return Ok(None);
                };
                let block = u32::try_from(block)
                    .map_err(|_| corrupt(format!("page image {block} out of range")))?;
                (Op::Page { block, page }, 1 + l1 + l2)
            }
            OP_NEXT_PAGE => match self.last {
                Some((block, page)) if page < u64::MAX => (
                    Op::Page {
                        block,
                        page: page + 1,
                    },
                    1,
                ),
                _ => return Err(corrupt("a next-page op without a page before it".into())),
            },
            other => return Err(corrupt(format!("unknown op {other:#04x}"))),
        };
        debug_assert!(len <= MAX_OP);
        if let Op::Page { block, page } = op {
            self.last = Some((block, page));
        }
        self.pos += len;
        Ok(Some(op))
    }

    /// After the last push and every op taken: the ops ended on an op boundary.
    pub fn finish(&self) -> Result<()> {
        if !self.header {
            return Err(corrupt("no header".into()));
        }
        if self.pos != self.buf.len() {
            return Err(corrupt(format!(
                "{} bytes of a cut op at the end",
                self.buf.len() - self.pos
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(bytes: &[u8], piece: usize) -> Result<Vec<Op>> {
        let mut d = OpsDecoder::new();
        let mut out = Vec::new();
        for p in bytes.chunks(piece.max(1)) {
            d.push(p);
            while let Some(op) = d.next_op()? {
                out.push(op);
            }
        }
        if bytes.is_empty() {
            d.push(&[]);
        }
        d.finish()?;
        Ok(out)
    }

    fn encode(ops: &[Op]) -> Vec<u8> {
        let mut w = OpsWriter::new();
        for op in ops {
            match *op {
                Op::Literal(n) => w.literal(n),
                Op::Page { block, page } => w.page(block, page),
            }
        }
        w.take()
    }

    #[test]
    fn consecutive_pages_take_one_byte() {
        let ops = [
            Op::Literal(8),
            Op::Page { block: 0, page: 5 },
            Op::Literal(8),
            Op::Page { block: 0, page: 6 },
            Op::Page { block: 1, page: 7 },
            Op::Page { block: 1, page: 8 },
        ];
        let bytes = encode(&ops);
        assert_eq!(
            bytes,
            [&b"VMKM\x01"[..], &[1, 8, 2, 0, 5, 1, 8, 3, 2, 1, 7, 3]].concat()
        );
        for piece in [1, 2, 3, 100] {
            assert_eq!(decode_all(&bytes, piece).unwrap(), ops);
        }
    }

    #[test]
    fn malformed_ops_are_errors() {
        let bad: &[&[u8]] = &[
            b"",
            b"VMK",
            b"XMKM\x01",
            b"VMKM\x02",
            b"VMKM\x01\x03",
            b"VMKM\x01\x01\x00",
            b"VMKM\x01\x01",
            b"VMKM\x01\x02\x00",
            b"VMKM\x01\x04",
            b"VMKM\x01\x02\x80\x80\x80\x80\x80\x01\x00",
            b"VMKM\x01\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\x02",
            b"VMKM\x01\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
        ];
        for b in bad {
            assert!(decode_all(b, 1).is_err(), "{b:?}");
            assert!(decode_all(b, 64).is_err(), "{b:?}");
        }
        assert_eq!(
            decode_all(b"VMKM\x01\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 3).unwrap(),
            [Op::Literal(u64::MAX)]
        );
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..u64::MAX).prop_map(Op::Literal),
            (0u32..4, 0u64..10).prop_map(|(block, page)| Op::Page { block, page }),
            (any::<u32>(), any::<u64>()).prop_map(|(block, page)| Op::Page { block, page }),
        ]
    }

    proptest! {
        #[test]
        fn prop_round_trip(ops in proptest::collection::vec(arb_op(), 0..50), piece in 1usize..40) {
            prop_assert_eq!(decode_all(&encode(&ops), piece).unwrap(), ops);
        }

        #[test]
        fn prop_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), piece in 1usize..40) {
            let _ = decode_all(&[&b"VMKM\x01"[..], &bytes].concat(), piece);
            let _ = decode_all(&bytes, piece);
        }
    }
}
