//! The HTTP layer: the whole route table in one place ([`route_table`]), the shared state of the
//! handlers, and the router with its fallbacks, body limit and authentication.
//!
//! Every route is registered through utoipa-axum's `OpenApiRouter` with a `#[utoipa::path]`
//! handler, so the OpenAPI document is made from the same table as the router and cannot drift.

pub mod containers;
pub mod extract;
pub mod health;
pub mod jobs;
pub mod nodes;
pub mod processes;
pub mod sse;
pub mod target;

use crate::archive::Archive;
use crate::auth::{self, Authenticator};
use crate::error::{ApiError, ApiResult};
use crate::reconcile::nodes::NodesController;
use crate::shutdown::Shutdown;
use crate::store::StateStore;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use grid_client::NodeClient;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;
use utoipa::openapi::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

/// Time budget of a direct call to a node.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The state store.
    pub store: Arc<dyn StateStore>,
    /// Node registry and connections.
    pub nodes: Arc<NodesController>,
    /// Bearer-token checks.
    pub auth: Arc<Authenticator>,
    /// Finished job results.
    pub archive: Archive,
    /// Live job output fan-out.
    pub streams: sse::StreamHub,
    /// Tokens accepted by `POST /nodes/join`.
    pub join_tokens: Arc<Vec<String>>,
    /// Triggered when the server shuts down: open SSE streams end on it.
    pub shutdown: Shutdown,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("auth", &self.auth)
            .field("archive", &self.archive)
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// The state of a server on `store` with the given node controller and configuration.
    pub fn new(
        store: Arc<dyn StateStore>,
        nodes: Arc<NodesController>,
        auth: Arc<Authenticator>,
        join_tokens: Vec<String>,
        job_retention: Duration,
    ) -> Self {
        let archive = Archive::new(store.clone(), job_retention);
        Self {
            streams: sse::StreamHub::new(archive.clone()),
            store,
            nodes,
            auth,
            archive,
            join_tokens: Arc::new(join_tokens),
            shutdown: Shutdown::new(),
        }
    }

    /// The client of a registered node: `404` when the node is unknown, `503` when it cannot be
    /// reached.
    pub async fn node(&self, id: &str) -> ApiResult<NodeClient> {
        nodes::node_client(self, id).await
    }
}

/// Runs a built-in on a node and decodes its JSON answer (10 s budget).
pub async fn call_json<T: DeserializeOwned, A: Serialize + ?Sized>(
    client: &NodeClient,
    node: &str,
    command: &str,
    args: &A,
) -> ApiResult<T> {
    let args = serde_json::to_value(args).map_err(ApiError::internal)?;
    client
        .call_json(command, args, CALL_TIMEOUT)
        .await
        .map_err(|e| ApiError::from_client(node, e))
}

/// A (method, path) pair of the route table, e.g. `("GET", "/nodes/{nodeid}")`.
pub type RouteKey = (String, String);

/// The route table being built: the router with its document, and every (method, path) added.
pub struct RouteTable {
    router: OpenApiRouter<AppState>,
    routes: Vec<RouteKey>,
}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTable")
            .field("routes", &self.routes)
            .finish()
    }
}

fn methods_of(item: &utoipa::openapi::PathItem) -> Vec<&'static str> {
    [
        ("GET", item.get.is_some()),
        ("PUT", item.put.is_some()),
        ("POST", item.post.is_some()),
        ("DELETE", item.delete.is_some()),
        ("PATCH", item.patch.is_some()),
        ("HEAD", item.head.is_some()),
        ("OPTIONS", item.options.is_some()),
        ("TRACE", item.trace.is_some()),
    ]
    .into_iter()
    .filter_map(|(m, on)| on.then_some(m))
    .collect()
}

impl RouteTable {
    fn new() -> Self {
        Self {
            router: OpenApiRouter::with_openapi(crate::openapi::base()),
            routes: Vec::new(),
        }
    }

    /// Adds `r` without the body size limit (for uploads that stream their body).
    fn add_unlimited(self, r: UtoipaMethodRouter<AppState>) -> Self {
        let (schemas, paths, method_router) = r;
        self.add((
            schemas,
            paths,
            method_router.layer(DefaultBodyLimit::disable()),
        ))
    }

    fn add(mut self, r: UtoipaMethodRouter<AppState>) -> Self {
        for (path, item) in &r.1.paths {
            for m in methods_of(item) {
                self.routes.push((m.to_string(), path.clone()));
            }
        }
        self.router = self.router.routes(r);
        self
    }

    /// Every (method, path) registered, sorted.
    pub fn routes(&self) -> Vec<RouteKey> {
        let mut r = self.routes.clone();
        r.sort();
        r
    }

    /// The axum router (without state, fallbacks and layers) and the OpenAPI document.
    pub fn split(self) -> (Router<AppState>, OpenApi) {
        self.router.split_for_parts()
    }
}

/// The whole route table of the Grid API.
pub fn route_table() -> RouteTable {
    RouteTable::new()
        .add(routes!(health::health))
        // Nodes
        .add(routes!(nodes::list_nodes))
        .add(routes!(nodes::join_node))
        .add(routes!(nodes::get_node))
        .add(routes!(nodes::reboot_node))
        .add(routes!(nodes::ping_node))
        .add(routes!(nodes::node_state))
        .add(routes!(nodes::node_cpus))
        .add(routes!(nodes::node_disks))
        .add(routes!(nodes::node_mem))
        .add(routes!(nodes::node_nics))
        .add(routes!(nodes::node_info))
        // Jobs
        .add(routes!(jobs::list_jobs, jobs::kill_all_jobs))
        .add(routes!(jobs::get_job, jobs::kill_job))
        .add(routes!(jobs::stream_job))
        // Processes
        .add(routes!(processes::list_processes, processes::start_process))
        .add(routes!(
            processes::get_process,
            processes::kill_process,
            processes::signal_process
        ))
        // Containers
        .add(routes!(
            containers::list_containers,
            containers::create_container
        ))
        .add(routes!(
            containers::get_container,
            containers::delete_container
        ))
        .add(routes!(containers::start_container))
        .add(routes!(containers::stop_container))
        .add(routes!(containers::ping_container))
        .add(routes!(containers::container_state))
        .add(routes!(containers::container_info))
        .add(routes!(
            containers::list_container_jobs,
            containers::kill_all_container_jobs
        ))
        .add(routes!(
            containers::get_container_job,
            containers::kill_container_job,
            containers::signal_container_job
        ))
        .add(routes!(containers::stream_container_job))
        .add(routes!(
            containers::list_container_processes,
            containers::start_container_process
        ))
        .add(routes!(
            containers::get_container_process,
            containers::kill_container_process,
            containers::signal_container_process
        ))
        .add(routes!(containers::download_file, containers::delete_file))
        .add_unlimited(routes!(containers::upload_file))
}

/// Paths served outside the document: the document itself and its docs page.
pub const UNDOCUMENTED: &[&str] = &["/openapi.json", "/docs", "/docs/", "/docs/{*rest}"];

/// The OpenAPI document of the route table.
pub fn openapi() -> OpenApi {
    route_table().split().1
}

/// The complete application: routes, docs, fallbacks, body limit and authentication.
pub fn app(state: AppState) -> Router {
    let (router, doc) = route_table().split();
    let docs: Router<AppState> = utoipa_swagger_ui::SwaggerUi::new("/docs")
        .url("/openapi.json", doc)
        .into();
    router
        .merge(docs)
        .fallback(extract::no_route)
        .method_not_allowed_fallback(extract::method_not_allowed)
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.auth.clone(),
            auth::require_auth,
        ))
        .with_state(state)
}
