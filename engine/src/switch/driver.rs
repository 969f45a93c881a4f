//! The ingress handler: what the switch does with each frame a gateway's stream delivers.
//!
//! On the stream's task, in the order frames are read: decode, validate and the
//! duplicate key (`crate::ingress::admit`), then the card's shard queue (bounded: full → 91 at
//! once). Then, on the request's own task: the shard's verdict, and the request's
//! [`Lifecycle`], whose steps `Switch::drive` carries out — journal appends, acquirer
//! reservations and sends, reversals handed to the store-and-forward queue, waits for an
//! original — until its reply.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use payswitch_net::codes;
use payswitch_net::serve::{Handler, Reply};
use payswitch_protocol::{Message, ResponseCode};
use tokio::sync::{mpsc, oneshot};

use crate::acquirer::{AcquirerLink, LinkError, Reservation};
use crate::clock::now;
use crate::cluster::claims::{Awaited, Claimed};
use crate::ingress::validate::{self, as_code, Authorization};
use crate::ingress::{self, Admission};
use crate::journal::{Journal, JournalError, PanKey, Record};
use crate::lifecycle::{self, Claim, Event, Lifecycle, Now, Step};
use crate::ops::metrics::{Metrics, Stage, Timings};
use crate::ops::stats::SwitchStats;
use crate::reversal::StoreAndForward;
use crate::routing::Router;
use crate::scoring::Scoring;
use crate::shard::duplicates::DupKey;
use crate::shard::{shard_of, ShardJob, ShardRequest, ShardStats, ShardTimings, ShardVerdict};

/// How long a claim may take before the request is answered 91: a replication round on a
/// loaded LAN, with room for a leader election.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a retransmission waits for its original's answer.
const DUPLICATE_WAIT: Duration = Duration::from_millis(lifecycle::DUPLICATE_WAIT_MS);

/// The ingress handler shared by every gateway stream.
pub struct Switch {
    pub(crate) shards: Vec<mpsc::Sender<ShardJob>>,
    /// Models, rules and their counters.
    pub scoring: Arc<Scoring>,
    pub(crate) links: Vec<Arc<AcquirerLink>>,
    /// The acquirers' names, by index (as lifecycles name them).
    pub(crate) acquirer_names: Vec<String>,
    pub(crate) journal: Option<Journal>,
    pub(crate) pan_key: PanKey,
    /// Seals the PAN into the records reversals and advices are built from, when a PAN
    /// key file is configured.
    pub(crate) vault: Option<Arc<crate::journal::PanVault>>,
    /// Reversals owed to acquirers.
    pub reversals: Arc<StoreAndForward>,
    /// Latency histograms.
    pub metrics: Arc<Metrics>,
    /// The routing table, swapped whole on reload.
    pub router: Arc<ArcSwap<Router>>,
    /// Counters.
    pub stats: Arc<SwitchStats>,
    /// Per-shard counters.
    pub shard_stats: Vec<Arc<ShardStats>>,
    /// The node's lease, in a cluster: nothing is sent without it.
    pub(crate) fence: Option<Arc<crate::fence::Fence>>,
    /// The cluster's counters (takeovers), in a cluster.
    pub cluster: Arc<crate::cluster::ClusterStats>,
    /// Each shard's queue of other nodes' transactions (velocity), in a cluster.
    pub(crate) observers: Vec<mpsc::Sender<payswitch_models::features::Transaction>>,
    /// The node's part in the cluster, for operators.
    pub(crate) cluster_view: Option<crate::cluster::ClusterView>,
    /// The cluster's claims, in a cluster: one node decides each request.
    pub(crate) claims: Option<crate::cluster::claims::Claims>,
    /// The other nodes' recent answers, read from their journals, in a cluster.
    pub(crate) outcomes: Option<Arc<crate::cluster::follow::Outcomes>>,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch")
            .field("shards", &self.shards.len())
            .field("links", &self.links)
            .finish()
    }
}

/// A validated request on its way through the switch.
struct InFlight {
    request: Message,
    auth: Authorization,
    pan_hash: u128,
    received: Instant,
    received_at: Now,
    timings: Timings,
}

/// When a request was read, and its timings so far.
struct Times {
    received: Instant,
    received_at: Now,
    timings: Timings,
}

/// What the in-order part of handling a frame left to do.
enum Accepted {
    /// Not an ISO 8583 message: end the stream with this code.
    Close(u32),
    /// Answered already.
    Done([u8; 2], Message),
    /// Validated, but refused before its shard (full queue): journaled, then answered.
    Refused(InFlight, ResponseCode),
    /// In the card's shard queue; the verdict, then the acquirer, are still to come.
    Queued(InFlight, oneshot::Receiver<(ShardVerdict, ShardTimings)>),
}

