//! Reading the server's replies: bounded bodies, the JSON documents of docs/PROTOCOL.md §3,
//! and error statuses mapped to store errors. Everything here is untrusted input.
use std::io::Read;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::retry::Failure;
use crate::error::Error;

/// Of an error reply, at most this much is read.
pub(crate) const MAX_ERROR_BODY: u64 = 64 << 10;
/// The largest listing accepted (about two million objects).
pub(crate) const MAX_LIST_BODY: u64 = 256 << 20;
/// A server message quoted in an error is cut to this many characters.
const MAX_MESSAGE_CHARS: usize = 300;

/// `{"error":"<code>","message":"…"}`, with `size` (and `max`, not needed) on a 413 for `?max`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(default)]
    pub(crate) error: Option<String>,
    #[serde(default)]
    pub(crate) message: Option<String>,
    #[serde(default)]
    pub(crate) size: Option<u64>,
}

impl ErrorBody {
    /// A one-line description for messages: the server's message, else its code, else the
    /// reply's text, else the status's reason.
    pub(crate) fn describe(&self, raw: &str, status: u16) -> String {
        let text = self
            .message
            .as_deref()
            .filter(|m| !m.trim().is_empty())
            .or(self.error.as_deref())
            .unwrap_or(raw);
        let line = one_line(text);
        if line.is_empty() {
            reason(status).to_string()
        } else {
            line
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListReply {
    pub(crate) objects: Vec<ListedObject>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListedObject {
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) modified_ms: i64,
    #[serde(default)]
    pub(crate) version: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct TemporariesReply {
    pub(crate) temporaries: Vec<ListedTemporary>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListedTemporary {
    pub(crate) location: String,
    pub(crate) size: u64,
    pub(crate) modified_ms: i64,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RemovedReply {
    pub(crate) count: u64,
    pub(crate) bytes: u64,
}

/// Milliseconds since 1970 (negative before) as a time.
pub(crate) fn time_of_ms(ms: i64) -> SystemTime {
    let d = Duration::from_millis(ms.unsigned_abs());
    let t = if ms >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(d)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(d)
    };
    t.unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Server text made safe for a one-line message: control characters become spaces, runs of
/// white space one space, and it is cut to a bounded length.
pub(crate) fn one_line(text: &str) -> String {
    let mut out = String::new();
    for (n, w) in text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .enumerate()
    {
        if n > 0 {
            out.push(' ');
        }
        out.push_str(w);
        if out.chars().count() > MAX_MESSAGE_CHARS {
            let cut: String = out.chars().take(MAX_MESSAGE_CHARS).collect();
            return format!("{cut}…");
        }
    }
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "bad request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not found",
        409 => "exists",
        412 => "exists",
        413 => "too large",
        416 => "range not satisfiable",
        422 => "verification failed",
        500 => "server error",
        502 => "bad gateway",
        503 => "service unavailable",
        504 => "gateway timeout",
        507 => "no space",
        _ => "unexpected status",
    }
}

/// Reads at most `max` bytes of a body; Ok(None) when it has more. The buffer never grows past
/// `max + 1` bytes (`capacity`, the announced length, is reserved up front when it is within
/// the bound). An interrupted body is a transient failure (the connection broke or timed out
/// mid-reply).
pub(crate) fn read_bounded(
    reader: impl Read,
    max: u64,
    capacity: u64,
    what: &dyn Fn() -> String,
) -> Result<Option<Vec<u8>>, Failure> {
    let limit = usize::try_from(max.saturating_add(1)).unwrap_or(usize::MAX);
    let mut buf = Vec::with_capacity(usize::try_from(capacity.min(max)).unwrap_or(0));
    let mut chunk = vec![0u8; limit.min(64 << 10)];
    let mut reader = reader.take(max.saturating_add(1));
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Failure::transient(Error::Network {
                    what: what(),
                    cause: format!("reading the reply: {e}"),
                }))
            }
        };
        if buf.len() + n > buf.capacity() {
            // Doubling, but never past the bound (`take` keeps len + n within it).
            let target = (buf.capacity() * 2).max(buf.len() + n).min(limit);
            buf.reserve_exact(target - buf.len());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if buf.len() as u64 > max {
        return Ok(None);
    }
    Ok(Some(buf))
}

/// A JSON reply of at most `max` bytes.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    response: ureq::Response,
    max: u64,
    what: &dyn Fn() -> String,
) -> Result<T, Failure> {
    let body = read_bounded(response.into_reader(), max, 0, what)?.ok_or_else(|| {
        Failure::fatal(Error::BadReply {
            what: what(),
            message: format!("the reply is larger than {max} bytes"),
        })
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        Failure::fatal(Error::BadReply {
            what: what(),
            message: format!("invalid JSON: {e}"),
        })
    })
}

/// The Content-Length header, when present and a number.
pub(crate) fn content_length(response: &ureq::Response) -> Option<u64> {
    response.header("Content-Length")?.trim().parse().ok()
}

/// An error reply's status and parsed body (at most [`MAX_ERROR_BODY`] of it is read; an
/// unreadable body is just left out).
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) body: ErrorBody,
    pub(crate) message: String,
}

