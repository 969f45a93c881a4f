//! The switch: ingress handler, shards, routing and forwarding, and the running server.
//!
//! Per request, on the ingress task of its stream: decode → validate → the card's shard
//! (a bounded queue; full → 91 at once) decides and picks the route → the route's first
//! healthy acquirer → response (MTI + 10, echoed fields, 39, 38, 48).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

use crate::acquirer::{AcquirerLink, LinkError};
use crate::config::Config;
use crate::router::{AcquirerIndex, Router};
use crate::scoring::{Scoring, ShardScoring, Verdict};
use crate::validate::{self, Authorization, Kind};
use payswitch_models::features::Transaction;
use payswitch_models::model::{Decision, Model};

use crate::rules::RuleSet;

/// What a shard answers for one authorization.
#[derive(Debug)]
struct ShardVerdict {
    /// The fraud decision and what explains it.
    scoring: Verdict,
    /// Acquirers to try, in order; `None`: no route (92).
    route: Option<Arc<[AcquirerIndex]>>,
}

struct ShardJob {
    auth: Authorization,
    transaction: Transaction,
    reply: oneshot::Sender<ShardVerdict>,
}

/// Counters of one shard, written only by the shard's task.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Authorizations decided.
    pub decided: AtomicU64,
}

/// A shard: owns the state of the cards that hash to it (velocity; duplicates as that
/// capability lands), so that state needs no lock. Reached through a bounded queue.
async fn run_shard(
    mut jobs: mpsc::Receiver<ShardJob>,
    router: Arc<ArcSwap<Router>>,
    scoring: Arc<Scoring>,
    mut state: ShardScoring,
    stats: Arc<ShardStats>,
) {
    while let Some(job) = jobs.recv().await {
        let auth = &job.auth;
        let verdict = scoring.decide(&mut state, &job.transaction);
        let route = router.load().route(&auth.pan, auth.currency, auth.mcc);
        stats.decided.fetch_add(1, Ordering::Relaxed);
        let _ = job.reply.send(ShardVerdict {
            scoring: verdict,
            route,
        });
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

/// The ingress handler shared by every gateway stream.
pub struct Switch {
    shards: Vec<mpsc::Sender<ShardJob>>,
    /// Models, rules and their counters.
    pub scoring: Arc<Scoring>,
    links: Vec<Arc<AcquirerLink>>,
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

/// What the in-order part of handling a frame left to do.
enum Accepted {
    /// Not an ISO 8583 message: end the stream with this code.
    Close(u32),
    /// Answered already.
    Done([u8; 2], Message),
    /// In the card's shard queue; the verdict, then the acquirer, are still to come.
    Queued {
        request: Message,
        verdict: oneshot::Receiver<ShardVerdict>,
    },
}

impl Handler for Switch {
    fn handle(
        self: Arc<Self>,
        frame: Bytes,
    ) -> impl std::future::Future<Output = Reply> + Send + 'static {
        // Decoding, validation and the shard enqueue run here, in the order the stream's
        // frames were read: a card's transactions reach its shard — and its velocity
        // state — in the order the gateway sent them, however the tasks are scheduled.
        let accepted = self.accept(frame);
        async move {
            let (code, response) = match accepted {
                Accepted::Close(code) => return Reply::Close(code),
                Accepted::Done(code, response) => (code, response),
                Accepted::Queued { request, verdict } => self.complete(&request, verdict).await,
            };
            self.stats.count(&code);
            Reply::Message(response)
        }
    }
}

fn as_code(code: ResponseCode) -> [u8; 2] {
    let s = code.as_str().as_bytes();
    [s[0], s[1]]
}

impl Switch {
    /// The acquirer links, in configuration order.
    pub fn links(&self) -> &[Arc<AcquirerLink>] {
        &self.links
    }

    fn accept(&self, frame: Bytes) -> Accepted {
        let (request, error) = match Message::decode_prefix(frame) {
            Ok(decoded) => decoded,
            // Not even an MTI and bitmap: nothing to answer.
            Err(_) => return Accepted::Close(codes::GARBAGE_FRAME),
        };
        let done = |(code, response): ([u8; 2], Message)| Accepted::Done(code, response);
        if error.is_some() {
            return done(self.refuse(&request, ResponseCode::FormatError));
        }
        match validate::classify(request.mti()) {
            Kind::Network => {
                let response = validate::respond_network(&request);
                let code = response
                    .get(payswitch_protocol::fields::RESPONSE_CODE)
                    .and_then(|c| c.try_into().ok())
                    .unwrap_or(*b"96");
                Accepted::Done(code, response)
            }
            Kind::Unsupported => done(self.refuse(&request, ResponseCode::InvalidTransaction)),
            Kind::Authorization | Kind::Reversal => match validate::validate(&request) {
                Ok(auth) => self.enqueue(request, auth),
                Err(code) => done(self.refuse(&request, code)),
            },
        }
    }

    /// Puts the authorization in its card's shard queue; a full queue is answered 91 now.
    fn enqueue(&self, request: Message, auth: Authorization) -> Accepted {
        let transaction = self.scoring.transaction(&request, &auth, unix_now_ms());
        // `shards` is never empty (`start` makes at least one), so the modulo is defined.
        let shard = (auth.pan.shard_hash() % self.shards.len() as u64) as usize;
        let (reply, verdict) = oneshot::channel();
        let job = ShardJob {
            auth,
            transaction,
            reply,
        };
        if self.shards[shard].try_send(job).is_err() {
            self.stats.shed.fetch_add(1, Ordering::Relaxed);
            let (code, response) = self.refuse(&request, ResponseCode::IssuerInoperative);
            return Accepted::Done(code, response);
        }
        Accepted::Queued { request, verdict }
    }

    fn refuse(&self, request: &Message, code: ResponseCode) -> ([u8; 2], Message) {
        let code = as_code(code);
        (code, validate::respond(request, &code, None, ""))
    }

    async fn complete(
        &self,
        request: &Message,
        verdict: oneshot::Receiver<ShardVerdict>,
    ) -> ([u8; 2], Message) {
        let Ok(verdict) = verdict.await else {
            return self.refuse(request, ResponseCode::SystemMalfunction);
        };
        let tags = verdict.scoring.tags();
        if verdict.scoring.decision == Decision::Decline {
            let code = as_code(ResponseCode::SuspectedFraud);
            return (code, validate::respond(request, &code, None, &tags));
        }
        let Some(route) = verdict.route else {
            return self.refuse(request, ResponseCode::NoRoute);
        };
        for &index in route.iter() {
            let link = &self.links[index];
            match link.call(request).await {
                Ok(answer) => {
                    let tags = with_acquirer(tags, link.name());
                    return self.relay(request, &answer, &tags);
                }
                // Nothing was sent: the next acquirer may take it.
                Err(LinkError::Down | LinkError::Busy) => continue,
                // It may have been authorized there: never send it elsewhere.
                Err(e) => {
                    debug_assert!(e.maybe_delivered());
                    let code = as_code(ResponseCode::IssuerInoperative);
                    let tags = with_acquirer(tags, link.name());
                    return (code, validate::respond(request, &code, None, &tags));
                }
            }
        }
        self.refuse(request, ResponseCode::IssuerInoperative)
    }

    fn relay(&self, request: &Message, answer: &Message, tags: &str) -> ([u8; 2], Message) {
        let Some(code) = validate::acquirer_code(answer) else {
            return self.refuse(request, ResponseCode::SystemMalfunction);
        };
        let approval = (code == *b"00")
            .then(|| validate::acquirer_approval_code(answer))
            .flatten();
        (code, validate::respond(request, &code, approval, tags))
    }
}

/// Field 48's tags with the acquirer that took the request, appended in place.
fn with_acquirer(mut tags: String, acquirer: &str) -> String {
    tags.push_str(";acquirer=");
    tags.push_str(acquirer);
    tags
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
    let cards_per_shard = (config.scoring.max_cards / shard_count).max(1);
    let mut shards = Vec::with_capacity(shard_count);
    let mut shard_stats = Vec::with_capacity(shard_count);
    for _ in 0..shard_count {
        let (tx, rx) = mpsc::channel(config.pipeline.shard_queue_depth);
        let stats = Arc::new(ShardStats::default());
        tokio::spawn(run_shard(
            rx,
            Arc::clone(&table),
            Arc::clone(&scoring),
            ShardScoring::new(cards_per_shard),
            Arc::clone(&stats),
        ));
        shards.push(tx);
        shard_stats.push(stats);
    }
    let switch = Arc::new(Switch {
        shards,
        scoring,
        links,
        stats: SwitchStats::default(),
        shard_stats,
    });
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
        let (bound, task) = crate::admin::start(
            addr,
            Arc::clone(&switch),
            config.admin_token.clone(),
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

fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