impl Handler for Switch {
    fn handle(
        self: Arc<Self>,
        frame: Bytes,
    ) -> impl std::future::Future<Output = Reply> + Send + 'static {
        self.serve(frame, false)
    }

    const SHEDS: bool = true;

    /// A request read beyond its gateway's in-flight bound still goes to its card's shard,
    /// which answers a retransmission from its original (a 91 there could contradict an
    /// approval the gateway has not heard yet) and sheds anything else: 91 at once,
    /// without scoring, journal or acquirer.
    fn shed(
        self: Arc<Self>,
        frame: Bytes,
    ) -> impl std::future::Future<Output = Reply> + Send + 'static {
        self.serve(frame, true)
    }
}

impl Switch {
    fn serve(
        self: Arc<Self>,
        frame: Bytes,
        shed: bool,
    ) -> impl std::future::Future<Output = Reply> + Send + 'static {
        // Decoding, validation and the shard enqueue run here, in the order the stream's
        // frames were read: a card's transactions reach its shard — and its velocity
        // state — in the order the gateway sent them, however the tasks are scheduled.
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let accepted = self.accept(frame, shed);
        async move {
            // Counted down however the request ends (even if its task is dropped).
            let _in_flight = InFlightGuard(&self.stats.in_flight);
            let (code, response) = match accepted {
                Accepted::Close(code) => return Reply::Close(code),
                Accepted::Done(code, response) => (code, response),
                Accepted::Refused(r, code) => {
                    let (times, request, record) = self.take(r);
                    let life = Lifecycle::refused(request, record, times.received_at, code)
                        .with_token(self.token());
                    self.drive(times, life, ShardTimings::default()).await
                }
                Accepted::Queued(r, verdict) => {
                    let Ok((verdict, shard_timings)) = verdict.await else {
                        let (code, response) = refuse(&r.request, ResponseCode::SystemMalfunction);
                        self.stats.count(&code);
                        return Reply::Message(response);
                    };
                    if matches!(verdict, ShardVerdict::Shed(_)) {
                        let shed = self.stats.shed.fetch_add(1, Ordering::Relaxed);
                        self.log_shedding(
                            shed,
                            "a gateway, connection or stream at its in-flight bound (or a gateway over its rate)",
                        );
                    }
                    let (times, request, record) = self.take(r);
                    let mut life = Lifecycle::new(request, record, times.received_at, verdict)
                        .with_token(self.token());
                    if self.claims.is_some() {
                        life = life.with_claims();
                    }
                    self.drive(times, life, shard_timings).await
                }
            };
            self.stats.count(&code);
            Reply::Message(response)
        }
    }
}

struct InFlightGuard<'a>(&'a std::sync::atomic::AtomicI64);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Switch {
    /// The acquirer links, in configuration order.
    pub fn links(&self) -> &[Arc<AcquirerLink>] {
        &self.links
    }

    /// Requests queued per shard now.
    pub fn shard_queue_depths(&self) -> Vec<usize> {
        self.shards
            .iter()
            .map(|s| s.max_capacity() - s.capacity())
            .collect()
    }

    /// The fencing token of the node's lease now (0 without a cluster).
    fn token(&self) -> u64 {
        self.fence.as_ref().map_or(0, |f| f.token())
    }

    /// The node's lease, in a cluster.
    pub fn fence(&self) -> Option<&Arc<crate::fence::Fence>> {
        self.fence.as_ref()
    }

