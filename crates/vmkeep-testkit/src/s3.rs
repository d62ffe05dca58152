//! Real S3 servers for tests, on loopback: a Garage cluster (a real distributed store that
//! ignores conditional writes) and moto's server (an imitation that honours them). Both come
//! from `scripts/install-deps.sh servers`, cached outside the checkout; a missing one panics
//! with that hint (tests never skip).
//!
//! [`Garage::start`] lays out its nodes itself: one folder and three ports each, a shared RPC
//! secret, nodes connected to the first, one zone per node, replication factor 3, an imported
//! key and buckets created on demand.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmkeep_store::s3::{Credentials, S3Config, Secret};

/// The folder `install-deps.sh` builds the servers into.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMKEEP_TEST_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    base.join("vmkeep-test")
}

fn cached(rel: &str) -> PathBuf {
    let p = cache_dir().join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-deps.sh servers (it builds Garage and installs moto \
         once, into {})",
        p.display(),
        cache_dir().display()
    );
    p
}

/// A port free now, never one this process handed out before: tests in parallel threads
/// start clusters at once, and the kernel may give the port just released to the next bind.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited ({st}) before listening on {port}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} did not listen on {port} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a client needs to reach a test S3 server.
#[derive(Clone, Debug)]
pub struct S3Endpoint {
    pub endpoint: String,
    pub region: String,
    pub key_id: String,
    pub secret: String,
}

impl S3Endpoint {
    /// The configuration `S3Store::open_with` takes.
    pub fn config(&self) -> S3Config {
        S3Config {
            region: self.region.clone(),
            endpoint: Some(self.endpoint.clone()),
            virtual_hosted: false,
            credentials: Some(Credentials {
                access_key_id: self.key_id.clone(),
                secret_access_key: Secret::new(self.secret.clone()),
                session_token: None,
                source: "test".into(),
            }),
            profile: "default".into(),
        }
    }

    /// The environment the vmkeep binary reads (as the AWS tools do).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret.clone()),
            ("AWS_REGION".into(), self.region.clone()),
            ("AWS_ENDPOINT_URL".into(), self.endpoint.clone()),
        ]
    }
}

struct GarageNode {
    config: PathBuf,
    rpc_port: u16,
    s3_port: u16,
    child: Option<Child>,
    log: PathBuf,
}

/// A Garage cluster on loopback, killed when dropped.
pub struct Garage {
    bin: PathBuf,
    nodes: Vec<GarageNode>,
    /// S3 on the first node: the one clients talk to (stop the others to test quorum).
    pub s3: S3Endpoint,
    _dir: tempfile::TempDir,
}

const GARAGE_KEY_ID: &str = "GK0123456789abcdef01234567";
const GARAGE_SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

