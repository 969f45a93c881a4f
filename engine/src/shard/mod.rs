//! A shard: the owner of the state of the cards that hash to it (velocity, the duplicate
//! window), so that state needs no lock. It decides, for each request, whether it is a
//! retransmission, a new authorization (scored and routed) or a gateway's reversal.
//!
//! [`Shard::decide`] performs no I/O; the switch runs each shard as a task behind a
//! bounded queue, the simulator calls it directly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use payswitch_models::features::Transaction;
use payswitch_protocol::Message;

pub mod duplicates;

use arc_swap::ArcSwap;
use duplicates::{DupKey, DuplicateWindow, Original};
use tokio::sync::{mpsc, oneshot};

use crate::ingress::validate::Authorization;
use crate::routing::Router;
use crate::routing::{AcquirerWeights, Route};
use crate::scoring::{Scoring, ShardScoring, Verdict};

/// What a shard is asked to decide.
// One per request, moved once: boxing the transaction would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ShardRequest {
    /// An 0100/0200 with its model input.
    Authorization(Authorization, Transaction),
    /// The reversal request itself: its field 90 names the original.
    Reversal(Message),
    /// An authorization read while its gateway was at its in-flight bound: a
    /// retransmission is answered from its original as always; anything else is shed
    /// (91, nothing done). Reversals are never shed.
    Shed,
}

impl ShardRequest {
    /// What the shard decides for a validated request read at `received_ms`: a reversal
    /// as it is, an authorization with its model input (features read the message).
    pub fn new(
        request: &Message,
        auth: Authorization,
        pan_hash: u128,
        reversal: bool,
        shed: bool,
        scoring: &Scoring,
        received_ms: i64,
    ) -> ShardRequest {
        // A reversal is never shed: it only lowers the risk the switch holds, and a
        // gateway told 91 for its 0400 may never send it again (the simulator found an
        // approval left standing that way).
        if shed && !reversal {
            ShardRequest::Shed
        } else if reversal {
            ShardRequest::Reversal(request.clone())
        } else {
            ShardRequest::Authorization(
                auth,
                scoring.transaction(request, &auth, pan_hash, received_ms),
            )
        }
    }
}

/// The shard's part of a request's timings (only taken when metrics are on).
#[derive(Debug, Default, Clone, Copy)]
pub struct ShardTimings {
    /// Waiting in the shard's queue.
    pub queue: Option<Duration>,
    /// Features, model and rules.
    pub score: Option<Duration>,
    /// Choosing the acquirers.
    pub route: Option<Duration>,
}

/// Counters of one shard, written only by the shard.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Authorizations decided.
    pub decided: AtomicU64,
    /// Retransmissions answered from the window.
    pub duplicates: AtomicU64,
    /// Requests remembered in the duplicate window now.
    pub window_len: AtomicU64,
    /// Window entries dropped before their time because the window was full.
    pub window_evicted_early: AtomicU64,
    /// Other nodes' transactions recorded into this shard's velocity state (a cluster).
    pub observed: AtomicU64,
}

/// One shard's state.
#[derive(Debug)]
pub struct Shard {
    scoring: ShardScoring,
    window: DuplicateWindow,
    stats: Arc<ShardStats>,
    /// Acquirers' health, for balanced routes.
    weights: Arc<AcquirerWeights>,
    /// Draws for balanced routes (xorshift; per shard, so the simulator replays it).
    draw: u64,
}

impl Shard {
    /// A shard with velocity state for `max_cards` cards and `window` of recent requests,
    /// weighing balanced routes by `weights`.
    pub fn new(
        max_cards: usize,
        window: DuplicateWindow,
        stats: Arc<ShardStats>,
        weights: Arc<AcquirerWeights>,
    ) -> Shard {
        Shard::with_scoring(ShardScoring::new(max_cards), window, stats, weights)
    }

