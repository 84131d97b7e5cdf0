//! The one error type of the HTTP layer and its one mapping to a response.
//!
//! Every answer that is not a success goes through [`ApiError`]: the body is always
//! `{"error": "<message>"}` with `Content-Type: application/json`. Internal errors are logged
//! with their detail and answered with `"internal error"` only.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use grid_client::ClientError;
use grid_proto::api::ErrorBody;

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no valid credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the credentials do not allow this request.
    #[error("{0}")]
    Forbidden(String),
    /// 404: the resource or route does not exist.
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists, not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: wrong state, or the name is taken.
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is over the limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415: the body is not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 503: the node cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// 504: the node took too long.
    #[error("{0}")]
    GatewayTimeout(String),
    /// 500: a bug or a failure on our side; the message is logged, not sent.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// An internal error with its detail (logged, not answered).
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        ApiError::Internal(detail.to_string())
    }

    /// Maps a failure talking to node `node`: unreachable or silent → 503, too slow → 504, else
    /// 500. Handlers map the node errors a client's input can cause (a missing id, say) first.
    pub fn from_client(node: &str, err: ClientError) -> Self {
        match err {
            ClientError::Connect { .. } | ClientError::Redis { .. } => {
                tracing::warn!(node, error = %err, "node unreachable");
                ApiError::Unavailable(format!("node {node} is unreachable"))
            }
            ClientError::Unresponsive { .. } => {
                tracing::warn!(node, error = %err, "node does not answer");
                ApiError::Unavailable(format!("node {node} is unreachable: it does not answer"))
            }
            ClientError::NotPickedUp { command, .. } => ApiError::Unavailable(format!(
                "node {node} did not pick up {command}: its agent is not running"
            )),
            ClientError::Timeout { command, waited } => ApiError::GatewayTimeout(format!(
                "node {node} did not finish {command} within {} s",
                waited.as_secs()
            )),
            other => ApiError::Internal(format!("node {node}: {other}")),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        ApiError::Internal(format!("state store: {err}"))
    }
}

impl From<crate::reconcile::nodes::NodeError> for ApiError {
    fn from(err: crate::reconcile::nodes::NodeError) -> Self {
        ApiError::Internal(err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                "internal error".to_string()
            }
            other => other.to_string(),
        };
        let mut response = (status, axum::Json(ErrorBody { error: message })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn internal_detail_is_not_sent() {
        let r = ApiError::internal("disk on fire at /var/x").into_response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            HeaderValue::from_static("application/json")
        );
        let body = axum::body::to_bytes(r.into_body(), 1024)
            .await
            .expect("body");
        assert_eq!(&body[..], br#"{"error":"internal error"}"#);
    }

    #[test]
    fn client_errors_map_to_gateway_statuses() {
        let e = ApiError::from_client(
            "n1",
            ClientError::Timeout {
                command: "info.mem".into(),
                waited: Duration::from_secs(10),
            },
        );
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        let e = ApiError::from_client(
            "n1",
            ClientError::NotPickedUp {
                command: "info.mem".into(),
                waited: Duration::from_secs(10),
            },
        );
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        let e = ApiError::from_client(
            "n1",
            ClientError::Unresponsive {
                addr: "10.0.0.1:6379".into(),
                command: "BLPOP",
                waited: Duration::from_secs(7),
            },
        );
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.to_string(), "node n1 is unreachable: it does not answer");
    }

    #[test]
    fn unauthorized_carries_www_authenticate() {
        let r = ApiError::Unauthorized("missing bearer token".into()).into_response();
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
