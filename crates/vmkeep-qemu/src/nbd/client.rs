//! The async NBD client: handshake, pipelined requests matched by cookie, reply validation.
//! Reads, block status, and (on writable exports) writes and flushes.
//!
//! One reader task owns the receiving half of the socket and completes requests; senders
//! share the sending half behind a mutex. A protocol violation, an EOF or a request timeout
//! closes the connection: every outstanding and later request fails with a typed error.
//! Timeouts count only time the process ran ([`super::timeout`]): a vmkeep stopped while a
//! reply was on its way reads the reply when it runs again.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::handshake::{handshake, Negotiated};
use super::proto::{self, BlockSize, Chunk, Extent, ReadReply, Request, RequestKind, ServerError};
use super::timeout::within;
use crate::error::{Error, Result};

/// Tunables of an NBD connection.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// Limit for the whole handshake (greeting to NBD_OPT_GO's ACK).
    pub handshake_timeout: Duration,
    /// Limit for one request's reply (and for sending it), in time the process ran; a request
    /// that times out closes the connection. Default 60 s, or [`TIMEOUT_ENV`].
    pub request_timeout: Duration,
    /// Requests kept in flight by one [`NbdClient::read`] or [`NbdClient::write`] call.
    pub max_in_flight: usize,
}

/// Environment variable overriding the default request timeout, in whole seconds (> 0).
pub const TIMEOUT_ENV: &str = "VMKEEP_NBD_TIMEOUT_SECS";

/// Request timeout when [`TIMEOUT_ENV`] is not set.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The request timeout [`TIMEOUT_ENV`] asks for: None when unset; an error text when it is not a
/// whole number of seconds above 0.
pub fn request_timeout_from_env() -> std::result::Result<Option<Duration>, String> {
    let Some(v) = std::env::var_os(TIMEOUT_ENV) else {
        return Ok(None);
    };
    match v.to_str().and_then(|s| s.trim().parse::<u64>().ok()) {
        Some(secs) if secs > 0 => Ok(Some(Duration::from_secs(secs))),
        _ => Err(format!(
            "{TIMEOUT_ENV}={v:?}: expected a whole number of seconds above 0"
        )),
    }
}

impl Default for NbdOptions {
    /// Request timeout from [`TIMEOUT_ENV`] when set (the binary refuses an invalid value at
    /// start; here it falls back to [`DEFAULT_REQUEST_TIMEOUT`]).
    fn default() -> Self {
        NbdOptions {
            handshake_timeout: Duration::from_secs(10),
            request_timeout: request_timeout_from_env()
                .ok()
                .flatten()
                .unwrap_or(DEFAULT_REQUEST_TIMEOUT),
            max_in_flight: 8,
        }
    }
}

enum Assembler {
    Read(proto::ReadAssembler),
    Status(proto::BlockStatusAssembler),
    Ack(proto::AckAssembler),
}

enum Outcome {
    Read(ReadReply),
    Status(Vec<(u32, Vec<Extent>)>),
    /// A command without reply data (write, flush) succeeded.
    Done,
}

struct Slot {
    req: Request,
    asm: Assembler,
    tx: oneshot::Sender<Result<Outcome>>,
}

#[derive(Default)]
struct Pending {
    slots: HashMap<u64, Slot>,
    /// Set once the connection is unusable; the reason is reported to later callers.
    closed: Option<String>,
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;
type Reader = Box<dyn AsyncRead + Send + Unpin>;

struct Shared {
    pending: Mutex<Pending>,
    ids: Vec<u32>,
}

/// A connection to one NBD export.
pub struct NbdClient {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<Writer>,
    reader: Mutex<Option<JoinHandle<()>>>,
    next_cookie: AtomicU64,
    neg: Negotiated,
    export: String,
    opts: NbdOptions,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("export", &self.export)
            .field("size", &self.neg.size)
            .field("flags", &self.neg.flags)
            .field("contexts", &self.neg.contexts)
            .finish()
    }
}

/// One piece of a read: data, or a hole (reads as zeros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseRead {
    /// The bytes; holes are zero-filled.
    pub data: Vec<u8>,
    /// Ranges `(offset, len)` (absolute, sorted, merged) the server reported as holes.
    pub holes: Vec<(u64, u64)>,
}

