//! Admin HTTP: `/health` for now (the operators' API grows here).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::routing::get;
use axum::Router;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::switch::Switch;

/// Binds the admin listener and serves it until `shutdown`.
pub async fn start(
    addr: SocketAddr,
    _switch: Arc<Switch>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding admin listener {addr}"))?;
    let bound = listener.local_addr()?;
    // The admin listener starts after the gateway listeners are bound, so a 200 here
    // means they are up.
    let app = Router::new().route("/health", get(|| async { "ok\n" }));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((bound, task))
}
