//! The switch: ingress handler, shards, routing and forwarding, and the running server.
//!
//! Per request, on the ingress task of its stream: decode → validate → the card's shard
//! (a bounded queue; full → 91 at once), which answers retransmissions from its duplicate
//! window and otherwise decides and picks the route → journal the request and where it
//! goes (durable before it is sent) → the route's first healthy acquirer → journal the
//! response (durable before it is sent) → response (MTI + 10, echoed fields, 39, 38, 48).
//! An acquirer that does not answer in time gets a reversal (`crate::reversals`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use bytes::Bytes;
use payswitch_net::serve::{self, Handler, Limits, Reply, ServeStats};
use payswitch_net::{codes, quic, ClientTrust, TlsIdentity};
use payswitch_protocol::{fields, Message, ResponseCode};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::acquirer::{AcquirerLink, LinkError};
use crate::config::Config;
use crate::duplicates::{DupKey, DuplicateWindow, Forwarded, Original, Outcome};
use crate::journal::{Journal, JournalError, PanKey, Record, RecordKind};
use crate::metrics::{Metrics, Stage, Timings};
use crate::reversals::{PendingReversal, StoreAndForward};
use crate::router::{AcquirerIndex, Router};
use crate::scoring::{Scoring, ShardScoring, Verdict};
use crate::validate::{self, Authorization, Kind};
use payswitch_models::features::Transaction;
use payswitch_models::model::{Decision, Model};

use crate::rules::RuleSet;

/// What a shard answers for one request.
#[derive(Debug)]
enum ShardVerdict {
    /// A new authorization: decide it and send it on.
    Fresh {
        /// The fraud decision and what explains it.
        scoring: Verdict,
        /// Acquirers to try, in order; `None`: no route (92).
        route: Option<Arc<[AcquirerIndex]>>,
        /// Where its outcome goes, for retransmissions and reversals.
        original: Arc<Original>,
    },
    /// A retransmission of a request seen within the window.
    Duplicate(Arc<Original>),
    /// A new reversal from the gateway.
    Reversal {
        /// The reversal's own entry, for its retransmissions.
        own: Arc<Original>,
        /// The authorization it reverses, if the switch knows it.
        original: Option<Arc<Original>>,
    },
}

// One job per request, moved once: boxing the transaction would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum JobKind {
    Authorization(Authorization, Transaction),
    /// The reversal request itself: its field 90 names the original.
    Reversal(Message),
}

struct ShardJob {
    kind: JobKind,
    key: DupKey,
    received_ms: i64,
    /// When it was queued, if timings are recorded.
    queued: Option<Instant>,
    reply: oneshot::Sender<(ShardVerdict, ShardTimings)>,
}

/// The shard's part of a request's timings.
#[derive(Debug, Default, Clone, Copy)]
struct ShardTimings {
    queue: Option<Duration>,
    score: Option<Duration>,
    route: Option<Duration>,
}

/// Counters of one shard, written only by the shard's task.
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
}

/// What a shard starts with: its share of the journal's recent requests.
pub type RecoveredEntries = Vec<(DupKey, i64, Arc<Original>)>;

