//! The switch: ingress handler, shards, routing and forwarding, and the running server.
//!
//! Per request, on the ingress task of its stream: decode → validate → the card's shard
//! (a bounded queue; full → 91 at once), which answers retransmissions from its duplicate
//! window and otherwise decides and picks the route (`crate::shard`) → the request's
//! [`Lifecycle`] (`crate::lifecycle`), whose steps this module carries out: journal the
//! request and where it goes (durable before it is sent) → the route's first healthy
//! acquirer → journal the response (durable before it is sent) → response (MTI + 10,
//! echoed fields, 39, 38, 48). An acquirer that does not answer in time gets a reversal
//! (`crate::reversals`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use bytes::Bytes;
use payswitch_net::serve::{self, Handler, Limits, Reply, ServeStats};
use payswitch_net::{codes, quic, ClientTrust, TlsIdentity};
use payswitch_protocol::{Message, ResponseCode};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::acquirer::{AcquirerLink, LinkError, Reservation};
use crate::config::Config;
use crate::duplicates::{DupKey, DuplicateWindow, Original};
use crate::ingress::{self, Admission};
use crate::journal::{Journal, JournalError, PanKey, Record, RecordKind};
use crate::lifecycle::{self, Event, Lifecycle, Now, ShardVerdict, Step};
use crate::metrics::{Metrics, Stage, Timings};
use crate::reversals::StoreAndForward;
use crate::router::Router;
use crate::scoring::Scoring;
use crate::shard::{Shard, ShardRequest, ShardTimings};
use crate::validate::{self, Authorization};
use payswitch_models::model::Model;

pub use crate::shard::ShardStats;

use crate::rules::RuleSet;

struct ShardJob {
    request: ShardRequest,
    key: DupKey,
    received_ms: i64,
    /// When it was queued, if timings are recorded.
    queued: Option<Instant>,
    reply: oneshot::Sender<(ShardVerdict, ShardTimings)>,
}

/// What a shard starts with: its share of the journal's recent requests.
pub type RecoveredEntries = Vec<(DupKey, i64, Arc<Original>)>;

/// Runs a shard behind its bounded queue.
async fn run_shard(
    mut jobs: mpsc::Receiver<ShardJob>,
    router: Arc<ArcSwap<Router>>,
    scoring: Arc<Scoring>,
    mut shard: Shard,
) {
    while let Some(job) = jobs.recv().await {
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

    fn add(&self, counts: lifecycle::Counts) {
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

/// How long a retransmission waits for its original's answer.
const DUPLICATE_WAIT: Duration = Duration::from_millis(lifecycle::DUPLICATE_WAIT_MS);

/// The ingress handler shared by every gateway stream.
pub struct Switch {
    shards: Vec<mpsc::Sender<ShardJob>>,
    /// Models, rules and their counters.
    pub scoring: Arc<Scoring>,
    links: Vec<Arc<AcquirerLink>>,
    /// The acquirers' names, by index (as lifecycles name them).
    acquirer_names: Vec<String>,
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
                Accepted::Refused(r, code) => {
                    let record = self.request_record(&r);
                    let life = Lifecycle::refused(r.request.clone(), record, r.received_at, code);
                    self.drive(r, life, ShardTimings::default()).await
                }
                Accepted::Queued(r, verdict) => {
                    let Ok((verdict, shard_timings)) = verdict.await else {
                        let (code, response) = refuse(&r.request, ResponseCode::SystemMalfunction);
                        self.stats.count(&code);
                        return Reply::Message(response);
                    };
                    let record = self.request_record(&r);
                    let life = Lifecycle::new(r.request.clone(), record, r.received_at, verdict);
                    self.drive(r, life, shard_timings).await
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

/// The switch's clock, as lifecycles take it.
pub fn now() -> Now {
    let unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    Now { unix_us }
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
            } => self.enqueue(request, auth, reversal, key, received, timings),
        }
    }

    /// Puts the request in its card's shard queue; a full queue is answered 91 now.
    fn enqueue(
        &self,
        request: Message,
        auth: Authorization,
        reversal: bool,
        key: DupKey,
        received: Instant,
        timings: Timings,
    ) -> Accepted {
        let received_at = now();
        let received_ms = received_at.unix_ms();
        let pan_hash = self.pan_key.hash(auth.pan.expose());
        let shard_request = if reversal {
            ShardRequest::Reversal(request.clone())
        } else {
            ShardRequest::Authorization(
                auth,
                self.scoring.transaction(&request, &auth, received_ms),
            )
        };
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
            self.log_shedding(shed);
            return Accepted::Refused(in_flight, ResponseCode::IssuerInoperative);
        }
        Accepted::Queued(in_flight, verdict)
    }

    /// The journal record of a validated request.
    fn request_record(&self, r: &InFlight) -> Record {
        Lifecycle::request_record(&r.request, &r.auth, r.pan_hash, now())
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
        r: InFlight,
        mut life: Lifecycle,
        shard: ShardTimings,
    ) -> ([u8; 2], Message) {
        let names = &self.acquirer_names;
        let mut reservation: Option<Reservation<'_>> = None;
        let mut step = life.start(now(), names);
        let reply = loop {
            let event = match step {
                Step::Reply(reply) => break reply,
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
                    match reserved.send(life.request()).await {
                        Ok(answer) => Event::Answered(answer),
                        Err(LinkError::Down | LinkError::Busy) => Event::NotSent,
                        Err(e) => {
                            debug_assert!(e.maybe_delivered());
                            Event::NoAnswer
                        }
                    }
                }
                Step::QueueReversal(pending) => {
                    self.reversals.push(pending);
                    Event::Queued
                }
                Step::AwaitOriginal(original) => {
                    Event::Original(original.outcome(DUPLICATE_WAIT).await.cloned())
                }
            };
            step = life.handle(event, now(), names);
        };
        self.stats.add(life.counts());
        self.record_timings(&r, &life, shard);
        (reply.code, reply.response)
    }

    /// Records a finished request's timings.
    fn record_timings(&self, r: &InFlight, life: &Lifecycle, shard: ShardTimings) {
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
}

fn refuse(request: &Message, code: ResponseCode) -> ([u8; 2], Message) {
    let code = lifecycle::as_code(code);
    (code, validate::respond(request, &code, None, ""))
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
            Shard::new(cards_per_shard, duplicates, Arc::clone(&stats)),
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
    let acquirer_names = links.iter().map(|l| l.name().to_string()).collect();
    let switch = Arc::new(Switch {
        shards,
        scoring,
        links,
        acquirer_names,
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
