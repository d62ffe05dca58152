//! A small HTTPS server speaking just enough of docs/PROTOCOL.md §3 for `HttpStore`'s tests:
//! one repository `r` over a map, one token, and faults to inject (statuses, connections
//! dropped mid-reply, replies larger than asked for). HTTP/1.1 with keep-alive, by hand.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub const TOKEN: &str =
    "vmk_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000";
pub const REPO: &str = "r";

/// What the server does to a request instead of answering it.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Answer this status with a JSON error.
    Status(u16),
    /// Send a 200 head promising 1000 bytes, 10 of them, and close the connection.
    DropMidReply,
    /// Ignore `?max` and stream this many bytes, chunked (no length announced).
    Flood(u64),
    /// Ignore `?max` and announce this Content-Length (then send nothing and close).
    HugeLength(u64),
}

#[derive(Default)]
pub struct State {
    /// "kind/name" -> (bytes, modified ms).
    pub objects: Mutex<BTreeMap<String, (Vec<u8>, i64)>>,
    /// (location, size, modified ms).
    pub temporaries: Mutex<Vec<(String, u64, i64)>>,
    /// Faults for the next requests, in order.
    pub faults: Mutex<VecDeque<Fault>>,
    /// A fault for every request once `faults` is empty.
    pub always: Mutex<Option<Fault>>,
    /// Requests parsed (faulted ones included).
    pub requests: AtomicUsize,
    /// Body bytes written by `Fault::Flood`.
    pub flooded: AtomicU64,
    /// "METHOD target" of every request, with the headers the tests look at.
    pub log: Mutex<Vec<String>>,
    pub flushes: AtomicUsize,
}

pub struct Server {
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub state: Arc<State>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(false)
    }

    /// `tls12_only`: offer TLS 1.2 only (the client's TLS 1.2 signature check).
    pub fn start_with(tls12_only: bool) -> Server {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let der: CertificateDer<'static> = ck.cert.der().clone();
        let fingerprint = hex::encode(ring::digest::digest(&ring::digest::SHA256, &der));
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                let (config, st) = (config.clone(), st.clone());
                std::thread::spawn(move || serve_connection(tcp, config, st));
            }
        });
        Server {
            addr,
            fingerprint,
            state,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}/{REPO}", self.addr)
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn fault_next(&self, faults: &[Fault]) {
        self.state
            .faults
            .lock()
            .unwrap()
            .extend(faults.iter().copied());
    }
}

type Conn = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    fn json(status: u16, value: serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
        }
    }

    fn error(status: u16, code: &str, message: &str) -> Reply {
        Reply::json(
            status,
            serde_json::json!({"error": code, "message": message}),
        )
    }

    fn header(mut self, name: &str, value: impl ToString) -> Reply {
        self.headers.push((name.into(), value.to_string()));
        self
    }
}

fn serve_connection(tcp: TcpStream, config: Arc<rustls::ServerConfig>, state: Arc<State>) {
    let conn = rustls::ServerConnection::new(config).unwrap();
    let mut stream = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    while let Some(req) = read_request(&mut stream) {
        state.requests.fetch_add(1, Ordering::SeqCst);
        state.log.lock().unwrap().push(format!(
            "{} {} auth={} range={} inm={}",
            req.method,
            req.path,
            req.headers.contains_key("authorization"),
            req.headers.get("range").map_or("-", |s| s.as_str()),
            req.headers.get("if-none-match").map_or("-", |s| s.as_str()),
        ));
        let fault = {
            let next = state.faults.lock().unwrap().pop_front();
            next.or(*state.always.lock().unwrap())
        };
        let out = stream.get_mut();
        let reply = match fault {
            None => handle(&state, &req),
            Some(Fault::Status(s)) => Reply::error(s, "injected", &format!("injected {s}")),
            Some(Fault::DropMidReply) => {
                let _ = out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789");
                let _ = out.flush();
                return;
            }
            Some(Fault::HugeLength(n)) => {
                let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
                let _ = out.flush();
                return;
            }
            Some(Fault::Flood(n)) => {
                flood(out, n, &state);
                return;
            }
        };
        if write_reply(out, &req, reply).is_err() {
            return;
        }
    }
}

fn flood(out: &mut Conn, total: u64, state: &State) {
    if out
        .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        .is_err()
    {
        return;
    }
    let chunk = vec![7u8; 64 << 10];
    let mut sent = 0;
    while sent < total {
        let head = format!("{:x}\r\n", chunk.len());
        let ok = out.write_all(head.as_bytes()).is_ok()
            && out.write_all(&chunk).is_ok()
            && out.write_all(b"\r\n").is_ok()
            && out.flush().is_ok();
        if !ok {
            return;
        }
        sent += chunk.len() as u64;
        state.flooded.store(sent, Ordering::SeqCst);
    }
    let _ = out.write_all(b"0\r\n\r\n");
    let _ = out.flush();
}

