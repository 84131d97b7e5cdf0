//! `GET /health`: liveness of the API process itself (no token needed).

use crate::http::extract::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Answer of `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the API answers.
    pub status: String,
}

/// Whether the API process is up.
#[utoipa::path(
    get, path = "/health", tag = "health",
    security(()),
    responses((status = 200, description = "The API is up", body = Health))
)]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".to_string(),
    })
}
