//! `Content-MD5` on uploads, for buckets that demand it: a bucket with a default S3 Object Lock
//! retention refuses every PUT without `Content-MD5` (or a checksum header the SDKs sign), and
//! `object_store` sends neither on a plain PUT. This HTTP layer sits under `object_store`'s
//! signing and retries: it passes requests through until a PUT is refused for want of the
//! header, then sends that PUT again with it, and every later PUT of this process with it.
//!
//! The header is added after signing. SigV4 must sign `host` and the `x-amz-*` headers, not
//! `Content-MD5`, so the signature stays valid (an `x-amz-*` header added here would not: Garage
//! refuses it, and so does AWS). The store checks the body against the digest, so an upload
//! damaged on the way is refused rather than kept.
//!
//! Hashing costs about 30 ms per 16 MiB pack, paid only where the bucket asks for it.
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use base64::Engine as _;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use md5::{Digest, Md5};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService, ReqwestConnector,
};
use object_store::ClientOptions;

/// The longest refusal body read to look for the store's reason; larger ones pass unread.
const REFUSAL_LIMIT: usize = 64 << 10;

/// Builds `object_store`'s own reqwest client and wraps it in [`ContentMd5`].
#[derive(Debug, Default)]
pub(super) struct ContentMd5Connector;

impl HttpConnector for ContentMd5Connector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(ContentMd5 {
            inner: ReqwestConnector::default().connect(options)?,
            demanded: AtomicBool::new(false),
        }))
    }
}

#[derive(Debug)]
struct ContentMd5 {
    inner: HttpClient,
    /// Set once the bucket refused a PUT without the header: from then on every PUT has it.
    demanded: AtomicBool,
}

#[async_trait]
impl HttpService for ContentMd5 {
    async fn call(&self, mut req: HttpRequest) -> Result<HttpResponse, HttpError> {
        if req.method() != Method::PUT {
            return self.inner.execute(req).await;
        }
        if self.demanded.load(Ordering::Relaxed) {
            add_content_md5(&mut req).await?;
            return self.inner.execute(req).await;
        }
        let mut again = copy(&req);
        let reply = self.inner.execute(req).await?;
        if reply.status() != StatusCode::BAD_REQUEST {
            return Ok(reply);
        }
        let (parts, body) = reply.into_parts();
        let small = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|n| n <= REFUSAL_LIMIT);
        if !small {
            return Ok(HttpResponse::from_parts(parts, body));
        }
        let text = http_body_util::Limited::new(body, REFUSAL_LIMIT)
            .collect()
            .await
            .map_err(|e| HttpError::new(HttpErrorKind::Decode, Refusal(e.to_string())))?
            .to_bytes();
        if !wants_content_md5(&text) {
            return Ok(HttpResponse::from_parts(
                parts,
                HttpResponseBody::from(text),
            ));
        }
        tracing::info!(
            "the bucket wants Content-MD5 on uploads (Object Lock retention): sending it"
        );
        self.demanded.store(true, Ordering::Relaxed);
        add_content_md5(&mut again).await?;
        self.inner.execute(again).await
    }
}

/// Whether a 400 reply says the upload needs `Content-MD5`: AWS answers `InvalidRequest`
/// with "Content-MD5 OR x-amz-checksum- HTTP header is required for Put Object requests with
/// Object Lock parameters", moto `MissingUploadObjectWithObjectLockHeaders` naming the header.
fn wants_content_md5(reply: &[u8]) -> bool {
    let text = String::from_utf8_lossy(reply);
    text.contains("MissingUploadObjectWithObjectLockHeaders")
        || (text.contains("Content-MD5") && text.contains("Object Lock"))
}

/// The same request again (its body is reference-counted bytes, not a copy).
fn copy(req: &HttpRequest) -> HttpRequest {
    let mut again = HttpRequest::new(req.body().clone());
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.version_mut() = req.version();
    *again.headers_mut() = req.headers().clone();
    again
}

async fn add_content_md5(req: &mut HttpRequest) -> Result<(), HttpError> {
    let mut hasher = Md5::new();
    let mut body = req.body().clone();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            hasher.update(data);
        }
    }
    let digest = base64::engine::general_purpose::STANDARD.encode(hasher.finalize());
    let value = HeaderValue::from_str(&digest).expect("base64 is a valid header value");
    req.headers_mut().insert("content-md5", value);
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error("reading the store's refusal: {0}")]
struct Refusal(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusals_of_aws_and_moto_are_recognised_and_others_are_not() {
        let aws = b"<Error><Code>InvalidRequest</Code><Message>Content-MD5 OR x-amz-checksum- \
            HTTP header is required for Put Object requests with Object Lock parameters\
            </Message></Error>";
        let moto = b"<Error><Code>MissingUploadObjectWithObjectLockHeaders</Code>\
            <Message>Content-MD5 HTTP header is required for Put Object requests with Object \
            Lock parameters</Message></Error>";
        assert!(wants_content_md5(aws));
        assert!(wants_content_md5(moto));
        assert!(!wants_content_md5(
            b"<Error><Code>InvalidDigest</Code><Message>The Content-MD5 you specified was invalid</Message></Error>"
        ));
        assert!(!wants_content_md5(
            b"<Error><Code>InvalidArgument</Code></Error>"
        ));
    }

    #[tokio::test]
    async fn the_digest_covers_the_whole_body() {
        let mut req = HttpRequest::new(bytes::Bytes::from_static(b"hello world").into());
        add_content_md5(&mut req).await.unwrap();
        // md5("hello world") = 5eb63bbbe01eeed093cb22bb8f5acdc3
        assert_eq!(req.headers()["content-md5"], "XrY7u+Ae7tCTyyK7j1rNww==");
        assert_eq!(
            copy(&req).headers()["content-md5"],
            "XrY7u+Ae7tCTyyK7j1rNww=="
        );
    }
}
