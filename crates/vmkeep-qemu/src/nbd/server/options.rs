//! The handshake: fixed-newstyle greeting and option haggling, under one deadline.
//!
//! Every option's data is bounded before it is read; what the client sends is parsed by the
//! pure functions at the bottom, which the unit tests feed malformed input.

use std::io::{self, BufReader, Read, Write};
use std::time::Instant;

use tracing::{debug, warn};

use super::conn::Conn;
use super::reply::option_reply;
use super::Export;
use crate::nbd::proto::*;

/// Largest option data read into memory.
pub(super) const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Option data up to this size is read and thrown away (answered with ERR_TOO_BIG); larger
/// means a hostile or broken client, and the connection is closed.
pub(super) const MAX_DISCARD: u32 = 1024 * 1024;
/// Options per handshake; a client still haggling after this many is closed.
const MAX_OPTIONS: usize = 1024;
/// Longest string (export name) the protocol allows.
const MAX_STRING: u32 = 4096;
/// The id this server gives `base:allocation` in NBD_OPT_SET_META_CONTEXT replies.
pub(super) const BASE_ALLOCATION_ID: u32 = 1;
pub(super) const BASE_ALLOCATION: &str = "base:allocation";

/// What the handshake settled for the transmission phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Negotiated {
    pub(super) structured: bool,
    /// `base:allocation` was selected by the last NBD_OPT_SET_META_CONTEXT.
    pub(super) base_allocation: bool,
}

/// Transmission flags for a connection in this state (SEND_DF only with structured replies,
/// as the protocol requires).
pub(super) fn transmission_flags(structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_READ_ONLY
        | TFLAG_SEND_FLUSH
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE;
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

/// Reads from the client with whatever is left of the handshake deadline as the timeout,
/// so a client that trickles bytes cannot stretch the handshake either.
struct Timed<'a> {
    r: &'a mut BufReader<Conn>,
    deadline: Instant,
}

impl Timed<'_> {
    fn read_exact(&mut self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.r.buffer().is_empty() {
                let left = self.deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timeout"));
                }
                self.r.get_ref().set_read_timeout(Some(left))?;
            }
            match self.r.read(buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads and drops `n` bytes through a small buffer.
    fn discard(&mut self, mut n: u64) -> io::Result<()> {
        let mut scratch = [0u8; 8192];
        while n > 0 {
            let k = n.min(scratch.len() as u64) as usize;
            self.read_exact(&mut scratch[..k])?;
            n -= k as u64;
        }
        Ok(())
    }
}

