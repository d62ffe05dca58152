//! A real server on 127.0.0.1:0 in a background thread, a pinning HTTPS client, and
//! repositories written with vmkeep-core.
#![allow(dead_code)]
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use vmkeep_core::config::RepoConfig;
use vmkeep_core::keys::{BlobKind, Keys, MasterKey};
use vmkeep_core::manifest::{BackupStats, Manifest, MANIFEST_VERSION};
use vmkeep_core::pack::PackBuilder;
use vmkeep_core::packlist::PackList;
use vmkeep_core::{blob, object, BlobId, ObjectKind, PackId, SnapshotId};
use vmkeep_server::tokens::{self, Right};
use vmkeep_server::{serve_until, ServeOptions};
use vmkeep_store::{Key, LocalStore, Store};

/// Pins the server certificate by its SHA-256; the handshake signature is verified.
#[derive(Debug)]
struct Pin {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pin {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if vmkeep_server::tls::fingerprint_of_der(end_entity) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("fingerprint mismatch".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn client_config(fingerprint: &str) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pin = Pin {
        fingerprint: fingerprint.to_string(),
        provider: provider.clone(),
    };
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(pin))
            .with_no_client_auth(),
    )
}

pub struct Server {
    pub dir: PathBuf,
    pub tokens: PathBuf,
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub agent: ureq::Agent,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<vmkeep_server::Result<()>>>,
}

/// A reply: status, body, the Vmkeep-Size and Content-Range headers.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub size: Option<String>,
    pub range: Option<String>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