    /// The journal, when one is written.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    fn accept(&self, frame: Bytes, shed: bool) -> Accepted {
        let received = Instant::now();
        let timed = self.metrics.enabled();
        let decoded = Message::decode_prefix(frame);
        let mut timings = Timings::default();
        let decode_end = timed.then(Instant::now);
        if let Some(end) = decode_end {
            timings.set(Stage::Decode, end - received);
        }
        let admission = ingress::admit(decoded, || {
            if let Some(start) = decode_end {
                timings.set(Stage::Validate, start.elapsed());
            }
        });
        match admission {
            Admission::Close => Accepted::Close(codes::GARBAGE_FRAME),
            Admission::Answer(code, response) => Accepted::Done(code, response),
            Admission::Admit {
                request,
                auth,
                reversal,
                key,
            } => self.enqueue(request, auth, reversal, shed, key, (received, timings)),
        }
    }

    /// Puts the request in its card's shard queue; a full queue is answered 91 now.
    fn enqueue(
        &self,
        request: Message,
        auth: Authorization,
        reversal: bool,
        shed: bool,
        key: DupKey,
        (received, timings): (Instant, Timings),
    ) -> Accepted {
        let received_at = now();
        let received_ms = received_at.unix_ms();
        let pan_hash = self.pan_key.hash(auth.pan.expose());
        let shard_request = ShardRequest::new(
            &request,
            auth,
            pan_hash,
            reversal,
            shed,
            &self.scoring,
            received_ms,
        );
        let in_flight = InFlight {
            request,
            auth,
            pan_hash,
            received,
            received_at,
            timings,
        };
        // `shards` is never empty (`start` makes at least one), so the modulo is defined.
        let shard = shard_of(pan_hash, self.shards.len());
        let (reply, verdict) = oneshot::channel();
        let job = ShardJob {
            request: shard_request,
            key,
            received_ms,
            queued: self.metrics.enabled().then(Instant::now),
            reply,
        };
        if self.shards[shard].try_send(job).is_err() {
            let shed = self.stats.shed.fetch_add(1, Ordering::Relaxed);
            self.log_shedding(shed, "shard queue full");
            return Accepted::Refused(in_flight, ResponseCode::IssuerInoperative);
        }
        Accepted::Queued(in_flight, verdict)
    }

    /// A validated request's timings, the request itself and its journal record, for
    /// its lifecycle.
    fn take(&self, r: InFlight) -> (Times, Message, Record) {
        let mut record = Lifecycle::request_record(&r.request, &r.auth, r.pan_hash, now());
        if let Some(vault) = &self.vault {
            record.pan_sealed = Some(vault.seal(r.auth.pan.expose(), r.pan_hash));
        }
        let times = Times {
            received: r.received,
            received_at: r.received_at,
            timings: r.timings,
        };
        (times, r.request, record)
    }

    async fn journal_append(&self, records: &[Record]) -> Result<u64, JournalError> {
        match &self.journal {
            Some(journal) => journal.append(records).await,
            None => Ok(0),
        }
    }

    /// Carries out a request's lifecycle: journal appends, acquirer reservations and
    /// sends, reversals and waits for originals, until its reply.
    async fn drive(
        &self,
        r: Times,
        mut life: Lifecycle,
        shard: ShardTimings,
    ) -> ([u8; 2], Message) {
        let names = &self.acquirer_names;
        let mut reservation: Option<Reservation<'_>> = None;
        let mut step = life.start(now(), names);
        let reply = loop {
            let event = match step {
                Step::Reply(reply) => break reply,
                // A request taken in under a lease taken over since writes nothing under
                // the next one: what the survivor read of it (sent, no answer) must stay
                // the truth, or an answer made durable now would be reversed by the
                // survivor behind the gateway's back. Refused like an unreplicated
                // append: an approval becomes 91 and its reversal is the survivor's.
                Step::Append(_)
                    if self
                        .fence
                        .as_ref()
                        .is_some_and(|f| f.token() != life.token()) =>
                {
                    self.cluster.fenced.fetch_add(1, Ordering::Relaxed);
                    Event::Durable(Err(JournalError::Unreplicated))
                }
                Step::Append(records) => Event::Durable(self.journal_append(&records).await),
                Step::Reserve(index) => {
                    let link = &self.links[index];
                    // An acquirer drained by an operator takes no new authorizations (its
                    // reversals still go). Nothing is sent by a refused reservation.
                    let reserved = if link.is_draining() {
                        Err(LinkError::Busy)
                    } else {
                        link.reserve()
                    };
                    match reserved {
                        Ok(reserved) => {
                            let stan = reserved.stan();
                            reservation = Some(reserved);
                            Event::Reserved(stan)
                        }
                        Err(_) => Event::Unavailable,
                    }
                }
                Step::Send { stan, .. } => {
                    let reserved = reservation
                        .take()
                        .expect("a Send step follows its reservation");
                    assert_eq!(reserved.stan(), stan, "sent with the STAN reserved");
                    // Fenced: a node that lost its lease since the request came in (paused,
                    // or cut off from the servers) sends nothing; the request is answered
                    // without it.
                    let fenced = self
                        .fence
                        .as_ref()
                        .is_some_and(|f| !f.held() || f.token() != life.token());
                    if fenced {
                        self.cluster.fenced.fetch_add(1, Ordering::Relaxed);
                        step = life.handle(Event::Fenced, now(), names);
                        continue;
                    }
                    match reserved.send(life.request()).await {
                        Ok(answer) => Event::Answered(answer),
                        Err(LinkError::Down | LinkError::Busy | LinkError::Open) => Event::NotSent,
                        Err(e) => {
                            debug_assert!(e.maybe_delivered());
                            Event::NoAnswer
                        }
                    }
                }
                Step::QueueReversal(mut pending) => {
                    // The lease its queued record was published under (the publisher
                    // stamps every message with it).
                    if pending.journaled {
                        pending.queued_token = self.token();
                    }
                    self.reversals.push(pending);
                    Event::Queued
                }
                Step::AwaitOriginal(original) => {
                    Event::Original(original.outcome(DUPLICATE_WAIT).await.cloned())
                }
                Step::Claim => Event::Claimed(self.claim(&life).await),
            };
            step = life.handle(event, now(), names);
        };
        self.stats.add(life.counts());
        self.record_timings(&r, &life, shard);
        (reply.code, reply.response)
    }

    /// Claims `life`'s request across the cluster; if another node has it, waits for its
    /// answer: read from that node's journal as this node follows it, or written into the
    /// claim by a survivor that took the node over.
    async fn claim(&self, life: &Lifecycle) -> Claim {
        let Some(claims) = &self.claims else {
            return Claim::Won;
        };
        let token = life.token();
        let held = self
            .fence
            .as_ref()
            .is_some_and(|f| f.held() && f.token() == token);
        let Some(key) = DupKey::of(life.request(), false).filter(|_| held) else {
            self.cluster.claims_failed.fetch_add(1, Ordering::Relaxed);
            return Claim::Failed;
        };
        match tokio::time::timeout(CLAIM_TIMEOUT, claims.claim(&key, token)).await {
            Ok(Ok(Claimed::Won(_))) => Claim::Won,
            Ok(Ok(Claimed::Theirs { outcome, .. })) => {
                self.cluster.claims_lost.fetch_add(1, Ordering::Relaxed);
                if let Some(outcome) = outcome {
                    return Claim::Theirs(Some(outcome));
                }
                let journaled = async {
                    match &self.outcomes {
                        Some(outcomes) => outcomes.wait(&key, DUPLICATE_WAIT).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    Some(outcome) = journaled => Claim::Theirs(Some(outcome)),
                    awaited = claims.outcome(&key, DUPLICATE_WAIT) => match awaited {
                        Awaited::Answered(outcome) => Claim::Theirs(Some(outcome)),
                        // Its node died before journaling it: never sent, nothing
                        // authorized. 91: the gateway may try again.
                        Awaited::OwnerLost => Claim::Failed,
                        Awaited::TimedOut => Claim::Theirs(None),
                    },
                }
            }
            Ok(Err(e)) => {
                self.cluster.claims_failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "claim failed");
                Claim::Failed
            }
            Err(_) => {
                self.cluster.claims_failed.fetch_add(1, Ordering::Relaxed);
                Claim::Failed
            }
        }
    }

    /// Records a finished request's timings.
    fn record_timings(&self, r: &Times, life: &Lifecycle, shard: ShardTimings) {
        if !self.metrics.enabled() {
            return;
        }
        let mut timings = r.timings;
        for (stage, value) in [
            (Stage::Queue, shard.queue),
            (Stage::Score, shard.score),
            (Stage::Route, shard.route),
            (
                Stage::Journal,
                Some(Duration::from_micros(life.journal_us())),
            ),
        ] {
            if let Some(value) = value {
                timings.set(stage, value);
            }
        }
        let total = r.received.elapsed();
        timings.set(Stage::Total, total);
        let acquirer = match life.acquirer() {
            Some((index, us)) => {
                let elapsed = Duration::from_micros(us);
                timings.set_acquirer(index, elapsed);
                elapsed
            }
            None => Duration::ZERO,
        };
        timings.set(Stage::Switch, total.saturating_sub(acquirer));
        self.metrics.record(&timings);
    }

    /// Logs the first request shed and then at most one line a second with the count.
    fn log_shedding(&self, shed_before: u64, why: &'static str) {
        let now_s = self.metrics.uptime().as_secs();
        let last = self.stats.shed_logged_s.swap(now_s + 1, Ordering::Relaxed);
        if last != now_s + 1 {
            tracing::warn!(
                shed_total = shed_before + 1,
                why,
                "overload: requests answered 91 at once"
            );
        }
    }
}

fn refuse(request: &Message, code: ResponseCode) -> ([u8; 2], Message) {
    let code = as_code(code);
    (code, validate::respond(request, &code, None, ""))
}
