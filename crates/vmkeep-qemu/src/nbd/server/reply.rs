//! Replies as bytes: option replies, simple replies, structured chunks, and the two replies
//! with content (READ, BLOCK_STATUS) planned from the disk's extents. Every reply is built
//! whole in memory, so it can be written under the connection's write lock in one go.

use std::io;

use tracing::warn;
use vmkeep_io::ServedDisk;

use crate::nbd::proto::{
    EIO, OPT_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR,
    REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};
use crate::nbd::{STATE_HOLE, STATE_ZERO};

/// Zero extents shorter than this are sent as data, so a READ reply has at most about
/// `len / MIN_HOLE` hole chunks (and chunk headers), whatever the disk's extents look like.
pub(super) const MIN_HOLE: u64 = 4096;
/// Most descriptors in one BLOCK_STATUS reply (512 KiB of payload); the client asks again
/// for the rest, as the protocol allows.
pub(super) const MAX_DESCRIPTORS: usize = 64 * 1024;
/// Longest error message sent to a client (the protocol allows 4096).
const MAX_MESSAGE: usize = 256;
/// Length of a simple reply (no payload).
const SIMPLE_LEN: usize = 16;
/// Length of a structured chunk header.
const CHUNK_HEADER_LEN: usize = 20;

/// `magic, option, reply type, length, payload`.
pub(super) fn option_reply(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + payload.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply_type.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A simple reply without payload (success of a command without data, or any error).
pub(super) fn simple_reply(cookie: u64, errno: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(SIMPLE_LEN);
    push_simple_header(&mut v, cookie, errno);
    v
}

fn push_simple_header(v: &mut Vec<u8>, cookie: u64, errno: u32) {
    v.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&errno.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
}

fn push_chunk_header(v: &mut Vec<u8>, flags: u16, chunk_type: u16, cookie: u64, len: usize) {
    v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&chunk_type.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&(len as u32).to_be_bytes());
}

/// `message` cut to [`MAX_MESSAGE`] bytes on a character boundary.
fn short(message: &str) -> &str {
    let mut end = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// The final chunk of a failed request: ERROR, or ERROR_OFFSET when the place is known.
pub(super) fn error_chunk(cookie: u64, errno: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let msg = short(message).as_bytes();
    let (chunk_type, extra) = match offset {
        Some(_) => (REPLY_TYPE_ERROR_OFFSET, 8),
        None => (REPLY_TYPE_ERROR, 0),
    };
    let len = 6 + msg.len() + extra;
    let mut v = Vec::with_capacity(CHUNK_HEADER_LEN + len);
    push_chunk_header(&mut v, REPLY_FLAG_DONE, chunk_type, cookie, len);
    v.extend_from_slice(&errno.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    if let Some(o) = offset {
        v.extend_from_slice(&o.to_be_bytes());
    }
    v
}

/// How replies are framed on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Framing {
    /// NBD_OPT_STRUCTURED_REPLY was negotiated.
    pub(super) structured: bool,
}

impl Framing {
    /// An error reply: a structured ERROR chunk (it carries the message) when negotiated.
    pub(super) fn error(self, cookie: u64, errno: u32, message: &str) -> Vec<u8> {
        if self.structured {
            error_chunk(cookie, errno, message, None)
        } else {
            simple_reply(cookie, errno)
        }
    }
}

/// A piece of a READ reply: bytes to read from the disk, or a hole sent as OFFSET_HOLE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Piece {
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) hole: bool,
}

/// Splits `[offset, offset + len)` into data and hole pieces from the disk's extents; short
/// zero extents count as data (see [`MIN_HOLE`]), adjacent pieces of one kind are merged.
/// The caller checked the range against the disk size.
pub(super) fn plan_read(disk: &dyn ServedDisk, offset: u64, len: u64) -> io::Result<Vec<Piece>> {
    let end = offset + len;
    let mut pieces: Vec<Piece> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let extents = disk.extents(pos, end - pos)?;
        let before = pos;
        for e in extents {
            let l = e.len.min(end - pos);
            if l == 0 {
                break;
            }
            push_piece(&mut pieces, pos, l, e.zero && l >= MIN_HOLE);
            pos += l;
            if pos == end {
                break;
            }
        }
        if pos == before {
            // No progress (an empty or zero-length answer): the rest is sent as data, which
            // is always correct, rather than asking forever.
            push_piece(&mut pieces, pos, end - pos, false);
            pos = end;
        }
    }
    Ok(pieces)
}

