//! Admin HTTP: `/health`, and model deploy (`POST /api/models`). Mutating calls need the
//! bearer token from the configuration; without a configured token they are refused.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use payswitch_models::model::Model;
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::switch::Switch;

/// Largest model file accepted by the deploy endpoint: a forest of 500 trees of depth 12
/// is a few MiB; 64 MiB leaves room without letting a caller exhaust memory.
pub const MAX_MODEL_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone)]
struct AdminState {
    switch: Arc<Switch>,
    token: Option<Arc<str>>,
}

/// Binds the admin listener and serves it until `shutdown`.
pub async fn start(
    addr: SocketAddr,
    switch: Arc<Switch>,
    token: Option<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding admin listener {addr}"))?;
    let bound = listener.local_addr()?;
    let state = AdminState {
        switch,
        token: token.map(Arc::from),
    };
    // The admin listener starts after the gateway listeners are bound, so a 200 on
    // /health means they are up.
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/api/models", get(models).post(deploy))
        .layer(DefaultBodyLimit::max(MAX_MODEL_BYTES))
        .with_state(state);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((bound, task))
}

fn authorized(state: &AdminState, headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
    let Some(token) = &state.token else {
        return Err((
            StatusCode::FORBIDDEN,
            "no admin token configured: mutating calls are disabled\n".into(),
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in constant time, so the token cannot be guessed byte by byte from timing.
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err((
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token\n".into(),
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Deserialize)]
struct DeployQuery {
    #[serde(default)]
    role: Option<String>,
}

/// `POST /api/models?role=champion|challenger` with the model file as the body.
async fn deploy(
    State(state): State<AdminState>,
    Query(query): Query<DeployQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    authorized(&state, &headers)?;
    let challenger = match query.role.as_deref() {
        None | Some("champion") => false,
        Some("challenger") => true,
        Some(other) => return Err((StatusCode::BAD_REQUEST, format!("unknown role {other:?}\n"))),
    };
    // Parsing and checking a large forest takes milliseconds: off the async workers.
    let model = tokio::task::spawn_blocking(move || Model::load(&body))
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")))?
        .map_err(|e| {
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("model refused: {e}\n"),
            )
        })?;
    let id = model.id().to_owned();
    let scoring = &state.switch.scoring;
    let deployed = if challenger {
        scoring.add_challenger(Arc::new(model))
    } else {
        scoring.set_champion(Arc::new(model))
    };
    deployed.map_err(|e| {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("model refused: {e}\n"),
        )
    })?;
    Ok(Json(serde_json::json!({
        "deployed": id,
        "role": if challenger { "challenger" } else { "champion" },
    })))
}

/// `GET /api/models`: champion and challengers.
async fn models(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let scoring = &state.switch.scoring;
    let stats = &scoring.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    Json(serde_json::json!({
        "champion": scoring.champion().map(|m| m.id().to_owned()),
        "challengers": scoring.challengers().iter().map(|m| m.id().to_owned()).collect::<Vec<_>>(),
        "rules": scoring.rules().current().names().map(str::to_owned).collect::<Vec<_>>(),
        "decisions": {
            "approve": load(&stats.decisions[0]),
            "review": load(&stats.decisions[1]),
            "decline": load(&stats.decisions[2]),
        },
        "budget_breaches": load(&stats.budget_breaches),
        "challenger_scored": load(&stats.challenger_scored),
        "challenger_agreed": load(&stats.challenger_agreed),
    }))
}