impl Refusal {
    pub(crate) fn read(response: ureq::Response) -> Refusal {
        let status = response.status();
        let mut raw = Vec::new();
        let _ = response
            .into_reader()
            .take(MAX_ERROR_BODY)
            .read_to_end(&mut raw);
        let body: ErrorBody = serde_json::from_slice(&raw).unwrap_or_default();
        let raw_text = if body.message.is_none() && body.error.is_none() {
            String::from_utf8_lossy(&raw).into_owned()
        } else {
            String::new()
        };
        let message = body.describe(&raw_text, status);
        Refusal {
            status,
            body,
            message,
        }
    }

    /// The error for a status no caller handled specially: 401, 403, 422, 507 and 5xx (retried)
    /// have their own meaning; anything else is reported with the server's message.
    pub(crate) fn into_failure(self, what: String, location: &str) -> Failure {
        let Refusal {
            status, message, ..
        } = self;
        match status {
            401 => Failure::fatal(Error::Unauthorized {
                location: location.to_string(),
            }),
            403 => Failure::fatal(Error::Forbidden { what, message }),
            422 => Failure::fatal(Error::Verification { what, message }),
            507 => Failure::fatal(Error::NoSpace {
                path: location.into(),
            }),
            500..=599 => Failure::transient(Error::Http {
                what,
                status,
                message,
            }),
            _ => Failure::fatal(Error::Http {
                what,
                status,
                message,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_text_becomes_one_bounded_line() {
        assert_eq!(one_line("a\r\n b\u{1b}[31mc\t"), "a b [31mc");
        let long = one_line(&"x ".repeat(1000));
        assert!(long.chars().count() <= MAX_MESSAGE_CHARS + 1, "{long}");
        assert!(long.ends_with('…'));
        let body = ErrorBody::default();
        assert_eq!(body.describe("", 503), "service unavailable");
        assert_eq!(body.describe("<html>oops</html>", 502), "<html>oops</html>");
        let body: ErrorBody =
            serde_json::from_str(r#"{"error":"forbidden","message":"no right"}"#).unwrap();
        assert_eq!(body.describe("", 403), "no right");
    }

    #[test]
    fn times_before_and_after_1970() {
        assert_eq!(
            time_of_ms(1500),
            SystemTime::UNIX_EPOCH + Duration::from_millis(1500)
        );
        assert_eq!(
            time_of_ms(-1000),
            SystemTime::UNIX_EPOCH - Duration::from_secs(1)
        );
    }

    #[test]
    fn bounded_reads_stop_one_byte_past_the_bound() {
        let what = || "t".to_string();
        assert_eq!(
            read_bounded(&b"12345"[..], 5, 5, &what).unwrap().unwrap(),
            b"12345"
        );
        assert!(read_bounded(&b"123456"[..], 5, 5, &what).unwrap().is_none());
        // An endless body: reading stops after max + 1 bytes.
        assert!(read_bounded(std::io::repeat(0), 1 << 20, 0, &what)
            .unwrap()
            .is_none());
        // Growing from nothing, the buffer stays within the bound.
        let max = 300_000;
        let body = vec![1u8; max as usize];
        let got = read_bounded(&body[..], max, 0, &what).unwrap().unwrap();
        assert_eq!(got, body);
        assert!(got.capacity() as u64 <= max + 1, "{}", got.capacity());
        assert_eq!(read_bounded(&b""[..], 0, 0, &what).unwrap().unwrap(), b"");
    }
}