impl Garage {
    /// `nodes` nodes, replication factor `nodes` (3 for the quorum tests), ready for buckets.
    pub fn start(nodes: usize) -> Garage {
        let bin = cached("garage/bin/garage");
        let dir = tempfile::Builder::new()
            .prefix("garage-")
            .tempdir()
            .unwrap();
        let secret = blake3::hash(dir.path().as_os_str().as_encoded_bytes()).to_hex();
        let mut g = Garage {
            bin,
            nodes: Vec::new(),
            s3: S3Endpoint {
                endpoint: String::new(),
                region: "garage".into(),
                key_id: GARAGE_KEY_ID.into(),
                secret: GARAGE_SECRET.into(),
            },
            _dir: dir,
        };
        for i in 0..nodes {
            let root = g._dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&root).unwrap();
            let (rpc_port, s3_port, admin_port) = (free_port(), free_port(), free_port());
            let config = root.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{m}\"\ndata_dir = \"{d}\"\ndb_engine = \"sqlite\"\n\
                     replication_factor = {nodes}\nconsistency_mode = \"consistent\"\n\
                     metadata_fsync = false\ndata_fsync = false\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
                     rpc_public_addr = \"127.0.0.1:{rpc_port}\"\nrpc_secret = \"{secret}\"\n\
                     bootstrap_peers = []\n\n[s3_api]\ns3_region = \"garage\"\n\
                     api_bind_addr = \"127.0.0.1:{s3_port}\"\n\
                     root_domain = \".s3.garage.localhost\"\n\n[admin]\n\
                     api_bind_addr = \"127.0.0.1:{admin_port}\"\n",
                    m = root.join("meta").display(),
                    d = root.join("data").display(),
                ),
            )
            .unwrap();
            g.nodes.push(GarageNode {
                config,
                rpc_port,
                s3_port,
                child: None,
                log: root.join("garage.log"),
            });
            g.start_node(i);
        }
        g.s3.endpoint = format!("http://127.0.0.1:{}", g.nodes[0].s3_port);
        let ids: Vec<String> = (0..nodes).map(|i| g.node_id(i)).collect();
        for (i, id) in ids.iter().enumerate().skip(1) {
            g.cli(&[
                "node",
                "connect",
                &format!("{id}@127.0.0.1:{}", g.nodes[i].rpc_port),
            ]);
        }
        for (i, id) in ids.iter().enumerate() {
            let short = &id[..16];
            g.cli(&[
                "layout",
                "assign",
                "-z",
                &format!("z{i}"),
                "-c",
                "1G",
                short,
            ]);
        }
        g.cli(&["layout", "apply", "--version", "1"]);
        g.wait_until_every_node_has_the_layout();
        g.cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            "vmkeep-test",
            GARAGE_KEY_ID,
            GARAGE_SECRET,
        ]);
        g
    }

    /// Every node knows layout version 1 and sees every partition fully healthy. Without this
    /// wait, a test that writes at once could find a just-written object missing from a
    /// listing (seen once in CI, on a loaded machine, right after the cluster started).
    fn wait_until_every_node_has_the_layout(&self) {
        let start = Instant::now();
        for i in 0..self.nodes.len() {
            loop {
                let layout = self.cli_on(i, &["layout", "show"]);
                let healthy = self.cli_on(i, &["json-api", "GetClusterHealth"]);
                let ok = layout.contains("Current cluster layout version: 1")
                    && healthy.contains("\"status\": \"healthy\"");
                if ok {
                    break;
                }
                if start.elapsed() > Duration::from_secs(60) {
                    panic!("garage node {i} did not take the layout:\n{layout}\n{healthy}");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn node_id(&self, i: usize) -> String {
        let out = self.cli_on(i, &["node", "id", "-q"]);
        out.trim()
            .split('@')
            .next()
            .unwrap_or_else(|| panic!("garage node id printed {out:?}"))
            .to_string()
    }

    /// Runs the `garage` command-line client against the first node; returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_on(0, args)
    }

    fn cli_on(&self, node: usize, args: &[&str]) -> String {
        // The cluster needs a moment after a layout change: retry a failing command a little.
        let start = Instant::now();
        loop {
            let out = Command::new(&self.bin)
                .arg("-c")
                .arg(&self.nodes[node].config)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "garage {args:?} failed: {}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// A new bucket the test key may read and write.
    pub fn bucket(&self, name: &str) {
        self.cli(&["bucket", "create", name]);
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            name,
            "--key",
            "vmkeep-test",
        ]);
    }

    /// Stops node `i` at once (SIGKILL: a node lost, not shut down).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again (or for the first time) and waits for its S3 port.
    pub fn start_node(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .unwrap();
        let mut child = Command::new(&self.bin)
            .arg("-c")
            .arg(&n.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting garage: {e}"));
        wait_for_port(n.s3_port, &mut child, "garage");
        n.child = Some(child);
    }

    /// Node `i`'s log, for a failing test's message.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    pub fn config_path(&self, i: usize) -> &Path {
        &self.nodes[i].config
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }
}

/// moto's S3 server on loopback, killed when dropped.
pub struct Moto {
    child: Child,
    pub s3: S3Endpoint,
}

impl Moto {
    pub fn start() -> Moto {
        let bin = cached("moto/bin/moto_server");
        let port = free_port();
        let mut child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting moto_server: {e}"));
        wait_for_port(port, &mut child, "moto_server");
        Moto {
            child,
            s3: S3Endpoint {
                endpoint: format!("http://127.0.0.1:{port}"),
                region: "us-east-1".into(),
                key_id: "testing".into(),
                secret: "testing".into(),
            },
        }
    }

    /// A new bucket (moto does not check signatures: a plain PUT creates it).
    pub fn bucket(&self, name: &str) {
        let (status, reply) = self.raw("PUT", &format!("/{name}"), &[], "");
        assert_eq!(status, 200, "creating bucket {name} on moto: {reply}");
    }

    /// A new bucket with S3 Object Lock enabled (so versioning on: a delete without a version
    /// id only adds a delete marker), and with `Some(days)`, a default retention keeping every
    /// version that long in compliance mode.
    pub fn locked_bucket(&self, name: &str, retention_days: Option<u32>) {
        let (status, reply) = self.raw(
            "PUT",
            &format!("/{name}"),
            &[("x-amz-bucket-object-lock-enabled", "true")],
            "",
        );
        assert_eq!(
            status, 200,
            "creating locked bucket {name} on moto: {reply}"
        );
        let Some(days) = retention_days else {
            return;
        };
        let rule = format!(
            "<ObjectLockConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention>\
             <Mode>COMPLIANCE</Mode><Days>{days}</Days></DefaultRetention></Rule>\
             </ObjectLockConfiguration>"
        );
        let (status, reply) = self.raw("PUT", &format!("/{name}?object-lock"), &[], &rule);
        assert_eq!(status, 200, "object lock on {name}: {reply}");
    }

    /// One unsigned request (moto does not check signatures): (status, body).
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        let addr = self.s3.endpoint.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        use std::io::{Read, Write};
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        write!(s, "{head}\r\n{body}").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let status = reply
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = reply
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        (status, body)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `scripts/s3-fault-proxy.py` in front of an S3 endpoint: latency on every request, some
/// answered `503 SlowDown`, some replies cut half-way; killed when dropped.
pub struct FaultProxy {
    child: Child,
    /// The proxy, as clients reach it (same credentials as the upstream).
    pub s3: S3Endpoint,
    stats: PathBuf,
    _dir: tempfile::TempDir,
}

/// How bad the proxy makes the network.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    pub delay_ms: u32,
    /// Extra delay, uniform in 0..jitter_ms.
    pub jitter_ms: u32,
    /// Share of requests answered 503 SlowDown without reaching the server.
    pub fail_rate: f64,
    /// Share of replies cut off half-way (the connection closes).
    pub cut_rate: f64,
    /// Also answer every Nth request 503 (0: never): a fault a test can count on.
    pub fail_every: u32,
    /// Also cut every Nth reply that has a body (0: never).
    pub cut_every: u32,
}

impl FaultProxy {
    pub fn start(upstream: &S3Endpoint, faults: Faults) -> FaultProxy {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/s3-fault-proxy.py");
        let dir = tempfile::tempdir().unwrap();
        let stats = dir.path().join("stats.json");
        let host_port = upstream
            .endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let mut child = Command::new("python3")
            .arg(&script)
            .args(["--upstream", &host_port])
            .args(["--delay-ms", &faults.delay_ms.to_string()])
            .args(["--jitter-ms", &faults.jitter_ms.to_string()])
            .args(["--fail-rate", &faults.fail_rate.to_string()])
            .args(["--cut-rate", &faults.cut_rate.to_string()])
            .args(["--fail-every", &faults.fail_every.to_string()])
            .args(["--cut-every", &faults.cut_every.to_string()])
            .arg("--stats")
            .arg(&stats)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", script.display()));
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the fault proxy printed {line:?}"));
        FaultProxy {
            child,
            s3: S3Endpoint {
                endpoint: format!("http://127.0.0.1:{port}"),
                ..upstream.clone()
            },
            stats,
            _dir: dir,
        }
    }

    /// What the proxy saw: {"requests", "by_method", "bytes_up", "bytes_down",
    /// "answered_503", "cut"}.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&self.stats).unwrap()).unwrap()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