/// A shard: owns the state of the cards that hash to it (velocity, the duplicate window),
/// so that state needs no lock. Reached through a bounded queue.
async fn run_shard(
    mut jobs: mpsc::Receiver<ShardJob>,
    router: Arc<ArcSwap<Router>>,
    scoring: Arc<Scoring>,
    mut state: ShardScoring,
    mut window: DuplicateWindow,
    stats: Arc<ShardStats>,
) {
    while let Some(job) = jobs.recv().await {
        let mut timings = ShardTimings {
            queue: job.queued.map(|q| q.elapsed()),
            ..ShardTimings::default()
        };
        let verdict = if let Some(original) = window.get(&job.key, job.received_ms) {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            ShardVerdict::Duplicate(original)
        } else {
            let own = Arc::new(Original::new());
            window.insert(job.key, job.received_ms, Arc::clone(&own));
            match job.kind {
                JobKind::Authorization(auth, transaction) => {
                    let started = job.queued.map(|_| Instant::now());
                    let scoring = scoring.decide(&mut state, &transaction);
                    let scored = started.map(|_| Instant::now());
                    let route = router.load().route(&auth.pan, auth.currency, auth.mcc);
                    if let (Some(started), Some(scored)) = (started, scored) {
                        timings.score = Some(scored - started);
                        timings.route = Some(scored.elapsed());
                    }
                    stats.decided.fetch_add(1, Ordering::Relaxed);
                    ShardVerdict::Fresh {
                        scoring,
                        route,
                        original: own,
                    }
                }
                JobKind::Reversal(request) => ShardVerdict::Reversal {
                    own,
                    original: window.find_original(&request),
                },
            }
        };
        stats
            .window_len
            .store(window.len() as u64, Ordering::Relaxed);
        stats
            .window_evicted_early
            .store(window.evicted_early, Ordering::Relaxed);
        let _ = job.reply.send((verdict, timings));
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
    /// Uptime second (plus one) of the last overload log line.
    shed_logged_s: AtomicU64,
    /// Requests being handled now.
    pub in_flight: std::sync::atomic::AtomicI64,
    /// Response counts a second apart, for the last window's mix.
    pub(crate) code_history: crate::stats::CodeHistory,
}

impl SwitchStats {
    fn count(&self, code: &[u8; 2]) {
        let slot = ResponseCode::parse(code)
            .and_then(|c| ResponseCode::ALL.iter().position(|k| *k == c))
            .unwrap_or(ResponseCode::ALL.len());
        self.responses[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// Responses with `code` so far.
    pub fn responses_with(&self, code: ResponseCode) -> u64 {
        let slot = ResponseCode::ALL
            .iter()
            .position(|k| *k == code)
            .unwrap_or(0);
        self.responses[slot].load(Ordering::Relaxed)
    }
}

/// How long a retransmission waits for its original's answer: longer than any acquirer
/// timeout, so it only runs out if the original's task is gone.
const DUPLICATE_WAIT: Duration = Duration::from_secs(30);

/// The ingress handler shared by every gateway stream.
pub struct Switch {
    shards: Vec<mpsc::Sender<ShardJob>>,
    /// Models, rules and their counters.
    pub scoring: Arc<Scoring>,
    links: Vec<Arc<AcquirerLink>>,
    journal: Option<Journal>,
    pan_key: PanKey,
    /// Reversals owed to acquirers.
    pub reversals: Arc<StoreAndForward>,
    /// Latency histograms.
    pub metrics: Arc<Metrics>,
    /// The routing table, swapped whole on reload.
    pub router: Arc<ArcSwap<Router>>,
    /// The routes the table was built from, for `GET /api/routes`.
    pub routes: ArcSwap<Vec<crate::config::RouteConfig>>,
    /// Counters.
    pub stats: SwitchStats,
    /// Per-shard counters.
    pub shard_stats: Vec<Arc<ShardStats>>,
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

/// An answer to a validated request.
struct Answer {
    code: [u8; 2],
    approval: Option<[u8; 6]>,
    private_data: String,
}

impl Answer {
    fn new(code: ResponseCode, private_data: String) -> Answer {
        Answer {
            code: as_code(code),
            approval: None,
            private_data,
        }
    }

    fn outcome(&self) -> Outcome {
        Outcome {
            code: self.code,
            approval: self.approval,
            private_data: self.private_data.clone(),
        }
    }
}

impl Handler for Switch {
    fn handle(
        self: Arc<Self>,
        frame: Bytes,
    ) -> impl std::future::Future<Output = Reply> + Send + 'static {
        // Decoding, validation and the shard enqueue run here, in the order the stream's
        // frames were read: a card's transactions reach its shard — and its velocity
        // state — in the order the gateway sent them, however the tasks are scheduled.
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let accepted = self.accept(frame);
        async move {
            // Counted down however the request ends (even if its task is dropped).
            let _in_flight = InFlightGuard(&self.stats.in_flight);
            let (code, response) = match accepted {
                Accepted::Close(code) => return Reply::Close(code),
                Accepted::Done(code, response) => (code, response),
                Accepted::Refused(request, code) => self.refused(request, code).await,
                Accepted::Queued(request, verdict) => self.complete(request, verdict).await,
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

fn as_code(code: ResponseCode) -> [u8; 2] {
    let s = code.as_str().as_bytes();
    [s[0], s[1]]
}

fn code_str(code: &[u8; 2]) -> String {
    String::from_utf8_lossy(code).into_owned()
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

    /// The journal, when one is written.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    fn accept(&self, frame: Bytes) -> Accepted {
        let received = Instant::now();
        let timed = self.metrics.enabled();
        let decoded = Message::decode_prefix(frame);
        let mut timings = Timings::default();
        let decode_end = timed.then(Instant::now);
        if let Some(end) = decode_end {
            timings.set(Stage::Decode, end - received);
        }
        let (request, error) = match decoded {
            Ok(decoded) => decoded,
            // Not even an MTI and bitmap: nothing to answer.
            Err(_) => return Accepted::Close(codes::GARBAGE_FRAME),
        };
        let done = |(code, response): ([u8; 2], Message)| Accepted::Done(code, response);
        if error.is_some() {
            return done(refuse(&request, ResponseCode::FormatError));
        }
        let kind = validate::classify(request.mti());
        match kind {
            Kind::Network => {
                let response = validate::respond_network(&request);
                let code = response
                    .get(payswitch_protocol::fields::RESPONSE_CODE)
                    .and_then(|c| c.try_into().ok())
                    .unwrap_or(*b"96");
                Accepted::Done(code, response)
            }
            Kind::Unsupported => done(refuse(&request, ResponseCode::InvalidTransaction)),
            Kind::Authorization | Kind::Reversal => {
                let validated = validate::validate(&request);
                if let Some(start) = decode_end {
                    timings.set(Stage::Validate, start.elapsed());
                }
                match validated {
                    Ok(auth) => {
                        self.enqueue(request, auth, kind == Kind::Reversal, received, timings)
                    }
                    Err(code) => done(refuse(&request, code)),
                }
            }
        }
    }

    /// Puts the request in its card's shard queue; a full queue is answered 91 now.
    fn enqueue(
        &self,
        request: Message,
        auth: Authorization,
        reversal: bool,
        received: Instant,
        timings: Timings,
    ) -> Accepted {
        let Some(key) = DupKey::of(&request, reversal) else {
            let (code, response) = refuse(&request, ResponseCode::FormatError);
            return Accepted::Done(code, response);
        };
        let received_ms = unix_now_ms();
        let pan_hash = self.pan_key.hash(auth.pan.expose());
        let kind = if reversal {
            JobKind::Reversal(request.clone())
        } else {
            JobKind::Authorization(auth, self.scoring.transaction(&request, &auth, received_ms))
        };
        let in_flight = InFlight {
            request,
            auth,
            pan_hash,
            received,
            timings,
        };
        // `shards` is never empty (`start` makes at least one), so the modulo is defined.
        let shard = shard_of(pan_hash, self.shards.len());
        let (reply, verdict) = oneshot::channel();
        let job = ShardJob {
            kind,
            key,
            received_ms,
            queued: self.metrics.enabled().then(Instant::now),
            reply,
        };
        if self.shards[shard].try_send(job).is_err() {
            let shed = self.stats.shed.fetch_add(1, Ordering::Relaxed);
            self.log_shedding(shed);
            return Accepted::Refused(in_flight, ResponseCode::IssuerInoperative);
        }
        Accepted::Queued(in_flight, verdict)
    }

    /// The journal record of a validated request.
    fn request_record(&self, r: &InFlight) -> Record {
        let text = |n| r.request.get_str(n).unwrap_or("").to_string();
        Record {
            kind: RecordKind::Request,
            time_ms: unix_now_ms(),
            mti: r.request.mti().as_str().to_string(),
            processing_code: text(fields::PROCESSING_CODE),
            transmission_time: text(fields::TRANSMISSION_TIME),
            stan: text(fields::STAN),
            rrn: text(fields::RRN),
            terminal: text(fields::TERMINAL),
            merchant: text(fields::MERCHANT),
            pan_masked: r.auth.pan.to_string(),
            pan_hash: r.pan_hash,
            amount_minor: r.auth.amount.get(),
            currency: r.auth.currency.get(),
            ..Record::default()
        }
    }

    async fn journal_append(&self, records: &[Record]) -> Result<u64, JournalError> {
        match &self.journal {
            Some(journal) => journal.append(records).await,
            None => Ok(0),
        }
    }

    /// A request refused before its shard: journaled with its answer, then answered.
    async fn refused(&self, r: InFlight, code: ResponseCode) -> ([u8; 2], Message) {
        let answer = Answer::new(code, String::new());
        let request = self.request_record(&r);
        let mut journal = RequestJournal::new(request);
        let answered = self.finish(&r, &mut journal, answer, None).await;
        self.record_timings(&r, &journal, ShardTimings::default());
        answered
    }

    async fn complete(
        &self,
        r: InFlight,
        verdict: oneshot::Receiver<(ShardVerdict, ShardTimings)>,
    ) -> ([u8; 2], Message) {
        let Ok((verdict, shard_timings)) = verdict.await else {
            return refuse(&r.request, ResponseCode::SystemMalfunction);
        };
        let mut journal = RequestJournal::new(self.request_record(&r));
        let answered = self.complete_verdict(&r, &mut journal, verdict).await;
        self.record_timings(&r, &journal, shard_timings);
        answered
    }

    /// Records a finished request's timings.
    fn record_timings(&self, r: &InFlight, journal: &RequestJournal, shard: ShardTimings) {
        if !self.metrics.enabled() {
            return;
        }
        let mut timings = r.timings;
        for (stage, value) in [
            (Stage::Queue, shard.queue),
            (Stage::Score, shard.score),
            (Stage::Route, shard.route),
            (Stage::Journal, journal.journal_time),
        ] {
            if let Some(value) = value {
                timings.set(stage, value);
            }
        }
        let total = r.received.elapsed();
        timings.set(Stage::Total, total);
        let acquirer = match journal.acquirer_time {
            Some((index, elapsed)) => {
                timings.set_acquirer(index, elapsed);
                elapsed
            }
            None => Duration::ZERO,
        };
        timings.set(Stage::Switch, total.saturating_sub(acquirer));
        self.metrics.record(&timings);
    }

    /// Logs the first request shed and then at most one line a second with the count.
    fn log_shedding(&self, shed_before: u64) {
        let now_s = self.metrics.uptime().as_secs();
        let last = self.stats.shed_logged_s.swap(now_s + 1, Ordering::Relaxed);
        if last != now_s + 1 {
            tracing::warn!(
                shed_total = shed_before + 1,
                "overload: shard queue full, requests answered 91 at once"
            );
        }
    }

    async fn complete_verdict(
        &self,
        r: &InFlight,
        journal: &mut RequestJournal,
        verdict: ShardVerdict,
    ) -> ([u8; 2], Message) {
        match verdict {
            ShardVerdict::Duplicate(original) => self.answer_duplicate(r, journal, &original).await,
            ShardVerdict::Fresh {
                scoring,
                route,
                original,
            } => {
                journal.request.decision = scoring.decision_str().to_string();
                journal.request.score = scoring.score;
                if let Some(model) = &scoring.model {
                    journal.request.model = model.id().to_string();
                }
                let answer = self.authorize(r, journal, &scoring, route, &original).await;
                self.finish(r, journal, answer, Some(&original)).await
            }
            ShardVerdict::Reversal { own, original } => {
                let answer = self.reverse(journal, original).await;
                self.finish(r, journal, answer, Some(&own)).await
            }
        }
    }

    /// Journals the response (with the request, if it is not journaled yet), records the
    /// outcome for retransmissions, and builds the response.
    async fn finish(
        &self,
        r: &InFlight,
        journal: &mut RequestJournal,
        mut answer: Answer,
        original: Option<&Arc<Original>>,
    ) -> ([u8; 2], Message) {
        if !journal.failed {
            let mut response = journal.follow_up(RecordKind::Response);
            response.code = code_str(&answer.code);
            if let Some(approval) = &answer.approval {
                response.approval_code = String::from_utf8_lossy(approval).into_owned();
            }
            response.private_data = answer.private_data.clone();
            let acquirer = journal.acquirer_time.unwrap_or_default();
            response.switch_us = r.received.elapsed().saturating_sub(acquirer.1).as_micros() as u64;
            if let Some((index, round_trip)) = journal.acquirer_time {
                response.acquirer = self.links[index].name().to_string();
                response.acquirer_us = round_trip.as_micros() as u64;
            }
            if let Err(e) = self.append(journal, response).await {
                if answer.code == *b"00" {
                    // Approved at the acquirer, but the approval cannot be made durable:
                    // the gateway is told it failed, and the acquirer gets a reversal.
                    if let Some(original) = original {
                        self.reverse_unjournaled(original);
                    }
                }
                answer = Answer::new(journal_refusal(e), String::new());
                self.stats.journal_refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(original) = original {
            original.set_outcome(answer.outcome());
        }
        let approval = answer.approval.as_ref().map(|a| &a[..]);
        (
            answer.code,
            validate::respond(&r.request, &answer.code, approval, &answer.private_data),
        )
    }

    /// Appends `record` (after the request record if that is not journaled yet).
    async fn append(
        &self,
        journal: &mut RequestJournal,
        record: Record,
    ) -> Result<u64, JournalError> {
        journal.append(self, vec![record]).await
    }

    async fn authorize(
        &self,
        r: &InFlight,
        journal: &mut RequestJournal,
        scoring: &Verdict,
        route: Option<Arc<[AcquirerIndex]>>,
        original: &Arc<Original>,
    ) -> Answer {
        let tags = scoring.tags();
        if scoring.decision == Decision::Decline {
            return Answer::new(ResponseCode::SuspectedFraud, tags);
        }
        let Some(route) = route else {
            return Answer::new(ResponseCode::NoRoute, tags);
        };
        for &index in route.iter() {
            let link = &self.links[index];
            // An acquirer drained by an operator takes no new authorizations (its
            // reversals still go).
            if link.is_draining() {
                continue;
            }
            // Nothing is sent by a refused reservation: the next acquirer may take it.
            let Ok(reservation) = link.reserve() else {
                continue;
            };
            let mut forwarded = journal.follow_up(RecordKind::Forwarded);
            forwarded.acquirer = link.name().to_string();
            forwarded.link_stan = reservation.stan().get();
            // Durable before it leaves: after a crash, the journal knows it may have been
            // authorized and reverses it.
            let request_seq = match journal.append(self, vec![forwarded.clone()]).await {
                Ok(_) => journal.request_seq,
                Err(e) => {
                    self.stats.journal_refused.fetch_add(1, Ordering::Relaxed);
                    return Answer::new(journal_refusal(e), tags);
                }
            };
            forwarded.request_seq = request_seq;
            forwarded.request_back = 0;
            original.set_forwarded(Forwarded::new(
                index,
                reservation.stan(),
                request_seq,
                &forwarded,
            ));
            let sent = Instant::now();
            let result = reservation.send(&r.request).await;
            journal.acquirer_time = Some((index, sent.elapsed()));
            match result {
                Ok(answer) => return relay(&answer, with_acquirer(tags, link.name())),
                Err(LinkError::Down | LinkError::Busy) => continue,
                // It may have been authorized there: never send it elsewhere; reverse it.
                Err(e) => {
                    debug_assert!(e.maybe_delivered());
                    let tags = with_acquirer(tags, link.name());
                    self.queue_reversal(journal, original).await;
                    return Answer::new(ResponseCode::IssuerInoperative, tags);
                }
            }
        }
        Answer::new(ResponseCode::IssuerInoperative, tags)
    }

    /// Journals a reversal of `original` as queued and starts delivering it, unless one is
    /// already under way.
    async fn queue_reversal(&self, journal: &mut RequestJournal, original: &Arc<Original>) {
        let Some(forwarded) = original.forwarded() else {
            return;
        };
        if !original.claim_reversal() {
            return;
        }
        let record = forwarded.record(self.links[forwarded.acquirer].name());
        let mut queued = record.follow_up(
            RecordKind::ReversalQueued,
            forwarded.request_seq,
            unix_now_ms(),
        );
        queued.acquirer = record.acquirer.clone();
        queued.link_stan = record.link_stan;
        let pending = PendingReversal {
            request_seq: forwarded.request_seq,
            acquirer: forwarded.acquirer,
            original: record,
        };
        if journal.append(self, vec![queued]).await.is_err() {
            tracing::error!(rrn = %pending.original.rrn, "reversal could not be journaled: delivering it from memory");
        }
        self.stats.reversals_queued.fetch_add(1, Ordering::Relaxed);
        self.reversals.push(pending);
    }

    /// A reversal for an approval that could not be journaled (the journal has stopped).
    fn reverse_unjournaled(&self, original: &Arc<Original>) {
        let Some(forwarded) = original.forwarded() else {
            return;
        };
        if original.claim_reversal() {
            self.stats.reversals_queued.fetch_add(1, Ordering::Relaxed);
            self.reversals.push(PendingReversal {
                request_seq: forwarded.request_seq,
                acquirer: forwarded.acquirer,
                original: forwarded.record(self.links[forwarded.acquirer].name()),
            });
        }
    }

    /// A gateway's 0400/0420: the original's acquirer gets a reversal through the
    /// store-and-forward queue (at most once per original); the gateway is answered once
    /// it is durably queued.
    async fn reverse(
        &self,
        journal: &mut RequestJournal,
        original: Option<Arc<Original>>,
    ) -> Answer {
        let Some(original) = original else {
            return Answer::new(ResponseCode::UnableToLocateOriginal, String::new());
        };
        if original.forwarded().is_none() {
            // Declined or refused by the switch itself: nothing was authorized.
            return Answer::new(ResponseCode::Approved, "reversal=nothing_to_reverse".into());
        }
        if let Some(outcome) = original.outcome_now() {
            if outcome.code != *b"00" && outcome.code != *b"91" {
                // Declined by the acquirer: nothing to reverse there.
                return Answer::new(ResponseCode::Approved, "reversal=nothing_to_reverse".into());
            }
        }
        let queued_before = !original.reversal_claimed();
        self.queue_reversal(journal, &original).await;
        let tag = if queued_before {
            "reversal=queued"
        } else {
            "reversal=already_queued"
        };
        Answer::new(ResponseCode::Approved, tag.into())
    }

    /// A retransmission: the original's answer, marked `dup=1`, journaled as such.
    async fn answer_duplicate(
        &self,
        r: &InFlight,
        journal: &mut RequestJournal,
        original: &Original,
    ) -> ([u8; 2], Message) {
        self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        let outcome = match original.outcome(DUPLICATE_WAIT).await {
            Some(outcome) => outcome.clone(),
            None => Outcome {
                code: as_code(ResponseCode::DuplicateTransmission),
                approval: None,
                private_data: String::new(),
            },
        };
        let private_data = if outcome.private_data.is_empty() {
            "dup=1".to_string()
        } else {
            format!("{};dup=1", outcome.private_data)
        };
        let mut response = journal.follow_up(RecordKind::Response);
        response.duplicate = true;
        response.code = code_str(&outcome.code);
        if let Some(approval) = &outcome.approval {
            response.approval_code = String::from_utf8_lossy(approval).into_owned();
        }
        response.private_data = private_data.clone();
        response.switch_us = r.received.elapsed().as_micros() as u64;
        if let Err(e) = journal.append(self, vec![response]).await {
            self.stats.journal_refused.fetch_add(1, Ordering::Relaxed);
            let code = as_code(journal_refusal(e));
            return (code, validate::respond(&r.request, &code, None, ""));
        }
        let approval = outcome.approval.as_ref().map(|a| &a[..]);
        (
            outcome.code,
            validate::respond(&r.request, &outcome.code, approval, &private_data),
        )
    }
}

/// The code for a request the journal could not take: 91 while the disk is behind (try
/// again), 96 once the journal has stopped.
fn journal_refusal(e: JournalError) -> ResponseCode {
    match e {
        JournalError::Overloaded => ResponseCode::IssuerInoperative,
        JournalError::Failed | JournalError::Encode => ResponseCode::SystemMalfunction,
    }
}

/// The journal records of one request, appended as it goes: the request record goes out
/// with the first of its follow-ups, so the common paths cost one group commit each.
struct RequestJournal {
    request: Record,
    /// Sequence number of the request record once journaled; 0 before.
    request_seq: u64,
    /// Set when an append failed: nothing more is journaled for this request.
    failed: bool,
    /// The acquirer that answered (or timed out) and its round trip.
    acquirer_time: Option<(AcquirerIndex, Duration)>,
    /// Time spent waiting for this request's appends to be durable.
    journal_time: Option<Duration>,
}

impl RequestJournal {
    fn new(request: Record) -> RequestJournal {
        RequestJournal {
            request,
            request_seq: 0,
            failed: false,
            acquirer_time: None,
            journal_time: None,
        }
    }

    /// A follow-up record of the request.
    fn follow_up(&self, kind: RecordKind) -> Record {
        let mut record = self
            .request
            .follow_up(kind, self.request_seq, unix_now_ms());
        if self.request_seq == 0 {
            record.request_back = 1;
        }
        record
    }

    async fn append(
        &mut self,
        switch: &Switch,
        mut records: Vec<Record>,
    ) -> Result<u64, JournalError> {
        if self.failed {
            return Err(JournalError::Failed);
        }
        let with_request = self.request_seq == 0;
        if with_request {
            for (i, record) in records.iter_mut().enumerate() {
                // This request's own follow-ups name it by distance; a record about
                // another request (a reversal queued for the original) keeps its number.
                if record.request_seq == 0 {
                    record.request_back = u8::try_from(i + 1).unwrap_or(u8::MAX);
                }
            }
            records.insert(0, self.request.clone());
        }
        let started = Instant::now();
        let appended = switch.journal_append(&records).await;
        *self.journal_time.get_or_insert(Duration::ZERO) += started.elapsed();
        match appended {
            Ok(first) => {
                if with_request {
                    // Without a journal `first` is 0; keep a placeholder so the request is
                    // not "journaled" again.
                    self.request_seq = first.max(1);
                }
                Ok(first)
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }
}

fn refuse(request: &Message, code: ResponseCode) -> ([u8; 2], Message) {
    let code = as_code(code);
    (code, validate::respond(request, &code, None, ""))
}

fn relay(answer: &Message, tags: String) -> Answer {
    let Some(code) = validate::acquirer_code(answer) else {
        return Answer::new(ResponseCode::SystemMalfunction, tags);
    };
    let approval = (code == *b"00")
        .then(|| validate::acquirer_approval_code(answer))
        .flatten()
        .and_then(|a| <[u8; 6]>::try_from(a).ok());
    Answer {
        code,
        approval,
        private_data: tags,
    }
}

/// Field 48's tags with the acquirer that took the request, appended in place.
fn with_acquirer(mut tags: String, acquirer: &str) -> String {
    tags.push_str(";acquirer=");
    tags.push_str(acquirer);
    tags
}

/// The shard a card's keyed hash belongs to.
pub fn shard_of(pan_hash: u128, shards: usize) -> usize {
    (pan_hash as u64 % shards as u64) as usize
}

/// A running switch: its addresses and a way to stop it.
#[derive(Debug)]
pub struct RunningSwitch {
    /// QUIC listener address, when configured.
    pub quic_addr: Option<SocketAddr>,
    /// TCP listener address, when configured.
    pub tcp_addr: Option<SocketAddr>,
    /// Admin HTTP address, when configured.
    pub admin_addr: Option<SocketAddr>,
    /// The certificate gateways must trust.
    pub certificate: CertificateDer<'static>,
    /// The handler, for its counters.
    pub switch: Arc<Switch>,
    /// Listener counters (QUIC and TCP together).
    pub serve_stats: Arc<ServeStats>,
    shutdown: CancellationToken,
    /// Stops the acquirer links: only after the listeners have drained, so requests in
    /// progress still reach their acquirer and get its answer.
    links_shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningSwitch {
    /// Graceful shutdown: stops accepting connections and reading requests, answers the
    /// requests already read (waiting up to `payswitch_net::serve::DRAIN_TIMEOUT`), then
    /// closes the listeners and the acquirer links.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        self.links_shutdown.cancel();
    }

    /// A token that stops the switch when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// The switch's TLS identity and how it trusts acquirers.
#[derive(Debug, Clone)]
pub struct Security {
    /// Certificate and key gateways see.
    pub identity: TlsIdentity,
    /// Trust for each acquirer, in configuration order.
    pub acquirer_trust: Vec<ClientTrust>,
}

impl Security {
    /// From the configuration's files; a self-signed identity when none is configured.
    pub fn from_config(config: &Config) -> anyhow::Result<Security> {
        let identity = match &config.tls {
            Some(tls) => TlsIdentity::from_pem_files(&tls.cert, &tls.key)?,
            None => {
                tracing::warn!("no certificate configured: using a self-signed one, gateways must be told to trust it");
                TlsIdentity::self_signed(&["localhost", "127.0.0.1"])?
            }
        };
        config.check_acquirer_trust()?;
        let mut acquirer_trust = Vec::with_capacity(config.acquirers.len());
        for acquirer in &config.acquirers {
            let trust = match &acquirer.ca {
                Some(ca) => ClientTrust::from_ca_file(ca)?,
                None if config.insecure_acquirers => {
                    tracing::warn!(acquirer = %acquirer.name, "acquirer certificate NOT verified (quick-start default); pass --acquirer-ca to verify it");
                    ClientTrust::AcceptAny
                }
                None => anyhow::bail!("acquirer {:?}: no CA configured", acquirer.name),
            };
            acquirer_trust.push(trust);
        }
        Ok(Security {
            identity,
            acquirer_trust,
        })
    }
}

/// Loads the configured models and rules; any that fails to load or to fit the budget
/// stops the start with its reason.
fn start_scoring(config: &Config, shutdown: CancellationToken) -> anyhow::Result<Scoring> {
    let s = &config.scoring;
    let rules = Arc::new(
        RuleSet::load(s.rules.as_deref(), crate::scoring::rule_variables())
            .context("loading the rules file")?,
    );
    tokio::spawn(Arc::clone(&rules).watch(shutdown));
    let budget = std::time::Duration::from_micros(s.budget_us);
    let scoring = Scoring::new(rules, budget, s.event_time, s.max_entities);
    if let Some(path) = &s.model {
        let model =
            Model::load_file(path).with_context(|| format!("loading model {}", path.display()))?;
        scoring
            .set_champion(Arc::new(model))
            .map_err(anyhow::Error::msg)?;
    }
    for path in &s.challengers {
        let model =
            Model::load_file(path).with_context(|| format!("loading model {}", path.display()))?;
        scoring
            .add_challenger(Arc::new(model))
            .map_err(anyhow::Error::msg)?;
    }
    Ok(scoring)
}

/// Starts the switch: acquirer links, shards, listeners and admin HTTP.
pub async fn start(config: &Config, security: Security) -> anyhow::Result<RunningSwitch> {
    config.check()?;
    let shutdown = CancellationToken::new();
    let links_shutdown = CancellationToken::new();
    let mut links = Vec::with_capacity(config.acquirers.len());
    for (acquirer, trust) in config.acquirers.iter().zip(security.acquirer_trust) {
        links.push(AcquirerLink::start(
            acquirer.clone(),
            trust,
            links_shutdown.clone(),
        )?);
    }
    let table = Arc::new(ArcSwap::from_pointee(Router::from_config(config)?));
    let scoring = Arc::new(start_scoring(config, links_shutdown.clone())?);
    if let Some(dir) = &config.scoring.models_dir {
        tokio::spawn(crate::scoring::watch_models_dir(
            Arc::clone(&scoring),
            dir.clone(),
            links_shutdown.clone(),
        ));
    }
    let shard_count = config.pipeline.shard_count().max(1);
    let metrics = Arc::new(Metrics::new(links.len(), config.pipeline.metrics));
    tokio::spawn(Arc::clone(&metrics).run(links_shutdown.clone()));
    let (journal, pan_key, recovery) = open_journal(config)?;
    let reversals = StoreAndForward::new(links.clone(), journal.clone(), links_shutdown.clone());
    let mut recovered: Vec<RecoveredEntries> = (0..shard_count).map(|_| Vec::new()).collect();
    for (pan_hash, key, at_ms, original) in recovery.recent {
        recovered[shard_of(pan_hash, shard_count)].push((key, at_ms, original));
    }
    let cards_per_shard = (config.scoring.max_cards / shard_count).max(1);
    let window = Duration::from_secs(config.journal.duplicate_window_s);
    let window_capacity = (config.journal.max_duplicates / shard_count).max(1);
    let mut shards = Vec::with_capacity(shard_count);
    let mut shard_stats = Vec::with_capacity(shard_count);
    for entries in recovered {
        let (tx, rx) = mpsc::channel(config.pipeline.shard_queue_depth);
        let stats = Arc::new(ShardStats::default());
        let mut duplicates = DuplicateWindow::new(window, window_capacity);
        for (key, at_ms, original) in entries {
            duplicates.insert(key, at_ms, original);
        }
        tokio::spawn(run_shard(
            rx,
            Arc::clone(&table),
            Arc::clone(&scoring),
            ShardScoring::new(cards_per_shard),
            duplicates,
            Arc::clone(&stats),
        ));
        shards.push(tx);
        shard_stats.push(stats);
    }
    // What the journal says is owed: in-doubt authorizations are queued for reversal
    // (durably, before delivery starts), then everything owed is delivered.
    let queued: Vec<Record> = recovery
        .in_doubt
        .iter()
        .map(|pending| Record {
            acquirer: pending.original.acquirer.clone(),
            link_stan: pending.original.link_stan,
            ..pending.original.follow_up(
                RecordKind::ReversalQueued,
                pending.request_seq,
                unix_now_ms(),
            )
        })
        .collect();
    if let (Some(journal), false) = (&journal, queued.is_empty()) {
        journal
            .append(&queued)
            .await
            .context("journaling the reversals of in-doubt authorizations")?;
    }
    for pending in recovery.in_doubt {
        reversals.push(pending);
    }
    for pending in recovery.pending {
        reversals.push(pending);
    }
    let switch = Arc::new(Switch {
        shards,
        scoring,
        links,
        journal,
        pan_key,
        reversals,
        metrics,
        router: Arc::clone(&table),
        routes: ArcSwap::from_pointee(config.routes.clone()),
        stats: SwitchStats::default(),
        shard_stats,
    });
    tokio::spawn(crate::stats::tick(
        Arc::clone(&switch),
        links_shutdown.clone(),
    ));
    let limits = Limits {
        max_frame: config.pipeline.max_frame,
        max_in_flight_per_stream: config.pipeline.max_in_flight_per_stream,
        max_connections: config.pipeline.max_connections,
    };
    let serve_stats = Arc::new(ServeStats::default());
    let certificate = security.identity.certs[0].clone();
    let mut tasks = Vec::new();
    let mut quic_addr = None;
    if let Some(addr) = config.listen.quic {
        let endpoint = quic::server_endpoint(addr, security.identity.clone())
            .with_context(|| format!("binding QUIC listener {addr}"))?;
        quic_addr = Some(endpoint.local_addr()?);
        tasks.push(tokio::spawn(serve::serve_quic(
            endpoint,
            Arc::clone(&switch),
            limits,
            Arc::clone(&serve_stats),
            shutdown.child_token(),
        )));
    }
    let mut tcp_addr = None;
    if let Some(addr) = config.listen.tcp {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding TCP listener {addr}"))?;
        tcp_addr = Some(listener.local_addr()?);
        tasks.push(tokio::spawn(serve::serve_tcp(
            listener,
            Arc::clone(&switch),
            limits,
            Arc::clone(&serve_stats),
            shutdown.child_token(),
        )));
    }
    let mut admin_addr = None;
    if let Some(addr) = config.listen.admin {
        let ready = crate::admin::Readiness {
            model_required: config.scoring.model.is_some(),
            config_source: config.source.clone(),
            serve_stats: Arc::clone(&serve_stats),
        };
        let (bound, task) = crate::admin::start(
            addr,
            Arc::clone(&switch),
            config.admin_token.clone(),
            ready,
            shutdown.child_token(),
        )
        .await?;
        admin_addr = Some(bound);
        tasks.push(task);
    }
    Ok(RunningSwitch {
        quic_addr,
        tcp_addr,
        admin_addr,
        certificate,
        switch,
        serve_stats,
        shutdown,
        links_shutdown,
        tasks,
    })
}

/// What the journal left: the writer, the PAN hash key, and what is owed and remembered.
fn open_journal(
    config: &Config,
) -> anyhow::Result<(Option<Journal>, PanKey, crate::recovery::Recovery)> {
    let journal_config = &config.journal;
    if !journal_config.enabled {
        tracing::warn!("journal turned off: answered authorizations do not survive a crash and in-doubt ones are never reversed");
        let key: [u8; 16] = rand::random();
        return Ok((None, PanKey::from_bytes(key), Default::default()));
    }
    let dir = &journal_config.dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the journal directory {}", dir.display()))?;
    let pan_key = PanKey::load_or_create(dir).context("reading the PAN hash key")?;
    let acquirers: Vec<String> = config.acquirers.iter().map(|a| a.name.clone()).collect();
    let window_ms =
        i64::try_from(journal_config.duplicate_window_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let recovery =
        crate::recovery::recover(dir, &acquirers, unix_now_ms().saturating_sub(window_ms))
            .with_context(|| format!("replaying the journal in {}", dir.display()))?;
    let report = &recovery.report;
    if let Some(torn) = &report.torn_tail {
        tracing::warn!(segment = %torn.path.display(), offset = torn.offset, bytes = torn.bytes, "journal: torn final record (a crash mid-write) cut off");
    }
    if recovery.unknown_acquirers > 0 {
        tracing::error!(
            count = recovery.unknown_acquirers,
            "journal: reversals owed to acquirers no longer configured are left undelivered"
        );
    }
    tracing::info!(
        dir = %dir.display(),
        records = report.records,
        in_doubt = recovery.in_doubt.len(),
        reversals_pending = recovery.pending.len(),
        remembered = recovery.recent.len(),
        "journal replayed"
    );
    let journal = Journal::start(journal_config, report.next_seq())
        .with_context(|| format!("opening the journal in {}", dir.display()))?;
    Ok((Some(journal), pan_key, recovery))
}

/// Unix milliseconds now.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
