//! NBD wire format: constants, request encoding and pure, bounded parsers for everything the
//! server sends. No I/O here, so every function can be fed arbitrary bytes (see the proptests).
//!
//! Reference: the NBD protocol document (`doc/proto.md` in the nbd project). We implement the
//! fixed-newstyle handshake and structured replies (no extended headers, no TLS).
//!
//! Rules enforced on replies:
//! - magic numbers and option echoes match;
//! - every length is bounded *before* anything is allocated for it ([`max_chunk_payload`]);
//! - chunk types are known and legal for the request they answer;
//! - data/hole chunks lie inside the requested range, do not overlap, and on success cover it;
//! - block-status chunks name a negotiated context, appear at most once per context, have
//!   non-zero extent lengths, and do not run past the end of the export.
//!
//! The constants also serve the NBD server (`super::server`), which encodes its own replies.

use crate::error::{Error, Result};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// NBD_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Error values in replies (NBD's own fixed numbering, see `crate::error::errno_name`).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Largest option-reply payload we accept during the handshake.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Longest error message the spec allows in an ERROR chunk.
pub const MAX_ERROR_MESSAGE: u16 = 4096;
/// Largest read request this client sends (one request; larger reads are split).
pub const MAX_READ_REQUEST: u32 = 32 * 1024 * 1024;
/// Largest write request this client sends (one request; larger writes are split).
pub const MAX_WRITE_REQUEST: u32 = 32 * 1024 * 1024;
/// Largest number of extents accepted in one BLOCK_STATUS chunk.
pub const MAX_EXTENTS_PER_CHUNK: u32 = 1 << 20;
/// Length of a structured reply chunk header, after the 4-byte magic.
pub const CHUNK_HEADER_REST: usize = 16;
/// Length of a simple reply, after the 4-byte magic.
pub const SIMPLE_REPLY_REST: usize = 12;

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<()> {
    if b.len() < n {
        return Err(Error::nbd(what, format!("need {n} bytes, got {}", b.len())));
    }
    Ok(())
}

/// Human name of an option, for errors and logs.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "NBD_OPT_(unknown)",
    }
}

/// Human name of an option reply type (errors have bit 31 set).
pub fn reply_type_name(t: u32) -> String {
    match t {
        REP_ACK => "NBD_REP_ACK".into(),
        REP_SERVER => "NBD_REP_SERVER".into(),
        REP_INFO => "NBD_REP_INFO".into(),
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT".into(),
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP".into(),
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY".into(),
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID".into(),
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM".into(),
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD".into(),
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN".into(),
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN".into(),
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG".into(),
        x => format!("reply type {x:#x}"),
    }
}

// ------------------------------------------------------------------------------------------
// Handshake

/// Parses the 18-byte server greeting; returns the handshake flags. Requires fixed newstyle.
pub fn parse_greeting(b: &[u8]) -> Result<u16> {
    need("server greeting", b, 18)?;
    let magic = be_u64(b, 0);
    if magic != NBDMAGIC {
        return Err(Error::nbd(
            "server greeting",
            format!("bad magic {magic:#x} (not an NBD server?)"),
        ));
    }
    let opt = be_u64(b, 8);
    if opt != IHAVEOPT {
        return Err(Error::NbdUnsupported(format!(
            "newstyle negotiation (got {opt:#x}; oldstyle servers are not supported)"
        )));
    }
    let flags = be_u16(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::NbdUnsupported("fixed newstyle negotiation".into()));
    }
    Ok(flags)
}

/// Encodes an option request: `IHAVEOPT, option, length, data`.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Payload of NBD_OPT_SET_META_CONTEXT / LIST_META_CONTEXT.
pub fn encode_meta_context_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Payload of NBD_OPT_GO / NBD_OPT_INFO, asking for block-size information.
pub fn encode_go_request(export: &str) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v
}

/// Header of one option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub len: u32,
}

/// Parses the 20-byte option reply header, checking the magic, that it answers `expected`,
/// and that the payload length is bounded.
pub fn parse_option_reply_header(b: &[u8], expected: u32) -> Result<OptionReplyHeader> {
    need("option reply header", b, 20)?;
    let magic = be_u64(b, 0);
    if magic != OPT_REPLY_MAGIC {
        return Err(Error::nbd(
            "option reply header",
            format!("bad magic {magic:#x}"),
        ));
    }
    let h = OptionReplyHeader {
        option: be_u32(b, 8),
        reply_type: be_u32(b, 12),
        len: be_u32(b, 16),
    };
    if h.option != expected {
        return Err(Error::nbd(
            "option reply header",
            format!(
                "reply for option {} while waiting for {}",
                h.option,
                option_name(expected)
            ),
        ));
    }
    if h.len > MAX_OPTION_REPLY {
        return Err(Error::nbd(
            "option reply header",
            format!("payload of {} bytes exceeds {MAX_OPTION_REPLY}", h.len),
        ));
    }
    Ok(h)
}