impl Server {
    pub fn start(dir: &Path, tokens: &Path) -> Server {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let opts = ServeOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            dir: dir.to_path_buf(),
            tokens: tokens.to_path_buf(),
            tls_cert: None,
            tls_key: None,
        };
        let thread = std::thread::spawn(move || {
            serve_until(opts, |ready| tx.send(ready.clone()).unwrap(), async move {
                let _ = stop_rx.await;
            })
        });
        let ready = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("server ready");
        // A fresh connection per request: the server answers a refused upload without reading
        // its body and then closes the connection, and a pooled connection reused at that
        // instant fails with "Unexpected EOF" (seen once in CI). The product's client retries
        // such errors (`http/retry.rs`); these tests look at single replies.
        let agent = ureq::AgentBuilder::new()
            .tls_config(client_config(&ready.fingerprint))
            .redirects(0)
            .max_idle_connections(0)
            .build();
        Server {
            dir: dir.to_path_buf(),
            tokens: tokens.to_path_buf(),
            addr: ready.addr,
            fingerprint: ready.fingerprint,
            agent,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.thread.take().unwrap().join().unwrap().unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    pub fn req(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let mut r = self.agent.request(method, &self.url(path));
        if let Some(t) = token {
            r = r.set("Authorization", &format!("Bearer {t}"));
        }
        for (k, v) in headers {
            r = r.set(k, v);
        }
        let res = match body {
            Some(b) => r.send_bytes(b),
            None => r.call(),
        };
        let resp = match res {
            Ok(resp) => resp,
            Err(ureq::Error::Status(_, resp)) => resp,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let size = resp.header("vmkeep-size").map(str::to_string);
        let range = resp.header("content-range").map(str::to_string);
        let mut body = Vec::new();
        resp.into_reader().read_to_end(&mut body).unwrap();
        Reply {
            status,
            body,
            size,
            range,
        }
    }

    pub fn get(&self, path: &str, token: &str) -> Reply {
        self.req("GET", path, Some(token), &[], None)
    }

    pub fn put(&self, path: &str, token: &str, body: &[u8]) -> Reply {
        self.req("PUT", path, Some(token), &[], Some(body))
    }

    /// A request with its path sent byte for byte (no client-side normalisation); the status.
    pub fn raw(&self, method: &str, path: &str, token: &str, body: &[u8]) -> u16 {
        let tcp = std::net::TcpStream::connect(self.addr).unwrap();
        let conn = rustls::ClientConnection::new(
            client_config(&self.fingerprint),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).unwrap();
        tls.write_all(body).unwrap();
        tls.flush().unwrap();
        let mut reply = Vec::new();
        let _ = tls.read_to_end(&mut reply);
        let text = String::from_utf8_lossy(&reply);
        text.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {text:?}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub fn mint(tokens: &Path, vms: &[&str], rights: &[Right]) -> String {
    let vms: Vec<String> = vms.iter().map(|s| s.to_string()).collect();
    tokens::add(tokens, &vms, rights, Some("test"))
        .unwrap()
        .token
}

/// A repository in `dir/name`: its config, and the keys its objects are made with.
pub struct Repo {
    pub store: LocalStore,
    pub keys: Keys,
}

impl Repo {
    pub fn create(dir: &Path, name: &str, encrypted: bool) -> Repo {
        let store = LocalStore::create(dir.join(name)).unwrap();
        let keys = if encrypted {
            Keys::encrypted(MasterKey::generate())
        } else {
            Keys::plain()
        };
        let config = RepoConfig::new(64 << 10, encrypted).unwrap();
        store.put(&Key::config(), &config.to_json(&keys)).unwrap();
        Repo { store, keys }
    }

    /// A pack of `chunks` (ids computed right unless `wrong_ids`): (name, bytes).
    pub fn pack(&self, chunks: &[&[u8]], wrong_ids: bool) -> (String, Vec<u8>) {
        let mut b = PackBuilder::new();
        for c in chunks {
            let id = if wrong_ids {
                self.keys.blob_id(BlobKind::Tree, c)
            } else {
                self.keys.blob_id(BlobKind::Data, c)
            };
            let enc = blob::encode(&self.keys, BlobKind::Data, &id, c);
            b.add(BlobKind::Data, id, c.len() as u32, &enc);
        }
        let (id, bytes, _) = b.finish(&self.keys);
        (id.to_hex(), bytes)
    }

    pub fn manifest(&self, id: &str, vm: &str) -> Vec<u8> {
        let m = Manifest {
            version: MANIFEST_VERSION,
            id: id.parse::<SnapshotId>().unwrap(),
            vm: vm.into(),
            time: chrono::Utc::now(),
            parent: None,
            hostname: "host".into(),
            tool_version: "test".into(),
            chunk_size: 64 << 10,
            disks: vec![],
            streams: vec![],
            stats: BackupStats::default(),
            pause_ms: 0,
        };
        object::seal(&self.keys, ObjectKind::Snapshot, &m.to_json())
    }

    pub fn framed(&self, kind: ObjectKind, body: &[u8]) -> Vec<u8> {
        object::seal(&self.keys, kind, body)
    }

    pub fn put(&self, kind: ObjectKind, name: &str, bytes: &[u8]) {
        self.store
            .put(&Key::new(kind, name).unwrap(), bytes)
            .unwrap();
    }

    pub fn get(&self, kind: ObjectKind, name: &str) -> Option<Vec<u8>> {
        match self.store.get(&Key::new(kind, name).unwrap(), u64::MAX) {
            Ok(b) => Some(b),
            Err(e) if e.is_not_found() => None,
            Err(e) => panic!("{e}"),
        }
    }

    /// A stored restore point of `vm` naming `packs`: its pack list and manifest.
    pub fn snapshot(&self, vm: &str, packs: &[&str]) -> String {
        let id = SnapshotId::random().to_hex();
        self.put(ObjectKind::Refs, &id, &pack_list(&id, vm, packs));
        self.put(ObjectKind::Snapshot, &id, &self.manifest(&id, vm));
        id
    }

    /// A stored pack: its name.
    pub fn stored_pack(&self, content: &[u8]) -> String {
        let (name, bytes) = self.pack(&[content], false);
        self.put(ObjectKind::Pack, &name, &bytes);
        name
    }
}

pub fn pack_list(id: &str, vm: &str, packs: &[&str]) -> Vec<u8> {
    PackList::new(
        id.parse().unwrap(),
        vm,
        packs.iter().map(|p| p.parse::<PackId>().unwrap()).collect(),
    )
    .to_json()
}

pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::getrandom(&mut b).unwrap();
    hex::encode(b)
}

pub fn blob_id_hex(b: &BlobId) -> String {
    b.to_hex()
}

/// Every file under `dir` with its bytes' hash: to check that nothing changed.
pub fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                let hash = blake3::hash(&std::fs::read(&p).unwrap())
                    .to_hex()
                    .to_string();
                out.insert(rel, hash);
            }
        }
    }
    out
}
