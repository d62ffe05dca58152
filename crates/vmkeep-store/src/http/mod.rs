//! A repository behind `vmkeep serve`, over HTTPS (docs/PROTOCOL.md): the client side of the
//! protocol, with the same semantics as [`crate::LocalStore`].
//!
//! One `ureq` agent (a connection pool, shared by every thread) with a preconfigured rustls
//! client: the server is verified by its pinned certificate fingerprint or by the system's CA
//! certificates (§1). Every request carries the bearer token (§2) and is retried on connection
//! errors, timeouts and 5xx other than 507 ([`retry`], §7). Every reply is bounded before it
//! is read ([`reply`]): a whole-object read asks the server for `?max` and stops reading one
//! byte past it, so a lying server cannot exhaust memory.
mod reply;
mod retry;
mod tls;
mod url;

use std::fmt;
use std::time::Duration;

use reply::{content_length, read_bounded, read_json, time_of_ms, Refusal};
use retry::{with_retries, Failure};

use crate::error::{Error, Result};
use crate::key::Key;
use crate::{ObjectKind, ObjectMeta, Store, TemporariesRemoved, Temporary};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Per read or write of the socket, not per request: a 256 MiB pack streams as long as it
/// keeps moving.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// How to reach a server.
#[derive(Clone)]
pub struct HttpOptions {
    /// The bearer token (`vmk_<id>_<secret>`); None sends no Authorization header, which the
    /// server refuses with 401.
    pub token: Option<String>,
    /// The server certificate's SHA-256 as 64 hex digits (colons and case ignored). Without
    /// it the system's CA certificates and the host name are checked.
    pub tls_fingerprint: Option<String>,
    /// How long failing requests are retried (the CLI reads `VMKEEP_HTTP_RETRY_SECS`).
    pub retry_for: Duration,
}

impl Default for HttpOptions {
    fn default() -> HttpOptions {
        HttpOptions {
            token: None,
            tls_fingerprint: None,
            retry_for: Duration::from_secs(60),
        }
    }
}

impl fmt::Debug for HttpOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpOptions")
            .field("token", &self.token.as_ref().map(|_| "<secret>"))
            .field("tls_fingerprint", &self.tls_fingerprint)
            .field("retry_for", &self.retry_for)
            .finish()
    }
}

/// The `Authorization` header value. Never printed.
struct Bearer(String);

/// A repository served by `vmkeep serve`.
pub struct HttpStore {
    url: url::RepoUrl,
    location: String,
    agent: ureq::Agent,
    auth: Option<Bearer>,
    retry_for: Duration,
}

impl fmt::Debug for HttpStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpStore")
            .field("location", &self.location)
            .field("token", &self.auth.as_ref().map(|_| "<secret>"))
            .field("retry_for", &self.retry_for)
            .finish()
    }
}

impl HttpStore {
    /// Validates `https://HOST[:PORT]/NAME`, the fingerprint and the token, and sets up the
    /// connection pool. Nothing is sent yet: the first request finds out whether the server
    /// is there.
    pub fn connect(url: &str, opts: HttpOptions) -> Result<HttpStore> {
        let url = url::RepoUrl::parse(url)?;
        let pin = opts
            .tls_fingerprint
            .as_deref()
            .map(tls::Fingerprint::parse)
            .transpose()?;
        let auth = opts.token.as_deref().map(bearer).transpose()?;
        let agent = ureq::AgentBuilder::new()
            .tls_config(tls::client_config(pin)?)
            .https_only(true)
            .redirects(0)
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(IO_TIMEOUT)
            .timeout_write(IO_TIMEOUT)
            .max_idle_connections(64)
            .max_idle_connections_per_host(32)
            .user_agent(concat!("vmkeep/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(HttpStore {
            location: url.location(),
            url,
            agent,
            auth,
            retry_for: opts.retry_for,
        })
    }

