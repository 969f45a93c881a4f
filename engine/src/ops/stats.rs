//! What operators see: the JSON of `/api/stats` and `/api/acquirers`, and the Prometheus
//! text of `/metrics`, each a pure function of one [`Snapshot`] of the switch's counters
//! and latency histograms.
//!
//! The Prometheus text format is written here rather than through a client library: the
//! histograms are HdrHistograms recorded per thread and merged once a second, which
//! no client library's histogram type models, and the format itself is a few lines per
//! family (it is checked with the reference parser in `engine/tests/operators.rs`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use payswitch_net::ServeStats;
use payswitch_protocol::ResponseCode;
use serde_json::{json, Value};

use crate::ops::metrics::{Buckets, Stage, BUCKETS_S, WINDOW_SECONDS};
use crate::ops::snapshot::Snapshot;
use crate::ops::Sources;

/// Cumulative response counts about a second apart, to give the last window's code mix
/// and TPS: at most `WINDOW_SECONDS + 2` entries.
pub type CodeHistory = Mutex<Vec<(std::time::Instant, BTreeMap<String, u64>)>>;

/// Takes a sample of the response counts; called once a second (see `tick`).
fn sample_codes(sources: &Sources) {
    let now = super::snapshot::codes(&sources.counters.responses);
    let mut history = sources
        .counters
        .code_history
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    history.push((std::time::Instant::now(), now));
    let excess = history.len().saturating_sub(WINDOW_SECONDS + 1);
    history.drain(..excess);
}

/// Once a second until `shutdown`: samples the response counts, so the last window's
/// code mix and TPS do not depend on anyone polling.
pub async fn tick(sources: Sources, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => sample_codes(&sources),
        }
    }
}

/// Code counts over about the last `WINDOW_SECONDS`, and the seconds they cover.
pub(super) fn codes_window(
    history: &CodeHistory,
    now: &BTreeMap<String, u64>,
) -> (BTreeMap<String, u64>, f64) {
    let history = history.lock().unwrap_or_else(|e| e.into_inner());
    let at = std::time::Instant::now();
    let Some((since, base)) = history.first() else {
        return (BTreeMap::new(), 0.0);
    };
    let seconds = at.duration_since(*since).as_secs_f64();
    let mut window = BTreeMap::new();
    for (code, n) in now {
        let before = base.get(code).copied().unwrap_or(0);
        if *n > before {
            window.insert(code.clone(), n - before);
        }
    }
    (window, seconds)
}

/// `/api/acquirers`: one object per acquirer.
pub fn acquirers(snapshot: &Snapshot) -> Value {
    let list: Vec<Value> = snapshot
        .acquirers
        .iter()
        .map(|a| {
            let failed = a.timeouts + a.lost;
            json!({
                "name": a.name,
                "state": a.state,
                "breaker": a.breaker,
                "breaker_opened": a.breaker_opened,
                "breaker_refused": a.breaker_refused,
                "in_flight": a.in_flight,
                "answered": a.answered,
                "timeouts": a.timeouts,
                "lost": a.lost,
                "refused": a.refused,
                "late": a.late,
                "late_approvals": a.late_approvals,
                "connects": a.connects,
                "success_rate": (a.answered + failed > 0).then(|| a.answered as f64 / (a.answered + failed) as f64),
                "p50_us": a.latency.p50_us,
                "p99_us": a.latency.p99_us,
            })
        })
        .collect();
    Value::Array(list)
}

fn models(snapshot: &Snapshot) -> Value {
    json!({
        "champion": snapshot.champion.as_ref().map(|m| json!({
            "id": m.id,
            "kind": m.kind,
            "mean_score": m.mean_score,
        })),
        "challengers": snapshot.challengers.iter().map(|c| {
            json!({
                "id": c.id,
                "kind": c.kind,
                "scored": c.scored,
                "agreed": c.agreed,
                "agreement": (c.scored > 0).then(|| c.agreed as f64 / c.scored as f64),
                "mean_score": c.mean_score,
                "champion_mean_score": c.champion_mean_score,
            })
        }).collect::<Vec<_>>(),
    })
}

