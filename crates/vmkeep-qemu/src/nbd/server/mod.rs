//! A read-only NBD server for any [`ServedDisk`]: QEMU, qemu-img, nbdcopy, nbdinfo or the
//! kernel's nbd client read a restore point in place, without restoring it first.
//!
//! ```no_run
//! # fn demo(disk: std::sync::Arc<dyn vmkeep_io::ServedDisk>) -> vmkeep_qemu::Result<()> {
//! use std::sync::atomic::AtomicBool;
//! use vmkeep_qemu::nbd::{Listen, NbdServer, ServeOptions};
//! let opts = ServeOptions { export_name: "disk".into(), ..Default::default() };
//! let server = NbdServer::bind(&Listen::Unix("/run/vmkeep/disk.sock".into()), disk, opts)?;
//! println!("qemu-img info '{}'", server.uri());
//! let stop = AtomicBool::new(false); // set from a signal handler
//! server.run(&stop)?;
//! # Ok(()) }
//! ```
//!
//! # Design
//! Plain threads and blocking sockets; no async runtime. [`NbdServer::run`] polls the listener
//! (100 ms at a time, to notice `stop`) and gives each connection its own thread, which:
//! 1. runs the handshake (`options.rs`) under one deadline, `handshake_timeout`, for the
//!    whole exchange, so a silent or trickling client cannot hold the thread;
//! 2. then reads requests (`transmission.rs`) with no timeout (an idle client is legitimate)
//!    and passes them through a bounded channel to `workers_per_connection` worker threads.
//!    A worker builds one whole reply (`reply.rs`) and writes it under the connection's write
//!    lock, so replies of concurrent requests never interleave on the wire.
//!
//! A client that disconnects mid-reply ends only its own connection, quietly; nothing a client
//! sends can panic the server or make it allocate beyond the bounds below.
//!
//! # Bounds
//! | what | bound |
//! |---|---|
//! | connections | `max_connections`; more are closed at once (logged) |
//! | handshake | `handshake_timeout` in all; 1024 options; option data 64 KiB (up to 1 MiB is read and dropped with `ERR_TOO_BIG`, more closes the connection) |
//! | one request | `max_request` bytes (advertised as the maximum block size): a larger READ is EOVERFLOW, CACHE EINVAL, WRITE closes the connection |
//! | memory per connection | about `workers_per_connection × max_request` (replies being built) |
//! | one BLOCK_STATUS reply | 65,536 descriptors; the client asks again for the rest |
//!
//! # What it serves and refuses
//! Fixed newstyle only (other clients are closed), structured replies, `base:allocation`
//! (zero extents are HOLE|ZERO, data 0), READ (zero extents sent as holes unless DF), FLUSH
//! (nothing to flush), CACHE (reads the range and drops it, warming the disk's own cache),
//! multi-conn. Refused: writes, TRIM and WRITE_ZEROES (EPERM), TLS (`ERR_POLICY`), extended
//! headers and unknown options (`ERR_UNSUP`), other meta contexts (not granted). The export
//! answers to its name and to the empty "default export" name.

mod conn;
mod options;
mod reply;
mod transmission;

#[cfg(test)]
mod tests;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use vmkeep_io::ServedDisk;

use self::conn::{Conn, Listener};
use crate::error::{Error, Result};

/// How often [`NbdServer::run`] looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);
/// Bounds on [`ServeOptions::max_request`]: the protocol requires unfragmented reads of
/// 64 KiB; the upper bound keeps `workers × max_request` sane.
const MIN_REQUEST: u32 = 64 * 1024;
const MAX_REQUEST: u32 = 1 << 30;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path, which must not exist yet; removed when the server stops.
    Unix(PathBuf),
    /// A TCP address; port 0 picks a free port ([`NbdServer::address`] tells which).
    Tcp(SocketAddr),
}

/// Tunables of an [`NbdServer`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The export's name (clients may also use the empty name). Default: empty.
    pub export_name: String,
    /// Shown to clients that ask (`nbdinfo`, NBD_OPT_LIST).
    pub description: Option<String>,
    /// Connections served at once; more are closed. Default 16.
    pub max_connections: usize,
    /// Requests of one connection handled at once. Default 4.
    pub workers_per_connection: usize,
    /// Largest READ/CACHE length and WRITE payload accepted. Default 32 MiB.
    pub max_request: u32,
    /// Limit for a client's whole handshake. Default 30 s.
    pub handshake_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            export_name: String::new(),
            description: None,
            max_connections: 16,
            workers_per_connection: 4,
            max_request: 32 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// What every connection needs to know about the export; fixed at bind.
struct Export {
    name: String,
    description: Option<String>,
    size: u64,
    preferred_block: u32,
    max_request: u32,
    workers: usize,
    handshake_timeout: Duration,
}

