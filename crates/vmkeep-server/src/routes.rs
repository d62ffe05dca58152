//! The HTTP routes of PROTOCOL.md §3. Each handler authenticates first (401), validates names
//! before they touch a path (400), checks rights (403), and runs store work in
//! `spawn_blocking`. Unknown routes, kinds and methods are 404 (after authentication).
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::{Body, HttpBody};
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use serde_json::json;
use vmkeep_core::config::RepoConfig;
use vmkeep_store::{Key, ObjectKind, Store};

use crate::auth::{authenticate, TokenId};
use crate::objects::{self, ReadRequest};
use crate::reply::{ApiError, ApiResult};
use crate::state::{valid_repo_name, App, Repo};
use crate::tokens::Principal;

/// A request body that sends nothing for this long is abandoned.
const BODY_IDLE: Duration = Duration::from_secs(60);
/// How much of a body refused as too large is still read (and dropped), and for how long, so
/// that its sender sees the 413.
const DRAIN_CAP: u64 = 16 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(5);

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/{repo}/o/{kind}/", any(list))
        .route("/v1/{repo}/o/{kind}/{name}", any(object))
        .route("/v1/{repo}/flush", any(flush))
        .route("/v1/{repo}/temporaries", any(temporaries))
        .route("/v1/{repo}/temporaries/remove", any(remove_temporaries))
        .route("/v1/{repo}/whoami", any(whoami))
        .route("/metrics", any(metrics))
        .fallback(fallback)
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(app.clone(), log))
        .with_state(app)
}

async fn log(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    app.requests.count(resp.status().as_u16());
    let token = resp
        .extensions()
        .get::<TokenId>()
        .map_or("-", |t| t.0.as_str());
    tracing::debug!(
        token,
        %method,
        path,
        status = resp.status().as_u16(),
        "request"
    );
    resp
}

/// The reply, tagged with the token id for the log.
fn respond(token: Option<&Principal>, r: ApiResult) -> Response {
    let mut resp = r.unwrap_or_else(|e| e.into_response());
    if let Some(p) = token {
        resp.extensions_mut().insert(TokenId(p.id.clone()));
    }
    resp
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("request worker failed: {e}"))))
}

fn no_route() -> ApiError {
    ApiError::not_found("no such route")
}

fn kind_of(word: &str) -> Option<ObjectKind> {
    if word == "config" {
        return Some(ObjectKind::Config);
    }
    ObjectKind::ALL
        .into_iter()
        .find(|k| *k != ObjectKind::Config && k.folder() == word)
}

fn check_repo_name(name: &str) -> ApiResult<()> {
    if valid_repo_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid repository name {:?}",
            name.chars().take(80).collect::<String>()
        )))
    }
}

fn open_repo(app: &App, name: &str) -> ApiResult<Arc<Repo>> {
    app.repo(name)
        .ok_or_else(|| ApiError::not_found(format!("no repository {name}")))
}

fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn u64_param(query: Option<&str>, name: &str) -> ApiResult<Option<u64>> {
    query_param(query, name)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("{name}={v:?} is not a number")))
        })
        .transpose()
}

/// `Range: bytes=A-B` or `bytes=A-`.
fn range(headers: &HeaderMap) -> ApiResult<Option<(u64, Option<u64>)>> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let bad = || ApiError::bad_request("Range must be bytes=A-B");
    let v = v.to_str().map_err(|_| bad())?.trim();
    let (a, b) = v
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .ok_or_else(bad)?;
    let a: u64 = a.trim().parse().map_err(|_| bad())?;
    let b = match b.trim() {
        "" => None,
        b => Some(b.parse::<u64>().map_err(|_| bad())?),
    };
    Ok(Some((a, b)))
}

/// `If-None-Match: *` (create only). Other values are not part of the protocol.
fn if_none_match(headers: &HeaderMap) -> ApiResult<bool> {
    match headers.get(header::IF_NONE_MATCH) {
        None => Ok(false),
        Some(v) if v.as_bytes().trim_ascii() == b"*" => Ok(true),
        Some(_) => Err(ApiError::bad_request("If-None-Match must be *")),
    }
}

/// Read and discard what is left of a refused body, up to `cap` bytes in all and for a few
/// seconds at most: a client that writes its whole body before reading the reply then gets the
/// 413 instead of a connection reset. Nothing is kept.
async fn drain(body: &mut Body, cap: u64) {
    let mut seen = 0u64;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while seen <= cap {
            match poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        seen += data.len() as u64;
                    }
                }
                _ => break,
            }
        }
    })
    .await;
}