fn journal(snapshot: &Snapshot) -> Value {
    match &snapshot.journal {
        None => json!({"enabled": false}),
        Some(j) => json!({
            "enabled": true,
            "fsync": j.fsync,
            "records": j.records,
            "commits": j.commits,
            "queued": j.queued,
            "last_seq": j.last_seq,
            "failed": j.failed,
            "replica": j.replica.map(|r| json!({
                "acknowledged": r.acknowledged,
                "failed": r.failed,
                "groups": r.groups,
                "mean_ack_us": r.mean_ack_us,
                "connected": r.connected,
                "last_failed": r.last_failed,
            })),
        }),
    }
}

/// `/api/stats`.
pub fn stats(snapshot: &Snapshot) -> Value {
    let window_total: u64 = snapshot.codes_window.values().sum();
    let tps = if snapshot.window_seconds > 0.0 {
        window_total as f64 / snapshot.window_seconds
    } else {
        0.0
    };
    let approval_rate = (window_total > 0).then(|| {
        snapshot.codes_window.get("00").copied().unwrap_or(0) as f64 / window_total as f64
    });
    let stages: Vec<Value> = snapshot
        .stages
        .iter()
        .map(|(stage, window, since)| {
            json!({"stage": stage.as_str(), "window": window, "since_start": since})
        })
        .collect();
    let series = &snapshot.series;
    let mut p99 = serde_json::Map::new();
    for (i, stage) in Stage::ALL.iter().enumerate() {
        p99.insert(
            stage.as_str().into(),
            series
                .iter()
                .map(|p| p.p99_us[i])
                .collect::<Vec<_>>()
                .into(),
        );
    }
    let decisions = &snapshot.decisions;
    let reversals = &snapshot.reversals;
    json!({
        "uptime_s": snapshot.uptime_s,
        "window_s": WINDOW_SECONDS,
        "tps": tps,
        "approval_rate": approval_rate,
        "in_flight": snapshot.in_flight,
        "codes": snapshot.codes,
        "codes_window": snapshot.codes_window,
        "stages": stages,
        "series": {
            "t": series.iter().map(|p| p.t).collect::<Vec<_>>(),
            "tps": series.iter().map(|p| p.count).collect::<Vec<_>>(),
            "p99_us": p99,
        },
        "acquirers": acquirers(snapshot),
        "decisions": {
            "approve": decisions[0],
            "review": decisions[1],
            "decline": decisions[2],
        },
        "models": models(snapshot),
        "journal": journal(snapshot),
        "reversals": {
            "pending": reversals.pending,
            "sent": reversals.sent,
            "acknowledged": reversals.acknowledged,
            "deferred": reversals.deferred,
            "escalated": reversals.escalated,
        },
        "stand_in": {
            "approved": snapshot.stand_in_approved,
            "refused": snapshot.stand_in_refused,
            "advices_pending": reversals.advices_pending,
            "advices_acknowledged": reversals.advices_acknowledged,
        },
        "duplicates": snapshot.duplicates,
        "shed": snapshot.shed,
        "cluster": snapshot.cluster.as_ref().map(|c| json!({
            "node": c.node,
            "lease_held": c.lease_held,
            "generation": c.generation,
            "lease_remaining_ms": c.lease_remaining_ms,
            "takeovers": c.takeovers,
            "moved": c.moved,
            "last_takeover_ms": c.last_takeover_ms,
            "claims_lost": c.claims_lost,
            "claims_failed": c.claims_failed,
            "claims_settled": c.claims_settled,
            "fenced": c.fenced,
            "followed": c.followed,
            "follow_dropped": c.follow_dropped,
            "follow_lag": c.follow_lag,
        })),
        "shards": snapshot.shards.iter().map(|s| json!({
            "queue_depth": s.queue_depth,
            "duplicates_window": s.window_len,
        })).collect::<Vec<_>>(),
    })
}

