//! Admin HTTP, for operators (bind it to localhost unless a proxy guards it):
//!
//! - `GET /` — the live dashboard (one page, assets embedded).
//! - `GET /health` — the process is alive; `GET /ready` — listeners up, an acquirer
//!   connected whose circuit breaker is not open, the configured model loaded (503 with
//!   the reasons otherwise); `degraded` lists acquirers down, drained or tripped even
//!   when the switch is ready.
//! - `GET /metrics` — Prometheus text format.
//! - `GET /api/stats` — percentiles per stage over the last 10 s and since start, TPS,
//!   code mix, acquirers, models, journal, reversals, and the per-second series.
//! - `GET /api/acquirers`; `POST /api/acquirers/{name}/drain|enable`.
//! - `GET /api/routes`; `POST /api/routes/reload` (re-reads the config file's routes).
//! - `GET /api/models`; `POST /api/models?role=champion|challenger` (deploy a model file);
//!   `POST /api/models/promote?id=ID` (a challenger becomes champion).
//!
//! - `GET /api/cluster` — with `[cluster]`: this node's lease and counters (takeovers,
//!   claims, fenced sends), every node's lease, the journal stream and replication.
//! - `POST /api/tls/reload` — read the certificate, key, client CA and allowlist files
//!   again; new gateway connections use them.
//!
//! Mutating calls need the bearer token from the configuration; without a configured
//! token they are refused. Every mutating call, allowed or not, is written to the audit
//! log (`admin-audit.jsonl` in the journal directory, synced before the answer): when,
//! from which address, whether the token was right, what was asked and the outcome.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::Path;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use payswitch_models::model::Model;
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::ops::Sources;

/// Largest model file accepted by the deploy endpoint: a forest of 500 trees of depth 12
/// is a few MiB; 64 MiB leaves room without letting a caller exhaust memory.
pub const MAX_MODEL_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone)]
struct AdminState {
    sources: Sources,
    token: Option<Arc<str>>,
    /// What `/ready` checks and `/api/routes/reload` reads.
    ready: Arc<Readiness>,
}

/// What readiness depends on besides the switch's parts.
#[derive(Debug)]
pub struct Readiness {
    /// A champion model is configured, so one must be loaded.
    pub model_required: bool,
    /// The configuration file, if the switch was started from one.
    pub config_source: Option<std::path::PathBuf>,
    /// Counters of the gateway listeners (streams served).
    pub serve_stats: Arc<payswitch_net::ServeStats>,
    /// The listeners' TLS settings, for `POST /api/tls/reload`.
    pub tls: Arc<crate::ops::tls_reload::TlsReload>,
    /// Where mutating calls are recorded; `None` without a journal directory.
    pub audit: Option<AuditLog>,
}

/// The admin audit log: one JSON line per mutating call, appended and synced before the
/// call is answered. Its file is the switch's user's alone (0600).
#[derive(Debug, Clone)]
pub struct AuditLog {
    file: Arc<std::sync::Mutex<std::fs::File>>,
}

impl AuditLog {
    /// Opens (or creates) `admin-audit.jsonl` in `dir`.
    pub fn open(dir: &std::path::Path) -> anyhow::Result<AuditLog> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join("admin-audit.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening the admin audit log {}", path.display()))?;
        Ok(AuditLog {
            file: Arc::new(std::sync::Mutex::new(file)),
        })
    }

    fn record(&self, entry: &serde_json::Value) -> std::io::Result<()> {
        use std::io::Write;
        let mut line = entry.to_string();
        line.push('\n');
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        (&*file).write_all(line.as_bytes())?;
        file.sync_data()
    }
}

/// Binds the admin listener and serves it until `shutdown`.
pub async fn start(
    addr: SocketAddr,
    sources: Sources,
    token: Option<String>,
    ready: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding admin listener {addr}"))?;
    let bound = listener.local_addr()?;
    let state = AdminState {
        sources,
        token: token.map(Arc::from),
        ready: Arc::new(ready),
    };
    // The admin listener starts after the gateway listeners are bound, so a 200 on
    // /health means they are up.
    let app = Router::new()
        .route("/", get(dashboard))
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(readiness))
        .route("/metrics", get(metrics))
        .route("/api/stats", get(stats))
        .route("/api/cluster", get(cluster))
        .route("/api/acquirers", get(acquirers))
        .route("/api/reversals", get(reversals))
        .route("/api/acquirers/:name/:action", post(acquirer_action))
        .route("/api/routes", get(routes))
        .route("/api/routes/reload", post(reload_routes))
        .route("/api/models", get(models).post(deploy))
        .route("/api/models/promote", post(promote))
        .route("/api/tls/reload", post(reload_tls))
        .layer(axum::middleware::from_fn_with_state(state.clone(), audit))
        .layer(DefaultBodyLimit::max(MAX_MODEL_BYTES))
        .with_state(state);
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((bound, task))
}

