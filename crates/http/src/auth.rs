//! HTTP basic authentication against the broker's users, answered as RabbitMQ answers it:
//! no credentials is a bare 401 with a `www-authenticate` challenge; wrong ones, or a user
//! without a management tag, a 401 with an `{error, reason}` body.

use crate::AppState;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::net::SocketAddr;

/// The tags that let a user into the management API (RabbitMQ's).
pub const MANAGEMENT_TAGS: [&str; 4] = ["administrator", "monitoring", "management", "policymaker"];

/// An authenticated management user.
#[derive(Clone)]
pub struct User {
    pub name: String,
    pub tags: Vec<String>,
    /// What the user logged in with: actions that open a broker session as the user
    /// present it again.
    password: String,
}

impl User {
    pub(crate) fn password(&self) -> &str {
        &self.password
    }
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("tags", &self.tags)
            .finish_non_exhaustive()
    }
}

/// Why a request was refused.
#[derive(Debug)]
pub enum Refused {
    /// No credentials at all: the browser should ask.
    Challenge,
    /// Credentials that do not log in, or a user the API is not for.
    NotAuthorized(&'static str),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let realm = [(WWW_AUTHENTICATE, "Basic realm=\"RabbitMQ Management\"")];
        match self {
            Refused::Challenge => (StatusCode::UNAUTHORIZED, realm).into_response(),
            Refused::NotAuthorized(reason) => (
                StatusCode::UNAUTHORIZED,
                realm,
                Json(json!({"error": "not_authorized", "reason": reason})),
            )
                .into_response(),
        }
    }
}

impl FromRequestParts<AppState> for User {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<User, Refused> {
        let Some(header) = parts.headers.get(AUTHORIZATION) else {
            return Err(Refused::Challenge);
        };
        let (name, password) = header
            .to_str()
            .ok()
            .and_then(basic_credentials)
            .ok_or(Refused::NotAuthorized("Login failed"))?;
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let user = state
            .broker
            .login(&name, &password, peer)
            .map_err(|_| Refused::NotAuthorized("Login failed"))?;
        if !user
            .tags
            .iter()
            .any(|t| MANAGEMENT_TAGS.contains(&t.as_str()))
        {
            return Err(Refused::NotAuthorized("Not management user"));
        }
        Ok(User {
            name: user.name,
            tags: user.tags,
            password,
        })
    }
}

/// The user name and password of an `Authorization: Basic …` header value.
///
/// ```
/// use rill_http::auth::basic_credentials;
/// assert_eq!(
///     basic_credentials("Basic Z3Vlc3Q6Z3Vlc3Q="),
///     Some(("guest".to_string(), "guest".to_string()))
/// );
/// assert_eq!(basic_credentials("Bearer x"), None);
/// ```
pub fn basic_credentials(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(rill_codec::base64::decode(encoded.trim())?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_may_hold_colons() {
        // "u:p:q"
        assert_eq!(
            basic_credentials("basic dTpwOnE="),
            Some(("u".into(), "p:q".into()))
        );
        assert_eq!(basic_credentials("Basic bm9jb2xvbg=="), None);
    }
}