impl NbdClient {
    /// Connects to a unix-socket NBD server and opens `export`, negotiating the meta
    /// `contexts` (e.g. `base:allocation`, `qemu:dirty-bitmap:NAME`). Every requested context
    /// must be granted.
    pub async fn connect_unix(
        path: impl AsRef<Path>,
        export: &str,
        contexts: &[&str],
    ) -> Result<Self> {
        Self::connect_unix_with(path, export, contexts, NbdOptions::default()).await
    }

    /// [`connect_unix`](Self::connect_unix) with explicit options.
    pub async fn connect_unix_with(
        path: impl AsRef<Path>,
        export: &str,
        contexts: &[&str],
        opts: NbdOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        let s = within(
            opts.handshake_timeout,
            tokio::net::UnixStream::connect(path),
        )
        .await
        .ok_or_else(|| Error::Timeout {
            what: format!("connect to NBD socket {}", path.display()),
            timeout: opts.handshake_timeout,
        })?
        .map_err(|e| Error::io(format!("connect to NBD socket {}", path.display()), e))?;
        Self::from_stream(s, export, contexts, opts).await
    }

    /// Connects over TCP (`addr` like `127.0.0.1:10809`).
    pub async fn connect_tcp(addr: &str, export: &str, contexts: &[&str]) -> Result<Self> {
        Self::connect_tcp_with(addr, export, contexts, NbdOptions::default()).await
    }

    /// [`connect_tcp`](Self::connect_tcp) with explicit options.
    pub async fn connect_tcp_with(
        addr: &str,
        export: &str,
        contexts: &[&str],
        opts: NbdOptions,
    ) -> Result<Self> {
        let s = within(opts.handshake_timeout, tokio::net::TcpStream::connect(addr))
            .await
            .ok_or_else(|| Error::Timeout {
                what: format!("connect to NBD server {addr}"),
                timeout: opts.handshake_timeout,
            })?
            .map_err(|e| Error::io(format!("connect to NBD server {addr}"), e))?;
        let _ = s.set_nodelay(true);
        Self::from_stream(s, export, contexts, opts).await
    }