/// Records every call that is not a read in the audit log, with its outcome. A call whose
/// record cannot be written is answered 500 (it has been carried out: the log says
/// what failed).
async fn audit(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let token_ok = authorized(&state, request.headers()).is_ok();
    let call = format!("{} {}", request.method(), request.uri());
    let response = next.run(request).await;
    let entry = serde_json::json!({
        "time_ms": crate::clock::now().unix_ms(),
        "peer": peer,
        "token_ok": token_ok,
        "call": call,
        "status": response.status().as_u16(),
    });
    tracing::info!(peer = ?peer, call = %call, token_ok, status = response.status().as_u16(), "admin call");
    if let Some(log) = &state.ready.audit {
        if let Err(e) = log.record(&entry) {
            tracing::error!(error = %e, "admin audit log not written");
            return (StatusCode::INTERNAL_SERVER_ERROR, "audit log not written\n").into_response();
        }
    }
    response
}

/// `POST /api/tls/reload`.
async fn reload_tls(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    authorized(&state, &headers)?;
    match state.ready.tls.reload() {
        Ok(loaded) => Ok(Json(serde_json::json!({ "reloaded": loaded }))),
        Err(e) => Err((StatusCode::CONFLICT, format!("{e:#}\n"))),
    }
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
    let scoring = &state.sources.scoring;
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
    let scoring = &state.sources.scoring;
    let stats = &scoring.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    Json(serde_json::json!({
        "champion": scoring.champion().map(|m| m.id().to_owned()),
        "challengers": scoring.challengers().iter().map(|c| c.model.id().to_owned()).collect::<Vec<_>>(),
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

/// The dashboard page: one file, no external assets (deployments are often offline).
const DASHBOARD_HTML: &str = include_str!("../../assets/dashboard.html");

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD_HTML)
}

/// `GET /ready`: 200 when the switch can authorize, 503 with the reasons when not.
async fn readiness(State(state): State<AdminState>) -> (StatusCode, Json<serde_json::Value>) {
    let snapshot = state.sources.snapshot();
    let mut reasons = Vec::new();
    let mut degraded = Vec::new();
    if !snapshot.acquirers.iter().any(|a| a.state == "up") {
        reasons.push("no acquirer connected".to_string());
    } else if !snapshot
        .acquirers
        .iter()
        .any(|a| a.state == "up" && a.breaker != "open")
    {
        reasons.push("every connected acquirer's circuit breaker is open".to_string());
    }
    for a in &snapshot.acquirers {
        match (a.state, a.breaker) {
            ("down", _) => degraded.push(format!("acquirer {}: down", a.name)),
            ("draining", _) => degraded.push(format!("acquirer {}: drained", a.name)),
            (_, "closed") => {}
            (_, breaker) => {
                degraded.push(format!("acquirer {}: circuit breaker {breaker}", a.name))
            }
        }
    }
    if state.ready.model_required && snapshot.champion.is_none() {
        reasons.push("the configured model is not loaded".to_string());
    }
    if snapshot.journal.as_ref().is_some_and(|j| j.failed) {
        reasons.push("the journal has stopped after an I/O error".to_string());
    }
    if let Some(replica) = snapshot.journal.as_ref().and_then(|j| j.replica) {
        if !replica.connected {
            reasons
                .push("no NATS server connected: the journal stream is out of reach".to_string());
        } else if replica.last_failed {
            reasons.push(
                "the journal stream did not acknowledge a group in time in the last 5 s (no quorum?)"
                    .to_string(),
            );
        }
    }
    if let Some(cluster) = &snapshot.cluster {
        if !cluster.lease_held {
            reasons.push(format!(
                "node {} does not hold its cluster lease (no quorum of NATS servers, or paused): nothing is sent until it does",
                cluster.node
            ));
        }
    }
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            serde_json::json!({ "ready": reasons.is_empty(), "reasons": reasons, "degraded": degraded }),
        ),
    )
}

/// `GET /api/stats`.
async fn stats(State(state): State<AdminState>) -> Json<serde_json::Value> {
    Json(crate::ops::stats::stats(&state.sources.snapshot()))
}

