//! Extractors that answer every rejection with the JSON error of [`ApiError`], and the router's
//! fallbacks for unknown routes and wrong methods.
//!
//! axum's own rejections are plain text with `422`/`415`; DECISIONS.md wants JSON always: bad
//! JSON `400` (serde's message, which names unknown fields), wrong content type `415`, body too
//! large `413`.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A JSON request body (or response), with JSON errors for every rejection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

fn is_json_content_type(req: &Request) -> bool {
    let Some(value) = req.headers().get(header::CONTENT_TYPE) else {
        return false;
    };
    let Ok(text) = value.to_str() else {
        return false;
    };
    let essence = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Decodes a JSON body into `T`; syntax and type errors are `400` with serde's message.
pub fn decode_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            ApiError::BadRequest(format!("request body is not valid json: {e}"))
        } else {
            ApiError::BadRequest(format!("invalid request body: {e}"))
        }
    })
}

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json_content_type(&req) {
            return Err(ApiError::UnsupportedMediaType(
                "expected a request body with content type application/json".to_string(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(format!(
                    "request body is larger than {MAX_BODY_BYTES} bytes"
                ))
            } else {
                ApiError::BadRequest(format!(
                    "cannot read request body: {}",
                    rejection.body_text()
                ))
            }
        })?;
        decode_json(&bytes).map(Json)
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Path parameters, with JSON errors: a parameter that does not parse is `400`.
#[derive(Debug, Clone)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => Err(ApiError::BadRequest(
                format!("invalid path parameter: {}", e.body_text()),
            )),
            Err(PathRejection::MissingPathParams(e)) => Err(ApiError::internal(format!(
                "route without its path parameters: {e}"
            ))),
            Err(other) => Err(ApiError::internal(other.body_text())),
        }
    }
}

/// Fallback of the router: `404 {"error": "no route for <METHOD> <path>"}`.
pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

/// Fallback for a known path with a method it does not serve: `405` JSON.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("method {method} is not allowed on {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
    }

    #[test]
    fn decode_names_unknown_fields() {
        let e = decode_json::<Body>(br#"{"name": "a", "bogus": 1}"#).expect_err("unknown");
        assert!(e.to_string().contains("bogus"), "{e}");
        assert!(matches!(e, ApiError::BadRequest(_)));
    }

    #[test]
    fn decode_reports_syntax_errors() {
        let e = decode_json::<Body>(b"{").expect_err("syntax");
        assert!(
            e.to_string().starts_with("request body is not valid json"),
            "{e}"
        );
    }

    #[test]
    fn content_type_check_accepts_json_variants() {
        let req = |ct: &str| {
            Request::builder()
                .header(header::CONTENT_TYPE, ct)
                .body(axum::body::Body::empty())
                .expect("request")
        };
        assert!(is_json_content_type(&req("application/json")));
        assert!(is_json_content_type(&req(
            "application/json; charset=utf-8"
        )));
        assert!(is_json_content_type(&req("application/merge-patch+json")));
        assert!(!is_json_content_type(&req("text/plain")));
    }
}