    /// Runs the handshake on an already connected stream.
    pub async fn from_stream<S>(
        mut stream: S,
        export: &str,
        contexts: &[&str],
        opts: NbdOptions,
    ) -> Result<Self>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let neg = within(
            opts.handshake_timeout,
            handshake(&mut stream, export, contexts),
        )
        .await
        .ok_or_else(|| Error::Timeout {
            what: "NBD handshake".into(),
            timeout: opts.handshake_timeout,
        })??;
        debug!(export, size = neg.size, flags = neg.flags, ?neg.contexts, "NBD export opened");
        let (r, w) = tokio::io::split(stream);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            ids: neg.contexts.iter().map(|(id, _)| *id).collect(),
        });
        let reader = tokio::spawn(reader_task(Box::new(r), shared.clone()));
        Ok(NbdClient {
            shared,
            writer: tokio::sync::Mutex::new(Box::new(w)),
            reader: Mutex::new(Some(reader)),
            next_cookie: AtomicU64::new(1),
            neg,
            export: export.to_owned(),
            opts,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.neg.size
    }

    /// Raw transmission flags (`proto::TFLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.neg.flags
    }

    /// The server allows several connections to this export with consistent results.
    pub fn can_multi_conn(&self) -> bool {
        self.neg.flags & proto::TFLAG_CAN_MULTI_CONN != 0
    }

    /// The export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.neg.flags & proto::TFLAG_READ_ONLY != 0
    }

    /// Block size constraints, if the server sent them.
    pub fn block_size(&self) -> Option<BlockSize> {
        self.neg.block_size
    }

    /// Negotiated meta contexts: `(id, name)`.
    pub fn contexts(&self) -> &[(u32, String)] {
        &self.neg.contexts
    }

    /// Export name.
    pub fn export_name(&self) -> &str {
        &self.export
    }

    /// Reads `len` bytes at `offset`; holes read as zeros. Large reads are split and pipelined.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        Ok(self.read_sparse(offset, len).await?.data)
    }

    /// Like [`read`](Self::read) but also reports which ranges the server sent as holes.
    pub async fn read_sparse(&self, offset: u64, len: u64) -> Result<SparseRead> {
        self.check_range(offset, len)?;
        let piece = self.max_read_piece();
        let total = usize::try_from(len).map_err(|_| Error::NbdInvalidRequest {
            offset,
            len,
            detail: "too large for this platform".into(),
        })?;
        // The first reply's buffer becomes the result (a read of one piece is never copied).
        let mut data = Vec::new();
        let mut holes: Vec<(u64, u64)> = Vec::new();
        let mut next = offset;
        let end = offset + len;
        let mut in_flight = VecDeque::new();
        while next < end || !in_flight.is_empty() {
            while next < end && in_flight.len() < self.opts.max_in_flight.max(1) {
                let l = (end - next).min(u64::from(piece)) as u32;
                in_flight.push_back(self.submit(RequestKind::Read, next, l, &[]).await?);
                next += u64::from(l);
            }
            if let Some(rx) = in_flight.pop_front() {
                match self.wait(stop_at_first_read(rx)).await? {
                    Outcome::Read(r) => {
                        if data.is_empty() {
                            data = r.data;
                            data.reserve_exact(total - data.len());
                        } else {
                            data.extend_from_slice(&r.data);
                        }
                        for (o, l) in r.holes {
                            match holes.last_mut() {
                                Some((po, pl)) if *po + *pl == o => *pl += l,
                                _ => holes.push((o, l)),
                            }
                        }
                    }
                    _ => unreachable!("read slot completed with another outcome"),
                }
            }
        }
        Ok(SparseRead { data, holes })
    }

    /// Block status of `[offset, offset+len)` in the negotiated `context`, covering the
    /// whole range by repeated requests. Adjacent extents with equal flags are merged.
    pub async fn block_status(&self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let id = self
            .neg
            .contexts
            .iter()
            .find(|(_, n)| n == context)
            .map(|(id, _)| *id)
            .ok_or_else(|| Error::NbdContextUnavailable(context.to_owned()))?;
        let align = u64::from(self.neg.block_size.map_or(1, |b| b.minimum));
        let max_req = ((1u64 << 31) / align * align).max(align);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let l = (end - pos).min(max_req) as u32;
            let rx = self.submit(RequestKind::BlockStatus, pos, l, &[]).await?;
            let per_ctx = match self.wait(rx).await? {
                Outcome::Status(s) => s,
                _ => unreachable!("status slot completed with another outcome"),
            };
            let extents = per_ctx
                .into_iter()
                .find(|(c, _)| *c == id)
                .map(|(_, e)| e)
                .ok_or_else(|| {
                    self.fail(Error::nbd(
                        "NBD_CMD_BLOCK_STATUS reply",
                        format!("no extents for context {context}"),
                    ))
                })?;
            for e in proto::clip_extents(extents, u64::from(l)) {
                pos += e.length;
                match out.last_mut() {
                    Some(last) if last.flags == e.flags => last.length += e.length,
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }

    /// Writes `data` at `offset` (NBD_CMD_WRITE). Large writes are split and pipelined. The
    /// data is durable only after [`flush`](Self::flush). A read-only export gives
    /// [`Error::NbdReadOnly`] without sending anything; a server-side failure gives
    /// [`Error::NbdServer`] (the connection stays usable).
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::NbdReadOnly {
                export: self.export.clone(),
            });
        }
        self.check_range(offset, data.len() as u64)?;
        let piece = self.max_write_piece() as usize;
        let mut pos = 0usize;
        let mut in_flight = VecDeque::new();
        while pos < data.len() || !in_flight.is_empty() {
            while pos < data.len() && in_flight.len() < self.opts.max_in_flight.max(1) {
                let part = &data[pos..data.len().min(pos + piece)];
                let at = offset + pos as u64;
                in_flight.push_back(
                    self.submit(RequestKind::Write, at, part.len() as u32, part)
                        .await?,
                );
                pos += part.len();
            }
            if let Some(rx) = in_flight.pop_front() {
                match self.wait(rx).await? {
                    Outcome::Done => {}
                    _ => unreachable!("write slot completed with another outcome"),
                }
            }
        }
        Ok(())
    }

    /// The server accepts NBD_CMD_FLUSH (it has a write cache to flush).
    pub fn can_flush(&self) -> bool {
        self.neg.flags & proto::TFLAG_SEND_FLUSH != 0
    }

    /// Makes every completed write durable (NBD_CMD_FLUSH). A no-op when the server does not
    /// advertise flush (its writes are durable when acknowledged) or the export is read-only.
    pub async fn flush(&self) -> Result<()> {
        if !self.can_flush() || self.is_read_only() {
            return Ok(());
        }
        let rx = self.submit(RequestKind::Flush, 0, 0, &[]).await?;
        match self.wait(rx).await? {
            Outcome::Done => Ok(()),
            _ => unreachable!("flush slot completed with another outcome"),
        }
    }

    /// Sends NBD_CMD_DISC and closes the connection.
    pub async fn disconnect(self) -> Result<()> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let hdr = proto::encode_request(0, proto::CMD_DISC, cookie, 0, 0);
        let res = {
            let mut w = self.writer.lock().await;
            let r = w.write_all(&hdr).await;
            let _ = w.flush().await;
            let _ = w.shutdown().await;
            r
        };
        self.close("disconnected");
        res.map_err(|e| Error::io("send NBD_CMD_DISC", e))
    }

    fn max_read_piece(&self) -> u32 {
        let mut piece = proto::MAX_READ_REQUEST;
        if let Some(bs) = self.neg.block_size {
            piece = piece.min(bs.maximum);
            piece = (piece / bs.minimum * bs.minimum).max(bs.minimum);
        }
        piece
    }

    fn max_write_piece(&self) -> u32 {
        let mut piece = proto::MAX_WRITE_REQUEST;
        if let Some(bs) = self.neg.block_size {
            piece = piece.min(bs.maximum);
            piece = (piece / bs.minimum * bs.minimum).max(bs.minimum);
        }
        piece
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let bad = |detail: String| {
            Err(Error::NbdInvalidRequest {
                offset,
                len,
                detail,
            })
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.neg.size => {}
            _ => return bad(format!("beyond the export size {}", self.neg.size)),
        }
        if len == 0 {
            return bad("zero length".into());
        }
        if let Some(bs) = self.neg.block_size {
            let m = u64::from(bs.minimum);
            if offset % m != 0 || (len % m != 0 && offset + len != self.neg.size) {
                return bad(format!("not aligned to the minimum block size {m}"));
            }
        }
        Ok(())
    }

    /// Registers and sends one request; `payload` follows the header (writes only).
    async fn submit(
        &self,
        kind: RequestKind,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<oneshot::Receiver<Result<Outcome>>> {
        debug_assert!(kind == RequestKind::Write || payload.is_empty());
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let req = Request {
            kind,
            offset,
            len,
            export_size: self.neg.size,
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(reason) = &p.closed {
                return Err(Error::NbdClosed {
                    reason: Some(reason.clone()),
                });
            }
            let asm = match kind {
                RequestKind::Read => Assembler::Read(proto::ReadAssembler::new(offset, len)),
                RequestKind::BlockStatus => Assembler::Status(proto::BlockStatusAssembler::new()),
                RequestKind::Write | RequestKind::Flush => {
                    Assembler::Ack(proto::AckAssembler::new())
                }
            };
            p.slots.insert(cookie, Slot { req, asm, tx });
        }
        let hdr = proto::encode_request(0, kind.command(), cookie, offset, len);
        let mut w = self.writer.lock().await;
        // A request cut off half-sent (caller dropped, timeout) leaves the stream unusable.
        let mut guard = CloseUnlessSent {
            client: self,
            sent: false,
        };
        let send = async {
            w.write_all(&hdr).await?;
            if !payload.is_empty() {
                w.write_all(payload).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let res = within(self.opts.request_timeout, send).await;
        guard.sent = true;
        match res {
            Some(Ok(())) => Ok(rx),
            Some(Err(e)) => {
                drop(w);
                Err(self.fail(Error::io("send NBD request", e)))
            }
            None => {
                drop(w);
                Err(self.fail(Error::Timeout {
                    what: "sending an NBD request".into(),
                    timeout: self.opts.request_timeout,
                }))
            }
        }
    }

    async fn wait(
        &self,
        rx: impl Future<Output = std::result::Result<Result<Outcome>, oneshot::error::RecvError>>,
    ) -> Result<Outcome> {
        match within(self.opts.request_timeout, rx).await {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::NbdClosed {
                reason: self.closed_reason(),
            }),
            None => {
                let e = Error::Timeout {
                    what: "NBD reply".into(),
                    timeout: self.opts.request_timeout,
                };
                self.close(&e.to_string());
                Err(e)
            }
        }
    }

    fn closed_reason(&self) -> Option<String> {
        let p = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        p.closed.clone()
    }

    /// Marks the connection broken by `e` and returns `e`.
    fn fail(&self, e: Error) -> Error {
        self.close(&e.to_string());
        e
    }

    fn close(&self, reason: &str) {
        if let Some(h) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
        fail_all(&self.shared, reason, None);
    }
}

/// The process's first read stops at the kill point `nbd-request-sent` once its request was sent
/// and its reply is awaited (`VMKEEP_STOP_AT`), so a test can stop vmkeep with a reply in
/// flight. Later reads pass straight through.
async fn stop_at_first_read<T>(
    rx: oneshot::Receiver<T>,
) -> std::result::Result<T, oneshot::error::RecvError> {
    static STOPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !STOPPED.swap(true, Ordering::Relaxed) {
        vmkeep_io::kill_point("nbd-request-sent");
    }
    rx.await
}

/// Closes the connection when dropped before `sent` is set.
struct CloseUnlessSent<'a> {
    client: &'a NbdClient,
    sent: bool,
}