    /// As [`Shard::new`], with velocity state rebuilt from the journal.
    pub fn with_scoring(
        scoring: ShardScoring,
        window: DuplicateWindow,
        stats: Arc<ShardStats>,
        weights: Arc<AcquirerWeights>,
    ) -> Shard {
        Shard {
            scoring,
            window,
            stats,
            weights,
            draw: 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn next_draw(&mut self) -> u64 {
        self.draw ^= self.draw << 13;
        self.draw ^= self.draw >> 7;
        self.draw ^= self.draw << 17;
        self.draw
    }

    /// Records another node's transaction into the velocity state, as if scored here
    /// (the cluster's nodes share each card's history: `cluster::follow`).
    pub fn observe(&mut self, scoring: &Scoring, tx: &Transaction) {
        scoring.warm(&mut self.scoring, tx);
        self.stats.observed.fetch_add(1, Ordering::Relaxed);
    }

    /// Puts a request the journal says was seen at `at_ms` back in the window.
    pub fn remember(&mut self, key: DupKey, at_ms: i64, original: Arc<Original>) {
        self.window.insert(key, at_ms, original);
    }

    /// Requests remembered in the duplicate window.
    pub fn window_len(&self) -> usize {
        self.window.len()
    }

    /// Decides `request` (key `key`, received at `received_ms` on the switch's clock).
    /// `timed`: take the score and route timings.
    pub fn decide(
        &mut self,
        request: ShardRequest,
        key: DupKey,
        received_ms: i64,
        router: &Router,
        scoring: &Scoring,
        timed: bool,
    ) -> (ShardVerdict, ShardTimings) {
        let mut timings = ShardTimings::default();
        let verdict = if let Some(original) = self.window.get(&key, received_ms) {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            ShardVerdict::Duplicate(original)
        } else {
            // A shed request is remembered too, with its 91: a copy of it (a network
            // duplicate, or a retransmission sent before the 91 arrived) must get the
            // same 91, not be authorized behind the gateway's back.
            let own = Arc::new(Original::new());
            self.window.insert(key, received_ms, Arc::clone(&own));
            match request {
                ShardRequest::Shed => ShardVerdict::Shed(own),
                ShardRequest::Authorization(auth, transaction) => {
                    let started = timed.then(Instant::now);
                    let verdict = scoring.decide(&mut self.scoring, &transaction);
                    let scored = started.map(|_| Instant::now());
                    let draw = self.next_draw();
                    let route = router.route_weighted(
                        &auth.pan,
                        auth.currency,
                        auth.mcc,
                        &self.weights,
                        draw,
                    );
                    if let (Some(started), Some(scored)) = (started, scored) {
                        timings.score = Some(scored - started);
                        timings.route = Some(scored.elapsed());
                    }
                    self.stats.decided.fetch_add(1, Ordering::Relaxed);
                    ShardVerdict::Fresh {
                        scoring: verdict,
                        route,
                        original: own,
                        transaction,
                    }
                }
                ShardRequest::Reversal(request) => ShardVerdict::Reversal {
                    own,
                    original: self.window.find_original(&request),
                },
            }
        };
        self.stats
            .window_len
            .store(self.window.len() as u64, Ordering::Relaxed);
        self.stats
            .window_evicted_early
            .store(self.window.evicted_early, Ordering::Relaxed);
        (verdict, timings)
    }
}

/// One request for a shard's task, with where its verdict goes.
#[derive(Debug)]
pub struct ShardJob {
    /// What to decide.
    pub request: ShardRequest,
    /// The request's duplicate key.
    pub key: DupKey,
    /// When the switch read it, on its clock.
    pub received_ms: i64,
    /// When it was queued, if timings are recorded.
    pub queued: Option<Instant>,
    /// Where the verdict goes.
    pub reply: oneshot::Sender<(ShardVerdict, ShardTimings)>,
}

/// What a shard starts with: its share of the journal's recent requests.
pub type RecoveredEntries = Vec<(DupKey, i64, Arc<Original>)>;

/// Other nodes' transactions queued for a shard, at most: beyond it they are dropped
/// (counted), as velocity from elsewhere is worth less than the shard's own requests.
pub const OBSERVED_QUEUE: usize = 4096;

/// Runs a shard behind its bounded queue until the queue closes; its own requests first,
/// then other nodes' transactions (`observed`) for its velocity state.
pub async fn run(
    mut jobs: mpsc::Receiver<ShardJob>,
    mut observed: mpsc::Receiver<Transaction>,
    router: Arc<ArcSwap<Router>>,
    scoring: Arc<Scoring>,
    mut shard: Shard,
) {
    loop {
        let job = tokio::select! {
            biased;
            job = jobs.recv() => job,
            Some(tx) = observed.recv() => {
                shard.observe(&scoring, &tx);
                continue;
            }
        };
        let Some(job) = job else { return };
        let queue = job.queued.map(|q| q.elapsed());
        let (verdict, mut timings) = shard.decide(
            job.request,
            job.key,
            job.received_ms,
            &router.load(),
            &scoring,
            job.queued.is_some(),
        );
        timings.queue = queue;
        let _ = job.reply.send((verdict, timings));
    }
}

/// The shard a card's keyed hash belongs to.
pub fn shard_of(pan_hash: u128, shards: usize) -> usize {
    (pan_hash as u64 % shards as u64) as usize
}

/// What a shard answers for one request.
#[derive(Debug)]
pub enum ShardVerdict {
    /// A new authorization: decide it and send it on.
    Fresh {
        /// The fraud decision and what explains it.
        scoring: Verdict,
        /// Acquirers to try, in order, and the route's stand-in rule; `None`: no route
        /// (92).
        route: Option<Route>,
        /// Where its outcome goes, for retransmissions and reversals.
        original: Arc<Original>,
        /// What was scored: the journal keeps its velocity inputs for a restart.
        transaction: Transaction,
    },
    /// A retransmission of a request seen within the window.
    Duplicate(Arc<Original>),
    /// Shed: answered 91 at once, nothing done, nothing journaled; its entry in the
    /// window answers its copies.
    Shed(Arc<Original>),
    /// A new reversal from the gateway.
    Reversal {
        /// The reversal's own entry, for its retransmissions.
        own: Arc<Original>,
        /// The authorization it reverses, if the switch knows it.
        original: Option<Arc<Original>>,
    },
}