/// The body, refused with 413 as soon as more than `max` bytes arrived (or announced).
async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    max: u64,
    what: &str,
) -> ApiResult<Vec<u8>> {
    let too_large = |size: u64| {
        ApiError::too_large(
            format!("a {what} is at most {max} bytes; this body has {size} or more"),
            None,
        )
        .closing()
    };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = announced {
        if len > max {
            if len - max <= DRAIN_CAP {
                drain(&mut body, len).await;
            }
            return Err(too_large(len));
        }
    }
    let mut out = Vec::with_capacity(announced.unwrap_or(0) as usize);
    loop {
        let frame =
            tokio::time::timeout(BODY_IDLE, poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)))
                .await
                .map_err(|_| ApiError::bad_request("the request body stalled").closing())?;
        let Some(frame) = frame else { break };
        let frame =
            frame.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")).closing())?;
        if let Ok(data) = frame.into_data() {
            let size = out.len() as u64 + data.len() as u64;
            if size > max {
                drain(&mut body, max + DRAIN_CAP).await;
                return Err(too_large(size));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------

async fn object(
    State(app): State<Arc<App>>,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<(String, String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    let p = match authenticate(&app, &headers) {
        Ok(p) => p,
        Err(e) => return respond(None, Err(e)),
    };
    let r = object_inner(app, &p, method, headers, path, query, body).await;
    respond(Some(&p), r)
}

async fn object_inner(
    app: Arc<App>,
    p: &Principal,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<(String, String, String)>, PathRejection>,
    query: Option<String>,
    body: Body,
) -> ApiResult {
    let Path((repo, kind, name)) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let kind = kind_of(&kind).ok_or_else(no_route)?;
    check_repo_name(&repo)?;
    let key = Key::new(kind, name)?;
    let p = p.clone();
    match method {
        Method::GET | Method::HEAD => {
            if !p.can_read() {
                return Err(ApiError::forbidden("this token has no right"));
            }
            let req = ReadRequest {
                head: method == Method::HEAD,
                range: range(&headers)?,
                max: u64_param(query.as_deref(), "max")?,
            };
            blocking(move || objects::read(&*open_repo(&app, &repo)?, &p, &key, req)).await
        }
        Method::PUT => {
            objects::may_put(&p, kind)?;
            let inm = if_none_match(&headers)?;
            // `init` through the server writes the key file, then the config (If-None-Match).
            let create =
                p.is_admin() && (kind == ObjectKind::Key || (kind == ObjectKind::Config && inm));
            let app2 = app.clone();
            let name = repo.clone();
            let found = blocking(move || Ok(app2.repo(&name))).await?;
            if found.is_none() && !create {
                return Err(ApiError::not_found(format!("no repository {repo}")));
            }
            let bytes = read_body(&headers, body, kind.max_size(), kind.name()).await?;
            blocking(move || {
                let repo = match found {
                    Some(r) => r,
                    // `init` through the server: the repository exists once a valid key
                    // file or config lands.
                    None => {
                        if kind == ObjectKind::Key {
                            vmkeep_core::keys::KeyFile::from_json(&bytes)
                                .map_err(|e| ApiError::verification(format!("key file: {e}")))?;
                        } else {
                            RepoConfig::parse(&bytes)
                                .map_err(|e| ApiError::verification(format!("config: {e}")))?;
                        }
                        app.create_repo(&repo)?
                    }
                };
                objects::put(&repo, &p, &key, &bytes, inm)
            })
            .await
        }
        Method::DELETE => {
            objects::may_delete(&p, kind)?;
            blocking(move || objects::delete(&*open_repo(&app, &repo)?, &p, &key)).await
        }
        _ => Err(no_route()),
    }
}

async fn list(
    State(app): State<Arc<App>>,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let p = match authenticate(&app, &headers) {
        Ok(p) => p,
        Err(e) => return respond(None, Err(e)),
    };
    let r = async {
        let Path((repo, kind)) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
        if method != Method::GET {
            return Err(no_route());
        }
        let kind = kind_of(&kind).ok_or_else(no_route)?;
        check_repo_name(&repo)?;
        if !p.can_read() {
            return Err(ApiError::forbidden("this token has no right"));
        }
        let p2 = p.clone();
        let metas = blocking(move || objects::list(&*open_repo(&app, &repo)?, &p2, kind)).await?;
        let objects: Vec<_> = metas
            .iter()
            .map(|m| {
                json!({"name": m.key.name, "size": m.size, "modified_ms": millis(m.modified),
                       "version": m.version})
            })
            .collect();
        Ok(Json(json!({ "objects": objects })).into_response())
    }
    .await;
    respond(Some(&p), r)
}

fn millis(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The routes on a repository without an object: method, the right they need, what they do.
async fn repo_route(
    app: Arc<App>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    allowed: bool,
    need: impl FnOnce(&Principal) -> bool,
    run: impl FnOnce(Arc<Repo>, Principal) -> ApiResult + Send + 'static,
) -> Response {
    let p = match authenticate(&app, &headers) {
        Ok(p) => p,
        Err(e) => return respond(None, Err(e)),
    };
    let r = async {
        let Path(repo) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
        if !allowed {
            return Err(no_route());
        }
        check_repo_name(&repo)?;
        if !need(&p) {
            return Err(ApiError::forbidden("this token lacks the right this needs"));
        }
        let p2 = p.clone();
        blocking(move || run(open_repo(&app, &repo)?, p2)).await
    }
    .await;
    respond(Some(&p), r)
}

async fn flush(
    State(app): State<Arc<App>>,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    repo_route(
        app,
        headers,
        path,
        method == Method::POST,
        |p| p.can_append(),
        |repo, _| {
            repo.store.flush()?;
            Ok(StatusCode::NO_CONTENT.into_response())
        },
    )
    .await
}

async fn temporaries(
    State(app): State<Arc<App>>,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    repo_route(app, headers, path, method == Method::GET, |p| p.is_admin(), |repo, _| {
        let t: Vec<_> = repo
            .store
            .list_temporaries()?
            .iter()
            .map(|t| json!({"location": t.location, "size": t.size, "modified_ms": millis(t.modified)}))
            .collect();
        Ok(Json(json!({ "temporaries": t })).into_response())
    })
    .await
}

async fn remove_temporaries(
    State(app): State<Arc<App>>,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    let secs = u64_param(query.as_deref(), "older_than_secs");
    repo_route(
        app,
        headers,
        path,
        method == Method::POST,
        |p| p.is_admin(),
        move |repo, _| {
            let secs = secs?.ok_or_else(|| ApiError::bad_request("older_than_secs is required"))?;
            let r = repo.store.remove_temporaries(Duration::from_secs(secs))?;
            Ok(Json(json!({"count": r.count, "bytes": r.bytes})).into_response())
        },
    )
    .await
}

async fn whoami(
    State(app): State<Arc<App>>,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    repo_route(
        app,
        headers,
        path,
        method == Method::GET,
        |_| true,
        |_, p| {
            let rights: Vec<&str> = p.rights.iter().map(|r| r.as_str()).collect();
            Ok(Json(json!({"id": p.id, "vms": p.vms, "rights": rights})).into_response())
        },
    )
    .await
}

/// `GET /metrics` (PROTOCOL.md §4.4): any valid token; its VM scope filters the figures.
async fn metrics(State(app): State<Arc<App>>, method: Method, headers: HeaderMap) -> Response {
    let p = match authenticate(&app, &headers) {
        Ok(p) => p,
        Err(e) => return respond(None, Err(e)),
    };
    if method != Method::GET {
        return respond(Some(&p), Err(no_route()));
    }
    let who = p.clone();
    let r = blocking(move || {
        let text = crate::metrics::render(&app, &who).map_err(ApiError::internal)?;
        Ok((
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response())
    })
    .await;
    respond(Some(&p), r)
}

async fn fallback(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    match authenticate(&app, &headers) {
        Ok(p) => respond(Some(&p), Err(no_route())),
        Err(e) => respond(None, Err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_params() {
        assert_eq!(kind_of("packs"), Some(ObjectKind::Pack));
        assert_eq!(kind_of("config"), Some(ObjectKind::Config));
        assert_eq!(kind_of("gc"), Some(ObjectKind::GcRecord));
        assert_eq!(kind_of(""), None);
        assert_eq!(kind_of("pack"), None);
        assert_eq!(query_param(Some("a=1&max=5"), "max"), Some("5"));
        assert!(u64_param(Some("max=x"), "max").is_err());
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, "bytes=3-9".parse().unwrap());
        assert_eq!(range(&h).unwrap(), Some((3, Some(9))));
        h.insert(header::RANGE, "bytes=3-".parse().unwrap());
        assert_eq!(range(&h).unwrap(), Some((3, None)));
        h.insert(header::RANGE, "bytes=-3".parse().unwrap());
        assert!(range(&h).is_err());
        h.insert(header::RANGE, "items=1-2".parse().unwrap());
        assert!(range(&h).is_err());
    }
}