    /// One attempt: the reply whatever its status, or a transport failure.
    fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        what: &dyn Fn() -> String,
    ) -> Result<ureq::Response, Failure> {
        let mut request = self.agent.request(method, url);
        if let Some(Bearer(value)) = &self.auth {
            request = request.set("Authorization", value);
        }
        for (name, value) in headers {
            request = request.set(name, value);
        }
        let result = match body {
            Some(bytes) => request.send_bytes(bytes),
            None => request.call(),
        };
        match result {
            Ok(response) | Err(ureq::Error::Status(_, response)) => Ok(response),
            Err(ureq::Error::Transport(t)) => Err(self.transport_failure(what(), t)),
        }
    }

    /// A connection error: retried, except TLS failures (a wrong fingerprint or an untrusted
    /// certificate stays wrong) and requests that can never work.
    fn transport_failure(&self, what: String, t: ureq::Transport) -> Failure {
        if let Some(e) = tls::find_rustls_error(Some(&t)) {
            if let Some(m) = tls::as_mismatch(e) {
                return Failure::fatal(Error::FingerprintMismatch {
                    location: self.location.clone(),
                    actual: m.actual.to_string(),
                    expected: m.expected.to_string(),
                });
            }
            return Failure::fatal(Error::Tls {
                location: self.location.clone(),
                cause: e.to_string(),
            });
        }
        use ureq::ErrorKind as K;
        let retry = matches!(
            t.kind(),
            K::Dns | K::ConnectionFailed | K::Io | K::BadStatus | K::BadHeader | K::ProxyConnect
        );
        let mut cause = t.kind().to_string();
        if let Some(m) = t.message() {
            cause = format!("{cause}: {m}");
        }
        if let Some(s) = std::error::Error::source(&t) {
            cause = format!("{cause}: {s}");
        }
        let error = Error::Network { what, cause };
        if retry {
            Failure::transient(error)
        } else {
            Failure::fatal(error)
        }
    }

    fn refusal(&self, response: ureq::Response, what: &dyn Fn() -> String) -> Failure {
        Refusal::read(response).into_failure(what(), &self.location)
    }

    fn not_found(key: &Key) -> Failure {
        Failure::fatal(Error::NotFound {
            key: key.to_string(),
        })
    }

    fn what(&self, verb: &str, object: &dyn fmt::Display) -> String {
        format!("{verb} {object} on {}", self.location)
    }
}

/// `Bearer <token>`, refusing a token that cannot be a header value (without quoting it).
fn bearer(token: &str) -> Result<Bearer> {
    let token = token.trim();
    if token.is_empty() {
        return Err(Error::InvalidToken {
            reason: "it is empty".into(),
        });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::InvalidToken {
            reason: "it contains spaces, control or non-ASCII characters".into(),
        });
    }
    Ok(Bearer(format!("Bearer {token}")))
}

impl Store for HttpStore {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn get(&self, key: &Key, max_len: u64) -> Result<Vec<u8>> {
        let url = format!("{}?max={max_len}", self.url.object(key));
        let what = || self.what("reading", key);
        let too_large = |size| {
            Failure::fatal(Error::TooLarge {
                key: key.to_string(),
                kind: key.kind.name(),
                size,
                max: max_len,
            })
        };
        with_retries(self.retry_for, &what, || {
            let response = self.send("GET", &url, &[], None, &what)?;
            match response.status() {
                200 => {
                    // Bound first: a declared length over the bound is refused unread.
                    let len = content_length(&response);
                    if let Some(len) = len.filter(|&len| len > max_len) {
                        return Err(too_large(len));
                    }
                    read_bounded(response.into_reader(), max_len, len.unwrap_or(0), &what)?
                        .ok_or_else(|| too_large(max_len.saturating_add(1)))
                }
                404 => Err(Self::not_found(key)),
                413 => {
                    let r = Refusal::read(response);
                    Err(too_large(r.body.size.unwrap_or(max_len.saturating_add(1))))
                }
                _ => Err(self.refusal(response, &what)),
            }
        })
    }

