//! The transmission phase of one connection: this thread reads requests and hands them to
//! worker threads through a bounded channel; each worker builds a whole reply and writes it
//! under the connection's write lock, so replies never interleave.
//!
//! Bounds: the channel holds at most `workers` requests (headers only: a WRITE's payload is
//! read and dropped here first), and each worker holds one reply of at most `max_request`
//! bytes plus chunk headers, so a connection never has more than about
//! `workers × max_request` bytes in flight whatever the client sends.

use std::io::{self, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Receiver;
use tracing::{debug, warn};
use vmkeep_io::ServedDisk;

use super::conn::Conn;
use super::options::{Negotiated, BASE_ALLOCATION_ID};
use super::reply::{self, Framing, MAX_DESCRIPTORS};
use super::Export;
use crate::nbd::proto::*;

/// Command flags this server knows; any other bit is EINVAL.
const KNOWN_FLAGS: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
/// Read buffer of a connection (request headers are 28 bytes; this saves system calls).
const READ_BUFFER: usize = 64 * 1024;
/// CACHE is read through in pieces of this size, one scratch buffer per request.
const CACHE_PIECE: u64 = 1024 * 1024;

/// Runs one connection from greeting to close: the handshake under its deadline, then the
/// transmission phase without timeouts.
pub(super) fn serve_connection(
    conn: Conn,
    peer: &str,
    disk: Arc<dyn ServedDisk>,
    export: Arc<Export>,
    id: u64,
) {
    debug!(conn = id, peer, "NBD connection accepted");
    let mut out = match conn.try_clone() {
        Ok(o) => o,
        Err(e) => {
            warn!(conn = id, error = %e, "cannot clone the NBD connection socket");
            return;
        }
    };
    let mut r = BufReader::with_capacity(READ_BUFFER, conn);
    let neg = match super::options::handshake(&mut r, &mut out, &export, id) {
        Ok(Some(neg)) => neg,
        Ok(None) => {
            out.shutdown();
            return;
        }
        Err(e) => {
            debug!(conn = id, error = %e, "NBD handshake ended");
            out.shutdown();
            return;
        }
    };
    debug!(
        conn = id,
        structured = neg.structured,
        base_allocation = neg.base_allocation,
        "NBD transmission phase"
    );
    // No timeouts from here on: an idle client is legitimate.
    if let Err(e) = out
        .set_read_timeout(None)
        .and_then(|_| out.set_write_timeout(None))
    {
        warn!(conn = id, error = %e, "cannot clear the NBD socket timeouts");
        out.shutdown();
        return;
    }
    serve(r, out, disk, export, neg, id);
}

/// One request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Request {
    pub(super) flags: u16,
    pub(super) command: u16,
    pub(super) cookie: u64,
    pub(super) offset: u64,
    pub(super) len: u32,
}

/// Parses a 28-byte request header; `None` for a bad magic.
pub(super) fn parse_request(b: &[u8; 28]) -> Option<Request> {
    let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    (u32_at(0) == REQUEST_MAGIC).then(|| Request {
        flags: u16_at(4),
        command: u16_at(6),
        cookie: u64_at(8),
        offset: u64_at(16),
        len: u32_at(24),
    })
}

/// What the workers of one connection share.
struct Session {
    disk: Arc<dyn ServedDisk>,
    export: Arc<Export>,
    neg: Negotiated,
    out: Mutex<Conn>,
    /// A reply could not be written: the client is gone, later requests are dropped.
    broken: AtomicBool,
    id: u64,
}

impl Session {
    fn framing(&self) -> Framing {
        Framing {
            structured: self.neg.structured,
        }
    }

    /// Writes one whole reply. A failure (client gone) shuts the socket down, which also
    /// wakes the request reader.
    fn send(&self, bytes: &[u8]) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut out) = self.out.lock() else {
            // A worker panicked mid-write: the stream is no longer framed.
            self.broken.store(true, Ordering::Relaxed);
            return;
        };
        if let Err(e) = out.write_all(bytes) {
            debug!(conn = self.id, error = %e, "NBD client gone while replying");
            self.broken.store(true, Ordering::Relaxed);
            out.shutdown();
        }
    }
}