impl Drop for CloseUnlessSent<'_> {
    fn drop(&mut self) {
        if !self.sent {
            self.client
                .close("a request was abandoned while being sent");
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if let Some(h) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
    }
}

/// Closes the connection's bookkeeping: every waiting request gets an error.
fn fail_all(shared: &Shared, reason: &str, err: Option<&Error>) {
    let slots: Vec<Slot> = {
        let mut p = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.closed.is_none() {
            p.closed = Some(reason.to_owned());
        }
        p.slots.drain().map(|(_, s)| s).collect()
    };
    for s in slots {
        let e = match err {
            Some(e) => duplicate(e),
            None => Error::NbdClosed {
                reason: Some(reason.to_owned()),
            },
        };
        let _ = s.tx.send(Err(e));
    }
}

async fn reader_task(mut r: Reader, shared: Arc<Shared>) {
    let err = match read_replies(&mut r, &shared).await {
        Ok(()) => Error::NbdClosed {
            reason: Some("server closed the connection".into()),
        },
        Err(e) => e,
    };
    if matches!(err, Error::NbdProtocol { .. }) {
        warn!(error = %err, "NBD connection failed");
    } else {
        debug!(error = %err, "NBD reader finished");
    }
    fail_all(&shared, &err.to_string(), Some(&err));
}