    fn get_range(&self, key: &Key, offset: u64, len: u64) -> Result<Vec<u8>> {
        let short = || {
            Failure::fatal(Error::ShortRead {
                key: key.to_string(),
                offset,
                len,
            })
        };
        if len == 0 {
            // As a local read of nothing: only the object's existence is checked.
            self.size(key)?;
            return Ok(Vec::new());
        }
        let Some(last) = offset.checked_add(len - 1) else {
            return Err(short().error);
        };
        let url = self.url.object(key);
        let range = format!("bytes={offset}-{last}");
        let what = || self.what("reading", &format_args!("{key} ({range})"));
        with_retries(self.retry_for, &what, || {
            let response = self.send("GET", &url, &[("Range", &range)], None, &what)?;
            let whole = match response.status() {
                206 => false,
                // A server that ignored the range: usable only if the object is that range.
                200 if offset == 0 && content_length(&response) == Some(len) => true,
                200 => {
                    return Err(Failure::fatal(Error::BadReply {
                        what: what(),
                        message: "the server ignored the Range header".into(),
                    }))
                }
                404 => return Err(Self::not_found(key)),
                416 => return Err(short()),
                _ => return Err(self.refusal(response, &what)),
            };
            if !whole {
                let expected = format!("bytes {offset}-{last}/");
                match response.header("Content-Range") {
                    Some(r) if r.trim().starts_with(&expected) => {}
                    None => {}
                    Some(r) => {
                        return Err(Failure::fatal(Error::BadReply {
                            what: what(),
                            message: format!("Content-Range {:?}", reply::one_line(r)),
                        }))
                    }
                }
            }
            match read_bounded(response.into_reader(), len, len, &what)? {
                Some(bytes) if bytes.len() as u64 == len => Ok(bytes),
                _ => Err(short()),
            }
        })
    }

