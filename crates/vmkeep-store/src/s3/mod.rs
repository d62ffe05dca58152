//! `s3://BUCKET[/PREFIX]`: a repository on S3-compatible object storage (AWS S3, Garage, MinIO,
//! Ceph RGW, Wasabi, ...) through the `object_store` crate.
//!
//! The `Store` interface stays synchronous (docs/ARCHITECTURE.md "Object storage"): this store
//! owns a small tokio runtime and each call blocks its calling thread on one request, while
//! many threads (the packer's uploaders, restore and check workers) call at once, so many
//! requests are in flight. `object_store` retries timeouts, 5xx and throttling (429, 503
//! SlowDown) with exponential backoff and jitter for a bounded time, then the call fails with
//! the last error. An S3 PUT is atomic: a reader sees the old object or the whole new one, and
//! an interrupted PUT leaves nothing, so this store has no temporaries and `flush` has nothing
//! to do (a PUT that returned is durable).
//!
//! Conditional creates (`If-None-Match: *`) are used where the store honours them; Garage and
//! others ignore them, which the repository protocol tolerates (FORMAT.md §1).
mod config;
mod content_md5;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig,
};
use vmkeep_core::ObjectKind;

pub use config::{resolve_from, Credentials, S3Config, S3Url, Secret};

use crate::error::{Error, Result};
use crate::{Key, ObjectMeta, Store};

/// How long a failing request is retried (`VMKEEP_S3_RETRY_SECS` in the CLI).
const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(60);
/// One request, start to end: a 16 MiB pack over a slow uplink still fits.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests in flight per process: enough to hide a round trip of tens of milliseconds behind
/// the packer's 16 MiB packs and restore's ranges (bench/README.md "Object storage").
const CONCURRENCY: usize = 8;

/// What the caller may set beyond the AWS configuration.
#[derive(Clone, Debug)]
pub struct S3Options {
    /// How long failing requests are retried; zero turns retries off.
    pub retry_for: Duration,
}

impl Default for S3Options {
    fn default() -> S3Options {
        S3Options {
            retry_for: DEFAULT_RETRY_FOR,
        }
    }
}

pub struct S3Store {
    url: S3Url,
    client: Arc<AmazonS3>,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for S3Store {
    // The client holds the credentials: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Store({})", self.url)
    }
}

impl S3Store {
    /// Opens `s3://BUCKET[/PREFIX]` with the AWS configuration of this process (environment,
    /// then shared files). Nothing is requested yet.
    pub fn open(url: &str, options: S3Options) -> Result<S3Store> {
        S3Store::open_with(url, config::resolve()?, options)
    }

    pub fn open_with(url: &str, config: S3Config, options: S3Options) -> Result<S3Store> {
        let url = S3Url::parse(url)?;
        // The HTTPS client uses rustls without a bundled provider: install ring's (once per
        // process; a second install is refused harmlessly).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            // The window bounds the retries, not a count: a node rejoining its cluster can
            // take longer than ten quick attempts.
            max_retries: if options.retry_for.is_zero() { 0 } else { 1000 },
            retry_timeout: options.retry_for,
        };
        let client_options = ClientOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_allow_http(
                config
                    .endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            );
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&url.bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(config.virtual_hosted)
            .with_retry(retry)
            .with_client_options(client_options)
            .with_http_connector(content_md5::ContentMd5Connector);
        if let Some(e) = &config.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(c) = &config.credentials {
            b = b
                .with_access_key_id(&c.access_key_id)
                .with_secret_access_key(c.secret_access_key.expose());
            if let Some(t) = &c.session_token {
                b = b.with_token(t.expose());
            }
        }
        let client = b.build().map_err(|e| Error::S3Config {
            reason: format!("{url}: {e}"),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmkeep-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::S3Config {
                reason: format!("starting the I/O runtime: {e}"),
            })?;
        Ok(S3Store {
            url,
            client: Arc::new(client),
            runtime,
        })
    }

