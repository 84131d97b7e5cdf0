//! The OpenAPI document: the base (title, bearer security scheme, shared schemas) that the route
//! table of [`crate::http::route_table`] fills with every path.
//!
//! The checked-in copy is `openapi/grid.json`; `tests/openapi.rs` fails when it is stale
//! (`GRID_UPDATE_OPENAPI=1 cargo test -p grid-api --test openapi` rewrites it).

use grid_proto::api::ErrorBody;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi as _};

/// Name of the bearer security scheme in the document.
pub const BEARER: &str = "bearer";

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A static API token or a JWT (HS256 or ES384) with a grid scope",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Grid API",
        description = "Control plane of a grid of core0 nodes. Errors are always `{\"error\": \"...\"}`.",
        license(name = "Apache-2.0"),
    ),
    modifiers(&BearerScheme),
    security(("bearer" = [])),
    components(schemas(ErrorBody)),
    tags(
        (name = "health", description = "Liveness of the API"),
        (name = "nodes", description = "Nodes and their hardware (direct)"),
        (name = "jobs", description = "Jobs of a node (direct)"),
        (name = "processes", description = "OS processes of a node (direct)"),
    )
)]
struct ApiDoc;

/// The document before the routes are added.
pub fn base() -> OpenApi {
    ApiDoc::openapi()
}

/// The complete document, as pretty JSON with a final newline (the form of `openapi/grid.json`).
pub fn pretty_json() -> Result<String, serde_json::Error> {
    let mut text = serde_json::to_string_pretty(&crate::http::openapi())?;
    text.push('\n');
    Ok(text)
}