    fn size(&self, key: &Key) -> Result<u64> {
        let url = self.url.object(key);
        let what = || self.what("the size of", key);
        with_retries(self.retry_for, &what, || {
            let response = self.send("HEAD", &url, &[], None, &what)?;
            match response.status() {
                200 => response
                    .header("Vmkeep-Size")
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        Failure::fatal(Error::BadReply {
                            what: what(),
                            message: "no valid Vmkeep-Size header".into(),
                        })
                    }),
                404 => Err(Self::not_found(key)),
                _ => Err(self.refusal(response, &what)),
            }
        })
    }

    fn put(&self, key: &Key, data: &[u8]) -> Result<()> {
        let url = self.url.object(key);
        let what = || self.what("writing", key);
        with_retries(self.retry_for, &what, || {
            let response = self.send("PUT", &url, &[], Some(data), &what)?;
            match response.status() {
                200 | 201 | 204 => Ok(()),
                _ => Err(self.refusal(response, &what)),
            }
        })
    }

    fn put_if_absent(&self, key: &Key, data: &[u8]) -> Result<bool> {
        let url = self.url.object(key);
        let what = || self.what("creating", key);
        with_retries(self.retry_for, &what, || {
            let response = self.send("PUT", &url, &[("If-None-Match", "*")], Some(data), &what)?;
            match response.status() {
                200 | 201 => Ok(true),
                // 204: an existing pack or index object was left as it is.
                204 | 409 | 412 => Ok(false),
                _ => Err(self.refusal(response, &what)),
            }
        })
    }

    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectMeta>> {
        let url = self.url.kind(kind);
        let what = || self.what("listing", &format_args!("{}/", url::kind_segment(kind)));
        let listed: reply::ListReply = with_retries(self.retry_for, &what, || {
            let response = self.send("GET", &url, &[], None, &what)?;
            match response.status() {
                200 => read_json(response, reply::MAX_LIST_BODY, &what),
                _ => Err(self.refusal(response, &what)),
            }
        })?;
        let mut out = Vec::with_capacity(listed.objects.len());
        for o in listed.objects {
            let key = Key::new(kind, o.name.as_str()).map_err(|_| Error::BadReply {
                what: what(),
                message: format!("invalid object name {:?}", reply::one_line(&o.name)),
            })?;
            out.push(ObjectMeta {
                key,
                size: o.size,
                modified: time_of_ms(o.modified_ms),
                // From an older server: none, and nothing is cached by it.
                version: o.version.filter(|v| v.len() <= crate::MAX_VERSION_LEN),
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &Key) -> Result<()> {
        let url = self.url.object(key);
        let what = || self.what("deleting", key);
        with_retries(self.retry_for, &what, || {
            let response = self.send("DELETE", &url, &[], None, &what)?;
            match response.status() {
                // Absent is fine.
                200 | 204 | 404 => Ok(()),
                _ => Err(self.refusal(response, &what)),
            }
        })
    }

    fn flush(&self) -> Result<()> {
        let url = self.url.route("flush");
        let what = || format!("flushing {}", self.location);
        with_retries(self.retry_for, &what, || {
            let response = self.send("POST", &url, &[], Some(&[]), &what)?;
            match response.status() {
                200 | 204 => Ok(()),
                _ => Err(self.refusal(response, &what)),
            }
        })
    }

    fn needs_pack_lists(&self) -> bool {
        true
    }

    fn token_scope(&self) -> Result<Option<crate::TokenScope>> {
        let url = self.url.route("whoami");
        let what = || format!("asking {} what this token may do", self.location);
        let scope: crate::TokenScope = with_retries(self.retry_for, &what, || {
            let response = self.send("GET", &url, &[], None, &what)?;
            match response.status() {
                200 => read_json(response, 64 << 10, &what),
                _ => Err(self.refusal(response, &what)),
            }
        })?;
        Ok(Some(scope))
    }

    fn concurrency(&self) -> usize {
        // The server buffers each body (at most one pack) in memory: a few at once.
        4
    }

    fn list_temporaries(&self) -> Result<Vec<Temporary>> {
        let url = self.url.route("temporaries");
        let what = || format!("listing the temporaries of {}", self.location);
        let listed: reply::TemporariesReply = with_retries(self.retry_for, &what, || {
            let response = self.send("GET", &url, &[], None, &what)?;
            match response.status() {
                200 => read_json(response, reply::MAX_LIST_BODY, &what),
                _ => Err(self.refusal(response, &what)),
            }
        })?;
        Ok(listed
            .temporaries
            .into_iter()
            .map(|t| Temporary {
                location: reply::one_line(&t.location),
                size: t.size,
                modified: time_of_ms(t.modified_ms),
            })
            .collect())
    }

    fn remove_temporaries(&self, older_than: Duration) -> Result<TemporariesRemoved> {
        // Whole seconds, rounded up: never younger than asked.
        let secs = older_than.as_secs() + u64::from(older_than.subsec_nanos() > 0);
        let url = self
            .url
            .route(&format!("temporaries/remove?older_than_secs={secs}"));
        let what = || format!("removing the temporaries of {}", self.location);
        let removed: reply::RemovedReply = with_retries(self.retry_for, &what, || {
            let response = self.send("POST", &url, &[], Some(&[]), &what)?;
            match response.status() {
                200 => read_json(response, reply::MAX_ERROR_BODY, &what),
                _ => Err(self.refusal(response, &what)),
            }
        })?;
        Ok(TemporariesRemoved {
            count: removed.count,
            bytes: removed.bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_validated_and_never_shown() {
        assert_eq!(bearer(" vmk_1_2\n").unwrap().0, "Bearer vmk_1_2");
        assert!(bearer("").is_err());
        let e = bearer("vmk secret\r\nX: y").err().unwrap();
        assert!(!e.to_string().contains("secret"), "{e}");
        let opts = HttpOptions {
            token: Some("vmk_0011_topsecret".into()),
            ..HttpOptions::default()
        };
        assert!(!format!("{opts:?}").contains("topsecret"));
        let fp = "00".repeat(32);
        let s = HttpStore::connect(
            "https://h:1/r",
            HttpOptions {
                tls_fingerprint: Some(fp),
                ..opts
            },
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("topsecret"));
        assert_eq!(s.location(), "https://h:1/r");
        assert!(s.needs_pack_lists());
    }

    #[test]
    fn bad_fingerprints_and_urls_fail_at_connect() {
        let opts = HttpOptions {
            tls_fingerprint: Some("abc".into()),
            ..HttpOptions::default()
        };
        assert!(matches!(
            HttpStore::connect("https://h/r", opts),
            Err(Error::InvalidFingerprint { .. })
        ));
        assert!(matches!(
            HttpStore::connect("http://h/r", HttpOptions::default()),
            Err(Error::InvalidUrl { .. })
        ));
    }
}
