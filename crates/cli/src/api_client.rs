//! HTTP client of the Grid API: base URL, bearer token, and the error answer
//! (`{"error": "..."}` with a status) turned into [`ApiError::Status`].

use grid_proto::api::ErrorBody;
use reqwest::{Method, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// What can go wrong talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The API answered with an error status.
    #[error("{message} (HTTP {status})")]
    Status {
        /// HTTP status code.
        status: u16,
        /// The `error` field of the body, or the body itself, or the status reason.
        message: String,
    },
    /// The request could not be sent or its answer could not be read.
    #[error("{method} {url} failed")]
    Request {
        /// HTTP method.
        method: Method,
        /// Full URL.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The answer was not the JSON the contract promises.
    #[error("unexpected answer to {method} {url}")]
    Decode {
        /// HTTP method.
        method: Method,
        /// Full URL.
        url: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the http client")]
    Build(#[source] reqwest::Error),
}

/// A client of one Grid API endpoint.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// Percent-encodes one path segment (ids are normally plain hex; this keeps odd input from
/// changing the path).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl ApiClient {
    /// A client of the API at `base` (`http://host:port`), sending `token` as a bearer token.
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ApiError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        // Every request goes to `base`: over plain http the system's CA certificates are never
        // needed, and loading them costs more than the whole request on a small machine.
        if base.starts_with("http://") {
            builder = builder.tls_certs_only(std::iter::empty());
        }
        let http = builder.build().map_err(ApiError::Build)?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            http,
        })
    }

    /// The base URL, without a trailing slash.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request; an error status becomes [`ApiError::Status`].
    pub async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
    ) -> Result<Response, ApiError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        if let Some(timeout) = timeout {
            req = req.timeout(timeout);
        }
        finish(method, url, req).await
    }

    /// Sends a request with a raw (possibly streamed) body of `content_type` and no timeout; an
    /// error status becomes [`ApiError::Status`].
    pub async fn send_body(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: reqwest::Body,
    ) -> Result<Response, ApiError> {
        let url = format!("{}{}", self.base, path);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        finish(method, url, req).await
    }

    /// `GET path`, the body as bytes.
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>, ApiError> {
        let resp = self.send::<()>(Method::GET, path, None, None).await?;
        read_bytes(Method::GET, path, resp).await
    }

    /// `GET path`, the body decoded.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let bytes = self.get_bytes(path).await?;
        self.decode(Method::GET, path, &bytes)
    }

    /// `POST path` with an optional JSON body, the body of the answer as bytes.
    pub async fn post_bytes<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<Vec<u8>, ApiError> {
        let resp = self.send(Method::POST, path, body, None).await?;
        read_bytes(Method::POST, path, resp).await
    }

    /// `DELETE path`; the body of the answer is ignored.
    pub async fn delete(&self, path: &str, timeout: Option<Duration>) -> Result<(), ApiError> {
        self.send::<()>(Method::DELETE, path, None, timeout)
            .await
            .map(drop)
    }

    /// Decodes a JSON body, naming the request on failure.
    pub fn decode<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        bytes: &[u8],
    ) -> Result<T, ApiError> {
        serde_json::from_slice(bytes).map_err(|source| ApiError::Decode {
            method,
            url: format!("{}{}", self.base, path),
            source,
        })
    }
}

async fn read_bytes(method: Method, path: &str, resp: Response) -> Result<Vec<u8>, ApiError> {
    let url = resp.url().to_string();
    resp.bytes()
        .await
        .map(|b| b.to_vec())
        .map_err(|source| ApiError::Request {
            method,
            url: if url.is_empty() {
                path.to_string()
            } else {
                url
            },
            source,
        })
}

/// Sends a prepared request; an error status becomes [`ApiError::Status`] with the API's message.
async fn finish(
    method: Method,
    url: String,
    req: reqwest::RequestBuilder,
) -> Result<Response, ApiError> {
    let resp = req.send().await.map_err(|source| ApiError::Request {
        method,
        url,
        source,
    })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    Err(ApiError::Status {
        status: status.as_u16(),
        message: error_message(status, &text),
    })
}

/// The message of an error answer: the `error` field of a JSON body, else the body text, else the
/// status reason.
pub fn error_message(status: StatusCode, body: &str) -> String {
    if let Ok(e) = serde_json::from_str::<ErrorBody>(body) {
        return e.error;
    }
    let text = body.trim();
    if !text.is_empty() {
        return text.to_string();
    }
    status
        .canonical_reason()
        .unwrap_or("request failed")
        .to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_prefers_the_json_error_field() {
        assert_eq!(
            error_message(StatusCode::NOT_FOUND, r#"{"error":"node 12 not found"}"#),
            "node 12 not found"
        );
        assert_eq!(
            error_message(StatusCode::BAD_GATEWAY, " upstream down\n"),
            "upstream down"
        );
        assert_eq!(error_message(StatusCode::NOT_FOUND, ""), "not found");
        let e = ApiError::Status {
            status: 404,
            message: "node 12 not found".into(),
        };
        assert_eq!(e.to_string(), "node 12 not found (HTTP 404)");
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("525400123456"), "525400123456");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }
}
