//! The switch at one moment, as plain values: what `/api/stats`, `/api/acquirers`,
//! `/metrics` and `/ready` are made from. [`Sources::snapshot`] reads every counter once;
//! the renderers in `super::stats` are pure functions of a [`Snapshot`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use payswitch_protocol::ResponseCode;

use super::metrics::{Buckets, Percentiles, Point, Stage};
use super::Sources;
use crate::journal::FsyncPolicy;

/// One acquirer link.
#[derive(Debug, Clone)]
pub struct AcquirerSnapshot {
    /// Its configured name.
    pub name: String,
    /// `up`, `draining` or `down`.
    pub state: &'static str,
    /// Connected.
    pub up: bool,
    /// The circuit breaker: `closed`, `open` or `half-open` (`crate::breaker`).
    pub breaker: &'static str,
    /// Times the breaker opened.
    pub breaker_opened: u64,
    /// Authorizations the open breaker turned away (nothing sent).
    pub breaker_refused: u64,
    /// Requests outstanding.
    pub in_flight: usize,
    /// Requests answered, timed out, lost with the connection, refused (down or full).
    pub answered: u64,
    /// Timeouts.
    pub timeouts: u64,
    /// Lost with the connection.
    pub lost: u64,
    /// Refused: down or full, nothing sent.
    pub refused: u64,
    /// Answers that came after their request timed out.
    pub late: u64,
    /// Of those, approvals (their reversals were queued at the timeout).
    pub late_approvals: u64,
    /// Connections made.
    pub connects: u64,
    /// Round-trip percentiles over the last window.
    pub latency: Percentiles,
    /// Round-trip buckets since start.
    pub buckets: Buckets,
}

/// A model scoring: the champion or a challenger.
#[derive(Debug, Clone)]
pub struct ModelSnapshot {
    /// Kind and checksum.
    pub id: String,
    /// `forest` or `logistic`.
    pub kind: String,
    /// Challengers: authorizations scored in shadow, and decisions equal to the champion's.
    pub scored: u64,
    /// Of those, agreements.
    pub agreed: u64,
    /// Mean score.
    pub mean_score: Option<f64>,
    /// Challengers: the champion's mean score on the same authorizations.
    pub champion_mean_score: Option<f64>,
}

/// The journal's writer.
#[derive(Debug, Clone)]
pub struct JournalSnapshot {
    /// The sync policy.
    pub fsync: FsyncPolicy,
    /// Records written.
    pub records: u64,
    /// Group commits.
    pub commits: u64,
    /// Appends waiting for the writer.
    pub queued: u64,
    /// The last durable record's number.
    pub last_seq: u64,
    /// Stopped after an I/O error.
    pub failed: bool,
    /// The copy on the replicated stream, with `[cluster]`.
    pub replica: Option<ReplicaSnapshot>,
}

/// The journal's copy on the replicated stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplicaSnapshot {
    /// Messages the stream acknowledged.
    pub acknowledged: u64,
    /// Group commits the stream did not acknowledge in time (their requests got 91).
    pub failed: u64,
    /// Group commits acknowledged.
    pub groups: u64,
    /// Mean time from a group's hand-over to its acknowledgement, microseconds.
    pub mean_ack_us: f64,
    /// Connected to a NATS server now.
    pub connected: bool,
    /// A group went unacknowledged lately and none has been acknowledged since
    /// (`ReplicaStats::failing`).
    pub last_failed: bool,
}

/// The store-and-forward queue.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReversalSnapshot {
    /// Waiting for their acknowledgement.
    pub pending: u64,
    /// Attempts sent.
    pub sent: u64,
    /// Acknowledged.
    pub acknowledged: u64,
    /// Left to the next start because the queue was full.
    pub deferred: u64,
    /// Escalated: unacknowledged after many attempts, retried every minute.
    pub escalated: u64,
    /// Stand-in advices among `pending`.
    pub advices_pending: u64,
    /// Stand-in advices acknowledged.
    pub advices_acknowledged: u64,
}

/// One shard.
#[derive(Debug, Clone, Copy)]
pub struct ShardSnapshot {
    /// Requests waiting in its queue.
    pub queue_depth: usize,
    /// Requests remembered in its duplicate window.
    pub window_len: u64,
}

