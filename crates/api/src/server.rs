//! Wiring of a `grid-api` process: state store, configured nodes, reconciler, router, listener
//! and graceful shutdown.

use crate::archive::Archive;
use crate::auth::Authenticator;
use crate::config::{Config, NodeConfig};
use crate::http::{self, AppState};
use crate::reconcile::nodes::{self as registry, NodesController};
use crate::reconcile::{Controller, Reconciler};
use crate::store::StateStore;
use crate::store::redb::RedbStore;
use anyhow::Context;
use axum::Router;
use axum::response::{IntoResponse, Response};
use std::any::Any;
use std::sync::Arc;
use std::time::Duration;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

/// How often expired job results are removed.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

fn panic_response(err: Box<dyn Any + Send + 'static>) -> Response {
    let detail = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    crate::error::ApiError::internal(format!("handler panicked: {detail}")).into_response()
}

/// The router of a server with `state`, with tracing and panic catching.
pub fn app(state: AppState) -> Router {
    http::app(state)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
}

/// Builds the shared state from a configuration and an opened store.
pub fn state(
    config: &Config,
    store: Arc<dyn StateStore>,
    nodes: Arc<NodesController>,
) -> anyhow::Result<AppState> {
    let auth = Authenticator::new(&config.tokens, config.jwt.as_ref())
        .context("invalid authentication settings")?;
    Ok(AppState::new(
        store,
        nodes,
        Arc::new(auth),
        config.join_tokens.clone(),
        config.job_retention,
    ))
}

/// Runs the API until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let path = config.data_dir.join("state.redb");
    let store: Arc<dyn StateStore> = Arc::new(
        RedbStore::open(&path)
            .with_context(|| format!("cannot open state store {}", path.display()))?,
    );
    register_config_nodes(store.as_ref(), &config.nodes).await?;
    let nodes = Arc::new(NodesController::new());
    let controllers: Vec<Arc<dyn Controller>> = vec![nodes.clone()];
    let reconciler = Reconciler::new(store.clone(), controllers).spawn();
    let state = state(&config, store.clone(), nodes)?;
    if state.auth.is_empty() {
        tracing::warn!("no api token or jwt key is configured: every protected request gets 401");
    }
    let sweeper = Archive::new(store.clone(), config.job_retention).spawn_sweeper(SWEEP_EVERY);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "grid-api listening");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("http server failed")?;
    tracing::info!("shutting down");
    sweeper.abort();
    reconciler.shutdown().await;
    Ok(())
}

/// Registers the nodes of the configuration (source "config"). A node that joined by itself with
/// the same id keeps its registration (logged).
pub async fn register_config_nodes(
    store: &dyn StateStore,
    nodes: &[NodeConfig],
) -> anyhow::Result<()> {
    for n in nodes {
        let spec = registry::NodeSpec {
            id: n.id.clone(),
            hostname: String::new(),
            redis_addr: n.redis_addr.clone(),
            redis_password: n.redis_password.clone(),
            instance_id: String::new(),
            source: registry::NodeSource::Config,
            token_hash: None,
        };
        match registry::register_node(store, spec).await {
            Ok(_) => {
                tracing::info!(node = %n.id, addr = %n.redis_addr, "registered configured node")
            }
            Err(e @ registry::RegisterError::TokenMismatch { .. }) => {
                tracing::warn!(node = %n.id, error = %e, "configured node is already registered by a join; keeping the join");
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("cannot register configured node {}", n.id)));
            }
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for sigterm");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