fn push_piece(pieces: &mut Vec<Piece>, offset: u64, len: u64, hole: bool) {
    match pieces.last_mut() {
        Some(p) if p.hole == hole => p.len += len,
        _ => pieces.push(Piece { offset, len, hole }),
    }
}

/// The whole reply to a valid READ of `[offset, offset + len)`, `len <= max_request`.
/// A read error gives an EIO error reply and never partial data.
pub(super) fn read(
    disk: &dyn ServedDisk,
    framing: Framing,
    dont_fragment: bool,
    cookie: u64,
    offset: u64,
    len: u32,
) -> Vec<u8> {
    let n = len as usize;
    if !framing.structured {
        let mut v = Vec::with_capacity(SIMPLE_LEN + n);
        push_simple_header(&mut v, cookie, 0);
        v.resize(SIMPLE_LEN + n, 0);
        return match disk.read_at(&mut v[SIMPLE_LEN..], offset) {
            Ok(()) => v,
            Err(e) => {
                warn!(offset, len, error = %e, "NBD read failed");
                simple_reply(cookie, EIO)
            }
        };
    }
    let pieces = if dont_fragment {
        vec![Piece {
            offset,
            len: u64::from(len),
            hole: false,
        }]
    } else {
        match plan_read(disk, offset, u64::from(len)) {
            Ok(p) => p,
            Err(e) => {
                warn!(offset, len, error = %e, "NBD read failed: extents");
                return error_chunk(cookie, EIO, &format!("extents: {e}"), Some(offset));
            }
        }
    };
    let Some(last) = pieces.len().checked_sub(1) else {
        // Cannot happen for a non-empty range; never send a reply that covers nothing.
        return error_chunk(cookie, EIO, "empty read plan", None);
    };
    let total: usize = pieces
        .iter()
        .map(|p| CHUNK_HEADER_LEN + if p.hole { 12 } else { 8 + p.len as usize })
        .sum();
    let mut v = Vec::with_capacity(total);
    for (i, p) in pieces.iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        if p.hole {
            push_chunk_header(&mut v, flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
            v.extend_from_slice(&p.offset.to_be_bytes());
            v.extend_from_slice(&(p.len as u32).to_be_bytes());
            continue;
        }
        let l = p.len as usize;
        push_chunk_header(&mut v, flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + l);
        v.extend_from_slice(&p.offset.to_be_bytes());
        let at = v.len();
        v.resize(at + l, 0);
        if let Err(e) = disk.read_at(&mut v[at..], p.offset) {
            warn!(offset = p.offset, len = p.len, error = %e, "NBD read failed");
            return error_chunk(cookie, EIO, &format!("read: {e}"), Some(p.offset));
        }
    }
    v
}

/// `base:allocation` descriptors `(length, flags)` for `[offset, offset + len)`: at most
/// `limit`, adjacent equal ones merged, at least one. Zero extents are HOLE|ZERO, data 0.
pub(super) fn descriptors(
    disk: &dyn ServedDisk,
    offset: u64,
    len: u32,
    limit: usize,
) -> io::Result<Vec<(u32, u32)>> {
    let end = offset + u64::from(len);
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut pos = offset;
    'ask: while pos < end {
        let extents = disk.extents(pos, end - pos)?;
        let before = pos;
        for e in extents {
            // Below `end - pos`, which is at most `len`, so it fits in u32.
            let l = e.len.min(end - pos) as u32;
            if l == 0 {
                break;
            }
            let flags = if e.zero { STATE_HOLE | STATE_ZERO } else { 0 };
            let full = out.len() == limit;
            match out.last_mut() {
                Some((ll, f)) if *f == flags => *ll += l,
                _ if full => break 'ask,
                _ => out.push((l, flags)),
            }
            pos += u64::from(l);
            if pos == end {
                break;
            }
        }
        if pos == before {
            break;
        }
    }
    if out.is_empty() {
        // The disk said nothing usable: "allocated, contents unknown" is always true.
        out.push((len, 0));
    }
    Ok(out)
}

/// The reply to BLOCK_STATUS: one chunk for the one context.
pub(super) fn block_status(cookie: u64, context: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * descriptors.len();
    let mut v = Vec::with_capacity(CHUNK_HEADER_LEN + len);
    push_chunk_header(
        &mut v,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len,
    );
    v.extend_from_slice(&context.to_be_bytes());
    for (l, f) in descriptors {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
}