/// A label value with `\`, `"` and newlines escaped, as the text format requires.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, b: &Buckets) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (bound, count) in BUCKETS_S.iter().zip(b.cumulative) {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", b.count);
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", b.sum_s);
    let _ = writeln!(out, "{name}_count{braces} {}", b.count);
}

/// `/metrics`: the Prometheus text format (version 0.0.4).
pub fn prometheus(snapshot: &Snapshot, serve: &ServeStats) -> String {
    let mut out = String::with_capacity(16 * 1024);
    latency_histograms(&mut out, snapshot);
    outcome_counters(&mut out, snapshot);
    load_gauges(&mut out, snapshot);
    acquirer_gauges(&mut out, snapshot);
    model_info(&mut out, snapshot);
    journal_gauges(&mut out, snapshot);
    cluster_gauges(&mut out, snapshot);
    header(
        &mut out,
        "payswitch_gateway_connections_total",
        "counter",
        "Gateway connections accepted.",
    );
    let _ = writeln!(
        out,
        "payswitch_gateway_connections_total {}",
        serve.connections.load(Ordering::Relaxed)
    );
    let counters: [(&str, &str, &AtomicU64); 6] = [
        (
            "payswitch_gateway_shed_total",
            "Requests answered 91 at once because their gateway was at pipeline.max_in_flight_per_gateway or pipeline.max_rate_per_gateway (also counted in shed).",
            &serve.gateway_shed,
        ),
        (
            "payswitch_gateway_idle_closed_total",
            "Gateway TCP connections closed after pipeline.idle_timeout_s without a frame, and TCP connections and QUIC streams closed after pipeline.stall_timeout_s with a frame begun or answers not taken.",
            &serve.idle_closed,
        ),
        (
            "payswitch_gateway_connections_refused_total",
            "Gateway connections refused: every place taken, or the peer's share (pipeline.max_connections_per_peer).",
            &serve.connections_refused,
        ),
        (
            "payswitch_gateway_handshakes_failed_total",
            "Gateway TLS handshakes that failed or stalled: no client certificate, one the CA did not issue or not on the allowlist.",
            &serve.handshakes_failed,
        ),
        (
            "payswitch_gateway_streams_aborted_total",
            "Gateway streams ended because of a frame that could not be answered.",
            &serve.streams_aborted,
        ),
        (
            "payswitch_gateway_streams_total",
            "Gateway streams served (a TCP connection counts as one).",
            &serve.streams,
        ),
    ];
    for (name, help, value) in counters {
        header(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
    }
    out
}

/// The switch's own time, each stage's and each acquirer's round trip.
fn latency_histograms(out: &mut String, snapshot: &Snapshot) {
    let stage_buckets = &snapshot.stage_buckets;
    header(
        out,
        "payswitch_authorization_duration_seconds",
        "histogram",
        "The switch's own time per request (end to end less the acquirer).",
    );
    histogram(
        out,
        "payswitch_authorization_duration_seconds",
        "",
        &stage_buckets[Stage::Switch as usize],
    );

    header(
        out,
        "payswitch_stage_duration_seconds",
        "histogram",
        "Time per request in each stage of the pipeline.",
    );
    for (stage, b) in Stage::ALL.iter().zip(stage_buckets) {
        histogram(
            out,
            "payswitch_stage_duration_seconds",
            &format!("stage=\"{}\"", stage.as_str()),
            b,
        );
    }

    header(
        out,
        "payswitch_acquirer_duration_seconds",
        "histogram",
        "Round trip to each acquirer.",
    );
    for acquirer in &snapshot.acquirers {
        histogram(
            out,
            "payswitch_acquirer_duration_seconds",
            &format!("acquirer=\"{}\"", escape(&acquirer.name)),
            &acquirer.buckets,
        );
    }
}

/// Responses by code, fraud decisions, and acquirer requests by outcome.
fn outcome_counters(out: &mut String, snapshot: &Snapshot) {
    header(
        out,
        "payswitch_responses_total",
        "counter",
        "Responses sent to gateways, by response code.",
    );
    for (code, n) in &snapshot.codes {
        let _ = writeln!(out, "payswitch_responses_total{{code=\"{code}\"}} {n}");
    }

    header(
        out,
        "payswitch_decisions_total",
        "counter",
        "Fraud decisions of the champion model and rules.",
    );
    for (decision, n) in ["approve", "review", "decline"]
        .iter()
        .zip(snapshot.decisions)
    {
        let _ = writeln!(
            out,
            "payswitch_decisions_total{{decision=\"{decision}\"}} {n}"
        );
    }

    header(
        out,
        "payswitch_acquirer_requests_total",
        "counter",
        "Requests to acquirers by outcome: answered, timeout, lost (connection dropped), refused (down or full, not sent).",
    );
    for a in &snapshot.acquirers {
        let name = escape(&a.name);
        for (outcome, n) in [
            ("answered", a.answered),
            ("timeout", a.timeouts),
            ("lost", a.lost),
            ("refused", a.refused),
        ] {
            let _ = writeln!(
                out,
                "payswitch_acquirer_requests_total{{acquirer=\"{name}\",outcome=\"{outcome}\"}} {n}"
            );
        }
    }
}

/// Requests in progress and waiting in each shard's queue.
fn load_gauges(out: &mut String, snapshot: &Snapshot) {
    header(
        out,
        "payswitch_in_flight_requests",
        "gauge",
        "Requests being handled now.",
    );
    let _ = writeln!(out, "payswitch_in_flight_requests {}", snapshot.in_flight);
    header(
        out,
        "payswitch_shard_queue_depth",
        "gauge",
        "Requests waiting in each shard's queue.",
    );
    for (i, shard) in snapshot.shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "payswitch_shard_queue_depth{{shard=\"{i}\"}} {}",
            shard.queue_depth
        );
    }
}