impl Export {
    /// The configured name and the default export ("") both open this export.
    fn accepts(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// A bound NBD server for one [`ServedDisk`]; [`run`](NbdServer::run) serves it.
pub struct NbdServer {
    listener: Listener,
    disk: Arc<dyn ServedDisk>,
    export: Arc<Export>,
    max_connections: usize,
    /// The Unix socket path this server created (and removes once).
    socket: Option<PathBuf>,
    socket_removed: AtomicBool,
    address: String,
    active: Arc<AtomicUsize>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("address", &self.address)
            .field("export", &self.export.name)
            .field("size", &self.export.size)
            .finish()
    }
}

impl NbdServer {
    /// Binds the listener. A Unix socket path must not exist yet
    /// ([`Error::NbdSocketExists`]); TCP port 0 picks a free port.
    pub fn bind(
        listen: &Listen,
        disk: Arc<dyn ServedDisk>,
        opts: ServeOptions,
    ) -> Result<NbdServer> {
        check_options(&opts)?;
        let (listener, socket, address) = match listen {
            Listen::Unix(path) => {
                if path.symlink_metadata().is_ok() {
                    return Err(Error::NbdSocketExists { path: path.clone() });
                }
                let l = UnixListener::bind(path)
                    .map_err(|e| Error::io(format!("bind NBD socket {}", path.display()), e))?;
                (
                    Listener::Unix(l),
                    Some(path.clone()),
                    path.display().to_string(),
                )
            }
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr)
                    .map_err(|e| Error::io(format!("bind NBD server to {addr}"), e))?;
                let local = l
                    .local_addr()
                    .map_err(|e| Error::io("address of the NBD listener", e))?;
                (Listener::Tcp(l), None, local.to_string())
            }
        };
        let server = NbdServer {
            listener,
            disk: disk.clone(),
            export: Arc::new(Export {
                preferred_block: preferred_block(disk.block_size(), opts.max_request),
                size: disk.size(),
                name: opts.export_name,
                description: opts.description,
                max_request: opts.max_request,
                workers: opts.workers_per_connection,
                handshake_timeout: opts.handshake_timeout,
            }),
            max_connections: opts.max_connections,
            socket,
            socket_removed: AtomicBool::new(false),
            address,
            active: Arc::new(AtomicUsize::new(0)),
            next_id: AtomicU64::new(1),
        };
        // Accepting never blocks, so `run` notices `stop` between polls.
        match &server.listener {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
        .map_err(|e| Error::io("set the NBD listener non-blocking", e))?;
        Ok(server)
    }

    /// Where clients connect: the Unix socket path, or the "host:port" actually bound.
    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// An NBD URI for the export: `nbd+unix:///NAME?socket=PATH` or `nbd://HOST:PORT/NAME`.
    pub fn uri(&self) -> String {
        let name = uri_escape(&self.export.name);
        match &self.socket {
            Some(_) => format!("nbd+unix:///{name}?socket={}", uri_escape(&self.address)),
            None => format!("nbd://{}/{name}", self.address),
        }
    }

    /// Accepts and serves connections, each on its own thread, until `stop` is set (checked
    /// every 100 ms); then stops accepting and removes the Unix socket file. Connections
    /// already open are not waited for: they end with their clients (or with the process).
    pub fn run(&self, stop: &AtomicBool) -> Result<()> {
        info!(address = %self.address, export = %self.export.name, size = self.export.size, "NBD server listening");
        let result = self.accept_until(stop);
        self.remove_socket();
        result
    }

    fn accept_until(&self, stop: &AtomicBool) -> Result<()> {
        while !stop.load(Ordering::Relaxed) {
            let ready = self
                .listener
                .wait_readable(STOP_POLL)
                .map_err(|e| Error::io("wait for NBD connections", e))?;
            if !ready {
                continue;
            }
            loop {
                match self.listener.accept() {
                    Ok((conn, peer)) => self.start(conn, peer),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // Out of file descriptors, or a connection reset before accept:
                        // nothing to do for it, and no reason to stop serving the others.
                        warn!(error = %e, "NBD accept failed");
                        std::thread::sleep(STOP_POLL);
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Serves one accepted connection on its own thread, if the limit allows.
    fn start(&self, conn: Conn, peer: String) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            self.active.fetch_sub(1, Ordering::AcqRel);
            warn!(conn = id, %peer, max = self.max_connections, "NBD connection refused: too many connections");
            conn.shutdown();
            return;
        }
        let slot = Slot(self.active.clone());
        let (disk, export) = (self.disk.clone(), self.export.clone());
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                let _slot = slot;
                transmission::serve_connection(conn, &peer, disk, export, id);
            });
        if let Err(e) = spawned {
            warn!(conn = id, error = %e, "cannot start an NBD connection thread");
        }
    }

    fn remove_socket(&self) {
        if let Some(path) = &self.socket {
            if !self.socket_removed.swap(true, Ordering::AcqRel) {
                if let Err(e) = std::fs::remove_file(path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        warn!(path = %path.display(), error = %e, "cannot remove the NBD socket");
                    }
                }
            }
        }
    }
}

impl Drop for NbdServer {
    /// A server bound but never run still cleans up its socket file.
    fn drop(&mut self) {
        self.remove_socket();
    }
}

/// One counted connection; frees its place when the connection thread ends (even by panic).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn check_options(o: &ServeOptions) -> Result<()> {
    let bad = |m: String| Err(Error::NbdServeOptions(m));
    if o.export_name.len() > 4096 || o.export_name.contains('\0') {
        return bad("the export name must be at most 4096 bytes, without NUL".into());
    }
    if o.description.as_ref().is_some_and(|d| d.len() > 4096) {
        return bad("the description must be at most 4096 bytes".into());
    }
    if o.max_connections == 0 || o.workers_per_connection == 0 {
        return bad("max_connections and workers_per_connection must be at least 1".into());
    }
    if !(MIN_REQUEST..=MAX_REQUEST).contains(&o.max_request) {
        return bad(format!(
            "max_request must be between {MIN_REQUEST} and {MAX_REQUEST} bytes"
        ));
    }
    if o.handshake_timeout.is_zero() {
        return bad("handshake_timeout must not be zero".into());
    }
    Ok(())
}

/// The preferred block size advertised: the disk's block size as a power of two, at least
/// 512 and at most `max_request` (the protocol wants a power of two; tools want >= 512).
fn preferred_block(block_size: u32, max_request: u32) -> u32 {
    let largest = 1u32 << (31 - max_request.leading_zeros());
    block_size
        .max(512)
        .checked_next_power_of_two()
        .unwrap_or(largest)
        .min(largest)
}

/// Percent-encodes everything but unreserved characters and '/', for NBD URIs.
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
