//! Error replies (PROTOCOL.md §3): `{"error":"<code>","message":"…"}` with the protocol's
//! statuses, and the mapping of store errors onto them.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// 413 for an object larger than allowed: its size and the bound.
    size_max: Option<(u64, u64)>,
    /// Close the connection after replying (a request body left unread).
    close: bool,
}

pub(crate) type ApiResult<T = Response> = Result<T, ApiError>;

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            size_max: None,
            close: false,
        }
    }

    pub(crate) fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad-request", m)
    }

    pub(crate) fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid token is needed (Authorization: Bearer vmk_…)",
        )
    }

    pub(crate) fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", m)
    }

    pub(crate) fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", m)
    }

    /// 409: a replace this token may not do.
    pub(crate) fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "exists", m)
    }

    /// 412: If-None-Match and the object exists.
    pub(crate) fn precondition(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PRECONDITION_FAILED, "exists", m)
    }

    pub(crate) fn too_large(m: impl Into<String>, size_max: Option<(u64, u64)>) -> ApiError {
        let mut e = ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too-large", m);
        e.size_max = size_max;
        e
    }

    pub(crate) fn short(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "short", m)
    }

    pub(crate) fn verification(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "verification", m)
    }

    pub(crate) fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", m)
    }

    pub(crate) fn closing(mut self) -> ApiError {
        self.close = true;
        self
    }
}

impl From<vmkeep_store::Error> for ApiError {
    fn from(e: vmkeep_store::Error) -> ApiError {
        use vmkeep_store::Error as E;
        match &e {
            E::NotFound { .. } => ApiError::not_found(e.to_string()),
            E::NoSpace { .. } => {
                tracing::error!("{e}");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "no-space",
                    "no space left on the server's storage",
                )
            }
            E::TooLarge { size, max, .. } => {
                ApiError::too_large(e.to_string(), Some((*size, *max)))
            }
            E::ShortRead { .. } => ApiError::short(e.to_string()),
            E::InvalidName { .. } => ApiError::bad_request(e.to_string()),
            // Io, PermissionDenied, and the variants of other backends.
            _ => {
                // Server paths stay in the server's log.
                tracing::error!("{e}");
                ApiError::internal("storage error on the server (see its log)")
            }
        }
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> ApiError {
        tracing::error!("server state: {e}");
        ApiError::internal("storage error on the server (see its log)")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.code, "message": self.message});
        if let Some((size, max)) = self.size_max {
            body["size"] = size.into();
            body["max"] = max.into();
        }
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.close {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}