/// `GET /api/cluster`: this node's lease and counters, every node's lease, the journal
/// stream's state. 404 without `[cluster]`.
async fn cluster(State(state): State<AdminState>) -> (StatusCode, Json<serde_json::Value>) {
    let Some(view) = &state.sources.cluster else {
        return (
            StatusCode::NOT_FOUND,
            Json(
                serde_json::json!({"error": "not a cluster node (no [cluster] in the configuration)"}),
            ),
        );
    };
    let snapshot = state.sources.snapshot();
    let this = crate::ops::stats::stats(&snapshot)["cluster"].clone();
    let nodes = crate::cluster::view::leases(&view.leases).await;
    let stream = crate::cluster::view::stream_state(&view.context, &view.stream).await;
    let replica = snapshot.journal.as_ref().and_then(|j| j.replica);
    (
        StatusCode::OK,
        Json(serde_json::json!({
            "node": view.node,
            "lease_ms": view.lease.as_millis() as u64,
            "this": this,
            "nodes": nodes.as_ref().map_err(|e| e.to_string()).map(|n| serde_json::json!(n)).unwrap_or_else(|e| serde_json::json!({"error": e})),
            "stream": stream.as_ref().map_err(|e| e.to_string()).map(|s| serde_json::json!(s)).unwrap_or_else(|e| serde_json::json!({"error": e})),
            "replication": replica.map(|r| serde_json::json!({
                "connected": r.connected,
                "mean_ack_us": r.mean_ack_us,
                "acknowledged": r.acknowledged,
                "failed": r.failed,
            })),
        })),
    )
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::ops::stats::prometheus(&state.sources.snapshot(), &state.ready.serve_stats),
    )
}

/// `GET /api/acquirers`.
/// Most escalated reversals listed at once: the count is in `/api/stats` and the metrics.
const ESCALATED_LISTED: usize = 1_000;

/// `/api/reversals`: the queue's counters and the escalated reversals, oldest first.
async fn reversals(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let queue = &state.sources.reversals;
    Json(serde_json::json!({
        "pending": queue.stats.pending.load(std::sync::atomic::Ordering::Relaxed),
        "escalated_count": queue.stats.escalated.load(std::sync::atomic::Ordering::Relaxed),
        "escalated": queue.escalated(ESCALATED_LISTED),
    }))
}

async fn acquirers(State(state): State<AdminState>) -> Json<serde_json::Value> {
    Json(crate::ops::stats::acquirers(&state.sources.snapshot()))
}

/// `POST /api/acquirers/{name}/drain|enable`.
async fn acquirer_action(
    State(state): State<AdminState>,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    authorized(&state, &headers)?;
    let link = state
        .sources
        .links
        .iter()
        .find(|l| l.name() == name)
        .ok_or((StatusCode::NOT_FOUND, format!("no acquirer {name:?}\n")))?;
    match action.as_str() {
        "drain" => link.set_draining(true),
        "enable" => link.set_draining(false),
        other => return Err((StatusCode::NOT_FOUND, format!("unknown action {other:?}\n"))),
    }
    Ok(Json(
        serde_json::json!({ "acquirer": name, "state": link.state() }),
    ))
}

/// `GET /api/routes`.
async fn routes(State(state): State<AdminState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "routes": state.sources.router.load().routes(),
        "source": state.ready.config_source,
    }))
}

/// `POST /api/routes/reload`: re-reads the routes of the configuration file and swaps
/// them in whole, if they are valid and name only the acquirers already connected.
async fn reload_routes(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    authorized(&state, &headers)?;
    let Some(path) = state.ready.config_source.clone() else {
        return Err((
            StatusCode::CONFLICT,
            "started without a configuration file: nothing to reload\n".into(),
        ));
    };
    let config = crate::config::Config::from_file(&path).map_err(|e| {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("routes refused: {e}\n"),
        )
    })?;
    let running: Vec<&str> = state.sources.links.iter().map(|l| l.name()).collect();
    let configured: Vec<&str> = config.acquirers.iter().map(|a| a.name.as_str()).collect();
    if running != configured {
        return Err((
            StatusCode::CONFLICT,
            "the file's acquirers differ from the running ones: that needs a restart\n".into(),
        ));
    }
    let router = config.router().map_err(|e| {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("routes refused: {e}\n"),
        )
    })?;
    state.sources.router.store(Arc::new(router));
    tracing::info!(routes = config.routes.len(), file = %path.display(), "routes reloaded");
    Ok(Json(serde_json::json!({ "reloaded": config.routes.len() })))
}

#[derive(Debug, Deserialize)]
struct PromoteQuery {
    id: String,
}

/// `POST /api/models/promote?id=ID`.
async fn promote(
    State(state): State<AdminState>,
    Query(query): Query<PromoteQuery>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    authorized(&state, &headers)?;
    state
        .sources
        .scoring
        .promote(&query.id)
        .map_err(|e| (StatusCode::NOT_FOUND, format!("{e}\n")))?;
    Ok(Json(serde_json::json!({ "champion": query.id })))
}
