//! Wiring of a `grid-api` process: state store, configured nodes, reconciler, router, listener
//! and graceful shutdown (bounded by [`SHUTDOWN_GRACE`]).

use crate::archive::Archive;
use crate::auth::Authenticator;
use crate::config::{Config, NodeConfig};
use crate::http::{self, AppState};
use crate::reconcile::containers::ContainersController;
use crate::reconcile::nodes::{self as registry, NodesController};
use crate::reconcile::{Controller, Reconciler};
use crate::shutdown::Shutdown;
use crate::store::StateStore;
use crate::store::redb::RedbStore;
use anyhow::Context;
use axum::Router;
use axum::response::{IntoResponse, Response};
use std::any::Any;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

/// How often expired job results are removed.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// How long open connections get to finish after SIGINT/SIGTERM before the server stops anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
    let containers = Arc::new(ContainersController::new(store.clone(), nodes.clone()));
    let controllers: Vec<Arc<dyn Controller>> = vec![nodes.clone(), containers];
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
    let shutdown = state.shutdown.clone();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested");
            shutdown.trigger();
        }
    });
    run_http(listener, app(state), shutdown, SHUTDOWN_GRACE)
        .await
        .context("http server failed")?;
    tracing::info!("shutting down");
    sweeper.abort();
    reconciler.shutdown().await;
    Ok(())
}

/// Serves `app` on `listener` until `shutdown` is triggered, then shuts down gracefully: no new
/// connections, in-flight requests finish (open SSE streams end on the same signal). Connections
/// still open after `grace` are left behind and the function returns anyway.
pub async fn run_http(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: Shutdown,
    grace: Duration,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // No Nagle: an SSE event or a small answer written after the headers would otherwise wait
    // for the client's delayed ACK (40 ms).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, app)
        .with_graceful_shutdown({
            let shutdown = shutdown.clone();
            async move { shutdown.wait().await }
        })
        .into_future();
    let overdue = async {
        shutdown.wait().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r,
        () = overdue => {
            tracing::warn!(?grace, "connections still open after the shutdown grace period, stopping anyway");
            Ok(())
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves a route whose body never ends; returns the address and the server task.
    async fn hanging_server(
        shutdown: Shutdown,
        grace: Duration,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route(
            "/hang",
            get(|| async {
                Body::from_stream(futures::stream::pending::<
                    Result<bytes::Bytes, std::io::Error>,
                >())
            }),
        );
        let task = tokio::spawn(run_http(listener, app, shutdown, grace));
        (addr, task)
    }

    #[tokio::test]
    async fn graceful_shutdown_is_bounded_by_the_grace_period() {
        let shutdown = Shutdown::new();
        let grace = Duration::from_millis(300);
        let (addr, task) = hanging_server(shutdown.clone(), grace).await;
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /hang HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .expect("request");
        // The response head has arrived: the request is in flight and its body never ends.
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.expect("read");
            assert!(n > 0, "connection closed before the response head");
            head.extend_from_slice(&buf[..n]);
        }
        assert!(head.starts_with(b"HTTP/1.1 200"));

        let started = tokio::time::Instant::now();
        shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the server returned despite the open connection")
            .expect("server task")
            .expect("server");
        assert!(started.elapsed() >= grace);
    }

    #[tokio::test]
    async fn shutdown_without_open_connections_does_not_wait_for_the_grace_period() {
        let shutdown = Shutdown::new();
        let (_, task) = hanging_server(shutdown.clone(), Duration::from_secs(600)).await;
        shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the server returned at once")
            .expect("server task")
            .expect("server");
    }
}