/// Block size constraints from NBD_INFO_BLOCK_SIZE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// One NBD_REP_INFO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    Name(String),
    Description(String),
    BlockSize(BlockSize),
    Unknown(u16),
}

/// Parses an NBD_REP_INFO payload.
pub fn parse_info(b: &[u8]) -> Result<Info> {
    need("NBD_REP_INFO", b, 2)?;
    let t = be_u16(b, 0);
    let rest = &b[2..];
    match t {
        INFO_EXPORT => {
            if rest.len() != 10 {
                return Err(Error::nbd(
                    "NBD_INFO_EXPORT",
                    format!("length {} != 12", b.len()),
                ));
            }
            let size = be_u64(rest, 0);
            let flags = be_u16(rest, 8);
            if flags & TFLAG_HAS_FLAGS == 0 {
                return Err(Error::nbd("NBD_INFO_EXPORT", "NBD_FLAG_HAS_FLAGS not set"));
            }
            if size > i64::MAX as u64 {
                return Err(Error::nbd(
                    "NBD_INFO_EXPORT",
                    format!("size {size} too large"),
                ));
            }
            Ok(Info::Export { size, flags })
        }
        INFO_NAME => Ok(Info::Name(String::from_utf8_lossy(rest).into_owned())),
        INFO_DESCRIPTION => Ok(Info::Description(
            String::from_utf8_lossy(rest).into_owned(),
        )),
        INFO_BLOCK_SIZE => {
            if rest.len() != 12 {
                return Err(Error::nbd(
                    "NBD_INFO_BLOCK_SIZE",
                    format!("length {} != 14", b.len()),
                ));
            }
            let bs = BlockSize {
                minimum: be_u32(rest, 0),
                preferred: be_u32(rest, 4),
                maximum: be_u32(rest, 8),
            };
            let pow2 = |x: u32| x != 0 && x.is_power_of_two();
            if !pow2(bs.minimum)
                || bs.minimum > 64 * 1024
                || !pow2(bs.preferred)
                || bs.preferred < bs.minimum
                || bs.maximum < bs.minimum
                || (bs.maximum != u32::MAX && bs.maximum % bs.minimum != 0)
            {
                return Err(Error::nbd("NBD_INFO_BLOCK_SIZE", format!("invalid {bs:?}")));
            }
            Ok(Info::BlockSize(bs))
        }
        other => Ok(Info::Unknown(other)),
    }
}

/// Parses an NBD_REP_META_CONTEXT payload: `(context id, name)`.
pub fn parse_meta_context(b: &[u8]) -> Result<(u32, String)> {
    need("NBD_REP_META_CONTEXT", b, 5)?;
    let id = be_u32(b, 0);
    let name = std::str::from_utf8(&b[4..])
        .map_err(|_| Error::nbd("NBD_REP_META_CONTEXT", "context name is not UTF-8"))?;
    Ok((id, name.to_owned()))
}

/// The message text of an option error reply (lossy; servers send free text).
pub fn parse_option_error(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ------------------------------------------------------------------------------------------
// Transmission

/// Encodes a 28-byte request header.
pub fn encode_request(flags: u16, command: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&command.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// The two reply kinds, told apart by the leading magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    Simple,
    Structured,
}

/// Classifies a reply by its 4-byte magic.
pub fn parse_reply_magic(b: &[u8]) -> Result<ReplyKind> {
    need("reply magic", b, 4)?;
    match be_u32(b, 0) {
        SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Structured),
        m => Err(Error::nbd("reply", format!("bad reply magic {m:#x}"))),
    }
}

/// A simple reply (after its magic): `error, cookie`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub errno: u32,
    pub cookie: u64,
}

/// Parses the 12 bytes after a simple reply's magic.
pub fn parse_simple_reply(b: &[u8]) -> Result<SimpleReply> {
    need("simple reply", b, SIMPLE_REPLY_REST)?;
    Ok(SimpleReply {
        errno: be_u32(b, 0),
        cookie: be_u64(b, 4),
    })
}