/// The switch at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Seconds since start.
    pub uptime_s: f64,
    /// Requests being handled.
    pub in_flight: i64,
    /// Responses by code since start (codes seen only; unknown acquirer codes as `other`).
    pub codes: BTreeMap<String, u64>,
    /// Responses by code over about the last window, and the seconds that covers.
    pub codes_window: BTreeMap<String, u64>,
    /// Seconds `codes_window` covers.
    pub window_seconds: f64,
    /// Retransmissions answered from their original.
    pub duplicates: u64,
    /// Requests refused because their shard's queue was full.
    pub shed: u64,
    /// Approved in stand-in (no acquirer reachable).
    pub stand_in_approved: u64,
    /// No acquirer reachable and not admitted by the route's stand-in rule (91).
    pub stand_in_refused: u64,
    /// Decisions: approve, review, decline.
    pub decisions: [u64; 3],
    /// The champion model.
    pub champion: Option<ModelSnapshot>,
    /// The challengers.
    pub challengers: Vec<ModelSnapshot>,
    /// The acquirer links, in configuration order.
    pub acquirers: Vec<AcquirerSnapshot>,
    /// The journal, when one is written.
    pub journal: Option<JournalSnapshot>,
    /// The reversal queue.
    pub reversals: ReversalSnapshot,
    /// The shards.
    pub shards: Vec<ShardSnapshot>,
    /// Percentiles per stage: last window and since start.
    pub stages: Vec<(Stage, Percentiles, Percentiles)>,
    /// Buckets per stage since start, in `Stage::ALL` order.
    pub stage_buckets: Vec<Buckets>,
    /// The per-second points, oldest first.
    pub series: Vec<Point>,
    /// The node's part in the cluster, with `[cluster]`.
    pub cluster: Option<ClusterSnapshot>,
}

/// The node's part in the cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterSnapshot {
    /// This node.
    pub node: String,
    /// It holds its lease now.
    pub lease_held: bool,
    /// The lease's generation (fencing token).
    pub generation: u64,
    /// Milliseconds the lease is held for without a renewal.
    pub lease_remaining_ms: u64,
    /// Other nodes' leases taken over.
    pub takeovers: u64,
    /// Reversals and advices moved here by those takeovers.
    pub moved: u64,
    /// Milliseconds from the last takeover to its work being queued here.
    pub last_takeover_ms: u64,
    /// Requests another node had claimed first.
    pub claims_lost: u64,
    /// Requests that could not be claimed (answered 91).
    pub claims_failed: u64,
    /// Requests not sent because the lease was lost since they came in.
    pub fenced: u64,
    /// Claims of other nodes' requests settled here.
    pub claims_settled: u64,
    /// Other nodes' scored requests recorded into this node's velocity.
    pub followed: u64,
    /// Of those, dropped because a shard was behind.
    pub follow_dropped: u64,
    /// Journal stream messages not yet read by the follower.
    pub follow_lag: u64,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Responses by code (codes seen only).