/// Runs the handshake. `Ok(Some)` enters transmission; `Ok(None)` means the session ended
/// (abort, refused client, protocol violation; already logged); `Err` is an I/O failure or
/// the deadline.
pub(super) fn handshake(
    r: &mut BufReader<Conn>,
    w: &mut Conn,
    export: &Export,
    id: u64,
) -> io::Result<Option<Negotiated>> {
    let mut rd = Timed {
        r,
        deadline: Instant::now() + export.handshake_timeout,
    };
    w.set_write_timeout(Some(export.handshake_timeout))?;
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting)?;

    let mut b = [0u8; 4];
    rd.read_exact(&mut b)?;
    let client_flags = u32::from_be_bytes(b);
    if client_flags & CLIENT_FIXED_NEWSTYLE == 0
        || client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
    {
        warn!(
            conn = id,
            client_flags, "NBD client refused: not fixed newstyle, or unknown flags"
        );
        return Ok(None);
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut neg = Negotiated::default();

    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        rd.read_exact(&mut h)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
        let opt = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        if magic != IHAVEOPT {
            warn!(conn = id, magic, "NBD option with bad magic: closing");
            return Ok(None);
        }
        if opt == OPT_EXPORT_NAME {
            // No error reply exists for this option: anything wrong ends the session.
            if len > MAX_STRING {
                warn!(conn = id, len, "NBD_OPT_EXPORT_NAME name too long: closing");
                return Ok(None);
            }
            let mut name = vec![0u8; len as usize];
            rd.read_exact(&mut name)?;
            if !export.accepts(&name) {
                debug!(conn = id, name = %String::from_utf8_lossy(&name), "unknown NBD export: closing");
                return Ok(None);
            }
            let mut v = Vec::with_capacity(10 + 124);
            v.extend_from_slice(&export.size.to_be_bytes());
            v.extend_from_slice(&transmission_flags(neg.structured).to_be_bytes());
            if !no_zeroes {
                v.resize(10 + 124, 0);
            }
            w.write_all(&v)?;
            // Meta contexts set earlier stay selected: they named this same export.
            return Ok(Some(neg));
        }
        if len > MAX_OPTION_DATA {
            if len > MAX_DISCARD {
                warn!(
                    conn = id,
                    option = opt,
                    len,
                    "NBD option data far too large: closing"
                );
                return Ok(None);
            }
            rd.discard(u64::from(len))?;
            w.write_all(&option_reply(
                opt,
                REP_ERR_TOO_BIG,
                b"option data too large",
            ))?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data)?;
        match answer(opt, &data, export, &mut neg) {
            Answer::Reply(bytes) => w.write_all(&bytes)?,
            Answer::Go(bytes) => {
                w.write_all(&bytes)?;
                return Ok(Some(neg));
            }
            Answer::Abort(bytes) => {
                // The client may already be gone: the ACK is a courtesy.
                let _ = w.write_all(&bytes);
                debug!(conn = id, "NBD client aborted the handshake");
                return Ok(None);
            }
        }
    }
    warn!(conn = id, "NBD client sent {MAX_OPTIONS} options: closing");
    Ok(None)
}

/// The reply to one option (all its reply packets), and what follows it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    Reply(Vec<u8>),
    /// NBD_OPT_GO succeeded: transmission starts after these bytes.
    Go(Vec<u8>),
    /// NBD_OPT_ABORT: the session ends after these bytes.
    Abort(Vec<u8>),
}