/// A structured reply chunk header (after its magic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Parses the 16 bytes after a structured reply's magic. Unknown flags are rejected.
pub fn parse_chunk_header(b: &[u8]) -> Result<ChunkHeader> {
    need("structured reply header", b, CHUNK_HEADER_REST)?;
    let h = ChunkHeader {
        flags: be_u16(b, 0),
        chunk_type: be_u16(b, 2),
        cookie: be_u64(b, 4),
        len: be_u32(b, 12),
    };
    if h.flags & !REPLY_FLAG_DONE != 0 {
        return Err(Error::nbd(
            "structured reply header",
            format!("unknown flags {:#x}", h.flags),
        ));
    }
    Ok(h)
}

/// What an outstanding request asked for; replies are validated against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    BlockStatus,
    /// NBD_CMD_WRITE: the reply carries no data (a simple reply, or NONE / ERROR chunks).
    Write,
    /// NBD_CMD_FLUSH: replied to like a write.
    Flush,
}

impl RequestKind {
    /// The command's wire number.
    pub fn command(self) -> u16 {
        match self {
            RequestKind::Read => CMD_READ,
            RequestKind::BlockStatus => CMD_BLOCK_STATUS,
            RequestKind::Write => CMD_WRITE,
            RequestKind::Flush => CMD_FLUSH,
        }
    }

    /// A successful *simple* reply is legal for this command even with structured replies
    /// negotiated (commands that return no data).
    pub fn simple_success_allowed(self) -> bool {
        matches!(self, RequestKind::Write | RequestKind::Flush)
    }
}

/// An outstanding request as the reply validators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub offset: u64,
    pub len: u32,
    /// Size of the export (block-status extents must not run past it).
    pub export_size: u64,
}

impl Request {
    pub fn command_name(&self) -> &'static str {
        match self.kind {
            RequestKind::Read => "NBD_CMD_READ",
            RequestKind::BlockStatus => "NBD_CMD_BLOCK_STATUS",
            RequestKind::Write => "NBD_CMD_WRITE",
            RequestKind::Flush => "NBD_CMD_FLUSH",
        }
    }
    fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// The largest payload a chunk of this header may carry for this request; checked before
/// reading (and allocating for) the payload.
pub fn max_chunk_payload(h: &ChunkHeader, req: &Request) -> Result<u32> {
    let max = match (h.chunk_type, req.kind) {
        (REPLY_TYPE_NONE, _) => 0,
        (REPLY_TYPE_OFFSET_DATA, RequestKind::Read) => req.len.saturating_add(8),
        (REPLY_TYPE_OFFSET_HOLE, RequestKind::Read) => 12,
        (REPLY_TYPE_BLOCK_STATUS, RequestKind::BlockStatus) => 4 + 8 * MAX_EXTENTS_PER_CHUNK,
        (REPLY_TYPE_ERROR, _) => 6 + u32::from(MAX_ERROR_MESSAGE),
        (REPLY_TYPE_ERROR_OFFSET, _) => 6 + u32::from(MAX_ERROR_MESSAGE) + 8,
        (t, _) => {
            return Err(Error::nbd(
                "structured reply",
                format!(
                    "chunk type {t} is unknown or illegal for {}",
                    req.command_name()
                ),
            ))
        }
    };
    if h.len > max {
        return Err(Error::nbd(
            "structured reply",
            format!(
                "chunk type {} of {} bytes exceeds {max} for {}",
                h.chunk_type,
                h.len,
                req.command_name()
            ),
        ));
    }
    Ok(max)
}

/// One extent of a block-status reply: `length` bytes with context-defined `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

/// A validated structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    None,
    Data {
        offset: u64,
        data: &'a [u8],
    },
    Hole {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        context: u32,
        extents: Vec<Extent>,
    },
    Error {
        errno: u32,
        message: String,
        offset: Option<u64>,
    },
}

fn check_in_request(what: &'static str, req: &Request, offset: u64, len: u64) -> Result<()> {
    let end = offset.checked_add(len);
    match end {
        Some(end) if offset >= req.offset && end <= req.end() && len > 0 => Ok(()),
        _ => Err(Error::nbd(
            what,
            format!(
                "range {offset}+{len} outside request {}+{}",
                req.offset, req.len
            ),
        )),
    }
}

/// Validates an NBD_REPLY_TYPE_OFFSET_DATA chunk of header `h` (already approved by
/// [`max_chunk_payload`]) whose payload starts with `offset`; returns the data length. The
/// client reads the data of such a chunk straight into the request's buffer after this check.
pub fn check_offset_data(h: &ChunkHeader, req: &Request, offset: u64) -> Result<u64> {
    if h.chunk_type != REPLY_TYPE_OFFSET_DATA || req.kind != RequestKind::Read {
        return Err(Error::nbd(
            "structured reply",
            format!("offset data in a reply to {}", req.command_name()),
        ));
    }
    if h.len < 9 {
        return Err(Error::nbd("NBD_REPLY_TYPE_OFFSET_DATA", "no data"));
    }
    let len = u64::from(h.len - 8);
    check_in_request("NBD_REPLY_TYPE_OFFSET_DATA", req, offset, len)?;
    Ok(len)
}