/// Reads replies until EOF (Ok) or a fatal error.
async fn read_replies(r: &mut Reader, shared: &Shared) -> Result<()> {
    let mut magic = [0u8; 4];
    loop {
        match r.read_exact(&mut magic).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(Error::io("read NBD reply", e)),
        }
        match proto::parse_reply_magic(&magic)? {
            proto::ReplyKind::Simple => {
                let mut b = [0u8; proto::SIMPLE_REPLY_REST];
                read_exact(r, &mut b, "simple reply").await?;
                let sr = proto::parse_simple_reply(&b)?;
                let slot = take_slot(shared, sr.cookie)?;
                if sr.errno == 0 && slot.req.kind.simple_success_allowed() {
                    let _ = slot.tx.send(Ok(Outcome::Done));
                    continue;
                }
                if sr.errno == 0 {
                    // Structured replies were negotiated: READ and BLOCK_STATUS must use them.
                    let e = Error::nbd(
                        "simple reply",
                        format!("successful simple reply to {}", slot.req.command_name()),
                    );
                    return Err(fail_slot(slot, e));
                }
                let e = Error::NbdServer {
                    command: slot.req.command_name(),
                    offset: slot.req.offset,
                    errno: sr.errno,
                    message: String::new(),
                };
                let _ = slot.tx.send(Err(e));
            }
            proto::ReplyKind::Structured => {
                let mut b = [0u8; proto::CHUNK_HEADER_REST];
                read_exact(r, &mut b, "structured reply header").await?;
                let h = proto::parse_chunk_header(&b)?;
                let req = {
                    let p = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
                    p.slots.get(&h.cookie).map(|s| s.req)
                };
                let req = req.ok_or_else(|| {
                    Error::nbd("structured reply", format!("unknown cookie {}", h.cookie))
                })?;
                proto::max_chunk_payload(&h, &req)?;
                if h.chunk_type == proto::REPLY_TYPE_OFFSET_DATA && req.kind == RequestKind::Read {
                    read_data_in_place(r, shared, &h, &req).await?;
                    continue;
                }
                let mut payload = vec![0u8; h.len as usize];
                read_exact(r, &mut payload, "structured reply payload").await?;
                let chunk = proto::parse_chunk(&h, &payload, &req, &shared.ids)?;
                apply_chunk(shared, &h, chunk)?;
            }
        }
    }
}