/// Serves requests until the client disconnects (DISC, EOF) or breaks the protocol, then
/// lets the workers finish the requests already read and closes the connection.
fn serve(
    mut r: BufReader<Conn>,
    out: Conn,
    disk: Arc<dyn ServedDisk>,
    export: Arc<Export>,
    neg: Negotiated,
    id: u64,
) {
    let workers = export.workers;
    let session = Arc::new(Session {
        disk,
        export,
        neg,
        out: Mutex::new(out),
        broken: AtomicBool::new(false),
        id,
    });
    let (tx, rx) = crossbeam_channel::bounded::<Request>(workers);
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (rx, s) = (rx.clone(), session.clone());
        match std::thread::Builder::new()
            .name("nbd-worker".into())
            .spawn(move || work(rx, &s))
        {
            Ok(h) => handles.push(h),
            Err(e) => warn!(conn = id, error = %e, "cannot start an NBD worker thread"),
        }
    }
    drop(rx);
    if handles.is_empty() {
        session.out.lock().map(|o| o.shutdown()).ok();
        return;
    }

    loop {
        let mut h = [0u8; 28];
        if let Err(e) = r.read_exact(&mut h) {
            if !session.broken.load(Ordering::Relaxed) && e.kind() != io::ErrorKind::UnexpectedEof {
                debug!(conn = id, error = %e, "NBD connection read failed");
            }
            break;
        }
        let Some(req) = parse_request(&h) else {
            warn!(conn = id, "NBD request with bad magic: closing");
            break;
        };
        if req.command == CMD_DISC {
            debug!(conn = id, "NBD client disconnected");
            break;
        }
        if req.command == CMD_WRITE {
            // The payload follows the header whatever the answer; read past it without
            // keeping it, or give up on a client that would send more than allowed.
            if req.len > session.export.max_request {
                warn!(
                    conn = id,
                    len = req.len,
                    "NBD write larger than the request limit: closing"
                );
                break;
            }
            let mut payload = (&mut r).take(u64::from(req.len));
            match io::copy(&mut payload, &mut io::sink()) {
                Ok(n) if n == u64::from(req.len) => {}
                _ => break,
            }
        }
        if tx.send(req).is_err() {
            break;
        }
    }
    drop(tx);
    for h in handles {
        if h.join().is_err() {
            warn!(conn = id, "an NBD worker thread panicked");
        }
    }
    if let Ok(out) = session.out.lock() {
        out.shutdown();
    }
    debug!(conn = id, "NBD connection closed");
}

fn work(rx: Receiver<Request>, s: &Session) {
    for req in rx.iter() {
        if s.broken.load(Ordering::Relaxed) {
            continue;
        }
        let bytes = handle(s, &req);
        s.send(&bytes);
    }
}

/// Why a range is refused: `(errno, message)`.
type Refusal = (u32, &'static str);

/// Checks a data command's range: non-empty, inside the disk, and (when `max` is given) not
/// larger than `max` (EOVERFLOW for reads, as the protocol suggests, else EINVAL).
pub(super) fn check_range(
    req: &Request,
    size: u64,
    max: Option<(u32, u32)>,
) -> Result<(), Refusal> {
    if req.len == 0 {
        return Err((EINVAL, "zero-length request"));
    }
    match req.offset.checked_add(u64::from(req.len)) {
        Some(end) if end <= size => {}
        _ => return Err((EINVAL, "request beyond the end of the export")),
    }
    if let Some((limit, errno)) = max {
        if req.len > limit {
            return Err((errno, "request larger than the server's maximum block size"));
        }
    }
    Ok(())
}

/// The whole reply to one request.
fn handle(s: &Session, req: &Request) -> Vec<u8> {
    let framing = s.framing();
    let size = s.export.size;
    let max = s.export.max_request;
    let refuse = |(errno, msg): Refusal| {
        debug!(
            conn = s.id,
            command = req.command,
            offset = req.offset,
            len = req.len,
            errno,
            msg,
            "NBD request refused"
        );
        framing.error(req.cookie, errno, msg)
    };
    if req.flags & !KNOWN_FLAGS != 0 {
        return refuse((EINVAL, "unknown command flags"));
    }
    match req.command {
        CMD_READ => match check_range(req, size, Some((max, EOVERFLOW))) {
            Err(r) => refuse(r),
            Ok(()) => {
                let df = req.flags & CMD_FLAG_DF != 0;
                reply::read(&*s.disk, framing, df, req.cookie, req.offset, req.len)
            }
        },
        CMD_BLOCK_STATUS => {
            if !(s.neg.structured && s.neg.base_allocation) {
                return refuse((EINVAL, "no meta context was negotiated"));
            }
            if let Err(r) = check_range(req, size, None) {
                return refuse(r);
            }
            let limit = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                MAX_DESCRIPTORS
            };
            match reply::descriptors(&*s.disk, req.offset, req.len, limit) {
                Ok(d) => reply::block_status(req.cookie, BASE_ALLOCATION_ID, &d),
                Err(e) => {
                    warn!(conn = s.id, offset = req.offset, error = %e, "NBD block status failed");
                    framing.error(req.cookie, EIO, &format!("extents: {e}"))
                }
            }
        }
        CMD_FLUSH => reply::simple_reply(req.cookie, 0),
        CMD_CACHE => match check_range(req, size, Some((max, EINVAL))) {
            Err(r) => refuse(r),
            Ok(()) => match cache(&*s.disk, req.offset, u64::from(req.len)) {
                Ok(()) => reply::simple_reply(req.cookie, 0),
                Err(e) => {
                    warn!(conn = s.id, offset = req.offset, error = %e, "NBD cache read failed");
                    framing.error(req.cookie, EIO, &format!("read: {e}"))
                }
            },
        },
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => refuse((EPERM, "the export is read-only")),
        _ => refuse((EINVAL, "unknown command")),
    }
}

/// NBD_CMD_CACHE: reads the range and drops the bytes, so whatever the disk caches (fetched
/// and verified chunks) is warm for the reads the client announced.
fn cache(disk: &dyn ServedDisk, offset: u64, len: u64) -> io::Result<()> {
    let mut scratch = vec![0u8; len.min(CACHE_PIECE) as usize];
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(CACHE_PIECE) as usize;
        disk.read_at(&mut scratch[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}