/// Parses and validates one chunk payload (`payload.len()` must equal `h.len`, which the
/// caller read after [`max_chunk_payload`] approved it). `contexts` are the negotiated ids.
pub fn parse_chunk<'a>(
    h: &ChunkHeader,
    payload: &'a [u8],
    req: &Request,
    contexts: &[u32],
) -> Result<Chunk<'a>> {
    max_chunk_payload(h, req)?;
    if payload.len() != h.len as usize {
        return Err(Error::nbd(
            "structured reply",
            format!("payload is {} bytes, header says {}", payload.len(), h.len),
        ));
    }
    match h.chunk_type {
        REPLY_TYPE_NONE => {
            if !h.done() {
                return Err(Error::nbd(
                    "NBD_REPLY_TYPE_NONE",
                    "without NBD_REPLY_FLAG_DONE",
                ));
            }
            Ok(Chunk::None)
        }
        REPLY_TYPE_OFFSET_DATA => {
            if payload.len() < 9 {
                return Err(Error::nbd("NBD_REPLY_TYPE_OFFSET_DATA", "no data"));
            }
            let offset = be_u64(payload, 0);
            let data = &payload[8..];
            check_offset_data(h, req, offset)?;
            Ok(Chunk::Data { offset, data })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if payload.len() != 12 {
                return Err(Error::nbd(
                    "NBD_REPLY_TYPE_OFFSET_HOLE",
                    format!("length {} != 12", payload.len()),
                ));
            }
            let offset = be_u64(payload, 0);
            let len = be_u32(payload, 8);
            check_in_request("NBD_REPLY_TYPE_OFFSET_HOLE", req, offset, u64::from(len))?;
            Ok(Chunk::Hole { offset, len })
        }
        REPLY_TYPE_BLOCK_STATUS => {
            let what = "NBD_REPLY_TYPE_BLOCK_STATUS";
            if payload.len() < 12 || (payload.len() - 4) % 8 != 0 {
                return Err(Error::nbd(what, format!("bad length {}", payload.len())));
            }
            let context = be_u32(payload, 0);
            if !contexts.contains(&context) {
                return Err(Error::nbd(
                    what,
                    format!("context id {context} was not negotiated"),
                ));
            }
            let mut extents = Vec::with_capacity((payload.len() - 4) / 8);
            let limit = req.export_size.saturating_sub(req.offset);
            let mut total: u64 = 0;
            for d in payload[4..].chunks_exact(8) {
                let length = u64::from(be_u32(d, 0));
                let flags = be_u32(d, 4);
                if length == 0 {
                    return Err(Error::nbd(what, "zero-length extent"));
                }
                total += length;
                if total > limit {
                    return Err(Error::nbd(
                        what,
                        format!("extents run past the end of the export ({total} > {limit})"),
                    ));
                }
                extents.push(Extent { length, flags });
            }
            Ok(Chunk::BlockStatus { context, extents })
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            let what = "NBD_REPLY_TYPE_ERROR";
            if payload.len() < 6 {
                return Err(Error::nbd(what, format!("length {} < 6", payload.len())));
            }
            let errno = be_u32(payload, 0);
            let msg_len = usize::from(be_u16(payload, 4));
            let extra = if h.chunk_type == REPLY_TYPE_ERROR_OFFSET {
                8
            } else {
                0
            };
            if payload.len() != 6 + msg_len + extra {
                return Err(Error::nbd(
                    what,
                    format!("length {} != 6 + {msg_len} + {extra}", payload.len()),
                ));
            }
            if errno == 0 {
                return Err(Error::nbd(what, "error chunk with errno 0"));
            }
            let message = String::from_utf8_lossy(&payload[6..6 + msg_len]).into_owned();
            let offset = if extra == 8 {
                let o = be_u64(payload, 6 + msg_len);
                if o < req.offset || o >= req.end() {
                    return Err(Error::nbd(
                        what,
                        format!("error offset {o} outside request"),
                    ));
                }
                Some(o)
            } else {
                None
            };
            Ok(Chunk::Error {
                errno,
                message,
                offset,
            })
        }
        t => Err(Error::nbd(
            "structured reply",
            format!("unknown chunk type {t}"),
        )),
    }
}

mod assemble;
pub use assemble::{
    clip_extents, AckAssembler, BlockStatusAssembler, ContextExtents, ReadAssembler, ReadReply,
    ServerError,
};

#[cfg(test)]
mod tests;