    fn path(&self, key: &Key) -> ObjectPath {
        self.under(&key.path())
    }

    fn under(&self, rel: &str) -> ObjectPath {
        if self.url.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.url.prefix))
        }
    }

    fn failed(&self, verb: &str, what: &dyn std::fmt::Display, e: object_store::Error) -> Error {
        let what = format!("{verb} {what} on {}", self.url);
        match e {
            object_store::Error::NotFound { .. } => Error::NotFound {
                key: what_key(&what),
            },
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => Error::ObjectStore {
                what,
                cause: format!(
                    "{e} (check the credentials: AWS_ACCESS_KEY_ID / AWS_PROFILE, and the bucket's policy)"
                ),
            },
            e => Error::ObjectStore {
                what,
                cause: e.to_string(),
            },
        }
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Runs a GET, again from the start when its body broke off after the reply began. The
    /// client retries requests, not bodies, and a store may cut a body: Garage ends the reply
    /// of an object whose version is replaced while it is read (seen in the conformance
    /// suite). A fresh GET then returns the old object or the whole new one.
    fn with_body_retries<T, F, Fut>(&self, key: &Key, attempt: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Failed>>,
    {
        let mut wait = Duration::from_millis(50);
        for n in 1.. {
            match self.block_on(attempt()) {
                Ok(v) => return Ok(v),
                Err(Failed::Request(e)) => return Err(e),
                Err(Failed::Body(e)) if n >= BODY_ATTEMPTS => {
                    return Err(self.failed("reading", key, e))
                }
                Err(Failed::Body(e)) => {
                    tracing::debug!("reading {key} on {}: {e}; reading it again", self.url);
                    std::thread::sleep(wait);
                    wait *= 2;
                }
            }
        }
        unreachable!("the loop returns")
    }
}

/// How a GET failed: the request (already retried by the client), or its body midway.
enum Failed {
    Request(Error),
    Body(object_store::Error),
}

/// Whole GETs made when bodies keep breaking off.
const BODY_ATTEMPTS: u32 = 5;

/// The object part of a `what` ("reading packs/ab/.. on s3://b" -> "packs/ab/..").
fn what_key(what: &str) -> String {
    what.split_whitespace().nth(1).unwrap_or(what).to_string()
}

impl Store for S3Store {
    fn location(&self) -> String {
        self.url.to_string()
    }

    fn get(&self, key: &Key, max_len: u64) -> Result<Vec<u8>> {
        let path = self.path(key);
        self.with_body_retries(key, || async {
            let got = self
                .client
                .get_opts(&path, GetOptions::default())
                .await
                .map_err(|e| Failed::Request(self.failed("reading", key, e)))?;
            // Bound first: the size is in the reply's headers, the body is not read yet.
            if got.meta.size > max_len {
                return Err(Failed::Request(Error::TooLarge {
                    key: key.to_string(),
                    kind: key.kind.name(),
                    size: got.meta.size,
                    max: max_len,
                }));
            }
            let bytes = got.bytes().await.map_err(Failed::Body)?;
            if bytes.len() as u64 > max_len {
                return Err(Failed::Request(Error::TooLarge {
                    key: key.to_string(),
                    kind: key.kind.name(),
                    size: bytes.len() as u64,
                    max: max_len,
                }));
            }
            Ok(bytes.to_vec())
        })
    }

    fn get_range(&self, key: &Key, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            self.size(key)?;
            return Ok(Vec::new());
        }
        let short = || Error::ShortRead {
            key: key.to_string(),
            offset,
            len,
        };
        let end = offset.checked_add(len).ok_or_else(short)?;
        let path = self.path(key);
        let got = self.with_body_retries(key, || async {
            let opts = GetOptions {
                range: Some(GetRange::Bounded(offset..end)),
                ..GetOptions::default()
            };
            let got = match self.client.get_opts(&path, opts).await {
                Ok(got) => got,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(Failed::Request(Error::NotFound {
                        key: key.to_string(),
                    }))
                }
                // A range past the end (416, or a client-side range check): short if the
                // object is, otherwise the error as it was.
                Err(e) => {
                    return Err(Failed::Request(match self.client.head(&path).await {
                        Ok(m) if m.size < end => short(),
                        _ => self.failed("reading", key, e),
                    }))
                }
            };
            got.bytes().await.map_err(Failed::Body)
        })?;
        if got.len() as u64 == len {
            Ok(got.to_vec())
        } else {
            Err(short())
        }
    }

    fn size(&self, key: &Key) -> Result<u64> {
        let path = self.path(key);
        self.block_on(self.client.head(&path))
            .map(|m| m.size)
            .map_err(|e| self.failed("reading the size of", key, e))
    }

    fn put(&self, key: &Key, data: &[u8]) -> Result<()> {
        let path = self.path(key);
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(data));
        self.block_on(self.client.put(&path, payload))
            .map(|_| ())
            .map_err(|e| self.failed("writing", key, e))
    }

    fn put_owned(&self, key: &Key, data: Vec<u8>) -> Result<()> {
        let path = self.path(key);
        let payload = PutPayload::from(bytes::Bytes::from(data));
        self.block_on(self.client.put(&path, payload))
            .map(|_| ())
            .map_err(|e| self.failed("writing", key, e))
    }

    fn put_if_absent(&self, key: &Key, data: &[u8]) -> Result<bool> {
        let path = self.path(key);
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(data));
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self.block_on(self.client.put_opts(&path, payload, opts)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.failed("creating", key, e)),
        }
    }

    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectMeta>> {
        if kind == ObjectKind::Config {
            // A listing lists a folder's contents; the config is one object at the top.
            let key = Key::config();
            return match self.block_on(self.client.head(&self.path(&key))) {
                Ok(m) => Ok(vec![ObjectMeta {
                    key,
                    size: m.size,
                    modified: SystemTime::from(m.last_modified),
                    version: version_of(&m),
                }]),
                Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
                Err(e) => Err(self.failed("listing", &"config", e)),
            };
        }
        let folder = format!("{}/", kind.folder());
        let prefix = self.under(folder.trim_end_matches('/'));
        let base = if self.url.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.url.prefix)
        };
        self.block_on(async {
            // Paginated by the client (1000 keys per request on S3).
            let mut stream = self.client.list(Some(&prefix));
            let mut out = Vec::new();
            while let Some(item) = stream.next().await {
                let meta = item.map_err(|e| self.failed("listing", &folder, e))?;
                let rel = meta.location.as_ref();
                let Some(rel) = rel.strip_prefix(base.as_str()) else {
                    continue;
                };
                // Only names this kind could have; anything else in the folder is not ours.
                let Some(name) = rel.rsplit('/').next() else {
                    continue;
                };
                let Ok(key) = Key::new(kind, name) else {
                    continue;
                };
                if key.path() != rel {
                    continue;
                }
                out.push(ObjectMeta {
                    key,
                    size: meta.size,
                    modified: SystemTime::from(meta.last_modified),
                    version: version_of(&meta),
                });
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
    }

    fn delete(&self, key: &Key) -> Result<()> {
        let path = self.path(key);
        match self.block_on(self.client.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed("deleting", key, e)),
        }
    }

    fn flush(&self) -> Result<()> {
        // A PUT that returned is durable on S3 and on the stores that imitate it.
        Ok(())
    }

    fn concurrency(&self) -> usize {
        CONCURRENCY
    }
}

/// The object's ETag (and version id on a versioned bucket) as its version token.
fn version_of(m: &object_store::ObjectMeta) -> Option<String> {
    let tag = m.e_tag.as_deref()?;
    let v = match &m.version {
        Some(id) => format!("{tag}/{id}"),
        None => tag.to_string(),
    };
    (v.len() <= crate::MAX_VERSION_LEN).then_some(v)
}
