//! The QMP connection: greeting, capabilities negotiation, commands matched by id, events.
//!
//! A reader task owns the receiving half and routes every line: replies to the waiting
//! command (by `id`), events to a broadcast channel. Lines are length-bounded; malformed JSON
//! closes the connection with [`Error::QmpProtocol`]. Unknown events and unknown reply fields
//! are passed through untouched.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, trace, warn};

use super::fdpass;
use crate::error::{Error, Result};

/// Tunables of a QMP connection.
#[derive(Debug, Clone)]
pub struct QmpOptions {
    /// How long to wait for the greeting. A monitor held by another client accepts the
    /// connection but stays silent; after this we report [`Error::QmpBusy`].
    pub greeting_timeout: Duration,
    /// Default limit for one command (see [`QmpClient::execute_with_timeout`]).
    pub command_timeout: Duration,
    /// Longest line accepted from QEMU.
    pub max_line: usize,
    /// Events buffered per subscriber before the oldest are dropped.
    pub event_capacity: usize,
}

impl Default for QmpOptions {
    fn default() -> Self {
        QmpOptions {
            greeting_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(30),
            max_line: 16 * 1024 * 1024,
            event_capacity: 4096,
        }
    }
}

/// QEMU version and capabilities from the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpGreeting {
    /// `(major, minor, micro)`.
    pub version: (u64, u64, u64),
    pub package: String,
    pub capabilities: Vec<String>,
}

/// An asynchronous event from QEMU. Unknown event names are delivered like any other.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub event: String,
    /// `data` member, `Value::Null` if absent.
    pub data: Value,
    /// `(seconds, microseconds)` from QEMU's `timestamp`.
    pub timestamp: (i64, i64),
}

struct PendingCommand {
    command: String,
    tx: oneshot::Sender<Result<Value>>,
}

struct Shared {
    pending: Mutex<HashMap<u64, PendingCommand>>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<Option<String>>,
}

/// A QMP connection.
pub struct QmpClient {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    reader: Mutex<Option<JoinHandle<()>>>,
    next_id: AtomicU64,
    greeting: QmpGreeting,
    path: PathBuf,
    opts: QmpOptions,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("path", &self.path)
            .field("greeting", &self.greeting)
            .finish()
    }
}