/// The data of an OFFSET_DATA chunk, read from the socket straight into its request's
/// buffer: the data path of every backup, which would otherwise copy each byte twice more
/// (payload, then request buffer). The offset is checked against the request before a byte of
/// data is read.
async fn read_data_in_place(
    r: &mut Reader,
    shared: &Shared,
    h: &proto::ChunkHeader,
    req: &Request,
) -> Result<()> {
    if h.len < 9 {
        return Err(Error::nbd("NBD_REPLY_TYPE_OFFSET_DATA", "no data"));
    }
    let mut offset = [0u8; 8];
    read_exact(r, &mut offset, "structured reply payload").await?;
    let offset = u64::from_be_bytes(offset);
    let len = proto::check_offset_data(h, req, offset)?;
    let unknown = || Error::nbd("structured reply", format!("unknown cookie {}", h.cookie));
    let (mut buf, rel) = {
        let mut p = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
        match p.slots.get_mut(&h.cookie).map(|s| &mut s.asm) {
            Some(Assembler::Read(a)) => a.lend_for(offset, len)?,
            Some(_) => {
                return Err(Error::nbd(
                    "structured reply",
                    "offset data in a non-read reply",
                ))
            }
            None => return Err(unknown()),
        }
    };
    let read = read_exact(
        r,
        &mut buf[rel..rel + len as usize],
        "structured reply payload",
    )
    .await;
    {
        let mut p = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
        // The slot is gone only if the connection was closed meanwhile; the data goes with it.
        if let Some(Slot {
            asm: Assembler::Read(a),
            ..
        }) = p.slots.get_mut(&h.cookie)
        {
            a.give_back(buf);
        }
    }
    read?;
    apply_chunk(shared, h, Chunk::None)
}

async fn read_exact(r: &mut Reader, b: &mut [u8], what: &'static str) -> Result<()> {
    r.read_exact(b).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::nbd(what, "connection closed mid-reply")
        } else {
            Error::io(format!("read NBD {what}"), e)
        }
    })?;
    Ok(())
}

fn take_slot(shared: &Shared, cookie: u64) -> Result<Slot> {
    let mut p = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
    p.slots
        .remove(&cookie)
        .ok_or_else(|| Error::nbd("reply", format!("unknown cookie {cookie}")))
}

/// Gives the waiter of an already removed slot the connection-fatal error `e`; returns `e`.
fn fail_slot(slot: Slot, e: Error) -> Error {
    let _ = slot.tx.send(Err(duplicate(&e)));
    e
}

/// A copy of a protocol error for another waiter (other errors become `NbdClosed`).
fn duplicate(e: &Error) -> Error {
    match e {
        Error::NbdProtocol { what, detail } => Error::NbdProtocol {
            what,
            detail: detail.clone(),
        },
        other => Error::NbdClosed {
            reason: Some(other.to_string()),
        },
    }
}

fn server_error(req: &Request, e: ServerError) -> Error {
    Error::NbdServer {
        command: req.command_name(),
        offset: e.offset.unwrap_or(req.offset),
        errno: e.errno,
        message: e.message,
    }
}

fn apply_chunk(shared: &Shared, h: &proto::ChunkHeader, chunk: Chunk<'_>) -> Result<()> {
    let mut p = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
    let slot = p
        .slots
        .get_mut(&h.cookie)
        .ok_or_else(|| Error::nbd("structured reply", format!("unknown cookie {}", h.cookie)))?;
    match &mut slot.asm {
        Assembler::Read(a) => a.apply(&chunk)?,
        Assembler::Status(a) => a.apply(chunk)?,
        Assembler::Ack(a) => a.apply(chunk)?,
    }
    if !h.done() {
        return Ok(());
    }
    let slot = p.slots.remove(&h.cookie).expect("slot present");
    drop(p);
    let req = slot.req;
    let finished = match slot.asm {
        Assembler::Read(a) => a.finish().map(|r| r.map(Outcome::Read)),
        Assembler::Status(a) => a.finish().map(|r| r.map(Outcome::Status)),
        Assembler::Ack(a) => a.finish().map(|r| r.map(|()| Outcome::Done)),
    };
    let result = match finished {
        Ok(r) => r,
        Err(e) => {
            let dup = duplicate(&e);
            let _ = slot.tx.send(Err(dup));
            return Err(e);
        }
    };
    let _ = slot.tx.send(result.map_err(|e| server_error(&req, e)));
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Handshake