/// Answers one option (not EXPORT_NAME), updating `neg`. Pure: the tests call it directly.
pub(super) fn answer(opt: u32, data: &[u8], export: &Export, neg: &mut Negotiated) -> Answer {
    let err = |t: u32, msg: &str| Answer::Reply(option_reply(opt, t, msg.as_bytes()));
    let ack = || option_reply(opt, REP_ACK, &[]);
    match opt {
        OPT_ABORT => Answer::Abort(ack()),
        OPT_LIST if !data.is_empty() => err(REP_ERR_INVALID, "NBD_OPT_LIST takes no data"),
        OPT_LIST => {
            let mut p = (export.name.len() as u32).to_be_bytes().to_vec();
            p.extend_from_slice(export.name.as_bytes());
            // The rest of NBD_REP_SERVER is free text for humans: the description.
            if let Some(d) = &export.description {
                p.extend_from_slice(d.as_bytes());
            }
            let mut v = option_reply(opt, REP_SERVER, &p);
            v.extend_from_slice(&ack());
            Answer::Reply(v)
        }
        OPT_STARTTLS => err(REP_ERR_POLICY, "TLS is not supported by this server"),
        OPT_STRUCTURED_REPLY if !data.is_empty() => {
            err(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        }
        OPT_STRUCTURED_REPLY if neg.structured => {
            err(REP_ERR_INVALID, "structured replies already negotiated")
        }
        OPT_STRUCTURED_REPLY => {
            neg.structured = true;
            Answer::Reply(ack())
        }
        OPT_INFO | OPT_GO => {
            let Some((name, infos)) = parse_info_request(data) else {
                return err(REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data");
            };
            if !export.accepts(name) {
                return err(REP_ERR_UNKNOWN, "no such export");
            }
            let mut v = info_replies(opt, &infos, export, neg.structured);
            v.extend_from_slice(&ack());
            if opt == OPT_GO {
                Answer::Go(v)
            } else {
                Answer::Reply(v)
            }
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let set = opt == OPT_SET_META_CONTEXT;
            if set && !neg.structured {
                return err(REP_ERR_INVALID, "negotiate structured replies first");
            }
            let Some((name, queries)) = parse_meta_request(data) else {
                return err(REP_ERR_INVALID, "malformed meta context request");
            };
            if !export.accepts(name) {
                return err(REP_ERR_UNKNOWN, "no such export");
            }
            // A namespace alone ("base:") lists its contexts; selecting needs the full name.
            let matches = |q: &&[u8]| q == &BASE_ALLOCATION.as_bytes() || (!set && q == b"base:");
            let granted = if set {
                queries.iter().any(|q| q == &BASE_ALLOCATION.as_bytes())
            } else {
                queries.is_empty() || queries.iter().any(matches)
            };
            let mut v = Vec::new();
            if granted {
                // LIST replies carry id 0 (reserved); SET gives the id used in replies.
                let id = if set { BASE_ALLOCATION_ID } else { 0 };
                let mut p = id.to_be_bytes().to_vec();
                p.extend_from_slice(BASE_ALLOCATION.as_bytes());
                v = option_reply(opt, REP_META_CONTEXT, &p);
            }
            if set {
                neg.base_allocation = granted;
            }
            v.extend_from_slice(&ack());
            Answer::Reply(v)
        }
        _ => err(REP_ERR_UNSUP, "option not supported by this server"),
    }
}

/// The NBD_REP_INFO packets for an INFO/GO: EXPORT and BLOCK_SIZE always, NAME and
/// DESCRIPTION when asked for.
fn info_replies(opt: u32, infos: &[u16], export: &Export, structured: bool) -> Vec<u8> {
    let mut p = INFO_EXPORT.to_be_bytes().to_vec();
    p.extend_from_slice(&export.size.to_be_bytes());
    p.extend_from_slice(&transmission_flags(structured).to_be_bytes());
    let mut v = option_reply(opt, REP_INFO, &p);

    let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    p.extend_from_slice(&1u32.to_be_bytes());
    p.extend_from_slice(&export.preferred_block.to_be_bytes());
    p.extend_from_slice(&export.max_request.to_be_bytes());
    v.extend_from_slice(&option_reply(opt, REP_INFO, &p));

    if infos.contains(&INFO_NAME) {
        let mut p = INFO_NAME.to_be_bytes().to_vec();
        p.extend_from_slice(export.name.as_bytes());
        v.extend_from_slice(&option_reply(opt, REP_INFO, &p));
    }
    if let (true, Some(d)) = (infos.contains(&INFO_DESCRIPTION), &export.description) {
        let mut p = INFO_DESCRIPTION.to_be_bytes().to_vec();
        p.extend_from_slice(d.as_bytes());
        v.extend_from_slice(&option_reply(opt, REP_INFO, &p));
    }
    v
}

/// Takes a `u32` length-prefixed string from the front of `b`.
fn take_string(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?);
    if len > MAX_STRING {
        return None;
    }
    let rest = &b[4..];
    let s = rest.get(..len as usize)?;
    Some((s, &rest[len as usize..]))
}

/// NBD_OPT_INFO / NBD_OPT_GO data: `name, u16 count, u16 × count`; `None` if malformed.
pub(super) fn parse_info_request(b: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let (name, rest) = take_string(b)?;
    let n = usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?));
    let list = &rest[2..];
    if list.len() != 2 * n {
        return None;
    }
    let infos = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, infos))
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT data: `name, u32 count, string × count`; `None` if
/// malformed (the count is checked against the data, never trusted for allocation).
pub(super) fn parse_meta_request(b: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let (name, mut rest) = take_string(b)?;
    let n = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    rest = &rest[4..];
    // Each query takes at least its 4-byte length.
    if u64::from(n) * 4 > rest.len() as u64 {
        return None;
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let (q, r) = take_string(rest)?;
        queries.push(q);
        rest = r;
    }
    rest.is_empty().then_some((name, queries))
}