impl QmpClient {
    /// Connects to a QMP unix socket, reads the greeting and enters command mode.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self> {
        Self::connect_with(path, QmpOptions::default()).await
    }

    /// [`connect`](Self::connect) with explicit options.
    pub async fn connect_with(path: impl AsRef<Path>, opts: QmpOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        // A monitor's listen backlog is tiny, and connections queued behind the current client
        // (probes of who listens, a guard waiting its turn) fill it: a connect then fails with
        // EAGAIN until QEMU accepts the next one. Retry that within the greeting timeout.
        let started = std::time::Instant::now();
        let stream = loop {
            match UnixStream::connect(&path).await {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && started.elapsed() < opts.greeting_timeout =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => {
                    return Err(Error::io(
                        format!("connect to QMP socket {}", path.display()),
                        e,
                    ))
                }
            }
        };
        let (r, w) = stream.into_split();
        let mut r = BufReader::new(r);
        let mut line = Vec::new();
        let got = tokio::time::timeout(
            opts.greeting_timeout,
            read_line(&mut r, &mut line, opts.max_line),
        )
        .await
        .map_err(|_| {
            let holder = super::holder::monitor_holder(&path);
            Error::QmpBusy {
                advice: super::holder::advice(&path, holder.as_ref()),
                holder: holder.map(|h| format!("{}, pid {}", h.name, h.pid)),
                path: path.clone(),
                timeout: opts.greeting_timeout,
            }
        })??;
        if !got {
            return Err(Error::QmpClosed {
                reason: Some("closed before the greeting".into()),
            });
        }
        let greeting = parse_greeting(&line)?;
        debug!(path = %path.display(), version = ?greeting.version, "QMP greeting");

        let (events, _) = broadcast::channel(opts.event_capacity.max(16));
        let (closed, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            events,
            closed,
        });
        let reader = tokio::spawn(reader_task(r, shared.clone(), opts.max_line));
        let client = QmpClient {
            shared,
            writer: tokio::sync::Mutex::new(w),
            reader: Mutex::new(Some(reader)),
            next_id: AtomicU64::new(1),
            greeting,
            path,
            opts,
        };
        client.execute("qmp_capabilities", Value::Null).await?;
        Ok(client)
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &QmpGreeting {
        &self.greeting
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `command` with `args` (`Value::Null` or an object) and returns its `return` value.
    pub async fn execute(&self, command: &str, args: Value) -> Result<Value> {
        self.execute_with_timeout(command, args, self.opts.command_timeout)
            .await
    }

    /// [`execute`](Self::execute) with an explicit timeout.
    pub async fn execute_with_timeout(
        &self,
        command: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value> {
        self.run(command, args, None, timeout).await
    }

    /// Runs `command`, passing `fd` with SCM_RIGHTS alongside it (for `getfd`, `add-fd`).
    pub async fn execute_with_fd(
        &self,
        command: &str,
        args: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value> {
        self.run(
            command,
            args,
            Some(fd.as_raw_fd()),
            self.opts.command_timeout,
        )
        .await
    }

    /// Runs `command` and converts its return value.
    pub async fn execute_as<T: for<'de> Deserialize<'de>>(
        &self,
        command: &str,
        args: Value,
    ) -> Result<T> {
        let v = self.execute(command, args).await?;
        serde_json::from_value(v)
            .map_err(|e| Error::QmpProtocol(format!("unexpected return value of {command}: {e}")))
    }

    async fn run(
        &self,
        command: &str,
        args: Value,
        fd: Option<RawFd>,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        match args {
            Value::Null => {}
            Value::Object(m) if m.is_empty() => {}
            a @ Value::Object(_) => msg["arguments"] = a,
            other => {
                return Err(Error::QmpProtocol(format!(
                    "arguments of {command} must be an object, not {other}"
                )))
            }
        }
        let mut line = serde_json::to_vec(&msg).expect("JSON value serializes");
        line.push(b'\n');

        let (tx, rx) = oneshot::channel();
        {
            // Check `closed` under the pending lock: the reader sets it before draining.
            let mut p = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let closed = self.shared.closed.borrow().clone();
            if let Some(reason) = closed {
                return Err(Error::QmpClosed {
                    reason: Some(reason),
                });
            }
            p.insert(
                id,
                PendingCommand {
                    command: command.to_owned(),
                    tx,
                },
            );
        }
        trace!(command, id, "QMP execute");
        let started = tokio::time::Instant::now();
        let written = std::sync::atomic::AtomicBool::new(false);
        let res = tokio::time::timeout(timeout, async {
            let sent = {
                let mut w = self.writer.lock().await;
                match fd {
                    Some(fd) => fdpass::write_all_with_fd(&w, &line, fd).await,
                    None => w.write_all(&line).await,
                }
            };
            sent.map_err(|e| Error::io(format!("send QMP command {command}"), e))?;
            written.store(true, Ordering::Relaxed);
            match rx.await {
                Ok(r) => r,
                Err(_) => Err(Error::QmpClosed {
                    reason: self.shared.closed.borrow().clone(),
                }),
            }
        })
        .await;
        match res {
            Ok(r) => {
                debug!(command, id, elapsed = ?started.elapsed(), ok = r.is_ok(), "QMP command");
                r
            }
            Err(_) => {
                self.shared
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                if !written.load(Ordering::Relaxed) {
                    // A partly written command would corrupt every later one: give up the
                    // connection.
                    self.shared
                        .closed
                        .send_replace(Some(format!("timed out sending {command}")));
                    self.stop_reader();
                }
                Err(Error::Timeout {
                    what: format!("QMP command {command}"),
                    timeout,
                })
            }
        }
    }

    /// Subscribes to events from now on.
    pub fn events(&self) -> EventStream {
        EventStream {
            rx: self.shared.events.subscribe(),
            closed: self.shared.closed.subscribe(),
        }
    }

    /// Waits for the next event called `name` that satisfies `pred`, arriving after this
    /// call. To catch an event caused by a command, subscribe with [`events`](Self::events)
    /// *before* sending the command and use [`EventStream::wait_for`].
    pub async fn wait_event(
        &self,
        name: &str,
        pred: impl Fn(&QmpEvent) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent> {
        self.events().wait_for(name, pred, timeout).await
    }

    /// Closes the connection (both directions; the socket fd is released).
    pub async fn close(self) {
        {
            let mut w = self.writer.lock().await;
            let _ = w.shutdown().await;
        }
        self.stop_reader();
    }

    fn stop_reader(&self) {
        if let Some(h) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.stop_reader();
    }
}

/// A subscription to QMP events. Events missed because the subscriber lagged are logged and
/// skipped.
pub struct EventStream {
    rx: broadcast::Receiver<QmpEvent>,
    closed: watch::Receiver<Option<String>>,
}

impl EventStream {
    /// The next event; [`Error::QmpClosed`] once the connection is gone and drained.
    pub async fn next(&mut self) -> Result<QmpEvent> {
        loop {
            match self.rx.try_recv() {
                Ok(ev) => return Ok(ev),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    warn!(missed = n, "QMP event subscriber lagged");
                    continue;
                }
                Err(broadcast::error::TryRecvError::Closed) => return Err(self.closed_err()),
                Err(broadcast::error::TryRecvError::Empty) => {}
            }
            if self.closed.borrow().is_some() {
                return Err(self.closed_err());
            }
            tokio::select! {
                biased;
                r = self.rx.recv() => match r {
                    Ok(ev) => return Ok(ev),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "QMP event subscriber lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(self.closed_err()),
                },
                r = self.closed.changed() => {
                    if r.is_err() {
                        return Err(self.closed_err());
                    }
                }
            }
        }
    }

    /// Waits for an event called `name` that satisfies `pred`; other events are skipped.
    pub async fn wait_for(
        &mut self,
        name: &str,
        pred: impl Fn(&QmpEvent) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent> {
        tokio::time::timeout(timeout, async {
            loop {
                let ev = self.next().await?;
                if ev.event == name && pred(&ev) {
                    return Ok(ev);
                }
                trace!(event = %ev.event, "QMP event skipped");
            }
        })
        .await
        .map_err(|_| Error::Timeout {
            what: format!("QMP event {name}"),
            timeout,
        })?
    }

    fn closed_err(&self) -> Error {
        Error::QmpClosed {
            reason: self.closed.borrow().clone(),
        }
    }
}

/// Reads one `\n`-terminated line into `buf` (without the newline), refusing lines longer
/// than `max`. Returns `false` at a clean EOF.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<bool> {
    buf.clear();
    loop {
        let avail = r
            .fill_buf()
            .await
            .map_err(|e| Error::io("read from QMP socket", e))?;
        if avail.is_empty() {
            if buf.is_empty() {
                return Ok(false);
            }
            return Err(Error::QmpProtocol("connection closed mid-line".into()));
        }
        let (take, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (avail.len(), false),
        };
        if buf.len() + take > max {
            return Err(Error::QmpProtocol(format!("line longer than {max} bytes")));
        }
        buf.extend_from_slice(&avail[..take]);
        r.consume(take + usize::from(done));
        if done {
            return Ok(true);
        }
    }
}

fn parse_greeting(line: &[u8]) -> Result<QmpGreeting> {
    let v: Value = serde_json::from_slice(line)
        .map_err(|e| Error::QmpProtocol(format!("greeting is not JSON: {e}")))?;
    let qmp = v
        .get("QMP")
        .ok_or_else(|| Error::QmpProtocol(format!("not a QMP greeting: {}", truncate(&v))))?;
    let ver = &qmp["version"]["qemu"];
    let num = |k: &str| ver.get(k).and_then(Value::as_u64).unwrap_or(0);
    Ok(QmpGreeting {
        version: (num("major"), num("minor"), num("micro")),
        package: qmp["version"]["package"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        capabilities: qmp["capabilities"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn truncate(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

async fn reader_task(mut r: BufReader<OwnedReadHalf>, shared: Arc<Shared>, max: usize) {
    let mut line = Vec::new();
    let reason = loop {
        match read_line(&mut r, &mut line, max).await {
            Ok(true) => {}
            Ok(false) => break "QEMU closed the connection".to_owned(),
            Err(e) => break e.to_string(),
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Err(e) = route(&line, &shared) {
            warn!(error = %e, "QMP connection failed");
            break e.to_string();
        }
    };
    debug!(%reason, "QMP reader finished");
    shared.closed.send_replace(Some(reason.clone()));
    let pending: Vec<PendingCommand> = shared
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .map(|(_, p)| p)
        .collect();
    for p in pending {
        let err = if reason.starts_with("QMP protocol violation") {
            Error::QmpProtocol(reason.clone())
        } else {
            Error::QmpClosed {
                reason: Some(reason.clone()),
            }
        };
        let _ = p.tx.send(Err(err));
    }
}

/// Routes one message: a reply to its command, an event to subscribers.
fn route(line: &[u8], shared: &Shared) -> Result<()> {
    let v: Value = serde_json::from_slice(line)
        .map_err(|e| Error::QmpProtocol(format!("malformed JSON from QEMU: {e}")))?;
    let Value::Object(mut m) = v else {
        return Err(Error::QmpProtocol("message is not a JSON object".into()));
    };
    if let Some(name) = m.get("event").and_then(Value::as_str).map(str::to_owned) {
        let ts = m.get("timestamp");
        let field = |k: &str| {
            ts.and_then(|t| t.get(k))
                .and_then(Value::as_i64)
                .unwrap_or(0)
        };
        let ev = QmpEvent {
            event: name,
            timestamp: (field("seconds"), field("microseconds")),
            data: m.remove("data").unwrap_or(Value::Null),
        };
        trace!(event = %ev.event, "QMP event");
        let _ = shared.events.send(ev); // no subscribers is fine
        return Ok(());
    }
    let id = m.get("id").and_then(Value::as_u64);
    let result = if let Some(ret) = m.remove("return") {
        Ok(ret)
    } else if let Some(err) = m.get("error") {
        Err((
            err.get("class")
                .and_then(Value::as_str)
                .unwrap_or("(no class)")
                .to_owned(),
            err.get("desc")
                .and_then(Value::as_str)
                .unwrap_or("(no description)")
                .to_owned(),
        ))
    } else {
        let text = truncate(&Value::Object(m));
        warn!(message = %text, "unknown QMP message ignored");
        return Ok(());
    };
    let Some(id) = id else {
        warn!(?result, "QMP reply without id ignored");
        return Ok(());
    };
    let p = shared
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    match p {
        Some(p) => {
            let r = result.map_err(|(class, desc)| Error::QmpCommand {
                command: p.command,
                class,
                desc,
            });
            let _ = p.tx.send(r);
        }
        None => debug!(id, "QMP reply for a command nobody waits for (timed out?)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn line_reader_bounds_and_eof() {
        let mut r = BufReader::new(&b"abc\nlonger line\npartial"[..]);
        let mut buf = Vec::new();
        assert!(read_line(&mut r, &mut buf, 100).await.unwrap());
        assert_eq!(buf, b"abc");
        assert!(read_line(&mut r, &mut buf, 5).await.is_err());
        let mut r = BufReader::new(&b""[..]);
        assert!(!read_line(&mut r, &mut buf, 5).await.unwrap());
        let mut r = BufReader::new(&b"partial"[..]);
        assert!(read_line(&mut r, &mut buf, 50).await.is_err());
    }

    #[test]
    fn greeting_parse() {
        let g = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-1~bpo12+1"}, "capabilities": ["oob"]}}"#;
        let g = parse_greeting(g).unwrap();
        assert_eq!(g.version, (10, 0, 2));
        assert_eq!(g.capabilities, vec!["oob"]);
        assert!(parse_greeting(b"{\"x\":1}").is_err());
        assert!(parse_greeting(b"{not json").is_err());
    }

    #[test]
    fn route_rejects_garbage_and_tolerates_unknown() {
        let (events, mut rx) = broadcast::channel(4);
        let (closed, _) = watch::channel(None);
        let shared = Shared {
            pending: Mutex::new(HashMap::new()),
            events,
            closed,
        };
        assert!(route(b"{\"return\": ", &shared).is_err());
        assert!(route(b"[1,2]", &shared).is_err());
        assert!(route(b"{\"something\": 1}", &shared).is_ok());
        assert!(route(b"{\"return\": {}, \"id\": 99}", &shared).is_ok());
        route(
            b"{\"event\": \"NEW_EVENT_FROM_THE_FUTURE\", \"data\": {\"x\": [1]}, \"timestamp\": {\"seconds\": 5, \"microseconds\": 6}}",
            &shared,
        )
        .unwrap();
        let ev = rx.try_recv().unwrap();
        assert_eq!(ev.event, "NEW_EVENT_FROM_THE_FUTURE");
        assert_eq!(ev.timestamp, (5, 6));
    }
}