pub(super) fn codes(responses: &[AtomicU64]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (i, counter) in responses.iter().enumerate() {
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

fn kind(model: &payswitch_models::model::Model) -> String {
    format!("{:?}", model.kind()).to_lowercase()
}

fn mean(micros: u64, n: u64) -> Option<f64> {
    (n > 0).then(|| micros as f64 / 1e6 / n as f64)
}

impl Sources {
    /// Reads every counter once.
    pub fn snapshot(&self) -> Snapshot {
        let codes = codes(&self.counters.responses);
        let (codes_window, window_seconds) =
            super::stats::codes_window(&self.counters.code_history, &codes);
        Snapshot {
            uptime_s: self.metrics.uptime().as_secs_f64(),
            in_flight: self.counters.in_flight.load(Ordering::Relaxed).max(0),
            codes,
            codes_window,
            window_seconds,
            duplicates: load(&self.counters.duplicates),
            shed: load(&self.counters.shed),
            stand_in_approved: load(&self.counters.stand_in_approved),
            stand_in_refused: load(&self.counters.stand_in_refused),
            decisions: std::array::from_fn(|i| load(&self.scoring.stats.decisions[i])),
            champion: self.champion(),
            challengers: self.challengers(),
            acquirers: self.acquirers(),
            journal: self.journal.as_ref().map(|j| {
                let s = j.stats();
                JournalSnapshot {
                    fsync: j.fsync(),
                    records: load(&s.records),
                    commits: load(&s.commits),
                    queued: load(&s.queued),
                    last_seq: load(&s.last_seq),
                    failed: s.failed.load(Ordering::Relaxed),
                    replica: j.replica().map(|replica| {
                        let r = replica.stats();
                        let groups = load(&r.groups);
                        ReplicaSnapshot {
                            acknowledged: load(&r.acknowledged),
                            failed: load(&r.failed),
                            groups,
                            mean_ack_us: if groups > 0 {
                                load(&r.ack_ns) as f64 / groups as f64 / 1_000.0
                            } else {
                                0.0
                            },
                            connected: replica.connected(),
                            last_failed: r.failing(),
                        }
                    }),
                }
            }),
            cluster: self.cluster.as_ref().map(|c| {
                let s = &c.stats;
                ClusterSnapshot {
                    node: c.node.clone(),
                    lease_held: c.fence.held(),
                    generation: c.fence.token(),
                    lease_remaining_ms: c.fence.remaining().as_millis() as u64,
                    takeovers: load(&s.takeovers),
                    moved: load(&s.moved),
                    last_takeover_ms: load(&s.last_takeover_ms),
                    claims_lost: load(&s.claims_lost),
                    claims_failed: load(&s.claims_failed),
                    fenced: load(&s.fenced),
                    claims_settled: load(&s.claims_settled),
                    followed: load(&s.followed),
                    follow_dropped: load(&s.follow_dropped),
                    follow_lag: load(&s.follow_lag),
                }
            }),
            reversals: ReversalSnapshot {
                pending: load(&self.reversals.stats.pending),
                sent: load(&self.reversals.stats.sent),
                acknowledged: load(&self.reversals.stats.acknowledged),
                deferred: load(&self.reversals.stats.deferred),
                escalated: load(&self.reversals.stats.escalated),
                advices_pending: load(&self.reversals.stats.advices_pending),
                advices_acknowledged: load(&self.reversals.stats.advices_acknowledged),
            },
            shards: self
                .shard_stats
                .iter()
                .zip((self.queue_depths)())
                .map(|(s, queue_depth)| ShardSnapshot {
                    queue_depth,
                    window_len: load(&s.window_len),
                })
                .collect(),
            stages: self.metrics.stage_percentiles(),
            stage_buckets: self.metrics.stage_buckets(),
            series: self.metrics.series(),
        }
    }

    fn champion(&self) -> Option<ModelSnapshot> {
        let stats = &self.scoring.stats;
        self.scoring.champion().map(|m| ModelSnapshot {
            id: m.id().to_string(),
            kind: kind(&m),
            scored: load(&stats.champion_scored),
            agreed: 0,
            mean_score: mean(
                load(&stats.champion_score_micros),
                load(&stats.champion_scored),
            ),
            champion_mean_score: None,
        })
    }

    fn challengers(&self) -> Vec<ModelSnapshot> {
        self.scoring
            .challengers()
            .iter()
            .map(|c| {
                let scored = load(&c.scored);
                ModelSnapshot {
                    id: c.model.id().to_string(),
                    kind: kind(&c.model),
                    scored,
                    agreed: load(&c.agreed),
                    mean_score: mean(load(&c.score_micros), scored),
                    champion_mean_score: mean(load(&c.champion_score_micros), scored),
                }
            })
            .collect()
    }

    fn acquirers(&self) -> Vec<AcquirerSnapshot> {
        let latency = self.metrics.acquirer_percentiles();
        let buckets = self.metrics.acquirer_buckets();
        self.links
            .iter()
            .enumerate()
            .map(|(i, link)| {
                let s = &link.stats;
                AcquirerSnapshot {
                    name: link.name().to_string(),
                    state: link.state(),
                    up: link.is_up(),
                    breaker: link.breaker_state(),
                    breaker_opened: load(&s.breaker_opened),
                    breaker_refused: load(&s.breaker_refused),
                    in_flight: link.in_flight(),
                    answered: load(&s.answered),
                    timeouts: load(&s.timeouts),
                    lost: load(&s.lost),
                    refused: load(&s.refused),
                    late: load(&s.late),
                    late_approvals: load(&s.late_approvals),
                    connects: load(&s.connects),
                    latency: latency.get(i).copied().unwrap_or_default(),
                    buckets: buckets.get(i).cloned().unwrap_or_else(Buckets::empty),
                }
            })
            .collect()
    }
}
