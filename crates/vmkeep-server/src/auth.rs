//! Authentication (PROTOCOL.md §2): `Authorization: Bearer <token>`, verified against the tokens
//! file. Authorization is decided per kind and method in `objects` (§4).
use axum::http::{header, HeaderMap};

use crate::reply::{ApiError, ApiResult};
use crate::state::App;
use crate::tokens::Principal;

/// The principal of the request's token: 401 when it is missing, malformed or unknown.
pub(crate) fn authenticate(app: &App, headers: &HeaderMap) -> ApiResult<Principal> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(ApiError::unauthorized)?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or_else(ApiError::unauthorized)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::unauthorized());
    }
    app.tokens
        .verify(token.trim())
        .ok_or_else(ApiError::unauthorized)
}

/// Logged with each request: the id of its token (never the secret).
#[derive(Clone, Debug)]
pub(crate) struct TokenId(pub String);
