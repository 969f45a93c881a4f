//! What operators see: the JSON of `/api/stats` and `/api/acquirers`, and the Prometheus
//! text of `/metrics`, all read from the switch's counters and latency histograms.
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
use crate::ops::Sources;

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Responses by code since start (codes seen only; the acquirers' own codes as `other`).
fn codes(sources: &Sources) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (i, counter) in sources.counters.responses.iter().enumerate() {
        let n = load(counter);
        if n == 0 {
            continue;
        }
        let code = ResponseCode::ALL
            .get(i)
            .map_or("other", |c| c.as_str())
            .to_string();
        out.insert(code, n);
    }
    out
}

/// Cumulative response counts about a second apart, to give the last window's code mix
/// and TPS: at most `WINDOW_SECONDS + 2` entries.
pub type CodeHistory = Mutex<Vec<(std::time::Instant, BTreeMap<String, u64>)>>;

/// Takes a sample of the response counts; called once a second (see `tick`).
fn sample_codes(sources: &Sources) {
    let now = codes(sources);
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
fn codes_window(
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
pub fn acquirers(sources: &Sources) -> Value {
    let latency = sources.metrics.acquirer_percentiles();
    let list: Vec<Value> = sources
        .links
        .iter()
        .enumerate()
        .map(|(i, link)| {
            let s = &link.stats;
            let answered = load(&s.answered);
            let failed = load(&s.timeouts) + load(&s.lost);
            let p = latency.get(i).copied().unwrap_or_default();
            json!({
                "name": link.name(),
                "state": link.state(),
                "in_flight": link.in_flight(),
                "answered": answered,
                "timeouts": load(&s.timeouts),
                "lost": load(&s.lost),
                "refused": load(&s.refused),
                "connects": load(&s.connects),
                "success_rate": (answered + failed > 0).then(|| answered as f64 / (answered + failed) as f64),
                "p50_us": p.p50_us,
                "p99_us": p.p99_us,
            })
        })
        .collect();
    Value::Array(list)
}

fn models(sources: &Sources) -> Value {
    let scoring = &sources.scoring;
    let kind = |m: &payswitch_models::model::Model| format!("{:?}", m.kind()).to_lowercase();
    let mean = |micros: u64, n: u64| (n > 0).then(|| micros as f64 / 1e6 / n as f64);
    let stats = &scoring.stats;
    let champion_mean = mean(
        load(&stats.champion_score_micros),
        load(&stats.champion_scored),
    );
    json!({
        "champion": scoring.champion().map(|m| json!({
            "id": m.id(),
            "kind": kind(&m),
            "mean_score": champion_mean,
        })),
        "challengers": scoring.challengers().iter().map(|c| {
            let (scored, agreed) = (load(&c.scored), load(&c.agreed));
            json!({
                "id": c.model.id(),
                "kind": kind(&c.model),
                "scored": scored,
                "agreed": agreed,
                "agreement": (scored > 0).then(|| agreed as f64 / scored as f64),
                "mean_score": mean(load(&c.score_micros), scored),
                "champion_mean_score": mean(load(&c.champion_score_micros), scored),
            })
        }).collect::<Vec<_>>(),
    })
}

fn journal(sources: &Sources) -> Value {
    match sources.journal.as_ref() {
        None => json!({"enabled": false}),
        Some(j) => {
            let s = j.stats();
            json!({
                "enabled": true,
                "fsync": j.fsync(),
                "records": load(&s.records),
                "commits": load(&s.commits),
                "queued": load(&s.queued),
                "last_seq": load(&s.last_seq),
                "failed": s.failed.load(Ordering::Relaxed),
            })
        }
    }
}

/// `/api/stats`.
pub fn snapshot(sources: &Sources, _serve: &ServeStats) -> Value {
    let codes = codes(sources);
    let (codes_window, seconds) = codes_window(&sources.counters.code_history, &codes);
    let window_total: u64 = codes_window.values().sum();
    let tps = if seconds > 0.0 {
        window_total as f64 / seconds
    } else {
        0.0
    };
    let approval_rate = (window_total > 0)
        .then(|| codes_window.get("00").copied().unwrap_or(0) as f64 / window_total as f64);
    let stages: Vec<Value> = sources
        .metrics
        .stage_percentiles()
        .into_iter()
        .map(|(stage, window, since)| {
            json!({"stage": stage.as_str(), "window": window, "since_start": since})
        })
        .collect();
    let series = sources.metrics.series();
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
    let decisions = &sources.scoring.stats.decisions;
    let windows = sources.shard_stats.iter().zip((sources.queue_depths)());
    json!({
        "uptime_s": sources.metrics.uptime().as_secs_f64(),
        "window_s": WINDOW_SECONDS,
        "tps": tps,
        "approval_rate": approval_rate,
        "in_flight": sources.counters.in_flight.load(Ordering::Relaxed).max(0),
        "codes": codes,
        "codes_window": codes_window,
        "stages": stages,
        "series": {
            "t": series.iter().map(|p| p.t).collect::<Vec<_>>(),
            "tps": series.iter().map(|p| p.count).collect::<Vec<_>>(),
            "p99_us": p99,
        },
        "acquirers": acquirers(sources),
        "decisions": {
            "approve": load(&decisions[0]),
            "review": load(&decisions[1]),
            "decline": load(&decisions[2]),
        },
        "models": models(sources),
        "journal": journal(sources),
        "reversals": {
            "pending": load(&sources.reversals.stats.pending),
            "sent": load(&sources.reversals.stats.sent),
            "acknowledged": load(&sources.reversals.stats.acknowledged),
            "deferred": load(&sources.reversals.stats.deferred),
        },
        "duplicates": load(&sources.counters.duplicates),
        "shed": load(&sources.counters.shed),
        "shards": windows.map(|(s, depth)| json!({
            "queue_depth": depth,
            "duplicates_window": load(&s.window_len),
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
pub fn prometheus(sources: &Sources, serve: &ServeStats) -> String {
    let mut out = String::with_capacity(16 * 1024);
    latency_histograms(&mut out, sources);
    outcome_counters(&mut out, sources);
    load_gauges(&mut out, sources);
    acquirer_gauges(&mut out, sources);
    model_info(&mut out, sources);
    journal_gauges(&mut out, sources);
    header(
        &mut out,
        "payswitch_gateway_connections_total",
        "counter",
        "Gateway connections accepted.",
    );
    let _ = writeln!(
        out,
        "payswitch_gateway_connections_total {}",
        load(&serve.connections)
    );
    out
}

/// The switch's own time, each stage's and each acquirer's round trip.
fn latency_histograms(out: &mut String, sources: &Sources) {
    let stage_buckets = sources.metrics.stage_buckets();
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
    for (stage, b) in Stage::ALL.iter().zip(&stage_buckets) {
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
    for (link, b) in sources.links.iter().zip(sources.metrics.acquirer_buckets()) {
        histogram(
            out,
            "payswitch_acquirer_duration_seconds",
            &format!("acquirer=\"{}\"", escape(link.name())),
            &b,
        );
    }
}

/// Responses by code, fraud decisions, and acquirer requests by outcome.
fn outcome_counters(out: &mut String, sources: &Sources) {
    header(
        out,
        "payswitch_responses_total",
        "counter",
        "Responses sent to gateways, by response code.",
    );
    for (code, n) in codes(sources) {
        let _ = writeln!(out, "payswitch_responses_total{{code=\"{code}\"}} {n}");
    }

    header(
        out,
        "payswitch_decisions_total",
        "counter",
        "Fraud decisions of the champion model and rules.",
    );
    for (i, decision) in ["approve", "review", "decline"].iter().enumerate() {
        let n = load(&sources.scoring.stats.decisions[i]);
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
    for link in &sources.links {
        let name = escape(link.name());
        let s = &link.stats;
        for (outcome, n) in [
            ("answered", load(&s.answered)),
            ("timeout", load(&s.timeouts)),
            ("lost", load(&s.lost)),
            ("refused", load(&s.refused)),
        ] {
            let _ = writeln!(
                out,
                "payswitch_acquirer_requests_total{{acquirer=\"{name}\",outcome=\"{outcome}\"}} {n}"
            );
        }
    }
}

/// Requests in progress and waiting in each shard's queue.
fn load_gauges(out: &mut String, sources: &Sources) {
    header(
        out,
        "payswitch_in_flight_requests",
        "gauge",
        "Requests being handled now.",
    );
    let _ = writeln!(
        out,
        "payswitch_in_flight_requests {}",
        sources.counters.in_flight.load(Ordering::Relaxed).max(0)
    );
    header(
        out,
        "payswitch_shard_queue_depth",
        "gauge",
        "Requests waiting in each shard's queue.",
    );
    for (i, depth) in (sources.queue_depths)().iter().enumerate() {
        let _ = writeln!(out, "payswitch_shard_queue_depth{{shard=\"{i}\"}} {depth}");
    }
}

/// Each acquirer link's state.
fn acquirer_gauges(out: &mut String, sources: &Sources) {
    header(
        out,
        "payswitch_acquirer_up",
        "gauge",
        "1 when the link to the acquirer is connected.",
    );
    for link in &sources.links {
        let _ = writeln!(
            out,
            "payswitch_acquirer_up{{acquirer=\"{}\"}} {}",
            escape(link.name()),
            u8::from(link.is_up())
        );
    }
    header(
        out,
        "payswitch_acquirer_state",
        "gauge",
        "1 for the acquirer's current state: up, draining (by an operator) or down.",
    );
    for link in &sources.links {
        for state in ["up", "draining", "down"] {
            let _ = writeln!(
                out,
                "payswitch_acquirer_state{{acquirer=\"{}\",state=\"{state}\"}} {}",
                escape(link.name()),
                u8::from(link.state() == state)
            );
        }
    }
}

/// The models loaded.
fn model_info(out: &mut String, sources: &Sources) {
    header(
        out,
        "payswitch_model_info",
        "gauge",
        "The models loaded (id = kind and checksum; schema = feature schema version): the champion and the challengers scored in shadow.",
    );
    let kind = |m: &payswitch_models::model::Model| format!("{:?}", m.kind()).to_lowercase();
    if let Some(m) = sources.scoring.champion() {
        let _ = writeln!(
            out,
            "payswitch_model_info{{role=\"champion\",id=\"{}\",kind=\"{}\",schema=\"{}\"}} 1",
            escape(m.id()),
            kind(&m),
            payswitch_models::features::SCHEMA_VERSION
        );
    }
    for c in sources.scoring.challengers().iter() {
        let _ = writeln!(
            out,
            "payswitch_model_info{{role=\"challenger\",id=\"{}\",kind=\"{}\",schema=\"{}\"}} 1",
            escape(c.model.id()),
            kind(&c.model),
            payswitch_models::features::SCHEMA_VERSION
        );
    }
}

/// What is not yet durable or delivered: the journal's lag and the reversals owed.
fn journal_gauges(out: &mut String, sources: &Sources) {
    let (queued, last_seq) = sources.journal.as_ref().map_or((0, 0), |j| {
        (load(&j.stats().queued), load(&j.stats().last_seq))
    });
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
    header(
        out,
        "payswitch_reversals_pending",
        "gauge",
        "Reversals queued for acquirers and not yet acknowledged.",
    );
    let _ = writeln!(
        out,
        "payswitch_reversals_pending {}",
        load(&sources.reversals.stats.pending)
    );
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
    }
}