/// Each acquirer link's state.
fn acquirer_gauges(out: &mut String, snapshot: &Snapshot) {
    header(
        out,
        "payswitch_acquirer_up",
        "gauge",
        "1 when the link to the acquirer is connected.",
    );
    for a in &snapshot.acquirers {
        let _ = writeln!(
            out,
            "payswitch_acquirer_up{{acquirer=\"{}\"}} {}",
            escape(&a.name),
            u8::from(a.up)
        );
    }
    header(
        out,
        "payswitch_acquirer_state",
        "gauge",
        "1 for the acquirer's current state: up, draining (by an operator) or down.",
    );
    for a in &snapshot.acquirers {
        for state in ["up", "draining", "down"] {
            let _ = writeln!(
                out,
                "payswitch_acquirer_state{{acquirer=\"{}\",state=\"{state}\"}} {}",
                escape(&a.name),
                u8::from(a.state == state)
            );
        }
    }
    header(
        out,
        "payswitch_acquirer_breaker",
        "gauge",
        "1 for the state of the acquirer's circuit breaker: closed (in service), open (routes skip it) or half-open (probing with live traffic).",
    );
    for a in &snapshot.acquirers {
        for state in ["closed", "open", "half-open"] {
            let _ = writeln!(
                out,
                "payswitch_acquirer_breaker{{acquirer=\"{}\",state=\"{state}\"}} {}",
                escape(&a.name),
                u8::from(a.breaker == state)
            );
        }
    }
    header(
        out,
        "payswitch_acquirer_breaker_opened_total",
        "counter",
        "Times the acquirer's circuit breaker opened (a stall, a failure ratio or a failed probe).",
    );
    for a in &snapshot.acquirers {
        let _ = writeln!(
            out,
            "payswitch_acquirer_breaker_opened_total{{acquirer=\"{}\"}} {}",
            escape(&a.name),
            a.breaker_opened
        );
    }
    header(
        out,
        "payswitch_acquirer_breaker_refused_total",
        "counter",
        "Authorizations the open breaker turned away from the acquirer: nothing was sent; the route's next acquirer was tried.",
    );
    for a in &snapshot.acquirers {
        let _ = writeln!(
            out,
            "payswitch_acquirer_breaker_refused_total{{acquirer=\"{}\"}} {}",
            escape(&a.name),
            a.breaker_refused
        );
    }
}