fn read_request(stream: &mut BufReader<Conn>) -> Option<Request> {
    let mut line = String::new();
    if stream.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if stream.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    let len: usize = headers
        .get("content-length")
        .map_or(0, |l| l.parse().unwrap());
    let mut body = vec![0; len];
    stream.read_exact(&mut body).ok()?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some(Request {
        method,
        path: path.to_string(),
        query,
        headers,
        body,
    })
}

fn write_reply(out: &mut Conn, req: &Request, reply: Reply) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} X\r\n", reply.status);
    for (n, v) in &reply.headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    if reply.status != 204 {
        head.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if req.method != "HEAD" {
        out.write_all(&reply.body)?;
    }
    out.flush()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn handle(state: &State, req: &Request) -> Reply {
    if req.headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {TOKEN}")) {
        return Reply::error(401, "unauthorized", "a valid token is required");
    }
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let ["v1", repo, rest @ ..] = segs.as_slice() else {
        return Reply::error(404, "not-found", "no such route");
    };
    if *repo != REPO {
        return Reply::error(404, "not-found", "no such repository");
    }
    match (req.method.as_str(), rest) {
        ("POST", ["flush"]) => {
            state.flushes.fetch_add(1, Ordering::SeqCst);
            Reply::status(204)
        }
        ("GET", ["temporaries"]) => {
            let t = state.temporaries.lock().unwrap();
            let list: Vec<_> = t
                .iter()
                .map(|(l, s, m)| serde_json::json!({"location": l, "size": s, "modified_ms": m}))
                .collect();
            Reply::json(200, serde_json::json!({ "temporaries": list }))
        }
        ("POST", ["temporaries", "remove"]) => {
            let secs: i64 = req.query["older_than_secs"].parse().unwrap();
            let cutoff = now_ms() - secs * 1000;
            let mut t = state.temporaries.lock().unwrap();
            let (old, young): (Vec<_>, Vec<_>) = t.drain(..).partition(|x| x.2 < cutoff);
            *t = young;
            let bytes: u64 = old.iter().map(|x| x.1).sum();
            Reply::json(200, serde_json::json!({"count": old.len(), "bytes": bytes}))
        }
        (method, ["o", kind, name]) => object(state, req, method, kind, name),
        _ => Reply::error(404, "not-found", "no such route"),
    }
}

fn object(state: &State, req: &Request, method: &str, kind: &str, name: &str) -> Reply {
    let mut objects = state.objects.lock().unwrap();
    if name.is_empty() && method == "GET" {
        let prefix = format!("{kind}/");
        let list: Vec<_> = objects
            .iter()
            .filter_map(|(k, (b, m))| {
                let n = k.strip_prefix(&prefix)?;
                Some(serde_json::json!({"name": n, "size": b.len(), "modified_ms": m}))
            })
            .collect();
        return Reply::json(200, serde_json::json!({ "objects": list }));
    }
    let key = format!("{kind}/{name}");
    match method {
        "GET" | "HEAD" => {
            let Some((bytes, _)) = objects.get(&key) else {
                return Reply::error(404, "not-found", "no such object");
            };
            let size = bytes.len() as u64;
            if method == "HEAD" {
                return Reply::status(200).header("Vmkeep-Size", size);
            }
            if let Some(range) = req.headers.get("range") {
                let (a, b) = range
                    .strip_prefix("bytes=")
                    .unwrap()
                    .split_once('-')
                    .unwrap();
                let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
                if b >= size {
                    return Reply::error(416, "short", "range past the end");
                }
                let mut r =
                    Reply::status(206).header("Content-Range", format!("bytes {a}-{b}/{size}"));
                r.body = bytes[a as usize..=b as usize].to_vec();
                return r;
            }
            if let Some(max) = req.query.get("max") {
                let max: u64 = max.parse().unwrap();
                if size > max {
                    return Reply::json(
                        413,
                        serde_json::json!({"error": "too-large", "message": "larger than max",
                            "size": size, "max": max}),
                    );
                }
            }
            let mut r = Reply::status(200);
            r.body = bytes.clone();
            r
        }
        "PUT" => {
            let exists = objects.contains_key(&key);
            if exists && req.headers.get("if-none-match").map(String::as_str) == Some("*") {
                return Reply::error(412, "exists", "the object exists");
            }
            objects.insert(key, (req.body.clone(), now_ms()));
            Reply::status(if exists { 204 } else { 201 })
        }
        "DELETE" => {
            objects.remove(&key);
            Reply::status(204)
        }
        _ => Reply::error(404, "not-found", "no such route"),
    }
}