/// The models loaded.
fn model_info(out: &mut String, snapshot: &Snapshot) {
    header(
        out,
        "payswitch_model_info",
        "gauge",
        "The models loaded (id = kind and checksum; schema = feature schema version): the champion and the challengers scored in shadow.",
    );
    let schema = payswitch_models::features::SCHEMA_VERSION;
    let roles = snapshot
        .champion
        .iter()
        .map(|m| ("champion", m))
        .chain(snapshot.challengers.iter().map(|m| ("challenger", m)));
    for (role, m) in roles {
        let _ = writeln!(
            out,
            "payswitch_model_info{{role=\"{role}\",id=\"{}\",kind=\"{}\",schema=\"{schema}\"}} 1",
            escape(&m.id),
            m.kind,
        );
    }
}

/// What is not yet durable or delivered: the journal's lag and the reversals owed.
fn cluster_gauges(out: &mut String, snapshot: &Snapshot) {
    let Some(c) = &snapshot.cluster else {
        return;
    };
    for (name, kind, help, value) in [
        (
            "payswitch_cluster_lease_held",
            "gauge",
            "1 while the node holds its lease ([cluster]); without it nothing is sent.",
            u64::from(c.lease_held),
        ),
        (
            "payswitch_cluster_lease_generation",
            "gauge",
            "The generation (fencing token) of the node's lease.",
            c.generation,
        ),
        (
            "payswitch_cluster_takeovers_total",
            "counter",
            "Other nodes' leases this node took over (their reversals and advices moved here).",
            c.takeovers,
        ),
        (
            "payswitch_cluster_moved_total",
            "counter",
            "Reversals and advices moved into this node's books by takeovers.",
            c.moved,
        ),
        (
            "payswitch_cluster_claims_lost_total",
            "counter",
            "Requests another node had claimed first: answered from its answer.",
            c.claims_lost,
        ),
        (
            "payswitch_cluster_claims_failed_total",
            "counter",
            "Requests that could not be claimed (no server, no lease): answered 91.",
            c.claims_failed,
        ),
        (
            "payswitch_cluster_followed_total",
            "counter",
            "Other nodes' scored requests recorded into this node's velocity state.",
            c.followed,
        ),
        (
            "payswitch_cluster_follow_dropped_total",
            "counter",
            "Other nodes' scored requests dropped because the card's shard was behind.",
            c.follow_dropped,
        ),
        (
            "payswitch_cluster_follow_lag_messages",
            "gauge",
            "Journal stream messages this node's follower has not read yet.",
            c.follow_lag,
        ),
        (
            "payswitch_cluster_fenced_total",
            "counter",
            "Requests not sent because the node had lost its lease since they came in.",
            c.fenced,
        ),
    ] {
        header(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
}

fn journal_gauges(out: &mut String, snapshot: &Snapshot) {
    let (queued, last_seq) = snapshot
        .journal
        .as_ref()
        .map_or((0, 0), |j| (j.queued, j.last_seq));
    header(
        out,
        "payswitch_journal_queued_appends",
        "gauge",
        "Journal appends waiting for the writer (its lag).",
    );
    let _ = writeln!(out, "payswitch_journal_queued_appends {queued}");
    header(
        out,
        "payswitch_journal_last_sequence",
        "gauge",
        "Sequence number of the last durable journal record.",
    );
    let _ = writeln!(out, "payswitch_journal_last_sequence {last_seq}");
    if let Some(replica) = snapshot.journal.as_ref().and_then(|j| j.replica) {
        for (name, kind, help, value) in [
            (
                "payswitch_journal_replica_acknowledged_total",
                "counter",
                "Journal messages the replicated stream acknowledged ([cluster]).",
                replica.acknowledged as f64,
            ),
            (
                "payswitch_journal_replica_failed_total",
                "counter",
                "Journal group commits the replicated stream did not acknowledge within cluster.ack_timeout_ms (their requests were answered 91).",
                replica.failed as f64,
            ),
            (
                "payswitch_journal_replica_mean_ack_seconds",
                "gauge",
                "Mean time from a group commit's hand-over to the stream's acknowledgement, since start.",
                replica.mean_ack_us / 1e6,
            ),
        ] {
            header(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
    }
    header(
        out,
        "payswitch_reversals_pending",
        "gauge",
        "Reversals queued for acquirers and not yet acknowledged.",
    );
    let _ = writeln!(
        out,
        "payswitch_reversals_pending {}",
        snapshot.reversals.pending
    );
    header(
        out,
        "payswitch_reversals_escalated",
        "gauge",
        "Reversals unacknowledged after many attempts, retried every minute (see /api/reversals).",
    );
    let _ = writeln!(
        out,
        "payswitch_reversals_escalated {}",
        snapshot.reversals.escalated
    );
    header(
        out,
        "payswitch_stand_in_total",
        "counter",
        "Authorizations no acquirer could take: approved in stand-in (an advice owed), or refused by the route's stand-in rule (91).",
    );
    let _ = writeln!(
        out,
        "payswitch_stand_in_total{{result=\"approved\"}} {}\npayswitch_stand_in_total{{result=\"refused\"}} {}",
        snapshot.stand_in_approved, snapshot.stand_in_refused
    );
    header(
        out,
        "payswitch_advices_pending",
        "gauge",
        "Stand-in advices owed to acquirers and not yet acknowledged.",
    );
    let _ = writeln!(
        out,
        "payswitch_advices_pending {}",
        snapshot.reversals.advices_pending
    );
    header(
        out,
        "payswitch_advices_acknowledged_total",
        "counter",
        "Stand-in advices acknowledged by their acquirer (0130).",
    );
    let _ = writeln!(
        out,
        "payswitch_advices_acknowledged_total {}",
        snapshot.reversals.advices_acknowledged
    );
    header(
        out,
        "payswitch_acquirer_late_answers_total",
        "counter",
        "Answers that came after their request had timed out (approvals among them: the reversal queued at the timeout undoes them).",
    );
    for a in &snapshot.acquirers {
        let name = escape(&a.name);
        let _ = writeln!(
            out,
            "payswitch_acquirer_late_answers_total{{acquirer=\"{name}\",code=\"any\"}} {}",
            a.late
        );
        let _ = writeln!(
            out,
            "payswitch_acquirer_late_answers_total{{acquirer=\"{name}\",code=\"00\"}} {}",
            a.late_approvals
        );
    }
}

/// Counters of the switch as a whole.
#[derive(Debug, Default)]
pub struct SwitchStats {
    /// Responses sent, by code: index into `ResponseCode::ALL`, last slot for codes passed
    /// through from acquirers that the switch does not know.
    pub responses: [AtomicU64; ResponseCode::ALL.len() + 1],
    /// Requests refused because their shard's queue was full.
    pub shed: AtomicU64,
    /// Requests answered without authorizing because the journal could not take them.
    pub journal_refused: AtomicU64,
    /// Retransmissions answered with the original's outcome.
    pub duplicates: AtomicU64,
    /// Reversals queued because an acquirer's answer did not reach the gateway.
    pub reversals_queued: AtomicU64,
    /// Approved in stand-in.
    pub stand_in_approved: AtomicU64,
    /// Not admitted by the route's stand-in rule with no acquirer reachable.
    pub stand_in_refused: AtomicU64,
    /// Uptime second (plus one) of the last overload log line.
    pub shed_logged_s: AtomicU64,
    /// Requests being handled now.
    pub in_flight: std::sync::atomic::AtomicI64,
    /// Response counts a second apart, for the last window's mix.
    pub(crate) code_history: crate::ops::stats::CodeHistory,
}

impl SwitchStats {
    /// Counts a response with `code`.
    pub fn count(&self, code: &[u8; 2]) {
        let slot = ResponseCode::parse(code)
            .and_then(|c| ResponseCode::ALL.iter().position(|k| *k == c))
            .unwrap_or(ResponseCode::ALL.len());
        self.responses[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds what one request's lifecycle counted.
    pub fn add(&self, counts: crate::lifecycle::Counts) {
        if counts.journal_refused {
            self.journal_refused.fetch_add(1, Ordering::Relaxed);
        }
        if counts.duplicate {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        if counts.reversals_queued > 0 {
            self.reversals_queued
                .fetch_add(u64::from(counts.reversals_queued), Ordering::Relaxed);
        }
        if counts.stand_in_approved {
            self.stand_in_approved.fetch_add(1, Ordering::Relaxed);
        }
        if counts.stand_in_refused {
            self.stand_in_refused.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::metrics::{Buckets, Percentiles};
    use crate::ops::snapshot::{AcquirerSnapshot, ReversalSnapshot, ShardSnapshot};

    fn snapshot() -> Snapshot {
        Snapshot {
            uptime_s: 12.0,
            in_flight: 3,
            codes: [("00".to_string(), 90), ("91".to_string(), 10)].into(),
            codes_window: [("00".to_string(), 45), ("91".to_string(), 5)].into(),
            window_seconds: 10.0,
            duplicates: 2,
            shed: 1,
            stand_in_approved: 3,
            stand_in_refused: 1,
            decisions: [97, 2, 1],
            champion: None,
            challengers: Vec::new(),
            acquirers: vec![AcquirerSnapshot {
                name: "north \"1\"".into(),
                state: "draining",
                up: true,
                breaker: "half-open",
                breaker_opened: 2,
                breaker_refused: 17,
                in_flight: 4,
                answered: 95,
                timeouts: 4,
                lost: 1,
                refused: 0,
                late: 2,
                late_approvals: 1,
                connects: 1,
                latency: Percentiles::default(),
                buckets: Buckets::empty(),
            }],
            journal: None,
            reversals: ReversalSnapshot {
                pending: 5,
                ..ReversalSnapshot::default()
            },
            shards: vec![ShardSnapshot {
                queue_depth: 7,
                window_len: 40,
            }],
            stages: Vec::new(),
            stage_buckets: Stage::ALL.iter().map(|_| Buckets::empty()).collect(),
            series: Vec::new(),
            cluster: None,
        }
    }

    #[test]
    fn the_stats_json_is_made_from_the_snapshot_alone() {
        let value = stats(&snapshot());
        assert_eq!(value["tps"], 5.0);
        assert_eq!(value["approval_rate"], 0.9);
        assert_eq!(value["in_flight"], 3);
        assert_eq!(value["acquirers"][0]["success_rate"], 0.95);
        assert_eq!(value["shards"][0]["queue_depth"], 7);
        assert_eq!(value["reversals"]["pending"], 5);
        assert_eq!(value["journal"]["enabled"], false);
    }

    #[test]
    fn the_prometheus_text_is_made_from_the_snapshot_alone() {
        let text = prometheus(&snapshot(), &ServeStats::default());
        for line in [
            "payswitch_responses_total{code=\"91\"} 10",
            "payswitch_decisions_total{decision=\"decline\"} 1",
            "payswitch_acquirer_state{acquirer=\"north \\\"1\\\"\",state=\"draining\"} 1",
            "payswitch_shard_queue_depth{shard=\"0\"} 7",
            "payswitch_reversals_pending 5",
            "payswitch_in_flight_requests 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
